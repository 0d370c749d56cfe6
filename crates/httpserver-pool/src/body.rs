//! The request body handlers read: hyper's body under the body read timeout.
//!
//! The timer is armed only while the handler waits for body data that has not arrived, and is
//! allocated the first time a request's body makes it wait: a request without a body, or whose
//! body is already buffered, costs no timer and no allocation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestBodyError {
    /// The client sent no body data for `limit` while the handler was waiting for it (a slow or
    /// stalled upload). The body yields no more data after this.
    #[error("request body: no data from the client for {limit:?} (the server's timeouts.body_read)")]
    TimedOut {
        /// The configured `timeouts.body_read`.
        limit: Duration,
    },
    /// hyper could not read the body (connection closed, malformed chunked encoding, HTTP/2
    /// stream reset…).
    #[error("request body: {0}")]
    Read(#[from] hyper::Error),
}

/// The body of a request as handlers receive it: hyper's [`Incoming`] body, under the server's
/// body read timeout (`timeouts.body_read` in [`Timeouts`](crate::Timeouts)).
///
/// When the handler asks for the next piece of the body and the client has sent none, the wait
/// may last at most the body read timeout; then the body yields
/// [`RequestBodyError::TimedOut`] and ends. Each piece that arrives gives the next wait the full
/// time again. The time a handler spends on other things, not waiting for the body, is not
/// counted.
///
/// It implements [`hyper::body::Body`] (`Data = Bytes`), so `http-body-util`'s
/// `BodyExt::collect`, tower and axum services take it as they take `Incoming`.
pub struct RequestBody {
    inner: Incoming,
    limit: Option<Duration>,
    /// Armed (`waiting`) while a wait for data is under way; kept for the next wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    timed_out: bool,
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("limit", &self.limit)
            .field("timed_out", &self.timed_out)
            .finish_non_exhaustive()
    }
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, limit: Option<Duration>) -> Self {
        RequestBody { inner, limit, timer: None, waiting: false, timed_out: false }
    }

    /// The body read timeout this body runs under (`None`: waits for data as long as it takes).
    pub fn read_timeout(&self) -> Option<Duration> {
        self.limit
    }

    /// hyper's body, without the timeout.
    pub fn into_inner(self) -> Incoming {
        self.inner
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(RequestBodyError::from)))
            }
            Poll::Pending => {
                let Some(limit) = this.limit else { return Poll::Pending };
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + limit;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let timer = this.timer.as_mut().expect("armed above");
                if timer.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    return Poll::Ready(Some(Err(RequestBodyError::TimedOut { limit })));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// Handlers and tower services (axum's among them) need the body to be sendable, shareable and
// movable, and its error to be a plain boxed-able error: checked when the crate compiles.
const _: () = {
    const fn body<T: Send + Sync + Unpin + 'static>() {}
    const fn error<E: std::error::Error + Send + Sync + 'static>() {}
    body::<RequestBody>();
    error::<RequestBodyError>();
};
