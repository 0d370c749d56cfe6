//! Signals an agent sends on its own: health and flow control.

use std::time::Duration;

/// The health an agent reports about itself.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "status"))]
pub enum HealthStatus {
    /// Working normally.
    #[default]
    Healthy,
    /// Working, but slower: the proxy multiplies its request time-out by `timeout_multiplier`.
    Degraded {
        /// Factor (≥ 1.0) applied to the request time-out.
        timeout_multiplier: f32,
    },
    /// Finishing what it has; sends no new work here.
    Draining {
        /// When the agent expects to be done, if it knows.
        eta: Option<Duration>,
    },
    /// Not fit to take requests.
    Unhealthy,
}

impl HealthStatus {
    /// True if the agent accepts new requests in this state.
    pub fn accepts_requests(&self) -> bool {
        matches!(self, Self::Healthy | Self::Degraded { .. })
    }

    /// The factor to apply to request time-outs (1.0 unless degraded; never below 1.0).
    pub fn timeout_multiplier(&self) -> f32 {
        match self {
            Self::Degraded { timeout_multiplier } if timeout_multiplier.is_finite() => {
                timeout_multiplier.max(1.0)
            }
            _ => 1.0,
        }
    }
}

/// An agent's health report.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AgentHealth {
    /// The state.
    pub status: HealthStatus,
    /// Load from 0.0 (idle) to 1.0 (saturated), if the agent measures it.
    pub load: Option<f32>,
    /// A human-readable note.
    pub message: Option<String>,
}

impl AgentHealth {
    /// A healthy report with no load figure.
    pub fn healthy() -> Self {
        Self::default()
    }

    /// A report with the given status.
    pub fn with_status(status: HealthStatus) -> Self {
        Self { status, ..Self::default() }
    }
}

/// A flow-control signal from an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum FlowControl {
    /// Send nothing new until resumed.
    Pause,
    /// Sending may go on.
    Resume,
    /// The agent can take this many more requests now.
    Capacity(u32),
}

/// The flow-control state of one connection, after applying the agent's signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FlowState {
    /// True between a pause and the next resume.
    pub paused: bool,
    /// The last capacity the agent announced, if any.
    pub capacity: Option<u32>,
}

impl FlowState {
    /// The state after `signal`.
    #[must_use]
    pub fn apply(self, signal: FlowControl) -> Self {
        match signal {
            FlowControl::Pause => Self { paused: true, ..self },
            FlowControl::Resume => Self { paused: false, ..self },
            FlowControl::Capacity(n) => Self { capacity: Some(n), ..self },
        }
    }
}

/// One measurement an agent reports about itself (requests handled, rules loaded, queue depth…),
/// sent whenever the agent likes; the proxy records it as a gauge.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AgentMetric {
    /// The metric's name, as the agent chose it.
    pub name: String,
    /// Its current value.
    pub value: f64,
    /// Label pairs that qualify it.
    pub labels: Vec<(String, String)>,
}

impl AgentMetric {
    /// A metric without labels.
    pub fn new(name: impl Into<String>, value: f64) -> Self {
        Self { name: name.into(), value, labels: Vec::new() }
    }

    /// Adds a label.
    #[must_use]
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }
}

/// Everything a connection publishes about its agent, on a watch channel.
///
/// The connection's own task owns the sender; when the connection dies it sets `open` to false
/// (or drops the sender), so a watcher learns of it at once and never has to poll.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ConnectionSignals {
    /// False once the connection is closed for good.
    pub open: bool,
    /// The agent has been told the proxy is draining this connection.
    pub draining: bool,
    /// Flow control.
    pub flow: FlowState,
    /// The agent's last health report.
    pub health: AgentHealth,
}

impl ConnectionSignals {
    /// The signals of a freshly opened, healthy connection.
    pub fn open() -> Self {
        Self { open: true, ..Self::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_state_follows_signals() {
        let s = FlowState::default().apply(FlowControl::Pause).apply(FlowControl::Capacity(3));
        assert!(s.paused);
        assert_eq!(s.capacity, Some(3));
        assert!(!s.apply(FlowControl::Resume).paused);
    }

    #[test]
    fn only_healthy_and_degraded_accept_requests() {
        assert!(HealthStatus::Healthy.accepts_requests());
        assert!(HealthStatus::Degraded { timeout_multiplier: 2.0 }.accepts_requests());
        assert!(!HealthStatus::Draining { eta: None }.accepts_requests());
        assert!(!HealthStatus::Unhealthy.accepts_requests());
    }

    #[test]
    fn timeout_multiplier_never_shrinks_or_goes_wild() {
        assert_eq!(HealthStatus::Degraded { timeout_multiplier: 0.5 }.timeout_multiplier(), 1.0);
        assert_eq!(HealthStatus::Degraded { timeout_multiplier: f32::NAN }.timeout_multiplier(), 1.0);
        assert_eq!(HealthStatus::Degraded { timeout_multiplier: 3.0 }.timeout_multiplier(), 3.0);
        assert_eq!(HealthStatus::Healthy.timeout_multiplier(), 1.0);
    }
}
