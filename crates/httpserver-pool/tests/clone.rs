//! `Pool::clone` gives another handle to the same pool: every method called through a clone acts
//! on the servers, defaults, policy and state the original sees. `Pool::duplicate` is the way to
//! get a separate pool.

mod support;

use std::ops::ControlFlow;
use std::time::Duration;

use http::StatusCode;
use httpserver_pool::{Field, HttpServerConfig, Pattern, Pool, ServerPoolConfig, StartPolicy};
use pool_api::{Lifecycle, LifecycleState};
use support::*;

/// Runs a synchronous pool call on a thread of its own with a generous deadline, so that a
/// deadlock fails the test instead of hanging it (a plain thread: the runtime would wait for a
/// blocking task at its shutdown).
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what} did not return ({e}): deadlock?"))
}

#[tokio::test]
async fn stopping_a_clone_stops_the_pool_and_reports_its_drain() {
    let pool = Pool::new();
    let a = pool.store_config(config("a", hello("a"))).unwrap();
    pool.start().await.unwrap();
    // One idle keep-alive connection, for the stop to drain.
    let c = client();
    assert_eq!(get(&c, &format!("http://{}/", a.bind())).await.unwrap().0, StatusCode::OK);
    assert_eq!(a.snapshot().counters.active, 1);

    let report = pool.clone().stop().await.unwrap();
    assert_eq!((report.drained, report.forced), (1, 0), "{report:?}");
    assert!(!a.is_running(), "the original's server stopped");
    assert!(!pool.is_running());
    assert_eq!(*pool.state().borrow(), LifecycleState::Stopped);
    assert!(
        tokio::net::TcpStream::connect(a.bind()).await.is_err(),
        "nothing listens on the address any more"
    );
}

#[tokio::test]
async fn every_method_through_a_clone_acts_on_the_one_pool() {
    let pool = Pool::new();
    let clone = pool.clone();

    // Defaults and storage.
    clone.set_default_handler(hello("default"));
    let a = pool.store_config(HttpServerConfig::new("api-a", free_addr())).unwrap();
    let b = clone.store_config(HttpServerConfig::new("api-b", free_addr())).unwrap();
    assert_eq!((pool.len(), clone.len()), (2, 2));
    assert!(pool.has(b.bind()) && clone.has(a.bind()));
    assert!(pool.load(b.bind()).is_some() && clone.load(a.bind()).is_some());

    // Selection, listing, walking and monitoring see the same servers.
    let glob = Pattern::glob("api-*").unwrap();
    assert_eq!(clone.filter(Field::Name, &glob).len(), 2);
    assert_eq!(clone.list(Field::Name, &glob, Field::Name), pool.list(Field::Name, &glob, Field::Name));
    let mut walked = 0;
    clone.walk(|_| {
        walked += 1;
        ControlFlow::Continue(())
    });
    assert_eq!(walked, 2);

    // Lifecycle: a start through one handle is seen through the other, state and uptime included.
    let states = pool.state();
    clone.start().await.unwrap();
    assert!(a.is_running() && b.is_running() && pool.is_running());
    assert!(states.has_changed().unwrap(), "the original's state receiver saw the clone's start");
    assert_eq!(*pool.state().borrow(), LifecycleState::Running);
    assert!(pool.uptime().is_some());
    assert!(pool.monitor().iter().all(|s| s.healthy));
    let (status, body) = get(&client(), &format!("http://{}/", b.bind())).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "default"));

    // Apply through the clone: the original serves the new configuration.
    let mut changed = pool.load(a.bind()).unwrap().config();
    changed.handler = Some(hello("v2"));
    let report = clone.apply(&ServerPoolConfig { servers: vec![changed] }).await.unwrap();
    assert_eq!((report.swapped, report.removed), (vec![a.bind()], vec![b.bind()]), "b was left out");
    assert_eq!(pool.len(), 1);
    let (_, body) = get(&client(), &format!("http://{}/", a.bind())).await.unwrap();
    assert_eq!(body, "v2");

    // Removing through the original is seen by the clone.
    pool.delete(a.bind()).await.unwrap();
    assert!(clone.is_empty());
    assert!(!a.is_running());
    clone.stop().await.unwrap();
    assert_eq!(*pool.state().borrow(), LifecycleState::Stopped);
}

#[tokio::test]
async fn the_start_policy_is_shared_by_clones() {
    let pool = Pool::new();
    let clone = pool.clone().with_start_policy(StartPolicy::BestEffort);
    let good = pool.store_config(config("good", hello("g"))).unwrap();
    // A second server on an address something else already holds: it cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    pool.store_config(
        HttpServerConfig::new("bad", taken.local_addr().unwrap().to_string()).with_handler(hello("b")),
    )
    .unwrap();
    assert!(pool.start().await.is_err());
    assert!(good.is_running(), "best effort, set through a clone, keeps what started");
    clone.stop().await.unwrap();
}

#[tokio::test]
async fn merging_a_pool_with_its_clone_changes_nothing_and_does_not_deadlock() {
    let pool = Pool::new();
    pool.store_config(config("a", hello("a"))).unwrap();
    let (p, clone) = (pool.clone(), pool.clone());
    within_deadline("merge with a clone", move || p.merge(&clone)).unwrap();
    assert_eq!(pool.len(), 1);
    let (p, clone) = (pool.clone(), pool.clone());
    within_deadline("merge of a clone into the pool", move || clone.merge(&p)).unwrap();
    assert_eq!(pool.len(), 1);
}

#[tokio::test]
async fn duplicate_makes_a_separate_stopped_pool_with_the_same_settings() {
    let pool = Pool::new().with_start_policy(StartPolicy::BestEffort);
    pool.set_default_handler(hello("default"));
    let a = pool.store_config(HttpServerConfig::new("a", free_addr())).unwrap();
    pool.start().await.unwrap();

    let copy = pool.duplicate();
    assert_eq!(copy.start_policy(), StartPolicy::BestEffort);
    assert!(!copy.is_running(), "the duplicate's servers are new and stopped");
    assert_eq!(*copy.state().borrow(), LifecycleState::Stopped);
    let a2 = copy.load(a.bind()).unwrap();
    assert_eq!(a2.config(), a.config(), "built from the same configuration");
    assert_eq!(a2.snapshot().counters.accepted, 0);

    // Changes to one are not seen by the other; the default handler was copied.
    let b = copy.store_config(HttpServerConfig::new("b", free_addr())).unwrap();
    assert!(!pool.has(b.bind()));
    copy.set_start_policy(StartPolicy::AllOrNothing);
    assert_eq!(pool.start_policy(), StartPolicy::BestEffort);

    // The duplicate takes over once the original has stopped.
    pool.stop().await.unwrap();
    copy.start().await.unwrap();
    let (_, body) = get(&client(), &format!("http://{}/", b.bind())).await.unwrap();
    assert_eq!(body, "default");
    assert!(a2.is_running() && !a.is_running());
    copy.stop().await.unwrap();
}

#[test]
fn merges_in_opposite_directions_at_once_do_not_deadlock() {
    // Each pool holds a server on the address of one in the other, so every merge is refused
    // and both keep their servers: the two threads can go on merging against each other.
    let (x, y) = (Pool::new(), Pool::new());
    let (first, second) = (free_addr(), free_addr());
    for (pool, name) in [(&x, "x"), (&y, "y")] {
        pool.store_config(HttpServerConfig::new(name, &first).with_handler(hello(name))).unwrap();
        pool.store_config(HttpServerConfig::new(name, &second).with_handler(hello(name))).unwrap();
    }
    let run = |a: Pool, b: Pool| {
        move || {
            for _ in 0..20_000 {
                assert!(a.merge(&b).is_err());
            }
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for (a, b) in [(x.clone(), y.clone()), (y.clone(), x.clone())] {
        let (tx, work) = (tx.clone(), run(a, b));
        std::thread::spawn(move || {
            work();
            tx.send(())
        });
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(20)).expect("both merge loops finish (no deadlock)");
    }
    assert_eq!((x.len(), y.len()), (2, 2));
}
