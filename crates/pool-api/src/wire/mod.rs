//! The schema's two hot messages encoded and decoded by hand: what both transports put on the
//! wire for an event and a decision, without building the prost messages first.
//!
//! A `RequestHeaders` or `ResponseHeaders` event and a `Decision` are what every proxied
//! request sends and receives; building their prost messages costs an allocation or two per
//! header. These functions go straight between the vocabulary types and protobuf bytes, byte
//! for byte what prost writes for the schema (property tests in the transports compare the two
//! on random values), and decode only the canonical encoding directly, leaving anything else to
//! prost so both paths always agree. The framing around a message (a 4-byte length over a Unix
//! socket, gRPC's own message prefix) is the transport's: [`encode_event`] and
//! [`encode_decision`] take a `head` closure that writes it once the message's size is known.
//!
//! * `encode.rs` — [`encode_event`], [`encode_decision`].
//! * `decode.rs` — [`decode_request_headers`], [`decode_decision`].
//! * `fields.rs` — the field numbers these use, checked against the compiled `agent.proto` by
//!   a test, so the schema stays the single source of truth.

mod decode;
mod encode;
mod fields;

use bytes::Bytes;

pub use encode::{encode_decision, encode_event};

use crate::Decision;
use crate::proto::ProtoError;

/// A message larger than the limit it was encoded under; nothing of it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("message of {size} bytes exceeds the {limit}-byte limit")]
pub struct TooLarge {
    /// The encoded message's size.
    pub size: usize,
    /// The limit.
    pub limit: usize,
}

/// Decodes a `ProxyFrame` carrying a `RequestHeaders` event straight into the vocabulary type
/// (the URI and header values share `frame`'s buffer): the request's stream id and the event,
/// or why the event is invalid.
///
/// `None` when `frame` is anything else, or not the canonical encoding: decode it with prost
/// then, which gives the same result for the same bytes.
pub fn decode_request_headers(frame: &Bytes) -> Option<(u64, Result<crate::Event, ProtoError>)> {
    decode::request_headers(frame)
}

/// Decodes an `AgentFrame` carrying a decision straight into [`Decision`] (header values and
/// bodies share `frame`'s buffer): the stream id it answers and the decision.
///
/// `None` when `frame` is anything else, not the canonical encoding, a decision this path does
/// not take (a challenge, a body mutation) or one that would be an error: decode it with prost
/// then, which gives the same result for the same bytes.
pub fn decode_decision(frame: &Bytes) -> Option<(u64, Decision)> {
    decode::decision(frame)
}
