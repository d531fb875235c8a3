//! Trimming gives memory back to the operating system, measured by the process's resident
//! set. Alone in its own test binary so that no other test moves the number.

#[cfg(target_os = "linux")]
#[test]
fn trim_returns_pooled_memory_to_the_os() {
    use unimem::{AllocationMode, MemoryManager};

    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<u8>(256 << 20, AllocationMode::Pooled).unwrap();
    buffer.as_mut_slice().unwrap().fill(1);
    drop(buffer);
    assert_eq!(manager.statistics().total_pooled, 256 << 20);
    let before = resident_bytes();
    assert_eq!(manager.trim(), 256 << 20);
    let after = resident_bytes();
    assert!(before - after >= 200 << 20, "resident set went from {before} to {after} bytes");
}
