//! The watcher's metrics, through the `metrics` facade; every series carries a `workload` label
//! and the configuration's [`metric_labels`](crate::IdleConfig::metric_labels).
//!
//! | Name | Kind | Meaning |
//! |---|---|---|
//! | `idlewatch_wakes_total` | counter | starts (or unpauses, or scale-ups) the watcher asked for |
//! | `idlewatch_wake_duration_seconds` | histogram | from `starting` to `ready` or `error` (starts seen from outside included); label `outcome` = `ready` \| `error` |
//! | `idlewatch_stops_total` | counter | label `reason` = `idle` (the watcher stopped it) \| `external` (seen stopped from outside) |
//! | `idlewatch_state` | gauge | 1 for the current state, 0 for the others; label `state` |
//! | `idlewatch_waiters` | gauge | callers waiting for a wake |
//! | `idlewatch_event_reconnects_total` | counter | times the engine's event stream was reopened |

use std::collections::BTreeMap;

use metrics::{Counter, Gauge, Histogram, Label, counter, gauge, histogram};

use crate::machine::IdleState;

const STATES: [&str; 5] = ["napping", "starting", "ready", "stopping", "error"];

#[derive(Debug)]
pub(crate) struct WatchMetrics {
    pub(crate) wakes: Counter,
    pub(crate) wake_ready: Histogram,
    pub(crate) wake_error: Histogram,
    pub(crate) stops_idle: Counter,
    pub(crate) stops_external: Counter,
    pub(crate) waiters: Gauge,
    pub(crate) reconnects: Counter,
    states: [Gauge; 5],
}

impl WatchMetrics {
    pub(crate) fn new(workload: &str, extra: &BTreeMap<String, String>) -> Self {
        let base: Vec<Label> = std::iter::once(Label::new("workload", workload.to_owned()))
            .chain(extra.iter().map(|(k, v)| Label::new(k.clone(), v.clone())))
            .collect();
        let with = |key: &'static str, value: &'static str| {
            let mut labels = base.clone();
            labels.push(Label::new(key, value));
            labels
        };
        Self {
            wakes: counter!("idlewatch_wakes_total", base.clone()),
            wake_ready: histogram!("idlewatch_wake_duration_seconds", with("outcome", "ready")),
            wake_error: histogram!("idlewatch_wake_duration_seconds", with("outcome", "error")),
            stops_idle: counter!("idlewatch_stops_total", with("reason", "idle")),
            stops_external: counter!("idlewatch_stops_total", with("reason", "external")),
            waiters: gauge!("idlewatch_waiters", base.clone()),
            reconnects: counter!("idlewatch_event_reconnects_total", base.clone()),
            states: STATES.map(|s| gauge!("idlewatch_state", with("state", s))),
        }
    }

    pub(crate) fn set_state(&self, state: &IdleState) {
        for (name, gauge) in STATES.iter().zip(&self.states) {
            gauge.set(if *name == state.name() { 1.0 } else { 0.0 });
        }
    }
}

/// Counts one waiter while alive.
pub(crate) struct WaiterGauge<'a>(&'a Gauge);

impl<'a> WaiterGauge<'a> {
    pub(crate) fn new(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for WaiterGauge<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
