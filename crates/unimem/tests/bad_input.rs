//! Bad input: each case is a clear error, and no buffer or pool is changed by it.

use unimem::{AllocationMode, DeviceId, Error, MemoryManager, MemoryOptions};

fn filled(manager: &MemoryManager, len: usize) -> unimem::Buffer<u32> {
    let data: Vec<u32> = (0..len as u32).collect();
    manager.create_buffer_on(DeviceId::CPU, &data, AllocationMode::Pooled).unwrap()
}

fn intact(buffer: &unimem::Buffer<u32>) -> bool {
    buffer.as_slice().unwrap().iter().enumerate().all(|(i, &x)| x == i as u32)
}

#[test]
fn byte_size_overflow_is_an_error() {
    let manager = MemoryManager::new();
    let err = manager.allocate::<u64>(usize::MAX / 4, AllocationMode::Pooled).unwrap_err();
    assert!(matches!(err, Error::SizeOverflow { element_size: 8, .. }), "{err}");
    assert!(err.to_string().contains("8 bytes"));
    assert!(manager.allocate::<u8>(usize::MAX, AllocationMode::Unpooled).is_err());
    assert_eq!(manager.statistics().active_buffers, 0);
}

#[test]
fn offsets_past_the_end_are_errors_and_change_nothing() {
    let manager = MemoryManager::new();
    let mut buffer = filled(&manager, 1000);
    let err = buffer.copy_from_blocking(&[0; 200], 900).unwrap_err();
    assert_eq!(err.to_string(), "offset 900 + length 200 exceeds buffer length 1000");
    assert!(buffer.copy_from_blocking(&[0; 1], 1000).is_err());
    assert!(buffer.copy_from_blocking(&[0; 1], usize::MAX).is_err(), "offset + length overflows");
    let mut dst = vec![7u32; 20];
    assert!(matches!(buffer.copy_to_blocking(&mut dst, 990), Err(Error::OutOfBounds { .. })));
    assert!(dst.iter().all(|&x| x == 7), "destination untouched");
    assert!(pollster::block_on(buffer.copy_to(&mut dst, usize::MAX - 5)).is_err());
    assert!(intact(&buffer));
}

#[test]
fn copies_between_buffers_of_different_lengths_are_errors() {
    let manager = MemoryManager::new();
    let mut short = filled(&manager, 10);
    let long = filled(&manager, 11);
    let err = short.copy_from_buffer(&long).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { destination: 10, source_len: 11 }), "{err}");
    assert!(intact(&short));
}

#[test]
fn a_buffer_returned_to_the_wrong_manager_comes_back_unharmed() {
    let ours = MemoryManager::new();
    let theirs = MemoryManager::new();
    let buffer = filled(&ours, 256);
    let refused = theirs.return_to_pool(buffer).unwrap_err();
    assert!(matches!(refused.error, Error::WrongManager));
    assert!(intact(&refused.buffer));
    assert_eq!(theirs.statistics().total_pooled, 0);
    assert_eq!(ours.statistics().active_buffers, 1);
    ours.return_to_pool(refused.buffer).unwrap();
    assert_eq!(ours.statistics().total_pooled, 1024);
}

#[test]
fn unknown_devices_are_errors() {
    let manager = MemoryManager::new();
    assert!(manager.allocate_on::<u8>(DeviceId::CPU, 1, AllocationMode::Pooled).is_ok());
    // The CPU, plus whatever accelerators the enabled backends found.
    let count = manager.devices().len();
    // A device id from a manager with more devices does not exist here.
    let other: DeviceId = serde_json::from_str(&(count + 2).to_string()).unwrap();
    let err = manager.allocate_on::<u8>(other, 1, AllocationMode::Pooled).unwrap_err();
    assert!(matches!(err, Error::UnknownDevice { count: c, .. } if c == count), "{err}");
}

#[test]
fn over_aligned_elements_are_refused() {
    #[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
    #[repr(C, align(128))]
    struct Wide([u8; 128]);
    let manager = MemoryManager::new();
    let err = manager.allocate::<Wide>(4, AllocationMode::Pooled).unwrap_err();
    assert!(matches!(err, Error::UnsupportedAlignment { align: 128, max: 64 }), "{err}");
}

#[test]
fn absurd_options_are_errors() {
    let o = MemoryOptions::default();
    assert!(o.clone().with_max_concurrent_transfers(0).is_err());
    assert!(o.clone().with_max_concurrent_transfers(1 << 20).is_err());
    assert!(o.clone().with_max_pool_bytes_per_class(0).is_err());
    assert!(o.clone().with_max_pool_bytes(u64::MAX).is_err());
    assert!(o.clone().with_size_class_divisions(3).is_err());
    assert!(o.clone().with_size_class_divisions(0).is_err());
    assert!(o.clone().with_memory_limit(Some(0)).is_err());
    let err = o.clone().with_max_concurrent_transfers(0).unwrap_err();
    assert_eq!(err.to_string(), "invalid option max_concurrent_transfers = 0: must be between 1 and 1024");
    for bad in
        [r#"{"max_pool_bytes_per_class": 0}"#, r#"{"size_class_divisions": 5}"#, r#"{"no_such_option": 1}"#]
    {
        assert!(serde_json::from_str::<MemoryOptions>(bad).is_err(), "{bad}");
    }
}

#[test]
fn options_have_the_reference_defaults_and_load_from_serde() {
    let o = MemoryOptions::default();
    assert!(o.pooling() && o.pinned_memory() && o.p2p() && o.trim_on_pressure());
    assert_eq!((o.max_pool_bytes_per_class(), o.max_concurrent_transfers()), (1 << 30, 4));
    let loaded: MemoryOptions =
        serde_json::from_str(r#"{"max_concurrent_transfers": 8, "enable_p2p": false}"#).unwrap();
    assert_eq!(loaded.max_concurrent_transfers(), 8);
    assert!(!loaded.p2p() && loaded.pooling());
    let round: MemoryOptions = serde_json::from_str(&serde_json::to_string(&loaded).unwrap()).unwrap();
    assert_eq!(round, loaded);
}

#[test]
fn a_huge_request_is_out_of_memory_after_a_trim_and_one_retry() {
    let manager = MemoryManager::new();
    let kept = filled(&manager, 4096);
    drop(filled(&manager, 2048)); // something pooled for the trim to free
    let err = manager.allocate::<u8>(1 << 46, AllocationMode::Unpooled).unwrap_err();
    let Error::OutOfMemory { requested, stats, .. } = &err else { panic!("{err}") };
    assert_eq!(*requested, 1 << 46);
    assert_eq!(stats.oom_retries, 1);
    assert_eq!(stats.total_pooled, 0, "the pool was trimmed before the retry");
    assert!(err.to_string().contains("out of memory"), "{err}");
    assert!(intact(&kept));
}

#[test]
fn the_memory_limit_trims_then_refuses() {
    let options = MemoryOptions::default().with_memory_limit(Some(4 << 20)).unwrap();
    let manager = MemoryManager::builder().options(options).build();
    for _ in 0..3 {
        let a = manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap();
        let b = manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap();
        let c = manager.allocate::<u8>(1 << 20, AllocationMode::Pooled).unwrap();
        drop((a, b, c));
    }
    assert_eq!(manager.statistics().total_pooled, 3 << 20);
    // 3 MiB pooled + 2 MiB needed > 4 MiB: the pool is trimmed and the retry succeeds.
    let big = manager.allocate::<u8>(2 << 20, AllocationMode::Pooled).unwrap();
    let stats = manager.statistics();
    assert_eq!((stats.oom_retries, stats.total_pooled, stats.total_reserved), (1, 0, 2 << 20));
    let live = filled(&manager, 1 << 18); // 1 MiB
    let err = manager.allocate::<u8>(2 << 20, AllocationMode::Pooled).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { requested, .. } if requested == 2 << 20), "{err}");
    assert!(intact(&live));
    assert_eq!(big.len(), 2 << 20);
}
