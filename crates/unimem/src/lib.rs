#![cfg_attr(docsrs, feature(doc_cfg))]
//! # unimem
//!
//! One memory manager for the CPU and accelerators: typed buffers, size-class pools that
//! reuse memory in nanoseconds, zero-copy host access, and statistics.
//!
//! ```
//! use unimem::{AllocationMode, MemoryManager};
//!
//! let manager = MemoryManager::new();
//! let mut buffer = manager.allocate::<f32>(1 << 20, AllocationMode::Pooled)?;
//! buffer.as_mut_slice()?.fill(1.5);
//! let mut back = vec![0.0; 4];
//! buffer.copy_to_blocking(&mut back, 100)?;
//! assert_eq!(back, [1.5; 4]);
//! drop(buffer); // back to the pool
//! assert_eq!(manager.statistics().total_pooled, 4 << 20);
//! # Ok::<(), unimem::Error>(())
//! ```
//!
//! The layers: [`MemoryManager`] validates every argument and owns one pool per (device,
//! memory kind); the pools hand out blocks of size-class capacity; backends (the CPU always,
//! accelerators behind cargo features) only allocate, free and copy.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(
    not(any(feature = "opencl", feature = "cuda", feature = "wgpu")),
    allow(dead_code, reason = "the device-memory paths have no caller without a device backend")
)]

mod backend;
mod buffer;
mod device;
mod error;
mod handoff;
mod host_lines;
mod manager;
pub mod object_pool;
mod options;
pub mod peer;
mod pool;
mod stats;
mod sync;
mod thread_slots;
pub mod transfer;

pub use backend::BackendError;
#[cfg(feature = "cuda")]
pub use backend::cuda::{CudaAccess, CudaBackend};
#[cfg(feature = "opencl")]
pub use backend::opencl::{OpenClBackend, OpenClMem, OpenClSvm};
#[cfg(feature = "wgpu")]
pub use backend::wgpu::{WgpuAccess, WgpuBackend};
pub use buffer::{Buffer, BufferView, BufferViewMut, Mapping};
pub use bytemuck;
#[cfg(feature = "cuda")]
pub use cudarc;
pub use device::{AllocationMode, DeviceId, DeviceInfo, DeviceKind, Location, MapMode, MemoryKind};
pub use error::{Error, OutOfMemoryCause, Result};
pub use manager::{CreateError, MemoryManager, MemoryManagerBuilder, ReturnError};
pub use object_pool::{ObjectPool, ObjectPoolBuilder, ObjectPoolStatistics, Pooled, PooledOwned};
#[cfg(feature = "opencl")]
pub use opencl3;
pub use options::MemoryOptions;
pub use peer::{NoPeerPath, PeerAccess, PeerManager, PeerTopology};
pub use pool::size_class::{MAX_CLASS_BYTES, MIN_CLASS_BYTES};
pub use stats::{ClassOccupancy, MemoryStatistics, PoolStatistics};
pub use transfer::{
    Declined, Destination, Source, Strategy, StrategyStatistics, TransferOptions, TransferReport,
    TransferStatistics,
};
#[cfg(feature = "wgpu")]
pub use wgpu;

/// The element types a buffer can hold: plain data that any bit pattern makes valid
/// (`bytemuck::Pod`), shareable between threads. All primitive numbers qualify, and so do
/// `#[derive(Pod, Zeroable)]` structs.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {}

impl<T: bytemuck::Pod + Send + Sync + 'static> Element for T {}

/// The README's example, compiled and run as a doctest so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
