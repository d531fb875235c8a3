//! Allocation and the pool: a dropped buffer's memory goes back to its size class and the
//! next allocation of that class reuses it; `Unpooled` memory is freed on drop; `Pinned`
//! (page-locked) memory has a pool of its own; a `Vec` can be adopted without a copy.
//!
//! Run: `cargo run -p unimem --example allocate_and_pool`

use unimem::{AllocationMode, MemoryManager};

fn main() -> Result<(), unimem::Error> {
    let manager = MemoryManager::new(); // the CPU, default options

    // 1,000 f32 are 4,000 bytes: the buffer gets a block of the 4 KiB size class.
    let first = manager.allocate::<f32>(1000, AllocationMode::Pooled)?;
    println!(
        "pooled: {} elements, {} bytes asked, {} bytes held",
        first.len(),
        first.size_in_bytes(),
        first.capacity_in_bytes()
    );
    let address = first.as_slice()?.as_ptr();
    drop(first); // back to the pool, not to the system

    // 600 f32 (2,400 bytes) fall in the same class: the same memory comes back, and the
    // buffer shows only the 600 elements asked for.
    let second = manager.allocate::<f32>(600, AllocationMode::Pooled)?;
    assert_eq!(second.as_slice()?.as_ptr(), address);
    assert_eq!(second.as_slice()?.len(), 600);
    let stats = manager.statistics();
    println!("reuse: {} hit, {} miss", stats.pool_hits, stats.pool_misses);
    drop(second);

    // Unpooled: fresh memory, freed (not pooled) when the buffer is dropped.
    let pooled_before = manager.statistics().total_pooled;
    drop(manager.allocate::<u8>(1 << 20, AllocationMode::Unpooled)?);
    assert_eq!(manager.statistics().total_pooled, pooled_before);

    // Pinned: page-locked host memory (mlock), for fast device copies; small here, as an
    // unprivileged user may lock only a little memory (RLIMIT_MEMLOCK).
    let pinned = manager.allocate::<u8>(16 << 10, AllocationMode::Pinned)?;
    println!("pinned: {} bytes of {} memory", pinned.size_in_bytes(), pinned.memory_kind());
    drop(pinned); // into the pinned pool, apart from ordinary memory

    // A Vec becomes a buffer without a copy (and is freed, not pooled, on drop).
    let adopted = manager.create_buffer(vec![1.5f64; 256], AllocationMode::Pooled)?;
    assert_eq!(adopted.as_slice()?[255], 1.5);
    drop(adopted);

    println!("{}", manager.statistics());
    Ok(())
}
