//! The producer/consumer harness shared by the criterion benches: one thread makes items,
//! another drops them, through a small lock-free queue (so that the queue costs little
//! beside what is measured, and the same on every side).

use crossbeam_queue::ArrayQueue;
use std::time::{Duration, Instant};

/// Items in flight between the two threads.
pub const DEPTH: usize = 4;

/// Runs `make` `iters` times on this thread and `consume` on each item on another; returns
/// the time until the last item was consumed, so the figure is per item handed over.
pub fn pipeline<T: Send>(iters: u64, make: impl Fn() -> T, consume: impl Fn(T) + Send + Sync) -> Duration {
    let queue = ArrayQueue::new(DEPTH);
    std::thread::scope(|s| {
        let start = Instant::now();
        let consumer = s.spawn(|| {
            for _ in 0..iters {
                let item = loop {
                    match queue.pop() {
                        Some(item) => break item,
                        None => std::hint::spin_loop(),
                    }
                };
                consume(item);
            }
        });
        for _ in 0..iters {
            let mut item = make();
            while let Err(back) = queue.push(item) {
                item = back;
                std::hint::spin_loop();
            }
        }
        consumer.join().expect("consumer thread");
        start.elapsed()
    })
}
