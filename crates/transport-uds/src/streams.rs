//! Maps keyed by stream id, with a hash cheaper than the standard library's SipHash.
//!
//! Stream ids are counters chosen by the proxy. Each id is mixed with a seed drawn once per
//! process from the standard library's random keys, then through a 64-bit finaliser (the
//! one of MurmurHash3), so ids a peer picks cannot be aimed at one bucket without knowing
//! the seed.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A map from stream id to `V`.
pub(crate) type StreamMap<V> = HashMap<u64, V, StreamHash>;

/// Builds [`StreamHasher`]s with the process's seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamHash {
    seed: u64,
}

impl Default for StreamHash {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64));
        Self { seed }
    }
}

impl BuildHasher for StreamHash {
    type Hasher = StreamHasher;

    fn build_hasher(&self) -> StreamHasher {
        StreamHasher(self.seed)
    }
}

/// Hashes one `u64` key (other input is folded in byte by byte, for completeness).
#[derive(Debug)]
pub(crate) struct StreamHasher(u64);

impl Hasher for StreamHasher {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_spread_over_buckets() {
        let hash = StreamHash::default();
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
