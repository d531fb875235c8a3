//! `Buffer<T>`: one typed allocation on one device.

mod coherence;
mod view;

pub(crate) use coherence::Coherence;

pub use view::{BufferView, BufferViewMut, Mapping};

use crate::Element;
use crate::backend::{Backend, Fence, Queue, RawAllocation};
use crate::device::{AllocationMode, DeviceId, Location, MapMode, MemoryKind};
use crate::error::{Error, Result};
use crate::host_lines::HostLines;
use crate::pool::Block;
use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Bound, Range, RangeBounds};
use std::ptr::NonNull;
use std::sync::Arc;

/// One end of a transfer, as the transfer engine sees it before it commits to a path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub device: DeviceId,
    pub manager: u64,
    /// The host reads (or writes) the contents in place.
    pub host: bool,
    /// Host-visible memory of an accelerator, which its own queue can copy to and from.
    pub dma: bool,
}

/// One end of a transfer, resolved: bytes the host reaches (a raw slice, so that no Rust
/// reference exists while a device copies it), or a range of device memory.
pub(crate) enum Side<'a> {
    Host(HostRange),
    Device { pool: &'a std::sync::Arc<crate::pool::DevicePool>, mem: &'a RawAllocation, offset: usize },
}

/// Host bytes of a transfer's end, by address.
#[derive(Clone, Copy)]
pub(crate) struct HostRange(pub NonNull<[u8]>);

// SAFETY: a `HostRange` points into memory that the transfer borrows from its buffer (`&`
// for a source, `&mut` for a destination) for as long as the range is used; moving or
// sharing that borrow across threads is as sound as doing so with the reference it came from.
unsafe impl Send for HostRange {}
// SAFETY: as for Send.
unsafe impl Sync for HostRange {}

/// The host copy of a device buffer's contents.
type HostMirror = HostLines;

/// A typed buffer on one device, owning its memory.
///
/// Host-addressable memory (CPU, pinned, unified) is read and written in place through
/// [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice).
///
/// Device memory the host cannot address (an OpenCL device buffer) is kept coherent with a
/// host mirror, made on first host access. [`location`](Self::location) says which side is
/// current: host access through `&mut` marks the host side newer, device writes (copies
/// into the buffer, raw handles taken for writing) mark the device side newer, and reading
/// the stale side synchronises it first, copying only when needed. Copies into a buffer
/// whose mirror is stale go straight to the device, so overwriting a whole buffer from the
/// host copies nothing back first. Statistics count every synchronising copy
/// (`syncs_to_host`, `syncs_to_device`).
///
/// Dropping a pooled
/// buffer returns its memory to the pool it came from; `Drop` never panics and never blocks.
///
/// A pooled buffer may own more memory than `len` elements (its size class); nothing past
/// `len` is reachable through it. Contents of fresh memory are zero; memory reused from the
/// pool keeps what its previous user wrote.
///
/// ```
/// use unimem::{AllocationMode, MemoryManager};
///
/// let manager = MemoryManager::new();
/// let mut buffer = manager.allocate::<f32>(1000, AllocationMode::Pooled)?;
/// buffer.copy_from_blocking(&[1.0, 2.0, 3.0], 10)?;
/// assert_eq!(&buffer.as_slice()?[10..13], &[1.0, 2.0, 3.0]);
/// assert_eq!(buffer.size_in_bytes(), 4000);
/// # Ok::<(), unimem::Error>(())
/// ```
pub struct Buffer<T: Element> {
    /// The memory, with the buffer's mode and coherence state ([`Coherence`]): kept with
    /// the block, so that a buffer is two words (moved in registers, copied without partial
    /// stores) and the common drop reads only the block it returns.
    block: ManuallyDrop<Box<Block>>,
    len: usize,
    _element: PhantomData<T>,
}

/// Checks that `offset..offset + len` lies within `buffer_len` elements.
pub(crate) fn check_range(offset: usize, len: usize, buffer_len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= buffer_len => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, buffer_len }),
    }
}

/// Resolves a range argument against a length.
pub(crate) fn resolve_range(range: impl RangeBounds<usize>, len: usize) -> Result<Range<usize>> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => {
            s.checked_add(1).ok_or(Error::OutOfBounds { offset: s, len: 1, buffer_len: len })?
        }
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => {
            e.checked_add(1).ok_or(Error::OutOfBounds { offset: e, len: 1, buffer_len: len })?
        }
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    if start > end {
        return Err(Error::InvalidRange { start, end });
    }
    check_range(start, end - start, len)?;
    Ok(start..end)
}

impl<T: Element> Buffer<T> {
    #[inline(always)]
    pub(crate) fn new(mut block: Box<Block>, len: usize, mode: AllocationMode) -> Self {
        block.mode = mode;
        Self::from_block(block, len)
    }

    /// A buffer of `len` elements on `block`, whose mode is already set.
    #[inline(always)]
    pub(crate) fn from_block(block: Box<Block>, len: usize) -> Self {
        Buffer { block: ManuallyDrop::new(block), len, _element: PhantomData }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the elements in bytes (`len * size_of::<T>()`, checked when the buffer was made).
    pub fn size_in_bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    /// Bytes of memory the buffer owns: its size class, at least `size_in_bytes`.
    pub fn capacity_in_bytes(&self) -> usize {
        self.block.capacity()
    }

    /// The device that owns the memory.
    pub fn device(&self) -> DeviceId {
        self.block.pool.device
    }

    /// The kind of memory.
    pub fn memory_kind(&self) -> MemoryKind {
        self.block.pool.kind
    }

    /// How the memory was obtained.
    pub fn mode(&self) -> AllocationMode {
        self.block.mode
    }

    /// Where the current contents are valid. CPU memory is host memory; pinned and unified
    /// memory is shared by host and device.
    pub fn location(&self) -> Location {
        match (self.device(), self.block.mem.host) {
            (DeviceId::CPU, _) => Location::Host,
            (_, Some(_)) => Location::Both,
            (_, None) => match (self.block.coherence.mirror().is_some(), self.block.coherence.host_newer()) {
                (false, _) => Location::Device,
                (true, false) => Location::Both,
                (true, true) => Location::Host,
            },
        }
    }

    /// Whether the memory is device memory the host reaches only through copies.
    #[inline]
    fn is_device_only(&self) -> bool {
        self.block.mem.host.is_none()
    }

    /// The backend, for an operation on the memory. Unimem's queue is first ordered after
    /// the last use of the memory by a caller's queue (enqueued, not waited for).
    fn ops(&self) -> Result<&dyn Backend> {
        let pool = &self.block.pool;
        if self.block.coherence.last_use_pending() {
            if let (Some(fence), Some(queue)) = (self.block.coherence.last_use(), pool.queue()) {
                queue.order_after(fence).map_err(Error::on(pool.device))?;
            }
            self.block.coherence.last_use_ordered();
        }
        Ok(pool.backend())
    }

    /// The device's queue, for an operation that completes asynchronously or orders itself
    /// (ordered after a caller's last use first, as in `ops`).
    fn queue(&self) -> Result<Option<&dyn Queue>> {
        self.ops()?;
        Ok(self.block.pool.queue())
    }

    /// Zeroed host memory for a mirror of this buffer, or out of memory.
    fn new_mirror(&self) -> Result<HostMirror> {
        let bytes = self.size_in_bytes();
        HostMirror::zeroed(bytes).map_err(|_| self.block.pool.host_out_of_memory(bytes))
    }

    /// The host mirror, made (one copy from the device) if there is none.
    fn mirror(&self) -> Result<&HostMirror> {
        if let Some(mirror) = self.block.coherence.mirror() {
            return Ok(mirror);
        }
        let bytes = self.size_in_bytes();
        let mut mirror = self.new_mirror()?;
        let pool = &self.block.pool;
        if bytes > 0 {
            // SAFETY: the memory has no host pointer and came from this pool's backend; the
            // range is the buffer's own bytes.
            unsafe { self.ops()?.read(&self.block.mem, 0, mirror.bytes_mut(bytes)) }
                .map_err(Error::on(pool.device))?;
            pool.count_sync(true);
        }
        // A thread that raced us read the same device contents (device writes need `&mut`).
        Ok(self.block.coherence.init_mirror(mirror))
    }

    /// Makes the device side current: writes the mirror back if the host side is newer.
    fn flush(&mut self) -> Result<()> {
        if !self.block.coherence.host_newer() {
            return Ok(());
        }
        let bytes = self.size_in_bytes();
        if let Some(mirror) = self.block.coherence.mirror().filter(|_| bytes > 0) {
            let pool = &self.block.pool;
            // SAFETY: as in `mirror`.
            unsafe { self.ops()?.write(&self.block.mem, 0, mirror.bytes(bytes)) }
                .map_err(Error::on(pool.device))?;
            pool.count_sync(false);
        }
        self.block.coherence.set_host_newer(false);
        Ok(())
    }

    /// Forgets the host mirror: the device is about to change the contents.
    fn invalidate_mirror(&mut self) {
        self.block.coherence.drop_mirror();
    }

    /// The memory, for the backend's own interop code.
    pub(crate) fn raw(&self) -> &RawAllocation {
        &self.block.mem
    }

    /// The backend that owns the memory, for its own interop code.
    pub(crate) fn backend(&self) -> &dyn Backend {
        self.block.pool.backend()
    }

    /// The error for a raw-access call of the `expected` backend on this buffer of another.
    pub(crate) fn wrong_backend(&self, expected: crate::DeviceKind) -> Error {
        Error::WrongBackend {
            device: self.device(),
            expected,
            found: self.backend().info().kind,
            mode: self.block.mode,
        }
    }

    /// The error for a raw-access call of the right backend but another kind of memory.
    #[allow(dead_code, reason = "for backends whose raw access depends on the kind of memory")]
    pub(crate) fn unsupported_mode(&self) -> Error {
        Error::UnsupportedMode { device: self.device(), mode: self.block.mode }
    }

    /// Records `fence`, after a caller's queue's last use of the memory (its raw-access guard
    /// dropped): unimem's next use of the memory, and the pool's next user of it once the
    /// buffer is dropped, are ordered after it.
    #[cfg_attr(
        not(any(feature = "opencl", feature = "cuda")),
        allow(dead_code, reason = "used by the OpenCL and CUDA backends")
    )]
    pub(crate) fn record_last_use(&mut self, fence: Fence) {
        self.block.coherence.set_last_use(Some(fence));
    }

    pub(crate) fn manager_id(&self) -> u64 {
        self.block.pool.manager_id
    }

    /// The host address of the elements, for host-addressable memory, after any device work
    /// that a raw handle may have enqueued on it.
    #[inline]
    fn host_ptr(&self) -> Result<NonNull<T>> {
        let host = self
            .block
            .mem
            .host
            .map(NonNull::cast)
            .ok_or_else(|| Error::NotHostAddressable { device: self.device() })?;
        if self.block.coherence.device_pending() {
            let pool = &self.block.pool;
            if let Some(queue) = self.queue()? {
                queue.before_host_access(&self.block.mem, pool.kind).map_err(Error::on(pool.device))?;
            }
            self.block.coherence.device_done();
        }
        Ok(host)
    }

    /// Makes the buffer ready for a user's kernels to `access` it through a raw handle:
    /// host changes are written to the device first (except for [`MapMode::Write`], which
    /// promises the kernel overwrites every element), and unless `access` is
    /// [`MapMode::Read`] the host mirror is dropped, so the next host access reads the
    /// device's result. Host-visible memory is waited for before the next host access.
    ///
    /// Nothing is lost if this fails, or if the caller's own ordering step fails after it:
    /// the host copy is dropped only by [`begin_device_access`](Self::begin_device_access),
    /// which the caller calls last.
    pub(crate) fn prepare_device_access(&mut self, access: MapMode) -> Result<()> {
        self.ops()?;
        if self.is_device_only() {
            if access != MapMode::Write {
                self.flush()?;
            }
            return Ok(());
        }
        let pool = &self.block.pool;
        if let Some(queue) = pool.queue() {
            queue.before_device_access(&self.block.mem, pool.kind).map_err(Error::on(pool.device))?;
        }
        self.block.coherence.mark_device_pending_mut();
        Ok(())
    }

    /// Hands the memory to the caller's kernels once `prepare_device_access` and the
    /// caller's ordering succeeded: unless `access` is [`MapMode::Read`] the host mirror is
    /// dropped, and `last_use`, a conservative fence for the caller's queue (its whole
    /// queue, joined at unimem's next use) that the guard replaces with an exact one when it
    /// drops, covers the caller's work even if the guard is leaked. `None` for unimem's own
    /// queue, which orders itself.
    pub(crate) fn begin_device_access(&mut self, access: MapMode, last_use: Option<Fence>) {
        if access != MapMode::Read {
            self.invalidate_mirror();
        }
        self.block.coherence.set_last_use(last_use);
    }

    /// The device side was written through a raw pointer lent for reading only (cudarc's
    /// `DevicePtrMut`): the host mirror is stale.
    #[allow(dead_code, reason = "for backends whose guards can be written through after all")]
    pub(crate) fn device_written(&mut self) {
        self.invalidate_mirror();
    }

    /// The elements, read in place (zero-copy) from host-addressable memory, or from the
    /// host mirror of device memory (made, by one copy, if the host side is stale).
    #[inline]
    pub fn as_slice(&self) -> Result<&[T]> {
        if self.is_device_only() {
            let bytes = self.size_in_bytes();
            return Ok(bytemuck::cast_slice(self.mirror()?.bytes(bytes)));
        }
        let ptr = self.host_ptr()?;
        // SAFETY: the block's memory holds at least `len * size_of::<T>()` initialised bytes
        // (fresh memory is zeroed, reused memory holds earlier `T: Pod` writes), aligned for
        // `T` (alignment checked when the buffer was made), and owned by this buffer; `&self`
        // rules out writes through the buffer while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) })
    }

    /// The elements, written in place (zero-copy) in host-addressable memory, or in the
    /// host mirror of device memory (synchronised first if stale), which then counts as
    /// newer than the device.
    #[inline]
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        if self.is_device_only() {
            self.mirror()?;
            return Ok(bytemuck::cast_slice_mut(self.mirror_mut()));
        }
        let ptr = self.host_ptr()?;
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference to the memory.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len) })
    }

    /// Copies `src` into the buffer starting at element `offset`; the copy is complete when
    /// the future resolves.
    ///
    /// For device memory the first poll copies `src` into staging memory that the transfer
    /// owns and enqueues the device write: `src` is never read after that, and the write
    /// completes (in queue order, before any later use of the buffer) even if the future is
    /// then dropped or leaked. A future dropped before its first poll copies nothing.
    /// Completion comes from a driver callback; nothing polls the device.
    ///
    /// Fails with [`Error::OutOfBounds`] if `offset + src.len()` passes the end; the buffer
    /// is unchanged then.
    pub async fn copy_from(&mut self, src: &[T], offset: usize) -> Result<()> {
        check_range(offset, src.len(), self.len)?;
        if src.is_empty() || !self.is_device_only() || self.block.coherence.host_newer() {
            return self.copy_from_blocking(src, offset);
        }
        let device = self.device();
        let Some(queue) = self.queue()? else { return self.copy_from_blocking(src, offset) };
        // SAFETY: device memory of this pool's backend; `check_range` bounds the range.
        let pending =
            unsafe { queue.write_async(&self.block.mem, offset * size_of::<T>(), bytemuck::cast_slice(src)) }
                .map_err(Error::on(device))?;
        self.write_mirror(src, offset);
        pending.await.map(drop).map_err(Error::on(device))
    }

    /// Copies `src` into the buffer starting at element `offset`, waiting for completion.
    pub fn copy_from_blocking(&mut self, src: &[T], offset: usize) -> Result<()> {
        check_range(offset, src.len(), self.len)?;
        if src.is_empty() {
            return Ok(());
        }
        if self.is_device_only() && !self.block.coherence.host_newer() {
            let pool = &self.block.pool;
            let at = offset * size_of::<T>();
            // SAFETY: device memory of this pool's backend; `check_range` bounds the range.
            unsafe { self.ops()?.write(&self.block.mem, at, bytemuck::cast_slice(src)) }
                .map_err(Error::on(pool.device))?;
            self.write_mirror(src, offset);
            return Ok(());
        }
        let dst = self.as_mut_slice()?;
        dst[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    /// Copies elements starting at `offset` into all of `dst`; the copy is complete when the
    /// future resolves.
    ///
    /// For device memory whose host mirror is stale, the device writes into staging memory
    /// that the transfer owns, and `dst` is filled from it when the future resolves: a
    /// future dropped or leaked mid-flight never writes `dst`, and the device never touches
    /// it. Completion comes from a driver callback; nothing polls the device.
    ///
    /// Fails with [`Error::OutOfBounds`] if `offset + dst.len()` passes the end; `dst` is
    /// unchanged then.
    pub async fn copy_to(&self, dst: &mut [T], offset: usize) -> Result<()> {
        check_range(offset, dst.len(), self.len)?;
        if dst.is_empty() || !self.is_device_only() || self.block.coherence.mirror().is_some() {
            return self.copy_to_blocking(dst, offset);
        }
        let device = self.device();
        let bytes = size_of_val(dst);
        let Some(queue) = self.queue()? else { return self.copy_to_blocking(dst, offset) };
        // SAFETY: device memory of this pool's backend; `check_range` bounds the range.
        let pending = unsafe { queue.read_async(&self.block.mem, offset * size_of::<T>(), bytes) }
            .map_err(Error::on(device))?;
        let staged = pending.await.map_err(Error::on(device))?;
        bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(staged.bytes(bytes));
        Ok(())
    }

    /// A current mirror stays current when the device is written: the same elements are
    /// written there.
    fn write_mirror(&mut self, src: &[T], offset: usize) {
        let bytes = self.size_in_bytes();
        if let Some(mirror) = self.block.coherence.mirror_mut() {
            let at = offset * size_of::<T>();
            mirror.bytes_mut(bytes)[at..at + size_of_val(src)].copy_from_slice(bytemuck::cast_slice(src));
        }
    }

    /// Copies elements starting at `offset` into all of `dst`, waiting for completion.
    pub fn copy_to_blocking(&self, dst: &mut [T], offset: usize) -> Result<()> {
        check_range(offset, dst.len(), self.len)?;
        if dst.is_empty() {
            return Ok(());
        }
        if self.is_device_only() && self.block.coherence.mirror().is_none() {
            let pool = &self.block.pool;
            // SAFETY: as in `copy_from_blocking`.
            unsafe {
                self.ops()?.read(&self.block.mem, offset * size_of::<T>(), bytemuck::cast_slice_mut(dst))
            }
            .map_err(Error::on(pool.device))?;
            return Ok(());
        }
        let src = self.as_slice()?;
        dst.copy_from_slice(&src[offset..offset + dst.len()]);
        Ok(())
    }

    /// What the transfer engine needs to know to choose a path, with no side effects.
    /// A device buffer whose host mirror holds writes the device has not seen is, as a
    /// source, host memory (the mirror).
    pub(crate) fn transfer_shape(&self, as_source: bool) -> Shape {
        let pool = &self.block.pool;
        Shape {
            device: pool.device,
            manager: pool.manager_id,
            host: !self.is_device_only() || (as_source && self.block.coherence.host_newer()),
            dma: pool.device != DeviceId::CPU && pool.kind == MemoryKind::Pinned,
        }
    }

    /// The source side of a transfer of the element `range` (checked by the caller): host
    /// bytes (in place, or the newer host mirror), or device memory with unimem's queue
    /// ordered after a caller's last use. With `device_use` (the device copies host-visible
    /// memory in place) the memory is marked as in device use, so that host access waits
    /// for the transfer's device commands, even if the transfer is dropped mid-flight.
    pub(crate) fn transfer_source(&self, range: Range<usize>, device_use: bool) -> Result<Side<'_>> {
        let bytes = range.start * size_of::<T>()..range.end * size_of::<T>();
        if !self.is_device_only() {
            let all: &[u8] = bytemuck::cast_slice(self.as_slice()?);
            if device_use {
                self.block.coherence.mark_device_pending();
            }
            return Ok(Side::Host(HostRange(NonNull::from(&all[bytes]))));
        }
        if self.block.coherence.host_newer() {
            let all = self.mirror()?.bytes(self.size_in_bytes());
            return Ok(Side::Host(HostRange(NonNull::from(&all[bytes]))));
        }
        self.ops()?;
        Ok(Side::Device { pool: &self.block.pool, mem: &self.block.mem, offset: bytes.start })
    }

    /// The destination side of a transfer into the element `range` (checked by the
    /// caller). Device memory: host changes outside the range are written to the device
    /// first, and the mirror is dropped (the device is about to hold the newer contents).
    /// `device_use` as for `transfer_source`.
    pub(crate) fn transfer_destination(&mut self, range: Range<usize>, device_use: bool) -> Result<Side<'_>> {
        let bytes = range.start * size_of::<T>()..range.end * size_of::<T>();
        if !self.is_device_only() {
            let start = self.host_ptr()?.cast::<u8>();
            if device_use {
                self.block.coherence.mark_device_pending_mut();
            }
            // SAFETY: `bytes` lies within the `size_in_bytes()` host-addressable bytes at
            // `start` (the caller checked the range; see `as_slice`), so the offset stays in
            // the allocation; only the address is computed, nothing is read.
            let first = unsafe { start.add(bytes.start) };
            return Ok(Side::Host(HostRange(NonNull::slice_from_raw_parts(first, bytes.len()))));
        }
        if self.block.coherence.host_newer() && range.len() < self.len {
            self.flush()?;
        }
        self.ops()?;
        self.invalidate_mirror();
        Ok(Side::Device { pool: &self.block.pool, mem: &self.block.mem, offset: bytes.start })
    }

    /// Copies all of `src`, which must have the same length, into this buffer, through the
    /// transfer engine of the manager that made this buffer (see
    /// [`MemoryManager::transfer`](crate::MemoryManager::transfer), which also takes views
    /// and reports the path it took).
    pub fn copy_from_buffer(&mut self, src: &Buffer<T>) -> Result<()> {
        let pool = Arc::clone(&self.block.pool);
        crate::transfer::block_on(pool.engine().run(src.into(), self.into(), &Default::default())).map(drop)
    }

    /// Sets every element to `value`: on the device, without a host copy, where the
    /// backend fills memory with a pattern of the element's size (OpenCL: 1 to 128 bytes, a
    /// power of two; CUDA: 4-byte elements, or any element whose bytes are all equal);
    /// through the host otherwise.
    pub fn fill(&mut self, value: T) -> Result<()> {
        self.fill_range(0..self.len, value)
    }

    /// Sets the elements of `range` (checked by the caller) to `value`, as `fill` does.
    pub(crate) fn fill_range(&mut self, range: Range<usize>, value: T) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        if self.is_device_only() {
            let (at, bytes) = (range.start * size_of::<T>(), range.len() * size_of::<T>());
            // The host's changes outside the range must reach the device first.
            if range.len() < self.len {
                self.flush()?;
            }
            // SAFETY: device memory of this pool's backend; the range is the buffer's own.
            let filled = unsafe { self.ops()?.fill(&self.block.mem, at, bytes, bytemuck::bytes_of(&value)) }
                .map_err(Error::on(self.device()))?;
            if filled {
                let size = self.size_in_bytes();
                if let Some(mirror) = self.block.coherence.mirror_mut() {
                    bytemuck::cast_slice_mut::<u8, T>(mirror.bytes_mut(size))[range].fill(value);
                }
                self.block.coherence.set_host_newer(false);
                return Ok(());
            }
            if range.len() == self.len {
                // Nothing of the device's contents survives: no copy from it.
                self.map(MapMode::Write)?.fill(value);
                return Ok(());
            }
        }
        self.as_mut_slice()?[range].fill(value);
        Ok(())
    }

    /// The elements, copied into a new vector.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        self.copy_to_blocking(&mut out, 0)?;
        Ok(out)
    }

    /// A read-only view of `range`, whose offsets count from the range's start.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'_, T>> {
        let range = resolve_range(range, self.len)?;
        Ok(BufferView::new(self, range))
    }

    /// A writable view of `range`, whose offsets count from the range's start.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let range = resolve_range(range, self.len)?;
        Ok(BufferViewMut::new(self, range))
    }

    /// Maps the buffer for host access. For device memory, [`MapMode::Write`] skips the
    /// copy from the device (the caller promises to overwrite everything: the guard starts
    /// zeroed), the other modes read it if the host side is stale; writing through the
    /// guard marks the host side newer. A mapping that is never written (dropped early by a
    /// `?` or a panic, or leaked) leaves the buffer exactly as it was.
    pub fn map(&mut self, mode: MapMode) -> Result<Mapping<'_, T>> {
        if !self.is_device_only() {
            self.host_ptr()?;
            return Ok(Mapping::new(self, mode, None));
        }
        if mode == MapMode::Write && self.block.coherence.mirror().is_none() {
            // The zeroed contents stay the guard's until it is written and dropped.
            let scratch = self.new_mirror()?;
            return Ok(Mapping::new(self, mode, Some(scratch)));
        }
        self.mirror()?;
        Ok(Mapping::new(self, mode, None))
    }

    /// Installs a written [`MapMode::Write`] mapping's contents as the host side, newer
    /// than the device.
    pub(crate) fn install_mirror(&mut self, mirror: HostMirror) {
        self.block.coherence.install_mirror(mirror);
    }

    /// The mirror of device memory, marked newer than the device. Call after `mirror()`.
    fn mirror_mut(&mut self) -> &mut [u8] {
        self.block.coherence.set_host_newer(true);
        let bytes = self.size_in_bytes();
        match self.block.coherence.mirror_mut() {
            Some(mirror) => mirror.bytes_mut(bytes),
            None => &mut [],
        }
    }

    /// Host elements for a mapping (made ready by `map`).
    pub(crate) fn mapped(&self) -> &[T] {
        self.as_slice().unwrap_or(&[])
    }

    /// Host elements for a mapping, marked written.
    pub(crate) fn mapped_mut(&mut self) -> &mut [T] {
        self.as_mut_slice().unwrap_or(&mut [])
    }
}

impl<T: Element> Drop for Buffer<T> {
    /// The common case (host memory, or device memory the host never looked at and no
    /// caller's queue touched) is inlined: the block goes back to its pool's cache.
    #[inline(always)]
    fn drop(&mut self) {
        if self.block.coherence.in_use() {
            return self.drop_slow();
        }
        // SAFETY: `drop` runs once and `block` is not used after it is taken.
        let block = unsafe { ManuallyDrop::take(&mut self.block) };
        block.recycle(self.size_in_bytes());
    }
}

impl<T: Element> Buffer<T> {
    /// `Drop` for a buffer with a host mirror, or whose memory a device or a caller's queue
    /// used last.
    #[cold]
    #[inline(never)]
    fn drop_slow(&mut self) {
        // Enqueued, not waited for: the block's fence (or the stream order) then keeps its
        // next user after the caller's streams.
        let unordered = self.block.coherence.last_use_pending() && self.ops().is_err();
        if self.block.coherence.device_pending() {
            let pool = &self.block.pool;
            // An error leaves the memory with the device; freeing it still works.
            let _ = pool.queue().map(|queue| queue.return_to_host(&self.block.mem, pool.kind));
        }
        // SAFETY: `drop` runs once and `block` is not used after it is taken.
        let mut block = unsafe { ManuallyDrop::take(&mut self.block) };
        // The block's next user starts from a clean state (the mirror is freed here).
        let last_use = block.coherence.reset();
        match last_use.filter(|_| unordered) {
            // Unimem's queue could not be ordered after the caller's last use, which may
            // still run: not pooled, and freed once that use has completed (waited for on
            // the reaper thread, not here).
            Some(fence) => block.give_up_after(self.size_in_bytes(), move |_| drop(fence.wait())),
            None => block.recycle(self.size_in_bytes()),
        }
    }
}

impl<T: Element> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("element", &std::any::type_name::<T>())
            .field("len", &self.len)
            .field("capacity_in_bytes", &self.capacity_in_bytes())
            .field("device", &self.device())
            .field("kind", &self.memory_kind())
            .field("mode", &self.block.mode)
            .finish()
    }
}
