//! A small WAF agent on a Unix socket: requests whose path starts with a blocked prefix get a
//! 403; everything else is allowed with an `x-waf: checked` response header.
//!
//! `cargo run -p transport-uds --example waf_agent -- /tmp/waf.sock /admin /.git`
//!
//! Stops on Ctrl-C and removes its socket file.

mod waf;

use std::process::ExitCode;

use transport_uds::{UdsServer, UdsServerConfig};
use waf::Waf;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waf_agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/agentpool-waf.sock".into());
    let blocked: Vec<String> = args.collect();
    let blocked = if blocked.is_empty() { vec!["/admin".to_owned()] } else { blocked };
    let server =
        UdsServer::bind(&path, UdsServerConfig { mode: Some(0o660), ..UdsServerConfig::default() }).await?;
    eprintln!("example WAF agent on unix:{path}, blocking {blocked:?}; Ctrl-C to stop");
    server
        .serve(Waf::new(blocked), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
