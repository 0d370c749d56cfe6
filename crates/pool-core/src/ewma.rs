//! The latency estimate the balancers use: a peak-sensitive, time-decayed EWMA.
//!
//! # Peak-EWMA
//!
//! [`PeakEwma`] tracks a round-trip time that reacts *at once* to a slow response and forgets it
//! gradually:
//!
//! * an observed RTT **above** the estimate replaces it immediately (the "peak"), so a balancer
//!   stops favouring an agent the moment it becomes slow;
//! * an RTT **at or below** the estimate pulls it down with weight `w = exp(-elapsed / decay)`
//!   given to the old estimate: `estimate = estimate × w + rtt × (1 − w)`, where `elapsed` is the
//!   time since the previous observation. The longer the gap, the more the new sample counts, so
//!   the estimate's memory is measured in time, not in samples, and a burst of fast responses
//!   cannot erase a recent spike faster than `decay` allows.
//!
//! The default `decay` is 10 s, as in linkerd's balancer. A balancer combines the estimate with the
//! number of in-flight requests as `cost = rtt × (in_flight + 1)`; see `crate::balance`.
//!
//! Source: Finagle's `PeakEwma` load metric, as adopted by linkerd and tower
//! (`tower::load::PeakEwma`).
#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::time::Instant;

/// The default decay of a [`PeakEwma`]: 10 s, as in linkerd.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// A peak-sensitive, time-decayed RTT estimate. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakEwma {
    decay: Duration,
    estimate_ns: f64,
    last: Option<Instant>,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new(DEFAULT_DECAY)
    }
}

impl PeakEwma {
    /// An estimator with no estimate yet; `decay` is the time constant of the decay toward lower
    /// RTTs. A zero `decay` means no memory: the estimate is always the last RTT.
    pub fn new(decay: Duration) -> Self {
        Self { decay, estimate_ns: 0.0, last: None }
    }

    /// Folds in one round-trip time observed at `now` and returns the new estimate in nanoseconds.
    pub fn observe(&mut self, now: Instant, rtt: Duration) -> u64 {
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > self.estimate_ns || self.decay.is_zero() {
            self.estimate_ns = rtt_ns;
        } else {
            // An earlier `now` (callers racing to record) counts as no time elapsed.
            let elapsed = self.last.map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
            let w = (-elapsed.as_secs_f64() / self.decay.as_secs_f64()).exp();
            self.estimate_ns = self.estimate_ns * w + rtt_ns * (1.0 - w);
        }
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        self.estimate_ns()
    }

    /// Forgets the estimate, as a freshly made estimator would (the decay stays).
    pub fn reset(&mut self) {
        self.estimate_ns = 0.0;
        self.last = None;
    }

    /// The current estimate in nanoseconds, rounded; 0 means no estimate yet.
    pub fn estimate_ns(&self) -> u64 {
        // `as` saturates, so absurd RTTs cannot wrap.
        self.estimate_ns.round() as u64
    }

    /// The configured decay.
    pub fn decay(&self) -> Duration {
        self.decay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_reset_estimator_behaves_like_a_new_one() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(ms(100));
        e.observe(t0, ms(900));
        e.reset();
        assert_eq!(e.estimate_ns(), 0);
        assert_eq!(e.decay(), ms(100));
        // The first sample after a reset is the estimate, not a decay from the old peak.
        assert_eq!(e.observe(t0 + ms(1), ms(2)), 2 * MS);
    }

    #[test]
    fn peak_ewma_starts_without_an_estimate() {
        assert_eq!(PeakEwma::default().estimate_ns(), 0);
        assert_eq!(PeakEwma::default().decay(), Duration::from_secs(10));
    }

    #[test]
    fn first_observation_becomes_the_estimate() {
        let mut e = PeakEwma::default();
        assert_eq!(e.observe(Instant::now(), ms(20)), 20 * MS);
    }

    #[test]
    fn a_slower_rtt_replaces_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(t0, ms(10));
        assert_eq!(e.observe(t0 + ms(1), ms(500)), 500 * MS);
    }

    #[test]
    fn a_faster_rtt_decays_the_estimate_by_elapsed_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_secs(10));
        e.observe(t0, ms(100));
        // One decay period later the old estimate keeps weight e⁻¹.
        let got = e.observe(t0 + Duration::from_secs(10), ms(0)) as f64;
        let expected = 100.0 * MS as f64 * (-1.0f64).exp();
        assert!((got - expected).abs() < 1.0, "{got} vs {expected}");
    }

    #[test]
    fn a_fast_rtt_at_the_same_instant_does_not_move_the_estimate() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(t0, ms(100));
        assert_eq!(e.observe(t0, ms(1)), 100 * MS);
    }

    #[test]
    fn a_long_quiet_period_lets_the_next_sample_dominate() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(t0, ms(100));
        let got = e.observe(t0 + Duration::from_secs(600), ms(5));
        assert!(got.abs_diff(5 * MS) < 1_000, "{got}");
    }

    #[test]
    fn a_burst_of_fast_samples_cannot_erase_a_spike_faster_than_decay() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(t0, ms(1_000));
        for i in 1..=1_000 {
            e.observe(t0 + Duration::from_micros(i), ms(1));
        }
        // 1 ms of elapsed time out of a 10 s decay: the spike is almost intact.
        assert!(e.estimate_ns() > 999 * MS);
    }

    #[test]
    fn an_earlier_instant_counts_as_no_elapsed_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(t0 + Duration::from_secs(5), ms(100));
        assert_eq!(e.observe(t0, ms(1)), 100 * MS);
    }

    #[test]
    fn zero_decay_always_takes_the_last_rtt() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::ZERO);
        e.observe(t0, ms(100));
        assert_eq!(e.observe(t0, ms(3)), 3 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_works_with_the_paused_clock() {
        let mut e = PeakEwma::default();
        e.observe(Instant::now(), ms(100));
        tokio::time::advance(Duration::from_secs(10)).await;
        let got = e.observe(Instant::now(), ms(0));
        assert!(got.abs_diff((100.0 * MS as f64 * (-1.0f64).exp()) as u64) < 2);
    }
}
