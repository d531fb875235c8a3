//! The device's poller: one thread per wgpu device that drives `Device::poll` for unimem, so
//! that no caller ever has to.
//!
//! wgpu runs its callbacks (submission done, buffer mapped) only from inside
//! `Device::poll`. Every operation that finishes later than the call that started it is a
//! [`Job`] on the poller's queue, in the order the operations were submitted: the poller
//! takes one job at a time, polls until the job's submission is done, and finishes it (copies
//! read-back bytes out of a mapped staging buffer, maps host-visible memory back, completes an
//! operation's [`Signal`]). Jobs retire in order, so the number retired is a fence: a
//! [`PollerFence`] of sequence number `n` has completed once `n` jobs have.
//!
//! The poller sleeps on a condition variable when it has no jobs; it never spins.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::staging::StagingPool;
use crate::backend::pending::Signal;
use crate::backend::{BackendError, DeviceFence};

/// Host memory a read-back job writes into: the caller of `enqueue_read` keeps it allocated
/// and untouched until a completion or fence taken after the read has completed.
pub(super) struct HostDst(pub NonNull<u8>);

// SAFETY: the pointer is written by the poller thread only, while the caller of
// `enqueue_read` promises that nobody else uses the memory (see `Queue::enqueue_read`).
unsafe impl Send for HostDst {}

/// Where a host-visible buffer's mapping stands.
#[derive(Debug)]
pub(super) enum MapState {
    /// Mapped for the host at the address the allocation records.
    Mapped,
    /// Unmapped: a user's shaders may use it.
    Unmapped,
    /// A job that maps it back is queued; mapped once the job of this sequence number retires.
    Remapping(u64),
    /// Mapping it back failed: the host cannot use it again.
    Failed(String),
}

/// One thing the poller finishes, in submission order.
pub(super) enum Job {
    /// Everything submitted up to this point (for fences).
    Submitted(wgpu::SubmissionIndex),
    /// A copy of device memory into `staging`: once done, `len` bytes from byte `skip` of
    /// the staging buffer go to `dst`, and the staging buffer back to its pool.
    Readback {
        index: wgpu::SubmissionIndex,
        staging: wgpu::Buffer,
        size: u64,
        skip: usize,
        len: usize,
        dst: HostDst,
        pool: Arc<StagingPool>,
    },
    /// Host-visible memory handed back to the host: mapped again (after the device's last
    /// use of it), at the address it had.
    Remap { buffer: wgpu::Buffer, size: u64, host: NonNull<u8>, state: Arc<Mutex<MapState>> },
    /// The end of an operation: its signal completes with the outcome of the jobs since the
    /// previous signal.
    Signal { index: wgpu::SubmissionIndex, signal: Signal },
}

// SAFETY: the `host` pointer of a `Remap` job is only compared with the address wgpu maps
// the buffer at, never dereferenced by the poller.
unsafe impl Send for Job {}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Jobs queued so far: the sequence number of the last one.
    issued: u64,
    /// Jobs finished so far.
    retired: u64,
    /// The first failure since the last signal, reported by the next signal.
    failure: Option<BackendError>,
    /// Why the device is gone, for good.
    lost: Option<String>,
}

/// The job queue shared by a backend and its poller thread.
pub(super) struct Poller {
    state: Mutex<State>,
    /// Signalled when a job is queued.
    queued: Condvar,
    /// Signalled when jobs retire.
    retired: Condvar,
}

impl Poller {
    /// A poller for `device`, with its thread started.
    pub(super) fn start(device: wgpu::Device, name: &str) -> Result<Arc<Poller>, BackendError> {
        let poller =
            Arc::new(Poller { state: Mutex::default(), queued: Condvar::new(), retired: Condvar::new() });
        let worker = Arc::clone(&poller);
        std::thread::Builder::new()
            .name(format!("unimem-wgpu-poll {name}"))
            .spawn(move || worker.run(&device))
            .map_err(|e| BackendError::Driver { call: "spawn the wgpu poller", message: e.to_string() })?;
        Ok(poller)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, returning its sequence number: a fence on it completes once it retires.
    pub(super) fn push(&self, job: Job) -> u64 {
        let mut state = self.lock();
        state.jobs.push_back(job);
        state.issued += 1;
        let seq = state.issued;
        drop(state);
        self.queued.notify_one();
        seq
    }

    /// Marks the device lost: every later job fails with `why`.
    pub(super) fn lose(&self, why: String) {
        self.lock().lost.get_or_insert(why);
    }

    /// Why the device is gone, if it is.
    pub(super) fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// Whether the job of sequence number `seq` has retired.
    pub(super) fn retired(&self, seq: u64) -> bool {
        self.lock().retired >= seq
    }

    /// Blocks until the job of sequence number `seq` has retired.
    pub(super) fn wait(&self, seq: u64) {
        let mut state = self.lock();
        while state.retired < seq {
            state = self.retired.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn run(&self, device: &wgpu::Device) {
        loop {
            let job = {
                let mut state = self.lock();
                loop {
                    if let Some(job) = state.jobs.pop_front() {
                        break job;
                    }
                    state = self.queued.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let lost = self.lost();
            let outcome = match lost {
                Some(why) => finish_lost(job, why),
                None => finish(device, job),
            };
            let mut state = self.lock();
            match outcome {
                Finished::Ok => {}
                Finished::Failed(error) => {
                    state.failure.get_or_insert(error);
                }
                Finished::Signal(signal) => {
                    let outcome = state.failure.take().map_or(Ok(()), Err);
                    // Completing runs the waker: not under the lock.
                    drop(state);
                    signal.complete(outcome);
                    state = self.lock();
                }
            }
            state.retired += 1;
            drop(state);
            self.retired.notify_all();
        }
    }
}

enum Finished {
    Ok,
    Failed(BackendError),
    Signal(Signal),
}

fn lost_error(why: &str) -> BackendError {
    BackendError::DeviceLost { message: why.to_string() }
}

/// A job on a lost device: nothing is waited for (the device finishes nothing any more);
/// read-backs fail, and host-visible memory is not handed back.
fn finish_lost(job: Job, why: String) -> Finished {
    match job {
        Job::Submitted(_) => Finished::Ok,
        Job::Readback { .. } => Finished::Failed(lost_error(&why)),
        Job::Remap { state, .. } => {
            *state.lock().unwrap_or_else(PoisonError::into_inner) = MapState::Failed(why.clone());
            Finished::Failed(lost_error(&why))
        }
        Job::Signal { signal, .. } => Finished::Signal(signal),
    }
}

fn finish(device: &wgpu::Device, job: Job) -> Finished {
    let failed = |result: Result<(), BackendError>| result.err().map_or(Finished::Ok, Finished::Failed);
    match job {
        Job::Submitted(index) => failed(wait_for(device, index)),
        Job::Signal { index, signal } => match wait_for(device, index) {
            Ok(()) => Finished::Signal(signal),
            Err(e) => {
                signal.complete(Err(e));
                Finished::Ok
            }
        },
        Job::Readback { index, staging, size, skip, len, dst, pool } => {
            let read = wait_for(device, index).and_then(|()| {
                map(device, &staging, size, wgpu::MapMode::Read)?;
                {
                    let view = staging.slice(..size).get_mapped_range().map_err(|e| {
                        BackendError::Driver { call: "BufferSlice::get_mapped_range", message: e.to_string() }
                    })?;
                    // SAFETY: the view holds `size >= skip + len` bytes (the job was made so);
                    // `dst` is `len` bytes of host memory that nobody else uses until this
                    // job's completion (the `enqueue_read` contract).
                    unsafe { dst.0.as_ptr().copy_from_nonoverlapping(view[skip..skip + len].as_ptr(), len) };
                }
                staging.unmap();
                pool.give_back(staging);
                Ok(())
            });
            failed(read)
        }
        Job::Remap { buffer, size, host, state } => {
            let mapped = map(device, &buffer, size, wgpu::MapMode::Write).and_then(|()| {
                let mut view = buffer.slice(..size).get_mapped_range_mut().map_err(|e| {
                    BackendError::Driver { call: "BufferSlice::get_mapped_range_mut", message: e.to_string() }
                })?;
                let at = view.slice(..).as_raw_element_ptr();
                if at == host {
                    Ok(())
                } else {
                    Err(BackendError::Driver {
                        call: "Buffer::map_async",
                        message: format!("mapped again at {at:p}, not at {host:p}, where the host uses it"),
                    })
                }
            });
            let mut map_state = state.lock().unwrap_or_else(PoisonError::into_inner);
            *map_state = match &mapped {
                Ok(()) => MapState::Mapped,
                Err(e) => MapState::Failed(e.to_string()),
            };
            failed(mapped)
        }
    }
}

fn poll_error(e: wgpu::PollError) -> BackendError {
    let message = match e {
        // wgpu's index of a submission that failed: the device refused it.
        wgpu::PollError::WrongSubmissionIndex(..) => {
            format!("a submission failed, so the device is lost or broken (Device::poll: {e})")
        }
        e => format!("Device::poll failed: {e}"),
    };
    BackendError::DeviceLost { message }
}

/// Blocks until submission `index` has finished on the device.
fn wait_for(device: &wgpu::Device, index: wgpu::SubmissionIndex) -> Result<(), BackendError> {
    device
        .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
        .map(drop)
        .map_err(poll_error)
}

/// Maps the first `size` bytes of `buffer` for `mode`, polling until wgpu says it is mapped.
pub(super) fn map(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    size: u64,
    mode: wgpu::MapMode,
) -> Result<(), BackendError> {
    let (sender, receiver) = mpsc::channel();
    buffer.slice(..size).map_async(mode, move |result| {
        // The receiver waits below; a send fails only if it is gone, and then nobody asks.
        let _ = sender.send(result);
    });
    // The buffer's last submission has finished when a job maps it (or it has none), so
    // one poll without waiting finds it mapped; waiting, for anything else, would wait for
    // the device's latest submission, however long.
    let mut wait = false;
    loop {
        let poll = if wait { wgpu::PollType::wait_indefinitely() } else { wgpu::PollType::Poll };
        device.poll(poll).map_err(poll_error)?;
        wait = true;
        match receiver.try_recv() {
            Ok(result) => {
                return result
                    .map_err(|e| BackendError::Driver { call: "Buffer::map_async", message: e.to_string() });
            }
            Err(TryRecvError::Empty) => continue,
            Err(TryRecvError::Disconnected) => {
                return Err(BackendError::Driver {
                    call: "Buffer::map_async",
                    message: "the callback was dropped without being called".into(),
                });
            }
        }
    }
}

/// A fence of a wgpu device: a job of its poller (every job queued before it retires first).
pub(super) struct PollerFence {
    pub poller: Arc<Poller>,
    pub seq: u64,
}

impl DeviceFence for PollerFence {
    fn wait(&self) -> Result<(), BackendError> {
        self.poller.wait(self.seq);
        Ok(())
    }

    fn is_complete(&self) -> Result<bool, BackendError> {
        Ok(self.poller.retired(self.seq))
    }
}
