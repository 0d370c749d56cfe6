//! What an agent reports about itself: statistics per agent and per endpoint, request and
//! connection totals, each slot's health; and the periodic re-reading of health windows that
//! lets an idle connection recover.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pool_api::Capabilities;
use tokio::time::Instant;

use super::Agent;
use crate::endpoint::BreakerStatus;
use crate::slot::ConnectionHealth;

/// Statistics of one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentStats {
    /// The agent's id.
    pub id: String,
    /// Per endpoint (replica).
    pub endpoints: Vec<EndpointStats>,
    /// Connection and request counts.
    pub totals: Totals,
    /// True if at least one connection is healthy.
    pub is_healthy: bool,
    /// Capabilities of the first connected slot, if any.
    pub capabilities: Option<Capabilities>,
}

/// Connection and request counts of one agent, or summed over a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connection slots (endpoints × connections per endpoint).
    pub connections: usize,
    /// Slots with a live connection.
    pub connected: usize,
    /// Connected slots that are usable and not unhealthy.
    pub healthy: usize,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests finished.
    pub requests: u64,
    /// Of which failed (errors and time-outs).
    pub failures: u64,
    /// Of which timed out.
    pub timeouts: u64,
    /// Connected slots paused by the agent's flow control.
    pub paused: usize,
    /// Requests pinned to a connection by correlation affinity.
    pub affinity: usize,
    /// Requests refused with [`PoolError::Unavailable`](crate::PoolError::Unavailable) because no connection could take them
    /// (none up, every breaker open, every instance draining or unhealthy, the agent being
    /// removed), by a send whose agent fails closed, a reservation, or a sticky session that
    /// found no healthy connection to move to. Metric: `agentpool_unavailable_rejected_total`.
    /// Not counted: [`Unavailable::NoCapacity`](crate::Unavailable::NoCapacity) (a reservation that found every usable
    /// connection busy).
    pub unavailable_rejected: u64,
    /// Requests answered allow without reaching the agent, because no connection could take
    /// them and the agent fails open (the decision is tagged `agentpool:fail-open`). Metric:
    /// `agentpool_fail_open_total`. `agentpool_unavailable_total` counts this and
    /// [`unavailable_rejected`](Self::unavailable_rejected) together.
    pub fail_open: u64,
    /// Requests refused with [`PoolError::FlowControlPaused`](crate::PoolError::FlowControlPaused) because every connection that
    /// could take them was paused by the agent's flow control: at once (mode fail-closed, or a
    /// reservation), or after a wait for a resume ran out (mode wait-and-retry). Metric:
    /// `agentpool_flow_control_total` with outcome `rejected` or `timed_out`.
    pub flow_control_rejected: u64,
    /// Requests answered allow without reaching the agent because every connection that could
    /// take them was paused and the flow-control mode fails open (the decision is tagged
    /// `agentpool:flow-control-open`). Metric: `agentpool_flow_control_total` with outcome
    /// `fail_open`.
    pub flow_control_fail_open: u64,
}

impl Totals {
    /// failures / requests; 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.failures as f64 / self.requests as f64 }
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.connected += o.connected;
        self.healthy += o.healthy;
        self.in_flight += o.in_flight;
        self.requests += o.requests;
        self.failures += o.failures;
        self.timeouts += o.timeouts;
        self.paused += o.paused;
        self.affinity += o.affinity;
        self.unavailable_rejected += o.unavailable_rejected;
        self.fail_open += o.fail_open;
        self.flow_control_rejected += o.flow_control_rejected;
        self.flow_control_fail_open += o.flow_control_fail_open;
    }
}

/// Statistics of one endpoint of an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointStats {
    /// The endpoint.
    pub endpoint: String,
    /// Its circuit breaker.
    pub breaker: BreakerStatus,
    /// True while ejected by outlier detection.
    pub ejected: bool,
    /// Its connected slots.
    pub connected: usize,
}

impl Agent {
    pub(crate) fn stats(&self, now: Instant) -> AgentStats {
        let slots = self.slots();
        let refused = &self.shared.refused;
        let mut t = Totals {
            connections: slots.len(),
            affinity: self.shared.affinity.len(),
            unavailable_rejected: refused.unavailable.load(Ordering::Relaxed),
            fail_open: refused.fail_open.load(Ordering::Relaxed),
            flow_control_rejected: refused.flow_rejected.load(Ordering::Relaxed),
            flow_control_fail_open: refused.flow_fail_open.load(Ordering::Relaxed),
            ..Totals::default()
        };
        let mut capabilities = None;
        for slot in &slots {
            let (r, f, to) = slot.totals();
            t.requests += r;
            t.failures += f;
            t.timeouts += to;
            t.in_flight += u64::from(slot.permits.in_flight());
            if slot.is_connected() {
                t.connected += 1;
                if slot.is_paused() {
                    t.paused += 1;
                }
                if capabilities.is_none() {
                    capabilities = slot.capabilities();
                }
            }
            if slot.is_healthy() {
                t.healthy += 1;
            }
        }
        let endpoints = self
            .all_endpoints()
            .iter()
            .map(|ep| EndpointStats {
                endpoint: ep.endpoint.to_string(),
                breaker: ep.breaker.status(now),
                ejected: ep.is_ejected(),
                connected: slots.iter().filter(|s| Arc::ptr_eq(&s.endpoint, ep) && s.is_connected()).count(),
            })
            .collect();
        AgentStats { id: self.id().to_owned(), endpoints, totals: t, is_healthy: t.healthy > 0, capabilities }
    }

    pub(crate) fn health(&self, now: Instant) -> Vec<ConnectionHealth> {
        self.slots().iter().map(|s| s.snapshot(now)).collect()
    }

    /// Re-reads every slot's health window (so idle slots recover), drops idle affinity pins,
    /// and updates gauges.
    pub(crate) fn refresh_health(&self, now: Instant) {
        self.shared.affinity.sweep(self.shared.ctx.clock.stamp(now));
        self.shared.metrics.affinity_entries.set(self.shared.affinity.len() as f64);
        let thresholds = &self.shared.ctx.config.health.thresholds;
        let mut healthy = 0;
        for slot in self.slots() {
            slot.refresh(now, thresholds);
            if slot.is_healthy() {
                healthy += 1;
            }
        }
        self.shared.metrics.healthy.set(f64::from(healthy));
    }
}
