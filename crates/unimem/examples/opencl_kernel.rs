//! Runs an OpenCL kernel of our own on unimem memory, with opencl3: the host fills a device
//! buffer, the kernel scales it into another, the host reads the result; unimem moves the
//! data, and the raw-access guards keep its transfers and pooled reuse ordered with the
//! kernel.
//!
//! Run: `cargo run -p unimem --features opencl --example opencl_kernel`

use unimem::opencl3::kernel::{ExecuteKernel, Kernel};
use unimem::opencl3::program::Program;
use unimem::{AllocationMode, DeviceKind, MapMode, MemoryManager};

const SOURCE: &str = r#"
__kernel void scale(__global const float* input, __global float* output, float factor) {
    size_t i = get_global_id(0);
    output[i] = input[i] * factor;
}
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manager = MemoryManager::builder().backends([DeviceKind::OpenCl]).build();
    let Some(device) = manager.devices_of(DeviceKind::OpenCl).into_iter().next() else {
        println!("no OpenCL device: {}", manager.backend_notes().join("; "));
        return Ok(());
    };
    println!("device: {}", device.name);
    let cl = manager.opencl_device(device.id)?;
    let program = Program::create_and_build_from_source(cl.context(), SOURCE, "")?;
    let scale = Kernel::create(&program, "scale")?;

    let n = 1 << 20;
    let mut input = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    let mut output = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    for (i, x) in input.map(MapMode::Write)?.iter_mut().enumerate() {
        *x = i as f32;
    }
    {
        // The host data goes to the device here; the output's host side is dropped.
        let input = input.opencl_mem(cl.queue(), MapMode::Read)?;
        let output = output.opencl_mem(cl.queue(), MapMode::Write)?;
        // SAFETY: the kernel takes two `float` buffers of `n` elements and a `float`, as
        // given, and runs `n` work items.
        unsafe {
            ExecuteKernel::new(&scale)
                .set_arg(&input.mem())
                .set_arg(&output.mem())
                .set_arg(&3.0f32)
                .set_global_work_size(n)
                .enqueue_nd_range(cl.queue())?;
        }
    }
    let result = output.as_slice()?; // waits for the kernel, copies once
    assert!(result.iter().enumerate().all(|(i, &y)| y == 3.0 * i as f32));
    println!("out[12345] = {} (expected {})", result[12345], 3.0 * 12345.0);
    println!("{}", manager.statistics());
    Ok(())
}
