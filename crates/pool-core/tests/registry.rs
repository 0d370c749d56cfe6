//! Adding, finding and removing agents.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_api::TransportError;
use pool_core::{AgentOptions, AgentPool, AgentSpec, PoolConfig, PoolError, Unavailable};
use test_support::MemoryConnector;

#[tokio::test(start_paused = true)]
async fn add_agent_opens_n_connections_per_endpoint() {
    let (a, b) = (allow_all(), allow_all());
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let pool = AgentPool::new(config(), connector).unwrap();
    let report = pool.add_agent(AgentSpec::new("waf").endpoints(["mem://a", "mem://b"])).await.unwrap();
    assert_eq!((report.slots, report.connected), (8, 8));
    assert_eq!((a.live_connections(), b.live_connections()), (4, 4));
    let stats = pool.agent_stats("waf").unwrap();
    assert_eq!((stats.totals.connections, stats.totals.connected, stats.totals.healthy), (8, 8, 8));
    assert!(stats.is_healthy);
    assert_eq!(stats.endpoints.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn connections_per_endpoint_is_configurable_per_pool_and_per_agent() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(PoolConfig { connections_per_endpoint: 2, ..config() }, connector).unwrap();
    assert_eq!(pool.add_agent(AgentSpec::new("two").endpoint("mem://waf")).await.unwrap().connected, 2);
    let one = AgentOptions { connections_per_endpoint: Some(1), ..AgentOptions::default() };
    let r = pool.add_agent(AgentSpec::new("one").endpoint("mem://waf").options(one)).await.unwrap();
    assert_eq!(r.connected, 1);
    assert_eq!(agent.live_connections(), 3);
}

#[tokio::test(start_paused = true)]
async fn registry_answers_has_ids_count_and_rejects_duplicates() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://x", &agent);
    let pool = AgentPool::new(config(), connector).unwrap();
    for id in ["b", "a", "c"] {
        pool.add_agent(AgentSpec::new(id).endpoint("mem://x")).await.unwrap();
    }
    assert_eq!(pool.agent_ids(), ["a", "b", "c"]);
    assert_eq!(pool.agent_count(), 3);
    assert!(pool.has_agent("b") && !pool.has_agent("z"));
    let dup = pool.add_agent(AgentSpec::new("a").endpoint("mem://x")).await.unwrap_err();
    assert_eq!(dup, PoolError::AgentExists { agent: "a".into() });
    assert!(pool.agent_stats("z").is_none());
    assert_eq!(
        pool.send("z", &request("r")).await.unwrap_err(),
        PoolError::UnknownAgent { agent: "z".into() }
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_agent_specs_list_every_problem() {
    let pool = AgentPool::new(config(), MemoryConnector::new()).unwrap();
    let bad = AgentSpec::new(" ")
        .endpoints(["mem://a", "mem://a"])
        .options(AgentOptions { max_concurrency_per_connection: Some(0), ..AgentOptions::default() });
    let Err(PoolError::InvalidConfig { problems }) = pool.add_agent(bad).await else { panic!("must fail") };
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("listed twice")));
    let none = pool.add_agent(AgentSpec::new("x")).await.unwrap_err();
    assert!(none.to_string().contains("at least one"), "{none}");
}

#[tokio::test(start_paused = true)]
async fn unreachable_agent_is_registered_unhealthy_and_retried_until_it_comes_up() {
    let agent = allow_all();
    agent.refuse_connections(true);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(config(), connector).unwrap();
    let report = pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    assert_eq!(report.connected, 0);
    assert!(pool.has_agent("waf"));
    assert!(!pool.is_agent_healthy("waf"));
    let err = pool.send("waf", &request("r1")).await.unwrap_err();
    assert_eq!(err, PoolError::Unavailable { agent: "waf".into(), reason: Unavailable::NoConnections });
    let health = pool.health("waf").unwrap();
    assert!(health[0].last_error.as_ref().unwrap().0.contains("cannot connect"), "{health:?}");

    // Retries never give up: minutes later the agent appears and is used.
    tokio::time::sleep(Duration::from_secs(600)).await;
    agent.refuse_connections(false);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(pool.is_agent_healthy("waf"));
    assert_eq!(agent.live_connections(), 4);
    assert!(pool.send("waf", &request("r2")).await.unwrap().is_allow());
}

#[tokio::test(start_paused = true)]
async fn remove_agent_closes_its_connections_and_forgets_it() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    let report = pool.remove_agent("waf").await.unwrap();
    assert_eq!(report.forced, 0);
    assert!(!pool.has_agent("waf"));
    assert_eq!(agent.live_connections(), 0);
    assert_eq!(agent.closes().len(), 4);
    assert_eq!(agent.drains().len(), 4, "the agent hears of the drain before the close");
    assert_eq!(pool.remove_agent("waf").await.unwrap_err(), PoolError::UnknownAgent { agent: "waf".into() });
}

#[tokio::test(start_paused = true)]
async fn remove_all_empties_the_registry() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://x", &agent);
    let pool = AgentPool::new(config(), connector).unwrap();
    pool.add_agent(AgentSpec::new("a").endpoint("mem://x")).await.unwrap();
    pool.add_agent(AgentSpec::new("b").endpoint("mem://x")).await.unwrap();
    pool.remove_all().await;
    assert_eq!(pool.agent_count(), 0);
    assert_eq!(agent.live_connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_pool_outside_a_runtime_is_refused() {
    let r = std::thread::spawn(|| AgentPool::new(PoolConfig::default(), MemoryConnector::new()).err())
        .join()
        .unwrap();
    assert_eq!(r, Some(PoolError::NoRuntime));
}

#[tokio::test(start_paused = true)]
async fn invalid_pool_config_is_refused_with_every_problem() {
    let bad = PoolConfig { connections_per_endpoint: 0, request_timeout: Duration::ZERO, ..config() };
    let Err(PoolError::InvalidConfig { problems }) = AgentPool::new(bad, MemoryConnector::new()) else {
        panic!("must fail")
    };
    assert_eq!(problems.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn proxy_id_reaches_the_agent_in_the_hello() {
    let agent = allow_all();
    let (_pool, _c) = common::single(PoolConfig { proxy_id: "edge-7".into(), ..config() }, &agent).await;
    assert!(agent.hellos().iter().all(|h| h.proxy_id == "edge-7"));
    assert_eq!(agent.hellos().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_pool_handle_stops_every_connection() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    drop(pool);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(agent.live_connections(), 0);
    let _ = TransportError::Cancelled(pool_api::CancelReason::Manual);
}

#[tokio::test(start_paused = true)]
async fn a_mistyped_endpoint_is_refused_at_add_agent_before_anything_is_registered() {
    let agent = allow_all();
    // A transport that serves `unix:` only, like the UDS one.
    let connector = MemoryConnector::new().with_schemes(["unix"]);
    connector.register("unix:/run/waf.sock", &agent);
    let fail_open =
        AgentOptions { failure_mode: Some(pool_core::FailureMode::Open), ..AgentOptions::default() };
    let pool = AgentPool::new(config(), connector.clone()).unwrap();
    for typo in ["uds:/run/waf.sock", "mem://", "waf"] {
        let spec = AgentSpec::new("waf").endpoints(["unix:/run/waf.sock", typo]).options(fail_open.clone());
        let err = pool.add_agent(spec).await.unwrap_err();
        let PoolError::InvalidEndpoint { agent: id, source } = &err else { panic!("{typo}: {err:?}") };
        assert_eq!(id, "waf");
        assert!(
            matches!(source, TransportError::InvalidEndpoint { endpoint, .. } if endpoint == typo),
            "{source:?}"
        );
        assert!(err.to_string().contains(&format!("{typo:?}")), "the error names the endpoint: {err}");
        assert!(!pool.has_agent("waf"), "nothing is registered");
        // With fail-open, a registered typo would have let every request through.
        assert_eq!(
            pool.send("waf", &request("r")).await.unwrap_err(),
            PoolError::UnknownAgent { agent: "waf".into() }
        );
    }
    assert_eq!(agent.connect_attempts(), 0, "not even the good endpoint was dialled");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(agent.connect_attempts(), 0, "and nothing retries in the background");

    // The agent's own connector, when it has one, is the one asked.
    let own = MemoryConnector::new();
    own.register("mem://waf", &agent);
    let spec = AgentSpec::new("own").endpoint("mem://waf").connector(std::sync::Arc::new(own));
    assert_eq!(pool.add_agent(spec).await.unwrap().connected, 4);
    let report = pool.add_agent(AgentSpec::new("waf").endpoint("unix:/run/waf.sock")).await.unwrap();
    assert_eq!(report.connected, 4);
}
