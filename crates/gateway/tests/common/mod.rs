//! What the gateway's tests share: free ports and waiting for a started gateway to be ready.
#![allow(dead_code)] // each test file uses part of it

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free loopback port for a listener the test starts later (the gateway's, or a container's
/// published port): one below the ephemeral range, which no outgoing connection of a parallel
/// test can take meanwhile (`127.0.0.1:0` could hand out a port that one then takes; a
/// container's start once failed on that).
pub fn free_port() -> u16 {
    test_support::docker::publishable_port()
}

/// True if the admin listener at `admin` answers `/readyz` with 200.
pub async fn is_ready(admin: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(admin).await else { return false };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    raw.starts_with(b"HTTP/1.1 200")
}

/// Waits until the gateway's admin listener says ready; panics after 30 s.
pub async fn wait_ready(admin: &str) {
    for _ in 0..300 {
        if is_ready(admin).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway was not ready within 30 s");
}

/// The gateway binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// A gateway process started on free loopback ports; killed when dropped.
pub struct Gateway {
    /// The listener's `host:port`.
    pub listen: String,
    /// The admin listener's `host:port`.
    pub admin: String,
    _child: tokio::process::Child,
}

/// Starts the gateway with `rest` (upstreams, agents, routes… in TOML) after a listener and an
/// admin section on free ports, the file written into `dir`; returns once it is ready.
pub async fn start_gateway(dir: &std::path::Path, rest: &str) -> Gateway {
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n{rest}\n"
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let child = run_file(&path, &admin).await;
    Gateway { listen, admin, _child: child }
}

/// Starts the gateway on the configuration file at `path` (output discarded; killed when the
/// child is dropped) and returns once its admin listener at `admin` says ready.
pub async fn run_file(path: &std::path::Path, admin: &str) -> tokio::process::Child {
    let child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(admin).await;
    child
}

/// Runs `--check` on `config` (written into `dir`); returns (success, stderr).
pub async fn check(dir: &std::path::Path, config: &str) -> (bool, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, config).unwrap();
    let out =
        tokio::process::Command::new(BIN).arg("--check").arg("--config").arg(&path).output().await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An agent served by transport-uds's agent side in this process; stopped when dropped.
pub struct UdsAgent {
    /// `unix:/path`, for the gateway's configuration.
    pub endpoint: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `handler` on a Unix socket named `name` in `dir`.
pub async fn uds_agent(dir: &std::path::Path, name: &str, handler: impl pool_api::AgentHandler) -> UdsAgent {
    let socket = dir.join(format!("{name}.sock"));
    let server =
        transport_uds::UdsServer::bind(&socket, transport_uds::UdsServerConfig::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    UdsAgent { endpoint: format!("unix:{}", socket.display()), _stop: stop }
}

/// A raw HTTP/1.1 answer: status, head (lower-cased), body (de-chunked), and whether the body
/// arrived whole (its terminating chunk or all of its `content-length`).
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    pub complete: bool,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw request bytes on a new connection and reads the answer until the connection
/// closes (at most 20 s).
pub async fn exchange(addr: &str, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw)).await;
    parse_reply(&raw)
}

/// Parses one HTTP/1.1 response.
pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let rest = &raw[split..];
    if !head.contains("transfer-encoding: chunked") {
        let complete = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .is_none_or(|n| n == rest.len());
        return Reply { status, head, body: rest.to_vec(), complete };
    }
    let (mut body, mut at, mut complete) = (Vec::new(), 0, false);
    while let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[at..at + eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size else { break };
        at += eol + 2;
        if size == 0 {
            complete = rest[at..].starts_with(b"\r\n");
            break;
        }
        if rest.len() < at + size + 2 {
            break;
        }
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
    Reply { status, head, body, complete }
}

/// The value of a metric line starting with `prefix` in the admin's `/metrics`, if any.
pub async fn metric(admin: &str, prefix: &str) -> Option<f64> {
    let reply = exchange(
        admin,
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    reply.text().lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

/// Polls `what` every 50 ms until it holds; panics after 20 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 20 s");
}

/// An upstream that answers every request `200 ok` and closes.
pub async fn ok_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                    .await;
            });
        }
    });
    addr
}

/// A plain GET with `Connection: close`.
pub fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

/// `POST /admin/reload` on the admin listener at `admin`.
pub async fn reload(admin: &str) -> Reply {
    exchange(
        admin,
        format!(
            "POST /admin/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
}

/// The admin's `/status`, parsed.
pub async fn status(admin: &str) -> serde_json::Value {
    let reply = exchange(
        admin,
        format!("GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    serde_json::from_slice(&reply.body).unwrap()
}
