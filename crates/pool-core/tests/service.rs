//! The pool as a tower service.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_core::{AgentPool, AgentSpec, PoolConfig, PoolError, Unavailable};
use test_support::MemoryConnector;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn the_service_answers_like_send() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    let svc = pool.service("waf").unwrap();
    let d = svc.oneshot(request("r")).await.unwrap();
    assert!(d.is_allow());
    assert!(pool.service("nope").is_err());
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_pending_while_full_and_wakes_when_a_permit_frees() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(1));
    let cfg = PoolConfig { connections_per_endpoint: 1, max_concurrency_per_connection: 1, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    let mut first = pool.service("waf").unwrap();
    first.ready().await.unwrap();
    let call = tokio::spawn(first.call(request("r1")));

    let mut second = task::spawn(pool.service("waf").unwrap());
    assert_pending!(second.enter(|cx, mut s| s.poll_ready(cx)));
    call.await.unwrap().unwrap();
    assert!(second.is_woken(), "the released permit woke the waiting service");
    assert_ready_ok!(second.enter(|cx, mut s| s.poll_ready(cx)));
    assert_eq!(pool.stats().totals.in_flight, 1, "poll_ready reserved the permit");
    drop(second);
    assert_eq!(pool.stats().totals.in_flight, 0, "dropping the service gave it back");
}

/// Tower discards a service whose `poll_ready` failed, so a failing agent must fail requests,
/// not the service: the same service sends again once the breaker lets a probe through.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_the_call_and_the_same_service_recovers() {
    let agent = allow_all();
    let (pool, _c) = common::single(PoolConfig { connections_per_endpoint: 1, ..config() }, &agent).await;
    common::fail_requests(&pool, &agent, 5).await;
    let mut svc = pool.service("waf").unwrap();
    svc.ready().await.expect("an open breaker is not a failed service");
    let sent = agent.events_received();
    let err = svc.call(request("refused")).await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::CircuitOpen });
    assert_eq!(agent.events_received(), sent, "the refused request was not sent");

    // The breaker's reset time (30 s, no jitter) passes: the next request is its probe.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let decision = svc.ready().await.unwrap().call(request("probe")).await.unwrap();
    assert!(decision.is_allow());
    assert_eq!(agent.events_received(), sent + 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_a_permit_that_runs_out_fails_the_call_not_the_service() {
    let agent = allow_all();
    let cfg = PoolConfig { connections_per_endpoint: 1, max_concurrency_per_connection: 1, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    let mut holder = pool.service("waf").unwrap();
    holder.ready().await.unwrap();
    let mut waiting = pool.service("waf").unwrap();
    waiting.ready().await.expect("a request time-out is not a failed service");
    let err = waiting.call(request("late")).await.unwrap_err();
    assert!(matches!(err, PoolError::Timeout { .. }), "{err:?}");
    assert_eq!(agent.events_received(), 0);

    drop(holder);
    let decision = waiting.ready().await.unwrap().call(request("on-time")).await.unwrap();
    assert!(decision.is_allow());
}

#[tokio::test(start_paused = true)]
async fn poll_ready_fails_only_once_the_agent_is_removed_or_the_pool_shuts_down() {
    let (waf, bot) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &waf);
    connector.register("mem://bot", &bot);
    let pool = AgentPool::new(config(), connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    pool.add_agent(AgentSpec::new("bot").endpoint("mem://bot")).await.unwrap();
    let (mut to_waf, mut to_bot) = (pool.service("waf").unwrap(), pool.service("bot").unwrap());

    pool.remove_agent("waf").await.unwrap();
    let err = to_waf.ready().await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::Removed });
    to_bot.ready().await.expect("another agent's removal does not fail this service");
    drop(to_bot);

    let mut to_bot = pool.service("bot").unwrap();
    pool.shutdown().await;
    assert_eq!(to_bot.ready().await.unwrap_err(), PoolError::ShuttingDown);
}

#[tokio::test(start_paused = true)]
async fn tower_middleware_stacks_on_the_service() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(5));
    let (pool, _c) = common::single(config(), &agent).await;
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .concurrency_limit(2)
        .service(pool.service("waf").unwrap());
    let err = svc.oneshot(request("r")).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.stats().totals.in_flight, 0, "the dropped call gave its permit back");
    agent.settle().await;
    assert_eq!(agent.pending(), 0);
}
