//! The library's error type.

use crate::device::{AllocationMode, DeviceId, DeviceKind, MemoryKind};
use crate::stats::MemoryStatistics;

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
    #[error("out of memory: {requested} bytes of {kind} memory on {device} ({stats})")]
    OutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// The device.
        device: DeviceId,
        /// The kind of memory.
        kind: MemoryKind,
        /// The manager's statistics when the allocation failed.
        stats: Box<MemoryStatistics>,
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
