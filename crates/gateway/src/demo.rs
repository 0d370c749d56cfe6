//! What the gateway starts when it runs without a configuration file: an upstream that echoes
//! what it was asked, and a WAF agent served twice: on a Unix socket in a temporary directory by
//! transport-uds's agent side, and over gRPC (h2c on a free loopback port) by transport-grpc's. Both are real servers on real sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pool_api::{Action, AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, HeaderOp};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use transport_grpc::{GrpcAgentServer, GrpcServerConfig};
use transport_uds::{UdsServer, UdsServerConfig};

/// The demo WAF: blocks `/admin` and everything under it, and requests whose URI carries
/// `<script`; everything else is allowed and marked `x-waf: checked` on the response.
pub(crate) struct DemoWaf;

impl AgentHandler for DemoWaf {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("demo-waf").with_events([EventKind::RequestHeaders])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let Event::RequestHeaders(h) = &event else { return Ok(Decision::allow()) };
        let path = h.uri.path();
        let uri = h.uri.to_string().to_ascii_lowercase();
        if path == "/admin" || path.starts_with("/admin/") {
            return Ok(blocked("admin is off limits", "admin"));
        }
        if uri.contains("<script") || uri.contains("%3cscript") {
            return Ok(blocked("script injection", "xss"));
        }
        Ok(Decision::allow().with_response_header(HeaderOp::Set {
            name: http::HeaderName::from_static("x-waf"),
            value: http::HeaderValue::from_static("checked"),
        }))
    }
}

/// A 403 whose body says why.
fn blocked(reason: &'static str, rule: &'static str) -> Decision {
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    let body = Bytes::from(format!("blocked by the demo WAF: {reason}\n"));
    Decision { action: Action::Block { status: StatusCode::FORBIDDEN, headers, body }, ..Decision::allow() }
        .with_reason(reason)
        .with_rule(rule)
}

/// The demo pieces, running until dropped (or [`Demo::stop`]).
pub(crate) struct Demo {
    /// The demo upstream's address.
    pub upstream: SocketAddr,
    /// The demo agent's socket.
    pub agent_socket: PathBuf,
    /// The same agent served over gRPC (h2c on a free loopback port).
    pub grpc_endpoint: String,
    _dir: tempfile::TempDir,
    stop_agent: Option<(oneshot::Sender<()>, oneshot::Sender<()>)>,
    agent: tokio::task::JoinHandle<()>,
    upstream_task: tokio::task::JoinHandle<()>,
}

impl Demo {
    /// Starts the demo upstream on a free loopback port and the demo WAF agent on a temporary
    /// socket.
    pub(crate) async fn start() -> std::io::Result<Demo> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = listener.local_addr()?;
        let upstream_task = tokio::spawn(serve_upstream(listener));
        let dir = tempfile::Builder::new().prefix("agentpool-gateway-").tempdir()?;
        let agent_socket = dir.path().join("waf.sock");
        let server = UdsServer::bind(&agent_socket, UdsServerConfig::default())
            .await
            .map_err(std::io::Error::other)?;
        let (stop_agent, stopped) = oneshot::channel::<()>();
        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let grpc = GrpcAgentServer::bind_tcp(([127, 0, 0, 1], 0).into(), GrpcServerConfig::default())
            .await
            .map_err(std::io::Error::other)?;
        let grpc_endpoint = grpc.endpoint().to_string();
        let agent = tokio::spawn(async move {
            let uds = server.serve(DemoWaf, async move {
                let _ = stopped.await;
            });
            let grpc = grpc.serve(DemoWaf, async move {
                let _ = grpc_stopped.await;
            });
            let _ = tokio::join!(uds, grpc);
        });
        Ok(Demo {
            upstream,
            agent_socket,
            grpc_endpoint,
            _dir: dir,
            stop_agent: Some((stop_agent, stop_grpc)),
            agent,
            upstream_task,
        })
    }

    /// Stops the agent (draining what it is doing) and the upstream.
    pub(crate) async fn stop(mut self) {
        if let Some((uds, grpc)) = self.stop_agent.take() {
            let _ = uds.send(());
            let _ = grpc.send(());
        }
        let _ = (&mut self.agent).await;
        self.upstream_task.abort();
    }
}

async fn serve_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(echo);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!("hello from the demo upstream: {} {}\n", req.method(), req.uri());
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}
