//! The vocabulary every agentpool crate speaks.
//!
//! `pool-api` is deliberately small: plain data types, traits and error types, with no runtime
//! and no I/O. Everything else in the workspace depends on it and on nothing else of ours, so a
//! transport, a pool, an agent or a container watcher written against these traits fits every
//! other piece.
//!
//! # What is here
//!
//! * **The agent protocol** — what a proxy sends to an external processing agent (a WAF, an auth
//!   service…) and what it gets back: [`Event`] (request headers, body chunks, response headers,
//!   request complete, websocket frames), [`Cancel`], and the agent's [`Decision`] (allow, block,
//!   redirect, challenge, header and body mutations, needs-more, audit data).
//! * **The handshake** — [`Hello`] from the proxy, [`Capabilities`] from the agent (protocol
//!   version, supported events, concurrency and body limits, features).
//! * **Signals from the agent** — [`AgentHealth`] (healthy, degraded with a time-out multiplier,
//!   draining, unhealthy, load) and flow control ([`FlowControl`], [`FlowState`]), published on a
//!   watch channel as [`ConnectionSignals`].
//! * **Configuration** — proxy-pushed [`ConfigPush`] / [`ConfigAck`], and agent-initiated
//!   [`ConfigUpdateRequest`] / [`ConfigUpdateAnswer`].
//! * **Traits** — [`Connector`] and [`PendingConnection`] open and handshake a connection;
//!   [`AgentConnection`] is one live connection (send, cancel, signals, ping, drain, close);
//!   [`AgentHandler`] is the agent side; [`Lifecycle`] is shared by servers and watchers;
//!   [`ContainerRuntime`] is what a container watcher needs from an engine, [`ServiceRuntime`]
//!   what it needs to scale replicated (Swarm) services.
//! * **Errors** — [`TransportError`], [`AgentError`], [`LifecycleError`], [`RuntimeError`].
//!
//! # Example
//!
//! An agent handler that blocks one path and lets everything else through:
//!
//! ```
//! use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind};
//! use http::StatusCode;
//!
//! struct DenyAdmin;
//!
//! impl AgentHandler for DenyAdmin {
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities::new("deny-admin").with_events([EventKind::RequestHeaders])
//!     }
//!
//!     async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
//!         Ok(match &event {
//!             Event::RequestHeaders(h) if h.uri.path().starts_with("/admin") => {
//!                 Decision::block(StatusCode::FORBIDDEN).with_reason("admin is off limits")
//!             }
//!             _ => Decision::allow(),
//!         })
//!     }
//! }
//! # let _ = DenyAdmin;
//! ```
//!
//! # Features
//!
//! * `serde` — derives `Serialize`/`Deserialize` for the plain data types that appear in
//!   configuration and reports (capabilities, health, event kinds, reasons, container states).
//! * `proto` — the wire schema (`proto/agentpool/v1/agent.proto`) as prost messages in
//!   [`proto`], with checked conversions; compiled by protox, so no `protoc`.
//! * `streams` — `streams::PendingRequests`, the proxy side's table of requests waiting for
//!   answers by stream id (register, answer, cancel by correlation id, fail all on close),
//!   shared by the multiplexing transports; and [`Placement`] / [`run_on`], how they spread
//!   their connections over a proxy's worker runtimes.
//! * `wire` (implies `proto`) — `wire::encode_event`, `wire::encode_decision` and their
//!   decoders: the hot messages straight between these types and protobuf bytes, byte for byte
//!   prost's encoding, shared by both transports.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod capabilities;
mod config;
mod decision;
mod error;
mod event;
mod handler;
mod lifecycle;
#[cfg(feature = "proto")]
pub mod proto;
mod runtime;
mod service;
mod signals;
#[cfg(feature = "streams")]
pub mod streams;
mod transport;
#[cfg(feature = "wire")]
pub mod wire;
mod worker;

pub use capabilities::{Capabilities, Features, Hello, PROTOCOL_VERSION};
pub use config::{ConfigAck, ConfigPush, ConfigUpdateAnswer, ConfigUpdateKind, ConfigUpdateRequest};
pub use decision::{Action, Audit, BodyMutation, Decision, HeaderOp};
pub use error::{AgentError, LifecycleError, RuntimeError, TransportError};
pub use event::{
    BodyChunk, Cancel, CancelReason, CorrelationId, Event, EventKind, EventSet, Metadata, RequestComplete,
    RequestHeaders, ResponseHeaders, WebSocketFrame, WebSocketOpcode,
};
pub use handler::AgentHandler;
pub use lifecycle::{Lifecycle, LifecycleState, StopReport};
pub use runtime::{
    ContainerEvent, ContainerEventKind, ContainerHealth, ContainerRuntime, ContainerState, ContainerStatus,
    EventFilter, StopOptions,
};
pub use service::{ServiceEvent, ServiceEventKind, ServiceRuntime, ServiceStatus};
pub use signals::{AgentHealth, AgentMetric, ConnectionSignals, FlowControl, FlowState, HealthStatus};
pub use transport::{AgentConnection, BoxFuture, BoxStream, Connector, Endpoint, PendingConnection};
#[cfg(feature = "streams")]
pub use worker::{Placement, run_on};
pub use worker::{set_worker_index, worker_index};
