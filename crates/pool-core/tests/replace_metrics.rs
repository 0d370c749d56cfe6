//! An agent's gauges across `AgentPool::replace_agent`, read back through a real recorder. One
//! test: the recorder is global.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{allow_all, config, request};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pool_api::{Capabilities, EventKind};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::MemoryConnector;

/// Every `agent = "waf"` gauge. Reading resets the debugging recorder's gauges to 0, so a test
/// reads once per moment it checks.
fn gauges(snapshotter: &Snapshotter) -> HashMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            DebugValue::Gauge(g)
                if k.kind() == MetricKind::Gauge
                    && k.key().labels().any(|l| l.key() == "agent" && l.value() == "waf") =>
            {
                Some((k.key().name().to_owned(), g.into_inner()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_connection_and_in_flight_gauges_count_one_agent_across_a_replacement() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let (a, b) = (allow_all(), allow_all());
    a.set_latency(Duration::from_secs(1));
    // Headers only: no request is pinned, so the old agent retires once its request is done.
    a.set_capabilities(Capabilities::new("waf").with_events([EventKind::RequestHeaders]));
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b1", &b);
    connector.register("mem://b2", &b);
    let pool = AgentPool::new(PoolConfig { connections_per_endpoint: 3, ..config() }, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://a")).await.unwrap();
    let before = gauges(&snapshotter);
    assert_eq!((before["agentpool_connections"], before["agentpool_in_flight"]), (3.0, 0.0));

    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let report = pool.replace_agent(AgentSpec::new("waf").endpoints(["mem://b1", "mem://b2"])).await.unwrap();
    assert_eq!(report.connected, 6);
    pool.send("waf", &request("new")).await.unwrap();
    // The old agent's request finishes on its connection, then the old agent retires.
    assert!(a.pending() == 1 && a.live_connections() == 3);
    slow.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.live_connections(), 0, "the old agent retired");
    // The gauge is the new agent's from the swap on: the old agent's connections closing did
    // not set it. Both agents' requests went through the one in-flight gauge, back to 0.
    let after = gauges(&snapshotter);
    assert_eq!(after["agentpool_connections"], 6.0, "{after:?}");
    assert_eq!(after["agentpool_in_flight"], 0.0, "{after:?}");
    assert_eq!(after["agentpool_healthy_connections"], 6.0, "{after:?}");
    pool.shutdown().await;
    assert_eq!(gauges(&snapshotter)["agentpool_connections"], 0.0);
}
