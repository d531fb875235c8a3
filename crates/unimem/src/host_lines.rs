//! Host memory in 64-byte lines: the unit of host mirrors and transfer staging, so that the
//! bytes can be viewed as any element type unimem accepts (alignment up to 64).

use std::ptr::NonNull;

/// 64 bytes, 64-aligned.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub(crate) struct Line([u8; 64]);

/// Zeroed host memory of at least a given number of bytes.
pub(crate) struct HostLines(Box<[Line]>);

impl HostLines {
    /// Zeroed memory from the allocator's zeroed path (fresh pages need no writing).
    pub(crate) fn zeroed(bytes: usize) -> Self {
        HostLines(bytemuck::zeroed_slice_box(bytes.div_ceil(64)))
    }

    /// A copy of `src`.
    pub(crate) fn copy_of(src: &[u8]) -> Self {
        let mut lines = Self::zeroed(src.len());
        lines.bytes_mut(src.len()).copy_from_slice(src);
        lines
    }

    /// The first `len` bytes (at most the size this was made with).
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        &bytemuck::cast_slice::<Line, u8>(&self.0)[..len]
    }

    /// The first `len` bytes, writable.
    pub(crate) fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Line, u8>(&mut self.0)[..len]
    }
}

/// Host lines a device may be reading or writing: owned through a raw pointer, so that no
/// Rust reference to the memory exists while a DMA engine uses it. Only the owner of an
/// operation in flight holds one (see `backend::pending`); it turns back into `HostLines`
/// once the device is done.
pub(crate) struct Staging {
    start: NonNull<Line>,
    lines: usize,
}

// SAFETY: `Staging` owns its allocation like a `Box` does; it hands out no references, only
// a raw address for the device, so moving it between threads is sound.
unsafe impl Send for Staging {}
// SAFETY: `&Staging` gives only the raw address, never access to the memory.
unsafe impl Sync for Staging {}

impl Staging {
    pub(crate) fn new(lines: HostLines) -> Self {
        let boxed = lines.0;
        let count = boxed.len();
        let start = NonNull::new(Box::into_raw(boxed).cast::<Line>()).unwrap_or(NonNull::dangling());
        Staging { start, lines: count }
    }

    /// The address a device reads or writes.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.start.as_ptr().cast()
    }

    /// The memory as host lines again.
    ///
    /// # Safety
    /// No device operation uses the memory any more.
    pub(crate) unsafe fn into_lines(self) -> HostLines {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `start`/`lines` came from `Box::into_raw` of a `[Line]` box in `new` and are
        // turned back once (`self` is not dropped); the caller guarantees the device is done.
        HostLines(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(this.start.as_ptr(), this.lines))
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: as in `into_lines`. A `Staging` is dropped only by the owner of a finished
        // operation (or one that never started), so no device uses the memory.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.start.as_ptr(), self.lines)) });
    }
}
