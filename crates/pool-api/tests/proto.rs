//! The wire schema: every vocabulary value survives encode → bytes → decode, and what a peer
//! can get wrong is refused with a typed error.
#![cfg(feature = "proto")]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use pool_api::proto::{self, ProtoError};
use pool_api::*;
use proptest::prelude::*;
use prost::Message;

fn headers() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[!-~]{0,24}"), 0..6).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(&v).unwrap());
        }
        map
    })
}

fn status() -> impl Strategy<Value = StatusCode> {
    (100u16..600).prop_map(|c| StatusCode::from_u16(c).unwrap())
}

fn kv() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,12}", 0..4)
}

fn bytes_upto(n: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from)
}

fn chunk() -> impl Strategy<Value = BodyChunk> {
    ("[a-z0-9-]{1,16}", any::<u32>(), any::<bool>(), proptest::option::of(any::<u64>()), bytes_upto(64))
        .prop_map(|(id, index, last, total_size, data)| BodyChunk {
            correlation_id: id.into(),
            index,
            last,
            total_size,
            data,
        })
}

fn request_headers() -> impl Strategy<Value = Event> {
    let method = prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::DELETE),
        Just(Method::from_bytes(b"PURGE").unwrap())
    ];
    (
        "[a-z0-9-]{1,16}",
        method,
        "/[a-z0-9/]{0,20}",
        headers(),
        proptest::option::of(
            (any::<std::net::IpAddr>(), any::<u16>())
                .prop_map(|(ip, port)| std::net::SocketAddr::new(ip, port)),
        ),
        kv(),
    )
        .prop_map(|(id, method, path, headers, client_addr, metadata)| {
            Event::RequestHeaders(RequestHeaders {
                correlation_id: id.into(),
                method,
                uri: path.parse().unwrap(),
                headers,
                client_addr,
                metadata,
            })
        })
}

const OPCODES: [WebSocketOpcode; 6] = [
    WebSocketOpcode::Continuation,
    WebSocketOpcode::Text,
    WebSocketOpcode::Binary,
    WebSocketOpcode::Close,
    WebSocketOpcode::Ping,
    WebSocketOpcode::Pong,
];

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        request_headers(),
        chunk().prop_map(Event::RequestBody),
        ("[a-z0-9-]{1,16}", status(), headers()).prop_map(|(id, status, headers)| {
            Event::ResponseHeaders(ResponseHeaders { correlation_id: id.into(), status, headers })
        }),
        chunk().prop_map(Event::ResponseBody),
        ("[a-z0-9-]{1,16}", status(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(id, status, us, rq, rs)| {
                Event::RequestComplete(RequestComplete {
                    correlation_id: id.into(),
                    status,
                    duration: Duration::from_micros(u64::from(us)),
                    request_bytes: rq,
                    response_bytes: rs,
                })
            }
        ),
        ("[a-z0-9-]{1,16}", 0usize..6, any::<bool>(), any::<u64>(), any::<bool>(), bytes_upto(64)).prop_map(
            |(id, op, client_to_server, index, fin, payload)| {
                Event::WebSocketFrame(WebSocketFrame {
                    correlation_id: id.into(),
                    opcode: OPCODES[op],
                    client_to_server,
                    index,
                    fin,
                    payload,
                })
            }
        ),
    ]
}

fn header_op() -> impl Strategy<Value = HeaderOp> {
    ("[a-z][a-z0-9-]{0,12}", "[!-~]{0,16}", 0u8..3).prop_map(|(n, v, k)| {
        let name = HeaderName::from_bytes(n.as_bytes()).unwrap();
        let value = HeaderValue::from_str(&v).unwrap();
        match k {
            0 => HeaderOp::Set { name, value },
            1 => HeaderOp::Add { name, value },
            _ => HeaderOp::Remove { name },
        }
    })
}

fn audit() -> impl Strategy<Value = Audit> {
    (
        proptest::collection::vec("[a-z0-9]{1,8}", 0..3),
        proptest::collection::vec("[a-z]{1,8}", 0..3),
        proptest::option::of("[ -~]{0,20}"),
        proptest::option::of(0f32..1.0),
        kv(),
    )
        .prop_map(|(rule_ids, tags, reason, confidence, custom)| Audit {
            rule_ids,
            tags,
            reason,
            confidence,
            custom,
        })
}

fn decision() -> impl Strategy<Value = Decision> {
    let action = prop_oneof![
        Just(Action::Allow),
        (status(), headers(), bytes_upto(32)).prop_map(|(status, headers, body)| Action::Block {
            status,
            headers,
            body
        }),
        ("https://[a-z]{1,10}\\.example/[a-z]{0,8}", 300u16..400).prop_map(|(location, s)| {
            Action::Redirect { location, status: StatusCode::from_u16(s).unwrap() }
        }),
        ("[a-z]{1,8}", kv()).prop_map(|(kind, params)| Action::Challenge { kind, params }),
    ];
    let body = proptest::option::of(prop_oneof![
        (any::<u32>(), bytes_upto(16))
            .prop_map(|(chunk_index, data)| BodyMutation::Replace { chunk_index, data }),
        any::<u32>().prop_map(|chunk_index| BodyMutation::Drop { chunk_index }),
    ]);
    let ops = || proptest::collection::vec(header_op(), 0..4);
    (action, ops(), ops(), body, any::<bool>(), audit()).prop_map(
        |(action, request_headers, response_headers, body, needs_more, audit)| Decision {
            action,
            request_headers,
            response_headers,
            body,
            needs_more,
            audit,
        },
    )
}

proptest! {
    #[test]
    fn every_event_survives_the_wire(e in event()) {
        let bytes = proto::Event::from(e.clone()).encode_to_vec();
        let back = Event::try_from(proto::Event::decode(bytes.as_slice()).unwrap()).unwrap();
        prop_assert_eq!(back, e);
    }

    #[test]
    fn every_decision_survives_the_wire(d in decision()) {
        let bytes = proto::Decision::from(d.clone()).encode_to_vec();
        let back = Decision::try_from(proto::Decision::decode(bytes.as_slice()).unwrap()).unwrap();
        prop_assert_eq!(back, d);
    }

    #[test]
    fn metrics_reports_survive_the_wire(
        metrics in proptest::collection::vec(
            ("[a-z_]{1,20}", any::<f64>(), proptest::collection::vec(("[a-z]{1,8}", ".{0,12}"), 0..4)),
            0..8,
        )
    ) {
        let metrics: Vec<AgentMetric> = metrics
            .into_iter()
            .map(|(name, value, labels)| AgentMetric { name, value, labels })
            .collect();
        let frame = proto::AgentFrame {
            stream_id: 0,
            body: Some(proto::agent_frame::Body::Metrics(proto::MetricsReport {
                metrics: metrics.iter().cloned().map(proto::Metric::from).collect(),
            })),
        };
        let Some(proto::agent_frame::Body::Metrics(report)) =
            proto::AgentFrame::decode(frame.encode_to_vec().as_slice()).unwrap().body
        else {
            panic!("a metrics report decodes as one")
        };
        let back: Vec<AgentMetric> = report.metrics.into_iter().map(AgentMetric::from).collect();
        prop_assert_eq!(back.len(), metrics.len());
        for (b, m) in back.iter().zip(&metrics) {
            prop_assert_eq!(&b.name, &m.name);
            prop_assert_eq!(&b.labels, &m.labels);
            prop_assert!(b.value == m.value || (b.value.is_nan() && m.value.is_nan()));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(proto::AgentFrame { body: Some(proto::agent_frame::Body::Decision(d)), .. }) =
            proto::AgentFrame::decode(data.as_slice())
        {
            let _ = Decision::try_from(d);
        }
        if let Ok(proto::ProxyFrame { body: Some(proto::proxy_frame::Body::Event(e)), .. }) =
            proto::ProxyFrame::decode(data.as_slice())
        {
            let _ = Event::try_from(e);
        }
    }
}

#[test]
fn signals_capabilities_and_configuration_survive_the_wire() {
    let caps = Capabilities::new("waf")
        .with_events([EventKind::RequestHeaders, EventKind::ResponseBody])
        .with_max_concurrency(8)
        .with_max_body_size(1 << 20)
        .with_features(Features { config_push: true, flow_control: true, ..Features::default() });
    assert_eq!(Capabilities::try_from(proto::Capabilities::from(caps.clone())).unwrap(), caps);
    for status in [
        HealthStatus::Healthy,
        HealthStatus::Degraded { timeout_multiplier: 2.5 },
        HealthStatus::Draining { eta: Some(Duration::from_secs(3)) },
        HealthStatus::Unhealthy,
    ] {
        let h = AgentHealth { status, load: Some(0.5), message: Some("ok".into()) };
        assert_eq!(AgentHealth::try_from(proto::Health::from(h.clone())).unwrap(), h);
    }
    for f in [FlowControl::Pause, FlowControl::Resume, FlowControl::Capacity(7)] {
        assert_eq!(FlowControl::try_from(proto::FlowControl::from(f)).unwrap(), f);
    }
    let cancel = Cancel { correlation_id: "r".into(), reason: CancelReason::Abandoned };
    assert_eq!(Cancel::try_from(proto::Cancel::from(cancel.clone())).unwrap(), cancel);
    let push = ConfigPush {
        push_id: 9,
        kind: "rules".into(),
        version: Some("v3".into()),
        payload: Bytes::from_static(b"x"),
    };
    assert_eq!(ConfigPush::from(proto::ConfigPush::from(push.clone())), push);
    assert_eq!(
        ConfigAck::from(proto::ConfigAck::from(ConfigAck::rejected(9, "no"))),
        ConfigAck::rejected(9, "no")
    );
    for kind in [
        ConfigUpdateKind::RequestReload,
        ConfigUpdateKind::RuleUpdate { rule_set: "crs".into(), rules: Bytes::from_static(b"r") },
        ConfigUpdateKind::ListUpdate { list: "ips".into(), added: vec!["1.2.3.4".into()], removed: vec![] },
        ConfigUpdateKind::RestartRequired { reason: "model".into(), grace: Some(Duration::from_secs(30)) },
        ConfigUpdateKind::ConfigError { error: "bad".into(), field: Some("x".into()) },
    ] {
        let r = ConfigUpdateRequest { request_id: 4, kind };
        assert_eq!(ConfigUpdateRequest::try_from(proto::ConfigUpdateRequest::from(r.clone())).unwrap(), r);
    }
    let answer = ConfigUpdateAnswer { request_id: 4, accepted: false, error: Some("later".into()) };
    assert_eq!(ConfigUpdateAnswer::from(proto::ConfigUpdateAnswer::from(answer.clone())), answer);
    let hello = Hello::new("edge");
    assert_eq!(Hello::from(proto::Hello::from(hello.clone())), hello);
}

#[test]
fn what_a_peer_gets_wrong_is_refused_with_the_field_named() {
    let field = |e: ProtoError| (e.message, e.field);
    assert_eq!(field(Event::try_from(proto::Event { kind: None }).unwrap_err()), ("Event", "kind"));
    let bad_header = proto::Event {
        kind: Some(proto::event::Kind::ResponseHeaders(proto::ResponseHeaders {
            correlation_id: "r".into(),
            status: 200,
            headers: vec![proto::Header { name: "bad name".into(), value: Bytes::new() }],
        })),
    };
    assert_eq!(field(Event::try_from(bad_header).unwrap_err()), ("ResponseHeaders", "headers.name"));
    let bad_status = proto::Decision {
        action: Some(proto::decision::Action::Block(proto::Block { status: 99, ..Default::default() })),
        ..Default::default()
    };
    assert_eq!(field(Decision::try_from(bad_status).unwrap_err()), ("Block", "status"));
    assert_eq!(field(Decision::try_from(proto::Decision::default()).unwrap_err()), ("Decision", "action"));
    let unknown_reason = proto::Cancel { correlation_id: "r".into(), reason: 42 };
    assert_eq!(field(Cancel::try_from(unknown_reason).unwrap_err()), ("Cancel", "reason"));
    let bad_events = proto::Capabilities { supported_events: 1 << 9, ..Default::default() };
    assert_eq!(field(Capabilities::try_from(bad_events).unwrap_err()), ("Capabilities", "supported_events"));
    let bad_method = proto::Event {
        kind: Some(proto::event::Kind::RequestHeaders(proto::RequestHeaders {
            method: "GE T".into(),
            uri: "/".into(),
            ..Default::default()
        })),
    };
    assert_eq!(field(Event::try_from(bad_method).unwrap_err()), ("RequestHeaders", "method"));
}
