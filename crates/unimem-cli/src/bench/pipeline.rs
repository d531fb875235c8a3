//! The pipeline rows of table 1, on the host: one thread allocates, another drops what it
//! allocated (a loader filling buffers that a compute thread consumes), with a few buffers
//! in flight. The baselines do the same with the host allocators and free on the other
//! thread (their cross-thread free). Each row names unimem's pool hit rate over its runs.

use std::hint::black_box;
use std::time::Duration;

use unimem::{AllocationMode, DeviceInfo, MemoryManager};

use super::measure::{Figure, Sampling};
use super::raw::{HostAllocator, Malloc, Mimalloc, RawAllocator as _, null};
use super::report::Row;

/// The harness of the criterion benches' pipeline groups, so that both measure alike.
#[path = "../../../unimem/benches/support/pipeline.rs"]
mod harness;

/// Items handed over per sample.
const ITEMS: u64 = 2000;

/// One sample: `ITEMS` items made here and consumed on another thread.
pub(super) fn run_once<T: Send>(
    make: impl FnMut() -> T,
    consume: impl Fn(T) + Send + Sync,
) -> (Duration, u64) {
    (harness::pipeline(ITEMS, make, consume), ITEMS)
}

/// A host allocator's block that may cross threads (both host allocators free from any
/// thread).
struct Sent(*mut u8);

// SAFETY: a block of `malloc` or mimalloc is plain memory that either may free from any
// thread.
unsafe impl Send for Sent {}

/// The raw side: `host` allocates here (called directly, as in the other host rows) and
/// frees on the other thread.
fn raw_pipeline<H: HostAllocator>(host: &H, sampling: &Sampling, bytes: usize) -> anyhow::Result<Figure> {
    sampling.per_run(|| {
        let mut failed = false;
        let make = || {
            let ptr = host.alloc_raw(bytes);
            failed |= ptr.is_null();
            Sent(ptr)
        };
        let result = run_once(make, |block: Sent| {
            let ptr = black_box(block).0;
            if !ptr.is_null() {
                // SAFETY: from `alloc_raw(bytes)` on the other thread, not null, freed once.
                unsafe { host.free_raw(ptr, bytes) };
            }
        });
        if failed { Err(null(host, bytes)) } else { Ok(result) }
    })
}

/// The pipeline rows for the host device (other devices have none yet: their raw
/// allocators are not shared between threads).
pub fn rows(
    manager: &MemoryManager,
    device: &DeviceInfo,
    sampling: &Sampling,
    quick: bool,
    emit: &mut dyn FnMut(Row),
) {
    let sizes: &[usize] = if quick { &[4 << 10, 1 << 20] } else { &[4 << 10, 1 << 20, 256 << 20] };
    for &bytes in sizes {
        let before = manager.statistics();
        let unimem = sampling.per_run(|| {
            // A failed allocation fails the row (it is skipped, with the error), rather than
            // timing the error path as a pipeline.
            let mut failed = None;
            let make = || match manager.allocate_on::<u8>(device.id, bytes, AllocationMode::Pooled) {
                Ok(buffer) => Some(buffer),
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            };
            let result = run_once(make, |buffer| drop(black_box(buffer)));
            failed.map_or(Ok(result), Err)
        });
        let after = manager.statistics();
        let hits = after.pool_hits - before.pool_hits;
        let allocations = hits + after.pool_misses - before.pool_misses;
        let operation = format!(
            "pipeline, dropped on another thread ({:.1}% hits)",
            100.0 * hits as f64 / allocations.max(1) as f64
        );
        let row = Row::compared(device.id, operation, bytes as u64, unimem, || {
            vec![
                (Malloc.name().to_string(), raw_pipeline(&Malloc, sampling, bytes)),
                (Mimalloc.name().to_string(), raw_pipeline(&Mimalloc, sampling, bytes)),
            ]
        });
        emit(row);
        manager.trim();
    }
}
