//! WebSocket frames through the agents that take them (RFC 6455).
//!
//! When an agent of the route takes `WebSocketFrame` events, an upgraded WebSocket is not
//! spliced raw: the gateway reads the frames of both directions, shows each to those agents
//! (each agent through a pool-core sticky session of its own, keyed by the connection, so all
//! of a connection's frames go to one agent connection), and forwards it as they decide. Frames
//! are relayed one for one — fragmentation, pings, pongs and closes included; the gateway never
//! reassembles messages nor answers pings itself. Client frames stay masked with the client's
//! own key on their way to the upstream; upstream frames go to the client unmasked.
//!
//! What the gateway does with each part of an agent's decision on a frame:
//!
//! * `Allow` — the frame goes on. On a data frame (text, binary, continuation) a
//!   [`BodyMutation`] whose `chunk_index` is the frame's index replaces its payload (`Replace`;
//!   the agent answers for a text payload staying UTF-8) or forwards nothing (`Drop`); on a
//!   control frame mutations are ignored.
//! * `Block`, `Redirect`, `Challenge` — the gateway sends a close frame with code 1008 (policy
//!   violation) to both sides and ends both connections.
//! * Header changes and `needs_more` — nothing they could apply to: ignored.
//!
//! The gateway also closes both sides itself, with a close frame, when: a frame is larger than
//! the route's `max_websocket_frame` or the smallest `max_body_size` of the frame agents (1009,
//! as soon as its header says so: such a frame is never buffered); a frame breaks the protocol
//! — reserved bits set, an unknown opcode, a fragmented or long control frame, an unmasked
//! client frame or a masked upstream frame (1002); an agent cannot answer on a `closed` route,
//! or no sticky session can be made on it (1011; on an `open` route that agent is left out for
//! the rest of the connection). `gateway_websocket_closed_total{route,code}` counts these. The
//! offer of extensions (`Sec-WebSocket-Extensions`) is removed from the upgrade request, since
//! the frames are read: no compression is negotiated.
//!
//! The agents are asked one frame at a time, whichever direction it came from; the sticky
//! sessions are removed when the connection ends, however it ends.

use std::hash::{BuildHasher, Hasher};

use bytes::{Buf, Bytes, BytesMut};
use pool_api::{Action, BodyMutation, Event, WebSocketFrame, WebSocketOpcode};
use pool_core::{AgentPool, FailureMode, PoolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Close code: protocol error.
const PROTOCOL_ERROR: u16 = 1002;
/// Close code: policy violation (an agent refused a frame).
const POLICY: u16 = 1008;
/// Close code: a message (here, a frame) too big to process.
const TOO_BIG: u16 = 1009;
/// Close code: the gateway could not go on (an agent unavailable on a fail-closed route).
const INTERNAL: u16 = 1011;

/// Default of a route's `max_websocket_frame`: 1 MiB.
pub(crate) const DEFAULT_MAX_FRAME: u64 = 1 << 20;

/// One frame, its payload unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Ends a message.
    pub(crate) fin: bool,
    /// The opcode (4 bits).
    pub(crate) opcode: u8,
    /// The key it was masked with, if it was.
    pub(crate) mask: Option<[u8; 4]>,
    /// The payload, unmasked.
    pub(crate) payload: Bytes,
}

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// A frame longer than allowed (its header says so).
    #[error("a frame of {size} bytes is over the limit of {limit}")]
    TooBig {
        /// The payload size announced.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A frame that breaks RFC 6455.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl FrameError {
    pub(crate) fn code(&self) -> u16 {
        match self {
            Self::TooBig { .. } => TOO_BIG,
            Self::Protocol(_) => PROTOCOL_ERROR,
        }
    }
}

/// Room reserved for the rest of a frame that has not fully arrived, beyond the bytes already
/// read: 64 KiB.
const RESERVE_AHEAD: usize = 64 * 1024;

/// Parses one frame off the front of `buf`: `None` until it is all there. A frame over `max`
/// is refused as soon as its header is in, before its payload is read.
pub(crate) fn parse(buf: &mut BytesMut, max: u64) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let (fin, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x0f, b1 & 0x80 != 0);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set without an extension"));
    }
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xa) {
        return Err(FrameError::Protocol("unknown opcode"));
    }
    let (size, mut at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[2..10]);
            let size = u64::from_be_bytes(raw);
            if size >> 63 != 0 {
                return Err(FrameError::Protocol("a 64-bit length with its top bit set"));
            }
            (size, 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if opcode >= 0x8 && (size > 125 || !fin) {
        return Err(FrameError::Protocol("a control frame fragmented or over 125 bytes"));
    }
    if size > max {
        return Err(FrameError::TooBig { size, limit: max });
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let key = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(key)
    } else {
        None
    };
    let size =
        usize::try_from(size).map_err(|_| FrameError::Protocol("a frame too long for this machine"))?;
    if buf.len() < at + size {
        // Room for the rest as it arrives, at most `RESERVE_AHEAD` beyond what has: a peer
        // announcing a frame within a large configured limit and sending little of it costs
        // little (the limit is a `u64`: reserving it whole could exceed the address space).
        buf.reserve((at + size - buf.len()).min(RESERVE_AHEAD));
        return Ok(None);
    }
    buf.advance(at);
    let mut payload = buf.split_to(size);
    if let Some(key) = mask {
        apply_mask(&mut payload, key);
    }
    Ok(Some(Frame { fin, opcode, mask, payload: payload.freeze() }))
}

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Encodes a frame; masked with `mask` when given.
pub(crate) fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(bit | n as u8),
        n @ 126..=0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    let body = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[body..], key);
    }
    out
}

/// A close frame's payload: the code and a reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    // A control frame's payload is at most 125 bytes.
    payload.extend(reason.bytes().take(123));
    payload
}

/// A fresh masking key for a frame the gateway itself sends to the upstream.
fn mask_key() -> [u8; 4] {
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits as u32).to_le_bytes()
}

fn opcode_of(opcode: u8) -> WebSocketOpcode {
    match opcode {
        0x0 => WebSocketOpcode::Continuation,
        0x1 => WebSocketOpcode::Text,
        0x2 => WebSocketOpcode::Binary,
        0x8 => WebSocketOpcode::Close,
        0x9 => WebSocketOpcode::Ping,
        _ => WebSocketOpcode::Pong,
    }
}

/// What a connection's frame inspection needs.
pub(crate) struct FrameWatch {
    /// The pool.
    pub(crate) pool: AgentPool,
    /// The agents that take frames, in the route's order.
    pub(crate) agents: Vec<String>,
    /// The correlation id of the upgraded request.
    pub(crate) id: String,
    /// The route's name.
    pub(crate) route: String,
    /// The route's failure mode.
    pub(crate) failure_mode: FailureMode,
    /// The largest frame let through.
    pub(crate) max_frame: u64,
}

/// The sticky sessions of one connection, removed when it ends.
struct Sessions {
    pool: AgentPool,
    /// (agent, session id) of the agents still asked.
    live: Vec<(String, String)>,
}

impl Drop for Sessions {
    fn drop(&mut self) {
        let sticky = self.pool.sticky_sessions();
        for (_, session) in &self.live {
            sticky.remove(session);
        }
    }
}

/// What becomes of one frame.
enum Verdict {
    /// Forward this payload.
    Forward(Bytes),
    /// Forward nothing.
    Drop,
    /// Close both sides with this code and reason.
    Close(u16, &'static str),
}

impl FrameWatch {
    /// The effective frame limit: the route's, or less when an agent takes less.
    pub(crate) fn limited(mut self) -> Self {
        for agent in &self.agents {
            if let Some(limit) = self.pool.capabilities(agent).and_then(|c| c.max_body_size) {
                self.max_frame = self.max_frame.min(limit);
            }
        }
        self
    }

    /// Relays frames between the upgraded `client` and `upstream` connections until both
    /// directions are closed, or the gateway closes them.
    pub(crate) async fn relay<C, U>(self, client: C, upstream: U)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let (mut upstream_rd, mut upstream_wr) = tokio::io::split(upstream);
        let mut sessions = Sessions { pool: self.pool.clone(), live: Vec::new() };
        for agent in &self.agents {
            let session = format!("{}#{agent}", self.id);
            match self.pool.sticky_sessions().create(&session, agent) {
                Ok(()) => sessions.live.push((agent.clone(), session)),
                Err(e) => {
                    tracing::warn!(route = %self.route, agent = %agent, error = %e, "no sticky session for the websocket");
                    if self.failure_mode == FailureMode::Closed {
                        self.count_close(INTERNAL);
                        let (code, reason) = (INTERNAL, "an agent this route needs is unavailable");
                        close_both(&mut client_wr, &mut upstream_wr, code, reason).await;
                        return;
                    }
                }
            }
        }
        let (mut from_client, mut from_upstream) =
            (BytesMut::with_capacity(8192), BytesMut::with_capacity(8192));
        let (mut client_open, mut upstream_open) = (true, true);
        let mut index = [0u64; 2];
        while client_open || upstream_open {
            from_client.reserve(8192);
            from_upstream.reserve(8192);
            let client_side = tokio::select! {
                read = client_rd.read_buf(&mut from_client), if client_open => {
                    if !matches!(read, Ok(n) if n > 0) {
                        client_open = false;
                        let _ = upstream_wr.shutdown().await;
                        continue;
                    }
                    true
                }
                read = upstream_rd.read_buf(&mut from_upstream), if upstream_open => {
                    if !matches!(read, Ok(n) if n > 0) {
                        upstream_open = false;
                        let _ = client_wr.shutdown().await;
                        continue;
                    }
                    false
                }
            };
            loop {
                let buf = if client_side { &mut from_client } else { &mut from_upstream };
                let frame = match parse(buf, self.max_frame) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(route = %self.route, id = %self.id, client_side, error = %e, "websocket closed by the gateway");
                        self.count_close(e.code());
                        close_both(&mut client_wr, &mut upstream_wr, e.code(), "frame refused").await;
                        return;
                    }
                };
                if frame.mask.is_some() != client_side {
                    let e = FrameError::Protocol("client frames must be masked, upstream frames not");
                    tracing::info!(route = %self.route, id = %self.id, client_side, error = %e, "websocket closed by the gateway");
                    self.count_close(PROTOCOL_ERROR);
                    close_both(&mut client_wr, &mut upstream_wr, PROTOCOL_ERROR, "frame refused").await;
                    return;
                }
                let n = &mut index[usize::from(!client_side)];
                let verdict = self.ask(&mut sessions, &frame, client_side, *n).await;
                *n += 1;
                let payload = match verdict {
                    Verdict::Forward(payload) => payload,
                    Verdict::Drop => continue,
                    Verdict::Close(code, reason) => {
                        self.count_close(code);
                        close_both(&mut client_wr, &mut upstream_wr, code, reason).await;
                        return;
                    }
                };
                let written = if client_side {
                    upstream_wr.write_all(&encode(frame.fin, frame.opcode, &payload, frame.mask)).await
                } else {
                    client_wr.write_all(&encode(frame.fin, frame.opcode, &payload, None)).await
                };
                if written.is_err() {
                    // The other side is gone: nothing more can be relayed.
                    return;
                }
                if frame.opcode == 0x8 {
                    // A close went on: nothing more is read from its sender.
                    if client_side {
                        client_open = false;
                    } else {
                        upstream_open = false;
                    }
                    break;
                }
            }
        }
        let _ = client_wr.shutdown().await;
        let _ = upstream_wr.shutdown().await;
    }

    /// Shows one frame to every agent still asked, in order.
    async fn ask(
        &self,
        sessions: &mut Sessions,
        frame: &Frame,
        client_to_server: bool,
        index: u64,
    ) -> Verdict {
        let data = matches!(frame.opcode, 0x0..=0x2);
        let mut payload = frame.payload.clone();
        let mut k = 0;
        while k < sessions.live.len() {
            let (agent, session) = &sessions.live[k];
            let event = Event::WebSocketFrame(WebSocketFrame {
                correlation_id: self.id.as_str().into(),
                opcode: opcode_of(frame.opcode),
                client_to_server,
                index,
                fin: frame.fin,
                payload: payload.clone(),
            });
            match self.pool.sticky_sessions().send(session, agent, &event).await {
                Ok((decision, _)) if matches!(decision.action, Action::Allow) => match decision.body {
                    Some(BodyMutation::Replace { chunk_index, data: new })
                        if data && u64::from(chunk_index) == index =>
                    {
                        payload = new
                    }
                    Some(BodyMutation::Drop { chunk_index }) if data && u64::from(chunk_index) == index => {
                        return Verdict::Drop;
                    }
                    _ => {}
                },
                Ok(_) => {
                    tracing::info!(route = %self.route, agent = %agent, id = %self.id, "an agent refused a websocket frame");
                    return Verdict::Close(POLICY, "refused by an agent");
                }
                Err(PoolError::BodyTooLarge { .. }) => return Verdict::Close(TOO_BIG, "frame too big"),
                Err(e) => {
                    metrics::counter!("gateway_agent_errors_total", "route" => self.route.clone(), "agent" => agent.clone())
                        .increment(1);
                    tracing::warn!(route = %self.route, agent = %agent, error = %e, "agent could not answer on a websocket frame");
                    if self.failure_mode == FailureMode::Closed {
                        return Verdict::Close(INTERNAL, "an agent this route needs is unavailable");
                    }
                    // Failing open: left out for the rest of the connection.
                    let (_, session) = sessions.live.remove(k);
                    self.pool.sticky_sessions().remove(&session);
                    continue;
                }
            }
            k += 1;
        }
        Verdict::Forward(payload)
    }

    fn count_close(&self, code: u16) {
        metrics::counter!("gateway_websocket_closed_total", "route" => self.route.clone(), "code" => code.to_string())
            .increment(1);
    }
}

/// Sends a close frame to both sides (unmasked to the client, masked to the upstream) and
/// ends both connections.
async fn close_both<C, U>(client: &mut C, upstream: &mut U, code: u16, reason: &str)
where
    C: AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    let payload = close_payload(code, reason);
    let _ = client.write_all(&encode(true, 0x8, &payload, None)).await;
    let _ = client.shutdown().await;
    let _ = upstream.write_all(&encode(true, 0x8, &payload, Some(mask_key()))).await;
    let _ = upstream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_masked_and_not_in_every_length_form() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut buf = BytesMut::from(&encode(false, 0x2, &payload, mask)[..]);
                let frame = parse(&mut buf, 1 << 20).unwrap().unwrap();
                assert_eq!((frame.fin, frame.opcode, frame.mask), (false, 0x2, mask));
                assert_eq!(&frame.payload[..], &payload[..]);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn a_partial_frame_waits_and_a_split_one_parses_once_whole() {
        let raw = encode(true, 0x1, b"hello", Some([9, 8, 7, 6]));
        let mut buf = BytesMut::new();
        for (i, b) in raw.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let parsed = parse(&mut buf, 100).unwrap();
            assert_eq!(parsed.is_some(), i + 1 == raw.len());
            if let Some(frame) = parsed {
                assert_eq!(&frame.payload[..], b"hello");
            }
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused_from_their_header() {
        // Only the (10-byte) header of a 70 000-byte frame: refused before its payload arrives.
        let header = &encode(true, 0x2, &[0u8; 70_000], None)[..10];
        let mut buf = BytesMut::from(header);
        assert_eq!(parse(&mut buf, 1000), Err(FrameError::TooBig { size: 70_000, limit: 1000 }));
        let mut rsv = BytesMut::from(&[0xc1u8, 0x00][..]);
        assert_eq!(parse(&mut rsv, 10).unwrap_err().code(), PROTOCOL_ERROR);
        let mut opcode = BytesMut::from(&[0x83u8, 0x00][..]);
        assert_eq!(parse(&mut opcode, 10).unwrap_err().code(), PROTOCOL_ERROR);
        let mut fragmented_ping = BytesMut::from(&[0x09u8, 0x00][..]);
        assert_eq!(parse(&mut fragmented_ping, 10).unwrap_err().code(), PROTOCOL_ERROR);
        let mut long_close = BytesMut::from(&encode(true, 0x8, &[0u8; 126], None)[..]);
        assert_eq!(parse(&mut long_close, 1000).unwrap_err().code(), PROTOCOL_ERROR);
    }

    #[test]
    fn a_huge_frame_within_a_huge_limit_reserves_only_a_little_ahead() {
        // Found by the `gateway_ws` fuzz target: a route may configure any `max_websocket_frame`,
        // and the header of a 1 TiB frame under a limit above it once reserved the whole frame
        // (an allocation failure, aborting the process).
        let mut header = vec![0x82u8, 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(parse(&mut buf, u64::MAX >> 1), Ok(None));
        assert!(buf.capacity() <= header.len() + RESERVE_AHEAD + 64, "{}", buf.capacity());
    }

    #[test]
    fn a_close_payload_carries_its_code_and_fits_a_control_frame() {
        let payload = close_payload(TOO_BIG, &"x".repeat(500));
        assert_eq!(payload.len(), 125);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
    }
}
