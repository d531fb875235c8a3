//! The size-class pool of one (device, memory kind).
//!
//! Memory is handed out in [`Block`]s: one backend allocation, rounded up to its size
//! class. A block that comes back goes first to the returning thread's cache (see
//! [`cache`]), if that thread allocates the class, then to a shared per-class store, and is
//! freed only when both are full or the pool is bounded out. (A cache keeps no class its
//! thread has never allocated: a pipeline's consumer sends every block it drops to the
//! store, where the producer takes it back without stealing.) The bounds
//! (`max_pool_bytes_per_class`, `max_pool_bytes`) are kept exactly with *credit*: before a
//! cache or the shared store may keep a block it claims the block's size from atomic
//! budgets, and the credit goes back with trimmed blocks. Caches keep their credit while
//! they hand blocks out, so a steady allocate/free loop touches no shared atomic, and give
//! back what they do not use when they miss, or when a return finds the bounds reached
//! (under the total bound, that of every class: see `reclaim_spare_credit`); a shared
//! store keeps a few small blocks' worth (see `Store`), so a pipeline's crossings do not
//! touch the budgets.
//!
//! An allocation that misses its own cache looks in the shared store, then in other
//! threads' caches (taking their idle blocks of the class under the
//! [`handoff`](crate::handoff) protocol), and only then asks the backend. Reuse across
//! threads, the shape of a pipeline where one thread allocates and another drops, is kept
//! cheap by *demand*: each allocation served from outside its own cache asks, through a
//! per-class counter, for one returned block to go to the shared store instead of the
//! returning thread's cache. A return answers if its cache already holds a block of the
//! class, or if its thread has allocated none of the class since it last kept a block of it
//! under demand (a consumer that allocated the class once and now frees it and allocates at
//! most others: it keeps nothing back, or the block it kept would be the one the producer
//! misses, and steals for). A thread that allocates and frees one block at a time finds its
//! slot empty at each return and has allocated since, so it keeps its blocks (two such
//! threads would otherwise trade them through the shared store forever). A thread *owes*
//! the demand its own allocations raised until its returns pay it: while it owes some, each
//! of its returns under demand pays one unit, by staying and withdrawing the request (or,
//! if it cannot stay, through the store). So a thread that works in batches under standing
//! demand answers it once, then keeps its blocks, rather than pass part of every batch
//! through the store and take it back (which raises the demand again); and a consumer whose
//! own work allocates the producer's class pays for its own buffer with that buffer's
//! return, not with the producer's. The check costs the hit path nothing while there is no
//! demand. A thread that exits hands its cache to the shared store and forgets what it
//! owed.
//!
//! A hit and its return each store only what they must: the handoff's flag, the slot and
//! the class's length (which is also the count other threads read), and two counters, hits
//! and requested bytes, with the owner's plain stores. Live buffers and their bytes are not
//! counted one by one: the statistics find them from what the pool holds (see
//! `DevicePool::statistics`).

pub(crate) mod cache;
mod reaper;
pub(crate) mod size_class;

use crate::backend::{Backend, BackendError, Fence, Queue, RawAllocation};
use crate::device::{AllocationMode, DeviceId, MemoryKind};
use crate::error::OutOfMemoryCause;
use crate::handoff::{Handoff, StealLock};
use crate::stats::{ClassOccupancy, PoolStatistics};
use crate::thread_slots::{ThreadExit, ThreadSlots, on_thread_exit};
use cache::{Body, Cache, CacheClass};
use crossbeam_utils::CachePadded;
use size_class::{MAX_COUNT, SizeClasses};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Most returns one class's demand can ask for at once: allocations served from outside
/// their own cache beyond this ask for nothing more until returns have paid the demand down.
const MAX_DEMAND: u32 = 2 * cache::SLOTS as u32;

/// A pool's state: set when the manager is gone; returned blocks are then freed, not stored.
const CLOSED: u8 = 1 << 0;
/// A pool's state: returned blocks are fenced (device backends with queued work). Set when
/// the pool is made, and never changes.
const FENCED: u8 = 1 << 1;

/// Where a block's memory came from, and so how it is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// From the pool's backend.
    Backend,
    /// A `Vec` adopted without copying: freed with the global allocator and this alignment.
    Vec { align: usize },
}

/// A block's size class, or none for memory that is never pooled: a `u32` with a sentinel
/// rather than an `Option`, so that a return's hit path compares it with one load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockClass(u32);

impl BlockClass {
    /// Never pooled.
    pub(crate) const NONE: Self = BlockClass(u32::MAX);

    /// Class `class`, or [`NONE`](Self::NONE) for none. (Every class is far below the
    /// sentinel: see `size_class::MAX_COUNT`.)
    fn new(class: Option<usize>) -> Self {
        class.and_then(|c| u32::try_from(c).ok()).map_or(Self::NONE, BlockClass)
    }

    /// The class, if any.
    pub(crate) fn get(self) -> Option<usize> {
        (self != Self::NONE).then_some(self.0 as usize)
    }

    /// Whether it is class `class`.
    #[inline(always)]
    fn is(self, class: usize) -> bool {
        self.0 as usize == class
    }
}

/// One allocation, owned by a live buffer or by its pool.
pub(crate) struct Block {
    pub(crate) mem: RawAllocation,
    /// Size class, or none for memory that is never pooled.
    pub(crate) class: BlockClass,
    pub(crate) origin: Origin,
    /// The last device operation that used the memory; reuse waits for it.
    pub(crate) fence: Option<Fence>,
    /// Keeps the pool alive while the block exists, live or pooled.
    pub(crate) pool: Arc<DevicePool>,
    /// The mode the owning buffer was allocated with (set by `Buffer::new`).
    pub(crate) mode: crate::device::AllocationMode,
    /// The state of the buffer that owns the block; at its default while pooled.
    pub(crate) coherence: crate::buffer::Coherence,
}

impl Block {
    /// Bytes of memory the block holds.
    pub(crate) fn capacity(&self) -> usize {
        self.mem.bytes
    }

    /// Hands the block back to its pool, or frees it if the pool cannot keep it.
    /// `requested` is the byte size its buffer reported, for the statistics.
    ///
    /// The common case (an unfenced pool, and room in this thread's cache, reached
    /// recently) makes no call and is inlined into `Buffer`'s drop; everything else is out
    /// of line.
    #[inline(always)]
    pub(crate) fn recycle(self: Box<Self>, requested: usize) {
        if let Some(block) = DevicePool::keep_fast(self, requested) {
            block.recycle_slow(requested);
        }
    }

    /// [`recycle`](Self::recycle) on every path.
    #[cold]
    #[inline(never)]
    fn recycle_slow(mut self: Box<Self>, requested: usize) {
        if self.pool.is_fenced() && self.class.get().is_some() {
            // Soundness rule 2: the next user of this memory waits for everything enqueued
            // so far, which includes this user's last device operation. Without a fence
            // (the marker failed) the block is freed instead of pooled.
            match self.pool.queue().map_or(Ok(None), |queue| queue.fence_after_use(self.pool.kind)) {
                Ok(fence) => self.fence = fence,
                Err(_) => {
                    self.pool.counters.free_errors.fetch_add(1, Relaxed);
                    self.class = BlockClass::NONE;
                }
            }
        }
        let pool: *const DevicePool = Arc::as_ptr(&self.pool);
        // SAFETY: `self` holds a strong reference to the pool, so the pointer is valid until
        // `self` is either freed or stored. `store` frees nothing itself (a rejected block
        // comes back to be dropped here, after `store` has returned), and once it has stored
        // the block its last access to the pool is the unlock that publishes it - the same
        // pattern as a `Mutex` in an `Arc` being unlocked by one thread while another drops
        // the last `Arc`, which touches only atomics.
        if let Some(rejected) = unsafe { DevicePool::store(pool, self, requested) } {
            rejected.retire();
        }
    }

    /// Frees the block: now, if its backend orders the free after the device's last use or
    /// that use has completed; otherwise later, once its fence has completed (deferred, so
    /// that no caller, `Drop` least of all, waits for a device).
    pub(crate) fn retire(mut self: Box<Self>) {
        if self.origin != Origin::Backend {
            return drop(self);
        }
        let Some(queue) = self.pool.queue().filter(|queue| !queue.free_is_ordered(self.pool.kind)) else {
            return drop(self);
        };
        if self.fence.is_none() {
            match queue.record_fence() {
                Ok(fence) => self.fence = Some(fence),
                // The device is broken: no fence, and nothing more will run on it.
                Err(_) => return drop(self),
            }
        }
        Arc::clone(&self.pool).defer_free(self);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // Released before the free: a fence owns nothing of the memory.
        drop(self.fence.take());
        self.pool.free_memory(&self.mem, self.origin);
    }
}

/// Counters changed off the hit path: misses, frees, trims, and the shared store's traffic.
#[derive(Default)]
struct Counters {
    misses: AtomicU64,
    unpooled: AtomicU64,
    reserved: AtomicU64,
    peak: AtomicU64,
    trims: AtomicU64,
    trimmed_bytes: AtomicU64,
    oom_retries: AtomicU64,
    overflows: AtomicU64,
    steals: AtomicU64,
    free_errors: AtomicU64,
    syncs_to_host: AtomicU64,
    syncs_to_device: AtomicU64,
    hits: AtomicU64,
    /// Bytes of memory really held from the backend (live, pooled, waiting to be freed):
    /// `reserved` also counts allocations in progress, against `memory_limit`.
    held: AtomicU64,
    /// Bytes waiting for their last device use before they are freed.
    pending_free: AtomicU64,
    /// Blocks held from the backend (as `held`) and waiting to be freed (as
    /// `pending_free`): with the pooled ones, they give the live buffers, which are not
    /// counted one by one (see `statistics`).
    blocks: AtomicU64,
    pending_blocks: AtomicU64,
    requested: AtomicI64,
}

/// The limits a pool keeps.
pub(crate) struct PoolLimits {
    pub pooling: bool,
    pub per_class: u64,
    pub total: u64,
    pub memory_limit: Option<u64>,
    /// Trim this pool before allocating when the device's free memory runs low.
    pub trim_on_pressure: bool,
}

/// Why a pool could not hand out memory.
pub(crate) enum AcquireError {
    /// The backend or the pool's memory limit refused; trimming may help.
    Exhausted(OutOfMemoryCause),
    /// The request never fits on the device: no trim, no retry.
    TooLarge { largest: u64 },
    /// Anything else the backend said.
    Backend(BackendError),
}

pub(crate) struct DevicePool {
    /// The manager's transfer engine, for `Buffer::copy_from_buffer`.
    engine: Arc<crate::transfer::Engine>,
    pub(crate) manager_id: u64,
    pub(crate) device: DeviceId,
    pub(crate) kind: MemoryKind,
    backend: Arc<dyn Backend>,
    classes: SizeClasses,
    limits: PoolLimits,
    /// Per thread: its cache.
    caches: ThreadSlots<CachePadded<Cache>>,
    /// Serialises threads taking blocks out of other threads' caches.
    steal_lock: StealLock,
    /// Per class: returns wanted in the shared store (see the module documentation). Of
    /// fixed length, in the pool itself, as a cache's `held` (see `cache::Body`).
    demand: [AtomicU32; MAX_COUNT],
    /// Per class: blocks that did not fit in a cache.
    shared: Box<[Mutex<Store>]>,
    /// Per class: bytes of budget claimed by caches' credit and by the shared store.
    class_budget: Box<[AtomicU64]>,
    total_budget: AtomicU64,
    /// [`CLOSED`] and [`FENCED`]: one byte, so that a return's hit path checks both with one
    /// load.
    state: AtomicU8,
    /// Blocks to free once their fences complete (see [`Block::retire`]).
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    deferred: Mutex<Vec<Box<Block>>>,
    counters: Counters,
}

/// The shared store of one class: blocks that did not fit in a cache, and the budget it holds
/// for them. Like a cache, it keeps some credit after its blocks leave (see
/// [`STORE_SPARE_BYTES`]), so that a pipeline's crossings (a return in, an allocation out)
/// claim and give back no budget: two read-modify-writes each on atomics that both of the
/// pipeline's threads write, a fifth of the cost of a crossing at 4 KiB. The credit goes to
/// a cache of the class that finds the bounds reached (`grow_credit`), back to the budget
/// when a claim fails (`reclaim_spare_credit`) and at a trim. A burst of returns claims that
/// allowance at once, and a burst of allocations gives the unused credit back at once when
/// it passes it: one pair of read-modify-writes per allowance's worth of blocks, not one
/// per block.
#[derive(Default)]
struct Store {
    /// Boxed: a block moves between a buffer and the pool without being copied or
    /// reallocated.
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    blocks: Vec<Box<Block>>,
    /// Blocks' worth of budget the store holds: `blocks.len() <= credit`.
    credit: u64,
}

impl Store {
    /// Pushes `block` if the store's credit pays for it; gives it back otherwise.
    fn push_credited(&mut self, block: Box<Block>) -> Result<(), Box<Block>> {
        if to_u64(self.blocks.len()) >= self.credit {
            return Err(block);
        }
        self.blocks.push(block);
        Ok(())
    }

    /// Adds blocks whose budget comes with them.
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    fn append_paid(&mut self, blocks: &mut Vec<Box<Block>>) {
        self.credit += to_u64(blocks.len());
        self.blocks.append(blocks);
    }

    /// Takes the newest block, keeping the credit that paid for it, unless more than
    /// `spare` would then be unused: then all the unused credit goes. Returns the block and
    /// the blocks' worth of credit given up (for the caller to release).
    fn pop(&mut self, spare: u64) -> (Option<Box<Block>>, u64) {
        let block = self.blocks.pop();
        let unused = self.credit - to_u64(self.blocks.len());
        let shed = if unused > spare { unused } else { 0 };
        self.credit -= shed;
        (block, shed)
    }

    /// Takes the newest block with the credit that paid for it.
    fn pop_paid(&mut self) -> Option<Box<Block>> {
        let block = self.blocks.pop()?;
        self.credit -= 1;
        Some(block)
    }

    /// Gives up one block's worth of the credit no block uses, if there is any.
    fn take_one_spare(&mut self) -> bool {
        let spare = self.credit > to_u64(self.blocks.len());
        self.credit -= u64::from(spare);
        spare
    }

    /// Gives up the credit no block uses; returns how many blocks' worth.
    fn take_spare(&mut self) -> u64 {
        let spare = self.credit - to_u64(self.blocks.len());
        self.credit -= spare;
        spare
    }
}

/// Unused credit a shared store may keep (see [`Store`]): as many blocks as a cache holds
/// where they come to at most this many bytes, otherwise one. (With none for the larger
/// classes, the 256 MiB pipeline of `benches/pool.rs` under the default bounds hit 95-97%
/// of its allocations instead of 99.9%: each return had to claim budget that the class's
/// bound, four blocks, often had no room for at that moment, and the block was freed.)
const STORE_SPARE_BYTES: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; should it ever, the data is still a valid
    // list of blocks, so poisoning is ignored rather than propagated into `Drop`.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl DevicePool {
    pub(crate) fn new(
        manager_id: u64,
        device: DeviceId,
        kind: MemoryKind,
        backend: Arc<dyn Backend>,
        divisions: u32,
        limits: PoolLimits,
        engine: Arc<crate::transfer::Engine>,
    ) -> Self {
        let classes = SizeClasses::new(divisions);
        let n = classes.count();
        let fenced = backend.work_queue().is_some();
        crate::sync::init_asymmetric_fence();
        DevicePool {
            manager_id,
            device,
            kind,
            backend,
            caches: ThreadSlots::new(),
            steal_lock: StealLock::default(),
            demand: [const { AtomicU32::new(0) }; MAX_COUNT],
            shared: (0..n).map(|_| Mutex::default()).collect(),
            class_budget: (0..n).map(|_| AtomicU64::new(0)).collect(),
            total_budget: AtomicU64::new(0),
            classes,
            limits,
            state: AtomicU8::new(if fenced { FENCED } else { 0 }),
            deferred: Mutex::new(Vec::new()),
            counters: Counters::default(),
            engine,
        }
    }

    /// The transfer engine of the manager that made this pool (it outlives the manager
    /// while the pool lives).
    pub(crate) fn engine(&self) -> &crate::transfer::Engine {
        &self.engine
    }

    /// Whether the manager is gone (returned blocks are freed, not stored).
    fn is_closed(&self) -> bool {
        self.state.load(Relaxed) & CLOSED != 0
    }

    /// Whether returned blocks are fenced (device backends with queued work).
    pub(crate) fn is_fenced(&self) -> bool {
        self.state.load(Relaxed) & FENCED != 0
    }

    /// The calling thread's cache, if it has made one.
    #[inline(always)]
    fn my_cache(&self) -> Option<&Body> {
        self.caches.current().and_then(|cache| cache.body())
    }

    /// A block of at least `bytes`, pooled if `pooled` and the size has a class.
    #[inline]
    pub(crate) fn acquire(self: &Arc<Self>, bytes: usize, pooled: bool) -> Result<Box<Block>, AcquireError> {
        match self.acquire_fast(bytes, pooled) {
            Some(block) => Ok(block),
            None => self.acquire_slow(bytes, pooled.then(|| self.classes.class_of(bytes)).flatten()),
        }
    }

    /// The hit path: a block from this thread's cache, reached recently, whose last device
    /// use (if any) has been waited for. Makes no call, so that it inlines into the caller
    /// cheaply; `None` (having changed nothing) sends the caller to [`acquire`](Self::acquire).
    #[inline(always)]
    pub(crate) fn acquire_fast(&self, bytes: usize, pooled: bool) -> Option<Box<Block>> {
        // A pool with pooling off makes no caches (only a pooled allocation's miss or a
        // return to a pooling pool makes one), so the lookup below misses for it.
        if !pooled {
            return None;
        }
        let class = self.classes.class_of(bytes)?;
        let body = self.caches.current_cached()?.contents();
        // SAFETY: `current_cached` is the calling thread's own cache (`ThreadSlots` gives
        // each live thread its own slot), and hits only while the fence is expedited;
        // `pop_ready` does not re-enter the pool, and gets `body`'s own stacks.
        unsafe {
            body.stacks.owner_expedited(
                #[inline(always)]
                |stacks| body.pop_ready(stacks, class, bytes),
            )
        }
        .flatten()
    }

    #[cold]
    #[inline(never)]
    fn acquire_slow(
        self: &Arc<Self>,
        bytes: usize,
        class: Option<usize>,
    ) -> Result<Box<Block>, AcquireError> {
        let class = class.filter(|_| self.limits.pooling);
        self.free_completed();
        if let Some(class) = class
            && let Some(body) = self.my_cache()
            // SAFETY: as in `acquire_fast` (`body`'s own stacks to `pop`).
            && let Some(Some(block)) = unsafe { body.stacks.owner(|stacks| body.pop(stacks, class, bytes)) }
        {
            return if block.fence.is_none() { Ok(block) } else { self.ready(block, bytes) };
        }
        let Some(class) = class else {
            let block = self.fresh(bytes.max(1), None, bytes)?;
            self.counters.unpooled.fetch_add(1, Relaxed);
            return Ok(block);
        };
        let cap = self.classes.size_of(class);
        self.init_cache();
        if let Some(body) = self.my_cache() {
            // This cache has no block of the class: its spare credit goes back, so that a
            // thread that only allocates does not sit on room that returns elsewhere need.
            // SAFETY: as in `acquire_fast` (`body`'s own stacks to `class_mut`).
            let spare = unsafe {
                body.stacks.owner(|stacks| {
                    body.class_mut(stacks, class).map_or(0, |mut slot| {
                        slot.rented_elsewhere();
                        let spare = slot.take_spare_credit();
                        body.publish(class, &slot);
                        spare
                    })
                })
            };
            self.release_budget(class, u64::from(spare.unwrap_or(0)));
        }
        // A block from the store leaves its credit there; one stolen brings its own, which
        // goes.
        let spare = self.store_spare(class);
        let (stored, shed) = self.shared.get(class).map_or((None, 0), |s| lock(s).pop(spare));
        self.release_budget(class, shed);
        let found = match stored {
            Some(block) => Some(block),
            None => self.steal(class).inspect(|_| self.release_budget(class, 1)),
        };
        if let Some(block) = found {
            // Counted in this thread's cache where it has one (its owner's plain stores),
            // rather than with read-modify-writes on the pool's lines, which a pipeline's
            // other thread writes too.
            match self.my_cache() {
                Some(body) => body.count_hit(bytes),
                None => {
                    self.count_requested(1, bytes);
                    self.counters.hits.fetch_add(1, Relaxed);
                }
            }
            // Served from outside this thread's cache: ask for a return to the shared store,
            // and remember the request as this thread's own, for its returns to withdraw.
            if let Some(demand) = self.demand.get(class)
                && demand.fetch_update(Relaxed, Relaxed, |d| (d < MAX_DEMAND).then_some(d + 1)).is_ok()
                && let Some(body) = self.my_cache()
            {
                // SAFETY: as in `acquire`.
                unsafe {
                    body.stacks.owner(|stacks| stacks.get_mut(class).map(|slot| slot.owe(MAX_DEMAND as u8)))
                };
            }
            return self.ready(block, bytes);
        }
        let block = self.fresh(cap, Some(class), bytes)?;
        self.counters.misses.fetch_add(1, Relaxed);
        Ok(block)
    }

    /// Waits for the last device use of a reused block.
    /// `requested` is what the caller asked for: already counted as live, and uncounted
    /// again if the block cannot be used.
    #[cold]
    fn ready(&self, mut block: Box<Block>, requested: usize) -> Result<Box<Block>, AcquireError> {
        let waited = block.fence.as_ref().map_or(Ok(()), Fence::wait);
        if let Err(e) = waited {
            // The memory's state is unknown: the block is retired with its fence.
            self.count_requested(-1, requested);
            block.retire();
            return Err(AcquireError::Backend(e));
        }
        block.fence = None;
        Ok(block)
    }

    fn fresh(
        self: &Arc<Self>,
        cap: usize,
        class: Option<usize>,
        requested: usize,
    ) -> Result<Box<Block>, AcquireError> {
        if !self.reserve(to_u64(cap)) {
            let limit = self.limits.memory_limit.unwrap_or(u64::MAX);
            return Err(AcquireError::Exhausted(OutOfMemoryCause::MemoryLimit { limit }));
        }
        if self.limits.trim_on_pressure && self.under_pressure(cap) {
            self.trim_to(0);
        }
        match self.backend.allocate(cap, self.kind) {
            Ok(mem) => {
                self.count_held(mem.bytes);
                self.count_requested(1, requested);
                // A pooled block's capacity is its class's size, which the statistics count
                // it as while it is pooled; memory of another size is not pooled.
                let class = BlockClass::new(class.filter(|_| mem.bytes == cap));
                Ok(Box::new(Block {
                    mem,
                    class,
                    origin: Origin::Backend,
                    fence: None,
                    pool: Arc::clone(self),
                    mode: AllocationMode::Pooled,
                    coherence: Default::default(),
                }))
            }
            Err(e) => {
                self.counters.reserved.fetch_sub(to_u64(cap), Relaxed);
                Err(match e {
                    BackendError::OutOfMemory { .. } => AcquireError::Exhausted(OutOfMemoryCause::Device),
                    BackendError::LockLimit { limit, .. } => {
                        AcquireError::Exhausted(OutOfMemoryCause::LockLimit { limit })
                    }
                    BackendError::TooLarge { largest, .. } => AcquireError::TooLarge { largest },
                    e => AcquireError::Backend(e),
                })
            }
        }
    }

    /// Takes ownership of memory that did not come from the backend (an adopted `Vec`).
    pub(crate) fn adopt(self: &Arc<Self>, mem: RawAllocation, align: usize, requested: usize) -> Box<Block> {
        let cap = mem.bytes;
        self.counters.reserved.fetch_add(to_u64(cap), Relaxed);
        self.count_held(cap);
        self.counters.unpooled.fetch_add(1, Relaxed);
        self.count_requested(1, requested);
        Box::new(Block {
            mem,
            class: BlockClass::NONE,
            origin: Origin::Vec { align },
            fence: None,
            pool: Arc::clone(self),
            mode: AllocationMode::Unpooled,
            coherence: Default::default(),
        })
    }

    /// Adds `bytes` to the reserved total unless that breaks the memory limit.
    fn reserve(&self, bytes: u64) -> bool {
        let limit = self.limits.memory_limit.unwrap_or(u64::MAX);
        let reserved = &self.counters.reserved;
        let mut current = reserved.load(Relaxed);
        loop {
            let Some(next) = current.checked_add(bytes).filter(|&n| n <= limit) else {
                return false;
            };
            match reserved.compare_exchange_weak(current, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }

    /// Counts a block of `bytes` more held from the backend, raising the peak: only memory
    /// really held counts towards it, never a reservation that the backend then refused.
    fn count_held(&self, bytes: usize) {
        self.counters.blocks.fetch_add(1, Relaxed);
        let held = self.counters.held.fetch_add(to_u64(bytes), Relaxed).saturating_add(to_u64(bytes));
        self.counters.peak.fetch_max(held, Relaxed);
    }

    /// Keeps `block` until its fence completes (see [`Block::retire`]); frees it now if it
    /// already has. Once the manager is gone nobody would look again, so the process-wide
    /// reaper thread waits for it instead.
    fn defer_free(&self, block: Box<Block>) {
        // A fence that cannot be asked keeps its block: freeing it could free memory a copy
        // still uses. The manager's drop waits for it (and frees it if even that fails).
        if block.fence.as_ref().is_none_or(|fence| fence.is_complete().unwrap_or(false)) {
            return drop(block);
        }
        let block = {
            let mut deferred = lock(&self.deferred);
            if !self.is_closed() {
                self.count_pending(&block, 1);
                deferred.push(block);
                return;
            }
            block
        };
        // An error means the device is broken: nothing more runs on it.
        block.free_after(|block| drop(block.fence.as_ref().map(Fence::wait)));
    }

    /// Frees deferred blocks whose fences have completed; with `wait`, waits for the rest
    /// first (only when the manager is dropped).
    pub(crate) fn free_completed_or_wait(&self, wait: bool) {
        let done: Vec<Box<Block>> = {
            let mut deferred = lock(&self.deferred);
            if deferred.is_empty() {
                return;
            }
            let (done, keep) = std::mem::take(&mut *deferred).into_iter().partition(|block| {
                block.fence.as_ref().is_none_or(|fence| match wait {
                    // A failed wait means a broken device: nothing more runs on it.
                    true => {
                        let _ = fence.wait();
                        true
                    }
                    false => fence.is_complete().unwrap_or(false),
                })
            });
            *deferred = keep;
            done
        };
        for block in done {
            self.count_pending(&block, -1);
            drop(block);
        }
    }

    fn free_completed(&self) {
        // Deferred blocks are counted in `pending_free` before they are listed, so zero
        // means none to look at (one listed meanwhile waits for the next call): a miss
        // then takes no lock here.
        if self.counters.pending_free.load(Relaxed) > 0 {
            self.free_completed_or_wait(false);
        }
    }

    /// Counts a buffer of `requested` bytes made (`sign = 1`) or gone (`sign = -1`) outside
    /// any cache.
    fn count_requested(&self, sign: i64, requested: usize) {
        self.counters.requested.fetch_add(sign * to_i64(requested), Relaxed);
    }

    /// Counts `block` as waiting to be freed (`sign = 1`), or no longer (`sign = -1`).
    fn count_pending(&self, block: &Block, sign: i64) {
        let c = &self.counters;
        let bytes = to_u64(block.capacity());
        if sign > 0 {
            c.pending_free.fetch_add(bytes, Relaxed);
            c.pending_blocks.fetch_add(1, Relaxed);
        } else {
            c.pending_free.fetch_sub(bytes, Relaxed);
            c.pending_blocks.fetch_sub(1, Relaxed);
        }
    }

    /// Claims budget for `blocks` blocks of `class`, against the class and the total bound.
    fn claim_budget(&self, class: usize, blocks: u64) -> bool {
        let Some(budget) = self.class_budget.get(class) else {
            return false;
        };
        let bytes = blocks * to_u64(self.classes.size_of(class));
        let fits = |limit: u64| move |used: u64| used.checked_add(bytes).filter(|&n| n <= limit);
        if budget.fetch_update(Relaxed, Relaxed, fits(self.limits.per_class)).is_err() {
            return false;
        }
        if self.total_budget.fetch_update(Relaxed, Relaxed, fits(self.limits.total)).is_err() {
            budget.fetch_sub(bytes, Relaxed);
            return false;
        }
        true
    }

    fn release_budget(&self, class: usize, blocks: u64) {
        // Nothing to give back is common (a pipeline's producer misses its cache with no
        // spare credit on every allocation): no write to the budgets' lines, which the
        // pipeline's other thread writes too.
        if blocks == 0 {
            return;
        }
        let bytes = blocks * to_u64(self.classes.size_of(class));
        if let Some(budget) = self.class_budget.get(class) {
            budget.fetch_sub(bytes, Relaxed);
        }
        self.total_budget.fetch_sub(bytes, Relaxed);
    }

    /// The hit path of [`Block::recycle`]: keeps `block` in this thread's cache, reached
    /// recently, if the pool is unfenced, the cache has credit for it and the return does
    /// not answer other threads' demand for its class (see [`keep`](Self::keep)). Makes no
    /// call; gives the block back, with nothing changed, otherwise.
    #[inline(always)]
    fn keep_fast(block: Box<Block>, requested: usize) -> Option<Box<Block>> {
        // SAFETY: `block` holds a strong reference to the pool; the pool is used only until
        // the block is published (the owner's release of its cache), as in `recycle_slow`.
        let pool = unsafe { &*Arc::as_ptr(&block.pool) };
        let Some(body) = pool.caches.current_cached().map(|cache| cache.contents()) else {
            return Some(block);
        };
        // The class, from the buffer's size rather than from the block: a loop that frees
        // what it allocated then waits for no load through the block's pointer (a chain of
        // dependent loads from one allocation to the next) before it reaches its slot.
        // Checking the block's own class is only a branch.
        let Some(class) = pool.classes.class_of(requested) else { return Some(block) };
        if !block.class.is(class) {
            return Some(block);
        }
        let mut block = Some(block);
        // SAFETY: as in `acquire_fast`; `keep` does not re-enter the pool's caches, and gets
        // `body`'s own stacks.
        let kept = unsafe {
            body.stacks.owner_expedited(
                #[inline(always)]
                |stacks| pool.keep(body, stacks, class, &mut block, requested, false),
            )
        };
        match kept {
            // The cache's release of its owner flag was the last use of `pool`.
            Some(true) => None,
            _ => block,
        }
    }

    /// The owner's side of [`keep_fast`](Self::keep_fast) and [`store`](Self::store): keeps
    /// `block` in `stacks` (this thread's cache) if the pool is open, the return does not
    /// answer demand for its class elsewhere (`CacheClass::declines`) and the slot has credit;
    /// with `grow` (off the hit path: it may call out, take the class's store lock and write
    /// shared atomics) a full slot first claims one more block of credit (or takes it from
    /// the store), and a return under demand while the thread owes some pays one unit of it.
    /// Returns whether it kept it.
    ///
    /// # Safety
    /// `stacks` is `body`'s own (as for [`Body::class_mut`]).
    #[inline(always)]
    unsafe fn keep(
        &self,
        body: &Body,
        stacks: &mut [CacheClass],
        class: usize,
        block: &mut Option<Box<Block>>,
        requested: usize,
        grow: bool,
    ) -> bool {
        // `CLOSED` is read inside the owner's side of the handoff: `close` sets it before it
        // claims every cache to drain it, so a block kept here is either drained by `close`
        // or not kept at all (the handoff orders the two; see `handoff`). A fenced pool's
        // returns are for the slow path (`grow`), which fences them first
        // (`Block::recycle_slow`): the hit path's check of both is one load.
        let state = self.state.load(Relaxed);
        if state & CLOSED != 0 || (!grow && state & FENCED != 0) {
            return false;
        }
        #[cfg(test)]
        tests::fail_point::after_state_check();
        // SAFETY: the caller's contract.
        let Some(mut slot) = (unsafe { body.class_mut(stacks, class) }) else { return false };
        // A class this thread never allocates goes to the shared store, where the threads
        // that allocate it find it without stealing.
        if !slot.rented() {
            return false;
        }
        // Demand for the class elsewhere is answered by a return to a cache that already
        // holds a block of it, or from a thread that has allocated none of the class since
        // it last kept a block of it under demand (see the module documentation).
        let under_demand = self.demand.get(class).is_some_and(|demand| demand.load(Relaxed) > 0);
        // While this thread owes demand (raised by its own allocations and not yet paid),
        // a return under demand pays one unit: it stays, withdrawing the request it answers
        // (a thread that works in batches would otherwise send part of each batch through
        // the shared store and take it back from there, which raises the demand again), or,
        // if it cannot stay, the shared store answers it. Off the hit path: it writes the
        // shared demand.
        let withdraw = under_demand && slot.owes();
        if withdraw && !grow {
            return false;
        }
        if under_demand && !withdraw && !slot.declines() {
            return false;
        }
        if withdraw {
            slot.withdrawn();
        }
        let Some(taken) = block.take() else { return false };
        if grow && slot.len() == slot.credit() {
            self.grow_credit(body, &mut slot, class);
        }
        match slot.push_credited(taken) {
            Ok(()) => {
                if under_demand {
                    slot.kept_under_demand();
                }
                if withdraw && let Some(demand) = self.demand.get(class) {
                    let _ = demand.fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1));
                }
                body.pushed(requested);
                true
            }
            Err(taken) => {
                *block = Some(taken);
                false
            }
        }
    }

    /// Stores a returned block, or gives it back to be freed.
    ///
    /// # Safety
    /// `pool` points to the live pool that `block.pool` refers to. The pool is used only
    /// until the block is published (see [`Block::recycle`]).
    #[inline]
    unsafe fn store(pool: *const DevicePool, block: Box<Block>, requested: usize) -> Option<Box<Block>> {
        // SAFETY: the caller guarantees that `pool` is valid for as long as we use it.
        let pool = unsafe { &*pool };
        let Some(class) = block.class.get() else {
            pool.count_requested(-1, requested);
            return Some(block);
        };
        let mut body = pool.my_cache();
        if body.is_none() && pool.limits.pooling {
            // A thread that only frees gets a cache too (as one that allocates does at its
            // first miss): its returns are then counted by its own plain stores, not with
            // read-modify-writes on the pool's lines that a pipeline's producer writes.
            block.pool.init_cache();
            body = pool.my_cache();
        }
        let mut block = Some(block);
        if let Some(body) = body
            // SAFETY: as in `acquire_fast`; `keep` does not re-enter the pool's caches, and
            // gets `body`'s own stacks.
            && let Some(true) = unsafe { body.stacks.owner(|stacks| pool.keep(body, stacks, class, &mut block, requested, true)) }
        {
            // The cache's release of its owner flag was the last use of `pool`: from then
            // on a stealer may take the block and drop the pool with it.
            return None;
        }
        pool.store_shared(block?, class, requested)
    }

    /// Unused credit the shared store of `class` may keep, in blocks (see
    /// [`STORE_SPARE_BYTES`]).
    fn store_spare(&self, class: usize) -> u64 {
        let size = to_u64(self.classes.size_of(class));
        if size <= STORE_SPARE_BYTES / cache::SLOTS as u64 { cache::SLOTS as u64 } else { 1 }
    }

    /// Claims one more block of credit for a cache's class, if the bounds allow, or, for a
    /// thread that allocates the class, takes it from the credit the class's shared store
    /// holds without a block (no budget changes hands: otherwise a store that kept its credit
    /// could shut the class's caches out of a bound it has reached, and every return would
    /// go through the store). Not for a thread that only frees the class, a pipeline's
    /// consumer: the block it kept would be one its producer then steals.
    #[cold]
    #[inline(never)]
    fn grow_credit(&self, body: &Body, slot: &mut CacheClass, class: usize) {
        if !slot.can_grow() {
            return;
        }
        if self.claim_budget(class, 1)
            || (slot.rented_since_kept() && self.shared.get(class).is_some_and(|s| lock(s).take_one_spare()))
        {
            slot.add_credit();
            body.publish(class, slot);
        }
    }

    /// The shared store's half of [`store`](Self::store), with the same contract.
    #[cold]
    #[inline(never)]
    fn store_shared(&self, block: Box<Block>, class: usize, requested: usize) -> Option<Box<Block>> {
        match self.my_cache() {
            Some(body) => body.count_return(requested),
            None => self.count_requested(-1, requested),
        }
        let Some(shared) = self.shared.get(class) else {
            return Some(block);
        };
        if let Some(demand) = self.demand.get(class) {
            let _ = demand.fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1));
        }
        // Into the store on its own credit if it has some left (a pipeline's steady state),
        // otherwise on more budget: the store's allowance of spare credit at once if the
        // bounds have room for it (a burst of returns then claims once per allowance), else
        // one block's worth. Claimed under the store's lock: only the budgets' atomics.
        let mut store = lock(shared);
        if self.is_closed() {
            return Some(block);
        }
        let Err(block) = store.push_credited(block) else {
            return None; // The unlock that follows is the last use of the pool.
        };
        let spare = self.store_spare(class);
        let fallback = (spare > 1).then_some(1);
        if let Some(blocks) = std::iter::once(spare).chain(fallback).find(|&n| self.claim_budget(class, n)) {
            store.credit += blocks;
            return store.push_credited(block).err(); // `None`; as above.
        }
        drop(store);
        // The bounds are reached: take back the credit held without blocks and try again.
        let claimed = self.reclaim_spare_credit(class) && self.claim_budget(class, 1);
        let mut store = lock(shared);
        if self.is_closed() {
            drop(store);
            if claimed {
                self.release_budget(class, 1);
            }
            return Some(block);
        }
        if claimed {
            store.credit += 1;
            return store.push_credited(block).err(); // As above.
        }
        // An allocation may have left the store credit meanwhile.
        match store.push_credited(block) {
            Ok(()) => None, // As above.
            Err(block) => {
                drop(store);
                self.counters.overflows.fetch_add(1, Relaxed);
                Some(block)
            }
        }
    }

    /// Makes this thread's cache if it has none yet, and asks to hear when the thread exits.
    fn init_cache(self: &Arc<Self>) {
        let Some(cache) = self.caches.current() else { return };
        // SAFETY: `current` is the calling thread's own cache.
        let Some(body) = (unsafe { cache.body_or_make(&self.classes) }) else { return };
        let me = crate::thread_slots::thread_id();
        // Only this slot's owner writes it (as for the cache itself).
        if body.hooked.load(Relaxed) != me {
            body.hooked.store(me, Relaxed);
            let weak: std::sync::Weak<DevicePool> = Arc::downgrade(self);
            on_thread_exit(weak);
        }
    }

    /// The caches other than the calling thread's that `wanted` picks, with their bodies.
    fn other_caches(&self, wanted: impl Fn(&Body) -> bool) -> Picked<'_> {
        let mine = self.my_cache().map(std::ptr::from_ref::<Body>);
        self.all_caches(|body| Some(std::ptr::from_ref::<Body>(body)) != mine && wanted(body))
    }

    /// Every thread's cache that `wanted` picks, with their bodies.
    fn all_caches(&self, wanted: impl Fn(&Body) -> bool) -> Picked<'_> {
        self.caches
            .iter()
            .filter_map(|cache| cache.body())
            .filter(|body| wanted(body))
            .map(|body| (&body.stacks, body))
            .unzip()
    }

    /// Takes the idle blocks of `class` from other threads' caches: one for the caller, the
    /// rest to the shared store, with the credit that paid for them (so the budget does not
    /// change). Their spare credit for the class is given back too.
    #[cold]
    fn steal(&self, class: usize) -> Option<Box<Block>> {
        let (cells, bodies) = self.other_caches(|body| body.held(class) > 0);
        let mut taken = Vec::new();
        self.steal_lock.steal(&cells, |n, stacks| {
            // SAFETY: `cells` and `bodies` are pairs (`other_caches`): `stacks` is
            // `bodies[n]`'s own.
            if let Some(mut slot) = unsafe { bodies[n].class_mut(stacks, class) } {
                slot.take_all(&mut taken);
                self.release_budget(class, u64::from(slot.take_spare_credit()));
                bodies[n].publish(class, &slot);
            }
        });
        let first = taken.pop()?;
        self.counters.steals.fetch_add(1, Relaxed);
        self.keep_shared(class, taken);
        Some(first)
    }

    /// Gives back credit that no held block uses, to make room for a block of `class`: that
    /// of every class's shared store, and that of caches. Under the class bound only the
    /// class's own counts; under the total bound every class's does (a thread whose blocks
    /// are out again keeps their credit, and would otherwise shut every other class out of
    /// a pool that holds nothing). This thread's cache gives its spare credit through its
    /// owner's side, with no barrier; other threads' caches are stopped for a moment, with
    /// one, and only those that published some spare credit. Returns whether there was any.
    /// A cost paid only by a return that found the bounds reached, and is otherwise freed.
    ///
    /// Called only outside this thread's owner section (a return, after `keep`).
    #[cold]
    fn reclaim_spare_credit(&self, class: usize) -> bool {
        let mut reclaimed = self.reclaim_store_credit();
        let size = to_u64(self.classes.size_of(class));
        let total = self.total_budget.load(Relaxed).saturating_add(size) > self.limits.total;
        let count = self.classes.count();
        let mut spare = vec![0; count];
        let mut take = |body: &Body, stacks: &mut [CacheClass]| {
            // SAFETY: both callers below pass a body with its own stacks (this thread's, or
            // the pairs of `other_caches`).
            for (c, mut slot) in unsafe { body.classes_mut(stacks) }.filter(|&(c, _)| total || c == class) {
                if let Some(spare) = spare.get_mut(c) {
                    *spare += u64::from(slot.take_spare_credit());
                }
                body.publish(c, &slot);
            }
        };
        if let Some(body) = self.my_cache() {
            // SAFETY: this thread's own cache, from outside its owner section (see above);
            // `take` does not re-enter the pool's caches. A stealer holding it now means
            // this cache gives nothing this time.
            unsafe { body.stacks.owner(|stacks| take(body, stacks)) };
        }
        let wanted =
            |body: &Body| if total { body.has_any_spare_credit(count) } else { body.has_spare_credit(class) };
        let (cells, bodies) = self.other_caches(wanted);
        self.steal_lock.steal(&cells, |n, stacks| take(bodies[n], stacks));
        for (c, blocks) in spare.into_iter().enumerate() {
            self.release_budget(c, blocks);
            reclaimed |= blocks > 0;
        }
        reclaimed
    }

    /// Gives back the credit every shared store holds without a block; returns whether there
    /// was any. Takes each store's lock in turn (never two at once).
    fn reclaim_store_credit(&self) -> bool {
        let mut reclaimed = false;
        for (class, shared) in self.shared.iter().enumerate() {
            let spare = lock(shared).take_spare();
            self.release_budget(class, spare);
            reclaimed |= spare > 0;
        }
        reclaimed
    }

    /// Puts `blocks` of `class`, already paid for by budget, into the shared store (or frees
    /// them, giving the budget back, if the pool is closed).
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    fn keep_shared(&self, class: usize, mut blocks: Vec<Box<Block>>) {
        if blocks.is_empty() {
            return;
        }
        if let Some(shared) = self.shared.get(class) {
            let mut shared = lock(shared);
            if !self.is_closed() {
                shared.append_paid(&mut blocks);
                return;
            }
        }
        self.release_budget(class, to_u64(blocks.len()));
        for block in blocks {
            block.retire();
        }
    }

    /// The out-of-memory error for `bytes` of host memory that a buffer of this pool needed
    /// (a host mirror, staging), with this pool's statistics.
    pub(crate) fn host_out_of_memory(&self, bytes: usize) -> crate::Error {
        crate::Error::OutOfMemory {
            requested: to_u64(bytes),
            device: DeviceId::CPU,
            kind: MemoryKind::Device,
            cause: OutOfMemoryCause::Device,
            stats: Box::new(crate::stats::MemoryStatistics::from_pools(vec![self.statistics()])),
        }
    }

    /// Counts a coherence copy of a buffer of this pool.
    pub(crate) fn count_sync(&self, to_host: bool) {
        let counter = if to_host { &self.counters.syncs_to_host } else { &self.counters.syncs_to_device };
        counter.fetch_add(1, Relaxed);
    }

    /// The backend, for transfers.
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The backend's queue, for devices with one.
    pub(crate) fn queue(&self) -> Option<&dyn Queue> {
        self.backend.work_queue()
    }

    fn free_memory(&self, mem: &RawAllocation, origin: Origin) {
        let result = match origin {
            // SAFETY: a block's memory came from this pool's backend (Origin::Backend), and a
            // block is dropped only when no buffer or device operation uses it any more.
            Origin::Backend => unsafe { self.backend.free(mem, self.kind) },
            Origin::Vec { align } => {
                free_vec(mem, align);
                Ok(())
            }
        };
        if result.is_err() {
            self.counters.free_errors.fetch_add(1, Relaxed);
        }
        self.counters.reserved.fetch_sub(to_u64(mem.bytes), Relaxed);
        self.counters.held.fetch_sub(to_u64(mem.bytes), Relaxed);
        self.counters.blocks.fetch_sub(1, Relaxed);
    }

    /// Frees pooled blocks, largest classes first, until at most `keep` bytes stay pooled.
    /// Returns the bytes freed.
    pub(crate) fn trim_to(&self, keep: u64) -> u64 {
        let mut pooled = self.pooled_bytes();
        let mut freed = Vec::new();
        for class in (0..self.classes.count()).rev() {
            if pooled <= keep {
                break;
            }
            let size = to_u64(self.classes.size_of(class));
            let taken = self.take_class(class, pooled.saturating_sub(keep).div_ceil(size), &mut freed);
            pooled = pooled.saturating_sub(taken * size);
        }
        // A trim also ends the shared stores' hold on credit that no block uses.
        self.reclaim_store_credit();
        self.retire_trimmed(freed)
    }

    /// Frees up to `blocks` pooled blocks of `class`. Returns the bytes freed.
    pub(crate) fn trim_class(&self, class: usize, blocks: u64) -> u64 {
        let mut freed = Vec::new();
        self.take_class(class, blocks, &mut freed);
        self.retire_trimmed(freed)
    }

    /// Moves up to `take` pooled blocks of `class` into `freed`, giving back the budget they
    /// held. Returns how many it moved.
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    fn take_class(&self, class: usize, take: u64, freed: &mut Vec<Box<Block>>) -> u64 {
        let mut left = take;
        // Every cache once the pool is closed (see `keep`); otherwise those that hold blocks
        // of the class or credit for it.
        let closed = self.is_closed();
        let (cells, bodies) =
            self.all_caches(|body| closed || body.held(class) > 0 || body.has_spare_credit(class));
        self.steal_lock.steal(&cells, |n, stacks| {
            // SAFETY: `cells` and `bodies` are pairs (`all_caches`).
            let Some(mut slot) = (unsafe { bodies[n].class_mut(stacks, class) }) else { return };
            while left > 0 {
                let Some(block) = slot.take_one() else { break };
                self.release_budget(class, 1);
                freed.push(block);
                left -= 1;
            }
            // Give back the credit that no pooled block uses any more.
            self.release_budget(class, u64::from(slot.take_spare_credit()));
            bodies[n].publish(class, &slot);
        });
        if let Some(shared) = self.shared.get(class) {
            let mut shared = lock(shared);
            while left > 0 {
                let Some(block) = shared.pop_paid() else { break };
                self.release_budget(class, 1);
                freed.push(block);
                left -= 1;
            }
            self.release_budget(class, shared.take_spare());
        }
        take - left
    }

    /// Frees trimmed blocks (deferred where their last use may still run) and counts the
    /// trim. Returns the bytes trimmed.
    #[allow(clippy::vec_box, reason = "blocks move in and out of buffers as boxes")]
    fn retire_trimmed(&self, freed: Vec<Box<Block>>) -> u64 {
        let bytes: u64 = freed.iter().map(|b| to_u64(b.capacity())).sum();
        for block in freed {
            block.retire();
        }
        if let Some(queue) = self.queue().filter(|_| bytes > 0) {
            queue.release_cached();
        }
        self.counters.trims.fetch_add(1, Relaxed);
        self.counters.trimmed_bytes.fetch_add(bytes, Relaxed);
        bytes
    }

    /// The pooled blocks per class: `(class index, class bytes, blocks)`, occupied classes
    /// only.
    pub(crate) fn pooled_classes(&self) -> Vec<(usize, u64, u64)> {
        self.occupancy().into_iter().map(|(class, o)| (class, o.class_bytes, o.buffers)).collect()
    }

    /// Whether the device, asked for `bytes` more, would have less than 1/16 of its memory
    /// free (devices that report free memory only, such as CUDA's `cuMemGetInfo`).
    fn under_pressure(&self, bytes: usize) -> bool {
        // Nothing pooled, nothing to trim: skip the driver query.
        if self.pooled_bytes() == 0 {
            return false;
        }
        let Some((free, total)) = self.queue().and_then(|queue| queue.free_and_total()) else { return false };
        free.saturating_sub(to_u64(bytes)) < total / 16
    }

    /// Marks the pool closed (its manager is gone) and frees everything it holds, waiting
    /// for the last device use of blocks whose frees were deferred.
    pub(crate) fn close(&self) {
        {
            // Under the lock that `defer_free` checks `CLOSED` under: no block is deferred
            // into the list after this.
            let _deferred = lock(&self.deferred);
            self.state.fetch_or(CLOSED, Relaxed);
        }
        // Pairs with the fence after a cache is made (`Body::make`): either this thread sees
        // that cache made below (and claims it), or its owner sees `CLOSED` at its next
        // return (and keeps nothing). Without it, a cache made as the pool closed could be
        // missed by the drain and still keep a block read against a stale state.
        crate::sync::heavy_fence();
        // Every class, claiming every cache (see `take_class`), whatever the pool seems to
        // hold: a return that read the state before `CLOSED` was set may keep its block in
        // its cache after a count of pooled blocks read none there (`trim_to(0)` would then
        // stop at once); the claim waits for it and drains the block (see `keep`).
        let mut freed = Vec::new();
        for class in 0..self.classes.count() {
            self.take_class(class, u64::MAX, &mut freed);
        }
        self.reclaim_store_credit();
        self.retire_trimmed(freed);
        self.free_completed_or_wait(true);
    }

    pub(crate) fn count_oom_retry(&self) {
        self.counters.oom_retries.fetch_add(1, Relaxed);
    }

    fn pooled_bytes(&self) -> u64 {
        self.occupancy().iter().map(|(_, c)| c.class_bytes * c.buffers).sum()
    }

    /// Occupied classes, with their indices.
    fn occupancy(&self) -> Vec<(usize, ClassOccupancy)> {
        let bodies: Vec<&Body> = self.caches.iter().filter_map(|cache| cache.body()).collect();
        // Per class, the caches are read under the shared store's lock: a thread that exits
        // moves its blocks into the store and publishes its emptied cache under that lock,
        // so a snapshot taken as threads exit sees each block once.
        // A snapshot taken while other threads work may still see one block twice (taken
        // from the store, used and returned to a cache between the reads). Every pooled
        // block is paid for by the class's budget, so no class shows more than that.
        let buffers =
            self.shared.iter().zip(self.class_budget.iter()).enumerate().map(|(class, (shared, budget))| {
                let shared = lock(shared);
                let counted =
                    to_u64(shared.blocks.len()) + bodies.iter().map(|body| body.held(class)).sum::<u64>();
                counted.min(budget.load(Relaxed) / to_u64(self.classes.size_of(class)))
            });
        buffers
            .enumerate()
            .filter(|&(_, n)| n > 0)
            .map(|(class, n)| {
                (class, ClassOccupancy { class_bytes: to_u64(self.classes.size_of(class)), buffers: n })
            })
            .collect()
    }

    /// The pool's statistics. Live buffers are not counted one by one (a hit and its return
    /// would write two more counters each): every block held from the backend is live,
    /// pooled or waiting to be freed, so the live ones are what the other two leave. That
    /// balance (`allocated + pooled + pending_free == reserved`) is then exact whenever the
    /// pool is quiet, by construction; while other threads work, the parts are read at
    /// slightly different instants, as every figure here is.
    pub(crate) fn statistics(&self) -> PoolStatistics {
        self.free_completed();
        let c = &self.counters;
        let classes: Vec<ClassOccupancy> = self.occupancy().into_iter().map(|(_, o)| o).collect();
        let pooled = classes
            .iter()
            .map(|o| o.class_bytes * o.buffers)
            .sum::<u64>()
            .min(self.total_budget.load(Relaxed));
        let pooled_blocks: u64 = classes.iter().map(|o| o.buffers).sum();
        let (held, pending_free) = (c.held.load(Relaxed), c.pending_free.load(Relaxed));
        let (blocks, pending_blocks) = (c.blocks.load(Relaxed), c.pending_blocks.load(Relaxed));
        let mut sum = Sums { hits: c.hits.load(Relaxed), requested: c.requested.load(Relaxed) };
        for body in self.caches.iter().filter_map(|cache| cache.body()) {
            let s = &body.counters;
            sum.hits = sum.hits.wrapping_add(s.hits.load(Relaxed));
            sum.requested = sum.requested.wrapping_add(s.requested.load(Relaxed));
        }
        PoolStatistics {
            device: Some(self.device),
            kind: Some(self.kind),
            allocated: held.saturating_sub(pooled).saturating_sub(pending_free),
            pooled,
            reserved: held,
            pending_free,
            requested: u64::try_from(sum.requested).unwrap_or(0),
            hits: sum.hits,
            misses: c.misses.load(Relaxed),
            unpooled: c.unpooled.load(Relaxed),
            active_buffers: blocks.saturating_sub(pooled_blocks).saturating_sub(pending_blocks),
            peak: c.peak.load(Relaxed),
            trims: c.trims.load(Relaxed),
            trimmed_bytes: c.trimmed_bytes.load(Relaxed),
            oom_retries: c.oom_retries.load(Relaxed),
            overflows: c.overflows.load(Relaxed),
            steals: c.steals.load(Relaxed),
            free_errors: c.free_errors.load(Relaxed),
            syncs_to_host: c.syncs_to_host.load(Relaxed),
            syncs_to_device: c.syncs_to_device.load(Relaxed),
            classes,
        }
    }
}

/// Caches picked to steal from: their handoffs, and their bodies at the same indices (each
/// handoff is its body's `stacks`, which `Body::class_mut` relies on).
type Picked<'a> = (Vec<&'a Handoff<Box<[CacheClass]>>>, Vec<&'a Body>);

/// The pool's counters summed with its caches'.
struct Sums {
    hits: u64,
    requested: i64,
}

impl ThreadExit for DevicePool {
    /// Hands the exiting thread's cache to the shared store, with the credit that paid for
    /// its blocks, and gives back its spare credit.
    fn thread_exited(&self, index: usize) {
        let Some(body) = self.caches.get(index).and_then(|cache| cache.body()) else { return };
        let mut closed = Vec::new();
        let take = |stacks: &mut Box<[CacheClass]>| {
            // SAFETY: `stacks` is `body`'s own (the owner call below).
            for (class, mut slot) in unsafe { body.classes_mut(stacks) } {
                // The slot passes to a later thread, which owes nothing.
                slot.forget_demand();
                // Into the shared store, with the credit that paid for them, while the cache
                // is still held and under the store's lock (the cache's count of blocks held
                // drops with each one taken): a trim or a statistics snapshot on another
                // thread finds every block in one place or the other.
                let mut taken = Vec::new();
                match self.shared.get(class) {
                    Some(shared) if slot.len() > 0 => {
                        let mut shared = lock(shared);
                        slot.take_all(&mut taken);
                        if !self.is_closed() {
                            shared.append_paid(&mut taken);
                        }
                    }
                    _ => slot.take_all(&mut taken),
                }
                self.release_budget(class, u64::from(slot.take_spare_credit()));
                body.publish(class, &slot);
                if !taken.is_empty() {
                    closed.push((class, taken));
                }
            }
        };
        let mut take = Some(take);
        let mut round = 0;
        // This thread is the cache's owner until its index is freed, after this returns; a
        // stealer that has the cache now is done within a few instructions.
        loop {
            // SAFETY: called on the exiting thread, the cache's owner (see `ThreadExit`), and
            // the closure does not re-enter the pool's caches (it takes a shared store's lock,
            // whose holders never wait for a cache).
            let done = unsafe { body.stacks.owner(|stacks| take.take().map(|mut take| take(stacks))) };
            if done.is_some() {
                break;
            }
            crate::sync::spin_wait(&mut round);
        }
        // The pool was closed meanwhile: these are freed (and their budget given back), on
        // the reaper thread: this runs in a thread-local destructor, where a backend's own
        // thread-locals may be gone already (wgpu's, which freeing a buffer uses: a panic
        // there aborts the process).
        for (class, taken) in closed {
            self.release_budget(class, to_u64(taken.len()));
            for block in taken {
                block.retire_on_reaper();
            }
        }
    }
}

/// Frees the memory of an adopted `Vec`.
fn free_vec(mem: &RawAllocation, align: usize) {
    let (Some(ptr), Ok(layout)) = (mem.host, std::alloc::Layout::from_size_align(mem.bytes, align)) else {
        return;
    };
    if layout.size() > 0 {
        // SAFETY: the block adopted a `Vec` whose buffer has exactly this size (capacity times
        // element size) and alignment, allocated by the global allocator; the Vec was
        // forgotten, so this is the only owner.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use crate::{AllocationMode, DeviceId, MemoryManager};
    use std::sync::atomic::Ordering::Relaxed;

    /// A point inside the pool's code where a test can stop a thread.
    pub(super) mod fail_point {
        use std::cell::RefCell;

        thread_local! {
            static AFTER_STATE_CHECK: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
        }

        /// Runs, once, what the calling thread armed: inside `keep`, in the owner's side of
        /// the handoff, just after the pool's state was read.
        pub(crate) fn after_state_check() {
            if let Some(stop) = AFTER_STATE_CHECK.with(|armed| armed.borrow_mut().take()) {
                stop();
            }
        }

        /// Arms [`after_state_check`] for the calling thread.
        pub(crate) fn arm(stop: impl FnOnce() + 'static) {
            AFTER_STATE_CHECK.with(|armed| *armed.borrow_mut() = Some(Box::new(stop)));
        }
    }

    /// `close` drains a block that a return keeps in its cache after reading the pool's
    /// state just before `CLOSED` was set. Such a return is inside its owner's side of the
    /// handoff, with the cache still empty: a close that trimmed by a count of pooled blocks
    /// read none, returned at once, and the block stayed pooled in a closed pool (holding
    /// its memory until the thread exits). `close` now claims every cache, which waits for
    /// the return and drains its block.
    #[test]
    fn close_drains_a_block_kept_by_a_return_that_read_the_state_before_it() {
        use std::sync::mpsc::channel;
        use std::time::{Duration, Instant};
        let manager = MemoryManager::new();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let allocate = || manager.allocate::<u8>(1024, AllocationMode::Pooled).unwrap();
        let (inside, stopped) = channel();
        let (go, resume) = channel::<()>();
        // The owner stays alive until the check: an exiting thread hands its cache back.
        let (returned, dropped) = channel();
        let (exit, may_exit) = channel::<()>();
        std::thread::scope(|scope| {
            let owner = scope.spawn(move || {
                // The cache gets credit for one block of the class, and the block is out.
                drop(allocate());
                let buffer = allocate();
                fail_point::arm(move || {
                    inside.send(()).unwrap();
                    resume.recv().unwrap();
                });
                // Reads the state (open), then stops until the close has run or is waiting.
                drop(buffer);
                returned.send(()).unwrap();
                may_exit.recv().unwrap();
            });
            stopped.recv().unwrap();
            let closer = scope.spawn(|| pool.close());
            let deadline = Instant::now() + Duration::from_millis(200);
            while !closer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            go.send(()).unwrap();
            closer.join().unwrap();
            dropped.recv().unwrap();
            let stats = manager.statistics();
            exit.send(()).unwrap();
            owner.join().unwrap();
            assert_eq!(
                (stats.total_pooled, stats.total_reserved),
                (0, 0),
                "the closed pool keeps no block: {stats:?}"
            );
        });
    }

    /// The credit a shared store keeps past its blocks (for a pipeline's crossings) never
    /// keeps another class from pooling under the total bound: a claim that fails takes
    /// the stores' spare credit back first, whatever their class.
    #[test]
    fn spare_credit_in_a_store_gives_way_to_another_class_under_the_total_bound() {
        let options = crate::MemoryOptions::default().with_max_pool_bytes(16 << 10).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        // The 4 KiB store holds 8 KiB of credit and no block, as after a pipeline.
        let small = pool.classes.class_of(4 << 10).unwrap();
        assert!(pool.claim_budget(small, 2));
        super::lock(&pool.shared[small]).credit = 2;
        // Two 8 KiB blocks: the bound has room for them once that credit is back.
        drop((
            manager.allocate::<u8>(8 << 10, AllocationMode::Pooled).unwrap(),
            manager.allocate::<u8>(8 << 10, AllocationMode::Pooled).unwrap(),
        ));
        let stats = manager.statistics();
        assert_eq!((stats.total_pooled, stats.pool_overflows), (16 << 10, 0), "{stats:?}");
        assert_eq!(super::lock(&pool.shared[small]).credit, 0);
    }

    /// Credit a cache keeps for blocks its thread has out again (allocated from the cache
    /// and still live) never keeps another class from pooling under the total bound, on
    /// the same thread or from another one: the pool holds no block, so a return fits.
    #[test]
    fn spare_credit_in_a_cache_gives_way_to_another_class_under_the_total_bound() {
        let options = crate::MemoryOptions::default().with_max_pool_bytes(64 << 10).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let allocate = |bytes: usize| manager.allocate::<u8>(bytes, AllocationMode::Pooled).unwrap();
        let pair = || (allocate(32 << 10), allocate(32 << 10));
        // Pooled (64 KiB of credit in this thread's cache), then out again: the credit stays.
        drop(pair());
        let held = pair();
        drop(allocate(4 << 10));
        let stats = manager.statistics();
        assert_eq!((stats.total_pooled, stats.pool_overflows), (4 << 10, 0), "{stats:?}");
        // (Of these two returns one overflows: with the 4 KiB block pooled, both do not fit.)
        drop(held);
        manager.trim();
        let overflows = manager.statistics().pool_overflows;

        // The same with the credit in a live thread's cache, and the return on this one.
        let (ready, done) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                drop(pair());
                let held = pair();
                ready.wait();
                done.wait();
                drop(held);
            });
            ready.wait();
            drop(allocate(8 << 10));
            let stats = manager.statistics();
            done.wait();
            assert_eq!((stats.total_pooled, stats.pool_overflows - overflows), (8 << 10, 0), "{stats:?}");
        });
    }

    /// A thread can reach its slot of a pool (remembered then for the hit paths) before its
    /// cache there is made, which only an allocation or a return of a pooled block does:
    /// both hit paths then look into a cache with no classes, miss, and change nothing;
    /// the slow path of the return makes the cache.
    #[test]
    fn hit_paths_miss_in_a_cache_not_made() {
        let manager = MemoryManager::new();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let class = pool.classes.class_of(1024).unwrap();
        let Ok(block) = pool.acquire(1024, true) else { panic!("a 1 KiB block") };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let cache = pool.caches.current().unwrap();
                assert!(cache.body().is_none(), "reaching the slot makes no cache");
                let remembered = pool.caches.current_cached().is_some();
                assert!(remembered || !crate::sync::is_expedited(), "the hit paths reach the slot");
                assert!(pool.acquire_fast(1024, true).is_none(), "the allocation's hit path misses");
                let block = super::DevicePool::keep_fast(block, 1024).expect("the return's hit path misses");
                assert!(cache.body().is_none());
                assert!(cache.contents().held(class) == 0);
                block.recycle(1024);
                assert!(cache.body().is_some(), "the slow path makes the cache");
                // (In the shared store: a thread that has not allocated the class keeps none.)
                assert_eq!(super::lock(&pool.shared[class]).blocks.len(), 1);
            });
        });
        let stats = manager.statistics();
        assert_eq!(
            (stats.total_allocated, stats.active_buffers, stats.total_pooled),
            (0, 0, 1024),
            "{stats:?}"
        );
    }

    /// A thread that exits after its pool was closed, with blocks still in its cache,
    /// frees them on the reaper thread, not in its own thread-local destructor: a backend's
    /// thread-locals may be gone by then (wgpu's were, in a CI run: a panic there, and the
    /// process aborted). The reaper is held by an earlier job, so the exited thread's block
    /// is seen waiting to be freed, then freed once the reaper runs.
    #[test]
    fn an_exiting_thread_of_a_closed_pool_frees_its_blocks_on_the_reaper() {
        use std::sync::mpsc::channel;
        use std::time::{Duration, Instant};
        let manager = MemoryManager::new();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let (release, held) = channel::<()>();
        let Ok(blocker) = pool.acquire(4096, false) else { panic!("a 4 KiB block") };
        let blocker_bytes = super::to_u64(blocker.capacity());
        blocker.give_up_after(4096, move |_| {
            let _ = held.recv();
        });
        let (kept, to_close) = channel();
        let (closed, may_exit) = channel::<()>();
        std::thread::scope(|scope| {
            let manager = &manager;
            let owner = scope.spawn(move || {
                drop(manager.allocate::<u8>(1024, AllocationMode::Pooled).unwrap());
                kept.send(()).unwrap();
                may_exit.recv().unwrap();
            });
            to_close.recv().unwrap();
            // Closed as a manager's drop would mark it, without draining the caches: the
            // state a thread finds when the pool closed as it exited.
            pool.state.fetch_or(super::CLOSED, Relaxed);
            closed.send(()).unwrap();
            // An explicit join waits for the thread's thread-local destructors.
            owner.join().unwrap();
        });
        let stats = pool.statistics();
        assert_eq!(
            stats.pending_free,
            blocker_bytes + 1024,
            "the exited thread's block waits for the reaper: {stats:?}"
        );
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.statistics().reserved > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = pool.statistics();
        assert_eq!((stats.reserved, stats.pending_free), (0, 0), "{stats:?}");
    }

    /// A manager whose 4 KiB class is bounded at four blocks, all four in the shared store
    /// (with the credit for them), put there by a thread that exited holding them.
    fn manager_with_the_class_bound_in_the_store() -> MemoryManager {
        let options = crate::MemoryOptions::default().with_max_pool_bytes_per_class(16 << 10).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let allocate = || manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| drop((allocate(), allocate(), allocate(), allocate()))).join().unwrap()
        });
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let class = pool.classes.class_of(4096).unwrap();
        assert_eq!(super::lock(&pool.shared[class]).blocks.len(), 4);
        manager
    }

    /// A shared store that holds a class's whole bound as credit, with fewer blocks, gives
    /// that credit to a cache of the class that needs it: a thread that allocates and frees
    /// one block at a time then keeps it in its cache. (Otherwise the store's credit shut
    /// the caches out of the bound for good, and every allocation and free went through the
    /// store's lock.)
    #[test]
    fn a_store_gives_its_spare_credit_to_a_cache_at_the_class_bound() {
        let manager = manager_with_the_class_bound_in_the_store();
        let allocate = || manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let class = pool.classes.class_of(4096).unwrap();
        for _ in 0..10 {
            drop(allocate());
        }
        assert_eq!(
            pool.my_cache().map(|body| body.held(class)),
            Some(1),
            "the block stays in this thread's cache"
        );
        assert_eq!(super::lock(&pool.shared[class]).blocks.len(), 3);
    }

    /// The hit path of a return finds the class from the buffer's size; a block whose own
    /// class is another one still goes back to its own class (through the slow path).
    #[test]
    fn a_return_whose_size_names_another_class_goes_back_to_the_blocks_own() {
        let manager = MemoryManager::new();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let (small, large) = (pool.classes.class_of(1024).unwrap(), pool.classes.class_of(4096).unwrap());
        // Both classes allocated once by this thread, so that its cache keeps either; the
        // small class's block is out again, so its slot has room.
        drop(manager.allocate::<u8>(1024, AllocationMode::Pooled).unwrap());
        drop(manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap());
        let out = manager.allocate::<u8>(1024, AllocationMode::Pooled).unwrap();
        let Ok(block) = pool.acquire(4096, true) else { panic!("a 4 KiB block") };
        block.recycle(1024);
        let held = |class| pool.my_cache().map(|body| body.held(class));
        assert_eq!((held(small), held(large)), (Some(0), Some(1)));
        drop(out);
    }

    /// ... but a thread that no longer allocates the class, only frees it (it allocated it
    /// once and has kept a block of it under demand since), takes none of that credit: its
    /// return goes to the store, where the threads that allocate the class find it, rather
    /// than stay in its cache to be stolen.
    #[test]
    fn a_thread_that_only_frees_leaves_the_stores_spare_credit_alone() {
        let manager = manager_with_the_class_bound_in_the_store();
        let allocate = || manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let class = pool.classes.class_of(4096).unwrap();
        let buffer = allocate(); // from the store, which keeps the credit
        pool.demand[class].store(0, Relaxed); // no demand: a return may stay where it is
        assert_eq!(super::lock(&pool.shared[class]).blocks.len(), 3);
        // Checked before the thread exits (its cache goes to the store then).
        let in_store = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    pool.init_cache();
                    let body = pool.my_cache().unwrap();
                    // SAFETY: this thread's own cache, as in `acquire`.
                    unsafe {
                        body.stacks.owner(|stacks| {
                            stacks[class].rented_elsewhere();
                            stacks[class].kept_under_demand();
                        })
                    };
                    drop(buffer);
                    super::lock(&pool.shared[class]).blocks.len()
                })
                .join()
                .unwrap()
        });
        assert_eq!(in_store, 4, "the return is in the store");
    }

    /// A return that the shared store has no credit for claims the store's whole allowance
    /// of spare credit at once where the bounds have room for it (a burst of returns then
    /// pays one claim per allowance, not one per block), and one block's worth where they
    /// have room for less.
    #[test]
    fn a_return_claims_the_stores_allowance_at_once_within_the_bounds() {
        for (per_class, credit) in [(1 << 30, 4), (8 << 10, 1)] {
            let options = crate::MemoryOptions::default().with_max_pool_bytes_per_class(per_class).unwrap();
            let manager = MemoryManager::builder().options(options).build();
            let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
            let class = pool.classes.class_of(4096).unwrap();
            let buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
            // Dropped on a thread that never allocates the class: into the shared store.
            std::thread::scope(|scope| scope.spawn(|| drop(buffer)).join().unwrap());
            let store = super::lock(&pool.shared[class]);
            assert_eq!((store.blocks.len(), store.credit), (1, credit), "bound {per_class}");
            assert_eq!(pool.class_budget[class].load(Relaxed), credit * 4096);
        }
    }

    /// A thread that has never allocated a class keeps none of it in its cache, demand or
    /// not: a pipeline's consumer returns every block to the shared store, where the
    /// producer takes it back without stealing. (Before, a consumer whose return found no
    /// demand at that moment kept it, and the producer stole it back with a process-wide
    /// barrier: about 1% of the 256 MiB scratch pipeline's allocations, and 4-5% missed.)
    #[test]
    fn a_thread_that_never_allocates_a_class_keeps_none_of_it() {
        let manager = MemoryManager::new();
        let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
        let class = pool.classes.class_of(4096).unwrap();
        let buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        assert_eq!(pool.demand[class].load(Relaxed), 0);
        let (in_store, in_cache) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // This thread has a cache, and uses it for a class it allocates.
                    drop(manager.allocate::<u8>(64 << 10, AllocationMode::Pooled).unwrap());
                    drop(buffer);
                    let held = pool.my_cache().map(|body| body.held(class));
                    (super::lock(&pool.shared[class]).blocks.len(), held)
                })
                .join()
                .unwrap()
        });
        assert_eq!((in_store, in_cache), (1, Some(0)), "the return is in the shared store");
    }

    /// A thread that allocates and frees two (or three) blocks at a time while demand for
    /// the class stands (raised by another thread that took blocks from outside its own
    /// cache) keeps them all in its cache once it has answered that demand: the demand its
    /// own allocations from the store raise is its own to pay. (Otherwise each round's
    /// later returns went to the shared store, and the next round's allocations took them
    /// back from there, raising the demand again: every round through the store's lock,
    /// for good. And a keep that counted two units paid for one left a thread that owed
    /// two sending one block of each batch of three through the store.)
    #[test]
    fn a_thread_working_in_pairs_under_standing_demand_keeps_its_blocks() {
        for batch in [2, 3] {
            let manager = MemoryManager::new();
            let allocate = || manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
            let allocate_batch = || (0..batch).map(|_| allocate()).collect::<Vec<_>>();
            drop(allocate_batch()); // blocks in this thread's cache
            let held = std::thread::scope(|scope| scope.spawn(allocate_batch).join().unwrap());
            assert_eq!(manager.statistics().pool_steals, 1, "the other thread took them from this cache");
            let pool = manager.pool(DeviceId::CPU, AllocationMode::Pooled).unwrap();
            let class = pool.classes.class_of(4096).unwrap();
            assert!(pool.demand[class].load(Relaxed) > 0, "the demand stands");
            let shared_after_each_round: Vec<usize> = (0..20)
                .map(|_| {
                    drop(allocate_batch());
                    super::lock(&pool.shared[class]).blocks.len()
                })
                .collect();
            // Two rounds pay the standing demand; from the third on, nothing goes through
            // the store.
            assert_eq!(
                shared_after_each_round[2..],
                [0; 18],
                "blocks in the shared store after each round of {batch}: {shared_after_each_round:?}"
            );
            assert_eq!(
                pool.my_cache().map(|body| body.held(class)),
                Some(batch as u64),
                "the whole batch in this thread's cache"
            );
            drop(held);
        }
    }
}
