//! The codec's tests: framing, and each fast path against prost's encoding of the schema.
use bytes::BytesMut;
use pool_api::proto::{AgentFrame, Ping, ProxyFrame, proxy_frame};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use super::{FrameCodec, FrameError, FromAgent, Inbound, RESERVE_AHEAD};
use pool_api::wire;

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
    let name = prop_oneof![Just("host".to_owned()), Just("content-type".to_owned()), "x-[a-z0-9-]{0,20}",];
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
        codec.encode_event(stream_id, &event, &mut direct).unwrap();
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
    let codec: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(64);
    let mut h = pool_api::RequestHeaders::new("r", http::Method::GET, http::Uri::from_static("/"));
    h.headers.insert("x-big", http::HeaderValue::from_bytes(&[b'a'; 100]).unwrap());
    let mut buf = BytesMut::new();
    let err = codec.encode_event(1, &pool_api::Event::RequestHeaders(h), &mut buf);
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
        let proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        proxy.encode_event(stream_id, &event, &mut buf).unwrap();
        let body = bytes::Bytes::copy_from_slice(&buf[4..]);
        let direct = wire::decode_request_headers(&body);
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
        if let Some(direct) = wire::decode_request_headers(&body) {
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
fn a_string_field_repeated_with_bad_utf8_before_its_value_is_left_to_prost() {
    // Found by the `wire_decode` fuzz target: prost refuses non-UTF-8 in any occurrence of a
    // string field, the direct path once checked only the last (the value) and answered with an
    // event where prost refuses the frame.
    let frame = bytes::Bytes::from_static(
        b"\x08\x07\x1a\x50\x0a\x4e\x0a\x03r-1\x12\x03GET\x1a\x08\xda\x00\x08\x01\x1a\x19\x0a\x17\x0a\x03r-2\x12\x04POST\
          \x1a\x0ahytp://h/x\x0a\x03x-k\x12\x01v*\x0b09.0.0.1:802\x0c\x0a\x05route\x12\x03api",
    );
    assert!(reference(frame.clone()).is_none(), "prost refuses it");
    assert_eq!(wire::decode_request_headers(&frame), None);
    // The same in a metadata pair: its key `c\xbbd"\x13`, then `api`.
    let frame = bytes::Bytes::from_static(
        b"\x08\x07\x1aP\nN\n\x121\x03-\x03rGET\x1a\x08/a/b?c=d\"\x13\n\x04host\x12\x0bexample.com\"\x08\n\x03x-p\
          \x12\x01\r*\x0b10.00..1:802\x0c\n\x05c\xbbd\"\x13\n\x03api",
    );
    assert!(reference(frame.clone()).is_none(), "prost refuses it");
    assert_eq!(wire::decode_request_headers(&frame), None);
    // The same for a redirect's location: `AgentFrame { stream_id: 1, decision { redirect {
    // location: "\xff", location: "/ok", status: 302 } } }`.
    let redirect = b"\x0a\x01\xff\x0a\x03/ok\x10\xae\x02";
    let mut decision = vec![0x1a, redirect.len() as u8];
    decision.extend_from_slice(redirect);
    let mut frame = vec![0x08, 0x01, 0x22, decision.len() as u8];
    frame.extend_from_slice(&decision);
    let frame = bytes::Bytes::from(frame);
    assert!(reference_decision(frame.clone()).is_none(), "prost refuses it");
    assert!(wire::decode_decision(&frame).is_none());
}

#[test]
fn mutated_canonical_frames_decode_alike_both_ways() {
    // Flip each byte of a real frame in turn: the direct path either declines or agrees.
    let mut h = pool_api::RequestHeaders::new("r-1", http::Method::GET, http::Uri::from_static("/a?b"));
    h.headers.insert("x-k", http::HeaderValue::from_static("v"));
    h.metadata.insert("route".into(), "api".into());
    h.client_addr = Some(([10, 0, 0, 1], 80).into());
    let proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    proxy.encode_event(7, &pool_api::Event::RequestHeaders(h), &mut buf).unwrap();
    let body = buf.split_off(4);
    for i in 0..body.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut mutated = body.clone();
            mutated[i] ^= flip;
            let mutated = mutated.freeze();
            if let Some(direct) = wire::decode_request_headers(&mutated) {
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
    let op = ("x-[a-z]{0,6}", proptest::collection::vec(32u8..127, 0..10), 0..3u8).prop_map(|(n, v, k)| {
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
        codec.encode_decision(stream_id, &decision, &mut direct).unwrap();
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
    if let Some((stream_id, decision)) = wire::decode_decision(&body) {
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
        let agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        agent.encode_decision(stream_id, &decision, &mut buf).unwrap();
        let body = bytes::Bytes::copy_from_slice(&buf[4..]);
        if canonical_decision_kinds_take_the_direct_path(&decision) {
            proptest::prop_assert!(wire::decode_decision(&body).is_some(), "{:?} takes the direct path", decision);
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
        let agent: FrameCodec<Inbound, AgentFrame> = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        agent.encode_decision(300, &decision, &mut buf).unwrap();
        let body = buf.split_off(4);
        assert!(wire::decode_decision(&body.clone().freeze()).is_some(), "{decision:?}");
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
            proxy.encode_event(i as u64, event, &mut wire).unwrap();
        }
        for event in &events {
            let Some(Inbound::Event { event: Ok(back), .. }) = agent.decode(&mut wire).unwrap() else {
                panic!("an event")
            };
            proptest::prop_assert_eq!(&back, event);
        }
        for (i, decision) in decisions.iter().enumerate() {
            agent.encode_decision(i as u64, decision, &mut wire).unwrap();
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
