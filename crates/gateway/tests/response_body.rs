//! Response bodies through an agent that takes them (transport-uds's agent side in this test
//! process, on a real socket): chunks in order with the right `last` flag, a chunk replaced, a
//! body over the agent's limit passed on untouched, a refused chunk aborting the response, and
//! a client that goes away cancelling the agent's pending decision.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use pool_api::{AgentError, AgentHandler, BodyChunk, BodyMutation, Capabilities, Decision, Event, EventKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;
use common::{exchange, get, metric};

const LIMIT: u64 = 4096;

/// Records every response chunk by the request's path; refuses a chunk holding `STOP`, masks
/// `secret`, never answers on one holding `HANG` nor on the headers of `/hang-headers`
/// (counting those calls dropped).
#[derive(Clone, Default)]
struct Recorder {
    paths: Arc<Mutex<HashMap<String, String>>>,
    chunks: Arc<Mutex<HashMap<String, Vec<BodyChunk>>>>,
    dropped: Arc<AtomicUsize>,
}

/// Counts a pending decision dropped (its request cancelled).
struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn chunks_of(&self, path: &str) -> Vec<BodyChunk> {
        self.chunks.lock().get(path).cloned().unwrap_or_default()
    }
}

impl AgentHandler for Recorder {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("recorder")
            .with_events([EventKind::RequestHeaders, EventKind::ResponseBody, EventKind::RequestComplete])
            .with_max_body_size(LIMIT)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        match event {
            Event::RequestHeaders(h) => {
                self.paths.lock().insert(h.correlation_id.to_string(), h.uri.path().to_owned());
                if h.uri.path() == "/hang-headers" {
                    let _counted = CountDrop(self.dropped.clone());
                    std::future::pending::<()>().await;
                }
            }
            Event::ResponseBody(chunk) => {
                let path = self.paths.lock().get(chunk.correlation_id.as_str()).cloned().unwrap_or_default();
                self.chunks.lock().entry(path).or_default().push(chunk.clone());
                let text = String::from_utf8_lossy(&chunk.data).into_owned();
                if text.contains("HANG") {
                    let _counted = CountDrop(self.dropped.clone());
                    std::future::pending::<()>().await;
                }
                if text.contains("STOP") {
                    return Ok(Decision::block(http::StatusCode::FORBIDDEN));
                }
                if text.contains("secret") {
                    let data = Bytes::from(text.replace("secret", "******"));
                    return Ok(
                        Decision::allow().with_body(BodyMutation::Replace { chunk_index: chunk.index, data })
                    );
                }
            }
            _ => {}
        }
        Ok(Decision::allow())
    }
}

/// An upstream whose answer depends on the path: `/cl` (content-length, three writes),
/// `/chunked` (three chunks), `/secret`, `/big` (over the agent's limit), `/stop` (a chunk the
/// agent refuses, between two others).
async fn upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&head).split(' ').nth(1).unwrap_or("/").to_owned();
                let chunked = |parts: &[&str]| {
                    let mut writes = vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
                    writes.extend(parts.iter().map(|p| format!("{:x}\r\n{p}\r\n", p.len()).into_bytes()));
                    writes.push(b"0\r\n\r\n".to_vec());
                    writes
                };
                let sized = |parts: &[&str]| {
                    let len: usize = parts.iter().map(|p| p.len()).sum();
                    let mut writes =
                        vec![format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes()];
                    writes.extend(parts.iter().map(|p| p.as_bytes().to_vec()));
                    writes
                };
                let big = "z".repeat(LIMIT as usize * 2);
                let writes = match path.as_str() {
                    "/cl" => sized(&["alpha ", "beta ", "gamma"]),
                    "/chunked" => chunked(&["one ", "two ", "three"]),
                    "/secret" => sized(&["my secret data"]),
                    "/big" => sized(&[&big]),
                    "/hang" => chunked(&["HANG on"]),
                    _ => chunked(&["hello ", "STOP here", "never sent"]),
                };
                for w in writes {
                    if stream.write_all(&w).await.is_err() {
                        return;
                    }
                    let _ = stream.flush().await;
                }
            });
        }
    });
    addr
}

/// The chunks' bytes in order; panics unless the indexes count from 0 and only the final one is
/// marked last.
fn assert_in_order(chunks: &[BodyChunk]) -> String {
    assert!(!chunks.is_empty());
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.index as usize, i, "{chunks:?}");
        assert_eq!(c.last, i + 1 == chunks.len(), "only the final chunk is last: {chunks:?}");
    }
    chunks.iter().map(|c| String::from_utf8_lossy(&c.data).into_owned()).collect()
}

/// The recorder on a Unix socket, the upstream, and a gateway with one route through them.
async fn setup(dir: &std::path::Path, recorder: &Recorder) -> (common::UdsAgent, common::Gateway) {
    let agent = common::uds_agent(dir, "recorder", recorder.clone()).await;
    let app = upstream().await;
    let gateway = common::start_gateway(
        dir,
        &format!(
            "[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[agents]]\nname = \"recorder\"\nendpoints = [\"{}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"recorder\"]\n\n\
             [pool]\nrequest_timeout = \"60s\"\n",
            agent.endpoint
        ),
    )
    .await;
    (agent, gateway)
}

#[tokio::test]
async fn response_chunks_reach_the_agent_in_order_and_a_refused_chunk_aborts_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::default();
    let (_agent, gateway) = setup(dir.path(), &recorder).await;
    let listen = gateway.listen.as_str();

    // A content-length body: its final chunk is marked last.
    let reply = exchange(listen, &get("/cl")).await;
    assert_eq!((reply.status, reply.text().as_str(), reply.complete), (200, "alpha beta gamma", true));
    let chunks = recorder.chunks_of("/cl");
    assert_eq!(assert_in_order(&chunks), "alpha beta gamma");
    assert!(chunks.iter().all(|c| !c.data.is_empty() && c.total_size == Some(16)), "{chunks:?}");

    // A chunked body: the end is learned after the last data, so an empty chunk is marked last.
    let reply = exchange(listen, &get("/chunked")).await;
    assert_eq!((reply.status, reply.text().as_str(), reply.complete), (200, "one two three", true));
    let chunks = recorder.chunks_of("/chunked");
    assert_eq!(assert_in_order(&chunks), "one two three");
    assert!(chunks.last().is_some_and(|c| c.data.is_empty() && c.total_size.is_none()), "{chunks:?}");

    // A chunk replaced; the length changed, so no content-length goes to the client.
    let reply = exchange(listen, &get("/secret")).await;
    assert_eq!((reply.status, reply.text().as_str(), reply.complete), (200, "my ****** data", true));
    assert!(!reply.head.contains("content-length"), "{}", reply.head);

    // Over the agent's max_body_size: the agent sees none of it, the client gets all of it.
    let reply = exchange(listen, &get("/big")).await;
    assert_eq!((reply.status, reply.body.len(), reply.complete), (200, LIMIT as usize * 2, true));
    assert!(recorder.chunks_of("/big").is_empty());
    assert!(
        metric(&gateway.admin, "gateway_response_body_uninspected_total").await.is_some_and(|n| n >= 1.0)
    );

    // A refused chunk: the headers are gone already, so the response is cut off.
    let reply = exchange(listen, &get("/stop")).await;
    assert_eq!(reply.status, 200);
    assert!(!reply.complete, "the response must be cut off");
    assert!(!reply.text().contains("STOP") && !reply.text().contains("never"), "{}", reply.text());
    assert!(recorder.chunks_of("/stop").iter().any(|c| String::from_utf8_lossy(&c.data).contains("STOP")));
    common::eventually("the abort is counted", async || {
        metric(&gateway.admin, "gateway_response_aborted_total").await == Some(1.0)
    })
    .await;

    // The gateway still serves afterwards.
    assert_eq!(exchange(listen, &get("/cl")).await.text(), "alpha beta gamma");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_agent_s_pending_decision_on_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::default();
    let (_agent, gateway) = setup(dir.path(), &recorder).await;
    let mut client = tokio::net::TcpStream::connect(&gateway.listen).await.unwrap();
    client.write_all(&get("/hang")).await.unwrap();
    common::eventually("the agent has the chunk", async || !recorder.chunks_of("/hang").is_empty()).await;
    assert_eq!(recorder.dropped.load(Ordering::SeqCst), 0);
    drop(client);
    // Well before the pool's 60 s request time-out.
    common::eventually("the agent's pending decision is cancelled", async || {
        recorder.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn a_client_that_goes_away_while_an_agent_decides_on_its_headers_cancels_that_decision() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::default();
    let (_agent, gateway) = setup(dir.path(), &recorder).await;
    let mut client = tokio::net::TcpStream::connect(&gateway.listen).await.unwrap();
    client.write_all(&get("/hang-headers")).await.unwrap();
    common::eventually("the agent has the headers", async || {
        recorder.paths.lock().values().any(|p| p == "/hang-headers")
    })
    .await;
    assert_eq!(recorder.dropped.load(Ordering::SeqCst), 0);
    drop(client);
    // Well before the pool's 60 s request time-out: the gateway drops its pending call, and the
    // transport tells the agent, which aborts the handler.
    common::eventually("the agent's pending decision is cancelled", async || {
        recorder.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    // The gateway still serves afterwards.
    assert_eq!(exchange(&gateway.listen, &get("/cl")).await.text(), "alpha beta gamma");
}
