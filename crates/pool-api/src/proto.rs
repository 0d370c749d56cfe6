//! The agent protocol schema as protobuf messages, and conversions to and from the
//! vocabulary types.
//!
//! The schema is `proto/agentpool/v1/agent.proto` in this crate: the one place every
//! transport's wire format comes from. Converting a vocabulary type into its message cannot
//! fail; converting a received message back checks everything a peer could get wrong
//! (unknown enum values, missing required parts, invalid header names, methods, URIs or
//! status codes) and reports it as a [`ProtoError`] naming the message and the field.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/agentpool.v1.rs"));
}

pub use generated::*;

use crate as api;

/// A received message that does not describe a valid value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}.{field}: {problem}")]
pub struct ProtoError {
    /// The message type (`"RequestHeaders"`…).
    pub message: &'static str,
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(message: &'static str, field: &'static str, problem: impl ToString) -> ProtoError {
    ProtoError { message, field, problem: problem.to_string() }
}

fn missing(message: &'static str, field: &'static str) -> ProtoError {
    bad(message, field, "missing")
}

fn headers_to(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(n, v)| Header {
            name: bytes::Bytes::copy_from_slice(n.as_str().as_bytes()),
            value: bytes::Bytes::copy_from_slice(v.as_bytes()),
        })
        .collect()
}

fn headers_from(message: &'static str, headers: Vec<Header>) -> Result<HeaderMap, ProtoError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(&h.name).map_err(|e| bad(message, "headers.name", e))?;
        let value = HeaderValue::from_maybe_shared(h.value).map_err(|e| bad(message, "headers.value", e))?;
        map.append(name, value);
    }
    Ok(map)
}

fn status_from(message: &'static str, field: &'static str, code: u32) -> Result<StatusCode, ProtoError> {
    u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| bad(message, field, format!("{code} is not an HTTP status")))
}

fn kv_to(map: &BTreeMap<String, String>) -> Vec<KeyValue> {
    map.iter().map(|(k, v)| KeyValue { key: k.clone(), value: v.clone() }).collect()
}

fn kv_from(list: Vec<KeyValue>) -> BTreeMap<String, String> {
    list.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

// === events ===

impl From<api::Event> for Event {
    fn from(e: api::Event) -> Self {
        use event::Kind;
        let kind = match e {
            api::Event::RequestHeaders(h) => Kind::RequestHeaders(RequestHeaders {
                correlation_id: h.correlation_id.to_string(),
                method: h.method.as_str().to_owned(),
                uri: h.uri.to_string(),
                headers: headers_to(&h.headers),
                client_addr: h.client_addr.map(|a| a.to_string()).unwrap_or_default(),
                metadata: kv_to(&h.metadata),
            }),
            api::Event::RequestBody(c) => Kind::RequestBody(c.into()),
            api::Event::ResponseHeaders(h) => Kind::ResponseHeaders(ResponseHeaders {
                correlation_id: h.correlation_id.to_string(),
                status: u32::from(h.status.as_u16()),
                headers: headers_to(&h.headers),
            }),
            api::Event::ResponseBody(c) => Kind::ResponseBody(c.into()),
            api::Event::RequestComplete(c) => Kind::RequestComplete(RequestComplete {
                correlation_id: c.correlation_id.to_string(),
                status: u32::from(c.status.as_u16()),
                duration_micros: u64::try_from(c.duration.as_micros()).unwrap_or(u64::MAX),
                request_bytes: c.request_bytes,
                response_bytes: c.response_bytes,
            }),
            api::Event::WebSocketFrame(f) => Kind::WebsocketFrame(WebSocketFrame {
                correlation_id: f.correlation_id.to_string(),
                opcode: WebSocketOpcode::from(f.opcode).into(),
                client_to_server: f.client_to_server,
                index: f.index,
                fin: f.fin,
                payload: f.payload,
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl From<api::BodyChunk> for BodyChunk {
    fn from(c: api::BodyChunk) -> Self {
        Self {
            correlation_id: c.correlation_id.to_string(),
            index: c.index,
            last: c.last,
            total_size: c.total_size,
            data: c.data,
        }
    }
}

fn chunk_from(c: BodyChunk) -> api::BodyChunk {
    api::BodyChunk {
        correlation_id: c.correlation_id.into(),
        index: c.index,
        last: c.last,
        total_size: c.total_size,
        data: c.data,
    }
}

impl TryFrom<Event> for api::Event {
    type Error = ProtoError;

    fn try_from(e: Event) -> Result<Self, ProtoError> {
        use event::Kind;
        Ok(match e.kind.ok_or_else(|| missing("Event", "kind"))? {
            Kind::RequestHeaders(h) => {
                const M: &str = "RequestHeaders";
                let client_addr = if h.client_addr.is_empty() {
                    None
                } else {
                    Some(h.client_addr.parse().map_err(|e| bad(M, "client_addr", e))?)
                };
                api::Event::RequestHeaders(api::RequestHeaders {
                    correlation_id: h.correlation_id.into(),
                    method: Method::from_bytes(h.method.as_bytes()).map_err(|e| bad(M, "method", e))?,
                    uri: h.uri.parse::<Uri>().map_err(|e| bad(M, "uri", e))?,
                    headers: headers_from(M, h.headers)?,
                    client_addr,
                    metadata: kv_from(h.metadata),
                })
            }
            Kind::RequestBody(c) => api::Event::RequestBody(chunk_from(c)),
            Kind::ResponseHeaders(h) => api::Event::ResponseHeaders(api::ResponseHeaders {
                correlation_id: h.correlation_id.into(),
                status: status_from("ResponseHeaders", "status", h.status)?,
                headers: headers_from("ResponseHeaders", h.headers)?,
            }),
            Kind::ResponseBody(c) => api::Event::ResponseBody(chunk_from(c)),
            Kind::RequestComplete(c) => api::Event::RequestComplete(api::RequestComplete {
                correlation_id: c.correlation_id.into(),
                status: status_from("RequestComplete", "status", c.status)?,
                duration: Duration::from_micros(c.duration_micros),
                request_bytes: c.request_bytes,
                response_bytes: c.response_bytes,
            }),
            Kind::WebsocketFrame(f) => {
                let opcode =
                    WebSocketOpcode::try_from(f.opcode).map_err(|e| bad("WebSocketFrame", "opcode", e))?;
                api::Event::WebSocketFrame(api::WebSocketFrame {
                    correlation_id: f.correlation_id.into(),
                    opcode: opcode.into(),
                    client_to_server: f.client_to_server,
                    index: f.index,
                    fin: f.fin,
                    payload: f.payload,
                })
            }
        })
    }
}

impl From<api::WebSocketOpcode> for WebSocketOpcode {
    fn from(o: api::WebSocketOpcode) -> Self {
        match o {
            api::WebSocketOpcode::Continuation => Self::Continuation,
            api::WebSocketOpcode::Text => Self::Text,
            api::WebSocketOpcode::Binary => Self::Binary,
            api::WebSocketOpcode::Close => Self::Close,
            api::WebSocketOpcode::Ping => Self::Ping,
            api::WebSocketOpcode::Pong => Self::Pong,
        }
    }
}

impl From<WebSocketOpcode> for api::WebSocketOpcode {
    fn from(o: WebSocketOpcode) -> Self {
        match o {
            WebSocketOpcode::Continuation => Self::Continuation,
            WebSocketOpcode::Text => Self::Text,
            WebSocketOpcode::Binary => Self::Binary,
            WebSocketOpcode::Close => Self::Close,
            WebSocketOpcode::Ping => Self::Ping,
            WebSocketOpcode::Pong => Self::Pong,
        }
    }
}

impl From<api::CancelReason> for CancelReason {
    fn from(r: api::CancelReason) -> Self {
        match r {
            api::CancelReason::ClientDisconnected => Self::ClientDisconnected,
            api::CancelReason::Timeout => Self::Timeout,
            api::CancelReason::BlockedByAgent => Self::BlockedByAgent,
            api::CancelReason::UpstreamError => Self::UpstreamError,
            api::CancelReason::ProxyShutdown => Self::ProxyShutdown,
            api::CancelReason::Manual => Self::Manual,
            api::CancelReason::Abandoned => Self::Abandoned,
        }
    }
}

impl TryFrom<Cancel> for api::Cancel {
    type Error = ProtoError;

    fn try_from(c: Cancel) -> Result<Self, ProtoError> {
        let reason = match CancelReason::try_from(c.reason).map_err(|e| bad("Cancel", "reason", e))? {
            CancelReason::Unspecified => return Err(bad("Cancel", "reason", "unspecified")),
            CancelReason::ClientDisconnected => api::CancelReason::ClientDisconnected,
            CancelReason::Timeout => api::CancelReason::Timeout,
            CancelReason::BlockedByAgent => api::CancelReason::BlockedByAgent,
            CancelReason::UpstreamError => api::CancelReason::UpstreamError,
            CancelReason::ProxyShutdown => api::CancelReason::ProxyShutdown,
            CancelReason::Manual => api::CancelReason::Manual,
            CancelReason::Abandoned => api::CancelReason::Abandoned,
        };
        Ok(api::Cancel { correlation_id: c.correlation_id.into(), reason })
    }
}

impl From<api::Cancel> for Cancel {
    fn from(c: api::Cancel) -> Self {
        Self { correlation_id: c.correlation_id.to_string(), reason: CancelReason::from(c.reason).into() }
    }
}

// === decisions ===

fn op_to(op: &api::HeaderOp) -> HeaderOp {
    let (kind, name, value) = match op {
        api::HeaderOp::Set { name, value } => (header_op::Kind::Set, name, Some(value)),
        api::HeaderOp::Add { name, value } => (header_op::Kind::Add, name, Some(value)),
        api::HeaderOp::Remove { name } => (header_op::Kind::Remove, name, None),
    };
    HeaderOp {
        kind: kind.into(),
        name: bytes::Bytes::copy_from_slice(name.as_str().as_bytes()),
        value: value.map(|v| bytes::Bytes::copy_from_slice(v.as_bytes())).unwrap_or_default(),
    }
}

fn op_from(op: HeaderOp) -> Result<api::HeaderOp, ProtoError> {
    const M: &str = "HeaderOp";
    let name = HeaderName::from_bytes(&op.name).map_err(|e| bad(M, "name", e))?;
    let value = || HeaderValue::from_maybe_shared(op.value.clone()).map_err(|e| bad(M, "value", e));
    Ok(match header_op::Kind::try_from(op.kind).map_err(|e| bad(M, "kind", e))? {
        header_op::Kind::Set => api::HeaderOp::Set { name, value: value()? },
        header_op::Kind::Add => api::HeaderOp::Add { name, value: value()? },
        header_op::Kind::Remove => api::HeaderOp::Remove { name },
    })
}

impl From<api::Decision> for Decision {
    fn from(d: api::Decision) -> Self {
        use decision::Action;
        let action = match d.action {
            api::Action::Allow => Action::Allow(Allow {}),
            api::Action::Block { status, headers, body } => Action::Block(Block {
                status: u32::from(status.as_u16()),
                headers: headers_to(&headers),
                body,
            }),
            api::Action::Redirect { location, status } => {
                Action::Redirect(Redirect { location, status: u32::from(status.as_u16()) })
            }
            api::Action::Challenge { kind, params } => {
                Action::Challenge(Challenge { kind, params: kv_to(&params) })
            }
        };
        Self {
            action: Some(action),
            request_headers: d.request_headers.iter().map(op_to).collect(),
            response_headers: d.response_headers.iter().map(op_to).collect(),
            body: d.body.map(|b| match b {
                api::BodyMutation::Replace { chunk_index, data } => {
                    BodyMutation { chunk_index, change: Some(body_mutation::Change::Replace(data)) }
                }
                api::BodyMutation::Drop { chunk_index } => {
                    BodyMutation { chunk_index, change: Some(body_mutation::Change::Drop(true)) }
                }
            }),
            needs_more: d.needs_more,
            audit: Some(Audit {
                rule_ids: d.audit.rule_ids,
                tags: d.audit.tags,
                reason: d.audit.reason,
                confidence: d.audit.confidence,
                custom: kv_to(&d.audit.custom),
            }),
        }
    }
}

impl TryFrom<Decision> for api::Decision {
    type Error = ProtoError;

    fn try_from(d: Decision) -> Result<Self, ProtoError> {
        use decision::Action;
        const M: &str = "Decision";
        let action = match d.action.ok_or_else(|| missing(M, "action"))? {
            Action::Allow(Allow {}) => api::Action::Allow,
            Action::Block(b) => api::Action::Block {
                status: status_from("Block", "status", b.status)?,
                headers: headers_from("Block", b.headers)?,
                body: b.body,
            },
            Action::Redirect(r) => api::Action::Redirect {
                location: r.location,
                status: status_from("Redirect", "status", r.status)?,
            },
            Action::Challenge(c) => api::Action::Challenge { kind: c.kind, params: kv_from(c.params) },
        };
        let body = match d.body {
            None => None,
            Some(b) => Some(match b.change.ok_or_else(|| missing("BodyMutation", "change"))? {
                body_mutation::Change::Replace(data) => {
                    api::BodyMutation::Replace { chunk_index: b.chunk_index, data }
                }
                body_mutation::Change::Drop(_) => api::BodyMutation::Drop { chunk_index: b.chunk_index },
            }),
        };
        let audit = d.audit.unwrap_or_default();
        Ok(api::Decision {
            action,
            request_headers: d.request_headers.into_iter().map(op_from).collect::<Result<_, _>>()?,
            response_headers: d.response_headers.into_iter().map(op_from).collect::<Result<_, _>>()?,
            body,
            needs_more: d.needs_more,
            audit: api::Audit {
                rule_ids: audit.rule_ids,
                tags: audit.tags,
                reason: audit.reason,
                confidence: audit.confidence,
                custom: kv_from(audit.custom),
            },
        })
    }
}

// === plain mirrors ===

/// Structs whose fields match their message's one to one convert both ways, field by field.
macro_rules! mirror {
    ($($ty:ident { $($field:ident),* })*) => {$(
        impl From<api::$ty> for $ty {
            fn from(v: api::$ty) -> Self {
                Self { $($field: v.$field),* }
            }
        }

        impl From<$ty> for api::$ty {
            fn from(v: $ty) -> Self {
                Self { $($field: v.$field),* }
            }
        }
    )*};
}

mirror! {
    Hello { proxy_id, proxy_version, supported_versions }
    ConfigPush { push_id, kind, version, payload }
    ConfigAck { push_id, accepted, error }
    ConfigUpdateAnswer { request_id, accepted, error }
    Features { config_push, config_updates, health_reports, flow_control, cancellation, metrics_reports }
}

// === handshake ===

impl From<api::Capabilities> for Capabilities {
    fn from(c: api::Capabilities) -> Self {
        Self {
            agent_id: c.agent_id,
            name: c.name,
            version: c.version,
            protocol_version: c.protocol_version,
            supported_events: u32::from(c.supported_events.bits()),
            max_concurrency: c.max_concurrency.map_or(0, NonZeroU32::get),
            max_body_size: c.max_body_size,
            features: Some(c.features.into()),
        }
    }
}

impl TryFrom<Capabilities> for api::Capabilities {
    type Error = ProtoError;

    fn try_from(c: Capabilities) -> Result<Self, ProtoError> {
        let events = u8::try_from(c.supported_events)
            .ok()
            .filter(|bits| api::EventSet::from_bits_truncate(*bits).bits() == *bits)
            .ok_or_else(|| {
                bad(
                    "Capabilities",
                    "supported_events",
                    format!("unknown event bits in {:#x}", c.supported_events),
                )
            })?;
        Ok(api::Capabilities {
            agent_id: c.agent_id,
            name: c.name,
            version: c.version,
            protocol_version: c.protocol_version,
            supported_events: api::EventSet::from_bits_truncate(events),
            max_concurrency: NonZeroU32::new(c.max_concurrency),
            max_body_size: c.max_body_size,
            features: c.features.map(api::Features::from).unwrap_or_default(),
        })
    }
}

// === signals ===

impl From<api::AgentHealth> for Health {
    fn from(h: api::AgentHealth) -> Self {
        let (state, timeout_multiplier, drain_eta_millis) = match h.status {
            api::HealthStatus::Healthy => (health::State::Healthy, 1.0, None),
            api::HealthStatus::Degraded { timeout_multiplier } => {
                (health::State::Degraded, timeout_multiplier, None)
            }
            api::HealthStatus::Draining { eta } => {
                (health::State::Draining, 1.0, eta.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            }
            api::HealthStatus::Unhealthy => (health::State::Unhealthy, 1.0, None),
        };
        Self { state: state.into(), timeout_multiplier, drain_eta_millis, load: h.load, message: h.message }
    }
}

impl TryFrom<Health> for api::AgentHealth {
    type Error = ProtoError;

    fn try_from(h: Health) -> Result<Self, ProtoError> {
        let status = match health::State::try_from(h.state).map_err(|e| bad("Health", "state", e))? {
            health::State::Healthy => api::HealthStatus::Healthy,
            health::State::Degraded => {
                api::HealthStatus::Degraded { timeout_multiplier: h.timeout_multiplier }
            }
            health::State::Draining => {
                api::HealthStatus::Draining { eta: h.drain_eta_millis.map(Duration::from_millis) }
            }
            health::State::Unhealthy => api::HealthStatus::Unhealthy,
        };
        Ok(api::AgentHealth { status, load: h.load, message: h.message })
    }
}

impl From<api::FlowControl> for FlowControl {
    fn from(f: api::FlowControl) -> Self {
        use flow_control::Signal;
        let signal = match f {
            api::FlowControl::Pause => Signal::Pause(true),
            api::FlowControl::Resume => Signal::Resume(true),
            api::FlowControl::Capacity(n) => Signal::Capacity(n),
        };
        Self { signal: Some(signal) }
    }
}

impl TryFrom<FlowControl> for api::FlowControl {
    type Error = ProtoError;

    fn try_from(f: FlowControl) -> Result<Self, ProtoError> {
        use flow_control::Signal;
        Ok(match f.signal.ok_or_else(|| missing("FlowControl", "signal"))? {
            Signal::Pause(_) => Self::Pause,
            Signal::Resume(_) => Self::Resume,
            Signal::Capacity(n) => Self::Capacity(n),
        })
    }
}

// === configuration ===

impl From<api::ConfigUpdateRequest> for ConfigUpdateRequest {
    fn from(r: api::ConfigUpdateRequest) -> Self {
        use config_update_request::Kind;
        let kind = match r.kind {
            api::ConfigUpdateKind::RequestReload => Kind::RequestReload(true),
            api::ConfigUpdateKind::RuleUpdate { rule_set, rules } => {
                Kind::RuleUpdate(RuleUpdate { rule_set, rules })
            }
            api::ConfigUpdateKind::ListUpdate { list, added, removed } => {
                Kind::ListUpdate(ListUpdate { list, added, removed })
            }
            api::ConfigUpdateKind::RestartRequired { reason, grace } => {
                Kind::RestartRequired(RestartRequired {
                    reason,
                    grace_millis: grace.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                })
            }
            api::ConfigUpdateKind::ConfigError { error, field } => {
                Kind::ConfigError(ConfigError { error, field })
            }
        };
        Self { request_id: r.request_id, kind: Some(kind) }
    }
}

impl TryFrom<ConfigUpdateRequest> for api::ConfigUpdateRequest {
    type Error = ProtoError;

    fn try_from(r: ConfigUpdateRequest) -> Result<Self, ProtoError> {
        use config_update_request::Kind;
        let kind = match r.kind.ok_or_else(|| missing("ConfigUpdateRequest", "kind"))? {
            Kind::RequestReload(_) => api::ConfigUpdateKind::RequestReload,
            Kind::RuleUpdate(u) => api::ConfigUpdateKind::RuleUpdate { rule_set: u.rule_set, rules: u.rules },
            Kind::ListUpdate(u) => {
                api::ConfigUpdateKind::ListUpdate { list: u.list, added: u.added, removed: u.removed }
            }
            Kind::RestartRequired(u) => api::ConfigUpdateKind::RestartRequired {
                reason: u.reason,
                grace: u.grace_millis.map(Duration::from_millis),
            },
            Kind::ConfigError(u) => api::ConfigUpdateKind::ConfigError { error: u.error, field: u.field },
        };
        Ok(Self { request_id: r.request_id, kind })
    }
}

// === metrics reports ===

impl From<api::AgentMetric> for Metric {
    fn from(m: api::AgentMetric) -> Self {
        Self {
            name: m.name,
            value: m.value,
            labels: m.labels.into_iter().map(|(key, value)| KeyValue { key, value }).collect(),
        }
    }
}

impl From<Metric> for api::AgentMetric {
    fn from(m: Metric) -> Self {
        Self {
            name: m.name,
            value: m.value,
            labels: m.labels.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        }
    }
}
