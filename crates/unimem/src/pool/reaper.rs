//! Frees that wait for a device, done on a thread of their own (the reaper), so that no
//! caller's `Drop` waits: blocks of pools whose manager is gone (nobody calls those pools
//! any more to free their deferred blocks), and blocks whose last user's stream could not
//! be ordered before unimem's. Also the frees of a thread that exits after its pool was
//! closed, which must not reach the backend from a thread-local destructor.

use super::Block;

/// Work that waits for a device and then frees memory.
type ReaperJob = Box<dyn FnOnce() + Send>;

/// Hands `job` to the process-wide reaper thread. If there is none (it could not be
/// started), the job is leaked, never run or dropped: what it owns stays allocated.
fn reap(job: ReaperJob) {
    static REAPER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<ReaperJob>>> =
        std::sync::OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (send, receive) = std::sync::mpsc::channel::<ReaperJob>();
        let thread = std::thread::Builder::new().name("unimem-reaper".into());
        thread.spawn(move || receive.into_iter().for_each(|job| job())).ok().map(|_| send)
    });
    match reaper {
        Some(reaper) => {
            if let Err(unsent) = reaper.send(job) {
                std::mem::forget(unsent.0);
            }
        }
        None => std::mem::forget(job),
    }
}

impl Block {
    /// Takes a live block out of use without pooling it (its buffer reported `requested`
    /// bytes), and frees it once `wait` has returned, as [`free_after`](Self::free_after).
    pub(crate) fn give_up_after(
        self: Box<Self>,
        requested: usize,
        wait: impl FnOnce(&Block) + Send + 'static,
    ) {
        self.pool.count_requested(-1, requested);
        self.free_after(wait);
    }

    /// [`retire`](Self::retire), on the reaper thread: for a caller that must not reach the
    /// backend, a thread-local destructor (where the backend's own thread-locals, wgpu's
    /// among them, may be gone already). Counted as waiting to be freed until then.
    pub(crate) fn retire_on_reaper(self: Box<Self>) {
        self.pool.count_pending(&self, 1);
        reap(Box::new(move || {
            self.pool.count_pending(&self, -1);
            self.retire();
        }));
    }

    /// Frees the block on the reaper thread once `wait` has returned there (`wait` blocks
    /// until the device is done with the memory); counted as waiting to be freed until then.
    pub(crate) fn free_after(self: Box<Self>, wait: impl FnOnce(&Block) + Send + 'static) {
        self.pool.count_pending(&self, 1);
        reap(Box::new(move || {
            wait(&self);
            self.pool.count_pending(&self, -1);
            drop(self);
        }));
    }
}
