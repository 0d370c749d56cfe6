//! The agent's limits with real sockets: connection floods, held streams, slow bodies, idle
//! connections on both sides. The engine is a small HTTP server on a Unix socket in the test, so
//! its connections can be counted and its answers held open.

mod common;

use common::engine::FakeEngine;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use docker_agent::AGENT_SERVER_NAME;
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::client::AgentTls;
use docker_agent::config::{AgentConfig, AgentLimits};
use docker_agent::server::{AgentServer, RunningDockerAgent};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Generous bound for anything that should happen "soon": never a speed assertion.
const SOON: Duration = Duration::from_secs(15);

async fn start_agent(
    pki: &common::Pki,
    engine: &Path,
    limits: AgentLimits,
    acl: AclConfig,
) -> RunningDockerAgent {
    let mut config = AgentConfig::new("limits", "127.0.0.1:0".parse().unwrap(), pki.server.clone());
    config.docker_socket = engine.to_owned();
    config.acl = acl;
    config.limits = limits;
    config.shutdown_grace = Duration::from_secs(1);
    AgentServer::bind(config).await.expect("agent binds")
}

fn tls(client: &AgentTls) -> Arc<rustls::ClientConfig> {
    common::client_config(client)
}

/// A TCP connection to `agent` from the loopback address `from`.
async fn tcp_from(from: &str, agent: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(agent).await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect_from(
    from: &str,
    agent: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Sender, BoxError> {
    let tcp = tcp_from(from, agent).await?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from(AGENT_SERVER_NAME)?, tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(send: &mut Sender, path: &str) -> Result<Response<hyper::body::Incoming>, BoxError> {
    send.ready().await?;
    let req = Request::get(path).header("host", "agent").body(Full::new(Bytes::new()))?;
    Ok(send.send_request(req).await?)
}

async fn ping_from(
    from: &str,
    agent: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<StatusCode, BoxError> {
    let mut send = connect_from(from, agent, tls).await?;
    let resp = get(&mut send, "/_ping").await?;
    Ok(resp.status())
}

/// True when the peer closes `tcp` (EOF or reset) within `SOON`.
async fn closed_by_peer(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(SOON, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn read_only() -> AclConfig {
    AclConfig::profile(Profile::ReadOnly)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_from_one_address_does_not_lock_out_others() {
    let engine = FakeEngine::start();
    let pki = common::pki("flood CA");
    let limits = AgentLimits {
        max_connections: 64,
        max_connections_per_ip: 8,
        handshake_timeout: Duration::from_secs(60),
        ..AgentLimits::default()
    };
    let agent = start_agent(&pki, &engine.socket, limits, read_only()).await;
    let addr = agent.local_addr();

    // 300 connections that never say a word, from 127.0.0.2.
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(tcp_from("127.0.0.2", addr).await.expect("the kernel accepts the connection"));
    }
    // Everything past the per-address cap is closed at once, not left holding a descriptor.
    let mut refused = 0;
    for tcp in flood.iter_mut().skip(8) {
        if closed_by_peer(tcp).await {
            refused += 1;
        }
    }
    assert_eq!(refused, 292);
    assert!(agent.open_connections() <= 8, "{} open", agent.open_connections());

    // A legitimate client from another address is served while the flood holds its slots.
    let client = tls(&pki.client);
    assert_eq!(ping_from("127.0.0.1", addr, &client).await.unwrap(), StatusCode::OK);
    drop(flood);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_refuses_at_once_and_silent_connections_expire() {
    let engine = FakeEngine::start();
    let pki = common::pki("global cap CA");
    let limits = AgentLimits {
        max_connections: 4,
        max_connections_per_ip: 4,
        handshake_timeout: Duration::from_millis(300),
        ..AgentLimits::default()
    };
    let agent = start_agent(&pki, &engine.socket, limits, read_only()).await;
    let addr = agent.local_addr();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tcp_from("127.0.0.2", addr).await.unwrap());
    }
    // Give the agent the four, then a fifth from elsewhere is over the global cap.
    let deadline = tokio::time::Instant::now() + SOON;
    while agent.open_connections() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the agent never took the four connections");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut fifth = tcp_from("127.0.0.3", addr).await.unwrap();
    assert!(closed_by_peer(&mut fifth).await, "a connection over the cap was left open");
    // The silent ones run out of handshake time; then legitimate clients get in.
    for tcp in &mut silent {
        assert!(closed_by_peer(tcp).await, "a silent connection outlived its handshake time-out");
    }
    let client = tls(&pki.client);
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match ping_from("127.0.0.1", addr, &client).await {
            Ok(status) => {
                assert_eq!(status, StatusCode::OK);
                break;
            }
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "never served after the flood: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_event_streams_are_capped_per_client_certificate() {
    let engine = FakeEngine::start();
    let pki = common::pki("streams CA");
    let limits = AgentLimits { max_requests_per_client: 2, ..AgentLimits::default() };
    let agent = start_agent(&pki, &engine.socket, limits, read_only()).await;
    let addr = agent.local_addr();
    let a = tls(&pki.client);
    let b = tls(&common::client_of(&pki.ca, "other-controller"));

    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut send = connect_from("127.0.0.1", addr, &a).await.unwrap();
        let mut resp = get(&mut send, "/events").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // The stream is really flowing.
        let first = tokio::time::timeout(SOON, resp.body_mut().frame()).await.unwrap().unwrap().unwrap();
        assert!(first.is_data());
        streams.push((send, resp));
    }
    let mut third = connect_from("127.0.0.1", addr, &a).await.unwrap();
    let resp = get(&mut third, "/events").await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("max_requests_per_client"));
    // Another client is not affected.
    assert_eq!(ping_from("127.0.0.1", addr, &b).await.unwrap(), StatusCode::OK);
    // Ending one stream gives its place back.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let status = get(&mut third, "/_ping").await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(tokio::time::Instant::now() < deadline, "the ended stream still counts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(streams);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_and_blamed_on_the_client() {
    let engine = FakeEngine::start();
    let pki = common::pki("slow body CA");
    let limits = AgentLimits { body_read_timeout: Duration::from_millis(300), ..AgentLimits::default() };
    let acl = AclConfig {
        rules: vec!["POST /containers/{id}/update".parse().unwrap()],
        ..AclConfig::profile(Profile::Lifecycle)
    };
    let agent = start_agent(&pki, &engine.socket, limits, acl).await;
    let client = tls(&pki.client);

    for path in ["/containers/c/update", "/containers/c/stop"] {
        let tcp = tcp_from("127.0.0.1", agent.local_addr()).await.unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(client.clone())
            .connect(ServerName::try_from(AGENT_SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        // Promise 100 bytes, send 10, then nothing (chunked for the stop, whose rule admits no
        // body: the agent must read it to know).
        let head = if path.ends_with("update") {
            format!("POST {path} HTTP/1.1\r\nhost: agent\r\ncontent-length: 100\r\n\r\n0123456789")
        } else {
            format!("POST {path} HTTP/1.1\r\nhost: agent\r\ntransfer-encoding: chunked\r\n\r\n")
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        let mut answer = Vec::new();
        let read = async {
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&answer).contains("\r\n\r\n{") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(SOON, read).await.expect("the agent answers a stalled body");
        let text = String::from_utf8_lossy(&answer);
        let want = if path.ends_with("update") { "HTTP/1.1 400" } else { "HTTP/1.1 408" };
        assert!(text.starts_with(want), "{path}: {text}");
        assert!(text.contains("body_read_timeout") || text.contains("stalled"), "{path}: {text}");
        assert!(!text.contains("engine cannot be reached"), "{path}: blamed on the engine: {text}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_expire_on_both_sides() {
    let engine = FakeEngine::start();
    let pki = common::pki("idle CA");
    let limits = AgentLimits {
        engine_idle_timeout: Duration::from_millis(200),
        header_read_timeout: Duration::from_millis(500),
        ..AgentLimits::default()
    };
    let agent = start_agent(&pki, &engine.socket, limits, read_only()).await;
    let client = tls(&pki.client);

    // A burst of concurrent requests opens several engine connections…
    let burst: Vec<_> = (0..16).map(|_| ping_from("127.0.0.1", agent.local_addr(), &client)).collect();
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    // …which close once idle.
    let deadline = tokio::time::Instant::now() + SOON;
    while engine.open() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} idle engine connections stayed open",
            engine.open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client's idle keep-alive connection is closed after the header read time-out.
    let mut send = connect_from("127.0.0.1", agent.local_addr(), &client).await.unwrap();
    assert_eq!(get(&mut send, "/_ping").await.unwrap().status(), StatusCode::OK);
    let deadline = tokio::time::Instant::now() + SOON;
    while !send.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "an idle client connection stayed open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + SOON;
    while agent.open_connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections still counted",
            agent.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.shutdown().await;
}

#[tokio::test]
async fn limits_are_validated_field_by_field() {
    let problems = AgentLimits {
        max_connections: 0,
        max_connections_per_ip: 10,
        body_read_timeout: Duration::ZERO,
        ..AgentLimits::default()
    }
    .problems();
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text[0].contains("limits.max_connections"), "{text:?}");
    assert!(text[1].contains("limits.max_connections_per_ip"), "{text:?}");
    assert!(text[2].contains("limits.body_read_timeout"), "{text:?}");
    assert!(AgentLimits::default().problems().is_empty());
    let parsed: AgentLimits = toml::from_str("max_connections = 10\nhandshake_timeout = \"2s\"\n").unwrap();
    assert_eq!(parsed.max_connections, 10);
    assert_eq!(parsed.handshake_timeout, Duration::from_secs(2));
    assert_eq!(parsed.max_connections_per_ip, AgentLimits::default().max_connections_per_ip);
    assert!(toml::from_str::<AgentLimits>("max_conections = 1").is_err());
}
