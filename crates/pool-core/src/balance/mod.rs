//! Choosing a connection for the next request.
//!
//! A [`Balancer`] picks one index from a slice of candidates, skipping those the caller marks
//! ineligible (breaker open, ejected, draining, …). It reads each candidate through the [`Load`]
//! trait, takes `&self`, allocates nothing and takes no lock, so one balancer is shared by every
//! task of a pool.
//!
//! # Strategies
//!
//! | [`Strategy`]          | choice                                                    | cost per pick |
//! |-----------------------|-----------------------------------------------------------|---------------|
//! | `PowerOfTwoChoices` † | two distinct random candidates, fewer in-flight wins      | O(1)          |
//! | `PeakEwma`            | P2C on `rtt × (in_flight + 1)`                            | O(1)          |
//! | `LeastConnections`    | fewest in-flight, ties broken by a random scan start      | O(n)          |
//! | `RoundRobin`          | a shared cursor; the next eligible at or after it         | O(1)–O(n)     |
//! | `Random`              | uniform; an ineligible draw moves to the next eligible    | O(1)–O(n)     |
//! | `HealthBased`         | random, weighted by `health_score` (all zero: uniform)    | O(n), 2 passes|
//!
//! † the default.
//!
//! **Power of two choices** is the default because it is nearly as good as a full
//! least-connections scan at constant cost: sending each request to the less loaded of two random
//! candidates keeps the maximum load within about `ln ln n / ln 2` of the mean, against
//! `ln n / ln ln n` for one random choice (Mitzenmacher, "The Power of Two Random Choices in
//! Randomized Load Balancing", IEEE TPDS 2001). Unlike a full scan it does not send every
//! concurrent request to the same momentarily least loaded candidate, because two requests rarely
//! draw the same pair. When both draws are ineligible, it falls back to a least-in-flight scan
//! over the eligible candidates, so a mostly-ineligible list still yields one whenever any is
//! eligible.
//!
//! **Peak-EWMA** runs the same two-choice comparison on `cost = rtt × (in_flight + 1)`, where
//! `rtt` is the candidate's peak-sensitive RTT estimate (see `crate::ewma`), or `default_rtt`
//! (30 ms, as in linkerd) for a candidate with none yet, so that new connections are neither
//! shunned nor flooded. It moves traffic away from a slow agent at once. Beware fast failures:
//! an agent that fails quickly looks cheap; pair it with breakers or ejection. Source: Finagle's
//! `P2CPeakEwma` balancer, as adopted by linkerd and `tower::balance::p2c` + `tower::load`.
//!
//! # Randomness
//!
//! [`Balancer::new`] draws from fastrand's thread-local generator, so picks on different threads
//! share no cache line. [`Balancer::seeded`] keeps a splitmix64 state in an `AtomicU64` of its own
//! instead: a sequence of picks from one thread is then reproducible, which is what tests need
//! (as tower's seeded balancer constructors do). Under concurrency the interleaving, not the seed,
//! decides who gets which draw.
//!
//! # Contract of `eligible`
//!
//! `eligible` may be called more than once per candidate within a pick (`HealthBased` makes two
//! passes, the P2C fallback rescans). It should be cheap and give the same answer during one pick;
//! if it changes meanwhile (it reads atomics), the pick is as stale as any pick made just before
//! the change.
#![forbid(unsafe_code)]

mod p2c;
mod random;
mod rng;
mod round_robin;
mod scan;

#[cfg(test)]
mod tests;

use std::sync::{Arc, atomic::AtomicUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::rng::Rng;

/// The peak-EWMA cost of a candidate without an RTT estimate: 30 ms, as in linkerd.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// What a balancer sees of one candidate connection. Implemented by the pool's connection slots
/// (atomics) and by plain structs in tests.
pub trait Load {
    /// Requests sent on this connection that have not completed.
    fn in_flight(&self) -> u32;
    /// Peak-EWMA round-trip estimate in nanoseconds; 0 = no estimate yet.
    fn rtt_estimate_ns(&self) -> u64;
    /// 0.0 (failing) ..= 1.0 (perfect): recent success rate. Values outside the range are
    /// clamped and NaN counts as 0.
    fn health_score(&self) -> f64;
}

/// Pointers to something with a load have that load.
macro_rules! forward_load {
    ($($ptr:ty),*) => {$(
        impl<L: Load + ?Sized> Load for $ptr {
            fn in_flight(&self) -> u32 {
                (**self).in_flight()
            }
            fn rtt_estimate_ns(&self) -> u64 {
                (**self).rtt_estimate_ns()
            }
            fn health_score(&self) -> f64 {
                (**self).health_score()
            }
        }
    )*};
}

forward_load!(&L, Arc<L>);

/// How a [`Balancer`] chooses. Serialized in kebab-case (`power-of-two-choices`, `peak-ewma`, …).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Each eligible candidate in turn.
    RoundRobin,
    /// The candidate with the fewest requests in flight (full scan).
    LeastConnections,
    /// Random, weighted by recent success rate.
    HealthBased,
    /// Uniformly random.
    Random,
    /// The less loaded of two random candidates. The default.
    #[default]
    PowerOfTwoChoices,
    /// The cheaper of two random candidates by `rtt × (in_flight + 1)`.
    PeakEwma,
}

impl Strategy {
    /// Every strategy, in declaration order.
    pub const ALL: [Strategy; 6] = [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::HealthBased,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
        Strategy::PeakEwma,
    ];
}

/// Picks candidates by a [`Strategy`]. `Send + Sync`; [`pick`](Self::pick) takes `&self`, takes no
/// lock and allocates nothing.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    default_rtt_ns: u64,
    rng: Rng,
    /// Used by round robin only.
    cursor: AtomicUsize,
}

impl Balancer {
    /// A balancer drawing from the thread-local generator.
    pub fn new(strategy: Strategy) -> Self {
        Self::with_rng(strategy, Rng::Thread)
    }

    /// A balancer whose picks are reproducible for a given `seed` (from a single thread).
    pub fn seeded(strategy: Strategy, seed: u64) -> Self {
        Self::with_rng(strategy, Rng::seeded(seed))
    }

    fn with_rng(strategy: Strategy, rng: Rng) -> Self {
        Self { strategy, default_rtt_ns: duration_ns(DEFAULT_RTT), rng, cursor: AtomicUsize::new(0) }
    }

    /// Sets the peak-EWMA cost of candidates with no estimate (default [`DEFAULT_RTT`]). A zero
    /// duration is taken as 1 ns so that in-flight counts still separate such candidates.
    pub fn with_default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt_ns = duration_ns(rtt).max(1);
        self
    }

    /// The strategy this balancer uses.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Index of the chosen item among those for which `eligible` is true; `None` if none is.
    #[inline]
    pub fn pick<L: Load>(&self, items: &[L], eligible: impl Fn(&L) -> bool) -> Option<usize> {
        if items.is_empty() {
            return None;
        }
        match self.strategy {
            Strategy::PowerOfTwoChoices => {
                p2c::pick(&self.rng, items, eligible, |l| u64::from(l.in_flight()))
            }
            Strategy::PeakEwma => p2c::pick(&self.rng, items, eligible, |l| self.peak_ewma_cost(l)),
            Strategy::LeastConnections => {
                scan::least(items, self.rng.below(items.len()), eligible, |l| u64::from(l.in_flight()))
            }
            Strategy::RoundRobin => round_robin::pick(&self.cursor, items, eligible),
            Strategy::Random => random::uniform(&self.rng, items, eligible),
            Strategy::HealthBased => random::weighted_by_health(&self.rng, items, eligible),
        }
    }

    #[inline]
    fn peak_ewma_cost<L: Load>(&self, item: &L) -> u64 {
        let rtt = match item.rtt_estimate_ns() {
            0 => self.default_rtt_ns,
            ns => ns,
        };
        rtt.saturating_mul(u64::from(item.in_flight()) + 1)
    }
}

/// A duration in nanoseconds, saturating (u64 nanoseconds cover 584 years).
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
