//! A client that breaks off its request body is counted as a client error, never as the engine
//! being down. This test binary installs a global `metrics` recorder, so it holds one test.

mod common;

use std::time::Duration;

use common::engine::FakeEngine;
use docker_agent::AGENT_SERVER_NAME;
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::config::AgentConfig;
use docker_agent::server::AgentServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_request_body_is_the_clients_fault() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let engine = FakeEngine::start();
    let pki = common::pki("abort CA");
    let mut config = AgentConfig::new("abort", "127.0.0.1:0".parse().unwrap(), pki.server.clone());
    config.docker_socket = engine.socket.clone();
    config.acl = AclConfig {
        rules: vec!["POST /containers/{id}/update".parse().unwrap()],
        ..AclConfig::profile(Profile::ReadOnly)
    };
    let agent = AgentServer::bind(config).await.unwrap();

    let tls = common::client_config(&pki.client);
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(agent.local_addr()).await.unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(ServerName::try_from(AGENT_SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        let head =
            "POST /containers/c/update HTTP/1.1\r\nhost: agent\r\ncontent-length: 1000\r\n\r\n{\"Memory\":";
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        // Let the agent start forwarding, then vanish mid-body.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream);
    }

    // A snapshot hands out what was counted since the last one: keep the running sums.
    let mut totals = std::collections::HashMap::<String, u64>::new();
    let take = |totals: &mut std::collections::HashMap<String, u64>| {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            if key.name() != "docker_agent_requests_total" {
                continue;
            }
            let outcome =
                key.labels().find(|l| l.key() == "outcome").map(|l| l.value().to_owned()).unwrap_or_default();
            if let DebugValue::Counter(n) = value {
                *totals.entry(outcome).or_default() += n;
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        take(&mut totals);
        if totals.get("client_error").copied().unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "aborted bodies not counted as client errors: {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(totals.get("engine_error").copied().unwrap_or(0), 0, "{totals:?}");
    assert_eq!(totals.get("allowed").copied().unwrap_or(0), 3, "{totals:?}");
    agent.shutdown().await;
}
