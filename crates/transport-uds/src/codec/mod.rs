//! The UDS wire format: frames of a 4-byte big-endian length, then one protobuf message of the
//! schema in [`pool_api::proto`] — `ProxyFrame`s from the proxy, `AgentFrame`s from the agent.
//!
//! * `frame.rs`: the framing ([`FrameCodec`]), its limit and how room is reserved, and prost
//!   encoding and decoding of any message of the schema.
//! * `encode.rs`: the fast encoders of the hot messages (headers events, decisions), straight
//!   from the `pool-api` types into the write buffer, byte for byte prost's encoding.
//! * `decode.rs`: the fast decoders of the hot messages (request headers, decisions) into the
//!   `pool-api` types, with prost as the fallback for anything else, and the frame types they
//!   yield ([`Inbound`], [`FromAgent`]).
//! * `fields.rs`: the schema's field numbers those fast paths use, checked against the compiled
//!   `agent.proto` by a test.
//!
//! All of it is private to the crate: the wire format is specified by `agent.proto` and the
//! framing above, not by these types.

mod decode;
mod encode;
mod fields;
mod frame;

#[cfg(test)]
mod tests;

pub(crate) use decode::{FromAgent, Inbound};
#[cfg(test)]
use frame::RESERVE_AHEAD;
pub(crate) use frame::{DEFAULT_MAX_FRAME, FrameCodec, FrameError};
