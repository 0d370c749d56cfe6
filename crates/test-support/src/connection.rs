//! The proxy side of one in-memory connection, and the task that runs it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use pool_api::{
    AgentConnection, AgentError, AgentHealth, BoxFuture, CancelReason, Capabilities, ConfigAck, ConfigPush,
    ConfigUpdateAnswer, ConfigUpdateKind, ConfigUpdateRequest, ConnectionSignals, CorrelationId, Decision,
    Endpoint, Event, FlowControl, TransportError,
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::agent::{AgentShared, ConfigBehaviour, INJECTED_FAILURE, Outcome};

/// What the proxy side sends to a connection's task.
pub(crate) enum Command {
    /// A request, keyed by the connection's own stream id.
    Send { stream: u64, event: Event, reply: oneshot::Sender<Result<Decision, TransportError>> },
    /// Cancel every pending request of a correlation id.
    Cancel { correlation_id: CorrelationId, reason: CancelReason },
    /// Cancel every pending request.
    CancelAll { reason: CancelReason },
    /// The caller dropped its `send` future: forget the stream.
    Abandon { stream: u64 },
    /// The request's deadline passed: forget the stream and tell the agent (reason timeout).
    Expire { stream: u64 },
    /// A ping.
    Ping { reply: oneshot::Sender<()> },
    /// A configuration push.
    Push { push: ConfigPush, reply: oneshot::Sender<ConfigAck> },
    /// The proxy drains the connection.
    Drain,
    /// The proxy closes the connection.
    Close,
    /// The connection died (the agent hung up); the reason is in [`ConnCore::closed`].
    Kill,
    /// Answered at once: every command sent before it has been handled.
    Sync { reply: oneshot::Sender<()> },
}

/// The part of a connection shared by the proxy-side handle, the agent side and the task.
pub(crate) struct ConnCore {
    pub(crate) label: String,
    pub(crate) index: u64,
    signals: watch::Sender<ConnectionSignals>,
    /// Why the connection closed, once it has (set once: `is_open` is one atomic load).
    closed: std::sync::OnceLock<String>,
    /// Does not keep the task alive: it ends when every proxy-side sender is gone.
    pub(crate) commands: mpsc::WeakUnboundedSender<Command>,
    /// Requests pending on this connection.
    pub(crate) pending: AtomicUsize,
    /// Agent-initiated configuration updates on their way to the proxy; dropped on close so
    /// the proxy's receiver ends.
    updates: Mutex<Option<mpsc::UnboundedSender<ConfigUpdateRequest>>>,
    next_update_id: AtomicU64,
}

impl ConnCore {
    pub(crate) fn is_open(&self) -> bool {
        self.closed.get().is_none()
    }

    fn closed_error(&self) -> TransportError {
        let reason = self.closed.get().cloned().unwrap_or_else(|| "the connection's task ended".to_owned());
        TransportError::Closed { connection: self.label.clone(), reason }
    }

    /// Marks the connection closed and publishes `open: false`. Returns false if it already was.
    fn mark_closed(&self, reason: &str) -> bool {
        if self.closed.set(reason.to_owned()).is_err() {
            return false;
        }
        self.updates.lock().take();
        self.signals.send_modify(|s| s.open = false);
        true
    }

    /// Sends an agent-initiated configuration update to the proxy; its request id, or `None`
    /// if the connection is closed.
    pub(crate) fn request_config_update(&self, kind: ConfigUpdateKind) -> Option<u64> {
        let request_id = self.next_update_id.fetch_add(1, Ordering::Relaxed);
        let tx = self.updates.lock().clone()?;
        tx.send(ConfigUpdateRequest { request_id, kind }).ok().map(|()| request_id)
    }

    /// The connection dies now: pending requests fail with [`TransportError::Closed`].
    pub(crate) fn kill(&self, reason: &str) {
        if self.mark_closed(reason)
            && let Some(commands) = self.commands.upgrade()
        {
            let _ = commands.send(Command::Kill);
        }
    }

    /// Publishes signals, unless the connection is closed.
    fn publish(&self, modify: impl FnOnce(&mut ConnectionSignals)) {
        if self.is_open() {
            self.signals.send_modify(modify);
        }
    }

    pub(crate) fn flow(&self, signal: FlowControl) {
        self.publish(|s| s.flow = s.flow.apply(signal));
    }

    pub(crate) fn report_health(&self, health: AgentHealth) {
        self.publish(|s| s.health = health);
    }
}

/// One live in-memory connection, as the proxy sees it.
///
/// Returned (as `Arc<dyn AgentConnection>`) by the handshake of a
/// [`MemoryConnector`](crate::MemoryConnector) connection. Like a socket-backed connection, it
/// is run by one task that owns the state: every method enqueues a message to that task and
/// returns at once; each request is handled by the agent in a task of its own, so any number may
/// be in flight. Requests are keyed by the connection's own stream ids, never by correlation id.
///
/// The connection lives until it is closed, the agent kills it, or the proxy drops this handle
/// and every future it returned.
pub struct MemoryConnection {
    core: Arc<ConnCore>,
    commands: mpsc::UnboundedSender<Command>,
    capabilities: Capabilities,
    next_stream: AtomicU64,
    agent: Arc<AgentShared>,
    updates: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ConfigUpdateRequest>>>,
}

impl fmt::Debug for MemoryConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConnection")
            .field("label", &self.core.label)
            .field("open", &self.core.is_open())
            .field("agent_id", &self.capabilities.agent_id)
            .finish_non_exhaustive()
    }
}

impl MemoryConnection {
    /// Sends `event`, answered by `deadline` if it has one.
    fn send_with(
        &self,
        event: &Event,
        deadline: Option<tokio::time::Instant>,
    ) -> BoxFuture<'static, Result<Decision, TransportError>> {
        if let Some(closed) = self.closed() {
            return closed;
        }
        let kind = event.kind();
        if !self.capabilities.supports(kind) {
            return ready(Err(TransportError::Unsupported {
                connection: self.core.label.clone(),
                operation: kind.as_str(),
            }));
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        if let Err(e) = self.enqueue(Command::Send { stream, event: event.clone(), reply }) {
            return ready(Err(e));
        }
        let guard = AbandonGuard { commands: Some(self.commands.clone()), stream };
        let core = Arc::clone(&self.core);
        Box::pin(async move {
            let mut guard = guard;
            let answer = match deadline {
                None => answer.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, answer).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        guard.expire();
                        return Err(TransportError::DeadlineExceeded { connection: core.label.clone() });
                    }
                },
            };
            guard.disarm();
            answer.unwrap_or_else(|_| Err(core.closed_error()))
        })
    }

    /// Opens a connection to `agent` after a successful handshake and starts its task.
    pub(crate) fn open(
        agent: &Arc<AgentShared>,
        endpoint: &Endpoint,
        capabilities: Capabilities,
    ) -> Arc<Self> {
        let index = agent.next_index.fetch_add(1, Ordering::SeqCst);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        let signals =
            watch::Sender::new(ConnectionSignals { health: agent.health(), ..ConnectionSignals::open() });
        let core = Arc::new(ConnCore {
            label: format!("{endpoint}#{index}"),
            index,
            signals,
            closed: std::sync::OnceLock::new(),
            commands: commands.downgrade(),
            pending: AtomicUsize::new(0),
            updates: Mutex::new(Some(updates_tx)),
            next_update_id: AtomicU64::new(0),
        });
        agent.add_connection(Arc::clone(&core));
        let limiter = capabilities.max_concurrency.map(|n| Arc::new(Semaphore::new(n.get() as usize)));
        let task = ConnectionTask {
            core: Arc::clone(&core),
            agent: Arc::clone(agent),
            pending: HashMap::new(),
            done_tx,
            limiter,
            silent_pings: Vec::new(),
            unanswered_pushes: Vec::new(),
            config_tasks: JoinSet::new(),
        };
        tokio::spawn(task.run(command_rx, done_rx));
        Arc::new(Self {
            core,
            commands,
            capabilities,
            next_stream: AtomicU64::new(0),
            agent: Arc::clone(agent),
            updates: Arc::new(tokio::sync::Mutex::new(updates_rx)),
        })
    }

    /// The `n` of the label: connections opened to this agent before this one.
    pub fn index(&self) -> u64 {
        self.core.index
    }

    /// False once the connection is closed, by either side.
    pub fn is_open(&self) -> bool {
        self.core.is_open()
    }

    fn closed<T: Send + 'static>(&self) -> Option<BoxFuture<'static, Result<T, TransportError>>> {
        if self.core.is_open() { None } else { Some(ready(Err(self.core.closed_error()))) }
    }

    /// Enqueues `command`; if the task is gone, returns the connection's closed error.
    fn enqueue(&self, command: Command) -> Result<(), TransportError> {
        self.commands.send(command).map_err(|_| self.core.closed_error())
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

/// Tells the connection's task that a `send` future was dropped before its answer came.
struct AbandonGuard {
    commands: Option<mpsc::UnboundedSender<Command>>,
    stream: u64,
}

impl AbandonGuard {
    fn disarm(&mut self) {
        self.commands = None;
    }

    /// The deadline passed: the request is cancelled with reason timeout, not abandoned.
    fn expire(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Expire { stream: self.stream });
        }
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Abandon { stream: self.stream });
        }
    }
}

impl AgentConnection for MemoryConnection {
    fn label(&self) -> &str {
        &self.core.label
    }

    fn is_open(&self) -> bool {
        self.core.is_open()
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Sends one event.
    ///
    /// The event is enqueued when this is called, not when the future is first polled, so events
    /// reach the agent in call order. It fails at once with [`TransportError::Closed`] on a
    /// closed connection and with [`TransportError::Unsupported`] if the agent's capabilities
    /// leave out the event's kind. Dropping the future before it resolves cancels the request
    /// with [`CancelReason::Abandoned`]. The in-memory agent gets a clone of the event, where a
    /// real transport would encode it.
    fn send(&self, event: &Event) -> BoxFuture<'static, Result<Decision, TransportError>> {
        self.send_with(event, None)
    }

    /// Sends one event as [`send`](Self::send) does, failing it with
    /// [`TransportError::DeadlineExceeded`] at `deadline` and telling the agent (a cancel with
    /// reason timeout), as the multiplexing transports do.
    fn send_until(
        &self,
        event: &Event,
        deadline: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<Decision, TransportError>> {
        self.send_with(event, Some(deadline))
    }

    fn cancel(&self, correlation_id: &CorrelationId, reason: CancelReason) {
        if self.core.is_open() {
            let _ = self.enqueue(Command::Cancel { correlation_id: correlation_id.clone(), reason });
        }
    }

    fn cancel_all(&self, reason: CancelReason) {
        if self.core.is_open() {
            let _ = self.enqueue(Command::CancelAll { reason });
        }
    }

    fn signals(&self) -> watch::Receiver<ConnectionSignals> {
        self.core.signals.subscribe()
    }

    /// Pings the agent's end of the connection, which answers at once (so under a paused clock
    /// the time is zero), or never while the agent is silent.
    fn ping(&self) -> BoxFuture<'static, Result<Duration, TransportError>> {
        if let Some(closed) = self.closed() {
            return closed;
        }
        let start = Instant::now();
        let (reply, pong) = oneshot::channel();
        if let Err(e) = self.enqueue(Command::Ping { reply }) {
            return ready(Err(e));
        }
        let core = Arc::clone(&self.core);
        Box::pin(async move {
            match pong.await {
                Ok(()) => Ok(start.elapsed()),
                Err(_) => Err(core.closed_error()),
            }
        })
    }

    /// Pushes configuration; the agent answers per its
    /// [`ConfigBehaviour`](crate::ConfigBehaviour). Fails at once with
    /// [`TransportError::Unsupported`] if the agent's capabilities do not announce
    /// [`config_push`](pool_api::Features::config_push).
    fn push_config(&self, push: ConfigPush) -> BoxFuture<'static, Result<ConfigAck, TransportError>> {
        if let Some(closed) = self.closed() {
            return closed;
        }
        if !self.capabilities.features.config_push {
            return ready(Err(TransportError::Unsupported {
                connection: self.core.label.clone(),
                operation: "config push",
            }));
        }
        let (reply, ack) = oneshot::channel();
        if let Err(e) = self.enqueue(Command::Push { push, reply }) {
            return ready(Err(e));
        }
        let core = Arc::clone(&self.core);
        Box::pin(async move { ack.await.map_err(|_| core.closed_error()) })
    }

    fn next_config_update(&self) -> BoxFuture<'static, Option<ConfigUpdateRequest>> {
        let updates = Arc::clone(&self.updates);
        Box::pin(async move { updates.lock().await.recv().await })
    }

    fn answer_config_update(&self, answer: ConfigUpdateAnswer) {
        self.agent.record_config_answer(&self.core.label, answer);
    }

    /// Publishes `draining: true` and tells the agent.
    fn drain(&self) {
        if self.core.is_open() {
            self.core.signals.send_modify(|s| s.draining = true);
            let _ = self.enqueue(Command::Drain);
        }
    }

    /// Tells the agent, publishes `open: false` and fails every pending request with
    /// [`TransportError::Closed`].
    fn close(&self) {
        if self.core.is_open() {
            let _ = self.enqueue(Command::Close);
            self.core.mark_closed("closed by the proxy");
        }
    }
}

/// A request the agent has received and not yet answered.
struct PendingRequest {
    correlation_id: CorrelationId,
    reply: oneshot::Sender<Result<Decision, TransportError>>,
    _task: AbortOnDrop,
    _count: PendingCount,
}

/// Whatever takes a request out of the pending set, its handling stops.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts one pending request, on its connection and on its agent, for as long as it lives.
struct PendingCount {
    core: Arc<ConnCore>,
    agent: Arc<AgentShared>,
}

impl PendingCount {
    fn new(core: &Arc<ConnCore>, agent: &Arc<AgentShared>) -> Self {
        core.pending.fetch_add(1, Ordering::SeqCst);
        let now = agent.pending.fetch_add(1, Ordering::SeqCst) + 1;
        agent.peak_pending.fetch_max(now, Ordering::SeqCst);
        Self { core: Arc::clone(core), agent: Arc::clone(agent) }
    }
}

impl Drop for PendingCount {
    fn drop(&mut self) {
        self.core.pending.fetch_sub(1, Ordering::SeqCst);
        self.agent.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The agent's answer to one stream.
struct Done {
    stream: u64,
    result: Result<Decision, AgentError>,
}

/// Sends the request task's answer; if the task ends without one (it panicked), sends an error
/// instead. When the task was aborted the connection's task has already forgotten the stream
/// and ignores it.
struct DoneGuard {
    done: mpsc::UnboundedSender<Done>,
    stream: u64,
    sent: bool,
}

impl DoneGuard {
    fn send(mut self, result: Result<Decision, AgentError>) {
        self.sent = true;
        let _ = self.done.send(Done { stream: self.stream, result });
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if !self.sent {
            let result = Err(AgentError::new("the agent's handler panicked"));
            let _ = self.done.send(Done { stream: self.stream, result });
        }
    }
}

/// The task that owns one connection.
struct ConnectionTask {
    core: Arc<ConnCore>,
    /// The agent serves the connection for as long as it lives, even if the test drops every
    /// handle to the agent.
    agent: Arc<AgentShared>,
    pending: HashMap<u64, PendingRequest>,
    done_tx: mpsc::UnboundedSender<Done>,
    limiter: Option<Arc<Semaphore>>,
    silent_pings: Vec<oneshot::Sender<()>>,
    unanswered_pushes: Vec<oneshot::Sender<ConfigAck>>,
    config_tasks: JoinSet<()>,
}

impl ConnectionTask {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut done: mpsc::UnboundedReceiver<Done>,
    ) {
        loop {
            tokio::select! {
                // Fixed order, so that runs are reproducible.
                biased;
                command = commands.recv() => match command {
                    Some(command) => {
                        if !self.handle(command) {
                            break;
                        }
                    }
                    None => break,
                },
                Some(done) = done.recv() => self.answer(done),
            }
        }
        self.shut_down(commands);
    }

    /// Handles one command; false when the connection must end.
    fn handle(&mut self, command: Command) -> bool {
        let agent = Arc::clone(&self.agent);
        let core = Arc::clone(&self.core);
        let label = core.label.as_str();
        match command {
            Command::Send { stream, event, reply } => self.start(&agent, stream, event, reply),
            Command::Cancel { correlation_id, reason } => {
                agent.record_cancel(label, &correlation_id, reason);
                for (_, request) in self.pending.extract_if(|_, r| r.correlation_id == correlation_id) {
                    let _ = request.reply.send(Err(TransportError::Cancelled(reason)));
                }
            }
            Command::CancelAll { reason } => {
                for (_, request) in self.pending.drain() {
                    agent.record_cancel(label, &request.correlation_id, reason);
                    let _ = request.reply.send(Err(TransportError::Cancelled(reason)));
                }
            }
            Command::Abandon { stream } => {
                if let Some(request) = self.pending.remove(&stream) {
                    agent.record_cancel(label, &request.correlation_id, CancelReason::Abandoned);
                }
            }
            Command::Expire { stream } => {
                if let Some(request) = self.pending.remove(&stream) {
                    agent.record_cancel(label, &request.correlation_id, CancelReason::Timeout);
                }
            }
            Command::Ping { reply } => {
                agent.record_ping(label);
                if agent.is_silent() {
                    self.silent_pings.retain(|p| !p.is_closed());
                    self.silent_pings.push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            Command::Push { push, reply } => {
                agent.record_config_push(label, &push);
                while self.config_tasks.try_join_next().is_some() {}
                match agent.config_behaviour() {
                    ConfigBehaviour::Handler => {
                        let agent = Arc::clone(&agent);
                        self.config_tasks.spawn(async move {
                            let ack = agent.handler.on_config(push).await;
                            let _ = reply.send(ack);
                        });
                    }
                    ConfigBehaviour::Accept => {
                        let _ = reply.send(ConfigAck::accepted(push.push_id));
                    }
                    ConfigBehaviour::Reject(message) => {
                        let _ = reply.send(ConfigAck::rejected(push.push_id, message));
                    }
                    ConfigBehaviour::Never => {
                        self.unanswered_pushes.retain(|p| !p.is_closed());
                        self.unanswered_pushes.push(reply);
                    }
                }
            }
            Command::Drain => agent.record_drain(label),
            Command::Close => {
                agent.record_close(label);
                self.core.mark_closed("closed by the proxy");
                return false;
            }
            Command::Kill => return false,
            Command::Sync { reply } => {
                let _ = reply.send(());
            }
        }
        true
    }

    /// The agent receives a request and starts handling it in a task of its own.
    fn start(
        &mut self,
        agent: &Arc<AgentShared>,
        stream: u64,
        event: Event,
        reply: oneshot::Sender<Result<Decision, TransportError>>,
    ) {
        agent.record_event(&self.core.label, &event);
        let plan = agent.plan_event();
        let correlation_id = event.correlation_id().clone();
        let guard = DoneGuard { done: self.done_tx.clone(), stream, sent: false };
        let limiter = self.limiter.clone();
        let handler_agent = Arc::clone(agent);
        let task = tokio::spawn(async move {
            // Held until the answer is sent: the agent handles at most `max_concurrency`
            // requests of this connection at once, and queues the others.
            let _permit = match limiter {
                Some(limiter) => limiter.acquire_owned().await.ok(),
                None => None,
            };
            if !plan.latency.is_zero() {
                tokio::time::sleep(plan.latency).await;
            }
            let result = match plan.outcome {
                Outcome::Handle => handler_agent.handler.on_event(event).await,
                Outcome::Fail => Err(AgentError::new(INJECTED_FAILURE)),
                Outcome::Silent => std::future::pending().await,
            };
            guard.send(result);
        });
        let count = PendingCount::new(&self.core, agent);
        self.pending.insert(
            stream,
            PendingRequest { correlation_id, reply, _task: AbortOnDrop(task.abort_handle()), _count: count },
        );
    }

    /// The agent answered a stream; a stream cancelled meanwhile is ignored.
    fn answer(&mut self, done: Done) {
        if let Some(request) = self.pending.remove(&done.stream) {
            let _ = request.reply.send(done.result.map_err(TransportError::Agent));
        }
    }

    /// The connection is over: fail everything still pending or queued, at once.
    fn shut_down(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        self.core.mark_closed("the proxy dropped the connection");
        let error = self.core.closed_error();
        for (_, request) in self.pending.drain() {
            let _ = request.reply.send(Err(error.clone()));
        }
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Send { reply, .. } = command {
                let _ = reply.send(Err(error.clone()));
            }
            // Other replies are dropped, which their futures report as `Closed`.
        }
        // Dropping the rest (silent pings, unanswered pushes, config tasks) fails them too.
        self.config_tasks.abort_all();
        self.agent.remove_connection(&self.core);
    }
}
