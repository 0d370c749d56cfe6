//! [`IdleWatcher`]: one watcher per workload — the handle traffic uses, and the driver task that
//! runs the [state machine](crate::machine) against the engine.
//!
//! The driver owns the machine and is the only writer of the state. It waits on, in one
//! `select!`: commands (wake requests), results of the calls it started (each on a task of its
//! own, so a caller that goes away cancels nothing), engine observations, the "activity count
//! is zero" notification, and the machine's next deadline. After every input it publishes the
//! state — the `ready` atomic first (the hot path reads only that), then the `watch` channel.
//!
//! Engine observations come from three places: the event stream (reopened with jittered
//! exponential back-off, 100 ms … 30 s, the status re-read after every (re)open), the status
//! read after each start and stop, and, while starting, a status poll that begins at
//! `readiness.poll_min` and doubles up to `readiness.poll_max` — a safety net behind the pushed
//! health events. Every status read carries the *epoch* it began in (bumped when a start call
//! returns); a read that began before the latest start returned is stale and dropped, so it
//! cannot report a freshly started workload as down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use parking_lot::Mutex;
use pool_api::{
    ContainerRuntime, Lifecycle, LifecycleError, LifecycleState, RuntimeError, ServiceRuntime, StopReport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::activity::{ActivityGuard, Shared};
use crate::config::{Dependency, DependencyCondition, IdleConfig, ReadinessCheck};
use crate::engine::{Engine, News, benign, engine_for};
use crate::error::{IdleConfigError, WakeError};
use crate::machine::{EngineView, IdleAction, IdleInput, IdleMachine, IdleState, MachineConfig};
use crate::metrics::{WaiterGauge, WatchMetrics};
use crate::probe;

/// An event stream that stayed open this long resets the reconnect back-off.
const STABLE_STREAM: Duration = Duration::from_secs(5);

/// The state and the wake attempt it belongs to, as published on the watch channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleSnapshot {
    /// The state.
    pub state: IdleState,
    /// The wake attempt the state belongs to (grows by one per attempt).
    pub attempt: u64,
    /// The engine's last word: the workload runs (healthy or not).
    pub running: bool,
}

/// Watches one workload; see the [crate docs](crate). Cheap to clone: clones share the watcher.
#[derive(Clone)]
pub struct IdleWatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IdleWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleWatcher")
            .field("workload", &self.inner.config.workload)
            .field("state", &self.inner.snapshot.borrow().state)
            .field("active", &self.inner.shared.active())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: IdleConfig,
    engine: Arc<dyn Engine>,
    shared: Arc<Shared>,
    snapshot: watch::Sender<IdleSnapshot>,
    lifecycle: watch::Sender<LifecycleState>,
    run: Mutex<Option<Run>>,
    metrics: WatchMetrics,
    /// Bumped when a start call returns; status reads that began earlier are stale.
    epoch: AtomicU64,
    /// The watchers of the workloads this one depends on (set by an `IdleGroup`).
    dependencies: Vec<(IdleWatcher, Dependency)>,
}

struct Run {
    commands: mpsc::UnboundedSender<Command>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
    started: Instant,
}

enum Command {
    /// Wake; the reply is the attempt whose outcome answers this caller (0: already ready).
    Wake(oneshot::Sender<u64>),
}

/// Inputs from the driver's own tasks.
enum Internal {
    Input(IdleInput),
    /// A status read that began in `epoch`.
    Observed {
        epoch: u64,
        view: EngineView,
    },
}

impl IdleWatcher {
    /// A watcher for `config.workload` on `runtime`, not yet running: call
    /// [`Lifecycle::start`]. Fails with every problem of the configuration.
    ///
    /// A configuration with `depends_on` is refused: dependencies need an
    /// [`IdleGroup`](crate::IdleGroup), which checks the graph and links the watchers.
    pub fn new<R>(config: IdleConfig, runtime: Arc<R>) -> Result<Self, IdleConfigError>
    where
        R: ContainerRuntime + ServiceRuntime,
    {
        config.validate()?;
        if !config.depends_on.is_empty() {
            let problem = format!("{}: depends_on needs an IdleGroup", config.workload.name());
            return Err(IdleConfigError { problems: vec![problem] });
        }
        let engine = engine_for(&config, runtime);
        Ok(Self::build(config, engine, Vec::new()))
    }

    /// A watcher with these (already built) dependencies; the configuration is valid.
    pub(crate) fn build(
        config: IdleConfig,
        engine: Arc<dyn Engine>,
        dependencies: Vec<(IdleWatcher, Dependency)>,
    ) -> Self {
        let metrics = WatchMetrics::new(config.workload.name(), &config.metric_labels);
        metrics.set_state(&IdleState::Napping);
        let (snapshot, _) =
            watch::channel(IdleSnapshot { state: IdleState::Napping, attempt: 0, running: false });
        let (lifecycle, _) = watch::channel(LifecycleState::Stopped);
        let inner = Inner {
            config,
            engine,
            shared: Arc::new(Shared::new()),
            snapshot,
            lifecycle,
            run: Mutex::new(None),
            metrics,
            epoch: AtomicU64::new(0),
            dependencies,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The configuration.
    pub fn config(&self) -> &IdleConfig {
        &self.inner.config
    }

    /// True when the workload is ready: one atomic load, no allocation, no lock.
    #[inline]
    pub fn is_ready(&self) -> bool {
        self.inner.shared.is_ready()
    }

    /// Counts one unit of activity until the guard is dropped.
    ///
    /// Take the guard *before* checking [`is_ready`](Self::is_ready): the check then cannot
    /// race with an idle stop (see [`activity`](crate::activity)).
    #[inline]
    pub fn activity(&self) -> ActivityGuard {
        self.inner.shared.enter()
    }

    /// Open activity guards.
    pub fn active(&self) -> usize {
        self.inner.shared.active()
    }

    /// Subscribes to the state.
    pub fn subscribe(&self) -> watch::Receiver<IdleSnapshot> {
        self.inner.snapshot.subscribe()
    }

    /// Wakes the workload and waits until it is ready, or fails; never longer than the wake
    /// time-out from the moment of the call. Concurrent calls share one wake; a caller that
    /// gives up (drops this future) does not stop it.
    pub async fn wake(&self) -> Result<(), WakeError> {
        self.wait(false).await
    }

    /// Wakes the workload and waits until it runs (its start went through; healthy or not),
    /// or fails; bounded like [`wake`](Self::wake).
    pub async fn wake_started(&self) -> Result<(), WakeError> {
        self.wait(true).await
    }

    async fn wait(&self, started_is_enough: bool) -> Result<(), WakeError> {
        if self.is_ready() {
            return Ok(());
        }
        let _waiter = WaiterGauge::new(&self.inner.metrics.waiters);
        let config = &self.inner.config;
        let not_watching = || WakeError::NotWatching { workload: config.workload.name().to_owned() };
        let commands =
            self.inner.run.lock().as_ref().map(|run| run.commands.clone()).ok_or_else(not_watching)?;
        let mut states = self.inner.snapshot.subscribe();
        let (reply, attempt) = oneshot::channel();
        commands.send(Command::Wake(reply)).map_err(|_| not_watching())?;
        let wait = async {
            let attempt = attempt.await.map_err(|_| not_watching())?;
            loop {
                {
                    let snapshot = states.borrow_and_update();
                    match &snapshot.state {
                        IdleState::Ready => return Ok(()),
                        IdleState::Starting if started_is_enough && snapshot.running => return Ok(()),
                        IdleState::Error(error) if snapshot.attempt >= attempt => return Err(error.clone()),
                        _ => {}
                    }
                }
                states.changed().await.map_err(|_| not_watching())?;
            }
        };
        tokio::time::timeout(config.wake_timeout, wait).await.unwrap_or_else(|_| {
            Err(WakeError::Timeout {
                workload: config.workload.name().to_owned(),
                after: config.wake_timeout,
            })
        })
    }
}

impl Lifecycle for IdleWatcher {
    /// Reads the workload's status (a running workload is adopted and its idle countdown
    /// begins), then starts the driver. Fails if the engine cannot say what the workload is.
    async fn start(&self) -> Result<(), LifecycleError> {
        let name = self.inner.config.workload.name().to_owned();
        if self.inner.run.lock().is_some() {
            return Err(LifecycleError::AlreadyRunning { name });
        }
        self.inner.lifecycle.send_replace(LifecycleState::Starting);
        let first = match self.inner.engine.observe().await {
            Ok(view) => view,
            Err(error) => {
                let message = error.to_string();
                self.inner.lifecycle.send_replace(LifecycleState::Failed(message.clone()));
                return Err(LifecycleError::Start { name, kind: None, message });
            }
        };
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let mut run = self.inner.run.lock();
        if run.is_some() {
            return Err(LifecycleError::AlreadyRunning { name });
        }
        let driver = Driver::new(Arc::clone(&self.inner), first);
        let task = tokio::spawn(driver.run(commands_rx, shutdown_rx));
        *run = Some(Run { commands, shutdown, task, started: Instant::now() });
        drop(run);
        self.inner.lifecycle.send_replace(LifecycleState::Running);
        Ok(())
    }

    /// Stops watching (the workload is left as it is). Waiters still waiting get
    /// [`WakeError::NotWatching`]; the report counts them as forced.
    async fn stop(&self) -> Result<StopReport, LifecycleError> {
        let Some(run) = self.inner.run.lock().take() else { return Ok(StopReport::default()) };
        self.inner.lifecycle.send_replace(LifecycleState::Stopping);
        let begun = Instant::now();
        let _ = run.shutdown.send(());
        let waiters = self.inner.snapshot.receiver_count() as u64;
        if let Err(error) = run.task.await
            && error.is_panic()
        {
            let message = format!("the driver panicked: {error}");
            self.inner.lifecycle.send_replace(LifecycleState::Failed(message.clone()));
            return Err(LifecycleError::Stop { name: self.inner.config.workload.name().to_owned(), message });
        }
        self.inner.lifecycle.send_replace(LifecycleState::Stopped);
        Ok(StopReport { drained: 0, forced: waiters, elapsed: begun.elapsed() })
    }

    fn is_running(&self) -> bool {
        self.inner.run.lock().is_some()
    }

    fn uptime(&self) -> Option<Duration> {
        self.inner.run.lock().as_ref().map(|run| run.started.elapsed())
    }

    fn state(&self) -> watch::Receiver<LifecycleState> {
        self.inner.lifecycle.subscribe()
    }
}

/// The driver task's state.
struct Driver {
    inner: Arc<Inner>,
    machine: IdleMachine,
    tx: mpsc::UnboundedSender<Internal>,
    rx: mpsc::UnboundedReceiver<Internal>,
    events: JoinHandle<()>,
    poll: Option<JoinHandle<()>>,
    probe: Option<JoinHandle<()>>,
    starting_since: Option<Instant>,
    /// One unit of activity on each dependency while this workload is not asleep.
    dependency_guards: Vec<ActivityGuard>,
}

impl Driver {
    fn new(inner: Arc<Inner>, first: EngineView) -> Self {
        let config = &inner.config;
        let machine_config = MachineConfig {
            workload: config.workload.name().to_owned(),
            idle_timeout: config.idle_timeout,
            wake_timeout: config.wake_timeout,
            settle: config.readiness.settle,
            probe: !matches!(config.readiness.check, ReadinessCheck::Engine),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let events = tokio::spawn(watch_events(Arc::clone(&inner), tx.clone()));
        let mut driver = Self {
            machine: IdleMachine::new(machine_config, Instant::now()),
            inner,
            tx,
            rx,
            events,
            poll: None,
            probe: None,
            starting_since: None,
            dependency_guards: Vec::new(),
        };
        driver.feed(IdleInput::Observed(first));
        driver
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        loop {
            // Busy: be woken when the count drops to zero (or learn that it already did).
            if self.machine.is_busy() && !self.inner.shared.is_armed() && self.inner.shared.arm() {
                self.feed(IdleInput::Idle { since: self.inner.shared.last_release() });
            }
            let deadline = self.machine.next_deadline();
            let inner = Arc::clone(&self.inner);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(command) = commands.recv() => match command {
                    Command::Wake(reply) => {
                        self.feed(IdleInput::Wake);
                        let attempt =
                            if self.machine.state() == &IdleState::Ready { 0 } else { self.machine.attempt() };
                        let _ = reply.send(attempt);
                    }
                },
                Some(internal) = self.rx.recv() => match internal {
                    Internal::Input(input) => self.feed(input),
                    Internal::Observed { epoch, view } => {
                        if epoch >= self.inner.epoch.load(Ordering::SeqCst) {
                            self.feed(IdleInput::Observed(view));
                        }
                    }
                },
                () = inner.shared.idle.notified() => self.feed(self.activity_input()),
                () = sleep_until(deadline), if deadline.is_some() => {
                    // Traffic that came and went since the countdown began moves it on.
                    self.feed(self.activity_input());
                    self.feed(IdleInput::Tick);
                }
            }
        }
        self.events.abort();
        self.stop_polling();
        self.dependency_guards.clear();
        let state = IdleState::Error(WakeError::NotWatching { workload: self.name().to_owned() });
        self.inner.shared.set_ready(false);
        self.inner.metrics.set_state(&state);
        self.inner.snapshot.send_replace(IdleSnapshot { state, attempt: u64::MAX, running: false });
    }

    fn name(&self) -> &str {
        self.inner.config.workload.name()
    }

    /// The activity count, as the machine's input.
    fn activity_input(&self) -> IdleInput {
        let shared = &self.inner.shared;
        if shared.active() == 0 { IdleInput::Idle { since: shared.last_release() } } else { IdleInput::Busy }
    }

    fn feed(&mut self, input: IdleInput) {
        let mut pending = vec![input];
        while let Some(input) = pending.pop() {
            let before = self.machine.state().clone();
            let actions = self.machine.on_event(Instant::now(), input);
            self.publish(&before);
            for action in actions {
                match action {
                    IdleAction::Start { unpause } => self.start(unpause),
                    IdleAction::Stop => {
                        // `Stopping` is published (SeqCst) before the count is read: a request
                        // that entered after this read sees "not ready" and waits for a wake.
                        if self.inner.shared.may_stop() {
                            self.stop();
                        } else {
                            pending.push(IdleInput::StopAborted);
                        }
                    }
                    IdleAction::Probe => self.probe(),
                }
            }
        }
    }

    fn publish(&mut self, before: &IdleState) {
        let state = self.machine.state().clone();
        let attempt = self.machine.attempt();
        let running = self.machine.engine().is_some_and(EngineView::is_up);
        self.inner.shared.set_ready(state == IdleState::Ready);
        self.hold_dependencies(&state, running);
        let changed = self.inner.snapshot.send_if_modified(|s| {
            let changed = s.state != state || s.attempt != attempt || s.running != running;
            if changed {
                *s = IdleSnapshot { state: state.clone(), attempt, running };
            }
            changed
        });
        if !changed {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let metrics = &inner.metrics;
        metrics.set_state(&state);
        let now = Instant::now();
        match (before, &state) {
            (IdleState::Starting, IdleState::Starting) => {}
            (_, IdleState::Starting) => {
                self.starting_since = Some(now);
                self.start_polling();
            }
            (IdleState::Starting, outcome) => {
                self.stop_polling();
                if let Some(since) = self.starting_since.take() {
                    let histogram =
                        if *outcome == IdleState::Ready { &metrics.wake_ready } else { &metrics.wake_error };
                    histogram.record(now.duration_since(since).as_secs_f64());
                }
            }
            _ => {}
        }
        match (before, &state) {
            (IdleState::Stopping, IdleState::Napping) => metrics.stops_idle.increment(1),
            (IdleState::Ready | IdleState::Error(_), IdleState::Napping) => {
                metrics.stops_external.increment(1)
            }
            _ => {}
        }
        tracing::debug!(workload = self.name(), state = state.name(), attempt, "idlewatch state");
    }

    /// Holds one unit of activity on every dependency while this workload is not asleep (and
    /// wakes them when it takes the units: a workload found running needs them too); lets go
    /// once it is asleep, so a shared dependency stops only after its last dependent.
    fn hold_dependencies(&mut self, state: &IdleState, running: bool) {
        let asleep = match state {
            IdleState::Napping => true,
            IdleState::Error(_) => !running,
            _ => false,
        };
        if asleep {
            self.dependency_guards.clear();
        } else if self.dependency_guards.is_empty() && !self.inner.dependencies.is_empty() {
            for (dependency, _) in &self.inner.dependencies {
                self.dependency_guards.push(dependency.activity());
                let dependency = dependency.clone();
                tokio::spawn(async move { dependency.wake().await });
            }
        }
    }

    fn start(&mut self, unpause: bool) {
        self.inner.metrics.wakes.increment(1);
        let inner = Arc::clone(&self.inner);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let timeout = inner.config.wake_timeout;
            let start = async {
                wake_dependencies(&inner).await?;
                Ok(inner.engine.start(unpause).await)
            };
            let result = match tokio::time::timeout(timeout, start).await {
                Ok(Err(dependency_failed)) => {
                    let _ = tx.send(Internal::Input(IdleInput::DependencyFailed(dependency_failed)));
                    return;
                }
                Ok(Ok(result)) => benign(result),
                Err(_) => Err(RuntimeError::Timeout {
                    operation: if unpause { "unpause" } else { "start" },
                    id: inner.config.workload.name().to_owned(),
                    after: timeout,
                }),
            };
            // Reads that began before this point may predate the start: they are stale now.
            inner.epoch.fetch_add(1, Ordering::SeqCst);
            let ok = result.is_ok();
            let _ = tx.send(Internal::Input(IdleInput::StartDone(result)));
            if ok {
                observe(&inner, &tx).await;
            }
        });
    }

    fn stop(&mut self) {
        let inner = Arc::clone(&self.inner);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let deadline = inner.config.stop_deadline();
            let result =
                tokio::time::timeout(deadline, stop_and_confirm(&inner, &tx)).await.unwrap_or_else(|_| {
                    Err(RuntimeError::Timeout {
                        operation: "stop",
                        id: inner.config.workload.name().to_owned(),
                        after: deadline,
                    })
                });
            let failed = result.is_err();
            if let Err(error) = &result {
                tracing::warn!(workload = inner.config.workload.name(), %error, "idle stop failed");
            }
            let _ = tx.send(Internal::Input(IdleInput::StopDone(result)));
            if failed {
                // The machine forgot its view with the failure: read the status again (when
                // the engine answers, the view is back; when it does not, a wake starts).
                observe(&inner, &tx).await;
            }
        });
    }

    /// While starting: re-read the status with back-off, behind the pushed events.
    fn start_polling(&mut self) {
        self.stop_polling();
        let inner = Arc::clone(&self.inner);
        let tx = self.tx.clone();
        self.poll = Some(tokio::spawn(async move {
            let mut delays = poll_delays(&inner.config);
            loop {
                tokio::time::sleep(delays.next().unwrap_or(inner.config.readiness.poll_max)).await;
                observe(&inner, &tx).await;
            }
        }));
    }

    fn stop_polling(&mut self) {
        if let Some(task) = self.poll.take() {
            task.abort();
        }
        if let Some(task) = self.probe.take() {
            task.abort();
        }
    }

    /// Runs the readiness probe with back-off until it passes.
    fn probe(&mut self) {
        let check = self.inner.config.readiness.check.clone();
        let inner = Arc::clone(&self.inner);
        let tx = self.tx.clone();
        if let Some(task) = self.probe.take() {
            task.abort();
        }
        self.probe = Some(tokio::spawn(async move {
            let mut delays = poll_delays(&inner.config);
            let attempt_limit = inner.config.readiness.poll_max;
            loop {
                if tokio::time::timeout(attempt_limit, probe::passes(&check)).await.unwrap_or(false) {
                    let _ = tx.send(Internal::Input(IdleInput::ProbePassed));
                    return;
                }
                tokio::time::sleep(delays.next().unwrap_or(attempt_limit)).await;
            }
        }));
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.events.abort();
        self.stop_polling();
    }
}

fn poll_delays(config: &IdleConfig) -> impl Iterator<Item = Duration> + use<> {
    ExponentialBuilder::new()
        .with_min_delay(config.readiness.poll_min)
        .with_max_delay(config.readiness.poll_max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// Wakes every dependency in parallel (each by its condition); the first failure of a required
/// one, as this workload's error.
async fn wake_dependencies(inner: &Inner) -> Result<(), WakeError> {
    let waits = inner.dependencies.iter().map(|(dependency, edge)| async move {
        let result = match edge.condition {
            DependencyCondition::Healthy => dependency.wake().await,
            DependencyCondition::Started => dependency.wake_started().await,
        };
        let name = dependency.config().workload.name();
        match result {
            Err(error) if edge.optional => {
                tracing::info!(workload = inner.config.workload.name(), dependency = name, %error, "optional dependency did not come up");
                Ok(())
            }
            other => other.map_err(|source| WakeError::Dependency {
                workload: inner.config.workload.name().to_owned(),
                dependency: name.to_owned(),
                source: Box::new(source),
            }),
        }
    });
    futures_util::future::join_all(waits).await.into_iter().collect()
}

/// Reads the status and sends it to the driver, tagged with the epoch the read began in.
async fn observe(inner: &Inner, tx: &mpsc::UnboundedSender<Internal>) {
    let epoch = inner.epoch.load(Ordering::SeqCst);
    match inner.engine.observe().await {
        Ok(view) => {
            let _ = tx.send(Internal::Observed { epoch, view });
        }
        Err(error) => {
            if let Some(view) = EngineView::of_error(&error) {
                let _ = tx.send(Internal::Observed { epoch, view });
            } else {
                tracing::debug!(workload = inner.config.workload.name(), %error, "status read failed");
            }
        }
    }
}

/// The stop call, then status reads with back-off until the workload is not running.
async fn stop_and_confirm(inner: &Inner, tx: &mpsc::UnboundedSender<Internal>) -> Result<(), RuntimeError> {
    benign(inner.engine.stop().await)?;
    let mut delays = poll_delays(&inner.config);
    loop {
        let epoch = inner.epoch.load(Ordering::SeqCst);
        let view = inner.engine.observe().await?;
        if matches!(view, EngineView::Down | EngineView::Paused) {
            let _ = tx.send(Internal::Observed { epoch, view });
            return Ok(());
        }
        tokio::time::sleep(delays.next().unwrap_or(inner.config.readiness.poll_max)).await;
    }
}

/// The engine's event stream, reopened with back-off whenever it ends; the status is re-read
/// after every (re)open, so nothing that happened while it was down is missed.
async fn watch_events(inner: Arc<Inner>, tx: mpsc::UnboundedSender<Internal>) {
    let builder = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let mut backoff = builder.build();
    loop {
        let opened = Instant::now();
        let mut stream = inner.engine.events();
        observe(&inner, &tx).await;
        while let Some(item) = stream.next().await {
            match item {
                Ok(News::View(view)) => {
                    let epoch = inner.epoch.load(Ordering::SeqCst);
                    let _ = tx.send(Internal::Observed { epoch, view });
                }
                Ok(News::Changed) => observe(&inner, &tx).await,
                Err(error) => {
                    tracing::warn!(workload = inner.config.workload.name(), %error, "engine event stream broke");
                    break;
                }
            }
        }
        if opened.elapsed() >= STABLE_STREAM {
            backoff = builder.build();
        }
        inner.metrics.reconnects.increment(1);
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
}
