//! The request path: route → the route's agents in order → decision applied → upstream →
//! response streamed back, with the agents' response-header changes.
//!
//! An agent that cannot answer (down, paused, over its time-out) is handled by the route's
//! failure mode: `closed` answers 503, `open` lets the request through. Either way the response
//! names the agent and what happened in `x-agentpool-agent-status`, and the gateway's metrics
//! count it. Request bodies are streamed to the upstream, never buffered; the response body is
//! streamed back as it arrives.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Empty};
use httpserver_pool::{RequestBody, ResponseBody};

use crate::reply::{as_grpc, is_grpc, plain, respond, set_status_header};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use idlewatch::{IdleLayer, IdleLayerOptions, IdleWatcher};
use pool_api::{Action, Decision, Event, EventKind, HeaderOp, RequestHeaders, ResponseHeaders};
use pool_core::{AgentPool, FailureMode};
use tokio::time::Instant;
use tower::{Layer as _, ServiceExt as _};

use crate::config::{GatewayConfig, upstream_base};
use crate::inspect::{self, Inspection, Inspector};
use crate::response_body::{self, ResponseInspector};
use crate::upstream::{IdleStack, UpstreamBody, UpstreamClient, UpstreamTls};
use crate::ws::FrameWatch;

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// One route, resolved.
pub(crate) struct Route {
    /// Its name.
    pub name: String,
    host: Option<String>,
    prefix: String,
    upstream: Arc<Upstream>,
    /// The agents asked, in order.
    pub agents: Vec<String>,
    failure_mode: FailureMode,
    metrics: RouteMetrics,
    /// The largest WebSocket frame relayed when agents take frames.
    max_websocket_frame: u64,
    /// When the upstream runs in an idle-watched workload: the layer that wakes it and counts
    /// the route's requests as its activity.
    idle: Option<IdleLayer>,
}

/// A route's metric handles, registered once (per status code on first use) so answering a
/// request formats no label and looks nothing up in the recorder's registry.
struct RouteMetrics {
    route: String,
    duration: metrics::Histogram,
    /// `gateway_requests_total` by status, indexed by `status - 100`.
    requests: Box<[OnceLock<metrics::Counter>]>,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        Self {
            route: route.to_owned(),
            duration: metrics::histogram!("gateway_request_duration_seconds", "route" => route.to_owned()),
            requests: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    fn answered(&self, status: StatusCode, elapsed: Duration) {
        let i = usize::from(status.as_u16()).clamp(100, 599) - 100;
        self.requests[i]
            .get_or_init(|| {
                let status = status.as_u16().to_string();
                metrics::counter!("gateway_requests_total", "route" => self.route.clone(), "status" => status)
            })
            .increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// An upstream, resolved: its bases are used in turn.
pub(crate) struct Upstream {
    /// Its name.
    pub name: String,
    bases: Vec<Base>,
    next: AtomicUsize,
    timeout: Duration,
    max_failures: u32,
    eject_for: Duration,
    /// The clock `Base::down_until` counts from.
    epoch: Instant,
    /// Spoken to over HTTP/2.
    http2: bool,
}

/// One URL of an upstream, with its passive health: consecutive failures (refused or
/// unanswered connections, time-outs) and, once they reach the limit, until when it is left out.
struct Base {
    authority: Authority,
    /// Its idle keep-alive connections (shared with every route to the same URL, and kept
    /// across reloads).
    stack: Arc<IdleStack>,
    failures: AtomicU32,
    /// Milliseconds since the upstream's epoch; 0: in rotation.
    down_until: AtomicU64,
}

impl Upstream {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next base in turn that is in rotation and not in `tried`; when every untried base is
    /// left out, the next untried one anyway (better a try than a refusal). `None` once all were
    /// tried.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.bases.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let untried = (0..n).map(|k| (start + k) % n).filter(|i| !tried.contains(i));
        let mut fallback = None;
        for i in untried {
            if self.bases[i].down_until.load(Ordering::Relaxed) <= now {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        fallback
    }

    fn succeeded(&self, i: usize) {
        let base = &self.bases[i];
        base.failures.store(0, Ordering::Relaxed);
        base.down_until.store(0, Ordering::Relaxed);
    }

    fn failed(&self, i: usize) {
        let base = &self.bases[i];
        if base.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.max_failures {
            base.failures.store(0, Ordering::Relaxed);
            let until = self.now_ms() + u64::try_from(self.eject_for.as_millis()).unwrap_or(u64::MAX);
            base.down_until.store(until, Ordering::Relaxed);
            metrics::counter!("gateway_upstream_ejections_total", "upstream" => self.name.clone())
                .increment(1);
            tracing::warn!(upstream = %self.name, base = %base.authority, eject_for = ?self.eject_for, "upstream URL left out after failures");
        }
    }
}

/// The proxy: routes, the agent pool, the upstream client. The routes are swapped whole on a
/// reload; a request keeps the table it started with.
pub(crate) struct Proxy {
    routes: ArcSwap<Vec<Arc<Route>>>,
    /// The idle-watched workloads, by the gateway's name for them.
    workloads: HashMap<String, IdleWatcher>,
    pool: AgentPool,
    client: UpstreamClient,
    ids: AtomicU64,
}

impl Proxy {
    /// Builds the proxy from a validated configuration and a pool holding its agents.
    pub(crate) fn new(
        config: &GatewayConfig,
        tls: &UpstreamTlsMap,
        pool: AgentPool,
        workloads: HashMap<String, IdleWatcher>,
    ) -> Proxy {
        let client = UpstreamClient::new();
        let routes = ArcSwap::from_pointee(build_routes(config, tls, &workloads, &client));
        Proxy { routes, workloads, pool, client, ids: AtomicU64::new(1) }
    }

    /// Replaces the routes and upstreams with those of `config` (validated; `tls` read from
    /// it by [`upstream_tls`]), atomically.
    pub(crate) fn set_routes(&self, config: &GatewayConfig, tls: &UpstreamTlsMap) {
        let routes = build_routes(config, tls, &self.workloads, &self.client);
        let in_use: Vec<&Arc<IdleStack>> =
            routes.iter().flat_map(|r| r.upstream.bases.iter().map(|b| &b.stack)).collect();
        self.client.retain(&in_use);
        self.routes.store(Arc::new(routes));
    }

    /// The routes, in matching order.
    pub(crate) fn routes(&self) -> Arc<Vec<Arc<Route>>> {
        self.routes.load_full()
    }

    /// The idle-watched workloads, by name.
    pub(crate) fn workloads(&self) -> &HashMap<String, IdleWatcher> {
        &self.workloads
    }
}

/// The TLS of each upstream that has `https://` URLs, by upstream name.
pub(crate) type UpstreamTlsMap = HashMap<String, Arc<UpstreamTls>>;

/// Reads the TLS files of a validated configuration's upstreams (again: they may have changed
/// since the check) and builds their client configurations; the first problem, with where.
pub(crate) fn upstream_tls(config: &GatewayConfig) -> Result<UpstreamTlsMap, String> {
    let mut map = UpstreamTlsMap::new();
    for u in &config.upstreams {
        if let Some(tls) = &u.tls {
            let made = tls
                .read()
                .and_then(|files| files.upstream(tls.server_name.as_deref()))
                .map_err(|e| format!("upstream {}: {e}", u.name))?;
            map.insert(u.name.clone(), Arc::new(made));
        }
    }
    Ok(map)
}

/// Resolves a validated configuration's routes and upstreams.
fn build_routes(
    config: &GatewayConfig,
    tls: &UpstreamTlsMap,
    workloads: &HashMap<String, IdleWatcher>,
    client: &UpstreamClient,
) -> Vec<Arc<Route>> {
    {
        let upstreams: std::collections::HashMap<&str, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let limits = u.limits();
                let tls = tls.get(&u.name).map(|t| &**t);
                let bases = u
                    .urls
                    .iter()
                    .filter_map(|url| upstream_base(url).ok())
                    .map(|base| Base {
                        stack: client.stack(&base.authority, limits, tls.filter(|_| base.https), u.http2),
                        authority: base.authority,
                        failures: AtomicU32::new(0),
                        down_until: AtomicU64::new(0),
                    })
                    .collect();
                let upstream = Upstream {
                    name: u.name.clone(),
                    bases,
                    next: AtomicUsize::new(0),
                    timeout: u.timeout,
                    max_failures: u.max_failures.max(1),
                    eject_for: u.eject_for,
                    epoch: Instant::now(),
                    http2: u.http2,
                };
                (u.name.as_str(), Arc::new(upstream))
            })
            .collect();
        config
            .routes
            .iter()
            .map(|r| {
                let idle = r.workload.as_ref().and_then(|w| {
                    let watcher = workloads.get(w)?.clone();
                    let loading_page =
                        config.workloads.iter().find(|c| &c.name == w).is_none_or(|c| c.loading_page);
                    Some(IdleLayer::new(
                        watcher,
                        IdleLayerOptions { loading_page, ..IdleLayerOptions::default() },
                    ))
                });
                Arc::new(Route {
                    name: r.name.clone(),
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    prefix: r.path_prefix.clone(),
                    upstream: upstreams[r.upstream.as_str()].clone(),
                    agents: r.agents.clone(),
                    failure_mode: r.failure_mode,
                    max_websocket_frame: r.max_websocket_frame,
                    metrics: RouteMetrics::new(&r.name),
                    idle,
                })
            })
            .collect()
    }
}

impl Proxy {
    fn route<'a>(routes: &'a [Arc<Route>], req: &Request<RequestBody>) -> Option<&'a Arc<Route>> {
        let path = req.uri().path();
        // The host is worked out (an allocation) only if a route asks for one.
        let mut host: Option<Option<String>> = None;
        routes.iter().find(|r| {
            let wanted = r.host.as_deref();
            let host = match wanted {
                Some(_) => host.get_or_insert_with(|| request_host(req)).as_deref(),
                None => None,
            };
            route_matches(wanted, &r.prefix, host, path)
        })
    }

    /// Serves one request: its route, through the route's workload (woken if asleep) when it
    /// has one. The gateway's own answer to a gRPC call is given as gRPC status
    /// ([`reply::as_grpc`](crate::reply::as_grpc)).
    pub(crate) async fn handle(self: Arc<Self>, req: Request<RequestBody>) -> Response<ResponseBody> {
        if is_grpc(req.headers()) {
            // Boxed: gRPC calls are the rarer kind, and the plain path's future stays as it was.
            as_grpc(Box::pin(self.answer(req)).await)
        } else {
            self.answer(req).await
        }
    }

    /// [`handle`](Self::handle) but for gRPC's form of the gateway's own answers.
    async fn answer(self: Arc<Self>, mut req: Request<RequestBody>) -> Response<ResponseBody> {
        host_from_target(&mut req);
        if let Err(answer) = check_host(&req).and_then(|()| normalize_path(&mut req).map_err(|e| e.answer()))
        {
            let resp = plain(StatusCode::BAD_REQUEST, answer);
            access_log("-", req.method(), req.uri().path(), resp.status(), Instant::now());
            metrics::counter!("gateway_requests_total", "route" => "-", "status" => "400").increment(1);
            return resp;
        }
        let routes = self.routes.load_full();
        let Some(route) = Self::route(&routes, &req).cloned() else {
            let resp = plain(StatusCode::NOT_FOUND, "no route matches this request\n");
            access_log("-", req.method(), req.uri().path(), resp.status(), Instant::now());
            metrics::counter!("gateway_requests_total", "route" => "-", "status" => "404").increment(1);
            return resp;
        };
        drop(routes);
        let Some(layer) = route.idle.clone() else { return self.serve_route(route, req).await };
        let (proxy, routed) = (self.clone(), route.clone());
        let inner = tower::service_fn(move |req: Request<RequestBody>| {
            let (proxy, route) = (proxy.clone(), routed.clone());
            let served = proxy.serve(route, req);
            async move { Ok::<_, std::convert::Infallible>(served.await) }
        });
        let start = Instant::now();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        // Boxed as `Send` here, where the compiler can prove it (through the generic handler it
        // cannot: rust-lang/rust#64552).
        let answered: IdleAnswer = Box::pin(layer.layer(inner).oneshot(req));
        match answered.await {
            Ok(resp) => {
                // The layer's own answers (loading page, 503 after a failed wake) are counted here;
                // the upstream's were counted by `serve`.
                let mut resp = resp.map(|body| body.map_err(Into::into).boxed());
                if resp.extensions().get::<Served>().is_none() {
                    route.metrics.answered(resp.status(), start.elapsed());
                    access_log(&route.name, &method, &path, resp.status(), start);
                    resp.extensions_mut().get_or_insert(crate::reply::Own(""));
                }
                resp
            }
            Err(never) => match never {},
        }
    }

    /// [`serve_on`](Self::serve_on), boxed as `Send` where the compiler can prove it (for the
    /// idle layer's inner service).
    fn serve(
        self: Arc<Self>,
        route: Arc<Route>,
        req: Request<RequestBody>,
    ) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>> {
        Box::pin(async move {
            let mut resp = self.serve_route(route, req).await;
            // Tells `handle` this response is counted (only the idle layer's path needs it).
            resp.extensions_mut().insert(Served);
            resp
        })
    }

    /// Serves one request on `route`: the short path when the route has no agents; the
    /// agents' path, whose future is several kilobytes, boxed, so that this future (moved into
    /// a box by the server on every request) stays small.
    async fn serve_route(
        self: Arc<Self>,
        route: Arc<Route>,
        req: Request<RequestBody>,
    ) -> Response<ResponseBody> {
        if route.agents.is_empty() {
            self.serve_plain(route, req).await
        } else {
            Box::pin(self.serve_on(route, req)).await
        }
    }

    /// Serves one request on `route`, which has no agents: upstream, response. (What
    /// [`serve_on`](Self::serve_on) does on such a route, without its bookkeeping for agents.)
    async fn serve_plain(
        self: Arc<Self>,
        route: Arc<Route>,
        req: Request<RequestBody>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let client_addr = req.extensions().get::<httpserver_pool::ClientAddr>().map(|c| c.0);
        let (resp, _) =
            self.forward(&route, req.map(|b| b.map_err(Into::into).boxed()), client_addr, None).await;
        record(&route, resp, &method, uri.path(), start)
    }

    /// Serves one request on `route`: agents, upstream, response.
    async fn serve_on(
        self: Arc<Self>,
        route: Arc<Route>,
        mut req: Request<RequestBody>,
    ) -> Response<ResponseBody> {
        let route = &*route;
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let id = format!("gw-{}", self.ids.fetch_add(1, Ordering::Relaxed));
        let client_addr = req.extensions().get::<httpserver_pool::ClientAddr>().map(|c| c.0);
        let mut response_ops: Vec<HeaderOp> = Vec::new();
        let mut agent_status: Vec<String> = Vec::new();
        let mut asked: Vec<&str> = Vec::new();
        // The agents see the request's own headers, moved into the event (not copied) while they
        // are asked — each agent's header changes apply there, for the next agent to see — and
        // moved back before the request goes upstream.
        let mut event = Event::RequestHeaders(RequestHeaders {
            headers: std::mem::take(req.headers_mut()),
            client_addr,
            ..RequestHeaders::new(id.as_str(), req.method().clone(), req.uri().clone())
        });
        for agent in &route.agents {
            match self.pool.send(agent, &event).await {
                Ok(decision) => {
                    asked.push(agent);
                    if decision.audit.tags.iter().any(|t| t.starts_with("agentpool:")) {
                        // The pool answered for the agent (fail-open or flow control).
                        agent_status.push(format!("{agent}: skipped ({})", decision.audit.tags.join(",")));
                        metrics::counter!("gateway_agent_skipped_total", "route" => route.name.clone(), "agent" => agent.clone()).increment(1);
                    }
                    if let Some(resp) = self.apply(decision, &mut event, &mut response_ops) {
                        return self.finish(route, &id, &asked, resp, &method, &path, start);
                    }
                }
                Err(e) => {
                    metrics::counter!("gateway_agent_errors_total", "route" => route.name.clone(), "agent" => agent.clone()).increment(1);
                    tracing::warn!(route = %route.name, agent = %agent, error = %e, "agent could not answer");
                    match route.failure_mode {
                        FailureMode::Closed => {
                            let mut resp = plain(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "an agent this route needs is unavailable\n",
                            );
                            set_status_header(
                                resp.headers_mut(),
                                &[format!("{agent}: unavailable, failing closed")],
                            );
                            return self.finish(route, &id, &asked, resp, &method, &path, start);
                        }
                        FailureMode::Open => agent_status.push(format!("{agent}: unavailable, failing open")),
                    }
                }
            }
        }
        if let Event::RequestHeaders(asked_about) = event {
            *req.headers_mut() = asked_about.headers;
        }
        // An upgrade to WebSocket whose frames agents take is relayed frame by frame.
        let frames = self.frame_watch(route, &asked, &id, &mut req);
        // Agents that take the request's body see it chunk by chunk on its way to the upstream.
        let body_agents: Vec<String> = asked
            .iter()
            .filter(|a| self.pool.supports(a, EventKind::RequestBody))
            .map(|a| a.to_string())
            .collect();
        let ((mut resp, from_upstream), inspected) = if body_agents.is_empty() {
            (self.forward(route, req.map(|b| b.map_err(Into::into).boxed()), client_addr, frames).await, None)
        } else {
            let limit = body_agents.iter().filter_map(|a| self.pool.capabilities(a)?.max_body_size).min();
            let declared =
                req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if let (Some(limit), Some(size)) = (limit, declared)
                && size > limit
            {
                return self.finish(route, &id, &asked, inspect::too_large(), &method, &path, start);
            }
            let (sender, channel) = Channel::<Bytes, httpserver_pool::BoxError>::new(1);
            let (parts, body) = req.into_parts();
            let inspector = Inspector {
                pool: self.pool.clone(),
                agents: body_agents,
                id: id.clone(),
                limit,
                declared,
                failure_mode: route.failure_mode,
                route: route.name.clone(),
            };
            let upstream_req = Request::from_parts(parts, channel.boxed());
            let (forwarded, inspected) = tokio::join!(
                self.forward(route, upstream_req, client_addr, frames),
                inspector.run(body, sender)
            );
            (forwarded, Some(inspected))
        };
        match inspected {
            Some(Inspection::Refused(answer)) => {
                return self.finish(route, &id, &asked, answer, &method, &path, start);
            }
            Some(Inspection::ClientGone) => {
                let answer = plain(StatusCode::BAD_REQUEST, "the request body broke off\n");
                return self.finish(route, &id, &asked, answer, &method, &path, start);
            }
            Some(Inspection::Passed(skipped)) => agent_status.extend(skipped),
            None => {}
        }
        if from_upstream {
            // Agents that take the response's headers see them (on the connection that saw the
            // request: correlation affinity) and may change or replace the response.
            // The response's own headers, moved into the event while agents see them and back
            // after, as the request's are.
            let event = Event::ResponseHeaders(ResponseHeaders {
                correlation_id: id.as_str().into(),
                status: resp.status(),
                headers: std::mem::take(resp.headers_mut()),
            });
            for agent in &asked {
                if !self.pool.supports(agent, EventKind::ResponseHeaders) {
                    continue;
                }
                match self.pool.send(agent, &event).await {
                    Ok(decision) if matches!(decision.action, Action::Allow) => {
                        response_ops.extend(decision.response_headers);
                    }
                    Ok(decision) => {
                        let resp = respond(decision);
                        return self.finish(route, &id, &asked, resp, &method, &path, start);
                    }
                    Err(e) => {
                        metrics::counter!("gateway_agent_errors_total", "route" => route.name.clone(), "agent" => agent.to_string()).increment(1);
                        tracing::warn!(route = %route.name, agent = %agent, error = %e, "agent could not answer on the response");
                        match route.failure_mode {
                            FailureMode::Closed => {
                                let mut resp = plain(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "an agent this route needs is unavailable\n",
                                );
                                set_status_header(
                                    resp.headers_mut(),
                                    &[format!("{agent}: unavailable, failing closed")],
                                );
                                return self.finish(route, &id, &asked, resp, &method, &path, start);
                            }
                            FailureMode::Open => {
                                agent_status.push(format!("{agent}: unavailable, failing open"))
                            }
                        }
                    }
                }
            }
            if let Event::ResponseHeaders(seen) = event {
                *resp.headers_mut() = seen.headers;
            }
        }
        for op in &response_ops {
            op.apply(resp.headers_mut());
        }
        if !agent_status.is_empty() {
            set_status_header(resp.headers_mut(), &agent_status);
        }
        // Agents that take the response's body see it chunk by chunk on its way to the client;
        // `RequestComplete` follows once it has been streamed.
        let body_agents: Vec<String> = if from_upstream
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && !resp.body().is_end_stream()
        {
            asked
                .iter()
                .filter(|a| self.pool.supports(a, EventKind::ResponseBody))
                .map(|a| a.to_string())
                .collect()
        } else {
            Vec::new()
        };
        if body_agents.is_empty() {
            return self.finish(route, &id, &asked, resp, &method, &path, start);
        }
        // A chunk an agent replaces may change the body's length.
        let declared = resp
            .headers_mut()
            .remove(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let completion = response_body::Completion {
            asked: asked.iter().map(|a| a.to_string()).collect(),
            status: resp.status(),
            start,
        };
        let inspector = ResponseInspector::new(
            self.pool.clone(),
            body_agents,
            id,
            declared,
            route.failure_mode,
            route.name.clone(),
            completion,
        );
        let resp = resp.map(|body| inspector.pipe(body));
        record(route, resp, &method, &path, start)
    }

    /// Applies an agent's decision on a request: request-header changes go into the headers of
    /// `event` (the request's own, moved there while agents are asked), response-header changes are
    /// kept for the response; a block, redirect or challenge is the
    /// response.
    fn apply(
        &self,
        decision: Decision,
        event: &mut Event,
        response_ops: &mut Vec<HeaderOp>,
    ) -> Option<Response<ResponseBody>> {
        if let Action::Allow = decision.action {
            if let Event::RequestHeaders(request) = event {
                for op in &decision.request_headers {
                    op.apply(&mut request.headers);
                }
            }
            response_ops.extend(decision.response_headers);
            return None;
        }
        Some(respond(decision))
    }

    /// For a WebSocket upgrade some of whose agents take frames: what relaying its frames
    /// needs; the offer of extensions is taken out of the request (the frames are read, so
    /// nothing may compress them). `None` otherwise: a raw splice.
    fn frame_watch(
        &self,
        route: &Route,
        asked: &[&str],
        id: &str,
        req: &mut Request<RequestBody>,
    ) -> Option<FrameWatch> {
        let protocol = upgrade_protocol(req.headers())?;
        if !protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
            return None;
        }
        let agents: Vec<String> = asked
            .iter()
            .filter(|a| self.pool.supports(a, EventKind::WebSocketFrame))
            .map(|a| a.to_string())
            .collect();
        if agents.is_empty() {
            return None;
        }
        req.headers_mut().remove(HeaderName::from_static("sec-websocket-extensions"));
        let watch = FrameWatch {
            pool: self.pool.clone(),
            agents,
            id: id.to_owned(),
            route: route.name.clone(),
            failure_mode: route.failure_mode,
            max_frame: route.max_websocket_frame,
        };
        Some(watch.limited())
    }

    /// Sends the request to the route's upstream and streams the answer back; the flag says
    /// whether the upstream answered (false: the gateway's own 400 / 502 / 504). An upgrade
    /// the upstream accepts is spliced raw, or relayed frame by frame through `frames`.
    async fn forward(
        &self,
        route: &Route,
        mut req: Request<UpstreamBody>,
        client: Option<SocketAddr>,
        frames: Option<FrameWatch>,
    ) -> (Response<ResponseBody>, bool) {
        let upstream = &route.upstream;
        // An upgrade (a WebSocket) keeps its Connection and Upgrade headers, and the client's
        // side of it is taken before the request goes on.
        let upgrade = upgrade_protocol(req.headers());
        if upgrade.is_some() && upstream.http2 {
            tracing::info!(route = %route.name, upstream = %upstream.name, "an upgrade to an HTTP/2 upstream: refused");
            return (
                plain(StatusCode::NOT_IMPLEMENTED, "this upstream takes no upgrades (it speaks HTTP/2)\n"),
                false,
            );
        }
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let path_and_query =
            parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.version = http::Version::HTTP_11;
        // `TE: trailers` is the one TE an HTTP/2 request carries (gRPC sends it); hop by hop
        // otherwise, like the rest.
        let te_trailers = upstream.http2
            && parts.headers.get_all(header::TE).iter().any(|v| {
                v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
            });
        upstream_headers(&mut parts.headers, upgrade.as_ref(), client);
        if te_trailers {
            parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // A request without a body that could not reach a URL (its connection failed) is tried
        // once more on another, when the upstream has another: nothing of it was sent. Only then
        // are its headers copied for the second try.
        let retryable = upstream.bases.len() > 1
            && body.is_end_stream()
            && matches!(parts.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
        // A body still being sent when the upstream's time-out ends may be the client's
        // slowness as much as the upstream's: such a time-out does not count against the URL.
        let sent = (!body.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let body = match &sent {
            Some(flag) => SentFlag { inner: body, sent: flag.clone() }.boxed(),
            None => body,
        };
        let mut body = Some(body);
        let mut tried = Vec::new();
        loop {
            let Some(i) = upstream.pick(&tried) else {
                return (plain(StatusCode::BAD_GATEWAY, "the upstream failed\n"), false);
            };
            tried.push(i);
            let base = &upstream.bases[i];
            let mut attempt =
                Request::new(body.take().unwrap_or_else(|| Empty::new().map_err(Into::into).boxed()));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = Uri::from(path_and_query.clone());
            *attempt.version_mut() = parts.version;
            // Only a request that may be retried keeps a copy of its headers.
            *attempt.headers_mut() =
                if retryable { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
            let deadline = Instant::now() + upstream.timeout;
            match tokio::time::timeout_at(
                deadline,
                self.client.send(&base.authority, &base.stack, deadline, attempt),
            )
            .await
            {
                Ok(Ok(mut resp)) => {
                    upstream.succeeded(i);
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client_side) = client_side
                    {
                        splice(route.name.clone(), client_side, hyper::upgrade::on(&mut resp), frames);
                        let (parts, body) = resp.into_parts();
                        return (Response::from_parts(parts, body.map_err(Into::into).boxed()), true);
                    }
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    // The client's connection says which version it is answered in.
                    parts.version = http::Version::HTTP_11;
                    return (Response::from_parts(parts, body.map_err(Into::into).boxed()), true);
                }
                Ok(Err(e)) if e.is_busy() => {
                    // The gateway's own cap, not the upstream's failure: it is not counted
                    // against the URL's health, and the client may try again.
                    tracing::warn!(route = %route.name, upstream = %upstream.name, error = %e, "no upstream connection free in time");
                    metrics::counter!("gateway_upstream_busy_total", "url" => base.authority.to_string())
                        .increment(1);
                    let mut resp = plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "every connection to the upstream is busy; try again\n",
                    );
                    resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                    return (resp, false);
                }
                Ok(Err(e)) if e.is_request_body() => {
                    // The client's body broke off or was malformed (a chunk size that does not
                    // parse…): a bad request, and the upstream, which saw it cut short, is not
                    // charged — a client must not be able to eject a healthy URL.
                    tracing::info!(route = %route.name, upstream = %upstream.name, error = %e, "the request body failed");
                    return (
                        plain(StatusCode::BAD_REQUEST, "the request body broke off or was malformed\n"),
                        false,
                    );
                }
                Ok(Err(e)) => {
                    upstream.failed(i);
                    tracing::warn!(route = %route.name, upstream = %upstream.name, base = %upstream.bases[i].authority, error = %e, "upstream failed");
                    if retryable && e.is_connect() && tried.len() < upstream.bases.len() {
                        continue;
                    }
                    return (plain(StatusCode::BAD_GATEWAY, "the upstream failed\n"), false);
                }
                Err(_) => {
                    let body_done = sent.as_ref().is_none_or(|flag| flag.load(Ordering::Acquire));
                    if body_done {
                        upstream.failed(i);
                    }
                    tracing::warn!(route = %route.name, upstream = %upstream.name, base = %upstream.bases[i].authority, after = ?upstream.timeout, body_done, "upstream timed out");
                    return (
                        plain(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time\n"),
                        false,
                    );
                }
            }
        }
    }

    /// Counts and logs a finished request, and tells the agents that take it that the request
    /// is complete (which also ends its correlation affinity).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        route: &Route,
        id: &str,
        asked: &[&str],
        resp: Response<ResponseBody>,
        method: &http::Method,
        path: &str,
        start: Instant,
    ) -> Response<ResponseBody> {
        let resp = record(route, resp, method, path, start);
        response_body::complete(&self.pool, asked, id, resp.status(), start.elapsed(), 0);
        resp
    }
}

/// Counts and logs a request whose response (headers) is ready.
fn record(
    route: &Route,
    resp: Response<ResponseBody>,
    method: &http::Method,
    path: &str,
    start: Instant,
) -> Response<ResponseBody> {
    route.metrics.answered(resp.status(), start.elapsed());
    access_log(&route.name, method, path, resp.status(), start);
    resp
}

fn access_log(route: &str, method: &http::Method, path: &str, status: StatusCode, start: Instant) {
    tracing::info!(target: "access", route, %method, path, status = status.as_u16(), micros = start.elapsed().as_micros() as u64);
}

/// What the idle layer answers with.
type IdleAnswer = Pin<
    Box<
        dyn Future<Output = Result<Response<idlewatch::IdleBody<ResponseBody>>, std::convert::Infallible>>
            + Send,
    >,
>;

/// Marks a response `serve` has already counted and logged.
#[derive(Clone, Copy)]
struct Served;

/// Whether a route for `host` (lower case; any host when `None`) and path prefix `prefix`
/// takes a request for `request_host` (as [`request_host`] gives it) and `path`.
pub(crate) fn route_matches(
    host: Option<&str>,
    prefix: &str,
    request_host: Option<&str>,
    path: &str,
) -> bool {
    host.is_none_or(|h| request_host == Some(h)) && path_has_prefix(path, prefix)
}

/// A request whose target names its host (HTTP/1.1's absolute form, `GET http://host/path`, or
/// HTTP/2's `:authority`) is about that host, whatever its `Host` header says: HTTP/1.1 has a
/// proxy replace the header with the target's authority (RFC 9112, section 3.2.2), and HTTP/2
/// takes `:authority` over it (RFC 9113, section 8.3.1). The header is made to match at once,
/// so that the route (chosen by [`request_host`]), the agents and the upstream all see the one
/// host. Without it, `GET http://public.example/ HTTP/1.1` with `Host: admin.example` would take
/// the route of the public host and reach the upstream as a request for the admin one. Any
/// user information before an `@` is left out, as [`http::Uri::host`] leaves it out.
pub(crate) fn host_from_target<B>(req: &mut Request<B>) {
    let Some(authority) = req.uri().authority() else { return };
    let host = authority.as_str().rsplit('@').next().unwrap_or_default();
    if req.headers().get(header::HOST).is_some_and(|h| h.as_bytes() == host.as_bytes()) {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, value);
    }
}

/// Refuses what RFC 9112 (section 3.2) has a server refuse, and what would let the gateway and
/// the upstream read different hosts: more than one `Host` header (the gateway would route on
/// the first, a server may take the last), one that is no `host[:port]`, and an HTTP/1.1
/// request with neither a `Host` header nor a host in its target. The error is the 400's text.
pub(crate) fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host header\n"),
        (Some(host), None) => match std::str::from_utf8(host.as_bytes()).ok().map(str::parse::<Authority>) {
            Some(Ok(authority)) if !authority.as_str().contains('@') => Ok(()),
            _ => Err("the Host header is not host[:port]\n"),
        },
        (None, _) if req.version() == http::Version::HTTP_11 && req.uri().authority().is_none() => {
            Err("an HTTP/1.1 request needs a Host header\n")
        }
        (None, _) => Ok(()),
    }
}

/// Replaces the request's path with its normalized form ([`crate::path`]), keeping the rest of
/// its target; the error refuses the request.
pub(crate) fn normalize_path<B>(req: &mut Request<B>) -> Result<(), crate::path::PathError> {
    let std::borrow::Cow::Owned(path) = crate::path::normalize(req.uri().path())? else { return Ok(()) };
    let target = match req.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    // Made of the characters of a parsed path and query: it parses.
    if let Ok(path_and_query) = PathAndQuery::from_maybe_shared(target)
        && let Ok(uri) = Uri::from_parts({
            parts.path_and_query = Some(path_and_query);
            parts
        })
    {
        *req.uri_mut() = uri;
    }
    Ok(())
}

/// The host a request is for, as routes match it: the target's, else the `Host` header's, in
/// lower case and without the trailing dot of a fully qualified name (`admin.example.` is the
/// host `admin.example` to a resolver and to most servers).
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_owned).or_else(|| {
        let value = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(value.parse::<Authority>().ok()?.host().to_owned())
    })?;
    let host = raw.strip_suffix('.').filter(|h| !h.is_empty()).unwrap_or(&raw);
    Some(host.to_ascii_lowercase())
}

pub(crate) fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// Splices an upgraded client connection to the upgraded upstream connection, on its own task:
/// raw, or frame by frame through the agents of `frames`.
fn splice(
    route: String,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    frames: Option<FrameWatch>,
) {
    tokio::spawn(async move {
        match (client.await, upstream.await) {
            (Ok(client), Ok(upstream)) => {
                let gauge = metrics::gauge!("gateway_upgraded_connections", "route" => route.clone());
                gauge.increment(1.0);
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                if let Some(frames) = frames {
                    frames.relay(client, upstream).await;
                    gauge.decrement(1.0);
                    return;
                }
                let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                gauge.decrement(1.0);
                if let Err(e) = copied {
                    tracing::debug!(route = %route, error = %e, "upgraded connection ended");
                }
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(route = %route, error = %e, "upgrade failed"),
        }
    });
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` with `Upgrade: …`), if any.
pub(crate) fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks { headers.get(header::UPGRADE).cloned() } else { None }
}

/// The request's headers as they go upstream: the hop-by-hop ones dropped (an upgrade to
/// `protocol` gets `Connection: upgrade` and its `Upgrade` back), the client's address appended
/// to `X-Forwarded-For`.
pub(crate) fn upstream_headers(
    headers: &mut HeaderMap,
    upgrade: Option<&HeaderValue>,
    client: Option<SocketAddr>,
) {
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    if let Some(addr) = client {
        append_forwarded_for(headers, addr);
    }
}

/// The request body on its way upstream, noting when it has been sent whole.
struct SentFlag {
    inner: UpstreamBody,
    sent: Arc<AtomicBool>,
}

impl hyper::body::Body for SentFlag {
    type Data = Bytes;
    type Error = httpserver_pool::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.sent.store(true, Ordering::Release);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the few names there are tells, rather
    // than a hashed removal of each of the eight.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers named in Connection are hop-by-hop too — but not `Host`, which says what the
    // request is for: a client must not have the upstream see another host than the route's.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, addr: SocketAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", addr.ip()),
        None => addr.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(path_has_prefix("/anything", "/"));
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/v1", "/api/"));
        assert!(!path_has_prefix("/apiary", "/api"));
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
