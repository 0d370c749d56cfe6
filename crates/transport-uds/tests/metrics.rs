//! Metrics an agent reports reach the proxy's `metrics` recorder.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pool_api::{AgentMetric, Connector, Endpoint, Hello};
use test_support::AllowAll;
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_metrics_report_is_recorded_as_labelled_gauges() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let server = UdsServer::bind(&path, UdsServerConfig::default()).await.unwrap();
    let handle = server.handle();
    tokio::spawn(server.serve(AllowAll, std::future::pending()));
    let pending =
        UdsConnector::default().connect(&Endpoint::new(format!("unix:{}", path.display()))).await.unwrap();
    let conn = pending.handshake(Hello::new("p")).await.unwrap();
    while handle.connection_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.report_metrics([
        AgentMetric::new("rules_loaded", 1234.0).with_label("rule_set", "crs"),
        AgentMetric::new("queue_depth", 3.0),
        AgentMetric::new("broken", f64::NAN),
    ]);
    // A ping is answered after the report was read: the report has been recorded by then.
    conn.ping().await.unwrap();

    let gauges: Vec<(Vec<(String, String)>, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, _)| k.key().name() == "agentpool_agent_metric")
        .map(|(k, _, _, v)| {
            let labels = k.key().labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
            (labels, v)
        })
        .collect();
    let find = |metric: &str| {
        gauges
            .iter()
            .find(|(labels, _)| labels.iter().any(|(k, v)| k == "metric" && v == metric))
            .unwrap_or_else(|| panic!("{metric} not recorded: {gauges:?}"))
    };
    let (labels, value) = find("rules_loaded");
    assert_eq!(value, &DebugValue::Gauge(1234.0.into()));
    assert!(labels.contains(&("rule_set".into(), "crs".into())), "{labels:?}");
    assert!(labels.iter().any(|(k, v)| k == "connection" && v == conn.label()), "{labels:?}");
    assert_eq!(find("queue_depth").1, DebugValue::Gauge(3.0.into()));
    assert!(
        !gauges.iter().any(|(labels, _)| labels.iter().any(|(_, v)| v == "broken")),
        "a NaN is dropped, not exported"
    );
}
