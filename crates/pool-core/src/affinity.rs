//! Correlation affinity: every event of one request goes to the connection that received its
//! headers, because that is where the agent keeps the request's state.
//!
//! An entry is made when a request's headers are answered, and lives until the request's
//! `RequestComplete` has been sent, the caller drops the headers' send before it finishes,
//! the entry sits idle for the TTL (swept by maintenance), or it is cleared by hand. Over the
//! cap no entry is made — the request's later events are balanced normally — and the
//! rejection is counted. A pin remembers the connection *generation* it was made on: if that
//! connection has since died, the request fails with [`PoolError::PinLost`](crate::PoolError)
//! rather than silently moving to a connection that never saw its headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use pool_api::CorrelationId;
use tokio::time::Instant;

use crate::slot::Slot;

/// Where one request is pinned.
pub(crate) struct Pin {
    pub(crate) slot: Arc<Slot>,
    /// The slot's connection generation when pinned.
    pub(crate) generation: u64,
    /// Nanoseconds since the table's epoch of the last use.
    last_used: AtomicU64,
}

/// The pins of one agent.
pub(crate) struct Affinity {
    pins: DashMap<CorrelationId, Pin, foldhash::fast::RandomState>,
    len: AtomicUsize,
    cap: usize,
    ttl: Duration,
    epoch: Instant,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// No pin: balance normally.
    Miss,
    /// Pinned to this slot, whose connection is still the one pinned.
    Hit(Arc<Slot>),
    /// Pinned, but that connection is gone; the pin has been removed.
    Lost,
}

impl Affinity {
    pub(crate) fn new(cap: usize, ttl: Duration) -> Self {
        Self {
            pins: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            len: AtomicUsize::new(0),
            cap,
            ttl,
            epoch: Instant::now(),
        }
    }

    fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Pins `id` to `slot`. False if the table is full (the caller counts the rejection).
    pub(crate) fn pin(&self, id: &CorrelationId, slot: &Arc<Slot>, now: Instant) -> bool {
        let pin = Pin {
            slot: slot.clone(),
            generation: slot.generation(),
            last_used: AtomicU64::new(self.stamp(now)),
        };
        match self.pins.entry(id.clone()) {
            dashmap::Entry::Occupied(mut o) => {
                o.insert(pin);
                true
            }
            dashmap::Entry::Vacant(v) => {
                if self.len.fetch_add(1, Ordering::Relaxed) >= self.cap {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
                v.insert(pin);
                true
            }
        }
    }

    /// Finds the pin of `id`, touching it.
    #[inline]
    pub(crate) fn lookup(&self, id: &str, now: Instant) -> Lookup {
        let lost = match self.pins.get(id) {
            None => return Lookup::Miss,
            Some(pin) if pin.slot.generation() == pin.generation && pin.slot.is_connected() => {
                pin.last_used.store(self.stamp(now), Ordering::Relaxed);
                return Lookup::Hit(pin.slot.clone());
            }
            Some(_) => true,
        };
        if lost {
            self.remove(id);
        }
        Lookup::Lost
    }

    /// Removes the pin of `id`; true if there was one.
    pub(crate) fn remove(&self, id: &str) -> bool {
        let removed = self.pins.remove(id).is_some();
        if removed {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// The slot `id` is pinned to, without touching or validating the pin.
    pub(crate) fn slot_of(&self, id: &str) -> Option<Arc<Slot>> {
        self.pins.get(id).map(|p| p.slot.clone())
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Drops pins idle for longer than the TTL; returns how many.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let limit = self.stamp(now).saturating_sub(u64::try_from(self.ttl.as_nanos()).unwrap_or(u64::MAX));
        let before = self.pins.len();
        // Kept while idle for at most the TTL: last_used >= now - ttl.
        self.pins.retain(|_, pin| pin.last_used.load(Ordering::Relaxed) >= limit);
        let removed = before.saturating_sub(self.pins.len());
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

/// Removes a freshly made pin when dropped, unless kept: a caller that drops the headers'
/// send before it finishes leaves no pin behind.
pub(crate) struct PinGuard<'a> {
    table: &'a Affinity,
    id: Option<CorrelationId>,
}

impl<'a> PinGuard<'a> {
    pub(crate) fn new(table: &'a Affinity, id: CorrelationId) -> Self {
        Self { table, id: Some(id) }
    }

    /// The request goes on: keep the pin.
    pub(crate) fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.table.remove(id.as_str());
        }
    }
}
