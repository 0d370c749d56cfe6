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
    pool.create_sticky_session("ws-1", "waf").unwrap();
    for i in 0..20 {
        let (d, route) = pool.send_sticky("ws-1", "waf", request(format!("m{i}"))).await.unwrap();
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
    pool.create_sticky_session("sse-1", "waf").unwrap();
    pool.send_sticky("sse-1", "waf", request("a")).await.unwrap();
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    agent.connection_by_label(&home).unwrap().disconnect();
    let (_, route) = pool.send_sticky("sse-1", "waf", request("b")).await.unwrap();
    let StickyRoute::Repinned { from, to } = route else { panic!("{route:?}") };
    assert_eq!(from, home);
    assert_ne!(to, home);
    let (_, route) = pool.send_sticky("sse-1", "waf", request("c")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned, "pinned to the new connection from then on");
    assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_connection_turns_unhealthy_is_repinned() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.create_sticky_session("lp-1", "waf").unwrap();
    pool.send_sticky("lp-1", "waf", request("a")).await.unwrap();
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    agent
        .connection_by_label(&home)
        .unwrap()
        .report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    agent.settle().await;
    let (_, route) = pool.send_sticky("lp-1", "waf", request("b")).await.unwrap();
    assert!(matches!(route, StickyRoute::Repinned { .. }), "{route:?}");
}

#[tokio::test(start_paused = true)]
async fn sessions_are_created_refreshed_queried_and_cleared() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    assert_eq!(
        pool.create_sticky_session("s", "nope").unwrap_err(),
        PoolError::UnknownAgent { agent: "nope".into() }
    );
    pool.create_sticky_session("s1", "waf").unwrap();
    pool.create_sticky_session("s2", "waf").unwrap();
    assert!(pool.has_sticky_session("s1"));
    assert_eq!(pool.sticky_session_agent("s1").as_deref(), Some("waf"));
    assert_eq!(pool.sticky_session_count(), 2);
    assert_eq!(pool.stats().sticky_sessions, 2);
    assert!(pool.refresh_sticky_session("s1"));
    assert!(pool.clear_sticky_session("s1"));
    assert!(!pool.clear_sticky_session("s1"));
    assert!(!pool.has_sticky_session("s1"));
    assert!(!pool.refresh_sticky_session("s1"));
    let (_, route) = pool.send_sticky("s1", "waf", request("x")).await.unwrap();
    assert_eq!(route, StickyRoute::NoSession, "no session: balanced like any request");
    let (_, route) = pool.send_sticky("s2", "other", request("y")).await.unwrap_err_or_no_session();
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
    pool.create_sticky_session("idle", "waf").unwrap();
    pool.create_sticky_session("busy", "waf").unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(100)).await;
        pool.send_sticky("busy", "waf", request("ping")).await.unwrap();
    }
    // 400 s: "idle" passed the default 5 minutes and was swept by maintenance.
    assert!(!pool.has_sticky_session("idle"));
    assert!(pool.has_sticky_session("busy"));
    assert_eq!(pool.sticky_session_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_an_idle_time_out_sessions_never_expire_and_cleanup_is_manual_too() {
    let agent = allow_all();
    let cfg = PoolConfig { sticky: StickyConfig { idle_timeout: None }, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    pool.create_sticky_session("forever", "waf").unwrap();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    assert!(pool.has_sticky_session("forever"));
    assert_eq!(pool.cleanup_expired_sessions(), 0);

    // Manual clean-up, with maintenance slowed to one sweep per 1000 s so it cannot get there first.
    let agent2 = allow_all();
    let mut cfg =
        PoolConfig { sticky: StickyConfig { idle_timeout: Some(Duration::from_secs(10)) }, ..config() };
    cfg.health.window = Duration::from_secs(1000);
    cfg.health.buckets = 1;
    let (pool2, _c2) = common::single(cfg, &agent2).await;
    pool2.create_sticky_session("short", "waf").unwrap();
    pool2.create_sticky_session("kept", "waf").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(pool2.refresh_sticky_session("kept"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(pool2.sticky_session_count(), 2, "expired but not yet swept");
    assert!(!pool2.has_sticky_session("short"), "an expired session is not live");
    assert_eq!(pool2.cleanup_expired_sessions(), 1);
    assert_eq!(pool2.sticky_session_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_session_can_be_made_on_an_agent_without_a_healthy_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    agent.report_health(AgentHealth::with_status(HealthStatus::Unhealthy));
    agent.settle().await;
    let err = pool.create_sticky_session("s", "waf").unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::AgentNotReady });
}

#[tokio::test(start_paused = true)]
async fn removing_the_agent_ends_its_sessions() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.create_sticky_session("s", "waf").unwrap();
    pool.remove_agent("waf").await.unwrap();
    assert_eq!(pool.sticky_session_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn sticky_sends_dropped_at_random_points_leave_no_permit_behind() {
    let agent = allow_all();
    agent.set_seed(3);
    agent.set_latency_range(Duration::ZERO, Duration::from_millis(10));
    let (pool, _c) = common::single(config(), &agent).await;
    for s in 0..10 {
        pool.create_sticky_session(&format!("s{s}"), "waf").unwrap();
    }
    let mut rng = fastrand::Rng::with_seed(11);
    let tasks: Vec<_> = (0..2_000)
        .map(|i| {
            let pool = pool.clone();
            let session = format!("s{}", i % 10);
            let after = Duration::from_micros(rng.u64(0..12_000));
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(after, pool.send_sticky(&session, "waf", request(format!("r{i}"))))
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
    assert_eq!(pool.sticky_session_count(), 10);
    tokio::time::sleep(Duration::from_secs(302)).await;
    assert_eq!(pool.sticky_session_count(), 0, "all expired as documented");
}

#[tokio::test(start_paused = true)]
async fn try_reserve_sticky_reserves_on_the_session_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.create_sticky_session("s", "waf").unwrap();
    let (first, route) = pool.try_reserve_sticky("s", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(route, StickyRoute::Pinned);
    let (second, _) = pool.try_reserve_sticky("s", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(first.connection(), second.connection());
    assert!(second.send(request("x")).await.unwrap().is_allow());
    let (_, route) = pool.try_reserve_sticky("none", "waf", pool_api::EventKind::RequestHeaders).unwrap();
    assert_eq!(route, StickyRoute::NoSession);
}

#[tokio::test(start_paused = true)]
async fn a_sticky_send_waiting_on_its_connection_when_it_dies_is_repinned_and_delivered() {
    let agent = allow_all();
    agent.set_latency(Duration::from_secs(1));
    // One request at a time per connection: the second send waits for the first's permit.
    let cfg = PoolConfig { max_concurrency_per_connection: 1, ..config() };
    let (pool, _c) = common::single(cfg, &agent).await;
    pool.create_sticky_session("ws", "waf").unwrap();
    let send = |id: &'static str| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send_sticky("ws", "waf", request(id)).await })
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
    let (_, route) = pool.send_sticky("ws", "waf", request("third")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned, "the session stays on its new connection");
    assert_eq!(agent.events_by_connection().pop().unwrap().0, to);
    assert_eq!(pool.stats().totals.in_flight, 0);
}
