//! `DockerRuntime` against the real engine, locally and through a real agent; and the Docker
//! test harness itself.

use std::time::Duration;

use bollard::models::HealthStatusEnum;
use test_support::docker::{self, HealthCheck, TestContainer};

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
