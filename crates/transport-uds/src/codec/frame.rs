//! Framing: a 4-byte big-endian length, then one protobuf message, as a tokio-util
//! [`Decoder`]/[`Encoder`] over any message of the schema.
//!
//! The length is checked against the limit before a single byte of the body is buffered, so a
//! peer announcing a huge frame costs nothing; room for a frame within the limit is reserved
//! as its bytes arrive (at most [`RESERVE_AHEAD`] beyond them), so a peer announcing a large
//! frame and sending little of it costs little. A frame that does not decode is an error for
//! the whole connection (its framing can no longer be trusted). Decoding goes from `Bytes`, so
//! `bytes` fields (bodies, payloads) share the read buffer instead of being copied. The fast
//! paths (`encode.rs`, `decode.rs`) build on [`FrameCodec::next_frame`] and
//! [`FrameCodec::header`].

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// The default largest frame: 16 MiB.
pub(crate) const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Room reserved for the rest of a frame that has not fully arrived, beyond the bytes already
/// read: 64 KiB. A frame that size or smaller gets its whole room at once; a larger one grows
/// its buffer as its bytes arrive.
pub(crate) const RESERVE_AHEAD: usize = 64 * 1024;

/// Bytes of a frame's length.
pub(super) const HEAD: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// A frame larger than the limit: announced by the peer, or about to be written.
    #[error("frame of {} exceeds the {limit}-byte limit", size.map_or("unknown size".to_owned(), |s| format!("{s} bytes")))]
    TooLarge {
        /// The frame's size: the length the peer announced, or the encoded message's size.
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
pub(crate) struct FrameCodec<In, Out> {
    limit: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames larger than `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, _types: PhantomData }
    }

    /// The largest frame read or written.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// The same codec decoding `Other`.
    pub(crate) fn retype<Other>(self) -> FrameCodec<Other, Out> {
        FrameCodec { limit: self.limit, _types: PhantomData }
    }

    /// The next whole frame's body, if one has arrived. The length stays in `src` until the
    /// whole frame has, so the codec keeps no state between calls.
    pub(super) fn next_frame(&mut self, src: &mut BytesMut) -> Result<Option<bytes::Bytes>, FrameError> {
        let Some(head) = src.first_chunk::<HEAD>() else { return Ok(None) };
        let size = u32::from_be_bytes(*head) as usize;
        if size > self.limit {
            return Err(FrameError::TooLarge { size: Some(size), limit: self.limit });
        }
        let missing = (HEAD + size).saturating_sub(src.len());
        if missing > 0 {
            src.reserve(missing.min(RESERVE_AHEAD));
            return Ok(None);
        }
        src.advance(HEAD);
        Ok(Some(src.split_to(size).freeze()))
    }

    /// Checks `size` against the limit, reserves room and writes the frame's length.
    pub(super) fn header(&self, size: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
        if size > self.limit {
            return Err(FrameError::TooLarge { size: Some(size), limit: self.limit });
        }
        dst.reserve(HEAD + size);
        dst.put_u32(u32::try_from(size).expect("the limit fits in the 4-byte length"));
        Ok(())
    }

    /// Encodes any message of the schema as one frame.
    pub(crate) fn encode_message(
        &self,
        message: &impl Message,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        self.header(message.encoded_len(), dst)?;
        message.encode(dst).expect("capacity reserved");
        Ok(())
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.next_frame(src)? {
            None => Ok(None),
            Some(frame) => Ok(Some(In::decode(frame)?)),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_message(&item, dst)
    }
}
