use std::time::Duration;

use pool_api::ContainerHealth::{Healthy, None as NoCheck, Starting as HealthStarting, Unhealthy};
use proptest::prelude::*;

use super::*;

const IDLE: Duration = Duration::from_secs(60);
const WAKE: Duration = Duration::from_secs(10);

fn config(settle: Duration, probe: bool) -> MachineConfig {
    MachineConfig { workload: "web".into(), idle_timeout: IDLE, wake_timeout: WAKE, settle, probe }
}

fn machine() -> (IdleMachine, Instant) {
    let now = Instant::now();
    let mut m = IdleMachine::new(config(Duration::ZERO, false), now);
    assert!(m.on_event(now, IdleInput::Observed(EngineView::Down)).is_empty());
    (m, now)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn a_wake_starts_once_however_many_ask() {
    let (mut m, t) = machine();
    assert_eq!(m.on_event(t, IdleInput::Wake), [IdleAction::Start { unpause: false }]);
    assert_eq!(m.state(), &IdleState::Starting);
    for _ in 0..49 {
        assert!(m.on_event(t, IdleInput::Wake).is_empty());
    }
    assert!(m.on_event(t, IdleInput::StartDone(Ok(()))).is_empty());
    m.on_event(t, IdleInput::Observed(EngineView::Up(HealthStarting)));
    assert_eq!(m.state(), &IdleState::Starting);
    m.on_event(t + secs(2), IdleInput::Observed(EngineView::Up(Healthy)));
    assert_eq!(m.state(), &IdleState::Ready);
    assert_eq!(m.attempt(), 1);
}

#[test]
fn a_wake_that_never_turns_healthy_fails_at_the_wake_timeout() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Wake);
    m.on_event(t, IdleInput::StartDone(Ok(())));
    m.on_event(t + secs(1), IdleInput::Observed(EngineView::Up(Unhealthy)));
    assert_eq!(m.next_deadline(), Some(t + WAKE));
    m.on_event(t + WAKE - Duration::from_millis(1), IdleInput::Tick);
    assert_eq!(m.state(), &IdleState::Starting);
    m.on_event(t + WAKE, IdleInput::Tick);
    assert!(matches!(m.state(), IdleState::Error(WakeError::Timeout { after, .. }) if *after == WAKE));
    // Up but failed: still stopped once idle, and a new wake is a new attempt.
    assert_eq!(m.next_deadline(), Some(t + IDLE));
    m.on_event(t + WAKE, IdleInput::Wake);
    assert_eq!((m.state(), m.attempt()), (&IdleState::Starting, 2));
}

#[test]
fn the_idle_countdown_runs_only_while_nothing_is_active() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Wake);
    m.on_event(t, IdleInput::Observed(EngineView::Up(NoCheck)));
    assert_eq!(m.state(), &IdleState::Ready);
    m.on_event(t + secs(1), IdleInput::Busy);
    assert_eq!(m.next_deadline(), None, "a ten-minute download keeps it up");
    assert!(m.on_event(t + secs(600), IdleInput::Tick).is_empty());
    m.on_event(t + secs(600), IdleInput::Idle { since: t + secs(600) });
    assert_eq!(m.next_deadline(), Some(t + secs(600) + IDLE));
    assert_eq!(m.on_event(t + secs(660), IdleInput::Tick), [IdleAction::Stop]);
    assert_eq!(m.state(), &IdleState::Stopping);
    m.on_event(t + secs(661), IdleInput::Observed(EngineView::Down));
    m.on_event(t + secs(661), IdleInput::StopDone(Ok(())));
    assert_eq!(m.state(), &IdleState::Napping);
}

#[test]
fn activity_between_the_decision_and_the_stop_call_cancels_the_stop() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Up(Healthy)));
    assert_eq!(m.state(), &IdleState::Ready, "a running workload is adopted");
    assert_eq!(m.on_event(t + IDLE, IdleInput::Tick), [IdleAction::Stop]);
    m.on_event(t + IDLE, IdleInput::StopAborted);
    assert_eq!(m.state(), &IdleState::Ready);
    assert_eq!(m.next_deadline(), None);
}

#[test]
fn a_wake_during_a_stop_starts_again_once_it_is_down() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Up(Healthy)));
    m.on_event(t + IDLE, IdleInput::Tick);
    assert!(m.on_event(t + IDLE, IdleInput::Wake).is_empty());
    m.on_event(t + IDLE, IdleInput::Observed(EngineView::Down));
    assert_eq!(m.on_event(t + IDLE, IdleInput::StopDone(Ok(()))), [IdleAction::Start { unpause: false }]);
    assert_eq!(m.state(), &IdleState::Starting);
}

/// What a stop whose engine connection broke reports.
fn lost() -> RuntimeError {
    RuntimeError::Unreachable { message: "connection reset by agent://127.0.0.1:1".into() }
}

#[test]
fn a_failed_stop_forgets_the_view_so_a_wake_starts_instead_of_trusting_it() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Up(NoCheck)));
    assert_eq!(m.on_event(t + IDLE, IdleInput::Tick), [IdleAction::Stop]);
    // The stop took effect, but its answer (and the event saying so) was lost with the engine.
    m.on_event(t + IDLE, IdleInput::StopDone(Err(lost())));
    assert!(matches!(m.state(), IdleState::Error(WakeError::Stop { .. })), "{:?}", m.state());
    assert_eq!(m.engine(), None);
    assert_eq!(m.on_event(t + IDLE, IdleInput::Wake), [IdleAction::Start { unpause: false }]);
    assert_eq!(m.state(), &IdleState::Starting, "not ready on the strength of the old view");
}

#[test]
fn a_failed_stop_of_a_workload_still_running_is_ready_again_once_read() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Up(NoCheck)));
    m.on_event(t + IDLE, IdleInput::Tick);
    m.on_event(t + IDLE, IdleInput::StopDone(Err(lost())));
    // The driver's read after the failure: still running.
    m.on_event(t + IDLE, IdleInput::Observed(EngineView::Up(NoCheck)));
    assert_eq!(m.state(), &IdleState::Ready);
    assert_eq!(m.next_deadline(), Some(t + IDLE + IDLE), "the stop is tried again after the idle time");
}

#[test]
fn a_stop_that_keeps_failing_is_retried_once_per_idle_period_not_in_a_loop() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Up(Unhealthy)));
    m.on_event(t, IdleInput::Wake);
    m.on_event(t + secs(1), IdleInput::Observed(EngineView::Up(Healthy)));
    let ready = t + secs(1);
    assert_eq!(m.state(), &IdleState::Ready);
    let refused = || RuntimeError::Engine {
        operation: "stop",
        id: "web".into(),
        status: Some(500),
        message: "x".into(),
    };
    let mut at = ready + IDLE;
    for _ in 0..3 {
        assert_eq!(m.on_event(at, IdleInput::Tick), [IdleAction::Stop]);
        m.on_event(at, IdleInput::StopDone(Err(refused())));
        // Read again: still running, but unhealthy now (so not ready, still in error).
        m.on_event(at, IdleInput::Observed(EngineView::Up(Unhealthy)));
        assert!(matches!(m.state(), IdleState::Error(WakeError::Stop { .. })), "{:?}", m.state());
        assert_eq!(m.next_deadline(), Some(at + IDLE));
        assert!(m.on_event(at, IdleInput::Tick).is_empty(), "not again at once");
        at += IDLE;
    }
}

#[test]
fn a_paused_workload_is_unpaused() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Paused));
    assert_eq!(m.on_event(t, IdleInput::Wake), [IdleAction::Start { unpause: true }]);
}

#[test]
fn a_late_paused_read_after_an_unpause_is_not_final() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Paused));
    m.on_event(t, IdleInput::Wake);
    m.on_event(t, IdleInput::StartDone(Ok(())));
    // Docker can still say "paused" just after it answered the unpause: not a failure.
    m.on_event(t, IdleInput::Observed(EngineView::Paused));
    assert_eq!(m.state(), &IdleState::Starting);
    m.on_event(t + secs(1), IdleInput::Observed(EngineView::Up(Healthy)));
    assert_eq!(m.state(), &IdleState::Ready);

    // Paused for good: the wake time-out ends it.
    m.on_event(t + secs(2), IdleInput::Observed(EngineView::Paused));
    assert_eq!(m.state(), &IdleState::Napping);
    m.on_event(t + secs(2), IdleInput::Wake);
    m.on_event(t + secs(2), IdleInput::StartDone(Ok(())));
    m.on_event(t + secs(3), IdleInput::Observed(EngineView::Paused));
    assert_eq!(m.state(), &IdleState::Starting);
    m.on_event(t + secs(2) + WAKE, IdleInput::Tick);
    assert!(matches!(m.state(), IdleState::Error(WakeError::Timeout { .. })), "{:?}", m.state());
}

#[test]
fn paused_after_a_start_is_a_failure() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Wake);
    m.on_event(t, IdleInput::StartDone(Ok(())));
    m.on_event(t, IdleInput::Observed(EngineView::Paused));
    assert!(matches!(m.state(), IdleState::Error(WakeError::WentDown { .. })), "{:?}", m.state());
}

#[test]
fn every_engine_state_is_mapped() {
    use pool_api::{ContainerState as S, ContainerStatus};
    let view = |state: S, health| {
        EngineView::of_container(&ContainerStatus {
            id: "x".into(),
            name: "x".into(),
            state,
            health,
            started_at: None,
        })
    };
    assert_eq!(view(S::Created, NoCheck), EngineView::Down);
    assert_eq!(view(S::Exited { code: Some(0) }, NoCheck), EngineView::Down);
    assert_eq!(view(S::Dead, NoCheck), EngineView::Down);
    assert_eq!(view(S::Paused, Healthy), EngineView::Paused);
    assert_eq!(view(S::Restarting, NoCheck), EngineView::Transitional);
    assert_eq!(view(S::Removing, NoCheck), EngineView::Transitional);
    assert_eq!(view(S::Unknown("stopping".into()), NoCheck), EngineView::Transitional);
    assert_eq!(view(S::Running, HealthStarting), EngineView::Up(HealthStarting));
    let svc = |desired, running| EngineView::of_service(ServiceStatus { desired, running }, 2);
    assert_eq!(svc(0, 0), EngineView::Down);
    assert_eq!(svc(0, 1), EngineView::Transitional);
    assert_eq!(svc(2, 1), EngineView::Up(HealthStarting));
    assert_eq!(svc(2, 2), EngineView::Up(Healthy));
    let not_found = RuntimeError::NotFound { id: "x".into() };
    assert_eq!(EngineView::of_error(&not_found), Some(EngineView::Gone));
    assert_eq!(EngineView::of_error(&RuntimeError::Unreachable { message: String::new() }), None);
}

#[test]
fn created_and_restarting_containers_are_not_errors() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Observed(EngineView::Transitional));
    assert_eq!(m.state(), &IdleState::Napping);
    assert!(m.on_event(t, IdleInput::Wake).is_empty(), "nothing is started over a restarting container");
    m.on_event(t + secs(1), IdleInput::Observed(EngineView::Up(Healthy)));
    assert_eq!(m.state(), &IdleState::Ready);
    m.on_event(t + secs(2), IdleInput::Observed(EngineView::Transitional));
    assert_eq!(m.state(), &IdleState::Starting);
}

#[test]
fn readiness_by_probe_and_settling_delay() {
    let t = Instant::now();
    let mut m = IdleMachine::new(config(secs(2), true), t);
    m.on_event(t, IdleInput::Observed(EngineView::Down));
    m.on_event(t, IdleInput::Wake);
    assert_eq!(m.on_event(t, IdleInput::Observed(EngineView::Up(Healthy))), [IdleAction::Probe]);
    assert!(m.on_event(t, IdleInput::Observed(EngineView::Up(Healthy))).is_empty(), "one probe");
    m.on_event(t + secs(1), IdleInput::ProbePassed);
    assert_eq!(m.state(), &IdleState::Starting);
    assert_eq!(m.next_deadline(), Some(t + secs(3)));
    m.on_event(t + secs(3), IdleInput::Tick);
    assert_eq!(m.state(), &IdleState::Ready);
}

#[test]
fn engine_failures_are_typed() {
    let (mut m, t) = machine();
    m.on_event(t, IdleInput::Wake);
    let refused =
        RuntimeError::Engine { operation: "start", id: "web".into(), status: Some(500), message: "x".into() };
    m.on_event(t, IdleInput::StartDone(Err(refused)));
    assert!(matches!(m.state(), IdleState::Error(WakeError::Start { .. })));
    m.on_event(t, IdleInput::Wake);
    m.on_event(t, IdleInput::StartDone(Ok(())));
    m.on_event(t, IdleInput::Observed(EngineView::Down));
    assert!(matches!(m.state(), IdleState::Error(WakeError::WentDown { .. })));
    m.on_event(t, IdleInput::Observed(EngineView::Gone));
    assert!(matches!(m.state(), IdleState::Error(WakeError::NotFound { .. })));
}

fn input() -> impl Strategy<Value = (u64, IdleInput)> {
    let view = prop_oneof![
        Just(EngineView::Down),
        Just(EngineView::Paused),
        Just(EngineView::Transitional),
        Just(EngineView::Up(Healthy)),
        Just(EngineView::Up(HealthStarting)),
        Just(EngineView::Up(Unhealthy)),
        Just(EngineView::Gone),
    ];
    let err = || RuntimeError::Unreachable { message: "x".into() };
    let input = prop_oneof![
        view.prop_map(IdleInput::Observed),
        Just(IdleInput::Wake),
        Just(IdleInput::Busy),
        Just(IdleInput::Idle { since: Instant::now() }),
        Just(IdleInput::StartDone(Ok(()))),
        Just(IdleInput::StartDone(Err(err()))),
        Just(IdleInput::DependencyFailed(WakeError::NotWatching { workload: "db".into() })),
        Just(IdleInput::StopDone(Ok(()))),
        Just(IdleInput::StopDone(Err(err()))),
        Just(IdleInput::StopAborted),
        Just(IdleInput::ProbePassed),
        Just(IdleInput::Tick),
    ];
    (0u64..20_000, input)
}

proptest! {
    #[test]
    fn the_machine_keeps_its_rules(probe: bool, settle_ms in 0u64..3_000, steps in prop::collection::vec(input(), 1..200)) {
        let mut now = Instant::now();
        let mut m = IdleMachine::new(config(Duration::from_millis(settle_ms), probe), now);
        let mut starts_in_flight = 0u32;
        let mut attempt_began = now;
        for (advance_ms, input) in steps {
            now += Duration::from_millis(advance_ms);
            // The driver ticks at every deadline it passes.
            while let Some(deadline) = m.next_deadline() {
                if deadline > now { break; }
                let before = m.attempt();
                let actions = m.on_event(deadline, IdleInput::Tick);
                prop_assert_eq!(m.attempt(), before, "a tick never begins an attempt");
                let starts = actions.iter().filter(|a| matches!(a, IdleAction::Start { .. })).count();
                prop_assert_eq!(starts, 0);
                if m.state() == &IdleState::Starting && m.next_deadline() == Some(deadline) {
                    prop_assert!(false, "a tick at a deadline must move on");
                }
            }
            // An idle report says "zero since" some moment up to now.
            let input = match input {
                IdleInput::Idle { .. } => IdleInput::Idle { since: now - Duration::from_millis(advance_ms / 2) },
                other => other,
            };
            let was_busy = matches!(input, IdleInput::Busy) || m.busy;
            let is_start_done = matches!(input, IdleInput::StartDone(_) | IdleInput::DependencyFailed(_));
            // A StartDone the machine did not ask for is not something the driver sends.
            if is_start_done && starts_in_flight == 0 { continue; }
            let before = (m.state().clone(), m.attempt());
            let actions = m.on_event(now, input);
            if is_start_done { starts_in_flight -= 1; }
            for action in &actions {
                match action {
                    IdleAction::Start { .. } => {
                        starts_in_flight += 1;
                        prop_assert!(starts_in_flight <= 1, "single flight");
                    }
                    IdleAction::Stop => {
                        prop_assert!(!was_busy, "never stop while active");
                        prop_assert!(matches!(before.0, IdleState::Ready | IdleState::Error(_)));
                    }
                    IdleAction::Probe => prop_assert!(probe),
                }
            }
            if m.attempt() != before.1 { attempt_began = now; }
            if m.state() == &IdleState::Starting {
                let deadline = m.next_deadline();
                prop_assert!(deadline.is_some_and(|d| d <= attempt_began + WAKE), "a wake is bounded: {deadline:?}");
            }
            if m.state() == &IdleState::Ready && !m.busy {
                prop_assert!(m.next_deadline().is_some(), "an idle ready workload counts down");
            }
        }
    }
}
