//! What each side reads: the hot message decoded by `pool_api::wire` straight into the
//! vocabulary type when it is in canonical form, anything else by prost.

use bytes::BytesMut;
use pool_api::Decision;
use pool_api::proto::{self, ProtoError};
use pool_api::wire;
use prost::Message;
use tokio_util::codec::Decoder;

use super::frame::{FrameCodec, FrameError};

/// A frame the agent side reads: a request-headers event decoded straight from the frame's
/// bytes into the `pool-api` type (header values and the URI share the read buffer), or any
/// other message as the schema decodes it.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// An event, already converted; an invalid one carries why.
    Event {
        /// The request's stream id.
        stream_id: u64,
        /// The event, or what is wrong with it.
        event: Result<pool_api::Event, ProtoError>,
    },
    /// Any other frame.
    Frame(proto::ProxyFrame),
}

impl<Out> Decoder for FrameCodec<Inbound, Out> {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        let Some(frame) = self.next_frame(src)? else { return Ok(None) };
        if let Some((stream_id, event)) = wire::decode_request_headers(&frame) {
            return Ok(Some(Inbound::Event { stream_id, event }));
        }
        let frame = proto::ProxyFrame::decode(frame)?;
        Ok(Some(match frame {
            proto::ProxyFrame { stream_id, body: Some(proto::proxy_frame::Body::Event(e)) } => {
                Inbound::Event { stream_id, event: pool_api::Event::try_from(e) }
            }
            other => Inbound::Frame(other),
        }))
    }
}

/// A frame the proxy side reads: a decision decoded straight from the frame's bytes into the
/// `pool-api` type (header values and bodies share the read buffer), or any other message as
/// the schema decodes it (a decision that does not take the direct path stays a frame, to be
/// converted like any other).
#[derive(Debug)]
pub(crate) enum FromAgent {
    /// The decision answering request `stream_id`.
    Decision {
        /// The request's stream id.
        stream_id: u64,
        /// The agent's decision.
        decision: Decision,
    },
    /// Any other frame.
    Frame(proto::AgentFrame),
}

impl<Out> Decoder for FrameCodec<FromAgent, Out> {
    type Item = FromAgent;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<FromAgent>, FrameError> {
        let Some(frame) = self.next_frame(src)? else { return Ok(None) };
        if let Some((stream_id, decision)) = wire::decode_decision(&frame) {
            return Ok(Some(FromAgent::Decision { stream_id, decision }));
        }
        Ok(Some(FromAgent::Frame(proto::AgentFrame::decode(frame)?)))
    }
}
