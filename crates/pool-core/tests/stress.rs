//! Bounded multi-threaded stress: real runtime, real clock, many tasks dropping futures while
//! connections die. `cargo xtask race` runs it in release with `AGENTPOOL_STRESS_SCALE=10`.

mod common;

use std::time::Duration;

use common::{allow_all, config, request};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::MemoryConnector;

fn scale() -> usize {
    std::env::var("AGENTPOOL_STRESS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_with_drops_and_disconnects_leave_no_permit_behind() {
    let (a, b) = (allow_all(), allow_all());
    for agent in [&a, &b] {
        agent.set_latency_range(Duration::ZERO, Duration::from_micros(300));
        agent.set_failure_rate(0.02);
    }
    let connector = MemoryConnector::new();
    connector.register("mem://a", &a);
    connector.register("mem://b", &b);
    let mut cfg = PoolConfig { max_concurrency_per_connection: 8, ..config() };
    cfg.breaker.failure_threshold = u32::MAX;
    cfg.reconnect.base = Duration::from_millis(1);
    let pool = AgentPool::new(cfg, connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://a", "mem://b"])).await.unwrap();

    let per_task = 1_000 * scale();
    let senders: Vec<_> = (0..8)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t);
                let mut answered = 0usize;
                for i in 0..per_task {
                    let event = request(format!("{t}-{i}"));
                    let fut = pool.send("waf", &event);
                    if rng.u8(0..4) == 0 {
                        let _ = tokio::time::timeout(Duration::from_micros(rng.u64(0..200)), fut).await;
                    } else if fut.await.is_ok() {
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    let chaos = {
        let a = a.clone();
        tokio::spawn(async move {
            for _ in 0..5 * scale() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                a.disconnect_all();
            }
        })
    };
    let mut answered = 0;
    for s in senders {
        answered += s.await.unwrap();
    }
    chaos.await.unwrap();
    assert!(answered > per_task, "most requests were answered: {answered}");

    // Everything settles back to zero.
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.settle().await;
    b.settle().await;
    assert_eq!(pool.stats().totals.in_flight, 0);
    assert_eq!(a.pending() + b.pending(), 0);
    pool.shutdown().await;
}
