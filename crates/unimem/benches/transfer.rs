//! The transfer engine against the copies a user would otherwise make, in one run:
//!
//! - `cpu_copy`: large CPU to CPU copies, the engine's multi-core memcpy vs one
//!   `copy_from_slice`;
//! - `h2d` / `d2h` on every OpenCL device found (build with `--features opencl`): from
//!   pageable host memory through the pinned pipeline, vs the naive staged copy (the whole
//!   range through one host buffer), vs from the device's own pinned memory (one DMA), vs a
//!   plain host memcpy of the same bytes (the physical limit on this machine, where device
//!   memory is host memory);
//! - `batch`: 32 transfers of 1 MiB, host to device, at concurrency 1, 2, 4, 8.
//!
//! Every buffer is allocated and written once before timing: first touch is excluded on
//! every side.
//!
//! `cargo bench -p unimem --features opencl --bench transfer`

#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use unimem::transfer::{Strategy, TransferOptions};
use unimem::{AllocationMode, DeviceId, DeviceKind, MemoryManager, MemoryOptions};

fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 { format!("{}MiB", bytes >> 20) } else { format!("{}KiB", bytes >> 10) }
}

fn filled(
    manager: &MemoryManager,
    device: DeviceId,
    bytes: usize,
    mode: AllocationMode,
) -> unimem::Buffer<u8> {
    let mut buffer = manager.allocate_on::<u8>(device, bytes, mode).expect("allocate");
    buffer.fill(0x5a).expect("fill");
    if device == DeviceId::CPU || mode != AllocationMode::Pooled {
        buffer.as_mut_slice().expect("host").iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    }
    buffer
}

fn cpu_copy(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let mut group = c.benchmark_group("cpu_copy");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for bytes in [16 << 20, 64 << 20, 256 << 20] {
        group.throughput(Throughput::Bytes(bytes as u64));
        let src = filled(&manager, DeviceId::CPU, bytes, AllocationMode::Pooled);
        let mut dst = filled(&manager, DeviceId::CPU, bytes, AllocationMode::Pooled);
        group.bench_function(BenchmarkId::new("unimem_transfer", label(bytes)), |b| {
            b.iter(|| manager.transfer_blocking(&src, &mut dst).expect("transfer"))
        });
        let (s, d) = (src.as_slice().expect("host"), dst.as_mut_slice().expect("host"));
        group.bench_function(BenchmarkId::new("memcpy_one_thread", label(bytes)), |b| {
            b.iter(|| d.copy_from_slice(black_box(s)))
        });
    }
    group.finish();
}

fn opencl_devices(manager: &MemoryManager) -> Vec<DeviceId> {
    let devices: Vec<DeviceId> = manager.devices_of(DeviceKind::OpenCl).iter().map(|d| d.id).collect();
    if devices.is_empty() {
        eprintln!(
            "no OpenCL device (built without --features opencl, or none found): host/device groups skipped"
        );
    }
    devices
}

const SIZES: [usize; 5] = [64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];

fn host_device(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let staged = TransferOptions::default().with_strategy(Strategy::Staged);
    for gpu in opencl_devices(&manager) {
        for upload in [true, false] {
            let name = if upload { "h2d" } else { "d2h" };
            let mut group = c.benchmark_group(format!("{name}_{gpu}").replace(' ', ""));
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(3))
                .warm_up_time(Duration::from_millis(500));
            for bytes in SIZES {
                group.throughput(Throughput::Bytes(bytes as u64));
                let mut host = filled(&manager, DeviceId::CPU, bytes, AllocationMode::Pooled);
                let mut device = filled(&manager, gpu, bytes, AllocationMode::Pooled);
                let mut pinned = filled(&manager, gpu, bytes, AllocationMode::Pinned);
                let id = |what: &str| BenchmarkId::new(what, label(bytes));
                if upload {
                    group.bench_function(id("unimem_pipeline"), |b| {
                        b.iter(|| manager.transfer_blocking(&host, &mut device).expect("transfer"))
                    });
                    group.bench_function(id("naive_staged"), |b| {
                        b.iter(|| {
                            manager
                                .transfer_with_blocking(&host, &mut device, staged.clone())
                                .expect("staged")
                        })
                    });
                    group.bench_function(id("from_pinned_source"), |b| {
                        b.iter(|| manager.transfer_blocking(&pinned, &mut device).expect("pinned"))
                    });
                } else {
                    group.bench_function(id("unimem_pipeline"), |b| {
                        b.iter(|| manager.transfer_blocking(&device, &mut host).expect("transfer"))
                    });
                    group.bench_function(id("naive_staged"), |b| {
                        b.iter(|| {
                            manager
                                .transfer_with_blocking(&device, &mut host, staged.clone())
                                .expect("staged")
                        })
                    });
                    group.bench_function(id("to_pinned_destination"), |b| {
                        b.iter(|| manager.transfer_blocking(&device, &mut pinned).expect("pinned"))
                    });
                }
                let other = filled(&manager, DeviceId::CPU, bytes, AllocationMode::Pooled);
                let (s, d) = (other.as_slice().expect("host"), host.as_mut_slice().expect("host"));
                group.bench_function(id("memcpy_limit"), |b| b.iter(|| d.copy_from_slice(black_box(s))));
            }
            group.finish();
        }
    }
}

fn batch(c: &mut Criterion) {
    let probe = MemoryManager::new();
    let Some(&gpu) = opencl_devices(&probe).first() else { return };
    drop(probe);
    let mut group = c.benchmark_group("batch_32x1MiB_h2d");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Bytes(32 << 20));
    for bound in [1, 2, 4, 8] {
        let options = MemoryOptions::default().with_max_concurrent_transfers(bound).expect("bound");
        let manager = MemoryManager::builder().options(options).build();
        let sources: Vec<_> =
            (0..32).map(|_| filled(&manager, DeviceId::CPU, 1 << 20, AllocationMode::Pooled)).collect();
        let mut targets: Vec<_> =
            (0..32).map(|_| filled(&manager, gpu, 1 << 20, AllocationMode::Pooled)).collect();
        group.bench_function(BenchmarkId::new("concurrency", bound), |b| {
            b.iter(|| {
                let reports = manager.transfer_batch_blocking(sources.iter().zip(targets.iter_mut()));
                assert!(reports.iter().all(Result::is_ok));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cpu_copy, host_device, batch);
criterion_main!(benches);
