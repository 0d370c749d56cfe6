//! `DockerRuntime` against the real engine, locally and through a real agent; and the Docker
//! test harness itself.

use std::time::Duration;

use bollard::models::HealthStatusEnum;
use common::Pki;
use test_support::docker::{self, HealthCheck, TestContainer};

mod common;

/// Polls `inspect` until the container's health is `want` or the deadline passes.
async fn wait_health(engine: &bollard::Docker, name: &str, want: HealthStatusEnum, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let inspect = engine.inspect_container(name, None).await.expect("inspect");
        let health = inspect.state.and_then(|s| s.health).and_then(|h| h.status);
        if health == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: health {health:?}, wanted {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_builds_the_image_and_containers_become_healthy_and_are_removed() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let image = docker::test_image(&engine).await;
    assert!(image.starts_with("sha256:"), "{image}");
    // Cached: the same id again, no rebuild.
    assert_eq!(docker::test_image(&engine).await, image);

    let container =
        TestContainer::builder("harness").label("role", "harness-test").create(&engine).await.unwrap();
    let inspect = engine.inspect_container(container.name(), None).await.unwrap();
    assert_eq!(inspect.id.as_deref(), Some(container.id()));
    assert_eq!(inspect.host_config.and_then(|h| h.init), Some(true));
    let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get(docker::TEST_LABEL).map(String::as_str), Some(docker::run_id()));
    assert_eq!(labels.get("role").map(String::as_str), Some("harness-test"));
    wait_health(&engine, container.name(), HealthStatusEnum::HEALTHY, Duration::from_secs(20)).await;

    let failing = TestContainer::builder("harness-unhealthy")
        .health(HealthCheck::NeverPasses)
        .create(&engine)
        .await
        .unwrap();
    wait_health(&engine, failing.name(), HealthStatusEnum::UNHEALTHY, Duration::from_secs(20)).await;

    let name = container.name().to_owned();
    drop(container);
    let gone = engine.inspect_container(&name, None).await;
    assert!(
        matches!(gone, Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })),
        "container still there after drop: {gone:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// DockerRuntime, locally and through a real agent.

use std::time::SystemTime;

use docker_agent::acl::{AclConfig, Profile};
use docker_agent::client::AgentClient;
use docker_agent::config::AgentConfig;
use docker_agent::runtime::DockerRuntime;
use docker_agent::server::{AgentServer, RunningDockerAgent};
use futures_util::StreamExt;
use pool_api::{
    BoxStream, ContainerEvent, ContainerEventKind, ContainerHealth, ContainerRuntime, ContainerState,
    EventFilter, RuntimeError, StopOptions,
};

const WAIT: Duration = Duration::from_secs(30);

/// An in-process agent on a free port with the lifecycle profile.
async fn agent(pki: &Pki) -> RunningDockerAgent {
    let mut config = AgentConfig::new("runtime-test", "127.0.0.1:0".parse().unwrap(), pki.server.clone());
    config.acl = AclConfig::profile(Profile::Lifecycle);
    config.shutdown_grace = Duration::from_secs(2);
    AgentServer::bind(config).await.expect("agent binds")
}

/// Reads events until one matches, failing after `WAIT`.
async fn expect_event(
    events: &mut BoxStream<'static, Result<ContainerEvent, RuntimeError>>,
    what: &str,
    matches: impl Fn(&ContainerEventKind) -> bool,
) -> ContainerEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        match next {
            Ok(Some(Ok(event))) if matches(&event.kind) => return event,
            Ok(Some(Ok(event))) => seen.push(event.kind),
            Ok(Some(Err(e))) => panic!("event stream failed while waiting for {what}: {e}"),
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("no {what} event within {WAIT:?}; saw {seen:?}"),
        }
    }
}

/// Polls `status` until `check` accepts it.
async fn wait_status(
    runtime: &DockerRuntime,
    id: &str,
    what: &str,
    check: impl Fn(&pool_api::ContainerStatus) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = runtime.status(id).await.expect("status");
        if check(&status) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id}: not {what} within {WAIT:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The core scenario: start → starting → healthy, pause, unpause, kill, start, stop; every step
/// seen in `status` and as a typed event.
async fn lifecycle_scenario(engine: &bollard::Docker, runtime: &DockerRuntime) {
    let container = TestContainer::builder("lifecycle")
        .command(docker::delayed_httpd(Duration::from_secs(2)))
        .start(false)
        .create(engine)
        .await
        .unwrap();
    let id = container.name();
    let status = runtime.status(id).await.unwrap();
    assert_eq!((status.state.clone(), status.started_at), (ContainerState::Created, None), "{status:?}");
    assert_eq!(status.id, container.id());
    assert_eq!(status.name, container.name());

    let mut events = runtime.events(EventFilter { containers: vec![id.to_owned()], labels: Vec::new() });

    let before_start = SystemTime::now() - Duration::from_secs(5);
    runtime.start(id).await.unwrap();
    runtime.start(id).await.expect("starting a running container succeeds");
    let started = expect_event(&mut events, "start", |k| *k == ContainerEventKind::Start).await;
    assert_eq!(started.id, container.id());
    assert_eq!(started.name.as_deref(), Some(container.name()));
    let status = runtime.status(id).await.unwrap();
    assert_eq!(status.state, ContainerState::Running);
    assert_eq!(status.health, ContainerHealth::Starting, "httpd sleeps 2 s before it serves");
    assert!(status.started_at.is_some_and(|t| t > before_start), "{status:?}");
    assert!(!status.is_ready());

    expect_event(&mut events, "health_status: healthy", |k| {
        *k == ContainerEventKind::Health(ContainerHealth::Healthy)
    })
    .await;
    wait_status(runtime, id, "healthy", |s| s.health == ContainerHealth::Healthy && s.is_ready()).await;

    runtime.pause(id).await.unwrap();
    expect_event(&mut events, "pause", |k| *k == ContainerEventKind::Pause).await;
    // The engine records some state changes from containerd's events, after its answer: poll.
    wait_status(runtime, id, "paused", |s| s.state == ContainerState::Paused).await;
    runtime.unpause(id).await.unwrap();
    expect_event(&mut events, "unpause", |k| *k == ContainerEventKind::Unpause).await;
    wait_status(runtime, id, "running", |s| s.state == ContainerState::Running).await;

    runtime.kill(id, None).await.unwrap();
    let kill = expect_event(&mut events, "kill", |k| matches!(k, ContainerEventKind::Kill { .. })).await;
    assert!(
        matches!(kill.kind, ContainerEventKind::Kill { signal: Some(ref s) } if s == "9" || s == "SIGKILL"),
        "{kill:?}"
    );
    let die = expect_event(&mut events, "die", |k| matches!(k, ContainerEventKind::Die { .. })).await;
    assert_eq!(die.kind, ContainerEventKind::Die { exit_code: Some(137) });
    wait_status(runtime, id, "exited 137", |s| s.state == ContainerState::Exited { code: Some(137) }).await;

    runtime.start(id).await.unwrap();
    expect_event(&mut events, "start again", |k| *k == ContainerEventKind::Start).await;
    // Without init, httpd (pid 1) would ignore SIGTERM and be killed after the whole time-out.
    let stop = StopOptions { signal: None, timeout: Duration::from_secs(10) };
    let began = tokio::time::Instant::now();
    runtime.stop(id, stop).await.unwrap();
    assert!(began.elapsed() < Duration::from_secs(5), "with init the stop signal ends httpd at once");
    let die =
        expect_event(&mut events, "die after stop", |k| matches!(k, ContainerEventKind::Die { .. })).await;
    assert_eq!(die.kind, ContainerEventKind::Die { exit_code: Some(143) });
    expect_event(&mut events, "stop", |k| *k == ContainerEventKind::Stop).await;
    wait_status(runtime, id, "exited 143", |s| s.state == ContainerState::Exited { code: Some(143) }).await;
    // Stopping a stopped container succeeds.
    runtime.stop(id, StopOptions { signal: None, timeout: Duration::from_secs(1) }).await.unwrap();

    // A stop signal of our choosing, on any engine version.
    runtime.start(id).await.unwrap();
    runtime
        .stop(id, StopOptions { signal: Some("SIGINT".into()), timeout: Duration::from_secs(2) })
        .await
        .unwrap();
    let kill =
        expect_event(&mut events, "kill SIGINT", |k| matches!(k, ContainerEventKind::Kill { .. })).await;
    assert!(
        matches!(kill.kind, ContainerEventKind::Kill { signal: Some(ref s) } if s == "2" || s == "SIGINT"),
        "{kill:?}"
    );
    wait_status(runtime, id, "exited", |s| matches!(s.state, ContainerState::Exited { .. })).await;
}

async fn missing_containers_are_not_found(runtime: &DockerRuntime) {
    let missing = docker::unique_name("missing");
    for result in [
        runtime.status(&missing).await.map(|_| ()),
        runtime.start(&missing).await,
        runtime.stop(&missing, StopOptions::default()).await,
        runtime.kill(&missing, None).await,
        runtime.pause(&missing).await,
        runtime.unpause(&missing).await,
    ] {
        assert!(matches!(&result, Err(RuntimeError::NotFound { id }) if *id == missing), "{result:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_lifecycle_health_and_events() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let runtime = DockerRuntime::new(engine.clone());
    lifecycle_scenario(&engine, &runtime).await;
    missing_containers_are_not_found(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_failing_health_check_is_unhealthy_and_errors_are_typed() {
    let Some(engine) = docker::engine().await else { return };
    let runtime = DockerRuntime::new(engine.clone());
    let sick = TestContainer::builder("sick").health(HealthCheck::NeverPasses).create(&engine).await.unwrap();
    let mut events =
        runtime.events(EventFilter { containers: vec![sick.id().to_owned()], labels: Vec::new() });
    wait_status(&runtime, sick.name(), "unhealthy", |s| s.health == ContainerHealth::Unhealthy).await;
    assert!(!runtime.status(sick.name()).await.unwrap().is_ready());
    expect_event(&mut events, "health_status: unhealthy", |k| {
        *k == ContainerEventKind::Health(ContainerHealth::Unhealthy)
    })
    .await;

    // No health check at all: health none, ready when running.
    let plain = TestContainer::builder("plain").health(HealthCheck::Disabled).create(&engine).await.unwrap();
    let status = runtime.status(plain.id()).await.unwrap();
    assert_eq!((status.state.clone(), status.health), (ContainerState::Running, ContainerHealth::None));
    assert!(status.is_ready());

    // A process that exits by itself: exited with its code.
    let quitter = TestContainer::builder("quitter")
        .command(docker::exits_after(Duration::ZERO, 3))
        .create(&engine)
        .await
        .unwrap();
    wait_status(&runtime, quitter.name(), "exited 3", |s| {
        s.state == ContainerState::Exited { code: Some(3) }
    })
    .await;

    // Pausing a stopped container: the engine's refusal, typed.
    let err = runtime.pause(quitter.name()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Engine { operation: "pause", status: Some(409), .. }), "{err:?}");

    // Events by label.
    let labelled = TestContainer::builder("labelled")
        .label("agentpool.role", "probe")
        .start(false)
        .create(&engine)
        .await
        .unwrap();
    let mut by_label = runtime.events(EventFilter {
        containers: Vec::new(),
        labels: vec!["agentpool.role=probe".into(), format!("{}={}", docker::TEST_LABEL, docker::run_id())],
    });
    runtime.start(labelled.id()).await.unwrap();
    let event = expect_event(&mut by_label, "start by label", |k| *k == ContainerEventKind::Start).await;
    assert_eq!(event.id, labelled.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_engine_is_typed() {
    // A socket path that exists but where nothing listens.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let docker =
        bollard::Docker::connect_with_unix(path.to_str().unwrap(), 5, bollard::API_DEFAULT_VERSION).unwrap();
    let runtime = DockerRuntime::new(docker);
    let err = runtime.status("anything").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err:?}");
    let mut events = runtime.events(EventFilter::default());
    let first = tokio::time::timeout(WAIT, events.next()).await.expect("an answer");
    assert!(matches!(first, Some(Err(RuntimeError::Unreachable { .. }))), "{first:?}");
    assert!(
        tokio::time::timeout(WAIT, events.next()).await.unwrap().is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_a_real_agent() {
    let Some(engine) = docker::engine().await else { return };
    let pki = common::pki("runtime test CA");
    let agent = agent(&pki).await;
    let client = AgentClient::new(&agent.local_addr().to_string(), &pki.client).unwrap();
    let runtime = DockerRuntime::new(client.docker());
    lifecycle_scenario(&engine, &runtime).await;
    missing_containers_are_not_found(&runtime).await;

    // The agent's ACL: lifecycle allows no container creation; the refusal is typed with the
    // agent's message.
    let err = client
        .docker()
        .create_container(None::<bollard::query_parameters::CreateContainerOptions>, Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, bollard::errors::Error::DockerResponseServerError { status_code: 403, message } if message.contains("denied")),
        "{err:?}"
    );

    // The engine (here: the agent) goes away while an event stream is open: the stream reports
    // it and ends. A task reads the stream; a container started on the engine proves it open.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut events = runtime.events(EventFilter::default());
    let reader = tokio::spawn(async move {
        while let Some(item) = events.next().await {
            let _ = tx.send(item);
        }
    });
    let _probe = TestContainer::builder("stream-probe").create(&engine).await.unwrap();
    let first = tokio::time::timeout(WAIT, rx.recv()).await.expect("an event through the agent");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    agent.shutdown().await;
    let end = async {
        loop {
            match rx.recv().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    };
    let next = tokio::time::timeout(WAIT, end).await.expect("the stream notices");
    assert!(matches!(next, Some(Err(RuntimeError::Unreachable { .. }))), "{next:?}");
    tokio::time::timeout(WAIT, reader).await.expect("the stream ends after the error").unwrap();
    assert!(rx.recv().await.is_none(), "nothing after the error");
    // And calls are typed as unreachable.
    let err = runtime.status("anything").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err:?}");
}
