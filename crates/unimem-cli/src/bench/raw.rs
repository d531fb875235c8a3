//! The allocators a user would call without unimem, called directly: the baselines of the
//! allocation and pool tables. Each one's "first write" is the cheapest way to have written
//! every page once (a byte per page on the host; a fill on a device), so that rows that
//! include it do the same work on both sides: unimem's fresh memory is zeroed.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use unimem::{DeviceId, DeviceKind, MemoryManager};

use super::measure::{Figure, Sampling};
use super::traces::Op;

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
    /// Gives memory cached after frees back to the system, so that the next allocations
    /// are fresh (as unimem's pool is trimmed before a "fresh allocation" sample).
    fn release_cached(&self) {}
    /// Times an allocation of `bytes` freed at once, per pair: the pool hit's baseline. The
    /// host allocators call themselves directly in the timed loop; through this trait each
    /// call would add a virtual call and an `anyhow::Result`, work that unimem's side of
    /// the row does not do.
    fn time_pairs(&self, sampling: &Sampling, bytes: usize) -> anyhow::Result<Figure> {
        let mut failed = None;
        let figure = sampling.per_op(|| match self.allocate(bytes) {
            Ok(block) => self.free(black_box(block)),
            Err(e) => failed = Some(e),
        });
        failed.map_or(Ok(figure), Err)
    }
    /// Times freeing `count` blocks of `bytes` (allocated untimed), per block: the
    /// disposal row's baseline. Direct calls on the host, as in
    /// [`time_pairs`](Self::time_pairs).
    fn time_frees(&self, sampling: &Sampling, bytes: usize, count: usize) -> anyhow::Result<Figure> {
        sampling.per_run(|| {
            let held = (0..count).map(|_| self.allocate(bytes)).collect::<anyhow::Result<Vec<_>>>()?;
            let start = Instant::now();
            for block in held {
                self.free(block);
            }
            Ok((start.elapsed(), count as u64))
        })
    }
    /// Replays a trace's `ops` (writing every page of each block first if `fill`); returns
    /// the time of the calls and the operations replayed: the baseline of table 3. Called
    /// through the trait object once, it calls `allocate` and `free` directly.
    fn replay(&self, ops: &[Op], fill: bool) -> anyhow::Result<(Duration, u64)> {
        let mut live: HashMap<u64, RawBlock> = HashMap::with_capacity(64);
        let start = Instant::now();
        let mut outcome = Ok(());
        for op in ops {
            match *op {
                Op::Alloc { id, bytes } => match self.allocate(bytes) {
                    Ok(block) => {
                        live.insert(id, block);
                        if fill && let Err(e) = self.first_write(block) {
                            outcome = Err(e);
                            break;
                        }
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                },
                Op::Free { id } => {
                    if let Some(block) = live.remove(&id) {
                        self.free(block);
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        for (_, block) in live {
            self.free(block);
        }
        outcome.map(|()| (elapsed, ops.len() as u64))
    }
    /// The driver calls of `write`, `read` and `copy`, as the tables name them.
    fn copy_calls(&self) -> [&'static str; 3] {
        ["write", "read", "copy"]
    }
    /// The host address of a host-visible block (pinned memory), if it has one.
    fn host_ptr(&self, _block: RawBlock) -> Option<*mut u8> {
        None
    }
    /// The driver's blocking copy from host memory into `dst` at offset 0.
    fn write(&self, _dst: RawBlock, _src: &[u8]) -> anyhow::Result<()> {
        bail!("{} has no copies", self.name())
    }
    /// The driver's blocking copy from `src` at offset 0 into host memory.
    fn read(&self, _src: RawBlock, _dst: &mut [u8]) -> anyhow::Result<()> {
        bail!("{} has no copies", self.name())
    }
    /// The driver's device-to-device copy of `bytes` bytes, waited for.
    fn copy(&self, _src: RawBlock, _dst: RawBlock, _bytes: usize) -> anyhow::Result<()> {
        bail!("{} has no copies", self.name())
    }
}

/// Page-locked host memory: `malloc` and `mlock` (what a user pins host memory with).
pub struct LockedMalloc;

impl RawAllocator for LockedMalloc {
    fn name(&self) -> &'static str {
        "malloc + mlock"
    }

    fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
        let block = Malloc.allocate(bytes)?;
        // SAFETY: the range is the allocation just made.
        if unsafe { libc::mlock(block.handle as *const libc::c_void, bytes.max(1)) } != 0 {
            let error = std::io::Error::last_os_error();
            Malloc.free(block);
            bail!("mlock: {error}");
        }
        Ok(block)
    }

    fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
        Malloc.first_write(block)
    }

    fn host_ptr(&self, block: RawBlock) -> Option<*mut u8> {
        Some(block.handle as *mut u8)
    }

    fn free(&self, block: RawBlock) {
        // SAFETY: the range was locked by `allocate`.
        unsafe { libc::munlock(block.handle as *const libc::c_void, block.bytes.max(1)) };
        Malloc.free(block);
    }

    fn release_cached(&self) {
        // As `Malloc`'s: without it, glibc hands the next sample the pages it just freed
        // (its mmap threshold has grown past 1 MiB), still resident, and `mlock` has no page
        // to fault in, while unimem's pinned pool starts each sample trimmed.
        Malloc.release_cached();
    }
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

    fn host_ptr(&self, block: RawBlock) -> Option<*mut u8> {
        Some(block.handle as *mut u8)
    }

    fn free(&self, block: RawBlock) {
        // SAFETY: the pointer came from malloc and is freed once.
        unsafe { libc::free(block.handle as *mut libc::c_void) };
    }

    fn time_pairs(&self, sampling: &Sampling, bytes: usize) -> anyhow::Result<Figure> {
        host_pairs(self, sampling, bytes, false)
    }

    fn time_frees(&self, sampling: &Sampling, bytes: usize, count: usize) -> anyhow::Result<Figure> {
        host_frees(self, sampling, bytes, count)
    }

    fn release_cached(&self) {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// A host allocator called directly in the timed loops of the host rows: no trait object
/// and no `Result` per call (unimem's hit path has neither), and shareable between threads.
pub trait HostAllocator: RawAllocator + Sync {
    /// `bytes` (at least 1) of memory, or null.
    fn alloc_raw(&self, bytes: usize) -> *mut u8;
    /// Frees `ptr`.
    ///
    /// # Safety
    /// `ptr` came from `alloc_raw(bytes)` of this allocator, is not null, and is freed once.
    unsafe fn free_raw(&self, ptr: *mut u8, bytes: usize);
}

impl HostAllocator for Malloc {
    #[inline]
    fn alloc_raw(&self, bytes: usize) -> *mut u8 {
        // SAFETY: malloc has no precondition; the caller checks for null.
        unsafe { libc::malloc(bytes.max(1)).cast() }
    }

    #[inline]
    unsafe fn free_raw(&self, ptr: *mut u8, _bytes: usize) {
        // SAFETY: from malloc, freed once (the caller's contract).
        unsafe { libc::free(ptr.cast()) }
    }
}

impl HostAllocator for Mimalloc {
    #[inline]
    fn alloc_raw(&self, bytes: usize) -> *mut u8 {
        // SAFETY: mi_malloc has no precondition; its blocks are aligned to 16 bytes
        // (`HOST_ALIGN`), as malloc's are. The caller checks for null.
        unsafe { libmimalloc_sys::mi_malloc(bytes.max(1)).cast() }
    }

    #[inline]
    unsafe fn free_raw(&self, ptr: *mut u8, _bytes: usize) {
        // SAFETY: from mi_malloc, freed once (the caller's contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }
}

/// The error of a host allocator that returned null in a timed loop.
pub fn null(host: &impl HostAllocator, bytes: usize) -> anyhow::Error {
    anyhow::anyhow!("{}({bytes}) returned null", host.name())
}

/// Times an allocation of `bytes` freed at once (written in full first if `write`), per
/// pair: the baseline of the pool hit and of the warm allocate + write + drop rows.
pub fn host_pairs<H: HostAllocator>(
    host: &H,
    sampling: &Sampling,
    bytes: usize,
    write: bool,
) -> anyhow::Result<Figure> {
    let mut failed = false;
    let figure = sampling.per_op(|| {
        let ptr = black_box(host.alloc_raw(bytes));
        if ptr.is_null() {
            failed = true;
            return;
        }
        if write {
            // SAFETY: `ptr` is a fresh allocation of `bytes` bytes.
            unsafe { std::ptr::write_bytes(ptr, 1, bytes) };
            // The writes are read here, so the compiler cannot drop them as dead before a
            // free (it knows `free`).
            black_box(ptr);
        }
        // SAFETY: from `alloc_raw(bytes)` just above, not null, freed once.
        unsafe { host.free_raw(ptr, bytes) };
    });
    if failed { Err(null(host, bytes)) } else { Ok(figure) }
}

/// Times freeing `count` blocks of `bytes` (allocated untimed), per block: the disposal
/// row's baseline.
pub fn host_frees<H: HostAllocator>(
    host: &H,
    sampling: &Sampling,
    bytes: usize,
    count: usize,
) -> anyhow::Result<Figure> {
    sampling.per_run(|| {
        let held: Vec<_> = (0..count).map(|_| host.alloc_raw(bytes)).collect();
        let failed = held.iter().any(|ptr| ptr.is_null());
        let start = Instant::now();
        for &ptr in held.iter().filter(|ptr| !ptr.is_null()) {
            // SAFETY: from `alloc_raw(bytes)` above, not null, freed once.
            unsafe { host.free_raw(ptr, bytes) };
        }
        let elapsed = start.elapsed();
        if failed {
            return Err(null(host, bytes));
        }
        Ok((elapsed, count as u64))
    })
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

    fn time_pairs(&self, sampling: &Sampling, bytes: usize) -> anyhow::Result<Figure> {
        host_pairs(self, sampling, bytes, false)
    }

    fn time_frees(&self, sampling: &Sampling, bytes: usize, count: usize) -> anyhow::Result<Figure> {
        host_frees(self, sampling, bytes, count)
    }

    fn release_cached(&self) {
        // SAFETY: mi_collect only returns free memory to the system.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// mimalloc asked for the alignment of unimem's host blocks, 64 bytes (a cache line): the
/// same guarantee as a pooled buffer's, a second baseline for the pool hit's row beside
/// `mi_malloc`, which aligns to 16 bytes and takes a shorter path for it. Timed through
/// [`host_pairs`], which calls it directly.
pub struct MimallocAligned;

/// The alignment of [`MimallocAligned`].
const UNIMEM_ALIGN: usize = 64;

impl RawAllocator for MimallocAligned {
    fn name(&self) -> &'static str {
        "mimalloc, 64-byte aligned"
    }

    fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
        let ptr = self.alloc_raw(bytes);
        if ptr.is_null() {
            return Err(null(self, bytes));
        }
        Ok(RawBlock { handle: ptr as u64, bytes })
    }

    fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
        touch_pages(block.handle as *mut u8, block.bytes);
        Ok(())
    }

    fn free(&self, block: RawBlock) {
        // SAFETY: from `alloc_raw` (through `allocate`), not null, freed once.
        unsafe { self.free_raw(block.handle as *mut u8, block.bytes) }
    }

    fn time_pairs(&self, sampling: &Sampling, bytes: usize) -> anyhow::Result<Figure> {
        host_pairs(self, sampling, bytes, false)
    }
}

impl HostAllocator for MimallocAligned {
    #[inline]
    fn alloc_raw(&self, bytes: usize) -> *mut u8 {
        // SAFETY: the alignment is a power of two; the caller checks for null.
        unsafe { libmimalloc_sys::mi_malloc_aligned(bytes.max(1), UNIMEM_ALIGN).cast() }
    }

    #[inline]
    unsafe fn free_raw(&self, ptr: *mut u8, _bytes: usize) {
        // SAFETY: from mi_malloc_aligned, freed once (the caller's contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }
}

/// The raw allocators of device memory to compare `device`'s allocations with (the first
/// one also makes the raw copies of the transfer table).
pub fn for_device(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Vec<Box<dyn RawAllocator>>> {
    let info = manager.devices().into_iter().find(|d| d.id == device).context("no such device")?;
    Ok(match info.kind {
        DeviceKind::Cpu => vec![Box::new(Malloc), Box::new(Mimalloc)],
        #[cfg(feature = "opencl")]
        DeviceKind::OpenCl => vec![Box::new(opencl::ClBuffer::new(manager, device, false)?)],
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => cuda::allocators(manager, device)?,
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => vec![Box::new(gpu::WgpuBuffers::new(manager, device)?)],
        #[allow(unreachable_patterns, reason = "with every backend built in, every kind is matched above")]
        _ => Vec::new(),
    })
}

/// The raw allocator of pinned (page-locked, device-visible) host memory for `device`.
pub fn pinned_for_device(
    manager: &MemoryManager,
    device: DeviceId,
) -> anyhow::Result<Option<Box<dyn RawAllocator>>> {
    let info = manager.devices().into_iter().find(|d| d.id == device).context("no such device")?;
    Ok(match info.kind {
        DeviceKind::Cpu => Some(Box::new(LockedMalloc)),
        #[cfg(feature = "opencl")]
        DeviceKind::OpenCl => Some(Box::new(opencl::ClBuffer::new(manager, device, true)?)),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Some(Box::new(cuda::CuHost::new(manager, device)?)),
        #[allow(unreachable_patterns, reason = "with every backend built in, every kind is matched above")]
        _ => None,
    })
}

#[cfg(feature = "opencl")]
mod opencl {
    use std::collections::HashMap;
    use std::ptr;
    use std::sync::{Mutex, PoisonError};

    use anyhow::Context as _;
    use unimem::opencl3::command_queue::{self, CL_BLOCKING, CommandQueue};
    use unimem::opencl3::event::Event;
    use unimem::opencl3::memory::{
        self, CL_MAP_READ, CL_MAP_WRITE, CL_MEM_ALLOC_HOST_PTR, CL_MEM_READ_WRITE,
    };
    use unimem::opencl3::types::{cl_context, cl_mem};
    use unimem::{DeviceId, MemoryManager};

    use super::{RawAllocator, RawBlock};

    /// `clCreateBuffer` / `clReleaseMemObject`, with a queue of its own for first writes
    /// and copies. Pinned: `CL_MEM_ALLOC_HOST_PTR`, mapped for the host while it lives.
    pub struct ClBuffer {
        /// Kept alive by `queue`: a queue holds a reference to its context.
        context: cl_context,
        queue: CommandQueue,
        pinned: bool,
        /// Host mappings of pinned buffers, by buffer.
        mapped: Mutex<HashMap<u64, usize>>,
    }

    impl ClBuffer {
        pub fn new(manager: &MemoryManager, device: DeviceId, pinned: bool) -> anyhow::Result<Self> {
            let cl = manager.opencl_device(device)?;
            #[allow(deprecated, reason = "clCreateCommandQueue is the call that every OpenCL version has")]
            // SAFETY: the device belongs to the context.
            let queue = unsafe { CommandQueue::create(cl.context(), cl.device().id(), 0) }
                .context("clCreateCommandQueue")?;
            Ok(ClBuffer { context: cl.context().get(), queue, pinned, mapped: Mutex::default() })
        }
    }

    impl RawAllocator for ClBuffer {
        fn name(&self) -> &'static str {
            if self.pinned { "clCreateBuffer(ALLOC_HOST_PTR) + map" } else { "clCreateBuffer" }
        }

        fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
            let flags = CL_MEM_READ_WRITE | if self.pinned { CL_MEM_ALLOC_HOST_PTR } else { 0 };
            // SAFETY: a valid context, no host pointer.
            let mem = unsafe { memory::create_buffer(self.context, flags, bytes.max(1), ptr::null_mut()) }
                .map_err(|code| anyhow::anyhow!("clCreateBuffer: error {code}"))?;
            let block = RawBlock { handle: mem as usize as u64, bytes };
            if self.pinned {
                let mut host = ptr::null_mut();
                // SAFETY: the whole new buffer, mapped blocking; `host` is an out-parameter.
                let mapped = unsafe {
                    command_queue::enqueue_map_buffer(
                        self.queue.get(),
                        mem,
                        CL_BLOCKING,
                        CL_MAP_READ | CL_MAP_WRITE,
                        0,
                        bytes.max(1),
                        &mut host,
                        0,
                        ptr::null(),
                    )
                };
                match mapped {
                    Ok(event) => drop(Event::new(event)),
                    Err(code) => {
                        // SAFETY: the buffer is ours and unused.
                        let _ = unsafe { memory::release_mem_object(mem) };
                        anyhow::bail!("clEnqueueMapBuffer: error {code}");
                    }
                }
                self.mapped
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(block.handle, host as usize);
            }
            Ok(block)
        }

        fn copy_calls(&self) -> [&'static str; 3] {
            ["clEnqueueWriteBuffer", "clEnqueueReadBuffer", "clEnqueueCopyBuffer"]
        }

        fn host_ptr(&self, block: RawBlock) -> Option<*mut u8> {
            self.mapped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&block.handle)
                .map(|&p| p as *mut u8)
        }

        fn write(&self, dst: RawBlock, src: &[u8]) -> anyhow::Result<()> {
            // SAFETY: `src.len()` bytes fit in `dst` (the caller's contract); blocking, so
            // `src` is read before the call returns.
            let event = unsafe {
                command_queue::enqueue_write_buffer(
                    self.queue.get(),
                    dst.handle as usize as cl_mem,
                    CL_BLOCKING,
                    0,
                    src.len(),
                    src.as_ptr().cast(),
                    0,
                    ptr::null(),
                )
            }
            .map_err(|code| anyhow::anyhow!("clEnqueueWriteBuffer: error {code}"))?;
            drop(Event::new(event));
            Ok(())
        }

        fn read(&self, src: RawBlock, dst: &mut [u8]) -> anyhow::Result<()> {
            // SAFETY: `dst.len()` bytes are inside `src`; blocking, so `dst` is written
            // before the call returns.
            let event = unsafe {
                command_queue::enqueue_read_buffer(
                    self.queue.get(),
                    src.handle as usize as cl_mem,
                    CL_BLOCKING,
                    0,
                    dst.len(),
                    dst.as_mut_ptr().cast(),
                    0,
                    ptr::null(),
                )
            }
            .map_err(|code| anyhow::anyhow!("clEnqueueReadBuffer: error {code}"))?;
            drop(Event::new(event));
            Ok(())
        }

        fn copy(&self, src: RawBlock, dst: RawBlock, bytes: usize) -> anyhow::Result<()> {
            // SAFETY: two buffers of this context holding `bytes` bytes each.
            let event = unsafe {
                command_queue::enqueue_copy_buffer(
                    self.queue.get(),
                    src.handle as usize as cl_mem,
                    dst.handle as usize as cl_mem,
                    0,
                    0,
                    bytes,
                    0,
                    ptr::null(),
                )
            }
            .map_err(|code| anyhow::anyhow!("clEnqueueCopyBuffer: error {code}"))?;
            Event::new(event).wait().map_err(|e| anyhow::anyhow!("clWaitForEvents: {e}"))?;
            Ok(())
        }

        fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
            if let Some(host) = self.host_ptr(block) {
                super::touch_pages(host, block.bytes);
                return Ok(());
            }
            let zero = 0u8;
            // SAFETY: fills the whole buffer with a byte read from `zero` before the call
            // returns; the event is waited for and released below.
            let event = unsafe {
                command_queue::enqueue_fill_buffer(
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
            Event::new(event).wait().map_err(|e| anyhow::anyhow!("clWaitForEvents: {e}"))?;
            Ok(())
        }

        fn free(&self, block: RawBlock) {
            let mem = block.handle as usize as cl_mem;
            if let Some(host) =
                self.mapped.lock().unwrap_or_else(PoisonError::into_inner).remove(&block.handle)
            {
                // SAFETY: the mapping made at allocation, unmapped once.
                if let Ok(event) = unsafe {
                    command_queue::enqueue_unmap_mem_object(
                        self.queue.get(),
                        mem,
                        host as *mut _,
                        0,
                        ptr::null(),
                    )
                } {
                    drop(Event::new(event));
                }
            }
            // SAFETY: a buffer from clCreateBuffer, released once (OpenCL deletes it after
            // the commands queued on it).
            let _ = unsafe { memory::release_mem_object(mem) };
        }
    }
}

#[cfg(feature = "wgpu")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, PoisonError};

    use anyhow::Context as _;
    use unimem::wgpu;
    use unimem::{DeviceId, MemoryManager};

    use super::{RawAllocator, RawBlock};

    /// `Device::create_buffer` and its drop, with what a wgpu user writes for copies:
    /// `Queue::write_buffer`; a copy into a `MAP_READ` buffer (kept between reads) and
    /// `map_async`; `copy_buffer_to_buffer`; each submitted and waited for with
    /// `Device::poll`.
    pub struct WgpuBuffers {
        device: wgpu::Device,
        queue: wgpu::Queue,
        buffers: Mutex<HashMap<u64, wgpu::Buffer>>,
        next: AtomicU64,
        readback: Mutex<Option<wgpu::Buffer>>,
    }

    impl WgpuBuffers {
        pub fn new(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Self> {
            let gpu = manager.wgpu_device(device)?;
            Ok(WgpuBuffers {
                device: gpu.device().clone(),
                queue: gpu.queue().clone(),
                buffers: Mutex::default(),
                next: AtomicU64::new(1),
                readback: Mutex::default(),
            })
        }

        fn buffer(&self, block: RawBlock) -> anyhow::Result<wgpu::Buffer> {
            let buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
            buffers.get(&block.handle).cloned().context("not a buffer of this allocator")
        }

        fn finish(&self, encoder: Option<wgpu::CommandEncoder>) -> anyhow::Result<()> {
            let index = self.queue.submit(encoder.map(wgpu::CommandEncoder::finish));
            self.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })?;
            Ok(())
        }

        fn encoder(&self) -> wgpu::CommandEncoder {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
        }
    }

    /// wgpu's sizes are whole 4-byte words.
    fn words(bytes: usize) -> u64 {
        (bytes.max(1) as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
    }

    impl RawAllocator for WgpuBuffers {
        fn name(&self) -> &'static str {
            "wgpu create_buffer"
        }

        fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
            let usage =
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("raw"),
                size: words(bytes),
                usage,
                mapped_at_creation: false,
            });
            let handle = self.next.fetch_add(1, Ordering::Relaxed);
            self.buffers.lock().unwrap_or_else(PoisonError::into_inner).insert(handle, buffer);
            Ok(RawBlock { handle, bytes })
        }

        fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
            let mut encoder = self.encoder();
            encoder.clear_buffer(&self.buffer(block)?, 0, None);
            self.finish(Some(encoder))
        }

        fn free(&self, block: RawBlock) {
            self.buffers.lock().unwrap_or_else(PoisonError::into_inner).remove(&block.handle);
        }

        fn copy_calls(&self) -> [&'static str; 3] {
            ["write_buffer", "copy + map_async", "copy_buffer_to_buffer"]
        }

        fn write(&self, dst: RawBlock, src: &[u8]) -> anyhow::Result<()> {
            self.queue.write_buffer(&self.buffer(dst)?, 0, src);
            self.finish(None)
        }

        fn read(&self, src: RawBlock, dst: &mut [u8]) -> anyhow::Result<()> {
            let size = words(dst.len());
            let mut cached = self.readback.lock().unwrap_or_else(PoisonError::into_inner);
            let staging = match cached.take().filter(|b| b.size() >= size) {
                Some(buffer) => buffer,
                None => self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("raw read-back"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            };
            let mut encoder = self.encoder();
            encoder.copy_buffer_to_buffer(&self.buffer(src)?, 0, &staging, 0, size);
            self.finish(Some(encoder))?;
            let (sender, receiver) = std::sync::mpsc::channel();
            staging.slice(..size).map_async(wgpu::MapMode::Read, move |r| drop(sender.send(r)));
            self.device.poll(wgpu::PollType::wait_indefinitely())?;
            receiver.recv()??;
            dst.copy_from_slice(&staging.slice(..size).get_mapped_range()?[..dst.len()]);
            staging.unmap();
            *cached = Some(staging);
            Ok(())
        }

        fn copy(&self, src: RawBlock, dst: RawBlock, bytes: usize) -> anyhow::Result<()> {
            let mut encoder = self.encoder();
            encoder.copy_buffer_to_buffer(&self.buffer(src)?, 0, &self.buffer(dst)?, 0, words(bytes));
            self.finish(Some(encoder))
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

    /// `cuMemHostAlloc` / `cuMemFreeHost`: page-locked host memory.
    pub struct CuHost {
        context: std::sync::Arc<unimem::cudarc::driver::CudaContext>,
    }

    impl CuHost {
        pub fn new(manager: &MemoryManager, device: DeviceId) -> anyhow::Result<Self> {
            Ok(CuHost { context: std::sync::Arc::clone(manager.cuda_device(device)?.context()) })
        }
    }

    impl RawAllocator for CuHost {
        fn name(&self) -> &'static str {
            "cuMemHostAlloc"
        }

        fn allocate(&self, bytes: usize) -> anyhow::Result<RawBlock> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: the context is current; a non-zero size; no flags.
            let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }.context("cuMemHostAlloc")?;
            Ok(RawBlock { handle: ptr as u64, bytes })
        }

        fn first_write(&self, block: RawBlock) -> anyhow::Result<()> {
            super::touch_pages(block.handle as *mut u8, block.bytes);
            Ok(())
        }

        fn host_ptr(&self, block: RawBlock) -> Option<*mut u8> {
            Some(block.handle as *mut u8)
        }

        fn free(&self, block: RawBlock) {
            if self.context.bind_to_thread().is_ok() {
                // SAFETY: from cuMemHostAlloc, freed once.
                let _ = unsafe { result::free_host(block.handle as *mut std::ffi::c_void) };
            }
        }
    }

    pub fn allocators(
        manager: &MemoryManager,
        device: DeviceId,
    ) -> anyhow::Result<Vec<Box<dyn RawAllocator>>> {
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
                    None => {
                        result::memset_d8_sync(block.handle, 0, block.bytes.max(1)).context("cuMemsetD8")?
                    }
                }
            }
            Ok(())
        }

        fn copy_calls(&self) -> [&'static str; 3] {
            ["cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyDtoD"]
        }

        fn write(&self, dst: RawBlock, src: &[u8]) -> anyhow::Result<()> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: `src.len()` bytes fit in `dst` (the caller's contract); synchronous.
            unsafe { result::memcpy_htod_sync(dst.handle, src) }.context("cuMemcpyHtoD")
        }

        fn read(&self, src: RawBlock, dst: &mut [u8]) -> anyhow::Result<()> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: `dst.len()` bytes are inside `src`; synchronous.
            unsafe { result::memcpy_dtoh_sync(dst, src.handle) }.context("cuMemcpyDtoH")
        }

        fn copy(&self, src: RawBlock, dst: RawBlock, bytes: usize) -> anyhow::Result<()> {
            self.context.bind_to_thread().context("cuCtxSetCurrent")?;
            // SAFETY: both hold `bytes` bytes; synchronous.
            unsafe { result::memcpy_dtod_sync(dst.handle, src.handle, bytes) }.context("cuMemcpyDtoD")
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
