//! The random source behind randomised strategies: thread-local when unseeded, a shared
//! splitmix64 sequence when seeded.

use std::sync::atomic::{AtomicU64, Ordering};

/// splitmix64's increment (2⁶⁴ / φ, odd).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug)]
pub(super) enum Rng {
    /// fastrand's thread-local generator: no shared cache line on the hot path.
    Thread,
    /// A splitmix64 state shared by the balancer's users. One relaxed `fetch_add` per draw keeps
    /// `pick(&self)` lock-free; a single thread sees a reproducible sequence.
    Seeded(AtomicU64),
}

impl Rng {
    pub(super) fn seeded(seed: u64) -> Self {
        Self::Seeded(AtomicU64::new(seed))
    }

    #[inline]
    fn u64(&self) -> u64 {
        match self {
            Self::Thread => fastrand::u64(..),
            Self::Seeded(state) => {
                let mut z = state.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE5_E9B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift: the bias, at most `n / 2⁶⁴`, is irrelevant
    /// here and the method needs no division and no retry loop.
    #[inline]
    pub(super) fn below(&self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((u128::from(self.u64()) * n as u128) >> 64) as usize
    }

    /// Two distinct indexes, uniform over ordered pairs in `0..n` (`n >= 2`), from one draw.
    #[inline]
    pub(super) fn two_distinct(&self, n: usize) -> (usize, usize) {
        debug_assert!(n >= 2);
        let (a, b) = match u32::try_from(n) {
            Ok(n32) => {
                // One 64-bit draw split into two 32-bit multiply-shifts (bias ≤ n / 2³²).
                let x = self.u64();
                let a = (u64::from(x as u32) * u64::from(n32)) >> 32;
                let b = ((x >> 32) * u64::from(n32 - 1)) >> 32;
                (a as usize, b as usize)
            }
            Err(_) => (self.below(n), self.below(n - 1)),
        };
        // Draw the second from the n − 1 others by skipping over the first.
        (a, if b >= a { b + 1 } else { b })
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub(super) fn unit_f64(&self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
