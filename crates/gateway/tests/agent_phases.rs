//! An agent (transport-uds's agent side, in this test process, on a real socket) that takes
//! the request's headers, the response's headers and the completion: the gateway sends each at
//! its moment and applies what comes back.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use parking_lot::Mutex;
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, HeaderOp};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use transport_uds::{UdsServer, UdsServerConfig};

mod common;
use common::free_port;

#[derive(Clone, Default)]
struct Phases {
    deny: Arc<Mutex<HashSet<String>>>,
    completed: Arc<AtomicUsize>,
}

fn set(name: &'static str, value: &'static str) -> HeaderOp {
    HeaderOp::Set { name: HeaderName::from_static(name), value: HeaderValue::from_static(value) }
}

impl AgentHandler for Phases {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("phases").with_events([
            EventKind::RequestHeaders,
            EventKind::ResponseHeaders,
            EventKind::RequestComplete,
        ])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(match event {
            Event::RequestHeaders(h) => {
                if h.uri.path().starts_with("/deny-response") {
                    self.deny.lock().insert(h.correlation_id.to_string());
                }
                Decision::allow().with_response_header(set("x-phase-request", "seen"))
            }
            Event::ResponseHeaders(r) if self.deny.lock().remove(r.correlation_id.as_str()) => {
                Decision::block(StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS)
            }
            Event::ResponseHeaders(r) => {
                let seen = if r.status == StatusCode::OK { "200" } else { "other" };
                Decision::allow().with_response_header(HeaderOp::Set {
                    name: HeaderName::from_static("x-phase-response"),
                    value: HeaderValue::from_static(seen),
                })
            }
            Event::RequestComplete(_) => {
                self.completed.fetch_add(1, Ordering::SeqCst);
                Decision::allow()
            }
            _ => Decision::allow(),
        })
    }
}

async fn get(addr: &str, target: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

async fn upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut reader = BufReader::new(&mut stream);
                let mut line = String::new();
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn request_response_and_completion_reach_the_agent_and_its_answers_apply() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("phases.sock");
    let phases = Phases::default();
    let server = UdsServer::bind(&socket, UdsServerConfig::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(server.serve(phases.clone(), async move {
        let _ = stopped.await;
    }));
    let app = upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
         [[agents]]\nname = \"phases\"\nendpoints = [\"unix:{}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"phases\"]\n",
        socket.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let _gateway = common::run_file(&path, &admin).await;

    let (status, text) = get(&listen, "/page").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("x-phase-request: seen"), "the request decision's response header: {text}");
    assert!(text.contains("x-phase-response: 200"), "the response decision's header: {text}");
    let (status, text) = get(&listen, "/deny-response/x").await;
    assert_eq!(status, 451, "the agent replaced the upstream's response: {text}");

    // Completion is sent after the response; it arrives shortly after.
    for _ in 0..100 {
        if phases.completed.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(phases.completed.load(Ordering::SeqCst), 2, "one RequestComplete per request");
    let _ = stop.send(());
    let _ = agent.await;
}
