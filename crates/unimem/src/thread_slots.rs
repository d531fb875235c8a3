//! One slot per thread inside one object: the per-thread caches of the size-class pools and
//! the per-thread buckets of an `ObjectPool`.
//!
//! Every live thread holds a small index, recycled when the thread exits (a free list
//! behind a mutex, touched once per thread lifetime). A `ThreadSlots<S>` keeps its slots in
//! buckets of 1, 2, 4, 8, ... entries, so that index `i` lives in bucket
//! `log2(i + 1)` and no bucket ever moves once published: a slot reference stays valid for
//! the life of the `ThreadSlots`.
//!
//! Why not the `thread_local` crate, which has the same layout? Its lookup re-registers a
//! thread id through `LocalKey::with` when called from a thread-local destructor, which
//! panics. An object-pool guard may well be dropped from a thread-local destructor, and a
//! guard's `Drop` must not panic. Here [`ThreadSlots::current`] returns `None` instead, and
//! the pool takes its shared path.
//!
//! A pool can ask to hear when a thread that used it exits ([`on_thread_exit`]): the thread
//! then hands its cache back before its index is freed for another thread.

use std::cell::{Cell, RefCell};
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::Weak;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Something that keeps per-thread state and wants it back when a thread exits.
pub(crate) trait ThreadExit: Send + Sync {
    /// The thread whose index is `index` is exiting; runs on that thread, from a
    /// thread-local destructor, before the index can go to another thread.
    fn thread_exited(&self, index: usize);
}

/// Bucket `b` holds `2^b` slots; this many buckets cover every `usize` index.
const BUCKETS: usize = usize::BITS as usize;

/// Sentinel for "this thread has no index yet".
const UNASSIGNED: usize = usize::MAX;

/// Where a thread's slot lives: bucket and offset, computed once per thread.
#[derive(Clone, Copy)]
struct Place {
    bucket: usize,
    offset: usize,
}

const NO_PLACE: Place = Place { bucket: UNASSIGNED, offset: 0 };

/// Indices of exited threads, reused lowest first so that the bucket arrays stay small.
static FREE_INDICES: Mutex<IndexAllocator> = Mutex::new(IndexAllocator { next: 0, free: Vec::new() });

struct IndexAllocator {
    next: usize,
    free: Vec<usize>,
}

impl IndexAllocator {
    fn allocate(&mut self) -> usize {
        // Lowest free index first keeps slot arrays dense after threads come and go.
        if let Some((at, _)) = self.free.iter().enumerate().min_by_key(|&(_, &i)| i) {
            return self.free.swap_remove(at);
        }
        let index = self.next;
        self.next += 1;
        index
    }
}

/// The calling thread's index (and where that index's slot lives); frees the index when
/// the thread exits.
struct ThreadIndex {
    index: Cell<usize>,
    place: Cell<Place>,
    /// Who to tell when this thread exits.
    on_exit: RefCell<Vec<Weak<dyn ThreadExit>>>,
}

impl Drop for ThreadIndex {
    fn drop(&mut self) {
        let index = self.index.get();
        if index != UNASSIGNED {
            // Before the index is freed: until then no other thread can own its slots.
            LAST.set((0, std::ptr::null()));
            for hook in self.on_exit.take() {
                if let Some(hook) = hook.upgrade() {
                    hook.thread_exited(index);
                }
            }
            // A hook may have reached a slot again; the index is freed after this.
            LAST.set((0, std::ptr::null()));
            // A poisoned lock still holds a consistent free list: every critical section
            // is a single push or pop.
            FREE_INDICES.lock().unwrap_or_else(PoisonError::into_inner).free.push(index);
        }
    }
}

thread_local! {
    static THREAD_INDEX: ThreadIndex = const {
        ThreadIndex { index: Cell::new(UNASSIGNED), place: Cell::new(NO_PLACE), on_exit: RefCell::new(Vec::new()) }
    };
}

/// A number for the calling thread, unique among all threads of the process (never reused,
/// unlike thread indices).
pub(crate) fn thread_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        static ID: Cell<u64> = const { Cell::new(0) };
    }
    ID.with(|id| {
        if id.get() == 0 {
            id.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        id.get()
    })
}

/// Calls `hook.thread_exited(index)` when the calling thread exits (unless the hook is gone
/// by then). Does nothing on a thread whose thread-locals are being destroyed.
pub(crate) fn on_thread_exit(hook: Weak<dyn ThreadExit>) {
    let _ = THREAD_INDEX.try_with(|slot| {
        let Ok(mut hooks) = slot.on_exit.try_borrow_mut() else { return };
        // Hooks of pools that are gone are dropped as the list doubles: the list stays
        // proportional to the pools alive, however many come and go on a long-lived thread.
        if hooks.len() >= 8 && hooks.len().is_power_of_two() {
            hooks.retain(|hook| hook.strong_count() > 0);
        }
        hooks.push(hook);
    });
}

/// Where the calling thread's slot lives, or `None` while its thread-locals are being
/// destroyed.
#[inline]
fn current_place() -> Option<Place> {
    THREAD_INDEX
        .try_with(|slot| {
            let place = slot.place.get();
            if place.bucket != UNASSIGNED { place } else { assign(slot) }
        })
        .ok()
}

#[cold]
fn assign(slot: &ThreadIndex) -> Place {
    let index = FREE_INDICES.lock().unwrap_or_else(PoisonError::into_inner).allocate();
    slot.index.set(index);
    let (bucket, offset) = locate(index);
    let place = Place { bucket, offset };
    slot.place.set(place);
    place
}

/// Bucket and offset of thread index `index`.
#[inline]
fn locate(index: usize) -> (usize, usize) {
    // `index + 1` cannot overflow: indices are bounded by the number of live threads.
    let n = index + 1;
    let bucket = (usize::BITS - 1 - n.leading_zeros()) as usize;
    (bucket, n - (1 << bucket))
}

/// Per-thread slots of type `S`, created on a thread's first access.
pub(crate) struct ThreadSlots<S> {
    buckets: [AtomicPtr<S>; BUCKETS],
    /// Unique among all `ThreadSlots` ever made (never reused), for [`LAST`].
    serial: u64,
}

/// Marks a [`LAST`] entry made while the asymmetric fence is not expedited, which
/// [`ThreadSlots::current_cached`] must not hit. Serials count up from 1 and never reach it.
const UNEXPEDITED: u64 = 1 << 63;

thread_local! {
    /// The slot this thread reached last: `(serial of its ThreadSlots, slot)`. A hit skips
    /// the index lookup. Cleared when the thread's index is freed, so that a slot handed
    /// to another thread is never reached through it.
    static LAST: Cell<(u64, *const ())> = const { Cell::new((0, std::ptr::null())) };
}

// SAFETY: a `ThreadSlots<S>` owns its `S` values, so sending it sends them (`S: Send`).
unsafe impl<S: Send> Send for ThreadSlots<S> {}
// SAFETY: `&ThreadSlots<S>` hands out `&S` to any thread (through `current` and `iter`),
// so `S` itself must be `Sync`. Buckets are published with release/acquire, so a thread
// that sees a bucket pointer sees its initialised slots.
unsafe impl<S: Sync> Sync for ThreadSlots<S> {}

impl<S: Default> ThreadSlots<S> {
    pub(crate) fn new() -> Self {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            buckets: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The calling thread's slot, or `None` while the thread's thread-locals are being
    /// destroyed. The same thread always gets the same slot; no other live thread gets it.
    /// A slot outlives its thread and is handed to a later thread that reuses the index
    /// (the index is freed and reallocated under a mutex, which orders the two threads).
    #[inline(always)]
    pub(crate) fn current(&self) -> Option<&S> {
        self.current_cached().or_else(|| self.current_slow())
    }

    /// The calling thread's slot if this thread reached this `ThreadSlots` last (no call,
    /// for hit paths that fall back to [`current`](Self::current) otherwise).
    ///
    /// It hits only while the asymmetric fence is expedited (`membarrier`): a hit path may
    /// then enter a cache with `Handoff::owner_expedited`, and the check of the fence scheme
    /// costs nothing per operation. Where the fence is not expedited every call misses, and
    /// [`current`](Self::current) finds the slot through the same thread-local entry.
    #[inline(always)]
    pub(crate) fn current_cached(&self) -> Option<&S> {
        let (serial, slot) = LAST.get();
        // SAFETY: `LAST` holds a slot of the `ThreadSlots` with this serial, which is `self`
        // (serials are never reused); slots never move while `self` lives, and the entry is
        // cleared before this thread's index (and so the slot) can pass on.
        (serial == self.serial).then(|| unsafe { &*slot.cast::<S>() })
    }

    #[inline(never)]
    fn current_slow(&self) -> Option<&S> {
        let (serial, slot) = LAST.get();
        if serial == self.serial | UNEXPEDITED {
            // SAFETY: as in `current_cached`, for the entry's other form.
            return Some(unsafe { &*slot.cast::<S>() });
        }
        let slot = self.lookup()?;
        let serial = if crate::sync::is_expedited() { self.serial } else { self.serial | UNEXPEDITED };
        LAST.set((serial, std::ptr::from_ref(slot).cast()));
        Some(slot)
    }

    fn lookup(&self) -> Option<&S> {
        let Place { bucket, offset } = current_place()?;
        // The mask only tells the compiler what `locate` guarantees (`bucket < BUCKETS`),
        // which removes a bounds check.
        let bucket = bucket & (BUCKETS - 1);
        // Acquire pairs with the release in `publish`: the slots behind the pointer are
        // initialised.
        let base = self.buckets[bucket].load(Ordering::Acquire);
        if base.is_null() {
            return Some(self.publish(bucket, offset));
        }
        // SAFETY: a non-null bucket pointer points to `2^bucket` initialised slots that live
        // until `self` is dropped, and `offset < 2^bucket` by `locate`.
        Some(unsafe { &*base.add(offset) })
    }

    #[cold]
    fn publish(&self, bucket: usize, offset: usize) -> &S {
        let fresh: Box<[S]> = (0..1usize << bucket).map(|_| S::default()).collect();
        let fresh = Box::into_raw(fresh).cast::<S>();
        let base = match self.buckets[bucket].compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh,
            Err(winner) => {
                // SAFETY: `fresh` came from `Box::into_raw` of a `2^bucket` slice just above
                // and was never published.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(fresh, 1 << bucket)) });
                winner
            }
        };
        // SAFETY: as in `current`.
        unsafe { &*base.add(offset) }
    }
}

impl<S> ThreadSlots<S> {
    /// The slot of thread index `index`, if its bucket exists.
    pub(crate) fn get(&self, index: usize) -> Option<&S> {
        let (bucket, offset) = locate(index);
        let base = self.buckets.get(bucket)?.load(Ordering::Acquire);
        // SAFETY: as in `current`.
        (!base.is_null()).then(|| unsafe { &*base.add(offset) })
    }

    /// Every slot created so far, from any thread.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &S> {
        self.buckets.iter().enumerate().flat_map(|(bucket, pointer)| {
            let base = pointer.load(Ordering::Acquire);
            let slots: &[S] = if base.is_null() {
                &[]
            } else {
                // SAFETY: as in `current`; the slice borrows `self`.
                unsafe { std::slice::from_raw_parts(base, 1 << bucket) }
            };
            slots.iter()
        })
    }

    /// Every slot, exclusively.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.buckets.iter_mut().enumerate().flat_map(|(bucket, pointer)| {
            let base = *pointer.get_mut();
            let slots: &mut [S] = if base.is_null() {
                &mut []
            } else {
                // SAFETY: as in `current`; `&mut self` excludes every other reference.
                unsafe { std::slice::from_raw_parts_mut(base, 1 << bucket) }
            };
            slots.iter_mut()
        })
    }
}

impl<S> Drop for ThreadSlots<S> {
    fn drop(&mut self) {
        for (bucket, pointer) in self.buckets.iter_mut().enumerate() {
            let base = *pointer.get_mut();
            if !base.is_null() {
                // SAFETY: published pointers come from `Box::into_raw` of a `2^bucket` slice
                // in `publish`, and `&mut self` means nobody borrows them any more.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(base, 1 << bucket)) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn locate_covers_indices_without_gaps() {
        let mut expected = (0, 0);
        for index in 0..10_000 {
            assert_eq!(locate(index), expected, "index {index}");
            expected.1 += 1;
            if expected.1 == 1 << expected.0 {
                expected = (expected.0 + 1, 0);
            }
        }
        assert_eq!(locate(usize::MAX - 1).0, BUCKETS - 1);
    }

    #[test]
    fn each_thread_gets_its_own_slot() {
        let slots = ThreadSlots::<AtomicUsize>::new();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    let mine = slots.current().unwrap();
                    for _ in 0..1000 {
                        // Non-atomic read-modify-write: a shared slot would lose increments.
                        mine.store(mine.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                    }
                    assert!(std::ptr::eq(mine, slots.current().unwrap()));
                });
            }
        });
        let total: usize = slots.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 8000);
    }
}
