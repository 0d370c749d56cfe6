//! Request smuggling and response desync, as an attacker would try them: framing tricks
//! (`Content-Length` against `Transfer-Encoding`, obfuscated or duplicated framing headers,
//! hop-by-hop names in `Connection`, malformed chunks) that try to get a request the WAF agent
//! blocks (`/admin`) to the upstream inside the body of one it allows, through a route with
//! the agent and through one without; bodies that break off, are malformed or trickle slower
//! than the upstream's time-out, which must not count against the upstream's health (a client
//! could otherwise eject a healthy URL); and an upstream that sends more than its response, so
//! that a later client would read the excess as its own answer.
//!
//! The upstream is hyper's strict HTTP/1.1 server, recording every request it parses: whatever
//! the gateway sends, a smuggled request would show up there as a request of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

/// What the upstream parsed: method, path, `Host` and body of each request, in order.
type Seen = Arc<Mutex<Vec<(String, String, String, Vec<u8>)>>>;

/// hyper's HTTP/1.1 server on a free port, answering `ok` and recording every request.
async fn recording_upstream() -> (std::net::SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                        let host = req
                            .headers()
                            .get(http::header::HOST)
                            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                            .unwrap_or_default();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().to_vec())
                            .unwrap_or_default();
                        record.lock().push((method, path, host, body));
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Writes `raw` on a new connection and reads what the gateway sends back: until it closes,
/// or, once a whole response head has come, until it says nothing more for 300 ms (a smuggled
/// request read as a second one is answered at once after the first; the connection is not
/// half-closed, which the gateway takes for a client gone). The statuses, in order.
async fn attack(listen: &str, raw: &[u8]) -> Vec<u16> {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let answered = back.windows(4).any(|w| w == b"\r\n\r\n");
        let wait = if answered { Duration::from_millis(300) } else { Duration::from_secs(20) };
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => back.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&back);
    let mut starts: Vec<usize> =
        text.match_indices("HTTP/1.1 ").chain(text.match_indices("HTTP/1.0 ")).map(|(i, _)| i).collect();
    starts.sort_unstable();
    starts.into_iter().filter_map(|i| text.get(i + 9..i + 12)?.parse().ok()).collect()
}

/// The request to smuggle: one the agent blocks.
const SMUGGLED: &str = "GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n";

/// Each trick, as the bytes a client sends, for a request to `path` (an allowed one).
fn tricks(path: &str) -> Vec<(&'static str, String)> {
    let s = SMUGGLED;
    let chunk = format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    vec![
        (
            "CL.TE: a length covering the smuggled request, chunked ending before it",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}",
                5 + s.len()
            ),
        ),
        (
            "TE.CL: chunked carrying the request, a length ending before it",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
        ),
        (
            "TE.TE: an unknown coding next to chunked",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4\r\n\r\n{chunk}"
            ),
        ),
        (
            "chunked not the last coding",
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunk}"),
        ),
        (
            "xchunked",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n{chunk}"
            ),
        ),
        (
            "a space before the colon",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n{chunk}"
            ),
        ),
        (
            "a folded Transfer-Encoding",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n{chunk}"
            ),
        ),
        (
            "two different lengths",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{s}",
                s.len()
            ),
        ),
        (
            "a signed length",
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: +{}\r\n\r\n{s}", s.len()),
        ),
        (
            "a length in a list",
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {}\r\n\r\n{s}", s.len()),
        ),
        (
            "Connection naming Content-Length (stripped as hop-by-hop)",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{s}",
                s.len()
            ),
        ),
        (
            "Connection naming Transfer-Encoding",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
        ),
        (
            "a chunk size that overflows",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n{s}\r\n0\r\n\r\n"
            ),
        ),
        (
            "a chunk shorter than its size",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokGET /x\r\n0\r\n\r\n{s}"
            ),
        ),
        (
            "a chunk extension hiding a line break",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;a=\"\n{s}\"\r\nok\r\n0\r\n\r\n"
            ),
        ),
        (
            "bare line feeds",
            format!(
                "POST {path} HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nContent-Length: 4\n\n{chunk}"
            ),
        ),
        (
            "an HTTP/1.0 body without a length",
            format!("POST {path} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n{s}"),
        ),
    ]
}

#[tokio::test]
async fn no_framing_trick_gets_a_blocked_request_to_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (app, seen) = recording_upstream().await;
    let agent = common::uds_agent(dir.path(), "waf", test_support::BlockPath::new("/admin")).await;
    let gateway = common::start_gateway(
        dir.path(),
        &format!(
            "[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\nmax_failures = 1\n\n\
             [[upstreams]]\nname = \"drip\"\nurls = [\"http://{app}\"]\nmax_failures = 1\ntimeout = \"1s\"\n\n\
             [[agents]]\nname = \"waf\"\nendpoints = [\"{}\"]\n\n\
             [[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"app\"\n\n\
             [[routes]]\nname = \"drip\"\npath_prefix = \"/drip\"\nupstream = \"drip\"\n\n\
             [[routes]]\nname = \"guarded\"\nupstream = \"app\"\nagents = [\"waf\"]\nfailure_mode = \"closed\"\n",
            agent.endpoint
        ),
    )
    .await;
    // The blocked path, asked plainly, is blocked.
    assert_eq!(attack(&gateway.listen, SMUGGLED.as_bytes()).await, [403]);
    assert!(seen.lock().is_empty());

    for path in ["/page", "/open/page"] {
        for (trick, raw) in tricks(path) {
            let statuses = attack(&gateway.listen, raw.as_bytes()).await;
            // Whatever the gateway made of it: refused (400), or the allowed request answered
            // and a smuggled request read as the client's next one, which the agent blocks —
            // never a blocked request let through.
            assert!(!statuses.is_empty(), "{trick} ({path}): no answer");
            assert!(
                statuses.iter().all(|s| [200, 400, 403, 501].contains(s)),
                "{trick} ({path}): answered {statuses:?}"
            );
        }
    }
    // A client that sends its body a byte at a time, slower than the upstream's time-out:
    // 504, and the upstream, still waiting for the body, is not charged for it.
    let mut slow = TcpStream::connect(&gateway.listen).await.unwrap();
    slow.write_all(b"POST /drip HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab").await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut back)).await;
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");

    // The upstream parsed only the allowed requests, each with its body as data: no request
    // hidden in a body came out as one of its own.
    for (method, at, _, body) in seen.lock().iter() {
        assert!(
            ["/page", "/open/page", "/drip"].contains(&at.as_str()),
            "the upstream saw {method} {at} ({:?})",
            String::from_utf8_lossy(body)
        );
    }
    // Bodies broken off or malformed by clients, and the slow one, ejected no URL (each
    // upstream leaves a URL out after a single failure).
    assert_eq!(common::metric(&gateway.admin, "gateway_upstream_ejections_total").await.unwrap_or(0.0), 0.0);
    // Nothing left in flight.
    common::eventually("no request in flight", async || {
        common::metric(&gateway.admin, "agentpool_requests_in_flight").await.unwrap_or(0.0) == 0.0
    })
    .await;
    assert_eq!(attack(&gateway.listen, b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n").await, [200]);
}

/// An upstream that answers its first request on each connection with more than the response
/// (a second response, `stolen`, right after it), and later ones with `fresh`.
async fn oversending_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                let mut first = true;
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer: &[u8] = if first {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nstolen"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh"
                        };
                        first = false;
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn bytes_an_upstream_sends_beyond_its_response_never_reach_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let app = oversending_upstream().await;
    let gateway = common::start_gateway(
        dir.path(),
        &format!("[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"),
    )
    .await;
    for i in 0..20 {
        let reply = common::exchange(&gateway.listen, &common::get(&format!("/r{i}"))).await;
        let text = reply.text();
        assert!(!text.contains("stolen"), "request {i} got another response's bytes: {text:?}");
        assert!(
            (reply.status == 200 && ["ok", "fresh"].contains(&text.as_str())) || reply.status == 502,
            "request {i}: {} {text:?}",
            reply.status
        );
    }
}

/// A gateway with two routes to a recording upstream: `admin`, chosen by `admin_match` (a
/// `host = …` or `path_prefix = …` line) and guarded by an agent that blocks everything, and an
/// open `public` one. The gateway, what the upstream saw, its address, and the agent.
async fn guarded(
    dir: &std::path::Path,
    admin_match: &str,
) -> (common::Gateway, Seen, std::net::SocketAddr, common::UdsAgent) {
    let (app, seen) = recording_upstream().await;
    let agent = common::uds_agent(dir, "waf", test_support::BlockPath::new("/")).await;
    let gateway = common::start_gateway(
        dir,
        &format!(
            "[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[agents]]\nname = \"waf\"\nendpoints = [\"{}\"]\n\n\
             [[routes]]\nname = \"admin\"\n{admin_match}\nupstream = \"app\"\nagents = [\"waf\"]\n\n\
             [[routes]]\nname = \"public\"\nupstream = \"app\"\n",
            agent.endpoint
        ),
    )
    .await;
    (gateway, seen, app, agent)
}

#[tokio::test]
async fn the_upstream_sees_the_host_that_chose_the_route() {
    let dir = tempfile::tempdir().unwrap();
    // Everything for admin.example goes through an agent that blocks it all; other hosts are open.
    let (gateway, seen, app, _agent) = guarded(dir.path(), "host = \"admin.example\"").await;
    assert_eq!(attack(&gateway.listen, b"GET /x HTTP/1.1\r\nHost: admin.example\r\n\r\n").await, [403]);
    // A request with no host at all gets the upstream URL's.
    let app_host = app.to_string();
    // An absolute-form target names the host: it chooses the route, and the upstream gets it as
    // `Host` (not the header the client sent, which named the guarded host).
    let cases: [(&[u8], u16, &str); 9] = [
        (b"GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\n\r\n", 200, "public.example"),
        (
            b"GET http://user@public.example:8080/x HTTP/1.1\r\nHost: admin.example\r\n\r\n",
            200,
            "public.example:8080",
        ),
        (b"GET http://admin.example/x HTTP/1.1\r\nHost: public.example\r\n\r\n", 403, ""),
        // `Connection` cannot make the gateway drop `Host` on the way.
        (b"GET /x HTTP/1.1\r\nHost: public.example\r\nConnection: host\r\n\r\n", 200, "public.example"),
        // Two Host headers (the gateway would route on one, a server may take the other), one
        // that is no host[:port], none at all on HTTP/1.1: refused.
        (b"GET /x HTTP/1.1\r\nHost: public.example\r\nHost: admin.example\r\n\r\n", 400, ""),
        (b"GET /x HTTP/1.1\r\nHost: admin.example@public.example\r\n\r\n", 400, ""),
        (b"GET /x HTTP/1.1\r\nX-Host: public.example\r\n\r\n", 400, ""),
        // The fully qualified name with its trailing dot is the same host.
        (b"GET /x HTTP/1.1\r\nHost: ADMIN.example.\r\n\r\n", 403, ""),
        // HTTP/1.0 may leave the header out.
        (b"GET /x HTTP/1.0\r\n\r\n", 200, &app_host),
    ];
    for (raw, status, host) in cases {
        seen.lock().clear();
        let what = String::from_utf8_lossy(raw);
        assert_eq!(attack(&gateway.listen, raw).await, [status], "{what}");
        let upstream: Vec<String> = seen.lock().iter().map(|(_, _, h, _)| h.clone()).collect();
        let expected: Vec<&str> = if status == 200 { vec![host] } else { vec![] };
        assert_eq!(upstream, expected, "{what}");
    }
}

#[tokio::test]
async fn a_path_is_routed_as_the_upstream_will_read_it() {
    let dir = tempfile::tempdir().unwrap();
    // /admin goes through an agent that blocks it all; the rest is open.
    let (gateway, seen, _, _agent) = guarded(dir.path(), "path_prefix = \"/admin\"").await;
    // Spellings of /admin/x a server may resolve: each takes the guarded route, or is refused.
    let cases = [
        ("/public/../admin/x", 403, ""),
        ("/./admin/x", 403, ""),
        ("//admin/x", 403, ""),
        ("/%61dmin/x", 403, ""),
        ("/public/%2e%2E/admin/x", 403, ""),
        ("/admin%2Fx", 400, ""),
        ("/public/..%2Fadmin/x", 400, ""),
        ("/public/..%5Cadmin/x", 400, ""),
        // Ordinary paths go on as they are, or in their normal form.
        ("/public/a%20b?q=/../admin", 200, "/public/a%20b"),
        ("/public/%7euser/./x", 200, "/public/~user/x"),
    ];
    for (target, status, upstream_path) in cases {
        seen.lock().clear();
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(attack(&gateway.listen, raw.as_bytes()).await, [status], "{target}");
        let paths: Vec<String> = seen.lock().iter().map(|(_, p, _, _)| p.clone()).collect();
        let expected: Vec<&str> = if status == 200 { vec![upstream_path] } else { vec![] };
        assert_eq!(paths, expected, "{target}");
    }
}
