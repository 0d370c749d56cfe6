//! Fast decoding of the two hot messages — a `RequestHeaders` event on the agent side, a
//! `Decision` on the proxy side — without building the schema's messages first.
//!
//! The frame is walked as a byte slice; only what the `pool-api` value keeps (the URI, header
//! values, bodies) becomes a `Bytes` sharing the read buffer. Only the canonical encoding (what
//! `encode.rs` and prost write: known fields, right wire types, each message field once) takes
//! this path; anything else returns `None` and is decoded by prost, so both paths always
//! agree. The field numbers come from [`fields`](super::fields).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

use crate::proto::ProtoError;
use crate::{Action, Audit, Decision, HeaderOp};

use super::fields::{
    agent_frame, audit, block, decision, event, header, header_op, key_value, proxy_frame, redirect,
    request_headers as request,
};

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

/// The body of the frame's one message field `body_tag`, and the stream id (`ProxyFrame` and
/// `AgentFrame` carry it under the same number, which the schema test checks).
fn frame_body(frame: &[u8], body_tag: u32) -> Option<(u64, &[u8])> {
    const _: () = assert!(proxy_frame::STREAM_ID == agent_frame::STREAM_ID);
    let mut buf = frame;
    let (mut stream_id, mut body) = (0, None);
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Varint(proxy_frame::STREAM_ID, v) => stream_id = v,
            Field::Bytes(tag, b) if tag == body_tag && body.is_none() => body = Some(b),
            _ => return None,
        }
    }
    Some((stream_id, body?))
}

/// `ProxyFrame { stream_id, event { request_headers { … } } }`.
pub(super) fn request_headers(frame: &Bytes) -> Option<(u64, Result<crate::Event, ProtoError>)> {
    let (stream_id, mut event) = frame_body(frame, proxy_frame::EVENT)?;
    let Field::Bytes(event::REQUEST_HEADERS, fields) = field(&mut event)? else { return None };
    if !event.is_empty() {
        return None;
    }
    Some((stream_id, parse(frame, fields)?))
}

/// The fields of a `Header` pair (`name`, then `value`; bytes, so unchecked here).
#[inline(always)]
fn pair(mut buf: &[u8]) -> Option<(&[u8], &[u8])> {
    const _: () = assert!(header::NAME == key_value::KEY && header::VALUE == key_value::VALUE);
    let (mut first, mut second): (&[u8], &[u8]) = (&[], &[]);
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Bytes(header::NAME, v) => first = v,
            Field::Bytes(header::VALUE, v) => second = v,
            _ => return None,
        }
    }
    Some((first, second))
}

/// The fields of a `KeyValue` pair, both strings: every occurrence of each UTF-8, as prost
/// checks (the last is the value).
fn string_pair(mut buf: &[u8]) -> Option<(&str, &str)> {
    let (mut key, mut value) = ("", "");
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Bytes(key_value::KEY, v) => key = utf8(v)?,
            Field::Bytes(key_value::VALUE, v) => value = utf8(v)?,
            _ => return None,
        }
    }
    Some((key, value))
}

/// Checks the fields (`None`: not canonical) and converts them as `TryFrom` does, in one
/// pass after counting the headers (so the map is made at its size once). Errors are
/// reported in `TryFrom`'s order: address, method, URI, then the first bad header.
fn parse(frame: &Bytes, fields: &[u8]) -> Option<Result<crate::Event, ProtoError>> {
    let mut headers = 0;
    let mut buf = fields;
    while !buf.is_empty() {
        let Field::Bytes(tag, _) = field(&mut buf)? else { return None };
        headers += usize::from(tag == request::HEADERS);
    }
    let (mut id, mut method, mut uri, mut addr): (&str, &[u8], &[u8], &str) = ("", &[], &[], "");
    let mut map = HeaderMap::with_capacity(headers);
    let mut header_error = None;
    let mut metadata = crate::Metadata::new();
    let mut buf = fields;
    while let Some(Field::Bytes(tag, b)) = field(&mut buf) {
        match tag {
            // prost refuses non-UTF-8 in a string field, in every occurrence of it (not only
            // the last, which is the value): leave that to it.
            request::CORRELATION_ID => id = utf8(b)?,
            request::METHOD | request::URI => {
                if !b.is_ascii() {
                    utf8(b)?;
                }
                if tag == request::METHOD { method = b } else { uri = b }
            }
            request::HEADERS => {
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
            request::CLIENT_ADDR => addr = utf8(b)?,
            request::METADATA => {
                let (key, value) = string_pair(b)?;
                metadata.insert(key.to_owned(), value.to_owned());
            }
            _ => return None,
        }
    }
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
    metadata: crate::Metadata,
) -> Result<crate::Event, ProtoError> {
    let client_addr =
        if addr.is_empty() { None } else { Some(addr.parse().map_err(|e| bad("client_addr", e))?) };
    let method = Method::from_bytes(method).map_err(|e| bad("method", e))?;
    let uri = Uri::from_maybe_shared(frame.slice_ref(uri)).map_err(|e| bad("uri", e))?;
    if let Some(e) = header_error {
        return Err(e);
    }
    Ok(crate::Event::RequestHeaders(crate::RequestHeaders {
        correlation_id: id.into(),
        method,
        uri,
        headers,
        client_addr,
        metadata,
    }))
}

/// `AgentFrame { stream_id, decision { … } }`. Decisions with a challenge or a body mutation,
/// and anything that would be an error, take the prost path.
pub(super) fn decision(frame: &Bytes) -> Option<(u64, Decision)> {
    let (stream_id, mut buf) = frame_body(frame, agent_frame::DECISION)?;
    let mut action = None;
    let (mut request_headers, mut response_headers) = (Vec::new(), Vec::new());
    let (mut needs_more, mut audit) = (false, None);
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Bytes(decision::ALLOW, b) if action.is_none() && b.is_empty() => {
                action = Some(Action::Allow)
            }
            Field::Bytes(decision::BLOCK, b) if action.is_none() => action = Some(block(frame, b)?),
            Field::Bytes(decision::REDIRECT, b) if action.is_none() => action = Some(redirect(b)?),
            Field::Bytes(decision::REQUEST_HEADERS, b) => request_headers.push(op(frame, b)?),
            Field::Bytes(decision::RESPONSE_HEADERS, b) => response_headers.push(op(frame, b)?),
            Field::Varint(decision::NEEDS_MORE, v) => needs_more = v != 0,
            Field::Bytes(decision::AUDIT, b) if audit.is_none() => audit = Some(audit_of(b)?),
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

/// `Block { status, headers, body }`.
fn block(frame: &Bytes, mut buf: &[u8]) -> Option<Action> {
    let (mut code, mut body, mut count) = (0, &[][..], 0);
    let fields = buf;
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Varint(block::STATUS, v) => code = v,
            Field::Bytes(block::HEADERS, b) => {
                pair(b)?;
                count += 1;
            }
            Field::Bytes(block::BODY, b) => body = b,
            _ => return None,
        }
    }
    let status = status(code)?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut buf = fields;
    while let Some(f) = field(&mut buf) {
        if let Field::Bytes(block::HEADERS, b) = f {
            let (name, value) = pair(b)?;
            let name = HeaderName::from_bytes(name).ok()?;
            headers.append(name, HeaderValue::from_maybe_shared(frame.slice_ref(value)).ok()?);
        }
    }
    Some(Action::Block { status, headers, body: frame.slice_ref(body) })
}

/// `Redirect { location, status }`.
fn redirect(mut buf: &[u8]) -> Option<Action> {
    let (mut location, mut code) = ("", 0);
    while !buf.is_empty() {
        match field(&mut buf)? {
            // Every occurrence UTF-8, as prost checks (the last is the value).
            Field::Bytes(redirect::LOCATION, b) => location = utf8(b)?,
            Field::Varint(redirect::STATUS, v) => code = v,
            _ => return None,
        }
    }
    Some(Action::Redirect { location: location.to_owned(), status: status(code)? })
}

/// `HeaderOp { kind, name, value }`.
fn op(frame: &Bytes, mut buf: &[u8]) -> Option<HeaderOp> {
    // `kind` absent is the proto3 default, 0.
    let (mut kind, mut name, mut value) = (0, &[][..], &[][..]);
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Varint(header_op::KIND, v) => kind = v,
            Field::Bytes(header_op::NAME, b) => name = b,
            Field::Bytes(header_op::VALUE, b) => value = b,
            _ => return None,
        }
    }
    let name = HeaderName::from_bytes(name).ok()?;
    let value = || HeaderValue::from_maybe_shared(frame.slice_ref(value)).ok();
    Some(match kind {
        header_op::KIND_SET => HeaderOp::Set { name, value: value()? },
        header_op::KIND_ADD => HeaderOp::Add { name, value: value()? },
        header_op::KIND_REMOVE => HeaderOp::Remove { name },
        _ => return None,
    })
}

/// `Audit { rule_ids, tags, reason, confidence, custom }`.
fn audit_of(mut buf: &[u8]) -> Option<Audit> {
    let mut out = Audit::default();
    while !buf.is_empty() {
        match field(&mut buf)? {
            Field::Bytes(audit::RULE_IDS, b) => out.rule_ids.push(utf8(b)?.to_owned()),
            Field::Bytes(audit::TAGS, b) => out.tags.push(utf8(b)?.to_owned()),
            Field::Bytes(audit::REASON, b) => out.reason = Some(utf8(b)?.to_owned()),
            Field::Fixed32(audit::CONFIDENCE, b) => out.confidence = Some(f32::from_le_bytes(b)),
            Field::Bytes(audit::CUSTOM, b) => {
                let (key, value) = string_pair(b)?;
                out.custom.insert(key.to_owned(), value.to_owned());
            }
            _ => return None,
        }
    }
    Some(out)
}
