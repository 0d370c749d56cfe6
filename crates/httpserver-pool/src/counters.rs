//! Per-server counters: atomics for a cheap snapshot, mirrored to the `metrics` facade.
//!
//! Metric handles are registered once per server (labels `server` and `bind`), so the hot path
//! is an atomic add plus the recorder's handle update; with no recorder installed that is a no-op.
//! The request count, bumped on every request from every worker thread, is striped: each thread
//! adds to a cache line of its own and a snapshot sums the stripes, so two cores serving the same
//! server do not pass one line back and forth.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use metrics::{Counter, Gauge};

/// A copy of one server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now (upgraded ones included).
    pub active: u64,
    /// Requests received.
    pub requests: u64,
    /// Connections that ended on their own during stops.
    pub drained: u64,
    /// Connections cut off at stop deadlines.
    pub forced: u64,
    /// Failed `accept` calls.
    pub accept_errors: u64,
    /// Connections closed at once because they were over a connection cap
    /// ([`Limits`](crate::Limits)). They are not counted in `accepted`.
    pub refused: u64,
}

/// Stripes of the request count; threads beyond this many share stripes (still correct).
const STRIPES: usize = 8;

/// One stripe, alone on its cache line (128 bytes: adjacent-line prefetch pairs lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// The stripe of the calling thread, assigned round-robin on first use.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

#[derive(Debug)]
pub(crate) struct Counters {
    requests: [Stripe; STRIPES],
    accepted: AtomicU64,
    active: AtomicU64,
    drained: AtomicU64,
    forced: AtomicU64,
    accept_errors: AtomicU64,
    refused: AtomicU64,
    m_accepted: Counter,
    m_active: Gauge,
    m_requests: Counter,
    m_drained: Counter,
    m_forced: Counter,
    m_accept_errors: Counter,
    m_refused: Counter,
}

/// Registers the metrics' descriptions with the recorder installed now (each server does, so a
/// recorder installed before any server is built knows them).
fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!("httpserver_pool_connections_accepted_total", "Connections accepted.");
    describe_gauge!("httpserver_pool_connections_active", "Connections open now (upgraded ones included).");
    describe_counter!("httpserver_pool_requests_total", "Requests received.");
    describe_counter!(
        "httpserver_pool_connections_drained_total",
        "Connections that finished on their own during a stop."
    );
    describe_counter!(
        "httpserver_pool_connections_forced_total",
        "Connections cut off at a stop's deadline."
    );
    describe_counter!(
        "httpserver_pool_accept_errors_total",
        "Errors accepting a connection (the accept loop backs off)."
    );
    describe_counter!(
        "httpserver_pool_connections_refused_total",
        "Connections reset at once for being over a connection cap."
    );
}

impl Counters {
    pub(crate) fn new(name: &str, bind: SocketAddr) -> Self {
        describe();
        let labels = [("server", name.to_owned()), ("bind", bind.to_string())];
        Counters {
            requests: Default::default(),
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            m_accepted: metrics::counter!("httpserver_pool_connections_accepted_total", &labels),
            m_active: metrics::gauge!("httpserver_pool_connections_active", &labels),
            m_requests: metrics::counter!("httpserver_pool_requests_total", &labels),
            m_drained: metrics::counter!("httpserver_pool_connections_drained_total", &labels),
            m_forced: metrics::counter!("httpserver_pool_connections_forced_total", &labels),
            m_accept_errors: metrics::counter!("httpserver_pool_accept_errors_total", &labels),
            m_refused: metrics::counter!("httpserver_pool_connections_refused_total", &labels),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        self.m_accepted.increment(1);
        self.m_active.increment(1.0);
    }

    pub(crate) fn connection_closed(&self) {
        self.active.fetch_sub(1, Relaxed);
        self.m_active.decrement(1.0);
    }

    pub(crate) fn request(&self) {
        self.requests[stripe()].0.fetch_add(1, Relaxed);
        self.m_requests.increment(1);
    }

    pub(crate) fn stopped(&self, drained: u64, forced: u64) {
        self.drained.fetch_add(drained, Relaxed);
        self.forced.fetch_add(forced, Relaxed);
        self.m_drained.increment(drained);
        self.m_forced.increment(forced);
    }

    pub(crate) fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
        self.m_accept_errors.increment(1);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
        self.m_refused.increment(1);
    }

    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            requests: self.requests.iter().map(|s| s.0.load(Relaxed)).sum(),
            drained: self.drained.load(Relaxed),
            forced: self.forced.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }
}
