//! Requests through a pool server next to a bare hyper-util server running the same service,
//! in the same process, with keep-alive HTTP/1.1 clients (raw hyper client connections) at
//! concurrency 1 and 64.
//!
//! Two measurements:
//! - criterion (`requests/{pool,bare}/{1,64}`): the mean wall time per request, i.e. the inverse
//!   of the throughput at that concurrency;
//! - a timing loop of its own that records every request's latency, run in back-to-back pairs of
//!   rounds (pool then bare, bare then pool, alternating) so that load from elsewhere on the
//!   machine hits both alike; it prints throughput (median of the rounds' requests/s) and p50/p99
//!   latency (over all rounds) for both, and the ratios the issue sets as targets (throughput ≥
//!   0.98× bare, p99 ≤ 1.05× bare) as the median of the per-pair ratios, which cancels most of
//!   the drift between pairs.
//!
//! The bare server is configured like the pool's hyper connection (Tokio timer, 30 s header
//! read timeout, `TCP_NODELAY`), so the difference is what the pool adds: connection tracking,
//! counters, the shutdown signal, the idle timer and the handler indirection.
//!
//! `CARGO_TARGET_DIR=target/bench cargo bench -p httpserver-pool --bench requests`
// Benches measure wall-clock time on purpose (the workspace bans std's Instant elsewhere so that
// paused-clock tests work).
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use httpserver_pool::{Handler, HttpServerConfig, ResponseBody, Server, full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pool_api::Lifecycle;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const CONCURRENCY: [usize; 2] = [1, 64];
const ROUNDS: usize = 12;
const ROUND: Duration = Duration::from_secs(1);

/// The service both servers run (the pool hands it a `RequestBody`, the bare server hyper's
/// `Incoming`).
async fn hello<B>(req: Request<B>) -> Response<ResponseBody> {
    drop(req);
    Response::new(full("hello, world"))
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

async fn pool_server() -> (Server, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config =
        HttpServerConfig::new("bench", format!("127.0.0.1:{port}")).with_handler(Handler::from_fn(hello));
    let server = Server::new(config).unwrap();
    server.start().await.unwrap();
    let addr = server.bind();
    (server, addr)
}

async fn bare_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req| async { Ok::<_, Infallible>(hello(req).await) });
                let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr, n: usize) -> Vec<SendRequest<Empty<Bytes>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        clients.push(send);
    }
    clients
}

async fn one(send: &mut SendRequest<Empty<Bytes>>) {
    send.ready().await.unwrap();
    let req = Request::get("/").header(http::header::HOST, "bench").body(Empty::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 12);
}

/// `total` requests spread over the clients; returns the wall time and hands the clients back.
async fn batch(
    clients: Vec<SendRequest<Empty<Bytes>>>,
    total: u64,
) -> (Duration, Vec<SendRequest<Empty<Bytes>>>) {
    let n = clients.len() as u64;
    let begin = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut send)| {
            let share = total / n + u64::from((i as u64) < total % n);
            tokio::spawn(async move {
                for _ in 0..share {
                    one(&mut send).await;
                }
                send
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        back.push(t.await.unwrap());
    }
    (begin.elapsed(), back)
}

/// Every client sends requests back to back for `len`; returns (requests/s, latencies in ns).
async fn round(
    clients: Vec<SendRequest<Empty<Bytes>>>,
    len: Duration,
) -> (f64, Vec<u64>, Vec<SendRequest<Empty<Bytes>>>) {
    let begin = Instant::now();
    let end = begin + len;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                while Instant::now() < end {
                    let t = Instant::now();
                    one(&mut send).await;
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                (lat, send)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut back = Vec::new();
    for t in tasks {
        let (lat, send) = t.await.unwrap();
        all.extend(lat);
        back.push(send);
    }
    let rps = all.len() as f64 / begin.elapsed().as_secs_f64();
    (rps, all, back)
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_nanos(sorted[i])
}

struct Summary {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summarise(rounds_rps: Vec<f64>, mut lat: Vec<u64>) -> Summary {
    lat.sort_unstable();
    Summary { rps: median(rounds_rps), p50: percentile(&lat, 0.50), p99: percentile(&lat, 0.99) }
}

/// The timing loop of this bench: interleaved rounds, percentiles over every request.
fn latency_report(rt: &Runtime, pool: SocketAddr, bare: SocketAddr) {
    println!("\nrequests: own timing loop, {ROUNDS} interleaved rounds of {ROUND:?} per target");
    for conc in CONCURRENCY {
        let (p, b, tput, p99) = rt.block_on(async {
            let mut clients = [connect(pool, conc).await, connect(bare, conc).await];
            // Warm-up: connections, allocator, caches.
            for c in &mut clients {
                let (_, _, back) = round(std::mem::take(c), Duration::from_millis(300)).await;
                *c = back;
            }
            let mut rps = [Vec::new(), Vec::new()];
            let mut lat = [Vec::new(), Vec::new()];
            let (mut tput, mut p99) = (Vec::new(), Vec::new());
            for r in 0..ROUNDS {
                let mut pair = [(0.0, Duration::ZERO); 2];
                // Alternate which target goes first.
                for k in [r % 2, 1 - r % 2] {
                    let (x, mut l, back) = round(std::mem::take(&mut clients[k]), ROUND).await;
                    clients[k] = back;
                    l.sort_unstable();
                    pair[k] = (x, percentile(&l, 0.99));
                    rps[k].push(x);
                    lat[k].extend(l);
                }
                tput.push(pair[0].0 / pair[1].0);
                p99.push(pair[0].1.as_secs_f64() / pair[1].1.as_secs_f64());
            }
            let [rp, rb] = rps;
            let [lp, lb] = lat;
            (summarise(rp, lp), summarise(rb, lb), median(tput), median(p99))
        });
        for (name, s) in [("pool", &p), ("bare", &b)] {
            println!(
                "  concurrency {conc:>2} {name}: {:>9.0} req/s  p50 {:>9.1?}  p99 {:>9.1?}",
                s.rps, s.p50, s.p99
            );
        }
        println!(
            "  concurrency {conc:>2} pool/bare, median of {ROUNDS} paired rounds: throughput {tput:.3}x (target >= 0.98: {}), p99 {p99:.3}x (target <= 1.05: {})",
            if tput >= 0.98 { "met" } else { "MISSED" },
            if p99 <= 1.05 { "met" } else { "MISSED" },
        );
    }
    println!();
}

fn requests(c: &mut Criterion) {
    let rt = runtime();
    let (server, pool_addr) = rt.block_on(pool_server());
    let bare_addr = rt.block_on(bare_server());

    let mut group = c.benchmark_group("requests");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for conc in CONCURRENCY {
        for (name, addr) in [("pool", pool_addr), ("bare", bare_addr)] {
            let mut clients = Some(rt.block_on(connect(addr, conc)));
            group.bench_with_input(BenchmarkId::new(name, conc), &conc, |b, _| {
                b.iter_custom(|iters| {
                    let (took, back) = rt.block_on(batch(clients.take().unwrap(), iters));
                    clients = Some(back);
                    took
                })
            });
        }
    }
    group.finish();

    // Only under `cargo bench` (criterion's test mode passes no `--bench`), and not when
    // `REQUESTS_REPORT=0` (to profile one criterion benchmark alone with `--profile-time`).
    let benching = std::env::args().any(|a| a == "--bench");
    if benching && std::env::var("REQUESTS_REPORT").map_or(true, |v| v != "0") {
        latency_report(&rt, pool_addr, bare_addr);
    }
    let report = rt.block_on(server.stop_within(Duration::from_secs(1))).unwrap();
    assert_eq!(report.forced, 0);
}

criterion_group!(benches, requests);
criterion_main!(benches);
