//! Per-thread caches: the pool's hit path.
//!
//! Each thread that allocates from a pool gets its own cache there (a slot of
//! [`ThreadSlots`](crate::thread_slots::ThreadSlots)): per size class, a short LIFO stack of
//! blocks, and the counters of the operations done through it. The owner reaches its cache
//! through a [`Handoff`]: no lock and no atomic read-modify-write on a hit or a return.
//! Other threads take blocks out of it under the handoff's stealer protocol (a miss that
//! finds the class idle here, `trim`, a pool being closed), and the thread gives everything
//! back to the pool's shared store when it exits.

use super::Block;
use super::size_class::{MAX_COUNT, SizeClasses};
use crate::handoff::Handoff;
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

/// Blocks one cache keeps per size class.
pub(crate) const SLOTS: usize = 4;

/// The owner has allocated the class (since the slot passed to it, or ever).
const RENTED: u8 = 1 << 0;
/// The owner has allocated the class since it last kept a block of it under demand.
const RENTED_SINCE_KEPT: u8 = 1 << 1;

/// One size class inside a cache, without its length (see [`ClassMut`]).
pub(crate) struct CacheClass {
    /// Blocks held, the newest last: each of `slots[..len]` owns a block (made by
    /// `Box::into_raw`); the rest own nothing, whatever they point to (dangling, at first).
    /// So a pop leaves its slot as it was and a push overwrites one without looking: a
    /// store less on the hit path than with `Option<Box<Block>>`, which a pop must clear,
    /// and no check of a slot that the length says is full. Only [`ClassMut`] touches
    /// them, and the cache's drop frees what they still own.
    slots: [NonNull<Block>; SLOTS],
    /// Blocks' worth of the pool's budget this cache has claimed for the class: at most
    /// [`SLOTS`], which only this module's methods keep (see `ClassMut::pop_if`), and
    /// `len <= credit`.
    credit: u8,
    /// What the owner's allocations of the class say ([`RENTED`], [`RENTED_SINCE_KEPT`]):
    /// set by every allocation but written only when it changes, so that a hit stores
    /// nothing here.
    rents: u8,
    /// Demand for the class that the owner's own allocations raised and that its own
    /// returns have not yet paid (at most the pool's bound on demand).
    owed: u8,
}

// SAFETY: a `CacheClass` owns the blocks its slots point to (`slots[..len]`), as a
// `Vec<Box<Block>>` would, and `Block` is `Send`.
unsafe impl Send for CacheClass {}

impl Default for CacheClass {
    fn default() -> Self {
        CacheClass { slots: [NonNull::dangling(); SLOTS], credit: 0, rents: 0, owed: 0 }
    }
}

impl CacheClass {
    /// Whether the owner has ever allocated the class. A cache keeps only the classes its thread
    /// allocates: a block of a class it only frees (a pipeline's consumer) could only
    /// wait there for another thread to steal it.
    #[inline(always)]
    pub(crate) fn rented(&self) -> bool {
        self.rents & RENTED != 0
    }

    /// Records an allocation of the class by the owner: a load and, only when something
    /// changes, a store.
    #[inline(always)]
    fn rent(&mut self) {
        if self.rents != RENTED | RENTED_SINCE_KEPT {
            self.rents = RENTED | RENTED_SINCE_KEPT;
        }
    }

    /// Records demand for the class raised by an allocation of the owner's.
    pub(crate) fn owe(&mut self, most: u8) {
        self.owed = (self.owed + 1).min(most);
    }

    /// Whether the owner owes demand: a return under demand then pays one unit of it
    /// (withdrawn if the block stays, answered by the shared store otherwise).
    #[inline(always)]
    pub(crate) fn owes(&self) -> bool {
        self.owed > 0
    }

    /// Forgets the owner's demand record, for a slot that passes to another thread.
    pub(crate) fn forget_demand(&mut self) {
        self.owed = 0;
        self.rents &= !RENTED_SINCE_KEPT;
    }

    /// Records one unit of the owner's demand paid.
    pub(crate) fn withdrawn(&mut self) {
        self.owed = self.owed.saturating_sub(1);
    }

    /// Whether the owner has allocated the class since it last kept a block of it under
    /// demand (or since the slot passed to it).
    pub(crate) fn rented_since_kept(&self) -> bool {
        self.rents & RENTED_SINCE_KEPT != 0
    }

    /// Records a block kept under demand (see [`declines`](Self::declines)).
    #[inline(always)]
    pub(crate) fn kept_under_demand(&mut self) {
        self.rents &= !RENTED_SINCE_KEPT;
    }

    /// Counts an allocation of the class by the owner that this cache did not serve.
    pub(crate) fn rented_elsewhere(&mut self) {
        self.rent();
    }

    /// Whether one more block of credit may be claimed.
    pub(crate) fn can_grow(&self) -> bool {
        usize::from(self.credit) < SLOTS
    }

    /// Blocks' worth of budget claimed for the class.
    pub(crate) fn credit(&self) -> u8 {
        self.credit
    }

    /// Adds one block of credit, claimed by the caller, who has checked
    /// [`can_grow`](Self::can_grow) with the class held since: it never passes [`SLOTS`].
    pub(crate) fn add_credit(&mut self) {
        debug_assert!(self.can_grow());
        self.credit = (self.credit + 1).min(SLOTS as u8);
    }
}

/// One size class of a cache as the holder of its stacks (the owner, or a stealer) sees
/// it: the stack, and its length, which is also the count of blocks held that other threads
/// read (statistics, stealers choosing whom to take from). Kept in one place, so a hit and a
/// return store it once. Only the holder writes it.
pub(crate) struct ClassMut<'a> {
    stack: &'a mut CacheClass,
    len: &'a AtomicU8,
}

impl std::ops::Deref for ClassMut<'_> {
    type Target = CacheClass;
    fn deref(&self) -> &CacheClass {
        self.stack
    }
}

impl std::ops::DerefMut for ClassMut<'_> {
    fn deref_mut(&mut self) -> &mut CacheClass {
        self.stack
    }
}

impl ClassMut<'_> {
    /// Blocks held.
    #[inline(always)]
    pub(crate) fn len(&self) -> u8 {
        // Relaxed: only the holder writes it, and holders are ordered by the handoff.
        self.len.load(Relaxed)
    }

    #[inline(always)]
    pub(crate) fn pop(&mut self) -> Option<Box<Block>> {
        self.pop_if(|_| true)
    }

    /// Pops the newest block if `take` accepts it. The length is loaded once: an atomic
    /// load is never merged with another, so a separate look at the top would load it twice.
    #[inline(always)]
    pub(crate) fn pop_if(&mut self, take: impl FnOnce(&Block) -> bool) -> Option<Box<Block>> {
        let len = usize::from(self.len()).checked_sub(1)?;
        // SAFETY: `len < SLOTS`. Every `CacheClass` has `credit <= SLOTS` (only `add_credit`
        // raises it, never past `SLOTS`), and only `push_credited` raises the length, only
        // while it is below the credit: so the length never passes `SLOTS`.
        let newest = unsafe { *self.stack.slots.get_unchecked(len) };
        // SAFETY: slots below the length own live blocks (see `CacheClass::slots`), which
        // `&mut self` keeps in place while the reference lives.
        if !take(unsafe { newest.as_ref() }) {
            return None;
        }
        // `len < SLOTS`, so it fits. From here the slot owns nothing (its pointer stays).
        self.len.store(len as u8, Relaxed);
        // SAFETY: the slot owned this block, made by `Box::into_raw`, and gave it up above.
        Some(unsafe { Box::from_raw(newest.as_ptr()) })
    }

    /// Pushes `block` if a slot is free and already paid for by credit; gives it back
    /// otherwise.
    #[inline(always)]
    pub(crate) fn push_credited(&mut self, block: Box<Block>) -> Result<(), Box<Block>> {
        let len = self.len();
        if len >= self.stack.credit {
            return Err(block);
        }
        // SAFETY: `len < credit <= SLOTS` (see `CacheClass::credit`). Slots from the length
        // up own nothing: overwritten as they are.
        unsafe { *self.stack.slots.get_unchecked_mut(usize::from(len)) = NonNull::from(Box::leak(block)) };
        self.len.store(len + 1, Relaxed);
        Ok(())
    }

    /// For a return of the class under demand: whether it may stay here rather than answer
    /// the demand. It answers it (`false`) if the class already holds a block, or if the
    /// owner has allocated none of the class since it last kept one under demand (see the
    /// pool's module documentation). Only the owner calls it, inside its handoff. It
    /// changes nothing, so a return that goes on to the slow path is judged the same there.
    #[inline(always)]
    pub(crate) fn declines(&self) -> bool {
        self.len() == 0 && self.rented_since_kept()
    }

    /// Gives up the credit not used by a held block; returns how many blocks' worth.
    pub(crate) fn take_spare_credit(&mut self) -> u8 {
        let len = self.len();
        debug_assert!(len <= self.stack.credit);
        let spare = self.stack.credit - len;
        self.stack.credit = len;
        spare
    }

    /// Pops the newest block with the credit that paid for it.
    pub(crate) fn take_one(&mut self) -> Option<Box<Block>> {
        let block = self.pop()?;
        // The popped block was paid for: `len <= credit` before the pop.
        debug_assert!(self.stack.credit > 0);
        self.stack.credit -= 1;
        Some(block)
    }

    /// Takes every block, with the credit that paid for it.
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    pub(crate) fn take_all(&mut self, into: &mut Vec<Box<Block>>) {
        while let Some(block) = self.take_one() {
            into.push(block);
        }
    }
}

/// Counters of the operations done through one cache, written by its owner only (a load and
/// a store: no read-modify-write) and read by anyone. Buffers may be rented through one
/// cache and returned through another, so `requested` is only meaningful summed. Live
/// buffers and their bytes are not counted here but found from what the pool holds (see
/// `DevicePool::statistics`): a hit and its return write two counters, not six.
#[derive(Default)]
pub(crate) struct CacheCounters {
    pub hits: AtomicU64,
    pub requested: AtomicI64,
}

impl CacheCounters {
    /// Counts a buffer of `requested` bytes handed out (`sign = 1`) or returned (`sign = -1`)
    /// through the cache. Only the owner calls it.
    #[inline(always)]
    fn count(&self, sign: i64, requested: usize) {
        let counter = &self.requested;
        counter.store(counter.load(Relaxed).wrapping_add(sign.wrapping_mul(requested as i64)), Relaxed);
    }
}

/// A cache's contents. Every thread's slot has one from the start, with no stacks (and so
/// no allocation, though its per-class arrays take about 650 bytes in the slot); the
/// owner's first pooled allocation or return makes them ([`Cache::body_or_make`]). A hit
/// path reaches a body without asking whether it is made ([`Cache::contents`]): one not
/// made has no class, so its lookup misses.
pub(crate) struct Body {
    pub(crate) stacks: Handoff<Box<[CacheClass]>>,
    /// Per class, as in `stacks`: blocks held, the length of the class's stack (see
    /// [`ClassMut`]). Written by whoever holds the stacks (owner or stealer), read by
    /// anyone: statistics, and stealers choosing whom to take from. Of fixed length, in the
    /// body itself: a hit reaches it at a fixed offset from the cache and checks the class
    /// against a constant (the classes past the pool's own stay 0).
    held: [AtomicU8; MAX_COUNT],
    /// Per class, as in `stacks`: credit, published the same way when it changes (off the
    /// hit path), for threads looking for spare credit. Of fixed length, as `held`.
    credit: [AtomicU8; MAX_COUNT],
    pub(crate) counters: CacheCounters,
    /// The thread (`thread_slots::thread_id`) that asked to hear of its exit last: a slot
    /// passes to a new thread when its old one exits, and each must ask.
    pub(crate) hooked: AtomicU64,
    /// Set (with release) once the owner has made the stacks. Other threads look only at
    /// made caches; an acquire load of it sees the stacks made.
    made: AtomicBool,
}

impl Default for Body {
    fn default() -> Self {
        Body {
            // An empty boxed slice allocates nothing.
            stacks: Handoff::new(Box::default()),
            held: [const { AtomicU8::new(0) }; MAX_COUNT],
            credit: [const { AtomicU8::new(0) }; MAX_COUNT],
            counters: CacheCounters::default(),
            hooked: AtomicU64::new(0),
            made: AtomicBool::new(false),
        }
    }
}

impl Body {
    /// Makes the stacks, one per class of `sizes`, unless made already; returns whether they
    /// are made. It fails only while a stealer holds them, which no stealer of a cache not
    /// yet made does (stealers look only at made caches).
    ///
    /// # Safety
    /// Only the owner calls it (the contract of [`Handoff::owner`]).
    unsafe fn make(&self, sizes: &SizeClasses) -> bool {
        if self.made.load(Relaxed) {
            return true;
        }
        let classes = sizes.count().min(MAX_COUNT);
        // SAFETY: the caller's contract; the closure does not re-enter the handoff.
        let made = unsafe {
            self.stacks.owner(|stacks| {
                if stacks.is_empty() {
                    *stacks = (0..classes).map(|_| CacheClass::default()).collect();
                }
            })
        }
        .is_some();
        if made {
            self.made.store(true, Release);
            // Orders the store above before this thread's later reads of its pool's state:
            // pairs with the heavy fence of `DevicePool::close` (see there).
            crate::sync::light_fence();
        }
        made
    }

    /// Class `class` of `stacks`, this cache's stacks, with its length: for whoever holds
    /// them (inside the owner's side of the handoff, or a steal).
    ///
    /// # Safety
    /// `stacks` is the value of this body's own `stacks` handoff: the slots below a class's
    /// length own blocks only when that length is the one in this body's `held`.
    #[inline(always)]
    pub(crate) unsafe fn class_mut<'a>(
        &'a self,
        stacks: &'a mut [CacheClass],
        class: usize,
    ) -> Option<ClassMut<'a>> {
        Some(ClassMut { stack: stacks.get_mut(class)?, len: self.held.get(class)? })
    }

    /// Every class of `stacks` (this cache's stacks), with its index, as `class_mut`.
    ///
    /// # Safety
    /// As for [`class_mut`](Self::class_mut).
    pub(crate) unsafe fn classes_mut<'a>(
        &'a self,
        stacks: &'a mut [CacheClass],
    ) -> impl Iterator<Item = (usize, ClassMut<'a>)> {
        stacks.iter_mut().zip(self.held.iter()).map(|(stack, len)| ClassMut { stack, len }).enumerate()
    }

    /// Pops a block of `class` for a caller that asked for `requested` bytes. Runs inside
    /// the owner's side of the handoff, on `stacks`.
    ///
    /// # Safety
    /// As for [`class_mut`](Self::class_mut).
    #[inline(always)]
    pub(crate) unsafe fn pop(
        &self,
        stacks: &mut [CacheClass],
        class: usize,
        requested: usize,
    ) -> Option<Box<Block>> {
        // SAFETY: the caller's contract.
        unsafe { self.pop_if(stacks, class, requested, |_| true) }
    }

    /// Counts a return of a buffer of `requested` bytes whose block does not stay in this
    /// cache; only the owner calls it.
    pub(crate) fn count_return(&self, requested: usize) {
        self.counters.count(-1, requested);
    }

    /// Counts a hit, for a buffer of `requested` bytes; only the owner calls it.
    #[inline(always)]
    pub(crate) fn count_hit(&self, requested: usize) {
        let c = &self.counters;
        c.hits.store(c.hits.load(Relaxed) + 1, Relaxed);
        c.count(1, requested);
    }

    /// [`pop`](Self::pop), for a hit path: only a block with no fence to wait for (a fenced
    /// one stays, for the caller's slow path). Runs inside the owner's side of the handoff.
    ///
    /// # Safety
    /// As for [`class_mut`](Self::class_mut).
    #[inline(always)]
    pub(crate) unsafe fn pop_ready(
        &self,
        stacks: &mut [CacheClass],
        class: usize,
        requested: usize,
    ) -> Option<Box<Block>> {
        // SAFETY: the caller's contract.
        unsafe { self.pop_if(stacks, class, requested, |block| block.fence.is_none()) }
    }

    /// Pops the newest block of `class` if `take` accepts it, and counts the hit.
    ///
    /// # Safety
    /// As for [`class_mut`](Self::class_mut).
    #[inline(always)]
    unsafe fn pop_if(
        &self,
        stacks: &mut [CacheClass],
        class: usize,
        requested: usize,
        take: impl FnOnce(&Block) -> bool,
    ) -> Option<Box<Block>> {
        // SAFETY: the caller's contract.
        let mut slot = unsafe { self.class_mut(stacks, class) }?;
        let block = slot.pop_if(take)?;
        slot.rent();
        self.count_hit(requested);
        Some(block)
    }

    /// Counts a block pushed by the owner, for a buffer of `requested` bytes.
    #[inline(always)]
    pub(crate) fn pushed(&self, requested: usize) {
        self.counters.count(-1, requested);
    }

    /// Publishes the credit of `slot` (class `class`); called by whoever holds the stacks
    /// after changing it. (Its length is published by every change.)
    pub(crate) fn publish(&self, class: usize, slot: &CacheClass) {
        if let Some(credit) = self.credit.get(class) {
            credit.store(slot.credit, Relaxed);
        }
    }

    /// Blocks of `class` held, as last published.
    #[inline]
    pub(crate) fn held(&self, class: usize) -> u64 {
        self.held.get(class).map_or(0, |held| u64::from(held.load(Relaxed)))
    }

    /// Whether the cache, as last published, has credit for `class` beyond its blocks.
    pub(crate) fn has_spare_credit(&self, class: usize) -> bool {
        self.credit.get(class).is_some_and(|credit| u64::from(credit.load(Relaxed)) > self.held(class))
    }

    /// Whether the cache, as last published, has credit beyond its blocks in any of the
    /// pool's `classes` classes.
    pub(crate) fn has_any_spare_credit(&self, classes: usize) -> bool {
        (0..classes.min(MAX_COUNT)).any(|class| self.has_spare_credit(class))
    }
}

impl Drop for Body {
    /// Frees the blocks the cache still holds (a cache is emptied when its thread exits or
    /// its pool closes, so there are none unless the pool is dropped without closing).
    fn drop(&mut self) {
        // This body's own stacks with its own lengths, as `classes_mut` pairs them.
        for (stack, len) in self.stacks.get_mut().iter_mut().zip(self.held.iter()) {
            let mut class = ClassMut { stack, len };
            while class.pop().is_some() {}
        }
    }
}

/// One thread's cache in one pool. Padded: neighbouring threads' caches share no line.
#[derive(Default)]
pub(crate) struct Cache {
    body: Body,
}

impl Cache {
    /// The contents, if the owner has made them.
    #[inline]
    pub(crate) fn body(&self) -> Option<&Body> {
        self.body.made.load(Acquire).then_some(&self.body)
    }

    /// The contents, made or not, for a hit path: a lookup of a class misses in a cache not
    /// made, which has no class. Costs no load, where a check of `made` would cost one.
    #[inline(always)]
    pub(crate) fn contents(&self) -> &Body {
        &self.body
    }

    /// The contents, made now if needed, or `None` if they could not be (see
    /// [`Body::make`]).
    ///
    /// # Safety
    /// This is the calling thread's own cache (only the owner makes it).
    pub(crate) unsafe fn body_or_make(&self, sizes: &SizeClasses) -> Option<&Body> {
        // SAFETY: the caller's contract.
        unsafe { self.body.make(sizes) }.then_some(&self.body)
    }
}
