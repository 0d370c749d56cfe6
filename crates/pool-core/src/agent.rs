//! One registered agent: its endpoints, connection slots, balancer, and the send path.
//!
//! # How a request flows
//!
//! 1. [`Agent::try_reserve`] loads the agent's snapshot of connected slots (one `ArcSwap`
//!    load), lets the balancer pick among the usable ones (flags, breaker gate, supported
//!    event kind and free capacity are all atomics), and takes a permit with one CAS. A
//!    half-open breaker admits exactly one probe here. Nothing is locked or allocated.
//! 2. If every usable connection is full, the caller waits for a permit (woken by the next
//!    release) until the request's deadline; if none is usable at all, the agent's failure
//!    mode decides: an error, or "allow" (fail open).
//! 3. [`AgentShared::dispatch`] sends on the chosen connection and races the answer against
//!    the deadline (scaled by a degraded agent's multiplier) and the agent's abort signal. A
//!    time-out or abort tells the agent to cancel.
//! 4. The outcome feeds the slot's health window and latency estimate and the endpoint's
//!    breaker; the permit is returned when the [`InFlight`] guard drops — which also happens
//!    if the caller drops the future at any await point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pool_api::{
    AgentConnection, CancelReason, Capabilities, ConfigPush, ConfigUpdateAnswer, ConfigUpdateRequest,
    Connector, CorrelationId, Decision, Endpoint, Event, EventKind, EventSet, StopReport, TransportError,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::{Affinity, Lookup, PinGuard};
use crate::balance::Balancer;
use crate::breaker::Admission;
use crate::config::{AgentSettings, FailureMode, FlowControlMode};
use crate::config_push::PushState;
use crate::directory::{AgentView, Agents};
use crate::endpoint::{BreakerStatus, EndpointState, GATE_EJECTED, GATE_OPEN, GATE_PROBE};
use crate::error::{PoolError, Unavailable};
use crate::health::HealthState;
use crate::metrics::AgentMetrics;
use crate::outlier::{IntervalCounts, OutlierDetector, Verdict};
use crate::pool::PoolCtx;
use crate::slot::{ConnectionHealth, DISCONNECTED, Finished, HARD, InFlight, Live, PAUSED, Slot};
use crate::sticky::StickyRoute;
use crate::supervisor;
use crate::sync::lock_std as lock;
use crate::waiters::Waiters;

/// Attempts at a pick when racing threads take the chosen permit first.
const MAX_RACES: usize = 4;

/// Re-pins one sticky send may make when the connections it is moved to keep dying.
pub(crate) const MAX_REPINS: usize = 4;

/// Where a sticky send starts: a permit already held on the session's connection, or that
/// connection's slot, to wait on.
pub(crate) enum StickyStart {
    /// A permit taken on the pinned connection.
    Held(InFlight),
    /// The pinned connection's slot, all of whose permits were taken.
    Wait(Arc<Slot>),
}

/// Why no permit could be taken right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Usable connections exist but all are at their concurrency limit.
    Full,
    /// No connection accepts this event kind.
    Unsupported,
    /// Every otherwise usable connection is paused by the agent's flow control.
    Paused,
    /// Nothing can take the request.
    Unavailable(Unavailable),
}

/// Why an agent admits nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The pool is shutting down.
    Pool,
    /// The agent is being removed.
    Agent,
}

impl Closed {
    pub(crate) fn error(self, agent: &str) -> PoolError {
        match self {
            Self::Pool => PoolError::ShuttingDown,
            Self::Agent => PoolError::Unavailable { agent: agent.to_owned(), reason: Unavailable::Removed },
        }
    }
}

/// Event kinds that follow a request's headers and go where its headers went: body chunks,
/// response headers and body, completion, WebSocket frames.
const FOLLOW_UPS: u8 = EventSet::ALL.bits() & !(1 << EventKind::RequestHeaders as u8);

/// The outcome of a pick inside the directory snapshot: small, so the hot path moves little.
pub(crate) enum Pick {
    /// A permit on a connection.
    Reserved(InFlight),
    /// No permit now; the agent and why, for the slow path.
    Miss(Arc<Agent>, Reject),
    /// No such agent.
    Unknown,
    /// The agent or pool admits nothing.
    Closed(Closed),
    /// The request is pinned to this slot, which has no permit free right now.
    Pinned(Arc<Agent>, Arc<Slot>),
    /// The request was pinned to a connection that has died.
    PinLost,
}

/// Finishes a send after the pick: waits if it must, then dispatches. Shared by every entry
/// point (the pool, an agent, a tower service without a reservation).
pub(crate) async fn send_picked(
    pick: Pick,
    agent: &str,
    event: Event,
    start: Instant,
) -> Result<Decision, PoolError> {
    let kind = event.kind();
    let guard = match pick {
        Pick::Reserved(guard) => guard,
        Pick::Miss(a, reject) => {
            let deadline = start + a.shared.settings.request_timeout;
            match a.wait_for_permit(reject, Some(kind), deadline).await {
                Ok(guard) => guard,
                Err(answer) => return answer,
            }
        }
        Pick::Pinned(a, slot) => {
            let deadline = start + a.shared.settings.request_timeout;
            match a.shared.reserve_pinned(slot, event.correlation_id(), deadline).await {
                Ok(guard) => guard,
                Err(answer) => return answer,
            }
        }
        Pick::PinLost => {
            return Err(PoolError::PinLost {
                agent: agent.to_owned(),
                key: event.correlation_id().to_string(),
            });
        }
        Pick::Unknown => return Err(PoolError::UnknownAgent { agent: agent.to_owned() }),
        Pick::Closed(closed) => return Err(closed.error(agent)),
    };
    let shared = guard.slot.agent.clone();
    shared.dispatch(guard, event, start).await
}

/// What the in-flight path needs of its agent; held by every slot.
pub(crate) struct AgentShared {
    pub(crate) id: Arc<str>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) settings: AgentSettings,
    pub(crate) ctx: Arc<PoolCtx>,
    /// Fired at the end of a drain: in-flight sends cancel and return.
    pub(crate) abort: CancellationToken,
    /// The agent itself, for re-picking when a reserved connection turns out closed.
    agent: std::sync::OnceLock<std::sync::Weak<Agent>>,
    /// Correlation affinity: which connection each in-progress request is pinned to.
    pub(crate) affinity: Affinity,
    removed: AtomicBool,
    /// Requests refused because no connection could take them (see [`Totals`]).
    unavailable_rejected: AtomicU64,
    /// Requests let through by fail-open because no connection could take them.
    fail_open: AtomicU64,
    /// Requests refused because every usable connection was paused (flow control).
    flow_rejected: AtomicU64,
    /// Requests let through because every usable connection was paused (flow control).
    flow_fail_open: AtomicU64,
    /// Notified when a permit is released or capacity appears, for `waiters`.
    capacity: Notify,
    /// Requests waiting on `capacity`.
    waiters: Waiters,
    /// Notified when a permit is released, for `idle_watchers`.
    idle: Notify,
    /// A drain waiting on `idle` for in-flight requests to finish.
    idle_watchers: Waiters,
}

impl AgentShared {
    /// Called after every permit release.
    #[inline]
    pub(crate) fn permit_released(&self) {
        // The protocol that makes this safe is in `crate::waiters`. One permit freed, one
        // waiter woken: no herd. A woken waiter that has gone away passes it on (tokio's
        // `Notified` forwards an unconsumed `notify_one`).
        if self.waiters.after_release() {
            self.capacity.notify_one();
        }
        if self.idle_watchers.after_release() {
            self.idle.notify_waiters();
        }
    }

    /// Wakes permit waiters after capacity appeared some other way (a new connection, a
    /// resume).
    pub(crate) fn wake_waiters(&self) {
        if self.waiters.any() {
            self.capacity.notify_waiters();
        }
    }

    pub(crate) fn admitting(&self) -> Result<(), PoolError> {
        match self.closed() {
            None => Ok(()),
            Some(closed) => Err(closed.error(&self.id)),
        }
    }

    /// Why nothing is admitted, if so; small, for the hot path. A pool shutting down removes
    /// every agent, and says so before the agent does.
    #[inline]
    pub(crate) fn closed(&self) -> Option<Closed> {
        if !self.ctx.admitting() {
            Some(Closed::Pool)
        } else if self.removed.load(Ordering::Acquire) {
            Some(Closed::Agent)
        } else {
            None
        }
    }

    /// Answers for an agent that cannot take a request, by its failure mode.
    pub(crate) fn unavailable(&self, reason: Unavailable) -> Result<Decision, PoolError> {
        match self.settings.failure_mode {
            FailureMode::Closed => Err(self.refuse_unavailable(reason)),
            FailureMode::Open => {
                self.metrics.unavailable.increment(1);
                self.metrics.fail_open.increment(1);
                self.fail_open.fetch_add(1, Ordering::Relaxed);
                Ok(Decision::allow()
                    .with_tag("agentpool:fail-open")
                    .with_reason(format!("agent {} skipped: {reason}", self.id)))
            }
        }
    }

    /// Counts a request refused because no connection could take it, and says so.
    #[cold]
    pub(crate) fn refuse_unavailable(&self, reason: Unavailable) -> PoolError {
        self.metrics.unavailable.increment(1);
        self.metrics.unavailable_rejected.increment(1);
        self.unavailable_rejected.fetch_add(1, Ordering::Relaxed);
        PoolError::Unavailable { agent: self.id.to_string(), reason }
    }

    /// Counts a request refused because every usable connection was paused by the agent's
    /// flow control — at once (`timed_out` false) or after a wait for a resume ran out — and
    /// says so.
    #[cold]
    pub(crate) fn refuse_paused(&self, timed_out: bool) -> PoolError {
        if timed_out {
            self.metrics.flow_timed_out.increment(1);
        } else {
            self.metrics.flow_rejected.increment(1);
        }
        self.flow_rejected.fetch_add(1, Ordering::Relaxed);
        PoolError::FlowControlPaused { agent: self.id.to_string() }
    }

    fn reject(&self, reject: Reject, kind: Option<EventKind>) -> Result<Decision, PoolError> {
        match reject {
            Reject::Unsupported => Err(PoolError::UnsupportedEvent {
                agent: self.id.to_string(),
                kind: kind.unwrap_or(EventKind::RequestHeaders),
            }),
            Reject::Unavailable(reason) => self.unavailable(reason),
            Reject::Paused => self.paused().unwrap_or_else(|| Err(self.refuse_paused(true))),
            Reject::Full => unreachable!("a full agent is waited for, not rejected"),
        }
    }

    /// The answer to a paused agent by its flow-control mode, or `None` to wait for a resume.
    fn paused(&self) -> Option<Result<Decision, PoolError>> {
        match self.settings.flow_control {
            FlowControlMode::FailClosed => Some(Err(self.refuse_paused(false))),
            FlowControlMode::FailOpen => {
                self.metrics.flow_fail_open.increment(1);
                self.flow_fail_open.fetch_add(1, Ordering::Relaxed);
                Some(Ok(Decision::allow()
                    .with_tag("agentpool:flow-control-open")
                    .with_reason(format!("agent {} skipped: paused by flow control", self.id))))
            }
            FlowControlMode::WaitAndRetry => None,
        }
    }

    /// Waits for a permit on the slot a request is pinned to, applying the flow-control mode if
    /// that connection is paused; fails with [`PoolError::PinLost`] if it dies meanwhile.
    pub(crate) async fn reserve_pinned(
        &self,
        slot: Arc<Slot>,
        key: &CorrelationId,
        deadline: Instant,
    ) -> Result<InFlight, Result<Decision, PoolError>> {
        let generation = slot.generation();
        match self.wait_on_slot(slot, generation, deadline).await? {
            Some(guard) => Ok(guard),
            None => {
                self.metrics.pin_lost.increment(1);
                self.affinity.remove(key.as_str());
                Err(Err(PoolError::PinLost { agent: self.id.to_string(), key: key.to_string() }))
            }
        }
    }

    /// Waits for a permit on `slot` while it holds the connection of `generation`, applying the
    /// flow-control mode if that connection is paused. `Ok(None)`: the slot lost that
    /// connection meanwhile. `Err` is the request's answer: a time-out, shutdown, or the
    /// flow-control mode's verdict.
    async fn wait_on_slot(
        &self,
        slot: Arc<Slot>,
        generation: u64,
        deadline: Instant,
    ) -> Result<Option<InFlight>, Result<Decision, PoolError>> {
        let resume_by = deadline.min(Instant::now() + self.ctx.config.flow_control.wait);
        let _waiter = self.waiters.register();
        let mut waited_for_resume = false;
        loop {
            let notified = self.capacity.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if slot.generation() != generation || !slot.is_connected() {
                return Ok(None);
            }
            let paused = slot.flags() & PAUSED != 0;
            if paused && !waited_for_resume {
                if let Some(answer) = self.paused() {
                    return Err(answer);
                }
                self.metrics.flow_waited.increment(1);
                waited_for_resume = true;
            }
            if !paused && slot.permits.try_acquire() {
                return Ok(Some(InFlight::pinned(slot)));
            }
            let until = if paused { resume_by } else { deadline };
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(until) => {
                    if paused && until < deadline {
                        return Err(self.reject(Reject::Paused, None));
                    }
                    self.metrics.timeouts.increment(1);
                    let after = self.settings.request_timeout;
                    return Err(Err(PoolError::Timeout { agent: self.id.to_string(), after }));
                }
                () = self.abort.cancelled() => return Err(Err(PoolError::ShuttingDown)),
            }
        }
    }

    /// Sends `event` through sticky session `session`, on its pinned connection: `start` holds
    /// a permit there or names the slot to wait on, and `generation` is the connection the
    /// session is pinned to.
    ///
    /// Nothing of a sticky session lives on its connection but the session itself, so when
    /// that connection is found dead before the event goes out — or dies while this waits for
    /// a permit on it — the session is re-pinned to a healthy connection and the event is sent
    /// there, still within the request's time-out; the route says so. Only when connections
    /// keep dying under it ([`MAX_REPINS`] times in one send) does it give up with
    /// [`PoolError::PinLost`].
    pub(crate) async fn dispatch_sticky(
        &self,
        session: &str,
        start: StickyStart,
        mut generation: u64,
        event: Event,
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
                    match self.wait_on_slot(target.clone(), generation, deadline).await {
                        Ok(Some(guard)) => {
                            at = StickyStart::Held(guard);
                            continue;
                        }
                        Ok(None) => target.label().to_string(),
                        Err(answer) => return answer.map(|d| (d, route)),
                    }
                }
            };
            moves += 1;
            if moves > MAX_REPINS {
                self.metrics.pin_lost.increment(1);
                return Err(PoolError::PinLost { agent: self.id.to_string(), key: session.to_owned() });
            }
            let fresh = self.repin_session(session)?;
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
    fn repin_session(&self, session: &str) -> Result<Arc<Slot>, PoolError> {
        self.admitting()?;
        let Some(agent) = self.agent.get().and_then(std::sync::Weak::upgrade) else {
            return Err(Closed::Agent.error(&self.id));
        };
        let Some(fresh) = agent.healthy_slot() else {
            return Err(self.refuse_unavailable(agent.unavailable_reason()));
        };
        self.ctx.sticky.repin(session, fresh.clone(), self.ctx.clock.stamp(Instant::now()));
        self.metrics.sticky_repins.increment(1);
        Ok(fresh)
    }

    /// Sends `event` on the reserved connection and records the outcome. The single send
    /// path: every event kind and every caller (pool, handle, tower service) ends here.
    pub(crate) async fn dispatch(
        &self,
        mut guard: InFlight,
        event: Event,
        start: Instant,
    ) -> Result<Decision, PoolError> {
        let kind = event.kind();
        // A permit taken without looking at affinity (a reservation, a tower service) must
        // still go where the request is pinned.
        if !guard.is_pinned() && kind != EventKind::RequestHeaders && self.affinity.len() > 0 {
            match self.affinity.lookup(event.correlation_id().as_str(), self.ctx.clock.stamp(start)) {
                Lookup::Hit(slot) if !Arc::ptr_eq(&slot, &guard.slot) => {
                    drop(guard);
                    let deadline = start + self.settings.request_timeout;
                    guard = match self.reserve_pinned(slot, event.correlation_id(), deadline).await {
                        Ok(guard) => guard,
                        Err(answer) => return answer,
                    };
                }
                Lookup::Lost => {
                    self.metrics.pin_lost.increment(1);
                    let key = event.correlation_id().to_string();
                    return Err(PoolError::PinLost { agent: self.id.to_string(), key });
                }
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
                    self.metrics.pin_lost.increment(1);
                    self.affinity.remove(event.correlation_id().as_str());
                    let key = event.correlation_id().to_string();
                    return Err(PoolError::PinLost { agent: self.id.to_string(), key });
                }
                _ => {
                    guard.slot.mark_disconnected();
                    drop(guard);
                    let Some(agent) = self.agent.get().and_then(std::sync::Weak::upgrade) else {
                        return Err(Closed::Agent.error(&self.id));
                    };
                    let deadline = start + self.settings.request_timeout;
                    guard = match agent.reserve(Some(kind), deadline).await {
                        Ok(guard) => guard,
                        Err(answer) => return answer,
                    };
                }
            }
        };
        self.send_on(guard, live, event, start).await
    }

    /// Sends `event` on `live`, the open connection of the slot `guard` holds a permit on, and
    /// records the outcome: the part of the send path after the connection is chosen.
    async fn send_on(
        &self,
        mut guard: InFlight,
        live: Arc<Live>,
        event: Event,
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
        // Kept outside the select so a time-out can cancel on the wire before it is dropped.
        let mut answer = live.conn.send(event);
        enum Outcome<T> {
            Answer(T),
            TimedOut,
            Aborted,
        }
        let outcome = tokio::select! {
            biased;
            r = &mut answer => Outcome::Answer(r),
            () = sleep_until(deadline) => Outcome::TimedOut,
            () = self.abort.cancelled() => Outcome::Aborted,
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
            Outcome::TimedOut => {
                live.conn.cancel(&correlation_id, CancelReason::Timeout);
                let err = PoolError::Timeout { agent: self.id.to_string(), after: timeout };
                slot.record(live.generation, now, elapsed, Finished::TimedOut(&err), thresholds);
                slot.endpoint.record(now, false, probe);
                self.metrics.failures.increment(1);
                self.metrics.timeouts.increment(1);
                guard.settle();
                Err(err)
            }
            Outcome::Aborted => {
                live.conn.cancel(&correlation_id, CancelReason::ProxyShutdown);
                Err(PoolError::Transport {
                    agent: self.id.to_string(),
                    connection: live.conn.label().to_owned(),
                    source: TransportError::Cancelled(CancelReason::ProxyShutdown),
                })
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

/// Outlier detection over an agent's replicas: its configured endpoints and, as they come and
/// go, its reverse-connected replicas. Host `i` of the detector is `hosts[i]`.
struct Outliers {
    detector: OutlierDetector,
    hosts: Vec<OutlierHost>,
}

/// One replica as outlier detection sees it.
struct OutlierHost {
    endpoint: Arc<EndpointState>,
    /// Requests and failures of its slots when the last interval ended.
    last_totals: (u64, u64),
}

impl Outliers {
    fn new(cfg: crate::outlier::OutlierConfig, endpoints: &[Arc<EndpointState>]) -> Self {
        Self {
            detector: OutlierDetector::new(cfg, endpoints.len()),
            hosts: endpoints
                .iter()
                .map(|ep| OutlierHost { endpoint: ep.clone(), last_totals: (0, 0) })
                .collect(),
        }
    }

    /// Covers a replica that has just joined, with no requests yet.
    fn add(&mut self, agent: &str, endpoint: Arc<EndpointState>) {
        self.hosts.push(OutlierHost { endpoint, last_totals: (0, 0) });
        let changes = self.detector.resize(self.hosts.len());
        self.apply(agent, changes);
    }

    /// Forgets a replica that has left. If it was the last one in rotation, the ejected replica
    /// due back first returns at once rather than at the next interval.
    fn remove(&mut self, agent: &str, endpoint: &Arc<EndpointState>) {
        let Some(i) = self.hosts.iter().position(|h| Arc::ptr_eq(&h.endpoint, endpoint)) else {
            return;
        };
        let gone = self.hosts.remove(i);
        if gone.endpoint.is_ejected() {
            // Leaves its ejection gauge at 0, not stuck at 1.
            gone.endpoint.set_ejected(false);
        }
        let changes = self.detector.remove(i);
        self.apply(agent, changes);
    }

    /// Mirrors the detector's verdicts into the endpoints' gates.
    fn apply(&self, agent: &str, changes: Vec<(usize, Verdict)>) {
        for (host, verdict) in changes {
            let ejected = verdict == Verdict::Ejected;
            let endpoint = &self.hosts[host].endpoint;
            tracing::warn!(agent, endpoint = %endpoint.endpoint, ejected, "outlier detection");
            endpoint.set_ejected(ejected);
        }
    }
}

/// A registered agent.
pub(crate) struct Agent {
    pub(crate) shared: Arc<AgentShared>,
    balancer: Balancer,
    pub(crate) endpoints: Vec<Arc<EndpointState>>,
    slots: Mutex<Vec<Arc<Slot>>>,
    snapshot: ArcSwap<Vec<Arc<Slot>>>,
    outliers: Mutex<Outliers>,
    /// Stops the supervisors.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Reverse-connection slots, by replica id.
    reverse: Mutex<std::collections::HashMap<String, Arc<Slot>>>,
}

/// How an agent is to be added.
#[derive(Clone)]
pub struct AgentSpec {
    pub(crate) id: String,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) options: crate::config::AgentOptions,
    pub(crate) connector: Option<Arc<dyn Connector>>,
}

impl std::fmt::Debug for AgentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSpec")
            .field("id", &self.id)
            .field("endpoints", &self.endpoints)
            .field("options", &self.options)
            .field("connector", &self.connector.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl AgentSpec {
    /// An agent with the given id and no endpoint yet.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), endpoints: Vec::new(), options: Default::default(), connector: None }
    }

    /// Adds an endpoint (a replica of the agent).
    #[must_use]
    pub fn endpoint(mut self, endpoint: impl Into<Endpoint>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// Adds several endpoints.
    #[must_use]
    pub fn endpoints<E: Into<Endpoint>>(mut self, endpoints: impl IntoIterator<Item = E>) -> Self {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// Sets per-agent overrides of pool settings.
    #[must_use]
    pub fn options(mut self, options: crate::config::AgentOptions) -> Self {
        self.options = options;
        self
    }

    /// Uses this connector for the agent instead of the pool's.
    #[must_use]
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    pub(crate) fn validate(&self, ctx: &PoolCtx) -> Result<AgentSettings, PoolError> {
        let mut problems = Vec::new();
        if self.id.trim().is_empty() {
            problems.push("id: must not be empty".to_owned());
        }
        if self.endpoints.is_empty() {
            problems.push(format!("agent {:?}: endpoints: at least one is required", self.id));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.endpoints {
            if e.as_str().trim().is_empty() {
                problems.push(format!("agent {:?}: endpoints: an endpoint is empty", self.id));
            } else if !seen.insert(e) {
                problems.push(format!("agent {:?}: endpoints: {e} is listed twice", self.id));
            }
        }
        let settings = AgentSettings::resolve(&ctx.config, &self.options);
        match settings {
            Ok(s) if problems.is_empty() => Ok(s),
            Ok(_) => Err(PoolError::InvalidConfig { problems }),
            Err(more) => {
                problems.extend(more.into_iter().map(|p| format!("agent {:?}: {p}", self.id)));
                Err(PoolError::InvalidConfig { problems })
            }
        }
    }
}

/// Statistics of one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentStats {
    /// The agent's id.
    pub id: String,
    /// Per endpoint (replica).
    pub endpoints: Vec<EndpointStats>,
    /// Connection and request counts.
    pub totals: Totals,
    /// True if at least one connection is healthy.
    pub is_healthy: bool,
    /// Capabilities of the first connected slot, if any.
    pub capabilities: Option<Capabilities>,
}

/// Connection and request counts of one agent, or summed over a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connection slots (endpoints × connections per endpoint).
    pub connections: usize,
    /// Slots with a live connection.
    pub connected: usize,
    /// Connected slots that are usable and not unhealthy.
    pub healthy: usize,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests finished.
    pub requests: u64,
    /// Of which failed (errors and time-outs).
    pub failures: u64,
    /// Of which timed out.
    pub timeouts: u64,
    /// Connected slots paused by the agent's flow control.
    pub paused: usize,
    /// Requests pinned to a connection by correlation affinity.
    pub affinity: usize,
    /// Requests refused with [`PoolError::Unavailable`] because no connection could take them
    /// (none up, every breaker open, every instance draining or unhealthy, the agent being
    /// removed), by a send whose agent fails closed, a reservation, or a sticky session that
    /// found no healthy connection to move to. Metric: `agentpool_unavailable_rejected_total`.
    /// Not counted: [`Unavailable::NoCapacity`] (a reservation that found every usable
    /// connection busy).
    pub unavailable_rejected: u64,
    /// Requests answered allow without reaching the agent, because no connection could take
    /// them and the agent fails open (the decision is tagged `agentpool:fail-open`). Metric:
    /// `agentpool_fail_open_total`. `agentpool_unavailable_total` counts this and
    /// [`unavailable_rejected`](Self::unavailable_rejected) together.
    pub fail_open: u64,
    /// Requests refused with [`PoolError::FlowControlPaused`] because every connection that
    /// could take them was paused by the agent's flow control: at once (mode fail-closed, or a
    /// reservation), or after a wait for a resume ran out (mode wait-and-retry). Metric:
    /// `agentpool_flow_control_total` with outcome `rejected` or `timed_out`.
    pub flow_control_rejected: u64,
    /// Requests answered allow without reaching the agent because every connection that could
    /// take them was paused and the flow-control mode fails open (the decision is tagged
    /// `agentpool:flow-control-open`). Metric: `agentpool_flow_control_total` with outcome
    /// `fail_open`.
    pub flow_control_fail_open: u64,
}

impl Totals {
    /// failures / requests; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.failures as f64 / self.requests as f64 }
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.connected += o.connected;
        self.healthy += o.healthy;
        self.in_flight += o.in_flight;
        self.requests += o.requests;
        self.failures += o.failures;
        self.timeouts += o.timeouts;
        self.paused += o.paused;
        self.affinity += o.affinity;
        self.unavailable_rejected += o.unavailable_rejected;
        self.fail_open += o.fail_open;
        self.flow_control_rejected += o.flow_control_rejected;
        self.flow_control_fail_open += o.flow_control_fail_open;
    }
}

/// Statistics of one endpoint of an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointStats {
    /// The endpoint.
    pub endpoint: String,
    /// Its circuit breaker.
    pub breaker: BreakerStatus,
    /// True while ejected by outlier detection.
    pub ejected: bool,
    /// Its connected slots.
    pub connected: usize,
}

impl Agent {
    /// Builds the agent and starts one supervisor per slot. The receivers report whether each
    /// slot's first connection attempt succeeded.
    pub(crate) fn start(
        spec: AgentSpec,
        settings: AgentSettings,
        ctx: Arc<PoolCtx>,
        default_connector: Arc<dyn Connector>,
        parent: &CancellationToken,
    ) -> (Arc<Agent>, Vec<oneshot::Receiver<bool>>) {
        let cfg = &ctx.config;
        let id: Arc<str> = Arc::from(spec.id.as_str());
        let seed = ctx.next_seed();
        let balancer = match seed {
            Some(s) => Balancer::seeded(settings.balancer, s),
            None => Balancer::new(settings.balancer),
        }
        .with_default_rtt(cfg.health.default_rtt);
        let per_endpoint = settings.connections_per_endpoint;
        let shared = Arc::new(AgentShared {
            metrics: AgentMetrics::new(&id),
            id: id.clone(),
            settings,
            ctx: ctx.clone(),
            abort: parent.child_token(),
            agent: std::sync::OnceLock::new(),
            affinity: Affinity::new(cfg.affinity.max_entries, cfg.affinity.ttl),
            removed: AtomicBool::new(false),
            unavailable_rejected: AtomicU64::new(0),
            fail_open: AtomicU64::new(0),
            flow_rejected: AtomicU64::new(0),
            flow_fail_open: AtomicU64::new(0),
            capacity: Notify::new(),
            waiters: Waiters::new(),
            idle: Notify::new(),
            idle_watchers: Waiters::new(),
        });
        let (stop, tasks) = (parent.child_token(), TaskTracker::new());
        let endpoints: Vec<Arc<EndpointState>> = spec
            .endpoints
            .iter()
            .map(|e| {
                Arc::new(EndpointState::new(e.clone(), &cfg.breaker, ctx.next_seed(), &id, &stop, &tasks))
            })
            .collect();
        let slots: Vec<Arc<Slot>> = endpoints
            .iter()
            .flat_map(|ep| {
                (0..per_endpoint).map(|_| {
                    Arc::new(Slot::new(
                        shared.clone(),
                        ep.clone(),
                        shared.settings.max_concurrency,
                        cfg.health.window,
                        cfg.health.buckets,
                        cfg.health.latency_decay,
                    ))
                })
            })
            .collect();
        let outliers = Outliers::new(cfg.outlier.clone(), &endpoints);
        let agent = Arc::new(Agent {
            balancer,
            outliers: Mutex::new(outliers),
            endpoints,
            slots: Mutex::new(slots.clone()),
            snapshot: ArcSwap::from_pointee(Vec::new()),
            stop,
            tasks,
            reverse: Mutex::new(std::collections::HashMap::new()),
            shared,
        });
        let _ = agent.shared.agent.set(Arc::downgrade(&agent));
        let connector = spec.connector.unwrap_or(default_connector);
        let mut firsts = Vec::with_capacity(slots.len());
        for slot in slots {
            let (tx, rx) = oneshot::channel();
            firsts.push(rx);
            agent.tasks.spawn(supervisor::supervise(agent.clone(), slot, connector.clone(), tx));
        }
        (agent, firsts)
    }

    pub(crate) fn id(&self) -> &str {
        &self.shared.id
    }

    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Rebuilds the snapshot of connected slots — the agent's own and its entry in the pool's
    /// directory — when a connection comes or goes.
    pub(crate) fn republish(&self) {
        let directory = &self.shared.ctx.directory;
        let writer = directory.write();
        let live: Arc<Vec<Arc<Slot>>> =
            Arc::new(lock(&self.slots).iter().filter(|s| s.is_connected()).cloned().collect());
        let connected = live.len();
        self.snapshot.store(live.clone());
        let current = writer.current();
        // Only while registered: during add the entry does not exist yet (add copies the
        // snapshot under the same lock), during removal it is already gone.
        if let Some(view) = current.get(&*self.shared.id)
            && std::ptr::eq(Arc::as_ptr(&view.agent), self)
        {
            let mut next = Agents::clone(&current);
            next.insert(self.shared.id.clone(), AgentView { agent: view.agent.clone(), live });
            writer.publish(next);
        }
        drop(writer);
        self.shared.metrics.connections.set(connected as f64);
        self.shared.wake_waiters();
    }

    /// The agent's current connected slots.
    pub(crate) fn live(&self) -> Arc<Vec<Arc<Slot>>> {
        self.snapshot.load_full()
    }

    /// Takes a permit on the best usable connection, without waiting.
    /// `kind: None` reserves for any event kind the connection accepts.
    pub(crate) fn try_reserve(&self, kind: Option<EventKind>) -> Result<InFlight, Reject> {
        self.try_reserve_from(&self.snapshot.load(), kind)
    }

    /// [`try_reserve`](Self::try_reserve) over a snapshot the caller already holds.
    #[inline]
    pub(crate) fn try_reserve_from(
        &self,
        snap: &[Arc<Slot>],
        kind: Option<EventKind>,
    ) -> Result<InFlight, Reject> {
        let kind_bit = kind.map_or(EventSet::ALL.bits(), |k| 1u8 << k as u8);
        for allow_soft in [false, true] {
            for _ in 0..MAX_RACES {
                let Some(i) = self.balancer.pick(snap, |s| s.usable(kind_bit, allow_soft)) else {
                    break;
                };
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
                return Ok(InFlight::new(slot.clone(), probe));
            }
        }
        Err(self.why_not(snap, kind_bit))
    }

    #[cold]
    fn why_not(&self, snap: &[Arc<Slot>], kind_bit: u8) -> Reject {
        if self.shared.removed.load(Ordering::Acquire) {
            return Reject::Unavailable(Unavailable::Removed);
        }
        if snap.is_empty() {
            return Reject::Unavailable(Unavailable::NoConnections);
        }
        let candidates: Vec<&Arc<Slot>> = snap.iter().filter(|s| s.supports(kind_bit)).collect();
        if candidates.is_empty() {
            return Reject::Unsupported;
        }
        let blocked = |s: &Slot| s.flags() & HARD != 0 || s.endpoint.gate() & (GATE_OPEN | GATE_EJECTED) != 0;
        if candidates.iter().any(|s| !blocked(s)) {
            return Reject::Full;
        }
        if candidates.iter().all(|s| s.flags() & DISCONNECTED != 0) {
            return Reject::Unavailable(Unavailable::NoConnections);
        }
        if candidates.iter().all(|s| s.endpoint.gate() & GATE_OPEN != 0) {
            return Reject::Unavailable(Unavailable::CircuitOpen);
        }
        if candidates.iter().any(|s| s.flags() & PAUSED != 0) {
            return Reject::Paused;
        }
        Reject::Unavailable(Unavailable::AgentNotReady)
    }

    /// Reserves a permit, waiting for capacity until `deadline` if every usable connection
    /// is full. `Err(Ok(decision))` is a fail-open answer.
    pub(crate) async fn reserve(
        &self,
        kind: Option<EventKind>,
        deadline: Instant,
    ) -> Result<InFlight, Result<Decision, PoolError>> {
        self.shared.admitting().map_err(Err)?;
        match self.try_reserve(kind) {
            Ok(g) => Ok(g),
            Err(r) => self.wait_for_permit(r, kind, deadline).await,
        }
    }

    /// The slow path after a failed pick: wait for capacity if the agent is merely full,
    /// otherwise answer by the failure mode.
    pub(crate) async fn wait_for_permit(
        &self,
        first: Reject,
        kind: Option<EventKind>,
        deadline: Instant,
    ) -> Result<InFlight, Result<Decision, PoolError>> {
        match first {
            Reject::Full => {}
            Reject::Paused => match self.shared.paused() {
                Some(answer) => return Err(answer),
                None => self.shared.metrics.flow_waited.increment(1),
            },
            other => return Err(self.shared.reject(other, kind)),
        }
        // Waiting for a resume is bounded by the flow-control wait; for a permit, by the
        // request's deadline only.
        let resume_by = deadline.min(Instant::now() + self.shared.ctx.config.flow_control.wait);
        let _waiter = self.shared.waiters.register();
        loop {
            let notified = self.shared.capacity.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let paused = match self.try_reserve(kind) {
                Ok(g) => return Ok(g),
                Err(Reject::Full) => false,
                Err(Reject::Paused) if self.shared.settings.flow_control == FlowControlMode::WaitAndRetry => {
                    true
                }
                Err(r) => return Err(self.shared.reject(r, kind)),
            };
            let until = if paused { resume_by } else { deadline };
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(until) => {
                    if paused && until < deadline {
                        return Err(self.shared.reject(Reject::Paused, kind));
                    }
                    self.shared.metrics.timeouts.increment(1);
                    let after = self.shared.settings.request_timeout;
                    return Err(Err(PoolError::Timeout { agent: self.shared.id.to_string(), after }));
                }
                () = self.shared.abort.cancelled() => return Err(Err(PoolError::ShuttingDown)),
            }
        }
    }

    /// The whole send: pick (its pinned connection, or the balancer's), wait if it must,
    /// dispatch.
    pub(crate) async fn send(self: &Arc<Self>, event: Event) -> Result<Decision, PoolError> {
        let start = Instant::now();
        let stamp = self.shared.ctx.clock.stamp(start);
        let pick = self.pick_in(&self.live(), event.kind(), event.correlation_id(), stamp);
        send_picked(pick, self.id(), event, start).await
    }

    /// Picks inside a directory snapshot: the pool's hot path.
    #[inline]
    pub(crate) fn pick(view: &AgentView, kind: EventKind, id: &CorrelationId, stamp: u64) -> Pick {
        view.agent.pick_in(&view.live, kind, id, stamp)
    }

    /// [`pick_in`](Self::pick_in)'s fast path: a permit on the request's pinned connection or
    /// on the balancer's choice, or `None` for everything else (closed, lost pin, no permit),
    /// which the caller hands to `pick_in` to learn what to do. Returns two words, in
    /// registers, where `Pick` would go through memory.
    #[inline]
    pub(crate) fn try_pick(
        &self,
        live: &[Arc<Slot>],
        kind: EventKind,
        id: &CorrelationId,
        stamp: u64,
    ) -> Option<InFlight> {
        if self.shared.closed().is_some() {
            return None;
        }
        if kind != EventKind::RequestHeaders && self.shared.affinity.len() > 0 {
            match self.shared.affinity.peek(id.as_str(), stamp) {
                Lookup::Hit(slot) => {
                    return (slot.flags() & PAUSED == 0 && slot.permits.try_acquire())
                        .then(|| InFlight::pinned(slot));
                }
                Lookup::Lost => return None,
                Lookup::Miss => {}
            }
        }
        self.try_reserve_from(live, Some(kind)).ok()
    }

    /// Picks for one event: its pinned connection if the request has one, else the balancer's.
    #[inline]
    pub(crate) fn pick_in(
        self: &Arc<Self>,
        live: &[Arc<Slot>],
        kind: EventKind,
        id: &CorrelationId,
        stamp: u64,
    ) -> Pick {
        if let Some(closed) = self.shared.closed() {
            return Pick::Closed(closed);
        }
        if kind != EventKind::RequestHeaders && self.shared.affinity.len() > 0 {
            match self.shared.affinity.lookup(id.as_str(), stamp) {
                Lookup::Hit(slot) => {
                    return if slot.flags() & PAUSED == 0 && slot.permits.try_acquire() {
                        Pick::Reserved(InFlight::pinned(slot))
                    } else {
                        Pick::Pinned(self.clone(), slot)
                    };
                }
                Lookup::Lost => {
                    self.shared.metrics.pin_lost.increment(1);
                    return Pick::PinLost;
                }
                Lookup::Miss => {}
            }
        }
        match self.try_reserve_from(live, Some(kind)) {
            Ok(guard) => Pick::Reserved(guard),
            Err(reject) => Pick::Miss(self.clone(), reject),
        }
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.slots).clone()
    }

    pub(crate) fn in_flight(&self) -> u64 {
        lock(&self.slots).iter().map(|s| u64::from(s.permits.in_flight())).sum()
    }

    /// Waits until nothing is in flight or `deadline` passes; true if idle.
    async fn wait_idle(&self, deadline: Instant) -> bool {
        let _watcher = self.shared.idle_watchers.register();
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return true;
            }
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(deadline) => return self.in_flight() == 0,
            }
        }
    }

    /// Drains and closes the agent: stop admitting, tell the agent, wait for in-flight
    /// requests until `deadline` (returning as soon as there are none), cancel the rest,
    /// stop the supervisors and close every connection.
    pub(crate) async fn shut_down(&self, deadline: Instant) -> StopReport {
        let started = Instant::now();
        self.shared.removed.store(true, Ordering::Release);
        let at_start = self.in_flight();
        for slot in self.slots() {
            if let Some(live) = slot.conn.load_full() {
                live.conn.drain();
            }
        }
        self.wait_idle(deadline).await;
        let forced = self.in_flight();
        if forced > 0 {
            tracing::warn!(agent = %self.id(), forced, "drain deadline passed; cancelling what is left");
        }
        self.shared.abort.cancel();
        // Aborted sends return at once; give them the moment they need.
        self.wait_idle(Instant::now() + Duration::from_secs(1)).await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.republish();
        StopReport { drained: at_start.saturating_sub(forced), forced, elapsed: started.elapsed() }
    }

    /// Re-reads every slot's health window (so idle slots recover), drops idle affinity pins,
    /// and updates gauges.
    pub(crate) fn refresh_health(&self, now: Instant) {
        self.shared.affinity.sweep(self.shared.ctx.clock.stamp(now));
        self.shared.metrics.affinity_entries.set(self.shared.affinity.len() as f64);
        let thresholds = &self.shared.ctx.config.health.thresholds;
        let mut healthy = 0;
        for slot in lock(&self.slots).iter() {
            slot.refresh(now, thresholds);
            if slot_is_healthy(slot) {
                healthy += 1;
            }
        }
        self.shared.metrics.healthy.set(f64::from(healthy));
    }

    /// One outlier-detection interval over the agent's replicas, configured and reverse.
    pub(crate) fn evaluate_outliers(&self, now: Instant) {
        let slots = self.slots();
        let mut o = lock(&self.outliers);
        if o.hosts.len() < 2 {
            return;
        }
        let counts: Vec<IntervalCounts> = o
            .hosts
            .iter_mut()
            .map(|host| {
                let (requests, failures) = slots
                    .iter()
                    .filter(|s| Arc::ptr_eq(&s.endpoint, &host.endpoint))
                    .map(|s| s.totals())
                    .fold((0, 0), |(r, f), (r2, f2, _)| (r + r2, f + f2));
                let (last_r, last_f) = std::mem::replace(&mut host.last_totals, (requests, failures));
                // Saturating: a replica that joined after `slots` was read shows no slot yet.
                let (requests, failures) = (requests.saturating_sub(last_r), failures.saturating_sub(last_f));
                IntervalCounts { successes: requests.saturating_sub(failures), failures }
            })
            .collect();
        let changes = o.detector.evaluate(now, &counts);
        o.apply(self.id(), changes);
    }

    pub(crate) fn stats(&self, now: Instant) -> AgentStats {
        let slots = self.slots();
        let mut t = Totals {
            connections: slots.len(),
            affinity: self.shared.affinity.len(),
            unavailable_rejected: self.shared.unavailable_rejected.load(Ordering::Relaxed),
            fail_open: self.shared.fail_open.load(Ordering::Relaxed),
            flow_control_rejected: self.shared.flow_rejected.load(Ordering::Relaxed),
            flow_control_fail_open: self.shared.flow_fail_open.load(Ordering::Relaxed),
            ..Totals::default()
        };
        let mut capabilities = None;
        for slot in &slots {
            let (r, f, to) = slot.totals();
            t.requests += r;
            t.failures += f;
            t.timeouts += to;
            t.in_flight += u64::from(slot.permits.in_flight());
            if slot.is_connected() {
                t.connected += 1;
                if slot.flags() & PAUSED != 0 {
                    t.paused += 1;
                }
                if capabilities.is_none() {
                    capabilities = slot.capabilities();
                }
            }
            if slot_is_healthy(slot) {
                t.healthy += 1;
            }
        }
        let endpoints = self
            .all_endpoints()
            .iter()
            .map(|ep| EndpointStats {
                endpoint: ep.endpoint.to_string(),
                breaker: ep.breaker.status(now),
                ejected: ep.is_ejected(),
                connected: slots.iter().filter(|s| Arc::ptr_eq(&s.endpoint, ep) && s.is_connected()).count(),
            })
            .collect();
        AgentStats { id: self.id().to_owned(), endpoints, totals: t, is_healthy: t.healthy > 0, capabilities }
    }

    pub(crate) fn health(&self, now: Instant) -> Vec<ConnectionHealth> {
        self.slots().iter().map(|s| s.snapshot(now)).collect()
    }

    /// Adds (or replaces) replica `replica`'s reverse connection as a slot of this agent, and
    /// watches it until it closes.
    pub(crate) fn attach_reverse(self: &Arc<Self>, replica: &str, conn: Arc<dyn AgentConnection>) {
        let ctx = &self.shared.ctx;
        let slot = {
            let mut reverse = lock(&self.reverse);
            let slot = reverse
                .entry(replica.to_owned())
                .or_insert_with(|| {
                    let endpoint = Endpoint::from(format!("reverse://{}/{replica}", self.id()));
                    let ep = Arc::new(EndpointState::new(
                        endpoint,
                        &ctx.config.breaker,
                        ctx.next_seed(),
                        self.id(),
                        &self.stop,
                        &self.tasks,
                    ));
                    let cfg = &ctx.config.health;
                    let slot = Arc::new(Slot::new(
                        self.shared.clone(),
                        ep,
                        self.shared.settings.max_concurrency,
                        cfg.window,
                        cfg.buckets,
                        cfg.latency_decay,
                    ));
                    lock(&self.slots).push(slot.clone());
                    lock(&self.outliers).add(self.id(), slot.endpoint.clone());
                    slot
                })
                .clone();
            // The same replica again: its old connection is replaced, in the same slot.
            if let Some(old) = slot.detach() {
                old.conn.close();
            }
            slot.attach(conn.clone(), Instant::now());
            slot
        };
        self.republish();
        tracing::info!(agent = %self.id(), replica, connection = conn.label(), "reverse connection registered");
        let (agent, replica) = (self.clone(), replica.to_owned());
        self.tasks.spawn(async move { agent.watch_reverse(replica, slot, conn).await });
    }

    /// Runs a reverse connection like a supervisor does, without reconnecting: when it
    /// closes, its replica is removed — unless a newer connection of the replica took the slot.
    async fn watch_reverse(
        self: Arc<Self>,
        replica: String,
        slot: Arc<Slot>,
        conn: Arc<dyn AgentConnection>,
    ) {
        let generation = slot.generation();
        let exit = supervisor::run_connected(&self, &slot, &conn).await;
        if matches!(exit, supervisor::Exit::Stopped) {
            conn.close();
        }
        {
            let mut reverse = lock(&self.reverse);
            if slot.generation() != generation {
                return;
            }
            slot.detach();
            if reverse.get(&replica).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                reverse.remove(&replica);
                lock(&self.slots).retain(|s| !Arc::ptr_eq(s, &slot));
                lock(&self.outliers).remove(self.id(), &slot.endpoint);
            }
        }
        tracing::info!(agent = %self.id(), replica, "reverse connection closed; replica removed");
        self.republish();
    }

    /// Every endpoint: configured ones, then reverse replicas.
    pub(crate) fn all_endpoints(&self) -> Vec<Arc<EndpointState>> {
        let mut all = self.endpoints.clone();
        all.extend(lock(&self.reverse).values().map(|s| s.endpoint.clone()));
        all
    }

    /// Starts one push per endpoint whose connection announces config push; returns their ids.
    pub(crate) fn push_config(
        self: &Arc<Self>,
        kind: &str,
        version: Option<&str>,
        payload: &bytes::Bytes,
    ) -> Vec<u64> {
        let live = self.live();
        let mut ids = Vec::new();
        for ep in &self.all_endpoints() {
            let supports = live.iter().any(|s| {
                Arc::ptr_eq(&s.endpoint, ep) && s.capabilities().is_some_and(|c| c.features.config_push)
            });
            if !supports {
                continue;
            }
            let push_id = self.shared.ctx.pushes.begin();
            let push = ConfigPush {
                push_id,
                kind: kind.to_owned(),
                version: version.map(str::to_owned),
                payload: payload.clone(),
            };
            let (agent, ep) = (self.clone(), ep.clone());
            self.tasks.spawn(async move { agent.run_push(ep, push).await });
            ids.push(push_id);
        }
        ids
    }

    /// One push: send on a live connection of the endpoint, wait for the ack, retry on
    /// time-out or lost connection, record the outcome.
    async fn run_push(&self, endpoint: Arc<EndpointState>, push: ConfigPush) {
        let cfg = &self.shared.ctx.config.config_push;
        let pushes = &self.shared.ctx.pushes;
        let id = push.push_id;
        let mut attempts = 0;
        loop {
            attempts += 1;
            pushes.set(id, PushState::Pending { attempts });
            let conn = self
                .live()
                .iter()
                .filter(|s| Arc::ptr_eq(&s.endpoint, &endpoint))
                .find_map(|s| s.conn.load_full().filter(|l| l.conn.is_open()));
            let problem = match conn {
                None => format!("no live connection to {}", endpoint.endpoint),
                Some(live) => {
                    let attempt = tokio::time::timeout(cfg.ack_timeout, live.conn.push_config(push.clone()));
                    tokio::select! {
                        () = self.stop.cancelled() => {
                            pushes.set(id, PushState::Failed { error: "the pool shut down".into() });
                            return;
                        }
                        r = attempt => match r {
                            Ok(Ok(ack)) if ack.accepted => {
                                pushes.set(id, PushState::Acked);
                                return;
                            }
                            Ok(Ok(ack)) => {
                                let error = ack.error.unwrap_or_else(|| "rejected without a reason".into());
                                pushes.set(id, PushState::Rejected { error });
                                return;
                            }
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no acknowledgement within {:?}", cfg.ack_timeout),
                        },
                    }
                }
            };
            if attempts > cfg.retries {
                pushes.set(id, PushState::Failed { error: problem });
                return;
            }
            tracing::debug!(agent = %self.id(), push = id, %problem, "config push attempt failed; retrying");
            tokio::select! {
                () = self.stop.cancelled() => {
                    pushes.set(id, PushState::Failed { error: "the pool shut down".into() });
                    return;
                }
                () = tokio::time::sleep(cfg.retry_interval) => {}
            }
        }
    }

    /// Answers one agent-initiated update with the pool's handler, on a task of the agent.
    pub(crate) fn answer_update(&self, conn: Arc<dyn AgentConnection>, request: ConfigUpdateRequest) {
        let handler = self.shared.ctx.update_handler.get();
        let agent = self.id().to_owned();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let request_id = request.request_id;
            let answer = match handler {
                Some(h) => tokio::select! {
                    () = stop.cancelled() => return,
                    answer = h.handle(agent, request) => answer,
                },
                None => ConfigUpdateAnswer {
                    request_id,
                    accepted: false,
                    error: Some("no configuration update handler is registered".into()),
                },
            };
            conn.answer_config_update(ConfigUpdateAnswer { request_id, ..answer });
        });
    }

    /// A healthy connected slot, chosen by the balancer (capacity aside): for pinning a
    /// sticky session.
    pub(crate) fn healthy_slot(&self) -> Option<Arc<Slot>> {
        let live = self.live();
        let healthy = |s: &Arc<Slot>| {
            s.is_open()
                && s.flags() & (HARD | crate::slot::SOFT_UNHEALTHY) == 0
                && s.endpoint.gate() & (GATE_OPEN | GATE_EJECTED) == 0
                && s.health_state() != HealthState::Unhealthy
        };
        self.balancer.pick(&live[..], healthy).map(|i| live[i].clone())
    }

    /// Why no slot could be pinned or picked, for errors.
    pub(crate) fn unavailable_reason(&self) -> Unavailable {
        match self.why_not(&self.live(), EventSet::ALL.bits()) {
            Reject::Unavailable(reason) => reason,
            Reject::Paused | Reject::Full | Reject::Unsupported => Unavailable::AgentNotReady,
        }
    }

    /// Cancels a request: on the connection it is pinned to, or — when it has no pin (over the
    /// affinity cap) — on every connection, where only the one carrying it acts.
    pub(crate) fn cancel(&self, id: &CorrelationId, reason: CancelReason) {
        if let Some(slot) = self.shared.affinity.slot_of(id.as_str()) {
            if let Some(live) = slot.conn.load_full() {
                live.conn.cancel(id, reason);
            }
            return;
        }
        for slot in self.live().iter() {
            if let Some(live) = slot.conn.load_full() {
                live.conn.cancel(id, reason);
            }
        }
    }

    pub(crate) fn capabilities(&self) -> Option<Capabilities> {
        self.snapshot.load().iter().find_map(|s| s.capabilities())
    }

    pub(crate) fn supports(&self, kind: EventKind) -> bool {
        self.snapshot.load().iter().any(|s| s.supports(1 << kind as u8))
    }
}

fn slot_is_healthy(slot: &Slot) -> bool {
    slot.is_connected()
        && slot.flags() & HARD == 0
        && slot.endpoint.gate() & (GATE_OPEN | GATE_EJECTED) == 0
        && slot.health_state() != HealthState::Unhealthy
}
