//! The CUDA backend (cargo feature `cuda`), on `cudarc`'s driver API with the driver library
//! opened at run time. A machine without `libcuda.so`, or with a driver and no device, has no
//! CUDA devices and says why; the library's presence is probed before any call into it.
//!
//! Each device has its retained primary context and one non-blocking stream, bound
//! explicitly before every driver call (nothing relies on a thread's current context).
//!
//! Memory kinds:
//! - `Device`: stream-ordered allocations (`cuMemAllocFromPoolAsync`) from the device's
//!   memory pool, whose release threshold is raised so that freed memory stays with the
//!   pool across synchronisations; `cuMemAlloc` where the device has no memory pools.
//!   Reuse is stream-ordered: every operation unimem runs, and every kernel a user enqueues
//!   on [`CudaBackend::stream`], is ordered after the previous user's, so a pooled device
//!   block needs no fence. Work on a caller's own stream (`Buffer::cuda_ptr` with another
//!   stream) is recorded as an event when the raw-access guard drops, and unimem's stream
//!   waits for it (`cuStreamWaitEvent`) before unimem next uses the memory or the block
//!   goes back to its pool: reuse across streams waits on the device, never on the host.
//! - `Pinned`: page-locked host memory (`cuMemHostAlloc`, portable and mapped, not
//!   write-combined: host reads of write-combined memory are slow).
//! - `Unified`: managed memory (`cuMemAllocManaged`), prefetched to the device before a
//!   user's kernels get its pointer and to the host before host access, where the device
//!   supports concurrent managed access.
//!
//! Host-visible blocks returned to a pool carry an event recorded on the stream; their next
//! user waits for it. Frees of pinned and managed memory (and of device memory where there
//! are no memory pools) are not stream-ordered, so the pool frees such blocks only once an
//! event recorded at their last use has completed (`cuEventQuery`), never by waiting.
//! Asynchronous copies go through page-locked staging chunks (cached per device) that the
//! operation owns, and complete from a stream callback (`cuStreamAddCallback`, which the
//! driver still calls, with the error, after a sticky context error), never by polling.
//! Sticky errors are `DeviceLost`.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};

mod interop;

pub use interop::CudaAccess;

use super::pending::{Pending, Signal, leak_staging};
use super::{Backend, BackendError, DeviceFence, Fence, Queue, RawAllocation};
use crate::device::{DeviceId, DeviceInfo, DeviceKind, MemoryKind};
use crate::host_lines::{Staging, StagingHome};

type Discovery = super::Discovery<CudaBackend>;

/// Probes the driver and enumerates every device, once per process.
pub(crate) fn discover() -> &'static Discovery {
    static FOUND: OnceLock<Discovery> = OnceLock::new();
    FOUND.get_or_init(enumerate)
}

fn enumerate() -> Discovery {
    // SAFETY: only tries to open the library; nothing in it is called. cudarc panics on the
    // first driver call when the library is missing, so this check comes first.
    if !unsafe { sys::is_culib_present() } {
        return Discovery::none("no CUDA driver library (libcuda.so) found");
    }
    if let Err(e) = result::init() {
        return Discovery::none(format!("cuInit failed: {}", name(e)));
    }
    let count = match result::device::get_count() {
        Ok(0) => return Discovery::none("the CUDA driver reports no devices"),
        Ok(n) => n,
        Err(e) => return Discovery::none(format!("cuDeviceGetCount failed: {}", name(e))),
    };
    let mut backends = Vec::new();
    let mut problems = Vec::new();
    for ordinal in 0..count {
        match CudaBackend::new(ordinal) {
            Ok(backend) => backends.push(backend),
            Err(e) => problems.push(format!("device {ordinal}: {e}")),
        }
    }
    let devices: Vec<sys::CUdevice> = backends.iter().map(|b| b.device).collect();
    for backend in &mut backends {
        backend.peers =
            devices.iter().copied().filter(|&other| can_access_peer(backend.device, other)).collect();
    }
    Discovery::found(backends, problems, "no CUDA device could be used")
}

/// The error's name, without calling the driver (`cuGetErrorString` may be missing from a
/// partial driver, and cudarc panics on a missing symbol).
fn name(e: DriverError) -> String {
    format!("{:?}", e.0)
}

fn driver(call: &'static str, e: DriverError) -> BackendError {
    use sys::CUresult as R;
    match e.0 {
        R::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory { bytes: 0 },
        // Sticky errors: the context is unusable until the process ends.
        R::CUDA_ERROR_ILLEGAL_ADDRESS
        | R::CUDA_ERROR_LAUNCH_FAILED
        | R::CUDA_ERROR_HARDWARE_STACK_ERROR
        | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | R::CUDA_ERROR_MISALIGNED_ADDRESS
        | R::CUDA_ERROR_INVALID_ADDRESS_SPACE
        | R::CUDA_ERROR_INVALID_PC
        | R::CUDA_ERROR_ECC_UNCORRECTABLE
        | R::CUDA_ERROR_DEVICE_UNAVAILABLE
        | R::CUDA_ERROR_CONTEXT_IS_DESTROYED => {
            BackendError::DeviceLost { message: format!("{call}: {}", name(e)) }
        }
        _ => BackendError::Driver { call, message: name(e) },
    }
}

fn allocation_error(call: &'static str, e: DriverError, bytes: usize) -> BackendError {
    match driver(call, e) {
        BackendError::OutOfMemory { .. } => BackendError::OutOfMemory { bytes },
        other => other,
    }
}

fn can_access_peer(device: sys::CUdevice, peer: sys::CUdevice) -> bool {
    if device == peer {
        return false;
    }
    let mut can = 0;
    // SAFETY: two valid device handles and an out-parameter.
    let probed = unsafe { sys::cuDeviceCanAccessPeer(&raw mut can, device, peer) }.result();
    probed.is_ok() && can != 0
}

/// Smallest page-locked staging chunk; chunks are powers of two from here.
const MIN_STAGING: usize = 64 << 10;
/// Idle staging kept cached at most; more is freed at the next staging request.
const MAX_IDLE_STAGING: usize = 256 << 20;

/// Page-locked staging chunks not in use, by address and size. Asynchronous copies stage
/// through page-locked memory: from pageable memory the driver would copy synchronously (or
/// wait for the stream), which defeats the future. Chunks come back here from `Staging`'s
/// drop, which may run in a stream callback, so giving back only records the chunk.
#[derive(Default)]
struct PinnedStash(Mutex<Vec<(usize, usize)>>);

impl StagingHome for PinnedStash {
    fn take_back(&self, start: NonNull<u8>, bytes: usize) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push((start.as_ptr() as usize, bytes));
    }
}

/// An event recorded on a stream: the fence of CUDA devices. Destroyed when dropped (the
/// driver frees it once it has completed).
struct Event {
    event: sys::CUevent,
    context: sys::CUcontext,
}

// SAFETY: an event handle may be used and destroyed from any thread once its context is
// bound, which every use does first.
unsafe impl Send for Event {}
// SAFETY: as for Send; `&Event` only queries and waits.
unsafe impl Sync for Event {}

impl Event {
    /// An event after everything enqueued so far on `stream`, a stream of `context`.
    fn record(context: sys::CUcontext, stream: sys::CUstream) -> Result<Self, BackendError> {
        // SAFETY: a live context (retained by its backend, or by the caller's `CudaContext`).
        unsafe { result::ctx::set_current(context) }.map_err(|e| driver("cuCtxSetCurrent", e))?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| driver("cuEventCreate", e))?;
        let event = Event { event, context };
        // SAFETY: a new event recorded on a live stream of the bound context.
        unsafe { result::event::record(event.event, stream) }.map_err(|e| driver("cuEventRecord", e))?;
        Ok(event)
    }

    fn bind(&self) -> Result<(), BackendError> {
        // SAFETY: the event's context, alive while the event is (see `record`).
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| driver("cuCtxSetCurrent", e))
    }
}

impl DeviceFence for Event {
    fn wait(&self) -> Result<(), BackendError> {
        self.bind()?;
        // SAFETY: our event.
        unsafe { result::event::synchronize(self.event) }.map_err(|e| driver("cuEventSynchronize", e))
    }

    fn is_complete(&self) -> Result<bool, BackendError> {
        self.bind()?;
        // SAFETY: our event.
        match unsafe { sys::cuEventQuery(self.event) }.result() {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver("cuEventQuery", e)),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: our event, destroyed once; the driver frees it after it completes.
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}

/// A caller's stream that no event could be recorded on: completion is the end of
/// everything enqueued on it (synchronised on the reaper thread, never in `Drop`).
struct Drained(Arc<CudaStream>);

impl DeviceFence for Drained {
    fn wait(&self) -> Result<(), BackendError> {
        // SAFETY: the stream's context, kept alive by the stream.
        unsafe { result::ctx::set_current(self.0.context().cu_ctx()) }
            .map_err(|e| driver("cuCtxSetCurrent", e))?;
        // SAFETY: a live stream (the `Arc` keeps it).
        unsafe { result::stream::synchronize(self.0.cu_stream()) }
            .map_err(|e| driver("cuStreamSynchronize", e))
    }

    fn is_complete(&self) -> Result<bool, BackendError> {
        Ok(false)
    }
}

/// One CUDA device: its primary context and unimem's stream on it.
pub struct CudaBackend {
    ordinal: i32,
    device: sys::CUdevice,
    /// The primary context, as cudarc holds it (retained until the last clone is dropped).
    cuda_context: Arc<CudaContext>,
    /// Unimem's stream, as cudarc holds it (destroyed with the last clone).
    cuda_stream: Arc<CudaStream>,
    context: sys::CUcontext,
    stream: sys::CUstream,
    /// The device's default memory pool, where it supports stream-ordered allocation.
    pool: Option<sys::CUmemoryPool>,
    name: String,
    total_memory: u64,
    managed: bool,
    concurrent_managed: bool,
    /// The devices whose memory this one can access directly.
    peers: Vec<sys::CUdevice>,
    stash: Arc<PinnedStash>,
}

// SAFETY: the handles are the driver's, valid on every thread; every call binds the context
// first, and the driver synchronises its own objects.
unsafe impl Send for CudaBackend {}
// SAFETY: as for Send; `&CudaBackend` only issues driver calls, which are thread-safe.
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    fn new(ordinal: i32) -> Result<Self, BackendError> {
        let index = usize::try_from(ordinal).unwrap_or_default();
        // The primary context, retained, and a non-blocking stream on it.
        let cuda_context = CudaContext::new(index).map_err(|e| driver("cuDevicePrimaryCtxRetain", e))?;
        let cuda_stream = cuda_context.new_stream().map_err(|e| driver("cuStreamCreate", e))?;
        let device = cuda_context.cu_device();
        let mut backend = CudaBackend {
            ordinal,
            device,
            context: cuda_context.cu_ctx(),
            stream: cuda_stream.cu_stream(),
            cuda_context,
            cuda_stream,
            pool: None,
            name: String::new(),
            total_memory: 0,
            managed: false,
            concurrent_managed: false,
            peers: Vec::new(),
            stash: Arc::default(),
        };
        backend.bind()?;
        backend.name = result::device::get_name(device).map_err(|e| driver("cuDeviceGetName", e))?;
        // SAFETY: a valid device.
        let total =
            unsafe { result::device::total_mem(device) }.map_err(|e| driver("cuDeviceTotalMem", e))?;
        backend.total_memory = total as u64;
        let attribute = |a| {
            // SAFETY: a valid device and attribute.
            unsafe { result::device::get_attribute(device, a) }.is_ok_and(|v| v != 0)
        };
        use sys::CUdevice_attribute as A;
        backend.managed = attribute(A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY);
        backend.concurrent_managed = attribute(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS);
        if attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED) {
            backend.pool = backend.default_pool();
        }
        Ok(backend)
    }

    /// The device's default memory pool, told to keep freed memory (release threshold:
    /// unlimited) instead of returning it to the driver at every synchronisation.
    fn default_pool(&self) -> Option<sys::CUmemoryPool> {
        // SAFETY: a valid device.
        let pool = unsafe { result::device::get_default_mem_pool(self.device) }.ok()?;
        let mut threshold = u64::MAX;
        // SAFETY: the release threshold attribute takes a `u64`, passed by pointer.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut threshold).cast(),
            )
        }
        .ok()?;
        Some(pool)
    }

    /// Makes this device's context current on the calling thread.
    fn bind(&self) -> Result<(), BackendError> {
        // SAFETY: the context is retained for the backend's life.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| driver("cuCtxSetCurrent", e))
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        // SAFETY: our stream, alive for the backend's life.
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| driver("cuStreamSynchronize", e))
    }

    /// The device ordinal (as in `cuDeviceGet`).
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The device's primary context, as cudarc's `CudaContext` (the one
    /// `CudaContext::new(ordinal)` gives): load modules and make streams of your own here.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.cuda_context
    }

    /// The stream unimem orders all its work on. Kernels launched here on unimem memory are
    /// ordered with unimem's transfers and pooled reuse without any joining.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.cuda_stream
    }

    /// Free and total device memory, from `cuMemGetInfo`.
    pub fn memory_info(&self) -> Result<(u64, u64), BackendError> {
        self.bind()?;
        let (free, total) = result::mem_get_info().map_err(|e| driver("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    /// Whether this device can access the memory of `other` directly (`cuDeviceCanAccessPeer`).
    pub fn can_access_peer(&self, other: &CudaBackend) -> bool {
        self.peers.contains(&other.device)
    }

    /// Enables this device's access to `other`'s memory (`cuCtxEnablePeerAccess`); enabling
    /// twice is not an error.
    pub fn enable_peer_access(&self, other: &CudaBackend) -> Result<(), BackendError> {
        self.bind()?;
        // SAFETY: a valid peer context; flags must be 0.
        match unsafe { sys::cuCtxEnablePeerAccess(other.context, 0) }.result() {
            Ok(()) => Ok(()),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            Err(e) => Err(driver("cuCtxEnablePeerAccess", e)),
        }
    }

    /// Disables this device's access to `other`'s memory (`cuCtxDisablePeerAccess`);
    /// disabling access that is not enabled is not an error.
    pub fn disable_peer_access(&self, other: &CudaBackend) -> Result<(), BackendError> {
        self.bind()?;
        // SAFETY: a valid peer context (retained by `other` for its life).
        match unsafe { sys::cuCtxDisablePeerAccess(other.context) }.result() {
            Ok(()) => Ok(()),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_PEER_ACCESS_NOT_ENABLED => Ok(()),
            Err(e) => Err(driver("cuCtxDisablePeerAccess", e)),
        }
    }

    /// Prefetches managed memory to `location` on the stream, where the device supports it.
    fn prefetch(&self, allocation: &RawAllocation, to_host: bool) -> Result<(), BackendError> {
        if !self.concurrent_managed {
            return Ok(());
        }
        let location = sys::CUmemLocation {
            type_: if to_host {
                sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST
            } else {
                sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
            },
            id: if to_host { 0 } else { self.ordinal },
        };
        // SAFETY: a managed allocation of ours, whole, on our stream.
        unsafe { result::mem_prefetch_async(allocation.handle, allocation.bytes, location, self.stream) }
            .map_err(|e| driver("cuMemPrefetchAsync", e))
    }

    /// Orders `later` after everything enqueued so far on `earlier`: an event recorded on
    /// one and waited for by the other (`cuStreamWaitEvent`). Nothing waits on the host.
    fn order_streams(&self, earlier: sys::CUstream, later: sys::CUstream) -> Result<(), BackendError> {
        let event = Event::record(self.context, earlier)?;
        Self::wait_for(later, &event)
    }

    /// Enqueues on `stream` a wait for `event` (`cuStreamWaitEvent`); the wait keeps what it
    /// needs of the event, which may be destroyed at once.
    fn wait_for(stream: sys::CUstream, event: &Event) -> Result<(), BackendError> {
        event.bind()?;
        // SAFETY: a live stream of the bound context and a live event.
        unsafe {
            result::stream::wait_event(stream, event.event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        }
        .map_err(|e| driver("cuStreamWaitEvent", e))
    }

    /// An operation that completes when the stream reaches this point, owning `staging`
    /// until then: a stream callback (`cuStreamAddCallback`), which, unlike a host function,
    /// the driver still calls after a sticky context error, with the error: a future never
    /// waits forever. The context must be bound.
    fn complete_on_stream(&self, staging: Option<Staging>) -> Result<Pending, BackendError> {
        let (pending, signal) = Pending::new(staging);
        let user_data = signal.into_raw();
        // SAFETY: the callback runs once, after the work enqueued before it, and takes the
        // signal back; flags must be 0.
        match unsafe { sys::cuStreamAddCallback(self.stream, Some(on_stream_reached), user_data, 0) }.result()
        {
            Ok(()) => Ok(pending),
            Err(e) => {
                // SAFETY: the call failed, so the callback never runs: the signal is ours.
                let signal = unsafe { Signal::from_raw(user_data) };
                // Without it, wait here: the staging memory must outlive the copy. If even
                // that fails, nobody knows when the copy ends: the staging memory is leaked.
                match self.synchronize() {
                    Ok(()) => signal.complete(Err(driver("cuStreamAddCallback", e))),
                    Err(waited) => signal.complete_leaking_staging(Err(waited)),
                }
                Ok(pending)
            }
        }
    }
}

/// Runs on a driver thread once the stream reaches it (or fails): completes the operation.
/// It calls no CUDA function (stream callbacks must not).
unsafe extern "C" fn on_stream_reached(
    _stream: sys::CUstream,
    status: sys::CUresult,
    user_data: *mut c_void,
) {
    // SAFETY: `user_data` is the signal leaked for this one callback in `complete_on_stream`.
    let signal = unsafe { Signal::from_raw(user_data) };
    signal.complete(status.result().map_err(|e| driver("CUDA copy", e)));
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.bind().is_ok() && self.synchronize().is_ok() {
            let idle = std::mem::take(&mut *self.stash.0.lock().unwrap_or_else(PoisonError::into_inner));
            for (start, _) in idle {
                // SAFETY: idle chunks from `cuMemHostAlloc`; the stream is drained.
                let _ = unsafe { result::free_host(start as *mut c_void) };
            }
        }
        // The stream and the context go with their last cudarc handle.
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: DeviceId::CPU, // set by the manager
            kind: DeviceKind::Cuda,
            name: self.name.clone(),
            total_memory: self.total_memory,
            free_memory: self.memory_info().ok().map(|(free, _)| free),
            host_addressable: false,
            supports_pinned: true,
            supports_unified: self.managed,
            peer_capable: !self.peers.is_empty(),
        }
    }

    fn supports(&self, kind: MemoryKind) -> bool {
        match kind {
            MemoryKind::Device | MemoryKind::Pinned => true,
            MemoryKind::Unified => self.managed,
        }
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError> {
        let bytes = bytes.max(1);
        self.bind()?;
        match kind {
            MemoryKind::Device => {
                // SAFETY: a pool of this device (or none) and our stream; the memory is
                // zeroed on the stream before any later use.
                let ptr = unsafe {
                    match self.pool {
                        Some(pool) => result::mem_pool::alloc_async(pool, bytes, self.stream)
                            .map_err(|e| allocation_error("cuMemAllocFromPoolAsync", e, bytes))?,
                        None => result::malloc_sync(bytes)
                            .map_err(|e| allocation_error("cuMemAlloc", e, bytes))?,
                    }
                };
                let allocation = RawAllocation { handle: ptr, host: None, bytes };
                // SAFETY: the allocation just made, whole.
                if let Err(e) = unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream) } {
                    // SAFETY: ours, and nothing is enqueued on it (the memset was refused).
                    let _ = unsafe { self.free(&allocation, MemoryKind::Device) };
                    return Err(driver("cuMemsetD8Async", e));
                }
                Ok(allocation)
            }
            MemoryKind::Pinned => {
                let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
                // SAFETY: a plain page-locked allocation.
                let ptr = unsafe { result::malloc_host(bytes, flags) }
                    .map_err(|e| allocation_error("cuMemHostAlloc", e, bytes))?;
                let host = NonNull::new(ptr.cast::<u8>()).ok_or(BackendError::OutOfMemory { bytes })?;
                // SAFETY: `bytes` of host memory just allocated, used by nobody.
                unsafe { host.as_ptr().write_bytes(0, bytes) };
                Ok(RawAllocation { handle: host.as_ptr() as u64, host: Some(host), bytes })
            }
            MemoryKind::Unified => {
                // SAFETY: a plain managed allocation, attached to every stream.
                let ptr =
                    unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
                        .map_err(|e| allocation_error("cuMemAllocManaged", e, bytes))?;
                let host = NonNull::new(ptr as *mut u8).ok_or(BackendError::OutOfMemory { bytes })?;
                // SAFETY: managed memory is host-accessible; nothing on the device uses it yet.
                unsafe { host.as_ptr().write_bytes(0, bytes) };
                Ok(RawAllocation { handle: ptr, host: Some(host), bytes })
            }
        }
    }

    unsafe fn free(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        self.bind()?;
        match (kind, self.pool) {
            // Stream-ordered: freed after the last use enqueued on the stream.
            // SAFETY: the caller guarantees nothing else uses the memory.
            (MemoryKind::Device, Some(_)) => unsafe { result::free_async(allocation.handle, self.stream) }
                .map_err(|e| driver("cuMemFreeAsync", e)),
            // The pool calls these once the block's fence has completed (`free_is_ordered`).
            (MemoryKind::Device, None) => {
                // SAFETY: as above; the memory's last use has completed.
                unsafe { result::free_sync(allocation.handle) }.map_err(|e| driver("cuMemFree", e))
            }
            (MemoryKind::Pinned, _) => {
                // SAFETY: page-locked memory from `cuMemHostAlloc`, its last use completed.
                unsafe { result::free_host(allocation.handle as *mut c_void) }
                    .map_err(|e| driver("cuMemFreeHost", e))
            }
            (MemoryKind::Unified, _) => {
                // SAFETY: managed memory from `cuMemAllocManaged`, its last use completed.
                unsafe { result::memory_free(allocation.handle) }.map_err(|e| driver("cuMemFree", e))
            }
        }
    }

    unsafe fn write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: &[u8],
    ) -> Result<(), BackendError> {
        self.bind()?;
        // SAFETY: the caller guarantees the range is in bounds; the stream is synchronised
        // before `src` is given back.
        unsafe { result::memcpy_htod_async(allocation.handle + offset as u64, src, self.stream) }
            .map_err(|e| driver("cuMemcpyHtoDAsync", e))?;
        self.synchronize()
    }

    unsafe fn read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        self.bind()?;
        // SAFETY: as in `write`, with `dst`.
        unsafe { result::memcpy_dtoh_async(dst, allocation.handle + offset as u64, self.stream) }
            .map_err(|e| driver("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }

    unsafe fn fill(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        bytes: usize,
        pattern: &[u8],
    ) -> Result<bool, BackendError> {
        let at = allocation.handle + offset as u64;
        self.bind()?;
        if pattern.iter().all(|&b| b == pattern[0]) {
            // SAFETY: in bounds (the caller), on our stream.
            unsafe { result::memset_d8_async(at, pattern[0], bytes, self.stream) }
                .map_err(|e| driver("cuMemsetD8Async", e))?;
        } else if let Ok(&word) = <&[u8; 4]>::try_from(pattern) {
            // SAFETY: in bounds, 4-byte aligned (4-byte elements of a 256-aligned allocation),
            // on our stream.
            unsafe { sys::cuMemsetD32Async(at, u32::from_ne_bytes(word), bytes / 4, self.stream) }
                .result()
                .map_err(|e| driver("cuMemsetD32Async", e))?;
        } else {
            return Ok(false);
        }
        self.synchronize().map(|()| true)
    }

    fn free_now(&self) -> Option<u64> {
        self.memory_info().ok().map(|(free, _)| free)
    }

    fn work_queue(&self) -> Option<&dyn Queue> {
        Some(self)
    }

    fn peer_access(&self, peer: &dyn Backend) -> bool {
        peer.downcast_ref().is_some_and(|peer| self.can_access_peer(peer))
    }
}

impl Queue for CudaBackend {
    /// `bytes` of page-locked staging (the driver copies pageable memory synchronously): the smallest idle chunk that fits, or a new one. Idle
    /// chunks past the cache bound are freed here (never in a stream callback).
    fn staging(&self, bytes: usize) -> Result<Staging, BackendError> {
        self.bind()?;
        let (found, excess) = {
            let mut idle = self.stash.0.lock().unwrap_or_else(PoisonError::into_inner);
            let best = (0..idle.len()).filter(|&i| idle[i].1 >= bytes).min_by_key(|&i| idle[i].1);
            let found = best.map(|i| idle.swap_remove(i));
            let mut excess = Vec::new();
            idle.sort_unstable_by_key(|&(_, size)| size);
            while idle.iter().map(|&(_, size)| size).sum::<usize>() > MAX_IDLE_STAGING {
                excess.extend(idle.pop());
            }
            (found, excess)
        };
        for (start, _) in excess {
            // SAFETY: an idle chunk from `cuMemHostAlloc`, no longer in the stash.
            let _ = unsafe { result::free_host(start as *mut c_void) };
        }
        let (start, size) = match found {
            Some(chunk) => chunk,
            None => {
                let size = bytes.max(MIN_STAGING).checked_next_power_of_two().unwrap_or(bytes);
                // SAFETY: a plain page-locked allocation (the context is bound).
                let start = unsafe { result::malloc_host(size, sys::CU_MEMHOSTALLOC_PORTABLE) }
                    .map_err(|e| allocation_error("cuMemHostAlloc", e, size))?;
                (start as usize, size)
            }
        };
        let start = NonNull::new(start as *mut u8).ok_or(BackendError::OutOfMemory { bytes: size })?;
        // SAFETY: the chunk is out of the stash, so nobody else uses it until it goes back.
        Ok(unsafe { Staging::from_home(start, size, Arc::clone(&self.stash) as Arc<dyn StagingHome>) })
    }

    fn free_is_ordered(&self, kind: MemoryKind) -> bool {
        kind == MemoryKind::Device && self.pool.is_some()
    }

    fn record_fence(&self) -> Result<Fence, BackendError> {
        Event::record(self.context, self.stream).map(Fence::new)
    }

    fn order_after(&self, fence: &Fence) -> Result<(), BackendError> {
        if let Some(Drained(stream)) = fence.downcast_ref() {
            return self.order_streams(stream.cu_stream(), self.stream);
        }
        match fence.downcast_ref::<Event>() {
            // The event may be another device's (a peer copy's): the wait is enqueued with
            // this stream's own context bound (a stream may wait on any context's event).
            Some(event) => {
                self.bind()?;
                // SAFETY: our live stream, of the bound context, and a live event.
                unsafe {
                    result::stream::wait_event(
                        self.stream,
                        event.event,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .map_err(|e| driver("cuStreamWaitEvent", e))
            }
            None => Err(BackendError::Driver { call: "order_after", message: "not a CUDA fence".into() }),
        }
    }

    fn enable_peer_access(&self, peer: &dyn Backend) -> Result<(), BackendError> {
        match peer.downcast_ref() {
            Some(peer) => CudaBackend::enable_peer_access(self, peer),
            None => Ok(()),
        }
    }

    fn disable_peer_access(&self, peer: &dyn Backend) -> Result<(), BackendError> {
        match peer.downcast_ref() {
            Some(peer) => CudaBackend::disable_peer_access(self, peer),
            None => Ok(()),
        }
    }

    fn before_host_access(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        self.bind()?;
        if kind == MemoryKind::Unified {
            self.prefetch(allocation, true)?;
        }
        self.synchronize()
    }

    fn before_device_access(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        if kind != MemoryKind::Unified {
            return Ok(());
        }
        self.bind()?;
        self.prefetch(allocation, false)
    }

    fn free_and_total(&self) -> Option<(u64, u64)> {
        self.memory_info().ok()
    }

    fn release_cached(&self) {
        if let Some(pool) = self.pool
            && self.bind().is_ok()
            && self.synchronize().is_ok()
        {
            // SAFETY: the device's pool; trimming keeps memory still in use.
            let _ = unsafe { result::mem_pool::trim_to(pool, 0) };
        }
    }

    unsafe fn enqueue_write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: *const u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: in bounds (the caller) on our stream of the bound context; the caller keeps
        // `src..src + len` allocated and unwritten until a completion or fence taken after
        // this call has completed, which is after the copy has read it.
        unsafe { sys::cuMemcpyHtoDAsync_v2(allocation.handle + offset as u64, src.cast(), len, self.stream) }
            .result()
            .map_err(|e| driver("cuMemcpyHtoDAsync", e))
    }

    unsafe fn enqueue_read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as in `enqueue_write`; nobody else reads or writes `dst..dst + len` until
        // then (the caller), so the copy's write races with nothing.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), allocation.handle + offset as u64, len, self.stream) }
            .result()
            .map_err(|e| driver("cuMemcpyDtoHAsync", e))
    }

    unsafe fn enqueue_copy(
        &self,
        src: &RawAllocation,
        src_offset: usize,
        dst: &RawAllocation,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: two allocations of this device, both ranges in bounds and disjoint (the
        // caller), on our stream of the bound context.
        unsafe {
            sys::cuMemcpyDtoDAsync_v2(
                dst.handle + dst_offset as u64,
                src.handle + src_offset as u64,
                len,
                self.stream,
            )
        }
        .result()
        .map_err(|e| driver("cuMemcpyDtoDAsync", e))
    }

    /// `cuMemcpyPeerAsync` on this (the destination's) stream: it needs no peer access
    /// (without it the driver stages the copy itself), so any two CUDA devices have a path.
    /// Nothing waits on the host: the caller orders the streams (see the trait).
    unsafe fn enqueue_peer_copy(
        &self,
        source: &dyn Backend,
        src: &RawAllocation,
        src_offset: usize,
        dst: &RawAllocation,
        dst_offset: usize,
        len: usize,
    ) -> Result<bool, BackendError> {
        let Some(peer) = source.downcast_ref::<CudaBackend>() else { return Ok(false) };
        if len == 0 {
            return Ok(true);
        }
        self.bind()?;
        // SAFETY: `src` is memory of `peer`'s context and `dst` of ours, both ranges in
        // bounds (the caller); both contexts are retained by their backends, and the stream
        // is ours, of the bound context.
        unsafe {
            sys::cuMemcpyPeerAsync(
                dst.handle + dst_offset as u64,
                self.context,
                src.handle + src_offset as u64,
                peer.context,
                len,
                self.stream,
            )
        }
        .result()
        .map_err(|e| driver("cuMemcpyPeerAsync", e))?;
        Ok(true)
    }

    fn completion(&self, keep: Option<Staging>) -> Result<Pending, BackendError> {
        if let Err(e) = self.bind() {
            // Nothing can be enqueued, nor waited for: the commands that may use `keep` could
            // still be running, so it is leaked (and counted), not freed.
            leak_staging(keep);
            return Err(e);
        }
        self.complete_on_stream(keep)
    }
}
