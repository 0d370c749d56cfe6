//! Sticky sessions: a long-lived stream (WebSocket, SSE, long-polling) pinned to one
//! connection of one agent for as long as it lasts.
//!
//! A session is created on a healthy connection. Each send through it first checks that the
//! pinned connection is still the same one and still healthy (connected, not paused, not
//! draining, breaker closed, success rate not unhealthy); if not, the session is re-pinned to
//! a healthy connection and the caller is told ([`StickyRoute::Repinned`]). The same happens
//! when the connection dies after that check — while the send waits for a permit on it, or
//! between the pick and the moment the event would go out: the event, not yet sent, goes to
//! the new connection. A session unused
//! for the idle time-out expires (swept by maintenance, or by
//! [`AgentPool::cleanup_expired_sessions`](crate::AgentPool::cleanup_expired_sessions)); with
//! no time-out it lives until cleared.

use crate::sync::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::slot::{InFlight, Live, Slot, SlotOwner};

/// How a sticky send was routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickyRoute {
    /// Sent on the session's pinned connection.
    Pinned,
    /// The pinned connection had died or turned unhealthy: the session was re-pinned to a
    /// healthy one, which carried the send.
    Repinned {
        /// The label of the connection given up.
        from: String,
        /// The label of the new one.
        to: String,
    },
    /// No live session of that id for that agent: balanced like any request.
    NoSession,
}

pub(crate) struct Session<O> {
    pub(crate) agent: Arc<str>,
    pub(crate) slot: Arc<Slot<O>>,
    pub(crate) generation: u64,
    /// The connection the session was pinned to, so that the health check can ask the
    /// transport whether it is still open without loading the slot's connection cell.
    live: Option<Arc<Live>>,
    last_used: AtomicU64,
}

impl<O: SlotOwner> Session<O> {
    fn new(agent: Arc<str>, slot: Arc<Slot<O>>, stamp: u64) -> Self {
        // The connection before the generation: if an attach runs in between, the generation
        // is the newer one and the check fails — a spurious re-pin, never a stale hit.
        let live = slot.conn.load_full();
        Self { agent, generation: slot.generation(), live, slot, last_used: AtomicU64::new(stamp) }
    }

    /// True while the pinned connection is the same one and fit for traffic: connected, not
    /// paused or draining, breaker closed, not ejected, success rate not unhealthy. Reads
    /// only atomics (`SOFT_UNHEALTHY` mirrors the unhealthy health state).
    #[inline]
    pub(crate) fn is_healthy(&self) -> bool {
        self.slot.generation() == self.generation
            && self.live.as_ref().is_some_and(|live| live.conn.is_open())
            && self.slot.is_fit(false)
    }
}

/// The sticky sessions of a pool whose agents' shared state is `O`.
pub(crate) struct Sticky<O> {
    sessions: DashMap<Arc<str>, Session<O>, foldhash::fast::RandomState>,
    idle: Option<Duration>,
}

impl<O: SlotOwner> Sticky<O> {
    pub(crate) fn new(idle: Option<Duration>) -> Self {
        Self { sessions: DashMap::with_hasher(foldhash::fast::RandomState::default()), idle }
    }

    fn expired(&self, session: &Session<O>, stamp: u64) -> bool {
        self.idle.is_some_and(|idle| {
            let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
            stamp.saturating_sub(session.last_used.load(Ordering::Relaxed)) > idle
        })
    }

    pub(crate) fn insert(&self, id: &str, agent: Arc<str>, slot: Arc<Slot<O>>, stamp: u64) {
        let session = Session::new(agent, slot, stamp);
        self.sessions.insert(Arc::from(id), session);
    }

    /// The session's agent and pin if it is live, touching it; an expired one is removed.
    #[inline]
    pub(crate) fn lookup(&self, id: &str, stamp: u64) -> Option<(Arc<str>, Arc<Slot<O>>, bool)> {
        let expired = {
            let session = self.sessions.get(id)?;
            if !self.expired(&session, stamp) {
                if let Some(idle) = self.idle {
                    crate::affinity::touch(&session.last_used, stamp, idle);
                }
                return Some((session.agent.clone(), session.slot.clone(), session.is_healthy()));
            }
            true
        };
        if expired {
            self.sessions.remove(id);
        }
        None
    }

    /// The sticky fast path: a permit on the pinned connection of a live, healthy session of
    /// `agent` (touching it). `None` for everything else — no such session, another agent's,
    /// expired, unhealthy, agent closed, paused, full — which the slow path sorts out.
    #[inline]
    pub(crate) fn try_reserve(&self, id: &str, agent: &str, stamp: u64) -> Option<InFlight<O>> {
        let session = self.sessions.get(id)?;
        if &*session.agent != agent
            || self.expired(&session, stamp)
            || !session.is_healthy()
            || session.slot.owner.is_closed()
            || !session.slot.permits.try_acquire()
        {
            return None;
        }
        if let Some(idle) = self.idle {
            crate::affinity::touch(&session.last_used, stamp, idle);
        }
        Some(InFlight::pinned(session.slot.clone()))
    }

    /// Re-pins a session to `slot`, unless it was cleared meanwhile.
    pub(crate) fn repin(&self, id: &str, slot: Arc<Slot<O>>, stamp: u64) {
        if let Some(mut session) = self.sessions.get_mut(id) {
            let agent = session.agent.clone();
            *session = Session::new(agent, slot, stamp);
        }
    }

    pub(crate) fn refresh(&self, id: &str, stamp: u64) -> bool {
        self.lookup(id, stamp).is_some()
    }

    pub(crate) fn has(&self, id: &str, stamp: u64) -> bool {
        self.sessions.get(id).is_some_and(|s| !self.expired(&s, stamp))
    }

    pub(crate) fn agent_of(&self, id: &str, stamp: u64) -> Option<String> {
        self.sessions.get(id).filter(|s| !self.expired(s, stamp)).map(|s| s.agent.to_string())
    }

    pub(crate) fn remove(&self, id: &str) -> bool {
        self.sessions.remove(id).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Removes expired sessions; returns how many.
    pub(crate) fn sweep(&self, stamp: u64) -> usize {
        if self.idle.is_none() {
            return 0;
        }
        let before = self.sessions.len();
        self.sessions.retain(|_, s| !self.expired(s, stamp));
        before.saturating_sub(self.sessions.len())
    }

    /// Removes every session of an agent (it was removed from the pool).
    pub(crate) fn remove_agent(&self, agent: &str) {
        self.sessions.retain(|_, s| &*s.agent != agent);
    }
}
