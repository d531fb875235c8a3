//! Statistics: what the pools hold, how often they hit, how much memory is wasted.

use crate::device::{DeviceId, MemoryKind};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A snapshot of a manager's memory, summed over its pools.
///
/// Taken without stopping allocation: while other threads allocate, the fields may come from
/// slightly different instants; when the manager is quiet they balance exactly:
/// `total_allocated + total_pooled + pending_free == total_reserved`. Sums saturate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MemoryStatistics {
    /// Capacity in bytes of the live buffers ("total allocated").
    pub total_allocated: u64,
    /// Bytes held by the pools, ready for reuse.
    pub total_pooled: u64,
    /// Bytes held from the devices: live, pooled, and waiting to be freed.
    pub total_reserved: u64,
    /// Bytes given up (dropped past the pool's bounds, or trimmed) whose last device use
    /// had not completed yet: they are freed once it has, never by waiting in `Drop`.
    pub pending_free: u64,
    /// Bytes the live buffers asked for (`len * size_of::<T>()`).
    pub requested_bytes: u64,
    /// Allocations served from a pool.
    pub pool_hits: u64,
    /// Pooled allocations that needed fresh memory.
    pub pool_misses: u64,
    /// Allocations that bypassed the pool (unpooled mode, above the largest class, pooling off).
    pub unpooled_allocations: u64,
    /// Buffers alive now.
    pub active_buffers: u64,
    /// Peak reserved bytes (memory really held, never a refused request): the sum of each
    /// pool's own peak, so an upper bound of the manager-wide peak when pools peaked at
    /// different times.
    pub peak_usage: u64,
    /// Times a pool was trimmed (explicitly or on memory pressure).
    pub trims: u64,
    /// Bytes given back to the devices by trimming.
    pub trimmed_bytes: u64,
    /// Allocations retried after running out of memory.
    pub oom_retries: u64,
    /// Returned buffers freed because their class or the pool was full.
    pub pool_overflows: u64,
    /// Pool hits served by taking blocks out of another thread's cache (see
    /// [`PoolStatistics::steals`]).
    pub pool_steals: u64,
    /// Errors reported by a backend while freeing memory (recorded, never panicked on).
    pub free_errors: u64,
    /// Coherence copies from device to host mirror (a stale host side was read).
    pub syncs_to_host: u64,
    /// Coherence copies from host mirror to device (a stale device side was used).
    pub syncs_to_device: u64,
    /// Staging memory leaked in this process (all managers): a device copy that could be
    /// neither tracked by a callback nor waited for may still write it, so it is never
    /// freed. Zero unless a driver failed twice in a row.
    pub leaked_staging_bytes: u64,
    /// One entry per (device, memory kind) pool.
    pub pools: Vec<PoolStatistics>,
    /// The transfer engine's counters: per strategy, in flight, staging memory.
    pub transfers: crate::transfer::TransferStatistics,
}

/// The statistics of one (device, memory kind) pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PoolStatistics {
    /// The device.
    pub device: Option<DeviceId>,
    /// The kind of memory.
    pub kind: Option<MemoryKind>,
    /// Capacity of live buffers in bytes.
    pub allocated: u64,
    /// Bytes pooled.
    pub pooled: u64,
    /// Bytes held from the device.
    pub reserved: u64,
    /// Bytes waiting for their last device use before they are freed.
    pub pending_free: u64,
    /// Bytes requested by live buffers.
    pub requested: u64,
    /// Pool hits.
    pub hits: u64,
    /// Pool misses.
    pub misses: u64,
    /// Unpooled allocations.
    pub unpooled: u64,
    /// Live buffers.
    pub active_buffers: u64,
    /// Highest `reserved`.
    pub peak: u64,
    /// Trims.
    pub trims: u64,
    /// Bytes trimmed.
    pub trimmed_bytes: u64,
    /// Out-of-memory retries.
    pub oom_retries: u64,
    /// Returns freed because the pool was full.
    pub overflows: u64,
    /// Hits served by taking blocks out of another thread's cache (also counted in `hits`).
    /// Each costs the allocating thread a process-wide barrier; a pipeline whose returns
    /// reach the shared store (the pool's demand) needs almost none.
    pub steals: u64,
    /// Backend errors while freeing.
    pub free_errors: u64,
    /// Coherence copies device to host.
    pub syncs_to_host: u64,
    /// Coherence copies host to device.
    pub syncs_to_device: u64,
    /// Occupied size classes.
    pub classes: Vec<ClassOccupancy>,
}

/// How many buffers one size class holds pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassOccupancy {
    /// The class capacity in bytes.
    pub class_bytes: u64,
    /// Buffers pooled in the class.
    pub buffers: u64,
}

impl MemoryStatistics {
    /// Pool hits over pooled allocations (0.0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        ratio(self.pool_hits, self.pool_hits.saturating_add(self.pool_misses))
    }

    /// Bytes lost to rounding live requests up to their size class.
    pub fn internal_waste(&self) -> u64 {
        self.total_allocated.saturating_sub(self.requested_bytes)
    }

    pub(crate) fn from_pools(pools: Vec<PoolStatistics>) -> Self {
        let mut s = MemoryStatistics::default();
        for p in &pools {
            let add = |total: &mut u64, n: u64| *total = total.saturating_add(n);
            add(&mut s.total_allocated, p.allocated);
            add(&mut s.total_pooled, p.pooled);
            add(&mut s.total_reserved, p.reserved);
            add(&mut s.pending_free, p.pending_free);
            add(&mut s.requested_bytes, p.requested);
            add(&mut s.pool_hits, p.hits);
            add(&mut s.pool_misses, p.misses);
            add(&mut s.unpooled_allocations, p.unpooled);
            add(&mut s.active_buffers, p.active_buffers);
            add(&mut s.peak_usage, p.peak);
            add(&mut s.trims, p.trims);
            add(&mut s.trimmed_bytes, p.trimmed_bytes);
            add(&mut s.oom_retries, p.oom_retries);
            add(&mut s.pool_overflows, p.overflows);
            add(&mut s.pool_steals, p.steals);
            add(&mut s.free_errors, p.free_errors);
            add(&mut s.syncs_to_host, p.syncs_to_host);
            add(&mut s.syncs_to_device, p.syncs_to_device);
        }
        s.leaked_staging_bytes = crate::backend::pending::leaked_staging_bytes();
        s.pools = pools;
        s
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// Formats `n` with thousands separators: `134,217,728`.
pub(crate) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for MemoryStatistics {
    /// The one-line summary:
    /// `Memory: 42 buffers, 134,217,728 bytes allocated, 67,108,864 bytes pooled, 92.3% pool hit rate`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Memory: {} buffers, {} bytes allocated, {} bytes pooled, {:.1}% pool hit rate",
            self.active_buffers,
            grouped(self.total_allocated),
            grouped(self.total_pooled),
            self.hit_rate() * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_the_reference_format() {
        let stats = MemoryStatistics {
            active_buffers: 42,
            total_allocated: 134_217_728,
            total_pooled: 67_108_864,
            pool_hits: 923,
            pool_misses: 77,
            ..Default::default()
        };
        assert_eq!(
            stats.to_string(),
            "Memory: 42 buffers, 134,217,728 bytes allocated, 67,108,864 bytes pooled, 92.3% pool hit rate"
        );
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
    }
}
