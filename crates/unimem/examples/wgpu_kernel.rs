//! Runs a WGSL compute shader of our own on unimem memory, with wgpu: the host fills a
//! device buffer, the shader scales it into another, the host reads the result; unimem moves
//! the data, and the raw-access guards keep its transfers and pooled reuse ordered with the
//! shader (one queue per wgpu device, shared with unimem).
//!
//! Run: `cargo run -p unimem --features wgpu --example wgpu_kernel` (on Linux without a GPU,
//! Mesa's lavapipe runs it: `apt install libvulkan1 mesa-vulkan-drivers`).

use unimem::wgpu;
use unimem::{AllocationMode, DeviceKind, MapMode, MemoryManager};

const SHADER: &str = r"
@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read_write> output: array<f32>;

@compute @workgroup_size(64)
fn scale(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&output)) {
        output[id.x] = input[id.x] * 3.0;
    }
}
";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manager = MemoryManager::builder().backends([DeviceKind::Wgpu]).build();
    let Some(device) = manager.devices_of(DeviceKind::Wgpu).into_iter().next() else {
        println!("no wgpu device: {}", manager.backend_notes().join("; "));
        return Ok(());
    };
    println!("device: {}", device.name);
    let gpu = manager.wgpu_device(device.id)?;
    let module = gpu.device().create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("scale"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let pipeline = gpu.device().create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("scale"),
        layout: None,
        module: &module,
        entry_point: Some("scale"),
        compilation_options: Default::default(),
        cache: None,
    });

    let n = 1 << 20;
    let mut input = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    let mut output = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    for (i, x) in input.map(MapMode::Write)?.iter_mut().enumerate() {
        *x = i as f32;
    }
    {
        // The host data goes to the device here; the output's host side is dropped.
        let input = input.wgpu_buffer(MapMode::Read)?;
        let output = output.wgpu_buffer(MapMode::Write)?;
        let group = gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("scale"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: input.binding() },
                wgpu::BindGroupEntry { binding: 1, resource: output.binding() },
            ],
        });
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups((n as u32).div_ceil(64), 1, 1);
        }
        gpu.queue().submit([encoder.finish()]);
    }
    let result = output.as_slice()?; // after the shader, in queue order; copies once
    assert!(result.iter().enumerate().all(|(i, &y)| y == 3.0 * i as f32));
    println!("out[12345] = {} (expected {})", result[12345], 3.0 * 12345.0);
    println!("{}", manager.statistics());
    Ok(())
}
