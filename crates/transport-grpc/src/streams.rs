//! Maps keyed by stream id, hashed with foldhash's quality variant, seeded per map (the same
//! choice as `transport-uds`, whose `streams.rs` documents the measurements behind it:
//! consecutive ids spread like a random function, and a peer cannot aim ids at one bucket).

use std::collections::HashMap;

/// A map from stream id to `V`.
pub(crate) type StreamMap<V> = HashMap<u64, V, foldhash::quality::RandomState>;
