//! Pool-wide operations: stopping 100 idle servers (the time `stop_all` takes to return) and
//! selecting from 1,000 servers by glob (and, for comparison, by regex).
//!
//! Besides criterion's figures, the stop bench prints the median and worst of its own rounds
//! against the target (≤ 50 ms); the selection target is ≤ 100 µs.
//!
//! `CARGO_TARGET_DIR=target/bench cargo bench -p httpserver-pool --bench pool_ops`
// Benches measure wall-clock time on purpose (the workspace bans std's Instant elsewhere so that
// paused-clock tests work).
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use http::Response;
use httpserver_pool::{Field, Handler, HttpServerConfig, Pattern, Pool, StartPolicy, full};
use tokio::runtime::Runtime;

const TIERS: [&str; 4] = ["api", "admin", "web", "internal"];

fn handler() -> Handler {
    Handler::from_fn(|_| async { Response::new(full("ok")) })
}

/// `n` distinct loopback ports free right now (all held at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A started pool of `n` servers with no connections.
async fn running_pool(n: usize) -> Pool {
    let pool = Pool::new();
    for (i, port) in free_ports(n).into_iter().enumerate() {
        pool.store_config(
            HttpServerConfig::new(format!("s{i}"), format!("127.0.0.1:{port}")).with_handler(handler()),
        )
        .unwrap();
    }
    pool.start_with(StartPolicy::AllOrNothing).await.unwrap();
    pool
}

async fn timed_stop(n: usize) -> Duration {
    let pool = running_pool(n).await;
    let begin = Instant::now();
    let report = pool.stop_all().await.unwrap();
    let took = begin.elapsed();
    assert_eq!(report.forced, 0);
    took
}

fn stop_idle(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("stop_all");
    group.sample_size(20);
    group.bench_function("100_idle_servers", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += timed_stop(100).await;
                }
                total
            })
        })
    });
    group.finish();

    let mut rounds: Vec<Duration> = (0..30).map(|_| rt.block_on(timed_stop(100))).collect();
    rounds.sort();
    let (median, worst) = (rounds[rounds.len() / 2], rounds[rounds.len() - 1]);
    println!(
        "\nstop_all of 100 idle servers, 30 rounds: median {median:.2?}, worst {worst:.2?} (target <= 50 ms: {})\n",
        if worst <= Duration::from_millis(50) { "met" } else { "MISSED" }
    );
}

fn select(c: &mut Criterion) {
    let pool = Pool::new();
    for i in 0..1000u16 {
        let name = format!("{}-{i:04}", TIERS[usize::from(i) % TIERS.len()]);
        pool.store_config(
            HttpServerConfig::new(name, format!("127.0.0.1:{}", 20_000 + i)).with_handler(handler()),
        )
        .unwrap();
    }
    let glob = Pattern::glob("admin-*").unwrap();
    let regex = Pattern::regex("^admin-").unwrap();
    let bind_glob = Pattern::glob("127.0.0.1:205*").unwrap();
    assert_eq!(pool.filter(Field::Name, &glob).len(), 250);
    assert_eq!(pool.filter(Field::Name, &regex).len(), 250);
    assert_eq!(pool.filter(Field::Bind, &bind_glob).len(), 100);

    let mut group = c.benchmark_group("select_from_1000");
    group.bench_function("name_glob", |b| b.iter(|| black_box(pool.filter(Field::Name, black_box(&glob)))));
    group.bench_function("name_regex", |b| b.iter(|| black_box(pool.filter(Field::Name, black_box(&regex)))));
    group.bench_function("bind_glob", |b| {
        b.iter(|| black_box(pool.filter(Field::Bind, black_box(&bind_glob))))
    });
    group.finish();
}

criterion_group!(benches, stop_idle, select);
criterion_main!(benches);
