//! Reverse connections over real sockets: agents dial the proxy's listener and register, and
//! pool-core uses the connection like any other.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Uri};
use pool_api::{AgentError, AgentHandler, Capabilities, Decision, Event, EventKind, RequestHeaders};
use pool_core::{AgentPool, PoolConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use transport_uds::{
    Reconnect, ReverseAgent, ReverseAgentConfig, ReverseError, ReverseListener, ReverseListenerConfig,
    UdsConnector,
};

fn request(id: &str) -> Event {
    Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static("/")))
}

struct Named(&'static str);

impl AgentHandler for Named {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("reverse-waf").with_events([EventKind::RequestHeaders]).with_max_concurrency(16)
    }

    async fn on_event(&self, event: Event) -> Result<Decision, AgentError> {
        Ok(Decision::allow().with_reason(format!("{}:{}", self.0, event.correlation_id())))
    }
}

fn pool() -> AgentPool {
    let mut config = PoolConfig::default();
    config.reverse.tokens = vec!["s3cret".into()];
    AgentPool::new(config, UdsConnector::default()).unwrap()
}

/// A listener feeding `pool`; dropping the sender stops it.
async fn listen(
    path: &std::path::Path,
    pool: &AgentPool,
    config: ReverseListenerConfig,
) -> oneshot::Sender<()> {
    let listener = ReverseListener::bind(path, config).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let pool = pool.clone();
    tokio::spawn(listener.serve(
        move |registration| {
            pool.add_reverse_connection(pool_core::ReverseRegistration {
                agent_id: registration.agent_id,
                replica_id: registration.replica_id,
                token: registration.token,
                connection: registration.connection,
            })
            .map_err(|e| e.to_string())
        },
        async move {
            let _ = stopped.await;
        },
    ));
    stop
}

fn agent_config(path: &std::path::Path, replica: &str, token: &str) -> ReverseAgentConfig {
    let mut config =
        ReverseAgentConfig::new(format!("unix:{}", path.display()), "waf", replica).with_token(token);
    config.reconnect =
        Reconnect { min_delay: Duration::from_millis(10), max_delay: Duration::from_millis(100) };
    config
}

/// Runs an agent until the returned sender is dropped; the join handle gives its outcome.
fn run_agent(
    config: ReverseAgentConfig,
    name: &'static str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), ReverseError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ReverseAgent::new(config).run(Named(name), async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

async fn wait_connected(pool: &AgentPool, agent: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let connected = pool.agent_stats(agent).map(|s| s.totals.connected).unwrap_or(0);
        if connected == n {
            return;
        }
        assert!(Instant::now() < deadline, "{agent}: {connected} connections, expected {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_agent_serves_the_pool_and_comes_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let pool = pool();
    let _listener = listen(&path, &pool, ReverseListenerConfig::default()).await;

    let (stop_a, task_a) = run_agent(agent_config(&path, "a", "s3cret"), "a");
    let (_stop_b, _task_b) = run_agent(agent_config(&path, "b", "s3cret"), "b");
    wait_connected(&pool, "waf", 2).await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..100 {
        let id = format!("r{i}");
        let decision = pool.send("waf", &request(&id)).await.unwrap();
        let reason = decision.audit.reason.unwrap();
        let (replica, echoed) = reason.split_once(':').unwrap();
        assert_eq!(echoed, id, "every answer belongs to its own request");
        seen.insert(replica.to_owned());
    }
    assert_eq!(seen.len(), 2, "both replicas served: {seen:?}");

    // Replica a goes away: its connection is removed, the other keeps serving.
    drop(stop_a);
    assert!(task_a.await.unwrap().is_ok());
    wait_connected(&pool, "waf", 1).await;
    for i in 0..20 {
        let reason = pool.send("waf", &request(&format!("x{i}"))).await.unwrap().audit.reason.unwrap();
        assert!(reason.starts_with("b:"), "{reason}");
    }

    // It restarts and registers again.
    let (_stop_a, _task_a) = run_agent(agent_config(&path, "a", "s3cret"), "a");
    wait_connected(&pool, "waf", 2).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_dials_again_when_the_proxy_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let first = pool();
    let stop = listen(&path, &first, ReverseListenerConfig::default()).await;
    let (_stop, _task) = run_agent(agent_config(&path, "a", "s3cret"), "a");
    wait_connected(&first, "waf", 1).await;

    // The proxy goes away (listener and pool), then a new one starts on the same path.
    drop(stop);
    first.shutdown().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = pool();
    let _listener = listen(&path, &second, ReverseListenerConfig::default()).await;
    wait_connected(&second, "waf", 1).await;
    assert!(second.send("waf", &request("again")).await.unwrap().is_allow());
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_and_the_agent_stops_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let pool = pool();
    let _listener = listen(&path, &pool, ReverseListenerConfig::default()).await;
    let (_stop, task) = run_agent(agent_config(&path, "a", "wrong"), "a");
    let err = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap_err();
    let ReverseError::Refused { message, agent_id, .. } = &err else { panic!("{err:?}") };
    assert_eq!(agent_id, "waf");
    assert!(message.contains("invalid token"), "{message}");
    // Nothing was kept by the pool.
    assert_eq!(pool.agent_stats("waf").map(|s| s.totals.connected).unwrap_or(0), 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_version_is_refused_with_the_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let pool = pool();
    let config = ReverseListenerConfig { supported_versions: vec![99], ..ReverseListenerConfig::default() };
    let _listener = listen(&path, &pool, config).await;
    let (_stop, task) = run_agent(agent_config(&path, "a", "s3cret"), "a");
    let err = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap_err();
    assert!(err.to_string().contains("protocol version 1 is not supported"), "{err}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_garbled_dialer_is_dropped_and_others_still_register() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let pool = pool();
    let config = ReverseListenerConfig {
        register_timeout: Duration::from_millis(200),
        ..ReverseListenerConfig::default()
    };
    let _listener = listen(&path, &pool, config).await;

    // Connects and says nothing: closed after the registration time-out.
    let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
    // Sends garbage: closed at once.
    let mut garbled = tokio::net::UnixStream::connect(&path).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbled, &[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();

    let (_stop, _task) = run_agent(agent_config(&path, "a", "s3cret"), "a");
    wait_connected(&pool, "waf", 1).await;
    assert!(pool.send("waf", &request("ok")).await.unwrap().is_allow());

    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), garbled.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0))), "the garbled dialer is closed without an answer: {read:?}");
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0))), "the silent dialer is closed without an answer: {read:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_signals_travel_over_a_reverse_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = ReverseListener::bind(&path, ReverseListenerConfig::default()).await.unwrap();
    let sink = seen.clone();
    tokio::spawn(listener.serve(
        move |registration| {
            sink.lock().unwrap().push(registration.connection);
            Ok(())
        },
        std::future::pending(),
    ));
    let agent = ReverseAgent::new(agent_config(&path, "a", "any"));
    let handle = agent.handle();
    tokio::spawn(agent.run(Named("a"), std::future::pending()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let connection = loop {
        if let Some(c) = seen.lock().unwrap().first().cloned() {
            break c;
        }
        assert!(Instant::now() < deadline, "never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(connection.capabilities().name, "reverse-waf");
    assert!(connection.send(&request("direct")).await.unwrap().is_allow());
    let mut signals = connection.signals();
    while handle.connection_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.flow_control(pool_api::FlowControl::Pause);
    tokio::time::timeout(Duration::from_secs(10), signals.wait_for(|s| s.flow.paused))
        .await
        .unwrap()
        .unwrap();
    connection.close();
}
