//! A real Prometheus server scrapes the gateway's admin listener (also behind its bearer token,
//! with a scrape job that has the token file and one that has not), and `promtool` accepts what
//! it serves. Needs Debian's `prometheus` package (`.ci/run` installs it): under `CI=true` a
//! missing one fails the test; elsewhere the test says why and skips.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

mod common;
use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

async fn get(addr: &str, target: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

/// The path of `tool`, or `None` after saying why the test skips (a failure under `CI=true`).
fn tool(tool: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join(tool)).find(|p| p.is_file()))
        .unwrap_or_default();
    let missing = found.is_none().then(|| format!("no {tool} on PATH (apt-get install prometheus)"));
    test_support::present_or_skip(missing);
    found
}

#[tokio::test]
async fn prometheus_scrapes_the_gateway_and_promtool_accepts_its_metrics() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else { return };
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut gateway = Command::new(BIN)
        .args(["--listen", &listen, "--admin", &admin])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    common::wait_ready(&admin).await;
    for _ in 0..3 {
        assert_eq!(get(&listen, "/hello").await.unwrap().0, 200);
    }

    // promtool lints what /metrics serves.
    let (status, metrics) = get(&admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(metrics.as_bytes()).await.unwrap();
    let out = check.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it, and the counter comes back through its HTTP API.
    let dir = tempfile::tempdir().unwrap();
    let jobs = format!("  - job_name: gateway\n    static_configs:\n      - targets: ['{admin}']\n");
    let (web, _prometheus) = start_prometheus(&prometheus, dir.path(), &jobs);
    let value = query(&web, "gateway_requests_total{route=\"demo\",status=\"200\"}").await;
    assert_eq!(value, "3", "Prometheus read the gateway's counter");
    // SIGTERM, not SIGKILL: the demo removes its temporary directory (the agents' sockets) as
    // it stops.
    let pid = gateway.id().expect("running");
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let stopped = tokio::time::timeout(Duration::from_secs(30), gateway.wait()).await.expect("stops");
    assert!(stopped.unwrap().success());
}

#[tokio::test]
async fn prometheus_scrapes_an_admin_behind_a_token_with_its_credentials_file() {
    let Some(prometheus) = tool("prometheus") else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "scrape-token-0123456789\n").unwrap();
    let app = common::ok_upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n\
             [admin]\nbind = \"{admin}\"\ntoken_file = {token:?}\n\n\
             [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[routes]]\nname = \"app\"\nupstream = \"app\"\n"
        ),
    )
    .unwrap();
    let _gateway = common::run_file(&path, &admin).await;
    for _ in 0..3 {
        assert_eq!(get(&listen, "/").await.unwrap().0, 200);
    }
    // Two jobs scrape the same admin: one with the token file, one without.
    let jobs = format!(
        "  - job_name: with-token\n    authorization:\n      credentials_file: {token:?}\n    static_configs:\n      - targets: ['{admin}']\n\
         \x20 - job_name: anonymous\n    static_configs:\n      - targets: ['{admin}']\n"
    );
    let (web, _prometheus) = start_prometheus(&prometheus, dir.path(), &jobs);
    let value = query(&web, "gateway_requests_total{route=\"app\",status=\"200\",job=\"with-token\"}").await;
    assert_eq!(value, "3", "Prometheus read the counter with the token");
    // Prometheus marks the anonymous job's target down (its scrape got 401).
    assert_eq!(query(&web, "up{job=\"anonymous\"}").await, "0");
    assert_eq!(query(&web, "up{job=\"with-token\"}").await, "1");
}

/// Starts Prometheus on a free port with `jobs` (YAML items of `scrape_configs`, scraped every
/// second), its files in `dir`; returns its `host:port` and what kills it when dropped.
fn start_prometheus(prometheus: &std::path::Path, dir: &std::path::Path, jobs: &str) -> (String, KillOnDrop) {
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let server = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (web, KillOnDrop(server))
}

/// Kills its child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the first series `promql` returns from Prometheus at `web`, polled until there
/// is one (at most 60 s).
async fn query(web: &str, promql: &str) -> String {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let target = format!("/api/v1/query?query={encoded}");
    let mut last = String::new();
    for _ in 0..120 {
        if let Some((200, body)) = get(web, &target).await {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(v) = value["data"]["result"][0]["value"][1].as_str() {
                return v.to_owned();
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("Prometheus returned nothing for {promql} within 60 s; last answer: {last}");
}
