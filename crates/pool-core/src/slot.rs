//! A connection slot: one of the N connections an endpoint keeps, with everything the hot
//! path reads about it in atomics.
//!
//! A slot outlives the connections it holds: when a connection dies its supervisor replaces
//! it in the same slot, so the slot's in-flight count stays exact across reconnects (requests
//! of the dead connection fail at once and give their permits back here).
//!
//! Its health does not carry over: each connection starts with an empty success-rate window
//! and no latency estimate, and a result of an earlier connection that arrives after the
//! replacement (a request failing as its connection is closed) counts in the slot's lifetime
//! totals only. The connection that died had its own window; the endpoint's circuit breaker is
//! what remembers that the agent went away.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use pool_api::{AgentConnection, Capabilities, ConnectionSignals, HealthStatus};
use tokio::time::Instant;

use crate::balance::Load;
use crate::endpoint::{EndpointState, GATE_EJECTED, GATE_OPEN};
use crate::ewma::PeakEwma;
use crate::health::{self, HealthState, HealthThresholds, HealthWindow};
use crate::metrics::AgentMetrics;
use crate::permits::Permits;
use parking_lot::Mutex;

/// The agent paused this connection (flow control).
const PAUSED: u32 = 1;
/// The agent is draining, or the pool is draining this connection.
const DRAINING: u32 = 1 << 1;
/// The agent reports itself unhealthy.
const AGENT_UNHEALTHY: u32 = 1 << 2;
/// No usable connection: found closed at send time (its supervisor has not detached it yet),
/// or detached. Cleared when the supervisor attaches the replacement.
const DISCONNECTED: u32 = 1 << 3;
/// Success rate below the unhealthy threshold: used only when nothing better is available.
const SOFT_UNHEALTHY: u32 = 1 << 8;
/// The home of a slot whose connection runs anywhere.
const NO_HOME: usize = usize::MAX;
/// Any of these keeps the slot out of traffic.
const HARD: u32 = PAUSED | DRAINING | AGENT_UNHEALTHY | DISCONNECTED;

/// What a slot needs of the agent it belongs to, and all it can reach of it: the metric
/// handles its state changes move, whether the agent still admits requests, and the wake-up
/// of whoever waits for a permit when one is given back.
pub(crate) trait SlotOwner: Send + Sync + 'static {
    /// The agent's metric handles.
    fn metrics(&self) -> &AgentMetrics;
    /// True once the agent (or its pool) admits nothing more.
    fn is_closed(&self) -> bool;
    /// Called after every permit release.
    fn permit_released(&self);
}

/// How a request ended, for [`Slot::record`].
#[derive(Clone, Copy)]
pub(crate) enum Finished<'a> {
    /// The agent answered.
    Succeeded,
    /// It failed with this error.
    Failed(&'a dyn std::fmt::Display),
    /// It timed out, with this error.
    TimedOut(&'a dyn std::fmt::Display),
}

/// The connection currently in a slot.
pub(crate) struct Live {
    pub(crate) conn: Arc<dyn AgentConnection>,
    /// The slot's generation when this connection was attached: the results recorded for it
    /// belong in the health window only while the slot still holds it.
    pub(crate) generation: u64,
}

/// What a slot learned from its requests.
struct SlotHealth {
    window: HealthWindow,
    ewma: PeakEwma,
    state: HealthState,
    last_error: Option<(Instant, String)>,
    last_latency: Option<Duration>,
    requests: u64,
    failures: u64,
    timeouts: u64,
    connects: u64,
    connected_since: Option<Instant>,
}

/// A health snapshot of one connection slot.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionHealth {
    /// The label of the current connection (or of the last one, if disconnected).
    pub label: String,
    /// The endpoint the slot connects to.
    pub endpoint: String,
    /// True while a connection is up.
    pub connected: bool,
    /// Classification of the recent success rate.
    pub state: HealthState,
    /// Success rate over the health window; `None` without requests in it.
    pub success_rate: Option<f64>,
    /// Peak-EWMA latency estimate.
    pub latency_estimate: Option<Duration>,
    /// Latency of the last successful request.
    pub last_latency: Option<Duration>,
    /// The last error and how long ago it happened.
    pub last_error: Option<(String, Duration)>,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests allowed in flight at once (pool limit, lowered by the agent's maximum).
    pub limit: u32,
    /// Requests finished on this slot since the pool started.
    pub requests: u64,
    /// Of which failed (errors and time-outs).
    pub failures: u64,
    /// Of which timed out.
    pub timeouts: u64,
    /// Connections established in this slot (1 + reconnects).
    pub connects: u64,
    /// Time since the current connection came up.
    pub uptime: Option<Duration>,
    /// Paused by the agent's flow control.
    pub paused: bool,
    /// The agent's last health report.
    pub reported: HealthStatus,
    /// The worker thread the connection's I/O runs on ([`AgentConnection::home`]), if any:
    /// requests made on that thread prefer it.
    pub worker: Option<usize>,
}

/// One connection slot of an agent whose shared state is `O`.
pub(crate) struct Slot<O> {
    /// The agent the slot belongs to, as far as the slot needs it (see [`SlotOwner`]); the send
    /// path reaches the rest of the agent through it.
    pub(crate) owner: Arc<O>,
    pub(crate) endpoint: Arc<EndpointState>,
    pub(crate) permits: Permits,
    flags: AtomicU32,
    events: AtomicU8,
    rtt_ns: AtomicU64,
    score_bits: AtomicU32,
    timeout_mult_bits: AtomicU32,
    max_body: AtomicU64,
    pub(crate) conn: ArcSwapOption<Live>,
    /// The worker thread the connection's I/O runs on ([`AgentConnection::home`]); `NO_HOME`
    /// when it has none.
    home: AtomicUsize,
    /// Counts the connections this slot has held; a pin remembers the one it was made on.
    generation: AtomicU64,
    label: Mutex<Arc<str>>,
    caps: Mutex<Option<Capabilities>>,
    reported: Mutex<HealthStatus>,
    health: Mutex<SlotHealth>,
    pool_limit: u32,
}

impl<O: SlotOwner> Slot<O> {
    pub(crate) fn new(
        owner: Arc<O>,
        endpoint: Arc<EndpointState>,
        pool_limit: u32,
        window: Duration,
        buckets: usize,
        decay: Duration,
    ) -> Self {
        let label: Arc<str> = Arc::from(format!("{} (not connected)", endpoint.endpoint));
        Self {
            owner,
            endpoint,
            permits: Permits::new(pool_limit),
            flags: AtomicU32::new(0),
            events: AtomicU8::new(0),
            rtt_ns: AtomicU64::new(0),
            score_bits: AtomicU32::new(1f32.to_bits()),
            timeout_mult_bits: AtomicU32::new(1f32.to_bits()),
            max_body: AtomicU64::new(u64::MAX),
            conn: ArcSwapOption::empty(),
            home: AtomicUsize::new(NO_HOME),
            generation: AtomicU64::new(0),
            label: Mutex::new(label),
            caps: Mutex::new(None),
            reported: Mutex::new(HealthStatus::Healthy),
            health: Mutex::new(SlotHealth {
                window: HealthWindow::new(window, buckets),
                ewma: PeakEwma::new(decay),
                state: HealthState::Healthy,
                last_error: None,
                last_latency: None,
                requests: 0,
                failures: 0,
                timeouts: 0,
                connects: 0,
                connected_since: None,
            }),
            pool_limit,
        }
    }

    /// True if a request of the event kind `kind_bit` may be sent here now: [fit for
    /// traffic](Self::is_fit), accepting that kind, with a free permit. With `allow_soft`,
    /// connections with a poor success rate count too.
    #[inline]
    pub(crate) fn is_usable(&self, kind_bit: u8, allow_soft: bool) -> bool {
        self.is_fit(allow_soft) && self.supports(kind_bit) && self.permits.has_room()
    }

    /// True if the slot may carry traffic, capacity and event kinds aside: nothing in the agent's
    /// signals or the connection's state keeps it out (connected, not paused, not draining, not
    /// reported unhealthy), its endpoint's breaker is not open and the endpoint not ejected,
    /// and — unless `allow_soft` — its success rate is not unhealthy. Atomics only.
    #[inline]
    pub(crate) fn is_fit(&self, allow_soft: bool) -> bool {
        let mask = if allow_soft { HARD } else { HARD | SOFT_UNHEALTHY };
        self.flags.load(Ordering::Relaxed) & mask == 0 && !self.endpoint_blocked()
    }

    /// True if the slot's endpoint is out of rotation: breaker open or ejected as an outlier.
    #[inline]
    pub(crate) fn endpoint_blocked(&self) -> bool {
        self.endpoint.gate() & (GATE_OPEN | GATE_EJECTED) != 0
    }

    /// True while the agent's flow control pauses this connection.
    #[inline]
    pub(crate) fn is_paused(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & PAUSED != 0
    }

    /// True once the slot's connection was found closed or detached (until a replacement is
    /// attached). One plain load; [`is_connected`](Self::is_connected) reads the connection
    /// cell instead.
    #[inline]
    pub(crate) fn is_disconnected(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & DISCONNECTED != 0
    }

    /// True if the slot carries traffic at its best: connected and [fit](Self::is_fit)
    /// without falling back to a poor success rate (the flag that mirrors an unhealthy health
    /// state is clear). What stats count as healthy.
    #[inline]
    pub(crate) fn is_healthy(&self) -> bool {
        self.is_connected() && self.is_fit(false)
    }

    /// [`is_healthy`](Self::is_healthy), and the transport has not seen the connection close
    /// either: what a sticky session may be pinned to.
    pub(crate) fn is_pinnable(&self) -> bool {
        self.is_open() && self.is_fit(false)
    }

    #[inline]
    pub(crate) fn supports(&self, kind_bit: u8) -> bool {
        self.events.load(Ordering::Relaxed) & kind_bit != 0
    }

    pub(crate) fn timeout_multiplier(&self) -> f32 {
        f32::from_bits(self.timeout_mult_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn max_body(&self) -> Option<u64> {
        match self.max_body.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(n),
        }
    }

    pub(crate) fn label(&self) -> Arc<str> {
        self.label.lock().clone()
    }

    pub(crate) fn capabilities(&self) -> Option<Capabilities> {
        self.caps.lock().clone()
    }

    /// Puts a freshly handshaken connection into the slot.
    pub(crate) fn attach(&self, conn: Arc<dyn AgentConnection>, now: Instant) {
        let caps = conn.capabilities().clone();
        let limit = caps.max_concurrency.map_or(self.pool_limit, |m| m.get().min(self.pool_limit));
        self.permits.set_limit(limit);
        self.max_body.store(caps.max_body_size.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.events.store(caps.supported_events.bits(), Ordering::Relaxed);
        if self.flags.swap(0, Ordering::Relaxed) & PAUSED != 0 {
            self.owner.metrics().paused.decrement(1.0);
        }
        self.timeout_mult_bits.store(1f32.to_bits(), Ordering::Relaxed);
        self.home.store(conn.home().unwrap_or(NO_HOME), Ordering::Relaxed);
        *self.label.lock() = Arc::from(conn.label());
        *self.caps.lock() = Some(caps);
        *self.reported.lock() = HealthStatus::Healthy;
        let generation = {
            // A new connection is judged on its own results. The generation moves under the
            // same lock, so a late result of the previous connection either lands before the
            // reset (and is forgotten with it) or sees the new generation (and is kept out).
            let mut h = self.health.lock();
            h.window.clear();
            h.ewma.reset();
            h.state = HealthState::Healthy;
            h.last_latency = None;
            h.connects += 1;
            h.connected_since = Some(now);
            self.rtt_ns.store(0, Ordering::Relaxed);
            self.score_bits.store(1f32.to_bits(), Ordering::Relaxed);
            self.flags.fetch_and(!SOFT_UNHEALTHY, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release) + 1
        };
        self.conn.store(Some(Arc::new(Live { conn, generation })));
    }

    /// True if the slot's connection runs its I/O on worker thread `worker`.
    #[inline]
    pub(crate) fn is_home(&self, worker: usize) -> bool {
        self.home.load(Ordering::Relaxed) == worker
    }

    /// Which connection the slot holds (or last held): bumped on every attach.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes the slot out of picking at once: its connection was found closed. Cleared when
    /// the supervisor attaches the replacement.
    pub(crate) fn mark_disconnected(&self) {
        self.flags.fetch_or(DISCONNECTED, Ordering::Relaxed);
    }

    /// Empties the slot after its connection died.
    pub(crate) fn detach(&self) -> Option<Arc<Live>> {
        self.events.store(0, Ordering::Relaxed);
        let before = self
            .flags
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| Some((f & !PAUSED) | DISCONNECTED))
            .unwrap_or_else(|f| f);
        if before & PAUSED != 0 {
            self.owner.metrics().paused.decrement(1.0);
        }
        self.health.lock().connected_since = None;
        self.conn.swap(None)
    }

    /// Mirrors the agent's signals into the flags the hot path reads.
    pub(crate) fn apply_signals(&self, s: &ConnectionSignals) {
        let mut set = 0;
        if s.flow.paused {
            set |= PAUSED;
        }
        if s.draining || matches!(s.health.status, HealthStatus::Draining { .. }) {
            set |= DRAINING;
        }
        if matches!(s.health.status, HealthStatus::Unhealthy) {
            set |= AGENT_UNHEALTHY;
        }
        let before = self.flags.load(Ordering::Relaxed);
        let keep = before & (SOFT_UNHEALTHY | DISCONNECTED);
        self.flags.store(keep | set, Ordering::Relaxed);
        match (before & PAUSED != 0, set & PAUSED != 0) {
            (false, true) => self.owner.metrics().paused.increment(1.0),
            (true, false) => self.owner.metrics().paused.decrement(1.0),
            _ => {}
        }
        self.timeout_mult_bits.store(s.health.status.timeout_multiplier().to_bits(), Ordering::Relaxed);
        *self.reported.lock() = s.health.status;
    }

    /// Records one finished request, sent on the connection of `generation`. A result of a
    /// connection the slot no longer holds counts in the lifetime totals (and as the last
    /// error) only: the current connection's window and latency estimate are its own.
    pub(crate) fn record(
        &self,
        generation: u64,
        now: Instant,
        latency: Duration,
        outcome: Finished<'_>,
        thresholds: &HealthThresholds,
    ) {
        let mut h = self.health.lock();
        h.requests += 1;
        let (success, timed_out) = match outcome {
            Finished::Succeeded => (true, false),
            Finished::Failed(e) | Finished::TimedOut(e) => {
                h.failures += 1;
                h.last_error = Some((now, e.to_string()));
                let timed_out = matches!(outcome, Finished::TimedOut(_));
                if timed_out {
                    h.timeouts += 1;
                }
                (false, timed_out)
            }
        };
        if generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        h.window.record(now, success);
        // A time-out is a latency of at least the time-out: the estimate hears of it too.
        if success || timed_out {
            let est = h.ewma.observe(now, latency);
            self.rtt_ns.store(est, Ordering::Relaxed);
        }
        if success {
            h.last_latency = Some(latency);
        }
        self.reclassify(&mut h, now, thresholds);
    }

    /// Records a failure that is not a request (a failed connect, a ping time-out).
    pub(crate) fn record_error(&self, now: Instant, error: &dyn std::fmt::Display) {
        self.health.lock().last_error = Some((now, error.to_string()));
    }

    /// Re-reads the window as time passes, so a slot without traffic recovers.
    pub(crate) fn refresh(&self, now: Instant, thresholds: &HealthThresholds) {
        let mut h = self.health.lock();
        self.reclassify(&mut h, now, thresholds);
    }

    fn reclassify(&self, h: &mut SlotHealth, now: Instant, thresholds: &HealthThresholds) {
        let (ok, failed) = h.window.counts(now);
        h.state = thresholds.classify(ok, failed);
        self.score_bits.store((health::score(ok, failed) as f32).to_bits(), Ordering::Relaxed);
        if h.state == HealthState::Unhealthy {
            self.flags.fetch_or(SOFT_UNHEALTHY, Ordering::Relaxed);
        } else {
            self.flags.fetch_and(!SOFT_UNHEALTHY, Ordering::Relaxed);
        }
    }

    /// Lifetime (requests, failures) — for outlier detection's per-interval deltas and stats.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        let h = self.health.lock();
        (h.requests, h.failures, h.timeouts)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Connected, and the transport has not seen the connection close (its supervisor may
    /// not have caught up yet).
    pub(crate) fn is_open(&self) -> bool {
        self.conn.load().as_ref().is_some_and(|live| live.conn.is_open())
    }

    pub(crate) fn snapshot(&self, now: Instant) -> ConnectionHealth {
        let h = self.health.lock();
        let rtt = self.rtt_ns.load(Ordering::Relaxed);
        ConnectionHealth {
            label: self.label().to_string(),
            endpoint: self.endpoint.endpoint.to_string(),
            connected: self.is_connected(),
            state: h.state,
            success_rate: h.window.success_rate(now),
            latency_estimate: (rtt > 0).then(|| Duration::from_nanos(rtt)),
            last_latency: h.last_latency,
            last_error: h.last_error.as_ref().map(|(at, e)| (e.clone(), now.saturating_duration_since(*at))),
            in_flight: self.permits.in_flight(),
            limit: self.permits.limit(),
            requests: h.requests,
            failures: h.failures,
            timeouts: h.timeouts,
            connects: h.connects,
            uptime: h.connected_since.map(|t| now.saturating_duration_since(t)),
            paused: self.is_paused(),
            reported: *self.reported.lock(),
            worker: Some(self.home.load(Ordering::Relaxed)).filter(|&h| h != NO_HOME),
        }
    }
}

impl<O: SlotOwner> Load for Slot<O> {
    #[inline]
    fn in_flight(&self) -> u32 {
        self.permits.in_flight()
    }

    #[inline]
    fn rtt_estimate_ns(&self) -> u64 {
        self.rtt_ns.load(Ordering::Relaxed)
    }

    #[inline]
    fn health_score(&self) -> f64 {
        f64::from(f32::from_bits(self.score_bits.load(Ordering::Relaxed)))
    }
}

/// A request's hold on a slot: one permit, given back on drop however the request ends.
///
/// Two words (the slot and a byte of flags), so that `Option<InFlight>` is a scalar pair
/// and comes back from the pick path in registers: a wider guard is returned through memory
/// and its byte-wise stores stall the wide load that reads it back.
pub(crate) struct InFlight<O: SlotOwner> {
    pub(crate) slot: Arc<Slot<O>>,
    flags: u8,
}

/// The permit was taken for the half-open breaker's probe.
const PROBE: u8 = 1;
/// The probe's result was recorded.
const SETTLED: u8 = 2;
/// Taken on the slot a request is pinned to (affinity or sticky session).
const PINNED: u8 = 4;

impl<O: SlotOwner> InFlight<O> {
    /// Wraps a permit already taken on `slot`.
    #[inline]
    pub(crate) fn new(slot: Arc<Slot<O>>, probe: bool) -> Self {
        slot.owner.metrics().in_flight.increment(1.0);
        Self { slot, flags: if probe { PROBE } else { 0 } }
    }

    /// A permit on the slot a request is pinned to.
    pub(crate) fn pinned(slot: Arc<Slot<O>>) -> Self {
        let mut g = Self::new(slot, false);
        g.flags |= PINNED;
        g
    }

    /// Whether the permit was taken on a pinned slot.
    pub(crate) fn is_pinned(&self) -> bool {
        self.flags & PINNED != 0
    }

    pub(crate) fn is_probe(&self) -> bool {
        self.flags & PROBE != 0
    }

    /// Marks the result recorded, so dropping does not report an abandoned probe.
    pub(crate) fn settle(&mut self) {
        self.flags |= SETTLED;
    }
}

impl<O: SlotOwner> Drop for InFlight<O> {
    fn drop(&mut self) {
        let slot = &self.slot;
        slot.permits.release();
        slot.owner.metrics().in_flight.decrement(1.0);
        if self.flags & (PROBE | SETTLED) == PROBE {
            slot.endpoint.probe_abandoned();
        }
        slot.owner.permit_released();
    }
}
