//! Events the proxy sends to an agent.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

/// Free-form key/value data a proxy attaches to a request (route name, tenant, TLS info…).
pub type Metadata = BTreeMap<String, String>;

/// The id that ties together every event of one proxied request.
///
/// It is routing metadata (affinity, cancel, logs), not a wire key: transports match responses
/// to requests by their own numeric stream ids, so two events of one request in flight at once
/// never collide. Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// Makes a correlation id from any string.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for CorrelationId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for CorrelationId {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl AsRef<str> for CorrelationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for CorrelationId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The request line and headers of a client request, sent before any body.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestHeaders {
    /// The request this event belongs to.
    pub correlation_id: CorrelationId,
    /// HTTP method.
    pub method: Method,
    /// Request target as the client sent it.
    pub uri: Uri,
    /// Request headers.
    pub headers: HeaderMap,
    /// The client's address, when the proxy knows it.
    pub client_addr: Option<SocketAddr>,
    /// Proxy-supplied routing and context data.
    pub metadata: Metadata,
}

impl RequestHeaders {
    /// A request with the given method and URI and no headers, address or metadata.
    pub fn new(correlation_id: impl Into<CorrelationId>, method: Method, uri: Uri) -> Self {
        Self {
            correlation_id: correlation_id.into(),
            method,
            uri,
            headers: HeaderMap::new(),
            client_addr: None,
            metadata: Metadata::new(),
        }
    }
}

/// One chunk of a request or response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyChunk {
    /// The request this chunk belongs to.
    pub correlation_id: CorrelationId,
    /// Position of the chunk in its body, counting from 0.
    pub index: u32,
    /// True on the final chunk of the body.
    pub last: bool,
    /// Total body size when the proxy knows it (a `content-length`).
    pub total_size: Option<u64>,
    /// The bytes of this chunk.
    pub data: Bytes,
}

impl BodyChunk {
    /// A chunk with no declared total size.
    pub fn new(correlation_id: impl Into<CorrelationId>, index: u32, last: bool, data: Bytes) -> Self {
        Self { correlation_id: correlation_id.into(), index, last, total_size: None, data }
    }
}

/// The status line and headers of the upstream response.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseHeaders {
    /// The request this response answers.
    pub correlation_id: CorrelationId,
    /// Upstream status code.
    pub status: StatusCode,
    /// Upstream response headers.
    pub headers: HeaderMap,
}

/// Sent once a request is finished, whatever its outcome, so the agent can log and free state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestComplete {
    /// The finished request.
    pub correlation_id: CorrelationId,
    /// Status code sent to the client.
    pub status: StatusCode,
    /// Total time the proxy spent on the request.
    pub duration: std::time::Duration,
    /// Request body bytes received from the client.
    pub request_bytes: u64,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
}

/// The opcode of a websocket frame (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum WebSocketOpcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Connection close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

/// One frame of an upgraded websocket connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebSocketFrame {
    /// The request that was upgraded.
    pub correlation_id: CorrelationId,
    /// Frame opcode.
    pub opcode: WebSocketOpcode,
    /// True if the frame travels from the client to the upstream.
    pub client_to_server: bool,
    /// Position of the frame in its direction, counting from 0.
    pub index: u64,
    /// True if this frame ends a message.
    pub fin: bool,
    /// The (unmasked) payload.
    pub payload: Bytes,
}

/// Why the proxy stopped caring about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum CancelReason {
    /// The client went away.
    ClientDisconnected,
    /// The request ran past its time-out.
    Timeout,
    /// Another agent blocked the request first.
    BlockedByAgent,
    /// The upstream failed, so the request ends early.
    UpstreamError,
    /// The proxy is shutting down.
    ProxyShutdown,
    /// An operator or caller cancelled it explicitly.
    Manual,
    /// The caller dropped its pending call without waiting for the answer.
    Abandoned,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClientDisconnected => "client disconnected",
            Self::Timeout => "timed out",
            Self::BlockedByAgent => "blocked by another agent",
            Self::UpstreamError => "upstream error",
            Self::ProxyShutdown => "proxy shutting down",
            Self::Manual => "cancelled by caller",
            Self::Abandoned => "caller stopped waiting",
        })
    }
}

/// Tells an agent to stop working on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// The request to cancel.
    pub correlation_id: CorrelationId,
    /// Why.
    pub reason: CancelReason,
}

/// Everything a proxy can ask an agent to decide on.
///
/// Cancels are not events: they have no answer and travel through
/// [`AgentConnection::cancel`](crate::AgentConnection::cancel).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Request line and headers.
    RequestHeaders(RequestHeaders),
    /// A chunk of the request body.
    RequestBody(BodyChunk),
    /// Upstream response status and headers.
    ResponseHeaders(ResponseHeaders),
    /// A chunk of the response body.
    ResponseBody(BodyChunk),
    /// The request is finished.
    RequestComplete(RequestComplete),
    /// A websocket frame after an upgrade.
    WebSocketFrame(WebSocketFrame),
}

impl Event {
    /// The kind of this event.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::RequestHeaders(_) => EventKind::RequestHeaders,
            Self::RequestBody(_) => EventKind::RequestBody,
            Self::ResponseHeaders(_) => EventKind::ResponseHeaders,
            Self::ResponseBody(_) => EventKind::ResponseBody,
            Self::RequestComplete(_) => EventKind::RequestComplete,
            Self::WebSocketFrame(_) => EventKind::WebSocketFrame,
        }
    }

    /// The request this event belongs to.
    pub fn correlation_id(&self) -> &CorrelationId {
        match self {
            Self::RequestHeaders(e) => &e.correlation_id,
            Self::RequestBody(e) | Self::ResponseBody(e) => &e.correlation_id,
            Self::ResponseHeaders(e) => &e.correlation_id,
            Self::RequestComplete(e) => &e.correlation_id,
            Self::WebSocketFrame(e) => &e.correlation_id,
        }
    }

    /// Body bytes carried by this event (0 for events without a body).
    pub fn body_len(&self) -> usize {
        match self {
            Self::RequestBody(c) | Self::ResponseBody(c) => c.data.len(),
            Self::WebSocketFrame(f) => f.payload.len(),
            _ => 0,
        }
    }

    /// The declared total body size, if the event is a body chunk that carries one.
    pub fn declared_body_size(&self) -> Option<u64> {
        match self {
            Self::RequestBody(c) | Self::ResponseBody(c) => c.total_size,
            _ => None,
        }
    }
}

/// The kind of an [`Event`], used in capabilities and routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[repr(u8)]
pub enum EventKind {
    /// [`Event::RequestHeaders`].
    RequestHeaders = 0,
    /// [`Event::RequestBody`].
    RequestBody = 1,
    /// [`Event::ResponseHeaders`].
    ResponseHeaders = 2,
    /// [`Event::ResponseBody`].
    ResponseBody = 3,
    /// [`Event::RequestComplete`].
    RequestComplete = 4,
    /// [`Event::WebSocketFrame`].
    WebSocketFrame = 5,
}

impl EventKind {
    /// Every kind, in wire order.
    pub const ALL: [EventKind; 6] = [
        Self::RequestHeaders,
        Self::RequestBody,
        Self::ResponseHeaders,
        Self::ResponseBody,
        Self::RequestComplete,
        Self::WebSocketFrame,
    ];

    /// A short lowercase name, for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RequestHeaders => "request_headers",
            Self::RequestBody => "request_body",
            Self::ResponseHeaders => "response_headers",
            Self::ResponseBody => "response_body",
            Self::RequestComplete => "request_complete",
            Self::WebSocketFrame => "websocket_frame",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`EventKind`]s, stored as a bit mask so membership is one instruction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventSet(u8);

impl EventSet {
    /// No events.
    pub const EMPTY: EventSet = EventSet(0);
    /// Every event kind.
    pub const ALL: EventSet = EventSet(0b11_1111);

    /// True if `kind` is in the set.
    pub const fn contains(self, kind: EventKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    /// The set with `kind` added.
    #[must_use]
    pub const fn with(self, kind: EventKind) -> Self {
        Self(self.0 | (1 << kind as u8))
    }

    /// True if the set holds no kind.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kinds in the set, in wire order.
    pub fn iter(self) -> impl Iterator<Item = EventKind> {
        EventKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }

    /// The raw bit mask (bit `n` is the kind with discriminant `n`).
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Builds a set from a raw mask; unknown bits are dropped.
    pub const fn from_bits_truncate(bits: u8) -> Self {
        Self(bits & Self::ALL.0)
    }
}

impl FromIterator<EventKind> for EventSet {
    fn from_iter<I: IntoIterator<Item = EventKind>>(iter: I) -> Self {
        iter.into_iter().fold(Self::EMPTY, Self::with)
    }
}

impl fmt::Debug for EventSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for EventSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for EventSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let kinds = Vec::<EventKind>::deserialize(d)?;
        Ok(kinds.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_set_holds_exactly_what_was_added() {
        let set: EventSet = [EventKind::RequestHeaders, EventKind::ResponseBody].into_iter().collect();
        assert!(set.contains(EventKind::RequestHeaders));
        assert!(set.contains(EventKind::ResponseBody));
        assert!(!set.contains(EventKind::RequestBody));
        assert_eq!(set.iter().count(), 2);
        assert_eq!(EventSet::ALL.iter().count(), EventKind::ALL.len());
        assert_eq!(EventSet::from_bits_truncate(0xff), EventSet::ALL);
    }

    #[test]
    fn event_reports_its_kind_and_correlation_id() {
        let ev = Event::RequestBody(BodyChunk::new("c-1", 0, true, Bytes::from_static(b"abc")));
        assert_eq!(ev.kind(), EventKind::RequestBody);
        assert_eq!(ev.correlation_id().as_str(), "c-1");
        assert_eq!(ev.body_len(), 3);
    }
}
