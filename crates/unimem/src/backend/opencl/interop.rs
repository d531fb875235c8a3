//! OpenCL interop: a buffer's memory for the caller's kernels, through a guard that records
//! the caller's last use when it drops, and the device's handles as opencl3 types.

use std::ffi::c_void;

use opencl3::command_queue::CommandQueue;
use opencl3::types::cl_mem;

use super::{Drained, Marker, OpenClBackend, order_queues};
use crate::backend::Fence;
use crate::device::{DeviceId, DeviceKind, MapMode, MemoryKind};
use crate::error::{Error, Result};
use crate::{Buffer, Element, MemoryManager};

impl MemoryManager {
    /// The OpenCL device `id` (its context, device and queue as opencl3 types), for running
    /// kernels on unimem memory.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`] when `id` is not a device of this manager,
    /// [`Error::WrongDeviceKind`] when it is not an OpenCL device.
    pub fn opencl_device(&self, id: DeviceId) -> Result<&OpenClBackend> {
        let backend = self.backend_of(id)?;
        backend.downcast_ref().ok_or(Error::WrongDeviceKind {
            device: id,
            expected: DeviceKind::OpenCl,
            found: backend.info().kind,
        })
    }
}

impl<T: Element> Buffer<T> {
    /// The `cl_mem` of an OpenCL device or pinned buffer, for the caller's kernels enqueued
    /// on `queue`, through a guard that borrows the buffer.
    ///
    /// The buffer is first made ready for `access` on the device: host changes are written
    /// to the device (except for [`MapMode::Write`], which promises the kernels overwrite
    /// every element), and unless `access` is [`MapMode::Read`] the host mirror is dropped,
    /// so the next host access reads the device's result.
    ///
    /// `queue` is unimem's own ([`OpenClBackend::queue`]: in order with everything unimem
    /// does, nothing to join) or one of the caller's on the buffer's context. A caller's queue
    /// is ordered after unimem's work on the buffer so far (a marker and a barrier: nothing
    /// waits), and when the guard drops it leaves a marker on that queue: unimem's next use
    /// of the buffer (a transfer, host access, or the pool's next user once the buffer is
    /// dropped) waits for it on the device. Enqueue the kernels that use the memory while
    /// the guard lives; work enqueued after it dropped is not ordered. (A guard that is
    /// leaked instead of dropped leaves the whole queue as the last use: unimem's next use
    /// then waits for everything enqueued on it until then.)
    ///
    /// ```no_run
    /// # use unimem::{AllocationMode, MapMode, MemoryManager, DeviceKind};
    /// # let manager = MemoryManager::new();
    /// # let id = manager.devices_of(DeviceKind::OpenCl)[0].id;
    /// let cl = manager.opencl_device(id)?;
    /// let mut buffer = manager.allocate_on::<f32>(id, 1024, AllocationMode::Pooled)?;
    /// let access = buffer.opencl_mem(cl.queue(), MapMode::Write)?;
    /// let mem = access.mem(); // a kernel argument; enqueue the kernel on `cl.queue()`
    /// # let _ = mem;
    /// drop(access);
    /// # Ok::<(), unimem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongBackend`] for buffers that are not OpenCL memory,
    /// [`Error::UnsupportedMode`] for OpenCL shared virtual memory (use
    /// [`opencl_svm`](Self::opencl_svm)), [`Error::ForeignQueue`] if `queue` belongs to
    /// another context; transfer errors. The buffer's contents are unchanged on error.
    pub fn opencl_mem<'a>(
        &'a mut self,
        queue: &'a CommandQueue,
        access: MapMode,
    ) -> Result<OpenClMem<'a, T>> {
        Access::begin(self, queue, access, false).map(OpenClMem)
    }

    /// The shared-virtual-memory pointer of an OpenCL `Unified` buffer, for the caller's
    /// kernels (`clSetKernelArgSVMPointer`) enqueued on `queue`, through a guard ordered as
    /// for [`opencl_mem`](Self::opencl_mem). Coarse-grained SVM is unmapped for the device
    /// while the guard lives and until the next host access, which maps it back after the
    /// kernels queued before it.
    ///
    /// # Errors
    /// As for [`opencl_mem`](Self::opencl_mem); [`Error::UnsupportedMode`] for buffers that
    /// are not OpenCL SVM.
    pub fn opencl_svm<'a>(
        &'a mut self,
        queue: &'a CommandQueue,
        access: MapMode,
    ) -> Result<OpenClSvm<'a, T>> {
        Access::begin(self, queue, access, true).map(OpenClSvm)
    }
}

/// A buffer's memory lent to the caller's OpenCL kernels on one queue (see
/// [`Buffer::opencl_mem`]).
#[derive(Debug)]
pub struct OpenClMem<'a, T: Element>(Access<'a, T>);

impl<T: Element> OpenClMem<'_, T> {
    /// The `cl_mem`, for `clSetKernelArg` (opencl3's `ExecuteKernel::set_arg(&mem)`).
    pub fn mem(&self) -> cl_mem {
        self.0.buffer.raw().handle as usize as cl_mem
    }

    /// The queue the memory is lent to.
    pub fn queue(&self) -> &CommandQueue {
        self.0.queue
    }
}

/// A buffer's shared virtual memory lent to the caller's OpenCL kernels on one queue (see
/// [`Buffer::opencl_svm`]).
#[derive(Debug)]
pub struct OpenClSvm<'a, T: Element>(Access<'a, T>);

impl<T: Element> OpenClSvm<'_, T> {
    /// The SVM pointer, for `clSetKernelArgSVMPointer` (opencl3's
    /// `ExecuteKernel::set_arg_svm`).
    pub fn pointer(&self) -> *mut c_void {
        self.0.buffer.raw().handle as usize as *mut c_void
    }

    /// The queue the memory is lent to.
    pub fn queue(&self) -> &CommandQueue {
        self.0.queue
    }
}

/// What both guards share: the borrowed buffer and the queue, and the last use recorded on
/// drop.
struct Access<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
    queue: &'a CommandQueue,
    /// The queue is the caller's, not unimem's: its work is joined on drop.
    foreign: bool,
}

impl<'a, T: Element> Access<'a, T> {
    fn begin(buffer: &'a mut Buffer<T>, queue: &'a CommandQueue, access: MapMode, svm: bool) -> Result<Self> {
        let backend: &OpenClBackend =
            buffer.backend().downcast_ref().ok_or_else(|| buffer.wrong_backend(DeviceKind::OpenCl))?;
        if (buffer.memory_kind() == MemoryKind::Unified) != svm {
            return Err(buffer.unsupported_mode());
        }
        let foreign = queue.get() != backend.queue.get();
        if foreign && queue.context().ok() != Some(backend.context.get()) {
            return Err(Error::ForeignQueue { device: buffer.device() });
        }
        let ours = backend.queue.get();
        let device = buffer.device();
        // The caller's whole queue stands for its last use until the guard drops (so that
        // a leaked guard leaves nothing unordered).
        let drained = match foreign {
            true => Some(Drained::retain(queue).map_err(Error::on(device))?),
            false => None,
        };
        buffer.prepare_device_access(access)?;
        if foreign {
            order_queues(ours, queue.get()).map_err(Error::on(device))?;
        }
        buffer.begin_device_access(access, drained.map(Fence::new));
        Ok(Access { buffer, queue, foreign })
    }
}

impl<T: Element> Drop for Access<'_, T> {
    fn drop(&mut self) {
        if !self.foreign {
            return; // unimem's in-order queue: its next command follows the caller's
        }
        // A marker after the caller's work, in place of the whole queue recorded when the
        // guard was made (which stays if no marker can be enqueued).
        if let Ok(marker) = Marker::after(self.queue.get()) {
            self.buffer.record_last_use(Fence::new(marker));
        }
    }
}

impl<T: Element> std::fmt::Debug for Access<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClAccess").field("buffer", &self.buffer).field("foreign", &self.foreign).finish()
    }
}
