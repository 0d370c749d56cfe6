//! The workload as the driver sees it: a container or a Swarm service behind one small
//! interface, over `pool-api`'s [`ContainerRuntime`] and [`ServiceRuntime`].

use std::sync::Arc;

use futures_util::StreamExt;
use pool_api::{
    BoxFuture, BoxStream, ContainerEventKind, ContainerRuntime, EventFilter, RuntimeError, ServiceEventKind,
    ServiceRuntime, StopOptions,
};

use crate::config::{IdleConfig, StopMethod, Workload};
use crate::machine::EngineView;

/// What an event says.
#[derive(Debug)]
pub(crate) enum News {
    /// The view itself (a health event of a running container).
    View(EngineView),
    /// Something changed: read the status again.
    Changed,
}

pub(crate) trait Engine: Send + Sync + 'static {
    fn observe(&self) -> BoxFuture<'_, Result<EngineView, RuntimeError>>;
    fn start(&self, unpause: bool) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// The stop call only; the driver then waits for "not running".
    fn stop(&self) -> BoxFuture<'_, Result<(), RuntimeError>>;
    fn events(&self) -> BoxStream<'static, Result<News, RuntimeError>>;
}

/// Builds the engine for the configured workload.
pub(crate) fn engine_for<R>(config: &IdleConfig, runtime: Arc<R>) -> Arc<dyn Engine>
where
    R: ContainerRuntime + ServiceRuntime,
{
    match &config.workload {
        Workload::Container(name) => Arc::new(ContainerEngine {
            runtime,
            name: name.clone(),
            stop: config.stop.clone(),
            stop_timeout: config.stop_timeout,
        }),
        Workload::Service { name, replicas } => {
            Arc::new(ServiceEngine { runtime, name: name.clone(), replicas: *replicas })
        }
    }
}

/// An engine answer that means "already so": 304 (not modified: already started or stopped)
/// and 409 (conflict: not running, already paused…). The status read that follows settles what
/// the workload really is.
pub(crate) fn benign(result: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
    match result {
        Err(RuntimeError::Engine { status: Some(304 | 409), .. }) => Ok(()),
        other => other,
    }
}

struct ContainerEngine<R> {
    runtime: Arc<R>,
    name: String,
    stop: StopMethod,
    stop_timeout: std::time::Duration,
}

impl<R: ContainerRuntime> Engine for ContainerEngine<R> {
    fn observe(&self) -> BoxFuture<'_, Result<EngineView, RuntimeError>> {
        Box::pin(async move { Ok(EngineView::of_container(&self.runtime.status(&self.name).await?)) })
    }

    fn start(&self, unpause: bool) -> BoxFuture<'_, Result<(), RuntimeError>> {
        if unpause { self.runtime.unpause(&self.name) } else { self.runtime.start(&self.name) }
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        let options =
            |signal: Option<&String>| StopOptions { signal: signal.cloned(), timeout: self.stop_timeout };
        match &self.stop {
            StopMethod::Stop => self.runtime.stop(&self.name, options(None)),
            StopMethod::StopWithSignal { signal } => self.runtime.stop(&self.name, options(Some(signal))),
            StopMethod::Pause => self.runtime.pause(&self.name),
            StopMethod::Kill { signal } => self.runtime.kill(&self.name, Some(signal)),
        }
    }

    fn events(&self) -> BoxStream<'static, Result<News, RuntimeError>> {
        let filter = EventFilter { containers: vec![self.name.clone()], labels: Vec::new() };
        Box::pin(self.runtime.events(filter).map(|item| {
            item.map(|event| match event.kind {
                // A health report comes only from a running container.
                ContainerEventKind::Health(health) => News::View(EngineView::Up(health)),
                _ => News::Changed,
            })
        }))
    }
}

struct ServiceEngine<R> {
    runtime: Arc<R>,
    name: String,
    replicas: u64,
}

impl<R: ServiceRuntime> Engine for ServiceEngine<R> {
    fn observe(&self) -> BoxFuture<'_, Result<EngineView, RuntimeError>> {
        Box::pin(async move {
            Ok(EngineView::of_service(self.runtime.service_status(&self.name).await?, self.replicas))
        })
    }

    fn start(&self, _unpause: bool) -> BoxFuture<'_, Result<(), RuntimeError>> {
        self.runtime.scale(&self.name, self.replicas)
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        self.runtime.scale(&self.name, 0)
    }

    fn events(&self) -> BoxStream<'static, Result<News, RuntimeError>> {
        Box::pin(self.runtime.service_events(vec![self.name.clone()]).map(|item| {
            item.map(|event| match event.kind {
                ServiceEventKind::Removed => News::View(EngineView::Gone),
                // A task's health is not the service's: the running count decides.
                ServiceEventKind::TaskHealth(_)
                | ServiceEventKind::Updated
                | ServiceEventKind::TaskStarted
                | ServiceEventKind::TaskStopped => News::Changed,
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn already_so_answers_are_success() {
        let answer = |status| {
            Err(RuntimeError::Engine {
                operation: "stop",
                id: "x".into(),
                status: Some(status),
                message: String::new(),
            })
        };
        assert_eq!(benign(answer(304)), Ok(()));
        assert_eq!(benign(answer(409)), Ok(()));
        assert!(benign(answer(500)).is_err());
        assert!(benign(Err(RuntimeError::NotFound { id: "x".into() })).is_err());
    }
}
