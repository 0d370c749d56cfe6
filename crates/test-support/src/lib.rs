//! An in-memory agent transport and scripted agents, for deterministic tests of the agent pool.
//!
//! [`MemoryConnector`] implements [`pool_api::Connector`] over a registry of endpoints, each
//! served by a [`MemoryAgent`]. The connections it opens ([`MemoryConnection`]) behave like a
//! real multiplexed transport: one task per connection owns its state, requests are keyed by the
//! connection's own stream ids with any number in flight, each request is handled by the agent
//! in a task of its own, cancels and abandoned futures abort that task, and a dying connection
//! fails everything pending on it at once and publishes `open: false` on its signals.
//!
//! A [`MemoryAgent`] wraps any [`pool_api::AgentHandler`] and a script that a test changes at
//! any time: latency (fixed or a seeded uniform range), injected failures, silence, refused
//! connections, handshakes that never finish, capabilities and protocol versions, flow control,
//! health reports, configuration answers, and killing every connection. It records what reaches
//! it (events per connection, cancels, drains, closes, pings, pushes) for assertions.
//!
//! All time is tokio time (`tokio::time::sleep`, `tokio::time::Instant`), so tests run with
//! `#[tokio::test(start_paused = true)]` take no real time and are reproducible.
//!
//! Ready-made handlers: [`AllowAll`], [`Echo`], [`BlockPath`] and [`FnHandler`].
//!
//! For container watchers, [`FakeRuntime`] is a scriptable in-memory container engine (start
//! latency, health transitions, injected failures, event streams, counts of every call).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use http::{Method, Uri};
//! use pool_api::{Connector, Endpoint, Event, Hello, RequestHeaders, TransportError};
//! use test_support::{BlockPath, MemoryAgent, MemoryConnector};
//!
//! #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn main() {
//!     let agent = MemoryAgent::new(BlockPath::new("/admin"));
//!     agent.set_latency(Duration::from_millis(5));
//!     let connector = MemoryConnector::new();
//!     connector.register("mem://waf", &agent);
//!
//!     let pending = connector.connect(&Endpoint::from("mem://waf")).await.unwrap();
//!     let conn = pending.handshake(Hello::new("proxy-1")).await.unwrap();
//!     assert_eq!(conn.label(), "mem://waf#0");
//!
//!     let request = |id: &str, path: &'static str| {
//!         Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
//!     };
//!     let start = tokio::time::Instant::now();
//!     let blocked = conn.send(&request("r-1", "/admin/users")).await.unwrap();
//!     assert!(!blocked.is_allow());
//!     assert_eq!(start.elapsed(), Duration::from_millis(5));
//!     assert!(conn.send(&request("r-2", "/index.html")).await.unwrap().is_allow());
//!     assert_eq!(agent.events_received(), 2);
//!
//!     // The agent crashes: the connection reports it.
//!     agent.disconnect_all();
//!     assert!(!conn.signals().borrow().open);
//!     let err = conn.send(&request("r-3", "/")).await.unwrap_err();
//!     assert!(matches!(err, TransportError::Closed { .. }));
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

/// The README's example, run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod conformance;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "tls")]
pub mod tls;

mod agent;
mod connection;
mod connector;
mod handlers;
pub mod runtime;
pub mod workers;

#[cfg(test)]
mod tests;

/// True under CI (`CI` = `true` or `1`), where every outside tool a test needs is installed
/// (`.ci/run` does it), so a missing one is a failure, not a reason to skip.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// For a test that needs something from outside the workspace (a program, a Python package):
/// `missing` says what is missing and how to install it, if anything is. Under CI ([`in_ci`])
/// that fails the test; elsewhere it prints `skipping: …` and returns false, for the test to
/// return. True when nothing is missing.
///
/// # Panics
///
/// When something is missing under CI.
pub fn present_or_skip(missing: Option<String>) -> bool {
    let Some(why) = missing else { return true };
    assert!(!in_ci(), "{why} (required under CI)");
    eprintln!("skipping: {why}");
    false
}

pub use agent::{ConfigBehaviour, ConnectionControl, MemoryAgent};
pub use connection::MemoryConnection;
pub use connector::MemoryConnector;
pub use handlers::{AllowAll, BlockPath, Echo, FnHandler};
pub use runtime::{FakeHealth, FakeOp, FakeRuntime};
