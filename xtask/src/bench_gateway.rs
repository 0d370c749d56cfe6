//! `cargo xtask bench-gateway [--rounds N] [--seconds S]`: the gateway against nginx as a
//! reverse proxy to the same upstream, driven by the same load generator (`wrk`), in paired
//! rounds on loopback.
//!
//! Layout: one upstream (an nginx instance with one worker answering `200 ok` from memory); an
//! nginx proxy with as many workers as the machine has cores, HTTP/1.1 keep-alive to the
//! upstream; the gateway (release build, its runtime has as many workers as cores) with a route
//! to the same upstream and no agent (`/plain`), a route that asks the example WAF agent
//! over a Unix socket first (`/waf`; the agent is transport-uds's `waf_agent` example, its own
//! process), and one that asks the same handler over gRPC (`/gwaf`; transport-grpc's
//! `grpc_waf_agent` example on a Unix socket, `grpc+unix:`). The gateway runs three times: everything on its main runtime (`workers = 0`), and
//! one worker thread per core (its default) with `worker_spin = "0s"` (an idle worker sleeps at
//! once) and with the default spin. Each round runs nginx and the gateways back to back at
//! c = 64 (throughput, p99), then each gateway's three routes at c = 1 (each agent's added p50).
//! Medians over the rounds. The report ends with the machine's guest halt polling setting,
//! which the c = 1 figures depend on.
//!
//! Needs Debian's `nginx` and `wrk` (`apt-get install nginx wrk`); everything on loopback,
//! temporary files only.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo, root};

/// One wrk run: requests per second and latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut rounds = 5usize;
    let mut seconds = 5u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).ok_or("--rounds N")?,
            "--seconds" => seconds = it.next().and_then(|v| v.parse().ok()).ok_or("--seconds S")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    for tool in ["nginx", "wrk"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!("{tool} is not installed (apt-get install nginx wrk)"));
        }
    }
    for build in [
        &["-p", "gateway", "--bin", "gateway"][..],
        &["-p", "transport-uds", "--example", "waf_agent"],
        &["-p", "transport-grpc", "--example", "grpc_waf_agent"],
    ] {
        let status = cargo()
            .args(["build", "--release"])
            .args(build)
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build --release {} failed", build.join(" ")));
        }
    }
    let release = root().join("target").join("release");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = std::env::temp_dir().join(format!("agentpool-bench-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let port = |offset: u16| 20000 + (std::process::id() % 20000) as u16 + offset;
    let (upstream, nginx_proxy) = (port(0), port(1));
    // The gateway three times: everything on its main runtime (`workers = 0`), and one worker
    // thread per core (its default), with workers that sleep as soon as they are idle and with
    // the default `worker_spin`.
    let layouts = [
        ("gateway (workers = 0)".to_owned(), 0usize, "0s", port(2), port(3)),
        (format!("gateway (workers = {cores}, worker_spin = 0s)"), cores, "0s", port(4), port(5)),
        (format!("gateway (workers = {cores}, worker_spin = 50us)"), cores, "50us", port(6), port(7)),
    ];

    let mut children = Children(Vec::new());
    children.0.push(nginx(
        &dir,
        "upstream",
        1,
        &format!("listen 127.0.0.1:{upstream}; location / {{ return 200 \"ok\\n\"; }}"),
    )?);
    let proxy_conf = format!(
        "listen 127.0.0.1:{nginx_proxy}; location / {{ proxy_pass http://backend; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }}"
    );
    children.0.push(nginx_with_upstream(&dir, "proxy", cores, upstream, &proxy_conf)?);
    let socket = dir.join("waf.sock");
    children.0.push(
        Command::new(release.join("examples").join("waf_agent"))
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("waf_agent: {e}"))?,
    );
    wait_for(&socket)?;
    let grpc_socket = dir.join("gwaf.sock");
    children.0.push(
        Command::new(release.join("examples").join("grpc_waf_agent"))
            .arg(&grpc_socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("grpc_waf_agent: {e}"))?,
    );
    wait_for(&grpc_socket)?;
    for (i, (name, workers, spin, gateway, admin)) in layouts.iter().enumerate() {
        let config = dir.join(format!("gateway-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "workers = {workers}\nworker_spin = \"{spin}\"\n[[listeners]]\nname = \"bench\"\nbind = \"127.0.0.1:{gateway}\"\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\n\
                 [[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:{upstream}\"]\n\n\
                 [[agents]]\nname = \"waf\"\nendpoints = [\"unix:{}\"]\n\n\
                 [[agents]]\nname = \"gwaf\"\nendpoints = [\"grpc+unix:{}\"]\n\n\
                 [[routes]]\nname = \"waf\"\npath_prefix = \"/waf\"\nupstream = \"app\"\nagents = [\"waf\"]\n\n\
                 [[routes]]\nname = \"gwaf\"\npath_prefix = \"/gwaf\"\nupstream = \"app\"\nagents = [\"gwaf\"]\n\n\
                 [[routes]]\nname = \"plain\"\nupstream = \"app\"\n",
                socket.display(),
                grpc_socket.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        children.0.push(
            Command::new(release.join("gateway"))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{name}: {e}"))?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut targets = vec![("nginx".to_owned(), format!("http://127.0.0.1:{nginx_proxy}/plain"))];
    for (name, _, _, gateway, _) in &layouts {
        targets.push((name.clone(), format!("http://127.0.0.1:{gateway}/plain")));
        targets.push((format!("{name} + agent"), format!("http://127.0.0.1:{gateway}/waf")));
        targets.push((format!("{name} + gRPC agent"), format!("http://127.0.0.1:{gateway}/gwaf")));
    }
    for (name, url) in &targets {
        let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]).output();
        if !out.as_ref().is_ok_and(|o| o.stdout == b"200") {
            return Err(format!("{name} does not answer 200 on {url}"));
        }
    }

    // Per round: nginx and each gateway layout at c = 64, in an order that rotates so that a
    // drift in the machine's load favours none; then each layout's two routes at c = 1.
    let mut c64: Vec<Vec<Run>> = vec![Vec::new(); 1 + layouts.len()];
    let mut c1: Vec<[Vec<Run>; 3]> = vec![[Vec::new(), Vec::new(), Vec::new()]; layouts.len()];
    let nginx_url = format!("http://127.0.0.1:{nginx_proxy}/plain");
    for round in 0..rounds {
        for k in 0..c64.len() {
            let who = (k + round) % c64.len();
            let url = match who {
                0 => nginx_url.clone(),
                i => format!("http://127.0.0.1:{}/plain", layouts[i - 1].3),
            };
            c64[who].push(wrk(&url, cores, 64, seconds)?);
        }
        for (i, (_, _, _, gateway, _)) in layouts.iter().enumerate() {
            c1[i][0].push(wrk(&format!("http://127.0.0.1:{gateway}/plain"), 1, 1, seconds)?);
            c1[i][1].push(wrk(&format!("http://127.0.0.1:{gateway}/waf"), 1, 1, seconds)?);
            c1[i][2].push(wrk(&format!("http://127.0.0.1:{gateway}/gwaf"), 1, 1, seconds)?);
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let ng = median(&c64[0]);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "gateway vs nginx, {rounds} paired rounds of {seconds} s, {cores} cores, wrk on the same machine"
    );
    let _ = writeln!(report, "| layout | req/s | p50 µs | p99 µs |");
    let _ = writeln!(report, "|---|---|---|---|");
    let row = |report: &mut String, name: &str, r: Run| {
        let _ = writeln!(report, "| {name} | {:.0} | {:.0} | {:.0} |", r.rps, r.p50, r.p99);
    };
    row(&mut report, "nginx proxy, c = 64", ng);
    for (i, (name, ..)) in layouts.iter().enumerate() {
        row(&mut report, &format!("{name}, no agent, c = 64"), median(&c64[i + 1]));
        row(&mut report, &format!("{name}, no agent, c = 1"), median(&c1[i][0]));
        row(&mut report, &format!("{name}, UDS agent, c = 1"), median(&c1[i][1]));
        row(&mut report, &format!("{name}, gRPC agent, c = 1"), median(&c1[i][2]));
    }
    for (i, (name, ..)) in layouts.iter().enumerate() {
        let (gw, plain1, waf1, gwaf1) =
            (median(&c64[i + 1]), median(&c1[i][0]), median(&c1[i][1]), median(&c1[i][2]));
        let _ = writeln!(
            report,
            "{name}/nginx at c = 64: throughput {:.2}×, p99 {:.2}×; at p50 (c = 1) the UDS agent adds {:.0} µs, the gRPC agent {:.0} µs",
            gw.rps / ng.rps,
            gw.p99 / ng.p99,
            waf1.p50 - plain1.p50,
            gwaf1.p50 - plain1.p50
        );
    }
    // Whether an idle CPU of this (virtual) machine polls before it halts: when it does not,
    // every wake-up of an idle CPU is a VM exit, and the c = 1 figures show it.
    if let Ok(ns) = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        let _ = writeln!(report, "guest halt polling (guest_halt_poll_ns): {}", ns.trim());
    }
    print!("{report}");
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Children killed on drop, so a failed bench leaves nothing running.
struct Children(Vec<Child>);

impl Drop for Children {
    /// SIGTERM first, so that an nginx master stops its workers (a SIGKILLed master leaves
    /// them running, orphaned, holding their ports); SIGKILL what is still there after 5 s.
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx(dir: &Path, name: &str, workers: usize, server: &str) -> Result<Child, String> {
    nginx_conf(dir, name, workers, "", server)
}

fn nginx_with_upstream(
    dir: &Path,
    name: &str,
    workers: usize,
    upstream: u16,
    server: &str,
) -> Result<Child, String> {
    let block = format!("upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; }}");
    nginx_conf(dir, name, workers, &block, server)
}

fn nginx_conf(
    dir: &Path,
    name: &str,
    workers: usize,
    http_extra: &str,
    server: &str,
) -> Result<Child, String> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs")).map_err(|e| e.to_string())?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes {workers};\npid {pid};\nerror_log {err} error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; {http_extra} server {{ {server} }} }}\n",
            pid = prefix.join("nginx.pid").display(),
            err = prefix.join("logs").join("error.log").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nginx: {e}"))
}

fn wait_for(path: &Path) -> Result<(), String> {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} did not appear within 30 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wrk(url: &str, threads: usize, connections: usize, seconds: u64) -> Result<Run, String> {
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))
}

/// Reads `Requests/sec` and the 50 % / 99 % latencies of `wrk --latency`.
fn parse_wrk(text: &str) -> Option<Run> {
    let mut run = Run::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50 = micros(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99 = micros(v.trim())?;
        }
    }
    (run.rps > 0.0 && run.p50 > 0.0).then_some(run)
}

fn micros(v: &str) -> Option<f64> {
    let (number, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Run { rps: pick(|r| r.rps), p50: pick(|r| r.p50), p99: pick(|r| r.p99) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n\
                   Latency Distribution\n     50%  412.00us\n     75%  600.00us\n     90%    1.20ms\n     99%    2.50ms\n\
                   100000 requests in 5.00s, 10.00MB read\nRequests/sec:  20000.50\nTransfer/sec:      2.00MB\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.rps, 20000.5);
        assert_eq!(run.p50, 412.0);
        assert_eq!(run.p99, 2500.0);
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn medians_are_taken_per_figure() {
        let runs = [
            Run { rps: 3.0, p50: 1.0, p99: 9.0 },
            Run { rps: 1.0, p50: 3.0, p99: 7.0 },
            Run { rps: 2.0, p50: 2.0, p99: 8.0 },
        ];
        let m = median(&runs);
        assert_eq!((m.rps, m.p50, m.p99), (2.0, 2.0, 8.0));
    }
}
