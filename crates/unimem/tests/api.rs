//! What a user reaches for: choosing devices and backends, filling and collecting buffers,
//! nested and mapped views, and getting a vector back from a refused `create_buffer`. The
//! device paths run on every OpenCL device there is (PoCL in CI).

use unimem::{AllocationMode, DeviceId, DeviceKind, Error, Location, MapMode, MemoryManager, MemoryOptions};

/// A CPU manager and, where OpenCL is compiled in and has devices, their first device's
/// manager too: every check runs on each.
fn managers() -> Vec<(MemoryManager, DeviceId)> {
    let mut all = vec![(MemoryManager::builder().backends([DeviceKind::Cpu]).build(), DeviceId::CPU)];
    let opencl = MemoryManager::builder().backends([DeviceKind::OpenCl]).build();
    if let Some(device) = opencl.devices_of(DeviceKind::OpenCl).first() {
        let id = device.id;
        all.push((opencl, id));
    }
    all
}

#[test]
fn backends_choose_the_devices_and_the_cpu_is_always_device_zero() {
    let cpu = MemoryManager::builder().backends([DeviceKind::Cpu]).build();
    assert_eq!(cpu.devices().len(), 1);
    assert_eq!(cpu.devices()[0].id, DeviceId::CPU);
    assert!(cpu.backend_notes().is_empty(), "{:?}", cpu.backend_notes());
    assert_eq!(cpu.best_device().id, DeviceId::CPU, "no accelerator: the CPU");
    let opencl = MemoryManager::builder().backends([DeviceKind::OpenCl]).build();
    assert_eq!(opencl.devices()[0].kind, DeviceKind::Cpu);
    assert!(opencl.devices().iter().skip(1).all(|d| d.kind == DeviceKind::OpenCl));
    if cfg!(not(feature = "opencl")) {
        let notes = opencl.backend_notes().join("; ");
        assert!(notes.contains("not compiled in"), "a backend asked for and missing says so: {notes}");
    }
    let all = MemoryManager::new();
    assert_eq!(all.devices_of(DeviceKind::Cpu).len(), 1);
    assert_eq!(all.devices_of(DeviceKind::OpenCl).len(), opencl.devices().len() - 1);
    let best = all.best_device();
    let accelerators: Vec<_> = all.devices().into_iter().skip(1).collect();
    match accelerators.iter().map(|d| d.total_memory).max() {
        Some(most) => assert_eq!(best.total_memory, most, "the accelerator with the most memory"),
        None => assert_eq!(best.id, DeviceId::CPU),
    }
    if !accelerators.is_empty() {
        assert_ne!(best.kind, DeviceKind::Cpu, "an accelerator wins over the CPU");
    }
}

#[test]
fn fill_and_to_vec_in_every_mode() {
    for (manager, device) in managers() {
        for mode in [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned] {
            let mut buffer = manager.allocate_on::<f32>(device, 1000, mode).unwrap();
            buffer.fill(2.5).unwrap();
            assert_eq!(buffer.to_vec().unwrap(), vec![2.5; 1000], "{device} {mode}");
            // A fill over host changes, and a partial fill through a view, keep the rest.
            buffer.as_mut_slice().unwrap()[3] = 7.0;
            buffer.slice_mut(10..20).unwrap().fill(-1.0).unwrap();
            let back = buffer.to_vec().unwrap();
            assert_eq!(back[3], 7.0, "{device} {mode}: the host's change outside the view survives");
            assert!(back[10..20].iter().all(|&x| x == -1.0), "{device} {mode}");
            assert!(back[20..].iter().all(|&x| x == 2.5), "{device} {mode}");
            assert_eq!(buffer.slice(8..12).unwrap().to_vec().unwrap(), [2.5, 2.5, -1.0, -1.0]);
        }
        // An element the device cannot fill with (12 bytes) goes through the host.
        let mut triples = manager.allocate_on::<[u32; 3]>(device, 100, AllocationMode::Pooled).unwrap();
        triples.fill([1, 2, 3]).unwrap();
        assert_eq!(triples.to_vec().unwrap(), vec![[1, 2, 3]; 100]);
        let mut empty = manager.allocate_on::<u8>(device, 0, AllocationMode::Pooled).unwrap();
        empty.fill(1).unwrap();
        assert!(empty.to_vec().unwrap().is_empty());
    }
}

#[test]
fn a_device_fill_copies_nothing_to_or_from_the_host() {
    for (manager, device) in managers().into_iter().filter(|(_, d)| *d != DeviceId::CPU) {
        let mut buffer = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Pooled).unwrap();
        let before = manager.statistics();
        buffer.fill(0xdead_beef).unwrap();
        let after = manager.statistics();
        assert_eq!(
            (after.syncs_to_host, after.syncs_to_device),
            (before.syncs_to_host, before.syncs_to_device)
        );
        assert_eq!(buffer.location(), Location::Device, "filled on the device");
        assert!(buffer.as_slice().unwrap().iter().all(|&x| x == 0xdead_beef));
    }
}

#[test]
fn mutable_views_nest_and_offsets_add_up() {
    for (manager, device) in managers() {
        let mut buffer = manager.allocate_on::<u32>(device, 100, AllocationMode::Pooled).unwrap();
        buffer.copy_from_blocking(&(0..100).collect::<Vec<_>>(), 0).unwrap();
        let mut outer = buffer.slice_mut(10..90).unwrap();
        let mut middle = outer.slice_mut(10..70).unwrap(); // 20..80
        let mut inner = middle.slice_mut(5..=9).unwrap(); // 25..30
        assert_eq!((inner.offset(), inner.len()), (25, 5));
        inner.copy_from_blocking(&[1000, 1001], 3).unwrap();
        assert!(matches!(inner.slice_mut(4..6), Err(Error::OutOfBounds { .. })), "{device}");
        assert!(matches!(inner.copy_from_blocking(&[0; 3], 3), Err(Error::OutOfBounds { .. })));
        assert_eq!(middle.slice(5..10).unwrap().to_vec().unwrap(), [25, 26, 27, 1000, 1001]);
        let back = buffer.to_vec().unwrap();
        assert_eq!(back[24..31], [24, 25, 26, 27, 1000, 1001, 30], "{device}");
    }
}

#[test]
fn views_map_their_own_elements_and_a_write_mapping_keeps_the_rest() {
    for (manager, device) in managers() {
        let mut buffer = manager.allocate_on::<u32>(device, 64, AllocationMode::Pooled).unwrap();
        buffer.copy_from_blocking(&(0..64).collect::<Vec<_>>(), 0).unwrap();
        {
            let mut view = buffer.slice_mut(8..16).unwrap();
            let read = view.map(MapMode::Read).unwrap();
            assert_eq!(&read[..], &(8..16).collect::<Vec<_>>()[..], "{device}");
            drop(read);
            let mut write = view.map(MapMode::Write).unwrap();
            assert_eq!(write.len(), 8);
            assert_eq!(write.mode(), MapMode::Write);
            write.fill(7);
        }
        let back = buffer.to_vec().unwrap();
        assert!(back[8..16].iter().all(|&x| x == 7), "{device}");
        assert_eq!(back[..8], (0..8).collect::<Vec<_>>()[..], "{device}: before the view, intact");
        assert_eq!(back[16..], (16..64).collect::<Vec<_>>()[..], "{device}: after the view, intact");
    }
}

#[test]
fn a_refused_create_buffer_gives_the_vector_back() {
    let manager = MemoryManager::builder().backends([DeviceKind::Cpu]).build();
    let data: Vec<u64> = (0..1000).collect();
    let address = data.as_ptr();
    let adopted = manager.create_buffer(data, AllocationMode::Unified).unwrap();
    assert_eq!(adopted.as_slice().unwrap().as_ptr(), address, "adopted without a copy");
    let options = MemoryOptions::default().with_memory_limit(Some(4096)).unwrap();
    let limited = MemoryManager::builder().options(options).backends([DeviceKind::Cpu]).build();
    let data: Vec<u64> = (0..1000).collect();
    let refused = limited.create_buffer(data, AllocationMode::Pinned).unwrap_err();
    assert!(matches!(refused.error, Error::OutOfMemory { .. }), "{}", refused.error);
    assert_eq!(refused.data, (0..1000).collect::<Vec<u64>>(), "the vector, unharmed");
    let as_error: Error = refused.into();
    assert!(matches!(as_error, Error::OutOfMemory { .. }));
}

#[test]
fn bytemuck_is_re_exported_for_element_structs() {
    #[derive(Clone, Copy, Debug, PartialEq, unimem::bytemuck::Pod, unimem::bytemuck::Zeroable)]
    #[repr(C)]
    #[bytemuck(crate = "unimem::bytemuck")]
    struct Point {
        x: f32,
        y: f32,
    }
    let manager = MemoryManager::builder().backends([DeviceKind::Cpu]).build();
    let mut points = manager.allocate::<Point>(4, AllocationMode::Pooled).unwrap();
    points.fill(Point { x: 1.0, y: 2.0 }).unwrap();
    assert_eq!(points.to_vec().unwrap()[3], Point { x: 1.0, y: 2.0 });
}
