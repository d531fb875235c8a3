//! Host <-> device copy bandwidth on the first OpenCL device (PoCL in CI), in one run:
//! a device buffer (`clEnqueueWrite/ReadBuffer`), a pinned buffer (`CL_MEM_ALLOC_HOST_PTR`,
//! mapped: the host copies in place), and a plain `memcpy` of the same size as the floor.
//!
//! Run: `cargo bench -p unimem --features opencl --bench opencl_transfer`

#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use unimem::{AllocationMode, DeviceKind, MemoryManager};

const SIZES: [usize; 5] = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20];

fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 { format!("{}MiB", bytes >> 20) } else { format!("{}KiB", bytes >> 10) }
}

fn transfers(c: &mut Criterion) {
    let manager = MemoryManager::new();
    let Some(device) = manager.devices().into_iter().find(|d| d.kind == DeviceKind::OpenCl) else {
        eprintln!("no OpenCL device: {}", manager.backend_notes().join("; "));
        return;
    };
    for (direction, to_device) in [("h2d", true), ("d2h", false)] {
        let mut group = c.benchmark_group(format!("opencl_{direction}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for bytes in SIZES {
            group.throughput(Throughput::Bytes(bytes as u64));
            let mut host = vec![1u8; bytes];
            for (name, mode) in [("device", AllocationMode::Pooled), ("pinned", AllocationMode::Pinned)] {
                let mut buffer = manager.allocate_on::<u8>(device.id, bytes, mode).expect("allocation");
                group.bench_function(BenchmarkId::new(name, label(bytes)), |b| {
                    b.iter(|| {
                        if to_device {
                            buffer.copy_from_blocking(black_box(&host), 0).expect("copy");
                        } else {
                            buffer.copy_to_blocking(black_box(&mut host), 0).expect("copy");
                        }
                    })
                });
            }
            let mut other = vec![0u8; bytes];
            group.bench_function(BenchmarkId::new("memcpy", label(bytes)), |b| {
                b.iter(|| other.copy_from_slice(black_box(&host)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, transfers);
criterion_main!(benches);
