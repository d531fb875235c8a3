//! The OpenCL backend (cargo feature `opencl`), through `opencl3` with the loader opened at
//! run time: a machine without `libOpenCL.so.1`, or with a loader and no driver (ICD), has
//! no OpenCL devices and says why.
//!
//! Memory kinds:
//! - `Device`: a `cl_mem` buffer in device memory; the host reaches it through copies and
//!   the buffer's host mirror (see `Buffer`).
//! - `Pinned`: a `cl_mem` made with `CL_MEM_ALLOC_HOST_PTR` and mapped for the host for its
//!   whole life, so the host reads and writes it in place.
//! - `Unified`: shared virtual memory (`clSVMAlloc`), the same address on host and device:
//!   fine-grained where the device offers it; coarse-grained otherwise, kept mapped for the
//!   host and unmapped while a user's kernels hold it (`Buffer::opencl_svm`), mapped back
//!   (after those kernels) at the next host access. A device with neither has no `Unified`:
//!   asking for it is `Error::UnsupportedMode`.
//!
//! All usable devices of one platform share one context (`Arc<Context>`), so that a buffer
//! of one device can be the source of a copy enqueued on another's queue (peer copies), and
//! a marker of one device's queue can order another's; each device keeps its own in-order
//! queue. Where the platform's shared context cannot be made, each device gets a context
//! of its own (the discovery note says so) and has no peers; setting
//! `UNIMEM_OPENCL_CONTEXT_PER_DEVICE` does the same, for tests.
//!
//! Every device operation goes through the device's one in-order queue. Blocking transfers
//! wait for their event; asynchronous ones copy through staging memory that the operation
//! owns and complete from an event callback (`clSetEventCallback`), so nothing polls.
//! Reuse of pooled device memory is queue-ordered: its next user's commands queue behind
//! the last user's, including the user's kernels (a caller's own queue is joined into
//! unimem's first: the raw-access guard leaves a marker on it when it drops, and unimem's
//! queue gets a barrier on that marker before its next use of the buffer). Host-visible blocks (pinned, SVM), which the
//! host touches without commands, are fenced with a marker that their next user waits for.

use std::ffi::c_void;
use std::ptr::{self, NonNull};
use std::sync::{Arc, OnceLock};

use opencl3::command_queue::{self as queue, CommandQueue};
use opencl3::context::Context;
use opencl3::device::{
    CL_DEVICE_SVM_COARSE_GRAIN_BUFFER, CL_DEVICE_SVM_FINE_GRAIN_BUFFER, CL_DEVICE_TYPE_ALL, Device,
};
use opencl3::error_codes::ClError;
use opencl3::event::{self, CL_COMPLETE};
use opencl3::memory::{
    self as memory, CL_MAP_READ, CL_MAP_WRITE, CL_MEM_ALLOC_HOST_PTR, CL_MEM_READ_WRITE,
    CL_MEM_SVM_FINE_GRAIN_BUFFER,
};
use opencl3::types::{
    CL_BLOCKING, CL_NON_BLOCKING, cl_command_queue, cl_device_id, cl_event, cl_int, cl_mem,
};

mod interop;

pub use interop::{OpenClMem, OpenClSvm};

use super::pending::{Pending, Signal, leak_staging};
use super::{Backend, BackendError, DeviceFence, Fence, Queue, RawAllocation};
use crate::device::{DeviceId, DeviceInfo, DeviceKind, MemoryKind};
use crate::host_lines::Staging;

/// Alignment asked of SVM allocations (unimem's buffers promise 64).
const SVM_ALIGN: u32 = 64;

type Discovery = super::Discovery<OpenClBackend>;

/// Enumerates every platform and device once per process. Enumeration is guarded: PoCL 3.1
/// can report zero devices when several threads enumerate at once for the first time.
pub(crate) fn discover() -> &'static Discovery {
    static FOUND: OnceLock<Discovery> = OnceLock::new();
    FOUND.get_or_init(enumerate)
}

fn enumerate() -> Discovery {
    if let Err(e) = cl3::load_library() {
        return Discovery::none(format!("no OpenCL loader: {e}"));
    }
    let platforms = match opencl3::platform::get_platforms() {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return Discovery::none("the OpenCL loader found no platforms (no ICD installed)"),
        Err(e) => return Discovery::none(format!("clGetPlatformIDs failed: {e} (no ICD installed?)")),
    };
    let mut backends = Vec::new();
    let mut problems = Vec::new();
    for platform in platforms {
        let ids = match platform.get_devices(CL_DEVICE_TYPE_ALL) {
            Ok(ids) => ids,
            Err(e) => {
                problems.push(format!("clGetDeviceIDs failed: {e}"));
                continue;
            }
        };
        let mut probed = Vec::new();
        for id in ids {
            match Probe::new(id) {
                Ok(probe) => probed.push(probe),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let shared = shared_context(&probed, &mut problems);
        for probe in probed {
            let context = match &shared {
                Some(context) => Ok(Arc::clone(context)),
                None => Context::from_device(&probe.device)
                    .map(Arc::new)
                    .map_err(|e| driver("clCreateContext", e.0)),
            };
            match context.and_then(|context| OpenClBackend::new(probe, context)) {
                Ok(backend) => backends.push(backend),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    Discovery::found(backends, problems, "the OpenCL platforms have no devices")
}

/// One context for every usable device of a platform, or `None` (with the reason in
/// `problems`) where the driver refuses it: each device then gets a context of its own.
fn shared_context(probed: &[Probe], problems: &mut Vec<String>) -> Option<Arc<Context>> {
    if probed.is_empty() {
        return None;
    }
    if std::env::var_os("UNIMEM_OPENCL_CONTEXT_PER_DEVICE").is_some() {
        // Test knob: the fallback, without a driver that refuses the shared context.
        problems.push("UNIMEM_OPENCL_CONTEXT_PER_DEVICE: each device has a context of its own".into());
        return None;
    }
    let ids: Vec<cl_device_id> = probed.iter().map(|p| p.device.id()).collect();
    match Context::from_devices(&ids, &[], None, ptr::null_mut()) {
        Ok(context) => Some(Arc::new(context)),
        Err(e) => {
            problems.push(format!(
                "clCreateContext for the platform's {} devices together failed: {e}; each device \
                 has a context of its own instead (no peer copies)",
                ids.len()
            ));
            None
        }
    }
}

fn driver(call: &'static str, code: cl_int) -> BackendError {
    BackendError::Driver { call, message: format!("{} ({code})", ClError(code)) }
}

/// Out-of-memory codes become `OutOfMemory`, so that the pool trims and retries.
fn allocation_error(call: &'static str, code: cl_int, bytes: usize) -> BackendError {
    use opencl3::error_codes::{
        CL_MEM_OBJECT_ALLOCATION_FAILURE, CL_OUT_OF_HOST_MEMORY, CL_OUT_OF_RESOURCES,
    };
    match code {
        CL_MEM_OBJECT_ALLOCATION_FAILURE | CL_OUT_OF_RESOURCES | CL_OUT_OF_HOST_MEMORY => {
            BackendError::OutOfMemory { bytes }
        }
        _ => driver(call, code),
    }
}

/// Waits for an event from a blocking or marker call, then releases it.
fn finish_event(call: &'static str, event: cl_event) -> Result<(), BackendError> {
    if event.is_null() {
        return Ok(());
    }
    let waited = event::wait_for_events(&[event]).map_err(|c| driver(call, c));
    // SAFETY: `event` was returned by an enqueue call and is released exactly once, here.
    let released = unsafe { event::release_event(event) }.map_err(|c| driver("clReleaseEvent", c));
    waited.and(released)
}

/// Completes the operation of `event` from OpenCL's callback, off the caller's thread: the
/// signal fires and the event is released. Callbacks run once per registration, with a
/// negative status when the command failed.
extern "C" fn on_event_complete(event: cl_event, status: cl_int, user_data: *mut c_void) {
    // SAFETY: `user_data` is the signal leaked for this one registration in `complete_on`.
    let signal = unsafe { Signal::from_raw(user_data) };
    // SAFETY: the event's reference was handed to this callback in `complete_on`; released once.
    let _ = unsafe { event::release_event(event) };
    signal.complete(if status < 0 { Err(driver("OpenCL transfer", status)) } else { Ok(()) });
}

/// The operation of `event` (whose reference it takes), owning `staging` until the device
/// is done with it.
fn complete_on(call: &'static str, event: cl_event, staging: Option<Staging>) -> Pending {
    let (pending, signal) = Pending::new(staging);
    let user_data = signal.into_raw();
    match event::set_event_callback(event, CL_COMPLETE, on_event_complete, user_data) {
        Ok(()) => pending,
        Err(code) => {
            // SAFETY: registration failed, so the callback never runs: the signal is ours.
            let signal = unsafe { Signal::from_raw(user_data) };
            // Without a callback, wait here; the staging memory must outlive the command. If
            // even that fails, nobody knows when the command ends: the staging is leaked.
            match finish_event(call, event) {
                Ok(()) => signal.complete(Err(driver("clSetEventCallback", code))),
                Err(waited) => signal.complete_leaking_staging(Err(waited)),
            }
            pending
        }
    }
}

/// Gives up an operation that could not be started on `queue` with `error`: `keep`, which
/// commands already on the queue may use, is freed once the queue has finished (`clFinish`),
/// or leaked (and counted) where even that fails.
fn abandon(queue: cl_command_queue, keep: Option<Staging>, error: BackendError) -> BackendError {
    match queue::finish(queue) {
        Ok(()) => drop(keep),
        Err(_) => leak_staging(keep),
    }
    error
}

/// Releases the event of a command enqueued without waiting: releasing does not cancel the
/// command. A failure would leak only the event's handle, and is not reported: the command
/// is enqueued, and an error would tell the caller it is not.
fn release_enqueued(event: cl_event) {
    // SAFETY: `event` was just returned by an enqueue call and is released once, here.
    let _ = unsafe { event::release_event(event) };
}

/// Orders `later` after everything enqueued so far on `earlier` (two queues of one
/// context): a marker on `earlier`, flushed so that it reaches the device, and a barrier on
/// `later` that waits for it. Nothing waits on the host.
fn order_queues(earlier: cl_command_queue, later: cl_command_queue) -> Result<(), BackendError> {
    // SAFETY: a marker with no wait list on a live queue (ours, or a `CommandQueue` the
    // caller lent).
    let marker = unsafe { queue::enqueue_marker_with_wait_list(earlier, 0, ptr::null()) }
        .map_err(|c| driver("clEnqueueMarkerWithWaitList", c))?;
    let ordered = queue::flush(earlier).map_err(|c| driver("clFlush", c)).and_then(|()| {
        // SAFETY: a barrier on a live queue waiting on one live event; `&marker` outlives
        // the call.
        let barrier = unsafe { queue::enqueue_barrier_with_wait_list(later, 1, &marker) }
            .map_err(|c| driver("clEnqueueBarrierWithWaitList", c))?;
        // SAFETY: the barrier's event is ours; releasing it does not cancel the barrier.
        unsafe { event::release_event(barrier) }.map_err(|c| driver("clReleaseEvent", c))
    });
    // SAFETY: the marker is ours and released once; the barrier keeps what it needs of it.
    let _ = unsafe { event::release_event(marker) };
    ordered
}

/// A marker event on a queue: the fence of OpenCL devices.
struct Marker(opencl3::event::Event);

impl Marker {
    /// A marker after everything enqueued so far on `queue`, flushed so that it reaches the
    /// device (a barrier on another queue may wait for it).
    fn after(queue: cl_command_queue) -> Result<Self, BackendError> {
        // SAFETY: a marker with no wait list on a live queue (ours, or one the caller lent).
        let marker = unsafe { queue::enqueue_marker_with_wait_list(queue, 0, ptr::null()) }
            .map_err(|c| driver("clEnqueueMarkerWithWaitList", c))?;
        let marker = Marker(opencl3::event::Event::new(marker));
        queue::flush(queue).map_err(|c| driver("clFlush", c))?;
        Ok(marker)
    }
}

impl DeviceFence for Marker {
    fn wait(&self) -> Result<(), BackendError> {
        self.0.wait().map_err(|e| driver("clWaitForEvents", e.0))
    }

    fn is_complete(&self) -> Result<bool, BackendError> {
        let status = event::get_event_info(self.0.get(), event::CL_EVENT_COMMAND_EXECUTION_STATUS)
            .map_err(|c| driver("clGetEventInfo", c))?;
        match cl_int::from(status) {
            failed if failed < 0 => Err(driver("OpenCL marker", failed)),
            status => Ok(status == CL_COMPLETE),
        }
    }
}

/// A caller's queue, retained, that no marker could be enqueued on: completion is the end
/// of everything enqueued on it (`clFinish`, waited for on the reaper thread, never in
/// `Drop`).
struct Drained(CommandQueue);

impl Drained {
    /// `queue`, retained.
    fn retain(queue: &CommandQueue) -> Result<Self, BackendError> {
        // SAFETY: a live queue (borrowed from its owner); the `CommandQueue` made here owns
        // the reference taken and releases it when dropped.
        unsafe { queue::retain_command_queue(queue.get()) }.map_err(|c| driver("clRetainCommandQueue", c))?;
        Ok(Drained(CommandQueue::new(queue.get(), queue.max_work_item_dimensions())))
    }
}

impl DeviceFence for Drained {
    fn wait(&self) -> Result<(), BackendError> {
        self.0.finish().map_err(|e| driver("clFinish", e.0))
    }

    fn is_complete(&self) -> Result<bool, BackendError> {
        Ok(false)
    }
}

/// What discovery learns of a device before it has a context.
struct Probe {
    device: Device,
    name: String,
    total_memory: u64,
    max_allocation: u64,
    svm_fine: bool,
    svm_coarse: bool,
}

impl Probe {
    fn new(id: cl_device_id) -> Result<Self, BackendError> {
        let device = Device::new(id);
        let name = device.name().map_err(|e| driver("clGetDeviceInfo(NAME)", e.0))?;
        let total_memory = device.global_mem_size().map_err(|e| driver("clGetDeviceInfo", e.0))?;
        let max_allocation = device.max_mem_alloc_size().map_err(|e| driver("clGetDeviceInfo", e.0))?;
        let mut svm = device.svm_mem_capability();
        if std::env::var_os("UNIMEM_OPENCL_COARSE_SVM").is_some() {
            // Test knob: use coarse-grained SVM even where fine-grained exists.
            svm &= !CL_DEVICE_SVM_FINE_GRAIN_BUFFER;
        }
        Ok(Probe {
            device,
            name,
            total_memory,
            max_allocation,
            svm_fine: svm & CL_DEVICE_SVM_FINE_GRAIN_BUFFER != 0,
            svm_coarse: svm & CL_DEVICE_SVM_COARSE_GRAIN_BUFFER != 0,
        })
    }
}

/// One OpenCL device with its in-order queue, in a context shared with the platform's
/// other devices (or its own, see the module's notes).
pub struct OpenClBackend {
    device: Device,
    queue: CommandQueue,
    /// A second in-order queue on which fresh memory is made ready (zeroed, mapped): nothing
    /// but those commands is ever queued on it, so an allocation waits for its own setup
    /// only, never for the transfers and kernels queued on `queue` before it.
    setup: CommandQueue,
    /// Dropped after the queues (a queue keeps its context alive anyway).
    context: Arc<Context>,
    name: String,
    total_memory: u64,
    max_allocation: u64,
    svm_fine: bool,
    svm_coarse: bool,
}

impl OpenClBackend {
    /// The backend of `probe`'s device in `context`, which holds that device.
    fn new(probe: Probe, context: Arc<Context>) -> Result<Self, BackendError> {
        let Probe { device, name, total_memory, max_allocation, svm_fine, svm_coarse } = probe;
        // An in-order queue: operations on it complete in the order they were enqueued.
        #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
        // SAFETY: `context` was made from a device list that holds `device` (the platform's
        // shared context, or the device's own).
        let queue = unsafe { CommandQueue::create(&context, device.id(), 0) }
            .map_err(|e| driver("clCreateCommandQueue", e.0))?;
        #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
        // SAFETY: as above.
        let setup = unsafe { CommandQueue::create(&context, device.id(), 0) }
            .map_err(|e| driver("clCreateCommandQueue", e.0))?;
        Ok(Self { device, queue, setup, context, name, total_memory, max_allocation, svm_fine, svm_coarse })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The context every buffer of this device belongs to: build programs and make queues
    /// of your own in it. Devices of one platform share it (see
    /// [`shares_context_with`](Self::shares_context_with)), so a program built in it for
    /// every device of the context ([`Program::create_and_build_from_source`]) builds for
    /// them all.
    ///
    /// [`Program::create_and_build_from_source`]: opencl3::program::Program::create_and_build_from_source
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Whether `other` is another device of this device's context: unimem copies between
    /// their buffers directly, on the destination's queue, without the host.
    pub fn shares_context_with(&self, other: &OpenClBackend) -> bool {
        Arc::ptr_eq(&self.context, &other.context) && self.device.id() != other.device.id()
    }

    /// The in-order queue unimem uses. Kernels enqueued here on unimem memory are ordered
    /// with unimem's own transfers and pooled reuse without any joining.
    pub fn queue(&self) -> &CommandQueue {
        &self.queue
    }

    /// Whether `Unified` memory is coarse-grained SVM: mapped for the host, unmapped while
    /// the caller's kernels use it (unimem maps and unmaps as host and device take turns).
    /// Setting `UNIMEM_OPENCL_COARSE_SVM` makes devices with both kinds use coarse-grained.
    pub fn coarse_svm_only(&self) -> bool {
        self.svm_coarse && !self.svm_fine
    }

    fn mem(allocation: &RawAllocation) -> cl_mem {
        allocation.handle as usize as cl_mem
    }

    fn allocate_pinned(&self, bytes: usize) -> Result<RawAllocation, BackendError> {
        // SAFETY: a valid context, no host pointer, flags without USE/COPY_HOST_PTR.
        let mem = unsafe {
            memory::create_buffer(
                self.context.get(),
                CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR,
                bytes,
                ptr::null_mut(),
            )
        }
        .map_err(|c| allocation_error("clCreateBuffer", c, bytes))?;
        let mut host: *mut c_void = ptr::null_mut();
        // SAFETY: `mem` is the buffer just made, mapped whole and blocking; `host` is an
        // out-parameter. On the setup queue: the buffer is unused, so nothing orders the map
        // after other work (its unmap, at free, is queued on `queue` after the last use).
        let mapped = unsafe {
            queue::enqueue_map_buffer(
                self.setup.get(),
                mem,
                CL_BLOCKING,
                CL_MAP_READ | CL_MAP_WRITE,
                0,
                bytes,
                &mut host,
                0,
                ptr::null(),
            )
        };
        let host = match mapped
            .map_err(|c| driver("clEnqueueMapBuffer", c))
            .and_then(|event| finish_event("clEnqueueMapBuffer", event))
        {
            Ok(()) => NonNull::new(host.cast::<u8>()),
            Err(e) => {
                // SAFETY: the buffer is ours and unused.
                let _ = unsafe { memory::release_mem_object(mem) };
                return Err(e);
            }
        };
        let Some(host) = host else {
            // SAFETY: as above.
            let _ = unsafe { memory::release_mem_object(mem) };
            return Err(BackendError::Driver {
                call: "clEnqueueMapBuffer",
                message: "mapped to null".into(),
            });
        };
        // SAFETY: the mapping covers `bytes` bytes, writable by the host, used by nobody yet.
        unsafe { host.as_ptr().write_bytes(0, bytes) };
        Ok(RawAllocation { handle: mem as usize as u64, host: Some(host), bytes })
    }

    fn allocate_device(&self, bytes: usize) -> Result<RawAllocation, BackendError> {
        // SAFETY: a valid context, no host pointer.
        let mem =
            unsafe { memory::create_buffer(self.context.get(), CL_MEM_READ_WRITE, bytes, ptr::null_mut()) }
                .map_err(|c| allocation_error("clCreateBuffer", c, bytes))?;
        let zero = 0u8;
        // SAFETY: fills the whole new buffer with a one-byte pattern read from `zero`,
        // which the call copies before it returns. On the setup queue, waited for: the
        // buffer's later commands on `queue` find it zeroed.
        let filled = unsafe {
            queue::enqueue_fill_buffer(
                self.setup.get(),
                mem,
                (&raw const zero).cast(),
                1,
                0,
                bytes,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueFillBuffer", c))
        .and_then(|e| finish_event("clEnqueueFillBuffer", e));
        if let Err(e) = filled {
            // SAFETY: the buffer is ours; the fill has completed or failed.
            let _ = unsafe { memory::release_mem_object(mem) };
            return Err(e);
        }
        Ok(RawAllocation { handle: mem as usize as u64, host: None, bytes })
    }

    fn allocate_unified(&self, bytes: usize) -> Result<RawAllocation, BackendError> {
        let grain = if self.svm_fine { CL_MEM_SVM_FINE_GRAIN_BUFFER } else { 0 };
        // SAFETY: a valid context; flags and alignment are valid for clSVMAlloc.
        let pointer =
            unsafe { memory::svm_alloc(self.context.get(), CL_MEM_READ_WRITE | grain, bytes, SVM_ALIGN) }
                .map_err(|_| BackendError::OutOfMemory { bytes })?;
        let host = NonNull::new(pointer.cast::<u8>()).ok_or(BackendError::OutOfMemory { bytes })?;
        let allocation = RawAllocation { handle: pointer as usize as u64, host: Some(host), bytes };
        if !self.svm_fine {
            // Coarse-grained memory is the host's only while mapped; it is kept mapped
            // except while a user's kernels hold it.
            if let Err(e) = self.map_svm(&self.setup, &allocation, true) {
                // SAFETY: the pointer came from clSVMAlloc just above and is unused.
                unsafe { memory::svm_free(self.context.get(), pointer) }.ok();
                return Err(e);
            }
        }
        // SAFETY: SVM that is fine-grained, or mapped, is host-writable, `bytes` long, unused.
        unsafe { host.as_ptr().write_bytes(0, bytes) };
        Ok(allocation)
    }

    /// Maps coarse-grained SVM for the host on `on` (one of our queues), waiting for the
    /// mapping if `blocking`.
    fn map_svm(
        &self,
        on: &CommandQueue,
        allocation: &RawAllocation,
        blocking: bool,
    ) -> Result<(), BackendError> {
        // SAFETY: a whole SVM allocation of this context on a queue of this device.
        let event = unsafe {
            queue::enqueue_svm_map(
                on.get(),
                if blocking { CL_BLOCKING } else { CL_NON_BLOCKING },
                CL_MAP_READ | CL_MAP_WRITE,
                allocation.handle as usize as *mut c_void,
                allocation.bytes,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueSVMMap", c))?;
        if blocking {
            return finish_event("clEnqueueSVMMap", event);
        }
        // SAFETY: our event; releasing it does not cancel the map.
        unsafe { event::release_event(event) }.map_err(|c| driver("clReleaseEvent", c))
    }

    /// Unmaps coarse-grained SVM so that kernels may use it (queued, in order).
    fn unmap_svm(&self, allocation: &RawAllocation) -> Result<(), BackendError> {
        // SAFETY: a mapped SVM allocation of this context on our queue.
        let event = unsafe {
            queue::enqueue_svm_unmap(
                self.queue.get(),
                allocation.handle as usize as *mut c_void,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueSVMUnmap", c))?;
        // SAFETY: our event; releasing it does not cancel the unmap.
        unsafe { event::release_event(event) }.map_err(|c| driver("clReleaseEvent", c))
    }
}

impl Backend for OpenClBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: DeviceId::CPU, // set by the manager
            kind: DeviceKind::OpenCl,
            name: self.name.clone(),
            total_memory: self.total_memory,
            // OpenCL has no portable free-memory query.
            free_memory: None,
            host_addressable: false,
            supports_pinned: true,
            supports_unified: self.svm_fine || self.svm_coarse,
            peer_capable: self.context.devices().len() > 1,
        }
    }

    fn supports(&self, kind: MemoryKind) -> bool {
        match kind {
            MemoryKind::Device | MemoryKind::Pinned => true,
            MemoryKind::Unified => self.svm_fine || self.svm_coarse,
        }
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError> {
        let bytes = bytes.max(1);
        if bytes as u64 > self.max_allocation {
            return Err(BackendError::TooLarge { bytes, largest: self.max_allocation });
        }
        match kind {
            MemoryKind::Device => self.allocate_device(bytes),
            MemoryKind::Pinned => self.allocate_pinned(bytes),
            MemoryKind::Unified => self.allocate_unified(bytes),
        }
    }

    /// Every free is queue-ordered and waits for nothing: SVM through `clEnqueueSVMFree`,
    /// buffers by an unmap enqueued before `clReleaseMemObject` (which deletes the buffer
    /// once the commands queued on it have finished).
    unsafe fn free(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        let handle = allocation.handle as usize;
        if kind == MemoryKind::Unified {
            if !self.svm_fine {
                // Blocks reach their pool (and this call) mapped: see `return_to_host`.
                self.unmap_svm(allocation)?;
            }
            let mut pointer = handle as *const c_void;
            // SAFETY: the pointer came from clSVMAlloc in this context; the caller guarantees
            // that nothing on the host uses it; the free runs after the commands queued so
            // far, on the in-order queue (no callback: the driver calls clSVMFree).
            let event = unsafe {
                queue::enqueue_svm_free(
                    self.queue.get(),
                    1,
                    &raw mut pointer,
                    None,
                    ptr::null_mut(),
                    0,
                    ptr::null(),
                )
            }
            .map_err(|c| driver("clEnqueueSVMFree", c))?;
            // SAFETY: our event; releasing it does not cancel the free.
            return unsafe { event::release_event(event) }.map_err(|c| driver("clReleaseEvent", c));
        }
        let mem = Self::mem(allocation);
        if let Some(host) = allocation.host {
            // SAFETY: `host` is the mapping of `mem` made at allocation; nobody uses it.
            let event = unsafe {
                queue::enqueue_unmap_mem_object(self.queue.get(), mem, host.as_ptr().cast(), 0, ptr::null())
            }
            .map_err(|c| driver("clEnqueueUnmapMemObject", c))?;
            // SAFETY: our event; releasing it does not cancel the unmap.
            unsafe { event::release_event(event) }.map_err(|c| driver("clReleaseEvent", c))?;
        }
        // SAFETY: `mem` came from clCreateBuffer and is released once. OpenCL deletes it
        // only after the commands queued on it have finished.
        unsafe { memory::release_mem_object(mem) }.map_err(|c| driver("clReleaseMemObject", c))
    }

    unsafe fn write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: &[u8],
    ) -> Result<(), BackendError> {
        // SAFETY: the caller guarantees the range is inside the buffer; the write is
        // blocking, so `src` is read before the call returns.
        let event = unsafe {
            queue::enqueue_write_buffer(
                self.queue.get(),
                Self::mem(allocation),
                CL_BLOCKING,
                offset,
                src.len(),
                src.as_ptr().cast(),
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueWriteBuffer", c))?;
        finish_event("clEnqueueWriteBuffer", event)
    }

    unsafe fn read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        // SAFETY: as in `write`; the read is blocking, so `dst` is written before return.
        let event = unsafe {
            queue::enqueue_read_buffer(
                self.queue.get(),
                Self::mem(allocation),
                CL_BLOCKING,
                offset,
                dst.len(),
                dst.as_mut_ptr().cast(),
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueReadBuffer", c))?;
        finish_event("clEnqueueReadBuffer", event)
    }

    unsafe fn fill(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        bytes: usize,
        pattern: &[u8],
    ) -> Result<bool, BackendError> {
        if !pattern.len().is_power_of_two() || pattern.len() > 128 {
            return Ok(false);
        }
        // SAFETY: the caller guarantees the range is inside the buffer and a multiple of the
        // pattern's size (the element's, so offsets are too); the pattern is copied by the call.
        let event = unsafe {
            queue::enqueue_fill_buffer(
                self.queue.get(),
                Self::mem(allocation),
                pattern.as_ptr().cast(),
                pattern.len(),
                offset,
                bytes,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueFillBuffer", c))?;
        finish_event("clEnqueueFillBuffer", event).map(|()| true)
    }

    fn work_queue(&self) -> Option<&dyn Queue> {
        Some(self)
    }

    /// Direct between the devices of one context; peer access needs no enabling there.
    fn peer_access(&self, peer: &dyn Backend) -> bool {
        peer.downcast_ref().is_some_and(|peer| self.shares_context_with(peer))
    }
}

impl Queue for OpenClBackend {
    fn record_fence(&self) -> Result<Fence, BackendError> {
        Marker::after(self.queue.get()).map(Fence::new)
    }

    fn order_after(&self, fence: &Fence) -> Result<(), BackendError> {
        if let Some(Drained(queue)) = fence.downcast_ref() {
            return order_queues(queue.get(), self.queue.get());
        }
        let Some(Marker(marker)) = fence.downcast_ref() else {
            return Err(BackendError::Driver { call: "order_after", message: "not an OpenCL fence".into() });
        };
        // SAFETY: a barrier on our queue waiting on one live event; `&marker` outlives the call.
        let barrier = unsafe { queue::enqueue_barrier_with_wait_list(self.queue.get(), 1, &marker.get()) }
            .map_err(|c| driver("clEnqueueBarrierWithWaitList", c))?;
        // SAFETY: the barrier's event is ours; releasing it does not cancel the barrier.
        unsafe { event::release_event(barrier) }.map_err(|c| driver("clReleaseEvent", c))
    }

    fn before_host_access(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        if kind == MemoryKind::Unified && !self.svm_fine {
            // A blocking map waits for the kernels queued before it.
            return self.map_svm(&self.queue, allocation, true);
        }
        queue::finish(self.queue.get()).map_err(|c| driver("clFinish", c))
    }

    fn before_device_access(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        if kind == MemoryKind::Unified && !self.svm_fine {
            return self.unmap_svm(allocation);
        }
        Ok(())
    }

    fn return_to_host(&self, allocation: &RawAllocation, kind: MemoryKind) -> Result<(), BackendError> {
        if kind == MemoryKind::Unified && !self.svm_fine {
            // Queued, not waited for: the block's fence orders its next user after it.
            return self.map_svm(&self.queue, allocation, false);
        }
        Ok(())
    }

    unsafe fn enqueue_write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: *const u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(()); // OpenCL refuses empty copies
        }
        // SAFETY: the caller guarantees the range is inside the buffer and that
        // `src..src + len` stays allocated and unwritten until a completion or fence taken
        // after this call has completed, which is after the device has read it.
        let event = unsafe {
            queue::enqueue_write_buffer(
                self.queue.get(),
                Self::mem(allocation),
                CL_NON_BLOCKING,
                offset,
                len,
                src.cast(),
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueWriteBuffer", c))?;
        release_enqueued(event);
        Ok(())
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
        // SAFETY: as in `enqueue_write`; the caller also guarantees that nobody else reads
        // or writes `dst..dst + len` until then, so the device's write races with nothing.
        let event = unsafe {
            queue::enqueue_read_buffer(
                self.queue.get(),
                Self::mem(allocation),
                CL_NON_BLOCKING,
                offset,
                len,
                dst.cast(),
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueReadBuffer", c))?;
        release_enqueued(event);
        Ok(())
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
        // SAFETY: two buffers of this context (the caller), both ranges in bounds and
        // disjoint, as clEnqueueCopyBuffer requires; the command holds the buffers itself.
        let event = unsafe {
            queue::enqueue_copy_buffer(
                self.queue.get(),
                Self::mem(src),
                Self::mem(dst),
                src_offset,
                dst_offset,
                len,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueCopyBuffer", c))?;
        release_enqueued(event);
        Ok(())
    }

    /// A copy enqueued on this (the destination's) queue from the source's buffer: any
    /// buffer of the context can be used by any of its devices' queues, and the driver
    /// moves the bytes between the devices. The caller orders the queues (see the trait).
    unsafe fn enqueue_peer_copy(
        &self,
        source: &dyn Backend,
        src: &RawAllocation,
        src_offset: usize,
        dst: &RawAllocation,
        dst_offset: usize,
        len: usize,
    ) -> Result<bool, BackendError> {
        if !self.peer_access(source) {
            return Ok(false);
        }
        if len == 0 {
            return Ok(true);
        }
        // SAFETY: `src` is a buffer of `source`, which shares this backend's context (just
        // checked), `dst` one of ours; both ranges in bounds (the caller), and distinct
        // buffers, so they do not overlap.
        let event = unsafe {
            queue::enqueue_copy_buffer(
                self.queue.get(),
                Self::mem(src),
                Self::mem(dst),
                src_offset,
                dst_offset,
                len,
                0,
                ptr::null(),
            )
        }
        .map_err(|c| driver("clEnqueueCopyBuffer", c))?;
        release_enqueued(event);
        Ok(true)
    }

    /// A marker after everything enqueued so far, flushed so that it reaches the device, and
    /// completed from its event callback. Where the marker cannot be made or flushed, the
    /// queue is finished before `keep` is freed, and the error is returned.
    fn completion(&self, keep: Option<Staging>) -> Result<Pending, BackendError> {
        let queue = self.queue.get();
        // SAFETY: a marker with no wait list on our live queue.
        let marker = match unsafe { queue::enqueue_marker_with_wait_list(queue, 0, ptr::null()) } {
            Ok(marker) => marker,
            Err(c) => return Err(abandon(queue, keep, driver("clEnqueueMarkerWithWaitList", c))),
        };
        if let Err(c) = queue::flush(queue) {
            release_enqueued(marker);
            return Err(abandon(queue, keep, driver("clFlush", c)));
        }
        Ok(complete_on("clEnqueueMarkerWithWaitList", marker, keep))
    }
}

#[cfg(test)]
mod tests;
