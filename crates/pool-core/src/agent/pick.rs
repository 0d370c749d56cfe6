//! Choosing a connection for one event and taking a permit on it, without waiting.
//!
//! There is one pick, in two halves. [`Agent::try_pick`] is the hot half: the request's pinned
//! connection (correlation affinity) or the balancer's choice, a permit, and nothing else —
//! it returns `Option<InFlight>`, two words that come back in registers. When it finds no
//! permit, [`Agent::pick`] (cold) does the same again and says why, as a [`Miss`]; callers
//! that cannot wait turn a miss into an error with [`Miss::into_error`], the one mapping.
//! Sending waits instead where waiting can help (see [`super::wait`]).

use std::sync::Arc;

use pool_api::{CorrelationId, EventKind, EventSet};
use tokio::time::Instant;

use super::refuse::Reject;
use super::{Agent, Closed, InFlight, Slot};
use crate::affinity::Lookup;
use crate::breaker::Admission;
use crate::endpoint::{GATE_OPEN, GATE_PROBE};
use crate::error::{PoolError, Unavailable};

/// Attempts at a pick when racing threads take the chosen permit first.
const MAX_RACES: usize = 4;

/// What a pick found when it took no permit.
pub(crate) enum Miss {
    /// No agent of that id.
    Unknown,
    /// The agent or the pool admits nothing.
    Closed(Closed),
    /// The balancer found no permit, for this reason.
    Rejected(Arc<Agent>, Reject),
    /// The request is pinned to this slot, which has no permit free now or is paused.
    Pinned(Arc<Agent>, Arc<Slot>),
    /// The request was pinned to a connection that has died.
    PinLost,
}

/// A pick: a permit, or why there is none.
pub(crate) type Pick = Result<InFlight, Miss>;

impl Miss {
    /// The error for a request that will not wait: the one mapping of a miss to an error.
    /// `key` names the request's correlation id (for a lost pin).
    #[cold]
    pub(crate) fn into_error(self, agent: &str, kind: EventKind, key: Option<&CorrelationId>) -> PoolError {
        match self {
            Self::Unknown => PoolError::UnknownAgent { agent: agent.to_owned() },
            Self::Closed(closed) => closed.error(agent),
            Self::Rejected(a, reject) => a.shared.refuse(reject, Some(kind)),
            Self::Pinned(a, slot) if slot.is_paused() => a.shared.refuse(Reject::Paused, Some(kind)),
            Self::Pinned(a, _) => a.shared.refuse(Reject::Full, Some(kind)),
            Self::PinLost => PoolError::PinLost {
                agent: agent.to_owned(),
                key: key.map(ToString::to_string).unwrap_or_default(),
            },
        }
    }
}

/// The event kinds `kind` stands for: one, or (`None`) any the connection accepts.
#[inline]
pub(crate) fn kind_bits(kind: Option<EventKind>) -> u8 {
    kind.map_or(EventSet::ALL.bits(), |k| 1u8 << k as u8)
}

impl Agent {
    /// The hot half of a pick among `live`, the agent's connected slots: a permit on the
    /// request's pinned connection when `id` names a request that has one (events after its
    /// headers), else on the balancer's choice; `None` for everything else — closed, lost pin,
    /// no permit — which [`pick`](Self::pick) sorts out.
    #[inline]
    pub(crate) fn try_pick(
        &self,
        live: &[Arc<Slot>],
        kind: EventKind,
        id: Option<&CorrelationId>,
        stamp: u64,
    ) -> Option<InFlight> {
        if self.shared.closed().is_some() {
            return None;
        }
        if let Some(id) = id
            && kind != EventKind::RequestHeaders
            && self.shared.affinity.len() > 0
        {
            match self.shared.affinity.peek(id.as_str(), stamp) {
                Lookup::Hit(slot) => {
                    return (!slot.is_paused() && slot.permits.try_acquire()).then(|| InFlight::pinned(slot));
                }
                Lookup::Lost => return None,
                Lookup::Miss => {}
            }
        }
        self.try_reserve_from(live, Some(kind)).ok()
    }

    /// The whole pick, for when [`try_pick`](Self::try_pick) found nothing: tries again and
    /// says why there is no permit. A lost pin is removed and counted here.
    #[cold]
    #[inline(never)]
    pub(crate) fn pick(
        self: &Arc<Self>,
        live: &[Arc<Slot>],
        kind: EventKind,
        id: Option<&CorrelationId>,
        stamp: u64,
    ) -> Pick {
        if let Some(closed) = self.shared.closed() {
            return Err(Miss::Closed(closed));
        }
        if let Some(id) = id
            && kind != EventKind::RequestHeaders
            && self.shared.affinity.len() > 0
        {
            match self.shared.affinity.lookup(id.as_str(), stamp) {
                Lookup::Hit(slot) => {
                    return if !slot.is_paused() && slot.permits.try_acquire() {
                        Ok(InFlight::pinned(slot))
                    } else {
                        Err(Miss::Pinned(self.clone(), slot))
                    };
                }
                Lookup::Lost => {
                    self.shared.metrics.pin_lost.increment(1);
                    return Err(Miss::PinLost);
                }
                Lookup::Miss => {}
            }
        }
        self.try_reserve_from(live, Some(kind)).map_err(|reject| Miss::Rejected(self.clone(), reject))
    }

    /// Takes a permit on the best usable connection of the agent's current snapshot, without
    /// waiting; `kind: None` reserves for any event kind the connection accepts.
    pub(crate) fn try_reserve(&self, kind: Option<EventKind>) -> Result<InFlight, Reject> {
        self.try_reserve_from(&self.snapshot.load(), kind)
    }

    /// The balancer's half of a pick, over `snap`: on a worker thread, the healthy connections
    /// at home there first ([`pool_api::worker_index`]); then healthy connections, then those
    /// with a poor success rate; a permit with one CAS; a half-open breaker's single probe.
    #[inline]
    pub(crate) fn try_reserve_from(
        &self,
        snap: &[Arc<Slot>],
        kind: Option<EventKind>,
    ) -> Result<InFlight, Reject> {
        let kind_bit = kind_bits(kind);
        if let Some(here) = pool_api::worker_index()
            && let Some(local) = self.reserve_where(snap, |s| s.is_home(here) && s.is_usable(kind_bit, false))
        {
            return Ok(local);
        }
        for allow_soft in [false, true] {
            if let Some(found) = self.reserve_where(snap, |s| s.is_usable(kind_bit, allow_soft)) {
                return Ok(found);
            }
        }
        Err(self.why_not(snap, kind_bit))
    }

    /// A permit on a connection of `snap` the balancer picks among those `eligible`.
    #[inline]
    fn reserve_where(
        &self,
        snap: &[Arc<Slot>],
        eligible: impl Fn(&Arc<Slot>) -> bool + Copy,
    ) -> Option<InFlight> {
        for _ in 0..MAX_RACES {
            let i = self.balancer.pick(snap, eligible)?;
            let slot = &snap[i];
            if !slot.permits.try_acquire() {
                continue;
            }
            let mut probe = false;
            if slot.endpoint.gate() & GATE_PROBE != 0 {
                match slot.endpoint.breaker.try_probe(Instant::now()) {
                    Admission::Probe => probe = true,
                    Admission::Admitted => {}
                    Admission::Rejected => {
                        slot.permits.release();
                        continue;
                    }
                }
            }
            return Some(InFlight::new(slot.clone(), probe));
        }
        None
    }

    /// Why no connection of `snap` took a permit for `kind_bit`.
    #[cold]
    fn why_not(&self, snap: &[Arc<Slot>], kind_bit: u8) -> Reject {
        if self.shared.removed.load(std::sync::atomic::Ordering::Acquire) {
            return Reject::Unavailable(Unavailable::Removed);
        }
        if snap.is_empty() {
            return Reject::Unavailable(Unavailable::NoConnections);
        }
        let candidates: Vec<&Arc<Slot>> = snap.iter().filter(|s| s.supports(kind_bit)).collect();
        if candidates.is_empty() {
            return Reject::Unsupported;
        }
        if candidates.iter().any(|s| s.is_fit(true)) {
            return Reject::Full;
        }
        if candidates.iter().all(|s| s.is_disconnected()) {
            return Reject::Unavailable(Unavailable::NoConnections);
        }
        if candidates.iter().all(|s| s.endpoint.gate() & GATE_OPEN != 0) {
            return Reject::Unavailable(Unavailable::CircuitOpen);
        }
        if candidates.iter().any(|s| s.is_paused()) {
            return Reject::Paused;
        }
        Reject::Unavailable(Unavailable::AgentNotReady)
    }

    /// A connection fit to pin a sticky session to, chosen by the balancer (capacity aside).
    pub(crate) fn pinnable_slot(&self) -> Option<Arc<Slot>> {
        let live = self.live();
        self.balancer.pick(&live[..], |s| s.is_pinnable()).map(|i| live[i].clone())
    }

    /// Why no slot could be pinned or picked, for errors.
    pub(crate) fn unavailable_reason(&self) -> Unavailable {
        match self.why_not(&self.live(), EventSet::ALL.bits()) {
            Reject::Unavailable(reason) => reason,
            Reject::Paused | Reject::Full | Reject::Unsupported => Unavailable::AgentNotReady,
        }
    }
}
