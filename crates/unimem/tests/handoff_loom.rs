//! Model-checks the owner/stealer handoff of the per-thread caches (`src/handoff.rs`, the
//! same source file as the library's) with loom.
//!
//! Both sides of the asymmetric fence are modelled as `SeqCst` fences: that is what runs
//! where `membarrier` is missing, and what `membarrier` guarantees where it is used (a full
//! barrier on every running thread of the process, between the stealer's store and load).
//! loom's `UnsafeCell` fails the model if the owner's and a stealer's accesses to the cached
//! value are ever not ordered by happens-before, so every test below also checks that the
//! two sides never touch a cache at once.

#[allow(dead_code)]
mod sync {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::Mutex;
    pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};

    pub(crate) fn light_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }

    pub(crate) fn expedited_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }

    pub(crate) fn heavy_fence() -> bool {
        loom::sync::atomic::fence(Ordering::SeqCst);
        true
    }

    pub(crate) fn spin_wait(_round: &mut u32) {
        loom::thread::yield_now();
    }
}

#[allow(dead_code)]
#[path = "../src/handoff.rs"]
mod handoff;

use handoff::{Handoff, StealLock};
use loom::sync::{Arc, Mutex};

/// An owner keeping items in its cache (or, when a stealer has the cache, in a shared
/// fallback, as the pools do) while a stealer empties the cache: every item ends up in
/// exactly one place.
#[test]
fn an_item_is_kept_or_stolen_exactly_once() {
    loom::model(|| {
        let cache = Arc::new(Handoff::new(Vec::<u32>::new()));
        let fallback = Arc::new(Mutex::new(Vec::new()));
        let lock = Arc::new(StealLock::default());
        let stealer = {
            let (cache, lock) = (cache.clone(), lock.clone());
            loom::thread::spawn(move || {
                let mut stolen = Vec::new();
                assert!(lock.steal(&[&*cache], |_, items| stolen.append(items)));
                stolen
            })
        };
        for item in [1, 2] {
            // SAFETY: this thread is the cache's only owner.
            if unsafe { cache.owner(|items| items.push(item)) }.is_none() {
                fallback.lock().unwrap().push(item);
            }
        }
        let mut seen = stealer.join().unwrap();
        // SAFETY: as above; the stealer has finished.
        seen.extend(unsafe { cache.owner(std::mem::take) }.expect("no stealer is left"));
        seen.extend(fallback.lock().unwrap().drain(..));
        seen.sort_unstable();
        assert_eq!(seen, [1, 2]);
    });
}

/// The owner taking its cached item while a stealer takes the whole cache: the item is
/// handed out once. Both owner entries: `owner`, and `owner_expedited` of the pools' hit
/// paths (its compiler-only fence is modelled as what `membarrier` makes it, a `SeqCst`
/// fence against the stealer's).
#[test]
fn a_pop_and_a_steal_never_both_get_the_item() {
    for expedited in [false, true] {
        pop_against_steal(expedited);
    }
}

fn pop_against_steal(expedited: bool) {
    loom::model(move || {
        let cache = Arc::new(Handoff::new(vec![7u32]));
        let lock = Arc::new(StealLock::default());
        let stealer = {
            let (cache, lock) = (cache.clone(), lock.clone());
            loom::thread::spawn(move || {
                let mut stolen = Vec::new();
                lock.steal(&[&*cache], |_, items| stolen.append(items));
                stolen
            })
        };
        // SAFETY: this thread is the cache's only owner (and the model's fences stand for
        // either scheme).
        let popped =
            unsafe { if expedited { cache.owner_expedited(Vec::pop) } else { cache.owner(Vec::pop) } }
                .flatten();
        let stolen = stealer.join().unwrap();
        let got: Vec<u32> = popped.into_iter().chain(stolen).collect();
        assert_eq!(got, [7], "handed out exactly once");
    });
}

/// Two stealers (a miss on one thread, a trim on another) and one owner: the stealers are
/// serialised, and the three never touch the cache at once.
#[test]
fn two_stealers_and_an_owner_split_the_items() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let cache = Arc::new(Handoff::new(vec![1u32]));
        let lock = Arc::new(StealLock::default());
        let stealers: Vec<_> = (0..2)
            .map(|_| {
                let (cache, lock) = (cache.clone(), lock.clone());
                loom::thread::spawn(move || {
                    let mut stolen = Vec::new();
                    lock.steal(&[&*cache], |_, items| stolen.append(items));
                    stolen
                })
            })
            .collect();
        // SAFETY: this thread is the cache's only owner.
        let pushed = unsafe { cache.owner(|items| items.push(2)) }.is_some();
        let mut seen: Vec<u32> = stealers.into_iter().flat_map(|s| s.join().unwrap()).collect();
        // SAFETY: as above; the stealers have finished.
        seen.extend(unsafe { cache.owner(std::mem::take) }.expect("no stealer is left"));
        seen.sort_unstable();
        assert_eq!(seen, if pushed { vec![1, 2] } else { vec![1] });
    });
}
