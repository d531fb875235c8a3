//! Fault injection in the model CUDA driver (`tests/support/model_cuda.c`): makes a driver
//! call fail, or break the context with a sticky error, so that error paths are tested by
//! making them happen. See the model's header comment for what a fault and a broken context
//! do.
//!
//! The model's functions are found at run time in the `libcuda` that cudarc loads (the same
//! one, through the same names). On a real driver they are absent: [`available`] is false
//! and the other functions panic. Fault state is one per process, so tests that inject
//! faults run one at a time, in a process of their own.
#![allow(dead_code)] // each test file uses what it needs

use std::ffi::{CStr, CString, c_char, c_int, c_ulonglong, c_void};
use std::sync::OnceLock;

type Fail = unsafe extern "C" fn(*const c_char, c_int, c_int, c_int);
type Clear = unsafe extern "C" fn();
type Calls = unsafe extern "C" fn(*const c_char) -> c_ulonglong;

struct Model {
    library: *mut c_void,
    fail: Fail,
    clear: Clear,
    calls: Calls,
}

// SAFETY: `library` is a dlopen handle, a process-wide token that is never closed and that
// dlsym accepts from any thread; the function pointers are plain code addresses, and the
// model's functions lock their own state.
unsafe impl Send for Model {}
// SAFETY: as for `Send`: nothing in `Model` is mutated after it is made.
unsafe impl Sync for Model {}

/// Whether the driver library is the model, with its fault functions.
pub fn available() -> bool {
    model().is_some()
}

/// From the `nth` call of the driver function `call` on (1: its next call), that function
/// returns `result` (a `CUresult`, such as 1 for CUDA_ERROR_INVALID_VALUE) without doing
/// anything, on every call until [`clear`]. Where several faults have come due for one
/// function, the one set last decides.
pub fn fail(call: &str, nth: u32, result: i32) {
    set(call, nth, result, false);
}

/// As [`fail`], but a sticky context error (such as 700, CUDA_ERROR_ILLEGAL_ADDRESS): once
/// it has fired, every call that needs a context returns `result`, host functions are no
/// longer called, stream callbacks are called with `result`, and queued work is dropped,
/// until [`clear`].
pub fn fail_sticky(call: &str, nth: u32, result: i32) {
    set(call, nth, result, true);
}

/// Removes every fault, mends a broken context and zeroes the call counts.
pub fn clear() {
    let model = expect_model();
    // SAFETY: `unimem_model_clear` takes no arguments and only resets the model's state.
    unsafe { (model.clear)() }
}

/// How many times the driver function `call` was called since the last [`clear`] (failed
/// calls included).
pub fn calls(call: &str) -> u64 {
    let model = expect_model();
    let name = function_name(model, call);
    // SAFETY: `name` is a NUL-terminated string that lives across the call, which only reads it.
    unsafe { (model.calls)(name.as_ptr()) }
}

fn set(call: &str, nth: u32, result: i32, sticky: bool) {
    let model = expect_model();
    let name = function_name(model, call);
    let nth = c_int::try_from(nth).ok().filter(|&n| n >= 1);
    let nth = nth.unwrap_or_else(|| panic!("fault on {call}: nth must be 1 to {}", c_int::MAX));
    assert!(result != 0, "fault on {call}: result 0 is CUDA_SUCCESS, not an error");
    // SAFETY: `name` is a NUL-terminated string that lives across the call, which copies it;
    // the integers are checked above as the model requires (nth >= 1, a nonzero result).
    unsafe { (model.fail)(name.as_ptr(), nth, result, c_int::from(sticky)) }
}

fn expect_model() -> &'static Model {
    model().expect("fault injection needs the model CUDA driver: check model_faults::available() first")
}

/// `call` as a C string, after checking that the model exports a function of that name (so
/// that a misspelt fault fails the test instead of never firing).
fn function_name(model: &Model, call: &str) -> CString {
    let name = CString::new(call).unwrap_or_else(|_| panic!("{call:?} is not a function name"));
    assert!(symbol(model.library, &name).is_some(), "the model CUDA driver has no function {call}");
    name
}

/// The model, found once the driver library is loaded.
fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Model> = OnceLock::new();
    if let Some(model) = MODEL.get() {
        return Some(model);
    }
    let found = find()?;
    Some(MODEL.get_or_init(|| found))
}

/// The driver library cudarc loads, under the first of its names that it tries: taken as
/// already loaded (RTLD_NOLOAD), or else loaded now, so that this works before the first
/// manager exists (cudarc's own dlopen of that name then gets the same library). Never
/// closed: cudarc keeps it loaded too.
fn find() -> Option<Model> {
    for name in [c"libcuda.so", c"libcuda.so.1"] {
        for flags in [libc::RTLD_NOW | libc::RTLD_NOLOAD, libc::RTLD_NOW] {
            // SAFETY: `name` is a NUL-terminated literal. Loading a driver library runs its
            // initialisers, as cudarc's own dlopen of the same name would.
            let library = unsafe { libc::dlopen(name.as_ptr(), flags) };
            if !library.is_null() {
                return model_in(library);
            }
        }
    }
    None
}

fn model_in(library: *mut c_void) -> Option<Model> {
    let fail = symbol(library, c"unimem_model_fail")?;
    let clear = symbol(library, c"unimem_model_clear")?;
    let calls = symbol(library, c"unimem_model_calls")?;
    // SAFETY: these symbols are the model's functions, defined in model_cuda.c as
    // `void unimem_model_fail(const char *, int, int, int)`, `void unimem_model_clear(void)`
    // and `unsigned long long unimem_model_calls(const char *)`, matching `Fail`, `Clear` and
    // `Calls`; the library stays loaded (its handle is never closed).
    unsafe {
        Some(Model {
            library,
            fail: std::mem::transmute::<*mut c_void, Fail>(fail),
            clear: std::mem::transmute::<*mut c_void, Clear>(clear),
            calls: std::mem::transmute::<*mut c_void, Calls>(calls),
        })
    }
}

fn symbol(library: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `library` is a live dlopen handle and `name` a NUL-terminated string; dlsym
    // only looks the name up.
    let address = unsafe { libc::dlsym(library, name.as_ptr()) };
    (!address.is_null()).then_some(address)
}
