//! Maps keyed by stream id, hashed with foldhash rather than the standard library's SipHash.
//!
//! Stream ids are counters chosen by the proxy. foldhash's fast hasher is seeded per map from
//! a per-process random value, so ids a peer picks cannot be aimed at one bucket without
//! knowing the seed.

use std::collections::HashMap;

/// A map from stream id to `V`.
pub(crate) type StreamMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn counters_spread_over_buckets() {
        let hash = foldhash::fast::RandomState::default();
        let mut low_bits = std::collections::HashSet::new();
        for id in 0..1024u64 {
            low_bits.insert(hash.hash_one(id) & 1023);
        }
        // A good hash puts 1024 keys in about 1024 × (1 - 1/e) ≈ 647 of 1024 buckets.
        assert!(low_bits.len() > 550, "{}", low_bits.len());
    }

    #[test]
    fn the_map_works() {
        let mut map = StreamMap::default();
        for id in 0..100u64 {
            map.insert(id << 32, id);
        }
        assert!((0..100u64).all(|id| map.remove(&(id << 32)) == Some(id)));
        assert!(map.is_empty());
    }
}
