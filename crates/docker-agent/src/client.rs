//! The controller's side of the agent connection: one pooled mutual-TLS HTTP client per agent,
//! a bollard [`Docker`] on top of it, and typed calls to the agent's own endpoints.
//!
//! An [`AgentClient`] holds one `hyper_util` legacy client (connection pool, HTTP/1.1 only, TCP
//! no-delay) behind a `hyper-rustls` connector whose rustls configuration
//!
//! - trusts **only** the CA given in [`AgentTls`] (never the operating system's roots),
//! - presents the client certificate and key from [`AgentTls`],
//! - speaks HTTPS only, HTTP/1.1 (no ALPN offered), with the ring crypto provider,
//! - checks the server certificate against the fixed name
//!   [`AGENT_SERVER_NAME`], whatever address it dials,
//!
//! and every request it sends goes to the agent's `host:port`, whatever authority its URI
//! names. [`AgentClient::docker`] wraps the same pooled client in a bollard [`Docker`] through
//! `Docker::connect_with_custom_transport`: all the Docker handles of one agent share its
//! connections, so a Docker call after the first costs one request on a warm TLS connection
//! instead of a TCP and TLS handshake (bollard's own `connect_with_ssl` opens a new connection
//! per request). Cloning an `AgentClient` is cheap and shares the pool.
//!
//! [`AgentClient::set_tls`] replaces the material of a running client (a renewed certificate):
//! requests from then on, through every handle already made, dial new connections with it,
//! while requests already under way finish on their connections, which then close.
//!
//! [`AgentClient::info`] and [`AgentClient::health`] call the agent's `GET /agent/info` and
//! `GET /agent/health`. [`connect_local`] gives a bollard [`Docker`] for the hosts that need no
//! agent: a Unix socket, plain TCP, or an engine's own TLS port.
//!
//! ```no_run
//! use docker_agent::client::{AgentClient, AgentTls};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = AgentTls::from_dir("/etc/agentpool/agents/node-1")?;
//! let agent = AgentClient::new("10.0.0.7:8890", &tls)?;
//! println!("{:?}", agent.health().await?.status);
//! let docker = agent.docker();
//! println!("engine {:?}", docker.version().await?.version);
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bollard::{API_DEFAULT_VERSION, BollardRequest, Docker};
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::AGENT_SERVER_NAME;
use crate::host::DockerHost;

/// How long `AgentClient::refusal` waits for an agent's answer or alert after a handshake (it
/// ends as soon as either arrives).
const REFUSAL_WAIT: Duration = Duration::from_secs(10);

/// How long dialling an agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call to `/agent/info` or `/agent/health` may take, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The time-out bollard applies to Docker calls through [`AgentClient::docker`], by default
/// (until the response headers; streams such as events are not cut).
pub const DEFAULT_DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections are kept per agent.
pub const POOL_MAX_IDLE: usize = 32;
/// Largest response body [`AgentClient::info`] and [`AgentClient::health`] read.
const MAX_AGENT_BODY: usize = 64 * 1024;

/// The request body bollard sends (its own alias is crate-private): a full buffer or a stream.
pub type AgentRequestBody = http_body_util::Either<
    http_body_util::Full<Bytes>,
    http_body_util::StreamBody<
        std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> + Send>,
        >,
    >,
>;

type HttpClient = Client<HttpsConnector<HttpConnector>, AgentRequestBody>;

/// The controller's TLS material for one agent, in memory (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct AgentTls {
    /// The CA that signed the agent's server certificate: the only root trusted.
    pub ca_cert_pem: String,
    /// The controller's client certificate (chain), presented to the agent.
    pub client_cert_pem: String,
    /// The client certificate's private key.
    pub client_key_pem: String,
}

impl fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentTls")
            .field("ca_cert_pem", &format_args!("{} bytes", self.ca_cert_pem.len()))
            .field("client_cert_pem", &format_args!("{} bytes", self.client_cert_pem.len()))
            .field("client_key_pem", &"<redacted>")
            .finish()
    }
}

impl AgentTls {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir` (the layout of the Docker CLI's
    /// `DOCKER_CERT_PATH`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, ClientError> {
        let dir = dir.as_ref();
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| ClientError::ReadTls { path, source })
        };
        Ok(Self {
            ca_cert_pem: read("ca.pem")?,
            client_cert_pem: read("cert.pem")?,
            client_key_pem: read("key.pem")?,
        })
    }

    /// The rustls client configuration described in the [module docs](self).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let mut roots = RootCertStore::empty();
        let mut cas = 0;
        for cert in CertificateDer::pem_slice_iter(self.ca_cert_pem.as_bytes()) {
            let cert =
                cert.map_err(|e| ClientError::Pem { what: "CA certificate", message: e.to_string() })?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Pem { what: "CA certificate", message: e.to_string() })?;
            cas += 1;
        }
        if cas == 0 {
            return Err(ClientError::Pem { what: "CA certificate", message: "no CERTIFICATE block".into() });
        }
        let chain = CertificateDer::pem_slice_iter(self.client_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Pem { what: "client certificate", message: e.to_string() })?;
        if chain.is_empty() {
            return Err(ClientError::Pem {
                what: "client certificate",
                message: "no CERTIFICATE block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(self.client_key_pem.as_bytes())
            .map_err(|e| ClientError::Pem { what: "client key", message: e.to_string() })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(ClientError::Tls)
    }
}

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A TLS file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM block is missing or malformed.
    #[error("invalid {what} PEM: {message}")]
    Pem {
        /// Which part of the TLS material.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Tls(#[source] rustls::Error),
    /// The agent address is not `host:port`.
    #[error("invalid agent address {address:?}: {message}")]
    Address {
        /// The address given.
        address: String,
        /// What is wrong.
        message: String,
    },
    /// The host is not one this call can use.
    #[error("{host} cannot be used here: {message}")]
    UnsupportedHost {
        /// The host.
        host: String,
        /// Why.
        message: &'static str,
    },
    /// bollard refused to build a client.
    #[error("cannot create a Docker client for {host}: {source}")]
    Docker {
        /// The host.
        host: String,
        /// bollard's error.
        source: bollard::errors::Error,
    },
    /// The agent could not be reached or the connection broke (TCP, TLS, HTTP).
    #[error("agent {address} unreachable: {message}")]
    Unreachable {
        /// The agent's address.
        address: String,
        /// The error chain, flattened.
        message: String,
    },
    /// The TLS handshake with the agent failed: its certificate is not from the configured CA
    /// or not for [`AGENT_SERVER_NAME`], or it refused the client
    /// certificate. Retrying does not help.
    #[error("TLS with agent {address} failed: {message}")]
    Handshake {
        /// The agent's address.
        address: String,
        /// The error chain, flattened.
        message: String,
    },
    /// The agent did not answer in time.
    #[error("agent {address} did not answer {path} within {after:?}")]
    Timeout {
        /// The agent's address.
        address: String,
        /// The path asked for.
        path: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// The agent answered with an unexpected status.
    #[error("agent {address} answered {path} with {status}: {body}")]
    Status {
        /// The agent's address.
        address: String,
        /// The path asked for.
        path: &'static str,
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The agent's answer is not the JSON expected.
    #[error("agent {address} sent an invalid {path} answer: {message}")]
    Decode {
        /// The agent's address.
        address: String,
        /// The path asked for.
        path: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// What `GET /agent/info` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's name.
    pub name: String,
    /// The agent's version (its crate version).
    pub version: String,
    /// The engine's version, when the engine answered.
    #[serde(default)]
    pub engine_version: Option<String>,
    /// The engine's API version, when the engine answered.
    #[serde(default)]
    pub api_version: Option<String>,
    /// The container runtime behind the agent (`docker`).
    pub runtime: String,
}

/// The agent's overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentHealthStatus {
    /// Engine reachable, certificate valid.
    Healthy,
    /// Working, but the certificate expires soon.
    Degraded,
    /// Engine unreachable or certificate expired.
    Unhealthy,
}

/// The engine part of `GET /agent/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineHealth {
    /// Whether the agent reached its engine.
    pub reachable: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// The certificate part of `GET /agent/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateHealth {
    /// The server certificate's expiry, unix seconds.
    pub not_after: i64,
    /// Seconds until then (negative once expired).
    pub expires_in_secs: i64,
    /// Whether it expires within the agent's warning window.
    pub expiring: bool,
}

/// What `GET /agent/health` reports (with HTTP 200 when healthy or degraded, 503 when
/// unhealthy; [`AgentClient::health`] accepts both).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerAgentHealth {
    /// Overall status.
    pub status: AgentHealthStatus,
    /// The engine.
    pub engine: EngineHealth,
    /// The agent's server certificate.
    pub certificate: CertificateHealth,
}

/// A pooled mutual-TLS client for one agent; see the [module docs](self).
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    authority: Authority,
    /// Replaced whole by [`AgentClient::set_tls`]: a request takes the current one.
    conn: ArcSwap<Dialer>,
    request_timeout: Duration,
}

/// The pooled client and the TLS configuration it dials with.
struct Dialer {
    http: HttpClient,
    tls: Arc<rustls::ClientConfig>,
}

impl Dialer {
    fn new(tls: &AgentTls) -> Result<Self, ClientError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let server_name = ServerName::try_from(AGENT_SERVER_NAME)
            .map_err(|e| ClientError::Pem { what: "server name", message: e.to_string() })?;
        let tls_config = tls.client_config()?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config.clone())
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(server_name))
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(connector);
        Ok(Self { http, tls: Arc::new(tls_config) })
    }
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("address", &self.inner.address)
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client for the agent at `address` (`host:port`, IPv6 in brackets) with the default
    /// request time-out. No connection is made until the first request.
    pub fn new(address: &str, tls: &AgentTls) -> Result<Self, ClientError> {
        Self::with_request_timeout(address, tls, DEFAULT_REQUEST_TIMEOUT)
    }

    /// Like [`new`](Self::new), with the time-out for [`info`](Self::info) and
    /// [`health`](Self::health).
    pub fn with_request_timeout(
        address: &str,
        tls: &AgentTls,
        request_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let authority = address
            .parse::<Authority>()
            .map_err(|e| ClientError::Address { address: address.to_owned(), message: e.to_string() })?;
        if authority.port_u16().is_none_or(|p| p == 0) || authority.host().is_empty() || address.contains('@')
        {
            return Err(ClientError::Address {
                address: address.to_owned(),
                message: "expected host:port".into(),
            });
        }
        let conn = ArcSwap::from_pointee(Dialer::new(tls)?);
        let inner = Inner { address: address.to_owned(), authority, conn, request_timeout };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Replaces the TLS material (a renewed client certificate, a new CA): every request from
    /// now on, through this client, its clones and the [`Docker`] handles made from them, dials
    /// a new connection with it. Requests already under way finish on their connections; the
    /// idle ones of the old material close once nothing uses them. Material that does not load
    /// changes nothing.
    pub fn set_tls(&self, tls: &AgentTls) -> Result<(), ClientError> {
        self.inner.conn.store(Arc::new(Dialer::new(tls)?));
        Ok(())
    }

    /// A client for an `agent://host:port` Docker host.
    pub fn for_host(host: &DockerHost, tls: &AgentTls) -> Result<Self, ClientError> {
        match host {
            DockerHost::Agent(hp) => Self::new(&hp.to_string(), tls),
            other => Err(ClientError::UnsupportedHost {
                host: other.to_string(),
                message: "an agent client needs an agent://host:port host (use connect_local for the others)",
            }),
        }
    }

    /// The agent's address, `host:port`.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// A bollard client whose requests go through this agent's pooled connections, with the
    /// default time-out ([`DEFAULT_DOCKER_TIMEOUT`]). Cheap: call it as often as needed.
    pub fn docker(&self) -> Docker {
        self.docker_with_timeout(DEFAULT_DOCKER_TIMEOUT)
    }

    /// Like [`docker`](Self::docker) with another bollard time-out (whole seconds, at least 1).
    pub fn docker_with_timeout(&self, timeout: Duration) -> Docker {
        let inner = Arc::clone(&self.inner);
        let transport = move |request: BollardRequest| {
            let inner = Arc::clone(&inner);
            async move {
                // hyper-util's error alone reads "client error (Connect)": say which agent, where,
                // and the whole cause.
                inner.send(request).await.map_err(|e| {
                    let kind = if e.is_connect() {
                        std::io::ErrorKind::ConnectionRefused
                    } else {
                        std::io::ErrorKind::Other
                    };
                    bollard::errors::Error::IOError {
                        err: std::io::Error::new(
                            kind,
                            format!("docker-agent at {}: {}", inner.address, error_chain(&e)),
                        ),
                    }
                })
            }
        };
        Docker::connect_with_custom_transport(
            transport,
            Some(format!("https://{}", self.inner.address)),
            timeout.as_secs().max(1),
            API_DEFAULT_VERSION,
        )
        .expect("connect_with_custom_transport does not fail")
    }

    /// Sends any request to the agent over the pooled connections. The URI's scheme and
    /// authority are replaced by `https://<agent address>`; only its path and query are used.
    pub async fn send(
        &self,
        request: BollardRequest,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.inner.send(request).await
    }

    /// `GET /agent/info`.
    pub async fn info(&self) -> Result<AgentInfo, ClientError> {
        let (status, body) = self.get_json("/agent/info").await?;
        if status != StatusCode::OK {
            return Err(self.status_error("/agent/info", status, &body));
        }
        self.decode("/agent/info", &body)
    }

    /// `GET /agent/health`. A 503 carrying a health report is returned as that report (status
    /// [`AgentHealthStatus::Unhealthy`]), not as an error.
    pub async fn health(&self) -> Result<DockerAgentHealth, ClientError> {
        let (status, body) = self.get_json("/agent/health").await?;
        if status != StatusCode::OK && status != StatusCode::SERVICE_UNAVAILABLE {
            return Err(self.status_error("/agent/health", status, &body));
        }
        match self.decode::<DockerAgentHealth>("/agent/health", &body) {
            Ok(report) => Ok(report),
            Err(_) if status != StatusCode::OK => Err(self.status_error("/agent/health", status, &body)),
            Err(e) => Err(e),
        }
    }

    async fn get_json(&self, path: &'static str) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            let request = Request::builder()
                .method(Method::GET)
                .uri(path)
                .header(http::header::ACCEPT, "application/json")
                .body(bollard::body_full(Bytes::new()))
                .expect("a GET with a static path is a valid request");
            let response = match self.inner.send(request).await {
                Ok(response) => response,
                Err(e) => {
                    let error = self.unreachable(&e);
                    if let ClientError::Unreachable { address, .. } = &error
                        && let Some(message) = self.refusal().await
                    {
                        return Err(ClientError::Handshake { address: address.clone(), message });
                    }
                    return Err(error);
                }
            };
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_AGENT_BODY)
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    address: self.inner.address.clone(),
                    message: error_chain(&*e),
                })?
                .to_bytes();
            Ok((status, body))
        };
        let after = self.inner.request_timeout;
        tokio::time::timeout(after, exchange).await.unwrap_or_else(|_| {
            Err(ClientError::Timeout { address: self.inner.address.clone(), path, after })
        })
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        path: &'static str,
        body: &[u8],
    ) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            address: self.inner.address.clone(),
            path,
            message: e.to_string(),
        })
    }

    fn status_error(&self, path: &'static str, status: StatusCode, body: &[u8]) -> ClientError {
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        ClientError::Status { address: self.inner.address.clone(), path, status, body: text }
    }

    /// After a request failed without a TLS error: does the agent refuse this client? With
    /// TLS 1.3 a server checks the client's certificate only after the client considers the
    /// handshake done, so a pooled connection can die of the refusal before the request is
    /// written, and hyper reports a cancelled request instead. A fresh handshake followed by a
    /// short read receives the agent's alert if there is one.
    async fn refusal(&self) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let connect = tokio::net::TcpStream::connect(self.inner.address.as_str());
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect).await.ok()?.ok()?;
        let name = ServerName::try_from(AGENT_SERVER_NAME).ok()?;
        let connector = tokio_rustls::TlsConnector::from(self.inner.conn.load().tls.clone());
        let mut tls = match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await.ok()? {
            Ok(tls) => tls,
            Err(e) => return is_tls_error(&e).then(|| error_chain(&e)),
        };
        // Ask for something the agent answers at once when it accepts us: then the read below
        // ends with the answer (accepted) or the alert (refused), as soon as either arrives,
        // however busy the machine is.
        use tokio::io::AsyncWriteExt;
        let probe = b"HEAD /_ping HTTP/1.1\r\nhost: docker-agent\r\nconnection: close\r\n\r\n";
        if let Err(e) = tls.write_all(probe).await {
            return is_tls_error(&e).then(|| error_chain(&e));
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(REFUSAL_WAIT, tls.read(&mut byte)).await {
            Ok(Err(e)) if is_tls_error(&e) => Some(error_chain(&e)),
            _ => None,
        }
    }

    fn unreachable(&self, e: &hyper_util::client::legacy::Error) -> ClientError {
        let (address, message) = (self.inner.address.clone(), error_chain(e));
        if is_tls_error(e) {
            ClientError::Handshake { address, message }
        } else {
            ClientError::Unreachable { address, message }
        }
    }
}

impl Inner {
    async fn send(
        &self,
        request: BollardRequest,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTPS);
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a valid URI");
        // Held for the request: a `set_tls` meanwhile leaves this one on the material it began with.
        let dialer = self.conn.load_full();
        dialer.http.request(Request::from_parts(parts, body)).await
    }
}

/// True if the error or one of its sources is a TLS (rustls) error, directly or inside an
/// `io::Error`.
pub fn is_tls_error(error: &(dyn std::error::Error + 'static)) -> bool {
    if error.is::<rustls::Error>() {
        return true;
    }
    // `io::Error::source` skips the error it wraps (hyper-rustls wraps tokio-rustls' io::Error,
    // which wraps the rustls error), so look inside explicitly.
    if let Some(io) = error.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
        && is_tls_error(inner)
    {
        return true;
    }
    error.source().is_some_and(is_tls_error)
}

/// An error and its sources, joined by `: `.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// A bollard client for a host that needs no agent: `unix://` (the socket), `tcp://` (plain
/// HTTP) or `https://` (the engine's TLS port; `cert_dir` must hold `ca.pem`, `cert.pem` and
/// `key.pem`, and bollard's `connect_with_ssl` checks the server certificate against the host
/// dialled). `agent://` hosts are refused: use [`AgentClient`] or the pool.
pub fn connect_local(host: &DockerHost, cert_dir: Option<&Path>) -> Result<Docker, ClientError> {
    let timeout = DEFAULT_DOCKER_TIMEOUT.as_secs();
    let wrap = |source| ClientError::Docker { host: host.to_string(), source };
    match host {
        DockerHost::Unix(path) => {
            let path = path.to_str().ok_or_else(|| ClientError::UnsupportedHost {
                host: host.to_string(),
                message: "the socket path is not UTF-8",
            })?;
            Docker::connect_with_unix(path, timeout, API_DEFAULT_VERSION).map_err(wrap)
        }
        DockerHost::Tcp(hp) => {
            Docker::connect_with_http(&format!("http://{hp}"), timeout, API_DEFAULT_VERSION).map_err(wrap)
        }
        DockerHost::Https(hp) => {
            let dir = cert_dir.ok_or_else(|| ClientError::UnsupportedHost {
                host: host.to_string(),
                message: "an https:// host needs a certificate directory (ca.pem, cert.pem, key.pem)",
            })?;
            Docker::connect_with_ssl(
                &format!("https://{hp}"),
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                timeout,
                API_DEFAULT_VERSION,
            )
            .map_err(wrap)
        }
        DockerHost::Agent(_) => Err(ClientError::UnsupportedHost {
            host: host.to_string(),
            message: "agent:// hosts are reached through AgentClient or DockerAgentPool",
        }),
    }
}

// The tests make their certificates with the agent side's CA tooling.
#[cfg(all(test, feature = "agent"))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::certs::CertificateAuthority;

    const DAY: Duration = Duration::from_secs(86_400);

    fn tls() -> AgentTls {
        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let client = ca.issue_client("controller", DAY).unwrap();
        AgentTls {
            ca_cert_pem: ca.cert_pem().to_owned(),
            client_cert_pem: client.cert_pem,
            client_key_pem: client.key_pem,
        }
    }

    #[test]
    fn tls_material_is_checked_and_named() {
        let good = tls();
        good.client_config().unwrap();
        let bad_ca = AgentTls { ca_cert_pem: "nope".into(), ..good.clone() };
        assert!(matches!(bad_ca.client_config(), Err(ClientError::Pem { what: "CA certificate", .. })));
        let no_chain = AgentTls { client_cert_pem: String::new(), ..good.clone() };
        assert!(matches!(no_chain.client_config(), Err(ClientError::Pem { what: "client certificate", .. })));
        let no_key = AgentTls { client_key_pem: good.client_cert_pem.clone(), ..good.clone() };
        assert!(matches!(no_key.client_config(), Err(ClientError::Pem { what: "client key", .. })));
        // A key that does not belong to the certificate.
        let other = tls();
        let mismatched = AgentTls { client_key_pem: other.client_key_pem, ..good.clone() };
        assert!(
            matches!(mismatched.client_config(), Err(ClientError::Tls(_))),
            "{:?}",
            mismatched.client_config()
        );
        assert!(!format!("{good:?}").contains("PRIVATE"), "the key must not be printed");
    }

    #[test]
    fn from_dir_reads_the_three_files_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let material = tls();
        std::fs::write(dir.path().join("ca.pem"), &material.ca_cert_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &material.client_cert_pem).unwrap();
        let err = AgentTls::from_dir(dir.path()).unwrap_err();
        assert!(matches!(&err, ClientError::ReadTls { path, .. } if path.ends_with("key.pem")), "{err}");
        std::fs::write(dir.path().join("key.pem"), &material.client_key_pem).unwrap();
        assert_eq!(AgentTls::from_dir(dir.path()).unwrap(), material);
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        let material = tls();
        AgentClient::new("127.0.0.1:8890", &material).unwrap();
        AgentClient::new("[::1]:8890", &material).unwrap();
        for bad in ["", "127.0.0.1", "host:0", "host:x", "https://host:1", "u@host:1", "host:1/path"] {
            assert!(
                matches!(AgentClient::new(bad, &material), Err(ClientError::Address { .. })),
                "{bad:?} accepted"
            );
        }
        let host: DockerHost = "agent://127.0.0.1:9".parse().unwrap();
        assert_eq!(AgentClient::for_host(&host, &material).unwrap().address(), "127.0.0.1:9");
        let unix: DockerHost = "unix:///var/run/docker.sock".parse().unwrap();
        assert!(matches!(AgentClient::for_host(&unix, &material), Err(ClientError::UnsupportedHost { .. })));
    }

    #[test]
    fn connect_local_refuses_agents_and_https_without_certificates() {
        let agent: DockerHost = "agent://127.0.0.1:9".parse().unwrap();
        assert!(matches!(connect_local(&agent, None), Err(ClientError::UnsupportedHost { .. })));
        let https: DockerHost = "https://127.0.0.1:2376".parse().unwrap();
        assert!(matches!(connect_local(&https, None), Err(ClientError::UnsupportedHost { .. })));
        let tcp: DockerHost = "tcp://127.0.0.1:2375".parse().unwrap();
        connect_local(&tcp, None).unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_a_typed_error_naming_the_address() {
        // Bind and drop a listener to get a port where nothing listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = AgentClient::new(&format!("127.0.0.1:{port}"), &tls()).unwrap();
        let err = client.health().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Unreachable { address, .. } if address.ends_with(&port.to_string())),
            "{err}"
        );
        // Through bollard, the error names the agent's address and the cause.
        let err = client.docker().ping().await.unwrap_err();
        match &err {
            bollard::errors::Error::IOError { err: io } => {
                assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
                let text = io.to_string();
                assert!(text.contains(&format!("docker-agent at 127.0.0.1:{port}")), "{text}");
                assert!(text.contains("Connection refused"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A minimal mTLS HTTP/1.1 server (not the agent) answering every request with a health
    /// report; counts the TCP connections it accepts.
    async fn health_server(
        ca: &CertificateAuthority,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        use rustls::server::WebPkiClientVerifier;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let issued = ca.issue_server(&["127.0.0.1".to_owned()], DAY).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap(),
                PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = service_fn(|_request| async {
                        let body = r#"{"status":"healthy","engine":{"reachable":true,"error":null},
                            "certificate":{"not_after":1,"expires_in_secs":2,"expiring":false}}"#;
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(body),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    #[tokio::test]
    async fn mtls_with_the_fixed_name_over_one_reused_connection() {
        use std::sync::atomic::Ordering;

        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let (addr, connections) = health_server(&ca).await;
        let client_cert = ca.issue_client("controller", DAY).unwrap();
        let material = AgentTls {
            ca_cert_pem: ca.cert_pem().to_owned(),
            client_cert_pem: client_cert.cert_pem,
            client_key_pem: client_cert.key_pem,
        };
        // Dialled by IP; the certificate is checked against AGENT_SERVER_NAME (also in its SANs).
        let client = AgentClient::new(&addr.to_string(), &material).unwrap();
        for _ in 0..10 {
            assert_eq!(client.health().await.unwrap().status, AgentHealthStatus::Healthy);
        }
        assert_eq!(client.clone().health().await.unwrap().certificate.expires_in_secs, 2);
        assert_eq!(connections.load(Ordering::SeqCst), 1, "requests must share one pooled connection");

        // A client trusting another CA refuses the server.
        let other = CertificateAuthority::generate("other CA", DAY).unwrap();
        let stranger = AgentTls { ca_cert_pem: other.cert_pem().to_owned(), ..material.clone() };
        let err = AgentClient::new(&addr.to_string(), &stranger).unwrap().health().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Handshake { message, .. } if message.contains("certificate")),
            "{err}"
        );

        // A client whose certificate another CA signed is refused by the server.
        let foreign = other.issue_client("intruder", DAY).unwrap();
        let intruder =
            AgentTls { client_cert_pem: foreign.cert_pem, client_key_pem: foreign.key_pem, ..material };
        let err = AgentClient::new(&addr.to_string(), &intruder).unwrap().health().await.unwrap_err();
        assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    }

    #[test]
    fn health_json_shape() {
        let json = r#"{"status":"degraded","engine":{"reachable":true,"error":null},
            "certificate":{"not_after":1700000000,"expires_in_secs":3600,"expiring":true}}"#;
        let health: DockerAgentHealth = serde_json::from_str(json).unwrap();
        assert_eq!(health.status, AgentHealthStatus::Degraded);
        assert!(health.engine.reachable && health.certificate.expiring);
        let info: AgentInfo = serde_json::from_str(
            r#"{"name":"n","version":"0.1.0","engine_version":"20.10.24","api_version":"1.41","runtime":"docker"}"#,
        )
        .unwrap();
        assert_eq!(info.api_version.as_deref(), Some("1.41"));
    }
}
