//! The controller's pool of docker-agents: lookup by address, Docker host or name, and health
//! monitoring with back-off.
//!
//! An [`DockerAgentPool`] keeps one [`Agent`] per address (`host:port`). Each agent has a name (unique
//! in the pool: a second index maps names to addresses, so [`DockerAgentPool::get_by_name`] is a
//! lookup, not a scan), its pooled mTLS [`AgentClient`], the [`AgentInfo`] it last reported and
//! its health. Every operation is safe to call concurrently (`DashMap` inside).
//!
//! # Adding an agent
//!
//! [`DockerAgentPool::add`] validates the name and address, builds the client (bad PEM is an error),
//! and probes the agent: `GET /agent/info`, `GET /agent/health` and the engine's `version`
//! through the agent. Then:
//!
//! | Probe outcome | `add` returns | The agent |
//! |---|---|---|
//! | address already in the pool | `Ok(false)` | the existing one is kept, untouched |
//! | name used by another address | `Err(DuplicateName)` | not added |
//! | answers, engine API ≥ [`DockerAgentPoolConfig::min_api_version`] | `Ok(true)` | healthy (or degraded: certificate expiring) |
//! | engine API older than the minimum | `Err(ApiTooOld)` | not added |
//! | TLS refused (wrong CA, certificate rejected) | `Err(Tls)` | not added: a configuration error never heals by retrying |
//! | Docker API access denied (403 from the agent's ACL) | `Err(Denied)` | not added |
//! | unreachable, time-out, engine down behind the agent | `Ok(true)`, or `Err(Unreachable)` if [`DockerAgentPoolConfig::require_reachable`] | unhealthy, retried by its monitor |
//!
//! Registering an unreachable agent is the default because a controller starting up must not
//! fail (or depend on start order) because one machine is rebooting: the agent is listed as
//! unhealthy with the reason, and becomes healthy by itself once it answers and its engine
//! passes the version check. Errors that retrying cannot fix are returned at once.
//!
//! # Monitoring
//!
//! Each agent has one monitor task. Every [`DockerAgentPoolConfig::check_interval`] it calls
//! `GET /agent/health`; after [`DockerAgentPoolConfig::unhealthy_after`] consecutive failures (a transport
//! error, a time-out, or a report saying `unhealthy`) the agent is marked unhealthy, and the
//! task then retries with exponential back-off and jitter (`backon`, from
//! [`DockerAgentPoolConfig::backoff_min`] up to [`DockerAgentPoolConfig::backoff_max`]) until the agent answers
//! again. Before an unhealthy agent is marked healthy again its info and engine API version are
//! fetched anew (the engine may have been replaced). The pooled client reconnects by itself:
//! dead connections are dropped and the next request dials again.
//!
//! The task of an agent stops when the agent is removed ([`DockerAgentPool::remove`],
//! [`DockerAgentPool::remove_all`]) or the pool is dropped; no task outlives its entry.
//!
//! State is visible per agent ([`Agent::status`], [`Agent::subscribe`] for changes), for the
//! whole pool ([`DockerAgentPool::stats`]) and as gauges through the `metrics` facade:
//! `docker_agent_pool_agents` and `docker_agent_pool_agents_unhealthy` (label `pool`), plus the
//! counter `docker_agent_pool_health_check_failures_total` (labels `pool`, `agent`).
//!
//! ```no_run
//! use docker_agent::client::AgentTls;
//! use docker_agent::pool::{AgentEndpoint, DockerAgentPool, DockerAgentPoolConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = DockerAgentPool::new(DockerAgentPoolConfig::default());
//! let tls = AgentTls::from_dir("/etc/agentpool/agents/node-1")?;
//! pool.add(AgentEndpoint::new("node-1", "10.0.0.7:8890", tls)).await?;
//! let agent = pool.get_by_docker_host("agent://10.0.0.7:8890")?.expect("added above");
//! println!("{} is {:?}", agent.name(), agent.status().health);
//! let containers = agent.docker().list_containers(None).await?;
//! # let _ = containers;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{
    AgentClient, AgentHealthStatus, AgentInfo, AgentTls, ClientError, error_chain, is_tls_error,
};
use crate::host::{DockerHost, DockerHostError};

/// How the pool checks its agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerAgentPoolConfig {
    /// The pool's name: the `pool` label of its metrics.
    pub name: String,
    /// Time between two health checks of a healthy agent (default 10 s).
    pub check_interval: Duration,
    /// Time-out of one check and of each call made by [`DockerAgentPool::add`] (default 5 s).
    pub request_timeout: Duration,
    /// Consecutive failed checks after which an agent is unhealthy (default 2, at least 1).
    pub unhealthy_after: u32,
    /// First retry delay once unhealthy (default 500 ms).
    pub backoff_min: Duration,
    /// Longest retry delay once unhealthy (default 30 s).
    pub backoff_max: Duration,
    /// The oldest engine API accepted, `(major, minor)` (default 1.41, Docker 20.10).
    pub min_api_version: (u32, u32),
    /// Refuse to add an agent that cannot be reached instead of registering it unhealthy
    /// (default `false`).
    pub require_reachable: bool,
}

impl Default for DockerAgentPoolConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            check_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            unhealthy_after: 2,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            min_api_version: (1, 41),
            require_reachable: false,
        }
    }
}

/// An agent to add: its name, address and the controller's TLS material for it.
#[derive(Clone, Debug)]
pub struct AgentEndpoint {
    /// Unique name in the pool.
    pub name: String,
    /// `host:port`, or `agent://host:port`.
    pub address: String,
    /// CA, client certificate and key.
    pub tls: AgentTls,
}

impl AgentEndpoint {
    /// An endpoint from its parts.
    pub fn new(name: impl Into<String>, address: impl Into<String>, tls: AgentTls) -> Self {
        Self { name: name.into(), address: address.into(), tls }
    }
}

/// Why [`DockerAgentPool::add`] refused an agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// The name is empty or contains control characters.
    #[error("invalid agent name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The address is not `host:port` (or `agent://host:port`).
    #[error("invalid agent address: {0}")]
    Address(#[from] DockerHostError),
    /// Another agent in the pool has this name.
    #[error("an agent named {name:?} is already in the pool at {existing_address}")]
    DuplicateName {
        /// The name.
        name: String,
        /// The address of the agent that has it.
        existing_address: String,
    },
    /// The TLS material could not be used.
    #[error("agent {address}: {source}")]
    Client {
        /// The agent's address.
        address: String,
        /// The client's error.
        source: ClientError,
    },
    /// The TLS handshake failed: the agent's certificate is not from the configured CA (or not
    /// for the agent name), or the agent refused the client certificate.
    #[error("agent {address}: TLS handshake failed: {message}")]
    Tls {
        /// The agent's address.
        address: String,
        /// The TLS error.
        message: String,
    },
    /// The agent's engine speaks an API older than the pool accepts.
    #[error("agent {address}: engine API {api_version} is older than the minimum {}.{}", minimum.0, minimum.1)]
    ApiTooOld {
        /// The agent's address.
        address: String,
        /// The engine's API version.
        api_version: String,
        /// The minimum configured.
        minimum: (u32, u32),
    },
    /// The agent's ACL denied a call the pool needs (`GET /version`).
    #[error("agent {address} denied {what}: {message}")]
    Denied {
        /// The agent's address.
        address: String,
        /// The call.
        what: &'static str,
        /// The agent's message.
        message: String,
    },
    /// The agent could not be reached and [`DockerAgentPoolConfig::require_reachable`] is set.
    #[error("agent {address} unreachable: {message}")]
    Unreachable {
        /// The agent's address.
        address: String,
        /// Why.
        message: String,
    },
}

/// An agent's health, as its monitor last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentHealthState {
    /// Answering; engine reachable; certificate valid.
    Healthy,
    /// Answering, but its certificate expires soon.
    Degraded,
    /// Not answering, engine unreachable, certificate expired or engine API too old.
    Unhealthy,
}

impl AgentHealthState {
    /// True unless unhealthy.
    pub fn is_usable(self) -> bool {
        !matches!(self, Self::Unhealthy)
    }
}

/// An agent's state at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// Health.
    pub health: AgentHealthState,
    /// Failed checks in a row (0 after a success).
    pub consecutive_failures: u32,
    /// The last failure, if the last check failed.
    pub last_error: Option<String>,
    /// When the last check finished.
    pub last_check: Option<SystemTime>,
    /// When `health` last changed (or the agent was added).
    pub since: SystemTime,
    /// What the agent last reported about itself.
    pub info: Option<AgentInfo>,
    /// The engine's API version, as last checked.
    pub api_version: Option<String>,
}

/// An agent the pool's monitor finds unhealthy; see [`Agent::ready_docker`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("docker agent {name:?} at {address} is unhealthy (since {}): {reason}", humantime_serde::re::humantime::format_rfc3339_seconds(*since))]
pub struct AgentUnavailable {
    /// The agent's name.
    pub name: String,
    /// Its address, `host:port`.
    pub address: String,
    /// When it last changed health.
    pub since: SystemTime,
    /// The last health check's error.
    pub reason: String,
}

/// One agent of a pool; get it with [`DockerAgentPool::get`] and friends.
pub struct Agent {
    name: String,
    address: String,
    client: AgentClient,
    status: watch::Sender<AgentStatus>,
    monitor: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("health", &self.status.borrow().health)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's address, `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The agent's Docker host, `agent://host:port`.
    pub fn docker_host(&self) -> String {
        format!("agent://{}", self.address)
    }

    /// The pooled mTLS client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// A bollard client going through this agent (shares the pooled connections), whatever
    /// the agent's health; see [`ready_docker`](Self::ready_docker) for one that checks first.
    pub fn docker(&self) -> bollard::Docker {
        self.client.docker()
    }

    /// A bollard client through this agent, or — when the monitor last found the agent
    /// unhealthy — an error naming the agent, its address, since when and why, instead of a
    /// client whose calls would fail with a connection error.
    pub fn ready_docker(&self) -> Result<bollard::Docker, AgentUnavailable> {
        let status = self.status.borrow();
        if status.health.is_usable() {
            return Ok(self.client.docker());
        }
        Err(AgentUnavailable {
            name: self.name.clone(),
            address: self.address.clone(),
            since: status.since,
            reason: status.last_error.clone().unwrap_or_else(|| "no successful health check yet".to_owned()),
        })
    }

    /// The current state.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// True unless unhealthy.
    pub fn is_usable(&self) -> bool {
        self.status.borrow().health.is_usable()
    }

    /// The info the agent last reported, if it ever answered.
    pub fn info(&self) -> Option<AgentInfo> {
        self.status.borrow().info.clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    fn stop_monitor(&self) {
        if let Some(task) = self.monitor.lock().take() {
            task.abort();
        }
    }
}

/// A snapshot of one agent for [`DockerAgentPoolStats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSnapshot {
    /// Name.
    pub name: String,
    /// Address.
    pub address: String,
    /// State.
    pub status: AgentStatus,
}

/// The pool at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerAgentPoolStats {
    /// Agents in the pool.
    pub total: usize,
    /// Healthy ones.
    pub healthy: usize,
    /// Degraded ones (usable, certificate expiring).
    pub degraded: usize,
    /// Unhealthy ones.
    pub unhealthy: usize,
    /// Every agent, sorted by name.
    pub agents: Vec<AgentSnapshot>,
}

/// A concurrent pool of agents; see the [module docs](self). Cheap to clone (shared).
#[derive(Clone)]
pub struct DockerAgentPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: DockerAgentPoolConfig,
    by_address: DashMap<String, Arc<Agent>>,
    by_name: DashMap<String, String>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for agent in self.by_address.iter() {
            agent.stop_monitor();
        }
    }
}

impl fmt::Debug for DockerAgentPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerAgentPool")
            .field("name", &self.inner.config.name)
            .field("agents", &self.inner.by_address.len())
            .finish_non_exhaustive()
    }
}

impl Default for DockerAgentPool {
    fn default() -> Self {
        Self::new(DockerAgentPoolConfig::default())
    }
}

/// What a successful probe learned.
struct Probe {
    health: AgentHealthState,
    info: Option<AgentInfo>,
    api_version: Option<String>,
}

/// Why a probe failed.
enum ProbeError {
    /// Retrying may help: the agent or its engine is down.
    Transient(String),
    /// Retrying cannot help: configuration (TLS, ACL, engine too old).
    Fatal(AddError),
}

impl ProbeError {
    fn message(&self) -> String {
        match self {
            Self::Transient(message) => message.clone(),
            Self::Fatal(e) => e.to_string(),
        }
    }
}

impl DockerAgentPool {
    /// An empty pool.
    pub fn new(config: DockerAgentPoolConfig) -> Self {
        let config = DockerAgentPoolConfig { unhealthy_after: config.unhealthy_after.max(1), ..config };
        let pool = Self {
            inner: Arc::new(PoolInner { config, by_address: DashMap::new(), by_name: DashMap::new() }),
        };
        pool.publish_gauges();
        pool
    }

    /// The configuration.
    pub fn config(&self) -> &DockerAgentPoolConfig {
        &self.inner.config
    }

    /// Adds an agent; see the [module docs](self#adding-an-agent) for what is checked and what
    /// happens to an unreachable agent. `Ok(false)` when the address is already in the pool.
    ///
    /// Must be called within a tokio runtime (it spawns the agent's monitor task).
    pub async fn add(&self, endpoint: AgentEndpoint) -> Result<bool, AddError> {
        let AgentEndpoint { name, address, tls } = endpoint;
        validate_name(&name)?;
        let address = canonical_address(&address)?;
        if self.inner.by_address.contains_key(&address) {
            return Ok(false);
        }
        if let Some(existing) = self.inner.by_name.get(&name)
            && *existing != address
        {
            return Err(AddError::DuplicateName { name, existing_address: existing.clone() });
        }
        let client = AgentClient::with_request_timeout(&address, &tls, self.inner.config.request_timeout)
            .map_err(|source| AddError::Client { address: address.clone(), source })?;

        let now = SystemTime::now();
        let status = match probe(&client, &self.inner.config, true).await {
            Ok(probe) => AgentStatus {
                health: probe.health,
                consecutive_failures: 0,
                last_error: None,
                last_check: Some(now),
                since: now,
                info: probe.info,
                api_version: probe.api_version,
            },
            Err(ProbeError::Fatal(e)) => return Err(e),
            Err(ProbeError::Transient(message)) if self.inner.config.require_reachable => {
                return Err(AddError::Unreachable { address, message });
            }
            Err(ProbeError::Transient(message)) => AgentStatus {
                health: AgentHealthState::Unhealthy,
                consecutive_failures: 1,
                last_error: Some(message),
                last_check: Some(now),
                since: now,
                info: None,
                api_version: None,
            },
        };

        // Reserve the name, then the address; never hold two map locks at once.
        match self.inner.by_name.entry(name.clone()) {
            Entry::Occupied(taken) if *taken.get() == address => return Ok(false),
            Entry::Occupied(taken) => {
                return Err(AddError::DuplicateName { name, existing_address: taken.get().clone() });
            }
            Entry::Vacant(free) => {
                free.insert(address.clone());
            }
        }
        let agent = Arc::new(Agent {
            name: name.clone(),
            address: address.clone(),
            client,
            status: watch::Sender::new(status),
            monitor: parking_lot::Mutex::new(None),
        });
        match self.inner.by_address.entry(address.clone()) {
            Entry::Occupied(_) => {
                self.inner.by_name.remove_if(&name, |_, owner| *owner == address);
                return Ok(false);
            }
            Entry::Vacant(free) => {
                free.insert(Arc::clone(&agent));
            }
        }
        let task = tokio::spawn(monitor(Arc::downgrade(&agent), Arc::downgrade(&self.inner)));
        *agent.monitor.lock() = Some(task);
        // Removed while the task was being spawned: stop it now.
        if !self.inner.by_address.get(&address).is_some_and(|a| Arc::ptr_eq(&a, &agent)) {
            agent.stop_monitor();
        }
        tracing::info!(pool = %self.inner.config.name, agent = %name, %address, health = ?agent.status().health, "agent added");
        self.publish_gauges();
        Ok(true)
    }

    /// True if an agent with this address (`host:port` or `agent://host:port`) is in the pool.
    pub fn has(&self, address: &str) -> bool {
        canonical_address(address).is_ok_and(|a| self.inner.by_address.contains_key(&a))
    }

    /// Removes the agent with this address and stops its monitor; returns it if it was there.
    pub fn remove(&self, address: &str) -> Option<Arc<Agent>> {
        let address = canonical_address(address).ok()?;
        let (_, agent) = self.inner.by_address.remove(&address)?;
        agent.stop_monitor();
        self.inner.by_name.remove_if(&agent.name, |_, owner| *owner == address);
        tracing::info!(pool = %self.inner.config.name, agent = %agent.name, %address, "agent removed");
        self.publish_gauges();
        Some(agent)
    }

    /// Removes every agent (e.g. before a configuration reload) and stops their monitors.
    pub fn remove_all(&self) {
        let addresses: Vec<String> = self.inner.by_address.iter().map(|e| e.key().clone()).collect();
        for address in addresses {
            self.remove(&address);
        }
    }

    /// The agent at this address (`host:port`, or `agent://host:port`).
    pub fn get(&self, address: &str) -> Option<Arc<Agent>> {
        let address = canonical_address(address).ok()?;
        self.inner.by_address.get(&address).map(|a| Arc::clone(&a))
    }

    /// The agent behind a Docker host string. `Ok(None)` for a valid host that is not in the
    /// pool (including `unix://`, `tcp://` and `https://` hosts, which never are).
    pub fn get_by_docker_host(&self, docker_host: &str) -> Result<Option<Arc<Agent>>, DockerHostError> {
        let host: DockerHost = docker_host.parse()?;
        Ok(match host {
            DockerHost::Agent(hp) => self.inner.by_address.get(&hp.to_string()).map(|a| Arc::clone(&a)),
            _ => None,
        })
    }

    /// The agent with this name (an index lookup).
    pub fn get_by_name(&self, name: &str) -> Option<Arc<Agent>> {
        let address = self.inner.by_name.get(name)?.clone();
        self.inner.by_address.get(&address).map(|a| Arc::clone(&a))
    }

    /// Every agent, copied out (sorted by name).
    pub fn list(&self) -> Vec<Arc<Agent>> {
        let mut agents: Vec<_> = self.inner.by_address.iter().map(|e| Arc::clone(e.value())).collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents
    }

    /// Iterates over the live map, in no particular order. Shards are read-locked while the
    /// iterator is on them: do not add or remove agents of this pool from inside the loop (use
    /// [`list`](Self::list) for that).
    pub fn iter(&self) -> impl Iterator<Item = Arc<Agent>> + '_ {
        self.inner.by_address.iter().map(|e| Arc::clone(e.value()))
    }

    /// Number of agents.
    pub fn count(&self) -> usize {
        self.inner.by_address.len()
    }

    /// Counts per health state and a snapshot of every agent.
    pub fn stats(&self) -> DockerAgentPoolStats {
        let agents: Vec<AgentSnapshot> = self
            .list()
            .into_iter()
            .map(|a| AgentSnapshot { name: a.name.clone(), address: a.address.clone(), status: a.status() })
            .collect();
        let count = |state| agents.iter().filter(|a| a.status.health == state).count();
        DockerAgentPoolStats {
            total: agents.len(),
            healthy: count(AgentHealthState::Healthy),
            degraded: count(AgentHealthState::Degraded),
            unhealthy: count(AgentHealthState::Unhealthy),
            agents,
        }
    }

    fn publish_gauges(&self) {
        self.inner.publish_gauges();
    }
}

impl PoolInner {
    fn publish_gauges(&self) {
        let total = self.by_address.len();
        let unhealthy = self.by_address.iter().filter(|a| !a.is_usable()).count();
        let pool = self.config.name.clone();
        metrics::gauge!("docker_agent_pool_agents", "pool" => pool.clone()).set(total as f64);
        metrics::gauge!("docker_agent_pool_agents_unhealthy", "pool" => pool).set(unhealthy as f64);
    }
}

fn validate_name(name: &str) -> Result<(), AddError> {
    let reason = if name.trim().is_empty() {
        "it is empty"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else if name.len() > 253 {
        "it is longer than 253 bytes"
    } else {
        return Ok(());
    };
    Err(AddError::InvalidName { name: name.to_owned(), reason })
}

/// `host:port` in canonical form, from `host:port` or `agent://host:port`.
fn canonical_address(address: &str) -> Result<String, DockerHostError> {
    let host: DockerHost =
        if address.contains("://") { address.parse()? } else { format!("agent://{address}").parse()? };
    match host {
        DockerHost::Agent(hp) => Ok(hp.to_string()),
        other => Err(DockerHostError {
            input: address.to_owned(),
            kind: crate::host::DockerHostErrorKind::UnsupportedScheme(other.scheme().to_owned()),
        }),
    }
}

/// `"1.41"` → `(1, 41)`.
pub(crate) fn parse_api_version(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn client_error(e: ClientError) -> ProbeError {
    match e {
        ClientError::Handshake { address, message } => ProbeError::Fatal(AddError::Tls { address, message }),
        other => ProbeError::Transient(other.to_string()),
    }
}

/// Checks an agent: health always; info and the engine's API version when `full`.
async fn probe(
    client: &AgentClient,
    config: &DockerAgentPoolConfig,
    full: bool,
) -> Result<Probe, ProbeError> {
    let address = client.address();
    let report = client.health().await.map_err(client_error)?;
    let health = match report.status {
        AgentHealthStatus::Healthy => AgentHealthState::Healthy,
        AgentHealthStatus::Degraded => AgentHealthState::Degraded,
        AgentHealthStatus::Unhealthy => {
            let reason = match (&report.engine.error, report.engine.reachable) {
                (Some(error), _) => format!("agent reports unhealthy: engine: {error}"),
                (None, false) => "agent reports unhealthy: engine unreachable".to_owned(),
                (None, true) if report.certificate.expires_in_secs <= 0 => {
                    "agent reports unhealthy: its certificate expired".to_owned()
                }
                (None, true) => "agent reports unhealthy".to_owned(),
            };
            return Err(ProbeError::Transient(reason));
        }
    };
    if !full {
        return Ok(Probe { health, info: None, api_version: None });
    }
    let info = client.info().await.map_err(client_error)?;
    let docker = client.docker_with_timeout(config.request_timeout);
    let version = match docker.version().await {
        Ok(version) => version,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 403, message }) => {
            return Err(ProbeError::Fatal(AddError::Denied {
                address: address.to_owned(),
                what: "GET /version",
                message,
            }));
        }
        Err(e) if is_tls_error(&e) => {
            return Err(ProbeError::Fatal(AddError::Tls {
                address: address.to_owned(),
                message: error_chain(&e),
            }));
        }
        Err(e) => {
            return Err(ProbeError::Transient(format!(
                "engine version through the agent: {}",
                error_chain(&e)
            )));
        }
    };
    let api_version = version.api_version.unwrap_or_default();
    match parse_api_version(&api_version) {
        Some(found) if found >= config.min_api_version => {}
        _ => {
            return Err(ProbeError::Fatal(AddError::ApiTooOld {
                address: address.to_owned(),
                api_version,
                minimum: config.min_api_version,
            }));
        }
    }
    Ok(Probe { health, info: Some(info), api_version: Some(api_version) })
}

/// Records a check's outcome; returns whether the agent's health changed.
fn record(agent: &Agent, outcome: Result<Probe, String>, unhealthy_after: u32) -> bool {
    let now = SystemTime::now();
    let mut changed = false;
    agent.status.send_modify(|status| {
        let before = status.health;
        status.last_check = Some(now);
        match outcome {
            Ok(probe) => {
                status.health = probe.health;
                status.consecutive_failures = 0;
                status.last_error = None;
                if probe.info.is_some() {
                    status.info = probe.info;
                }
                if probe.api_version.is_some() {
                    status.api_version = probe.api_version;
                }
            }
            Err(message) => {
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                status.last_error = Some(message);
                if status.consecutive_failures >= unhealthy_after {
                    status.health = AgentHealthState::Unhealthy;
                }
            }
        }
        if status.health != before {
            status.since = now;
            changed = true;
        }
    });
    changed
}

/// One agent's monitor; ends when the agent or the pool is gone (or on abort).
async fn monitor(agent: Weak<Agent>, pool: Weak<PoolInner>) {
    let Some(config) = pool.upgrade().map(|p| p.config.clone()) else { return };
    let labels = {
        let Some(agent) = agent.upgrade() else { return };
        [("pool", config.name.clone()), ("agent", agent.name.clone())]
    };
    let report = |agent: &Agent, outcome: Result<Probe, String>| {
        if outcome.is_err() {
            metrics::counter!("docker_agent_pool_health_check_failures_total", &labels).increment(1);
        }
        if record(agent, outcome, config.unhealthy_after) {
            let status = agent.status();
            tracing::warn!(pool = %config.name, agent = %agent.name, health = ?status.health, error = ?status.last_error, "agent health changed");
            if let Some(pool) = pool.upgrade() {
                pool.publish_gauges();
            }
        }
    };
    loop {
        let unhealthy = match agent.upgrade() {
            Some(agent) => !agent.is_usable(),
            None => return,
        };
        if unhealthy {
            // Retry with exponential back-off and jitter until the agent answers and passes the
            // full check (info and engine version) again.
            let backoff = ExponentialBuilder::default()
                .with_min_delay(config.backoff_min)
                .with_max_delay(config.backoff_max)
                .with_jitter()
                .without_max_times();
            let attempt = || {
                let agent = agent.upgrade();
                let config = &config;
                async move {
                    let Some(agent) = agent else { return Err(None) };
                    probe(&agent.client, config, true).await.map_err(|e| Some(e.message()))
                }
            };
            let outcome = attempt
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(Option::is_some)
                .notify(|e: &Option<String>, _| {
                    if let (Some(agent), Some(message)) = (agent.upgrade(), e) {
                        report(&agent, Err(message.clone()));
                    }
                })
                .await;
            match (agent.upgrade(), outcome) {
                (Some(agent), Ok(probe)) => report(&agent, Ok(probe)),
                _ => return,
            }
        }
        tokio::time::sleep(config.check_interval).await;
        let Some(current) = agent.upgrade() else { return };
        let outcome = probe(&current.client, &config, false).await.map_err(|e| e.message());
        report(&current, outcome);
    }
}

// The tests make their certificates with the agent side's CA tooling.
#[cfg(all(test, feature = "agent"))]
mod tests {
    use super::*;

    #[test]
    fn api_versions_parse_and_compare() {
        assert_eq!(parse_api_version("1.41"), Some((1, 41)));
        assert_eq!(parse_api_version(" 1.9 "), Some((1, 9)));
        assert!(parse_api_version("1.9").unwrap() < (1, 41));
        assert_eq!(parse_api_version("141"), None);
        assert_eq!(parse_api_version("a.b"), None);
        assert_eq!(parse_api_version(""), None);
    }

    #[test]
    fn addresses_are_canonical() {
        assert_eq!(canonical_address("127.0.0.1:8890").unwrap(), "127.0.0.1:8890");
        assert_eq!(canonical_address("agent://127.0.0.1:8890").unwrap(), "127.0.0.1:8890");
        assert_eq!(canonical_address("AGENT://[::1]:1").unwrap(), "[::1]:1");
        assert!(canonical_address("127.0.0.1").is_err());
        assert!(canonical_address("tcp://127.0.0.1:2375").is_err());
        assert!(canonical_address("").is_err());
    }

    #[test]
    fn names_are_checked() {
        validate_name("node-1").unwrap();
        assert!(matches!(validate_name(""), Err(AddError::InvalidName { .. })));
        assert!(matches!(validate_name(" "), Err(AddError::InvalidName { .. })));
        assert!(matches!(validate_name("a\nb"), Err(AddError::InvalidName { .. })));
    }

    fn probe_ok() -> Result<Probe, String> {
        Ok(Probe { health: AgentHealthState::Healthy, info: None, api_version: Some("1.41".into()) })
    }

    #[test]
    fn failures_count_up_to_the_threshold_and_a_success_resets() {
        let status = AgentStatus {
            health: AgentHealthState::Healthy,
            consecutive_failures: 0,
            last_error: None,
            last_check: None,
            since: SystemTime::UNIX_EPOCH,
            info: None,
            api_version: None,
        };
        let agent = Agent {
            name: "a".into(),
            address: "127.0.0.1:1".into(),
            client: AgentClient::new("127.0.0.1:1", &test_tls()).unwrap(),
            status: watch::Sender::new(status),
            monitor: parking_lot::Mutex::new(None),
        };
        assert!(!record(&agent, Err("down".into()), 2));
        assert_eq!(agent.status().health, AgentHealthState::Healthy);
        assert_eq!(agent.status().consecutive_failures, 1);
        assert!(record(&agent, Err("still down".into()), 2));
        let status = agent.status();
        assert_eq!(status.health, AgentHealthState::Unhealthy);
        assert_eq!(status.last_error.as_deref(), Some("still down"));
        assert!(status.since > SystemTime::UNIX_EPOCH);
        assert!(record(&agent, probe_ok(), 2));
        let status = agent.status();
        assert_eq!(
            (status.health, status.consecutive_failures, status.last_error),
            (AgentHealthState::Healthy, 0, None)
        );
        assert_eq!(status.api_version.as_deref(), Some("1.41"));
    }

    fn test_tls() -> AgentTls {
        let day = Duration::from_secs(86_400);
        let ca = crate::certs::CertificateAuthority::generate("t", day).unwrap();
        let client = ca.issue_client("c", day).unwrap();
        AgentTls {
            ca_cert_pem: ca.cert_pem().to_owned(),
            client_cert_pem: client.cert_pem,
            client_key_pem: client.key_pem,
        }
    }

    #[tokio::test]
    async fn unreachable_agents_are_registered_unhealthy_or_refused_when_required() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let config = DockerAgentPoolConfig {
            check_interval: Duration::from_secs(3600),
            backoff_min: Duration::from_secs(3600),
            ..Default::default()
        };
        let strict =
            DockerAgentPool::new(DockerAgentPoolConfig { require_reachable: true, ..config.clone() });
        let err = strict.add(AgentEndpoint::new("down", address.clone(), test_tls())).await.unwrap_err();
        assert!(matches!(&err, AddError::Unreachable { address: a, .. } if *a == address), "{err}");
        assert_eq!(strict.count(), 0);

        let pool = DockerAgentPool::new(config);
        assert!(pool.add(AgentEndpoint::new("down", address.clone(), test_tls())).await.unwrap());
        let agent = pool.get(&address).unwrap();
        let status = agent.status();
        assert_eq!(status.health, AgentHealthState::Unhealthy);
        assert!(status.last_error.as_deref().is_some_and(|e| e.contains(&address)), "{status:?}");
        assert_eq!(pool.stats().unhealthy, 1);
        // Same address again: kept, not replaced.
        assert!(!pool.add(AgentEndpoint::new("other-name", address.clone(), test_tls())).await.unwrap());
        // Same name, other address: refused.
        let err = pool.add(AgentEndpoint::new("down", "127.0.0.1:1", test_tls())).await.unwrap_err();
        assert!(
            matches!(&err, AddError::DuplicateName { existing_address, .. } if *existing_address == address),
            "{err}"
        );
        let removed = pool.remove(&address).unwrap();
        assert!(removed.monitor.lock().is_none(), "monitor stopped on remove");
        assert_eq!(pool.count(), 0);
        assert!(pool.get_by_name("down").is_none());
    }
}
