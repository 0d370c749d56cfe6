//! The request handler a server runs: a cheap, cloneable, type-erased async function.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use crate::RequestBody;

/// The error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every handler answers with.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

/// What a server does with a request. Cloning shares the same function.
///
/// Build one from an async function ([`Handler::from_fn`]) or from a tower / hyper-style
/// [`tower_service::Service`] ([`Handler::from_service`]).
#[derive(Clone)]
pub struct Handler(Arc<dyn Fn(Request<RequestBody>) -> HandlerFuture + Send + Sync>);

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handler")
    }
}

impl Handler {
    /// A handler from an async function.
    pub fn from_fn<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<RequestBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        Handler(Arc::new(move |req| Box::pin(f(req))))
    }

    /// A handler from a tower `Service`. The service is cloned per request (the usual tower
    /// contract), driven to readiness, then called; a service error answers 500.
    pub fn from_service<S, B>(service: S) -> Self
    where
        S: tower_service::Service<Request<RequestBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: fmt::Display + Send,
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        Handler::from_fn(move |req| {
            let mut svc = service.clone();
            async move {
                let ready = std::future::poll_fn(|cx| svc.poll_ready(cx)).await;
                let result = match ready {
                    Ok(()) => svc.call(req).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
                    Err(e) => {
                        tracing::warn!(error = %e, "handler service failed");
                        status(StatusCode::INTERNAL_SERVER_ERROR)
                    }
                }
            }
        })
    }

    /// A handler answering every request with `status` and an empty body.
    pub fn status(code: StatusCode) -> Self {
        Handler::from_fn(move |_| async move { status(code) })
    }

    pub(crate) fn call(&self, req: Request<RequestBody>) -> HandlerFuture {
        (self.0)(req)
    }

    pub(crate) fn same_as(&self, other: &Handler) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A body holding `bytes` (a convenience for handlers).
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A response with `code` and an empty body.
pub fn status(code: StatusCode) -> Response<ResponseBody> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = code;
    resp
}
