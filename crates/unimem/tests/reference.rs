//! The reference design's three memory tests (`docs/design.md`), through the public API.

use unimem::{AllocationMode, MemoryManager};

#[test]
fn allocate_returns_valid_buffer() {
    let manager = MemoryManager::new();
    let buffer = manager.allocate::<f32>(1000, AllocationMode::Pooled).unwrap();
    assert_eq!(buffer.len(), 1000);
    assert_eq!(buffer.size_in_bytes(), 1000 * size_of::<f32>());
    assert_eq!(buffer.as_slice().unwrap().len(), 1000);
}

#[test]
fn return_to_pool_buffer_can_be_reused() {
    let manager = MemoryManager::new();
    let first = manager.allocate::<f32>(1000, AllocationMode::Pooled).unwrap();
    let address = first.as_slice().unwrap().as_ptr() as usize;
    manager.return_to_pool(first).unwrap();
    // Same size class (4000 bytes rounds up to 4 KiB), so the same memory comes back.
    let second = manager.allocate::<f32>(900, AllocationMode::Pooled).unwrap();
    assert_eq!(second.as_slice().unwrap().as_ptr() as usize, address);
    assert_eq!(second.len(), 900, "a reused buffer has the requested length, not its capacity");
    let stats = manager.statistics();
    assert_eq!((stats.pool_hits, stats.pool_misses), (1, 1));
}

#[test]
fn transfer_copies_data_correctly() {
    let manager = MemoryManager::new();
    let source: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let mut buffer = manager.allocate::<f32>(1000, AllocationMode::Pooled).unwrap();
    pollster::block_on(buffer.copy_from(&source, 0)).unwrap();
    let mut destination = vec![0.0f32; 1000];
    pollster::block_on(buffer.copy_to(&mut destination, 0)).unwrap();
    assert_eq!(source, destination);
}
