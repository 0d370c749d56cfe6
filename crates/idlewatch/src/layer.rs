//! [`IdleLayer`] / [`IdleService`]: the HTTP side, a `tower` layer any hyper / axum /
//! httpserver-pool server can stack in front of the proxied app.
//!
//! Per request:
//!
//! 1. An [`ActivityGuard`] is taken, *then* the ready flag is read (the order that closes the
//!    race with an idle stop). The guard lives in the response body, so a long download counts
//!    until its last byte is sent or the body is dropped.
//!    A request that asks for a protocol upgrade (it carries an `Upgrade` header) also gets an
//!    [`UpgradeActivity`] in its extensions: the service that splices the upgraded connection
//!    (a websocket) takes [`UpgradeActivity::hold`] for the connection's life, since the
//!    response body — and the request's own guard — end with the `101`.
//! 2. **Ready** → straight to the inner service. This path reads one atomic, adds one to the
//!    activity count (plus the guard's reference count) and allocates nothing: the future and
//!    the body are enums, not boxes.
//! 3. **Not ready**:
//!    - a path under the reserved prefix ([`IdleLayerOptions::prefix`], default
//!      `/.idlewatch/`) is answered by the layer: `events` (server-sent events: one `state`
//!      event per change, then `ready` or `error`) and `status` (JSON). Once the workload is
//!      ready the app owns every path, these included;
//!    - with [`IdleLayerOptions::wake_paths`] set, a request outside them wakes nothing and
//!      gets 503; so does a client named in [`IdleLayerOptions::ignore_user_agents`] (bots,
//!      uptime checkers), so they cannot keep waking the workload;
//!    - an HTML `GET` (its `Accept` names `text/html`), when the loading page is on, starts the
//!      wake in the background and gets the loading page at once (`Cache-Control: no-store`):
//!      it listens to the `events` stream and reloads the original URL on `ready`, with a
//!      `<meta http-equiv="refresh">` fallback for clients without JavaScript;
//!    - anything else (APIs, other methods, websocket upgrades) is held until the workload is
//!      ready — never longer than the wake time-out — then passed on; on time-out or a failed
//!      wake it gets `503 Service Unavailable` with `Retry-After` and an RFC 7807
//!      `application/problem+json` body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::activity::ActivityGuard;
use crate::machine::IdleState;
use crate::watcher::{IdleSnapshot, IdleWatcher};

/// Put in the extensions of a request that asks for a protocol upgrade: the upgraded
/// connection's task holds [`hold`](Self::hold)'s guard for as long as the connection is open,
/// so an open websocket keeps the workload up.
#[derive(Clone, Debug)]
pub struct UpgradeActivity {
    watcher: IdleWatcher,
}

impl UpgradeActivity {
    /// One unit of activity until the guard is dropped.
    pub fn hold(&self) -> ActivityGuard {
        self.watcher.activity()
    }
}

/// How the layer treats requests while the workload is not ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleLayerOptions {
    /// Where the layer's own paths live while the workload is not ready: `{prefix}events`,
    /// `{prefix}status`. Default `/.idlewatch/`.
    pub prefix: String,
    /// Serve the loading page to HTML `GET`s (default `true`); `false` holds them like any
    /// other request.
    pub loading_page: bool,
    /// Only requests whose path starts with one of these wake the workload; `None` (the
    /// default): every request does.
    pub wake_paths: Option<Vec<String>>,
    /// Requests whose `User-Agent` contains one of these (case-insensitive; e.g. `bot`,
    /// `uptime-kuma`) never wake the workload: they get 503 while it sleeps. Default: none.
    pub ignore_user_agents: Vec<String>,
    /// Show the workload's name on the loading page and in the status and event JSON (default
    /// `true`); `false` shows "the service" and leaves the name out.
    pub show_name: bool,
    /// `Retry-After` of a 503, in seconds. Default 5.
    pub retry_after: Duration,
    /// The loading page's meta-refresh period, for clients without JavaScript. Default 3 s.
    pub refresh: Duration,
}

impl Default for IdleLayerOptions {
    fn default() -> Self {
        Self {
            prefix: "/.idlewatch/".to_owned(),
            loading_page: true,
            wake_paths: None,
            ignore_user_agents: Vec::new(),
            show_name: true,
            retry_after: Duration::from_secs(5),
            refresh: Duration::from_secs(3),
        }
    }
}

/// Stacks an [`IdleService`] over a service; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct IdleLayer {
    watcher: IdleWatcher,
    options: Arc<IdleLayerOptions>,
}

impl IdleLayer {
    /// A layer for the workload of `watcher`. The user-agent patterns are lower-cased here,
    /// once.
    pub fn new(watcher: IdleWatcher, mut options: IdleLayerOptions) -> Self {
        for pattern in &mut options.ignore_user_agents {
            *pattern = pattern.to_lowercase();
        }
        Self { watcher, options: Arc::new(options) }
    }
}

impl<S> Layer<S> for IdleLayer {
    type Service = IdleService<S>;

    fn layer(&self, inner: S) -> IdleService<S> {
        IdleService { inner, watcher: self.watcher.clone(), options: Arc::clone(&self.options) }
    }
}

/// The service made by [`IdleLayer`].
#[derive(Clone, Debug)]
pub struct IdleService<S> {
    inner: S,
    watcher: IdleWatcher,
    options: Arc<IdleLayerOptions>,
}

type BoxedStream = Pin<Box<dyn Stream<Item = Bytes> + Send + Sync>>;

pin_project! {
    /// The response body of an [`IdleService`]: the app's body (carrying the request's activity
    /// guard until its last frame), or one the layer made (loading page, problem, status,
    /// server-sent events).
    pub struct IdleBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        App { #[pin] body: B, guard: Option<ActivityGuard> },
        Full { data: Option<Bytes> },
        Events { stream: BoxedStream },
    }
}

impl<B> IdleBody<B> {
    fn full(data: impl Into<Bytes>) -> Self {
        Self { kind: BodyKind::Full { data: Some(data.into()) } }
    }

    fn app(body: B, guard: Option<ActivityGuard>) -> Self {
        Self { kind: BodyKind::App { body, guard } }
    }

    fn events(stream: BoxedStream) -> Self {
        Self { kind: BodyKind::Events { stream } }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            BodyKindProj::App { body, guard } => {
                let frame = ready!(body.poll_frame(cx));
                if frame.is_none() {
                    // The last byte is out: the activity ends here, not when the body is dropped.
                    guard.take();
                }
                Poll::Ready(frame)
            }
            BodyKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKindProj::Events { stream } => {
                Poll::Ready(ready!(stream.as_mut().poll_next(cx)).map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::App { body, .. } => body.is_end_stream(),
            BodyKind::Full { data } => data.is_none(),
            BodyKind::Events { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::App { body, .. } => body.size_hint(),
            BodyKind::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            BodyKind::Events { .. } => SizeHint::default(),
        }
    }
}

type HeldFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<IdleBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of an [`IdleService`]: the app's own future, unboxed, when ready;
    /// the boxed slow path otherwise.
    pub struct IdleFuture<F, B, E> {
        #[pin]
        kind: FutureKind<F, B, E>,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind<F, B, E> {
        Ready { #[pin] future: F, guard: Option<ActivityGuard> },
        Held { future: HeldFuture<B, E> },
    }
}

impl<F, B, E> Future for IdleFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<IdleBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Ready { future, guard } => {
                let response = ready!(future.poll(cx))?;
                let guard = guard.take();
                Poll::Ready(Ok(response.map(|body| IdleBody::app(body, guard))))
            }
            FutureKindProj::Held { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for IdleService<S>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<IdleBody<B>>;
    type Error = S::Error;
    type Future = IdleFuture<S::Future, B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        let guard = self.watcher.activity();
        if request.headers().contains_key(header::UPGRADE) {
            request.extensions_mut().insert(UpgradeActivity { watcher: self.watcher.clone() });
        }
        if self.watcher.is_ready() {
            let kind = FutureKind::Ready { future: self.inner.call(request), guard: Some(guard) };
            return IdleFuture { kind };
        }
        // The inner service that `poll_ready` readied goes with the request; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let future = not_ready(inner, self.watcher.clone(), Arc::clone(&self.options), request, guard);
        IdleFuture { kind: FutureKind::Held { future: Box::pin(future) } }
    }
}

async fn not_ready<S, ReqB, B>(
    mut inner: S,
    watcher: IdleWatcher,
    options: Arc<IdleLayerOptions>,
    request: Request<ReqB>,
    guard: ActivityGuard,
) -> Result<Response<IdleBody<B>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
{
    let path = request.uri().path();
    let name = shown_name(&watcher, &options);
    if let Some(own) = path.strip_prefix(options.prefix.as_str()) {
        match own {
            "events" => return Ok(events(&watcher, name)),
            "status" => return Ok(status(&watcher, name)),
            _ => {}
        }
    }
    if let Some(paths) = &options.wake_paths
        && !paths.iter().any(|p| path.starts_with(p.as_str()))
    {
        let detail = format!("{} is asleep; this path does not wake it", name.unwrap_or("the service"));
        return Ok(problem(&options, "Not started from this path", &detail));
    }
    if ignored_agent(&request, &options) {
        let detail = format!("{} is asleep; this client does not wake it", name.unwrap_or("the service"));
        return Ok(problem(&options, "Not started for this client", &detail));
    }
    if options.loading_page && request.method() == Method::GET && wants_html(&request) {
        let background = watcher.clone();
        tokio::spawn(async move {
            if let Err(error) = background.wake().await {
                tracing::debug!(%error, "wake behind a loading page failed");
            }
        });
        drop(guard);
        return Ok(loading_page(name, &options));
    }
    match watcher.wake().await {
        Ok(()) => {
            let response = inner.call(request).await?;
            Ok(response.map(|body| IdleBody::app(body, Some(guard))))
        }
        Err(error) => {
            let detail = if options.show_name {
                error.to_string()
            } else {
                "the service could not be woken".to_owned()
            };
            Ok(problem(&options, "Workload unavailable", &detail))
        }
    }
}

fn shown_name<'a>(watcher: &'a IdleWatcher, options: &IdleLayerOptions) -> Option<&'a str> {
    options.show_name.then(|| watcher.config().workload.name())
}

fn ignored_agent<B>(request: &Request<B>, options: &IdleLayerOptions) -> bool {
    if options.ignore_user_agents.is_empty() {
        return false;
    }
    let Some(agent) = request.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let agent = agent.to_lowercase();
    options.ignore_user_agents.iter().any(|pattern| agent.contains(pattern.as_str()))
}

fn wants_html<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")))
}

/// 503 with `Retry-After` and an RFC 7807 body.
fn problem<B>(options: &IdleLayerOptions, title: &str, detail: &str) -> Response<IdleBody<B>> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": 503,
        "detail": detail,
    });
    let mut response = Response::new(IdleBody::full(body.to_string()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(options.retry_after.as_secs().max(1)));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The state as JSON; the workload's name and the error's text (which names it) only when
/// names are shown.
fn snapshot_json(workload: Option<&str>, snapshot: &IdleSnapshot) -> serde_json::Value {
    let error = match &snapshot.state {
        IdleState::Error(error) => Some(if workload.is_some() {
            error.to_string()
        } else {
            "the service could not be woken".to_owned()
        }),
        _ => None,
    };
    serde_json::json!({ "workload": workload, "state": snapshot.state.name(), "error": error })
}

fn status<B>(watcher: &IdleWatcher, name: Option<&str>) -> Response<IdleBody<B>> {
    let snapshot = watcher.subscribe().borrow().clone();
    let body = snapshot_json(name, &snapshot).to_string();
    let mut response = Response::new(IdleBody::full(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Server-sent events: the current state, each change, and the end after `ready` or `error`.
fn events<B>(watcher: &IdleWatcher, name: Option<&str>) -> Response<IdleBody<B>> {
    let states = watcher.subscribe();
    let workload = name.map(str::to_owned);
    let stream = futures_util::stream::unfold(Some((states, true)), move |state| {
        let workload = workload.clone();
        async move {
            let (mut states, first) = state?;
            if !first && states.changed().await.is_err() {
                return None;
            }
            let snapshot = states.borrow_and_update().clone();
            let event = match snapshot.state {
                IdleState::Ready => "ready",
                IdleState::Error(_) => "error",
                _ => "state",
            };
            let data = snapshot_json(workload.as_deref(), &snapshot);
            let frame = Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
            let next = (event == "state").then_some((states, false));
            Some((frame, next))
        }
    });
    let mut response = Response::new(IdleBody::events(Box::pin(stream)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn loading_page<B>(name: Option<&str>, options: &IdleLayerOptions) -> Response<IdleBody<B>> {
    let name = html_escape(name.unwrap_or("the service"));
    let events = serde_json::to_string(&format!("{}events", options.prefix)).unwrap_or_default();
    let refresh = options.refresh.as_secs().max(1);
    let page = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>
<title>Starting {name}…</title>
<style>body{{font-family:system-ui,sans-serif;display:grid;place-items:center;min-height:90vh;color:#333}}</style>
</head><body><main><h1 id="idlewatch-title">Starting {name}…</h1><p id="idlewatch-state">waking up</p></main>
<script>
(function () {{
  var state = document.getElementById("idlewatch-state");
  var source = new EventSource({events});
  source.addEventListener("state", function (e) {{ state.textContent = JSON.parse(e.data).state; }});
  source.addEventListener("ready", function () {{ source.close(); state.textContent = "ready"; location.reload(); }});
  source.addEventListener("error", function (e) {{
    if (e.data) {{ source.close(); state.textContent = "failed: " + JSON.parse(e.data).error; }}
  }});
}})();
</script></body></html>
"#
    );
    let mut response = Response::new(IdleBody::full(page));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
