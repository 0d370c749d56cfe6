//! The proxy side: a [`Connector`] for `unix:` endpoints and the connection it opens.
//!
//! Each connection is one task that owns the socket. Requests get a numeric stream id and wait
//! in a map for the answer with that id, so any number are in flight at once. The caller
//! encodes its own frame into the connection's write buffer and registers its request in the
//! same critical section (no channel, no copy of the event); the task is woken only when the
//! buffer goes from empty to not empty, and writes everything queued with one write. The task
//! reads answers and hands each straight to its waiting request. It also keeps the one timer
//! for every request sent with a deadline ([`AgentConnection::send_until`]), armed for the
//! earliest: a request past its deadline fails with [`TransportError::DeadlineExceeded`] and
//! a cancel (reason timeout) goes to the agent. Registering a deadline costs a comparison, not
//! a timer. End of stream, a frame that
//! does not decode, an unknown message or an invalid answer ends the connection: every pending
//! request fails at once with [`TransportError::Closed`] naming the connection and the reason,
//! and the connection's signals publish `open: false`. An event (or configuration push) that
//! would encode to a frame over the limit is different: its size is checked before anything is
//! written, so it fails alone with [`TransportError::MessageTooLarge`] and the connection and
//! the other requests on it carry on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_utils::CachePadded;
use futures_util::{SinkExt, StreamExt};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::streams::{DeadlineTimer, PendingRequests};
use pool_api::{
    AgentConnection, AgentError, BoxFuture, CancelReason, Capabilities, ConfigAck, ConfigPush,
    ConfigUpdateAnswer, ConfigUpdateRequest, ConnectionSignals, Connector, CorrelationId, Decision, Endpoint,
    Event, Hello, PendingConnection, TransportError,
};
use tokio::net::UnixStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError, FromAgent};
use crate::streams::StreamMap;

/// Who the agent at the other end of the socket must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The agent process's user id, if it must be one.
    pub uid: Option<u32>,
    /// The agent process's group id, if it must be one.
    pub gid: Option<u32>,
}

/// Settings of the proxy side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Largest frame read or written.
    pub max_frame: usize,
    /// Checked with `SO_PEERCRED` right after connecting; `None`: anyone.
    pub peer: Option<PeerCredentials>,
    /// Time the agent has to answer the hello; then the handshake fails with
    /// [`TransportError::Handshake`]. (`pool-core` also bounds the handshake with its own
    /// `handshake_timeout`; the shorter one wins.)
    pub handshake_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { max_frame: DEFAULT_MAX_FRAME, peer: None, handshake_timeout: Duration::from_secs(10) }
    }
}

/// The longest socket path or abstract name a Unix socket address holds: `sun_path` is 108
/// bytes, one of which is the path's terminating (or the abstract name's leading) NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Where a `unix:` endpoint points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketPath {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`unix:@name`).
    Abstract(String),
}

impl SocketPath {
    /// Parses an endpoint in one of the forms this transport serves:
    ///
    /// * `unix:/absolute/path` (also `unix:///absolute/path`, the URL spelling);
    /// * `unix:@name`, a Linux abstract socket;
    /// * `/absolute/path`, without a scheme.
    ///
    /// Anything else is a [`TransportError::InvalidEndpoint`] saying what is wrong: another
    /// scheme (`uds:`, `tcp://`…), a relative or empty path, a path naming a directory
    /// (trailing `/`), a NUL byte, or a path or name longer than [`MAX_SOCKET_PATH`] bytes.
    pub fn parse(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let s = endpoint.as_str();
        let invalid = |message: String| TransportError::InvalidEndpoint { endpoint: s.to_owned(), message };
        let rest = match s.strip_prefix("unix:") {
            Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
            None if s.starts_with('/') => s,
            None => {
                return Err(invalid(match scheme_of(s) {
                    Some(scheme) => format!(
                        "unknown scheme {scheme:?}: this transport serves unix:/absolute/path, \
                         unix:@abstract-name and /absolute/path"
                    ),
                    None => "expected unix:/absolute/path, unix:@abstract-name or /absolute/path".to_owned(),
                }));
            }
        };
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() {
                return Err(invalid("an abstract socket needs a name after '@'".to_owned()));
            }
            if name.len() > MAX_SOCKET_PATH {
                return Err(invalid(format!(
                    "the abstract name is {} bytes; a Unix socket address holds at most {MAX_SOCKET_PATH}",
                    name.len()
                )));
            }
            if !cfg!(target_os = "linux") {
                return Err(invalid("abstract sockets are Linux-only".to_owned()));
            }
            return Ok(Self::Abstract(name.to_owned()));
        }
        if rest.is_empty() {
            return Err(invalid("the socket path is empty".to_owned()));
        }
        if !rest.starts_with('/') {
            return Err(invalid(format!("{rest:?} is a relative path; a socket path must be absolute")));
        }
        if rest.contains('\0') {
            return Err(invalid("the socket path contains a NUL byte".to_owned()));
        }
        if rest.ends_with('/') {
            return Err(invalid(format!("{rest:?} names a directory, not a socket file")));
        }
        if rest.len() > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "the socket path is {} bytes; a Unix socket address holds at most {MAX_SOCKET_PATH}",
                rest.len()
            )));
        }
        Ok(Self::Path(PathBuf::from(rest)))
    }

    pub(crate) async fn connect(&self) -> std::io::Result<UnixStream> {
        match self {
            Self::Path(p) => UnixStream::connect(p).await,
            Self::Abstract(name) => {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    let std = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                    std.set_nonblocking(true)?;
                    UnixStream::from_std(std)
                }
                #[cfg(not(target_os = "linux"))]
                {
                    let _ = name;
                    Err(std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "abstract sockets are Linux-only",
                    ))
                }
            }
        }
    }
}

/// Opens connections to agents listening on Unix sockets, at the endpoints
/// [`SocketPath::parse`] accepts.
#[derive(Clone, Debug, Default)]
pub struct UdsConnector {
    config: Arc<ClientConfig>,
    spread: Option<Arc<pool_api::Placement>>,
}

impl UdsConnector {
    /// A connector with these settings.
    pub fn new(config: ClientConfig) -> Self {
        Self { config: Arc::new(config), spread: None }
    }

    /// Makes each new connection on the next of `runtimes` in turn (an empty list: wherever
    /// `connect` is called, the default): its socket is registered there and its task runs
    /// there. For a proxy whose requests run on worker threads, one single-threaded runtime
    /// each: given the workers' runtimes, the connections are spread over them, each reports
    /// its thread as [`AgentConnection::home`], and the pool sends a request made on a worker
    /// over a connection of that worker, so that the exchange and the answer's wake-up never
    /// cross threads.
    pub fn spread_over(mut self, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        self.spread = pool_api::Placement::new(runtimes).map(Arc::new);
        self
    }
}

/// The scheme an address starts with (`uds` of `uds:/run/waf.sock`), if it has one.
fn scheme_of(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some(scheme)
}

impl Connector for UdsConnector {
    /// Accepts exactly what [`SocketPath::parse`] accepts: `unix:/absolute/path`,
    /// `unix:///absolute/path`, `unix:@abstract-name` and `/absolute/path`.
    fn validate_endpoint(&self, endpoint: &Endpoint) -> Result<(), TransportError> {
        SocketPath::parse(endpoint).map(drop)
    }

    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> BoxFuture<'static, Result<Box<dyn PendingConnection>, TransportError>> {
        let config = self.config.clone();
        let endpoint = endpoint.clone();
        let place = self.spread.as_ref().map(|s| s.next_runtime());
        let label = endpoint.to_string();
        let placed = place.is_some();
        let connect = async move {
            let path = SocketPath::parse(&endpoint)?;
            let stream = path.connect().await.map_err(|e| TransportError::connect(endpoint.as_str(), &e))?;
            if let Some(expected) = config.peer {
                check_peer(&stream, expected, endpoint.as_str())?;
            }
            // Run where the socket was registered: the task goes to the same runtime.
            let home = placed.then(|| (tokio::runtime::Handle::current(), pool_api::worker_index()));
            Ok(Box::new(Pending { stream, endpoint, config, home }) as Box<dyn PendingConnection>)
        };
        Box::pin(async move {
            pool_api::run_on(place, connect).await.map_err(|e| {
                TransportError::connect(&label, &std::io::Error::other(format!("its runtime: {e}")))
            })?
        })
    }
}

pub(crate) fn check_peer(
    stream: &UnixStream,
    expected: PeerCredentials,
    label: &str,
) -> Result<(), TransportError> {
    let cred = stream.peer_cred().map_err(|e| TransportError::Unauthorized {
        connection: label.to_owned(),
        message: format!("cannot read peer credentials: {e}"),
    })?;
    let refuse = |what: &str, got: u32, want: u32| TransportError::Unauthorized {
        connection: label.to_owned(),
        message: format!("peer {what} is {got}, expected {want}"),
    };
    if let Some(uid) = expected.uid.filter(|u| *u != cred.uid()) {
        return Err(refuse("uid", cred.uid(), uid));
    }
    if let Some(gid) = expected.gid.filter(|g| *g != cred.gid()) {
        return Err(refuse("gid", cred.gid(), gid));
    }
    Ok(())
}

/// Counts connections per process, for labels.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(0);

struct Pending {
    stream: UnixStream,
    endpoint: Endpoint,
    config: Arc<ClientConfig>,
    /// The runtime the socket is registered with and its worker thread, when the connector
    /// places connections.
    home: Option<(tokio::runtime::Handle, Option<usize>)>,
}

pub(crate) type ProxyFramed = Framed<UnixStream, FrameCodec<proto::AgentFrame, proto::ProxyFrame>>;

/// The connection after the handshake: decisions are decoded straight into `pool-api` values.
type ConnectionFramed = Framed<UnixStream, FrameCodec<FromAgent, proto::ProxyFrame>>;

impl PendingConnection for Pending {
    fn handshake(
        self: Box<Self>,
        hello: Hello,
    ) -> BoxFuture<'static, Result<Arc<dyn AgentConnection>, TransportError>> {
        Box::pin(async move {
            let label = format!("{}#{}", self.endpoint, NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
            let endpoint = self.endpoint.to_string();
            let mut framed: ProxyFramed = Framed::new(self.stream, FrameCodec::new(self.config.max_frame));
            let offered = hello.supported_versions.clone();
            let frame =
                proto::ProxyFrame { stream_id: 0, body: Some(proxy_frame::Body::Hello(hello.into())) };
            let failed = |message: String| TransportError::Handshake { endpoint: endpoint.clone(), message };
            framed.send(frame).await.map_err(|e| failed(e.to_string()))?;
            let timeout = self.config.handshake_timeout;
            let answer = tokio::time::timeout(timeout, framed.next())
                .await
                .map_err(|_| failed(format!("no answer to the hello within {timeout:?}")))?;
            let capabilities = match answer {
                Some(Ok(proto::AgentFrame { body: Some(agent_frame::Body::Capabilities(c)), .. })) => {
                    Capabilities::try_from(c).map_err(|e| failed(e.to_string()))?
                }
                Some(Ok(proto::AgentFrame { body: Some(agent_frame::Body::Refused(r)), .. })) => {
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
                Some(Ok(other)) => return Err(failed(format!("expected capabilities, got {other:?}"))),
                Some(Err(e)) => return Err(failed(e.to_string())),
                None => return Err(failed("the agent closed the connection".into())),
            };
            if !offered.contains(&capabilities.protocol_version) {
                return Err(TransportError::VersionMismatch {
                    endpoint,
                    proxy: offered,
                    agent: vec![capabilities.protocol_version],
                });
            }
            Ok(UdsConnection::start(framed, capabilities, label, self.home) as Arc<dyn AgentConnection>)
        })
    }
}

/// A connection's task that has not started yet.
pub(crate) struct PreparedTask {
    task: Task,
}

impl PreparedTask {
    /// Writes and flushes one frame before the task takes over the socket.
    pub(crate) async fn write_first(&mut self, frame: proto::ProxyFrame) -> Result<(), FrameError> {
        self.task.framed.send(frame).await
    }

    /// Ends the connection before it ever ran: anything already queued fails with `reason`.
    pub(crate) fn abort(mut self, reason: &str) {
        self.task.shut(reason);
    }

    /// Starts the task.
    pub(crate) fn spawn(self) {
        tokio::spawn(self.task.run());
    }

    /// Starts the task on `runtime`.
    fn spawn_on(self, runtime: &tokio::runtime::Handle) {
        runtime.spawn(self.task.run());
    }
}

/// State shared by the handle, the requests in flight and the task.
struct Core {
    label: String,
    /// On a cache line of its own: every send reads it, and the lock next to it is written by
    /// every send (sharing a line cost ~1.4 % of a request's CPU in a profile).
    open: CachePadded<AtomicBool>,
    reason: Mutex<Option<String>>,
    signals: watch::Sender<ConnectionSignals>,
    out: Mutex<Outgoing>,
    /// Signalled when [`Outgoing`] has work for the task that the task has not been told
    /// about yet.
    ready: Notify,
}

/// What the handle and the task share under one lock: frames to write, encoded by whoever
/// produces them in the order they are produced, and whatever waits for an answer. A request
/// is registered in the same critical section that queues its frame, so its answer always
/// finds it.
struct Outgoing {
    codec: FrameCodec<FromAgent, proto::ProxyFrame>,
    buf: BytesMut,
    pending: PendingRequests,
    /// Requests whose frames are in `buf` (the others in `pending` are on the wire).
    queued: usize,
    pings: StreamMap<(Instant, oneshot::Sender<Duration>)>,
    pushes: HashMap<u64, oneshot::Sender<ConfigAck>>,
    /// Why the task must stop before writing anything more (a frame that could not be
    /// encoded, a close asked for), if it must.
    stop: Option<String>,
    /// The handle was dropped: the task ends once nothing waits for an answer.
    orphaned: bool,
    /// The task has been woken and has not looked yet.
    signalled: bool,
    /// The task has ended: nothing more is queued.
    closed: bool,
}

impl Outgoing {
    /// True if the task has something to do: frames to write, a reason to stop, or nothing
    /// left to wait for after the handle was dropped.
    fn has_work(&self) -> bool {
        !self.buf.is_empty() || self.stop.is_some() || (self.orphaned && self.pending.is_empty())
    }

    /// Queues a small control message (cancel, ping, drain…) as a frame; one over the frame
    /// limit ends the connection, as it cannot be sent and nothing waits to be told.
    fn write(&mut self, message: &impl prost::Message) {
        if let Err(e) = self.codec.encode_message(message, &mut self.buf) {
            self.stop.get_or_insert(format!("write failed: {e}"));
        }
    }

    fn frame(&mut self, stream_id: u64, body: proxy_frame::Body) {
        self.write(&proto::ProxyFrame { stream_id, body: Some(body) });
    }

    /// Tells the agent to cancel the request on `stream`.
    fn cancel(&mut self, stream: u64, correlation_id: CorrelationId, reason: CancelReason) {
        let cancel = pool_api::Cancel { correlation_id, reason };
        self.frame(stream, proxy_frame::Body::Cancel(cancel.into()));
    }
}

impl Core {
    fn closed_error(&self) -> TransportError {
        let reason = self.reason.lock().clone().unwrap_or_else(|| "the connection's task ended".into());
        TransportError::Closed { connection: self.label.clone(), reason }
    }

    /// The error of one outgoing message over the frame limit: it fails alone.
    fn too_large(&self, size: usize, limit: usize) -> TransportError {
        TransportError::MessageTooLarge {
            connection: self.label.clone(),
            size: size as u64,
            limit: limit as u64,
        }
    }

    fn mark_closed(&self, reason: &str) {
        if self.open.swap(false, Ordering::AcqRel) {
            *self.reason.lock() = Some(reason.to_owned());
            self.signals.send_modify(|s| s.open = false);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outgoing> {
        self.out.lock()
    }

    /// Runs `f` on the shared state unless the task has ended (then returns `None`), and
    /// wakes the task if it now has something to do and has not been woken for it yet.
    fn with<T>(&self, f: impl FnOnce(&mut Outgoing) -> T) -> Option<T> {
        let mut out = self.lock();
        if out.closed {
            return None;
        }
        let result = f(&mut out);
        let wake = !out.signalled && out.has_work();
        out.signalled |= wake;
        drop(out);
        if wake {
            self.ready.notify_one();
        }
        Some(result)
    }
}

/// One live connection to an agent over a Unix socket.
pub struct UdsConnection {
    core: Arc<Core>,
    /// The worker thread its task runs on, when the connector placed it on one.
    home: Option<usize>,
    capabilities: Capabilities,
    next_stream: AtomicU64,
    updates: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ConfigUpdateRequest>>>,
}

impl std::fmt::Debug for UdsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdsConnection")
            .field("label", &self.core.label)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for UdsConnection {
    fn drop(&mut self) {
        self.core.with(|out| out.orphaned = true);
    }
}

impl UdsConnection {
    fn start(
        framed: ProxyFramed,
        capabilities: Capabilities,
        label: String,
        home: Option<(tokio::runtime::Handle, Option<usize>)>,
    ) -> Arc<Self> {
        let worker = home.as_ref().and_then(|(_, worker)| *worker);
        let (connection, task) = Self::prepare_at(framed, capabilities, label, worker);
        match home {
            None => task.spawn(),
            Some((runtime, _)) => task.spawn_on(&runtime),
        }
        connection
    }

    /// The connection and its task, not yet running: requests queue up until the task is
    /// spawned, so a transport can still write its own frames first (a reverse registration's
    /// answer).
    pub(crate) fn prepare(
        framed: ProxyFramed,
        capabilities: Capabilities,
        label: String,
    ) -> (Arc<Self>, PreparedTask) {
        Self::prepare_at(framed, capabilities, label, None)
    }

    /// [`prepare`](Self::prepare) for a connection whose task will run on worker `home`.
    fn prepare_at(
        framed: ProxyFramed,
        capabilities: Capabilities,
        label: String,
        home: Option<usize>,
    ) -> (Arc<Self>, PreparedTask) {
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        let framed = framed.map_codec(FrameCodec::retype);
        let codec = FrameCodec::new(framed.codec().limit());
        let core = Arc::new(Core {
            label,
            open: CachePadded::new(AtomicBool::new(true)),
            reason: Mutex::new(None),
            signals: watch::Sender::new(ConnectionSignals::open()),
            out: Mutex::new(Outgoing {
                codec,
                buf: BytesMut::new(),
                pending: PendingRequests::new(),
                queued: 0,
                pings: StreamMap::default(),
                pushes: HashMap::new(),
                stop: None,
                orphaned: false,
                signalled: false,
                closed: false,
            }),
            ready: Notify::new(),
        });
        let task = Task { core: core.clone(), framed, updates: Some(updates_tx) };
        let connection = Arc::new(Self {
            core,
            home,
            capabilities,
            next_stream: AtomicU64::new(1),
            updates: Arc::new(tokio::sync::Mutex::new(updates_rx)),
        });
        (connection, PreparedTask { task })
    }

    /// Runs `f` on the shared state, or fails with the connection's closing error.
    fn with<T>(&self, f: impl FnOnce(&mut Outgoing) -> T) -> Result<T, TransportError> {
        self.core.with(f).ok_or_else(|| self.core.closed_error())
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
        let queued = self.with(|out| match out.codec.encode_event(stream, event, &mut out.buf) {
            Ok(()) => {
                register(out, stream, event.correlation_id().clone(), reply, deadline);
                out.queued += 1;
                Ok(())
            }
            // The size is checked before a byte of the frame is written, so nothing of it is
            // in the buffer: only this request fails, the connection and the requests on it
            // go on.
            Err(FrameError::TooLarge { size: Some(size), limit }) => Err(self.core.too_large(size, limit)),
            Err(e) => {
                // As a failed write: the connection ends and this request fails with it.
                out.stop.get_or_insert(format!("write failed: {e}"));
                register(out, stream, event.correlation_id().clone(), reply, deadline);
                out.queued += 1;
                Ok(())
            }
        });
        match queued {
            Ok(Ok(())) => {}
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

/// Registers a request in the table of waiting requests, with its deadline if it has one (the
/// task arms its timer for it when it next writes: every request queues a frame).
fn register(
    out: &mut Outgoing,
    stream: u64,
    correlation_id: CorrelationId,
    reply: pool_api::streams::Reply,
    deadline: Option<Instant>,
) {
    match deadline {
        Some(deadline) => {
            out.pending.insert_until(stream, correlation_id, reply, deadline);
        }
        None => out.pending.insert(stream, correlation_id, reply),
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
            self.core.with(|out| {
                if let Some(waiter) = out.pending.take(stream) {
                    let correlation_id = waiter.into_correlation_id();
                    out.cancel(stream, correlation_id, CancelReason::Abandoned);
                }
            });
        }
    }
}

impl AgentConnection for UdsConnection {
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
        let _ = self.with(|out| {
            let mut cancelled = Vec::new();
            out.pending.cancel(correlation_id, reason, |stream, correlation_id| {
                cancelled.push((stream, correlation_id));
            });
            for (stream, correlation_id) in cancelled {
                out.cancel(stream, correlation_id, reason);
            }
        });
    }

    fn cancel_all(&self, reason: CancelReason) {
        let _ = self.with(|out| {
            let mut cancelled = Vec::new();
            out.pending.cancel_all(reason, |stream, correlation_id| cancelled.push((stream, correlation_id)));
            for (stream, correlation_id) in cancelled {
                out.cancel(stream, correlation_id, reason);
            }
        });
    }

    fn signals(&self) -> watch::Receiver<ConnectionSignals> {
        self.core.signals.subscribe()
    }

    fn ping(&self) -> BoxFuture<'static, Result<Duration, TransportError>> {
        let (reply, pong) = oneshot::channel();
        let stream = self.stream();
        if let Err(e) = self.with(|out| {
            out.pings.insert(stream, (Instant::now(), reply));
            out.frame(stream, proxy_frame::Body::Ping(proto::Ping {}));
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
        let (reply, ack) = oneshot::channel();
        let id = push.push_id;
        let frame =
            proto::ProxyFrame { stream_id: id, body: Some(proxy_frame::Body::ConfigPush(push.into())) };
        // A payload over the frame limit fails this push alone, like an oversized event.
        let queued = self.with(|out| match out.codec.encode_message(&frame, &mut out.buf) {
            Ok(()) => {
                out.pushes.insert(id, reply);
                Ok(())
            }
            Err(FrameError::TooLarge { size: Some(size), limit }) => Err(self.core.too_large(size, limit)),
            Err(e) => {
                out.stop.get_or_insert(format!("write failed: {e}"));
                Ok(())
            }
        });
        match queued {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => return ready(Err(e)),
        }
        let core = self.core.clone();
        Box::pin(async move { ack.await.map_err(|_| core.closed_error()) })
    }

    fn next_config_update(&self) -> BoxFuture<'static, Option<ConfigUpdateRequest>> {
        let updates = self.updates.clone();
        Box::pin(async move { updates.lock().await.recv().await })
    }

    fn answer_config_update(&self, answer: ConfigUpdateAnswer) {
        let _ = self.with(|out| out.frame(0, proxy_frame::Body::ConfigUpdateAnswer(answer.into())));
    }

    fn drain(&self) {
        if self.is_open() {
            self.core.signals.send_modify(|s| s.draining = true);
            let _ = self.with(|out| out.frame(0, proxy_frame::Body::Drain(proto::Drain {})));
        }
    }

    fn close(&self) {
        let _ = self.with(|out| {
            out.frame(0, proxy_frame::Body::Shutdown(proto::Shutdown {}));
            out.stop.get_or_insert_with(|| "closed by the proxy".into());
        });
    }
}

/// Records one metric an agent reported as the gauge `agentpool_agent_metric`, labelled with
/// the connection, the agent's metric name and the agent's own labels. A value that is not
/// finite is dropped (it cannot be exported).
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

/// The task that owns one socket.
struct Task {
    core: Arc<Core>,
    framed: ConnectionFramed,
    updates: Option<mpsc::UnboundedSender<ConfigUpdateRequest>>,
}

/// Why the task stops.
enum Stop {
    Closed(String),
}

/// A task dropped before its end (its runtime stopped: a worker thread that ended) closes the
/// connection like any other end: waiting requests fail at once instead of at their deadlines,
/// and the pool sees the connection closed.
impl Drop for Task {
    fn drop(&mut self) {
        if !self.core.lock().closed {
            self.shut("the connection's runtime stopped");
        }
    }
}

impl Task {
    async fn run(mut self) {
        let core = self.core.clone();
        let ready = core.ready.notified();
        tokio::pin!(ready);
        // The one timer for every request's deadline, armed for the earliest.
        let mut deadlines = DeadlineTimer::new();
        let Stop::Closed(reason) = loop {
            tokio::select! {
                () = deadlines.fired(), if deadlines.is_armed() => {
                    let error = TransportError::DeadlineExceeded { connection: core.label.clone() };
                    let now = Instant::now();
                    let next = core.with(|out| {
                        let mut expired = Vec::new();
                        let next = out.pending.expire(now, &error, |stream, id| expired.push((stream, id)));
                        for (stream, correlation_id) in expired {
                            out.cancel(stream, correlation_id, CancelReason::Timeout);
                        }
                        next
                    });
                    deadlines.set(next.flatten());
                }
                () = &mut ready => {
                    ready.set(core.ready.notified());
                    // With other requests on the wire, more sends are likely runnable right now
                    // (woken by the answers just read): let them queue up first, so one write
                    // carries them all instead of one write per request. A lone request is
                    // written at once.
                    let in_flight = {
                        let out = core.lock();
                        out.pending.len() > out.queued
                    };
                    if in_flight {
                        tokio::task::yield_now().await;
                    }
                    let (stop, orphaned, next) = {
                        let mut out = core.lock();
                        let write = self.framed.write_buffer_mut();
                        if write.is_empty() {
                            std::mem::swap(write, &mut out.buf);
                        } else {
                            write.extend_from_slice(&out.buf);
                            out.buf.clear();
                        }
                        out.signalled = false;
                        out.queued = 0;
                        (out.stop.take(), out.orphaned && out.pending.is_empty(), out.pending.arm())
                    };
                    deadlines.set(next);
                    let flushed = SinkExt::<proto::ProxyFrame>::flush(&mut self.framed).await;
                    if let Some(reason) = stop {
                        break Stop::Closed(reason);
                    }
                    if let Err(e) = flushed {
                        break Stop::Closed(format!("write failed: {e}"));
                    }
                    if orphaned {
                        break Stop::Closed("every handle was dropped".into());
                    }
                }
                frame = self.framed.next() => match frame {
                    Some(Ok(FromAgent::Decision { stream_id, decision })) => {
                        // An answer to a request cancelled or abandoned meanwhile is simply late.
                        let (waiting, orphaned) = {
                            let mut out = core.lock();
                            let waiting = out.pending.take(stream_id);
                            (waiting, out.orphaned && out.pending.is_empty())
                        };
                        if let Some(waiter) = waiting {
                            waiter.answer(Ok(decision));
                        }
                        if orphaned {
                            break Stop::Closed("every handle was dropped".into());
                        }
                    }
                    Some(Ok(FromAgent::Frame(frame))) => {
                        if let Err(stop) = self.on_frame(frame) {
                            break stop;
                        }
                    }
                    Some(Err(FrameError::TooLarge { limit, .. })) => {
                        break Stop::Closed(format!("the agent sent a frame over the {limit}-byte limit"));
                    }
                    Some(Err(e)) => break Stop::Closed(format!("protocol error: {e}")),
                    None => break Stop::Closed("the agent closed the connection".into()),
                },
            }
        };
        self.shut(&reason);
    }

    /// Fails everything at once and publishes the closure.
    fn shut(&mut self, reason: &str) {
        tracing::debug!(connection = %self.core.label, reason, "connection closed");
        self.core.mark_closed(reason);
        let error = self.core.closed_error();
        let (pending, pings, pushes) = {
            let mut out = self.core.lock();
            out.closed = true;
            out.buf = BytesMut::new();
            (out.pending.take_all(), std::mem::take(&mut out.pings), std::mem::take(&mut out.pushes))
        };
        pending.fail(&error);
        drop((pings, pushes));
        self.updates = None;
    }

    fn on_frame(&mut self, frame: proto::AgentFrame) -> Result<(), Stop> {
        use agent_frame::Body;
        let stream = frame.stream_id;
        let protocol = |what: String| Stop::Closed(format!("protocol error: {what}"));
        match frame.body {
            Some(Body::Decision(d)) => {
                let decision = Decision::try_from(d).map_err(|e| protocol(e.to_string()))?;
                // An answer to a request cancelled or abandoned meanwhile is simply late.
                let waiting = self.core.lock().pending.take(stream);
                if let Some(waiter) = waiting {
                    waiter.answer(Ok(decision));
                }
            }
            Some(Body::Error(e)) => {
                let waiting = self.core.lock().pending.take(stream);
                if let Some(waiter) = waiting {
                    waiter.answer(Err(TransportError::Agent(AgentError::new(e.message))));
                }
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
                if let Some(updates) = &self.updates {
                    let _ = updates.send(request);
                }
            }
            Some(Body::Metrics(report)) => {
                for metric in report.metrics {
                    record_metric(&self.core.label, pool_api::AgentMetric::from(metric));
                }
            }
            Some(Body::Capabilities(_) | Body::Refused(_) | Body::Register(_)) => {
                return Err(protocol("handshake message after the handshake".into()));
            }
            None => return Err(protocol("unknown message type".into())),
        }
        Ok(())
    }
}
