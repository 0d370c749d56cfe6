//! Error types. Each says what failed and where; all are `Clone` so one failure can be handed
//! to every request it affects.

use std::io;
use std::time::Duration;

use crate::event::CancelReason;

/// A failure of a transport: connecting, handshaking, or exchanging messages on a connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint could not be reached.
    #[error("cannot connect to {endpoint}: {message}")]
    Connect {
        /// The endpoint dialled.
        endpoint: String,
        /// The I/O error kind, when there was one.
        kind: Option<io::ErrorKind>,
        /// What went wrong.
        message: String,
    },
    /// The endpoint was malformed or names a scheme this transport does not serve (see
    /// [`Connector::validate_endpoint`](crate::Connector::validate_endpoint)). The endpoint is
    /// quoted in the message, so an empty or space-padded one shows as such.
    #[error("invalid endpoint {endpoint:?}: {message}")]
    InvalidEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        message: String,
    },
    /// The handshake did not complete.
    #[error("handshake with {endpoint} failed: {message}")]
    Handshake {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// Proxy and agent share no protocol version.
    #[error("protocol version mismatch with {endpoint}: proxy speaks {proxy:?}, agent speaks {agent:?}")]
    VersionMismatch {
        /// The endpoint.
        endpoint: String,
        /// Versions the proxy offered.
        proxy: Vec<u32>,
        /// Versions the agent offered.
        agent: Vec<u32>,
    },
    /// An operation did not finish in time.
    #[error("{operation} on {target} timed out after {after:?}")]
    Timeout {
        /// What timed out (`"connect"`, `"handshake"`, `"ping"`…).
        operation: &'static str,
        /// The endpoint or connection.
        target: String,
        /// The time allowed.
        after: Duration,
    },
    /// The connection is closed; every request pending on it fails with this.
    #[error("connection {connection} closed: {reason}")]
    Closed {
        /// The connection's label.
        connection: String,
        /// Why it closed (EOF, decode error, shut down…).
        reason: String,
    },
    /// The peer broke the protocol (bad frame, unknown message, unexpected reply).
    #[error("protocol error on {connection}: {message}")]
    Protocol {
        /// The connection's label.
        connection: String,
        /// What was wrong.
        message: String,
    },
    /// An outgoing message would exceed the connection's frame limit. It was refused before any
    /// of it was written, so only the request (or push) that carried it fails; the connection
    /// and everything else on it go on. (A peer announcing an oversized frame breaks the
    /// framing instead, and ends the connection with [`Closed`](Self::Closed).)
    #[error("message of {size} bytes on {connection} exceeds the {limit}-byte limit")]
    MessageTooLarge {
        /// The connection's label.
        connection: String,
        /// The size the message would have had on the wire, in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The request was cancelled before an answer came.
    #[error("request cancelled: {0}")]
    Cancelled(CancelReason),
    /// No answer came by the deadline the request was sent with
    /// ([`AgentConnection::send_until`](crate::AgentConnection::send_until)); the agent was
    /// told to cancel it.
    #[error("no answer on {connection} by the request's deadline")]
    DeadlineExceeded {
        /// The connection's label.
        connection: String,
    },
    /// The agent answered with an error instead of a decision.
    #[error("agent error: {0}")]
    Agent(#[from] AgentError),
    /// The agent does not support the operation (per its capabilities).
    #[error("{operation} is not supported by {connection}")]
    Unsupported {
        /// The connection's label.
        connection: String,
        /// The operation.
        operation: &'static str,
    },
    /// The peer's credentials were refused (peer uid/gid, token, certificate).
    #[error("peer on {connection} refused: {message}")]
    Unauthorized {
        /// The connection's label.
        connection: String,
        /// Why.
        message: String,
    },
}

impl TransportError {
    /// Builds a [`TransportError::Connect`] from an I/O error.
    pub fn connect(endpoint: impl Into<String>, err: &io::Error) -> Self {
        Self::Connect { endpoint: endpoint.into(), kind: Some(err.kind()), message: err.to_string() }
    }

    /// True for errors that end the connection (as opposed to one request).
    /// [`MessageTooLarge`](Self::MessageTooLarge) is not one of them: it fails one request.
    pub fn is_connection_fatal(&self) -> bool {
        matches!(self, Self::Closed { .. } | Self::Protocol { .. })
    }
}

/// An error an agent's handler returns instead of a decision.
///
/// The proxy never turns it into "allow": it counts as a failed request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// What went wrong, in the agent's words.
    pub message: String,
}

impl AgentError {
    /// An error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

/// A failure to start, stop or restart something with a [`Lifecycle`](crate::Lifecycle).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// Start was called while running.
    #[error("{name} is already running")]
    AlreadyRunning {
        /// What is running.
        name: String,
    },
    /// The thing is disabled by configuration and is never started.
    #[error("{name} is disabled")]
    Disabled {
        /// What is disabled.
        name: String,
    },
    /// Start failed.
    #[error("{name} failed to start: {message}")]
    Start {
        /// What failed.
        name: String,
        /// The I/O error kind, when there was one (address in use, permission denied…).
        kind: Option<io::ErrorKind>,
        /// Why.
        message: String,
    },
    /// Stop failed.
    #[error("{name} failed to stop: {message}")]
    Stop {
        /// What failed.
        name: String,
        /// Why.
        message: String,
    },
}

/// A failure of a [`ContainerRuntime`](crate::ContainerRuntime) call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No such container.
    #[error("container {id} not found")]
    NotFound {
        /// The container asked for.
        id: String,
    },
    /// The runtime cannot do this (e.g. pause on an engine without cgroup freezer).
    #[error("{operation} is not supported by this runtime")]
    Unsupported {
        /// The operation.
        operation: &'static str,
    },
    /// The engine refused or failed the call.
    #[error("{operation} on {id} failed: {message}")]
    Engine {
        /// The operation.
        operation: &'static str,
        /// The container.
        id: String,
        /// The engine's HTTP status, when it answered one.
        status: Option<u16>,
        /// The engine's message.
        message: String,
    },
    /// The engine could not be reached.
    #[error("container engine unreachable: {message}")]
    Unreachable {
        /// Why.
        message: String,
    },
    /// The call did not finish in time.
    #[error("{operation} on {id} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// The container.
        id: String,
        /// The time allowed.
        after: Duration,
    },
}
