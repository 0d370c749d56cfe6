//! Stops idle containers and Swarm services, and wakes them on the first request — correctly.
//!
//! One [`IdleWatcher`] watches one workload (a container, or a replicated Swarm service) through
//! `pool-api`'s [`ContainerRuntime`](pool_api::ContainerRuntime) and
//! [`ServiceRuntime`](pool_api::ServiceRuntime) traits; it never learns which engine it talks
//! to (`docker-agent` provides Docker and Swarm, locally or through a remote agent).
//!
//! - **Activity is counted with RAII guards** ([`IdleWatcher::activity`]): an open request
//!   (until its response body's last byte), an upgraded connection ([`UpgradeActivity`]), a TCP
//!   stream. The idle countdown runs only while the count is zero, from the moment it last
//!   became zero, so a ten-minute download or an open websocket keeps its workload up however
//!   short the idle time-out.
//! - **The ready check is one atomic load** ([`IdleWatcher::is_ready`]); the layer's ready
//!   path adds the guard (the count and the shared state's reference count, each up and down
//!   once; a clock read when the count returns to zero) and allocates nothing.
//! - **Readiness**: the engine's health status pushed by its events, or a TCP connect, or an
//!   HTTP `GET` with an expected status, polled from 50 ms with back-off; plus a settling delay
//!   ([`Readiness`]).
//! - **Wake is single-flight on the watcher's own task**: N concurrent [`IdleWatcher::wake`]
//!   calls cause exactly one start; a caller that gives up cancels nothing; every caller gets
//!   ready or a typed [`WakeError`] within the wake time-out.
//! - **The state machine is pure code** ([`machine`]): `napping → starting → ready → stopping`,
//!   and `error`; every engine state is mapped (created, restarting, removing, dead…); the
//!   engine's 304/409 answers count as success; a stop waits for "not running" within a deadline
//!   derived above the engine's grace period ([`IdleConfig::stop_deadline`]).
//! - **Engine events keep the state true** when someone else starts or stops the workload; the
//!   event stream reconnects with back-off and the status is re-read after each reconnect. At
//!   start-up a running workload is adopted and its idle countdown begins.
//! - **HTTP**: [`IdleLayer`] is a `tower` layer for any hyper / axum / httpserver-pool server:
//!   ready requests go straight through; while asleep, HTML `GET`s get a loading page pushed
//!   to ready by server-sent events, other requests are held (bounded by the wake time-out)
//!   and get `503` + `Retry-After` + an RFC 7807 body on failure (see [`layer`]).
//! - **TCP**: [`tcp::splice`] holds a new connection until the workload is ready, then
//!   splices it; the open stream counts as activity.
//! - **Dependencies**: an [`IdleGroup`] checks the graph at construction (cycles rejected,
//!   spelled out), wakes dependencies first (in parallel, single-flight, honouring "started" or
//!   "healthy"), and reference-counts them: a shared dependency stops only after its last
//!   dependent has stopped.
//! - State on a `watch` channel ([`IdleWatcher::subscribe`]); [`Lifecycle`](pool_api::Lifecycle)
//!   implemented (start and stop *watching*); metrics through the `metrics` facade (see
//!   [`metrics`] for the names).
//!
//! # Example
//!
//! On `test-support`'s scriptable fake engine, with a paused clock:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use idlewatch::{IdleConfig, IdleState, IdleWatcher, Workload};
//! use pool_api::Lifecycle;
//! use test_support::{FakeHealth, FakeOp, FakeRuntime};
//!
//! #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn main() {
//!     let engine = Arc::new(FakeRuntime::new());
//!     engine.add_container("wiki", FakeHealth::HealthyAfter(Duration::from_secs(2)));
//!     let config = IdleConfig::new(Workload::Container("wiki".into()), Duration::from_secs(300));
//!     let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
//!     watcher.start().await.unwrap();
//!     assert!(!watcher.is_ready());
//!
//!     // Ten requests arrive at a sleeping container: one start, everybody answered.
//!     let wakes: Vec<_> = (0..10).map(|_| { let w = watcher.clone(); tokio::spawn(async move { w.wake().await }) }).collect();
//!     for wake in wakes {
//!         wake.await.unwrap().unwrap();
//!     }
//!     assert_eq!(engine.calls(FakeOp::Start), 1);
//!     assert!(watcher.is_ready());
//!
//!     // A long request keeps it up past the idle time-out…
//!     let request = watcher.activity();
//!     tokio::time::sleep(Duration::from_secs(600)).await;
//!     assert!(watcher.is_ready());
//!     // …and five idle minutes after it ends, it is stopped.
//!     drop(request);
//!     tokio::time::sleep(Duration::from_secs(301)).await;
//!     assert_eq!(watcher.subscribe().borrow().state, IdleState::Napping);
//!     assert_eq!(engine.calls(FakeOp::Stop), 1);
//!     watcher.stop().await.unwrap();
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

/// The README's example, run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod activity;
mod config;
mod engine;
mod error;
mod graph;
mod group;
pub mod layer;
pub mod machine;
pub mod metrics;
mod probe;
mod sync;
pub mod tcp;
mod watcher;

pub use activity::ActivityGuard;
pub use config::{
    Dependency, DependencyCondition, IdleConfig, Readiness, ReadinessCheck, STOP_MARGIN, StopMethod, Workload,
};
pub use error::{IdleConfigError, WakeError};
pub use group::IdleGroup;
pub use layer::{IdleBody, IdleFuture, IdleLayer, IdleLayerOptions, IdleService, UpgradeActivity};
pub use machine::IdleState;
pub use watcher::{IdleSnapshot, IdleWatcher};
