//! Model-checks the shared store of `ObjectPool` with loom: the same source file as the
//! library's, compiled here against loom's `Mutex` and atomics.

#[allow(dead_code)]
mod sync {
    pub(crate) use loom::sync::Mutex;
    pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};
}

#[allow(dead_code)]
#[path = "../src/object_pool/shared.rs"]
mod shared;

use loom::sync::Arc;
use shared::Shared;

/// An object handed to the store on one thread is taken on another exactly once, or stays
/// in the store; the total bound accounts for it either way.
#[test]
fn handoff_loses_and_duplicates_nothing() {
    loom::model(|| {
        let store = Arc::new(Shared::new(2));
        let giver = {
            let store = store.clone();
            loom::thread::spawn(move || [store.push(1u32).is_ok(), store.push(2u32).is_ok()])
        };
        let taken = store.pop();
        let kept = giver.join().unwrap();
        let mut seen: Vec<u32> = taken.into_iter().chain(store.take_all()).collect();
        seen.sort_unstable();
        let expected: Vec<u32> = [1, 2].into_iter().zip(kept).filter(|&(_, k)| k).map(|(v, _)| v).collect();
        assert_eq!(seen, expected);
        assert_eq!(store.budget(), 2, "every unit comes back once the store is empty");
    });
}

/// Two threads taking from the store and one giving: nothing is handed out twice, and
/// `budget + len` stays the total bound. Three threads explode the state space: loom's
/// preemption bound of 3 keeps it to seconds (the bound its documentation suggests).
#[test]
fn concurrent_takers_split_the_objects() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let store = Arc::new(Shared::new(3));
        store.push(10u32).unwrap();
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                loom::thread::spawn(move || store.pop())
            })
            .collect();
        let kept = store.push(20u32).is_ok();
        assert!(kept, "the bound of 3 has room");
        let mut seen: Vec<u32> = takers.into_iter().filter_map(|t| t.join().unwrap()).collect();
        assert_eq!(store.budget() + store.len(), 3);
        seen.extend(store.take_all());
        seen.sort_unstable();
        assert_eq!(seen, [10, 20]);
    });
}

/// Buckets claiming room concurrently never get more than the bound in total.
#[test]
fn claims_never_exceed_the_bound() {
    loom::model(|| {
        let store = Arc::new(Shared::<u32>::new(3));
        let claimers: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                loom::thread::spawn(move || store.claim(2))
            })
            .collect();
        let granted: Vec<usize> = claimers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(granted.iter().sum::<usize>(), 3, "{granted:?}");
        assert_eq!(store.budget(), 0);
        assert!(store.push(1).is_err(), "no room is left for the store");
        store.release(3);
        assert_eq!(store.budget(), 3);
    });
}
