//! Promises kept on every path (CPU): zero-sized elements, the lock limit, statistics that
//! neither lie nor panic, `trim_to` across pools, options from JSON, errors that name their
//! cause, live free memory. The device-side cases are in `opencl.rs` and `cuda.rs`.

use std::process::Command;
use unimem::{AllocationMode, DeviceId, Error, MemoryKind, MemoryManager, MemoryOptions, MemoryStatistics};

#[test]
fn zero_sized_elements_are_refused_at_allocation() {
    let manager = MemoryManager::new();
    for mode in [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Unified] {
        let err = manager.allocate::<()>(10, mode).unwrap_err();
        assert!(matches!(err, Error::ZeroSizedElement { .. }), "{mode}: {err}");
        assert!(err.to_string().contains("zero-sized"), "{err}");
    }
    let err = manager.create_buffer(vec![(); 3], AllocationMode::Pooled).unwrap_err();
    assert!(matches!(err.error, Error::ZeroSizedElement { .. }), "{err}");
    assert_eq!(err.data.len(), 3, "the vector comes back");
    assert!(manager.create_buffer_on::<()>(DeviceId::CPU, &[(), ()], AllocationMode::Pooled).is_err());
    assert_eq!(manager.statistics().active_buffers, 0);
}

#[test]
fn empty_buffers_and_empty_copies_are_no_ops() {
    let manager = MemoryManager::new();
    let mut a = manager.allocate::<f32>(0, AllocationMode::Pooled).unwrap();
    let b = manager.allocate::<f32>(0, AllocationMode::Pooled).unwrap();
    a.copy_from_buffer(&b).unwrap();
    a.copy_from_blocking(&[], 0).unwrap();
    b.copy_to_blocking(&mut [], 0).unwrap();
    assert!(a.as_slice().unwrap().is_empty());
    assert!(a.slice(0..0).unwrap().is_empty());
}

/// A refused request raises no peak: only memory really held counts. Several refusals of
/// near-`isize::MAX` requests in several pools would overflow the peak sum.
#[test]
fn refused_allocations_raise_no_peak_and_nothing_overflows() {
    let manager = MemoryManager::new();
    let huge = isize::MAX as usize - 4096;
    for mode in
        [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Unified, AllocationMode::Pinned]
    {
        let err = manager.allocate::<u8>(huge, mode).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. } | Error::UnsupportedMode { .. }), "{mode}: {err}");
    }
    let stats = manager.statistics();
    assert_eq!(stats.peak_usage, 0, "peak after refusals only: {stats:?}");
    let _held = manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap();
    assert_eq!(manager.statistics().peak_usage, 1 << 20);
}

#[test]
fn statistics_with_huge_counters_display_without_panicking() {
    let json = format!(r#"{{"pool_hits": {}, "pool_misses": 7, "total_allocated": {}}}"#, u64::MAX, u64::MAX);
    let stats: MemoryStatistics = serde_json::from_str(&json).unwrap();
    let line = stats.to_string();
    assert!(line.contains("100.0% pool hit rate"), "{line}");
}

/// `trim_to` frees the largest classes first across every pool of the manager: a 1 MiB
/// unified block goes before 4 KiB device blocks.
#[test]
fn trim_to_frees_the_largest_classes_across_pools() {
    let manager = MemoryManager::new();
    let small: Vec<_> =
        (0..4).map(|_| manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap()).collect();
    let large = manager.allocate::<u8>(1 << 20, AllocationMode::Unified).unwrap();
    drop(small);
    drop(large);
    assert_eq!(manager.statistics().total_pooled, (1 << 20) + 4 * 4096);
    let freed = manager.trim_to(4 * 4096);
    let pooled = |kind| {
        let stats = manager.statistics();
        stats.pools.iter().find(|p| p.kind == Some(kind) && p.device == Some(DeviceId::CPU)).unwrap().pooled
    };
    assert_eq!(freed, 1 << 20);
    assert_eq!(pooled(MemoryKind::Unified), 0, "the large block is freed first");
    assert_eq!(pooled(MemoryKind::Device), 4 * 4096, "the small blocks stay");
    // Trimming further takes the next-largest, still across pools.
    assert_eq!(manager.trim_to(4096), 3 * 4096);
    assert_eq!(manager.statistics().total_pooled, 4096);
}

#[test]
fn options_from_json_must_name_their_fields() {
    let positional = serde_json::from_str::<MemoryOptions>("[false]");
    assert!(positional.is_err(), "a positional array was accepted: {positional:?}");
    let err = positional.unwrap_err().to_string();
    assert!(err.contains("named fields"), "{err}");
    let named: MemoryOptions = serde_json::from_str(r#"{"enable_pooling": false}"#).unwrap();
    assert!(!named.pooling());
    assert!(serde_json::from_str::<MemoryOptions>("{}").unwrap().pooling());
}

#[test]
fn hitting_the_memory_limit_says_so() {
    let options = MemoryOptions::default().with_memory_limit(Some(1 << 20)).unwrap();
    let manager = MemoryManager::builder().options(options).build();
    let err = manager.allocate::<u8>(2 << 20, AllocationMode::Pooled).unwrap_err();
    match &err {
        Error::OutOfMemory { cause: unimem::OutOfMemoryCause::MemoryLimit { limit }, .. } => {
            assert_eq!(*limit, 1 << 20)
        }
        other => panic!("expected the memory limit, got {other}"),
    }
    assert!(err.to_string().contains("memory_limit of 1048576 bytes"), "{err}");
}

#[test]
fn free_memory_is_asked_live() {
    let manager = MemoryManager::new();
    let free = manager.free_memory(DeviceId::CPU).unwrap();
    assert!(free.is_some_and(|f| f > 0), "{free:?}");
    let unknown: DeviceId = serde_json::from_str("99").unwrap();
    assert!(manager.free_memory(unknown).is_err());
}

/// Pinned memory over the lock limit (`RLIMIT_MEMLOCK`) is out of memory: the pinned pool,
/// which keeps its blocks locked, is trimmed and the allocation retried; past that the error
/// names the limit and how to raise it. Runs in a child process with a 1 MiB lock limit and,
/// where this runs as root, without `CAP_IPC_LOCK` (which ignores the limit).
#[test]
fn pinned_memory_over_the_lock_limit_trims_retries_and_names_the_limit() {
    if std::env::var_os("UNIMEM_LOCK_LIMIT_CHILD").is_some() {
        return lock_limit_child();
    }
    let exe = std::env::current_exe().unwrap();
    let name = "pinned_memory_over_the_lock_limit_trims_retries_and_names_the_limit";
    // SAFETY: `geteuid` has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        let mut c = Command::new("setpriv");
        c.args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    command.args(["--exact", name, "--nocapture"]).env("UNIMEM_LOCK_LIMIT_CHILD", "1");
    let output = match command.output() {
        Ok(output) => output,
        Err(e) if root => {
            return eprintln!("skipping: setpriv (util-linux) is needed to drop CAP_IPC_LOCK: {e}");
        }
        Err(e) => panic!("{e}"),
    };
    let log = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{log}");
    assert!(log.contains("1 passed"), "{log}");
}

fn lock_limit_child() {
    let limit = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
    // SAFETY: `setrlimit` reads one `rlimit`; lowering a limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) }, 0);
    let manager = MemoryManager::new();
    // Three 256 KiB blocks, locked, then pooled (still locked): 768 KiB of the 1 MiB.
    let blocks: Vec<_> =
        (0..3).map(|_| manager.allocate::<u8>(256 << 10, AllocationMode::Pinned).unwrap()).collect();
    drop(blocks);
    assert_eq!(manager.statistics().total_pooled, 768 << 10);
    // 512 KiB more is over the limit until the pool lets go of its blocks.
    let retried = manager.allocate::<u8>(512 << 10, AllocationMode::Pinned);
    let retried = retried.unwrap_or_else(|e| panic!("the pinned pool was not trimmed and retried: {e}"));
    let stats = manager.statistics();
    assert_eq!(stats.oom_retries, 1);
    assert_eq!(stats.total_pooled, 0);
    drop(retried);
    manager.trim();
    // More than the limit itself never fits: the error names the limit and the remedy.
    let err = manager.allocate::<u8>(2 << 20, AllocationMode::Pinned).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfMemory { cause: unimem::OutOfMemoryCause::LockLimit { limit: 1048576 }, .. }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("RLIMIT_MEMLOCK") && message.contains("ulimit -l"), "{message}");
    // The manager still works.
    manager.allocate::<u8>(128 << 10, AllocationMode::Pinned).unwrap();
}
