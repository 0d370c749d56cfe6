//! Each per-server setting takes effect on the wire.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use httpserver_pool::Server;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pool_api::Lifecycle;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_request_timeout_answers_503_instead_of_waiting() {
    let mut cfg = config("t", sleeper(Duration::from_secs(3600)));
    cfg.timeouts.request = Some(Duration::from_millis(200));
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let (status, _) = get(&client(), &format!("http://{}/", server.bind())).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    server.stop_within(Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn headers_above_max_header_size_are_refused() {
    let mut cfg = config("h", hello("ok"));
    cfg.max_header_size = 8192;
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let url = format!("http://{}/", server.bind());
    let big = "x".repeat(20_000);
    let req = http::Request::get(&url).header("x-big", &big).body(Empty::<Bytes>::new()).unwrap();
    let status = client().request(req).await.map(|r| r.status());
    assert!(!matches!(status, Ok(StatusCode::OK)), "{status:?}");
    let small = http::Request::get(&url).header("x-small", "y").body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(client().request(small).await.unwrap().status(), StatusCode::OK);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn prior_knowledge_http2_is_served_only_with_h2c() {
    for h2c in [true, false] {
        let mut cfg = config("h2c", hello("ok"));
        cfg.h2c = h2c;
        let server = Server::new(cfg).unwrap();
        server.start().await.unwrap();
        let url = format!("http://{}/", server.bind());
        let c: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
        let res = c.get(url.parse().unwrap()).await;
        match &res {
            Ok(resp) => assert!(h2c && resp.version() == http::Version::HTTP_2, "h2c={h2c}: {res:?}"),
            Err(_) => assert!(!h2c, "h2c={h2c}: {res:?}"),
        }
        if !h2c {
            // On the wire: HTTP/1 reads the HTTP/2 preface and closes without answering (an
            // HTTP/2 server would send its SETTINGS frame).
            let (answer, read) = raw_exchange(server.bind(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            read.unwrap();
            assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
        }
        // HTTP/1.1 is served either way.
        assert_eq!(get(&client(), &url).await.unwrap(), (StatusCode::OK, "ok".to_owned()));
        server.stop_within(Duration::ZERO).await.unwrap();
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let mut cfg = config("idle", hello("ok"));
    cfg.timeouts.idle = Some(Duration::from_millis(200));
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("closed by the server");
    assert!(matches!(closed, Ok(0) | Err(_)));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_header_is_cut_off_by_the_header_read_timeout() {
    for (limit, cut) in [(Duration::from_millis(200), true), (Duration::from_secs(3600), false)] {
        let mut cfg = config("slowloris", hello("ok"));
        cfg.timeouts.header_read = Some(limit);
        let server = Server::new(cfg).unwrap();
        server.start().await.unwrap();
        let mut tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
        let begin = tokio::time::Instant::now();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let read =
            tokio::time::timeout(Duration::from_secs(if cut { 10 } else { 1 }), tcp.read(&mut buf)).await;
        if cut {
            // Closed without a response, and not before the limit.
            let read = read.expect("closed by the server");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
            assert!(begin.elapsed() >= Duration::from_millis(150), "{:?}", begin.elapsed());
        } else {
            assert!(read.is_err(), "a connection within its header time must stay open: {read:?}");
            assert_eq!(server.snapshot().counters.active, 1);
        }
        server.stop_within(Duration::ZERO).await.unwrap();
    }
}

/// The header read timeout counts from when a connection begins to wait for a request head: a
/// keep-alive connection that stays silent that long after a response is closed, as one that
/// never sends anything is.
#[tokio::test]
async fn a_silent_keep_alive_connection_is_closed_by_the_header_read_timeout() {
    let mut cfg = config("silent", hello("ok"));
    cfg.timeouts.header_read = Some(Duration::from_millis(300));
    cfg.timeouts.idle = None;
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let begin = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(begin.elapsed() >= Duration::from_millis(250), "{:?}", begin.elapsed());
    let mut silent = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await.expect("closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    server.stop_within(Duration::ZERO).await.unwrap();
}

/// A response that takes longer to send than the header read and idle timeouts is neither cut
/// off nor followed by a closed connection: the request is in flight until its body is sent.
#[tokio::test]
async fn a_long_response_outlasts_the_header_read_and_idle_timeouts() {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    let slow = httpserver_pool::Handler::from_fn(|_req| async {
        let chunks = futures_util::stream::iter(0..6).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, httpserver_pool::BoxError>(hyper::body::Frame::data(Bytes::from(format!("{i}"))))
        });
        http::Response::new(BodyExt::boxed(StreamBody::new(chunks)))
    });
    let mut cfg = config("slow", slow);
    cfg.timeouts.header_read = Some(Duration::from_millis(250));
    cfg.timeouts.idle = Some(Duration::from_millis(250));
    let server = Server::new(cfg).unwrap();
    server.start().await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(server.bind()).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        // Chunked: the response ends with the last, empty chunk.
        while !got.ends_with(b"0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed mid-response: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    }
    server.stop_within(Duration::ZERO).await.unwrap();
}
