//! An agent over gRPC (transport-grpc's agent side, in this test process, on a real Unix
//! socket) consulted by the gateway through pool-core and transport-grpc's connector.

use http::StatusCode;
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use transport_grpc::{GrpcAgentServer, GrpcServerConfig};

mod common;
use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

struct DenyAdmin;

impl AgentHandler for DenyAdmin {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("deny-admin").with_events([EventKind::RequestHeaders])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(match event {
            Event::RequestHeaders(h) if h.uri.path().starts_with("/admin") => {
                Decision::block(StatusCode::FORBIDDEN)
            }
            _ => Decision::allow(),
        })
    }
}

async fn get(addr: &str, target: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr).await else { return 0 };
    let _ = stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    String::from_utf8_lossy(&raw).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_grpc_agent_decides_on_the_gateway_s_requests() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let server = GrpcAgentServer::bind_unix(&socket, GrpcServerConfig::default()).await.unwrap();
    let endpoint = server.endpoint().to_string();
    assert!(endpoint.starts_with("grpc+unix:"), "{endpoint}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(server.serve(DenyAdmin, async move {
        let _ = stopped.await;
    }));
    let app = common::ok_upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
         [[agents]]\nname = \"waf\"\nendpoints = [\"{endpoint}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"waf\"]\n"
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let _gateway = common::run_file(&path, &admin).await;
    assert_eq!(get(&listen, "/page").await, 200);
    assert_eq!(get(&listen, "/admin/x").await, 403);
    let _ = stop.send(());
    let _ = agent.await;
}

#[tokio::test]
async fn an_agent_mixing_unix_and_grpc_endpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:1\"\n\n[[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:2\"]\n\n\
         [[agents]]\nname = \"waf\"\nendpoints = [\"unix:/run/waf.sock\", \"grpc://127.0.0.1:9\"]\n\n\
         [[routes]]\nname = \"r\"\nupstream = \"app\"\nagents = [\"waf\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("--check").arg("--config").arg(&path).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agents[0] (waf).endpoints: all over Unix sockets or all over gRPC, not both"),
        "{err}"
    );
}
