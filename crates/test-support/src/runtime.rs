//! [`FakeRuntime`]: a scriptable in-memory container engine ([`ContainerRuntime`] and
//! [`ServiceRuntime`]) for deterministic tests of container watchers.
//!
//! Containers and services are added by name. What the engine does is scripted and can be
//! changed at any time: how long a start or a stop takes, when (and whether) a started
//! container turns healthy, and failures injected per operation. Every call is counted, and
//! every change is pushed to the open event streams as the real engine would push it (`start`,
//! `health_status`, `kill`, `die`, `stop`, `pause`, `unpause`; a service's `update` and its
//! tasks' starts, stops and health). [`FakeRuntime::break_event_streams`] makes every open
//! stream yield [`RuntimeError::Unreachable`] and end, like an engine restart.
//!
//! All time is tokio time, so under `start_paused = true` a 30 s health delay costs nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use parking_lot::Mutex;
use pool_api::{
    BoxFuture, BoxStream, ContainerEvent, ContainerEventKind, ContainerHealth, ContainerRuntime,
    ContainerState, ContainerStatus, EventFilter, RuntimeError, ServiceEvent, ServiceEventKind,
    ServiceRuntime, ServiceStatus, StopOptions,
};
use tokio::sync::mpsc;

/// An operation of [`FakeRuntime`], for failure injection and call counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FakeOp {
    /// [`ContainerRuntime::status`].
    Status,
    /// [`ContainerRuntime::start`].
    Start,
    /// [`ContainerRuntime::stop`].
    Stop,
    /// [`ContainerRuntime::kill`].
    Kill,
    /// [`ContainerRuntime::pause`].
    Pause,
    /// [`ContainerRuntime::unpause`].
    Unpause,
    /// [`ContainerRuntime::events`] and [`ServiceRuntime::service_events`].
    Events,
    /// [`ServiceRuntime::service_status`].
    ServiceStatus,
    /// [`ServiceRuntime::scale`].
    Scale,
}

/// When a started container (or a scaled-up service's tasks) turns healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeHealth {
    /// No health check: ready as soon as it runs.
    NoCheck,
    /// `starting`, then `healthy` after this long.
    HealthyAfter(Duration),
    /// `starting`, then `unhealthy` after this long, for ever.
    NeverHealthy(Duration),
}

#[derive(Debug)]
struct Container {
    id: String,
    state: ContainerState,
    health: ContainerHealth,
    check: FakeHealth,
    /// Bumped at every start and stop, so a health transition of an earlier run is dropped.
    run: u64,
}

#[derive(Debug)]
struct Service {
    status: ServiceStatus,
    check: FakeHealth,
    run: u64,
}

type Subscriber<T> = mpsc::UnboundedSender<Result<T, RuntimeError>>;

#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<String, Container>,
    services: HashMap<String, Service>,
    start_latency: Duration,
    stop_latency: Duration,
    failures: HashMap<FakeOp, RuntimeError>,
    calls: HashMap<FakeOp, u64>,
    container_streams: Vec<(EventFilter, Subscriber<ContainerEvent>)>,
    service_streams: Vec<(Vec<String>, Subscriber<ServiceEvent>)>,
    starts: u64,
}

/// A scriptable in-memory engine; see the [module docs](self). Cheap to clone (shared state).
#[derive(Clone, Debug, Default)]
pub struct FakeRuntime {
    inner: Arc<Mutex<Inner>>,
}

impl FakeRuntime {
    /// An empty engine: no containers, no latency, no failures.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a container named `name` (id `id-<name>`), stopped (`exited 0`), with this health
    /// behaviour for its next starts.
    pub fn add_container(&self, name: &str, check: FakeHealth) {
        let container = Container {
            id: format!("id-{name}"),
            state: ContainerState::Exited { code: Some(0) },
            health: ContainerHealth::None,
            check,
            run: 0,
        };
        self.inner.lock().containers.insert(name.to_owned(), container);
    }

    /// Adds a replicated service named `name` with no replicas.
    pub fn add_service(&self, name: &str, check: FakeHealth) {
        let service = Service { status: ServiceStatus::default(), check, run: 0 };
        self.inner.lock().services.insert(name.to_owned(), service);
    }

    /// How long a start (or unpause, or scale-up call) takes before it answers.
    pub fn set_start_latency(&self, latency: Duration) {
        self.inner.lock().start_latency = latency;
    }

    /// How long a stop (or kill, pause, scale-down call) takes before it answers.
    pub fn set_stop_latency(&self, latency: Duration) {
        self.inner.lock().stop_latency = latency;
    }

    /// Changes the health behaviour of a container's (or service's) next starts.
    pub fn set_health(&self, name: &str, check: FakeHealth) {
        let mut inner = self.inner.lock();
        if let Some(c) = inner.containers.get_mut(name) {
            c.check = check;
        }
        if let Some(s) = inner.services.get_mut(name) {
            s.check = check;
        }
    }

    /// Sets a running container's health now and pushes the `health_status` event, as the
    /// engine does when a check result flips it. No effect on a container that is not running.
    pub fn set_container_health(&self, name: &str, health: ContainerHealth) {
        let mut inner = self.inner.lock();
        let Some(c) = inner.containers.get_mut(name) else { return };
        if !c.state.is_running() {
            return;
        }
        c.health = health;
        inner.emit(name, ContainerEventKind::Health(health));
    }

    /// Makes every call of `op` fail with `error` until [`clear_failure`](Self::clear_failure).
    pub fn fail(&self, op: FakeOp, error: RuntimeError) {
        self.inner.lock().failures.insert(op, error);
    }

    /// Stops injecting failures into `op`.
    pub fn clear_failure(&self, op: FakeOp) {
        self.inner.lock().failures.remove(&op);
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: FakeOp) -> u64 {
        self.inner.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// How many times a container or service went from not running to running (the engine's
    /// `start` events, unpauses excluded; a scale-up counts once).
    pub fn starts(&self) -> u64 {
        self.inner.lock().starts
    }

    /// The state of a container, if it exists.
    pub fn state(&self, name: &str) -> Option<ContainerState> {
        self.inner.lock().containers.get(name).map(|c| c.state.clone())
    }

    /// The replica counts of a service, if it exists.
    pub fn replicas(&self, name: &str) -> Option<ServiceStatus> {
        self.inner.lock().services.get(name).map(|s| s.status)
    }

    /// Open event streams (container and service streams whose receiver is still alive).
    pub fn open_event_streams(&self) -> usize {
        let mut inner = self.inner.lock();
        inner.container_streams.retain(|(_, tx)| !tx.is_closed());
        inner.service_streams.retain(|(_, tx)| !tx.is_closed());
        inner.container_streams.len() + inner.service_streams.len()
    }

    /// Every open event stream yields [`RuntimeError::Unreachable`] and ends.
    pub fn break_event_streams(&self) {
        let mut inner = self.inner.lock();
        let error = || RuntimeError::Unreachable { message: "fake engine restarted".to_owned() };
        for (_, tx) in inner.container_streams.drain(..) {
            let _ = tx.send(Err(error()));
        }
        for (_, tx) in inner.service_streams.drain(..) {
            let _ = tx.send(Err(error()));
        }
    }

    fn call(&self, op: FakeOp) -> Result<(), RuntimeError> {
        let mut inner = self.inner.lock();
        *inner.calls.entry(op).or_default() += 1;
        inner.failures.get(&op).cloned().map_or(Ok(()), Err)
    }

    fn latency(&self, start: bool) -> Duration {
        let inner = self.inner.lock();
        if start { inner.start_latency } else { inner.stop_latency }
    }

    async fn change(
        &self,
        op: FakeOp,
        name: &str,
        apply: impl FnOnce(&mut Inner, &str) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        self.call(op)?;
        let latency = self.latency(matches!(op, FakeOp::Start | FakeOp::Unpause));
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.inner.lock();
        if !inner.containers.contains_key(name) {
            return Err(RuntimeError::NotFound { id: name.to_owned() });
        }
        apply(&mut inner, name)
    }

    fn schedule_health(&self, name: &str, run: u64, check: FakeHealth, service: bool) {
        let (after, health) = match check {
            FakeHealth::NoCheck => return,
            FakeHealth::HealthyAfter(after) => (after, ContainerHealth::Healthy),
            FakeHealth::NeverHealthy(after) => (after, ContainerHealth::Unhealthy),
        };
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let mut inner = this.inner.lock();
            if service {
                let Some(s) = inner.services.get_mut(&name) else { return };
                if s.run != run {
                    return;
                }
                if health == ContainerHealth::Healthy {
                    s.status.running = s.status.desired;
                }
                inner.emit_service(&name, ServiceEventKind::TaskHealth(health));
            } else {
                let Some(c) = inner.containers.get_mut(&name) else { return };
                if c.run != run || !c.state.is_running() {
                    return;
                }
                c.health = health;
                inner.emit(&name, ContainerEventKind::Health(health));
            }
        });
    }
}

impl Inner {
    fn emit(&mut self, name: &str, kind: ContainerEventKind) {
        let Some(id) = self.containers.get(name).map(|c| c.id.clone()) else { return };
        let event =
            ContainerEvent { id: id.clone(), name: Some(name.to_owned()), kind, time: SystemTime::now() };
        self.container_streams.retain(|(filter, tx)| {
            let wanted =
                filter.containers.is_empty() || filter.containers.iter().any(|c| *c == id || c == name);
            !wanted || tx.send(Ok(event.clone())).is_ok()
        });
    }

    fn emit_service(&mut self, name: &str, kind: ServiceEventKind) {
        let event = ServiceEvent { service: name.to_owned(), kind, time: SystemTime::now() };
        self.service_streams.retain(|(services, tx)| {
            !services.iter().any(|s| s == name) || tx.send(Ok(event.clone())).is_ok()
        });
    }

    fn container(&mut self, name: &str) -> &mut Container {
        self.containers.get_mut(name).expect("checked by the caller")
    }

    /// Stops a running or paused container: `kill`, `die`, `stop` events as the engine sends.
    fn stop_container(&mut self, name: &str, signal: Option<String>, code: i64) {
        let c = self.container(name);
        if matches!(c.state, ContainerState::Running | ContainerState::Paused) {
            c.state = ContainerState::Exited { code: Some(code) };
            c.run += 1;
            self.emit(name, ContainerEventKind::Kill { signal });
            self.emit(name, ContainerEventKind::Die { exit_code: Some(code) });
            self.emit(name, ContainerEventKind::Stop);
        }
    }
}

fn not_running(operation: &'static str, id: &str) -> RuntimeError {
    RuntimeError::Engine {
        operation,
        id: id.to_owned(),
        status: Some(409),
        message: format!("container {id} is not running"),
    }
}

impl ContainerRuntime for FakeRuntime {
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerStatus, RuntimeError>> {
        Box::pin(async move {
            self.call(FakeOp::Status)?;
            let inner = self.inner.lock();
            let c = inner.containers.get(id).ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
            Ok(ContainerStatus {
                id: c.id.clone(),
                name: id.to_owned(),
                state: c.state.clone(),
                health: c.health,
                started_at: None,
            })
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut scheduled = None;
            self.change(FakeOp::Start, id, |inner, name| {
                let c = inner.container(name);
                match c.state {
                    ContainerState::Running => return Ok(()),
                    ContainerState::Paused => {
                        return Err(RuntimeError::Engine {
                            operation: "start",
                            id: name.to_owned(),
                            status: Some(409),
                            message: "cannot start a paused container, try unpause instead".to_owned(),
                        });
                    }
                    _ => {}
                }
                c.state = ContainerState::Running;
                c.run += 1;
                c.health = match c.check {
                    FakeHealth::NoCheck => ContainerHealth::None,
                    _ => ContainerHealth::Starting,
                };
                scheduled = Some((c.run, c.check));
                inner.starts += 1;
                inner.emit(name, ContainerEventKind::Start);
                Ok(())
            })
            .await?;
            if let Some((run, check)) = scheduled {
                self.schedule_health(id, run, check, false);
            }
            Ok(())
        })
    }

    fn stop<'a>(&'a self, id: &'a str, options: StopOptions) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.change(FakeOp::Stop, id, move |inner, name| {
            let code = if options.signal.as_deref() == Some("SIGKILL") { 137 } else { 143 };
            inner.stop_container(name, options.signal, code);
            Ok(())
        }))
    }

    fn kill<'a>(&'a self, id: &'a str, signal: Option<&'a str>) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.change(FakeOp::Kill, id, move |inner, name| {
            if !inner.container(name).state.is_running() {
                return Err(not_running("kill", name));
            }
            let signal = signal.unwrap_or("SIGKILL").to_owned();
            inner.stop_container(name, Some(signal), 137);
            Ok(())
        }))
    }

    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.change(FakeOp::Pause, id, |inner, name| {
            let c = inner.container(name);
            if !c.state.is_running() {
                return Err(not_running("pause", name));
            }
            c.state = ContainerState::Paused;
            inner.emit(name, ContainerEventKind::Pause);
            Ok(())
        }))
    }

    fn unpause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.change(FakeOp::Unpause, id, |inner, name| {
            let c = inner.container(name);
            if c.state != ContainerState::Paused {
                return Err(RuntimeError::Engine {
                    operation: "unpause",
                    id: name.to_owned(),
                    status: Some(409),
                    message: format!("container {name} is not paused"),
                });
            }
            c.state = ContainerState::Running;
            inner.emit(name, ContainerEventKind::Unpause);
            Ok(())
        }))
    }

    fn events(&self, filter: EventFilter) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        match self.call(FakeOp::Events) {
            Ok(()) => self.inner.lock().container_streams.push((filter, tx)),
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
        Box::pin(receiver_stream(rx))
    }
}

impl ServiceRuntime for FakeRuntime {
    fn service_status<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<ServiceStatus, RuntimeError>> {
        Box::pin(async move {
            self.call(FakeOp::ServiceStatus)?;
            let inner = self.inner.lock();
            inner
                .services
                .get(service)
                .map(|s| s.status)
                .ok_or_else(|| RuntimeError::NotFound { id: service.to_owned() })
        })
    }

    fn scale<'a>(&'a self, service: &'a str, replicas: u64) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.call(FakeOp::Scale)?;
            let up = self.replicas(service).is_some_and(|s| replicas > s.desired);
            let latency = self.latency(up);
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let scheduled = {
                let mut inner = self.inner.lock();
                let s = inner
                    .services
                    .get_mut(service)
                    .ok_or_else(|| RuntimeError::NotFound { id: service.to_owned() })?;
                if s.status.desired == replicas {
                    return Ok(());
                }
                let was_running = s.status.running;
                s.status.desired = replicas;
                s.run += 1;
                let (run, check) = (s.run, s.check);
                let scheduled = if replicas == 0 {
                    s.status.running = 0;
                    None
                } else {
                    if check == FakeHealth::NoCheck {
                        s.status.running = replicas;
                    }
                    Some((run, check))
                };
                inner.emit_service(service, ServiceEventKind::Updated);
                if replicas == 0 && was_running > 0 {
                    inner.emit_service(service, ServiceEventKind::TaskStopped);
                } else if was_running == 0 && replicas > 0 {
                    inner.starts += 1;
                    inner.emit_service(service, ServiceEventKind::TaskStarted);
                }
                scheduled
            };
            if let Some((run, check)) = scheduled {
                self.schedule_health(service, run, check, true);
            }
            Ok(())
        })
    }

    fn service_events(
        &self,
        services: Vec<String>,
    ) -> BoxStream<'static, Result<ServiceEvent, RuntimeError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        match self.call(FakeOp::Events) {
            Ok(()) => self.inner.lock().service_streams.push((services, tx)),
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
        Box::pin(receiver_stream(rx))
    }
}

/// The receiver as a stream that ends after its first error, as the engine's streams do.
fn receiver_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<Result<T, RuntimeError>>,
) -> impl futures_util::Stream<Item = Result<T, RuntimeError>> + Send + 'static {
    futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let item = rx.recv().await?;
        let next = item.is_ok().then_some(rx);
        Some((item, next))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_started_container_turns_healthy_on_script_and_says_so() {
        let fake = FakeRuntime::new();
        fake.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(3)));
        fake.set_start_latency(Duration::from_millis(200));
        let mut events = fake.events(EventFilter::default());
        let begun = tokio::time::Instant::now();
        fake.start("web").await.unwrap();
        assert_eq!(begun.elapsed(), Duration::from_millis(200));
        assert_eq!(fake.status("web").await.unwrap().health, ContainerHealth::Starting);
        assert_eq!(events.next().await.unwrap().unwrap().kind, ContainerEventKind::Start);
        let healthy = events.next().await.unwrap().unwrap();
        assert_eq!(healthy.kind, ContainerEventKind::Health(ContainerHealth::Healthy));
        assert_eq!(begun.elapsed(), Duration::from_millis(3200));
        assert!(fake.status("web").await.unwrap().is_ready());
        fake.stop("web", StopOptions::default()).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(events.next().await.unwrap().unwrap().kind);
        }
        assert_eq!(
            seen,
            [
                ContainerEventKind::Kill { signal: None },
                ContainerEventKind::Die { exit_code: Some(143) },
                ContainerEventKind::Stop
            ]
        );
        assert_eq!((fake.calls(FakeOp::Start), fake.calls(FakeOp::Stop), fake.starts()), (1, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_injected_and_streams_can_be_broken() {
        let fake = FakeRuntime::new();
        fake.add_container("web", FakeHealth::NoCheck);
        fake.fail(FakeOp::Start, RuntimeError::Unreachable { message: "down".into() });
        assert!(matches!(fake.start("web").await, Err(RuntimeError::Unreachable { .. })));
        fake.clear_failure(FakeOp::Start);
        fake.start("web").await.unwrap();
        assert!(fake.status("web").await.unwrap().is_ready());
        assert!(matches!(fake.unpause("web").await, Err(RuntimeError::Engine { status: Some(409), .. })));
        let mut events = fake.events(EventFilter::default());
        assert_eq!(fake.open_event_streams(), 1);
        fake.break_event_streams();
        assert!(matches!(events.next().await, Some(Err(RuntimeError::Unreachable { .. }))));
        assert!(events.next().await.is_none());
        assert_eq!(fake.calls(FakeOp::Start), 2);
        fake.set_container_health("web", ContainerHealth::Unhealthy);
        assert_eq!(fake.status("web").await.unwrap().health, ContainerHealth::Unhealthy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_scales_and_its_tasks_turn_healthy() {
        let fake = FakeRuntime::new();
        fake.add_service("api", FakeHealth::HealthyAfter(Duration::from_secs(1)));
        let mut events = fake.service_events(vec!["api".into()]);
        fake.scale("api", 2).await.unwrap();
        assert_eq!(fake.service_status("api").await.unwrap(), ServiceStatus { desired: 2, running: 0 });
        assert_eq!(events.next().await.unwrap().unwrap().kind, ServiceEventKind::Updated);
        assert_eq!(events.next().await.unwrap().unwrap().kind, ServiceEventKind::TaskStarted);
        let healthy = events.next().await.unwrap().unwrap();
        assert_eq!(healthy.kind, ServiceEventKind::TaskHealth(ContainerHealth::Healthy));
        assert_eq!(fake.replicas("api"), Some(ServiceStatus { desired: 2, running: 2 }));
        fake.scale("api", 0).await.unwrap();
        assert_eq!(fake.replicas("api"), Some(ServiceStatus { desired: 0, running: 0 }));
        assert_eq!(fake.starts(), 1);
    }
}
