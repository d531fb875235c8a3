//! The allocators a user would call without unimem, called directly: the baselines of the
//! allocation and pool tables. Each one's "first write" is the cheapest way to have written
//! every page once (a byte per page on the host; a fill on a device), so that rows that
//! include it do the same work on both sides: unimem's fresh memory is zeroed.

use std::alloc::{GlobalAlloc, Layout};

use anyhow::{Context as _, bail};
use unimem::{DeviceId, DeviceKind, MemoryManager};

/// Bytes between first writes on the host.
pub const PAGE: usize = 4096;

/// An allocation of a raw allocator: an address or a handle, and its size.
#[derive(Clone, Copy, Debug)]
pub struct RawBlock {
    pub handle: u64,
    pub bytes: usize,
}

/// A backend's own allocator.
pub trait RawAllocator {
    /// What a table calls it, e.g. "glibc malloc", "clCreateBuffer".
    fn name(&self) -> &'static str;
    /// Allocates `bytes` (at least 1).
    fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock>;
    /// Writes every page of `block` once, and waits for it.
    fn first_write(&self, block: RawBlock) -> anyhow::Result<()>;
    /// Frees `block`, which came from `allocate` of this allocator and is freed once.
    fn free(&self, block: RawBlock);
}

/// Writes one byte of every page of `bytes` bytes at `ptr`.
fn touch_pages(ptr: *mut u8, bytes: usize) {
    for offset in (0..bytes).step_by(PAGE) {
        // SAFETY: `offset < bytes`, inside the allocation of `bytes` bytes at `ptr`.
        unsafe { ptr.add(offset).write_volatile(1) };
    }
}

/// The platform's C allocator (glibc `malloc`/`free` on Linux).
pub struct Malloc;

impl RawAllocator for Malloc {
    fn name(&self) -> &'static str {
        if cfg!(target_env = "gnu") { "glibc malloc" } else { "malloc" }
    }

    fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
        // SAFETY: malloc with a non-zero size; null is checked.
        let ptr = unsafe { libc::malloc(bytes.max(1)) };
        if ptr.is_null() {
            bail!("malloc({bytes}) returned null");
        }
        Ok(RawBlock { handle: ptr as u64, bytes })
    }

    fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
        touch_pages(block.handle as *mut u8, block.bytes);
        Ok(())
    }

    fn free(&self, block: RawBlock) {
        // SAFETY: the pointer came from malloc and is freed once.
        unsafe { libc::free(block.handle as *mut libc::c_void) };
    }
}

/// mimalloc, called as an allocator (not installed as the global one).
pub struct Mimalloc;

/// The alignment both host baselines get (malloc's natural alignment).
const HOST_ALIGN: usize = 16;

impl RawAllocator for Mimalloc {
    fn name(&self) -> &'static str {
        "mimalloc"
    }

    fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
        let layout = Layout::from_size_align(bytes.max(1), HOST_ALIGN)?;
        // SAFETY: a layout of non-zero size; null is checked.
        let ptr = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if ptr.is_null() {
            bail!("mimalloc({bytes}) returned null");
        }
        Ok(RawBlock { handle: ptr as u64, bytes })
    }

    fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
        touch_pages(block.handle as *mut u8, block.bytes);
        Ok(())
    }

    fn free(&self, block: RawBlock) {
        let layout = Layout::from_size_align(block.bytes.max(1), HOST_ALIGN).expect("allocated with it");
        // SAFETY: allocated by MiMalloc with this layout, freed once.
        unsafe { mimalloc::MiMalloc.dealloc(block.handle as *mut u8, layout) };
    }
}

/// The raw allocators to compare `device`'s allocations with, for the kind of memory
/// `pinned` or not.
pub fn for_device(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Vec<Box<dyn RawAllocator>>> {
    let info = manager.devices().into_iter().find(|d| d.id == device).context("no such device")?;
    Ok(match info.kind {
        DeviceKind::Cpu => vec![Box::new(Malloc), Box::new(Mimalloc)],
        #[cfg(feature = "opencl")]
        DeviceKind::OpenCl => vec![Box::new(opencl::ClBuffer::new(manager, device)?)],
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => cuda::allocators(manager, device)?,
        #[allow(unreachable_patterns, reason = "with every backend built in, every kind is matched above")]
        _ => Vec::new(),
    })
}

#[cfg(feature = "opencl")]
mod opencl {
    use std::ptr;

    use anyhow::Context as _;
    use unimem::opencl3::command_queue::CommandQueue;
    use unimem::opencl3::memory::{self, CL_MEM_READ_WRITE};
    use unimem::opencl3::types::{cl_context, cl_mem};
    use unimem::{DeviceId, MemoryManager};

    use super::{RawAllocator, RawBlock};

    /// `clCreateBuffer` / `clReleaseMemObject`, with a queue of its own for first writes.
    pub struct ClBuffer {
        /// Kept alive by `queue`: a queue holds a reference to its context.
        context: cl_context,
        queue: CommandQueue,
    }

    impl ClBuffer {
        pub fn new(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Self> {
            let cl = manager.opencl_device(device)?;
            #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
            // SAFETY: the device belongs to the context.
            let queue = unsafe { CommandQueue::create(cl.context(), cl.device().id(), 0) }
                .context("clCreateCommandQueue")?;
            Ok(ClBuffer { context: cl.context().get(), queue })
        }
    }

    impl RawAllocator for ClBuffer {
        fn name(&self) -> &'static str {
            "clCreateBuffer"
        }

        fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
            // SAFETY: a valid context, no host pointer.
            let mem = unsafe {
                memory::create_buffer(self.context, CL_MEM_READ_WRITE, bytes.max(1), ptr::null_mut())
            }
            .map_err(|code| anyhow::anyhow!("clCreateBuffer: error {code}"))?;
            Ok(RawBlock { handle: mem as usize as u64, bytes })
        }

        fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
            let zero = 0u8;
            // SAFETY: fills the whole buffer with a byte read from `zero` before the call
            // returns; the event is waited for and released below.
            let event = unsafe {
                unimem::opencl3::command_queue::enqueue_fill_buffer(
                    self.queue.get(),
                    block.handle as usize as cl_mem,
                    (&raw const zero).cast(),
                    1,
                    0,
                    block.bytes.max(1),
                    0,
                    ptr::null(),
                )
            }
            .map_err(|code| anyhow::anyhow!("clEnqueueFillBuffer: error {code}"))?;
            let event = unimem::opencl3::event::Event::new(event);
            event.wait().map_err(|e| anyhow::anyhow!("clWaitForEvents: {e}"))?;
            Ok(())
        }

        fn free(&self, block: RawBlock) {
            // SAFETY: a buffer from clCreateBuffer, released once.
            let _ = unsafe { memory::release_mem_object(block.handle as usize as cl_mem) };
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::Context as _;
    use unimem::cudarc::driver::{result, sys};
    use unimem::{DeviceId, MemoryManager};

    use super::{RawAllocator, RawBlock};

    /// `cuMemAlloc` / `cuMemFree`, or `cuMemAllocAsync` / `cuMemFreeAsync` on the
    /// device's stream (the driver's own stream-ordered pool).
    pub struct CuMem {
        context: std::sync::Arc<unimem::cudarc::driver::CudaContext>,
        stream: Option<sys::CUstream>,
    }

    // SAFETY: a CUstream may be used from any thread once its context is bound there,
    // which every call does first.
    unsafe impl Send for CuMem {}

    pub fn allocators(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Vec<Box<dyn RawAllocator>>> {
        let cuda = manager.cuda_device(device)?;
        let context = std::sync::Arc::clone(cuda.context());
        let stream = cuda.stream().cu_stream();
        Ok(vec![
            Box::new(CuMem { context: std::sync::Arc::clone(&context), stream: None }),
            Box::new(CuMem { context, stream: Some(stream) }),
        ])
    }

    impl RawAllocator for CuMem {
        fn name(&self) -> &'static str {
            if self.stream.is_some() { "cuMemAllocAsync" } else { "cuMemAlloc" }
        }

        fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: the context is current; a non-zero size; the stream is the device's.
            let ptr = unsafe {
                match self.stream {
                    Some(stream) => result::malloc_async(stream, bytes.max(1)),
                    None => result::malloc_sync(bytes.max(1)),
                }
            }
            .context(self.name())?;
            Ok(RawBlock { handle: ptr, bytes })
        }

        fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: the allocation covers `bytes` bytes; ordered on the stream (or the
            // null stream) after its allocation, and waited for.
            unsafe {
                match self.stream {
                    Some(stream) => {
                        result::memset_d8_async(block.handle, 0, block.bytes.max(1), stream)
                            .context("cuMemsetD8Async")?;
                        result::stream::synchronize(stream).context("cuStreamSynchronize")?;
                    }
                    None => result::memset_d8_sync(block.handle, 0, block.bytes.max(1)).context("cuMemsetD8")?,
                }
            }
            Ok(())
        }

        fn free(&self, block: RawBlock) {
            if self.context.bind_to_thread().is_err() {
                return;
            }
            // SAFETY: allocated above, freed once, the same way it was allocated.
            let _ = unsafe {
                match self.stream {
                    Some(stream) => result::free_async(block.handle, stream),
                    None => result::free_sync(block.handle),
                }
            };
        }
    }
}
