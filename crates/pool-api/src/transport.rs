//! The proxy side of a transport: how the pool opens and uses connections to agents.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::watch;

use crate::capabilities::{Capabilities, Hello};
use crate::config::{ConfigAck, ConfigPush, ConfigUpdateAnswer, ConfigUpdateRequest};
use crate::decision::Decision;
use crate::error::TransportError;
use crate::event::{CancelReason, CorrelationId, Event};
use crate::signals::ConnectionSignals;

/// A boxed, sendable future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A boxed, sendable stream.
pub type BoxStream<'a, T> = Pin<Box<dyn Stream<Item = T> + Send + 'a>>;

/// Where an agent listens, in a form its transport understands (`unix:/run/waf.sock`,
/// `grpc://10.0.0.5:50051`, `mem://waf`…). Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(Arc<str>);

impl Endpoint {
    /// Wraps an address.
    pub fn new(addr: impl Into<Arc<str>>) -> Self {
        Self(addr.into())
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `:` (or `://`), if the address has a scheme.
    pub fn scheme(&self) -> Option<&str> {
        self.0.split_once(':').map(|(s, _)| s)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Endpoint {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Endpoint {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

/// Opens connections to agents.
///
/// Connecting is split from the handshake so the caller can bound each with its own time-out:
/// [`connect`](Connector::connect) only establishes the byte stream, and
/// [`PendingConnection::handshake`] exchanges [`Hello`] and [`Capabilities`].
///
/// Before it registers an agent, the pool asks [`validate_endpoint`](Connector::validate_endpoint)
/// about each of its endpoints, so that an address no connector understands is refused at
/// once rather than dialled, failed and retried for as long as the pool runs.
pub trait Connector: Send + Sync + 'static {
    /// Checks, without any I/O, that `endpoint` is written the way this connector needs: a
    /// scheme it serves and a well-formed address after it.
    ///
    /// Fails with [`TransportError::InvalidEndpoint`] naming the endpoint and what is wrong
    /// with it. Passing says nothing about reachability: an agent may still be down, which
    /// [`connect`](Connector::connect) reports. The two must agree: an endpoint refused here is
    /// refused by `connect` with the same error.
    ///
    /// There is deliberately no default: a connector that really accepts any string says so
    /// in its own implementation.
    fn validate_endpoint(&self, endpoint: &Endpoint) -> Result<(), TransportError>;

    /// Establishes a stream to `endpoint`. No protocol message is exchanged yet.
    fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> BoxFuture<'static, Result<Box<dyn PendingConnection>, TransportError>>;
}

/// A connected stream that has not yet handshaken.
pub trait PendingConnection: Send + 'static {
    /// Sends `hello`, waits for the agent's capabilities, and starts the connection's task.
    ///
    /// Fails with [`TransportError::VersionMismatch`] if no protocol version is shared.
    fn handshake(
        self: Box<Self>,
        hello: Hello,
    ) -> BoxFuture<'static, Result<Arc<dyn AgentConnection>, TransportError>>;
}

/// One live, multiplexed connection to an agent.
///
/// An implementation runs one task that owns the socket. Requests are matched to answers by
/// the transport's own numeric stream ids, so any number may be in flight at once. The task
/// publishes [`ConnectionSignals`] on a watch channel; when the connection dies it fails every
/// pending request at once with [`TransportError::Closed`] and publishes `open: false`.
///
/// # Contract
///
/// * Dropping the future returned by [`send`](AgentConnection::send) before it resolves forgets
///   the request and tells the agent to cancel it with [`CancelReason::Abandoned`].
/// * [`cancel`](AgentConnection::cancel) fails every pending request of that correlation id on
///   this connection with [`TransportError::Cancelled`] and tells the agent;
///   [`cancel_all`](AgentConnection::cancel_all) does so for every pending request.
/// * A request is registered by the time [`send`](AgentConnection::send) (or
///   [`send_until`](AgentConnection::send_until)) returns: a `cancel` or `cancel_all` made
///   after that finds it.
/// * A request sent with [`send_until`](AgentConnection::send_until) and not answered by its
///   deadline fails with [`TransportError::DeadlineExceeded`], never before it, and the agent
///   is told.
/// * Methods other than the returned futures never block and never wait: they enqueue.
pub trait AgentConnection: Send + Sync + 'static {
    /// A short label for logs and errors (`"unix:/run/waf.sock#2"`).
    fn label(&self) -> &str;

    /// What the agent announced in the handshake.
    fn capabilities(&self) -> &Capabilities;

    /// False once the connection is closed, by either side. Called before every send, so it
    /// must be cheap (an atomic load) and never wait. A caller that finds the connection closed
    /// still holds its event and may send it elsewhere: nothing reached the agent.
    fn is_open(&self) -> bool;

    /// Sends one event and resolves with the agent's decision.
    ///
    /// The event is borrowed, so a proxy that keeps its request (to forward it upstream, or to
    /// ask the next agent) asks about it without a copy: the transport encodes it before this
    /// returns, and the returned future does not hold on to it.
    fn send(&self, event: &Event) -> BoxFuture<'static, Result<Decision, TransportError>>;

    /// Sends one event, as [`send`](AgentConnection::send), that must be answered by
    /// `deadline`: without an answer by then it fails with
    /// [`TransportError::DeadlineExceeded`] and the agent is told to cancel it.
    ///
    /// The default wraps `send` in a timer of its own, so the agent is told the way a dropped
    /// `send` tells it ([`CancelReason::Abandoned`]). The multiplexing transports override it
    /// to keep every request's deadline in their table of waiting requests, watched by one
    /// timer per connection instead of one per request, and cancel with
    /// [`CancelReason::Timeout`].
    fn send_until(
        &self,
        event: &Event,
        deadline: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<Decision, TransportError>> {
        let answer = self.send(event);
        let connection = self.label().to_owned();
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(answer) => answer,
                Err(_) => Err(TransportError::DeadlineExceeded { connection }),
            }
        })
    }

    /// The worker thread ([`worker_index`](crate::worker_index)) this connection's I/O runs on,
    /// when the transport placed it on one: the pool prefers it for requests made on that
    /// thread. `None` (the default): anywhere.
    fn home(&self) -> Option<usize> {
        None
    }

    /// Cancels the pending requests of `correlation_id` on this connection.
    fn cancel(&self, correlation_id: &CorrelationId, reason: CancelReason);

    /// Cancels every pending request on this connection: each fails with
    /// [`TransportError::Cancelled`]`(reason)` and the agent is told. The connection stays
    /// open. (The pool's abort at the end of a drain: one call per connection instead of a
    /// signal every request would have to watch.)
    fn cancel_all(&self, reason: CancelReason);

    /// Subscribes to the connection's signals (open, draining, flow control, agent health).
    fn signals(&self) -> watch::Receiver<ConnectionSignals>;

    /// Round-trips a ping and resolves with the time it took.
    fn ping(&self) -> BoxFuture<'static, Result<Duration, TransportError>>;

    /// Pushes configuration and resolves with the agent's acknowledgement.
    fn push_config(&self, push: ConfigPush) -> BoxFuture<'static, Result<ConfigAck, TransportError>>;

    /// Resolves with the next configuration update the agent initiates on this connection, or
    /// `None` once the connection is closed. One caller at a time (the pool's supervisor).
    fn next_config_update(&self) -> BoxFuture<'static, Option<ConfigUpdateRequest>>;

    /// Sends the proxy's answer to an agent-initiated update.
    fn answer_config_update(&self, answer: ConfigUpdateAnswer);

    /// Tells the agent that no new requests will come on this connection; pending ones go on.
    fn drain(&self);

    /// Tells the agent the proxy is shutting down, then closes. Pending requests fail with
    /// [`TransportError::Closed`].
    fn close(&self);
}
