//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`, `/status` (JSON).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode, header};
use httpserver_pool::{RequestBody, ResponseBody, full};
use metrics_exporter_prometheus::PrometheusHandle;
use pool_core::AgentPool;
use serde_json::json;

use crate::config::AdminToken;
use crate::proxy::Proxy;
use crate::reply::plain;
use crate::workloads::{HostState, Workloads};

/// What the admin endpoints read.
pub(crate) struct Admin {
    /// Renders the Prometheus text.
    pub metrics: PrometheusHandle,
    /// The agent pool.
    pub pool: AgentPool,
    /// The proxy (routes).
    pub proxy: Arc<Proxy>,
    /// The idle-watched workloads and their engines.
    pub workloads: Arc<Workloads>,
    /// Listener names and binds, for status.
    pub listeners: arc_swap::ArcSwap<Vec<(String, String)>>,
    /// `[admin] allowed_hosts`: names answered besides IP addresses and `localhost`.
    pub allowed_hosts: arc_swap::ArcSwap<Vec<String>>,
    /// `[admin] token_file`'s token: when set, everything but the probes needs it.
    pub token: arc_swap::ArcSwapOption<AdminToken>,
    /// False from the moment a stop begins.
    pub ready: AtomicBool,
    /// Asks the main task to reload the configuration; the answer says what changed, or why
    /// nothing did.
    pub reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>,
}

impl Admin {
    /// Serves one admin request.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<RequestBody>) -> Response<ResponseBody> {
        if let Err(refusal) = self.check_addressed(&req) {
            return plain(StatusCode::FORBIDDEN, refusal);
        }
        if !self.authorized(&req) {
            metrics::counter!("gateway_admin_unauthorized_total").increment(1);
            let mut resp = plain(
                StatusCode::UNAUTHORIZED,
                "the admin needs its token: Authorization: Bearer <[admin] token_file's token>\n",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"admin\""));
            return resp;
        }
        match req.uri().path() {
            "/admin/reload" if req.method() == http::Method::POST => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let answer = match self.reload.send(tx).await {
                    Ok(()) => rx.await.unwrap_or_else(|_| Err("the gateway is stopping".into())),
                    Err(_) => Err("the gateway is stopping".into()),
                };
                let (status, text) = match answer {
                    Ok(summary) => (StatusCode::OK, format!("reloaded: {summary}\n")),
                    Err(problems) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("not reloaded, the running configuration stays:\n{problems}\n"),
                    ),
                };
                let mut resp = Response::new(full(text));
                *resp.status_mut() = status;
                resp
            }
            "/admin/reload" => plain(StatusCode::METHOD_NOT_ALLOWED, "POST to reload\n"),
            "/metrics" => {
                let mut resp = Response::new(full(self.metrics.render()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8".parse().expect("valid"),
                );
                resp
            }
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready.load(Ordering::Acquire) => plain(StatusCode::OK, "ready\n"),
            "/readyz" => plain(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
            "/status" => {
                let mut resp = Response::new(full(serde_json::to_vec_pretty(&self.status()).expect("JSON")));
                resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("valid"));
                resp
            }
            _ => plain(
                StatusCode::NOT_FOUND,
                "admin: /metrics, /healthz, /readyz, /status, POST /admin/reload\n",
            ),
        }
    }

    /// Refuses what a web page in a browser could send here: a request addressed by a name the
    /// admin does not answer to (a DNS-rebound page's own name: only IP addresses, `localhost`
    /// and `allowed_hosts` are answered), and a reload with an `Origin` (a cross-site form
    /// posted by a browser; curl and scripts send none). The error is the 403's text.
    fn check_addressed<B>(&self, req: &Request<B>) -> Result<(), &'static str> {
        const NOT_OURS: &str =
            "the admin answers requests addressed to an IP address, localhost or [admin] allowed_hosts\n";
        let host = match (req.uri().host(), req.headers().get(header::HOST)) {
            (Some(host), _) => Some(host.to_owned()),
            (None, Some(value)) => {
                let authority = value.to_str().ok().and_then(|v| v.parse::<http::uri::Authority>().ok());
                Some(authority.ok_or(NOT_OURS)?.host().to_owned())
            }
            (None, None) => None,
        };
        if let Some(host) = host {
            let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
            let known = host.parse::<std::net::IpAddr>().is_ok()
                || host == "localhost"
                || self.allowed_hosts.load().iter().any(|h| h.eq_ignore_ascii_case(&host));
            if !known {
                return Err(NOT_OURS);
            }
        }
        if req.uri().path() == "/admin/reload" && req.headers().contains_key(header::ORIGIN) {
            return Err("a reload is not taken from a web page (the request has an Origin)\n");
        }
        Ok(())
    }

    /// Whether `req` may be answered: always for the probes (`/healthz`, `/readyz`), which
    /// say nothing an orchestrator's probe should need a secret for; otherwise only with the
    /// token, when there is one.
    fn authorized<B>(&self, req: &Request<B>) -> bool {
        if matches!(req.uri().path(), "/healthz" | "/readyz") {
            return true;
        }
        match &*self.token.load() {
            None => true,
            Some(token) => {
                let mut given = req.headers().get_all(header::AUTHORIZATION).iter();
                // Exactly one Authorization header, and it carries the token.
                match (given.next(), given.next()) {
                    (Some(value), None) => token.admits(value.as_bytes()),
                    _ => false,
                }
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let agents: Vec<_> = self
            .pool
            .all_agent_stats()
            .into_iter()
            .map(|a| {
                let connections: Vec<_> = self
                    .pool
                    .health(&a.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| {
                        json!({
                            "label": c.label,
                            "endpoint": c.endpoint,
                            "connected": c.connected,
                            "state": format!("{:?}", c.state),
                            "in_flight": c.in_flight,
                            "requests": c.requests,
                            "failures": c.failures,
                            "last_error": c.last_error.map(|(error, _)| error),
                            "worker": c.worker,
                        })
                    })
                    .collect();
                let endpoints: Vec<_> = a
                    .endpoints
                    .iter()
                    .map(|e| json!({ "endpoint": e.endpoint, "breaker": format!("{:?}", e.breaker), "ejected": e.ejected }))
                    .collect();
                json!({
                    "id": a.id,
                    "healthy": a.is_healthy,
                    "requests": a.totals.requests,
                    "failures": a.totals.failures,
                    "in_flight": a.totals.in_flight,
                    "endpoints": endpoints,
                    "connections": connections,
                })
            })
            .collect();
        let routes: Vec<_> =
            self.proxy.routes().iter().map(|r| json!({ "name": r.name, "agents": r.agents })).collect();
        let listeners: Vec<_> =
            self.listeners.load().iter().map(|(n, b)| json!({ "name": n, "bind": b })).collect();
        let mut workloads: Vec<_> = self
            .proxy
            .workloads()
            .iter()
            .map(|(name, watcher)| {
                let snapshot = watcher.subscribe().borrow().clone();
                let host = self.workloads.host(name);
                json!({
                    "name": name,
                    "target": watcher.config().workload.name(),
                    "host": host.name,
                    "watching": pool_api::Lifecycle::is_running(watcher),
                    "state": format!("{:?}", snapshot.state),
                    "error": host.error,
                })
            })
            .collect();
        workloads.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let docker_hosts: Vec<_> = self
            .workloads
            .remote_hosts()
            .map(|h| {
                let (state, attempts, error) = match h.state() {
                    HostState::Watching => ("watching", None, None),
                    HostState::Connecting { attempts, error } => ("connecting", Some(attempts), error),
                };
                json!({ "name": h.name, "url": h.url, "state": state, "attempts": attempts, "last_error": error })
            })
            .collect();
        json!({
            "ready": self.ready.load(Ordering::Acquire),
            "workloads": workloads,
            "docker_hosts": docker_hosts,
            "listeners": listeners,
            "routes": routes,
            "agents": agents,
            "sticky_sessions": self.pool.sticky_sessions().len(),
        })
    }
}
