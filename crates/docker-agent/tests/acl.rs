//! The ACL as a client sees it over the wire, with the agent's request counters.
//!
//! No engine is needed: the agent points at a socket where nothing listens, so allowed requests
//! end in `502` (and count as `allowed` and `engine_error`), denied ones in `403`. This test
//! binary installs a global `metrics` recorder, so it holds exactly one test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use docker_agent::AGENT_SERVER_NAME;
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::certs::CertificateAuthority;
use docker_agent::config::{AgentConfig, TlsMaterial};
use docker_agent::server::AgentServer;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const DAY: Duration = Duration::from_secs(86_400);

async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream =
        tokio_rustls::TlsConnector::from(tls).connect(ServerName::try_from(AGENT_SERVER_NAME)?, tcp).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn counters(snapshot: metrics_util::debugging::Snapshot) -> HashMap<String, u64> {
    snapshot
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let DebugValue::Counter(n) = value else { return None };
            let key = key.key();
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_on_the_wire_and_their_counters() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let ca = CertificateAuthority::generate("acl test CA", DAY).unwrap();
    let server = ca.issue_server(&[], DAY).unwrap();
    let client = ca.issue_client("acl-test", DAY).unwrap();
    let tls =
        TlsMaterial { ca_cert_pem: ca.cert_pem().into(), cert_pem: server.cert_pem, key_pem: server.key_pem };
    let mut config = AgentConfig::new("acl", "127.0.0.1:0".parse().unwrap(), tls);
    config.docker_socket = "/nonexistent/acl-test.sock".into();
    // read-only plus one custom rule.
    config.acl = AclConfig {
        rules: vec!["GET /containers/{id}/logs".parse().unwrap()],
        ..AclConfig::profile(Profile::ReadOnly)
    };
    let agent = AgentServer::bind(config).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    );
    let mut conn = connect(agent.local_addr(), client_tls).await.unwrap();

    let cases = [
        // (method, path, expected status)
        (Method::GET, "/v1.41/containers/json?all=1", StatusCode::BAD_GATEWAY),
        (Method::HEAD, "/_ping", StatusCode::BAD_GATEWAY),
        (Method::GET, "/containers/abc/logs?follow=1", StatusCode::BAD_GATEWAY),
        (Method::GET, "/v1.41/%63ontainers/abc/json", StatusCode::BAD_GATEWAY),
        (Method::POST, "/containers/abc/start", StatusCode::FORBIDDEN),
        (Method::POST, "/containers/abc/logs", StatusCode::FORBIDDEN),
        (Method::GET, "/containers/abc/logs/", StatusCode::FORBIDDEN),
        (Method::GET, "/containers/%2e%2e/logs", StatusCode::FORBIDDEN),
        (Method::GET, "/containers/a%5cb/logs", StatusCode::FORBIDDEN),
        (Method::GET, "/containers/a%00/logs", StatusCode::FORBIDDEN),
        (Method::DELETE, "/containers/abc", StatusCode::FORBIDDEN),
        (Method::GET, "/agent/health", StatusCode::SERVICE_UNAVAILABLE),
    ];
    for (method, path, want) in &cases {
        conn.ready().await.unwrap();
        let req =
            Request::builder().method(method).uri(*path).header("host", "a").body(Empty::new()).unwrap();
        let resp = conn.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, *want, "{method} {path}: {}", String::from_utf8_lossy(&body));
        if status == StatusCode::FORBIDDEN {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(json["message"].as_str().unwrap().starts_with("docker-agent: "), "{json}");
        }
    }

    // A client with no certificate: one handshake failure.
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    assert!(connect(agent.local_addr(), anonymous).await.is_err());
    // The server counts it right after the failed handshake; give its task a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let counts = loop {
        let counts = counters(snapshotter.snapshot());
        if counts.contains_key("docker_agent_tls_handshake_failures_total{}")
            || tokio::time::Instant::now() > deadline
        {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let count = |key: &str| counts.get(key).copied().unwrap_or(0);
    assert_eq!(count("docker_agent_requests_total{outcome=allowed}"), 4, "{counts:?}");
    assert_eq!(count("docker_agent_requests_total{outcome=engine_error}"), 4, "{counts:?}");
    assert_eq!(count("docker_agent_requests_total{outcome=denied}"), 7, "{counts:?}");
    assert_eq!(count("docker_agent_requests_total{outcome=agent}"), 1, "{counts:?}");
    assert_eq!(count("docker_agent_tls_handshake_failures_total{}"), 1, "{counts:?}");
    agent.shutdown().await;
}
