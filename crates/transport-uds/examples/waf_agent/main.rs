//! A small WAF agent on a Unix socket: requests whose path starts with a blocked prefix get a
//! 403; everything else is allowed with an `x-waf: checked` response header.
//!
//! `cargo run -p transport-uds --example waf_agent -- /tmp/waf.sock /admin /.git`
//!
//! Stops on Ctrl-C and removes its socket file.

use http::{HeaderName, HeaderValue, StatusCode};
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, HeaderOp};
use transport_uds::{ServerConfig, UdsServer};

struct Waf {
    blocked: Vec<String>,
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/agentpool-waf.sock".into());
    let blocked: Vec<String> = args.collect();
    let blocked = if blocked.is_empty() { vec!["/admin".to_owned()] } else { blocked };
    let server =
        UdsServer::bind(&path, ServerConfig { mode: Some(0o660), ..ServerConfig::default() }).await?;
    eprintln!("example WAF agent on unix:{path}, blocking {blocked:?}; Ctrl-C to stop");
    server
        .serve(Waf { blocked }, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
