//! `ObjectPool<T>` through its public API: reuse, reset, bounds, statistics, panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, mpsc};

use unimem::{Error, ObjectPool, ObjectPoolStatistics, Pooled};

/// An object that counts how many of its kind are alive, so tests see real drops.
struct Tracked {
    alive: Arc<AtomicUsize>,
    data: Vec<u8>,
}

impl Tracked {
    fn new(alive: &Arc<AtomicUsize>) -> Self {
        alive.fetch_add(1, Ordering::Relaxed);
        Self { alive: alive.clone(), data: Vec::with_capacity(64) }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

fn tracked_pool(per_bucket: usize, total: usize) -> (ObjectPool<Tracked>, Arc<AtomicUsize>) {
    let alive = Arc::new(AtomicUsize::new(0));
    let made_from = alive.clone();
    let pool = ObjectPool::builder(move || Tracked::new(&made_from))
        .reset(|t| t.data.clear())
        .max_per_bucket(per_bucket)
        .max_total(total)
        .build()
        .unwrap();
    (pool, alive)
}

/// At rest every object made is idle or accounted as gone, and `alive` (objects whose
/// `Drop` has not run) equals the idle count.
fn assert_balanced(stats: &ObjectPoolStatistics, alive: usize) {
    assert_eq!(stats.rents, stats.hits + stats.misses, "{stats:?}");
    assert_eq!(stats.live, 0, "{stats:?}");
    assert_eq!(
        stats.misses,
        stats.idle as u64 + stats.dropped + stats.detached + stats.reset_panics + stats.trimmed,
        "{stats:?}"
    );
    assert_eq!(stats.idle, alive, "idle objects are the only ones alive: {stats:?}");
    assert!(stats.idle <= stats.max_total, "{stats:?}");
}

#[test]
fn the_same_object_comes_back_reset() {
    let (pool, alive) = tracked_pool(8, 8);
    let first = {
        let mut obj = pool.rent();
        obj.data.extend_from_slice(b"used");
        obj.data.as_ptr()
    };
    let obj = pool.rent();
    assert_eq!(obj.data.as_ptr(), first, "the returned object is reused");
    assert!(obj.data.is_empty(), "the reset hook ran");
    assert!(obj.data.capacity() >= 64, "reset keeps what the object owns");
    drop(obj);
    let stats = pool.statistics();
    assert_eq!((stats.rents, stats.hits, stats.misses, stats.returns), (2, 1, 1, 2));
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
}

#[test]
fn without_reset_objects_come_back_as_left() {
    let pool = ObjectPool::new(Vec::<u32>::new);
    pool.rent().push(7);
    assert_eq!(*pool.rent(), [7]);
}

#[test]
fn objects_past_the_bounds_are_really_dropped() {
    let (pool, alive) = tracked_pool(100, 150);
    let rented: Vec<_> = (0..300).map(|_| pool.rent()).collect();
    assert_eq!(alive.load(Ordering::Relaxed), 300);
    drop(rented);
    let stats = pool.statistics();
    // 100 stay in this thread's bucket, 50 in the shared store, the rest are freed.
    assert_eq!(stats.idle, 150, "{stats:?}");
    assert_eq!(stats.dropped, 150, "{stats:?}");
    assert_eq!(alive.load(Ordering::Relaxed), 150, "their Drop ran");
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
}

#[test]
fn bounds_hold_under_eight_threads_with_cross_thread_returns() {
    let (pool, alive) = tracked_pool(16, 64);
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..8 {
            let (tx, rx) = mpsc::sync_channel::<Pooled<'_, Tracked>>(32);
            senders.push(tx);
            receivers.push(rx);
        }
        // Thread i rents and hands half of its objects to thread (i + 1) % 8, which
        // returns them on its own thread.
        for (i, rx) in receivers.into_iter().enumerate() {
            let tx = senders[(i + 1) % 8].clone();
            let pool = &pool;
            let alive = &alive;
            scope.spawn(move || {
                for round in 0..2_000 {
                    let mut held: Vec<_> = (0..(round % 24)).map(|_| pool.rent()).collect();
                    for obj in &mut held {
                        assert!(obj.data.is_empty(), "a rented object is always reset");
                        obj.data.push(i as u8);
                    }
                    for (k, obj) in held.into_iter().enumerate() {
                        if k % 2 == 0 {
                            // A full channel (its reader may have finished): return here.
                            drop(tx.try_send(obj));
                        }
                    }
                    while let Ok(obj) = rx.try_recv() {
                        drop(obj);
                    }
                    // Every object alive is idle (at most 64), held by a thread (at most 23
                    // each) or in a channel (at most 32 each): the rest were freed. (A
                    // statistics snapshot is not exact while threads work, so the check
                    // counts live objects instead.)
                    let alive = alive.load(Ordering::Relaxed);
                    assert!(alive <= 64 + 8 * (23 + 32), "{alive} objects alive");
                }
                drop(tx);
                rx
            });
        }
        drop(senders);
    });
    // The scope joined every thread; receivers were dropped with the threads' return
    // values, returning whatever was still in the channels.
    let stats = pool.statistics();
    assert!(stats.idle <= 64, "{stats:?}");
    assert!(stats.hits > stats.misses, "objects are reused across threads: {stats:?}");
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
}

#[test]
fn one_thread_renting_and_another_returning_does_not_grow_without_bound() {
    let (pool, alive) = tracked_pool(32, 128);
    let (pool, alive_now) = (&pool, &alive);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Pooled<'_, Tracked>>(16);
        scope.spawn(move || {
            for _ in 0..20_000 {
                tx.send(pool.rent()).unwrap();
            }
        });
        scope.spawn(move || {
            for obj in rx {
                drop(obj);
                assert!(alive_now.load(Ordering::Relaxed) <= 128 + 16 + 2);
            }
        });
    });
    let stats = pool.statistics();
    // The returner's bucket fills, the rest flows back through the shared store.
    assert!(stats.misses < 1_000, "{stats:?}");
    assert_eq!(stats.rents, 20_000);
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
}

#[test]
fn into_inner_detaches() {
    let (pool, alive) = tracked_pool(8, 8);
    let obj = Pooled::into_inner(pool.rent());
    assert_eq!(pool.statistics().detached, 1);
    assert_eq!(pool.statistics().live, 0);
    assert_eq!(alive.load(Ordering::Relaxed), 1, "the detached object lives on");
    drop(obj);
    assert_eq!(pool.statistics().idle, 0, "it never came back");
    assert_balanced(&pool.statistics(), alive.load(Ordering::Relaxed));
}

#[test]
fn a_panicking_factory_leaves_the_pool_unchanged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let pool = ObjectPool::new(move || {
        if seen.fetch_add(1, Ordering::Relaxed) == 1 {
            panic!("factory failed");
        }
        vec![0u8; 4]
    });
    drop(pool.rent());
    let held = pool.rent(); // the idle one
    let before = pool.statistics();
    assert!(catch_unwind(AssertUnwindSafe(|| pool.rent())).is_err());
    assert_eq!(pool.statistics(), before);
    drop(held);
    let after = pool.statistics();
    assert_eq!((after.idle, after.returns), (1, 2));
    drop(pool.rent());
}

#[test]
fn a_panicking_reset_drops_the_object_instead_of_keeping_it() {
    let alive = Arc::new(AtomicUsize::new(0));
    let made_from = alive.clone();
    let pool = ObjectPool::builder(move || Tracked::new(&made_from))
        .reset(|t| {
            if t.data == b"poison" {
                panic!("reset failed");
            }
            t.data.clear();
        })
        .build()
        .unwrap();
    drop(pool.rent());
    let err = catch_unwind(AssertUnwindSafe(|| {
        let mut obj = pool.rent();
        obj.data.extend_from_slice(b"poison");
    }));
    assert!(err.is_err(), "the panic propagates out of the guard's drop");
    let stats = pool.statistics();
    assert_eq!(stats.reset_panics, 1);
    assert_eq!(stats.idle, 0, "the half-reset object was not kept");
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
    let obj = pool.rent();
    assert!(obj.data.is_empty());
}

#[test]
fn a_reset_panic_while_unwinding_is_contained() {
    let pool = ObjectPool::builder(Vec::<u8>::new)
        .reset(|v| {
            if v.first() == Some(&0xAA) {
                panic!("reset failed during unwinding");
            }
        })
        .build()
        .unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut obj = pool.rent();
        obj.push(0xAA);
        panic!("user code failed while holding a pooled object");
    }));
    // A second panic escaping the guard's drop would have aborted the process.
    assert!(result.is_err());
    let stats = pool.statistics();
    assert_eq!((stats.reset_panics, stats.idle), (1, 0));
}

#[test]
fn trim_and_clear_drop_idle_objects() {
    let (mut pool, alive) = tracked_pool(64, 256);
    drop((0..100).map(|_| pool.rent()).collect::<Vec<_>>());
    std::thread::scope(|scope| {
        scope.spawn(|| drop((0..10).map(|_| pool.rent()).collect::<Vec<_>>()));
    });
    assert_eq!(alive.load(Ordering::Relaxed), 100);
    pool.trim();
    let stats = pool.statistics();
    assert!(stats.idle < 100 && stats.trimmed > 0, "{stats:?}");
    assert_balanced(&stats, alive.load(Ordering::Relaxed));
    pool.clear();
    assert_eq!(alive.load(Ordering::Relaxed), 0);
    assert_balanced(&pool.statistics(), 0);
}

#[test]
fn absurd_bounds_are_refused() {
    let err = ObjectPool::builder(|| 0u8).max_total(0).build().unwrap_err();
    assert!(matches!(err, Error::InvalidOption { option: "max_total", .. }), "{err}");
    let err = ObjectPool::builder(|| 0u8).max_per_bucket(10).max_total(5).build().unwrap_err();
    assert!(err.to_string().contains("max_per_bucket = 10"), "{err}");
    let pool = ObjectPool::builder(|| 0u8).max_per_bucket(0).max_total(1).build().unwrap();
    drop(pool.rent());
    assert_eq!(pool.statistics().idle, 1, "a zero bucket bound sends returns to the shared store");
}

#[test]
fn guards_dropped_by_thread_local_destructors_do_not_panic() {
    static POOL: LazyLock<ObjectPool<Vec<u8>>> = LazyLock::new(|| ObjectPool::new(Vec::new));
    struct Holder(Vec<Pooled<'static, Vec<u8>>>);
    thread_local! {
        static EARLY: std::cell::RefCell<Holder> = const { std::cell::RefCell::new(Holder(Vec::new())) };
    }
    std::thread::spawn(|| {
        // Returned only when the thread's locals are destroyed, in whatever order.
        EARLY.with(|h| h.borrow_mut().0.extend((0..4).map(|_| POOL.rent())));
        drop(POOL.rent());
    })
    .join()
    .expect("no panic at thread exit");
    let stats = POOL.statistics();
    assert_eq!((stats.misses, stats.returns, stats.live), (5, 5, 0), "{stats:?}");
}

#[test]
fn pool_and_guards_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<ObjectPool<Vec<u8>>>();
    assert_send::<Pooled<'static, Vec<u8>>>();
    let stats = ObjectPool::new(|| 1u8).statistics();
    assert_eq!(
        stats.to_string(),
        "Rents: 0, Hit rate: 0.0%, Made: 0, Idle: 0, Live: 0, Dropped past bound: 0"
    );
}

#[test]
fn a_total_bound_below_the_default_bucket_bound_lowers_the_bucket_bound() {
    let pool = ObjectPool::builder(|| 0u8).max_total(8).build();
    let pool = match pool {
        Ok(pool) => pool,
        Err(err) => panic!("max_total(8) alone must build: {err}"),
    };
    assert_eq!((pool.max_per_bucket(), pool.max_total()), (8, 8));
    // An explicit bucket bound past the total is still refused.
    let err = ObjectPool::builder(|| 0u8).max_per_bucket(9).max_total(8).build().unwrap_err();
    assert!(matches!(err, Error::InvalidOption { option: "max_per_bucket", .. }), "{err}");
}
