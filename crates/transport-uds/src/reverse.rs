//! Reverse connections: the agent dials the proxy.
//!
//! Some agents cannot be reached (they run elsewhere, start later, or scale on their own); they
//! connect to a socket the proxy listens on instead. The agent's first frame is a `Register`
//! (agent id, replica id, token, capabilities with its protocol version). The proxy's
//! [`ReverseListener`] reads it under a time-out, checks the version, builds the same
//! [`UdsConnection`] a forward connect would, and hands it to a callback
//! — typically `AgentPool::add_reverse_connection`, which checks the token and attaches the
//! connection to the agent. The callback's verdict goes back as `RegisterResult`; nothing else
//! is written before it, so the agent never sees an event ahead of its acceptance. From then
//! on the connection is an ordinary one in both directions.
//!
//! The agent side is [`ReverseAgent`]: it dials, registers and serves its handler exactly as
//! [`UdsServer`] does (a task per request, cancels, drain, health and flow
//! reports through its [`ServerHandle`]); when the connection ends it dials again with jittered
//! exponential back-off. A refusal (bad token, unsupported version) ends it with
//! [`ReverseError::Refused`]: retrying would not change the answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::{AgentConnection, AgentHandler, Capabilities, Endpoint, PROTOCOL_VERSION, TransportError};
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;

#[cfg(doc)]
use crate::UdsServer;
use crate::client::{PeerCredentials, SocketPath, UdsConnection, check_peer};
use crate::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError, Inbound};
use crate::server::{
    AgentFramed, ServeError, ServerHandle, SessionLimits, bind_socket, concurrency_limit, run_session,
};

/// Settings of the proxy's listener for reverse connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReverseListenerConfig {
    /// Largest frame read or written.
    pub max_frame: usize,
    /// Permissions of the socket file; `None` leaves the umask's.
    pub mode: Option<u32>,
    /// Checked with `SO_PEERCRED` on every accepted connection; `None`: anyone.
    pub peer: Option<PeerCredentials>,
    /// Time a connecting agent has to register.
    pub register_timeout: Duration,
    /// Sent to agents in the registration answer.
    pub proxy_id: String,
    /// Protocol versions accepted.
    pub supported_versions: Vec<u32>,
}

impl Default for ReverseListenerConfig {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            mode: None,
            peer: None,
            register_timeout: Duration::from_secs(5),
            proxy_id: "agentpool".into(),
            supported_versions: vec![PROTOCOL_VERSION],
        }
    }
}

/// A connection an agent opened and registered, ready to be used like any other.
pub struct Registration {
    /// The agent it belongs to.
    pub agent_id: String,
    /// Which instance of the agent (stable across its reconnects).
    pub replica_id: String,
    /// The token it presented (to be checked by whoever accepts the registration).
    pub token: Option<String>,
    /// The connection.
    pub connection: Arc<dyn AgentConnection>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("agent_id", &self.agent_id)
            .field("replica_id", &self.replica_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connection", &self.connection.label())
            .finish()
    }
}

/// Counts reverse connections per process, for labels.
static NEXT_REVERSE: AtomicU64 = AtomicU64::new(0);

/// The proxy's listener for agents that connect by themselves. The socket file is removed when
/// it is dropped.
#[derive(Debug)]
pub struct ReverseListener {
    listener: UnixListener,
    path: PathBuf,
    config: Arc<ReverseListenerConfig>,
}

impl ReverseListener {
    /// Binds `path` (a stale socket file is replaced; a live one, or a path that is not a
    /// socket, is an error).
    pub async fn bind(path: impl AsRef<Path>, config: ReverseListenerConfig) -> Result<Self, ServeError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, config.mode).await?;
        Ok(Self { listener, path, config: Arc::new(config) })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts agents until `shutdown` resolves. Each registration is handed to `on_register`;
    /// `Ok` accepts it, `Err(reason)` refuses it and the agent is told why. Registrations
    /// still in progress at shutdown are dropped; accepted connections belong to whoever
    /// took them and live on.
    pub async fn serve<F>(self, on_register: F, shutdown: impl std::future::Future<Output = ()>)
    where
        F: Fn(Registration) -> Result<(), String> + Send + Sync + 'static,
    {
        let on_register = Arc::new(on_register);
        let mut registering = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let label = self.path.display().to_string();
                        if let Some(expected) = self.config.peer
                            && let Err(e) = check_peer(&stream, expected, &label)
                        {
                            tracing::warn!(error = %e, "reverse connection refused");
                            continue;
                        }
                        let framed = Framed::new(stream, FrameCodec::new(self.config.max_frame));
                        registering.spawn(register(framed, self.config.clone(), label, on_register.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = registering.join_next(), if !registering.is_empty() => {}
            }
        }
        registering.shutdown().await;
    }
}

impl Drop for ReverseListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

type ListenerFramed = Framed<tokio::net::UnixStream, FrameCodec<proto::AgentFrame, proto::ProxyFrame>>;

fn answer(accepted: bool, error: Option<String>, proxy_id: &str) -> proto::ProxyFrame {
    proto::ProxyFrame {
        stream_id: 0,
        body: Some(proxy_frame::Body::RegisterResult(proto::RegisterResult {
            accepted,
            error,
            proxy_id: proxy_id.to_owned(),
        })),
    }
}

/// Reads one agent's registration, checks it, and hands the connection over.
async fn register<F>(
    mut framed: ListenerFramed,
    config: Arc<ReverseListenerConfig>,
    path: String,
    on_register: Arc<F>,
) where
    F: Fn(Registration) -> Result<(), String> + Send + Sync + 'static,
{
    let refuse = |message: String| {
        tracing::warn!(listener = %path, message, "reverse registration refused");
        answer(false, Some(message), &config.proxy_id)
    };
    let register = match tokio::time::timeout(config.register_timeout, framed.next()).await {
        Ok(Some(Ok(proto::AgentFrame { body: Some(agent_frame::Body::Register(r)), .. }))) => r,
        Ok(Some(Ok(other))) => {
            let what = if other.body.is_some() { "another message" } else { "an unknown message" };
            let _ = framed.send(refuse(format!("expected a registration, got {what}"))).await;
            return;
        }
        Ok(Some(Err(e))) => {
            tracing::warn!(listener = %path, error = %e, "reverse registration failed: bad frame");
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::warn!(listener = %path, timeout = ?config.register_timeout, "reverse registration timed out");
            return;
        }
    };
    let capabilities = match register.capabilities.map(Capabilities::try_from) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            let _ = framed.send(refuse(format!("invalid capabilities: {e}"))).await;
            return;
        }
        None => {
            let _ = framed.send(refuse("the registration carries no capabilities".into())).await;
            return;
        }
    };
    if register.agent_id.is_empty() {
        let _ = framed.send(refuse("the registration has an empty agent id".into())).await;
        return;
    }
    if !config.supported_versions.contains(&capabilities.protocol_version) {
        let message = format!(
            "protocol version {} is not supported; this proxy speaks {:?}",
            capabilities.protocol_version, config.supported_versions
        );
        let _ = framed.send(refuse(message)).await;
        return;
    }
    let label = format!(
        "reverse:{}/{}@{path}#{}",
        register.agent_id,
        register.replica_id,
        NEXT_REVERSE.fetch_add(1, Ordering::Relaxed)
    );
    let (connection, mut task) = UdsConnection::prepare(framed, capabilities, label);
    let registration = Registration {
        agent_id: register.agent_id,
        replica_id: register.replica_id,
        token: register.token,
        connection: connection.clone(),
    };
    match on_register(registration) {
        Ok(()) => match task.write_first(answer(true, None, &config.proxy_id)).await {
            Ok(()) => task.spawn(),
            Err(e) => task.abort(&format!("could not answer the registration: {e}")),
        },
        Err(reason) => {
            let _ = task.write_first(refuse(reason.clone())).await;
            task.abort(&format!("registration refused: {reason}"));
        }
    }
}

/// How a [`ReverseAgent`] retries after its connection ends or cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// The first delay (doubling after each failure, with jitter).
    pub min_delay: Duration,
    /// The largest delay.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { min_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10) }
    }
}

/// Settings of an agent that dials the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReverseAgentConfig {
    /// The proxy's listener: `unix:/path` or `unix:@abstract`.
    pub proxy: String,
    /// This agent's id.
    pub agent_id: String,
    /// This instance's id, stable across reconnects.
    pub replica_id: String,
    /// The token the proxy expects.
    pub token: Option<String>,
    /// Largest frame read or written.
    pub max_frame: usize,
    /// Time the proxy has to answer the registration.
    pub register_timeout: Duration,
    /// Checked with `SO_PEERCRED` after connecting: who the proxy must be.
    pub peer: Option<PeerCredentials>,
    /// Back-off between attempts.
    pub reconnect: Reconnect,
    /// Limits of the connection once registered, as for a [`UdsServer`]'s connections: the
    /// proxy is held to them like any peer (see [`SessionLimits`] for the defaults).
    pub session: SessionLimits,
}

impl ReverseAgentConfig {
    /// Settings to register as `agent_id`/`replica_id` at `proxy`, with defaults otherwise.
    pub fn new(proxy: impl Into<String>, agent_id: impl Into<String>, replica_id: impl Into<String>) -> Self {
        Self {
            proxy: proxy.into(),
            agent_id: agent_id.into(),
            replica_id: replica_id.into(),
            token: None,
            max_frame: DEFAULT_MAX_FRAME,
            register_timeout: Duration::from_secs(5),
            peer: None,
            reconnect: Reconnect::default(),
            session: SessionLimits::default(),
        }
    }

    /// Sets the token.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// Why a [`ReverseAgent`] stopped for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReverseError {
    /// The proxy address is not a `unix:` socket address.
    #[error(transparent)]
    InvalidEndpoint(TransportError),
    /// The proxy refused the registration; retrying would not change that.
    #[error("the proxy at {proxy} refused agent {agent_id}: {message}")]
    Refused {
        /// The proxy's address.
        proxy: String,
        /// This agent's id.
        agent_id: String,
        /// The proxy's reason.
        message: String,
    },
    /// A setting is out of range; nothing was dialled.
    #[error("invalid configuration: {field} {problem}")]
    InvalidConfig {
        /// The setting, as named in [`ReverseAgentConfig`] (e.g. `session.write_timeout`).
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// An agent that dials the proxy instead of listening.
#[derive(Debug)]
pub struct ReverseAgent {
    config: ReverseAgentConfig,
    handle: ServerHandle,
}

/// How one attempt ended.
enum Attempt {
    /// Registered and served until the connection ended.
    Served,
    /// Could not connect or register; worth retrying.
    Failed(String),
}

impl ReverseAgent {
    /// An agent with these settings (nothing is dialled until [`run`](Self::run)).
    pub fn new(config: ReverseAgentConfig) -> Self {
        Self { config, handle: ServerHandle::default() }
    }

    /// A handle for agent-initiated messages (health, flow control, metrics, config updates).
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Dials, registers and serves `handler` until `shutdown` resolves, dialling again after
    /// every disconnection or failed attempt. Returns `Ok` at shutdown, the reason the proxy
    /// refused it, or, before dialling anything, the setting that is out of range.
    pub async fn run<H: AgentHandler>(
        self,
        handler: H,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ReverseError> {
        if let Some(field) = self.config.session.zero_field() {
            return Err(ReverseError::InvalidConfig { field, problem: "must not be zero" });
        }
        let path = SocketPath::parse(&Endpoint::new(self.config.proxy.as_str()))
            .map_err(ReverseError::InvalidEndpoint)?;
        let handler = Arc::new(handler);
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.config.reconnect.min_delay)
            .with_max_delay(self.config.reconnect.max_delay)
            .with_jitter()
            .without_max_times();
        let mut delays = builder.build();
        tokio::pin!(shutdown);
        loop {
            let attempt = tokio::select! {
                () = &mut shutdown => return Ok(()),
                attempt = self.attempt(&path, &handler) => attempt?,
            };
            match attempt {
                Attempt::Served => {
                    tracing::info!(proxy = %self.config.proxy, "connection to the proxy ended; dialling again");
                    delays = builder.build();
                }
                Attempt::Failed(message) => {
                    tracing::warn!(proxy = %self.config.proxy, message, "could not register with the proxy");
                }
            }
            let delay = delays.next().unwrap_or(self.config.reconnect.max_delay);
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn attempt<H: AgentHandler>(
        &self,
        path: &SocketPath,
        handler: &Arc<H>,
    ) -> Result<Attempt, ReverseError> {
        let config = &self.config;
        let stream = match path.connect().await {
            Ok(s) => s,
            Err(e) => return Ok(Attempt::Failed(format!("connect: {e}"))),
        };
        if let Some(expected) = config.peer
            && let Err(e) = check_peer(&stream, expected, &config.proxy)
        {
            return Ok(Attempt::Failed(e.to_string()));
        }
        let mut framed: AgentFramed = Framed::new(stream, FrameCodec::new(config.max_frame));
        let mut capabilities = handler.capabilities();
        capabilities.protocol_version = PROTOCOL_VERSION;
        let limit = concurrency_limit(&mut capabilities, &config.session);
        let register = proto::Register {
            agent_id: config.agent_id.clone(),
            replica_id: config.replica_id.clone(),
            token: config.token.clone(),
            capabilities: Some(capabilities.into()),
        };
        let frame = proto::AgentFrame { stream_id: 0, body: Some(agent_frame::Body::Register(register)) };
        if let Err(e) = framed.send(frame).await {
            return Ok(Attempt::Failed(format!("sending the registration: {e}")));
        }
        let result = match tokio::time::timeout(config.register_timeout, framed.next()).await {
            Ok(Some(Ok(Inbound::Frame(proto::ProxyFrame {
                body: Some(proxy_frame::Body::RegisterResult(r)),
                ..
            })))) => r,
            Ok(Some(Ok(_))) => return Ok(Attempt::Failed("expected the registration's answer".into())),
            Ok(Some(Err(FrameError::TooLarge { limit, .. }))) => {
                return Ok(Attempt::Failed(format!("the proxy sent a frame over the {limit}-byte limit")));
            }
            Ok(Some(Err(e))) => return Ok(Attempt::Failed(format!("reading the answer: {e}"))),
            Ok(None) => return Ok(Attempt::Failed("the proxy closed the connection".into())),
            Err(_) => {
                return Ok(Attempt::Failed(format!(
                    "no answer to the registration within {:?}",
                    config.register_timeout
                )));
            }
        };
        if !result.accepted {
            return Err(ReverseError::Refused {
                proxy: config.proxy.clone(),
                agent_id: config.agent_id.clone(),
                message: result.error.unwrap_or_else(|| "no reason given".into()),
            });
        }
        tracing::info!(proxy = %config.proxy, proxy_id = %result.proxy_id, "registered with the proxy");
        run_session(framed, handler.clone(), limit, config.session, self.handle.clone()).await;
        Ok(Attempt::Served)
    }
}
