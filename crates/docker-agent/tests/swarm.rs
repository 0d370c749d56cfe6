//! Swarm service scaling with `DockerRuntime` on a real single-node swarm.

use std::time::Duration;

use docker_agent::runtime::DockerRuntime;
use pool_api::{RuntimeError, ServiceStatus};
use test_support::docker::{self, SwarmGuard, TestService};

const CONVERGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_scales_one_zero_one() {
    let Some(engine) = docker::engine().await else { return };
    let swarm = SwarmGuard::ensure(&engine).await.expect("single-node swarm");
    docker::cleanup_leftovers(&engine).await;
    let runtime = DockerRuntime::new(engine.clone());

    let service = TestService::create(&engine, "scale", 1).await.expect("service created from the image id");
    let name = service.name();
    let status = runtime.wait_service_converged(name, CONVERGE).await.unwrap();
    assert_eq!(status, ServiceStatus { desired: 1, running: 1 });

    runtime.scale_service(name, 0).await.unwrap();
    assert_eq!(runtime.service_status(name).await.unwrap().desired, 0);
    let status = runtime.wait_service_converged(name, CONVERGE).await.unwrap();
    assert_eq!(status, ServiceStatus { desired: 0, running: 0 });

    runtime.scale_service(name, 1).await.unwrap();
    let status = runtime.wait_service_converged(name, CONVERGE).await.unwrap();
    assert_eq!(status, ServiceStatus { desired: 1, running: 1 });

    // The update kept the rest of the spec: still the image id, init, labels.
    let inspect = engine.inspect_service(name, None).await.unwrap();
    let spec = inspect.spec.unwrap();
    let container = spec.task_template.unwrap().container_spec.unwrap();
    assert_eq!(container.image.as_deref(), Some(docker::test_image(&engine).await.as_str()));
    assert_eq!(container.init, Some(true));
    assert_eq!(spec.labels.unwrap().get(docker::TEST_LABEL).map(String::as_str), Some(docker::run_id()));

    // Prefix of a real name, and a missing one: not found.
    let prefix = &name[..name.len() - 1];
    assert!(matches!(runtime.service_status(prefix).await, Err(RuntimeError::NotFound { .. })));
    let missing = docker::unique_name("missing-service");
    assert!(matches!(runtime.scale_service(&missing, 1).await, Err(RuntimeError::NotFound { .. })));

    drop(service);
    drop(swarm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runtime_scales_and_streams_task_events() {
    use futures_util::StreamExt;
    use pool_api::{ContainerHealth, ServiceEventKind, ServiceRuntime};

    let Some(engine) = docker::engine().await else { return };
    let swarm = SwarmGuard::ensure(&engine).await.expect("single-node swarm");
    docker::cleanup_leftovers(&engine).await;
    let runtime = DockerRuntime::new(engine.clone());
    let service = TestService::create(&engine, "svc-events", 0).await.expect("service");
    let name = service.name().to_owned();
    let mut events = ServiceRuntime::service_events(&runtime, vec![name.clone()]);

    ServiceRuntime::scale(&runtime, &name, 1).await.unwrap();
    let mut seen = Vec::new();
    let healthy = tokio::time::timeout(CONVERGE, async {
        while let Some(event) = events.next().await {
            let event = event.expect("event");
            assert_eq!(event.service, name);
            seen.push(event.kind.clone());
            if event.kind == ServiceEventKind::TaskHealth(ContainerHealth::Healthy) {
                return;
            }
        }
        panic!("the event stream ended");
    })
    .await;
    assert!(healthy.is_ok(), "no healthy task event within {CONVERGE:?}; saw {seen:?}");
    assert!(seen.contains(&ServiceEventKind::Updated), "{seen:?}");
    assert!(seen.contains(&ServiceEventKind::TaskStarted), "{seen:?}");
    let status = runtime.wait_service_converged(&name, CONVERGE).await.unwrap();
    assert_eq!(status, ServiceStatus { desired: 1, running: 1 });
    assert_eq!(ServiceRuntime::service_status(&runtime, &name).await.unwrap(), status);

    ServiceRuntime::scale(&runtime, &name, 0).await.unwrap();
    let stopped = tokio::time::timeout(CONVERGE, async {
        while let Some(event) = events.next().await {
            if event.expect("event").kind == ServiceEventKind::TaskStopped {
                return;
            }
        }
    })
    .await;
    assert!(stopped.is_ok(), "no task-stopped event after scaling to 0");
    drop(events);
    drop(service);
    drop(swarm);
}
