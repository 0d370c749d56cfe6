//! The agentpool agent protocol over Unix domain sockets.
//!
//! Frames are length-delimited protobuf messages of the one schema in
//! [`pool_api::proto`] (a 4-byte big-endian length, checked against the frame limit —
//! 16 MiB by default — before anything is buffered): `ProxyFrame`s from the proxy,
//! `AgentFrame`s from the agent, each carrying a numeric stream id that answers, cancels and
//! pongs refer to. Bodies are `Bytes` end to end.
//!
//! * **Proxy side:** [`UdsConnector`] is a [`pool_api::Connector`] for `unix:/absolute/path`
//!   (or `unix:///absolute/path`, or a bare `/absolute/path`) and `unix:@abstract` endpoints
//!   that plugs into `pool-core`. Any other form — another scheme, a relative or empty path —
//!   is refused by [`validate_endpoint`](pool_api::Connector::validate_endpoint) with a typed
//!   error, so `pool-core` turns it away when the agent is added. Connecting optionally checks the
//!   agent's uid/gid (`SO_PEERCRED`); the handshake sends the proxy's protocol versions and gets
//!   the agent's capabilities, or a typed [`VersionMismatch`](pool_api::TransportError). Each
//!   connection is one task with any number of requests in flight; end of stream or a frame
//!   that does not decode fails every pending request at once with an error naming the
//!   connection. An event that would encode over the frame limit fails alone, with
//!   [`MessageTooLarge`](pool_api::TransportError::MessageTooLarge) naming its size and the
//!   limit; the connection and its other requests are untouched. Health, flow-control and configuration-update messages from the agent are
//!   published on the connection's signals; metrics reports become `agentpool_agent_metric`
//!   gauges.
//! * **Agent side:** [`UdsServer`] serves any [`pool_api::AgentHandler`]: a handler that decides
//!   without waiting is answered inline, one that waits runs in a task of its own, bounded by
//!   the concurrency the agent advertises; a cancel aborts that task; a handler that
//!   panics answers that request with an error (the connection keeps serving); drain refuses
//!   new work while running requests finish; a frame it cannot decode closes that connection
//!   unanswered. A [`ServerHandle`] sends health, flow-control, metrics and configuration-update
//!   messages at any time. The socket file gets the configured mode, a stale one is replaced,
//!   a live one is refused, and it is removed on shutdown. Anyone who can connect is held to
//!   the limits of [`UdsServerConfig`] (a table of them and their defaults is there): a cap on
//!   connections, time-outs on the handshake, on a frame once started and on a write the
//!   proxy does not read, and per connection a cap on requests (the advertised concurrency;
//!   more wait their turn) and on configuration pushes (more are refused with
//!   [`RequestRefused`]). Each hit is counted ([`ServerHandle::limit_stats`]).
//! * **Reverse connections** ([`reverse`]): an agent that cannot be dialled dials the proxy's
//!   [`ReverseListener`] and registers; the listener hands the connection to `pool-core`
//!   (`AgentPool::add_reverse_connection`) and tells the agent whether it was accepted.
//!   [`ReverseAgent`] is the agent side, reconnecting with back-off.
//!
//! The crate passes the transport conformance suite of `test-support` (`tests/conformance.rs`).
//! `examples/waf_agent` is a small WAF agent (block by path prefix, add a header);
//! `examples/pool_over_uds` wires an agent to a `pool-core` pool over a socket, in one process.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

/// The README's example, compiled (not run) as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod client;
mod codec;
pub mod reverse;
mod server;
mod streams;

pub use client::{ClientConfig, MAX_SOCKET_PATH, PeerCredentials, SocketPath, UdsConnection, UdsConnector};
pub use reverse::{
    Reconnect, Registration, ReverseAgent, ReverseAgentConfig, ReverseError, ReverseListener,
    ReverseListenerConfig,
};
pub use server::{
    LimitStats, RequestRefused, ServeError, ServerHandle, SessionLimits, UdsServer, UdsServerConfig,
};
