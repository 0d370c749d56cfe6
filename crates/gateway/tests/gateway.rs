//! The gateway binary, run as a user runs it: real processes, real sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

mod common;
use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// One HTTP/1.1 request over a fresh connection; returns (status, lower-cased head, body).
async fn get(addr: &str, target: &str) -> (u16, String, String) {
    get_as(addr, target, None).await
}

/// [`get`], with an `Authorization` header when given one.
async fn get_as(addr: &str, target: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Waits until the admin listener says ready (bounded: a gateway that never gets ready fails).
async fn wait_ready(admin: &str, child: &mut Child) {
    for _ in 0..300 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the gateway exited early: {status}");
        }
        if common::is_ready(admin).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gateway was not ready within 30 s");
}

/// Starts the gateway on the configuration file at `path` (stdout piped for
/// [`stop_gateway`]) and waits until `admin` says ready.
async fn run_config(path: &std::path::Path, admin: &str) -> Child {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(admin, &mut child).await;
    child
}

async fn stop_gateway(mut child: Child) -> (std::process::ExitStatus, String) {
    let pid = child.id().expect("running");
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops").unwrap();
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out).await.unwrap();
    }
    (status, out)
}

#[tokio::test]
async fn the_demo_serves_allows_blocks_reports_and_stops_cleanly() {
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut child = Command::new(BIN)
        .args(["--listen", &listen, "--admin", &admin])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(&admin, &mut child).await;

    let (status, head, body) = get(&listen, "/hello?x=1").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("x-waf: checked"), "the agent's response header is applied: {head}");
    assert_eq!(body, "hello from the demo upstream: GET /hello?x=1\n");

    let (status, _, body) = get(&listen, "/admin/users").await;
    assert_eq!(status, 403);
    assert_eq!(body, "blocked by the demo WAF: admin is off limits\n");
    assert_eq!(get(&listen, "/q?s=%3Cscript%3E").await.0, 403);

    let (status, _, metrics) = get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("gateway_requests_total{route=\"demo\",status=\"200\"} 1"), "{metrics}");
    assert!(metrics.contains("gateway_requests_total{route=\"demo\",status=\"403\"} 2"), "{metrics}");
    assert!(metrics.contains("agentpool_requests_total{agent=\"waf\"} 3"), "{metrics}");
    // The same WAF over gRPC is asked second: only about the request the first one allowed.
    assert!(metrics.contains("agentpool_requests_total{agent=\"waf-grpc\"} 1"), "{metrics}");

    let (status, _, json) = get(&admin, "/status").await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["agents"][0]["id"], "waf");
    assert_eq!(status["agents"][0]["healthy"], true);
    assert_eq!(status["agents"][0]["in_flight"], 0);
    assert_eq!(status["agents"][1]["id"], "waf-grpc");
    assert_eq!(status["agents"][1]["healthy"], true);
    assert_eq!(status["routes"][0]["agents"][1], "waf-grpc");
    // The agents' connections, UDS and gRPC, run on the worker threads (one per core by
    // default), spread over them in turn.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for agent in 0..2 {
        let workers: Vec<u64> = status["agents"][agent]["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["worker"].as_u64().expect("an agent's connection runs on a worker"))
            .collect();
        assert!(!workers.is_empty() && workers.iter().all(|&w| (w as usize) < cores), "{workers:?}");
    }

    let (exit, out) = stop_gateway(child).await;
    assert!(exit.success(), "a clean drain exits 0: {exit}\n{out}");
    assert!(out.contains("gateway: stopped; 0 connection(s) drained, 0 cut off"), "{out}");
}

/// A tiny upstream: answers every request with 200 and `upstream ok`.
async fn upstream() -> SocketAddr {
    upstream_saying("upstream ok\n").await
}

/// A tiny upstream answering every request with 200 and `body`.
async fn upstream_saying(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut reader = BufReader::new(&mut stream);
                let mut line = String::new();
                // Read the head, then answer.
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_agent_that_is_down_fails_closed_or_open_per_route() {
    let app = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        r#"
        [[listeners]]
        name = "main"
        bind = "{listen}"

        [admin]
        bind = "{admin}"

        [[upstreams]]
        name = "app"
        urls = ["http://{app}"]

        [[agents]]
        name = "waf"
        endpoints = ["unix:{socket}"]

        [[routes]]
        name = "strict"
        path_prefix = "/strict"
        upstream = "app"
        agents = ["waf"]
        failure_mode = "closed"

        [[routes]]
        name = "lenient"
        upstream = "app"
        agents = ["waf"]
        failure_mode = "open"

        [pool]
        connect_timeout = "200ms"
        "#,
        socket = dir.path().join("nobody-listens.sock").display(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let child = run_config(&path, &admin).await;

    let (status, head, _) = get(&listen, "/strict/thing").await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-agentpool-agent-status: waf: unavailable, failing closed"), "{head}");
    let (status, head, body) = get(&listen, "/other").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, "upstream ok\n");
    assert!(head.contains("x-agentpool-agent-status: waf: unavailable, failing open"), "{head}");

    let (_, _, metrics) = get(&admin, "/metrics").await;
    assert!(metrics.contains("gateway_agent_errors_total{route=\"strict\",agent=\"waf\"} 1"), "{metrics}");
    assert!(metrics.contains("gateway_agent_errors_total{route=\"lenient\",agent=\"waf\"} 1"), "{metrics}");
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
}

#[tokio::test]
async fn check_reports_every_problem_and_accepts_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listeners]]\nname = \"m\"\nbind = \"nowhere\"\n\n[[routes]]\nname = \"r\"\nupstream = \"missing\"\nagents = [\"ghost\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("--check").arg("--config").arg(&bad).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "listeners[0].bind: \"nowhere\" is not host:port",
        "routes[0] (r).upstream: no upstream named \"missing\"",
        "routes[0] (r).agents[0]: no agent named \"ghost\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("bad.toml"), "the file is named: {err}");

    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml");
    let out = Command::new(BIN).args(["--check", "--config", sample]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[tokio::test]
async fn a_port_already_taken_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN).args(["--listen", &listen, "--admin", &admin]).stderr(Stdio::piped()).output(),
    )
    .await
    .expect("exits")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&listen) && err.to_ascii_lowercase().contains("in use"), "{err}");
}

/// POSTs to the admin listener; returns (status, body).
async fn post(addr: &str, target: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("POST {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), body.to_owned())
}

fn simple_config(listen: &str, admin: &str, upstream: SocketAddr) -> String {
    format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{upstream}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    )
}

#[tokio::test]
async fn a_reload_under_load_drops_no_request_and_a_bad_file_changes_nothing() {
    let (one, two) = (upstream_saying("one\n").await, upstream_saying("two\n").await);
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("gateway.toml");
    // Three worker threads serve the listener's connections (more than this machine's cores).
    let config = |upstream| format!("workers = 3\n{}", simple_config(&listen, &admin, upstream));
    std::fs::write(&path, config(one)).unwrap();
    let child = run_config(&path, &admin).await;
    assert_eq!(get(&listen, "/").await.2, "one\n");

    // Load: requests one after another, on two tasks, while the configuration changes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (listen, stop) = (listen.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _, body) = get(&listen, "/").await;
                    if status == 200 && (body == "one\n" || body == "two\n") {
                        ok += 1;
                    } else {
                        failed.push((status, body));
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&path, config(two)).unwrap();
    let (status, body) = post(&admin, "/admin/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("reloaded"), "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&listen, "/").await.2, "two\n", "new requests use the new routes");

    std::fs::write(&path, "[[routes]]\nname = \"broken\"\nupstream = \"nowhere\"\n").unwrap();
    let (status, body) = post(&admin, "/admin/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("no upstream named \"nowhere\""), "{body}");
    // The number of worker threads is fixed while running.
    std::fs::write(&path, config(one).replace("workers = 3", "workers = 1")).unwrap();
    let (status, body) = post(&admin, "/admin/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("workers and worker_spin cannot change while running"), "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for task in load {
        let (ok, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "requests failed during the reloads: {failed:?}");
        served += ok;
    }
    assert!(served > 0);
    assert_eq!(get(&listen, "/").await.2, "two\n", "the running configuration stayed");
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
}

/// Sends raw bytes and returns the status line's code (0 if the connection closed silently).
async fn raw(addr: &str, bytes: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// An upstream that accepts and closes at once, one that reads and never answers, and one that
/// sends a response head and closes before the body it announced.
async fn bad_upstreams() -> (SocketAddr, SocketAddr, SocketAddr) {
    let resets = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dies = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (resets.local_addr().unwrap(), silent.local_addr().unwrap(), dies.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            if let Ok((mut stream, _)) = dies.accept().await {
                let mut buf = vec![0; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n").await;
            }
        }
    });
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = resets.accept().await {
                drop(stream);
            }
        }
    });
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        }
    });
    addrs
}

/// An upstream that answers with a head for 100 bytes, sends 10 and then holds the connection
/// open without a word.
async fn stalling_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
                held.push(stream);
            }
        }
    });
    addr
}

#[tokio::test]
async fn bad_requests_and_bad_upstreams_get_the_right_status_and_leak_nothing() {
    let (resets, silent, dies) = bad_upstreams().await;
    let stalls = stalling_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        r#"
        [[listeners]]
        name = "main"
        bind = "{listen}"

        [admin]
        bind = "{admin}"

        [[upstreams]]
        name = "resets"
        urls = ["http://{resets}"]

        [[upstreams]]
        name = "silent"
        urls = ["http://{silent}"]
        timeout = "300ms"

        [[routes]]
        name = "resets"
        path_prefix = "/resets"
        upstream = "resets"

        [[routes]]
        name = "silent"
        path_prefix = "/silent"
        upstream = "silent"

        [[upstreams]]
        name = "dies"
        urls = ["http://{dies}"]

        [[routes]]
        name = "dies"
        path_prefix = "/dies"
        upstream = "dies"

        [[upstreams]]
        name = "stalls"
        urls = ["http://{stalls}"]
        read_timeout = "300ms"

        [[routes]]
        name = "stalls"
        path_prefix = "/stalls"
        upstream = "stalls"
        "#
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let child = run_config(&path, &admin).await;

    assert_eq!(raw(&listen, b"GARBAGE\r\n\r\n").await, 400, "a malformed request line");
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(200 * 1024));
    assert_eq!(raw(&listen, huge.as_bytes()).await, 431, "oversized headers");
    assert_eq!(get(&listen, "/nothing-here").await.0, 404, "no route");
    assert_eq!(get(&listen, "/resets/x").await.0, 502, "an upstream that resets");
    assert_eq!(get(&listen, "/silent/x").await.0, 504, "an upstream that never answers");
    // Sends its head and 10 of 100 bytes, then nothing: the response is cut off at the
    // upstream's read time-out, and the client sees its connection end short of the body.
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    stream.write_all(format!("GET /stalls/x HTTP/1.1\r\nHost: {listen}\r\n\r\n").as_bytes()).await.unwrap();
    let mut back = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut back)).await;
    assert!(closed.is_ok(), "the gateway ends a stalled response itself (read time-out 300 ms)");
    let reply = common::parse_reply(&back);
    assert_eq!(
        (reply.status, reply.complete, reply.body.len()),
        (200, false, 10),
        "an upstream that stalls mid-body"
    );
    for _ in 0..20 {
        // The head reaches the client (a body it can tell is cut short), not a silent close.
        let request = format!("GET /dies/x HTTP/1.1\r\nHost: {listen}\r\n\r\n");
        assert_eq!(raw(&listen, request.as_bytes()).await, 200, "an upstream that dies mid-body");
    }

    let (_, _, metrics) = get(&admin, "/metrics").await;
    for line in [
        "gateway_requests_total{route=\"resets\",status=\"502\"} 1",
        "gateway_requests_total{route=\"silent\",status=\"504\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let (exit, out) = stop_gateway(child).await;
    assert!(exit.success(), "nothing left in flight to cut off: {out}");
}

/// An upstream that accepts any upgrade (101) and then echoes the bytes it receives.
async fn upgrade_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let mut stream = reader.into_inner();
                let head =
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upgrade_is_proxied_and_bytes_flow_both_ways() {
    let app = upgrade_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, simple_config(&listen, &admin, app)).unwrap();
    let child = run_config(&path, &admin).await;

    let mut stream = TcpStream::connect(&listen).await.unwrap();
    let request = "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut line = String::new();
    while reader.read_line(&mut line).await.unwrap() > 0 && line != "\r\n" {
        line.clear();
    }
    let mut stream = reader.into_inner();
    for message in ["hello", "and again"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0; message.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await.unwrap().unwrap();
        assert_eq!(echoed, message.as_bytes());
    }
    drop(stream);
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
}

#[tokio::test]
async fn a_dead_upstream_url_is_retried_around_and_left_out() {
    let alive = upstream().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    // `workers = 0`: connections served on the main runtime, without worker threads.
    let config = format!(
        "workers = 0\n[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{dead}\", \"http://{alive}\"]\nmax_failures = 2\neject_for = \"1m\"\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let child = run_config(&path, &admin).await;
    for i in 0..10 {
        let (status, head, body) = get(&listen, &format!("/r{i}")).await;
        assert_eq!((status, body.as_str()), (200, "upstream ok\n"), "request {i}: {head}");
    }
    let (_, _, metrics) = get(&admin, "/metrics").await;
    assert!(metrics.contains("gateway_upstream_ejections_total{upstream=\"app\"} 1"), "{metrics}");
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
}

#[tokio::test]
async fn json_logs_carry_one_access_line_per_request() {
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut child = Command::new(BIN)
        .args(["--listen", &listen, "--admin", &admin, "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_ready(&admin, &mut child).await;
    assert_eq!(get(&listen, "/logged").await.0, 200);
    let mut stderr = child.stderr.take().unwrap();
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).await.unwrap();
    let access: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v["target"] == "access")
        .collect();
    assert_eq!(access.len(), 1, "{logs}");
    assert_eq!(access[0]["fields"]["path"], "/logged");
    assert_eq!(access[0]["fields"]["status"], 200);
}

/// An upstream whose answer's head comes at once and whose 2-byte body comes after `hold`:
/// the connection stays busy meanwhile.
async fn slow_body_upstream(hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n").await;
                    tokio::time::sleep(hold).await;
                    let _ = stream.write_all(b"ok").await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_request_that_finds_every_upstream_connection_busy_gets_503_and_the_url_stays_in() {
    let app = slow_body_upstream(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    // One connection allowed; a single failure would leave the URL out.
    let config = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\ntimeout = \"300ms\"\nmax_connections = 1\nmax_idle = 1\n\
         max_failures = 1\neject_for = \"1m\"\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let child = run_config(&path, &admin).await;
    // The first request holds the only connection while its body trickles in: its head is
    // read before the second request is sent.
    let mut first = TcpStream::connect(&listen).await.unwrap();
    first
        .write_all(format!("GET /first HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = BufReader::new(first);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let (status, head, body) = get(&listen, "/second").await;
    assert_eq!(status, 503, "{head}\n{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("busy"), "{body}");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).await.unwrap();
    assert!(rest.ends_with("\r\n\r\nok"), "{rest:?}");
    // The gateway's own cap is not the upstream's failure: the URL was not left out.
    let (_, _, metrics) = get(&admin, "/metrics").await;
    assert!(metrics.contains(&format!("gateway_upstream_busy_total{{url=\"{app}\"}} 1")), "{metrics}");
    assert!(!metrics.contains("gateway_upstream_ejections_total"), "{metrics}");
    let (exit, _) = stop_gateway(child).await;
    assert!(exit.success());
}

#[tokio::test]
async fn with_a_token_file_the_admin_answers_only_its_bearer_and_a_reload_rotates_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "first-token-0123456789\n").unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n\
             [admin]\nbind = \"{admin}\"\ntoken_file = {token_file:?}\n\n\
             [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ),
    )
    .unwrap();
    let _child = run_config(&path, &admin).await;
    let ask = |method: &str, target: &str, authorization: Option<&str>| {
        let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        format!(
            "{method} {target} HTTP/1.1\r\nHost: {admin}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // The probes need no token.
    for target in ["/healthz", "/readyz"] {
        assert_eq!(raw(&admin, ask("GET", target, None).as_bytes()).await, 200, "{target}");
    }
    // The rest: 401 without the token, with a wrong one, with two Authorization headers, or
    // with another scheme; answered with it.
    for (method, target) in [("GET", "/status"), ("GET", "/metrics"), ("POST", "/admin/reload")] {
        for wrong in [
            None,
            Some("Bearer first-token-012345678"),
            Some("Basic first-token-0123456789"),
            Some("Bearer first-token-0123456789\r\nAuthorization: Bearer x"),
        ] {
            assert_eq!(raw(&admin, ask(method, target, wrong).as_bytes()).await, 401, "{target} {wrong:?}");
        }
    }
    let (status, head, body) = get_as(&admin, "/status", None).await;
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer realm=\"admin\""), "{head}");
    assert!(!body.contains("first-token"), "the refusal does not echo the token: {body}");
    assert_eq!(
        raw(&admin, ask("GET", "/status", Some("Bearer first-token-0123456789")).as_bytes()).await,
        200
    );

    // A reload reads the file again: the new token takes over at once, the old one is refused.
    std::fs::write(&token_file, "second-token-0123456789").unwrap();
    let reload = ask("POST", "/admin/reload", Some("Bearer first-token-0123456789"));
    assert_eq!(raw(&admin, reload.as_bytes()).await, 200);
    assert_eq!(
        raw(&admin, ask("GET", "/metrics", Some("Bearer first-token-0123456789")).as_bytes()).await,
        401
    );
    assert_eq!(
        raw(&admin, ask("GET", "/metrics", Some("Bearer second-token-0123456789")).as_bytes()).await,
        200
    );
    // A token file gone bad refuses the reload, and the running token stays.
    std::fs::write(&token_file, "short").unwrap();
    let reload = ask("POST", "/admin/reload", Some("Bearer second-token-0123456789"));
    assert_eq!(raw(&admin, reload.as_bytes()).await, 422);
    assert_eq!(
        raw(&admin, ask("GET", "/status", Some("Bearer second-token-0123456789")).as_bytes()).await,
        200
    );
    // The refusals were counted.
    let (_, _, metrics) = get_as(&admin, "/metrics", Some("Bearer second-token-0123456789")).await;
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_admin_unauthorized_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gateway_admin_unauthorized_total");
    assert!(refused >= 14.0, "{refused}");
}

#[tokio::test]
async fn the_admin_refuses_what_a_web_page_could_send() {
    let dir = tempfile::tempdir().unwrap();
    let app = upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n\
             [admin]\nbind = \"{admin}\"\nallowed_hosts = [\"gateway-admin.internal\"]\n\n\
             [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ),
    )
    .unwrap();
    let _child = run_config(&path, &admin).await;
    let port = admin.rsplit(':').next().unwrap();
    let ask = |host: &str, extra: &str, method: &str, target: &str| {
        format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // Addressed by IP, by localhost, by a configured name: answered.
    for host in [admin.clone(), format!("localhost:{port}"), format!("GATEWAY-ADMIN.internal:{port}")] {
        assert_eq!(raw(&admin, ask(&host, "", "GET", "/status").as_bytes()).await, 200, "{host}");
    }
    // By any other name (a DNS-rebound page's own): refused, whatever the path.
    for target in ["/status", "/metrics", "/admin/reload"] {
        let method = if target == "/admin/reload" { "POST" } else { "GET" };
        let request = ask(&format!("evil.example:{port}"), "", method, target);
        assert_eq!(raw(&admin, request.as_bytes()).await, 403, "{target}");
    }
    assert_eq!(raw(&admin, ask("not a host", "", "GET", "/status").as_bytes()).await, 403);
    // A reload posted from a web page (it has an Origin) is refused; from curl it is taken.
    let from_page = ask(&admin, "Origin: http://evil.example\r\n", "POST", "/admin/reload");
    assert_eq!(raw(&admin, from_page.as_bytes()).await, 403);
    assert_eq!(raw(&admin, ask(&admin, "", "POST", "/admin/reload").as_bytes()).await, 200);
}
