//! Per-thread-group caches: the pool's hit path.
//!
//! A pool owns a small power-of-two number of shards; each thread is bound to one shard for
//! its lifetime (round robin, so threads spread evenly). A shard holds, per size class, a
//! short LIFO stack of blocks and the counters of the operations done through it. It is
//! guarded by a spin lock that the hit path only ever *tries* to take: a thread that finds
//! its shard busy (a statistics snapshot, a trim, another thread bound to the same shard)
//! falls back to the pool's shared per-class store instead of waiting. Threads on different
//! shards share no cache line, so two threads renting from one class do not slow each other.

use super::Block;
use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks one shard keeps per size class.
pub(crate) const SLOTS: usize = 4;

/// One size class inside a shard.
#[derive(Default)]
pub(crate) struct ShardClass {
    /// Blocks held, the newest last; `slots[..len]` are `Some`.
    slots: [Option<Box<Block>>; SLOTS],
    len: u8,
    /// Blocks' worth of the pool's budget this shard has claimed for the class; `len <= credit`.
    pub(crate) credit: u8,
}

impl ShardClass {
    #[inline]
    pub(crate) fn pop(&mut self) -> Option<Box<Block>> {
        let len = usize::from(self.len).checked_sub(1)?;
        let block = self.slots.get_mut(len)?.take()?;
        self.len -= 1;
        Some(block)
    }

    /// Pushes `block` if a slot is free and already paid for by credit; gives it back
    /// otherwise.
    #[inline]
    pub(crate) fn push_credited(&mut self, block: Box<Block>) -> Result<(), Box<Block>> {
        if self.len >= self.credit {
            return Err(block);
        }
        match self.slots.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = Some(block);
                self.len += 1;
                Ok(())
            }
            None => Err(block),
        }
    }

    /// Whether one more block of credit may be claimed.
    pub(crate) fn can_grow(&self) -> bool {
        usize::from(self.credit) < SLOTS
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.len)
    }
}

/// Counters of the operations done through one shard. Buffers may be rented through one shard
/// and returned through another, so the signed ones are only meaningful summed over shards.
#[derive(Default, Clone, Copy)]
pub(crate) struct ShardCounters {
    pub hits: u64,
    pub live: i64,
    pub live_bytes: i64,
    pub requested: i64,
}

pub(crate) struct Shard {
    pub(crate) classes: Box<[ShardClass]>,
    pub(crate) counters: ShardCounters,
}

pub(crate) type ShardLock = CachePadded<spin::mutex::SpinMutex<Shard>>;

pub(crate) fn new_shards(classes: usize) -> Box<[ShardLock]> {
    (0..shard_count())
        .map(|_| {
            let classes = (0..classes).map(|_| ShardClass::default()).collect();
            CachePadded::new(spin::mutex::SpinMutex::new(Shard {
                classes,
                counters: ShardCounters::default(),
            }))
        })
        .collect()
}

/// Twice the hardware threads, rounded up to a power of two, between 2 and 64.
fn shard_count() -> usize {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    (threads * 2).next_power_of_two().clamp(2, 64)
}

/// This thread's shard number (before masking): threads take numbers in turn at first use.
#[inline]
pub(crate) fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.try_with(|slot| {
        let mut n = slot.get();
        if n == usize::MAX {
            n = NEXT.fetch_add(1, Ordering::Relaxed);
            slot.set(n);
        }
        n
    })
    .unwrap_or(0)
}
