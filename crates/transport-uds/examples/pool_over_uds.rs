//! pool-core over transport-uds in one process: an agent served on a Unix socket by
//! transport-uds's agent side, a pool-core `AgentPool` reaching it through `UdsConnector`, a
//! few requests with their decisions, the pool's statistics, then both sides shut down.
//!
//! `cargo run -p transport-uds --example pool_over_uds`
//!
//! The socket lives in a temporary directory removed on exit; the agent blocks `/admin` and
//! allows everything else.

use std::process::ExitCode;

use http::{Method, StatusCode, Uri};
use pool_api::{Action, AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, PoolConfig};
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};

/// Blocks `/admin` and everything under it.
struct DenyAdmin;

impl AgentHandler for DenyAdmin {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("deny-admin").with_events([EventKind::RequestHeaders])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(match &event {
            Event::RequestHeaders(h) if h.uri.path().starts_with("/admin") => {
                Decision::block(StatusCode::FORBIDDEN).with_reason("admin is off limits")
            }
            _ => Decision::allow(),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool_over_uds: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");

    // The agent side: serve the handler until `stop` fires.
    let server = UdsServer::bind(&socket, UdsServerConfig::default()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(server.serve(DenyAdmin, async move {
        let _ = stopped.await;
    }));

    // The proxy side: a pool whose connections go through the UDS connector.
    let pool = AgentPool::new(PoolConfig::default(), UdsConnector::default())?;
    let endpoint = format!("unix:{}", socket.display());
    let added = pool.add_agent(AgentSpec::new("deny-admin").endpoint(endpoint.as_str())).await?;
    println!("agent deny-admin at {endpoint}: {} of {} connections up", added.connected, added.slots);

    for (i, path) in ["/", "/admin/users", "/index.html"].into_iter().enumerate() {
        let request = RequestHeaders::new(format!("request-{i}"), Method::GET, Uri::from_static(path));
        let decision = pool.send("deny-admin", &Event::RequestHeaders(request)).await?;
        println!("GET {path:<13} -> {}", describe(&decision));
    }

    let stats = pool.stats();
    let t = &stats.totals;
    println!(
        "pool: {} agent(s), {} of {} connections up, {} requests, {} failures, {} in flight",
        stats.agents, t.connected, t.connections, t.requests, t.failures, t.in_flight
    );

    let report = pool.shutdown().await;
    println!(
        "pool shut down: {} request(s) drained, {} cut off, in {} ms",
        report.drained,
        report.forced,
        report.elapsed.as_millis()
    );
    let _ = stop.send(());
    agent.await?;
    println!("agent stopped");
    Ok(())
}

/// One line for a decision: the action, and the reason when there is one.
fn describe(decision: &Decision) -> String {
    let action = match &decision.action {
        Action::Allow => "allow".to_owned(),
        Action::Block { status, .. } => format!("block ({status})"),
        Action::Redirect { location, status } => format!("redirect ({status}) to {location}"),
        Action::Challenge { kind, .. } => format!("challenge ({kind})"),
    };
    match &decision.audit.reason {
        Some(reason) => format!("{action}: {reason}"),
        None => action,
    }
}
