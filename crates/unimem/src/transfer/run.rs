//! Carrying out each strategy on resolved ends.
//!
//! Every device command is enqueued without waiting and its completion awaited through a
//! driver callback ([`Queue::completion`]). Memory a device copies belongs to something that
//! outlives the command whatever happens to the transfer's future (soundness rule 1):
//! - plain host staging is owned by the completion, which frees it once the device is done;
//! - pinned staging chunks are blocks of a pinned pool, held by the [`Ring`]: dropped
//!   mid-flight, a chunk goes back to its pool behind a fence on its device's queue (which
//!   its next user waits for), or, when a command of another device's queue may still use
//!   it, is freed once a fence on that queue has completed;
//! - buffer memory is ordered by its own queue (device memory), or by the fence its pool
//!   takes when it is dropped and the device-use mark that makes host access wait
//!   (host-visible memory).

use super::host_copy;
use super::stats::Counters;
use crate::backend::{BackendError, Queue, RawAllocation};
use crate::buffer::{HostRange, Side};
use crate::device::DeviceId;
use crate::error::{Error, Result};
use crate::host_lines::{HostLines, Staging};
use crate::pool::{AcquireError, Block, DevicePool};
use std::sync::Arc;

/// A device end of a transfer.
struct Dev<'a> {
    pool: &'a Arc<DevicePool>,
    mem: &'a RawAllocation,
    offset: usize,
}

impl<'a> Dev<'a> {
    fn queue(&self) -> Result<&'a dyn Queue> {
        let pool: &'a Arc<DevicePool> = self.pool;
        pool.queue().ok_or_else(|| Error::on(pool.device)(internal("a device end without a queue")))
    }

    fn on(&self) -> impl FnOnce(BackendError) -> Error {
        Error::on(self.pool.device)
    }
}

fn internal(message: &str) -> BackendError {
    BackendError::Driver { call: "transfer", message: message.into() }
}

fn host_error(e: BackendError) -> Error {
    Error::on(DeviceId::CPU)(e)
}

/// The ends as (host, device) pairs.
enum Ends<'a> {
    HostToHost(HostRange, HostRange),
    HostToDevice(HostRange, Dev<'a>),
    DeviceToHost(Dev<'a>, HostRange),
    DeviceToDevice(Dev<'a>, Dev<'a>),
}

fn ends<'a>(src: Side<'a>, dst: Side<'a>) -> Ends<'a> {
    let dev = |pool, mem, offset| Dev { pool, mem, offset };
    match (src, dst) {
        (Side::Host(s), Side::Host(d)) => Ends::HostToHost(s, d),
        (Side::Host(s), Side::Device { pool, mem, offset }) => Ends::HostToDevice(s, dev(pool, mem, offset)),
        (Side::Device { pool, mem, offset }, Side::Host(d)) => Ends::DeviceToHost(dev(pool, mem, offset), d),
        (Side::Device { pool, mem, offset }, Side::Device { pool: p, mem: m, offset: o }) => {
            Ends::DeviceToDevice(dev(pool, mem, offset), dev(p, m, o))
        }
    }
}

/// The host bytes of a source end.
///
/// # Safety
/// The range is live host memory borrowed by the transfer, which no device writes meanwhile.
unsafe fn host_bytes<'r>(range: HostRange) -> &'r [u8] {
    // SAFETY: the caller's guarantee.
    unsafe { range.0.as_ref() }
}

/// The host bytes of a destination end.
///
/// # Safety
/// The range is live host memory borrowed mutably by the transfer, which no device uses
/// meanwhile, and no other reference to it exists.
unsafe fn host_bytes_mut<'r>(mut range: HostRange) -> &'r mut [u8] {
    // SAFETY: the caller's guarantee.
    unsafe { range.0.as_mut() }
}

/// Both ends in host memory: one memcpy, spread over cores when large.
pub(super) fn host_to_host(src: HostRange, dst: HostRange) {
    // SAFETY: the source is borrowed shared and the destination exclusively from two
    // distinct buffers (a `&` and a `&mut` cannot name one buffer); no device command was
    // enqueued on either by this transfer.
    unsafe { host_copy::copy(host_bytes_mut(dst), host_bytes(src)) }
}

/// Device-local: one copy on one device (or a memcpy, for host ends).
pub(super) async fn device_local(src: Side<'_>, dst: Side<'_>, bytes: usize) -> Result<()> {
    match ends(src, dst) {
        Ends::HostToHost(s, d) => host_to_host(s, d),
        Ends::DeviceToDevice(s, d) => {
            let queue = d.queue()?;
            // SAFETY: two device allocations of one backend, in bounds (checked ranges of
            // two distinct buffers, which cannot overlap).
            unsafe { queue.enqueue_copy(s.mem, s.offset, d.mem, d.offset, bytes) }.map_err(d.on())?;
            queue.completion(None).map_err(d.on())?.await.map_err(d.on())?;
        }
        Ends::HostToDevice(s, d) => {
            // The source is this device's own pinned memory: its pool fences it on this
            // queue, and it is marked in device use, so it outlives the copy.
            let queue = d.queue()?;
            // SAFETY: in bounds; the host range stays allocated and unwritten until the
            // copy completes (see above).
            unsafe { queue.enqueue_write(d.mem, d.offset, s.0.as_ptr().cast::<u8>(), bytes) }
                .map_err(d.on())?;
            queue.completion(None).map_err(d.on())?.await.map_err(d.on())?;
        }
        Ends::DeviceToHost(s, d) => {
            let queue = s.queue()?;
            // SAFETY: as above, for this device's pinned memory as the destination.
            unsafe { queue.enqueue_read(s.mem, s.offset, d.0.as_ptr().cast::<u8>(), bytes) }
                .map_err(s.on())?;
            queue.completion(None).map_err(s.on())?.await.map_err(s.on())?;
        }
    }
    Ok(())
}

/// Peer-to-peer: the destination's queue copies straight from the source's memory.
pub(super) async fn peer(src: Side<'_>, dst: Side<'_>, bytes: usize) -> Result<()> {
    let Ends::DeviceToDevice(s, d) = ends(src, dst) else {
        return Err(host_error(internal("a peer copy between host ends")));
    };
    let (source, target) = (s.queue()?, d.queue()?);
    // The copy runs after the source's last use on its own queue...
    let written = source.record_fence().map_err(s.on())?;
    target.order_after(&written).map_err(d.on())?;
    // SAFETY: device allocations of their own backends, in bounds (checked ranges).
    let copied =
        unsafe { target.enqueue_peer_copy(s.pool.backend(), s.mem, s.offset, d.mem, d.offset, bytes) }
            .map_err(d.on())?;
    if !copied {
        return Err(Error::StrategyUnavailable {
            strategy: super::Strategy::PeerToPeer,
            reason: format!("the driver has no direct path from {} to {}", s.pool.device, d.pool.device),
        });
    }
    // ...and the source's next use (its pool's next user included) after the copy.
    let read = target.record_fence().map_err(d.on());
    let ordered = read.and_then(|read| source.order_after(&read).map_err(s.on()));
    let done = match target.completion(None) {
        Ok(pending) => pending.await.map(drop).map_err(d.on()),
        Err(e) => Err(d.on()(e)),
    };
    ordered.and(done)
}

/// Plain host staging of `bytes`, counted while it lives.
fn heap_staging(bytes: usize, copy_of: Option<&[u8]>) -> Result<Staging> {
    let lines = match copy_of {
        Some(src) => HostLines::copy_of(src),
        None => HostLines::zeroed(bytes),
    };
    lines.map(Staging::new).map_err(host_error)
}

/// Staged through plain host memory: the whole range copied into a host buffer, then out.
pub(super) async fn staged(src: Side<'_>, dst: Side<'_>, bytes: usize, counters: &Counters) -> Result<()> {
    let _held = counters.staging(bytes);
    match ends(src, dst) {
        Ends::HostToHost(s, d) => {
            // SAFETY: see `host_to_host`.
            let staging = HostLines::copy_of(unsafe { host_bytes(s) }).map_err(host_error)?;
            // SAFETY: see `host_to_host`.
            unsafe { host_bytes_mut(d) }.copy_from_slice(staging.bytes(bytes));
        }
        Ends::HostToDevice(s, d) => {
            // SAFETY: a borrowed source no device writes (see `host_to_host`).
            let staging = heap_staging(bytes, Some(unsafe { host_bytes(s) }))?;
            write_from(&d, staging, bytes).await?;
        }
        Ends::DeviceToHost(s, d) => {
            let staging = read_into(&s, heap_staging(bytes, None)?, bytes).await?;
            // SAFETY: the device is done with the staging memory (its read completed).
            let got = unsafe { staging.bytes(bytes) };
            // SAFETY: a destination no device uses (see `host_to_host`).
            unsafe { host_bytes_mut(d) }.copy_from_slice(got);
        }
        Ends::DeviceToDevice(s, d) => {
            let staging = read_into(&s, heap_staging(bytes, None)?, bytes).await?;
            write_from(&d, staging, bytes).await?;
        }
    }
    Ok(())
}

/// Reads `bytes` of `s` into `staging`, which the operation owns until the read is done.
async fn read_into(s: &Dev<'_>, staging: Staging, bytes: usize) -> Result<Staging> {
    let queue = s.queue()?;
    // SAFETY: in bounds; the staging memory is owned by the completion taken next, so it
    // outlives the read whatever happens to this future.
    unsafe { queue.enqueue_read(s.mem, s.offset, staging.as_ptr(), bytes) }.map_err(s.on())?;
    let staged = queue.completion(Some(staging)).map_err(s.on())?.await.map_err(s.on())?;
    staged.into_staging().ok_or_else(|| s.on()(internal("the completion lost its staging memory")))
}

/// Writes `bytes` of `staging` into `d`; the operation owns the staging until it is done.
async fn write_from(d: &Dev<'_>, staging: Staging, bytes: usize) -> Result<()> {
    let queue = d.queue()?;
    // SAFETY: as in `read_into`.
    unsafe { queue.enqueue_write(d.mem, d.offset, staging.as_ptr(), bytes) }.map_err(d.on())?;
    queue.completion(Some(staging)).map_err(d.on())?.await.map(drop).map_err(d.on())
}

/// A ring of pinned staging chunks from one device's pinned pool.
pub(super) struct Ring<'c> {
    slots: Vec<Slot>,
    chunk: usize,
    /// The device whose pool the chunks came from: its queue's commands are fenced when a
    /// chunk goes back to the pool.
    home: DeviceId,
    _held: super::stats::StagingUse<'c>,
}

struct Slot {
    block: Option<Box<Block>>,
    /// The last command on the chunk, not yet awaited.
    pending: Option<crate::backend::pending::Pending>,
    /// The pool of the device whose queue ran that command, where it is not the home device.
    foreign: Option<Arc<DevicePool>>,
}

impl<'c> Ring<'c> {
    /// Up to `depth` chunks of `chunk` bytes (fewer for a short transfer, or where the pool
    /// runs out after the first), or why not even one could be had.
    pub(super) fn new(
        pool: &Arc<DevicePool>,
        chunk: usize,
        depth: usize,
        bytes: usize,
        counters: &'c Counters,
    ) -> std::result::Result<Ring<'c>, String> {
        let chunk = chunk.min(bytes.next_multiple_of(4096)).max(1);
        let depth = depth.min(bytes.div_ceil(chunk)).max(1);
        let mut slots = Vec::with_capacity(depth);
        while slots.len() < depth {
            match pool.acquire(chunk, true) {
                Ok(block) if block.mem.host.is_some() => {
                    slots.push(Slot { block: Some(block), pending: None, foreign: None });
                }
                Ok(block) => {
                    block.recycle(chunk);
                    return Err(format!("{}'s pinned memory is not host-addressable", pool.device));
                }
                Err(_) if !slots.is_empty() => break,
                Err(e) => {
                    return Err(format!("no pinned staging memory on {}: {}", pool.device, describe(e)));
                }
            }
        }
        let held = counters.staging(chunk * slots.len());
        Ok(Ring { slots, chunk, home: pool.device, _held: held })
    }

    /// Chunks in the ring.
    pub(super) fn depth(&self) -> usize {
        self.slots.len()
    }

    fn slot(&mut self, i: usize) -> &mut Slot {
        let depth = self.slots.len();
        &mut self.slots[i % depth]
    }

    /// Waits for the last command on chunk `i`'s slot.
    async fn settle(&mut self, i: usize) -> Result<()> {
        let slot = self.slot(i);
        if let Some(pending) = slot.pending.take() {
            let device = slot.foreign.take().map_or(self.home, |pool| pool.device);
            pending.await.map_err(Error::on(device))?;
        }
        Ok(())
    }

    async fn settle_all(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            self.settle(i).await?;
        }
        Ok(())
    }

    /// Chunk `i`'s host address (its slot is idle).
    fn ptr(&mut self, i: usize) -> *mut u8 {
        self.slot(i).block.as_ref().and_then(|b| b.mem.host).map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }

    /// Records the completion of the command just enqueued on chunk `i` through `end`'s queue.
    fn started(&mut self, i: usize, end: &Dev<'_>) -> Result<()> {
        let home = self.home;
        let pending = end.queue()?.completion(None).map_err(end.on())?;
        let slot = self.slot(i);
        slot.pending = Some(pending);
        slot.foreign = (end.pool.device != home).then(|| Arc::clone(end.pool));
        Ok(())
    }

    /// The byte range of chunk `i` of a `bytes`-long transfer.
    fn span(&self, i: usize, bytes: usize) -> (usize, usize) {
        let at = i * self.chunk;
        (at, self.chunk.min(bytes - at))
    }
}

impl Drop for Ring<'_> {
    fn drop(&mut self) {
        let chunk = self.chunk;
        for slot in &mut self.slots {
            let Some(block) = slot.block.take() else { continue };
            match (slot.pending.take(), slot.foreign.take()) {
                // A command of another device's queue may still use the chunk: freed once a
                // fence there (after that command) has completed, on the reaper thread.
                (Some(_), Some(pool)) => match pool.queue().map(|queue| queue.record_fence()) {
                    Some(Ok(fence)) => block.give_up_after(chunk, move |_| drop(fence.wait())),
                    // No fence: nobody can tell when the command ends, so the chunk is never
                    // freed (leaked, not reused).
                    _ => std::mem::forget(block),
                },
                // Only the home queue used it: the pool's fence covers it.
                _ => block.recycle(chunk),
            }
        }
    }
}

fn describe(e: AcquireError) -> String {
    match e {
        AcquireError::Exhausted(cause) => cause.to_string(),
        AcquireError::TooLarge { largest } => {
            format!("larger than the largest allocation of {largest} bytes")
        }
        AcquireError::Backend(e) => e.to_string(),
    }
}

/// Pinned staging: the range streams through the ring, chunk by chunk, so that the host
/// copy of one chunk overlaps the device copy of another (and, device to device, the read
/// of one chunk the write of another). Returns the number of chunks.
pub(super) async fn pinned(src: Side<'_>, dst: Side<'_>, bytes: usize, ring: &mut Ring<'_>) -> Result<usize> {
    let n = bytes.div_ceil(ring.chunk);
    match ends(src, dst) {
        Ends::HostToHost(..) => return Err(host_error(internal("pinned staging between host ends"))),
        Ends::HostToDevice(s, d) => {
            let queue = d.queue()?;
            for i in 0..n {
                ring.settle(i).await?;
                let (at, len) = ring.span(i, bytes);
                let chunk = ring.ptr(i);
                // SAFETY: the chunk holds `chunk >= len` bytes, no command uses it (settled
                // above), and the source range is borrowed host memory no device writes.
                unsafe { chunk.copy_from_nonoverlapping(host_bytes(s)[at..].as_ptr(), len) };
                // SAFETY: in bounds; the chunk belongs to the ring until the write is done
                // (see the module docs for a ring dropped mid-flight).
                unsafe { queue.enqueue_write(d.mem, d.offset + at, chunk, len) }.map_err(d.on())?;
                ring.started(i, &d)?;
            }
        }
        Ends::DeviceToHost(s, d) => {
            let queue = s.queue()?;
            let read = |ring: &mut Ring<'_>, i: usize| -> Result<()> {
                let (at, len) = ring.span(i, bytes);
                let chunk = ring.ptr(i);
                // SAFETY: in bounds; the chunk belongs to the ring until the read is done.
                unsafe { queue.enqueue_read(s.mem, s.offset + at, chunk, len) }.map_err(s.on())?;
                ring.started(i, &s)
            };
            for i in 0..n.min(ring.depth()) {
                read(ring, i)?;
            }
            for i in 0..n {
                ring.settle(i).await?;
                let (at, len) = ring.span(i, bytes);
                let chunk = ring.ptr(i);
                // SAFETY: the read into the chunk has completed; the destination is borrowed
                // exclusively and no device uses it.
                unsafe { host_bytes_mut(d)[at..at + len].as_mut_ptr().copy_from_nonoverlapping(chunk, len) };
                if i + ring.depth() < n {
                    read(ring, i + ring.depth())?;
                }
            }
        }
        Ends::DeviceToDevice(s, d) => {
            let (source, target) = (s.queue()?, d.queue()?);
            let read = |ring: &mut Ring<'_>, i: usize| -> Result<()> {
                let (at, len) = ring.span(i, bytes);
                let chunk = ring.ptr(i);
                // SAFETY: as above.
                unsafe { source.enqueue_read(s.mem, s.offset + at, chunk, len) }.map_err(s.on())?;
                ring.started(i, &s)
            };
            for i in 0..n.min(ring.depth()) {
                read(ring, i)?;
            }
            for i in 0..n {
                ring.settle(i).await?;
                {
                    let (at, len) = ring.span(i, bytes);
                    let chunk = ring.ptr(i);
                    // SAFETY: in bounds; the read into the chunk has completed, and the chunk
                    // belongs to the ring until the write is done.
                    unsafe { target.enqueue_write(d.mem, d.offset + at, chunk, len) }.map_err(d.on())?;
                }
                ring.started(i, &d)?;
                if i + ring.depth() < n {
                    ring.settle(i).await?;
                    read(ring, i + ring.depth())?;
                }
            }
        }
    }
    ring.settle_all().await?;
    Ok(n)
}
