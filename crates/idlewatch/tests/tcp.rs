//! The TCP helper over real loopback sockets and the scripted engine.

use std::sync::Arc;
use std::time::Duration;

use idlewatch::{IdleConfig, IdleWatcher, Workload, tcp};
use pool_api::Lifecycle;
use test_support::{FakeHealth, FakeOp, FakeRuntime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    address
}

#[tokio::test]
async fn a_connection_is_held_until_ready_then_spliced_and_counts_while_open() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("tcp-app", FakeHealth::HealthyAfter(Duration::from_millis(300)));
    let mut config = IdleConfig::new(Workload::Container("tcp-app".into()), Duration::from_millis(200));
    config.wake_timeout = Duration::from_secs(5);
    let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
    watcher.start().await.unwrap();
    let upstream = echo_server().await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_address = front.local_addr().unwrap();
    let serving = watcher.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = front.accept().await {
            let (w, upstream) = (serving.clone(), upstream.clone());
            tokio::spawn(async move { tcp::splice(&w, inbound, &upstream).await });
        }
    });

    let mut client = TcpStream::connect(front_address).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut answer = [0u8; 4];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"ping", "answered once the workload was ready");
    assert_eq!(engine.calls(FakeOp::Start), 1);
    // Quiet for five idle time-outs, but open: still counted, still up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(watcher.active(), 1);
    assert!(watcher.is_ready());
    client.write_all(b"pong").await.unwrap();
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"pong");
    drop(client);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(watcher.active(), 0);
    assert!(!watcher.is_ready(), "stopped once the stream closed and the idle time passed");
    assert_eq!(engine.calls(FakeOp::Stop), 1);
}

#[tokio::test]
async fn a_failed_wake_closes_the_connection_with_the_error() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("tcp-sick", FakeHealth::NeverHealthy(Duration::from_millis(10)));
    let mut config = IdleConfig::new(Workload::Container("tcp-sick".into()), Duration::from_secs(60));
    config.wake_timeout = Duration::from_millis(300);
    let watcher = IdleWatcher::new(config, engine).unwrap();
    watcher.start().await.unwrap();
    let (inbound, _client) = tokio::io::duplex(64);
    let error = tcp::splice(&watcher, inbound, "127.0.0.1:9").await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert!(error.to_string().contains("not ready within 300ms"), "{error}");
    assert_eq!(watcher.active(), 0);
}

/// A server that answers `503` to its first `failures` requests, then `200`.
async fn flaky_http(failures: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let status = if n < failures { "503 Service Unavailable" } else { "200 OK" };
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (address, served)
}

#[tokio::test]
async fn http_readiness_waits_for_the_expected_status() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("http-app", FakeHealth::NoCheck);
    let (address, served) = flaky_http(3).await;
    let mut config = IdleConfig::new(Workload::Container("http-app".into()), Duration::from_secs(60));
    config.readiness.check =
        idlewatch::ReadinessCheck::Http { url: format!("http://{address}/healthz"), expected_status: 200 };
    config.validate().unwrap();
    let watcher = IdleWatcher::new(config, engine).unwrap();
    watcher.start().await.unwrap();
    let begun = tokio::time::Instant::now();
    watcher.wake().await.unwrap();
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 4, "three 503s, then the 200");
    // Polled from 50 ms, doubling: 50 + 100 + 200 ms of back-off.
    assert!(begun.elapsed() >= Duration::from_millis(350), "{:?}", begun.elapsed());
    assert!(begun.elapsed() < Duration::from_secs(2), "{:?}", begun.elapsed());
}
