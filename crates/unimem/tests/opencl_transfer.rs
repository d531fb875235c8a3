//! The transfer engine and the peer manager on OpenCL (PoCL in CI): every strategy chosen
//! where it should be, with the data checked at odd lengths and offsets; forced and refused
//! strategies; futures dropped and leaked mid-flight behind a closed queue; the concurrency
//! bound; and, on two devices of one context (`POCL_DEVICES="pthread pthread"`, set for a
//! child process by the test itself), peer copies switched on and off.

#[path = "support/cl_gate.rs"]
mod cl_gate;

use std::future::Future;
use std::pin::pin;
use std::process::Command;
use std::task::{Context, Poll, Waker};

use cl_gate::Gate;
use unimem::transfer::{Strategy, TransferOptions};
use unimem::{AllocationMode, DeviceId, DeviceKind, Error, MemoryManager, MemoryOptions};

fn opencl_devices(manager: &MemoryManager) -> Vec<DeviceId> {
    manager.devices_of(DeviceKind::OpenCl).into_iter().map(|d| d.id).collect()
}

/// The manager and its first OpenCL device, or `None` (with the reason printed).
fn opencl_with(options: MemoryOptions) -> Option<(MemoryManager, DeviceId)> {
    let manager = MemoryManager::builder().options(options).build();
    let device = opencl_devices(&manager).first().copied();
    if device.is_none() {
        let why = manager.backend_notes().join("; ");
        assert!(std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_none(), "no OpenCL device: {why}");
        eprintln!("skipping: no OpenCL device ({why})");
    }
    device.map(|d| (manager, d))
}

fn opencl() -> Option<(MemoryManager, DeviceId)> {
    opencl_with(MemoryOptions::default())
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed as u32).to_le_bytes()[3])
        .collect()
}

/// Lengths from one element to 64 MiB, odd ones.
const LENGTHS: [usize; 6] = [1, 7, 4099, (1 << 20) + 3, (9 << 20) + 1, 64 << 20];

#[test]
fn host_to_device_and_back_stream_through_pinned_chunks() {
    let Some((manager, gpu)) = opencl() else { return };
    for len in LENGTHS {
        let data = pattern(len + 5, len as u8);
        let src = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
        let mut dev = manager.allocate_on::<u8>(gpu, len + 3, AllocationMode::Pooled).unwrap();
        let up = manager.transfer_blocking(src.slice(5..).unwrap(), dev.slice_mut(3..).unwrap()).unwrap();
        assert_eq!(up.strategy, Strategy::PinnedStaging, "{up}");
        assert_eq!(up.chunks as usize, len.div_ceil(4 << 20), "{up}");
        assert!(up.declined.is_empty(), "{up}");

        let mut back = manager.allocate::<u8>(len + 1, AllocationMode::Pooled).unwrap();
        let down = manager.transfer_blocking(dev.slice(3..).unwrap(), back.slice_mut(1..).unwrap()).unwrap();
        assert_eq!(down.strategy, Strategy::PinnedStaging, "{down}");
        let out = back.as_slice().unwrap();
        assert_eq!(out[0], 0, "nothing before the view changes");
        assert!(out[1..] == data[5..], "length {len}");
    }
    assert_eq!(manager.statistics().transfers.staging_bytes, 0);
}

#[test]
fn every_strategy_on_one_device_where_it_belongs() {
    let Some((manager, gpu)) = opencl() else { return };
    let data: Vec<u32> = (0..100_003).collect();
    let on_device = manager.create_buffer_on(gpu, &data, AllocationMode::Pooled).unwrap();

    // Device to device on one device: one device copy, at an odd offset.
    let mut copy = manager.allocate_on::<u32>(gpu, data.len() - 1, AllocationMode::Unpooled).unwrap();
    let report = manager.transfer_blocking(on_device.slice(1..).unwrap(), &mut copy).unwrap();
    assert_eq!(report.strategy, Strategy::DeviceLocal, "{report}");
    assert_eq!(copy.to_vec().unwrap(), data[1..]);

    // The device's own pinned memory and its device memory: one DMA, device-local.
    let mut pinned = manager.allocate_on::<u32>(gpu, data.len(), AllocationMode::Pinned).unwrap();
    let report = manager.transfer_blocking(&on_device, &mut pinned).unwrap();
    assert_eq!(report.strategy, Strategy::DeviceLocal, "{report}");
    assert_eq!(pinned.as_slice().unwrap(), &data[..], "host access waits for the DMA");
    let mut again = manager.allocate_on::<u32>(gpu, data.len(), AllocationMode::Pooled).unwrap();
    assert_eq!(manager.transfer_blocking(&pinned, &mut again).unwrap().strategy, Strategy::DeviceLocal);
    assert_eq!(again.to_vec().unwrap(), data);

    // Host memory to host-visible memory: one memcpy.
    let host = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
    let mut unified = manager.allocate_on::<u32>(gpu, data.len(), AllocationMode::Unified).unwrap();
    let report = manager.transfer_blocking(&host, &mut unified).unwrap();
    assert_eq!(report.strategy, Strategy::ZeroCopy, "{report}");
    assert_eq!(unified.as_slice().unwrap(), &data[..]);

    // Peer-to-peer needs two devices: refused with the reason when forced.
    let mut other = manager.allocate_on::<u32>(gpu, data.len(), AllocationMode::Pooled).unwrap();
    let forced = TransferOptions::default().with_strategy(Strategy::PeerToPeer);
    let err = manager.transfer_with_blocking(&on_device, &mut other, forced).unwrap_err();
    assert!(matches!(err, Error::StrategyUnavailable { strategy: Strategy::PeerToPeer, .. }), "{err}");
    assert!(err.to_string().contains("both on"), "{err}");

    // Forced staging works on every pair.
    for strategy in [Strategy::Staged, Strategy::PinnedStaging] {
        let options = TransferOptions::default().with_strategy(strategy);
        let report = manager.transfer_with_blocking(&on_device, &mut other, options.clone()).unwrap();
        assert_eq!(report.strategy, strategy);
        assert_eq!(other.to_vec().unwrap(), data, "{strategy}");
        let mut host_dst = manager.allocate::<u32>(data.len(), AllocationMode::Pooled).unwrap();
        manager.transfer_with_blocking(&other, &mut host_dst, options).unwrap();
        assert_eq!(host_dst.as_slice().unwrap(), &data[..], "{strategy}");
    }
}

#[test]
fn without_pinned_memory_transfers_stage_and_say_why() {
    let Some((manager, gpu)) = opencl_with(MemoryOptions::default().with_pinned_memory(false)) else {
        return;
    };
    let data = pattern(3 << 20, 9);
    let src = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
    let mut dev = manager.allocate_on::<u8>(gpu, data.len(), AllocationMode::Pooled).unwrap();
    let report = manager.transfer_blocking(&src, &mut dev).unwrap();
    assert_eq!(report.strategy, Strategy::Staged, "{report}");
    assert_eq!(report.declined[0].strategy, Strategy::PinnedStaging);
    assert_eq!(report.declined[0].reason, "use_pinned_memory is off");
    assert!(dev.to_vec().unwrap() == data);
    let forced = TransferOptions::default().with_strategy(Strategy::PinnedStaging);
    let mut again = manager.allocate_on::<u8>(gpu, data.len(), AllocationMode::Pooled).unwrap();
    let err = manager.transfer_with_blocking(&src, &mut again, forced).unwrap_err();
    assert!(err.to_string().contains("use_pinned_memory is off"), "{err}");
}

#[test]
fn coherence_with_host_mirrors_holds() {
    let Some((manager, gpu)) = opencl() else { return };
    // A source whose host side is newer: the transfer reads the host side.
    let mut src = manager.allocate_on::<u32>(gpu, 1000, AllocationMode::Pooled).unwrap();
    src.as_mut_slice().unwrap().fill(7);
    let mut host = manager.allocate::<u32>(1000, AllocationMode::Pooled).unwrap();
    manager.transfer_blocking(&src, &mut host).unwrap();
    assert_eq!(host.as_slice().unwrap(), &[7; 1000]);
    let mut dev = manager.allocate_on::<u32>(gpu, 1000, AllocationMode::Pooled).unwrap();
    manager.transfer_blocking(&src, &mut dev).unwrap();
    assert_eq!(dev.to_vec().unwrap(), vec![7; 1000]);

    // A destination with host changes outside the range keeps them; the range holds the
    // transferred data afterwards, on the host and on the device.
    let mut dst = manager.allocate_on::<u32>(gpu, 1000, AllocationMode::Pooled).unwrap();
    dst.as_mut_slice().unwrap().fill(3);
    let small = manager.create_buffer(vec![9u32; 10], AllocationMode::Pooled).unwrap();
    manager.transfer_blocking(&small, dst.slice_mut(500..510).unwrap()).unwrap();
    let mut expected = vec![3u32; 1000];
    expected[500..510].fill(9);
    assert_eq!(dst.as_slice().unwrap(), &expected[..]);
    let mut check = manager.allocate::<u32>(1000, AllocationMode::Pooled).unwrap();
    manager.transfer_blocking(&dst, &mut check).unwrap();
    assert_eq!(check.as_slice().unwrap(), &expected[..]);
}

/// Held by each test that closes the device's queue: the queue is shared by every test of
/// this process, and two tests each holding it closed while waiting for the other's work
/// would wait forever.
static GATED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gate(manager: &MemoryManager, device: DeviceId) -> Gate {
    let cl = manager.opencl_device(device).unwrap();
    Gate::close(cl.context().get(), cl.queue().get())
}

#[test]
fn futures_dropped_or_leaked_mid_flight_leave_data_and_pools_intact() {
    let Some((manager, gpu)) = opencl() else { return };
    let _one_at_a_time = GATED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = pattern(10 << 20, 3);
    for leak in [false, true] {
        for upload in [true, false] {
            let host = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
            let mut dev = manager.allocate_on::<u8>(gpu, data.len(), AllocationMode::Pooled).unwrap();
            dev.fill(1).unwrap();
            let mut sink = manager.allocate::<u8>(data.len(), AllocationMode::Pooled).unwrap();
            // The staging chunks come from the pinned pool; made before the queue is closed
            // (making pinned memory maps it, which waits for the queue).
            manager.transfer_blocking(&host, &mut dev).unwrap();
            dev.fill(1).unwrap();
            let mut gate = gate(&manager, gpu);
            {
                let mut cx = Context::from_waker(Waker::noop());
                let mut transfer = Box::pin(if upload {
                    manager.transfer(&host, &mut dev)
                } else {
                    manager.transfer(&dev, &mut sink)
                });
                assert!(transfer.as_mut().poll(&mut cx).is_pending(), "the queue is closed");
                assert!(manager.statistics().transfers.staging_bytes > 0);
                if leak {
                    std::mem::forget(transfer);
                } else {
                    drop(transfer);
                }
            }
            drop(host); // the source may go at once: the device reads staging chunks
            gate.open();
            // The pools hand the chunks out again only after the device is done with them.
            let mut after = manager.allocate::<u8>(data.len(), AllocationMode::Pooled).unwrap();
            let report = manager.transfer_blocking(&dev, &mut after).unwrap();
            assert_eq!(report.strategy, Strategy::PinnedStaging);
            let out = after.as_slice().unwrap();
            if upload {
                // Partly written: each byte is the old or the new value, nothing else.
                assert!(out.iter().zip(&data).all(|(&o, &d)| o == 1 || o == d), "leak {leak}");
            } else {
                assert!(out.iter().all(|&o| o == 1), "the device buffer is unchanged");
                assert!(sink.as_slice().unwrap().iter().all(|&o| o == 0), "an abandoned read writes nothing");
            }
        }
    }
    let stats = manager.statistics();
    assert_eq!(
        stats.total_allocated + stats.total_pooled + stats.pending_free,
        stats.total_reserved,
        "balanced: {stats}"
    );
}

#[test]
fn thirty_two_transfers_never_exceed_the_bound() {
    let _one_at_a_time = GATED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for bound in [1usize, 2, 4] {
        let options = MemoryOptions::default().with_max_concurrent_transfers(bound).unwrap();
        let Some((manager, gpu)) = opencl_with(options) else { return };
        let sources: Vec<_> = (0..32)
            .map(|i| manager.create_buffer(pattern(100_000, i), AllocationMode::Pooled).unwrap())
            .collect();
        let mut targets: Vec<_> = (0..32)
            .map(|_| manager.allocate_on::<u8>(gpu, 100_000, AllocationMode::Pooled).unwrap())
            .collect();
        // Warm: the staging chunks of `bound` transfers at once are pooled before the queue
        // is closed (making pinned memory maps it, which waits for the queue).
        assert!(
            manager.transfer_batch_blocking(sources.iter().zip(targets.iter_mut())).iter().all(Result::is_ok)
        );
        let warm = manager.statistics().transfers;
        let mut gate = gate(&manager, gpu);
        let reports = {
            let mut batch = pin!(manager.transfer_batch(sources.iter().zip(targets.iter_mut())));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(batch.as_mut().poll(&mut cx).is_pending());
            let stats = manager.statistics().transfers;
            assert_eq!(stats.in_flight, bound as u64, "exactly the bound runs while the queue is closed");
            gate.open();
            loop {
                if let Poll::Ready(reports) = batch.as_mut().poll(&mut cx) {
                    break reports;
                }
                std::thread::yield_now();
            }
        };
        assert!(reports.iter().all(Result::is_ok));
        let stats = manager.statistics().transfers;
        assert!(warm.peak_in_flight <= bound as u64, "{warm:?}");
        assert_eq!(stats.peak_in_flight, bound as u64, "{stats:?}");
        assert_eq!((stats.count(), stats.in_flight), (64, 0));
        for (i, target) in targets.iter().enumerate() {
            assert!(target.to_vec().unwrap() == pattern(100_000, i as u8), "{i}");
        }
    }
}

/// Runs `test` in a child process with two PoCL devices where this process has fewer.
fn on_two_devices(test: &str) -> Option<(MemoryManager, DeviceId, DeviceId)> {
    let manager = MemoryManager::new();
    let devices = opencl_devices(&manager);
    if devices.len() >= 2 {
        return Some((manager, devices[0], devices[1]));
    }
    if std::env::var_os("UNIMEM_TWO_DEVICE_CHILD").is_some() || devices.is_empty() {
        assert!(std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_none(), "fewer than two OpenCL devices");
        eprintln!("skipping: fewer than two OpenCL devices");
        return None;
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("UNIMEM_TWO_DEVICE_CHILD", "1")
        .env("POCL_DEVICES", "pthread pthread")
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed on two devices");
    None
}

#[test]
fn two_devices_copy_peer_to_peer_until_disabled() {
    let Some((manager, a, b)) = on_two_devices("two_devices_copy_peer_to_peer_until_disabled") else {
        return;
    };
    let peers = manager.peers();
    assert!(peers.is_enabled(a, b) && peers.is_enabled(b, a), "one context: {peers:?}");
    assert!(manager.peer_access_matrix()[b.index()][a.index()]);
    assert!(!peers.access(DeviceId::CPU, a).unwrap().is_enabled());
    for len in [1usize, 4099, (9 << 20) + 1] {
        let data = pattern(len + 1, len as u8);
        let src = manager.create_buffer_on(a, &data, AllocationMode::Pooled).unwrap();
        let mut dst = manager.allocate_on::<u8>(b, len, AllocationMode::Pooled).unwrap();
        let report = manager.transfer_blocking(src.slice(1..).unwrap(), &mut dst).unwrap();
        assert_eq!(report.strategy, Strategy::PeerToPeer, "{report}");
        assert!(dst.to_vec().unwrap() == data[1..], "{len}");

        peers.disable(b, a).unwrap();
        let mut again = manager.allocate_on::<u8>(b, len, AllocationMode::Pooled).unwrap();
        let report = manager.transfer_blocking(src.slice(1..).unwrap(), &mut again).unwrap();
        assert_eq!(report.strategy, Strategy::PinnedStaging, "{report}");
        assert_eq!(report.declined[0].strategy, Strategy::PeerToPeer);
        assert!(report.declined[0].reason.contains("disabled"), "{report}");
        assert!(again.to_vec().unwrap() == data[1..], "{len}");
        let forced = TransferOptions::default().with_strategy(Strategy::PeerToPeer);
        assert!(manager.transfer_with_blocking(src.slice(1..).unwrap(), &mut again, forced).is_err());
        peers.enable(b, a).unwrap();
        let mut back = manager.allocate_on::<u8>(a, len, AllocationMode::Pooled).unwrap();
        let report = manager.transfer_blocking(&dst, &mut back).unwrap();
        assert_eq!(report.strategy, Strategy::PeerToPeer, "{report}");
        assert!(back.to_vec().unwrap() == data[1..], "{len}");
    }
}
