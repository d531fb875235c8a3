//! The wgpu backend on a real Vulkan implementation (Mesa's lavapipe in CI, with
//! `WGPU_BACKEND=vulkan`). Every test discovers the devices at run time and prints why it
//! skips when there are none; with `UNIMEM_REQUIRE_WGPU=1` (set by `.ci/run`) a missing
//! device fails instead.

use std::pin::pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use unimem::wgpu;
use unimem::{
    AllocationMode, DeviceId, DeviceKind, Error, Location, MapMode, MemoryManager, Strategy, TransferOptions,
};

/// The manager and its first wgpu device, or `None` (with the reason printed).
fn gpu() -> Option<(MemoryManager, DeviceId)> {
    let manager = MemoryManager::new();
    let device = manager.devices_of(DeviceKind::Wgpu).first().map(|d| d.id);
    if device.is_none() {
        let why = manager.backend_notes().join("; ");
        assert!(std::env::var_os("UNIMEM_REQUIRE_WGPU").is_none(), "no wgpu device: {why}");
        eprintln!("skipping: no wgpu device ({why})");
    }
    device.map(|d| (manager, d))
}

/// The modes the device offers.
fn modes(manager: &MemoryManager, device: DeviceId) -> Vec<AllocationMode> {
    let info = &manager.devices()[device.index()];
    let mut modes = vec![AllocationMode::Pooled, AllocationMode::Unpooled];
    if info.supports_pinned {
        modes.push(AllocationMode::Pinned);
    }
    if info.supports_unified {
        modes.push(AllocationMode::Unified);
    }
    modes
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5).collect()
}

/// A compute shader over `u32` buffers: `entry` runs once per element.
struct Shader {
    pipeline: wgpu::ComputePipeline,
}

const KERNELS: &str = r"
@group(0) @binding(0) var<storage, read> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<u32>;

// output[i] = input[i] * 3 + i
@compute @workgroup_size(64)
fn scale(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&output)) {
        output[id.x] = input[id.x] * 3u + id.x;
    }
}

// output[i] = i, after a long busy loop (so that work queued behind it stays in flight)
@compute @workgroup_size(64)
fn slow_iota(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= arrayLength(&output)) {
        return;
    }
    var x = id.x + input[id.x];
    for (var k = 0u; k < 4000u; k++) {
        x = x * 1664525u + 1013904223u;
    }
    output[id.x] = id.x + select(0u, 1u, x == 0xffffffffu && id.x == 0xffffffffu);
}
";

impl Shader {
    fn new(device: &wgpu::Device, entry: &str) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("test kernels"),
            source: wgpu::ShaderSource::Wgsl(KERNELS.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        Shader { pipeline }
    }

    /// Submits the shader over `n` elements, reading `input` and writing `output`.
    fn run(
        &self,
        gpu: &unimem::WgpuBackend,
        input: wgpu::BindingResource<'_>,
        output: wgpu::BindingResource<'_>,
        n: u32,
    ) {
        let device = gpu.device();
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: input },
                wgpu::BindGroupEntry { binding: 1, resource: output },
            ],
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(n.div_ceil(64), 1, 1);
        }
        gpu.queue().submit([encoder.finish()]);
    }
}

/// Keeps the device busy with a slow shader over a buffer of its own, and returns that
/// buffer: work submitted next waits behind it.
fn keep_busy(manager: &MemoryManager, device: DeviceId) -> unimem::Buffer<u32> {
    let gpu = manager.wgpu_device(device).unwrap();
    let mut busy = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Unpooled).unwrap();
    let mut input = manager.allocate_on::<u32>(device, 1 << 16, AllocationMode::Unpooled).unwrap();
    let slow = Shader::new(gpu.device(), "slow_iota");
    {
        let (input, output) =
            (input.wgpu_buffer(MapMode::Read).unwrap(), busy.wgpu_buffer(MapMode::Write).unwrap());
        slow.run(gpu, input.binding(), output.binding(), 1 << 16);
    }
    busy
}

#[test]
fn the_device_names_its_api() {
    let Some((manager, device)) = gpu() else { return };
    let info = &manager.devices()[device.index()];
    let api = manager.wgpu_device(device).unwrap().adapter_info().backend;
    assert!(info.name.contains(&api.to_string()), "{}", info.name);
    if let Ok(wanted) = std::env::var("WGPU_BACKEND") {
        assert!(wanted.to_lowercase().contains(&api.to_string().to_lowercase()), "{wanted} vs {api}");
    }
    assert_ne!(api, wgpu::Backend::Gl, "never the GL fallback");
    eprintln!("{}", info.name);
}

#[test]
fn round_trips_at_odd_sizes_and_offsets_in_every_mode() {
    let Some((manager, device)) = gpu() else { return };
    for mode in modes(&manager, device) {
        for len in [1, 3, 4, 5, 1001, 65_539] {
            let mut buffer = manager.allocate_on::<u8>(device, len, mode).unwrap();
            let whole = bytes(len, 7);
            buffer.copy_from_blocking(&whole, 0).unwrap();
            for (offset, n) in [(0, len), (1, len.saturating_sub(2)), (len / 3, len / 2), (len - 1, 1)] {
                let part = bytes(n, offset as u8 ^ 0x5a);
                buffer.copy_from_blocking(&part, offset).unwrap();
                let mut expected = whole.clone();
                expected[offset..offset + n].copy_from_slice(&part);
                let mut back = vec![0; n];
                buffer.copy_to_blocking(&mut back, offset).unwrap();
                assert_eq!(back, part, "{mode:?}: {n} bytes at {offset} of {len}");
                let mut all = vec![0; len];
                buffer.copy_to_blocking(&mut all, 0).unwrap();
                assert_eq!(all, expected, "{mode:?}: the bytes around {offset}..{} kept", offset + n);
                buffer.copy_from_blocking(&whole, 0).unwrap();
            }
            assert_eq!(buffer.to_vec().unwrap(), whole, "{mode:?}: {len}");
        }
        // Wider elements at odd element offsets.
        let mut buffer = manager.allocate_on::<u16>(device, 999, mode).unwrap();
        let src: Vec<u16> = (0..997).map(|i| i * 7 + 1).collect();
        buffer.copy_from_blocking(&src, 1).unwrap();
        let mut back = vec![0; 997];
        buffer.copy_to_blocking(&mut back, 1).unwrap();
        assert_eq!(back, src, "{mode:?}");
        assert_eq!(buffer.to_vec().unwrap()[0], 0, "{mode:?}: fresh memory is zero");
    }
}

#[test]
fn device_copies_at_odd_offsets_between_and_within_buffers() {
    let Some((manager, device)) = gpu() else { return };
    let n = 70_001;
    let mut a = manager.allocate_on::<u8>(device, n, AllocationMode::Pooled).unwrap();
    let mut b = manager.allocate_on::<u8>(device, n, AllocationMode::Pooled).unwrap();
    let src = bytes(n, 3);
    a.copy_from_blocking(&src, 0).unwrap();
    b.copy_from_blocking(&vec![0xee; n], 0).unwrap();
    // Every phase pair: the same (edges by shader, words by copy) and shifted (shader).
    for (from, to, len) in [(0, 0, n), (1, 1, 5000), (1, 2, 5000), (3, 0, 4097), (2, 7, 1), (5, 6, 66_000)] {
        let view = a.slice(from..from + len).unwrap();
        let mut target = b.slice_mut(to..to + len).unwrap();
        manager.transfer_blocking(view, &mut target).unwrap();
        let got = b.to_vec().unwrap();
        assert_eq!(&got[to..to + len], &src[from..from + len], "{len} bytes from {from} to {to}");
        b.copy_from_blocking(&vec![0xee; n], 0).unwrap();
    }
}

#[test]
fn async_copies_round_trip_in_every_mode() {
    let Some((manager, device)) = gpu() else { return };
    for mode in modes(&manager, device) {
        let mut buffer = manager.allocate_on::<f32>(device, 5000, mode).unwrap();
        let src = data(4001);
        pollster::block_on(buffer.copy_from(&src, 999)).unwrap();
        let mut back = vec![0.0; 4001];
        pollster::block_on(buffer.copy_to(&mut back, 999)).unwrap();
        assert_eq!(back, src, "{mode:?}");
        let err = pollster::block_on(buffer.copy_from(&src, 1000)).unwrap_err();
        assert!(matches!(err, Error::OutOfBounds { offset: 1000, .. }), "{err}");
    }
}

/// A waker that counts its wake-ups: completion must come from the poller.
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn async_reads_complete_without_the_caller_polling_the_device() {
    let Some((manager, device)) = gpu() else { return };
    let n = 1 << 18;
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(n), 0).unwrap();
    let mut dst = vec![0.0; n];
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    let busy = keep_busy(&manager, device);
    {
        let mut copy = pin!(buffer.copy_to(&mut dst, 0));
        let first = copy.as_mut().poll(&mut cx);
        // Nobody polls the device from here on: only the backend's poller can finish it.
        let deadline = Instant::now() + Duration::from_secs(60);
        if first.is_pending() {
            while wakes.0.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "never woken");
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(matches!(copy.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
            assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken once");
        } else {
            eprintln!("the read was done at its first poll: the device was not kept busy");
        }
    }
    assert_eq!(dst, data(n));
    assert_eq!(buffer.location(), Location::Device);
    drop(busy);
}

#[test]
fn futures_dropped_or_leaked_mid_flight_are_harmless() {
    let Some((manager, device)) = gpu() else { return };
    let n = 1 << 20;
    let waker = Waker::from(Arc::new(Wakes(AtomicUsize::new(0))));
    // A write dropped mid-flight still writes what it was given.
    let mut buffer = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    let mut src = data(n);
    let busy = keep_busy(&manager, device);
    {
        let mut copy = Box::pin(buffer.copy_from(&src, 0));
        let _ = copy.as_mut().poll(&mut Context::from_waker(&waker));
    }
    src.fill(-1.0);
    drop(src);
    assert_eq!(buffer.as_slice().unwrap(), &data(n)[..], "the staged data, not the overwritten source");

    // A write leaked mid-flight: the block's next user sees all of it.
    let src = data(n);
    let mut copy = Box::pin(buffer.copy_from(&src, 0));
    let _ = copy.as_mut().poll(&mut Context::from_waker(&waker));
    std::mem::forget(copy);
    drop(src);
    drop(buffer);
    let hits = manager.statistics().pool_hits;
    let reused = manager.allocate_on::<f32>(device, n, AllocationMode::Pooled).unwrap();
    assert_eq!(manager.statistics().pool_hits, hits + 1);
    assert_eq!(reused.as_slice().unwrap(), &data(n)[..]);

    // A read leaked mid-flight never writes the caller's slice after it is given up: the
    // read-back lands in staging the operation owns.
    let mut other = manager.allocate_on::<f32>(device, n, AllocationMode::Unpooled).unwrap();
    other.copy_from_blocking(&data(n), 0).unwrap();
    let mut dst = vec![0.0f32; n];
    let busy2 = keep_busy(&manager, device);
    let mut read = Box::pin(other.copy_to(&mut dst, 0));
    let _ = read.as_mut().poll(&mut Context::from_waker(&waker));
    std::mem::forget(read);
    dst.fill(9.0);
    other.copy_to_blocking(&mut [0.0; 1], 0).unwrap(); // after the leaked read, in order
    drop(other);
    assert!(dst.iter().all(|&x| x == 9.0), "the device wrote into memory it no longer owned");
    drop((busy, busy2));
}

#[test]
fn a_shader_writes_and_the_host_sees_it_in_every_mode() {
    let Some((manager, device)) = gpu() else { return };
    let gpu = manager.wgpu_device(device).unwrap();
    let scale = Shader::new(gpu.device(), "scale");
    for mode in modes(&manager, device) {
        let n = 4099;
        let mut input = manager.allocate_on::<u32>(device, n, mode).unwrap();
        let mut output = manager.allocate_on::<u32>(device, n, mode).unwrap();
        let src: Vec<u32> = (0..n as u32).map(|i| i * 2 + 1).collect();
        input.map(MapMode::Write).unwrap().copy_from_slice(&src);
        output.as_mut_slice().map(|s| s.fill(7)).or_else(|_| output.fill(7)).unwrap();
        {
            let (input, output) =
                (input.wgpu_buffer(MapMode::Read).unwrap(), output.wgpu_buffer(MapMode::Write).unwrap());
            scale.run(gpu, input.binding(), output.binding(), n as u32);
        }
        let expected: Vec<u32> = src.iter().enumerate().map(|(i, x)| x * 3 + i as u32).collect();
        assert_eq!(output.as_slice().unwrap(), &expected[..], "{mode:?}");
        assert_eq!(input.as_slice().unwrap(), &src[..], "{mode:?}: the shader's input is intact");
        // Again, after host writes: the second round sees them.
        input.as_mut_slice().unwrap()[5] = 100;
        {
            let (input, output) =
                (input.wgpu_buffer(MapMode::Read).unwrap(), output.wgpu_buffer(MapMode::Write).unwrap());
            scale.run(gpu, input.binding(), output.binding(), n as u32);
        }
        assert_eq!(output.as_slice().unwrap()[5], 305, "{mode:?}");
    }
}

#[test]
fn pooled_reuse_comes_after_the_last_submission_that_used_the_block() {
    let Some((manager, device)) = gpu() else { return };
    let gpu = manager.wgpu_device(device).unwrap();
    let slow = Shader::new(gpu.device(), "slow_iota");
    let n = 1 << 16;
    let input = manager.allocate_on::<u32>(device, n, AllocationMode::Unpooled).unwrap();
    let mut input = input;
    for mode in modes(&manager, device) {
        if mode == AllocationMode::Unpooled {
            continue;
        }
        let mut block = manager.allocate_on::<u32>(device, n, mode).unwrap();
        {
            let (i, o) =
                (input.wgpu_buffer(MapMode::Read).unwrap(), block.wgpu_buffer(MapMode::Write).unwrap());
            slow.run(gpu, i.binding(), o.binding(), n as u32);
        }
        drop(block); // the shader may still run
        let hits = manager.statistics().pool_hits;
        let mut reused = manager.allocate_on::<u32>(device, n, mode).unwrap();
        assert_eq!(manager.statistics().pool_hits, hits + 1, "{mode:?}: the same block");
        if reused.location() != Location::Device {
            // Host-visible: read in place, ordered after the shader by the block's fence.
            let seen = reused.as_slice().unwrap();
            assert!(
                seen.iter().enumerate().all(|(i, &x)| x == i as u32),
                "{mode:?}: reuse saw the shader unfinished"
            );
        }
        // The next user's writes are never overwritten by the earlier shader.
        reused.copy_from_blocking(&vec![5; n], 0).unwrap();
        assert!(reused.to_vec().unwrap().iter().all(|&x| x == 5), "{mode:?}");
    }
}

#[test]
fn eight_threads_allocate_copy_and_return() {
    let Some((manager, device)) = gpu() else { return };
    let modes = modes(&manager, device);
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            let (manager, modes) = (&manager, &modes);
            scope.spawn(move || {
                for round in 0..30u32 {
                    let n = 255 + (round as usize % 5) * 1001;
                    let mode = modes[round as usize % modes.len()];
                    let mut buffer = manager.allocate_on::<u8>(device, n, mode).unwrap();
                    let src = bytes(n, (t * 31 + round) as u8);
                    buffer.copy_from_blocking(&src, 0).unwrap();
                    let mut back = vec![0; n - 1];
                    pollster::block_on(buffer.copy_to(&mut back, 1)).unwrap();
                    assert_eq!(back, src[1..]);
                }
            });
        }
    });
    let stats = manager.statistics();
    assert_eq!(stats.active_buffers, 0);
    assert!(stats.pool_hits > 0);
}

#[test]
fn transfers_reach_the_cpu_and_the_device_itself() {
    let Some((manager, device)) = gpu() else { return };
    let n = 300_001;
    let mut gpu_a = manager.allocate_on::<u8>(device, n, AllocationMode::Pooled).unwrap();
    let mut gpu_b = manager.allocate_on::<u8>(device, n, AllocationMode::Pooled).unwrap();
    let mut host = manager.allocate::<u8>(n, AllocationMode::Pooled).unwrap();
    host.as_mut_slice().unwrap().copy_from_slice(&bytes(n, 9));
    let up = manager.transfer_blocking(&host, &mut gpu_a).unwrap();
    let local = manager.transfer_blocking(&gpu_a, &mut gpu_b).unwrap();
    assert_eq!(local.strategy, Strategy::DeviceLocal);
    let mut back = manager.allocate::<u8>(n, AllocationMode::Pooled).unwrap();
    let down = manager.transfer_blocking(&gpu_b, &mut back).unwrap();
    assert_eq!(back.as_slice().unwrap(), &bytes(n, 9)[..]);
    eprintln!("up: {:?}, local: {:?}, down: {:?}", up.strategy, local.strategy, down.strategy);
    // Every strategy that can move host <-> wgpu device memory gives the same bytes.
    for strategy in [Strategy::PinnedStaging, Strategy::Staged] {
        let options = TransferOptions::default().with_strategy(strategy).with_chunk_bytes(64 << 10).unwrap();
        gpu_b.copy_from_blocking(&vec![0; n], 0).unwrap();
        match manager.transfer_with_blocking(&host, &mut gpu_b, options.clone()) {
            Ok(report) => assert_eq!(report.strategy, strategy),
            // Only a device without pinned memory may refuse pinned staging.
            Err(e)
                if strategy == Strategy::PinnedStaging
                    && !modes(&manager, device).contains(&AllocationMode::Pinned) =>
            {
                eprintln!("{strategy:?}: {e}");
                continue;
            }
            Err(e) => panic!("{strategy:?}: {e}"),
        }
        let mut out = vec![0; n];
        gpu_b.copy_to_blocking(&mut out, 0).unwrap();
        assert_eq!(out, bytes(n, 9), "{strategy:?} up");
        back.as_mut_slice().unwrap().fill(0);
        manager.transfer_with_blocking(&gpu_b, &mut back, options).unwrap();
        assert_eq!(back.as_slice().unwrap(), &bytes(n, 9)[..], "{strategy:?} down");
    }
}

#[test]
fn a_buffer_above_the_largest_never_fits_and_names_the_limit() {
    let Some((manager, device)) = gpu() else { return };
    let largest = manager.wgpu_device(device).unwrap().device().limits().max_buffer_size;
    let Ok(too_many) = usize::try_from(largest + 1) else { return };
    let err = manager.allocate_on::<u8>(device, too_many, AllocationMode::Unpooled).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&largest.to_string()), "{text}");
    assert!(matches!(err, Error::TooLarge { largest: l, .. } if l == largest), "{err:?}");
    // Nothing was lost: the device still works.
    let mut small = manager.allocate_on::<u8>(device, 5, AllocationMode::Pooled).unwrap();
    small.copy_from_blocking(&[1, 2, 3, 4, 5], 0).unwrap();
    assert_eq!(small.to_vec().unwrap(), [1, 2, 3, 4, 5]);
}

#[test]
fn bad_input_is_refused_and_nothing_is_lost() {
    let Some((manager, device)) = gpu() else { return };
    let mut buffer = manager.allocate_on::<f32>(device, 100, AllocationMode::Pooled).unwrap();
    buffer.copy_from_blocking(&data(100), 0).unwrap();
    let err = buffer.copy_from_blocking(&data(10), 95).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { offset: 95, len: 10, buffer_len: 100 }), "{err}");
    let mut cpu = manager.allocate::<f32>(10, AllocationMode::Pooled).unwrap();
    let err = cpu.wgpu_buffer(MapMode::Read).unwrap_err();
    assert!(
        matches!(err, Error::WrongBackend { expected: DeviceKind::Wgpu, found: DeviceKind::Cpu, .. }),
        "{err}"
    );
    assert!(matches!(manager.wgpu_device(DeviceId::CPU), Err(Error::WrongDeviceKind { .. })));
    assert_eq!(buffer.as_slice().unwrap(), &data(100)[..], "the buffer is intact");
}

/// Runs in a child process with `VK_ICD_FILENAMES` naming a driver that does not exist.
#[test]
fn without_a_driver_there_are_no_devices_and_a_reason() {
    if std::env::var_os("UNIMEM_NO_VULKAN_CHILD").is_some() {
        let manager = MemoryManager::new();
        let devices = manager.devices();
        assert!(devices.iter().all(|d| d.kind != DeviceKind::Wgpu), "{devices:?}");
        let notes = manager.backend_notes();
        let note = notes.iter().find(|n| n.starts_with("wgpu: ")).unwrap_or_else(|| panic!("{notes:?}"));
        eprintln!("reason given: {note}");
        let mut buffer = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        buffer.as_mut_slice().unwrap().fill(1);
        assert!(buffer.as_slice().unwrap().iter().all(|&b| b == 1));
        return;
    }
    let missing = std::env::temp_dir().join(format!("unimem-no-such-icd-{}.json", std::process::id()));
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "without_a_driver_there_are_no_devices_and_a_reason", "--nocapture"])
        .env("UNIMEM_NO_VULKAN_CHILD", "1")
        .env("VK_ICD_FILENAMES", &missing)
        .env("VK_DRIVER_FILES", &missing)
        .env("WGPU_BACKEND", "vulkan")
        .env_remove("UNIMEM_REQUIRE_WGPU")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed: {log}");
    assert!(log.contains("reason given: wgpu:"), "{log}");
}

/// Runs in a child process: the device is destroyed under unimem, as a driver reset would
/// lose it. Operations fail with an error, dropping buffers neither panics nor hangs, and
/// the CPU still works.
#[test]
fn a_lost_device_fails_with_an_error_and_nothing_hangs() {
    if std::env::var_os("UNIMEM_LOST_DEVICE_CHILD").is_some() {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(60));
            eprintln!("hung for 60 s after the device was lost");
            std::process::abort();
        });
        let Some((manager, device)) = gpu() else { return };
        let mut buffer = manager.allocate_on::<u8>(device, 1001, AllocationMode::Pooled).unwrap();
        buffer.copy_from_blocking(&[1; 1001], 0).unwrap();
        let mut pinned = modes(&manager, device)
            .contains(&AllocationMode::Pinned)
            .then(|| manager.allocate_on::<u32>(device, 100, AllocationMode::Pinned).unwrap());
        if let Some(pinned) = &mut pinned {
            assert!(pinned.wgpu_buffer(MapMode::ReadWrite).is_ok(), "unmapped for the device");
        }
        manager.wgpu_device(device).unwrap().device().destroy();
        let mut back = vec![0; 1001];
        let mut failures = Vec::new();
        for _ in 0..3 {
            match buffer.copy_to_blocking(&mut back, 0) {
                Ok(()) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(!failures.is_empty(), "reads from a destroyed device all succeeded");
        eprintln!("lost device: {}", failures[0]);
        if let Some(pinned) = &pinned {
            assert!(
                pinned.as_slice().is_err(),
                "a host-visible buffer that cannot be mapped back is not readable"
            );
        }
        drop(pinned);
        drop(buffer);
        let _ = manager.allocate_on::<u8>(device, 10, AllocationMode::Pooled);
        let mut cpu = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
        cpu.as_mut_slice().unwrap().fill(3);
        drop(manager);
        eprintln!("lost device handled");
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_lost_device_fails_with_an_error_and_nothing_hangs", "--nocapture"])
        .env("UNIMEM_LOST_DEVICE_CHILD", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed: {log}");
    if std::env::var_os("UNIMEM_REQUIRE_WGPU").is_some() {
        assert!(log.contains("lost device handled"), "{log}");
    }
}

/// wgpu and another device backend have no direct path: the engine stages through the host.
#[test]
fn transfers_between_wgpu_and_another_backend_go_through_the_host() {
    let Some((manager, device)) = gpu() else { return };
    let Some(other) =
        manager.devices().into_iter().find(|d| !matches!(d.kind, DeviceKind::Cpu | DeviceKind::Wgpu))
    else {
        return eprintln!("skipping: no device of another backend");
    };
    let n = 100_003;
    let mut on_gpu = manager.allocate_on::<u8>(device, n, AllocationMode::Pooled).unwrap();
    on_gpu.copy_from_blocking(&bytes(n, 21), 0).unwrap();
    let mut on_other = manager.allocate_on::<u8>(other.id, n, AllocationMode::Pooled).unwrap();
    let there = manager.transfer_blocking(&on_gpu, &mut on_other).unwrap();
    assert!(
        matches!(there.strategy, Strategy::PinnedStaging | Strategy::Staged),
        "{:?}: {:?}",
        there.strategy,
        there.declined
    );
    assert_eq!(on_other.to_vec().unwrap(), bytes(n, 21), "to {}", other.name);
    on_gpu.copy_from_blocking(&vec![0; n], 0).unwrap();
    manager.transfer_blocking(&on_other, &mut on_gpu).unwrap();
    assert_eq!(on_gpu.to_vec().unwrap(), bytes(n, 21), "back from {}", other.name);
    eprintln!("{} <-> {}: {:?}", device, other.name, there.strategy);
}
