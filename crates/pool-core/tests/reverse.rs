//! Reverse connections: agents that dial the proxy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::{AgentConnection, Connector, Endpoint, Hello};
use pool_core::outlier::OutlierConfig;
use pool_core::{AgentPool, AgentSpec, PoolConfig, PoolError, ReverseConfig, ReverseRegistration};
use test_support::{MemoryAgent, MemoryConnector};

fn reverse_config() -> PoolConfig {
    PoolConfig {
        reverse: ReverseConfig {
            tokens: vec!["s3cret".into()],
            allowed_agents: vec!["waf".into(), "bot".into()],
        },
        ..config()
    }
}

/// What a transport's listener produces: an established, handshaken connection.
async fn dial(connector: &MemoryConnector, endpoint: &str) -> Arc<dyn AgentConnection> {
    let pending = connector.connect(&Endpoint::from(endpoint)).await.unwrap();
    pending.handshake(Hello::new("proxy")).await.unwrap()
}

fn registration(
    agent: &str,
    replica: &str,
    token: Option<&str>,
    connection: Arc<dyn AgentConnection>,
) -> ReverseRegistration {
    ReverseRegistration {
        agent_id: agent.into(),
        replica_id: replica.into(),
        token: token.map(Into::into),
        connection,
    }
}

#[tokio::test(start_paused = true)]
async fn a_reverse_agent_is_registered_and_serves_requests() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf-1", &agent);
    let pool = AgentPool::new(reverse_config(), MemoryConnector::new()).unwrap();
    pool.add_reverse_connection(registration(
        "waf",
        "r1",
        Some("s3cret"),
        dial(&connector, "mem://waf-1").await,
    ))
    .unwrap();
    assert!(pool.has_agent("waf"));
    assert!(pool.send("waf", &request("x")).await.unwrap().is_allow());
    let stats = pool.agent_stats("waf").unwrap();
    assert_eq!((stats.totals.connections, stats.totals.connected), (1, 1));
    assert_eq!(stats.endpoints[0].endpoint, "reverse://waf/r1");
}

#[tokio::test(start_paused = true)]
async fn wrong_missing_or_unlisted_registrations_are_refused_and_closed() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://a", &agent);
    let pool = AgentPool::new(reverse_config(), MemoryConnector::new()).unwrap();
    for (id, token, reason) in [
        ("waf", Some("wrong"), "invalid token"),
        ("waf", None, "no token presented"),
        ("intruder", Some("s3cret"), "agent id is not on the allow-list"),
    ] {
        let err = pool
            .add_reverse_connection(registration(id, "r", token, dial(&connector, "mem://a").await))
            .unwrap_err();
        assert_eq!(err, PoolError::Unauthorized { agent: id.into(), reason });
    }
    assert_eq!(pool.agent_count(), 0);
    agent.settle().await;
    assert_eq!(agent.live_connections(), 0, "refused connections are closed");

    let closed = AgentPool::new(config(), MemoryConnector::new()).unwrap();
    let err =
        closed.add_reverse_connection(registration("waf", "r", Some("x"), dial(&connector, "mem://a").await));
    assert!(matches!(err, Err(PoolError::Unauthorized { reason, .. }) if reason.contains("disabled")));
}

#[tokio::test(start_paused = true)]
async fn several_replicas_each_add_a_connection_and_a_closed_one_is_removed() {
    let (one, two) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://one", &one);
    connector.register("mem://two", &two);
    let pool = AgentPool::new(reverse_config(), MemoryConnector::new()).unwrap();
    pool.add_reverse_connection(registration(
        "waf",
        "one",
        Some("s3cret"),
        dial(&connector, "mem://one").await,
    ))
    .unwrap();
    pool.add_reverse_connection(registration(
        "waf",
        "two",
        Some("s3cret"),
        dial(&connector, "mem://two").await,
    ))
    .unwrap();
    for i in 0..20 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert!(one.events_received() > 0 && two.events_received() > 0);
    one.disconnect_all();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let stats = pool.agent_stats("waf").unwrap();
    assert_eq!((stats.totals.connections, stats.totals.connected), (1, 1), "the closed replica is gone");
    assert_eq!(stats.endpoints.len(), 1);
    pool.send("waf", &request("after")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_reconnects_ten_times_is_still_one_healthy_entry() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(reverse_config(), MemoryConnector::new()).unwrap();
    for round in 0..10 {
        // Half the time the old connection is already gone, half the time it is still open.
        if round % 2 == 1 {
            agent.disconnect_all();
        }
        let conn = dial(&connector, "mem://waf").await;
        pool.add_reverse_connection(registration("waf", "r1", Some("s3cret"), conn)).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let stats = pool.agent_stats("waf").unwrap();
        assert_eq!(
            (stats.totals.connections, stats.totals.connected, stats.totals.healthy),
            (1, 1, 1),
            "round {round}"
        );
        assert!(pool.send("waf", &request(format!("r{round}"))).await.unwrap().is_allow());
    }
    assert_eq!(agent.live_connections(), 1, "every replaced connection was closed");
}

#[tokio::test(start_paused = true)]
async fn a_reverse_replica_joins_an_agent_that_has_configured_endpoints() {
    let (fwd, rev) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://fwd", &fwd);
    connector.register("mem://rev", &rev);
    let pool =
        AgentPool::new(PoolConfig { connections_per_endpoint: 2, ..reverse_config() }, connector.clone())
            .unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://fwd")).await.unwrap();
    pool.add_reverse_connection(registration(
        "waf",
        "extra",
        Some("s3cret"),
        dial(&connector, "mem://rev").await,
    ))
    .unwrap();
    assert_eq!(pool.agent_stats("waf").unwrap().totals.connected, 3);
    let _ = MemoryAgent::new(test_support::AllowAll);
}

#[tokio::test(start_paused = true)]
async fn a_replaced_reverse_connection_does_not_inherit_the_old_ones_failures() {
    use pool_core::health::HealthState;

    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf-1", &agent);
    // The breaker is not what this is about: the failures must not open it.
    let mut cfg = reverse_config();
    cfg.breaker.failure_threshold = 1000;
    let pool = AgentPool::new(cfg, MemoryConnector::new()).unwrap();
    let first = dial(&connector, "mem://waf-1").await;
    pool.add_reverse_connection(registration("waf", "r1", Some("s3cret"), first)).unwrap();
    agent.set_latency(Duration::from_secs(5));
    let inflight: Vec<_> = (0..12)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("r{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The replica registers again: its old connection is closed and its twelve requests fail,
    // after the new connection has taken the slot.
    agent.set_latency(Duration::ZERO);
    let second = dial(&connector, "mem://waf-1").await;
    pool.add_reverse_connection(registration("waf", "r1", Some("s3cret"), second)).unwrap();
    for r in inflight {
        assert!(r.await.unwrap().is_err());
    }
    pool.send("waf", &request("on-the-new-one")).await.unwrap();
    let h = &pool.health("waf").unwrap()[0];
    assert_eq!(h.connects, 2);
    assert_eq!(h.state, HealthState::Healthy, "{h:?}");
    assert_eq!(h.success_rate, Some(1.0), "the old connection's failures are not the new one's");
    assert_eq!((h.requests, h.failures), (13, 12), "lifetime counts are kept");
}

/// Outlier detection with three or more replicas judged by failure percentage alone, and
/// nothing else in the way: no breaker trips, and health never steers traffic off a replica.
fn outlier_config(minimum_hosts: u32) -> PoolConfig {
    let mut cfg = PoolConfig { connections_per_endpoint: 1, ..reverse_config() };
    cfg.breaker.failure_threshold = 1_000_000;
    cfg.health.thresholds.min_requests = u32::MAX;
    cfg.outlier = OutlierConfig {
        interval: Duration::from_secs(10),
        success_rate_minimum_hosts: u32::MAX,
        failure_percentage_minimum_hosts: minimum_hosts,
        failure_percentage_request_volume: 10,
        ..OutlierConfig::default()
    };
    cfg
}

fn ejected(pool: &AgentPool) -> Vec<String> {
    let stats = pool.agent_stats("waf").unwrap();
    stats.endpoints.into_iter().filter(|e| e.ejected).map(|e| e.endpoint).collect()
}

async fn spread(pool: &AgentPool, prefix: &str, n: usize) {
    for i in 0..n {
        let _ = pool.send("waf", &request(format!("{prefix}{i}"))).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_reverse_replica_is_ejected_like_a_forward_one() {
    let (one, two, rev) = (allow_all(), allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://one", &one);
    connector.register("mem://two", &two);
    connector.register("mem://rev", &rev);
    let pool = AgentPool::new(outlier_config(3), connector.clone()).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://one", "mem://two"])).await.unwrap();
    let conn = dial(&connector, "mem://rev").await;
    pool.add_reverse_connection(registration("waf", "r1", Some("s3cret"), conn)).unwrap();
    rev.set_failure_rate(1.0);

    spread(&pool, "a", 90).await;
    assert!(rev.events_received() >= 10, "the reverse replica had its volume");
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    assert_eq!(ejected(&pool), ["reverse://waf/r1"]);

    let before = rev.events_received();
    spread(&pool, "b", 30).await;
    assert_eq!(rev.events_received(), before, "an ejected reverse replica gets nothing");
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_leaves_is_dropped_from_outlier_detection_and_the_others_keep_their_state() {
    let (fwd, r1, r2) = (allow_all(), allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://fwd", &fwd);
    connector.register("mem://r1", &r1);
    connector.register("mem://r2", &r2);
    let pool = AgentPool::new(outlier_config(3), connector.clone()).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://fwd")).await.unwrap();
    for replica in ["r1", "r2"] {
        let conn = dial(&connector, &format!("mem://{replica}")).await;
        pool.add_reverse_connection(registration("waf", replica, Some("s3cret"), conn)).unwrap();
    }
    r2.set_failure_rate(1.0);
    spread(&pool, "a", 90).await;
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    assert_eq!(ejected(&pool), ["reverse://waf/r2"]);

    // r1, ahead of r2 among the detector's hosts, leaves: r2 stays ejected, and is still due
    // back after its 30 s ejection like any host.
    r1.disconnect_all();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints.len(), 2);
    assert_eq!(ejected(&pool), ["reverse://waf/r2"]);
    r2.set_failure_rate(0.0);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(ejected(&pool).is_empty(), "r2 returned on time");
    let before = r2.events_received();
    spread(&pool, "b", 20).await;
    assert!(r2.events_received() > before);
}

#[tokio::test(start_paused = true)]
async fn when_the_last_replica_in_rotation_leaves_an_ejected_one_returns_at_once() {
    let (fwd, rev) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://fwd", &fwd);
    connector.register("mem://rev", &rev);
    let pool = AgentPool::new(outlier_config(2), connector.clone()).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://fwd")).await.unwrap();
    let conn = dial(&connector, "mem://rev").await;
    pool.add_reverse_connection(registration("waf", "r1", Some("s3cret"), conn)).unwrap();
    fwd.set_failure_rate(1.0);
    spread(&pool, "a", 60).await;
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    assert_eq!(ejected(&pool), ["mem://fwd"], "one forward and one reverse replica are compared");

    fwd.set_failure_rate(0.0);
    rev.disconnect_all();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(ejected(&pool).is_empty(), "the only replica left is back in rotation");
    assert!(pool.send("waf", &request("after")).await.unwrap().is_allow());
}
