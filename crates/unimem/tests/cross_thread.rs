//! Reuse across threads: one thread allocates and another drops (the shape of a pipeline),
//! for the size-class pool and the object pool; the cache of a thread that exited; exact
//! bounds and balanced statistics under 8 threads.

use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use unimem::{AllocationMode, Buffer, MemoryManager, MemoryOptions, MemoryStatistics, ObjectPool};

const WARM_UP: u64 = 8;

/// Allocates `count` buffers of `bytes` on this thread and drops them on another, through a
/// channel of depth 1. With `consumer_allocates`, the consumer first allocates and drops a
/// buffer of the same class itself, so that it has a cache of its own there (as a worker
/// that also allocates would). Returns the hits and allocations after the warm-up.
fn pipeline(manager: &MemoryManager, bytes: usize, count: u64, consumer_allocates: bool) -> (u64, u64) {
    let (tx, rx) = sync_channel::<(u64, Buffer<u8>)>(1);
    let mut warm = None;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            if consumer_allocates {
                drop(manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap());
            }
            for (n, buffer) in rx {
                assert_eq!(buffer.as_slice().unwrap()[0], n as u8, "the consumer sees the producer's write");
            }
        });
        for n in 0..count {
            if n == WARM_UP {
                warm = Some(manager.statistics());
            }
            let mut buffer = manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap();
            buffer.as_mut_slice().unwrap()[0] = n as u8;
            tx.send((n, buffer)).unwrap();
        }
        drop(tx);
    });
    let (before, after) = (warm.unwrap(), manager.statistics());
    assert_eq!(after.active_buffers, 0, "{after}");
    let allocations = (after.pool_hits + after.pool_misses) - (before.pool_hits + before.pool_misses);
    (after.pool_hits - before.pool_hits, allocations)
}

fn assert_reuse(what: &str, (hits, allocations): (u64, u64)) {
    assert!(
        hits * 10 >= allocations * 9,
        "{what}: {hits} of {allocations} allocations after the warm-up hit the pool (at least 90% expected)"
    );
}

#[test]
fn a_pipeline_reuses_its_buffers_at_default_bounds() {
    for (bytes, count) in [(4 << 10, 2000), (1 << 20, 400), (256 << 20, 32)] {
        for consumer_allocates in [false, true] {
            let manager = MemoryManager::new();
            let what = format!("{bytes} bytes, consumer allocates: {consumer_allocates}");
            assert_reuse(&what, pipeline(&manager, bytes, count, consumer_allocates));
        }
    }
}

#[test]
fn a_pipeline_reuses_its_buffers_under_a_tight_class_bound() {
    for consumer_allocates in [false, true] {
        let options = MemoryOptions::default().with_max_pool_bytes_per_class(4 << 10).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let stats = pipeline(&manager, 1 << 10, 2000, consumer_allocates);
        assert_reuse(
            &format!("1 KiB under a 4 KiB class bound, consumer allocates: {consumer_allocates}"),
            stats,
        );
        assert!(manager.statistics().total_pooled <= 4 << 10);
    }
}

#[test]
fn an_exited_threads_cache_goes_back_to_the_pool() {
    let manager = MemoryManager::new();
    std::thread::scope(|scope| {
        // Joined, not left to the scope: a thread's exit (its thread-locals' destructors,
        // which hand its cache back) is over only once `join` returns.
        let exiting = scope.spawn(|| {
            let held: Vec<_> =
                (0..4).map(|_| manager.allocate::<u8>(64 << 10, AllocationMode::Pooled).unwrap()).collect();
            drop(held);
        });
        exiting.join().unwrap();
    });
    let before = manager.statistics();
    assert_eq!(before.total_pooled, 4 * (64 << 10), "{before}");
    let again: Vec<_> =
        (0..4).map(|_| manager.allocate::<u8>(64 << 10, AllocationMode::Pooled).unwrap()).collect();
    let after = manager.statistics();
    assert_eq!(
        (after.pool_hits - before.pool_hits, after.pool_misses - before.pool_misses),
        (4, 0),
        "another thread reuses every block the exited thread held: {after}"
    );
    drop(again);
    // And a trim on any thread reaches them.
    std::thread::scope(|scope| {
        scope.spawn(|| manager.trim());
    });
    assert_eq!(manager.statistics().total_pooled, 0);
}

#[test]
fn a_trim_on_one_thread_empties_every_threads_cache() {
    let manager = MemoryManager::new();
    let (ready, wait) = sync_channel::<()>(0);
    let (done, finish) = sync_channel::<()>(0);
    std::thread::scope(|scope| {
        let manager = &manager;
        scope.spawn(move || {
            drop(manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap());
            ready.send(()).unwrap();
            finish.recv().unwrap(); // alive while the other thread trims
        });
        wait.recv().unwrap();
        assert_eq!(manager.statistics().total_pooled, 1 << 20);
        manager.trim();
        assert_eq!(manager.statistics().total_pooled, 0, "the live thread's cache was trimmed");
        done.send(()).unwrap();
    });
}

#[test]
fn bounds_hold_and_statistics_balance_under_eight_threads() {
    let (per_class, total) = (64 << 10, 256 << 10);
    let options = MemoryOptions::default()
        .with_max_pool_bytes_per_class(per_class)
        .unwrap()
        .with_max_pool_bytes(total)
        .unwrap();
    let manager = MemoryManager::builder().options(options).build();
    let rounds = 3000u64;
    let (tx, rx) = sync_channel::<Buffer<u8>>(16);
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for thread in 0..8u64 {
            let (manager, tx, rx) = (&manager, tx.clone(), &rx);
            threads.push(scope.spawn(move || {
                let mut held = Vec::new();
                for round in 0..rounds {
                    let bytes = [1 << 10, 4 << 10, 16 << 10, 48 << 10][((round + thread) % 4) as usize];
                    held.push(manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap());
                    if round % 3 == 0 {
                        // Half the returns happen on another thread.
                        let _ = tx.try_send(held.remove(0));
                    } else if held.len() > 4 {
                        held.remove(0);
                    }
                    if let Ok(buffer) = rx.lock().unwrap().try_recv() {
                        drop(buffer);
                    }
                    if round % 500 == 0 {
                        let stats = manager.statistics();
                        assert!(stats.total_pooled <= total, "{stats}");
                        for pool in &stats.pools {
                            for class in &pool.classes {
                                assert!(class.class_bytes * class.buffers <= per_class, "{stats}");
                            }
                        }
                    }
                }
            }));
        }
        // Joined, not left to the scope: the exiting threads hand their caches back in
        // their thread-locals' destructors, which the scope's own wait does not cover.
        for thread in threads {
            thread.join().unwrap();
        }
    });
    drop(tx);
    drop(rx);
    let stats = manager.statistics();
    assert_eq!(stats.active_buffers, 0, "{stats}");
    assert_eq!(stats.pool_hits + stats.pool_misses, 8 * rounds, "{stats}");
    assert_eq!(stats.total_allocated, 0, "{stats}");
    assert_eq!(stats.total_pooled, stats.total_reserved - stats.pending_free, "{stats}");
    assert!(stats.total_pooled <= total, "{stats}");
    assert!(stats.hit_rate() > 0.5, "{stats}");
}

/// Rents `count` objects on this thread and drops them on another; returns the hits and
/// rents after the warm-up, and the objects dropped past the bounds.
fn object_pipeline(pool: &Arc<ObjectPool<Vec<u8>>>, count: u64, consumer_rents: bool) -> (u64, u64, u64) {
    let (tx, rx) = sync_channel(1);
    let mut warm = None;
    std::thread::scope(|scope| {
        let consumer_pool = Arc::clone(pool);
        scope.spawn(move || {
            if consumer_rents {
                drop(consumer_pool.rent());
            }
            for object in rx {
                drop(object);
            }
        });
        for n in 0..count {
            if n == WARM_UP {
                warm = Some(pool.statistics());
            }
            tx.send(pool.rent_owned()).unwrap();
        }
        drop(tx);
    });
    let (before, after) = (warm.unwrap(), pool.statistics());
    assert_eq!(after.live, 0, "{after:?}");
    (after.hits - before.hits, after.rents - before.rents, after.dropped)
}

#[test]
fn an_object_pipeline_reuses_its_objects() {
    for (max_per_bucket, max_total) in [(None, None), (Some(8), Some(8)), (Some(1), Some(4))] {
        for consumer_rents in [false, true] {
            let mut builder = ObjectPool::builder(|| Vec::<u8>::with_capacity(64));
            if let Some(bound) = max_per_bucket {
                builder = builder.max_per_bucket(bound);
            }
            if let Some(bound) = max_total {
                builder = builder.max_total(bound);
            }
            let pool = Arc::new(builder.build().unwrap());
            let (hits, rents, dropped) = object_pipeline(&pool, 1000, consumer_rents);
            let what = format!("bounds {max_per_bucket:?}/{max_total:?}, consumer rents: {consumer_rents}");
            assert_reuse(&what, (hits, rents));
            assert!(dropped <= 100, "{what}: {dropped} objects dropped past the bounds");
        }
    }
}

#[test]
fn an_exited_threads_bucket_is_reused() {
    let pool = ObjectPool::new(|| [0u8; 32]);
    std::thread::scope(|scope| {
        scope.spawn(|| drop((0..5).map(|_| pool.rent()).collect::<Vec<_>>()));
    });
    let before = pool.statistics();
    assert_eq!(before.idle, 5);
    let again: Vec<_> = (0..5).map(|_| pool.rent()).collect();
    let after = pool.statistics();
    assert_eq!((after.hits - before.hits, after.misses - before.misses), (5, 0), "{after:?}");
    drop(again);
}

/// The size-class pool in lockstep: 50 rounds in which this thread allocates three 4 KiB
/// buffers and a consumer thread drops them. The consumer runs `before` once, then
/// `each_round` before it drops each batch. Returns the statistics after the first two
/// rounds and at the end.
fn lockstep(
    before: impl Fn(&MemoryManager) + Send,
    each_round: impl Fn(&MemoryManager) + Send,
) -> (MemoryStatistics, MemoryStatistics) {
    let manager = &MemoryManager::new();
    let (to_consumer, batches) = sync_channel::<Vec<Buffer<u8>>>(0);
    let (freed, consumed) = sync_channel::<()>(0);
    let mut warm = None;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            before(manager);
            freed.send(()).unwrap();
            for batch in batches {
                each_round(manager);
                drop(batch);
                freed.send(()).unwrap();
            }
        });
        consumed.recv().unwrap();
        for round in 0..50 {
            let batch: Vec<_> =
                (0..3).map(|_| manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap()).collect();
            to_consumer.send(batch).unwrap();
            consumed.recv().unwrap();
            if round == 1 {
                warm = Some(manager.statistics());
            }
        }
        drop(to_consumer);
    });
    (warm.unwrap(), manager.statistics())
}

/// The size-class pool in lockstep (one thread allocates a batch, another, which has a
/// cache, drops it, in turn): once the producer has had to take blocks from outside its
/// cache, the consumer's returns answer that demand and reach the shared store, so the
/// producer takes them from there and never has to steal them out of the consumer's cache.
/// (When a return answered only if its cache already held a block of the class, the
/// consumer kept the first return of every round and the producer stole it back every
/// round.)
#[test]
fn a_consumer_that_only_frees_keeps_no_block_back() {
    // A worker that also allocates, as in `pipeline`'s `consumer_allocates` (a thread that
    // only frees gets its cache at its first return instead).
    let (warm, end) =
        lockstep(|manager| drop(manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap()), |_| {});
    assert_eq!(end.pool_steals, warm.pool_steals, "steals after the first two rounds: {end:?}");
    assert_eq!((end.pool_hits + end.pool_misses, end.pool_misses), (151, warm.pool_misses), "{end:?}");
}

/// The same pipeline, with a consumer that also works with buffers of its own, of another
/// class, every round: its allocations of that class do not make it keep back the first
/// return of the producer's class each round, which the producer would then steal. (The
/// signal was the thread's allocations of every class: the consumer kept one block of the
/// producer's class per round, and the producer stole it back 48 times in 48 rounds.)
#[test]
fn a_consumer_that_allocates_another_class_keeps_no_block_of_the_producers_back() {
    // Its own work, in 64 KiB buffers, before it drops the producer's 4 KiB ones.
    let (warm, end) =
        lockstep(|_| {}, |manager| drop(manager.allocate::<u8>(64 << 10, AllocationMode::Pooled).unwrap()));
    assert_eq!(end.pool_steals, warm.pool_steals, "steals after the first two rounds: {end:?}");
    assert_eq!(end.pool_misses, warm.pool_misses, "misses after the first two rounds: {end:?}");
}

/// The same pipeline, with a consumer whose own work uses buffers of the producer's class:
/// its allocation from the shared store raises demand of its own, which the return of that
/// buffer pays, so the producer's blocks still go back through the store and are never
/// stolen after warm-up. (When only a return that would otherwise have gone to the store
/// paid what a thread owed, the consumer kept the producer's blocks and the producer stole
/// them back, a few times per run.)
#[test]
fn a_consumer_that_allocates_the_producers_class_keeps_no_block_of_the_producers_back() {
    let (warm, end) =
        lockstep(|_| {}, |manager| drop(manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap()));
    assert_eq!(end.pool_steals, warm.pool_steals, "steals after the first two rounds: {end:?}");
}
