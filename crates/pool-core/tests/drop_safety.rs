//! Futures dropped at any point leak nothing: every permit, in-flight count and pending
//! request on the wire returns to zero.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{allow_all, config, request};
use http::StatusCode;
use pool_api::{BodyChunk, Capabilities, Event, EventKind, RequestComplete};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::MemoryConnector;

const REQUESTS: usize = 100_000;
const BATCH: usize = 1_000;

#[tokio::test(start_paused = true)]
async fn dropping_futures_at_random_points_leaks_nothing() {
    let (a, b) = (allow_all(), allow_all());
    for (agent, seed) in [(&a, 1), (&b, 2)] {
        agent.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL));
        agent.set_seed(seed);
        agent.set_latency_range(Duration::ZERO, Duration::from_millis(20));
        agent.set_failure_rate(0.05);
    }
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let mut cfg = PoolConfig { max_concurrency_per_connection: 64, ..config() };
    cfg.breaker.failure_threshold = u32::MAX;
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://a", "mem://b"])).await.unwrap();

    let mut rng = fastrand::Rng::with_seed(99);
    let mut sent = 0;
    while sent < REQUESTS {
        let mut tasks = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let pool = pool.clone();
            let id = format!("r{sent}");
            sent += 1;
            // Where the future is dropped: never polled, after the first poll, after a
            // random time (before, during or after the agent's answer), or not at all.
            let how = rng.u8(0..4);
            let after = Duration::from_micros(rng.u64(0..25_000));
            let whole = rng.bool();
            tasks.push(tokio::spawn(async move {
                let event = request(id.clone());
                let fut = pool.send("waf", &event);
                let answered = match how {
                    0 => {
                        drop(fut);
                        false
                    }
                    1 => {
                        let mut fut = Box::pin(fut);
                        futures_poll_once(fut.as_mut()).await;
                        false
                    }
                    2 => tokio::time::timeout(after, fut).await.is_ok_and(|r| r.is_ok()),
                    _ => fut.await.is_ok(),
                };
                // Half of the answered requests go on with a body and, sometimes, a completion,
                // also dropped at random points.
                if answered && whole {
                    let body =
                        Event::RequestBody(BodyChunk::new(id.as_str(), 0, true, Bytes::from_static(b"b")));
                    let _ = tokio::time::timeout(after, pool.send("waf", &body)).await;
                    if how == 3 {
                        let _ = pool.send("waf", &complete(&id)).await;
                    }
                }
            }));
        }
        // Some tasks are aborted outright, mid-flight.
        for (i, t) in tasks.iter().enumerate() {
            if i.is_multiple_of(17) {
                t.abort();
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        // Disconnects happen too, now and then.
        if sent.is_multiple_of(20_000) {
            a.disconnect_all();
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.settle().await;
    b.settle().await;

    assert_eq!(pool.stats().totals.in_flight, 0);
    // Pins of requests that never completed expire with the TTL (5 min), as documented.
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert_eq!(pool.affinity().len(), 0, "every affinity pin is gone");
    for h in pool.health("waf").unwrap() {
        assert_eq!(h.in_flight, 0, "{}", h.label);
    }
    assert_eq!(a.pending() + b.pending(), 0, "nothing left pending on the wire");
    // Every permit is back: the full capacity can be reserved at once.
    let capacity = 8 * 64;
    let held: Vec<_> = (0..capacity)
        .map(|_| pool.try_reserve("waf", pool_api::EventKind::RequestHeaders).unwrap())
        .collect();
    assert!(pool.try_reserve("waf", pool_api::EventKind::RequestHeaders).is_err());
    drop(held);
    assert_eq!(pool.stats().totals.in_flight, 0);
    let stats = pool.agent_stats("waf").unwrap();
    assert!(stats.totals.requests > 10_000, "{stats:?}");
}

fn complete(id: &str) -> Event {
    Event::RequestComplete(RequestComplete {
        correlation_id: id.into(),
        status: StatusCode::OK,
        duration: Duration::from_millis(1),
        request_bytes: 1,
        response_bytes: 0,
    })
}

/// Polls a future once, then lets it go.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut fut).poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

#[allow(dead_code)]
fn _assert_send<'a>(pool: &'a AgentPool, event: &'a Event) -> impl Send + 'a {
    pool.send("x", event)
}
