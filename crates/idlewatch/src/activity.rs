//! Activity counting: an [`ActivityGuard`] per open request, upgraded connection or TCP stream.
//!
//! The count and the "ready" flag are two atomics shared by the watcher and everything that
//! serves traffic. The idle countdown runs only while the count is zero: a guard's drop that
//! brings it to zero wakes the driver, which restarts the countdown from that moment.
//!
//! The one race that matters — a request arriving just as the driver decides to stop — is closed
//! by ordering both sides (`SeqCst`), Dekker-style: a request increments the count *then* reads
//! the state; the driver publishes `Stopping` *then* reads the count. Of any such pair, one sees
//! the other: either the request sees "not ready" (and waits for a wake), or the driver sees the
//! request (and does not stop).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// What the watcher and the traffic share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// True while the state is `Ready`.
    pub(crate) ready: AtomicBool,
    /// Open guards.
    pub(crate) active: AtomicUsize,
    /// Signalled when `active` drops to zero.
    pub(crate) idle: Notify,
}

impl Shared {
    pub(crate) fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActivityGuard { shared: Arc::clone(self) }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

/// One unit of activity (an open request, connection or stream). While any guard of a watcher
/// is alive its workload is never stopped for idleness; dropping the last one starts the idle
/// countdown. Made by [`IdleWatcher::activity`](crate::IdleWatcher::activity).
#[derive(Debug)]
#[must_use = "the activity ends when the guard is dropped"]
pub struct ActivityGuard {
    shared: Arc<Shared>,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle.notify_one();
        }
    }
}
