//! The example WAF agent of `transport-uds` (the same handler, the same file) served over gRPC:
//! requests whose path starts with a blocked prefix get a 403; everything else is allowed with
//! an `x-waf: checked` response header. The standard health service and server reflection are
//! served next to it, so `grpcurl` and `grpc_health_probe` work against it.
//!
//! `cargo run -p transport-grpc --example grpc_waf_agent -- 127.0.0.1:50051 /admin /.git`
//! (or a socket path starting with `/` instead of the address: gRPC over a Unix socket).
//!
//! Stops on Ctrl-C.

#[path = "../../../transport-uds/examples/waf_agent/waf.rs"]
mod waf;

use std::process::ExitCode;

use transport_grpc::{GrpcAgentServer, GrpcServerConfig};
use waf::Waf;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc_waf_agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    let blocked: Vec<String> = args.collect();
    let blocked = if blocked.is_empty() { vec!["/admin".to_owned()] } else { blocked };
    let server = if listen.starts_with('/') {
        GrpcAgentServer::bind_unix(&listen, GrpcServerConfig::default()).await?
    } else {
        GrpcAgentServer::bind_tcp(listen.parse()?, GrpcServerConfig::default()).await?
    };
    eprintln!("example WAF agent at {}, blocking {blocked:?}; Ctrl-C to stop", server.endpoint());
    server
        .serve(Waf::new(blocked), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
