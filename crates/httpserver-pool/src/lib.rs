//! Many hyper HTTP servers managed as one unit.
//!
//! A [`Pool`] holds [`Server`]s keyed by their canonical bind address (`:80`, `0.0.0.0:80` and
//! a resolved name are one key: a duplicate is an error, never an overwrite). Each server runs
//! hyper 1 through hyper-util's HTTP/1 + HTTP/2 builder (hyper's HTTP/1 connection alone when
//! HTTP/2 is off, or on plain TCP without `h2c`), optionally behind rustls (mTLS, ALPN),
//! and implements [`pool_api::Lifecycle`]: `start` binds for real and returns once listening
//! (typed errors: address in use, permission denied, bad TLS); `stop` drains gracefully and
//! returns as soon as the work is done, or cuts it off at the deadline, with a
//! [`StopReport`](pool_api::StopReport). Handlers receive `Request<`[`RequestBody`]`>` (hyper's
//! body under the body read timeout) and find a [`ShutdownSignal`] and the client's
//! [`ClientAddr`] in request extensions.
//!
//! Every server runs under limits with safe defaults — connection caps in all and per client
//! address, header, body and idle time-outs, HTTP/2 stream cap and keep-alive, header size —
//! listed in [`HttpServerConfig`]'s documentation.
//!
//! The pool adds group start/stop/restart (concurrent, failures aggregated, all-or-nothing or
//! best-effort), selection by name, bind or public URL with a glob or regex ([`Pattern`]),
//! walk, merge, health and counters ([`Pool::monitor`]), and [`Pool::apply`]: a new
//! [`ServerPoolConfig`] while running, swapping settings in place. A `Pool`, like a `Server`, is a
//! handle: its clones share one pool (stopping a clone stops the pool's servers), while
//! [`Pool::duplicate`] builds a separate pool of new, stopped servers from the same
//! configurations.
//!
//! Modules: `addr` (address parsing), `config` (serde config, validation), `tls`, `server`
//! (accept loop, connections), `drain` (connection accounting and caps), `body` (the request
//! body under its timeout), `accept` (accept-error policy), `workers` (thread-per-core serving),
//! `filter`, `pool`, `counters` (metrics facade + snapshots).
//!
//! ```
//! use httpserver_pool::{Field, Handler, Pattern, Pool, ServerPoolConfig, HttpServerConfig, full};
//! use pool_api::Lifecycle;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let pool = Pool::new();
//! pool.set_default_handler(Handler::from_fn(|_req| async { http::Response::new(full("hello")) }));
//! pool.apply(&ServerPoolConfig { servers: vec![HttpServerConfig::new("api", format!("localhost:{port}"))] }).await?;
//!
//! pool.start().await?;
//! let api = pool.filter(Field::Name, &Pattern::glob("api*")?);
//! assert_eq!(api.len(), 1);
//! assert!(api.servers()[0].is_running());
//! let report = pool.stop().await?;
//! assert_eq!(report.forced, 0);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod addr;
mod body;
mod config;
mod error;
mod handler;
mod signal;
mod tls;
mod workers;

pub use body::{RequestBody, RequestBodyError};
pub use config::{HttpServerConfig, Limits, MIN_HEADER_SIZE, ServerPoolConfig, SocketOptions, Timeouts};
pub use error::{Error, Problem, ServerFailure};
pub use handler::{BoxError, Handler, ResponseBody, full, status};
pub use signal::ShutdownSignal;
pub use tls::{PemSource, TlsConfig};
pub use workers::{WorkerOptions, Workers, worker_index};
mod accept;
mod counters;
mod drain;
mod server;
mod socket;

pub use counters::CounterSnapshot;
pub use server::{ClientAddr, ReloadOutcome, Server, ServerSnapshot};
pub mod filter;
mod pool;

pub use filter::{Field, Glob, Pattern};
pub use pool::{ApplyReport, Pool, Selection, StartPolicy};
