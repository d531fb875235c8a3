//! [`ObjectPool<T>`]: reusable objects with a per-thread fast path.
//!
//! Each thread that uses a pool gets its own bucket (a LIFO stack), reached through a
//! thread-local index and the [`handoff`](crate::handoff) protocol: renting and returning on
//! the same thread touch no atomic read-modify-write and no lock. Objects that do not fit in
//! the returning thread's bucket go to a shared overflow store, where any thread's `rent`
//! finds them; past the bounds they are dropped. The total bound is exact across threads:
//! see `shared.rs`.
//!
//! A rent that finds its own bucket empty looks in the shared store, then takes the idle
//! objects of other threads' buckets (with the share of the total bound that paid for them),
//! and only then calls the factory: no object idles in one bucket while another thread's
//! rent makes a new one. When rents are served from outside their own bucket (one thread
//! rents, another returns, as in a pipeline), each asks through a *demand* counter for one
//! return to go to the shared store instead of the returning thread's bucket, so that the
//! objects flow to where they are rented without a steal each time. A return answers if its
//! bucket already holds an idle object, or if its thread has rented nothing since it last
//! kept an object under demand (a pipeline's consumer, which only returns: it keeps nothing
//! back, or the one object it kept would be the one the producer misses, and steals for). A
//! thread that rents and returns one object at a time finds its bucket empty at each return
//! and has rented since, so it keeps its objects, and two such threads never trade objects
//! through the store. A thread *owes* the demand its own rents raised until its returns
//! pay it: while it owes some, each of its returns under demand pays one unit, by staying
//! and withdrawing the request (or, if it cannot stay, through the store). So a thread that
//! rents and returns in batches under standing demand answers it once and then keeps its
//! objects, rather than pass part of every batch through the store and take it back (which
//! raises the demand again). The check costs the hit path nothing while there is no
//! demand. (A bucket passes to a later thread with its slot, and with what it owed: at most
//! twice [`CREDIT_BATCH`] returns that stay rather than answer.) A bucket that runs empty
//! gives its unused share of the total bound back, so an idle thread holds at most
//! [`CREDIT_BATCH`] unused units; and a return that finds the bound reached while the idle
//! objects leave part of it unused takes every bucket's unused share back first (a thread
//! whose objects are rented out again would otherwise hold the bound against every other
//! thread's returns).

mod guard;
mod shared;

use std::convert::Infallible;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::handoff::{Handoff, StealLock};
use crate::thread_slots::ThreadSlots;
pub use guard::{Pooled, PooledOwned};
use shared::Shared;

/// The primitives `shared.rs` is written against; its loom test swaps in loom's.
mod sync {
    pub(crate) use std::sync::Mutex;
    pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};
}

/// Units of the total bound a bucket claims at once when it needs room.
pub const CREDIT_BATCH: usize = 32;

/// Most returns the demand can ask for at once (see the module documentation).
const MAX_DEMAND: usize = 2 * CREDIT_BATCH;

/// Default bound on the idle objects of one thread's bucket.
pub const DEFAULT_MAX_PER_BUCKET: usize = 256;

/// Default bound on all idle objects of a pool.
pub const DEFAULT_MAX_TOTAL: usize = 4096;

/// How the pool holds an object: boxed, so that a rent or a return moves one pointer
/// (moving a `Vec`'s three words through the bucket caused store-forwarding stalls that
/// measured at twice the time of the whole pair), and padded to a cache line of its own,
/// so that objects used by different threads never share one.
type Slot<T> = Box<CachePadded<T>>;

type Factory<T> = Box<dyn Fn() -> T + Send + Sync>;
type Reset<T> = Box<dyn Fn(&mut T) + Send + Sync>;

/// A pool of reusable objects. See the [module documentation](self) for the design.
///
/// ```
/// use unimem::ObjectPool;
///
/// let pool = ObjectPool::builder(|| Vec::<u8>::with_capacity(1024))
///     .reset(|v| v.clear())
///     .build()?;
/// let first = {
///     let mut buf = pool.rent();
///     buf.extend_from_slice(b"hello");
///     buf.as_ptr()
/// }; // returned, and cleared, here
/// let again = pool.rent();
/// assert_eq!(again.as_ptr(), first); // the same object came back
/// assert!(again.is_empty());
/// # Ok::<(), unimem::Error>(())
/// ```
pub struct ObjectPool<T> {
    /// Padded: neighbouring threads' buckets must not share a cache line.
    locals: ThreadSlots<CachePadded<Local<T>>>,
    shared: Shared<Slot<T>>,
    /// Serialises rents taking objects out of other threads' buckets.
    steal_lock: StealLock,
    /// Returns wanted in the shared store (see the module documentation). Padded: rents
    /// and returns on every thread read it.
    demand: CachePadded<AtomicUsize>,
    /// Events of threads with no bucket (during thread-local teardown).
    counters: Counters,
    factory: Factory<T>,
    reset: Option<Reset<T>>,
    max_per_bucket: usize,
    max_total: usize,
}

impl<T> ObjectPool<T> {
    /// A pool whose new objects come from `factory`, with the default bounds and no reset
    /// hook.
    pub fn new(factory: impl Fn() -> T + Send + Sync + 'static) -> Self {
        Self::with_parts(Box::new(factory), None, DEFAULT_MAX_PER_BUCKET, DEFAULT_MAX_TOTAL)
    }

    /// Starts a pool with options: reset hook and bounds.
    pub fn builder(factory: impl Fn() -> T + Send + Sync + 'static) -> ObjectPoolBuilder<T> {
        ObjectPoolBuilder {
            factory: Box::new(factory),
            reset: None,
            max_per_bucket: None,
            max_total: DEFAULT_MAX_TOTAL,
        }
    }

    fn with_parts(
        factory: Factory<T>,
        reset: Option<Reset<T>>,
        max_per_bucket: usize,
        max_total: usize,
    ) -> Self {
        // Before any bucket exists, as for the memory pools: the owners' and stealers'
        // sides must agree on the fence scheme from the first use on.
        crate::sync::init_asymmetric_fence();
        Self {
            locals: ThreadSlots::new(),
            shared: Shared::new(max_total),
            steal_lock: StealLock::default(),
            demand: CachePadded::new(AtomicUsize::new(0)),
            counters: Counters::default(),
            factory,
            reset,
            max_per_bucket,
            max_total,
        }
    }

    /// Takes an idle object (this thread's bucket first, then the shared store, then other
    /// threads' buckets) or makes a new one with the factory. The guard returns it when
    /// dropped.
    ///
    /// A panic in the factory propagates and leaves the pool unchanged.
    #[inline]
    pub fn rent(&self) -> Pooled<'_, T> {
        Pooled::new(self, self.take_or_make_new())
    }

    /// Like [`rent`](Self::rent), but a new object comes from `make`, which may fail: an
    /// idle object is taken if there is one (and `make` is not called), otherwise `make`
    /// runs and its error comes back as is. A failed `make` counts as no rent and leaves
    /// the pool unchanged; a successful one counts as a miss, as the pool's factory does.
    ///
    /// The fallible factory is an argument of the call rather than a property of the pool
    /// (as in `OnceCell::get_or_try_init`): it can use what the call has at hand (an
    /// address, a device, a size) and fail with the caller's own error type, while `rent`
    /// and the pool's type stay as they are.
    ///
    /// ```
    /// use unimem::ObjectPool;
    ///
    /// let pool = ObjectPool::new(|| 0u64);
    /// assert!(pool.try_rent(|| "x".parse::<u64>()).is_err());
    /// assert_eq!(pool.statistics().rents, 0, "a failed rent counts as nothing");
    /// drop(pool.try_rent(|| "42".parse::<u64>())?);
    /// let again = pool.try_rent(|| "7".parse::<u64>())?; // the idle object: no parse
    /// assert_eq!(*again, 42);
    /// # Ok::<(), std::num::ParseIntError>(())
    /// ```
    ///
    /// # Errors
    /// The error of `make`, when there was no idle object and `make` failed.
    #[inline]
    pub fn try_rent<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<Pooled<'_, T>, E> {
        Ok(Pooled::new(self, self.take_or_make(make)?))
    }

    /// As [`rent`](Self::rent), for a pool in an `Arc`: the guard holds a clone of the
    /// `Arc`, so it is `'static` when `T` is and can move to another thread or task.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use unimem::ObjectPool;
    ///
    /// let pool = Arc::new(ObjectPool::new(Vec::<u8>::new));
    /// let mut buf = pool.rent_owned();
    /// buf.push(1);
    /// let worker = std::thread::spawn(move || buf.len()); // returned on that thread
    /// assert!(matches!(worker.join(), Ok(1)));
    /// assert_eq!(pool.statistics().returns, 1);
    /// ```
    #[inline]
    pub fn rent_owned(self: &Arc<Self>) -> PooledOwned<T> {
        PooledOwned::new(Arc::clone(self), self.take_or_make_new())
    }

    /// As [`try_rent`](Self::try_rent), with an owned guard as from
    /// [`rent_owned`](Self::rent_owned).
    ///
    /// # Errors
    /// The error of `make`, when there was no idle object and `make` failed.
    #[inline]
    pub fn try_rent_owned<E>(
        self: &Arc<Self>,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<PooledOwned<T>, E> {
        Ok(PooledOwned::new(Arc::clone(self), self.take_or_make(make)?))
    }

    /// An idle object, or a new one from the pool's factory.
    #[inline]
    fn take_or_make_new(&self) -> Slot<T> {
        let Ok(value) = self.take_or_make(|| Ok::<_, Infallible>((self.factory)()));
        value
    }

    /// An idle object, or a new one from `make`; counts a hit or a miss, or nothing if
    /// `make` fails.
    #[inline]
    fn take_or_make<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<Slot<T>, E> {
        if let Some(local) = self.locals.current_cached()
            // SAFETY: `local` is this thread's bucket, reached through `current_cached` (so
            // the fence is expedited), and `pop` does not re-enter the pool.
            && let Some(Some(value)) = unsafe { local.owned.owner_expedited(#[inline(always)] |owned| local.pop(owned)) }
        {
            local.counters.bump_owned(Event::Hit);
            return Ok(value);
        }
        self.take_or_make_slow(make)
    }

    #[cold]
    #[inline(never)]
    fn take_or_make_slow<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<Slot<T>, E> {
        let local = self.local();
        if let Some(local) = local {
            // SAFETY: `local` is this thread's bucket; `pop` and `take_credit` do not
            // re-enter the pool.
            let taken =
                unsafe { local.owned.owner(|owned| local.pop(owned).ok_or_else(|| owned.take_credit())) };
            match taken {
                Some(Ok(value)) => {
                    local.counters.bump_owned(Event::Hit);
                    return Ok(value);
                }
                // The bucket is empty: its unused share of the total bound goes back, so
                // that a thread that only rents does not sit on room other threads need.
                Some(Err(spare)) => self.shared.release(spare),
                // A stealer has the bucket.
                None => {}
            }
        }
        let value = match self.shared.pop().or_else(|| self.steal(local)) {
            Some(value) => {
                self.count(local, Event::Hit);
                // Served from outside this bucket: ask for one return to the shared store,
                // and remember the request as this thread's own, for its returns to withdraw.
                let asked = self.demand.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    (d < MAX_DEMAND).then_some(d + 1)
                });
                if asked.is_ok()
                    && let Some(local) = local
                {
                    // SAFETY: as above.
                    unsafe { local.owned.owner(|owned| owned.owed = (owned.owed + 1).min(MAX_DEMAND)) };
                }
                value
            }
            None => {
                let value = Box::new(CachePadded::new(make()?));
                self.count(local, Event::Miss);
                value
            }
        };
        Ok(value)
    }

    /// Resets `value` (a guard's object, given back) and keeps it, or drops it if the reset
    /// hook panics or the bounds are reached.
    #[inline]
    fn reset_and_keep(&self, mut value: Slot<T>) {
        if let Some(reset) = &self.reset
            && let Err(panic) = catch_unwind(AssertUnwindSafe(|| reset(&mut **value)))
        {
            return self.reset_panicked(value, panic);
        }
        self.give_back(value);
    }

    #[cold]
    #[inline(never)]
    fn reset_panicked(&self, value: Slot<T>, panic: Box<dyn std::any::Any + Send>) {
        self.count(self.local(), Event::ResetPanic);
        drop(value);
        if !std::thread::panicking() {
            resume_unwind(panic);
        }
    }

    /// Takes half the idle objects of the other bucket that holds the most (with the share
    /// of the total bound that paid for them): one for the caller, the rest to the shared
    /// store. Half, from one bucket: taking everything from everyone made threads that all
    /// rent in bursts strip each other's buckets on every miss (8 threads under a bound of
    /// 64 then hit 15% of rents instead of half).
    #[cold]
    fn steal(&self, local: Option<&Local<T>>) -> Option<Slot<T>> {
        let mine = local.map(std::ptr::from_ref);
        let victim = self
            .locals
            .iter()
            .map(|padded| &**padded)
            .filter(|local| Some(std::ptr::from_ref(*local)) != mine)
            .max_by_key(|local| local.idle.load(Ordering::Relaxed))
            .filter(|local| local.idle.load(Ordering::Relaxed) > 0)?;
        let mut taken = Vec::new();
        self.steal_lock.steal(&[&victim.owned], |_, owned| {
            let half = owned.idle().div_ceil(2);
            taken.extend(owned.top.take());
            while taken.len() < half {
                let Some(value) = owned.stack.pop() else { break };
                taken.push(value);
            }
            // `top` holds the newest object: refill it so that the owner's next rent stays
            // on its fast path.
            if owned.top.is_none() {
                owned.top = owned.stack.pop();
            }
            owned.credit -= taken.len();
            victim.idle.store(owned.idle(), Ordering::Relaxed);
        });
        let first = taken.pop()?;
        self.count(local, Event::Steal);
        // The objects handed to the store keep their units; the caller's goes back.
        self.shared.push_paid(taken);
        self.shared.release(1);
        Some(first)
    }

    /// Keeps `value` (already reset) in this thread's bucket, the shared store, or drops it.
    ///
    /// Out of line, and its hit (this thread's bucket reached through the thread-local
    /// cache, room within the credit held, no demand to answer) makes no call but the tail
    /// call to [`give_back_slow`](Self::give_back_slow): so it saves no register, where
    /// inlined into a guard's drop beside the reset hook's call it made the drop save six.
    /// A kept return costs no counter: statistics count it from the idle objects.
    #[inline(never)]
    fn give_back(&self, value: Slot<T>) {
        let mut donate = false;
        let mut value = Some(value);
        if let Some(local) = self.locals.current_cached() {
            let demand = self.demand.load(Ordering::Relaxed);
            // SAFETY: as in `take_or_make`; `push` does not re-enter the pool.
            let pushed = unsafe {
                local.owned.owner_expedited(
                    #[inline(always)]
                    |owned| local.push(owned, &mut value, demand, false),
                )
            };
            donate = pushed == Some(Push::Donate);
        }
        if let Some(value) = value {
            self.give_back_slow(value, donate);
        }
    }

    /// The rest of [`give_back`](Self::give_back): `donate` if its bucket answered demand.
    /// Keeps `value` in this thread's bucket (claiming more of the bound, growing the
    /// stack), or in the shared store (first, if the return answers demand), or drops it.
    #[cold]
    #[inline(never)]
    fn give_back_slow(&self, value: Slot<T>, donate: bool) {
        let local = self.local();
        let mut value = Some(value);
        let mut donate = donate || local.is_none();
        if let Some(local) = local
            && !donate
        {
            // The hit path did not place it (no room without growing, a stealer had the
            // bucket, the cached lookup missed, or the bucket owes demand): the same rule,
            // growing if need be.
            let demand = self.demand.load(Ordering::Relaxed);
            // SAFETY: as in `take_or_make_slow`; `grow_and_push` does not re-enter the pool.
            let pushed = unsafe {
                local.owned.owner(|owned| {
                    let pushed =
                        local.grow_and_push(owned, &mut value, &self.shared, self.max_per_bucket, demand);
                    if pushed != Push::Owed {
                        return pushed;
                    }
                    // This thread owes demand (raised by its own rents, not yet paid): the
                    // return pays one unit. It stays, withdrawing the request it answers (a
                    // thread that rents in batches would otherwise pass part of each batch
                    // through the store and take it back from there, raising the demand
                    // again), or, if it cannot stay, the shared store answers it. (Should the
                    // store have no room either, the object is dropped and the demand stays:
                    // unlike the size-class pool, this pool counts a donation against the
                    // demand only once it is in the store.)
                    owned.owed -= 1;
                    let kept = local.grow_and_push(owned, &mut value, &self.shared, self.max_per_bucket, 0);
                    if kept != Push::Kept {
                        return Push::Donate;
                    }
                    owned.rents_at_return = local.counters.rents();
                    self.answer_demand();
                    Push::Kept
                })
            };
            donate = pushed == Some(Push::Donate);
        }
        let Some(value) = value else { return };
        let Err(mut value) = self.push_shared(value) else { return };
        // The store has no room under the total bound. A donation may still go there, paid
        // from the bucket's spare credit, or stay in the bucket.
        if donate && let Some(local) = local {
            let mut slot = Some(value);
            // SAFETY: as above.
            let paid = unsafe {
                local.owned.owner(|owned| {
                    // The unit of the bound that pays for the object in the store comes
                    // from this bucket's spare credit, if it has any: the bound's share
                    // goes where the objects are rented. (A consumer that kept a first
                    // return claimed a batch of credit; under a tight total bound that
                    // left the store no room, and every return was kept or dropped.)
                    let spare = owned.credit > owned.idle();
                    if spare {
                        owned.credit -= 1;
                    } else {
                        local.grow_and_push(owned, &mut slot, &self.shared, self.max_per_bucket, 0);
                    }
                    spare
                })
            };
            let Some(back) = slot else { return };
            if paid == Some(true) {
                self.shared.push_one_paid(back);
                self.answer_demand();
                return;
            }
            value = back;
        }
        // Buckets whose objects are rented out again keep the units that paid for them: if
        // the idle objects leave part of the bound unused, those units come back and the
        // store keeps this object on one of them.
        if self.reclaim_spare_credit(local) {
            match self.push_shared(value) {
                Ok(()) => return,
                Err(back) => value = back,
            }
        }
        self.count(local, Event::Dropped);
        drop(value);
    }

    /// Takes back the units of the total bound that buckets hold beyond their idle objects,
    /// but only when the idle objects (as last published) leave part of the bound unused:
    /// a return to a pool full of idle objects is dropped without stopping anyone. This
    /// thread's bucket gives its units first, through its owner's side, with no barrier;
    /// only if it has none are the other threads' buckets stopped for a moment under the
    /// handoff protocol, with one. Returns whether any came back. Called only outside this thread's owner section.
    #[cold]
    fn reclaim_spare_credit(&self, local: Option<&Local<T>>) -> bool {
        let idle = self.locals.iter().map(|padded| padded.idle.load(Ordering::Relaxed)).sum::<usize>();
        if self.shared.len().saturating_add(idle) >= self.max_total {
            return false;
        }
        let mut spare = 0;
        if let Some(local) = local {
            // SAFETY: this thread's bucket, from outside its owner section; `take_credit`
            // does not re-enter the pool.
            spare += unsafe { local.owned.owner(Owned::take_credit) }.unwrap_or(0);
        }
        if spare > 0 {
            // Enough for the one object: no other thread is stopped.
            self.shared.release(spare);
            return true;
        }
        let mine = local.map(std::ptr::from_ref);
        let cells: Vec<_> = self
            .locals
            .iter()
            .map(|padded| &**padded)
            .filter(|other| Some(std::ptr::from_ref(*other)) != mine)
            .map(|other| &other.owned)
            .collect();
        self.steal_lock.steal(&cells, |_, owned| spare += owned.take_credit());
        self.shared.release(spare);
        spare > 0
    }

    /// Keeps `value` in the shared store if the total bound allows; a return that reaches
    /// the store answers one unit of demand.
    fn push_shared(&self, value: Slot<T>) -> Result<(), Slot<T>> {
        self.shared.push(value)?;
        self.answer_demand();
        Ok(())
    }

    /// Counts one return to the shared store against the demand for them.
    fn answer_demand(&self) {
        let _ = self.demand.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1));
    }

    /// The calling thread's bucket (none during thread-local teardown).
    #[inline]
    fn local(&self) -> Option<&Local<T>> {
        self.locals.current().map(|padded| &**padded)
    }

    fn count(&self, local: Option<&Local<T>>, event: Event) {
        match local {
            Some(local) => local.counters.bump_owned(event),
            None => self.counters.bump_shared(event),
        }
    }

    /// Drops every idle object: the shared store's and every thread's bucket's (each taken
    /// from its thread for a moment under the handoff protocol, so it may run on any thread
    /// while others rent). [`ObjectPool::clear`] does the same through `&mut self`.
    pub fn trim(&self) {
        let local = self.local();
        let mut idle = self.shared.take_all();
        let buckets: Vec<&Local<T>> = self.locals.iter().map(|padded| &**padded).collect();
        let cells: Vec<_> = buckets.iter().map(|local| &local.owned).collect();
        let mut credit = 0;
        self.steal_lock.steal(&cells, |n, owned| {
            idle.append(&mut owned.drain());
            credit += std::mem::take(&mut owned.credit);
            buckets[n].idle.store(0, Ordering::Relaxed);
        });
        self.shared.release(credit);
        self.add(local, Event::Trimmed, idle.len());
        // Dropped here, outside every bucket and lock: `T::drop` may use the pool.
        drop(idle);
    }

    /// Drops every idle object, in every bucket.
    pub fn clear(&mut self) {
        let mut idle = self.shared.take_all();
        let mut credit = 0;
        for local in self.locals.iter_mut() {
            let owned = local.owned.get_mut();
            credit += std::mem::take(&mut owned.credit);
            idle.append(&mut owned.drain());
            local.idle.store(0, Ordering::Relaxed);
        }
        self.shared.release(credit);
        self.counters.add_shared(Event::Trimmed, idle.len());
        drop(idle);
    }

    fn add(&self, local: Option<&Local<T>>, event: Event, n: usize) {
        match local {
            Some(local) => local.counters.add_owned(event, n),
            None => self.counters.add_shared(event, n),
        }
    }

    /// A snapshot of the counters. Counters are per thread and read without stopping
    /// anyone, so a snapshot taken while other threads work may be off by their
    /// operations in flight; at rest it balances exactly.
    pub fn statistics(&self) -> ObjectPoolStatistics {
        let mut sums = self.counters.read();
        let mut idle = self.shared.len();
        for local in self.locals.iter() {
            let counts = local.counters.read();
            for (sum, count) in sums.iter_mut().zip(counts) {
                *sum += count;
            }
            idle += local.idle.load(Ordering::Relaxed);
        }
        let [hits, misses, dropped, detached, reset_panics, trimmed, steals] = sums;
        // Every kept return made an idle object, which since was rented again (a hit), was
        // trimmed, or is still idle: so returns are counted from those, and a return costs
        // no counter of its own.
        let returns = hits + trimmed + idle as u64;
        let gone = dropped + detached + reset_panics + trimmed + idle as u64;
        ObjectPoolStatistics {
            rents: hits + misses,
            hits,
            misses,
            returns,
            dropped,
            detached,
            reset_panics,
            trimmed,
            steals,
            idle,
            live: misses.saturating_sub(gone),
            max_per_bucket: self.max_per_bucket,
            max_total: self.max_total,
        }
    }

    /// The bound on one thread's bucket.
    pub fn max_per_bucket(&self) -> usize {
        self.max_per_bucket
    }

    /// The bound on all idle objects.
    pub fn max_total(&self) -> usize {
        self.max_total
    }
}

impl<T> fmt::Debug for ObjectPool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectPool")
            .field("type", &std::any::type_name::<T>())
            .field("statistics", &self.statistics())
            .finish_non_exhaustive()
    }
}

/// Options for an [`ObjectPool`], from [`ObjectPool::builder`].
///
/// The bucket bound never exceeds the total bound: left unset, it is
/// [`DEFAULT_MAX_PER_BUCKET`] or the total bound, whichever is smaller, so that
/// `.max_total(8)` alone builds a pool whose buckets keep at most 8 objects.
pub struct ObjectPoolBuilder<T> {
    factory: Factory<T>,
    reset: Option<Reset<T>>,
    /// `None`: the default, capped by `max_total`.
    max_per_bucket: Option<usize>,
    max_total: usize,
}

impl<T> ObjectPoolBuilder<T> {
    /// Runs on every object returned to the pool, before it is kept. If it panics the
    /// object is dropped, not kept, and the panic propagates (unless the thread is already
    /// unwinding: then it is counted in `reset_panics` and goes no further, since a second
    /// panic would abort).
    pub fn reset(mut self, reset: impl Fn(&mut T) + Send + Sync + 'static) -> Self {
        self.reset = Some(Box::new(reset));
        self
    }

    /// Bound on the idle objects one thread's bucket keeps. Zero sends every return to the
    /// shared store. Default: [`DEFAULT_MAX_PER_BUCKET`] or the total bound, whichever is
    /// smaller; a bound set here that exceeds the total bound makes
    /// [`build`](Self::build) fail.
    pub fn max_per_bucket(mut self, bound: usize) -> Self {
        self.max_per_bucket = Some(bound);
        self
    }

    /// Bound on all idle objects of the pool, every bucket and the shared store together
    /// (default [`DEFAULT_MAX_TOTAL`]). Objects returned past it are dropped. Also caps the
    /// default bucket bound (see [`max_per_bucket`](Self::max_per_bucket)).
    pub fn max_total(mut self, bound: usize) -> Self {
        self.max_total = bound;
        self
    }

    /// Builds the pool.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] if the total bound is zero or smaller than a bucket bound set
    /// with [`max_per_bucket`](Self::max_per_bucket).
    pub fn build(self) -> Result<ObjectPool<T>> {
        if self.max_total == 0 {
            return Err(Error::InvalidOption {
                option: "max_total",
                value: "0".into(),
                reason: "a pool must be able to keep at least one idle object",
            });
        }
        let max_per_bucket = self.max_per_bucket.unwrap_or(DEFAULT_MAX_PER_BUCKET.min(self.max_total));
        if max_per_bucket > self.max_total {
            return Err(Error::InvalidOption {
                option: "max_per_bucket",
                value: max_per_bucket.to_string(),
                reason: "must not exceed max_total",
            });
        }
        Ok(ObjectPool::with_parts(self.factory, self.reset, max_per_bucket, self.max_total))
    }
}

/// A snapshot of an [`ObjectPool`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ObjectPoolStatistics {
    /// Rents that gave an object (`rent`, `try_rent` and their owned forms): `hits +
    /// misses`. A `try_rent` whose factory failed is not counted.
    pub rents: u64,
    /// Rents served by an idle object.
    pub hits: u64,
    /// Rents that made a new object (with the pool's factory or `try_rent`'s).
    pub misses: u64,
    /// Objects kept after a return.
    pub returns: u64,
    /// Objects dropped on return because the bounds were reached.
    pub dropped: u64,
    /// Objects taken out of the pool with [`Pooled::into_inner`] or
    /// [`PooledOwned::into_inner`].
    pub detached: u64,
    /// Objects dropped because the reset hook panicked.
    pub reset_panics: u64,
    /// Idle objects dropped by [`ObjectPool::trim`] or [`ObjectPool::clear`].
    pub trimmed: u64,
    /// Rents served by taking idle objects out of another thread's bucket (also counted in
    /// `hits`). Each costs the renting thread a process-wide barrier; a pipeline whose
    /// returns flow to the shared store (see the module documentation) needs almost none.
    pub steals: u64,
    /// Idle objects now.
    pub idle: usize,
    /// Objects rented out now: made, minus dropped, detached, trimmed and idle.
    pub live: u64,
    /// The bucket bound.
    pub max_per_bucket: usize,
    /// The total bound.
    pub max_total: usize,
}

impl ObjectPoolStatistics {
    /// Fraction of rents served without the factory (0 when nothing was rented).
    pub fn hit_rate(&self) -> f64 {
        if self.rents == 0 { 0.0 } else { self.hits as f64 / self.rents as f64 }
    }
}

impl fmt::Display for ObjectPoolStatistics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Rents: {}, Hit rate: {:.1}%, Made: {}, Idle: {}, Live: {}, Dropped past bound: {}",
            self.rents,
            self.hit_rate() * 100.0,
            self.misses,
            self.idle,
            self.live,
            self.dropped
        )
    }
}

#[derive(Clone, Copy)]
enum Event {
    Hit,
    Miss,
    Dropped,
    Detached,
    ResetPanic,
    Trimmed,
    Steal,
}

const EVENTS: usize = 7;

/// Event counters. A bucket's are written only by its owning thread, with a plain load and
/// store (no read-modify-write); the pool's own are shared and use `fetch_add`. Any thread
/// may read either.
#[derive(Default)]
struct Counters([AtomicU64; EVENTS]);

impl Counters {
    /// Adds one; only the owning thread may call it.
    #[inline]
    fn bump_owned(&self, event: Event) {
        self.add_owned(event, 1);
    }

    #[inline]
    fn add_owned(&self, event: Event, n: usize) {
        let counter = &self.0[event as usize];
        counter.store(counter.load(Ordering::Relaxed) + n as u64, Ordering::Relaxed);
    }

    fn bump_shared(&self, event: Event) {
        self.add_shared(event, 1);
    }

    fn add_shared(&self, event: Event, n: usize) {
        self.0[event as usize].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Hits and misses; read by the owning thread (or at rest).
    #[inline(always)]
    fn rents(&self) -> u64 {
        self.0[Event::Hit as usize].load(Ordering::Relaxed)
            + self.0[Event::Miss as usize].load(Ordering::Relaxed)
    }

    fn read(&self) -> [u64; EVENTS] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// One thread's bucket.
struct Local<T> {
    owned: Handoff<Owned<T>>,
    /// Idle objects in `owned` (`top` and `stack`), written by whoever holds `owned` (the
    /// owner, or a stealer) and read by anyone: statistics, and stealers choosing buckets.
    idle: AtomicUsize,
    /// Written by the owning thread only.
    counters: Counters,
}

/// A LIFO of idle objects whose newest entry sits in `top`, beside the bucket's other
/// fields: the alternating rent/return of one thread touches `top` only, one dependent
/// load fewer than an entry of `stack`.
struct Owned<T> {
    top: Option<Slot<T>>,
    stack: Vec<Slot<T>>,
    /// Units of the total bound this bucket holds: idle objects `<= credit`.
    credit: usize,
    /// The owner's rents (hits and misses) when it last kept an object under demand.
    rents_at_return: u64,
    /// Demand that the owner's own rents raised and that its own returns have not yet paid
    /// (at most the bound on demand).
    owed: usize,
}

/// What became of a value given to [`Local::push`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Push {
    Kept,
    /// No credit left: the caller claims more or uses the shared store.
    Full,
    /// Kept out for the shared store: rents elsewhere want it, and this return answers
    /// (see [`Local::declines`]).
    Donate,
    /// Under demand, while the bucket owes demand its own rents raised: off the hit path,
    /// the return pays one unit of it (see [`ObjectPool::give_back_slow`]).
    Owed,
}

impl<T> Owned<T> {
    fn idle(&self) -> usize {
        self.stack.len() + usize::from(self.top.is_some())
    }

    fn drain(&mut self) -> Vec<Slot<T>> {
        let mut idle = std::mem::take(&mut self.stack);
        idle.extend(self.top.take());
        idle
    }

    /// Gives up the credit the bucket holds beyond its idle objects; returns the units.
    fn take_credit(&mut self) -> usize {
        let spare = self.credit - self.idle();
        self.credit -= spare;
        spare
    }
}

impl<T> Default for Local<T> {
    fn default() -> Self {
        Self {
            owned: Handoff::new(Owned {
                top: None,
                stack: Vec::new(),
                credit: 0,
                rents_at_return: 0,
                owed: 0,
            }),
            idle: AtomicUsize::new(0),
            counters: Counters::default(),
        }
    }
}

// The methods below run inside the owner's side of the bucket's handoff, on its `Owned`.
// Each does a few `Vec` operations and calls no user code (no factory, reset hook or
// `T::drop`), so nothing can re-enter the pool while the bucket is held.
impl<T> Local<T> {
    #[inline(always)]
    fn pop(&self, owned: &mut Owned<T>) -> Option<Slot<T>> {
        let value = match owned.top.take() {
            Some(value) => value,
            None => owned.stack.pop()?,
        };
        // Written only by whoever holds `owned`: a load and a store, no read-modify-write.
        self.idle.store(self.idle.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        Some(value)
    }

    /// Pushes `value` within the credit already held; leaves it in place when there is none,
    /// or when `demand` wants it in the shared store and this return answers (see
    /// [`declines`](Self::declines)). Without `grow` it also leaves it in place when the stack
    /// would have to grow (so that the hit path makes no call).
    #[inline(always)]
    fn push(&self, owned: &mut Owned<T>, value: &mut Option<Slot<T>>, demand: usize, grow: bool) -> Push {
        let idle = self.idle.load(Ordering::Relaxed);
        let mut declined = None;
        if demand > 0 {
            if owned.owed > 0 {
                return Push::Owed;
            }
            declined = self.declines(owned, idle);
            if declined.is_none() {
                return Push::Donate;
            }
        }
        if idle >= owned.credit
            || (!grow && owned.top.is_some() && owned.stack.len() == owned.stack.capacity())
        {
            return Push::Full;
        }
        let Some(value) = value.take() else { return Push::Full };
        if let Some(older) = owned.top.replace(value) {
            owned.stack.push(older);
        }
        if let Some(rents) = declined {
            owned.rents_at_return = rents;
        }
        self.idle.store(idle + 1, Ordering::Relaxed);
        Push::Kept
    }

    /// For a return under demand: `None` if it answers the demand (the bucket already holds
    /// an idle object, or the thread has rented nothing since it last kept an object under
    /// demand; see the module documentation), otherwise the thread's rent count, recorded
    /// once the object is kept. It changes nothing, so a return that goes on to the slow
    /// path is judged the same there (where a second look that saw the count just recorded
    /// would donate, and a thread that rents and returns alike would trade its object
    /// through the store forever).
    #[inline(always)]
    fn declines(&self, owned: &Owned<T>, idle: usize) -> Option<u64> {
        let rents = self.counters.rents();
        (idle == 0 && rents != owned.rents_at_return).then_some(rents)
    }

    /// As [`push`](Self::push) with `demand`; if that finds no room, claims more of the
    /// total bound (up to `max_per_bucket` in all) and pushes, growing the stack.
    fn grow_and_push(
        &self,
        owned: &mut Owned<T>,
        value: &mut Option<Slot<T>>,
        shared: &Shared<Slot<T>>,
        max_per_bucket: usize,
        demand: usize,
    ) -> Push {
        let pushed = self.push(owned, value, demand, false);
        if pushed != Push::Full {
            return pushed;
        }
        if self.idle.load(Ordering::Relaxed) >= owned.credit {
            let want = max_per_bucket.saturating_sub(owned.credit).min(CREDIT_BATCH);
            owned.credit += shared.claim(want);
        }
        // Room for every object the credit pays for, so that later returns push without
        // growing the stack (see `push`): 8 bytes per unit of the bucket bound at most.
        owned.stack.reserve(owned.credit.saturating_sub(owned.stack.len()));
        // With the same demand: judged as the first push was, so that a keep under demand
        // records the rent count here too.
        self.push(owned, value, demand, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that uses only object pools must still register the asymmetric fence
    /// before their first use: otherwise every rent and return runs a full fence, and a
    /// memory manager made later switches the scheme under buckets already in use (an
    /// owner on the compiler-only side while a stealer ran the plain fence). Checked in a
    /// child process, where nothing else has made a pool.
    #[test]
    fn an_object_pool_registers_the_asymmetric_fence_before_first_use() {
        let name = "object_pool::tests::an_object_pool_registers_the_asymmetric_fence_before_first_use";
        crate::sync::in_child_process(name, || {
            let pool = ObjectPool::new(|| 0u8);
            drop(pool.rent());
            assert_eq!(crate::sync::is_expedited(), crate::sync::expedited_available());
        });
    }

    /// Where `membarrier` is missing (another OS, an old kernel, a seccomp filter), the hit
    /// paths' cached lookup never hits (it would skip the full fence that scheme needs), and
    /// both pools still reuse through their general paths: same thread, and a pipeline
    /// under tight bounds, whose returns must still answer demand.
    #[test]
    fn without_membarrier_both_pools_still_reuse() {
        let name = "object_pool::tests::without_membarrier_both_pools_still_reuse";
        crate::sync::in_child_process(name, || {
            crate::sync::init_plain_fence();
            assert!(!crate::sync::is_expedited());

            let slots = ThreadSlots::<u32>::new();
            assert!(slots.current().is_some());
            assert!(slots.current_cached().is_none(), "the cached lookup implies the expedited scheme");

            let pool = ObjectPool::builder(|| vec![0u8; 16]).max_per_bucket(8).max_total(8).build().unwrap();
            let first = pool.rent().as_ptr();
            for _ in 0..100 {
                assert_eq!(pool.rent().as_ptr(), first, "the same object comes back");
            }
            let stats = pool.statistics();
            assert_eq!((stats.hits, stats.misses, stats.returns, stats.idle), (100, 1, 101, 1));

            let pool = std::sync::Arc::new(
                ObjectPool::builder(|| 0u64).max_per_bucket(8).max_total(8).build().unwrap(),
            );
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let consumer = std::thread::spawn(move || rx.into_iter().for_each(drop));
            for _ in 0..1000 {
                tx.send(pool.rent_owned()).unwrap();
            }
            drop(tx);
            consumer.join().unwrap();
            let stats = pool.statistics();
            assert!(stats.hit_rate() >= 0.9 && stats.rents == 1000, "pipeline: {stats}");

            let manager = crate::MemoryManager::new();
            for _ in 0..100 {
                drop(manager.allocate::<u8>(1024, crate::AllocationMode::Pooled).unwrap());
            }
            let stats = manager.statistics();
            assert_eq!((stats.pool_hits, stats.pool_misses), (99, 1));
        });
    }

    /// `budget + bucket credit + store length == max_total`, and every bucket within its
    /// credit and bound.
    fn assert_accounted<T>(pool: &mut ObjectPool<T>) {
        let mut held = pool.shared.budget() + pool.shared.len();
        for local in pool.locals.iter_mut() {
            let published = *local.idle.get_mut();
            let owned = local.owned.get_mut();
            assert!(owned.idle() <= owned.credit);
            assert_eq!(owned.idle(), published);
            assert!(owned.credit <= pool.max_per_bucket);
            held += owned.credit;
        }
        assert_eq!(held, pool.max_total);
    }

    /// A thread that rents and returns alike, under demand that no one pays down (another
    /// thread holds the objects it took from outside its bucket), with no credit left in its
    /// bucket: its return goes to the slow path, which must judge it as the hit path did
    /// and keep it. (When the hit path's look recorded the rent count, the slow path's
    /// second look saw no rent since and donated the object, and the thread then took it
    /// back from the store on every rent: each pair through the store's lock.)
    #[test]
    fn a_thread_that_rents_and_returns_alike_keeps_its_object_under_standing_demand() {
        let pool =
            std::sync::Arc::new(ObjectPool::builder(|| 0u64).max_per_bucket(8).max_total(8).build().unwrap());
        drop((pool.rent(), pool.rent())); // two idle objects in this thread's bucket
        let other = std::sync::Arc::clone(&pool);
        let held = std::thread::spawn(move || (other.rent_owned(), other.rent_owned())).join().unwrap();
        assert_eq!(pool.statistics().steals, 2, "the other thread took both from this bucket");
        assert!(pool.demand.load(Ordering::Relaxed) > 0);
        for _ in 0..10 {
            drop(pool.rent());
        }
        let local = pool.local().unwrap();
        assert_eq!(
            (local.idle.load(Ordering::Relaxed), pool.shared.len()),
            (1, 0),
            "the object stays in this thread's bucket"
        );
        let stats = pool.statistics();
        assert_eq!((stats.misses, stats.steals), (3, 2), "{stats:?}");
        drop(held);
    }

    /// A thread that rents and returns two (or three) objects at a time while demand stands
    /// (raised by another thread that took objects from outside its own bucket) keeps them
    /// all in its bucket once it has answered that demand: the demand its own rents from
    /// the store raise is its own to pay. (Otherwise each round's later returns went to the
    /// shared store, and the next round's rents took them back from there, raising the
    /// demand again: every round through the store's lock, for good.)
    #[test]
    fn a_thread_working_in_pairs_under_standing_demand_keeps_its_objects() {
        for batch in [2, 3] {
            let pool = std::sync::Arc::new(ObjectPool::new(|| 0u64));
            let rent_batch =
                |pool: &ObjectPool<u64>| (0..batch).map(|_| pool.rent()).collect::<Vec<_>>().len();
            rent_batch(&pool); // idle objects in this thread's bucket
            let other = std::sync::Arc::clone(&pool);
            let held = std::thread::spawn(move || (0..batch).map(|_| other.rent_owned()).collect::<Vec<_>>())
                .join()
                .unwrap();
            assert!(pool.statistics().steals > 0, "the other thread took them from this bucket");
            assert!(pool.demand.load(Ordering::Relaxed) > 0, "the demand stands");
            let shared_after_each_round: Vec<usize> = (0..20)
                .map(|_| {
                    rent_batch(&pool);
                    pool.shared.len()
                })
                .collect();
            // Two rounds pay the standing demand; from the third on, nothing goes through the
            // store.
            assert_eq!(
                shared_after_each_round[2..],
                [0; 18],
                "objects in the shared store after each round of {batch}: {shared_after_each_round:?}"
            );
            assert_eq!(pool.local().map(|local| local.idle.load(Ordering::Relaxed)), Some(batch));
            drop(held);
        }
    }

    #[test]
    fn the_total_bound_is_accounted_exactly() {
        let mut pool = ObjectPool::builder(|| 0u64).max_per_bucket(40).max_total(100).build().unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let rented: Vec<_> = (0..70).map(|_| pool.rent()).collect();
                    drop(rented);
                    // Rent past the bucket: it runs empty and gives its credit back.
                    let rented: Vec<_> = (0..50).map(|_| pool.rent()).collect();
                    drop(rented);
                });
            }
        });
        assert_accounted(&mut pool);
        let stats = pool.statistics();
        assert!(stats.idle <= 100, "{stats:?}");
        assert_eq!(stats.live, 0, "{stats:?}");
        pool.trim();
        assert_accounted(&mut pool);
        pool.clear();
        assert_accounted(&mut pool);
        assert_eq!(pool.shared.budget(), 100);
        assert_eq!(pool.statistics().idle, 0);
    }
}
