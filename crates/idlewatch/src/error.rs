//! The crate's errors: a wake that failed, and a configuration that is wrong.

use std::time::Duration;

use pool_api::RuntimeError;

/// Why a wake did not end in "ready". Every waiter gets either ready or one of these within its
/// wake time-out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WakeError {
    /// Not ready within the wake time-out.
    #[error("{workload} was not ready within {after:?}")]
    Timeout {
        /// The workload's name.
        workload: String,
        /// The wake time-out.
        after: Duration,
    },
    /// The engine refused or failed the start (or unpause, or scale-up).
    #[error("{workload} could not be started: {source}")]
    Start {
        /// The workload's name.
        workload: String,
        /// The engine's error.
        source: RuntimeError,
    },
    /// The engine failed the stop; the workload's state is unknown until the next event.
    #[error("{workload} could not be stopped: {source}")]
    Stop {
        /// The workload's name.
        workload: String,
        /// The engine's error.
        source: RuntimeError,
    },
    /// The workload went down (exited, died, was stopped or paused from outside) while it was
    /// starting. A wake that unpaused the workload does not end this way on a "paused" read:
    /// the engine may report the pause a moment after it answered the unpause, so reads go on
    /// until the wake time-out ([`WakeError::Timeout`]).
    #[error("{workload} went down while it was starting")]
    WentDown {
        /// The workload's name.
        workload: String,
    },
    /// A dependency did not come up.
    #[error("{workload} could not start: its dependency {dependency} failed: {source}")]
    Dependency {
        /// The workload's name.
        workload: String,
        /// The dependency's name.
        dependency: String,
        /// What the dependency's wake answered.
        source: Box<WakeError>,
    },
    /// The engine does not know the workload (removed, or never created).
    #[error("{workload} does not exist")]
    NotFound {
        /// The workload's name.
        workload: String,
    },
    /// The watcher is not running (never started, or stopped).
    #[error("the watcher of {workload} is not running")]
    NotWatching {
        /// The workload's name.
        workload: String,
    },
}

/// Every problem of an [`IdleConfig`](crate::IdleConfig), one message each.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid idlewatch configuration: {}", problems.join("; "))]
pub struct IdleConfigError {
    /// The problems, in the order of the fields.
    pub problems: Vec<String>,
}
