//! The pool's error type.

use std::time::Duration;

use pool_api::{EventKind, TransportError};

/// Why no connection of an agent could take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No connection is up (the agent is unreachable or still connecting).
    NoConnections,
    /// Every endpoint's circuit breaker is open.
    CircuitOpen,
    /// Every connected agent instance is draining or reports itself unhealthy.
    AgentNotReady,
    /// Every usable connection is at its concurrency limit (only from
    /// [`AgentPool::try_reserve`](crate::AgentPool::try_reserve), which does not wait).
    NoCapacity,
    /// The agent is being removed from the pool.
    Removed,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoConnections => "no connection is up",
            Self::CircuitOpen => "every circuit breaker is open",
            Self::AgentNotReady => "every instance is draining or unhealthy",
            Self::NoCapacity => "every connection is at its concurrency limit",
            Self::Removed => "the agent is being removed",
        })
    }
}

/// Everything that can go wrong in the pool. Each variant names the agent involved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No agent with this id is registered.
    #[error("unknown agent {agent:?}")]
    UnknownAgent {
        /// The id asked for.
        agent: String,
    },
    /// An agent with this id is already registered.
    #[error("agent {agent:?} is already registered")]
    AgentExists {
        /// The id.
        agent: String,
    },
    /// The agent specification or configuration is invalid; every problem is listed.
    #[error("invalid configuration: {}", .problems.join("; "))]
    InvalidConfig {
        /// One line per problem, each naming the field.
        problems: Vec<String>,
    },
    /// An endpoint of the agent is not one its connector can dial: malformed, or of a scheme
    /// the connector does not serve. Found by
    /// [`Connector::validate_endpoint`](pool_api::Connector::validate_endpoint) when the agent
    /// is added, before anything is registered or dialled.
    #[error("agent {agent:?}: {source}")]
    InvalidEndpoint {
        /// The agent.
        agent: String,
        /// The connector's verdict, naming the endpoint and what is wrong with it.
        #[source]
        source: TransportError,
    },
    /// The pool is shutting down, or has shut down, and admits nothing new. Once
    /// [`AgentPool::shutdown`](crate::AgentPool::shutdown) has begun, every send, reservation,
    /// session, cancel, push and lookup answers this, whatever agent id it names.
    #[error("the pool is shutting down")]
    ShuttingDown,
    /// The pool was built outside a tokio runtime.
    #[error("the pool must be created inside a tokio runtime")]
    NoRuntime,
    /// No connection can take the request and the agent fails closed.
    #[error("agent {agent:?} is unavailable: {reason}")]
    Unavailable {
        /// The agent.
        agent: String,
        /// Why.
        reason: Unavailable,
    },
    /// Every usable connection is paused by the agent's flow control (and the flow-control
    /// mode fails closed, or its wait ran out).
    #[error("agent {agent:?} paused every connection (flow control)")]
    FlowControlPaused {
        /// The agent.
        agent: String,
    },
    /// The request was cancelled before the agent answered.
    #[error("request to agent {agent:?} cancelled: {reason}")]
    Cancelled {
        /// The agent.
        agent: String,
        /// Why.
        reason: pool_api::CancelReason,
    },
    /// The connection a request is pinned to by correlation affinity died; the agent's state
    /// for the request is gone with it, so the request is not moved elsewhere. (A sticky
    /// session is moved to a healthy connection instead; a sticky send fails with this only
    /// if the connections it is moved to keep dying, four times in one send.)
    #[error("agent {agent:?}: the connection pinned for {key:?} was lost")]
    PinLost {
        /// The agent.
        agent: String,
        /// The correlation id or session id that was pinned.
        key: String,
    },
    /// A reverse connection was refused.
    #[error("reverse connection of agent {agent:?} refused: {reason}")]
    Unauthorized {
        /// The agent id it claimed.
        agent: String,
        /// Why.
        reason: &'static str,
    },
    /// The request did not complete within its time-out (permit wait included).
    #[error("request to agent {agent:?} timed out after {after:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// The time-out that applied (after any degraded-health multiplier).
        after: Duration,
    },
    /// The agent did not subscribe to this kind of event.
    #[error("agent {agent:?} does not accept {kind} events")]
    UnsupportedEvent {
        /// The agent.
        agent: String,
        /// The event kind.
        kind: EventKind,
    },
    /// The body exceeds what the agent accepts.
    #[error("body of {size} bytes exceeds agent {agent:?}'s limit of {limit} bytes")]
    BodyTooLarge {
        /// The agent.
        agent: String,
        /// The body size (chunk or declared total).
        size: u64,
        /// The agent's limit.
        limit: u64,
    },
    /// The connection or the agent failed the request.
    #[error("agent {agent:?} via {connection}: {source}")]
    Transport {
        /// The agent.
        agent: String,
        /// The connection's label.
        connection: String,
        /// What the transport reported.
        #[source]
        source: TransportError,
    },
}

impl PoolError {
    /// True if the failure says something about the agent's health (it counts against its
    /// health score and circuit breaker); false for caller mistakes and pool state. An event
    /// too large for the transport's frame limit is the caller's: it does not count.
    pub fn is_agent_failure(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Transport { source, .. } => {
                !matches!(source, TransportError::Cancelled(_) | TransportError::MessageTooLarge { .. })
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(source: TransportError) -> PoolError {
        PoolError::Transport { agent: "waf".into(), connection: "unix:/run/waf.sock#0".into(), source }
    }

    #[test]
    fn an_event_over_the_frame_limit_does_not_count_against_the_agent() {
        let too_large = transport(TransportError::MessageTooLarge {
            connection: "unix:/run/waf.sock#0".into(),
            size: 70_000,
            limit: 65_536,
        });
        assert!(!too_large.is_agent_failure());
        let closed = transport(TransportError::Closed {
            connection: "unix:/run/waf.sock#0".into(),
            reason: "the agent closed the connection".into(),
        });
        assert!(closed.is_agent_failure());
        assert!(!transport(TransportError::Cancelled(pool_api::CancelReason::Timeout)).is_agent_failure());
    }
}
