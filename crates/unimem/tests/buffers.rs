//! Offsets, views, mapping, modes and adoption.

use unimem::{AllocationMode, DeviceId, Error, Location, MapMode, MemoryKind, MemoryManager};

#[test]
fn copies_honour_offsets() {
    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<u32>(100, AllocationMode::Pooled).unwrap();
    buffer.as_mut_slice().unwrap().fill(0);
    buffer.copy_from_blocking(&[7, 8, 9], 97).unwrap();
    let mut tail = [0u32; 4];
    buffer.copy_to_blocking(&mut tail, 96).unwrap();
    assert_eq!(tail, [0, 7, 8, 9]);
}

#[test]
fn views_honour_their_offset_for_reads_writes_and_copies() {
    let manager = MemoryManager::new();
    let data: Vec<u16> = (0..64).collect();
    let mut buffer = manager.create_buffer_on(DeviceId::CPU, &data, AllocationMode::Pooled).unwrap();

    let view = buffer.slice(10..20).unwrap();
    assert_eq!((view.len(), view.offset()), (10, 10));
    assert_eq!(view.as_slice().unwrap(), &data[10..20]);
    let mut two = [0u16; 2];
    view.copy_to_blocking(&mut two, 3).unwrap();
    assert_eq!(two, [13, 14]);
    let inner = view.slice(2..=4).unwrap();
    assert_eq!(inner.as_slice().unwrap(), &[12, 13, 14]);
    assert!(matches!(
        view.copy_to_blocking(&mut two, 9),
        Err(Error::OutOfBounds { offset: 9, len: 2, buffer_len: 10 })
    ));

    let mut view = buffer.slice_mut(50..).unwrap();
    view.copy_from_blocking(&[500, 501], 1).unwrap();
    view.as_mut_slice().unwrap()[0] = 499;
    assert!(view.copy_from_blocking(&[1, 2, 3], 12).is_err());
    assert_eq!(&buffer.as_slice().unwrap()[49..53], &[49, 499, 500, 501]);
    assert_eq!(&buffer.as_slice().unwrap()[..50], &data[..50], "nothing outside the view changed");
}

#[test]
fn view_ranges_are_checked() {
    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<u8>(10, AllocationMode::Pooled).unwrap();
    assert!(matches!(buffer.slice(5..11), Err(Error::OutOfBounds { offset: 5, len: 6, buffer_len: 10 })));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = buffer.slice(7..3);
    assert!(matches!(reversed, Err(Error::InvalidRange { start: 7, end: 3 })));
    assert!(buffer.slice_mut(..=10).is_err());
    assert!(buffer.slice(10..).unwrap().is_empty());
}

#[test]
fn map_gives_host_access_and_tracks_writes() {
    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<i64>(8, AllocationMode::Pooled).unwrap();
    {
        let mapping = buffer.map(MapMode::Read).unwrap();
        assert_eq!(mapping.len(), 8);
        assert!(!mapping.written());
    }
    {
        let mut mapping = buffer.map(MapMode::Write).unwrap();
        mapping.copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(mapping.written());
        assert_eq!(mapping.mode(), MapMode::Write);
    }
    assert_eq!(buffer.as_slice().unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn buffers_report_device_mode_kind_and_location() {
    let manager = MemoryManager::new();
    for (mode, kind) in [
        (AllocationMode::Pooled, MemoryKind::Device),
        (AllocationMode::Unpooled, MemoryKind::Device),
        (AllocationMode::Pinned, MemoryKind::Pinned),
        (AllocationMode::Unified, MemoryKind::Unified),
    ] {
        let mut buffer = manager.allocate::<f64>(3000, mode).unwrap();
        assert_eq!((buffer.device(), buffer.mode(), buffer.memory_kind()), (DeviceId::CPU, mode, kind));
        assert_eq!(buffer.location(), Location::Host);
        assert_eq!(buffer.as_slice().unwrap().as_ptr() as usize % 64, 0, "64-byte aligned");
        buffer.as_mut_slice().unwrap().fill(2.5);
        assert!(buffer.as_slice().unwrap().iter().all(|&x| x == 2.5));
    }
}

#[test]
fn fresh_memory_is_zeroed() {
    let manager = MemoryManager::new();
    for len in [1, 1000, 3 << 20] {
        let buffer = manager.allocate::<u8>(len, AllocationMode::Unpooled).unwrap();
        assert!(buffer.as_slice().unwrap().iter().all(|&b| b == 0));
    }
}

#[test]
fn pooled_capacity_is_the_size_class_but_len_is_exact() {
    let manager = MemoryManager::new();
    let buffer = manager.allocate::<u8>(1500, AllocationMode::Pooled).unwrap();
    assert_eq!(buffer.capacity_in_bytes(), 2048);
    assert_eq!(buffer.as_slice().unwrap().len(), 1500);
    let stats = manager.statistics();
    assert_eq!((stats.requested_bytes, stats.total_allocated, stats.internal_waste()), (1500, 2048, 548));
}

#[test]
fn finer_size_classes_cut_waste() {
    let options = unimem::MemoryOptions::default().with_size_class_divisions(8).unwrap();
    let manager = MemoryManager::builder().options(options).build();
    let buffer = manager.allocate::<u8>(1500, AllocationMode::Pooled).unwrap();
    assert_eq!(buffer.capacity_in_bytes(), 1536);
}

#[test]
fn create_buffer_adopts_a_vec_without_copying() {
    let manager = MemoryManager::new();
    let data: Vec<u32> = (0..10_000).collect();
    let address = data.as_ptr() as usize;
    let buffer = manager.create_buffer(data, AllocationMode::Pooled).unwrap();
    assert_eq!(buffer.as_slice().unwrap().as_ptr() as usize, address);
    assert_eq!(buffer.len(), 10_000);
    assert_eq!(buffer.as_slice().unwrap()[9_999], 9_999);
    assert_eq!(buffer.mode(), AllocationMode::Unpooled, "adopted memory is freed, not pooled");
    drop(buffer);
    let stats = manager.statistics();
    assert_eq!((stats.total_reserved, stats.total_pooled, stats.active_buffers), (0, 0, 0));

    let empty = manager.create_buffer(Vec::<u8>::new(), AllocationMode::Unpooled).unwrap();
    assert!(empty.as_slice().unwrap().is_empty());
    let pinned = manager.create_buffer(vec![1u8, 2, 3], AllocationMode::Pinned).unwrap();
    assert_eq!(pinned.as_slice().unwrap(), &[1, 2, 3]);
}

#[test]
fn size_in_bytes_is_right_above_4_gib() {
    let manager = MemoryManager::new();
    // Mapped but never touched: costs address space, not memory.
    let buffer = manager.allocate::<u64>(5 << 27, AllocationMode::Unpooled).unwrap();
    assert_eq!(buffer.size_in_bytes(), 5usize << 30);
    assert_eq!(buffer.as_slice().unwrap().len(), 5 << 27);
}

#[test]
fn buffers_outlive_their_manager() {
    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
    let clone = manager.clone();
    drop(manager);
    drop(clone);
    buffer.as_mut_slice().unwrap().fill(9);
    assert_eq!(buffer.as_slice().unwrap()[4095], 9);
}

#[test]
fn zero_length_and_zero_sized_elements() {
    let manager = MemoryManager::new();
    let empty = manager.allocate::<f32>(0, AllocationMode::Pooled).unwrap();
    assert!(empty.is_empty() && empty.as_slice().unwrap().is_empty());
    // Zero-sized elements are refused (see tests/hardening.rs).
    assert!(manager.allocate::<()>(1 << 40, AllocationMode::Pooled).is_err());
}
