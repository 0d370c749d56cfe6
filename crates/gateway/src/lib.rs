//! `gateway`: the reference reverse proxy of agentpool.
//!
//! Without a configuration file it starts a demo: a listener on `127.0.0.1:8080`, a built-in
//! upstream, the demo WAF agent on a Unix socket in a temporary directory (consulted on every
//! request through pool-core and transport-uds), and the admin listener on `127.0.0.1:9901`.
//! With `--config gateway.toml` it runs what the file says; `--check` validates a file and
//! reports every problem.
//!
//! SIGHUP (or `POST /admin/reload` on the admin listener) re-reads the configuration file:
//! a file with any problem changes nothing; an agent whose TLS files were rewritten in place
//! is replaced like one whose settings changed. SIGINT or SIGTERM stops it: listeners stop accepting, requests in flight finish (up to the
//! drain time-out), the agent pool drains; the exit code is 0 if nothing had to be cut off.
//!
//! The binary is a thin `fn main` over [`main_from_args`], the one public entry of this
//! library: other packages (the workspace's cross-crate tests) build the same gateway as their
//! own binary with it.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod admin;
mod config;
mod demo;
#[doc(hidden)]
pub mod fuzz;
mod inspect;
mod path;
mod proxy;
mod reply;
mod response_body;
mod upstream;
mod workloads;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use clap::Parser;
use httpserver_pool::{Handler, HttpServerConfig, Pool, ServerPoolConfig, WorkerOptions, Workers};
use metrics_exporter_prometheus::PrometheusBuilder;
use pool_api::Lifecycle;
use pool_core::{AgentPool, AgentSpec};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use transport_grpc::{GrpcConnector, GrpcConnectorConfig};
use transport_uds::UdsConnector;

use crate::admin::Admin;
use crate::config::{AgentConfig, GatewayConfig, ListenerConfig, RouteConfig, UpstreamConfig};
use crate::demo::Demo;
use crate::proxy::Proxy;

/// How often the metrics recorder drains its histogram samples when nobody scrapes.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The reference reverse proxy of agentpool.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A configuration file (TOML). Without one, the gateway runs its built-in demo.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the configuration, print every problem, and exit.
    #[arg(long)]
    check: bool,
    /// The demo's listener (without --config).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The demo's admin listener (without --config).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// Log lines as text or as JSON objects (one per line), on stderr; `RUST_LOG` filters them.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Runs the gateway as the `gateway` binary does, with `args` as its command line (the first
/// item is the program's name, as in [`std::env::args_os`]): parses it (printing help or a usage
/// error and exiting the process as clap does), sets up logging, builds a multi-threaded Tokio
/// runtime (and, unless the configuration's `workers` is 0, a worker thread per core for the
/// listeners' connections) and runs until SIGINT or SIGTERM. Returns the process's exit code.
///
/// It installs process-wide state (the log subscriber, the metrics recorder, signal handlers):
/// call it once per process, from `main`.
pub fn main_from_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(main_async(cli)),
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(cli: Cli) -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,access=info".into());
    // Log lines go through a buffer to a writer thread, so a request never waits on stderr
    // (under overload, lines beyond the buffer's 128k are dropped and counted, not waited for).
    let (writer, _flush_on_exit) = tracing_appender::non_blocking(std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (config, demo) = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let config = GatewayConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Err(e) = config.validate() {
                return Err(format!("{}: {e}", path.display()).into());
            }
            if cli.check {
                println!("{}: configuration is valid", path.display());
                return Ok(ExitCode::SUCCESS);
            }
            (config, None)
        }
        None if cli.check => return Err("--check needs --config FILE".into()),
        None => {
            let demo = Demo::start().await?;
            (demo_config(&demo, &cli), Some(demo))
        }
    };
    config.validate()?;

    let metrics = PrometheusBuilder::new().install_recorder()?;
    // The recorder keeps every histogram sample until it is drained: by a scrape of `/metrics`,
    // or by this upkeep. Without it a gateway nobody scrapes grows by every request's samples
    // (the soak found ~10 MiB a minute at 4k req/s).
    tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        }
    });
    describe_metrics();
    // The listeners' connections are served on threads of their own when `workers` asks for
    // them (thread per core); the agents' connections (Unix sockets and gRPC) are then spread
    // over the same threads, and a request asks an agent over a connection of its own thread.
    let workers = match config.worker_threads() {
        0 => None,
        n => Some(
            Workers::start_with(n, "gateway-worker", WorkerOptions::default().spin(config.worker_spin))
                .map_err(|e| format!("worker threads: {e}"))?,
        ),
    };
    let uds = match &workers {
        Some(w) => UdsConnector::default().spread_over(w.handles()),
        None => UdsConnector::default(),
    };
    let pool = AgentPool::new(config.pool.clone(), uds)?;
    let runtimes = workers.as_ref().map(Workers::handles).unwrap_or_default();
    let mut dialled = Dialled { files: std::collections::HashMap::new(), runtimes };
    for agent in &config.agents {
        add_agent(&pool, agent, &mut dialled).await?;
    }
    let workloads = Arc::new(workloads::Workloads::start(&config).await?);
    let upstream_tls = proxy::upstream_tls(&config)?;
    let proxy = Arc::new(Proxy::new(&config, &upstream_tls, pool.clone(), workloads.watchers.clone()));
    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let admin = Arc::new(Admin {
        metrics,
        pool: pool.clone(),
        proxy: proxy.clone(),
        workloads: workloads.clone(),
        listeners: ArcSwap::from_pointee(listener_names(&config)),
        allowed_hosts: ArcSwap::from_pointee(config.admin.allowed_hosts.clone()),
        token: arc_swap::ArcSwapOption::from(
            config.admin.read_token().map_err(|e| format!("admin.token_file: {e}"))?.map(Arc::new),
        ),
        ready: AtomicBool::new(false),
        reload: reload_tx,
    });
    let handlers = Handlers {
        workers,
        proxy: {
            let proxy = proxy.clone();
            Handler::from_fn(move |req| proxy.clone().handle(req))
        },
        admin: {
            let admin = admin.clone();
            Handler::from_fn(move |req| admin.clone().handle(req))
        },
    };
    let http = Pool::new();
    http.apply(&handlers.servers(&config)).await?;
    http.start().await?;
    admin.ready.store(true, Ordering::Release);

    let main = &config.listeners[0].bind;
    println!("gateway: listening on http://{main}, admin on http://{}", config.admin.bind);
    if let Some(demo) = &demo {
        println!(
            "  demo upstream on http://{}; demo WAF agent on unix:{}",
            demo.upstream,
            demo.agent_socket.display()
        );
        println!("  try:");
        println!("    curl -i http://{main}/hello        # allowed: the upstream answers, x-waf: checked");
        println!("    curl -i http://{main}/admin        # blocked by the WAF agent: 403");
        println!("    curl -s http://{}/status  # agents, connections, routes", config.admin.bind);
    }

    let mut running = config;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        let reply = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hangup.recv() => None,
            Some(reply) = reload_rx.recv() => Some(reply),
        };
        let outcome = match &cli.config {
            Some(path) => {
                reload(path, &mut running, &mut dialled, &pool, &proxy, &http, &handlers, &admin).await
            }
            None => Err("nothing to reload: the demo runs without --config".to_owned()),
        };
        match &outcome {
            Ok(summary) => tracing::info!(%summary, "configuration reloaded"),
            Err(problems) => tracing::error!(%problems, "configuration not reloaded; the running one stays"),
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
    tracing::info!("stopping: draining requests in flight");
    admin.ready.store(false, Ordering::Release);
    let report = tokio::time::timeout(running.drain_timeout, http.stop()).await;
    let pool_report = pool.shutdown().await;
    // Stop watching; the workloads stay as they are.
    workloads.stop().await;
    if let Some(demo) = demo {
        demo.stop().await;
    }
    let clean = match report {
        Ok(Ok(r)) => {
            println!(
                "gateway: stopped; {} connection(s) drained, {} cut off; agent requests: {} drained, {} cancelled",
                r.drained, r.forced, pool_report.drained, pool_report.forced
            );
            r.forced == 0 && pool_report.forced == 0
        }
        Ok(Err(e)) => {
            eprintln!("gateway: stopping the listeners failed: {e}");
            false
        }
        Err(_) => {
            eprintln!("gateway: the listeners did not stop within {:?}", running.drain_timeout);
            false
        }
    };
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The gateway's own metrics, described for the exporter (HELP lines).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!("gateway_requests_total", "Requests answered, by route and status.");
    describe_counter!(
        "gateway_admin_unauthorized_total",
        "Admin requests refused for want of the [admin] token_file's bearer token."
    );
    describe_histogram!(
        "gateway_request_duration_seconds",
        Unit::Seconds,
        "Time to answer a request (headers), by route."
    );
    describe_counter!(
        "gateway_agent_errors_total",
        "Agent calls that failed (down, paused, timed out), by route and agent."
    );
    describe_counter!(
        "gateway_agent_skipped_total",
        "Requests an agent's pool let through without it (fail-open, flow control)."
    );
    describe_counter!(
        "gateway_response_aborted_total",
        "Responses cut off after their headers because an agent refused a body chunk (or could not answer on a fail-closed route)."
    );
    describe_counter!(
        "gateway_response_body_uninspected_total",
        "Response bodies an agent was shown no more of: over its max_body_size, or unavailable on a fail-open route."
    );
    describe_counter!(
        "gateway_upstream_connection_waits_total",
        "Requests that found an upstream URL at its max_connections and waited for a connection."
    );
    describe_counter!(
        "gateway_upstream_busy_total",
        "Requests answered 503 because no connection to an upstream URL came free within its timeout."
    );
    describe_counter!(
        "gateway_websocket_closed_total",
        "WebSocket connections the gateway closed itself, by route and close code."
    );
}

/// The two handlers, made once: a reload swaps what they read, not the handlers; and the
/// threads the listeners' connections are served on.
struct Handlers {
    proxy: Handler,
    admin: Handler,
    workers: Option<Workers>,
}

impl Handlers {
    fn servers(&self, config: &GatewayConfig) -> ServerPoolConfig {
        let mut servers: Vec<HttpServerConfig> = config
            .listeners
            .iter()
            .map(|l| {
                let server = l.server().with_handler(self.proxy.clone());
                match &self.workers {
                    Some(workers) => server.with_workers(workers.clone()),
                    None => server,
                }
            })
            .collect();
        servers
            .push(HttpServerConfig::new("admin", config.admin.bind.clone()).with_handler(self.admin.clone()));
        ServerPoolConfig { servers }
    }
}

fn listener_names(config: &GatewayConfig) -> Vec<(String, String)> {
    config.listeners.iter().map(|l| (l.name.clone(), l.bind.clone())).collect()
}

/// Why an agent could not be added.
#[derive(Debug, thiserror::Error)]
enum AddAgentError {
    /// Its TLS material could not be loaded (changed since it was validated).
    #[error("agent {agent}: {source}")]
    Tls {
        /// The agent.
        agent: String,
        /// What is wrong.
        source: config::ClientTlsError,
    },
    /// The pool refused it.
    #[error(transparent)]
    Pool(#[from] pool_core::PoolError),
}

/// How agents are dialled: the TLS files each one was dialled with, by agent name (`None`: no
/// TLS), and the worker runtimes gRPC agents' connections are spread over (none: the main
/// runtime).
struct Dialled {
    files: std::collections::HashMap<String, Option<config::ClientTlsFiles>>,
    runtimes: Vec<tokio::runtime::Handle>,
}

/// Reads the agent's TLS files, if it has any.
fn read_tls(agent: &AgentConfig) -> Result<Option<config::ClientTlsFiles>, AddAgentError> {
    let tls = agent.tls.as_ref().map(config::ClientTls::read).transpose();
    tls.map_err(|source| AddAgentError::Tls { agent: agent.name.clone(), source })
}

/// Adds a new agent, and notes the TLS files it was dialled with in `dialled`.
async fn add_agent(
    pool: &AgentPool,
    agent: &AgentConfig,
    dialled: &mut Dialled,
) -> Result<(), AddAgentError> {
    let files = read_tls(agent)?;
    register(pool, agent, Registration::Add, files.as_ref(), &dialled.runtimes).await?;
    dialled.files.insert(agent.name.clone(), files);
    Ok(())
}

/// How [`register`] puts an agent into the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Registration {
    /// A name the pool does not hold yet.
    Add,
    /// A name the pool holds, with other settings: the new agent connects first and takes
    /// the old one's place at once, and the old one drains in the background
    /// (`AgentPool::replace_agent`), so no request finds the name unknown or unconnected.
    Replace,
}

/// Puts `agent` into the pool, dialling with the TLS `files` read from its settings.
async fn register(
    pool: &AgentPool,
    agent: &AgentConfig,
    how: Registration,
    files: Option<&config::ClientTlsFiles>,
    runtimes: &[tokio::runtime::Handle],
) -> Result<(), AddAgentError> {
    let mut spec = AgentSpec::new(agent.name.clone()).endpoints(agent.endpoints.iter().map(String::as_str));
    if agent.endpoints.iter().any(|e| config::is_grpc(e)) {
        // The pool dials UDS endpoints itself; gRPC agents get transport-grpc's connector, one
        // per agent, with the agent's own TLS settings for grpcs:// endpoints; its connections
        // are spread over the worker threads, as the UDS agents' are.
        let server_name = agent.tls.as_ref().and_then(|t| t.server_name.as_deref());
        let tls = files
            .map(|f| f.build(server_name))
            .transpose()
            .map_err(|source| AddAgentError::Tls { agent: agent.name.clone(), source })?;
        let config = GrpcConnectorConfig { tls, ..GrpcConnectorConfig::default() };
        spec = spec.connector(Arc::new(GrpcConnector::new(config).spread_over(runtimes.to_vec())));
    }
    let report = match how {
        Registration::Add => pool.add_agent(spec).await?,
        Registration::Replace => pool.replace_agent(spec).await?,
    };
    let what = if how == Registration::Add { "agent added" } else { "agent replaced" };
    tracing::info!(agent = %agent.name, connected = report.connected, slots = report.slots, "{what}");
    if report.connected == 0 {
        // Registered all the same and retried in the background; say why it is not up.
        let errors: Vec<String> = pool
            .health(&agent.name)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.last_error)
            .map(|e| e.0)
            .collect();
        tracing::warn!(agent = %agent.name, errors = ?errors, "agent unreachable for now (retried in the background)");
    }
    Ok(())
}

/// Re-reads `path` and moves the running gateway to it: agents first (new ones added, changed
/// ones replaced), then the routes (swapped at once), then the listeners (httpserver-pool's
/// apply: open connections finish where they are), then agents no route needs any more are
/// drained, once the requests that matched an old route naming them are done. A configuration
/// with any problem changes nothing.
#[allow(clippy::too_many_arguments)]
async fn reload(
    path: &std::path::Path,
    running: &mut GatewayConfig,
    dialled: &mut Dialled,
    pool: &AgentPool,
    proxy: &Proxy,
    http: &Pool,
    handlers: &Handlers,
    admin: &Admin,
) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let next = GatewayConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    next.validate().map_err(|e| format!("{}: {e}", path.display()))?;
    if next.pool != running.pool {
        return Err("[pool] settings cannot change while running; restart the gateway for them".into());
    }
    if next.workloads != running.workloads {
        return Err("[[workloads]] cannot change while running; restart the gateway for them".into());
    }
    if next.workers != running.workers || next.worker_spin != running.worker_spin {
        return Err(
            "workers and worker_spin cannot change while running; restart the gateway for them".into()
        );
    }
    if next.docker_hosts != running.docker_hosts {
        return Err("[[docker_hosts]] cannot change while running; restart the gateway for them".into());
    }
    // Read before any agent changes: a file that went bad refuses the whole reload.
    let upstream_tls = proxy::upstream_tls(&next)?;
    let token = next.admin.read_token().map_err(|e| format!("admin.token_file: {e}"))?;
    let renewed_hosts = admin.workloads.read_tls(&next)?;
    let old: std::collections::HashMap<&str, &AgentConfig> =
        running.agents.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut added = Vec::new();
    let mut replaced = Vec::new();
    for agent in &next.agents {
        let failed = |e: AddAgentError| format!("agent {}: {e}", agent.name);
        match old.get(agent.name.as_str()) {
            None => {
                add_agent(pool, agent, dialled).await.map_err(failed)?;
                added.push(agent.name.clone());
            }
            Some(before) => {
                // The same settings may name files rewritten since (a renewed certificate at
                // the same path): their bytes are compared with those the agent was dialled with.
                let files = read_tls(agent).map_err(failed)?;
                let rewritten = dialled.files.get(&agent.name).is_some_and(|d| *d != files);
                if *before == agent && !rewritten {
                    continue;
                }
                // The pool keys agents by name: the new endpoints come up, then take the old
                // ones' place at once; the old ones drain in the background, requests on them
                // finishing there. A new setting the pool refuses leaves the old agent running.
                register(pool, agent, Registration::Replace, files.as_ref(), &dialled.runtimes)
                    .await
                    .map_err(failed)?;
                dialled.files.insert(agent.name.clone(), files);
                replaced.push(agent.name.clone());
            }
        }
    }
    let before = proxy.routes();
    proxy.set_routes(&next, &upstream_tls);
    let report = http.apply(&handlers.servers(&next)).await.map_err(|e| format!("listeners: {e}"))?;
    admin.listeners.store(Arc::new(listener_names(&next)));
    admin.allowed_hosts.store(Arc::new(next.admin.allowed_hosts.clone()));
    admin.token.store(token.map(Arc::new));
    let renewed_hosts = admin.workloads.apply_tls(renewed_hosts)?;
    let keep: std::collections::HashSet<&str> = next.agents.iter().map(|a| a.name.as_str()).collect();
    let removed: Vec<String> =
        running.agents.iter().filter(|a| !keep.contains(a.name.as_str())).map(|a| a.name.clone()).collect();
    if !removed.is_empty() {
        // Requests that matched a route of the old configuration may not have asked its agents
        // yet: an agent is removed once no request holds an old route naming it (or after the
        // drain time-out), not under them.
        let deadline = tokio::time::Instant::now() + next.drain_timeout;
        let in_use = || {
            before.iter().any(|r| Arc::strong_count(r) > 1 && r.agents.iter().any(|a| removed.contains(a)))
        };
        while in_use() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    drop(before);
    for agent in &removed {
        let _ = pool.remove_agent(agent).await;
        dialled.files.remove(agent);
    }
    let summary = format!(
        "{} route(s); agents added {added:?}, replaced {replaced:?}, removed {removed:?}; docker hosts with new TLS material {renewed_hosts:?}; listeners: {report:?}",
        next.routes.len()
    );
    *running = next;
    Ok(summary)
}

/// The configuration of the demo: one listener, the demo upstream, the demo WAF on every request.
fn demo_config(demo: &Demo, cli: &Cli) -> GatewayConfig {
    GatewayConfig {
        listeners: vec![ListenerConfig {
            name: "main".into(),
            bind: cli.listen.clone(),
            tls: None,
            limits: Default::default(),
            timeouts: Default::default(),
            h2c: false,
        }],
        admin: config::AdminConfig { bind: cli.admin.clone(), ..config::AdminConfig::default() },
        routes: vec![RouteConfig {
            name: "demo".into(),
            host: None,
            path_prefix: "/".into(),
            upstream: "demo".into(),
            agents: vec!["waf".into(), "waf-grpc".into()],
            failure_mode: pool_core::FailureMode::Closed,
            workload: None,
            max_websocket_frame: ws::DEFAULT_MAX_FRAME,
        }],
        upstreams: vec![UpstreamConfig {
            name: "demo".into(),
            urls: vec![format!("http://{}", demo.upstream)],
            timeout: std::time::Duration::from_secs(30),
            max_failures: 3,
            eject_for: std::time::Duration::from_secs(10),
            max_connections: config::default_max_connections(),
            max_idle: config::default_max_idle(),
            idle_timeout: config::default_idle_timeout(),
            read_timeout: config::default_read_timeout(),
            tls: None,
            http2: false,
            http2_keep_alive: config::default_http2_keep_alive(),
        }],
        agents: vec![
            AgentConfig {
                name: "waf".into(),
                endpoints: vec![format!("unix:{}", demo.agent_socket.display())],
                tls: None,
            },
            AgentConfig { name: "waf-grpc".into(), endpoints: vec![demo.grpc_endpoint.clone()], tls: None },
        ],
        docker_hosts: Vec::new(),
        workloads: Vec::new(),
        pool: pool_core::PoolConfig { proxy_id: "gateway".into(), ..Default::default() },
        drain_timeout: std::time::Duration::from_secs(30),
        workers: None,
        worker_spin: config::default_worker_spin(),
    }
}
