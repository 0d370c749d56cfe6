//! The agent side: what an agent implements to answer a proxy.

use std::future::Future;

use crate::capabilities::Capabilities;
use crate::config::{ConfigAck, ConfigPush};
use crate::decision::Decision;
use crate::error::AgentError;
use crate::event::Event;
use crate::signals::AgentHealth;

/// An agent: it decides on events.
///
/// A server built on this trait runs one task per request, up to the concurrency in
/// [`capabilities`](AgentHandler::capabilities); a cancelled request's task is aborted, so a
/// handler needs no cancellation logic of its own beyond being cancel-safe.
///
/// Implementations write the async methods as `async fn`; the returned futures must be `Send`.
pub trait AgentHandler: Send + Sync + 'static {
    /// What this agent can do; sent in every handshake.
    fn capabilities(&self) -> Capabilities;

    /// Decides on one event. An error is reported to the proxy as a failure, never as "allow".
    fn on_event(&self, event: Event) -> impl Future<Output = Result<Decision, AgentError>> + Send;

    /// Applies configuration pushed by the proxy. The default rejects it.
    fn on_config(&self, push: ConfigPush) -> impl Future<Output = ConfigAck> + Send {
        std::future::ready(ConfigAck::rejected(push.push_id, "this agent does not accept configuration"))
    }

    /// The agent's current health, sent when the proxy asks. The default is healthy.
    fn health(&self) -> AgentHealth {
        AgentHealth::healthy()
    }
}
