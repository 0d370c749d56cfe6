//! The tower layer on a paused clock, over test-support's scripted engine.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use idlewatch::{IdleConfig, IdleLayer, IdleLayerOptions, IdleWatcher, Workload};
use pool_api::Lifecycle;
use test_support::{FakeHealth, FakeOp, FakeRuntime};
use tower::{Layer, ServiceExt, service_fn};

async fn app(request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from(format!("app {}", request.uri().path())))))
}

async fn setup(check: FakeHealth) -> (Arc<FakeRuntime>, IdleWatcher) {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", check);
    let mut config = IdleConfig::new(Workload::Container("web".into()), Duration::from_secs(60));
    config.wake_timeout = Duration::from_secs(10);
    let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
    watcher.start().await.unwrap();
    (engine, watcher)
}

fn get(path: &str, accept: &str) -> Request<()> {
    Request::builder().uri(path).header(header::ACCEPT, accept).body(()).unwrap()
}

async fn text<B: http_body::Body<Data = Bytes>>(body: B) -> String
where
    B::Error: std::fmt::Debug,
{
    String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn held_requests_wake_once_and_reach_the_app() {
    let (engine, watcher) = setup(FakeHealth::HealthyAfter(Duration::from_secs(2))).await;
    let service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(service_fn(app));
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let request = Request::builder().method(Method::POST).uri(format!("/api/{i}")).body(()).unwrap();
            tokio::spawn(service.clone().oneshot(request))
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response.into_body()).await, format!("app /api/{i}"));
    }
    assert_eq!(engine.calls(FakeOp::Start), 1);
}

#[tokio::test(start_paused = true)]
async fn the_ready_path_passes_through_and_counts_until_the_body_is_done() {
    let (_engine, watcher) = setup(FakeHealth::NoCheck).await;
    watcher.wake().await.unwrap();
    let service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(service_fn(app));
    let response = service.clone().oneshot(get("/.idlewatch/status", "*/*")).await.unwrap();
    assert_eq!(watcher.active(), 1, "the response body is still open");
    assert_eq!(
        text(response.into_body()).await,
        "app /.idlewatch/status",
        "once ready the app owns every path"
    );
    assert_eq!(watcher.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn html_gets_a_loading_page_at_once_and_the_wake_goes_on() {
    let (engine, watcher) = setup(FakeHealth::HealthyAfter(Duration::from_secs(2))).await;
    let service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(service_fn(app));
    let begun = tokio::time::Instant::now();
    let response =
        service.clone().oneshot(get("/wiki/page", "text/html,application/xhtml+xml")).await.unwrap();
    assert_eq!(begun.elapsed(), Duration::ZERO, "at once");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    let page = text(response.into_body()).await;
    assert!(page.contains(r#"new EventSource("/.idlewatch/events")"#), "{page}");
    assert!(page.contains(r#"<meta http-equiv="refresh" content="3">"#), "{page}");
    assert!(page.contains("location.reload()"));
    // The events stream: the current state, then ready, then the end.
    let events = service.clone().oneshot(get("/.idlewatch/events", "text/event-stream")).await.unwrap();
    assert_eq!(events.headers()[header::CONTENT_TYPE], "text/event-stream");
    let stream = text(events.into_body()).await;
    assert!(stream.starts_with("event: state\ndata: "), "{stream}");
    assert!(
        stream.ends_with("event: ready\ndata: {\"error\":null,\"state\":\"ready\",\"workload\":\"web\"}\n\n"),
        "{stream}"
    );
    assert_eq!(begun.elapsed(), Duration::from_secs(2), "pushed, not polled");
    assert_eq!(engine.calls(FakeOp::Start), 1);
    let after = service.oneshot(get("/wiki/page", "text/html")).await.unwrap();
    assert_eq!(text(after.into_body()).await, "app /wiki/page");
}

#[tokio::test(start_paused = true)]
async fn a_failed_wake_is_a_503_problem_with_retry_after_within_the_wake_timeout() {
    let (_engine, watcher) = setup(FakeHealth::NeverHealthy(Duration::from_secs(1))).await;
    let service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(service_fn(app));
    let begun = tokio::time::Instant::now();
    let response = service.clone().oneshot(get("/api", "application/json")).await.unwrap();
    assert_eq!(begun.elapsed(), Duration::from_secs(10));
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "5");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/problem+json");
    let body: serde_json::Value = serde_json::from_str(&text(response.into_body()).await).unwrap();
    assert_eq!(body["status"], 503);
    assert!(body["detail"].as_str().unwrap().contains("not ready within 10s"), "{body}");
    // The driver's own deadline fires at the same instant: let it run.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let status = service.oneshot(get("/.idlewatch/status", "*/*")).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&text(status.into_body()).await).unwrap();
    assert_eq!(status["state"], "error");
}

#[tokio::test(start_paused = true)]
async fn only_wake_paths_wake_and_the_loading_page_can_be_off() {
    let (engine, watcher) = setup(FakeHealth::NoCheck).await;
    let options = IdleLayerOptions {
        wake_paths: Some(vec!["/start".into()]),
        loading_page: false,
        ..IdleLayerOptions::default()
    };
    let service = IdleLayer::new(watcher.clone(), options).layer(service_fn(app));
    let refused = service.clone().oneshot(get("/favicon.ico", "text/html")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(engine.calls(FakeOp::Start), 0, "a bot's favicon fetch wakes nothing");
    let held = service.oneshot(get("/start/here", "text/html")).await.unwrap();
    assert_eq!(text(held.into_body()).await, "app /start/here", "held, not a loading page");
    assert_eq!(engine.calls(FakeOp::Start), 1);
}

#[tokio::test(start_paused = true)]
async fn an_upgraded_connection_keeps_the_workload_up_through_its_extension() {
    let (engine, watcher) = setup(FakeHealth::NoCheck).await;
    watcher.wake().await.unwrap();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    // The app answers 101 and keeps the upgraded connection's activity, as a websocket splice would.
    let upgrade_app = service_fn(move |request: Request<()>| {
        let held_tx = held_tx.clone();
        async move {
            let activity = request.extensions().get::<idlewatch::UpgradeActivity>().expect("upgrade handle");
            held_tx.send(activity.hold()).unwrap();
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            Ok::<_, Infallible>(response)
        }
    });
    let service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(upgrade_app);
    let request = Request::builder()
        .uri("/socket")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    drop(response);
    let websocket = held_rx.recv().await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(watcher.is_ready(), "an open websocket keeps it up");
    drop(websocket);
    tokio::time::sleep(Duration::from_secs(61)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!watcher.is_ready());
    assert_eq!(engine.calls(FakeOp::Stop), 1);
}

#[tokio::test(start_paused = true)]
async fn bots_wake_nothing_and_names_can_be_hidden() {
    let (engine, watcher) = setup(FakeHealth::NoCheck).await;
    let options = IdleLayerOptions {
        ignore_user_agents: vec!["UptimeBot".into()],
        show_name: false,
        ..IdleLayerOptions::default()
    };
    let service = IdleLayer::new(watcher.clone(), options).layer(service_fn(app));
    let bot = Request::builder()
        .uri("/")
        .header(header::USER_AGENT, "Mozilla/5.0 (uptimebot/2.1)")
        .body(())
        .unwrap();
    let refused = service.clone().oneshot(bot).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = text(refused.into_body()).await;
    assert!(!body.contains("web"), "the name is hidden: {body}");
    assert_eq!(engine.calls(FakeOp::Start), 0);
    let status = service.clone().oneshot(get("/.idlewatch/status", "*/*")).await.unwrap();
    assert_eq!(text(status.into_body()).await, r#"{"error":null,"state":"napping","workload":null}"#);
    let page = service.clone().oneshot(get("/", "text/html")).await.unwrap();
    let page = text(page.into_body()).await;
    assert!(page.contains("Starting the service") && !page.contains("web"), "{page}");
    watcher.wake().await.unwrap();
    assert_eq!(engine.calls(FakeOp::Start), 1, "a person's visit woke it");
}
