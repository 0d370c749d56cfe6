//! What a watcher needs from an engine that runs replicated services (Docker Swarm): replica
//! counts, scaling, and a stream of changes.

use std::time::SystemTime;

use crate::error::RuntimeError;
use crate::runtime::ContainerHealth;
use crate::transport::{BoxFuture, BoxStream};

/// A replicated service's task counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ServiceStatus {
    /// Tasks the service should run (its replica count).
    pub desired: u64,
    /// Tasks running. An engine that runs health checks counts a task only once it passed them
    /// (Swarm keeps a task `starting` until then).
    pub running: u64,
}

impl ServiceStatus {
    /// True when running equals desired.
    pub fn converged(&self) -> bool {
        self.running == self.desired
    }
}

/// What happened to a service or to one of its tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceEventKind {
    /// The service's spec changed (e.g. scaled) or an update finished.
    Updated,
    /// The service was removed.
    Removed,
    /// A task's container started.
    TaskStarted,
    /// A task's container stopped or died.
    TaskStopped,
    /// A task's container reported a health status.
    TaskHealth(ContainerHealth),
}

/// One service event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    /// The service's name (or id when the engine gave no name).
    pub service: String,
    /// What happened.
    pub kind: ServiceEventKind,
    /// When.
    pub time: SystemTime,
}

/// Scales replicated services on some engine. Implemented for Docker Swarm by `docker-agent`;
/// used by `idlewatch` to put a service to sleep (0 replicas) and wake it.
pub trait ServiceRuntime: Send + Sync + 'static {
    /// Desired and running tasks of a service (by name or id); [`RuntimeError::NotFound`] for
    /// an unknown service.
    fn service_status<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<ServiceStatus, RuntimeError>>;

    /// Sets a replicated service's replica count. Setting the count it already has succeeds.
    fn scale<'a>(&'a self, service: &'a str, replicas: u64) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Streams events of these services (by name) and of their tasks' containers, until
    /// dropped. If the engine goes away the stream yields one [`RuntimeError::Unreachable`] and
    /// ends.
    fn service_events(&self, services: Vec<String>)
    -> BoxStream<'static, Result<ServiceEvent, RuntimeError>>;
}
