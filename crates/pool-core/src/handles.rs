//! Handles that group the pool's less frequent operations, so [`AgentPool`] keeps to
//! registration, the send path, statistics and shutdown:
//!
//! * [`StickySessions`] ([`AgentPool::sticky_sessions`]) — long-lived streams pinned to one
//!   connection;
//! * [`RequestAffinity`] ([`AgentPool::affinity`]) — the pins that keep a request's later
//!   events on the connection its headers went to;
//! * [`ConfigPushes`] ([`AgentPool::config_push`]) — configuration pushed to agents, and the
//!   handler of the updates agents ask for.
//!
//! A handle borrows the pool and costs nothing to make.

use std::sync::Arc;

use pool_api::{CorrelationId, Decision, Event, EventKind};
use tokio::time::Instant;

use crate::agent::send::StickyStart;
use crate::agent::{Agent, InFlight, Slot};
use crate::config_push::{self, ConfigUpdateHandler, PushCounts, PushState};
use crate::error::PoolError;
use crate::pool::{AgentPool, Reservation};
use crate::sticky::StickyRoute;

impl AgentPool {
    /// The pool's sticky sessions.
    pub fn sticky_sessions(&self) -> StickySessions<'_> {
        StickySessions { pool: self }
    }

    /// The pool's correlation affinity.
    pub fn affinity(&self) -> RequestAffinity<'_> {
        RequestAffinity { pool: self }
    }

    /// Configuration pushes and agent-initiated updates.
    pub fn config_push(&self) -> ConfigPushes<'_> {
        ConfigPushes { pool: self }
    }
}

/// Sticky sessions: a WebSocket, SSE stream or long poll pinned to one healthy connection of
/// one agent for as long as it lasts (see [`StickyRoute`] for how a send was routed).
#[derive(Clone, Copy, Debug)]
pub struct StickySessions<'a> {
    pool: &'a AgentPool,
}

/// A sticky send's agent, connection slot and route.
type StickyPick = (Arc<Agent>, Arc<Slot>, StickyRoute);

impl StickySessions<'_> {
    /// Creates — or replaces — a session pinning `session_id` to one healthy connection of
    /// `agent`.
    pub fn create(&self, session_id: &str, agent: &str) -> Result<(), PoolError> {
        let a = self.pool.agent(agent)?;
        a.shared.admitting()?;
        let Some(slot) = a.pinnable_slot() else {
            return Err(PoolError::Unavailable { agent: agent.to_owned(), reason: a.unavailable_reason() });
        };
        self.pool.inner.sticky.insert(session_id, a.shared.id.clone(), slot, self.pool.now());
        Ok(())
    }

    /// Sends `event` to `agent` through session `session_id`, returning the decision and how it
    /// was routed. A session whose pinned connection died or turned unhealthy is re-pinned to a
    /// healthy one ([`StickyRoute::Repinned`]) — also when the connection dies between the
    /// moment this send chose it and the moment the event would have gone out, or while this
    /// send waits for a permit on it; the event then goes to the new connection. Without a live
    /// session of that id for that agent the event is sent like any other
    /// ([`StickyRoute::NoSession`]).
    pub async fn send(
        &self,
        session_id: &str,
        agent: &str,
        event: &Event,
    ) -> Result<(Decision, StickyRoute), PoolError> {
        let inner = &self.pool.inner;
        let start = Instant::now();
        let stamp = inner.ctx.clock.stamp(start);
        if let Some(guard) = inner.sticky.try_reserve(session_id, agent, stamp) {
            let shared = guard.slot.owner.clone();
            // Read at once after the session was found on it: the connection it is pinned to.
            let generation = guard.slot.generation();
            let held = StickyStart::Held(guard);
            return shared
                .send_sticky(&inner.sticky, session_id, held, generation, event, start, StickyRoute::Pinned)
                .await;
        }
        let Some((a, slot, route)) = self.route(session_id, agent, stamp)? else {
            return Ok((self.pool.send(agent, event).await?, StickyRoute::NoSession));
        };
        let generation = slot.generation();
        a.shared
            .send_sticky(&inner.sticky, session_id, StickyStart::Wait(slot), generation, event, start, route)
            .await
    }

    /// Takes a permit on session `session_id`'s connection without waiting (re-pinning it
    /// first if that connection died or turned unhealthy). Without a live session of that id
    /// for that agent it reserves like [`AgentPool::try_reserve`]. The session is touched at
    /// the maintenance clock (to within one health bucket).
    pub fn try_reserve(
        &self,
        session_id: &str,
        agent: &str,
        kind: EventKind,
    ) -> Result<(Reservation, StickyRoute), PoolError> {
        let stamp = self.pool.inner.ctx.clock.coarse();
        if let Some(guard) = self.pool.inner.sticky.try_reserve(session_id, agent, stamp) {
            return Ok((Reservation::new(guard), StickyRoute::Pinned));
        }
        self.try_reserve_slow(session_id, agent, kind, stamp)
    }

    /// [`try_reserve`](Self::try_reserve) after its fast attempt failed: the full route
    /// (re-pinning if it must), with the reason if nothing can be taken.
    #[cold]
    #[inline(never)]
    fn try_reserve_slow(
        &self,
        session_id: &str,
        agent: &str,
        kind: EventKind,
        stamp: u64,
    ) -> Result<(Reservation, StickyRoute), PoolError> {
        let Some((a, slot, route)) = self.route(session_id, agent, stamp)? else {
            return Ok((self.pool.try_reserve(agent, kind)?, StickyRoute::NoSession));
        };
        if !slot.is_paused() && slot.permits.try_acquire() {
            return Ok((Reservation::new(InFlight::pinned(slot)), route));
        }
        Err(crate::agent::pick::Miss::Pinned(a, slot).into_error(agent, kind, None))
    }

    /// Where a sticky send goes: the session's connection, or a fresh healthy one it has just
    /// been re-pinned to; `None` without a live session of that id for that agent.
    fn route(&self, session_id: &str, agent: &str, stamp: u64) -> Result<Option<StickyPick>, PoolError> {
        let sticky = &self.pool.inner.sticky;
        let Some((_, pinned, healthy)) = sticky.lookup(session_id, stamp).filter(|(a, ..)| &**a == agent)
        else {
            return Ok(None);
        };
        let a = self.pool.agent(agent)?;
        a.shared.admitting()?;
        if healthy {
            if Arc::ptr_eq(&pinned.owner, &a.shared) {
                return Ok(Some((a, pinned, StickyRoute::Pinned)));
            }
            // Still on a connection of an agent `a` replaced, which is draining: the session
            // stays there while that agent admits (and its send waits on that agent).
            if pinned.owner.closed().is_none()
                && let Some(old) = pinned.owner.agent()
            {
                return Ok(Some((old, pinned, StickyRoute::Pinned)));
            }
        }
        let Some(fresh) = a.pinnable_slot() else {
            return Err(a.shared.refuse_unavailable(a.unavailable_reason()));
        };
        sticky.repin(session_id, fresh.clone(), stamp);
        a.shared.metrics.sticky_repins.increment(1);
        let route = StickyRoute::Repinned { from: pinned.label().to_string(), to: fresh.label().to_string() };
        Ok(Some((a, fresh, route)))
    }

    /// Marks a session used now; false if it does not exist or has expired.
    pub fn refresh(&self, session_id: &str) -> bool {
        self.pool.inner.sticky.refresh(session_id, self.pool.now())
    }

    /// True if the session exists and has not expired.
    pub fn contains(&self, session_id: &str) -> bool {
        self.pool.inner.sticky.has(session_id, self.pool.now())
    }

    /// Ends a session; true if it existed.
    pub fn remove(&self, session_id: &str) -> bool {
        self.pool.inner.sticky.remove(session_id)
    }

    /// Sessions held (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.pool.inner.sticky.len()
    }

    /// True if no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The agent a live session belongs to.
    pub fn agent_of(&self, session_id: &str) -> Option<String> {
        self.pool.inner.sticky.agent_of(session_id, self.pool.now())
    }

    /// Removes expired sessions now (maintenance also does, every health bucket); returns how
    /// many.
    pub fn remove_expired(&self) -> usize {
        self.pool.inner.sticky.sweep(self.pool.now())
    }
}

/// Correlation affinity: every event of one request goes to the connection that received its
/// headers. [`AgentPool::send`] follows the pins on its own; this handle reserves along them
/// and clears them.
#[derive(Clone, Copy, Debug)]
pub struct RequestAffinity<'a> {
    pool: &'a AgentPool,
}

impl RequestAffinity<'_> {
    /// [`AgentPool::try_reserve`] for one event of request `correlation_id`: if the request is
    /// pinned (and `kind` is not its headers), the permit is taken on its pinned connection —
    /// or [`PoolError::PinLost`] if that connection has died, or [`Unavailable::NoCapacity`](crate::Unavailable::NoCapacity)
    /// if it has no permit free. The pin is touched at the maintenance clock (to within one
    /// health bucket).
    pub fn try_reserve(
        &self,
        agent: &str,
        kind: EventKind,
        correlation_id: &CorrelationId,
    ) -> Result<Reservation, PoolError> {
        let stamp = self.pool.inner.ctx.clock.coarse();
        match self.pool.pick(agent, kind, Some(correlation_id), stamp) {
            Ok(guard) => Ok(Reservation::new(guard)),
            Err(miss) => Err(miss.into_error(agent, kind, Some(correlation_id))),
        }
    }

    /// Removes a request's pin; true if it had one. Sending `RequestComplete` does this on its
    /// own.
    pub fn clear(&self, agent: &str, correlation_id: &str) -> bool {
        let Some(view) = self.pool.directory().with(|a| a.get(agent).cloned()) else { return false };
        // Also a pin on a replaced agent that is still draining.
        let old =
            view.retiring.iter().flat_map(|r| r.iter()).any(|a| a.shared.affinity.remove(correlation_id));
        view.agent.shared.affinity.remove(correlation_id) || old
    }

    /// Requests pinned, over every agent.
    pub fn len(&self) -> usize {
        self.pool.agents().iter().map(|a| a.shared.affinity.len()).sum()
    }

    /// True if no request is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Configuration exchanged with agents at run time: pushes (proxy → agent) and the handler of
/// updates agents ask for (agent → proxy). See the pool's `config_push` settings.
#[derive(Clone, Copy, Debug)]
pub struct ConfigPushes<'a> {
    pool: &'a AgentPool,
}

impl ConfigPushes<'_> {
    /// Pushes configuration to every endpoint of `agent` whose connection announces the
    /// `config_push` feature; returns the push ids (none if no endpoint supports it). Each push
    /// is sent, acknowledged or rejected by the agent, and retried on ack time-out as
    /// configured; follow it with [`state`](Self::state) or [`wait`](Self::wait).
    pub fn push(
        &self,
        agent: &str,
        kind: &str,
        version: Option<&str>,
        payload: bytes::Bytes,
    ) -> Result<Vec<u64>, PoolError> {
        let a = self.pool.agent(agent)?;
        a.shared.admitting()?;
        Ok(config_push::start(&a, &self.pool.inner.pushes, kind, version, &payload))
    }

    /// [`push`](Self::push) to every agent that supports it; returns `(agent, push id)` pairs.
    pub fn push_to_all(
        &self,
        kind: &str,
        version: Option<&str>,
        payload: bytes::Bytes,
    ) -> Vec<(String, u64)> {
        let mut ids = Vec::new();
        for agent in self.pool.agents() {
            if agent.shared.admitting().is_ok() {
                let id = agent.id().to_owned();
                let started = config_push::start(&agent, &self.pool.inner.pushes, kind, version, &payload);
                ids.extend(started.into_iter().map(|push| (id.clone(), push)));
            }
        }
        ids.sort();
        ids
    }

    /// Where push `id` is; `None` for an unknown (or long-forgotten) id.
    pub fn state(&self, id: u64) -> Option<PushState> {
        self.pool.inner.pushes.state(id)
    }

    /// Waits until push `id` is acked, rejected or failed, and returns that outcome.
    pub async fn wait(&self, id: u64) -> Option<PushState> {
        let mut rx = self.pool.inner.pushes.watch(id)?;
        let state = rx.wait_for(PushState::is_final).await.ok()?.clone();
        Some(state)
    }

    /// Pushes pending, acked, rejected and failed since the pool started.
    pub fn counts(&self) -> PushCounts {
        self.pool.inner.pushes.counts()
    }

    /// Registers the handler of agent-initiated configuration updates (replacing any other);
    /// `None` removes it, after which such requests are answered "rejected".
    pub fn set_update_handler(&self, handler: Option<Arc<dyn ConfigUpdateHandler>>) {
        self.pool.inner.updates.set(handler);
    }
}
