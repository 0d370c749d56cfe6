//! The crate's one error type.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use pool_api::LifecycleError;

/// One thing wrong with a configuration: which server, which field, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The server's name (or its position when it has no name).
    pub server: String,
    /// The field at fault, e.g. `listen` or `tls.cert`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server `{}`, field `{}`: {}", self.server, self.field, self.message)
    }
}

/// A lifecycle operation that failed on one server of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFailure {
    /// The server's canonical bind address.
    pub bind: SocketAddr,
    /// The server's name.
    pub name: String,
    /// What went wrong.
    pub error: LifecycleError,
}

impl fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.bind, self.error)
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listen address could not be parsed or resolved.
    #[error("invalid listen address {input:?}: {reason}")]
    Address {
        /// What was given.
        input: String,
        /// Why it is not an address.
        reason: String,
    },
    /// A configuration has problems; all of them are listed.
    #[error("invalid configuration: {}", join(.problems))]
    Invalid {
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// Two servers resolve to one socket address.
    #[error("duplicate bind {bind}: `{existing}` already listens there, `{new}` cannot")]
    DuplicateBind {
        /// The shared canonical address.
        bind: SocketAddr,
        /// The server already holding it.
        existing: String,
        /// The server that was refused.
        new: String,
    },
    /// TLS material could not be loaded or does not fit together.
    #[error("server `{server}`: TLS: {message}")]
    Tls {
        /// The server's name.
        server: String,
        /// What is wrong.
        message: String,
    },
    /// Binding the listening socket failed (see `source.kind()`: address in use, permission denied…).
    #[error("server `{server}` cannot listen on {bind}: {source}")]
    Bind {
        /// The server's name.
        server: String,
        /// The address it tried.
        bind: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
    /// A server has no handler and the pool has no default handler.
    #[error("server `{server}` has no handler and the pool has no default handler")]
    MissingHandler {
        /// The server's name.
        server: String,
    },
    /// A glob or regex did not compile.
    #[error("invalid {kind} pattern {pattern:?}: {message}")]
    Pattern {
        /// `glob` or `regex`.
        kind: &'static str,
        /// The pattern given.
        pattern: String,
        /// The compiler's message.
        message: String,
    },
    /// A merge found addresses present in both pools; nothing was merged.
    #[error("merge refused, addresses present in both pools: {}", join(.binds))]
    MergeConflict {
        /// The conflicting addresses.
        binds: Vec<SocketAddr>,
    },
    /// Some servers failed to start. With the all-or-nothing policy the ones that bound were
    /// stopped again.
    #[error("{} server(s) failed to start: {}", .failures.len(), join(.failures))]
    Start {
        /// One entry per failed server.
        failures: Vec<ServerFailure>,
    },
    /// Some servers failed to stop.
    #[error("{} server(s) failed to stop: {}", .failures.len(), join(.failures))]
    Stop {
        /// One entry per failed server.
        failures: Vec<ServerFailure>,
    },
}

impl Error {
    /// The I/O error kind behind a bind failure, if this is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Bind { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}
