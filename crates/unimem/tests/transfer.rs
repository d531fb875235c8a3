//! The transfer engine on the CPU: strategies, forced strategies, batches, the concurrency
//! bound and the statistics. Device pairs are tested in tests/opencl.rs and tests/cuda.rs.

use unimem::transfer::{Strategy, TransferOptions};
use unimem::{AllocationMode, Error, MemoryManager, MemoryOptions};

fn pattern(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed)).collect()
}

#[test]
fn the_future_is_send() {
    fn send<F: std::future::Future + Send>(_: &F) {}
    let manager = MemoryManager::new();
    let src = manager.allocate::<u8>(10, AllocationMode::Pooled).unwrap();
    let mut dst = manager.allocate::<u8>(10, AllocationMode::Pooled).unwrap();
    let future = manager.transfer(&src, &mut dst);
    send(&future);
    drop(future);
    let mut targets = [manager.allocate::<u8>(10, AllocationMode::Pooled).unwrap()];
    let batch = manager.transfer_batch([&src].into_iter().zip(targets.iter_mut()));
    send(&batch);
}

#[test]
fn cpu_to_cpu_is_device_local_at_odd_lengths_and_offsets() {
    let manager = MemoryManager::new();
    for len in [1usize, 3, 1023, 4097, (1 << 20) + 5, (16 << 20) + 1] {
        let data = pattern(len + 7, len as u32);
        let src = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
        let mut dst = manager.allocate::<u32>(len + 11, AllocationMode::Pooled).unwrap();
        dst.fill(9).unwrap();
        let report =
            manager.transfer_blocking(src.slice(7..7 + len).unwrap(), dst.slice_mut(11..).unwrap()).unwrap();
        assert_eq!(report.strategy, Strategy::DeviceLocal, "{report}");
        assert_eq!(report.bytes, len as u64 * 4);
        assert!(report.declined.is_empty(), "{report}");
        let out = dst.as_slice().unwrap();
        assert_eq!(&out[..11], &[9; 11], "nothing before the view changes");
        assert!(out[11..] == data[7..], "length {len}");
    }
}

#[test]
fn the_async_form_and_whole_buffers() {
    let manager = MemoryManager::new();
    let src = manager.create_buffer(pattern(1000, 1), AllocationMode::Pinned).unwrap();
    let mut dst = manager.allocate::<u32>(1000, AllocationMode::Unified).unwrap();
    let report = pollster::block_on(manager.transfer(&src, &mut dst)).unwrap();
    assert_eq!(report.strategy, Strategy::DeviceLocal);
    assert_eq!(dst.to_vec().unwrap(), pattern(1000, 1));
    assert!(report.bandwidth() > 0.0);
    assert!(report.to_string().contains("device-local"), "{report}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let manager = MemoryManager::new();
    let src = manager.create_buffer(pattern(100, 2), AllocationMode::Pooled).unwrap();
    let mut dst = manager.create_buffer(vec![5u32; 99], AllocationMode::Pooled).unwrap();
    let err = manager.transfer_blocking(&src, &mut dst).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { destination: 99, source_len: 100 }), "{err}");
    for strategy in [Strategy::PeerToPeer, Strategy::PinnedStaging] {
        let options = TransferOptions::default().with_strategy(strategy);
        let err = manager.transfer_with_blocking(src.slice(..99).unwrap(), &mut dst, options).unwrap_err();
        match err {
            Error::StrategyUnavailable { strategy: s, reason } => {
                assert_eq!(s, strategy);
                assert!(!reason.is_empty());
            }
            other => panic!("{strategy}: {other}"),
        }
    }
    assert_eq!(dst.as_slice().unwrap(), &[5; 99]);
    assert!(TransferOptions::default().with_chunk_bytes(0).is_err());
    assert!(TransferOptions::default().with_chunk_bytes(2 << 30).is_err());
    assert!(TransferOptions::default().with_depth(0).is_err());
    assert!(TransferOptions::default().with_depth(65).is_err());
}

#[test]
fn forced_strategies_that_can_work_do() {
    let manager = MemoryManager::new();
    let data = pattern(70_001, 3);
    let src = manager.create_buffer(data.clone(), AllocationMode::Pooled).unwrap();
    for strategy in [Strategy::DeviceLocal, Strategy::ZeroCopy, Strategy::Staged] {
        let mut dst = manager.allocate::<u32>(data.len(), AllocationMode::Pooled).unwrap();
        let options = TransferOptions::default().with_strategy(strategy);
        let report = manager.transfer_with_blocking(&src, &mut dst, options).unwrap();
        assert_eq!(report.strategy, strategy);
        assert!(dst.as_slice().unwrap() == data, "{strategy}");
    }
    let stats = manager.statistics().transfers;
    for strategy in [Strategy::DeviceLocal, Strategy::ZeroCopy, Strategy::Staged] {
        let s = stats.of(strategy).unwrap();
        assert_eq!((s.count, s.bytes), (1, data.len() as u64 * 4), "{strategy}");
    }
    assert_eq!(stats.count(), 3);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.staging_bytes, 0, "staging is given back");
}

#[test]
fn a_batch_reports_each_pair_and_a_failure_names_its_index() {
    let manager = MemoryManager::new();
    let sources: Vec<_> =
        (0..6).map(|i| manager.create_buffer(pattern(1000, i), AllocationMode::Pooled).unwrap()).collect();
    let mut targets: Vec<_> = (0..6)
        .map(|i| manager.allocate::<u32>(if i == 2 { 999 } else { 1000 }, AllocationMode::Pooled).unwrap())
        .collect();
    let reports = manager.transfer_batch_blocking(sources.iter().zip(targets.iter_mut()));
    assert_eq!(reports.len(), 6);
    for (i, report) in reports.iter().enumerate() {
        if i == 2 {
            let err = report.as_ref().unwrap_err();
            assert!(matches!(err, Error::InBatch { index: 2, .. }), "{err}");
            assert!(err.to_string().contains("transfer 2"), "{err}");
            let source = std::error::Error::source(err).unwrap();
            assert!(source.to_string().contains("length mismatch"), "{source}");
        } else {
            assert!(report.is_ok(), "{i}: {report:?}");
        }
    }
    for (i, target) in targets.iter().enumerate().filter(|&(i, _)| i != 2) {
        assert_eq!(target.to_vec().unwrap(), pattern(1000, i as u32), "{i}");
    }
    assert!(targets[2].as_slice().unwrap().iter().all(|&x| x == 0), "the failed pair wrote nothing");
}

#[test]
fn the_concurrency_bound_holds_for_32_transfers() {
    for bound in [1, 2, 4] {
        let options = MemoryOptions::default().with_max_concurrent_transfers(bound).unwrap();
        let manager = MemoryManager::builder().options(options).build();
        let sources: Vec<_> = (0..32)
            .map(|i| manager.create_buffer(pattern(4096, i), AllocationMode::Pooled).unwrap())
            .collect();
        let mut targets: Vec<_> =
            (0..32).map(|_| manager.allocate::<u32>(4096, AllocationMode::Pooled).unwrap()).collect();
        let reports = manager.transfer_batch_blocking(sources.iter().zip(targets.iter_mut()));
        assert!(reports.iter().all(Result::is_ok));
        let stats = manager.statistics().transfers;
        assert!(
            stats.peak_in_flight >= 1 && stats.peak_in_flight <= bound as u64,
            "bound {bound}: {stats:?}"
        );
        assert_eq!(stats.count(), 32);
    }
}

#[test]
fn copy_from_buffer_goes_through_the_engine() {
    let manager = MemoryManager::new();
    let src = manager.create_buffer(pattern(5000, 4), AllocationMode::Pooled).unwrap();
    let mut dst = manager.allocate::<u32>(5000, AllocationMode::Pooled).unwrap();
    dst.copy_from_buffer(&src).unwrap();
    assert_eq!(dst.to_vec().unwrap(), pattern(5000, 4));
    assert_eq!(manager.statistics().transfers.of(Strategy::DeviceLocal).unwrap().count, 1);
}

#[test]
fn the_cpu_has_no_peers_and_says_why() {
    let manager = MemoryManager::new();
    let access = manager.peers().access(unimem::DeviceId::CPU, unimem::DeviceId::CPU).unwrap();
    assert!(!access.is_enabled());
    assert!(access.to_string().contains("not its own peer"), "{access}");
    let matrix = manager.peer_access_matrix();
    assert_eq!(matrix.len(), manager.devices().len());
    assert!(matrix[0].iter().all(|&on| !on), "the CPU is nobody's peer: {matrix:?}");
    assert!(matrix.iter().all(|row| !row[0]), "the CPU is nobody's peer: {matrix:?}");
}
