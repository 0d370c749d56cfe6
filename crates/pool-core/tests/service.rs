//! The pool as a tower service.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_core::{PoolConfig, PoolError, Unavailable};
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

#[tokio::test(start_paused = true)]
async fn poll_ready_fails_while_every_breaker_is_open() {
    let agent = allow_all();
    let (pool, _c) = common::single(PoolConfig { connections_per_endpoint: 1, ..config() }, &agent).await;
    common::fail_requests(&pool, &agent, 5).await;
    let mut svc = pool.service("waf").unwrap();
    let err = svc.ready().await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::CircuitOpen });
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
