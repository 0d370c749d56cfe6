//! Recent success rate of a connection, and its classification into health states.
//!
//! # Window
//!
//! [`HealthWindow`] counts successes and failures in a ring of time buckets (default: 10 buckets
//! over 10 s). A bucket is reused, and its counts discarded, once the ring comes round to it
//! again, so results expire as time passes without any timer. A sample recorded at `t` is counted
//! while `now` is within the same bucket or one of the next `buckets − 1`, that is for more than
//! `window − window / buckets` and at most `window` after `t` (the bucket width is
//! `window / buckets` rounded down to whole nanoseconds).
//!
//! Expiry is also how a connection recovers: once its failures have aged out and it has too little
//! traffic to judge, it reads as "no evidence", which [`HealthThresholds::classify`] treats as
//! [`HealthState::Healthy`]. No probe traffic is needed.
//!
//! Buckets are numbered from the first recorded sample; the window holds no `Instant` until then.
//!
//! # Classification
//!
//! With `rate = successes / (successes + failures)` and the defaults:
//!
//! | condition                        | state       |
//! |----------------------------------|-------------|
//! | fewer than 10 samples            | `Healthy`   |
//! | `rate > 0.95`                    | `Healthy`   |
//! | `0.80 <= rate <= 0.95`           | `Degraded`  |
//! | `rate < 0.80`                    | `Unhealthy` |
//!
//! Exactly 95 % is therefore `Degraded` and exactly 80 % is still `Degraded`.
//!
//! Source: the bucketed success-rate window of linkerd's success-rate breaker
//! (`linkerd/app/outbound/src/http/breaker/success_rate.rs`), itself after Finagle's
//! `SuccessRateFailureAccrualPolicy`.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Thresholds that classify a success rate into a [`HealthState`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthThresholds {
    /// A rate strictly above this is [`HealthState::Healthy`]. Default 0.95.
    pub healthy: f64,
    /// A rate at or above this (and not healthy) is [`HealthState::Degraded`]; below it,
    /// [`HealthState::Unhealthy`]. Default 0.80.
    pub degraded: f64,
    /// With fewer samples than this the connection is [`HealthState::Healthy`]: not enough
    /// evidence to judge. Default 10.
    pub min_requests: u32,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self { healthy: 0.95, degraded: 0.80, min_requests: 10 }
    }
}

impl HealthThresholds {
    /// Every problem with these thresholds (they need `0 < degraded <= healthy <= 1`); empty when
    /// valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // Written as negations so that NaN is reported too.
        if !(self.degraded > 0.0 && self.degraded <= 1.0) {
            problems.push(format!("health.degraded ({}) must be in (0, 1]", self.degraded));
        }
        if !(self.healthy > 0.0 && self.healthy <= 1.0) {
            problems.push(format!("health.healthy ({}) must be in (0, 1]", self.healthy));
        }
        if self.degraded > self.healthy {
            problems.push(format!(
                "health.degraded ({}) must not exceed health.healthy ({})",
                self.degraded, self.healthy
            ));
        }
        problems
    }

    /// The state of a connection with these counts. See the module documentation for the table.
    pub fn classify(&self, successes: u64, failures: u64) -> HealthState {
        let total = successes.saturating_add(failures);
        if total < u64::from(self.min_requests) || total == 0 {
            return HealthState::Healthy;
        }
        let rate = successes as f64 / total as f64;
        if rate > self.healthy {
            HealthState::Healthy
        } else if rate >= self.degraded {
            HealthState::Degraded
        } else {
            HealthState::Unhealthy
        }
    }
}

/// How well a connection is doing, by its recent success rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    /// Succeeding, or not enough evidence to say otherwise.
    Healthy,
    /// Failing noticeably but mostly succeeding.
    Degraded,
    /// Failing too often to be trusted.
    Unhealthy,
}

/// The success rate as a balancing weight: `successes / total`, or 1.0 with no data.
pub fn score(successes: u64, failures: u64) -> f64 {
    let total = successes.saturating_add(failures);
    if total == 0 { 1.0 } else { successes as f64 / total as f64 }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which bucket of time (counted from `HealthWindow::origin`) the counts belong to.
    epoch: u64,
    successes: u64,
    failures: u64,
}

/// Successes and failures over a sliding time window. See the module documentation.
///
/// Invariant: a ring slot holds counts only for its latest `epoch`; counts for epochs that have
/// left the window are ignored by readers and discarded by the next write to the slot.
#[derive(Clone, Debug)]
pub struct HealthWindow {
    bucket_ns: u64,
    origin: Option<Instant>,
    ring: Box<[Bucket]>,
}

impl Default for HealthWindow {
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10)
    }
}

impl HealthWindow {
    /// A window of length `window` split into `buckets` buckets (at least one, each at least 1 ns).
    pub fn new(window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let bucket_ns = (window.as_nanos() / buckets as u128).clamp(1, u128::from(u64::MAX)) as u64;
        Self { bucket_ns, origin: None, ring: vec![Bucket::default(); buckets].into_boxed_slice() }
    }

    fn epoch(&self, origin: Instant, now: Instant) -> u64 {
        // A `now` before the origin (a caller's stale clock reading) falls in the first bucket.
        let ns = now.saturating_duration_since(origin).as_nanos();
        (ns / u128::from(self.bucket_ns)).min(u128::from(u64::MAX)) as u64
    }

    fn in_window(&self, bucket_epoch: u64, now_epoch: u64) -> bool {
        bucket_epoch <= now_epoch && now_epoch - bucket_epoch < self.ring.len() as u64
    }

    /// Forgets every result recorded, as a freshly made window would (its length and buckets
    /// stay). Allocates nothing.
    pub fn clear(&mut self) {
        self.origin = None;
        self.ring.fill(Bucket::default());
    }

    /// Records one result observed at `now`.
    pub fn record(&mut self, now: Instant, success: bool) {
        let origin = *self.origin.get_or_insert(now);
        let epoch = self.epoch(origin, now);
        let len = self.ring.len() as u64;
        let slot = &mut self.ring[(epoch % len) as usize];
        if slot.epoch < epoch {
            *slot = Bucket { epoch, successes: 0, failures: 0 };
        } else if slot.epoch > epoch {
            // `now` is a whole window older than data already in this slot: already expired.
            return;
        }
        if success {
            slot.successes = slot.successes.saturating_add(1);
        } else {
            slot.failures = slot.failures.saturating_add(1);
        }
    }

    /// `(successes, failures)` recorded within the window ending at `now`.
    pub fn counts(&self, now: Instant) -> (u64, u64) {
        let Some(origin) = self.origin else { return (0, 0) };
        let now_epoch = self.epoch(origin, now);
        self.ring
            .iter()
            .filter(|b| self.in_window(b.epoch, now_epoch))
            .fold((0, 0), |(s, f), b| (s + b.successes, f + b.failures))
    }

    /// Fraction of results within the window that succeeded; `None` with no results.
    pub fn success_rate(&self, now: Instant) -> Option<f64> {
        let (s, f) = self.counts(now);
        (s + f > 0).then(|| s as f64 / (s + f) as f64)
    }

    /// The state by `thresholds` of the results within the window ending at `now`.
    pub fn state(&self, now: Instant, thresholds: &HealthThresholds) -> HealthState {
        let (s, f) = self.counts(now);
        thresholds.classify(s, f)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_cleared_window_forgets_everything_and_starts_again() {
        let t0 = Instant::now();
        let mut w = HealthWindow::new(secs(10), 10);
        for i in 0..20 {
            w.record(t0 + Duration::from_millis(i * 100), false);
        }
        w.clear();
        assert_eq!(w.counts(t0 + secs(2)), (0, 0));
        assert_eq!(w.success_rate(t0 + secs(2)), None);
        // Its buckets start from the first result after the clear.
        w.record(t0 + secs(3), true);
        assert_eq!(w.counts(t0 + secs(3)), (1, 0));
        assert_eq!(w.counts(t0 + secs(12)), (1, 0), "still within 10 s of that result");
        assert_eq!(w.counts(t0 + secs(14)), (0, 0));
    }

    #[test]
    fn classify_uses_exact_boundaries() {
        let t = HealthThresholds::default();
        assert_eq!(t.classify(96, 4), HealthState::Healthy);
        assert_eq!(t.classify(95, 5), HealthState::Degraded, "exactly 95 % is not above 95 %");
        assert_eq!(t.classify(80, 20), HealthState::Degraded, "exactly 80 % is still degraded");
        assert_eq!(t.classify(79, 21), HealthState::Unhealthy);
        assert_eq!(t.classify(100, 0), HealthState::Healthy);
        assert_eq!(t.classify(0, 100), HealthState::Unhealthy);
    }

    #[test]
    fn fewer_than_min_requests_is_healthy() {
        let t = HealthThresholds::default();
        assert_eq!(t.classify(0, 9), HealthState::Healthy);
        assert_eq!(t.classify(0, 10), HealthState::Unhealthy);
        assert_eq!(t.classify(0, 0), HealthState::Healthy);
        let t = HealthThresholds { min_requests: 0, ..t };
        assert_eq!(t.classify(0, 0), HealthState::Healthy, "no data is healthy even with no minimum");
        assert_eq!(t.classify(0, 1), HealthState::Unhealthy);
    }

    #[test]
    fn score_is_the_success_rate_or_one_without_data() {
        assert_eq!(score(0, 0), 1.0);
        assert_eq!(score(3, 1), 0.75);
        assert_eq!(score(0, 5), 0.0);
    }

    #[test]
    fn default_thresholds_are_valid() {
        assert!(HealthThresholds::default().validate().is_empty());
    }

    #[test]
    fn validate_reports_every_problem() {
        let bad = HealthThresholds { healthy: 0.5, degraded: 0.9, min_requests: 1 };
        assert_eq!(bad.validate().len(), 1);
        let bad = HealthThresholds { healthy: 1.5, degraded: 0.0, min_requests: 1 };
        assert_eq!(bad.validate().len(), 2);
        let bad = HealthThresholds { healthy: f64::NAN, degraded: f64::NAN, min_requests: 1 };
        assert_eq!(bad.validate().len(), 2);
    }

    #[test]
    fn health_state_deserializes_from_kebab_case() {
        use serde::de::{IntoDeserializer, value::Error};
        let d: serde::de::value::StrDeserializer<'_, Error> = "unhealthy".into_deserializer();
        assert_eq!(HealthState::deserialize(d).unwrap(), HealthState::Unhealthy);
    }

    #[test]
    fn an_empty_window_has_no_rate() {
        let w = HealthWindow::default();
        assert_eq!(w.counts(Instant::now()), (0, 0));
        assert_eq!(w.success_rate(Instant::now()), None);
    }

    #[test]
    fn window_counts_recent_results() {
        let t0 = Instant::now();
        let mut w = HealthWindow::default();
        for i in 0..8 {
            w.record(t0 + Duration::from_millis(i * 500), i % 4 != 0);
        }
        assert_eq!(w.counts(t0 + secs(4)), (6, 2));
        assert_eq!(w.success_rate(t0 + secs(4)), Some(0.75));
    }

    #[test]
    fn results_expire_after_the_window() {
        let t0 = Instant::now();
        let mut w = HealthWindow::new(secs(10), 10);
        w.record(t0, false);
        w.record(t0 + secs(5), true);
        assert_eq!(w.counts(t0 + Duration::from_millis(9_999)), (1, 1));
        assert_eq!(w.counts(t0 + secs(10)), (1, 0), "the first bucket has left the window");
        assert_eq!(w.counts(t0 + secs(15)), (0, 0));
    }

    #[test]
    fn an_unhealthy_connection_recovers_when_its_failures_expire() {
        let t0 = Instant::now();
        let th = HealthThresholds::default();
        let mut w = HealthWindow::default();
        for _ in 0..20 {
            w.record(t0, false);
        }
        assert_eq!(w.state(t0 + secs(1), &th), HealthState::Unhealthy);
        assert_eq!(w.state(t0 + secs(11), &th), HealthState::Healthy);
    }

    #[test]
    fn reused_buckets_forget_their_old_counts() {
        let t0 = Instant::now();
        let mut w = HealthWindow::new(secs(10), 10);
        w.record(t0, false);
        w.record(t0 + secs(10), true); // same ring slot, next lap
        assert_eq!(w.counts(t0 + secs(10)), (1, 0));
    }

    #[test]
    fn a_stale_instant_older_than_the_window_is_dropped() {
        let t0 = Instant::now();
        let mut w = HealthWindow::new(secs(10), 10);
        w.record(t0, true);
        w.record(t0 + secs(10), true);
        w.record(t0, false); // a whole lap behind the slot's data
        assert_eq!(w.counts(t0 + secs(10)), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn window_expires_with_the_paused_clock() {
        let mut w = HealthWindow::default();
        w.record(Instant::now(), false);
        tokio::time::advance(secs(10)).await;
        assert_eq!(w.counts(Instant::now()), (0, 0));
    }

    proptest! {
        /// Whatever the timing, a window never reports more than was recorded within it, and
        /// never forgets a result younger than `window − window / buckets`.
        #[test]
        fn counts_never_exceed_what_was_recorded_within_the_window(
            buckets in 1usize..12,
            window_ms in 1u64..5_000,
            steps in proptest::collection::vec((0u64..2_000, any::<bool>()), 1..200),
        ) {
            let t0 = Instant::now();
            let window = Duration::from_millis(window_ms);
            let mut w = HealthWindow::new(window, buckets);
            let bucket = window / buckets as u32;
            let mut log: Vec<(Instant, bool)> = Vec::new();
            let mut now = t0;
            for (advance_ms, success) in steps {
                now += Duration::from_millis(advance_ms);
                w.record(now, success);
                log.push((now, success));
                let (s, f) = w.counts(now);
                let within = |age_limit: Duration, want: bool| {
                    log.iter().filter(|&&(t, ok)| ok == want && now - t < age_limit).count() as u64
                };
                prop_assert!(s <= within(window, true), "successes {s} > recorded");
                prop_assert!(f <= within(window, false), "failures {f} > recorded");
                let sure = bucket * (buckets as u32 - 1);
                prop_assert!(s >= within(sure, true));
                prop_assert!(f >= within(sure, false));
            }
        }
    }
}
