//! Frames: a 4-byte big-endian length, then one protobuf message.
//!
//! The length is checked against the limit before a single byte of the body is buffered, so a
//! peer announcing a huge frame costs nothing; a frame that does not decode is an error for the
//! whole connection (its framing can no longer be trusted). Decoding goes from `Bytes`, so
//! `bytes` fields (bodies, payloads) share the read buffer instead of being copied.

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// The default largest frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame larger than the limit: announced by the peer, or about to be written.
    #[error("frame of {} exceeds the {limit}-byte limit", size.map_or("unknown size".to_owned(), |s| format!("{s} bytes")))]
    TooLarge {
        /// The frame's size, when known (an encoded message; the peer's announcement is
        /// refused by the length codec before it is exposed).
        size: Option<usize>,
        /// The limit.
        limit: usize,
    },
    /// The frame is not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `Out` messages and decodes `In` messages as length-delimited frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    limit: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(limit)
            .new_codec();
        Self { inner, limit, _types: PhantomData }
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        // The length codec is stateful (it consumes a frame's length before its body
        // arrives), so the size check is its alone: it refuses an oversized announcement
        // before reserving anything.
        let frame = self.inner.decode(src).map_err(|e| {
            let too_big =
                e.get_ref().is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>());
            if too_big { FrameError::TooLarge { size: None, limit: self.limit } } else { FrameError::Io(e) }
        })?;
        match frame {
            None => Ok(None),
            Some(frame) => Ok(Some(In::decode(frame.freeze())?)),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let size = item.encoded_len();
        if size > self.limit {
            return Err(FrameError::TooLarge { size: Some(size), limit: self.limit });
        }
        let mut body = BytesMut::with_capacity(size);
        item.encode(&mut body).expect("capacity reserved");
        self.inner.encode(Bytes::from(body), dst).map_err(FrameError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_api::proto::{AgentFrame, Ping, ProxyFrame, proxy_frame};

    #[test]
    fn a_frame_round_trips() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1024);
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        let frame = ProxyFrame { stream_id: 7, body: Some(proxy_frame::Body::Ping(Ping {})) };
        proxy.encode(frame.clone(), &mut buf).unwrap();
        assert_eq!(agent.decode(&mut buf).unwrap(), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_announcement_is_refused_before_the_body_arrives() {
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&u32::to_be_bytes(1 << 30)[..]);
        let err = agent.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { size: None, limit: 1024 }), "{err}");
        assert!(buf.capacity() < 1 << 20, "nothing was allocated for the announced body");
    }

    #[test]
    fn an_oversized_message_is_not_written() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(8);
        let frame = ProxyFrame { stream_id: u64::MAX, body: Some(proxy_frame::Body::Ping(Ping {})) };
        assert!(matches!(proxy.encode(frame, &mut BytesMut::new()), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn frames_split_across_reads_decode_whole() {
        let mut proxy: FrameCodec<AgentFrame, ProxyFrame> = FrameCodec::new(1024);
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut wire = BytesMut::new();
        let frames: Vec<_> = (0..3)
            .map(|i| ProxyFrame { stream_id: 1000 + i, body: Some(proxy_frame::Body::Ping(Ping {})) })
            .collect();
        for f in &frames {
            proxy.encode(f.clone(), &mut wire).unwrap();
        }
        // Feed one byte at a time: every partial state must be resumed correctly.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(f) = agent.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(agent.decode(&mut buf), Err(FrameError::Decode(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_allocate_past_the_limit(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut agent: FrameCodec<ProxyFrame, AgentFrame> = FrameCodec::new(256);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = agent.decode(&mut buf) {}
            proptest::prop_assert!(buf.capacity() <= 512 + 256);
        }
    }
}
