//! [`DockerRuntime`]: the [`ContainerRuntime`] of `pool-api` over any bollard [`Docker`] —
//! the local socket ([`connect_local`](crate::client::connect_local)) or an agent
//! ([`AgentClient::docker`](crate::client::AgentClient::docker)) — plus Swarm service scaling.
//!
//! # Containers
//!
//! - [`status`](ContainerRuntime::status) inspects the container and maps every Docker state:
//!   `created`, `running`, `paused`, `restarting`, `removing`, `exited` (with its exit code),
//!   `dead`; any other state (e.g. `stopping` of newer engines, or a name bollard cannot decode,
//!   read from the raw answer) is kept verbatim in [`ContainerState::Unknown`]. Health maps to
//!   none / starting / healthy / unhealthy; `started_at` is parsed (RFC 3339) and `None` for a
//!   container that never started.
//! - [`start`](ContainerRuntime::start) of a running container succeeds (the engine's 304).
//! - [`stop`](ContainerRuntime::stop) sends the stop signal, waits up to the time-out, then
//!   kills. A signal given in [`StopOptions`] is sent with a kill call first and the stop
//!   follows, so it is honoured by every engine (the `signal` parameter of the stop call itself
//!   needs API 1.42). The HTTP time-out of the call is the client's, raised to the stop time-out
//!   plus [`STOP_TIMEOUT_MARGIN`] when that is longer: the engine answers only once the
//!   container is down, and a client time-out shorter than the stop time-out would report a
//!   stop that is in fact still going on as failed.
//! - [`kill`](ContainerRuntime::kill) (default `SIGKILL`), [`pause`](ContainerRuntime::pause),
//!   [`unpause`](ContainerRuntime::unpause).
//! - [`events`](ContainerRuntime::events) asks the engine for container events of type
//!   `start`, `die`, `stop`, `kill`, `pause`, `unpause` and `health_status`, filtered by the
//!   given containers (`container=`) and labels (`label=`). Health events arrive as
//!   `health_status: healthy` and are matched by prefix. Each is mapped to a typed
//!   [`ContainerEvent`] (exit code of `die`, signal of `kill`). The stream covers everything
//!   from the moment `events` is called (it passes that time as the engine's `since`, so events
//!   between the call and the stream's first poll are not lost; with a remote engine this
//!   assumes the two clocks agree). If the engine (or the agent) goes away the stream yields one
//!   [`RuntimeError::Unreachable`] and ends.
//!
//! Errors: 404 → [`RuntimeError::NotFound`]; connection failures and the agent's 502 ("engine
//! cannot be reached") → [`RuntimeError::Unreachable`]; a client time-out →
//! [`RuntimeError::Timeout`]; any other answer → [`RuntimeError::Engine`] with the HTTP status
//! and the engine's (or the agent's ACL) message.
//!
//! # Swarm services
//!
//! [`DockerRuntime::service_status`] reports desired and running tasks;
//! [`DockerRuntime::scale_service`] inspects the service, sets the replica count in the **full**
//! spec it got back (an update replaces the whole spec) and updates it at the version it read,
//! retrying when another update got in between ("update out of sequence");
//! [`DockerRuntime::wait_service_converged`] polls until running equals desired. The same
//! [`service_status`](ServiceRuntime::service_status) and [`scale`](ServiceRuntime::scale) make
//! up `pool-api`'s [`ServiceRuntime`]; its
//! [`service_events`](ServiceRuntime::service_events) asks the engine for `service` events
//! (`create`, `update`, `remove`) and container events of the kinds above, keeps those of the
//! named services and of containers whose [`SWARM_SERVICE_LABEL`] names one of them, and maps
//! them to [`ServiceEvent`]s (a task container's `start`, `die`/`stop`, `health_status`). Like
//! the container stream it starts at the moment of the call and ends after one
//! [`RuntimeError::Unreachable`] when the engine goes away.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
    ServiceSpecMode, ServiceSpecModeReplicated,
};
use bollard::query_parameters::{
    EventsOptionsBuilder, KillContainerOptionsBuilder, ListServicesOptionsBuilder,
    StopContainerOptionsBuilder, UpdateServiceOptionsBuilder,
};
use futures_util::StreamExt;
use pool_api::{
    BoxFuture, BoxStream, ContainerEvent, ContainerEventKind, ContainerHealth, ContainerRuntime,
    ContainerState, ContainerStatus, EventFilter, RuntimeError, ServiceEvent, ServiceEventKind,
    ServiceRuntime, ServiceStatus, StopOptions,
};

use crate::client::error_chain;

/// Added to a stop's time-out to get the HTTP time-out of the stop call (when the client's own
/// time-out is shorter).
pub const STOP_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// How often [`DockerRuntime::scale_service`] retries an update that lost a race.
pub const SCALE_ATTEMPTS: u32 = 5;

/// The service events [`ServiceRuntime::service_events`] asks for (besides [`CONTAINER_EVENTS`]
/// of the services' task containers).
pub const SERVICE_EVENTS: [&str; 3] = ["create", "update", "remove"];

/// The label Swarm puts on every task container: the service's name.
pub const SWARM_SERVICE_LABEL: &str = "com.docker.swarm.service.name";

/// The container events [`ContainerRuntime::events`] asks for.
pub const CONTAINER_EVENTS: [&str; 7] = ["start", "die", "stop", "kill", "pause", "unpause", "health_status"];

/// Docker as a [`ContainerRuntime`]; see the [module docs](self). Cheap to clone.
#[derive(Clone, Debug)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// A runtime over this client (local or through an agent).
    pub fn new(docker: Docker) -> Self {
        Self { docker }
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Desired and running tasks of a service (by name or id).
    pub async fn service_status(&self, service: &str) -> Result<ServiceStatus, RuntimeError> {
        const OP: &str = "service status";
        let filters = HashMap::from([("name", vec![service])]);
        let options = ListServicesOptionsBuilder::default().filters(&filters).status(true).build();
        let services =
            self.docker.list_services(Some(options)).await.map_err(|e| self.fail(OP, service, e))?;
        // `name=` matches prefixes: pick the exact one (or the id).
        let found = services
            .into_iter()
            .find(|s| {
                s.spec.as_ref().and_then(|spec| spec.name.as_deref()) == Some(service)
                    || s.id.as_deref() == Some(service)
            })
            .ok_or_else(|| RuntimeError::NotFound { id: service.to_owned() })?;
        let counts = found.service_status.unwrap_or_default();
        Ok(ServiceStatus {
            desired: counts.desired_tasks.unwrap_or(0),
            running: counts.running_tasks.unwrap_or(0),
        })
    }

    /// Sets a replicated service's replica count (inspect, change the full spec, update at the
    /// version read; retried up to [`SCALE_ATTEMPTS`] times on "update out of sequence").
    pub async fn scale_service(&self, service: &str, replicas: u64) -> Result<(), RuntimeError> {
        const OP: &str = "scale service";
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current =
                self.docker.inspect_service(service, None).await.map_err(|e| self.fail(OP, service, e))?;
            let version = current
                .version
                .and_then(|v| v.index)
                .ok_or_else(|| engine_error(OP, service, "no version index"))?;
            let mut spec = current.spec.ok_or_else(|| engine_error(OP, service, "no spec"))?;
            if spec
                .mode
                .as_ref()
                .is_some_and(|m| m.global.is_some() || m.global_job.is_some() || m.replicated_job.is_some())
            {
                return Err(engine_error(OP, service, "only replicated services can be scaled"));
            }
            let replicas =
                i64::try_from(replicas).map_err(|_| engine_error(OP, service, "replica count too large"))?;
            spec.mode = Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(replicas) }),
                ..Default::default()
            });
            let version = i32::try_from(version)
                .map_err(|_| engine_error(OP, service, "version index out of range"))?;
            let options = UpdateServiceOptionsBuilder::default().version(version).build();
            match self.docker.update_service(service, spec, options, None).await {
                Ok(_) => return Ok(()),
                Err(DockerError::DockerResponseServerError { message, .. })
                    if message.contains("update out of sequence") && attempt < SCALE_ATTEMPTS =>
                {
                    tracing::debug!(service, attempt, "service changed under the update; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                Err(e) => return Err(self.fail(OP, service, e)),
            }
        }
    }

    /// Polls [`service_status`](Self::service_status) every 250 ms until running equals desired;
    /// [`RuntimeError::Timeout`] after `within`.
    pub async fn wait_service_converged(
        &self,
        service: &str,
        within: Duration,
    ) -> Result<ServiceStatus, RuntimeError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = self.service_status(service).await?;
            if status.converged() {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    operation: "wait for service",
                    id: service.to_owned(),
                    after: within,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn fail(&self, operation: &'static str, id: &str, error: DockerError) -> RuntimeError {
        map_error(operation, id, self.docker.timeout(), error)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerStatus, RuntimeError> {
        const OP: &str = "inspect";
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => Ok(status_from_inspect(id, inspect)),
            Err(DockerError::JsonDataError { contents, message, .. }) => {
                // A state name bollard does not know: read the raw answer.
                let value: serde_json::Value = serde_json::from_str(&contents)
                    .map_err(|_| engine_error(OP, id, &format!("undecodable answer: {message}")))?;
                Ok(status_from_json(id, &value))
            }
            Err(e) => Err(self.fail(OP, id, e)),
        }
    }

    async fn stop_container(&self, id: &str, options: StopOptions) -> Result<(), RuntimeError> {
        const OP: &str = "stop";
        if let Some(signal) = options.signal.as_deref() {
            let kill = KillContainerOptionsBuilder::default().signal(signal).build();
            match self.docker.kill_container(id, Some(kill)).await {
                // 409: not running (any more): the stop below settles it.
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
                Err(e) => return Err(self.fail(OP, id, e)),
            }
        }
        let seconds = options.timeout.as_secs() + u64::from(options.timeout.subsec_nanos() > 0);
        let t = i32::try_from(seconds).unwrap_or(i32::MAX);
        let needed = Duration::from_secs(seconds) + STOP_TIMEOUT_MARGIN;
        let docker = if self.docker.timeout() < needed {
            self.docker.clone().with_timeout(needed)
        } else {
            self.docker.clone()
        };
        let stop = StopContainerOptionsBuilder::default().t(t).build();
        docker.stop_container(id, Some(stop)).await.map_err(|e| match e {
            DockerError::RequestTimeoutError => {
                RuntimeError::Timeout { operation: OP, id: id.to_owned(), after: needed }
            }
            other => self.fail(OP, id, other),
        })
    }

    fn event_stream(&self, filter: EventFilter) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let mut filters: HashMap<&str, Vec<&str>> =
            HashMap::from([("type", vec!["container"]), ("event", CONTAINER_EVENTS.to_vec())]);
        if !filter.containers.is_empty() {
            filters.insert("container", filter.containers.iter().map(String::as_str).collect());
        }
        if !filter.labels.is_empty() {
            filters.insert("label", filter.labels.iter().map(String::as_str).collect());
        }
        // The request goes out when the stream is first polled; `since` = now makes the engine
        // replay what happened in between, so nothing is lost after `events` returns.
        let options = EventsOptionsBuilder::default().since(&since_now()).filters(&filters).build();
        Box::pin(event_stream(&self.docker, options))
    }

    fn service_event_stream(
        &self,
        services: Vec<String>,
    ) -> BoxStream<'static, Result<ServiceEvent, RuntimeError>> {
        let actions: Vec<&str> = SERVICE_EVENTS.iter().chain(CONTAINER_EVENTS.iter()).copied().collect();
        let filters: HashMap<&str, Vec<&str>> =
            HashMap::from([("type", vec!["service", "container"]), ("event", actions)]);
        let options = EventsOptionsBuilder::default().since(&since_now()).filters(&filters).build();
        let inner = Box::pin(self.docker.events(Some(options)));
        let stream = futures_util::stream::unfold(Some(inner), move |state| {
            let services = services.clone();
            async move {
                let mut inner = state?;
                loop {
                    match inner.next().await {
                        Some(Ok(message)) => {
                            if let Some(event) = map_service_event(&message, &services) {
                                return Some((Ok(event), Some(inner)));
                            }
                        }
                        Some(Err(e)) => return Some((Err(stream_error(e)), None)),
                        None => {
                            let error = RuntimeError::Unreachable {
                                message: "the engine closed the event stream".to_owned(),
                            };
                            return Some((Err(error), None));
                        }
                    }
                }
            }
        });
        Box::pin(stream)
    }
}

/// The engine's `since` for "now": seconds and nanoseconds since the epoch.
fn since_now() -> String {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// The engine's event stream, mapped; one error item and the end when the engine goes away.
fn event_stream(
    docker: &Docker,
    options: bollard::query_parameters::EventsOptions,
) -> impl futures_util::Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static {
    enum State {
        Open(std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<EventMessage, DockerError>> + Send>>),
        Done,
    }
    let inner: std::pin::Pin<Box<dyn futures_util::Stream<Item = _> + Send>> =
        Box::pin(docker.events(Some(options)));
    futures_util::stream::unfold(State::Open(inner), |state| async move {
        let State::Open(mut inner) = state else { return None };
        loop {
            match inner.next().await {
                Some(Ok(message)) => {
                    if let Some(event) = map_event(&message) {
                        return Some((Ok(event), State::Open(inner)));
                    }
                }
                Some(Err(e)) => return Some((Err(stream_error(e)), State::Done)),
                None => {
                    let error = RuntimeError::Unreachable {
                        message: "the engine closed the event stream".to_owned(),
                    };
                    return Some((Err(error), State::Done));
                }
            }
        }
    })
}

fn stream_error(e: DockerError) -> RuntimeError {
    match e {
        DockerError::DockerResponseServerError { status_code, message } if status_code != 502 => {
            RuntimeError::Engine {
                operation: "events",
                id: String::new(),
                status: Some(status_code),
                message,
            }
        }
        other => RuntimeError::Unreachable { message: format!("event stream: {}", error_chain(&other)) },
    }
}

impl ContainerRuntime for DockerRuntime {
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerStatus, RuntimeError>> {
        Box::pin(self.inspect(id))
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(
            async move { self.docker.start_container(id, None).await.map_err(|e| self.fail("start", id, e)) },
        )
    }

    fn stop<'a>(&'a self, id: &'a str, options: StopOptions) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.stop_container(id, options))
    }

    fn kill<'a>(&'a self, id: &'a str, signal: Option<&'a str>) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let options = KillContainerOptionsBuilder::default().signal(signal.unwrap_or("SIGKILL")).build();
            self.docker.kill_container(id, Some(options)).await.map_err(|e| self.fail("kill", id, e))
        })
    }

    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { self.docker.pause_container(id).await.map_err(|e| self.fail("pause", id, e)) })
    }

    fn unpause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(
            async move { self.docker.unpause_container(id).await.map_err(|e| self.fail("unpause", id, e)) },
        )
    }

    fn events(&self, filter: EventFilter) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        self.event_stream(filter)
    }
}

impl ServiceRuntime for DockerRuntime {
    fn service_status<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<ServiceStatus, RuntimeError>> {
        Box::pin(DockerRuntime::service_status(self, service))
    }

    fn scale<'a>(&'a self, service: &'a str, replicas: u64) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.scale_service(service, replicas))
    }

    fn service_events(
        &self,
        services: Vec<String>,
    ) -> BoxStream<'static, Result<ServiceEvent, RuntimeError>> {
        self.service_event_stream(services)
    }
}

fn engine_error(operation: &'static str, id: &str, message: &str) -> RuntimeError {
    RuntimeError::Engine { operation, id: id.to_owned(), status: None, message: message.to_owned() }
}

/// Maps a bollard error to the runtime's error for `operation` on `id`; `client_timeout` is the
/// time-out of the client that made the call (reported in [`RuntimeError::Timeout`]).
pub fn map_error(
    operation: &'static str,
    id: &str,
    client_timeout: Duration,
    error: DockerError,
) -> RuntimeError {
    match error {
        DockerError::DockerResponseServerError { status_code: 404, .. } => {
            RuntimeError::NotFound { id: id.to_owned() }
        }
        // The agent's answer when its engine cannot be reached.
        DockerError::DockerResponseServerError { status_code: 502, message } => {
            RuntimeError::Unreachable { message }
        }
        DockerError::DockerResponseServerError { status_code, message } => {
            RuntimeError::Engine { operation, id: id.to_owned(), status: Some(status_code), message }
        }
        DockerError::RequestTimeoutError => {
            RuntimeError::Timeout { operation, id: id.to_owned(), after: client_timeout }
        }
        e @ (DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::SocketNotFoundError(_)) => RuntimeError::Unreachable { message: error_chain(&e) },
        other => {
            RuntimeError::Engine { operation, id: id.to_owned(), status: None, message: error_chain(&other) }
        }
    }
}

/// Maps an inspect answer.
pub fn status_from_inspect(asked: &str, inspect: ContainerInspectResponse) -> ContainerStatus {
    let state = inspect.state.unwrap_or_default();
    let container_state = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
        Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited { code: state.exit_code },
        Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
        Some(other) => ContainerState::Unknown(other.to_string()),
        None => ContainerState::Unknown(String::new()),
    };
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => ContainerHealth::Starting,
        Some(HealthStatusEnum::HEALTHY) => ContainerHealth::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => ContainerHealth::Unhealthy,
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => ContainerHealth::None,
    };
    ContainerStatus {
        id: inspect.id.unwrap_or_else(|| asked.to_owned()),
        name: inspect.name.map(|n| n.trim_start_matches('/').to_owned()).unwrap_or_default(),
        state: container_state,
        health,
        started_at: state.started_at.as_deref().and_then(parse_started_at),
    }
}

/// Maps a raw inspect answer (used when bollard cannot decode it).
pub fn status_from_json(asked: &str, value: &serde_json::Value) -> ContainerStatus {
    let state = &value["State"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let container_state = match state["Status"].as_str().unwrap_or_default() {
        "created" => ContainerState::Created,
        "running" => ContainerState::Running,
        "paused" => ContainerState::Paused,
        "restarting" => ContainerState::Restarting,
        "removing" => ContainerState::Removing,
        "exited" => ContainerState::Exited { code: state["ExitCode"].as_i64() },
        "dead" => ContainerState::Dead,
        other => ContainerState::Unknown(other.to_owned()),
    };
    let health = match state["Health"]["Status"].as_str() {
        Some("starting") => ContainerHealth::Starting,
        Some("healthy") => ContainerHealth::Healthy,
        Some("unhealthy") => ContainerHealth::Unhealthy,
        _ => ContainerHealth::None,
    };
    let id = text(&value["Id"]);
    ContainerStatus {
        id: if id.is_empty() { asked.to_owned() } else { id },
        name: text(&value["Name"]).trim_start_matches('/').to_owned(),
        state: container_state,
        health,
        started_at: state["StartedAt"].as_str().and_then(parse_started_at),
    }
}

/// RFC 3339 → time; `None` for the engine's "never" (`0001-01-01T00:00:00Z`) and for garbage.
pub fn parse_started_at(text: &str) -> Option<SystemTime> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    if parsed.unix_timestamp() <= 0 {
        return None;
    }
    Some(SystemTime::from(parsed))
}

/// Maps an engine event to a container event (`None` for other types and actions).
pub fn map_event(message: &EventMessage) -> Option<ContainerEvent> {
    if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = message.action.as_deref()?;
    let actor = message.actor.as_ref()?;
    let attributes = actor.attributes.as_ref();
    let attribute = |key: &str| attributes.and_then(|a| a.get(key)).cloned();
    let kind = match action {
        "start" => ContainerEventKind::Start,
        "die" => ContainerEventKind::Die { exit_code: attribute("exitCode").and_then(|c| c.parse().ok()) },
        "stop" => ContainerEventKind::Stop,
        "kill" => ContainerEventKind::Kill { signal: attribute("signal") },
        "pause" => ContainerEventKind::Pause,
        "unpause" => ContainerEventKind::Unpause,
        other => {
            let status = other.strip_prefix("health_status")?.trim_start_matches(':').trim();
            ContainerEventKind::Health(match status {
                "healthy" => ContainerHealth::Healthy,
                "unhealthy" => ContainerHealth::Unhealthy,
                "starting" => ContainerHealth::Starting,
                _ => return None,
            })
        }
    };
    let time = event_time(message);
    Some(ContainerEvent { id: actor.id.clone().unwrap_or_default(), name: attribute("name"), kind, time })
}

/// Maps an engine event to an event of one of `services` (`None` for anything else): a
/// `service` event of a named service, or a container event of one of their tasks.
pub fn map_service_event(message: &EventMessage, services: &[String]) -> Option<ServiceEvent> {
    let actor = message.actor.as_ref()?;
    let attribute = |key: &str| actor.attributes.as_ref().and_then(|a| a.get(key)).cloned();
    let time = event_time(message);
    match message.typ? {
        EventMessageTypeEnum::SERVICE => {
            let name = attribute("name").or_else(|| actor.id.clone())?;
            let named = services.iter().any(|s| *s == name || actor.id.as_deref() == Some(s.as_str()));
            if !named {
                return None;
            }
            let kind = match message.action.as_deref()? {
                "create" | "update" => ServiceEventKind::Updated,
                "remove" => ServiceEventKind::Removed,
                _ => return None,
            };
            Some(ServiceEvent { service: name, kind, time })
        }
        EventMessageTypeEnum::CONTAINER => {
            let service = attribute(SWARM_SERVICE_LABEL)?;
            if !services.contains(&service) {
                return None;
            }
            let kind = match map_event(message)?.kind {
                ContainerEventKind::Start | ContainerEventKind::Unpause => ServiceEventKind::TaskStarted,
                ContainerEventKind::Die { .. } | ContainerEventKind::Stop | ContainerEventKind::Pause => {
                    ServiceEventKind::TaskStopped
                }
                ContainerEventKind::Health(health) => ServiceEventKind::TaskHealth(health),
                ContainerEventKind::Kill { .. } => return None,
            };
            Some(ServiceEvent { service, kind, time })
        }
        _ => None,
    }
}

fn event_time(message: &EventMessage) -> SystemTime {
    match (message.time_nano, message.time) {
        (Some(nanos), _) if nanos > 0 => SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64),
        (_, Some(secs)) if secs > 0 => SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64),
        _ => SystemTime::now(),
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerState as DockerState, EventActor, Health};

    use super::*;

    fn inspect(
        status: Option<ContainerStateStatusEnum>,
        health: Option<HealthStatusEnum>,
    ) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/web".into()),
            state: Some(DockerState {
                status,
                exit_code: Some(137),
                started_at: Some("2024-05-01T10:20:30.123456789Z".into()),
                health: health.map(|status| Health { status: Some(status), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_docker_state_is_mapped() {
        use ContainerStateStatusEnum as S;
        let cases = [
            (Some(S::CREATED), ContainerState::Created),
            (Some(S::RUNNING), ContainerState::Running),
            (Some(S::PAUSED), ContainerState::Paused),
            (Some(S::RESTARTING), ContainerState::Restarting),
            (Some(S::REMOVING), ContainerState::Removing),
            (Some(S::EXITED), ContainerState::Exited { code: Some(137) }),
            (Some(S::DEAD), ContainerState::Dead),
            (Some(S::STOPPING), ContainerState::Unknown("stopping".into())),
            (Some(S::EMPTY), ContainerState::Unknown(String::new())),
            (None, ContainerState::Unknown(String::new())),
        ];
        for (docker, ours) in cases {
            let status = status_from_inspect("web", inspect(docker, None));
            assert_eq!(status.state, ours, "{docker:?}");
            assert_eq!((status.id.as_str(), status.name.as_str()), ("abc", "web"));
        }
    }

    #[test]
    fn health_and_start_time_are_mapped() {
        use HealthStatusEnum as H;
        for (docker, ours) in [
            (None, ContainerHealth::None),
            (Some(H::NONE), ContainerHealth::None),
            (Some(H::EMPTY), ContainerHealth::None),
            (Some(H::STARTING), ContainerHealth::Starting),
            (Some(H::HEALTHY), ContainerHealth::Healthy),
            (Some(H::UNHEALTHY), ContainerHealth::Unhealthy),
        ] {
            let status = status_from_inspect("web", inspect(Some(ContainerStateStatusEnum::RUNNING), docker));
            assert_eq!(status.health, ours);
        }
        let started = parse_started_at("2024-05-01T10:20:30.123456789Z").unwrap();
        assert_eq!(
            started.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::new(1_714_558_830, 123_456_789)
        );
        assert_eq!(parse_started_at("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_started_at("yesterday"), None);
    }

    #[test]
    fn raw_answers_keep_unknown_states_verbatim() {
        let value = serde_json::json!({
            "Id": "abc", "Name": "/web",
            "State": {"Status": "hibernating", "ExitCode": 0, "StartedAt": "0001-01-01T00:00:00Z",
                      "Health": {"Status": "healthy"}}
        });
        let status = status_from_json("web", &value);
        assert_eq!(status.state, ContainerState::Unknown("hibernating".into()));
        assert_eq!(status.health, ContainerHealth::Healthy);
        assert_eq!((status.id.as_str(), status.name.as_str(), status.started_at), ("abc", "web", None));
        let exited =
            status_from_json("x", &serde_json::json!({"State": {"Status": "exited", "ExitCode": 3}}));
        assert_eq!(exited.state, ContainerState::Exited { code: Some(3) });
        assert_eq!(exited.id, "x");
    }

    fn event(action: &str, attributes: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: Some(
                    attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                ),
            }),
            time: Some(1_700_000_000),
            time_nano: Some(1_700_000_000_500_000_000),
            ..Default::default()
        }
    }

    #[test]
    fn events_are_typed() {
        let kind = |action: &str, attrs: &[(&str, &str)]| map_event(&event(action, attrs)).map(|e| e.kind);
        assert_eq!(kind("start", &[]), Some(ContainerEventKind::Start));
        assert_eq!(
            kind("die", &[("exitCode", "143")]),
            Some(ContainerEventKind::Die { exit_code: Some(143) })
        );
        assert_eq!(kind("die", &[]), Some(ContainerEventKind::Die { exit_code: None }));
        assert_eq!(kind("stop", &[]), Some(ContainerEventKind::Stop));
        assert_eq!(
            kind("kill", &[("signal", "15")]),
            Some(ContainerEventKind::Kill { signal: Some("15".into()) })
        );
        assert_eq!(kind("pause", &[]), Some(ContainerEventKind::Pause));
        assert_eq!(kind("unpause", &[]), Some(ContainerEventKind::Unpause));
        assert_eq!(
            kind("health_status: healthy", &[]),
            Some(ContainerEventKind::Health(ContainerHealth::Healthy))
        );
        assert_eq!(
            kind("health_status: unhealthy", &[]),
            Some(ContainerEventKind::Health(ContainerHealth::Unhealthy))
        );
        assert_eq!(
            kind("health_status:starting", &[]),
            Some(ContainerEventKind::Health(ContainerHealth::Starting))
        );
        assert_eq!(kind("health_status: confused", &[]), None);
        assert_eq!(kind("exec_start: /bin/busybox wget", &[]), None);
        assert_eq!(kind("destroy", &[]), None);
        let full = map_event(&event("start", &[("name", "web")])).unwrap();
        assert_eq!(full.id, "abc");
        assert_eq!(full.name.as_deref(), Some("web"));
        assert_eq!(
            full.time.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_700_000_000_500)
        );
        let mut image_event = event("start", &[]);
        image_event.typ = Some(EventMessageTypeEnum::IMAGE);
        assert_eq!(map_event(&image_event), None);
    }

    #[test]
    fn service_events_keep_the_named_services_and_their_tasks() {
        let services = vec!["web".to_owned()];
        let mut update = event("update", &[("name", "web")]);
        update.typ = Some(EventMessageTypeEnum::SERVICE);
        let kind = |m: &EventMessage| map_service_event(m, &services).map(|e| (e.service, e.kind));
        assert_eq!(kind(&update), Some(("web".to_owned(), ServiceEventKind::Updated)));
        let mut remove = event("remove", &[("name", "web")]);
        remove.typ = Some(EventMessageTypeEnum::SERVICE);
        assert_eq!(kind(&remove), Some(("web".to_owned(), ServiceEventKind::Removed)));
        let mut other = event("update", &[("name", "db")]);
        other.typ = Some(EventMessageTypeEnum::SERVICE);
        assert_eq!(kind(&other), None);
        let task = |action: &str| event(action, &[(SWARM_SERVICE_LABEL, "web")]);
        assert_eq!(kind(&task("start")), Some(("web".to_owned(), ServiceEventKind::TaskStarted)));
        assert_eq!(kind(&task("die")), Some(("web".to_owned(), ServiceEventKind::TaskStopped)));
        assert_eq!(
            kind(&task("health_status: healthy")),
            Some(("web".to_owned(), ServiceEventKind::TaskHealth(ContainerHealth::Healthy)))
        );
        assert_eq!(kind(&task("kill")), None);
        assert_eq!(kind(&event("start", &[])), None, "a container of no service");
        assert_eq!(kind(&event("start", &[(SWARM_SERVICE_LABEL, "db")])), None);
    }

    const T: Duration = Duration::from_secs(7);

    #[test]
    fn errors_are_mapped() {
        let server = |status_code, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.into(),
        };
        assert!(
            matches!(map_error("start", "web", T, server(404, "No such container")), RuntimeError::NotFound { id } if id == "web")
        );
        assert!(matches!(
            map_error("pause", "web", T, server(409, "not running")),
            RuntimeError::Engine { operation: "pause", status: Some(409), .. }
        ));
        assert!(matches!(
            map_error("start", "web", T, server(403, "docker-agent: POST /containers/web/start denied: x")),
            RuntimeError::Engine { status: Some(403), message, .. } if message.contains("denied")
        ));
        assert!(matches!(
            map_error("start", "web", T, server(502, "engine down")),
            RuntimeError::Unreachable { .. }
        ));
        assert!(matches!(
            map_error("start", "web", T, DockerError::SocketNotFoundError("/nope".into())),
            RuntimeError::Unreachable { .. }
        ));
        assert!(matches!(
            map_error("start", "web", T, DockerError::RequestTimeoutError),
            RuntimeError::Timeout { after: T, .. }
        ));
    }
}
