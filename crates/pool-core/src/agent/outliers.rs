//! Outlier detection's bookkeeping for one agent: which replicas it covers (configured
//! endpoints and, as they come and go, reverse-connected replicas), each replica's request and
//! failure counts per interval, and the mirroring of the detector's verdicts into the
//! endpoints' gates. The detection itself is the pure policy in [`crate::outlier`].

use std::sync::Arc;

use tokio::time::Instant;

use super::Agent;
use crate::endpoint::EndpointState;
use crate::outlier::{IntervalCounts, OutlierConfig, OutlierDetector, Verdict};

/// Outlier detection over an agent's replicas: its configured endpoints and, as they come and
/// go, its reverse-connected replicas. Host `i` of the detector is `hosts[i]`.
pub(crate) struct Outliers {
    detector: OutlierDetector,
    hosts: Vec<OutlierHost>,
}

/// One replica as outlier detection sees it.
struct OutlierHost {
    endpoint: Arc<EndpointState>,
    /// Requests and failures of its slots when the last interval ended.
    last_totals: (u64, u64),
}

impl Outliers {
    pub(crate) fn new(cfg: OutlierConfig, endpoints: &[Arc<EndpointState>]) -> Self {
        Self {
            detector: OutlierDetector::new(cfg, endpoints.len()),
            hosts: endpoints
                .iter()
                .map(|ep| OutlierHost { endpoint: ep.clone(), last_totals: (0, 0) })
                .collect(),
        }
    }

    /// Covers a replica that has just joined, with no requests yet.
    pub(crate) fn add(&mut self, agent: &str, endpoint: Arc<EndpointState>) {
        self.hosts.push(OutlierHost { endpoint, last_totals: (0, 0) });
        let changes = self.detector.resize(self.hosts.len());
        self.apply(agent, changes);
    }

    /// Forgets a replica that has left. If it was the last one in rotation, the ejected replica
    /// due back first returns at once rather than at the next interval.
    pub(crate) fn remove(&mut self, agent: &str, endpoint: &Arc<EndpointState>) {
        let Some(i) = self.hosts.iter().position(|h| Arc::ptr_eq(&h.endpoint, endpoint)) else {
            return;
        };
        let gone = self.hosts.remove(i);
        if gone.endpoint.is_ejected() {
            // Leaves its ejection gauge at 0, not stuck at 1.
            gone.endpoint.set_ejected(false);
        }
        let changes = self.detector.remove(i);
        self.apply(agent, changes);
    }

    /// Mirrors the detector's verdicts into the endpoints' gates.
    fn apply(&self, agent: &str, changes: Vec<(usize, Verdict)>) {
        for (host, verdict) in changes {
            let ejected = verdict == Verdict::Ejected;
            let endpoint = &self.hosts[host].endpoint;
            tracing::warn!(agent, endpoint = %endpoint.endpoint, ejected, "outlier detection");
            endpoint.set_ejected(ejected);
        }
    }
}

impl Agent {
    /// One outlier-detection interval over the agent's replicas, configured and reverse.
    pub(crate) fn evaluate_outliers(&self, now: Instant) {
        let slots = self.slots();
        let mut o = self.outliers.lock();
        if o.hosts.len() < 2 {
            return;
        }
        let counts: Vec<IntervalCounts> = o
            .hosts
            .iter_mut()
            .map(|host| {
                let (requests, failures) = slots
                    .iter()
                    .filter(|s| Arc::ptr_eq(&s.endpoint, &host.endpoint))
                    .map(|s| s.totals())
                    .fold((0, 0), |(r, f), (r2, f2, _)| (r + r2, f + f2));
                let (last_r, last_f) = std::mem::replace(&mut host.last_totals, (requests, failures));
                // Saturating: a replica that joined after `slots` was read shows no slot yet.
                let (requests, failures) = (requests.saturating_sub(last_r), failures.saturating_sub(last_f));
                IntervalCounts { successes: requests.saturating_sub(failures), failures }
            })
            .collect();
        let changes = o.detector.evaluate(now, &counts);
        o.apply(self.id(), changes);
    }
}
