//! Unit tests of the in-memory transport, all under tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use pool_api::{
    AgentConnection, AgentError, AgentHealth, BodyChunk, CancelReason, Capabilities, ConfigPush, Connector,
    CorrelationId, Decision, Endpoint, Event, EventKind, FlowState, HealthStatus, Hello, PROTOCOL_VERSION,
    RequestHeaders, TransportError,
};
use tokio::time::{Instant, sleep, timeout};

use crate::{AllowAll, BlockPath, ConfigBehaviour, Echo, FnHandler, MemoryAgent, MemoryConnector};

const ENDPOINT: &str = "mem://agent";

fn request(id: impl Into<CorrelationId>, path: &'static str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
}

fn body(id: impl Into<CorrelationId>) -> Event {
    Event::RequestBody(BodyChunk::new(id, 0, true, Bytes::from_static(b"hello")))
}

fn push(push_id: u64) -> ConfigPush {
    ConfigPush { push_id, kind: "rules".to_owned(), version: None, payload: Bytes::from_static(b"{}") }
}

fn serve(agent: &MemoryAgent) -> MemoryConnector {
    let connector = MemoryConnector::new();
    connector.register(ENDPOINT, agent);
    connector
}

async fn connect(connector: &MemoryConnector) -> Result<Arc<dyn AgentConnection>, TransportError> {
    let pending = connector.connect(&Endpoint::from(ENDPOINT)).await?;
    pending.handshake(Hello::new("test-proxy")).await
}

async fn setup<H: pool_api::AgentHandler>(
    handler: H,
) -> (MemoryAgent, MemoryConnector, Arc<dyn AgentConnection>) {
    let agent = MemoryAgent::new(handler);
    let connector = serve(&agent);
    let conn = connect(&connector).await.expect("connects");
    (agent, connector, conn)
}

fn is_closed(result: &Result<Decision, TransportError>) -> bool {
    matches!(result, Err(TransportError::Closed { .. }))
}

// ----- requests ------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn round_trip_allow() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    assert_eq!(conn.label(), "mem://agent#0");
    assert_eq!(conn.capabilities().agent_id, "allow-all");
    assert_eq!(conn.capabilities().protocol_version, PROTOCOL_VERSION);

    let decision = conn.send(&request("r-1", "/")).await.unwrap();
    assert!(decision.is_allow());
    assert_eq!(agent.events_received(), 1);
    assert_eq!(
        agent.events_by_connection(),
        [("mem://agent#0".to_owned(), "r-1".into(), EventKind::RequestHeaders)]
    );
    assert_eq!(agent.pending(), 0);
    assert_eq!(agent.connections_opened(), 1);
    assert_eq!(agent.live_connections(), 1);
    assert_eq!(agent.hellos()[0].proxy_id, "test-proxy");
}

#[tokio::test(start_paused = true)]
async fn block_path_blocks_the_prefix_and_tags_the_rest() {
    let (_agent, _connector, conn) = setup(BlockPath::new("/admin")).await;
    let blocked = conn.send(&request("r-1", "/admin/users")).await.unwrap();
    assert!(matches!(blocked.action, pool_api::Action::Block { status: StatusCode::FORBIDDEN, .. }));
    let allowed = conn.send(&request("r-2", "/shop")).await.unwrap();
    assert!(allowed.is_allow());
    assert_eq!(allowed.response_headers.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_requests_each_get_their_own_answer() {
    let (agent, _connector, conn) = setup(Echo).await;
    agent.set_latency_range(Duration::from_millis(1), Duration::from_millis(50));
    let start = Instant::now();
    let futures: Vec<_> = (0..1000).map(|i| (i, conn.send(&request(format!("r-{i}"), "/")))).collect();
    for (i, future) in futures {
        let decision = future.await.unwrap();
        assert_eq!(decision.audit.reason.as_deref(), Some(format!("r-{i}").as_str()));
    }
    // All in flight at once: the whole batch took the longest latency, not the sum.
    assert!(start.elapsed() <= Duration::from_millis(50));
    assert_eq!(agent.peak_pending(), 1000);
    assert_eq!(agent.pending(), 0);
    assert_eq!(agent.events_received(), 1000);
}

#[tokio::test(start_paused = true)]
async fn two_events_with_the_same_correlation_id_do_not_collide() {
    let (agent, _connector, conn) = setup(Echo).await;
    agent.set_latency(Duration::from_millis(10));
    let headers = conn.send(&request("r-1", "/"));
    let body = conn.send(&body("r-1"));
    assert_eq!(headers.await.unwrap().audit.tags, ["request_headers"]);
    assert_eq!(body.await.unwrap().audit.tags, ["request_body"]);
}

#[tokio::test(start_paused = true)]
async fn latency_is_honoured() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_latency(Duration::from_millis(250));
    let start = Instant::now();
    conn.send(&request("r-1", "/")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn latency_range_is_seeded_and_within_bounds() {
    async fn latencies(seed: u64) -> Vec<Duration> {
        let (agent, _connector, conn) = setup(AllowAll).await;
        agent.set_seed(seed);
        agent.set_latency_range(Duration::from_millis(10), Duration::from_millis(20));
        let mut out = Vec::new();
        for i in 0..20 {
            let start = Instant::now();
            conn.send(&request(format!("r-{i}"), "/")).await.unwrap();
            out.push(start.elapsed());
        }
        out
    }
    let first = latencies(7).await;
    assert!(first.iter().all(|d| (Duration::from_millis(10)..=Duration::from_millis(20)).contains(d)));
    assert!(first.iter().any(|d| *d != first[0]), "a range gives varied latencies");
    assert_eq!(first, latencies(7).await);
    assert_ne!(first, latencies(8).await);
}

#[tokio::test(start_paused = true)]
async fn injected_failures_become_agent_errors() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.fail_next(2);
    for i in 0..2 {
        let err = conn.send(&request(format!("r-{i}"), "/")).await.unwrap_err();
        assert!(matches!(err, TransportError::Agent(_)), "{err:?}");
    }
    assert!(conn.send(&request("r-2", "/")).await.unwrap().is_allow());

    agent.set_failure_rate(1.0);
    assert!(matches!(conn.send(&request("r-3", "/")).await, Err(TransportError::Agent(_))));
    agent.set_failure_rate(0.5);
    let mut failures = 0;
    for i in 0..200 {
        if conn.send(&request(format!("x-{i}"), "/")).await.is_err() {
            failures += 1;
        }
    }
    assert!((50..150).contains(&failures), "{failures} failures out of 200");
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn handler_errors_and_panics_are_agent_errors() {
    let handler = FnHandler::new(|event: &Event| match event.correlation_id().as_str() {
        "err" => Err(AgentError::new("nope")),
        "panic" => panic!("handler bug"),
        _ => Ok(Decision::allow()),
    });
    let (agent, _connector, conn) = setup(handler).await;
    assert_eq!(conn.send(&request("err", "/")).await, Err(TransportError::Agent(AgentError::new("nope"))));
    assert!(matches!(conn.send(&request("panic", "/")).await, Err(TransportError::Agent(_))));
    assert!(conn.send(&request("ok", "/")).await.unwrap().is_allow());
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn unsupported_event_kinds_fail_without_reaching_the_agent() {
    let (agent, _connector, conn) = setup(BlockPath::new("/admin")).await;
    let err = conn.send(&body("r-1")).await.unwrap_err();
    assert_eq!(
        err,
        TransportError::Unsupported { connection: "mem://agent#0".to_owned(), operation: "request_body" }
    );
    agent.settle().await;
    assert_eq!(agent.events_received(), 0);
}

#[tokio::test(start_paused = true)]
async fn max_concurrency_queues_requests_at_the_agent() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_capabilities(Capabilities::new("limited").with_events(EventKind::ALL).with_max_concurrency(2));
    agent.set_latency(Duration::from_millis(10));
    let connector = serve(&agent);
    let conn = connect(&connector).await.unwrap();
    let start = Instant::now();
    let futures: Vec<_> = (0..4).map(|i| conn.send(&request(format!("r-{i}"), "/"))).collect();
    for future in futures {
        future.await.unwrap();
    }
    // Two at a time, two rounds.
    assert_eq!(start.elapsed(), Duration::from_millis(20));
}

// ----- connection death, cancel, abandon -----------------------------------------------------

#[tokio::test(start_paused = true)]
async fn disconnect_all_fails_every_pending_request_at_once() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = serve(&agent);
    let a = connect(&connector).await.unwrap();
    let b = connect(&connector).await.unwrap();
    agent.set_latency(Duration::from_secs(1));
    let mut signals = a.signals();
    let start = Instant::now();
    let futures: Vec<_> =
        (0..10).map(|i| if i % 2 == 0 { &a } else { &b }.send(&request(format!("r-{i}"), "/"))).collect();
    sleep(Duration::from_millis(10)).await;
    assert_eq!(agent.pending(), 10);

    agent.disconnect_all();
    assert!(!signals.borrow_and_update().open);
    assert_eq!(agent.live_connections(), 0);
    for future in futures {
        let result = future.await;
        assert!(is_closed(&result), "{result:?}");
    }
    assert_eq!(start.elapsed(), Duration::from_millis(10), "failed before their latency elapsed");
    assert_eq!(agent.pending(), 0);

    // Later calls fail at once.
    let err = a.send(&request("late", "/")).await.unwrap_err();
    assert_eq!(
        err,
        TransportError::Closed {
            connection: "mem://agent#0".to_owned(),
            reason: "the agent closed the connection".to_owned()
        }
    );
    assert!(matches!(b.ping().await, Err(TransportError::Closed { .. })));
    assert_eq!(start.elapsed(), Duration::from_millis(10));

    // The agent still accepts new connections, with the next label.
    let c = connect(&connector).await.unwrap();
    assert_eq!(c.label(), "mem://agent#2");
    assert!(c.send(&request("r-new", "/")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn one_connection_can_be_killed_alone() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = serve(&agent);
    let a = connect(&connector).await.unwrap();
    let b = connect(&connector).await.unwrap();
    agent.connection_by_label("mem://agent#1").unwrap().disconnect();
    assert!(a.signals().borrow().open);
    assert!(!b.signals().borrow().open);
    assert!(a.send(&request("r-1", "/")).await.is_ok());
    assert!(b.send(&request("r-2", "/")).await.is_err());
    assert_eq!(agent.live_connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn cancel_fails_only_the_cancelled_request() {
    let (agent, _connector, conn) = setup(Echo).await;
    agent.set_latency(Duration::from_millis(100));
    let first = conn.send(&request("r-1", "/"));
    let second = conn.send(&request("r-2", "/"));
    sleep(Duration::from_millis(10)).await;

    conn.cancel(&"r-1".into(), CancelReason::Timeout);
    assert_eq!(first.await, Err(TransportError::Cancelled(CancelReason::Timeout)));
    assert_eq!(agent.pending(), 1);
    let start = Instant::now();
    assert_eq!(second.await.unwrap().audit.reason.as_deref(), Some("r-2"));
    assert_eq!(start.elapsed(), Duration::from_millis(90));
    assert_eq!(agent.cancels(), [("mem://agent#0".to_owned(), "r-1".into(), CancelReason::Timeout)]);
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn cancel_hits_every_event_of_the_correlation_id_on_this_connection_only() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_silent(true);
    let connector = serve(&agent);
    let a = connect(&connector).await.unwrap();
    let b = connect(&connector).await.unwrap();
    let a1 = a.send(&request("r-1", "/"));
    let a2 = a.send(&body("r-1"));
    let b1 = b.send(&request("r-1", "/"));
    a.cancel(&"r-1".into(), CancelReason::ClientDisconnected);
    assert_eq!(a1.await, Err(TransportError::Cancelled(CancelReason::ClientDisconnected)));
    assert_eq!(a2.await, Err(TransportError::Cancelled(CancelReason::ClientDisconnected)));
    assert_eq!(agent.pending(), 1);
    assert!(timeout(Duration::from_secs(5), b1).await.is_err(), "other connection untouched");
    agent.settle().await;
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_send_future_abandons_the_request() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_latency(Duration::from_secs(1));
    let future = conn.send(&request("r-1", "/"));
    let kept = conn.send(&request("r-2", "/"));
    sleep(Duration::from_millis(1)).await;
    assert_eq!(agent.pending(), 2);

    drop(future);
    agent.settle().await;
    assert_eq!(agent.pending(), 1);
    assert_eq!(agent.cancels(), [("mem://agent#0".to_owned(), "r-1".into(), CancelReason::Abandoned)]);
    assert!(kept.await.is_ok());
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_send_is_abandoned() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_silent(true);
    assert!(timeout(Duration::from_millis(100), conn.send(&request("r-1", "/"))).await.is_err());
    agent.settle().await;
    assert_eq!(agent.pending(), 0);
    assert_eq!(agent.cancels()[0].2, CancelReason::Abandoned);
}

#[tokio::test(start_paused = true)]
async fn an_answered_request_is_not_abandoned_when_dropped() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    let future = conn.send(&request("r-1", "/"));
    agent.settle().await;
    sleep(Duration::from_millis(1)).await; // the answer comes back
    drop(future);
    agent.settle().await;
    assert!(agent.cancels().is_empty());
    assert_eq!(agent.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn close_fails_pending_requests_and_is_recorded() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_silent(true);
    let future = conn.send(&request("r-1", "/"));
    let ping = conn.ping();
    conn.close();
    assert!(!conn.signals().borrow().open);
    assert!(is_closed(&future.await));
    assert!(matches!(ping.await, Err(TransportError::Closed { .. })));
    agent.settle().await;
    assert_eq!(agent.closes(), ["mem://agent#0"]);
    assert_eq!(agent.pending(), 0);
    assert_eq!(agent.live_connections(), 0);
    assert!(is_closed(&conn.send(&request("r-2", "/")).await));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_connection_closes_it() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    let signals = conn.signals();
    drop(conn);
    sleep(Duration::from_millis(1)).await;
    assert!(!signals.borrow().open);
    assert_eq!(agent.live_connections(), 0);
    assert!(agent.closes().is_empty(), "a drop is not a close");
}

#[tokio::test(start_paused = true)]
async fn a_pending_send_keeps_a_dropped_connection_alive() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_latency(Duration::from_millis(10));
    let future = conn.send(&request("r-1", "/"));
    drop(conn);
    assert!(future.await.is_ok());
    sleep(Duration::from_millis(1)).await;
    assert_eq!(agent.live_connections(), 0);
}

// ----- connect and handshake -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn handshake_silence_never_completes() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_handshake_silent(true);
    let connector = serve(&agent);
    let pending = connector.connect(&Endpoint::from(ENDPOINT)).await.unwrap();
    let handshake = pending.handshake(Hello::new("p"));
    assert!(timeout(Duration::from_secs(3600), handshake).await.is_err());
    assert_eq!(agent.connections_opened(), 0);

    // The agent hanging up ends a stuck handshake.
    let pending = connector.connect(&Endpoint::from(ENDPOINT)).await.unwrap();
    let handshake = tokio::spawn(pending.handshake(Hello::new("p")));
    sleep(Duration::from_millis(1)).await;
    agent.disconnect_all();
    assert!(matches!(handshake.await.unwrap(), Err(TransportError::Handshake { .. })));
}

#[tokio::test(start_paused = true)]
async fn connect_silence_never_completes() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_connect_silent(true);
    let connector = serve(&agent);
    assert!(timeout(Duration::from_secs(60), connector.connect(&Endpoint::from(ENDPOINT))).await.is_err());
    assert_eq!(agent.connect_attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn version_mismatch_fails_the_handshake() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_protocol_versions([7, 8]);
    let connector = serve(&agent);
    let err = connect(&connector).await.err().unwrap();
    assert_eq!(
        err,
        TransportError::VersionMismatch {
            endpoint: ENDPOINT.to_owned(),
            proxy: vec![PROTOCOL_VERSION],
            agent: vec![7, 8]
        }
    );

    // The highest shared version is chosen.
    let pending = connector.connect(&Endpoint::from(ENDPOINT)).await.unwrap();
    let hello = Hello { supported_versions: vec![1, 7, 8, 9], ..Hello::new("p") };
    let conn = pending.handshake(hello).await.unwrap();
    assert_eq!(conn.capabilities().protocol_version, 8);
}

#[tokio::test(start_paused = true)]
async fn refused_and_unknown_endpoints_fail_to_connect() {
    let agent = MemoryAgent::new(AllowAll);
    agent.refuse_connections(true);
    let connector = serve(&agent);
    let refused = |err: TransportError| {
        matches!(err, TransportError::Connect { kind: Some(std::io::ErrorKind::ConnectionRefused), .. })
    };
    assert!(refused(connect(&connector).await.err().unwrap()));
    assert_eq!(agent.connect_attempts(), 1);

    let unknown = connector.connect(&Endpoint::from("mem://nobody")).await.err().unwrap();
    assert!(refused(unknown));

    agent.refuse_connections(false);
    assert!(connect(&connector).await.is_ok());
    assert!(connector.unregister(ENDPOINT).is_some());
    assert!(refused(connect(&connector).await.err().unwrap()));
}

#[tokio::test(start_paused = true)]
async fn capabilities_can_be_overridden() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_capabilities(Capabilities::new("custom").with_events([EventKind::RequestBody]));
    let connector = serve(&agent);
    let conn = connect(&connector).await.unwrap();
    assert_eq!(conn.capabilities().agent_id, "custom");
    assert!(matches!(conn.send(&request("r-1", "/")).await, Err(TransportError::Unsupported { .. })));
    assert!(conn.send(&body("r-1")).await.is_ok());
}

// ----- signals, ping, drain, config ----------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn flow_control_and_health_are_published_on_signals() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = serve(&agent);
    let a = connect(&connector).await.unwrap();
    let b = connect(&connector).await.unwrap();
    let mut signals = a.signals();
    assert_eq!(*signals.borrow_and_update(), pool_api::ConnectionSignals::open());

    agent.pause_all();
    assert!(signals.has_changed().unwrap());
    assert!(signals.borrow_and_update().flow.paused);
    assert!(b.signals().borrow().flow.paused);

    agent.set_capacity_all(3);
    agent.resume_all();
    assert_eq!(signals.borrow_and_update().flow, FlowState { paused: false, capacity: Some(3) });

    agent.connection(1).unwrap().pause();
    assert!(!a.signals().borrow().flow.paused);
    assert!(b.signals().borrow().flow.paused);

    let degraded = AgentHealth::with_status(HealthStatus::Degraded { timeout_multiplier: 2.0 });
    agent.report_health(degraded.clone());
    assert_eq!(signals.borrow_and_update().health, degraded);
    assert_eq!(b.signals().borrow().health, degraded);
    // A new connection starts with the agent's last health report.
    let c = connect(&connector).await.unwrap();
    assert_eq!(c.signals().borrow().health, degraded);

    // A waiter wakes on a change.
    let waiter = tokio::spawn(async move {
        signals.wait_for(|s| s.health.status == HealthStatus::Unhealthy).await.map(|_| ()).is_ok()
    });
    sleep(Duration::from_millis(1)).await;
    agent.report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    assert!(waiter.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn drain_is_published_and_recorded_and_requests_go_on() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    agent.set_latency(Duration::from_millis(10));
    let pending = conn.send(&request("r-1", "/"));
    conn.drain();
    assert!(conn.signals().borrow().draining);
    assert!(conn.signals().borrow().open);
    assert!(pending.await.is_ok());
    assert_eq!(agent.drains(), ["mem://agent#0"]);
}

#[tokio::test(start_paused = true)]
async fn ping_answers_unless_silent() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    assert_eq!(conn.ping().await.unwrap(), Duration::ZERO);
    agent.set_silent(true);
    assert!(timeout(Duration::from_secs(10), conn.ping()).await.is_err());
    assert_eq!(agent.pings().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn config_push_accept_reject_never() {
    let (agent, _connector, conn) = setup(AllowAll).await;
    let ack = conn.push_config(push(1)).await.unwrap();
    assert!(ack.accepted);
    assert_eq!(ack.push_id, 1);

    agent.set_config_behaviour(ConfigBehaviour::Reject("bad rules".to_owned()));
    let ack = conn.push_config(push(2)).await.unwrap();
    assert!(!ack.accepted);
    assert_eq!(ack.error.as_deref(), Some("bad rules"));

    agent.set_config_behaviour(ConfigBehaviour::Never);
    assert!(timeout(Duration::from_secs(60), conn.push_config(push(3))).await.is_err());
    let unanswered = conn.push_config(push(4));
    agent.disconnect_all();
    assert!(matches!(unanswered.await, Err(TransportError::Closed { .. })));

    let pushes: Vec<u64> = agent.config_pushes().iter().map(|(_, p)| p.push_id).collect();
    assert_eq!(pushes, [1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn config_push_uses_the_handler_and_the_capabilities() {
    // BlockPath keeps the default on_config (reject) and announces no config push.
    let (agent, _connector, conn) = setup(BlockPath::new("/x")).await;
    assert!(matches!(conn.push_config(push(1)).await, Err(TransportError::Unsupported { .. })));
    agent.set_capabilities(
        Capabilities::new("block-path")
            .with_features(pool_api::Features { config_push: true, ..Default::default() }),
    );
    let connector = serve(&agent);
    let conn = connect(&connector).await.unwrap();
    let ack = conn.push_config(push(2)).await.unwrap();
    assert!(!ack.accepted, "the default handler rejects");
    agent.set_config_behaviour(ConfigBehaviour::Accept);
    assert!(conn.push_config(push(3)).await.unwrap().accepted);
}

#[tokio::test(start_paused = true)]
async fn malformed_endpoints_are_refused_without_dialling() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = serve(&agent);
    for good in ["mem://agent", "mem://nobody", "unix:/run/waf.sock", "grpc+tls://10.0.0.5:50051"] {
        assert_eq!(connector.validate_endpoint(&Endpoint::from(good)), Ok(()), "{good}");
    }
    for (bad, why) in [
        ("waf", "expected scheme:address"),
        ("", "expected scheme:address"),
        ("mem://", "nothing follows the scheme \"mem\""),
        ("mem:", "nothing follows the scheme"),
        ("://waf", "\"\" is not a scheme"),
        ("1mem://waf", "\"1mem\" is not a scheme"),
        ("mem://w af", "contains ' '"),
        (" mem://waf", "contains ' '"),
        ("mem://waf\n", "contains '\\n'"),
    ] {
        let endpoint = Endpoint::from(bad);
        let err = connector.validate_endpoint(&endpoint).unwrap_err();
        let TransportError::InvalidEndpoint { endpoint: named, message } = &err else {
            panic!("{bad:?}: {err:?}");
        };
        assert_eq!(named, bad);
        assert!(message.contains(why), "{bad:?}: {message}");
        assert_eq!(connector.connect(&endpoint).await.err(), Some(err), "connect agrees on {bad:?}");
    }
    assert_eq!(agent.connect_attempts(), 0, "nothing reached the agent");
}

#[tokio::test(start_paused = true)]
async fn a_connector_limited_to_some_schemes_refuses_the_others() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = MemoryConnector::new().with_schemes(["unix"]);
    connector.register("unix:/run/waf.sock", &agent);
    connector.register("uds:/run/waf.sock", &agent);
    assert_eq!(connector.validate_endpoint(&Endpoint::from("unix:/run/waf.sock")), Ok(()));
    let typo = Endpoint::from("uds:/run/waf.sock");
    let err = connector.validate_endpoint(&typo).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid endpoint \"uds:/run/waf.sock\": unknown scheme \"uds\": this connector serves [\"unix\"]"
    );
    assert_eq!(connector.connect(&typo).await.err(), Some(err), "even with an agent registered there");
    let pending = connector.connect(&Endpoint::from("unix:/run/waf.sock")).await.unwrap();
    assert!(pending.handshake(Hello::new("p")).await.is_ok());
    assert_eq!(agent.connect_attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn labels_count_connections_per_agent() {
    let agent = MemoryAgent::new(AllowAll);
    let connector = serve(&agent);
    connector.register("unix:/run/waf.sock", &agent);
    let first = connect(&connector).await.unwrap();
    let pending = connector.connect(&Endpoint::from("unix:/run/waf.sock")).await.unwrap();
    let second = pending.handshake(Hello::new("p")).await.unwrap();
    assert_eq!(first.label(), "mem://agent#0");
    assert_eq!(second.label(), "unix:/run/waf.sock#1");
    let labels: Vec<String> = agent.connections().iter().map(|c| c.label().to_owned()).collect();
    assert_eq!(labels, ["mem://agent#0", "unix:/run/waf.sock#1"]);
    first.send(&request("a", "/")).await.unwrap();
    second.send(&request("b", "/")).await.unwrap();
    let seen: Vec<String> = agent.events_by_connection().into_iter().map(|(label, ..)| label).collect();
    assert_eq!(seen, ["mem://agent#0", "unix:/run/waf.sock#1"]);
}

// ----- races, on real threads ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cancels_and_abandons_race_without_leaking() {
    let (agent, _connector, conn) = setup(Echo).await;
    agent.set_latency_range(Duration::ZERO, Duration::from_micros(500));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let conn = Arc::clone(&conn);
        tasks.spawn(async move {
            let id = format!("r-{i}");
            let future = conn.send(&request(id.clone(), "/"));
            match i % 3 {
                0 => {
                    let decision = future.await.unwrap();
                    assert_eq!(decision.audit.reason.as_deref(), Some(id.as_str()));
                }
                1 => {
                    conn.cancel(&id.clone().into(), CancelReason::Manual);
                    match future.await {
                        Ok(d) => assert_eq!(d.audit.reason.as_deref(), Some(id.as_str())),
                        Err(e) => assert_eq!(e, TransportError::Cancelled(CancelReason::Manual)),
                    }
                }
                _ => {
                    tokio::task::yield_now().await;
                    drop(future);
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    agent.settle().await;
    assert_eq!(agent.pending(), 0);
    assert_eq!(agent.events_received(), 500);
}
