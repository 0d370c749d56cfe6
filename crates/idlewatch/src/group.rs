//! [`IdleGroup`]: watchers that depend on one another.
//!
//! The group checks the whole graph once (unknown names, duplicates, cycles spelled out
//! `a → b → c → a`) and builds the watchers dependencies first. A watcher whose
//! workload is awake — starting, ready, stopping, or failed while running — holds one unit of
//! activity on each of its dependencies, so:
//!
//! - a wake starts the dependencies first, in parallel (each single-flight, so a dependency
//!   shared by two workloads that wake together starts once), waiting for each to be ready
//!   ([`DependencyCondition::Healthy`](crate::DependencyCondition::Healthy)) or running
//!   ([`DependencyCondition::Started`](crate::DependencyCondition::Started)), all within the
//!   dependent's wake time-out;
//! - a dependency is **reference-counted**: its idle countdown starts only when its last
//!   dependent is asleep, and it is then stopped after its own idle time-out — stops go in
//!   reverse order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pool_api::{ContainerRuntime, Lifecycle, LifecycleError, LifecycleState, ServiceRuntime, StopReport};
use tokio::sync::watch;

use crate::config::IdleConfig;
use crate::engine::engine_for;
use crate::error::IdleConfigError;
use crate::graph::dependency_order;
use crate::watcher::IdleWatcher;

/// Watchers linked by their `depends_on`. Cheap to clone.
///
/// Built dependencies first, after the whole graph was checked (unknown names, duplicates,
/// cycles spelled out). An awake watcher holds one unit of activity on each dependency, so a
/// wake starts the dependencies first (in parallel, single-flight, waiting for "healthy" or
/// "started" within the dependent's wake time-out; an optional one's failure is logged, not
/// fatal), and a shared dependency counts down to
/// its own idle stop only once its last dependent is asleep.
#[derive(Clone, Debug)]
pub struct IdleGroup {
    /// Dependencies first.
    watchers: Arc<[IdleWatcher]>,
    lifecycle: Arc<watch::Sender<LifecycleState>>,
}

impl IdleGroup {
    /// Checks every configuration and the dependency graph without building anything, and
    /// reports every problem at once (what [`new`](Self::new) checks first).
    pub fn check(configs: &[IdleConfig]) -> Result<(), IdleConfigError> {
        let mut problems = Vec::new();
        for config in configs {
            if let Err(error) = config.validate() {
                let name = config.workload.name();
                problems.extend(error.problems.into_iter().map(|p| format!("{name}: {p}")));
            }
        }
        if let Err(graph) = dependency_order(configs) {
            problems.extend(graph);
        }
        if problems.is_empty() { Ok(()) } else { Err(IdleConfigError { problems }) }
    }

    /// Checks every configuration and the graph (reporting every problem at once), then builds
    /// the watchers, not yet running.
    pub fn new<R>(configs: Vec<IdleConfig>, runtime: Arc<R>) -> Result<Self, IdleConfigError>
    where
        R: ContainerRuntime + ServiceRuntime,
    {
        let mut problems = Vec::new();
        for config in &configs {
            if let Err(error) = config.validate() {
                let name = config.workload.name();
                problems.extend(error.problems.into_iter().map(|p| format!("{name}: {p}")));
            }
        }
        match dependency_order(&configs) {
            Ok(_) if !problems.is_empty() => Err(IdleConfigError { problems }),
            Ok(order) => {
                let mut built: HashMap<String, IdleWatcher> = HashMap::new();
                let mut watchers = Vec::with_capacity(order.len());
                for i in order {
                    let config = configs[i].clone();
                    let dependencies = config
                        .depends_on
                        .iter()
                        .map(|d| (built[d.workload.as_str()].clone(), d.clone()))
                        .collect();
                    let engine = engine_for(&config, Arc::clone(&runtime));
                    let name = config.workload.name().to_owned();
                    let watcher = IdleWatcher::build(config, engine, dependencies);
                    built.insert(name, watcher.clone());
                    watchers.push(watcher);
                }
                let (lifecycle, _) = watch::channel(LifecycleState::Stopped);
                Ok(Self { watchers: watchers.into(), lifecycle: Arc::new(lifecycle) })
            }
            Err(graph) => {
                problems.extend(graph);
                Err(IdleConfigError { problems })
            }
        }
    }

    /// The watcher of a workload.
    pub fn get(&self, workload: &str) -> Option<&IdleWatcher> {
        self.watchers.iter().find(|w| w.config().workload.name() == workload)
    }

    /// Every watcher, dependencies first.
    pub fn watchers(&self) -> &[IdleWatcher] {
        &self.watchers
    }
}

impl Lifecycle for IdleGroup {
    /// Starts every watcher, dependencies first; on a failure stops those already started and
    /// returns it.
    async fn start(&self) -> Result<(), LifecycleError> {
        self.lifecycle.send_replace(LifecycleState::Starting);
        for (i, watcher) in self.watchers.iter().enumerate() {
            if let Err(error) = watcher.start().await {
                for started in self.watchers[..i].iter().rev() {
                    let _ = started.stop().await;
                }
                self.lifecycle.send_replace(LifecycleState::Failed(error.to_string()));
                return Err(error);
            }
        }
        self.lifecycle.send_replace(LifecycleState::Running);
        Ok(())
    }

    /// Stops every watcher, dependents first; the reports are summed.
    async fn stop(&self) -> Result<StopReport, LifecycleError> {
        self.lifecycle.send_replace(LifecycleState::Stopping);
        let mut total = StopReport::default();
        for watcher in self.watchers.iter().rev() {
            let report = watcher.stop().await?;
            total.drained += report.drained;
            total.forced += report.forced;
            total.elapsed += report.elapsed;
        }
        self.lifecycle.send_replace(LifecycleState::Stopped);
        Ok(total)
    }

    fn is_running(&self) -> bool {
        !self.watchers.is_empty() && self.watchers.iter().all(IdleWatcher::is_running)
    }

    fn uptime(&self) -> Option<Duration> {
        self.watchers.iter().filter_map(IdleWatcher::uptime).min()
    }

    fn state(&self) -> watch::Receiver<LifecycleState> {
        self.lifecycle.subscribe()
    }
}
