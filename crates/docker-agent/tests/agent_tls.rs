//! The agent server in process: real mutual TLS (certificates from rcgen), the ACL on the wire,
//! the agent's own endpoints, streaming and upgrades through to the real Docker engine, and
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use docker_agent::AGENT_SERVER_NAME;
use docker_agent::acl::{AclConfig, Profile, Rule};
use docker_agent::certs::{CertificateAuthority, IssuedCert};
use docker_agent::config::{AgentConfig, TlsMaterial};
use docker_agent::revocation::{RevocationList, fingerprint};
use docker_agent::server::{AgentServer, RunningDockerAgent, ServerError};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use test_support::docker::{self, TestContainer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const DAY: Duration = Duration::from_secs(86_400);
/// A Unix socket path where no engine listens.
const NO_ENGINE: &str = "/nonexistent/docker-agent-test.sock";

struct Pki {
    ca: CertificateAuthority,
    server: IssuedCert,
    client: IssuedCert,
}

impl Pki {
    fn new(server_lifetime: Duration) -> Self {
        let ca = CertificateAuthority::generate("agent test CA", 10 * DAY).unwrap();
        let server = ca.issue_server(&["127.0.0.1".to_owned()], server_lifetime).unwrap();
        let client = ca.issue_client("agent-test-client", DAY).unwrap();
        Self { ca, server, client }
    }

    fn material(&self) -> TlsMaterial {
        TlsMaterial {
            ca_cert_pem: self.ca.cert_pem().to_owned(),
            cert_pem: self.server.cert_pem.clone(),
            key_pem: self.server.key_pem.clone(),
        }
    }

    /// A client configuration trusting this CA, presenting `client` (if any).
    fn client_config(&self, client: Option<&IssuedCert>, tls12_only: bool) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    fn good_client(&self) -> Arc<rustls::ClientConfig> {
        self.client_config(Some(&self.client), false)
    }
}

async fn start_agent(
    pki: &Pki,
    socket: &str,
    acl: AclConfig,
    expiry_warning: Duration,
) -> RunningDockerAgent {
    let mut config = AgentConfig::new("test-agent", "127.0.0.1:0".parse().unwrap(), pki.material());
    config.docker_socket = socket.into();
    config.acl = acl;
    config.expiry_warning = expiry_warning;
    config.shutdown_grace = Duration::from_secs(10);
    AgentServer::bind(config).await.expect("agent binds")
}

fn lifecycle() -> AclConfig {
    AclConfig::profile(Profile::Lifecycle)
}

/// One mTLS HTTP/1.1 connection to the agent (server name: the fixed agent name).
async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Empty<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(AGENT_SERVER_NAME).unwrap();
    let stream = TlsConnector::from(tls).connect(name, tcp).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(send)
}

fn request(method: Method, path: &str) -> Request<Empty<Bytes>> {
    Request::builder().method(method).uri(path).header("host", "agent").body(Empty::new()).unwrap()
}

async fn send(
    send: &mut SendRequest<Empty<Bytes>>,
    method: Method,
    path: &str,
) -> Result<http::Response<Incoming>, BoxError> {
    send.ready().await?;
    Ok(send.send_request(request(method, path)).await?)
}

/// Sends one request on a new connection and collects the body.
async fn call(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), BoxError> {
    let mut conn = connect(addr, tls).await?;
    let resp = send(&mut conn, method, path).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused_at_the_handshake() {
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, NO_ENGINE, lifecycle(), DAY).await;
    let addr = agent.local_addr();

    // TLS 1.2: the server asks for the certificate before finishing, so the handshake fails.
    let no_cert_12 = pki.client_config(None, true);
    assert!(connect(addr, no_cert_12).await.is_err(), "TLS 1.2 without a client certificate");
    // TLS 1.3: the client's side may finish first; the server's alert then ends the first request.
    let no_cert_13 = pki.client_config(None, false);
    assert!(
        call(addr, no_cert_13, Method::GET, "/agent/info").await.is_err(),
        "TLS 1.3 without a client certificate"
    );

    // A certificate from another CA.
    let other = Pki::new(DAY);
    let foreign = pki.client_config(Some(&other.client), false);
    assert!(call(addr, foreign, Method::GET, "/agent/info").await.is_err(), "client cert from another CA");
    let foreign12 = pki.client_config(Some(&other.client), true);
    assert!(connect(addr, foreign12).await.is_err(), "client cert from another CA (TLS 1.2)");

    // A server certificate presented as a client certificate (no clientAuth usage).
    let wrong_usage = pki.client_config(Some(&pki.server), true);
    assert!(connect(addr, wrong_usage).await.is_err(), "server cert used as a client cert");

    // The right certificate gets through; with no engine behind the agent it is unhealthy.
    let (status, body) = call(addr, pki.good_client(), Method::GET, "/agent/health").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let health = json(&body);
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["engine"]["reachable"], false);
    assert!(health["engine"]["error"].as_str().unwrap().contains(NO_ENGINE), "{health}");
    // And Docker requests are answered 502 naming the problem.
    let (status, body) = call(addr, pki.good_client(), Method::GET, "/_ping").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(json(&body)["message"].as_str().unwrap().contains("cannot be reached"));
    agent.shutdown().await;
}

#[tokio::test]
async fn bind_errors_name_the_address_and_bad_tls_names_the_field() {
    let pki = Pki::new(DAY);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = AgentConfig::new("x", addr, pki.material());
    let err = AgentServer::bind(config).await.unwrap_err();
    assert!(matches!(err, ServerError::Bind { addr: a, .. } if a == addr));
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let mut material = pki.material();
    material.key_pem = Pki::new(DAY).server.key_pem;
    let err =
        AgentServer::bind(AgentConfig::new("x", "127.0.0.1:0".parse().unwrap(), material)).await.unwrap_err();
    assert!(err.to_string().contains("tls.key"), "{err}");
}

#[tokio::test]
async fn path_tricks_are_denied_with_a_reason() {
    // Denied before anything is forwarded: no engine needed.
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, NO_ENGINE, lifecycle(), DAY).await;
    let mut conn = connect(agent.local_addr(), pki.good_client()).await.unwrap();
    for (method, path, reason) in [
        (Method::POST, "/v1.41/../containers/create", "'.' or '..' segment"),
        (Method::POST, "/containers/%2e%2e/create", "'.' or '..' segment"),
        (Method::GET, "//containers/json", "empty segment"),
        (Method::POST, "/containers/x%2fy/start", "encoded '/'"),
        (Method::POST, "/v1.41/containers/create", "not allowed"),
        (Method::POST, "/containers/abc/exec", "not allowed"),
        (Method::GET, "/v1.41/agent/info", "not allowed"),
    ] {
        // All on one keep-alive connection: a denial does not close it.
        let resp = send(&mut conn, method.clone(), path).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        let body = json(&resp.into_body().collect().await.unwrap().to_bytes());
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("docker-agent: {method} {path} denied: ")), "{message}");
        assert!(message.contains(reason), "{message}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_info_health_and_allowed_requests_reach_the_real_engine() {
    let Some(engine) = docker::engine().await else { return };
    let pki = Pki::new(365 * DAY);
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), 30 * DAY).await;
    let addr = agent.local_addr();
    let tls = pki.good_client();

    let version = engine.version().await.unwrap();
    let (status, body) = call(addr, tls.clone(), Method::GET, "/agent/info").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let info = json(&body);
    assert_eq!(info["name"], "test-agent");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["runtime"], "docker");
    assert_eq!(info["engine_version"].as_str(), version.version.as_deref());
    assert_eq!(info["api_version"].as_str(), version.api_version.as_deref());

    let (status, body) = call(addr, tls.clone(), Method::GET, "/agent/health").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let health = json(&body);
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["engine"]["reachable"], true);
    assert!(health["engine"]["error"].is_null());
    assert_eq!(health["certificate"]["expiring"], false);
    let expires_in = health["certificate"]["expires_in_secs"].as_i64().unwrap();
    assert!((364 * 86_400..=365 * 86_400).contains(&expires_in), "{expires_in}");
    let not_after = pki.server.not_after.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(health["certificate"]["not_after"].as_u64(), Some(not_after));
    let (status, _) = call(addr, tls.clone(), Method::POST, "/agent/health").await.unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // A versioned list through the agent, seeing a container the harness made.
    let container = TestContainer::builder("agent-tls-list").create(&engine).await.unwrap();
    let filter = format!("{{\"name\":[\"{}\"]}}", container.name());
    let path = format!(
        "/v1.41/containers/json?filters={}",
        percent_encoding::utf8_percent_encode(&filter, percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, body) = call(addr, tls.clone(), Method::GET, &path).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let list = json(&body);
    let ids: Vec<&str> = list.as_array().unwrap().iter().filter_map(|c| c["Id"].as_str()).collect();
    assert_eq!(ids, [container.id()]);
    let (status, _) = call(addr, tls.clone(), Method::HEAD, "/_ping").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // An engine error status passes through unchanged.
    let (status, _) =
        call(addr, tls, Method::GET, "/containers/agentpool-does-not-exist/json").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_expiry_makes_the_agent_degraded() {
    let Some(_engine) = docker::engine().await else { return };
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), 30 * DAY).await;
    let (status, body) =
        call(agent.local_addr(), pki.good_client(), Method::GET, "/agent/health").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let health = json(&body);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["certificate"]["expiring"], true);
    assert!(health["certificate"]["expires_in_secs"].as_i64().unwrap() <= 86_400);
    agent.shutdown().await;

    // The same certificate with a one-hour warning window is fine.
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), Duration::from_secs(3600)).await;
    let (_, body) = call(agent.local_addr(), pki.good_client(), Method::GET, "/agent/health").await.unwrap();
    assert_eq!(json(&body)["status"], "healthy");
    agent.shutdown().await;
}

/// Reads frames until one contains `needle`; returns false if the body ends first.
async fn read_until(body: &mut Incoming, needle: &str, within: Duration) -> bool {
    let mut seen = String::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("body frame");
            if let Some(data) = frame.data_ref() {
                seen.push_str(&String::from_utf8_lossy(data));
                if seen.contains(needle) {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("no {needle:?} within {within:?}"))
}

fn events_path(label_value: &str) -> String {
    let filters = format!("{{\"type\":[\"container\"],\"label\":[\"agentpool.agent-test={label_value}\"]}}");
    format!(
        "/v1.41/events?filters={}",
        percent_encoding::utf8_percent_encode(&filters, percent_encoding::NON_ALPHANUMERIC)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_arrives_incrementally_and_is_cut_on_shutdown() {
    let Some(engine) = docker::engine().await else { return };
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), DAY).await;
    let marker = docker::unique_name("events");
    let mut conn = connect(agent.local_addr(), pki.good_client()).await.unwrap();
    let resp = send(&mut conn, Method::GET, &events_path(&marker)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();

    // The stream is open (headers arrived) before the container exists.
    let container = TestContainer::builder("agent-tls-events")
        .label("agentpool.agent-test", &marker)
        .create(&engine)
        .await
        .unwrap();
    let needle = format!("\"status\":\"start\",\"id\":\"{}\"", container.id());
    assert!(
        read_until(&mut body, &needle, Duration::from_secs(20)).await,
        "stream ended before the start event"
    );
    // Still open: the event came while the response goes on.
    assert!(!body.is_end_stream());

    // Shutdown cuts the open stream at once instead of waiting out the 10 s grace period.
    let started = tokio::time::Instant::now();
    agent.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the stream ends after shutdown");
    assert!(rest.is_err(), "a cut stream ends with an error, not a clean end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish() {
    let Some(engine) = docker::engine().await else { return };
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), DAY).await;
    // Without docker-init busybox ignores SIGTERM: `stop?t=2` takes the full two seconds.
    let container = TestContainer::builder("agent-tls-stop").init(false).create(&engine).await.unwrap();
    let mut conn = connect(agent.local_addr(), pki.good_client()).await.unwrap();
    let path = format!("/containers/{}/stop?t=2", container.id());
    // Watch the engine for the SIGTERM that `stop` sends: then the request is surely in flight.
    let filters =
        std::collections::HashMap::from([("container", vec![container.id()]), ("event", vec!["kill"])]);
    let options = bollard::query_parameters::EventsOptionsBuilder::default().filters(&filters).build();
    let mut kills = engine.events(Some(options));
    let stop = tokio::spawn(async move { send(&mut conn, Method::POST, &path).await.map(|r| r.status()) });
    tokio::time::timeout(Duration::from_secs(20), futures_util::StreamExt::next(&mut kills))
        .await
        .expect("the engine starts stopping the container")
        .expect("an event")
        .expect("a kill event");
    let started = tokio::time::Instant::now();
    agent.shutdown().await;
    let took = started.elapsed();
    // Shutdown waited for the answer (about two seconds away when it began).
    assert!(took >= Duration::from_millis(1000), "shutdown did not wait: {took:?}");
    let status = stop.await.unwrap().expect("the stop request completes");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let inspect = engine.inspect_container(container.id(), None).await.unwrap();
    assert_eq!(inspect.state.unwrap().running, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_allowed_by_a_custom_rule_is_carried_through() {
    let Some(engine) = docker::engine().await else { return };
    let pki = Pki::new(DAY);
    let script = format!("{0} sleep 1; echo hello-from-attach; exec {0} sleep 30", docker::BUSYBOX_PATH);
    let container = TestContainer::builder("agent-tls-attach")
        .command(vec![docker::BUSYBOX_PATH.into(), "sh".into(), "-c".into(), script])
        .health(docker::HealthCheck::Disabled)
        .create(&engine)
        .await
        .unwrap();
    let attach = format!("/containers/{}/attach?stream=1&stdout=1&logs=1", container.id());

    // The built-in profile denies attach.
    let agent = start_agent(&pki, "/var/run/docker.sock", lifecycle(), DAY).await;
    let (status, _) = call(agent.local_addr(), pki.good_client(), Method::POST, &attach).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    agent.shutdown().await;

    // A plain rule does not allow the upgrade; the rule must say so.
    let acl = AclConfig {
        rules: vec!["POST /containers/{id}/attach".parse::<Rule>().unwrap().with_upgrade(true)],
        ..AclConfig::profile(Profile::Lifecycle)
    };
    let agent = start_agent(&pki, "/var/run/docker.sock", acl, DAY).await;
    let mut conn = connect(agent.local_addr(), pki.good_client()).await.unwrap();
    conn.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::POST)
        .uri(&attach)
        .header("host", "agent")
        .header("connection", "Upgrade")
        .header("upgrade", "tcp")
        .body(Empty::new())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "tcp");
    let upgraded = hyper::upgrade::on(resp).await.expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = io.read(&mut buf).await.expect("read attach stream");
            assert!(n > 0, "attach stream ended early: {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("hello-from-attach") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("container output through the upgrade");
    let _ = io.shutdown().await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_is_streamed_to_the_engine() {
    let Some(engine) = docker::engine().await else { return };
    let pki = Pki::new(DAY);
    let acl = AclConfig {
        rules: vec!["POST /containers/{id}/update".parse().unwrap()],
        ..AclConfig::profile(Profile::Lifecycle)
    };
    let agent = start_agent(&pki, "/var/run/docker.sock", acl, DAY).await;
    let container = TestContainer::builder("agent-tls-body").create(&engine).await.unwrap();

    let tcp = TcpStream::connect(agent.local_addr()).await.unwrap();
    let tls = TlsConnector::from(pki.good_client())
        .connect(ServerName::try_from(AGENT_SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(driver);
    // A body of unknown length (sent chunked), written in two parts with a pause between.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(2);
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    }));
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/containers/{}/update", container.id()))
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let response = tokio::spawn(conn.send_request(req));
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"RestartPolicy\":")))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        b"{\"Name\":\"on-failure\",\"MaximumRetryCount\":3}}",
    ))))
    .await
    .unwrap();
    drop(tx);
    let resp = response.await.unwrap().unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let policy = engine
        .inspect_container(container.id(), None)
        .await
        .unwrap()
        .host_config
        .unwrap()
        .restart_policy
        .unwrap();
    assert_eq!(policy.maximum_retry_count, Some(3));
    agent.shutdown().await;
}

/// A leaf signed by `ca` with the given extended key usages (none: no extension at all).
fn leaf_with_usages(ca: &CertificateAuthority, usages: Vec<rcgen::ExtendedKeyUsagePurpose>) -> IssuedCert {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(ca.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "odd-client");
    params.extended_key_usages = usages;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.signed_by(&key, &issuer).unwrap();
    IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: std::time::SystemTime::now() + DAY,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_must_be_client_leaves_of_the_ca_and_not_revoked() {
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, NO_ENGINE, lifecycle(), DAY).await;
    let addr = agent.local_addr();
    let ping = |tls| call(addr, tls, Method::GET, "/agent/health");

    // The agent's own server certificate (serverAuth) is no client certificate.
    assert!(ping(pki.client_config(Some(&pki.server), false)).await.is_err());
    // A leaf without any extended key usage: webpki alone would take it; the agent does not.
    let bare = leaf_with_usages(&pki.ca, Vec::new());
    assert!(ping(pki.client_config(Some(&bare), false)).await.is_err());
    assert!(ping(pki.client_config(Some(&bare), true)).await.is_err());
    // With clientAuth it is fine.
    let good = leaf_with_usages(&pki.ca, vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]);
    assert_eq!(ping(pki.client_config(Some(&good), false)).await.unwrap().0, StatusCode::SERVICE_UNAVAILABLE);

    // Revocation: an open connection's next request is refused, and so is a new handshake;
    // other clients are untouched.
    let mut open = connect(addr, pki.good_client()).await.unwrap();
    assert_eq!(
        send(&mut open, Method::GET, "/agent/health").await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let der = CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes()).unwrap();
    agent.set_revoked(RevocationList::new([fingerprint(&der)]));
    let resp = send(&mut open, Method::GET, "/agent/health").await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("revoked"));
    assert!(ping(pki.good_client()).await.is_err(), "a revoked certificate completed a new request");
    assert!(ping(pki.client_config(Some(&pki.client), true)).await.is_err());
    assert_eq!(ping(pki.client_config(Some(&good), false)).await.unwrap().0, StatusCode::SERVICE_UNAVAILABLE);
    // Lifting the revocation lets it back in.
    agent.set_revoked(RevocationList::default());
    assert_eq!(ping(pki.good_client()).await.unwrap().0, StatusCode::SERVICE_UNAVAILABLE);
    agent.shutdown().await;
}

/// The controller's material for `client`, trusting `pki`'s CA.
fn agent_tls(pki: &Pki, client: &IssuedCert) -> docker_agent::client::AgentTls {
    docker_agent::client::AgentTls {
        ca_cert_pem: pki.ca.cert_pem().to_owned(),
        client_cert_pem: client.cert_pem.clone(),
        client_key_pem: client.key_pem.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_client_takes_renewed_material_on_its_next_request() {
    use docker_agent::client::{AgentClient, ClientError};
    let pki = Pki::new(DAY);
    let agent = start_agent(&pki, NO_ENGINE, lifecycle(), DAY).await;
    let address = agent.local_addr().to_string();

    // A certificate of another CA: refused at the handshake.
    let other = CertificateAuthority::generate("other CA", DAY).unwrap();
    let foreign = other.issue_client("controller", DAY).unwrap();
    let client = AgentClient::new(&address, &agent_tls(&pki, &foreign)).unwrap();
    let docker = client.docker();
    let err = client.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err:?}");

    // Material that does not load changes nothing.
    let mut broken = agent_tls(&pki, &pki.client);
    broken.client_key_pem = "not a key".into();
    assert!(client.set_tls(&broken).is_err());
    assert!(matches!(client.health().await.unwrap_err(), ClientError::Handshake { .. }));

    // The renewed material: the client and the Docker handle made before both use it.
    client.set_tls(&agent_tls(&pki, &pki.client)).unwrap();
    assert_eq!(client.health().await.unwrap().status, docker_agent::client::AgentHealthStatus::Unhealthy);
    // Through the agent to its (absent) engine: the agent's own answer, so the handshake passed.
    let err = docker.version().await.unwrap_err();
    assert!(
        matches!(
            &err,
            docker_agent::bollard::errors::Error::DockerResponseServerError { status_code: 502, .. }
        ),
        "{err:?}"
    );

    // Rotation away from a revoked certificate: the pooled connection opened with the old one
    // is not used again; the next request dials with the new one.
    let der = CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes()).unwrap();
    agent.set_revoked(RevocationList::new([fingerprint(&der)]));
    let renewed = pki.ca.issue_client("controller", DAY).unwrap();
    client.set_tls(&agent_tls(&pki, &renewed)).unwrap();
    assert_eq!(client.health().await.unwrap().status, docker_agent::client::AgentHealthStatus::Unhealthy);
    // The old material's idle connection closes once nothing uses it: one connection is left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.open_connections() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "{} connections open", agent.open_connections());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.shutdown().await;
}
