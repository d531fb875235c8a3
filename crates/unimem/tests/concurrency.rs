//! Many threads allocating, writing and returning at once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use unimem::{AllocationMode, MemoryManager};

#[test]
fn eight_threads_never_share_or_lose_a_buffer() {
    let manager = MemoryManager::new();
    let live: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new()); // start -> end
    let rounds = 2_000;
    std::thread::scope(|s| {
        for thread in 0..8u32 {
            let (manager, live) = (&manager, &live);
            s.spawn(move || {
                let mut held = Vec::new();
                for round in 0..rounds {
                    let len = [100, 1000, 3000, 20_000][(round + thread as usize) % 4];
                    let mut buffer = manager.allocate::<u32>(len, AllocationMode::Pooled).unwrap();
                    let tag = thread << 24 | round as u32;
                    buffer.as_mut_slice().unwrap().fill(tag);
                    let start = buffer.as_slice().unwrap().as_ptr() as usize;
                    {
                        let mut live = live.lock().unwrap();
                        let overlap = live.range(..start + buffer.capacity_in_bytes()).next_back();
                        assert!(overlap.is_none_or(|(_, &end)| end <= start), "two live buffers overlap");
                        live.insert(start, start + buffer.capacity_in_bytes());
                    }
                    held.push((buffer, tag, start));
                    if held.len() > 3 || round % 7 == 0 {
                        let (buffer, tag, start) = held.remove(0);
                        assert!(
                            buffer.as_slice().unwrap().iter().all(|&x| x == tag),
                            "a buffer was handed out twice"
                        );
                        live.lock().unwrap().remove(&start);
                        if round % 2 == 0 {
                            drop(buffer);
                        } else {
                            manager.return_to_pool(buffer).unwrap();
                        }
                    }
                }
                for (buffer, tag, start) in held {
                    assert!(buffer.as_slice().unwrap().iter().all(|&x| x == tag));
                    live.lock().unwrap().remove(&start);
                }
            });
        }
    });
    let stats = manager.statistics();
    assert_eq!(stats.active_buffers, 0);
    assert_eq!(stats.pool_hits + stats.pool_misses, 8 * rounds as u64);
    assert_eq!(stats.total_allocated + stats.total_pooled, stats.total_reserved);
    assert!(stats.hit_rate() > 0.9, "{stats}");
}

#[test]
fn buffers_move_between_threads() {
    let manager = MemoryManager::new();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..1000u64 {
                let mut b = manager.allocate::<u64>(512, AllocationMode::Pooled).unwrap();
                b.as_mut_slice().unwrap().fill(i);
                tx.send((i, b)).unwrap();
            }
            drop(tx);
        });
        s.spawn(|| {
            for (i, b) in rx {
                assert!(b.as_slice().unwrap().iter().all(|&x| x == i));
            }
        });
    });
    let stats = manager.statistics();
    assert_eq!(stats.active_buffers, 0);
    assert_eq!(stats.total_allocated + stats.total_pooled, stats.total_reserved);
}

#[test]
fn trimming_while_other_threads_allocate() {
    let manager = MemoryManager::new();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let manager = &manager;
            s.spawn(move || {
                for _ in 0..3000 {
                    let mut b = manager.allocate::<u8>(4096, AllocationMode::Pooled).unwrap();
                    b.as_mut_slice().unwrap().fill(t);
                    assert!(b.as_slice().unwrap().iter().all(|&x| x == t));
                }
            });
        }
        s.spawn(|| {
            for _ in 0..200 {
                manager.trim();
                let _ = manager.statistics();
            }
        });
    });
    manager.trim();
    let stats = manager.statistics();
    assert_eq!((stats.active_buffers, stats.total_reserved), (0, 0));
}
