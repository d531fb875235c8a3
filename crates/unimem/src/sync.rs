//! The primitives [`handoff`](crate::handoff) is written against. Its loom test
//! (`tests/handoff_loom.rs`) compiles the same file against loom's versions of these.
//!
//! The one primitive std lacks is the *asymmetric fence*: a pair of fences, one nearly free
//! ([`light_fence`], run by the owner of a thread cache on every operation) and one expensive
//! ([`heavy_fence`], run by a thread that steals from or trims other threads' caches), that
//! together order like two `SeqCst` fences. On Linux the heavy side is the
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` system call: the kernel interrupts every CPU
//! running a thread of this process and runs a full memory barrier there, so each such
//! thread's earlier stores are visible before the call returns, which is what the light side's
//! compiler-only fence leaves out. Threads not running at that moment went through a context
//! switch, which is a full barrier. This is the scheme of Linux's user-space RCU and of
//! folly's `asymmetricHeavyBarrier`. Where the system call is missing (another OS, an old
//! kernel, a seccomp filter that refuses it) both sides run a real `SeqCst` fence: slower
//! for the owner, equally correct.

pub(crate) use std::sync::Mutex;
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::atomic::{compiler_fence, fence};

/// Interior mutability with the closure interface of loom's `UnsafeCell`, so that code using
/// it compiles against either.
#[derive(Debug, Default)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Calls `f` with a raw pointer to the value; the caller's protocol makes it exclusive.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Whether the heavy side of the asymmetric fence is `membarrier`. Set once, by
/// [`init_asymmetric_fence`], before any cache that relies on it exists; never changed after.
static EXPEDITED: AtomicBool = AtomicBool::new(false);

/// Registers this process for expedited `membarrier` (once). Every pool calls it when it is
/// made, before any thread can reach the pool's caches, so the light and heavy sides of a
/// fence always agree on which scheme is in use.
pub(crate) fn init_asymmetric_fence() {
    FENCE_INIT.call_once(|| EXPEDITED.store(membarrier::register(), Ordering::Relaxed));
}

static FENCE_INIT: std::sync::Once = std::sync::Once::new();

/// Settles the scheme as the plain-fence one, as on a system without `membarrier`; only
/// before anything has called [`init_asymmetric_fence`] (a child process of a test).
#[cfg(test)]
pub(crate) fn init_plain_fence() {
    let mut done = false;
    FENCE_INIT.call_once(|| done = true);
    assert!(done, "the fence scheme was already settled");
}

/// Runs `child` in a child process of the test binary, as the test named `test` (its full
/// path), where nothing else has run: for process-wide state such as the fence scheme.
/// In the child this runs `child`; in the parent it checks that the child passed.
#[cfg(test)]
pub(crate) fn in_child_process(test: &str, child: impl FnOnce()) {
    const CHILD: &str = "UNIMEM_TEST_CHILD";
    if std::env::var_os(CHILD).is_some_and(|name| name == test) {
        return child();
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .expect("the child runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "child: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the heavy side is `membarrier` in this process (the light side then only keeps
/// the compiler from reordering).
#[inline]
pub(crate) fn is_expedited() -> bool {
    EXPEDITED.load(Ordering::Relaxed)
}

/// Whether this system offers expedited `membarrier` (asks the kernel; registers nothing).
#[cfg(test)]
pub(crate) fn expedited_available() -> bool {
    membarrier::available()
}

/// The owner's side: orders its earlier stores before its later loads against a thread
/// that runs [`heavy_fence`].
#[inline(always)]
pub(crate) fn light_fence() {
    if EXPEDITED.load(Ordering::Relaxed) {
        // The heavy side's `membarrier` supplies the hardware barrier; only the compiler
        // must be kept from moving the owner's accesses across this point.
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The owner's side where the caller knows the heavy side is `membarrier` (it reached the
/// cache through a path that exists only then, see `ThreadSlots::current_cached`): the
/// compiler-only fence of [`light_fence`], without asking which scheme is in use.
#[inline(always)]
pub(crate) fn expedited_fence() {
    compiler_fence(Ordering::SeqCst);
}

/// The stealer's side. Returns `false` if the barrier could not be run: the caller must then
/// leave the owners' data alone.
pub(crate) fn heavy_fence() -> bool {
    if EXPEDITED.load(Ordering::Relaxed) {
        return membarrier::expedited();
    }
    fence(Ordering::SeqCst);
    true
}

/// Waits a moment for another thread (an owner finishing a few instructions).
#[inline]
pub(crate) fn spin_wait(round: &mut u32) {
    *round += 1;
    if *round < 64 {
        std::hint::spin_loop();
    } else {
        // The owner may have been preempted inside its few instructions: let it run.
        std::thread::yield_now();
    }
}

#[cfg(target_os = "linux")]
mod membarrier {
    // From the kernel's `include/uapi/linux/membarrier.h` (stable ABI since Linux 4.14).
    const CMD_QUERY: libc::c_long = 0;
    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn call(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: `membarrier` takes two integers (command, flags) and a CPU id that is
        // ignored without MEMBARRIER_CMD_FLAG_CPU; it touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long, 0 as libc::c_long) }
    }

    pub(super) fn available() -> bool {
        let supported = call(CMD_QUERY);
        supported >= 0 && supported & CMD_PRIVATE_EXPEDITED != 0
    }

    pub(super) fn register() -> bool {
        available() && call(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    }

    pub(super) fn expedited() -> bool {
        call(CMD_PRIVATE_EXPEDITED) == 0
    }
}

#[cfg(not(target_os = "linux"))]
mod membarrier {
    // Windows has `FlushProcessWriteBuffers` and macOS has no supported equivalent; both
    // sides use real fences there.
    pub(super) fn register() -> bool {
        false
    }

    #[cfg_attr(not(test), allow(dead_code, reason = "asked by tests"))]
    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn expedited() -> bool {
        false
    }
}
