//! A real WebSocket through the gateway (tokio-tungstenite on both ends, an echo upstream) with
//! an agent that takes frames (transport-uds's agent side, in this test process): frames of
//! both directions reach it, a frame it refuses closes the connection with 1008, an oversized
//! one with 1009, and the connection's sticky session is gone once it ends.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use pool_api::{
    AgentError, AgentHandler, BodyMutation, Capabilities, Decision, Event, EventKind, WebSocketFrame,
    WebSocketOpcode,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

mod common;

const MAX_FRAME: usize = 1024;

/// Records every frame; refuses one holding `forbidden`, masks `secret`.
#[derive(Clone, Default)]
struct FrameAgent {
    frames: Arc<Mutex<Vec<WebSocketFrame>>>,
}

impl AgentHandler for FrameAgent {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("frames").with_events([EventKind::RequestHeaders, EventKind::WebSocketFrame])
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        let Event::WebSocketFrame(frame) = event else { return Ok(Decision::allow()) };
        self.frames.lock().push(frame.clone());
        let text = String::from_utf8_lossy(&frame.payload).into_owned();
        Ok(if text.contains("forbidden") {
            Decision::block(http::StatusCode::FORBIDDEN)
        } else if text.contains("secret") {
            let data = Bytes::from(text.replace("secret", "******"));
            let chunk_index = u32::try_from(frame.index).unwrap();
            Decision::allow().with_body(BodyMutation::Replace { chunk_index, data })
        } else {
            Decision::allow()
        })
    }
}

/// A WebSocket upstream that answers every text message with `echo:` and the message.
async fn echo_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = message
                        && ws.send(Message::text(format!("echo:{}", text.as_str()))).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Client = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(listen: &str) -> Client {
    let stream = TcpStream::connect(listen).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{listen}/ws"), stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The next message that is not a ping or pong.
async fn next(ws: &mut Client) -> Option<Message> {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await.ok()?? {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(message) => return Some(message),
            Err(_) => return None,
        }
    }
}

async fn close_code(ws: &mut Client) -> Option<u16> {
    match next(ws).await? {
        Message::Close(Some(frame)) => Some(u16::from(frame.code)),
        _ => None,
    }
}

async fn sticky_sessions(admin: &str) -> u64 {
    common::status(admin).await["sticky_sessions"].as_u64().unwrap()
}

#[tokio::test]
async fn websocket_frames_go_through_the_agent_both_ways_and_refusals_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FrameAgent::default();
    let served = common::uds_agent(dir.path(), "frames", agent.clone()).await;
    let app = echo_upstream().await;
    let gateway = common::start_gateway(
        dir.path(),
        &format!(
            "[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[agents]]\nname = \"frames\"\nendpoints = [\"{}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"frames\"]\nmax_websocket_frame = {MAX_FRAME}\n",
            served.endpoint
        ),
    )
    .await;
    let (listen, admin) = (gateway.listen.as_str(), gateway.admin.as_str());

    // Both directions reach the agent; a mutation changes what the upstream gets.
    let mut ws = connect(listen).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("echo:hello")));
    ws.send(Message::text("my secret")).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("echo:my ******")));
    assert_eq!(sticky_sessions(admin).await, 1, "one sticky session for the open connection");
    let seen: Vec<(bool, u64, WebSocketOpcode, bool, String)> = agent
        .frames
        .lock()
        .iter()
        .map(|f| {
            (f.client_to_server, f.index, f.opcode, f.fin, String::from_utf8_lossy(&f.payload).into_owned())
        })
        .collect();
    let text = WebSocketOpcode::Text;
    assert_eq!(
        seen,
        [
            (true, 0, text, true, "hello".to_owned()),
            (false, 0, text, true, "echo:hello".to_owned()),
            (true, 1, text, true, "my secret".to_owned()),
            (false, 1, text, true, "echo:my ******".to_owned()),
        ]
    );
    // A clean close goes through to the upstream and back.
    ws.close(None).await.unwrap();
    assert!(matches!(next(&mut ws).await, Some(Message::Close(_)) | None));

    // A frame the agent refuses: close 1008, and the upstream never echoes it.
    let mut ws = connect(listen).await;
    ws.send(Message::text("something forbidden")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(u16::from(CloseCode::Policy)));

    // A frame over the route's max_websocket_frame: close 1009 (the agent never sees it).
    let before = agent.frames.lock().len();
    let mut ws = connect(listen).await;
    ws.send(Message::binary(vec![7u8; MAX_FRAME + 1])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(u16::from(CloseCode::Size)));
    assert_eq!(agent.frames.lock().len(), before);

    common::eventually("the sticky sessions are gone", async || sticky_sessions(admin).await == 0).await;
    assert!(common::metric(admin, "gateway_websocket_closed_total{").await.is_some());
}
