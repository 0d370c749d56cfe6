//! The transport conformance suite of `test-support`, over real TCP connections on loopback:
//! h2c to a `GrpcAgentServer`, and raw HTTP/2 (the `h2` crate) for agents that break the
//! protocol on the wire.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use pool_api::proto::{self, agent_frame};
use pool_api::{AgentHandler, Capabilities, Connector, Endpoint, EventKind};
use prost::Message;
use test_support::conformance::{Harness, Misbehaviour, RunningAgent, WireHarness};
use test_support::{conformance_tests, wire_conformance_tests};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use transport_grpc::{GrpcAgentServer, GrpcConnector, GrpcServerConfig};

struct Grpc;

fn addr_of(endpoint: &Endpoint) -> SocketAddr {
    endpoint.as_str().strip_prefix("grpc://").expect("a grpc endpoint").parse().expect("ip:port")
}

async fn serve_on<H: AgentHandler>(addr: SocketAddr, handler: H) -> RunningAgent {
    // A killed agent's listener closes when its task is dropped, a moment after the abort.
    let mut tries = 0;
    let server = loop {
        match GrpcAgentServer::bind_tcp(addr, GrpcServerConfig::default()).await {
            Ok(server) => break server,
            Err(e) if tries < 100 => {
                tries += 1;
                tracing_sleep(&e).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let endpoint = server.endpoint();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(handler, async move {
        let _ = stopped.await;
    }));
    RunningAgent::new(endpoint, move || {
        task.abort();
        drop(stop);
    })
}

async fn tracing_sleep(e: &transport_grpc::GrpcServeError) {
    eprintln!("bind failed ({e}); retrying");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

/// An agent that accepts every call and never answers it.
struct Silent;

#[tonic::async_trait]
impl transport_grpc::wire::agent_protocol_server::AgentProtocol for Silent {
    type ConnectStream = futures_util::stream::Pending<Result<proto::AgentFrame, tonic::Status>>;

    async fn connect(
        &self,
        _request: tonic::Request<tonic::Streaming<proto::ProxyFrame>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        std::future::pending().await
    }
}

impl Harness for Grpc {
    fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(GrpcConnector::default())
    }

    async fn serve<H: AgentHandler>(&self, handler: H) -> RunningAgent {
        serve_on(([127, 0, 0, 1], 0).into(), handler).await
    }

    async fn serve_at<H: AgentHandler>(&self, endpoint: &Endpoint, handler: H) -> RunningAgent {
        serve_on(addr_of(endpoint), handler).await
    }

    async fn silent(&self) -> RunningAgent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = Endpoint::new(format!("grpc://{}", listener.local_addr().expect("addr")));
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(transport_grpc::wire::agent_protocol_server::AgentProtocolServer::new(Silent))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        RunningAgent::new(endpoint, move || task.abort())
    }
}

/// A gRPC message: the 5-byte prefix (not compressed, big-endian length), then the bytes.
fn grpc_message(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What a misbehaving agent sends on the response stream after the handshake.
fn broken_bytes(how: Misbehaviour) -> Vec<u8> {
    match how {
        Misbehaviour::Garbage => grpc_message(&[0xff, 0xff, 0xff, 0xff]),
        // Announces 4 GiB - 1, over any limit.
        Misbehaviour::Oversized => [&[0u8][..], &u32::MAX.to_be_bytes()].concat(),
        // Announces 100 bytes, sends 10, then the stream ends.
        Misbehaviour::Truncated => {
            [&[0u8][..], &100u32.to_be_bytes(), &[0x08, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]].concat()
        }
        // Stream id 1, then field 15, which AgentFrame does not have: a frame with no body.
        Misbehaviour::UnknownMessage => grpc_message(&[0x08, 0x01, 0x7a, 0x00]),
    }
}

/// Serves one raw HTTP/2 request: answers the hello with capabilities, then the first request
/// with `how`'s bytes.
async fn misbehave(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    how: Misbehaviour,
) {
    let mut body = request.into_body();
    let response =
        http::Response::builder().header("content-type", "application/grpc").body(()).expect("response head");
    let Ok(mut send) = respond.send_response(response, false) else { return };
    let mut received = 0usize;
    let mut answered = false;
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        received += chunk.len();
        if !answered {
            // The hello: answer with capabilities.
            answered = true;
            let capabilities: proto::Capabilities =
                Capabilities::new("rogue").with_events(EventKind::ALL).into();
            let frame =
                proto::AgentFrame { stream_id: 0, body: Some(agent_frame::Body::Capabilities(capabilities)) };
            if send.send_data(grpc_message(&frame.encode_to_vec()).into(), false).is_err() {
                return;
            }
            continue;
        }
        // The first request.
        let _ = received;
        let end = how == Misbehaviour::Truncated;
        let _ = send.send_data(broken_bytes(how).into(), end);
        break;
    }
    std::future::pending::<()>().await;
}

impl WireHarness for Grpc {
    async fn misbehaving(&self, how: Misbehaviour) -> RunningAgent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = Endpoint::new(format!("grpc://{}", listener.local_addr().expect("addr")));
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                connections.spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(tcp).await else { return };
                    let mut calls = tokio::task::JoinSet::new();
                    while let Some(Ok((request, respond))) = connection.accept().await {
                        calls.spawn(misbehave(request, respond, how));
                    }
                });
            }
        });
        RunningAgent::new(endpoint, move || task.abort())
    }
}

conformance_tests!(Grpc);
wire_conformance_tests!(Grpc);
