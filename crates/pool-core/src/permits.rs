//! Per-connection in-flight accounting.
//!
//! [`Permits`] is the counter the balancers read and the limit the pool enforces: a request
//! takes a permit before it is sent and gives it back when its guard drops — on success,
//! error, time-out, or when the caller drops its future at any point. The count is therefore
//! exact at every moment, which least-loaded balancing and graceful drain both rely on.
//!
//! Invariant: `0 <= in_flight <= limit` at all times, except that lowering the limit below
//! the current count (a reconnect to an agent advertising less) lets the count drain down
//! to it; no new permit is granted until then.

use crate::sync::{AtomicU32, Ordering};

/// An in-flight counter with a ceiling.
#[derive(Debug)]
pub(crate) struct Permits {
    in_flight: AtomicU32,
    limit: AtomicU32,
}

impl Permits {
    pub(crate) fn new(limit: u32) -> Self {
        Self { in_flight: AtomicU32::new(0), limit: AtomicU32::new(limit) }
    }

    /// Takes a permit if one is free. Lock-free; one compare-and-swap when uncontended.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return false;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives a permit back. Must pair with a successful [`try_acquire`](Self::try_acquire).
    ///
    /// Sequentially consistent so that a waiter who registered before re-checking for room
    /// is either seen by the releaser (and woken) or sees the freed permit itself: the protocol
    /// in `crate::waiters`.
    #[inline]
    pub(crate) fn release(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "permit released twice");
    }

    #[inline]
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    pub(crate) fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(agentpool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn permits_stop_at_the_limit_and_come_back() {
        let p = Permits::new(2);
        assert!(p.try_acquire());
        assert!(p.try_acquire());
        assert!(!p.try_acquire());
        assert!(!p.has_room());
        p.release();
        assert!(p.try_acquire());
        assert_eq!(p.in_flight(), 2);
    }

    #[test]
    fn a_lowered_limit_drains_down_before_granting_again() {
        let p = Permits::new(3);
        for _ in 0..3 {
            assert!(p.try_acquire());
        }
        p.set_limit(1);
        p.release();
        assert!(!p.try_acquire(), "2 in flight, limit 1");
        p.release();
        p.release();
        assert!(p.try_acquire());
    }
}

#[cfg(all(test, agentpool_loom))]
mod loom_permits {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two threads race for one permit: exactly one wins each round, and the count returns to 0.
    #[test]
    fn loom_permits_never_exceed_the_limit() {
        loom::model(|| {
            let p = Arc::new(Permits::new(1));
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let p = p.clone();
                    thread::spawn(move || {
                        if p.try_acquire() {
                            assert!(p.in_flight() <= 1);
                            p.release();
                            true
                        } else {
                            false
                        }
                    })
                })
                .collect();
            let wins = handles.into_iter().map(|h| h.join().unwrap()).filter(|w| *w).count();
            assert!(wins >= 1);
            assert_eq!(p.in_flight(), 0);
        });
    }

    /// A release racing with an acquire at the limit never loses a permit.
    #[test]
    fn loom_release_and_acquire_race_keeps_the_count_exact() {
        loom::model(|| {
            let p = Arc::new(Permits::new(2));
            assert!(p.try_acquire());
            assert!(p.try_acquire());
            let p2 = p.clone();
            let releaser = thread::spawn(move || p2.release());
            let got = p.try_acquire();
            releaser.join().unwrap();
            let expected = if got { 2 } else { 1 };
            assert_eq!(p.in_flight(), expected);
        });
    }
}
