//! The CPU backend: host memory, always compiled.
//!
//! Small allocations (under 64 KiB) come from the global allocator, 64-byte aligned and
//! zeroed. Larger ones are mapped directly from the kernel, whose zero pages cost nothing
//! until touched (zeroing them with memset would touch every page); from 2 MiB on they are
//! 2 MiB aligned and (when the `huge_pages` option is on) advised to use transparent huge
//! pages, which makes first touch of a fresh 256 MiB buffer several times cheaper. Pinned memory is mapped page-granular and
//! locked with `mlock`, so that unlocking one allocation never unlocks another's pages.

use super::{Backend, BackendError, RawAllocation};
use crate::device::{DeviceId, DeviceInfo, DeviceKind, MemoryKind};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment of every CPU allocation: a cache line, and enough for any SIMD type.
pub(crate) const ALIGN: usize = 64;
/// Allocations from this size on are mapped directly.
const MAPPED: usize = 64 << 10;
/// Allocations from this size on are mapped 2 MiB aligned, for huge pages.
const LARGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// How an allocation was obtained, kept in its `handle`.
const FROM_HEAP: u64 = 0;
const FROM_MAP: u64 = 1;

pub(crate) struct CpuBackend {
    huge_pages: bool,
}

impl CpuBackend {
    pub(crate) fn new(huge_pages: bool) -> Self {
        CpuBackend { huge_pages }
    }

    fn heap_layout(bytes: usize) -> Result<Layout, BackendError> {
        Layout::from_size_align(bytes, ALIGN).map_err(|_| BackendError::OutOfMemory { bytes })
    }

    /// Length of the mapping that holds `bytes`.
    fn mapped_len(bytes: usize) -> Option<usize> {
        let granule = if bytes >= LARGE { LARGE } else { PAGE };
        bytes.checked_next_multiple_of(granule)
    }

    fn uses_map(bytes: usize, kind: MemoryKind) -> bool {
        bytes >= MAPPED || kind == MemoryKind::Pinned
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> DeviceInfo {
        let (total, free) = os::memory();
        DeviceInfo {
            id: DeviceId::CPU,
            kind: DeviceKind::Cpu,
            name: os::cpu_name(),
            total_memory: total,
            free_memory: (total > 0).then_some(free),
            host_addressable: true,
            supports_pinned: os::CAN_PIN,
            supports_unified: true,
            peer_capable: false,
        }
    }

    fn supports(&self, kind: MemoryKind) -> bool {
        match kind {
            MemoryKind::Device | MemoryKind::Unified => true,
            MemoryKind::Pinned => os::CAN_PIN,
        }
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError> {
        let bytes = bytes.max(1);
        if Self::uses_map(bytes, kind) {
            let len = Self::mapped_len(bytes).ok_or(BackendError::OutOfMemory { bytes })?;
            let ptr = os::map(len, self.huge_pages && len >= LARGE)?;
            if kind == MemoryKind::Pinned {
                // SAFETY: `ptr..ptr+len` is the mapping made just above, owned by nobody else.
                if let Err(e) = unsafe { os::lock(ptr, len) } {
                    // SAFETY: the mapping is ours and unused; it is discarded on this error path.
                    let _ = unsafe { os::unmap(ptr, len) };
                    return Err(e);
                }
            }
            return Ok(RawAllocation { handle: FROM_MAP, host: Some(ptr), bytes });
        }
        let layout = Self::heap_layout(bytes)?;
        // SAFETY: `layout` has a non-zero size (bytes >= 1).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(BackendError::OutOfMemory { bytes })?;
        Ok(RawAllocation { handle: FROM_HEAP, host: Some(ptr), bytes })
    }

    unsafe fn free(&self, allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        let Some(ptr) = allocation.host else {
            return Ok(());
        };
        match allocation.handle {
            FROM_MAP => {
                let len = Self::mapped_len(allocation.bytes)
                    .ok_or(BackendError::OutOfMemory { bytes: allocation.bytes })?;
                // SAFETY: the caller guarantees that the allocation came from `allocate`,
                // which mapped exactly `len` bytes at `ptr`, and that nothing uses it any more.
                unsafe { os::unmap(ptr, len) }
            }
            _ => {
                let layout = Self::heap_layout(allocation.bytes)?;
                // SAFETY: the allocation came from `alloc_zeroed` with this same layout
                // (`allocate` computes it from the same byte count) and is no longer used.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
                Ok(())
            }
        }
    }

    fn free_now(&self) -> Option<u64> {
        let (total, free) = os::memory();
        (total > 0).then_some(free)
    }
}

#[cfg(unix)]
mod os {
    use super::{BackendError, LARGE};
    use std::ptr::NonNull;

    pub(super) const CAN_PIN: bool = true;

    fn last_error(call: &'static str) -> BackendError {
        BackendError::Driver { call, message: std::io::Error::last_os_error().to_string() }
    }

    /// Maps `len` bytes of zeroed memory; `len` is a multiple of 2 MiB when `huge` is set.
    pub(super) fn map(len: usize, huge: bool) -> Result<NonNull<u8>, BackendError> {
        // Over-map by one huge page so that a 2 MiB aligned start can be cut out of it.
        let slack = if len >= LARGE { LARGE } else { 0 };
        let total = len.checked_add(slack).ok_or(BackendError::OutOfMemory { bytes: len })?;
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOMEM) => BackendError::OutOfMemory { bytes: len },
                _ => BackendError::Driver { call: "mmap", message: err.to_string() },
            });
        }
        let base = base as usize;
        let start = if slack == 0 { base } else { base.next_multiple_of(LARGE) };
        let head = start - base;
        let tail = total - head - len;
        // SAFETY: [base, base+head) and [start+len, base+total) lie inside the mapping made
        // above and outside the part we keep; unmapping them cannot touch other memory.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        if huge {
            // SAFETY: advice on our own mapping; failure only means no huge pages.
            unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        NonNull::new(start as *mut u8).ok_or_else(|| last_error("mmap"))
    }

    /// # Safety
    /// `ptr..ptr+len` is a mapping made by [`map`] that nothing uses any more.
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) -> Result<(), BackendError> {
        // SAFETY: guaranteed by the caller. Unmapping also drops any mlock on the range.
        match unsafe { libc::munmap(ptr.as_ptr().cast(), len) } {
            0 => Ok(()),
            _ => Err(last_error("munmap")),
        }
    }

    /// Locks the pages in memory. Over the lock limit (`RLIMIT_MEMLOCK`: `ENOMEM` past a
    /// non-zero limit, `EPERM` with a zero one) this is [`BackendError::LockLimit`], which the
    /// pool treats as out of memory: unlocking pooled pinned blocks may make room.
    ///
    /// # Safety
    /// `ptr..ptr+len` is a live mapping made by [`map`].
    pub(super) unsafe fn lock(ptr: NonNull<u8>, len: usize) -> Result<(), BackendError> {
        // SAFETY: guaranteed by the caller; mlock does not change the contents.
        if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOMEM | libc::EPERM) => {
                Err(BackendError::LockLimit { bytes: len, limit: lock_limit() })
            }
            Some(libc::EAGAIN) => Err(BackendError::OutOfMemory { bytes: len }),
            _ => Err(BackendError::Driver { call: "mlock", message: err.to_string() }),
        }
    }

    /// The soft lock limit in bytes (`u64::MAX` when unlimited or unknown).
    fn lock_limit() -> u64 {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `getrlimit` writes one `rlimit` through a valid pointer.
        match unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } {
            0 if limit.rlim_cur != libc::RLIM_INFINITY => limit.rlim_cur,
            _ => u64::MAX,
        }
    }

    /// Total and available host memory in bytes, from /proc/meminfo where it exists.
    pub(super) fn memory() -> (u64, u64) {
        let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
            return (0, 0);
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        (field("MemTotal:"), field("MemAvailable:"))
    }

    pub(super) fn cpu_name() -> String {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        });
        format!("{} ({threads} threads)", model.unwrap_or_else(|| std::env::consts::ARCH.into()))
    }
}

#[cfg(not(unix))]
mod os {
    //! Without mmap: large allocations come from the global allocator too, and pinning is
    //! unavailable.
    use super::BackendError;
    use std::ptr::NonNull;

    pub(super) const CAN_PIN: bool = false;

    pub(super) fn map(len: usize, _huge: bool) -> Result<NonNull<u8>, BackendError> {
        let layout = std::alloc::Layout::from_size_align(len, super::LARGE)
            .map_err(|_| BackendError::OutOfMemory { bytes: len })?;
        // SAFETY: `len` is non-zero (callers allocate at least one byte).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(ptr).ok_or(BackendError::OutOfMemory { bytes: len })
    }

    /// # Safety
    /// `ptr..ptr+len` came from [`map`] and nothing uses it any more.
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) -> Result<(), BackendError> {
        let layout = std::alloc::Layout::from_size_align(len, super::LARGE)
            .map_err(|_| BackendError::OutOfMemory { bytes: len })?;
        // SAFETY: guaranteed by the caller; `map` used this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        Ok(())
    }

    /// # Safety
    /// Never called: `CAN_PIN` is false.
    pub(super) unsafe fn lock(_ptr: NonNull<u8>, _len: usize) -> Result<(), BackendError> {
        Err(BackendError::Driver { call: "mlock", message: "not available".into() })
    }

    pub(super) fn memory() -> (u64, u64) {
        (0, 0)
    }

    pub(super) fn cpu_name() -> String {
        std::env::consts::ARCH.into()
    }
}
