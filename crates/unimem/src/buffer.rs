//! `Buffer<T>`: one typed allocation on one device.

mod view;

pub use view::{BufferView, BufferViewMut, Mapping};

use crate::Element;
use crate::device::{AllocationMode, DeviceId, Location, MapMode, MemoryKind};
use crate::error::{Error, Result};
use crate::pool::Block;
use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Bound, Range, RangeBounds};
use std::ptr::NonNull;

/// A typed buffer on one device, owning its memory.
///
/// Host-addressable memory (CPU, pinned, unified) is read and written in place through
/// [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice). Dropping a pooled
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
    block: ManuallyDrop<Box<Block>>,
    len: usize,
    mode: AllocationMode,
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
    pub(crate) fn new(block: Box<Block>, len: usize, mode: AllocationMode) -> Self {
        Buffer { block: ManuallyDrop::new(block), len, mode, _element: PhantomData }
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
        self.mode
    }

    /// Where the current contents are valid. CPU memory is host memory; pinned and unified
    /// memory is shared by host and device.
    pub fn location(&self) -> Location {
        match (self.device(), self.block.mem.host) {
            (DeviceId::CPU, _) => Location::Host,
            (_, Some(_)) => Location::Both,
            (_, None) => Location::Device,
        }
    }

    pub(crate) fn manager_id(&self) -> u64 {
        self.block.pool.manager_id
    }

    /// The host address of the elements, for host-addressable memory.
    fn host_ptr(&self) -> Result<NonNull<T>> {
        self.block.mem.host.map(NonNull::cast).ok_or(Error::NotHostAddressable { device: self.device() })
    }

    /// The elements, read in place (zero-copy) from host-addressable memory.
    pub fn as_slice(&self) -> Result<&[T]> {
        let ptr = self.host_ptr()?;
        // SAFETY: the block's memory holds at least `len * size_of::<T>()` initialised bytes
        // (fresh memory is zeroed, reused memory holds earlier `T: Pod` writes), aligned for
        // `T` (alignment checked when the buffer was made), and owned by this buffer; `&self`
        // rules out writes through the buffer while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) })
    }

    /// The elements, written in place (zero-copy) in host-addressable memory.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        let ptr = self.host_ptr()?;
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference to the memory.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len) })
    }

    /// Copies `src` into the buffer starting at element `offset`.
    ///
    /// Fails with [`Error::OutOfBounds`] if `offset + src.len()` passes the end; the buffer
    /// is unchanged then. The copy is complete when the future resolves; dropping the future
    /// before it is polled copies nothing.
    pub async fn copy_from(&mut self, src: &[T], offset: usize) -> Result<()> {
        self.copy_from_blocking(src, offset)
    }

    /// Copies `src` into the buffer starting at element `offset`, waiting for completion.
    pub fn copy_from_blocking(&mut self, src: &[T], offset: usize) -> Result<()> {
        check_range(offset, src.len(), self.len)?;
        let dst = self.as_mut_slice()?;
        dst[offset..offset + src.len()].copy_from_slice(src);
        Ok(())
    }

    /// Copies elements starting at `offset` into all of `dst`.
    ///
    /// Fails with [`Error::OutOfBounds`] if `offset + dst.len()` passes the end; `dst` is
    /// unchanged then.
    pub async fn copy_to(&self, dst: &mut [T], offset: usize) -> Result<()> {
        self.copy_to_blocking(dst, offset)
    }

    /// Copies elements starting at `offset` into all of `dst`, waiting for completion.
    pub fn copy_to_blocking(&self, dst: &mut [T], offset: usize) -> Result<()> {
        check_range(offset, dst.len(), self.len)?;
        let src = self.as_slice()?;
        dst.copy_from_slice(&src[offset..offset + dst.len()]);
        Ok(())
    }

    /// Copies all of `src`, which must have the same length, into this buffer.
    pub fn copy_from_buffer(&mut self, src: &Buffer<T>) -> Result<()> {
        if src.len != self.len {
            return Err(Error::LengthMismatch { destination: self.len, source_len: src.len });
        }
        let src = src.as_slice()?;
        self.copy_from_blocking(src, 0)
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

    /// Maps the buffer for host access; the guard gives the elements as a slice and writes
    /// back (where the memory is not host memory) when dropped.
    pub fn map(&mut self, mode: MapMode) -> Result<Mapping<'_, T>> {
        Mapping::new(self, mode)
    }
}

impl<T: Element> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `block` is not used after it is taken.
        let block = unsafe { ManuallyDrop::take(&mut self.block) };
        block.recycle(self.size_in_bytes());
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
            .field("mode", &self.mode)
            .finish()
    }
}
