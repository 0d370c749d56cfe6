//! A conformance suite for agent transports, written against the `pool-api` traits only.
//!
//! A transport proves itself by implementing [`Harness`] (how to run an agent for a handler,
//! how to kill and restart it, how to run one that never handshakes) — and, for transports
//! that carry bytes, [`WireHarness`] (agents that send broken frames) — and then expanding
//! [`conformance_tests!`](crate::conformance_tests) and
//! [`wire_conformance_tests!`](crate::wire_conformance_tests) in a test file. Each check is
//! also a public function here, for a transport that wants to call them itself.
//!
//! What is checked:
//! * every event kind, fully populated, reaches the agent equal to what was sent, and every
//!   kind of decision comes back equal to what the agent answered;
//! * many concurrent requests over several connections each get their own answer;
//! * a killed agent fails every pending request at once with [`TransportError::Closed`], the
//!   connection says it is closed, and a new connection works once the agent is back;
//! * a cancel aborts that request only; `cancel_all` every pending one, and the connection
//!   goes on;
//! * a request past its deadline fails alone, not early, each at its own deadline, and the
//!   agent is told;
//! * an agent that accepts but never handshakes leaves the handshake pending (the pool's
//!   handshake time-out is what ends it); a protocol version mismatch is
//!   [`TransportError::VersionMismatch`];
//! * broken frames from an agent (garbage, oversized, truncated, unknown message) end that
//!   connection with a typed error, answer nothing wrongly, and leave other connections alone;
//! * the endpoints the harness serves at pass [`Connector::validate_endpoint`], malformed ones
//!   fail it with [`TransportError::InvalidEndpoint`] naming them, and `connect` agrees.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use pool_api::{
    AgentConnection, AgentError, AgentHandler, BodyChunk, BodyMutation, CancelReason, Capabilities,
    Connector, Decision, Endpoint, Event, EventKind, HeaderOp, Hello, RequestComplete, RequestHeaders,
    ResponseHeaders, TransportError, WebSocketFrame, WebSocketOpcode,
};

/// An agent a harness runs; killed (abruptly, like a crashed process) when dropped.
pub struct RunningAgent {
    /// Where it listens.
    pub endpoint: Endpoint,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl RunningAgent {
    /// An agent at `endpoint` that `stop` kills.
    pub fn new(endpoint: Endpoint, stop: impl FnOnce() + Send + 'static) -> Self {
        Self { endpoint, stop: Some(Box::new(stop)) }
    }

    /// Kills it now: its connections end without a goodbye.
    pub fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent").field("endpoint", &self.endpoint).finish()
    }
}

/// What a transport provides to be checked.
pub trait Harness: Send + Sync {
    /// The proxy side.
    fn connector(&self) -> Arc<dyn Connector>;

    /// Serves `handler` at a fresh endpoint.
    fn serve<H: AgentHandler>(&self, handler: H) -> impl Future<Output = RunningAgent> + Send;

    /// Serves `handler` at `endpoint` again, after the agent there was killed.
    fn serve_at<H: AgentHandler>(
        &self,
        endpoint: &Endpoint,
        handler: H,
    ) -> impl Future<Output = RunningAgent> + Send;

    /// An agent that accepts connections and never answers the handshake.
    fn silent(&self) -> impl Future<Output = RunningAgent> + Send;
}

/// How a [`WireHarness`] agent breaks the protocol, after a correct handshake, on receiving the
/// first request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A frame whose body is not a valid message.
    Garbage,
    /// A frame announcing more bytes than the proxy's frame limit.
    Oversized,
    /// Part of a frame, then the connection closes.
    Truncated,
    /// A well-formed frame of a message type the proxy does not know.
    UnknownMessage,
}

impl Misbehaviour {
    /// All of them.
    pub const ALL: [Self; 4] = [Self::Garbage, Self::Oversized, Self::Truncated, Self::UnknownMessage];
}

/// A transport that carries bytes, and can therefore be fed broken ones.
pub trait WireHarness: Harness {
    /// An agent that handshakes properly, then misbehaves as told on the first request.
    fn misbehaving(&self, how: Misbehaviour) -> impl Future<Output = RunningAgent> + Send;
}

fn hello() -> Hello {
    Hello::new("conformance-proxy")
}

/// Connects and handshakes, panicking with the endpoint on failure.
pub async fn connect(connector: &dyn Connector, endpoint: &Endpoint) -> Arc<dyn AgentConnection> {
    let pending = connector.connect(endpoint).await.unwrap_or_else(|e| panic!("connect {endpoint}: {e}"));
    pending.handshake(hello()).await.unwrap_or_else(|e| panic!("handshake {endpoint}: {e}"))
}

/// Records every event it receives and answers with the decision the event's correlation id
/// names in its table (allow when none).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Event>>>,
    answers: Arc<BTreeMap<String, Decision>>,
}

impl AgentHandler for Recorder {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("recorder").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let answer = self.answers.get(event.correlation_id().as_str()).cloned().unwrap_or_default();
        self.seen.lock().push(event);
        Ok(answer)
    }
}

/// One event of every kind, with every field set.
pub fn every_event() -> Vec<Event> {
    let mut headers = HeaderMap::new();
    headers.insert("x-one", HeaderValue::from_static("1"));
    headers.append("x-many", HeaderValue::from_static("a"));
    headers.append("x-many", HeaderValue::from_static("b"));
    headers.insert("x-binary", HeaderValue::from_bytes(&[0x80, 0xff, b'z']).expect("opaque header bytes"));
    let mut request = RequestHeaders::new(
        "ev-headers",
        Method::from_bytes(b"PURGE").expect("extension method"),
        Uri::from_static("https://example.test:8443/a/b?c=d&e"),
    );
    request.headers = headers.clone();
    request.client_addr = Some(SocketAddr::from(([192, 0, 2, 7], 41_234)));
    request.metadata.insert("route".into(), "api".into());
    request.metadata.insert("tenant".into(), "t-1".into());
    let mut body = BodyChunk::new("ev-body", 3, false, bytes::Bytes::from_static(b"\x00\x01binary\xff"));
    body.total_size = Some(1 << 20);
    vec![
        Event::RequestHeaders(request),
        Event::RequestBody(body),
        Event::ResponseHeaders(ResponseHeaders {
            correlation_id: "ev-response".into(),
            status: StatusCode::IM_A_TEAPOT,
            headers,
        }),
        Event::ResponseBody(BodyChunk::new("ev-response-body", 0, true, bytes::Bytes::new())),
        Event::RequestComplete(RequestComplete {
            correlation_id: "ev-complete".into(),
            status: StatusCode::BAD_GATEWAY,
            duration: Duration::from_micros(1_234_567),
            request_bytes: u64::MAX,
            response_bytes: 0,
        }),
        Event::WebSocketFrame(WebSocketFrame {
            correlation_id: "ev-ws".into(),
            opcode: WebSocketOpcode::Binary,
            client_to_server: false,
            index: 42,
            fin: false,
            payload: bytes::Bytes::from_static(&[0; 64]),
        }),
    ]
}

/// One decision of every kind, with every field set somewhere.
pub fn every_decision() -> Vec<Decision> {
    let name = HeaderName::from_static("x-agent");
    let mut params = BTreeMap::new();
    params.insert("site-key".to_owned(), "abc".to_owned());
    let mut block =
        Decision::block(StatusCode::FORBIDDEN).with_rule("942100").with_tag("sqli").with_reason("sql");
    if let pool_api::Action::Block { headers, body, .. } = &mut block.action {
        headers.insert("x-blocked", HeaderValue::from_static("yes"));
        *body = bytes::Bytes::from_static(b"<h1>no</h1>");
    }
    block.audit.confidence = Some(0.5);
    block.audit.custom.insert("score".into(), "17".into());
    vec![
        Decision::allow(),
        block,
        Decision::redirect("https://login.example.test/?next=%2F", StatusCode::SEE_OTHER),
        Decision::challenge("captcha", params),
        Decision::allow()
            .with_request_header(HeaderOp::Set { name: name.clone(), value: HeaderValue::from_static("1") })
            .with_request_header(HeaderOp::Remove { name: name.clone() })
            .with_response_header(HeaderOp::Add { name, value: HeaderValue::from_static("2") }),
        Decision::allow().with_body(BodyMutation::Replace {
            chunk_index: 3,
            data: bytes::Bytes::from_static(b"redacted"),
        }),
        Decision::allow().with_body(BodyMutation::Drop { chunk_index: 0 }).needing_more(),
    ]
}

/// Every event reaches the agent as sent; every decision comes back as answered.
pub async fn round_trips_every_event_and_decision<H: Harness>(harness: &H) {
    let events = every_event();
    let decisions = every_decision();
    let answers: BTreeMap<String, Decision> =
        decisions.iter().enumerate().map(|(i, d)| (format!("dec-{i}"), d.clone())).collect();
    let recorder = Recorder { seen: Arc::default(), answers: Arc::new(answers) };
    let agent = harness.serve(recorder.clone()).await;
    let conn = connect(&*harness.connector(), &agent.endpoint).await;
    for event in &events {
        let decision = conn.send(&event.clone()).await.unwrap_or_else(|e| panic!("{}: {e}", event.kind()));
        assert_eq!(decision, Decision::allow(), "{}", event.kind());
    }
    assert_eq!(*recorder.seen.lock(), events, "events arrive exactly as sent");
    for (i, expected) in decisions.iter().enumerate() {
        let event = Event::RequestHeaders(RequestHeaders::new(
            format!("dec-{i}"),
            Method::GET,
            Uri::from_static("/"),
        ));
        let decision = conn.send(&event).await.unwrap_or_else(|e| panic!("decision {i}: {e}"));
        assert_eq!(&decision, expected, "decision {i} comes back exactly as answered");
    }
}

/// `requests` concurrent requests spread over `connections` connections each get the answer to
/// their own request.
pub async fn concurrent_requests_never_cross<H: Harness>(harness: &H, requests: usize, connections: usize) {
    let agent = harness.serve(crate::Echo).await;
    let connector = harness.connector();
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(connect(&*connector, &agent.endpoint).await);
    }
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let conn = conns[i % connections].clone();
            tokio::spawn(async move {
                let id = format!("req-{i}");
                let event = Event::RequestHeaders(RequestHeaders::new(
                    id.as_str(),
                    Method::GET,
                    Uri::from_static("/"),
                ));
                let decision = conn.send(&event).await.unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(decision.audit.reason.as_deref(), Some(id.as_str()), "cross-talk");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("request task");
    }
}

/// A handler that never answers.
struct Stuck;

impl AgentHandler for Stuck {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("stuck").with_events(EventKind::ALL)
    }

    async fn on_event(&self, _event: Event) -> Result<Decision, AgentError> {
        std::future::pending().await
    }
}

fn request(id: String) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/")))
}

/// The agent is killed with `pending` requests in flight: every one fails with
/// [`TransportError::Closed`], the connection reports closed, and after the agent is back a new
/// connection works. Returns how long after the kill the last pending request failed.
pub async fn killed_agent_fails_pending_at_once<H: Harness>(harness: &H, pending: usize) -> Duration {
    let agent = harness.serve(Stuck).await;
    let endpoint = agent.endpoint.clone();
    let connector = harness.connector();
    let conn = connect(&*connector, &endpoint).await;
    let mut signals = conn.signals();
    let sends: Vec<_> = (0..pending).map(|i| conn.send(&request(format!("p{i}")))).collect();
    let waiting = tokio::spawn(async move {
        let results = futures_join_all(sends).await;
        (results, tokio::time::Instant::now())
    });
    // Let every request reach the agent.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed = tokio::time::Instant::now();
    agent.kill();
    let (results, done) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("pending requests must fail when the agent dies, not hang")
        .expect("waiting task");
    for result in results {
        assert!(matches!(result, Err(TransportError::Closed { .. })), "{result:?}");
    }
    let took = done.saturating_duration_since(killed);
    assert!(!conn.is_open(), "the connection reports closed");
    tokio::time::timeout(Duration::from_secs(10), signals.wait_for(|s| !s.open))
        .await
        .expect("signals publish the closure")
        .ok();

    let _back = harness.serve_at(&endpoint, crate::Echo).await;
    let again = connect(&*connector, &endpoint).await;
    let decision = again.send(&request("after-restart".into())).await.expect("a new connection works");
    assert_eq!(decision.audit.reason.as_deref(), Some("after-restart"));
    took
}

async fn futures_join_all<T: Send + 'static>(
    futures: Vec<pool_api::BoxFuture<'static, Result<T, TransportError>>>,
) -> Vec<Result<T, TransportError>> {
    let mut out = Vec::with_capacity(futures.len());
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for handle in handles {
        out.push(handle.await.expect("send task"));
    }
    out
}

/// A cancel fails the cancelled request with [`TransportError::Cancelled`] and leaves another
/// request on the same connection alone.
pub async fn cancel_aborts_only_that_request<H: Harness>(harness: &H) {
    let agent = harness.serve(SlowFor { id: "slow" }).await;
    let conn = connect(&*harness.connector(), &agent.endpoint).await;
    let slow = tokio::spawn(conn.send(&request("slow".into())));
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.cancel(&"slow".into(), CancelReason::ClientDisconnected);
    let cancelled =
        tokio::time::timeout(Duration::from_secs(10), slow).await.expect("cancel is prompt").expect("task");
    assert!(
        matches!(cancelled, Err(TransportError::Cancelled(CancelReason::ClientDisconnected))),
        "{cancelled:?}"
    );
    let other = conn.send(&request("fast".into())).await.expect("the connection still serves");
    assert!(other.is_allow());
    assert!(conn.is_open());
}

/// A request sent with a deadline and not answered by then fails alone with
/// [`TransportError::DeadlineExceeded`] — not before its deadline, and each at its own: a
/// later request with an earlier deadline expires first — the agent is told to cancel it, and
/// the requests answered in time and the connection are not affected.
pub async fn a_request_past_its_deadline_fails_alone_and_the_agent_is_told<H: Harness>(harness: &H) {
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let agent = harness.serve(NeverFor { prefix: "never", dropped: dropped.clone() }).await;
    let conn = connect(&*harness.connector(), &agent.endpoint).await;
    let start = tokio::time::Instant::now();
    let (first_by, second_by) = (start + Duration::from_millis(400), start + Duration::from_millis(150));
    let first = tokio::spawn(conn.send_until(&request("never-1".into()), first_by));
    let answered = conn.send_until(&request("fast".into()), first_by).await;
    assert!(answered.expect("answered in time").is_allow());
    let second = tokio::spawn(conn.send_until(&request("never-2".into()), second_by));
    let wait = |task: tokio::task::JoinHandle<_>| async move {
        let result = tokio::time::timeout(Duration::from_secs(10), task).await;
        (result.expect("a deadline ends the request").expect("task"), tokio::time::Instant::now())
    };
    let (second, second_at) = wait(second).await;
    let (first, first_at) = wait(first).await;
    for (result, by, at) in [(second, second_by, second_at), (first, first_by, first_at)] {
        assert!(
            matches!(result, Err(TransportError::DeadlineExceeded { ref connection }) if connection == conn.label()),
            "{result:?}"
        );
        assert!(at >= by, "failed {:?} before its deadline", by - at);
    }
    assert!(second_at <= first_at, "the earlier deadline expires first");
    // The agent is told: both handlers' futures are dropped (the request is cancelled there).
    agent_told(&dropped, 2).await;
    assert!(conn.is_open());
    let after = conn
        .send_until(&request("after".into()), tokio::time::Instant::now() + Duration::from_secs(10))
        .await;
    assert!(after.expect("the connection still serves").is_allow());
}

/// `cancel_all` fails every pending request with [`TransportError::Cancelled`], tells the
/// agent, and leaves the connection serving.
pub async fn cancel_all_fails_every_pending_request_and_the_connection_goes_on<H: Harness>(harness: &H) {
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let agent = harness.serve(NeverFor { prefix: "never", dropped: dropped.clone() }).await;
    let conn = connect(&*harness.connector(), &agent.endpoint).await;
    let pending: Vec<_> = (0..5).map(|i| tokio::spawn(conn.send(&request(format!("never-{i}"))))).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.cancel_all(CancelReason::ProxyShutdown);
    for task in pending {
        let result =
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("prompt").expect("task");
        assert_eq!(result, Err(TransportError::Cancelled(CancelReason::ProxyShutdown)));
    }
    agent_told(&dropped, 5).await;
    assert!(conn.is_open());
    assert!(conn.send(&request("after".into())).await.expect("the connection still serves").is_allow());
}

/// Waits (up to 10 s) until `n` of [`NeverFor`]'s handler futures were dropped: the agent was
/// told to cancel them.
async fn agent_told(dropped: &std::sync::atomic::AtomicUsize, n: usize) {
    let told = tokio::time::timeout(Duration::from_secs(10), async {
        while dropped.load(std::sync::atomic::Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        told.is_ok(),
        "the agent was told to cancel {} of {n}",
        dropped.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// Never answers requests whose correlation id starts with `prefix` (counting their futures
/// dropped: cancelled); allows every other at once.
struct NeverFor {
    prefix: &'static str,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts itself dropped.
struct DropCount(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl AgentHandler for NeverFor {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("never-for").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        if event.correlation_id().as_str().starts_with(self.prefix) {
            let _count = DropCount(self.dropped.clone());
            std::future::pending::<()>().await;
        }
        Ok(Decision::allow())
    }
}

/// Never answers the request named `id`; allows every other at once.
struct SlowFor {
    id: &'static str,
}

impl AgentHandler for SlowFor {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("slow-for").with_events(EventKind::ALL)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        if event.correlation_id().as_str() == self.id {
            std::future::pending::<()>().await;
        }
        Ok(Decision::allow())
    }
}

/// Against an agent that never handshakes, connecting succeeds and the handshake stays pending
/// (it is the caller's time-out that ends it).
pub async fn silent_agent_leaves_the_handshake_pending<H: Harness>(harness: &H) {
    let agent = harness.silent().await;
    let pending = harness.connector().connect(&agent.endpoint).await.expect("the socket accepts");
    let outcome = tokio::time::timeout(Duration::from_millis(300), pending.handshake(hello())).await;
    assert!(
        outcome.is_err(),
        "the handshake must not complete: {:?}",
        outcome.map(|r| r.map(|c| c.label().to_owned()))
    );
}

/// A proxy offering only versions the agent does not speak gets
/// [`TransportError::VersionMismatch`] naming both sides' versions.
pub async fn version_mismatch_is_typed<H: Harness>(harness: &H) {
    let agent = harness.serve(crate::Echo).await;
    let pending = harness.connector().connect(&agent.endpoint).await.expect("connect");
    let hello = Hello { supported_versions: vec![9_999], ..hello() };
    let err = pending.handshake(hello).await.map(|c| c.label().to_owned()).unwrap_err();
    let TransportError::VersionMismatch { proxy, agent: agent_versions, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(proxy, &vec![9_999]);
    assert!(agent_versions.contains(&pool_api::PROTOCOL_VERSION), "{agent_versions:?}");
}

/// Endpoints malformed for any transport: empty, without a scheme or a leading `/`, with
/// spaces where a scheme would be.
pub const MALFORMED_ENDPOINTS: [&str; 3] = ["", "agent.sock", "no such scheme://agent"];

/// The endpoint an agent is served at passes [`Connector::validate_endpoint`]; each of
/// [`MALFORMED_ENDPOINTS`] fails it with [`TransportError::InvalidEndpoint`] naming the
/// endpoint, and `connect` refuses it with the same error.
pub async fn endpoints_are_validated_before_dialling<H: Harness>(harness: &H) {
    let agent = harness.serve(crate::Echo).await;
    let connector = harness.connector();
    assert_eq!(connector.validate_endpoint(&agent.endpoint), Ok(()), "{}", agent.endpoint);
    for bad in MALFORMED_ENDPOINTS {
        let endpoint = Endpoint::from(bad);
        let err = connector.validate_endpoint(&endpoint).expect_err(bad);
        let TransportError::InvalidEndpoint { endpoint: named, message } = &err else {
            panic!("{bad:?}: {err:?}")
        };
        assert_eq!(named, bad);
        assert!(!message.is_empty(), "{bad:?}: the error says what is wrong");
        let refused = connector.connect(&endpoint).await.map(|_| ()).unwrap_err();
        assert_eq!(refused, err, "{bad:?}: connect agrees");
    }
}

/// An agent breaking the protocol fails the request on that connection with
/// [`TransportError::Closed`] (never an answer), closes that connection only, and leaves a
/// connection to a healthy agent serving.
pub async fn broken_frames_close_only_that_connection<H: WireHarness>(harness: &H, how: Misbehaviour) {
    let healthy = harness.serve(crate::Echo).await;
    let rogue = harness.misbehaving(how).await;
    let connector = harness.connector();
    let good = connect(&*connector, &healthy.endpoint).await;
    let bad = connect(&*connector, &rogue.endpoint).await;
    let in_flight = tokio::spawn(good.send(&request("before".into())));
    let err = tokio::time::timeout(Duration::from_secs(10), bad.send(&request("victim".into())))
        .await
        .unwrap_or_else(|_| panic!("{how:?}: the request must fail, not hang"))
        .expect_err("a broken agent never produces an answer");
    let TransportError::Closed { connection, reason } = &err else { panic!("{how:?}: {err:?}") };
    assert_eq!(connection, bad.label(), "{how:?}: the error names the connection");
    assert!(!reason.is_empty(), "{how:?}: the error says why");
    assert!(!bad.is_open(), "{how:?}: the broken connection is closed");
    assert!(good.is_open(), "{how:?}: the other connection is untouched");
    let before = in_flight.await.expect("task").expect("the other connection's request");
    assert_eq!(before.audit.reason.as_deref(), Some("before"));
    let after = good.send(&request("after".into())).await.expect("the other connection still serves");
    assert_eq!(after.audit.reason.as_deref(), Some("after"));
}

/// Expands to one `#[tokio::test]` per check of the suite, each building its harness with
/// `$harness` (an expression evaluated inside the test).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_round_trips_every_event_and_decision() {
            $crate::conformance::round_trips_every_event_and_decision(&$harness).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_ten_thousand_requests_over_four_connections_never_cross() {
            $crate::conformance::concurrent_requests_never_cross(&$harness, 10_000, 4).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_a_killed_agent_fails_pending_requests_at_once() {
            let took = $crate::conformance::killed_agent_fails_pending_at_once(&$harness, 100).await;
            eprintln!("100 pending requests failed {took:?} after the agent was killed");
            // Generous: "at once" means not after some time-out; the figure is printed.
            assert!(took < ::std::time::Duration::from_secs(5), "{took:?}");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_cancel_aborts_only_that_request() {
            $crate::conformance::cancel_aborts_only_that_request(&$harness).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_a_request_past_its_deadline_fails_alone_and_the_agent_is_told() {
            $crate::conformance::a_request_past_its_deadline_fails_alone_and_the_agent_is_told(&$harness)
                .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_cancel_all_fails_every_pending_request_and_the_connection_goes_on() {
            $crate::conformance::cancel_all_fails_every_pending_request_and_the_connection_goes_on(&$harness)
                .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_a_silent_agent_leaves_the_handshake_pending() {
            $crate::conformance::silent_agent_leaves_the_handshake_pending(&$harness).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_a_version_mismatch_is_typed() {
            $crate::conformance::version_mismatch_is_typed(&$harness).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_endpoints_are_validated_before_dialling() {
            $crate::conformance::endpoints_are_validated_before_dialling(&$harness).await;
        }
    };
}

/// Expands to one `#[tokio::test]` per [`Misbehaviour`](crate::conformance::Misbehaviour), for
/// a [`WireHarness`](crate::conformance::WireHarness) built by `$harness`.
#[macro_export]
macro_rules! wire_conformance_tests {
    ($harness:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_garbage_closes_only_that_connection() {
            let how = $crate::conformance::Misbehaviour::Garbage;
            $crate::conformance::broken_frames_close_only_that_connection(&$harness, how).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_an_oversized_frame_closes_only_that_connection() {
            let how = $crate::conformance::Misbehaviour::Oversized;
            $crate::conformance::broken_frames_close_only_that_connection(&$harness, how).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_a_truncated_frame_closes_only_that_connection() {
            let how = $crate::conformance::Misbehaviour::Truncated;
            $crate::conformance::broken_frames_close_only_that_connection(&$harness, how).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_an_unknown_message_closes_only_that_connection() {
            let how = $crate::conformance::Misbehaviour::UnknownMessage;
            $crate::conformance::broken_frames_close_only_that_connection(&$harness, how).await;
        }
    };
}
