//! `ready_path`: the cost of the layer on a ready workload against the bare service (target
//! ≤ 100 ns per request). `wake_detection`: from the engine's `health_status: healthy` event to
//! every waiter released (target ≤ 50 ms), on the scripted engine.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use idlewatch::{IdleConfig, IdleLayer, IdleLayerOptions, IdleState, IdleWatcher, Workload};
use pool_api::{ContainerHealth, ContainerRuntime, Lifecycle};
use test_support::{FakeHealth, FakeRuntime};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The cheapest service there is: answers at once, allocates nothing.
#[derive(Clone)]
struct Bare;

impl Service<Request<()>> for Bare {
    type Response = Response<http_body_util::Empty<bytes::Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(http_body_util::Empty::new())))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn ready_path(c: &mut Criterion) {
    let rt = runtime();
    let engine = Arc::new(FakeRuntime::new());
    engine.add_container("web", FakeHealth::NoCheck);
    let watcher = rt.block_on(async {
        engine.start("web").await.unwrap();
        let config = IdleConfig::new(Workload::Container("web".into()), Duration::from_secs(3600));
        let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
        watcher.start().await.unwrap();
        watcher
    });
    assert!(watcher.is_ready());
    let mut group = c.benchmark_group("ready_path");
    group.bench_function("bare", |b| {
        let mut service = Bare;
        b.iter(|| service.call(Request::new(())).now_or_never().unwrap().unwrap())
    });
    group.bench_function("idle_layer", |b| {
        let mut service = IdleLayer::new(watcher.clone(), IdleLayerOptions::default()).layer(Bare);
        b.iter(|| service.call(Request::new(())).now_or_never().unwrap().unwrap())
    });
    group.finish();
    rt.block_on(watcher.stop()).unwrap();
}

fn wake_detection(c: &mut Criterion) {
    let rt = runtime();
    c.bench_function("wake_detection/healthy_event_to_10_waiters_released", |b| {
        b.iter_custom(|iterations| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let engine = Arc::new(FakeRuntime::new());
                    // Starting for an hour unless the bench flips it.
                    engine.add_container("web", FakeHealth::HealthyAfter(Duration::from_secs(3600)));
                    let config =
                        IdleConfig::new(Workload::Container("web".into()), Duration::from_secs(3600));
                    let watcher = IdleWatcher::new(config, engine.clone()).unwrap();
                    watcher.start().await.unwrap();
                    let waiters: Vec<_> = (0..10)
                        .map(|_| {
                            let w = watcher.clone();
                            tokio::spawn(async move { w.wake().await })
                        })
                        .collect();
                    let mut states = watcher.subscribe();
                    states.wait_for(|s| s.state == IdleState::Starting && s.running).await.unwrap();
                    let flipped = Instant::now();
                    engine.set_container_health("web", ContainerHealth::Healthy);
                    for waiter in waiters {
                        waiter.await.unwrap().unwrap();
                    }
                    total += flipped.elapsed();
                    watcher.stop().await.unwrap();
                }
                total
            })
        })
    });
}

criterion_group!(benches, ready_path, wake_detection);
criterion_main!(benches);
