//! A fake Docker engine on a Unix socket, for tests that need to count its connections or hold
//! its answers open.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

/// A fake engine: `/_ping` answers `OK`, `/events` streams a line every 100 ms for ever, any
/// `POST` reads its body whole and answers `200`. Counts its open connections.
pub struct FakeEngine {
    open: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
    pub socket: std::path::PathBuf,
}

struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FakeEngine {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let guard = Open(count.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let service =
                        hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                            let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                                "/events" => {
                                    let ticks = futures_util::stream::unfold(0u64, |n| async move {
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                        Some((
                                            Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                                                "{{\"n\":{n}}}\n"
                                            )))),
                                            n + 1,
                                        ))
                                    });
                                    BoxBody::new(StreamBody::new(ticks))
                                }
                                _ => {
                                    let _ = req.into_body().collect().await;
                                    BoxBody::new(Full::new(Bytes::from_static(b"OK")))
                                }
                            };
                            Ok::<_, Infallible>(Response::new(body))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { open, _dir: dir, socket }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}
