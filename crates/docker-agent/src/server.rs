//! The agent server: mutual TLS in front of the local Docker socket, with an allow-list.
//!
//! [`AgentServer::bind`] listens on TCP, and for every connection:
//!
//! 0. refuses it at once, before any TLS work, when [`AgentLimits::max_connections`] or
//!    [`AgentLimits::max_connections_per_ip`] is reached (see [`AgentLimits`] for every limit
//!    and time-out);
//! 1. completes a TLS 1.2/1.3 handshake, within [`AgentLimits::handshake_timeout`], that
//!    **requires** a client certificate signed directly by the configured CA, with the
//!    `clientAuth` usage and not revoked (a client without one, or with one from another CA,
//!    never gets to send a request; there is no setting to turn this off). A certificate
//!    revoked later ([`RunningDockerAgent::set_revoked`]) is refused on its next request;
//! 2. serves HTTP/1.1 with keep-alive;
//! 3. answers `GET /agent/info` and `GET /agent/health` itself (any client with a valid
//!    certificate; the Docker ACL does not apply to them);
//! 4. checks every other request against the [ACL](crate::acl). A denied request gets
//!    `403 {"message":"docker-agent: <METHOD> <path> denied: <reason>"}` (the `docker` CLI prints
//!    the message) and a `warn` log line with the peer address and the client certificate's
//!    common name;
//! 5. forwards allowed requests to the Docker engine over its Unix socket through a pooled
//!    client, with `Host: docker`, hop-by-hop headers removed, both bodies streamed as they come
//!    (the event stream and chunked replies reach the client frame by frame; request bodies are
//!    not buffered either).
//!
//! **Upgrades.** A request with `Connection: Upgrade` (the `docker` CLI's attach and exec start,
//! `Upgrade: tcp`) is checked by the ACL like any other; the built-in profiles deny all of them.
//! If a custom rule allows one, the upgrade is carried out end to end: the engine's
//! `101 Switching Protocols` is passed back and the two upgraded connections are spliced
//! together until either side closes.
//!
//! **Shutdown** ([`RunningDockerAgent::shutdown`]): the listener closes at once; idle keep-alive
//! connections are closed; responses still streaming (those without a `Content-Length`, such as
//! `/events`, followed logs or stats) and upgraded connections are cut at once; requests still
//! waiting for the engine's answer (a `stop` waiting for the container, for example) and sized
//! bodies get up to [`AgentConfig::shutdown_grace`] to finish, after which every remaining
//! connection is closed.
//!
//! **Metrics** (through the `metrics` facade): the counter `docker_agent_requests_total` with
//! the label `outcome` = `allowed`, `denied`, `agent` (the agent's own endpoints),
//! `engine_error` (the engine could not be reached), `client_error` (the client broke off or
//! stalled its request body: not the engine's fault) or `limited`
//! ([`AgentLimits::max_requests_per_client`]); the counter
//! `docker_agent_connections_refused_total` with `reason` = `global` or `per_ip`; and the
//! counter `docker_agent_tls_handshake_failures_total`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use crate::acl::{
    Acl, AclDecision, BodyPolicy, DenyReason, RequestHead, Rule, normalise, redact_env, scale_spec,
};
use crate::config::{AgentConfig, AgentLimits, ConfigError};
use crate::limits::{KeyedGuard, KeyedLimit, Limit};
use crate::revocation::{Fingerprint, RevocationList, fingerprint};

/// How long a refused client's leftover bytes are read before its connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Closes a connection whose handshake failed so that the client learns why. rustls has already
/// written its alert; but with TLS 1.3 a client sends its first request before the server has
/// checked its certificate, and closing a socket with unread bytes makes the kernel send a
/// reset, which can overtake the alert. So: stop writing, read and drop what the client sent
/// until it closes too (or a short time passes), then close.
async fn close_politely(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// How long the agent's own engine calls (`/_ping`, `/version`) may take.
const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest service spec a scale request may send.
const SCALE_BODY_LIMIT: usize = 1 << 20;
/// The largest answer the agent reads whole (to redact it, or for its own calls).
const REDACTED_BODY_LIMIT: usize = 64 << 20;
/// Idle connections kept to the engine.
const ENGINE_MAX_IDLE: usize = 32;
/// The `Host` header sent to the engine.
const ENGINE_HOST: &str = "docker";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type of the agent.
type AgentBody = UnsyncBoxBody<Bytes, BoxError>;
/// Request body type towards the engine.
type EngineBody = UnsyncBoxBody<Bytes, BoxError>;

/// Errors from starting the agent server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Starts agent servers; see the [module docs](self).
#[derive(Debug)]
pub struct AgentServer;

/// A running agent server. Dropping it stops the listener; call [`Self::shutdown`] for a
/// graceful stop.
#[derive(Debug)]
pub struct RunningDockerAgent {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    revoked: Arc<ArcSwap<RevocationList>>,
    connections: Arc<Limit>,
}

impl RunningDockerAgent {
    /// The address the server listens on (with the real port when the configuration said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the list of refused client certificates. New handshakes with a listed
    /// certificate fail; requests on connections already open with one are answered `403` and
    /// their connection is closed.
    pub fn set_revoked(&self, revoked: RevocationList) {
        info!(revoked = revoked.len(), "revocation list replaced");
        self.revoked.store(Arc::new(revoked));
    }

    /// Client connections open now (handshakes in progress included).
    pub fn open_connections(&self) -> usize {
        self.connections.current()
    }

    /// Stops the server gracefully (see the [module docs](self)) and waits until it has stopped.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "agent server task ended abnormally");
        }
    }
}

impl Drop for RunningDockerAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct State {
    name: String,
    acl: Acl,
    docker: Client<UnixConnector, EngineBody>,
    cert_not_after: SystemTime,
    expiry_warning: Duration,
    /// Cancelled when shutdown starts: connections finish their request in flight and close,
    /// streaming responses and upgraded connections are cut.
    stopping: CancellationToken,
    limits: AgentLimits,
    revoked: Arc<ArcSwap<RevocationList>>,
    connections: Arc<Limit>,
    per_ip: Arc<KeyedLimit<IpAddr>>,
    per_client: Arc<KeyedLimit<Fingerprint>>,
}

struct Peer {
    addr: SocketAddr,
    common_name: String,
    fingerprint: Fingerprint,
}

impl AgentServer {
    /// Validates `config`, binds the listener and starts serving in the background.
    pub async fn bind(config: AgentConfig) -> Result<RunningDockerAgent, ServerError> {
        let revoked = Arc::new(ArcSwap::from_pointee(config.revoked.clone()));
        let tls = config.validated_tls(revoked.clone())?;
        let cert_not_after = crate::certs::not_after(&config.tls.cert_pem)
            .map_err(|e| ConfigError::Invalid { field: "tls.cert", reason: e.to_string() })?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        // Without a timer hyper-util ignores the idle time-out and idle engine connections stay
        // open for ever.
        let docker = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.limits.engine_idle_timeout)
            .pool_max_idle_per_host(ENGINE_MAX_IDLE)
            .build(UnixConnector { path: Arc::from(config.docker_socket.as_path()) });
        let state = Arc::new(State {
            name: config.name.clone(),
            acl: Acl::new(&config.acl),
            docker,
            cert_not_after,
            expiry_warning: config.expiry_warning,
            stopping: CancellationToken::new(),
            limits: config.limits,
            revoked: revoked.clone(),
            connections: Limit::new(config.limits.max_connections),
            per_ip: KeyedLimit::new(config.limits.max_connections_per_ip),
            per_client: KeyedLimit::new(config.limits.max_requests_per_client),
        });
        let cert = CertificateStatus::of(&state, SystemTime::now());
        if cert.expires_in_secs <= 0 {
            warn!(not_after = cert.not_after, "the agent's server certificate has expired");
        } else if cert.expiring {
            warn!(expires_in_secs = cert.expires_in_secs, "the agent's server certificate expires soon");
        }
        info!(
            name = %config.name,
            addr = %local_addr,
            socket = %config.docker_socket.display(),
            profile = %config.acl.profile,
            custom_rules = config.acl.rules.len(),
            "docker-agent listening"
        );
        let stop = CancellationToken::new();
        let connections = state.connections.clone();
        let task =
            tokio::spawn(serve(listener, TlsAcceptor::from(tls), state, stop.clone(), config.shutdown_grace));
        Ok(RunningDockerAgent { local_addr, stop, task: Some(task), revoked, connections })
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Over a limit: closed at once, before any TLS work, so a flood costs one accept.
                let Some(global) = state.connections.try_acquire() else {
                    metrics::counter!("docker_agent_connections_refused_total", "reason" => "global").increment(1);
                    debug!(peer = %addr, "connection refused: limits.max_connections reached");
                    continue;
                };
                let Some(per_ip) = state.per_ip.try_acquire(addr.ip()) else {
                    metrics::counter!("docker_agent_connections_refused_total", "reason" => "per_ip").increment(1);
                    debug!(peer = %addr, "connection refused: limits.max_connections_per_ip reached");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let state = state.clone();
                connections.spawn(async move {
                    let _held = (global, per_ip);
                    let handshake =
                        tokio::time::timeout(state.limits.handshake_timeout, acceptor.accept(tcp).into_fallible());
                    let handshake = tokio::select! {
                        handshake = handshake => handshake,
                        // Shutting down: a connection still in its handshake has no request yet.
                        () = state.stopping.cancelled() => return,
                    };
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err((e, tcp))) => {
                            metrics::counter!("docker_agent_tls_handshake_failures_total").increment(1);
                            info!(peer = %addr, error = %e, "TLS handshake failed");
                            close_politely(tcp).await;
                            return;
                        }
                        Err(_) => {
                            metrics::counter!("docker_agent_tls_handshake_failures_total").increment(1);
                            info!(peer = %addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first());
                    let common_name =
                        leaf.and_then(|cert| crate::certs::common_name_der(cert)).unwrap_or_default();
                    // The verifier required a certificate; an empty one never matches a real one.
                    let fingerprint = leaf.map_or([0; 32], |cert| fingerprint(cert));
                    debug!(peer = %addr, client = %common_name, "client connected");
                    let peer = Arc::new(Peer { addr, common_name, fingerprint });
                    let stopping = state.stopping.clone();
                    let header_read_timeout = state.limits.header_read_timeout;
                    let service = service_fn(move |req| handle(state.clone(), peer.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_read_timeout)
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades();
                    let mut conn = std::pin::pin!(conn);
                    let result = tokio::select! {
                        result = conn.as_mut() => result,
                        () = stopping.cancelled() => {
                            // Finish the request in flight (if any), then close.
                            conn.as_mut().graceful_shutdown();
                            conn.as_mut().await
                        }
                    };
                    if let Err(e) = result {
                        debug!(peer = %addr, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    state.stopping.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        info!(grace = ?grace, "shutdown grace period over; closing the remaining connections");
    }
    connections.shutdown().await;
    info!("docker-agent stopped");
}

async fn handle(
    state: Arc<State>,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Response<AgentBody>, Infallible> {
    if state.revoked.load().contains(&peer.fingerprint) {
        metrics::counter!("docker_agent_requests_total", "outcome" => "denied").increment(1);
        warn!(peer = %peer.addr, client = %peer.common_name, "request on a connection whose certificate was revoked");
        let mut resp = json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "message": "docker-agent: the client certificate has been revoked" }),
        );
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    let path = req.uri().path();
    if path == "/agent/info" || path == "/agent/health" {
        metrics::counter!("docker_agent_requests_total", "outcome" => "agent").increment(1);
        if req.method() != Method::GET {
            return Ok(json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({ "message": format!("docker-agent: {} {path}: only GET", req.method()) }),
            ));
        }
        return Ok(if path == "/agent/info" { agent_info(&state).await } else { agent_health(&state).await });
    }
    let Some(permit) = state.per_client.try_acquire(peer.fingerprint) else {
        metrics::counter!("docker_agent_requests_total", "outcome" => "limited").increment(1);
        warn!(peer = %peer.addr, client = %peer.common_name, "request refused: limits.max_requests_per_client reached");
        let message = format!(
            "docker-agent: this client certificate already has {} requests in flight (limits.max_requests_per_client)",
            state.limits.max_requests_per_client
        );
        return Ok(json(StatusCode::TOO_MANY_REQUESTS, &serde_json::json!({ "message": message })));
    };
    let resp = route(&state, &peer, req).await;
    // The permit lives as long as the answer's body: a held event stream counts until it ends.
    Ok(resp.map(|body| Held { inner: body, _permit: permit }.boxed_unsync()))
}

/// A response body holding a per-client permit until it is dropped.
struct Held<B> {
    inner: B,
    _permit: KeyedGuard<Fingerprint>,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An admitted request: the ACL, then the rule's body policy.
async fn route(state: &State, peer: &Peer, req: Request<Incoming>) -> Response<AgentBody> {
    let path = req.uri().path();
    let rule = match state.acl.check_request(RequestHead::of(&req)) {
        AclDecision::Deny { reason } => return denied(peer, req.method(), path, &reason),
        AclDecision::Allow { rule } => rule,
    };
    let redact = state.acl.redacts(req.method(), path);
    match rule.body() {
        BodyPolicy::Any => {
            let aborted = Arc::new(AtomicBool::new(false));
            let timeout = state.limits.body_read_timeout;
            let req = req.map(|body| WatchedBody::new(body, timeout, aborted.clone()).boxed_unsync());
            allowed(peer, &req, &rule);
            forward(state, req, redact, Some(&aborted)).await
        }
        BodyPolicy::Empty => {
            let (parts, body) = req.into_parts();
            match read_body(body, 0, state.limits.body_read_timeout).await {
                Ok(_) => {
                    let req = Request::from_parts(parts, empty_body());
                    allowed(peer, &req, &rule);
                    forward(state, req, redact, None).await
                }
                Err(BodyError::TooLarge) => denied(
                    peer,
                    &parts.method,
                    parts.uri.path(),
                    &DenyReason::Body { rule: rule.to_string() },
                ),
                Err(e) => client_error(peer, &parts.method, parts.uri.path(), &e),
            }
        }
        BodyPolicy::ServiceScale => scale(state, peer, req, &rule).await,
    }
}

/// Logs and counts a denied request and answers `403` with the reason.
fn denied(peer: &Peer, method: &Method, path: &str, reason: &DenyReason) -> Response<AgentBody> {
    metrics::counter!("docker_agent_requests_total", "outcome" => "denied").increment(1);
    warn!(
        peer = %peer.addr,
        client = %peer.common_name,
        method = %method,
        path = %path,
        reason = %reason,
        "request denied"
    );
    let message = format!("docker-agent: {method} {path} denied: {reason}");
    json(StatusCode::FORBIDDEN, &serde_json::json!({ "message": message }))
}

fn allowed<B>(peer: &Peer, req: &Request<B>, rule: &Rule) {
    metrics::counter!("docker_agent_requests_total", "outcome" => "allowed").increment(1);
    debug!(peer = %peer.addr, method = %req.method(), path = %req.uri().path(), rule = %rule, "request allowed");
}

/// A request whose body the client did not deliver (aborted, too slow): the client's fault,
/// not the engine's.
fn client_error(peer: &Peer, method: &Method, path: &str, error: &BodyError) -> Response<AgentBody> {
    metrics::counter!("docker_agent_requests_total", "outcome" => "client_error").increment(1);
    info!(peer = %peer.addr, client = %peer.common_name, method = %method, path = %path, error = %error, "request body not received");
    let status = match error {
        BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
        BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        BodyError::Aborted(_) => StatusCode::BAD_REQUEST,
    };
    json(status, &serde_json::json!({ "message": format!("docker-agent: {method} {path}: {error}") }))
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body is larger than allowed")]
    TooLarge,
    #[error("the request body stalled for longer than {0:?} (limits.body_read_timeout)")]
    TimedOut(Duration),
    #[error("the request body was aborted: {0}")]
    Aborted(hyper::Error),
}

/// Reads a request body of at most `limit` bytes, each part within `pause` of the last.
async fn read_body(mut body: Incoming, limit: usize, pause: Duration) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame =
            tokio::time::timeout(pause, body.frame()).await.map_err(|_| BodyError::TimedOut(pause))?;
        let Some(frame) = frame else { return Ok(buf.freeze()) };
        if let Ok(data) = frame.map_err(BodyError::Aborted)?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
}

fn empty_body() -> EngineBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// `POST /services/{id}/update` under [`BodyPolicy::ServiceScale`]: the current spec with the
/// client's replica count, or a denial naming what else the body would change.
async fn scale(state: &State, peer: &Peer, req: Request<Incoming>, rule: &Rule) -> Response<AgentBody> {
    let (parts, body) = req.into_parts();
    let (method, path) = (&parts.method, parts.uri.path());
    let not_a_scale = |detail: String| denied(peer, method, path, &DenyReason::NotAScale { detail });
    let body = match read_body(body, SCALE_BODY_LIMIT, state.limits.body_read_timeout).await {
        Ok(body) => body,
        Err(e) => return client_error(peer, method, path, &e),
    };
    let requested: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return not_a_scale(format!("the body is not JSON: {e}")),
    };
    let normalised = match normalise(path) {
        Ok(p) => p,
        Err(reason) => return denied(peer, method, path, &reason),
    };
    // The rule's pattern decides where the service id is: the `{…}` segment.
    let Some(id) = rule_param(rule, &normalised.segments) else {
        return not_a_scale(format!("rule `{}` names no service", rule.pattern()));
    };
    let version = normalised.version.as_ref().map_or(String::new(), |v| format!("/v{v}"));
    let inspect_path = format!("{version}/services/{}", utf8_percent_encode(id, NON_ALPHANUMERIC));
    let (status, inspect) = match engine_call(state, Method::GET, &inspect_path, Bytes::new()).await {
        Ok(answer) => answer,
        Err(e) => return engine_error(&e),
    };
    if !status.is_success() {
        // Not found, or the engine refused: pass its answer on.
        return raw_json(status, inspect);
    }
    let current = match serde_json::from_slice::<serde_json::Value>(&inspect) {
        Ok(mut v) => v.get_mut("Spec").map(serde_json::Value::take).unwrap_or_default(),
        Err(e) => return engine_error(&format!("GET {inspect_path} answered invalid JSON: {e}")),
    };
    let spec = match scale_spec(&requested, &current) {
        Ok(spec) => spec,
        Err(reason) => return denied(peer, method, path, &reason),
    };
    let body = Bytes::from(spec.to_string());
    let mut parts = parts;
    parts.headers.remove("x-registry-auth");
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let req = Request::from_parts(parts, Full::new(body).map_err(|never| match never {}).boxed_unsync());
    allowed(peer, &req, rule);
    forward(state, req, false, None).await
}

/// The request segment under the rule's (first) `{param}`.
fn rule_param<'a>(rule: &Rule, segments: &'a [String]) -> Option<&'a str> {
    let pattern = rule.pattern().split_once(' ')?.1;
    pattern
        .trim_start_matches('/')
        .split('/')
        .zip(segments)
        .find(|(p, _)| p.starts_with('{'))
        .map(|(_, s)| s.as_str())
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<AgentBody> {
    let body = Full::new(Bytes::from(value.to_string())).map_err(|never| match never {}).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn engine_error(error: &dyn std::fmt::Display) -> Response<AgentBody> {
    metrics::counter!("docker_agent_requests_total", "outcome" => "engine_error").increment(1);
    json(
        StatusCode::BAD_GATEWAY,
        &serde_json::json!({ "message": format!("docker-agent: the Docker engine cannot be reached: {error}") }),
    )
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade = headers.remove(header::UPGRADE);
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    if keep_upgrade && let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

async fn forward(
    state: &State,
    mut req: Request<EngineBody>,
    redact: bool,
    client_body_aborted: Option<&AtomicBool>,
) -> Response<AgentBody> {
    let upgrade = wants_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri =
        match Uri::builder().scheme("http").authority(ENGINE_HOST).path_and_query(path_and_query).build() {
            Ok(uri) => uri,
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "message": format!("docker-agent: {e}") }),
                );
            }
        };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.insert(header::HOST, HeaderValue::from_static(ENGINE_HOST));
    if redact {
        // The answer is rewritten: it must arrive as plain JSON.
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    let engine_req = Request::from_parts(parts, body);
    let mut resp = match state.docker.request(engine_req).await {
        Ok(resp) => resp,
        Err(e) if client_body_aborted.is_some_and(|a| a.load(Ordering::Acquire)) => {
            metrics::counter!("docker_agent_requests_total", "outcome" => "client_error").increment(1);
            info!(error = %ErrorChain(&e), "the client's request body broke off or stalled");
            let message = format!("docker-agent: the request body did not arrive: {}", ErrorChain(&e));
            return json(StatusCode::BAD_REQUEST, &serde_json::json!({ "message": message }));
        }
        Err(e) => {
            warn!(error = %ErrorChain(&e), "cannot reach the Docker engine");
            return engine_error(&ErrorChain(&e));
        }
    };
    if let Some(client_side) = client_side
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let engine_side = hyper::upgrade::on(&mut resp);
        let cut = state.stopping.clone();
        tokio::spawn(async move {
            let (client, engine) = match tokio::try_join!(client_side, engine_side) {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut engine = TokioIo::new(engine);
            tokio::select! {
                () = cut.cancelled() => {}
                res = tokio::io::copy_bidirectional(&mut client, &mut engine) => {
                    if let Err(e) = res {
                        debug!(error = %e, "upgraded connection ended with an error");
                    }
                }
            }
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed_unsync());
    }
    if redact {
        return redacted(resp).await;
    }
    let streaming = !resp.headers().contains_key(header::CONTENT_LENGTH);
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let body = if streaming {
        CutOnShutdown { inner: body, cut: Box::pin(state.stopping.clone().cancelled_owned()) }.boxed_unsync()
    } else {
        body.map_err(BoxError::from).boxed_unsync()
    };
    Response::from_parts(parts, body)
}

/// The engine's JSON answer with every environment value replaced (see
/// [`crate::acl::redact_env`]).
async fn redacted(resp: Response<Incoming>) -> Response<AgentBody> {
    let (mut parts, body) = resp.into_parts();
    let body = match Limited::new(body, REDACTED_BODY_LIMIT).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return engine_error(&format!("cannot read the answer to redact it: {e}")),
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut value) => {
            if redact_env(&mut value) == 0 {
                body
            } else {
                Bytes::from(value.to_string())
            }
        }
        // Not JSON (an empty `304`, say): nothing to redact in it.
        Err(_) if !parts.status.is_success() || body.is_empty() => body,
        Err(e) => return engine_error(&format!("the answer is not JSON and cannot be redacted: {e}")),
    };
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, Full::new(body).map_err(|never| match never {}).boxed_unsync())
}

/// A client's request body on its way to the engine. It ends with an error when the client
/// pauses longer than `limits.body_read_timeout`, and remembers whether the client broke it off
/// (or stalled), so a failed engine call is not blamed on the engine.
struct WatchedBody {
    inner: Incoming,
    pause: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    aborted: Arc<AtomicBool>,
}

impl WatchedBody {
    fn new(inner: Incoming, pause: Duration, aborted: Arc<AtomicBool>) -> Self {
        Self { inner, pause, deadline: Box::pin(tokio::time::sleep(pause)), aborted }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.pause;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.aborted.store(true, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.aborted.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(BodyError::TimedOut(self.pause).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One call to the engine by the agent itself; the status and the whole body.
async fn engine_call(
    state: &State,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{ENGINE_HOST}{path}"))
        .header(header::HOST, ENGINE_HOST)
        .body(Full::new(body).map_err(|never| match never {}).boxed_unsync())
        .map_err(|e| e.to_string())?;
    let call = async {
        let resp = state.docker.request(req).await.map_err(|e| ErrorChain(&e).to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), REDACTED_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(ENGINE_CALL_TIMEOUT, call)
        .await
        .map_err(|_| format!("{path} took longer than {ENGINE_CALL_TIMEOUT:?}"))?
}

fn raw_json(status: StatusCode, body: Bytes) -> Response<AgentBody> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A streaming response body that ends with an error (closing the connection) once shutdown
/// starts.
struct CutOnShutdown {
    inner: Incoming,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

#[derive(Debug, thiserror::Error)]
#[error("docker-agent is shutting down")]
struct ShuttingDown;

impl Body for CutOnShutdown {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(ShuttingDown))));
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Shows an error with its sources (hyper-util's client error alone says little).
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Calls the engine for the agent's own endpoints; returns the body as JSON.
async fn engine_get(state: &State, path: &str) -> Result<Bytes, String> {
    let (status, body) = engine_call(state, Method::GET, path, Bytes::new()).await?;
    if !status.is_success() {
        return Err(format!("GET {path} answered {status}: {}", String::from_utf8_lossy(&body).trim()));
    }
    Ok(body)
}

async fn agent_info(state: &State) -> Response<AgentBody> {
    let body = match engine_get(state, "/version").await {
        Ok(body) => body,
        Err(e) => return engine_error(&e),
    };
    let version: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return engine_error(&format!("GET /version answered invalid JSON: {e}")),
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": state.name,
            "version": env!("CARGO_PKG_VERSION"),
            "engine_version": version.get("Version"),
            "api_version": version.get("ApiVersion"),
            "runtime": "docker",
        }),
    )
}

struct CertificateStatus {
    not_after: i64,
    expires_in_secs: i64,
    expiring: bool,
}

impl CertificateStatus {
    fn of(state: &State, now: SystemTime) -> Self {
        let not_after = unix_secs(state.cert_not_after);
        let expires_in_secs = not_after - unix_secs(now);
        let window = i64::try_from(state.expiry_warning.as_secs()).unwrap_or(i64::MAX);
        Self { not_after, expires_in_secs, expiring: expires_in_secs <= window }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// unhealthy (503) when the engine is unreachable or the certificate has expired; degraded (200)
/// when it expires within the warning window; healthy (200) otherwise.
fn health_status(engine_reachable: bool, cert: &CertificateStatus) -> (&'static str, StatusCode) {
    if !engine_reachable || cert.expires_in_secs <= 0 {
        ("unhealthy", StatusCode::SERVICE_UNAVAILABLE)
    } else if cert.expiring {
        ("degraded", StatusCode::OK)
    } else {
        ("healthy", StatusCode::OK)
    }
}

async fn agent_health(state: &State) -> Response<AgentBody> {
    let engine = engine_get(state, "/_ping").await;
    let cert = CertificateStatus::of(state, SystemTime::now());
    let (status, code) = health_status(engine.is_ok(), &cert);
    json(
        code,
        &serde_json::json!({
            "status": status,
            "engine": { "reachable": engine.is_ok(), "error": engine.err() },
            "certificate": {
                "not_after": cert.not_after,
                "expires_in_secs": cert.expires_in_secs,
                "expiring": cert.expiring,
            },
        }),
    )
}

/// Opens a new connection to the engine's Unix socket for the pooled client.
#[derive(Clone)]
struct UnixConnector {
    path: Arc<Path>,
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = UnixIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UnixIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.path.clone();
        Box::pin(async move {
            let stream = UnixStream::connect(&*path)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", PathBuf::from(&*path).display())))?;
            Ok(UnixIo(TokioIo::new(stream)))
        })
    }
}

/// A Unix socket connection as hyper I/O.
struct UnixIo(TokioIo<UnixStream>);

impl Connection for UnixIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UnixIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UnixIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private, Upgrade"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1);
        assert!(plain.contains_key(header::CONTENT_TYPE));
        let mut up = h;
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "tcp");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "Upgrade");
        assert!(!up.contains_key("x-private"));
    }

    #[test]
    fn upgrade_detection_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        assert!(!wants_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(wants_upgrade(&h));
        h.remove(header::UPGRADE);
        assert!(!wants_upgrade(&h));
    }

    #[test]
    fn health_status_rules() {
        let cert = |expires_in_secs, expiring| CertificateStatus { not_after: 0, expires_in_secs, expiring };
        assert_eq!(health_status(true, &cert(100, false)), ("healthy", StatusCode::OK));
        assert_eq!(health_status(true, &cert(100, true)), ("degraded", StatusCode::OK));
        assert_eq!(health_status(false, &cert(100, false)), ("unhealthy", StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(health_status(true, &cert(0, true)), ("unhealthy", StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(health_status(true, &cert(-5, true)), ("unhealthy", StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn unix_secs_handles_both_sides_of_the_epoch() {
        assert_eq!(unix_secs(SystemTime::UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(SystemTime::UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}
