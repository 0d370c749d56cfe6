//! A WAF agent (test-support's `BlockPath`) reached through pool-core: decisions, header
//! mutations and a replica failure, seen end to end through the pool-api vocabulary.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use pool_api::{Action, Event, HeaderOp, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::{BlockPath, MemoryAgent, MemoryConnector};
use tower::ServiceExt;

fn get(id: &str, path: &'static str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
}

#[tokio::test(start_paused = true)]
async fn a_waf_blocks_admin_and_tags_the_rest_across_replicas_and_a_crash() {
    let header = HeaderName::from_static("x-waf");
    let replicas: Vec<MemoryAgent> = (0..2)
        .map(|_| {
            MemoryAgent::new(
                BlockPath::new("/admin").with_header(header.clone(), HeaderValue::from_static("ok")),
            )
        })
        .collect();
    let connector = MemoryConnector::new();
    connector.register("mem://waf-1", &replicas[0]);
    connector.register("mem://waf-2", &replicas[1]);
    let pool = AgentPool::new(PoolConfig { seed: Some(1), ..PoolConfig::default() }, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://waf-1", "mem://waf-2"])).await.unwrap();

    let blocked = pool.send("waf", &get("r1", "/admin/users")).await.unwrap();
    assert!(matches!(blocked.action, Action::Block { status, .. } if status == StatusCode::FORBIDDEN));
    let allowed = pool.send("waf", &get("r2", "/")).await.unwrap();
    assert!(allowed.is_allow());
    assert!(
        allowed.response_headers.iter().any(|op| matches!(op, HeaderOp::Add { name, .. } if *name == header))
    );

    // One replica crashes: the other answers everything meanwhile.
    replicas[0].refuse_connections(true);
    replicas[0].disconnect_all();
    for i in 0..20 {
        let d = pool.service("waf").unwrap().oneshot(get(&format!("c{i}"), "/")).await.unwrap();
        assert!(d.is_allow());
    }
    assert_eq!(pool.agent_stats("waf").unwrap().totals.connected, 4);
    replicas[0].refuse_connections(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pool.agent_stats("waf").unwrap().totals.connected, 8);
    let report = pool.shutdown().await;
    assert_eq!(report.forced, 0);
}
