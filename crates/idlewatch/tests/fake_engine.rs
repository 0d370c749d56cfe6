//! The watcher against test-support's scripted engine, on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use idlewatch::{
    IdleConfig, IdleState, IdleWatcher, Readiness, ReadinessCheck, StopMethod, WakeError, Workload,
};
use pool_api::{ContainerRuntime, ContainerState, Lifecycle, RuntimeError, ServiceStatus, StopOptions};
use test_support::{FakeHealth, FakeOp, FakeRuntime};
use tokio::time::Instant;

const IDLE: Duration = Duration::from_secs(60);

fn container(name: &str) -> IdleConfig {
    let mut config = IdleConfig::new(Workload::Container(name.into()), IDLE);
    config.wake_timeout = Duration::from_secs(20);
    config
}

async fn watching(engine: &Arc<FakeRuntime>, config: IdleConfig) -> IdleWatcher {
    let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
    watcher.start().await.unwrap();
    settle().await;
    watcher
}

/// Lets the driver and its tasks run (the clock is paused: no time passes).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn state(watcher: &IdleWatcher) -> IdleState {
    watcher.subscribe().borrow().state.clone()
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_wakes_start_once_and_all_are_answered() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(3)));
    engine.set_start_latency(Duration::from_millis(300));
    let watcher = watching(&engine, container("web")).await;
    let begun = Instant::now();
    let wakes: Vec<_> = (0..50)
        .map(|_| {
            let w = watcher.clone();
            tokio::spawn(async move { w.wake().await })
        })
        .collect();
    for wake in wakes {
        wake.await.unwrap().unwrap();
    }
    assert_eq!(engine.calls(FakeOp::Start), 1);
    assert_eq!(engine.starts(), 1);
    // Released by the pushed health event, not by a poll tick.
    assert_eq!(begun.elapsed(), Duration::from_millis(3300));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_cancel_the_wake() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(2)));
    engine.set_start_latency(Duration::from_secs(1));
    let watcher = watching(&engine, container("web")).await;
    let first = tokio::time::timeout(Duration::from_millis(100), watcher.wake()).await;
    assert!(first.is_err(), "the first caller gave up");
    tokio::time::sleep(Duration::from_secs(3)).await;
    settle().await;
    assert!(watcher.is_ready());
    assert_eq!(engine.calls(FakeOp::Start), 1);
}

#[tokio::test(start_paused = true)]
async fn a_workload_that_never_turns_healthy_fails_every_waiter_within_the_wake_timeout() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NeverHealthy(Duration::from_secs(1)));
    let mut config = container("web");
    config.wake_timeout = Duration::from_secs(5);
    let watcher = watching(&engine, config).await;
    let begun = Instant::now();
    let early: Vec<_> = (0..10)
        .map(|_| {
            let w = watcher.clone();
            tokio::spawn(async move { (w.wake().await, Instant::now()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = {
        let w = watcher.clone();
        tokio::spawn(async move { (w.wake().await, Instant::now()) })
    };
    for waiter in early {
        let (result, at) = waiter.await.unwrap();
        assert!(matches!(result, Err(WakeError::Timeout { .. })), "{result:?}");
        assert!(at - begun <= Duration::from_secs(5));
    }
    // The late waiter joined the failed attempt's successor or got its error within its own
    // time-out: never later.
    let (result, at) = late.await.unwrap();
    assert!(result.is_err());
    assert!(at - begun <= Duration::from_secs(3 + 5));
    assert!(matches!(state(&watcher), IdleState::Error(_)));
    // Up but never healthy: stopped once idle.
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(engine.state("web"), Some(ContainerState::Exited { code: Some(143) }));
}

#[tokio::test(start_paused = true)]
async fn activity_keeps_the_workload_up_and_idle_stops_it() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = watching(&engine, container("web")).await;
    watcher.wake().await.unwrap();
    let download = watcher.activity();
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    assert!(watcher.is_ready(), "a ten-minute download keeps it up");
    drop(download);
    settle().await;
    tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
    settle().await;
    assert!(watcher.is_ready());
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Napping);
    assert_eq!(engine.calls(FakeOp::Stop), 1);
    assert!(!engine.state("web").unwrap().is_running());
}

#[tokio::test(start_paused = true)]
async fn pause_and_kill_are_honoured_and_a_paused_workload_is_unpaused() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("paused", FakeHealth::NoCheck);
    engine.add_container("killed", FakeHealth::NoCheck);
    let mut pause = container("paused");
    pause.stop = StopMethod::Pause;
    let mut kill = container("killed");
    kill.stop = StopMethod::Kill { signal: "SIGKILL".into() };
    let paused = watching(&engine, pause).await;
    let killed = watching(&engine, kill).await;
    paused.wake().await.unwrap();
    killed.wake().await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(engine.state("paused"), Some(ContainerState::Paused));
    assert_eq!(engine.state("killed"), Some(ContainerState::Exited { code: Some(137) }));
    paused.wake().await.unwrap();
    assert_eq!((engine.calls(FakeOp::Unpause), engine.calls(FakeOp::Start)), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn outside_starts_and_stops_are_seen_and_running_workloads_adopted() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    engine.start("web").await.unwrap();
    let watcher = watching(&engine, container("web")).await;
    assert!(watcher.is_ready(), "adopted at start-up");
    engine.stop("web", StopOptions::default()).await.unwrap();
    settle().await;
    assert_eq!(state(&watcher), IdleState::Napping, "seen from the event stream");
    engine.start("web").await.unwrap();
    settle().await;
    assert!(watcher.is_ready());
    // Adopted workloads count down like woken ones.
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Napping);
}

#[tokio::test(start_paused = true)]
async fn the_event_stream_reconnects_and_rereads_the_state() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = watching(&engine, container("web")).await;
    assert_eq!(engine.open_event_streams(), 1);
    let down = || RuntimeError::Unreachable { message: "down".into() };
    engine.fail(FakeOp::Events, down());
    engine.fail(FakeOp::Status, down());
    engine.break_event_streams();
    // Started while the stream is down: no event reaches the watcher.
    engine.start("web").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert!(!watcher.is_ready());
    let failed_opens = engine.calls(FakeOp::Events);
    assert!(failed_opens >= 3, "backs off and retries: {failed_opens}");
    engine.clear_failure(FakeOp::Events);
    engine.clear_failure(FakeOp::Status);
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    assert!(watcher.is_ready(), "re-read after the reconnect");
    assert_eq!(engine.open_event_streams(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_took_effect_but_lost_its_answer_is_not_taken_for_running() {
    // The engine is reached through something that can vanish (a docker-agent): the stop
    // lands, then the connection goes, taking the stop's confirmation and its events with it.
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = watching(&engine, container("web")).await;
    watcher.wake().await.unwrap();
    let gone = || RuntimeError::Unreachable { message: "agent went away".into() };
    engine.fail(FakeOp::Events, gone());
    engine.break_event_streams();
    engine.fail(FakeOp::Status, gone());
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(engine.calls(FakeOp::Stop), 1);
    assert!(!engine.state("web").unwrap().is_running(), "the stop landed");
    assert!(matches!(state(&watcher), IdleState::Error(WakeError::Stop { .. })), "{:?}", state(&watcher));

    // A request now: the watcher must not believe the workload is still up (its upstream is
    // gone); it asks for a start, which fails while the engine is unreachable.
    engine.fail(FakeOp::Start, gone());
    let error = watcher.wake().await.unwrap_err();
    assert!(matches!(error, WakeError::Start { source: RuntimeError::Unreachable { .. }, .. }), "{error:?}");
    assert!(!watcher.is_ready());

    // The engine back: the next wake starts it.
    engine.clear_failure(FakeOp::Start);
    engine.clear_failure(FakeOp::Status);
    engine.clear_failure(FakeOp::Events);
    watcher.wake().await.unwrap();
    assert!(engine.state("web").unwrap().is_running());
}

#[tokio::test(start_paused = true)]
async fn engine_failures_reach_the_waiters_and_the_next_wake_retries() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = watching(&engine, container("web")).await;
    engine.fail(FakeOp::Start, RuntimeError::Unreachable { message: "engine down".into() });
    let error = watcher.wake().await.unwrap_err();
    assert!(matches!(error, WakeError::Start { source: RuntimeError::Unreachable { .. }, .. }), "{error:?}");
    engine.clear_failure(FakeOp::Start);
    watcher.wake().await.unwrap();
    let missing = IdleWatcher::new(container("nope"), engine.clone()).unwrap();
    assert!(missing.start().await.is_err(), "an unknown workload cannot be watched");
    assert!(matches!(missing.wake().await, Err(WakeError::NotWatching { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_stop_waits_for_not_running_within_the_derived_deadline() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    engine.set_stop_latency(Duration::from_secs(8));
    let mut config = container("web");
    config.stop_timeout = Duration::from_secs(5);
    let watcher = watching(&engine, config).await;
    watcher.wake().await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Stopping);
    // 8 s is past the 5 s grace period but within its deadline (5 s + 10 s): not an error.
    tokio::time::sleep(Duration::from_secs(8)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Napping);
    // A wake during a stop starts again once the stop is done.
    watcher.wake().await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    let wake = tokio::spawn({
        let w = watcher.clone();
        async move { w.wake().await }
    });
    wake.await.unwrap().unwrap();
    assert_eq!(engine.calls(FakeOp::Start), 2 + 1);
}

#[tokio::test(start_paused = true)]
async fn a_service_is_scaled_to_zero_when_idle_and_back_on_a_wake() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_service("api", FakeHealth::HealthyAfter(Duration::from_secs(2)));
    let config = IdleConfig::new(Workload::Service { name: "api".into(), replicas: 2 }, IDLE);
    let watcher = watching(&engine, config).await;
    assert_eq!(state(&watcher), IdleState::Napping);
    watcher.wake().await.unwrap();
    assert_eq!(engine.replicas("api"), Some(ServiceStatus { desired: 2, running: 2 }));
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(engine.replicas("api"), Some(ServiceStatus { desired: 0, running: 0 }));
    assert_eq!(state(&watcher), IdleState::Napping);
    watcher.wake().await.unwrap();
    assert_eq!(engine.calls(FakeOp::Scale), 3);
}

#[tokio::test(start_paused = true)]
async fn tcp_readiness_waits_for_a_connect() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let mut config = container("web");
    config.readiness = Readiness {
        check: ReadinessCheck::Tcp { address: address.clone() },
        settle: Duration::from_millis(500),
        ..Readiness::default()
    };
    let watcher = watching(&engine, config).await;
    let wake = tokio::spawn({
        let w = watcher.clone();
        async move { w.wake().await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Starting, "running, but nothing listens yet");
    let _listener = tokio::net::TcpListener::bind(&address).await.unwrap();
    wake.await.unwrap().unwrap();
    assert!(watcher.is_ready());
}

#[tokio::test(start_paused = true)]
async fn lifecycle_start_stop_and_waiters_released() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(30)));
    let watcher = watching(&engine, container("web")).await;
    assert!(watcher.is_running());
    assert!(matches!(watcher.start().await, Err(pool_api::LifecycleError::AlreadyRunning { .. })));
    let waiter = tokio::spawn({
        let w = watcher.clone();
        async move { w.wake().await }
    });
    settle().await;
    let report = watcher.stop().await.unwrap();
    assert!(report.forced >= 1);
    assert!(matches!(waiter.await.unwrap(), Err(WakeError::NotWatching { .. })));
    assert!(!watcher.is_running());
    assert_eq!(*watcher.state().borrow(), pool_api::LifecycleState::Stopped);
    watcher.start().await.unwrap();
    assert!(watcher.uptime().is_some());
}

#[tokio::test(start_paused = true)]
async fn metrics_count_wakes_stops_and_states() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(1)));
    // The handles are bound to the recorder when the watcher is made.
    let mut config = container("web");
    config.metric_labels.insert("host".into(), "edge-1".into());
    let watcher =
        metrics::with_local_recorder(&recorder, || IdleWatcher::new(config, engine.clone()).unwrap());
    watcher.start().await.unwrap();
    watcher.wake().await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    settle().await;
    engine.start("web").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    engine.stop("web", StopOptions::default()).await.unwrap();
    settle().await;
    type Labels = Vec<(String, String)>;
    let values: Vec<(String, Labels, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();
    let find = |name: &str, label: Option<(&str, &str)>| {
        values
            .iter()
            .find(|(n, labels, _)| {
                n == name && label.is_none_or(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("{name} {label:?} missing from {values:#?}"))
    };
    assert_eq!(find("idlewatch_wakes_total", None), &DebugValue::Counter(1));
    assert_eq!(find("idlewatch_stops_total", Some(("reason", "idle"))), &DebugValue::Counter(1));
    assert_eq!(find("idlewatch_stops_total", Some(("reason", "external"))), &DebugValue::Counter(1));
    let DebugValue::Histogram(wakes) = find("idlewatch_wake_duration_seconds", Some(("outcome", "ready")))
    else {
        panic!("not a histogram")
    };
    // Ours, and the one started from outside (also timed from `starting` to `ready`).
    assert_eq!(wakes.len(), 2);
    assert!(wakes.iter().all(|w| (w.into_inner() - 1.0).abs() < 0.01), "{wakes:?}");
    assert_eq!(find("idlewatch_state", Some(("state", "napping"))), &DebugValue::Gauge(1.0.into()));
    assert_eq!(find("idlewatch_state", Some(("state", "ready"))), &DebugValue::Gauge(0.0.into()));
    assert_eq!(find("idlewatch_waiters", None), &DebugValue::Gauge(0.0.into()));
    // Every series carries the configured labels beside its own.
    for (name, labels, _) in &values {
        let has = |k: &str, v: &str| labels.iter().any(|(lk, lv)| lk == k && lv == v);
        assert!(has("workload", "web") && has("host", "edge-1"), "{name} {labels:?}");
    }
}

fn dependent(name: &str, idle: Duration, deps: &[(&str, idlewatch::DependencyCondition)]) -> IdleConfig {
    let mut config = IdleConfig::new(Workload::Container(name.into()), idle);
    config.wake_timeout = Duration::from_secs(20);
    config.depends_on = deps
        .iter()
        .map(|(d, condition)| idlewatch::Dependency {
            workload: (*d).into(),
            condition: *condition,
            optional: false,
        })
        .collect();
    config
}

#[tokio::test(start_paused = true)]
async fn a_shared_dependency_starts_first_once_and_stops_after_its_last_dependent() {
    use idlewatch::DependencyCondition::{Healthy, Started};

    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("db", FakeHealth::HealthyAfter(Duration::from_secs(2)));
    engine.add_container("a", FakeHealth::NoCheck);
    engine.add_container("b", FakeHealth::NoCheck);
    let configs = vec![
        dependent("a", Duration::from_secs(30), &[("db", Healthy)]),
        dependent("b", Duration::from_secs(90), &[("db", Started)]),
        dependent("db", Duration::from_secs(10), &[]),
    ];
    let group = idlewatch::IdleGroup::new(configs, engine.clone()).unwrap();
    group.start().await.unwrap();
    let (a, b, db) = (group.get("a").unwrap(), group.get("b").unwrap(), group.get("db").unwrap());
    let begun = Instant::now();
    let (ra, rb) = tokio::join!(a.wake(), b.wake());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(begun.elapsed(), Duration::from_secs(2), "a waited for db to be healthy");
    assert_eq!(engine.calls(FakeOp::Start), 3, "db started once for both");
    assert!(db.is_ready());
    assert_eq!(db.active(), 2, "one unit per awake dependent");
    // a sleeps after 30 s; b still runs, so db stays up well past its own 10 s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(state(a), IdleState::Napping);
    assert!(db.is_ready() && b.is_ready());
    assert_eq!(db.active(), 1);
    // b sleeps at 92 s; db follows 10 s later.
    tokio::time::sleep(Duration::from_secs(35)).await;
    settle().await;
    assert_eq!(state(b), IdleState::Napping);
    assert!(db.is_ready(), "db counts down only now");
    tokio::time::sleep(Duration::from_secs(11)).await;
    settle().await;
    assert_eq!(state(db), IdleState::Napping);
    group.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_dependency_fails_its_dependent_and_cycles_are_refused() {
    use idlewatch::DependencyCondition::Healthy;

    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("db", FakeHealth::NeverHealthy(Duration::from_secs(1)));
    engine.add_container("app", FakeHealth::NoCheck);
    let mut db = dependent("db", IDLE, &[]);
    db.wake_timeout = Duration::from_secs(3);
    let group =
        idlewatch::IdleGroup::new(vec![dependent("app", IDLE, &[("db", Healthy)]), db], engine.clone())
            .unwrap();
    group.start().await.unwrap();
    let error = group.get("app").unwrap().wake().await.unwrap_err();
    assert!(matches!(&error, WakeError::Dependency { dependency, .. } if dependency == "db"), "{error:?}");
    assert_eq!(engine.state("app"), Some(ContainerState::Exited { code: Some(0) }), "app never started");

    let cycle = vec![
        dependent("x", IDLE, &[("y", Healthy)]),
        dependent("y", IDLE, &[("x", Healthy)]),
        dependent("z", Duration::ZERO, &[]),
    ];
    let problems = idlewatch::IdleGroup::new(cycle, engine.clone()).unwrap_err().problems;
    assert_eq!(problems, ["z: idle_timeout must be greater than zero", "dependency cycle: x → y → x"]);
    let standalone = IdleWatcher::new(dependent("app", IDLE, &[("db", Healthy)]), engine);
    assert!(standalone.is_err(), "dependencies need a group");
}

#[tokio::test(start_paused = true)]
async fn the_countdown_restarts_from_the_end_of_the_last_request() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = watching(&engine, container("web")).await;
    watcher.wake().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let request = watcher.activity();
    tokio::time::sleep(Duration::from_secs(20)).await;
    drop(request);
    // 60 s after the wake, but only 10 s after the request ended: still up.
    tokio::time::sleep(Duration::from_secs(15)).await;
    settle().await;
    assert!(watcher.is_ready());
    // 60 s after the request ended: asleep.
    tokio::time::sleep(Duration::from_secs(46)).await;
    settle().await;
    assert_eq!(state(&watcher), IdleState::Napping);
}

#[tokio::test(start_paused = true)]
async fn an_optional_dependency_that_fails_does_not_fail_its_dependent() {
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("metrics", FakeHealth::NeverHealthy(Duration::from_millis(100)));
    engine.add_container("app", FakeHealth::NoCheck);
    let mut app = dependent("app", IDLE, &[]);
    app.depends_on = vec![idlewatch::Dependency {
        workload: "metrics".into(),
        condition: idlewatch::DependencyCondition::Healthy,
        optional: true,
    }];
    let mut metrics = dependent("metrics", IDLE, &[]);
    metrics.wake_timeout = Duration::from_secs(2);
    let group = idlewatch::IdleGroup::new(vec![app, metrics], engine.clone()).unwrap();
    group.start().await.unwrap();
    let begun = Instant::now();
    group.get("app").unwrap().wake().await.unwrap();
    assert_eq!(begun.elapsed(), Duration::from_secs(2), "waited for it, within its own wake time-out");
    assert!(matches!(state(group.get("metrics").unwrap()), IdleState::Error(WakeError::Timeout { .. })));
}
