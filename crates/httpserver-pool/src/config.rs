//! Server and pool configuration (serde + humantime durations) and its validation.
//!
//! `validate()` collects every problem before it returns, so one run shows them all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::addr::canonical;
use crate::tls::{TlsConfig, TlsMaterial};
use crate::{Error, Handler, Problem, Workers};

/// The smallest header buffer hyper accepts (`max_buf_size` panics below it).
pub const MIN_HEADER_SIZE: usize = 8192;

/// Timeouts of one server. `None` disables a timeout; durations read as humantime text
/// (`"30s"`, `"2m"`, `"1s 500ms"`); zero is refused by validation (leave a timeout out, or set
/// it to `null`, to disable it).
///
/// | field | meaning | default |
/// |---|---|---|
/// | `header_read` | TLS handshake, and each HTTP/1 request head; the first request on a connection that may speak HTTP/2 | 30 s |
/// | `idle` | no request in flight: graceful close | 120 s |
/// | `body_read` | the handler waits for request body data that does not come | 30 s |
/// | `request` | the handler has not answered: 503 | none |
/// | `shutdown` | drain deadline of a stop | 30 s |
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time allowed to receive a request's headers (HTTP/1) and to finish the TLS handshake.
    /// On HTTP/1 it counts from when the connection begins to wait for a request (when it opens,
    /// or when the previous response has been sent), so a keep-alive connection that stays silent
    /// this long is closed too, as hyper does; bytes trickling in do not restart it (slowloris).
    /// On a connection that may speak HTTP/2 (TLS with `http2`, or `h2c`), the first request,
    /// whatever its protocol, must also arrive within it: a client that connects and asks for
    /// nothing is closed, not kept until the idle timeout. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub header_read: Option<Duration>,
    /// A connection with no request in flight for this long is closed gracefully (HTTP/1: at
    /// once; HTTP/2: GOAWAY, and closed at once if the client has not completed the close when
    /// as long again has passed). A request is in flight until its response body has been sent.
    /// Default 120 s.
    #[serde(with = "humantime_serde")]
    pub idle: Option<Duration>,
    /// The longest a handler waits for the next piece of a request body that the client has not
    /// sent yet; then the body yields [`RequestBodyError::TimedOut`](crate::RequestBodyError)
    /// (see [`RequestBody`](crate::RequestBody)). Each piece that arrives restarts the clock,
    /// so a large upload at a steady pace is never cut; a slow or stalled one (a "slow POST")
    /// is. A handler that reads no body is not affected. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub body_read: Option<Duration>,
    /// A handler that has not answered after this long is dropped and the client gets 503.
    /// Default none (long polls are the handler's business).
    #[serde(with = "humantime_serde")]
    pub request: Option<Duration>,
    /// The drain deadline of [`Lifecycle::stop`](pool_api::Lifecycle::stop): work still running
    /// then is cut off. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Some(Duration::from_secs(30)),
            idle: Some(Duration::from_secs(120)),
            body_read: Some(Duration::from_secs(30)),
            request: None,
            shutdown: Duration::from_secs(30),
        }
    }
}

/// Caps on what clients may hold of one server: connections (in all, and per client address)
/// and HTTP/2 streams, with HTTP/2 keep-alive to find dead peers. Every cap has a safe default;
/// see [`HttpServerConfig`] for the whole list of limits (time-outs and header size included).
///
/// A connection accepted beyond a connection cap is closed at once with a TCP reset, before
/// any byte is read from it: it is neither queued nor left hanging, and the connections already
/// open are not disturbed. Such refusals are counted
/// ([`CounterSnapshot::refused`](crate::CounterSnapshot::refused)). Once the open connections
/// close (idle ones do on their own, see [`Timeouts`]), new ones are accepted again.
///
/// | field | meaning | default |
/// |---|---|---|
/// | `max_connections` | connections open at once on the server, upgraded ones included | 10 000 |
/// | `max_connections_per_ip` | the same, per client address (IPv6: per /64 prefix) | none |
/// | `http2_max_concurrent_streams` | streams one HTTP/2 connection may have open at once | 100 |
/// | `http2_keep_alive_interval` | how often an HTTP/2 connection is pinged | 30 s |
/// | `http2_keep_alive_timeout` | how long a ping may go unanswered before the connection is closed | 20 s |
/// | `max_abandoned_requests` | requests a connection's client may give up on before their answer (once they are also most of its requests): then it is closed | 100 |
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The most connections the server keeps open at once, upgraded ones (WebSockets…)
    /// included; `None` for no cap (the process's file-descriptor limit still applies). Default
    /// 10 000.
    pub max_connections: Option<usize>,
    /// The most connections one client address may keep open at once; `None` (the default) for
    /// no per-client cap. IPv4 clients are counted per address (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address), IPv6 clients per /64 prefix, the block one subscriber
    /// usually holds. Off by default because clients behind one proxy or NAT share an address;
    /// set it on servers that clients reach directly.
    pub max_connections_per_ip: Option<usize>,
    /// The most streams (requests) one HTTP/2 connection may have open at once, announced to
    /// the client in its SETTINGS. A stream opened beyond it is refused with `REFUSED_STREAM`
    /// (which clients may safely retry); the connection's other streams proceed. Default 100.
    pub http2_max_concurrent_streams: u32,
    /// The interval between HTTP/2 keep-alive pings on each connection; `None` sends none.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Option<Duration>,
    /// How long an HTTP/2 keep-alive ping may go unanswered before the connection is closed
    /// (a dead or stalled peer). Default 20 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// The requests one connection's client may abandon before their answer begins — on HTTP/2
    /// a stream reset while its handler runs — once they are also more than half of the
    /// connection's requests: then the connection is closed at once. A client that opens
    /// streams and resets them ("rapid reset", CVE-2023-44487) makes the server start work
    /// it never finishes, at no cost to itself; hyper's HTTP/2 limits only the streams reset
    /// before the server took them, this the rest. Browsers cancel now and then, never most of
    /// a connection's requests. Default 100.
    pub max_abandoned_requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Some(10_000),
            max_connections_per_ip: None,
            http2_max_concurrent_streams: 100,
            http2_keep_alive_interval: Some(Duration::from_secs(30)),
            http2_keep_alive_timeout: Duration::from_secs(20),
            max_abandoned_requests: 100,
        }
    }
}

/// Options of the listening socket and of accepted connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketOptions {
    /// `SO_REUSEADDR` on the listener (lets a restarted server bind while old connections sit in
    /// TIME_WAIT). On by default.
    pub reuse_address: bool,
    /// `SO_REUSEPORT` on the listener (Unix): several listeners, e.g. in different pools or
    /// processes, share one port. Off by default.
    pub reuse_port: bool,
    /// The `listen(2)` backlog.
    pub backlog: u32,
    /// `TCP_NODELAY` on accepted connections. On by default.
    pub nodelay: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions { reuse_address: true, reuse_port: false, backlog: 1024, nodelay: true }
    }
}

/// One server.
///
/// # Limits
///
/// Every server runs with limits against clients that hold resources without using them or
/// send more than they should; each has a safe default and can be changed here:
///
/// | where | limit | default |
/// |---|---|---|
/// | [`limits`](Limits) `.max_connections` | connections open at once; more are reset | 10 000 |
/// | [`limits`](Limits) `.max_connections_per_ip` | the same per client address (IPv6: /64) | none |
/// | [`limits`](Limits) `.http2_max_concurrent_streams` | streams per HTTP/2 connection; more are refused | 100 |
/// | [`limits`](Limits) `.http2_keep_alive_interval` / `_timeout` | HTTP/2 pings; an unanswered one closes the connection | 30 s / 20 s |
/// | [`limits`](Limits) `.max_abandoned_requests` | requests given up before their answer (most of the connection's): closed | 100 |
/// | [`timeouts`](Timeouts) `.header_read` | request head (HTTP/1), TLS handshake, first request | 30 s |
/// | [`timeouts`](Timeouts) `.idle` | keep-alive connection with nothing in flight | 120 s |
/// | [`timeouts`](Timeouts) `.body_read` | wait for request body data | 30 s |
/// | [`timeouts`](Timeouts) `.request` | handler answer (503 after) | none |
/// | `max_header_size` | request head size (431 on HTTP/1, stream reset on HTTP/2) | 64 KiB |
///
/// A reload ([`Server::reload`](crate::Server::reload), [`Pool::apply`](crate::Pool::apply))
/// applies new limits to connections accepted from then on; the caps count every open
/// connection, those accepted before the reload included.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpServerConfig {
    /// A name for logs, metrics and filtering.
    pub name: String,
    /// Where to listen (see [`crate::addr`] for the forms accepted).
    pub listen: String,
    /// The public URL of this server (e.g. `https://api.example.com`); defaults to
    /// `http(s)://<bind address>`.
    pub expose: Option<String>,
    /// A disabled server is kept in its pool but never started.
    pub disabled: bool,
    /// TLS; plain HTTP when `None` (unless `tls_mandatory`).
    pub tls: Option<TlsConfig>,
    /// Refuse the configuration when `tls` is missing (on top of the pool's default TLS).
    pub tls_mandatory: bool,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Connection and HTTP/2 stream caps, HTTP/2 keep-alive.
    pub limits: Limits,
    /// The largest request head accepted, in bytes (at least [`MIN_HEADER_SIZE`]); bigger heads
    /// get 431 on HTTP/1 and a stream reset on HTTP/2. Default 64 KiB.
    pub max_header_size: usize,
    /// Serve HTTP/2 (ALPN `h2` on TLS). HTTP/1.1 is always served.
    pub http2: bool,
    /// Serve HTTP/2 over plain TCP with prior knowledge (h2c). Needs `http2`; has no effect on
    /// TLS servers, where HTTP/2 is negotiated with ALPN. With `false` (or `http2 = false`), plain
    /// connections are served by hyper's HTTP/1 connection only: a client that opens with the
    /// HTTP/2 preface gets no answer and the connection is closed. HTTP/1 upgrades
    /// (WebSocket…) work either way; `Upgrade: h2c` is not supported.
    pub h2c: bool,
    /// Socket options.
    pub socket: SocketOptions,
    /// The handler; when `None` the pool's default handler is used.
    #[serde(skip)]
    pub handler: Option<Handler>,
    /// Worker threads to serve the connections on, each accepted connection on the one with
    /// the fewest (see [`Workers`]); when `None`, connections run on the runtime the server was
    /// started on. A reload applies it to connections accepted from then on.
    #[serde(skip)]
    pub workers: Option<Workers>,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        HttpServerConfig {
            name: String::new(),
            listen: String::new(),
            expose: None,
            disabled: false,
            tls: None,
            tls_mandatory: false,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            max_header_size: 64 * 1024,
            http2: true,
            h2c: false,
            socket: SocketOptions::default(),
            handler: None,
            workers: None,
        }
    }
}

impl PartialEq for HttpServerConfig {
    /// Field by field; handlers are equal when they are the same function (same `Arc`), worker
    /// sets when they are the same threads.
    fn eq(&self, other: &Self) -> bool {
        let handlers = match (&self.handler, &other.handler) {
            (Some(a), Some(b)) => a.same_as(b),
            (None, None) => true,
            _ => false,
        };
        let workers = match (&self.workers, &other.workers) {
            (Some(a), Some(b)) => a.same_as(b),
            (None, None) => true,
            _ => false,
        };
        handlers
            && workers
            && self.name == other.name
            && self.listen == other.listen
            && self.expose == other.expose
            && self.disabled == other.disabled
            && self.tls == other.tls
            && self.tls_mandatory == other.tls_mandatory
            && self.timeouts == other.timeouts
            && self.limits == other.limits
            && self.max_header_size == other.max_header_size
            && self.http2 == other.http2
            && self.h2c == other.h2c
            && self.socket == other.socket
    }
}

impl HttpServerConfig {
    /// A configuration with defaults, a name and a listen address.
    pub fn new(name: impl Into<String>, listen: impl Into<String>) -> Self {
        HttpServerConfig { name: name.into(), listen: listen.into(), ..HttpServerConfig::default() }
    }

    /// Sets the handler.
    pub fn with_handler(mut self, handler: Handler) -> Self {
        self.handler = Some(handler);
        self
    }

    /// Serves the connections on `workers` (see [`HttpServerConfig::workers`]).
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Sets TLS.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks everything that can be checked without binding: address, expose URL, TLS files
    /// and that the key fits the certificate, limits and timeouts. Returns every problem.
    pub fn validate(&self) -> Result<(), Error> {
        let problems = self.problems().1;
        if problems.is_empty() { Ok(()) } else { Err(Error::Invalid { problems }) }
    }

    /// The canonical bind address (if it resolves) and the problems found.
    pub(crate) fn problems(&self) -> (Option<SocketAddr>, Vec<Problem>) {
        let label = if self.name.is_empty() {
            format!("<unnamed, listen {:?}>", self.listen)
        } else {
            self.name.clone()
        };
        let mut problems = Vec::new();
        let mut problem = |field: &'static str, message: String| {
            problems.push(Problem { server: label.clone(), field, message })
        };
        if self.name.trim().is_empty() {
            problem("name", "must not be empty".into());
        }
        let bind = match canonical(&self.listen) {
            Ok(bind) => Some(bind),
            Err(e) => {
                problem("listen", e.to_string());
                None
            }
        };
        if let Some(expose) = &self.expose {
            match expose.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {}
                Ok(_) => problem("expose", format!("{expose:?} is not an absolute http(s) URL")),
                Err(e) => problem("expose", format!("{expose:?}: {e}")),
            }
        }
        match &self.tls {
            Some(tls) => {
                if let Err(e) = TlsMaterial::load(&label, tls) {
                    problem("tls", e.to_string());
                }
            }
            None if self.tls_mandatory => problem("tls", "TLS is mandatory but not configured".into()),
            None => {}
        }
        if self.max_header_size < MIN_HEADER_SIZE {
            problem(
                "max_header_size",
                format!("{} is below the minimum {MIN_HEADER_SIZE}", self.max_header_size),
            );
        }
        if self.max_header_size > u32::MAX as usize {
            problem("max_header_size", format!("{} does not fit in 32 bits", self.max_header_size));
        }
        if self.h2c && !self.http2 {
            problem("h2c", "h2c needs http2 enabled".into());
        }
        if self.h2c && self.tls.is_some() {
            problem("h2c", "h2c is plain-text HTTP/2 and cannot be combined with TLS".into());
        }
        let t = &self.timeouts;
        for (field, value) in [
            ("timeouts.header_read", t.header_read),
            ("timeouts.idle", t.idle),
            ("timeouts.body_read", t.body_read),
            ("timeouts.request", t.request),
        ] {
            if value == Some(Duration::ZERO) {
                problem(field, "must be positive (leave it out to disable it)".into());
            }
        }
        let l = &self.limits;
        for (field, value) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if value == Some(0) {
                problem(field, "must be positive (leave it out for no cap)".into());
            }
        }
        if l.max_abandoned_requests == 0 {
            problem("limits.max_abandoned_requests", "must be positive".into());
        }
        if l.http2_max_concurrent_streams == 0 {
            problem("limits.http2_max_concurrent_streams", "must be positive".into());
        }
        if l.http2_keep_alive_interval == Some(Duration::ZERO) {
            problem(
                "limits.http2_keep_alive_interval",
                "must be positive (leave it out to send no pings)".into(),
            );
        }
        if l.http2_keep_alive_timeout.is_zero() {
            problem("limits.http2_keep_alive_timeout", "must be positive".into());
        }
        if self.socket.backlog == 0 {
            problem("socket.backlog", "must be positive".into());
        }
        if self.socket.reuse_port && !cfg!(unix) {
            problem("socket.reuse_port", "only supported on Unix".into());
        }
        (bind, problems)
    }
}

/// The servers of a pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerPoolConfig {
    /// One entry per server.
    pub servers: Vec<HttpServerConfig>,
}

impl ServerPoolConfig {
    /// Validates every server and checks that no two of them resolve to the same address.
    pub fn validate(&self) -> Result<(), Error> {
        let problems = self.problems().1;
        if problems.is_empty() { Ok(()) } else { Err(Error::Invalid { problems }) }
    }

    pub(crate) fn problems(&self) -> (Vec<Option<SocketAddr>>, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut binds = Vec::new();
        let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
        for cfg in &self.servers {
            let (bind, mut p) = cfg.problems();
            problems.append(&mut p);
            if let Some(bind) = bind
                && let Some(first) = seen.insert(bind, &cfg.name)
            {
                problems.push(Problem {
                    server: cfg.name.clone(),
                    field: "listen",
                    message: format!("{bind} is also the address of `{first}` (duplicate bind)"),
                });
            }
            binds.push(bind);
        }
        (binds, problems)
    }
}
