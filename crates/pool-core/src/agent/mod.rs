//! One registered agent: its endpoints and connection slots, the snapshot of the connected
//! ones that picking reads, and its drain.
//!
//! The agent's behaviour is split by concern, one file each:
//!
//! * [`pick`] — choosing a connection and taking a permit, without waiting; every way a pick
//!   can miss;
//! * [`wait`] — the one loop that waits for a permit, on the balancer's choice or on a pinned
//!   connection;
//! * [`refuse`] — how a request that no connection can take is answered (failure mode,
//!   flow-control mode) and counted;
//! * [`send`] — sending on the chosen connection and recording the outcome, sticky sends
//!   included;
//! * [`stats`], [`outliers`], [`spec`] — what the agent reports, its outlier bookkeeping, and
//!   how an agent is described and validated.
//!
//! What lives elsewhere, above this module: the tasks that keep each slot connected
//! (`supervisor`), reverse-connected replicas (`reverse`), config pushes and update answers
//! (`config_push`), and the pool's directory, which republishes an agent's snapshot when a
//! connection comes or goes (`directory`).
//!
//! # How a request flows
//!
//! 1. A pick loads the agent's snapshot of connected slots, lets the balancer choose among
//!    the usable ones (flags, breaker gate, supported event kind and free capacity are all
//!    atomics) and takes a permit with one CAS. A half-open breaker admits exactly one probe
//!    here. Nothing is locked or allocated.
//! 2. If every usable connection is full, the request waits for a permit (woken by the next
//!    release) until its deadline; if none is usable at all, the agent's failure mode
//!    decides: an error, or "allow" (fail open).
//! 3. The send goes out on the chosen connection with its deadline (scaled by a degraded
//!    agent's multiplier), which the transport keeps (`AgentConnection::send_until`: the
//!    multiplexing transports watch every request's deadline on a connection with one timer),
//!    and waits for the answer; the end of a drain cancels what is in flight on each
//!    connection at once (`AgentConnection::cancel_all`). A time-out or an abort tells the
//!    agent to cancel.
//! 4. The outcome feeds the slot's health window and latency estimate and the endpoint's
//!    breaker; the permit is returned when the [`InFlight`] guard drops — which also happens
//!    if the caller drops the future at any await point.

mod outliers;
pub(crate) mod pick;
pub(crate) mod refuse;
pub(crate) mod send;
mod spec;
mod stats;
pub(crate) mod wait;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use pool_api::{CancelReason, Capabilities, CorrelationId, Endpoint, EventKind, StopReport};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::Affinity;
use crate::balance::Balancer;
use crate::config::AgentSettings;
use crate::context::PoolCtx;
use crate::endpoint::EndpointState;
use crate::error::{PoolError, Unavailable};
use crate::metrics::AgentMetrics;
use crate::slot::SlotOwner;
use crate::waiters::Waiters;

pub(crate) use outliers::Outliers;
pub use spec::AgentSpec;
pub use stats::{AgentStats, EndpointStats, Totals};

/// A connection slot of an agent.
pub(crate) type Slot = crate::slot::Slot<AgentShared>;
/// A request's permit on a connection slot of an agent.
pub(crate) type InFlight = crate::slot::InFlight<AgentShared>;
/// The sticky sessions of a pool of agents.
pub(crate) type Sticky = crate::sticky::Sticky<AgentShared>;
/// Connected slots, in slot order.
pub(crate) type LiveSlots = Arc<Vec<Arc<Slot>>>;

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

/// What the send path needs of its agent; every slot holds it (and reaches it only as a
/// [`SlotOwner`]).
pub(crate) struct AgentShared {
    pub(crate) id: Arc<str>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) settings: AgentSettings,
    pub(crate) ctx: Arc<PoolCtx>,
    /// Fired at the end of a drain (or by the pool's token when its last handle is dropped):
    /// sends waiting for a permit are cancelled. No send in flight watches it: the drain
    /// cancels those on their connections ([`Agent::abort_requests`]), and when the pool is
    /// dropped its supervisors close the connections, which the send path reports as the
    /// abort it is.
    pub(crate) abort: CancellationToken,
    /// Set, before the connections are told, when the agent's requests are aborted: a send
    /// registered on its connection after they were told finds it and cancels itself.
    pub(crate) aborted: AtomicBool,
    /// The agent itself, for re-picking when a reserved connection turns out closed.
    agent: OnceLock<Weak<Agent>>,
    /// Correlation affinity: which connection each in-progress request is pinned to.
    pub(crate) affinity: Affinity<Slot>,
    removed: AtomicBool,
    /// Requests answered without the agent, for [`Totals`].
    pub(crate) refused: refuse::Refused,
    /// Notified when a permit is released or capacity appears, for `waiters`.
    capacity: Notify,
    /// Requests waiting on `capacity`.
    waiters: Waiters,
    /// Notified when a permit is released, for `idle_watchers`.
    idle: Notify,
    /// A drain waiting on `idle` for in-flight requests to finish.
    idle_watchers: Waiters,
}

impl SlotOwner for AgentShared {
    #[inline]
    fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    #[inline]
    fn is_closed(&self) -> bool {
        self.closed().is_some()
    }

    #[inline]
    fn permit_released(&self) {
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
}

impl AgentShared {
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

    /// The agent, while it exists.
    pub(crate) fn agent(&self) -> Option<Arc<Agent>> {
        self.agent.get().and_then(Weak::upgrade)
    }

    /// The error of a request cancelled by the pool's drain.
    pub(crate) fn drained(&self) -> PoolError {
        PoolError::Cancelled { agent: self.id.to_string(), reason: CancelReason::ProxyShutdown }
    }
}

/// A registered agent.
pub(crate) struct Agent {
    pub(crate) shared: Arc<AgentShared>,
    balancer: Balancer,
    endpoints: Vec<Arc<EndpointState>>,
    slots: Mutex<Vec<Arc<Slot>>>,
    snapshot: ArcSwap<Vec<Arc<Slot>>>,
    outliers: Mutex<Outliers>,
    /// Stops the agent's tasks.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Reverse-connection slots, by replica id (see `crate::reverse`).
    pub(crate) replicas: Mutex<HashMap<String, Arc<Slot>>>,
    /// Whether this agent sets its id's connection gauge. Two agents share an id while one
    /// replaces the other (`AgentPool::replace_agent`): the gauge belongs to the registered
    /// one, handed over under the directory's writer lock.
    owns_gauges: AtomicBool,
}

impl Agent {
    /// Builds the agent with one slot per connection of every endpoint, none connected yet.
    /// Keeping them connected is the supervisors' job.
    pub(crate) fn new(
        id: &str,
        endpoints: &[Endpoint],
        settings: AgentSettings,
        ctx: Arc<PoolCtx>,
        parent: &CancellationToken,
    ) -> Arc<Agent> {
        let cfg = &ctx.config;
        let id: Arc<str> = Arc::from(id);
        let balancer = match ctx.next_seed() {
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
            aborted: AtomicBool::new(false),
            agent: OnceLock::new(),
            affinity: Affinity::new(cfg.affinity.max_entries, cfg.affinity.ttl),
            removed: AtomicBool::new(false),
            refused: refuse::Refused::default(),
            capacity: Notify::new(),
            waiters: Waiters::new(),
            idle: Notify::new(),
            idle_watchers: Waiters::new(),
        });
        let (stop, tasks) = (parent.child_token(), TaskTracker::new());
        let endpoints: Vec<Arc<EndpointState>> = endpoints
            .iter()
            .map(|e| {
                Arc::new(EndpointState::new(e.clone(), &cfg.breaker, ctx.next_seed(), &id, &stop, &tasks))
            })
            .collect();
        let slots: Vec<Arc<Slot>> = endpoints
            .iter()
            .flat_map(|ep| (0..per_endpoint).map(|_| Self::slot_of(&shared, ep.clone())))
            .collect();
        let agent = Arc::new(Agent {
            balancer,
            outliers: Mutex::new(Outliers::new(cfg.outlier.clone(), &endpoints)),
            endpoints,
            slots: Mutex::new(slots),
            snapshot: ArcSwap::from_pointee(Vec::new()),
            stop,
            tasks,
            replicas: Mutex::new(HashMap::new()),
            owns_gauges: AtomicBool::new(true),
            shared,
        });
        let _ = agent.shared.agent.set(Arc::downgrade(&agent));
        agent
    }

    fn slot_of(shared: &Arc<AgentShared>, endpoint: Arc<EndpointState>) -> Arc<Slot> {
        let cfg = &shared.ctx.config.health;
        Arc::new(Slot::new(
            shared.clone(),
            endpoint,
            shared.settings.max_concurrency,
            cfg.window,
            cfg.buckets,
            cfg.latency_decay,
        ))
    }

    pub(crate) fn id(&self) -> &str {
        &self.shared.id
    }

    /// Cancelled when the agent's tasks must stop.
    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `task` as one of the agent's tasks: the drain waits for it.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// A new slot (not yet in the agent) for a replica that connected in reverse, with an
    /// endpoint and breaker of its own, covered by outlier detection from now on.
    pub(crate) fn new_replica_slot(&self, endpoint: Endpoint) -> Arc<Slot> {
        let ctx = &self.shared.ctx;
        let ep = Arc::new(EndpointState::new(
            endpoint,
            &ctx.config.breaker,
            ctx.next_seed(),
            self.id(),
            &self.stop,
            &self.tasks,
        ));
        let slot = Self::slot_of(&self.shared, ep);
        self.slots.lock().push(slot.clone());
        self.outliers.lock().add(self.id(), slot.endpoint.clone());
        slot
    }

    /// Takes a replica's slot out of the agent and out of outlier detection.
    pub(crate) fn remove_replica_slot(&self, slot: &Arc<Slot>) {
        self.slots.lock().retain(|s| !Arc::ptr_eq(s, slot));
        self.outliers.lock().remove(self.id(), &slot.endpoint);
    }

    /// Rebuilds the agent's snapshot of connected slots and returns it. The pool's directory
    /// calls this under its writer lock, so the copy it publishes is never older than the
    /// agent's own.
    pub(crate) fn refresh_snapshot(&self) -> LiveSlots {
        let live: LiveSlots =
            Arc::new(self.slots.lock().iter().filter(|s| s.is_connected()).cloned().collect());
        self.snapshot.store(live.clone());
        live
    }

    /// After a new snapshot was published: the connection gauge (if this agent owns it), and
    /// requests waiting for capacity may find some.
    pub(crate) fn snapshot_published(&self, live: &LiveSlots) {
        if self.owns_gauges.load(Ordering::Acquire) {
            self.shared.metrics.connections.set(live.len() as f64);
        }
        self.shared.wake_waiters();
    }

    /// Gives this agent its id's connection gauge, or takes it away (see `owns_gauges`). A
    /// change of owner is made under the directory's writer lock.
    pub(crate) fn own_gauges(&self, owns: bool) {
        self.owns_gauges.store(owns, Ordering::Release);
    }

    /// Stops the agent's tasks and aborts its requests at once, without a drain: for an agent
    /// that was never registered (a replacement abandoned before its swap).
    pub(crate) fn abandon(&self) {
        self.shared.removed.store(true, Ordering::Release);
        self.abort_requests();
        self.stop.cancel();
    }

    /// Aborts every request of this agent: those waiting for a permit (the abort token) and
    /// those in flight, cancelled on their connections with reason proxy shutdown. The flag
    /// goes first (sequentially consistent, as is its check in the send path): a send either
    /// registered on its connection before the connection was told, and is cancelled there, or
    /// finds the flag after registering and cancels itself.
    pub(crate) fn abort_requests(&self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.shared.abort.cancel();
        for slot in self.slots() {
            if let Some(live) = slot.conn.load_full() {
                live.conn.cancel_all(CancelReason::ProxyShutdown);
            }
        }
    }

    /// True while requests are in flight on the agent or pinned to one of its connections
    /// (correlation affinity): what a replaced agent waits for before its drain. Expired pins
    /// are swept first.
    pub(crate) fn is_busy(&self, now: Instant) -> bool {
        self.in_flight() > 0 || self.has_pins(now)
    }

    /// True while requests are pinned to the agent's connections (expired pins swept first).
    pub(crate) fn has_pins(&self, now: Instant) -> bool {
        self.shared.affinity.sweep(self.shared.ctx.clock.stamp(now));
        self.shared.affinity.len() > 0
    }

    /// The pick of an event of request `id` (not its headers) pinned to a connection of this
    /// agent, a replaced one still draining; `None` if the request has no pin here. Once the
    /// agent has been shut down, its pins are lost.
    #[cold]
    pub(crate) fn pick_retiring(self: &Arc<Self>, id: &CorrelationId, stamp: u64) -> Option<pick::Pick> {
        use crate::affinity::Lookup;
        use pick::Miss;
        if self.shared.affinity.len() == 0 {
            return None;
        }
        match self.shared.affinity.lookup(id.as_str(), stamp) {
            Lookup::Miss => None,
            Lookup::Lost => {
                self.shared.metrics.pin_lost.increment(1);
                Some(Err(Miss::PinLost))
            }
            Lookup::Hit(slot) => Some(match self.shared.closed() {
                Some(Closed::Pool) => Err(Miss::Closed(Closed::Pool)),
                Some(Closed::Agent) => {
                    self.shared.affinity.remove(id.as_str());
                    self.shared.metrics.pin_lost.increment(1);
                    Err(Miss::PinLost)
                }
                None if !slot.is_paused() && slot.permits.try_acquire() => Ok(InFlight::pinned(slot)),
                None => Err(Miss::Pinned(self.clone(), slot)),
            }),
        }
    }

    /// The agent's current connected slots.
    pub(crate) fn live(&self) -> LiveSlots {
        self.snapshot.load_full()
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.lock().clone()
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.slots.lock().iter().map(|s| u64::from(s.permits.in_flight())).sum()
    }

    /// Every endpoint: configured ones, then reverse replicas.
    pub(crate) fn all_endpoints(&self) -> Vec<Arc<EndpointState>> {
        let mut all = self.endpoints.clone();
        all.extend(self.replicas.lock().values().map(|s| s.endpoint.clone()));
        all
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
    /// stop the agent's tasks and close every connection. The caller has already taken the
    /// agent out of the pool's directory.
    pub(crate) async fn shut_down(&self, deadline: Instant) -> StopReport {
        let started = Instant::now();
        // A replaced agent can be shut down twice at once (by its retirement and by the
        // pool's shutdown): the agent is told once.
        let first = !self.shared.removed.swap(true, Ordering::AcqRel);
        let at_start = self.in_flight();
        for slot in self.slots() {
            if first && let Some(live) = slot.conn.load_full() {
                live.conn.drain();
            }
        }
        self.wait_idle(deadline).await;
        let forced = self.in_flight();
        if forced > 0 {
            tracing::warn!(agent = %self.id(), forced, "drain deadline passed; cancelling what is left");
        }
        self.abort_requests();
        // Cancelled sends return at once; give them the moment they need.
        self.wait_idle(Instant::now() + Duration::from_secs(1)).await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let live = self.refresh_snapshot();
        self.snapshot_published(&live);
        StopReport { drained: at_start.saturating_sub(forced), forced, elapsed: started.elapsed() }
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
