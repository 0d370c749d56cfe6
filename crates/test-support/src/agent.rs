//! The agent side: a scripted in-memory agent, what it observed, and control over its
//! connections.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use pool_api::{
    AgentError, AgentHandler, AgentHealth, BoxFuture, CancelReason, Capabilities, ConfigAck, ConfigPush,
    ConfigUpdateAnswer, ConfigUpdateKind, CorrelationId, Decision, Endpoint, Event, EventKind, FlowControl,
    Hello, PendingConnection, TransportError,
};
use tokio::sync::{oneshot, watch};

use crate::connection::{Command, ConnCore};
use crate::connector::MemoryPending;

/// The seed of a new agent's random number generator.
const DEFAULT_SEED: u64 = 0x5eed_a9e7;

/// The message of an injected failure.
pub(crate) const INJECTED_FAILURE: &str = "injected failure";

/// The agent handler, type-erased: [`AgentHandler`] returns `impl Future`, which is not object
/// safe, so this wrapper boxes the futures.
pub(crate) trait DynHandler: Send + Sync + 'static {
    fn capabilities(&self) -> Capabilities;
    fn on_event(&self, event: Event) -> BoxFuture<'_, Result<Decision, AgentError>>;
    fn on_config(&self, push: ConfigPush) -> BoxFuture<'_, ConfigAck>;
}

impl<H: AgentHandler> DynHandler for H {
    fn capabilities(&self) -> Capabilities {
        AgentHandler::capabilities(self)
    }

    fn on_event(&self, event: Event) -> BoxFuture<'_, Result<Decision, AgentError>> {
        Box::pin(AgentHandler::on_event(self, event))
    }

    fn on_config(&self, push: ConfigPush) -> BoxFuture<'_, ConfigAck> {
        Box::pin(AgentHandler::on_config(self, push))
    }
}

/// How an agent answers configuration pushes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConfigBehaviour {
    /// Ask the handler ([`AgentHandler::on_config`]). The default.
    #[default]
    Handler,
    /// Accept every push without asking the handler.
    Accept,
    /// Reject every push with this message.
    Reject(String),
    /// Never acknowledge: the push stays unanswered until the connection closes.
    Never,
}

/// What the agent will do with one event, decided when the event arrives.
pub(crate) enum Outcome {
    /// Ask the handler.
    Handle,
    /// Answer with an [`AgentError`].
    Fail,
    /// Never answer.
    Silent,
}

/// The plan for one event.
pub(crate) struct Plan {
    pub(crate) latency: Duration,
    pub(crate) outcome: Outcome,
}

/// Everything a test can change about an agent's behaviour.
struct Script {
    latency_min: Duration,
    latency_max: Duration,
    rng: fastrand::Rng,
    fail_next: usize,
    failure_rate: f64,
    silent: bool,
    refuse: bool,
    connect_silent: bool,
    handshake_silent: bool,
    capabilities: Option<Capabilities>,
    versions: Option<Vec<u32>>,
    config: ConfigBehaviour,
    health: AgentHealth,
}

/// Everything the agent saw.
#[derive(Default)]
struct Observations {
    connect_attempts: usize,
    connections_opened: usize,
    hellos: Vec<Hello>,
    events: Vec<(String, Event)>,
    cancels: Vec<(String, CorrelationId, CancelReason)>,
    drains: Vec<String>,
    closes: Vec<String>,
    pings: Vec<String>,
    config_pushes: Vec<(String, ConfigPush)>,
    config_answers: Vec<(String, ConfigUpdateAnswer)>,
}

/// The state shared by an agent's handles, its connections' tasks and its pending connections.
pub(crate) struct AgentShared {
    pub(crate) handler: Box<dyn DynHandler>,
    script: Mutex<Script>,
    observations: Mutex<Observations>,
    /// Connections whose task still runs (open, or closed but not yet wound down).
    connections: Mutex<Vec<Arc<ConnCore>>>,
    /// Index of the next connection, for its label.
    pub(crate) next_index: AtomicU64,
    /// Requests received and neither answered nor cancelled, over every connection.
    pub(crate) pending: AtomicUsize,
    /// The highest `pending` ever reached.
    pub(crate) peak_pending: AtomicUsize,
    /// Bumped by [`MemoryAgent::disconnect_all`], so connections that have not finished their
    /// handshake die too.
    pub(crate) epoch: watch::Sender<u64>,
}

impl AgentShared {
    /// Decides what to do with the next event, in arrival order, so that seeded randomness is
    /// reproducible.
    pub(crate) fn plan_event(&self) -> Plan {
        let mut script = self.script.lock();
        let latency = if script.latency_max > script.latency_min {
            let min = duration_nanos(script.latency_min);
            let max = duration_nanos(script.latency_max);
            Duration::from_nanos(script.rng.u64(min..=max))
        } else {
            script.latency_min
        };
        let outcome = if script.silent {
            Outcome::Silent
        } else if script.fail_next > 0 {
            script.fail_next -= 1;
            Outcome::Fail
        } else if script.failure_rate > 0.0 && script.rng.f64() < script.failure_rate {
            Outcome::Fail
        } else {
            Outcome::Handle
        };
        Plan { latency, outcome }
    }

    pub(crate) fn is_silent(&self) -> bool {
        self.script.lock().silent
    }

    pub(crate) fn config_behaviour(&self) -> ConfigBehaviour {
        self.script.lock().config.clone()
    }

    pub(crate) fn health(&self) -> AgentHealth {
        self.script.lock().health.clone()
    }

    pub(crate) fn capabilities(&self) -> Capabilities {
        let over = self.script.lock().capabilities.clone();
        over.unwrap_or_else(|| self.handler.capabilities())
    }

    pub(crate) fn protocol_versions(&self) -> Vec<u32> {
        let over = self.script.lock().versions.clone();
        over.unwrap_or_else(|| vec![self.capabilities().protocol_version])
    }

    pub(crate) fn handshake_silent(&self) -> bool {
        self.script.lock().handshake_silent
    }

    pub(crate) fn add_connection(&self, core: Arc<ConnCore>) {
        self.connections.lock().push(core);
        self.observations.lock().connections_opened += 1;
    }

    pub(crate) fn remove_connection(&self, core: &ConnCore) {
        self.connections.lock().retain(|c| !std::ptr::eq(Arc::as_ptr(c), core));
    }

    fn connection_cores(&self) -> Vec<Arc<ConnCore>> {
        self.connections.lock().clone()
    }

    fn open_cores(&self) -> Vec<Arc<ConnCore>> {
        self.connections.lock().iter().filter(|c| c.is_open()).cloned().collect()
    }

    pub(crate) fn record_hello(&self, hello: Hello) {
        self.observations.lock().hellos.push(hello);
    }

    pub(crate) fn record_event(&self, label: &str, event: &Event) {
        self.observations.lock().events.push((label.to_owned(), event.clone()));
    }

    pub(crate) fn record_cancel(&self, label: &str, correlation_id: &CorrelationId, reason: CancelReason) {
        self.observations.lock().cancels.push((label.to_owned(), correlation_id.clone(), reason));
    }

    pub(crate) fn record_drain(&self, label: &str) {
        self.observations.lock().drains.push(label.to_owned());
    }

    pub(crate) fn record_close(&self, label: &str) {
        self.observations.lock().closes.push(label.to_owned());
    }

    pub(crate) fn record_ping(&self, label: &str) {
        self.observations.lock().pings.push(label.to_owned());
    }

    pub(crate) fn record_config_answer(&self, label: &str, answer: ConfigUpdateAnswer) {
        self.observations.lock().config_answers.push((label.to_owned(), answer));
    }

    pub(crate) fn record_config_push(&self, label: &str, push: &ConfigPush) {
        self.observations.lock().config_pushes.push((label.to_owned(), push.clone()));
    }

    /// The agent's end of a connection attempt.
    pub(crate) async fn accept(
        self: Arc<Self>,
        endpoint: Endpoint,
    ) -> Result<Box<dyn PendingConnection>, TransportError> {
        let (refuse, silent) = {
            let script = self.script.lock();
            (script.refuse, script.connect_silent)
        };
        self.observations.lock().connect_attempts += 1;
        if refuse {
            return Err(TransportError::Connect {
                endpoint: endpoint.to_string(),
                kind: Some(std::io::ErrorKind::ConnectionRefused),
                message: "connection refused by the agent".to_owned(),
            });
        }
        if silent {
            std::future::pending::<()>().await;
        }
        let epoch = *self.epoch.borrow();
        Ok(Box::new(MemoryPending::new(self, endpoint, epoch)))
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A scripted in-memory agent.
///
/// Built from any [`AgentHandler`]; register it on a [`MemoryConnector`](crate::MemoryConnector)
/// under one or more endpoints. Cloning gives another handle to the same agent: its script can be
/// changed and its observations read at any time, from any handle, while connections are live.
///
/// # Script
///
/// Everything that decides an event's fate (latency, injected failure, silence) is decided when
/// the event reaches the agent, in arrival order, with a seeded random number generator, so a
/// test that sends the same events sees the same behaviour every run.
///
/// Like a server built on [`AgentHandler`], the agent handles each request in a task of its
/// own, at most [`max_concurrency`](Capabilities::max_concurrency) at once per connection (the
/// others wait their turn, their latency starting when they do), and aborts the task of a
/// request that is cancelled or abandoned.
///
/// # Observations
///
/// The agent records what reaches it: connection attempts, hellos, events, cancels, drains,
/// closes, pings and configuration pushes, each with the label of its connection
/// (`"{endpoint}#{n}"`). A message reaches the agent when its connection's task handles it,
/// which is after the call that sent it has returned; [`settle`](MemoryAgent::settle) waits for
/// that, and so does any `.await` that lets the runtime run (such as a sleep under a paused clock).
#[derive(Clone)]
pub struct MemoryAgent {
    pub(crate) shared: Arc<AgentShared>,
}

impl fmt::Debug for MemoryAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAgent")
            .field("agent_id", &self.capabilities().agent_id)
            .field("live_connections", &self.live_connections())
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl MemoryAgent {
    /// An agent answering with `handler`: no latency, no failures, protocol version and
    /// capabilities from the handler.
    pub fn new<H: AgentHandler>(handler: H) -> Self {
        let health = handler.health();
        let script = Script {
            latency_min: Duration::ZERO,
            latency_max: Duration::ZERO,
            rng: fastrand::Rng::with_seed(DEFAULT_SEED),
            fail_next: 0,
            failure_rate: 0.0,
            silent: false,
            refuse: false,
            connect_silent: false,
            handshake_silent: false,
            capabilities: None,
            versions: None,
            config: ConfigBehaviour::Handler,
            health,
        };
        Self {
            shared: Arc::new(AgentShared {
                handler: Box::new(handler),
                script: Mutex::new(script),
                observations: Mutex::new(Observations::default()),
                connections: Mutex::new(Vec::new()),
                next_index: AtomicU64::new(0),
                pending: AtomicUsize::new(0),
                peak_pending: AtomicUsize::new(0),
                epoch: watch::Sender::new(0),
            }),
        }
    }

    // ----- script ------------------------------------------------------------------------

    /// Every event is answered after `latency` (a tokio sleep: paused-clock tests advance on
    /// their own).
    pub fn set_latency(&self, latency: Duration) {
        let mut script = self.shared.script.lock();
        script.latency_min = latency;
        script.latency_max = latency;
    }

    /// Every event is answered after a latency drawn uniformly from `min..=max`.
    ///
    /// # Panics
    ///
    /// If `min > max`.
    pub fn set_latency_range(&self, min: Duration, max: Duration) {
        assert!(min <= max, "latency range {min:?}..={max:?} is empty");
        let mut script = self.shared.script.lock();
        script.latency_min = min;
        script.latency_max = max;
    }

    /// Reseeds the random number generator behind latency ranges and failure rates.
    pub fn set_seed(&self, seed: u64) {
        self.shared.script.lock().rng = fastrand::Rng::with_seed(seed);
    }

    /// The next `n` events are answered with an [`AgentError`] (the sender gets
    /// [`TransportError::Agent`]) without reaching the handler. Replaces any count still left.
    pub fn fail_next(&self, n: usize) {
        self.shared.script.lock().fail_next = n;
    }

    /// Each event fails with probability `rate` (clamped to `0.0..=1.0`), like
    /// [`fail_next`](MemoryAgent::fail_next).
    ///
    /// # Panics
    ///
    /// If `rate` is NaN.
    pub fn set_failure_rate(&self, rate: f64) {
        assert!(!rate.is_nan(), "failure rate is NaN");
        self.shared.script.lock().failure_rate = rate.clamp(0.0, 1.0);
    }

    /// While set, events (and pings) are received but never answered; they stay pending until
    /// cancelled, abandoned or their connection dies. Decided per event on arrival: clearing it
    /// does not answer events already received.
    pub fn set_silent(&self, silent: bool) {
        self.shared.script.lock().silent = silent;
    }

    /// While set, connecting fails with [`TransportError::Connect`] (kind
    /// [`ConnectionRefused`](std::io::ErrorKind::ConnectionRefused)). Live connections are
    /// untouched.
    pub fn refuse_connections(&self, refuse: bool) {
        self.shared.script.lock().refuse = refuse;
    }

    /// While set, [`Connector::connect`](pool_api::Connector::connect) never completes (a
    /// black-holed address), for connect time-out tests.
    pub fn set_connect_silent(&self, silent: bool) {
        self.shared.script.lock().connect_silent = silent;
    }

    /// While set, connecting succeeds but the handshake never completes, for handshake time-out
    /// tests. [`disconnect_all`](MemoryAgent::disconnect_all) ends such a handshake with
    /// [`TransportError::Handshake`].
    pub fn set_handshake_silent(&self, silent: bool) {
        self.shared.script.lock().handshake_silent = silent;
    }

    /// Announces `capabilities` in later handshakes instead of the handler's. The protocol
    /// version in it is replaced by the negotiated one.
    pub fn set_capabilities(&self, capabilities: Capabilities) {
        self.shared.script.lock().capabilities = Some(capabilities);
    }

    /// The protocol versions the agent speaks in later handshakes (by default, the one in its
    /// capabilities). The highest version also in [`Hello::supported_versions`] is chosen; with
    /// none in common the handshake fails with [`TransportError::VersionMismatch`].
    pub fn set_protocol_versions(&self, versions: impl IntoIterator<Item = u32>) {
        self.shared.script.lock().versions = Some(versions.into_iter().collect());
    }

    /// How configuration pushes are answered from now on.
    pub fn set_config_behaviour(&self, behaviour: ConfigBehaviour) {
        self.shared.script.lock().config = behaviour;
    }

    /// The capabilities the next handshake will announce (before version negotiation).
    pub fn capabilities(&self) -> Capabilities {
        self.shared.capabilities()
    }

    // ----- signals and connection control ------------------------------------------------

    /// Kills every live connection now, as if the agent crashed: every request pending on them
    /// fails at once with [`TransportError::Closed`], their signals publish `open: false`, and
    /// later calls on them fail with `Closed`. Handshakes in progress fail with
    /// [`TransportError::Handshake`]. The agent still accepts new connections.
    pub fn disconnect_all(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
        for core in self.shared.open_cores() {
            core.kill("the agent closed the connection");
        }
    }

    /// Publishes `signal` on every live connection.
    pub fn flow_all(&self, signal: FlowControl) {
        for core in self.shared.open_cores() {
            core.flow(signal);
        }
    }

    /// Pauses every live connection ([`FlowControl::Pause`]).
    pub fn pause_all(&self) {
        self.flow_all(FlowControl::Pause);
    }

    /// Resumes every live connection ([`FlowControl::Resume`]).
    pub fn resume_all(&self) {
        self.flow_all(FlowControl::Resume);
    }

    /// Announces `capacity` on every live connection ([`FlowControl::Capacity`]).
    pub fn set_capacity_all(&self, capacity: u32) {
        self.flow_all(FlowControl::Capacity(capacity));
    }

    /// Reports `health` on every live connection; connections opened later start with it too.
    pub fn report_health(&self, health: AgentHealth) {
        self.shared.script.lock().health = health.clone();
        for core in self.shared.open_cores() {
            core.report_health(health.clone());
        }
    }

    /// The live connection with index `index` (the `n` of its label).
    pub fn connection(&self, index: u64) -> Option<ConnectionControl> {
        self.shared.open_cores().into_iter().find(|c| c.index == index).map(|core| ConnectionControl { core })
    }

    /// The live connection labelled `label`.
    pub fn connection_by_label(&self, label: &str) -> Option<ConnectionControl> {
        self.shared.open_cores().into_iter().find(|c| c.label == label).map(|core| ConnectionControl { core })
    }

    /// Every live connection, oldest first.
    pub fn connections(&self) -> Vec<ConnectionControl> {
        self.shared.open_cores().into_iter().map(|core| ConnectionControl { core }).collect()
    }

    /// Waits until every connection's task has handled every message sent to it so far (sends,
    /// cancels, abandons, drains, closes…), so the observations are up to date. Takes no
    /// (virtual) time.
    pub async fn settle(&self) {
        for core in self.shared.connection_cores() {
            let Some(commands) = core.commands.upgrade() else { continue };
            let (reply, done) = oneshot::channel();
            let sent = commands.send(Command::Sync { reply }).is_ok();
            drop(commands);
            if sent {
                let _ = done.await;
            }
        }
    }

    // ----- observations ------------------------------------------------------------------

    /// Connection attempts that reached the agent, refused ones included.
    pub fn connect_attempts(&self) -> usize {
        self.shared.observations.lock().connect_attempts
    }

    /// Connections that completed their handshake.
    pub fn connections_opened(&self) -> usize {
        self.shared.observations.lock().connections_opened
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        self.shared.open_cores().len()
    }

    /// The hellos received, in order.
    pub fn hellos(&self) -> Vec<Hello> {
        self.shared.observations.lock().hellos.clone()
    }

    /// Events received, over every connection.
    pub fn events_received(&self) -> usize {
        self.shared.observations.lock().events.len()
    }

    /// Every event received: (connection label, correlation id, kind), in arrival order.
    pub fn events_by_connection(&self) -> Vec<(String, CorrelationId, EventKind)> {
        self.shared
            .observations
            .lock()
            .events
            .iter()
            .map(|(label, e)| (label.clone(), e.correlation_id().clone(), e.kind()))
            .collect()
    }

    /// Every event received, whole, with its connection label, in arrival order.
    pub fn events(&self) -> Vec<(String, Event)> {
        self.shared.observations.lock().events.clone()
    }

    /// Every cancel received: (connection label, correlation id, reason), in order. A dropped
    /// [`send`](pool_api::AgentConnection::send) future shows here as
    /// [`CancelReason::Abandoned`].
    pub fn cancels(&self) -> Vec<(String, CorrelationId, CancelReason)> {
        self.shared.observations.lock().cancels.clone()
    }

    /// Labels of the connections that were told to drain, in order.
    pub fn drains(&self) -> Vec<String> {
        self.shared.observations.lock().drains.clone()
    }

    /// Labels of the connections the proxy closed, in order.
    pub fn closes(&self) -> Vec<String> {
        self.shared.observations.lock().closes.clone()
    }

    /// One label per ping received, in order.
    pub fn pings(&self) -> Vec<String> {
        self.shared.observations.lock().pings.clone()
    }

    /// The proxy's answers to agent-initiated configuration updates, with their connection
    /// labels, in order.
    pub fn config_answers(&self) -> Vec<(String, ConfigUpdateAnswer)> {
        self.shared.observations.lock().config_answers.clone()
    }

    /// Configuration pushes received, with their connection labels, in order.
    pub fn config_pushes(&self) -> Vec<(String, ConfigPush)> {
        self.shared.observations.lock().config_pushes.clone()
    }

    /// Requests received and neither answered nor cancelled yet, over every connection.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::SeqCst)
    }

    /// The highest [`pending`](MemoryAgent::pending) count ever reached.
    pub fn peak_pending(&self) -> usize {
        self.shared.peak_pending.load(Ordering::SeqCst)
    }

    /// Forgets the recorded hellos, events, cancels, drains, closes, pings and pushes. Counters
    /// (connection attempts, connections opened, pending, peak) and labels are kept.
    pub fn clear_observations(&self) {
        let mut obs = self.shared.observations.lock();
        *obs = Observations {
            connect_attempts: obs.connect_attempts,
            connections_opened: obs.connections_opened,
            ..Observations::default()
        };
    }
}

/// The agent's end of one live connection: signals it sends on that connection alone, and its
/// state as the agent sees it. Get one from [`MemoryAgent::connection`].
#[derive(Clone)]
pub struct ConnectionControl {
    core: Arc<ConnCore>,
}

impl fmt::Debug for ConnectionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionControl")
            .field("label", &self.core.label)
            .field("open", &self.core.is_open())
            .finish()
    }
}

impl ConnectionControl {
    /// The agent asks the proxy for something on its own initiative (a reload, a rule
    /// update…): returns the request id, or `None` if the connection is closed. The proxy's
    /// answer shows up in [`MemoryAgent::config_answers`].
    pub fn request_config_update(&self, kind: ConfigUpdateKind) -> Option<u64> {
        self.core.request_config_update(kind)
    }

    /// The connection's label, `"{endpoint}#{n}"`.
    pub fn label(&self) -> &str {
        &self.core.label
    }

    /// The `n` of the label: connections opened to this agent before this one.
    pub fn index(&self) -> u64 {
        self.core.index
    }

    /// False once the connection is closed, by either side.
    pub fn is_open(&self) -> bool {
        self.core.is_open()
    }

    /// Requests pending on this connection.
    pub fn pending(&self) -> usize {
        self.core.pending.load(Ordering::SeqCst)
    }

    /// Publishes a flow-control signal on this connection.
    pub fn flow(&self, signal: FlowControl) {
        self.core.flow(signal);
    }

    /// Pauses this connection.
    pub fn pause(&self) {
        self.flow(FlowControl::Pause);
    }

    /// Resumes this connection.
    pub fn resume(&self) {
        self.flow(FlowControl::Resume);
    }

    /// Announces `capacity` on this connection.
    pub fn set_capacity(&self, capacity: u32) {
        self.flow(FlowControl::Capacity(capacity));
    }

    /// Reports `health` on this connection.
    pub fn report_health(&self, health: AgentHealth) {
        self.core.report_health(health);
    }

    /// Kills this connection, like [`MemoryAgent::disconnect_all`] does to all of them.
    pub fn disconnect(&self) {
        self.core.kill("the agent closed the connection");
    }
}
