//! What a lifecycle client can and cannot do through the agent, against the real engine and a
//! real single-node swarm: old API versions and bodies cannot reconfigure a container on start,
//! a service update can change the replica count and nothing else, and read-only clients do not
//! see the environment of containers.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use docker_agent::AGENT_SERVER_NAME;
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::client::AgentClient;
use docker_agent::config::AgentConfig;
use docker_agent::runtime::DockerRuntime;
use docker_agent::server::{AgentServer, RunningDockerAgent};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use test_support::docker::{self, SwarmGuard, TestContainer, TestService};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn start_agent(pki: &common::Pki, profile: Profile) -> RunningDockerAgent {
    let mut config = AgentConfig::new("lifecycle-acl", "127.0.0.1:0".parse().unwrap(), pki.server.clone());
    config.acl = AclConfig::profile(profile);
    config.shutdown_grace = Duration::from_secs(2);
    AgentServer::bind(config).await.expect("agent binds")
}

fn client_tls(pki: &common::Pki) -> Arc<rustls::ClientConfig> {
    common::client_config(&pki.client)
}

/// One request with a body over a new mTLS connection; the status and the body as JSON (or
/// `null` when empty).
async fn call(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), BoxError> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from(AGENT_SERVER_NAME)?, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header("host", "agent");
    let body = match body {
        Some(json) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(json.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let resp = send.send_request(req.body(body)?).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let json = if bytes.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&bytes)? };
    Ok((status, json))
}

fn message(json: &serde_json::Value) -> &str {
    json["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_cannot_reconfigure_a_container_whatever_the_api_version() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let pki = common::pki("lifecycle acl CA");
    let agent = start_agent(&pki, Profile::Lifecycle).await;
    let tls = client_tls(&pki);
    let addr = agent.local_addr();
    let container = TestContainer::builder("acl-start").start(false).create(&engine).await.unwrap();
    let id = container.id();
    let host_takeover = serde_json::json!({
        "Binds": ["/:/host"],
        "PidMode": "host",
        "NetworkMode": "host",
        "Privileged": true,
    });

    // API 1.23 and older still store a HostConfig sent with start: never forwarded.
    for version in ["v1.23", "v1.12", "v1.0", "v1.023", "v1"] {
        let path = format!("/{version}/containers/{id}/start");
        let (status, json) =
            call(addr, &tls, Method::POST, &path, Some(host_takeover.clone())).await.unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {json}");
        assert!(message(&json).contains("API version"), "{path}: {json}");
        // Without a body too: the version alone is refused.
        let (status, _) = call(addr, &tls, Method::POST, &path, None).await.unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} without a body");
    }
    // A current version with the same body: the rule admits no body.
    for path in [format!("/v1.41/containers/{id}/start"), format!("/containers/{id}/start")] {
        let (status, json) =
            call(addr, &tls, Method::POST, &path, Some(host_takeover.clone())).await.unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {json}");
        assert!(message(&json).contains("admits no request body"), "{path}: {json}");
    }
    // Restoring a checkpoint from a host directory: a parameter start does not allow.
    let path = format!("/containers/{id}/start?checkpoint=cp&checkpoint-dir=/etc");
    let (status, json) = call(addr, &tls, Method::POST, &path, None).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(message(&json).contains("checkpoint"), "{json}");

    let inspect = engine.inspect_container(id, None).await.unwrap();
    let host = inspect.host_config.unwrap();
    assert!(host.binds.unwrap_or_default().is_empty(), "binds were stored");
    assert_ne!(host.pid_mode.as_deref(), Some("host"));
    assert_ne!(host.network_mode.as_deref(), Some("host"));
    assert_ne!(host.privileged, Some(true));
    assert_eq!(inspect.state.unwrap().running, Some(false), "a denied start started the container");

    // The plain start, at the oldest forwarded version and unversioned, works.
    let (status, json) =
        call(addr, &tls, Method::POST, &format!("/v1.24/containers/{id}/start"), None).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
    assert_eq!(engine.inspect_container(id, None).await.unwrap().state.unwrap().running, Some(true));
    let (status, json) =
        call(addr, &tls, Method::POST, &format!("/containers/{id}/stop?t=1"), None).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
    let (status, json) =
        call(addr, &tls, Method::POST, &format!("/containers/{id}/start"), None).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
    let inspect = engine.inspect_container(id, None).await.unwrap();
    assert!(inspect.host_config.unwrap().binds.unwrap_or_default().is_empty());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_clients_see_no_environment_values() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let pki = common::pki("redaction CA");
    let agent = start_agent(&pki, Profile::ReadOnly).await;
    let tls = client_tls(&pki);
    let container = TestContainer::builder("acl-env")
        .env("DB_PASSWORD=hunter2-secret")
        .env("MODE=prod")
        .create(&engine)
        .await
        .unwrap();

    let raw = engine.inspect_container(container.id(), None).await.unwrap();
    let env = raw.config.unwrap().env.unwrap();
    assert!(env.contains(&"DB_PASSWORD=hunter2-secret".to_owned()), "the engine has it: {env:?}");

    for path in [
        format!("/containers/{}/json", container.id()),
        format!("/v1.41/containers/{}/json", container.name()),
    ] {
        let (status, json) = call(agent.local_addr(), &tls, Method::GET, &path, None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {json}");
        let text = json.to_string();
        assert!(!text.contains("hunter2"), "{path} leaked the secret: {text}");
        let env: Vec<&str> =
            json["Config"]["Env"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(env.contains(&"DB_PASSWORD=<redacted>"), "{env:?}");
        assert!(env.contains(&"MODE=<redacted>"), "{env:?}");
        // The rest of the answer is intact.
        assert_eq!(json["Id"], container.id());
    }
    agent.shutdown().await;

    // Turned off on purpose, the values pass.
    let mut config = AgentConfig::new("no-redaction", "127.0.0.1:0".parse().unwrap(), pki.server.clone());
    config.acl = AclConfig { redact_env: false, ..AclConfig::profile(Profile::ReadOnly) };
    let agent = AgentServer::bind(config).await.unwrap();
    let path = format!("/containers/{}/json", container.id());
    let (status, json) = call(agent.local_addr(), &tls, Method::GET, &path, None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(json.to_string().contains("hunter2-secret"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_update_can_change_the_replica_count_and_nothing_else() {
    let Some(engine) = docker::engine().await else { return };
    let swarm = SwarmGuard::ensure(&engine).await.expect("single-node swarm");
    docker::cleanup_leftovers(&engine).await;
    let pki = common::pki("scale CA");
    let agent = start_agent(&pki, Profile::Lifecycle).await;
    let tls = client_tls(&pki);
    let addr = agent.local_addr();
    let service = TestService::create(&engine, "acl-scale", 1).await.expect("service");
    let id = service.id().to_owned();

    let inspect = |engine: bollard::Docker, id: String| async move {
        let (status, json) = (StatusCode::OK, engine.inspect_service(&id, None).await.unwrap());
        assert_eq!(status, StatusCode::OK);
        json
    };
    let before = inspect(engine.clone(), id.clone()).await;
    let version = before.version.as_ref().unwrap().index.unwrap();

    // What the client sees through the agent is what it sends back (as the docker CLI does).
    let (status, seen) = call(addr, &tls, Method::GET, &format!("/services/{id}"), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{seen}");
    let spec = seen["Spec"].clone();

    // The attack: a new command and the host's root mounted, at the right version.
    let mut attack = spec.clone();
    attack["TaskTemplate"]["ContainerSpec"]["Args"] = serde_json::json!(["-c", "cat /host/etc/shadow"]);
    attack["TaskTemplate"]["ContainerSpec"]["Mounts"] =
        serde_json::json!([{ "Type": "bind", "Source": "/", "Target": "/host" }]);
    let update = format!("/v1.41/services/{id}/update?version={version}");
    let (status, json) = call(addr, &tls, Method::POST, &update, Some(attack.clone())).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(message(&json).contains("TaskTemplate.ContainerSpec"), "{json}");
    // The same with a replica change folded in: still denied.
    attack["Mode"]["Replicated"]["Replicas"] = serde_json::json!(0);
    let (status, _) = call(addr, &tls, Method::POST, &update, Some(attack)).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Rolling back to an earlier spec, and an unversioned old API: denied.
    let mut scale = spec.clone();
    scale["Mode"]["Replicated"]["Replicas"] = serde_json::json!(0);
    for path in [
        format!("/services/{id}/update?version={version}&rollback=previous"),
        format!("/v1.23/services/{id}/update?version={version}"),
    ] {
        let (status, json) = call(addr, &tls, Method::POST, &path, Some(scale.clone())).await.unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {json}");
    }
    let after_attacks = inspect(engine.clone(), id.clone()).await;
    assert_eq!(after_attacks.version, before.version, "a denied update changed the service");
    assert_eq!(after_attacks.spec, before.spec);

    // The scale itself goes through and changes the count alone.
    let (status, json) = call(addr, &tls, Method::POST, &update, Some(scale)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{json}");
    let scaled = inspect(engine.clone(), id.clone()).await;
    let (before_spec, scaled_spec) = (before.spec.clone().unwrap(), scaled.spec.clone().unwrap());
    assert_eq!(scaled_spec.mode.unwrap().replicated.unwrap().replicas, Some(0));
    assert_eq!(scaled_spec.task_template, before_spec.task_template);
    assert_eq!(scaled_spec.labels, before_spec.labels);
    assert_eq!(scaled_spec.endpoint_spec, before_spec.endpoint_spec);

    // A stale version is refused by the engine (nothing is forced through).
    let mut stale = spec.clone();
    stale["Mode"]["Replicated"]["Replicas"] = serde_json::json!(2);
    let (status, _) = call(addr, &tls, Method::POST, &update, Some(stale)).await.unwrap();
    assert!(!status.is_success(), "an update at an old version went through");

    // Our own controller (bollard through the agent) scales with the same rule.
    let client = AgentClient::new(&addr.to_string(), &pki.client).unwrap();
    let runtime = DockerRuntime::new(client.docker().clone());
    runtime.scale_service(service.name(), 1).await.expect("scale through the agent");
    let status = runtime.wait_service_converged(service.name(), Duration::from_secs(60)).await.unwrap();
    assert_eq!((status.desired, status.running), (1, 1));
    let final_spec = inspect(engine.clone(), id.clone()).await.spec.unwrap();
    assert_eq!(final_spec.task_template, before_spec.task_template);

    agent.shutdown().await;
    drop(service);
    drop(swarm);
}
