//! The UDS wire format: frames of a 4-byte big-endian length, then one protobuf message of the
//! schema in [`pool_api::proto`] — `ProxyFrame`s from the proxy, `AgentFrame`s from the agent.
//!
//! * `frame.rs`: the framing ([`FrameCodec`]), its limit and how room is reserved, and prost
//!   encoding and decoding of any message of the schema.
//! * `write.rs`: the hot messages (headers events, decisions) encoded by `pool_api::wire`
//!   straight from the `pool-api` types into the write buffer behind the frame's length.
//! * `inbound.rs`: the frame types each side reads ([`Inbound`], [`FromAgent`]): the hot
//!   messages decoded by `pool_api::wire`, with prost as the fallback for anything else.
//!
//! The fast paths and the schema's field numbers they use live in `pool_api::wire`, shared
//! with transport-grpc; the tests here check them through this framing.
//!
//! All of it is private to the crate: the wire format is specified by `agent.proto` and the
//! framing above, not by these types.

mod frame;
mod inbound;
mod write;

#[cfg(test)]
mod tests;

pub(crate) use frame::{DEFAULT_MAX_FRAME, FrameCodec, FrameError, RESERVE_AHEAD};
pub(crate) use inbound::{FromAgent, Inbound};
