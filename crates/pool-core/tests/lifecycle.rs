//! Time-outs, cancellation on the wire, drain and shutdown.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::{CancelReason, TransportError};
use pool_core::{AgentOptions, AgentPool, AgentSpec, BreakerStatus, PoolConfig, PoolError};
use test_support::MemoryConnector;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn a_request_past_its_time_out_fails_and_the_agent_is_told_to_cancel() {
    let agent = allow_all();
    agent.set_silent(true);
    let (pool, _c) =
        common::single(PoolConfig { request_timeout: Duration::from_secs(3), ..config() }, &agent).await;
    let start = Instant::now();
    let err = pool.send("waf", &request("slow")).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { agent: "waf".into(), after: Duration::from_secs(3) });
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    agent.settle().await;
    let cancels = agent.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!((cancels[0].1.as_str(), cancels[0].2), ("slow", CancelReason::Timeout));
    assert_eq!(agent.pending(), 0);
    let h = &pool.health("waf").unwrap();
    assert_eq!(h.iter().map(|h| h.timeouts).sum::<u64>(), 1);
    assert_eq!(pool.agent_stats("waf").unwrap().totals.timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn the_time_out_covers_the_wait_for_a_permit() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(10));
    let cfg = PoolConfig {
        connections_per_endpoint: 1,
        max_concurrency_per_connection: 1,
        request_timeout: Duration::from_secs(4),
        ..config()
    };
    let (pool, _c) = common::single(cfg, &agent).await;
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("first")).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let err = pool.send("waf", &request("second")).await.unwrap_err();
    assert!(matches!(err, PoolError::Timeout { .. }), "{err:?}");
    // The first times out at t=4 s and frees the permit; the second, sent then, still times out
    // 4 s after it *started* (t=5 s): the 3 s it waited counted against its time-out.
    assert_eq!(start.elapsed(), Duration::from_secs(4), "waiting for a permit counts");
    assert!(matches!(first.await.unwrap(), Err(PoolError::Timeout { .. })));
    assert_eq!(agent.events_received(), 2);
}

#[tokio::test(start_paused = true)]
async fn request_timeout_can_be_set_per_agent() {
    let agent = allow_all();
    agent.set_silent(true);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(config(), connector).unwrap();
    let opts = AgentOptions { request_timeout: Some(Duration::from_millis(200)), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf").options(opts)).await.unwrap();
    let start = Instant::now();
    assert!(matches!(pool.send("waf", &request("r")).await, Err(PoolError::Timeout { .. })));
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn an_agent_error_is_a_failure_never_an_allow() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    agent.fail_next(1);
    let err = pool.send("waf", &request("r")).await.unwrap_err();
    let PoolError::Transport { source: TransportError::Agent(e), connection, .. } = err else {
        panic!("{err:?}")
    };
    assert!(e.message.contains("injected"));
    assert!(connection.starts_with("mem://waf#"));
    assert_eq!(pool.agent_stats("waf").unwrap().totals.failures, 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_as_soon_as_in_flight_requests_finish() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(2));
    let (pool, _c) =
        common::single(PoolConfig { drain_timeout: Duration::from_secs(30), ..config() }, &agent).await;
    let inflight: Vec<_> = (0..8)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("r{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let report = pool.shutdown().await;
    assert_eq!(start.elapsed(), Duration::from_millis(1999), "returned when the work was done");
    assert_eq!((report.drained, report.forced), (8, 0));
    for r in inflight {
        assert!(r.await.unwrap().unwrap().is_allow(), "in-flight requests were answered");
    }
    assert_eq!(agent.drains().len(), 4);
    assert_eq!(agent.closes().len(), 4);
    assert_eq!(agent.live_connections(), 0);
    assert_eq!(pool.send("waf", &request("late")).await.unwrap_err(), PoolError::ShuttingDown);
    assert!(!pool.is_admitting());
    let err = pool.add_agent(AgentSpec::new("new").endpoint("mem://waf")).await.unwrap_err();
    assert_eq!(err, PoolError::ShuttingDown);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_what_outlives_the_drain_time_out() {
    let agent = allow_all();
    agent.set_silent(true);
    let cfg = PoolConfig {
        drain_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        ..config()
    };
    let (pool, _c) = common::single(cfg, &agent).await;
    let stuck = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("stuck")).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let report = pool.shutdown().await;
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!((report.drained, report.forced), (0, 1));
    let err = stuck.await.unwrap().unwrap_err();
    assert_eq!(err, PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ProxyShutdown });
    agent.settle().await;
    assert!(
        agent.cancels().iter().any(|(_, id, r)| id.as_str() == "stuck" && *r == CancelReason::ProxyShutdown)
    );
    assert_eq!(agent.pending(), 0);
}

/// Dropping the last pool handle without a shutdown still aborts a send in flight through a
/// service that outlives it (the pool's token fires; the agent cancels it on its connection).
#[tokio::test(start_paused = true)]
async fn dropping_the_pool_aborts_a_send_in_flight_through_a_service() {
    use tower_service::Service as _;
    let agent = allow_all();
    agent.set_silent(true);
    let cfg = PoolConfig { request_timeout: Duration::from_secs(60), ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    let mut service = pool.service("waf").unwrap();
    std::future::poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
    let start = Instant::now();
    let in_flight = tokio::spawn(service.call(request("orphan")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    drop(pool);
    let err = in_flight.await.unwrap().unwrap_err();
    assert_eq!(err, PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ProxyShutdown });
    assert!(start.elapsed() < Duration::from_secs(1), "aborted at once, not at the time-out");
    // The agent hears a cancel, or the connection's close, whichever the pool's tasks make
    // first: either way nothing is left pending there.
    agent.settle().await;
    assert_eq!(agent.pending(), 0);
}

/// A request the caller cancels and one the drain cancels in flight end with the same error,
/// `Cancelled` with its reason; one waiting for a permit when shutdown begins has not been
/// admitted and is refused like a new request.
#[tokio::test(start_paused = true)]
async fn every_cancellation_is_one_error_with_a_reason() {
    let agent = allow_all();
    agent.set_silent(true);
    let cfg = PoolConfig {
        connections_per_endpoint: 1,
        max_concurrency_per_connection: 1,
        drain_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        ..config()
    };
    let (pool, _c) = common::single(cfg, &agent).await;
    let send = |id: &'static str| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request(id)).await })
    };
    let by_user = send("by-user");
    tokio::time::sleep(Duration::from_millis(1)).await;
    pool.cancel("waf", &"by-user".into(), CancelReason::ClientDisconnected).unwrap();
    assert_eq!(
        by_user.await.unwrap().unwrap_err(),
        PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ClientDisconnected }
    );

    let in_flight = send("in-flight");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let waiting = send("waiting");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pool.stats().totals.in_flight, 1, "the second request waits for the only permit");
    pool.shutdown().await;
    let drained = PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ProxyShutdown };
    assert_eq!(in_flight.await.unwrap().unwrap_err(), drained);
    assert_eq!(waiting.await.unwrap().unwrap_err(), PoolError::ShuttingDown);
}

#[tokio::test(start_paused = true)]
async fn a_removed_agent_drains_while_others_keep_serving() {
    let (a, b) = (allow_all(), allow_all());
    a.set_latency(Duration::from_secs(1));
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let pool = AgentPool::new(config(), connector).unwrap();
    pool.add_agent(AgentSpec::new("a").endpoint("mem://a")).await.unwrap();
    pool.add_agent(AgentSpec::new("b").endpoint("mem://b")).await.unwrap();
    let inflight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("a", &request("r")).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let removing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.remove_agent("a").await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(pool.send("b", &request("other")).await.unwrap().is_allow());
    assert!(inflight.await.unwrap().unwrap().is_allow());
    let report = removing.await.unwrap().unwrap();
    assert_eq!((report.drained, report.forced), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn the_agent_hears_drain_first_finishes_its_work_then_hears_shutdown() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(2));
    let (pool, _c) = common::single(config(), &agent).await;
    let inflight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("r")).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let shutdown = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    agent.settle().await;
    assert_eq!(agent.drains().len(), 4, "every connection was told to drain at once");
    assert!(agent.closes().is_empty(), "no shutdown while work is in flight");
    assert_eq!(agent.pending(), 1);
    assert!(inflight.await.unwrap().unwrap().is_allow(), "the in-flight request was answered");
    shutdown.await.unwrap();
    assert_eq!(agent.closes().len(), 4, "shutdown at the end");
}

#[tokio::test(start_paused = true)]
async fn after_shutdown_every_entry_point_says_the_pool_is_shutting_down() {
    use pool_api::{CorrelationId, EventKind};
    use tower_service::Service;

    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("ws", "waf").unwrap();
    // A service made before the shutdown outlives the agent's registration.
    let mut service = pool.service("waf").unwrap();
    pool.shutdown().await;

    let id = CorrelationId::from("late");
    assert_eq!(pool.send("waf", &request("late")).await.unwrap_err(), PoolError::ShuttingDown);
    assert_eq!(pool.try_reserve("waf", EventKind::RequestHeaders).unwrap_err(), PoolError::ShuttingDown);
    assert_eq!(
        pool.affinity().try_reserve("waf", EventKind::RequestBody, &id).unwrap_err(),
        PoolError::ShuttingDown
    );
    assert_eq!(
        pool.sticky_sessions().send("ws", "waf", &request("late")).await.unwrap_err(),
        PoolError::ShuttingDown
    );
    assert_eq!(pool.sticky_sessions().create("ws2", "waf").unwrap_err(), PoolError::ShuttingDown);
    assert_eq!(
        pool.cancel("waf", &id, CancelReason::ClientDisconnected).unwrap_err(),
        PoolError::ShuttingDown
    );
    assert_eq!(
        pool.config_push().push("waf", "rules", None, bytes::Bytes::new()).unwrap_err(),
        PoolError::ShuttingDown
    );
    assert_eq!(pool.service("waf").unwrap_err(), PoolError::ShuttingDown);
    assert_eq!(pool.remove_agent("waf").await.unwrap_err(), PoolError::ShuttingDown);
    let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
    assert_eq!(ready.unwrap_err(), PoolError::ShuttingDown);
    // Names that were never registered say the same: after shutdown, no name is known.
    assert_eq!(pool.send("never", &request("late")).await.unwrap_err(), PoolError::ShuttingDown);
}

/// An open breaker schedules its move to half-open on a task of its agent: shutdown stops it
/// with the rest, instead of leaving it asleep until the reset time.
#[tokio::test(start_paused = true)]
async fn shutdown_leaves_no_task_behind_not_even_an_open_breakers_wake_up() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let agent = allow_all();
    let (pool, _c) = common::single(PoolConfig { connections_per_endpoint: 1, ..config() }, &agent).await;
    common::fail_requests(&pool, &agent, 5).await;
    assert!(matches!(pool.agent_stats("waf").unwrap().endpoints[0].breaker, BreakerStatus::Open { .. }));
    pool.shutdown().await;
    drop(pool);
    agent.settle().await;
    assert_eq!(metrics.num_alive_tasks(), 0, "tasks still alive after shutdown");
}
