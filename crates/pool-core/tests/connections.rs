//! Connecting, handshaking, dying and reconnecting.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::{Capabilities, EventKind, TransportError};
use pool_core::backoff::BackoffConfig;
use pool_core::{AgentPool, AgentSpec, PoolConfig, PoolError};
use test_support::MemoryConnector;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn connect_timeout_bounds_a_connect_that_never_finishes() {
    let agent = allow_all();
    agent.set_connect_silent(true);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(PoolConfig { connect_timeout: Duration::from_secs(2), ..config() }, connector)
        .unwrap();
    let start = Instant::now();
    let r = pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    assert_eq!(r.connected, 0);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let h = pool.health("waf").unwrap();
    assert!(h[0].last_error.as_ref().unwrap().0.contains("connect on mem://waf timed out"), "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn handshake_timeout_bounds_a_silent_agent() {
    let agent = allow_all();
    agent.set_handshake_silent(true);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let cfg = PoolConfig { handshake_timeout: Duration::from_millis(300), ..config() };
    let pool = AgentPool::new(cfg, connector).unwrap();
    let start = Instant::now();
    let r = pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    assert_eq!(r.connected, 0);
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    let h = pool.health("waf").unwrap();
    assert!(h[0].last_error.as_ref().unwrap().0.contains("handshake"), "{h:?}");
    // Once the agent answers handshakes, it is used.
    agent.set_handshake_silent(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pool.is_agent_healthy("waf"));
}

#[tokio::test(start_paused = true)]
async fn a_version_mismatch_never_connects_and_says_why() {
    let agent = allow_all();
    agent.set_protocol_versions([99]);
    let (pool, _c) = common::single(config(), &agent).await;
    assert_eq!(pool.agent_stats("waf").unwrap().totals.connected, 0);
    let h = pool.health("waf").unwrap();
    assert!(h[0].last_error.as_ref().unwrap().0.contains("version mismatch"), "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn a_dead_connection_fails_its_pending_requests_at_once_and_is_replaced() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(10));
    let (pool, _c) = common::single(config(), &agent).await;
    let pending: Vec<_> = (0..20)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("r{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(agent.pending(), 20);
    let killed_at = Instant::now();
    agent.disconnect_all();
    for p in pending {
        let err = p.await.unwrap().unwrap_err();
        assert!(matches!(err, PoolError::Transport { source: TransportError::Closed { .. }, .. }), "{err:?}");
    }
    assert_eq!(killed_at.elapsed(), Duration::ZERO, "failed at once, not after the latency");
    // Dead connections are out of the list at once...
    assert_eq!(pool.agent_stats("waf").unwrap().totals.connected, 0);
    assert_eq!(pool.stats().totals.in_flight, 0);
    // ...and replaced after the back-off (base 100 ms).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stats = pool.agent_stats("waf").unwrap();
    assert_eq!((stats.totals.connections, stats.totals.connected), (4, 4));
    assert_eq!(agent.connections_opened(), 8);
    assert_eq!(pool.health("waf").unwrap()[0].connects, 2);
}

#[tokio::test(start_paused = true)]
async fn reconnect_backoff_grows_from_base_to_cap() {
    let agent = allow_all();
    let cfg = PoolConfig {
        connections_per_endpoint: 1,
        reconnect: BackoffConfig { base: Duration::from_secs(1), cap: Duration::from_secs(4), jitter: false },
        ..config()
    };
    let (pool, _c) = common::single(cfg, &agent).await;
    agent.refuse_connections(true);
    agent.disconnect_all();
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut last = agent.connect_attempts();
    while seen.len() < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = agent.connect_attempts();
        if now != last {
            seen.push(start.elapsed().as_secs());
            last = now;
        }
    }
    // Attempts after 1, 1+2, 1+2+4, then every 4 s (the cap).
    assert_eq!(seen, [1, 3, 7, 11, 15]);
    drop(pool);
}

#[tokio::test(start_paused = true)]
async fn concurrency_per_connection_is_the_lower_of_pool_and_agent_limits() {
    let agent = allow_all();
    agent.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL).with_max_concurrency(3));
    let (pool, _c) =
        common::single(PoolConfig { max_concurrency_per_connection: 10, ..config() }, &agent).await;
    assert!(pool.health("waf").unwrap().iter().all(|h| h.limit == 3));

    let agent2 = allow_all();
    let (pool2, _c2) =
        common::single(PoolConfig { max_concurrency_per_connection: 2, ..config() }, &agent2).await;
    assert!(pool2.health("waf").unwrap().iter().all(|h| h.limit == 2));
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_capacity_wait_for_a_permit_and_then_go() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(1));
    let cfg = PoolConfig { connections_per_endpoint: 1, max_concurrency_per_connection: 2, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(
                async move { pool.send("waf", &request(format!("r{i}"))).await.map(|_| Instant::now()) },
            )
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap().unwrap().duration_since(start).as_secs());
    }
    done.sort_unstable();
    assert_eq!(done, [1, 1, 2, 2, 3, 3], "two at a time");
    assert_eq!(agent.peak_pending(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_silent_agent_is_caught_by_pings_and_the_connection_replaced() {
    let agent = allow_all();
    let mut cfg = config();
    cfg.connections_per_endpoint = 1;
    cfg.health.ping_interval = Duration::from_secs(10);
    cfg.health.ping_timeout = Duration::from_secs(2);
    let (pool, _c) = common::single(cfg, &agent).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(agent.pings().len(), 1, "pinged once after the interval");
    assert_eq!(agent.connections_opened(), 1);
    agent.set_silent(true);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(agent.closes().len(), 1, "the unanswered ping closed the connection");
    assert_eq!(agent.connections_opened(), 2, "and it was replaced");
    let h = pool.health("waf").unwrap();
    assert!(h[0].last_error.as_ref().unwrap().0.contains("ping"), "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_right_after_a_connection_dies_goes_to_a_live_one() {
    let (a, b) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let pool = AgentPool::new(config(), connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://a", "mem://b"])).await.unwrap();
    a.refuse_connections(true);
    a.disconnect_all();
    // No yield: the supervisors have not yet seen the deaths, the snapshot still lists them.
    for i in 0..50 {
        assert!(pool.send("waf", &request(format!("r{i}"))).await.unwrap().is_allow());
    }
    assert_eq!(b.events_received(), 50);
    // With every connection dead and none coming back, the answer is "no connections".
    b.refuse_connections(true);
    b.disconnect_all();
    let err = pool.send("waf", &request("none")).await.unwrap_err();
    assert_eq!(
        err,
        PoolError::Unavailable { agent: "waf".into(), reason: pool_core::Unavailable::NoConnections }
    );
}

#[tokio::test(start_paused = true)]
async fn many_waiters_are_served_one_permit_at_a_time_and_none_is_lost() {
    let agent = allow_all();
    agent.set_latency(Duration::from_millis(10));
    let cfg = PoolConfig { connections_per_endpoint: 1, max_concurrency_per_connection: 3, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    // 300 requests through 3 permits; some callers give up early, the rest must all be served.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let event = request(format!("r{i}"));
                let fut = pool.send("waf", &event);
                if i % 7 == 0 {
                    tokio::time::timeout(Duration::from_millis(15), fut).await.ok().map(|r| r.is_ok())
                } else {
                    Some(fut.await.is_ok())
                }
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        if t.await.unwrap() == Some(true) {
            served += 1;
        }
    }
    assert!(served >= 300 - 43, "served {served}");
    assert_eq!(agent.peak_pending(), 3);
    assert_eq!(pool.stats().totals.in_flight, 0);
}
