//! No panic is reachable from the public API: random sequences of calls (allocate in every
//! mode, views, copies, maps, drops, trims, statistics) with random and absurd arguments,
//! on the CPU and on the first OpenCL device where there is one. Every call returns `Ok` or
//! one of the errors that name bad input or exhausted memory; data written survives
//! everything else; the statistics balance at rest.

use proptest::prelude::*;
use unimem::{AllocationMode, Buffer, DeviceId, DeviceKind, Error, MapMode, MemoryManager};

#[derive(Debug, Clone)]
enum Op {
    Allocate { device: u8, len: usize, mode: u8 },
    Drop { index: usize },
    Write { index: usize, offset: usize, len: usize },
    Read { index: usize, offset: usize, len: usize },
    WriteAsync { index: usize, offset: usize, len: usize },
    ReadAsync { index: usize, offset: usize, len: usize },
    View { index: usize, start: usize, end: usize },
    Map { index: usize, mode: u8, write: bool },
    HostWrite { index: usize, at: usize },
    CopyBuffer { from: usize, to: usize },
    Trim,
    TrimTo { keep: u64 },
    Statistics,
}

/// Lengths: mostly small, some empty, some absurd.
fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..5000,
        1 => Just(0usize),
        1 => prop_oneof![Just(usize::MAX), Just(usize::MAX / 4), Just(1usize << 40), Just(isize::MAX as usize)],
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<u8>(), len(), 0u8..4).prop_map(|(device, len, mode)| Op::Allocate { device, len, mode }),
        2 => any::<usize>().prop_map(|index| Op::Drop { index }),
        3 => (any::<usize>(), len(), len()).prop_map(|(index, offset, len)| Op::Write { index, offset, len }),
        3 => (any::<usize>(), len(), len()).prop_map(|(index, offset, len)| Op::Read { index, offset, len }),
        1 => (any::<usize>(), len(), len()).prop_map(|(index, offset, len)| Op::WriteAsync { index, offset, len }),
        1 => (any::<usize>(), len(), len()).prop_map(|(index, offset, len)| Op::ReadAsync { index, offset, len }),
        2 => (any::<usize>(), len(), len()).prop_map(|(index, start, end)| Op::View { index, start, end }),
        2 => (any::<usize>(), 0u8..3, any::<bool>()).prop_map(|(index, mode, write)| Op::Map { index, mode, write }),
        2 => (any::<usize>(), len()).prop_map(|(index, at)| Op::HostWrite { index, at }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(from, to)| Op::CopyBuffer { from, to }),
        1 => Just(Op::Trim),
        1 => (0u64..4_000_000).prop_map(|keep| Op::TrimTo { keep }),
        1 => Just(Op::Statistics),
    ]
}

const MODES: [AllocationMode; 4] =
    [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned, AllocationMode::Unified];

/// The errors that bad input or exhausted memory may give; anything else fails the test.
fn clear(result: Result<(), Error>) -> Result<(), TestCaseError> {
    match result {
        Ok(()) => Ok(()),
        Err(
            e @ (Error::OutOfBounds { .. }
            | Error::InvalidRange { .. }
            | Error::SizeOverflow { .. }
            | Error::LengthMismatch { .. }
            | Error::UnsupportedMode { .. }
            | Error::OutOfMemory { .. }
            | Error::TooLarge { .. }),
        ) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e} ({e:?})"))),
    }
}

/// A live buffer and what it must hold.
struct Live {
    buffer: Buffer<u32>,
    expected: Vec<u32>,
}

fn pattern(seed: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| (seed as u32).wrapping_mul(2_654_435_761) ^ i as u32).collect()
}

fn pick(live: &mut [Live], index: usize) -> Option<&mut Live> {
    let n = live.len();
    (n > 0).then(|| &mut live[index % n])
}

fn apply(
    manager: &MemoryManager,
    devices: &[DeviceId],
    live: &mut Vec<Live>,
    op: Op,
    step: usize,
) -> Result<(), TestCaseError> {
    match op {
        Op::Allocate { device, len, mode } => {
            let device = devices[device as usize % devices.len()];
            match manager.allocate_on::<u32>(device, len, MODES[mode as usize % 4]) {
                Ok(mut buffer) => {
                    // Pooled memory keeps its last user's contents: start from a known pattern.
                    let expected = pattern(step, len);
                    clear(buffer.copy_from_blocking(&expected, 0))?;
                    live.push(Live { buffer, expected });
                }
                Err(e) => clear(Err(e))?,
            }
        }
        Op::Drop { index } => {
            if !live.is_empty() {
                let n = live.len();
                live.swap_remove(index % n);
            }
        }
        Op::Write { index, offset, len } | Op::WriteAsync { index, offset, len } => {
            let Some(l) = pick(live, index) else { return Ok(()) };
            let src = pattern(step, len.min(1 << 16));
            let result = if matches!(op, Op::WriteAsync { .. }) {
                pollster::block_on(l.buffer.copy_from(&src, offset))
            } else {
                l.buffer.copy_from_blocking(&src, offset)
            };
            let fits = offset.checked_add(src.len()).is_some_and(|end| end <= l.expected.len());
            prop_assert_eq!(result.is_ok(), fits, "write {}+{} into {}", offset, src.len(), l.expected.len());
            if fits {
                l.expected[offset..offset + src.len()].copy_from_slice(&src);
            }
            clear(result)?;
        }
        Op::Read { index, offset, len } | Op::ReadAsync { index, offset, len } => {
            let Some(l) = pick(live, index) else { return Ok(()) };
            let mut dst = vec![7; len.min(1 << 16)];
            let result = if matches!(op, Op::ReadAsync { .. }) {
                pollster::block_on(l.buffer.copy_to(&mut dst, offset))
            } else {
                l.buffer.copy_to_blocking(&mut dst, offset)
            };
            match &result {
                Ok(()) => prop_assert_eq!(&dst[..], &l.expected[offset..offset + dst.len()]),
                Err(_) => prop_assert!(dst.iter().all(|&x| x == 7), "a failed read wrote its destination"),
            }
            clear(result)?;
        }
        Op::View { index, start, end } => {
            let Some(l) = pick(live, index) else { return Ok(()) };
            match l.buffer.slice(start..end) {
                Ok(view) => {
                    prop_assert_eq!(view.len(), end - start);
                    let mut dst = vec![0; view.len()];
                    clear(view.copy_to_blocking(&mut dst, 0))?;
                    prop_assert_eq!(&dst[..], &l.expected[start..end]);
                }
                Err(e) => clear(Err(e))?,
            }
        }
        Op::Map { index, mode, write } => {
            let Some(l) = pick(live, index) else { return Ok(()) };
            let mode = [MapMode::Read, MapMode::Write, MapMode::ReadWrite][mode as usize];
            match l.buffer.map(mode) {
                Ok(mut mapping) => {
                    if mode != MapMode::Write {
                        prop_assert_eq!(&mapping[..], &l.expected[..]);
                    }
                    if write {
                        let fresh = pattern(step, mapping.len());
                        mapping.copy_from_slice(&fresh);
                        l.expected = fresh;
                    }
                }
                Err(e) => clear(Err(e))?,
            }
        }
        Op::HostWrite { index, at } => {
            let Some(l) = pick(live, index) else { return Ok(()) };
            match l.buffer.as_mut_slice() {
                Ok(slice) => {
                    if let Some(x) = slice.get_mut(at) {
                        *x = step as u32;
                        l.expected[at] = step as u32;
                    }
                }
                Err(e) => clear(Err(e))?,
            }
        }
        Op::CopyBuffer { from, to } => {
            let n = live.len();
            if n < 2 || from % n == to % n {
                return Ok(());
            }
            let (from, to) = (from % n, to % n);
            let (src, dst) = if from < to {
                let (a, b) = live.split_at_mut(to);
                (&a[from], &mut b[0])
            } else {
                let (a, b) = live.split_at_mut(from);
                (&b[0], &mut a[to])
            };
            let result = dst.buffer.copy_from_buffer(&src.buffer);
            prop_assert_eq!(result.is_ok(), src.expected.len() == dst.expected.len(), "{:?}", result);
            if result.is_ok() {
                dst.expected.clone_from(&src.expected);
            }
            clear(result)?;
        }
        Op::Trim => drop(manager.trim()),
        Op::TrimTo { keep } => drop(manager.trim_to(keep)),
        Op::Statistics => {
            let stats = manager.statistics();
            prop_assert!(!stats.to_string().is_empty());
            prop_assert_eq!(stats.active_buffers, live.len() as u64);
        }
    }
    Ok(())
}

fn run(manager: &MemoryManager, devices: &[DeviceId], ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut live = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        apply(manager, devices, &mut live, op, step)?;
    }
    // Everything written survived whatever else happened.
    for l in &live {
        let mut back = vec![0; l.expected.len()];
        clear(l.buffer.copy_to_blocking(&mut back, 0))?;
        prop_assert_eq!(back, l.expected.clone());
    }
    drop(live);
    let stats = manager.statistics();
    prop_assert_eq!((stats.active_buffers, stats.total_allocated, stats.requested_bytes), (0, 0, 0));
    prop_assert_eq!(stats.total_reserved, stats.total_pooled + stats.pending_free, "{:?}", stats);
    Ok(())
}

fn devices(manager: &MemoryManager) -> Vec<DeviceId> {
    let mut devices = vec![DeviceId::CPU];
    devices.extend(manager.devices().iter().filter(|d| d.kind == DeviceKind::OpenCl).map(|d| d.id).take(1));
    devices
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_api_calls_return_ok_or_a_clear_error(ops in prop::collection::vec(op(), 1..60)) {
        // Small pool bounds, so that overflow and eviction paths run too.
        let options = unimem::MemoryOptions::default().with_max_pool_bytes_per_class(1 << 16).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let devices = devices(&manager);
        run(&manager, &devices, ops)?;
    }
}
