//! A gate on an in-order OpenCL queue: a barrier that waits on a user event, so that every
//! command enqueued after it stays queued until the test opens the gate. It makes "the copy
//! is still in flight" a certainty instead of a race.
//!
//! A gate left closed for two minutes aborts the test process with a message: a test that
//! waits for the queue while holding it closed fails at once instead of hanging CI.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cl3::types::{cl_command_queue, cl_context, cl_event};

pub struct Gate {
    user: cl_event,
    open: Arc<AtomicBool>,
}

/// Aborts the process unless `open` is set within two minutes.
fn watch(open: Arc<AtomicBool>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::spawn(move || {
        while !open.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                eprintln!(
                    "an OpenCL queue stayed closed for 2 minutes: something waited for it while it was closed"
                );
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

impl Gate {
    /// Closes `queue`: commands enqueued from now on wait for `open`.
    pub fn close(context: cl_context, queue: cl_command_queue) -> Self {
        let user = cl3::event::create_user_event(context).expect("clCreateUserEvent");
        // SAFETY: a barrier on a live queue waiting on one live event; `&user` outlives the call.
        let barrier = unsafe { cl3::command_queue::enqueue_barrier_with_wait_list(queue, 1, &user) }
            .expect("clEnqueueBarrierWithWaitList");
        // SAFETY: the barrier's event is ours; releasing it does not cancel the barrier.
        unsafe { cl3::event::release_event(barrier) }.expect("clReleaseEvent");
        let open = Arc::new(AtomicBool::new(false));
        watch(Arc::clone(&open));
        Gate { user, open }
    }

    /// Lets the queued commands run.
    pub fn open(&mut self) {
        if !self.open.swap(true, Ordering::SeqCst) {
            cl3::event::set_user_event_status(self.user, cl3::event::CL_COMPLETE)
                .expect("clSetUserEventStatus");
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // A failing test must not leave the queue, shared by every test, closed.
        if !self.open.swap(true, Ordering::SeqCst) {
            let _ = cl3::event::set_user_event_status(self.user, cl3::event::CL_COMPLETE);
        }
        // SAFETY: the user event is ours, released once.
        let _ = unsafe { cl3::event::release_event(self.user) };
    }
}
