//! Device operations that finish after the call that started them: a [`Pending`] future on
//! the caller's side, a [`Signal`] on the driver's side, completed from a driver callback
//! (an OpenCL event callback, a CUDA stream callback), never by polling.
//!
//! The staging memory that the device reads or writes belongs to the shared state, not to
//! the future: dropping or leaking a `Pending` leaves the memory alive until the signal
//! fires (soundness rule 1), and a completed future hands the memory back to the caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::BackendError;
use crate::host_lines::Staging;

/// Bytes of staging memory leaked because nobody could tell when a device stopped using it.
static LEAKED_STAGING: AtomicU64 = AtomicU64::new(0);

/// Bytes of staging memory leaked so far in this process (see
/// [`Signal::complete_leaking_staging`]).
pub(crate) fn leaked_staging_bytes() -> u64 {
    LEAKED_STAGING.load(Ordering::Relaxed)
}

/// Leaks `staging`, which a device command may still use when nobody can tell when it ends
/// (a completion could not be enqueued, and waiting failed too), counting its bytes.
#[cfg_attr(
    not(any(feature = "opencl", feature = "cuda")),
    allow(dead_code, reason = "used by the OpenCL and CUDA backends")
)]
pub(crate) fn leak_staging(staging: Option<Staging>) {
    if let Some(staging) = staging {
        LEAKED_STAGING.fetch_add(staging.len() as u64, Ordering::Relaxed);
        std::mem::forget(staging);
    }
}

#[derive(Default)]
struct Inner {
    outcome: Option<Result<(), BackendError>>,
    staging: Option<Staging>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State(Mutex<Inner>);

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned lock still holds consistent data.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The caller's side of an operation in flight. Resolves to the staging memory (holding
/// what the device wrote, for reads; empty where there was none) once the device is done
/// with it.
#[must_use = "the operation runs anyway; the future says when it is done"]
pub(crate) struct Pending(Arc<State>);

/// The driver's side: completes the operation, from whatever thread the driver calls on.
pub(crate) struct Signal(Arc<State>);

impl Pending {
    /// A new operation that owns `staging` until it completes.
    pub(crate) fn new(staging: Option<Staging>) -> (Pending, Signal) {
        let state = Arc::new(State::default());
        state.lock().staging = staging;
        (Pending(Arc::clone(&state)), Signal(state))
    }

    /// An operation that has already finished, with the staging memory it used.
    #[cfg(test)]
    pub(crate) fn ready(
        staging: Option<crate::host_lines::HostLines>,
        outcome: Result<(), BackendError>,
    ) -> Pending {
        let (pending, signal) = Pending::new(staging.map(Staging::new));
        signal.complete(outcome);
        pending
    }
}

impl Future for Pending {
    type Output = Result<Staged, BackendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.0.lock();
        match inner.outcome.take() {
            Some(outcome) => Poll::Ready(outcome.map(|()| Staged(inner.staging.take()))),
            None => {
                match &mut inner.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// The staging memory of a finished operation: what the device wrote, for reads.
pub(crate) struct Staged(Option<Staging>);

impl Staged {
    /// The staging memory itself, for the next operation that uses it.
    pub(crate) fn into_staging(self) -> Option<Staging> {
        self.0
    }

    /// The first `len` bytes (none where the operation had no staging memory).
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        match &self.0 {
            // SAFETY: the operation has completed: the device is done with the memory.
            Some(staging) => unsafe { staging.bytes(len) },
            None => &[],
        }
    }
}

impl Signal {
    /// Records the outcome and wakes the task waiting on it. The staging memory is freed
    /// here if the future is gone.
    pub(crate) fn complete(self, outcome: Result<(), BackendError>) {
        let waker = {
            let mut inner = self.0.lock();
            inner.outcome = Some(outcome);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Completes the operation with `outcome`, leaking its staging memory instead of freeing
    /// it: for operations whose device command may still run and can no longer be waited
    /// for (a callback could not be registered, and waiting failed too). The bytes are
    /// counted (`MemoryStatistics::leaked_staging_bytes`).
    #[cfg_attr(
        not(any(feature = "opencl", feature = "cuda")),
        allow(dead_code, reason = "used by the OpenCL and CUDA backends")
    )]
    pub(crate) fn complete_leaking_staging(self, outcome: Result<(), BackendError>) {
        let staging = self.0.lock().staging.take();
        leak_staging(staging);
        self.complete(outcome);
    }

    /// The signal as a pointer for a C callback's user data.
    #[cfg_attr(
        not(any(feature = "opencl", feature = "cuda")),
        allow(dead_code, reason = "used by the OpenCL and CUDA backends")
    )]
    pub(crate) fn into_raw(self) -> *mut std::ffi::c_void {
        Arc::into_raw(self.0).cast_mut().cast()
    }

    /// The signal back from a callback's user data.
    ///
    /// # Safety
    /// `raw` came from `into_raw` and is turned back once.
    #[cfg_attr(
        not(any(feature = "opencl", feature = "cuda")),
        allow(dead_code, reason = "used by the OpenCL and CUDA backends")
    )]
    pub(crate) unsafe fn from_raw(raw: *mut std::ffi::c_void) -> Signal {
        // SAFETY: the caller passes a pointer from `Arc::into_raw` of a `State`, once.
        Signal(unsafe { Arc::from_raw(raw.cast_const().cast::<State>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_lines::HostLines;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn completes_from_another_thread_and_wakes_once() {
        let staging = Staging::new(HostLines::copy_of(&[7; 100]).unwrap());
        let (mut pending, signal) = Pending::new(Some(staging));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut pending).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut pending).poll(&mut cx).is_pending());
        std::thread::spawn(move || signal.complete(Ok(()))).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        match Pin::new(&mut pending).poll(&mut cx) {
            Poll::Ready(Ok(staged)) => assert_eq!(staged.bytes(100), &[7; 100]),
            _ => panic!("expected the staging memory back"),
        }
    }

    #[test]
    fn a_dropped_future_leaves_the_staging_to_the_signal() {
        let (pending, signal) = Pending::new(Some(Staging::new(HostLines::zeroed(1 << 20).unwrap())));
        drop(pending);
        let raw = signal.into_raw();
        // SAFETY: `raw` came from `into_raw` just above.
        let signal = unsafe { Signal::from_raw(raw) };
        signal.complete(Err(BackendError::Driver { call: "test", message: "failed".into() }));
    }

    #[test]
    fn errors_reach_the_future() {
        let pending = Pending::ready(None, Err(BackendError::OutOfMemory { bytes: 3 }));
        assert!(matches!(pollster::block_on(pending), Err(BackendError::OutOfMemory { bytes: 3 })));
    }
}
