//! The library's error type.

use crate::device::{AllocationMode, DeviceId, DeviceKind, MemoryKind};
use crate::stats::MemoryStatistics;

/// Which limit an allocation ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutOfMemoryCause {
    /// The device (or the host, for host memory) has no memory left.
    Device,
    /// The manager's `memory_limit` option.
    MemoryLimit {
        /// The limit in bytes.
        limit: u64,
    },
    /// The operating system's limit on page-locked memory (`RLIMIT_MEMLOCK`), which pinned
    /// host memory counts against.
    LockLimit {
        /// The limit in bytes.
        limit: u64,
    },
}

impl std::fmt::Display for OutOfMemoryCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutOfMemoryCause::Device => f.write_str("the device has no memory left"),
            OutOfMemoryCause::MemoryLimit { limit } => {
                write!(f, "the manager's memory_limit of {limit} bytes is reached")
            }
            OutOfMemoryCause::LockLimit { limit } => write!(
                f,
                "the lock limit for page-locked memory (RLIMIT_MEMLOCK, {limit} bytes) is reached; \
                 raise it with `ulimit -l` (or LimitMEMLOCK= for a service, memlock in \
                 /etc/security/limits.conf), or use fewer pinned buffers"
            ),
        }
    }
}

/// The result type of unimem.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in unimem. Each variant names the value that was wrong and
/// the limit it broke; no error leaves a buffer or pool in a changed state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `len` elements of `element_size` bytes do not fit in `usize`.
    #[error("{len} elements of {element_size} bytes overflow the address space")]
    SizeOverflow {
        /// Requested element count.
        len: usize,
        /// Size of one element in bytes.
        element_size: usize,
    },
    /// A range reaches past the end of a buffer.
    #[error("offset {offset} + length {len} exceeds buffer length {buffer_len}")]
    OutOfBounds {
        /// First element of the range.
        offset: usize,
        /// Elements in the range.
        len: usize,
        /// Elements in the buffer.
        buffer_len: usize,
    },
    /// A range whose start lies after its end.
    #[error("range start {start} is after its end {end}")]
    InvalidRange {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
    },
    /// Two sides of a copy differ in length.
    #[error("length mismatch: destination holds {destination} elements, source {source_len}")]
    LengthMismatch {
        /// Elements in the destination.
        destination: usize,
        /// Elements in the source.
        source_len: usize,
    },
    /// The device id does not name a device of this manager.
    #[error("{device} does not exist in this manager ({count} devices)")]
    UnknownDevice {
        /// The id that was given.
        device: DeviceId,
        /// How many devices the manager has.
        count: usize,
    },
    /// The device exists but is not of the kind the call needs.
    #[error("{device} is a {found:?} device, not {expected:?}")]
    WrongDeviceKind {
        /// The id that was given.
        device: DeviceId,
        /// The kind the call needs.
        expected: DeviceKind,
        /// The device's kind.
        found: DeviceKind,
    },
    /// The buffer was allocated by another manager.
    #[error("buffer belongs to another memory manager")]
    WrongManager,
    /// The device cannot provide the requested mode.
    #[error("{device} does not support {mode} memory")]
    UnsupportedMode {
        /// The device asked.
        device: DeviceId,
        /// The mode it lacks.
        mode: AllocationMode,
    },
    /// The element type needs an alignment that allocations do not guarantee.
    #[error("element alignment {align} exceeds the supported maximum of {max}")]
    UnsupportedAlignment {
        /// Alignment of the element type.
        align: usize,
        /// Largest supported alignment.
        max: usize,
    },
    /// A caller's stream or queue that does not belong to the buffer's device (its context).
    #[error("the stream or queue does not belong to {device}'s context")]
    ForeignQueue {
        /// The buffer's device.
        device: DeviceId,
    },
    /// The memory is not addressable from the host.
    #[error("{device} memory is not host-addressable")]
    NotHostAddressable {
        /// The device that owns the memory.
        device: DeviceId,
    },
    /// An option was zero, absurd or inconsistent.
    #[error("invalid option {option} = {value}: {reason}")]
    InvalidOption {
        /// Name of the option.
        option: &'static str,
        /// The value given.
        value: String,
        /// What a valid value looks like.
        reason: &'static str,
    },
    /// Memory ran out even after the pool was trimmed and the allocation retried.
    #[error("out of memory: {requested} bytes of {kind} memory on {device}: {cause} ({stats})")]
    OutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// The device.
        device: DeviceId,
        /// The kind of memory.
        kind: MemoryKind,
        /// Which limit was reached.
        cause: OutOfMemoryCause,
        /// The manager's statistics when the allocation failed.
        stats: Box<MemoryStatistics>,
    },
    /// The request can never fit on the device, whatever is freed: it is larger than the
    /// device's largest single allocation. Nothing was trimmed or retried.
    #[error("too large for {device}: {requested} bytes of {kind} memory, largest allocation {largest} bytes")]
    TooLarge {
        /// Bytes asked for.
        requested: u64,
        /// The device.
        device: DeviceId,
        /// The kind of memory.
        kind: MemoryKind,
        /// The largest single allocation the device allows.
        largest: u64,
    },
    /// The element type has size zero: a buffer of it would hold no memory to manage.
    #[error("element type {element} is zero-sized; buffers need elements of at least one byte")]
    ZeroSizedElement {
        /// The element type's name.
        element: &'static str,
    },
    /// A backend-specific call on a buffer or device of another backend (`opencl_mem` on a
    /// CPU buffer, say).
    #[error("not {} buffer: {device} holds {} memory ({mode})", .expected.article_name(), .found.name())]
    WrongBackend {
        /// The buffer's device.
        device: DeviceId,
        /// The backend the call needs.
        expected: DeviceKind,
        /// The buffer's backend.
        found: DeviceKind,
        /// The buffer's mode.
        mode: AllocationMode,
    },
    /// The device was lost (reset, removed, or its context broke for good): no operation on
    /// it can succeed any more. Buffers on it can still be dropped.
    #[error("{device} was lost: {message}")]
    DeviceLost {
        /// The device.
        device: DeviceId,
        /// What the driver said.
        message: String,
    },
    /// A transfer strategy was asked for where it cannot work.
    #[error("{strategy} is not possible for this transfer: {reason}")]
    StrategyUnavailable {
        /// The strategy asked for.
        strategy: crate::transfer::Strategy,
        /// Why it cannot work.
        reason: String,
    },
    /// Peer access asked of a pair of devices with no direct path.
    #[error("{device} has no direct path to {peer}'s memory: {reason}")]
    NoPeerPath {
        /// The device that would access.
        device: DeviceId,
        /// The device whose memory would be accessed.
        peer: DeviceId,
        /// Why there is no path.
        reason: crate::peer::NoPeerPath,
    },
    /// One transfer of a batch failed; the others are reported on their own.
    #[error("transfer {index} of the batch failed: {source}")]
    InBatch {
        /// The failed transfer's position in the batch.
        index: usize,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// The driver failed in a way the caller could not foresee.
    #[error("{device}: {source}")]
    Backend {
        /// The device whose backend failed.
        device: DeviceId,
        /// What the backend reported.
        #[source]
        source: crate::backend::BackendError,
    },
}

impl Error {
    /// The error for `source`, reported by `device`'s backend: a lost device is
    /// [`Error::DeviceLost`], anything else [`Error::Backend`].
    pub(crate) fn on(device: DeviceId) -> impl FnOnce(crate::backend::BackendError) -> Error {
        move |source| match source {
            crate::backend::BackendError::DeviceLost { message } => Error::DeviceLost { device, message },
            source => Error::Backend { device, source },
        }
    }
}
