//! The wgpu backend (cargo feature `wgpu`): GPUs through Vulkan (Linux, Windows, Android),
//! Metal (macOS, iOS) and DX12 (Windows), whichever of them this build and machine have. The
//! Vulkan loader is opened at run time: a machine without it, or without a driver, has no
//! wgpu devices and says why. wgpu's GL backend is not compiled in, so a machine that only
//! has GL gets no wgpu device rather than a silent fallback.
//!
//! Discovery takes the backends named in `WGPU_BACKEND` (as wgpu reads it: `vulkan`,
//! `metal`, `dx12`), or by default every native one, and keeps one adapter per physical GPU,
//! preferring the platform's own API (Metal, then DX12, then Vulkan); the device's name says
//! which API drives it.
//!
//! Memory kinds:
//! - `Device`: a `STORAGE | COPY_SRC | COPY_DST` buffer; the host reaches it through copies
//!   (writes through `Queue::write_buffer`, reads through `MAP_READ` staging buffers kept in
//!   a pool) and the buffer's host mirror (see `Buffer`).
//! - `Pinned` and `Unified` (only where the adapter offers `MAPPABLE_PRIMARY_BUFFERS`, and
//!   `Unified` only where its memory is the host's: integrated GPUs, Apple silicon, CPU
//!   adapters): a buffer that is both mappable and a `STORAGE` buffer, kept mapped so that
//!   the host reads and writes it in place (zero-copy), unmapped while a user's shaders hold
//!   it through its raw-access guard, and mapped back (after those shaders) at the next host
//!   access. wgpu maps such memory for writing, and invalidates CPU caches only for reads,
//!   so this relies on the memory being host-coherent, as wgpu's allocators pick it on every
//!   backend (Vulkan `HOST_COHERENT`, Metal shared storage, D3D12's CPU-visible heaps). A
//!   remap that lands at another address is reported, never used.
//!
//! Every operation is a submission on the device's one queue, in the order the calls were
//! made; a user's shaders run on the same queue ([`WgpuBackend::queue`]), so reuse of pooled
//! device memory is queue-ordered (wgpu itself frees a buffer only after the submissions
//! that use it). What finishes after its call (a read-back, an operation's completion, a
//! fence, host-visible memory mapped back) is a job of the device's poller thread
//! (`poller`), which drives `Device::poll`: nobody else has to.
//!
//! Sizes and offsets need no alignment from callers: allocations are rounded up to wgpu's
//! 4-byte copy granule inside, reads copy the aligned words around a range and keep the
//! bytes asked for, and writes and copies that are not word-aligned go through a small
//! compute shader (`bytes`).

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

mod bytes;
mod interop;
mod poller;
mod staging;

pub use interop::WgpuAccess;

use super::pending::Pending;
use super::{Backend, BackendError, Fence, Queue, RawAllocation};
use crate::device::{DeviceId, DeviceInfo, DeviceKind, MemoryKind};
use crate::host_lines::Staging;
use bytes::ByteCopy;
use poller::{HostDst, Job, MapState, Poller, PollerFence};
use staging::StagingPool;

type Discovery = super::Discovery<WgpuBackend>;

/// wgpu copies whole words of this many bytes at offsets that are multiples of it.
const GRANULE: u64 = wgpu::COPY_BUFFER_ALIGNMENT;

/// Finds the adapters once per process.
pub(crate) fn discover() -> &'static Discovery {
    static FOUND: OnceLock<Discovery> = OnceLock::new();
    FOUND.get_or_init(enumerate)
}

/// Preference among the APIs that reach one GPU: the platform's own first.
fn api_rank(backend: wgpu::Backend) -> u8 {
    match backend {
        wgpu::Backend::Metal => 0,
        wgpu::Backend::Dx12 => 1,
        wgpu::Backend::Vulkan => 2,
        _ => 3,
    }
}

fn enumerate() -> Discovery {
    if wgpu::Instance::enabled_backend_features().is_empty() {
        return Discovery::none("this build has no wgpu backend for this platform");
    }
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = backends;
    let instance = wgpu::Instance::new(descriptor);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    if adapters.is_empty() {
        let asked = std::env::var("WGPU_BACKEND")
            .map_or_else(|_| "Vulkan, Metal or DX12".to_string(), |names| format!("WGPU_BACKEND={names}"));
        return Discovery::none(format!(
            "no adapter found through {asked} (no Vulkan loader or driver: install libvulkan1 and a \
             driver, such as mesa-vulkan-drivers)"
        ));
    }
    adapters.sort_by_key(|a| {
        let info = a.get_info();
        (info.vendor, info.device, info.name.clone(), api_rank(info.backend))
    });
    let mut problems = Vec::new();
    let mut backends = Vec::new();
    let mut previous: Option<wgpu::AdapterInfo> = None;
    for adapter in adapters {
        let info = adapter.get_info();
        if let Some(kept) = &previous
            && (kept.vendor, kept.device, &kept.name) == (info.vendor, info.device, &info.name)
        {
            problems.push(format!(
                "{} is reached through {} too; using {}",
                info.name, info.backend, kept.backend
            ));
            continue;
        }
        if info.backend == wgpu::Backend::Gl || info.backend == wgpu::Backend::Noop {
            problems.push(format!("{} ({}) skipped: not a native API", info.name, info.backend));
            continue;
        }
        previous = Some(info.clone());
        match WgpuBackend::new(adapter, info) {
            Ok(backend) => backends.push(backend),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Discovery::found(backends, problems, "no native adapter")
}

/// Creates a buffer, reporting wgpu's out-of-memory and validation errors as errors (wgpu
/// would otherwise hand them to the device's error handler and return an invalid buffer).
pub(super) fn create_buffer(
    device: &wgpu::Device,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
    mapped: bool,
) -> Result<wgpu::Buffer, BackendError> {
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation: mapped,
    });
    let invalid = pollster::block_on(invalid.pop());
    let out_of_memory = pollster::block_on(out_of_memory.pop());
    let bytes = usize::try_from(size).unwrap_or(usize::MAX);
    match (out_of_memory, invalid) {
        (Some(_), _) => Err(BackendError::OutOfMemory { bytes }),
        (None, Some(e)) => {
            Err(BackendError::Driver { call: "Device::create_buffer", message: e.to_string() })
        }
        (None, None) => Ok(buffer),
    }
}

/// What unimem keeps of one allocation: the buffer, and for host-visible memory its
/// mapping's state. `RawAllocation::handle` owns a `Box<Mem>`.
struct Mem {
    buffer: wgpu::Buffer,
    /// Host-visible memory only.
    map: Option<Arc<Mutex<MapState>>>,
}

impl Mem {
    /// The memory of an allocation of this backend.
    fn of(allocation: &RawAllocation) -> &Mem {
        // SAFETY: the handle is a `Box<Mem>` leaked by `allocate` and freed only by `free`,
        // after which the caller no longer uses the allocation (the `Backend` contract).
        unsafe { &*(allocation.handle as usize as *const Mem) }
    }

    fn lock_map(&self) -> Option<std::sync::MutexGuard<'_, MapState>> {
        self.map.as_ref().map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One wgpu device with its queue and poller.
pub struct WgpuBackend {
    adapter: wgpu::Adapter,
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    name: String,
    /// The device's largest buffer.
    largest: u64,
    /// Buffers may be mappable and `STORAGE` at once: `Pinned` memory.
    mappable: bool,
    /// ... and the adapter's memory is the host's: `Unified` memory.
    unified: bool,
    poller: Arc<Poller>,
    staging: Arc<StagingPool>,
    byte_copy: OnceLock<Result<ByteCopy, String>>,
    /// Held while submitting and queueing the submission's job, so that jobs are queued in
    /// submission order.
    submitting: Mutex<()>,
    /// Errors wgpu reported outside an error scope (none are expected: reported with the
    /// next operation's outcome).
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl WgpuBackend {
    fn new(adapter: wgpu::Adapter, info: wgpu::AdapterInfo) -> Result<Self, BackendError> {
        let mappable = adapter.features().contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let unified =
            mappable && matches!(info.device_type, wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu);
        let features =
            if mappable { wgpu::Features::MAPPABLE_PRIMARY_BUFFERS } else { wgpu::Features::empty() };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("unimem"),
            required_features: features,
            // Everything the adapter offers, so that the largest buffer is the adapter's.
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| BackendError::Driver {
            call: "Adapter::request_device",
            message: format!("{}: {e}", info.name),
        })?;
        let largest = device.limits().max_buffer_size;
        let name = format!("{} ({}, {:?})", info.name, info.backend, info.device_type);
        let poller = Poller::start(device.clone(), &info.name)?;
        let lost = Arc::clone(&poller);
        device.set_device_lost_callback(move |reason, message| lost.lose(format!("{reason:?}: {message}")));
        let uncaptured = Arc::new(Mutex::new(None));
        let record = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            record.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e.to_string());
        }));
        let staging = Arc::new(StagingPool::new(device.clone(), largest));
        Ok(WgpuBackend {
            adapter,
            device,
            queue,
            info,
            name,
            largest,
            mappable,
            unified,
            poller,
            staging,
            byte_copy: OnceLock::new(),
            submitting: Mutex::new(()),
            uncaptured,
        })
    }

    /// The adapter: its features, limits and info.
    pub fn adapter(&self) -> &wgpu::Adapter {
        &self.adapter
    }

    /// The device every buffer of this backend belongs to: make shader modules, pipelines
    /// and bind groups with it.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The device's queue, which unimem uses too: submit the shaders that use unimem
    /// buffers here, and they are ordered with unimem's transfers and pooled reuse.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// What the adapter reports of itself, with the API (`backend`) that drives it.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether `Pinned` and `Unified` buffers are host-visible buffers that shaders can
    /// bind (the adapter has `MAPPABLE_PRIMARY_BUFFERS`).
    pub fn has_mappable_buffers(&self) -> bool {
        self.mappable
    }

    /// The error of the device, if it is gone or wgpu reported an error nobody caught.
    fn health(&self) -> Result<(), BackendError> {
        if let Some(why) = self.poller.lost() {
            return Err(BackendError::DeviceLost { message: why });
        }
        match self.uncaptured.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(message) => Err(BackendError::Driver { call: "wgpu", message }),
            None => Ok(()),
        }
    }

    fn byte_copy(&self) -> Result<&ByteCopy, BackendError> {
        self.byte_copy
            .get_or_init(|| ByteCopy::new(&self.device).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|message| BackendError::Driver {
                call: "create the byte-copy shader",
                message: message.clone(),
            })
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("unimem") })
    }

    /// Submits `commands` (and any `write_buffer` data waiting for a submission), queueing
    /// the job `then` makes of the submission's index; returns the job's sequence number.
    /// A device that is gone, or an error wgpu reported since the last operation, fails the
    /// call before anything is submitted: a job, once queued, is always finished.
    fn submit(
        &self,
        commands: Option<wgpu::CommandEncoder>,
        then: impl FnOnce(wgpu::SubmissionIndex) -> Job,
    ) -> Result<u64, BackendError> {
        self.health()?;
        let _order = self.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.queue.submit(commands.map(wgpu::CommandEncoder::finish));
        Ok(self.poller.push(then(index)))
    }

    /// Submits `commands` with no job to follow.
    fn submit_only(&self, commands: Option<wgpu::CommandEncoder>) -> Result<(), BackendError> {
        self.health()?;
        let _order = self.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        self.queue.submit(commands.map(wgpu::CommandEncoder::finish));
        Ok(())
    }

    /// A word-aligned device buffer of unimem's own, for staging on the device.
    fn scratch(&self, bytes: u64) -> Result<wgpu::Buffer, BackendError> {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        create_buffer(
            &self.device,
            "unimem scratch",
            bytes.next_multiple_of(GRANULE).max(GRANULE),
            usage,
            false,
        )
    }

    /// Encodes a copy of `len` bytes between device buffers at any offsets: wgpu's copy for
    /// whole aligned words, the byte-copy shader for the rest.
    fn encode_copy(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        (src, src_offset): (&wgpu::Buffer, u64),
        (dst, dst_offset): (&wgpu::Buffer, u64),
        len: u64,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        if (src_offset | dst_offset | len).is_multiple_of(GRANULE) {
            encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, len);
            return Ok(());
        }
        let shader = self.byte_copy()?;
        if src == dst {
            // The shader binds the source for reading and the destination for writing: one
            // buffer cannot be both in a dispatch. The source's words go to scratch first.
            let start = src_offset / GRANULE * GRANULE;
            let end = (src_offset + len).next_multiple_of(GRANULE);
            let scratch = self.scratch(end - start)?;
            encoder.copy_buffer_to_buffer(src, start, &scratch, 0, end - start);
            return shader.encode(
                &self.device,
                encoder,
                (&scratch, src_offset - start),
                (dst, dst_offset),
                len,
            );
        }
        if src_offset % GRANULE != dst_offset % GRANULE {
            return shader.encode(&self.device, encoder, (src, src_offset), (dst, dst_offset), len);
        }
        // Same phase: the shader for the edges, wgpu's copy for the whole words between.
        let head = ((GRANULE - dst_offset % GRANULE) % GRANULE).min(len);
        let middle = (len - head) / GRANULE * GRANULE;
        let tail = len - head - middle;
        if head > 0 {
            shader.encode(&self.device, encoder, (src, src_offset), (dst, dst_offset), head)?;
        }
        if middle > 0 {
            encoder.copy_buffer_to_buffer(src, src_offset + head, dst, dst_offset + head, middle);
        }
        if tail > 0 {
            let at = head + middle;
            shader.encode(&self.device, encoder, (src, src_offset + at), (dst, dst_offset + at), tail)?;
        }
        Ok(())
    }

    fn allocate_device(&self, size: u64) -> Result<(Mem, Option<NonNull<u8>>), BackendError> {
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer = create_buffer(&self.device, "unimem device", size, usage, false)?;
        // wgpu would zero the buffer at its first use; clearing it now, in queue order and
        // without waiting, does that work here, where the allocation's cost belongs.
        let mut encoder = self.encoder();
        encoder.clear_buffer(&buffer, 0, None);
        self.submit_only(Some(encoder))?;
        Ok((Mem { buffer, map: None }, None))
    }

    fn allocate_mapped(&self, size: u64) -> Result<(Mem, Option<NonNull<u8>>), BackendError> {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::MAP_READ
            | wgpu::BufferUsages::MAP_WRITE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let buffer = create_buffer(&self.device, "unimem host-visible", size, usage, true)?;
        let host = {
            let mut view = buffer.slice(..).get_mapped_range_mut().map_err(|e| BackendError::Driver {
                call: "BufferSlice::get_mapped_range_mut",
                message: e.to_string(),
            })?;
            let mut bytes = view.slice(..);
            bytes.fill(0);
            bytes.as_raw_element_ptr()
        };
        // The view is gone; the mapping stays until `unmap`, and is the host's.
        let map = Some(Arc::new(Mutex::new(MapState::Mapped)));
        Ok((Mem { buffer, map }, Some(host)))
    }

    /// Queues the job that maps host-visible memory back after a user's shaders, unless it
    /// is mapped or being mapped; returns the sequence number to wait for, if any.
    fn remap(&self, allocation: &RawAllocation) -> Result<Option<u64>, BackendError> {
        let mem = Mem::of(allocation);
        let (Some(state), Some(host)) = (&mem.map, allocation.host) else { return Ok(None) };
        let mut guard = state.lock().unwrap_or_else(PoisonError::into_inner);
        match &*guard {
            MapState::Mapped => Ok(None),
            MapState::Remapping(seq) => Ok(Some(*seq)),
            MapState::Failed(why) => {
                Err(BackendError::Driver { call: "Buffer::map_async", message: why.clone() })
            }
            MapState::Unmapped => {
                let job = Job::Remap {
                    buffer: mem.buffer.clone(),
                    size: mem.buffer.size(),
                    host,
                    state: Arc::clone(state),
                };
                let seq = self.poller.push(job);
                *guard = MapState::Remapping(seq);
                Ok(Some(seq))
            }
        }
    }
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: DeviceId::CPU, // set by the manager
            kind: DeviceKind::Wgpu,
            name: self.name.clone(),
            // wgpu reports no memory sizes.
            total_memory: 0,
            free_memory: None,
            host_addressable: false,
            supports_pinned: self.mappable,
            supports_unified: self.unified,
            peer_capable: false,
        }
    }

    fn supports(&self, kind: MemoryKind) -> bool {
        match kind {
            MemoryKind::Device => true,
            MemoryKind::Pinned => self.mappable,
            MemoryKind::Unified => self.unified,
        }
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<RawAllocation, BackendError> {
        let size = (bytes.max(1) as u64).next_multiple_of(GRANULE);
        if size > self.largest {
            return Err(BackendError::TooLarge { bytes, largest: self.largest });
        }
        self.health()?;
        let (mem, host) = match kind {
            MemoryKind::Device => self.allocate_device(size),
            MemoryKind::Pinned | MemoryKind::Unified => self.allocate_mapped(size),
        }?;
        let handle = Box::into_raw(Box::new(mem)) as usize as u64;
        Ok(RawAllocation { handle, host, bytes: bytes.max(1) })
    }

    /// wgpu frees a buffer once the submissions that use it are done: dropping ours is
    /// queue-ordered, and waits for nothing.
    unsafe fn free(&self, allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        // SAFETY: the handle is the `Box<Mem>` leaked by `allocate`, freed once (the caller).
        drop(unsafe { Box::from_raw(allocation.handle as usize as *mut Mem) });
        Ok(())
    }

    unsafe fn write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: &[u8],
    ) -> Result<(), BackendError> {
        // SAFETY: the caller's guarantees are `enqueue_write`'s; `src` outlives the wait below.
        unsafe { self.enqueue_write(allocation, offset, src.as_ptr(), src.len()) }?;
        pollster::block_on(self.completion(None)?).map(drop)
    }

    unsafe fn read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        // SAFETY: as in `write`; `dst` is borrowed exclusively until the wait below is over.
        unsafe { self.enqueue_read(allocation, offset, dst.as_mut_ptr(), dst.len()) }?;
        pollster::block_on(self.completion(None)?).map(drop)
    }

    fn work_queue(&self) -> Option<&dyn Queue> {
        Some(self)
    }
}

impl Queue for WgpuBackend {
    fn record_fence(&self) -> Result<Fence, BackendError> {
        let seq = self.submit(None, Job::Submitted)?;
        Ok(Fence::new(PollerFence { poller: Arc::clone(&self.poller), seq }))
    }

    /// Fences of this device are already in order with its queue.
    fn order_after(&self, fence: &Fence) -> Result<(), BackendError> {
        match fence.downcast_ref::<PollerFence>() {
            Some(f) if Arc::ptr_eq(&f.poller, &self.poller) => Ok(()),
            _ => Err(BackendError::Driver {
                call: "order_after",
                message: "not a fence of this wgpu device".into(),
            }),
        }
    }

    fn before_host_access(&self, allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        if let Some(seq) = self.remap(allocation)? {
            self.poller.wait(seq);
        }
        match Mem::of(allocation).lock_map().as_deref() {
            Some(MapState::Failed(why)) => {
                Err(BackendError::Driver { call: "Buffer::map_async", message: why.clone() })
            }
            _ => Ok(()),
        }
    }

    fn before_device_access(
        &self,
        allocation: &RawAllocation,
        _kind: MemoryKind,
    ) -> Result<(), BackendError> {
        let mem = Mem::of(allocation);
        if let Some(seq) = self.remap(allocation)? {
            // Mapped back from an earlier guard (or being): wait, then hand it over again.
            self.poller.wait(seq);
        }
        let Some(mut state) = mem.lock_map() else { return Ok(()) };
        match &*state {
            MapState::Mapped => {
                mem.buffer.unmap();
                *state = MapState::Unmapped;
                Ok(())
            }
            MapState::Failed(why) => {
                Err(BackendError::Driver { call: "Buffer::map_async", message: why.clone() })
            }
            MapState::Unmapped | MapState::Remapping(_) => Ok(()),
        }
    }

    /// Maps host-visible memory back without waiting: the fence taken next (a later job of
    /// the poller) orders the block's next user after the mapping.
    fn return_to_host(&self, allocation: &RawAllocation, _kind: MemoryKind) -> Result<(), BackendError> {
        self.remap(allocation).map(drop)
    }

    unsafe fn enqueue_write(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        src: *const u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees `src..src + len` is readable host memory; wgpu copies
        // it before `write_buffer` returns.
        let data = unsafe { std::slice::from_raw_parts(src, len) };
        let buffer = &Mem::of(allocation).buffer;
        let (offset, size) = (offset as u64, len as u64);
        self.health()?;
        if (offset | size).is_multiple_of(GRANULE) {
            let _order = self.submitting.lock().unwrap_or_else(PoisonError::into_inner);
            self.queue.write_buffer(buffer, offset, data);
            // Written at the next submission, before its commands: submit now, so that the
            // write keeps its place among this queue's operations.
            self.queue.submit(None);
            return Ok(());
        }
        // The bytes, at their phase within a word, into scratch; then copied into place.
        let phase = offset % GRANULE;
        let scratch = self.scratch(phase + size)?;
        let mut words =
            vec![0u8; usize::try_from((phase + size).next_multiple_of(GRANULE)).unwrap_or(usize::MAX)];
        words[phase as usize..phase as usize + len].copy_from_slice(data);
        let mut encoder = self.encoder();
        self.encode_copy(&mut encoder, (&scratch, phase), (buffer, offset), size)?;
        let _order = self.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        self.queue.write_buffer(&scratch, 0, &words);
        self.queue.submit(Some(encoder.finish()));
        Ok(())
    }

    unsafe fn enqueue_read(
        &self,
        allocation: &RawAllocation,
        offset: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        let Some(dst) = NonNull::new(dst).filter(|_| len > 0) else { return Ok(()) };
        let buffer = &Mem::of(allocation).buffer;
        let start = offset as u64 / GRANULE * GRANULE;
        let end = (offset + len) as u64;
        let size = end.next_multiple_of(GRANULE) - start;
        let staging = self.staging.take(size)?;
        let mut encoder = self.encoder();
        encoder.copy_buffer_to_buffer(buffer, start, &staging, 0, size);
        let skip = offset - start as usize;
        let pool = Arc::clone(&self.staging);
        // SAFETY (of the job's copy): the caller keeps `dst..dst + len` for this read until a
        // completion or fence taken after it, which retires after this job.
        self.submit(Some(encoder), |index| Job::Readback {
            index,
            staging,
            size,
            skip,
            len,
            dst: HostDst(dst),
            pool,
        })
        .map(drop)
    }

    unsafe fn enqueue_copy(
        &self,
        src: &RawAllocation,
        src_offset: usize,
        dst: &RawAllocation,
        dst_offset: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        let (from, to) = (&Mem::of(src).buffer, &Mem::of(dst).buffer);
        let mut encoder = self.encoder();
        self.encode_copy(&mut encoder, (from, src_offset as u64), (to, dst_offset as u64), len as u64)?;
        self.submit_only(Some(encoder))
    }

    /// A job after everything submitted so far, completed by the poller once the device
    /// has finished it (and the read-backs queued before it are in host memory).
    fn completion(&self, keep: Option<Staging>) -> Result<Pending, BackendError> {
        let (pending, signal) = Pending::new(keep);
        let _order = self.submitting.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.queue.submit(None);
        self.poller.push(Job::Signal { index, signal });
        Ok(pending)
    }

    fn release_cached(&self) {
        self.staging.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apis_rank_the_platforms_own_first() {
        let mut apis = [wgpu::Backend::Vulkan, wgpu::Backend::Gl, wgpu::Backend::Metal, wgpu::Backend::Dx12];
        apis.sort_by_key(|b| api_rank(*b));
        assert_eq!(
            apis,
            [wgpu::Backend::Metal, wgpu::Backend::Dx12, wgpu::Backend::Vulkan, wgpu::Backend::Gl]
        );
    }
}
