//! The loading page in a real browser: headless Chromium (Debian's `chromium`) opens a route
//! whose container is asleep, gets the loading page, follows the server-sent events, and ends
//! on the app's own content once the container is healthy. A screenshot of the end state is
//! kept in `CARGO_TARGET_TMPDIR`.
//!
//! Needs the Docker engine and `chromium`; without either it prints "skipping", unless
//! `CI=true`, where it fails.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docker_agent::runtime::DockerRuntime;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use idlewatch::{IdleConfig, IdleLayer, IdleLayerOptions, IdleWatcher, Workload};
use pool_api::Lifecycle;
use test_support::docker::{self, TestContainer};
use tokio::net::{TcpListener, TcpStream};
use tower::Layer;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Forwards a request to the container's httpd (one connection per request).
async fn forward(upstream: SocketAddr, request: Request<Incoming>) -> Result<Response<Incoming>, Infallible> {
    let stream = TcpStream::connect(upstream).await.expect("the container answers once ready");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    Ok(sender.send_request(request).await.expect("the container's answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_loading_page_then_the_app() {
    if !std::path::Path::new(CHROMIUM).exists() {
        assert!(
            !docker::ci_requires_engine(),
            "CI=true but {CHROMIUM} is missing (apt-get install chromium)"
        );
        eprintln!("skipping: no {CHROMIUM}");
        return;
    }
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let runtime = Arc::new(DockerRuntime::new(engine.clone()));
    // Asleep: created, never started. Its httpd comes up after 1.5 s, so the page is seen.
    let container = TestContainer::builder("idle-browser")
        .command(docker::delayed_httpd(Duration::from_millis(1500)))
        .start(false)
        .create(&engine)
        .await
        .expect("container");
    let mut config =
        IdleConfig::new(Workload::Container(container.name().to_owned()), Duration::from_secs(600));
    config.wake_timeout = Duration::from_secs(60);
    let watcher = IdleWatcher::new(config, runtime).unwrap();
    watcher.start().await.unwrap();

    // The container's address is known once it runs; the app resolves it per request.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = {
        let (engine, name, seen) = (engine.clone(), container.name().to_owned(), seen.clone());
        tower::service_fn(move |request: Request<Incoming>| {
            let (engine, name, seen) = (engine.clone(), name.clone(), seen.clone());
            async move {
                seen.lock().unwrap().push(format!("app {}", request.uri().path()));
                let inspect = engine.inspect_container(&name, None).await.unwrap();
                let networks = inspect.network_settings.and_then(|n| n.networks).unwrap_or_default();
                let ip =
                    networks.values().find_map(|n| n.ip_address.clone().filter(|ip| !ip.is_empty())).unwrap();
                forward(SocketAddr::new(ip.parse().unwrap(), docker::HTTP_PORT), request).await
            }
        })
    };
    let layered = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(app);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = layered.clone();
            let served = served.clone();
            tokio::spawn(async move {
                let logging = tower::service_fn(move |request: Request<Incoming>| {
                    served.lock().unwrap().push(format!("{} {}", request.method(), request.uri().path()));
                    let mut service = service.clone();
                    async move { tower::Service::call(&mut service, request).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(logging))
                    .await;
            });
        }
    });

    let url = format!("http://{address}/");
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::process::Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Let the page run (its EventSource, its reload) before the DOM is dumped.
        .args(["--virtual-time-budget=30000", "--dump-dom", &url])
        .kill_on_drop(true)
        .output();
    let dom = tokio::time::timeout(Duration::from_secs(90), dom).await.expect("chromium finished").unwrap();
    let text = String::from_utf8_lossy(&dom.stdout);
    let requests = seen.lock().unwrap().clone();
    assert!(
        text.contains("agentpool test container"),
        "the browser did not end on the app's content:\n{text}\nstderr: {}\nrequests: {requests:?}",
        String::from_utf8_lossy(&dom.stderr)
    );
    eprintln!("requests, in order: {requests:?}");
    let first_app = requests.iter().position(|r| r == "app /").expect("the app served /");
    assert!(
        requests[..first_app].iter().any(|r| r == "GET /")
            && requests.iter().any(|r| r == "GET /.idlewatch/events"),
        "the loading page and its event stream came first: {requests:?}"
    );

    // The end state, kept for a human to look at.
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idlewatch-loading-page-end.png");
    let shot = tokio::process::Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .args(["--window-size=800,600", &url])
        .kill_on_drop(true)
        .output();
    let shot = tokio::time::timeout(Duration::from_secs(60), shot).await.expect("screenshot taken").unwrap();
    assert!(screenshot.exists(), "no screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    eprintln!("screenshot: {}", screenshot.display());
    watcher.stop().await.unwrap();
}
