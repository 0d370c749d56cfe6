//! Frames: a 4-byte big-endian length, then one protobuf message.
//!
//! The length is checked against the limit before a single byte of the body is buffered, so a
//! peer announcing a huge frame costs nothing; room for a frame within the limit is reserved
//! as its bytes arrive (at most [`RESERVE_AHEAD`] beyond them), so a peer announcing a large
//! frame and sending little of it costs little. A frame that does not decode is an error for
//! the whole connection (its framing can no longer be trusted). Decoding goes from `Bytes`, so
//! `bytes` fields (bodies, payloads) share the read buffer instead of being copied.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use pool_api::proto;
use prost::Message;
use prost::encoding::{WireType, encoded_len_varint, key_len};
use tokio_util::codec::{Decoder, Encoder};

/// The default largest frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Room reserved for the rest of a frame that has not fully arrived, beyond the bytes already
/// read: 64 KiB. A frame that size or smaller gets its whole room at once; a larger one grows
/// its buffer as its bytes arrive.
pub const RESERVE_AHEAD: usize = 64 * 1024;

/// Bytes of a frame's length.
const HEAD: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame larger than the limit: announced by the peer, or about to be written.
    #[error("frame of {} exceeds the {limit}-byte limit", size.map_or("unknown size".to_owned(), |s| format!("{s} bytes")))]
    TooLarge {
        /// The frame's size: the length the peer announced, or the encoded message's size.
        size: Option<usize>,
        /// The limit.
        limit: usize,
    },
    /// The frame is not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `Out` messages and decodes `In` messages as length-delimited frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    limit: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, _types: PhantomData }
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.next_frame(src)? {
            None => Ok(None),
            Some(frame) => Ok(Some(In::decode(frame)?)),
        }
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// The next whole frame's body, if one has arrived. The length stays in `src` until the
    /// whole frame has, so the codec keeps no state between calls.
    fn next_frame(&mut self, src: &mut BytesMut) -> Result<Option<bytes::Bytes>, FrameError> {
        let Some(head) = src.first_chunk::<HEAD>() else { return Ok(None) };
        let size = u32::from_be_bytes(*head) as usize;
        if size > self.limit {
            return Err(FrameError::TooLarge { size: Some(size), limit: self.limit });
        }
        let missing = (HEAD + size).saturating_sub(src.len());
        if missing > 0 {
            src.reserve(missing.min(RESERVE_AHEAD));
            return Ok(None);
        }
        src.advance(HEAD);
        Ok(Some(src.split_to(size).freeze()))
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_message(&item, dst)
    }
}

/// Writes a frame whose size is known in advance into room already made in the buffer: plain
/// stores for keys and varints, one copy per string or bytes field.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf[self.pos] = (v as u8) | 0x80;
            self.pos += 1;
            v >>= 7;
        }
        self.buf[self.pos] = v as u8;
        self.pos += 1;
    }

    fn key(&mut self, tag: u32, wire_type: WireType) {
        self.varint(u64::from(tag << 3 | wire_type as u32));
    }

    fn bytes(&mut self, data: &[u8]) {
        self.buf[self.pos..self.pos + data.len()].copy_from_slice(data);
        self.pos += data.len();
    }

    fn f32_le(&mut self, v: f32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Checks that exactly the announced size was written.
    fn finish(self) {
        debug_assert_eq!(self.pos, self.buf.len(), "the frame's size was computed wrongly");
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// Checks `size` against the limit, writes the frame's length and returns a writer over
    /// `size` bytes made for the body.
    fn frame<'a>(&self, size: usize, dst: &'a mut BytesMut) -> Result<Writer<'a>, FrameError> {
        self.header(size, dst)?;
        let start = dst.len();
        dst.resize(start + size, 0);
        Ok(Writer { buf: &mut dst[start..], pos: 0 })
    }

    /// Checks `size` against the limit, reserves room and writes the frame's length.
    fn header(&self, size: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
        if size > self.limit {
            return Err(FrameError::TooLarge { size: Some(size), limit: self.limit });
        }
        dst.reserve(4 + size);
        dst.put_u32(u32::try_from(size).expect("the limit fits in the 4-byte length"));
        Ok(())
    }
}

/// An event to send, as the proxy's connection task holds it: encoded straight from the
/// `pool-api` types into the write buffer, byte for byte what `ProxyFrame { stream_id, body:
/// Event(event.into()) }` would encode to, without building that message first (which costs
/// an allocation or two per header).
#[derive(Debug)]
pub struct EventFrame {
    /// The request's stream id.
    pub stream_id: u64,
    /// The event.
    pub event: pool_api::Event,
}

impl<In> Encoder<EventFrame> for FrameCodec<In, proto::ProxyFrame> {
    type Error = FrameError;

    fn encode(&mut self, item: EventFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item.event {
            e @ (pool_api::Event::RequestHeaders(_) | pool_api::Event::ResponseHeaders(_)) => {
                self.encode_event(item.stream_id, &e, dst)
            }
            other => {
                let frame = proto::ProxyFrame {
                    stream_id: item.stream_id,
                    body: Some(proto::proxy_frame::Body::Event(other.into())),
                };
                Encoder::<proto::ProxyFrame>::encode(self, frame, dst)
            }
        }
    }
}

impl<In> FrameCodec<In, proto::ProxyFrame> {
    /// Encodes request `stream_id`'s event from a borrowed value, byte for byte what
    /// [`EventFrame`] encodes to (events other than headers are converted from a clone).
    pub fn encode_event(
        &self,
        stream_id: u64,
        event: &pool_api::Event,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        match event {
            pool_api::Event::RequestHeaders(h) => {
                let uri = UriText::new(&h.uri);
                let addr = AddrText::new(h.client_addr);
                let fields = RequestFields { h, uri: &uri, addr: addr.as_str() };
                let event = fields.len();
                let mut dst = self.frame(frame_len(stream_id, EVENT_REQUEST_HEADERS, event), dst)?;
                frame_prefix(stream_id, EVENT_REQUEST_HEADERS, event, &mut dst);
                fields.write(&mut dst);
                dst.finish();
                Ok(())
            }
            pool_api::Event::ResponseHeaders(h) => {
                let fields = ResponseFields { h };
                let event = fields.len();
                let mut dst = self.frame(frame_len(stream_id, EVENT_RESPONSE_HEADERS, event), dst)?;
                frame_prefix(stream_id, EVENT_RESPONSE_HEADERS, event, &mut dst);
                fields.write(&mut dst);
                dst.finish();
                Ok(())
            }
            other => {
                let frame = proto::ProxyFrame {
                    stream_id,
                    body: Some(proto::proxy_frame::Body::Event(other.clone().into())),
                };
                self.encode_message(&frame, dst)
            }
        }
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// Encodes any message of the schema as one frame.
    pub fn encode_message(&self, message: &impl Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.header(message.encoded_len(), dst)?;
        message.encode(dst).expect("capacity reserved");
        Ok(())
    }
}

/// What the agent side writes: a decision, encoded straight from the `pool-api` type (byte
/// for byte what `AgentFrame { stream_id, body: Decision(decision.into()) }` encodes to), or
/// any other message.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// The answer to request `stream_id`.
    Decision {
        /// The request's stream id.
        stream_id: u64,
        /// The agent's decision.
        decision: pool_api::Decision,
    },
    /// Any other frame.
    Frame(proto::AgentFrame),
}

impl Outbound {
    /// The request this answers (a decision or an error), if it is an answer.
    pub fn answers(&self) -> Option<u64> {
        match self {
            Self::Decision { stream_id, .. } => Some(*stream_id),
            Self::Frame(proto::AgentFrame { stream_id, body: Some(proto::agent_frame::Body::Error(_)) }) => {
                Some(*stream_id)
            }
            Self::Frame(_) => None,
        }
    }
}

impl<In> Encoder<Outbound> for FrameCodec<In, proto::AgentFrame> {
    type Error = FrameError;

    fn encode(&mut self, item: Outbound, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item {
            Outbound::Frame(frame) => Encoder::<proto::AgentFrame>::encode(self, frame, dst),
            Outbound::Decision { stream_id, decision } => self.encode_decision(stream_id, &decision, dst),
        }
    }
}

impl<In> FrameCodec<In, proto::AgentFrame> {
    /// Encodes the answer to request `stream_id` from a borrowed decision, byte for byte what
    /// `Outbound::Decision` encodes to.
    pub fn encode_decision(
        &self,
        stream_id: u64,
        decision: &pool_api::Decision,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        let fields = decision::len(decision);
        let stream =
            if stream_id == 0 { 0 } else { key_len(FRAME_STREAM_ID) + encoded_len_varint(stream_id) };
        let mut dst = self.frame(stream + msg_len(AGENT_FRAME_DECISION, fields), dst)?;
        if stream_id != 0 {
            dst.key(FRAME_STREAM_ID, WireType::Varint);
            dst.varint(stream_id);
        }
        put_msg_header(AGENT_FRAME_DECISION, fields, &mut dst);
        decision::write(decision, &mut dst);
        dst.finish();
        Ok(())
    }
}

const AGENT_FRAME_DECISION: u32 = 4;

/// The `Decision` message, field by field (see agent.proto). Repeated elements and oneof
/// members are written even when empty; plain scalars and strings are left out when they hold
/// their default; `optional` fields are written when present.
mod decision {
    use http::HeaderMap;
    use pool_api::{Action, BodyMutation, Decision, HeaderOp};
    use prost::encoding::{WireType, encoded_len_varint, key_len};

    use super::{Writer, headers_len, ld_len, msg_len, put_headers, put_ld, put_msg_header};

    fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) }
    }

    fn put_varint(tag: u32, v: u64, dst: &mut Writer<'_>) {
        if v != 0 {
            dst.key(tag, WireType::Varint);
            dst.varint(v);
        }
    }

    fn kv_len<'a>(tag: u32, pairs: impl Iterator<Item = (&'a String, &'a String)>) -> usize {
        pairs.map(|(k, v)| msg_len(tag, ld_len(1, k.len()) + ld_len(2, v.len()))).sum()
    }

    fn put_kv<'a>(tag: u32, pairs: impl Iterator<Item = (&'a String, &'a String)>, dst: &mut Writer<'_>) {
        for (k, v) in pairs {
            put_msg_header(tag, ld_len(1, k.len()) + ld_len(2, v.len()), dst);
            put_ld(1, k.as_bytes(), dst);
            put_ld(2, v.as_bytes(), dst);
        }
    }

    fn op_parts(op: &HeaderOp) -> (u64, &[u8], &[u8]) {
        match op {
            HeaderOp::Set { name, value } => (0, name.as_str().as_bytes(), value.as_bytes()),
            HeaderOp::Add { name, value } => (1, name.as_str().as_bytes(), value.as_bytes()),
            HeaderOp::Remove { name } => (2, name.as_str().as_bytes(), &[]),
        }
    }

    fn op_fields(op: &HeaderOp) -> usize {
        let (kind, name, value) = op_parts(op);
        varint_len(1, kind) + ld_len(2, name.len()) + ld_len(3, value.len())
    }

    fn ops_len(tag: u32, ops: &[HeaderOp]) -> usize {
        ops.iter().map(|op| msg_len(tag, op_fields(op))).sum()
    }

    fn put_ops(tag: u32, ops: &[HeaderOp], dst: &mut Writer<'_>) {
        for op in ops {
            put_msg_header(tag, op_fields(op), dst);
            let (kind, name, value) = op_parts(op);
            put_varint(1, kind, dst);
            put_ld(2, name, dst);
            put_ld(3, value, dst);
        }
    }

    fn block_fields(status: u16, headers: &HeaderMap, body: &[u8]) -> usize {
        varint_len(1, u64::from(status)) + headers_len(2, headers) + ld_len(3, body.len())
    }

    fn action_len(action: &Action) -> usize {
        match action {
            Action::Allow => msg_len(1, 0),
            Action::Block { status, headers, body } => {
                msg_len(2, block_fields(status.as_u16(), headers, body))
            }
            Action::Redirect { location, status } => {
                msg_len(3, ld_len(1, location.len()) + varint_len(2, u64::from(status.as_u16())))
            }
            Action::Challenge { kind, params } => {
                msg_len(4, ld_len(1, kind.len()) + kv_len(2, params.iter()))
            }
        }
    }

    fn put_action(action: &Action, dst: &mut Writer<'_>) {
        match action {
            Action::Allow => put_msg_header(1, 0, dst),
            Action::Block { status, headers, body } => {
                put_msg_header(2, block_fields(status.as_u16(), headers, body), dst);
                put_varint(1, u64::from(status.as_u16()), dst);
                put_headers(2, headers, dst);
                put_ld(3, body, dst);
            }
            Action::Redirect { location, status } => {
                put_msg_header(3, ld_len(1, location.len()) + varint_len(2, u64::from(status.as_u16())), dst);
                put_ld(1, location.as_bytes(), dst);
                put_varint(2, u64::from(status.as_u16()), dst);
            }
            Action::Challenge { kind, params } => {
                put_msg_header(4, ld_len(1, kind.len()) + kv_len(2, params.iter()), dst);
                put_ld(1, kind.as_bytes(), dst);
                put_kv(2, params.iter(), dst);
            }
        }
    }

    fn body_fields(body: &BodyMutation) -> usize {
        match body {
            BodyMutation::Replace { chunk_index, data } => {
                varint_len(1, u64::from(*chunk_index)) + msg_len(2, data.len())
            }
            BodyMutation::Drop { chunk_index } => varint_len(1, u64::from(*chunk_index)) + key_len(3) + 1,
        }
    }

    fn put_body(body: &BodyMutation, dst: &mut Writer<'_>) {
        put_msg_header(7, body_fields(body), dst);
        match body {
            BodyMutation::Replace { chunk_index, data } => {
                put_varint(1, u64::from(*chunk_index), dst);
                put_msg_header(2, data.len(), dst);
                dst.bytes(data);
            }
            BodyMutation::Drop { chunk_index } => {
                put_varint(1, u64::from(*chunk_index), dst);
                dst.key(3, WireType::Varint);
                dst.varint(1);
            }
        }
    }

    fn audit_fields(d: &Decision) -> usize {
        let a = &d.audit;
        a.rule_ids.iter().map(|r| msg_len(1, r.len())).sum::<usize>()
            + a.tags.iter().map(|t| msg_len(2, t.len())).sum::<usize>()
            + a.reason.as_ref().map_or(0, |r| msg_len(3, r.len()))
            + a.confidence.map_or(0, |_| key_len(4) + 4)
            + kv_len(5, a.custom.iter())
    }

    fn put_audit(d: &Decision, dst: &mut Writer<'_>) {
        let a = &d.audit;
        put_msg_header(9, audit_fields(d), dst);
        for r in &a.rule_ids {
            put_msg_header(1, r.len(), dst);
            dst.bytes(r.as_bytes());
        }
        for t in &a.tags {
            put_msg_header(2, t.len(), dst);
            dst.bytes(t.as_bytes());
        }
        if let Some(r) = &a.reason {
            put_msg_header(3, r.len(), dst);
            dst.bytes(r.as_bytes());
        }
        if let Some(c) = a.confidence {
            dst.key(4, WireType::ThirtyTwoBit);
            dst.f32_le(c);
        }
        put_kv(5, a.custom.iter(), dst);
    }

    /// Size of the `Decision` message's fields.
    pub(super) fn len(d: &Decision) -> usize {
        action_len(&d.action)
            + ops_len(5, &d.request_headers)
            + ops_len(6, &d.response_headers)
            + d.body.as_ref().map_or(0, |b| msg_len(7, body_fields(b)))
            + if d.needs_more { key_len(8) + 1 } else { 0 }
            + msg_len(9, audit_fields(d))
    }

    /// Writes the `Decision` message's fields.
    pub(super) fn write(d: &Decision, dst: &mut Writer<'_>) {
        put_action(&d.action, dst);
        put_ops(5, &d.request_headers, dst);
        put_ops(6, &d.response_headers, dst);
        if let Some(b) = &d.body {
            put_body(b, dst);
        }
        if d.needs_more {
            dst.key(8, WireType::Varint);
            dst.varint(1);
        }
        put_audit(d, dst);
    }
}

/// A frame the agent side reads: a request-headers event decoded straight from the frame's
/// bytes into the `pool-api` type (header values and the URI share the read buffer), or any
/// other message as the schema decodes it.
#[derive(Debug)]
pub enum Inbound {
    /// An event, already converted; an invalid one carries why.
    Event {
        /// The request's stream id.
        stream_id: u64,
        /// The event, or what is wrong with it.
        event: Result<pool_api::Event, pool_api::proto::ProtoError>,
    },
    /// Any other frame.
    Frame(proto::ProxyFrame),
}

impl<Out> Decoder for FrameCodec<Inbound, Out> {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        let Some(frame) = self.next_frame(src)? else { return Ok(None) };
        if let Some((stream_id, event)) = direct::request_headers(&frame) {
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
pub enum FromAgent {
    /// The decision answering request `stream_id`.
    Decision {
        /// The request's stream id.
        stream_id: u64,
        /// The agent's decision.
        decision: pool_api::Decision,
    },
    /// Any other frame.
    Frame(proto::AgentFrame),
}

impl<Out> Decoder for FrameCodec<FromAgent, Out> {
    type Item = FromAgent;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<FromAgent>, FrameError> {
        let Some(frame) = self.next_frame(src)? else { return Ok(None) };
        if let Some((stream_id, decision)) = direct::decision(&frame) {
            return Ok(Some(FromAgent::Decision { stream_id, decision }));
        }
        Ok(Some(FromAgent::Frame(proto::AgentFrame::decode(frame)?)))
    }
}

impl<In, Out> FrameCodec<In, Out> {
    /// The largest frame read or written.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// The same codec decoding `Other`.
    pub(crate) fn retype<Other>(self) -> FrameCodec<Other, Out> {
        FrameCodec { limit: self.limit, _types: PhantomData }
    }
}

/// Decoding the two hot messages — a `RequestHeaders` event on the agent side, a `Decision`
/// on the proxy side — without building the schema's messages first. The frame is walked as
/// a byte slice; only what the `pool-api` value keeps (the URI, header values, bodies) becomes
/// a `Bytes` sharing the read buffer. Only the canonical encoding (what the encoders above
/// and prost write: known fields, right wire types, each message field once) takes this path;
/// anything else returns `None` and is decoded by prost, so both paths always agree.
mod direct {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
    use pool_api::proto::ProtoError;
    use pool_api::{Action, Audit, Decision, HeaderOp};

    const M: &str = "RequestHeaders";

    fn bad(field: &'static str, problem: impl ToString) -> ProtoError {
        ProtoError { message: M, field, problem: problem.to_string() }
    }

    /// One field of a message.
    enum Field<'a> {
        Varint(u32, u64),
        Bytes(u32, &'a [u8]),
        Fixed32(u32, [u8; 4]),
    }

    /// A varint, as prost reads it: at most ten bytes, the tenth no more than 1.
    #[inline(always)]
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let (&first, rest) = buf.split_first()?;
        if first < 0x80 {
            *buf = rest;
            return Some(u64::from(first));
        }
        long_varint(buf)
    }

    #[inline(never)]
    fn long_varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for (i, &b) in buf.iter().take(10).enumerate() {
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                *buf = &buf[i + 1..];
                return Some(value);
            }
        }
        None
    }

    /// The next field (`None`: not something the direct path reads, or not a valid key:
    /// prost's `decode_key` refuses keys past `u32::MAX` and tag 0).
    #[inline(always)]
    fn field<'a>(buf: &mut &'a [u8]) -> Option<Field<'a>> {
        let key = u32::try_from(varint(buf)?).ok()?;
        let tag = key >> 3;
        if tag == 0 {
            return None;
        }
        match key & 7 {
            0 => Some(Field::Varint(tag, varint(buf)?)),
            2 => {
                let len = usize::try_from(varint(buf)?).ok()?;
                if len > buf.len() {
                    return None;
                }
                let (data, rest) = buf.split_at(len);
                *buf = rest;
                Some(Field::Bytes(tag, data))
            }
            5 => {
                let (data, rest) = buf.split_first_chunk::<4>()?;
                *buf = rest;
                Some(Field::Fixed32(tag, *data))
            }
            _ => None,
        }
    }

    fn utf8(bytes: &[u8]) -> Option<&str> {
        std::str::from_utf8(bytes).ok()
    }

    /// The body of the frame's one message field `body_tag`, and the stream id
    /// (`ProxyFrame` and `AgentFrame` both carry `stream_id = 1`).
    fn frame_body(frame: &[u8], body_tag: u32) -> Option<(u64, &[u8])> {
        let mut buf = frame;
        let (mut stream_id, mut body) = (0, None);
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Varint(1, v) => stream_id = v,
                Field::Bytes(tag, b) if tag == body_tag && body.is_none() => body = Some(b),
                _ => return None,
            }
        }
        Some((stream_id, body?))
    }

    /// `ProxyFrame { stream_id = 1, event = 3 { request_headers = 1 { … } } }`.
    pub(crate) fn request_headers(frame: &Bytes) -> Option<(u64, Result<pool_api::Event, ProtoError>)> {
        let (stream_id, mut event) = frame_body(frame, 3)?;
        let Field::Bytes(1, fields) = field(&mut event)? else { return None };
        if !event.is_empty() {
            return None;
        }
        Some((stream_id, parse(frame, fields)?))
    }

    /// The fields of a `Header` or `KeyValue` pair (`name`/`key` = 1, `value` = 2).
    #[inline(always)]
    fn pair(mut buf: &[u8]) -> Option<(&[u8], &[u8])> {
        let (mut first, mut second): (&[u8], &[u8]) = (&[], &[]);
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Bytes(1, v) => first = v,
                Field::Bytes(2, v) => second = v,
                _ => return None,
            }
        }
        Some((first, second))
    }

    /// Checks the fields (`None`: not canonical) and converts them as `TryFrom` does, in one
    /// pass after counting the headers (so the map is made at its size once). Errors are
    /// reported in `TryFrom`'s order: address, method, URI, then the first bad header.
    fn parse(frame: &Bytes, fields: &[u8]) -> Option<Result<pool_api::Event, ProtoError>> {
        let mut headers = 0;
        let mut buf = fields;
        while !buf.is_empty() {
            let Field::Bytes(tag, _) = field(&mut buf)? else { return None };
            headers += usize::from(tag == 4);
        }
        let (mut id, mut method, mut uri, mut addr): (&[u8], &[u8], &[u8], &[u8]) = (&[], &[], &[], &[]);
        let mut map = HeaderMap::with_capacity(headers);
        let mut header_error = None;
        let mut metadata = pool_api::Metadata::new();
        let mut buf = fields;
        while let Some(Field::Bytes(tag, b)) = field(&mut buf) {
            match tag {
                1 => id = b,
                2 => method = b,
                3 => uri = b,
                4 => {
                    let (name, value) = pair(b)?;
                    if header_error.is_none() {
                        match header(frame, name, value) {
                            Ok((name, value)) => {
                                map.append(name, value);
                            }
                            Err(e) => header_error = Some(e),
                        }
                    }
                }
                5 => addr = b,
                6 => {
                    let (key, value) = pair(b)?;
                    metadata.insert(utf8(key)?.to_owned(), utf8(value)?.to_owned());
                }
                _ => return None,
            }
        }
        // prost would refuse non-UTF-8 in these string fields: leave that to it.
        let id = utf8(id)?;
        if !method.is_ascii() || !uri.is_ascii() {
            utf8(method)?;
            utf8(uri)?;
        }
        let addr = utf8(addr)?;
        Some(convert(frame, id, method, uri, map, header_error, addr, metadata))
    }

    fn header(frame: &Bytes, name: &[u8], value: &[u8]) -> Result<(HeaderName, HeaderValue), ProtoError> {
        let name = HeaderName::from_bytes(name).map_err(|e| bad("headers.name", e))?;
        let value =
            HeaderValue::from_maybe_shared(frame.slice_ref(value)).map_err(|e| bad("headers.value", e))?;
        Ok((name, value))
    }

    /// Builds the event from fields checked by [`parse`].
    #[allow(clippy::too_many_arguments)]
    fn convert(
        frame: &Bytes,
        id: &str,
        method: &[u8],
        uri: &[u8],
        headers: HeaderMap,
        header_error: Option<ProtoError>,
        addr: &str,
        metadata: pool_api::Metadata,
    ) -> Result<pool_api::Event, ProtoError> {
        let client_addr =
            if addr.is_empty() { None } else { Some(addr.parse().map_err(|e| bad("client_addr", e))?) };
        let method = Method::from_bytes(method).map_err(|e| bad("method", e))?;
        let uri = Uri::from_maybe_shared(frame.slice_ref(uri)).map_err(|e| bad("uri", e))?;
        if let Some(e) = header_error {
            return Err(e);
        }
        Ok(pool_api::Event::RequestHeaders(pool_api::RequestHeaders {
            correlation_id: id.into(),
            method,
            uri,
            headers,
            client_addr,
            metadata,
        }))
    }

    /// `AgentFrame { stream_id = 1, decision = 4 { … } }`. Decisions with a challenge or a
    /// body mutation, and anything that would be an error, take the prost path.
    pub(crate) fn decision(frame: &Bytes) -> Option<(u64, Decision)> {
        let (stream_id, mut buf) = frame_body(frame, 4)?;
        let mut action = None;
        let (mut request_headers, mut response_headers) = (Vec::new(), Vec::new());
        let (mut needs_more, mut audit) = (false, None);
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Bytes(1, b) if action.is_none() && b.is_empty() => action = Some(Action::Allow),
                Field::Bytes(2, b) if action.is_none() => action = Some(block(frame, b)?),
                Field::Bytes(3, b) if action.is_none() => action = Some(redirect(b)?),
                Field::Bytes(5, b) => request_headers.push(op(frame, b)?),
                Field::Bytes(6, b) => response_headers.push(op(frame, b)?),
                Field::Varint(8, v) => needs_more = v != 0,
                Field::Bytes(9, b) if audit.is_none() => audit = Some(audit_of(b)?),
                _ => return None,
            }
        }
        let decision = Decision {
            action: action?,
            request_headers,
            response_headers,
            body: None,
            needs_more,
            audit: audit.unwrap_or_default(),
        };
        Some((stream_id, decision))
    }

    /// A `uint32` status that converts (anything else is the prost path's error to report).
    fn status(v: u64) -> Option<StatusCode> {
        StatusCode::from_u16(u16::try_from(v).ok()?).ok()
    }

    fn block(frame: &Bytes, mut buf: &[u8]) -> Option<Action> {
        let (mut code, mut body, mut count) = (0, &[][..], 0);
        let fields = buf;
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Varint(1, v) => code = v,
                Field::Bytes(2, b) => {
                    pair(b)?;
                    count += 1;
                }
                Field::Bytes(3, b) => body = b,
                _ => return None,
            }
        }
        let status = status(code)?;
        let mut headers = HeaderMap::with_capacity(count);
        let mut buf = fields;
        while let Some(f) = field(&mut buf) {
            if let Field::Bytes(2, b) = f {
                let (name, value) = pair(b)?;
                let name = HeaderName::from_bytes(name).ok()?;
                headers.append(name, HeaderValue::from_maybe_shared(frame.slice_ref(value)).ok()?);
            }
        }
        Some(Action::Block { status, headers, body: frame.slice_ref(body) })
    }

    fn redirect(mut buf: &[u8]) -> Option<Action> {
        let (mut location, mut code) = (&[][..], 0);
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Bytes(1, b) => location = b,
                Field::Varint(2, v) => code = v,
                _ => return None,
            }
        }
        Some(Action::Redirect { location: utf8(location)?.to_owned(), status: status(code)? })
    }

    /// `HeaderOp { kind = 1, name = 2, value = 3 }`.
    fn op(frame: &Bytes, mut buf: &[u8]) -> Option<HeaderOp> {
        let (mut kind, mut name, mut value) = (0, &[][..], &[][..]);
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Varint(1, v) => kind = v,
                Field::Bytes(2, b) => name = b,
                Field::Bytes(3, b) => value = b,
                _ => return None,
            }
        }
        let name = HeaderName::from_bytes(name).ok()?;
        let value = || HeaderValue::from_maybe_shared(frame.slice_ref(value)).ok();
        Some(match kind {
            0 => HeaderOp::Set { name, value: value()? },
            1 => HeaderOp::Add { name, value: value()? },
            2 => HeaderOp::Remove { name },
            _ => return None,
        })
    }

    /// `Audit { rule_ids = 1, tags = 2, reason = 3, confidence = 4, custom = 5 }`.
    fn audit_of(mut buf: &[u8]) -> Option<Audit> {
        let mut audit = Audit::default();
        while !buf.is_empty() {
            match field(&mut buf)? {
                Field::Bytes(1, b) => audit.rule_ids.push(utf8(b)?.to_owned()),
                Field::Bytes(2, b) => audit.tags.push(utf8(b)?.to_owned()),
                Field::Bytes(3, b) => audit.reason = Some(utf8(b)?.to_owned()),
                Field::Fixed32(4, b) => audit.confidence = Some(f32::from_le_bytes(b)),
                Field::Bytes(5, b) => {
                    let (key, value) = pair(b)?;
                    audit.custom.insert(utf8(key)?.to_owned(), utf8(value)?.to_owned());
                }
                _ => return None,
            }
        }
        Some(audit)
    }
}

// Field numbers of the schema (agent.proto) that the direct encoder writes.
const FRAME_STREAM_ID: u32 = 1;
const FRAME_EVENT: u32 = 3;
const EVENT_REQUEST_HEADERS: u32 = 1;
const EVENT_RESPONSE_HEADERS: u32 = 3;

/// Size of a length-delimited field (key, length, bytes); proto3 leaves empty ones out.
fn ld_len(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { key_len(tag) + encoded_len_varint(len as u64) + len }
}

/// Size of an embedded message field, written even when empty (a oneof member or a repeated
/// element).
fn msg_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_ld(tag: u32, data: &[u8], dst: &mut Writer<'_>) {
    if !data.is_empty() {
        put_msg_header(tag, data.len(), dst);
        dst.bytes(data);
    }
}

fn put_msg_header(tag: u32, len: usize, dst: &mut Writer<'_>) {
    dst.key(tag, WireType::LengthDelimited);
    dst.varint(len as u64);
}

fn frame_len(stream_id: u64, kind: u32, event_fields: usize) -> usize {
    let stream = if stream_id == 0 { 0 } else { key_len(FRAME_STREAM_ID) + encoded_len_varint(stream_id) };
    stream + msg_len(FRAME_EVENT, msg_len(kind, event_fields))
}

fn frame_prefix(stream_id: u64, kind: u32, event_fields: usize, dst: &mut Writer<'_>) {
    if stream_id != 0 {
        dst.key(FRAME_STREAM_ID, WireType::Varint);
        dst.varint(stream_id);
    }
    put_msg_header(FRAME_EVENT, msg_len(kind, event_fields), dst);
    put_msg_header(kind, event_fields, dst);
}

fn header_fields_len(name: &[u8], value: &[u8]) -> usize {
    ld_len(1, name.len()) + ld_len(2, value.len())
}

fn headers_len(tag: u32, map: &http::HeaderMap) -> usize {
    map.iter().map(|(n, v)| msg_len(tag, header_fields_len(n.as_str().as_bytes(), v.as_bytes()))).sum()
}

fn put_headers(tag: u32, map: &http::HeaderMap, dst: &mut Writer<'_>) {
    for (name, value) in map {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        put_msg_header(tag, header_fields_len(name, value), dst);
        put_ld(1, name, dst);
        put_ld(2, value, dst);
    }
}

/// A URI's text as its `Display` writes it (scheme `://` authority path `?` query), kept as
/// the borrowed pieces instead of a formatted `String`.
struct UriText<'a> {
    parts: [&'a str; 6],
    len: usize,
}

impl<'a> UriText<'a> {
    fn new(uri: &'a http::Uri) -> Self {
        let (scheme, sep) = match uri.scheme_str() {
            Some(s) => (s, "://"),
            None => ("", ""),
        };
        let authority = uri.authority().map_or("", http::uri::Authority::as_str);
        let (mark, query) = match uri.query() {
            Some(q) => ("?", q),
            None => ("", ""),
        };
        let parts = [scheme, sep, authority, uri.path(), mark, query];
        Self { parts, len: parts.iter().map(|p| p.len()).sum() }
    }

    fn write(&self, dst: &mut Writer<'_>) {
        for part in self.parts {
            dst.bytes(part.as_bytes());
        }
    }
}

/// A client address's text as its `Display` writes it, formatted on the stack.
struct AddrText {
    buf: [u8; 96],
    len: usize,
}

impl AddrText {
    fn new(addr: Option<std::net::SocketAddr>) -> Self {
        let mut text = Self { buf: [0; 96], len: 0 };
        match addr {
            None => {}
            Some(std::net::SocketAddr::V4(a)) => {
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    text.decimal(u32::from(octet));
                }
                text.push(b':');
                text.decimal(u32::from(a.port()));
            }
            Some(a @ std::net::SocketAddr::V6(_)) => {
                use std::fmt::Write;
                // The longest IPv6 socket address text (with a scope id) is 58 bytes.
                write!(text, "{a}").expect("an IPv6 socket address fits in 96 bytes");
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn decimal(&mut self, mut v: u32) {
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in &digits[start..] {
            self.push(d);
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("formatted as ASCII")
    }
}

impl std::fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `RequestHeaders`: correlation_id = 1, method = 2, uri = 3, headers = 4, client_addr = 5,
/// metadata = 6.
struct RequestFields<'a> {
    h: &'a pool_api::RequestHeaders,
    uri: &'a UriText<'a>,
    addr: &'a str,
}

impl RequestFields<'_> {
    fn len(&self) -> usize {
        let metadata: usize =
            self.h.metadata.iter().map(|(k, v)| msg_len(6, ld_len(1, k.len()) + ld_len(2, v.len()))).sum();
        ld_len(1, self.h.correlation_id.as_str().len())
            + ld_len(2, self.h.method.as_str().len())
            + ld_len(3, self.uri.len)
            + headers_len(4, &self.h.headers)
            + ld_len(5, self.addr.len())
            + metadata
    }

    fn write(&self, dst: &mut Writer<'_>) {
        put_ld(1, self.h.correlation_id.as_str().as_bytes(), dst);
        put_ld(2, self.h.method.as_str().as_bytes(), dst);
        if self.uri.len > 0 {
            put_msg_header(3, self.uri.len, dst);
            self.uri.write(dst);
        }
        put_headers(4, &self.h.headers, dst);
        put_ld(5, self.addr.as_bytes(), dst);
        for (k, v) in &self.h.metadata {
            put_msg_header(6, ld_len(1, k.len()) + ld_len(2, v.len()), dst);
            put_ld(1, k.as_bytes(), dst);
            put_ld(2, v.as_bytes(), dst);
        }
    }
}

/// `ResponseHeaders`: correlation_id = 1, status = 2, headers = 3.
struct ResponseFields<'a> {
    h: &'a pool_api::ResponseHeaders,
}

impl ResponseFields<'_> {
    fn status(&self) -> u64 {
        u64::from(self.h.status.as_u16())
    }

    fn len(&self) -> usize {
        ld_len(1, self.h.correlation_id.as_str().len())
            + key_len(2)
            + encoded_len_varint(self.status())
            + headers_len(3, &self.h.headers)
    }

    fn write(&self, dst: &mut Writer<'_>) {
        put_ld(1, self.h.correlation_id.as_str().as_bytes(), dst);
        dst.key(2, WireType::Varint);
        dst.varint(self.status());
        put_headers(3, &self.h.headers, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_api::proto::{AgentFrame, Ping, ProxyFrame, proxy_frame};

    #[test]
    fn a_frame_round_trips() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1024);
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        let frame = ProxyFrame { stream_id: 7, body: Some(proxy_frame::Body::Ping(Ping {})) };
        proxy.encode(frame.clone(), &mut buf).unwrap();
        assert_eq!(agent.decode(&mut buf).unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_announcement_is_refused_before_the_body_arrives() {
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&u32::to_be_bytes(1 << 30)[..]);
        let err = agent.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { size: Some(0x4000_0000), limit: 1024 }), "{err}");
        assert!(buf.capacity() < 1 << 20, "nothing was allocated for the announced body");
    }

    #[test]
    fn a_large_announced_frame_gets_room_only_as_its_bytes_arrive() {
        const SIZE: usize = 8 << 20;
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(SIZE);
        let frame = ProxyFrame {
            stream_id: 1,
            body: Some(proxy_frame::Body::ConfigPush(pool_api::proto::ConfigPush {
                push_id: 1,
                kind: "rules".into(),
                version: None,
                payload: vec![7u8; SIZE - 64].into(),
            })),
        };
        let mut wire = BytesMut::new();
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(SIZE);
        proxy.encode(frame.clone(), &mut wire).unwrap();
        assert!(wire.len() > 4 << 20, "the frame is large: {}", wire.len());

        // The length and a few bytes: room for the next RESERVE_AHEAD bytes, not for 8 MiB.
        let mut buf = BytesMut::from(&wire[..100]);
        assert_eq!(agent.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() <= 100 + RESERVE_AHEAD, "reserved {} bytes", buf.capacity());

        // The rest, as a socket hands it over: the buffer grows with it and the frame decodes.
        let mut fed = 100;
        while fed < wire.len() {
            let step = (wire.len() - fed).min(buf.capacity() - buf.len()).max(1);
            buf.extend_from_slice(&wire[fed..fed + step]);
            fed += step;
            assert!(buf.capacity() <= 2 * fed + RESERVE_AHEAD, "{} reserved for {fed} bytes", buf.capacity());
            if fed < wire.len() {
                assert_eq!(agent.decode(&mut buf).unwrap(), None);
            }
        }
        assert_eq!(agent.decode(&mut buf).unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_message_is_not_written() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(8);
        let frame = ProxyFrame { stream_id: u64::MAX, body: Some(proxy_frame::Body::Ping(Ping {})) };
        assert!(matches!(proxy.encode(frame, &mut BytesMut::new()), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn frames_split_across_reads_decode_whole() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1024);
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut wire = BytesMut::new();
        let frames: Vec<_> = (0..3)
            .map(|i| ProxyFrame { stream_id: 1000 + i, body: Some(proxy_frame::Body::Ping(Ping {})) })
            .collect();
        for f in &frames {
            proxy.encode(f.clone(), &mut wire).unwrap();
        }
        // Feed one byte at a time: every partial state must be resumed correctly.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(f) = agent.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(agent.decode(&mut buf), Err(FrameError::Decode(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_allocate_past_the_limit(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(256);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = agent.decode(&mut buf) {}
            proptest::prop_assert!(buf.capacity() <= 512 + 256);
        }
    }

    fn header_map() -> impl proptest::strategy::Strategy<Value = http::HeaderMap> {
        use proptest::prelude::*;
        let name =
            prop_oneof![Just("host".to_owned()), Just("content-type".to_owned()), "x-[a-z0-9-]{0,20}",];
        let value = proptest::collection::vec(prop_oneof![32u8..127, 128u8..=255], 0..40);
        proptest::collection::vec((name, value), 0..12).prop_map(|pairs| {
            let mut map = http::HeaderMap::new();
            for (n, v) in pairs {
                map.append(
                    http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(&v).unwrap(),
                );
            }
            map
        })
    }

    fn header_event() -> impl proptest::strategy::Strategy<Value = pool_api::Event> {
        use proptest::prelude::*;
        let request = (
            "[a-z0-9-]{0,24}",
            prop_oneof![Just("GET"), Just("POST"), Just("PURGE")],
            prop_oneof![Just("/"), Just("/a/b?c=d"), Just("https://h.test:8443/x?y"), Just("*")],
            header_map(),
            proptest::option::of(any::<(u8, u8, u16, bool, u32)>()),
            proptest::collection::btree_map("[a-z]{0,6}", ".{0,10}", 0..4),
        )
            .prop_map(|(id, method, uri, headers, addr, metadata)| {
                let mut h = pool_api::RequestHeaders::new(
                    id,
                    http::Method::from_bytes(method.as_bytes()).unwrap(),
                    uri.parse().unwrap(),
                );
                h.headers = headers;
                h.client_addr = addr.map(|(a, b, port, v6, scope)| {
                    if v6 {
                        let ip =
                            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, u16::from(a), 0, u16::from(b), port);
                        std::net::SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope))
                    } else {
                        std::net::SocketAddr::from(([a, b, 0, 1], port))
                    }
                });
                h.metadata = metadata;
                pool_api::Event::RequestHeaders(h)
            });
        let response = ("[a-z0-9]{0,12}", 100u16..600, header_map()).prop_map(|(id, status, headers)| {
            pool_api::Event::ResponseHeaders(pool_api::ResponseHeaders {
                correlation_id: id.into(),
                status: http::StatusCode::from_u16(status).unwrap(),
                headers,
            })
        });
        prop_oneof![request, response]
    }

    proptest::proptest! {
        #[test]
        fn direct_event_encoding_is_byte_for_byte_the_schema_encoding(
            event in header_event(),
            stream_id in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::prelude::any::<u64>()],
        ) {
            let mut codec: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1 << 20);
            let mut direct = BytesMut::new();
            codec.encode(EventFrame { stream_id, event: event.clone() }, &mut direct).unwrap();
            let mut reference = BytesMut::new();
            let frame = ProxyFrame { stream_id, body: Some(proxy_frame::Body::Event(event.clone().into())) };
            codec.encode(frame, &mut reference).unwrap();
            proptest::prop_assert_eq!(&direct[..], &reference[..]);
            // And the agent reads back the same event.
            let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1 << 20);
            let decoded = agent.decode(&mut direct).unwrap().unwrap();
            let Some(proxy_frame::Body::Event(e)) = decoded.body else { panic!("not an event") };
            proptest::prop_assert_eq!(pool_api::Event::try_from(e).unwrap(), event);
        }
    }

    #[test]
    fn a_direct_event_over_the_limit_is_not_written() {
        let mut codec: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(64);
        let mut h = pool_api::RequestHeaders::new("r", http::Method::GET, http::Uri::from_static("/"));
        h.headers.insert("x-big", http::HeaderValue::from_bytes(&[b'a'; 100]).unwrap());
        let mut buf = BytesMut::new();
        let err =
            codec.encode(EventFrame { stream_id: 1, event: pool_api::Event::RequestHeaders(h) }, &mut buf);
        assert!(matches!(err, Err(FrameError::TooLarge { size: Some(s), limit: 64 }) if s > 64), "{err:?}");
        assert!(buf.is_empty(), "nothing half-written");
    }

    /// What the agent side would get by decoding with prost and converting.
    fn reference(frame: bytes::Bytes) -> Option<(u64, Result<pool_api::Event, pool_api::proto::ProtoError>)> {
        match ProxyFrame::decode(frame).ok()? {
            ProxyFrame { stream_id, body: Some(proxy_frame::Body::Event(e)) } => {
                Some((stream_id, pool_api::Event::try_from(e)))
            }
            _ => None,
        }
    }

    proptest::proptest! {
        #[test]
        fn the_direct_decoder_agrees_with_the_schema_on_valid_events(
            event in header_event(),
            stream_id in proptest::prelude::any::<u64>(),
        ) {
            let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            proxy.encode(EventFrame { stream_id, event: event.clone() }, &mut buf).unwrap();
            let body = bytes::Bytes::copy_from_slice(&buf[4..]);
            let direct = direct::request_headers(&body);
            if matches!(event, pool_api::Event::RequestHeaders(_)) {
                proptest::prop_assert!(direct.is_some(), "canonical request headers take the direct path");
            }
            if let Some(direct) = direct {
                proptest::prop_assert_eq!(Some(direct), reference(body));
            }
            let mut agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
            let Some(Inbound::Event { stream_id: id, event: Ok(back) }) = agent.decode(&mut buf).unwrap() else {
                panic!("an event")
            };
            proptest::prop_assert_eq!(id, stream_id);
            proptest::prop_assert_eq!(back, event);
        }

        #[test]
        fn the_direct_decoder_agrees_with_the_schema_on_any_bytes(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let body = bytes::Bytes::from(data);
            if let Some(direct) = direct::request_headers(&body) {
                let reference = reference(body);
                let same = match (&direct, &reference) {
                    ((a, Ok(x)), Some((b, Ok(y)))) => a == b && x == y,
                    ((a, Err(_)), Some((b, Err(_)))) => a == b,
                    _ => false,
                };
                proptest::prop_assert!(same, "direct {:?} vs prost {:?}", direct, reference);
            }
        }
    }

    #[test]
    fn mutated_canonical_frames_decode_alike_both_ways() {
        // Flip each byte of a real frame in turn: the direct path either declines or agrees.
        let mut h = pool_api::RequestHeaders::new("r-1", http::Method::GET, http::Uri::from_static("/a?b"));
        h.headers.insert("x-k", http::HeaderValue::from_static("v"));
        h.metadata.insert("route".into(), "api".into());
        h.client_addr = Some(([10, 0, 0, 1], 80).into());
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        proxy
            .encode(EventFrame { stream_id: 7, event: pool_api::Event::RequestHeaders(h) }, &mut buf)
            .unwrap();
        let body = buf.split_off(4);
        for i in 0..body.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut mutated = body.clone();
                mutated[i] ^= flip;
                let mutated = mutated.freeze();
                if let Some(direct) = direct::request_headers(&mutated) {
                    let reference = reference(mutated);
                    let same = match (&direct, &reference) {
                        ((a, Ok(x)), Some((b, Ok(y)))) => a == b && x == y,
                        ((a, Err(_)), Some((b, Err(_)))) => a == b,
                        _ => false,
                    };
                    assert!(same, "byte {i} ^ {flip:#x}: direct {direct:?} vs prost {reference:?}");
                }
            }
        }
    }

    fn decision() -> impl proptest::strategy::Strategy<Value = pool_api::Decision> {
        use pool_api::{Action, BodyMutation, Decision, HeaderOp};
        use proptest::prelude::*;
        let status = prop_oneof![Just(200u16), Just(302), Just(403), Just(503)];
        let text = || ".{0,12}";
        let action = prop_oneof![
            Just(Action::Allow),
            (status.clone(), header_map(), proptest::collection::vec(any::<u8>(), 0..20)).prop_map(
                |(s, headers, body)| Action::Block {
                    status: http::StatusCode::from_u16(s).unwrap(),
                    headers,
                    body: body.into(),
                }
            ),
            (text(), status.clone()).prop_map(|(location, s)| Action::Redirect {
                location,
                status: http::StatusCode::from_u16(s).unwrap()
            }),
            (text(), proptest::collection::btree_map(text(), text(), 0..3))
                .prop_map(|(kind, params)| Action::Challenge { kind, params }),
        ];
        let op =
            ("x-[a-z]{0,6}", proptest::collection::vec(32u8..127, 0..10), 0..3u8).prop_map(|(n, v, k)| {
                let name = http::HeaderName::from_bytes(n.as_bytes()).unwrap();
                let value = http::HeaderValue::from_bytes(&v).unwrap();
                match k {
                    0 => HeaderOp::Set { name, value },
                    1 => HeaderOp::Add { name, value },
                    _ => HeaderOp::Remove { name },
                }
            });
        let body = proptest::option::of(prop_oneof![
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(chunk_index, d)| BodyMutation::Replace { chunk_index, data: d.into() }),
            any::<u32>().prop_map(|chunk_index| BodyMutation::Drop { chunk_index }),
        ]);
        let audit = (
            proptest::collection::vec(text(), 0..3),
            proptest::collection::vec(text(), 0..3),
            proptest::option::of(text()),
            proptest::option::of(any::<f32>()),
            proptest::collection::btree_map(text(), text(), 0..3),
        );
        (
            action,
            proptest::collection::vec(op.clone(), 0..3),
            proptest::collection::vec(op, 0..3),
            body,
            any::<bool>(),
            audit,
        )
            .prop_map(|(action, request_headers, response_headers, body, needs_more, audit)| {
                let (rule_ids, tags, reason, confidence, custom) = audit;
                Decision {
                    action,
                    request_headers,
                    response_headers,
                    body,
                    needs_more,
                    audit: pool_api::Audit { rule_ids, tags, reason, confidence, custom },
                }
            })
    }

    proptest::proptest! {
        #[test]
        fn direct_decision_encoding_is_byte_for_byte_the_schema_encoding(
            decision in decision(),
            stream_id in proptest::prop_oneof![proptest::strategy::Just(0u64), proptest::prelude::any::<u64>()],
        ) {
            let mut codec: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
            let mut direct = BytesMut::new();
            codec.encode(Outbound::Decision { stream_id, decision: decision.clone() }, &mut direct).unwrap();
            let mut reference = BytesMut::new();
            let frame = AgentFrame {
                stream_id,
                body: Some(pool_api::proto::agent_frame::Body::Decision(decision.into())),
            };
            Encoder::<AgentFrame>::encode(&mut codec, frame, &mut reference).unwrap();
            proptest::prop_assert_eq!(&direct[..], &reference[..]);
        }
    }

    /// What the proxy side would get by decoding with prost and converting, as text (a NaN
    /// confidence is not equal to itself).
    fn reference_decision(frame: bytes::Bytes) -> Option<(u64, Result<String, ()>)> {
        match AgentFrame::decode(frame).ok()? {
            AgentFrame { stream_id, body: Some(pool_api::proto::agent_frame::Body::Decision(d)) } => {
                Some((stream_id, pool_api::Decision::try_from(d).map(|d| format!("{d:?}")).map_err(|_| ())))
            }
            _ => None,
        }
    }

    fn direct_decision_agrees(body: bytes::Bytes) -> Result<(), String> {
        if let Some((stream_id, decision)) = direct::decision(&body) {
            let reference = reference_decision(body);
            if reference != Some((stream_id, Ok(format!("{decision:?}")))) {
                return Err(format!("direct {decision:?} vs prost {reference:?}"));
            }
        }
        Ok(())
    }

    /// Every decision but a challenge or a body mutation takes the direct path.
    fn canonical_decision_kinds_take_the_direct_path(d: &pool_api::Decision) -> bool {
        !matches!(d.action, pool_api::Action::Challenge { .. }) && d.body.is_none()
    }

    proptest::proptest! {
        #[test]
        fn the_direct_decision_decoder_agrees_with_the_schema_on_valid_decisions(
            decision in decision(),
            stream_id in proptest::prelude::any::<u64>(),
        ) {
            let mut agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            agent.encode(Outbound::Decision { stream_id, decision: decision.clone() }, &mut buf).unwrap();
            let body = bytes::Bytes::copy_from_slice(&buf[4..]);
            if canonical_decision_kinds_take_the_direct_path(&decision) {
                proptest::prop_assert!(direct::decision(&body).is_some(), "{:?} takes the direct path", decision);
            }
            direct_decision_agrees(body).map_err(proptest::test_runner::TestCaseError::fail)?;
            // The proxy's codec reads it back, whichever path it takes.
            let mut proxy: FrameCodec<FromAgent, ProxyFrame> = FrameCodec::new(1 << 20);
            let back = match proxy.decode(&mut buf).unwrap().unwrap() {
                FromAgent::Decision { stream_id: id, decision } => {
                    proptest::prop_assert_eq!(id, stream_id);
                    decision
                }
                FromAgent::Frame(AgentFrame { stream_id: id, body: Some(pool_api::proto::agent_frame::Body::Decision(d)) }) => {
                    proptest::prop_assert_eq!(id, stream_id);
                    pool_api::Decision::try_from(d).unwrap()
                }
                other => panic!("not a decision: {other:?}"),
            };
            proptest::prop_assert_eq!(format!("{back:?}"), format!("{decision:?}"));
        }

        #[test]
        fn the_direct_decision_decoder_agrees_with_the_schema_on_any_bytes(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            direct_decision_agrees(bytes::Bytes::from(data)).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
    }

    #[test]
    fn mutated_decision_frames_decode_alike_both_ways() {
        use pool_api::{Action, Decision, HeaderOp};
        let mut block_headers = http::HeaderMap::new();
        block_headers.insert("x-b", http::HeaderValue::from_static("1"));
        let decisions = [
            Decision::allow().with_response_header(HeaderOp::Set {
                name: http::HeaderName::from_static("x-waf"),
                value: http::HeaderValue::from_static("checked"),
            }),
            Decision {
                action: Action::Block {
                    status: http::StatusCode::FORBIDDEN,
                    headers: block_headers,
                    body: bytes::Bytes::from_static(b"no"),
                },
                request_headers: vec![HeaderOp::Remove { name: http::HeaderName::from_static("x-r") }],
                needs_more: true,
                ..Decision::allow()
            }
            .with_rule("r-1")
            .with_tag("t"),
            Decision {
                action: Action::Redirect { location: "/l".into(), status: http::StatusCode::FOUND },
                ..Decision::allow()
            },
        ];
        for decision in decisions {
            let mut agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            agent
                .encode(Outbound::Decision { stream_id: 300, decision: decision.clone() }, &mut buf)
                .unwrap();
            let body = buf.split_off(4);
            assert!(direct::decision(&body.clone().freeze()).is_some(), "{decision:?}");
            for i in 0..body.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut mutated = body.clone();
                    mutated[i] ^= flip;
                    if let Err(e) = direct_decision_agrees(mutated.freeze()) {
                        panic!("byte {i} ^ {flip:#x}: {e}");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn one_codec_decodes_a_stream_of_events_and_decisions_alike(
            events in proptest::collection::vec(header_event(), 1..12),
            decisions in proptest::collection::vec(decision(), 1..12),
        ) {
            // One codec per side decodes every frame of a connection, whatever passed before.
            let mut proxy: FrameCodec<FromAgent, ProxyFrame> = FrameCodec::new(1 << 20);
            let mut agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
            let mut wire = BytesMut::new();
            for (i, event) in events.iter().enumerate() {
                proxy.encode(EventFrame { stream_id: i as u64, event: event.clone() }, &mut wire).unwrap();
            }
            for event in &events {
                let Some(Inbound::Event { event: Ok(back), .. }) = agent.decode(&mut wire).unwrap() else {
                    panic!("an event")
                };
                proptest::prop_assert_eq!(&back, event);
            }
            for (i, decision) in decisions.iter().enumerate() {
                agent.encode(Outbound::Decision { stream_id: i as u64, decision: decision.clone() }, &mut wire).unwrap();
            }
            for decision in &decisions {
                let back = match proxy.decode(&mut wire).unwrap().unwrap() {
                    FromAgent::Decision { decision, .. } => decision,
                    FromAgent::Frame(AgentFrame { body: Some(pool_api::proto::agent_frame::Body::Decision(d)), .. }) => {
                        pool_api::Decision::try_from(d).unwrap()
                    }
                    other => panic!("not a decision: {other:?}"),
                };
                proptest::prop_assert_eq!(format!("{back:?}"), format!("{decision:?}"));
            }
        }
    }
}
