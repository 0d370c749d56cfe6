//! Capped exponential back-off with optional jitter, for reconnects and breaker reset periods.
//!
//! # Algorithm
//!
//! The n-th delay (counting from 0) is `d(n) = min(base × 2ⁿ, cap)`. With jitter on, a random amount
//! is added and the result clamped again, so every delay lies in `[d(n), min(2 × d(n), cap)]`:
//!
//! * the sequence is [`backon`]'s `ExponentialBackoff` (factor 2, `min_delay = base`,
//!   `max_delay = cap`, no attempt limit). backon 1.6 caps the *un-jittered* delay, then adds
//!   `d × u` with `u` drawn uniformly from `[0, 1)` (an `f32`), so on its own a jittered delay could
//!   reach almost `2 × cap`. We clamp every delay to `cap` so the cap is a real upper bound;
//! * consequently, once `d(n)` has reached `cap`, jitter has no effect and every delay is exactly
//!   `cap`. Jitter spreads out the early, frequent retries, which is where synchronised retries of
//!   many clients hurt; at the cap they are already rare;
//! * backon multiplies in `f32` seconds, so a grown delay can differ from the exact power of two
//!   by a few nanoseconds (or microseconds for delays of minutes). `base` itself and `cap` are
//!   exact.
//!
//! Why jitter at all: without it, every connection that failed at the same moment retries at the
//! same moments, hammering a recovering agent in waves (the "thundering herd").
//!
//! # Defaults
//!
//! `base` 100 ms, `cap` 30 s, jitter on: 100 ms, 200 ms, 400 ms, … reaching the cap on the 10th
//! attempt (51.2 s before capping).
//!
//! # Reproducibility
//!
//! [`Backoff::seeded`] makes the jitter reproducible: the seed drives a small generator that seeds
//! each backon sequence, including the fresh one started by [`Backoff::reset`], so a reset does not
//! replay the same jitter.
//!
//! Source: the exponential back-off with jitter of the AWS Architecture Blog, "Exponential Backoff
//! and Jitter" (Brooker, 2015), as implemented by `backon`.
#![forbid(unsafe_code)]

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use serde::{Deserialize, Serialize};

/// Configuration of a [`Backoff`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// No delay is ever longer than this. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Add up to 100 % random extra to each delay (still capped). Default true; tests use false.
    pub jitter: bool,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { base: Duration::from_millis(100), cap: Duration::from_secs(30), jitter: true }
    }
}

impl BackoffConfig {
    /// Every problem with this configuration, as human-readable messages; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.base.is_zero() {
            problems.push("backoff.base must be greater than zero".to_owned());
        }
        if self.cap < self.base {
            problems.push(format!(
                "backoff.cap ({:?}) must be at least backoff.base ({:?})",
                self.cap, self.base
            ));
        }
        problems
    }
}

/// An endless sequence of capped, optionally jittered, exponentially growing delays.
///
/// Invariant: [`next_delay`](Self::next_delay) never returns more than the configured cap.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    cap: Duration,
    jitter: bool,
    /// Seeds each backon sequence; a fresh seed per reset keeps resets from replaying jitter.
    seeds: fastrand::Rng,
    current: ExponentialBackoff,
}

impl Backoff {
    /// A back-off whose jitter is seeded from the thread-local generator.
    pub fn new(cfg: &BackoffConfig) -> Self {
        Self::with_rng(cfg, fastrand::Rng::new())
    }

    /// A back-off whose delays are reproducible for a given `seed`.
    pub fn seeded(cfg: &BackoffConfig, seed: u64) -> Self {
        Self::with_rng(cfg, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(cfg: &BackoffConfig, mut seeds: fastrand::Rng) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(cfg.base)
            .with_max_delay(cfg.cap)
            .with_factor(2.0)
            .without_max_times();
        let current = Self::build(builder, cfg.jitter, &mut seeds);
        Self { builder, cap: cfg.cap, jitter: cfg.jitter, seeds, current }
    }

    fn build(builder: ExponentialBuilder, jitter: bool, seeds: &mut fastrand::Rng) -> ExponentialBackoff {
        if jitter { builder.with_jitter().with_jitter_seed(seeds.u64(..)).build() } else { builder.build() }
    }

    /// The next delay: in `[d, min(2d, cap)]` with jitter, exactly `d` without, where
    /// `d = min(base × 2ⁿ, cap)` for the n-th call since construction or the last reset.
    pub fn next_delay(&mut self) -> Duration {
        // The sequence has no attempt limit, so `None` cannot happen; the cap is a safe answer.
        self.current.next().unwrap_or(self.cap).min(self.cap)
    }

    /// Starts again from `base`, e.g. after a successful connect.
    pub fn reset(&mut self) {
        self.current = Self::build(self.builder, self.jitter, &mut self.seeds);
    }

    /// The configured upper bound of every delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base_ms: u64, cap_ms: u64, jitter: bool) -> BackoffConfig {
        BackoffConfig { base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms), jitter }
    }

    /// backon grows delays in f32 seconds; compare to the microsecond.
    fn assert_close(actual: Duration, expected: Duration) {
        let diff = actual.abs_diff(expected);
        assert!(diff < Duration::from_micros(1), "{actual:?} is not {expected:?}");
    }

    #[test]
    fn delays_double_from_base() {
        let mut b = Backoff::new(&cfg(100, 30_000, false));
        for expected_ms in [100, 200, 400, 800, 1600, 3200] {
            assert_close(b.next_delay(), Duration::from_millis(expected_ms));
        }
    }

    #[test]
    fn first_delay_is_exactly_base() {
        let mut b = Backoff::new(&cfg(100, 30_000, false));
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn delays_stop_growing_at_cap_and_never_end() {
        let mut b = Backoff::new(&cfg(100, 1_000, false));
        let delays: Vec<_> = (0..1_000).map(|_| b.next_delay()).collect();
        assert_close(delays[3], Duration::from_millis(800));
        assert!(delays[4..].iter().all(|&d| d == Duration::from_secs(1)));
    }

    #[test]
    fn reset_starts_again_from_base() {
        let mut b = Backoff::new(&cfg(100, 30_000, false));
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_close(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn jittered_delays_lie_between_d_and_twice_d_and_never_exceed_cap() {
        for seed in 0..200 {
            let mut b = Backoff::seeded(&cfg(100, 30_000, true), seed);
            let mut d = Duration::from_millis(100);
            for _ in 0..15 {
                let got = b.next_delay();
                let low = d.saturating_sub(Duration::from_micros(1));
                let high = (d * 2).min(Duration::from_secs(30));
                assert!(got >= low && got <= high, "seed {seed}: {got:?} outside [{d:?}, {high:?}]");
                d = (d * 2).min(Duration::from_secs(30));
            }
        }
    }

    #[test]
    fn jitter_is_exactly_the_cap_once_capped() {
        let mut b = Backoff::seeded(&cfg(1_000, 4_000, true), 7);
        let tail: Vec<_> = (0..50).map(|_| b.next_delay()).skip(3).collect();
        assert!(tail.iter().all(|&d| d == Duration::from_secs(4)), "{tail:?}");
    }

    #[test]
    fn jitter_actually_varies_delays() {
        let firsts: std::collections::HashSet<_> =
            (0..20).map(|seed| Backoff::seeded(&cfg(100, 30_000, true), seed).next_delay()).collect();
        assert!(firsts.len() > 10);
    }

    #[test]
    fn seeded_backoffs_are_reproducible_and_resets_draw_new_jitter() {
        let run = |seed| {
            let mut b = Backoff::seeded(&cfg(100, 30_000, true), seed);
            let mut v: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
            b.reset();
            v.extend((0..5).map(|_| b.next_delay()));
            v
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a[..5], a[5..], "a reset replayed the same jitter");
    }

    #[test]
    fn a_base_above_the_cap_is_clamped_to_the_cap() {
        let mut b = Backoff::new(&cfg(5_000, 1_000, false));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn default_config_is_valid() {
        assert!(BackoffConfig::default().validate().is_empty());
    }

    #[test]
    fn validate_reports_every_problem() {
        let problems = cfg(0, 0, true).validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let problems = cfg(10, 5, true).validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
