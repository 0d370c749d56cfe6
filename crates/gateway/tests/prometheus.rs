//! A real Prometheus server scrapes the gateway's admin listener, and `promtool` accepts what
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
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required in CI (apt-get install prometheus)"
        );
        eprintln!("skipping: no {tool} on PATH (apt-get install prometheus)");
    }
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
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['{admin}']\n"),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let _server = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let query = "/api/v1/query?query=gateway_requests_total%7Broute%3D%22demo%22%2Cstatus%3D%22200%22%7D";
    let mut last = String::new();
    for _ in 0..120 {
        if let Some((200, body)) = get(&web, query).await {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(v) = value["data"]["result"][0]["value"][1].as_str() {
                assert_eq!(v, "3", "Prometheus read the gateway's counter: {body}");
                let _ = gateway.kill().await;
                return;
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("Prometheus never returned the counter within 60 s; last answer: {last}");
}
