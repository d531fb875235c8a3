//! Runs an OpenCL kernel of our own on unimem memory: the host fills a device buffer, the
//! kernel scales it into another, the host reads the result; unimem moves the data.
//!
//! Run: `cargo run -p unimem --features opencl --example opencl_kernel`

#[path = "../tests/support/cl_kernel.rs"]
mod cl_kernel;

use unimem::{AllocationMode, DeviceKind, MapMode, MemoryManager};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manager = MemoryManager::new();
    let Some(device) = manager.devices().into_iter().find(|d| d.kind == DeviceKind::OpenCl) else {
        println!("no OpenCL device: {}", manager.backend_notes().join("; "));
        return Ok(());
    };
    println!("device: {}", device.name);
    let cl = manager.opencl_device(device.id)?;
    let scale = cl_kernel::Kernel::new(cl.context(), cl.device_id(), c"scale")?;

    let n = 1 << 20;
    let mut input = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    let mut output = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    for (i, x) in input.map(MapMode::Write)?.iter_mut().enumerate() {
        *x = i as f32;
    }
    scale.arg_mem(0, input.opencl_mem(MapMode::Read)?)?; // host data goes to the device here
    scale.arg_mem(1, output.opencl_mem(MapMode::Write)?)?;
    scale.arg_f32(2, 2.0)?;
    scale.enqueue(cl.queue(), n)?;
    let result = output.as_slice()?; // waits for the kernel, copies once
    assert!(result.iter().enumerate().all(|(i, &y)| y == 3.0 * i as f32));
    println!("out[12345] = {} (expected {})", result[12345], 3.0 * 12345.0);
    println!("{}", manager.statistics());
    Ok(())
}
