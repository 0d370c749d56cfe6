//! Worker threads as a thread-per-core proxy runs them, for tests of connection placement:
//! each thread runs a single-threaded runtime (I/O and time enabled) and is marked as worker
//! `i` ([`pool_api::set_worker_index`]).

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Starts `n` worker threads; returns their runtimes' handles and, for each, what stops it:
/// worker `i` ends (its runtime and every task on it dropped) when `stops[i]` is dropped or
/// sent to.
pub fn worker_runtimes(n: usize) -> (Vec<Handle>, Vec<oneshot::Sender<()>>) {
    let (mut handles, mut stops) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a worker's runtime");
            pool_api::set_worker_index(Some(i));
            tx.send(runtime.handle().clone()).expect("the caller waits for the handle");
            let _ = runtime.block_on(stopped);
        });
        handles.push(rx.recv().expect("the worker thread started"));
        stops.push(stop);
    }
    (handles, stops)
}

/// An agent for placement tests: allows every request but one for `/slow`, which it holds for
/// an hour (a request left waiting).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowButHoldSlow;

impl pool_api::AgentHandler for AllowButHoldSlow {
    fn capabilities(&self) -> pool_api::Capabilities {
        pool_api::Capabilities::new("allow").with_events([pool_api::EventKind::RequestHeaders])
    }

    async fn on_event(&self, event: pool_api::Event) -> Result<pool_api::Decision, pool_api::AgentError> {
        if let pool_api::Event::RequestHeaders(r) = &event
            && r.uri.path() == "/slow"
        {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        Ok(pool_api::Decision::allow())
    }
}

/// What a transport must do when a worker thread stops, checked on two connections to an
/// [`AllowButHoldSlow`] agent made by a connector spread over `worker_runtimes(2)`: `on_zero`
/// on worker 0, `on_one` on worker 1; `stops` are that call's. A request waiting on worker 0's
/// connection fails as soon as worker 0 stops (not at a deadline: it has none) with `Closed`
/// ("the connection's runtime stopped"), the connection says it is closed and refuses more;
/// worker 1's connection keeps answering.
pub async fn check_a_stopped_worker_closes_its_connections(
    on_zero: std::sync::Arc<dyn pool_api::AgentConnection>,
    on_one: std::sync::Arc<dyn pool_api::AgentConnection>,
    mut stops: Vec<oneshot::Sender<()>>,
) {
    use pool_api::{Action, Event, RequestHeaders, TransportError};
    use std::time::Duration;
    assert_eq!((on_zero.home(), on_one.home()), (Some(0), Some(1)));
    let request = |path: &'static str| {
        Event::RequestHeaders(RequestHeaders::new(path, http::Method::GET, http::Uri::from_static(path)))
    };

    // A request waits on worker 0's connection; then worker 0 stops.
    let waiting = on_zero.send(&request("/slow"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stops.remove(0));
    // The waiting request fails as soon as the connection's tasks are gone, and says why.
    let failed = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting request fails once its worker stops");
    match failed {
        Err(TransportError::Closed { reason, .. }) => {
            assert_eq!(reason, "the connection's runtime stopped");
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(!on_zero.is_open());
    assert!(matches!(on_zero.send(&request("/after")).await, Err(TransportError::Closed { .. })));

    // Worker 1's connection is untouched.
    assert!(on_one.is_open());
    let decision = tokio::time::timeout(Duration::from_secs(10), on_one.send(&request("/still")))
        .await
        .expect("worker 1 answers")
        .unwrap();
    assert!(matches!(decision.action, Action::Allow));
}
