//! The gateway's configuration: a TOML file (or the embedded defaults), checked as a whole so
//! every problem is reported at once with where it is.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use httpserver_pool::{HttpServerConfig, Limits, PemSource, Timeouts, TlsConfig};
use pool_core::{FailureMode, PoolConfig};
use serde::{Deserialize, Serialize};
use transport_grpc::{GrpcClientTls, GrpcTlsError};

/// Everything the gateway runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatewayConfig {
    /// Where clients connect.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener: metrics, health, status.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Requests are matched against routes in order; the first match serves them.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Where routes send requests.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Processing agents that routes consult.
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    /// Settings of the agent pool (connections, balancing, health, time-outs…).
    #[serde(default)]
    pub pool: PoolConfig,
    /// Remote Docker engines reached through docker-agent (`agent://host:port`, mutual TLS),
    /// which workloads name with `host`.
    #[serde(default)]
    pub docker_hosts: Vec<DockerHostConfig>,
    /// Containers and Swarm services (on the local Docker engine, or on a `docker_hosts` entry)
    /// that sleep while idle and are woken by a request to a route that names them.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// How long a stop waits for requests in flight.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads that serve the listeners' connections, each with an event loop of its own: a
    /// connection, its requests, the upstream connections they open and the agent connections
    /// they use (Unix-socket and gRPC) stay on one thread (each new connection goes to the
    /// thread with the fewest; each agent's connections are spread over the threads). Default:
    /// one per core. `0` serves everything on the gateway's main multi-threaded runtime, where
    /// the admin listener and the workloads' watchers always run.
    #[serde(default)]
    pub workers: Option<usize>,
    /// How long a worker thread that has run out of work keeps checking its sockets before it
    /// sleeps (`httpserver_pool::WorkerOptions::spin`): an answer from an agent or an upstream
    /// that arrives meanwhile is seen at once, without the wake-up of a sleeping thread (on a
    /// virtual machine, 10–25 µs per hop). It only uses time the CPU would spend idle: between
    /// checks the worker gives the CPU to any other thread that wants it, and it sleeps as
    /// soon as others do. `0s` sleeps at once. At most 10 ms; no effect with `workers = 0`.
    #[serde(default = "default_worker_spin", with = "humantime_serde")]
    pub worker_spin: Duration,
}

/// The longest `worker_spin` a configuration may ask for.
pub(crate) const MAX_WORKER_SPIN: Duration = Duration::from_millis(10);

pub(crate) fn default_worker_spin() -> Duration {
    Duration::from_micros(50)
}

/// The most worker threads a configuration may ask for.
pub(crate) const MAX_WORKERS: usize = 1024;

fn default_drain() -> Duration {
    Duration::from_secs(30)
}

/// One listening HTTP server (httpserver-pool): HTTP/1.1 and HTTP/2, TLS when configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerConfig {
    /// A name for logs and status.
    pub name: String,
    /// `host:port` to bind.
    pub bind: String,
    /// TLS (and mutual TLS with `client_ca`): PEM files or text.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connection caps, header size, HTTP/2 streams (httpserver-pool's defaults when absent).
    #[serde(default)]
    pub limits: Limits,
    /// Header, body, idle and request time-outs (httpserver-pool's defaults when absent).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Serve HTTP/2 with prior knowledge on a plain-TCP listener too (h2c: gRPC clients without
    /// TLS). A TLS listener negotiates HTTP/2 by ALPN whatever this says. Default false: plain
    /// connections speak HTTP/1.1 only.
    #[serde(default)]
    pub h2c: bool,
}

impl ListenerConfig {
    /// The listener as an httpserver-pool server configuration (without its handler).
    pub(crate) fn server(&self) -> HttpServerConfig {
        let mut server = HttpServerConfig::new(self.name.clone(), self.bind.clone());
        server.tls = self.tls.clone();
        server.limits = self.limits.clone();
        server.timeouts = self.timeouts.clone();
        server.h2c = self.h2c;
        server
    }
}

/// The admin listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminConfig {
    /// `host:port` to bind; keep it on loopback.
    pub bind: String,
    /// Host names the admin answers to, besides IP addresses and `localhost` (which it always
    /// does): a request whose `Host` names another is refused with 403, so that a web page
    /// whose name a hostile DNS server points at this machine (DNS rebinding) cannot read
    /// `/status` or `/metrics` from a browser. Names a scraper uses to reach the admin go here.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// A file holding the admin's bearer token: when set, `/metrics`, `/status` and
    /// `/admin/reload` answer only requests carrying `Authorization: Bearer <token>` (401
    /// otherwise); `/healthz` and `/readyz` stay open for probes. The file is read at start and
    /// on every reload (a new token takes effect then); surrounding whitespace is ignored.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { bind: "127.0.0.1:9901".into(), allowed_hosts: Vec::new(), token_file: None }
    }
}

/// The shortest admin token taken: a guessable one would protect nothing.
pub(crate) const MIN_ADMIN_TOKEN: usize = 16;

/// The admin's bearer token, as read from `[admin] token_file`. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AdminToken(Vec<u8>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminToken({} bytes)", self.0.len())
    }
}

impl AdminToken {
    /// Whether an `Authorization` header's value is `Bearer <this token>` (the scheme in any
    /// case), compared in constant time.
    pub(crate) fn admits(&self, authorization: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        let Some(split) = authorization.iter().position(|&b| b == b' ') else { return false };
        let (scheme, token) = (&authorization[..split], authorization[split..].trim_ascii_start());
        scheme.eq_ignore_ascii_case(b"bearer") && bool::from(token.ct_eq(&self.0))
    }
}

impl AdminConfig {
    /// The token in `token_file`, read now (`None` without a file), or what is wrong with it:
    /// unreadable, shorter than [`MIN_ADMIN_TOKEN`], or holding characters a header cannot
    /// carry.
    pub(crate) fn read_token(&self) -> Result<Option<AdminToken>, String> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let token = text.trim_ascii();
        if token.len() < MIN_ADMIN_TOKEN {
            return Err(format!(
                "{}: the token has {} characters, at least {MIN_ADMIN_TOKEN} are needed",
                path.display(),
                token.len()
            ));
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{}: the token must be printable ASCII without spaces (it is sent in a header)",
                path.display()
            ));
        }
        Ok(Some(AdminToken(token.to_vec())))
    }
}

/// Which requests a route serves, where it sends them, and who is asked first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteConfig {
    /// A name for logs, metrics and status.
    pub name: String,
    /// The `Host` (without port) this route serves; none serves any host.
    #[serde(default)]
    pub host: Option<String>,
    /// The path prefix this route serves (`/` for everything).
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// The upstream requests go to.
    pub upstream: String,
    /// Agents consulted on every request, in order; the first that does not allow decides.
    #[serde(default)]
    pub agents: Vec<String>,
    /// When an agent cannot answer (down, paused, over its time-out): `closed` answers 503,
    /// `open` lets the request through. Either way the response says so in
    /// `x-agentpool-agent-status`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// A workload the upstream runs in: woken by this route's requests, kept up while they
    /// last, stopped when idle.
    #[serde(default)]
    pub workload: Option<String>,
    /// The largest WebSocket frame, in bytes, relayed on this route when an agent takes frames
    /// (a larger one closes the connection with 1009). Default 1 MiB.
    #[serde(default = "default_max_websocket_frame")]
    pub max_websocket_frame: u64,
}

fn default_max_websocket_frame() -> u64 {
    crate::ws::DEFAULT_MAX_FRAME
}

fn default_prefix() -> String {
    "/".into()
}

/// A set of backends serving the same thing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamConfig {
    /// The name routes use.
    pub name: String,
    /// `http://host:port` base URLs, used in turn.
    pub urls: Vec<String>,
    /// Time allowed for the upstream's response headers.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures (refused or unanswered connections, time-outs) after which a URL is
    /// left out of rotation. Default 3.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long a failing URL is left out. Default 10 s.
    #[serde(default = "default_eject_for", with = "humantime_serde")]
    pub eject_for: Duration,
    /// Connections open at once to each of its URLs. A request that finds none idle and the
    /// cap reached waits for one to come back or close, within `timeout`; if none does, it
    /// gets 503 with `Retry-After` (the URL's health is not charged). Default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Idle keep-alive connections kept per URL; one going idle beyond that is closed.
    /// Default 256.
    #[serde(default = "default_max_idle")]
    pub max_idle: usize,
    /// An idle connection older than this is closed instead of reused. Default 90 s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The longest wait for the next piece of a response body once its headers have come; then
    /// the response is cut off (the client sees it end short) and the connection closed.
    /// Default 60 s; raise it for upstreams that stream with long pauses (server-sent events).
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// TLS for `https://` URLs (required by them, refused when every URL is `http://`).
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Speak HTTP/2 to it (gRPC servers, for one): with prior knowledge on `http://` URLs
    /// (h2c), by ALPN `h2` on `https://` ones (a server that does not agree fails the
    /// handshake). Each URL then has one multiplexed connection: `max_connections` caps the
    /// requests in flight on it, and it is closed after `idle_timeout` without requests (at
    /// the next sweep, every 5 s; at once there when `max_idle` is 0). A WebSocket upgrade to
    /// it is answered 501. Default false: HTTP/1.1.
    #[serde(default)]
    pub http2: bool,
    /// With `http2`: how often the connection is pinged while requests are in flight on it;
    /// a ping unanswered for as long closes it (its requests fail and count against the URL;
    /// the next request makes a new connection). Default 10 s.
    #[serde(default = "default_http2_keep_alive", with = "humantime_serde")]
    pub http2_keep_alive: Duration,
}

impl UpstreamConfig {
    /// The connection limits of each of its URLs.
    pub(crate) fn limits(&self) -> crate::upstream::ConnLimits {
        crate::upstream::ConnLimits {
            max_connections: self.max_connections,
            max_idle: self.max_idle,
            idle_timeout: self.idle_timeout,
            read_timeout: self.read_timeout,
            http2_keep_alive: self.http2_keep_alive,
        }
    }
}

pub(crate) fn default_http2_keep_alive() -> Duration {
    Duration::from_secs(10)
}

pub(crate) fn default_max_connections() -> usize {
    1024
}

pub(crate) fn default_max_idle() -> usize {
    256
}

pub(crate) fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

pub(crate) fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_failures() -> u32 {
    3
}

fn default_eject_for() -> Duration {
    Duration::from_secs(10)
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}

/// An idle-watched workload (idlewatch): what it is, when it sleeps, how it is known ready.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadConfig {
    /// The name routes use.
    pub name: String,
    /// idlewatch's settings: `workload = { container = "wiki" }` (or `{ service = { name, replicas } }`),
    /// `idle_timeout`, `stop`, `stop_timeout`, `wake_timeout`, `readiness`, `depends_on`,
    /// `metric_labels`. The gateway sets the label `host` (the `docker_hosts` name, or `local`)
    /// on the watcher's series itself.
    pub watch: idlewatch::IdleConfig,
    /// Serve a loading page to browsers while it wakes (default true); otherwise requests are
    /// held until it is ready.
    #[serde(default = "default_true")]
    pub loading_page: bool,
    /// The `docker_hosts` entry whose engine runs it; none: the local engine.
    #[serde(default)]
    pub host: Option<String>,
}

/// The name `/status` and the logs give the local Docker engine; no `docker_hosts` entry may
/// take it.
pub(crate) const LOCAL_ENGINE: &str = "local";

/// A remote Docker engine reached through a docker-agent: the agent's address and the
/// gateway's mutual-TLS material for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DockerHostConfig {
    /// The name workloads use (`host = "…"`).
    pub name: String,
    /// `agent://host:port`: where the docker-agent listens.
    pub url: String,
    /// The CA, the gateway's client certificate and its key (all required: the agent accepts
    /// nothing without a client certificate). The agent's certificate is checked for the fixed
    /// name `docker-agent.agentpool` whatever address is dialled.
    pub tls: DockerHostTls,
}

/// The gateway's TLS material for a docker-agent: PEM files (`{ file = "…" }`) or text
/// (`{ pem = "…" }`), as for listeners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DockerHostTls {
    /// The deployment's CA certificate: the only root trusted for the agent's certificate.
    pub ca: PemSource,
    /// The gateway's client certificate (issued by `docker-agent certs client`).
    pub cert: PemSource,
    /// The private key of `cert`.
    pub key: PemSource,
}

impl DockerHostTls {
    /// Reads and checks the material (PEM parses, the key matches the certificate): the
    /// controller's TLS for docker-agent's client, or the first problem.
    pub(crate) fn load(&self) -> Result<docker_agent::AgentTls, ClientTlsError> {
        let text = |field, source| {
            String::from_utf8(pem_bytes(field, source)?)
                .map_err(|_| ClientTlsError { field, problem: "not PEM text (UTF-8)".into() })
        };
        let tls = docker_agent::AgentTls {
            ca_cert_pem: text("ca", &self.ca)?,
            client_cert_pem: text("cert", &self.cert)?,
            client_key_pem: text("key", &self.key)?,
        };
        tls.client_config().map_err(|e| {
            let field = match &e {
                docker_agent::ClientError::Pem { what: "CA certificate", .. } => "ca",
                docker_agent::ClientError::Pem { what: "client certificate", .. } => "cert",
                // A malformed key, or one rustls refuses (not the certificate's).
                _ => "key",
            };
            ClientTlsError { field, problem: e.to_string() }
        })?;
        Ok(tls)
    }
}

impl DockerHostConfig {
    /// The agent's `host:port`, from `url` (`agent://host:port`).
    pub(crate) fn address(&self) -> Result<String, String> {
        match self.url.parse::<docker_agent::DockerHost>() {
            Ok(docker_agent::DockerHost::Agent(address)) => Ok(address.to_string()),
            Ok(other) => Err(format!(
                "{:?}: only agent://host:port is supported here (a {}:// engine is not reached through docker-agent; the local engine is the default)",
                self.url,
                other.scheme()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A processing agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentConfig {
    /// The name routes use.
    pub name: String,
    /// Its endpoints (replicas): `unix:/absolute/path.sock` (transport-uds), or `grpc://host:port`
    /// / `grpc+unix:/absolute/path` (transport-grpc); one kind per agent.
    pub endpoints: Vec<String>,
    /// TLS for `grpcs://` endpoints (required by them, refused for any other kind).
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// How the gateway dials over TLS (an agent's `grpcs://` endpoints, an upstream's `https://`
/// URLs): the CA it trusts for the peer's certificate, optionally a client certificate (mutual
/// TLS) and the name to expect in the peer's certificate. PEM files (`{ file = "…" }`) or text
/// (`{ pem = "…" }`), as for listeners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientTls {
    /// The CA certificate(s) that sign the peer's certificate; nothing else is trusted.
    pub ca: PemSource,
    /// The gateway's client certificate chain, for peers that require one (with `key`).
    #[serde(default)]
    pub cert: Option<PemSource>,
    /// The private key of `cert`.
    #[serde(default)]
    pub key: Option<PemSource>,
    /// The name to verify in the peer's certificate instead of the endpoint's or URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A problem with TLS settings of an agent or upstream: the field (`ca`, `cert`, `key`, `server_name`) and
/// what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("tls.{field}: {problem}")]
pub(crate) struct ClientTlsError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn pem_bytes(field: &'static str, source: &PemSource) -> Result<Vec<u8>, ClientTlsError> {
    match source {
        PemSource::File(path) => std::fs::read(path)
            .map_err(|e| ClientTlsError { field, problem: format!("{}: {e}", path.display()) }),
        PemSource::Pem(text) => Ok(text.clone().into_bytes()),
    }
}

/// The bytes of TLS material as read from its files (or inline text): what the gateway dialled
/// with, kept so that a reload notices a file rewritten in place (a renewed certificate at the
/// same path) even though the configuration's text did not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientTlsFiles {
    ca: Vec<u8>,
    /// The client certificate chain and its key, when set.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Reads and checks the material: transport-grpc's client TLS, or the first problem.
    pub(crate) fn load(&self) -> Result<GrpcClientTls, ClientTlsError> {
        self.read()?.build(self.server_name.as_deref())
    }

    /// Reads the files (a certificate without its key, or the reverse, is refused here).
    pub(crate) fn read(&self) -> Result<ClientTlsFiles, ClientTlsError> {
        let ca = pem_bytes("ca", &self.ca)?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((pem_bytes("cert", cert)?, pem_bytes("key", key)?)),
            (Some(_), None) => {
                return Err(ClientTlsError {
                    field: "key",
                    problem: "a client certificate needs its key".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ClientTlsError {
                    field: "cert",
                    problem: "a key needs its client certificate".into(),
                });
            }
            (None, None) => None,
        };
        Ok(ClientTlsFiles { ca, identity })
    }
}

impl ClientTlsFiles {
    /// Checks the bytes read and makes transport-grpc's client TLS from them.
    pub(crate) fn build(&self, server_name: Option<&str>) -> Result<GrpcClientTls, ClientTlsError> {
        let mut tls = GrpcClientTls::new(&self.ca)
            .map_err(|e| ClientTlsError { field: "ca", problem: e.to_string() })?;
        if let Some(name) = server_name {
            tls = tls
                .with_server_name(name)
                .map_err(|e| ClientTlsError { field: "server_name", problem: e.to_string() })?;
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.with_identity(cert, key).map_err(|e| {
                let field = match e {
                    GrpcTlsError::Certificates { .. } => "cert",
                    _ => "key",
                };
                ClientTlsError { field, problem: e.to_string() }
            })?;
        }
        Ok(tls)
    }
}

impl ClientTlsFiles {
    /// Checks the bytes read and makes the upstream client's TLS (HTTP/1.1 over TLS) from them.
    pub(crate) fn upstream(
        &self,
        server_name: Option<&str>,
    ) -> Result<crate::upstream::UpstreamTls, ClientTlsError> {
        let identity = self.identity.as_ref().map(|(cert, key)| (cert.as_slice(), key.as_slice()));
        crate::upstream::UpstreamTls::new(&self.ca, identity, server_name)
            .map_err(|(field, problem)| ClientTlsError { field, problem })
    }
}

/// True for an endpoint transport-grpc dials (`grpc://`, `grpcs://`, `grpc+unix:`).
pub(crate) fn is_grpc(endpoint: &str) -> bool {
    endpoint.starts_with("grpc://") || endpoint.starts_with("grpcs://") || endpoint.starts_with("grpc+unix:")
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", problems.join("\n  "))]
pub(crate) struct ConfigError {
    /// One line per problem, each naming where it is.
    pub problems: Vec<String>,
}

impl GatewayConfig {
    /// How many worker threads serve the listeners (0: none, the main runtime).
    pub(crate) fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Parses TOML; syntax errors name their line and column.
    pub(crate) fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError { problems: vec![e.to_string().trim_end().to_owned()] })
    }

    /// Checks the whole configuration and reports every problem, each with its location.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if self.workers.is_some_and(|n| n > MAX_WORKERS) {
            p.push(format!("workers: at most {MAX_WORKERS}"));
        }
        if self.worker_spin > MAX_WORKER_SPIN {
            p.push(format!("worker_spin: at most {} ms", MAX_WORKER_SPIN.as_millis()));
        }
        if self.listeners.is_empty() {
            p.push("listeners: at least one is required".to_owned());
        }
        let mut binds = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            check_bind(&mut p, &format!("listeners[{i}].bind"), &l.bind);
            // TLS files readable and matching, limits and time-outs sane: httpserver-pool's own check.
            if let Err(httpserver_pool::Error::Invalid { problems }) = l.server().validate() {
                for problem in problems.iter().filter(|x| x.field != "listen") {
                    p.push(format!("listeners[{i}] ({}).{}: {}", l.name, problem.field, problem.message));
                }
            }
            if !binds.insert(l.bind.as_str()) {
                p.push(format!("listeners[{i}].bind: {} is used twice", l.bind));
            }
        }
        check_bind(&mut p, "admin.bind", &self.admin.bind);
        for (i, host) in self.admin.allowed_hosts.iter().enumerate() {
            let named =
                host.parse::<http::uri::Authority>().is_ok_and(|a| a.host() == host && a.port().is_none());
            if !named {
                p.push(format!("admin.allowed_hosts[{i}]: {host:?} is not a host name"));
            }
        }
        if let Err(problem) = self.admin.read_token() {
            p.push(format!("admin.token_file: {problem}"));
        }
        if binds.contains(self.admin.bind.as_str()) {
            p.push(format!("admin.bind: {} is also a listener", self.admin.bind));
        }
        let upstreams = unique_names(&mut p, "upstreams", self.upstreams.iter().map(|u| u.name.as_str()));
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.urls.is_empty() {
                p.push(format!("upstreams[{i}] ({}).urls: at least one is required", u.name));
            }
            let mut https = Vec::new();
            for (j, url) in u.urls.iter().enumerate() {
                match upstream_base(url) {
                    Ok(base) if base.https => https.push((j, base.authority)),
                    Ok(_) => {}
                    Err(e) => p.push(format!("upstreams[{i}] ({}).urls[{j}]: {e}", u.name)),
                }
            }
            match &u.tls {
                None if !https.is_empty() => {
                    p.push(format!("upstreams[{i}] ({}).tls: https:// URLs need tls.ca", u.name))
                }
                None => {}
                Some(_) if https.is_empty() => {
                    p.push(format!("upstreams[{i}] ({}).tls: only https:// URLs use TLS", u.name))
                }
                Some(tls) => match tls.read().and_then(|f| f.upstream(tls.server_name.as_deref())) {
                    Err(e) => p.push(format!("upstreams[{i}] ({}).{e}", u.name)),
                    Ok(made) => {
                        for (j, authority) in &https {
                            if let Err(e) = made.server_name(authority) {
                                p.push(format!("upstreams[{i}] ({}).urls[{j}]: {e}", u.name));
                            }
                        }
                    }
                },
            }
            if u.max_failures == 0 {
                p.push(format!("upstreams[{i}] ({}).max_failures: must be at least 1", u.name));
            }
            if u.max_connections == 0 || u.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
                p.push(format!("upstreams[{i}] ({}).max_connections: must be at least 1", u.name));
            }
            if u.max_idle > u.max_connections {
                p.push(format!(
                    "upstreams[{i}] ({}).max_idle: {} is more than max_connections ({})",
                    u.name, u.max_idle, u.max_connections
                ));
            }
            if u.idle_timeout.is_zero() {
                p.push(format!("upstreams[{i}] ({}).idle_timeout: must be greater than zero", u.name));
            }
            if u.timeout.is_zero() {
                p.push(format!("upstreams[{i}] ({}).timeout: must be greater than zero", u.name));
            }
            if u.read_timeout.is_zero() {
                p.push(format!("upstreams[{i}] ({}).read_timeout: must be greater than zero", u.name));
            }
        }
        let agents = unique_names(&mut p, "agents", self.agents.iter().map(|a| a.name.as_str()));
        for (i, a) in self.agents.iter().enumerate() {
            if a.endpoints.is_empty() {
                p.push(format!("agents[{i}] ({}).endpoints: at least one is required", a.name));
            }
            let grpc = a.endpoints.iter().filter(|e| is_grpc(e)).count();
            if grpc > 0 && grpc < a.endpoints.len() {
                p.push(format!(
                    "agents[{i}] ({}).endpoints: all over Unix sockets or all over gRPC, not both",
                    a.name
                ));
            }
            let grpcs = a.endpoints.iter().any(|e| e.starts_with("grpcs://"));
            match &a.tls {
                None if grpcs => {
                    p.push(format!("agents[{i}] ({}).tls: grpcs:// endpoints need tls.ca", a.name))
                }
                Some(_) if !grpcs => {
                    p.push(format!("agents[{i}] ({}).tls: only grpcs:// endpoints use TLS", a.name))
                }
                Some(tls) => {
                    if let Err(e) = tls.load() {
                        p.push(format!("agents[{i}] ({}).{e}", a.name));
                    }
                }
                None => {}
            }
        }
        let hosts = unique_names(&mut p, "docker_hosts", self.docker_hosts.iter().map(|h| h.name.as_str()));
        let mut addresses = HashMap::new();
        for (i, h) in self.docker_hosts.iter().enumerate() {
            if h.name == LOCAL_ENGINE {
                p.push(format!("docker_hosts[{i}].name: {LOCAL_ENGINE:?} is the local engine's name"));
            }
            match h.address() {
                Ok(address) => {
                    if let Some(first) = addresses.insert(address.clone(), i) {
                        p.push(format!(
                            "docker_hosts[{i}] ({}).url: {address} is also docker_hosts[{first}]",
                            h.name
                        ));
                    }
                }
                Err(e) => p.push(format!("docker_hosts[{i}] ({}).url: {e}", h.name)),
            }
            if let Err(e) = h.tls.load() {
                p.push(format!("docker_hosts[{i}] ({}).{e}", h.name));
            }
        }
        let workloads = unique_names(&mut p, "workloads", self.workloads.iter().map(|w| w.name.as_str()));
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(host) = &w.host
                && !hosts.contains_key(host.as_str())
            {
                p.push(format!("workloads[{i}] ({}).host: no docker host named {host:?}", w.name));
            }
        }
        // Each engine's workloads form one idlewatch group: dependencies stay on one engine,
        // and a container name is unique per engine (two hosts may each have a "web").
        let engine_of: HashMap<&str, &str> = self
            .workloads
            .iter()
            .map(|w| (w.watch.workload.name(), w.host.as_deref().unwrap_or(LOCAL_ENGINE)))
            .collect();
        for (i, w) in self.workloads.iter().enumerate() {
            let engine = w.host.as_deref().unwrap_or(LOCAL_ENGINE);
            for (j, d) in w.watch.depends_on.iter().enumerate() {
                if let Some(other) = engine_of.get(d.workload.as_str())
                    && *other != engine
                {
                    p.push(format!(
                        "workloads[{i}] ({}).watch.depends_on[{j}]: {:?} runs on {other:?}, this workload on {engine:?}; dependencies must be on the same Docker engine",
                        w.name, d.workload
                    ));
                }
            }
        }
        for (engine, group) in self.workload_groups() {
            let configs: Vec<idlewatch::IdleConfig> = group.iter().map(|w| w.watch.clone()).collect();
            if let Err(e) = idlewatch::IdleGroup::check(&configs) {
                let at = match engine {
                    None => "workloads".to_owned(),
                    Some(host) => format!("workloads (host {host:?})"),
                };
                p.extend(e.problems.into_iter().map(|x| format!("{at}: {x}")));
            }
        }
        if self.routes.is_empty() {
            p.push("routes: at least one is required".to_owned());
        }
        unique_names(&mut p, "routes", self.routes.iter().map(|r| r.name.as_str()));
        for (i, r) in self.routes.iter().enumerate() {
            if !r.path_prefix.starts_with('/') {
                p.push(format!(
                    "routes[{i}] ({}).path_prefix: {:?} must start with /",
                    r.name, r.path_prefix
                ));
            }
            if !upstreams.contains_key(r.upstream.as_str()) {
                p.push(format!("routes[{i}] ({}).upstream: no upstream named {:?}", r.name, r.upstream));
            }
            if r.max_websocket_frame == 0 {
                p.push(format!("routes[{i}] ({}).max_websocket_frame: must be at least 1", r.name));
            }
            if let Some(w) = &r.workload
                && !workloads.contains_key(w.as_str())
            {
                p.push(format!("routes[{i}] ({}).workload: no workload named {w:?}", r.name));
            }
            for (j, a) in r.agents.iter().enumerate() {
                if !agents.contains_key(a.as_str()) {
                    p.push(format!("routes[{i}] ({}).agents[{j}]: no agent named {a:?}", r.name));
                }
            }
        }
        if let Err(pool_core::PoolError::InvalidConfig { problems }) = self.pool.validate() {
            p.extend(problems.into_iter().map(|x| format!("pool.{x}")));
        }
        if p.is_empty() { Ok(()) } else { Err(ConfigError { problems: p }) }
    }
}

impl GatewayConfig {
    /// The workloads grouped by the engine that runs them (`None`: the local engine), in the
    /// order the engines first appear.
    pub(crate) fn workload_groups(&self) -> Vec<(Option<&str>, Vec<&WorkloadConfig>)> {
        let mut groups: Vec<(Option<&str>, Vec<&WorkloadConfig>)> = Vec::new();
        for w in &self.workloads {
            let host = w.host.as_deref();
            match groups.iter_mut().find(|(h, _)| *h == host) {
                Some((_, group)) => group.push(w),
                None => groups.push((host, vec![w])),
            }
        }
        groups
    }
}

fn unique_names<'a>(
    p: &mut Vec<String>,
    what: &str,
    names: impl Iterator<Item = &'a str>,
) -> HashMap<&'a str, usize> {
    let mut seen = HashMap::new();
    for (i, name) in names.enumerate() {
        if name.trim().is_empty() {
            p.push(format!("{what}[{i}].name: must not be empty"));
        } else if let Some(first) = seen.insert(name, i) {
            p.push(format!("{what}[{i}].name: {name:?} is also {what}[{first}]"));
        }
    }
    seen
}

fn check_bind(p: &mut Vec<String>, at: &str, bind: &str) {
    match bind.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => p.push(format!("{at}: {bind:?} is not host:port")),
    }
}

/// An upstream's base URL: where it is and whether it is reached over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UpstreamBase {
    /// `host[:port]` as written.
    pub authority: http::uri::Authority,
    /// `https://` (TLS, default port 443) rather than `http://` (default port 80).
    pub https: bool,
}

/// The scheme and authority of an upstream URL (`http://host:port` or `https://host:port`,
/// nothing after the port but an optional `/`).
pub(crate) fn upstream_base(url: &str) -> Result<UpstreamBase, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url:?}: only http:// and https:// upstreams are supported")),
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{url:?}: a base URL has no path or query"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("{url:?} has no host"))?;
    Ok(UpstreamBase { authority, https })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[listeners]]
        name = "main"
        bind = "127.0.0.1:8080"

        [[upstreams]]
        name = "app"
        urls = ["http://127.0.0.1:3000"]

        [[agents]]
        name = "waf"
        endpoints = ["unix:/run/waf.sock"]

        [[routes]]
        name = "all"
        upstream = "app"
        agents = ["waf"]
        failure_mode = "open"
    "#;

    #[test]
    fn a_good_configuration_passes() {
        let cfg = GatewayConfig::from_toml(GOOD).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.routes[0].failure_mode, FailureMode::Open);
        assert_eq!(cfg.routes[0].path_prefix, "/");
        // HTTP/1.1 to upstreams and on plain listeners unless asked.
        assert!(!cfg.upstreams[0].http2);
        assert!(!cfg.listeners[0].h2c && !cfg.listeners[0].server().h2c);
        let grpc = GOOD
            .replace(
                "[[upstreams]]\n        name = \"app\"",
                "[[upstreams]]\n        name = \"app\"\n        http2 = true",
            )
            .replace("bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.1:8080\"\n        h2c = true");
        let cfg = GatewayConfig::from_toml(&grpc).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.upstreams[0].http2);
        assert!(cfg.listeners[0].server().h2c);
    }

    #[test]
    fn an_admin_token_file_must_hold_a_usable_token() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |file: &std::path::Path| {
            let text = format!("{GOOD}\n[admin]\nbind = \"127.0.0.1:9901\"\ntoken_file = {:?}\n", file);
            GatewayConfig::from_toml(&text).unwrap().validate()
        };
        let file = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        let good = file("good", "  s3cret-token-0123456789\n");
        cfg(&good).unwrap();
        let token =
            AdminConfig { token_file: Some(good), ..AdminConfig::default() }.read_token().unwrap().unwrap();
        assert!(token.admits(b"Bearer s3cret-token-0123456789"));
        assert!(token.admits(b"bearer  s3cret-token-0123456789"), "the scheme in any case");
        for refused in [
            &b"Bearer s3cret-token-012345678"[..],
            b"Bearer s3cret-token-01234567890",
            b"Basic s3cret-token-0123456789",
            b"s3cret-token-0123456789",
            b"Bearer",
            b"",
        ] {
            assert!(!token.admits(refused), "{:?}", String::from_utf8_lossy(refused));
        }
        assert_eq!(format!("{token:?}"), "AdminToken(23 bytes)", "Debug does not show the token");
        for (path, expected) in [
            (dir.path().join("missing"), "missing: No such file"),
            (file("short", "short-token\n"), "the token has 11 characters, at least 16 are needed"),
            (file("spaced", "two words in one token"), "printable ASCII without spaces"),
        ] {
            let all = cfg(&path).unwrap_err().to_string();
            assert!(all.contains("admin.token_file: ") && all.contains(expected), "{all}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let bad = r#"
            [[listeners]]
            name = "main"
            bind = "8080"

            [[upstreams]]
            name = "app"
            urls = ["ftp://x", "http://y/path"]
            max_connections = 4
            max_idle = 8
            idle_timeout = "0s"
            read_timeout = "0s"

            [[upstreams]]
            name = "none"
            urls = ["http://z"]
            max_connections = 0
            max_idle = 0

            [[routes]]
            name = "r"
            path_prefix = "api"
            upstream = "nope"
            agents = ["ghost"]
            max_websocket_frame = 0

            [pool]
            connections_per_endpoint = 0
        "#;
        let bad = format!("workers = 5000\nworker_spin = \"1s\"\n{bad}");
        let err = GatewayConfig::from_toml(&bad).unwrap().validate().unwrap_err();
        let all = err.problems.join("\n");
        for expected in [
            "workers: at most 1024",
            "worker_spin: at most 10 ms",
            "listeners[0].bind: \"8080\" is not host:port",
            "upstreams[0] (app).urls[0]: \"ftp://x\": only http:// and https:// upstreams are supported",
            "upstreams[0] (app).urls[1]: \"http://y/path\": a base URL has no path or query",
            "upstreams[0] (app).max_idle: 8 is more than max_connections (4)",
            "upstreams[0] (app).idle_timeout: must be greater than zero",
            "upstreams[0] (app).read_timeout: must be greater than zero",
            "upstreams[1] (none).max_connections: must be at least 1",
            "routes[0] (r).path_prefix: \"api\" must start with /",
            "routes[0] (r).upstream: no upstream named \"nope\"",
            "routes[0] (r).agents[0]: no agent named \"ghost\"",
            "routes[0] (r).max_websocket_frame: must be at least 1",
            "pool.connections_per_endpoint",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn admin_allowed_hosts_are_host_names() {
        let cfg = |hosts: &str| {
            GatewayConfig::from_toml(&format!(
                "{GOOD}\n[admin]\nbind = \"127.0.0.1:9901\"\nallowed_hosts = {hosts}\n"
            ))
            .unwrap()
            .validate()
        };
        cfg(r#"["admin.internal", "gw"]"#).unwrap();
        let all = cfg(r#"["ok", "with:80", "two words", "user@x"]"#).unwrap_err().problems.join("\n");
        for expected in ["admin.allowed_hosts[1]", "admin.allowed_hosts[2]", "admin.allowed_hosts[3]"] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(!all.contains("admin.allowed_hosts[0]"), "{all}");
    }

    #[test]
    fn https_upstreams_need_their_tls_and_only_they_take_it() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let ca_pem = format!("{{ pem = {:?} }}", ca.pem);
        let head = "[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:1\"\n\n\
                    [[routes]]\nname = \"r\"\nupstream = \"a\"\n\n";
        let check = |upstreams: &str| {
            let cfg = GatewayConfig::from_toml(&format!("{head}{upstreams}")).unwrap();
            cfg.validate().map_err(|e| e.problems.join("\n"))
        };
        // https:// with its CA (a host name, an address, a named override): valid.
        check(&format!(
            "[[upstreams]]\nname = \"a\"\nurls = [\"https://app.internal\", \"https://[::1]:8443\", \"http://127.0.0.1:80\"]\ntls = {{ ca = {ca_pem} }}\n"
        ))
        .unwrap();
        let cases = [
            (
                "[[upstreams]]\nname = \"a\"\nurls = [\"https://app.internal\"]\n".to_owned(),
                "upstreams[0] (a).tls: https:// URLs need tls.ca",
            ),
            (
                format!("[[upstreams]]\nname = \"a\"\nurls = [\"http://app.internal\"]\ntls = {{ ca = {ca_pem} }}\n"),
                "upstreams[0] (a).tls: only https:// URLs use TLS",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nurls = [\"https://app.internal\"]\ntls = { ca = { pem = \"nonsense\" } }\n"
                    .to_owned(),
                "upstreams[0] (a).tls.ca: no certificate",
            ),
            (
                format!(
                    "[[upstreams]]\nname = \"a\"\nurls = [\"https://app.internal\"]\ntls = {{ ca = {ca_pem}, key = {ca_pem} }}\n"
                ),
                "upstreams[0] (a).tls.cert: a key needs its client certificate",
            ),
            (
                format!(
                    "[[upstreams]]\nname = \"a\"\nurls = [\"https://app.internal\"]\ntls = {{ ca = {ca_pem}, server_name = \"not a name!\" }}\n"
                ),
                "upstreams[0] (a).tls.server_name:",
            ),
            (
                format!(
                    "[[upstreams]]\nname = \"a\"\nurls = [\"https://a.internal\", \"https://bad_host!\"]\ntls = {{ ca = {ca_pem} }}\n"
                ),
                "upstreams[0] (a).urls[1]: \"bad_host!\" cannot be verified in a certificate",
            ),
        ];
        for (upstreams, expected) in cases {
            let all = check(&upstreams).unwrap_err();
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    /// A CA, and a client certificate of it, as PEM text for `tls = { … }`; `cert_file`
    /// replaces the certificate by a file.
    fn host_tls_with(cert_file: Option<&str>) -> String {
        let day = Duration::from_secs(86_400);
        let ca = docker_agent::CertificateAuthority::generate("config test CA", day).unwrap();
        let client = ca.issue_client("gateway", day).unwrap();
        let cert = match cert_file {
            Some(path) => format!("{{ file = {path:?} }}"),
            None => format!("{{ pem = {:?} }}", client.cert_pem),
        };
        format!(
            "{{ ca = {{ pem = {:?} }}, cert = {cert}, key = {{ pem = {:?} }} }}",
            ca.cert_pem(),
            client.key_pem
        )
    }

    fn host_tls() -> String {
        host_tls_with(None)
    }

    fn with_hosts(hosts_and_workloads: &str) -> Result<GatewayConfig, ConfigError> {
        let cfg = GatewayConfig::from_toml(&format!("{GOOD}\n{hosts_and_workloads}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn workloads_name_their_docker_host() {
        let tls = host_tls();
        let cfg = with_hosts(&format!(
            r#"
            [[docker_hosts]]
            name = "edge"
            url = "agent://192.0.2.10:2376"
            tls = {tls}

            [[workloads]]
            name = "web-local"
            watch = {{ workload = {{ container = "web" }}, idle_timeout = "5m" }}

            [[workloads]]
            name = "web-edge"
            host = "edge"
            watch = {{ workload = {{ container = "web" }}, idle_timeout = "5m" }}

            [[workloads]]
            name = "db-edge"
            host = "edge"
            watch = {{ workload = {{ container = "db" }}, idle_timeout = "5m" }}
            "#
        ))
        .unwrap();
        assert_eq!(cfg.docker_hosts[0].address().unwrap(), "192.0.2.10:2376");
        // One group per engine: "web" on each is no duplicate.
        let groups = cfg.workload_groups();
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].0, groups[0].1.len()), (None, 1));
        assert_eq!((groups[1].0, groups[1].1.len()), (Some("edge"), 2));
    }

    #[test]
    fn docker_host_problems_are_reported_with_their_location() {
        let tls = host_tls();
        let missing = host_tls_with(Some("/nonexistent/cert.pem"));
        let err = with_hosts(&format!(
            r#"
            [[docker_hosts]]
            name = "edge"
            url = "tcp://192.0.2.10:2375"
            tls = {tls}

            [[docker_hosts]]
            name = "local"
            url = "agent://192.0.2.11:2376"
            tls = {{ ca = {{ pem = "nonsense" }}, cert = {{ pem = "" }}, key = {{ pem = "" }} }}

            [[docker_hosts]]
            name = "again"
            url = "agent://192.0.2.11:2376"
            tls = {tls}

            [[docker_hosts]]
            name = "files"
            url = "agent://192.0.2.12:2376"
            tls = {missing}

            [[workloads]]
            name = "a"
            host = "nowhere"
            watch = {{ workload = {{ container = "a" }}, idle_timeout = "5m" }}

            [[workloads]]
            name = "b"
            host = "edge"
            watch = {{ workload = {{ container = "b" }}, idle_timeout = "5m", depends_on = [{{ workload = "c" }}] }}

            [[workloads]]
            name = "c"
            watch = {{ workload = {{ container = "c" }}, idle_timeout = "5m" }}
            "#
        ))
        .unwrap_err();
        let all = err.problems.join("\n");
        for expected in [
            "docker_hosts[0] (edge).url: \"tcp://192.0.2.10:2375\": only agent://host:port is supported here",
            "docker_hosts[1].name: \"local\" is the local engine's name",
            "docker_hosts[1] (local).tls.ca: invalid CA certificate PEM",
            "docker_hosts[2] (again).url: 192.0.2.11:2376 is also docker_hosts[1]",
            "docker_hosts[3] (files).tls.cert: /nonexistent/cert.pem: ",
            "workloads[0] (a).host: no docker host named \"nowhere\"",
            "workloads[1] (b).watch.depends_on[0]: \"c\" runs on \"local\", this workload on \"edge\"",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_fields_and_syntax_errors_say_where() {
        let err = GatewayConfig::from_toml("[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nport = 3\n")
            .unwrap_err();
        assert!(err.problems[0].contains("port") && err.problems[0].contains("line 4"), "{err}");
    }
}
