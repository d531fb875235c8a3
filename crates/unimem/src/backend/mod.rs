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
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::device::{DeviceInfo, DeviceKind, MemoryKind};
use pending::Pending;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

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
) -> bool {
    found.extend(discovery.backends.iter().map(|b| Arc::clone(b) as Arc<dyn Backend>));
    notes.extend(discovery.note.as_ref().map(|note| format!("{label}: {note}")));
    true
}

/// The accelerator backends compiled in (of the kinds in `only`, where given), with every
/// device they found on this machine, and for each backend that found none (or had trouble,
/// or was asked for and is not compiled in) a line saying why.
pub(crate) fn accelerators(only: Option<&[DeviceKind]>) -> (Vec<Arc<dyn Backend>>, Vec<String>) {
    let wanted = |kind| only.is_none_or(|kinds| kinds.contains(&kind));
    #[allow(unused_mut, reason = "filled only when a device backend is compiled in")]
    let (mut found, mut notes): (Vec<Arc<dyn Backend>>, Vec<String>) = (Vec::new(), Vec::new());
    for (kind, feature) in
        [(DeviceKind::Cuda, "cuda"), (DeviceKind::OpenCl, "opencl"), (DeviceKind::Wgpu, "wgpu")]
    {
        if !wanted(kind) {
            continue;
        }
        let compiled = match kind {
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => add("CUDA", cuda::discover(), &mut found, &mut notes),
            #[cfg(feature = "opencl")]
            DeviceKind::OpenCl => add("OpenCL", opencl::discover(), &mut found, &mut notes),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => add("wgpu", wgpu::discover(), &mut found, &mut notes),
            _ => false,
        };
        if !compiled && only.is_some() {
            notes.push(format!("{}: not compiled in (cargo feature `{feature}`)", kind.name()));
        }
    }
    (found, notes)
}

/// The peer topology of a manager's devices (the CPU first): probes from the backends,
/// access switched through their queues.
pub(crate) struct Topology(pub Vec<Arc<dyn Backend>>);

impl crate::peer::PeerTopology for Topology {
    fn device_count(&self) -> usize {
        self.0.len()
    }

    fn probe(&self, device: usize, peer: usize) -> Result<(), crate::peer::NoPeerPath> {
        use crate::peer::NoPeerPath;
        let (a, b) = (&self.0[device], &self.0[peer]);
        let (ka, kb) = (a.info().kind, b.info().kind);
        if ka == DeviceKind::Cpu || kb == DeviceKind::Cpu {
            return Err(NoPeerPath::Cpu);
        }
        if ka != kb {
            return Err(NoPeerPath::DifferentBackends { device: ka, peer: kb });
        }
        if a.peer_access(b.as_ref()) {
            return Ok(());
        }
        let why = match ka {
            DeviceKind::Cuda => "cuDeviceCanAccessPeer reports no access".to_string(),
            DeviceKind::OpenCl => "the devices are in different OpenCL contexts (platforms)".to_string(),
            other => format!("{} reports no direct path", other.name()),
        };
        Err(NoPeerPath::NotCapable { why })
    }

    fn enable(&self, device: usize, peer: usize) -> crate::Result<()> {
        self.switch(device, peer, true)
    }

    fn disable(&self, device: usize, peer: usize) -> crate::Result<()> {
        self.switch(device, peer, false)
    }
}

impl Topology {
    fn switch(&self, device: usize, peer: usize, on: bool) -> crate::Result<()> {
        let (a, b) = (&self.0[device], self.0[peer].as_ref());
        let Some(queue) = a.work_queue() else { return Ok(()) };
        let switched = if on { queue.enable_peer_access(b) } else { queue.disable_peer_access(b) };
        let id = crate::DeviceId(u32::try_from(device).unwrap_or(u32::MAX));
        switched.map_err(crate::Error::on(id))
    }
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

/// A fence of one backend: a point in a device queue's work. It owns the driver's handle and
/// releases it when dropped, so every fence is released exactly once on every path.
pub(crate) trait DeviceFence: Any + Send + Sync {
    /// Blocks until the fence has completed.
    fn wait(&self) -> Result<(), BackendError>;

    /// Whether the fence has completed, without waiting.
    fn is_complete(&self) -> Result<bool, BackendError>;
}

/// A point in a device's queue of work, owned: completion means every operation enqueued
/// before it has finished with the memory it used.
pub(crate) struct Fence(Box<dyn DeviceFence>);

impl Fence {
    pub(crate) fn new(fence: impl DeviceFence) -> Self {
        Fence(Box::new(fence))
    }

    /// Blocks until the fence has completed.
    pub(crate) fn wait(&self) -> Result<(), BackendError> {
        self.0.wait()
    }

    /// Whether the fence has completed, without waiting.
    pub(crate) fn is_complete(&self) -> Result<bool, BackendError> {
        self.0.is_complete()
    }

    /// The backend's own fence type, for the backend that made it.
    pub(crate) fn downcast_ref<F: DeviceFence>(&self) -> Option<&F> {
        (self.0.as_ref() as &dyn Any).downcast_ref()
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fence")
    }
}

/// A device API: what every backend does. Backends with a queue of work (accelerators) add
/// [`Queue`] for completion and ordering.
pub(crate) trait Backend: Any + Send + Sync {
    /// The device this backend drives.
    fn info(&self) -> DeviceInfo;

    /// Whether memory of `kind` can be allocated on this device.
    fn supports(&self, kind: MemoryKind) -> bool;

    /// Allocates `bytes` (at least 1) of `kind` memory, aligned to at least 64 bytes. The
    /// contents are initialised (zeroed or left from earlier use by unimem), never undefined.
    ///
    /// # Errors
    /// The error contract every backend keeps: [`BackendError::TooLarge`] when the request
    /// never fits (no trim, no retry), [`BackendError::OutOfMemory`] or
    /// [`BackendError::LockLimit`] when it does not fit now (the pool trims and retries),
    /// [`BackendError::DeviceLost`] when the device is gone, and [`BackendError::Driver`]
    /// with the driver's code otherwise.
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError>;

    /// Frees an allocation, without waiting for the device.
    ///
    /// # Safety
    /// `allocation` came from `self.allocate(_, kind)` and no host reference still uses it.
    /// Where `free_is_ordered(kind)`, device work enqueued by unimem may still use it, and
    /// the backend orders the free after that work; otherwise the device's last use of it
    /// has completed (or could not be fenced because the device is broken).
    unsafe fn free(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError>;

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
        Err(host_only("write"))
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
        Err(host_only("read"))
    }

    /// Fills `bytes` of device memory from byte `offset` with `pattern` repeated, returning
    /// when done, or `Ok(false)` (nothing done) where the device cannot fill with a pattern
    /// of this size.
    ///
    /// # Safety
    /// As for `write`, with `offset + bytes <= allocation.bytes` and `bytes` a multiple of
    /// `pattern.len()`.
    unsafe fn fill(
        &self,
        _allocation: &RawAllocation,
        _offset: usize,
        _bytes: usize,
        _pattern: &[u8],
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Free memory now, for the user's query (`MemoryManager::free_memory`), or `None` where
    /// the driver cannot tell.
    fn free_now(&self) -> Option<u64> {
        None
    }

    /// The device's queue of work, for backends whose operations complete asynchronously.
    fn work_queue(&self) -> Option<&dyn Queue> {
        None
    }

    /// Whether this device reads and writes `peer`'s memory directly.
    fn peer_access(&self, _peer: &dyn Backend) -> bool {
        false
    }
}

impl dyn Backend {
    /// The concrete backend, for its own module's interop code.
    pub(crate) fn downcast_ref<B: Backend>(&self) -> Option<&B> {
        (self as &dyn Any).downcast_ref()
    }
}

fn host_only(call: &'static str) -> BackendError {
    BackendError::Driver { call, message: "this device has only host memory".into() }
}

/// Completion and ordering on a device's queue: fences, frees ordered after the device's
/// last use, a caller's work joined before unimem's, asynchronous transfers.
pub(crate) trait Queue: Send + Sync {
    /// A fence after every operation enqueued so far, taken when a block goes back to its
    /// pool so that the next user waits for the last one (soundness rule 2), or `None` where
    /// reuse of `kind` memory is queue-ordered without one.
    ///
    /// By default device memory is queue-ordered (every backend reaches it only through its
    /// one in-order queue or stream, which a caller's work is joined into before a block
    /// returns: CUDA's stream, OpenCL's in-order queue, wgpu's queue), and host-visible
    /// memory, which the host reaches directly, gets a fence from `record_fence`.
    fn fence_after_use(&self, kind: MemoryKind) -> Result<Option<Fence>, BackendError> {
        if kind == MemoryKind::Device {
            return Ok(None);
        }
        self.record_fence().map(Some)
    }

    /// A fence after every operation enqueued so far, for deferred frees (see
    /// `free_is_ordered`).
    fn record_fence(&self) -> Result<Fence, BackendError>;

    /// Whether `free` of `kind` memory orders itself after the device's last use of it
    /// (a stream-ordered free, or a driver that defers deletion itself). Where it does not,
    /// the pool frees such memory only once a fence from `record_fence`, taken when the
    /// memory was last given up, has completed: `Drop` never waits for a device.
    fn free_is_ordered(&self, _kind: MemoryKind) -> bool {
        true
    }

    /// Orders everything unimem enqueues on this device from now on after `fence`, the last
    /// use of a buffer by a caller's queue (recorded when its raw-access guard dropped).
    /// Enqueues the dependency; never waits.
    fn order_after(&self, fence: &Fence) -> Result<(), BackendError>;

    /// Makes host-visible memory (pinned, unified) safe to touch from the host after device
    /// work that may use it: waits for that work, and migrates managed memory to the host.
    fn before_host_access(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError>;

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

    /// Starts copying `src` into device memory at byte `offset`. `src` is copied into
    /// staging memory owned by the returned operation before this returns, so the caller's
    /// slice is free at once; the device memory is written in queue order (later transfers,
    /// fences and frees are ordered after it) whether or not anyone awaits the operation.
    ///
    /// # Safety
    /// As for [`Backend::write`].
    unsafe fn write_async(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: &[u8],
    ) -> Result<Pending, BackendError> {
        let staging = self.staging(src.len())?;
        // SAFETY: the staging holds at least `src.len()` bytes and no command uses it yet.
        unsafe { staging.as_ptr().copy_from_nonoverlapping(src.as_ptr(), src.len()) };
        // SAFETY: in bounds (the caller); the staging is owned by the completion taken next,
        // so it outlives the device's read whatever happens to the operation.
        unsafe { self.enqueue_write(allocation, offset, staging.as_ptr(), src.len()) }?;
        self.completion(Some(staging))
    }

    /// Starts copying `len` bytes of device memory from byte `offset` into staging memory
    /// owned by the operation, which the operation yields when done.
    ///
    /// # Safety
    /// As for [`Backend::write`], with `offset + len <= allocation.bytes`.
    unsafe fn read_async(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        len: usize,
    ) -> Result<Pending, BackendError> {
        let staging = self.staging(len)?;
        // SAFETY: as in `write_async`; the device writes `len` bytes of the staging.
        unsafe { self.enqueue_read(allocation, offset, staging.as_ptr(), len) }?;
        self.completion(Some(staging))
    }

    /// Host staging of at least `bytes` for `write_async` and `read_async`: plain host
    /// memory, or where asynchronous copies need it, page-locked memory.
    fn staging(&self, bytes: usize) -> Result<crate::host_lines::Staging, BackendError> {
        crate::host_lines::HostLines::zeroed(bytes).map(crate::host_lines::Staging::new)
    }

    /// Enables this device's direct access to `peer`'s memory.
    fn enable_peer_access(&self, _peer: &dyn Backend) -> Result<(), BackendError> {
        Ok(())
    }

    /// Disables this device's direct access to `peer`'s memory; disabling access that is
    /// not enabled is not an error.
    fn disable_peer_access(&self, _peer: &dyn Backend) -> Result<(), BackendError> {
        Ok(())
    }

    /// Enqueues a copy of `len` bytes from host memory at `src` into device memory at byte
    /// `offset`, and returns without waiting (the transfer engine's building block).
    ///
    /// # Safety
    /// `allocation` came from this backend's `allocate` and has no host pointer;
    /// `offset + len <= allocation.bytes`; `src..src + len` is host memory that stays
    /// allocated and unwritten until a [`completion`](Self::completion) or fence taken after
    /// this call has completed.
    unsafe fn enqueue_write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: *const u8,
        len: usize,
    ) -> Result<(), BackendError>;

    /// Enqueues a copy of `len` bytes of device memory from byte `offset` into host memory
    /// at `dst`, and returns without waiting.
    ///
    /// # Safety
    /// As for [`enqueue_write`](Self::enqueue_write), with `dst..dst + len` neither read nor
    /// written by anyone else until then.
    unsafe fn enqueue_read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), BackendError>;

    /// Enqueues a copy of `len` bytes between two device allocations of this backend, and
    /// returns without waiting.
    ///
    /// # Safety
    /// Both came from this backend's `allocate`, have no host pointer, the ranges are in
    /// bounds and do not overlap.
    unsafe fn enqueue_copy(
        &self,
        src: &RawAllocation,
        src_offset: usize,
        dst: &RawAllocation,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), BackendError>;

    /// Enqueues on this device's queue a direct copy of `len` bytes from `src`, device
    /// memory of `source`, into `dst` of this device, and returns without waiting; or
    /// `Ok(false)`, having done nothing, where the two devices have no direct path.
    ///
    /// The caller orders this queue after the source's last use first (`order_after` a
    /// fence of the source's queue) and the source's next use after this queue's copy.
    ///
    /// # Safety
    /// `src` came from `source.allocate`, `dst` from this backend's, neither has a host
    /// pointer, and both ranges are in bounds.
    unsafe fn enqueue_peer_copy(
        &self,
        _source: &dyn Backend,
        _src: &RawAllocation,
        _src_offset: usize,
        _dst: &RawAllocation,
        _dst_offset: usize,
        _len: usize,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// An operation that completes when everything enqueued on this queue so far has
    /// completed (submitting it to the device first), from a driver callback, never by
    /// polling. It owns `keep` (staging memory the enqueued commands use) until then, and
    /// yields it back.
    fn completion(&self, keep: Option<crate::host_lines::Staging>) -> Result<Pending, BackendError>;

    /// Free and total device memory, where the device reports them: memory-pressure
    /// decisions use them.
    fn free_and_total(&self) -> Option<(u64, u64)> {
        None
    }

    /// Returns memory the driver keeps cached for this device to the system (after the
    /// pools were trimmed).
    fn release_cached(&self) {}
}
