//! Property tests of the pool's invariants over random sequences of operations.

use proptest::prelude::*;
use unimem::{AllocationMode, Buffer, MemoryManager, MemoryOptions};

#[derive(Debug, Clone)]
enum Op {
    Allocate { len: usize, mode: u8 },
    Drop { index: usize },
    Trim,
    TrimTo { keep: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..300_000, 0u8..4).prop_map(|(len, mode)| Op::Allocate { len, mode }),
        4 => any::<usize>().prop_map(|index| Op::Drop { index }),
        1 => Just(Op::Trim),
        1 => (0u64..2_000_000).prop_map(|keep| Op::TrimTo { keep }),
    ]
}

fn mode(m: u8) -> AllocationMode {
    [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Unified, AllocationMode::Pooled]
        [m as usize]
}

fn check(manager: &MemoryManager, live: &[(Buffer<u8>, u8)]) -> Result<(), TestCaseError> {
    // Every live buffer still holds what was written to it: trim never freed or reissued it.
    for (buffer, tag) in live {
        prop_assert!(buffer.as_slice().unwrap().iter().all(|b| b == tag));
    }
    // No two live buffers overlap.
    let mut ranges: Vec<(usize, usize)> = live
        .iter()
        .filter(|(b, _)| b.capacity_in_bytes() > 0)
        .map(|(b, _)| {
            let start = b.as_slice().unwrap().as_ptr() as usize;
            (start, start + b.capacity_in_bytes())
        })
        .collect();
    ranges.sort();
    for pair in ranges.windows(2) {
        prop_assert!(pair[0].1 <= pair[1].0, "overlap: {:?}", pair);
    }
    let stats = manager.statistics();
    prop_assert_eq!(stats.total_allocated + stats.total_pooled, stats.total_reserved);
    prop_assert_eq!(stats.active_buffers, live.len() as u64);
    for pool in &stats.pools {
        for class in &pool.classes {
            prop_assert!(class.class_bytes * class.buffers <= 4 << 20, "per-class bound broken");
        }
        prop_assert!(pool.pooled <= 8 << 20, "total bound broken");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pool_invariants_hold(ops in proptest::collection::vec(op(), 1..80), divisions in 0u32..3) {
        let options = MemoryOptions::default()
            .with_max_pool_bytes_per_class(4 << 20).unwrap()
            .with_max_pool_bytes(8 << 20).unwrap()
            .with_size_class_divisions(1 << divisions).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let mut live: Vec<(Buffer<u8>, u8)> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Allocate { len, mode: m } => {
                    let mut buffer = manager.allocate::<u8>(len, mode(m)).unwrap();
                    prop_assert_eq!(buffer.len(), len);
                    prop_assert!(buffer.capacity_in_bytes() >= len);
                    let tag = i as u8;
                    buffer.as_mut_slice().unwrap().fill(tag);
                    live.push((buffer, tag));
                }
                Op::Drop { index } if !live.is_empty() => {
                    let n = live.len();
                    live.swap_remove(index % n);
                }
                Op::Drop { .. } => {}
                Op::Trim => {
                    manager.trim();
                    prop_assert_eq!(manager.statistics().total_pooled, 0);
                }
                Op::TrimTo { keep } => {
                    manager.trim_to(keep);
                    prop_assert!(manager.statistics().total_pooled <= keep);
                }
            }
            check(&manager, &live)?;
        }
    }
}
