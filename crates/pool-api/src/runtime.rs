//! What a container watcher needs from a container engine.

use std::time::{Duration, SystemTime};

use crate::error::RuntimeError;
use crate::transport::{BoxFuture, BoxStream};

/// A container's state, as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ContainerState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Frozen by pause.
    Paused,
    /// Being restarted by its restart policy.
    Restarting,
    /// Being removed.
    Removing,
    /// Stopped.
    Exited {
        /// Exit code, when known.
        code: Option<i64>,
    },
    /// Failed to stop or remove; needs operator attention.
    Dead,
    /// A state this crate does not know, verbatim.
    Unknown(String),
}

impl ContainerState {
    /// True if the container's processes are running (not paused).
    pub fn is_running(&self) -> bool {
        matches!(self, Self::Running)
    }
}

/// A container's health-check status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ContainerHealth {
    /// No health check is configured.
    None,
    /// Checks have not yet passed.
    Starting,
    /// The last checks passed.
    Healthy,
    /// The checks are failing.
    Unhealthy,
}

/// A container's state and health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Engine id.
    pub id: String,
    /// Name, without the leading `/`.
    pub name: String,
    /// State.
    pub state: ContainerState,
    /// Health-check status.
    pub health: ContainerHealth,
    /// When the container last started, if it has.
    pub started_at: Option<SystemTime>,
}

impl ContainerStatus {
    /// True if running and either healthy or without a health check.
    pub fn is_ready(&self) -> bool {
        self.state.is_running() && matches!(self.health, ContainerHealth::Healthy | ContainerHealth::None)
    }
}

/// How to stop a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOptions {
    /// Signal to send first (`None`: the container's configured stop signal).
    pub signal: Option<String>,
    /// How long to wait after the signal before killing.
    pub timeout: Duration,
}

impl Default for StopOptions {
    fn default() -> Self {
        Self { signal: None, timeout: Duration::from_secs(10) }
    }
}

/// What happened to a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerEventKind {
    /// Started.
    Start,
    /// Its main process exited.
    Die {
        /// Exit code, when known.
        exit_code: Option<i64>,
    },
    /// Stopped.
    Stop,
    /// Sent a signal.
    Kill {
        /// The signal, when known.
        signal: Option<String>,
    },
    /// Paused.
    Pause,
    /// Unpaused.
    Unpause,
    /// Its health status changed.
    Health(ContainerHealth),
}

/// One container event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Engine id of the container.
    pub id: String,
    /// Name of the container, when the engine said.
    pub name: Option<String>,
    /// What happened.
    pub kind: ContainerEventKind,
    /// When.
    pub time: SystemTime,
}

/// Which containers' events to stream.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EventFilter {
    /// Container ids or names; empty = all.
    pub containers: Vec<String>,
    /// Labels (`key` or `key=value`) every container must carry; empty = no constraint.
    pub labels: Vec<String>,
}

/// Controls containers on some engine. Implemented for Docker (locally or through an agent) by
/// `docker-agent`; used by `idlewatch`, which never learns which engine it talks to.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// State and health of a container (by id or name).
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerStatus, RuntimeError>>;

    /// Starts a stopped container; starting a running one succeeds.
    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Sends the stop signal, waits up to the time-out, then kills.
    fn stop<'a>(&'a self, id: &'a str, options: StopOptions) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Sends `signal` (default `SIGKILL`).
    fn kill<'a>(&'a self, id: &'a str, signal: Option<&'a str>) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Freezes the container's processes.
    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Thaws a paused container.
    fn unpause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Streams events of the containers `filter` selects, until dropped.
    fn events(&self, filter: EventFilter) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>>;
}
