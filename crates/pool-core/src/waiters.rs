//! Who is waiting for a permit, known to a release at the cost of one load.
//!
//! A request that finds every usable connection of its agent full waits on the agent's
//! `Notify`, and a release must wake it. Most releases happen with nobody waiting, and they are
//! on the send path, so a release must not pay for a notification then. Waiters are therefore
//! counted, and the two sides follow a store-then-load protocol (Dekker's):
//!
//! * **waiter:** increments the count (`SeqCst`), issues a `SeqCst` fence, enables its
//!   `Notified` future, and only then looks for a free permit again;
//! * **releaser:** gives its permit back with a `SeqCst` read-modify-write
//!   (`Permits::release`), then reads the count (`SeqCst`) and notifies only if it is not zero.
//!
//! Each side writes one location and then reads the other, and all four operations are in the
//! single total order of sequentially consistent operations, so the two reads cannot both miss
//! the other side's write: either the waiter's re-check finds the freed permit, or the releaser
//! sees the waiter and notifies the `Notified` it enabled. A notification that finds its waiter
//! already gone is harmless (tokio's `notify_one` passes an unconsumed wake-up on).
//!
//! The same protocol tells a draining agent when its last request has finished.
//!
//! The atomics come from [`crate::sync`], so `--cfg agentpool_loom` model-checks the protocol
//! (`loom_a_waiter_registering_while_a_permit_is_released_never_misses_the_wake_up`). Loom
//! treats `SeqCst` loads and stores as acquire/release only (its README, tokio-rs/loom#180),
//! which would make it report the store-buffer reordering that `SeqCst` rules out; it does
//! model `SeqCst` fences. [`after_release`](Waiters::after_release) therefore puts a `SeqCst`
//! fence between the release and the read of the count under loom only
//! ([`crate::sync::seq_cst_pair`]): the ordering the real program already has, at no cost on
//! the real send path.

use crate::sync::{AtomicUsize, Ordering, fence, seq_cst_pair};

/// A count of waiters. See the module documentation for the protocol.
#[derive(Debug)]
pub(crate) struct Waiters {
    count: AtomicUsize,
}

impl Waiters {
    pub(crate) fn new() -> Self {
        Self { count: AtomicUsize::new(0) }
    }

    /// Counts a waiter until the returned guard drops. Call it before enabling the `Notified`
    /// future and re-checking for room.
    pub(crate) fn register(&self) -> Waiter<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Waiter(self)
    }

    /// Whether anyone waits; called right after a permit was given back (a `SeqCst`
    /// read-modify-write).
    #[inline]
    pub(crate) fn after_release(&self) -> bool {
        seq_cst_pair();
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Whether anyone waits; for wake-ups after capacity appeared some other way.
    #[inline]
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// One registered waiter; dropping it deregisters.
pub(crate) struct Waiter<'a>(&'a Waiters);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(agentpool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_counts_until_its_guard_drops() {
        let w = Waiters::new();
        assert!(!w.any() && !w.after_release());
        let first = w.register();
        let second = w.register();
        assert!(w.any() && w.after_release());
        drop(first);
        assert!(w.any());
        drop(second);
        assert!(!w.any());
    }
}

#[cfg(all(test, agentpool_loom))]
mod loom_waiters {
    use loom::sync::{Arc, Notify};
    use loom::thread;

    use super::*;
    use crate::permits::Permits;

    /// The agent's only permit is taken. One thread releases it and notifies if it sees a
    /// waiter; the other registers as a waiter, re-checks for room and, finding none, waits for
    /// the notification. A lost wake-up leaves the waiter blocked for ever, which loom reports
    /// as a deadlock; otherwise the waiter ends up holding the permit.
    #[test]
    fn loom_a_waiter_registering_while_a_permit_is_released_never_misses_the_wake_up() {
        loom::model(|| {
            let permits = Arc::new(Permits::new(1));
            assert!(permits.try_acquire());
            let waiters = Arc::new(Waiters::new());
            let wake = Arc::new(Notify::new());

            let releaser = {
                let (permits, waiters, wake) = (permits.clone(), waiters.clone(), wake.clone());
                thread::spawn(move || {
                    permits.release();
                    if waiters.after_release() {
                        wake.notify();
                    }
                })
            };

            {
                let _waiter = waiters.register();
                // loom's `Notify` keeps a notification sent before `wait`, as tokio's
                // `Notified` does once enabled; `wait` may also return spuriously.
                while !permits.try_acquire() {
                    wake.wait();
                }
            }
            releaser.join().unwrap();
            assert_eq!(permits.in_flight(), 1, "the waiter holds the released permit");
            assert!(!waiters.any());
        });
    }
}
