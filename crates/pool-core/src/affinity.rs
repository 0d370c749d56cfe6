//! Correlation affinity: every event of one request goes to the connection that received its
//! headers, because that is where the agent keeps the request's state.
//!
//! An entry is made when a request's headers are sent on a connection whose agent takes some
//! later event kind (a headers-only agent needs none), and lives until the request's
//! `RequestComplete` has been sent, the caller drops the headers' send before it finishes,
//! the entry sits idle for the TTL (swept by maintenance), or it is cleared by hand. Over the
//! cap no entry is made — the request's later events are balanced normally — and the
//! rejection is counted. A pin remembers the connection *generation* it was made on: if that
//! connection has since died, the request fails with [`PoolError::PinLost`](crate::PoolError)
//! rather than silently moving to a connection that never saw its headers.

use std::sync::Arc;
use std::time::Duration;

use pool_api::CorrelationId;

use crate::slot::{Slot, SlotOwner};
use crate::sync::{AtomicU64, AtomicUsize, Ordering, PinMap};

/// What a request can be pinned to: a connection slot (or, in the loom model, a stand-in).
pub(crate) trait PinTarget {
    /// Which connection the target holds now.
    fn generation(&self) -> u64;
    /// True while it holds one.
    fn is_connected(&self) -> bool;
}

impl<O: SlotOwner> PinTarget for Slot<O> {
    fn generation(&self) -> u64 {
        Slot::generation(self)
    }

    fn is_connected(&self) -> bool {
        // The flag, not the connection cell: one plain load on the lookup path.
        !self.is_disconnected()
    }
}

/// Where one request is pinned.
pub(crate) struct Pin<T> {
    pub(crate) slot: Arc<T>,
    /// The slot's connection generation when pinned.
    pub(crate) generation: u64,
    /// Last use, as a pool clock stamp (nanoseconds since the pool's epoch).
    last_used: AtomicU64,
}

/// The pins of one agent.
///
/// Invariant: `len` equals the number of pins, and never exceeds `cap` once every call has
/// returned (a racing `pin` may count itself in for a moment before backing out).
pub(crate) struct Affinity<T> {
    pins: PinMap<CorrelationId, Pin<T>>,
    len: AtomicUsize,
    cap: usize,
    ttl: Duration,
}

/// What a lookup found.
pub(crate) enum Lookup<T> {
    /// No pin: balance normally.
    Miss,
    /// Pinned to this slot, whose connection is still the one pinned.
    Hit(Arc<T>),
    /// Pinned, but that connection is gone; the pin has been removed.
    Lost,
}

impl<T: PinTarget> Affinity<T> {
    pub(crate) fn new(cap: usize, ttl: Duration) -> Self {
        Self { pins: PinMap::new(), len: AtomicUsize::new(0), cap, ttl }
    }

    /// Pins `id` to `slot`. False if the table is full (the caller counts the rejection).
    pub(crate) fn pin(&self, id: &CorrelationId, slot: &Arc<T>, stamp: u64) -> bool {
        // A full table turns new keys away without taking a shard's write lock or touching
        // the shared count; replacing a key it holds is still allowed.
        if self.len.load(Ordering::Relaxed) >= self.cap && !self.pins.contains(id.as_str()) {
            return false;
        }
        let pin = Pin { slot: slot.clone(), generation: slot.generation(), last_used: AtomicU64::new(stamp) };
        // A new key counts itself in first and backs out over the cap; a replaced key keeps
        // its count.
        self.pins.upsert(id.clone(), pin, || {
            if self.len.fetch_add(1, Ordering::AcqRel) >= self.cap {
                self.len.fetch_sub(1, Ordering::AcqRel);
                false
            } else {
                true
            }
        })
    }

    /// Finds the pin of `id`, touching it; a lost pin is removed.
    #[inline]
    pub(crate) fn lookup(&self, id: &str, stamp: u64) -> Lookup<T> {
        let found = self.peek(id, stamp);
        if let Lookup::Lost = found {
            self.remove(id);
        }
        found
    }

    /// [`lookup`](Self::lookup) without removing a lost pin: a read only, for fast paths that
    /// leave anything but a hit or a miss to a slower path that looks again.
    #[inline]
    pub(crate) fn peek(&self, id: &str, stamp: u64) -> Lookup<T> {
        let found = self.pins.read(id, |pin| {
            if pin.slot.generation() == pin.generation && pin.slot.is_connected() {
                touch(&pin.last_used, stamp, self.ttl);
                Some(pin.slot.clone())
            } else {
                None
            }
        });
        match found {
            None => Lookup::Miss,
            Some(Some(slot)) => Lookup::Hit(slot),
            Some(None) => Lookup::Lost,
        }
    }

    /// Removes the pin of `id`; true if there was one.
    pub(crate) fn remove(&self, id: &str) -> bool {
        let removed = self.pins.remove(id);
        if removed {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// The slot `id` is pinned to, without touching or validating the pin.
    pub(crate) fn slot_of(&self, id: &str) -> Option<Arc<T>> {
        self.pins.read(id, |p| p.slot.clone())
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Drops pins idle for longer than the TTL; returns how many.
    pub(crate) fn sweep(&self, stamp: u64) -> usize {
        let limit = stamp.saturating_sub(u64::try_from(self.ttl.as_nanos()).unwrap_or(u64::MAX));
        // Kept while idle for at most the TTL: last_used >= now - ttl. Counted per removal so
        // racing inserts and removes keep `len` exact.
        let removed = self.pins.retain(|pin| pin.last_used.load(Ordering::Relaxed) >= limit);
        self.len.fetch_sub(removed, Ordering::AcqRel);
        removed
    }
}

/// Records a use at `stamp` — only when the stored stamp is more than 1/64 of `window` old,
/// so concurrent readers do not keep writing (and bouncing) the entry's cache line; expiry
/// is therefore exact to within 1.6 % of the window.
#[inline]
pub(crate) fn touch(last_used: &AtomicU64, stamp: u64, window: Duration) {
    let slack = u64::try_from(window.as_nanos() / 64).unwrap_or(u64::MAX);
    if stamp.saturating_sub(last_used.load(Ordering::Relaxed)) > slack {
        last_used.store(stamp, Ordering::Relaxed);
    }
}

/// Removes a freshly made pin when dropped, unless kept: a caller that drops the headers'
/// send before it finishes leaves no pin behind.
pub(crate) struct PinGuard<'a, T: PinTarget> {
    table: &'a Affinity<T>,
    id: Option<CorrelationId>,
}

impl<'a, T: PinTarget> PinGuard<'a, T> {
    pub(crate) fn new(table: &'a Affinity<T>, id: CorrelationId) -> Self {
        Self { table, id: Some(id) }
    }

    /// The request goes on: keep the pin.
    pub(crate) fn keep(mut self) {
        self.id = None;
    }
}

impl<T: PinTarget> Drop for PinGuard<'_, T> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.table.remove(id.as_str());
        }
    }
}

#[cfg(all(test, agentpool_loom))]
mod loom_affinity {
    use super::*;
    use loom::thread;
    use std::sync::Arc as StdArc;

    struct Conn;

    impl PinTarget for Conn {
        fn generation(&self) -> u64 {
            1
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    fn table(cap: usize) -> StdArc<Affinity<Conn>> {
        StdArc::new(Affinity::new(cap, Duration::from_secs(60)))
    }

    /// A request pins while its completion (or a dropped send) removes the pin: whatever the
    /// order, the count matches the table and nothing is left once both are done.
    #[test]
    fn loom_pin_racing_completion_leaves_nothing_behind() {
        loom::model(|| {
            let t = table(10);
            let target = StdArc::new(Conn);
            let id: CorrelationId = "r1".into();
            let t2 = t.clone();
            let id2 = id.clone();
            let completer = thread::spawn(move || {
                t2.remove(id2.as_str());
            });
            let pinned = t.pin(&id, &target, 0);
            completer.join().unwrap();
            assert!(pinned);
            // The completion ran before or after the pin: at most one pin left, counted right.
            assert_eq!(t.len(), usize::from(t.slot_of("r1").is_some()));
            t.remove("r1");
            assert_eq!(t.len(), 0);
        });
    }

    /// Two requests race for the last free place: exactly one is pinned, the count never
    /// ends above the cap, and a racing removal keeps it exact.
    #[test]
    fn loom_the_cap_holds_under_racing_pins_and_removals() {
        loom::model(|| {
            let t = table(1);
            let target = StdArc::new(Conn);
            let t2 = t.clone();
            let target2 = target.clone();
            let other = thread::spawn(move || t2.pin(&"b".into(), &target2, 0));
            let mine = t.pin(&"a".into(), &target, 0);
            let theirs = other.join().unwrap();
            assert!(mine ^ theirs, "exactly one pinned: {mine} {theirs}");
            assert_eq!(t.len(), 1);
            let t3 = t.clone();
            let remover = thread::spawn(move || {
                t3.remove("a");
                t3.remove("b");
            });
            let again = t.pin(&"c".into(), &target, 0);
            remover.join().unwrap();
            assert_eq!(t.len(), usize::from(again));
        });
    }
}
