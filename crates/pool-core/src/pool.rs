//! The pool: a registry of agents and the public API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pool_api::{
    CancelReason, Capabilities, Connector, CorrelationId, Decision, Event, EventKind, Hello, StopReport,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, AgentSpec, AgentStats, Closed, Pick, Reject, StickyStart, Totals, send_picked};
use crate::config::PoolConfig;
use crate::config_push::{ConfigUpdateHandler, PushCounts, PushState, Pushes, UpdateHandlerSlot};
use crate::directory::{AgentView, Agents, Directory};
use crate::error::PoolError;
use crate::service::AgentService;
use crate::slot::{ConnectionHealth, InFlight};
use crate::sticky::{Sticky, StickyRoute};

/// A sticky send's agent, connection slot and route.
type StickyPick = (Arc<Agent>, Arc<crate::slot::Slot>, StickyRoute);

/// What every agent of a pool shares: its configuration and admission state.
/// The pool's clock for idle time-outs: stamps are nanoseconds since the pool was built. A
/// coarse reading, advanced by maintenance every health bucket, serves lookups that have no
/// request start time at hand (an `Instant::now()` costs more than the lookup itself).
pub(crate) struct Clock {
    epoch: Instant,
    coarse: AtomicU64,
}

impl Clock {
    pub(crate) fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn coarse(&self) -> u64 {
        self.coarse.load(Ordering::Relaxed)
    }

    pub(crate) fn advance(&self, now: Instant) {
        self.coarse.fetch_max(self.stamp(now), Ordering::Relaxed);
    }
}

pub(crate) struct PoolCtx {
    pub(crate) config: PoolConfig,
    pub(crate) clock: Clock,
    pub(crate) hello: Hello,
    pub(crate) directory: Directory,
    pub(crate) sticky: Sticky,
    pub(crate) pushes: Pushes,
    pub(crate) update_handler: UpdateHandlerSlot,
    admitting: AtomicBool,
    seeds: AtomicU64,
}

impl PoolCtx {
    pub(crate) fn admitting(&self) -> bool {
        self.admitting.load(Ordering::Acquire)
    }

    /// A fresh seed derived from the configured one, or `None` when unseeded.
    pub(crate) fn next_seed(&self) -> Option<u64> {
        let base = self.config.seed?;
        let n = self.seeds.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of (seed + n): distinct, well-mixed seeds per component.
        let mut z = base.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Some(z ^ (z >> 31))
    }
}

pub(crate) struct PoolInner {
    ctx: Arc<PoolCtx>,
    connector: Arc<dyn Connector>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Stops maintenance and every supervisor (they hold child tokens).
        self.cancel.cancel();
    }
}

/// A pool of connections to external processing agents.
///
/// Cloning is cheap and every clone is the same pool. The pool's background work — one
/// supervisor per connection slot and one maintenance task — runs from construction until
/// [`shutdown`](AgentPool::shutdown) or until the last clone is dropped.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for AgentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPool").field("agents", &self.agent_ids()).finish_non_exhaustive()
    }
}

/// What [`AgentPool::add_agent`] found when it first connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddReport {
    /// Connection slots of the agent.
    pub slots: usize,
    /// Of which connected on the first attempt. 0 means the agent is registered but
    /// unreachable; it is retried in the background until it comes up.
    pub connected: usize,
}

/// Pool-wide statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStats {
    /// Registered agents.
    pub agents: usize,
    /// Sticky sessions held.
    pub sticky_sessions: usize,
    /// Connection and request counts summed over every agent.
    pub totals: Totals,
    /// False once shutdown has begun.
    pub admitting: bool,
}

/// An established connection an agent opened to the proxy, as a transport's listener hands
/// it over.
pub struct ReverseRegistration {
    /// The agent it belongs to.
    pub agent_id: String,
    /// Which instance of the agent (stable across its reconnects).
    pub replica_id: String,
    /// The token it presented.
    pub token: Option<String>,
    /// The connection, handshake done.
    pub connection: Arc<dyn pool_api::AgentConnection>,
}

impl std::fmt::Debug for ReverseRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReverseRegistration")
            .field("agent_id", &self.agent_id)
            .field("replica_id", &self.replica_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connection", &self.connection.label())
            .finish()
    }
}

/// A permit on one connection of an agent, taken by [`AgentPool::try_reserve`].
///
/// Sending consumes it; dropping it gives the permit back.
pub struct Reservation {
    guard: InFlight,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("connection", &self.guard.slot.label()).finish()
    }
}

impl Reservation {
    pub(crate) fn new(guard: InFlight) -> Self {
        Self { guard }
    }

    /// The label of the reserved connection.
    pub fn connection(&self) -> String {
        self.guard.slot.label().to_string()
    }

    /// Sends `event` on the reserved connection. The request time-out counts from here.
    pub async fn send(self, event: Event) -> Result<Decision, PoolError> {
        let agent = self.guard.slot.agent.clone();
        agent.dispatch(self.guard, event, Instant::now()).await
    }
}

impl AgentPool {
    /// Builds a pool that opens connections with `connector`. Must be called inside a tokio
    /// runtime: the maintenance task starts here.
    pub fn new(config: PoolConfig, connector: impl Connector) -> Result<Self, PoolError> {
        Self::with_connector(config, Arc::new(connector))
    }

    /// [`new`](Self::new) with a shared connector.
    pub fn with_connector(config: PoolConfig, connector: Arc<dyn Connector>) -> Result<Self, PoolError> {
        config.validate()?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| PoolError::NoRuntime)?;
        crate::metrics::describe();
        let ctx = Arc::new(PoolCtx {
            clock: Clock { epoch: Instant::now(), coarse: AtomicU64::new(0) },
            hello: Hello::new(config.proxy_id.clone()),
            directory: Directory::new(),
            sticky: Sticky::new(config.sticky.idle_timeout),
            pushes: Pushes::new(),
            update_handler: UpdateHandlerSlot::default(),
            config,
            admitting: AtomicBool::new(true),
            seeds: AtomicU64::new(0),
        });
        let inner = Arc::new(PoolInner {
            ctx,
            connector,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let maintenance = crate::maintenance::run(
            weak(Arc::downgrade(&inner)),
            inner.cancel.clone(),
            inner.ctx.config.clone(),
        );
        inner.tasks.spawn_on(maintenance, &handle);
        Ok(Self { inner })
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.ctx.config
    }

    /// Registers an agent and opens its connections.
    ///
    /// Every endpoint is first checked by the connector that will dial it (the agent's own, or
    /// the pool's) with [`Connector::validate_endpoint`]: a malformed endpoint, or one of a
    /// scheme the connector does not serve, fails with [`PoolError::InvalidEndpoint`] and
    /// nothing is registered or dialled.
    ///
    /// Returns once every slot's first connection attempt has finished (each bounded by the
    /// connect and handshake time-outs). An agent that cannot be reached is still registered
    /// — unhealthy, with [`AddReport::connected`] 0 — and its supervisors keep retrying.
    pub async fn add_agent(&self, spec: AgentSpec) -> Result<AddReport, PoolError> {
        let ctx = &self.inner.ctx;
        if !ctx.admitting() {
            return Err(PoolError::ShuttingDown);
        }
        let settings = spec.validate(ctx)?;
        let connector = spec.connector.as_ref().unwrap_or(&self.inner.connector);
        for endpoint in &spec.endpoints {
            connector
                .validate_endpoint(endpoint)
                .map_err(|source| PoolError::InvalidEndpoint { agent: spec.id.clone(), source })?;
        }
        let id: Arc<str> = Arc::from(spec.id.as_str());
        let firsts = {
            let writer = ctx.directory.write();
            let current = writer.current();
            if current.contains_key(&id) {
                return Err(PoolError::AgentExists { agent: spec.id });
            }
            let (agent, firsts) =
                Agent::start(spec, settings, ctx.clone(), self.inner.connector.clone(), &self.inner.cancel);
            let mut next = Agents::clone(&current);
            // Supervisors that connected already updated the agent's own snapshot under this lock.
            let live = agent.live();
            next.insert(id, AgentView { agent, live });
            writer.publish(next);
            firsts
        };
        let slots = firsts.len();
        let mut connected = 0;
        for rx in firsts {
            if rx.await == Ok(true) {
                connected += 1;
            }
        }
        Ok(AddReport { slots, connected })
    }

    /// Removes an agent gracefully: no new requests, in-flight ones may finish until the
    /// drain time-out, then what is left is cancelled and the connections are closed.
    pub async fn remove_agent(&self, id: &str) -> Result<StopReport, PoolError> {
        let agent = {
            let writer = self.inner.ctx.directory.write();
            let current = writer.current();
            let Some(view) = current.get(id) else {
                return Err(self.unknown(id));
            };
            let agent = view.agent.clone();
            let mut next = Agents::clone(&current);
            next.remove(id);
            writer.publish(next);
            agent
        };
        self.inner.ctx.sticky.remove_agent(id);
        Ok(agent.shut_down(Instant::now() + self.inner.ctx.config.drain_timeout).await)
    }

    /// Removes every agent, draining them in parallel; the reports are summed.
    pub async fn remove_all(&self) -> StopReport {
        let agents: Vec<Arc<Agent>> = {
            let writer = self.inner.ctx.directory.write();
            let current = writer.current();
            writer.publish(Agents::default());
            current.values().map(|v| v.agent.clone()).collect()
        };
        drain_all(agents, Instant::now() + self.inner.ctx.config.drain_timeout).await
    }

    /// The error for an agent id the directory does not hold: after shutdown began the
    /// directory is emptied, and the truth is that the pool admits nothing, whatever the name.
    #[cold]
    fn unknown(&self, id: &str) -> PoolError {
        if self.inner.ctx.admitting() {
            PoolError::UnknownAgent { agent: id.to_owned() }
        } else {
            PoolError::ShuttingDown
        }
    }

    /// [`unknown`](Self::unknown) as a pick.
    #[cold]
    fn unknown_pick(&self) -> Pick {
        if self.inner.ctx.admitting() { Pick::Unknown } else { Pick::Closed(Closed::Pool) }
    }

    /// A precise clock stamp of now.
    fn now(&self) -> u64 {
        self.inner.ctx.clock.stamp(Instant::now())
    }

    fn directory(&self) -> &Directory {
        &self.inner.ctx.directory
    }

    /// True if an agent with this id is registered.
    pub fn has_agent(&self, id: &str) -> bool {
        self.directory().with(|a| a.contains_key(id))
    }

    /// Ids of the registered agents, sorted.
    pub fn agent_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.directory().load().keys().map(|k| k.to_string()).collect();
        ids.sort();
        ids
    }

    /// Number of registered agents.
    pub fn agent_count(&self) -> usize {
        self.directory().with(|a| a.len())
    }

    fn agent(&self, id: &str) -> Result<Arc<Agent>, PoolError> {
        self.directory().with(|a| a.get(id).map(|v| v.agent.clone())).ok_or_else(|| self.unknown(id))
    }

    /// Statistics of one agent.
    pub fn agent_stats(&self, id: &str) -> Option<AgentStats> {
        self.agent(id).ok().map(|a| a.stats(Instant::now()))
    }

    /// Statistics of every agent, sorted by id.
    pub fn all_agent_stats(&self) -> Vec<AgentStats> {
        let now = Instant::now();
        let mut all: Vec<AgentStats> = self.directory().load().values().map(|v| v.agent.stats(now)).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Pool-wide statistics.
    pub fn stats(&self) -> PoolStats {
        let all = self.all_agent_stats();
        let mut totals = Totals::default();
        for a in &all {
            totals += a.totals;
        }
        PoolStats {
            agents: all.len(),
            sticky_sessions: self.inner.ctx.sticky.len(),
            totals,
            admitting: self.inner.ctx.admitting(),
        }
    }

    /// Health of each connection slot of an agent.
    pub fn health(&self, id: &str) -> Option<Vec<ConnectionHealth>> {
        self.agent(id).ok().map(|a| a.health(Instant::now()))
    }

    /// True if the agent has at least one healthy connection.
    pub fn is_agent_healthy(&self, id: &str) -> bool {
        self.agent_stats(id).is_some_and(|s| s.is_healthy)
    }

    /// Capabilities an agent announced (from one of its live connections).
    pub fn capabilities(&self, id: &str) -> Option<Capabilities> {
        self.agent(id).ok().and_then(|a| a.capabilities())
    }

    /// True if some live connection of the agent accepts events of `kind`.
    pub fn supports(&self, id: &str, kind: EventKind) -> bool {
        self.agent(id).is_ok_and(|a| a.supports(kind))
    }

    /// Sends one event to an agent and returns its decision.
    ///
    /// The connection is chosen by the agent's balancer among usable ones; the whole call,
    /// waiting for a permit included, is bounded by the request time-out. An agent that
    /// cannot take the request answers by its failure mode: an error, or allow (fail open).
    pub async fn send(&self, agent: &str, event: Event) -> Result<Decision, PoolError> {
        let start = Instant::now();
        // The fast path picks inside the directory snapshot; only a miss clones the agent.
        let stamp = self.inner.ctx.clock.stamp(start);
        let pick = self.directory().with(|agents| {
            agents.get(agent).map_or_else(
                || self.unknown_pick(),
                |view| Agent::pick(view, event.kind(), event.correlation_id(), stamp),
            )
        });
        send_picked(pick, agent, event, start).await
    }

    /// Takes a permit on the best connection of an agent for an event of `kind`, without
    /// waiting: the pick path alone (lookup, breaker, balancer, permit). Fails with
    /// [`PoolError::Unavailable`] when nothing can take it — also when every usable
    /// connection is full — regardless of the failure mode.
    pub fn try_reserve(&self, agent: &str, kind: EventKind) -> Result<Reservation, PoolError> {
        // The hot path hands back a bare `Option<InFlight>` (two words, returned in registers);
        // anything else — including why it failed — is the cold path's business.
        let fast = self.directory().with(|agents| {
            let view = agents.get(agent)?;
            if view.agent.shared.closed().is_some() {
                return None;
            }
            view.agent.try_reserve_from(&view.live, Some(kind)).ok()
        });
        match fast {
            Some(guard) => Ok(Reservation::new(guard)),
            None => self.try_reserve_slow(agent, kind),
        }
    }

    /// [`try_reserve`](Self::try_reserve) after its fast attempt failed: one more attempt that
    /// keeps the reason, so the error says why.
    #[cold]
    #[inline(never)]
    fn try_reserve_slow(&self, agent: &str, kind: EventKind) -> Result<Reservation, PoolError> {
        let pick = self.directory().with(|agents| {
            agents.get(agent).map_or(Pick::Unknown, |view| match view.agent.shared.closed() {
                Some(closed) => Pick::Closed(closed),
                None => match view.agent.try_reserve_from(&view.live, Some(kind)) {
                    Ok(guard) => Pick::Reserved(guard),
                    Err(reject) => Pick::Miss(view.agent.clone(), reject),
                },
            })
        });
        match pick {
            Pick::Reserved(guard) => Ok(Reservation::new(guard)),
            Pick::Unknown => Err(self.unknown(agent)),
            Pick::Closed(closed) => Err(closed.error(agent)),
            Pick::Miss(a, reject) => Err(Self::reject_error(&a, kind, reject)),
            Pick::Pinned(..) | Pick::PinLost => unreachable!("no affinity without a correlation id"),
        }
    }

    /// [`try_reserve`](Self::try_reserve) for one event of request `correlation_id`: if the
    /// request is pinned by affinity (and `kind` is not its headers), the permit is taken on
    /// its pinned connection — or [`PoolError::PinLost`] if that connection has died. The pin
    /// is touched at the maintenance clock (to within one health bucket).
    pub fn try_reserve_for(
        &self,
        agent: &str,
        kind: EventKind,
        correlation_id: &CorrelationId,
    ) -> Result<Reservation, PoolError> {
        let stamp = self.inner.ctx.clock.coarse();
        let fast = self.directory().with(|agents| {
            let view = agents.get(agent)?;
            view.agent.try_pick(&view.live, kind, correlation_id, stamp)
        });
        if let Some(guard) = fast {
            return Ok(Reservation::new(guard));
        }
        self.try_reserve_for_slow(agent, kind, correlation_id, stamp)
    }

    /// [`try_reserve_for`](Self::try_reserve_for) after its fast attempt failed: one more
    /// attempt that keeps the reason, so the error says why.
    #[cold]
    #[inline(never)]
    fn try_reserve_for_slow(
        &self,
        agent: &str,
        kind: EventKind,
        correlation_id: &CorrelationId,
        stamp: u64,
    ) -> Result<Reservation, PoolError> {
        let pick = self.directory().with(|agents| {
            agents.get(agent).map_or(Pick::Unknown, |view| Agent::pick(view, kind, correlation_id, stamp))
        });
        match pick {
            Pick::Reserved(guard) => Ok(Reservation::new(guard)),
            Pick::Unknown => Err(self.unknown(agent)),
            Pick::Closed(closed) => Err(closed.error(agent)),
            Pick::Miss(a, reject) => Err(Self::reject_error(&a, kind, reject)),
            Pick::Pinned(..) => Err(PoolError::Unavailable {
                agent: agent.to_owned(),
                reason: crate::error::Unavailable::NoCapacity,
            }),
            Pick::PinLost => {
                Err(PoolError::PinLost { agent: agent.to_owned(), key: correlation_id.to_string() })
            }
        }
    }

    #[cold]
    fn reject_error(agent: &Agent, kind: EventKind, reject: Reject) -> PoolError {
        let id = agent.id();
        match reject {
            Reject::Unsupported => PoolError::UnsupportedEvent { agent: id.to_owned(), kind },
            Reject::Full => {
                PoolError::Unavailable { agent: id.to_owned(), reason: crate::error::Unavailable::NoCapacity }
            }
            Reject::Paused => agent.shared.refuse_paused(false),
            Reject::Unavailable(reason) => agent.shared.refuse_unavailable(reason),
        }
    }

    /// Cancels one request of an agent, with a reason: the agent is told on the connection that
    /// carries the request, and its pending call fails with [`PoolError::Cancelled`]. Other
    /// requests on that connection are untouched.
    pub fn cancel(
        &self,
        agent: &str,
        correlation_id: &CorrelationId,
        reason: CancelReason,
    ) -> Result<(), PoolError> {
        self.agent(agent)?.cancel(correlation_id, reason);
        Ok(())
    }

    /// Removes a request's affinity pin; true if it had one. Sending `RequestComplete` does this
    /// on its own.
    pub fn clear_affinity(&self, agent: &str, correlation_id: &str) -> bool {
        self.agent(agent).is_ok_and(|a| a.shared.affinity.remove(correlation_id))
    }

    /// Requests pinned by correlation affinity, over every agent.
    pub fn affinity_count(&self) -> usize {
        self.directory().load().values().map(|v| v.agent.shared.affinity.len()).sum()
    }

    /// Creates — or replaces — a sticky session pinning `session_id` to one healthy connection
    /// of `agent`, for a WebSocket, SSE stream or long poll.
    pub fn create_sticky_session(&self, session_id: &str, agent: &str) -> Result<(), PoolError> {
        let a = self.agent(agent)?;
        a.shared.admitting()?;
        let Some(slot) = a.healthy_slot() else {
            return Err(PoolError::Unavailable { agent: agent.to_owned(), reason: a.unavailable_reason() });
        };
        self.inner.ctx.sticky.insert(session_id, a.shared.id.clone(), slot, self.now());
        Ok(())
    }

    /// Sends `event` to `agent` through sticky session `session_id`, returning the decision and
    /// how it was routed. A session whose pinned connection died or turned unhealthy is
    /// re-pinned to a healthy one ([`StickyRoute::Repinned`]) — also when the connection dies
    /// between the moment this send chose it and the moment the event would have gone out, or
    /// while this send waits for a permit on it; the event then goes to the new connection.
    /// Without a live session of that id for that agent the event is balanced like any other
    /// ([`StickyRoute::NoSession`]).
    pub async fn send_sticky(
        &self,
        session_id: &str,
        agent: &str,
        event: Event,
    ) -> Result<(Decision, StickyRoute), PoolError> {
        let start = Instant::now();
        let stamp = self.inner.ctx.clock.stamp(start);
        if let Some(guard) = self.inner.ctx.sticky.try_reserve(session_id, agent, stamp) {
            let shared = guard.slot.agent.clone();
            // Read at once after the session was found on it: the connection it is pinned to.
            let generation = guard.slot.generation();
            let held = StickyStart::Held(guard);
            return shared
                .dispatch_sticky(session_id, held, generation, event, start, StickyRoute::Pinned)
                .await;
        }
        let Some((a, slot, route)) = self.sticky_route(session_id, agent, stamp)? else {
            return Ok((self.send(agent, event).await?, StickyRoute::NoSession));
        };
        let generation = slot.generation();
        a.shared.dispatch_sticky(session_id, StickyStart::Wait(slot), generation, event, start, route).await
    }

    /// Takes a permit on sticky session `session_id`'s connection without waiting (re-pinning
    /// it first if that connection died or turned unhealthy). Without a live session of that
    /// id for that agent it reserves like [`try_reserve`](Self::try_reserve). The session is
    /// touched at the maintenance clock (to within one health bucket).
    pub fn try_reserve_sticky(
        &self,
        session_id: &str,
        agent: &str,
        kind: EventKind,
    ) -> Result<(Reservation, StickyRoute), PoolError> {
        let stamp = self.inner.ctx.clock.coarse();
        if let Some(guard) = self.inner.ctx.sticky.try_reserve(session_id, agent, stamp) {
            return Ok((Reservation::new(guard), StickyRoute::Pinned));
        }
        self.try_reserve_sticky_slow(session_id, agent, kind, stamp)
    }

    /// [`try_reserve_sticky`](Self::try_reserve_sticky) after its fast attempt failed: the
    /// full route (re-pinning if it must), with the reason if nothing can be taken.
    #[cold]
    #[inline(never)]
    fn try_reserve_sticky_slow(
        &self,
        session_id: &str,
        agent: &str,
        kind: EventKind,
        stamp: u64,
    ) -> Result<(Reservation, StickyRoute), PoolError> {
        let Some((a, slot, route)) = self.sticky_route(session_id, agent, stamp)? else {
            return Ok((self.try_reserve(agent, kind)?, StickyRoute::NoSession));
        };
        if slot.flags() & crate::slot::PAUSED != 0 {
            return Err(a.shared.refuse_paused(false));
        }
        if !slot.permits.try_acquire() {
            let reason = crate::error::Unavailable::NoCapacity;
            return Err(PoolError::Unavailable { agent: a.id().to_owned(), reason });
        }
        Ok((Reservation::new(InFlight::pinned(slot)), route))
    }

    /// Where a sticky send goes: the session's connection, or a fresh healthy one it has just
    /// been re-pinned to; `None` without a live session of that id for that agent.
    fn sticky_route(
        &self,
        session_id: &str,
        agent: &str,
        stamp: u64,
    ) -> Result<Option<StickyPick>, PoolError> {
        let sticky = &self.inner.ctx.sticky;
        let Some((_, pinned, healthy)) = sticky.lookup(session_id, stamp).filter(|(a, ..)| &**a == agent)
        else {
            return Ok(None);
        };
        let a = self.agent(agent)?;
        a.shared.admitting()?;
        if healthy {
            return Ok(Some((a, pinned, StickyRoute::Pinned)));
        }
        let Some(fresh) = a.healthy_slot() else {
            return Err(a.shared.refuse_unavailable(a.unavailable_reason()));
        };
        sticky.repin(session_id, fresh.clone(), stamp);
        a.shared.metrics.sticky_repins.increment(1);
        let route = StickyRoute::Repinned { from: pinned.label().to_string(), to: fresh.label().to_string() };
        Ok(Some((a, fresh, route)))
    }

    /// Marks a sticky session used now; false if it does not exist or has expired.
    pub fn refresh_sticky_session(&self, session_id: &str) -> bool {
        self.inner.ctx.sticky.refresh(session_id, self.now())
    }

    /// True if the sticky session exists and has not expired.
    pub fn has_sticky_session(&self, session_id: &str) -> bool {
        self.inner.ctx.sticky.has(session_id, self.now())
    }

    /// Ends a sticky session; true if it existed.
    pub fn clear_sticky_session(&self, session_id: &str) -> bool {
        self.inner.ctx.sticky.remove(session_id)
    }

    /// Sticky sessions held (expired ones count until swept).
    pub fn sticky_session_count(&self) -> usize {
        self.inner.ctx.sticky.len()
    }

    /// The agent a live sticky session belongs to.
    pub fn sticky_session_agent(&self, session_id: &str) -> Option<String> {
        self.inner.ctx.sticky.agent_of(session_id, self.now())
    }

    /// Removes expired sticky sessions now (maintenance also does, every health bucket);
    /// returns how many.
    pub fn cleanup_expired_sessions(&self) -> usize {
        self.inner.ctx.sticky.sweep(self.now())
    }

    /// Pushes configuration to every endpoint of `agent` whose connection announces the
    /// `config_push` feature; returns the push ids (none if no endpoint supports it). Each push
    /// is sent, acknowledged or rejected by the agent, and retried on ack time-out as
    /// configured; follow it with [`push_state`](Self::push_state) or
    /// [`wait_push`](Self::wait_push).
    pub fn push_config(
        &self,
        agent: &str,
        kind: &str,
        version: Option<&str>,
        payload: bytes::Bytes,
    ) -> Result<Vec<u64>, PoolError> {
        let a = self.agent(agent)?;
        a.shared.admitting()?;
        Ok(a.push_config(kind, version, &payload))
    }

    /// [`push_config`](Self::push_config) to every agent that supports it; returns
    /// `(agent, push id)` pairs.
    pub fn push_config_to_all(
        &self,
        kind: &str,
        version: Option<&str>,
        payload: bytes::Bytes,
    ) -> Vec<(String, u64)> {
        let mut ids = Vec::new();
        for view in self.directory().load().values() {
            if view.agent.shared.admitting().is_ok() {
                let agent = view.agent.id().to_owned();
                ids.extend(
                    view.agent.push_config(kind, version, &payload).into_iter().map(|id| (agent.clone(), id)),
                );
            }
        }
        ids.sort();
        ids
    }

    /// Where push `id` is; `None` for an unknown (or long-forgotten) id.
    pub fn push_state(&self, id: u64) -> Option<PushState> {
        self.inner.ctx.pushes.state(id)
    }

    /// Waits until push `id` is acked, rejected or failed, and returns that outcome.
    pub async fn wait_push(&self, id: u64) -> Option<PushState> {
        let mut rx = self.inner.ctx.pushes.watch(id)?;
        let state = rx.wait_for(PushState::is_final).await.ok()?.clone();
        Some(state)
    }

    /// Pushes pending, acked, rejected and failed since the pool started.
    pub fn push_counts(&self) -> PushCounts {
        self.inner.ctx.pushes.counts()
    }

    /// Registers the handler of agent-initiated configuration updates (replacing any other);
    /// `None` removes it, after which such requests are answered "rejected".
    pub fn set_config_update_handler(&self, handler: Option<Arc<dyn ConfigUpdateHandler>>) {
        self.inner.ctx.update_handler.set(handler);
    }

    /// Adds a connection an agent opened to the proxy (accepted and handshaken by a transport's
    /// listener) to that agent — registering the agent, with the pool's defaults, if it is not
    /// registered yet. The token is checked in constant time against
    /// [`ReverseConfig::tokens`](crate::ReverseConfig) and the agent id against the allow-list.
    /// A replica registering again replaces its earlier connection; a replica whose connection
    /// closes is removed.
    pub fn add_reverse_connection(&self, registration: ReverseRegistration) -> Result<(), PoolError> {
        let ctx = &self.inner.ctx;
        if !ctx.admitting() {
            return Err(PoolError::ShuttingDown);
        }
        let ReverseRegistration { agent_id, replica_id, token, connection } = registration;
        if let Some(reason) = ctx.config.reverse.refuse(&agent_id, token.as_deref()) {
            tracing::warn!(agent = %agent_id, replica = %replica_id, reason, "reverse connection refused");
            connection.close();
            return Err(PoolError::Unauthorized { agent: agent_id, reason });
        }
        let agent = {
            let writer = ctx.directory.write();
            let current = writer.current();
            match current.get(agent_id.as_str()) {
                Some(view) => view.agent.clone(),
                None => {
                    let spec = AgentSpec::new(agent_id.clone());
                    let settings = crate::config::AgentSettings::resolve(&ctx.config, &spec.options)
                        .map_err(|problems| PoolError::InvalidConfig { problems })?;
                    let (agent, _) = Agent::start(
                        spec,
                        settings,
                        ctx.clone(),
                        self.inner.connector.clone(),
                        &self.inner.cancel,
                    );
                    let mut next = Agents::clone(&current);
                    next.insert(
                        Arc::from(agent_id.as_str()),
                        AgentView { agent: agent.clone(), live: agent.live() },
                    );
                    writer.publish(next);
                    agent
                }
            }
        };
        agent.attach_reverse(&replica_id, connection);
        Ok(())
    }

    /// A [`tower_service::Service`] that sends events to one agent.
    pub fn service(&self, agent: &str) -> Result<AgentService, PoolError> {
        Ok(AgentService::new(self.agent(agent)?))
    }

    /// Shuts the pool down: stop admitting, drain every agent in parallel (returning as soon as
    /// nothing is in flight, or at the drain time-out), cancel what is left, close every
    /// connection, stop the background tasks. From the moment it is called, requests are
    /// answered [`PoolError::ShuttingDown`].
    pub async fn shutdown(&self) -> StopReport {
        self.inner.ctx.admitting.store(false, Ordering::Release);
        let report = self.remove_all().await;
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        report
    }

    /// False once shutdown has begun.
    pub fn is_admitting(&self) -> bool {
        self.inner.ctx.admitting()
    }
}

/// Maintenance's view of the pool: the registry, reachable through a weak pointer.
pub(crate) struct WeakPool(std::sync::Weak<PoolInner>);

impl WeakPool {
    /// Sweeps expired sticky sessions; false once the pool is gone.
    pub(crate) fn sweep_sessions(&self, now: Instant) -> bool {
        let Some(inner) = self.0.upgrade() else { return false };
        inner.ctx.clock.advance(now);
        inner.ctx.sticky.sweep(inner.ctx.clock.stamp(now));
        metrics::gauge!("agentpool_sticky_sessions").set(inner.ctx.sticky.len() as f64);
        true
    }

    pub(crate) fn agents(&self) -> Option<Vec<Arc<Agent>>> {
        self.0.upgrade().map(|inner| inner.ctx.directory.load().values().map(|v| v.agent.clone()).collect())
    }
}

pub(crate) fn weak(inner: std::sync::Weak<PoolInner>) -> WeakPool {
    WeakPool(inner)
}

async fn drain_all(agents: Vec<Arc<Agent>>, deadline: Instant) -> StopReport {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for agent in agents {
        set.spawn(async move { agent.shut_down(deadline).await });
    }
    let mut total = StopReport::default();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            total.drained += r.drained;
            total.forced += r.forced;
        }
    }
    total.elapsed = started.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use http::Method;
    use pool_api::RequestHeaders;
    use test_support::{AllowAll, MemoryAgent, MemoryConnector};

    use super::*;

    fn request(id: &str) -> Event {
        Event::RequestHeaders(RequestHeaders::new(id, Method::GET, http::Uri::from_static("/")))
    }

    /// The race of a multi-threaded runtime, made deterministic: the sticky fast path has
    /// taken its permit on the pinned connection, and the connection dies before the event
    /// goes out.
    #[tokio::test(start_paused = true)]
    async fn a_sticky_send_whose_connection_dies_after_the_pick_is_repinned_with_its_event() {
        let agent = MemoryAgent::new(AllowAll);
        let connector = MemoryConnector::new();
        connector.register("mem://waf", &agent);
        let pool = AgentPool::new(PoolConfig { seed: Some(7), ..PoolConfig::default() }, connector).unwrap();
        pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
        pool.create_sticky_session("ws", "waf").unwrap();

        let ctx = &pool.inner.ctx;
        let guard = ctx.sticky.try_reserve("ws", "waf", ctx.clock.stamp(Instant::now())).unwrap();
        let generation = guard.slot.generation();
        let home = guard.slot.label().to_string();
        agent.connection_by_label(&home).unwrap().disconnect();

        let shared = guard.slot.agent.clone();
        let held = StickyStart::Held(guard);
        let (decision, route) = shared
            .dispatch_sticky("ws", held, generation, request("m1"), Instant::now(), StickyRoute::Pinned)
            .await
            .expect("re-pinned, not PinLost");
        assert!(decision.is_allow());
        let StickyRoute::Repinned { from, to } = route else { panic!("{route:?}") };
        assert_eq!(from, home);
        assert_ne!(to, home);
        let seen = agent.events_by_connection();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), (to.as_str(), "m1"), "the event was not lost");
        let (_, route) = pool.send_sticky("ws", "waf", request("m2")).await.unwrap();
        assert_eq!(route, StickyRoute::Pinned);
        assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
        assert_eq!(pool.stats().totals.in_flight, 0);
    }
}
