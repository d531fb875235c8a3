//! The shared side of an `ObjectPool`: the overflow store that any thread can take from,
//! and the budget that keeps the total bound exact across all threads.
//!
//! Every idle object is paid for by one unit of the budget (`max_total` units at the start):
//! a thread's bucket claims units in batches before it keeps objects, the store claims one
//! per object it holds. So `budget + sum(bucket credit) + store length == max_total` at
//! every quiescent point, and the idle objects never exceed `max_total`.
//!
//! This file is also compiled by `tests/object_pool_loom.rs` against loom's `Mutex` and
//! atomics (through `super::sync`), which model-checks the handoff between threads.

use super::sync::{AtomicUsize, Mutex, Ordering};
use std::sync::PoisonError;

pub(crate) struct Shared<T> {
    items: Mutex<Vec<T>>,
    /// `items.len()`, readable without the lock: an empty store costs a rent one load.
    len: AtomicUsize,
    /// Units of the total bound not yet claimed by a bucket or by the store.
    budget: AtomicUsize,
}

impl<T> Shared<T> {
    pub(crate) fn new(max_total: usize) -> Self {
        Self { items: Mutex::new(Vec::new()), len: AtomicUsize::new(0), budget: AtomicUsize::new(max_total) }
    }

    /// Claims up to `want` units of the total bound; returns how many were granted.
    pub(crate) fn claim(&self, want: usize) -> usize {
        // The budget is a plain counter: no other memory is published through it, so
        // relaxed ordering is enough; the CAS makes every unit granted at most once.
        let mut available = self.budget.load(Ordering::Relaxed);
        loop {
            let granted = available.min(want);
            if granted == 0 {
                return 0;
            }
            match self.budget.compare_exchange_weak(
                available,
                available - granted,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return granted,
                Err(now) => available = now,
            }
        }
    }

    /// Gives back `units` claimed earlier.
    pub(crate) fn release(&self, units: usize) {
        if units > 0 {
            self.budget.fetch_add(units, Ordering::Relaxed);
        }
    }

    /// Keeps `item` if the total bound allows one more idle object; hands it back if not.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        if self.claim(1) == 0 {
            return Err(item);
        }
        self.push_one_paid(item);
        Ok(())
    }

    /// Keeps `item`, whose unit of the total bound the caller already holds and hands over.
    pub(crate) fn push_one_paid(&self, item: T) {
        // Nothing inside the lock can panic except an allocation failure in `push`, which
        // aborts; a poisoned lock therefore still guards a consistent vector.
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.push(item);
        self.len.store(items.len(), Ordering::Relaxed);
    }

    /// Keeps `items` whose units of the total bound the caller already holds and hands over
    /// (objects taken from a bucket with the bucket's credit for them).
    pub(crate) fn push_paid(&self, mut new: Vec<T>) {
        if new.is_empty() {
            return;
        }
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.append(&mut new);
        self.len.store(items.len(), Ordering::Relaxed);
    }

    /// Takes an idle object if there is one.
    pub(crate) fn pop(&self) -> Option<T> {
        // A stale zero only sends this rent to the factory; the object stays for the next
        // one. The mutex, not this load, orders the object's contents.
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let item = {
            let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
            let item = items.pop();
            self.len.store(items.len(), Ordering::Relaxed);
            item
        };
        if item.is_some() {
            self.release(1);
        }
        item
    }

    /// Removes every idle object (to be dropped by the caller, outside the lock).
    pub(crate) fn take_all(&self) -> Vec<T> {
        let items = {
            let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
            self.len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *items)
        };
        self.release(items.len());
        items
    }

    /// Idle objects in the store.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Units of the total bound not claimed by anyone.
    #[cfg_attr(not(test), allow(dead_code))] // read by tests only
    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }
}
