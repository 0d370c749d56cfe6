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

#[doc(hidden)]
pub mod fuzz {
    //! Entry points for the fuzz targets in `fuzz/` and the replay of their corpora
    //! (`crates/fuzz-props`): the frame decoders of both sides driven over a byte stream that
    //! arrives in pieces. Not an API: hidden from the docs, and free to change with them.

    use bytes::BytesMut;
    use pool_api::proto::{AgentFrame, ProxyFrame};
    use tokio_util::codec::Decoder;

    use crate::codec::{FrameCodec, FrameError, FromAgent, Inbound};

    /// Bytes of a frame's length.
    pub const HEAD: usize = 4;
    /// Room reserved ahead for a frame that has not fully arrived (see the codec).
    pub const RESERVE_AHEAD: usize = crate::codec::RESERVE_AHEAD;

    /// What one call of the decoder returned.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        /// No whole frame yet.
        Pending,
        /// A frame the fast path decoded.
        Direct,
        /// A frame prost decoded.
        Prost,
        /// A frame announced larger than the limit: the connection's end.
        TooLarge,
        /// A frame that is not a message of the schema: the connection's end.
        Undecodable,
    }

    /// One call of the decoder: the read buffer before and after it, and what it returned.
    #[derive(Debug, Clone, Copy)]
    pub struct Step {
        /// Bytes buffered before the call.
        pub len_before: usize,
        /// The buffer's capacity before the call.
        pub cap_before: usize,
        /// Bytes buffered after the call.
        pub len_after: usize,
        /// The buffer's capacity after the call.
        pub cap_after: usize,
        /// What it returned.
        pub outcome: Outcome,
    }

    /// Appends each of `pieces` in turn to a read buffer and decodes every frame it then holds,
    /// as the agent side (`agent`) or the proxy side does with a frame limit of `limit`; stops at
    /// the first error, as the connection would. Returns every call of the decoder.
    pub fn decode_stream<'a>(
        agent: bool,
        limit: usize,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Step> {
        let mut by_agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(limit);
        let mut by_proxy: FrameCodec<FromAgent, ProxyFrame> = FrameCodec::new(limit);
        let mut buf = BytesMut::new();
        let mut steps = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                let (len_before, cap_before) = (buf.len(), buf.capacity());
                let outcome = if agent {
                    match by_agent.decode(&mut buf) {
                        Ok(None) => Ok(Outcome::Pending),
                        Ok(Some(Inbound::Event { .. })) => Ok(Outcome::Direct),
                        Ok(Some(Inbound::Frame(_))) => Ok(Outcome::Prost),
                        Err(e) => Err(e),
                    }
                } else {
                    match by_proxy.decode(&mut buf) {
                        Ok(None) => Ok(Outcome::Pending),
                        Ok(Some(FromAgent::Decision { .. })) => Ok(Outcome::Direct),
                        Ok(Some(FromAgent::Frame(_))) => Ok(Outcome::Prost),
                        Err(e) => Err(e),
                    }
                };
                let outcome = outcome.unwrap_or_else(|e| match e {
                    FrameError::TooLarge { .. } => Outcome::TooLarge,
                    FrameError::Decode(_) | FrameError::Io(_) => Outcome::Undecodable,
                });
                steps.push(Step {
                    len_before,
                    cap_before,
                    len_after: buf.len(),
                    cap_after: buf.capacity(),
                    outcome,
                });
                match outcome {
                    Outcome::Pending => break,
                    Outcome::Direct | Outcome::Prost => {}
                    Outcome::TooLarge | Outcome::Undecodable => return steps,
                }
            }
        }
        steps
    }
}
