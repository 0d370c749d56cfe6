//! The agent side and the connection's behaviour over real sockets: panics, drain, signals,
//! limits, bad input in both directions, keep-alive, Unix sockets.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{connect, request, request_to, serve, start};
use pool_api::{
    AgentError, AgentHandler, AgentHealth, Capabilities, Decision, Event, EventKind, FlowControl,
    HealthStatus, TransportError,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use transport_grpc::{GrpcAgentServer, GrpcConnector, GrpcConnectorConfig, GrpcRefusal, GrpcServerConfig};

/// Panics on `/panic`, waits on `/slow` until released, allows the rest.
#[derive(Clone, Default)]
struct Moody {
    release: Arc<tokio::sync::Notify>,
}

impl AgentHandler for Moody {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("moody").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        if let Event::RequestHeaders(h) = &event {
            match h.uri.path() {
                "/panic" => panic!("the handler panics on purpose"),
                "/slow" => self.release.notified().await,
                "/fail" => return Err(AgentError::new("no opinion")),
                _ => {}
            }
        }
        Ok(Decision::allow().with_reason(event.correlation_id().as_str()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_an_error_and_the_connection_goes_on() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    let err = conn.send(&request_to("boom", "/panic")).await.unwrap_err();
    let TransportError::Agent(e) = &err else { panic!("{err:?}") };
    assert!(e.message.contains("panicked"), "{e:?}");
    let err = conn.send(&request_to("meh", "/fail")).await.unwrap_err();
    assert_eq!(err, TransportError::Agent(AgentError::new("no opinion")));
    assert!(conn.send(&request("after")).await.unwrap().is_allow());
    assert!(conn.is_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_requests_while_running_ones_finish() {
    let handler = Moody::default();
    let agent = serve(handler.clone(), GrpcServerConfig::default()).await;
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    let mut signals = conn.signals();
    let running = tokio::spawn(conn.send(&request_to("running", "/slow")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.handle.drain().await;
    assert!(agent.handle.is_draining());
    let refused = conn.send(&request("new")).await.unwrap_err();
    assert_eq!(refused, TransportError::Agent(AgentError::new(GrpcRefusal::Draining.to_string())));
    tokio::time::timeout(Duration::from_secs(5), signals.wait_for(|s| !s.health.status.accepts_requests()))
        .await
        .expect("the proxy hears the agent is draining")
        .unwrap();
    handler.release.notify_one();
    let finished = running.await.unwrap().expect("the running request finishes");
    assert_eq!(finished.audit.reason.as_deref(), Some("running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_drain_refuses_new_work_on_that_connection_only() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let connector = GrpcConnector::default();
    let (drained, other) = (
        connect(&connector, &agent.endpoint).await.unwrap(),
        connect(&connector, &agent.endpoint).await.unwrap(),
    );
    drained.drain();
    assert!(drained.signals().borrow().draining);
    let err = drained.send(&request("late")).await.unwrap_err();
    assert!(matches!(err, TransportError::Agent(_)), "{err:?}");
    assert!(other.send(&request("fine")).await.unwrap().is_allow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flow_control_and_metrics_reach_the_proxy() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    let mut signals = conn.signals();
    agent.handle.report_health(AgentHealth::with_status(HealthStatus::Degraded { timeout_multiplier: 2.0 }));
    agent.handle.flow_control(FlowControl::Pause);
    agent.handle.report_metrics([pool_api::AgentMetric::new("rules_loaded", 12.0)]);
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        signals.wait_for(|s| s.flow.paused && matches!(s.health.status, HealthStatus::Degraded { .. })),
    )
    .await
    .expect("signals arrive");
    assert!(seen.is_ok());
    let update = agent.handle.request_config_update(pool_api::ConfigUpdateKind::RequestReload);
    let got = tokio::time::timeout(Duration::from_secs(5), conn.next_config_update()).await.unwrap().unwrap();
    assert_eq!(got.request_id, update);
    let rtt = conn.ping().await.expect("pong");
    assert!(rtt < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_is_refused_and_counted() {
    let config = GrpcServerConfig { max_connections: 1, ..GrpcServerConfig::default() };
    let agent = serve(Moody::default(), config).await;
    let connector = GrpcConnector::default();
    let first = connect(&connector, &agent.endpoint).await.expect("the first connection");
    let second = connect(&connector, &agent.endpoint).await.map(|c| c.label().to_owned());
    assert!(second.is_err(), "{second:?}");
    assert!(agent.handle.limit_stats().connections_refused >= 1);
    assert!(first.send(&request("still")).await.unwrap().is_allow(), "the first is not affected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_fails_alone_before_anything_is_sent() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let connector =
        GrpcConnector::new(GrpcConnectorConfig { max_message: 1024, ..GrpcConnectorConfig::default() });
    let conn = connect(&connector, &agent.endpoint).await.unwrap();
    let big =
        Event::RequestBody(pool_api::BodyChunk::new("big", 0, true, bytes::Bytes::from(vec![7u8; 4096])));
    let err = conn.send(&big).await.unwrap_err();
    let TransportError::MessageTooLarge { size, limit, .. } = err else { panic!("{err:?}") };
    assert!(size > 4096 && limit == 1024, "{size} {limit}");
    assert!(conn.send(&request("small")).await.unwrap().is_allow(), "the connection goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_agents_limit_ends_that_call_with_a_typed_error() {
    let config = GrpcServerConfig { max_message: 1024, ..GrpcServerConfig::default() };
    let agent = serve(Moody::default(), config).await;
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    let big =
        Event::RequestBody(pool_api::BodyChunk::new("big", 0, true, bytes::Bytes::from(vec![7u8; 4096])));
    let err =
        tokio::time::timeout(Duration::from_secs(10), conn.send(&big)).await.expect("no hang").unwrap_err();
    let TransportError::Closed { reason, .. } = &err else { panic!("{err:?}") };
    assert!(reason.contains("OutOfRange") || reason.contains("size"), "{reason}");
    assert!(!conn.is_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_mid_request_fails_the_pending_request_at_once() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    let pending = tokio::spawn(conn.send(&request_to("stuck", "/slow")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close();
    let err =
        tokio::time::timeout(Duration::from_secs(5), pending).await.expect("no hang").unwrap().unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
    // The agent sees the call end and forgets the session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.handle.session_count() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the session outlived the call");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_instead_of_http2_end_the_connection_without_a_hang() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let addr = agent.endpoint.as_str().strip_prefix("grpc://").unwrap().to_owned();
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"\x00\xffthis is not http/2 at all\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut buf),
    )
    .await
    .expect("the agent closes the connection");
    drop(read);
    // And it still serves proxies.
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    assert!(conn.send(&request("fine")).await.unwrap().is_allow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pings_find_a_silent_peer() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let upstream = agent.endpoint.as_str().strip_prefix("grpc://").unwrap().to_owned();
    // A relay that forwards until frozen, then holds both sockets open and moves nothing: the
    // peer looks alive to TCP and says nothing.
    let frozen = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    let freeze = frozen.clone();
    tokio::spawn(async move {
        let (mut down, _) = listener.accept().await.unwrap();
        let mut up = TcpStream::connect(upstream).await.unwrap();
        let (mut down_r, mut down_w) = down.split();
        let (mut up_r, mut up_w) = up.split();
        let a = async {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut down_r, &mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if freeze.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
                if up_w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        let b = async {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut up_r, &mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if freeze.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
                if down_w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(a, b);
    });
    let connector = GrpcConnector::new(GrpcConnectorConfig {
        keep_alive_interval: Duration::from_millis(200),
        keep_alive_timeout: Duration::from_millis(300),
        ..GrpcConnectorConfig::default()
    });
    let conn = connect(&connector, &pool_api::Endpoint::new(format!("grpc://{relay}"))).await.unwrap();
    assert!(conn.send(&request("before")).await.unwrap().is_allow());
    frozen.store(true, Ordering::Release);
    let start = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), conn.send(&request_to("lost", "/slow")))
        .await
        .expect("a silent peer is found out by keep-alive, not by a request time-out")
        .unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let server = GrpcAgentServer::bind_unix(&path, GrpcServerConfig::default()).await.unwrap();
    let agent = start(server, Moody::default());
    assert_eq!(agent.endpoint.as_str(), format!("grpc+unix:{}", path.display()));
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    assert_eq!(conn.send(&request("uds")).await.unwrap().audit.reason.as_deref(), Some("uds"));
    // A live socket is not taken over.
    let again = GrpcAgentServer::bind_unix(&path, GrpcServerConfig::default()).await;
    assert!(matches!(again, Err(transport_grpc::GrpcServeError::InUse { .. })), "{again:?}");
}

#[test]
fn every_zero_limit_is_named() {
    let config =
        GrpcServerConfig { max_connections: 0, write_timeout: Duration::ZERO, ..GrpcServerConfig::default() };
    let err = config.validate().unwrap_err();
    let transport_grpc::GrpcServeError::InvalidConfig { problems } = &err else { panic!("{err:?}") };
    let fields: Vec<_> = problems.iter().map(|(f, _)| *f).collect();
    assert_eq!(fields, ["max_connections", "write_timeout"]);
    assert_eq!(GrpcServerConfig::default().validate().ok(), Some(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_cut_after_the_handshake_timeout() {
    let config = GrpcServerConfig {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(200),
        ..GrpcServerConfig::default()
    };
    let agent = serve(Moody::default(), config).await;
    let addr = agent.endpoint.as_str().strip_prefix("grpc://").unwrap().to_owned();
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut buf))
        .await
        .expect("the silent connection is closed by the agent")
        .ok();
    assert_eq!(agent.handle.limit_stats().handshakes_timed_out, 1);
    // Its slot is free again: the one connection allowed works.
    let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
    assert!(conn.send(&request("after")).await.unwrap().is_allow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_when_their_proxies_close() {
    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    for _ in 0..5 {
        let conn = connect(&GrpcConnector::default(), &agent.endpoint).await.unwrap();
        conn.close();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while agent.handle.session_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sessions still listed",
            agent.handle.session_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_agent_and_health_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let agent = serve(Moody::default(), GrpcServerConfig::default()).await;
    let url = agent.endpoint.as_str().replacen("grpc://", "http://", 1);
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection is served")
        .into_inner();
    let answer: ServerReflectionResponse = answers.message().await.unwrap().expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["agentpool.v1.AgentProtocol", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}
