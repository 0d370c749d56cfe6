//! Pool configuration: serde with humantime durations, defaults that match the documented
//! behaviour, and a `validate()` that reports every problem at once.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::backoff::BackoffConfig;
use crate::balance::Strategy;
use crate::breaker::BreakerConfig;
use crate::error::PoolError;
use crate::health::HealthThresholds;
use crate::outlier::OutlierConfig;

/// What the pool answers when an agent cannot take a request (every breaker open, no
/// connection up, every instance draining or unhealthy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureMode {
    /// Fail the request with [`PoolError::Unavailable`] (the safe default for security agents).
    #[default]
    Closed,
    /// Skip the agent and answer [`Decision::allow`](pool_api::Decision::allow), tagged
    /// `agentpool:fail-open` in its audit data and counted (for optional agents: analytics…).
    Open,
}

/// What to do when every usable connection of an agent is paused by the agent's flow control.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowControlMode {
    /// Fail at once with [`PoolError::FlowControlPaused`].
    #[default]
    FailClosed,
    /// Skip the agent: answer [`Decision::allow`](pool_api::Decision::allow), tagged
    /// `agentpool:flow-control-open`, and count it.
    FailOpen,
    /// Wait for the agent to resume, up to [`FlowControlConfig::wait`] (and never past the
    /// request's time-out), then fail with [`PoolError::FlowControlPaused`].
    WaitAndRetry,
}

/// Flow-control behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowControlConfig {
    /// What to do when paused.
    pub mode: FlowControlMode,
    /// How long [`FlowControlMode::WaitAndRetry`] waits for a resume.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        Self { mode: FlowControlMode::default(), wait: Duration::from_millis(100) }
    }
}

/// Correlation affinity: pinning a request's events to the connection of its headers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    /// Pins kept per agent at most; beyond, requests are balanced per event (and counted).
    pub max_entries: usize,
    /// A pin unused for this long is dropped by maintenance.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        Self { max_entries: 100_000, ttl: Duration::from_secs(300) }
    }
}

/// Sticky sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StickyConfig {
    /// A session unused for this long expires; `None` (`null`): sessions live until cleared.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

impl Default for StickyConfig {
    fn default() -> Self {
        Self { idle_timeout: Some(Duration::from_secs(300)) }
    }
}

/// Connection health: the success-rate window, its thresholds, latency tracking and pings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Length of the success-rate window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Buckets the window is divided into (old buckets expire one at a time).
    pub buckets: usize,
    /// Success-rate thresholds for Healthy / Degraded / Unhealthy.
    pub thresholds: HealthThresholds,
    /// How often each connection is pinged (0 = never).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A ping not answered within this closes the connection, which is then replaced.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Decay of the peak-EWMA latency estimate.
    #[serde(with = "humantime_serde")]
    pub latency_decay: Duration,
    /// Latency assumed for a connection with no estimate yet (peak-EWMA balancing).
    #[serde(with = "humantime_serde")]
    pub default_rtt: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            buckets: 10,
            thresholds: HealthThresholds::default(),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            latency_decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// Configuration of an [`AgentPool`](crate::AgentPool).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Identifies this proxy to agents in the handshake. Default `agentpool`.
    pub proxy_id: String,
    /// Connections opened to each endpoint (replica) of an agent. Default 4.
    pub connections_per_endpoint: usize,
    /// Requests in flight per connection; the agent's advertised maximum lowers it. Default 100.
    pub max_concurrency_per_connection: u32,
    /// How a connection is chosen for each request. Default power of two choices.
    pub balancer: Strategy,
    /// Time allowed for a whole send, waiting for a permit included. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time allowed to establish a connection. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for the handshake once connected. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Back-off between reconnect attempts of one connection. Default 100 ms doubling to 30 s,
    /// with jitter.
    pub reconnect: BackoffConfig,
    /// Per-endpoint circuit breaker. Default: opens after 5 consecutive failures, probes after
    /// 30 s (doubling up to 300 s while probes fail).
    pub breaker: BreakerConfig,
    /// Connection health. Default: a 10 s window in 10 buckets, healthy at ≥ 95 % success and
    /// degraded at ≥ 80 % (from 10 requests), pings every 10 s with a 5 s time-out.
    pub health: HealthConfig,
    /// Outlier ejection across an agent's endpoints. Default on, evaluated every 10 s, ejecting
    /// for 30 s (up to 300 s) and at most 10 % of the replicas.
    pub outlier: OutlierConfig,
    /// What to answer when an agent cannot take a request. Default fail closed.
    pub failure_mode: FailureMode,
    /// What to do when the agent pauses every usable connection. Default fail closed (a
    /// wait-and-retry wait is 100 ms).
    pub flow_control: FlowControlConfig,
    /// Correlation affinity. Default at most 100 000 pinned requests, each dropped after 5 min
    /// idle.
    pub affinity: AffinityConfig,
    /// Sticky sessions. Default: a session expires after 5 min unused.
    pub sticky: StickyConfig,
    /// Configuration pushes to agents. Default: a 10 s ack time-out, 3 retries 2 s apart.
    pub config_push: ConfigPushConfig,
    /// Who may connect in reverse. Default: nobody (no token configured).
    pub reverse: ReverseConfig,
    /// How long shutdown (or an agent's removal) waits for in-flight requests before
    /// cancelling them. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Seed for every random choice (balancing, jitter), for reproducible tests. Default none.
    pub seed: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            proxy_id: "agentpool".to_owned(),
            connections_per_endpoint: 4,
            max_concurrency_per_connection: 100,
            balancer: Strategy::default(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            reconnect: BackoffConfig::default(),
            breaker: BreakerConfig::default(),
            health: HealthConfig::default(),
            outlier: OutlierConfig::default(),
            failure_mode: FailureMode::default(),
            flow_control: FlowControlConfig::default(),
            affinity: AffinityConfig::default(),
            sticky: StickyConfig::default(),
            config_push: ConfigPushConfig::default(),
            reverse: ReverseConfig::default(),
            drain_timeout: Duration::from_secs(30),
            seed: None,
        }
    }
}

/// Upper bound on connections per endpoint; more is a typo, not a plan.
const MAX_CONNECTIONS_PER_ENDPOINT: usize = 1024;

impl PoolConfig {
    /// Checks every field and returns all problems at once, each naming its field.
    pub fn validate(&self) -> Result<(), PoolError> {
        let mut p = Vec::new();
        if self.proxy_id.trim().is_empty() {
            p.push("proxy_id: must not be empty".to_owned());
        }
        if !(1..=MAX_CONNECTIONS_PER_ENDPOINT).contains(&self.connections_per_endpoint) {
            p.push(format!(
                "connections_per_endpoint: must be 1..={MAX_CONNECTIONS_PER_ENDPOINT}, got {}",
                self.connections_per_endpoint
            ));
        }
        if self.max_concurrency_per_connection == 0 {
            p.push("max_concurrency_per_connection: must be at least 1".to_owned());
        }
        for (name, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("health.window", self.health.window),
            ("health.latency_decay", self.health.latency_decay),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be greater than zero"));
            }
        }
        if self.health.buckets == 0 || self.health.buckets > 1000 {
            p.push(format!("health.buckets: must be 1..=1000, got {}", self.health.buckets));
        }
        if self.sticky.idle_timeout.is_some_and(|d| d.is_zero()) {
            p.push("sticky.idle_timeout: must be greater than zero (or null for never)".to_owned());
        }
        if self.config_push.ack_timeout.is_zero() {
            p.push("config_push.ack_timeout: must be greater than zero".to_owned());
        }
        if self.affinity.ttl.is_zero() {
            p.push("affinity.ttl: must be greater than zero".to_owned());
        }
        if self.flow_control.mode == FlowControlMode::WaitAndRetry && self.flow_control.wait.is_zero() {
            p.push("flow_control.wait: must be greater than zero with wait-and-retry".to_owned());
        }
        if !self.health.ping_interval.is_zero() && self.health.ping_timeout.is_zero() {
            p.push("health.ping_timeout: must be greater than zero when pings are on".to_owned());
        }
        p.extend(self.health.thresholds.validate().into_iter().map(|e| at("health.thresholds", &e)));
        p.extend(self.reconnect.validate().into_iter().map(|e| at("reconnect", &e)));
        p.extend(self.breaker.validate().into_iter().map(|e| at("breaker", &e)));
        p.extend(self.outlier.validate().into_iter().map(|e| at("outlier", &e)));
        if p.is_empty() { Ok(()) } else { Err(PoolError::InvalidConfig { problems: p }) }
    }
}

/// Re-roots a policy's problem (`"breaker.failure_threshold must…"`) at its place in the pool
/// configuration (`"breaker.failure_threshold must…"`, `"health.thresholds.degraded …"`).
fn at(path: &str, problem: &str) -> String {
    let rest = problem.split_once('.').map_or(problem, |(_, rest)| rest);
    format!("{path}.{rest}")
}

/// Per-agent overrides of pool settings; `None` keeps the pool's value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentOptions {
    /// Overrides [`PoolConfig::connections_per_endpoint`].
    pub connections_per_endpoint: Option<usize>,
    /// Overrides [`PoolConfig::max_concurrency_per_connection`].
    pub max_concurrency_per_connection: Option<u32>,
    /// Overrides [`PoolConfig::balancer`].
    pub balancer: Option<Strategy>,
    /// Overrides [`PoolConfig::request_timeout`].
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Overrides [`PoolConfig::failure_mode`].
    pub failure_mode: Option<FailureMode>,
    /// Overrides [`PoolConfig::flow_control`]'s mode.
    pub flow_control: Option<FlowControlMode>,
}

/// The settings an agent runs with: pool values with its overrides applied.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AgentSettings {
    pub(crate) connections_per_endpoint: usize,
    pub(crate) max_concurrency: u32,
    pub(crate) balancer: Strategy,
    pub(crate) request_timeout: Duration,
    pub(crate) failure_mode: FailureMode,
    pub(crate) flow_control: FlowControlMode,
}

impl AgentSettings {
    pub(crate) fn resolve(pool: &PoolConfig, opts: &AgentOptions) -> Result<Self, Vec<String>> {
        let s = Self {
            connections_per_endpoint: opts.connections_per_endpoint.unwrap_or(pool.connections_per_endpoint),
            max_concurrency: opts
                .max_concurrency_per_connection
                .unwrap_or(pool.max_concurrency_per_connection),
            balancer: opts.balancer.unwrap_or(pool.balancer),
            request_timeout: opts.request_timeout.unwrap_or(pool.request_timeout),
            failure_mode: opts.failure_mode.unwrap_or(pool.failure_mode),
            flow_control: opts.flow_control.unwrap_or(pool.flow_control.mode),
        };
        let mut p = Vec::new();
        if !(1..=MAX_CONNECTIONS_PER_ENDPOINT).contains(&s.connections_per_endpoint) {
            p.push(format!(
                "options.connections_per_endpoint: must be 1..={MAX_CONNECTIONS_PER_ENDPOINT}, got {}",
                s.connections_per_endpoint
            ));
        }
        if s.max_concurrency == 0 {
            p.push("options.max_concurrency_per_connection: must be at least 1".to_owned());
        }
        if s.request_timeout.is_zero() {
            p.push("options.request_timeout: must be greater than zero".to_owned());
        }
        if p.is_empty() { Ok(s) } else { Err(p) }
    }
}

/// How pushes wait and retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigPushConfig {
    /// Time allowed for an agent to acknowledge one attempt.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Attempts after the first, when an ack times out or the connection is lost.
    pub retries: u32,
    /// Pause between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
}

impl Default for ConfigPushConfig {
    fn default() -> Self {
        Self { ack_timeout: Duration::from_secs(10), retries: 3, retry_interval: Duration::from_secs(2) }
    }
}

/// Who may connect in reverse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReverseConfig {
    /// Tokens an agent may present; empty refuses every reverse connection.
    pub tokens: Vec<String>,
    /// Agent ids allowed to connect; empty allows any.
    pub allowed_agents: Vec<String>,
}

impl ReverseConfig {
    /// Why `agent` presenting `token` is refused, if it is.
    pub(crate) fn refuse(&self, agent: &str, token: Option<&str>) -> Option<&'static str> {
        if self.tokens.is_empty() {
            return Some("reverse connections are disabled (no token is configured)");
        }
        let Some(token) = token else { return Some("no token presented") };
        // Every configured token is compared, each in constant time, so the time taken says
        // nothing about which one (or how much of one) matched.
        let matched = self
            .tokens
            .iter()
            .fold(subtle::Choice::from(0), |any, t| any | t.as_bytes().ct_eq(token.as_bytes()));
        if !bool::from(matched) {
            return Some("invalid token");
        }
        if !self.allowed_agents.is_empty() && !self.allowed_agents.iter().any(|a| a == agent) {
            return Some("agent id is not on the allow-list");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documentation() {
        let c = PoolConfig::default();
        c.validate().unwrap();
        assert_eq!(c.connections_per_endpoint, 4);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.balancer, Strategy::PowerOfTwoChoices);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.breaker.failure_threshold, 5);
        assert_eq!(c.breaker.reset_timeout, Duration::from_secs(30));
    }

    #[test]
    fn validate_reports_every_problem_with_its_field() {
        let c = PoolConfig {
            proxy_id: " ".into(),
            connections_per_endpoint: 0,
            max_concurrency_per_connection: 0,
            request_timeout: Duration::ZERO,
            connect_timeout: Duration::ZERO,
            handshake_timeout: Duration::ZERO,
            ..PoolConfig::default()
        };
        let Err(PoolError::InvalidConfig { problems }) = c.validate() else { panic!("must fail") };
        for field in [
            "proxy_id",
            "connections_per_endpoint",
            "max_concurrency_per_connection",
            "request_timeout",
            "connect_timeout",
            "handshake_timeout",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(field)), "{field} missing from {problems:?}");
        }
        assert_eq!(problems.len(), 6);
    }

    #[test]
    fn nested_policy_problems_name_their_full_path() {
        let mut c = PoolConfig::default();
        c.health.thresholds.degraded = 0.0;
        c.breaker.failure_threshold = 0;
        c.reconnect.base = Duration::ZERO;
        c.outlier.interval = Duration::ZERO;
        let Err(PoolError::InvalidConfig { problems }) = c.validate() else { panic!("must fail") };
        for path in
            ["health.thresholds.degraded", "breaker.failure_threshold", "reconnect.base", "outlier.interval"]
        {
            assert!(problems.iter().any(|p| p.starts_with(path)), "{path} missing from {problems:?}");
        }
    }

    #[test]
    fn config_reads_from_json_with_humantime_durations() {
        let c: PoolConfig = serde_json::from_str(
            r#"{"connections_per_endpoint": 2, "request_timeout": "250ms", "balancer": "peak-ewma",
                "failure_mode": "open", "health": {"window": "5s", "thresholds": {"healthy": 0.9}}}"#,
        )
        .unwrap();
        assert_eq!(c.connections_per_endpoint, 2);
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.balancer, Strategy::PeakEwma);
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(c.health.window, Duration::from_secs(5));
        assert_eq!(c.health.thresholds.healthy, 0.9);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<PoolConfig, _> = serde_json::from_str(r#"{"conections_per_endpoint": 2}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn agent_options_override_pool_values() {
        let pool = PoolConfig::default();
        let opts = AgentOptions {
            connections_per_endpoint: Some(1),
            request_timeout: Some(Duration::from_secs(2)),
            failure_mode: Some(FailureMode::Open),
            ..AgentOptions::default()
        };
        let s = AgentSettings::resolve(&pool, &opts).unwrap();
        assert_eq!(s.connections_per_endpoint, 1);
        assert_eq!(s.request_timeout, Duration::from_secs(2));
        assert_eq!(s.failure_mode, FailureMode::Open);
        assert_eq!(s.max_concurrency, 100);
        let bad = AgentOptions { max_concurrency_per_connection: Some(0), ..AgentOptions::default() };
        assert_eq!(AgentSettings::resolve(&pool, &bad).unwrap_err().len(), 1);
    }
}

#[cfg(test)]
mod reverse_tests {
    use super::*;

    #[test]
    fn tokens_and_the_allow_list_decide() {
        let open = ReverseConfig::default();
        assert!(open.refuse("waf", Some("x")).unwrap().contains("disabled"));
        let cfg = ReverseConfig {
            tokens: vec!["s3cret".into(), "other".into()],
            allowed_agents: vec!["waf".into()],
        };
        assert_eq!(cfg.refuse("waf", Some("s3cret")), None);
        assert_eq!(cfg.refuse("waf", Some("other")), None);
        assert_eq!(cfg.refuse("waf", Some("s3cre")), Some("invalid token"));
        assert_eq!(cfg.refuse("waf", None), Some("no token presented"));
        assert_eq!(cfg.refuse("bot", Some("s3cret")), Some("agent id is not on the allow-list"));
        let any = ReverseConfig { allowed_agents: vec![], ..cfg };
        assert_eq!(any.refuse("bot", Some("s3cret")), None);
    }
}
