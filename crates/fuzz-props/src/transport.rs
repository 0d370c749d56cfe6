//! The wire: `pool_api::wire`'s fast decoders, transport-uds's framing, transport-grpc's codecs
//! and the schema's conversions.

use bytes::Bytes;
use pool_api::proto::{self, AgentFrame, ProtoError, ProxyFrame, agent_frame, proxy_frame};
use prost::Message;
use transport_uds::fuzz::{HEAD, Outcome, RESERVE_AHEAD};

/// What the schema makes of an event frame: prost, then the conversion.
fn event_by_prost(frame: Bytes) -> Option<(u64, Result<pool_api::Event, ProtoError>)> {
    match ProxyFrame::decode(frame).ok()? {
        ProxyFrame { stream_id, body: Some(proxy_frame::Body::Event(e)) } => {
            Some((stream_id, pool_api::Event::try_from(e)))
        }
        _ => None,
    }
}

/// What the schema makes of a decision frame, as text (a NaN confidence is not equal to itself).
fn decision_by_prost(frame: Bytes) -> Option<(u64, Result<String, ()>)> {
    match AgentFrame::decode(frame).ok()? {
        AgentFrame { stream_id, body: Some(agent_frame::Body::Decision(d)) } => {
            Some((stream_id, pool_api::Decision::try_from(d).map(|d| format!("{d:?}")).map_err(|_| ())))
        }
        _ => None,
    }
}

/// The fast path agrees with prost on an event: the same stream id and event, or both invalid.
fn event_agrees(frame: &Bytes, direct: &(u64, Result<pool_api::Event, ProtoError>)) {
    let reference = event_by_prost(frame.clone());
    let same = match (direct, &reference) {
        ((a, Ok(x)), Some((b, Ok(y)))) => a == b && x == y,
        ((a, Err(_)), Some((b, Err(_)))) => a == b,
        _ => false,
    };
    assert!(same, "fast path {direct:?} vs prost {reference:?} on {frame:?}");
}

/// The fast path agrees with prost on a decision.
fn decision_agrees(frame: &Bytes, stream_id: u64, decision: &pool_api::Decision) {
    let reference = decision_by_prost(frame.clone());
    assert_eq!(reference, Some((stream_id, Ok(format!("{decision:?}")))), "fast path vs prost on {frame:?}");
}

/// `pool_api::wire`: the first byte picks the decoder (even: a request-headers event, odd: a
/// decision), the rest is the frame. Whatever the fast path decodes, prost and the conversion
/// decode alike.
pub fn wire_decode(data: &[u8]) {
    let Some((&which, frame)) = data.split_first() else { return };
    let frame = Bytes::copy_from_slice(frame);
    if which % 2 == 0 {
        if let Some(direct) = pool_api::wire::decode_request_headers(&frame) {
            event_agrees(&frame, &direct);
        }
    } else if let Some((stream_id, decision)) = pool_api::wire::decode_decision(&frame) {
        decision_agrees(&frame, stream_id, &decision);
    }
}

/// transport-uds's frame decoders. The first byte picks the side (even: the agent's, odd: the
/// proxy's) and the frame limit (its upper bits, as a power of two up to 16 MiB); the second the
/// size of the pieces the stream arrives in; the rest is the stream.
///
/// Checks, at every call of the decoder: a frame announced over the limit is refused with the
/// buffer untouched; the room reserved for a frame still arriving is never more than the frame
/// (within the limit) or [`RESERVE_AHEAD`] beyond the bytes already read, whichever is less (the
/// buffer's allocation may double, as any buffer grows, but never more); a frame decoded takes exactly its
/// announced bytes off the buffer, and one over the limit is never decoded.
pub fn uds_frames(data: &[u8]) {
    let [side, piece, stream @ ..] = data else { return };
    let agent = side % 2 == 0;
    let limit = 1usize << ((side >> 1) % 25);
    let piece = usize::from(*piece).max(1);
    let steps = transport_uds::fuzz::decode_stream(agent, limit, stream.chunks(piece));
    // Replays the stream's frames to know what each call should have seen.
    let mut at = 0;
    for step in &steps {
        // The length at the buffer's front, once all of it has arrived.
        let announced = (step.len_before >= HEAD)
            .then(|| u32::from_be_bytes(stream[at..at + HEAD].try_into().expect("4 bytes")) as usize);
        match step.outcome {
            Outcome::TooLarge => {
                assert!(
                    announced.is_some_and(|size| size > limit),
                    "{step:?}: refused a frame within {limit}"
                );
                assert_eq!(step.cap_after, step.cap_before, "{step:?}: a refused frame grew the buffer");
            }
            Outcome::Pending => {
                if let Some(size) = announced {
                    assert!(size <= limit, "{step:?}: waited for a frame of {size} over {limit}");
                }
                // A `BytesMut` grows its whole allocation, frames already taken off the front
                // included (at most `at` bytes): at most double that, plus what was asked for.
                let wanted = announced.map_or(0, |size| (HEAD + size).min(step.len_before + RESERVE_AHEAD));
                let bound = 2 * (step.cap_before + at) + wanted;
                assert!(step.cap_after <= bound, "{step:?}: grew past {bound} (limit {limit})");
            }
            Outcome::Direct | Outcome::Prost | Outcome::Undecodable => {
                let size = announced.expect("a frame was decoded from its length");
                assert!(size <= limit, "{step:?}: decoded a frame of {size} over {limit}");
                assert_eq!(step.len_before - step.len_after, HEAD + size, "{step:?}: took the wrong bytes");
                assert!(
                    step.cap_after <= step.cap_before,
                    "{step:?}: decoding a whole frame grew the buffer"
                );
                at += HEAD + size;
            }
        }
    }
}

/// transport-grpc's codecs and the schema's conversions. The first byte picks the side (even:
/// what the agent reads, odd: what the proxy reads), the rest is one message.
///
/// Checks: the codec decodes exactly what prost does (the fast path agreeing with prost and the
/// conversion); every body of a frame converts to the vocabulary type without panicking, and a
/// value that converts converts back through its schema message to the same value.
pub fn grpc_messages(data: &[u8]) {
    let Some((&which, message)) = data.split_first() else { return };
    let message = Bytes::copy_from_slice(message);
    if which % 2 == 0 {
        match transport_grpc::fuzz::read_by_agent(message.clone()) {
            Ok(Ok(direct)) => event_agrees(&message, &direct),
            Ok(Err(frame)) => {
                let prost = ProxyFrame::decode(message.clone()).ok();
                assert_eq!(format!("{prost:?}"), format!("{:?}", Some(&frame)));
                proxy_body_converts(frame.body);
            }
            Err(_) => assert!(ProxyFrame::decode(message).is_err(), "the codec refused what prost decodes"),
        }
    } else {
        match transport_grpc::fuzz::read_by_proxy(message.clone()) {
            Ok(Ok((stream_id, decision))) => decision_agrees(&message, stream_id, &decision),
            Ok(Err(frame)) => {
                // As text: a NaN confidence is not equal to itself.
                let prost = AgentFrame::decode(message.clone()).ok();
                assert_eq!(format!("{prost:?}"), format!("{:?}", Some(&frame)));
                agent_body_converts(frame.body);
            }
            Err(_) => assert!(AgentFrame::decode(message).is_err(), "the codec refused what prost decodes"),
        }
    }
}

/// `wire` converts to `api` and, when it does, back to the same value (compared as text: a
/// NaN is not equal to itself).
fn round_trips<W, A>(wire: W)
where
    A: TryFrom<W, Error = ProtoError> + std::fmt::Debug + Clone,
    W: From<A> + std::fmt::Debug,
{
    if let Ok(value) = A::try_from(wire) {
        let back = W::from(value.clone());
        let again = A::try_from(back);
        assert!(
            again.as_ref().is_ok_and(|again| format!("{again:?}") == format!("{value:?}")),
            "{value:?} converts back as {again:?}"
        );
    }
}

fn proxy_body_converts(body: Option<proxy_frame::Body>) {
    use proxy_frame::Body;
    match body {
        Some(Body::Event(e)) => round_trips::<proto::Event, pool_api::Event>(e),
        Some(Body::Cancel(c)) => round_trips::<proto::Cancel, pool_api::Cancel>(c),
        _ => {}
    }
}

fn agent_body_converts(body: Option<agent_frame::Body>) {
    use agent_frame::Body;
    match body {
        Some(Body::Decision(d)) => round_trips::<proto::Decision, pool_api::Decision>(d),
        Some(Body::Capabilities(c)) => round_trips::<proto::Capabilities, pool_api::Capabilities>(c),
        Some(Body::Health(h)) => round_trips::<proto::Health, pool_api::AgentHealth>(h),
        Some(Body::FlowControl(f)) => round_trips::<proto::FlowControl, pool_api::FlowControl>(f),
        Some(Body::ConfigUpdate(r)) => {
            round_trips::<proto::ConfigUpdateRequest, pool_api::ConfigUpdateRequest>(r)
        }
        _ => {}
    }
}
