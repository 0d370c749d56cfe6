//! How a request that no connection can take is answered, and counted.
//!
//! [`AgentShared::refuse`] is the one mapping of a [`Reject`] to an error. A send (which may
//! wait) first lets the agent's modes speak: [`AgentShared::answer`] turns "nothing usable"
//! into an error or, for an agent that fails open, an "allow" tagged `agentpool:fail-open`;
//! and "every usable connection is paused" into an error, an "allow" tagged
//! `agentpool:flow-control-open`, or a wait for the resume, by the flow-control mode. A
//! reservation, which cannot carry an answer, always gets the error.

use std::sync::atomic::{AtomicU64, Ordering};

use pool_api::{Decision, EventKind};

use super::AgentShared;
use crate::config::{FailureMode, FlowControlMode};
use crate::error::{PoolError, Unavailable};

/// Why no permit could be taken right now on the balancer's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Usable connections exist but all are at their concurrency limit.
    Full,
    /// No connection accepts this event kind.
    Unsupported,
    /// Every otherwise usable connection is paused by the agent's flow control.
    Paused,
    /// Nothing can take the request.
    Unavailable(Unavailable),
}

/// Requests answered without reaching the agent, by cause (see [`Totals`](super::Totals)).
#[derive(Default)]
pub(crate) struct Refused {
    /// Refused because no connection could take them.
    pub(crate) unavailable: AtomicU64,
    /// Let through by fail-open because no connection could take them.
    pub(crate) fail_open: AtomicU64,
    /// Refused because every usable connection was paused (flow control).
    pub(crate) flow_rejected: AtomicU64,
    /// Let through because every usable connection was paused (flow control).
    pub(crate) flow_fail_open: AtomicU64,
}

impl AgentShared {
    /// The error for a request refused with `reject`, counted as such: the one mapping of a
    /// rejection to an error. `Full` — a reservation, which does not wait, found every usable
    /// connection busy — is [`Unavailable::NoCapacity`].
    #[cold]
    pub(crate) fn refuse(&self, reject: Reject, kind: Option<EventKind>) -> PoolError {
        match reject {
            Reject::Full => {
                PoolError::Unavailable { agent: self.id.to_string(), reason: Unavailable::NoCapacity }
            }
            Reject::Unsupported => PoolError::UnsupportedEvent {
                agent: self.id.to_string(),
                kind: kind.unwrap_or(EventKind::RequestHeaders),
            },
            Reject::Paused => self.refuse_paused(false),
            Reject::Unavailable(reason) => self.refuse_unavailable(reason),
        }
    }

    /// A request's answer for `reject` when it will not wait: the failure mode or the
    /// flow-control mode may let it through. In mode wait-and-retry a paused agent is waited
    /// for by the caller; asked here, the wait has run out.
    pub(crate) fn answer(&self, reject: Reject, kind: Option<EventKind>) -> Result<Decision, PoolError> {
        match reject {
            Reject::Unavailable(reason) if self.settings.failure_mode == FailureMode::Open => {
                Ok(self.fail_open(reason))
            }
            Reject::Paused => self.paused().unwrap_or_else(|| Err(self.refuse_paused(true))),
            other => Err(self.refuse(other, kind)),
        }
    }

    /// The answer to a paused agent by its flow-control mode, or `None` to wait for a resume.
    pub(crate) fn paused(&self) -> Option<Result<Decision, PoolError>> {
        match self.settings.flow_control {
            FlowControlMode::FailClosed => Some(Err(self.refuse_paused(false))),
            FlowControlMode::FailOpen => {
                self.metrics.flow_fail_open.increment(1);
                self.refused.flow_fail_open.fetch_add(1, Ordering::Relaxed);
                Some(Ok(Decision::allow()
                    .with_tag("agentpool:flow-control-open")
                    .with_reason(format!("agent {} skipped: paused by flow control", self.id))))
            }
            FlowControlMode::WaitAndRetry => None,
        }
    }

    /// Lets a request through that no connection could take (the agent fails open).
    #[cold]
    fn fail_open(&self, reason: Unavailable) -> Decision {
        self.metrics.unavailable.increment(1);
        self.metrics.fail_open.increment(1);
        self.refused.fail_open.fetch_add(1, Ordering::Relaxed);
        Decision::allow()
            .with_tag("agentpool:fail-open")
            .with_reason(format!("agent {} skipped: {reason}", self.id))
    }

    /// Counts a request refused because no connection could take it, and says so.
    #[cold]
    pub(crate) fn refuse_unavailable(&self, reason: Unavailable) -> PoolError {
        self.metrics.unavailable.increment(1);
        self.metrics.unavailable_rejected.increment(1);
        self.refused.unavailable.fetch_add(1, Ordering::Relaxed);
        PoolError::Unavailable { agent: self.id.to_string(), reason }
    }

    /// Counts a request refused because every usable connection was paused by the agent's
    /// flow control — at once (`timed_out` false) or after a wait for a resume ran out — and
    /// says so.
    #[cold]
    pub(crate) fn refuse_paused(&self, timed_out: bool) -> PoolError {
        if timed_out {
            self.metrics.flow_timed_out.increment(1);
        } else {
            self.metrics.flow_rejected.increment(1);
        }
        self.refused.flow_rejected.fetch_add(1, Ordering::Relaxed);
        PoolError::FlowControlPaused { agent: self.id.to_string() }
    }
}
