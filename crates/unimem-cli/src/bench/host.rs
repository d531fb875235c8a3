//! Host rows of table 1 that the criterion pool bench has too: the pool hit on two threads
//! at once (one size class, each thread allocating and returning its own buffers), and a
//! warm allocate + write every byte + drop (the pool serving from its cache, against the
//! host allocators reusing what they just freed). The baselines call the host allocators
//! directly, as unimem's side calls the pool.

use std::hint::black_box;

use unimem::{AllocationMode, DeviceId, MemoryManager};

use super::measure::{Figure, Sampling};
use super::raw::{HostAllocator, Malloc, Mimalloc, RawAllocator as _, host_pairs, null};
use super::report::Row;

/// The harness of the criterion benches' two-thread group, so that both measure alike.
#[path = "../../../unimem/benches/support/two_threads.rs"]
mod harness;

/// Size of the two-thread row's buffers (the criterion group's).
const TWO_THREADS_BYTES: usize = 4 << 10;

/// Allocations per thread in one sample of the two-thread row.
const TWO_THREADS_OPS: u64 = 500_000;

/// Times `op` on two threads at once, per operation per thread (the slower thread's time).
/// The threads start untimed, so each sample's new threads make their caches then.
fn two_threads<E: Send>(sampling: &Sampling, op: impl Fn() -> Result<(), E> + Sync) -> Result<Figure, E> {
    sampling.per_run(|| {
        let failed = std::sync::Mutex::new(None);
        let elapsed = harness::two_threads(TWO_THREADS_OPS, || {
            if let Err(e) = op() {
                failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
            }
        });
        match failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok((elapsed, TWO_THREADS_OPS)),
        }
    })
}

/// A host allocator's side of the two-thread row.
fn raw_two_threads<H: HostAllocator>(host: &H, sampling: &Sampling) -> anyhow::Result<Figure> {
    let bytes = TWO_THREADS_BYTES;
    two_threads(sampling, || {
        let ptr = black_box(host.alloc_raw(bytes));
        if ptr.is_null() {
            return Err(null(host, bytes));
        }
        // SAFETY: from `alloc_raw(bytes)` just above, not null, freed once.
        unsafe { host.free_raw(ptr, bytes) };
        Ok(())
    })
}

/// The rows, for the host device `device` of `manager`: the warm rows at 1 MiB and at
/// `large` bytes.
pub fn rows(
    manager: &MemoryManager,
    device: DeviceId,
    sampling: &Sampling,
    quick: bool,
    emit: &mut dyn FnMut(Row),
) {
    let bytes = TWO_THREADS_BYTES;
    let unimem = two_threads(sampling, || {
        manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled).map(|buffer| drop(black_box(buffer)))
    });
    emit(Row::compared(
        device,
        "two threads, one class (allocate + return, per thread)",
        bytes as u64,
        unimem,
        || {
            vec![
                (Malloc.name().to_string(), raw_two_threads(&Malloc, sampling)),
                (Mimalloc.name().to_string(), raw_two_threads(&Mimalloc, sampling)),
            ]
        },
    ));
    manager.trim();

    let large = if quick { 16 << 20 } else { 64 << 20 };
    for bytes in [1 << 20, large] {
        let allocate_write_drop = || -> unimem::Result<()> {
            let mut buffer = manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled)?;
            buffer.as_mut_slice()?.fill(1);
            drop(black_box(buffer));
            Ok(())
        };
        // The first allocation fills the pool's cache; every timed one is a hit.
        let unimem = allocate_write_drop().and_then(|()| {
            let mut failed = None;
            let figure = sampling.per_op(|| {
                if let Err(e) = allocate_write_drop() {
                    failed = Some(e);
                }
            });
            failed.map_or(Ok(figure), Err)
        });
        emit(Row::compared(device, "warm allocate + write every byte + drop", bytes as u64, unimem, || {
            vec![
                (Malloc.name().to_string(), host_pairs(&Malloc, sampling, bytes, true)),
                (Mimalloc.name().to_string(), host_pairs(&Mimalloc, sampling, bytes, true)),
            ]
        }));
        manager.trim();
    }
}
