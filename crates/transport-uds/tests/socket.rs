//! The transport over real Unix sockets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use http::{Method, StatusCode, Uri};
use pool_api::proto::{self, agent_frame};
use pool_api::*;
use test_support::{AllowAll, Echo, FnHandler};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::codec::Framed;
use transport_uds::codec::FrameCodec;
use transport_uds::{ServeError, ServerConfig, UdsConnector, UdsServer};

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
    let server = UdsServer::bind(&path, ServerConfig::default()).await.unwrap();
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
async fn every_event_kind_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", Echo).await;
    let conn = connect(&endpoint).await;
    assert!(conn.capabilities().supported_events == EventSet::ALL);
    let events = vec![
        request("r1"),
        Event::RequestBody(BodyChunk::new("r1", 0, true, Bytes::from_static(b"body"))),
        Event::ResponseHeaders(ResponseHeaders {
            correlation_id: "r1".into(),
            status: StatusCode::OK,
            headers: Default::default(),
        }),
        Event::ResponseBody(BodyChunk::new("r1", 0, true, Bytes::from_static(b"out"))),
        Event::RequestComplete(RequestComplete {
            correlation_id: "r1".into(),
            status: StatusCode::OK,
            duration: Duration::from_millis(3),
            request_bytes: 4,
            response_bytes: 3,
        }),
        Event::WebSocketFrame(WebSocketFrame {
            correlation_id: "r1".into(),
            opcode: WebSocketOpcode::Text,
            client_to_server: true,
            index: 0,
            fin: true,
            payload: Bytes::from_static(b"hi"),
        }),
    ];
    for event in events {
        let kind = event.kind();
        let d = conn.send(event).await.unwrap();
        assert_eq!(d.audit.reason.as_deref(), Some("r1"), "{kind}");
        assert!(d.audit.tags.iter().any(|t| t == kind.as_str()), "{kind}: {:?}", d.audit.tags);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_requests_over_four_connections_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", Echo).await;
    let conns: Vec<_> = futures_util::future::join_all((0..4).map(|_| connect(&endpoint))).await;
    let tasks: Vec<_> = (0..10_000)
        .map(|i| {
            let conn = conns[i % 4].clone();
            tokio::spawn(async move {
                let id = format!("req-{i}");
                let d = conn.send(request(&id)).await.unwrap();
                assert_eq!(d.audit.reason.as_deref(), Some(id.as_str()), "cross-talk");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_agent_fails_every_pending_request_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let slow = FnHandler::new(|_: &Event| Ok(Decision::allow()));
    let _ = slow;
    let handler = SlowAllow(Duration::from_secs(30));
    let (endpoint, stop) = agent(&dir, "a.sock", handler).await;
    let conn = connect(&endpoint).await;
    let pending: Vec<_> = (0..50).map(|i| conn.send(request(&format!("r{i}")))).collect();
    let sent = tokio::spawn(futures_util::future::join_all(pending));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed = tokio::time::Instant::now();
    drop(stop);
    for r in sent.await.unwrap() {
        assert!(matches!(r, Err(TransportError::Closed { .. })), "{r:?}");
    }
    assert!(killed.elapsed() < Duration::from_secs(5), "failed at once, not after the handler's 30 s");
    assert!(!conn.is_open());
    assert!(!conn.signals().borrow().open);
}

struct SlowAllow(Duration);

impl AgentHandler for SlowAllow {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("slow").with_events(EventKind::ALL)
    }

    async fn on_event(&self, _event: Event) -> Result<Decision, AgentError> {
        tokio::time::sleep(self.0).await;
        Ok(Decision::allow())
    }
}

#[tokio::test]
async fn cancel_aborts_one_request_and_leaves_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", SlowAllow(Duration::from_millis(300))).await;
    let conn = connect(&endpoint).await;
    let keep = tokio::spawn(conn.send(request("keep")));
    let drop_me = tokio::spawn(conn.send(request("drop")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.cancel(&"drop".into(), CancelReason::ClientDisconnected);
    assert_eq!(drop_me.await.unwrap(), Err(TransportError::Cancelled(CancelReason::ClientDisconnected)));
    assert!(keep.await.unwrap().unwrap().is_allow());
}

#[tokio::test]
async fn an_agent_that_never_handshakes_leaves_the_handshake_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let _keep = tokio::spawn(async move {
        let (_s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let pending =
        UdsConnector::default().connect(&Endpoint::from(format!("unix:{}", path.display()))).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(200), pending.handshake(Hello::new("p"))).await;
    assert!(r.is_err(), "bounded by the caller's handshake time-out (pool-core's)");
}

#[tokio::test]
async fn a_version_mismatch_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, _stop) = agent(&dir, "a.sock", AllowAll).await;
    let pending = UdsConnector::default().connect(&Endpoint::from(endpoint.as_str())).await.unwrap();
    let hello = Hello { supported_versions: vec![99], ..Hello::new("future-proxy") };
    let err = pending.handshake(hello).await.err().unwrap();
    assert!(
        matches!(err, TransportError::VersionMismatch { ref agent, .. } if agent == &[PROTOCOL_VERSION]),
        "{err:?}"
    );
}

/// A fake agent that handshakes properly, then sends `bytes` raw.
async fn rogue_agent(dir: &tempfile::TempDir, bytes: Vec<u8>) -> String {
    let path = dir.path().join("rogue.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed =
            Framed::new(stream, FrameCodec::<proto::ProxyFrame, proto::AgentFrame>::new(1 << 20));
        let _hello = futures_util::StreamExt::next(&mut framed).await;
        let caps: proto::Capabilities = Capabilities::new("rogue").with_events(EventKind::ALL).into();
        framed
            .send(proto::AgentFrame { stream_id: 0, body: Some(agent_frame::Body::Capabilities(caps)) })
            .await
            .unwrap();
        let _request = futures_util::StreamExt::next(&mut framed).await;
        let mut stream = framed.into_inner();
        stream.write_all(&bytes).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    format!("unix:{}", path.display())
}

#[tokio::test]
async fn garbage_oversized_and_unknown_frames_close_the_connection_with_a_typed_error() {
    let unknown = {
        // Field 15 of AgentFrame does not exist: prost decodes it as a frame with no body.
        let mut body = vec![8, 1, 0x7a, 0];
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.append(&mut body);
        framed
    };
    for (what, bytes) in [
        ("garbage", vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]),
        ("oversized", (u32::MAX).to_be_bytes().to_vec()),
        ("unknown message", unknown),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = rogue_agent(&dir, bytes).await;
        let conn = connect(&endpoint).await;
        let err = conn.send(request("r")).await.unwrap_err();
        let TransportError::Closed { reason, .. } = &err else { panic!("{what}: {err:?}") };
        assert!(reason.contains("protocol error") || reason.contains("limit"), "{what}: {reason}");
        assert!(!conn.is_open(), "{what}");
    }
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves a stale file behind
    let server =
        UdsServer::bind(&path, ServerConfig { mode: Some(0o600), ..ServerConfig::default() }).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(matches!(UdsServer::bind(&path, ServerConfig::default()).await, Err(ServeError::InUse { .. })));
    drop(server);
    assert!(!path.exists(), "the socket file is removed on shutdown");
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        UdsServer::bind(&path, ServerConfig::default()).await,
        Err(ServeError::NotASocket { .. })
    ));
}

#[tokio::test]
async fn agent_signals_reach_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let server = UdsServer::bind(&path, ServerConfig::default()).await.unwrap();
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
