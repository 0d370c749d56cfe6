//! The agent side: serve an [`AgentHandler`] on a Unix socket.
//!
//! Every connection handshakes (under a time-out), then serves requests, at most as many at
//! once as the handler's capabilities advertise: each handler is polled once in the session, and
//! one that has to wait goes on in a task of its own, which a cancel aborts.
//! A frame that cannot be decoded closes the connection with a logged error: the server never
//! answers a request it could not read, and never answers "allow" for it. Drain stops new work
//! (new events are answered with an error) while running requests finish. Health, flow-control
//! and configuration-update messages can be sent at any time through a [`ServerHandle`].
//!
//! Request tasks encode their answers straight into their connection's write buffer; the
//! connection's task is woken when the buffer goes from empty to not empty and writes
//! everything queued at once.
//!
//! Whoever can connect to the socket is held to the limits of [`UdsServerConfig`]: connections
//! over the cap are closed unanswered; a handshake, a frame and a write each have a time-out;
//! requests beyond the advertised concurrency wait their turn without being read; and
//! configuration pushes beyond their cap are refused ([`RequestRefused`]) without reaching the
//! handler. Every limit hit is counted ([`ServerHandle::limit_stats`] and the
//! `agentpool_uds_agent_limit_total` counter).

use std::collections::hash_map::Entry;
use std::io;
use std::num::NonZeroU32;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::{
    AgentError, AgentHandler, AgentHealth, ConfigPush, ConfigUpdateKind, ConfigUpdateRequest, FlowControl,
    PROTOCOL_VERSION,
};
use std::panic::AssertUnwindSafe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::codec::Framed;

#[cfg(doc)]
use crate::ReverseAgent;
use crate::client::PeerCredentials;
use crate::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError, Inbound};
use crate::streams::StreamMap;

/// Settings of the agent side.
///
/// Every limit has a default safe against a local process that connects to the socket and
/// misbehaves on purpose:
///
/// | field | what it bounds | default |
/// |---|---|---|
/// | `max_connections` | connections served at once; one more is closed at once, unanswered | 1024 |
/// | `handshake_timeout` | from accepting a connection to the handshake's answer being written | 5 s |
/// | `max_frame` | size of one frame, read or written; checked before anything is allocated for it | 16 MiB |
/// | `session.max_concurrent_requests` | requests running at once per connection; more wait their turn | 1024 |
/// | `session.max_config_pushes` | configuration pushes being applied at once per connection | 8 |
/// | `session.frame_read_timeout` | time one frame may take to arrive once its first byte has | 30 s |
/// | `session.write_timeout` | time one write may wait for the proxy to read | 30 s |
///
/// See [`SessionLimits`] for what happens when a session limit is reached. Zero is refused for
/// every limit ([`ServeError::InvalidConfig`] names the field). Each hit is counted
/// ([`ServerHandle::limit_stats`], and the `agentpool_uds_agent_limit_total` counter labelled by
/// `limit`), logged at debug level, and warned about at the 1st, 2nd, 4th, 8th… hit.
///
/// There is no idle time-out: the proxy keeps its connections open for as long as the agent is
/// in its pool, and a pool configured without pings (`ping_interval = 0`) legitimately sends
/// nothing for hours. An idle connection costs one task and two small buffers; the
/// connection cap bounds how many there can be, and a connection that has started a frame
/// is held to `frame_read_timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdsServerConfig {
    /// Largest frame read or written (default 16 MiB). A frame announcing more is refused on
    /// its 4-byte length, and the connection closed, before any of it is buffered.
    pub max_frame: usize,
    /// Permissions of the socket file (e.g. `0o660`); `None` leaves the umask's.
    pub mode: Option<u32>,
    /// Checked with `SO_PEERCRED` on every accepted connection; `None`: anyone.
    pub peer: Option<PeerCredentials>,
    /// Time a connecting proxy has to send its hello and take the answer (default 5 s); then
    /// the connection is closed.
    pub handshake_timeout: Duration,
    /// Connections served at once, handshaking ones included (default 1024). A connection
    /// accepted over the cap is closed at once without a byte written, and counted; the
    /// connections already served are not affected.
    pub max_connections: usize,
    /// Limits of each connection once it is handshaken.
    pub session: SessionLimits,
}

impl Default for UdsServerConfig {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            mode: None,
            peer: None,
            handshake_timeout: Duration::from_secs(5),
            max_connections: 1024,
            session: SessionLimits::default(),
        }
    }
}

impl UdsServerConfig {
    /// Checks that every limit is in range: none is zero, `max_frame` fits the 4-byte frame
    /// length, and `max_connections` is at most `usize::MAX / 8`.
    pub fn validate(&self) -> Result<(), ServeError> {
        let zero = [
            ("max_frame", self.max_frame == 0),
            ("handshake_timeout", self.handshake_timeout.is_zero()),
            ("max_connections", self.max_connections == 0),
        ]
        .into_iter()
        .find_map(|(field, is_zero)| is_zero.then_some(field))
        .or_else(|| self.session.zero_field());
        if let Some(field) = zero {
            return Err(ServeError::InvalidConfig { field, problem: "must not be zero" });
        }
        if self.max_connections > Semaphore::MAX_PERMITS {
            let problem = "is over the largest count supported (usize::MAX / 8)";
            return Err(ServeError::InvalidConfig { field: "max_connections", problem });
        }
        if u32::try_from(self.max_frame).is_err() {
            let problem = "is over what a 4-byte frame length can announce (4 GiB - 1)";
            return Err(ServeError::InvalidConfig { field: "max_frame", problem });
        }
        Ok(())
    }
}

/// Limits of one handshaken connection on the agent side, for [`UdsServer`] and
/// [`ReverseAgent`] alike.
///
/// | field | meaning | default |
/// |---|---|---|
/// | `max_concurrent_requests` | requests running at once on one connection; more wait their turn | 1024 |
/// | `max_config_pushes` | configuration pushes being applied at once on one connection | 8 |
/// | `frame_read_timeout` | time one frame may take to arrive once its first byte has | 30 s |
/// | `write_timeout` | time one write may wait for the proxy to read | 30 s |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Requests running at once on one connection (default 1024). The handshake advertises
    /// the smaller of this and the handler's own `max_concurrency`, so a proxy that keeps to
    /// the advertised number never meets the limit. A request beyond it waits its turn, as it
    /// would with any agent of the pool: it starts when a running one ends, and until then
    /// the connection is not read, so whatever else the proxy sends waits in the socket. A
    /// proxy ignoring the limit gets neither more tasks nor more memory, only slower answers;
    /// each request that has to wait like this is counted.
    pub max_concurrent_requests: u32,
    /// Configuration pushes being applied at once on one connection (default 8). A push
    /// beyond it is acknowledged as refused with [`RequestRefused::TooManyConfigPushes`] and
    /// the handler never sees it.
    pub max_config_pushes: u32,
    /// Time one frame may take to arrive once its first byte has (default 30 s). A peer that
    /// starts a frame (a length promising N bytes, say) and then stalls has its connection
    /// closed; memory for the frame grows only with the bytes that actually arrive. The check
    /// runs every `frame_read_timeout`, so a stalled frame is cut between one and two
    /// time-outs after it started. Time spent between frames does not count.
    pub frame_read_timeout: Duration,
    /// Time one write may wait for the proxy to read (default 30 s). A proxy that stops
    /// reading while answers or signals are waiting to be written has its connection closed,
    /// instead of holding the connection and a growing write buffer forever. A write that
    /// goes straight into the socket is never timed.
    pub write_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 1024,
            max_config_pushes: 8,
            frame_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl SessionLimits {
    /// The first limit set to zero, named as where both [`UdsServerConfig`] and
    /// [`ReverseAgentConfig`](crate::ReverseAgentConfig) keep these limits
    /// (`session.<name>`).
    pub(crate) fn zero_field(&self) -> Option<&'static str> {
        [
            ("session.max_concurrent_requests", self.max_concurrent_requests == 0),
            ("session.max_config_pushes", self.max_config_pushes == 0),
            ("session.frame_read_timeout", self.frame_read_timeout.is_zero()),
            ("session.write_timeout", self.write_timeout.is_zero()),
        ]
        .into_iter()
        .find_map(|(field, is_zero)| is_zero.then_some(field))
    }
}

/// Why the agent side answered a request (or a configuration push) with a refusal without
/// handing it to the handler. The proxy receives the text as the agent's error message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestRefused {
    /// The agent is draining and starts no new request.
    #[error("the agent is draining")]
    Draining,
    /// Too many configuration pushes are being applied on this connection already.
    #[error(
        "configuration push {push_id} refused: {limit} pushes are already being applied on this \
         connection (session.max_config_pushes)"
    )]
    TooManyConfigPushes {
        /// The refused push.
        push_id: u64,
        /// The limit.
        limit: usize,
    },
}

impl From<RequestRefused> for AgentError {
    fn from(refused: RequestRefused) -> Self {
        AgentError::new(refused.to_string())
    }
}

/// How many times each limit was hit, since the server (or reverse agent) was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitStats {
    /// Connections closed on accept because `max_connections` were being served.
    pub connections_refused: u64,
    /// Connections closed on accept because the peer's credentials did not match `peer`.
    pub peers_refused: u64,
    /// Connections closed because the handshake did not finish within `handshake_timeout`.
    pub handshakes_timed_out: u64,
    /// Connections closed because a frame did not arrive whole within `frame_read_timeout`.
    pub frames_timed_out: u64,
    /// Connections closed because a write waited longer than `write_timeout`.
    pub writes_timed_out: u64,
    /// Requests that arrived while as many as the advertised concurrency were running, and
    /// waited for one to end (the proxy ignored the advertised number).
    pub requests_held_back: u64,
    /// Configuration pushes refused over `max_config_pushes`.
    pub config_pushes_refused: u64,
}

/// A limit, as counted.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Connections,
    Peer,
    Handshake,
    FrameRead,
    Write,
    Requests,
    ConfigPushes,
}

impl Limit {
    /// How many limits are counted (the last variant's index, plus one).
    const COUNT: usize = Limit::ConfigPushes as usize + 1;

    /// The `limit` label of `agentpool_uds_agent_limit_total`.
    fn label(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::Peer => "peer",
            Self::Handshake => "handshake_timeout",
            Self::FrameRead => "frame_read_timeout",
            Self::Write => "write_timeout",
            Self::Requests => "max_concurrent_requests",
            Self::ConfigPushes => "max_config_pushes",
        }
    }
}

/// Limit hits, shared by a server's (or reverse agent's) connections.
#[derive(Debug, Default)]
struct LimitCounters([AtomicU64; Limit::COUNT]);

impl LimitCounters {
    /// Counts a hit. Each site logs its own at debug level; a warning goes out at the 1st, 2nd,
    /// 4th, 8th… hit of each limit, so that a peer hitting one on purpose cannot flood the log.
    fn hit(&self, limit: Limit) {
        let total = self.0[limit as usize].fetch_add(1, Ordering::Relaxed) + 1;
        metrics::counter!("agentpool_uds_agent_limit_total", "limit" => limit.label()).increment(1);
        if total.is_power_of_two() {
            tracing::warn!(limit = limit.label(), total, "a connection limit was hit");
        }
    }

    fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process is listening on the socket.
    #[error("{path}: another server is listening there")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("{path}: exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding or setting permissions failed.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A setting is out of range.
    #[error("invalid configuration: {field} {problem}")]
    InvalidConfig {
        /// The setting, as named in the configuration (e.g. `session.write_timeout`).
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Sends agent-initiated messages to every connected proxy, and reports the limits hit.
#[derive(Clone, Default)]
pub struct ServerHandle {
    connections: Arc<Mutex<Vec<Arc<Out>>>>,
    next_request: Arc<AtomicU64>,
    limits: Arc<LimitCounters>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("connections", &self.connection_count())
            .field("limits", &self.limit_stats())
            .finish()
    }
}

impl ServerHandle {
    fn connections(&self) -> MutexGuard<'_, Vec<Arc<Out>>> {
        self.connections.lock()
    }

    fn broadcast(&self, body: agent_frame::Body) {
        let frame = proto::AgentFrame { stream_id: 0, body: Some(body) };
        self.connections().retain(|c| c.push(frame.clone()));
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

    /// Proxies connected now (handshaken connections).
    pub fn connection_count(&self) -> usize {
        let mut conns = self.connections();
        conns.retain(|c| !c.is_closed());
        conns.len()
    }

    /// How many times each limit of [`UdsServerConfig`] (or of the reverse agent's session) was
    /// hit so far. The same counts go to the `agentpool_uds_agent_limit_total` counter,
    /// labelled by `limit`.
    pub fn limit_stats(&self) -> LimitStats {
        let get = |limit| self.limits.get(limit);
        LimitStats {
            connections_refused: get(Limit::Connections),
            peers_refused: get(Limit::Peer),
            handshakes_timed_out: get(Limit::Handshake),
            frames_timed_out: get(Limit::FrameRead),
            writes_timed_out: get(Limit::Write),
            requests_held_back: get(Limit::Requests),
            config_pushes_refused: get(Limit::ConfigPushes),
        }
    }
}

/// An agent listening on a Unix socket. The socket file is removed when it is dropped.
#[derive(Debug)]
pub struct UdsServer {
    listener: UnixListener,
    path: PathBuf,
    config: UdsServerConfig,
    handle: ServerHandle,
}

impl UdsServer {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one, or a path
    /// that is not a socket, is an error, and so is a configuration with a limit of zero.
    pub async fn bind(path: impl AsRef<Path>, config: UdsServerConfig) -> Result<Self, ServeError> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, config.mode).await?;
        Ok(Self { listener, path, config, handle: ServerHandle::default() })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for agent-initiated messages and the limits' counts.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves `handler` until `shutdown` resolves; then stops accepting and ends every
    /// connection (running requests are aborted).
    pub async fn serve<H: AgentHandler>(self, handler: H, shutdown: impl std::future::Future<Output = ()>) {
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        // Dropping the stream closes it: the peer reads end of stream at once.
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            self.handle.limits.hit(Limit::Connections);
                            tracing::debug!(
                                socket = %self.path.display(),
                                max_connections = self.config.max_connections,
                                "connection refused: the server is serving as many connections as it may"
                            );
                            continue;
                        };
                        if let Some(expected) = self.config.peer
                            && let Err(e) = crate::client::check_peer(&stream, expected, &self.path.display().to_string())
                        {
                            self.handle.limits.hit(Limit::Peer);
                            tracing::debug!(error = %e, "connection refused");
                            continue;
                        }
                        let (handler, config, handle) = (handler.clone(), self.config.clone(), self.handle.clone());
                        connections.spawn(async move {
                            let _slot = slot;
                            serve_connection(stream, handler, config, handle).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.shutdown().await;
    }
}

/// Binds a listening socket at `path`: a stale socket file nobody listens on is replaced; a live
/// one, or a path that is not a socket, is an error. `mode` sets the file's permissions.
pub(crate) async fn bind_socket(path: &Path, mode: Option<u32>) -> Result<UnixListener, ServeError> {
    let io_err = |source| ServeError::Io { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => return Err(ServeError::InUse { path: path.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Ok(_) => return Err(ServeError::NotASocket { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    }
    Ok(listener)
}

impl Drop for UdsServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) type AgentFramed = Framed<UnixStream, FrameCodec<Inbound, proto::AgentFrame>>;

pub(crate) fn frame(stream_id: u64, body: agent_frame::Body) -> proto::AgentFrame {
    proto::AgentFrame { stream_id, body: Some(body) }
}

/// The request `frame` answers, if it is an answer (an error; decisions are queued apart).
fn answers(frame: &proto::AgentFrame) -> Option<u64> {
    match frame {
        proto::AgentFrame { stream_id, body: Some(agent_frame::Body::Error(_)) } => Some(*stream_id),
        _ => None,
    }
}

/// Handshakes, then serves one connection until it ends.
async fn serve_connection<H: AgentHandler>(
    stream: UnixStream,
    handler: Arc<H>,
    config: UdsServerConfig,
    handle: ServerHandle,
) {
    let framed: AgentFramed = Framed::new(stream, FrameCodec::new(config.max_frame));
    // The whole handshake, the answer's write included, is bounded: a proxy that never reads
    // cannot hold the connection either.
    let handshaken =
        tokio::time::timeout(config.handshake_timeout, handshake(framed, &*handler, &config.session));
    let Ok(handshaken) = handshaken.await else {
        handle.limits.hit(Limit::Handshake);
        tracing::debug!(timeout = ?config.handshake_timeout, "handshake timed out; closing the connection");
        return;
    };
    if let Some((framed, limit)) = handshaken {
        run_session(framed, handler, limit, config.session, handle).await;
    }
}

/// Reads the proxy's hello and answers it; the framed connection and the concurrency
/// advertised, if the proxy may go on.
async fn handshake<H: AgentHandler>(
    mut framed: AgentFramed,
    handler: &H,
    limits: &SessionLimits,
) -> Option<(AgentFramed, usize)> {
    let hello = match framed.next().await {
        Some(Ok(Inbound::Frame(proto::ProxyFrame { body: Some(proxy_frame::Body::Hello(h)), .. }))) => h,
        other => {
            tracing::warn!(?other, "handshake failed: expected a hello");
            return None;
        }
    };
    let mut capabilities = handler.capabilities();
    if !hello.supported_versions.contains(&PROTOCOL_VERSION) {
        let refused = proto::HandshakeRefused {
            message: format!("this agent speaks protocol version {PROTOCOL_VERSION}"),
            supported_versions: vec![PROTOCOL_VERSION],
        };
        let _ = framed.send(frame(0, agent_frame::Body::Refused(refused))).await;
        return None;
    }
    capabilities.protocol_version = PROTOCOL_VERSION;
    let limit = concurrency_limit(&mut capabilities, limits);
    framed.send(frame(0, agent_frame::Body::Capabilities(capabilities.into()))).await.ok()?;
    Some((framed, limit))
}

/// How many requests an agent advertising `capabilities` runs at once on one connection: the
/// handler's own limit, if any, capped by `limits.max_concurrent_requests`. The capabilities
/// are changed to advertise it, so a proxy keeping to them never meets the cap.
pub(crate) fn concurrency_limit(capabilities: &mut pool_api::Capabilities, limits: &SessionLimits) -> usize {
    let cap = limits.max_concurrent_requests.max(1);
    let limit = capabilities.max_concurrency.map_or(cap, |n| n.get().min(cap));
    capabilities.max_concurrency = NonZeroU32::new(limit);
    limit as usize
}

/// What one connection writes, shared by its session, its request tasks and the
/// [`ServerHandle`]: whoever produces a frame encodes it straight into one buffer, in the
/// order frames are produced, and the session writes the buffer out (one write for
/// everything queued since the last one).
pub(crate) struct Out {
    state: Mutex<OutState>,
    /// Signalled when the buffer goes from empty to not empty.
    ready: Notify,
}

struct OutState {
    codec: FrameCodec<Inbound, proto::AgentFrame>,
    buf: BytesMut,
    /// Requests whose answers are in `buf`.
    answered: Vec<u64>,
    /// Why a frame could not be encoded (over the frame limit): it ends the connection, as
    /// a failed write does.
    failed: Option<FrameError>,
    /// The session has ended: nothing more is queued.
    closed: bool,
}

impl Out {
    fn new(max_frame: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutState {
                codec: FrameCodec::new(max_frame),
                buf: BytesMut::new(),
                answered: Vec::new(),
                failed: None,
                closed: false,
            }),
            ready: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock()
    }

    /// True when answers waiting to be written reach [`WRITE_AT`] bytes.
    fn backlogged(&self) -> bool {
        self.lock().buf.len() >= WRITE_AT
    }

    /// Queues `encode`'s frame, which answers `answers` if it is an answer; false once the
    /// connection has ended. `notify`: wake the session if this is the first frame waiting —
    /// not for a frame the session queues itself (it writes those on its own, and a task that
    /// wakes itself is rescheduled, which in a multi-thread runtime also wakes an idle worker).
    fn queue(
        &self,
        answers: Option<u64>,
        notify: bool,
        encode: impl FnOnce(&mut FrameCodec<Inbound, proto::AgentFrame>, &mut BytesMut) -> Result<(), FrameError>,
    ) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        let was_empty = state.buf.is_empty() && state.answered.is_empty() && state.failed.is_none();
        let OutState { codec, buf, .. } = &mut *state;
        match encode(codec, buf) {
            Ok(()) => state.answered.extend(answers),
            Err(e) => {
                state.failed.get_or_insert(e);
            }
        }
        drop(state);
        if was_empty && notify {
            self.ready.notify_one();
        }
        true
    }

    /// Queues a frame from outside the session (a task, the handle); false once the
    /// connection has ended.
    fn push(&self, frame: proto::AgentFrame) -> bool {
        self.push_with(frame, true)
    }

    /// Queues a frame from the session itself, which writes it without being woken.
    fn push_here(&self, frame: proto::AgentFrame) {
        self.push_with(frame, false);
    }

    fn push_with(&self, frame: proto::AgentFrame, notify: bool) -> bool {
        let answers = answers(&frame);
        self.queue(answers, notify, |codec, buf| codec.encode_message(&frame, buf))
    }

    /// Queues the answer to request `stream`, from a request's task.
    fn answer(&self, stream: u64, answer: &Result<pool_api::Decision, AgentError>) {
        self.answer_with(stream, answer, true);
    }

    /// Queues the answer to request `stream`, from the session itself (an answer decided
    /// inline), which writes it without being woken.
    fn answer_here(&self, stream: u64, answer: &Result<pool_api::Decision, AgentError>) {
        self.answer_with(stream, answer, false);
    }

    fn answer_with(&self, stream: u64, answer: &Result<pool_api::Decision, AgentError>, notify: bool) {
        match answer {
            Ok(decision) => {
                self.queue(Some(stream), notify, |codec, buf| codec.encode_decision(stream, decision, buf));
            }
            Err(e) => {
                let error = proto::AgentError { message: e.message.clone() };
                self.push_with(frame(stream, agent_frame::Body::Error(error)), notify);
            }
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.buf = BytesMut::new();
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// What a session owns that must not outlive it, however it ends (returning, or its task
/// being aborted when the server shuts down): on drop, the write side is closed and forgotten
/// by the [`ServerHandle`], and every request and configuration task still running is
/// aborted.
struct SessionTasks {
    out: Arc<Out>,
    handle: ServerHandle,
    /// Requests whose handler is running, by stream id: a cancel aborts the task; its answer
    /// (or the panic guard's error) being written removes the entry.
    running: StreamMap<JoinHandle<()>>,
    /// Configuration pushes being applied (finished ones are dropped as new ones come).
    config: Vec<JoinHandle<()>>,
}

impl Drop for SessionTasks {
    fn drop(&mut self) {
        self.out.close();
        self.handle.connections().retain(|c| !Arc::ptr_eq(c, &self.out));
        for (_, task) in self.running.drain() {
            task.abort();
        }
        for task in self.config.drain(..) {
            task.abort();
        }
    }
}

/// Watches a frame that has started to arrive: it must be whole by the check after the one
/// that first saw it, checks being `frame_read_timeout` apart (so it has between one and two
/// time-outs). Checks are polled only while part of a frame waits, and the clock is read only
/// when one is due, never per frame.
struct FrameWatch {
    checks: Interval,
    /// The last check saw part of a frame waiting for the rest.
    partial_at_last_check: bool,
    /// A frame was read whole since the last check.
    progress: bool,
}

impl FrameWatch {
    fn new(timeout: Duration) -> Self {
        let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + timeout, timeout);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { checks, partial_at_last_check: false, progress: false }
    }
}

/// What reading the connection gave.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per frame from the poll to the loop, like the frame it wraps; boxing would allocate per frame"
)]
enum Read {
    /// A frame, an error, or the end of the stream.
    Frame(Option<Result<Inbound, FrameError>>),
    /// A frame started arriving and stopped short for longer than the frame time-out.
    Stalled,
}

/// Polls for the next frame. Only when none is whole and part of one is buffered (nothing
/// more to read from the socket for now) is the frame time-out checked.
fn poll_read(framed: &mut AgentFramed, watch: &mut FrameWatch, cx: &mut Context<'_>) -> Poll<Read> {
    if let Poll::Ready(next) = framed.poll_next_unpin(cx) {
        watch.progress = true;
        return Poll::Ready(Read::Frame(next));
    }
    if framed.read_buffer().is_empty() {
        return Poll::Pending;
    }
    while watch.checks.poll_tick(cx).is_ready() {
        if watch.partial_at_last_check && !watch.progress {
            return Poll::Ready(Read::Stalled);
        }
        watch.partial_at_last_check = true;
        watch.progress = false;
    }
    Poll::Pending
}

/// Answers queued up to this many bytes may wait while frames already read are answered first.
const WRITE_AT: usize = 64 * 1024;

/// True if `buf` holds at least one whole frame (its 4-byte length and that many bytes).
fn whole_frame(buf: &[u8]) -> bool {
    buf.first_chunk::<4>().is_some_and(|len| buf.len() - 4 >= u32::from_be_bytes(*len) as usize)
}

/// Serves one handshaken connection until it ends: requests answered inline or on a task of
/// their own when their handler waits (at most `limit` at
/// once, more wait their turn), cancels, pings, config pushes, drain, and whatever the
/// [`ServerHandle`] sends. `limit` is the concurrency the proxy was told.
pub(crate) async fn run_session<H: AgentHandler>(
    mut framed: AgentFramed,
    handler: Arc<H>,
    limit: usize,
    limits: SessionLimits,
    handle: ServerHandle,
) {
    let out = Out::new(framed.codec().limit());
    handle.connections().push(out.clone());
    let counters = handle.limits.clone();
    let mut tasks =
        SessionTasks { out: out.clone(), handle, running: StreamMap::default(), config: Vec::new() };
    // The hard bound on request tasks alive at once. `tasks.running` is what the proxy is
    // told to keep under `limit`; a task cancelled or answered may take a moment more to
    // end, and a new request waits for its permit.
    let permits = Arc::new(Semaphore::new(limit));
    let max_config_pushes = limits.max_config_pushes as usize;
    let mut watch = FrameWatch::new(limits.frame_read_timeout);
    let mut answered = Vec::new();
    let mut draining = false;
    let ready = out.ready.notified();
    tokio::pin!(ready);
    // Frames the session queued itself since it last wrote (it is not woken for those).
    let mut unwritten = false;
    loop {
        // Frames already read are answered before anything is written, so the answers to one
        // read leave in one write (as an echo server does); past `WRITE_AT` queued bytes, or
        // once only a partial frame is left, the answers go out.
        let more_read = whole_frame(framed.read_buffer());
        let write_now = unwritten && (!more_read || out.backlogged());
        let write = write_now
            || tokio::select! {
                () = &mut ready, if !more_read || out.backlogged() => {
                    ready.set(out.ready.notified());
                    true
                }
                read = std::future::poll_fn(|cx| poll_read(&mut framed, &mut watch, cx)) => {
                    let incoming = match read {
                        Read::Frame(incoming) => incoming,
                        Read::Stalled => {
                            counters.hit(Limit::FrameRead);
                            tracing::debug!(
                                timeout = ?limits.frame_read_timeout,
                                "a frame started and did not arrive whole within the frame time-out; closing the connection"
                            );
                            break;
                        }
                    };
                    let frame_in = match incoming {
                        Some(Ok(f)) => f,
                        Some(Err(FrameError::TooLarge { size, limit })) => {
                            tracing::error!(?size, limit, "oversized frame; closing the connection");
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "undecodable frame; closing the connection");
                            break;
                        }
                        None => break,
                    };
                    // The codec hands every event over as `Inbound::Event`, already converted.
                    let (stream, body) = match frame_in {
                        Inbound::Frame(f) => (f.stream_id, f.body),
                        Inbound::Event { stream_id: stream, event } => {
                            let event = match event {
                                Ok(event) => event,
                                Err(err) => {
                                    tracing::error!(error = %err, "invalid event; closing the connection");
                                    break;
                                }
                            };
                            // `running` holds what the proxy was told to keep under `limit`: a
                            // request's entry goes when its answer is taken for writing, or when its
                            // cancel is read, so a proxy keeping to the limit never finds it full.
                            let over = tasks.running.len() >= limit;
                            // Before anything is answered on it: an answer on this stream would
                            // be taken for the answer of the request running under the same id.
                            let Entry::Vacant(slot) = tasks.running.entry(stream) else {
                                tracing::error!(stream, "a request reuses the stream id of one still running; closing the connection");
                                break;
                            };
                            if draining {
                                out.answer_here(stream, &Err(RequestRefused::Draining.into()));
                                unwritten = true;
                                continue;
                            }
                            // No permit: either a task cancelled or answered has not quite ended
                            // yet, or the proxy ignores the limit. Either way reading waits, and
                            // no more than `limit` tasks are ever alive.
                            let permit = match permits.clone().try_acquire_owned() {
                                Ok(permit) => permit,
                                Err(_) => {
                                    if over {
                                        counters.hit(Limit::Requests);
                                    }
                                    match permits.clone().acquire_owned().await {
                                        Ok(permit) => permit,
                                        Err(_) => break,
                                    }
                                }
                            };
                            // The handler is polled once here: one that decides without waiting
                            // (most do) is answered at once, without a task of its own. One that
                            // waits goes on in a task, which a cancel aborts. A panic, either way,
                            // answers that request with an error.
                            let handler = handler.clone();
                            let mut deciding = Box::pin(
                                AssertUnwindSafe(async move { handler.on_event(event).await }).catch_unwind(),
                            );
                            if let Some(outcome) = (&mut deciding).now_or_never() {
                                drop(permit);
                                out.answer_here(stream, &outcome.unwrap_or_else(|_| Err(panicked())));
                                unwritten = true;
                                continue;
                            }
                            let out = out.clone();
                            slot.insert(tokio::spawn(async move {
                                let _permit = permit;
                                let answer = deciding.await.unwrap_or_else(|_| Err(panicked()));
                                out.answer(stream, &answer);
                            }));
                            continue;
                        }
                    };
                    match body {
                        Some(proxy_frame::Body::Cancel(_)) => {
                            if let Some(task) = tasks.running.remove(&stream) {
                                task.abort();
                            }
                        }
                        Some(proxy_frame::Body::Ping(_)) => {
                            out.push_here(frame(stream, agent_frame::Body::Pong(proto::Pong {})));
                            unwritten = true;
                        }
                        Some(proxy_frame::Body::ConfigPush(p)) => {
                            tasks.config.retain(|task| !task.is_finished());
                            if tasks.config.len() >= max_config_pushes {
                                counters.hit(Limit::ConfigPushes);
                                let refused = RequestRefused::TooManyConfigPushes { push_id: p.push_id, limit: max_config_pushes };
                                let ack = proto::ConfigAck { push_id: p.push_id, accepted: false, error: Some(refused.to_string()) };
                                out.push_here(frame(stream, agent_frame::Body::ConfigAck(ack)));
                                unwritten = true;
                                continue;
                            }
                            let (handler, out) = (handler.clone(), out.clone());
                            tasks.config.push(tokio::spawn(async move {
                                let ack = handler.on_config(ConfigPush::from(p)).await;
                                out.push(frame(stream, agent_frame::Body::ConfigAck(ack.into())));
                            }));
                        }
                        Some(proxy_frame::Body::ConfigUpdateAnswer(a)) => {
                            tracing::info!(request = a.request_id, accepted = a.accepted, error = ?a.error, "proxy answered a configuration update");
                        }
                        Some(proxy_frame::Body::Drain(_)) => draining = true,
                        Some(proxy_frame::Body::Shutdown(_)) => break,
                        Some(
                            proxy_frame::Body::Hello(_)
                            | proxy_frame::Body::RegisterResult(_)
                            | proxy_frame::Body::Event(_),
                        )
                        | None => {
                            tracing::error!("unexpected or unknown message; closing the connection");
                            break;
                        }
                    }
                    false
                }
            };
        if !write {
            continue;
        }
        unwritten = false;
        // Other requests still running may finish in this same scheduler round: let
        // them, so one write carries all their answers.
        if permits.available_permits() + 1 < limit {
            tokio::task::yield_now().await;
        }
        let failed = {
            let mut state = out.lock();
            if framed.write_buffer().is_empty() {
                std::mem::swap(framed.write_buffer_mut(), &mut state.buf);
            } else {
                framed.write_buffer_mut().extend_from_slice(&state.buf);
                state.buf.clear();
            }
            std::mem::swap(&mut answered, &mut state.answered);
            state.failed.take()
        };
        for stream in answered.drain(..) {
            tasks.running.remove(&stream);
        }
        if let Some(e) = failed {
            tracing::error!(error = %e, "an answer could not be written; closing the connection");
            break;
        }
        // Only a write the socket cannot take at once is timed (no timer otherwise).
        let mut flush = std::pin::pin!(SinkExt::<proto::AgentFrame>::flush(&mut framed));
        let flushed = match flush.as_mut().now_or_never() {
            Some(flushed) => flushed,
            None => match tokio::time::timeout(limits.write_timeout, flush).await {
                Ok(flushed) => flushed,
                Err(_) => {
                    counters.hit(Limit::Write);
                    tracing::debug!(
                        timeout = ?limits.write_timeout,
                        "the proxy has not read for the write time-out; closing the connection"
                    );
                    break;
                }
            },
        };
        if flushed.is_err() {
            break;
        }
    }
}

/// The answer to a request whose handler panicked, so the proxy does not wait for its
/// time-out. (A cancelled request's task is dropped without a panic and answers nothing.)
fn panicked() -> AgentError {
    AgentError::new("the agent's handler panicked")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_api::{Connector, Endpoint, Hello};

    #[tokio::test]
    async fn a_closed_session_leaves_the_handle_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let server = UdsServer::bind(&path, UdsServerConfig::default()).await.unwrap();
        let handle = server.handle();
        tokio::spawn(server.serve(test_support::AllowAll, std::future::pending()));
        let endpoint = Endpoint::from(format!("unix:{}", path.display()));
        for _ in 0..5 {
            let pending = crate::UdsConnector::default().connect(&endpoint).await.unwrap();
            drop(pending.handshake(Hello::new("p")).await.unwrap());
        }
        // Without a broadcast or a count to prune it, the list of connections empties as the
        // sessions end: connecting and leaving does not grow it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !handle.connections().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} sessions still listed",
                handle.connections().len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
