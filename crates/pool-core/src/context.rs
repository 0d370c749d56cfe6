//! What every agent of a pool shares with the pool: the configuration, the pool's clock, the
//! handshake it presents, whether it still admits requests, and the source of seeds for its
//! random choices.
//!
//! Nothing here knows an agent or a slot: agents hold the context, never the other way round.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pool_api::Hello;
use tokio::time::Instant;

use crate::config::PoolConfig;

/// The pool's clock for idle time-outs: stamps are nanoseconds since the pool was built. A
/// coarse reading, advanced by maintenance every health bucket, serves lookups that have no
/// request start time at hand (an `Instant::now()` costs more than the lookup itself).
pub(crate) struct Clock {
    epoch: Instant,
    coarse: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Self { epoch: Instant::now(), coarse: AtomicU64::new(0) }
    }

    /// `now` as a stamp.
    pub(crate) fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The coarse stamp: the last one maintenance advanced to.
    pub(crate) fn coarse(&self) -> u64 {
        self.coarse.load(Ordering::Relaxed)
    }

    /// Moves the coarse stamp forward to `now` (never back).
    pub(crate) fn advance(&self, now: Instant) {
        self.coarse.fetch_max(self.stamp(now), Ordering::Relaxed);
    }
}

/// Seeds for every random choice of a pool (balancers, breaker and back-off jitter), derived
/// from the configured seed so a seeded pool is reproducible, or none.
struct Seeds {
    base: Option<u64>,
    next: AtomicU64,
}

impl Seeds {
    fn next(&self) -> Option<u64> {
        let base = self.base?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of (seed + n): distinct, well-mixed seeds per component.
        let mut z = base.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Some(z ^ (z >> 31))
    }
}

/// The context of one pool.
pub(crate) struct PoolCtx {
    pub(crate) config: PoolConfig,
    pub(crate) clock: Clock,
    /// What the pool presents in every handshake.
    pub(crate) hello: Hello,
    admitting: AtomicBool,
    seeds: Seeds,
}

impl PoolCtx {
    pub(crate) fn new(config: PoolConfig) -> Self {
        Self {
            clock: Clock::new(),
            hello: Hello::new(config.proxy_id.clone()),
            admitting: AtomicBool::new(true),
            seeds: Seeds { base: config.seed, next: AtomicU64::new(0) },
            config,
        }
    }

    /// False once shutdown has begun.
    pub(crate) fn admitting(&self) -> bool {
        self.admitting.load(Ordering::Acquire)
    }

    /// Stops admitting, for good.
    pub(crate) fn stop_admitting(&self) {
        self.admitting.store(false, Ordering::Release);
    }

    /// A fresh seed derived from the configured one, or `None` when unseeded.
    pub(crate) fn next_seed(&self) -> Option<u64> {
        self.seeds.next()
    }
}
