//! Health classification, agent-reported health, circuit breaking, outlier ejection, failure
//! modes.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::{AgentHealth, HealthStatus};
use pool_core::breaker::BreakerConfig;
use pool_core::health::{HealthState, HealthThresholds};
use pool_core::outlier::OutlierConfig;
use pool_core::{
    AgentOptions, AgentPool, AgentSpec, BreakerStatus, FailureMode, PoolConfig, PoolError, Unavailable,
};
use test_support::{MemoryAgent, MemoryConnector};
use tokio::time::Instant;

fn one_connection() -> PoolConfig {
    PoolConfig { connections_per_endpoint: 1, ..config() }
}

#[tokio::test(start_paused = true)]
async fn success_rate_sets_the_health_state_and_recovers_as_the_window_passes() {
    let agent = allow_all();
    let mut cfg = one_connection();
    cfg.breaker.failure_threshold = 1000;
    let (pool, _c) = common::single(cfg, &agent).await;
    let state = |pool: &AgentPool| pool.health("waf").unwrap()[0].state;
    for i in 0..20 {
        pool.send("waf", &request(format!("ok{i}"))).await.unwrap();
    }
    assert_eq!(state(&pool), HealthState::Healthy);
    agent.fail_next(2); // 20 of 22 = 90.9 %: degraded
    for i in 0..2 {
        assert!(pool.send("waf", &request(format!("f{i}"))).await.is_err());
    }
    assert_eq!(state(&pool), HealthState::Degraded);
    agent.fail_next(10); // 20 of 32 = 62.5 %: unhealthy
    for i in 0..10 {
        assert!(pool.send("waf", &request(format!("g{i}"))).await.is_err());
    }
    assert_eq!(state(&pool), HealthState::Unhealthy);
    let h = &pool.health("waf").unwrap()[0];
    assert_eq!((h.requests, h.failures), (32, 12));
    assert!(h.last_error.as_ref().unwrap().0.contains("injected failure"));
    // An unhealthy connection is still used when it is the only one.
    assert!(pool.send("waf", &request("still")).await.is_ok());
    // The window (10 s) passes: the failures expire and the connection is healthy again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(state(&pool), HealthState::Healthy);
}

#[tokio::test(start_paused = true)]
async fn health_thresholds_are_configurable() {
    let agent = allow_all();
    let mut cfg = one_connection();
    cfg.breaker.failure_threshold = 1000;
    cfg.health.thresholds = HealthThresholds { healthy: 0.5, degraded: 0.2, min_requests: 2 };
    let (pool, _c) = common::single(cfg, &agent).await;
    pool.send("waf", &request("a")).await.unwrap();
    agent.fail_next(1);
    let _ = pool.send("waf", &request("b")).await;
    // 50 %: not above 0.5, so degraded under these thresholds (unhealthy under the defaults? no: 2 < 10).
    assert_eq!(pool.health("waf").unwrap()[0].state, HealthState::Degraded);
}

#[tokio::test(start_paused = true)]
async fn unhealthy_connections_get_traffic_only_when_nothing_better_exists() {
    let (good, bad) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://good", &good);
    connector.register("mem://bad", &bad);
    let mut cfg = one_connection();
    cfg.breaker.failure_threshold = 1000;
    cfg.outlier.enabled = false;
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://good", "mem://bad"])).await.unwrap();
    bad.set_failure_rate(1.0);
    for i in 0..40 {
        let _ = pool.send("waf", &request(format!("r{i}"))).await;
    }
    let bad_seen = bad.events_received();
    for i in 0..100 {
        pool.send("waf", &request(format!("s{i}"))).await.unwrap();
    }
    assert_eq!(bad.events_received(), bad_seen, "no new traffic to the unhealthy connection");
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_after_five_consecutive_failures_and_fails_fast() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    agent.fail_next(5);
    for i in 0..5 {
        assert!(matches!(
            pool.send("waf", &request(format!("f{i}"))).await,
            Err(PoolError::Transport { .. })
        ));
    }
    let err = pool.send("waf", &request("fast")).await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::CircuitOpen });
    assert_eq!(agent.events_received(), 5, "the open breaker sent nothing");
    let stats = pool.agent_stats("waf").unwrap();
    assert!(matches!(stats.endpoints[0].breaker, BreakerStatus::Open { .. }));
    assert!(!stats.is_healthy);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_failure_count() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    for round in 0..3 {
        agent.fail_next(4);
        for i in 0..4 {
            let _ = pool.send("waf", &request(format!("f{round}{i}"))).await;
        }
        pool.send("waf", &request(format!("ok{round}"))).await.unwrap();
    }
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_one_probe_and_its_success_closes_the_breaker() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    common::fail_requests(&pool, &agent, 5).await;
    // The breaker's wake-up fires at exactly 30 s; look just after it.
    tokio::time::sleep(Duration::from_millis(30_001)).await;
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::HalfOpen);
    agent.set_latency(Duration::from_secs(1));
    let probe = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("probe")).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = pool.send("waf", &request("second")).await.unwrap_err();
    assert_eq!(second, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::CircuitOpen });
    probe.await.unwrap().unwrap();
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Closed);
    pool.send("waf", &request("after")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    agent.fail_next(6);
    for i in 0..5 {
        let _ = pool.send("waf", &request(format!("f{i}"))).await;
    }
    // The breaker's wake-up fires at exactly 30 s; look just after it.
    tokio::time::sleep(Duration::from_millis(30_001)).await;
    assert!(pool.send("waf", &request("probe")).await.is_err());
    let BreakerStatus::Open { remaining } = pool.agent_stats("waf").unwrap().endpoints[0].breaker else {
        panic!("must be open again")
    };
    assert_eq!(remaining, Duration::from_secs(60));
    assert_eq!(agent.events_received(), 6, "the probe went to the agent");
}

#[tokio::test(start_paused = true)]
async fn breaker_settings_are_configurable() {
    let agent = allow_all();
    let mut cfg = one_connection();
    cfg.breaker =
        BreakerConfig { failure_threshold: 2, reset_timeout: Duration::from_secs(3), ..cfg.breaker };
    let (pool, _c) = common::single(cfg, &agent).await;
    common::fail_requests(&pool, &agent, 2).await;
    assert!(
        matches!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Open { remaining } if remaining == Duration::from_secs(3))
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_lets_another_probe_through() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    common::fail_requests(&pool, &agent, 5).await;
    // The breaker's wake-up fires at exactly 30 s; look just after it.
    tokio::time::sleep(Duration::from_millis(30_001)).await;
    agent.set_latency(Duration::from_secs(5));
    let _ = tokio::time::timeout(Duration::from_millis(10), pool.send("waf", &request("dropped"))).await;
    agent.set_latency(Duration::ZERO);
    pool.send("waf", &request("next-probe")).await.unwrap();
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Closed);
}

#[tokio::test(start_paused = true)]
async fn fail_open_answers_allow_when_the_agent_is_unavailable() {
    let agent = allow_all();
    agent.refuse_connections(true);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(PoolConfig { failure_mode: FailureMode::Open, ..config() }, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    let d = pool.send("waf", &request("r")).await.unwrap();
    assert!(d.is_allow());
    assert!(d.audit.tags.iter().any(|t| t == "agentpool:fail-open"));
    // Per-agent override back to closed.
    let closed = AgentOptions { failure_mode: Some(FailureMode::Closed), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("strict").endpoint("mem://waf").options(closed)).await.unwrap();
    assert!(matches!(pool.send("strict", &request("r")).await, Err(PoolError::Unavailable { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_draining_agent_gets_no_new_requests() {
    let (a, b) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let pool = AgentPool::new(one_connection(), connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://a", "mem://b"])).await.unwrap();
    a.report_health(AgentHealth::with_status(HealthStatus::Draining { eta: None }));
    tokio::task::yield_now().await;
    for i in 0..20 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert_eq!((a.events_received(), b.events_received()), (0, 20));
    b.report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    tokio::task::yield_now().await;
    let err = pool.send("waf", &request("none")).await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::AgentNotReady });
    a.report_health(AgentHealth::healthy());
    tokio::task::yield_now().await;
    pool.send("waf", &request("back")).await.unwrap();
    assert_eq!(a.events_received(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_degraded_agent_gets_a_longer_time_out() {
    let agent = allow_all();
    agent.set_silent(true);
    let cfg = PoolConfig { request_timeout: Duration::from_secs(1), ..one_connection() };
    let (pool, _c) = common::single(cfg, &agent).await;
    agent.report_health(AgentHealth::with_status(HealthStatus::Degraded { timeout_multiplier: 2.5 }));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = pool.send("waf", &request("slow")).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { agent: "waf".into(), after: Duration::from_millis(2500) });
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
}

#[tokio::test(start_paused = true)]
async fn a_paused_connection_is_not_picked_while_another_can_take_the_request() {
    let agent = allow_all();
    let (pool, _c) = common::single(PoolConfig { connections_per_endpoint: 2, ..config() }, &agent).await;
    let paused = agent.connection(0).unwrap();
    paused.pause();
    tokio::task::yield_now().await;
    for i in 0..10 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert!(agent.events_by_connection().iter().all(|(l, _, _)| l != paused.label()));
    agent.pause_all();
    tokio::task::yield_now().await;
    let err = pool.send("waf", &request("x")).await.unwrap_err();
    assert_eq!(err, PoolError::FlowControlPaused { agent: "waf".into() });
    assert_eq!(pool.stats().totals.paused, 2);
}

#[tokio::test(start_paused = true)]
async fn outlier_detection_ejects_a_failing_replica_but_never_all() {
    let agents: Vec<MemoryAgent> = (0..5).map(|_| allow_all()).collect();
    let connector = MemoryConnector::new();
    for (i, a) in agents.iter().enumerate() {
        connector.register(format!("mem://r{i}"), a);
    }
    let mut cfg = one_connection();
    cfg.breaker.failure_threshold = 1_000_000;
    // Keep health-based avoidance out of the way: this test is about outlier ejection.
    cfg.health.thresholds.degraded = 0.01;
    cfg.outlier = OutlierConfig {
        interval: Duration::from_secs(10),
        max_ejection_percent: 20,
        success_rate_request_volume: 20,
        ..OutlierConfig::default()
    };
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints((0..5).map(|i| format!("mem://r{i}")))).await.unwrap();
    agents[3].set_failure_rate(0.2);
    // Spread enough traffic in one interval for every replica to reach the volume.
    for i in 0..400 {
        let _ = pool.send("waf", &request(format!("r{i}"))).await;
    }
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let stats = pool.agent_stats("waf").unwrap();
    let ejected: Vec<_> = stats.endpoints.iter().filter(|e| e.ejected).map(|e| e.endpoint.clone()).collect();
    assert_eq!(ejected, ["mem://r3"]);
    let before = agents[3].events_received();
    for i in 0..50 {
        let _ = pool.send("waf", &request(format!("s{i}"))).await;
    }
    assert_eq!(agents[3].events_received(), before, "an ejected replica gets nothing");

    // All failing: at most 20 % (one of five) is ever ejected.
    for a in &agents {
        a.set_failure_rate(1.0);
    }
    for round in 0..5 {
        for i in 0..400 {
            let _ = pool.send("waf", &request(format!("t{round}-{i}"))).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = pool.agent_stats("waf").unwrap().endpoints.iter().filter(|e| e.ejected).count();
        assert!(n <= 1, "round {round}: {n} ejected");
    }
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_makes_an_open_breaker_probe_at_once() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    agent.set_latency(Duration::from_secs(5));
    let inflight: Vec<_> = (0..5)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("r{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    agent.disconnect_all(); // the agent crashes: five failures in a row open the breaker
    for r in inflight {
        assert!(r.await.unwrap().is_err());
    }
    assert!(matches!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Open { .. }));
    agent.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(150)).await; // the supervisor reconnects
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::HalfOpen);
    pool.send("waf", &request("probe")).await.unwrap();
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_reconnected_connection_starts_with_a_fresh_health_window() {
    let agent = allow_all();
    let (pool, _c) = common::single(one_connection(), &agent).await;
    agent.set_latency(Duration::from_secs(5));
    let inflight: Vec<_> = (0..12)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("r{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    agent.disconnect_all(); // the agent crashes: its connection's twelve requests fail
    for r in inflight {
        assert!(r.await.unwrap().is_err());
    }
    let before = &pool.health("waf").unwrap()[0];
    assert_eq!(before.state, HealthState::Unhealthy, "the dead connection failed everything");
    assert_eq!(before.connects, 1);

    agent.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(150)).await; // the supervisor reconnects
    let fresh = &pool.health("waf").unwrap()[0];
    assert_eq!(fresh.connects, 2);
    assert_eq!(fresh.state, HealthState::Healthy);
    assert_eq!(fresh.success_rate, None, "nothing is known about the new connection yet");

    // Its first result is judged on its own, not with the dead connection's failures.
    pool.send("waf", &request("first")).await.unwrap();
    let after = &pool.health("waf").unwrap()[0];
    assert_eq!(after.state, HealthState::Healthy);
    assert_eq!(after.success_rate, Some(1.0));
    assert_eq!((after.requests, after.failures), (13, 12), "lifetime counts are kept");
    assert_eq!(pool.agent_stats("waf").unwrap().totals.healthy, 1);
}

#[tokio::test(start_paused = true)]
async fn requests_no_connection_could_take_are_counted_as_refused_or_let_through() {
    use pool_api::EventKind;

    let down = allow_all();
    down.refuse_connections(true);
    let up = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://down", &down);
    connector.register("mem://up", &up);
    let pool = AgentPool::new(one_connection(), connector).unwrap();
    let open = AgentOptions { failure_mode: Some(FailureMode::Open), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("strict").endpoint("mem://down")).await.unwrap();
    pool.add_agent(AgentSpec::new("lenient").endpoint("mem://down").options(open)).await.unwrap();
    pool.add_agent(AgentSpec::new("ws").endpoint("mem://up")).await.unwrap();

    let no_connection = PoolError::Unavailable { agent: "strict".into(), reason: Unavailable::NoConnections };
    for i in 0..3 {
        assert_eq!(pool.send("strict", &request(format!("s{i}"))).await.unwrap_err(), no_connection);
    }
    assert_eq!(pool.try_reserve("strict", EventKind::RequestHeaders).unwrap_err(), no_connection);
    for i in 0..2 {
        let d = pool.send("lenient", &request(format!("l{i}"))).await.unwrap();
        assert!(d.audit.tags.iter().any(|t| t == "agentpool:fail-open"));
    }
    // A reservation does not wait and does not fail open: it is refused.
    assert!(pool.try_reserve("lenient", EventKind::RequestHeaders).is_err());

    // A sticky session whose only connection died, with nowhere healthy to move to.
    pool.sticky_sessions().create("s", "ws").unwrap();
    up.refuse_connections(true);
    up.disconnect_all();
    let err = pool.sticky_sessions().send("s", "ws", &request("w")).await.unwrap_err();
    assert!(matches!(err, PoolError::Unavailable { .. }), "{err:?}");

    let totals = |id| pool.agent_stats(id).unwrap().totals;
    assert_eq!((totals("strict").unavailable_rejected, totals("strict").fail_open), (4, 0));
    assert_eq!((totals("lenient").unavailable_rejected, totals("lenient").fail_open), (1, 2));
    assert_eq!((totals("ws").unavailable_rejected, totals("ws").fail_open), (1, 0));
    let all = pool.stats().totals;
    assert_eq!((all.unavailable_rejected, all.fail_open), (6, 2));
    assert_eq!(all.requests, 0, "none of them reached an agent");
}
