//! The agent side's limits against a peer that misbehaves on purpose, over real sockets: the
//! connection cap, the handshake, frame and write time-outs, the advertised concurrency, the
//! cap on configuration pushes and the frame size. Each test uses a raw client that speaks
//! the wire protocol by hand where the real connector would keep to the rules.
//!
//! No test measures time: time-outs are set short so the tests end soon, and every wait has
//! a generous deadline so that a broken limit fails instead of hanging.

mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Uri};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::*;
use test_support::AllowAll;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::codec::Framed;
use transport_uds::reverse::{ReverseAgent, ReverseAgentConfig, ReverseError};
use transport_uds::{
    LimitStats, ServeError, ServerHandle, SessionLimits, UdsConnector, UdsServer, UdsServerConfig,
};
use wire::Wire;

/// Long enough for anything that should happen to happen, on any machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// A time-out short enough to keep the tests quick.
const SHORT: Duration = Duration::from_millis(200);

/// A proxy speaking the wire protocol by hand.
type RawProxy = Framed<UnixStream, Wire<proto::AgentFrame, proto::ProxyFrame>>;

/// Holds every event and configuration push until the test opens the gate; counts those
/// started and the most events running at once, and answers each event with its correlation
/// id as the reason.
#[derive(Clone)]
struct Gate {
    open: Arc<Semaphore>,
    started: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    capabilities: Capabilities,
}

impl Gate {
    fn new(capabilities: Capabilities) -> Self {
        Self {
            open: Arc::new(Semaphore::new(0)),
            started: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
            capabilities,
        }
    }
}

/// Counts an event as running while it lives.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl AgentHandler for Gate {
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        self.started.fetch_add(1, SeqCst);
        let now = self.running.fetch_add(1, SeqCst) + 1;
        let _running = Running(self.running.clone());
        self.peak.fetch_max(now, SeqCst);
        let _pass = self.open.acquire().await.map_err(|_| AgentError::new("the gate was closed"))?;
        Ok(Decision::allow().with_reason(event.correlation_id().as_str()))
    }

    async fn on_config(&self, push: ConfigPush) -> ConfigAck {
        self.started.fetch_add(1, SeqCst);
        match self.open.acquire().await {
            Ok(_pass) => ConfigAck::accepted(push.push_id),
            Err(_) => ConfigAck::rejected(push.push_id, "the gate was closed"),
        }
    }
}

/// Serves `handler` with `config` at a fresh socket in `dir`; dropping the sender stops it.
async fn serve<H: AgentHandler>(
    dir: &tempfile::TempDir,
    config: UdsServerConfig,
    handler: H,
) -> (PathBuf, ServerHandle, oneshot::Sender<()>) {
    let path = dir.path().join("agent.sock");
    let server = UdsServer::bind(&path, config).await.unwrap();
    let handle = server.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    (path, handle, stop)
}

fn with_session(session: SessionLimits) -> UdsServerConfig {
    UdsServerConfig { session, ..UdsServerConfig::default() }
}

fn request(id: &str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/x")))
}

/// Request `stream_id`'s `event`, as the proxy frames it.
fn event_frame(stream_id: u64, event: Event) -> proto::ProxyFrame {
    proto::ProxyFrame { stream_id, body: Some(proxy_frame::Body::Event(event.into())) }
}

/// Connects and handshakes by hand; returns the connection and the capabilities advertised.
async fn raw_proxy(path: &Path) -> (RawProxy, proto::Capabilities) {
    let stream = UnixStream::connect(path).await.unwrap();
    let mut framed = Framed::new(stream, Wire::new(16 << 20));
    let hello = proto::Hello::from(Hello::new("raw"));
    framed
        .send(proto::ProxyFrame { stream_id: 0, body: Some(proxy_frame::Body::Hello(hello)) })
        .await
        .unwrap();
    match next(&mut framed).await {
        Some(proto::AgentFrame { body: Some(agent_frame::Body::Capabilities(c)), .. }) => (framed, c),
        other => panic!("expected the capabilities, got {other:?}"),
    }
}

/// The next frame from the agent; `None` once it has closed the connection.
async fn next(framed: &mut RawProxy) -> Option<proto::AgentFrame> {
    tokio::time::timeout(DEADLINE, framed.next())
        .await
        .expect("the agent answers or closes the connection")
        .map(|frame| frame.expect("the agent's frames decode"))
}

async fn connect(path: &Path) -> Arc<dyn AgentConnection> {
    let endpoint = Endpoint::from(format!("unix:{}", path.display()));
    let pending = UdsConnector::default().connect(&endpoint).await.unwrap();
    pending.handshake(Hello::new("proxy")).await.unwrap()
}

/// Reads until the agent closes `stream`; what it wrote before.
async fn read_until_closed(stream: &mut UnixStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut bytes))
        .await
        .expect("the agent closes the connection")
        .expect("reading succeeds");
    bytes
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_at_once_and_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = UdsServerConfig { max_connections: 2, ..UdsServerConfig::default() };
    let (path, handle, _stop) = serve(&dir, config, AllowAll).await;
    let first = connect(&path).await;
    let second = connect(&path).await;

    let mut third = UnixStream::connect(&path).await.unwrap();
    assert!(read_until_closed(&mut third).await.is_empty(), "closed without a byte written");
    assert_eq!(handle.limit_stats().connections_refused, 1);

    assert!(first.send(&request("a")).await.unwrap().is_allow());
    assert!(second.send(&request("b")).await.unwrap().is_allow());
    assert_eq!(handle.connection_count(), 2);

    // A slot freed is a slot taken again (once the closed connection's task has ended).
    drop(first);
    let endpoint = Endpoint::from(format!("unix:{}", path.display()));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let again = loop {
        let pending = UdsConnector::default().connect(&endpoint).await.unwrap();
        if let Ok(conn) = pending.handshake(Hello::new("proxy")).await {
            break conn;
        }
        assert!(tokio::time::Instant::now() < deadline, "the freed slot is never given out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(again.send(&request("c")).await.unwrap().is_allow());
    assert!(second.send(&request("d")).await.unwrap().is_allow());
}

#[tokio::test]
async fn a_silent_or_stalled_handshake_is_closed_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = UdsServerConfig { handshake_timeout: SHORT, ..UdsServerConfig::default() };
    let (path, handle, _stop) = serve(&dir, config, AllowAll).await;
    let mut silent = UnixStream::connect(&path).await.unwrap();
    // A hello's length, promising 64 bytes, and nothing more.
    let mut stalled = UnixStream::connect(&path).await.unwrap();
    stalled.write_all(&64u32.to_be_bytes()).await.unwrap();

    assert!(read_until_closed(&mut silent).await.is_empty());
    assert!(read_until_closed(&mut stalled).await.is_empty());
    assert_eq!(handle.limit_stats().handshakes_timed_out, 2);
    assert_eq!(handle.connection_count(), 0);
}

#[tokio::test]
async fn a_frame_that_starts_and_stalls_is_cut_and_an_idle_connection_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let session = SessionLimits { frame_read_timeout: SHORT, ..SessionLimits::default() };
    let (path, handle, _stop) = serve(&dir, with_session(session), AllowAll).await;
    let (mut idle, _) = raw_proxy(&path).await;
    let (stalls, _) = raw_proxy(&path).await;

    // The length of a 1000-byte frame and 10 bytes of it.
    let mut stalls = stalls.into_inner();
    stalls.write_all(&1000u32.to_be_bytes()).await.unwrap();
    stalls.write_all(&[0; 10]).await.unwrap();
    assert!(read_until_closed(&mut stalls).await.is_empty(), "nothing is answered for half a frame");
    assert_eq!(handle.limit_stats().frames_timed_out, 1);

    // The idle connection sent nothing for at least as long as the stalled frame was given,
    // and it is still served.
    idle.send(proto::ProxyFrame { stream_id: 9, body: Some(proxy_frame::Body::Ping(proto::Ping {})) })
        .await
        .unwrap();
    let pong = next(&mut idle).await.expect("the idle connection is open");
    assert!(matches!(pong, proto::AgentFrame { stream_id: 9, body: Some(agent_frame::Body::Pong(_)) }));
    assert_eq!(handle.limit_stats().frames_timed_out, 1);
}

#[tokio::test]
async fn a_frame_over_the_limit_after_the_handshake_closes_only_its_connection() {
    const MAX_FRAME: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let config = UdsServerConfig { max_frame: MAX_FRAME, ..UdsServerConfig::default() };
    let (path, _handle, _stop) = serve(&dir, config, AllowAll).await;
    let good = connect(&path).await;
    let (oversized, _) = raw_proxy(&path).await;
    let mut oversized = oversized.into_inner();
    oversized.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).await.unwrap();
    assert!(read_until_closed(&mut oversized).await.is_empty());
    assert!(good.send(&request("still")).await.unwrap().is_allow());
}

#[tokio::test]
async fn a_proxy_that_stops_reading_is_cut_after_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let session = SessionLimits { write_timeout: SHORT, ..SessionLimits::default() };
    let (path, handle, _stop) = serve(&dir, with_session(session), AllowAll).await;
    let (deaf, _) = raw_proxy(&path).await;
    eventually("the session starts", || handle.connection_count() == 1).await;

    // Far more than any socket buffer holds, while the proxy reads nothing.
    let label = "x".repeat(256 * 1024);
    for _ in 0..64 {
        handle.report_metrics([AgentMetric::new("big", 1.0).with_label("l", label.as_str())]);
    }
    eventually("the write time-out closes the connection", || handle.limit_stats().writes_timed_out == 1)
        .await;
    eventually("the connection is gone", || handle.connection_count() == 0).await;
    // What was written before the cut is there to read, then the end of the stream.
    let mut deaf = deaf.into_inner();
    read_until_closed(&mut deaf).await;
}

#[tokio::test]
async fn the_handshake_advertises_the_smaller_of_the_handlers_concurrency_and_the_cap() {
    for (handler, cap, advertised) in [(None, 1024, 1024), (Some(256), 1024, 256), (Some(10), 2, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let mut capabilities = Capabilities::new("gate").with_events(EventKind::ALL);
        capabilities.max_concurrency = handler.and_then(std::num::NonZeroU32::new);
        let session = SessionLimits { max_concurrent_requests: cap, ..SessionLimits::default() };
        let (path, _handle, _stop) = serve(&dir, with_session(session), Gate::new(capabilities)).await;
        let conn = connect(&path).await;
        assert_eq!(
            conn.capabilities().max_concurrency.map(|n| n.get()),
            Some(advertised),
            "handler {handler:?}, cap {cap}"
        );
    }
}

#[tokio::test]
async fn requests_beyond_the_advertised_concurrency_wait_their_turn_unread() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Capabilities::new("gate").with_events(EventKind::ALL).with_max_concurrency(10));
    let session = SessionLimits { max_concurrent_requests: 2, ..SessionLimits::default() };
    let (path, handle, _stop) = serve(&dir, with_session(session), gate.clone()).await;
    let (mut proxy, capabilities) = raw_proxy(&path).await;
    assert_eq!(capabilities.max_concurrency, 2);

    // Five at once, ignoring the two advertised.
    for stream_id in 1..=5u64 {
        proxy.feed(event_frame(stream_id, request(&format!("r{stream_id}")))).await.unwrap();
    }
    SinkExt::<proto::ProxyFrame>::flush(&mut proxy).await.unwrap();
    eventually("the two allowed requests start", || gate.started.load(SeqCst) == 2).await;
    eventually("the third is read and held back", || handle.limit_stats().requests_held_back == 1).await;
    assert_eq!(gate.started.load(SeqCst), 2, "the one held back has not started");

    // As running requests end, the others start, never more than two at once.
    gate.open.add_permits(5);
    let mut answered = Vec::new();
    for _ in 0..5 {
        match next(&mut proxy).await {
            Some(proto::AgentFrame { stream_id, body: Some(agent_frame::Body::Decision(d)) }) => {
                assert_eq!(d.audit.and_then(|a| a.reason), Some(format!("r{stream_id}")));
                answered.push(stream_id);
            }
            other => panic!("expected a decision, got {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3, 4, 5]);
    assert_eq!(gate.peak.load(SeqCst), 2, "never more than the advertised concurrency at once");
    let held_back = handle.limit_stats().requests_held_back;
    assert!((1..=3).contains(&held_back), "{held_back}");
}

#[tokio::test]
async fn a_request_reusing_a_running_stream_id_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Capabilities::new("gate").with_events(EventKind::ALL));
    let (path, handle, _stop) = serve(&dir, UdsServerConfig::default(), gate.clone()).await;
    let (mut proxy, _) = raw_proxy(&path).await;
    proxy.send(event_frame(1, request("first"))).await.unwrap();
    eventually("the first request starts", || gate.started.load(SeqCst) == 1).await;
    proxy.send(event_frame(1, request("again"))).await.unwrap();
    assert_eq!(next(&mut proxy).await, None, "closed without an answer");
    eventually("the session ends", || handle.connection_count() == 0).await;
    assert_eq!(gate.started.load(SeqCst), 1);
}

#[tokio::test]
async fn configuration_pushes_beyond_the_cap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Capabilities::new("gate").with_events(EventKind::ALL));
    let session = SessionLimits { max_config_pushes: 1, ..SessionLimits::default() };
    let (path, handle, _stop) = serve(&dir, with_session(session), gate.clone()).await;
    let (mut proxy, _) = raw_proxy(&path).await;
    let push = |push_id: u64| proto::ProxyFrame {
        stream_id: push_id,
        body: Some(proxy_frame::Body::ConfigPush(proto::ConfigPush {
            push_id,
            kind: "rules".into(),
            version: None,
            payload: Default::default(),
        })),
    };
    proxy.send(push(1)).await.unwrap();
    eventually("the first push is being applied", || gate.started.load(SeqCst) == 1).await;
    proxy.send(push(2)).await.unwrap();
    match next(&mut proxy).await {
        Some(proto::AgentFrame { body: Some(agent_frame::Body::ConfigAck(ack)), .. }) => {
            assert_eq!(ack.push_id, 2);
            assert!(!ack.accepted);
            let error = ack.error.unwrap_or_default();
            assert!(error.contains("push 2 refused") && error.contains("max_config_pushes"), "{error}");
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert_eq!(handle.limit_stats().config_pushes_refused, 1);

    gate.open.add_permits(1);
    match next(&mut proxy).await {
        Some(proto::AgentFrame { body: Some(agent_frame::Body::ConfigAck(ack)), .. }) => {
            assert_eq!((ack.push_id, ack.accepted), (1, true));
        }
        other => panic!("expected the first push's ack, got {other:?}"),
    }
    assert_eq!(gate.started.load(SeqCst), 1, "the refused push never reached the handler");
}

#[tokio::test]
async fn a_limit_out_of_range_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let zero_timeout = SessionLimits { write_timeout: Duration::ZERO, ..SessionLimits::default() };
    for (config, field) in [
        (UdsServerConfig { max_connections: 0, ..UdsServerConfig::default() }, "max_connections"),
        (UdsServerConfig { max_connections: usize::MAX, ..UdsServerConfig::default() }, "max_connections"),
        (UdsServerConfig { max_frame: 1 << 32, ..UdsServerConfig::default() }, "max_frame"),
        (
            UdsServerConfig { handshake_timeout: Duration::ZERO, ..UdsServerConfig::default() },
            "handshake_timeout",
        ),
        (with_session(zero_timeout), "session.write_timeout"),
        (
            with_session(SessionLimits { max_concurrent_requests: 0, ..SessionLimits::default() }),
            "session.max_concurrent_requests",
        ),
    ] {
        let err = UdsServer::bind(&path, config).await.expect_err("refused");
        assert!(matches!(&err, ServeError::InvalidConfig { field: f, .. } if *f == field), "{err:?}");
        assert!(err.to_string().contains(field), "{err}");
        assert!(!path.exists(), "nothing was bound");
    }

    let mut config = ReverseAgentConfig::new(format!("unix:{}", path.display()), "waf", "r1");
    config.session = zero_timeout;
    let err = ReverseAgent::new(config).run(AllowAll, std::future::pending()).await.unwrap_err();
    assert!(matches!(&err, ReverseError::InvalidConfig { field: "session.write_timeout", .. }), "{err:?}");
}

#[test]
fn every_limit_has_a_safe_default() {
    let config = UdsServerConfig::default();
    assert_eq!(config.max_connections, 1024);
    assert_eq!(config.handshake_timeout, Duration::from_secs(5));
    assert_eq!(config.max_frame, 16 << 20);
    assert_eq!(
        config.session,
        SessionLimits {
            max_concurrent_requests: 1024,
            max_config_pushes: 8,
            frame_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    );
    assert!(config.validate().is_ok());
    assert_eq!(ServerHandle::default().limit_stats(), LimitStats::default());
}
