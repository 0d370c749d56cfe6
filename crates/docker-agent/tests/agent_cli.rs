//! The agent from the outside: the real `docker` CLI through an in-process agent, and the
//! `docker-agent` program itself (certificate commands, `serve` with overrides, SIGTERM).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
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
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use test_support::docker::{self, TestContainer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const DAY: Duration = Duration::from_secs(86_400);

/// The `docker` CLI, or `None` (skip) when it is missing outside CI.
async fn docker_cli() -> Option<()> {
    match Command::new("docker").arg("--version").output().await {
        Ok(out) if out.status.success() => Some(()),
        other => {
            let why = match other {
                Ok(out) => format!("`docker --version` failed: {}", String::from_utf8_lossy(&out.stderr)),
                Err(e) => format!("cannot run `docker`: {e}"),
            };
            if docker::ci_requires_engine() {
                panic!("the docker CLI is required in CI: {why}");
            }
            eprintln!("skipping: no docker CLI ({why})");
            None
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs `docker` against the agent with the client bundle in `cert_dir`.
async fn run_docker(addr: SocketAddr, cert_dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = docker_command(addr, cert_dir, args);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("docker {args:?} took over a minute"))
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

fn docker_command(addr: SocketAddr, cert_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args)
        .env("DOCKER_HOST", format!("tcp://{addr}"))
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", cert_dir)
        // A private CLI config dir: no contexts or credentials of this machine interfere.
        .env("DOCKER_CONFIG", cert_dir.join("docker-config"))
        .env_remove("DOCKER_CONTEXT")
        .kill_on_drop(true)
        .stdin(Stdio::null());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_cli_works_through_the_agent_under_the_lifecycle_profile() {
    let Some(engine) = docker::engine().await else { return };
    let Some(()) = docker_cli().await else { return };
    docker::cleanup_leftovers(&engine).await;

    let ca = CertificateAuthority::generate("cli test CA", DAY).unwrap();
    let server = ca.issue_server(&["127.0.0.1".to_owned()], DAY).unwrap();
    let client = ca.issue_client("docker-cli", DAY).unwrap();
    let bundle = tempfile::tempdir().unwrap();
    write(&bundle.path().join("ca.pem"), ca.cert_pem());
    write(&bundle.path().join("cert.pem"), &client.cert_pem);
    write(&bundle.path().join("key.pem"), &client.key_pem);
    let tls = TlsMaterial {
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
    };
    let mut config = AgentConfig::new("cli-agent", "127.0.0.1:0".parse().unwrap(), tls);
    config.acl = AclConfig::profile(Profile::Lifecycle);
    let agent = AgentServer::bind(config).await.unwrap();
    let addr = agent.local_addr();
    let dir = bundle.path();

    let container = TestContainer::builder("agent-cli").create(&engine).await.unwrap();

    // docker ps sees the container.
    let out = run_docker(
        addr,
        dir,
        &[
            "ps",
            "--no-trunc",
            "--filter",
            &format!("name={}", container.name()),
            "--format",
            "{{.ID}} {{.Names}}",
        ],
    )
    .await;
    assert!(out.status.success(), "docker ps failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{} {}", container.id(), container.name()));

    // docker exec and docker run are denied, and the CLI shows the agent's message.
    let out = run_docker(addr, dir, &["exec", container.name(), "/bin/busybox", "true"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("docker-agent: POST /v1.41/containers/{}/exec denied", container.name())),
        "{stderr}"
    );
    let image = docker::test_image(&engine).await;
    let out = run_docker(addr, dir, &["run", "--rm", &image]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("docker-agent: POST /v1.41/containers/create denied: not allowed"), "{stderr}");

    // docker cp and docker build are denied too.
    let out = run_docker(addr, dir, &["cp", &format!("{}:/www/index.html", container.name()), "-"]).await;
    assert!(!out.status.success(), "docker cp went through: {}", text(&out.stdout));
    let context = tempfile::tempdir().unwrap();
    write(&context.path().join("Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n");
    let out = run_docker(addr, dir, &["build", "-q", &context.path().display().to_string()]).await;
    assert!(!out.status.success(), "docker build went through: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    // The agent refuses before reading the build context: the CLI either reads the refusal or,
    // still uploading, finds the connection closed under it.
    assert!(
        stderr.contains("docker-agent:")
            || stderr.contains("403")
            || stderr.contains("broken pipe")
            || stderr.contains("connection reset"),
        "{stderr}"
    );

    // docker inspect works, with the environment values redacted.
    let out = run_docker(addr, dir, &["inspect", "--format", "{{json .Config.Env}}", container.name()]).await;
    assert!(out.status.success(), "docker inspect failed: {}", text(&out.stderr));
    let env: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!env.is_empty() && env.iter().all(|v| v.ends_with("=<redacted>")), "{env:?}");

    // docker events streams the stop event while it happens (`--since` covers a late connect).
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 1;
    let mut events = docker_command(
        addr,
        dir,
        &[
            "events",
            "--since",
            &since.to_string(),
            "--filter",
            &format!("container={}", container.id()),
            "--filter",
            "event=stop",
            "--format",
            "{{.Action}} {{.Actor.ID}}",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();

    // docker stop works, and the container really stops.
    let out = run_docker(addr, dir, &["stop", "-t", "1", container.name()]).await;
    assert!(out.status.success(), "docker stop failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), container.name());
    let state = engine.inspect_container(container.id(), None).await.unwrap().state.unwrap();
    assert_eq!(state.running, Some(false));

    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the stop event within 20 s")
        .unwrap()
        .expect("docker events printed a line");
    assert_eq!(line, format!("stop {}", container.id()));
    // The events command is still streaming (it only ends when killed).
    assert!(events.try_wait().unwrap().is_none(), "docker events ended on its own");
    events.kill().await.unwrap();

    agent.shutdown().await;
}

/// One request over mTLS to the agent at `addr` with the client bundle in `dir`.
async fn agent_get(
    addr: SocketAddr,
    dir: &Path,
    method: Method,
    path: &str,
) -> (StatusCode, serde_json::Value) {
    try_agent_get(addr, dir, method, path).await.unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// [`agent_get`], with the connection's failure (a refused certificate, say) as an error.
async fn try_agent_get(
    addr: SocketAddr,
    dir: &Path,
    method: Method,
    path: &str,
) -> Result<(StatusCode, serde_json::Value), Box<dyn std::error::Error + Send + Sync>> {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&read("ca.pem")).unwrap()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&read("cert.pem")).unwrap()],
                PrivateKeyDer::from_pem_slice(&read("key.pem")).unwrap(),
            )
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(AGENT_SERVER_NAME).unwrap(), tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_makes_certificates_and_serves_with_overrides() {
    let exe = env!("CARGO_BIN_EXE_docker-agent");
    let work = tempfile::tempdir().unwrap();
    let ca_dir = work.path().join("ca");
    let agent_dir = work.path().join("edge");
    let run = |args: Vec<String>| async move {
        let out = Command::new(exe).args(&args).output().await.unwrap();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let s = |x: &Path| x.display().to_string();

    let (ok, _, err) = run(vec![
        "certs".into(),
        "ca".into(),
        "--out".into(),
        s(&ca_dir),
        "--lifetime".into(),
        "30days".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
    // No silent overwrite of a CA.
    let (ok, _, err) = run(vec!["certs".into(), "ca".into(), "--out".into(), s(&ca_dir)]).await;
    assert!(!ok);
    assert!(err.contains("exists; use --force"), "{err}");
    // Bad input: a typed error, not a panic.
    let (ok, _, err) = run(vec![
        "certs".into(),
        "agent".into(),
        "--ca".into(),
        s(&ca_dir),
        "--host".into(),
        "bad host".into(),
        "--out".into(),
        s(&agent_dir),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("invalid host \"bad host\""), "{err}");

    let (ok, _, err) = run(vec![
        "certs".into(),
        "agent".into(),
        "--ca".into(),
        s(&ca_dir),
        "--host".into(),
        "127.0.0.1".into(),
        "--host".into(),
        "edge.example".into(),
        "--out".into(),
        s(&agent_dir),
        "--lifetime".into(),
        "10days".into(),
    ])
    .await;
    assert!(ok, "{err}");
    let client_dir = work.path().join("controller");
    let (ok, out, err) = run(vec![
        "certs".into(),
        "client".into(),
        "--ca".into(),
        s(&ca_dir),
        "--name".into(),
        "controller".into(),
        "--out".into(),
        s(&client_dir),
        "--lifetime".into(),
        "10days".into(),
    ])
    .await;
    assert!(ok, "{err}");
    let client_pem = std::fs::read_to_string(client_dir.join("cert.pem")).unwrap();
    let fingerprint = docker_agent::certs::fingerprint_pem(&client_pem).unwrap();
    assert!(out.contains(&fingerprint), "{out}");
    let (ok, out, err) =
        run(vec!["certs".into(), "fingerprint".into(), s(&client_dir.join("cert.pem"))]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), fingerprint);
    // The agent's bundle is the agent's alone: no client key or certificate in it.
    let mut names: Vec<String> = std::fs::read_dir(&agent_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.pem", "cert.pem", "key.pem"]);
    let agent_cert = std::fs::read_to_string(agent_dir.join("cert.pem")).unwrap();
    assert_ne!(agent_cert, client_pem);

    // --force replaces a file but never writes through a planted link.
    let planted = work.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    let victim = work.path().join("victim");
    write(&victim, "precious");
    std::os::unix::fs::symlink(&victim, planted.join("key.pem")).unwrap();
    let (ok, _, err) = run(vec![
        "certs".into(),
        "agent".into(),
        "--ca".into(),
        s(&ca_dir),
        "--out".into(),
        s(&planted),
        "--force".into(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(planted.join("key.pem")).unwrap().file_type().is_symlink());

    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    for dir in [agent_dir.clone(), client_dir.clone()] {
        // The CA certificate only, never its key.
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_pem);
        assert!(!dir.join("ca-key.pem").exists());
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        let not_after =
            docker_agent::certs::not_after(&std::fs::read_to_string(dir.join("cert.pem")).unwrap()).unwrap();
        let left = not_after.duration_since(std::time::SystemTime::now()).unwrap();
        assert!(left > 9 * DAY && left <= 10 * DAY, "{left:?}");
    }

    // serve: the file says read-only and another name and socket; flags and environment override.
    let engine = docker::engine().await;
    let socket = if engine.is_some() { "/var/run/docker.sock" } else { "/nonexistent/docker.sock" };
    // No `listen` in the file: the flag gives it.
    write(&agent_dir.join("revoked.txt"), "# nothing revoked yet\n");
    write(
        &agent_dir.join("agent.toml"),
        "name = \"from-file\"\ndocker_socket = \"/nonexistent/file.sock\"\n\
         shutdown_grace = \"2s\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         revoked = \"revoked.txt\"\n[acl]\nprofile = \"read-only\"\n",
    );
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--config",
            &s(&agent_dir.join("agent.toml")),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "from-flag",
        ])
        .args(["--docker-socket", socket])
        .env("DOCKER_AGENT_PROFILE", "lifecycle")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .expect("serve starts")
        .unwrap();
    let first = first.expect("serve prints its address");
    let addr: SocketAddr =
        first.strip_prefix("listening on ").unwrap_or_else(|| panic!("{first}")).parse().unwrap();
    let (status, health) = agent_get(addr, &client_dir, Method::GET, "/agent/health").await;
    if engine.is_some() {
        assert_eq!(status, StatusCode::OK, "{health}");
        // Ten days left, within the default 30-day warning window.
        assert_eq!(health["status"], "degraded", "{health}");
        let (status, info) = agent_get(addr, &client_dir, Method::GET, "/agent/info").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(info["name"], "from-flag");
        // Lifecycle from the environment: a start is forwarded (the engine says 404), not denied.
        let (status, body) =
            agent_get(addr, &client_dir, Method::POST, "/containers/agentpool-no-such/start").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    } else {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(health["engine"]["error"].as_str().unwrap().contains("/nonexistent/docker.sock"), "{health}");
        let (status, body) = agent_get(addr, &client_dir, Method::POST, "/containers/x/start").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    }
    let (status, _) = agent_get(addr, &client_dir, Method::POST, "/containers/create").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Revoking the client: its fingerprint in the file, SIGHUP, and it is refused.
    write(&agent_dir.join("revoked.txt"), &format!("# the controller's bundle leaked\n{fingerprint}\n"));
    let pid = child.id().expect("running").to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().await.unwrap().success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match try_agent_get(addr, &client_dir, Method::GET, "/_ping").await {
            Err(_) => break,
            Ok((status, body)) if status == StatusCode::FORBIDDEN => {
                assert!(body["message"].as_str().unwrap_or("").contains("revoked"), "{body}");
                break;
            }
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "the revoked client is still served");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // SIGTERM: a clean, quick exit.
    let pid = child.id().expect("running").to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(stderr.contains("request denied"), "{stderr}");
}

#[tokio::test]
async fn serve_reports_config_errors_by_field() {
    let exe = env!("CARGO_BIN_EXE_docker-agent");
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("agent.toml");
    write(
        &config,
        "name = \"x\"\nlisten = \"127.0.0.1:0\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
    );
    let out = Command::new(exe).args(["serve", "--config"]).arg(&config).output().await.unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("`tls.ca_cert`") && err.contains("ca.pem"), "{err}");
    let out = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--profile", "admin"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("admin"));
}
