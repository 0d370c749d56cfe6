//! The gateway's client to its upstreams: HTTP/1.1 with a stack of idle keep-alive connections
//! per upstream URL (`host:port`), or HTTP/2 (below), on hyper's connection API, over TCP or
//! over TLS (`https://` URLs: rustls, only the configured CA trusted, ALPN `http/1.1` or `h2`,
//! an optional client certificate).
//!
//! Why not hyper-util's pooled client: it spawns a task for every request to watch the
//! connection become reusable, takes a pool-wide lock twice per request and rebuilds the
//! request's URI; on a proxy's hot path that is a wake-up and a task per request. Here a
//! connection goes back on its URL's stack when the response body ends (the body wrapper
//! does it, on the task that read the body), and the next request takes the most recently used
//! one (warm in cache, and the others can time out).
//!
//! Each URL's stack has its [`ConnLimits`]: a cap on the connections open at once (a request
//! that finds none idle and the cap reached waits for one to come back or to close), a cap on
//! those kept idle, and an idle time-out.
//!
//! What it keeps of the old client's behaviour: `TCP_NODELAY`, upgrades (`101` responses hand
//! the connection to [`hyper::upgrade::on`]), an idle connection closed after its idle time-out
//! (checked when taken, and by a sweep every [`SWEEP_EVERY`]), a request that
//! could not be written on a reused connection the upstream had just closed is sent once more
//! on a new connection (nothing of it reached the upstream), and a `Host` header from the URL
//! when the request has none (an HTTP/2 client's request).
//!
//! **HTTP/2 upstreams** (`http2 = true`: prior knowledge on `http://` URLs, ALPN `h2` on
//! `https://` ones) get one multiplexed connection per URL instead of a stack: it is made by the
//! first request (the others wait for it), carries every request while it is open, and is made
//! again by the next request once it closed. `max_connections` caps the requests in flight on
//! it (a request over the cap waits, as for HTTP/1.1, and gets [`UpstreamError::Busy`] at its
//! deadline); the sweep closes it once no request has used it for `idle_timeout`, or at once
//! when `max_idle` is 0. A request goes out with the client's `Host` as its `:authority` (the
//! URL's when it has none). Trailers pass both ways (gRPC's status is one). While requests are
//! in flight the connection is pinged every `http2_keep_alive`; an unanswered ping closes it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What the client sends: the client's body, streamed, or nothing.
pub(crate) type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, httpserver_pool::BoxError>;

/// The largest response head (its header list, as HTTP/2 counts it) taken from an HTTP/2
/// upstream: about as much as hyper's HTTP/1.1 client reads for one (408 KiB).
const MAX_H2_RESPONSE_HEAD: u32 = 400 * 1024;

/// How often idle connections past their idle time-out are swept out.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The connection limits of one upstream URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnLimits {
    /// Connections open at once (idle or busy).
    pub max_connections: usize,
    /// Idle connections kept; one going idle beyond that is closed.
    pub max_idle: usize,
    /// An idle connection older than this is closed instead of reused.
    pub idle_timeout: Duration,
    /// The longest wait for the next piece of a response body; then the body fails with
    /// [`BodyStalled`] and the connection is closed.
    pub read_timeout: Duration,
    /// HTTP/2 only: how often the connection is pinged while requests are in flight on it, and
    /// how long a ping may go unanswered before the connection is closed (its requests fail;
    /// the next request makes a new one).
    pub http2_keep_alive: Duration,
}

/// A response body the upstream stopped sending: nothing came for its URL's `read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no more of its response body for {0:?}")]
pub(crate) struct BodyStalled(pub Duration);

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("connect to {authority}: {source}")]
    Connect {
        /// The URL's `host:port`.
        authority: Authority,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Every connection the URL may have open (its `max_connections`) stayed busy until the
    /// request's deadline: nothing was sent, and the upstream is not at fault.
    #[error("all {max_connections} connections to {authority} stayed busy")]
    Busy {
        /// The URL's `host:port`.
        authority: Authority,
        /// Its cap.
        max_connections: usize,
    },
    /// The TCP connection was made but the TLS handshake failed (an untrusted or mismatched
    /// certificate, a peer that does not speak TLS): nothing was sent.
    #[error("TLS to {authority}: {source}")]
    Tls {
        /// The URL's `host:port`.
        authority: Authority,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The connection was made but the HTTP exchange failed.
    #[error("HTTP to {authority}: {source}")]
    Http {
        /// The URL's `host:port`.
        authority: Authority,
        /// What went wrong.
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// True if nothing of the request reached the upstream (it may go to another URL).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. } | UpstreamError::Tls { .. })
    }

    /// True if the request's own body failed while it was being sent (the client's upload broke
    /// off, was malformed, or stalled past the listener's body time-out): the client's doing,
    /// not the upstream's. (hyper reports an error of the body it sends as a "user" error with
    /// that error as its source.)
    pub(crate) fn is_request_body(&self) -> bool {
        matches!(self, UpstreamError::Http { source, .. }
            if source.is_user() && std::error::Error::source(source).is_some())
    }

    /// True if the request found the URL at its connection cap until its deadline.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(self, UpstreamError::Busy { .. })
    }
}

/// How an upstream's `https://` URLs are dialled: a rustls client configuration made once from
/// the configured CA (the only roots trusted), optional client certificate, and the name to
/// verify instead of each URL's host.
pub(crate) struct UpstreamTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
    /// What it was made of: stacks are keyed by it, so a reload that reads other bytes (a
    /// certificate renewed in place) dials new connections and lets the old ones close.
    made_of: TlsKey,
}

/// The bytes and name an [`UpstreamTls`] was made of: the CA, the client certificate chain and
/// key, the server name.
type TlsKey = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>, Option<String>);

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Parses the PEM (CA certificates; a client chain and its key) and builds the rustls
    /// configuration (ring, TLS 1.2 and 1.3, ALPN `http/1.1`). An error names the field at
    /// fault (`ca`, `cert`, `key`, `server_name`) and the problem.
    pub(crate) fn new(
        ca: &[u8],
        identity: Option<(&[u8], &[u8])>,
        server_name: Option<&str>,
    ) -> Result<Self, (&'static str, String)> {
        let certificates = |field, pem: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (field, format!("no certificate could be read from the PEM ({e})")))?;
            if certs.is_empty() {
                return Err((field, "no certificate in the PEM".to_owned()));
            }
            Ok(certs)
        };
        let mut roots = RootCertStore::empty();
        for cert in certificates("ca", ca)? {
            roots.add(cert).map_err(|e| ("ca", e.to_string()))?;
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| ("ca", e.to_string()))?
                .with_root_certificates(roots);
        let mut config = match identity {
            Some((chain, key)) => {
                let chain = certificates("cert", chain)?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| ("key", e.to_string()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| ("key", e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = server_name
            .map(|n| ServerName::try_from(n.to_owned()).map_err(|e| ("server_name", format!("{n:?}: {e}"))))
            .transpose()?;
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name: name,
            made_of: (
                ca.to_vec(),
                identity.map(|(chain, key)| (chain.to_vec(), key.to_vec())),
                server_name.map(str::to_owned),
            ),
        })
    }

    /// The name verified in the certificate of `authority`'s upstream: the configured one, or
    /// the URL's host (a DNS name or an IP address).
    pub(crate) fn server_name(&self, authority: &Authority) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} cannot be verified in a certificate ({e}); set tls.server_name"))
    }
}

/// How a stack's connections are made.
enum Dial {
    Tcp,
    /// Over TLS, verifying `name` (an error if the URL's host cannot be verified and no name is
    /// configured: the configuration's check refuses that, so it is never dialled).
    Tls {
        connector: tokio_rustls::TlsConnector,
        name: Result<ServerName<'static>, String>,
    },
}

/// The idle connections of one upstream URL, most recently used last, in one stack per
/// serving thread ([`httpserver_pool::worker_index`]; one more for other threads): a
/// connection's task runs on the thread that opened it, and a request takes a connection of its
/// own thread while there is one, so that the request and its upstream exchange stay on one
/// thread. Another thread's idle connection is taken only at the URL's connection cap.
pub(crate) struct IdleStack {
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// Connections in all of `idle` (for `max_idle`).
    held: AtomicUsize,
    dial: Dial,
    /// The `Host` header for a request that has none: the URL's authority, made once.
    host: Option<HeaderValue>,
    limits: ConnLimits,
    /// One permit per open connection, held by its connection task.
    open: Arc<Semaphore>,
    /// Signalled when a connection goes back on the stack (for a request waiting at the cap).
    returned: Notify,
    /// Set for an HTTP/2 upstream: its one connection (`open` then counts requests in flight).
    h2: Option<H2Conn>,
}

/// The one HTTP/2 connection of a URL.
struct H2Conn {
    /// The connection while it is open, when a request last took it, and its number.
    current: Mutex<Option<(http2::SendRequest<UpstreamBody>, Instant, u64)>>,
    /// Connections made so far (numbers them).
    made: std::sync::atomic::AtomicU64,
    /// Held while a connection is being made, so that one request makes it and the others
    /// wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// `http` or `https`, for the requests' URIs.
    scheme: http::uri::Scheme,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// How many stacks an [`IdleStack`] keeps: one for each core (at least 16; workers beyond
/// share), and one for threads that are not serving workers.
fn shards() -> usize {
    static SHARDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SHARDS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).max(16) + 1)
}

/// The stack of the thread this runs on.
fn shard() -> usize {
    httpserver_pool::worker_index().map_or(0, |i| 1 + i % (shards() - 1))
}

impl IdleStack {
    fn new(dial: Dial, host: Option<HeaderValue>, limits: ConnLimits, http2: bool) -> IdleStack {
        let h2 = http2.then(|| H2Conn {
            current: Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            scheme: if matches!(dial, Dial::Tcp) {
                http::uri::Scheme::HTTP
            } else {
                http::uri::Scheme::HTTPS
            },
        });
        IdleStack {
            idle: (0..shards()).map(|_| Mutex::default()).collect(),
            held: AtomicUsize::new(0),
            dial,
            host,
            limits,
            open: Arc::new(Semaphore::new(limits.max_connections)),
            returned: Notify::new(),
            h2,
        }
    }

    /// A place among the requests in flight on an HTTP/2 URL (its `max_connections`), or
    /// [`UpstreamError::Busy`] at `deadline`.
    async fn h2_place(
        &self,
        authority: &Authority,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(permit) = self.open.clone().try_acquire_owned() {
            return Ok(permit);
        }
        metrics::counter!("gateway_upstream_connection_waits_total", "url" => authority.to_string())
            .increment(1);
        tokio::select! {
            permit = self.open.clone().acquire_owned() => Ok(permit.expect("the semaphore is never closed")),
            () = tokio::time::sleep_until(deadline) => Err(UpstreamError::Busy {
                authority: authority.clone(),
                max_connections: self.limits.max_connections,
            }),
        }
    }

    /// The URL's HTTP/2 connection and its number: the open one, or a new one (made by one
    /// request while the others wait). `stale` is the number of one found closing: it is not
    /// handed out again.
    async fn h2_sender(
        &self,
        h2: &H2Conn,
        authority: &Authority,
        stale: Option<u64>,
    ) -> Result<(http2::SendRequest<UpstreamBody>, u64), UpstreamError> {
        type Current = Option<(http2::SendRequest<UpstreamBody>, Instant, u64)>;
        let usable = |current: &mut Current| {
            let (sender, used, number) = current.as_mut()?;
            if sender.is_closed() || stale == Some(*number) {
                return None;
            }
            *used = Instant::now();
            Some((sender.clone(), *number))
        };
        if let Some(found) = usable(&mut h2.current.lock()) {
            return Ok(found);
        }
        let _making = h2.connecting.lock().await;
        if let Some(found) = usable(&mut h2.current.lock()) {
            return Ok(found);
        }
        let sender = Box::pin(connect_h2(authority, &self.dial, self.limits.http2_keep_alive)).await?;
        let number = h2.made.fetch_add(1, Ordering::Relaxed);
        *h2.current.lock() = Some((sender.clone(), Instant::now(), number));
        Ok((sender, number))
    }

    /// The most recently used idle connection of stack `shard` that is still open and young
    /// enough.
    fn take(&self, shard: usize) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let idle = self.idle[shard].lock().pop()?;
            self.held.fetch_sub(1, Ordering::Relaxed);
            if !idle.sender.is_closed() && idle.since.elapsed() < self.limits.idle_timeout {
                return Some(idle.sender);
            }
        }
    }

    /// An idle connection of another thread's stack than `shard`, and its stack.
    fn take_other(&self, shard: usize) -> Option<(SendRequest<UpstreamBody>, usize)> {
        (0..self.idle.len()).filter(|&i| i != shard).find_map(|i| Some((self.take(i)?, i)))
    }

    /// Puts a connection back on stack `home`, the one of the thread its task runs on.
    fn put(&self, sender: SendRequest<UpstreamBody>, home: usize) {
        if sender.is_closed() {
            return;
        }
        // `max_idle` counts the URL's idle connections in all stacks (one more may slip in when
        // two come back at once).
        if self.held.load(Ordering::Relaxed) < self.limits.max_idle {
            self.held.fetch_add(1, Ordering::Relaxed);
            self.idle[home].lock().push(Idle { sender, since: Instant::now() });
            self.returned.notify_one();
        }
    }

    /// A connection for one request: the most recently used idle one of this thread, a new one
    /// while under the cap, an idle one of another thread, or else the first to come back or
    /// to close (a closed one frees a place under the cap) — [`UpstreamError::Busy`] if none
    /// does by `deadline`. With it: whether it was reused, and the stack it goes back to.
    async fn checkout(
        &self,
        authority: &Authority,
        deadline: Instant,
    ) -> Result<(SendRequest<UpstreamBody>, bool, usize), UpstreamError> {
        let here = shard();
        loop {
            if let Some(sender) = self.take(here) {
                return Ok((sender, true, here));
            }
            let permit = match self.open.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if let Some((sender, home)) = self.take_other(here) {
                        return Ok((sender, true, home));
                    }
                    metrics::counter!("gateway_upstream_connection_waits_total", "url" => authority.to_string())
                        .increment(1);
                    tracing::debug!(upstream = %authority, cap = self.limits.max_connections, "at the connection cap: waiting");
                    // `notify_one` keeps a wake-up for a waiter yet to come, so a connection
                    // returned between `take` and here is not missed.
                    tokio::select! {
                        () = self.returned.notified() => continue,
                        permit = self.open.clone().acquire_owned() => {
                            permit.expect("the semaphore is never closed")
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            return Err(UpstreamError::Busy {
                                authority: authority.clone(),
                                max_connections: self.limits.max_connections,
                            });
                        }
                    }
                }
            };
            // `connect` (a name lookup, a TCP connect, a handshake) is boxed: it is rare next
            // to reusing an idle connection, and inline it would make every request's future
            // larger.
            return Ok((Box::pin(connect(authority, &self.dial, permit)).await?, false, here));
        }
    }

    /// Drops closed and expired connections.
    fn sweep(&self) {
        if let Some(h2) = &self.h2 {
            let idle = self.open.available_permits() == self.limits.max_connections;
            let mut current = h2.current.lock();
            let expired = current.as_ref().is_some_and(|(sender, used, _)| {
                sender.is_closed()
                    || (idle && (self.limits.max_idle == 0 || used.elapsed() >= self.limits.idle_timeout))
            });
            if expired {
                // The connection closes once the last request on it ends.
                current.take();
            }
        }
        for stack in &self.idle {
            let expired: Vec<Idle> = {
                let mut idle = stack.lock();
                let (keep, expired): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|i| !i.sender.is_closed() && i.since.elapsed() < self.limits.idle_timeout);
                *idle = keep;
                self.held.fetch_sub(expired.len(), Ordering::Relaxed);
                expired
            };
            // Closed outside the lock.
            drop(expired);
        }
    }

    /// Idle connections held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.iter().map(|s| s.lock().len()).sum()
    }
}

/// The client: one [`IdleStack`] per upstream URL. Clones share the stacks.
#[derive(Clone, Default)]
pub(crate) struct UpstreamClient {
    stacks: Arc<Stacks>,
}

/// What tells two stacks apart: the URL, its limits, the TLS material it dials with, and
/// whether it speaks HTTP/2.
type StackKey = (Authority, ConnLimits, Option<TlsKey>, bool);

/// The stacks of a client, by URL, limits and TLS.
type Stacks = Mutex<HashMap<StackKey, Arc<IdleStack>>>;

impl UpstreamClient {
    /// A client whose idle connections are swept on the current runtime while it lives.
    pub(crate) fn new() -> Self {
        let client = UpstreamClient::default();
        let stacks = Arc::downgrade(&client.stacks);
        tokio::spawn(sweep(stacks));
        client
    }

    /// The idle stack of `authority` under `limits`, over TCP or over `tls` (made on first
    /// use): a route keeps it, so a request looks nothing up. Upstreams that share a URL with
    /// the same limits and TLS share its stack; otherwise each has its own. The TLS settings
    /// must name a server the URL can be verified as (the configuration's check does it).
    /// With `http2` the URL gets one multiplexed HTTP/2 connection (ALPN `h2` over TLS).
    pub(crate) fn stack(
        &self,
        authority: &Authority,
        limits: ConnLimits,
        tls: Option<&UpstreamTls>,
        http2: bool,
    ) -> Arc<IdleStack> {
        self.stacks
            .lock()
            .entry((authority.clone(), limits, tls.map(|t| t.made_of.clone()), http2))
            .or_insert_with(|| {
                let dial = match tls {
                    None => Dial::Tcp,
                    Some(tls) => {
                        let config = if http2 {
                            let mut config = (*tls.config).clone();
                            config.alpn_protocols = vec![b"h2".to_vec()];
                            Arc::new(config)
                        } else {
                            tls.config.clone()
                        };
                        Dial::Tls {
                            connector: tokio_rustls::TlsConnector::from(config),
                            name: tls.server_name(authority),
                        }
                    }
                };
                Arc::new(IdleStack::new(dial, HeaderValue::from_str(authority.as_str()).ok(), limits, http2))
            })
            .clone()
    }

    /// Forgets the stacks not in `keep` (after a reload); their idle connections close.
    pub(crate) fn retain(&self, keep: &[&Arc<IdleStack>]) {
        let dropped: Vec<Arc<IdleStack>> = {
            let mut stacks = self.stacks.lock();
            let gone: Vec<StackKey> = stacks
                .iter()
                .filter(|(_, stack)| !keep.iter().any(|k| Arc::ptr_eq(k, stack)))
                .map(|(key, _)| key.clone())
                .collect();
            gone.iter().filter_map(|key| stacks.remove(key)).collect()
        };
        drop(dropped);
    }

    /// Sends `req` (origin-form target, HTTP/1.1) to `authority` over an idle connection of
    /// `stack` or a new one, and returns the response head; the connection goes back on the
    /// stack when the response's body has been read to its end. A request that waits at the
    /// URL's connection cap gives up at `deadline` ([`UpstreamError::Busy`]); the caller
    /// bounds the rest (connect, exchange) with the same deadline.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        stack: &Arc<IdleStack>,
        deadline: Instant,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if let Some(h2) = &stack.h2 {
            // Boxed: inline, its state would make every HTTP/1.1 request's future larger too.
            return Box::pin(send_h2(authority, stack, h2, deadline, req)).await;
        }
        if !req.headers().contains_key(header::HOST)
            && let Some(host) = &stack.host
        {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        let http = |source| UpstreamError::Http { authority: authority.clone(), source };
        let (mut sender, reused, mut home) = stack.checkout(authority, deadline).await?;
        let answer = match sender.ready().await {
            Ok(()) => sender.try_send_request(req).await,
            Err(e) if reused => {
                // The idle connection broke while waiting to be taken: a new one.
                tracing::debug!(upstream = %authority, error = %e, "idle upstream connection unusable");
                sender = Box::pin(reconnect(authority, stack)).await?;
                home = shard();
                sender.ready().await.map_err(http)?;
                sender.try_send_request(req).await
            }
            Err(e) => return Err(http(e)),
        };
        let resp = match answer {
            Ok(resp) => resp,
            Err(mut failed) => match failed.take_message() {
                // Not written at all: the upstream closed the reused connection first.
                Some(req) if reused => {
                    sender = Box::pin(reconnect(authority, stack)).await?;
                    home = shard();
                    sender.ready().await.map_err(http)?;
                    sender.try_send_request(req).await.map_err(|e| http(e.into_error()))?
                }
                _ => return Err(http(failed.into_error())),
            },
        };
        let back =
            (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| (sender, stack.clone(), home));
        let mut body = PooledBody {
            inner: None,
            back,
            place: None,
            read_timeout: stack.limits.read_timeout,
            stall: None,
            moved: false,
        };
        let resp = resp.map(|inner| {
            if inner.is_end_stream() {
                body.give_back();
            }
            body.inner = Some(inner);
            body
        });
        Ok(resp)
    }
}

/// Sends `req` on the URL's HTTP/2 connection (see the [module docs](self)); once more on a new
/// connection if the one taken turned out closed before the request went out.
async fn send_h2(
    authority: &Authority,
    stack: &Arc<IdleStack>,
    h2: &H2Conn,
    deadline: Instant,
    mut req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let http = |source| UpstreamError::Http { authority: authority.clone(), source };
    let place = stack.h2_place(authority, deadline).await?;
    // HTTP/2 has no Host header: the client's goes as the request's authority.
    let target = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .unwrap_or_else(|| authority.clone());
    let path =
        req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = http::Uri::builder()
        .scheme(h2.scheme.clone())
        .authority(target)
        .path_and_query(path)
        .build()
        .expect("a scheme, an authority and a path make a URI");
    *req.version_mut() = http::Version::HTTP_2;
    let (mut sender, number) = stack.h2_sender(h2, authority, None).await?;
    let resp = match sender.try_send_request(req).await {
        Ok(resp) => resp,
        Err(mut failed) => match failed.take_message() {
            // Not sent at all: the connection was closing. A new one, once.
            Some(req) => {
                tracing::debug!(upstream = %authority, "HTTP/2 connection closed before the request went out");
                (sender, _) = stack.h2_sender(h2, authority, Some(number)).await?;
                sender.try_send_request(req).await.map_err(|e| http(e.into_error()))?
            }
            None => return Err(http(failed.into_error())),
        },
    };
    let read_timeout = stack.limits.read_timeout;
    Ok(resp.map(|inner| PooledBody {
        inner: Some(inner),
        back: None,
        place: Some(place),
        read_timeout,
        stall: None,
        moved: false,
    }))
}

/// Opens a connection to `authority` (TCP, then TLS with ALPN `h2` if the stack dials it),
/// starts HTTP/2 on it and its connection task.
async fn connect_h2(
    authority: &Authority,
    dial: &Dial,
    keep_alive: Duration,
) -> Result<http2::SendRequest<UpstreamBody>, UpstreamError> {
    let stream = tcp(authority, dial).await?;
    match dial {
        Dial::Tcp => handshake_h2(authority, TokioIo::new(stream), keep_alive).await,
        Dial::Tls { connector, name } => {
            let no_h2 = |detail: &str| UpstreamError::Tls {
                authority: authority.clone(),
                source: std::io::Error::other(format!(
                    "the upstream did not agree to HTTP/2 (ALPN h2){detail}"
                )),
            };
            let stream = match tls_handshake(authority, connector, name, stream).await {
                Err(UpstreamError::Tls { source, .. })
                    if source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some_and(
                        |e| {
                            matches!(
                                e,
                                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
                            )
                        },
                    ) =>
                {
                    return Err(no_h2(&format!(": {source}")));
                }
                other => other?,
            };
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(no_h2(""));
            }
            handshake_h2(authority, TokioIo::new(stream), keep_alive).await
        }
    }
}

/// Starts HTTP/2 on a connection made and its hyper connection task; the connection is
/// pinged every `keep_alive` while requests are in flight and closed when a ping goes
/// unanswered as long (an upstream gone silent does not hold every request to its time-out).
async fn handshake_h2<T>(
    authority: &Authority,
    io: T,
    keep_alive: Duration,
) -> Result<http2::SendRequest<UpstreamBody>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(keep_alive)
        .keep_alive_timeout(keep_alive)
        .keep_alive_while_idle(false)
        // hyper's client default (16 KiB) would refuse response heads that HTTP/1.1 takes.
        .max_header_list_size(MAX_H2_RESPONSE_HEAD)
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Http { authority: authority.clone(), source })?;
    let upstream = authority.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %upstream, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// A TCP connection to `authority` (port 80 or 443 by default, as `dial` says), no-delay.
async fn tcp(authority: &Authority, dial: &Dial) -> Result<TcpStream, UpstreamError> {
    let failed = |source| UpstreamError::Connect { authority: authority.clone(), source };
    let default_port = if matches!(dial, Dial::Tcp) { 80 } else { 443 };
    let port = authority.port_u16().unwrap_or(default_port);
    let stream = TcpStream::connect((authority.host().trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(failed)?;
    stream.set_nodelay(true).map_err(failed)?;
    Ok(stream)
}

/// The TLS handshake on `stream`, verifying `name`.
async fn tls_handshake(
    authority: &Authority,
    connector: &tokio_rustls::TlsConnector,
    name: &Result<ServerName<'static>, String>,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let tls = |source| UpstreamError::Tls { authority: authority.clone(), source };
    let name = name.clone().map_err(|e| tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    connector.connect(name, stream).await.map_err(tls)
}

/// A new connection in place of a reused one that turned out broken (its task ends, freeing
/// its place under the cap).
async fn reconnect(
    authority: &Authority,
    stack: &IdleStack,
) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
    let permit = stack.open.clone().acquire_owned().await.expect("the semaphore is never closed");
    connect(authority, &stack.dial, permit).await
}

/// Opens a connection to `authority` (TCP, then TLS if the stack dials it) and starts its
/// hyper connection task (with upgrades), which holds `permit` (its place under the URL's cap)
/// until the connection ends.
async fn connect(
    authority: &Authority,
    dial: &Dial,
    permit: OwnedSemaphorePermit,
) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
    let stream = tcp(authority, dial).await?;
    match dial {
        Dial::Tcp => handshake(authority, TokioIo::new(stream), permit).await,
        Dial::Tls { connector, name } => {
            let stream = tls_handshake(authority, connector, name, stream).await?;
            handshake(authority, TokioIo::new(stream), permit).await
        }
    }
}

/// Starts HTTP/1.1 on a connection made and its hyper connection task.
async fn handshake<T>(
    authority: &Authority,
    io: T,
    permit: OwnedSemaphorePermit,
) -> Result<SendRequest<UpstreamBody>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Http { authority: authority.clone(), source })?;
    let upstream = authority.clone();
    tokio::spawn(async move {
        let _place = permit;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %upstream, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Sweeps the client's stacks every [`SWEEP_EVERY`] until the client is gone.
async fn sweep(stacks: Weak<Stacks>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(stacks) = stacks.upgrade() else { return };
        let all: Vec<Arc<IdleStack>> = stacks.lock().values().cloned().collect();
        drop(stacks);
        for stack in all {
            stack.sweep();
        }
    }
}

/// A response body from the upstream; at its end the connection goes back on its stack. A body
/// dropped before its end, or that fails (the upstream closed the connection mid-body), closes
/// the connection (hyper cannot reuse it). The client still gets the response's head when the
/// body fails at once: `httpserver-pool` holds a body's error back for one poll, so hyper
/// flushes the head first.
pub(crate) struct PooledBody {
    inner: Option<Incoming>,
    back: Option<(SendRequest<UpstreamBody>, Arc<IdleStack>, usize)>,
    /// An HTTP/2 request's place under its URL's `max_connections`, held while its body lasts.
    place: Option<OwnedSemaphorePermit>,
    read_timeout: Duration,
    /// Armed the first time the upstream makes the body wait (a body that is there with its
    /// head never needs it); moved on when a wait follows a frame.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").field("returns_connection", &self.back.is_some()).finish_non_exhaustive()
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((sender, stack, home)) = self.back.take() {
            stack.put(sender, home);
        }
        // An HTTP/2 request's place frees as its body ends.
        drop(self.place.take());
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = httpserver_pool::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, httpserver_pool::BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame.map(|f| f.map_err(Into::into)),
            Poll::Pending => {
                let at = Instant::now() + this.read_timeout;
                match &mut this.stall {
                    None => this.stall = Some(Box::pin(tokio::time::sleep_until(at))),
                    Some(stall) if this.moved => stall.as_mut().reset(at),
                    Some(_) => {}
                }
                this.moved = false;
                let stall = this.stall.as_mut().expect("armed above");
                std::task::ready!(stall.as_mut().poll(cx));
                Some(Err(BodyStalled(this.read_timeout).into()))
            }
        };
        this.moved = true;
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.inner.as_ref().is_some_and(Body::is_end_stream) => this.give_back(),
            Some(Ok(_)) => {}
            Some(Err(_)) => {
                // The connection is broken or stalled: it does not go back (dropped here, hyper
                // closes it), and the body ends here.
                this.back = None;
                this.inner = None;
                this.stall = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const LIMITS: ConnLimits = ConnLimits {
        max_connections: 1024,
        max_idle: 256,
        idle_timeout: Duration::from_secs(90),
        read_timeout: Duration::from_secs(60),
        http2_keep_alive: Duration::from_secs(10),
    };

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn empty() -> UpstreamBody {
        Empty::new().map_err(Into::into).boxed()
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        Request::get(path).body(empty()).unwrap()
    }

    /// An upstream that answers `ok` to each request head, keeping connections open; counts
    /// the connections it accepted.
    async fn upstream() -> (Authority, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (authority, accepted)
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_is_read() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        for _ in 0..5 {
            let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(stack.len(), 1);
    }

    #[tokio::test]
    async fn requests_over_the_cap_wait_for_a_connection_and_all_are_answered() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack =
            client.stack(&authority, ConnLimits { max_connections: 2, max_idle: 2, ..LIMITS }, None, false);
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            all.spawn(async move {
                let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
                // Holds its connection a moment, so that the others find the cap reached.
                tokio::task::yield_now().await;
                resp.into_body().collect().await.unwrap().to_bytes()
            });
        }
        while let Some(body) = all.join_next().await {
            assert_eq!(&body.unwrap()[..], b"ok");
        }
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2, "never more than the cap open");
    }

    #[test]
    fn a_request_that_waits_at_the_cap_is_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let authority = metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let (authority, _) = upstream().await;
                let client = UpstreamClient::new();
                let stack = client.stack(
                    &authority,
                    ConnLimits { max_connections: 1, max_idle: 1, ..LIMITS },
                    None,
                    false,
                );
                let first = client.send(&authority, &stack, later(), get("/")).await.unwrap();
                let second = tokio::spawn({
                    let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
                    async move {
                        client
                            .send(&authority, &stack, later(), get("/"))
                            .await
                            .unwrap()
                            .into_body()
                            .collect()
                            .await
                    }
                });
                tokio::task::yield_now().await;
                first.into_body().collect().await.unwrap();
                second.await.unwrap().unwrap();
                authority
            })
        });
        let text = handle.render();
        assert!(
            text.contains(&format!("gateway_upstream_connection_waits_total{{url=\"{authority}\"}} 1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_request_still_at_the_cap_at_its_deadline_is_busy_and_sends_nothing() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack =
            client.stack(&authority, ConnLimits { max_connections: 1, max_idle: 1, ..LIMITS }, None, false);
        // Holds the only connection (its body unread).
        let first = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        let e = client.send(&authority, &stack, deadline, get("/")).await.unwrap_err();
        assert!(e.is_busy() && !e.is_connect(), "{e:?}");
        assert!(Instant::now() >= deadline, "given up at the deadline, not before");
        assert_eq!(e.to_string(), format!("all 1 connections to {authority} stayed busy"));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "no second connection");
        // The held connection is fine and goes back once read.
        first.into_body().collect().await.unwrap();
        assert_eq!(stack.len(), 1);
    }

    #[tokio::test]
    async fn a_connection_that_closes_frees_its_place_under_the_cap() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack =
            client.stack(&authority, ConnLimits { max_connections: 1, max_idle: 1, ..LIMITS }, None, false);
        let first = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        let waiting = tokio::spawn({
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            async move {
                client.send(&authority, &stack, later(), get("/")).await.unwrap().into_body().collect().await
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the second request waits at the cap");
        // Dropped unread: its connection closes, and the waiting request opens another.
        drop(first);
        assert_eq!(&waiting.await.unwrap().unwrap().to_bytes()[..], b"ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_early_does_not_give_its_connection_back() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        drop(resp);
        assert_eq!(stack.len(), 0);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_all_come_back() {
        let (authority, accepted) = upstream().await;
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            all.spawn(async move {
                let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
                resp.into_body().collect().await.unwrap();
            });
        }
        all.join_all().await;
        let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=8).contains(&opened));
        assert_eq!(stack.len(), opened);
    }

    #[tokio::test]
    async fn a_worker_reuses_its_own_connections_and_takes_another_s_only_at_the_cap() {
        let (authority, accepted) = upstream().await;
        let workers = httpserver_pool::Workers::start(2, "up").unwrap();
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, ConnLimits { max_connections: 2, ..LIMITS }, None, false);
        // A request on worker `w`; its body is read to the end after `hold` is released.
        let on = |w: usize, hold: Option<tokio::sync::oneshot::Receiver<()>>| {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            workers.handle(w).unwrap().spawn(async move {
                let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
                if let Some(hold) = hold {
                    let _ = hold.await;
                }
                resp.into_body().collect().await.unwrap();
                shard()
            })
        };
        let opened = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let held = |shard: usize| stack.idle[shard].lock().len();
        let zero = on(0, None).await.unwrap();
        assert_eq!(on(0, None).await.unwrap(), zero);
        assert_eq!((opened(), held(zero)), (1, 1), "worker 0 reused its connection");
        // Worker 1, under the cap, opens its own rather than take worker 0's.
        let one = on(1, None).await.unwrap();
        assert_ne!(one, zero);
        assert_eq!((opened(), held(zero), held(one)), (2, 1, 1));
        // At the cap, with its own connection busy, worker 1 takes worker 0's idle one, which
        // goes back to worker 0's stack (its task runs there).
        let (release, hold) = tokio::sync::oneshot::channel();
        let busy = on(1, Some(hold));
        eventually_true(|| held(one) == 0).await;
        tokio::time::timeout(Duration::from_secs(10), on(1, None))
            .await
            .expect("worker 1 took worker 0's idle connection rather than wait for its own")
            .unwrap();
        release.send(()).unwrap();
        busy.await.unwrap();
        assert_eq!((opened(), held(zero), held(one)), (2, 1, 1), "no connection over the cap");
    }

    /// Waits (within 10 s) for `cond`.
    async fn eventually_true(cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the condition within 10 s");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
        // An upstream that answers one request per connection and closes it without saying so.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                });
            }
        });
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        for _ in 0..20 {
            let resp = client
                .send(&authority, &stack, later(), get("/"))
                .await
                .expect("a new connection when the idle one closed");
            assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_fails_and_its_connection_does_not_go_back() {
        // Announces 10 bytes, sends 2, closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok").await;
        });
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        let mut body = client.send(&authority, &stack, later(), get("/")).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ok");
        assert!(body.frame().await.unwrap().is_err(), "the body is cut short");
        assert!(body.frame().await.is_none(), "and ends there");
        assert!(body.is_end_stream());
        assert_eq!(stack.len(), 0, "a broken connection does not go back");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        let e = client.send(&authority, &stack, later(), get("/")).await.unwrap_err();
        assert!(e.is_connect());
        assert!(e.to_string().contains(authority.as_str()), "{e}");
    }

    #[tokio::test]
    async fn a_request_without_host_gets_the_urls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let head = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            // The connection stays open (returned with the head).
            (String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase(), s)
        });
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, false);
        let body = Full::new(Bytes::from_static(b"x")).map_err(Into::into).boxed();
        let resp = client
            .send(&authority, &stack, later(), Request::post("/p?q=1").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        // A body-less response gives the connection back at once.
        assert_eq!(stack.len(), 1);
        let (head, _open) = head.await.unwrap();
        assert!(head.starts_with("post /p?q=1 http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {authority}\r\n")), "{head}");
    }

    /// What a TLS test upstream saw: requests answered, the server names clients sent (SNI).
    #[derive(Default)]
    struct Seen {
        requests: std::sync::atomic::AtomicUsize,
        names: parking_lot::Mutex<Vec<String>>,
    }

    /// A test upstream's rustls configuration: `pair`'s certificate; with `client_ca`, only
    /// clients with a certificate that CA signed get through the handshake.
    fn server_config(pair: &test_support::tls::Pair, client_ca: Option<&str>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain =
            CertificateDer::pem_slice_iter(pair.cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        builder.with_single_cert(chain, key).unwrap()
    }

    /// An HTTPS upstream (rustls, hyper) with `pair`'s certificate, answering `ok`; with
    /// `client_ca`, only clients with a certificate that CA signed get through the handshake.
    async fn tls_upstream(pair: &test_support::tls::Pair, client_ca: Option<&str>) -> (Authority, Arc<Seen>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(pair, client_ca)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, seen) = (acceptor.clone(), counts.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    seen.names.lock().push(tls.get_ref().1.server_name().unwrap_or_default().to_owned());
                    let service = hyper::service::service_fn(move |_req| {
                        seen.requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (authority, seen)
    }

    fn tls_of(
        ca: &test_support::tls::TestCa,
        identity: Option<&test_support::tls::Pair>,
        name: Option<&str>,
    ) -> UpstreamTls {
        let files = crate::config::ClientTls {
            ca: httpserver_pool::PemSource::Pem(ca.pem.clone()),
            cert: identity.map(|p| httpserver_pool::PemSource::Pem(p.cert.clone())),
            key: identity.map(|p| httpserver_pool::PemSource::Pem(p.key.clone())),
            server_name: name.map(str::to_owned),
        };
        files.read().unwrap().upstream(name).unwrap()
    }

    async fn ok_body(resp: Response<PooledBody>) -> Bytes {
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn an_https_upstream_is_verified_by_the_configured_ca_and_its_connection_reused() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let (authority, seen) = tls_upstream(&ca.issue(&["127.0.0.1"]), None).await;
        let client = UpstreamClient::new();
        let tls = tls_of(&ca, None, None);
        let stack = client.stack(&authority, LIMITS, Some(&tls), false);
        for _ in 0..3 {
            let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
            assert_eq!(&ok_body(resp).await[..], b"ok");
        }
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(seen.names.lock().len(), 1, "one TLS connection, kept alive");
        // An IP address is verified against the certificate but sent as no SNI name.
        assert_eq!(seen.names.lock()[0], "");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_the_handshake_and_nothing_is_sent() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let other = test_support::tls::TestCa::new("someone else");
        let (authority, seen) = tls_upstream(&other.issue(&["127.0.0.1"]), None).await;
        let client = UpstreamClient::new();
        let tls = tls_of(&ca, None, None);
        let stack = client.stack(&authority, LIMITS, Some(&tls), false);
        let e = client.send(&authority, &stack, later(), get("/")).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Tls { .. }) && e.is_connect(), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(authority.as_str()) && text.contains("UnknownIssuer"), "{text}");
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_name_the_certificate_lacks_is_refused_and_the_configured_one_is_verified_and_sent() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let (authority, seen) = tls_upstream(&ca.issue(&["app.internal"]), None).await;
        let client = UpstreamClient::new();
        let by_address = tls_of(&ca, None, None);
        let stack = client.stack(&authority, LIMITS, Some(&by_address), false);
        let e = client.send(&authority, &stack, later(), get("/")).await.unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
        let named = tls_of(&ca, None, Some("app.internal"));
        let stack = client.stack(&authority, LIMITS, Some(&named), false);
        assert_eq!(
            &ok_body(client.send(&authority, &stack, later(), get("/")).await.unwrap()).await[..],
            b"ok"
        );
        assert_eq!(seen.names.lock().as_slice(), ["app.internal"]);
    }

    #[tokio::test]
    async fn an_upstream_that_requires_a_client_certificate_gets_the_configured_one() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let clients = test_support::tls::TestCa::new("gateways");
        let (authority, seen) = tls_upstream(&ca.issue(&["127.0.0.1"]), Some(&clients.pem)).await;
        let client = UpstreamClient::new();
        // Without a certificate the upstream ends the handshake: no request is answered.
        let anonymous = tls_of(&ca, None, None);
        let stack = client.stack(&authority, LIMITS, Some(&anonymous), false);
        client.send(&authority, &stack, later(), get("/")).await.unwrap_err();
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
        let identity = clients.issue(&["gateway.test"]);
        let mutual = tls_of(&ca, Some(&identity), None);
        let stack = client.stack(&authority, LIMITS, Some(&mutual), false);
        assert_eq!(
            &ok_body(client.send(&authority, &stack, later(), get("/")).await.unwrap()).await[..],
            b"ok"
        );
    }

    #[tokio::test]
    async fn stacks_differ_by_tls_material_and_retain_keeps_only_those_in_use() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let renewed = test_support::tls::TestCa::new("upstreams, renewed");
        let authority: Authority = "127.0.0.1:9".parse().unwrap();
        let client = UpstreamClient::new();
        let (a, b) = (tls_of(&ca, None, None), tls_of(&ca, None, None));
        let first = client.stack(&authority, LIMITS, Some(&a), false);
        assert!(
            Arc::ptr_eq(&first, &client.stack(&authority, LIMITS, Some(&b), false)),
            "same bytes, same stack"
        );
        let other = client.stack(&authority, LIMITS, Some(&tls_of(&renewed, None, None)), false);
        assert!(!Arc::ptr_eq(&first, &other));
        let plain = client.stack(&authority, LIMITS, None, false);
        assert!(!Arc::ptr_eq(&first, &plain) && !Arc::ptr_eq(&other, &plain));
        client.retain(&[&other]);
        assert_eq!(client.stacks.lock().len(), 1);
        assert!(Arc::ptr_eq(
            &other,
            &client.stack(&authority, LIMITS, Some(&tls_of(&renewed, None, None)), false)
        ));
    }

    /// An upstream that answers its one request with a head for 12 bytes, then sends them in
    /// pieces of `piece` bytes every `gap`, and stalls for good after `sent` of them.
    async fn trickling_upstream(piece: usize, gap: Duration, sent: usize) -> Authority {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n").await.unwrap();
            for chunk in b"abcdefghijkl".chunks(piece).take(sent) {
                tokio::time::sleep(gap).await;
                s.write_all(chunk).await.unwrap();
            }
            // Holds the connection open, silent.
            std::future::pending::<()>().await;
        });
        authority
    }

    #[tokio::test]
    async fn a_response_body_that_stalls_fails_at_the_read_timeout_and_its_connection_closes() {
        let authority = trickling_upstream(3, Duration::ZERO, 2).await;
        let client = UpstreamClient::new();
        let limits = ConnLimits { read_timeout: Duration::from_millis(200), ..LIMITS };
        let stack = client.stack(&authority, limits, None, false);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        let e = resp.into_body().collect().await.unwrap_err();
        assert!(e.downcast_ref::<BodyStalled>().is_some(), "{e}");
        assert!(e.to_string().contains("sent no more of its response body"), "{e}");
        assert_eq!(stack.len(), 0, "a stalled connection is not reused");
    }

    #[tokio::test]
    async fn a_slow_body_that_keeps_coming_is_not_cut_by_the_read_timeout() {
        // 12 pieces 100 ms apart: 1.2 s in all, each wait well under the 1 s read time-out.
        let authority = trickling_upstream(1, Duration::from_millis(100), 12).await;
        let client = UpstreamClient::new();
        let limits = ConnLimits { read_timeout: Duration::from_secs(1), ..LIMITS };
        let stack = client.stack(&authority, limits, None, false);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"abcdefghijkl");
        assert_eq!(stack.len(), 1, "a whole body gives its connection back");
    }

    // ---- HTTP/2 upstreams --------------------------------------------------------------

    /// What an HTTP/2 test upstream saw: connections accepted, and each request's version,
    /// URI and `te` header.
    #[derive(Default)]
    struct H2Seen {
        connections: std::sync::atomic::AtomicUsize,
        requests: parking_lot::Mutex<Vec<(http::Version, String, Option<String>)>>,
    }

    /// An HTTP/2 upstream (hyper) over `tls` when given (ALPN `h2`, or `alpn` instead), else
    /// h2c: answers `ok` with the trailer `grpc-status: 0`, after `delay`.
    async fn h2_upstream(
        tls: Option<(&test_support::tls::Pair, &[&[u8]])>,
        delay: Duration,
    ) -> (Authority, Arc<H2Seen>) {
        let acceptor = tls.map(|(pair, alpn)| {
            let mut config = server_config(pair, None);
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let seen = Arc::new(H2Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counts.connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), counts.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let te = req.headers().get(header::TE).map(|v| v.to_str().unwrap().to_owned());
                        seen.requests.lock().push((req.version(), req.uri().to_string(), te));
                        async move {
                            tokio::time::sleep(delay).await;
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                            let frames = futures_util::stream::iter([
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ok"))),
                                Ok(Frame::trailers(trailers)),
                            ]);
                            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::StreamBody::new(
                                frames,
                            )))
                        }
                    });
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    let _ = match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            builder.serve_connection(TokioIo::new(tls), service).await
                        }
                        None => builder.serve_connection(TokioIo::new(tcp), service).await,
                    };
                });
            }
        });
        (authority, seen)
    }

    /// The body's data and its trailers.
    async fn body_and_trailers(resp: Response<PooledBody>) -> (Bytes, Option<http::HeaderMap>) {
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn an_http2_upstream_gets_every_request_on_one_connection_with_trailers_back() {
        let (authority, seen) = h2_upstream(None, Duration::from_millis(20)).await;
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, true);
        let requests = (0..20).map(|i| {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            async move {
                let mut req = get(&format!("/svc/Method?n={i}"));
                req.headers_mut().insert(header::HOST, HeaderValue::from_static("api.example"));
                req.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
                client.send(&authority, &stack, later(), req).await.unwrap()
            }
        });
        for resp in futures_util::future::join_all(requests).await {
            assert_eq!(resp.status(), 200);
            let (body, trailers) = body_and_trailers(resp).await;
            assert_eq!(&body[..], b"ok");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
        }
        assert_eq!(seen.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "multiplexed");
        let requests = seen.requests.lock();
        assert_eq!(requests.len(), 20);
        for (version, uri, te) in requests.iter() {
            assert_eq!(*version, http::Version::HTTP_2);
            // The client's Host is the request's authority.
            assert!(uri.starts_with("http://api.example/svc/Method?n="), "{uri}");
            assert_eq!(te.as_deref(), Some("trailers"));
        }
        // Every place under the cap is free again.
        assert_eq!(stack.open.available_permits(), LIMITS.max_connections);
    }

    #[tokio::test]
    async fn http2_requests_over_the_cap_wait_and_one_still_waiting_at_its_deadline_is_busy() {
        let (authority, seen) = h2_upstream(None, Duration::from_millis(300)).await;
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, ConnLimits { max_connections: 2, ..LIMITS }, None, true);
        let send = |deadline: Instant| {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            tokio::spawn(async move {
                let resp = client.send(&authority, &stack, deadline, get("/")).await?;
                Ok::<_, UpstreamError>(body_and_trailers(resp).await.0)
            })
        };
        let (a, b) = (send(later()), send(later()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Both places taken: the third waits, and past its deadline gets Busy having sent nothing.
        let err = send(Instant::now() + Duration::from_millis(50)).await.unwrap().unwrap_err();
        assert!(err.is_busy(), "{err:?}");
        // A fourth with time waits for a place and is answered.
        let d = send(later());
        for task in [a, b, d] {
            assert_eq!(&task.await.unwrap().unwrap()[..], b"ok");
        }
        assert_eq!(seen.requests.lock().len(), 3);
    }

    #[tokio::test]
    async fn a_closed_http2_connection_is_made_again_and_an_idle_one_is_swept() {
        let (authority, seen) = h2_upstream(None, Duration::ZERO).await;
        let client = UpstreamClient::new();
        let limits = ConnLimits { idle_timeout: Duration::from_millis(100), ..LIMITS };
        let stack = client.stack(&authority, limits, None, true);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        assert_eq!(&body_and_trailers(resp).await.0[..], b"ok");
        // Idle past its idle time-out: the sweep lets it go; the next request makes another.
        tokio::time::sleep(Duration::from_millis(150)).await;
        stack.sweep();
        assert!(stack.h2.as_ref().unwrap().current.lock().is_none());
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        assert_eq!(&body_and_trailers(resp).await.0[..], b"ok");
        assert_eq!(seen.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
        // With max_idle = 0 it goes at the first sweep after its last request.
        let stack = client.stack(&authority, ConnLimits { max_idle: 0, ..LIMITS }, None, true);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        assert_eq!(&body_and_trailers(resp).await.0[..], b"ok");
        stack.sweep();
        assert!(stack.h2.as_ref().unwrap().current.lock().is_none());
    }

    #[tokio::test]
    async fn an_http2_upstream_that_went_away_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, true);
        let err = client.send(&authority, &stack, later(), get("/")).await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert_eq!(stack.open.available_permits(), LIMITS.max_connections, "its place is free again");
    }

    #[tokio::test]
    async fn an_https_http2_upstream_is_reached_by_alpn_and_one_without_h2_is_refused() {
        let ca = test_support::tls::TestCa::new("upstreams");
        let pair = ca.issue(&["127.0.0.1"]);
        let tls = tls_of(&ca, None, None);
        let client = UpstreamClient::new();

        let (authority, seen) = h2_upstream(Some((&pair, &[b"h2"])), Duration::ZERO).await;
        let stack = client.stack(&authority, LIMITS, Some(&tls), true);
        let resp = client.send(&authority, &stack, later(), get("/x")).await.unwrap();
        let (body, trailers) = body_and_trailers(resp).await;
        assert_eq!((&body[..], trailers.unwrap()["grpc-status"].to_str().unwrap()), (&b"ok"[..], "0"));
        assert!(seen.requests.lock()[0].1.starts_with("https://"), "{:?}", seen.requests.lock());

        // A server that offers only HTTP/1.1: the handshake is refused by ALPN, nothing sent.
        let (authority, seen) = h2_upstream(Some((&pair, &[b"http/1.1"])), Duration::ZERO).await;
        let stack = client.stack(&authority, LIMITS, Some(&tls), true);
        let err = client.send(&authority, &stack, later(), get("/x")).await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert!(err.to_string().contains("HTTP/2"), "{err}");
        assert!(seen.requests.lock().is_empty());
    }

    /// A TCP relay to `to` that forwards both ways until `frozen` is set; from then on it
    /// forwards nothing more but keeps every connection open (an upstream gone silent).
    async fn relay(to: Authority, frozen: Arc<std::sync::atomic::AtomicBool>) -> Authority {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect(to.as_str()).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                    let frozen = frozen.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                // Silent from now on; the task keeps both sockets open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        authority
    }

    #[tokio::test]
    async fn an_http2_upstream_gone_silent_is_found_by_its_pings_and_replaced() {
        let (upstream, seen) = h2_upstream(None, Duration::from_secs(3600)).await;
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let authority = relay(upstream, frozen.clone()).await;
        let client = UpstreamClient::new();
        let limits = ConnLimits { http2_keep_alive: Duration::from_millis(200), ..LIMITS };
        let stack = client.stack(&authority, limits, None, true);
        let send = || {
            let (client, stack, authority) = (client.clone(), stack.clone(), authority.clone());
            tokio::spawn(async move { client.send(&authority, &stack, later(), get("/")).await.map(|_| ()) })
        };
        // A request in flight (the upstream answers in an hour), then silence on the wire.
        let waiting = send();
        let connections = || seen.connections.load(std::sync::atomic::Ordering::SeqCst);
        eventually_true(|| seen.requests.lock().len() == 1).await;
        frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        // An unanswered ping closes the connection: the request fails instead of waiting its
        // hour (the bound is only for a busy machine).
        let failed = tokio::time::timeout(Duration::from_secs(30), waiting).await.expect("not held").unwrap();
        assert!(matches!(failed, Err(UpstreamError::Http { .. })), "{failed:?}");
        // The next request makes a new connection.
        frozen.store(false, std::sync::atomic::Ordering::SeqCst);
        let next = send();
        eventually_true(|| connections() == 2 && seen.requests.lock().len() == 2).await;
        next.abort();
    }

    #[tokio::test]
    async fn an_http2_response_head_as_large_as_http1_takes_gets_through() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                // 64 KiB of cookies: four times hyper's own HTTP/2 client limit.
                for i in 0..64 {
                    let value = HeaderValue::from_str(&format!("c{i}={}", "x".repeat(1000))).unwrap();
                    resp.headers_mut().append(header::SET_COOKIE, value);
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(1 << 20)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        let client = UpstreamClient::new();
        let stack = client.stack(&authority, LIMITS, None, true);
        let resp = client.send(&authority, &stack, later(), get("/")).await.unwrap();
        assert_eq!(resp.headers().get_all(header::SET_COOKIE).iter().count(), 64);
        assert_eq!(&body_and_trailers(resp).await.0[..], b"ok");
    }
}
