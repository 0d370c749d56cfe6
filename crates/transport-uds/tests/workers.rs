//! A connector spread over worker runtimes (`UdsConnector::spread_over`), through pool-core, to
//! a real agent over a real Unix socket: the connections are made on the workers in turn and
//! say so (`AgentConnection::home`, the pool's `ConnectionHealth::worker`), and a request made
//! on a worker goes over a connection of that worker while it has a usable one; a worker that
//! stops closes its connections at once.

use std::time::Duration;

use http::{Method, Uri};
use pool_api::{Action, Connector as _, Event, Hello, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::workers::{
    AllowButHoldSlow, check_a_stopped_worker_closes_its_connections, worker_runtimes,
};
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_placed_on_the_workers_and_requests_stay_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let server = UdsServer::bind(&socket, UdsServerConfig::default()).await.unwrap();
    tokio::spawn(server.serve(AllowButHoldSlow, std::future::pending()));

    let (handles, _stops) = worker_runtimes(2);
    let connector = UdsConnector::default().spread_over(handles.clone());
    let config = PoolConfig { connections_per_endpoint: 4, ..PoolConfig::default() };
    let pool = AgentPool::new(config, connector).unwrap();
    let added =
        pool.add_agent(AgentSpec::new("allow").endpoint(format!("unix:{}", socket.display()))).await.unwrap();
    assert_eq!(added.connected, 4);
    let homes = |pool: &AgentPool| -> Vec<Option<usize>> {
        pool.health("allow").unwrap().iter().map(|c| c.worker).collect()
    };
    // `add_agent` counts a connection up from its handshake; the slot takes it just after.
    let attached = tokio::time::timeout(Duration::from_secs(10), async {
        while homes(&pool).contains(&None) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    attached.await.expect("every connection attached within 10 s");
    let mut placed = homes(&pool);
    placed.sort();
    assert_eq!(placed, [Some(0), Some(0), Some(1), Some(1)], "two connections on each worker");

    // Requests made on worker 1 are answered over worker 1's connections only.
    let before: Vec<u64> = pool.health("allow").unwrap().iter().map(|c| c.requests).collect();
    let on_one = pool.clone();
    handles[1]
        .spawn(async move {
            for i in 0..40 {
                let event = Event::RequestHeaders(RequestHeaders::new(
                    format!("r{i}"),
                    Method::GET,
                    Uri::from_static("/"),
                ));
                let decision = on_one.send("allow", &event).await.unwrap();
                assert!(matches!(decision.action, Action::Allow));
            }
        })
        .await
        .unwrap();
    let after = pool.health("allow").unwrap();
    let mut by_worker = [0u64; 2];
    for (c, before) in after.iter().zip(before) {
        by_worker[c.worker.unwrap()] += c.requests - before;
    }
    assert_eq!(by_worker, [0, 40], "{after:#?}");

    // Off the workers (this test's own runtime), requests go anywhere: all are answered.
    for i in 0..8 {
        let event =
            Event::RequestHeaders(RequestHeaders::new(format!("x{i}"), Method::GET, Uri::from_static("/")));
        tokio::time::timeout(Duration::from_secs(10), pool.send("allow", &event)).await.unwrap().unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_closes_its_connections_at_once_and_the_others_keep_answering() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let server = UdsServer::bind(&socket, UdsServerConfig::default()).await.unwrap();
    tokio::spawn(server.serve(AllowButHoldSlow, std::future::pending()));
    let (handles, stops) = worker_runtimes(2);
    let connector = UdsConnector::default().spread_over(handles);
    let endpoint = pool_api::Endpoint::new(format!("unix:{}", socket.display()));
    let connect = || async {
        connector.connect(&endpoint).await.unwrap().handshake(Hello::new("test-proxy")).await.unwrap()
    };
    let (on_zero, on_one) = (connect().await, connect().await);
    check_a_stopped_worker_closes_its_connections(on_zero, on_one, stops).await;
}
