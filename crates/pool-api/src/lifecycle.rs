//! Start/stop for long-running things: HTTP servers, container watchers.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::LifecycleError;

/// Where a [`Lifecycle`] is.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "state", content = "error"))]
pub enum LifecycleState {
    /// Not running.
    #[default]
    Stopped,
    /// Start called, not yet serving.
    Starting,
    /// Serving.
    Running,
    /// Stop called, draining.
    Stopping,
    /// Start or run failed; the message says why.
    Failed(String),
}

/// What a stop did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StopReport {
    /// Units of work (requests, connections) that finished on their own during the drain.
    pub drained: u64,
    /// Units of work cut off at the deadline.
    pub forced: u64,
    /// How long the stop took.
    pub elapsed: Duration,
}

/// Something that starts, runs in the background, and stops.
///
/// `start` returns once the thing is really running (a server is listening) or with the error
/// that prevented it; `stop` returns once it has stopped, with what it drained and forced.
pub trait Lifecycle: Send + Sync {
    /// Starts. Fails with [`LifecycleError::AlreadyRunning`] if running.
    fn start(&self) -> impl Future<Output = Result<(), LifecycleError>> + Send;

    /// Stops gracefully. Stopping something stopped is not an error; it reports nothing done.
    fn stop(&self) -> impl Future<Output = Result<StopReport, LifecycleError>> + Send;

    /// Stops (if running), then starts.
    fn restart(&self) -> impl Future<Output = Result<(), LifecycleError>> + Send {
        async {
            self.stop().await?;
            self.start().await
        }
    }

    /// True while running.
    fn is_running(&self) -> bool;

    /// Time since the current run started; `None` when not running.
    fn uptime(&self) -> Option<Duration>;

    /// Subscribes to state changes.
    fn state(&self) -> watch::Receiver<LifecycleState>;
}
