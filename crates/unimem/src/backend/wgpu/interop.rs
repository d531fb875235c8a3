//! wgpu interop: a buffer's `wgpu::Buffer` for the caller's shaders, through a guard, and
//! the device's handles (adapter, device, queue) for making pipelines.

use std::num::NonZeroU64;

use super::{GRANULE, Mem, WgpuBackend};
use crate::device::{DeviceId, DeviceKind, MapMode};
use crate::error::{Error, Result};
use crate::{Buffer, Element, MemoryManager};

impl MemoryManager {
    /// The wgpu device `id` (its adapter, device and queue), for running shaders on unimem
    /// memory.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`] when `id` is not a device of this manager,
    /// [`Error::WrongDeviceKind`] when it is not a wgpu device.
    pub fn wgpu_device(&self, id: DeviceId) -> Result<&WgpuBackend> {
        let backend = self.backend_of(id)?;
        backend.downcast_ref().ok_or(Error::WrongDeviceKind {
            device: id,
            expected: DeviceKind::Wgpu,
            found: backend.info().kind,
        })
    }
}

impl<T: Element> Buffer<T> {
    /// The `wgpu::Buffer` of a wgpu buffer, for the caller's shaders, through a guard that
    /// borrows the buffer.
    ///
    /// The buffer is first made ready for `access` on the device: host changes are written
    /// to the device (except for [`MapMode::Write`], which promises the shaders overwrite
    /// every element), and unless `access` is [`MapMode::Read`] the host mirror is dropped,
    /// so the next host access reads the shaders' result. Host-visible buffers (`Pinned`,
    /// `Unified`) are unmapped for the device while the guard lives and until the next host
    /// access, which maps them back after the shaders submitted before it.
    ///
    /// Submit the shaders on the device's queue ([`WgpuBackend::queue`], the only queue a
    /// wgpu device has): they are ordered with unimem's transfers and with the pool's next
    /// user of the memory, without any joining.
    ///
    /// ```no_run
    /// # use unimem::{AllocationMode, MapMode, MemoryManager, DeviceKind};
    /// # let manager = MemoryManager::new();
    /// # let id = manager.devices_of(DeviceKind::Wgpu)[0].id;
    /// let gpu = manager.wgpu_device(id)?;
    /// let mut buffer = manager.allocate_on::<f32>(id, 1024, AllocationMode::Pooled)?;
    /// let access = buffer.wgpu_buffer(MapMode::Write)?;
    /// let binding = access.binding(); // a bind group entry's resource
    /// # let _ = (binding, gpu);
    /// drop(access);
    /// # Ok::<(), unimem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongBackend`] for buffers that are not wgpu memory; transfer errors. The
    /// buffer's contents are unchanged on error.
    pub fn wgpu_buffer(&mut self, access: MapMode) -> Result<WgpuAccess<'_, T>> {
        if self.backend().downcast_ref::<WgpuBackend>().is_none() {
            return Err(self.wrong_backend(DeviceKind::Wgpu));
        }
        self.prepare_device_access(access)?;
        self.begin_device_access(access, None);
        Ok(WgpuAccess { buffer: self })
    }
}

/// A buffer's memory lent to the caller's wgpu shaders (see [`Buffer::wgpu_buffer`]).
#[derive(Debug)]
pub struct WgpuAccess<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
}

impl<T: Element> WgpuAccess<'_, T> {
    /// The `wgpu::Buffer`. It may be larger than the unimem buffer (pooled blocks come in
    /// size classes); the elements are its first [`size`](Self::size) bytes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &Mem::of(self.buffer.raw()).buffer
    }

    /// Bytes the elements take, rounded up to wgpu's 4-byte granule: the size to bind.
    pub fn size(&self) -> u64 {
        (self.buffer.size_in_bytes() as u64).next_multiple_of(GRANULE)
    }

    /// The elements as a binding (offset 0, [`size`](Self::size) bytes; the whole block for
    /// an empty buffer, which a binding cannot be).
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: 0,
            size: NonZeroU64::new(self.size()),
        })
    }
}
