//! The transfer engine: moves data between any two buffers or views of equal length, on any
//! devices of any backends, by the fastest path the devices offer.
//!
//! # Strategies
//!
//! Chosen per transfer, from the two ends and the devices' real capabilities, in this order
//! ([`Strategy::ALL`]):
//!
//! 1. [`DeviceLocal`](Strategy::DeviceLocal): both ends on one device. One device copy, no
//!    host involvement (a device's own pinned memory and its device memory: one DMA); on
//!    the CPU, a memcpy spread over cores for large copies.
//! 2. [`PeerToPeer`](Strategy::PeerToPeer): device memory on two devices with peer access
//!    enabled (see [`PeerManager`](crate::PeerManager)): the destination's queue copies
//!    straight from the source (CUDA `cuMemcpyPeerAsync`; OpenCL devices of one context).
//! 3. [`ZeroCopy`](Strategy::ZeroCopy): both ends host-addressable (CPU memory, an
//!    accelerator's pinned or unified memory): one host memcpy, no device command.
//! 4. [`PinnedStaging`](Strategy::PinnedStaging): host to device, device to host, and device
//!    to device across contexts or backends. Pageable host data streams through a ring of
//!    pinned chunks from the device's pinned pool ([`TransferOptions::with_chunk_bytes`],
//!    [`with_depth`](TransferOptions::with_depth)), so that the host copy of one chunk
//!    overlaps the device copy of another; device to device, the read of one chunk overlaps
//!    the write of the one before. Needs `use_pinned_memory` (on by default).
//! 5. [`Staged`](Strategy::Staged): through one plain host buffer of the whole range.
//!    Always works: the fallback, and what `use_pinned_memory = false` gives.
//!
//! A caller may force a strategy ([`TransferOptions::with_strategy`]); forcing one that
//! cannot work is [`Error::StrategyUnavailable`](crate::Error::StrategyUnavailable), which
//! says why. A [`TransferReport`] says which strategy ran and, for each faster one that was
//! wanted but not possible, why.
//!
//! # Completion, concurrency, soundness
//!
//! Transfers are futures of no particular runtime: device commands are enqueued without
//! waiting and completed by driver callbacks (OpenCL event callbacks, CUDA stream
//! callbacks), never by polling; host copies run on the polling thread (and helper threads,
//! for large ones). The `*_blocking` twins wait on the calling thread. At most
//! `max_concurrent_transfers` transfers of a manager run at once (an async semaphore); the
//! others wait for a permit without blocking their thread.
//!
//! A transfer future dropped or leaked at any point never lets a device touch memory that
//! safe code can reuse: staging memory belongs to the engine until the device is done with
//! it, and buffer memory is ordered on its device's queue (its pool's next user waits for
//! the transfer's commands). A transfer that fails or is dropped part-way leaves the
//! destination range partly written; nothing outside the range and nothing of the source
//! changes.
//!
//! # Room to grow
//!
//! A transport to another process or node (UCX, NIXL, NCCL) fits as one more strategy:
//! a variant of [`Strategy`] placed in the order by its speed, a clause in the choice
//! (`choose.rs`: when both ends allow it, and why not otherwise), and an executor beside
//! those in `run.rs` that enqueues its sends and receives and completes through the same
//! [`Pending`](crate::backend::pending::Pending) callbacks. The semaphore, the reports, the
//! statistics and the batch machinery stay as they are: they see only strategies.

mod choose;
mod host_copy;
mod run;
mod stats;

pub use stats::{StrategyStatistics, TransferStatistics};

use crate::Element;
use crate::buffer::{Buffer, BufferView, BufferViewMut, Shape};
use crate::device::{DeviceId, MemoryKind};
use crate::error::{Error, Result};
use crate::peer::PeerManager;
use crate::pool::DevicePool;
use choose::{Offer, choose};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How a transfer moves its data; see the [module docs](self) for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Strategy {
    /// One copy on the device that holds both ends.
    DeviceLocal,
    /// A direct copy between two devices with peer access.
    PeerToPeer,
    /// One host memcpy between host-addressable ends.
    ZeroCopy,
    /// Pipelined through a ring of pinned chunks.
    PinnedStaging,
    /// Through one plain host buffer.
    Staged,
}

impl Strategy {
    /// Every strategy, in the order the engine prefers them.
    pub const ALL: [Strategy; 5] = [
        Strategy::DeviceLocal,
        Strategy::PeerToPeer,
        Strategy::ZeroCopy,
        Strategy::PinnedStaging,
        Strategy::Staged,
    ];

    /// The strategy's name in lower case words ("pinned staging").
    pub fn name(self) -> &'static str {
        match self {
            Strategy::DeviceLocal => "device-local",
            Strategy::PeerToPeer => "peer-to-peer",
            Strategy::ZeroCopy => "zero-copy",
            Strategy::PinnedStaging => "pinned staging",
            Strategy::Staged => "staged",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Default size of a pinned staging chunk: see `BENCHMARKS.md` ("pinned staging chunks")
/// for the measurement behind it.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;
/// Default number of pinned staging chunks in flight per transfer.
pub const DEFAULT_DEPTH: usize = 3;

/// How one transfer should run.
///
/// ```
/// use unimem::transfer::{Strategy, TransferOptions};
///
/// let options = TransferOptions::default().with_strategy(Strategy::Staged);
/// assert_eq!(options.strategy(), Some(Strategy::Staged));
/// assert!(TransferOptions::default().with_chunk_bytes(100).is_err()); // under 4 KiB
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransferOptions {
    strategy: Option<Strategy>,
    chunk_bytes: usize,
    depth: usize,
}

impl Default for TransferOptions {
    /// The engine's choice of strategy, [`DEFAULT_CHUNK_BYTES`], [`DEFAULT_DEPTH`].
    fn default() -> Self {
        TransferOptions { strategy: None, chunk_bytes: DEFAULT_CHUNK_BYTES, depth: DEFAULT_DEPTH }
    }
}

impl TransferOptions {
    /// Forces `strategy`: the transfer fails with the reason if it cannot work.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Sets the size of a pinned staging chunk (4 KiB to 1 GiB).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] outside that range.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Result<Self> {
        if !(4 << 10..=1 << 30).contains(&bytes) {
            return Err(invalid("chunk_bytes", bytes, "a staging chunk holds 4 KiB to 1 GiB"));
        }
        self.chunk_bytes = bytes;
        Ok(self)
    }

    /// Sets the number of pinned staging chunks in flight (1 to 64; 1 turns the overlap off).
    ///
    /// # Errors
    /// [`Error::InvalidOption`] outside that range.
    pub fn with_depth(mut self, depth: usize) -> Result<Self> {
        if !(1..=64).contains(&depth) {
            return Err(invalid("depth", depth, "a ring holds 1 to 64 chunks"));
        }
        self.depth = depth;
        Ok(self)
    }

    /// The forced strategy, if any.
    pub fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    /// Bytes per pinned staging chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Pinned staging chunks in flight.
    pub fn depth(&self) -> usize {
        self.depth
    }
}

fn invalid(option: &'static str, value: usize, reason: &'static str) -> Error {
    Error::InvalidOption { option, value: value.to_string(), reason }
}

/// A faster strategy that was wanted for a transfer but could not be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declined {
    /// The strategy.
    pub strategy: Strategy,
    /// Why it could not be used.
    pub reason: String,
}

/// What a transfer did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TransferReport {
    /// The strategy that ran.
    pub strategy: Strategy,
    /// Bytes moved.
    pub bytes: u64,
    /// Time from start (a permit held) to completion.
    pub elapsed: Duration,
    /// The source's device.
    pub source: DeviceId,
    /// The destination's device.
    pub destination: DeviceId,
    /// Pinned staging chunks the data went through (0 for other strategies).
    pub chunks: u64,
    /// The faster strategies that were wanted but not possible, with the reasons, fastest
    /// first.
    pub declined: Vec<Declined>,
}

impl TransferReport {
    /// Bytes per second (0 for an empty transfer).
    pub fn bandwidth(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.bytes as f64 / seconds } else { 0.0 }
    }
}

impl fmt::Display for TransferReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes {} -> {} by {} in {:.3?} ({:.2} GB/s)",
            self.bytes,
            self.source,
            self.destination,
            self.strategy,
            self.elapsed,
            self.bandwidth() / 1e9
        )?;
        for d in &self.declined {
            write!(f, "; {} not possible: {}", d.strategy, d.reason)?;
        }
        Ok(())
    }
}

/// The source of a transfer: a whole buffer (`&buffer`) or a view (`buffer.slice(..)?`).
#[derive(Debug)]
pub struct Source<'a, T: Element> {
    buffer: &'a Buffer<T>,
    range: Range<usize>,
}

/// The destination of a transfer: a whole buffer (`&mut buffer`) or a writable view
/// (`buffer.slice_mut(..)?`).
#[derive(Debug)]
pub struct Destination<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
    range: Range<usize>,
}

impl<'a, T: Element> From<&'a Buffer<T>> for Source<'a, T> {
    fn from(buffer: &'a Buffer<T>) -> Self {
        Source { range: 0..buffer.len(), buffer }
    }
}

impl<'a, T: Element> From<&'a mut Buffer<T>> for Source<'a, T> {
    fn from(buffer: &'a mut Buffer<T>) -> Self {
        Source::from(&*buffer)
    }
}

impl<'a, T: Element> From<BufferView<'a, T>> for Source<'a, T> {
    fn from(view: BufferView<'a, T>) -> Self {
        let (buffer, range) = view.into_parts();
        Source { buffer, range }
    }
}

impl<'a, T: Element> From<&BufferView<'a, T>> for Source<'a, T> {
    fn from(view: &BufferView<'a, T>) -> Self {
        Source::from(view.clone())
    }
}

impl<'a, T: Element> From<&'a mut Buffer<T>> for Destination<'a, T> {
    fn from(buffer: &'a mut Buffer<T>) -> Self {
        Destination { range: 0..buffer.len(), buffer }
    }
}

impl<'a, T: Element> From<BufferViewMut<'a, T>> for Destination<'a, T> {
    fn from(view: BufferViewMut<'a, T>) -> Self {
        let (buffer, range) = view.into_parts();
        Destination { buffer, range }
    }
}

impl<'a, T: Element> From<&'a mut BufferViewMut<'_, T>> for Destination<'a, T> {
    fn from(view: &'a mut BufferViewMut<'_, T>) -> Self {
        let (buffer, range) = view.parts_mut();
        Destination { buffer, range }
    }
}

/// Runs a future to completion on this thread (the blocking twins).
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    pollster::block_on(future)
}

/// The engine of one manager: its permits, its peers, its staging pools, its counters.
pub(crate) struct Engine {
    manager_id: u64,
    permits: async_lock::Semaphore,
    use_pinned: bool,
    pub(crate) peers: PeerManager,
    /// Each device's pinned pool (weak: pools hold the engine).
    staging: OnceLock<Vec<Option<Weak<DevicePool>>>>,
    counters: stats::Counters,
}

impl Engine {
    pub(crate) fn new(manager_id: u64, max_concurrent: usize, use_pinned: bool, peers: PeerManager) -> Self {
        Engine {
            manager_id,
            permits: async_lock::Semaphore::new(max_concurrent.max(1)),
            use_pinned,
            peers,
            staging: OnceLock::new(),
            counters: stats::Counters::default(),
        }
    }

    /// Sets each device's pinned pool, once the pools exist.
    pub(crate) fn set_staging_pools(&self, pools: Vec<Option<Weak<DevicePool>>>) {
        let _ = self.staging.set(pools);
    }

    pub(crate) fn statistics(&self) -> TransferStatistics {
        self.counters.snapshot()
    }

    /// Whether the destination's device may copy straight from the source's memory.
    fn peer_path(&self, src: &Shape, dst: &Shape) -> Result<(), String> {
        if src.manager != dst.manager || src.manager != self.manager_id {
            return Err("the buffers belong to different managers".into());
        }
        match self.peers.access(dst.device, src.device) {
            Ok(access) if access.is_enabled() => Ok(()),
            Ok(access) => Err(format!("peer access of {} to {}: {access}", dst.device, src.device)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The pinned pool that stages a transfer between these ends: the device end's (the
    /// source's, device to device, if it has one), or why there is none.
    fn staging_pool(&self, src: &Shape, dst: &Shape) -> Result<Arc<DevicePool>, String> {
        if !self.use_pinned {
            return Err("use_pinned_memory is off".into());
        }
        let pool_of = |end: &Shape| -> Result<Arc<DevicePool>, String> {
            if end.manager != self.manager_id {
                return Err(format!("{} belongs to another manager", end.device));
            }
            let pools = self.staging.get().ok_or("the manager is being built")?;
            match pools.get(end.device.index()) {
                Some(Some(pool)) => pool.upgrade().ok_or_else(|| "the manager was dropped".into()),
                _ => Err(format!("{} has no pinned memory", end.device)),
            }
        };
        let ends: Vec<&Shape> = [src, dst].into_iter().filter(|end| !end.host).collect();
        let mut why = String::from("no end is device memory");
        for end in ends {
            match pool_of(end) {
                Ok(pool) => return Ok(pool),
                Err(e) => why = e,
            }
        }
        Err(why)
    }

    /// One transfer, start to end.
    pub(crate) async fn run<T: Element>(
        &self,
        src: Source<'_, T>,
        dst: Destination<'_, T>,
        options: &TransferOptions,
    ) -> Result<TransferReport> {
        let (source, src_range) = (src.buffer, src.range);
        let (target, dst_range) = (dst.buffer, dst.range);
        if src_range.len() != dst_range.len() {
            return Err(Error::LengthMismatch { destination: dst_range.len(), source_len: src_range.len() });
        }
        let (from, to) = (source.transfer_shape(true), target.transfer_shape(false));
        let staging_pool = self.staging_pool(&from, &to);
        let offer = Offer {
            peer: self.peer_path(&from, &to),
            pinned: staging_pool.as_ref().map(drop).map_err(Clone::clone),
        };
        let forced = options.strategy;
        let mut choice = choose(&from, &to, &offer, forced)
            .map_err(|(strategy, reason)| Error::StrategyUnavailable { strategy, reason })?;

        let _permit = self.permits.acquire().await;
        let _flight = self.counters.start();
        let started = Instant::now();
        let bytes = src_range.len() * size_of::<T>();
        let mut chunks = 0;
        // The ring first: a forced strategy that cannot get its staging memory fails before
        // either buffer is touched.
        let mut ring = match (choice.strategy, &staging_pool) {
            (Strategy::PinnedStaging, Ok(pool)) if bytes > 0 => {
                match run::Ring::new(pool, options.chunk_bytes, options.depth, bytes, &self.counters) {
                    Ok(ring) => Some(ring),
                    Err(reason) if forced.is_some() => {
                        return Err(Error::StrategyUnavailable { strategy: Strategy::PinnedStaging, reason });
                    }
                    Err(reason) => {
                        choice.declined.push(Declined { strategy: Strategy::PinnedStaging, reason });
                        choice.strategy = Strategy::Staged;
                        None
                    }
                }
            }
            _ => None,
        };
        if bytes > 0 {
            let device_use = choice.strategy == Strategy::DeviceLocal && (from.dma || to.dma);
            let outcome = async {
                let s = source.transfer_source(src_range, device_use)?;
                let d = target.transfer_destination(dst_range, device_use)?;
                match (choice.strategy, ring.as_mut()) {
                    (Strategy::DeviceLocal, _) => run::device_local(s, d, bytes).await,
                    (Strategy::PeerToPeer, _) => run::peer(s, d, bytes).await,
                    (Strategy::ZeroCopy, _) => run::device_local(s, d, bytes).await,
                    (Strategy::PinnedStaging, Some(ring)) => {
                        chunks = run::pinned(s, d, bytes, ring).await?;
                        Ok(())
                    }
                    _ => run::staged(s, d, bytes, &self.counters).await,
                }
            }
            .await;
            if let Err(e) = outcome {
                self.counters.failed();
                return Err(e);
            }
        }
        drop(ring);
        let elapsed = started.elapsed();
        self.counters.done(choice.strategy, bytes, elapsed);
        Ok(TransferReport {
            strategy: choice.strategy,
            bytes: bytes as u64,
            elapsed,
            source: from.device,
            destination: to.device,
            chunks: chunks as u64,
            declined: choice.declined,
        })
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("statistics", &self.statistics()).finish()
    }
}

/// The memory kind whose pool stages transfers.
pub(crate) const STAGING_KIND: MemoryKind = MemoryKind::Pinned;
