//! Runs a CUDA kernel of our own on unimem memory, with cudarc: the host fills a device
//! buffer, the kernel scales it into another on a stream of our own, the host reads the
//! result. The raw-access guards go straight into cudarc's launch builder, and order
//! unimem's transfers and pooled reuse after the kernel on the device.
//!
//! Run: `cargo run -p unimem --features cuda --example cuda_kernel`. Without a GPU there is
//! nothing to run on; on the tests' model of the driver (which runs no kernels) everything
//! but the launch runs.

use unimem::cudarc::driver::{LaunchConfig, PushKernelArg};
use unimem::cudarc::nvrtc::Ptx;
use unimem::{AllocationMode, DeviceKind, MapMode, MemoryManager};

/// `output[i] = input[i] * factor` for `i < n`.
const PTX: &str = r#"
.version 7.0
.target sm_52
.address_size 64

.visible .entry scale(.param .u64 input, .param .u64 output, .param .f32 factor, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .f32 %f<4>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [input];
    ld.param.u64 %rd2, [output];
    ld.param.f32 %f1, [factor];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r1, 4;
    add.s64 %rd6, %rd3, %rd5;
    ld.global.f32 %f2, [%rd6];
    mul.f32 %f3, %f2, %f1;
    add.s64 %rd7, %rd4, %rd5;
    st.global.f32 [%rd7], %f3;
DONE:
    ret;
}
"#;

/// Runs the example (the tests run it too, on the model driver).
pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manager = MemoryManager::builder().backends([DeviceKind::Cuda]).build();
    let Some(device) = manager.devices_of(DeviceKind::Cuda).into_iter().next() else {
        println!("no CUDA device: {}", manager.backend_notes().join("; "));
        return Ok(());
    };
    println!("device: {}", device.name);
    let cuda = manager.cuda_device(device.id)?;
    let stream = cuda.context().new_stream()?; // a stream of our own

    let n = 1 << 20;
    let mut input = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    let mut output = manager.allocate_on::<f32>(device.id, n, AllocationMode::Pooled)?;
    for (i, x) in input.map(MapMode::Write)?.iter_mut().enumerate() {
        *x = i as f32;
    }
    let module = match cuda.context().load_module(Ptx::from_src(PTX)) {
        Ok(module) => module,
        Err(e) => {
            // Everything up to here ran; the kernel needs a real driver.
            println!("no kernel: {e}");
            let guard = input.cuda_ptr(&stream, MapMode::Read)?; // the host data goes over
            println!("input at {:#x} on our stream", guard.ptr());
            drop(guard);
            assert_eq!(input.as_slice()?[12345], 12345.0);
            return Ok(());
        }
    };
    let scale = module.load_function("scale")?;
    {
        // The host data goes to the device here; our stream waits for unimem's copy.
        let from = input.cuda_ptr(&stream, MapMode::Read)?;
        let mut to = output.cuda_ptr(&stream, MapMode::Write)?;
        let (factor, count) = (3.0f32, n as u32);
        let mut launch = stream.launch_builder(&scale);
        launch.arg(&from).arg(&mut to).arg(&factor).arg(&count);
        // SAFETY: `scale` takes two pointers to `n` floats, a float and the count, as given.
        unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }?;
    } // the guards record the kernel as both buffers' last use
    let result = output.as_slice()?; // waits for the kernel on the device, copies once
    assert!(result.iter().enumerate().all(|(i, &y)| y == 3.0 * i as f32));
    println!("out[12345] = {} (expected {})", result[12345], 3.0 * 12345.0);
    println!("{}", manager.statistics());
    Ok(())
}
