//! The transport conformance suite of `test-support`, over real Unix sockets in a tempdir.

mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use pool_api::proto::{self, agent_frame};
use pool_api::{AgentHandler, Capabilities, Connector, Endpoint, EventKind};
use test_support::conformance::{Harness, Misbehaviour, RunningAgent, WireHarness};
use test_support::{conformance_tests, wire_conformance_tests};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::codec::Framed;
use transport_uds::{UdsConnector, UdsServer, UdsServerConfig};
use wire::Wire;

struct Uds {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl Uds {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir"), next: AtomicUsize::new(0) }
    }

    fn fresh(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("agent-{}.sock", self.next.fetch_add(1, Ordering::Relaxed)))
    }
}

fn endpoint(path: &std::path::Path) -> Endpoint {
    Endpoint::new(format!("unix:{}", path.display()))
}

fn path_of(endpoint: &Endpoint) -> std::path::PathBuf {
    endpoint.as_str().strip_prefix("unix:").expect("a unix endpoint").into()
}

async fn serve_on<H: AgentHandler>(path: std::path::PathBuf, handler: H) -> RunningAgent {
    let server = UdsServer::bind(&path, UdsServerConfig::default()).await.expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    RunningAgent::new(endpoint(&path), move || drop(stop))
}

/// A listener that runs `script` on every accepted stream until killed.
fn raw_agent<F, Fut>(path: std::path::PathBuf, script: F) -> RunningAgent
where
    F: Fn(tokio::net::UnixStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = UnixListener::bind(&path).expect("bind");
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        let mut streams = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            streams.spawn(script(stream));
        }
    });
    RunningAgent::new(endpoint(&path), move || task.abort())
}

impl Harness for Uds {
    fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(UdsConnector::default())
    }

    async fn serve<H: AgentHandler>(&self, handler: H) -> RunningAgent {
        serve_on(self.fresh(), handler).await
    }

    async fn serve_at<H: AgentHandler>(&self, endpoint: &Endpoint, handler: H) -> RunningAgent {
        serve_on(path_of(endpoint), handler).await
    }

    async fn silent(&self) -> RunningAgent {
        raw_agent(self.fresh(), |stream| async move {
            let _held = stream;
            std::future::pending::<()>().await;
        })
    }
}

/// The bytes a misbehaving agent writes after the handshake.
fn broken_bytes(how: Misbehaviour) -> Vec<u8> {
    match how {
        Misbehaviour::Garbage => vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
        Misbehaviour::Oversized => u32::MAX.to_be_bytes().to_vec(),
        // Announces 100 bytes, sends 10, then the connection ends.
        Misbehaviour::Truncated => {
            [&100u32.to_be_bytes()[..], &[0x08, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]].concat()
        }
        Misbehaviour::UnknownMessage => {
            // Stream id 1, then field 15, which AgentFrame does not have: a frame with no body.
            let body = [0x08, 0x01, 0x7a, 0x00];
            [&(body.len() as u32).to_be_bytes()[..], &body].concat()
        }
    }
}

impl WireHarness for Uds {
    async fn misbehaving(&self, how: Misbehaviour) -> RunningAgent {
        raw_agent(self.fresh(), move |stream| async move {
            let mut framed = Framed::new(stream, Wire::<proto::ProxyFrame, proto::AgentFrame>::new(1 << 20));
            let _hello = framed.next().await;
            let capabilities: proto::Capabilities =
                Capabilities::new("rogue").with_events(EventKind::ALL).into();
            let frame =
                proto::AgentFrame { stream_id: 0, body: Some(agent_frame::Body::Capabilities(capabilities)) };
            if framed.send(frame).await.is_err() {
                return;
            }
            let _request = framed.next().await;
            let mut stream = framed.into_inner();
            let _ = stream.write_all(&broken_bytes(how)).await;
            if how != Misbehaviour::Truncated {
                std::future::pending::<()>().await;
            }
        })
    }
}

conformance_tests!(Uds::new());
wire_conformance_tests!(Uds::new());
