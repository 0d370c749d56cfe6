//! The example WAF's handler: requests whose path starts with a blocked prefix get a 403 with
//! the matching rule in the audit; everything else is allowed with `x-waf: checked` added to
//! the response.

use http::{HeaderName, HeaderValue, StatusCode};
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, HeaderOp};

/// Blocks paths by prefix.
pub struct Waf {
    blocked: Vec<String>,
}

impl Waf {
    /// A WAF blocking these path prefixes.
    pub fn new(blocked: Vec<String>) -> Self {
        Self { blocked }
    }
}

impl AgentHandler for Waf {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("example-waf").with_events([EventKind::RequestHeaders]).with_max_concurrency(256)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let Event::RequestHeaders(request) = event else { return Ok(Decision::allow()) };
        let path = request.uri.path();
        if let Some(prefix) = self.blocked.iter().find(|p| path.starts_with(p.as_str())) {
            return Ok(Decision::block(StatusCode::FORBIDDEN)
                .with_rule(format!("path:{prefix}"))
                .with_tag("blocked-path"));
        }
        Ok(Decision::allow().with_response_header(HeaderOp::Set {
            name: HeaderName::from_static("x-waf"),
            value: HeaderValue::from_static("checked"),
        }))
    }
}
