//! The cost of a full send through the pool, against the in-memory agent alone: `agent`
//! sends straight on one in-memory connection; `pool` sends through the pool (lookup, pick,
//! permit, time-out, health and breaker bookkeeping, metrics) to the same kind of agent. The
//! difference is the pool's overhead per request.
//!
//! `cargo bench -p pool-core --bench send`
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Method, Uri};
use pool_api::{Connector, Endpoint, Event, Hello, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::{AllowAll, MemoryAgent, MemoryConnector};

fn event() -> Event {
    Event::RequestHeaders(RequestHeaders::new("req-1", Method::GET, Uri::from_static("/index.html")))
}

fn send(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &MemoryAgent::new(AllowAll));
    let (pool, conn) = rt.block_on(async {
        let pool = AgentPool::new(PoolConfig::default(), connector.clone()).unwrap();
        pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
        let pending = connector.connect(&Endpoint::from("mem://waf")).await.unwrap();
        let conn = pending.handshake(Hello::new("bench")).await.unwrap();
        (pool, conn)
    });
    let mut group = c.benchmark_group("send");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("agent", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(conn.send(&event()).await.unwrap());
                }
                start.elapsed()
            })
        });
    });
    group.bench_function("pool", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(pool.send("waf", &event()).await.unwrap());
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, send);
criterion_main!(benches);
