//! The example WAF agent of transport-uds (the same handler file the examples use), served over
//! a Unix socket or gRPC, as a separate process the cross-crate tests start, kill and restart.
//!
//! `itest-agent uds /path/waf.sock [blocked-prefix...]`
//! `itest-agent grpc 127.0.0.1:50051 [blocked-prefix...]` (or `grpc /path.sock`: gRPC over UDS)
//! `itest-agent garbage uds|grpc SOCKET-OR-ADDR`: not an agent — accepts connections on the
//! same socket or port and answers each with junk bytes, then closes it (the soak's "agent
//! sends garbage" fault).
//!
//! Prints `ready <endpoint>` on stdout once it listens; stops on SIGTERM or SIGINT. For the
//! soak's faults a served agent also takes two signals: SIGUSR1 toggles *slow* mode (every
//! decision is delayed by `ITEST_AGENT_SLOW_MS`, default 300 ms), SIGUSR2 toggles flow
//! control (sends `Pause`, then `Resume`, to every proxy connected).

#[path = "../../../crates/transport-uds/examples/waf_agent/waf.rs"]
mod waf;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, FlowControl};
use tokio::io::AsyncWriteExt;
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

/// The WAF, slowed down while `slow` is set.
struct Soakable {
    waf: Waf,
    slow: Arc<AtomicBool>,
    delay: Duration,
}

impl AgentHandler for Soakable {
    fn capabilities(&self) -> Capabilities {
        self.waf.capabilities()
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        if self.slow.load(Ordering::Relaxed) {
            tokio::time::sleep(self.delay).await;
        }
        self.waf.on_event(event).await
    }
}

/// Toggles `slow` on SIGUSR1, and calls `flow` with `Pause` then `Resume` on successive
/// SIGUSR2s, for as long as the process runs.
fn fault_signals(slow: Arc<AtomicBool>, flow: impl Fn(FlowControl) + 'static) -> std::io::Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::task::spawn_local(async move {
        let mut paused = false;
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => { slow.fetch_xor(true, Ordering::Relaxed); }
                Some(()) = usr2.recv() => {
                    paused = !paused;
                    flow(if paused { FlowControl::Pause } else { FlowControl::Resume });
                }
                else => return,
            }
        }
    });
    Ok(())
}

/// Junk that is no frame of either protocol: a length prefix far over any limit, then noise.
const GARBAGE: &[u8] = b"\xff\xff\xff\xf0GARBAGE\x00\x01\x02 not a frame \xde\xad\xbe\xef\r\n\r\n";

/// Accepts connections for ever; each is sent [`GARBAGE`] and closed.
async fn spew<S, F>(mut accept: impl FnMut() -> F)
where
    S: tokio::io::AsyncWrite + Unpin + 'static,
    F: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        if let Ok(mut stream) = accept().await {
            tokio::task::spawn_local(async move {
                let _ = stream.write_all(GARBAGE).await;
                let _ = stream.shutdown().await;
            });
        }
    }
}

async fn garbage(transport: &str, listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    match transport {
        "uds" => {
            let _ = std::fs::remove_file(listen);
            let listener = tokio::net::UnixListener::bind(listen)?;
            ready(&format!("unix:{listen}"))?;
            let listener = &listener;
            let serve = spew(|| async move { listener.accept().await.map(|(stream, _)| stream) });
            tokio::select! { () = serve => {}, () = stopped() => {} }
            let _ = std::fs::remove_file(listen);
        }
        "grpc" => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            ready(&format!("grpc://{listen}"))?;
            let listener = &listener;
            let serve = spew(|| async move { listener.accept().await.map(|(stream, _)| stream) });
            tokio::select! { () = serve => {}, () = stopped() => {} }
        }
        other => return Err(format!("unknown transport {other:?}: uds or grpc").into()),
    }
    Ok(())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(transport), Some(listen)) = (args.next(), args.next()) else {
        return Err("usage: itest-agent uds|grpc SOCKET-OR-ADDR [blocked-prefix...] \
                    | itest-agent garbage uds|grpc SOCKET-OR-ADDR"
            .into());
    };
    if transport == "garbage" {
        let target = args.next().ok_or("usage: itest-agent garbage uds|grpc SOCKET-OR-ADDR")?;
        let local = tokio::task::LocalSet::new();
        return local.run_until(garbage(&listen, &target)).await;
    }
    let blocked: Vec<String> = args.collect();
    let waf = Waf::new(if blocked.is_empty() { vec!["/admin".to_owned()] } else { blocked });
    let delay = std::env::var("ITEST_AGENT_SLOW_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let slow = Arc::new(AtomicBool::new(false));
    let handler = Soakable { waf, slow: slow.clone(), delay: Duration::from_millis(delay) };
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            match transport.as_str() {
                "uds" => {
                    let server = UdsServer::bind(&listen, UdsServerConfig::default()).await?;
                    let handle = server.handle();
                    fault_signals(slow, move |s| handle.flow_control(s))?;
                    ready(&format!("unix:{listen}"))?;
                    server.serve(handler, stopped()).await;
                }
                "grpc" => {
                    let server = if listen.starts_with('/') {
                        GrpcAgentServer::bind_unix(&listen, GrpcServerConfig::default()).await?
                    } else {
                        GrpcAgentServer::bind_tcp(listen.parse()?, GrpcServerConfig::default()).await?
                    };
                    let handle = server.handle();
                    fault_signals(slow, move |s| handle.flow_control(s))?;
                    ready(&server.endpoint().to_string())?;
                    server.serve(handler, stopped()).await?;
                }
                other => return Err(format!("unknown transport {other:?}: uds or grpc").into()),
            }
            Ok(())
        })
        .await
}
