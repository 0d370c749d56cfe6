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

use tokio::sync::Notify;

use crate::sync::{AtomicBool, AtomicUsize, Ordering, seq_cst_pair};

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
    /// One more unit of activity. Its caller reads the state after this (the request side of
    /// the Dekker pair).
    pub(crate) fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        seq_cst_pair();
        ActivityGuard { shared: Arc::clone(self) }
    }

    /// Publishes the ready flag.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The driver side of the Dekker pair: called after `set_ready(false)`; true when nothing
    /// is active, so the stop may go ahead. A request that enters after this read sees "not
    /// ready" and waits for a wake.
    pub(crate) fn may_stop(&self) -> bool {
        seq_cst_pair();
        self.active() == 0
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

#[cfg(all(test, agentpool_loom))]
mod loom_activity {
    use loom::sync::atomic::AtomicBool as Flag;
    use loom::thread;

    use super::*;

    /// A request arriving while the driver decides to stop: either the request sees "not
    /// ready" (and would wait for a wake) or the driver sees the request (and does not stop) —
    /// never a stop under a request that saw "ready".
    #[test]
    fn loom_a_request_and_an_idle_stop_never_both_go_ahead() {
        loom::model(|| {
            let shared = Arc::new(Shared::default());
            shared.set_ready(true);
            let stopped = Arc::new(Flag::new(false));
            let driver = {
                let (shared, stopped) = (Arc::clone(&shared), Arc::clone(&stopped));
                thread::spawn(move || {
                    shared.set_ready(false);
                    if shared.may_stop() {
                        stopped.store(true, Ordering::SeqCst);
                        true
                    } else {
                        false
                    }
                })
            };
            let guard = shared.enter();
            let served = shared.is_ready();
            let did_stop = driver.join().unwrap();
            assert!(!(served && did_stop), "a request was served by a workload being stopped");
            drop(guard);
            assert_eq!(shared.active(), 0);
        });
    }

    /// Guards dropped on two threads: the count returns to zero exactly once.
    #[test]
    fn loom_concurrent_guards_count_exactly() {
        loom::model(|| {
            let shared = Arc::new(Shared::default());
            let a = shared.enter();
            let other = {
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let b = shared.enter();
                    drop(b);
                })
            };
            drop(a);
            other.join().unwrap();
            assert_eq!(shared.active(), 0);
        });
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle.notify_one();
        }
    }
}
