//! A tiny OpenCL kernel runner over raw `cl3` calls, shared by the OpenCL tests and the
//! `opencl_kernel` example: build one kernel, set `cl_mem`/scalar arguments, enqueue it on
//! unimem's queue.

use std::ffi::CStr;
use std::ptr;

use cl3::types::{cl_command_queue, cl_context, cl_device_id, cl_kernel, cl_mem, cl_program};

/// `out[i] = in[i] * factor + i` over `n` floats, and `fill[i] = i` (a writer only).
pub const SOURCE: &str = r#"
__kernel void scale(__global const float* input, __global float* output, float factor) {
    size_t i = get_global_id(0);
    output[i] = input[i] * factor + (float)i;
}
__kernel void iota(__global float* output) {
    size_t i = get_global_id(0);
    output[i] = (float)i;
}
"#;

/// A built program and one of its kernels; released on drop.
pub struct Kernel {
    program: cl_program,
    kernel: cl_kernel,
}

impl Kernel {
    /// Builds `SOURCE` for `device` and takes kernel `name`.
    pub fn new(context: cl_context, device: cl_device_id, name: &CStr) -> Result<Self, String> {
        let program = cl3::program::create_program_with_source(context, &[SOURCE])
            .map_err(|c| format!("clCreateProgramWithSource: {c}"))?;
        if let Err(c) = cl3::program::build_program(program, &[device], c"", None, ptr::null_mut()) {
            let log =
                cl3::program::get_program_build_info(program, device, cl3::program::CL_PROGRAM_BUILD_LOG)
                    .map(|l| l.to_string())
                    .unwrap_or_default();
            return Err(format!("clBuildProgram: {c}: {log}"));
        }
        let kernel = cl3::kernel::create_kernel(program, name).map_err(|c| format!("clCreateKernel: {c}"))?;
        Ok(Self { program, kernel })
    }

    /// Sets argument `index` to a `cl_mem`.
    pub fn arg_mem(&self, index: u32, mem: cl_mem) -> Result<(), String> {
        // SAFETY: `mem` is a live buffer; the value is copied by the call.
        unsafe {
            cl3::kernel::set_kernel_arg(self.kernel, index, size_of::<cl_mem>(), (&raw const mem).cast())
        }
        .map_err(|c| format!("clSetKernelArg: {c}"))
    }

    /// Sets argument `index` to a shared-virtual-memory pointer.
    #[allow(dead_code, reason = "not every user of this helper runs SVM kernels")]
    pub fn arg_svm(&self, index: u32, pointer: *mut std::ffi::c_void) -> Result<(), String> {
        // SAFETY: `pointer` is a live SVM allocation of the kernel's context.
        unsafe { cl3::kernel::set_kernel_arg_svm_pointer(self.kernel, index, pointer) }
            .map_err(|c| format!("clSetKernelArgSVMPointer: {c}"))
    }

    /// Sets argument `index` to a float.
    pub fn arg_f32(&self, index: u32, value: f32) -> Result<(), String> {
        // SAFETY: the value is copied by the call.
        unsafe {
            cl3::kernel::set_kernel_arg(self.kernel, index, size_of::<f32>(), (&raw const value).cast())
        }
        .map_err(|c| format!("clSetKernelArg: {c}"))
    }

    /// Enqueues the kernel over `n` work items on `queue` without waiting for it.
    pub fn enqueue(&self, queue: cl_command_queue, n: usize) -> Result<(), String> {
        let global = [n];
        // SAFETY: arguments are set; `global` outlives the call, which copies it.
        let event = unsafe {
            cl3::command_queue::enqueue_nd_range_kernel(
                queue,
                self.kernel,
                1,
                ptr::null(),
                global.as_ptr(),
                ptr::null(),
                0,
                ptr::null(),
            )
        }
        .map_err(|c| format!("clEnqueueNDRangeKernel: {c}"))?;
        // SAFETY: the event is ours; releasing it does not cancel the kernel.
        unsafe { cl3::event::release_event(event) }.map_err(|c| format!("clReleaseEvent: {c}"))
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: both handles are ours and released once.
        unsafe {
            let _ = cl3::kernel::release_kernel(self.kernel);
            let _ = cl3::program::release_program(self.program);
        }
    }
}
