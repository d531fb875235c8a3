//! The two-thread timing harness shared by the criterion benches.

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `op` `iters` times on each of two threads started together; returns the longer
/// thread's time, so the figure is per operation per thread.
pub fn two_threads(iters: u64, op: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).max().unwrap_or_default()
    })
}
