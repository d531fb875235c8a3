//! `cargo bench -p unimem --bench pool`: the size-class pool against the system allocator
//! and mimalloc, in one run.
//!
//! - `hit_return`: allocate + drop of a pooled 1 KiB buffer (the hit path, nothing written).
//! - `alloc_write_drop/<size>`: allocate a buffer, write every byte once, drop it: the pool
//!   against `malloc` and mimalloc doing the same (64-byte aligned, like the pool).
//! - `two_threads_one_class`: two threads allocating and dropping 4 KiB buffers of the same
//!   class at once; the figure is the time per operation per thread.
//! - `pipeline/<size>` (4 KiB, 1 MiB, 256 MiB): one thread allocates, another drops (4 in
//!   flight), nothing written:
//!   the pool against mimalloc's and glibc's cross-thread free. The pool's hit rate over
//!   the whole group is printed after it.

#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

#[path = "support/pipeline.rs"]
mod pipeline;
#[path = "support/two_threads.rs"]
mod support;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Duration;
use support::two_threads;
use unimem::{AllocationMode, MemoryManager};

const SIZES: [(usize, &str); 4] =
    [(1 << 10, "1KiB"), (1 << 20, "1MiB"), (64 << 20, "64MiB"), (256 << 20, "256MiB")];

fn hit_return(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let mut group = c.benchmark_group("hit_return");
    group.bench_function("unimem_pool_1KiB", |b| {
        b.iter(|| drop(black_box(manager.allocate::<u8>(black_box(1024), AllocationMode::Pooled).unwrap())))
    });
    group.bench_function("system_malloc_1KiB", |b| b.iter(|| alloc_free(&System, black_box(1024), false)));
    group.bench_function("mimalloc_1KiB", |b| b.iter(|| alloc_free(&MiMalloc, black_box(1024), false)));
    group.finish();
}

/// Allocates `bytes` from `allocator`, optionally writes every byte, frees.
fn alloc_free<A: GlobalAlloc>(allocator: &A, bytes: usize, write: bool) {
    let layout = Layout::from_size_align(bytes, 64).unwrap();
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { allocator.alloc(layout) };
    assert!(!ptr.is_null());
    if write {
        // SAFETY: `ptr` is a fresh allocation of `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr, 1, bytes) };
    }
    black_box(ptr);
    // SAFETY: `ptr` came from this allocator with this layout.
    unsafe { allocator.dealloc(ptr, layout) };
}

fn alloc_write_drop(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let mut group = c.benchmark_group("alloc_write_drop");
    for (bytes, name) in SIZES {
        group.throughput(Throughput::Bytes(bytes as u64));
        if bytes >= 64 << 20 {
            group.sample_size(20).measurement_time(Duration::from_secs(4));
        }
        group.bench_with_input(BenchmarkId::new("unimem_pool", name), &bytes, |b, &bytes| {
            b.iter(|| {
                let mut buffer = manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap();
                buffer.as_mut_slice().unwrap().fill(1);
                black_box(buffer);
            })
        });
        group.bench_with_input(BenchmarkId::new("system_malloc", name), &bytes, |b, &bytes| {
            b.iter(|| alloc_free(&System, bytes, true))
        });
        group.bench_with_input(BenchmarkId::new("mimalloc", name), &bytes, |b, &bytes| {
            b.iter(|| alloc_free(&MiMalloc, bytes, true))
        });
    }
    group.finish();
}

fn two_threads_one_class(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let mut group = c.benchmark_group("two_threads_one_class");
    group.bench_function("unimem_pool_4KiB", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                drop(black_box(manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap()))
            })
        })
    });
    let locked = std::sync::Mutex::new(Vec::<Box<[u8]>>::new());
    group.bench_function("mutex_vec_4KiB", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let block =
                    locked.lock().unwrap().pop().unwrap_or_else(|| vec![0u8; 4096].into_boxed_slice());
                black_box(&block);
                locked.lock().unwrap().push(block);
            })
        })
    });
    group.bench_function("system_malloc_4KiB", |b| {
        b.iter_custom(|iters| two_threads(iters, || alloc_free(&System, 4096, false)))
    });
    group.bench_function("mimalloc_4KiB", |b| {
        b.iter_custom(|iters| two_threads(iters, || alloc_free(&MiMalloc, 4096, false)))
    });
    group.finish();
}

/// A pointer handed to another thread to be freed there.
struct Raw(*mut u8);

// SAFETY: the pointer is owned memory, freed by exactly one thread (the consumer).
unsafe impl Send for Raw {}

fn raw_alloc<A: GlobalAlloc>(allocator: &A, bytes: usize) -> Raw {
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { allocator.alloc(Layout::from_size_align(bytes, 64).unwrap()) };
    assert!(!ptr.is_null());
    Raw(black_box(ptr))
}

fn raw_free<A: GlobalAlloc>(allocator: &A, raw: Raw, bytes: usize) {
    // SAFETY: `raw` came from `raw_alloc` on this allocator with this size.
    unsafe { allocator.dealloc(raw.0, Layout::from_size_align(bytes, 64).unwrap()) };
}

fn producer_consumer(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    for (bytes, name) in [(4 << 10, "4KiB"), SIZES[1], SIZES[3]] {
        if bytes >= 64 << 20 {
            group.sample_size(20);
        }
        let manager = MemoryManager::new();
        group.bench_with_input(BenchmarkId::new("unimem_pool", name), &bytes, |b, &bytes| {
            b.iter_custom(|iters| {
                pipeline::pipeline(
                    iters,
                    || manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap(),
                    drop,
                )
            })
        });
        let stats = manager.statistics();
        if stats.pool_hits + stats.pool_misses > 0 {
            eprintln!(
                "pipeline/unimem_pool/{name}: hit rate {:.2}% ({} hits, {} misses)",
                stats.hit_rate() * 100.0,
                stats.pool_hits,
                stats.pool_misses
            );
        }
        group.bench_with_input(BenchmarkId::new("mimalloc", name), &bytes, |b, &bytes| {
            b.iter_custom(|iters| {
                pipeline::pipeline(
                    iters,
                    || raw_alloc(&MiMalloc, bytes),
                    |raw| raw_free(&MiMalloc, raw, bytes),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("system_malloc", name), &bytes, |b, &bytes| {
            b.iter_custom(|iters| {
                pipeline::pipeline(iters, || raw_alloc(&System, bytes), |raw| raw_free(&System, raw, bytes))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = hit_return, alloc_write_drop, two_threads_one_class, producer_consumer
}
criterion_main!(benches);
