//! The proxy side: a [`Connector`] for `grpc://`, `grpcs://` and `grpc+unix:` endpoints and the
//! connection it opens.
//!
//! Each connection is its own HTTP/2 connection (a tonic `Channel` over a socket this module
//! dials itself, so that TCP, TLS and Unix sockets share one path) carrying one
//! `AgentProtocol/Connect` call. Requests get a numeric stream id and wait in a table for the
//! answer with that id, so any number are in flight on the one call; the table is
//! [`pool_api::streams::PendingRequests`], shared with `transport-uds`.
//! Frames go out through an unbounded channel that is the call's request stream: a request is
//! registered and its frame queued in one critical section, so its answer always finds it,
//! and the number queued is bounded by the pool's permits, which follow the concurrency the
//! agent advertises. An event is encoded there by [`pool_api::wire`] from the caller's borrowed
//! value, into a buffer the connection reuses, and travels as bytes ([`crate::codec`]); a
//! decision is decoded straight into [`Decision`] the same way. One task reads the response
//! stream and hands each answer to its waiter. It also keeps the one timer for every request
//! sent with a deadline ([`AgentConnection::send_until`]), armed for the earliest: a request
//! past its deadline fails with [`TransportError::DeadlineExceeded`] and a cancel (reason
//! timeout) goes to the agent. Registering a deadline costs a comparison, not a timer.
//!
//! The end of the response stream, a gRPC error on it (a message that does not decode, one
//! over the size limit, a reset stream, a connection HTTP/2 keep-alive found dead), or a frame
//! that breaks the protocol fails every pending request at once with
//! [`TransportError::Closed`] naming the connection and the reason, and publishes
//! `open: false`. An event or push that would encode over the size limit fails alone with
//! [`TransportError::MessageTooLarge`]; it is checked before anything is queued.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::streams::{DeadlineTimer, PendingRequests};
use pool_api::wire;
use pool_api::{
    AgentConnection, AgentError, BoxFuture, CancelReason, Capabilities, ConfigAck, ConfigPush,
    ConfigUpdateAnswer, ConfigUpdateRequest, ConnectionSignals, Connector, CorrelationId, Decision, Endpoint,
    Event, Hello, PendingConnection, TransportError,
};
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::DEFAULT_MAX_MESSAGE;
use crate::codec::{self, FromAgent, ProxyCodec, ToAgent};
use crate::io;
use crate::streams::StreamMap;
use crate::target::GrpcTarget;
use crate::tls::GrpcClientTls;

/// Settings of the proxy side.
///
/// | field | meaning | default |
/// |---|---|---|
/// | `max_message` | largest message read or written, checked on its 5-byte gRPC prefix before it is buffered | 16 MiB |
/// | `connect_timeout` | TCP (or Unix) connect, TLS and HTTP/2 set-up together | 5 s |
/// | `handshake_timeout` | from opening the call to the agent's capabilities | 10 s |
/// | `keep_alive_interval` | HTTP/2 PING sent after this long without a frame from the agent, idle or not | 10 s |
/// | `keep_alive_timeout` | a PING unanswered this long ends the connection | 5 s |
/// | `tls` | needed for `grpcs://` endpoints | none |
#[derive(Clone, Debug)]
pub struct GrpcConnectorConfig {
    /// Largest message read or written (default 16 MiB). An agent announcing a larger one ends
    /// the connection; an event that would encode larger fails alone.
    pub max_message: usize,
    /// Time allowed to establish the HTTP/2 connection, TLS included (default 5 s); then
    /// `connect` fails with [`TransportError::Timeout`].
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keep-alive PINGs (default 10 s), sent whether or not requests are in
    /// flight, so an agent that vanished without closing its socket is found out.
    pub keep_alive_interval: Duration,
    /// How long an HTTP/2 keep-alive PING may go unanswered before the connection is declared
    /// dead and every request on it fails (default 5 s).
    pub keep_alive_timeout: Duration,
    /// Time the agent has to answer the hello (default 10 s); then the handshake fails with
    /// [`TransportError::Handshake`]. (`pool-core` also bounds the handshake with its own
    /// `handshake_timeout`; the shorter one wins.)
    pub handshake_timeout: Duration,
    /// TLS for `grpcs://` endpoints; without it they are refused by `validate_endpoint`.
    pub tls: Option<GrpcClientTls>,
}

impl Default for GrpcConnectorConfig {
    fn default() -> Self {
        Self {
            max_message: DEFAULT_MAX_MESSAGE,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Opens connections to gRPC agents: `grpc://host:port` (h2c), `grpcs://host:port` (TLS, with
/// [`GrpcConnectorConfig::tls`]) and `grpc+unix:/absolute/path`. Every other endpoint is refused
/// by [`validate_endpoint`](Connector::validate_endpoint) with
/// [`TransportError::InvalidEndpoint`] naming it, so `pool-core` turns it away when the agent is
/// added instead of registering an agent with no connection.
#[derive(Clone, Debug, Default)]
pub struct GrpcConnector {
    config: Arc<GrpcConnectorConfig>,
    spread: Option<Arc<pool_api::Placement>>,
}

/// Spawns the tasks of a connection's HTTP/2 client (the connection itself, the request
/// stream's pump, the channel's buffer) on one runtime, rather than on whichever runtime
/// is current when hyper spawns them.
#[derive(Clone)]
struct OnRuntime(tokio::runtime::Handle);

impl<F: std::future::Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for OnRuntime {
    fn execute(&self, task: F) {
        self.0.spawn(task);
    }
}

impl GrpcConnector {
    /// A connector with these settings.
    pub fn new(config: GrpcConnectorConfig) -> Self {
        Self { config: Arc::new(config), spread: None }
    }

    /// Makes each new connection on the next of `runtimes` in turn (an empty list: wherever
    /// `connect` is called, the default): its socket is registered there, and the tasks of its
    /// HTTP/2 connection and the one that reads the agent's answers run there. For a proxy
    /// whose requests run on worker threads, one single-threaded runtime each: given the
    /// workers' runtimes, the connections are spread over them, each reports its thread as
    /// [`AgentConnection::home`], and the pool sends a request made on a worker over a
    /// connection of that worker, so that the exchange and the answer's wake-up stay on that
    /// thread.
    pub fn spread_over(mut self, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        self.spread = pool_api::Placement::new(runtimes).map(Arc::new);
        self
    }

    fn target(&self, endpoint: &Endpoint) -> Result<GrpcTarget, TransportError> {
        let target = GrpcTarget::parse(endpoint)?;
        if matches!(target, GrpcTarget::Tls { .. }) && self.config.tls.is_none() {
            return Err(TransportError::InvalidEndpoint {
                endpoint: endpoint.to_string(),
                message: "a grpcs endpoint needs TLS settings on the connector (GrpcConnectorConfig::tls)"
                    .into(),
            });
        }
        Ok(target)
    }
}

/// The error and its sources, joined: tonic's and hyper's errors say little at the top.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

impl Connector for GrpcConnector {
    fn validate_endpoint(&self, endpoint: &Endpoint) -> Result<(), TransportError> {
        self.target(endpoint).map(drop)
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> BoxFuture<'static, Result<Box<dyn PendingConnection>, TransportError>> {
        let target = match self.target(endpoint) {
            Ok(target) => target,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let config = self.config.clone();
        let endpoint = endpoint.clone();
        let place = self.spread.as_ref().map(|s| s.next_runtime());
        let label = endpoint.to_string();
        let placed = place.is_some();
        let connect = async move {
            let authority = match &target {
                GrpcTarget::Plain { authority } | GrpcTarget::Tls { authority } => authority.to_string(),
                GrpcTarget::Unix { .. } => "localhost".to_owned(),
            };
            let scheme = if matches!(target, GrpcTarget::Tls { .. }) { "https" } else { "http" };
            let uri = format!("{scheme}://{authority}");
            let http = tonic::transport::Endpoint::from_shared(uri.clone())
                .map_err(|e| TransportError::InvalidEndpoint {
                    endpoint: endpoint.to_string(),
                    message: format!("{uri}: {e}"),
                })?
                .http2_keep_alive_interval(config.keep_alive_interval)
                .keep_alive_timeout(config.keep_alive_timeout)
                .keep_alive_while_idle(true)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(2 << 20);
            // Placed: this runs on the chosen runtime, and so do the tasks hyper spawns for the
            // connection later.
            let home = placed.then(|| (tokio::runtime::Handle::current(), pool_api::worker_index()));
            let http = match &home {
                Some((runtime, _)) => http.executor(OnRuntime(runtime.clone())),
                None => http,
            };
            let tls = config.tls.clone();
            let dial = tower::service_fn(move |_: http::Uri| {
                let (target, tls) = (target.clone(), tls.clone());
                async move { io::dial(&target, tls.as_ref()).await.map(hyper_util::rt::TokioIo::new) }
            });
            let timeout = config.connect_timeout;
            let channel = match tokio::time::timeout(timeout, http.connect_with_connector(dial)).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => {
                    return Err(TransportError::Connect {
                        endpoint: endpoint.to_string(),
                        kind: io_kind(&e),
                        message: error_chain(&e),
                    });
                }
                Err(_) => {
                    return Err(TransportError::Timeout {
                        operation: "connect",
                        target: endpoint.to_string(),
                        after: timeout,
                    });
                }
            };
            Ok(Box::new(Pending { channel, endpoint, config, home }) as Box<dyn PendingConnection>)
        };
        Box::pin(async move {
            pool_api::run_on(place, connect).await.map_err(|e| TransportError::Connect {
                endpoint: label,
                kind: None,
                message: format!("its runtime: {e}"),
            })?
        })
    }
}

/// Room the encoding buffer takes at a time…
const ARENA_BLOCK: usize = 64 * 1024;
/// …when less than this is left.
const ARENA_LOW: usize = 4 * 1024;

/// Counts connections per process, for labels.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(0);

struct Pending {
    channel: Channel,
    endpoint: Endpoint,
    config: Arc<GrpcConnectorConfig>,
    /// The runtime the connection was made on and its worker thread, when the connector
    /// places connections.
    home: Option<(tokio::runtime::Handle, Option<usize>)>,
}

impl PendingConnection for Pending {
    fn handshake(
        self: Box<Self>,
        hello: Hello,
    ) -> BoxFuture<'static, Result<Arc<dyn AgentConnection>, TransportError>> {
        let place = self.home.as_ref().map(|(runtime, _)| runtime.clone());
        let endpoint_label = self.endpoint.to_string();
        let handshake = async move {
            let label = format!("{}#{}", self.endpoint, NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
            let endpoint = self.endpoint.to_string();
            let worker = self.home.as_ref().and_then(|(_, worker)| *worker);
            let failed = |message: String| TransportError::Handshake { endpoint: endpoint.clone(), message };
            let offered = hello.supported_versions.clone();
            let (tx, rx) = mpsc::unbounded_channel();
            let hello =
                proto::ProxyFrame { stream_id: 0, body: Some(proxy_frame::Body::Hello(hello.into())) };
            tx.send(ToAgent::Frame(hello)).map_err(|_| failed("the request stream closed".into()))?;
            let max = self.config.max_message;
            let mut client = tonic::client::Grpc::new(self.channel.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max);
            let timeout = self.config.handshake_timeout;
            let call = async {
                client.ready().await.map_err(|e| failed(format!("the connection is not ready: {e}")))?;
                let path = http::uri::PathAndQuery::from_static(codec::CONNECT_PATH);
                let request = tonic::Request::new(UnboundedReceiverStream::new(rx));
                let mut inbound = client
                    .streaming(request, path, ProxyCodec)
                    .await
                    .map_err(|status| failed(format!("the agent refused the call: {status}")))?
                    .into_inner();
                let first = inbound.message().await.map_err(|status| failed(status.to_string()))?;
                Ok::<_, TransportError>((inbound, first))
            };
            let (inbound, first) = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| failed(format!("no answer to the hello within {timeout:?}")))??;
            let first = match first {
                Some(FromAgent::Frame(frame)) => Some(frame),
                Some(FromAgent::Decision { stream_id, .. }) => {
                    return Err(failed(format!(
                        "expected capabilities, got a decision for stream {stream_id}"
                    )));
                }
                None => None,
            };
            let capabilities = match first {
                Some(proto::AgentFrame { body: Some(agent_frame::Body::Capabilities(c)), .. }) => {
                    Capabilities::try_from(c).map_err(|e| failed(e.to_string()))?
                }
                Some(proto::AgentFrame { body: Some(agent_frame::Body::Refused(r)), .. }) => {
                    return Err(
                        if !r.supported_versions.is_empty()
                            && !r.supported_versions.iter().any(|v| offered.contains(v))
                        {
                            TransportError::VersionMismatch {
                                endpoint,
                                proxy: offered,
                                agent: r.supported_versions,
                            }
                        } else {
                            failed(format!("refused: {}", r.message))
                        },
                    );
                }
                Some(other) => return Err(failed(format!("expected capabilities, got {other:?}"))),
                None => return Err(failed("the agent ended the call".into())),
            };
            if !offered.contains(&capabilities.protocol_version) {
                return Err(TransportError::VersionMismatch {
                    endpoint,
                    proxy: offered,
                    agent: vec![capabilities.protocol_version],
                });
            }
            let connection =
                GrpcConnection::start(self.channel, tx, inbound, capabilities, label, max, worker);
            Ok(connection as Arc<dyn AgentConnection>)
        };
        // Placed: the call is opened and its reading task spawned on the connection's runtime.
        Box::pin(async move {
            pool_api::run_on(place, handshake).await.map_err(|e| TransportError::Handshake {
                endpoint: endpoint_label,
                message: format!("its runtime: {e}"),
            })?
        })
    }
}

/// State shared by the handle, the requests in flight and the reading task.
struct Core {
    label: String,
    max_message: usize,
    /// On a cache line of its own: every send reads it, and the lock next to it is written by
    /// every send (sharing a line cost ~1.4 % of a request's CPU in a profile).
    open: CachePadded<AtomicBool>,
    reason: Mutex<Option<String>>,
    signals: watch::Sender<ConnectionSignals>,
    state: Mutex<State>,
    /// Signalled when the request stream has ended (closed, or every handle dropped): the
    /// task gives the agent a moment to end its side, then stops.
    ending: Notify,
    /// Signalled when a request's deadline is earlier than the task's deadline timer is armed
    /// for (rare: deadlines mostly come in the order of their requests).
    rearm: Notify,
}

/// What waits for an answer, and the way out, under one lock: a request is registered in the
/// same critical section that queues its frame, so its answer always finds it.
struct State {
    /// The call's request stream; `None` once it has ended.
    out: Option<mpsc::UnboundedSender<ToAgent>>,
    /// Where events are encoded; each one is split off as the bytes of its message, and the
    /// room is reused once those are written.
    arena: BytesMut,
    pending: PendingRequests,
    pings: StreamMap<(Instant, oneshot::Sender<Duration>)>,
    pushes: HashMap<u64, oneshot::Sender<ConfigAck>>,
    /// The handle was dropped: the request stream ends once nothing waits for an answer.
    orphaned: bool,
}

/// Tells the agent to cancel the request on `stream`, while the request stream is open.
fn send_cancel(
    out: &Option<mpsc::UnboundedSender<ToAgent>>,
    stream: u64,
    correlation_id: CorrelationId,
    reason: CancelReason,
) {
    if let Some(out) = out {
        let cancel = pool_api::Cancel { correlation_id, reason };
        let body = Some(proxy_frame::Body::Cancel(cancel.into()));
        let _ = out.send(ToAgent::Frame(proto::ProxyFrame { stream_id: stream, body }));
    }
}

impl State {
    fn frame(&mut self, stream_id: u64, body: proxy_frame::Body) {
        if let Some(out) = &self.out {
            let _ = out.send(ToAgent::Frame(proto::ProxyFrame { stream_id, body: Some(body) }));
        }
    }

    /// Ends the request stream if the handle is gone and nothing waits; true if it did.
    fn release_if_orphaned(&mut self) -> bool {
        if self.orphaned && self.pending.is_empty() && self.out.is_some() {
            self.out = None;
            return true;
        }
        false
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn closed_error(&self) -> TransportError {
        let reason = self.reason.lock().clone().unwrap_or_else(|| "the connection's task ended".into());
        TransportError::Closed { connection: self.label.clone(), reason }
    }

    /// Runs `f` on the shared state while the request stream is open, or fails with the
    /// connection's closing error.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, TransportError> {
        let mut state = self.lock();
        if state.out.is_none() {
            drop(state);
            return Err(self.closed_error());
        }
        Ok(f(&mut state))
    }

    /// Ends the connection: every pending request fails at once with `reason`, the signals
    /// publish `open: false`, and the request stream ends. Only the first call counts.
    fn shut(&self, reason: &str) {
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::debug!(connection = %self.label, reason, "connection closed");
            *self.reason.lock() = Some(reason.to_owned());
            self.signals.send_modify(|s| s.open = false);
        }
        let error = self.closed_error();
        let (pending, pings, pushes) = {
            let mut state = self.lock();
            state.out = None;
            (state.pending.take_all(), std::mem::take(&mut state.pings), std::mem::take(&mut state.pushes))
        };
        pending.fail(&error);
        drop((pings, pushes));
        self.ending.notify_one();
    }

    fn too_large(&self, size: usize) -> TransportError {
        TransportError::MessageTooLarge {
            connection: self.label.clone(),
            size: size as u64,
            limit: self.max_message as u64,
        }
    }
}

/// One live connection to an agent over gRPC.
pub struct GrpcConnection {
    core: Arc<Core>,
    /// The worker thread whose runtime runs this connection's tasks, when it was placed.
    home: Option<usize>,
    capabilities: Capabilities,
    next_stream: AtomicU64,
    updates: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ConfigUpdateRequest>>>,
}

impl std::fmt::Debug for GrpcConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConnection")
            .field("label", &self.core.label)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for GrpcConnection {
    fn drop(&mut self) {
        let released = {
            let mut state = self.core.lock();
            state.orphaned = true;
            state.release_if_orphaned()
        };
        if released {
            self.core.ending.notify_one();
        }
    }
}

impl GrpcConnection {
    fn start(
        channel: Channel,
        out: mpsc::UnboundedSender<ToAgent>,
        inbound: tonic::Streaming<FromAgent>,
        capabilities: Capabilities,
        label: String,
        max_message: usize,
        home: Option<usize>,
    ) -> Arc<Self> {
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            label,
            max_message,
            open: CachePadded::new(AtomicBool::new(true)),
            reason: Mutex::new(None),
            signals: watch::Sender::new(ConnectionSignals::open()),
            state: Mutex::new(State {
                out: Some(out),
                arena: BytesMut::new(),
                pending: PendingRequests::new(),
                pings: StreamMap::default(),
                pushes: HashMap::new(),
                orphaned: false,
            }),
            ending: Notify::new(),
            rearm: Notify::new(),
        });
        let task = Task { core: core.clone(), inbound, updates: updates_tx };
        tokio::spawn(task.run(channel));
        Arc::new(Self {
            core,
            home,
            capabilities,
            next_stream: AtomicU64::new(1),
            updates: Arc::new(tokio::sync::Mutex::new(updates_rx)),
        })
    }

    fn stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `event`, answered by `deadline` if it has one.
    fn send_with(
        &self,
        event: &Event,
        deadline: Option<Instant>,
    ) -> BoxFuture<'static, Result<Decision, TransportError>> {
        if !self.is_open() {
            return ready(Err(self.core.closed_error()));
        }
        if !self.capabilities.supports(event.kind()) {
            return ready(Err(TransportError::Unsupported {
                connection: self.core.label.clone(),
                operation: event.kind().as_str(),
            }));
        }
        let stream = self.stream();
        let (reply, answer) = oneshot::channel();
        let max = self.core.max_message;
        let queued = self.core.with(|state| {
            // Room in blocks, so most events are encoded without an allocation of their own.
            if state.arena.capacity() < ARENA_LOW {
                state.arena.reserve(ARENA_BLOCK);
            }
            // The size is checked before a byte is written: over it, only this request fails.
            wire::encode_event(stream, event, max, &mut state.arena, |_, _| {})
                .map_err(|e| self.core.too_large(e.size))?;
            let bytes = state.arena.split().freeze();
            let correlation_id = event.correlation_id().clone();
            let rearm = match deadline {
                Some(deadline) => state.pending.insert_until(stream, correlation_id, reply, deadline),
                None => {
                    state.pending.insert(stream, correlation_id, reply);
                    false
                }
            };
            if let Some(out) = &state.out {
                let _ = out.send(ToAgent::Encoded(bytes));
            }
            Ok(rearm)
        });
        match queued {
            Ok(Ok(rearm)) => {
                if rearm {
                    self.core.rearm.notify_one();
                }
            }
            Ok(Err(e)) | Err(e) => return ready(Err(e)),
        }
        let guard = AbandonGuard { core: self.core.clone(), stream, answered: false };
        Box::pin(async move {
            // Moved in whole: dropping this future before the answer is what abandons it.
            let mut guard = guard;
            let result = answer.await.unwrap_or_else(|_| Err(guard.core.closed_error()));
            guard.answered = true;
            result
        })
    }
}

fn ready<T: Send + 'static>(
    value: Result<T, TransportError>,
) -> BoxFuture<'static, Result<T, TransportError>> {
    Box::pin(std::future::ready(value))
}

/// Tells the agent a `send` was dropped before its answer came.
struct AbandonGuard {
    core: Arc<Core>,
    stream: u64,
    answered: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.answered {
            let stream = self.stream;
            let _ = self.core.with(|state| {
                if let Some(waiter) = state.pending.take(stream) {
                    send_cancel(&state.out, stream, waiter.into_correlation_id(), CancelReason::Abandoned);
                }
                if state.release_if_orphaned() {
                    self.core.ending.notify_one();
                }
            });
        }
    }
}

impl AgentConnection for GrpcConnection {
    fn label(&self) -> &str {
        &self.core.label
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn is_open(&self) -> bool {
        self.core.open.load(Ordering::Acquire)
    }

    fn home(&self) -> Option<usize> {
        self.home
    }

    fn send(&self, event: &Event) -> BoxFuture<'static, Result<Decision, TransportError>> {
        self.send_with(event, None)
    }

    /// Keeps the deadline with the request in the table of waiting requests: the connection's
    /// task watches all of them with one timer, and fails an expired request with
    /// [`TransportError::DeadlineExceeded`] and a cancel (reason timeout) to the agent.
    fn send_until(
        &self,
        event: &Event,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<Decision, TransportError>> {
        self.send_with(event, Some(deadline))
    }

    fn cancel(&self, correlation_id: &CorrelationId, reason: CancelReason) {
        let _ = self.core.with(|state| {
            let State { pending, out, .. } = state;
            pending.cancel(correlation_id, reason, |stream, correlation_id| {
                send_cancel(out, stream, correlation_id, reason);
            });
        });
    }

    fn cancel_all(&self, reason: CancelReason) {
        let _ = self.core.with(|state| {
            let State { pending, out, .. } = state;
            pending.cancel_all(reason, |stream, correlation_id| {
                send_cancel(out, stream, correlation_id, reason);
            });
        });
    }

    fn signals(&self) -> watch::Receiver<ConnectionSignals> {
        self.core.signals.subscribe()
    }

    fn ping(&self) -> BoxFuture<'static, Result<Duration, TransportError>> {
        let (reply, pong) = oneshot::channel();
        let stream = self.stream();
        if let Err(e) = self.core.with(|state| {
            state.pings.insert(stream, (Instant::now(), reply));
            state.frame(stream, proxy_frame::Body::Ping(proto::Ping {}));
        }) {
            return ready(Err(e));
        }
        let core = self.core.clone();
        Box::pin(async move { pong.await.map_err(|_| core.closed_error()) })
    }

    fn push_config(&self, push: ConfigPush) -> BoxFuture<'static, Result<ConfigAck, TransportError>> {
        if !self.capabilities.features.config_push {
            return ready(Err(TransportError::Unsupported {
                connection: self.core.label.clone(),
                operation: "config push",
            }));
        }
        let id = push.push_id;
        let frame =
            proto::ProxyFrame { stream_id: id, body: Some(proxy_frame::Body::ConfigPush(push.into())) };
        let size = frame.encoded_len();
        if size > self.core.max_message {
            return ready(Err(self.core.too_large(size)));
        }
        let (reply, ack) = oneshot::channel();
        if let Err(e) = self.core.with(|state| {
            state.pushes.insert(id, reply);
            if let Some(out) = &state.out {
                let _ = out.send(ToAgent::Frame(frame));
            }
        }) {
            return ready(Err(e));
        }
        let core = self.core.clone();
        Box::pin(async move { ack.await.map_err(|_| core.closed_error()) })
    }

    fn next_config_update(&self) -> BoxFuture<'static, Option<ConfigUpdateRequest>> {
        let updates = self.updates.clone();
        Box::pin(async move { updates.lock().await.recv().await })
    }

    fn answer_config_update(&self, answer: ConfigUpdateAnswer) {
        let _ = self.core.with(|state| state.frame(0, proxy_frame::Body::ConfigUpdateAnswer(answer.into())));
    }

    fn drain(&self) {
        if self.is_open() {
            self.core.signals.send_modify(|s| s.draining = true);
            let _ = self.core.with(|state| state.frame(0, proxy_frame::Body::Drain(proto::Drain {})));
        }
    }

    fn close(&self) {
        let _ = self.core.with(|state| state.frame(0, proxy_frame::Body::Shutdown(proto::Shutdown {})));
        self.core.shut("closed by the proxy");
    }
}

/// Records one metric an agent reported as the gauge `agentpool_agent_metric`, labelled with
/// the connection, the agent's metric name and the agent's own labels, as `transport-uds`
/// does. A value that is not finite is dropped (it cannot be exported).
fn record_metric(connection: &str, metric: pool_api::AgentMetric) {
    if !metric.value.is_finite() || metric.name.is_empty() {
        tracing::debug!(connection, name = %metric.name, value = metric.value, "agent metric dropped");
        return;
    }
    let mut labels = Vec::with_capacity(metric.labels.len() + 2);
    labels.push(metrics::Label::new("connection", connection.to_owned()));
    labels.push(metrics::Label::new("metric", metric.name));
    labels.extend(
        metric
            .labels
            .into_iter()
            .filter(|(k, _)| k != "connection" && k != "metric")
            .map(|(k, v)| metrics::Label::new(k, v)),
    );
    metrics::gauge!("agentpool_agent_metric", labels).set(metric.value);
}

/// How long the agent has to end its side of the call once ours has ended.
const END_GRACE: Duration = Duration::from_secs(1);

/// The task that reads one call's response stream.
struct Task {
    core: Arc<Core>,
    inbound: tonic::Streaming<FromAgent>,
    updates: mpsc::UnboundedSender<ConfigUpdateRequest>,
}

/// A task dropped before its end (its runtime stopped: a worker thread that ended) closes the
/// connection like any other end: waiting requests fail at once instead of at their deadlines,
/// and the pool sees the connection closed.
impl Drop for Task {
    fn drop(&mut self) {
        self.core.shut("the connection's runtime stopped");
    }
}

impl Task {
    async fn run(mut self, channel: Channel) {
        // Held so the HTTP/2 connection lives exactly as long as this task.
        let _channel = channel;
        // Both made once, not per message: registering with a `Notify` takes its lock.
        let core = self.core.clone();
        let ending = core.ending.notified();
        tokio::pin!(ending);
        let grace = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(grace);
        // The one timer for every request's deadline, armed for the earliest.
        let rearm = core.rearm.notified();
        tokio::pin!(rearm);
        let mut deadlines = DeadlineTimer::new();
        let mut ended = false;
        let reason = loop {
            tokio::select! {
                () = &mut rearm => {
                    rearm.set(core.rearm.notified());
                    let next = core.lock().pending.arm();
                    deadlines.set(next);
                }
                () = deadlines.fired(), if deadlines.is_armed() => {
                    let next = self.expire();
                    deadlines.set(next);
                }
                () = &mut ending, if !ended => {
                    ended = true;
                    grace.as_mut().reset(Instant::now() + END_GRACE);
                }
                () = &mut grace, if ended => {
                    break core.reason.lock().clone().unwrap_or_else(|| "every handle was dropped".into());
                }
                message = self.inbound.message() => match message {
                    Ok(Some(FromAgent::Decision { stream_id, decision })) => {
                        self.answered(stream_id, Ok(decision));
                    }
                    Ok(Some(FromAgent::Frame(frame))) => {
                        if let Err(reason) = self.on_frame(frame) {
                            break reason;
                        }
                    }
                    Ok(None) => break "the agent ended the call".to_owned(),
                    Err(status) => break describe(&status),
                },
            }
        };
        self.core.shut(&reason);
    }

    /// Fails the requests past their deadline, tells the agent, and says when to look again.
    fn expire(&self) -> Option<Instant> {
        let error = TransportError::DeadlineExceeded { connection: self.core.label.clone() };
        let now = Instant::now();
        let (next, released) = {
            let mut state = self.core.lock();
            let State { pending, out, .. } = &mut *state;
            let next = pending.expire(now, &error, |stream, correlation_id| {
                send_cancel(out, stream, correlation_id, CancelReason::Timeout);
            });
            (next, state.release_if_orphaned())
        };
        if released {
            self.core.ending.notify_one();
        }
        next
    }

    fn answered(&self, stream: u64, answer: Result<Decision, TransportError>) {
        let (waiting, released) = {
            let mut state = self.core.lock();
            let waiting = state.pending.take(stream);
            (waiting, state.release_if_orphaned())
        };
        // An answer to a request cancelled or abandoned meanwhile is simply late.
        if let Some(waiter) = waiting {
            waiter.answer(answer);
        }
        if released {
            self.core.ending.notify_one();
        }
    }

    fn on_frame(&mut self, frame: proto::AgentFrame) -> Result<(), String> {
        use agent_frame::Body;
        let stream = frame.stream_id;
        let protocol = |what: String| format!("protocol error: {what}");
        match frame.body {
            Some(Body::Decision(d)) => {
                let decision = Decision::try_from(d).map_err(|e| protocol(e.to_string()))?;
                self.answered(stream, Ok(decision));
            }
            Some(Body::Error(e)) => {
                self.answered(stream, Err(TransportError::Agent(AgentError::new(e.message))));
            }
            Some(Body::Pong(_)) => {
                let waiting = self.core.lock().pings.remove(&stream);
                if let Some((sent, reply)) = waiting {
                    let _ = reply.send(sent.elapsed());
                }
            }
            Some(Body::Health(h)) => {
                let health = pool_api::AgentHealth::try_from(h).map_err(|e| protocol(e.to_string()))?;
                self.core.signals.send_modify(|s| s.health = health);
            }
            Some(Body::FlowControl(f)) => {
                let signal = pool_api::FlowControl::try_from(f).map_err(|e| protocol(e.to_string()))?;
                self.core.signals.send_modify(|s| s.flow = s.flow.apply(signal));
            }
            Some(Body::ConfigAck(a)) => {
                let waiting = self.core.lock().pushes.remove(&a.push_id);
                if let Some(reply) = waiting {
                    let _ = reply.send(a.into());
                }
            }
            Some(Body::ConfigUpdate(u)) => {
                let request = ConfigUpdateRequest::try_from(u).map_err(|e| protocol(e.to_string()))?;
                let _ = self.updates.send(request);
            }
            Some(Body::Metrics(report)) => {
                for metric in report.metrics {
                    record_metric(&self.core.label, pool_api::AgentMetric::from(metric));
                }
            }
            Some(Body::Capabilities(_) | Body::Refused(_) | Body::Register(_)) => {
                return Err(protocol("handshake message after the handshake".into()));
            }
            None => return Err(protocol("a frame with no body or an unknown one".into())),
        }
        Ok(())
    }
}

/// Why the call failed, from its status: tonic's codes for the cases a peer causes.
fn describe(status: &tonic::Status) -> String {
    let detail = match status.source() {
        Some(source) => format!("{}: {}", status.message(), error_chain(source)),
        None => status.message().to_owned(),
    };
    match status.code() {
        tonic::Code::OutOfRange => format!("the agent sent a message over the size limit ({detail})"),
        tonic::Code::Internal => format!("the call failed: {detail}"),
        code => format!("the call failed ({code:?}): {detail}"),
    }
}
