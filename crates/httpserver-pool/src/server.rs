//! One HTTP server: bind, accept loop, connections, graceful stop, in-place reload.
//!
//! Each connection runs under [`drive`], which also keeps its idle timeout and, on connections
//! served by hyper's HTTP/1 connection, its header read timeout, with one timer per connection
//! set from when the last request ended (a request is in flight until its response body has
//! been sent). hyper's own header read timer would cost an allocation and a timer-wheel insertion
//! and removal per request; it is used only on connections that may speak HTTP/2.
//!
//! The settings a connection needs (handler, HTTP builder with its timeouts and limits, TLS
//! acceptor) live in one [`ArcSwap`] snapshot, loaded once per accepted connection: a reload
//! swaps the snapshot, new connections get it, open ones keep theirs. The accept loop owns the
//! stop: it stops accepting, asks every connection to shut down gracefully (HTTP/1: close when
//! idle; HTTP/2: GOAWAY), waits until the last socket closes or the deadline passes, then kills
//! what is left. Handlers are never cancelled before the deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use pool_api::{Lifecycle, LifecycleError, LifecycleState, StopReport};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::accept::AcceptBackoff;
use crate::counters::{CounterSnapshot, Counters};
use crate::drain::{Activity, Caps, Client, RequestGuard, TrackedIo, Tracker};
use crate::filter::{Field, Pattern};
use crate::handler::HandlerFuture;
use crate::tls::TlsMaterial;
use crate::workers;
use crate::{
    BoxError, Error, Handler, HttpServerConfig, Problem, RequestBody, ResponseBody, ShutdownSignal, socket,
    status,
};

/// What a connection needs, swapped as a whole on reload.
struct Live {
    config: HttpServerConfig,
    handler: Handler,
    builder: auto::Builder<TokioExecutor>,
    /// Set when HTTP/2 must not be served on this server's connections (`http2 = false`, or plain
    /// TCP without `h2c`). hyper-util's upgrade-capable auto connection ignores its HTTP/1-only
    /// switch and would still answer an HTTP/2 preface, so such connections go to hyper's own
    /// HTTP/1 connection instead, which closes on a preface without answering.
    http1: Option<http1::Builder>,
    tls: Option<(TlsMaterial, TlsAcceptor)>,
}

impl Live {
    fn build(config: HttpServerConfig) -> Result<(SocketAddr, Live), Error> {
        let (bind, problems) = config.problems();
        if !problems.is_empty() {
            return Err(Error::Invalid { problems });
        }
        let bind = bind.expect("no problem means the address resolved");
        let handler =
            config.handler.clone().ok_or_else(|| Error::MissingHandler { server: config.name.clone() })?;
        let tls = match &config.tls {
            Some(tls) => {
                let material = TlsMaterial::load(&config.name, tls)?;
                let acceptor = TlsAcceptor::from(material.server_config(&config.name, config.http2)?);
                Some((material, acceptor))
            }
            None => None,
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.timeouts.header_read)
            .max_buf_size(config.max_header_size);
        let limits = &config.limits;
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_header_size as u32)
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .keep_alive_interval(limits.http2_keep_alive_interval)
            .keep_alive_timeout(limits.http2_keep_alive_timeout);
        let http1 = (!config.http2 || (tls.is_none() && !config.h2c)).then(|| {
            let mut h1 = http1::Builder::new();
            // The header read timeout of these connections is kept by `drive`, which times the
            // connection's idle spells anyway, rather than by hyper, whose timer costs an
            // allocation and a timer-wheel insertion and removal on every request.
            h1.timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(config.max_header_size);
            h1
        });
        Ok((bind, Live { config, handler, builder, http1, tls }))
    }

    /// Same effective settings: equal configuration and byte-identical TLS material.
    fn same_as(&self, other: &Live) -> bool {
        self.config == other.config
            && match (&self.tls, &other.tls) {
                (Some((a, _)), Some((b, _))) => a == b,
                (None, None) => true,
                _ => false,
            }
    }
}

struct RunHandle {
    shutdown: watch::Sender<Option<Instant>>,
    tracker: Arc<Tracker>,
    task: Option<JoinHandle<StopReport>>,
}

struct Inner {
    bind: SocketAddr,
    /// `bind` as text, formatted once for selection by bind address.
    bind_text: String,
    live: ArcSwap<Live>,
    state: watch::Sender<LifecycleState>,
    run: Mutex<Option<RunHandle>>,
    started: Mutex<Option<Instant>>,
    counters: Arc<Counters>,
}

/// What [`Server::reload`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing differed; nothing was touched.
    Unchanged,
    /// New settings swapped in: new connections use them, open connections keep the old ones.
    Swapped,
    /// Socket options changed, so the running server was stopped and started again.
    Rebound,
    /// The server is now disabled, so it was stopped.
    Stopped,
}

/// A point-in-time view of one server, built from its lifecycle state (no self-dial).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSnapshot {
    /// The server's name.
    pub name: String,
    /// Its canonical bind address.
    pub bind: SocketAddr,
    /// Its public URL.
    pub expose: String,
    /// Its lifecycle state.
    pub state: LifecycleState,
    /// True when it is running (the health a monitor reports).
    pub healthy: bool,
    /// Time since it started, while running.
    pub uptime: Option<Duration>,
    /// Its counters.
    pub counters: CounterSnapshot,
}

/// One HTTP/1 + HTTP/2 server. Cloning gives another handle to the same server.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name()).field("bind", &self.inner.bind).finish()
    }
}

impl Server {
    /// Builds a stopped server after validating `config`. The configuration must carry a handler.
    pub fn new(config: HttpServerConfig) -> Result<Server, Error> {
        let (bind, live) = Live::build(config)?;
        let counters = Arc::new(Counters::new(&live.config.name, bind));
        Ok(Server {
            inner: Arc::new(Inner {
                bind,
                bind_text: bind.to_string(),
                live: ArcSwap::from_pointee(live),
                state: watch::Sender::new(LifecycleState::Stopped),
                run: Mutex::new(None),
                started: Mutex::new(None),
                counters,
            }),
        })
    }

    /// The canonical bind address: the server's key in a pool.
    pub fn bind(&self) -> SocketAddr {
        self.inner.bind
    }

    /// The server's name.
    pub fn name(&self) -> String {
        self.inner.live.load().config.name.clone()
    }

    /// The public URL: `expose` from the configuration, else `http(s)://<bind>`.
    pub fn expose(&self) -> String {
        let live = self.inner.live.load();
        match &live.config.expose {
            Some(url) => url.clone(),
            None => format!("{}://{}", if live.tls.is_some() { "https" } else { "http" }, self.inner.bind),
        }
    }

    /// True when `field` matches `pattern`, without copying the field when it can be borrowed
    /// (selection runs over every server of a pool).
    pub(crate) fn matches(&self, field: Field, pattern: &Pattern) -> bool {
        match field {
            Field::Name => pattern.is_match(&self.inner.live.load().config.name),
            Field::Bind => pattern.is_match(&self.inner.bind_text),
            Field::Expose => match &self.inner.live.load().config.expose {
                Some(url) => pattern.is_match(url),
                None => pattern.is_match(&self.expose()),
            },
        }
    }

    /// The current configuration (the handler included).
    pub fn config(&self) -> HttpServerConfig {
        self.inner.live.load().config.clone()
    }

    /// True when the configuration disables the server.
    pub fn is_disabled(&self) -> bool {
        self.inner.live.load().config.disabled
    }

    /// Counters and state, without I/O.
    pub fn snapshot(&self) -> ServerSnapshot {
        let state = self.inner.state.borrow().clone();
        ServerSnapshot {
            name: self.name(),
            bind: self.inner.bind,
            expose: self.expose(),
            healthy: state == LifecycleState::Running,
            state,
            uptime: self.uptime(),
            counters: self.inner.counters.snapshot(),
        }
    }

    /// A new, stopped server with the same configuration and handler (its own counters).
    pub fn duplicate(&self) -> Server {
        let config = self.config();
        Server::new(config).expect("a running configuration is valid")
    }

    /// Applies a new configuration for the same bind address. A configuration that fails
    /// validation, or whose TLS files are unreadable or mismatched, is rejected and the current
    /// settings stay. See [`ReloadOutcome`] for what happens to a running server.
    pub async fn reload(&self, config: HttpServerConfig) -> Result<ReloadOutcome, Error> {
        let (bind, live) = Live::build(config)?;
        if bind != self.inner.bind {
            return Err(Error::Invalid {
                problems: vec![Problem {
                    server: live.config.name.clone(),
                    field: "listen",
                    message: format!("{bind} differs from the server's address {}", self.inner.bind),
                }],
            });
        }
        let old = self.inner.live.load_full();
        if old.same_as(&live) {
            return Ok(ReloadOutcome::Unchanged);
        }
        let rebind = old.config.socket != live.config.socket;
        let disabled = live.config.disabled;
        self.inner.live.store(Arc::new(live));
        if disabled && self.is_running() {
            self.stop().await.map_err(|e| stop_failure(self, e))?;
            return Ok(ReloadOutcome::Stopped);
        }
        if rebind && self.is_running() {
            self.restart().await.map_err(|e| Error::Start {
                failures: vec![crate::ServerFailure { bind: self.bind(), name: self.name(), error: e }],
            })?;
            return Ok(ReloadOutcome::Rebound);
        }
        Ok(ReloadOutcome::Swapped)
    }

    /// Stops gracefully with `grace` as the drain deadline instead of the configured one.
    pub async fn stop_within(&self, grace: Duration) -> Result<StopReport, LifecycleError> {
        let begin = Instant::now();
        let handle = {
            let mut run = self.inner.run.lock();
            run.as_mut().map(|h| {
                // Counted before the signal: a connection closing as soon as it sees the signal
                // counts as drained.
                let open = h.tracker.active() as u64;
                // The first stop sets the deadline; a later one does not move it.
                h.shutdown.send_if_modified(|d| {
                    let first = d.is_none();
                    if first {
                        *d = Some(begin + grace);
                    }
                    first
                });
                h.task.take().map(|task| (task, open))
            })
        };
        match handle {
            Some(Some((task, open))) => {
                self.inner.state.send_if_modified(|s| {
                    let running = *s == LifecycleState::Running;
                    if running {
                        *s = LifecycleState::Stopping;
                    }
                    running
                });
                let mut report = task
                    .await
                    .map_err(|e| LifecycleError::Stop { name: self.name(), message: e.to_string() })?;
                report.drained = open.saturating_sub(report.forced);
                report.elapsed = begin.elapsed();
                self.inner.counters.stopped(report.drained, report.forced);
                Ok(report)
            }
            // Another stop is under way: wait for it.
            Some(None) => {
                let mut rx = self.inner.state.subscribe();
                let _ =
                    rx.wait_for(|s| matches!(s, LifecycleState::Stopped | LifecycleState::Failed(_))).await;
                Ok(StopReport { elapsed: begin.elapsed(), ..StopReport::default() })
            }
            None => Ok(StopReport::default()),
        }
    }

    fn bind_listener(&self, live: &Live) -> Result<TcpListener, Error> {
        let name = &live.config.name;
        let socket = socket::bind_socket(self.inner.bind, &live.config.socket)
            .map_err(|source| Error::Bind { server: name.clone(), bind: self.inner.bind, source })?;
        TcpListener::from_std(socket.into()).map_err(|source| Error::Bind {
            server: name.clone(),
            bind: self.inner.bind,
            source,
        })
    }
}

fn stop_failure(server: &Server, error: LifecycleError) -> Error {
    Error::Stop { failures: vec![crate::ServerFailure { bind: server.bind(), name: server.name(), error }] }
}

impl Lifecycle for Server {
    /// Binds the socket for real and returns once it listens. A disabled server returns
    /// [`LifecycleError::Disabled`]; a bind failure returns [`LifecycleError::Start`] with the
    /// I/O kind (address in use, permission denied…).
    async fn start(&self) -> Result<(), LifecycleError> {
        let live = self.inner.live.load_full();
        let name = live.config.name.clone();
        if live.config.disabled {
            return Err(LifecycleError::Disabled { name });
        }
        let mut rx = self.inner.state.subscribe();
        loop {
            let mut claimed = false;
            self.inner.state.send_if_modified(|s| {
                claimed = matches!(s, LifecycleState::Stopped | LifecycleState::Failed(_));
                if claimed {
                    *s = LifecycleState::Starting;
                }
                claimed
            });
            if claimed {
                break;
            }
            let current = rx.borrow_and_update().clone();
            match current {
                LifecycleState::Stopping => {
                    let _ = rx.changed().await;
                }
                _ => return Err(LifecycleError::AlreadyRunning { name }),
            }
        }
        let listener = match self.bind_listener(&live) {
            Ok(l) => l,
            Err(e) => {
                self.inner.state.send_replace(LifecycleState::Failed(e.to_string()));
                return Err(LifecycleError::Start { name, kind: e.io_kind(), message: e.to_string() });
            }
        };
        let (shutdown, shutdown_rx) = watch::channel(None);
        let tracker = Tracker::new(self.inner.counters.clone());
        let task =
            tokio::spawn(accept_loop(Arc::downgrade(&self.inner), listener, shutdown_rx, tracker.clone()));
        *self.inner.run.lock() = Some(RunHandle { shutdown, tracker, task: Some(task) });
        *self.inner.started.lock() = Some(Instant::now());
        self.inner.state.send_replace(LifecycleState::Running);
        tracing::info!(server = %name, bind = %self.inner.bind, "listening");
        Ok(())
    }

    /// Graceful stop with the configured `timeouts.shutdown` deadline; returns as soon as every
    /// connection closed, with how many drained and how many were cut off.
    async fn stop(&self) -> Result<StopReport, LifecycleError> {
        let grace = self.inner.live.load().config.timeouts.shutdown;
        self.stop_within(grace).await
    }

    fn is_running(&self) -> bool {
        *self.inner.state.borrow() == LifecycleState::Running
    }

    fn uptime(&self) -> Option<Duration> {
        if !self.is_running() {
            return None;
        }
        self.inner.started.lock().map(|t| t.elapsed())
    }

    fn state(&self) -> watch::Receiver<LifecycleState> {
        self.inner.state.subscribe()
    }
}

fn shutdown_deadline(
    changed: Result<(), watch::error::RecvError>,
    rx: &watch::Receiver<Option<Instant>>,
) -> Option<Instant> {
    match changed {
        Ok(()) => *rx.borrow(),
        // Every handle of the server was dropped: stop now.
        Err(_) => Some(Instant::now()),
    }
}

async fn accept_loop(
    server: Weak<Inner>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<Option<Instant>>,
    tracker: Arc<Tracker>,
) -> StopReport {
    let mut conns = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let counters = match server.upgrade() {
        Some(inner) => inner.counters.clone(),
        None => return StopReport::default(),
    };
    let deadline = 'accept: loop {
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if let Some(deadline) = shutdown_deadline(changed, &shutdown) {
                    break deadline;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let Some(inner) = server.upgrade() else { break Instant::now() };
                    let live = inner.live.load_full();
                    drop(inner);
                    let limits = &live.config.limits;
                    let caps = Caps { total: limits.max_connections, per_client: limits.max_connections_per_ip };
                    match tracker.track(stream, Client::of(peer.ip()), caps) {
                        Ok(io) => {
                            if let Err(e) = socket::configure_stream(io.get_ref(), &live.config.socket) {
                                tracing::debug!(error = %e, "socket options on an accepted connection");
                            }
                            match live.config.workers.clone() {
                                None => {
                                    conns.spawn(serve_connection(io, peer, live, shutdown.clone(), counters.clone()));
                                }
                                Some(workers) => {
                                    // Taken off this runtime's reactor here and registered with
                                    // the worker's there.
                                    match io.try_map(TcpStream::into_std) {
                                        Ok(io) => {
                                            let (worker, placed) = workers.pick();
                                            let (shutdown, counters) = (shutdown.clone(), counters.clone());
                                            let serve = async move {
                                                match io.try_map(TcpStream::from_std) {
                                                    Ok(io) => serve_connection(io, peer, live, shutdown, counters).await,
                                                    Err(e) => tracing::debug!(error = %e, "a connection could not join its worker"),
                                                }
                                            };
                                            conns.spawn_on(workers::placed(serve, placed), worker);
                                        }
                                        Err(e) => tracing::debug!(error = %e, "a connection could not leave the acceptor"),
                                    }
                                }
                            }
                        }
                        Err((stream, why)) => {
                            tracing::debug!(%peer, ?why, "connection over a cap: reset");
                            socket::reset(stream);
                        }
                    }
                    while conns.try_join_next().is_some() {}
                }
                Err(e) => {
                    counters.accept_error();
                    tracing::warn!(error = %e, "accept failed");
                    if let Some(pause) = backoff.on_error(&e) {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            changed = shutdown.changed() => {
                                if let Some(deadline) = shutdown_deadline(changed, &shutdown) {
                                    break 'accept deadline;
                                }
                            }
                        }
                    }
                }
            },
        }
    };
    // Closing the listener first: new connections are refused from here on.
    drop(listener);
    let forced = tracker.drain(deadline).await;
    if forced > 0 {
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
    if let Some(inner) = server.upgrade() {
        *inner.started.lock() = None;
        inner.run.lock().take();
        inner.state.send_replace(LifecycleState::Stopped);
    }
    // `drained` and `elapsed` are filled in by the stop call, which saw the stop begin.
    StopReport { drained: 0, forced, elapsed: Duration::ZERO }
}

async fn serve_connection(
    io: TrackedIo<TcpStream>,
    peer: std::net::SocketAddr,
    live: Arc<Live>,
    shutdown: watch::Receiver<Option<Instant>>,
    counters: Arc<Counters>,
) {
    match &live.tls {
        Some((_, acceptor)) => {
            let handshake = acceptor.accept(io);
            let stream = match live.config.timeouts.header_read {
                Some(limit) => match tokio::time::timeout(limit, handshake).await {
                    Ok(result) => result,
                    Err(_) => return,
                },
                None => handshake.await,
            };
            match stream {
                Ok(stream) => serve_http(stream, peer, &live, shutdown, counters).await,
                Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
            }
        }
        None => serve_http(io, peer, &live, shutdown, counters).await,
    }
}

async fn serve_http<I>(
    io: I,
    peer: std::net::SocketAddr,
    live: &Live,
    shutdown: watch::Receiver<Option<Instant>>,
    counters: Arc<Counters>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new(live.config.limits.max_abandoned_requests);
    let service = ConnService {
        handler: live.handler.clone(),
        signal: ShutdownSignal::new(shutdown.clone()),
        peer: ClientAddr(peer),
        counters,
        activity: activity.clone(),
        request_timeout: live.config.timeouts.request,
        body_read: live.config.timeouts.body_read,
    };
    let timeouts = &live.config.timeouts;
    match &live.http1 {
        Some(h1) => {
            let conn = h1.serve_connection(TokioIo::new(io), service).with_upgrades();
            let limits =
                Limits { idle: timeouts.idle, header_read: timeouts.header_read, first_request: None };
            drive(conn, |c| c.graceful_shutdown(), shutdown, &activity, limits).await;
        }
        None => {
            // hyper keeps the header read timeout of HTTP/1 on these connections (see `Live`):
            // the same connection may turn out to speak HTTP/2, where it does not apply. Until
            // the first request arrives, whatever the protocol, `drive` keeps it: a connection
            // that asks for nothing (no preface, or a preface and no stream) does not hold its
            // place until the idle timeout.
            let conn = live.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let limits =
                Limits { idle: timeouts.idle, header_read: None, first_request: timeouts.header_read };
            drive(conn, |c| c.graceful_shutdown(), shutdown, &activity, limits).await;
        }
    }
}

/// The time limits `drive` keeps on a connection's idle spells (no request in flight).
#[derive(Clone, Copy)]
struct Limits {
    /// Idle this long: graceful shutdown.
    idle: Option<Duration>,
    /// Idle this long: closed at once. On HTTP/1 this is the header read timeout, as hyper keeps
    /// it: the time to receive a request head counts from when the connection began to wait
    /// for it (when it opened, or when the previous response was sent), so a connection that
    /// stays silent that long is closed too, like one that sends a head too slowly.
    header_read: Option<Duration>,
    /// Like `header_read`, but only until the connection's first request arrives (connections
    /// that may speak HTTP/2, where hyper keeps the HTTP/1 header read timeout itself).
    first_request: Option<Duration>,
}

/// Runs one hyper connection to its end: a graceful shutdown on the stop signal or once the
/// connection has been idle for `limits.idle`, and closed at once when it has been idle for
/// `limits.header_read`. (Both hyper's HTTP/1 and hyper-util's auto connection go through here;
/// `graceful` is their `graceful_shutdown`.)
///
/// The stop signal and the timers are polled only when one of them woke the task, through a
/// waker of their own, not on every wake-up of the connection: a `select!` over the three would
/// poll the shared stop channel (a lock) and the timer on every read and write. The connection
/// is polled first, so a request head that arrived by the header deadline is still served.
async fn drive<C, E>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    shutdown: watch::Receiver<Option<Instant>>,
    activity: &Activity,
    limits: Limits,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let close_gracefully = AtomicBool::new(false);
    let mut side = std::pin::pin!(watch_side(shutdown, activity, limits, &close_gracefully));
    let wake = Arc::new(SideWake { fired: AtomicBool::new(true), task: Mutex::new(None) });
    let side_waker = Waker::from(wake.clone());
    // The task waker last stored in `wake`: storing again is skipped while it is the same, so a
    // poll with nothing from the side costs no atomic read-modify-write.
    let mut registered: Option<Waker> = None;
    let mut closing = false;
    let result = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(result.map_err(Closed::Error)));
        }
        if activity.is_abusive() {
            return Poll::Ready(Some(Err(Closed::Abandoned)));
        }
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *wake.task.lock() = Some(waker.clone());
            registered = Some(waker);
        }
        // The waker is stored before `fired` is read: a side wake-up either set `fired` before
        // the read, or takes the lock after the store and wakes this task.
        if wake.fired.load(Ordering::Acquire) && wake.fired.swap(false, Ordering::AcqRel) {
            if side.as_mut().poll(&mut Context::from_waker(&side_waker)).is_ready() {
                return Poll::Ready(None);
            }
            if !closing && close_gracefully.load(Ordering::Relaxed) {
                closing = true;
                graceful(conn.as_mut());
                return conn.as_mut().poll(cx).map(|r| Some(r.map_err(Closed::Error)));
            }
        }
        Poll::Pending
    })
    .await;
    match result {
        Some(Ok(())) => {}
        Some(Err(Closed::Abandoned)) => {
            metrics::counter!("httpserver_connections_closed_abandoning_total").increment(1);
            tracing::warn!(
                "closed a connection whose client abandoned most of its requests before their answers (HTTP/2 rapid reset?)"
            );
        }
        Some(Err(Closed::Error(e))) => tracing::debug!(error = %e, "connection ended with an error"),
        None => tracing::debug!("header read or idle timeout: connection closed"),
    }
}

/// Why `drive` ended a connection other than by the connection's own end.
enum Closed<E> {
    /// hyper's error.
    Error(E),
    /// The client abandoned too many of its requests (`Limits::max_abandoned_requests`).
    Abandoned,
}

/// Wakes the connection task on behalf of the stop signal or the timers, and says so.
///
/// The task's waker sits behind a lock, not in an `AtomicWaker`: the connection stores it only
/// when it changes (see [`drive`]), and side wake-ups are rare (a stop, an idle check).
struct SideWake {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// Watches the stop signal and the connection's idle spells. Sets `close_gracefully` once the
/// server is stopping or no request has been in flight for `limits.idle`; resolves (the
/// connection is then closed at once) when no request has been in flight for
/// `limits.header_read` (or `limits.first_request` before the first request), or for twice
/// `limits.idle` once the idle timeout began a graceful close: HTTP/2's graceful close waits for
/// the client to answer a ping, and a client that never does must not keep its connection.
///
/// One timer per connection, not one per request: a request ending records the time (see
/// [`Activity`]), and the timer, when it fires, is set again from the last such time.
async fn watch_side(
    mut shutdown: watch::Receiver<Option<Instant>>,
    activity: &Activity,
    limits: Limits,
    close_gracefully: &AtomicBool,
) {
    let mut stopping = shutdown.borrow_and_update().is_some();
    if stopping {
        close_gracefully.store(true, Ordering::Relaxed);
    }
    // Set when the idle timeout began the graceful close.
    let mut idle_closing = false;
    loop {
        // Once the connection is closing gracefully because the server stops, only the header
        // deadline is left (and the stop's own deadline); once it is because it was idle, the
        // graceful close gets as long again as the idle timeout.
        let idle = match limits.idle {
            Some(limit) if idle_closing => Some(limit * 2),
            Some(limit) if !close_gracefully.load(Ordering::Relaxed) => Some(limit),
            _ => None,
        };
        let header_read = limits.header_read.or(limits.first_request.filter(|_| !activity.has_begun()));
        let limit = match (idle, header_read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let check = limit.map(|limit| match activity.idle_since() {
            Some(since) => since + limit,
            None => Instant::now() + limit,
        });
        tokio::select! {
            _ = shutdown.changed(), if !stopping => {
                // A new deadline, or every handle of the server dropped: stopping either way.
                stopping = true;
                close_gracefully.store(true, Ordering::Relaxed);
            }
            () = tokio::time::sleep_until(check.unwrap_or_else(Instant::now)), if check.is_some() => {
                if let Some(since) = activity.idle_since() {
                    let now = Instant::now();
                    // Read again: a first request may have begun and ended since.
                    let header_read =
                        limits.header_read.or(limits.first_request.filter(|_| !activity.has_begun()));
                    if header_read.is_some_and(|limit| since + limit <= now) {
                        return;
                    }
                    if idle.is_some_and(|limit| since + limit <= now) {
                        if idle_closing {
                            return;
                        }
                        idle_closing = true;
                        close_gracefully.store(true, Ordering::Relaxed);
                    }
                }
            }
            else => std::future::pending::<()>().await,
        }
    }
}

/// The address of the client a request came from, in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The per-connection hyper service: counts the request, hands the handler the shutdown signal,
/// applies the request timeout, and counts the request in flight until its response is sent.
struct ConnService {
    handler: Handler,
    signal: ShutdownSignal,
    peer: ClientAddr,
    counters: Arc<Counters>,
    activity: Arc<Activity>,
    request_timeout: Option<Duration>,
    body_read: Option<Duration>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.counters.request();
        let mut req = req.map(|body| RequestBody::new(body, self.body_read));
        req.extensions_mut().insert(self.signal.clone());
        req.extensions_mut().insert(self.peer);
        let in_flight = self.activity.begin();
        let eager = req.version() < Version::HTTP_2;
        let response = self.handler.call(req);
        let mut response = match self.request_timeout {
            Some(limit) => Pending::Limited(Box::pin(tokio::time::timeout(limit, response))),
            None => Pending::Plain(response),
        };
        if eager {
            // HTTP/1: the handler's first poll, here rather than when hyper first polls the answer.
            // hyper reads ahead on the connection between the two (to notice a client that goes
            // away), and that read needs room in its read buffer, which the request head still
            // points into until the handler lets go of it: polled later, a handler that drops
            // the head at once still holds it then, and hyper allocates a new 8 KiB buffer for
            // every request. (HTTP/2 handlers run in a task of their own; polling them here
            // would run their first step on the connection's task instead, so they are left
            // alone.) The waker of this poll is a no-op: hyper polls the answer right after,
            // with the connection's waker, and a pending handler registers that one then.
            if let Poll::Ready(resp) = Pin::new(&mut response).poll(&mut Context::from_waker(Waker::noop())) {
                response = Pending::Ready(Some(resp));
            }
        }
        Answer { response, in_flight: Some(in_flight) }
    }
}

/// The handler's answer, under the request timeout if there is one. A named future rather than
/// an `async` block: one allocation less per request.
pub(crate) struct Answer {
    response: Pending,
    /// Handed to the response body when the answer is ready.
    in_flight: Option<RequestGuard>,
}

enum Pending {
    Plain(HandlerFuture),
    Limited(Pin<Box<tokio::time::Timeout<HandlerFuture>>>),
    /// Answered on the first poll, in `ConnService::call`.
    Ready(Option<Response<ResponseBody>>),
}

impl Future for Pending {
    type Output = Response<ResponseBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Pending::Plain(f) => f.as_mut().poll(cx),
            Pending::Limited(f) => {
                f.as_mut().poll(cx).map(|r| r.unwrap_or_else(|_| status(StatusCode::SERVICE_UNAVAILABLE)))
            }
            Pending::Ready(resp) => Poll::Ready(resp.take().expect("answer polled after it was ready")),
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Dropped before it was ready: the client gave up on the request (an HTTP/2 stream
        // reset, an HTTP/1 connection closed).
        if let Some(in_flight) = &self.in_flight {
            in_flight.abandon();
        }
    }
}

impl Future for Answer {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = std::task::ready!(Pin::new(&mut this.response).poll(cx));
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _in_flight: in_flight, failed: None })))
    }
}

/// A response body that keeps its request in flight until it has been sent in full, or dropped:
/// a connection streaming a long response is not idle.
///
/// An error of the handler's body is held back for one poll: the body answers `Pending` once,
/// having woken its task, and the error after. hyper writes an HTTP/1 response's head together
/// with the first piece of its body, and when the body fails before anything was flushed it
/// closes the connection with the head never written: the client sees the connection close
/// with no answer at all. Given the one `Pending`, hyper flushes what it holds first, so the
/// client gets the status and a body it can tell is cut short (short of its length, or with no
/// last chunk), as a proxy whose upstream dies mid-body should give.
pub(crate) struct TrackedBody {
    body: ResponseBody,
    _in_flight: Option<RequestGuard>,
    /// The body's error, held back for one poll.
    failed: Option<BoxError>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match frame {
            Poll::Ready(None) => this._in_flight = None,
            Poll::Ready(Some(Err(e))) => {
                // Sent on the next poll (see the type's docs).
                this.failed = Some(e);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
