//! The limits of `HttpServerConfig` hold against hostile clients, on real sockets: connection floods
//! (in all and from one address), slowloris headers, idle connections, HTTP/2 stream floods and
//! dead HTTP/2 peers.
//!
//! Time-outs are set short (a few hundred milliseconds) and every wait has a generous deadline
//! that only keeps a broken server from hanging the test: the assertions are about what
//! happens, never about how fast.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use httpserver_pool::{Error, HttpServerConfig, Limits, RequestBodyError, Server, Timeouts};
use pool_api::Lifecycle;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single wait may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(10);

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
/// Panics if it is still open at the deadline.
async fn read_until_closed(tcp: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still open at the deadline"));
    got
}

/// One HTTP/1.1 request over a fresh connection from `from` (a local address), raw.
async fn raw_get(server: SocketAddr, from: Option<&str>) -> String {
    let mut tcp = match from {
        Some(from) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            socket.connect(server).await.unwrap()
        }
        None => TcpStream::connect(server).await.unwrap(),
    };
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut tcp, "a request with connection: close").await)
        .into_owned()
}

async fn started(cfg: HttpServerConfig) -> Server {
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    server
}

#[tokio::test]
async fn a_flood_over_the_connection_cap_is_refused_and_frees_the_server_once_its_sockets_time_out() {
    let mut cfg = config("capped", hello("ok"));
    cfg.limits.max_connections = Some(4);
    cfg.timeouts.header_read = Some(Duration::from_millis(300));
    let server = started(cfg).await;

    // The flood: connections that never send a byte.
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(server.bind()).await.unwrap());
    }
    wait_until("the flood to be accepted", || server.snapshot().counters.active == 4).await;

    // Over the cap: accepted by the kernel, then closed by the server without a byte, and not
    // counted as a connection.
    let mut over = TcpStream::connect(server.bind()).await.unwrap();
    let answer = read_until_closed(&mut over, "a connection over the cap").await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    let counters = server.snapshot().counters;
    assert_eq!((counters.refused, counters.accepted), (1, 4), "{counters:?}");

    // The flood's connections are closed by the header read timeout ...
    for tcp in &mut flood {
        assert!(read_until_closed(tcp, "a silent flood connection").await.is_empty());
    }
    wait_until("the flood's sockets to close", || server.snapshot().counters.active == 0).await;
    // ... and a legitimate client is served again.
    let (status, body) = get(&client(), &format!("http://{}/", server.bind())).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn the_per_address_cap_refuses_one_client_and_serves_another() {
    let mut cfg = config("per-ip", hello("ok"));
    cfg.limits.max_connections_per_ip = Some(2);
    let server = started(cfg).await;

    let mut held = vec![TcpStream::connect(server.bind()).await.unwrap()];
    held.push(TcpStream::connect(server.bind()).await.unwrap());
    wait_until("both connections to be accepted", || server.snapshot().counters.active == 2).await;

    // A third connection from 127.0.0.1 is refused, ...
    let answer = raw_get(server.bind(), None).await;
    assert!(answer.is_empty(), "{answer:?}");
    assert_eq!(server.snapshot().counters.refused, 1);
    // ... another address on the loopback is served, ...
    let answer = raw_get(server.bind(), Some("127.0.0.2")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // ... and once 127.0.0.1 closes one of its connections, it gets one again.
    drop(held.pop());
    wait_until("the closed connection to be counted off", || server.snapshot().counters.active == 1).await;
    let answer = raw_get(server.bind(), None).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_reload_moves_the_connection_cap_for_new_connections() {
    let mut cfg = config("reloaded", hello("ok"));
    cfg.limits.max_connections = Some(1);
    let server = started(cfg.clone()).await;
    let _held = TcpStream::connect(server.bind()).await.unwrap();
    wait_until("the first connection to be accepted", || server.snapshot().counters.active == 1).await;
    assert!(raw_get(server.bind(), None).await.is_empty(), "over the cap of one");

    cfg.limits.max_connections = Some(2);
    assert_eq!(server.reload(cfg).await.unwrap(), httpserver_pool::ReloadOutcome::Swapped);
    let answer = raw_get(server.bind(), None).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the held connection counts, the new cap admits one more: {answer:?}"
    );
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_trickled_header_is_cut_at_the_header_read_timeout() {
    // Plain HTTP/1 (kept by the server) and h2c (HTTP/1 kept by hyper), one byte every 50 ms:
    // arriving bytes do not restart the clock.
    for h2c in [false, true] {
        let mut cfg = config("slowloris", hello("ok"));
        cfg.h2c = h2c;
        cfg.timeouts.header_read = Some(Duration::from_millis(300));
        cfg.timeouts.idle = None;
        let server = started(cfg).await;
        let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
        let head = b"GET / HTTP/1.1\r\nhost: x\r\nx-a: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let cut = tokio::time::timeout(DEADLINE, async {
            for byte in head {
                if tcp.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if server.snapshot().counters.active == 0 {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the trickle was neither cut nor finished by the deadline");
        assert!(cut, "h2c={h2c}: the whole trickled head went through");
        assert!(read_until_closed(&mut tcp, "the slowloris").await.is_empty(), "h2c={h2c}");
        assert_eq!(server.snapshot().counters.requests, 0);
        server.stop_within(Duration::ZERO).await.unwrap();
    }
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut cfg = config("idle", hello("ok"));
    cfg.timeouts.idle = Some(Duration::from_millis(300));
    cfg.timeouts.header_read = None;
    let server = started(cfg).await;
    let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let rest = read_until_closed(&mut tcp, "an idle keep-alive connection").await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200"), "answered first: {text}");
    assert_eq!(server.snapshot().counters.requests, 1);
    server.stop_within(Duration::ZERO).await.unwrap();
}

/// Reads the whole request body: "got N" when it all came, 408 with the error when the body
/// read timeout cut it, 500 on any other error.
fn body_reader() -> httpserver_pool::Handler {
    use http_body_util::BodyExt;
    httpserver_pool::Handler::from_fn(|req: http::Request<httpserver_pool::RequestBody>| async move {
        let (status, text) = match req.into_body().collect().await {
            Ok(body) => (StatusCode::OK, format!("got {}", body.to_bytes().len())),
            Err(e @ RequestBodyError::TimedOut { .. }) => (StatusCode::REQUEST_TIMEOUT, e.to_string()),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let mut resp = http::Response::new(httpserver_pool::full(text));
        *resp.status_mut() = status;
        resp
    })
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_by_the_body_read_timeout() {
    let mut cfg = config("slow-post", body_reader());
    cfg.timeouts.body_read = Some(Duration::from_millis(300));
    let server = started(cfg).await;
    let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
    // Ten bytes of a thousand, then nothing.
    tcp.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789").await.unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut tcp, "a stalled upload").await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("timeouts.body_read"), "the error names the setting: {answer}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_body_sent_at_a_steady_pace_outlasts_the_body_read_timeout() {
    // Fifteen bytes 100 ms apart: longer in all than the 1 s limit, each wait far shorter.
    let mut cfg = config("steady-post", body_reader());
    cfg.timeouts.body_read = Some(Duration::from_secs(1));
    let server = started(cfg).await;
    let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 15\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tcp.write_all(b"x").await.unwrap();
    }
    let answer = String::from_utf8_lossy(&read_until_closed(&mut tcp, "a steady upload").await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("got 15"), "{answer}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// HTTP/2, frame by frame: a client that does what well-behaved ones never do (open more streams
// than announced, ignore pings) has to be written by hand.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A `GET /` on `stream`, headers only: `:method GET`, `:scheme http`, `:path /` from HPACK's
/// static table and `:authority x` as a literal.
fn get_headers(stream: u32) -> Vec<u8> {
    frame(HEADERS, 0x4 | 0x1, stream, &[0x82, 0x86, 0x84, 0x41, 0x01, b'x'])
}

/// The next frame, or `None` once the server closed the connection.
async fn read_frame(tcp: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some(Frame { kind: head[3], flags: head[4], stream, payload })
}

/// Opens an HTTP/2 connection with prior knowledge, acknowledges the server's SETTINGS and
/// returns them as (identifier, value) pairs.
async fn h2_open(addr: SocketAddr) -> (TcpStream, Vec<(u16, u32)>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let settings = tokio::time::timeout(DEADLINE, async {
        loop {
            let f = read_frame(&mut tcp).await.expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                break f.payload;
            }
        }
    })
    .await
    .expect("SETTINGS by the deadline");
    tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    let pairs = settings
        .chunks(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect();
    (tcp, pairs)
}

fn h2c_config(name: &str, handler: httpserver_pool::Handler) -> HttpServerConfig {
    let mut cfg = config(name, handler);
    cfg.h2c = true;
    cfg
}

#[tokio::test]
async fn streams_over_the_http2_cap_are_refused_while_the_others_are_answered() {
    // Handlers wait for the gate, so the first streams are all open when the extra ones come.
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let held = httpserver_pool::Handler::from_fn(move |_req| {
        let mut gate = gate_rx.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            http::Response::new(httpserver_pool::full("ok"))
        }
    });
    let mut cfg = h2c_config("streams", held);
    cfg.limits.http2_max_concurrent_streams = 3;
    let server = started(cfg).await;
    let (mut tcp, settings) = h2_open(server.bind()).await;
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 3)), "announced: {settings:?}");

    // Five streams at once, ignoring the announced limit of three.
    let mut burst = Vec::new();
    for id in [1, 3, 5, 7, 9] {
        burst.extend(get_headers(id));
    }
    tcp.write_all(&burst).await.unwrap();

    let mut refused = Vec::new();
    let mut answered = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while refused.len() + answered.len() < 5 {
            let f = read_frame(&mut tcp).await.expect("connection open");
            match f.kind {
                RST_STREAM => {
                    let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                    assert_eq!(code, REFUSED_STREAM, "stream {} reset with {code}", f.stream);
                    refused.push(f.stream);
                    if refused.len() == 2 {
                        // Only now let the held streams answer.
                        gate.send_replace(true);
                    }
                }
                HEADERS => answered.push(f.stream),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("refused {refused:?}, answered {answered:?} by the deadline"));
    refused.sort_unstable();
    answered.sort_unstable();
    assert_eq!(refused, [7, 9]);
    assert_eq!(answered, [1, 3, 5]);

    // The connection carries on: a new stream is answered.
    tcp.write_all(&get_headers(11)).await.unwrap();
    let next = tokio::time::timeout(DEADLINE, async {
        loop {
            let f = read_frame(&mut tcp).await.expect("connection open");
            if f.kind == HEADERS || f.kind == RST_STREAM {
                break f;
            }
        }
    })
    .await
    .expect("an answer to stream 11");
    assert_eq!((next.kind, next.stream), (HEADERS, 11));
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn an_http2_peer_that_stops_answering_pings_is_closed() {
    let mut cfg = h2c_config("pings", hello("ok"));
    cfg.limits.http2_keep_alive_interval = Some(Duration::from_millis(100));
    cfg.limits.http2_keep_alive_timeout = Duration::from_millis(300);
    cfg.timeouts.idle = None;
    cfg.timeouts.header_read = None;
    let server = started(cfg).await;
    let (mut tcp, _) = h2_open(server.bind()).await;

    // Three pings answered: the connection stays.
    let mut answered = 0;
    let mut kinds = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Some(f) = read_frame(&mut tcp).await {
            kinds.push(f.kind);
            if f.kind == PING && f.flags & ACK == 0 && answered < 3 {
                tcp.write_all(&frame(PING, ACK, 0, &f.payload)).await.unwrap();
                answered += 1;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an unanswered ping did not close the connection: frames {kinds:?}");
    assert_eq!(answered, 3, "closed while its pings were answered: frames {kinds:?}");
    assert!(kinds.iter().filter(|k| **k == PING).count() >= 4, "an unanswered fourth ping: {kinds:?}");
    wait_until("the connection to be counted off", || server.snapshot().counters.active == 0).await;
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn an_http2_connection_that_opens_no_stream_is_closed_at_the_header_read_timeout() {
    let mut cfg = h2c_config("silent-h2", hello("ok"));
    cfg.timeouts.header_read = Some(Duration::from_millis(300));
    cfg.timeouts.idle = None;
    cfg.limits.http2_keep_alive_interval = None;
    let server = started(cfg).await;

    // A preface and nothing else, and no preface at all: both closed.
    let (mut tcp, _) = h2_open(server.bind()).await;
    let closed =
        tokio::time::timeout(DEADLINE, async { while read_frame(&mut tcp).await.is_some() {} }).await;
    assert!(closed.is_ok(), "a preface with no stream held its connection");
    let mut silent = TcpStream::connect(server.bind()).await.unwrap();
    assert!(read_until_closed(&mut silent, "a connection that sent nothing").await.is_empty());

    // A connection that made a request is not held to the header read timeout afterwards (only
    // to the idle timeout, off here): still open well past it.
    let (mut tcp, _) = h2_open(server.bind()).await;
    tcp.write_all(&get_headers(1)).await.unwrap();
    let mut saw = Vec::new();
    let open = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(f) = read_frame(&mut tcp).await {
            saw.push(f.kind);
        }
    })
    .await;
    assert!(open.is_err(), "closed after its request: frames {saw:?}");
    assert!(saw.contains(&HEADERS) && saw.contains(&DATA), "answered: {saw:?}");
    assert!(!saw.contains(&GOAWAY), "{saw:?}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let mut cfg = h2c_config("idle-h2", hello("ok"));
    cfg.timeouts.idle = Some(Duration::from_millis(300));
    cfg.limits.http2_keep_alive_interval = None;
    let server = started(cfg).await;
    let (mut tcp, _) = h2_open(server.bind()).await;
    tcp.write_all(&get_headers(1)).await.unwrap();
    let mut saw = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Some(f) = read_frame(&mut tcp).await {
            saw.push(f.kind);
        }
    })
    .await;
    assert!(closed.is_ok(), "still open at the deadline: frames {saw:?}");
    assert!(saw.contains(&HEADERS), "answered first: {saw:?}");
    assert!(saw.contains(&GOAWAY), "closed gracefully: {saw:?}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_stalled_http2_request_body_is_cut_by_the_body_read_timeout() {
    let mut cfg = h2c_config("slow-h2-post", body_reader());
    cfg.timeouts.body_read = Some(Duration::from_millis(300));
    let server = started(cfg).await;
    let (mut tcp, _) = h2_open(server.bind()).await;
    // A POST whose body never ends: headers without END_STREAM, one DATA frame, then nothing.
    let post = [0x83, 0x86, 0x84, 0x41, 0x01, b'x'];
    tcp.write_all(&frame(HEADERS, 0x4, 1, &post)).await.unwrap();
    tcp.write_all(&frame(DATA, 0, 1, b"0123456789")).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let f = read_frame(&mut tcp).await.expect("connection open");
            if f.kind == DATA && f.stream == 1 {
                answer.extend_from_slice(&f.payload);
                if f.flags & 0x1 != 0 {
                    break;
                }
            }
        }
    })
    .await
    .expect("an answer to the stalled stream by the deadline");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("timeouts.body_read"), "{text}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

// ---------------------------------------------------------------------------------------------

#[test]
fn limits_have_safe_defaults_read_humantime_and_are_validated() {
    let d = Limits::default();
    assert_eq!(d.max_connections, Some(10_000));
    assert_eq!(d.max_connections_per_ip, None);
    assert_eq!(d.http2_max_concurrent_streams, 100);
    assert_eq!(d.http2_keep_alive_interval, Some(Duration::from_secs(30)));
    assert_eq!(d.http2_keep_alive_timeout, Duration::from_secs(20));

    let cfg: HttpServerConfig = serde_json::from_value(serde_json::json!({
        "name": "s", "listen": "127.0.0.1:0",
        "limits": {
            "max_connections": 50, "max_connections_per_ip": 5,
            "http2_max_concurrent_streams": 10,
            "http2_keep_alive_interval": "15s", "http2_keep_alive_timeout": "1s 500ms"
        }
    }))
    .unwrap();
    assert_eq!(cfg.limits.max_connections_per_ip, Some(5));
    assert_eq!(cfg.limits.http2_keep_alive_interval, Some(Duration::from_secs(15)));
    assert_eq!(cfg.limits.http2_keep_alive_timeout, Duration::from_millis(1500));
    assert!(
        serde_json::from_value::<HttpServerConfig>(serde_json::json!({ "limits": { "max_conns": 1 } }))
            .is_err()
    );

    assert_eq!(Timeouts::default().body_read, Some(Duration::from_secs(30)));
    let cfg: HttpServerConfig = serde_json::from_value(serde_json::json!({
        "name": "s", "listen": "127.0.0.1:0", "timeouts": { "body_read": "2m" }
    }))
    .unwrap();
    assert_eq!(cfg.timeouts.body_read, Some(Duration::from_secs(120)));

    let mut bad = HttpServerConfig::new("bad", "127.0.0.1:0");
    bad.timeouts.body_read = Some(Duration::ZERO);
    bad.limits = Limits {
        max_connections: Some(0),
        max_connections_per_ip: Some(0),
        http2_max_concurrent_streams: 0,
        http2_keep_alive_interval: Some(Duration::ZERO),
        http2_keep_alive_timeout: Duration::ZERO,
        max_abandoned_requests: 0,
    };
    let Err(Error::Invalid { problems }) = bad.validate() else { panic!("zero limits accepted") };
    let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
    for f in [
        "timeouts.body_read",
        "limits.max_connections",
        "limits.max_connections_per_ip",
        "limits.http2_max_concurrent_streams",
        "limits.http2_keep_alive_interval",
        "limits.http2_keep_alive_timeout",
        "limits.max_abandoned_requests",
    ] {
        assert!(fields.contains(&f), "{f} missing from {problems:?}");
    }
    assert!(problems.iter().all(|p| p.server == "bad"));
}
