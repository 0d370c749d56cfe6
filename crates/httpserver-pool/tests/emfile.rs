//! Accept errors from file-descriptor exhaustion back off instead of spinning, and the server
//! recovers once descriptors are free again.
//!
//! This binary holds one test because it lowers `RLIMIT_NOFILE` for its whole process.
#![cfg(unix)]

mod support;

use std::time::Duration;

use httpserver_pool::Server;
use pool_api::Lifecycle;
use rlimit::Resource;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const EMFILE: i32 = 24;

/// Opens files until the process runs out of descriptors.
fn exhaust_descriptors() -> Vec<std::fs::File> {
    let mut hogs = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hogs.push(f),
            Err(e) if e.raw_os_error() == Some(EMFILE) => return hogs,
            Err(e) => panic!("unexpected error while exhausting descriptors: {e}"),
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn emfile_on_accept_backs_off_without_spinning_and_recovers() {
    let server = Server::new(config("emfile", hello("ok"))).unwrap();
    server.start().await.unwrap();
    // Connected before descriptors run out: the kernel completes the handshake into the backlog
    // while the server cannot accept it.
    let mut waiting = tokio::net::TcpStream::connect(server.bind()).await.unwrap();

    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    rlimit::setrlimit(Resource::NOFILE, 256.min(soft), hard).unwrap();
    let hogs = exhaust_descriptors();

    wait_for("a first accept error", Duration::from_secs(30), || {
        server.snapshot().counters.accept_errors > 0
    })
    .await;
    let first = server.snapshot().counters.accept_errors;
    // Over two seconds the backoff (10 ms doubling to 1 s) allows about eight attempts; a loop
    // that retried at once would fail hundreds of thousands of times.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = server.snapshot().counters.accept_errors - first;
    assert!(during <= 20, "{during} accept errors in 2 s: the accept loop spins");
    assert_eq!(server.snapshot().counters.accepted, 0);
    assert!(server.is_running());

    drop(hogs);
    rlimit::setrlimit(Resource::NOFILE, soft, hard).unwrap();
    // The next retry (at most a second away) accepts the waiting connection.
    wait_for("the waiting connection to be accepted", Duration::from_secs(30), || {
        server.snapshot().counters.accepted == 1
    })
    .await;
    waiting.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), waiting.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");

    // And new connections are served as usual.
    let (status, body) = get(&client(), &format!("http://{}/", server.bind())).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
    let report = server.stop().await.unwrap();
    assert_eq!(report.forced, 0);
}
