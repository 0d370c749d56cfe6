//! What the integration tests share: a test CA, a running agent, a request.
#![allow(dead_code, unreachable_pub)]

use http::{Method, Uri};
use pool_api::{
    AgentConnection, AgentHandler, Connector, Endpoint, Event, Hello, RequestHeaders, TransportError,
};
use std::sync::Arc;
use tokio::sync::oneshot;
use transport_grpc::{GrpcAgentServer, GrpcServerConfig, GrpcServerHandle};

#[allow(unused_imports)] // not every test file issues certificates
pub use test_support::tls::{Pair, TestCa};

/// A running agent; stopped (abruptly) when dropped.
pub struct Agent {
    pub endpoint: Endpoint,
    pub handle: GrpcServerHandle,
    _stop: oneshot::Sender<()>,
}

pub async fn serve<H: AgentHandler>(handler: H, config: GrpcServerConfig) -> Agent {
    let server = GrpcAgentServer::bind_tcp(([127, 0, 0, 1], 0).into(), config).await.expect("bind");
    start(server, handler)
}

pub fn start<H: AgentHandler>(server: GrpcAgentServer, handler: H) -> Agent {
    let endpoint = server.endpoint();
    let handle = server.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    Agent { endpoint, handle, _stop: stop }
}

pub async fn connect(
    connector: &dyn Connector,
    endpoint: &Endpoint,
) -> Result<Arc<dyn AgentConnection>, TransportError> {
    connector.connect(endpoint).await?.handshake(Hello::new("test-proxy")).await
}

pub fn request(id: &str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/")))
}

pub fn request_to(id: &str, path: &'static str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
}
