//! Table 1, allocation: unimem's pool hit, fresh allocations (with the first write of every
//! page, and the allocation call alone), pinned allocation and disposal, against the
//! backend's raw allocator and what a user would pick instead.
//!
//! Fresh memory from unimem is zeroed: on the host lazily (fresh pages read as zero and
//! are written on first touch), on devices by a fill at allocation. So "fresh + first
//! write" times, on every side, the allocation and one write of every page: unimem's host
//! rows touch every page after allocating, device rows count unimem's own fill, and the
//! baselines touch or fill what they allocate. "Allocation call alone" times the calls
//! only; on devices unimem's includes its fill, which the raw call does not do. (wgpu
//! devices queue the fill without waiting, as they have one queue: a sample waits for the
//! device once after its allocations.)

use std::hint::black_box;
use std::time::Instant;

use unimem::{AllocationMode, DeviceInfo, DeviceKind, MemoryManager};

use super::measure::{Figure, Sampling};
use super::raw::{self, PAGE, RawAllocator};
use super::report::{Row, Table};

/// Fresh allocations held at once per sample, by size.
fn batch(bytes: usize) -> usize {
    if bytes >= 16 << 20 { 2 } else { 16 }
}

/// Times `batch` fresh unimem allocations (every one a pool miss: the pool is trimmed
/// before each sample, untimed), with the first write of every host page if `touch`.
fn unimem_fresh(
    manager: &MemoryManager,
    device: &DeviceInfo,
    sampling: &Sampling,
    bytes: usize,
    mode: AllocationMode,
    touch: bool,
    count: usize,
) -> unimem::Result<Figure> {
    let figure = sampling.per_run(|| {
        manager.trim();
        let start = Instant::now();
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            let mut buffer = manager.allocate_on::<u8>(device.id, bytes, mode)?;
            if touch {
                let slice = buffer.as_mut_slice()?;
                for offset in (0..bytes).step_by(PAGE) {
                    slice[offset] = 1;
                }
            }
            held.push(buffer);
        }
        settle(manager, device)?;
        let elapsed = start.elapsed();
        drop(black_box(held));
        Ok((elapsed, count as u64))
    });
    // What the pool kept goes back now: the baseline's pinned memory counts against the
    // same lock limit.
    manager.trim();
    figure
}

/// Waits for the fills that a device queued at allocation without waiting (wgpu's one
/// queue: its allocations wait for nothing), so that they count as the raw side's do.
fn settle(manager: &MemoryManager, device: &DeviceInfo) -> unimem::Result<()> {
    #[cfg(feature = "wgpu")]
    if device.kind == DeviceKind::Wgpu {
        let gpu = manager.wgpu_device(device.id)?;
        let _ = gpu.device().poll(unimem::wgpu::PollType::wait_indefinitely());
    }
    let _ = (manager, device);
    Ok(())
}

/// The same with a raw allocator (freed untimed).
fn raw_fresh(
    raw: &dyn RawAllocator,
    sampling: &Sampling,
    bytes: usize,
    touch: bool,
    count: usize,
) -> anyhow::Result<Figure> {
    sampling.per_run(|| {
        raw.release_cached();
        let mut held = Vec::with_capacity(count);
        let start = Instant::now();
        let outcome = (0..count).try_for_each(|_| {
            let block = raw.allocate(bytes)?;
            held.push(block);
            if touch { raw.first_write(block) } else { Ok(()) }
        });
        let elapsed = start.elapsed();
        for block in held {
            raw.free(block);
        }
        outcome.map(|()| (elapsed, count as u64))
    })
}

/// The baselines' figures for one row, each named; a baseline that fails is left out and
/// said why in `notes`.
fn baselines(
    raws: &[Box<dyn RawAllocator>],
    notes: &mut Vec<String>,
    mut measure: impl FnMut(&dyn RawAllocator) -> anyhow::Result<Figure>,
) -> Vec<(String, Figure)> {
    raws.iter()
        .filter_map(|raw| match measure(raw.as_ref()) {
            Ok(figure) => Some((raw.name().to_string(), figure)),
            Err(e) => {
                notes.push(format!("{}: {e:#}", raw.name()));
                None
            }
        })
        .collect()
}

/// The hint for a failed pinned allocation.
pub fn pinned_hint(error: &str) -> Option<String> {
    (error.contains("lock") || error.contains("RLIMIT_MEMLOCK")).then(|| {
        "pinned memory counts against the lock limit (`ulimit -l`): raise it (memlock in \
         /etc/security/limits.conf, or LimitMEMLOCK for a service) to measure this row"
            .to_string()
    })
}

/// Every row of table 1 for `device`.
pub fn rows(
    manager: &MemoryManager,
    device: &DeviceInfo,
    sampling: &Sampling,
    quick: bool,
    step: &mut dyn FnMut(&str),
    emit: &mut dyn FnMut(Row),
) {
    let id = device.id;
    let host = device.kind == DeviceKind::Cpu;
    let raws = match raw::for_device(manager, id) {
        Ok(raws) => raws,
        Err(e) => {
            emit(Row::skipped(
                Table::Allocation,
                id,
                "every row",
                0,
                format!("no raw allocator: {e:#}"),
                None,
            ));
            return;
        }
    };
    let mut notes = Vec::new();
    let mut finish = |mut row: Row, notes: &mut Vec<String>| {
        if !notes.is_empty() && row.skipped.is_none() {
            row.operation = format!("{} (baselines not run: {})", row.operation, notes.join("; "));
        }
        notes.clear();
        emit(row);
    };

    // Pool hit: allocate and return a block of a class the pool holds.
    step("pool hit");
    let hit_bytes = 1024;
    let hit = manager.allocate_on::<u8>(id, hit_bytes, AllocationMode::Pooled).and_then(|warm| {
        drop(warm);
        let mut failed = None;
        let figure =
            sampling.per_op(|| match manager.allocate_on::<u8>(id, hit_bytes, AllocationMode::Pooled) {
                // The buffer goes through `black_box`, as the baselines' pointers do.
                Ok(buffer) => drop(black_box(buffer)),
                Err(e) => failed = Some(e),
            });
        failed.map_or(Ok(figure), Err)
    });
    match hit {
        Ok(unimem) => {
            let mut base = baselines(&raws, &mut notes, |raw| raw.time_pairs(sampling, hit_bytes));
            if host {
                // The same alignment as unimem's blocks, beside the allocators' default.
                let aligned = raw::MimallocAligned;
                base.extend(baselines(&[Box::new(aligned)], &mut notes, |raw| {
                    raw.time_pairs(sampling, hit_bytes)
                }));
            }
            let row = Row::measured(
                Table::Allocation,
                id,
                "pool hit (allocate + return)",
                hit_bytes as u64,
                unimem,
                base,
            );
            finish(row, &mut notes);
        }
        Err(e) => finish(
            Row::skipped(
                Table::Allocation,
                id,
                "pool hit (allocate + return)",
                hit_bytes as u64,
                e.to_string(),
                None,
            ),
            &mut notes,
        ),
    }

    // Fresh allocations, small and large.
    let large = if quick { 16 << 20 } else { 64 << 20 };
    for bytes in [256 << 10, large] {
        let count = batch(bytes);
        for (touch, label) in [(true, "fresh + first write"), (false, "fresh, allocation call alone")] {
            step(label);
            // Device memory is zeroed by unimem at allocation: that fill is its first write.
            match unimem_fresh(manager, device, sampling, bytes, AllocationMode::Pooled, touch && host, count)
            {
                Ok(unimem) => {
                    let base =
                        baselines(&raws, &mut notes, |raw| raw_fresh(raw, sampling, bytes, touch, count));
                    finish(
                        Row::measured(Table::Allocation, id, label, bytes as u64, unimem, base),
                        &mut notes,
                    );
                }
                Err(e) => finish(
                    Row::skipped(Table::Allocation, id, label, bytes as u64, e.to_string(), None),
                    &mut notes,
                ),
            }
        }
    }

    // Pinned allocation: four 1 MiB blocks at a time, within the default 8 MiB lock limit
    // of unprivileged users.
    step("pinned allocation");
    let label = if host { "pinned allocation (mlock)" } else { "pinned allocation" };
    let pinned_bytes = 1 << 20;
    if device.supports_pinned {
        match unimem_fresh(manager, device, sampling, pinned_bytes, AllocationMode::Pinned, false, 4) {
            Ok(unimem) => {
                let pinned_raw: Vec<Box<dyn RawAllocator>> =
                    raw::pinned_for_device(manager, id).ok().flatten().into_iter().collect();
                let base =
                    baselines(&pinned_raw, &mut notes, |raw| raw_fresh(raw, sampling, pinned_bytes, true, 4));
                finish(
                    Row::measured(Table::Allocation, id, label, pinned_bytes as u64, unimem, base),
                    &mut notes,
                );
            }
            Err(e) => {
                let reason = e.to_string();
                let hint = pinned_hint(&reason);
                finish(
                    Row::skipped(Table::Allocation, id, label, pinned_bytes as u64, reason, hint),
                    &mut notes,
                );
            }
        }
    } else {
        finish(
            Row::skipped(
                Table::Allocation,
                id,
                label,
                pinned_bytes as u64,
                "the device has no pinned memory",
                None,
            ),
            &mut notes,
        );
    }

    // Disposal: returning buffers to the pool, against freeing them.
    step("disposal");
    let (bytes, count) = (4096, 256);
    let disposal = sampling.per_run(|| {
        let held = (0..count)
            .map(|_| manager.allocate_on::<u8>(id, bytes, AllocationMode::Pooled))
            .collect::<unimem::Result<Vec<_>>>()?;
        let start = Instant::now();
        drop(held);
        Ok::<_, unimem::Error>((start.elapsed(), count as u64))
    });
    match disposal {
        Ok(unimem) => {
            let base = baselines(&raws, &mut notes, |raw| raw.time_frees(sampling, bytes, count));
            finish(
                Row::measured(Table::Allocation, id, "disposal (return to pool)", bytes as u64, unimem, base),
                &mut notes,
            );
        }
        Err(e) => finish(
            Row::skipped(
                Table::Allocation,
                id,
                "disposal (return to pool)",
                bytes as u64,
                e.to_string(),
                None,
            ),
            &mut notes,
        ),
    }
}
