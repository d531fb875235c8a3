//! The engine's counters: per strategy, in flight, staging memory.

use super::Strategy;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// What the transfer engine has done, per strategy, and what it does now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TransferStatistics {
    /// One entry per strategy, in [`Strategy::ALL`] order.
    pub strategies: Vec<StrategyStatistics>,
    /// Transfers running now (holding one of the `max_concurrent_transfers` permits).
    pub in_flight: u64,
    /// The most transfers that ever ran at once.
    pub peak_in_flight: u64,
    /// Bytes of staging memory (pinned chunks, plain host buffers) that transfers hold now.
    pub staging_bytes: u64,
    /// Transfers that failed after they started.
    pub failed: u64,
}

/// What one strategy has done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StrategyStatistics {
    /// The strategy.
    pub strategy: Strategy,
    /// Transfers completed.
    pub count: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Time spent, summed over transfers (overlapping transfers each count in full).
    pub seconds: f64,
}

impl TransferStatistics {
    /// The entry of `strategy`.
    pub fn of(&self, strategy: Strategy) -> Option<&StrategyStatistics> {
        self.strategies.iter().find(|s| s.strategy == strategy)
    }

    /// Transfers completed, over every strategy.
    pub fn count(&self) -> u64 {
        self.strategies.iter().map(|s| s.count).sum()
    }
}

#[derive(Default)]
struct PerStrategy {
    count: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

#[derive(Default)]
pub(crate) struct Counters {
    by: [PerStrategy; Strategy::ALL.len()],
    in_flight: AtomicU64,
    peak: AtomicU64,
    staging: AtomicU64,
    failed: AtomicU64,
}

/// A transfer in flight; counted out when dropped (finished, failed or abandoned).
pub(crate) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Staging memory held by a transfer; counted out when dropped.
pub(crate) struct StagingUse<'a>(&'a Counters, u64);

impl Drop for StagingUse<'_> {
    fn drop(&mut self) {
        self.0.staging.fetch_sub(self.1, Relaxed);
    }
}

impl Counters {
    pub(crate) fn start(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(now, Relaxed);
        InFlight(self)
    }

    pub(crate) fn staging(&self, bytes: usize) -> StagingUse<'_> {
        let bytes = bytes as u64;
        self.staging.fetch_add(bytes, Relaxed);
        StagingUse(self, bytes)
    }

    pub(crate) fn done(&self, strategy: Strategy, bytes: usize, elapsed: Duration) {
        let s = &self.by[strategy as usize];
        s.count.fetch_add(1, Relaxed);
        s.bytes.fetch_add(bytes as u64, Relaxed);
        s.nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> TransferStatistics {
        TransferStatistics {
            strategies: Strategy::ALL
                .iter()
                .zip(&self.by)
                .map(|(&strategy, s)| StrategyStatistics {
                    strategy,
                    count: s.count.load(Relaxed),
                    bytes: s.bytes.load(Relaxed),
                    seconds: s.nanos.load(Relaxed) as f64 * 1e-9,
                })
                .collect(),
            in_flight: self.in_flight.load(Relaxed),
            peak_in_flight: self.peak.load(Relaxed),
            staging_bytes: self.staging.load(Relaxed),
            failed: self.failed.load(Relaxed),
        }
    }
}
