//! The pick path: agent lookup, breaker check, balancer pick and in-flight permit (taken and
//! given back), for every balancer, 4 and 64 connections, one thread and two threads
//! contending on the same agent.
//!
//! `cargo bench -p pool-core --bench pick`
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pool_api::EventKind;
use pool_core::balance::Strategy;
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::{AllowAll, MemoryAgent, MemoryConnector};

fn pool(rt: &tokio::runtime::Runtime, strategy: Strategy, connections: usize) -> AgentPool {
    rt.block_on(async {
        let connector = MemoryConnector::new();
        connector.register("mem://waf", &MemoryAgent::new(AllowAll));
        let cfg = PoolConfig {
            connections_per_endpoint: connections,
            max_concurrency_per_connection: 10_000,
            balancer: strategy,
            ..PoolConfig::default()
        };
        let pool = AgentPool::new(cfg, connector).unwrap();
        // A few neighbours so the lookup is a real hash-map lookup.
        for i in 0..16 {
            pool.add_agent(AgentSpec::new(format!("agent-{i}")).endpoint("mem://waf")).await.unwrap();
        }
        pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
        pool
    })
}

fn pick(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let strategies = [
        Strategy::PowerOfTwoChoices,
        Strategy::PeakEwma,
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::HealthBased,
        Strategy::Random,
    ];
    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("pick/{threads}-thread"));
        group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
        for strategy in strategies {
            for connections in [4usize, 64] {
                let pool = pool(&rt, strategy, connections);
                let id = BenchmarkId::new(format!("{strategy:?}"), connections);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let barrier = Arc::new(Barrier::new(threads));
                        let workers: Vec<_> = (0..threads)
                            .map(|_| {
                                let pool = pool.clone();
                                let barrier = barrier.clone();
                                std::thread::spawn(move || {
                                    barrier.wait();
                                    let start = Instant::now();
                                    for _ in 0..iters {
                                        let r = pool.try_reserve(black_box("waf"), EventKind::RequestHeaders);
                                        black_box(r.unwrap());
                                    }
                                    start.elapsed()
                                })
                            })
                            .collect();
                        // Time per pick as one contending thread sees it.
                        let total: Duration = workers.into_iter().map(|w| w.join().unwrap()).sum();
                        total / threads as u32
                    });
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, pick);
criterion_main!(benches);
