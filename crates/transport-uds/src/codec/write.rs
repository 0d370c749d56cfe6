//! Writing the hot messages with `pool_api::wire`'s encoders inside this transport's framing.

use bytes::{BufMut, BytesMut};
use pool_api::{proto, wire};

use super::frame::{FrameCodec, FrameError, HEAD};

/// Writes the frame's 4-byte length (the size was checked against the limit, which fits).
fn length(size: usize, dst: &mut BytesMut) {
    debug_assert!(size <= u32::MAX as usize);
    dst.put_u32(size as u32);
}

fn too_large(e: wire::TooLarge) -> FrameError {
    FrameError::TooLarge { size: Some(e.size), limit: e.limit }
}

impl<In> FrameCodec<In, proto::ProxyFrame> {
    /// Encodes request `stream_id`'s event from a borrowed value as one frame (see
    /// [`wire::encode_event`]); over the limit, nothing is written.
    pub(crate) fn encode_event(
        &self,
        stream_id: u64,
        event: &pool_api::Event,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        const { assert!(HEAD == 4) };
        wire::encode_event(stream_id, event, self.limit(), dst, length).map_err(too_large)
    }
}

impl<In> FrameCodec<In, proto::AgentFrame> {
    /// Encodes the answer to request `stream_id` from a borrowed decision as one frame (see
    /// [`wire::encode_decision`]); over the limit, nothing is written.
    pub(crate) fn encode_decision(
        &self,
        stream_id: u64,
        decision: &pool_api::Decision,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        wire::encode_decision(stream_id, decision, self.limit(), dst, length).map_err(too_large)
    }
}
