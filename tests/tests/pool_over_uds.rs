//! pool-core over the Unix-socket transport, against a real agent server.

use std::time::Duration;

use http::{Method, Uri};
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig, PoolError};
use tokio::sync::oneshot;
use tokio::time::Instant;
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};

fn request(id: String) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/")))
}

struct Waf {
    latency: Duration,
}

impl AgentHandler for Waf {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("waf").with_events([EventKind::RequestHeaders]).with_max_concurrency(64)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        tokio::time::sleep(self.latency).await;
        Ok(Decision::allow().with_reason(event.correlation_id().to_string()))
    }
}

async fn start(path: &std::path::Path, latency: Duration) -> oneshot::Sender<()> {
    let server = UdsServer::bind(path, UdsServerConfig::default()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(Waf { latency }, async move {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_serves_over_uds_survives_an_agent_crash_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("waf.sock");
    let stop = start(&path, Duration::from_millis(1)).await;
    let mut config = PoolConfig::default();
    config.reconnect.base = Duration::from_millis(20);
    config.reconnect.cap = Duration::from_millis(200);
    let pool = AgentPool::new(config, UdsConnector::default()).unwrap();
    let report =
        pool.add_agent(AgentSpec::new("waf").endpoint(format!("unix:{}", path.display()))).await.unwrap();
    assert_eq!(report.connected, 4);
    for i in 0..200 {
        let d = pool.send("waf", &request(format!("r{i}"))).await.unwrap();
        assert_eq!(d.audit.reason, Some(format!("r{i}")));
    }

    // Slow requests in flight, then the agent dies: all fail at once.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let slow = start(&path, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // reconnected to the slow agent
    let inflight: Vec<_> = (0..20)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("s{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Instant::now();
    drop(slow);
    for r in inflight {
        let err = r.await.unwrap().unwrap_err();
        assert!(matches!(err, PoolError::Transport { .. }), "{err:?}");
    }
    let failed_after = killed.elapsed();
    assert!(failed_after < Duration::from_secs(5), "failed at once ({failed_after:?}), not after 30 s");

    // The agent comes back: the pool reconnects on its own.
    let _again = start(&path, Duration::from_millis(1)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.agent_stats("waf").unwrap().totals.connected < 4 {
        assert!(Instant::now() < deadline, "did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pool.send("waf", &request("back".into())).await.unwrap().is_allow());
    pool.shutdown().await;
}
