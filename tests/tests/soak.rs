//! The soak (`cargo xtask soak [--time DURATION] [--seed N]`; ignored by a plain `cargo test`).
//!
//! The gateway process under steady load with a UDS agent process, a gRPC agent process and an
//! idle-watched Docker container upstream, while a fault script, on a schedule drawn from the
//! seed, does one fault at a time: SIGKILLs an agent and restarts it, stops it (SIGSTOP: a
//! silent agent), makes it slow (SIGUSR1: each decision delayed), puts a process answering junk
//! on its socket or port (garbage), pauses its flow control (SIGUSR2), reloads the gateway's
//! configuration, stops the container from outside (`docker stop`), restarts the upstream
//! (stopped, then bound again on the same port). `SOAK_SECONDS` (default 60) bounds it,
//! `SOAK_SEED` picks the schedule (default: from the clock, printed), `SOAK_CLIENTS` sets the
//! load's clients (default 12), `SOAK_FAULTS` (comma-separated parts of the faults' names, e.g.
//! `slow,kill`) keeps only those faults.
//!
//! Every request carries an id (`x-soak-id`); the upstream echoes it and counts each id it
//! sees. At the end the accounting is printed and asserted:
//!
//! * every request sent is *answered* exactly once: one complete HTTP response with exactly one
//!   status line, within the client's 30 s time-out. A connection error, a time-out, or two
//!   status lines are *lost*. A response whose body is cut short (the connection closed after
//!   the head) is allowed only where the upstream was stopped in the middle of that body: the
//!   client can tell it is incomplete, which is all a proxy can do then. The clients keep their
//!   connections alive across requests (a new one after an answer that closes it). A 503 of a fail-closed route or a 502 while the
//!   upstream is down is an answer (the gateway answered); what matters is that it is allowed;
//! * a 200 from the upstream carries the request's own id, and no id reaches the upstream twice;
//! * each answer is allowed where it falls: outside fault windows only normal answers (through
//!   the agent, from the upstream); in an agent's fault window its fail-open routes may answer
//!   without it and its fail-closed routes may answer 503, never the other way round; in an
//!   upstream's (or container's) window its routes may answer 502–504. A window runs from the
//!   fault to its recovery plus [`GRACE`];
//! * every in-flight gauge, affinity entry, sticky session, paused connection and pending
//!   push of the gateway's `/metrics` is back to zero once the load stops;
//! * the gateway's file descriptors and resident memory are back to their level after the
//!   warm-up (within [`FD_SLACK`] and [`RSS_SLACK_MIB`]);
//! * each fault is recovered from (normal answers again) within [`PATIENCE`]. Time to detect
//!   (first probe showing the fault) and to recover (first normal probe after the fault is
//!   undone) are reported per fault kind (p50 / max), not asserted beyond that maximum.
//!
//! Without a Docker engine the container parts are skipped with the reason, unless `CI` is
//! `true` or `1`: then the soak fails.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentpool_tests::{
    Agent, Answer, Gateway, KeepAlive, PATIENCE, Transport, agent_bin, base_config, free_addr, gateway_bin,
};
use test_support::docker::{self, INDEX_HTML, TestContainer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long after a fault's recovery its effects may still show (requests sent before it).
const GRACE: Duration = Duration::from_secs(3);
/// The agent time-out of the gateway's pool.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The client's time-out: no answer by then is a lost request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// File descriptors the gateway may hold above its level after the warm-up.
const FD_SLACK: usize = 16;
/// Resident memory the gateway may hold above its level after the warm-up, in MiB.
const RSS_SLACK_MIB: u64 = 64;
/// The decision delay of a slow agent (`ITEST_AGENT_SLOW_MS`).
const SLOW_MS: u64 = 300;

/// The routes, by index: `(name, target, agent, fail-open, container)`.
const ROUTES: [(&str, &str, Option<usize>, bool, bool); 5] = [
    ("uds-open", "/uo/x", Some(UDS), true, false),
    ("uds-closed", "/uc/x", Some(UDS), false, false),
    ("grpc-open", "/go/x", Some(GRPC), true, false),
    ("grpc-closed", "/gc/x", Some(GRPC), false, false),
    ("site", "/index.html", None, false, true),
];
const UDS: usize = 0;
const GRPC: usize = 1;
const SITE: usize = 4;

/// What an answer was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    /// Through the agent (if any), from the upstream, with the request's own id.
    Normal,
    /// From the upstream without the agent: the route failed open.
    FailedOpen,
    /// 503 without the upstream: the route failed closed.
    FailedClosed,
    /// 502, 503 or 504 of the gateway: the upstream could not be reached.
    UpstreamError,
    /// A 200 carrying another request's id (or another body): never allowed.
    Mismatched,
    /// Any other status: never allowed.
    Other(u16),
    /// A status line and headers, then the connection closed before the body's end: what a
    /// proxy must do when its upstream dies in the middle of a body (the client can tell the
    /// answer is incomplete). Allowed only where the upstream was stopped.
    CutShort,
    /// No complete, single answer: lost.
    Lost,
}

/// One request: when it was sent, how long it took, how it ended.
#[derive(Clone, Copy, Debug)]
struct Record {
    id: u64,
    route: usize,
    outcome: Outcome,
    at: Instant,
    took: Duration,
}

fn classify(route: usize, id: u64, answer: Option<&Answer>) -> Outcome {
    let Some(a) = answer else { return Outcome::Lost };
    if a.status != 0 && a.status_lines == 1 && !a.complete {
        return Outcome::CutShort;
    }
    if a.status == 0 || a.status_lines != 1 {
        return Outcome::Lost;
    }
    let agent_status = a.header("x-agentpool-agent-status");
    let body_ok = if ROUTES[route].4 { a.body == INDEX_HTML } else { a.body == format!("{id}\n") };
    match a.status {
        200 if !body_ok => Outcome::Mismatched,
        200 if ROUTES[route].2.is_none() => Outcome::Normal,
        200 if agent_status.is_none() && a.header("x-waf") == Some("checked") => Outcome::Normal,
        200 if agent_status.is_some_and(|s| s.contains("failing open") || s.contains("skipped")) => {
            Outcome::FailedOpen
        }
        503 if agent_status.is_some_and(|s| s.contains("failing closed")) => Outcome::FailedClosed,
        502..=504 => Outcome::UpstreamError,
        status => Outcome::Other(status),
    }
}

/// Every request of the soak, and the ids handed out.
#[derive(Default)]
struct Ledger {
    next_id: AtomicU64,
    records: Mutex<Vec<Record>>,
    /// What the client saw of the first answers that were not normal ones: `(id, what)`.
    odd: Mutex<Vec<(u64, String)>>,
}

impl Ledger {
    /// Sends one request on `route` with a fresh id over `client`'s connection, records and
    /// returns its outcome.
    async fn send(&self, client: &mut KeepAlive, route: usize) -> Record {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        let header = format!("x-soak-id: {id}\r\n");
        let answer =
            tokio::time::timeout(CLIENT_TIMEOUT, client.request("GET", ROUTES[route].1, &header)).await;
        if answer.is_err() {
            // The connection may still carry the late answer: never reuse it.
            client.reset();
        }
        let record =
            Record { id, route, outcome: classify(route, id, answer.as_ref().ok()), at, took: at.elapsed() };
        if matches!(
            record.outcome,
            Outcome::Lost | Outcome::CutShort | Outcome::Mismatched | Outcome::Other(_)
        ) {
            let mut odd = self.odd.lock().unwrap();
            if odd.len() < 20 {
                let seen = match &answer {
                    Ok(a) => format!(
                        "status {} ({} status lines), {}",
                        a.status,
                        a.status_lines,
                        a.head.replace('\n', " | ")
                    ),
                    Err(_) => format!("no answer within {CLIENT_TIMEOUT:?}"),
                };
                odd.push((id, seen));
            }
        }
        self.records.lock().unwrap().push(record);
        record
    }
}

/// The upstream of the agent routes: answers each request with its `x-soak-id`, counts the ids
/// it sees; can be stopped and started again on the same port.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<u64, u32>>>,
    running: Option<(JoinHandle<()>, Arc<tokio::sync::Notify>)>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = Self { addr: listener.local_addr().unwrap(), seen: Arc::default(), running: None };
        upstream.serve(listener);
        upstream
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = Arc::new(tokio::sync::Notify::new());
        let (seen, stopped) = (self.seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    () = stopped.notified() => break,
                };
                connections.spawn(answer_ids(stream, seen.clone()));
            }
            // Dropping the set aborts every connection: the upstream is gone.
            connections.abort_all();
        });
        self.running = Some((task, stop));
    }

    /// Closes the listener and every connection.
    async fn stop(&mut self) {
        if let Some((task, stop)) = self.running.take() {
            stop.notify_one();
            let _ = task.await;
        }
    }

    /// Binds the same port again (retrying while it is taken) and serves.
    async fn restart(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the upstream cannot bind {} again: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// Answers each request head on the connection with its `x-soak-id`, until it closes.
async fn answer_ids(mut stream: tokio::net::TcpStream, seen: Arc<Mutex<HashMap<u64, u32>>>) {
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    let mut id = None;
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => {
                let body = match id.take() {
                    Some(id) => {
                        *seen.lock().unwrap().entry(id).or_default() += 1;
                        format!("{id}\n")
                    }
                    None => "no id\n".to_owned(),
                };
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                if write.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':')
                    && name.trim().eq_ignore_ascii_case("x-soak-id")
                {
                    id = value.trim().parse().ok();
                }
            }
        }
    }
}

/// A fault the script can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    Kill(usize),
    Silent(usize),
    Slow(usize),
    Garbage(usize),
    PauseFlow(usize),
    Reload,
    StopContainer,
    RestartUpstream,
}

impl Fault {
    fn name(self) -> String {
        let agent = |a: usize| if a == UDS { "uds" } else { "grpc" };
        match self {
            Fault::Kill(a) => format!("kill+restart {}", agent(a)),
            Fault::Silent(a) => format!("silent (SIGSTOP) {}", agent(a)),
            Fault::Slow(a) => format!("slow ({SLOW_MS} ms) {}", agent(a)),
            Fault::Garbage(a) => format!("garbage {}", agent(a)),
            Fault::PauseFlow(a) => format!("flow paused {}", agent(a)),
            Fault::Reload => "config reload".to_owned(),
            Fault::StopContainer => "docker stop container".to_owned(),
            Fault::RestartUpstream => "restart upstream".to_owned(),
        }
    }

    /// The routes it may disturb.
    fn routes(self) -> Vec<usize> {
        match self {
            Fault::Kill(a) | Fault::Silent(a) | Fault::Slow(a) | Fault::Garbage(a) | Fault::PauseFlow(a) => {
                (0..ROUTES.len()).filter(|&r| ROUTES[r].2 == Some(a)).collect()
            }
            Fault::Reload => Vec::new(),
            Fault::StopContainer => vec![SITE],
            Fault::RestartUpstream => (0..ROUTES.len()).filter(|&r| !ROUTES[r].4).collect(),
        }
    }

    /// True if `outcome` on `route` is allowed while this fault lasts.
    fn allows(self, route: usize, outcome: Outcome) -> bool {
        if !self.routes().contains(&route) {
            return false;
        }
        let open = ROUTES[route].3;
        match self {
            Fault::Kill(_) | Fault::Silent(_) | Fault::Slow(_) | Fault::Garbage(_) | Fault::PauseFlow(_) => {
                (open && outcome == Outcome::FailedOpen) || (!open && outcome == Outcome::FailedClosed)
            }
            Fault::StopContainer | Fault::RestartUpstream => {
                matches!(outcome, Outcome::UpstreamError | Outcome::CutShort)
            }
            Fault::Reload => false,
        }
    }

    /// True if a probe's answer shows the fault.
    fn shows(self, record: &Record) -> bool {
        match self {
            Fault::Slow(_) => {
                record.outcome != Outcome::Normal || record.took >= Duration::from_millis(SLOW_MS * 8 / 10)
            }
            _ => record.outcome != Outcome::Normal,
        }
    }
}

/// One fault as it happened.
#[derive(Debug)]
struct Window {
    fault: Fault,
    start: Instant,
    /// When the first probe showed it, if one did while it lasted.
    detected: Option<Duration>,
    /// From undoing it to the first normal probe on every route it disturbs.
    recovered: Option<Duration>,
    end: Instant,
}

/// The gateway process's open file descriptors and resident memory (KiB).
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// The gauges that must be back to zero once nothing is in flight: `(series, value)`.
fn gauges(metrics: &str) -> Vec<(String, f64)> {
    const ZERO_AT_REST: [&str; 6] = [
        "agentpool_in_flight",
        "agentpool_affinity_entries",
        "agentpool_sticky_sessions",
        "agentpool_paused_connections",
        "agentpool_config_pushes_pending",
        "in_flight",
    ];
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let watched = ZERO_AT_REST.iter().any(|w| name == *w || (*w == "in_flight" && name.contains(w)));
            if !watched {
                return None;
            }
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Soak {
    listen: String,
    ledger: Arc<Ledger>,
}

impl Soak {
    /// Probes `routes` (one request each, at once) every 20 ms until `done` holds for one
    /// round's answers; returns that round, or `None` after `limit`.
    async fn probe_until(
        &self,
        routes: &[usize],
        limit: Duration,
        mut done: impl FnMut(&[Record]) -> bool,
    ) -> Option<Vec<Record>> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let mut probes = tokio::task::JoinSet::new();
            for &route in routes {
                let (ledger, listen) = (self.ledger.clone(), self.listen.clone());
                probes.spawn(async move { ledger.send(&mut KeepAlive::new(&listen), route).await });
            }
            let round: Vec<Record> = probes.join_all().await;
            if done(&round) {
                return Some(round);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

fn config_file(base: &str, uds: &str, grpc: &str, site: bool, extra_route: bool) -> String {
    let mut c = format!(
        "{base}[[agents]]\nname = \"uds\"\nendpoints = [\"{uds}\"]\n\n\
         [[agents]]\nname = \"grpc\"\nendpoints = [\"{grpc}\"]\n\n"
    );
    for (name, target, agent, open, container) in ROUTES {
        if container {
            continue;
        }
        let prefix = target.trim_end_matches("/x");
        let agent = if agent == Some(UDS) { "uds" } else { "grpc" };
        let mode = if open { "open" } else { "closed" };
        c.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"app\"\n\
             agents = [\"{agent}\"]\nfailure_mode = \"{mode}\"\n\n"
        ));
    }
    if extra_route {
        c.push_str("[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nupstream = \"app\"\n\n");
    }
    if site {
        c.push_str(
            "[[routes]]\nname = \"site\"\npath_prefix = \"/index.html\"\nupstream = \"site\"\nworkload = \"site\"\n\n",
        );
    }
    c.push_str(&format!(
        "[pool]\nrequest_timeout = \"{}ms\"\nconnect_timeout = \"500ms\"\n\
         reconnect = {{ base = \"20ms\", cap = \"200ms\" }}\nbreaker = {{ reset_timeout = \"200ms\", max_reset_timeout = \"1s\" }}\n",
        REQUEST_TIMEOUT.as_millis()
    ));
    c
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}: a number")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak: `cargo xtask soak [--time DURATION] [--seed N]`"]
async fn soak() {
    let seconds = env_u64("SOAK_SECONDS").unwrap_or(60);
    let seed = env_u64("SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    });
    let clients: usize = env_u64("SOAK_CLIENTS").unwrap_or(12) as usize;
    eprintln!("soak: {seconds} s, seed {seed} (SOAK_SEED={seed} repeats the schedule), {clients} clients");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();

    // The parts.
    let mut app = Upstream::start().await;
    let engine = docker::engine().await;
    let container = match &engine {
        Some(engine) => {
            docker::cleanup_leftovers(engine).await;
            let port: u16 = free_addr().rsplit(':').next().unwrap().parse().unwrap();
            let c =
                TestContainer::builder("soak-site").publish(port).create(engine).await.expect("container");
            Some((c, port))
        }
        None => {
            eprintln!("soak: no Docker engine: the container upstream and its faults are left out");
            None
        }
    };
    let mut agents = [
        Agent::start(agent_bin!(), Transport::Uds, dir.path(), "uds", &["/admin"]).await,
        Agent::start(agent_bin!(), Transport::Grpc, dir.path(), "grpc", &["/admin"]).await,
    ];
    let (listen, admin) = (free_addr(), free_addr());
    let mut upstreams = vec![("app", app.addr)];
    if let Some((_, port)) = &container {
        upstreams.push(("site", format!("127.0.0.1:{port}").parse().unwrap()));
    }
    let mut base = base_config(&listen, &admin, &upstreams);
    if let Some((c, _)) = &container {
        base.push_str(&format!(
            "[[workloads]]\nname = \"site\"\nloading_page = false\n\n\
             [workloads.watch]\nworkload = {{ container = \"{}\" }}\nidle_timeout = \"10m\"\nwake_timeout = \"60s\"\n\n",
            c.name()
        ));
    }
    let endpoints = [agents[UDS].endpoint.clone(), agents[GRPC].endpoint.clone()];
    let config =
        |extra: bool| config_file(&base, &endpoints[UDS], &endpoints[GRPC], container.is_some(), extra);
    let path: PathBuf = dir.path().join("gateway.toml");
    std::fs::write(&path, config(false)).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;
    let pid = gateway.pid();
    let routes: Vec<usize> = (0..ROUTES.len()).filter(|&r| container.is_some() || !ROUTES[r].4).collect();

    // The load: `clients` tasks, each going round the routes (the container's route gets one
    // request in four rounds: busybox forks a process per connection).
    let ledger = Arc::new(Ledger::default());
    let load_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<JoinHandle<u64>> = (0..clients)
        .map(|client| {
            let (ledger, stop, listen, routes) =
                (ledger.clone(), stop.clone(), listen.clone(), routes.clone());
            tokio::spawn(async move {
                let mut round = client;
                let mut connection = KeepAlive::new(&listen);
                while !stop.load(Ordering::Relaxed) {
                    for &route in &routes {
                        if ROUTES[route].4 && round % 4 != 0 {
                            continue;
                        }
                        ledger.send(&mut connection, route).await;
                    }
                    round += 1;
                }
                connection.connections
            })
        })
        .collect();

    // Warm-up, then the level the gateway must come back to.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = footprint(pid);
    let soak_started = Instant::now();
    let soak = Soak { listen: listen.clone(), ledger: ledger.clone() };
    let deadline = soak_started + Duration::from_secs(seconds);

    let mut faults = vec![Fault::Reload, Fault::RestartUpstream];
    for a in [UDS, GRPC] {
        faults.extend([
            Fault::Kill(a),
            Fault::Silent(a),
            Fault::Slow(a),
            Fault::Garbage(a),
            Fault::PauseFlow(a),
        ]);
    }
    if container.is_some() {
        faults.push(Fault::StopContainer);
    }
    if let Ok(only) = std::env::var("SOAK_FAULTS") {
        faults.retain(|f| only.split(',').any(|o| f.name().contains(o.trim())));
        assert!(!faults.is_empty(), "SOAK_FAULTS={only:?} matches no fault");
    }
    let mut windows: Vec<Window> = Vec::new();
    let mut extra_route = false;
    let mut unrecovered = Vec::new();
    while Instant::now() + Duration::from_secs(8) < deadline {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
        let fault = faults[rng.usize(..faults.len())];
        let hold = Duration::from_millis(rng.u64(1000..4000));
        let affected = fault.routes();
        let start = Instant::now();
        // Do it, and probe the routes it disturbs until one shows it (at most `hold`).
        match fault {
            Fault::Kill(a) => agents[a].kill().await,
            Fault::Silent(a) => agents[a].signal("STOP"),
            Fault::Slow(a) => agents[a].signal("USR1"),
            Fault::Garbage(a) => agents[a].replace_with_garbage().await,
            Fault::PauseFlow(a) => agents[a].signal("USR2"),
            Fault::Reload => {
                extra_route = !extra_route;
                std::fs::write(&path, config(extra_route)).unwrap();
                gateway.reload().await;
            }
            Fault::StopContainer => {
                let (engine, (c, _)) = (engine.as_ref().unwrap(), container.as_ref().unwrap());
                engine
                    .stop_container(
                        c.name(),
                        Some(bollard::query_parameters::StopContainerOptionsBuilder::default().t(1).build()),
                    )
                    .await
                    .expect("docker stop");
            }
            Fault::RestartUpstream => app.stop().await,
        }
        let detected = if affected.is_empty() {
            None
        } else {
            // When the first answer showing it came.
            soak.probe_until(&affected, hold, |round| round.iter().any(|r| fault.shows(r)))
                .await
                .and_then(|round| round.iter().filter(|r| fault.shows(r)).map(|r| r.at + r.took).min())
                .map(|shown| shown.saturating_duration_since(start))
        };
        let held = start.elapsed();
        if held < hold {
            tokio::time::sleep(hold - held).await;
        }
        // Undo it, and probe until every route it disturbs answers normally again.
        let undone = Instant::now();
        match fault {
            Fault::Kill(a) => agents[a].restart().await,
            Fault::Silent(a) => agents[a].signal("CONT"),
            Fault::Slow(a) => agents[a].signal("USR1"),
            Fault::Garbage(a) => {
                agents[a].kill().await;
                agents[a].restart().await;
            }
            Fault::PauseFlow(a) => agents[a].signal("USR2"),
            Fault::Reload | Fault::StopContainer => {}
            Fault::RestartUpstream => app.restart().await,
        }
        let check: Vec<usize> = if affected.is_empty() { routes.clone() } else { affected };
        let recovered = soak
            .probe_until(&check, PATIENCE, |round| {
                round.iter().all(|r| {
                    r.outcome == Outcome::Normal && !(matches!(fault, Fault::Slow(_)) && fault.shows(r))
                })
            })
            .await
            .and_then(|round| round.iter().map(|r| r.at + r.took).max())
            .map(|answered| answered.saturating_duration_since(undone));
        if recovered.is_none() {
            unrecovered.push(fault.name());
        }
        windows.push(Window { fault, start, detected, recovered, end: Instant::now() + GRACE });
    }
    let soak_time = soak_started.elapsed();
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    let mut connections = 0;
    for task in load {
        connections += task.await.unwrap();
    }
    let load_time = soak_started.elapsed() + Duration::from_secs(5);

    // At rest: gauges back to zero, descriptors and memory back to their level.
    let mut last_gauges;
    let settle = Instant::now();
    let gauges_at_rest = loop {
        last_gauges = gauges(&gateway.metrics().await);
        if last_gauges.iter().all(|(_, v)| *v == 0.0) {
            break true;
        }
        if settle.elapsed() > PATIENCE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Idle keep-alive connections to the upstream may close on their own time-out: give the
    // footprint a moment to settle, taking the lowest reading.
    let mut after = footprint(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = footprint(pid);
        after = (after.0.min(now.0), after.1.min(now.1));
        if after.0 <= before.0 + FD_SLACK && after.1 <= before.1 + RSS_SLACK_MIB * 1024 {
            break;
        }
    }

    // The accounting.
    let records = std::mem::take(&mut *ledger.records.lock().unwrap());
    let sent = ledger.next_id.load(Ordering::Relaxed);
    let mut by_id: HashMap<u64, u32> = HashMap::new();
    for r in &records {
        *by_id.entry(r.id).or_default() += 1;
    }
    let recorded_twice = by_id.values().filter(|&&n| n != 1).count();
    let seen = app.seen.lock().unwrap().clone();
    let upstream_twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    let unknown_at_upstream = seen.keys().filter(|id| **id >= sent).count();
    // A normal or failed-open answer from the app came from the upstream exactly once.
    let normal_not_seen = records
        .iter()
        .filter(|r| !ROUTES[r.route].4 && matches!(r.outcome, Outcome::Normal | Outcome::FailedOpen))
        .filter(|r| seen.get(&r.id) != Some(&1))
        .count();
    let mut per_route: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut violations: Vec<String> = Vec::new();
    for r in &records {
        *per_route.entry(ROUTES[r.route].0).or_default().entry(format!("{:?}", r.outcome)).or_default() += 1;
        if r.outcome == Outcome::Normal {
            continue;
        }
        let finished = r.at + r.took;
        let allowed = windows
            .iter()
            .any(|w| r.at <= w.end && finished >= w.start && w.fault.allows(r.route, r.outcome));
        if !allowed && violations.len() < 50 {
            let during: Vec<_> = windows
                .iter()
                .filter(|w| r.at <= w.end && finished >= w.start)
                .map(|w| w.fault.name())
                .collect();
            violations.push(format!(
                "id {} on {}: {:?} after {:?} at +{:?} (faults then: {during:?})",
                r.id,
                ROUTES[r.route].0,
                r.outcome,
                r.took,
                r.at.saturating_duration_since(soak_started)
            ));
        }
    }
    let violation_count = records
        .iter()
        .filter(|r| r.outcome != Outcome::Normal)
        .filter(|r| {
            let finished = r.at + r.took;
            !windows
                .iter()
                .any(|w| r.at <= w.end && finished >= w.start && w.fault.allows(r.route, r.outcome))
        })
        .count();
    let lost = records.iter().filter(|r| r.outcome == Outcome::Lost).count();

    println!("\n=== soak accounting (seed {seed}, {soak_time:.0?} of faults, {load_time:.0?} of load) ===");
    println!(
        "requests sent {sent}, answered {} ({:.0}/s), lost {lost}, recorded twice {recorded_twice}",
        records.len() - lost,
        records.len() as f64 / load_time.as_secs_f64()
    );
    println!("load: {clients} clients on keep-alive connections, {connections} connections made");
    println!(
        "upstream: {} ids seen, {} twice, {} unknown, {normal_not_seen} answers from it not seen there once",
        seen.len(),
        upstream_twice.len(),
        unknown_at_upstream
    );
    // Answers per second, minute by minute (the first includes the warm-up): a steady load.
    let mut per_minute: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &records {
        *per_minute.entry(r.at.saturating_duration_since(load_started).as_secs() / 60).or_default() += 1;
    }
    let span =
        records.iter().map(|r| r.at.saturating_duration_since(load_started).as_secs()).max().unwrap_or(0) + 1;
    let rates: Vec<String> =
        per_minute.iter().map(|(m, n)| format!("{}", n / (span - m * 60).clamp(1, 60))).collect();
    println!("answers per second, by minute: {}", rates.join(" "));
    println!("answers per route:");
    for (route, outcomes) in &per_route {
        let line: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!("  {route:12} {}", line.join(", "));
    }
    println!(
        "answers not allowed where they fell (wrong failure mode, outside a fault window): {violation_count}"
    );
    for v in &violations {
        println!("  {v}");
    }
    let odd = std::mem::take(&mut *ledger.odd.lock().unwrap());
    if !odd.is_empty() {
        println!("what the client saw of lost, cut-short or wrong answers (first {}):", odd.len());
        for (id, seen) in &odd {
            println!("  id {id}: {seen}");
        }
    }
    println!("faults ({}), detect / recover (p50 / max):", windows.len());
    let mut kinds: BTreeMap<String, Vec<&Window>> = BTreeMap::new();
    for w in &windows {
        kinds.entry(w.fault.name()).or_default().push(w);
    }
    // The answers on the routes each kind of fault disturbs, while it lasted: how they failed.
    let mut in_windows: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in &records {
        let finished = r.at + r.took;
        if let Some(w) = windows
            .iter()
            .find(|w| r.at <= w.end && finished >= w.start && w.fault.routes().contains(&r.route))
        {
            let mode = if ROUTES[r.route].4 {
                "site"
            } else if ROUTES[r.route].3 {
                "open"
            } else {
                "closed"
            };
            *in_windows
                .entry(w.fault.name())
                .or_default()
                .entry(format!("{mode} {:?}", r.outcome))
                .or_default() += 1;
        }
    }
    for (name, ws) in &kinds {
        let mut detect: Vec<Duration> = ws.iter().filter_map(|w| w.detected).collect();
        let mut recover: Vec<Duration> = ws.iter().filter_map(|w| w.recovered).collect();
        detect.sort();
        recover.sort();
        let fmt = |v: &[Duration]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0?} / {:.0?}", percentile(v, 0.5), v[v.len() - 1])
            }
        };
        println!(
            "  {name:24} x{:<3} detected {:>3}  detect {:>16}  recover {:>16}",
            ws.len(),
            detect.len(),
            fmt(&detect),
            fmt(&recover)
        );
        if let Some(tally) = in_windows.get(name) {
            let line: Vec<String> = tally.iter().map(|(o, n)| format!("{o} {n}")).collect();
            println!("  {:24}      answers in its windows: {}", "", line.join(", "));
        }
    }
    println!(
        "gateway fds {} -> {} (bound +{FD_SLACK}), rss {} -> {} MiB (bound +{RSS_SLACK_MIB})",
        before.0,
        after.0,
        before.1 / 1024,
        after.1 / 1024
    );
    let mut names: Vec<&str> = last_gauges.iter().filter_map(|(s, _)| s.split('{').next()).collect();
    names.sort_unstable();
    names.dedup();
    println!(
        "gauges at rest ({} series: {}): {}",
        last_gauges.len(),
        names.join(", "),
        if gauges_at_rest { "all zero" } else { "NOT zero" }
    );
    for (series, value) in last_gauges.iter().filter(|(_, v)| *v != 0.0) {
        println!("  {series} = {value}");
    }

    assert!(!windows.is_empty(), "the script did at least one fault");
    assert_eq!(recorded_twice, 0, "every id is recorded once");
    assert_eq!(records.len() as u64, sent, "every request sent has its record");
    assert_eq!(lost, 0, "no request is lost");
    assert!(upstream_twice.is_empty(), "no request reaches the upstream twice: {upstream_twice:?}");
    assert_eq!(unknown_at_upstream, 0, "the upstream saw only ids that were sent");
    assert_eq!(normal_not_seen, 0, "every answer from the upstream was seen there exactly once");
    assert_eq!(violation_count, 0, "every answer is allowed where it falls: {violations:#?}");
    assert!(unrecovered.is_empty(), "every fault recovered within {PATIENCE:?}: {unrecovered:?}");
    assert!(gauges_at_rest, "gauges back to zero: {last_gauges:?}");
    assert!(after.0 <= before.0 + FD_SLACK, "file descriptors back to their level: {before:?} -> {after:?}");
    assert!(after.1 <= before.1 + RSS_SLACK_MIB * 1024, "memory back to its level: {before:?} -> {after:?}");
    assert!(gateway.stop().await.success());
    drop(container);
}
