//! The transfer engine's building blocks on real OpenCL devices (PoCL in CI): enqueued
//! writes, reads and copies at odd offsets and lengths, completions, and peer copies between
//! two devices of one context (`POCL_DEVICES="pthread pthread"`). Devices are discovered at
//! run time; the tests print why they skip where there are none, and fail instead under
//! `UNIMEM_REQUIRE_OPENCL=1` (`UNIMEM_REQUIRE_OPENCL_PEERS=1` for two devices in a context).

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::host_lines::HostLines;

/// The first OpenCL device, or `None` (with the reason printed).
fn first_device() -> Option<&'static OpenClBackend> {
    let found = discover();
    let first = found.backends.first().map(|b| &**b);
    if first.is_none() {
        let why = found.note.clone().unwrap_or_default();
        assert!(std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_none(), "no OpenCL device: {why}");
        eprintln!("skipping: no OpenCL device ({why})");
    }
    first
}

/// Two devices of one context, or `None` (with the reason printed).
fn two_devices() -> Option<(&'static OpenClBackend, &'static OpenClBackend)> {
    let found = &discover().backends;
    let pair = found
        .iter()
        .find_map(|a| found.iter().find(|b| a.peer_access(&***b as &dyn Backend)).map(|b| (&**a, &**b)));
    if pair.is_none() {
        let mut why = format!(
            "{} OpenCL device(s), no two in one context (PoCL: POCL_DEVICES=\"pthread pthread\")",
            found.len()
        );
        why.extend(discover().note.as_ref().map(|note| format!("; {note}")));
        assert!(std::env::var_os("UNIMEM_REQUIRE_OPENCL_PEERS").is_none(), "{why}");
        eprintln!("skipping: {why}");
    }
    pair
}

/// Device memory of one backend, freed on drop.
struct DeviceMemory<'a> {
    backend: &'a OpenClBackend,
    raw: RawAllocation,
}

impl<'a> DeviceMemory<'a> {
    fn new(backend: &'a OpenClBackend, bytes: usize) -> Self {
        DeviceMemory { backend, raw: backend.allocate(bytes, MemoryKind::Device).unwrap() }
    }
}

impl Drop for DeviceMemory<'_> {
    fn drop(&mut self) {
        // SAFETY: our allocation of this backend; the free is queue-ordered after its uses.
        let _ = unsafe { self.backend.free(&self.raw, MemoryKind::Device) };
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1).collect()
}

#[test]
fn enqueued_writes_reads_and_copies_at_odd_offsets() {
    let Some(cl) = first_device() else { return };
    let a = DeviceMemory::new(cl, 1001);
    let b = DeviceMemory::new(cl, 777);
    let src = pattern(517, 3);
    let mut whole = vec![0xEE_u8; 517];
    let mut copied = vec![0xEE_u8; 777];
    // SAFETY: every range is in bounds, `src`, `whole` and `copied` outlive the completion
    // awaited below, and nothing touches them until then; `a` and `b` are distinct buffers.
    unsafe {
        cl.enqueue_write(&a.raw, 3, src.as_ptr(), src.len()).unwrap();
        cl.enqueue_copy(&a.raw, 5, &b.raw, 11, 301).unwrap();
        cl.enqueue_read(&a.raw, 3, whole.as_mut_ptr(), whole.len()).unwrap();
        cl.enqueue_read(&b.raw, 0, copied.as_mut_ptr(), copied.len()).unwrap();
        cl.enqueue_write(&a.raw, 0, src.as_ptr(), 0).unwrap(); // empty: nothing enqueued
    }
    let staged = pollster::block_on(cl.completion(None).unwrap()).unwrap();
    assert!(staged.bytes(0).is_empty());
    assert_eq!(whole, src);
    // a[5..306] is src[2..303]; the rest of `b` is still the zeros it was allocated with.
    assert_eq!(copied[11..312], src[2..303]);
    assert!(copied[..11].iter().chain(&copied[312..]).all(|&x| x == 0));
}

#[test]
fn a_completion_owns_the_staging_it_is_given_and_yields_it() {
    let Some(cl) = first_device() else { return };
    let a = DeviceMemory::new(cl, 4099);
    let src = pattern(333, 11);
    let staging = Staging::new(HostLines::zeroed(333).unwrap());
    // SAFETY: in bounds; `src` outlives the completion awaited below; the staging memory is
    // owned by that completion until the read into it has finished.
    unsafe {
        cl.enqueue_write(&a.raw, 4099 - 333, src.as_ptr(), src.len()).unwrap();
        cl.enqueue_read(&a.raw, 4099 - 333, staging.as_ptr(), 333).unwrap();
    }
    let staged = pollster::block_on(cl.completion(Some(staging)).unwrap()).unwrap();
    assert_eq!(staged.bytes(333), &src[..]);
    // A completion on an idle queue resolves too, and so do several in a row.
    for _ in 0..3 {
        pollster::block_on(cl.completion(None).unwrap()).unwrap();
    }
}

#[test]
fn peer_copies_need_a_device_of_the_same_context() {
    let Some(cl) = first_device() else { return };
    let a = DeviceMemory::new(cl, 64);
    let b = DeviceMemory::new(cl, 64);
    let cpu = CpuBackend::new(false);
    assert!(!cl.peer_access(cl), "a device is not its own peer");
    assert!(!cl.peer_access(&cpu));
    // SAFETY: in bounds; refused before anything is enqueued.
    unsafe {
        assert!(!cl.enqueue_peer_copy(cl, &a.raw, 0, &b.raw, 0, 64).unwrap());
        assert!(!cl.enqueue_peer_copy(&cpu, &a.raw, 0, &b.raw, 0, 64).unwrap());
    }
}

#[test]
fn peer_copies_between_two_devices_of_one_context() {
    let Some((zero, one)) = two_devices() else { return };
    assert!(zero.peer_access(one) && one.peer_access(zero));
    assert!(zero.shares_context_with(one) && std::ptr::eq(zero.context(), one.context()));
    assert!(zero.info().peer_capable && one.info().peer_capable);
    let src = DeviceMemory::new(zero, 2003);
    let dst = DeviceMemory::new(one, 1500);
    let data = pattern(2003, 5);
    let mut out = vec![0xEE_u8; 1500];
    // SAFETY: in bounds; `data` and `out` outlive the completions awaited below and nothing
    // else touches them; `one`'s queue is ordered after `zero`'s write before the copy.
    unsafe {
        zero.enqueue_write(&src.raw, 0, data.as_ptr(), data.len()).unwrap();
        one.order_after(&zero.record_fence().unwrap()).unwrap();
        assert!(one.enqueue_peer_copy(zero, &src.raw, 9, &dst.raw, 4, 1201).unwrap());
        one.enqueue_read(&dst.raw, 0, out.as_mut_ptr(), out.len()).unwrap();
    }
    pollster::block_on(one.completion(None).unwrap()).unwrap();
    assert_eq!(out[4..1205], data[9..1210]);
    assert!(out[..4].iter().chain(&out[1205..]).all(|&x| x == 0));
    // And back the other way, into the source device's buffer.
    let mut back = vec![0xEE_u8; 100];
    // SAFETY: as above, with the queues' roles swapped.
    unsafe {
        zero.order_after(&one.record_fence().unwrap()).unwrap();
        assert!(zero.enqueue_peer_copy(one, &dst.raw, 4, &src.raw, 1900, 100).unwrap());
        zero.enqueue_read(&src.raw, 1900, back.as_mut_ptr(), back.len()).unwrap();
    }
    pollster::block_on(zero.completion(None).unwrap()).unwrap();
    assert_eq!(back, data[9..109]);
}
