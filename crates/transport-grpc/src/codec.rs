//! The tonic codecs of the `Connect` call: the hot messages (an event, a decision) travel as
//! bytes encoded by [`pool_api::wire`] straight from the vocabulary types, and are decoded by it
//! straight back when they arrive in canonical form; everything else is a prost message. The
//! bytes on the wire are exactly what tonic's prost codec would send for the same messages (the
//! wire encoders are byte for byte prost's), so a stock gRPC peer generated from `agent.proto`
//! sees no difference — the interop tests check it with Python's `grpcio`.
//!
//! The generated service code in [`crate::wire`] keeps the prost codec for anyone who wants the
//! plain messages; the connector and the agent server use these.

use bytes::{Buf, BufMut, Bytes};
use pool_api::proto;
use pool_api::{Decision, wire};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The path of the one method.
pub(crate) const CONNECT_PATH: &str = "/agentpool.v1.AgentProtocol/Connect";

/// A message the proxy sends: an event already encoded, or any other frame.
#[derive(Debug)]
pub(crate) enum ToAgent {
    /// A `ProxyFrame` encoded by [`wire::encode_event`].
    Encoded(Bytes),
    /// Any other frame (hello, cancel, ping, push…).
    Frame(proto::ProxyFrame),
}

/// A message the agent sends: a decision already encoded, or any other frame.
#[derive(Debug)]
pub(crate) enum ToProxy {
    /// An `AgentFrame` encoded by [`wire::encode_decision`].
    Encoded(Bytes),
    /// Any other frame (capabilities, errors, pongs, signals…), boxed: these are rare and
    /// larger than the bytes of a decision.
    Frame(Box<proto::AgentFrame>),
}

/// What the proxy reads: a decision decoded straight into the vocabulary type, or any other
/// frame as prost decodes it (a decision off the direct path stays a frame, converted later).
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

/// What the agent reads: a request-headers event decoded straight into the vocabulary type
/// (an invalid one carries why), or any other frame as prost decodes it.
#[derive(Debug)]
pub(crate) enum FromProxy {
    /// A request-headers event, already converted.
    Event {
        /// The request's stream id.
        stream_id: u64,
        /// The event, or what is wrong with it.
        event: Result<pool_api::Event, proto::ProtoError>,
    },
    /// Any other frame.
    Frame(proto::ProxyFrame),
}

/// The proxy side's codec.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProxyCodec;

/// The agent side's codec.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AgentCodec;

/// Writes a [`ToAgent`] or [`ToProxy`].
#[derive(Debug)]
pub(crate) struct Writer<T>(std::marker::PhantomData<fn(T)>);

/// Reads a [`FromAgent`] or [`FromProxy`].
#[derive(Debug)]
pub(crate) struct Reader<T>(std::marker::PhantomData<fn() -> T>);

impl Codec for ProxyCodec {
    type Encode = ToAgent;
    type Decode = FromAgent;
    type Encoder = Writer<ToAgent>;
    type Decoder = Reader<FromAgent>;

    fn encoder(&mut self) -> Self::Encoder {
        Writer(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        Reader(std::marker::PhantomData)
    }
}

impl Codec for AgentCodec {
    type Encode = ToProxy;
    type Decode = FromProxy;
    type Encoder = Writer<ToProxy>;
    type Decoder = Reader<FromProxy>;

    fn encoder(&mut self) -> Self::Encoder {
        Writer(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        Reader(std::marker::PhantomData)
    }
}

fn encode_failed(e: prost::EncodeError) -> Status {
    Status::internal(format!("cannot encode a message: {e}"))
}

fn decode_failed(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
}

impl Encoder for Writer<ToAgent> {
    type Item = ToAgent;
    type Error = Status;

    fn encode(&mut self, item: ToAgent, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            ToAgent::Encoded(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
            ToAgent::Frame(frame) => frame.encode(dst).map_err(encode_failed),
        }
    }
}

impl Encoder for Writer<ToProxy> {
    type Item = ToProxy;
    type Error = Status;

    fn encode(&mut self, item: ToProxy, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            ToProxy::Encoded(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
            ToProxy::Frame(frame) => frame.encode(dst).map_err(encode_failed),
        }
    }
}

impl Decoder for Reader<FromAgent> {
    type Item = FromAgent;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<FromAgent>, Status> {
        // The message's own bytes, split off tonic's buffer without a copy.
        from_agent(src.copy_to_bytes(src.remaining())).map(Some)
    }
}

/// One message the proxy reads, from its bytes: the direct path, else prost.
pub(crate) fn from_agent(frame: Bytes) -> Result<FromAgent, Status> {
    if let Some((stream_id, decision)) = wire::decode_decision(&frame) {
        return Ok(FromAgent::Decision { stream_id, decision });
    }
    proto::AgentFrame::decode(frame).map(FromAgent::Frame).map_err(decode_failed)
}

impl Decoder for Reader<FromProxy> {
    type Item = FromProxy;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<FromProxy>, Status> {
        from_proxy(src.copy_to_bytes(src.remaining())).map(Some)
    }
}

/// One message the agent reads, from its bytes: the direct path, else prost.
pub(crate) fn from_proxy(frame: Bytes) -> Result<FromProxy, Status> {
    if let Some((stream_id, event)) = wire::decode_request_headers(&frame) {
        return Ok(FromProxy::Event { stream_id, event });
    }
    proto::ProxyFrame::decode(frame).map(FromProxy::Frame).map_err(decode_failed)
}

/// Encodes `decision` as the answer to request `stream_id`, or says how far over `limit` it is.
pub(crate) fn decision(stream_id: u64, decision: &Decision, limit: usize) -> Result<Bytes, wire::TooLarge> {
    let mut buf = bytes::BytesMut::new();
    wire::encode_decision(stream_id, decision, limit, &mut buf, |_, _| {})?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use pool_api::{Event, RequestHeaders};

    use super::*;

    #[test]
    fn an_encoded_event_is_the_prost_encoding_of_its_frame() {
        let mut h = RequestHeaders::new("c-1", Method::POST, "http://example.com/a?b=c".parse().unwrap());
        h.headers.insert("x-a", "1".parse().unwrap());
        let event = Event::RequestHeaders(h);
        let mut buf = bytes::BytesMut::new();
        wire::encode_event(7, &event, 1 << 20, &mut buf, |_, _| {}).unwrap();
        let reference = proto::ProxyFrame {
            stream_id: 7,
            body: Some(proto::proxy_frame::Body::Event(event.clone().into())),
        };
        assert_eq!(&buf[..], &reference.encode_to_vec()[..]);
        let (stream, decoded) = wire::decode_request_headers(&buf.freeze()).expect("canonical");
        assert_eq!(stream, 7);
        assert_eq!(decoded.unwrap(), event);
    }

    #[test]
    fn an_encoded_decision_round_trips_and_respects_the_limit() {
        let d = Decision::block(StatusCode::FORBIDDEN).with_reason("no");
        let bytes = decision(3, &d, 1 << 20).unwrap();
        let (stream, back) = wire::decode_decision(&bytes).expect("canonical");
        assert_eq!((stream, back), (3, d.clone()));
        let err = decision(3, &d, 4).unwrap_err();
        assert_eq!(err.limit, 4);
        assert!(err.size > 4);
    }
}
