//! A Docker container upstream that sleeps while idle and is woken by a request through the
//! gateway: the real engine, the busybox test image (`FROM scratch`, exec-form health check).
//! Under `CI=true` a missing engine fails the test; elsewhere it skips with the reason.

use std::time::Duration;

use test_support::docker::{self, TestContainer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::free_port;

async fn get(addr: &str, target: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(addr).await else { return (0, String::new()) };
    let _ = stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

async fn running(engine: &docker_agent::bollard::Docker, name: &str) -> bool {
    let inspect = engine.inspect_container(name, None).await.unwrap();
    inspect.state.and_then(|s| s.running).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_container_is_woken_by_a_request_and_put_back_to_sleep_when_idle() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let port = free_port();
    let container = TestContainer::builder("gateway-wake")
        .publish(port)
        .start(false)
        .create(&engine)
        .await
        .expect("container");
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
        urls = ["http://127.0.0.1:{port}"]

        [[workloads]]
        name = "app"
        loading_page = false

        [workloads.watch]
        workload = {{ container = "{name}" }}
        idle_timeout = "2s"
        wake_timeout = "60s"

        [[routes]]
        name = "app"
        upstream = "app"
        workload = "app"
        "#,
        name = container.name(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let _gateway = common::run_file(&path, &admin).await;
    assert!(!running(&engine, container.name()).await, "asleep before the first request");

    // The first request wakes it (held until healthy), and is answered by it.
    let (status, text) = get(&listen, "/").await;
    assert_eq!(status, 200, "{text}");
    assert!(running(&engine, container.name()).await);
    let (_, status_json) = get(&admin, "/status").await;
    assert!(status_json.contains("\"state\": \"Ready\""), "{status_json}");

    // Idle for longer than the time-out: stopped.
    let mut asleep = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !running(&engine, container.name()).await {
            asleep = true;
            break;
        }
    }
    assert!(asleep, "the idle container was not stopped within 30 s");

    // And woken again by the next request.
    let (status, text) = get(&listen, "/index.html").await;
    assert_eq!(status, 200, "{text}");
    assert!(running(&engine, container.name()).await);
}
