//! One server, through the `Lifecycle` trait, with real sockets and a real client.

mod support;

use std::io::ErrorKind;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use httpserver_pool::{Handler, HttpServerConfig, PemSource, Server, ShutdownSignal, TlsConfig, full};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use pool_api::{Lifecycle, LifecycleError, LifecycleState};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn url(server: &Server, path: &str) -> String {
    format!("http://{}{path}", server.bind())
}

#[tokio::test]
async fn start_binds_for_real_and_the_server_answers() {
    let server = Server::new(config("api", hello("hi"))).unwrap();
    let mut state = server.state();
    assert_eq!(*state.borrow_and_update(), LifecycleState::Stopped);
    server.start().await.unwrap();
    assert!(server.is_running());
    assert!(server.uptime().is_some());
    assert_eq!(*state.borrow_and_update(), LifecycleState::Running);
    assert_eq!(get(&client(), &url(&server, "/")).await.unwrap(), (StatusCode::OK, "hi".into()));
    assert!(matches!(server.start().await, Err(LifecycleError::AlreadyRunning { .. })));
    let report = server.stop().await.unwrap();
    assert_eq!(report.forced, 0);
    assert!(!server.is_running());
    assert_eq!(server.uptime(), None);
    assert_eq!(*state.borrow_and_update(), LifecycleState::Stopped);
    assert!(get(&client(), &url(&server, "/")).await.is_err(), "a stopped server refuses connections");
}

#[tokio::test]
async fn a_handler_finds_the_client_address_in_the_request() {
    let handler = Handler::from_fn(|req: http::Request<httpserver_pool::RequestBody>| async move {
        let addr = req.extensions().get::<httpserver_pool::ClientAddr>().map(|c| c.0.ip().to_string());
        http::Response::new(httpserver_pool::full(addr.unwrap_or_default()))
    });
    let server = Server::new(config("peer", handler)).unwrap();
    server.start().await.unwrap();
    assert_eq!(get(&client(), &url(&server, "/")).await.unwrap(), (StatusCode::OK, "127.0.0.1".into()));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn start_on_a_taken_port_fails_with_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = HttpServerConfig::new("late", taken.local_addr().unwrap().to_string()).with_handler(hello("x"));
    let server = Server::new(cfg).unwrap();
    match server.start().await {
        Err(LifecycleError::Start { kind, message, .. }) => {
            assert_eq!(kind, Some(ErrorKind::AddrInUse));
            assert!(message.contains(&taken.local_addr().unwrap().to_string()), "{message}");
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    assert!(matches!(*server.state().borrow(), LifecycleState::Failed(_)));
}

#[tokio::test]
async fn a_privileged_port_reports_permission_denied_when_the_os_refuses_it() {
    // Root may bind port 1; then the server must start. Otherwise it must say why it could not.
    let os_allows = std::net::TcpListener::bind("127.0.0.1:1").map(drop);
    let server = Server::new(HttpServerConfig::new("low", "127.0.0.1:1").with_handler(hello("x"))).unwrap();
    match (os_allows, server.start().await) {
        (Ok(()), Ok(())) => {
            server.stop().await.unwrap();
        }
        (Err(os), Err(LifecycleError::Start { kind, .. })) => assert_eq!(kind, Some(os.kind())),
        (os, ours) => panic!("the OS said {os:?} but the server said {ours:?}"),
    }
}

#[tokio::test]
async fn a_disabled_server_is_never_started() {
    let mut cfg = config("off", hello("x"));
    cfg.disabled = true;
    let server = Server::new(cfg).unwrap();
    assert!(matches!(server.start().await, Err(LifecycleError::Disabled { .. })));
    assert!(!server.is_running());
    assert!(get(&client(), &url(&server, "/")).await.is_err());
}

#[tokio::test]
async fn restart_after_stop_serves_again() {
    let server = Server::new(config("again", hello("back"))).unwrap();
    server.start().await.unwrap();
    server.stop().await.unwrap();
    server.restart().await.unwrap();
    assert_eq!(get(&client(), &url(&server, "/")).await.unwrap().1, "back");
    server.restart().await.unwrap();
    assert_eq!(get(&client(), &url(&server, "/")).await.unwrap().1, "back");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stop_waits_for_the_in_flight_request_and_returns_when_it_is_done() {
    let mut cfg = config("slow", sleeper(Duration::from_secs(2)));
    cfg.timeouts.shutdown = Duration::from_secs(30);
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let c = client();
    let u = url(&server, "/");
    let request = tokio::spawn(async move { get(&c, &u).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let begin = Instant::now();
    let report = server.stop().await.unwrap();
    let took = begin.elapsed();
    assert_eq!(request.await.unwrap().unwrap(), (StatusCode::OK, "slept".into()), "the request was answered");
    assert_eq!((report.drained, report.forced), (1, 0));
    assert!(took >= Duration::from_millis(1000), "stop returned before the request was done: {took:?}");
    assert!(took < Duration::from_secs(20), "stop waited for the deadline instead of the work: {took:?}");
}

#[tokio::test]
async fn a_request_still_running_at_the_deadline_is_forced_and_reported() {
    let server = Server::new(config("stuck", sleeper(Duration::from_secs(3600)))).unwrap();
    server.start().await.unwrap();
    let c = client();
    let u = url(&server, "/");
    let request = tokio::spawn(async move { get(&c, &u).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = server.stop_within(Duration::from_millis(300)).await.unwrap();
    assert_eq!((report.drained, report.forced), (0, 1));
    assert!(report.elapsed < Duration::from_secs(20));
    assert!(request.await.unwrap().is_err(), "the forced request got no answer");
    assert_eq!(server.snapshot().counters.forced, 1);
}

fn sse_handler() -> Handler {
    Handler::from_fn(|req: Request<httpserver_pool::RequestBody>| async move {
        let signal = req.extensions().get::<ShutdownSignal>().cloned().expect("signal in extensions");
        let events = stream::unfold((signal, 0u32), |(signal, n)| async move {
            if n > 0 {
                signal.triggered().await;
                return None;
            }
            let frame: Result<Frame<Bytes>, httpserver_pool::BoxError> =
                Ok(Frame::data(Bytes::from("data: hello\n\n")));
            Some((frame, (signal, n + 1)))
        });
        Response::new(StreamBody::new(events).boxed())
    })
}

#[tokio::test]
async fn an_sse_stream_is_ended_by_the_shutdown_signal() {
    let server = Server::new(config("sse", sse_handler())).unwrap();
    server.start().await.unwrap();
    let resp = client().get(url(&server, "/events").parse().unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from("data: hello\n\n"));
    let stop = tokio::spawn({
        let server = server.clone();
        async move { server.stop_within(Duration::from_secs(30)).await }
    });
    // The stream ends cleanly: no more frames, no error.
    assert!(body.frame().await.is_none());
    let report = stop.await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
    assert!(report.elapsed < Duration::from_secs(20));
}

/// Answers 101 and echoes on the upgraded connection; `cooperative` handlers end at shutdown.
fn upgrade_handler(cooperative: bool) -> Handler {
    Handler::from_fn(move |mut req: Request<httpserver_pool::RequestBody>| async move {
        let signal = req.extensions().get::<ShutdownSignal>().cloned().unwrap();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on_upgrade.await.unwrap());
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    n = io.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => { if io.write_all(&buf[..n]).await.is_err() { return } }
                    },
                    _ = signal.triggered(), if cooperative => return,
                }
            }
        });
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(http::header::UPGRADE, "echo".parse().unwrap());
        resp.headers_mut().insert(http::header::CONNECTION, "upgrade".parse().unwrap());
        resp
    })
}

async fn open_upgraded(server: &Server) -> TokioIo<hyper::upgrade::Upgraded> {
    let tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header(http::header::HOST, "localhost")
        .header(http::header::UPGRADE, "echo")
        .header(http::header::CONNECTION, "upgrade")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    io
}

#[tokio::test]
async fn an_upgraded_connection_is_ended_by_the_shutdown_signal_and_counts_as_drained() {
    let server = Server::new(config("ws", upgrade_handler(true))).unwrap();
    server.start().await.unwrap();
    let mut io = open_upgraded(&server).await;
    let report = server.stop_within(Duration::from_secs(30)).await.unwrap();
    assert_eq!((report.drained, report.forced), (1, 0));
    let mut buf = [0u8; 4];
    assert!(matches!(io.read(&mut buf).await, Ok(0) | Err(_)), "the server side closed");
}

#[tokio::test]
async fn an_upgraded_connection_that_ignores_the_signal_is_closed_at_the_deadline() {
    let server = Server::new(config("ws", upgrade_handler(false))).unwrap();
    server.start().await.unwrap();
    let mut io = open_upgraded(&server).await;
    let report = server.stop_within(Duration::from_millis(300)).await.unwrap();
    assert_eq!((report.drained, report.forced), (0, 1), "the upgraded connection kept the drain waiting");
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await.expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)));
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_delay_stop() {
    let server = Server::new(config("idle", hello("x"))).unwrap();
    server.start().await.unwrap();
    let c = client();
    for _ in 0..3 {
        get(&c, &url(&server, "/")).await.unwrap();
    }
    let report = server.stop_within(Duration::from_secs(30)).await.unwrap();
    assert_eq!(report.forced, 0);
    assert!(report.elapsed < Duration::from_secs(10), "{report:?}");
}

fn tls_server(tls: TlsConfig) -> Server {
    let mut cfg =
        HttpServerConfig::new("tls", format!("localhost:{}", free_port())).with_handler(hello("secure"));
    cfg.tls = Some(tls);
    Server::new(cfg).unwrap()
}

#[tokio::test]
async fn tls_serves_http2_and_http1_by_alpn_with_rcgen_certificates() {
    let pki = TestPki::new();
    let server = tls_server(pki.server_tls());
    server.start().await.unwrap();
    assert!(server.expose().starts_with("https://"));
    let (s, body, v) =
        tls_get(pki.client_config(None, &[b"h2", b"http/1.1"]), server.bind(), "/").await.unwrap();
    assert_eq!((s, body.as_str(), v), (StatusCode::OK, "secure", http::Version::HTTP_2));
    let (_, _, v) = tls_get(pki.client_config(None, &[b"http/1.1"]), server.bind(), "/").await.unwrap();
    assert_eq!(v, http::Version::HTTP_11);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let pki = TestPki::new();
    let clients = TestPki::new();
    let mut tls = pki.server_tls();
    tls.client_ca = Some(PemSource::Pem(clients.ca_pem.clone()));
    let server = tls_server(tls);
    server.start().await.unwrap();
    assert!(tls_get(pki.client_config(None, &[b"h2"]), server.bind(), "/").await.is_err());
    let stranger = pki.issue(&["client"]);
    assert!(tls_get(pki.client_config(Some(&stranger), &[b"h2"]), server.bind(), "/").await.is_err());
    let member = clients.issue(&["client"]);
    let (s, _, _) = tls_get(pki.client_config(Some(&member), &[b"h2"]), server.bind(), "/").await.unwrap();
    assert_eq!(s, StatusCode::OK);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_that_does_not_match_its_key_is_a_tls_error() {
    let pki = TestPki::new();
    let a = pki.issue(&["localhost"]);
    let b = pki.issue(&["localhost"]);
    let mut cfg = config("mismatch", hello("x"));
    cfg.tls =
        Some(TlsConfig { cert_chain: PemSource::Pem(a.cert), key: PemSource::Pem(b.key), client_ca: None });
    let err = Server::new(cfg).unwrap_err().to_string();
    assert!(err.contains("do not match"), "{err}");
}

/// A body that fails before its first frame (an upstream that dies between its response head
/// and its body): the client still gets the head, then a body it can tell is cut short, rather
/// than a connection closed with no answer at all.
#[tokio::test]
async fn a_body_that_fails_at_once_still_sends_the_head() {
    let handler = Handler::from_fn(|_req: Request<httpserver_pool::RequestBody>| async move {
        let failing =
            stream::iter([Err::<Frame<Bytes>, httpserver_pool::BoxError>("the upstream went away".into())]);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-length", "10")
            .body(StreamBody::new(failing).boxed())
            .unwrap()
    });
    let server = Server::new(config("cut", handler)).unwrap();
    server.start().await.unwrap();
    // The server closes the connection after the head (the body cannot be completed).
    let (seen, _) = raw_exchange(server.bind(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"), "the head was sent: {seen:?}");
    assert!(seen.contains("content-length: 10\r\n"), "{seen:?}");
    assert!(seen.ends_with("\r\n\r\n"), "no body byte follows the head: {seen:?}");
    server.stop().await.unwrap();
}
