//! [`IdleConfig`]: what one watcher watches and how it stops, wakes and decides "ready".
//!
//! Every duration is written the humantime way (`"15m"`, `"500ms"`). [`IdleConfig::validate`]
//! returns every problem at once, so a config file is fixed in one round.
//!
//! The stop time-out is the engine's grace period only. The watcher's own deadline for a stop
//! is derived above it ([`IdleConfig::stop_deadline`] = stop time-out + [`STOP_MARGIN`]), so a
//! stop that the engine is still carrying out within its grace period is never reported as
//! failed (GoDoxy used one value for both, its #166).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::IdleConfigError;

/// Added to the stop time-out to get the watcher's deadline for a whole stop (the call and the
/// wait for "not running").
pub const STOP_MARGIN: Duration = Duration::from_secs(10);

/// What a watcher controls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Workload {
    /// A container, by name or id: asleep means stopped (or paused), awake means running.
    Container(String),
    /// A replicated Swarm service: asleep means 0 replicas, awake means `replicas`.
    Service {
        /// The service's name.
        name: String,
        /// Replicas when awake (at least 1).
        replicas: u64,
    },
}

impl Workload {
    /// The container's or service's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Container(name) | Self::Service { name, .. } => name,
        }
    }
}

/// How an idle workload is put to sleep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "method", deny_unknown_fields)]
pub enum StopMethod {
    /// `docker stop`: the signal (default: the container's own stop signal), then a kill after
    /// the stop time-out. The only method for a service, which is scaled to 0.
    #[default]
    Stop,
    /// `docker stop` after sending this signal first (e.g. `SIGINT`).
    StopWithSignal {
        /// A signal name (`SIGTERM`, `TERM`) or number.
        signal: String,
    },
    /// `docker pause`: the processes are frozen, memory stays allocated, waking is instant.
    Pause,
    /// `docker kill` with this signal (e.g. `SIGKILL`).
    Kill {
        /// A signal name (`SIGKILL`, `KILL`) or number.
        signal: String,
    },
}

/// How the watcher decides that a started workload is ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum ReadinessCheck {
    /// The engine's own view: a running container whose health check passed (or that has no
    /// health check); a service whose running tasks reached its replica count. Health changes
    /// are pushed by the engine's event stream; the status is also polled as a safety net.
    #[default]
    Engine,
    /// A TCP connect to `address` (`host:port`) succeeds.
    Tcp {
        /// Where to connect.
        address: String,
    },
    /// An HTTP/1.1 `GET` of `url` (`http://host:port/path`) answers `expected_status`.
    Http {
        /// What to fetch (plain `http`).
        url: String,
        /// The status that means ready. Default 200.
        #[serde(default = "default_expected_status")]
        expected_status: u16,
    },
}

fn default_expected_status() -> u16 {
    200
}

/// Readiness: the check, a settling delay, and the polling back-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Readiness {
    /// The check. Default: the engine's.
    pub check: ReadinessCheck,
    /// Extra time after the check passed before the workload counts as ready. Default 0.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// First delay of the polling (the TCP connects or HTTP probes, and the status re-reads behind the
    /// engine's events). Doubles up to `poll_max`. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub poll_min: Duration,
    /// Longest delay between two polls. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub poll_max: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            check: ReadinessCheck::Engine,
            settle: Duration::ZERO,
            poll_min: Duration::from_millis(50),
            poll_max: Duration::from_secs(1),
        }
    }
}

/// When a dependency counts as up for its dependent's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    /// The dependency is ready (healthy, by its own readiness check). The default.
    #[default]
    Healthy,
    /// The dependency is running (its start went through), healthy or not yet.
    Started,
}

/// A workload this one needs. Dependencies are declared within an
/// [`IdleGroup`](crate::IdleGroup), which checks the graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    /// The dependency's workload name (another watcher of the same group).
    pub workload: String,
    /// What "up" means for this edge.
    #[serde(default)]
    pub condition: DependencyCondition,
    /// An optional dependency is woken (and held) like any other, but its failure to come up
    /// does not fail the dependent's wake. Default `false`.
    #[serde(default)]
    pub optional: bool,
}

/// One watcher's configuration.
///
/// ```
/// let config: idlewatch::IdleConfig = serde_json::from_str(r#"{
///     "workload": {"container": "wiki"},
///     "idle_timeout": "15m",
///     "stop": {"method": "stop_with_signal", "signal": "SIGINT"},
///     "readiness": {"check": {"kind": "tcp", "address": "wiki:8080"}, "settle": "200ms"}
/// }"#).unwrap();
/// config.validate().unwrap();
/// assert_eq!(config.stop_deadline(), std::time::Duration::from_secs(20));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdleConfig {
    /// What to watch.
    pub workload: Workload,
    /// How long the workload may have no activity (no open request, connection or stream)
    /// before it is put to sleep. Required.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How to put it to sleep. Default: stop.
    #[serde(default)]
    pub stop: StopMethod,
    /// The engine's grace period between the stop signal and the kill. Default 10 s.
    #[serde(with = "humantime_serde", default = "default_stop_timeout")]
    pub stop_timeout: Duration,
    /// How long a waiter waits for a wake (start plus readiness) before it gets
    /// [`WakeError::Timeout`](crate::WakeError::Timeout). Default 60 s.
    #[serde(with = "humantime_serde", default = "default_wake_timeout")]
    pub wake_timeout: Duration,
    /// How "ready" is decided.
    #[serde(default)]
    pub readiness: Readiness,
    /// Workloads that must be up before this one starts. Each stays up (its activity count
    /// holds one unit per dependent that is not asleep) until its last dependent has stopped.
    /// Only an [`IdleGroup`](crate::IdleGroup) can honour these.
    #[serde(default)]
    pub depends_on: Vec<Dependency>,
    /// Labels added to every metric series of this watcher, beside `workload`: for example
    /// the engine a workload runs on, so that watchers of same-named containers on several
    /// engines keep series of their own. Names follow Prometheus's rules
    /// (`[a-zA-Z_][a-zA-Z0-9_]*`); `workload`, `state`, `outcome` and `reason` are taken.
    #[serde(default)]
    pub metric_labels: BTreeMap<String, String>,
}

/// Label names the watcher's own series use.
const RESERVED_LABELS: [&str; 4] = ["workload", "state", "outcome", "reason"];

fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_wake_timeout() -> Duration {
    Duration::from_secs(60)
}

impl IdleConfig {
    /// A configuration with the defaults: stop with the container's signal, 10 s stop
    /// time-out, 60 s wake time-out, the engine's readiness.
    pub fn new(workload: Workload, idle_timeout: Duration) -> Self {
        Self {
            workload,
            idle_timeout,
            stop: StopMethod::default(),
            stop_timeout: default_stop_timeout(),
            wake_timeout: default_wake_timeout(),
            readiness: Readiness::default(),
            depends_on: Vec::new(),
            metric_labels: BTreeMap::new(),
        }
    }

    /// The watcher's deadline for a whole stop: the stop time-out plus [`STOP_MARGIN`].
    pub fn stop_deadline(&self) -> Duration {
        self.stop_timeout + STOP_MARGIN
    }

    /// Every problem with this configuration; `Ok` when there is none.
    pub fn validate(&self) -> Result<(), IdleConfigError> {
        let mut problems = Vec::new();
        match &self.workload {
            Workload::Container(name) if name.trim().is_empty() => {
                problems.push("workload: the container name is empty".to_owned());
            }
            Workload::Service { name, replicas } => {
                if name.trim().is_empty() {
                    problems.push("workload: the service name is empty".to_owned());
                }
                if *replicas == 0 {
                    problems.push("workload: a service must wake with at least 1 replica".to_owned());
                }
                if self.stop != StopMethod::Stop {
                    problems.push(
                        "stop: a service can only be stopped by scaling it to 0 (method \"stop\")".to_owned(),
                    );
                }
            }
            Workload::Container(_) => {}
        }
        if self.idle_timeout.is_zero() {
            problems.push("idle_timeout must be greater than zero".to_owned());
        }
        if self.wake_timeout.is_zero() {
            problems.push("wake_timeout must be greater than zero".to_owned());
        }
        if let StopMethod::StopWithSignal { signal } | StopMethod::Kill { signal } = &self.stop
            && !valid_signal(signal)
        {
            problems.push(format!("stop.signal {signal:?} is not a signal name (SIGTERM, TERM) or number"));
        }
        let r = &self.readiness;
        if let ReadinessCheck::Tcp { address } = &r.check {
            let port = address.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                problems.push(format!("readiness.address {address:?} is not host:port"));
            }
        }
        if let ReadinessCheck::Http { url, expected_status } = &r.check {
            let uri = url.parse::<http::Uri>();
            let valid = uri.as_ref().is_ok_and(|u| {
                u.scheme_str() == Some("http") && u.authority().is_some_and(|a| a.port_u16().is_some())
            });
            if !valid {
                problems.push(format!("readiness.url {url:?} is not http://host:port/path"));
            }
            if !(100..=599).contains(expected_status) {
                problems.push(format!("readiness.expected_status {expected_status} is not an HTTP status"));
            }
        }
        if r.poll_min.is_zero() {
            problems.push("readiness.poll_min must be greater than zero".to_owned());
        }
        if r.poll_max < r.poll_min {
            problems.push(format!(
                "readiness.poll_max ({:?}) must be at least readiness.poll_min ({:?})",
                r.poll_max, r.poll_min
            ));
        }
        if r.settle >= self.wake_timeout && !self.wake_timeout.is_zero() {
            problems.push(format!(
                "readiness.settle ({:?}) must be shorter than wake_timeout ({:?})",
                r.settle, self.wake_timeout
            ));
        }
        for key in self.metric_labels.keys() {
            let mut chars = key.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid || key.starts_with("__") {
                problems.push(format!("metric_labels: {key:?} is not a metric label name"));
            } else if RESERVED_LABELS.contains(&key.as_str()) {
                problems.push(format!("metric_labels: {key:?} is a label the watcher sets itself"));
            }
        }
        let name = self.workload.name();
        for (i, dependency) in self.depends_on.iter().enumerate() {
            if dependency.workload == name {
                problems.push(format!("depends_on: {name} depends on itself"));
            }
            if self.depends_on[..i].iter().any(|d| d.workload == dependency.workload) {
                problems.push(format!("depends_on: {} is listed twice", dependency.workload));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(IdleConfigError { problems }) }
    }
}

fn valid_signal(signal: &str) -> bool {
    if signal.starts_with(|c: char| c.is_ascii_digit()) {
        return signal.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n));
    }
    let name = signal.strip_prefix("SIG").unwrap_or(signal);
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem_at_once() {
        let mut config = IdleConfig::new(Workload::Service { name: " ".into(), replicas: 0 }, Duration::ZERO);
        config.stop = StopMethod::Kill { signal: "sig term".into() };
        config.wake_timeout = Duration::from_secs(1);
        config.readiness = Readiness {
            check: ReadinessCheck::Tcp { address: "no-port".into() },
            settle: Duration::from_secs(2),
            poll_min: Duration::ZERO,
            poll_max: Duration::ZERO,
        };
        let problems = config.validate().unwrap_err().problems;
        let expected = [
            "service name is empty",
            "at least 1 replica",
            "scaling it to 0",
            "idle_timeout",
            "stop.signal",
            "readiness.address",
            "poll_min must be greater",
            "settle",
        ];
        for needle in expected {
            assert!(problems.iter().any(|p| p.contains(needle)), "{needle:?} missing from {problems:#?}");
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn metric_labels_must_be_label_names_the_watcher_does_not_set_itself() {
        let mut config = IdleConfig::new(Workload::Container("web".into()), Duration::from_secs(1));
        for key in ["host", "_zone", "rack_2"] {
            config.metric_labels.insert(key.into(), "x".into());
        }
        config.validate().unwrap();
        for key in ["", "2rack", "data-center", "__name", "workload", "state"] {
            config.metric_labels.insert(key.into(), "x".into());
        }
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("\"workload\" is a label the watcher sets itself")));
        assert!(problems.iter().any(|p| p.contains("\"data-center\" is not a metric label name")));
        let parsed: IdleConfig = serde_json::from_str(
            r#"{"workload": {"container": "web"}, "idle_timeout": "1s", "metric_labels": {"host": "edge"}}"#,
        )
        .unwrap();
        assert_eq!(parsed.metric_labels["host"], "edge");
    }

    #[test]
    fn an_http_check_needs_an_http_url_with_a_port_and_a_real_status() {
        let mut config = IdleConfig::new(Workload::Container("web".into()), Duration::from_secs(1));
        config.readiness.check =
            ReadinessCheck::Http { url: "https://web/health".into(), expected_status: 99 };
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("readiness.url") && problems[1].contains("expected_status 99"));
        config.readiness.check =
            ReadinessCheck::Http { url: "http://web:8080/health".into(), expected_status: 204 };
        config.validate().unwrap();
        let parsed: Readiness =
            serde_json::from_str(r#"{"check": {"kind": "http", "url": "http://web:80/"}}"#).unwrap();
        assert_eq!(parsed.check, ReadinessCheck::Http { url: "http://web:80/".into(), expected_status: 200 });
    }

    #[test]
    fn defaults_are_valid_and_durations_read_the_humantime_way() {
        let config: IdleConfig = serde_json::from_str(
            r#"{"workload": {"service": {"name": "api", "replicas": 2}}, "idle_timeout": "90s"}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.idle_timeout, Duration::from_secs(90));
        assert_eq!(config.stop, StopMethod::Stop);
        assert_eq!(config.readiness.poll_min, Duration::from_millis(50));
        let unknown = serde_json::from_str::<IdleConfig>(
            r#"{"workload": {"container": "a"}, "idle_timeout": "1s", "loading_page": true}"#,
        );
        assert!(unknown.is_err(), "unknown keys are rejected");
        for good in ["SIGTERM", "TERM", "9", "SIGRTMIN+3"] {
            assert!(valid_signal(good), "{good}");
        }
        for bad in ["", "sigterm", "0", "SIG", "99"] {
            assert!(!valid_signal(bad), "{bad}");
        }
    }
}
