//! `cargo xtask <task>`: the project's automation, in Rust so it needs nothing but cargo.
//!
//! * `ci` — formatting, the import-cycle check of pool-core, pool-api, transport-uds and
//!   idlewatch, clippy (`-D warnings`), every unit, integration and doc test, rustdoc, a
//!   compile check of the benches, and the loom models. This is what `.ci/run` runs.
//! * `race` — the loom models (built with `--cfg agentpool_loom` in a separate target
//!   directory, so the normal build cache is untouched) and the stress tests in release mode
//!   with more iterations.
//! * `itest` — the cross-crate integration tests in `tests/`.
//! * `soak [--time DURATION] [--seed N] [--debug]` — the gateway process under steady load
//!   (keep-alive clients) with agent processes and a container upstream while a seeded fault
//!   script kills, stops, slows and garbles agents, pauses flow control, reloads, stops the
//!   container and restarts the upstream; prints and asserts the accounting
//!   (`tests/tests/soak.rs`). Default 60 s; `--time 30m` is the long one. A release build
//!   unless `--debug`; `ci` runs 60 s on its debug build.
//! * `bench [args]` — the criterion benches (release build; not part of `ci`).
//! * `bench-gateway [--rounds N] [--seconds S]` — the gateway against nginx as a reverse proxy
//!   to the same upstream, with `wrk`, in paired rounds (needs Debian's `nginx` and `wrk`).
//! * `fuzz [target] [--time S] [-- libFuzzer options]` — builds the fuzz targets of `fuzz/`
//!   with libFuzzer's instrumentation on the stable toolchain and runs one (or each) for `S`
//!   seconds (default 60), printing executions and coverage (see `fuzz.rs`). Not part of `ci`,
//!   which replays the committed corpora as ordinary tests (`crates/fuzz-props`).
//! * `modcycles [crate-dir]` — fails on import cycles among a crate's top-level modules
//!   (default `crates/pool-core`; a relative directory is taken from the workspace root).

// Step timings are wall-clock on purpose.
#![allow(clippy::disallowed_types)]

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

mod bench_gateway;
mod fuzz;
mod modcycles;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprintln!("usage: cargo xtask <ci|race|itest|soak|bench|bench-gateway|fuzz|modcycles> [args]");
        return ExitCode::FAILURE;
    };
    let result = match task.as_str() {
        "ci" => ci(),
        "race" => race(),
        "itest" => itest(),
        "soak" => soak_args(&args[1..])
            .and_then(|a| soak(a.seconds, a.seed, if a.debug { Build::Debug } else { Build::Release })),
        "bench" => bench(&args[1..]),
        "modcycles" => modcycles(args.get(1).map(String::as_str)),
        "bench-gateway" => bench_gateway::run(&args[1..]),
        "fuzz" => fuzz::run(&args[1..]),
        other => Err(format!(
            "unknown task {other:?}; expected ci, race, itest, soak, bench, bench-gateway, fuzz or modcycles"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs one step, echoing it and how long it took.
fn step(name: &str, mut cmd: Command) -> Result<(), String> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let status = cmd.status().map_err(|e| format!("{name}: cannot run: {e}"))?;
    eprintln!("<== {name}: {} in {:.1?}", if status.success() { "ok" } else { "FAILED" }, started.elapsed());
    if status.success() { Ok(()) } else { Err(format!("{name} failed ({status})")) }
}

fn with_args(mut c: Command, args: &[&str]) -> Command {
    c.args(args);
    c
}

/// Crates whose top-level modules must form a DAG (`ci` checks them). pool-core's layering is
/// required by its architecture; the others are held to what they already are.
const ACYCLIC: &[&str] = &[
    "crates/pool-core",
    "crates/pool-api",
    "crates/transport-uds",
    "crates/transport-grpc",
    "crates/idlewatch",
    "crates/gateway",
];

fn ci() -> Result<(), String> {
    step("fmt", with_args(cargo(), &["fmt", "--all", "--", "--check"]))?;
    for dir in ACYCLIC {
        eprintln!("==> import cycles: {dir}");
        modcycles(Some(dir))?;
    }
    step(
        "clippy",
        with_args(
            cargo(),
            &["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"],
        ),
    )?;
    // Every target but the benches: those are compile-checked below; running criterion benches
    // in test mode in a debug build measures nothing and costs minutes.
    step(
        "test",
        with_args(
            cargo(),
            &["test", "--workspace", "--lib", "--bins", "--tests", "--examples", "--all-features"],
        ),
    )?;
    step("doc tests", with_args(cargo(), &["test", "--workspace", "--doc", "--all-features"]))?;
    let mut doc = with_args(cargo(), &["doc", "--workspace", "--no-deps", "--all-features"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    step("docs", doc)?;
    step(
        "bench compile check",
        with_args(cargo(), &["check", "--workspace", "--benches", "--all-features"]),
    )?;
    race_loom()?;
    soak(60, None, Build::Ci)
}

/// The loom models: small, so they stay in `ci` as well as `race`.
fn race_loom() -> Result<(), String> {
    let mut c = with_args(
        cargo(),
        &[
            "test",
            "-p",
            "pool-core",
            "-p",
            "idlewatch",
            "-p",
            "pool-api",
            "--features",
            "pool-api/streams",
            "--lib",
            "--release",
            "--",
            "loom_",
        ],
    );
    c.env("RUSTFLAGS", "--cfg agentpool_loom")
        .env("CARGO_TARGET_DIR", root().join("target").join("loom"))
        .env("LOOM_MAX_PREEMPTIONS", "3");
    step("loom models", c)
}

fn race() -> Result<(), String> {
    race_loom()?;
    let mut c = with_args(cargo(), &["test", "-p", "pool-core", "--release", "--test", "stress"]);
    c.env("AGENTPOOL_STRESS_SCALE", "10");
    step("stress tests (release, 10x)", c)
}

fn itest() -> Result<(), String> {
    step("integration tests", with_args(cargo(), &["test", "-p", "agentpool-tests"]))
}

/// The soak's arguments.
#[derive(Debug, PartialEq)]
struct SoakArgs {
    seconds: u64,
    seed: Option<u64>,
    debug: bool,
}

/// `--time DURATION` (`90s`, `10m`, `1h`, or seconds), `--seed N` and `--debug`.
fn soak_args(args: &[String]) -> Result<SoakArgs, String> {
    let mut soak = SoakArgs { seconds: 60, seed: None, debug: false };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--time" => soak.seconds = parse_duration(value()?)?,
            "--seed" => soak.seed = Some(value()?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--debug" => soak.debug = true,
            other => return Err(format!("unknown argument {other:?}: --time DURATION, --seed N, --debug")),
        }
    }
    Ok(soak)
}

/// Seconds in `90`, `90s`, `10m` or `1h`.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: not a duration (90s, 10m, 1h)"))?;
    match unit {
        "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        _ => Err(format!("{text:?}: not a duration (90s, 10m, 1h)")),
    }
}

/// How the soak is built.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Build {
    /// In `ci`: with the workspace and features of the test step before it, so nothing is
    /// compiled again (a debug build: a lighter load, the same accounting).
    Ci,
    /// `cargo xtask soak --debug`.
    Debug,
    /// `cargo xtask soak`: the gateway and agents as users run them, under a load of
    /// thousands of requests per second.
    Release,
}

/// The soak test (ignored by a plain `cargo test`).
fn soak(seconds: u64, seed: Option<u64>, build: Build) -> Result<(), String> {
    let selection: &[&str] = match build {
        Build::Ci => &["--workspace", "--all-features"],
        Build::Debug => &["-p", "agentpool-tests"],
        Build::Release => &["-p", "agentpool-tests", "--release"],
    };
    let mut c = with_args(cargo(), &["test"]);
    c.args(selection).args(["--test", "soak", "--", "--ignored", "--nocapture", "--exact", "soak"]);
    c.env("SOAK_SECONDS", seconds.to_string());
    if let Some(seed) = seed {
        c.env("SOAK_SEED", seed.to_string());
    }
    step(&format!("soak ({seconds} s, {build:?} build)"), c)
}

fn bench(extra: &[String]) -> Result<(), String> {
    let mut c = with_args(cargo(), &["bench", "--workspace"]);
    if !extra.is_empty() {
        c.arg("--").args(extra);
    }
    step("benches", c)
}

fn modcycles(crate_dir: Option<&str>) -> Result<(), String> {
    let dir = root().join(crate_dir.unwrap_or("crates/pool-core"));
    let report = modcycles::run(&dir)?;
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_durations_and_seeds_parse() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        let args = |a: &[&str]| soak_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(args(&[]), Ok(SoakArgs { seconds: 60, seed: None, debug: false }));
        assert_eq!(
            args(&["--time", "30m", "--seed", "7", "--debug"]),
            Ok(SoakArgs { seconds: 1800, seed: Some(7), debug: true })
        );
        assert!(args(&["--time"]).is_err());
        assert!(args(&["--fast"]).is_err());
    }
}
