//! A value owned by one thread that other threads can still reach: the per-thread caches of
//! both pools.
//!
//! The owner's side ([`Handoff::owner`]) takes no lock and runs no atomic read-modify-write:
//! two plain stores, one load and a compiler fence. (What a pool runs inside it may take a
//! lock that is never held while waiting for a cache, such as a shared store's: a stealer
//! then waits a little longer.) Another thread (a *stealer*: a miss
//! looking for idle blocks, `trim`, a pool being closed) takes the cache away from its owner
//! for a moment with [`StealLock::steal`]. The two sides meet in a Dekker handshake:
//!
//! ```text
//!   owner                                stealer (one at a time: StealLock)
//!   busy = true          (relaxed)       claimed = true      (relaxed)
//!   light_fence()                        heavy_fence()
//!   if claimed (acquire): back off       while busy (acquire): wait
//!   ... use the value ...                ... use the value ...
//!   busy = false         (release)       claimed = false     (release)
//! ```
//!
//! The two fences order like `SeqCst` fences (see [`sync`](super::sync)), so of the two
//! loads after them at least one sees the other side's store: either the owner sees
//! `claimed` and leaves the value alone, or the stealer sees `busy` and waits until the
//! owner's release of `busy`, which makes everything the owner wrote visible to it. In the
//! other direction, an owner that reads `claimed == false` as written by a stealer's release
//! sees everything that stealer wrote. An owner that finds its cache claimed does not wait:
//! it takes the pool's shared path for this operation, so the handshake never blocks the
//! owner.
//!
//! `tests/handoff_loom.rs` model-checks this file with loom, both fences modelled as
//! `SeqCst` fences (which is what `membarrier` guarantees and what runs without it).

use super::sync::{
    AtomicBool, Mutex, Ordering, UnsafeCell, expedited_fence, heavy_fence, light_fence, spin_wait,
};

/// A value with an owner thread and occasional stealers. See the module documentation.
///
/// The two flags sit on either side of the value, in words of their own: the owner loads
/// `claimed` right after it stores `busy`, and with the two in one word that load measured
/// slower (on AMD Zen, the 2-core machine of BENCHMARKS.md).
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct Handoff<T> {
    /// A stealer wants the value or has it. Written by stealers only, under their lock.
    claimed: AtomicBool,
    value: UnsafeCell<T>,
    /// The owner is using the value. Written by the owner only.
    busy: AtomicBool,
}

// SAFETY: the value is reached only by its owner inside `owner` or by one stealer inside
// `steal`, and the handshake above makes those exclusive and ordered; it may move between
// threads that way, hence `T: Send`.
unsafe impl<T: Send> Sync for Handoff<T> {}

/// Resets `busy` when the owner's closure returns or unwinds, so that a panic cannot leave
/// stealers waiting forever.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Release: the stealer that next reads `false` sees the owner's writes.
        self.0.store(false, Ordering::Release);
    }
}

impl<T> Handoff<T> {
    pub(crate) fn new(value: T) -> Self {
        Self { busy: AtomicBool::new(false), claimed: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// Runs `f` on the value, or returns `None` (without running it) while a stealer has it.
    ///
    /// # Safety
    /// Only the value's owner calls this: one thread at a time (an owner thread hands the
    /// value to the next one only through an order such as a mutex), and never from inside
    /// `f` (the inner call would end the outer one's exclusive access early).
    #[inline(always)]
    pub(crate) unsafe fn owner<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        // SAFETY: the caller's contract; `light_fence` fits either scheme.
        unsafe { self.enter(light_fence, f) }
    }

    /// As [`owner`](Self::owner), with the fence of the expedited scheme only: for a value
    /// reached through `ThreadSlots::current_cached`, which hits only while the heavy side
    /// of the fence is `membarrier`. Leaves out `light_fence`'s check of which scheme is in
    /// use (a load of a global and a branch on each hit).
    ///
    /// # Safety
    /// As for [`owner`](Self::owner), and the heavy fence is `membarrier` in this process.
    #[inline(always)]
    pub(crate) unsafe fn owner_expedited<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        // SAFETY: the caller's contract, which makes the compiler-only fence enough.
        unsafe { self.enter(expedited_fence, f) }
    }

    /// The owner's side of the handshake, with `fence` as its light fence.
    ///
    /// # Safety
    /// As for [`owner`](Self::owner), and `fence` orders like a `SeqCst` fence against the
    /// stealers' heavy fence.
    #[inline(always)]
    unsafe fn enter<R>(&self, fence: impl FnOnce(), f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.busy.store(true, Ordering::Relaxed);
        let busy = Busy(&self.busy);
        // Orders the store of `busy` before the load of `claimed` (with the stealer's heavy
        // fence: the handshake above).
        fence();
        // Acquire: pairs with the release of `claimed` by the last stealer.
        if self.claimed.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: no stealer is in (the handshake) and no other owner exists (the contract).
        let result = self.value.with_mut(
            #[inline(always)]
            |value| f(unsafe { &mut *value }),
        );
        drop(busy);
        Some(result)
    }

    /// The value, through exclusive access to the whole `Handoff`.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        // SAFETY: `&mut self` excludes every owner and stealer.
        self.value.with_mut(|value| unsafe { &mut *value })
    }
}

/// Serialises stealers: two at once would both think they have a value to themselves.
#[derive(Debug, Default)]
pub(crate) struct StealLock(Mutex<()>);

impl StealLock {
    /// Takes each of `cells` from its owner in turn and runs `f` on its value. All claims
    /// are made before one heavy fence, so stealing from many caches costs one barrier.
    /// Returns `false`, having run nothing, if the fence could not be run.
    pub(crate) fn steal<'a, T: 'a>(
        &self,
        cells: &[&'a Handoff<T>],
        mut f: impl FnMut(usize, &mut T),
    ) -> bool {
        if cells.is_empty() {
            return true;
        }
        // A poisoned lock guards nothing but the serialisation itself.
        let _serial = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for cell in cells {
            cell.claimed.store(true, Ordering::Relaxed);
        }
        let fenced = heavy_fence();
        for (n, cell) in cells.iter().enumerate() {
            if fenced {
                let mut round = 0;
                // Acquire: pairs with the owner's release of `busy`.
                while cell.busy.load(Ordering::Acquire) {
                    spin_wait(&mut round);
                }
                // SAFETY: the owner is out and will back off until `claimed` is cleared
                // (the handshake); other stealers wait on the lock held here.
                cell.value.with_mut(|value| f(n, unsafe { &mut *value }));
            }
            // Release: the owner's next acquire of `claimed` sees what `f` wrote.
            cell.claimed.store(false, Ordering::Release);
        }
        fenced
    }
}
