//! The object pool rows of table 1, on the host: `ObjectPool` renting and returning a
//! `Vec<u8>` of 1 KiB capacity (cleared on return, one byte pushed per rent), on one thread
//! and in a pipeline under tight bounds, against what a user would otherwise write: a
//! fresh `Vec` each time, `lockfree-object-pool`'s `LinearObjectPool`, and for the pipeline
//! a bounded `crossbeam` queue used as the pool.

use std::hint::black_box;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use lockfree_object_pool::LinearObjectPool;
use unimem::{DeviceId, ObjectPool, ObjectPoolStatistics};

use super::measure::Sampling;
use super::pipeline::run_once;
use super::raw::{Malloc, RawAllocator as _};
use super::report::{Row, Table};

/// Capacity of the pooled vectors, in bytes.
const CAPACITY: usize = 1024;

/// Bounds of the pipeline row's pool (`max_per_bucket` and `max_total`), and the capacity of
/// its queue baseline: tight enough that a pool which strands objects in one thread's bucket
/// drops them instead of reusing them.
const TIGHT: usize = 8;

fn fresh() -> Vec<u8> {
    Vec::with_capacity(CAPACITY)
}

fn pool(bound: Option<usize>) -> Arc<ObjectPool<Vec<u8>>> {
    let mut builder = ObjectPool::builder(fresh).reset(|v| v.clear());
    if let Some(bound) = bound {
        builder = builder.max_per_bucket(bound).max_total(bound);
    }
    Arc::new(builder.build().expect("valid bounds"))
}

/// The share of rents between `before` and `after` that reused an object, in percent.
fn hit_rate(before: &ObjectPoolStatistics, after: &ObjectPoolStatistics) -> f64 {
    let rents = after.rents - before.rents;
    100.0 * (after.hits - before.hits) as f64 / rents.max(1) as f64
}

/// Both rows, for the host device `device`.
pub fn rows(device: DeviceId, sampling: &Sampling, emit: &mut dyn FnMut(Row)) {
    // One thread: rent, use, return.
    let objects = pool(None);
    let lockfree = LinearObjectPool::new(fresh, |v| v.clear());
    let unimem = sampling.per_op(|| {
        let mut object = objects.rent();
        object.push(1);
        black_box(&mut *object);
    });
    let baselines = [
        (
            format!("new Vec ({})", Malloc.name()),
            sampling.per_op(|| {
                let mut object = fresh();
                object.push(1);
                black_box(&mut object);
            }),
        ),
        (
            "lockfree-object-pool".to_string(),
            sampling.per_op(|| {
                let mut object = lockfree.pull();
                object.push(1);
                black_box(&mut *object);
            }),
        ),
    ];
    let operation = "object pool rent + return (Vec<u8>)";
    emit(Row::measured(Table::Allocation, device, operation, CAPACITY as u64, unimem, baselines));

    // A pipeline: one thread rents, another returns, under tight bounds.
    let objects = pool(Some(TIGHT));
    let before = objects.statistics();
    let unimem = sampling.per_run(|| {
        Ok::<_, std::convert::Infallible>(run_once(
            || {
                let mut object = objects.rent_owned();
                object.push(1);
                object
            },
            |object| drop(black_box(object)),
        ))
    });
    let after = objects.statistics();
    let queue = ArrayQueue::new(TIGHT);
    let queued = sampling.per_run(|| {
        Ok::<_, std::convert::Infallible>(run_once(
            || {
                let mut object = queue.pop().unwrap_or_else(fresh);
                object.push(1);
                object
            },
            |mut object: Vec<u8>| {
                object.clear();
                let _ = black_box(queue.push(object));
            },
        ))
    });
    let (Ok(unimem), Ok(queued)) = (unimem, queued);
    let operation = format!(
        "object pool pipeline, bounds {TIGHT}/{TIGHT} ({:.1}% hits, {} dropped)",
        hit_rate(&before, &after),
        after.dropped - before.dropped
    );
    emit(Row::measured(
        Table::Allocation,
        device,
        operation,
        CAPACITY as u64,
        unimem,
        [(format!("crossbeam ArrayQueue of {TIGHT}"), queued)],
    ));
}
