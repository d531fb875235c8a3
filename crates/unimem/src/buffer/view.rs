//! Views into part of a buffer, and mapping guards.

use super::{Buffer, check_range, resolve_range};
use crate::Element;
use crate::device::MapMode;
use crate::error::Result;
use crate::host_lines::HostLines;
use std::ops::{Deref, DerefMut, Range, RangeBounds};

/// A read-only view of `range` of a [`Buffer`]. Offsets given to its methods count from the
/// start of the range, and nothing outside the range is reachable.
#[derive(Debug, Clone)]
pub struct BufferView<'a, T: Element> {
    buffer: &'a Buffer<T>,
    range: Range<usize>,
}

/// A writable view of `range` of a [`Buffer`].
#[derive(Debug)]
pub struct BufferViewMut<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
    range: Range<usize>,
}

impl<'a, T: Element> BufferView<'a, T> {
    pub(super) fn new(buffer: &'a Buffer<T>, range: Range<usize>) -> Self {
        BufferView { buffer, range }
    }

    /// The buffer and the range, for the transfer engine.
    pub(crate) fn into_parts(self) -> (&'a Buffer<T>, Range<usize>) {
        (self.buffer, self.range)
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Offset of the view in its buffer.
    pub fn offset(&self) -> usize {
        self.range.start
    }

    /// The elements of the view, in place.
    pub fn as_slice(&self) -> Result<&'a [T]> {
        Ok(&self.buffer.as_slice()?[self.range.clone()])
    }

    /// Copies elements from `offset` (within the view) into all of `dst`.
    pub fn copy_to_blocking(&self, dst: &mut [T], offset: usize) -> Result<()> {
        check_range(offset, dst.len(), self.len())?;
        self.buffer.copy_to_blocking(dst, self.range.start + offset)
    }

    /// Asynchronous twin of [`copy_to_blocking`](Self::copy_to_blocking).
    pub async fn copy_to(&self, dst: &mut [T], offset: usize) -> Result<()> {
        self.copy_to_blocking(dst, offset)
    }

    /// A narrower view; `range` counts from this view's start.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'a, T>> {
        Ok(BufferView { buffer: self.buffer, range: narrow(&self.range, range)? })
    }

    /// The view's elements, copied into a new vector.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len()];
        self.copy_to_blocking(&mut out, 0)?;
        Ok(out)
    }
}

/// `range`, counted from the start of `outer`, as a range of the buffer.
fn narrow(outer: &Range<usize>, range: impl RangeBounds<usize>) -> Result<Range<usize>> {
    let r = resolve_range(range, outer.len())?;
    Ok(outer.start + r.start..outer.start + r.end)
}

impl<T: Element> BufferViewMut<'_, T> {
    pub(super) fn new(buffer: &mut Buffer<T>, range: Range<usize>) -> BufferViewMut<'_, T> {
        BufferViewMut { buffer, range }
    }

    /// The buffer and the range, for the transfer engine.
    pub(crate) fn parts_mut(&mut self) -> (&mut Buffer<T>, Range<usize>) {
        (self.buffer, self.range.clone())
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Offset of the view in its buffer.
    pub fn offset(&self) -> usize {
        self.range.start
    }

    /// The elements of the view, in place.
    pub fn as_slice(&self) -> Result<&[T]> {
        Ok(&self.buffer.as_slice()?[self.range.clone()])
    }

    /// The elements of the view, writable in place.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        let range = self.range.clone();
        Ok(&mut self.buffer.as_mut_slice()?[range])
    }

    /// Copies elements from `offset` (within the view) into all of `dst`.
    pub fn copy_to_blocking(&self, dst: &mut [T], offset: usize) -> Result<()> {
        check_range(offset, dst.len(), self.len())?;
        self.buffer.copy_to_blocking(dst, self.range.start + offset)
    }

    /// Copies `src` into the view at `offset` (within the view).
    pub fn copy_from_blocking(&mut self, src: &[T], offset: usize) -> Result<()> {
        check_range(offset, src.len(), self.len())?;
        self.buffer.copy_from_blocking(src, self.range.start + offset)
    }

    /// Asynchronous twin of [`copy_from_blocking`](Self::copy_from_blocking).
    pub async fn copy_from(&mut self, src: &[T], offset: usize) -> Result<()> {
        self.copy_from_blocking(src, offset)
    }

    /// A read-only view of part of this view; `range` counts from this view's start.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'_, T>> {
        Ok(BufferView { buffer: self.buffer, range: narrow(&self.range, range)? })
    }

    /// A writable view of part of this view; `range` counts from this view's start. It
    /// borrows this view, so views nest as deep as needed.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let range = narrow(&self.range, range)?;
        Ok(BufferViewMut { buffer: self.buffer, range })
    }

    /// Sets every element of the view to `value`.
    pub fn fill(&mut self, value: T) -> Result<()> {
        self.buffer.fill_range(self.range.clone(), value)
    }

    /// The view's elements, copied into a new vector.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.slice(..)?.to_vec()
    }

    /// Maps the view for host access, as [`Buffer::map`] maps a whole buffer, except that a
    /// [`MapMode::Write`] mapping of device memory reads the buffer's device side first
    /// when the host has no current copy: the elements outside the view must survive the
    /// write-back.
    pub fn map(&mut self, mode: MapMode) -> Result<Mapping<'_, T>> {
        let range = self.range.clone();
        let mode_for_buffer = if mode == MapMode::Write { MapMode::ReadWrite } else { mode };
        let mut mapping = self.buffer.map(mode_for_buffer)?;
        mapping.mode = mode;
        mapping.range = range;
        Ok(mapping)
    }
}

/// Host access to a buffer, or a view of one, for as long as the guard lives.
///
/// For host-addressable memory the guard is the memory itself; for device memory it is the
/// host mirror. Only a mutable borrow marks the host side as changed, so a mapping that is
/// only read leaves the device side current.
pub struct Mapping<'a, T: Element> {
    buffer: &'a mut Buffer<T>,
    mode: MapMode,
    /// The elements mapped: the whole buffer, or a view's range.
    range: Range<usize>,
    written: bool,
    /// A [`MapMode::Write`] mapping of device memory with no host mirror: zeroed host memory
    /// that becomes the buffer's host side only once written and the guard dropped.
    scratch: Option<HostLines>,
}

impl<'a, T: Element> Mapping<'a, T> {
    /// `buffer` is ready for host access (checked and synchronised by `Buffer::map`), or
    /// `scratch` stands in for it.
    pub(super) fn new(buffer: &'a mut Buffer<T>, mode: MapMode, scratch: Option<HostLines>) -> Self {
        let range = 0..buffer.len();
        Mapping { buffer, mode, range, written: false, scratch }
    }

    /// The mode the mapping was made with.
    pub fn mode(&self) -> MapMode {
        self.mode
    }

    /// Whether the mapping was borrowed mutably (and so counts as written).
    pub fn written(&self) -> bool {
        self.written
    }
}

impl<T: Element> std::fmt::Debug for Mapping<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("mode", &self.mode).field("written", &self.written).finish()
    }
}

impl<T: Element> Deref for Mapping<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let all = match &self.scratch {
            Some(scratch) => bytemuck::cast_slice(scratch.bytes(self.buffer.size_in_bytes())),
            None => self.buffer.mapped(),
        };
        all.get(self.range.clone()).unwrap_or(&[])
    }
}

impl<T: Element> DerefMut for Mapping<'_, T> {
    /// Marks the host side newer: the device sees these writes before its next use.
    fn deref_mut(&mut self) -> &mut [T] {
        self.written = true;
        let bytes = self.buffer.size_in_bytes();
        let all = match &mut self.scratch {
            Some(scratch) => bytemuck::cast_slice_mut(scratch.bytes_mut(bytes)),
            None => self.buffer.mapped_mut(),
        };
        all.get_mut(self.range.clone()).unwrap_or(&mut [])
    }
}

impl<T: Element> Drop for Mapping<'_, T> {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take().filter(|_| self.written) {
            self.buffer.install_mirror(scratch);
        }
    }
}

impl<'a, T: Element> BufferViewMut<'a, T> {
    /// The buffer and the range, for the transfer engine.
    pub(crate) fn into_parts(self) -> (&'a mut Buffer<T>, Range<usize>) {
        (self.buffer, self.range)
    }
}
