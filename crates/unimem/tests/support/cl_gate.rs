//! A gate on an in-order OpenCL queue: a barrier that waits on a user event, so that every
//! command enqueued after it stays queued until the test opens the gate. It makes "the copy
//! is still in flight" a certainty instead of a race.

use cl3::types::{cl_command_queue, cl_context, cl_event};

pub struct Gate {
    user: cl_event,
    open: bool,
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
        Gate { user, open: false }
    }

    /// Lets the queued commands run.
    pub fn open(&mut self) {
        if !self.open {
            self.open = true;
            cl3::event::set_user_event_status(self.user, cl3::event::CL_COMPLETE)
                .expect("clSetUserEventStatus");
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // A failing test must not leave the queue, shared by every test, closed.
        if !self.open {
            self.open = true;
            let _ = cl3::event::set_user_event_status(self.user, cl3::event::CL_COMPLETE);
        }
        // SAFETY: the user event is ours, released once.
        let _ = unsafe { cl3::event::release_event(self.user) };
    }
}
