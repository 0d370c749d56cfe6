//! Sticky sessions for long-lived streams.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::{AgentHealth, HealthStatus};
use pool_core::{PoolConfig, PoolError, StickyConfig, StickyRoute, Unavailable};

#[tokio::test(start_paused = true)]
async fn a_session_keeps_every_send_on_its_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("ws-1", "waf").unwrap();
    for i in 0..20 {
        let (d, route) = pool.sticky_sessions().send("ws-1", "waf", &request(format!("m{i}"))).await.unwrap();
        assert!(d.is_allow());
        assert_eq!(route, StickyRoute::Pinned);
    }
    let labels: std::collections::HashSet<_> =
        agent.events_by_connection().into_iter().map(|(l, _, _)| l).collect();
    assert_eq!(labels.len(), 1);
    assert_eq!(pool.stats().totals.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_connection_dies_is_repinned_and_the_caller_sees_it() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("sse-1", "waf").unwrap();
    pool.sticky_sessions().send("sse-1", "waf", &request("a")).await.unwrap();
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    agent.connection_by_label(&home).unwrap().disconnect();
    let (_, route) = pool.sticky_sessions().send("sse-1", "waf", &request("b")).await.unwrap();
    let StickyRoute::Repinned { from, to } = route else { panic!("{route:?}") };
    assert_eq!(from, home);
    assert_ne!(to, home);
    let (_, route) = pool.sticky_sessions().send("sse-1", "waf", &request("c")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned, "pinned to the new connection from then on");
    assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_connection_turns_unhealthy_is_repinned() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("lp-1", "waf").unwrap();
    pool.sticky_sessions().send("lp-1", "waf", &request("a")).await.unwrap();
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    agent
        .connection_by_label(&home)
        .unwrap()
        .report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    agent.settle().await;
    let (_, route) = pool.sticky_sessions().send("lp-1", "waf", &request("b")).await.unwrap();
    assert!(matches!(route, StickyRoute::Repinned { .. }), "{route:?}");
}

#[tokio::test(start_paused = true)]
async fn sessions_are_created_refreshed_queried_and_cleared() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    assert_eq!(
        pool.sticky_sessions().create("s", "nope").unwrap_err(),
        PoolError::UnknownAgent { agent: "nope".into() }
    );
    pool.sticky_sessions().create("s1", "waf").unwrap();
    pool.sticky_sessions().create("s2", "waf").unwrap();
    assert!(pool.sticky_sessions().contains("s1"));
    assert_eq!(pool.sticky_sessions().agent_of("s1").as_deref(), Some("waf"));
    assert_eq!(pool.sticky_sessions().len(), 2);
    assert_eq!(pool.stats().sticky_sessions, 2);
    assert!(pool.sticky_sessions().refresh("s1"));
    assert!(pool.sticky_sessions().remove("s1"));
    assert!(!pool.sticky_sessions().remove("s1"));
    assert!(!pool.sticky_sessions().contains("s1"));
    assert!(!pool.sticky_sessions().refresh("s1"));
    let (_, route) = pool.sticky_sessions().send("s1", "waf", &request("x")).await.unwrap();
    assert_eq!(route, StickyRoute::NoSession, "no session: balanced like any request");
    let (_, route) =
        pool.sticky_sessions().send("s2", "other", &request("y")).await.unwrap_err_or_no_session();
    assert_eq!(route, StickyRoute::NoSession);
}

trait NoSession {
    fn unwrap_err_or_no_session(self) -> ((), StickyRoute);
}

impl NoSession for Result<(pool_api::Decision, StickyRoute), PoolError> {
    fn unwrap_err_or_no_session(self) -> ((), StickyRoute) {
        match self {
            Ok((_, route)) => ((), route),
            // Another agent's session is not used; "other" does not exist, so the balanced
            // send fails as an unknown agent would.
            Err(PoolError::UnknownAgent { .. }) => ((), StickyRoute::NoSession),
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn sessions_expire_after_the_idle_time_out_unless_used() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("idle", "waf").unwrap();
    pool.sticky_sessions().create("busy", "waf").unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(100)).await;
        pool.sticky_sessions().send("busy", "waf", &request("ping")).await.unwrap();
    }
    // 400 s: "idle" passed the default 5 minutes and was swept by maintenance.
    assert!(!pool.sticky_sessions().contains("idle"));
    assert!(pool.sticky_sessions().contains("busy"));
    assert_eq!(pool.sticky_sessions().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_an_idle_time_out_sessions_never_expire_and_cleanup_is_manual_too() {
    let agent = allow_all();
    let cfg = PoolConfig { sticky: StickyConfig { idle_timeout: None }, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    pool.sticky_sessions().create("forever", "waf").unwrap();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    assert!(pool.sticky_sessions().contains("forever"));
    assert_eq!(pool.sticky_sessions().remove_expired(), 0);

    // Manual clean-up, with maintenance slowed to one sweep per 1000 s so it cannot get there first.
    let agent2 = allow_all();
    let mut cfg =
        PoolConfig { sticky: StickyConfig { idle_timeout: Some(Duration::from_secs(10)) }, ..config() };
    cfg.health.window = Duration::from_secs(1000);
    cfg.health.buckets = 1;
    let (pool2, _c2) = common::single(cfg, &agent2).await;
    pool2.sticky_sessions().create("short", "waf").unwrap();
    pool2.sticky_sessions().create("kept", "waf").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(pool2.sticky_sessions().refresh("kept"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(pool2.sticky_sessions().len(), 2, "expired but not yet swept");
    assert!(!pool2.sticky_sessions().contains("short"), "an expired session is not live");
    assert_eq!(pool2.sticky_sessions().remove_expired(), 1);
    assert_eq!(pool2.sticky_sessions().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_session_can_be_made_on_an_agent_without_a_healthy_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    agent.report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    agent.settle().await;
    let err = pool.sticky_sessions().create("s", "waf").unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::AgentNotReady });
}

#[tokio::test(start_paused = true)]
async fn removing_the_agent_ends_its_sessions() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("s", "waf").unwrap();
    pool.remove_agent("waf").await.unwrap();
    assert_eq!(pool.sticky_sessions().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn sticky_sends_dropped_at_random_points_leave_no_permit_behind() {
    let agent = allow_all();
    agent.set_seed(3);
    agent.set_latency_range(Duration::ZERO, Duration::from_millis(10));
    let (pool, _c) = common::single(config(), &agent).await;
    for s in 0..10 {
        pool.sticky_sessions().create(&format!("s{s}"), "waf").unwrap();
    }
    let mut rng = fastrand::Rng::with_seed(11);
    let tasks: Vec<_> = (0..2_000)
        .map(|i| {
            let pool = pool.clone();
            let session = format!("s{}", i % 10);
            let after = Duration::from_micros(rng.u64(0..12_000));
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    after,
                    pool.sticky_sessions().send(&session, "waf", &request(format!("r{i}"))),
                )
                .await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    agent.settle().await;
    assert_eq!(pool.stats().totals.in_flight, 0);
    assert_eq!(agent.pending(), 0);
    assert_eq!(pool.sticky_sessions().len(), 10);
    tokio::time::sleep(Duration::from_secs(302)).await;
    assert_eq!(pool.sticky_sessions().len(), 0, "all expired as documented");
}

#[tokio::test(start_paused = true)]
async fn try_reserve_sticky_reserves_on_the_session_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.sticky_sessions().create("s", "waf").unwrap();
    let (first, route) =
        pool.sticky_sessions().try_reserve("s", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(route, StickyRoute::Pinned);
    let (second, _) =
        pool.sticky_sessions().try_reserve("s", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(first.connection(), second.connection());
    assert!(second.send(&request("x")).await.unwrap().is_allow());
    let (_, route) =
        pool.sticky_sessions().try_reserve("none", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(route, StickyRoute::NoSession);
}

#[tokio::test(start_paused = true)]
async fn a_sticky_send_waiting_on_its_connection_when_it_dies_is_repinned_and_delivered() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(1));
    // One request at a time per connection: the second send waits for the first's permit.
    let cfg = PoolConfig { max_concurrency_per_connection: 1, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    pool.sticky_sessions().create("ws", "waf").unwrap();
    let send = |id: &'static str| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.sticky_sessions().send("ws", "waf", &request(id)).await })
    };
    let first = send("first");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = send("second");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    assert_eq!(agent.events_received(), 1, "the second send waits for the pinned connection");

    agent.connection_by_label(&home).unwrap().disconnect();
    assert!(first.await.unwrap().is_err(), "the request on the dead connection fails with it");
    let (decision, route) = second.await.unwrap().expect("the waiting send is moved, not failed");
    assert!(decision.is_allow());
    let StickyRoute::Repinned { from, to } = route else { panic!("{route:?}") };
    assert_eq!(from, home);
    assert_ne!(to, home);
    let delivered: Vec<_> = agent
        .events_by_connection()
        .into_iter()
        .filter(|(_, id, _)| id.as_str() == "second")
        .map(|(label, ..)| label)
        .collect();
    assert_eq!(delivered, std::slice::from_ref(&to), "the event reached the new connection, once");
    let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("third")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned, "the session stays on its new connection");
    assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
    assert_eq!(pool.stats().totals.in_flight, 0);
}
