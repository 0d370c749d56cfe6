//! Envoy-style outlier ejection across the replicas (hosts) of one agent.
//!
//! Every `interval` (default 10 s) the caller hands [`OutlierDetector::evaluate`] each host's
//! successes and failures during the interval just ended. The detector compares hosts with each
//! other and takes outliers out of rotation for a while. It complements the per-endpoint breaker
//! (`crate::breaker`), which reacts to consecutive failures inline; that kind of ejection is
//! deliberately not repeated here.
//!
//! # One evaluation
//!
//! 1. **Return** every ejected host whose time is up: ejected at `t` with multiplier `m`, it
//!    returns at the first evaluation at or after `t + min(base × m, max(base, max))`
//!    (defaults: 30 s × m, capped at 300 s). Returning first frees room under the ejection cap.
//! 2. **Success rate.** Among hosts with at least `success_rate_request_volume` (100) requests, if
//!    there are at least `success_rate_minimum_hosts` (5) of them, compute the mean and population
//!    standard deviation of their success rates; a host below `mean − stdev ×
//!    success_rate_stdev_factor` (1.9) is an outlier. Note that with five or more such hosts, a
//!    single host worse than all the others (who agree) is always below the threshold, however
//!    small the gap; Envoy behaves the same way. Failure percentage is the absolute test.
//! 3. **Failure percentage.** If at least `failure_percentage_minimum_hosts` (5) hosts have at
//!    least `failure_percentage_request_volume` (50) requests, each of them whose failure
//!    percentage is at or above `failure_percentage_threshold` (85) is an outlier.
//! 4. **Eject** outliers, worst success rate first, while fewer than the cap are ejected. Each
//!    ejection increments the host's multiplier.
//! 5. **Forgive**: the multiplier of every host that was not ejected at any point of the interval
//!    drops by one (not below zero), so a host that stays good earns back short ejections.
//!
//! Hosts that were ejected when the evaluation began take no part in steps 2–4: their counts
//! describe a period when they were (mostly) not receiving traffic.
//!
//! # The cap
//!
//! Envoy ejects at most `max_ejection_percent` (10 %) of the hosts, rounded down, but always
//! allows one. This pool additionally **never ejects every host**: the cap is
//! `min(max(⌊hosts × pct / 100⌋, 1), hosts − 1)`, so a single host is never ejected and a
//! degraded agent keeps serving from its least bad replica. [`OutlierDetector::resize`] and
//! [`OutlierDetector::remove`] restore the invariant when removing hosts would leave only
//! ejected ones.
//!
//! Not implemented from Envoy: the `enforcing_*` percentages (ejection is always enforced) and
//! consecutive-failure ejection (the breaker's job). `success_rate_stdev_factor` is a plain
//! factor (1.9), not Envoy's thousandths (1900).
//!
//! Source: Envoy's outlier detection (`envoy.config.cluster.v3.OutlierDetection`), with the
//! algorithm as specified for gRPC in gRFC A50 "xDS Outlier Detection Support".
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Configuration of an [`OutlierDetector`]. Defaults are Envoy's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Whether ejection happens at all. Default true.
    pub enabled: bool,
    /// How often the caller runs [`OutlierDetector::evaluate`]. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Ejection time per unit of a host's multiplier. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Upper bound of an ejection (if below `base_ejection_time`, that is the bound). Default 300 s.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this percentage of hosts (rounded down, but at least one, and never all) are
    /// ejected at once. Default 10.
    pub max_ejection_percent: u8,
    /// Success-rate ejection runs only if this many hosts have enough volume. Default 5.
    pub success_rate_minimum_hosts: u32,
    /// Requests in the interval for a host to count in success-rate ejection. Default 100.
    pub success_rate_request_volume: u64,
    /// A host below `mean − stdev × factor` is ejected. Default 1.9.
    pub success_rate_stdev_factor: f64,
    /// A host with at least this failure percentage is ejected. Default 85.
    pub failure_percentage_threshold: u8,
    /// Failure-percentage ejection runs only if this many hosts have enough volume. Default 5.
    pub failure_percentage_minimum_hosts: u32,
    /// Requests in the interval for a host to count in failure-percentage ejection. Default 50.
    pub failure_percentage_request_volume: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1.9,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
        }
    }
}

impl OutlierConfig {
    /// Every problem with this configuration, as human-readable messages; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.interval.is_zero() {
            problems.push("outlier.interval must be greater than zero".to_owned());
        }
        if self.base_ejection_time.is_zero() {
            problems.push("outlier.base_ejection_time must be greater than zero".to_owned());
        }
        if self.max_ejection_percent > 100 {
            problems.push(format!(
                "outlier.max_ejection_percent ({}) must be at most 100",
                self.max_ejection_percent
            ));
        }
        if self.failure_percentage_threshold > 100 {
            problems.push(format!(
                "outlier.failure_percentage_threshold ({}) must be at most 100",
                self.failure_percentage_threshold
            ));
        }
        if !(self.success_rate_stdev_factor.is_finite() && self.success_rate_stdev_factor >= 0.0) {
            problems.push(format!(
                "outlier.success_rate_stdev_factor ({}) must be a non-negative number",
                self.success_rate_stdev_factor
            ));
        }
        problems
    }

    /// How long a host with ejection multiplier `multiplier` stays ejected.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        let cap = self.base_ejection_time.max(self.max_ejection_time);
        self.base_ejection_time.saturating_mul(multiplier).min(cap)
    }
}

/// One host's results during one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalCounts {
    /// Requests that succeeded.
    pub successes: u64,
    /// Requests that failed.
    pub failures: u64,
}

impl IntervalCounts {
    fn total(self) -> u64 {
        self.successes.saturating_add(self.failures)
    }

    fn success_rate(self) -> f64 {
        match self.total() {
            0 => 1.0,
            total => self.successes as f64 / total as f64,
        }
    }
}

/// A change in a host's ejection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Taken out of rotation.
    Ejected,
    /// Back in rotation.
    Returned,
}

#[derive(Clone, Copy, Debug, Default)]
struct Host {
    /// When the current ejection began; `None` while in rotation.
    ejected_at: Option<Instant>,
    multiplier: u32,
}

/// Interval-based outlier ejection over a list of hosts. See the module documentation.
///
/// Invariant: `ejected_count() < hosts()` whenever `hosts() >= 1`.
#[derive(Clone, Debug)]
pub struct OutlierDetector {
    cfg: OutlierConfig,
    hosts: Vec<Host>,
}

impl OutlierDetector {
    /// A detector for `hosts` hosts, none ejected.
    pub fn new(cfg: OutlierConfig, hosts: usize) -> Self {
        Self { cfg, hosts: vec![Host::default(); hosts] }
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierConfig {
        &self.cfg
    }

    /// How many hosts are tracked.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Adds or removes hosts at the end. Returns the hosts returned to rotation to keep at least one
    /// host un-ejected (the one whose ejection would end first); usually empty.
    pub fn resize(&mut self, hosts: usize) -> Vec<(usize, Verdict)> {
        self.hosts.resize(hosts, Host::default());
        self.keep_one_in_rotation()
    }

    /// Stops tracking `host`; the hosts after it move down by one place, with their state. Returns,
    /// in the new numbering, the host returned to rotation if only ejected ones were left (the one
    /// whose ejection would end first); usually empty. An unknown host changes nothing.
    pub fn remove(&mut self, host: usize) -> Vec<(usize, Verdict)> {
        if host >= self.hosts.len() {
            return Vec::new();
        }
        self.hosts.remove(host);
        self.keep_one_in_rotation()
    }

    /// Restores the invariant after hosts were removed: if every host is ejected, the one due
    /// back first returns now.
    fn keep_one_in_rotation(&mut self) -> Vec<(usize, Verdict)> {
        let hosts = self.hosts.len();
        if hosts == 0 || self.ejected_count() < hosts {
            return Vec::new();
        }
        let soonest = (0..hosts).min_by_key(|&i| self.ejected_until(i)).expect("hosts >= 1");
        self.hosts[soonest].ejected_at = None;
        vec![(soonest, Verdict::Returned)]
    }

    /// Whether `host` is currently ejected; false for an unknown host.
    pub fn is_ejected(&self, host: usize) -> bool {
        self.hosts.get(host).is_some_and(|h| h.ejected_at.is_some())
    }

    /// How many hosts are currently ejected.
    pub fn ejected_count(&self) -> usize {
        self.hosts.iter().filter(|h| h.ejected_at.is_some()).count()
    }

    /// The ejection multiplier of `host`: ejections not yet forgiven. 0 for an unknown host.
    pub fn multiplier(&self, host: usize) -> u32 {
        self.hosts.get(host).map_or(0, |h| h.multiplier)
    }

    /// When the current ejection of `host` ends (it returns at the first evaluation at or after
    /// this instant); `None` if it is not ejected.
    pub fn ejected_until(&self, host: usize) -> Option<Instant> {
        let h = self.hosts.get(host)?;
        h.ejected_at.map(|at| later(at, self.cfg.ejection_time(h.multiplier)))
    }

    /// The most hosts that may be ejected at once. See "The cap" in the module documentation.
    pub fn max_ejected(&self) -> usize {
        let n = self.hosts.len();
        let by_percent = n * usize::from(self.cfg.max_ejection_percent.min(100)) / 100;
        by_percent.max(1).min(n.saturating_sub(1))
    }

    /// One interval's analysis; `counts[i]` = host `i`'s results in the interval just ended (missing
    /// entries count as no traffic, extra ones are ignored). Returns the hosts whose ejection state
    /// changed, returns first.
    pub fn evaluate(&mut self, now: Instant, counts: &[IntervalCounts]) -> Vec<(usize, Verdict)> {
        let mut changes = Vec::new();
        let was_ejected: Vec<bool> = self.hosts.iter().map(|h| h.ejected_at.is_some()).collect();

        for (i, host) in self.hosts.iter_mut().enumerate() {
            if let Some(at) = host.ejected_at
                && now >= later(at, self.cfg.ejection_time(host.multiplier))
            {
                host.ejected_at = None;
                changes.push((i, Verdict::Returned));
            }
        }

        if self.cfg.enabled {
            let count = |i: usize| counts.get(i).copied().unwrap_or_default();
            let mut outliers = self.success_rate_outliers(&was_ejected, count);
            outliers.extend(self.failure_percentage_outliers(&was_ejected, count));
            outliers.sort_by(|&a, &b| {
                count(a).success_rate().total_cmp(&count(b).success_rate()).then(a.cmp(&b))
            });
            outliers.dedup();
            let room = self.max_ejected().saturating_sub(self.ejected_count());
            for i in outliers.into_iter().take(room) {
                let host = &mut self.hosts[i];
                host.ejected_at = Some(now);
                host.multiplier = host.multiplier.saturating_add(1);
                changes.push((i, Verdict::Ejected));
            }
        }

        for (host, was) in self.hosts.iter_mut().zip(was_ejected) {
            if !was && host.ejected_at.is_none() {
                host.multiplier = host.multiplier.saturating_sub(1);
            }
        }
        changes
    }

    /// Hosts below `mean − stdev × factor`, if enough hosts have enough volume.
    fn success_rate_outliers(
        &self,
        was_ejected: &[bool],
        count: impl Fn(usize) -> IntervalCounts,
    ) -> Vec<usize> {
        let volume = self.cfg.success_rate_request_volume;
        let qualified: Vec<(usize, f64)> = (0..self.hosts.len())
            .filter(|&i| !was_ejected[i] && count(i).total() >= volume.max(1))
            .map(|i| (i, count(i).success_rate()))
            .collect();
        if qualified.is_empty() || qualified.len() < self.cfg.success_rate_minimum_hosts as usize {
            return Vec::new();
        }
        let n = qualified.len() as f64;
        let mean = qualified.iter().map(|&(_, r)| r).sum::<f64>() / n;
        let variance = qualified.iter().map(|&(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        // The margin keeps float rounding from ejecting hosts whose rates are all equal.
        let threshold = mean - variance.sqrt() * self.cfg.success_rate_stdev_factor - 1e-12;
        qualified.into_iter().filter(|&(_, r)| r < threshold).map(|(i, _)| i).collect()
    }

    /// Hosts at or above the failure-percentage threshold, if enough hosts have enough volume.
    fn failure_percentage_outliers(
        &self,
        was_ejected: &[bool],
        count: impl Fn(usize) -> IntervalCounts,
    ) -> Vec<usize> {
        let volume = self.cfg.failure_percentage_request_volume;
        let qualified: Vec<usize> =
            (0..self.hosts.len()).filter(|&i| !was_ejected[i] && count(i).total() >= volume.max(1)).collect();
        if qualified.len() < self.cfg.failure_percentage_minimum_hosts as usize {
            return Vec::new();
        }
        let threshold = u128::from(self.cfg.failure_percentage_threshold);
        // Integer comparison: exactly 85 % must count as 85 %.
        qualified
            .into_iter()
            .filter(|&i| u128::from(count(i).failures) * 100 >= threshold * u128::from(count(i).total()))
            .collect()
    }
}

/// `at + d`, saturating at about 30 years: a period too long to represent means "for good".
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).or_else(|| at.checked_add(Duration::from_secs(30 * 365 * 86_400))).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn c(successes: u64, failures: u64) -> IntervalCounts {
        IntervalCounts { successes, failures }
    }

    /// Failure-percentage ejection out of the way, to test success rate alone.
    fn success_rate_only() -> OutlierConfig {
        OutlierConfig { failure_percentage_minimum_hosts: u32::MAX, ..OutlierConfig::default() }
    }

    /// Success-rate ejection out of the way, to test failure percentage alone.
    fn failure_percentage_only() -> OutlierConfig {
        OutlierConfig { success_rate_minimum_hosts: u32::MAX, ..OutlierConfig::default() }
    }

    #[test]
    fn success_rate_ejects_a_host_far_below_the_others() {
        let t0 = Instant::now();
        let mut d = OutlierDetector::new(success_rate_only(), 5);
        let counts = [c(100, 0), c(100, 0), c(100, 0), c(100, 0), c(40, 60)];
        assert_eq!(d.evaluate(t0, &counts), [(4, Verdict::Ejected)]);
        assert!(d.is_ejected(4));
        assert_eq!(d.multiplier(4), 1);
    }

    #[test]
    fn a_lone_slightly_worse_host_is_ejected_like_in_envoy() {
        let mut d = OutlierDetector::new(success_rate_only(), 5);
        let counts = [c(100, 0), c(100, 0), c(100, 0), c(100, 0), c(99, 1)];
        assert_eq!(d.evaluate(Instant::now(), &counts), [(4, Verdict::Ejected)]);
    }

    #[test]
    fn success_rate_ejects_nobody_when_hosts_are_alike() {
        let mut d = OutlierDetector::new(success_rate_only(), 6);
        let counts = [c(90, 10); 6];
        assert!(d.evaluate(Instant::now(), &counts).is_empty());
    }

    #[test]
    fn success_rate_ejects_nobody_among_equal_rates_even_with_a_small_factor() {
        let cfg = OutlierConfig { success_rate_stdev_factor: 0.0, ..success_rate_only() };
        let mut d = OutlierDetector::new(cfg, 7);
        assert!(d.evaluate(Instant::now(), &[c(70, 30); 7]).is_empty());
    }

    #[test]
    fn success_rate_spares_a_host_within_the_spread() {
        let mut d = OutlierDetector::new(success_rate_only(), 6);
        let counts = [c(95, 5), c(90, 10), c(85, 15), c(95, 5), c(90, 10), c(85, 15)];
        assert!(d.evaluate(Instant::now(), &counts).is_empty());
    }

    #[test]
    fn success_rate_needs_minimum_hosts_with_volume() {
        let mut d = OutlierDetector::new(success_rate_only(), 5);
        // Host 3 has 99 requests: only four hosts qualify.
        let counts = [c(100, 0), c(100, 0), c(100, 0), c(99, 0), c(0, 100)];
        assert!(d.evaluate(Instant::now(), &counts).is_empty());
    }

    #[test]
    fn failure_percentage_ejects_at_the_threshold() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let counts = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(15, 85)];
        assert_eq!(d.evaluate(Instant::now(), &counts), [(4, Verdict::Ejected)]);
    }

    #[test]
    fn failure_percentage_spares_a_host_just_below_the_threshold() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let counts = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(16, 84)];
        assert!(d.evaluate(Instant::now(), &counts).is_empty());
    }

    #[test]
    fn failure_percentage_needs_minimum_hosts_with_volume() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let counts = [c(50, 0), c(50, 0), c(50, 0), c(49, 0), c(0, 50)];
        assert!(d.evaluate(Instant::now(), &counts).is_empty());
    }

    #[test]
    fn at_most_max_ejection_percent_are_ejected_worst_first() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 20);
        let mut counts = vec![c(100, 0); 20];
        counts[3] = c(10, 90);
        counts[7] = c(0, 100);
        counts[11] = c(5, 95);
        counts[15] = c(12, 88);
        let mut ejected: Vec<_> = d.evaluate(Instant::now(), &counts).into_iter().map(|(i, _)| i).collect();
        ejected.sort();
        assert_eq!(ejected, [7, 11], "10 % of 20 is two: the two worst");
        assert_eq!(d.max_ejected(), 2);
    }

    #[test]
    fn at_least_one_host_may_be_ejected_whatever_the_percentage() {
        let d = OutlierDetector::new(OutlierConfig::default(), 5);
        assert_eq!(d.max_ejected(), 1);
        let d =
            OutlierDetector::new(OutlierConfig { max_ejection_percent: 0, ..OutlierConfig::default() }, 5);
        assert_eq!(d.max_ejected(), 1);
    }

    #[test]
    fn all_hosts_are_never_ejected() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            failure_percentage_minimum_hosts: 1,
            ..failure_percentage_only()
        };
        let mut d = OutlierDetector::new(cfg.clone(), 3);
        let changes = d.evaluate(Instant::now(), &[c(0, 100); 3]);
        assert_eq!(changes.len(), 2);
        assert_eq!(d.ejected_count(), 2);
        let mut single = OutlierDetector::new(cfg, 1);
        assert!(single.evaluate(Instant::now(), &[c(0, 100)]).is_empty());
        assert_eq!(single.max_ejected(), 0);
    }

    #[test]
    fn an_ejected_host_returns_after_base_ejection_time() {
        let t0 = Instant::now();
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let bad = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50)];
        let quiet = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 0)];
        d.evaluate(t0, &bad);
        assert!(d.evaluate(t0 + secs(10), &quiet).is_empty());
        assert!(d.evaluate(t0 + secs(20), &quiet).is_empty());
        assert_eq!(d.evaluate(t0 + secs(30), &quiet), [(4, Verdict::Returned)]);
        assert!(!d.is_ejected(4));
    }

    #[test]
    fn ejection_time_grows_with_the_multiplier() {
        let t0 = Instant::now();
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let bad = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50)];
        let quiet = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 0)];
        d.evaluate(t0, &bad);
        d.evaluate(t0 + secs(30), &bad); // returns; its counts are from its ejection, so ignored
        assert!(!d.is_ejected(4));
        assert_eq!(d.multiplier(4), 1, "not forgiven for an interval spent ejected");
        assert_eq!(d.evaluate(t0 + secs(40), &bad), [(4, Verdict::Ejected)]);
        assert_eq!(d.multiplier(4), 2);
        assert!(d.evaluate(t0 + secs(90), &quiet).is_empty(), "60 s not yet over");
        assert_eq!(d.evaluate(t0 + secs(100), &quiet), [(4, Verdict::Returned)]);
    }

    #[test]
    fn ejection_time_is_capped() {
        let cfg = OutlierConfig::default();
        assert_eq!(cfg.ejection_time(1), secs(30));
        assert_eq!(cfg.ejection_time(3), secs(90));
        assert_eq!(cfg.ejection_time(10), secs(300));
        assert_eq!(cfg.ejection_time(11), secs(300));
        assert_eq!(cfg.ejection_time(u32::MAX), secs(300));
        let short_max = OutlierConfig { max_ejection_time: secs(10), ..cfg };
        assert_eq!(short_max.ejection_time(5), secs(30), "the cap is never below base");
    }

    #[test]
    fn multiplier_is_forgiven_one_per_clean_interval() {
        let t0 = Instant::now();
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        let bad = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50)];
        let good = [c(50, 0); 5];
        d.evaluate(t0, &bad);
        d.evaluate(t0 + secs(30), &good);
        assert_eq!(d.evaluate(t0 + secs(40), &bad), [(4, Verdict::Ejected)]);
        assert_eq!(d.multiplier(4), 2);
        d.evaluate(t0 + secs(100), &good); // returns
        d.evaluate(t0 + secs(110), &good);
        assert_eq!(d.multiplier(4), 1);
        d.evaluate(t0 + secs(120), &good);
        assert_eq!(d.multiplier(4), 0);
        d.evaluate(t0 + secs(130), &good);
        assert_eq!(d.multiplier(4), 0, "not below zero");
    }

    #[test]
    fn disabled_detector_never_ejects() {
        let mut d = OutlierDetector::new(OutlierConfig { enabled: false, ..OutlierConfig::default() }, 5);
        let bad = [c(100, 0), c(100, 0), c(100, 0), c(100, 0), c(0, 100)];
        assert!(d.evaluate(Instant::now(), &bad).is_empty());
    }

    #[test]
    fn missing_counts_mean_no_traffic() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 6);
        let bad = [c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50)];
        assert_eq!(d.evaluate(Instant::now(), &bad), [(4, Verdict::Ejected)]);
    }

    #[test]
    fn resize_adds_fresh_hosts_and_drops_from_the_end() {
        let mut d = OutlierDetector::new(failure_percentage_only(), 5);
        d.evaluate(Instant::now(), &[c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50)]);
        assert!(d.resize(8).is_empty());
        assert_eq!((d.hosts(), d.ejected_count()), (8, 1));
        assert!(!d.is_ejected(7));
        assert!(d.resize(4).is_empty());
        assert_eq!(d.ejected_count(), 0);
        assert!(!d.is_ejected(4));
    }

    #[test]
    fn resize_never_leaves_only_ejected_hosts() {
        let t0 = Instant::now();
        let cfg = OutlierConfig {
            failure_percentage_minimum_hosts: 1,
            max_ejection_percent: 100,
            ..failure_percentage_only()
        };
        let mut d = OutlierDetector::new(cfg, 3);
        d.evaluate(t0, &[c(0, 50), c(50, 0), c(0, 50)]);
        assert_eq!(d.ejected_count(), 2);
        // Only host 0 remains, and it is ejected: it must return.
        assert_eq!(d.resize(1), [(0, Verdict::Returned)]);
        assert_eq!(d.ejected_count(), 0);
    }

    #[test]
    fn remove_shifts_the_later_hosts_down_with_their_state() {
        let t0 = Instant::now();
        let mut d = OutlierDetector::new(failure_percentage_only(), 6);
        d.evaluate(t0, &[c(50, 0), c(50, 0), c(50, 0), c(50, 0), c(0, 50), c(50, 0)]);
        let until = d.ejected_until(4);
        assert!(d.remove(1).is_empty());
        assert_eq!((d.hosts(), d.ejected_count()), (5, 1));
        assert!(d.is_ejected(3) && !d.is_ejected(4));
        assert_eq!((d.ejected_until(3), d.multiplier(3)), (until, 1));
        assert!(d.remove(9).is_empty(), "an unknown host changes nothing");
        assert_eq!(d.hosts(), 5);
        assert!(d.remove(3).is_empty());
        assert_eq!(d.ejected_count(), 0);
    }

    #[test]
    fn removing_the_last_host_in_rotation_returns_the_one_due_back_first() {
        let t0 = Instant::now();
        let cfg = OutlierConfig {
            failure_percentage_minimum_hosts: 1,
            max_ejection_percent: 100,
            ..failure_percentage_only()
        };
        let mut d = OutlierDetector::new(cfg, 3);
        d.evaluate(t0, &[c(0, 50), c(50, 0), c(50, 0)]);
        // Host 2 is ejected later, so it is due back later.
        d.evaluate(t0 + secs(10), &[c(0, 0), c(50, 0), c(0, 50)]);
        assert!(d.is_ejected(0) && !d.is_ejected(1) && d.is_ejected(2));
        assert_eq!(d.remove(1), [(0, Verdict::Returned)]);
        assert!(!d.is_ejected(0) && d.is_ejected(1));
    }

    #[test]
    fn default_config_is_valid_and_validate_reports_every_problem() {
        assert!(OutlierConfig::default().validate().is_empty());
        let bad = OutlierConfig {
            interval: Duration::ZERO,
            base_ejection_time: Duration::ZERO,
            max_ejection_percent: 101,
            failure_percentage_threshold: 200,
            success_rate_stdev_factor: f64::NAN,
            ..OutlierConfig::default()
        };
        assert_eq!(bad.validate().len(), 5);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Evaluate { advance_s: u64, counts: Vec<(u64, u64)> },
        Resize(usize),
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..60, proptest::collection::vec((0u64..20, 0u64..20), 0..10))
                .prop_map(|(advance_s, counts)| Op::Evaluate { advance_s, counts }),
            1 => (0usize..10).prop_map(Op::Resize),
            1 => (0usize..10).prop_map(Op::Remove),
        ]
    }

    fn config() -> impl Strategy<Value = OutlierConfig> {
        (0u8..=100, 0u32..4, 0u64..10, 0.0f64..3.0, 0u8..=100, 0u32..4, 0u64..10, 1u64..60, 0u64..120)
            .prop_map(|(pct, sr_hosts, sr_volume, factor, fp_threshold, fp_hosts, fp_volume, base, max)| {
                OutlierConfig {
                    enabled: true,
                    interval: secs(10),
                    base_ejection_time: secs(base),
                    max_ejection_time: secs(max),
                    max_ejection_percent: pct,
                    success_rate_minimum_hosts: sr_hosts,
                    success_rate_request_volume: sr_volume,
                    success_rate_stdev_factor: factor,
                    failure_percentage_threshold: fp_threshold,
                    failure_percentage_minimum_hosts: fp_hosts,
                    failure_percentage_request_volume: fp_volume,
                }
            })
    }

    proptest! {
        #[test]
        fn never_ejects_every_host_and_reports_every_change(
            cfg in config(),
            hosts in 0usize..10,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let mut now = Instant::now();
            let mut d = OutlierDetector::new(cfg.clone(), hosts);
            for op in ops {
                let mut before: Vec<bool> = (0..d.hosts()).map(|i| d.is_ejected(i)).collect();
                let changes = match op {
                    Op::Evaluate { advance_s, counts } => {
                        now += secs(advance_s);
                        let counts: Vec<_> = counts.into_iter().map(|(s, f)| c(s, f)).collect();
                        d.evaluate(now, &counts)
                    }
                    Op::Resize(n) => d.resize(n),
                    Op::Remove(h) => {
                        if h < before.len() {
                            before.remove(h);
                        }
                        d.remove(h)
                    }
                };
                let n = d.hosts();
                if n <= 1 {
                    prop_assert_eq!(d.ejected_count(), 0);
                } else {
                    prop_assert!(d.ejected_count() < n);
                }
                // The verdicts are exactly the changes of state among surviving hosts.
                for i in 0..n {
                    let was = before.get(i).copied().unwrap_or(false);
                    let verdict = changes.iter().find(|&&(h, _)| h == i).map(|&(_, v)| v);
                    let expected = match (was, d.is_ejected(i)) {
                        (false, true) => Some(Verdict::Ejected),
                        (true, false) => Some(Verdict::Returned),
                        _ => None,
                    };
                    prop_assert_eq!(verdict, expected, "host {}", i);
                }
                prop_assert!(changes.iter().all(|&(h, _)| h < n));
            }
        }
    }
}
