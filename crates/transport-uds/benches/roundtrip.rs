//! Round trips through pool-core and the Unix-socket transport to the example WAF agent (which
//! allows the request and adds a header), next to the hardware limit on this machine: a raw
//! multiplexed echo over the same kind of socket, with frames of the same sizes.
//!
//! Both sides use 4 connections, in each of three layouts of the machine (the pool and the raw
//! client always share their layout with the agent and the echo server):
//! - `split`: one process; the agent (or echo server) on a runtime with one worker thread, the
//!   clients on another with one worker thread;
//! - `process`: the agent and the echo server in a process of their own (this bench binary run
//!   again), on a runtime with one worker thread; the clients here on one worker thread — where
//!   a real agent lives;
//! - `shared`: one process, one runtime with two worker threads for both sides — a proxy whose
//!   runtime also runs other work.
//!
//! `ROUNDTRIP_LAYOUTS=split,process` picks layouts (default: all three).
//!
//! The raw echo is what any multiplexed request/response protocol must do at the least: a
//! length-prefixed frame carrying a stream id written by a writer task that batches, read by a
//! reader task that completes the waiting request, answered inline by the server. What the
//! pool adds on top: protobuf encoding, the balancer, permits, health and breaker accounting,
//! time-outs, affinity, and on the agent the decoding into an `http::HeaderMap` and the
//! handler (polled inline, a task of its own only if it waits).
//!
//! Two measurements at concurrency 1, 16 and 64:
//! - criterion (`roundtrip/{pool,raw}/{c}`): mean wall time per request at that concurrency;
//! - a timing loop of its own, rounds alternating pool and raw so load from elsewhere hits both
//!   alike, printing requests/s (median of rounds), p50 and p99 latency, and the throughput
//!   ratio pool/raw (median of the per-pair ratios), and the CPU time (user + system, of
//!   this process and the server process, from `/proc`) per request of each side over all its
//!   rounds — steadier than throughput in `shared`, where the same build runs in one of two
//!   regimes from run to run (see the README). Targets: ≥ 0.8 at c = 64 in every layout
//!   but `shared`, ≥ 0.7 there; in `process` also ≥ 0.6 at c = 1 and a p99 at c = 64 no more
//!   than 1.3 × the echo's.
//!
//! Each request is a browser-like GET whose event the worker keeps, as a proxy keeps its
//! request: only the correlation id changes per request, and `send` borrows the event.
//!
//! The bench (both sides, every layout, the server process too) allocates with mimalloc, as
//! the gateway does.
//!
//! `CARGO_TARGET_DIR=target/bench cargo bench -p transport-uds --bench roundtrip`
//! (`ROUNDTRIP_REPORT=0` skips the timing loop, for profiling one benchmark with
//! `--profile-time`).
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

#[path = "../examples/waf_agent/waf.rs"]
mod waf;

use std::collections::HashMap;
use std::io::{BufRead, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
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

/// As the gateway: the allocator a proxy built on these crates runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: [usize; 3] = [1, 16, 64];
const CONNECTIONS: usize = 4;
const ROUNDS: usize = 6;
const ROUND: Duration = Duration::from_millis(700);

/// Set in the child process of the `process` layout: the directory to serve the sockets in.
const SERVE_ENV: &str = "ROUNDTRIP_SERVE_DIR";

fn runtime(name: &str) -> Runtime {
    runtime_with(name, 1)
}

fn runtime_with(name: &str, workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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

/// Gives the kept event request `i`'s correlation id.
fn renumber(event: &mut Event, i: u64) {
    if let Event::RequestHeaders(h) = event {
        h.correlation_id = format!("req-{i:012}").into();
    }
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

/// Serves the WAF agent at `dir/waf.sock` on `rt`, until the sender returned is dropped.
fn serve_agent(rt: &Runtime, dir: &Path) -> oneshot::Sender<()> {
    let path = dir.join("waf.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = rt.block_on(UdsServer::bind(&path, UdsServerConfig::default())).unwrap();
    rt.spawn(server.serve(waf::Waf::new(vec!["/admin".into()]), async move {
        let _ = stopped.await;
    }));
    stop
}

/// Connects a pool on `client_rt` to the agent at `dir/waf.sock`.
fn connect_pool(client_rt: &Runtime, dir: &Path) -> AgentPool {
    let path = dir.join("waf.sock");
    client_rt.block_on(async {
        let config = PoolConfig { connections_per_endpoint: CONNECTIONS, ..PoolConfig::default() };
        let pool = AgentPool::new(config, UdsConnector::default()).unwrap();
        let report =
            pool.add_agent(AgentSpec::new("waf").endpoint(format!("unix:{}", path.display()))).await.unwrap();
        assert_eq!(report.connected, CONNECTIONS);
        pool
    })
}

async fn pool_request(pool: &AgentPool, event: &mut Event, i: u64) {
    renumber(event, i);
    let decision = pool.send("waf", event).await.unwrap();
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

/// Serves the echo at `dir/echo.sock` on `rt`.
fn serve_echo(rt: &Runtime, dir: &Path) {
    let (_, answer_size) = frame_sizes();
    let listener = rt.block_on(async { UnixListener::bind(dir.join("echo.sock")).unwrap() });
    rt.spawn(echo_server(listener, answer_size));
}

/// Connects the raw clients on `client_rt` to the echo at `dir/echo.sock`.
fn connect_raw(client_rt: &Runtime, dir: &Path) -> Vec<RawConn> {
    let (request_size, _) = frame_sizes();
    let path = dir.join("echo.sock");
    client_rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..CONNECTIONS {
            conns.push(RawConn::connect(&path, request_size).await);
        }
        conns
    })
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
                let mut kept = event(i);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    match side {
                        Side::Pool => pool_request(&pool, &mut kept, i).await,
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
                let mut kept = event(base);
                for i in base..base + per_worker {
                    match side {
                        Side::Pool => pool_request(&pool, &mut kept, i).await,
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

/// CPU time (user + system) used so far by this process and, if given, the server process:
/// `/proc/PID/stat`'s `utime` and `stime`, in the kernel's 100 Hz user ticks.
fn cpu_time(server: Option<u32>) -> Duration {
    fn ticks(pid: &str) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): state is the first, utime the
        // 12th, stime the 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum()
    }
    let total = ticks("self") + server.map_or(0, |pid| ticks(&pid.to_string()));
    Duration::from_millis(total * 10)
}

fn report(layout: Layout, pool: &AgentPool, raw: &[RawConn], client_rt: &Runtime, server: Option<u32>) {
    let (request_size, answer_size) = frame_sizes();
    println!(
        "\nroundtrip, layout {}: {CONNECTIONS} connections, request frame {request_size} B, answer frame {answer_size} B",
        layout.name()
    );
    println!(
        "{:>4} {:>5} {:>12} {:>10} {:>10} {:>12}",
        "c", "side", "req/s", "p50 µs", "p99 µs", "CPU µs/req"
    );
    for concurrency in CONCURRENCY {
        let mut rps: HashMap<Side, Vec<f64>> = HashMap::new();
        let mut latency: HashMap<Side, Histogram<u64>> = HashMap::new();
        let mut ratios = Vec::new();
        // CPU used and requests done, per side, over all rounds.
        let mut cpu: HashMap<Side, (Duration, u64)> = HashMap::new();
        for r in 0..ROUNDS {
            let order = if r % 2 == 0 { [Side::Pool, Side::Raw] } else { [Side::Raw, Side::Pool] };
            let mut pair = HashMap::new();
            for side in order {
                let before = cpu_time(server);
                let (count, histogram) = client_rt.block_on(round(pool, raw, side, concurrency, ROUND));
                let used = cpu_time(server).saturating_sub(before);
                let spent = cpu.entry(side).or_default();
                *spent = (spent.0 + used, spent.1 + count);
                let per_second = count as f64 / ROUND.as_secs_f64();
                pair.insert(side, per_second);
                rps.entry(side).or_default().push(per_second);
                latency.entry(side).or_insert_with(|| Histogram::new(3).unwrap()).add(histogram).unwrap();
            }
            ratios.push(pair[&Side::Pool] / pair[&Side::Raw]);
        }
        for side in [Side::Pool, Side::Raw] {
            let h = &latency[&side];
            let (used, count) = cpu[&side];
            println!(
                "{concurrency:>4} {:>5} {:>12.0} {:>10.1} {:>10.1} {:>12.2}",
                format!("{side:?}").to_lowercase(),
                median(rps.get_mut(&side).unwrap()),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                used.as_secs_f64() * 1e6 / count.max(1) as f64,
            );
        }
        println!(
            "{concurrency:>4} pool/raw throughput: {:.2} (median of {ROUNDS} paired rounds)",
            median(&mut ratios)
        );
    }
}

// ------------------------------------------------------------------ layouts

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Split,
    Process,
    Shared,
}

impl Layout {
    const ALL: [Layout; 3] = [Layout::Split, Layout::Process, Layout::Shared];

    fn name(self) -> &'static str {
        match self {
            Layout::Split => "split",
            Layout::Process => "process",
            Layout::Shared => "shared",
        }
    }

    /// The layouts `ROUNDTRIP_LAYOUTS` names, or all of them.
    fn chosen() -> Vec<Layout> {
        match std::env::var("ROUNDTRIP_LAYOUTS") {
            Ok(names) => names
                .split(',')
                .map(|n| {
                    Self::ALL
                        .into_iter()
                        .find(|l| l.name() == n.trim())
                        .unwrap_or_else(|| panic!("unknown layout {n:?} (split, process, shared)"))
                })
                .collect(),
            Err(_) => Self::ALL.to_vec(),
        }
    }
}

/// The agent and the echo server in a child process: this binary again, with [`SERVE_ENV`]
/// set. It serves until its standard input closes, which happens when this process drops the
/// handle or dies.
struct ServerProcess(Child);

impl ServerProcess {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SERVE_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "the server process did not start");
        Self(child)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// The child's side of the `process` layout.
fn serve_child(dir: &Path) {
    let rt = runtime("agent");
    let _agent = serve_agent(&rt, dir);
    serve_echo(&rt, dir);
    println!("ready");
    std::io::stdout().flush().unwrap();
    // Until the parent closes our standard input (or dies).
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    drop(rt);
}

/// What one layout keeps running while it is measured.
struct Running {
    client_rt: Runtime,
    pool: AgentPool,
    raw: Vec<RawConn>,
    _agent: Option<oneshot::Sender<()>>,
    process: Option<ServerProcess>,
    _agent_rt: Option<Runtime>,
    _dir: tempfile::TempDir,
}

fn start(layout: Layout) -> Running {
    let dir = tempfile::tempdir().unwrap();
    match layout {
        Layout::Split => {
            let agent_rt = runtime("agent");
            let client_rt = runtime("client");
            let agent = serve_agent(&agent_rt, dir.path());
            serve_echo(&agent_rt, dir.path());
            let pool = connect_pool(&client_rt, dir.path());
            let raw = connect_raw(&client_rt, dir.path());
            Running {
                client_rt,
                pool,
                raw,
                _agent: Some(agent),
                process: None,
                _agent_rt: Some(agent_rt),
                _dir: dir,
            }
        }
        Layout::Process => {
            let process = ServerProcess::start(dir.path());
            let client_rt = runtime("client");
            let pool = connect_pool(&client_rt, dir.path());
            let raw = connect_raw(&client_rt, dir.path());
            Running { client_rt, pool, raw, _agent: None, process: Some(process), _agent_rt: None, _dir: dir }
        }
        Layout::Shared => {
            let rt = runtime_with("shared", 2);
            let agent = serve_agent(&rt, dir.path());
            serve_echo(&rt, dir.path());
            let pool = connect_pool(&rt, dir.path());
            let raw = connect_raw(&rt, dir.path());
            Running {
                client_rt: rt,
                pool,
                raw,
                _agent: Some(agent),
                process: None,
                _agent_rt: None,
                _dir: dir,
            }
        }
    }
}

fn roundtrip(c: &mut Criterion) {
    for layout in Layout::chosen() {
        let run = start(layout);
        // Warm both up.
        run.client_rt.block_on(batch(&run.pool, &run.raw, Side::Pool, 64, 20_000));
        run.client_rt.block_on(batch(&run.pool, &run.raw, Side::Raw, 64, 20_000));

        let mut group = c.benchmark_group(format!("roundtrip/{}", layout.name()));
        group.throughput(Throughput::Elements(1));
        for concurrency in CONCURRENCY {
            for side in [Side::Pool, Side::Raw] {
                let id = BenchmarkId::new(format!("{side:?}").to_lowercase(), concurrency);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        run.client_rt.block_on(batch(&run.pool, &run.raw, side, concurrency, iters))
                    });
                });
            }
        }
        group.finish();

        // `ROUNDTRIP_REPORT=0` skips the report, e.g. to profile one criterion benchmark alone;
        // so does a test-mode run (`cargo test --benches`, without `--bench`).
        let benching = std::env::args().any(|a| a == "--bench");
        if benching && std::env::var("ROUNDTRIP_REPORT").map_or(true, |v| v != "0") {
            let server = run.process.as_ref().map(|p| p.0.id());
            report(layout, &run.pool, &run.raw, &run.client_rt, server);
        }
        run.client_rt.block_on(run.pool.shutdown());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = roundtrip
}

fn main() {
    if let Some(dir) = std::env::var_os(SERVE_ENV) {
        serve_child(Path::new(&dir));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
