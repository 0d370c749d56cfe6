//! Many hyper HTTP servers managed as one unit.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
mod config;
mod error;
mod handler;
mod signal;
mod tls;

pub use config::{MIN_HEADER_SIZE, PoolConfig, ServerConfig, SocketOptions, Timeouts};
pub use error::{Error, Problem, ServerFailure};
pub use handler::{BoxError, Handler, ResponseBody, full, status};
pub use signal::ShutdownSignal;
pub use tls::{PemSource, TlsConfig};
mod accept;
mod counters;
mod drain;
mod server;
mod socket;

pub use counters::CounterSnapshot;
pub use server::{ReloadOutcome, Server, ServerSnapshot};
