//! The agent side: serve an [`AgentHandler`] on a Unix socket.
//!
//! Every connection handshakes (under a time-out), then runs one task per request, at most as
//! many at once as the handler's capabilities advertise. A cancel aborts that request's task.
//! A frame that cannot be decoded closes the connection with a logged error: the server never
//! answers a request it could not read, and never answers "allow" for it. Drain stops new work
//! (new events are answered with an error) while running requests finish. Health, flow-control
//! and configuration-update messages can be sent at any time through a [`ServerHandle`].
//!
//! Request tasks encode their answers straight into their connection's write buffer; the
//! connection's task is woken when the buffer goes from empty to not empty and writes
//! everything queued at once.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::{
    AgentError, AgentHandler, AgentHealth, ConfigPush, ConfigUpdateKind, ConfigUpdateRequest, FlowControl,
    PROTOCOL_VERSION,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::{Encoder, Framed};

use crate::client::PeerCredentials;
use crate::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError, Inbound, Outbound};
use crate::streams::StreamMap;

/// Settings of the agent side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest frame read or written.
    pub max_frame: usize,
    /// Permissions of the socket file (e.g. `0o660`); `None` leaves the umask's.
    pub mode: Option<u32>,
    /// Checked with `SO_PEERCRED` on every accepted connection; `None`: anyone.
    pub peer: Option<PeerCredentials>,
    /// Time a connecting proxy has to send its hello.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            mode: None,
            peer: None,
            handshake_timeout: Duration::from_secs(5),
        }
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
}

/// Sends agent-initiated messages to every connected proxy.
#[derive(Clone, Default)]
pub struct ServerHandle {
    connections: Arc<Mutex<Vec<Arc<Out>>>>,
    next_request: Arc<AtomicU64>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("connections", &self.connection_count()).finish()
    }
}

impl ServerHandle {
    fn broadcast(&self, body: agent_frame::Body) {
        let frame = proto::AgentFrame { stream_id: 0, body: Some(body) };
        let mut conns = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        conns.retain(|c| c.push(Outbound::Frame(frame.clone())));
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

    /// Proxies connected now.
    pub fn connection_count(&self) -> usize {
        let mut conns = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        conns.retain(|c| !c.is_closed());
        conns.len()
    }
}

/// An agent listening on a Unix socket. The socket file is removed when it is dropped.
#[derive(Debug)]
pub struct UdsServer {
    listener: UnixListener,
    path: PathBuf,
    config: ServerConfig,
    handle: ServerHandle,
}

impl UdsServer {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one, or a path
    /// that is not a socket, is an error.
    pub async fn bind(path: impl AsRef<Path>, config: ServerConfig) -> Result<Self, ServeError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, config.mode).await?;
        Ok(Self { listener, path, config, handle: ServerHandle::default() })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for agent-initiated messages.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves `handler` until `shutdown` resolves; then stops accepting and ends every
    /// connection (running requests are aborted).
    pub async fn serve<H: AgentHandler>(self, handler: H, shutdown: impl std::future::Future<Output = ()>) {
        let handler = Arc::new(handler);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if let Some(expected) = self.config.peer
                            && let Err(e) = crate::client::check_peer(&stream, expected, &self.path.display().to_string())
                        {
                            tracing::warn!(error = %e, "connection refused");
                            continue;
                        }
                        let (handler, config, handle) = (handler.clone(), self.config.clone(), self.handle.clone());
                        connections.spawn(serve_connection(stream, handler, config, handle));
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

/// Handshakes, then serves one connection until it ends.
async fn serve_connection<H: AgentHandler>(
    stream: UnixStream,
    handler: Arc<H>,
    config: ServerConfig,
    handle: ServerHandle,
) {
    let mut framed: AgentFramed = Framed::new(stream, FrameCodec::new(config.max_frame));
    let hello = match tokio::time::timeout(config.handshake_timeout, framed.next()).await {
        Ok(Some(Ok(Inbound::Frame(proto::ProxyFrame {
            body: Some(proxy_frame::Body::Hello(h)), ..
        })))) => h,
        Ok(other) => {
            tracing::warn!(?other, "handshake failed: expected a hello");
            return;
        }
        Err(_) => {
            tracing::warn!("handshake timed out");
            return;
        }
    };
    let mut capabilities = handler.capabilities();
    if !hello.supported_versions.contains(&PROTOCOL_VERSION) {
        let refused = proto::HandshakeRefused {
            message: format!("this agent speaks protocol version {PROTOCOL_VERSION}"),
            supported_versions: vec![PROTOCOL_VERSION],
        };
        let _ = framed.send(frame(0, agent_frame::Body::Refused(refused))).await;
        return;
    }
    capabilities.protocol_version = PROTOCOL_VERSION;
    let limit = concurrency_limit(&capabilities);
    if framed.send(frame(0, agent_frame::Body::Capabilities(capabilities.into()))).await.is_err() {
        return;
    }
    run_session(framed, handler, limit, handle).await;
}

/// How many requests an agent advertising `capabilities` runs at once.
pub(crate) fn concurrency_limit(capabilities: &pool_api::Capabilities) -> usize {
    capabilities.max_concurrency.map(|n| n.get() as usize).unwrap_or(Semaphore::MAX_PERMITS)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `encode`'s frame, which answers `answers` if it is an answer; false once the
    /// connection has ended.
    fn queue(
        &self,
        answers: Option<u64>,
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
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    /// Queues a frame; false once the connection has ended.
    fn push(&self, frame: Outbound) -> bool {
        let answers = frame.answers();
        self.queue(answers, |codec, buf| codec.encode(frame, buf))
    }

    /// Queues the answer to request `stream`.
    fn answer(&self, stream: u64, answer: &Result<pool_api::Decision, AgentError>) {
        match answer {
            Ok(decision) => {
                self.queue(Some(stream), |codec, buf| codec.encode_decision(stream, decision, buf));
            }
            Err(e) => {
                let error = proto::AgentError { message: e.message.clone() };
                self.push(Outbound::Frame(frame(stream, agent_frame::Body::Error(error))));
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

/// Serves one handshaken connection until it ends: a task per request (at most `limit` at
/// once), cancels, pings, config pushes, drain, and whatever the [`ServerHandle`] sends.
pub(crate) async fn run_session<H: AgentHandler>(
    mut framed: AgentFramed,
    handler: Arc<H>,
    limit: usize,
    handle: ServerHandle,
) {
    let out = Out::new(framed.codec().limit());
    handle.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(out.clone());
    let permits = Arc::new(Semaphore::new(limit));
    // Requests whose handler is running, by stream id: a cancel aborts the task; its answer
    // (or the panic guard's error) being queued removes the entry.
    let mut running: StreamMap<JoinHandle<()>> = StreamMap::default();
    let mut answered = Vec::new();
    let mut draining = false;
    let ready = out.ready.notified();
    tokio::pin!(ready);
    loop {
        tokio::select! {
            () = &mut ready => {
                ready.set(out.ready.notified());
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
                    running.remove(&stream);
                }
                if let Some(e) = failed {
                    tracing::error!(error = %e, "an answer could not be written; closing the connection");
                    break;
                }
                if SinkExt::<Outbound>::flush(&mut framed).await.is_err() {
                    break;
                }
            }
            incoming = framed.next() => {
                let frame_in = match incoming {
                    Some(Ok(f)) => f,
                    Some(Err(FrameError::TooLarge { limit, .. })) => {
                        tracing::error!(limit, "oversized frame; closing the connection");
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
                        if draining {
                            let error = proto::AgentError { message: "the agent is draining".into() };
                            out.push(Outbound::Frame(frame(stream, agent_frame::Body::Error(error))));
                            continue;
                        }
                        // Bounded by the advertised concurrency: waiting here holds back reading.
                        let permit = match permits.clone().try_acquire_owned() {
                            Ok(permit) => permit,
                            Err(_) => match permits.clone().acquire_owned().await {
                                Ok(permit) => permit,
                                Err(_) => break,
                            },
                        };
                        let (handler, out) = (handler.clone(), out.clone());
                        let task = tokio::spawn(async move {
                            let _permit = permit;
                            let mut guard = PanicGuard { out: Some(out), stream };
                            let answer = handler.on_event(event).await;
                            if let Some(out) = guard.out.take() {
                                out.answer(stream, &answer);
                            }
                        });
                        running.insert(stream, task);
                        continue;
                    }
                };
                match body {
                    Some(proxy_frame::Body::Cancel(_)) => {
                        if let Some(task) = running.remove(&stream) {
                            task.abort();
                        }
                    }
                    Some(proxy_frame::Body::Ping(_)) => {
                        out.push(Outbound::Frame(frame(stream, agent_frame::Body::Pong(proto::Pong {}))));
                    }
                    Some(proxy_frame::Body::ConfigPush(p)) => {
                        let (handler, out) = (handler.clone(), out.clone());
                        tokio::spawn(async move {
                            let ack = handler.on_config(ConfigPush::from(p)).await;
                            out.push(Outbound::Frame(frame(stream, agent_frame::Body::ConfigAck(ack.into()))));
                        });
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
            }
        }
    }
    out.close();
    for (_, task) in running.drain() {
        task.abort();
    }
}

/// Answers a request whose handler panicked with an error, so the proxy does not wait for its
/// time-out. (A cancelled request's task is dropped without a panic and answers nothing.)
struct PanicGuard {
    out: Option<Arc<Out>>,
    stream: u64,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if let Some(out) = self.out.take()
            && std::thread::panicking()
        {
            let error = proto::AgentError { message: "the agent's handler panicked".into() };
            out.push(Outbound::Frame(frame(self.stream, agent_frame::Body::Error(error))));
        }
    }
}
