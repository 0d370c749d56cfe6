//! Which connection a request goes to, and what the agent's capabilities allow.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{allow_all, config, request};
use pool_api::{BodyChunk, Capabilities, Event, EventKind};
use pool_core::balance::Strategy;
use pool_core::{AgentOptions, AgentPool, AgentSpec, PoolConfig, PoolError};
use test_support::MemoryConnector;

fn per_connection(agent: &test_support::MemoryAgent) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (label, _, _) in agent.events_by_connection() {
        *m.entry(label).or_default() += 1;
    }
    m
}

#[tokio::test(start_paused = true)]
async fn round_robin_spreads_sequential_requests_evenly() {
    let agent = allow_all();
    let (pool, _c) = common::single(PoolConfig { balancer: Strategy::RoundRobin, ..config() }, &agent).await;
    for i in 0..40 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    let counts = per_connection(&agent);
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn least_connections_and_p2c_avoid_the_busy_connection() {
    for strategy in [Strategy::LeastConnections, Strategy::PowerOfTwoChoices, Strategy::PeakEwma] {
        let agent = allow_all();
        agent.set_latency(Duration::from_secs(1));
        let cfg = PoolConfig { balancer: strategy, connections_per_endpoint: 2, ..config() };
        let (pool, _c) = common::single(cfg, &agent).await;
        // Load one connection with 5 requests, then send 5 more one at a time while they run.
        let busy: Vec<_> = (0..5)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.send("waf", &request(format!("a{i}"))).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        for p in busy {
            p.await.unwrap().unwrap();
        }
        let counts = per_connection(&agent);
        let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
        assert!(max - min <= 1, "{strategy:?} balanced concurrent load: {counts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn health_based_and_random_use_every_connection() {
    for strategy in [Strategy::HealthBased, Strategy::Random] {
        let agent = allow_all();
        let (pool, _c) = common::single(PoolConfig { balancer: strategy, ..config() }, &agent).await;
        for i in 0..200 {
            pool.send("waf", &request(format!("r{i}"))).await.unwrap();
        }
        let counts = per_connection(&agent);
        assert_eq!(counts.len(), 4, "{strategy:?}: {counts:?}");
        assert!(counts.values().all(|&n| n >= 20), "{strategy:?}: {counts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_seeded_pool_routes_reproducibly() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let agent = allow_all();
        let cfg = PoolConfig { balancer: Strategy::Random, seed: Some(42), ..config() };
        let (pool, _c) = common::single(cfg, &agent).await;
        for i in 0..50 {
            pool.send("waf", &request(format!("r{i}"))).await.unwrap();
        }
        runs.push(agent.events_by_connection().into_iter().map(|(l, _, _)| l).collect::<Vec<_>>());
    }
    assert_eq!(runs[0], runs[1]);
}

#[tokio::test(start_paused = true)]
async fn balancer_can_be_chosen_per_agent() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(config(), connector).unwrap();
    let rr = AgentOptions { balancer: Some(Strategy::RoundRobin), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf").options(rr)).await.unwrap();
    for i in 0..8 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert!(per_connection(&agent).values().all(|&n| n == 2));
}

#[tokio::test(start_paused = true)]
async fn events_the_agent_did_not_subscribe_to_are_refused_without_sending() {
    let agent = allow_all();
    agent.set_capabilities(Capabilities::new("waf").with_events([EventKind::RequestHeaders]));
    let (pool, _c) = common::single(config(), &agent).await;
    let body = Event::RequestBody(BodyChunk::new("r1", 0, true, Bytes::from_static(b"x")));
    let err = pool.send("waf", &body).await.unwrap_err();
    assert_eq!(err, PoolError::UnsupportedEvent { agent: "waf".into(), kind: EventKind::RequestBody });
    assert!(!pool.supports("waf", EventKind::RequestBody));
    assert!(pool.supports("waf", EventKind::RequestHeaders));
    assert_eq!(agent.events_received(), 0);
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_agents_limit_are_refused_without_sending() {
    let agent = allow_all();
    agent.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL).with_max_body_size(4));
    let (pool, _c) = common::single(config(), &agent).await;
    let big = Event::RequestBody(BodyChunk::new("r1", 0, true, Bytes::from_static(b"12345")));
    let err = pool.send("waf", &big).await.unwrap_err();
    assert_eq!(err, PoolError::BodyTooLarge { agent: "waf".into(), size: 5, limit: 4 });
    let mut declared = BodyChunk::new("r2", 0, false, Bytes::from_static(b"1"));
    declared.total_size = Some(1000);
    assert!(matches!(
        pool.send("waf", &Event::RequestBody(declared)).await,
        Err(PoolError::BodyTooLarge { size: 1000, .. })
    ));
    let ok = Event::RequestBody(BodyChunk::new("r3", 0, true, Bytes::from_static(b"1234")));
    assert!(pool.send("waf", &ok).await.is_ok());
    assert_eq!(agent.events_received(), 1);
    assert_eq!(pool.stats().totals.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn try_reserve_picks_and_holds_a_permit_until_sent_or_dropped() {
    let agent = allow_all();
    let (pool, _c) =
        common::single(PoolConfig { max_concurrency_per_connection: 1, ..config() }, &agent).await;
    let held: Vec<_> = (0..4).map(|_| pool.try_reserve("waf", EventKind::RequestHeaders).unwrap()).collect();
    assert_eq!(pool.stats().totals.in_flight, 4);
    let err = pool.try_reserve("waf", EventKind::RequestHeaders).unwrap_err();
    assert!(
        matches!(err, PoolError::Unavailable { reason: pool_core::Unavailable::NoCapacity, .. }),
        "{err}"
    );
    let mut held = held.into_iter();
    let first = held.next().unwrap();
    assert!(first.send(&request("r1")).await.unwrap().is_allow());
    drop(held);
    assert_eq!(pool.stats().totals.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_learns_latency_and_prefers_the_faster_replica() {
    let (fast, slow) = (allow_all(), allow_all());
    fast.set_latency(Duration::from_millis(1));
    slow.set_latency(Duration::from_millis(20));
    let connector = MemoryConnector::new();
    connector.register("mem://fast", &fast);
    connector.register("mem://slow", &slow);
    let cfg = PoolConfig { balancer: Strategy::PeakEwma, connections_per_endpoint: 1, ..config() };
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://fast", "mem://slow"])).await.unwrap();
    for i in 0..100 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert!(slow.events_received() <= 2, "slow got {} of 100", slow.events_received());
    let estimates: Vec<_> = pool.health("waf").unwrap().iter().map(|h| h.latency_estimate).collect();
    assert!(estimates.contains(&Some(Duration::from_millis(1))), "{estimates:?}");
}
