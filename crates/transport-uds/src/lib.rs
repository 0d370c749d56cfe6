//! The agentpool agent protocol over Unix domain sockets.
//!
//! Frames are length-delimited protobuf messages of the one schema in
//! [`pool_api::proto`]: `ProxyFrame`s from the proxy, `AgentFrame`s from the agent, each
//! carrying a numeric stream id. The proxy side is [`UdsConnector`], a
//! [`pool_api::Connector`] that plugs into `pool-core`; the agent side is [`UdsServer`], which
//! serves any [`pool_api::AgentHandler`].
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod client;
pub mod codec;
pub mod reverse;
mod server;

pub use client::{ClientConfig, PeerCredentials, SocketPath, UdsConnection, UdsConnector};
pub use reverse::{
    Reconnect, Registration, ReverseAgent, ReverseAgentConfig, ReverseError, ReverseListener,
    ReverseListenerConfig,
};
pub use server::{ServeError, ServerConfig, ServerHandle, UdsServer};
