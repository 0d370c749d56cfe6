//! The idle-watched workloads: one idlewatch group per Docker engine — the local one, and each
//! `[[docker_hosts]]` entry reached through its docker-agent.
//!
//! The local engine's group starts before the gateway serves (a failure stops the start, as
//! before). A remote host gets one docker-agent client (one pool of mutual-TLS connections)
//! and one [`DockerRuntime`] shared by all its workloads; its group is started by a task of its
//! own that asks the agent's `/agent/health`, then starts the watchers, and retries with
//! back-off (1 s doubling to 30 s, with jitter) until that works. The gateway waits for the first attempt
//! (at most [`FIRST_ATTEMPT`]) before it serves, so a reachable agent's workloads are watched
//! from the start; an agent that is down, or refuses the gateway's certificate, does not stop
//! the gateway: its workloads answer 503 (not watched) and `/status` says why. Once watching,
//! the watchers follow the engine themselves (their event streams reconnect after an outage).
//!
//! A reload reads each host's TLS files again ([`Workloads::read_tls`]); material that changed
//! (a renewed client certificate at the same path) is taken by the host's client at once: the
//! next request to the agent dials with it, requests under way finish where they are, and a
//! host still trying to connect tries again at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use docker_agent::{AgentClient, AgentHealthStatus, AgentTls, DockerRuntime};
use idlewatch::{IdleGroup, IdleWatcher};
use pool_api::Lifecycle;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{DockerHostConfig, GatewayConfig, LOCAL_ENGINE};

/// How long the gateway waits for a remote host's first attempt before it serves anyway.
pub(crate) const FIRST_ATTEMPT: Duration = Duration::from_secs(15);
/// The first retry delay of a remote host whose watchers could not start.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the workloads could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkloadsError {
    /// The local engine cannot be reached.
    #[error("workloads need the local Docker engine: {0}")]
    LocalEngine(#[source] docker_agent::bollard::errors::Error),
    /// A docker host's material or address (changed since it was validated).
    #[error("docker host {host}: {message}")]
    Host {
        /// The host's name.
        host: String,
        /// What is wrong.
        message: String,
    },
    /// idlewatch refused the configuration.
    #[error("workloads: {0}")]
    Config(#[from] idlewatch::IdleConfigError),
    /// The local engine's watchers could not start.
    #[error("workloads: {0}")]
    Start(#[from] pool_api::LifecycleError),
}

/// Where a remote host's watchers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostState {
    /// Not yet watching: `attempts` made so far, the last one's error.
    Connecting {
        /// Attempts so far.
        attempts: u32,
        /// Why the last one failed.
        error: Option<String>,
    },
    /// The watchers run.
    Watching,
}

/// A `[[docker_hosts]]` entry as it runs.
pub(crate) struct RemoteHost {
    /// Its name.
    pub name: String,
    /// `agent://host:port`.
    pub url: String,
    state: watch::Sender<HostState>,
    /// The pool of mutual-TLS connections to the agent, shared by the host's watchers.
    client: AgentClient,
    /// The material `client` dials with now.
    tls: std::sync::Mutex<AgentTls>,
    /// Wakes the starter for an attempt now (new material).
    retry: Notify,
}

impl RemoteHost {
    /// Its state now.
    pub(crate) fn state(&self) -> HostState {
        self.state.borrow().clone()
    }
}

/// One engine's watchers.
struct EngineGroup {
    host: Option<Arc<RemoteHost>>,
    group: IdleGroup,
    starter: Option<JoinHandle<()>>,
}

/// Every workload's watcher, and the engines they run on.
#[derive(Default)]
pub(crate) struct Workloads {
    /// The watchers, by the gateway's workload name.
    pub watchers: HashMap<String, IdleWatcher>,
    /// The engine of each workload (`None`: the local one).
    hosts: HashMap<String, Option<Arc<RemoteHost>>>,
    groups: Vec<EngineGroup>,
}

/// What `/status` says of a workload's engine.
pub(crate) struct WorkloadHost {
    /// The host's name (`local` for the local engine).
    pub name: String,
    /// Why its workloads are not watched (yet), if they are not.
    pub error: Option<String>,
}

impl Workloads {
    /// Builds every group and starts them: the local one before returning (its failure is
    /// returned), each remote one on its own task, waited for up to [`FIRST_ATTEMPT`].
    pub(crate) async fn start(config: &GatewayConfig) -> Result<Self, WorkloadsError> {
        let mut workloads = Workloads::default();
        let mut first_attempts = Vec::new();
        let mut groups = config.workload_groups();
        // The local engine first: its failure stops the start before any remote task is spawned.
        groups.sort_by_key(|(host, _)| host.is_some());
        for (host, members) in groups {
            // Same-named containers on two engines are two watchers: their metric series are
            // kept apart by the engine's name.
            let engine = host.unwrap_or(LOCAL_ENGINE);
            let configs = members
                .iter()
                .map(|w| {
                    let mut watch = w.watch.clone();
                    watch.metric_labels.insert("host".to_owned(), engine.to_owned());
                    watch
                })
                .collect();
            let (group, host) = match host {
                None => {
                    let docker = docker_agent::bollard::Docker::connect_with_socket_defaults()
                        .map_err(WorkloadsError::LocalEngine)?;
                    let group = IdleGroup::new(configs, Arc::new(DockerRuntime::new(docker)))?;
                    group.start().await?;
                    workloads.groups.push(EngineGroup { host: None, group: group.clone(), starter: None });
                    (group, None)
                }
                Some(name) => {
                    let host = config.docker_hosts.iter().find(|h| h.name == name).ok_or_else(|| {
                        WorkloadsError::Host { host: name.to_owned(), message: "not configured".into() }
                    })?;
                    let remote = connect(host)?;
                    let group =
                        IdleGroup::new(configs, Arc::new(DockerRuntime::new(remote.client.docker())))?;
                    first_attempts.push(remote.state.subscribe());
                    let starter = tokio::spawn(keep_starting(remote.clone(), group.clone()));
                    workloads.groups.push(EngineGroup {
                        host: Some(remote.clone()),
                        group: group.clone(),
                        starter: Some(starter),
                    });
                    (group, Some(remote))
                }
            };
            for w in members {
                if let Some(watcher) = group.get(w.watch.workload.name()) {
                    workloads.watchers.insert(w.name.clone(), watcher.clone());
                }
                workloads.hosts.insert(w.name.clone(), host.clone());
            }
        }
        // Serve once every remote host's first attempt is over (or after FIRST_ATTEMPT anyway):
        // the hosts are tried at the same time.
        let _ = tokio::time::timeout(FIRST_ATTEMPT, async {
            for first in &mut first_attempts {
                let _ = first.wait_for(|s| !matches!(s, HostState::Connecting { attempts: 0, .. })).await;
            }
        })
        .await;
        for w in &config.workloads {
            tracing::info!(
                workload = %w.name,
                target = %w.watch.workload.name(),
                host = %w.host.as_deref().unwrap_or(LOCAL_ENGINE),
                watching = workloads.watchers.get(&w.name).is_some_and(Lifecycle::is_running),
                "workload configured"
            );
        }
        Ok(workloads)
    }

    /// The engine of a workload, for `/status`.
    pub(crate) fn host(&self, workload: &str) -> WorkloadHost {
        match self.hosts.get(workload) {
            Some(Some(host)) => WorkloadHost {
                name: host.name.clone(),
                error: match host.state() {
                    HostState::Watching => None,
                    HostState::Connecting { error: Some(error), .. } => {
                        Some(format!("docker host {} ({}): {error}", host.name, host.url))
                    }
                    HostState::Connecting { error: None, .. } => {
                        Some(format!("docker host {} ({}): connecting", host.name, host.url))
                    }
                },
            },
            _ => WorkloadHost { name: LOCAL_ENGINE.to_owned(), error: None },
        }
    }

    /// The remote hosts, in configuration order.
    pub(crate) fn remote_hosts(&self) -> impl Iterator<Item = &RemoteHost> {
        self.groups.iter().filter_map(|g| g.host.as_deref())
    }

    /// Reads every remote host's TLS material again, as `config` names it (the hosts themselves
    /// cannot change on a reload): the hosts whose material changed, with it. Changes nothing;
    /// a file that does not load is the error.
    pub(crate) fn read_tls(
        &self,
        config: &GatewayConfig,
    ) -> Result<Vec<(Arc<RemoteHost>, AgentTls)>, String> {
        let mut changed = Vec::new();
        for host in self.groups.iter().filter_map(|g| g.host.as_ref()) {
            let Some(entry) = config.docker_hosts.iter().find(|h| h.name == host.name) else { continue };
            let tls = entry.tls.load().map_err(|e| format!("docker host {}: {e}", host.name))?;
            if *host.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner) != tls {
                changed.push((host.clone(), tls));
            }
        }
        Ok(changed)
    }

    /// Moves the hosts [`read_tls`](Self::read_tls) found changed to their new material; their
    /// names.
    pub(crate) fn apply_tls(&self, changed: Vec<(Arc<RemoteHost>, AgentTls)>) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for (host, tls) in changed {
            host.client.set_tls(&tls).map_err(|e| format!("docker host {}: {e}", host.name))?;
            tracing::info!(host = %host.name, url = %host.url, "docker host: new TLS material");
            *host.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
            host.retry.notify_one();
            names.push(host.name.clone());
        }
        Ok(names)
    }

    /// Stops watching (the workloads stay as they are): remote starters first, then every group.
    pub(crate) async fn stop(&self) {
        for group in &self.groups {
            if let Some(starter) = &group.starter {
                starter.abort();
            }
        }
        for group in &self.groups {
            let _ = group.group.stop().await;
        }
    }
}

/// The host's client (its pool of mutual-TLS connections) and its shared state.
fn connect(host: &DockerHostConfig) -> Result<Arc<RemoteHost>, WorkloadsError> {
    let fail = |message: String| WorkloadsError::Host { host: host.name.clone(), message };
    let address = host.address().map_err(fail)?;
    let tls = host.tls.load().map_err(|e| fail(e.to_string()))?;
    let client = AgentClient::new(&address, &tls).map_err(|e| fail(e.to_string()))?;
    Ok(Arc::new(RemoteHost {
        name: host.name.clone(),
        url: host.url.clone(),
        state: watch::Sender::new(HostState::Connecting { attempts: 0, error: None }),
        client,
        tls: std::sync::Mutex::new(tls),
        retry: Notify::new(),
    }))
}

/// Asks the agent for its health, then starts the watchers; retried with back-off until both
/// work, and at once when the host's material changes.
async fn keep_starting(host: Arc<RemoteHost>, group: IdleGroup) {
    use backon::BackoffBuilder;
    let schedule = backon::ExponentialBuilder::new()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times();
    let mut delays = schedule.build();
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let delay = delays.next().unwrap_or(RETRY_MAX);
        match attempt(&host.client, &group).await {
            Ok(()) => {
                tracing::info!(host = %host.name, url = %host.url, attempts, "docker host reached; watching its workloads");
                host.state.send_replace(HostState::Watching);
                return;
            }
            Err(error) => {
                let before =
                    host.state.send_replace(HostState::Connecting { attempts, error: Some(error.clone()) });
                // Log a new reason, not the same one every retry.
                if !matches!(&before, HostState::Connecting { error: Some(e), .. } if *e == error) {
                    tracing::error!(host = %host.name, url = %host.url, %error, retry_in = ?delay, "docker host: workloads not watched");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            // New material: try now, and from the shortest delay again.
            () = host.retry.notified() => delays = schedule.build(),
        }
    }
}

async fn attempt(client: &AgentClient, group: &IdleGroup) -> Result<(), String> {
    let health = client.health().await.map_err(|e| e.to_string())?;
    if health.status == AgentHealthStatus::Unhealthy {
        return Err(match health.engine.error {
            Some(error) => format!("the agent reports its engine unreachable: {error}"),
            None if !health.engine.reachable => "the agent reports its engine unreachable".to_owned(),
            None => "the agent reports itself unhealthy (its certificate expired?)".to_owned(),
        });
    }
    group.start().await.map_err(|e| e.to_string())
}
