//! A per-endpoint circuit breaker: closed, open, half-open, as a pure state machine.
//!
//! # Wording
//!
//! Classic breaker wording, the opposite of linkerd's "gate": **closed** lets traffic through,
//! **open** rejects it.
//!
//! # Algorithm
//!
//! * **Closed.** Every request is admitted. Each failure increments a consecutive-failure count
//!   and each success resets it; at `failure_threshold` (default 5) the breaker trips **open**.
//! * **Open** until an instant `until = trip time + reset period`. Everything is rejected, giving
//!   the agent time to recover instead of piling retries on it.
//! * **Half-open.** The first [`CircuitBreaker::try_acquire`] at or after `until` is admitted as
//!   the single **probe**; everything else is rejected while the probe is out. The probe's success
//!   closes the breaker and resets the growth; its failure re-opens it for the *next*, longer
//!   period. If the probe's caller goes away without a result, [`CircuitBreaker::probe_abandoned`]
//!   lets the next caller probe instead, so a cancelled request cannot wedge the breaker.
//!
//! Results of ordinary requests that arrive while open or half-open are ignored: they were admitted
//! before the trip and say nothing about the agent's state since. This is what linkerd's
//! consecutive-failures breaker does, and it is also why only the probe's result can close the
//! breaker.
//!
//! # Reset period
//!
//! The n-th consecutive trip (n = 0 for the first since the breaker last closed) opens for
//! `d(n) = min(reset_timeout × 2ⁿ, max_reset_timeout)`, computed by `crate::backoff::Backoff`:
//!
//! * `jitter = false`: exactly `d(n)`: 30 s, 60 s, 120 s, 240 s, 300 s, 300 s, … by default;
//! * `jitter = true`: `d(n) + u × d(n)` with `u` uniform in `[0, 1)`, clamped to
//!   `max_reset_timeout`; so it lies in `[d(n), min(2 × d(n), max_reset_timeout)]`, and once
//!   `d(n)` reaches the maximum the period is exactly `max_reset_timeout`.
//!
//! Jitter keeps the breakers of many endpoints that tripped together from probing in lockstep.
//!
//! Source: the classic closed/open/half-open pattern (Nygard, "Release It!", 2007), as in
//! linkerd's consecutive-failures breaker (`linkerd/app/outbound/src/http/breaker/
//! consecutive_failures.rs`): exponential back-off while open, a single-request probation.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backoff::{Backoff, BackoffConfig};

/// Configuration of a [`CircuitBreaker`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that trip the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long the first trip keeps the breaker open. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// Each consecutive trip doubles the open period, up to this. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_reset_timeout: Duration,
    /// Randomise each open period within `[d, min(2d, max_reset_timeout)]`. Default true; tests
    /// use false for exact periods.
    pub jitter: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: Duration::from_secs(300),
            jitter: true,
        }
    }
}

impl BreakerConfig {
    /// Every problem with this configuration, as human-readable messages; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failure_threshold == 0 {
            problems.push("breaker.failure_threshold must be at least 1".to_owned());
        }
        if self.reset_timeout.is_zero() {
            problems.push("breaker.reset_timeout must be greater than zero".to_owned());
        }
        if self.max_reset_timeout < self.reset_timeout {
            problems.push(format!(
                "breaker.max_reset_timeout ({:?}) must be at least breaker.reset_timeout ({:?})",
                self.max_reset_timeout, self.reset_timeout
            ));
        }
        problems
    }

    fn backoff(&self) -> BackoffConfig {
        BackoffConfig { base: self.reset_timeout, cap: self.max_reset_timeout, jitter: self.jitter }
    }
}

/// Where a [`CircuitBreaker`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; failures are being counted.
    Closed,
    /// Requests are rejected until `until`.
    Open {
        /// The first instant at which a probe may be admitted.
        until: Instant,
    },
    /// The open period is over; one probe decides.
    HalfOpen {
        /// Whether the probe is out (then everything else is rejected).
        probing: bool,
    },
}

/// The answer to [`CircuitBreaker::try_acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send the request; report with `probe = false`.
    Admitted,
    /// Send the request as the half-open probe; report with `probe = true`, or call
    /// [`CircuitBreaker::probe_abandoned`] if no result will come.
    Probe,
    /// Do not send.
    Rejected,
}

/// A consecutive-failures circuit breaker. See the module documentation.
///
/// Invariants: `trips() == 0` exactly when the state is [`BreakerState::Closed`]; at most one
/// probe is out at a time; while closed, `consecutive_failures() < failure_threshold`.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    state: BreakerState,
    consecutive_failures: u32,
    trips: u32,
    periods: Backoff,
}

impl CircuitBreaker {
    /// A closed breaker whose jitter comes from the thread-local generator.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self::with_periods(&cfg, Backoff::new(&cfg.backoff()))
    }

    /// A closed breaker whose jittered periods are reproducible for a given `seed`.
    pub fn seeded(cfg: BreakerConfig, seed: u64) -> Self {
        Self::with_periods(&cfg, Backoff::seeded(&cfg.backoff(), seed))
    }

    fn with_periods(cfg: &BreakerConfig, periods: Backoff) -> Self {
        // A zero threshold would trip on nothing; `validate` reports it, this keeps it sane.
        let threshold = cfg.failure_threshold.max(1);
        Self { threshold, state: BreakerState::Closed, consecutive_failures: 0, trips: 0, periods }
    }

    /// The current state. An `Open` state whose `until` has passed stays `Open` until the next
    /// [`try_acquire`](Self::try_acquire); callers that only look should compare `until` with
    /// their own clock.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Consecutive failures counted: reset by a success while closed and by closing; includes a
    /// failed probe. Informational once open.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// How many times the breaker has opened since it was last closed (0 while closed). The
    /// n-th trip uses the n-th, growing, reset period.
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// Asks to send one request now.
    pub fn try_acquire(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Admitted,
            BreakerState::Open { until } if now < until => Admission::Rejected,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                Admission::Probe
            }
            BreakerState::HalfOpen { probing: true } => Admission::Rejected,
        }
    }

    /// Records the outcome of a request admitted earlier; `probe` says whether it was the probe.
    ///
    /// Ignored: ordinary results while open or half-open (admitted before the trip), and probe
    /// results when no probe is out (e.g. after [`probe_abandoned`](Self::probe_abandoned)).
    pub fn on_result(&mut self, now: Instant, success: bool, probe: bool) {
        match (self.state, probe) {
            (BreakerState::Closed, false) if success => self.consecutive_failures = 0,
            (BreakerState::Closed, false) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.threshold {
                    self.trip(now);
                }
            }
            (BreakerState::HalfOpen { probing: true }, true) if success => {
                self.state = BreakerState::Closed;
                self.consecutive_failures = 0;
                self.trips = 0;
                self.periods.reset();
            }
            (BreakerState::HalfOpen { probing: true }, true) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.trip(now);
            }
            _ => {}
        }
    }

    /// The probe's caller went away without a result: let another probe through.
    pub fn probe_abandoned(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    fn trip(&mut self, now: Instant) {
        self.trips = self.trips.saturating_add(1);
        let period = self.periods.next_delay();
        // A period too long to represent means "open for good"; ~30 years is as good as that.
        let until = now
            .checked_add(period)
            .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
            .unwrap_or(now);
        self.state = BreakerState::Open { until };
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn exact() -> BreakerConfig {
        BreakerConfig { jitter: false, ..BreakerConfig::default() }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn fail(b: &mut CircuitBreaker, now: Instant, n: u32) {
        for _ in 0..n {
            assert_eq!(b.try_acquire(now), Admission::Admitted);
            b.on_result(now, false, false);
        }
    }

    /// How long the breaker is open, counted from `t0`.
    fn open_period(b: &CircuitBreaker, t0: Instant) -> Duration {
        match b.state() {
            BreakerState::Open { until } => until - t0,
            other => panic!("expected open, got {other:?}"),
        }
    }

    #[test]
    fn breaker_opens_after_five_failures() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 4);
        fail(&mut b, t0, 1);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + secs(30) });
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn a_success_in_between_resets_the_count() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 4);
        b.on_result(t0, true, false);
        assert_eq!(b.consecutive_failures(), 0);
        fail(&mut b, t0, 4);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn open_breaker_rejects_until_the_period_ends() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        assert_eq!(b.try_acquire(t0), Admission::Rejected);
        assert_eq!(b.try_acquire(t0 + secs(29)), Admission::Rejected);
        assert_eq!(b.try_acquire(t0 + secs(30)), Admission::Probe);
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        let t1 = t0 + secs(31);
        assert_eq!(b.try_acquire(t1), Admission::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
        assert_eq!(b.try_acquire(t1), Admission::Rejected);
        assert_eq!(b.try_acquire(t1 + secs(100)), Admission::Rejected);
    }

    #[test]
    fn probe_success_closes_and_resets_growth() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        let t1 = t0 + secs(30);
        b.try_acquire(t1);
        b.on_result(t1, true, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!((b.trips(), b.consecutive_failures()), (0, 0));
        fail(&mut b, t1, 5);
        assert_eq!(open_period(&b, t1), secs(30), "growth restarted from reset_timeout");
    }

    #[test]
    fn probe_failure_reopens_with_a_longer_period() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        let t1 = t0 + secs(30);
        assert_eq!(b.try_acquire(t1), Admission::Probe);
        b.on_result(t1, false, true);
        assert_eq!(open_period(&b, t1), secs(60));
        assert_eq!(b.trips(), 2);
        assert_eq!(b.consecutive_failures(), 6);
    }

    #[test]
    fn periods_without_jitter_are_exact_and_capped() {
        let mut t = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t, 5);
        let mut periods = vec![open_period(&b, t)];
        for _ in 0..6 {
            let BreakerState::Open { until } = b.state() else { unreachable!() };
            t = until;
            assert_eq!(b.try_acquire(t), Admission::Probe);
            b.on_result(t, false, true);
            periods.push(open_period(&b, t));
        }
        let expected: Vec<_> = [30, 60, 120, 240, 300, 300, 300].map(secs).to_vec();
        assert_eq!(periods, expected);
    }

    #[test]
    fn jittered_periods_stay_within_documented_bounds() {
        for seed in 0..100 {
            let mut t = Instant::now();
            let mut b = CircuitBreaker::seeded(BreakerConfig::default(), seed);
            fail(&mut b, t, 5);
            let mut d = secs(30);
            for _ in 0..8 {
                let period = open_period(&b, t);
                assert!(period >= d && period <= (d * 2).min(secs(300)), "seed {seed}: {period:?} vs {d:?}");
                d = (d * 2).min(secs(300));
                t += period;
                b.try_acquire(t);
                b.on_result(t, false, true);
            }
        }
    }

    #[test]
    fn seeded_breakers_are_reproducible() {
        let run = |seed| {
            let t0 = Instant::now();
            let mut b = CircuitBreaker::seeded(BreakerConfig::default(), seed);
            fail(&mut b, t0, 5);
            open_period(&b, t0)
        };
        assert_eq!(run(3), run(3));
    }

    #[test]
    fn probe_abandoned_admits_another_probe() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        let t1 = t0 + secs(30);
        assert_eq!(b.try_acquire(t1), Admission::Probe);
        b.probe_abandoned();
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: false });
        assert_eq!(b.try_acquire(t1), Admission::Probe);
        assert_eq!(b.try_acquire(t1), Admission::Rejected);
    }

    #[test]
    fn late_results_of_requests_admitted_before_the_trip_are_ignored() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        b.on_result(t0, true, false);
        b.on_result(t0, false, false);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + secs(30) });
        let t1 = t0 + secs(30);
        b.try_acquire(t1);
        b.on_result(t1, true, false); // not the probe: cannot close
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
    }

    #[test]
    fn an_abandoned_probe_reporting_late_is_ignored() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, t0, 5);
        let t1 = t0 + secs(30);
        b.try_acquire(t1);
        b.probe_abandoned();
        b.on_result(t1, true, true);
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: false });
    }

    #[test]
    fn default_config_is_valid_and_validate_reports_every_problem() {
        assert!(BreakerConfig::default().validate().is_empty());
        let bad = BreakerConfig {
            failure_threshold: 0,
            reset_timeout: Duration::ZERO,
            max_reset_timeout: Duration::ZERO,
            jitter: false,
        };
        assert_eq!(bad.validate().len(), 2);
        let bad = BreakerConfig { max_reset_timeout: secs(1), ..BreakerConfig::default() };
        assert_eq!(bad.validate().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_reopens_for_probing_on_the_paused_clock() {
        let mut b = CircuitBreaker::new(exact());
        fail(&mut b, Instant::now(), 5);
        tokio::time::advance(secs(29)).await;
        assert_eq!(b.try_acquire(Instant::now()), Admission::Rejected);
        tokio::time::advance(secs(1)).await;
        assert_eq!(b.try_acquire(Instant::now()), Admission::Probe);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Advance(u64),
        Acquire,
        /// Completes the outstanding request at this index (modulo their number).
        Complete(usize, bool),
        Abandon,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..400_000).prop_map(Op::Advance),
            Just(Op::Acquire),
            (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Complete(i, ok)),
            Just(Op::Abandon),
        ]
    }

    proptest! {
        #[test]
        fn breaker_never_admits_two_probes_or_traffic_while_open(
            threshold in 1u32..6,
            jitter in any::<bool>(),
            seed in any::<u64>(),
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let cfg = BreakerConfig { failure_threshold: threshold, jitter, ..BreakerConfig::default() };
            let mut b = CircuitBreaker::seeded(cfg.clone(), seed);
            let mut now = Instant::now();
            let mut last_trip = now;
            // Outstanding requests: `true` marks the probe.
            let mut outstanding: Vec<bool> = Vec::new();
            for op in ops {
                let before = b.state();
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Acquire => match b.try_acquire(now) {
                        Admission::Admitted => {
                            prop_assert_eq!(before, BreakerState::Closed);
                            outstanding.push(false);
                        }
                        Admission::Probe => {
                            prop_assert!(!outstanding.contains(&true), "two probes out");
                            if let BreakerState::Open { until } = before {
                                prop_assert!(now >= until, "probe before the open period ended");
                            }
                            outstanding.push(true);
                        }
                        Admission::Rejected => {
                            prop_assert_ne!(before, BreakerState::Closed);
                        }
                    },
                    Op::Complete(i, ok) if !outstanding.is_empty() => {
                        let probe = outstanding.remove(i % outstanding.len());
                        b.on_result(now, ok, probe);
                    }
                    Op::Complete(..) => {}
                    Op::Abandon => {
                        if let Some(i) = outstanding.iter().position(|&p| p) {
                            outstanding.remove(i);
                            b.probe_abandoned();
                        }
                    }
                }
                let after = b.state();
                if matches!(after, BreakerState::Open { .. }) && after != before {
                    last_trip = now;
                }
                // The state agrees with the outstanding probe and with the counters.
                let probe_out = outstanding.contains(&true);
                prop_assert_eq!(after == (BreakerState::HalfOpen { probing: true }), probe_out);
                prop_assert_eq!(after == BreakerState::Closed, b.trips() == 0);
                match after {
                    BreakerState::Closed => prop_assert!(b.consecutive_failures() < threshold),
                    BreakerState::Open { until } => {
                        prop_assert!(until > last_trip);
                        prop_assert!(until - last_trip <= cfg.max_reset_timeout);
                    }
                    BreakerState::HalfOpen { .. } => {}
                }
            }
        }
    }
}
