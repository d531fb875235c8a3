//! Read-back staging: `MAP_READ | COPY_DST` buffers that device memory is copied into before
//! the host reads it, kept for reuse in power-of-two sizes.

use std::sync::{Mutex, PoisonError};

use super::create_buffer;
use crate::backend::BackendError;

/// Smallest staging buffer.
const MIN_BYTES: u64 = 64 << 10;
/// Buffers kept per size.
const KEEP_PER_SIZE: usize = 4;
/// Bytes kept in all.
const KEEP_BYTES: u64 = 256 << 20;

/// Idle staging buffers of one device.
pub(super) struct StagingPool {
    device: wgpu::Device,
    /// The device's largest buffer.
    largest: u64,
    idle: Mutex<Vec<wgpu::Buffer>>,
}

impl StagingPool {
    pub(super) fn new(device: wgpu::Device, largest: u64) -> Self {
        StagingPool { device, largest, idle: Mutex::new(Vec::new()) }
    }

    /// An unmapped staging buffer of at least `bytes` (a multiple of 4, at most the
    /// device's largest buffer).
    pub(super) fn take(&self, bytes: u64) -> Result<wgpu::Buffer, BackendError> {
        let size = bytes.max(MIN_BYTES).next_power_of_two();
        let size = if size > self.largest { bytes } else { size };
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = idle.iter().position(|b| b.size() == size) {
            return Ok(idle.swap_remove(at));
        }
        drop(idle);
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        create_buffer(&self.device, "unimem read-back staging", size, usage, false)
    }

    /// Keeps `buffer` (unmapped, no longer used by the device) for the next read-back, unless
    /// enough of its size or in all are kept already.
    pub(super) fn give_back(&self, buffer: wgpu::Buffer) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let same = idle.iter().filter(|b| b.size() == buffer.size()).count();
        let kept: u64 = idle.iter().map(wgpu::Buffer::size).sum();
        if same < KEEP_PER_SIZE && kept + buffer.size() <= KEEP_BYTES {
            idle.push(buffer);
        }
    }

    /// Frees every idle buffer.
    pub(super) fn clear(&self) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}
