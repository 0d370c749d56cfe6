//! The readiness probes that are not the engine's own view: a TCP connect, and an HTTP/1.1
//! `GET` whose status must match (through hyper's client connection, one connection per try).

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::ReadinessCheck;

/// One try of the check; `true` when it passed. The engine check is not probed: it passes.
pub(crate) async fn passes(check: &ReadinessCheck) -> bool {
    match check {
        ReadinessCheck::Engine => true,
        ReadinessCheck::Tcp { address } => TcpStream::connect(address.as_str()).await.is_ok(),
        ReadinessCheck::Http { url, expected_status } => {
            http_status(url).await.is_some_and(|status| status == *expected_status)
        }
    }
}

async fn http_status(url: &str) -> Option<u16> {
    let uri: Uri = url.parse().ok()?;
    let authority = uri.authority()?.clone();
    let stream = TcpStream::connect(authority.as_str()).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    let driver = tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::USER_AGENT, "idlewatch-readiness")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let status = sender.send_request(request).await.ok().map(|r| r.status().as_u16());
    driver.abort();
    status
}
