//! Per-server counters: atomics for a cheap snapshot, mirrored to the `metrics` facade.
//!
//! Metric handles are registered once per server (labels `server` and `bind`), so the hot path
//! is an atomic add plus the recorder's handle update; with no recorder installed that is a no-op.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

#[derive(Debug)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    requests: AtomicU64,
    drained: AtomicU64,
    forced: AtomicU64,
    accept_errors: AtomicU64,
    m_accepted: Counter,
    m_active: Gauge,
    m_requests: Counter,
    m_drained: Counter,
    m_forced: Counter,
    m_accept_errors: Counter,
}

impl Counters {
    pub(crate) fn new(name: &str, bind: SocketAddr) -> Self {
        let labels = [("server", name.to_owned()), ("bind", bind.to_string())];
        Counters {
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            m_accepted: metrics::counter!("httpserver_pool_connections_accepted_total", &labels),
            m_active: metrics::gauge!("httpserver_pool_connections_active", &labels),
            m_requests: metrics::counter!("httpserver_pool_requests_total", &labels),
            m_drained: metrics::counter!("httpserver_pool_connections_drained_total", &labels),
            m_forced: metrics::counter!("httpserver_pool_connections_forced_total", &labels),
            m_accept_errors: metrics::counter!("httpserver_pool_accept_errors_total", &labels),
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
        self.requests.fetch_add(1, Relaxed);
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

    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            requests: self.requests.load(Relaxed),
            drained: self.drained.load(Relaxed),
            forced: self.forced.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
        }
    }
}
