//! The wire format as a peer outside the crate speaks it — a 4-byte big-endian length, then one
//! protobuf message of `agent.proto` — for tests that play a raw proxy or a raw agent. Built on
//! tokio-util's `LengthDelimitedCodec` and prost alone, independent of the crate's own codec.

use std::io;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Writes `Out` messages and reads `In` messages, one per frame.
pub struct Wire<In, Out> {
    frames: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Wire<In, Out> {
    /// Frames of at most `max_frame` bytes (after the length).
    pub fn new(max_frame: usize) -> Self {
        Self {
            frames: LengthDelimitedCodec::builder().max_frame_length(max_frame).new_codec(),
            _types: PhantomData,
        }
    }
}

impl<In: Message + Default, Out> Decoder for Wire<In, Out> {
    type Item = In;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<In>> {
        match self.frames.decode(src)? {
            None => Ok(None),
            Some(frame) => In::decode(frame.freeze()).map(Some).map_err(io::Error::other),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for Wire<In, Out> {
    type Error = io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> io::Result<()> {
        self.frames.encode(Bytes::from(item.encode_to_vec()), dst)
    }
}
