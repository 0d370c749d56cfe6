//! Servers with worker threads (`HttpServerConfig::workers`): connections are served on the
//! workers, spread by load, each staying on one; stop drains and cuts them as it does on the
//! server's own runtime; the per-worker counts return to zero.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Response;
use httpserver_pool::{Handler, HttpServerConfig, Server, WorkerOptions, Workers, full, worker_index};
use pool_api::Lifecycle;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// Answers the worker it runs on and its thread's name; `/slow` after `slow`, counted in
/// `slow_started` when it begins.
fn where_am_i(slow: Duration, slow_started: Arc<AtomicUsize>) -> Handler {
    Handler::from_fn(move |req: http::Request<_>| {
        let slow_started = slow_started.clone();
        async move {
            if req.uri().path() == "/slow" {
                slow_started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(slow).await;
            }
            let thread = std::thread::current().name().unwrap_or("?").to_owned();
            Response::new(full(format!("{:?} {thread}", worker_index())))
        }
    })
}

/// One keep-alive request on `tcp`; the body of the answer.
async fn ask(tcp: &mut TcpStream, path: &str) -> String {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                if body.len() >= len {
                    return body[..len].to_owned();
                }
            }
        }
    })
    .await
    .expect("an answer within the deadline")
}

#[tokio::test]
async fn connections_are_served_on_the_workers_spread_by_load_each_on_one() {
    let workers = Workers::start(2, "serve").unwrap();
    let cfg = HttpServerConfig::new("w", free_addr())
        .with_handler(where_am_i(Duration::ZERO, Arc::default()))
        .with_workers(workers.clone());
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();

    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
        let first = ask(&mut tcp, "/").await;
        conns.push((tcp, first));
    }
    // Each new connection went to the worker with fewer: two on each.
    assert_eq!(workers.connections(), vec![2, 2]);
    let mut seen: Vec<&str> = conns.iter().map(|(_, first)| first.as_str()).collect();
    seen.sort();
    assert_eq!(seen, ["Some(0) serve-0", "Some(0) serve-0", "Some(1) serve-1", "Some(1) serve-1"]);
    // A connection's later requests stay on its worker.
    for (tcp, first) in &mut conns {
        for _ in 0..3 {
            assert_eq!(&ask(tcp, "/").await, first);
        }
    }
    drop(conns);
    wait_until("the closed connections leave their workers", || workers.connections() == vec![0, 0]).await;
    let report = server.stop_within(DEADLINE).await.unwrap();
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn stop_drains_requests_in_flight_on_workers_and_cuts_those_past_the_deadline() {
    // Workers that spin before they sleep: the spin changes nothing of what the server does.
    let workers =
        Workers::start_with(2, "drain", WorkerOptions::default().spin(Duration::from_millis(1))).unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let cfg = HttpServerConfig::new("w", free_addr())
        .with_handler(where_am_i(Duration::from_millis(300), started.clone()))
        .with_workers(workers.clone());
    let server = Server::new(cfg.clone()).unwrap();
    server.start().await.unwrap();
    // A slow request in flight when the stop begins is answered, then its connection closed.
    let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    wait_until("the request reaches its handler", || started.load(Ordering::SeqCst) == 1).await;
    let report = server.stop_within(DEADLINE).await.unwrap();
    assert_eq!((report.drained, report.forced), (1, 0));
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("drain-"), "{answer}");

    // One that outlasts the deadline is cut off, and its worker's count goes back.
    let cfg = cfg.with_handler(where_am_i(Duration::from_secs(3600), started.clone()));
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let mut tcp = TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    wait_until("the request reaches its handler", || started.load(Ordering::SeqCst) == 2).await;
    assert_eq!(workers.connections().iter().sum::<usize>(), 1);
    let report = server.stop_within(Duration::from_millis(200)).await.unwrap();
    assert_eq!((report.drained, report.forced), (0, 1));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut rest)).await.expect("closed");
    assert!(read.is_err() || rest.is_empty(), "no answer for a request cut off");
    wait_until("the cut connection leaves its worker", || workers.connections() == vec![0, 0]).await;
}

#[tokio::test]
async fn tls_connections_are_served_on_the_workers_over_both_protocols() {
    let workers =
        Workers::start_with(1, "tls", WorkerOptions::default().spin(Duration::from_millis(1))).unwrap();
    let pki = TestPki::new();
    let cfg = HttpServerConfig::new("t", format!("localhost:{}", free_port()))
        .with_handler(where_am_i(Duration::ZERO, Arc::default()))
        .with_tls(pki.server_tls())
        .with_workers(workers.clone());
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    for (alpn, version) in [(&b"h2"[..], http::Version::HTTP_2), (&b"http/1.1"[..], http::Version::HTTP_11)] {
        let (status, body, got) =
            tls_get(pki.client_config(None, &[alpn]), server.bind(), "/").await.unwrap();
        assert_eq!((status.as_u16(), body.as_str(), got), (200, "Some(0) tls-0", version));
    }
    let report = server.stop_within(DEADLINE).await.unwrap();
    assert_eq!(report.forced, 0);
}
