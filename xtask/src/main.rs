//! `cargo xtask <task>`: the project's automation, in Rust so it needs nothing but cargo.
//!
//! * `ci` — formatting, the import-cycle check of pool-core, pool-api, transport-uds and
//!   idlewatch, clippy (`-D warnings`), every unit, integration and doc test, rustdoc, a
//!   compile check of the benches, and the loom models. This is what `.ci/run` runs.
//! * `race` — the loom models (built with `--cfg agentpool_loom` in a separate target
//!   directory, so the normal build cache is untouched) and the stress tests in release mode
//!   with more iterations.
//! * `itest` — the cross-crate integration tests in `tests/`.
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
        eprintln!("usage: cargo xtask <ci|race|itest|bench|bench-gateway|fuzz|modcycles> [args]");
        return ExitCode::FAILURE;
    };
    let result = match task.as_str() {
        "ci" => ci(),
        "race" => race(),
        "itest" => itest(),
        "bench" => bench(&args[1..]),
        "modcycles" => modcycles(args.get(1).map(String::as_str)),
        "bench-gateway" => bench_gateway::run(&args[1..]),
        "fuzz" => fuzz::run(&args[1..]),
        other => Err(format!(
            "unknown task {other:?}; expected ci, race, itest, bench, bench-gateway, fuzz or modcycles"
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
const ACYCLIC: &[&str] = &["crates/pool-core", "crates/pool-api", "crates/transport-uds", "crates/idlewatch"];

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
    race_loom()
}

/// The loom models: small, so they stay in `ci` as well as `race`.
fn race_loom() -> Result<(), String> {
    let mut c = with_args(
        cargo(),
        &["test", "-p", "pool-core", "-p", "idlewatch", "--lib", "--release", "--", "loom_"],
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
