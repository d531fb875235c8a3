//! Table 2, transfer bandwidth: every path of a device through unimem's transfer engine,
//! with the strategy it chose, against the driver's own copy of the same bytes (or, on the
//! host, a one-thread memcpy: the limit of a plain copy). Every buffer on both sides is
//! allocated and written once before the timing (first touch excluded on both sides).

use unimem::transfer::{Strategy, TransferOptions};
use unimem::{AllocationMode, Buffer, DeviceId, DeviceInfo, DeviceKind, MemoryManager};

use super::measure::{Figure, Sampling};
use super::raw::{self, RawAllocator, RawBlock};
use super::report::{Row, Table};

/// Transfer sizes, 4 KiB to 256 MiB by fours; `--quick` takes two.
pub fn sizes(quick: bool) -> Vec<u64> {
    if quick { vec![64 << 10, 4 << 20] } else { (0..9).map(|i| 4096u64 << (2 * i)).collect() }
}

/// Times one path: unimem's transfer against the baseline (if any). A failure of unimem's
/// side skips the row with its reason.
fn measure(
    sampling: &Sampling,
    device: DeviceId,
    operation: &str,
    bytes: usize,
    mut unimem: impl FnMut() -> unimem::Result<Strategy>,
    baseline: Option<(&str, &mut dyn FnMut() -> anyhow::Result<()>)>,
) -> Row {
    let strategy = match unimem() {
        Ok(strategy) => strategy,
        Err(e) => return Row::skipped(Table::Transfer, device, operation, bytes as u64, e.to_string(), None),
    };
    let mut failed = None;
    let figure = sampling.per_op(|| {
        if let Err(e) = unimem() {
            failed.get_or_insert(e.to_string());
        }
    });
    if let Some(e) = failed {
        return Row::skipped(Table::Transfer, device, operation, bytes as u64, e, None);
    }
    let mut notes = Vec::new();
    let baselines: Vec<(String, Figure)> = baseline
        .and_then(|(name, copy)| {
            if let Err(e) = copy() {
                notes.push(format!("{name}: {e:#}"));
                return None;
            }
            let mut failed = None;
            let figure = sampling.per_op(|| {
                if let Err(e) = copy() {
                    failed.get_or_insert(e);
                }
            });
            match failed {
                Some(e) => {
                    notes.push(format!("{name}: {e:#}"));
                    None
                }
                None => Some((name.to_string(), figure)),
            }
        })
        .into_iter()
        .collect();
    let label = if notes.is_empty() {
        operation.to_string()
    } else {
        format!("{operation} (baseline not run: {})", notes.join("; "))
    };
    let mut row = Row::measured(Table::Transfer, device, label, bytes as u64, figure, baselines);
    row.strategy = Some(strategy.to_string());
    row
}

/// A buffer of `bytes` bytes on `device`, written once.
fn filled(
    manager: &MemoryManager,
    device: DeviceId,
    bytes: usize,
    mode: AllocationMode,
) -> unimem::Result<Buffer<u8>> {
    let mut buffer = manager.allocate_on::<u8>(device, bytes, mode)?;
    buffer.fill(0x5a)?;
    Ok(buffer)
}

/// A raw block of `bytes`, written once.
struct RawOwned<'a> {
    raw: &'a dyn RawAllocator,
    block: RawBlock,
}

impl<'a> RawOwned<'a> {
    fn new(raw: &'a dyn RawAllocator, bytes: usize) -> anyhow::Result<Self> {
        let block = raw.allocate(bytes)?;
        let owned = RawOwned { raw, block };
        raw.first_write(block)?;
        Ok(owned)
    }
}

impl Drop for RawOwned<'_> {
    fn drop(&mut self) {
        self.raw.free(self.block);
    }
}

/// Every row of table 2 for `device`; `peers` are the devices it has peer access to.
pub fn rows(
    manager: &MemoryManager,
    device: &DeviceInfo,
    sampling: &Sampling,
    sizes: &[u64],
    step: &mut dyn FnMut(&str),
    emit: &mut dyn FnMut(Row),
) {
    for &bytes in sizes {
        let bytes = bytes as usize;
        step(&format!("transfers of {}", super::fmt_bytes(bytes as u64)));
        if let Err(e) = rows_of_size(manager, device, sampling, bytes, emit) {
            emit(Row::skipped(
                Table::Transfer,
                device.id,
                "every path",
                bytes as u64,
                format!("{e:#}"),
                None,
            ));
        }
    }
}

fn rows_of_size(
    manager: &MemoryManager,
    device: &DeviceInfo,
    sampling: &Sampling,
    bytes: usize,
    emit: &mut dyn FnMut(Row),
) -> anyhow::Result<()> {
    let id = device.id;
    let src = filled(manager, DeviceId::CPU, bytes, AllocationMode::Pooled)?;
    let mut dst = filled(manager, DeviceId::CPU, bytes, AllocationMode::Pooled)?;
    // The baselines copy from and to the same host memory as unimem (page-aligned pool
    // blocks): a plain `Vec` of other alignment copies at another speed.
    let mut plain_dst = filled(manager, DeviceId::CPU, bytes, AllocationMode::Pooled)?;
    if device.kind == DeviceKind::Cpu {
        let mut memcpy = || -> anyhow::Result<()> {
            plain_dst.as_mut_slice()?.copy_from_slice(std::hint::black_box(src.as_slice()?));
            Ok(())
        };
        emit(measure(
            sampling,
            id,
            "host → host",
            bytes,
            || manager.transfer_blocking(&src, &mut dst).map(|r| r.strategy),
            Some(("memcpy (one thread)", &mut memcpy)),
        ));
        return Ok(());
    }

    let raws = raw::for_device(manager, id)?;
    let raw = raws.first().map(|r| r.as_ref()).ok_or_else(|| anyhow::anyhow!("no raw allocator"))?;
    let raw_a = RawOwned::new(raw, bytes)?;
    let raw_b = RawOwned::new(raw, bytes)?;
    let mut dev = filled(manager, id, bytes, AllocationMode::Pooled)?;
    let mut dev_b = filled(manager, id, bytes, AllocationMode::Pooled)?;
    let [write_call, read_call, copy_call] = raw.copy_calls();

    let mut write = || raw.write(raw_a.block, src.as_slice()?);
    emit(measure(
        sampling,
        id,
        "host → device (pageable)",
        bytes,
        || manager.transfer_blocking(&src, &mut dev).map(|r| r.strategy),
        Some((write_call, &mut write)),
    ));
    let mut read = || raw.read(raw_a.block, plain_dst.as_mut_slice()?);
    emit(measure(
        sampling,
        id,
        "device → host (pageable)",
        bytes,
        || manager.transfer_blocking(&dev, &mut dst).map(|r| r.strategy),
        Some((read_call, &mut read)),
    ));

    // Pinned: the device's own page-locked host memory at the host end.
    let pinned_raw = raw::pinned_for_device(manager, id)?;
    let pinned = filled(manager, id, bytes, AllocationMode::Pinned);
    let raw_pinned = pinned_raw.as_deref().map(|r| RawOwned::new(r, bytes)).transpose();
    match (pinned, &raw_pinned) {
        (Ok(mut pinned), Ok(raw_pinned)) => {
            let host = raw_pinned.as_ref().and_then(|p| p.raw.host_ptr(p.block));
            let mut write = || -> anyhow::Result<()> {
                let host = host.ok_or_else(|| anyhow::anyhow!("no host mapping"))?;
                // SAFETY: the mapping of `raw_pinned`'s `bytes` bytes, alive until the end of
                // this block; only one closure runs at a time.
                raw.write(raw_a.block, unsafe { std::slice::from_raw_parts(host, bytes) })
            };
            emit(measure(
                sampling,
                id,
                "host → device (pinned)",
                bytes,
                || manager.transfer_blocking(&pinned, &mut dev).map(|r| r.strategy),
                Some((&format!("{write_call} from pinned"), &mut write)),
            ));
            let mut read = || -> anyhow::Result<()> {
                let host = host.ok_or_else(|| anyhow::anyhow!("no host mapping"))?;
                // SAFETY: as above.
                raw.read(raw_a.block, unsafe { std::slice::from_raw_parts_mut(host, bytes) })
            };
            emit(measure(
                sampling,
                id,
                "device → host (pinned)",
                bytes,
                || manager.transfer_blocking(&dev, &mut pinned).map(|r| r.strategy),
                Some((&format!("{read_call} into pinned"), &mut read)),
            ));
        }
        (Err(e), _) => {
            let reason = e.to_string();
            let hint = super::alloc::pinned_hint(&reason);
            for op in ["host → device (pinned)", "device → host (pinned)"] {
                emit(Row::skipped(Table::Transfer, id, op, bytes as u64, reason.clone(), hint.clone()));
            }
        }
        (Ok(_), Err(e)) => {
            let reason = format!("the baseline's pinned memory: {e:#}");
            for op in ["host → device (pinned)", "device → host (pinned)"] {
                emit(Row::skipped(Table::Transfer, id, op, bytes as u64, reason.clone(), None));
            }
        }
    }
    drop(raw_pinned);

    let mut copy = || raw.copy(raw_a.block, raw_b.block, bytes);
    emit(measure(
        sampling,
        id,
        "device-local",
        bytes,
        || manager.transfer_blocking(&dev, &mut dev_b).map(|r| r.strategy),
        Some((copy_call, &mut copy)),
    ));

    let staged = TransferOptions::default().with_strategy(Strategy::Staged);
    let mut write = || raw.write(raw_a.block, src.as_slice()?);
    emit(measure(
        sampling,
        id,
        "host → device (staged)",
        bytes,
        || manager.transfer_with_blocking(&src, &mut dev, staged.clone()).map(|r| r.strategy),
        Some((write_call, &mut write)),
    ));

    if device.supports_unified {
        match filled(manager, id, bytes, AllocationMode::Unified) {
            Ok(mut unified) => {
                let mut memcpy = || -> anyhow::Result<()> {
                    plain_dst.as_mut_slice()?.copy_from_slice(std::hint::black_box(src.as_slice()?));
                    Ok(())
                };
                emit(measure(
                    sampling,
                    id,
                    "host → unified (zero-copy)",
                    bytes,
                    || manager.transfer_blocking(&src, &mut unified).map(|r| r.strategy),
                    Some(("memcpy (one thread)", &mut memcpy)),
                ));
            }
            Err(e) => emit(Row::skipped(
                Table::Transfer,
                id,
                "host → unified (zero-copy)",
                bytes as u64,
                e.to_string(),
                None,
            )),
        }
    }

    // Peer copies to every device this one reaches directly.
    for other in manager.devices() {
        if other.id == id || !manager.peers().is_enabled(id, other.id) {
            continue;
        }
        let op = format!("device → {} (peer)", other.id);
        let mut theirs = filled(manager, other.id, bytes, AllocationMode::Pooled)?;
        let other_raws = raw::for_device(manager, other.id)?;
        let other_raw =
            other_raws.first().map(|r| r.as_ref()).ok_or_else(|| anyhow::anyhow!("no raw allocator"))?;
        let raw_theirs = RawOwned::new(other_raw, bytes)?;
        let mut copy = || other_raw.copy(raw_a.block, raw_theirs.block, bytes);
        emit(measure(
            sampling,
            id,
            &op,
            bytes,
            || manager.transfer_blocking(&dev, &mut theirs).map(|r| r.strategy),
            Some((copy_call, &mut copy)),
        ));
    }
    Ok(())
}
