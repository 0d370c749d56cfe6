//! Round trips through pool-core and the gRPC transport to the example WAF agent (which allows
//! the request and adds a header), over h2c on loopback TCP, next to what tonic itself costs: a
//! raw tonic bidi echo moving messages of the same sizes.
//!
//! Both sides use 4 connections (4 HTTP/2 connections, one bidi call each) and the same split
//! of the machine: the agent (or echo server) on a runtime with one worker thread, the clients
//! on another with one worker thread. The raw echo is the least any multiplexed protocol on
//! tonic does: the same generated `AgentProtocol/Connect` call, a prebuilt `ProxyFrame`
//! (the request headers already converted) sent through an unbounded channel as the request
//! stream, a reader task that completes the request its answer's stream id names, and a server
//! answering each frame inline with a prebuilt `AgentFrame` of the WAF's decision. What the
//! pool adds on top: conversion to and from the vocabulary types, the balancer, permits,
//! health and breaker accounting, time-outs, and on the agent a task per request bounded by its
//! concurrency.
//!
//! Two measurements at concurrency 1, 16 and 64:
//! - criterion (`roundtrip/{pool,raw}/{c}`): mean wall time per request at that concurrency;
//! - a timing loop of its own, rounds alternating pool and raw so load from elsewhere hits both
//!   alike, printing requests/s (median of rounds), p50 and p99 latency, and the throughput
//!   ratio pool/raw (median of the per-pair ratios). Targets: ≥ 0.8 at c = 64, and p50 at
//!   c = 1 no more than 1.25 × the raw echo's.
//!
//! `CARGO_TARGET_DIR=target/bench cargo bench -p transport-grpc --bench roundtrip`
//! (`ROUNDTRIP_REPORT=0` skips the timing loop, for profiling one benchmark with
//! `--profile-time`).
// Benches measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

#[path = "../../transport-uds/examples/waf_agent/waf.rs"]
mod waf;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Uri};
use pool_api::proto::{self, agent_frame, proxy_frame};
use pool_api::{Event, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use prost::Message;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnboundedReceiverStream};
use transport_grpc::wire::agent_protocol_client::AgentProtocolClient;
use transport_grpc::wire::agent_protocol_server::{AgentProtocol, AgentProtocolServer};
use transport_grpc::{GrpcAgentServer, GrpcConnector, GrpcServerConfig};

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

/// A request message as the pool sends it, and the agent's answer, so the echo moves the same
/// bytes.
fn frames() -> (proto::ProxyFrame, proto::AgentFrame) {
    let request = proto::ProxyFrame { stream_id: 1, body: Some(proxy_frame::Body::Event(event(1).into())) };
    let answer =
        proto::AgentFrame { stream_id: 1, body: Some(agent_frame::Body::Decision(allow_answer().into())) };
    (request, answer)
}

fn frame_sizes() -> (usize, usize) {
    let (request, answer) = frames();
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

fn start_pool(agent_rt: &Runtime, client_rt: &Runtime) -> PoolSide {
    let (stop, stopped) = oneshot::channel::<()>();
    let server = agent_rt
        .block_on(GrpcAgentServer::bind_tcp(([127, 0, 0, 1], 0).into(), GrpcServerConfig::default()))
        .unwrap();
    let endpoint = server.endpoint();
    agent_rt.spawn(server.serve(waf::Waf::new(vec!["/admin".into()]), async move {
        let _ = stopped.await;
    }));
    let pool = client_rt.block_on(async {
        let config = PoolConfig { connections_per_endpoint: CONNECTIONS, ..PoolConfig::default() };
        let pool = AgentPool::new(config, GrpcConnector::default()).unwrap();
        let report = pool.add_agent(AgentSpec::new("waf").endpoint(endpoint.as_str())).await.unwrap();
        assert_eq!(report.connected, CONNECTIONS);
        pool
    });
    PoolSide { pool, _agent: stop }
}

/// Sends the worker's kept event as request `i`: only its correlation id changes, and `send`
/// borrows it, as a proxy asks about the request it holds.
async fn pool_request(pool: &AgentPool, event: &mut Event, i: u64) {
    if let Event::RequestHeaders(h) = event {
        h.correlation_id = format!("req-{i:012}").into();
    }
    let decision = pool.send("waf", event).await.unwrap();
    assert!(decision.is_allow());
}

// ------------------------------------------------------------------ the raw echo

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<proto::AgentFrame>>>>;

/// One HTTP/2 connection with one bidi call: requests go out through the call's request
/// stream; a reader task completes the request an answer's stream id names.
#[derive(Clone)]
struct RawConn {
    out: mpsc::UnboundedSender<proto::ProxyFrame>,
    waiting: Waiting,
    request: Arc<proto::ProxyFrame>,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .connect()
            .await
            .unwrap();
        let (out, rx) = mpsc::unbounded_channel();
        let mut answers = AgentProtocolClient::new(channel)
            .connect(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let waiting: Waiting = Arc::default();
        let pending = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                if let Some(reply) = pending.lock().unwrap().remove(&answer.stream_id) {
                    let _ = reply.send(answer);
                }
            }
        });
        Self { out, waiting, request: Arc::new(frames().0) }
    }

    async fn request(&self, stream: u64) -> proto::AgentFrame {
        let (reply, answer) = oneshot::channel();
        let mut frame = (*self.request).clone();
        frame.stream_id = stream;
        self.waiting.lock().unwrap().insert(stream, reply);
        self.out.send(frame).unwrap();
        answer.await.unwrap()
    }
}

/// The echo service: answers each frame inline with the WAF's decision.
struct Echo {
    answer: proto::AgentFrame,
}

#[tonic::async_trait]
impl AgentProtocol for Echo {
    type ConnectStream = ReceiverStream<Result<proto::AgentFrame, tonic::Status>>;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<proto::ProxyFrame>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let mut frames = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let answer = self.answer.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = frames.next().await {
                let mut reply = answer.clone();
                reply.stream_id = frame.stream_id;
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

struct RawSide {
    conns: Vec<RawConn>,
}

fn start_raw(server_rt: &Runtime, client_rt: &Runtime) -> RawSide {
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = AgentProtocolServer::new(Echo { answer: frames().1 });
    server_rt.spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .add_service(echo)
            // Without Nagle, as the agent side accepts its connections (tonic sets no option
            // on streams it is handed).
            .serve_with_incoming(TcpListenerStream::new(listener).map(|tcp| {
                let tcp = tcp?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(tcp)
            })),
    );
    let conns = client_rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..CONNECTIONS {
            conns.push(RawConn::connect(addr).await);
        }
        conns
    });
    RawSide { conns }
}

async fn raw_request(side: &RawConn, i: u64) {
    let answer = side.request(i).await;
    assert_eq!(answer.stream_id, i);
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
    let pool_side = start_pool(&agent_rt, &client_rt);
    let raw_side = start_raw(&agent_rt, &client_rt);
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
