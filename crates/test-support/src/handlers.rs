//! Small ready-made [`AgentHandler`]s for tests.

use std::fmt;

use http::{HeaderName, HeaderValue, StatusCode};
use pool_api::{
    AgentError, AgentHandler, Capabilities, ConfigAck, ConfigPush, Decision, Event, EventKind, Features,
    HeaderOp,
};

/// The features the memory transport can exercise: config push, cancellation, flow control and
/// health reports.
fn memory_features() -> Features {
    Features {
        config_push: true,
        cancellation: true,
        flow_control: true,
        health_reports: true,
        ..Features::default()
    }
}

/// Lets everything through.
///
/// Capabilities: agent id `"allow-all"`, every event kind, no limits, and the features the memory
/// transport exercises (config push, cancellation, flow control, health reports). It accepts every
/// configuration push.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl AgentHandler for AllowAll {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("allow-all").with_events(EventKind::ALL).with_features(memory_features())
    }

    async fn on_event(&self, _event: Event) -> Result<Decision, AgentError> {
        Ok(Decision::allow())
    }

    async fn on_config(&self, push: ConfigPush) -> ConfigAck {
        ConfigAck::accepted(push.push_id)
    }
}

/// Lets everything through and echoes what it saw into the audit data, so a test can check that
/// each answer went back to the request it belongs to.
///
/// The decision's `audit.reason` is the event's correlation id and its single tag is the event
/// kind (`"request_headers"`…). Capabilities are those of [`AllowAll`] with agent id `"echo"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl AgentHandler for Echo {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("echo").with_events(EventKind::ALL).with_features(memory_features())
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(Decision::allow().with_reason(event.correlation_id().as_str()).with_tag(event.kind().as_str()))
    }

    async fn on_config(&self, push: ConfigPush) -> ConfigAck {
        ConfigAck::accepted(push.push_id)
    }
}

/// A handler made of a synchronous closure, for one-off test agents.
///
/// Time is scripted on the [`MemoryAgent`](crate::MemoryAgent) (latency, failures, silence), so
/// the closure itself does not need to be async. Capabilities are those of [`AllowAll`] with
/// agent id `"fn"` unless replaced with [`with_capabilities`](FnHandler::with_capabilities);
/// configuration pushes are accepted.
///
/// ```
/// use pool_api::{Decision, Event};
/// use test_support::FnHandler;
///
/// let handler = FnHandler::new(|event: &Event| {
///     Ok(Decision::allow().with_tag(event.kind().as_str()))
/// });
/// # let _ = handler;
/// ```
pub struct FnHandler<F> {
    f: F,
    capabilities: Capabilities,
}

impl<F> FnHandler<F>
where
    F: Fn(&Event) -> Result<Decision, AgentError> + Send + Sync + 'static,
{
    /// A handler that answers every event with `f(&event)`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            capabilities: Capabilities::new("fn")
                .with_events(EventKind::ALL)
                .with_features(memory_features()),
        }
    }

    /// Replaces the capabilities the handler announces.
    #[must_use]
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }
}

impl<F> fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnHandler").field("capabilities", &self.capabilities).finish_non_exhaustive()
    }
}

impl<F> AgentHandler for FnHandler<F>
where
    F: Fn(&Event) -> Result<Decision, AgentError> + Send + Sync + 'static,
{
    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        (self.f)(&event)
    }

    async fn on_config(&self, push: ConfigPush) -> ConfigAck {
        ConfigAck::accepted(push.push_id)
    }
}

/// Blocks requests whose path starts with a prefix; tags every other request with a response
/// header.
///
/// * Request headers whose URI path starts with the prefix are answered with
///   `403 Forbidden`, reason `"path blocked"` and rule id `"block-path"`.
/// * Every other event is allowed with a [`HeaderOp::Add`] of the response header
///   (`x-agent: block-path` unless changed with [`with_header`](BlockPath::with_header)).
///
/// Capabilities: agent id `"block-path"`, request headers only. It keeps the default
/// [`AgentHandler::on_config`], which rejects configuration.
#[derive(Clone, Debug)]
pub struct BlockPath {
    prefix: String,
    header: HeaderName,
    value: HeaderValue,
}

impl BlockPath {
    /// Blocks paths starting with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            header: HeaderName::from_static("x-agent"),
            value: HeaderValue::from_static("block-path"),
        }
    }

    /// Replaces the response header added to allowed requests.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.header = name;
        self.value = value;
        self
    }
}

impl AgentHandler for BlockPath {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("block-path").with_events([EventKind::RequestHeaders])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(match &event {
            Event::RequestHeaders(h) if h.uri.path().starts_with(&self.prefix) => {
                Decision::block(StatusCode::FORBIDDEN).with_reason("path blocked").with_rule("block-path")
            }
            _ => Decision::allow()
                .with_response_header(HeaderOp::Add { name: self.header.clone(), value: self.value.clone() }),
        })
    }
}
