//! `MemoryManager`: devices, their pools, and the statistics over them.

use crate::Element;
use crate::backend::cpu::{ALIGN, CpuBackend};
use crate::backend::{Backend, RawAllocation};
use crate::buffer::Buffer;
use crate::device::{AllocationMode, DeviceId, DeviceInfo, DeviceKind, MemoryKind};
use crate::error::{Error, Result};
use crate::options::MemoryOptions;
use crate::peer::PeerManager;
use crate::pool::{AcquireError, Block, DevicePool, PoolLimits};
use crate::stats::MemoryStatistics;
use crate::transfer::{Destination, Engine, Source, TransferOptions, TransferReport};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One device and its pools, one per memory kind it supports.
struct Device {
    info: DeviceInfo,
    backend: Arc<dyn Backend>,
    pools: [Option<Arc<DevicePool>>; 3],
}

struct Inner {
    id: u64,
    options: MemoryOptions,
    engine: Arc<Engine>,
    devices: Vec<Device>,
    notes: Vec<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Free all pooled memory now; live buffers free theirs when they are dropped.
        for pool in self.devices.iter().flat_map(|d| d.pools.iter().flatten()) {
            pool.close();
        }
    }
}

/// The memory manager: allocates typed buffers on its devices, pools their memory, and keeps
/// statistics.
///
/// Cheap to clone (clones share everything) and `Send + Sync`: use one from many threads.
/// Buffers keep their pool alive, so they may outlive the manager; their memory is then freed
/// when they are dropped.
///
/// ```
/// use unimem::{AllocationMode, MemoryManager};
///
/// let manager = MemoryManager::new();
/// let first = manager.allocate::<f32>(1000, AllocationMode::Pooled)?;
/// let address = first.as_slice()?.as_ptr();
/// manager.return_to_pool(first).map_err(|e| e.error)?;
/// let second = manager.allocate::<f32>(1000, AllocationMode::Pooled)?;
/// assert_eq!(second.as_slice()?.as_ptr(), address); // the same memory, reused
/// println!("{}", manager.statistics());
/// # Ok::<(), unimem::Error>(())
/// ```
#[derive(Clone)]
pub struct MemoryManager {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryManager`] with chosen options.
#[derive(Debug, Default)]
pub struct MemoryManagerBuilder {
    options: MemoryOptions,
    /// The accelerator backends to open; `None`: every one compiled in.
    backends: Option<Vec<DeviceKind>>,
}

/// A buffer handed to [`MemoryManager::return_to_pool`] that could not be taken back; the
/// buffer is returned unharmed with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ReturnError<T: Element> {
    /// The buffer, untouched.
    pub buffer: Buffer<T>,
    /// Why it was refused.
    #[source]
    pub error: Error,
}

impl<T: Element> From<ReturnError<T>> for Error {
    /// The reason, for `?` (the buffer is dropped, its memory freed or pooled).
    fn from(refused: ReturnError<T>) -> Error {
        refused.error
    }
}

/// A vector handed to [`MemoryManager::create_buffer`] that could not become a buffer; the
/// vector is returned unharmed with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CreateError<T> {
    /// The vector, untouched.
    pub data: Vec<T>,
    /// Why it was refused.
    #[source]
    pub error: Error,
}

impl<T> From<CreateError<T>> for Error {
    /// The reason, for `?` (the vector is dropped).
    fn from(refused: CreateError<T>) -> Error {
        refused.error
    }
}

impl MemoryManagerBuilder {
    /// Uses `options` (already validated by their setters or by deserialisation).
    pub fn options(mut self, options: MemoryOptions) -> Self {
        self.options = options;
        self
    }

    /// Opens only the backends of these kinds (the CPU is always device 0, whether listed
    /// or not): `backends([DeviceKind::Cpu])` makes a manager of the CPU alone, and
    /// `backends([DeviceKind::OpenCl])` one of the CPU and the OpenCL devices. By default
    /// every backend compiled in is opened. A kind whose backend is not compiled in (its
    /// cargo feature is off) adds no devices and a line to
    /// [`MemoryManager::backend_notes`].
    pub fn backends(mut self, kinds: impl IntoIterator<Item = DeviceKind>) -> Self {
        self.backends = Some(kinds.into_iter().collect());
        self
    }

    /// Builds the manager: the CPU device, then every accelerator the chosen backends find.
    /// A backend that finds no device (no driver, no hardware) adds none, and says why in
    /// [`MemoryManager::backend_notes`]; building never fails.
    pub fn build(self) -> MemoryManager {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let options = self.options;
        let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::new(options.huge_pages()));
        let (accelerators, mut notes) = crate::backend::accelerators(self.backends.as_deref());
        let backends: Vec<Arc<dyn Backend>> = std::iter::once(cpu).chain(accelerators).collect();
        let topology = crate::backend::Topology(backends.clone());
        let (peers, peer_notes) = PeerManager::new(topology, options.p2p());
        notes.extend(peer_notes);
        let engine =
            Arc::new(Engine::new(id, options.max_concurrent_transfers(), options.pinned_memory(), peers));
        let devices: Vec<Device> = (0..)
            .zip(backends)
            .map(|(n, backend)| make_device(id, DeviceId(n), backend, &options, &engine))
            .collect();
        let staging = devices
            .iter()
            .map(|d| d.pools[crate::transfer::STAGING_KIND.index()].as_ref().map(Arc::downgrade));
        engine.set_staging_pools(staging.collect());
        MemoryManager { inner: Arc::new(Inner { id, options, engine, devices, notes }) }
    }
}

fn make_device(
    manager_id: u64,
    id: DeviceId,
    backend: Arc<dyn Backend>,
    options: &MemoryOptions,
    engine: &Arc<Engine>,
) -> Device {
    let mut info = backend.info();
    info.id = id;
    let pools = MemoryKind::ALL.map(|kind| {
        backend.supports(kind).then(|| {
            let limits = PoolLimits {
                pooling: options.pooling(),
                per_class: options.max_pool_bytes_per_class(),
                total: options.max_pool_bytes(),
                memory_limit: options.memory_limit(),
                trim_on_pressure: options.trim_on_pressure(),
            };
            let divisions = options.size_class_divisions();
            let engine = Arc::clone(engine);
            Arc::new(DevicePool::new(manager_id, id, kind, Arc::clone(&backend), divisions, limits, engine))
        })
    });
    Device { info, backend, pools }
}

/// `len` elements of `T` in bytes, or why that is impossible.
#[inline]
#[allow(clippy::unnecessary_lazy_evaluations, reason = "an eager Error is built and dropped on the hot path")]
fn byte_len<T: Element>(len: usize) -> Result<usize> {
    if size_of::<T>() == 0 {
        return Err(Error::ZeroSizedElement { element: std::any::type_name::<T>() });
    }
    if align_of::<T>() > ALIGN {
        return Err(Error::UnsupportedAlignment { align: align_of::<T>(), max: ALIGN });
    }
    len.checked_mul(size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| Error::SizeOverflow { len, element_size: size_of::<T>() })
}

fn kind_of(mode: AllocationMode) -> MemoryKind {
    match mode {
        AllocationMode::Pooled | AllocationMode::Unpooled => MemoryKind::Device,
        AllocationMode::Pinned => MemoryKind::Pinned,
        AllocationMode::Unified => MemoryKind::Unified,
    }
}

impl Default for MemoryManager {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryManager {
    /// A manager with default options, of the CPU (device 0) and every device that the
    /// backends compiled in (cargo features `opencl`, `cuda`) find; see
    /// [`MemoryManagerBuilder::backends`] to choose.
    pub fn new() -> Self {
        MemoryManagerBuilder::default().build()
    }

    /// A builder for a manager with chosen options.
    pub fn builder() -> MemoryManagerBuilder {
        MemoryManagerBuilder::default()
    }

    /// The options in force.
    pub fn options(&self) -> &MemoryOptions {
        &self.inner.options
    }

    /// Every device, the CPU first.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.inner.devices.iter().map(|d| d.info.clone()).collect()
    }

    /// Why a compiled-in device backend found no devices (no loader, no driver), one line
    /// per backend; empty when every backend found its devices.
    pub fn backend_notes(&self) -> &[String] {
        &self.inner.notes
    }

    /// The devices of one kind, in [`DeviceId`] order.
    ///
    /// ```
    /// # use unimem::{DeviceKind, MemoryManager};
    /// let manager = MemoryManager::new();
    /// assert_eq!(manager.devices_of(DeviceKind::Cpu).len(), 1);
    /// for gpu in manager.devices_of(DeviceKind::Cuda) {
    ///     println!("{}: {} bytes", gpu.name, gpu.total_memory);
    /// }
    /// ```
    pub fn devices_of(&self, kind: DeviceKind) -> Vec<DeviceInfo> {
        self.inner.devices.iter().filter(|d| d.info.kind == kind).map(|d| d.info.clone()).collect()
    }

    /// The accelerator with the most memory (the first such, on a tie), else the CPU.
    pub fn best_device(&self) -> DeviceInfo {
        let devices = &self.inner.devices;
        devices.iter().skip(1).rev().max_by_key(|d| d.info.total_memory).unwrap_or(&devices[0]).info.clone()
    }

    /// The backend of device `id`, for the backends' interop code.
    pub(crate) fn backend_of(&self, id: DeviceId) -> Result<&dyn Backend> {
        Ok(&*self.device(id)?.backend)
    }

    /// `matrix[i][j]`: device `i` reads and writes device `j`'s memory directly now (see
    /// [`peers`](Self::peers) for the reasons and to switch pairs on and off). Indices are
    /// [`DeviceId`] indices; a device is not its own peer.
    pub fn peer_access_matrix(&self) -> Vec<Vec<bool>> {
        self.peers().matrix()
    }

    /// The peer manager: which device reaches which other's memory directly, why not where
    /// it does not, and switching pairs on and off at run time (all capable pairs start
    /// enabled when the options' `enable_p2p` is on).
    pub fn peers(&self) -> &PeerManager {
        &self.inner.engine.peers
    }

    /// Copies `src` into `dst` (buffers or views of equal length, on any devices) by the
    /// fastest path the devices offer, and reports it; see [`transfer`](crate::transfer)
    /// for the strategies, completion and what a dropped future leaves.
    ///
    /// ```
    /// use unimem::{AllocationMode, MemoryManager, Strategy};
    ///
    /// let manager = MemoryManager::new();
    /// let src = manager.create_buffer((0..1000).collect::<Vec<u32>>(), AllocationMode::Pooled)?;
    /// let mut dst = manager.allocate::<u32>(500, AllocationMode::Pooled)?;
    /// let report = pollster::block_on(manager.transfer(src.slice(250..750)?, &mut dst))?;
    /// assert_eq!(report.strategy, Strategy::DeviceLocal); // both on the CPU
    /// assert_eq!(dst.as_slice()?[0], 250);
    /// # Ok::<(), unimem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::LengthMismatch`]; the errors of the backends; and, for a forced strategy
    /// that cannot work, [`Error::StrategyUnavailable`].
    pub fn transfer<'a, T: Element>(
        &'a self,
        src: impl Into<Source<'a, T>>,
        dst: impl Into<Destination<'a, T>>,
    ) -> impl Future<Output = Result<TransferReport>> + Send + 'a {
        self.transfer_with(src, dst, TransferOptions::default())
    }

    /// [`transfer`](Self::transfer) with chosen options (a forced strategy, the pinned
    /// staging chunks).
    pub fn transfer_with<'a, T: Element>(
        &'a self,
        src: impl Into<Source<'a, T>>,
        dst: impl Into<Destination<'a, T>>,
        options: TransferOptions,
    ) -> impl Future<Output = Result<TransferReport>> + Send + 'a {
        let (src, dst) = (src.into(), dst.into());
        async move { self.inner.engine.run(src, dst, &options).await }
    }

    /// [`transfer`](Self::transfer), waiting on this thread.
    pub fn transfer_blocking<'a, T: Element>(
        &'a self,
        src: impl Into<Source<'a, T>>,
        dst: impl Into<Destination<'a, T>>,
    ) -> Result<TransferReport> {
        crate::transfer::block_on(self.transfer(src, dst))
    }

    /// [`transfer_with`](Self::transfer_with), waiting on this thread.
    pub fn transfer_with_blocking<'a, T: Element>(
        &'a self,
        src: impl Into<Source<'a, T>>,
        dst: impl Into<Destination<'a, T>>,
        options: TransferOptions,
    ) -> Result<TransferReport> {
        crate::transfer::block_on(self.transfer_with(src, dst, options))
    }

    /// Runs every `(source, destination)` pair, up to `max_concurrent_transfers` at once,
    /// and reports each, in order. A failed pair fails alone, with
    /// [`Error::InBatch`] naming its index; the others run to completion.
    ///
    /// ```
    /// use unimem::{AllocationMode, MemoryManager};
    ///
    /// let manager = MemoryManager::new();
    /// let sources: Vec<_> = (0..4).map(|i| manager.create_buffer(vec![i; 64], AllocationMode::Pooled)).collect::<Result<_, _>>()?;
    /// let mut targets: Vec<_> = (0..4).map(|_| manager.allocate::<i32>(64, AllocationMode::Pooled)).collect::<Result<_, _>>()?;
    /// let reports = manager.transfer_batch_blocking(sources.iter().zip(targets.iter_mut()));
    /// assert!(reports.iter().all(|r| r.is_ok()));
    /// assert_eq!(targets[3].as_slice()?[63], 3);
    /// # Ok::<(), unimem::Error>(())
    /// ```
    pub fn transfer_batch<'a, T, S, D>(
        &'a self,
        pairs: impl IntoIterator<Item = (S, D)>,
    ) -> impl Future<Output = Vec<Result<TransferReport>>> + Send + 'a
    where
        T: Element,
        S: Into<Source<'a, T>>,
        D: Into<Destination<'a, T>>,
    {
        self.transfer_batch_with(pairs, TransferOptions::default())
    }

    /// [`transfer_batch`](Self::transfer_batch) with chosen options for every pair.
    pub fn transfer_batch_with<'a, T, S, D>(
        &'a self,
        pairs: impl IntoIterator<Item = (S, D)>,
        options: TransferOptions,
    ) -> impl Future<Output = Vec<Result<TransferReport>>> + Send + 'a
    where
        T: Element,
        S: Into<Source<'a, T>>,
        D: Into<Destination<'a, T>>,
    {
        let pairs: Vec<(Source<'a, T>, Destination<'a, T>)> =
            pairs.into_iter().map(|(s, d)| (s.into(), d.into())).collect();
        async move {
            let engine = &self.inner.engine;
            let options = &options;
            let runs = pairs.into_iter().enumerate().map(|(index, (src, dst))| async move {
                engine.run(src, dst, options).await.map_err(|e| Error::InBatch { index, source: Box::new(e) })
            });
            futures_util::future::join_all(runs).await
        }
    }

    /// [`transfer_batch`](Self::transfer_batch), waiting on this thread.
    pub fn transfer_batch_blocking<'a, T, S, D>(
        &'a self,
        pairs: impl IntoIterator<Item = (S, D)>,
    ) -> Vec<Result<TransferReport>>
    where
        T: Element,
        S: Into<Source<'a, T>>,
        D: Into<Destination<'a, T>>,
    {
        crate::transfer::block_on(self.transfer_batch(pairs))
    }

    #[inline]
    #[allow(
        clippy::unnecessary_lazy_evaluations,
        reason = "an eager Error is built and dropped on the hot path"
    )]
    fn device(&self, id: DeviceId) -> Result<&Device> {
        let devices = &self.inner.devices;
        devices.get(id.index()).ok_or_else(|| Error::UnknownDevice { device: id, count: devices.len() })
    }

    #[inline]
    #[allow(
        clippy::unnecessary_lazy_evaluations,
        reason = "an eager Error is built and dropped on the hot path"
    )]
    pub(crate) fn pool(&self, device: DeviceId, mode: AllocationMode) -> Result<&Arc<DevicePool>> {
        let kind = kind_of(mode);
        self.device(device)?.pools[kind.index()]
            .as_ref()
            .ok_or_else(|| Error::UnsupportedMode { device, mode })
    }

    /// Allocates `len` elements on the CPU.
    #[inline(always)]
    pub fn allocate<T: Element>(&self, len: usize, mode: AllocationMode) -> Result<Buffer<T>> {
        self.allocate_on(DeviceId::CPU, len, mode)
    }

    /// Allocates `len` elements on `device`.
    ///
    /// Errors: [`Error::SizeOverflow`] when the byte size does not fit, [`Error::UnknownDevice`],
    /// [`Error::UnsupportedMode`], and [`Error::OutOfMemory`] when memory ran out even after
    /// the device's pools were trimmed and the allocation retried.
    ///
    /// A pool hit (a block of the size class in this thread's cache) is inlined into the
    /// caller and makes no call; everything else is out of line.
    #[inline(always)]
    pub fn allocate_on<T: Element>(
        &self,
        device: DeviceId,
        len: usize,
        mode: AllocationMode,
    ) -> Result<Buffer<T>> {
        match self.allocate_hit::<T>(device, len, mode) {
            Some(block) => Ok(Buffer::from_block(block, len)),
            None => self.allocate_slow(device, len, mode),
        }
    }

    /// The hit path of [`allocate_on`](Self::allocate_on): `None`, having changed nothing,
    /// for anything but a hit.
    #[inline(always)]
    fn allocate_hit<T: Element>(
        &self,
        device: DeviceId,
        len: usize,
        mode: AllocationMode,
    ) -> Option<Box<Block>> {
        // The checks of `byte_len`, with no error built: constants but the product, whose
        // bound (`isize::MAX`) the size classes' own (a hit is at most the largest class)
        // makes for it.
        if size_of::<T>() == 0 || align_of::<T>() > ALIGN {
            return None;
        }
        self.take_cached(device, len.checked_mul(size_of::<T>())?, mode)
    }

    /// A block of `bytes` from this thread's cache of the pool of (`device`, `mode`), made
    /// ready for a buffer of `mode`. Inlined, as the rest of the hit path: out of line, its
    /// call and register saves cost 2% of a 1 KiB hit + return (14.8 against 15.2 ns,
    /// interleaved runs on the machine of BENCHMARKS.md).
    #[inline(always)]
    fn take_cached(&self, device: DeviceId, bytes: usize, mode: AllocationMode) -> Option<Box<Block>> {
        let pool = self.inner.devices.get(device.index())?.pools[kind_of(mode).index()].as_ref()?;
        let mut block = pool.acquire_fast(bytes, mode != AllocationMode::Unpooled)?;
        // Written only when it changes: a loop that allocates one mode finds it set, and a
        // store on the hit path costs about a cycle.
        if block.mode != mode {
            block.mode = mode;
        }
        Some(block)
    }

    #[cold]
    #[inline(never)]
    fn allocate_slow<T: Element>(
        &self,
        device: DeviceId,
        len: usize,
        mode: AllocationMode,
    ) -> Result<Buffer<T>> {
        let bytes = byte_len::<T>(len)?;
        let pool = self.pool(device, mode)?;
        let block = self.acquire(pool, bytes, mode != AllocationMode::Unpooled)?;
        Ok(Buffer::new(block, len, mode))
    }

    #[inline]
    fn acquire(&self, pool: &Arc<DevicePool>, bytes: usize, pooled: bool) -> Result<Box<Block>> {
        match pool.acquire(bytes, pooled) {
            Ok(block) => Ok(block),
            Err(e) => self.acquire_under_pressure(pool, bytes, pooled, e),
        }
    }

    /// The allocation failed with `first`: trim and retry once if it ran out of memory.
    #[cold]
    #[inline(never)]
    fn acquire_under_pressure(
        &self,
        pool: &Arc<DevicePool>,
        bytes: usize,
        pooled: bool,
        first: AcquireError,
    ) -> Result<Box<Block>> {
        let requested = u64::try_from(bytes).unwrap_or(u64::MAX);
        let fatal = |e| match e {
            AcquireError::Backend(source) => Err(Error::on(pool.device)(source)),
            AcquireError::TooLarge { largest } => {
                Err(Error::TooLarge { requested, device: pool.device, kind: pool.kind, largest })
            }
            AcquireError::Exhausted(cause) => Ok(cause),
        };
        let mut cause = fatal(first)?;
        if self.inner.options.trim_on_pressure() {
            self.trim_device(pool.device);
            pool.count_oom_retry();
            match pool.acquire(bytes, pooled) {
                Ok(block) => return Ok(block),
                Err(e) => cause = fatal(e)?,
            }
        }
        Err(Error::OutOfMemory {
            requested,
            device: pool.device,
            kind: pool.kind,
            cause,
            stats: Box::new(self.statistics()),
        })
    }

    /// Makes a CPU buffer from `data`. The vector's memory is adopted without copying (and
    /// freed, not pooled, when the buffer is dropped: its layout is the vector's) unless
    /// `mode` is [`AllocationMode::Pinned`], which needs page-locked memory and so copies.
    ///
    /// # Errors
    /// As for [`allocate`](Self::allocate); the vector comes back in the error.
    pub fn create_buffer<T: Element>(
        &self,
        data: Vec<T>,
        mode: AllocationMode,
    ) -> Result<Buffer<T>, CreateError<T>> {
        if mode == AllocationMode::Pinned {
            return self
                .create_buffer_on(DeviceId::CPU, &data, mode)
                .map_err(|error| CreateError { data, error });
        }
        let checked = byte_len::<T>(data.len()).and_then(|size| Ok((size, self.pool(DeviceId::CPU, mode)?)));
        let (size, pool) = match checked {
            Ok(checked) => checked,
            Err(error) => return Err(CreateError { data, error }),
        };
        let mut data = ManuallyDrop::new(data);
        // A Vec's buffer spans `capacity` elements; for zero-sized types it spans nothing.
        let bytes = data.capacity().saturating_mul(size_of::<T>());
        let mem = RawAllocation { handle: 0, host: NonNull::new(data.as_mut_ptr().cast::<u8>()), bytes };
        let block = pool.adopt(mem, align_of::<T>(), size);
        let mode = if mode == AllocationMode::Pooled { AllocationMode::Unpooled } else { mode };
        Ok(Buffer::new(block, data.len(), mode))
    }

    /// Makes a buffer on `device` holding a copy of `data`.
    pub fn create_buffer_on<T: Element>(
        &self,
        device: DeviceId,
        data: &[T],
        mode: AllocationMode,
    ) -> Result<Buffer<T>> {
        let mut buffer = self.allocate_on(device, data.len(), mode)?;
        buffer.copy_from_blocking(data, 0)?;
        Ok(buffer)
    }

    /// Returns a buffer's memory to its pool (dropping the buffer does the same). A buffer
    /// of another manager is refused and handed back unharmed.
    pub fn return_to_pool<T: Element>(&self, buffer: Buffer<T>) -> Result<(), ReturnError<T>> {
        if buffer.manager_id() != self.inner.id {
            return Err(ReturnError { buffer, error: Error::WrongManager });
        }
        drop(buffer);
        Ok(())
    }

    fn pools(&self) -> impl Iterator<Item = &Arc<DevicePool>> {
        self.inner.devices.iter().flat_map(|d| d.pools.iter().flatten())
    }

    /// A snapshot of the statistics of every pool.
    pub fn statistics(&self) -> MemoryStatistics {
        let mut stats = MemoryStatistics::from_pools(self.pools().map(|p| p.statistics()).collect());
        stats.transfers = self.inner.engine.statistics();
        stats
    }

    /// Frees all pooled memory. Returns the bytes freed.
    pub fn trim(&self) -> u64 {
        self.pools().map(|p| p.trim_to(0)).sum()
    }

    /// Frees pooled memory until at most `bytes` stay pooled in the whole manager, largest
    /// size classes first across every pool of every device and memory kind (a 1 MiB
    /// pinned block goes before a 4 KiB device one). Returns the bytes freed.
    pub fn trim_to(&self, bytes: u64) -> u64 {
        let mut classes: Vec<(u64, &Arc<DevicePool>, usize, u64)> = self
            .pools()
            .flat_map(|pool| pool.pooled_classes().into_iter().map(move |(c, size, n)| (size, pool, c, n)))
            .collect();
        let pooled: u64 = classes.iter().map(|&(size, _, _, n)| size.saturating_mul(n)).sum();
        let mut excess = pooled.saturating_sub(bytes);
        classes.sort_by_key(|&(size, ..)| std::cmp::Reverse(size));
        let mut freed = 0u64;
        for (size, pool, class, blocks) in classes {
            if excess == 0 {
                break;
            }
            let done = pool.trim_class(class, blocks.min(excess.div_ceil(size)));
            excess = excess.saturating_sub(done);
            freed = freed.saturating_add(done);
        }
        freed
    }

    /// Free memory on `device` now, asked of the driver (the host's available memory for
    /// the CPU), or `None` where the driver cannot tell (OpenCL has no portable query).
    /// [`DeviceInfo::free_memory`] is the same query, made when the manager was built.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`].
    pub fn free_memory(&self, device: DeviceId) -> Result<Option<u64>> {
        let device = self.device(device)?;
        Ok(device.backend.free_now())
    }

    fn trim_device(&self, device: DeviceId) {
        if let Ok(d) = self.device(device) {
            for pool in d.pools.iter().flatten() {
                pool.trim_to(0);
            }
        }
    }
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("devices", &self.inner.devices.iter().map(|d| &d.info.name).collect::<Vec<_>>())
            .field("options", &self.inner.options)
            .finish()
    }
}
