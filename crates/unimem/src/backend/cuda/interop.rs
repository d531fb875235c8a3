//! CUDA interop: a buffer's memory for the caller's kernels, through a guard that records the
//! caller's last use when it drops and that cudarc's launch builder takes as an argument; the
//! device's context and stream as cudarc types.

use std::sync::Arc;

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, LaunchArgs, PushKernelArg, SyncOnDrop, sys,
};

use super::{CudaBackend, Drained, Event};
use crate::backend::Fence;
use crate::device::{DeviceId, DeviceKind, MapMode};
use crate::error::{Error, Result};
use crate::{Buffer, Element, MemoryManager};

impl MemoryManager {
    /// The CUDA device `id` (its context and unimem's stream as cudarc types, its ordinal and
    /// peers), for launching kernels on unimem memory.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`] when `id` is not a device of this manager,
    /// [`Error::WrongDeviceKind`] when it is not a CUDA device.
    pub fn cuda_device(&self, id: DeviceId) -> Result<&CudaBackend> {
        let backend = self.backend_of(id)?;
        backend.downcast_ref().ok_or(Error::WrongDeviceKind {
            device: id,
            expected: DeviceKind::Cuda,
            found: backend.info().kind,
        })
    }
}

impl<T: Element> Buffer<T> {
    /// The device pointer of a CUDA buffer (device, pinned or managed memory), for the
    /// caller's kernels launched on `stream`, through a guard that borrows the buffer.
    ///
    /// The buffer is first made ready for `access` on the device: host changes are written
    /// to the device (except for [`MapMode::Write`], which promises the kernels overwrite
    /// every element), unless `access` is [`MapMode::Read`] the host mirror is dropped, and
    /// managed memory is prefetched to the device.
    ///
    /// `stream` is unimem's own ([`CudaBackend::stream`]: in order with everything unimem
    /// does, nothing to join) or one of the caller's on the buffer's device (its primary
    /// context, as `CudaContext::new` gives). A caller's stream is ordered after unimem's
    /// work on the buffer so far (an event and `cuStreamWaitEvent`: nothing waits), and when
    /// the guard drops an event is recorded on it: unimem's next use of the buffer (a
    /// transfer, host access, or the pool's next user once the buffer is dropped) waits for
    /// it on the device. Launch the kernels that use the memory while the guard lives;
    /// work launched after it dropped is not ordered. (A guard that is leaked instead of
    /// dropped leaves the whole stream as the last use: unimem's next use then waits for
    /// everything launched on it until then.)
    ///
    /// The guard goes straight into cudarc's launch builder (`builder.arg(&access)`): build
    /// the launch on the guard's stream. It implements cudarc's [`DevicePtr`] and
    /// [`DevicePtrMut`] too, for cudarc's copies and memsets, on any stream of the context.
    /// The per-thread default stream (`CudaContext::per_thread_stream`) is refused: it is
    /// another stream on every thread.
    ///
    /// # Errors
    /// [`Error::WrongBackend`] for buffers that are not CUDA memory, [`Error::ForeignQueue`]
    /// if `stream` belongs to another context or is the per-thread default stream; transfer
    /// errors. The buffer's contents are unchanged on error.
    pub fn cuda_ptr<'a>(
        &'a mut self,
        stream: &Arc<CudaStream>,
        access: MapMode,
    ) -> Result<CudaAccess<'a, T>> {
        let backend: &CudaBackend =
            self.backend().downcast_ref().ok_or_else(|| self.wrong_backend(DeviceKind::Cuda))?;
        let foreign = stream.cu_stream() != backend.stream;
        // The per-thread default stream is another stream on every thread: nothing recorded
        // on it on one thread orders work launched on it on another.
        let per_thread = stream.cu_stream() as usize == PER_THREAD_STREAM;
        if foreign && (per_thread || stream.context().cu_ctx() != backend.context) {
            return Err(Error::ForeignQueue { device: self.device() });
        }
        let (ours, context, device) = (backend.stream, backend.context, self.device());
        self.prepare_device_access(access)?;
        if foreign {
            let event = Event::record(context, ours).map_err(Error::on(device))?;
            CudaBackend::wait_for(stream.cu_stream(), &event).map_err(Error::on(device))?;
        }
        // The caller's whole stream stands for its last use until the guard drops (so that a
        // leaked guard leaves nothing unordered).
        let drained = foreign.then(|| Fence::new(Drained(Arc::clone(stream))));
        self.begin_device_access(access, drained);
        let ptr = self.raw().handle;
        Ok(CudaAccess { buffer: self, stream: Arc::clone(stream), ptr, access, foreign })
    }
}

/// A buffer's memory lent to the caller's CUDA kernels on one stream (see
/// [`Buffer::cuda_ptr`]). Dropping it records the stream's work as the buffer's last use.
pub struct CudaAccess<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
    stream: Arc<CudaStream>,
    ptr: sys::CUdeviceptr,
    /// What the memory was lent for.
    access: MapMode,
    /// The stream is the caller's, not unimem's: its work is joined on drop.
    foreign: bool,
}

/// `CU_STREAM_PER_THREAD`.
const PER_THREAD_STREAM: usize = 0x2;

impl<T: Element> CudaAccess<'_, T> {
    /// The device pointer (`CUdeviceptr`) of the buffer's first element.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// The stream the memory is lent to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The pointer for a launch on `stream`: another stream than the guard's is first
    /// ordered after the guard's stream, and synchronised when the returned `SyncOnDrop`
    /// drops (cudarc's `Sync` mode: it blocks), so that the buffer's last use stays ordered.
    fn on<'s>(&'s self, stream: &'s CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        if stream.cu_stream() == self.stream.cu_stream() {
            return (self.ptr, SyncOnDrop::Record(None));
        }
        if stream.join(&self.stream).is_err() {
            // No wait could be enqueued: the guard's stream is drained on the host instead.
            stream.context().record_err(self.stream.synchronize());
        }
        (self.ptr, SyncOnDrop::sync_stream(stream))
    }

    /// A write through a guard lent for reading: the host mirror is stale from now on.
    fn written(&mut self) {
        if self.access == MapMode::Read {
            self.buffer.device_written();
            self.access = MapMode::ReadWrite;
        }
    }
}

impl<T: Element> Drop for CudaAccess<'_, T> {
    fn drop(&mut self) {
        if !self.foreign {
            return; // unimem's stream: its next operation follows the caller's
        }
        // An event after the caller's work; if none can be recorded, the whole stream's
        // end, waited for (off this thread) before the memory is reused.
        let fence = match Event::record(self.stream.context().cu_ctx(), self.stream.cu_stream()) {
            Ok(event) => Fence::new(event),
            Err(_) => Fence::new(Drained(Arc::clone(&self.stream))),
        };
        self.buffer.record_last_use(fence);
    }
}

impl<T: Element> std::fmt::Debug for CudaAccess<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaAccess")
            .field("buffer", &self.buffer)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("foreign", &self.foreign)
            .finish()
    }
}

impl<T: Element> DeviceSlice<T> for CudaAccess<'_, T> {
    fn len(&self) -> usize {
        self.buffer.len()
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T: Element> DevicePtr<T> for CudaAccess<'_, T> {
    fn device_ptr<'s>(&'s self, stream: &'s CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        self.on(stream)
    }
}

impl<T: Element> DevicePtrMut<T> for CudaAccess<'_, T> {
    fn device_ptr_mut<'s>(&'s mut self, stream: &'s CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        self.written();
        self.on(stream)
    }
}

// SAFETY: pushes a pointer to the guard's `CUdeviceptr` field, which lives as long as the
// borrow `'b` that outlives the builder; the kernel receives the device pointer by value.
// Launch on the guard's stream (see `Buffer::cuda_ptr`).
unsafe impl<'a, 'b: 'a, T: Element> PushKernelArg<&'b CudaAccess<'_, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b CudaAccess<'_, T>) -> &mut Self {
        <Self as PushKernelArg<&'b sys::CUdeviceptr>>::arg(self, &arg.ptr)
    }
}

// SAFETY: as for the shared reference.
unsafe impl<'a, 'b: 'a, T: Element> PushKernelArg<&'b mut CudaAccess<'_, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut CudaAccess<'_, T>) -> &mut Self {
        arg.written();
        <Self as PushKernelArg<&'b sys::CUdeviceptr>>::arg(self, &arg.ptr)
    }
}
