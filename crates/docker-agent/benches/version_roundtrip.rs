//! `docker version` round trip (bollard `version()`), three ways:
//!
//! - **agent_pooled**: through an in-process docker-agent with [`AgentClient`]'s pooled mTLS
//!   client (warm connections reused);
//! - **unix_direct**: straight to the engine's Unix socket;
//! - **agent_connect_with_ssl**: bollard's own `connect_with_ssl` to the same agent (client bundle
//!   written to a temporary directory; bollard opens a new TCP + TLS connection per call).
//!
//! Criterion measures each; afterwards the bench runs its own interleaved rounds and prints the
//! three medians and the ratios (targets: pooled ≤ 1.3 × direct; pooled ≥ 3 × faster than
//! `connect_with_ssl`), then the same medians for `_ping`, which isolates the transport's cost
//! from the engine's own work on `/version`. Without a Docker engine it prints a skip message
//! and exits 0.
//!
//! Run: `cargo bench -p docker-agent --bench version_roundtrip`.

// Wall-clock measurement outside tokio is what a bench is for.
#![allow(clippy::disallowed_types)]
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use bollard::Docker;
use criterion::Criterion;
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::certs::CertificateAuthority;
use docker_agent::client::{AgentClient, AgentTls};
use docker_agent::config::{AgentConfig, TlsMaterial};
use docker_agent::server::AgentServer;

const DAY: Duration = Duration::from_secs(86_400);
const ROUNDS: usize = 400;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let Some(local) = runtime.block_on(async {
        // Outside CI a missing engine is a skip; in CI the harness panics (loud failure).
        test_support::docker::engine().await
    }) else {
        eprintln!("version_roundtrip: skipped, no Docker engine");
        return;
    };

    let ca = CertificateAuthority::generate("bench CA", DAY).unwrap();
    let server = ca.issue_server(&["127.0.0.1".to_owned()], DAY).unwrap();
    let client = ca.issue_client("bench", DAY).unwrap();
    let material = TlsMaterial {
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
    };
    let tls = AgentTls {
        ca_cert_pem: ca.cert_pem().to_owned(),
        client_cert_pem: client.cert_pem.clone(),
        client_key_pem: client.key_pem.clone(),
    };
    let mut config = AgentConfig::new("bench", "127.0.0.1:0".parse().unwrap(), material);
    config.acl = AclConfig::profile(Profile::ReadOnly);
    config.expiry_warning = Duration::from_secs(3600);
    let agent = runtime.block_on(AgentServer::bind(config)).expect("agent binds");
    let address = agent.local_addr();

    let pooled = AgentClient::new(&address.to_string(), &tls).unwrap().docker();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(bundle.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(bundle.path().join("cert.pem"), &client.cert_pem).unwrap();
    std::fs::write(bundle.path().join("key.pem"), &client.key_pem).unwrap();
    let per_call = runtime
        .block_on(async {
            Docker::connect_with_ssl(
                &format!("https://{address}"),
                &bundle.path().join("key.pem"),
                &bundle.path().join("cert.pem"),
                &bundle.path().join("ca.pem"),
                30,
                bollard::API_DEFAULT_VERSION,
            )
        })
        .expect("connect_with_ssl");

    let clients = [("agent_pooled", &pooled), ("unix_direct", &local), ("agent_connect_with_ssl", &per_call)];
    for (name, docker) in clients {
        let version =
            runtime.block_on(docker.version()).unwrap_or_else(|e| panic!("{name}: version failed: {e}"));
        assert!(version.api_version.is_some(), "{name}: no API version");
    }

    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    {
        let mut group = criterion.benchmark_group("docker_version");
        for (name, docker) in clients {
            group.bench_function(name, |b| b.iter(|| runtime.block_on(docker.version()).unwrap()));
        }
        group.finish();
    }

    // Interleaved rounds, one call of each per round, so drift affects all three alike.
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (_, docker)) in clients.iter().enumerate() {
            let start = Instant::now();
            runtime.block_on(docker.version()).unwrap();
            samples[i].push(start.elapsed());
        }
    }
    let [pooled_median, direct_median, ssl_median] = samples.map(median);
    println!("version_roundtrip medians over {ROUNDS} interleaved rounds:");
    println!("  agent_pooled            {pooled_median:>10.1?}");
    println!("  unix_direct             {direct_median:>10.1?}");
    println!("  agent_connect_with_ssl  {ssl_median:>10.1?}");
    println!(
        "  pooled / direct = {:.2} (target <= 1.3)",
        pooled_median.as_secs_f64() / direct_median.as_secs_f64()
    );
    println!(
        "  connect_with_ssl / pooled = {:.2} (target >= 3)",
        ssl_median.as_secs_f64() / pooled_median.as_secs_f64()
    );
    // The same for `_ping`, which the engine answers without work of its own: what is left is
    // the transport's cost (TLS handshakes, connection reuse, the agent's proxying).
    let mut pings: [Vec<Duration>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (_, docker)) in clients.iter().enumerate() {
            let start = Instant::now();
            runtime.block_on(docker.ping()).unwrap();
            pings[i].push(start.elapsed());
        }
    }
    let [pooled_ping, direct_ping, ssl_ping] = pings.map(median);
    println!(
        "_ping medians (transport cost): agent_pooled {pooled_ping:.1?}, unix_direct {direct_ping:.1?}, agent_connect_with_ssl {ssl_ping:.1?}"
    );
    println!(
        "  _ping: pooled / direct = {:.2}, connect_with_ssl / pooled = {:.2}",
        pooled_ping.as_secs_f64() / direct_ping.as_secs_f64(),
        ssl_ping.as_secs_f64() / pooled_ping.as_secs_f64()
    );
    criterion.final_summary();
    runtime.block_on(agent.shutdown());
}
