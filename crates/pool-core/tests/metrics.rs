//! The pool's metrics, read back through a real recorder. One test: the recorder is global.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use pool_core::{AgentOptions, AgentSpec, FailureMode, PoolConfig};

fn value<'a>(
    snapshot: &'a [(CompositeKey, DebugValue)],
    kind: MetricKind,
    name: &str,
    agent: &str,
) -> Option<&'a DebugValue> {
    snapshot
        .iter()
        .find(|(k, _)| {
            k.kind() == kind
                && k.key().name() == name
                && k.key().labels().any(|l| l.key() == "agent" && l.value() == agent)
        })
        .map(|(_, v)| v)
}

#[tokio::test(start_paused = true)]
async fn requests_failures_timeouts_latency_connections_and_breakers_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let agent = allow_all();
    let cfg = PoolConfig { connections_per_endpoint: 2, request_timeout: Duration::from_secs(1), ..config() };
    let (pool, connector) = common::single(cfg, &agent).await;
    for i in 0..10 {
        pool.send("waf", &request(format!("ok{i}"))).await.unwrap();
    }
    agent.fail_next(2);
    for i in 0..2 {
        let _ = pool.send("waf", &request(format!("f{i}"))).await;
    }
    agent.set_silent(true);
    let _ = pool.send("waf", &request("slow")).await;

    // Two agents nothing can reach: one fails closed, one fails open.
    let down = allow_all();
    down.refuse_connections(true);
    connector.register("mem://down", &down);
    let open = AgentOptions { failure_mode: Some(FailureMode::Open), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("closed-down").endpoint("mem://down")).await.unwrap();
    pool.add_agent(AgentSpec::new("open-down").endpoint("mem://down").options(open)).await.unwrap();
    for i in 0..2 {
        assert!(pool.send("closed-down", &request(format!("c{i}"))).await.is_err());
    }
    for i in 0..3 {
        assert!(pool.send("open-down", &request(format!("o{i}"))).await.unwrap().is_allow());
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // a maintenance tick updates gauges

    let snap: Vec<(CompositeKey, DebugValue)> =
        snapshotter.snapshot().into_vec().into_iter().map(|(k, _, _, v)| (k, v)).collect();
    let counter = |name| value(&snap, MetricKind::Counter, name, "waf");
    let gauge = |name| value(&snap, MetricKind::Gauge, name, "waf");
    assert_eq!(counter("agentpool_requests_total"), Some(&DebugValue::Counter(13)));
    assert_eq!(counter("agentpool_request_failures_total"), Some(&DebugValue::Counter(3)));
    assert_eq!(counter("agentpool_request_timeouts_total"), Some(&DebugValue::Counter(1)));
    assert_eq!(gauge("agentpool_in_flight"), Some(&DebugValue::Gauge(0.0.into())));
    assert_eq!(gauge("agentpool_connections"), Some(&DebugValue::Gauge(2.0.into())));
    assert_eq!(gauge("agentpool_healthy_connections"), Some(&DebugValue::Gauge(2.0.into())));
    assert_eq!(gauge("agentpool_breaker_state"), Some(&DebugValue::Gauge(0.0.into())));
    let Some(DebugValue::Histogram(latencies)) =
        value(&snap, MetricKind::Histogram, "agentpool_request_duration_seconds", "waf")
    else {
        panic!("no latency histogram")
    };
    assert_eq!(latencies.len(), 12, "answers (successes and agent errors) are timed");

    let count = |name, agent| match value(&snap, MetricKind::Counter, name, agent) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name}: {other:?}"),
    };
    assert_eq!(count("agentpool_unavailable_total", "closed-down"), 2);
    assert_eq!(count("agentpool_unavailable_rejected_total", "closed-down"), 2);
    assert_eq!(count("agentpool_fail_open_total", "closed-down"), 0);
    assert_eq!(count("agentpool_unavailable_total", "open-down"), 3);
    assert_eq!(count("agentpool_unavailable_rejected_total", "open-down"), 0);
    assert_eq!(count("agentpool_fail_open_total", "open-down"), 3);
    assert_eq!(count("agentpool_unavailable_rejected_total", "waf"), 0);
}
