//! A pool of servers keyed by canonical bind address, with group lifecycle, selection and
//! in-place configuration apply.
//!
//! The map sits behind a short `parking_lot` lock (no poisoning: a panic elsewhere
//! never makes the pool unusable) that is never held across an `.await`: operations copy
//! the server handles they need (cheap `Arc` clones), release the lock, then do their I/O.
//! Group start/stop/restart run every server concurrently and aggregate the failures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use parking_lot::{Mutex, RwLock};
use pool_api::{Lifecycle, LifecycleError, LifecycleState, StopReport};
use tokio::sync::watch;

use crate::addr::ToBind;
use crate::filter::{Field, Pattern};
use crate::{
    Error, Handler, HttpServerConfig, ReloadOutcome, Server, ServerFailure, ServerPoolConfig, ServerSnapshot,
    TlsConfig,
};

/// What a group start does when some servers fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartPolicy {
    /// Stop again the servers this call started, then report the failures.
    #[default]
    AllOrNothing,
    /// Keep the servers that started; report the failures.
    BestEffort,
}

/// What [`Pool::apply`] did, per bind address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// New servers (started when the pool runs and they are enabled).
    pub added: Vec<SocketAddr>,
    /// Servers removed and drained.
    pub removed: Vec<SocketAddr>,
    /// Servers whose settings were swapped in place.
    pub swapped: Vec<SocketAddr>,
    /// Servers restarted because their socket options changed.
    pub rebound: Vec<SocketAddr>,
    /// Servers left untouched.
    pub unchanged: Vec<SocketAddr>,
}

/// A group of servers selected from a pool. It shares the servers (handles), so its lifecycle
/// calls act on the pool's servers; it holds no lock on the pool.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    servers: Vec<Server>,
}

impl Selection {
    /// The selected servers, ordered by bind address.
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// How many servers were selected.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// True when nothing was selected.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Narrows the selection further.
    pub fn filter(&self, field: Field, pattern: &Pattern) -> Selection {
        Selection { servers: self.servers.iter().filter(|s| s.matches(field, pattern)).cloned().collect() }
    }

    /// Starts the selected servers concurrently (disabled and running ones are skipped).
    pub async fn start(&self, policy: StartPolicy) -> Result<(), Error> {
        start_all(&self.servers, policy).await
    }

    /// Stops the selected servers concurrently; the report sums their drains.
    pub async fn stop(&self) -> Result<StopReport, Error> {
        stop_all(&self.servers).await
    }
}

fn failure(server: &Server, error: LifecycleError) -> ServerFailure {
    ServerFailure { bind: server.bind(), name: server.name(), error }
}

async fn start_all(servers: &[Server], policy: StartPolicy) -> Result<(), Error> {
    let todo: Vec<&Server> = servers.iter().filter(|s| !s.is_disabled() && !s.is_running()).collect();
    let results = join_all(todo.iter().map(|s| s.start())).await;
    let mut started = Vec::new();
    let mut failures = Vec::new();
    for (server, result) in todo.into_iter().zip(results) {
        match result {
            Ok(()) => started.push(server),
            Err(e) => failures.push(failure(server, e)),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    if policy == StartPolicy::AllOrNothing {
        // Roll back: nothing this call bound stays bound.
        join_all(started.iter().map(|s| s.stop_within(Duration::ZERO))).await;
    }
    Err(Error::Start { failures })
}

async fn stop_all(servers: &[Server]) -> Result<StopReport, Error> {
    let begin = tokio::time::Instant::now();
    let results = join_all(servers.iter().map(|s| s.stop())).await;
    let mut total = StopReport::default();
    let mut failures = Vec::new();
    for (server, result) in servers.iter().zip(results) {
        match result {
            Ok(r) => {
                total.drained += r.drained;
                total.forced += r.forced;
            }
            Err(e) => failures.push(failure(server, e)),
        }
    }
    total.elapsed = begin.elapsed();
    if failures.is_empty() { Ok(total) } else { Err(Error::Stop { failures }) }
}

/// Many servers, one lifecycle. See the crate documentation for an example.
///
/// `Pool` is a handle: [`Clone`] gives another handle to the same pool (one `Arc` increment), as
/// with [`Server`]. Everything done through any clone — storing, removing, selecting, applying,
/// starting, stopping, setting defaults or the start policy — acts on the one set of servers,
/// and every clone sees the same lifecycle state. To get a separate pool with its own, stopped
/// servers built from the same configurations, use [`Pool::duplicate`].
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    servers: RwLock<BTreeMap<SocketAddr, Server>>,
    default_handler: RwLock<Option<Handler>>,
    default_tls: RwLock<Option<TlsConfig>>,
    /// `true` for [`StartPolicy::BestEffort`].
    best_effort: AtomicBool,
    state: watch::Sender<LifecycleState>,
    running_since: Mutex<Option<tokio::time::Instant>>,
    /// Held for the whole of an [`Pool::apply`], across its awaits (an async lock, made for
    /// that): applies run one after the other, each planning against the previous one's result.
    applying: tokio::sync::Mutex<()>,
}

impl PoolInner {
    fn new(
        servers: BTreeMap<SocketAddr, Server>,
        default_handler: Option<Handler>,
        default_tls: Option<TlsConfig>,
        policy: StartPolicy,
    ) -> PoolInner {
        PoolInner {
            servers: RwLock::new(servers),
            default_handler: RwLock::new(default_handler),
            default_tls: RwLock::new(default_tls),
            best_effort: AtomicBool::new(policy == StartPolicy::BestEffort),
            state: watch::Sender::new(LifecycleState::Stopped),
            running_since: Mutex::new(None),
            applying: tokio::sync::Mutex::new(()),
        }
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    /// An empty pool with the all-or-nothing start policy.
    pub fn new() -> Pool {
        Pool { inner: Arc::new(PoolInner::new(BTreeMap::new(), None, None, StartPolicy::AllOrNothing)) }
    }

    /// Builds a pool from configurations; every problem of every server is reported at once.
    pub fn from_config(config: &ServerPoolConfig) -> Result<Pool, Error> {
        let pool = Pool::new();
        pool.insert_configs(config)?;
        Ok(pool)
    }

    /// Sets the policy used by [`Lifecycle::start`] and [`Lifecycle::restart`]. The policy
    /// belongs to the pool, so every clone of this handle uses it too.
    pub fn with_start_policy(self, policy: StartPolicy) -> Pool {
        self.set_start_policy(policy);
        self
    }

    /// Sets the policy used by [`Lifecycle::start`] and [`Lifecycle::restart`] from here on, for
    /// every clone of this handle.
    pub fn set_start_policy(&self, policy: StartPolicy) {
        self.inner.best_effort.store(policy == StartPolicy::BestEffort, Ordering::Relaxed);
    }

    /// The policy used by [`Lifecycle::start`] and [`Lifecycle::restart`].
    pub fn start_policy(&self) -> StartPolicy {
        if self.inner.best_effort.load(Ordering::Relaxed) {
            StartPolicy::BestEffort
        } else {
            StartPolicy::AllOrNothing
        }
    }

    /// A separate pool: every server is a new, stopped server built from the same configuration
    /// (its own counters, not listening), with the same default handler, default TLS and start
    /// policy. Changes to either pool are not seen by the other. Starting both would make their
    /// servers compete for the same addresses; the copy is meant to be changed (e.g. with
    /// [`Pool::apply`]) or started once the original has stopped.
    pub fn duplicate(&self) -> Pool {
        let servers = self.inner.servers.read().iter().map(|(b, s)| (*b, s.duplicate())).collect();
        Pool {
            inner: Arc::new(PoolInner::new(
                servers,
                self.inner.default_handler.read().clone(),
                self.inner.default_tls.read().clone(),
                self.start_policy(),
            )),
        }
    }

    /// The handler given to configurations stored later without one.
    pub fn set_default_handler(&self, handler: Handler) {
        *self.inner.default_handler.write() = Some(handler);
    }

    /// The TLS settings given to configurations stored later without TLS.
    pub fn set_default_tls(&self, tls: TlsConfig) {
        *self.inner.default_tls.write() = Some(tls);
    }

    fn with_defaults(&self, mut config: HttpServerConfig) -> HttpServerConfig {
        if config.handler.is_none() {
            config.handler = self.inner.default_handler.read().clone();
        }
        if config.tls.is_none() {
            config.tls = self.inner.default_tls.read().clone();
        }
        config
    }

    fn complete(&self, config: &ServerPoolConfig) -> Result<ServerPoolConfig, Error> {
        let completed = ServerPoolConfig {
            servers: config.servers.iter().cloned().map(|c| self.with_defaults(c)).collect(),
        };
        let (_, mut problems) = completed.problems();
        for c in &completed.servers {
            if c.handler.is_none() {
                problems.push(crate::Problem {
                    server: c.name.clone(),
                    field: "handler",
                    message: "no handler and the pool has no default handler".into(),
                });
            }
        }
        if problems.is_empty() { Ok(completed) } else { Err(Error::Invalid { problems }) }
    }

    fn insert_configs(&self, config: &ServerPoolConfig) -> Result<(), Error> {
        let completed = self.complete(config)?;
        let servers = completed.servers.into_iter().map(Server::new).collect::<Result<Vec<_>, _>>()?;
        let mut map = self.inner.servers.write();
        if let Some(s) = servers.iter().find(|s| map.contains_key(&s.bind())) {
            return Err(Error::DuplicateBind {
                bind: s.bind(),
                existing: map[&s.bind()].name(),
                new: s.name(),
            });
        }
        for s in servers {
            map.insert(s.bind(), s);
        }
        Ok(())
    }

    /// Adds a server. Another server on the same canonical address is an error.
    pub fn store(&self, server: Server) -> Result<(), Error> {
        let mut map = self.inner.servers.write();
        if let Some(existing) = map.get(&server.bind()) {
            return Err(Error::DuplicateBind {
                bind: server.bind(),
                existing: existing.name(),
                new: server.name(),
            });
        }
        map.insert(server.bind(), server);
        Ok(())
    }

    /// Validates `config` (with the pool's defaults), builds the server and adds it.
    pub fn store_config(&self, config: HttpServerConfig) -> Result<Server, Error> {
        let config = self.with_defaults(config);
        if config.handler.is_none() {
            return Err(Error::MissingHandler { server: config.name });
        }
        let server = Server::new(config)?;
        self.store(server.clone())?;
        Ok(server)
    }

    /// The server on `bind`, if any.
    pub fn load(&self, bind: impl ToBind) -> Option<Server> {
        self.inner.servers.read().get(&bind.to_bind()?).cloned()
    }

    /// True when a server listens (or would listen) on `bind`.
    pub fn has(&self, bind: impl ToBind) -> bool {
        bind.to_bind().is_some_and(|b| self.inner.servers.read().contains_key(&b))
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.inner.servers.read().len()
    }

    /// True when the pool holds no server.
    pub fn is_empty(&self) -> bool {
        self.inner.servers.read().is_empty()
    }

    /// Removes the server on `bind` and stops it gracefully. `None` if there was none.
    pub async fn delete(&self, bind: impl ToBind) -> Result<Option<StopReport>, Error> {
        let Some(server) = self.load_and_delete(bind) else { return Ok(None) };
        server.stop().await.map(Some).map_err(|e| Error::Stop { failures: vec![failure(&server, e)] })
    }

    /// Removes the server on `bind` and hands it over as it is (a running server keeps running).
    pub fn load_and_delete(&self, bind: impl ToBind) -> Option<Server> {
        self.inner.servers.write().remove(&bind.to_bind()?)
    }

    /// Removes every server and stops them concurrently.
    pub async fn clean(&self) -> Result<StopReport, Error> {
        let servers: Vec<Server> = std::mem::take(&mut *self.inner.servers.write()).into_values().collect();
        stop_all(&servers).await
    }

    fn handles(&self) -> Vec<Server> {
        self.inner.servers.read().values().cloned().collect()
    }

    /// Calls `f` on each server in bind-address order until it breaks. The pool is not locked
    /// while `f` runs, so `f` may call the pool.
    pub fn walk(&self, mut f: impl FnMut(&Server) -> ControlFlow<()>) {
        for server in self.handles() {
            if f(&server).is_break() {
                return;
            }
        }
    }

    /// Like [`Pool::walk`], limited to the servers on `binds` (unknown ones are skipped).
    pub fn walk_limit<B: ToBind>(&self, binds: &[B], mut f: impl FnMut(&Server) -> ControlFlow<()>) {
        let wanted: Vec<SocketAddr> = binds.iter().filter_map(ToBind::to_bind).collect();
        for server in self.handles().into_iter().filter(|s| wanted.contains(&s.bind())) {
            if f(&server).is_break() {
                return;
            }
        }
    }

    /// The servers whose `field` matches `pattern`.
    pub fn filter(&self, field: Field, pattern: &Pattern) -> Selection {
        let map = self.inner.servers.read();
        Selection { servers: map.values().filter(|s| s.matches(field, pattern)).cloned().collect() }
    }

    /// Every server, as a selection.
    pub fn select_all(&self) -> Selection {
        Selection { servers: self.handles() }
    }

    /// The `target` field of the servers whose `field` matches `pattern`, in bind-address order.
    pub fn list(&self, field: Field, pattern: &Pattern, target: Field) -> Vec<String> {
        self.filter(field, pattern).servers.iter().map(|s| target.of(s)).collect()
    }

    /// Moves every server of `other` into this pool. If any address is present in both, nothing
    /// moves and the conflicts are listed. Merging a pool with itself or with one of its clones
    /// changes nothing. The servers keep running or stay stopped as they were.
    pub fn merge(&self, other: &Pool) -> Result<(), Error> {
        if Arc::ptr_eq(&self.inner, &other.inner) {
            return Ok(());
        }
        // Both maps are locked in one global order (by address of the shared state), so two
        // merges in opposite directions cannot each hold one lock and wait for the other.
        let (mut mine, mut theirs) = if Arc::as_ptr(&self.inner) < Arc::as_ptr(&other.inner) {
            let mine = self.inner.servers.write();
            (mine, other.inner.servers.write())
        } else {
            let theirs = other.inner.servers.write();
            (self.inner.servers.write(), theirs)
        };
        let binds: Vec<SocketAddr> = theirs.keys().filter(|b| mine.contains_key(b)).copied().collect();
        if !binds.is_empty() {
            return Err(Error::MergeConflict { binds });
        }
        mine.append(&mut theirs);
        Ok(())
    }

    /// Health and counters of every server, from lifecycle state: no I/O, no task.
    pub fn monitor(&self) -> Vec<ServerSnapshot> {
        self.inner.servers.read().values().map(Server::snapshot).collect()
    }

    /// Starts every enabled server concurrently with `policy`.
    pub async fn start_with(&self, policy: StartPolicy) -> Result<(), Error> {
        self.inner.state.send_replace(LifecycleState::Starting);
        let result = start_all(&self.handles(), policy).await;
        let any = self.handles().iter().any(Server::is_running);
        if any || result.is_ok() {
            *self.inner.running_since.lock() = Some(tokio::time::Instant::now());
            self.inner.state.send_replace(LifecycleState::Running);
        } else if let Err(e) = &result {
            self.inner.state.send_replace(LifecycleState::Failed(e.to_string()));
        }
        result
    }

    /// Stops every server concurrently; the report sums the drains.
    pub async fn stop_all(&self) -> Result<StopReport, Error> {
        self.inner.state.send_replace(LifecycleState::Stopping);
        let result = stop_all(&self.handles()).await;
        *self.inner.running_since.lock() = None;
        self.inner.state.send_replace(LifecycleState::Stopped);
        result
    }

    /// Applies a new set of configurations while running. Everything is validated first (with
    /// the pool's defaults, TLS files read and checked); on any problem nothing changes. Then:
    /// servers whose address disappeared are removed and drained; servers whose effective
    /// settings are identical are untouched; changed handler, timeouts, limits or TLS are swapped
    /// in place (new connections use them, open ones finish with the old); changed socket
    /// options rebind; new servers are added and, if the pool runs, started.
    ///
    /// Concurrent calls are serialised in the order they were made (a fair async lock): each
    /// waits until the one before it has finished, so the last call's configuration is the one
    /// left in place.
    pub async fn apply(&self, config: &ServerPoolConfig) -> Result<ApplyReport, Error> {
        let _one_at_a_time = self.inner.applying.lock().await;
        let completed = self.complete(config)?;
        let mut report = ApplyReport::default();
        let mut wanted: BTreeMap<SocketAddr, HttpServerConfig> = BTreeMap::new();
        for c in completed.servers {
            let bind = crate::addr::canonical(&c.listen)?;
            wanted.insert(bind, c);
        }
        let running = *self.inner.state.borrow() == LifecycleState::Running;
        let (removed, kept, added) = {
            let mut map = self.inner.servers.write();
            let gone: Vec<SocketAddr> = map.keys().filter(|b| !wanted.contains_key(b)).copied().collect();
            let removed: Vec<Server> = gone.iter().filter_map(|b| map.remove(b)).collect();
            let kept: Vec<(Server, HttpServerConfig)> =
                map.values().map(|s| (s.clone(), wanted[&s.bind()].clone())).collect();
            let added: Vec<HttpServerConfig> =
                wanted.iter().filter(|(b, _)| !map.contains_key(b)).map(|(_, c)| c.clone()).collect();
            (removed, kept, added)
        };
        report.removed = removed.iter().map(Server::bind).collect();
        let new_servers = added.into_iter().map(Server::new).collect::<Result<Vec<_>, _>>()?;
        let (stopped, reloaded) =
            tokio::join!(stop_all(&removed), join_all(kept.iter().map(|(s, c)| s.reload(c.clone()))));
        let mut to_start = Vec::new();
        let mut first_error = stopped.err();
        for ((server, _), outcome) in kept.iter().zip(reloaded) {
            match outcome {
                Ok(ReloadOutcome::Unchanged) => report.unchanged.push(server.bind()),
                Ok(ReloadOutcome::Swapped | ReloadOutcome::Stopped) => report.swapped.push(server.bind()),
                Ok(ReloadOutcome::Rebound) => report.rebound.push(server.bind()),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            if running && !server.is_disabled() && !server.is_running() {
                to_start.push(server.clone());
            }
        }
        {
            let mut map = self.inner.servers.write();
            for s in &new_servers {
                report.added.push(s.bind());
                map.insert(s.bind(), s.clone());
            }
        }
        if running {
            to_start.extend(new_servers);
            if let Err(e) = start_all(&to_start, StartPolicy::BestEffort).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

fn as_lifecycle(e: Error) -> LifecycleError {
    match e {
        Error::Stop { .. } => LifecycleError::Stop { name: "pool".into(), message: e.to_string() },
        _ => LifecycleError::Start { name: "pool".into(), kind: None, message: e.to_string() },
    }
}

impl Lifecycle for Pool {
    /// Starts every enabled server concurrently with the pool's [`StartPolicy`]; the message
    /// names every failure. Running servers are left alone.
    async fn start(&self) -> Result<(), LifecycleError> {
        self.start_with(self.start_policy()).await.map_err(as_lifecycle)
    }

    /// Stops every server concurrently.
    async fn stop(&self) -> Result<StopReport, LifecycleError> {
        self.stop_all().await.map_err(as_lifecycle)
    }

    /// True when at least one server runs.
    fn is_running(&self) -> bool {
        self.inner.servers.read().values().any(Server::is_running)
    }

    /// Time since the last successful group start, while a server runs.
    fn uptime(&self) -> Option<Duration> {
        if !self.is_running() {
            return None;
        }
        self.inner.running_since.lock().map(|t| t.elapsed())
    }

    /// The pool's own state: changed by group start and stop.
    fn state(&self) -> watch::Receiver<LifecycleState> {
        self.inner.state.subscribe()
    }
}
