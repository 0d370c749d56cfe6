//! The watcher's state machine, as pure code: no runtime, no I/O, time passed in.
//!
//! ```text
//!            wake                    ready (+ settle)
//!  Napping ────────▶ Starting ──────────────────────▶ Ready
//!     ▲                 │ time-out / start failed /       │ idle time-out
//!     │                 ▼ went down / not found           ▼ (activity count zero)
//!     │               Error ◀──── stop failed ─────── Stopping
//!     └──────────── stop confirmed ("not running") ◀──────┘
//! ```
//!
//! The driver ([`IdleWatcher`](crate::IdleWatcher)) feeds [`IdleInput`]s — the engine's view
//! of the workload, wake requests, activity changes, the results of the calls it made, and
//! ticks at [`IdleMachine::next_deadline`] — and carries out the [`IdleAction`]s it gets back.
//!
//! Rules the machine keeps (and the property test checks):
//!
//! - **Single flight.** A wake while starting changes nothing; a start is never asked for while
//!   one is in flight.
//! - **Bounded.** Starting always has a deadline (the wake time-out); when it passes, the state
//!   is `Error(Timeout)`, so a waiter of that attempt is released.
//! - **Idle only at zero.** The idle deadline exists only while the activity count is zero, and
//!   counts from the moment it became zero (or from the moment the workload became ready).
//! - **Every engine state mapped.** `created`, `exited` and `dead` are down (a wake starts);
//!   `paused` is down (a wake unpauses); `restarting`, `removing` and states this crate does not
//!   know are in transition (a wake waits for the engine to settle — nothing is started over
//!   them); running is up, with its health.
//! - **External changes are believed.** A workload started from outside is adopted (ready, or
//!   starting until healthy); one stopped from outside is napping.
//! - **A wake that arrives during a stop** is remembered and starts the workload once the stop
//!   is confirmed.
//! - **A failed stop forgets the view.** The stop may have taken effect before its answer was
//!   lost, so the machine holds no engine view until the next read (the driver reads again
//!   right away): a wake meanwhile asks for a start instead of trusting a stale "running".

use std::time::Duration;

use pool_api::{ContainerHealth, ContainerState, ContainerStatus, RuntimeError, ServiceStatus};
use tokio::time::Instant;

use crate::error::WakeError;

/// Where a watched workload is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleState {
    /// Asleep (stopped, paused, scaled to 0), or not yet known.
    Napping,
    /// Waking: started (or starting from outside), not yet ready.
    Starting,
    /// Ready: requests go straight through.
    Ready,
    /// Being put to sleep.
    Stopping,
    /// The last wake or stop failed; the next wake tries again.
    Error(WakeError),
}

impl IdleState {
    /// The state's name, as used in metrics: `napping`, `starting`, `ready`, `stopping`, `error`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Napping => "napping",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
            Self::Error(_) => "error",
        }
    }
}

/// The engine's view of the workload, reduced to what the machine decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineView {
    /// Not running: created, exited, dead; a service at 0 replicas.
    Down,
    /// Paused: a wake unpauses.
    Paused,
    /// In transition: restarting, removing, an unknown state, a service scaling down.
    Transitional,
    /// Running, with its health (a service: `Healthy` once its running tasks reach the wanted
    /// count, `Starting` before).
    Up(ContainerHealth),
    /// The engine does not know the workload.
    Gone,
}

impl EngineView {
    /// Maps a container's status; every engine state has its place.
    pub fn of_container(status: &ContainerStatus) -> Self {
        match &status.state {
            ContainerState::Running => Self::Up(status.health),
            ContainerState::Paused => Self::Paused,
            ContainerState::Created | ContainerState::Exited { .. } | ContainerState::Dead => Self::Down,
            ContainerState::Restarting | ContainerState::Removing | ContainerState::Unknown(_) => {
                Self::Transitional
            }
        }
    }

    /// Maps a service's task counts; `replicas` is the count it runs with when awake.
    pub fn of_service(status: ServiceStatus, replicas: u64) -> Self {
        match (status.desired, status.running) {
            (0, 0) => Self::Down,
            (0, _) => Self::Transitional,
            (desired, running) if running >= desired.min(replicas) => Self::Up(ContainerHealth::Healthy),
            _ => Self::Up(ContainerHealth::Starting),
        }
    }

    /// The view after an engine error: `Gone` for "not found", `None` (no news) for any other.
    pub fn of_error(error: &RuntimeError) -> Option<Self> {
        matches!(error, RuntimeError::NotFound { .. }).then_some(Self::Gone)
    }

    /// True when running (any health).
    pub fn is_up(self) -> bool {
        matches!(self, Self::Up(_))
    }

    fn is_ready(self) -> bool {
        matches!(self, Self::Up(ContainerHealth::Healthy | ContainerHealth::None))
    }
}

/// Something that happened, fed to [`IdleMachine::on_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdleInput {
    /// The engine's current view (from a status read or an event).
    Observed(EngineView),
    /// Someone wants the workload awake.
    Wake,
    /// The activity count is above zero.
    Busy,
    /// The activity count is zero, and has been since `since`.
    Idle {
        /// When it last became zero.
        since: Instant,
    },
    /// The start (or unpause, or scale-up) call returned.
    StartDone(Result<(), RuntimeError>),
    /// A dependency did not come up; the start is off.
    DependencyFailed(WakeError),
    /// The stop call returned and, if it succeeded, "not running" was confirmed.
    StopDone(Result<(), RuntimeError>),
    /// Activity arrived between the decision to stop and the stop call: the stop is off.
    StopAborted,
    /// The readiness probe (TCP connect) passed.
    ProbePassed,
    /// Time passed (the driver ticks at [`IdleMachine::next_deadline`]).
    Tick,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleAction {
    /// Start the workload (`unpause` for a paused container). Its result comes back as
    /// [`IdleInput::StartDone`].
    Start {
        /// Unpause instead of start.
        unpause: bool,
    },
    /// Put the workload to sleep; the result comes back as [`IdleInput::StopDone`] (or
    /// [`IdleInput::StopAborted`]).
    Stop,
    /// Run the readiness probe until it passes ([`IdleInput::ProbePassed`]) or the state
    /// leaves `Starting`.
    Probe,
}

/// The machine's timing and readiness settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// The workload's name (in errors).
    pub workload: String,
    /// Idle time before a stop.
    pub idle_timeout: Duration,
    /// Deadline of a wake.
    pub wake_timeout: Duration,
    /// Extra time after readiness before `Ready`.
    pub settle: Duration,
    /// Readiness is decided by a probe ([`IdleAction::Probe`]) rather than the engine's health.
    pub probe: bool,
}

/// The state machine; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct IdleMachine {
    config: MachineConfig,
    state: IdleState,
    attempt: u64,
    engine: Option<EngineView>,
    busy: bool,
    idle_since: Instant,
    wake_deadline: Option<Instant>,
    settle_until: Option<Instant>,
    probe_asked: bool,
    probe_passed: bool,
    start_in_flight: bool,
    /// The current wake's start was an unpause: until the wake ends, a "paused" view is not
    /// final (the engine may still apply a late event of the pause; see [`Self::observe`]).
    unpausing: bool,
    stop_in_flight: bool,
    wake_pending: bool,
}

impl IdleMachine {
    /// A machine in `Napping` that knows nothing of the engine yet.
    pub fn new(config: MachineConfig, now: Instant) -> Self {
        Self {
            config,
            state: IdleState::Napping,
            attempt: 0,
            engine: None,
            busy: false,
            idle_since: now,
            wake_deadline: None,
            settle_until: None,
            probe_asked: false,
            probe_passed: false,
            start_in_flight: false,
            unpausing: false,
            stop_in_flight: false,
            wake_pending: false,
        }
    }

    /// The current state.
    pub fn state(&self) -> &IdleState {
        &self.state
    }

    /// The number of the current (or last) wake attempt; it grows by one per attempt.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// True while the machine believes the activity count is above zero (no idle countdown).
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// The engine's last view of the workload (`None` before the first).
    pub fn engine(&self) -> Option<EngineView> {
        self.engine
    }

    /// True while a start call is in flight.
    pub fn start_in_flight(&self) -> bool {
        self.start_in_flight
    }

    /// When the driver must tick next: the wake deadline or the end of the settling delay while
    /// starting; the idle deadline while ready (or failed but up) with no activity.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            IdleState::Starting => match (self.wake_deadline, self.settle_until) {
                (Some(w), Some(s)) => Some(w.min(s)),
                (w, s) => w.or(s),
            },
            IdleState::Ready => self.idle_deadline(),
            IdleState::Error(_) if self.engine.is_some_and(EngineView::is_up) => self.idle_deadline(),
            _ => None,
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        (!self.busy && !self.stop_in_flight).then(|| self.idle_since + self.config.idle_timeout)
    }

    /// Feeds one input; returns what the driver must do.
    pub fn on_event(&mut self, now: Instant, input: IdleInput) -> Vec<IdleAction> {
        let mut actions = Vec::new();
        match input {
            IdleInput::Observed(view) => self.observe(now, view, &mut actions),
            IdleInput::Wake => match self.state {
                IdleState::Napping | IdleState::Error(_) => self.begin_start(now, &mut actions),
                IdleState::Stopping => self.wake_pending = true,
                IdleState::Starting | IdleState::Ready => {}
            },
            IdleInput::Busy => self.busy = true,
            IdleInput::Idle { since } => {
                self.busy = false;
                self.idle_since = self.idle_since.max(since.min(now));
            }
            IdleInput::StartDone(result) => {
                self.start_in_flight = false;
                if let Err(source) = result
                    && self.state == IdleState::Starting
                {
                    let error = match EngineView::of_error(&source) {
                        Some(EngineView::Gone) => WakeError::NotFound { workload: self.name() },
                        _ => WakeError::Start { workload: self.name(), source },
                    };
                    self.fail(error);
                }
            }
            IdleInput::DependencyFailed(error) => {
                self.start_in_flight = false;
                if self.state == IdleState::Starting {
                    self.fail(error);
                }
            }
            IdleInput::StopDone(result) => {
                self.stop_in_flight = false;
                if self.state == IdleState::Stopping {
                    match result {
                        Ok(()) => {
                            self.state = IdleState::Napping;
                            if self.engine.is_none_or(EngineView::is_up) {
                                self.engine = Some(EngineView::Down);
                            }
                        }
                        Err(source) => {
                            // The call may have taken effect before it failed (its answer lost
                            // with the engine's connection): the view from before it is no
                            // longer known to hold. Until the engine is read again, a wake
                            // starts rather than trusting a running state that may be gone.
                            self.engine = None;
                            // Tried again after another idle period, not at once: the idle
                            // deadline had passed, and a stop that keeps failing would
                            // otherwise be retried in a loop.
                            self.idle_since = now;
                            self.fail(WakeError::Stop { workload: self.name(), source });
                        }
                    }
                    if std::mem::take(&mut self.wake_pending) {
                        self.begin_start(now, &mut actions);
                    }
                }
            }
            IdleInput::StopAborted => {
                if self.state == IdleState::Stopping {
                    self.stop_in_flight = false;
                    self.state = IdleState::Ready;
                    self.busy = true;
                }
            }
            IdleInput::ProbePassed => {
                self.probe_passed = true;
                self.check_ready(now, &mut actions);
            }
            IdleInput::Tick => self.tick(now, &mut actions),
        }
        actions
    }

    fn name(&self) -> String {
        self.config.workload.clone()
    }

    fn fail(&mut self, error: WakeError) {
        self.state = IdleState::Error(error);
        self.wake_deadline = None;
        self.settle_until = None;
    }

    fn begin_start(&mut self, now: Instant, actions: &mut Vec<IdleAction>) {
        self.attempt += 1;
        self.state = IdleState::Starting;
        self.wake_deadline = Some(now + self.config.wake_timeout);
        self.settle_until = None;
        self.probe_asked = false;
        self.probe_passed = false;
        match self.engine {
            // Up or settling on its own: nothing to start, wait for it.
            Some(EngineView::Up(_) | EngineView::Transitional) => {
                if !self.start_in_flight {
                    self.unpausing = false;
                }
            }
            Some(EngineView::Gone) => {
                self.fail(WakeError::NotFound { workload: self.name() });
                return;
            }
            view => {
                if !self.start_in_flight {
                    self.start_in_flight = true;
                    self.unpausing = view == Some(EngineView::Paused);
                    actions.push(IdleAction::Start { unpause: self.unpausing });
                }
            }
        }
        self.check_ready(now, actions);
    }

    /// While starting: is the workload ready (or settling)? Asks for the probe when the engine
    /// says up and readiness is probed.
    fn check_ready(&mut self, now: Instant, actions: &mut Vec<IdleAction>) {
        if self.state != IdleState::Starting || self.settle_until.is_some() {
            return;
        }
        let ready = if self.config.probe {
            if self.engine.is_some_and(EngineView::is_up) && !self.probe_asked {
                self.probe_asked = true;
                actions.push(IdleAction::Probe);
            }
            self.probe_passed
        } else {
            self.engine.is_some_and(EngineView::is_ready)
        };
        if ready {
            if self.config.settle.is_zero() {
                self.become_ready(now);
            } else {
                self.settle_until = Some(now + self.config.settle);
            }
        }
    }

    fn become_ready(&mut self, now: Instant) {
        self.state = IdleState::Ready;
        self.wake_deadline = None;
        self.settle_until = None;
        // The countdown starts at readiness, not at the last activity before the wake.
        self.idle_since = now;
    }

    fn observe(&mut self, now: Instant, view: EngineView, actions: &mut Vec<IdleAction>) {
        self.engine = Some(view);
        match (&self.state, view) {
            (_, EngineView::Gone) if self.state != IdleState::Stopping => {
                self.fail(WakeError::NotFound { workload: self.name() });
            }
            (IdleState::Napping, EngineView::Up(_)) => {
                // Started from outside: adopt it.
                if view.is_ready() && !self.config.probe {
                    self.attempt += 1;
                    self.become_ready(now);
                } else {
                    self.begin_start(now, actions);
                }
            }
            (IdleState::Starting, EngineView::Up(_)) => self.check_ready(now, actions),
            // After an unpause the engine can still read "paused" for a moment: Docker applies
            // containerd's own pause event when it arrives, which may be after its answer to
            // the unpause. Reads go on until the view changes or the wake time-out passes.
            (IdleState::Starting, EngineView::Paused) if !self.start_in_flight && self.unpausing => {}
            (IdleState::Starting, EngineView::Down | EngineView::Paused) if !self.start_in_flight => {
                self.fail(WakeError::WentDown { workload: self.name() });
            }
            (IdleState::Ready, EngineView::Down | EngineView::Paused) => self.state = IdleState::Napping,
            (IdleState::Ready, EngineView::Transitional) => {
                // e.g. restarting: ready again once the engine says so.
                self.attempt += 1;
                self.state = IdleState::Starting;
                self.wake_deadline = Some(now + self.config.wake_timeout);
                self.probe_asked = false;
                self.probe_passed = false;
            }
            (IdleState::Error(_), EngineView::Down | EngineView::Paused) => self.state = IdleState::Napping,
            (IdleState::Error(_), EngineView::Up(_)) if view.is_ready() && !self.config.probe => {
                self.become_ready(now);
            }
            _ => {}
        }
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<IdleAction>) {
        match self.state {
            IdleState::Starting => {
                if self.settle_until.is_some_and(|s| now >= s) {
                    self.become_ready(now);
                } else if self.wake_deadline.is_some_and(|d| now >= d) {
                    let after = self.config.wake_timeout;
                    self.fail(WakeError::Timeout { workload: self.name(), after });
                }
            }
            IdleState::Ready | IdleState::Error(_) => {
                if self.next_deadline().is_some_and(|d| now >= d) {
                    self.state = IdleState::Stopping;
                    self.stop_in_flight = true;
                    actions.push(IdleAction::Stop);
                }
            }
            IdleState::Napping | IdleState::Stopping => {}
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(all(test, agentpool_loom))]
mod loom_wake {
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::*;

    /// The driver applies inputs one at a time; whatever the interleaving of two wake
    /// requests with the start's completion and the engine's report, exactly one start is
    /// asked for and the workload ends ready.
    #[test]
    fn loom_concurrent_wakes_start_once() {
        loom::model(|| {
            let now = Instant::now();
            let config = MachineConfig {
                workload: "web".into(),
                idle_timeout: Duration::from_secs(60),
                wake_timeout: Duration::from_secs(10),
                settle: Duration::ZERO,
                probe: false,
            };
            let mut machine = IdleMachine::new(config, now);
            machine.on_event(now, IdleInput::Observed(EngineView::Down));
            let machine = Arc::new(Mutex::new(machine));
            let starts = Arc::new(Mutex::new(0u32));
            let wakers: Vec<_> = (0..2)
                .map(|_| {
                    let (machine, starts) = (Arc::clone(&machine), Arc::clone(&starts));
                    thread::spawn(move || {
                        let actions = machine.lock().unwrap().on_event(now, IdleInput::Wake);
                        let n = actions.iter().filter(|a| matches!(a, IdleAction::Start { .. })).count();
                        *starts.lock().unwrap() += n as u32;
                    })
                })
                .collect();
            // The engine side: once a start was asked for, it completes and reports healthy.
            loop {
                if *starts.lock().unwrap() > 0 {
                    let mut m = machine.lock().unwrap();
                    m.on_event(now, IdleInput::StartDone(Ok(())));
                    m.on_event(now, IdleInput::Observed(EngineView::Up(ContainerHealth::Healthy)));
                    break;
                }
                thread::yield_now();
            }
            for waker in wakers {
                waker.join().unwrap();
            }
            assert_eq!(*starts.lock().unwrap(), 1);
            assert_eq!(machine.lock().unwrap().state(), &IdleState::Ready);
        });
    }
}
