//! The OpenCL backend on a real OpenCL implementation (PoCL in CI). Every test discovers
//! the devices at run time and prints why it skips when there are none; with
//! `UNIMEM_REQUIRE_OPENCL=1` (set by `.ci/run`) a missing device fails instead.

#[path = "support/cl_gate.rs"]
mod cl_gate;
#[path = "support/cl_kernel.rs"]
mod cl_kernel;
#[path = "support/drop_in_time.rs"]
mod drop_in_time;

use std::future::Future;
use std::pin::pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use cl_gate::Gate;
use cl_kernel::Kernel;
use drop_in_time::drops_in_time;
use unimem::opencl3::command_queue::CommandQueue;
use unimem::{AllocationMode, DeviceId, DeviceKind, Error, Location, MapMode, MemoryManager};

/// The manager and its first OpenCL device, or `None` (with the reason printed).
fn opencl() -> Option<(MemoryManager, DeviceId)> {
    let manager = MemoryManager::new();
    let device = manager.devices().into_iter().find(|d| d.kind == DeviceKind::OpenCl).map(|d| d.id);
    if device.is_none() {
        let why = manager.backend_notes().join("; ");
        assert!(std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_none(), "no OpenCL device: {why}");
        eprintln!("skipping: no OpenCL device ({why})");
    }
    device.map(|d| (manager, d))
}

fn kernel(manager: &MemoryManager, device: DeviceId, name: &std::ffi::CStr) -> Kernel {
    let cl = manager.opencl_device(device).unwrap();
    Kernel::new(cl.context().get(), cl.device().id(), name).unwrap()
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5).collect()
}

#[test]
fn round_trips_in_every_mode_and_at_offsets() {
    let Some((manager, device)) = opencl() else { return };
    for mode in
        [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned, AllocationMode::Unified]
    {
        for offset in [0, 1, 333] {
            let mut buffer = manager.allocate_on::<f32>(device, 1000, mode).unwrap();
            if offset == 0 {
                // The first buffer of each pool is fresh memory; later ones reuse it.
                assert!(
                    buffer.as_slice().unwrap().iter().all(|&x| x == 0.0),
                    "{mode:?}: fresh memory is zero"
                );
            }
            let src = data(1000 - offset);
            buffer.copy_from_blocking(&src, offset).unwrap();
            let mut back = vec![0.0; src.len()];
            buffer.copy_to_blocking(&mut back, offset).unwrap();
            assert_eq!(back, src, "{mode:?} at {offset}");
            assert_eq!(&buffer.as_slice().unwrap()[offset..], &src[..], "{mode:?} at {offset}");
            let view = buffer.slice(offset..).unwrap();
            assert_eq!(view.as_slice().unwrap()[0], src[0]);
        }
    }
}

/// A waker that counts its wake-ups: completion must come from the driver's callback.
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Arc<Wakes>, Waker) {
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    (Arc::clone(&wakes), Waker::from(wakes))
}

/// Waits (without polling any future) until the waker has been called; a liveness bound,
/// not a timing assertion.
fn wait_for_wake(wakes: &Wakes) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while wakes.0.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the completion callback never came");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn gate(manager: &MemoryManager, device: DeviceId) -> Gate {
    let cl = manager.opencl_device(device).unwrap();
    Gate::close(cl.context().get(), cl.queue().get())
}

#[test]
fn async_copies_round_trip_in_every_mode() {
    let Some((manager, device)) = opencl() else { return };
    for mode in
        [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned, AllocationMode::Unified]
    {
        let mut buffer = manager.allocate_on::<f32>(device, 5000, mode).unwrap();
        let src = data(4000);
        pollster::block_on(buffer.copy_from(&src, 1000)).unwrap();
        let mut back = vec![0.0; 4000];
        pollster::block_on(buffer.copy_to(&mut back, 1000)).unwrap();
        assert_eq!(back, src, "{mode:?}");
        let err = pollster::block_on(buffer.copy_from(&src, 1001)).unwrap_err();
        assert!(matches!(err, Error::OutOfBounds { offset: 1001, .. }), "{err}");
    }
}

#[test]
fn async_copies_complete_through_the_event_callback() {
    let Some((manager, device)) = opencl() else { return };
    let n = 1 << 18;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    let mut dst = vec![0.0; n];
    let (wakes, waker) = counting_waker();
    let mut cx = Context::from_waker(&waker);
    let mut gate = gate(&manager, device);
    {
        let mut copy = pin!(buffer.copy_to(&mut dst, 0));
        assert!(copy.as_mut().poll(&mut cx).is_pending(), "the queue is gated: the read waits");
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        gate.open();
        wait_for_wake(&wakes);
        assert!(matches!(copy.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }
    assert_eq!(dst, data(n));
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken once, by the callback");
    assert_eq!(buffer.location(), Location::Device);
}

#[test]
fn a_copy_future_dropped_mid_flight_still_writes_what_it_was_given() {
    let Some((manager, device)) = opencl() else { return };
    let n = 1 << 20;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let mut src = data(n);
    let (_, waker) = counting_waker();
    let mut gate = gate(&manager, device);
    {
        let mut copy = Box::pin(buffer.copy_from(&src, 0));
        assert!(copy.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    } // dropped mid-flight: the device has not read anything yet
    src.fill(-1.0); // the caller's slice is free again at once
    drop(src);
    gate.open();
    assert_eq!(buffer.as_slice().unwrap(), &data(n)[..], "the staged data, not the overwritten source");
}

#[test]
fn a_copy_future_leaked_mid_flight_is_harmless() {
    let Some((manager, device)) = opencl() else { return };
    let n = 1 << 20;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let src = data(n);
    let (_, waker) = counting_waker();
    let mut gate = gate(&manager, device);
    let mut copy = Box::pin(buffer.copy_from(&src, 0));
    assert!(copy.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    std::mem::forget(copy);
    drop(src);
    drop(buffer); // back to the pool with the copy still queued
    gate.open();
    // The next user of the block is ordered after the copy, and sees all of it.
    let reused = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    assert_eq!(manager.statistics().pool_hits, 1);
    assert_eq!(reused.as_slice().unwrap(), &data(n)[..]);

    // A read leaked mid-flight never writes the caller's slice.
    let mut other = manager.allocate_on::<f32>(device, n, AllocationMode::Unpooled).unwrap();
    other.copy_from_blocking(&data(n), 0).unwrap();
    let mut dst = vec![0.0f32; n];
    let mut gate = self::gate(&manager, device);
    let mut read = Box::pin(other.copy_to(&mut dst, 0));
    assert!(read.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    std::mem::forget(read);
    dst.fill(9.0);
    gate.open();
    other.copy_to_blocking(&mut [0.0; 1], 0).unwrap(); // after the leaked read, in queue order
    drop(other); // freed with nothing of it in use
    assert!(dst.iter().all(|&x| x == 9.0), "the device wrote into memory it no longer owned");
}

#[test]
fn a_kernel_writes_and_the_host_sees_it() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let iota = kernel(&manager, device, c"iota");
    let mut buffer = manager.allocate_on::<f32>(device, 4096, AllocationMode::Pooled).unwrap();
    assert_eq!(buffer.location(), Location::Device);
    iota.arg_mem(0, buffer.opencl_mem(cl.queue(), MapMode::Write).unwrap().mem()).unwrap();
    iota.enqueue(cl.queue().get(), 4096).unwrap();
    let before = manager.statistics().syncs_to_host;
    // Host access orders itself after the kernel (same in-order queue, blocking read).
    assert!(buffer.as_slice().unwrap().iter().enumerate().all(|(i, &x)| x == i as f32));
    assert_eq!(buffer.location(), Location::Both);
    assert_eq!(manager.statistics().syncs_to_host, before + 1, "one copy to the host");
    buffer.as_slice().unwrap();
    assert_eq!(manager.statistics().syncs_to_host, before + 1, "a current mirror is not copied again");
}

#[test]
fn the_host_writes_and_a_kernel_reads_it() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let scale = kernel(&manager, device, c"scale");
    let mut input = manager.allocate_on::<f32>(device, 1024, AllocationMode::Pooled).unwrap();
    let mut output = manager.allocate_on::<f32>(device, 1024, AllocationMode::Pooled).unwrap();
    input.map(MapMode::Write).unwrap().copy_from_slice(&data(1024));
    assert_eq!(input.location(), Location::Host, "host writes make the host side newer");
    let to_device = manager.statistics().syncs_to_device;
    scale.arg_mem(0, input.opencl_mem(cl.queue(), MapMode::Read).unwrap().mem()).unwrap();
    assert_eq!(input.location(), Location::Both, "flushed for the kernel, mirror still current");
    assert_eq!(manager.statistics().syncs_to_device, to_device + 1);
    scale.arg_mem(1, output.opencl_mem(cl.queue(), MapMode::Write).unwrap().mem()).unwrap();
    scale.arg_f32(2, 3.0).unwrap();
    scale.enqueue(cl.queue().get(), 1024).unwrap();
    let mut result = vec![0.0; 1024];
    output.copy_to_blocking(&mut result, 0).unwrap();
    let expected: Vec<f32> = data(1024).iter().enumerate().map(|(i, x)| x * 3.0 + i as f32).collect();
    assert_eq!(result, expected);
    assert_eq!(output.location(), Location::Device, "copy_to reads the device without a mirror");
}

#[test]
fn copies_that_are_not_needed_are_skipped() {
    let Some((manager, device)) = opencl() else { return };
    let mut buffer = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Pooled).unwrap();
    let start = manager.statistics();
    // Overwriting everything from the host reads nothing back first.
    buffer.copy_from_blocking(&vec![7; 1 << 16], 0).unwrap();
    buffer.map(MapMode::Write).unwrap().fill(9);
    let after_writes = manager.statistics();
    assert_eq!(after_writes.syncs_to_host, start.syncs_to_host, "no read-back for whole overwrites");
    // The host side is newer: a second host write and reads need no copy either way.
    buffer.as_mut_slice().unwrap()[0] = 1;
    assert_eq!(buffer.as_slice().unwrap()[1], 9);
    let mut one = [0];
    buffer.copy_to_blocking(&mut one, 5).unwrap();
    assert_eq!(one, [9]);
    let end = manager.statistics();
    assert_eq!((end.syncs_to_host, end.syncs_to_device), (start.syncs_to_host, start.syncs_to_device));
    // A device-side copy into another buffer flushes once, then is device-local.
    let mut other = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Pooled).unwrap();
    buffer.opencl_mem(manager.opencl_device(device).unwrap().queue(), MapMode::Read).unwrap().mem();
    other.copy_from_buffer(&buffer).unwrap();
    assert_eq!(other.location(), Location::Device);
    assert_eq!(other.as_slice().unwrap()[0], 1);
    assert_eq!(manager.statistics().syncs_to_device, start.syncs_to_device + 1);
}

#[test]
fn pooled_reuse_waits_for_the_last_use() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let iota = kernel(&manager, device, c"iota");
    let n = 1 << 22;
    for _ in 0..3 {
        let mut pinned = manager.allocate_on::<f32>(device, n, AllocationMode::Pinned).unwrap();
        pinned.as_mut_slice().unwrap().fill(-1.0);
        let address = pinned.as_slice().unwrap().as_ptr();
        iota.arg_mem(0, pinned.opencl_mem(cl.queue(), MapMode::Write).unwrap().mem()).unwrap();
        iota.enqueue(cl.queue().get(), n).unwrap();
        drop(pinned); // the kernel may still run
        let reused = manager.allocate_on::<f32>(device, n, AllocationMode::Pinned).unwrap();
        let seen = reused.as_slice().unwrap();
        assert_eq!(seen.as_ptr(), address, "the same pooled memory");
        // The host reads in place, with no transfer: only the fence orders it after the kernel.
        assert!(seen.iter().enumerate().all(|(i, &x)| x == i as f32), "reuse saw the kernel unfinished");
    }
}

#[test]
fn eight_threads_allocate_copy_and_return() {
    let Some((manager, device)) = opencl() else { return };
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            let manager = &manager;
            scope.spawn(move || {
                for round in 0..50u32 {
                    let n = 256 + (round as usize % 5) * 1000;
                    let mode = [AllocationMode::Pooled, AllocationMode::Pinned, AllocationMode::Unified]
                        [round as usize % 3];
                    let mut buffer = manager.allocate_on::<u32>(device, n, mode).unwrap();
                    let src: Vec<u32> = (0..n as u32).map(|i| i ^ (t << 24) ^ round).collect();
                    buffer.copy_from_blocking(&src, 0).unwrap();
                    let mut back = vec![0; n];
                    buffer.copy_to_blocking(&mut back, 0).unwrap();
                    assert_eq!(back, src);
                }
            });
        }
    });
    let stats = manager.statistics();
    assert_eq!(stats.active_buffers, 0);
    assert!(stats.pool_hits > 0);
}

#[test]
fn bad_input_is_refused_and_nothing_is_lost() {
    let Some((manager, device)) = opencl() else { return };
    let mut buffer = manager.allocate_on::<f32>(device, 100, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(100), 0).unwrap();
    let err = buffer.copy_from_blocking(&data(10), 95).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { offset: 95, len: 10, buffer_len: 100 }), "{err}");
    let err = buffer.copy_to_blocking(&mut [0.0; 101], 0).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
    let small = manager.allocate_on::<f32>(device, 99, AllocationMode::Pooled).unwrap();
    assert!(matches!(buffer.copy_from_buffer(&small), Err(Error::LengthMismatch { .. })));
    let mut unified = manager.allocate_on::<f32>(device, 10, AllocationMode::Unified).unwrap();
    assert!(matches!(
        unified.opencl_mem(manager.opencl_device(device).unwrap().queue(), MapMode::Read),
        Err(Error::UnsupportedMode { .. })
    ));
    let mut cpu = manager.allocate::<f32>(10, AllocationMode::Pooled).unwrap();
    let err = cpu.opencl_mem(manager.opencl_device(device).unwrap().queue(), MapMode::Read).unwrap_err();
    assert!(
        matches!(err, Error::WrongBackend { expected: DeviceKind::OpenCl, found: DeviceKind::Cpu, .. }),
        "{err}"
    );
    assert!(err.to_string().starts_with("not an OpenCL buffer: device 0 holds CPU memory"), "{err}");
    assert!(matches!(manager.opencl_device(DeviceId::CPU), Err(Error::WrongDeviceKind { .. })));
    assert_eq!(buffer.as_slice().unwrap(), &data(100)[..], "the buffer is intact");
}

/// Kernels on `Unified` (SVM) buffers: the host writes, a kernel reads one buffer and
/// writes another, the host sees the result; a buffer dropped while a kernel holds it is
/// reused only after the kernel, mapped for the host again.
fn svm_with_kernels(manager: &MemoryManager, device: DeviceId) {
    let cl = manager.opencl_device(device).unwrap();
    let scale = kernel(manager, device, c"scale");
    let n = 1 << 22;
    let mut input = manager.allocate_on::<f32>(device, n, AllocationMode::Unified).unwrap();
    let mut output = manager.allocate_on::<f32>(device, n, AllocationMode::Unified).unwrap();
    input.as_mut_slice().unwrap().copy_from_slice(&data(n));
    scale.arg_svm(0, input.opencl_svm(cl.queue(), MapMode::Read).unwrap().pointer()).unwrap();
    scale.arg_svm(1, output.opencl_svm(cl.queue(), MapMode::Write).unwrap().pointer()).unwrap();
    scale.arg_f32(2, 2.0).unwrap();
    scale.enqueue(cl.queue().get(), n).unwrap();
    let expected: Vec<f32> = data(n).iter().enumerate().map(|(i, x)| x * 2.0 + i as f32).collect();
    assert_eq!(output.as_slice().unwrap(), &expected[..]);
    assert_eq!(input.as_slice().unwrap(), &data(n)[..]);
    let mut back = vec![0.0; 10];
    output.copy_to_blocking(&mut back, 5).unwrap();
    assert_eq!(back, expected[5..15]);

    let iota = kernel(manager, device, c"iota");
    for _ in 0..3 {
        let mut held = manager.allocate_on::<f32>(device, 1 << 22, AllocationMode::Unified).unwrap();
        held.as_mut_slice().unwrap().fill(-1.0);
        iota.arg_svm(0, held.opencl_svm(cl.queue(), MapMode::Write).unwrap().pointer()).unwrap();
        iota.enqueue(cl.queue().get(), 1 << 22).unwrap();
        drop(held); // the kernel may still run, and the memory is the device's
        let reused = manager.allocate_on::<f32>(device, 1 << 22, AllocationMode::Unified).unwrap();
        assert!(reused.as_slice().unwrap().iter().enumerate().all(|(i, &x)| x == i as f32));
    }
    assert!(manager.statistics().pool_hits >= 3);
}

#[test]
fn fine_grained_svm_with_kernels() {
    let Some((manager, device)) = opencl() else { return };
    svm_with_kernels(&manager, device);
}

/// Runs in a child process with `UNIMEM_OPENCL_COARSE_SVM` set: PoCL offers both kinds, and
/// the knob makes unimem use coarse-grained SVM, mapped and unmapped as host and kernels
/// take turns.
#[test]
fn coarse_grained_svm_with_kernels() {
    if std::env::var_os("UNIMEM_COARSE_CHILD").is_some() {
        let Some((manager, device)) = opencl() else { return };
        let cl = manager.opencl_device(device).unwrap();
        if !cl.coarse_svm_only() {
            eprintln!("skipping: this device has no coarse-grained SVM");
            return;
        }
        svm_with_kernels(&manager, device);
        eprintln!("coarse-grained SVM exercised");
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "coarse_grained_svm_with_kernels", "--nocapture"])
        .env("UNIMEM_COARSE_CHILD", "1")
        .env("UNIMEM_OPENCL_COARSE_SVM", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed: {log}");
    if std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_some() {
        assert!(log.contains("coarse-grained SVM exercised"), "{log}");
    }
}

/// Runs in child processes with two PoCL devices (`POCL_DEVICES="pthread pthread"`): the
/// devices of a platform share one context and are each other's peers, and with
/// `UNIMEM_OPENCL_CONTEXT_PER_DEVICE` (the fallback where no shared context can be made)
/// each has its own and none is a peer, with a note saying so. Buffers move between the
/// devices either way. `UNIMEM_REQUIRE_OPENCL_PEERS=1` fails where there are not two
/// devices (another OpenCL implementation ignores `POCL_DEVICES`).
#[test]
fn the_devices_of_a_platform_share_a_context() {
    if let Some(mode) = std::env::var_os("UNIMEM_SHARED_CONTEXT_CHILD") {
        let shared = mode == "shared";
        let manager = MemoryManager::new();
        let ids: Vec<DeviceId> = manager.devices_of(DeviceKind::OpenCl).iter().map(|d| d.id).collect();
        let [a, b, ..] = ids[..] else {
            return eprintln!("skipping: {} OpenCL device(s), not two", ids.len());
        };
        let (cl_a, cl_b) = (manager.opencl_device(a).unwrap(), manager.opencl_device(b).unwrap());
        assert_eq!(std::ptr::eq(cl_a.context(), cl_b.context()), shared);
        assert_eq!(cl_a.shares_context_with(cl_b), shared);
        let matrix = manager.peer_access_matrix();
        assert_eq!((matrix[a.index()][b.index()], matrix[b.index()][a.index()]), (shared, shared));
        let notes = manager.backend_notes().join("; ");
        assert_eq!(notes.contains("UNIMEM_OPENCL_CONTEXT_PER_DEVICE"), !shared, "{notes}");
        for mode in [AllocationMode::Pooled, AllocationMode::Pinned, AllocationMode::Unified] {
            let mut src = manager.allocate_on::<f32>(a, 5000, mode).unwrap();
            src.copy_from_blocking(&data(5000), 0).unwrap();
            let mut dst = manager.allocate_on::<f32>(b, 5000, mode).unwrap();
            dst.copy_from_buffer(&src).unwrap();
            assert_eq!(dst.as_slice().unwrap(), &data(5000)[..], "{mode:?}");
        }
        return eprintln!("two devices exercised");
    }
    for mode in ["shared", "per device"] {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "the_devices_of_a_platform_share_a_context", "--nocapture"])
            .env("UNIMEM_SHARED_CONTEXT_CHILD", mode)
            .env("POCL_DEVICES", "pthread pthread");
        if mode != "shared" {
            command.env("UNIMEM_OPENCL_CONTEXT_PER_DEVICE", "1");
        }
        let output = command.output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child ({mode}) failed: {log}");
        if std::env::var_os("UNIMEM_REQUIRE_OPENCL_PEERS").is_some() {
            assert!(log.contains("two devices exercised"), "{log}");
        }
    }
}

/// Runs in a child process with `OCL_ICD_VENDORS` pointing at an empty folder.
#[test]
fn without_an_icd_there_are_no_devices_and_a_reason() {
    if std::env::var_os("UNIMEM_NO_ICD_CHILD").is_some() {
        let manager = MemoryManager::new();
        let devices = manager.devices();
        assert!(devices.iter().all(|d| d.kind != DeviceKind::OpenCl), "{devices:?}");
        let notes = manager.backend_notes();
        let note = notes.iter().find(|n| n.starts_with("OpenCL: ")).unwrap_or_else(|| panic!("{notes:?}"));
        eprintln!("reason given: {note}");
        let mut buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        buffer.as_mut_slice().unwrap().fill(1);
        return;
    }
    let empty = std::env::temp_dir().join(format!("unimem-no-icd-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "without_an_icd_there_are_no_devices_and_a_reason", "--nocapture"])
        .env("UNIMEM_NO_ICD_CHILD", "1")
        .env("OCL_ICD_VENDORS", &empty)
        .env_remove("UNIMEM_REQUIRE_OPENCL")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&empty);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed: {log}");
    assert!(log.contains("reason given: OpenCL:"), "{log}");
}

/// A second in-order queue on the device's context: the caller's own, not unimem's.
fn callers_queue(manager: &MemoryManager, device: DeviceId) -> CommandQueue {
    let cl = manager.opencl_device(device).unwrap();
    #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
    // SAFETY: a live context and one of its devices, no properties.
    let raw = unsafe { cl3::command_queue::create_command_queue(cl.context().get(), cl.device().id(), 0) }
        .expect("clCreateCommandQueue");
    CommandQueue::new(raw, 3)
}

#[test]
fn reuse_after_a_kernel_on_the_callers_queue_is_ordered_on_the_device() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let theirs = callers_queue(&manager, device);
    let iota = kernel(&manager, device, c"iota");
    let n = 1 << 20;
    let mut first = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let mut gate = Gate::close(cl.context().get(), theirs.get());
    let access = first.opencl_mem(&theirs, MapMode::Write).unwrap();
    iota.arg_mem(0, access.mem()).unwrap();
    iota.enqueue(theirs.get(), n).unwrap(); // held behind the gate
    drop(access); // records the kernel as the buffer's last use
    drop(first); // enqueues the ordering, waits for nothing (the kernel is still gated)

    let mut second = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    assert_eq!(manager.statistics().pool_hits, 1, "the same block, reused");
    let ones = vec![1.0f32; n];
    let (wakes, waker) = counting_waker();
    {
        let mut write = pin!(second.copy_from(&ones, 0));
        let mut cx = Context::from_waker(&waker);
        assert!(write.as_mut().poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "unimem's write waits for the caller's kernel");
        gate.open();
        wait_for_wake(&wakes);
        assert!(matches!(write.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }
    // The kernel ran first, then the write: the new user's data, not the old user's.
    let mut back = vec![0.0f32; n];
    second.copy_to_blocking(&mut back, 0).unwrap();
    assert!(back.iter().all(|&x| x == 1.0), "the caller's kernel overwrote the next user's data");
}

#[test]
fn host_access_waits_for_kernels_on_the_callers_queue() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let theirs = callers_queue(&manager, device);
    let iota = kernel(&manager, device, c"iota");
    let n = 1 << 20;
    // A guard leaked instead of dropped records no marker: the caller's whole queue stands
    // for its last use.
    let modes = [AllocationMode::Pooled, AllocationMode::Pinned];
    for (mode, leak) in modes.into_iter().flat_map(|mode| [(mode, false), (mode, true)]) {
        let mut buffer = manager.allocate_on::<f32>(device, n, mode).unwrap();
        let mut gate = Gate::close(cl.context().get(), theirs.get());
        let access = buffer.opencl_mem(&theirs, MapMode::Write).unwrap();
        iota.arg_mem(0, access.mem()).unwrap();
        iota.enqueue(theirs.get(), n).unwrap();
        if leak {
            std::mem::forget(access);
        } else {
            drop(access);
        }
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| buffer.as_slice().unwrap().to_vec());
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !reader.is_finished(),
                "{mode:?} (leaked: {leak}): host access ran ahead of the caller's kernel"
            );
            gate.open();
            let seen = reader.join().unwrap();
            assert!(seen.iter().enumerate().all(|(i, &x)| x == i as f32), "{mode:?}: kernel result");
        });
    }
}

#[test]
fn the_callers_queue_is_ordered_after_unimems_writes() {
    let Some((manager, device)) = opencl() else { return };
    let theirs = callers_queue(&manager, device);
    let scale = kernel(&manager, device, c"scale");
    let n = 1 << 20;
    let mut input = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let mut output = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let mut gate = gate(&manager, device); // unimem's queue
    let (_, waker) = counting_waker();
    let src = data(n);
    {
        let mut write = Box::pin(input.copy_from(&src, 0));
        assert!(write.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    } // dropped: the write stays queued behind the gate
    let (read, write) = (
        input.opencl_mem(&theirs, MapMode::Read).unwrap(),
        output.opencl_mem(&theirs, MapMode::Write).unwrap(),
    );
    scale.arg_mem(0, read.mem()).unwrap();
    scale.arg_mem(1, write.mem()).unwrap();
    scale.arg_f32(2, 2.0).unwrap();
    scale.enqueue(theirs.get(), n).unwrap(); // must not run before unimem's write
    drop((read, write));
    gate.open();
    let expected: Vec<f32> = data(n).iter().enumerate().map(|(i, x)| x * 2.0 + i as f32).collect();
    assert_eq!(output.as_slice().unwrap(), &expected[..], "the kernel read the input before it was written");
}

#[test]
fn a_queue_of_another_context_is_refused() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let other = unimem::opencl3::context::Context::from_device(&unimem::opencl3::device::Device::new(
        cl.device().id(),
    ))
    .unwrap();
    #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
    let foreign = CommandQueue::create_default(&other, 0).unwrap();
    let mut buffer = manager.allocate_on::<f32>(device, 100, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(100), 0).unwrap();
    buffer.as_mut_slice().unwrap()[0] = 42.0; // host side newer: a refused call must not flush
    let err = buffer.opencl_mem(&foreign, MapMode::ReadWrite).unwrap_err();
    assert!(matches!(err, Error::ForeignQueue { .. }), "{err}");
    assert_eq!(buffer.location(), Location::Host, "unchanged");
    let err = buffer.opencl_svm(&callers_queue(&manager, device), MapMode::Read).unwrap_err();
    assert!(matches!(err, Error::UnsupportedMode { .. }), "{err}");
    let mut expected = data(100);
    expected[0] = 42.0;
    assert_eq!(buffer.as_slice().unwrap(), &expected[..]);
}

/// A `Write` mapping that is never written (dropped early, or leaked) leaves the buffer as
/// it was: before, it installed a zeroed mirror that counted as current, and the next
/// partial host write flushed the zeros over the device's data.
#[test]
fn an_unwritten_write_mapping_leaves_the_buffer_as_it_was() {
    let Some((manager, device)) = opencl() else { return };
    let n = 1024;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    drop(buffer.map(MapMode::Write).unwrap());
    assert_eq!(buffer.location(), Location::Device);
    assert_eq!(buffer.as_slice().unwrap(), &data(n)[..], "a dropped, unwritten mapping changed the data");

    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    std::mem::forget(buffer.map(MapMode::Write).unwrap());
    buffer.as_mut_slice().unwrap()[0] = 42.0; // a partial host write, flushed below
    let mut copy = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.opencl_mem(manager.opencl_device(device).unwrap().queue(), MapMode::Read).unwrap().mem(); // the host side goes to the device
    copy.copy_from_buffer(&buffer).unwrap(); // device to device
    let mut back = vec![0.0; n];
    copy.copy_to_blocking(&mut back, 0).unwrap();
    let lost = back.iter().zip(data(n)).skip(1).filter(|(a, b)| **a != *b).count();
    assert_eq!((back[0], lost), (42.0, 0), "a leaked, unwritten mapping lost {lost} of {n} elements");

    // A written mapping is the new contents, as before.
    let mut mapping = buffer.map(MapMode::Write).unwrap();
    mapping.fill(3.0);
    drop(mapping);
    assert_eq!(buffer.location(), Location::Host);
    buffer.copy_to_blocking(&mut back, 0).unwrap();
    assert!(back.iter().all(|&x| x == 3.0));
}

/// Every empty operation is an `Ok` no-op on the device, in every mode.
#[test]
fn empty_device_operations_are_no_ops() {
    let Some((manager, device)) = opencl() else { return };
    for mode in
        [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned, AllocationMode::Unified]
    {
        let mut a = manager.allocate_on::<f32>(device, 0, mode).unwrap();
        let b = manager.allocate_on::<f32>(device, 0, mode).unwrap();
        a.copy_from_buffer(&b).unwrap_or_else(|e| panic!("{mode}: copy_from_buffer of empty buffers: {e}"));
        a.copy_from_blocking(&[], 0).unwrap();
        b.copy_to_blocking(&mut [], 0).unwrap();
        pollster::block_on(a.copy_from(&[], 0)).unwrap();
        pollster::block_on(b.copy_to(&mut [], 0)).unwrap();
        assert!(a.as_slice().unwrap().is_empty());
        assert!(a.as_mut_slice().unwrap().is_empty());
        let mut full = manager.allocate_on::<f32>(device, 10, mode).unwrap();
        full.copy_from_blocking(&[], 10).unwrap();
        full.copy_to_blocking(&mut [], 10).unwrap();
    }
}

/// Dropping pinned or SVM memory that is freed rather than pooled never waits for the
/// queue: behind a closed gate (a kernel that runs for ever), `drop` returns at once.
#[test]
fn dropping_unpooled_pinned_and_svm_memory_never_waits_for_the_queue() {
    let Some((_, device)) = opencl() else { return };
    let options = unimem::MemoryOptions::default().with_pooling(false);
    let manager = MemoryManager::builder().options(options).build();
    for mode in [AllocationMode::Pinned, AllocationMode::Unified] {
        let mut buffer = manager.allocate_on::<f32>(device, 1 << 20, mode).unwrap();
        buffer.as_mut_slice().unwrap().fill(1.0);
        let mut gate = gate(&manager, device);
        let returned = drops_in_time(buffer);
        gate.open();
        assert!(returned, "{mode}: drop waited for the queue");
    }
    let stats = manager.statistics();
    assert_eq!((stats.active_buffers, stats.total_pooled), (0, 0));
}

/// A request above the device's largest single allocation never fits: its own error, with
/// the limit, and no trim or retry.
#[test]
fn a_request_above_the_largest_allocation_never_fits() {
    let Some((manager, device)) = opencl() else { return };
    let cl = manager.opencl_device(device).unwrap();
    let largest = unimem::opencl3::device::Device::new(cl.device().id()).max_mem_alloc_size().unwrap();
    let err = manager.allocate_on::<u8>(device, largest as usize + 1, AllocationMode::Unpooled).unwrap_err();
    assert!(matches!(err, Error::TooLarge { largest: l, .. } if l == largest), "{err}");
    assert!(err.to_string().contains(&format!("largest allocation {largest} bytes")), "{err}");
    let stats = manager.statistics();
    assert_eq!((stats.oom_retries, stats.trims), (0, 0), "never fits: no trim, no retry");
}

#[test]
fn free_memory_is_unknown_where_the_driver_cannot_tell() {
    let Some((manager, device)) = opencl() else { return };
    let info = manager.devices().into_iter().find(|d| d.id == device).unwrap();
    assert_eq!(info.free_memory, None);
    assert_eq!(manager.free_memory(device).unwrap(), None);
}

/// Host access to a device buffer larger than the host memory left is `OutOfMemory`, not
/// an abort. In a child process whose address space is capped (`RLIMIT_AS`) just above
/// what the device buffer itself takes (PoCL's device memory is host memory).
#[test]
fn a_host_mirror_larger_than_free_host_memory_is_out_of_memory() {
    if std::env::var_os("UNIMEM_MIRROR_OOM_CHILD").is_some() {
        return mirror_oom_child();
    }
    if opencl().is_none() {
        return;
    }
    let name = "a_host_mirror_larger_than_free_host_memory_is_out_of_memory";
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env("UNIMEM_MIRROR_OOM_CHILD", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed ({}):\n{log}", output.status);
    assert!(log.contains("1 passed"), "{log}");
}

fn mirror_oom_child() {
    let (manager, device) = opencl().unwrap();
    let n = 96 << 20; // 384 MiB of f32
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&[5.0; 16], 0).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // Room for 128 MiB more: not for a 384 MiB mirror.
    let cap = (vm_kib << 10) + (128 << 20);
    let limit = libc::rlimit { rlim_cur: cap, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: `setrlimit` reads one `rlimit`; lowering the soft limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &raw const limit) }, 0);
    let err = buffer.as_slice().unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(matches!(buffer.map(MapMode::Write), Err(Error::OutOfMemory { .. })));
    // Smaller copies still work, and the buffer is intact.
    let mut head = [0.0; 16];
    buffer.copy_to_blocking(&mut head, 0).unwrap();
    assert_eq!(head, [5.0; 16]);
    assert_eq!(buffer.location(), Location::Device);
}

/// Runs `f` on a thread of its own; its result if it returns within 30 s (a liveness bound,
/// not a timing assertion), `None` if it waits on the closed queue.
fn returns_in_time<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result.recv_timeout(Duration::from_secs(30)).ok()
}

#[test]
fn fresh_allocations_never_wait_for_work_queued_on_the_device() {
    let Some((manager, device)) = opencl() else { return };
    let manager = Arc::new(manager);
    let mut buffer = manager.allocate_on::<u8>(device, 1 << 20, AllocationMode::Unpooled).unwrap();
    let src = vec![7u8; 1 << 20];
    let (_, waker) = counting_waker();
    let mut gate = gate(&manager, device);
    let mut write = Box::pin(buffer.copy_from(&src, 0));
    assert!(write.as_mut().poll(&mut Context::from_waker(&waker)).is_pending(), "the queue is closed");
    // Fresh memory of every kind is the caller's at once, whatever is queued before it: a
    // transfer behind a slow kernel (here, a closed gate) does not hold up allocation.
    let unified = manager.devices_of(DeviceKind::OpenCl)[0].supports_unified;
    let allocated = returns_in_time({
        let manager = Arc::clone(&manager);
        move || {
            for mode in [AllocationMode::Unpooled, AllocationMode::Pooled, AllocationMode::Pinned]
                .into_iter()
                .chain(unified.then_some(AllocationMode::Unified))
            {
                manager.allocate_on::<u8>(device, 3 << 20, mode).unwrap();
            }
        }
    });
    gate.open();
    drop(write);
    assert!(allocated.is_some(), "allocation waited for the work queued before it");
    assert_eq!(buffer.to_vec().unwrap(), src);
}
