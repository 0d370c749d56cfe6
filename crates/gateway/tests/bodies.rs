//! Request bodies through an agent that takes them (transport-uds's agent side in this test
//! process, on a real socket): chunk by chunk, with refusals, mutations and the size limit.

use std::convert::Infallible;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pool_api::{AgentError, AgentHandler, BodyMutation, Capabilities, Decision, Event, EventKind};
use tokio::net::TcpListener;
use transport_uds::{UdsServer, UdsServerConfig};

mod common;
use common::free_port;

const LIMIT: u64 = 1000;

/// Refuses a body chunk holding `evil`, masks `secret`, accepts at most 1000 bytes.
struct BodyWaf;

impl AgentHandler for BodyWaf {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("body-waf")
            .with_events([EventKind::RequestHeaders, EventKind::RequestBody])
            .with_max_body_size(LIMIT)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let Event::RequestBody(chunk) = event else { return Ok(Decision::allow()) };
        let text = String::from_utf8_lossy(&chunk.data).into_owned();
        Ok(if text.contains("evil") {
            Decision::block(StatusCode::FORBIDDEN)
        } else if text.contains("secret") {
            let data = Bytes::from(text.replace("secret", "******"));
            Decision::allow().with_body(BodyMutation::Replace { chunk_index: chunk.index, data })
        } else {
            Decision::allow()
        })
    }
}

/// An upstream that answers with the body it received.
async fn echo_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        Ok::<_, Infallible>(http::Response::new(Full::new(body)))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Sends raw request bytes; returns (status, body).
async fn send(addr: &str, request: &[u8]) -> (u16, String) {
    let reply = common::exchange(addr, request).await;
    (reply.status, reply.text())
}

fn post(body: &str) -> Vec<u8> {
    format!(
        "POST /submit HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A chunked POST of `chunks`.
fn chunked(chunks: &[&str]) -> Vec<u8> {
    let mut out =
        b"POST /submit HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for c in chunks {
        out.extend(format!("{:x}\r\n{c}\r\n", c.len()).into_bytes());
    }
    out.extend(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn bodies_are_inspected_chunk_by_chunk_refused_masked_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("body.sock");
    let server = UdsServer::bind(&socket, UdsServerConfig::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(server.serve(BodyWaf, async move {
        let _ = stopped.await;
    }));
    let app = echo_upstream().await;
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
         [[agents]]\nname = \"waf\"\nendpoints = [\"unix:{}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"waf\"]\n",
        socket.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let _gateway = common::run_file(&path, &admin).await;

    assert_eq!(send(&listen, &post("hello world")).await, (200, "hello world".into()));
    assert_eq!(send(&listen, &chunked(&["one ", "two ", "three"])).await, (200, "one two three".into()));
    assert_eq!(
        send(&listen, &post("my secret plan")).await,
        (200, "my ****** plan".into()),
        "a chunk replaced"
    );
    assert_eq!(send(&listen, &chunked(&["fine, ", "then evil"])).await.0, 403, "refused on its second chunk");
    let big = "x".repeat(LIMIT as usize + 1);
    assert_eq!(send(&listen, &post(&big)).await.0, 413, "content-length over the limit");
    let half = "y".repeat(LIMIT as usize / 2 + 1);
    assert_eq!(send(&listen, &chunked(&[&half, &half])).await.0, 413, "the running total over the limit");
    assert_eq!(send(&listen, &post("still fine")).await, (200, "still fine".into()));

    let _ = stop.send(());
    let _ = agent.await;
}
