//! Metric handles, registered once per agent so the hot path never formats a name or a label.
//!
//! Everything goes through the [`metrics`] facade: with no recorder installed the handles are
//! no-ops; a binary installs an exporter (e.g. Prometheus) to collect them.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `agentpool_requests_total` | counter | agent |
//! | `agentpool_request_failures_total` | counter | agent |
//! | `agentpool_request_timeouts_total` | counter | agent |
//! | `agentpool_unavailable_total` | counter | agent (no connection could take a request: the two below together) |
//! | `agentpool_unavailable_rejected_total` | counter | agent (of those, refused with `PoolError::Unavailable`) |
//! | `agentpool_fail_open_total` | counter | agent (of those, answered allow by fail-open) |
//! | `agentpool_flow_control_total` | counter | agent, outcome (`rejected`, `fail_open`, `waited`, `timed_out`: met a paused agent and was refused at once, let through, waited for a resume, refused after the wait) |
//! | `agentpool_paused_connections` | gauge | agent |
//! | `agentpool_affinity_entries` | gauge | agent (updated by maintenance) |
//! | `agentpool_affinity_rejected_total` | counter | agent (over the cap, not pinned) |
//! | `agentpool_pin_lost_total` | counter | agent (pinned connection died) |
//! | `agentpool_sticky_repins_total` | counter | agent (a session moved off a dead or unhealthy connection) |
//! | `agentpool_sticky_sessions` | gauge | — (updated by maintenance) |
//! | `agentpool_config_pushes_pending` | gauge | — |
//! | `agentpool_config_pushes_total` | counter | outcome (`acked`, `rejected`, `failed`) |
//! | `agentpool_in_flight` | gauge | agent |
//! | `agentpool_request_duration_seconds` | histogram | agent |
//! | `agentpool_connections` | gauge | agent (connected) |
//! | `agentpool_healthy_connections` | gauge | agent |
//! | `agentpool_reconnects_total` | counter | agent |
//! | `agentpool_breaker_state` | gauge | agent, endpoint (0 closed, 1 open, 2 half-open) |
//! | `agentpool_breaker_trips_total` | counter | agent, endpoint |
//! | `agentpool_endpoint_ejected` | gauge | agent, endpoint (1 while ejected) |

use metrics::{Counter, Gauge, Histogram, Unit};

pub(crate) struct AgentMetrics {
    pub(crate) requests: Counter,
    pub(crate) failures: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) unavailable: Counter,
    pub(crate) unavailable_rejected: Counter,
    pub(crate) fail_open: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) latency: Histogram,
    pub(crate) connections: Gauge,
    pub(crate) healthy: Gauge,
    pub(crate) reconnects: Counter,
    pub(crate) flow_rejected: Counter,
    pub(crate) flow_fail_open: Counter,
    pub(crate) flow_waited: Counter,
    pub(crate) flow_timed_out: Counter,
    pub(crate) paused: Gauge,
    pub(crate) affinity_entries: Gauge,
    pub(crate) affinity_rejected: Counter,
    pub(crate) pin_lost: Counter,
    pub(crate) sticky_repins: Counter,
}

impl AgentMetrics {
    pub(crate) fn new(agent: &str) -> Self {
        let l = [("agent", agent.to_owned())];
        let flow = |outcome: &'static str| metrics::counter!("agentpool_flow_control_total", "agent" => agent.to_owned(), "outcome" => outcome);
        Self {
            requests: metrics::counter!("agentpool_requests_total", &l),
            failures: metrics::counter!("agentpool_request_failures_total", &l),
            timeouts: metrics::counter!("agentpool_request_timeouts_total", &l),
            unavailable: metrics::counter!("agentpool_unavailable_total", &l),
            unavailable_rejected: metrics::counter!("agentpool_unavailable_rejected_total", &l),
            fail_open: metrics::counter!("agentpool_fail_open_total", &l),
            in_flight: metrics::gauge!("agentpool_in_flight", &l),
            latency: metrics::histogram!("agentpool_request_duration_seconds", &l),
            connections: metrics::gauge!("agentpool_connections", &l),
            healthy: metrics::gauge!("agentpool_healthy_connections", &l),
            reconnects: metrics::counter!("agentpool_reconnects_total", &l),
            flow_rejected: flow("rejected"),
            flow_fail_open: flow("fail_open"),
            flow_waited: flow("waited"),
            flow_timed_out: flow("timed_out"),
            paused: metrics::gauge!("agentpool_paused_connections", &l),
            affinity_entries: metrics::gauge!("agentpool_affinity_entries", &l),
            affinity_rejected: metrics::counter!("agentpool_affinity_rejected_total", &l),
            pin_lost: metrics::counter!("agentpool_pin_lost_total", &l),
            sticky_repins: metrics::counter!("agentpool_sticky_repins_total", &l),
        }
    }
}

/// Describes every metric once, so exporters can print help text and units.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("agentpool_requests_total", "Requests sent to agents.");
    describe_counter!("agentpool_request_failures_total", "Requests that failed (errors and time-outs).");
    describe_counter!("agentpool_request_timeouts_total", "Requests that timed out.");
    describe_counter!("agentpool_unavailable_total", "Requests no connection could take.");
    describe_counter!(
        "agentpool_unavailable_rejected_total",
        "Requests refused because no connection could take them."
    );
    describe_counter!(
        "agentpool_fail_open_total",
        "Requests answered allow because the agent was unavailable."
    );
    describe_gauge!("agentpool_in_flight", "Requests in flight.");
    describe_histogram!("agentpool_request_duration_seconds", Unit::Seconds, "Time from send to answer.");
    describe_gauge!("agentpool_connections", "Connections up.");
    describe_gauge!("agentpool_healthy_connections", "Connections up and healthy.");
    describe_counter!("agentpool_reconnects_total", "Connections replaced after dying.");
    describe_counter!("agentpool_flow_control_total", "Requests that met a paused agent, by outcome.");
    describe_gauge!("agentpool_paused_connections", "Connections paused by the agent's flow control.");
    describe_gauge!("agentpool_affinity_entries", "Requests pinned to a connection (correlation affinity).");
    describe_counter!("agentpool_affinity_rejected_total", "Requests not pinned because the table was full.");
    describe_counter!("agentpool_pin_lost_total", "Requests failed because their pinned connection died.");
    describe_counter!(
        "agentpool_sticky_repins_total",
        "Sticky sessions moved off a dead or unhealthy connection."
    );
    describe_gauge!("agentpool_sticky_sessions", "Live sticky sessions.");
    describe_gauge!("agentpool_config_pushes_pending", "Configuration pushes waiting for an answer.");
    describe_counter!("agentpool_config_pushes_total", "Configuration pushes finished, by outcome.");
    describe_gauge!("agentpool_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open.");
    describe_counter!("agentpool_breaker_trips_total", "Times a circuit breaker opened.");
    describe_gauge!("agentpool_endpoint_ejected", "1 while the endpoint is ejected as an outlier.");
}
