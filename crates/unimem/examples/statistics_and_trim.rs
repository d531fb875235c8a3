//! Statistics and trimming: the one-line summary and the fields behind it, per-pool and
//! per-size-class occupancy, `trim_to` (largest classes first) and `trim` to hand pooled
//! memory back to the system, and `free_memory` asked of the device now.
//!
//! Run: `cargo run -p unimem --example statistics_and_trim`

use unimem::{AllocationMode, MemoryManager};

fn main() -> Result<(), unimem::Error> {
    let manager = MemoryManager::new();
    let cpu = manager.devices()[0].id;
    match manager.free_memory(cpu)? {
        Some(bytes) => println!("{cpu}: {} MiB free now", bytes >> 20),
        None => println!("{cpu}: its driver cannot tell its free memory"),
    }

    // Buffers of three size classes, dropped into the pool.
    let buffers = [
        manager.allocate::<u8>(1 << 20, AllocationMode::Pooled)?,
        manager.allocate::<u8>(64 << 10, AllocationMode::Pooled)?,
        manager.allocate::<u8>(3000, AllocationMode::Pooled)?, // rounded up to 4 KiB
    ];
    let live = manager.statistics();
    println!("{live}");
    println!(
        "internal waste: {} bytes (asked {} of {})",
        live.internal_waste(),
        live.requested_bytes,
        live.total_allocated
    );
    drop(buffers);

    let pooled = manager.statistics();
    println!("{pooled}");
    for pool in pooled.pools.iter().filter(|p| p.pooled > 0) {
        let (Some(device), Some(kind)) = (pool.device, pool.kind) else { continue };
        for class in &pool.classes {
            println!("  {device}, {kind} memory: {} buffer(s) of {} bytes", class.buffers, class.class_bytes);
        }
    }

    // Keep at most 100 KiB pooled: the 1 MiB block goes first, the small ones stay.
    let freed = manager.trim_to(100 << 10);
    println!("trim_to(100 KiB) freed {freed} bytes; {}", manager.statistics());
    assert_eq!(freed, 1 << 20);

    // Everything else back to the system.
    let freed = manager.trim();
    println!("trim freed {freed} bytes; {}", manager.statistics());
    assert_eq!(manager.statistics().total_pooled, 0);
    Ok(())
}
