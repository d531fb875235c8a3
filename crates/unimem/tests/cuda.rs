//! The CUDA backend. The driver-less paths run everywhere: no driver library at all, and a
//! stub `libcuda.so` (built here with `cc`) whose `cuInit` says CUDA_ERROR_NO_DEVICE. The
//! device tests discover a GPU at run time and print why they skip when there is none;
//! with `UNIMEM_REQUIRE_CUDA=1` a missing GPU fails instead.
//!
//! Where there is no GPU, `the_device_tests_pass_on_a_model_driver` runs the device tests
//! in a child process against `tests/support/model_cuda.c`, a CPU model of the driver API
//! (not CUDA, and no evidence about a GPU): it checks unimem's own logic against the
//! API's ordering rules, and aborts on device commands outside live memory.

#[path = "../examples/cuda_kernel.rs"]
mod cuda_kernel_example;

use std::ffi::c_void;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use unimem::cudarc::driver::{CudaContext, CudaStream, result, sys};
use unimem::{AllocationMode, DeviceId, DeviceKind, Error, Location, MapMode, MemoryManager};

/// The manager and its first CUDA device, or `None` (with the reason printed).
fn cuda() -> Option<(MemoryManager, DeviceId)> {
    let manager = MemoryManager::new();
    let device = manager.devices().into_iter().find(|d| d.kind == DeviceKind::Cuda).map(|d| d.id);
    if device.is_none() {
        let why = manager.backend_notes().join("; ");
        assert!(std::env::var_os("UNIMEM_REQUIRE_CUDA").is_none(), "no CUDA device: {why}");
        eprintln!("skipping: no CUDA device ({why})");
    }
    device.map(|d| (manager, d))
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5).collect()
}

/// Runs this test binary again, for the one test `name`, with `env`.
fn child(name: &str, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", name, "--nocapture"])
        .env("UNIMEM_CUDA_CHILD", "1")
        .env_remove("UNIMEM_REQUIRE_CUDA");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "child failed: {log}");
    log
}

fn in_child() -> bool {
    std::env::var_os("UNIMEM_CUDA_CHILD").is_some()
}

/// In a child: the manager found no CUDA device, says why, and CPU memory still works.
fn report_no_cuda() {
    let manager = MemoryManager::new();
    assert!(manager.devices().iter().all(|d| d.kind != DeviceKind::Cuda), "{:?}", manager.devices());
    let note = manager.backend_notes().iter().find(|n| n.starts_with("CUDA: ")).cloned();
    eprintln!("reason given: {}", note.unwrap_or_default());
    let mut buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
    buffer.as_mut_slice().unwrap().fill(1);
    assert!(manager.cuda_device(DeviceId::CPU).is_err());
}

#[test]
fn without_a_driver_library_there_are_no_devices_and_a_reason() {
    if in_child() {
        return report_no_cuda();
    }
    // SAFETY: only opens the library, calls nothing.
    if unsafe { sys::is_culib_present() } {
        eprintln!("skipping: this machine has a CUDA driver library");
        return;
    }
    let log = child("without_a_driver_library_there_are_no_devices_and_a_reason", &[]);
    assert!(log.contains("reason given: CUDA: no CUDA driver library"), "{log}");
}

/// A stub `libcuda.so` whose `cuInit` returns CUDA_ERROR_NO_DEVICE (100), found first through
/// `LD_LIBRARY_PATH`: the "driver present, no device" path, without panicking.
#[test]
fn a_driver_with_no_device_gives_that_reason() {
    if in_child() {
        return report_no_cuda();
    }
    let dir = std::env::temp_dir().join(format!("unimem-stub-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("stub.c");
    std::fs::write(&source, "int cuInit(unsigned int flags) { (void)flags; return 100; }\n").unwrap();
    build_stub(&source, &dir.join("libcuda.so"));
    std::fs::copy(dir.join("libcuda.so"), dir.join("libcuda.so.1")).unwrap();
    let log = child("a_driver_with_no_device_gives_that_reason", &[("LD_LIBRARY_PATH", dir.as_os_str())]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(log.contains("reason given: CUDA: cuInit failed: CUDA_ERROR_NO_DEVICE"), "{log}");
}

/// The device tests again, in a child process, on a model of the CUDA driver built here
/// (`tests/support/model_cuda.c`: streams as threads, events, stream waits, fresh memory
/// filled with garbage, every device command bounds- and use-after-free-checked). It is not
/// a GPU: it checks unimem's own logic against the driver API's ordering rules where no GPU
/// exists. Two model devices, so that peer copies run too.
#[test]
fn the_device_tests_pass_on_a_model_driver() {
    if in_child() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("unimem-model-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/model_cuda.c");
    build_stub(&source, &dir.join("libcuda.so"));
    std::fs::copy(dir.join("libcuda.so"), dir.join("libcuda.so.1")).unwrap();
    let run = |args: &[&str], faults: bool, peers: Option<&str>| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--skip",
                "without_a_driver",
                "--skip",
                "a_driver_with_no_device",
                "--skip",
                "model_driver",
            ])
            .args(args)
            .env("UNIMEM_CUDA_CHILD", "1")
            .env("UNIMEM_REQUIRE_CUDA", "1")
            .env("UNIMEM_MODEL_CUDA_DEVICES", "2")
            .env("LD_LIBRARY_PATH", &dir);
        if faults {
            command.env("UNIMEM_MODEL_FAULTS", "1");
        }
        if let Some(peers) = peers {
            command.env("UNIMEM_MODEL_CUDA_PEERS", peers);
        }
        let output = command.output().unwrap();
        let log =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "the device tests failed on the model driver:\n{log}");
        let summary = log.lines().find(|l| l.starts_with("test result: ok")).unwrap_or_default().to_string();
        assert!(!summary.contains(" 0 passed"), "{log}");
        summary
    };
    // The device tests in parallel; then the fault-injection tests one at a time (faults
    // are process-wide), with the faults enabled.
    let device_tests = run(&["--skip", "faults_"], false, None);
    let fault_tests = run(&["faults_", "--test-threads=1"], true, None);
    let topology = run(&["--exact", "peer_access_follows_the_drivers_topology"], false, Some(ONE_WAY));
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("on the model driver: {device_tests}; fault injection: {fault_tests}; topology: {topology}");
}

fn build_stub(source: &Path, library: &Path) {
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-pthread", "-o"])
        .arg(library)
        .arg(source)
        .status()
        .expect("a C compiler (`cc`) builds the stub driver");
    assert!(status.success(), "cc failed to build the stub driver");
}

#[test]
fn round_trips_in_every_mode_and_at_offsets() {
    let Some((manager, device)) = cuda() else { return };
    for mode in
        [AllocationMode::Pooled, AllocationMode::Unpooled, AllocationMode::Pinned, AllocationMode::Unified]
    {
        for offset in [0, 1, 333] {
            let mut buffer = manager.allocate_on::<f32>(device, 1000, mode).unwrap();
            if offset == 0 {
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
            pollster::block_on(buffer.copy_from(&src[..10], offset)).unwrap();
            pollster::block_on(buffer.copy_to(&mut back[..10], offset)).unwrap();
            assert_eq!(&buffer.as_slice().unwrap()[offset..], &src[..], "{mode:?} at {offset}");
        }
    }
}

/// A device write through the raw pointer (a `cuMemsetD32Async` standing in for a kernel) on
/// unimem's stream, then host access: the mirror is refreshed once.
#[test]
fn a_device_write_through_the_raw_pointer_is_seen_by_the_host() {
    let Some((manager, device)) = cuda() else { return };
    let cuda = manager.cuda_device(device).unwrap();
    for mode in [AllocationMode::Pooled, AllocationMode::Pinned, AllocationMode::Unified] {
        let n = 1 << 20;
        let mut buffer = manager.allocate_on::<u32>(device, n, mode).unwrap();
        buffer.as_mut_slice().unwrap().fill(1);
        let ptr = buffer.cuda_ptr(cuda.stream(), MapMode::ReadWrite).unwrap().ptr();
        // SAFETY: `n` u32s of our buffer, on unimem's stream.
        unsafe { sys::cuMemsetD32Async(ptr, 7, n, cuda.stream().cu_stream()) }.result().unwrap();
        let before = manager.statistics().syncs_to_host;
        assert!(buffer.as_slice().unwrap().iter().all(|&x| x == 7), "{mode:?}");
        if mode == AllocationMode::Pooled {
            assert_eq!(manager.statistics().syncs_to_host, before + 1);
            assert_eq!(buffer.location(), Location::Both);
        }
    }
}

#[test]
fn pooled_pinned_reuse_waits_for_the_last_use() {
    let Some((manager, device)) = cuda() else { return };
    let cuda = manager.cuda_device(device).unwrap();
    let n = 1 << 24;
    for round in 0..3u32 {
        let mut pinned = manager.allocate_on::<u32>(device, n, AllocationMode::Pinned).unwrap();
        let address = pinned.as_slice().unwrap().as_ptr();
        let ptr = pinned.cuda_ptr(cuda.stream(), MapMode::Write).unwrap().ptr();
        // SAFETY: `n` u32s of our buffer, on unimem's stream.
        unsafe { sys::cuMemsetD32Async(ptr, round + 10, n, cuda.stream().cu_stream()) }.result().unwrap();
        drop(pinned); // the memset may still run
        let reused = manager.allocate_on::<u32>(device, n, AllocationMode::Pinned).unwrap();
        assert_eq!(reused.as_slice().unwrap().as_ptr(), address, "the same pooled memory");
        assert!(
            reused.as_slice().unwrap().iter().all(|&x| x == round + 10),
            "reuse saw the device unfinished"
        );
    }
}

/// Holds a stream at a host function until opened, so that "in flight" is a certainty.
struct StreamGate(Arc<(Mutex<bool>, Condvar)>);

unsafe extern "C" fn wait_at_gate(data: *mut c_void) {
    // SAFETY: the Arc leaked for this launch in `StreamGate::close`.
    let gate = unsafe { Arc::from_raw(data.cast_const().cast::<(Mutex<bool>, Condvar)>()) };
    let mut open = gate.0.lock().unwrap();
    while !*open {
        open = gate.1.wait(open).unwrap();
    }
}

impl StreamGate {
    fn close(stream: sys::CUstream) -> Self {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let data = Arc::into_raw(Arc::clone(&gate)).cast_mut().cast();
        // SAFETY: the host function takes the Arc back, once.
        unsafe { result::stream::launch_host_function(stream, wait_at_gate, data) }.unwrap();
        StreamGate(gate)
    }

    fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }
}

impl Drop for StreamGate {
    fn drop(&mut self) {
        self.open();
    }
}

struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn async_copies_complete_from_the_stream_and_survive_drop_and_leak() {
    let Some((manager, device)) = cuda() else { return };
    let stream = manager.cuda_device(device).unwrap().stream().cu_stream();
    let n = 1 << 22;
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);

    // Completion comes from the stream's host function, not from polling.
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    let mut dst = vec![0.0; n];
    {
        let gate = StreamGate::close(stream);
        let mut copy = Box::pin(buffer.copy_to(&mut dst, 0));
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        gate.open();
        wait_for_wake(&wakes);
        assert!(matches!(copy.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }
    assert_eq!(dst, data(n));

    // A write dropped mid-flight still writes what it was given, not the reused source.
    let mut src = vec![3.0f32; n];
    {
        let gate = StreamGate::close(stream);
        let mut copy = Box::pin(buffer.copy_from(&src, 0));
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        drop(copy);
        src.fill(-1.0);
        gate.open();
    }
    assert!(buffer.as_slice().unwrap().iter().all(|&x| x == 3.0));

    // A read leaked mid-flight never writes the caller's slice.
    let other = manager.allocate_on::<f32>(device, n, AllocationMode::Unpooled).unwrap();
    let mut dst = vec![0.0f32; n];
    {
        let gate = StreamGate::close(stream);
        let mut read = Box::pin(other.copy_to(&mut dst, 0));
        assert!(read.as_mut().poll(&mut cx).is_pending());
        std::mem::forget(read);
        dst.fill(9.0);
        gate.open();
    }
    other.copy_to_blocking(&mut [0.0; 1], 0).unwrap();
    assert!(dst.iter().all(|&x| x == 9.0));

    // Memory dropped with a copy still queued on it is freed after the copy (in stream
    // order), never under it.
    let src = data(n);
    {
        let gate = StreamGate::close(stream);
        let mut unpooled = manager.allocate_on::<f32>(device, n, AllocationMode::Unpooled).unwrap();
        let mut copy = Box::pin(unpooled.copy_from(&src, 0));
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        drop(copy);
        drop(unpooled); // must not block, and must not free under the queued copy
        gate.open();
    }
    let mut after = manager.allocate_on::<f32>(device, 16, AllocationMode::Unpooled).unwrap();
    after.copy_from_blocking(&src[..16], 0).unwrap(); // the stream ran past the free
}

#[test]
fn memory_info_and_the_peer_matrix_are_consistent() {
    let Some((manager, device)) = cuda() else { return };
    let cuda = manager.cuda_device(device).unwrap();
    let (free, total) = cuda.memory_info().unwrap();
    assert!(0 < free && free <= total, "{free} of {total}");
    let info = &manager.devices()[device.index()];
    assert_eq!(info.total_memory, total);
    let matrix = manager.peer_access_matrix();
    assert_eq!(matrix.len(), manager.devices().len());
    for (i, row) in matrix.iter().enumerate() {
        assert_eq!(row.len(), matrix.len());
        assert!(!row[i], "a device is not its own peer");
    }
    eprintln!("peer access: {matrix:?}");
    // Copies between CUDA devices: peer-to-peer where enabled, through the host otherwise.
    let cudas: Vec<DeviceId> =
        manager.devices().into_iter().filter(|d| d.kind == DeviceKind::Cuda).map(|d| d.id).collect();
    if let [a, b, ..] = cudas[..] {
        let mut src = manager.allocate_on::<u32>(a, 1 << 20, AllocationMode::Pooled).unwrap();
        src.copy_from_blocking(&vec![5; 1 << 20], 0).unwrap();
        let mut dst = manager.allocate_on::<u32>(b, 1 << 20, AllocationMode::Pooled).unwrap();
        dst.copy_from_buffer(&src).unwrap();
        assert!(dst.as_slice().unwrap().iter().all(|&x| x == 5));
    } else {
        eprintln!("one CUDA device: no peer copy to test");
    }
}

#[test]
fn peer_access_can_be_disabled_and_enabled_again() {
    let Some((manager, _)) = cuda() else { return };
    let cudas: Vec<_> =
        manager.devices_of(DeviceKind::Cuda).iter().map(|d| manager.cuda_device(d.id).unwrap()).collect();
    let Some((a, b)) = cudas.iter().find_map(|a| cudas.iter().find(|b| a.can_access_peer(b)).map(|b| (a, b)))
    else {
        return eprintln!("skipping: no two CUDA devices with peer access");
    };
    a.enable_peer_access(b).unwrap();
    a.disable_peer_access(b).unwrap();
    a.disable_peer_access(b).unwrap(); // not enabled: not an error
    a.enable_peer_access(b).unwrap();
    a.enable_peer_access(b).unwrap(); // already enabled: not an error
}

/// The transfer engine on CUDA devices: host to device and back through pinned chunks,
/// device-local, peer-to-peer between two devices until the pair is disabled (then relayed
/// through pinned chunks), and across backends to OpenCL where both are present; the data
/// checked at odd lengths and offsets.
#[test]
fn transfers_take_the_path_the_devices_offer() {
    use unimem::transfer::Strategy;
    let Some((manager, gpu)) = cuda() else { return };
    for len in [1usize, 4099, (9 << 20) + 1] {
        let data: Vec<u8> = (0..len + 3).map(|i| (i * 31 % 251) as u8).collect();
        let host = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
        let mut dev = manager.allocate_on::<u8>(gpu, len + 1, AllocationMode::Pooled).unwrap();
        let up = manager.transfer_blocking(host.slice(3..).unwrap(), dev.slice_mut(1..).unwrap()).unwrap();
        assert_eq!(up.strategy, Strategy::PinnedStaging, "{up}");
        let mut copy = manager.allocate_on::<u8>(gpu, len, AllocationMode::Pooled).unwrap();
        let local = manager.transfer_blocking(dev.slice(1..).unwrap(), &mut copy).unwrap();
        assert_eq!(local.strategy, Strategy::DeviceLocal, "{local}");
        let mut back = manager.allocate::<u8>(len, AllocationMode::Pooled).unwrap();
        let down = manager.transfer_blocking(&copy, &mut back).unwrap();
        assert_eq!(down.strategy, Strategy::PinnedStaging, "{down}");
        assert!(back.as_slice().unwrap() == &data[3..], "{len}");

        let cudas: Vec<DeviceId> = manager.devices_of(DeviceKind::Cuda).iter().map(|d| d.id).collect();
        if let [a, b, ..] = cudas[..] {
            let peers = manager.peers();
            let mut other = manager.allocate_on::<u8>(b, len, AllocationMode::Pooled).unwrap();
            let report = manager.transfer_blocking(&copy, &mut other).unwrap();
            assert_eq!((a, report.strategy), (gpu, Strategy::PeerToPeer), "{report}");
            assert!(other.to_vec().unwrap() == data[3..]);
            peers.disable(b, a).unwrap();
            let mut relayed = manager.allocate_on::<u8>(b, len, AllocationMode::Pooled).unwrap();
            let report = manager.transfer_blocking(&copy, &mut relayed).unwrap();
            assert_eq!(report.strategy, Strategy::PinnedStaging, "{report}");
            assert_eq!(report.declined[0].strategy, Strategy::PeerToPeer, "{report}");
            assert!(relayed.to_vec().unwrap() == data[3..]);
            peers.enable(b, a).unwrap();
            let report = manager.transfer_blocking(&relayed, &mut copy).unwrap();
            assert_eq!(report.strategy, Strategy::PeerToPeer, "b reaches a: {report}");
        }
        for cl in manager.devices_of(DeviceKind::OpenCl) {
            let mut there = manager.allocate_on::<u8>(cl.id, len, AllocationMode::Pooled).unwrap();
            let report = manager.transfer_blocking(&copy, &mut there).unwrap();
            assert_eq!(report.strategy, Strategy::PinnedStaging, "{report}");
            assert!(report.declined.iter().any(|d| d.reason.contains("different backends")), "{report}");
            let mut home = manager.allocate_on::<u8>(gpu, len, AllocationMode::Pooled).unwrap();
            manager.transfer_blocking(&there, &mut home).unwrap();
            assert!(home.to_vec().unwrap() == data[3..], "OpenCL and back: {len}");
        }
    }
    assert_eq!(manager.statistics().transfers.staging_bytes, 0);
}

/// The topology `the_device_tests_pass_on_a_model_driver` gives the model driver for
/// `peer_access_follows_the_drivers_topology`: device 0 reaches device 1, not the reverse.
const ONE_WAY: &str = "0>1";

/// The peer matrix is what `cuDeviceCanAccessPeer` says, and access it refuses cannot be
/// enabled (run on the model driver with `UNIMEM_MODEL_CUDA_PEERS=0>1`).
#[test]
fn peer_access_follows_the_drivers_topology() {
    if std::env::var("UNIMEM_MODEL_CUDA_PEERS").as_deref() != Ok(ONE_WAY) {
        return eprintln!("skipping: runs on the model driver with UNIMEM_MODEL_CUDA_PEERS={ONE_WAY}");
    }
    let Some((manager, _)) = cuda() else { return };
    let [zero, one] = manager.devices_of(DeviceKind::Cuda).iter().map(|d| d.id).collect::<Vec<_>>()[..]
    else {
        panic!("two model devices expected: {:?}", manager.devices());
    };
    let matrix = manager.peer_access_matrix();
    assert!(matrix[zero.index()][one.index()] && !matrix[one.index()][zero.index()], "{matrix:?}");
    let (zero, one) = (manager.cuda_device(zero).unwrap(), manager.cuda_device(one).unwrap());
    assert!(zero.can_access_peer(one) && !one.can_access_peer(zero));
    let refused = one.enable_peer_access(zero).unwrap_err();
    assert!(refused.to_string().contains("CUDA_ERROR_PEER_ACCESS_UNSUPPORTED"), "{refused}");
    assert!(manager.backend_notes().is_empty(), "{:?}", manager.backend_notes());
}

#[test]
fn eight_threads_allocate_copy_and_return() {
    let Some((manager, device)) = cuda() else { return };
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
                    pollster::block_on(buffer.copy_from(&src, 0)).unwrap();
                    let mut back = vec![0; n];
                    pollster::block_on(buffer.copy_to(&mut back, 0)).unwrap();
                    assert_eq!(back, src);
                }
            });
        }
    });
    assert_eq!(manager.statistics().active_buffers, 0);
}

#[test]
fn bad_input_is_refused_and_nothing_is_lost() {
    let Some((manager, device)) = cuda() else { return };
    let mut buffer = manager.allocate_on::<f32>(device, 100, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(100), 0).unwrap();
    let err = buffer.copy_from_blocking(&data(10), 95).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { offset: 95, len: 10, buffer_len: 100 }), "{err}");
    assert!(matches!(buffer.copy_to_blocking(&mut [0.0; 101], 0), Err(Error::OutOfBounds { .. })));
    let mut cpu = manager.allocate::<f32>(10, AllocationMode::Pooled).unwrap();
    assert!(matches!(
        cpu.cuda_ptr(manager.cuda_device(device).unwrap().stream(), MapMode::Read),
        Err(Error::WrongBackend { expected: DeviceKind::Cuda, .. })
    ));
    assert!(matches!(manager.cuda_device(DeviceId::CPU), Err(Error::WrongDeviceKind { .. })));
    let huge = manager.allocate_on::<u8>(device, usize::MAX / 2, AllocationMode::Unpooled);
    assert!(huge.is_err(), "an absurd size is an error");
    assert_eq!(buffer.as_slice().unwrap(), &data(100)[..], "the buffer is intact");
}

/// A stream of the caller's own on `device` (cudarc's safe API, the same primary context).
fn callers_stream(manager: &MemoryManager, device: DeviceId) -> Arc<CudaStream> {
    let ordinal = manager.cuda_device(device).unwrap().ordinal();
    CudaContext::new(usize::try_from(ordinal).unwrap()).unwrap().new_stream().unwrap()
}

fn wait_for_wake(wakes: &Wakes) {
    wait_until(|| wakes.0.load(Ordering::SeqCst) > 0, "the completion never came");
}

#[test]
fn reuse_after_work_on_the_callers_stream_is_ordered_on_the_device() {
    let Some((manager, device)) = cuda() else { return };
    let theirs = callers_stream(&manager, device);
    let n = 1 << 22;
    let mut first = manager.allocate_on::<u32>(device, n, AllocationMode::Pooled).unwrap();
    let gate = StreamGate::close(theirs.cu_stream());
    let access = first.cuda_ptr(&theirs, MapMode::Write).unwrap();
    // SAFETY: `n` u32s of our buffer, on the caller's stream (held behind the gate).
    unsafe { sys::cuMemsetD32Async(access.ptr(), 7, n, theirs.cu_stream()) }.result().unwrap();
    drop(access); // records the memset as the buffer's last use
    drop(first); // enqueues the ordering (an event and a stream wait); waits for nothing

    let mut second = manager.allocate_on::<u32>(device, n, AllocationMode::Pooled).unwrap();
    assert_eq!(manager.statistics().pool_hits, 1, "the same block, reused");
    let ones = vec![1u32; n];
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    {
        let mut write = Box::pin(second.copy_from(&ones, 0));
        assert!(write.as_mut().poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "unimem's write waits for the caller's memset");
        gate.open();
        wait_for_wake(&wakes);
        assert!(matches!(write.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }
    let mut back = vec![0u32; n];
    second.copy_to_blocking(&mut back, 0).unwrap();
    assert!(back.iter().all(|&x| x == 1), "the caller's memset overwrote the next user's data");
}

#[test]
fn host_access_waits_for_work_on_the_callers_stream() {
    let Some((manager, device)) = cuda() else { return };
    let theirs = callers_stream(&manager, device);
    let n = 1 << 22;
    // A guard leaked instead of dropped records no event: the caller's whole stream stands
    // for its last use.
    let modes = [AllocationMode::Pooled, AllocationMode::Pinned, AllocationMode::Unified];
    for (mode, leak) in modes.into_iter().flat_map(|mode| [(mode, false), (mode, true)]) {
        let mut buffer = manager.allocate_on::<u32>(device, n, mode).unwrap();
        let gate = StreamGate::close(theirs.cu_stream());
        let access = buffer.cuda_ptr(&theirs, MapMode::Write).unwrap();
        // SAFETY: as above.
        unsafe { sys::cuMemsetD32Async(access.ptr(), 9, n, theirs.cu_stream()) }.result().unwrap();
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
                "{mode:?} (leaked: {leak}): host access ran ahead of the caller's stream"
            );
            gate.open();
            assert!(reader.join().unwrap().iter().all(|&x| x == 9), "{mode:?}");
        });
    }
}

#[test]
fn the_callers_stream_is_ordered_after_unimems_writes() {
    let Some((manager, device)) = cuda() else { return };
    let ours = manager.cuda_device(device).unwrap().stream().cu_stream();
    let theirs = callers_stream(&manager, device);
    let n = 1 << 22;
    let mut input = manager.allocate_on::<u32>(device, n, AllocationMode::Pooled).unwrap();
    let mut output = manager.allocate_on::<u32>(device, n, AllocationMode::Pooled).unwrap();
    let src: Vec<u32> = (0..n as u32).collect();
    let gate = StreamGate::close(ours);
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    {
        let mut write = Box::pin(input.copy_from(&src, 0));
        assert!(write.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
    } // dropped: the write stays queued behind the gate
    let from = input.cuda_ptr(&theirs, MapMode::Read).unwrap();
    let to = output.cuda_ptr(&theirs, MapMode::Write).unwrap();
    // SAFETY: two buffers of `n` u32s, on the caller's stream; must run after unimem's write.
    unsafe { sys::cuMemcpyDtoDAsync_v2(to.ptr(), from.ptr(), n * 4, theirs.cu_stream()) }.result().unwrap();
    drop((from, to));
    gate.open();
    assert_eq!(output.as_slice().unwrap(), &src[..], "the caller's copy ran before unimem's write");
    // A stream of another device's context is refused, the buffer unchanged.
    let cudas: Vec<DeviceId> =
        manager.devices().into_iter().filter(|d| d.kind == DeviceKind::Cuda).map(|d| d.id).collect();
    if let [_, other, ..] = cudas[..] {
        let elsewhere = callers_stream(&manager, other);
        let err = output.cuda_ptr(&elsewhere, MapMode::Read).unwrap_err();
        assert!(matches!(err, Error::ForeignQueue { .. }), "{err}");
    }
}

/// Pinned and managed memory freed rather than pooled is freed once its last use on the
/// stream has completed, never by waiting in `Drop`: behind a closed stream, `drop` returns
/// at once, the memory counts as waiting to be freed, and it is freed after the stream moves.
#[test]
fn dropping_unpooled_pinned_and_managed_memory_never_waits_for_the_stream() {
    let Some((_, device)) = cuda() else { return };
    let options = unimem::MemoryOptions::default().with_pooling(false);
    let manager = MemoryManager::builder().options(options).build();
    let stream = manager.cuda_device(device).unwrap().stream().cu_stream();
    for mode in [AllocationMode::Pinned, AllocationMode::Unified] {
        let mut buffer = manager.allocate_on::<f32>(device, 1 << 20, mode).unwrap();
        buffer.as_mut_slice().unwrap().fill(1.0);
        let gate = StreamGate::close(stream);
        let returned = drops_in_time(buffer);
        let waiting = manager.statistics().pending_free;
        gate.open();
        assert!(returned, "{mode}: drop waited for the stream");
        assert_eq!(waiting, 4 << 20, "{mode}: the memory waits to be freed");
        wait_until(
            || manager.statistics().pending_free == 0,
            format!("{mode}: the deferred free never happened"),
        );
        let stats = manager.statistics();
        assert_eq!((stats.total_reserved, stats.active_buffers), (0, 0), "{mode}");
    }
}

/// A `Write` mapping that is never written leaves device memory as it was.
#[test]
fn an_unwritten_write_mapping_leaves_the_buffer_as_it_was() {
    let Some((manager, device)) = cuda() else { return };
    let n = 1024;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    std::mem::forget(buffer.map(MapMode::Write).unwrap());
    drop(buffer.map(MapMode::Write).unwrap());
    buffer.as_mut_slice().unwrap()[0] = 42.0;
    buffer.cuda_ptr(manager.cuda_device(device).unwrap().stream(), MapMode::Read).unwrap(); // the host side goes to the device
    let mut copy = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    copy.copy_from_buffer(&buffer).unwrap();
    let mut back = vec![0.0; n];
    copy.copy_to_blocking(&mut back, 0).unwrap();
    assert_eq!(back[0], 42.0);
    assert_eq!(&back[1..], &data(n)[1..], "an unwritten mapping overwrote the device's data");
}

#[path = "support/model_faults.rs"]
mod model_faults;

#[path = "support/drop_in_time.rs"]
mod drop_in_time;
use drop_in_time::drops_in_time;

/// Waits (up to 60 s) until `done`, else fails with `what`.
fn wait_until(mut done: impl FnMut() -> bool, what: impl std::fmt::Display) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Fault injection on the model driver: tests named `faults_*` run one at a time in their
/// own child (see `the_device_tests_pass_on_a_model_driver`), each clearing its faults when
/// done; elsewhere (a GPU, or the other tests' child) they skip.
fn faults() -> Option<(MemoryManager, DeviceId, FaultGuard)> {
    if std::env::var_os("UNIMEM_MODEL_FAULTS").is_none() || !model_faults::available() {
        eprintln!("skipping: fault injection needs the model driver (UNIMEM_MODEL_FAULTS)");
        return None;
    }
    model_faults::clear();
    let (manager, device) = cuda()?;
    Some((manager, device, FaultGuard))
}

/// Clears every injected fault when the test ends, passed or failed.
struct FaultGuard;

impl Drop for FaultGuard {
    fn drop(&mut self) {
        model_faults::clear();
    }
}

const INVALID_VALUE: i32 = 1;
const OUT_OF_MEMORY: i32 = 2;
const ILLEGAL_ADDRESS: i32 = 700;

/// After a fault: the manager still allocates, copies and frees on the device.
fn still_works(manager: &MemoryManager, device: DeviceId) {
    for mode in [AllocationMode::Pooled, AllocationMode::Pinned, AllocationMode::Unified] {
        let mut buffer = manager.allocate_on::<f32>(device, 1000, mode).unwrap();
        buffer.copy_from_blocking(&data(1000), 0).unwrap();
        let mut back = vec![0.0; 1000];
        buffer.copy_to_blocking(&mut back, 0).unwrap();
        assert_eq!(back, data(1000), "{mode}");
    }
}

#[test]
fn faults_in_allocation_are_clear_errors_and_leak_nothing() {
    let Some((manager, device, _guard)) = faults() else { return };
    for (call, mode) in [
        ("cuMemAllocFromPoolAsync", AllocationMode::Pooled),
        ("cuMemHostAlloc", AllocationMode::Pinned),
        ("cuMemAllocManaged", AllocationMode::Unified),
    ] {
        model_faults::fail(call, 1, OUT_OF_MEMORY);
        let err = manager.allocate_on::<u8>(device, 4096, mode).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{call}: {err}");
        model_faults::fail(call, 1, INVALID_VALUE);
        let err = manager.allocate_on::<u8>(device, 4096, mode).unwrap_err();
        assert!(matches!(err, Error::Backend { .. }) && err.to_string().contains(call), "{call}: {err}");
        model_faults::clear();
    }
    // A refused zeroing frees the allocation it was for.
    model_faults::fail("cuMemsetD8Async", 1, INVALID_VALUE);
    let frees = model_faults::calls("cuMemFreeAsync");
    assert!(manager.allocate_on::<u8>(device, 4096, AllocationMode::Pooled).is_err());
    assert_eq!(model_faults::calls("cuMemFreeAsync"), frees + 1, "the unzeroed allocation was leaked");
    model_faults::clear();
    let stats = manager.statistics();
    assert_eq!((stats.active_buffers, stats.total_reserved), (0, 0));
    still_works(&manager, device);
}

/// A failed wait for a pooled block's fence: a clear error, and the fence is destroyed once
/// (the model aborts on a second `cuEventDestroy`).
#[test]
fn faults_in_the_fence_wait_of_pooled_reuse_release_the_fence_once() {
    let Some((manager, device, _guard)) = faults() else { return };
    drop(manager.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap()); // pooled, fenced
    model_faults::fail("cuEventSynchronize", 1, INVALID_VALUE);
    let err = manager.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap_err();
    assert!(err.to_string().contains("cuEventSynchronize"), "{err}");
    model_faults::clear();
    let stats = manager.statistics();
    assert_eq!((stats.active_buffers, stats.total_pooled), (0, 0), "the block was retired");
    still_works(&manager, device);
    drop(manager); // frees everything: no second release of the fence
}

#[test]
fn faults_in_copies_are_clear_errors_and_change_nothing() {
    let Some((manager, device, _guard)) = faults() else { return };
    let mut buffer = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(1000), 0).unwrap();
    let other = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    model_faults::fail("cuMemcpyHtoDAsync_v2", 1, INVALID_VALUE);
    assert!(buffer.copy_from_blocking(&[9.0; 10], 0).is_err());
    assert!(pollster::block_on(buffer.copy_from(&[9.0; 10], 0)).is_err());
    model_faults::fail("cuMemcpyDtoHAsync_v2", 1, INVALID_VALUE);
    let mut dst = vec![7.0; 1000];
    assert!(buffer.copy_to_blocking(&mut dst, 0).is_err());
    assert!(pollster::block_on(buffer.copy_to(&mut dst, 0)).is_err());
    assert!(dst.iter().all(|&x| x == 7.0), "a failed read wrote its destination");
    model_faults::fail("cuMemcpyDtoDAsync_v2", 1, INVALID_VALUE);
    let mut copy = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    assert!(copy.copy_from_buffer(&other).is_err());
    model_faults::clear();
    buffer.copy_to_blocking(&mut dst, 0).unwrap();
    assert_eq!(dst, data(1000), "the buffer is intact");
    still_works(&manager, device);
}

/// Recording the fence of a returned block fails: the block is freed, not pooled unfenced.
#[test]
fn faults_in_event_record_free_the_block_instead_of_pooling_it() {
    let Some((manager, device, _guard)) = faults() else { return };
    let buffer = manager.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap();
    model_faults::fail("cuEventRecord", 1, INVALID_VALUE);
    drop(buffer);
    model_faults::clear();
    let stats = manager.statistics();
    assert_eq!((stats.total_pooled, stats.total_reserved, stats.active_buffers), (0, 0, 0));
    assert!(stats.free_errors >= 1);
    // Creating the event fails instead: the same.
    let buffer = manager.allocate_on::<u8>(device, 4096, AllocationMode::Unified).unwrap();
    model_faults::fail("cuEventCreate", 1, OUT_OF_MEMORY);
    drop(buffer);
    model_faults::clear();
    assert_eq!(manager.statistics().total_reserved, 0);
    still_works(&manager, device);
}

/// Ordering the caller's stream fails: a clear error and the buffer unchanged; ordering
/// unimem's queue after it fails at drop: the block is not pooled, and is freed once the
/// caller's stream has drained.
#[test]
fn faults_in_stream_waits_never_pool_unordered_memory() {
    let Some((manager, device, _guard)) = faults() else { return };
    let stream = callers_stream(&manager, device);
    let mut buffer = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(1000), 0).unwrap();
    model_faults::fail("cuStreamWaitEvent", 1, INVALID_VALUE);
    assert!(buffer.cuda_ptr(&stream, MapMode::ReadWrite).is_err());
    model_faults::clear();
    assert_eq!(buffer.as_slice().unwrap(), &data(1000)[..]);
    buffer.cuda_ptr(&stream, MapMode::ReadWrite).unwrap();
    model_faults::fail("cuStreamWaitEvent", 1, INVALID_VALUE);
    drop(buffer); // unimem's stream cannot be ordered after the caller's
    model_faults::clear();
    wait_until(|| manager.statistics().pending_free == 0, "the deferred free never happened");
    let stats = manager.statistics();
    assert_eq!((stats.total_pooled, stats.active_buffers, stats.total_reserved), (0, 0, 0), "{stats:?}");
    still_works(&manager, device);
}

/// The completion callback cannot be added: the copy waits for the stream instead and says
/// why; if that wait fails too, the staging memory (which the copy may still write) is
/// leaked and counted, never freed.
#[test]
fn faults_in_the_completion_callback_never_free_staging_under_a_copy() {
    let Some((manager, device, _guard)) = faults() else { return };
    let mut buffer = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    model_faults::fail("cuStreamAddCallback", 1, INVALID_VALUE);
    let err = pollster::block_on(buffer.copy_from(&data(1000), 0)).unwrap_err();
    assert!(err.to_string().contains("cuStreamAddCallback"), "{err}");
    let leaked = manager.statistics().leaked_staging_bytes;
    model_faults::fail("cuStreamSynchronize", 1, INVALID_VALUE);
    let err = pollster::block_on(buffer.copy_from(&data(1000), 0)).unwrap_err();
    assert!(err.to_string().contains("cuStreamSynchronize"), "{err}");
    model_faults::clear();
    assert!(manager.statistics().leaked_staging_bytes >= leaked + 4000);
    still_works(&manager, device);
}

#[test]
fn faults_in_frees_are_counted_never_panicked_on() {
    let Some((manager, device, _guard)) = faults() else { return };
    let options = unimem::MemoryOptions::default().with_pooling(false);
    let unpooled = MemoryManager::builder().options(options).build();
    for (call, mode) in [
        ("cuMemFreeAsync", AllocationMode::Pooled),
        ("cuMemFreeHost", AllocationMode::Pinned),
        ("cuMemFree_v2", AllocationMode::Unified),
    ] {
        let buffer = unpooled.allocate_on::<u8>(device, 4096, mode).unwrap();
        let errors = unpooled.statistics().free_errors;
        model_faults::fail(call, 1, INVALID_VALUE);
        drop(buffer);
        wait_until(|| unpooled.statistics().free_errors != errors, format!("{call}: the free never ran"));
        model_faults::clear();
    }
    still_works(&manager, device);
}

/// A sticky context error: the device is lost. A copy in flight completes with the error
/// instead of waiting for ever (the stream callback still runs; a host function would not),
/// later calls say the device is lost, drops neither panic nor release anything twice, and
/// CPU memory still works.
#[test]
fn faults_sticky_errors_lose_the_device_and_complete_pending_copies() {
    let Some((manager, device, _guard)) = faults() else { return };
    let stream = manager.cuda_device(device).unwrap().stream().cu_stream();
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    let buffer = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
    let pinned = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pinned).unwrap();
    let mut dst = vec![0.0; 1000];
    let gate = StreamGate::close(stream);
    let mut read = Box::pin(buffer.copy_to(&mut dst, 0));
    assert!(read.as_mut().poll(&mut cx).is_pending());
    model_faults::fail_sticky("cuMemsetD8Async", 1, ILLEGAL_ADDRESS);
    let err = manager.allocate_on::<f32>(device, 1000, AllocationMode::Unpooled).unwrap_err();
    assert!(matches!(err, Error::DeviceLost { .. }), "{err}");
    gate.open();
    wait_until(
        || wakes.0.load(Ordering::SeqCst) > 0,
        "the copy in flight never completed after the sticky error",
    );
    assert!(matches!(read.as_mut().poll(&mut cx), Poll::Ready(Err(_))));
    drop(read);
    let err = buffer.copy_to_blocking(&mut dst, 0).unwrap_err();
    assert!(matches!(err, Error::DeviceLost { .. }), "{err}");
    drop(buffer);
    drop(pinned);
    let cpu = manager.create_buffer_on(DeviceId::CPU, &data(10), AllocationMode::Pooled).unwrap();
    assert_eq!(cpu.as_slice().unwrap(), &data(10)[..]);
}

/// The remaining calls on the allocation, copy, fence and free paths: binding the context,
/// peer copies, managed-memory prefetches, the fence query of a deferred free, destroying a
/// fence, and the free-memory query.
#[test]
fn faults_in_binding_peer_copies_prefetch_fence_query_and_destroy() {
    let Some((manager, device, _guard)) = faults() else { return };
    model_faults::fail("cuCtxSetCurrent", 1, INVALID_VALUE);
    let err = manager.allocate_on::<u8>(device, 4096, AllocationMode::Pooled).unwrap_err();
    assert!(err.to_string().contains("cuCtxSetCurrent"), "{err}");
    model_faults::clear();

    // Peer copies, where there is a second device.
    let devices: Vec<_> = manager.devices().into_iter().filter(|d| d.kind == DeviceKind::Cuda).collect();
    if let [_, peer, ..] = &devices[..] {
        let src = manager.create_buffer_on(peer.id, &data(1000), AllocationMode::Pooled).unwrap();
        let mut dst = manager.allocate_on::<f32>(device, 1000, AllocationMode::Pooled).unwrap();
        model_faults::fail("cuMemcpyPeerAsync", 1, INVALID_VALUE);
        let err = dst.copy_from_buffer(&src).unwrap_err();
        assert!(err.to_string().contains("cuMemcpyPeerAsync"), "{err}");
        model_faults::clear();
        dst.copy_from_buffer(&src).unwrap();
        assert_eq!(dst.as_slice().unwrap(), &data(1000)[..]);
    }

    // Prefetching managed memory back for the host.
    let mut unified = manager.allocate_on::<f32>(device, 1000, AllocationMode::Unified).unwrap();
    unified.cuda_ptr(manager.cuda_device(device).unwrap().stream(), MapMode::ReadWrite).unwrap();
    model_faults::fail("cuMemPrefetchAsync_v2", 1, INVALID_VALUE);
    let err = unified.as_slice().unwrap_err();
    assert!(err.to_string().contains("cuMemPrefetchAsync"), "{err}");
    model_faults::clear();
    assert_eq!(unified.as_slice().unwrap().len(), 1000);
    drop(unified);

    // A deferred free whose fence cannot be queried is kept, not freed under the stream.
    let options = unimem::MemoryOptions::default().with_pooling(false);
    let unpooled = MemoryManager::builder().options(options).build();
    let stream = unpooled.cuda_device(device).unwrap().stream().cu_stream();
    let pinned = unpooled.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap();
    let gate = StreamGate::close(stream);
    model_faults::fail("cuEventQuery", 1, INVALID_VALUE);
    drop(pinned);
    assert_eq!(unpooled.statistics().pending_free, 4096, "freed with its last use unknown");
    gate.open();
    model_faults::clear();
    wait_until(|| unpooled.statistics().pending_free == 0, "the deferred free never happened");

    // Destroying a fence fails: nothing panics, and the pool goes on.
    drop(manager.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap());
    model_faults::fail("cuEventDestroy_v2", 1, INVALID_VALUE);
    drop(manager.allocate_on::<u8>(device, 4096, AllocationMode::Pinned).unwrap());
    model_faults::clear();

    // The free-memory query fails: unknown, not a panic.
    model_faults::fail("cuMemGetInfo_v2", 1, INVALID_VALUE);
    assert_eq!(manager.free_memory(device).unwrap(), None);
    model_faults::clear();
    still_works(&manager, device);
}

/// A buffer that outlives its manager, dropped while the stream still runs: `drop` returns
/// at once and the reaper thread frees the memory after the stream's work.
#[test]
fn a_buffer_dropped_after_its_manager_never_waits_for_the_stream() {
    let Some((manager, device)) = cuda() else { return };
    let stream = manager.cuda_device(device).unwrap().stream().cu_stream();
    let buffer = manager.allocate_on::<f32>(device, 1 << 20, AllocationMode::Pinned).unwrap();
    drop(manager);
    let gate = StreamGate::close(stream);
    let returned = drops_in_time(buffer);
    gate.open();
    assert!(returned, "drop waited for the stream");
}

/// The CUDA example, on this process's driver: on a GPU all of it, on the model driver (which
/// loads no modules) everything but the kernel.
#[test]
fn the_cuda_example_runs() {
    let Some(_) = cuda() else { return };
    cuda_kernel_example::main().unwrap();
}

/// `fill` on the device: a 4-byte pattern by `cuMemsetD32Async`, equal bytes by
/// `cuMemsetD8Async`, anything else through the host; nothing crosses to the host for the
/// first two.
#[test]
fn fill_runs_on_the_device_where_the_pattern_allows() {
    let Some((manager, device)) = cuda() else { return };
    let mut words = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Pooled).unwrap();
    let mut bytes = manager.allocate_on::<u8>(device, 1000, AllocationMode::Pooled).unwrap();
    let before = manager.statistics();
    words.fill(0xdead_beef).unwrap();
    bytes.fill(7).unwrap();
    let after = manager.statistics();
    assert_eq!((after.syncs_to_host, after.syncs_to_device), (before.syncs_to_host, before.syncs_to_device));
    assert_eq!(words.location(), Location::Device);
    assert!(words.to_vec().unwrap().iter().all(|&x| x == 0xdead_beef));
    assert!(bytes.to_vec().unwrap().iter().all(|&x| x == 7));
    words.slice_mut(100..200).unwrap().fill(1).unwrap();
    let back = words.to_vec().unwrap();
    assert!(back[100..200].iter().all(|&x| x == 1) && back[99] == 0xdead_beef && back[200] == 0xdead_beef);
    let mut triples = manager.allocate_on::<[u16; 3]>(device, 100, AllocationMode::Pooled).unwrap();
    triples.fill([1, 2, 3]).unwrap();
    assert_eq!(triples.to_vec().unwrap(), vec![[1, 2, 3]; 100]);
}

/// The per-thread default stream is another stream on every thread: refused.
#[test]
fn the_per_thread_default_stream_is_refused() {
    let Some((manager, device)) = cuda() else { return };
    let per_thread = manager.cuda_device(device).unwrap().context().per_thread_stream();
    let mut buffer = manager.allocate_on::<u32>(device, 16, AllocationMode::Pooled).unwrap();
    let err = buffer.cuda_ptr(&per_thread, MapMode::Read).unwrap_err();
    assert!(matches!(err, Error::ForeignQueue { .. }), "{err}");
}
