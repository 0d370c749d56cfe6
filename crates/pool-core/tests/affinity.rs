//! Correlation affinity and cancel: a request's events follow its headers' connection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{config, request};
use http::StatusCode;
use pool_api::{
    BodyChunk, CancelReason, Capabilities, CorrelationId, Event, EventKind, RequestComplete, ResponseHeaders,
};
use pool_core::{AffinityConfig, PoolConfig, PoolError};
use test_support::{AllowAll, MemoryAgent};
use tower::ServiceExt;

fn agent() -> MemoryAgent {
    let a = MemoryAgent::new(AllowAll);
    a.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL));
    a
}

fn req_body(id: &str, index: u32, last: bool) -> Event {
    Event::RequestBody(BodyChunk::new(id, index, last, Bytes::from_static(b"chunk")))
}

fn resp_headers(id: &str) -> Event {
    Event::ResponseHeaders(ResponseHeaders {
        correlation_id: id.into(),
        status: StatusCode::OK,
        headers: Default::default(),
    })
}

fn resp_body(id: &str) -> Event {
    Event::ResponseBody(BodyChunk::new(id, 0, true, Bytes::from_static(b"out")))
}

fn complete(id: &str) -> Event {
    Event::RequestComplete(RequestComplete {
        correlation_id: id.into(),
        status: StatusCode::OK,
        duration: Duration::from_millis(1),
        request_bytes: 0,
        response_bytes: 0,
    })
}

#[tokio::test(start_paused = true)]
async fn every_event_of_1000_concurrent_requests_lands_on_its_headers_connection() {
    let agent = agent();
    agent.set_seed(5);
    agent.set_latency_range(Duration::ZERO, Duration::from_millis(5));
    let (pool, _c) = common::single(config(), &agent).await;
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let id = format!("r{i}");
                pool.send("waf", &request(id.clone())).await.unwrap();
                for (n, event) in
                    [req_body(&id, 0, false), req_body(&id, 1, true), resp_headers(&id), resp_body(&id)]
                        .into_iter()
                        .enumerate()
                {
                    pool.send("waf", &event).await.unwrap_or_else(|e| panic!("{id} event {n}: {e}"));
                }
                pool.send("waf", &complete(&id)).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut home: HashMap<CorrelationId, String> = HashMap::new();
    let mut events = 0;
    for (label, id, _kind) in agent.events_by_connection() {
        events += 1;
        let first = home.entry(id.clone()).or_insert_with(|| label.clone());
        assert_eq!(*first, label, "{id} moved between connections");
    }
    assert_eq!(events, 6000);
    let used: std::collections::HashSet<_> = home.values().collect();
    assert_eq!(used.len(), 4, "requests were still balanced across connections");
    assert_eq!(pool.affinity().len(), 0, "RequestComplete removed every pin");
}

#[tokio::test(start_paused = true)]
async fn a_pinned_request_whose_connection_died_fails_and_never_moves() {
    let agent = agent();
    let (pool, _c) = common::single(config(), &agent).await;
    pool.send("waf", &request("r1")).await.unwrap();
    let (home, _, _) = agent.events_by_connection().pop().unwrap();
    agent.connection_by_label(&home).unwrap().disconnect();
    let err = pool.send("waf", &req_body("r1", 0, true)).await.unwrap_err();
    assert_eq!(err, PoolError::PinLost { agent: "waf".into(), key: "r1".into() });
    assert_eq!(agent.events_received(), 1, "the body was not sent elsewhere");
    assert_eq!(pool.affinity().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_headers_send_leaves_no_pin() {
    let agent = agent();
    agent.set_latency(Duration::from_secs(1));
    let (pool, _c) = common::single(config(), &agent).await;
    let _ = tokio::time::timeout(Duration::from_millis(10), pool.send("waf", &request("gone"))).await;
    assert_eq!(pool.affinity().len(), 0);
    // A failed headers send leaves none either.
    agent.set_latency(Duration::ZERO);
    agent.fail_next(1);
    assert!(pool.send("waf", &request("failed")).await.is_err());
    assert_eq!(pool.affinity().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn idle_pins_expire_after_the_ttl_and_can_be_cleared_by_hand() {
    let agent = agent();
    let mut cfg = config();
    cfg.affinity = AffinityConfig { ttl: Duration::from_secs(30), ..AffinityConfig::default() };
    let (pool, _c) = common::single(cfg, &agent).await;
    for id in ["a", "b", "c"] {
        pool.send("waf", &request(id)).await.unwrap();
    }
    assert_eq!(pool.affinity().len(), 3);
    assert!(pool.affinity().clear("waf", "a"));
    assert!(!pool.affinity().clear("waf", "a"));
    assert_eq!(pool.affinity().len(), 2);
    tokio::time::sleep(Duration::from_secs(20)).await;
    pool.send("waf", &req_body("b", 0, true)).await.unwrap(); // touching keeps "b" alive
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(pool.affinity().len(), 1, "c expired, b was touched");
    assert_eq!(pool.stats().totals.affinity, 1);
}

#[tokio::test(start_paused = true)]
async fn over_the_cap_requests_are_balanced_and_counted() {
    let agent = agent();
    let mut cfg = config();
    cfg.affinity.max_entries = 2;
    let (pool, _c) = common::single(cfg, &agent).await;
    for i in 0..5 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert_eq!(pool.affinity().len(), 2);
    // Unpinned requests still work, balanced per event.
    pool.send("waf", &req_body("r4", 0, true)).await.unwrap();
    // A full table still re-pins a request it holds when its headers are sent again: its
    // body follows the second headers.
    for _ in 0..8 {
        pool.send("waf", &request("r0")).await.unwrap();
        let (headers_on, ..) = agent.events_by_connection().pop().unwrap();
        pool.send("waf", &req_body("r0", 0, true)).await.unwrap();
        let (body_on, ..) = agent.events_by_connection().pop().unwrap();
        assert_eq!(body_on, headers_on);
    }
    assert_eq!(pool.affinity().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_takes_only_headers_gets_no_pins() {
    let agent = MemoryAgent::new(AllowAll);
    agent.set_capabilities(Capabilities::new("waf").with_events([EventKind::RequestHeaders]));
    let (pool, _c) = common::single(config(), &agent).await;
    for i in 0..20 {
        pool.send("waf", &request(format!("r{i}"))).await.unwrap();
    }
    assert_eq!(pool.affinity().len(), 0, "no later event can reach it, so nothing to pin");
    let err = pool.send("waf", &req_body("r0", 0, true)).await.unwrap_err();
    assert!(matches!(err, PoolError::UnsupportedEvent { kind: EventKind::RequestBody, .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_reservation_or_service_still_goes_to_the_pinned_connection() {
    let agent = agent();
    let (pool, _c) =
        common::single(PoolConfig { balancer: pool_core::balance::Strategy::RoundRobin, ..config() }, &agent)
            .await;
    pool.send("waf", &request("r1")).await.unwrap();
    for i in 0..6 {
        let event = req_body("r1", i, false);
        if i % 2 == 0 {
            pool.try_reserve("waf", EventKind::RequestBody).unwrap().send(&event).await.unwrap();
        } else {
            pool.service("waf").unwrap().oneshot(event).await.unwrap();
        }
    }
    let labels: std::collections::HashSet<_> =
        agent.events_by_connection().into_iter().map(|(l, _, _)| l).collect();
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert_eq!(pool.stats().totals.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn cancel_fails_one_of_two_requests_sharing_a_connection_and_tells_the_agent() {
    let agent = agent();
    agent.set_latency(Duration::from_secs(5));
    let (pool, _c) = common::single(PoolConfig { connections_per_endpoint: 1, ..config() }, &agent).await;
    let spawn = |id: &'static str| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request(id)).await })
    };
    let (first, second) = (spawn("keep"), spawn("drop"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    pool.cancel("waf", &"drop".into(), CancelReason::ClientDisconnected).unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert_eq!(err, PoolError::Cancelled { agent: "waf".into(), reason: CancelReason::ClientDisconnected });
    assert!(first.await.unwrap().unwrap().is_allow(), "the other request was untouched");
    agent.settle().await;
    let cancels = agent.cancels();
    assert_eq!(cancels.len(), 1);
    assert_eq!((cancels[0].1.as_str(), cancels[0].2), ("drop", CancelReason::ClientDisconnected));
    assert_eq!(pool.agent_stats("waf").unwrap().totals.failures, 0, "a cancel is not an agent failure");
    assert_eq!(
        pool.cancel("nope", &"x".into(), CancelReason::Manual),
        Err(PoolError::UnknownAgent { agent: "nope".into() })
    );
}

#[tokio::test(start_paused = true)]
async fn try_reserve_for_takes_the_permit_on_the_pinned_connection() {
    let agent = agent();
    let (pool, _c) =
        common::single(PoolConfig { balancer: pool_core::balance::Strategy::RoundRobin, ..config() }, &agent)
            .await;
    pool.send("waf", &request("r1")).await.unwrap();
    let home = agent.events_by_connection().pop().unwrap().0;
    for i in 0..4 {
        let r = pool.affinity().try_reserve("waf", EventKind::RequestBody, &"r1".into()).unwrap();
        assert_eq!(r.connection(), home, "reservation {i}");
    }
    agent.connection_by_label(&home).unwrap().disconnect();
    tokio::time::sleep(Duration::from_millis(1)).await; // the supervisor takes it out
    let err = pool.affinity().try_reserve("waf", EventKind::RequestBody, &"r1".into()).unwrap_err();
    assert_eq!(err, PoolError::PinLost { agent: "waf".into(), key: "r1".into() });
}
