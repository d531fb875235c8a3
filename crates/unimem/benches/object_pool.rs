//! `unimem::ObjectPool` against the Rust object-pool crates, in one run.
//!
//! Object: a `Vec<u8>` with 1 KiB of capacity; reset: `clear`. Every contender does the
//! same work per rent: push one byte, then give the object back cleared (by its reset hook
//! where the crate has one, by hand where it does not).
//!
//! Groups: `single` (one thread, rent+return), `two_threads` (two threads sharing one
//! pool, each rent+return; time per pair per thread), `take256` (rent 256, then return
//! them all; time per object), `pipeline` (one thread rents, another returns, 4 in flight;
//! time per object; unimem's hit rate is printed after the group). The floor is a `thread_local!` `Vec` stack: no pool can
//! do less work.
//!
//! Run: `cargo bench -p unimem --bench object_pool`

#![allow(missing_docs, reason = "criterion's macros generate undocumented functions")]

#[path = "support/pipeline.rs"]
mod pipeline;
#[path = "support/two_threads.rs"]
mod support;

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use lockfree_object_pool::{LinearObjectPool, SpinLockObjectPool};
use support::two_threads;
use unimem::ObjectPool;

const CAPACITY: usize = 1024;
const TAKE: usize = 256;
/// Room for every idle object any scenario leaves, so no contender drops objects.
const BOUND: usize = 4096;

fn fresh() -> Vec<u8> {
    Vec::with_capacity(CAPACITY)
}

/// One pool implementation: rent an object, use it, give it back.
trait Contender: Sync {
    fn name(&self) -> &'static str;
    /// One rent + use + return.
    fn cycle(&self);
    /// Rent `TAKE` objects, use each, then return them all.
    fn take_return(&self);
}

/// A pool whose guard derefs to the object and returns it (reset by the pool) on drop:
/// `$rent` takes one from `$pool`.
macro_rules! guard_contender {
    ($name:ident($inner:ty), $label:literal, |$pool:ident| $rent:expr) => {
        struct $name($inner);

        impl Contender for $name {
            fn name(&self) -> &'static str {
                $label
            }
            fn cycle(&self) {
                let $pool = &self.0;
                let mut obj = $rent;
                obj.push(1);
                black_box(&mut *obj);
            }
            fn take_return(&self) {
                let $pool = &self.0;
                let mut held = Vec::with_capacity(TAKE);
                for _ in 0..TAKE {
                    let mut obj = $rent;
                    obj.push(1);
                    held.push(obj);
                }
                black_box(&mut held);
            }
        }
    };
}

guard_contender!(Unimem(ObjectPool<Vec<u8>>), "unimem_object_pool", |pool| pool.rent());
guard_contender!(Linear(LinearObjectPool<Vec<u8>>), "lockfree_object_pool_linear", |pool| pool.pull());
guard_contender!(SpinLock(SpinLockObjectPool<Vec<u8>>), "lockfree_object_pool_spinlock", |pool| pool.pull());
guard_contender!(Opool(opool::Pool<VecAllocator, Vec<u8>>), "opool", |pool| pool.get());

/// `object-pool` has no reset hook: the object is cleared by hand before it goes back.
struct ObjectPoolCrate(object_pool::Pool<Vec<u8>>);

impl Contender for ObjectPoolCrate {
    fn name(&self) -> &'static str {
        "object_pool"
    }
    fn cycle(&self) {
        let mut obj = self.0.pull(fresh);
        obj.push(1);
        black_box(&mut *obj);
        obj.clear();
    }
    fn take_return(&self) {
        let mut held = Vec::with_capacity(TAKE);
        for _ in 0..TAKE {
            let mut obj = self.0.pull(fresh);
            obj.push(1);
            held.push(obj);
        }
        black_box(&mut held);
        for obj in &mut held {
            obj.clear();
        }
    }
}

struct VecAllocator;

impl opool::PoolAllocator<Vec<u8>> for VecAllocator {
    fn allocate(&self) -> Vec<u8> {
        fresh()
    }
    fn reset(&self, obj: &mut Vec<u8>) {
        obj.clear();
    }
}

/// `sharded-slab`'s pool keeps each slot's `Vec` and clears it (its `Clear` impl) when the
/// key is cleared: `create_with` is the rent, `clear` the return.
struct ShardedSlab(sharded_slab::Pool<Vec<u8>>);

impl ShardedSlab {
    fn rent(&self) -> usize {
        self.0
            .create_with(|obj| {
                if obj.capacity() == 0 {
                    obj.reserve(CAPACITY);
                }
                obj.push(1);
                black_box(obj);
            })
            .expect("sharded-slab is full")
    }
}

impl Contender for ShardedSlab {
    fn name(&self) -> &'static str {
        "sharded_slab_pool"
    }
    fn cycle(&self) {
        let key = self.rent();
        self.0.clear(key);
    }
    fn take_return(&self) {
        let mut held = Vec::with_capacity(TAKE);
        for _ in 0..TAKE {
            held.push(self.rent());
        }
        for key in held {
            self.0.clear(key);
        }
    }
}

struct Queue(ArrayQueue<Vec<u8>>);

impl Queue {
    fn rent(&self) -> Vec<u8> {
        let mut obj = self.0.pop().unwrap_or_else(fresh);
        obj.push(1);
        obj
    }
    fn give_back(&self, mut obj: Vec<u8>) {
        obj.clear();
        drop(self.0.push(obj));
    }
}

impl Contender for Queue {
    fn name(&self) -> &'static str {
        "crossbeam_array_queue"
    }
    fn cycle(&self) {
        let mut obj = self.rent();
        black_box(&mut obj);
        self.give_back(obj);
    }
    fn take_return(&self) {
        let mut held = Vec::with_capacity(TAKE);
        for _ in 0..TAKE {
            held.push(self.rent());
        }
        black_box(&mut held);
        for obj in held {
            self.give_back(obj);
        }
    }
}

thread_local! {
    static FLOOR: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// The floor: a per-thread `Vec` stack with no sharing, no bounds and no statistics.
struct ThreadLocalVec;

impl ThreadLocalVec {
    fn rent(&self) -> Vec<u8> {
        let mut obj = FLOOR.with(|s| s.borrow_mut().pop()).unwrap_or_else(fresh);
        obj.push(1);
        obj
    }
    fn give_back(&self, mut obj: Vec<u8>) {
        obj.clear();
        FLOOR.with(|s| s.borrow_mut().push(obj));
    }
}

impl Contender for ThreadLocalVec {
    fn name(&self) -> &'static str {
        "floor_thread_local_vec"
    }
    /// Rent, use and return within one borrow of the stack: the least work possible.
    fn cycle(&self) {
        FLOOR.with_borrow_mut(|stack| {
            let mut obj = stack.pop().unwrap_or_else(fresh);
            obj.push(1);
            black_box(&mut obj);
            obj.clear();
            stack.push(obj);
        });
    }
    fn take_return(&self) {
        let mut held = Vec::with_capacity(TAKE);
        for _ in 0..TAKE {
            held.push(self.rent());
        }
        black_box(&mut held);
        for obj in held {
            self.give_back(obj);
        }
    }
}

fn contenders() -> Vec<Box<dyn Contender>> {
    vec![
        Box::new(Unimem(
            // The default bounds: 256 per thread's bucket, 4096 in total.
            ObjectPool::builder(fresh).reset(|v| v.clear()).build().expect("valid bounds"),
        )),
        Box::new(ThreadLocalVec),
        Box::new(Linear(LinearObjectPool::new(fresh, |v| v.clear()))),
        Box::new(SpinLock(SpinLockObjectPool::new(fresh, |v| v.clear()))),
        Box::new(ObjectPoolCrate(object_pool::Pool::new(0, fresh))),
        Box::new(Opool(opool::Pool::new(BOUND, VecAllocator))),
        Box::new(ShardedSlab(sharded_slab::Pool::new())),
        Box::new(Queue(ArrayQueue::new(BOUND))),
    ]
}

fn single(c: &mut Criterion) {
    let mut group = c.benchmark_group("object_pool_single");
    for pool in contenders() {
        group.bench_function(pool.name(), |b| b.iter(|| pool.cycle()));
    }
    group.finish();
}

fn two_threads_sharing(c: &mut Criterion) {
    let mut group = c.benchmark_group("object_pool_two_threads");
    for pool in contenders() {
        group.bench_function(pool.name(), |b| b.iter_custom(|iters| two_threads(iters, || pool.cycle())));
    }
    group.finish();
}

fn take_then_return(c: &mut Criterion) {
    let mut group = c.benchmark_group("object_pool_take256");
    group.throughput(Throughput::Elements(TAKE as u64));
    for pool in contenders() {
        group.bench_function(pool.name(), |b| b.iter(|| pool.take_return()));
    }
    group.finish();
}

fn producer_consumer(c: &mut Criterion) {
    let mut group = c.benchmark_group("object_pool_pipeline");
    for (label, bound) in [("unimem_default_bounds", None), ("unimem_bounds_8_8", Some(8))] {
        let mut builder = ObjectPool::builder(fresh).reset(|v| v.clear());
        if let Some(bound) = bound {
            builder = builder.max_per_bucket(bound).max_total(bound);
        }
        let pool = std::sync::Arc::new(builder.build().expect("valid bounds"));
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                pipeline::pipeline(
                    iters,
                    || {
                        let mut obj = pool.rent_owned();
                        obj.push(1);
                        obj
                    },
                    drop,
                )
            })
        });
        let stats = pool.statistics();
        if stats.rents > 0 {
            eprintln!(
                "object_pool_pipeline/{label}: hit rate {:.2}% ({} rents, {} dropped past the bounds)",
                stats.hit_rate() * 100.0,
                stats.rents,
                stats.dropped
            );
        }
    }
    let queue = ArrayQueue::new(8);
    group.bench_function("crossbeam_array_queue_8", |b| {
        b.iter_custom(|iters| {
            pipeline::pipeline(
                iters,
                || {
                    let mut obj = queue.pop().unwrap_or_else(fresh);
                    obj.push(1);
                    obj
                },
                |mut obj: Vec<u8>| {
                    obj.clear();
                    let _ = queue.push(obj);
                },
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = single, two_threads_sharing, take_then_return, producer_consumer
}
criterion_main!(benches);
