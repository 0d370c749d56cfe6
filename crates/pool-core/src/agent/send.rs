//! Sending an event on the connection a permit was taken on, and recording the outcome: the
//! single send path. Every event kind and every caller — the pool, a reservation, a tower
//! service, a sticky session — ends in [`AgentShared::send_on`].
//!
//! Before the event goes out the path makes sure it goes where it must: an event of a request
//! pinned by correlation affinity goes to the pinned connection (a permit taken elsewhere, by a
//! reservation or a tower service, is exchanged for one there); a connection found dead
//! between the pick and the send is taken out of picking and the request picked again, unless
//! it is pinned (its state at the agent died with the connection: [`PoolError::PinLost`]). A
//! sticky session is moved to a healthy connection instead (see
//! [`AgentShared::send_sticky`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pool_api::{CancelReason, Decision, Event, EventKind, EventSet, TransportError};
use tokio::time::Instant;

use super::pick::{Miss, Pick};
use super::wait::{Acquired, Target, Waited};
use super::{AgentShared, Closed, InFlight, Slot, Sticky};
use crate::affinity::{Lookup, PinGuard};
use crate::error::PoolError;
use crate::slot::{Finished, Live};
use crate::sticky::StickyRoute;

/// Re-pins one sticky send may make when the connections it is moved to keep dying.
pub(crate) const MAX_REPINS: usize = 4;

/// Event kinds that follow a request's headers and go where its headers went: body chunks,
/// response headers and body, completion, WebSocket frames.
const FOLLOW_UPS: u8 = EventSet::ALL.bits() & !(1 << EventKind::RequestHeaders as u8);

/// Where a sticky send starts: a permit already held on the session's connection, or that
/// connection's slot, to wait on.
pub(crate) enum StickyStart {
    /// A permit taken on the pinned connection.
    Held(InFlight),
    /// The pinned connection's slot, all of whose permits were taken.
    Wait(Arc<Slot>),
}

/// Finishes a send after its pick: sends on the permit, or waits for one where waiting can
/// help (a full agent, a busy pinned connection, a paused agent in mode wait-and-retry), or
/// answers at once. `agent` is the id the caller asked for.
pub(crate) async fn send_picked(
    pick: Pick,
    agent: &str,
    event: &Event,
    start: Instant,
) -> Result<Decision, PoolError> {
    let kind = event.kind();
    let acquired = match pick {
        Ok(guard) => Acquired::Permit(guard),
        Err(Miss::Rejected(a, _)) => {
            let deadline = start + a.shared.settings.request_timeout;
            match a.wait(Target::Balanced(Some(kind)), deadline).await {
                Waited::Permit(guard) => Acquired::Permit(guard),
                Waited::Answer(answer) => Acquired::Answer(answer),
                // A balanced wait has nothing pinned to lose: pick afresh.
                Waited::Lost => a.reserve(Some(kind), deadline).await,
            }
        }
        Err(Miss::Pinned(a, slot)) => {
            let deadline = start + a.shared.settings.request_timeout;
            a.reserve_pinned(slot, event.correlation_id().as_str(), deadline).await
        }
        Err(miss) => return Err(miss.into_error(agent, kind, Some(event.correlation_id()))),
    };
    match acquired {
        Acquired::Permit(guard) => {
            let shared = guard.slot.owner.clone();
            shared.dispatch(guard, event, start).await
        }
        Acquired::Answer(answer) => *answer,
    }
}

impl AgentShared {
    /// Sends `event` on the connection `guard` holds a permit on — or where the request must
    /// go instead (see the module docs) — and records the outcome.
    pub(crate) async fn dispatch(
        &self,
        mut guard: InFlight,
        event: &Event,
        start: Instant,
    ) -> Result<Decision, PoolError> {
        let kind = event.kind();
        let deadline = start + self.settings.request_timeout;
        // A permit taken without looking at affinity (a reservation, a tower service) must
        // still go where the request is pinned.
        if !guard.is_pinned() && kind != EventKind::RequestHeaders && self.affinity.len() > 0 {
            match self.affinity.lookup(event.correlation_id().as_str(), self.ctx.clock.stamp(start)) {
                Lookup::Hit(slot) if !Arc::ptr_eq(&slot, &guard.slot) => {
                    drop(guard);
                    let Some(agent) = self.agent() else { return Err(Closed::Agent.error(&self.id)) };
                    guard = match agent.reserve_pinned(slot, event.correlation_id().as_str(), deadline).await
                    {
                        Acquired::Permit(guard) => guard,
                        Acquired::Answer(answer) => return *answer,
                    };
                }
                Lookup::Lost => return Err(self.pin_lost(event.correlation_id().as_str())),
                Lookup::Hit(_) | Lookup::Miss => {}
            }
        }
        // A connection can die between the pick and here, before its supervisor takes it out
        // of the snapshot. The event has not been sent: take that slot out and pick again.
        // A pinned request cannot move: its state is on the dead connection.
        let live = loop {
            match guard.slot.conn.load_full() {
                Some(live) if live.conn.is_open() => break live,
                _ if guard.is_pinned() => {
                    guard.slot.mark_disconnected();
                    self.affinity.remove(event.correlation_id().as_str());
                    return Err(self.pin_lost(event.correlation_id().as_str()));
                }
                _ => {
                    guard.slot.mark_disconnected();
                    drop(guard);
                    let Some(agent) = self.agent() else { return Err(Closed::Agent.error(&self.id)) };
                    guard = match agent.reserve(Some(kind), deadline).await {
                        Acquired::Permit(guard) => guard,
                        Acquired::Answer(answer) => return *answer,
                    };
                }
            }
        };
        self.send_on(guard, live, event, start).await
    }

    /// Counts a request whose pinned connection died and says so.
    #[cold]
    fn pin_lost(&self, key: &str) -> PoolError {
        self.metrics.pin_lost.increment(1);
        PoolError::PinLost { agent: self.id.to_string(), key: key.to_owned() }
    }

    /// Sends `event` through sticky session `session` (of `sessions`) on its pinned
    /// connection: `start` holds a permit there or names the slot to wait on, and
    /// `generation` is the connection the session is pinned to.
    ///
    /// Nothing of a sticky session lives on its connection but the session itself, so when
    /// that connection is found dead before the event goes out — or dies while this waits for
    /// a permit on it — the session is re-pinned to a healthy connection and the event is sent
    /// there, still within the request's time-out; the route says so. Only when connections
    /// keep dying under it ([`MAX_REPINS`] times in one send) does it give up with
    /// [`PoolError::PinLost`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_sticky(
        &self,
        sessions: &Sticky,
        session: &str,
        start: StickyStart,
        mut generation: u64,
        event: &Event,
        started: Instant,
        mut route: StickyRoute,
    ) -> Result<(Decision, StickyRoute), PoolError> {
        let deadline = started + self.settings.request_timeout;
        let mut at = start;
        let mut moves = 0;
        let (guard, live) = loop {
            // The connection given up, if this turn finds it dead: its label, for the route.
            let lost = match at {
                StickyStart::Held(guard) => {
                    let current = guard.slot.conn.load_full();
                    match current {
                        Some(live) if live.generation == generation && live.conn.is_open() => {
                            break (guard, live);
                        }
                        // Found closed before its supervisor took it out: out of picking at once.
                        Some(ref live) if live.generation == generation => {
                            guard.slot.mark_disconnected();
                            live.conn.label().to_owned()
                        }
                        _ => guard.slot.label().to_string(),
                    }
                }
                StickyStart::Wait(target) => {
                    let Some(agent) = self.agent() else { return Err(Closed::Agent.error(&self.id)) };
                    match agent.wait(Target::Pinned(target.clone(), generation), deadline).await {
                        Waited::Permit(guard) => {
                            at = StickyStart::Held(guard);
                            continue;
                        }
                        Waited::Lost => target.label().to_string(),
                        Waited::Answer(answer) => return answer.map(|d| (d, route)),
                    }
                }
            };
            moves += 1;
            if moves > MAX_REPINS {
                self.metrics.pin_lost.increment(1);
                return Err(PoolError::PinLost { agent: self.id.to_string(), key: session.to_owned() });
            }
            let fresh = self.repin_session(sessions, session)?;
            generation = fresh.generation();
            let to = fresh.label().to_string();
            route = match route {
                // Moved twice in one send: from is still the connection the caller last knew.
                StickyRoute::Repinned { from, .. } => StickyRoute::Repinned { from, to },
                _ => StickyRoute::Repinned { from: lost, to },
            };
            at = StickyStart::Wait(fresh);
        };
        self.send_on(guard, live, event, started).await.map(|d| (d, route))
    }

    /// Moves sticky session `session` to a healthy connection of this agent and returns its
    /// slot; fails if the agent admits nothing or has no healthy connection.
    #[cold]
    fn repin_session(&self, sessions: &Sticky, session: &str) -> Result<Arc<Slot>, PoolError> {
        self.admitting()?;
        let Some(agent) = self.agent() else { return Err(Closed::Agent.error(&self.id)) };
        let Some(fresh) = agent.pinnable_slot() else {
            return Err(self.refuse_unavailable(agent.unavailable_reason()));
        };
        sessions.repin(session, fresh.clone(), self.ctx.clock.stamp(Instant::now()));
        self.metrics.sticky_repins.increment(1);
        Ok(fresh)
    }

    /// Sends `event` on `live`, the open connection of the slot `guard` holds a permit on, and
    /// records the outcome: the part of the send path after the connection is chosen.
    async fn send_on(
        &self,
        mut guard: InFlight,
        live: Arc<Live>,
        event: &Event,
        start: Instant,
    ) -> Result<Decision, PoolError> {
        let kind = event.kind();
        let slot = Arc::clone(&guard.slot);
        if !slot.supports(1 << kind as u8) {
            return Err(PoolError::UnsupportedEvent { agent: self.id.to_string(), kind });
        }
        if let Some(limit) = slot.max_body() {
            let size = (event.body_len() as u64).max(event.declared_body_size().unwrap_or(0));
            if size > limit {
                return Err(PoolError::BodyTooLarge { agent: self.id.to_string(), size, limit });
            }
        }
        let multiplier = slot.timeout_multiplier();
        let timeout = if multiplier > 1.0 {
            self.settings.request_timeout.mul_f32(multiplier)
        } else {
            self.settings.request_timeout
        };
        let deadline = start + timeout;
        let correlation_id = event.correlation_id().clone();
        self.metrics.requests.increment(1);

        // Headers pin the request to this connection before they go out, so events sent
        // concurrently find the pin; the guard removes it if this send does not succeed. A
        // connection that takes no later event of a request (a headers-only agent) needs no pin.
        let pin = if kind == EventKind::RequestHeaders && slot.supports(FOLLOW_UPS) {
            if self.affinity.pin(&correlation_id, &slot, self.ctx.clock.stamp(start)) {
                Some(PinGuard::new(&self.affinity, correlation_id.clone()))
            } else {
                self.metrics.affinity_rejected.increment(1);
                None
            }
        } else {
            None
        };
        // The transport keeps the deadline (the multiplexing ones with one timer per
        // connection, not one per request), and the end of a drain cancels the request on its
        // connection (`Agent::abort_requests`): nothing here watches a timer or a signal.
        let mut answer = live.conn.send_until(event, deadline);
        enum Outcome<T> {
            Answer(T),
            TimedOut,
            /// `told`: the connection has cancelled it already.
            Aborted {
                told: bool,
            },
        }
        // Registered on the connection by now: an abort that told the connections before
        // this registration is seen here (the flag is set before they are told).
        let outcome = if self.aborted.load(Ordering::SeqCst) {
            Outcome::Aborted { told: false }
        } else {
            match (&mut answer).await {
                Err(TransportError::DeadlineExceeded { .. }) => Outcome::TimedOut,
                Err(TransportError::Cancelled(CancelReason::ProxyShutdown))
                    if self.aborted.load(Ordering::SeqCst) =>
                {
                    Outcome::Aborted { told: true }
                }
                // The pool's last handle dropped: its supervisors close the connections as the
                // abort is being made; the request was aborted, not failed by the agent.
                Err(TransportError::Closed { .. }) if self.abort.is_cancelled() => {
                    Outcome::Aborted { told: true }
                }
                r => Outcome::Answer(r),
            }
        };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        let thresholds = &self.ctx.config.health.thresholds;
        let probe = guard.is_probe();
        let result = match outcome {
            Outcome::Answer(Ok(decision)) => {
                if let Some(pin) = pin {
                    pin.keep();
                }
                slot.record(live.generation, now, elapsed, Finished::Succeeded, thresholds);
                slot.endpoint.record(now, true, probe);
                self.metrics.latency.record(elapsed.as_secs_f64());
                guard.settle();
                Ok(decision)
            }
            Outcome::Answer(Err(TransportError::Cancelled(reason))) => {
                Err(PoolError::Cancelled { agent: self.id.to_string(), reason })
            }
            Outcome::Answer(Err(source)) => {
                let err = PoolError::Transport {
                    agent: self.id.to_string(),
                    connection: live.conn.label().to_owned(),
                    source,
                };
                if err.is_agent_failure() {
                    slot.record(live.generation, now, elapsed, Finished::Failed(&err), thresholds);
                    slot.endpoint.record(now, false, probe);
                    self.metrics.failures.increment(1);
                    self.metrics.latency.record(elapsed.as_secs_f64());
                    guard.settle();
                }
                Err(err)
            }
            // The transport has told the agent (see `AgentConnection::send_until`).
            Outcome::TimedOut => {
                let err = PoolError::Timeout { agent: self.id.to_string(), after: timeout };
                slot.record(live.generation, now, elapsed, Finished::TimedOut(&err), thresholds);
                slot.endpoint.record(now, false, probe);
                self.metrics.failures.increment(1);
                self.metrics.timeouts.increment(1);
                guard.settle();
                Err(err)
            }
            Outcome::Aborted { told } => {
                if !told {
                    live.conn.cancel(&correlation_id, CancelReason::ProxyShutdown);
                }
                Err(self.drained())
            }
        };
        drop(answer);
        drop(guard);
        if kind == EventKind::RequestComplete {
            self.affinity.remove(correlation_id.as_str());
        }
        result
    }
}

impl super::Agent {
    /// The whole send through this agent: pick (its pinned connection, or the balancer's),
    /// wait if it must, dispatch. For a caller that holds the agent (a tower service); the
    /// pool's own send picks inside its directory snapshot.
    pub(crate) async fn send(self: &Arc<Self>, event: &Event) -> Result<Decision, PoolError> {
        let start = Instant::now();
        let stamp = self.shared.ctx.clock.stamp(start);
        let (kind, live) = (event.kind(), self.live());
        let pick = match self.try_pick(&live, kind, Some(event.correlation_id()), stamp) {
            Some(guard) => Ok(guard),
            None => self.pick(&live, kind, Some(event.correlation_id()), stamp),
        };
        send_picked(pick, self.id(), event, start).await
    }
}
