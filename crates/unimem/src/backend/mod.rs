//! The backend layer: one implementation per device API, behind one object-safe trait.
//!
//! Backends execute; they do not validate. The safe layer ([`MemoryManager`],
//! [`Buffer`]) checks every length, offset, device and mode before it calls a backend, so a
//! backend reports only what nobody could foresee: out of memory, a lost device, a driver
//! error.
//!
//! [`MemoryManager`]: crate::MemoryManager
//! [`Buffer`]: crate::Buffer

pub(crate) mod cpu;

use crate::device::{DeviceInfo, MemoryKind};
use std::ptr::NonNull;

/// What a backend may report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The device (or the host, for host memory) has no memory left for the request.
    #[error("the device is out of memory ({bytes} bytes requested)")]
    OutOfMemory {
        /// Bytes requested from the driver.
        bytes: usize,
    },
    /// The driver or operating system failed.
    #[error("{call} failed: {message}")]
    Driver {
        /// The call that failed.
        call: &'static str,
        /// What the driver said.
        message: String,
    },
}

/// One allocation as a backend hands it out.
///
/// `handle` is the backend's own name for the memory (an mmap base, a `CUdeviceptr`, an
/// index into a table of `cl_mem` objects); `host` is set when the host can address the
/// memory directly.
#[derive(Debug)]
pub(crate) struct RawAllocation {
    pub handle: u64,
    pub host: Option<NonNull<u8>>,
    pub bytes: usize,
}

// SAFETY: a RawAllocation is an owning description of memory, not a borrow: the memory it
// names is used only through the Buffer or pool that owns the allocation, which provide the
// synchronisation (&/&mut, pool locks). Moving that description between threads is sound.
unsafe impl Send for RawAllocation {}
// SAFETY: shared references to a RawAllocation only read its plain fields.
unsafe impl Sync for RawAllocation {}

/// A point in a device's queue of work. Completion means every operation recorded before it
/// has finished with the memory it used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fence(pub u64);

/// A device API.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The device this backend drives.
    fn info(&self) -> DeviceInfo;

    /// Whether memory of `kind` can be allocated on this device.
    fn supports(&self, kind: MemoryKind) -> bool;

    /// Allocates `bytes` (at least 1) of `kind` memory, aligned to at least 64 bytes. The
    /// contents are initialised (zeroed or left from earlier use by unimem), never undefined.
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError>;

    /// Frees an allocation.
    ///
    /// # Safety
    /// `allocation` came from `self.allocate` and no device operation or host reference
    /// still uses it.
    unsafe fn free(&self, allocation: &RawAllocation) -> Result<(), BackendError>;

    /// Blocks until `fence` has completed.
    fn wait(&self, fence: Fence) -> Result<(), BackendError>;
}
