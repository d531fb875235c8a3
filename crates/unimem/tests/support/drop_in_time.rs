//! Whether dropping a value returns while the device it waits on is held: the drop runs on
//! a thread of its own, so that a `Drop` that blocks fails the test instead of hanging it.

use std::time::Duration;

/// Drops `value` on another thread; `true` if the drop returned within 30 s. The thread is
/// left to finish once the caller lets the device go on.
pub fn drops_in_time<T: Send + 'static>(value: T) -> bool {
    let (done, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(value);
        let _ = done.send(());
    });
    dropped.recv_timeout(Duration::from_secs(30)).is_ok()
}
