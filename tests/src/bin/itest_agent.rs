//! The example WAF agent of transport-uds (the same handler file the examples use), served over
//! a Unix socket or gRPC, as a separate process the cross-crate tests start, kill and restart.
//!
//! `itest-agent uds /path/waf.sock [blocked-prefix...]`
//! `itest-agent grpc 127.0.0.1:50051 [blocked-prefix...]` (or `grpc /path.sock`: gRPC over UDS)
//!
//! Prints `ready <endpoint>` on stdout once it listens; stops on SIGTERM or SIGINT.

#[path = "../../../crates/transport-uds/examples/waf_agent/waf.rs"]
mod waf;

use std::io::Write;
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use transport_grpc::{GrpcAgentServer, GrpcServerConfig};
use transport_uds::{UdsServer, UdsServerConfig};
use waf::Waf;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("itest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stopped() {
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn ready(endpoint: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {endpoint}")?;
    out.flush()
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(transport), Some(listen)) = (args.next(), args.next()) else {
        return Err("usage: itest-agent uds|grpc SOCKET-OR-ADDR [blocked-prefix...]".into());
    };
    let blocked: Vec<String> = args.collect();
    let waf = Waf::new(if blocked.is_empty() { vec!["/admin".to_owned()] } else { blocked });
    match transport.as_str() {
        "uds" => {
            let server = UdsServer::bind(&listen, UdsServerConfig::default()).await?;
            ready(&format!("unix:{listen}"))?;
            server.serve(waf, stopped()).await;
        }
        "grpc" => {
            let server = if listen.starts_with('/') {
                GrpcAgentServer::bind_unix(&listen, GrpcServerConfig::default()).await?
            } else {
                GrpcAgentServer::bind_tcp(listen.parse()?, GrpcServerConfig::default()).await?
            };
            ready(&server.endpoint().to_string())?;
            server.serve(waf, stopped()).await?;
        }
        other => return Err(format!("unknown transport {other:?}: uds or grpc").into()),
    }
    Ok(())
}
