//! A pool of multiplexed connections to external processing agents.
//!
//! A reverse proxy asks agents — a WAF, an auth service, a bot detector — to decide on each
//! request. `pool-core` keeps N connections to every endpoint (replica) of every agent and
//! picks one per request: it balances load, tracks each connection's health, trips a circuit
//! breaker on a failing endpoint, ejects outlier replicas, honours what the agent says about
//! itself (its concurrency and body limits, its supported events, degraded / draining /
//! unhealthy reports, flow-control pauses), bounds every request with a time-out, and drains
//! gracefully. It knows nothing about sockets: transports plug in through the
//! [`pool_api::Connector`] trait.
//!
//! # Main types
//!
//! * [`AgentPool`] — the registry ([`AgentPool::add_agent`], [`AgentPool::replace_agent`] to
//!   change an agent under load without a gap, [`AgentPool::remove_agent`]) and the send path
//!   ([`AgentPool::send`]); handles for
//!   [`StickySessions`], [`RequestAffinity`] and [`ConfigPushes`].
//! * [`AgentSpec`] — an agent to add: id, endpoints, per-agent [`AgentOptions`].
//! * [`PoolConfig`] — every setting, with serde + humantime and [`PoolConfig::validate`].
//! * [`AgentService`] — one agent as a `tower::Service<Event>`.
//! * [`AgentStats`], [`PoolStats`], [`ConnectionHealth`] — what the pool knows.
//! * Pure policies, usable on their own: [`balance`], [`breaker`], [`health`], [`ewma`],
//!   [`outlier`], [`backoff`].
//!
//! # Example
//!
//! With `transport-uds` as the transport (its example `pool_over_uds` runs an agent and a pool
//! end to end):
//!
//! ```no_run
//! use pool_api::{Event, RequestHeaders};
//! use pool_core::{AgentPool, AgentSpec, PoolConfig};
//! use transport_uds::{ClientConfig, UdsConnector};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = AgentPool::new(PoolConfig::default(), UdsConnector::new(ClientConfig::default()))?;
//! let report = pool.add_agent(AgentSpec::new("waf").endpoint("unix:/run/waf.sock")).await?;
//! println!("{} of {} connections up", report.connected, report.slots);
//!
//! let event = Event::RequestHeaders(RequestHeaders::new("req-1", http::Method::GET, "/".parse()?));
//! match pool.send("waf", &event).await {
//!     Ok(decision) if decision.is_allow() => println!("allowed"),
//!     Ok(decision) => println!("the agent decided: {decision:?}"),
//!     Err(e) => eprintln!("agent waf: {e}"),
//! }
//! pool.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Settings and metrics
//!
//! [`PoolConfig`]'s fields document their defaults; the crate's README tables them, with every
//! metric the pool records (through the `metrics` facade, names prefixed `agentpool_`).
//!
//! # Design
//!
//! See `docs/architecture.md` in the repository for how a request flows. In short: the hot
//! path (agent lookup, breaker check, balancer pick, permit) reads an `arc-swap` snapshot and
//! atomics — no lock, no allocation; every request holds an RAII permit that is returned
//! however the request ends; one supervisor task per connection slot connects, mirrors the
//! agent's signals, pings, and replaces a dead connection with jittered exponential back-off.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

// Layers, each module importing only from those above it in this list (checked by
// `cargo xtask modcycles`): the policies and plumbing; the endpoint and its slots; the
// per-request tables; the agent; what runs around agents; the pool and its handles.
pub mod backoff;
pub mod balance;
pub mod breaker;
mod config;
mod context;
mod error;
pub mod ewma;
pub mod health;
mod metrics;
pub mod outlier;
mod permits;
mod sync;
mod waiters;

mod endpoint;
mod slot;

mod affinity;
mod sticky;

mod agent;

mod config_push;
mod directory;
mod maintenance;
mod reverse;
mod service;
mod supervisor;

mod handles;
mod pool;

pub use agent::{AgentSpec, AgentStats, EndpointStats, Totals};
pub use config::{
    AffinityConfig, AgentOptions, ConfigPushConfig, FailureMode, FlowControlConfig, FlowControlMode,
    HealthConfig, PoolConfig, ReverseConfig, StickyConfig,
};
pub use config_push::{ConfigUpdateHandler, PushCounts, PushState};
pub use endpoint::BreakerStatus;
pub use error::{PoolError, Unavailable};
pub use handles::{ConfigPushes, RequestAffinity, StickySessions};
pub use pool::{AddReport, AgentPool, PoolStats, Reservation, ReverseRegistration};
pub use service::AgentService;
pub use slot::ConnectionHealth;
pub use sticky::StickyRoute;
