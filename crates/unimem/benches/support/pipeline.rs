//! The producer/consumer harness shared by the criterion benches and the main job's
//! pipeline rows (`unimem bench`): one thread makes items, another drops them, through a
//! small lock-free queue (so that the queue costs little beside what is measured, and the
//! same on every side).

use crossbeam_queue::ArrayQueue;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Items in flight between the two threads.
pub const DEPTH: usize = 4;

/// Runs `make` `iters` times on this thread and `consume` on each item on another; returns
/// the time from the first `make` until the last item was consumed, so the figure is per
/// item handed over. Starting the consumer thread is not timed.
pub fn pipeline<T: Send>(
    iters: u64,
    mut make: impl FnMut() -> T,
    consume: impl Fn(T) + Send + Sync,
) -> Duration {
    let queue = ArrayQueue::new(DEPTH);
    let ready = Barrier::new(2);
    std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            ready.wait();
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
        ready.wait();
        let start = Instant::now();
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
