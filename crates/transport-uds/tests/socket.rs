//! What is particular to Unix sockets: socket files, peer credentials, abstract names, agent
//! signals and a proxy that sends garbage. The transport-independent checks are in
//! `conformance.rs`.

mod wire;

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, Uri};
use pool_api::proto::{self, agent_frame};
use pool_api::*;
use test_support::AllowAll;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::codec::Framed;
use transport_uds::{
    ClientConfig, MAX_SOCKET_PATH, PeerCredentials, ServeError, UdsConnector, UdsServer, UdsServerConfig,
};
use wire::Wire;

fn request(id: &str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/x")))
}

/// Serves `handler` at a fresh socket; dropping the sender stops it.
async fn agent<H: AgentHandler>(
    dir: &tempfile::TempDir,
    name: &str,
    handler: H,
) -> (String, oneshot::Sender<()>) {
    let path = dir.path().join(name);
    let server = UdsServer::bind(&path, UdsServerConfig::default()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    (format!("unix:{}", path.display()), stop)
}

async fn connect(endpoint: &str) -> Arc<dyn AgentConnection> {
    let pending = UdsConnector::default().connect(&Endpoint::from(endpoint)).await.unwrap();
    pending.handshake(Hello::new("test-proxy")).await.unwrap()
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves a stale file behind
    let server = UdsServer::bind(&path, UdsServerConfig { mode: Some(0o600), ..UdsServerConfig::default() })
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(matches!(
        UdsServer::bind(&path, UdsServerConfig::default()).await,
        Err(ServeError::InUse { .. })
    ));
    drop(server);
    assert!(!path.exists(), "the socket file is removed on shutdown");
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        UdsServer::bind(&path, UdsServerConfig::default()).await,
        Err(ServeError::NotASocket { .. })
    ));
}

#[tokio::test]
async fn agent_signals_reach_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let server = UdsServer::bind(&path, UdsServerConfig::default()).await.unwrap();
    let handle = server.handle();
    tokio::spawn(server.serve(AllowAll, std::future::pending()));
    let conn = connect(&format!("unix:{}", path.display())).await;
    let mut signals = conn.signals();
    while handle.connection_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.flow_control(FlowControl::Pause);
    handle.report_health(AgentHealth::with_status(HealthStatus::Degraded { timeout_multiplier: 2.0 }));
    let id = handle.request_config_update(ConfigUpdateKind::RequestReload);
    let update =
        tokio::time::timeout(Duration::from_secs(5), conn.next_config_update()).await.unwrap().unwrap();
    assert_eq!(update.request_id, id);
    signals.wait_for(|s| s.flow.paused && s.health.status.timeout_multiplier() == 2.0).await.unwrap();
    assert!(conn.ping().await.is_ok());
}

#[tokio::test]
async fn a_proxy_sending_garbage_is_disconnected_unanswered_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", AllowAll).await;
    let good = connect(&endpoint).await;
    let path = endpoint.strip_prefix("unix:").unwrap();
    for bytes in [
        vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff], // not a message
        u32::MAX.to_be_bytes().to_vec(),          // over the limit
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),       // another protocol entirely
    ] {
        let mut raw = tokio::net::UnixStream::connect(path).await.unwrap();
        raw.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer),
        )
        .await
        .expect("the server closes the connection");
        assert!(read.is_ok());
        assert!(answer.is_empty(), "nothing is answered to bytes that do not decode: {answer:?}");
    }
    assert!(good.send(&request("still")).await.unwrap().is_allow());
}

#[tokio::test]
async fn peer_credentials_are_checked_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", AllowAll).await;
    // Our own uid and gid: the peer of a socket pair is this very process.
    let me = {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        a.peer_cred().unwrap()
    };
    let connector = |uid| {
        UdsConnector::new(ClientConfig {
            peer: Some(PeerCredentials { uid: Some(uid), gid: None }),
            ..ClientConfig::default()
        })
    };
    assert!(connector(me.uid()).connect(&Endpoint::from(endpoint.as_str())).await.is_ok());
    let err = connector(me.uid() + 1).connect(&Endpoint::from(endpoint.as_str())).await.err().unwrap();
    assert!(matches!(err, TransportError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("expected {}", me.uid() + 1)), "{err}");

    // The agent refuses a proxy that is not who it expects: the connection is closed unanswered.
    let path = dir.path().join("strict.sock");
    let strict = UdsServer::bind(
        &path,
        UdsServerConfig {
            peer: Some(PeerCredentials { uid: None, gid: Some(me.gid() + 1) }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::spawn(strict.serve(AllowAll, std::future::pending()));
    let pending =
        UdsConnector::default().connect(&Endpoint::from(format!("unix:{}", path.display()))).await.unwrap();
    let err = pending.handshake(Hello::new("p")).await.err().unwrap();
    assert!(matches!(err, TransportError::Handshake { .. }), "{err:?}");
}

#[tokio::test]
async fn abstract_sockets_and_bad_endpoints() {
    let name = format!("agentpool-test-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
    };
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = UnixListener::from_std(std_listener).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(stream, Wire::<proto::ProxyFrame, proto::AgentFrame>::new(1 << 20));
        let _hello = futures_util::StreamExt::next(&mut framed).await;
        let caps: proto::Capabilities = Capabilities::new("abstract").into();
        framed
            .send(proto::AgentFrame { stream_id: 0, body: Some(agent_frame::Body::Capabilities(caps)) })
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let conn = connect(&format!("unix:@{name}")).await;
    assert_eq!(conn.capabilities().name, "abstract");

    for bad in ["unix:relative/path", "unix:@", "tcp://127.0.0.1:1"] {
        let err = UdsConnector::default().connect(&Endpoint::from(bad)).await.err().unwrap();
        assert!(matches!(err, TransportError::InvalidEndpoint { .. }), "{bad}: {err:?}");
    }
    let missing =
        UdsConnector::default().connect(&Endpoint::from("unix:/nonexistent/agent.sock")).await.err().unwrap();
    assert!(missing.to_string().contains("/nonexistent/agent.sock"), "{missing}");
}

#[path = "../examples/waf_agent/waf.rs"]
mod waf;

#[tokio::test]
async fn the_example_waf_blocks_by_path_and_marks_what_it_allows() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) =
        agent(&dir, "waf.sock", waf::Waf::new(vec!["/admin".into(), "/.git".into()])).await;
    let conn = connect(&endpoint).await;
    let ask = |id: &str, path: &'static str| {
        Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
    };
    let blocked = conn.send(&ask("a", "/admin/users")).await.unwrap();
    assert!(matches!(blocked.action, Action::Block { status, .. } if status == http::StatusCode::FORBIDDEN));
    assert_eq!(blocked.audit.rule_ids, vec!["path:/admin".to_owned()]);
    assert!(
        conn.send(&ask("g", "/.git/config")).await.unwrap().audit.tags.contains(&"blocked-path".to_owned())
    );
    let allowed = conn.send(&ask("b", "/shop")).await.unwrap();
    assert!(allowed.is_allow());
    assert!(
        matches!(&allowed.response_headers[..], [HeaderOp::Set { name, value }] if name == "x-waf" && value == "checked")
    );
}

#[tokio::test]
async fn the_connector_bounds_the_handshake_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (_held, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let connector = UdsConnector::new(ClientConfig {
        handshake_timeout: Duration::from_millis(100),
        ..ClientConfig::default()
    });
    let pending = connector.connect(&Endpoint::from(format!("unix:{}", path.display()))).await.unwrap();
    let err = pending.handshake(Hello::new("p")).await.err().unwrap();
    let TransportError::Handshake { endpoint, message } = &err else { panic!("{err:?}") };
    assert!(endpoint.ends_with("silent.sock"), "{endpoint}");
    assert!(message.contains("within 100ms"), "{message}");
}

struct Panics;

impl AgentHandler for Panics {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("panics").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        if event.correlation_id().as_str() == "boom" {
            panic!("handler bug");
        }
        Ok(Decision::allow())
    }
}

#[tokio::test]
async fn a_panicking_handler_answers_an_error_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", Panics).await;
    let conn = connect(&endpoint).await;
    let err = tokio::time::timeout(Duration::from_secs(10), conn.send(&request("boom")))
        .await
        .expect("answered, not left to the proxy's time-out")
        .unwrap_err();
    assert!(matches!(&err, TransportError::Agent(e) if e.message.contains("panicked")), "{err:?}");
    assert!(conn.send(&request("fine")).await.unwrap().is_allow());
}

/// Holds every request until it is dropped, counting the requests started and dropped.
#[derive(Clone, Default)]
struct Holds {
    started: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

struct CountsDrop(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CountsDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl AgentHandler for Holds {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("holds").with_events(EventKind::ALL)
    }

    async fn on_event(&self, _event: Event) -> Result<Decision, AgentError> {
        let _counted = CountsDrop(self.dropped.clone());
        self.started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::pending::<()>().await;
        Ok(Decision::allow())
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_dropped_request_is_abandoned_on_the_agent_and_a_dropped_connection_closes() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let holds = Holds::default();
    let path = dir.path().join("h.sock");
    let server = UdsServer::bind(&path, UdsServerConfig::default()).await.unwrap();
    let handle = server.handle();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(holds.clone(), async move {
        let _ = stopped.await;
    }));
    let conn = connect(&format!("unix:{}", path.display())).await;
    assert_eq!(handle.connection_count(), 1);

    // A request whose future is dropped: the agent's task for it is aborted.
    let held = tokio::spawn(conn.send(&request("held")));
    eventually("the handler starts", || holds.started.load(SeqCst) == 1).await;
    held.abort();
    eventually("the abandoned handler is dropped", || holds.dropped.load(SeqCst) == 1).await;

    // Another one left in flight while the handle goes away: the connection stays until it
    // is answered or abandoned, then closes.
    let kept = tokio::spawn(conn.send(&request("kept")));
    eventually("the second handler starts", || holds.started.load(SeqCst) == 2).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handle.connection_count(), 1, "a request still waits on it");
    kept.abort();
    eventually("the second handler is dropped", || holds.dropped.load(SeqCst) == 2).await;
    eventually("the connection closes", || handle.connection_count() == 0).await;
}

#[tokio::test]
async fn shutting_the_server_down_aborts_running_requests() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let holds = Holds::default();
    let (endpoint, stop) = agent(&dir, "h.sock", holds.clone()).await;
    let conn = connect(&endpoint).await;
    let held: Vec<_> = (0..3).map(|i| tokio::spawn(conn.send(&request(&format!("held{i}"))))).collect();
    eventually("the handlers start", || holds.started.load(SeqCst) == 3).await;
    drop(stop);
    eventually("every running handler is dropped", || holds.dropped.load(SeqCst) == 3).await;
    for request in held {
        let answer = tokio::time::timeout(Duration::from_secs(10), request).await.expect("not left waiting");
        assert!(answer.unwrap().is_err(), "a request cut by the shutdown fails");
    }
}

/// Holds every event until the test adds permits to its gate, then answers it with its
/// correlation id as the reason.
struct Gated(Arc<tokio::sync::Semaphore>);

impl AgentHandler for Gated {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("gated").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let _permit = self.0.acquire().await.map_err(|_| AgentError::new("the gate was closed"))?;
        Ok(Decision::allow().with_reason(event.correlation_id().as_str()))
    }
}

#[tokio::test]
async fn an_event_over_the_frame_limit_fails_only_its_own_request() {
    const LIMIT: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (endpoint, _stop) = agent(&dir, "a.sock", Gated(gate.clone())).await;
    let connector = UdsConnector::new(ClientConfig { max_frame: LIMIT, ..ClientConfig::default() });
    let pending = connector.connect(&Endpoint::from(endpoint.as_str())).await.unwrap();
    let conn = pending.handshake(Hello::new("test-proxy")).await.unwrap();

    // Three requests wait for the agent's answer while the oversized one is sent.
    let waiting: Vec<_> = (0..3).map(|i| conn.send(&request(&format!("r{i}")))).collect();
    let body = bytes::Bytes::from(vec![7u8; LIMIT + 1]);
    let oversized = Event::RequestBody(BodyChunk::new("big", 0, true, body));
    let err = conn.send(&oversized).await.unwrap_err();
    let TransportError::MessageTooLarge { connection, size, limit } = &err else {
        panic!("expected MessageTooLarge, got {err:?}");
    };
    assert_eq!(connection, conn.label());
    assert!(*size > LIMIT as u64, "the size is the encoded frame's: {size}");
    assert_eq!(*limit, LIMIT as u64);
    let text = err.to_string();
    assert!(text.contains(&size.to_string()) && text.contains(&LIMIT.to_string()), "{text}");
    assert!(!err.is_connection_fatal());
    assert!(conn.is_open(), "the connection outlives one oversized event");

    gate.add_permits(16);
    for (i, answer) in waiting.into_iter().enumerate() {
        let decision = answer.await.expect("a request sent before the oversized one is answered");
        assert_eq!(decision.audit.reason, Some(format!("r{i}")));
    }
    let after = conn.send(&request("after")).await.expect("the connection still takes new requests");
    assert_eq!(after.audit.reason.as_deref(), Some("after"));
    assert!(conn.signals().borrow().open);
}

#[tokio::test]
async fn endpoints_are_validated_as_documented_and_connect_agrees() {
    let connector = UdsConnector::default();
    for good in ["unix:/run/waf.sock", "unix:///run/waf.sock", "/run/waf.sock", "unix:@waf"] {
        assert_eq!(connector.validate_endpoint(&Endpoint::from(good)), Ok(()), "{good}");
    }
    let long = format!("unix:/{}", "a".repeat(MAX_SOCKET_PATH));
    for (bad, why) in [
        ("uds:/run/waf.sock", "unknown scheme \"uds\""),
        ("tcp://127.0.0.1:1", "unknown scheme \"tcp\""),
        ("unix:relative.sock", "\"relative.sock\" is a relative path"),
        ("unix://run/waf.sock", "\"run/waf.sock\" is a relative path"),
        ("relative.sock", "expected unix:/absolute/path"),
        ("unix:", "the socket path is empty"),
        ("", "expected unix:/absolute/path"),
        ("unix:@", "needs a name after '@'"),
        ("unix:/run/", "names a directory"),
        ("unix:/run/a\0b.sock", "NUL byte"),
        (long.as_str(), "at most 107"),
    ] {
        let endpoint = Endpoint::from(bad);
        let err = connector.validate_endpoint(&endpoint).unwrap_err();
        let TransportError::InvalidEndpoint { endpoint: named, message } = &err else {
            panic!("{bad:?}: {err:?}");
        };
        assert_eq!(named, bad);
        assert!(message.contains(why), "{bad:?}: {message}");
        assert!(err.to_string().contains(&format!("{bad:?}")), "the error names the endpoint: {err}");
        // Connecting refuses it the same way, without dialling.
        assert_eq!(connector.connect(&endpoint).await.err(), Some(err), "{bad:?}");
    }
}
