//! The pool: the registry of agents and the public API around the hot send path.
//!
//! [`AgentPool`] itself holds registration, the send path ([`AgentPool::send`],
//! [`AgentPool::try_reserve`]), statistics and shutdown. The sticky-session, correlation
//! affinity and config-push operations are reached through small handles
//! ([`AgentPool::sticky_sessions`], [`AgentPool::affinity`], [`AgentPool::config_push`]),
//! defined in `handles`.

use std::sync::Arc;

use pool_api::{
    CancelReason, Capabilities, Connector, CorrelationId, Decision, Event, EventKind, StopReport,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::pick::{Miss, Pick};
use crate::agent::send::send_picked;
use crate::agent::{Agent, AgentSpec, AgentStats, Closed, InFlight, Sticky, Totals};
use crate::config::{AgentSettings, PoolConfig};
use crate::config_push::{Pushes, UpdateHandlerSlot};
use crate::context::PoolCtx;
use crate::directory::{AgentView, Agents, Directory};
use crate::error::PoolError;
use crate::maintenance;
use crate::reverse;
use crate::service::AgentService;
use crate::slot::ConnectionHealth;
use crate::supervisor::{self, Links};

pub(crate) struct PoolInner {
    pub(crate) ctx: Arc<PoolCtx>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) sticky: Arc<Sticky>,
    pub(crate) pushes: Arc<Pushes>,
    pub(crate) updates: Arc<UpdateHandlerSlot>,
    connector: Arc<dyn Connector>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Stops maintenance and every agent's tasks (they hold child tokens).
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
    pub(crate) inner: Arc<PoolInner>,
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

/// A permit on one connection of an agent, taken by [`AgentPool::try_reserve`] (or a
/// handle's `try_reserve`).
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
    pub async fn send(self, event: &Event) -> Result<Decision, PoolError> {
        let shared = self.guard.slot.owner.clone();
        shared.dispatch(self.guard, event, Instant::now()).await
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
        let sticky = Arc::new(Sticky::new(config.sticky.idle_timeout));
        let inner = Arc::new(PoolInner {
            ctx: Arc::new(PoolCtx::new(config)),
            directory: Arc::new(Directory::new()),
            sticky,
            pushes: Arc::new(Pushes::new()),
            updates: Arc::new(UpdateHandlerSlot::default()),
            connector,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let targets = maintenance::Targets {
            ctx: inner.ctx.clone(),
            directory: Arc::downgrade(&inner.directory),
            sticky: Arc::downgrade(&inner.sticky),
        };
        inner.tasks.spawn_on(maintenance::run(targets, inner.cancel.clone()), &handle);
        Ok(Self { inner })
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.ctx.config
    }

    fn links(&self) -> Links {
        Links { directory: self.inner.directory.clone(), updates: self.inner.updates.clone() }
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
        let (settings, connector) = self.prepare(&spec)?;
        let ctx = &self.inner.ctx;
        let id: Arc<str> = Arc::from(spec.id.as_str());
        let firsts = {
            let writer = self.inner.directory.write();
            let current = writer.current();
            if current.contains_key(&id) {
                return Err(PoolError::AgentExists { agent: spec.id });
            }
            let agent = Agent::new(&spec.id, &spec.endpoints, settings, ctx.clone(), &self.inner.cancel);
            let firsts = supervisor::start(&agent, &connector, &self.links());
            let mut next = Agents::clone(&current);
            // Supervisors that connected already updated the agent's own snapshot; republishing
            // waits for this lock, so the copy taken here is the latest.
            next.insert(id, AgentView::new(agent));
            writer.publish(next);
            firsts
        };
        let slots = firsts.len();
        let connected = first_attempts(firsts).await;
        Ok(AddReport { slots, connected })
    }

    /// What adding (or replacing) an agent checks before anything is dialled: the pool
    /// admits, the spec's settings are valid, and the connector that will dial each endpoint
    /// accepts it.
    fn prepare(&self, spec: &AgentSpec) -> Result<(AgentSettings, Arc<dyn Connector>), PoolError> {
        let ctx = &self.inner.ctx;
        if !ctx.admitting() {
            return Err(PoolError::ShuttingDown);
        }
        let settings = spec.validate(&ctx.config)?;
        let connector = spec.connector.clone().unwrap_or_else(|| self.inner.connector.clone());
        for endpoint in &spec.endpoints {
            connector
                .validate_endpoint(endpoint)
                .map_err(|source| PoolError::InvalidEndpoint { agent: spec.id.clone(), source })?;
        }
        Ok((settings, connector))
    }

    /// Replaces a registered agent with `spec` (same id, new endpoints, options or connector)
    /// without a moment where the id is unknown or has nothing connected that it had before.
    ///
    /// 1. `spec` is checked as [`add_agent`](Self::add_agent) checks it; an invalid spec fails
    ///    ([`PoolError::InvalidEndpoint`], [`PoolError::InvalidConfig`]) with the registered
    ///    agent untouched. An id that is not registered fails with
    ///    [`PoolError::UnknownAgent`].
    /// 2. The new agent's connections are opened while the old agent keeps serving: this
    ///    returns once every slot's first attempt has finished, each bounded by the connect
    ///    and handshake time-outs, as `add_agent` does.
    /// 3. The new agent takes the old one's place in one atomic swap: every request picked
    ///    after it goes to the new agent. This happens even if no new connection came up
    ///    ([`AddReport::connected`] 0), as `add_agent` registers an unreachable agent: the
    ///    caller asked for the new endpoints, and the supervisors keep retrying them. A
    ///    caller that would rather keep the old agent then can replace back.
    /// 4. The old agent retires in the background (a task of the pool, which
    ///    [`shutdown`](Self::shutdown) waits for): requests in flight on its connections
    ///    finish there, and the later events of a request whose headers went to one of its
    ///    connections (correlation affinity) still go to that connection. Once nothing is in
    ///    flight or pinned there — or at the pool's drain time-out — it is drained like a
    ///    removed agent ([`remove_agent`](Self::remove_agent)): what is left is cancelled and
    ///    its connections are closed; a request still pinned there then fails with
    ///    [`PoolError::PinLost`], as when a pinned connection dies. Sticky sessions keep
    ///    their old connection while it serves and are re-pinned to the new agent
    ///    ([`StickyRoute::Repinned`](crate::StickyRoute)) once it is closed.
    ///
    /// The agent's gauges stay single: `agentpool_connections` counts the new agent's
    /// connections from the swap on; `agentpool_in_flight` counts both agents' requests while
    /// the old one drains.
    pub async fn replace_agent(&self, spec: AgentSpec) -> Result<AddReport, PoolError> {
        let (settings, connector) = self.prepare(&spec)?;
        let ctx = &self.inner.ctx;
        if !self.directory().load().contains_key(spec.id.as_str()) {
            return Err(self.unknown(&spec.id));
        }
        let agent = Agent::new(&spec.id, &spec.endpoints, settings, ctx.clone(), &self.inner.cancel);
        // Not registered yet: the registered agent's gauges are not this one's to set.
        agent.own_gauges(false);
        let pending = Unswapped(Some(agent.clone()));
        let firsts = supervisor::start(&agent, &connector, &self.links());
        let slots = firsts.len();
        let connected = first_attempts(firsts).await;
        let old = {
            let writer = self.inner.directory.write();
            let current = writer.current();
            if !ctx.admitting() {
                return Err(PoolError::ShuttingDown);
            }
            // Removed meanwhile: a replacement does not bring it back.
            let Some(view) = current.get(spec.id.as_str()) else {
                return Err(self.unknown(&spec.id));
            };
            let old = view.agent.clone();
            let mut retiring: Vec<Arc<Agent>> =
                view.retiring.iter().flat_map(|r| r.iter().cloned()).collect();
            retiring.push(old.clone());
            old.own_gauges(false);
            agent.own_gauges(true);
            let live = agent.refresh_snapshot();
            agent.snapshot_published(&live);
            let mut next = Agents::clone(&current);
            next.insert(
                old.shared.id.clone(),
                AgentView { agent: pending.swapped(), live, retiring: Some(retiring.into()) },
            );
            writer.publish(next);
            old
        };
        let deadline = Instant::now() + ctx.config.drain_timeout;
        self.inner.tasks.spawn(retire(old, self.inner.directory.clone(), deadline));
        Ok(AddReport { slots, connected })
    }

    /// Removes an agent gracefully: no new requests, in-flight ones may finish until the
    /// drain time-out, then what is left is cancelled and the connections are closed.
    pub async fn remove_agent(&self, id: &str) -> Result<StopReport, PoolError> {
        let agent = {
            let writer = self.inner.directory.write();
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
        self.inner.sticky.remove_agent(id);
        Ok(agent.shut_down(Instant::now() + self.inner.ctx.config.drain_timeout).await)
    }

    /// Removes every agent, draining them in parallel; the reports are summed.
    pub async fn remove_all(&self) -> StopReport {
        let agents: Vec<Arc<Agent>> = {
            let writer = self.inner.directory.write();
            let current = writer.current();
            writer.publish(Agents::default());
            // Replaced agents still draining are drained with the rest (their retirement may
            // be draining them too; an agent is told once).
            let retiring = current.values().flat_map(|v| v.retiring.iter().flat_map(|r| r.iter()));
            current.values().map(|v| &v.agent).chain(retiring).cloned().collect()
        };
        drain_all(agents, Instant::now() + self.inner.ctx.config.drain_timeout).await
    }

    /// The error for an agent id the directory does not hold: after shutdown began the
    /// directory is emptied, and the truth is that the pool admits nothing, whatever the name.
    #[cold]
    pub(crate) fn unknown(&self, id: &str) -> PoolError {
        self.unknown_miss().into_error(id, EventKind::RequestHeaders, None)
    }

    /// [`unknown`](Self::unknown) as a pick's miss.
    #[cold]
    fn unknown_miss(&self) -> Miss {
        if self.inner.ctx.admitting() { Miss::Unknown } else { Miss::Closed(Closed::Pool) }
    }

    /// A precise clock stamp of now.
    pub(crate) fn now(&self) -> u64 {
        self.inner.ctx.clock.stamp(Instant::now())
    }

    pub(crate) fn directory(&self) -> &Directory {
        &self.inner.directory
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

    pub(crate) fn agent(&self, id: &str) -> Result<Arc<Agent>, PoolError> {
        self.directory().with(|a| a.get(id).map(|v| v.agent.clone())).ok_or_else(|| self.unknown(id))
    }

    /// Every registered agent.
    pub(crate) fn agents(&self) -> Vec<Arc<Agent>> {
        self.directory().load().values().map(|v| v.agent.clone()).collect()
    }

    /// Statistics of one agent.
    pub fn agent_stats(&self, id: &str) -> Option<AgentStats> {
        self.agent(id).ok().map(|a| a.stats(Instant::now()))
    }

    /// Statistics of every agent, sorted by id.
    pub fn all_agent_stats(&self) -> Vec<AgentStats> {
        let now = Instant::now();
        let mut all: Vec<AgentStats> = self.agents().iter().map(|a| a.stats(now)).collect();
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
            sticky_sessions: self.inner.sticky.len(),
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

    /// The one pick, inside the directory snapshot: the hot half in registers, the cold half
    /// (which says why) only when it found no permit. `id` is the request's correlation id,
    /// for affinity; `None` balances without looking for a pin.
    #[inline]
    pub(crate) fn pick(&self, agent: &str, kind: EventKind, id: Option<&CorrelationId>, stamp: u64) -> Pick {
        let fast = self.directory().with(|agents| {
            let view = agents.get(agent)?;
            if view.retiring.is_some() && id.is_some() && kind != EventKind::RequestHeaders {
                // The request may be pinned to an agent this one replaced: the slow path looks.
                return None;
            }
            view.agent.try_pick(&view.live, kind, id, stamp)
        });
        match fast {
            Some(guard) => Ok(guard),
            None => self.pick_slow(agent, kind, id, stamp),
        }
    }

    #[cold]
    #[inline(never)]
    fn pick_slow(&self, agent: &str, kind: EventKind, id: Option<&CorrelationId>, stamp: u64) -> Pick {
        self.directory().with(|agents| match agents.get(agent) {
            Some(view) => {
                if let (Some(retiring), Some(id)) = (&view.retiring, id)
                    && kind != EventKind::RequestHeaders
                    && let Some(pick) = retiring.iter().find_map(|old| old.pick_retiring(id, stamp))
                {
                    return pick;
                }
                view.agent.pick(&view.live, kind, id, stamp)
            }
            None => Err(self.unknown_miss()),
        })
    }

    /// Sends one event to an agent and returns its decision.
    ///
    /// The connection is chosen by the agent's balancer among usable ones — or, for an event
    /// after a request's headers, the connection the headers went to (correlation affinity);
    /// the whole call, waiting for a permit included, is bounded by the request time-out. An
    /// agent that cannot take the request answers by its failure mode: an error, or allow
    /// (fail open).
    pub async fn send(&self, agent: &str, event: &Event) -> Result<Decision, PoolError> {
        let start = Instant::now();
        let stamp = self.inner.ctx.clock.stamp(start);
        let pick = self.pick(agent, event.kind(), Some(event.correlation_id()), stamp);
        send_picked(pick, agent, event, start).await
    }

    /// Takes a permit on the best connection of an agent for an event of `kind`, without
    /// waiting: the pick path alone (lookup, breaker, balancer, permit). Fails with
    /// [`PoolError::Unavailable`] when nothing can take it — also when every usable
    /// connection is full — regardless of the failure mode. For an event of a request pinned
    /// by correlation affinity, use [`RequestAffinity::try_reserve`](crate::RequestAffinity::try_reserve).
    pub fn try_reserve(&self, agent: &str, kind: EventKind) -> Result<Reservation, PoolError> {
        // No pin to look for: the stamp is not read.
        match self.pick(agent, kind, None, 0) {
            Ok(guard) => Ok(Reservation::new(guard)),
            Err(miss) => Err(miss.into_error(agent, kind, None)),
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
        let view = self.directory().with(|a| a.get(agent).cloned()).ok_or_else(|| self.unknown(agent))?;
        // A request pinned to a replaced agent that is still draining is cancelled there.
        let pinned_to_old = view.retiring.iter().flat_map(|r| r.iter()).find(|old| {
            old.shared.affinity.len() > 0 && old.shared.affinity.slot_of(correlation_id.as_str()).is_some()
        });
        pinned_to_old.unwrap_or(&view.agent).cancel(correlation_id, reason);
        Ok(())
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
            let writer = self.inner.directory.write();
            let current = writer.current();
            match current.get(agent_id.as_str()) {
                Some(view) => view.agent.clone(),
                None => {
                    let settings = AgentSettings::resolve(&ctx.config, &Default::default())
                        .map_err(|problems| PoolError::InvalidConfig { problems })?;
                    let agent = Agent::new(&agent_id, &[], settings, ctx.clone(), &self.inner.cancel);
                    let mut next = Agents::clone(&current);
                    next.insert(Arc::from(agent_id.as_str()), AgentView::new(agent.clone()));
                    writer.publish(next);
                    agent
                }
            }
        };
        reverse::attach(&agent, &replica_id, connection, &self.links());
        Ok(())
    }

    /// A [`tower_service::Service`] that sends events to one agent.
    pub fn service(&self, agent: &str) -> Result<AgentService, PoolError> {
        Ok(AgentService::new(self.agent(agent)?))
    }

    /// Shuts the pool down: stop admitting, drain every agent in parallel (returning as soon as
    /// nothing is in flight, or at the drain time-out), cancel what is left, close every
    /// connection, stop the background tasks. From the moment it is called, requests are
    /// answered [`PoolError::ShuttingDown`]; requests still in flight or waiting for a permit at
    /// the drain time-out end with [`PoolError::Cancelled`].
    pub async fn shutdown(&self) -> StopReport {
        self.inner.ctx.stop_admitting();
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

/// A replacement agent not yet swapped in: dropped before the swap (an error, or the caller's
/// future dropped while the first connections were being made), it is abandoned — its tasks
/// stopped and its connections closed — instead of running unregistered.
struct Unswapped(Option<Arc<Agent>>);

impl Unswapped {
    fn swapped(mut self) -> Arc<Agent> {
        self.0.take().expect("swapped once")
    }
}

impl Drop for Unswapped {
    fn drop(&mut self) {
        if let Some(agent) = self.0.take() {
            agent.abandon();
        }
    }
}

/// Counts the slots whose first connection attempt succeeded.
async fn first_attempts(firsts: Vec<tokio::sync::oneshot::Receiver<bool>>) -> usize {
    let mut connected = 0;
    for rx in firsts {
        if rx.await == Ok(true) {
            connected += 1;
        }
    }
    connected
}

/// How often a replaced agent looks whether its last request has finished. Pins have no
/// wake-up of their own; the poll is cheap and only runs while an agent retires.
const RETIRE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Retires `old`, an agent replaced under its id: waits until nothing is in flight or pinned
/// on it (or `deadline`, or the pool shutting down), drains it, then forgets it in the
/// directory.
/// How often a retired agent with requests still pinned to it looks whether they are gone.
const RETIRED_POLL: std::time::Duration = std::time::Duration::from_secs(1);

async fn retire(old: Arc<Agent>, directory: Arc<Directory>, deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline || !old.shared.ctx.admitting() || !old.is_busy(now) {
            break;
        }
        tokio::time::sleep_until(deadline.min(now + RETIRE_POLL)).await;
    }
    let report = old.shut_down(deadline.max(Instant::now())).await;
    tracing::debug!(agent = %old.id(), drained = report.drained, forced = report.forced, "replaced agent retired");
    // Requests still pinned to it must not move to a connection that never saw their headers:
    // until their pins are gone (their next event fails with `PinLost` and removes it, or the
    // affinity TTL sweeps it), their events are still looked for here.
    while old.shared.ctx.admitting() && old.has_pins(Instant::now()) {
        tokio::time::sleep(RETIRED_POLL).await;
    }
    directory.retired(&old);
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
    use crate::agent::send::StickyStart;
    use crate::sticky::StickyRoute;

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
        pool.sticky_sessions().create("ws", "waf").unwrap();

        let inner = &pool.inner;
        let guard = inner.sticky.try_reserve("ws", "waf", inner.ctx.clock.stamp(Instant::now())).unwrap();
        let generation = guard.slot.generation();
        let home = guard.slot.label().to_string();
        agent.connection_by_label(&home).unwrap().disconnect();

        let shared = guard.slot.owner.clone();
        let held = StickyStart::Held(guard);
        let (decision, route) = shared
            .send_sticky(
                &inner.sticky,
                "ws",
                held,
                generation,
                &request("m1"),
                Instant::now(),
                StickyRoute::Pinned,
            )
            .await
            .expect("re-pinned, not PinLost");
        assert!(decision.is_allow());
        let StickyRoute::Repinned { from, to } = route else { panic!("{route:?}") };
        assert_eq!(from, home);
        assert_ne!(to, home);
        let seen = agent.events_by_connection();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), (to.as_str(), "m1"), "the event was not lost");
        let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("m2")).await.unwrap();
        assert_eq!(route, StickyRoute::Pinned);
        assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
        assert_eq!(pool.stats().totals.in_flight, 0);
    }

    /// The drain's cancellation reaches a request that is still waiting for a permit: it ends
    /// as in-flight requests do, `Cancelled` with the reason.
    #[tokio::test(start_paused = true)]
    async fn a_request_still_waiting_when_the_drain_cancels_is_cancelled() {
        use crate::agent::wait::{Target, Waited};
        let connector = MemoryConnector::new();
        connector.register("mem://waf", &MemoryAgent::new(AllowAll));
        let cfg = PoolConfig {
            connections_per_endpoint: 1,
            max_concurrency_per_connection: 1,
            ..PoolConfig::default()
        };
        let pool = AgentPool::new(cfg, connector).unwrap();
        pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
        let held = pool.try_reserve("waf", EventKind::RequestHeaders).unwrap();
        let agent = pool.agent("waf").unwrap();
        let waiter = agent.clone();
        let waiting = tokio::spawn(async move {
            match waiter
                .wait(Target::Balanced(None), Instant::now() + std::time::Duration::from_secs(60))
                .await
            {
                Waited::Answer(answer) => *answer,
                Waited::Permit(_) | Waited::Lost => panic!("the only permit is held"),
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        agent.shared.abort.cancel();
        let err = waiting.await.unwrap().unwrap_err();
        assert_eq!(err, PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ProxyShutdown });
        drop(held);
    }
}
