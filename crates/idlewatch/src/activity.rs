//! Activity counting: an [`ActivityGuard`] per open request, upgraded connection or TCP stream.
//!
//! The count and the "ready" flag are two atomics shared by the watcher and everything that
//! serves traffic. The idle countdown runs only while the count is zero, from the moment it
//! last became zero: a guard whose drop brings the count to zero stamps that moment. The
//! driver is not woken for it — at its idle deadline it reads the stamp and, if traffic came
//! and went meanwhile, counts from the stamp instead. Only when the driver found the count
//! above zero does it *arm* a wake-up, and the next drop to zero wakes it (another Dekker pair:
//! the driver arms, then reads the count; the guard decrements, then reads the arming). So a
//! sequential request costs the count's increment and decrement, the guard's reference count,
//! and a clock read — and no task wake.
//!
//! The one race that matters — a request arriving just as the driver decides to stop — is closed
//! by ordering both sides (`SeqCst`), Dekker-style: a request increments the count *then* reads
//! the state; the driver publishes `Stopping` *then* reads the count. Of any such pair, one sees
//! the other: either the request sees "not ready" (and waits for a wake), or the driver sees the
//! request (and does not stop).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering, seq_cst_pair};

/// What the watcher and the traffic share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// True while the state is `Ready`.
    ready: AtomicBool,
    /// Open guards.
    active: AtomicUsize,
    /// When `active` last dropped to zero, in nanoseconds since `base`.
    last_release: AtomicU64,
    base: Instant,
    /// Set by the driver while it waits for `active` to drop to zero.
    armed: AtomicBool,
    /// Signalled when `active` drops to zero while armed.
    pub(crate) idle: Notify,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            ready: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            last_release: AtomicU64::new(0),
            base: Instant::now(),
            armed: AtomicBool::new(false),
            idle: Notify::new(),
        }
    }

    /// When the count last dropped to zero (the creation time if it never did).
    pub(crate) fn last_release(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_release.load(Ordering::SeqCst))
    }

    /// Asks to be woken (through `idle`) when the count drops to zero. Returns `true` if it
    /// already is zero: nothing will wake the caller then, and it must not wait.
    pub(crate) fn arm(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        seq_cst_pair();
        if self.active() == 0 {
            self.armed.store(false, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// True while armed.
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }
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
            let shared = Arc::new(Shared::new());
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

    /// The driver arms while the last guard is dropped: either the arming sees the count at
    /// zero (and the driver does not wait), or the drop sees the arming (and wakes it).
    #[test]
    fn loom_the_last_release_never_misses_an_armed_driver() {
        loom::model(|| {
            let shared = Arc::new(Shared::new());
            let guard = shared.enter();
            let releaser = thread::spawn(move || drop(guard));
            let already_idle = shared.arm();
            releaser.join().unwrap();
            let woken = !shared.is_armed();
            assert!(already_idle || woken, "an armed driver was left waiting at zero");
        });
    }

    /// Guards dropped on two threads: the count returns to zero exactly once.
    #[test]
    fn loom_concurrent_guards_count_exactly() {
        loom::model(|| {
            let shared = Arc::new(Shared::new());
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
        let shared = &*self.shared;
        if shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            let since_base = Instant::now().saturating_duration_since(shared.base);
            let nanos = u64::try_from(since_base.as_nanos()).unwrap_or(u64::MAX);
            shared.last_release.fetch_max(nanos, Ordering::SeqCst);
            seq_cst_pair();
            if shared.armed.load(Ordering::SeqCst) && shared.armed.swap(false, Ordering::SeqCst) {
                shared.idle.notify_one();
            }
        }
    }
}
