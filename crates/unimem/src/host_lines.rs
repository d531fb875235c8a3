//! Host memory in 64-byte lines: the unit of host mirrors and transfer staging, so that the
//! bytes can be viewed as any element type unimem accepts (alignment up to 64).

use crate::backend::BackendError;
use std::ptr::NonNull;
use std::sync::Arc;

/// 64 bytes, 64-aligned.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub(crate) struct Line([u8; 64]);

/// Zeroed host memory of at least a given number of bytes.
pub(crate) struct HostLines(Box<[Line]>);

impl HostLines {
    /// Zeroed memory from the allocator's zeroed path (fresh pages need no writing), or
    /// out of memory: host mirrors and staging can be as large as device memory, more than
    /// the host has free, and that is an error, never an abort.
    pub(crate) fn zeroed(bytes: usize) -> Result<Self, BackendError> {
        bytemuck::try_zeroed_slice_box(bytes.div_ceil(64))
            .map(HostLines)
            .map_err(|()| BackendError::OutOfMemory { bytes })
    }

    /// A copy of `src`.
    #[allow(dead_code, reason = "for the device backends that stage through the heap")]
    pub(crate) fn copy_of(src: &[u8]) -> Result<Self, BackendError> {
        let mut lines = Self::zeroed(src.len())?;
        lines.bytes_mut(src.len()).copy_from_slice(src);
        Ok(lines)
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

/// Where staging memory that did not come from the heap goes back to (a backend's cache of
/// page-locked chunks). `take_back` may run on a driver thread, where driver calls are not
/// allowed: it only records the chunk.
#[allow(dead_code, reason = "for the device backends that cache staging memory")]
pub(crate) trait StagingHome: Send + Sync {
    fn take_back(&self, start: NonNull<u8>, bytes: usize);
}

enum Owner {
    /// A `Box<[Line]>` of this many lines.
    #[allow(dead_code, reason = "made by the device backends that stage through the heap")]
    Heap(usize),
    /// Memory of a backend's staging cache, which takes it back.
    #[allow(dead_code, reason = "made by the device backends that cache staging memory")]
    Home(Arc<dyn StagingHome>),
}

/// Host memory a device may be reading or writing: owned through a raw pointer, so that no
/// Rust reference to the memory exists while a DMA engine uses it. Only the owner of an
/// operation in flight holds one (see `backend::pending`).
pub(crate) struct Staging {
    start: NonNull<u8>,
    bytes: usize,
    owner: Owner,
}

// SAFETY: `Staging` owns its memory like a `Box` does; it hands out no references while the
// device may use it, only a raw address, so moving it between threads is sound.
unsafe impl Send for Staging {}
// SAFETY: `&Staging` gives the raw address, and bytes only through an `unsafe fn` whose
// caller promises the device is done.
unsafe impl Sync for Staging {}

impl Staging {
    /// Heap memory.
    #[allow(dead_code, reason = "for the device backends that stage through the heap")]
    pub(crate) fn new(lines: HostLines) -> Self {
        let count = lines.0.len();
        let bytes = count * 64;
        let start = NonNull::new(Box::into_raw(lines.0).cast::<u8>()).unwrap_or(NonNull::dangling());
        Staging { start, bytes, owner: Owner::Heap(count) }
    }

    /// `bytes` at `start`, owned by `home` (which gets them back on drop).
    ///
    /// # Safety
    /// `start..start + bytes` is host memory that nobody else uses until `home` takes it back.
    #[allow(dead_code, reason = "for the device backends that cache staging memory")]
    pub(crate) unsafe fn from_home(start: NonNull<u8>, bytes: usize, home: Arc<dyn StagingHome>) -> Self {
        Staging { start, bytes, owner: Owner::Home(home) }
    }

    /// Bytes of memory owned.
    #[cfg_attr(
        not(any(feature = "opencl", feature = "cuda")),
        allow(dead_code, reason = "used by the OpenCL and CUDA backends")
    )]
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    /// The address a device reads or writes.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.start.as_ptr()
    }

    /// The first `len` bytes.
    ///
    /// # Safety
    /// No device operation writes the memory any more.
    pub(crate) unsafe fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.bytes, "staging read past its end");
        // SAFETY: `len` bytes of memory this value owns, initialised (zeroed or written by
        // the finished copy); the caller guarantees no device writes them.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Heap(lines) => {
                let slice = std::ptr::slice_from_raw_parts_mut(self.start.as_ptr().cast::<Line>(), *lines);
                // SAFETY: `start`/`lines` came from `Box::into_raw` of a `[Line]` box in `new`,
                // turned back once. A `Staging` is dropped only by the owner of a finished
                // operation (or one that never started), so no device uses the memory.
                drop(unsafe { Box::from_raw(slice) });
            }
            Owner::Home(home) => home.take_back(self.start, self.bytes),
        }
    }
}
