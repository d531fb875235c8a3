//! Devices and the vocabulary of memory: which device, which kind of memory, where the
//! current contents live.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies one device of a [`MemoryManager`](crate::MemoryManager).
///
/// The CPU is always [`DeviceId::CPU`]; accelerators follow in discovery order. An id is
/// only meaningful for the manager that handed it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub(crate) u32);

impl DeviceId {
    /// The host CPU, present in every manager.
    pub const CPU: DeviceId = DeviceId(0);

    /// The index of this device in [`MemoryManager::devices`](crate::MemoryManager::devices).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}", self.0)
    }
}

/// The API family a device is driven through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeviceKind {
    /// The host processor and its memory.
    Cpu,
    /// An NVIDIA GPU through the CUDA driver API.
    Cuda,
    /// Any OpenCL device.
    OpenCl,
    /// A GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
}

impl DeviceKind {
    /// The API's name as people write it: "CPU", "CUDA", "OpenCL", "wgpu".
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPU",
            DeviceKind::Cuda => "CUDA",
            DeviceKind::OpenCl => "OpenCL",
            DeviceKind::Wgpu => "wgpu",
        }
    }

    /// The name with its article: "a CPU", "an OpenCL".
    pub(crate) fn article_name(self) -> String {
        let article = if matches!(self, DeviceKind::OpenCl) { "an" } else { "a" };
        format!("{article} {}", self.name())
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::OpenCl => "opencl",
            DeviceKind::Wgpu => "wgpu",
        })
    }
}

/// What a device is and what its memory can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// The device's id in its manager.
    pub id: DeviceId,
    /// The API family.
    pub kind: DeviceKind,
    /// A human-readable name, as the driver reports it.
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
    /// Free memory in bytes when the manager was built, or `None` where the driver cannot
    /// tell (OpenCL). [`MemoryManager::free_memory`](crate::MemoryManager::free_memory)
    /// asks again.
    pub free_memory: Option<u64>,
    /// Whether the host can address this device's ordinary memory directly.
    pub host_addressable: bool,
    /// Whether [`AllocationMode::Pinned`] is available.
    pub supports_pinned: bool,
    /// Whether [`AllocationMode::Unified`] is available.
    pub supports_unified: bool,
    /// Whether the device can take part in peer-to-peer copies.
    pub peer_capable: bool,
}

/// How a buffer's memory is obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AllocationMode {
    /// Reuse memory from the size-class pool when possible (the default).
    #[default]
    Pooled,
    /// Always allocate fresh memory and free it when the buffer is dropped.
    Unpooled,
    /// Page-locked host memory, for fast DMA to and from devices. Pooled in its own pool.
    Pinned,
    /// Memory that host and device both address (CUDA managed memory, OpenCL SVM). On the
    /// CPU device this is ordinary host memory, which the CPU addresses by definition.
    Unified,
}

impl fmt::Display for AllocationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The kind of memory a pool holds. Each (device, kind) pair has its own pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemoryKind {
    /// The device's own memory (host memory for the CPU device).
    Device,
    /// Page-locked host memory.
    Pinned,
    /// Memory addressed by host and device alike.
    Unified,
}

impl MemoryKind {
    /// Every kind, in pool order.
    pub const ALL: [MemoryKind; 3] = [MemoryKind::Device, MemoryKind::Pinned, MemoryKind::Unified];

    pub(crate) fn index(self) -> usize {
        match self {
            MemoryKind::Device => 0,
            MemoryKind::Pinned => 1,
            MemoryKind::Unified => 2,
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemoryKind::Device => "device",
            MemoryKind::Pinned => "pinned",
            MemoryKind::Unified => "unified",
        })
    }
}

/// Where a buffer's current contents are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Location {
    /// Only the host side is current (always the case for CPU buffers).
    Host,
    /// Only the device side is current.
    Device,
    /// Host and device agree (or are the same memory).
    Both,
}

/// What a [`Mapping`](crate::Mapping) will be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MapMode {
    /// Read the current contents.
    Read,
    /// Overwrite the whole mapped range: current device contents need not be fetched first.
    Write,
    /// Read and modify.
    ReadWrite,
}
