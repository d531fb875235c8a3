//! CUDA memory on the first CUDA device, each unimem path beside the driver call it claims
//! to match or beat, in one run:
//! - allocation: a pool hit (allocate + drop) vs `cuMemAlloc`/`cuMemFree` vs
//!   `cuMemAllocAsync`/`cuMemFreeAsync`, 1 KiB..1 GiB;
//! - host <-> device bandwidth: from/to a unimem pinned buffer and a pageable `Vec`, vs the
//!   driver's own `cuMemcpyHtoD`/`cuMemcpyDtoH` from/to `cuMemHostAlloc` memory and the same
//!   `Vec`, 4 KiB..1 GiB;
//! - device-to-device: `copy_from_buffer` vs `cuMemcpyDtoD`.
//!
//! Without a CUDA device it prints why and measures nothing.
//!
//! Run: `cargo bench -p unimem --features cuda --bench cuda_memory`

#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use unimem::cudarc::driver::{result, sys};
use unimem::{AllocationMode, CudaBackend, DeviceId, DeviceKind, MapMode, MemoryManager};

const ALLOCATION_SIZES: [usize; 6] = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30];
const TRANSFER_SIZES: [usize; 6] = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30];

fn label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 => format!("{}MiB", b >> 20),
        b => format!("{}KiB", b >> 10),
    }
}

fn new_group<'a>(c: &'a mut Criterion, name: &str, bytes: usize) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    let large = bytes >= 256 << 20;
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if large { 500 } else { 200 }))
        .measurement_time(Duration::from_secs(if large { 3 } else { 1 }));
    group
}

fn allocation(c: &mut Criterion, manager: &MemoryManager, device: DeviceId, cuda: &CudaBackend) {
    for bytes in ALLOCATION_SIZES {
        let mut group = new_group(c, "cuda_allocate", bytes);
        // Warm the pool's class, then every iteration is a hit.
        drop(manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled).expect("allocation"));
        group.bench_function(BenchmarkId::new("unimem_pool_hit", label(bytes)), |b| {
            b.iter(|| drop(black_box(manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled))))
        });
        // SAFETY: the device's context, current on this thread for the driver calls below.
        unsafe { result::ctx::set_current(cuda.context().cu_ctx()) }.expect("context");
        group.bench_function(BenchmarkId::new("cuMemAlloc_cuMemFree", label(bytes)), |b| {
            b.iter(|| {
                // SAFETY: a plain allocation, freed at once.
                unsafe {
                    let ptr = result::malloc_sync(bytes).expect("cuMemAlloc");
                    result::free_sync(black_box(ptr)).expect("cuMemFree");
                }
            })
        });
        group.bench_function(BenchmarkId::new("cuMemAllocAsync_cuMemFreeAsync", label(bytes)), |b| {
            b.iter(|| {
                // SAFETY: a stream-ordered allocation on unimem's stream, freed at once.
                unsafe {
                    let ptr =
                        result::malloc_async(cuda.stream().cu_stream(), bytes).expect("cuMemAllocAsync");
                    result::free_async(black_box(ptr), cuda.stream().cu_stream()).expect("cuMemFreeAsync");
                }
            })
        });
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(cuda.stream().cu_stream()) }.expect("sync");
        group.finish();
    }
}

/// Page-locked memory from the driver itself, the baseline for pinned transfers.
struct DriverPinned(*mut std::ffi::c_void);

impl DriverPinned {
    fn new(bytes: usize) -> Self {
        // SAFETY: a plain page-locked allocation (the context is current).
        DriverPinned(unsafe { result::malloc_host(bytes, 0) }.expect("cuMemHostAlloc"))
    }
}

impl Drop for DriverPinned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`; no copy uses it any more (every copy is synchronous).
        let _ = unsafe { result::free_host(self.0) };
    }
}

fn transfers(c: &mut Criterion, manager: &MemoryManager, device: DeviceId, cuda: &CudaBackend) {
    for bytes in TRANSFER_SIZES {
        let mut target = manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled).expect("device");
        let mut pinned = manager.allocate_on::<u8>(device, bytes, AllocationMode::Pinned).expect("pinned");
        pinned.as_mut_slice().expect("host").fill(1);
        let mut pageable = vec![1u8; bytes];
        // SAFETY: the device's context, current on this thread.
        unsafe { result::ctx::set_current(cuda.context().cu_ctx()) }.expect("context");
        let driver_pinned = DriverPinned::new(bytes);
        let dptr = target.cuda_ptr(cuda.stream(), MapMode::ReadWrite).expect("pointer").ptr();

        let mut group = new_group(c, "cuda_h2d", bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("unimem_pinned", label(bytes)), |b| {
            b.iter(|| target.copy_from_blocking(pinned.as_slice().expect("host"), 0).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("cuMemcpyHtoD_pinned", label(bytes)), |b| {
            // SAFETY: `bytes` of page-locked memory into `bytes` of device memory, synchronous.
            b.iter(|| unsafe { sys::cuMemcpyHtoD_v2(dptr, driver_pinned.0, bytes) }.result().expect("copy"))
        });
        group.bench_function(BenchmarkId::new("unimem_pageable", label(bytes)), |b| {
            b.iter(|| target.copy_from_blocking(black_box(&pageable), 0).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("cuMemcpyHtoD_pageable", label(bytes)), |b| {
            // SAFETY: as above, from the pageable vector.
            b.iter(|| unsafe { result::memcpy_htod_sync(dptr, black_box(&pageable)) }.expect("copy"))
        });
        group.finish();

        let mut group = new_group(c, "cuda_d2h", bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("unimem_pinned", label(bytes)), |b| {
            b.iter(|| target.copy_to_blocking(pinned.as_mut_slice().expect("host"), 0).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("cuMemcpyDtoH_pinned", label(bytes)), |b| {
            // SAFETY: `bytes` of device memory into `bytes` of page-locked memory, synchronous.
            b.iter(|| unsafe { sys::cuMemcpyDtoH_v2(driver_pinned.0, dptr, bytes) }.result().expect("copy"))
        });
        group.bench_function(BenchmarkId::new("unimem_pageable", label(bytes)), |b| {
            b.iter(|| target.copy_to_blocking(black_box(&mut pageable), 0).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("cuMemcpyDtoH_pageable", label(bytes)), |b| {
            // SAFETY: as above, into the pageable vector.
            b.iter(|| unsafe { result::memcpy_dtoh_sync(black_box(&mut pageable), dptr) }.expect("copy"))
        });
        group.finish();

        let mut source = manager.allocate_on::<u8>(device, bytes, AllocationMode::Pooled).expect("device");
        let sptr = source.cuda_ptr(cuda.stream(), MapMode::Read).expect("pointer").ptr();
        let mut group = new_group(c, "cuda_d2d", bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("unimem_copy_from_buffer", label(bytes)), |b| {
            b.iter(|| target.copy_from_buffer(&source).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("cuMemcpyDtoD", label(bytes)), |b| {
            // SAFETY: two device allocations of `bytes`, disjoint, synchronous.
            b.iter(|| unsafe { result::memcpy_dtod_sync(dptr, sptr, bytes) }.expect("copy"))
        });
        group.finish();
    }
}

fn main() {
    let manager = MemoryManager::new();
    let Some(device) = manager.devices().into_iter().find(|d| d.kind == DeviceKind::Cuda) else {
        eprintln!("skipping: no CUDA device ({})", manager.backend_notes().join("; "));
        return;
    };
    let cuda = manager.cuda_device(device.id).expect("a CUDA device");
    eprintln!("CUDA device: {}", device.name);
    let mut c = Criterion::default().configure_from_args();
    allocation(&mut c, &manager, device.id, cuda);
    transfers(&mut c, &manager, device.id, cuda);
    c.final_summary();
}
