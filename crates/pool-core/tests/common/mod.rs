//! Shared helpers for the pool-core integration tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use http::{Method, Uri};
use pool_api::{Event, RequestHeaders};
use pool_core::backoff::BackoffConfig;
use pool_core::breaker::BreakerConfig;
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::{AllowAll, MemoryAgent, MemoryConnector};

/// Request headers for correlation id `id`.
pub fn request(id: impl Into<String>) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id.into(), Method::GET, Uri::from_static("/")))
}

/// A deterministic configuration: seeded, no jitter, no pings unless a test turns them on.
pub fn config() -> PoolConfig {
    let mut c = PoolConfig { seed: Some(7), ..PoolConfig::default() };
    c.breaker = BreakerConfig { jitter: false, ..BreakerConfig::default() };
    c.reconnect = BackoffConfig { jitter: false, ..BackoffConfig::default() };
    c.health.ping_interval = Duration::ZERO;
    c
}

/// A pool with one agent `"waf"` on one endpoint served by `agent`.
pub async fn single(config: PoolConfig, agent: &MemoryAgent) -> (AgentPool, MemoryConnector) {
    let connector = MemoryConnector::new();
    connector.register("mem://waf", agent);
    let pool = AgentPool::new(config, connector.clone()).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    (pool, connector)
}

/// An allow-all agent.
pub fn allow_all() -> MemoryAgent {
    MemoryAgent::new(AllowAll)
}

/// Sums in-flight over every connection of every agent.
pub fn total_in_flight(pool: &AgentPool) -> u64 {
    pool.stats().totals.in_flight
}

/// Makes the next `n` requests to agent `"waf"` fail (the agent answers with an error).
/// Five in a row open a breaker under the default configuration.
pub async fn fail_requests(pool: &AgentPool, agent: &MemoryAgent, n: usize) {
    agent.fail_next(n);
    for i in 0..n {
        assert!(pool.send("waf", &request(format!("fail-{i}"))).await.is_err());
    }
}
