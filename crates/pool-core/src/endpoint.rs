//! Per-endpoint (replica) state: the circuit breaker cell and the outlier-ejection flag.
//!
//! The breaker policy itself is the pure [`CircuitBreaker`]; [`BreakerCell`] makes it cheap to
//! consult from many threads. Its decision is mirrored into one atomic *gate* word, so the hot
//! path checks the breaker with a single load. The mutex is taken only on failures, on the
//! first success after a failure, and around the half-open probe; a run of successes on a
//! closed breaker takes no lock at all (the `clean` flag).
//!
//! Under concurrency, a success that races a failure on the fast path may skip resetting the
//! consecutive-failure count; concurrent results have no meaningful order, so the count can
//! only be pessimistic by the number of such races, never optimistic.
//!
//! An open breaker needs a timer to become half-open (nothing else looks at it while its gate
//! is shut). That timer runs on its agent's task tracker and stops with the agent's stop token,
//! so removing the agent or shutting the pool down ends it rather than leaving it asleep.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use pool_api::Endpoint;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker};
use crate::sync::{AtomicBool, AtomicU32, Mutex, Ordering, lock};

/// The breaker is open, or its single probe is in flight: send nothing.
pub(crate) const GATE_OPEN: u32 = 1;
/// Half-open: one request may go, as the probe.
pub(crate) const GATE_PROBE: u32 = 1 << 1;
/// Ejected by outlier detection.
pub(crate) const GATE_EJECTED: u32 = 1 << 2;

/// What the breaker's state looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerStatus {
    /// Requests pass.
    Closed,
    /// Requests fail fast until the reset time has passed.
    Open {
        /// Time left until a probe is allowed.
        remaining: Duration,
    },
    /// One probe request decides whether to close again.
    HalfOpen,
}

impl BreakerStatus {
    /// 0 closed, 1 open, 2 half-open: the value of the breaker-state gauge.
    pub fn as_gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open { .. } => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

/// A circuit breaker shared by every connection of one endpoint.
pub(crate) struct BreakerCell {
    gate: AtomicU32,
    clean: AtomicBool,
    machine: Mutex<CircuitBreaker>,
}

impl BreakerCell {
    pub(crate) fn new(machine: CircuitBreaker) -> Self {
        Self { gate: AtomicU32::new(0), clean: AtomicBool::new(true), machine: Mutex::new(machine) }
    }

    #[inline]
    pub(crate) fn gate(&self) -> u32 {
        self.gate.load(Ordering::Acquire)
    }

    /// Asks to send through a half-open breaker: [`Admission::Probe`] for the one probe,
    /// [`Admission::Admitted`] if a racing probe already closed it, else rejected.
    pub(crate) fn try_probe(&self, now: Instant) -> Admission {
        let mut m = lock(&self.machine);
        let admission = m.try_acquire(now);
        self.publish(&m);
        admission
    }

    /// Records a result. Returns the instant the breaker becomes probe-able if this result
    /// opened it (the caller arranges a wake-up then).
    pub(crate) fn on_result(&self, now: Instant, success: bool, probe: bool) -> Option<Instant> {
        if success && !probe && self.clean.load(Ordering::Acquire) {
            return None;
        }
        let mut m = lock(&self.machine);
        let was_open = matches!(m.state(), BreakerState::Open { .. });
        m.on_result(now, success, probe);
        self.publish(&m);
        match m.state() {
            BreakerState::Open { until } if !was_open => Some(until),
            _ => None,
        }
    }

    /// The probe's caller went away without a result.
    pub(crate) fn probe_abandoned(&self) {
        let mut m = lock(&self.machine);
        m.probe_abandoned();
        self.publish(&m);
    }

    /// Moves an open breaker whose reset time has passed to half-open, so a probe may go.
    pub(crate) fn wake(&self, now: Instant) {
        let mut m = lock(&self.machine);
        if let BreakerState::Open { until } = m.state()
            && now >= until
            && matches!(m.try_acquire(now), Admission::Probe)
        {
            // Take the probe slot and hand it straight back: half-open, probe free.
            m.probe_abandoned();
        }
        self.publish(&m);
    }

    /// A new connection to the endpoint was just established — proof of life — so an open
    /// breaker need not wait out its reset time: it goes half-open and the next request
    /// probes. A closed or half-open breaker is unchanged.
    pub(crate) fn reconnected(&self) {
        let mut m = lock(&self.machine);
        if let BreakerState::Open { until } = m.state()
            && matches!(m.try_acquire(until), Admission::Probe)
        {
            m.probe_abandoned();
        }
        self.publish(&m);
    }

    pub(crate) fn status(&self, now: Instant) -> BreakerStatus {
        match lock(&self.machine).state() {
            BreakerState::Closed => BreakerStatus::Closed,
            BreakerState::Open { until } => {
                BreakerStatus::Open { remaining: until.saturating_duration_since(now) }
            }
            BreakerState::HalfOpen { .. } => BreakerStatus::HalfOpen,
        }
    }

    pub(crate) fn set_ejected(&self, ejected: bool) {
        if ejected {
            self.gate.fetch_or(GATE_EJECTED, Ordering::AcqRel);
        } else {
            self.gate.fetch_and(!GATE_EJECTED, Ordering::AcqRel);
        }
    }

    /// Mirrors the machine's state into the gate; called with the machine locked, so gate
    /// updates happen in the same order as state changes.
    fn publish(&self, m: &CircuitBreaker) {
        let (set, clear, clean) = match m.state() {
            BreakerState::Closed => (0, GATE_OPEN | GATE_PROBE, m.consecutive_failures() == 0),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: true } => {
                (GATE_OPEN, GATE_PROBE, false)
            }
            BreakerState::HalfOpen { probing: false } => (GATE_PROBE, GATE_OPEN, false),
        };
        self.gate.fetch_and(!clear, Ordering::AcqRel);
        self.gate.fetch_or(set, Ordering::AcqRel);
        self.clean.store(clean, Ordering::Release);
    }
}

/// One endpoint of an agent.
pub(crate) struct EndpointState {
    pub(crate) endpoint: Endpoint,
    pub(crate) breaker: BreakerCell,
    breaker_gauge: Gauge,
    trips: Counter,
    ejected_gauge: Gauge,
    /// The agent's stop token and task tracker, for the breaker's wake-up timer.
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl EndpointState {
    /// An endpoint of agent `agent`, whose background work runs on `tasks` until `stop`.
    pub(crate) fn new(
        endpoint: Endpoint,
        cfg: &BreakerConfig,
        seed: Option<u64>,
        agent: &str,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let machine = match seed {
            Some(s) => CircuitBreaker::seeded(cfg.clone(), s),
            None => CircuitBreaker::new(cfg.clone()),
        };
        let labels = [("agent", agent.to_owned()), ("endpoint", endpoint.to_string())];
        Self {
            breaker: BreakerCell::new(machine),
            breaker_gauge: metrics::gauge!("agentpool_breaker_state", &labels),
            trips: metrics::counter!("agentpool_breaker_trips_total", &labels),
            ejected_gauge: metrics::gauge!("agentpool_endpoint_ejected", &labels),
            endpoint,
            stop: stop.clone(),
            tasks: tasks.clone(),
        }
    }

    #[inline]
    pub(crate) fn gate(&self) -> u32 {
        self.breaker.gate()
    }

    /// Records a result and, when it opens the breaker, schedules the move to half-open.
    pub(crate) fn record(self: &Arc<Self>, now: Instant, success: bool, probe: bool) {
        if let Some(until) = self.breaker.on_result(now, success, probe) {
            self.trips.increment(1);
            tracing::warn!(endpoint = %self.endpoint, "circuit breaker opened");
            self.schedule_wake(until);
        }
        if !success || probe {
            self.breaker_gauge.set(self.breaker.status(now).as_gauge());
        }
    }

    pub(crate) fn probe_abandoned(&self) {
        self.breaker.probe_abandoned();
    }

    /// See [`BreakerCell::reconnected`].
    pub(crate) fn reconnected(&self) {
        self.breaker.reconnected();
        self.breaker_gauge.set(self.breaker.status(Instant::now()).as_gauge());
    }

    pub(crate) fn set_ejected(&self, ejected: bool) {
        self.breaker.set_ejected(ejected);
        self.ejected_gauge.set(if ejected { 1.0 } else { 0.0 });
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.gate() & GATE_EJECTED != 0
    }

    fn schedule_wake(self: &Arc<Self>, until: Instant) {
        let this = Arc::downgrade(self);
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep_until(until) => {
                    if let Some(ep) = this.upgrade() {
                        ep.breaker.wake(Instant::now());
                        ep.breaker_gauge.set(ep.breaker.status(Instant::now()).as_gauge());
                    }
                }
            }
        });
    }
}

#[cfg(all(test, not(agentpool_loom)))]
mod tests {
    use super::*;

    fn endpoint(stop: &CancellationToken, tasks: &TaskTracker) -> Arc<EndpointState> {
        let cfg = BreakerConfig { failure_threshold: 1, jitter: false, ..BreakerConfig::default() };
        Arc::new(EndpointState::new(Endpoint::from("mem://a"), &cfg, None, "waf", stop, tasks))
    }

    #[tokio::test(start_paused = true)]
    async fn the_breakers_wake_up_runs_on_the_agents_tracker_and_ends_at_stop() {
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let ep = endpoint(&stop, &tasks);
        ep.record(Instant::now(), false, false);
        assert_eq!(tasks.len(), 1, "the wake-up is the agent's task");
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        assert!(
            matches!(ep.breaker.status(Instant::now()), BreakerStatus::Open { .. }),
            "it ended because of the stop, without moving the breaker"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_goes_half_open_when_its_wake_up_fires() {
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let ep = endpoint(&stop, &tasks);
        ep.record(Instant::now(), false, false);
        tasks.close();
        tasks.wait().await;
        assert_eq!(ep.breaker.status(Instant::now()), BreakerStatus::HalfOpen);
        assert_ne!(ep.gate() & GATE_PROBE, 0);
    }
}

#[cfg(all(test, agentpool_loom))]
mod loom_breaker {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn cell(threshold: u32) -> BreakerCell {
        let cfg = BreakerConfig { failure_threshold: threshold, jitter: false, ..BreakerConfig::default() };
        BreakerCell::new(CircuitBreaker::new(cfg))
    }

    /// Results racing on the fast and slow paths always leave the gate matching the machine.
    #[test]
    fn loom_gate_mirrors_the_machine_after_racing_results() {
        loom::model(|| {
            let now = Instant::now();
            let c = Arc::new(cell(1));
            let c2 = c.clone();
            let t = thread::spawn(move || {
                c2.on_result(now, false, false);
            });
            c.on_result(now, true, false);
            t.join().unwrap();
            let m = lock(&c.machine);
            let open = matches!(m.state(), BreakerState::Open { .. });
            assert_eq!(c.gate() & GATE_OPEN != 0, open);
            assert!(!c.clean.load(Ordering::Acquire) || !open);
        });
    }

    /// Two callers racing for the half-open probe: exactly one becomes the probe.
    #[test]
    fn loom_exactly_one_probe_in_half_open() {
        loom::model(|| {
            let now = Instant::now();
            let c = Arc::new(cell(1));
            c.on_result(now, false, false);
            let later = now + Duration::from_secs(3600);
            c.wake(later);
            assert!(c.gate() & GATE_PROBE != 0);
            let c2 = c.clone();
            let t = thread::spawn(move || matches!(c2.try_probe(later), Admission::Probe));
            let mine = matches!(c.try_probe(later), Admission::Probe);
            let theirs = t.join().unwrap();
            assert!(mine ^ theirs, "exactly one probe: {mine} {theirs}");
            assert!(c.gate() & GATE_OPEN != 0, "while probing nothing else passes");
        });
    }
}
