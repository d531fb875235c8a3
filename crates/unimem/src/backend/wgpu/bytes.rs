//! Byte-granular copies between device buffers. wgpu copies whole 4-byte words at 4-aligned
//! offsets only (`COPY_BUFFER_ALIGNMENT`); callers of unimem copy any element range, so the
//! bytes that wgpu cannot copy are moved by a small compute shader, in queue order with
//! everything else. Each invocation writes one destination word, merging the bytes in the
//! range into the word's other bytes, so no two invocations write the same word.

use std::num::NonZeroU64;

use wgpu::util::DeviceExt;

use crate::backend::BackendError;

const SHADER: &str = r"
struct Params {
    // The destination range, in bytes from the start of the destination binding.
    dst_lo: u32,
    dst_hi: u32,
    // Where the range starts in the source binding.
    src_lo: u32,
    first_word: u32,
    words: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;

fn src_byte(at: u32) -> u32 {
    return (src[at >> 2u] >> ((at & 3u) * 8u)) & 0xffu;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= p.words) {
        return;
    }
    let word = p.first_word + id.x;
    var value = dst[word];
    for (var b = 0u; b < 4u; b++) {
        let at = word * 4u + b;
        if (at >= p.dst_lo && at < p.dst_hi) {
            let shift = b * 8u;
            value = (value & ~(0xffu << shift)) | (src_byte(at - p.dst_lo + p.src_lo) << shift);
        }
    }
    dst[word] = value;
}
";

/// Threads per workgroup, as in the shader.
const WORKGROUP: u64 = 64;

/// The byte-copy pipeline of one device.
pub(super) struct ByteCopy {
    pipeline: wgpu::ComputePipeline,
    /// Bytes of destination per dispatch: one binding window, and few enough workgroups.
    piece: u64,
    /// Storage bindings start at multiples of this.
    align: u64,
}

impl ByteCopy {
    pub(super) fn new(device: &wgpu::Device) -> Result<Self, BackendError> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("unimem byte copy"),
            source: wgpu::ShaderSource::Wgsl(SHADER.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("unimem byte copy"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(BackendError::Driver { call: "create_compute_pipeline", message: e.to_string() });
        }
        let limits = device.limits();
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let groups = u64::from(limits.max_compute_workgroups_per_dimension);
        let window = limits.max_storage_buffer_binding_size.saturating_sub(2 * align);
        let piece = (8 << 20).min(window).min((groups - 1) * WORKGROUP * 4) & !3;
        Ok(ByteCopy { pipeline, piece: piece.max(4), align })
    }

    /// Encodes a copy of `len` bytes from `src` at byte `src_offset` into `dst` at byte
    /// `dst_offset`: two distinct buffers with `STORAGE` usage and sizes that are multiples
    /// of 4, both ranges in bounds.
    pub(super) fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        src: (&wgpu::Buffer, u64),
        dst: (&wgpu::Buffer, u64),
        len: u64,
    ) -> Result<(), BackendError> {
        let mut done = 0;
        while done < len {
            let n = self.piece.min(len - done);
            self.dispatch(device, encoder, (src.0, src.1 + done), (dst.0, dst.1 + done), n)?;
            done += n;
        }
        Ok(())
    }

    fn dispatch(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        (src, src_offset): (&wgpu::Buffer, u64),
        (dst, dst_offset): (&wgpu::Buffer, u64),
        len: u64,
    ) -> Result<(), BackendError> {
        // Pieces are a few MiB: every figure below fits a `u32`.
        let small = |v: u64| {
            u32::try_from(v).map_err(|_| BackendError::Driver {
                call: "byte copy",
                message: format!("a piece of {len} bytes does not fit one dispatch"),
            })
        };
        // Binding windows: from the aligned start below each range to the word after it.
        let window = |offset: u64| {
            let start = offset / self.align * self.align;
            let end = (offset + len).next_multiple_of(4);
            (start, end - start)
        };
        let (src_start, src_size) = window(src_offset);
        let (dst_start, dst_size) = window(dst_offset);
        let dst_lo = dst_offset - dst_start;
        let first_word = dst_lo / 4;
        let words = (dst_lo + len).div_ceil(4) - first_word;
        let mut params = [0u32; 8];
        for (param, value) in
            params.iter_mut().zip([dst_lo, dst_lo + len, src_offset - src_start, first_word, words])
        {
            *param = small(value)?;
        }
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("unimem byte copy parameters"),
            contents: bytemuck::cast_slice(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let binding = |index, buffer, offset, size| wgpu::BindGroupEntry {
            binding: index,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: NonZeroU64::new(size),
            }),
        };
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("unimem byte copy"),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &[
                binding(0, src, src_start, src_size),
                binding(1, dst, dst_start, dst_size),
                binding(2, &uniform, 0, 32),
            ],
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("unimem byte copy"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(small(words.div_ceil(WORKGROUP))?, 1, 1);
        Ok(())
    }
}
