//! Workloads on a remote Docker host: a real docker-agent (in process, lifecycle profile, mutual
//! TLS with certificates from its own `certs` module) in front of the local engine, and a
//! gateway whose workload names it (`[[docker_hosts]]`, `url = "agent://127.0.0.1:PORT"`).
//! The container sleeps while idle and is woken through the agent by a request; an agent down
//! at start is retried until it answers; a client certificate the agent does not accept passes
//! `--check` and shows as the workload's error.
//! Under `CI=true` a missing engine fails the Docker test; elsewhere it skips with the reason.

use std::time::Duration;

use docker_agent::acl::{AclConfig, Profile};
use docker_agent::certs::CertificateAuthority;
use docker_agent::config::{AgentConfig, TlsMaterial};
use docker_agent::server::{AgentServer, RunningDockerAgent};
use test_support::docker::{self, TestContainer};

mod common;
use common::{exchange, free_port, get, start_gateway, status};

const DAY: Duration = Duration::from_secs(86_400);

/// Generous: the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(60);

/// An in-process docker-agent on a free loopback port with the lifecycle profile (start,
/// stop, kill, inspect, events: what idlewatch needs), serving the local engine.
async fn agent(ca: &CertificateAuthority) -> RunningDockerAgent {
    agent_on(ca, 0).await
}

/// The same on a given port.
async fn agent_on(ca: &CertificateAuthority, port: u16) -> RunningDockerAgent {
    let server = ca.issue_server(&["127.0.0.1".to_owned()], DAY).unwrap();
    let tls = TlsMaterial {
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
    };
    let mut config = AgentConfig::new("gateway-test", ([127, 0, 0, 1], port).into(), tls);
    config.acl = AclConfig::profile(Profile::Lifecycle);
    config.shutdown_grace = Duration::from_secs(2);
    AgentServer::bind(config).await.expect("the agent binds")
}

/// Writes the gateway's material for the agent into `dir`: trusting `ca`, presenting a client
/// certificate issued by `issuer`. Returns the `tls = { … }` value for the configuration.
fn client_material(
    dir: &std::path::Path,
    ca: &CertificateAuthority,
    issuer: &CertificateAuthority,
) -> String {
    let client = issuer.issue_client("gateway", DAY).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), client.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), client.key_pem).unwrap();
    let file = |name: &str| format!("{{ file = {:?} }}", dir.join(name).display().to_string());
    format!("{{ ca = {}, cert = {}, key = {} }}", file("ca.pem"), file("cert.pem"), file("key.pem"))
}

/// The configuration after the listener and admin sections: the host, the workload on it,
/// its upstream and its route.
fn config(agent: std::net::SocketAddr, tls: &str, container: &str, port: u16) -> String {
    format!(
        r#"
        [[docker_hosts]]
        name = "edge"
        url = "agent://{agent}"
        tls = {tls}

        [[upstreams]]
        name = "app"
        urls = ["http://127.0.0.1:{port}"]

        [[workloads]]
        name = "app"
        host = "edge"
        loading_page = false

        [workloads.watch]
        workload = {{ container = "{container}" }}
        idle_timeout = "2s"
        wake_timeout = "60s"

        [[routes]]
        name = "app"
        upstream = "app"
        workload = "app"
        "#
    )
}

async fn running(engine: &docker_agent::bollard::Docker, name: &str) -> bool {
    let inspect = engine.inspect_container(name, None).await.unwrap();
    inspect.state.and_then(|s| s.running).unwrap_or(false)
}

/// Polls until the container is stopped (the gateway's idle stop, through the agent).
async fn wait_stopped(engine: &docker_agent::bollard::Docker, name: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while running(engine, name).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle container was not stopped within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_on_a_remote_host_sleeps_and_is_woken_through_its_docker_agent() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let port = free_port();
    let container = TestContainer::builder("gateway-remote")
        .publish(port)
        .start(false)
        .create(&engine)
        .await
        .expect("container");
    let ca = CertificateAuthority::generate("gateway remote test CA", DAY).unwrap();
    let agent = agent(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let tls = client_material(dir.path(), &ca, &ca);
    let rest = config(agent.local_addr(), &tls, container.name(), port);
    let (ok, stderr) =
        common::check(dir.path(), &format!("[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:1\"\n{rest}"))
            .await;
    assert!(ok, "{stderr}");
    let gateway = start_gateway(dir.path(), &rest).await;

    // The workload is watched through the agent, and /status says on which host.
    let report = status(&gateway.admin).await;
    let workload = &report["workloads"][0];
    assert_eq!(workload["host"], "edge", "{report:#}");
    assert_eq!(workload["watching"], true, "{report:#}");
    assert!(workload["error"].is_null(), "{report:#}");
    assert_eq!(report["docker_hosts"][0]["state"], "watching", "{report:#}");
    assert_eq!(report["docker_hosts"][0]["url"], format!("agent://{}", agent.local_addr()), "{report:#}");
    assert!(!running(&engine, container.name()).await, "asleep before the first request");

    // The first request wakes it (held until it is ready) and gets its answer.
    let reply = exchange(&gateway.listen, &get("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("agentpool test container"), "{}", reply.text());
    // idlewatch's series name the engine: same-named containers on two hosts stay apart.
    let wakes = format!("idlewatch_wakes_total{{workload=\"{}\",host=\"edge\"}}", container.name());
    assert_eq!(common::metric(&gateway.admin, &wakes).await, Some(1.0), "{wakes}");

    // Idle: stopped through the agent. The next request wakes it again.
    wait_stopped(&engine, container.name()).await;
    let reply = exchange(&gateway.listen, &get("/index.html")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("agentpool test container"), "{}", reply.text());
    assert!(running(&engine, container.name()).await);

    // Asleep again, and the agent gone: the gateway cannot wake it any more (it goes through
    // the agent, not the local engine); the request gets a 503, the container stays down.
    wait_stopped(&engine, container.name()).await;
    agent.shutdown().await;
    let reply = exchange(&gateway.listen, &get("/")).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(!running(&engine, container.name()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_down_at_start_is_retried_until_its_workloads_are_watched() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let port = free_port();
    let container = TestContainer::builder("gateway-late")
        .publish(port)
        .start(false)
        .create(&engine)
        .await
        .expect("container");
    let ca = CertificateAuthority::generate("gateway remote test CA", DAY).unwrap();
    let agent_port = free_port();
    let address: std::net::SocketAddr = ([127, 0, 0, 1], agent_port).into();
    let dir = tempfile::tempdir().unwrap();
    let tls = client_material(dir.path(), &ca, &ca);
    // Nobody listens there yet: the gateway starts all the same.
    let gateway = start_gateway(dir.path(), &config(address, &tls, container.name(), port)).await;
    let report = status(&gateway.admin).await;
    assert_eq!(report["docker_hosts"][0]["state"], "connecting", "{report:#}");
    assert_eq!(report["workloads"][0]["watching"], false, "{report:#}");
    assert!(
        report["workloads"][0]["error"].as_str().is_some_and(|e| e.contains(&address.to_string())),
        "{report:#}"
    );
    let reply = exchange(&gateway.listen, &get("/")).await;
    assert_eq!(reply.status, 503, "{}", reply.text());

    // The agent comes up: the next attempt reaches it and the workload is watched.
    let _agent = agent_on(&ca, agent_port).await;
    common::eventually("the late agent's workload is watched", async || {
        let report = status(&gateway.admin).await;
        report["workloads"][0]["watching"] == true && report["docker_hosts"][0]["state"] == "watching"
    })
    .await;
    let report = status(&gateway.admin).await;
    assert!(report["workloads"][0]["error"].is_null(), "{report:#}");
    assert!(report["docker_hosts"][0]["attempts"].is_null(), "{report:#}");
    let reply = exchange(&gateway.listen, &get("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("agentpool test container"), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_the_agent_refuses_passes_check_and_shows_in_status() {
    // The TLS handshake fails before the agent asks its engine anything: no Docker needed.
    let ca = CertificateAuthority::generate("gateway remote test CA", DAY).unwrap();
    let other = CertificateAuthority::generate("some other CA", DAY).unwrap();
    let agent = agent(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    // Trusts the agent's CA, but presents a certificate of another CA.
    let tls = client_material(dir.path(), &ca, &other);
    let port = free_port();
    let rest = config(agent.local_addr(), &tls, "gateway-remote-never-reached", port);

    // Well-formed material: the configuration is valid.
    let (ok, stderr) =
        common::check(dir.path(), &format!("[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:1\"\n{rest}"))
            .await;
    assert!(ok, "{stderr}");

    // The gateway serves anyway; the workload is not watched and says why.
    let gateway = start_gateway(dir.path(), &rest).await;
    let mut report = serde_json::Value::Null;
    common::eventually("the workload reports the refused certificate", async || {
        report = status(&gateway.admin).await;
        report["workloads"][0]["error"].as_str().is_some_and(|e| e.contains("TLS"))
    })
    .await;
    let workload = &report["workloads"][0];
    let error = workload["error"].as_str().unwrap();
    assert!(error.starts_with(&format!("docker host edge (agent://{})", agent.local_addr())), "{error}");
    assert_eq!(workload["watching"], false, "{report:#}");
    assert_eq!(workload["host"], "edge", "{report:#}");
    assert_eq!(report["docker_hosts"][0]["state"], "connecting", "{report:#}");
    println!("reported: {error}");

    // Its route answers 503 rather than sending the request to an upstream nobody woke.
    let reply = exchange(&gateway.listen, &get("/")).await;
    assert_eq!(reply.status, 503, "{}", reply.text());

    // Like [[workloads]], [[docker_hosts]] cannot change on a reload: refused, nothing changes.
    let path = dir.path().join("gateway.toml");
    let running = std::fs::read_to_string(&path).unwrap();
    let moved = running.replace(&format!("agent://{}", agent.local_addr()), "agent://127.0.0.1:1");
    assert_ne!(moved, running);
    std::fs::write(&path, moved).unwrap();
    let admin = &gateway.admin;
    let reply = common::reload(admin).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(reply.text().contains("[[docker_hosts]] cannot change while running"), "{}", reply.text());
    let report = status(admin).await;
    assert_eq!(report["docker_hosts"][0]["url"], format!("agent://{}", agent.local_addr()), "{report:#}");

    // The operator renews the certificate at the same paths (now from the agent's CA) and
    // reloads: the host's client takes it and tries again at once; the handshake passes.
    std::fs::write(&path, &running).unwrap();
    let renewed = ca.issue_client("gateway", DAY).unwrap();
    std::fs::write(dir.path().join("cert.pem"), renewed.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), renewed.key_pem).unwrap();
    let reply = common::reload(admin).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains(r#"docker hosts with new TLS material ["edge"]"#), "{}", reply.text());
    common::eventually("the renewed certificate is accepted", async || {
        let report = status(admin).await;
        // Watching, or stopped further on (no such container, or no engine here): not by TLS.
        let error = report["workloads"][0]["error"].as_str().unwrap_or_default().to_owned();
        agent.open_connections() > 0 && !error.contains("TLS") && !error.contains("connecting")
    })
    .await;
    println!("after the renewal: {:#}", status(admin).await["workloads"][0]);
}
