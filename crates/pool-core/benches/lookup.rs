//! Affinity and sticky-session lookups on the send path. Each is measured as the pick with the
//! lookup (`try_reserve_for` of a pinned request's body, `try_reserve_sticky` of a session)
//! next to the same pick without it (`try_reserve`), so the difference is the lookup; one
//! thread, and two threads on the same agent. Each thread looks up a request and a session
//! of its own, as two requests in flight on two threads do.
//!
//! `cargo bench -p pool-core --bench lookup`
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Method, Uri};
use pool_api::{Capabilities, CorrelationId, Event, EventKind, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use test_support::{AllowAll, MemoryAgent, MemoryConnector};

fn setup(rt: &tokio::runtime::Runtime) -> AgentPool {
    rt.block_on(async {
        let agent = MemoryAgent::new(AllowAll);
        agent.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL));
        let connector = MemoryConnector::new();
        connector.register("mem://waf", &agent);
        let cfg = PoolConfig { max_concurrency_per_connection: 1_000_000, ..PoolConfig::default() };
        let pool = AgentPool::new(cfg, connector).unwrap();
        pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
        // 10,000 pinned requests and sessions, so lookups hit a populated table.
        for i in 0..10_000 {
            let id = format!("req-{i}");
            let event =
                Event::RequestHeaders(RequestHeaders::new(id.as_str(), Method::GET, Uri::from_static("/")));
            pool.send("waf", &event).await.unwrap();
            pool.sticky_sessions().create(&format!("session-{i}"), "waf").unwrap();
        }
        pool
    })
}

/// Hands each new thread a different one of the pinned requests and sessions.
static NEXT_KEY: AtomicUsize = AtomicUsize::new(4242);

thread_local! {
    /// This thread's request id and session id.
    static KEYS: (CorrelationId, String) = {
        let i = NEXT_KEY.fetch_add(1, Ordering::Relaxed) % 10_000;
        (format!("req-{i}").into(), format!("session-{i}"))
    };
}

/// A named operation to time.
type Case = (&'static str, fn(&AgentPool));

fn run(threads: usize, iters: u64, pool: &AgentPool, f: fn(&AgentPool)) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    f(&pool);
                }
                start.elapsed()
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum::<Duration>() / threads as u32
}

fn lookups(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let pool = setup(&rt);
    let cases: [Case; 3] = [
        ("pick (no lookup)", |p| {
            black_box(p.try_reserve(black_box("waf"), EventKind::RequestHeaders).unwrap());
        }),
        ("pick + affinity lookup", |p| {
            KEYS.with(|(id, _)| {
                black_box(p.affinity().try_reserve(black_box("waf"), EventKind::RequestBody, id).unwrap())
            });
        }),
        ("pick + sticky lookup", |p| {
            KEYS.with(|(_, session)| {
                black_box(
                    p.sticky_sessions()
                        .try_reserve(black_box(session), "waf", EventKind::RequestHeaders)
                        .unwrap(),
                )
            });
        }),
    ];
    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("lookup/{threads}-thread"));
        group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
        for (name, f) in cases {
            group.bench_function(name, |b| b.iter_custom(|iters| run(threads, iters, &pool, f)));
        }
        group.finish();
    }
}

criterion_group!(benches, lookups);
criterion_main!(benches);
