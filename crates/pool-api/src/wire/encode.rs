//! Fast encoding of the two hot messages — a `RequestHeaders` or `ResponseHeaders` event on
//! the proxy side, a `Decision` on the agent side — straight from the `pool-api` types into the
//! write buffer, byte for byte what prost writes for the schema's message built from them,
//! without building that message first (which costs an allocation or two per header).
//!
//! Each encoder computes the frame's size first, checks it against the limit (nothing is
//! written when it is over), makes room for it once, then a [`Writer`] fills that room with
//! plain stores. The field numbers come from [`fields`](super::fields). Like prost, plain
//! scalars and strings are left out when they hold their default, repeated elements and oneof
//! members are written even when empty, and `optional` fields are written when present.

use bytes::BytesMut;
use prost::Message;
use prost::encoding::{WireType, encoded_len_varint, key_len};

use super::TooLarge;
use super::fields::{agent_frame, event, header, key_value, proxy_frame, request_headers, response_headers};
use crate::proto;

/// Writes a frame whose size is known in advance into room already made in the buffer: plain
/// stores for keys and varints, one copy per string or bytes field.
struct Writer<'a> {
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

/// Room reserved for a framing's head in front of a message (the UDS length is 4 bytes).
const HEAD_ROOM: usize = 8;

/// Checks `size` against `limit`, makes room, lets `head` write the framing's prefix and
/// returns a writer over `size` bytes made for the message.
fn frame(
    size: usize,
    limit: usize,
    dst: &mut BytesMut,
    head: impl FnOnce(usize, &mut BytesMut),
) -> Result<Writer<'_>, TooLarge> {
    if size > limit {
        return Err(TooLarge { size, limit });
    }
    dst.reserve(HEAD_ROOM + size);
    head(size, dst);
    let start = dst.len();
    dst.resize(start + size, 0);
    Ok(Writer { buf: &mut dst[start..], pos: 0 })
}

/// Encodes any message of the schema with prost, after the same checks as [`frame`].
fn message(
    message: &impl Message,
    limit: usize,
    dst: &mut BytesMut,
    head: impl FnOnce(usize, &mut BytesMut),
) -> Result<(), TooLarge> {
    let size = message.encoded_len();
    if size > limit {
        return Err(TooLarge { size, limit });
    }
    dst.reserve(HEAD_ROOM + size);
    head(size, dst);
    message.encode(dst).expect("room was reserved");
    Ok(())
}

/// Encodes request `stream_id`'s event from a borrowed value into `dst`, byte for byte what
/// `ProxyFrame { stream_id, body: Event(event.into()) }` encodes to: headers events directly,
/// other events converted from a clone (body chunks share their bytes).
///
/// The message's size is computed first; over `limit` nothing is written and the error says
/// by how much. Otherwise `head` is called with the size to write the framing's prefix (a
/// length, or nothing), then the message follows it.
pub fn encode_event(
    stream_id: u64,
    event: &crate::Event,
    limit: usize,
    dst: &mut BytesMut,
    head: impl FnOnce(usize, &mut BytesMut),
) -> Result<(), TooLarge> {
    match event {
        crate::Event::RequestHeaders(h) => {
            let uri = UriText::new(&h.uri);
            let addr = AddrText::new(h.client_addr);
            let fields = RequestFields { h, uri: &uri, addr: addr.as_str() };
            let len = fields.len();
            let mut dst = frame(frame_len(stream_id, event::REQUEST_HEADERS, len), limit, dst, head)?;
            frame_prefix(stream_id, event::REQUEST_HEADERS, len, &mut dst);
            fields.write(&mut dst);
            dst.finish();
            Ok(())
        }
        crate::Event::ResponseHeaders(h) => {
            let fields = ResponseFields { h };
            let len = fields.len();
            let mut dst = frame(frame_len(stream_id, event::RESPONSE_HEADERS, len), limit, dst, head)?;
            frame_prefix(stream_id, event::RESPONSE_HEADERS, len, &mut dst);
            fields.write(&mut dst);
            dst.finish();
            Ok(())
        }
        other => {
            let frame = proto::ProxyFrame {
                stream_id,
                body: Some(proto::proxy_frame::Body::Event(other.clone().into())),
            };
            message(&frame, limit, dst, head)
        }
    }
}

/// Encodes the answer to request `stream_id` from a borrowed decision into `dst`, byte for
/// byte what `AgentFrame { stream_id, body: Decision(decision.into()) }` encodes to, with the
/// same size check and `head` as [`encode_event`].
pub fn encode_decision(
    stream_id: u64,
    decision: &crate::Decision,
    limit: usize,
    dst: &mut BytesMut,
    head: impl FnOnce(usize, &mut BytesMut),
) -> Result<(), TooLarge> {
    let fields = decision::len(decision);
    let stream =
        if stream_id == 0 { 0 } else { key_len(agent_frame::STREAM_ID) + encoded_len_varint(stream_id) };
    let mut dst = frame(stream + msg_len(agent_frame::DECISION, fields), limit, dst, head)?;
    if stream_id != 0 {
        dst.key(agent_frame::STREAM_ID, WireType::Varint);
        dst.varint(stream_id);
    }
    put_msg_header(agent_frame::DECISION, fields, &mut dst);
    decision::write(decision, &mut dst);
    dst.finish();
    Ok(())
}

/// The `Decision` message, field by field.
mod decision {
    use crate::{Action, BodyMutation, Decision, HeaderOp};
    use http::HeaderMap;
    use prost::encoding::{WireType, encoded_len_varint, key_len};

    use super::super::fields::{audit, block, body_mutation, challenge, decision, header_op, redirect};
    use super::{Writer, headers_len, kv_len, ld_len, msg_len, put_headers, put_kv, put_ld, put_msg_header};

    fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) }
    }

    fn put_varint(tag: u32, v: u64, dst: &mut Writer<'_>) {
        if v != 0 {
            dst.key(tag, WireType::Varint);
            dst.varint(v);
        }
    }

    fn op_parts(op: &HeaderOp) -> (u64, &[u8], &[u8]) {
        match op {
            HeaderOp::Set { name, value } => {
                (header_op::KIND_SET, name.as_str().as_bytes(), value.as_bytes())
            }
            HeaderOp::Add { name, value } => {
                (header_op::KIND_ADD, name.as_str().as_bytes(), value.as_bytes())
            }
            HeaderOp::Remove { name } => (header_op::KIND_REMOVE, name.as_str().as_bytes(), &[]),
        }
    }

    fn op_fields(op: &HeaderOp) -> usize {
        let (kind, name, value) = op_parts(op);
        varint_len(header_op::KIND, kind)
            + ld_len(header_op::NAME, name.len())
            + ld_len(header_op::VALUE, value.len())
    }

    fn ops_len(tag: u32, ops: &[HeaderOp]) -> usize {
        ops.iter().map(|op| msg_len(tag, op_fields(op))).sum()
    }

    fn put_ops(tag: u32, ops: &[HeaderOp], dst: &mut Writer<'_>) {
        for op in ops {
            put_msg_header(tag, op_fields(op), dst);
            let (kind, name, value) = op_parts(op);
            put_varint(header_op::KIND, kind, dst);
            put_ld(header_op::NAME, name, dst);
            put_ld(header_op::VALUE, value, dst);
        }
    }

    fn block_fields(status: u16, headers: &HeaderMap, body: &[u8]) -> usize {
        varint_len(block::STATUS, u64::from(status))
            + headers_len(block::HEADERS, headers)
            + ld_len(block::BODY, body.len())
    }

    fn redirect_fields(location: &str, status: u16) -> usize {
        ld_len(redirect::LOCATION, location.len()) + varint_len(redirect::STATUS, u64::from(status))
    }

    fn challenge_fields<'a>(kind: &str, params: impl Iterator<Item = (&'a String, &'a String)>) -> usize {
        ld_len(challenge::KIND, kind.len()) + kv_len(challenge::PARAMS, params)
    }

    fn action_len(action: &Action) -> usize {
        match action {
            Action::Allow => msg_len(decision::ALLOW, 0),
            Action::Block { status, headers, body } => {
                msg_len(decision::BLOCK, block_fields(status.as_u16(), headers, body))
            }
            Action::Redirect { location, status } => {
                msg_len(decision::REDIRECT, redirect_fields(location, status.as_u16()))
            }
            Action::Challenge { kind, params } => {
                msg_len(decision::CHALLENGE, challenge_fields(kind, params.iter()))
            }
        }
    }

    fn put_action(action: &Action, dst: &mut Writer<'_>) {
        match action {
            Action::Allow => put_msg_header(decision::ALLOW, 0, dst),
            Action::Block { status, headers, body } => {
                put_msg_header(decision::BLOCK, block_fields(status.as_u16(), headers, body), dst);
                put_varint(block::STATUS, u64::from(status.as_u16()), dst);
                put_headers(block::HEADERS, headers, dst);
                put_ld(block::BODY, body, dst);
            }
            Action::Redirect { location, status } => {
                put_msg_header(decision::REDIRECT, redirect_fields(location, status.as_u16()), dst);
                put_ld(redirect::LOCATION, location.as_bytes(), dst);
                put_varint(redirect::STATUS, u64::from(status.as_u16()), dst);
            }
            Action::Challenge { kind, params } => {
                put_msg_header(decision::CHALLENGE, challenge_fields(kind, params.iter()), dst);
                put_ld(challenge::KIND, kind.as_bytes(), dst);
                put_kv(challenge::PARAMS, params.iter(), dst);
            }
        }
    }

    fn body_fields(body: &BodyMutation) -> usize {
        match body {
            BodyMutation::Replace { chunk_index, data } => {
                varint_len(body_mutation::CHUNK_INDEX, u64::from(*chunk_index))
                    + msg_len(body_mutation::REPLACE, data.len())
            }
            BodyMutation::Drop { chunk_index } => {
                varint_len(body_mutation::CHUNK_INDEX, u64::from(*chunk_index))
                    + key_len(body_mutation::DROP)
                    + 1
            }
        }
    }

    fn put_body(body: &BodyMutation, dst: &mut Writer<'_>) {
        put_msg_header(decision::BODY, body_fields(body), dst);
        match body {
            BodyMutation::Replace { chunk_index, data } => {
                put_varint(body_mutation::CHUNK_INDEX, u64::from(*chunk_index), dst);
                put_msg_header(body_mutation::REPLACE, data.len(), dst);
                dst.bytes(data);
            }
            BodyMutation::Drop { chunk_index } => {
                put_varint(body_mutation::CHUNK_INDEX, u64::from(*chunk_index), dst);
                dst.key(body_mutation::DROP, WireType::Varint);
                dst.varint(1);
            }
        }
    }

    fn audit_fields(d: &Decision) -> usize {
        let a = &d.audit;
        a.rule_ids.iter().map(|r| msg_len(audit::RULE_IDS, r.len())).sum::<usize>()
            + a.tags.iter().map(|t| msg_len(audit::TAGS, t.len())).sum::<usize>()
            + a.reason.as_ref().map_or(0, |r| msg_len(audit::REASON, r.len()))
            + a.confidence.map_or(0, |_| key_len(audit::CONFIDENCE) + 4)
            + kv_len(audit::CUSTOM, a.custom.iter())
    }

    fn put_audit(d: &Decision, dst: &mut Writer<'_>) {
        let a = &d.audit;
        put_msg_header(decision::AUDIT, audit_fields(d), dst);
        for r in &a.rule_ids {
            put_msg_header(audit::RULE_IDS, r.len(), dst);
            dst.bytes(r.as_bytes());
        }
        for t in &a.tags {
            put_msg_header(audit::TAGS, t.len(), dst);
            dst.bytes(t.as_bytes());
        }
        if let Some(r) = &a.reason {
            put_msg_header(audit::REASON, r.len(), dst);
            dst.bytes(r.as_bytes());
        }
        if let Some(c) = a.confidence {
            dst.key(audit::CONFIDENCE, WireType::ThirtyTwoBit);
            dst.f32_le(c);
        }
        put_kv(audit::CUSTOM, a.custom.iter(), dst);
    }

    /// Size of the `Decision` message's fields.
    pub(super) fn len(d: &Decision) -> usize {
        action_len(&d.action)
            + ops_len(decision::REQUEST_HEADERS, &d.request_headers)
            + ops_len(decision::RESPONSE_HEADERS, &d.response_headers)
            + d.body.as_ref().map_or(0, |b| msg_len(decision::BODY, body_fields(b)))
            + if d.needs_more { key_len(decision::NEEDS_MORE) + 1 } else { 0 }
            + msg_len(decision::AUDIT, audit_fields(d))
    }

    /// Writes the `Decision` message's fields.
    pub(super) fn write(d: &Decision, dst: &mut Writer<'_>) {
        put_action(&d.action, dst);
        put_ops(decision::REQUEST_HEADERS, &d.request_headers, dst);
        put_ops(decision::RESPONSE_HEADERS, &d.response_headers, dst);
        if let Some(b) = &d.body {
            put_body(b, dst);
        }
        if d.needs_more {
            dst.key(decision::NEEDS_MORE, WireType::Varint);
            dst.varint(1);
        }
        put_audit(d, dst);
    }
}

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

/// Size of a `ProxyFrame` carrying an `Event` whose member `kind` has `event_fields` bytes.
fn frame_len(stream_id: u64, kind: u32, event_fields: usize) -> usize {
    let stream =
        if stream_id == 0 { 0 } else { key_len(proxy_frame::STREAM_ID) + encoded_len_varint(stream_id) };
    stream + msg_len(proxy_frame::EVENT, msg_len(kind, event_fields))
}

/// Writes what [`frame_len`] counts, up to the event member's fields.
fn frame_prefix(stream_id: u64, kind: u32, event_fields: usize, dst: &mut Writer<'_>) {
    if stream_id != 0 {
        dst.key(proxy_frame::STREAM_ID, WireType::Varint);
        dst.varint(stream_id);
    }
    put_msg_header(proxy_frame::EVENT, msg_len(kind, event_fields), dst);
    put_msg_header(kind, event_fields, dst);
}

/// Size of a `KeyValue`'s fields.
fn kv_fields(key: &str, value: &str) -> usize {
    ld_len(key_value::KEY, key.len()) + ld_len(key_value::VALUE, value.len())
}

/// Size of repeated `KeyValue` field `tag` holding `pairs`.
fn kv_len<'a>(tag: u32, pairs: impl Iterator<Item = (&'a String, &'a String)>) -> usize {
    pairs.map(|(k, v)| msg_len(tag, kv_fields(k, v))).sum()
}

fn put_kv<'a>(tag: u32, pairs: impl Iterator<Item = (&'a String, &'a String)>, dst: &mut Writer<'_>) {
    for (k, v) in pairs {
        put_msg_header(tag, kv_fields(k, v), dst);
        put_ld(key_value::KEY, k.as_bytes(), dst);
        put_ld(key_value::VALUE, v.as_bytes(), dst);
    }
}

/// Size of a `Header`'s fields.
fn header_fields_len(name: &[u8], value: &[u8]) -> usize {
    ld_len(header::NAME, name.len()) + ld_len(header::VALUE, value.len())
}

/// Size of repeated `Header` field `tag` holding `map`.
fn headers_len(tag: u32, map: &http::HeaderMap) -> usize {
    map.iter().map(|(n, v)| msg_len(tag, header_fields_len(n.as_str().as_bytes(), v.as_bytes()))).sum()
}

fn put_headers(tag: u32, map: &http::HeaderMap, dst: &mut Writer<'_>) {
    for (name, value) in map {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        put_msg_header(tag, header_fields_len(name, value), dst);
        put_ld(header::NAME, name, dst);
        put_ld(header::VALUE, value, dst);
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

/// The fields of a `RequestHeaders` event.
struct RequestFields<'a> {
    h: &'a crate::RequestHeaders,
    uri: &'a UriText<'a>,
    addr: &'a str,
}

impl RequestFields<'_> {
    fn len(&self) -> usize {
        ld_len(request_headers::CORRELATION_ID, self.h.correlation_id.as_str().len())
            + ld_len(request_headers::METHOD, self.h.method.as_str().len())
            + ld_len(request_headers::URI, self.uri.len)
            + headers_len(request_headers::HEADERS, &self.h.headers)
            + ld_len(request_headers::CLIENT_ADDR, self.addr.len())
            + kv_len(request_headers::METADATA, self.h.metadata.iter())
    }

    fn write(&self, dst: &mut Writer<'_>) {
        put_ld(request_headers::CORRELATION_ID, self.h.correlation_id.as_str().as_bytes(), dst);
        put_ld(request_headers::METHOD, self.h.method.as_str().as_bytes(), dst);
        if self.uri.len > 0 {
            put_msg_header(request_headers::URI, self.uri.len, dst);
            self.uri.write(dst);
        }
        put_headers(request_headers::HEADERS, &self.h.headers, dst);
        put_ld(request_headers::CLIENT_ADDR, self.addr.as_bytes(), dst);
        put_kv(request_headers::METADATA, self.h.metadata.iter(), dst);
    }
}

/// The fields of a `ResponseHeaders` event.
struct ResponseFields<'a> {
    h: &'a crate::ResponseHeaders,
}

impl ResponseFields<'_> {
    fn status(&self) -> u64 {
        u64::from(self.h.status.as_u16())
    }

    fn len(&self) -> usize {
        ld_len(response_headers::CORRELATION_ID, self.h.correlation_id.as_str().len())
            + key_len(response_headers::STATUS)
            + encoded_len_varint(self.status())
            + headers_len(response_headers::HEADERS, &self.h.headers)
    }

    fn write(&self, dst: &mut Writer<'_>) {
        put_ld(response_headers::CORRELATION_ID, self.h.correlation_id.as_str().as_bytes(), dst);
        dst.key(response_headers::STATUS, WireType::Varint);
        dst.varint(self.status());
        put_headers(response_headers::HEADERS, &self.h.headers, dst);
    }
}
