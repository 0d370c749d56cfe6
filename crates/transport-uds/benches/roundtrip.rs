//! Round trips through pool-core and the Unix-socket transport to the example WAF agent (which
//! allows the request and adds a header), next to the hardware limit on this machine: a raw
//! multiplexed echo over the same kind of socket, with frames of the same sizes.
//!
//! Both sides use 4 connections and the same split of the machine: the agent (or echo server)
//! on a runtime with one worker thread, the clients on another with one worker thread. The
//! raw echo is what any multiplexed request/response protocol must do at the least: a
//! length-prefixed frame carrying a stream id written by a writer task that batches, read by a
//! reader task that completes the waiting request, answered inline by the server. What the
//! pool adds on top: protobuf encoding, the balancer, permits, health and breaker accounting,
//! time-outs, and on the agent a task per request bounded by its concurrency.
//!
//! Two measurements at concurrency 1, 16 and 64:
//! - criterion (`roundtrip/{pool,raw}/{c}`): mean wall time per request at that concurrency;
//! - a timing loop of its own, rounds alternating pool and raw so load from elsewhere hits both
//!   alike, printing requests/s (median of rounds), p50 and p99 latency, and the throughput
//!   ratio pool/raw (median of the per-pair ratios). Target: ≥ 0.8 at c = 64.
//!
//! `CARGO_TARGET_DIR=target/bench cargo bench -p transport-uds --bench roundtrip`
//! (`ROUNDTRIP_REPORT=0` skips the timing loop, for profiling one benchmark with
//! `--profile-time`).
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

#[path = "../examples/waf_agent/waf.rs"]
mod waf;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Uri};
use pool_api::{Event, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};

const CONCURRENCY: [usize; 3] = [1, 16, 64];
const CONNECTIONS: usize = 4;
const ROUNDS: usize = 6;
const ROUND: Duration = Duration::from_millis(700);

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// A request as a proxy would send it: a browser-like GET with its usual headers. Built once;
/// each request clones it with its own correlation id, as a proxy hands over the request it
/// already holds.
fn template() -> RequestHeaders {
    let mut request = RequestHeaders::new(
        "req-000000000000",
        Method::GET,
        Uri::from_static("/products/42?ref=home&utm_source=newsletter"),
    );
    for (name, value) in [
        ("host", "shop.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("cookie", "session=4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
    ] {
        request.headers.insert(name, HeaderValue::from_static(value));
    }
    request.client_addr = Some(([203, 0, 113, 7], 51_234).into());
    request
}

static TEMPLATE: std::sync::LazyLock<RequestHeaders> = std::sync::LazyLock::new(template);

fn event(i: u64) -> Event {
    let mut request = TEMPLATE.clone();
    request.correlation_id = format!("req-{i:012}").into();
    Event::RequestHeaders(request)
}

/// Encoded sizes of a request frame and of the agent's answer, so the echo moves the same bytes.
fn frame_sizes() -> (usize, usize) {
    let request = pool_api::proto::ProxyFrame {
        stream_id: 1,
        body: Some(pool_api::proto::proxy_frame::Body::Event(event(1).into())),
    };
    let decision = allow_answer();
    let answer = pool_api::proto::AgentFrame {
        stream_id: 1,
        body: Some(pool_api::proto::agent_frame::Body::Decision(decision.into())),
    };
    (request.encoded_len(), answer.encoded_len())
}

/// The WAF's answer to an allowed request (computed without running the handler).
fn allow_answer() -> pool_api::Decision {
    pool_api::Decision::allow().with_response_header(pool_api::HeaderOp::Set {
        name: http::HeaderName::from_static("x-waf"),
        value: HeaderValue::from_static("checked"),
    })
}

// ------------------------------------------------------------------ the pool side

struct PoolSide {
    pool: AgentPool,
    _agent: oneshot::Sender<()>,
}

fn start_pool(agent_rt: &Runtime, client_rt: &Runtime, dir: &Path) -> PoolSide {
    let path = dir.join("waf.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = agent_rt.block_on(UdsServer::bind(&path, UdsServerConfig::default())).unwrap();
    agent_rt.spawn(server.serve(waf::Waf::new(vec!["/admin".into()]), async move {
        let _ = stopped.await;
    }));
    let pool = client_rt.block_on(async {
        let config = PoolConfig { connections_per_endpoint: CONNECTIONS, ..PoolConfig::default() };
        let pool = AgentPool::new(config, UdsConnector::default()).unwrap();
        let report =
            pool.add_agent(AgentSpec::new("waf").endpoint(format!("unix:{}", path.display()))).await.unwrap();
        assert_eq!(report.connected, CONNECTIONS);
        pool
    });
    PoolSide { pool, _agent: stop }
}

async fn pool_request(pool: &AgentPool, i: u64) {
    let decision = pool.send("waf", &event(i)).await.unwrap();
    assert!(decision.is_allow());
}

// ------------------------------------------------------------------ the raw echo

/// One multiplexed connection: a writer task that batches frames, a reader task that completes
/// the request a frame's stream id names.
#[derive(Clone)]
struct RawConn {
    writes: mpsc::UnboundedSender<(u64, oneshot::Sender<Bytes>)>,
}

fn encode(out: &mut BytesMut, stream: u64, size: usize) {
    out.put_u32((size + 8) as u32);
    out.put_u64(stream);
    out.put_bytes(0x5a, size);
}

async fn read_frame<R: AsyncReadExt + Unpin>(reader: &mut R, buf: &mut BytesMut) -> Option<(u64, Bytes)> {
    let len = reader.read_u32().await.ok()? as usize;
    buf.resize(len, 0);
    reader.read_exact(&mut buf[..]).await.ok()?;
    let mut frame = buf.split().freeze();
    let stream = frame.get_u64();
    Some((stream, frame))
}

impl RawConn {
    async fn connect(path: &Path, request_size: usize) -> Self {
        let stream = UnixStream::connect(path).await.unwrap();
        let (read, write) = stream.into_split();
        let (writes, mut queue) = mpsc::unbounded_channel::<(u64, oneshot::Sender<Bytes>)>();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>> = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            let mut write = BufWriter::new(write);
            let mut out = BytesMut::new();
            while let Some((stream, reply)) = queue.recv().await {
                let mut next = Some((stream, reply));
                while let Some((stream, reply)) = next {
                    waiting.lock().unwrap().insert(stream, reply);
                    encode(&mut out, stream, request_size);
                    next = queue.try_recv().ok();
                }
                if write.write_all(&out.split()).await.is_err() || write.flush().await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            let mut buf = BytesMut::new();
            while let Some((stream, body)) = read_frame(&mut read, &mut buf).await {
                if let Some(reply) = pending.lock().unwrap().remove(&stream) {
                    let _ = reply.send(body);
                }
            }
        });
        Self { writes }
    }

    async fn request(&self, stream: u64) -> Bytes {
        let (reply, answer) = oneshot::channel();
        self.writes.send((stream, reply)).unwrap();
        answer.await.unwrap()
    }
}

/// The echo server: answers each frame inline with a frame of `answer_size` bytes.
async fn echo_server(listener: UnixListener, answer_size: usize) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let (read, write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut write = BufWriter::new(write);
            let mut buf = BytesMut::new();
            let mut out = BytesMut::new();
            loop {
                let Some((stream, _)) = read_frame(&mut read, &mut buf).await else { return };
                encode(&mut out, stream, answer_size);
                // Answer everything already read before flushing, like any batching server.
                if read.buffer().is_empty()
                    && (write.write_all(&out.split()).await.is_err() || write.flush().await.is_err())
                {
                    return;
                }
            }
        });
    }
}

struct RawSide {
    conns: Vec<RawConn>,
    _path: PathBuf,
}

fn start_raw(server_rt: &Runtime, client_rt: &Runtime, dir: &Path) -> RawSide {
    let (request_size, answer_size) = frame_sizes();
    let path = dir.join("echo.sock");
    let listener = server_rt.block_on(async { UnixListener::bind(&path).unwrap() });
    server_rt.spawn(echo_server(listener, answer_size));
    let conns = client_rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..CONNECTIONS {
            conns.push(RawConn::connect(&path, request_size).await);
        }
        conns
    });
    RawSide { conns, _path: path }
}

async fn raw_request(side: &RawConn, i: u64) {
    let answer = side.request(i).await;
    assert!(!answer.is_empty());
}

// ------------------------------------------------------------------ measurement

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    Pool,
    Raw,
}

/// Runs `concurrency` workers for `duration`; returns (requests, latency histogram in ns).
async fn round(
    pool: &AgentPool,
    raw: &[RawConn],
    side: Side,
    concurrency: usize,
    duration: Duration,
) -> (u64, Histogram<u64>) {
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let pool = pool.clone();
            let raw = raw.to_vec();
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).unwrap();
                let mut i = (w as u64) << 40;
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    match side {
                        Side::Pool => pool_request(&pool, i).await,
                        Side::Raw => raw_request(&raw[(i as usize) % raw.len()], i).await,
                    }
                    histogram.record(started.elapsed().as_nanos() as u64).unwrap();
                    i += 1;
                    done += 1;
                }
                (done, histogram)
            })
        })
        .collect();
    let mut total = 0;
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    for worker in workers {
        let (done, h) = worker.await.unwrap();
        total += done;
        histogram.add(h).unwrap();
    }
    (total, histogram)
}

/// Runs about `n` requests (a multiple of `concurrency`) with `concurrency` workers; returns the
/// wall time per request times `n`.
async fn batch(pool: &AgentPool, raw: &[RawConn], side: Side, concurrency: usize, n: u64) -> Duration {
    let started = Instant::now();
    let per_worker = n.div_ceil(concurrency as u64);
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let pool = pool.clone();
            let raw = raw.to_vec();
            tokio::spawn(async move {
                let base = (w as u64) << 40;
                for i in base..base + per_worker {
                    match side {
                        Side::Pool => pool_request(&pool, i).await,
                        Side::Raw => raw_request(&raw[(i as usize) % raw.len()], i).await,
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    started.elapsed().mul_f64(n as f64 / (per_worker * concurrency as u64) as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(pool: &AgentPool, raw: &[RawConn], client_rt: &Runtime) {
    let (request_size, answer_size) = frame_sizes();
    println!(
        "\nroundtrip: {CONNECTIONS} connections, request frame {request_size} B, answer frame {answer_size} B"
    );
    println!("{:>4} {:>5} {:>12} {:>10} {:>10}", "c", "side", "req/s", "p50 µs", "p99 µs");
    for concurrency in CONCURRENCY {
        let mut rps: HashMap<Side, Vec<f64>> = HashMap::new();
        let mut latency: HashMap<Side, Histogram<u64>> = HashMap::new();
        let mut ratios = Vec::new();
        for r in 0..ROUNDS {
            let order = if r % 2 == 0 { [Side::Pool, Side::Raw] } else { [Side::Raw, Side::Pool] };
            let mut pair = HashMap::new();
            for side in order {
                let (count, histogram) = client_rt.block_on(round(pool, raw, side, concurrency, ROUND));
                let per_second = count as f64 / ROUND.as_secs_f64();
                pair.insert(side, per_second);
                rps.entry(side).or_default().push(per_second);
                latency.entry(side).or_insert_with(|| Histogram::new(3).unwrap()).add(histogram).unwrap();
            }
            ratios.push(pair[&Side::Pool] / pair[&Side::Raw]);
        }
        for side in [Side::Pool, Side::Raw] {
            let h = &latency[&side];
            println!(
                "{concurrency:>4} {:>5} {:>12.0} {:>10.1} {:>10.1}",
                format!("{side:?}").to_lowercase(),
                median(rps.get_mut(&side).unwrap()),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
            );
        }
        println!(
            "{concurrency:>4} pool/raw throughput: {:.2} (median of {ROUNDS} paired rounds)",
            median(&mut ratios)
        );
    }
}

fn roundtrip(c: &mut Criterion) {
    let agent_rt = runtime("agent");
    let client_rt = runtime("client");
    let dir = tempfile::tempdir().unwrap();
    let pool_side = start_pool(&agent_rt, &client_rt, dir.path());
    let raw_side = start_raw(&agent_rt, &client_rt, dir.path());
    // Warm both up.
    client_rt.block_on(batch(&pool_side.pool, &raw_side.conns, Side::Pool, 64, 20_000));
    client_rt.block_on(batch(&pool_side.pool, &raw_side.conns, Side::Raw, 64, 20_000));

    let mut group = c.benchmark_group("roundtrip");
    group.throughput(Throughput::Elements(1));
    for concurrency in CONCURRENCY {
        for side in [Side::Pool, Side::Raw] {
            let id = BenchmarkId::new(format!("{side:?}").to_lowercase(), concurrency);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    client_rt.block_on(batch(&pool_side.pool, &raw_side.conns, side, concurrency, iters))
                });
            });
        }
    }
    group.finish();

    // `ROUNDTRIP_REPORT=0` skips the report, e.g. to profile one criterion benchmark alone; so
    // does a test-mode run (`cargo test --benches`, without `--bench`).
    let benching = std::env::args().any(|a| a == "--bench");
    if benching && std::env::var("ROUNDTRIP_REPORT").map_or(true, |v| v != "0") {
        report(&pool_side.pool, &raw_side.conns, &client_rt);
    }
    client_rt.block_on(pool_side.pool.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = roundtrip
}
criterion_main!(benches);
