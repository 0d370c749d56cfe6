//! Replacing an agent under the same id (`AgentPool::replace_agent`): the new agent connects
//! first, is swapped in atomically, and the old one retires once what it carries has finished.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{allow_all, config, request};
use http::StatusCode;
use pool_api::{BodyChunk, Capabilities, Event, EventKind, RequestComplete};
use pool_core::{AgentPool, AgentSpec, PoolConfig, PoolError, StickyRoute, Unavailable};
use test_support::{MemoryAgent, MemoryConnector};

/// Agents `a` and `b` on `mem://a` and `mem://b`, and a pool with `"waf"` on `mem://a`. With
/// `pinned`, the agents take every event kind, so each request is pinned to the connection of
/// its headers (correlation affinity); without, they take headers only and nothing is pinned.
async fn two_homes(cfg: PoolConfig, pinned: bool) -> (AgentPool, MemoryAgent, MemoryAgent) {
    let (a, b) = (allow_all(), allow_all());
    let events = if pinned { EventKind::ALL.to_vec() } else { vec![EventKind::RequestHeaders] };
    for agent in [&a, &b] {
        agent.set_capabilities(Capabilities::new("waf").with_events(events.clone()));
    }
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://a")).await.unwrap();
    (pool, a, b)
}

fn body(id: &str) -> Event {
    Event::RequestBody(BodyChunk::new(id, 0, true, Bytes::from_static(b"chunk")))
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

fn home(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "mem://b" } else { "mem://a" }
}

#[tokio::test(start_paused = true)]
async fn replacing_an_agent_twenty_times_under_load_fails_no_request_and_answers_each_once() {
    let (pool, a, b) = two_homes(config(), false).await;
    for agent in [&a, &b] {
        agent.set_seed(3);
        agent.set_latency_range(Duration::ZERO, Duration::from_millis(2));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.is_cancelled() {
                    let id = format!("c{c}-{i}");
                    results.push((id.clone(), pool.send("waf", &request(id)).await));
                    i += 1;
                }
                results
            })
        })
        .collect();
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let report = pool.replace_agent(AgentSpec::new("waf").endpoint(home(i))).await.unwrap();
        assert_eq!(report.connected, report.slots, "replacement {i}");
        assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].endpoint, home(i));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    let mut sent = 0;
    for client in clients {
        for (id, result) in client.await.unwrap() {
            assert!(result.as_ref().is_ok_and(|d| d.is_allow()), "{id}: {result:?}");
            sent += 1;
        }
    }
    assert!(sent > 1000, "the load ran throughout: {sent}");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for agent in [&a, &b] {
        for (_, id, _) in agent.events_by_connection() {
            *seen.entry(id.to_string()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), sent, "every request reached an agent");
    assert!(seen.values().all(|&n| n == 1), "and exactly once");

    // The replaced agents retire: only the last one's connections stay open.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.live_connections(), 4, "the last replacement went to mem://a");
    assert_eq!(b.live_connections(), 0);
    let stats = pool.stats();
    assert_eq!((stats.agents, stats.totals.in_flight, stats.totals.connected), (1, 0, 4));
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_on_the_replaced_agent_finish_there() {
    let (pool, a, b) = two_homes(config(), false).await;
    a.set_latency(Duration::from_secs(2));
    let slow: Vec<_> = (0..5)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send("waf", &request(format!("slow{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(a.pending(), 5);
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    // New requests go to the new agent at once, while the old connections still carry theirs.
    pool.send("waf", &request("new")).await.unwrap();
    assert_eq!(b.events_received(), 1);
    assert_eq!((a.pending(), a.live_connections()), (5, 4));
    for task in slow {
        assert!(task.await.unwrap().unwrap().is_allow());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.live_connections(), 0, "the old agent retired once its requests finished");
    assert_eq!(b.live_connections(), 4);
}

#[tokio::test(start_paused = true)]
async fn later_events_of_a_request_follow_its_headers_to_the_replaced_agent() {
    let (pool, a, b) = two_homes(config(), true).await;
    pool.send("waf", &request("r1")).await.unwrap();
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    pool.send("waf", &request("r2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // r1 is pinned to a connection of the old agent: it does not retire under it.
    assert_eq!(a.live_connections(), 4);
    pool.send("waf", &body("r1")).await.unwrap();
    pool.send("waf", &body("r2")).await.unwrap();
    pool.send("waf", &complete("r1")).await.unwrap();
    let on_a: Vec<_> = a.events_by_connection();
    let on_b: Vec<_> = b.events_by_connection();
    assert_eq!(on_a.len(), 3, "{on_a:?}");
    assert!(on_a.iter().all(|(conn, id, _)| conn == &on_a[0].0 && id.as_str() == "r1"), "{on_a:?}");
    assert!(on_b.iter().all(|(_, id, _)| id.as_str() == "r2"), "{on_b:?}");
    // Its request complete, the old agent retires.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.live_connections(), 0);
    assert_eq!(pool.affinity().len(), 1, "r2 is still pinned, to the new agent");
}

#[tokio::test(start_paused = true)]
async fn a_request_still_pinned_to_the_replaced_agent_at_the_drain_time_out_loses_its_pin() {
    let cfg = PoolConfig { drain_timeout: Duration::from_secs(5), ..config() };
    let (pool, a, _b) = two_homes(cfg, true).await;
    pool.send("waf", &request("r1")).await.unwrap();
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.live_connections(), 0);
    let err = pool.send("waf", &body("r1")).await.unwrap_err();
    assert!(matches!(err, PoolError::PinLost { ref key, .. } if key == "r1"), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn an_invalid_replacement_leaves_the_agent_untouched() {
    let (pool, a, b) = two_homes(config(), false).await;
    let before = pool.agent_stats("waf").unwrap();
    for bad in ["mem://", "no scheme", "waf"] {
        let err = pool.replace_agent(AgentSpec::new("waf").endpoint(bad)).await.unwrap_err();
        assert!(matches!(err, PoolError::InvalidEndpoint { ref agent, .. } if agent == "waf"), "{err:?}");
    }
    let options = pool_core::AgentOptions { max_concurrency_per_connection: Some(0), ..Default::default() };
    let err =
        pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b").options(options)).await.unwrap_err();
    assert!(matches!(err, PoolError::InvalidConfig { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let endpoints = |s: pool_core::AgentStats| -> Vec<_> {
        s.endpoints.into_iter().map(|e| (e.endpoint, e.connected)).collect()
    };
    assert_eq!(endpoints(pool.agent_stats("waf").unwrap()), endpoints(before));
    assert_eq!((a.connections_opened(), a.live_connections()), (4, 4));
    assert_eq!(b.connect_attempts(), 0);
    pool.send("waf", &request("r")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn replacing_an_unknown_agent_is_a_typed_error() {
    let (pool, _a, b) = two_homes(config(), false).await;
    let err = pool.replace_agent(AgentSpec::new("nope").endpoint("mem://b")).await.unwrap_err();
    assert_eq!(err, PoolError::UnknownAgent { agent: "nope".into() });
    assert_eq!(b.connect_attempts(), 0, "nothing was dialled");
    pool.shutdown().await;
    let err = pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap_err();
    assert_eq!(err, PoolError::ShuttingDown);
}

#[tokio::test(start_paused = true)]
async fn a_replacement_whose_endpoints_are_down_is_swapped_in_like_an_added_agent() {
    let (pool, a, b) = two_homes(config(), false).await;
    b.refuse_connections(true);
    let report = pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    assert_eq!((report.slots, report.connected), (4, 0));
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].endpoint, "mem://b");
    let err = pool.send("waf", &request("r")).await.unwrap_err();
    assert!(matches!(err, PoolError::Unavailable { reason: Unavailable::NoConnections, .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.live_connections(), 0);
    // Retried in the background, as an added agent is.
    b.refuse_connections(false);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(b.live_connections(), 4);
    pool.send("waf", &request("r2")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replacement_dropped_before_its_swap_is_abandoned() {
    let cfg = PoolConfig { connect_timeout: Duration::from_secs(10), ..config() };
    let (pool, a, b) = two_homes(cfg, false).await;
    b.set_connect_silent(true);
    let replace = pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b"));
    assert!(tokio::time::timeout(Duration::from_secs(1), replace).await.is_err());
    b.set_connect_silent(false);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(b.live_connections(), 0, "the abandoned agent's supervisors stopped");
    assert_eq!(a.live_connections(), 4);
    assert_eq!(pool.agent_stats("waf").unwrap().endpoints[0].endpoint, "mem://a");
    pool.send("waf", &request("r")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_sticky_session_moves_to_the_new_agent_once_the_old_retires() {
    let (pool, a, b) = two_homes(config(), true).await;
    pool.sticky_sessions().create("ws", "waf").unwrap();
    let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("m1")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned);
    pool.send("waf", &complete("m1")).await.unwrap();
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("m2")).await.unwrap();
    assert!(matches!(route, StickyRoute::Repinned { .. }), "{route:?}");
    let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("m3")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned);
    assert_eq!(a.events_received(), 2);
    assert_eq!(b.events_received(), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_a_replaced_agent_that_is_still_draining() {
    let (pool, a, _b) = two_homes(config(), false).await;
    a.set_latency(Duration::from_secs(1));
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send("waf", &request("slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    pool.shutdown().await;
    assert_eq!(a.live_connections(), 0);
    assert!(slow.await.unwrap().unwrap().is_allow(), "drained, not cut off");
}

#[tokio::test(start_paused = true)]
async fn every_event_of_requests_spanning_twenty_replacements_lands_on_its_headers_connection() {
    let (pool, a, b) = two_homes(config(), true).await;
    for agent in [&a, &b] {
        agent.set_seed(9);
        agent.set_latency_range(Duration::ZERO, Duration::from_millis(3));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0;
                while !stop.is_cancelled() {
                    let id = format!("c{c}-{sent}");
                    for event in [request(id.clone()), body(&id), complete(&id)] {
                        let result = pool.send("waf", &event).await;
                        assert!(
                            result.as_ref().is_ok_and(|d| d.is_allow()),
                            "{id} {:?}: {result:?}",
                            event.kind()
                        );
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        pool.replace_agent(AgentSpec::new("waf").endpoint(home(i))).await.unwrap();
    }
    stop.cancel();
    let mut sent = 0;
    for client in clients {
        sent += client.await.unwrap();
    }
    assert!(sent > 300, "the load ran throughout: {sent}");
    let mut homes: HashMap<String, Vec<String>> = HashMap::new();
    for agent in [&a, &b] {
        for (conn, id, _) in agent.events_by_connection() {
            homes.entry(id.to_string()).or_default().push(conn);
        }
    }
    assert_eq!(homes.len(), sent);
    for (id, conns) in &homes {
        assert_eq!(conns.len(), 3, "{id}: every event once");
        assert!(conns.iter().all(|c| c == &conns[0]), "{id}: on one connection: {conns:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.live_connections() + b.live_connections(), 4, "every replaced agent retired");
    assert_eq!(pool.affinity().len(), 0);
}

/// Records the events one server saw: (correlation id, kind).
#[derive(Clone, Default)]
struct Counting(std::sync::Arc<std::sync::Mutex<Vec<(String, EventKind)>>>);

impl pool_api::AgentHandler for Counting {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("waf").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<pool_api::Decision, pool_api::AgentError> {
        self.0.lock().unwrap().push((event.correlation_id().to_string(), event.kind()));
        tokio::time::sleep(Duration::from_micros(200)).await;
        Ok(pool_api::Decision::allow())
    }
}

/// The same over real Unix sockets (transport-uds), on a multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_an_agent_between_two_unix_sockets_under_load_fails_no_request() {
    use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};
    let dir = std::env::temp_dir().join(format!("pool-core-replace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    for name in ["a", "b"] {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let server = UdsServer::bind(&socket, UdsServerConfig::default()).await.unwrap();
        let handler = Counting::default();
        servers.push(handler.clone());
        let stop = stop.clone();
        tokio::spawn(server.serve(handler, async move { stop.cancelled().await }));
        endpoints.push(format!("unix:{}", socket.display()));
    }
    let cfg = PoolConfig { connections_per_endpoint: 2, ..config() };
    let pool = AgentPool::new(cfg, UdsConnector::default()).unwrap();
    let report = pool.add_agent(AgentSpec::new("waf").endpoint(endpoints[0].as_str())).await.unwrap();
    assert_eq!(report.connected, 2);

    let load = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (pool, load) = (pool.clone(), load.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let mut sent = 0;
                while !load.is_cancelled() {
                    let id = format!("c{c}-{sent}");
                    for event in [request(id.clone()), body(&id), complete(&id)] {
                        if let Err(e) = pool.send("waf", &event).await {
                            failed.push(format!("{id} {:?}: {e}", event.kind()));
                        }
                    }
                    sent += 1;
                }
                (sent, failed)
            })
        })
        .collect();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = pool
            .replace_agent(AgentSpec::new("waf").endpoint(endpoints[(i + 1) % 2].as_str()))
            .await
            .unwrap();
        assert_eq!(report.connected, 2, "replacement {i}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    load.cancel();
    let mut sent = 0;
    for client in clients {
        let (n, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        sent += n;
    }
    assert!(sent > 100, "the load ran throughout: {sent}");
    let mut seen: HashMap<String, Vec<(usize, EventKind)>> = HashMap::new();
    for (server, handler) in servers.iter().enumerate() {
        for (id, kind) in handler.0.lock().unwrap().iter() {
            seen.entry(id.clone()).or_default().push((server, *kind));
        }
    }
    assert_eq!(seen.len(), sent);
    for (id, events) in &seen {
        assert_eq!(events.len(), 3, "{id}: each event once: {events:?}");
        assert!(events.iter().all(|(s, _)| *s == events[0].0), "{id}: one server: {events:?}");
    }
    pool.shutdown().await;
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_sticky_send_waiting_on_the_replaced_agents_full_connection_is_woken_by_its_release() {
    let cfg = PoolConfig { connections_per_endpoint: 1, max_concurrency_per_connection: 1, ..config() };
    let (pool, a, b) = two_homes(cfg, false).await;
    a.set_latency(Duration::from_secs(1));
    pool.sticky_sessions().create("ws", "waf").unwrap();
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.sticky_sessions().send("ws", "waf", &request("m1")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    pool.replace_agent(AgentSpec::new("waf").endpoint("mem://b")).await.unwrap();
    // The old connection is full: this send waits for its permit, on the old agent.
    let started = tokio::time::Instant::now();
    let (_, route) = pool.sticky_sessions().send("ws", "waf", &request("m2")).await.unwrap();
    assert_eq!(route, StickyRoute::Pinned);
    assert!(started.elapsed() < Duration::from_secs(2), "woken by the release: {:?}", started.elapsed());
    first.await.unwrap().unwrap();
    assert_eq!((a.events_received(), b.events_received()), (2, 0));
}
