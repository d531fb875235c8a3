//! Statistics that balance, and their serialisation.

use unimem::{AllocationMode, MemoryManager, MemoryStatistics};

fn assert_balanced(stats: &MemoryStatistics) {
    assert_eq!(
        stats.total_allocated + stats.total_pooled,
        stats.total_reserved,
        "live + pooled must equal reserved: {stats:#?}"
    );
    for pool in &stats.pools {
        assert_eq!(pool.allocated + pool.pooled, pool.reserved, "{pool:#?}");
    }
}

#[test]
fn statistics_balance_through_a_workload() {
    let manager = MemoryManager::new();
    let mut pooled_allocations = 0;
    let mut live = Vec::new();
    for round in 0..20usize {
        for len in [10, 1000, 5000, 70_000, 1 << 20] {
            live.push(manager.allocate::<u16>(len + round, AllocationMode::Pooled).unwrap());
            pooled_allocations += 1;
        }
        live.push(manager.allocate::<u16>(300, AllocationMode::Unpooled).unwrap());
        assert_balanced(&manager.statistics());
        if round % 3 == 2 {
            live.clear();
        }
    }
    let stats = manager.statistics();
    assert_balanced(&stats);
    assert_eq!(stats.pool_hits + stats.pool_misses, pooled_allocations);
    assert_eq!(stats.unpooled_allocations, 20);
    assert_eq!(stats.active_buffers, live.len() as u64);
    assert!(stats.pool_hits > 0 && stats.hit_rate() > 0.5, "{stats}");
    assert!(stats.peak_usage >= stats.total_reserved);
    let requested: u64 = live.iter().map(|b| b.size_in_bytes() as u64).sum();
    assert_eq!(stats.requested_bytes, requested);
    assert_eq!(stats.internal_waste(), stats.total_allocated - requested);

    drop(live);
    let stats = manager.statistics();
    assert_balanced(&stats);
    assert_eq!((stats.active_buffers, stats.total_allocated, stats.requested_bytes), (0, 0, 0));
    let occupancy: u64 = stats.pools.iter().flat_map(|p| &p.classes).map(|c| c.class_bytes * c.buffers).sum();
    assert_eq!(occupancy, stats.total_pooled);

    let freed = manager.trim();
    let after = manager.statistics();
    assert_eq!(freed, stats.total_pooled);
    assert_eq!((after.total_pooled, after.total_reserved), (0, 0));
    assert_eq!(after.trimmed_bytes, freed);
    assert!(after.trims >= 1);
}

#[test]
fn trim_to_keeps_at_most_the_target() {
    let manager = MemoryManager::new();
    let buffers: Vec<_> =
        (0..8).map(|i| manager.allocate::<u8>(1 << (12 + i), AllocationMode::Pooled).unwrap()).collect();
    drop(buffers);
    let pooled = manager.statistics().total_pooled;
    assert_eq!(pooled, (0..8).map(|i| 1u64 << (12 + i)).sum::<u64>());
    let freed = manager.trim_to(100_000);
    let left = manager.statistics().total_pooled;
    assert!(left <= 100_000, "{left}");
    assert_eq!(freed + left, pooled);
    assert!(left >= 60_000, "the largest classes go first, smaller ones stay: {left}");
}

#[test]
fn the_summary_line_and_serde() {
    let manager = MemoryManager::new();
    let a = manager.allocate::<u8>(1024, AllocationMode::Pooled).unwrap();
    drop(manager.allocate::<u8>(2048, AllocationMode::Pooled).unwrap());
    let b = manager.allocate::<u8>(2048, AllocationMode::Pooled).unwrap();
    let stats = manager.statistics();
    assert_eq!(
        stats.to_string(),
        "Memory: 2 buffers, 3,072 bytes allocated, 0 bytes pooled, 33.3% pool hit rate"
    );
    let json = serde_json::to_string(&stats).unwrap();
    let back: MemoryStatistics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stats);
    drop((a, b));
}

#[test]
fn pooling_off_means_every_allocation_is_fresh() {
    let options = unimem::MemoryOptions::default().with_pooling(false);
    let manager = MemoryManager::builder().options(options).build();
    for _ in 0..3 {
        drop(manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap());
    }
    let stats = manager.statistics();
    assert_eq!((stats.pool_hits, stats.unpooled_allocations, stats.total_reserved), (0, 3, 0));
}

#[test]
fn class_bound_frees_returns_past_it() {
    let options = unimem::MemoryOptions::default().with_max_pool_bytes_per_class(3 << 20).unwrap();
    let manager = MemoryManager::builder().options(options).build();
    let buffers: Vec<_> =
        (0..5).map(|_| manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap()).collect();
    drop(buffers);
    let stats = manager.statistics();
    assert_eq!(stats.total_pooled, 3 << 20);
    assert_eq!(stats.pool_overflows, 2);
    assert_eq!(stats.total_reserved, 3 << 20, "the two past the bound were really freed");
}
