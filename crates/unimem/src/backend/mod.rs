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
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "opencl")]
pub(crate) mod opencl;
pub(crate) mod pending;

use crate::device::{DeviceInfo, MemoryKind};
use crate::host_lines::HostLines;
use pending::Pending;
use std::ptr::NonNull;
use std::sync::Arc;

/// A caller's stream or queue that was handed a buffer's memory, kept alive (shared or
/// retained) for as long as the buffer may have to order unimem's work after it.
pub(crate) enum Foreign {
    /// A CUDA stream of the buffer's context.
    #[cfg(feature = "cuda")]
    Cuda(Arc<cudarc::driver::CudaStream>),
    /// An OpenCL queue of the buffer's context.
    #[cfg(feature = "opencl")]
    OpenCl(opencl::RetainedQueue),
}

impl Foreign {
    /// Blocks until the work enqueued so far on the stream or queue has finished (on the
    /// reaper thread, never in `Drop`). Errors mean the stream is broken: nothing more runs.
    pub(crate) fn synchronize(&self) {
        match *self {
            #[cfg(feature = "cuda")]
            Foreign::Cuda(ref stream) => drop(stream.synchronize()),
            #[cfg(feature = "opencl")]
            Foreign::OpenCl(ref queue) => drop(opencl3::command_queue::finish(queue.handle() as usize as _)),
        }
    }

    /// The raw stream or queue, as the backend's `*_foreign` calls take it.
    pub(crate) fn handle(&self) -> u64 {
        match *self {
            #[cfg(feature = "cuda")]
            Foreign::Cuda(ref stream) => stream.cu_stream() as u64,
            #[cfg(feature = "opencl")]
            Foreign::OpenCl(ref queue) => queue.handle(),
        }
    }
}

/// What one device backend's discovery found: a backend per usable device, and a line
/// saying why there are none, or why some device could not be used.
pub(crate) struct Discovery<B> {
    pub backends: Vec<Arc<B>>,
    pub note: Option<String>,
}

impl<B> Discovery<B> {
    /// No devices, because of `reason`.
    pub(crate) fn none(reason: impl Into<String>) -> Self {
        Discovery { backends: Vec::new(), note: Some(reason.into()) }
    }

    /// The devices that could be used, with the problems met on the others; `empty` is
    /// the note when there are neither.
    pub(crate) fn found(backends: Vec<B>, problems: Vec<String>, empty: &str) -> Self {
        let note = match (backends.is_empty(), problems.is_empty()) {
            (_, false) => Some(problems.join("; ")),
            (true, true) => Some(empty.to_string()),
            (false, true) => None,
        };
        Discovery { backends: backends.into_iter().map(Arc::new).collect(), note }
    }
}

/// Adds one backend's discovery to the manager's device list and notes.
fn add<B: Backend>(
    label: &str,
    discovery: &Discovery<B>,
    found: &mut Vec<Arc<dyn Backend>>,
    notes: &mut Vec<String>,
) {
    found.extend(discovery.backends.iter().map(|b| Arc::clone(b) as Arc<dyn Backend>));
    notes.extend(discovery.note.as_ref().map(|note| format!("{label}: {note}")));
}

/// The accelerator backends compiled in, with every device they found on this machine, and
/// for each backend that found none (or had trouble) a line saying why.
pub(crate) fn accelerators() -> (Vec<Arc<dyn Backend>>, Vec<String>) {
    #[allow(unused_mut, reason = "filled only when a device backend is compiled in")]
    let (mut found, mut notes): (Vec<Arc<dyn Backend>>, Vec<String>) = (Vec::new(), Vec::new());
    #[cfg(feature = "cuda")]
    add("CUDA", cuda::discover(), &mut found, &mut notes);
    #[cfg(feature = "opencl")]
    add("OpenCL", opencl::discover(), &mut found, &mut notes);
    (found, notes)
}

/// Enables direct access between every pair of devices that offers it (`enable_p2p`), and
/// notes the pairs that failed.
pub(crate) fn enable_peer_access(_backends: &[Arc<dyn Backend>], _notes: &mut Vec<String>) {
    #[cfg(feature = "cuda")]
    for a in _backends.iter().filter_map(|b| b.cuda()) {
        for b in _backends.iter().filter_map(|b| b.cuda()) {
            if a.can_access_peer(b) {
                if let Err(e) = a.enable_peer_access(b) {
                    _notes.push(format!("CUDA: peer access {} -> {}: {e}", a.ordinal(), b.ordinal()));
                }
            }
        }
    }
}

/// Whether `a` accesses `b`'s memory directly.
pub(crate) fn peers(_a: &dyn Backend, _b: &dyn Backend) -> bool {
    #[cfg(feature = "cuda")]
    if let (Some(a), Some(b)) = (_a.cuda(), _b.cuda()) {
        return a.can_access_peer(b);
    }
    false
}

/// What a backend may report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The device (or the host, for host memory) has no memory left for the request now;
    /// freeing memory may help.
    #[error("the device is out of memory ({bytes} bytes requested)")]
    OutOfMemory {
        /// Bytes requested from the driver.
        bytes: usize,
    },
    /// Page-locked memory is over the operating system's lock limit (`RLIMIT_MEMLOCK`);
    /// unlocking memory (trimming the pinned pool) may help.
    #[error("mlock of {bytes} bytes refused: over the lock limit of {limit} bytes (RLIMIT_MEMLOCK)")]
    LockLimit {
        /// Bytes asked to lock.
        bytes: usize,
        /// The limit in bytes.
        limit: u64,
    },
    /// The request is larger than the device's largest single allocation: it never fits.
    #[error("{bytes} bytes exceed the device's largest allocation of {largest} bytes")]
    TooLarge {
        /// Bytes requested.
        bytes: usize,
        /// The largest single allocation.
        largest: u64,
    },
    /// The device is gone or its context is broken for good.
    #[error("device lost: {message}")]
    DeviceLost {
        /// What the driver said.
        message: String,
    },
    /// The driver or operating system failed.
    #[error("{call} failed: {message}")]
    Driver {
        /// The call that failed.
        call: &'static str,
        /// What the driver said, with its error code.
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

/// A point in a device's queue of work, owned: completion means every operation recorded
/// before it has finished with the memory it used. Dropping the fence releases the driver's
/// handle; nothing else can, so every fence is released exactly once on every path.
pub(crate) struct Fence {
    raw: u64,
    backend: Arc<dyn Backend>,
}

impl Fence {
    /// Takes ownership of `raw`, a fence handle that `backend` made.
    pub(crate) fn adopt(raw: u64, backend: Arc<dyn Backend>) -> Self {
        Fence { raw, backend }
    }

    /// Blocks until the fence has completed.
    pub(crate) fn wait(&self) -> Result<(), BackendError> {
        self.backend.wait(self.raw)
    }

    /// Whether the fence has completed, without waiting.
    pub(crate) fn is_complete(&self) -> Result<bool, BackendError> {
        self.backend.query(self.raw)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        // SAFETY: `raw` came from this backend and is owned by this fence alone, which is
        // dropped once.
        unsafe { self.backend.release_fence(self.raw) };
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({:#x})", self.raw)
    }
}

/// A device API.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The device this backend drives.
    fn info(&self) -> DeviceInfo;

    /// Whether memory of `kind` can be allocated on this device.
    fn supports(&self, kind: MemoryKind) -> bool;

    /// Allocates `bytes` (at least 1) of `kind` memory, aligned to at least 64 bytes. The
    /// contents are initialised (zeroed or left from earlier use by unimem), never undefined.
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError>;

    /// Frees an allocation, without waiting for the device.
    ///
    /// # Safety
    /// `allocation` came from `self.allocate(_, kind)` and no host reference still uses it.
    /// Where `free_is_ordered(kind)`, device work enqueued by unimem may still use it, and
    /// the backend orders the free after that work; otherwise the device's last use of it
    /// has completed (or could not be fenced because the device is broken).
    unsafe fn free(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError>;

    /// Blocks until the fence `raw` has completed; it stays owned by its [`Fence`].
    fn wait(&self, _raw: u64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether the fence `raw` has completed, without waiting.
    fn query(&self, raw: u64) -> Result<bool, BackendError> {
        self.wait(raw).map(|()| true)
    }

    /// Releases the fence `raw`.
    ///
    /// # Safety
    /// `raw` came from `fence_after_use` or `record_fence` of this backend and is released
    /// once: only [`Fence`]'s `Drop` calls this.
    unsafe fn release_fence(&self, _raw: u64) {}

    /// A fence after every operation enqueued so far, taken when a block goes back to its
    /// pool so that the next user waits for the last one (soundness rule 2), or `None` where
    /// reuse is ordered without one. Only called when `needs_fences` is true.
    fn fence_after_use(&self, _kind: MemoryKind) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    /// Whether `free` of `kind` memory orders itself after the device's last use of it
    /// (a stream-ordered free, or a driver that defers deletion itself). Where it does not,
    /// the pool frees such memory only once a fence from `record_fence`, taken when the
    /// memory was last given up, has completed: `Drop` never waits for a device.
    fn free_is_ordered(&self, _kind: MemoryKind) -> bool {
        true
    }

    /// A fence after every operation enqueued so far, for deferred frees (see
    /// `free_is_ordered`).
    fn record_fence(&self) -> Result<u64, BackendError> {
        Err(BackendError::Driver { call: "record_fence", message: "this device has no queue".into() })
    }

    /// Makes host-visible memory (pinned, unified) safe to touch from the host after device
    /// work that may use it: waits for that work, and migrates managed memory to the host.
    fn before_host_access(&self, _allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        Ok(())
    }

    /// Prepares memory for a user's kernels (migrates managed memory to the device).
    fn before_device_access(
        &self,
        _allocation: &RawAllocation,
        _kind: MemoryKind,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Gives memory that a user's kernels held back to the host without waiting (the buffer
    /// is being dropped after `before_device_access`): the block's fence, taken next,
    /// orders its next user after this.
    fn return_to_host(&self, _allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        Ok(())
    }

    /// Orders everything unimem enqueues on this device from now on after everything
    /// enqueued so far on `foreign`, a caller's stream or queue that was handed the memory
    /// of a buffer. Enqueues the dependency; never waits.
    fn after_foreign(&self, _foreign: u64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Orders everything enqueued on `foreign` from now on after everything unimem has
    /// enqueued on this device so far (copies, zeroing, migrations). Never waits.
    fn foreign_after_ours(&self, _foreign: u64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Free and total device memory, where the device reports them: memory-pressure
    /// decisions use them.
    fn free_memory(&self) -> Option<(u64, u64)> {
        None
    }

    /// Free memory now, for the user's query (`MemoryManager::free_memory`), or `None` where
    /// the driver cannot tell.
    fn free_now(&self) -> Option<u64> {
        self.free_memory().map(|(free, _)| free)
    }

    /// Returns memory the driver keeps cached for this device to the system (after the
    /// pools were trimmed).
    fn release_cached(&self) {}

    /// Whether `fence_after_use` can return a fence (checked once per pool, so that host
    /// pools pay nothing on their hit path).
    fn needs_fences(&self) -> bool {
        false
    }

    /// Copies `src` into device memory at byte `offset`, returning when done.
    ///
    /// # Safety
    /// `allocation` came from `self.allocate`, has no host pointer, and
    /// `offset + src.len() <= allocation.bytes`.
    unsafe fn write(
        &self,
        _allocation: &RawAllocation,
        _offset: usize,
        _src: &[u8],
    ) -> Result<(), BackendError> {
        Err(BackendError::Driver { call: "write", message: "this device has only host memory".into() })
    }

    /// Copies device memory from byte `offset` into `dst`, returning when done.
    ///
    /// # Safety
    /// As for `write`, with `dst`.
    unsafe fn read(
        &self,
        _allocation: &RawAllocation,
        _offset: usize,
        _dst: &mut [u8],
    ) -> Result<(), BackendError> {
        Err(BackendError::Driver { call: "read", message: "this device has only host memory".into() })
    }

    /// Starts copying `src` into device memory at byte `offset`. `src` is copied into
    /// staging memory owned by the returned operation before this returns, so the caller's
    /// slice is free at once; the device memory is written in queue order (later transfers,
    /// fences and frees are ordered after it) whether or not anyone awaits the operation.
    ///
    /// # Safety
    /// As for `write`.
    unsafe fn write_async(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: &[u8],
    ) -> Result<Pending, BackendError> {
        // SAFETY: forwarded from the caller.
        let outcome = unsafe { self.write(allocation, offset, src) };
        Ok(Pending::ready(None, outcome))
    }

    /// Starts copying `len` bytes of device memory from byte `offset` into staging memory
    /// owned by the operation, which the operation yields when done.
    ///
    /// # Safety
    /// As for `write`, with `offset + len <= allocation.bytes`.
    unsafe fn read_async(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        len: usize,
    ) -> Result<Pending, BackendError> {
        let mut lines = HostLines::zeroed(len)?;
        // SAFETY: forwarded from the caller.
        let outcome = unsafe { self.read(allocation, offset, lines.bytes_mut(len)) };
        Ok(Pending::ready(Some(lines), outcome))
    }

    /// Copies `bytes` between two device allocations of this backend, returning when done.
    ///
    /// # Safety
    /// Both came from `self.allocate`, have no host pointer, the ranges are in bounds, and
    /// they do not overlap.
    unsafe fn copy(
        &self,
        _src: &RawAllocation,
        _dst: &RawAllocation,
        _bytes: usize,
    ) -> Result<(), BackendError> {
        Err(BackendError::Driver { call: "copy", message: "this device has only host memory".into() })
    }

    /// Copies `bytes` from `src`, an allocation of the device `source`, straight into `dst`
    /// of this device, returning `Ok(false)` when the two devices have no direct path.
    ///
    /// # Safety
    /// `src` came from `source.allocate`, `dst` from `self.allocate`, neither has a host
    /// pointer, and both are at least `bytes` long.
    unsafe fn copy_from_peer(
        &self,
        _source: &dyn Backend,
        _src: &RawAllocation,
        _dst: &RawAllocation,
        _bytes: usize,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// The device handles a user needs to run kernels on this device's memory.
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Option<&cuda::CudaBackend> {
        None
    }

    /// The device handles a user needs to run kernels on this device's memory.
    #[cfg(feature = "opencl")]
    fn opencl(&self) -> Option<&opencl::OpenClBackend> {
        None
    }
}
