//! The per-server counters reach the `metrics` facade with the right names, labels and values.
//!
//! This binary holds one test because it installs the process-wide recorder.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use httpserver_pool::{Handler, Server, full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pool_api::Lifecycle;
use support::*;

/// Accumulates the recorder's snapshots into totals per metric name (a debugging snapshot resets
/// counters and gauges to zero, so each one holds the change since the last), keeping only the
/// series labelled with this server's `server` and `bind`.
struct Seen {
    snapshotter: Snapshotter,
    server: String,
    bind: String,
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
}

impl Seen {
    fn refresh(&mut self) -> &mut Self {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: HashMap<&str, &str> = key.labels().map(|l| (l.key(), l.value())).collect();
            if labels.get("server") != Some(&self.server.as_str())
                || labels.get("bind") != Some(&self.bind.as_str())
            {
                continue;
            }
            match value {
                DebugValue::Counter(n) => *self.counters.entry(key.name().to_owned()).or_default() += n,
                DebugValue::Gauge(g) => {
                    *self.gauges.entry(key.name().to_owned()).or_default() += g.into_inner()
                }
                DebugValue::Histogram(_) => {}
            }
        }
        self
    }

    fn counter(&self, name: &str) -> u64 {
        *self.counters.get(name).unwrap_or_else(|| panic!("counter {name} not emitted: {:?}", self.counters))
    }

    fn gauge(&self, name: &str) -> f64 {
        *self.gauges.get(name).unwrap_or_else(|| panic!("gauge {name} not emitted: {:?}", self.gauges))
    }
}

async fn open(addr: std::net::SocketAddr) -> SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send
}

fn request(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path).header(http::header::HOST, "x").body(Empty::new()).unwrap()
}

#[tokio::test]
async fn counters_are_emitted_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // "/slow" never answers on its own; anything else answers at once.
    let handler = Handler::from_fn(|req: Request<_>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Response::new(full("ok"))
    });
    let server = Server::new(config("metered", handler)).unwrap();
    let mut seen = Seen {
        snapshotter,
        server: "metered".into(),
        bind: server.bind().to_string(),
        counters: HashMap::new(),
        gauges: HashMap::new(),
    };
    server.start().await.unwrap();

    // One keep-alive connection with three requests, left open and idle.
    let mut idle = open(server.bind()).await;
    for _ in 0..3 {
        let resp = idle.send_request(request("/")).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
    // A second connection with a request in flight.
    let mut busy = open(server.bind()).await;
    let in_flight = tokio::spawn(busy.send_request(request("/slow")));
    wait_until(|| server.snapshot().counters.requests == 4).await;

    seen.refresh();
    assert_eq!(seen.counter("httpserver_pool_connections_accepted_total"), 2);
    assert_eq!(seen.gauge("httpserver_pool_connections_active"), 2.0);
    assert_eq!(seen.counter("httpserver_pool_requests_total"), 4);
    assert_eq!(seen.counter("httpserver_pool_connections_drained_total"), 0);
    assert_eq!(seen.counter("httpserver_pool_connections_forced_total"), 0);
    assert_eq!(seen.counter("httpserver_pool_accept_errors_total"), 0);

    // The idle connection drains; the busy one is cut off at the deadline.
    let report = server.stop_within(Duration::from_millis(300)).await.unwrap();
    assert_eq!((report.drained, report.forced), (1, 1));
    assert!(in_flight.await.unwrap().is_err());
    drop(idle);

    seen.refresh();
    assert_eq!(seen.counter("httpserver_pool_connections_accepted_total"), 2);
    assert_eq!(seen.gauge("httpserver_pool_connections_active"), 0.0);
    assert_eq!(seen.counter("httpserver_pool_requests_total"), 4);
    assert_eq!(seen.counter("httpserver_pool_connections_drained_total"), 1);
    assert_eq!(seen.counter("httpserver_pool_connections_forced_total"), 1);
    assert_eq!(seen.counter("httpserver_pool_accept_errors_total"), 0);

    // The snapshot API agrees with the facade.
    let snap = server.snapshot().counters;
    assert_eq!(
        (snap.accepted, snap.active, snap.requests, snap.drained, snap.forced, snap.accept_errors),
        (2, 0, 4, 1, 1, 0)
    );
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition not reached in 30 s");
}
