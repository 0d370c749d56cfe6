//! The agent side: serve an [`AgentHandler`] over gRPC, next to the standard health service
//! (`grpc.health.v1.Health`) and server reflection (`grpc.reflection.v1`).
//!
//! Every `AgentProtocol/Connect` call is one session: the proxy's hello is read (under the
//! handshake time-out) and answered with the handler's capabilities, then each event's handler
//! is polled once in the session and, if it has to wait, goes on in a task of its own, at most
//! as many at once as the capabilities advertise. A cancel aborts that
//! request's task; a handler that panics answers that request with an error and the session
//! goes on; a drain (the proxy's, or [`GrpcServerHandle::drain`] for every session) refuses new
//! events with [`GrpcRefusal::Draining`] while running ones finish. A message that does not
//! decode, one over the size limit, an unknown or unexpected frame, or an invalid event ends
//! that call with a gRPC error status: the server never answers a request it could not read,
//! and never answers "allow" for it.
//!
//! Whoever can connect is held to the limits of [`GrpcServerConfig`]: a cap on connections
//! (one over it is closed at once), time-outs on the TLS handshake, on the hello and on an
//! answer the proxy does not read, HTTP/2 keep-alive pings, a cap on calls per connection, and
//! per session a cap on requests (the advertised concurrency; more wait their turn) and on
//! configuration pushes (more are refused). Each hit is counted
//! ([`GrpcServerHandle::limit_stats`] and the `agentpool_grpc_agent_limit_total` counter).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::{
    AgentHandler, AgentHealth, ConfigPush, ConfigUpdateKind, ConfigUpdateRequest, FlowControl,
    PROTOCOL_VERSION,
};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::codec::{self, AgentCodec, FromProxy, ToProxy};
use crate::io::{Accepted, BoxedIo, KillSwitches};
use crate::streams::StreamMap;
use crate::tls::GrpcServerTls;
use crate::wire::agent_protocol_server::SERVICE_NAME;
use crate::{DEFAULT_MAX_MESSAGE, FILE_DESCRIPTOR_SET};

/// Settings of the agent side.
///
/// Every limit has a default safe against a peer that connects and misbehaves on purpose:
///
/// | field | what it bounds | default |
/// |---|---|---|
/// | `max_connections` | connections served at once; one more is closed at once, unanswered | 1024 |
/// | `handshake_timeout` | the TLS handshake, and from a call's start to the proxy's hello | 5 s |
/// | `max_message` | one message read or written; checked on the 5-byte gRPC prefix before anything is buffered | 16 MiB |
/// | `max_calls_per_connection` | HTTP/2 streams open at once on one connection (agent calls, health, reflection) | 16 |
/// | `max_concurrent_requests` | requests running at once per session; more wait their turn | 1024 |
/// | `max_config_pushes` | configuration pushes being applied at once per session | 8 |
/// | `write_timeout` | time an answer may wait for the proxy to read; then the session ends | 30 s |
/// | `keep_alive_interval` / `keep_alive_timeout` | HTTP/2 PINGs; one unanswered this long ends the connection | 10 s / 5 s |
/// | `shutdown_grace` | after shutdown, time connections get to close before they are dropped | 5 s |
///
/// Zero is refused for every limit ([`GrpcServeError::InvalidConfig`] names the field).
#[derive(Clone, Debug)]
pub struct GrpcServerConfig {
    /// Largest message read or written (default 16 MiB). A proxy announcing a larger one has
    /// its call ended with `OUT_OF_RANGE` before anything is buffered; a decision that would
    /// encode larger is answered with an error for that request alone. A message announced
    /// within the limit has its whole length reserved by tonic when its 5-byte prefix arrives
    /// (address space: pages become resident only as bytes arrive). There is no time-out on a
    /// message that starts and stops short: it holds that reservation until the call ends, so
    /// lower this limit for proxies you do not trust.
    pub max_message: usize,
    /// Connections served at once (default 1024). One accepted over the cap is closed at once
    /// and counted; the connections already served are not affected.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake, for the first byte of HTTP/2 after it (or after
    /// accepting, without TLS), and from a call's start to the proxy's hello (default 5 s);
    /// then the connection, or the call, is closed and counted.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams open at once on one connection (default 16): a proxy opens one agent
    /// call per connection; health checks and reflection take a few more.
    pub max_calls_per_connection: u32,
    /// Requests running at once in one session (default 1024). The handshake advertises the
    /// smaller of this and the handler's own `max_concurrency`; a request beyond it waits,
    /// unread, for one to end, and is counted.
    pub max_concurrent_requests: u32,
    /// Configuration pushes being applied at once in one session (default 8); one more is
    /// acknowledged as refused with [`GrpcRefusal::TooManyConfigPushes`].
    pub max_config_pushes: u32,
    /// Time an answer or a pong may wait for room while the proxy does not read (default
    /// 30 s); then the session ends and the hit is counted.
    pub write_timeout: Duration,
    /// Interval of HTTP/2 keep-alive PINGs to the proxy (default 10 s).
    pub keep_alive_interval: Duration,
    /// A PING unanswered this long closes the connection (default 5 s).
    pub keep_alive_timeout: Duration,
    /// After the shutdown signal, time connections get to close (health watchers, calls
    /// ending) before the server drops them (default 5 s).
    pub shutdown_grace: Duration,
    /// TLS, or mutual TLS; `None` serves HTTP/2 in clear text (h2c).
    pub tls: Option<GrpcServerTls>,
}

impl Default for GrpcServerConfig {
    fn default() -> Self {
        Self {
            max_message: DEFAULT_MAX_MESSAGE,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            max_calls_per_connection: 16,
            max_concurrent_requests: 1024,
            max_config_pushes: 8,
            write_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl GrpcServerConfig {
    /// Checks every limit at once: none may be zero, and `max_connections` is at most
    /// `usize::MAX / 8`. Returns every problem found.
    pub fn validate(&self) -> Result<(), GrpcServeError> {
        let mut problems: Vec<(&'static str, &'static str)> = [
            ("max_message", self.max_message == 0),
            ("max_connections", self.max_connections == 0),
            ("handshake_timeout", self.handshake_timeout.is_zero()),
            ("max_calls_per_connection", self.max_calls_per_connection == 0),
            ("max_concurrent_requests", self.max_concurrent_requests == 0),
            ("max_config_pushes", self.max_config_pushes == 0),
            ("write_timeout", self.write_timeout.is_zero()),
            ("keep_alive_interval", self.keep_alive_interval.is_zero()),
            ("keep_alive_timeout", self.keep_alive_timeout.is_zero()),
            ("shutdown_grace", self.shutdown_grace.is_zero()),
        ]
        .into_iter()
        .filter(|(_, zero)| *zero)
        .map(|(field, _)| (field, "must not be zero"))
        .collect();
        if self.max_connections > Semaphore::MAX_PERMITS {
            problems.push(("max_connections", "is over the largest count supported (usize::MAX / 8)"));
        }
        if problems.is_empty() { Ok(()) } else { Err(GrpcServeError::InvalidConfig { problems }) }
    }
}

/// Why the agent side answered a request (or a configuration push) with a refusal without
/// handing it to the handler. The proxy receives the text as the agent's error message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcRefusal {
    /// The agent is draining and starts no new request.
    #[error("the agent is draining")]
    Draining,
    /// Too many configuration pushes are being applied in this session already.
    #[error(
        "configuration push {push_id} refused: {limit} pushes are already being applied in this \
         session (max_config_pushes)"
    )]
    TooManyConfigPushes {
        /// The refused push.
        push_id: u64,
        /// The limit.
        limit: usize,
    },
    /// The handler's decision would encode over the message limit.
    #[error("the decision is {size} bytes, over the {limit}-byte message limit")]
    DecisionTooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcServeError {
    /// Binding the address or socket failed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address or socket path.
        address: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process is listening on the socket path.
    #[error("{path}: another server is listening there")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Settings out of range, every one of them.
    #[error("invalid configuration: {}", problems.iter().map(|(f, p)| format!("{f} {p}")).collect::<Vec<_>>().join("; "))]
    InvalidConfig {
        /// Each setting, as named in [`GrpcServerConfig`], and what is wrong with it.
        problems: Vec<(&'static str, &'static str)>,
    },
    /// The reflection service could not be built from the schema's descriptors.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// The HTTP/2 server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// How many times each limit was hit since the server was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrpcLimitStats {
    /// Connections closed on accept because `max_connections` were being served.
    pub connections_refused: u64,
    /// Connections whose TLS handshake failed or did not finish within `handshake_timeout`.
    pub tls_handshakes_failed: u64,
    /// Connections that sent nothing, and calls that sent no hello, within `handshake_timeout`.
    pub handshakes_timed_out: u64,
    /// Sessions ended because an answer waited longer than `write_timeout`.
    pub writes_timed_out: u64,
    /// Requests that arrived while as many as the advertised concurrency were running.
    pub requests_held_back: u64,
    /// Configuration pushes refused over `max_config_pushes`.
    pub config_pushes_refused: u64,
}

#[derive(Clone, Copy, Debug)]
enum Limit {
    Connections,
    Tls,
    Handshake,
    Write,
    Requests,
    ConfigPushes,
}

impl Limit {
    const COUNT: usize = Limit::ConfigPushes as usize + 1;

    fn label(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::Tls => "tls_handshake",
            Self::Handshake => "handshake_timeout",
            Self::Write => "write_timeout",
            Self::Requests => "max_concurrent_requests",
            Self::ConfigPushes => "max_config_pushes",
        }
    }
}

#[derive(Debug, Default)]
struct LimitCounters([AtomicU64; Limit::COUNT]);

impl LimitCounters {
    /// Counts a hit; a warning goes out at the 1st, 2nd, 4th, 8th… hit of each limit, so a peer
    /// hitting one on purpose cannot flood the log.
    fn hit(&self, limit: Limit) {
        let total = self.0[limit as usize].fetch_add(1, Ordering::Relaxed) + 1;
        metrics::counter!("agentpool_grpc_agent_limit_total", "limit" => limit.label()).increment(1);
        if total.is_power_of_two() {
            tracing::warn!(limit = limit.label(), total, "a connection limit was hit");
        }
    }

    fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}

type Outbound = mpsc::Sender<Result<ToProxy, Status>>;
type WeakOutbound = mpsc::WeakSender<Result<ToProxy, Status>>;

/// Sends agent-initiated messages to every connected proxy, drains the agent, and reports the
/// limits hit.
#[derive(Clone)]
pub struct GrpcServerHandle {
    sessions: Arc<Mutex<Vec<WeakOutbound>>>,
    next_request: Arc<AtomicU64>,
    limits: Arc<LimitCounters>,
    draining: Arc<watch::Sender<bool>>,
    health: HealthReporter,
}

impl std::fmt::Debug for GrpcServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServerHandle")
            .field("sessions", &self.session_count())
            .field("draining", &*self.draining.borrow())
            .field("limits", &self.limit_stats())
            .finish()
    }
}

impl GrpcServerHandle {
    /// Queues `body` on every session. A session whose queue is full (its proxy is not
    /// reading) misses this message; the write time-out ends such a session.
    fn broadcast(&self, body: agent_frame::Body) {
        let frame = proto::AgentFrame { stream_id: 0, body: Some(body) };
        self.sessions.lock().retain(|s| {
            let Some(session) = s.upgrade() else { return false };
            match session.try_send(Ok(ToProxy::Frame(Box::new(frame.clone())))) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(
                        "a session's queue is full; an agent-initiated message was not sent to it"
                    );
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Reports the agent's health to every proxy connected.
    pub fn report_health(&self, health: AgentHealth) {
        self.broadcast(agent_frame::Body::Health(health.into()));
    }

    /// Sends a flow-control signal to every proxy connected.
    pub fn flow_control(&self, signal: FlowControl) {
        self.broadcast(agent_frame::Body::FlowControl(signal.into()));
    }

    /// Sends a metrics report to every proxy connected (recorded there as gauges).
    pub fn report_metrics(&self, metrics: impl IntoIterator<Item = pool_api::AgentMetric>) {
        let metrics = metrics.into_iter().map(proto::Metric::from).collect();
        self.broadcast(agent_frame::Body::Metrics(proto::MetricsReport { metrics }));
    }

    /// Asks every proxy connected for a configuration update; returns the request id.
    pub fn request_config_update(&self, kind: ConfigUpdateKind) -> u64 {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.broadcast(agent_frame::Body::ConfigUpdate(ConfigUpdateRequest { request_id, kind }.into()));
        request_id
    }

    /// Drains the agent: every session refuses new events with [`GrpcRefusal::Draining`]
    /// while running requests finish, every proxy is told the agent's health is draining, and
    /// the standard health service answers `NOT_SERVING` for the agent service and the server
    /// as a whole.
    pub async fn drain(&self) {
        self.draining.send_replace(true);
        self.report_health(AgentHealth::with_status(pool_api::HealthStatus::Draining { eta: None }));
        self.health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        self.health.set_service_status("", ServingStatus::NotServing).await;
    }

    /// True once [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Agent sessions open now (handshaken calls).
    pub fn session_count(&self) -> usize {
        let mut sessions = self.sessions.lock();
        sessions.retain(|s| s.upgrade().is_some_and(|s| !s.is_closed()));
        sessions.len()
    }

    /// How many times each limit of [`GrpcServerConfig`] was hit so far.
    pub fn limit_stats(&self) -> GrpcLimitStats {
        let get = |limit| self.limits.get(limit);
        GrpcLimitStats {
            connections_refused: get(Limit::Connections),
            tls_handshakes_failed: get(Limit::Tls),
            handshakes_timed_out: get(Limit::Handshake),
            writes_timed_out: get(Limit::Write),
            requests_held_back: get(Limit::Requests),
            config_pushes_refused: get(Limit::ConfigPushes),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// An agent listening for proxies over gRPC, on TCP or a Unix socket.
pub struct GrpcAgentServer {
    listener: Listener,
    config: GrpcServerConfig,
    handle: GrpcServerHandle,
    health_service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl std::fmt::Debug for GrpcAgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAgentServer").field("endpoint", &self.endpoint()).finish_non_exhaustive()
    }
}

impl GrpcAgentServer {
    /// Listens on a TCP address (port 0 picks a free one; see [`endpoint`](Self::endpoint)).
    pub async fn bind_tcp(addr: SocketAddr, config: GrpcServerConfig) -> Result<Self, GrpcServeError> {
        config.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| GrpcServeError::Bind { address: addr.to_string(), source })?;
        Self::new(Listener::Tcp(listener), config).await
    }

    /// Listens on a Unix socket at `path`. A stale socket file nobody listens on is replaced; a
    /// live one is refused. The file is removed when the server stops serving (or is dropped
    /// unserved).
    pub async fn bind_unix(path: impl AsRef<Path>, config: GrpcServerConfig) -> Result<Self, GrpcServeError> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let bind_err = |source| GrpcServeError::Bind { address: path.display().to_string(), source };
        if path.exists() {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(_) => return Err(GrpcServeError::InUse { path }),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(&path).map_err(bind_err)?;
                }
                Err(e) => return Err(bind_err(e)),
            }
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        Self::new(Listener::Unix(listener, SocketFile(path)), config).await
    }

    async fn new(listener: Listener, config: GrpcServerConfig) -> Result<Self, GrpcServeError> {
        let health = HealthReporter::new();
        health.set_service_status("", ServingStatus::Serving).await;
        health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        let handle = GrpcServerHandle {
            sessions: Arc::default(),
            next_request: Arc::new(AtomicU64::new(1)),
            limits: Arc::default(),
            draining: Arc::new(watch::Sender::new(false)),
            health,
        };
        Ok(Self { listener, config, handle, health_service })
    }

    /// The endpoint a proxy dials: `grpc://ip:port` (`grpcs://` with TLS) or
    /// `grpc+unix:/path`.
    pub fn endpoint(&self) -> pool_api::Endpoint {
        match &self.listener {
            Listener::Tcp(l) => {
                let scheme = if self.config.tls.is_some() { "grpcs" } else { "grpc" };
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                pool_api::Endpoint::new(format!("{scheme}://{addr}"))
            }
            Listener::Unix(_, file) => pool_api::Endpoint::new(format!("grpc+unix:{}", file.0.display())),
        }
    }

    /// The TCP address listened on, if it is TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// A handle for agent-initiated messages, drain and the limits' counts.
    pub fn handle(&self) -> GrpcServerHandle {
        self.handle.clone()
    }

    /// Serves `handler` until `shutdown` resolves; then stops accepting, ends every session
    /// (running requests are aborted), gives connections `shutdown_grace` to close, and cuts
    /// those still open. Dropping this future instead (aborting its task) cuts every connection
    /// at once, like a crash.
    pub async fn serve<H: AgentHandler>(
        self,
        handler: H,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), GrpcServeError> {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| GrpcServeError::Reflection(e.to_string()))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        // However this future ends (returning, or dropped), connections still open are cut.
        let kill = KillOnDrop(KillSwitches::default());
        let agent = AgentService(Arc::new(AgentSessions {
            handler: Arc::new(handler),
            config: self.config.clone(),
            handle: self.handle.clone(),
            stop: stop_rx.clone(),
        }));
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let accepting = AbortOnDrop(tokio::spawn(accept_loop(
            self.listener,
            self.config.clone(),
            self.handle.limits.clone(),
            incoming_tx,
            (stop_rx, kill.0.clone()),
        )));
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.config.keep_alive_interval))
            .http2_keepalive_timeout(Some(self.config.keep_alive_timeout))
            .max_concurrent_streams(Some(self.config.max_calls_per_connection))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .add_service(agent)
            .add_service(self.health_service)
            .add_service(reflection);
        let mut stop_rx = stop_tx.subscribe();
        let serving = server.serve_with_incoming_shutdown(ReceiverStream::new(incoming_rx), async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
        tokio::pin!(serving);
        tokio::pin!(shutdown);
        let result = tokio::select! {
            result = &mut serving => result,
            () = &mut shutdown => {
                stop_tx.send_replace(true);
                match tokio::time::timeout(self.config.shutdown_grace, &mut serving).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::debug!(grace = ?self.config.shutdown_grace, "connections still open after the shutdown grace; dropping them");
                        Ok(())
                    }
                }
            }
        };
        stop_tx.send_replace(true);
        drop((accepting, kill));
        result.map_err(|e| GrpcServeError::Serve(crate::client::error_chain(&e)))
    }
}

/// Cuts every connection of a server when dropped.
struct KillOnDrop(KillSwitches);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill_all();
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A socket file, removed when the listener that made it is dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Accepts connections, refuses those over the cap, and runs each TLS handshake in a task of
/// its own under the handshake time-out, so a slow handshake never holds up the others.
async fn accept_loop(
    listener: Listener,
    config: GrpcServerConfig,
    limits: Arc<LimitCounters>,
    incoming: mpsc::Sender<std::io::Result<Accepted>>,
    (mut stop, kill): (watch::Receiver<bool>, KillSwitches),
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let tls = config.tls.as_ref().map(GrpcServerTls::acceptor);
    loop {
        let accepted = tokio::select! {
            true = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Dropping the stream closes it: the peer reads end of stream at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limits.hit(Limit::Connections);
            tracing::debug!(max_connections = config.max_connections, "connection refused: at the cap");
            continue;
        };
        let Some(tls) = tls.clone() else {
            let accepted = Accepted::new(stream, slot, &kill, first_byte(&limits, config.handshake_timeout));
            if incoming.send(Ok(accepted)).await.is_err() {
                break;
            }
            continue;
        };
        let (incoming, limits, timeout, kill) =
            (incoming.clone(), limits.clone(), config.handshake_timeout, kill.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    let first_byte = first_byte(&limits, timeout);
                    let accepted = Accepted::new(Box::new(tls_stream), slot, &kill, first_byte);
                    let _ = incoming.send(Ok(accepted)).await;
                }
                Ok(Err(e)) => {
                    limits.hit(Limit::Tls);
                    tracing::debug!(error = %e, "TLS handshake refused");
                }
                Err(_) => {
                    limits.hit(Limit::Tls);
                    tracing::debug!(?timeout, "TLS handshake timed out");
                }
            }
        });
    }
}

/// The first-byte deadline of an accepted connection, counted as a handshake time-out.
fn first_byte(limits: &Arc<LimitCounters>, timeout: Duration) -> (Duration, crate::io::FirstByteTimedOut) {
    let limits = limits.clone();
    (
        timeout,
        Box::new(move || {
            limits.hit(Limit::Handshake);
            tracing::debug!(?timeout, "no byte from the peer within the handshake time-out; closing");
        }),
    )
}

async fn accept(listener: &Listener) -> std::io::Result<BoxedIo> {
    Ok(match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
        Listener::Unix(l, _) => Box::new(l.accept().await?.0),
    })
}

/// The `AgentProtocol` service: a session per call.
struct AgentSessions<H> {
    handler: Arc<H>,
    config: GrpcServerConfig,
    handle: GrpcServerHandle,
    stop: watch::Receiver<bool>,
}

/// The `AgentProtocol` service as tonic routes it, written out instead of generated so that
/// the call uses [`AgentCodec`]: events arrive decoded by `pool_api::wire` and decisions leave
/// encoded by it. The bytes are the schema's, so any gRPC client of `agent.proto` talks to it.
struct AgentService<H>(Arc<AgentSessions<H>>);

impl<H> Clone for AgentService<H> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<H> tonic::server::NamedService for AgentService<H> {
    const NAME: &'static str = SERVICE_NAME;
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>> + Send>>;

impl<H: AgentHandler> tower::Service<http::Request<tonic::body::Body>> for AgentService<H> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let sessions = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != codec::CONNECT_PATH {
                return Ok(Status::unimplemented(format!("no method {}", request.uri().path())).into_http());
            }
            let max = sessions.config.max_message;
            let mut grpc =
                tonic::server::Grpc::new(AgentCodec).apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.streaming(ConnectCall(sessions), request).await)
        })
    }
}

/// One `Connect` call.
struct ConnectCall<H>(Arc<AgentSessions<H>>);

impl<H: AgentHandler> tonic::server::StreamingService<FromProxy> for ConnectCall<H> {
    type Response = ToProxy;
    type ResponseStream = SessionStream;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<FromProxy>>) -> Self::Future {
        std::future::ready(Ok(self.0.connect(request)))
    }
}

impl<H: AgentHandler> AgentSessions<H> {
    fn connect(&self, request: Request<Streaming<FromProxy>>) -> Response<SessionStream> {
        let inbound = request.into_inner();
        let limit = self.config.max_concurrent_requests as usize;
        // Room for every answer the proxy may have outstanding, plus signals and pongs.
        let (out, rx) = mpsc::channel(limit.saturating_add(64));
        let session = Session {
            handler: self.handler.clone(),
            config: self.config.clone(),
            handle: self.handle.clone(),
            out,
            stop: self.stop.clone(),
        };
        Response::new(SessionStream { session: Some(Box::pin(session.run(inbound))), answers: rx })
    }
}

/// A call's response stream, which also runs the call's session: each poll first lets the
/// session go on (read what the proxy sent, decide what is decided at once, queue answers),
/// then hands out the next answer queued. The session runs in the task that writes its
/// answers instead of a task of its own, so an answer decided inline needs no wake-up of
/// another task to leave. While the connection cannot take more (HTTP/2 flow control) the
/// stream is not polled and the session reads nothing more: that is the back-pressure. Handlers
/// that wait still run in tasks of their own and queue their answers; dropping the stream
/// (the call ended) drops the session, which aborts them.
pub(crate) struct SessionStream {
    session: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    answers: mpsc::Receiver<Result<ToProxy, Status>>,
}

impl tokio_stream::Stream for SessionStream {
    type Item = Result<ToProxy, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(session) = self.session.as_mut()
            && session.as_mut().poll(cx).is_ready()
        {
            // Its senders are gone with it (tasks aborted, broadcasts hold weak ones): what it
            // queued is still read, then the stream ends.
            self.session = None;
        }
        self.answers.poll_recv(cx)
    }
}

fn frame(stream_id: u64, body: agent_frame::Body) -> ToProxy {
    ToProxy::Frame(Box::new(proto::AgentFrame { stream_id, body: Some(body) }))
}

/// The answer to request `stream`: its decision (or an error if the decision is over the
/// message limit), the handler's error, or an error saying the handler panicked.
fn answer_frame(
    stream: u64,
    outcome: std::thread::Result<Result<pool_api::Decision, pool_api::AgentError>>,
    max_message: usize,
) -> ToProxy {
    match outcome {
        Ok(Ok(decision)) => match codec::decision(stream, &decision, max_message) {
            Ok(bytes) => ToProxy::Encoded(bytes),
            Err(e) => error_frame(
                stream,
                GrpcRefusal::DecisionTooLarge { size: e.size, limit: e.limit }.to_string(),
            ),
        },
        Ok(Err(e)) => error_frame(stream, e.message),
        Err(_) => error_frame(stream, "the agent's handler panicked".into()),
    }
}

fn error_frame(stream_id: u64, message: String) -> ToProxy {
    frame(stream_id, agent_frame::Body::Error(proto::AgentError { message }))
}

/// How many requests an agent advertising `capabilities` runs at once in one session: the
/// handler's own limit, if any, capped by `cap`. The capabilities are changed to advertise it.
fn concurrency_limit(capabilities: &mut pool_api::Capabilities, cap: u32) -> usize {
    let cap = cap.max(1);
    let limit = capabilities.max_concurrency.map_or(cap, |n| n.get().min(cap));
    capabilities.max_concurrency = NonZeroU32::new(limit);
    limit as usize
}

struct Session<H> {
    handler: Arc<H>,
    config: GrpcServerConfig,
    handle: GrpcServerHandle,
    out: Outbound,
    stop: watch::Receiver<bool>,
}

/// Why a session ends: quietly (the proxy is done) or with an error status for the proxy.
type End = Option<Status>;

impl<H: AgentHandler> Session<H> {
    async fn run(mut self, mut inbound: Streaming<FromProxy>) {
        let limits = self.handle.limits.clone();
        let hello = tokio::time::timeout(self.config.handshake_timeout, inbound.message()).await;
        let limit = match hello {
            Err(_) => {
                limits.hit(Limit::Handshake);
                let status = Status::deadline_exceeded("no hello within the handshake time-out");
                let _ = self.out.try_send(Err(status));
                return;
            }
            Ok(Ok(Some(FromProxy::Frame(proto::ProxyFrame {
                body: Some(proxy_frame::Body::Hello(hello)),
                ..
            })))) => match self.handshake(&hello).await {
                Some(limit) => limit,
                None => return,
            },
            Ok(Ok(other)) => {
                tracing::debug!(?other, "handshake failed: expected a hello");
                let _ = self.out.try_send(Err(Status::invalid_argument("expected a hello")));
                return;
            }
            Ok(Err(status)) => {
                tracing::debug!(%status, "handshake failed");
                return;
            }
        };
        {
            // Sessions that ended are dropped here too, so the list does not grow with
            // reconnects when nothing is ever broadcast.
            let mut sessions = self.handle.sessions.lock();
            sessions.retain(|s| s.upgrade().is_some_and(|s| !s.is_closed()));
            sessions.push(self.out.downgrade());
        }
        if let Some(status) = self.serve(inbound, limit).await {
            tracing::debug!(%status, "session ended by an error");
            let _ = self.out.try_send(Err(status));
        }
    }

    /// Answers the hello; the concurrency advertised, if the proxy may go on.
    async fn handshake(&self, hello: &proto::Hello) -> Option<usize> {
        if !hello.supported_versions.contains(&PROTOCOL_VERSION) {
            let refused = proto::HandshakeRefused {
                message: format!("this agent speaks protocol version {PROTOCOL_VERSION}"),
                supported_versions: vec![PROTOCOL_VERSION],
            };
            let _ = self.out.send(Ok(frame(0, agent_frame::Body::Refused(refused)))).await;
            return None;
        }
        let mut capabilities = self.handler.capabilities();
        capabilities.protocol_version = PROTOCOL_VERSION;
        let limit = concurrency_limit(&mut capabilities, self.config.max_concurrent_requests);
        self.out.send(Ok(frame(0, agent_frame::Body::Capabilities(capabilities.into())))).await.ok()?;
        Some(limit)
    }

    /// Queues `frame`, waiting at most the write time-out for room; false if the session must
    /// end.
    async fn write(out: &Outbound, frame: ToProxy, timeout: Duration, limits: &LimitCounters) -> bool {
        // Room at once is the common case: no timer is set for it.
        let frame = match out.try_send(Ok(frame)) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
        };
        match out.send_timeout(frame, timeout).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                limits.hit(Limit::Write);
                tracing::debug!(
                    ?timeout,
                    "the proxy has not read for the write time-out; ending the session"
                );
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    async fn serve(&mut self, mut inbound: Streaming<FromProxy>, limit: usize) -> End {
        let limits = self.handle.limits.clone();
        let write_timeout = self.config.write_timeout;
        let max_message = self.config.max_message;
        let max_pushes = self.config.max_config_pushes as usize;
        let permits = Arc::new(Semaphore::new(limit));
        // Request tasks, aborted when the session ends however it ends.
        let mut requests: JoinSet<()> = JoinSet::new();
        let mut running: StreamMap<AbortHandle> = StreamMap::default();
        let mut streams: HashMap<tokio::task::Id, u64> = HashMap::new();
        let mut pushes: JoinSet<()> = JoinSet::new();
        let mut draining = false;
        let mut global_drain = self.handle.draining.subscribe();
        // Made once, not per message: waiting on a watch registers with its notifier.
        let mut stop = self.stop.clone();
        // The server gone (the sender dropped) stops the session too.
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return None,
                Some(done) = requests.join_next_with_id(), if !requests.is_empty() => {
                    // Finished or aborted (a handler's panic is caught inside its task and
                    // answered there).
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => e.id(),
                    };
                    if let Some(stream) = streams.remove(&id) {
                        running.remove(&stream);
                    }
                }
                Some(_) = pushes.join_next(), if !pushes.is_empty() => {}
                message = inbound.message() => {
                    let frame_in = match message {
                        Ok(Some(f)) => f,
                        Ok(None) => return None,
                        // Undecodable, over the size limit, or cut: the proxy is told why,
                        // if it still listens.
                        Err(status) => {
                            let message = format!("cannot read the proxy's stream: {}", status.message());
                            return Some(Status::new(status.code(), message));
                        }
                    };
                    // Request headers come decoded already; any other event is converted here.
                    let (stream, body) = match frame_in {
                        FromProxy::Event { stream_id, event } => (stream_id, Err(event)),
                        FromProxy::Frame(f) => (f.stream_id, Ok(f.body)),
                    };
                    let body = match body {
                        Ok(Some(proxy_frame::Body::Event(event))) => Err(pool_api::Event::try_from(event)),
                        other => other,
                    };
                    match body {
                        Err(event) => {
                            let event = match event {
                                Ok(event) => event,
                                Err(e) => return Some(Status::invalid_argument(format!("invalid event on stream {stream}: {e}"))),
                            };
                            if running.contains_key(&stream) {
                                return Some(Status::invalid_argument(format!("stream {stream} reused while its request runs")));
                            }
                            let drained = draining || *global_drain.borrow_and_update();
                            if drained {
                                let refusal = error_frame(stream, GrpcRefusal::Draining.to_string());
                                if !Self::write(&self.out, refusal, write_timeout, &limits).await {
                                    return None;
                                }
                                continue;
                            }
                            let permit = match permits.clone().try_acquire_owned() {
                                Ok(permit) => permit,
                                Err(_) => {
                                    if running.len() >= limit {
                                        limits.hit(Limit::Requests);
                                    }
                                    // Reading waits: no more than `limit` tasks are ever alive.
                                    match permits.clone().acquire_owned().await {
                                        Ok(permit) => permit,
                                        Err(_) => return None,
                                    }
                                }
                            };
                            // The handler is polled once here: one that decides without
                            // waiting (most do) is answered without a task of its own. One that
                            // waits goes on in a task, which a cancel aborts.
                            let handler = self.handler.clone();
                            let mut deciding = Box::pin(
                                AssertUnwindSafe(async move { handler.on_event(event).await }).catch_unwind(),
                            );
                            if let Some(outcome) = (&mut deciding).now_or_never() {
                                drop(permit);
                                let answer = answer_frame(stream, outcome, max_message);
                                if !Self::write(&self.out, answer, write_timeout, &limits).await {
                                    return None;
                                }
                                continue;
                            }
                            let (out, limits) = (self.out.clone(), limits.clone());
                            let task = requests.spawn(async move {
                                let _permit = permit;
                                let outcome = deciding.await;
                                Self::write(&out, answer_frame(stream, outcome, max_message), write_timeout, &limits).await;
                            });
                            streams.insert(task.id(), stream);
                            running.insert(stream, task);
                        }
                        Ok(Some(proxy_frame::Body::Cancel(_))) => {
                            if let Some(task) = running.remove(&stream) {
                                task.abort();
                            }
                        }
                        Ok(Some(proxy_frame::Body::Ping(_))) => {
                            let pong = frame(stream, agent_frame::Body::Pong(proto::Pong {}));
                            if !Self::write(&self.out, pong, write_timeout, &limits).await {
                                return None;
                            }
                        }
                        Ok(Some(proxy_frame::Body::ConfigPush(p))) => {
                            if pushes.len() >= max_pushes {
                                limits.hit(Limit::ConfigPushes);
                                let refused = GrpcRefusal::TooManyConfigPushes { push_id: p.push_id, limit: max_pushes };
                                let ack = proto::ConfigAck { push_id: p.push_id, accepted: false, error: Some(refused.to_string()) };
                                if !Self::write(&self.out, frame(stream, agent_frame::Body::ConfigAck(ack)), write_timeout, &limits).await {
                                    return None;
                                }
                                continue;
                            }
                            let (handler, out, limits) = (self.handler.clone(), self.out.clone(), limits.clone());
                            pushes.spawn(async move {
                                let ack = handler.on_config(ConfigPush::from(p)).await;
                                Self::write(&out, frame(stream, agent_frame::Body::ConfigAck(ack.into())), write_timeout, &limits).await;
                            });
                        }
                        Ok(Some(proxy_frame::Body::ConfigUpdateAnswer(a))) => {
                            tracing::info!(request = a.request_id, accepted = a.accepted, error = ?a.error, "proxy answered a configuration update");
                        }
                        Ok(Some(proxy_frame::Body::Drain(_))) => draining = true,
                        Ok(Some(proxy_frame::Body::Shutdown(_))) => return None,
                        // (An event never gets here: it was taken out above.)
                        Ok(Some(proxy_frame::Body::Hello(_) | proxy_frame::Body::RegisterResult(_) | proxy_frame::Body::Event(_))) => {
                            return Some(Status::invalid_argument("unexpected message after the handshake"));
                        }
                        Ok(None) => return Some(Status::invalid_argument("a frame with no body or an unknown one")),
                    }
                }
            }
        }
    }
}
