//! The agentpool agent protocol over gRPC (tonic).
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod client;
mod io;
mod server;
mod streams;
mod target;
mod tls;

pub mod wire {
    //! The gRPC service `agentpool.v1.AgentProtocol` as tonic generated it from the one schema
    //! (`pool-api`'s `proto/agentpool/v1/agent.proto`); its messages are
    //! [`pool_api::proto`]'s. For code that speaks the protocol without this crate's connector
    //! or server (a raw client, a test peer, a benchmark).
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("agentpool.v1");
}

/// The schema's encoded `FileDescriptorSet`, as served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agentpool_v1_descriptor.bin"));

/// The default limit on one message, read or written: 16 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

pub use client::{GrpcConnection, GrpcConnector, GrpcConnectorConfig};
pub use server::{
    GrpcAgentServer, GrpcLimitStats, GrpcRefusal, GrpcServeError, GrpcServerConfig, GrpcServerHandle,
};
pub use target::GrpcTarget;
pub use tls::{GrpcClientTls, GrpcServerTls, GrpcTlsError};
