//! Cross-crate integration tests of the agentpool workspace. The tests live in `tests/`; run
//! them with `cargo xtask itest` (they also run in `cargo xtask ci`, as part of
//! `cargo test --workspace`).
//!
//! * `pool_over_uds`, `waf_through_the_pool`: pool-core over transport-uds against a real
//!   agent server, in one process.
//! * `gateway_end_to_end`: the gateway process with a UDS agent process and a gRPC agent process
//!   on one route: allowed requests reach the upstream, each agent blocks its own paths,
//!   `/metrics` counts the agents' requests, `/status` lists them.
//! * `reload_under_load`: configuration reloads (`POST /admin/reload`: routes changed, an agent
//!   added and removed) while clients send requests continuously: no request fails, each is
//!   answered once and reaches the upstream once. An ignored test there reproduces a known gateway
//!   bug: a reload that moves an agent to other endpoints fails requests during the swap
//!   (`cargo test -p agentpool-tests --test reload_under_load -- --ignored`).
//! * `agent_killed_mid_load`: an agent process SIGKILLed under load (UDS and gRPC): the
//!   fail-open route keeps serving, the fail-closed route answers 503 within the agent time-out,
//!   both recover once the agent is back on the same socket or port.
//! * `sleeping_container_woken`: a Docker container upstream (real engine) that sleeps while
//!   idle, woken by a request through the gateway and an agent. Without an engine it skips with
//!   the reason, unless `CI` is `true` or `1`: then it fails.
//! * `soak` (ignored by `cargo test`; `cargo xtask soak [--time DURATION] [--seed N]`, and a
//!   60-second one in `cargo xtask ci`): the gateway under steady load with a UDS agent, a gRPC
//!   agent and a container upstream while a seeded fault script kills, stops, slows and garbles
//!   agents, pauses their flow control, reloads, stops the container and restarts the upstream;
//!   the accounting (every request answered exactly once, failure modes per route, gauges,
//!   descriptors and memory back to their level, time to detect and recover) is printed and
//!   asserted.
//!
//! The processes are this package's binaries: `itest-gateway` (the gateway crate's
//! [`gateway::main_from_args`], as the `gateway` binary runs it) and `itest-agent` (the example
//! WAF handler of transport-uds over UDS or gRPC, with the soak's fault modes). The tests find them with
//! [`gateway_bin!`] and [`agent_bin!`]; this library holds what they share. The gateway logs
//! errors only (to the test's stderr); `ITEST_GATEWAY_LOG=warn` (a `RUST_LOG` filter) shows more.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The path of the `itest-gateway` binary (expands in a test of this package, where cargo sets
/// `CARGO_BIN_EXE_itest-gateway`).
#[macro_export]
macro_rules! gateway_bin {
    () => {
        env!("CARGO_BIN_EXE_itest-gateway")
    };
}

/// The path of the `itest-agent` binary (see [`gateway_bin!`]).
#[macro_export]
macro_rules! agent_bin {
    () => {
        env!("CARGO_BIN_EXE_itest-agent")
    };
}

/// How long a process gets to start, or a condition to come true, before a test gives up.
/// Generous on purpose: a slow, loaded machine must not fail a correct test.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A free loopback address (a port bound and released: good enough on a test machine).
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 response, as read off the wire.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code; 0 if the connection failed or closed without a status line.
    pub status: u16,
    /// The status line and headers, lower-cased.
    pub head: String,
    /// The body.
    pub body: String,
    /// How many status lines came back on the connection (exactly one for a sound answer).
    pub status_lines: usize,
    /// True if the body is as long as the response's `content-length` says (or it has none).
    pub complete: bool,
}

impl Answer {
    /// The value of header `name` (lower-case), if the response has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// Sends one request (`Connection: close`) and reads the whole answer; a failure to connect
/// or send is an answer with status 0.
pub async fn request(addr: &str, method: &str, target: &str) -> Answer {
    request_with(addr, method, target, "").await
}

/// [`request`] with extra header lines (`name: value\r\n` each).
pub async fn request_with(addr: &str, method: &str, target: &str, headers: &str) -> Answer {
    let failed =
        |why: String| Answer { status: 0, head: why, body: String::new(), status_lines: 0, complete: false };
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return failed(format!("connect: {e}")),
    };
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        return failed(format!("send: {e}"));
    }
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw).await {
        return failed(format!("read: {e}"));
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)?.parse().ok()).unwrap_or(0);
    let head = head.to_ascii_lowercase();
    let mut answer = Answer {
        status,
        status_lines: text.matches("HTTP/1.1 ").count(),
        head,
        body: body.to_owned(),
        complete: true,
    };
    if let Some(length) = answer.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        answer.complete = answer.body.len() == length;
    }
    answer
}

/// A client connection kept alive across requests (HTTP/1.1, one request at a time): it
/// connects when it has no connection, and drops the connection after an answer that says
/// `connection: close`, an answer it cannot read, or bytes after an answer (a second answer
/// to one request, which it reports as such).
#[derive(Debug)]
pub struct KeepAlive {
    addr: String,
    stream: Option<BufReader<TcpStream>>,
    /// Connections made so far.
    pub connections: u64,
}

impl KeepAlive {
    /// A client of `addr`; it connects on the first request.
    pub fn new(addr: &str) -> Self {
        Self { addr: addr.to_owned(), stream: None, connections: 0 }
    }

    /// Drops the connection, if any: the next request opens a new one.
    pub fn reset(&mut self) {
        self.stream = None;
    }

    /// Sends one request (no body) with extra header lines (`name: value\r\n` each) and reads
    /// its answer. A failure to connect, send or read is an answer with status 0; an answer
    /// followed by stray bytes counts two status lines.
    pub async fn request(&mut self, method: &str, target: &str, headers: &str) -> Answer {
        let failed = |why: String| Answer {
            status: 0,
            head: why,
            body: String::new(),
            status_lines: 0,
            complete: false,
        };
        if self.stream.is_none() {
            match TcpStream::connect(&self.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.connections += 1;
                    self.stream = Some(BufReader::new(s));
                }
                Err(e) => return failed(format!("connect: {e}")),
            }
        }
        let stream = self.stream.as_mut().expect("connected above");
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: 0\r\n\r\n",
            self.addr
        );
        if let Err(e) = stream.get_mut().write_all(req.as_bytes()).await {
            self.stream = None;
            return failed(format!("send: {e}"));
        }
        match read_answer(stream).await {
            Ok((mut answer, keep)) => {
                if !stream.buffer().is_empty() {
                    // More than one answer arrived for one request.
                    answer.status_lines += 1;
                    self.stream = None;
                } else if !keep {
                    self.stream = None;
                }
                answer
            }
            Err(e) => {
                self.stream = None;
                failed(format!("read: {e}"))
            }
        }
    }
}

/// Reads one HTTP/1.1 answer: the head, then a body of `content-length` bytes, a chunked body,
/// or (with neither) everything up to the end of the stream. Returns the answer and whether
/// the connection may carry another request.
async fn read_answer(stream: &mut BufReader<TcpStream>) -> std::io::Result<(Answer, bool)> {
    let mut head = String::new();
    loop {
        let before = head.len();
        if stream.read_line(&mut head).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the answer's head ended",
            ));
        }
        if &head[before..] == "\r\n" {
            break;
        }
    }
    let head = head.trim_end().to_owned();
    let status = head.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)?.parse().ok()).unwrap_or(0);
    let mut answer = Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: String::new(),
        status_lines: 1,
        complete: true,
    };
    let mut keep = answer.header("connection") != Some("close");
    let mut body = Vec::new();
    if let Some(length) = answer.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(length, 0);
        if let Err(e) = stream.read_exact(&mut body).await {
            answer.complete = false;
            keep = false;
            answer.head.push_str(&format!("\nbody: {e}"));
        }
    } else if answer.header("transfer-encoding") == Some("chunked") {
        if let Err(e) = read_chunked(stream, &mut body).await {
            answer.complete = false;
            keep = false;
            answer.head.push_str(&format!("\nbody: {e}"));
        }
    } else {
        stream.read_to_end(&mut body).await?;
        keep = false;
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok((answer, keep))
}

/// Reads a chunked body (without trailers) into `body`.
async fn read_chunked(stream: &mut BufReader<TcpStream>, body: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        let mut size = String::new();
        if stream.read_line(&mut size).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("chunk size {size:?}"))
        })?;
        let mut chunk = vec![0; n + 2];
        stream.read_exact(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// `GET target` on `addr`.
pub async fn get(addr: &str, target: &str) -> Answer {
    request(addr, "GET", target).await
}

/// A tiny upstream on loopback answering every request with 200 and `body`, counting them.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
}

impl Upstream {
    /// Starts one on the current runtime; it lives as long as the runtime.
    pub async fn start(body: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Answers each request head on the connection (keep-alive), until it closes.
                    let (read, mut write) = stream.split();
                    let mut reader = BufReader::new(read);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => {
                                counter.fetch_add(1, Ordering::Relaxed);
                                let answer = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if write.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        Self { addr, served }
    }

    /// Requests it has answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// A gateway process (`itest-gateway --config FILE`), killed when dropped.
pub struct Gateway {
    child: Child,
    /// The address of its (first) listener.
    pub listen: String,
    /// The address of its admin listener.
    pub admin: String,
}

impl Gateway {
    /// Starts `bin` with `config` (written by the test, naming `listen` and `admin`) and waits
    /// until `/readyz` answers 200.
    pub async fn start(bin: &str, config: &Path, listen: &str, admin: &str) -> Self {
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", std::env::var("ITEST_GATEWAY_LOG").unwrap_or_else(|_| "error".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut gateway = Self { child, listen: listen.to_owned(), admin: admin.to_owned() };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("the gateway exited early: {status}");
            }
            if get(admin, "/readyz").await.status == 200 {
                return gateway;
            }
            assert!(Instant::now() < deadline, "the gateway was not ready within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /admin/reload`; panics unless the gateway answers that it reloaded.
    pub async fn reload(&self) -> String {
        let answer = request(&self.admin, "POST", "/admin/reload").await;
        assert_eq!(answer.status, 200, "reload refused: {}", answer.body);
        assert!(answer.body.starts_with("reloaded"), "{}", answer.body);
        answer.body
    }

    /// `/status`, parsed.
    pub async fn status(&self) -> serde_json::Value {
        let answer = get(&self.admin, "/status").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        serde_json::from_str(&answer.body).unwrap()
    }

    /// `/metrics` (Prometheus text).
    pub async fn metrics(&self) -> String {
        let answer = get(&self.admin, "/metrics").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        answer.body
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway runs")
    }

    /// SIGTERM, and the exit status (within [`PATIENCE`]).
    pub async fn stop(mut self) -> std::process::ExitStatus {
        terminate(&self.child);
        tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("the gateway stops").unwrap()
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
}

/// The value of the Prometheus sample `series` (name and labels exactly as exported), if any.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The transport an agent process serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The agent protocol over a Unix socket (transport-uds).
    Uds,
    /// gRPC over TCP on loopback (transport-grpc).
    Grpc,
}

/// An agent process (`itest-agent`): the example WAF, blocking the given path prefixes. Killed
/// (SIGKILL) when dropped.
pub struct Agent {
    child: Child,
    bin: String,
    args: Vec<String>,
    /// The endpoint for the gateway's configuration (`unix:/…` or `grpc://…`).
    pub endpoint: String,
}

impl Agent {
    /// Starts `bin` serving on `transport` (a socket in `dir`, or a free loopback port),
    /// blocking `blocked`, and waits until it listens.
    pub async fn start(bin: &str, transport: Transport, dir: &Path, name: &str, blocked: &[&str]) -> Self {
        let (kind, listen, endpoint) = match transport {
            Transport::Uds => {
                let path = dir.join(format!("{name}.sock")).display().to_string();
                ("uds", path.clone(), format!("unix:{path}"))
            }
            Transport::Grpc => {
                let addr = free_addr();
                ("grpc", addr.clone(), format!("grpc://{addr}"))
            }
        };
        let mut args = vec![kind.to_owned(), listen];
        args.extend(blocked.iter().map(|b| b.to_string()));
        let child = spawn_agent(bin, &args).await;
        Self { child, bin: bin.to_owned(), args, endpoint }
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// Starts the agent again on the same socket or port, and waits until it listens.
    pub async fn restart(&mut self) {
        self.child = spawn_agent(&self.bin, &self.args).await;
    }

    /// SIGKILLs the agent and puts a process answering junk on its socket or port in its place
    /// (`itest-agent garbage`); [`kill`](Self::kill) and [`restart`](Self::restart) bring the
    /// agent back.
    pub async fn replace_with_garbage(&mut self) {
        self.kill().await;
        let args = ["garbage".to_owned(), self.args[0].clone(), self.args[1].clone()];
        self.child = spawn_agent(&self.bin, &args).await;
    }

    /// The process id (`None` once it has been waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (a `kill` name: `STOP`, `CONT`, `USR1`…) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the agent runs");
        let status =
            std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }
}

/// Spawns an agent and waits for its `ready` line (retrying a bind that fails, as a port of a
/// killed agent may briefly still be taken).
async fn spawn_agent(bin: &str, args: &[String]) -> Child {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match tokio::time::timeout(PATIENCE, lines.next_line()).await {
            Ok(Ok(Some(line))) if line.starts_with("ready ") => return child,
            outcome => {
                let _ = child.kill().await;
                assert!(Instant::now() < deadline, "the agent {args:?} did not start: {outcome:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The start of a gateway configuration: the listener `listen`, the admin listener `admin`,
/// and one upstream per `(name, address)`. Tests append agents, routes and `[pool]`.
pub fn base_config(listen: &str, admin: &str, upstreams: &[(&str, SocketAddr)]) -> String {
    let mut config =
        format!("[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n\n[admin]\nbind = \"{admin}\"\n\n");
    for (name, addr) in upstreams {
        config.push_str(&format!("[[upstreams]]\nname = \"{name}\"\nurls = [\"http://{addr}\"]\n\n"));
    }
    config
}

/// One request of a [`Load`]: what was asked, what came back, how long it took.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The request target.
    pub target: String,
    /// The answer.
    pub answer: Answer,
    /// From sending to the end of the answer.
    pub took: Duration,
    /// When it was sent.
    pub at: Instant,
}

/// Clients sending requests continuously, each over a fresh connection, until stopped.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    answered: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
}

impl Load {
    /// `clients` tasks per target, one request after another, on `addr`.
    pub fn start(addr: &str, targets: &[&str], clients: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let tasks = targets
            .iter()
            .flat_map(|t| std::iter::repeat_n(t.to_string(), clients))
            .map(|target| {
                let (addr, stop, answered) = (addr.to_owned(), stop.clone(), answered.clone());
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let answer = get(&addr, &target).await;
                        sent.push(Sent { target: target.clone(), answer, took: at.elapsed(), at });
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    sent
                })
            })
            .collect();
        Self { stop, answered, tasks }
    }

    /// Requests answered so far (by all clients).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests have been answered than when called.
    pub async fn wait_for(&self, n: u64) {
        let target = self.answered() + n;
        wait_until("requests under load", || async move { self.answered() >= target }).await;
    }

    /// Stops the clients (each finishes its request in flight) and returns every request.
    pub async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all
    }
}
