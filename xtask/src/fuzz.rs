//! `cargo xtask fuzz [target] [--time S]`: builds the fuzz targets of `fuzz/` with libFuzzer's
//! coverage instrumentation on the stable toolchain, runs one target (or each in turn) for `S`
//! seconds (default 60) on its committed corpus, and prints each run's executions and coverage
//! from libFuzzer's closing statistics.
//!
//! No `cargo fuzz` and no nightly: the instrumentation is what cargo-fuzz asks rustc for when it
//! builds without a sanitizer (`-Cpasses=sancov-module` and the SanitizerCoverage options, all
//! stable flags), and `libfuzzer-sys` compiles libFuzzer itself with the system's C++ compiler.
//! `--target` is given so the flags reach the targets' code but not build scripts or proc
//! macros. The build goes to `fuzz/target`, apart from the workspace's.
//!
//! New inputs that reach new coverage are added to `fuzz/corpus/<target>/` (minimise the corpus
//! before committing it, as the README shows); a crash is written to `fuzz/artifacts/<target>/`
//! and fails the task. libFuzzer's whole output of a run is kept in
//! `fuzz/artifacts/<target>/last-run.log`. Each run is capped at inputs of 4 KiB and 2 GiB of
//! RSS.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::root;

/// The targets, in the order `cargo xtask fuzz` runs them (the binaries of `fuzz/Cargo.toml`).
const TARGETS: &[&str] = &[
    "wire_decode",
    "uds_frames",
    "grpc_messages",
    "acl",
    "config_pool",
    "config_httpserver",
    "config_idlewatch",
    "config_gateway",
    "config_docker_agent",
    "gateway_head",
    "gateway_ws",
];

/// The rustc flags of a libFuzzer build without a sanitizer, as cargo-fuzz passes them.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// The host's target triple, which the build names so that `RUSTFLAGS` skip build scripts.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Runs the task with its arguments: `[target] [--time S] [-- libFuzzer options]`.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut target = None;
    let mut seconds = 60u64;
    let mut extra: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--time" => {
                let value = it.next().ok_or("--time needs a number of seconds")?;
                seconds = value.parse().map_err(|_| format!("--time {value:?}: not a number of seconds"))?;
            }
            "--" => extra.extend(it.by_ref().cloned()),
            name if target.is_none() && TARGETS.contains(&name) => target = Some(name.to_owned()),
            other => {
                return Err(format!("unexpected {other:?}; targets: {}", TARGETS.join(", ")));
            }
        }
    }
    let fuzz = root().join("fuzz");
    let selected: Vec<&str> = match &target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    build(&fuzz, &selected)?;
    let mut report = Vec::new();
    for name in &selected {
        report.push(run_one(&fuzz, name, seconds, &extra)?);
    }
    println!("\n{:<20} {:>12} {:>8} {:>8} {:>8} {:>7}", "target", "execs", "execs/s", "cov", "ft", "corpus");
    for r in &report {
        println!(
            "{:<20} {:>12} {:>8} {:>8} {:>8} {:>7}",
            r.name, r.execs, r.per_second, r.cov, r.features, r.corpus
        );
    }
    Ok(())
}

fn build(fuzz: &Path, targets: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(fuzz)
        .args(["build", "--release", "--target", TRIPLE])
        .env("RUSTFLAGS", RUSTFLAGS)
        .env("CARGO_TARGET_DIR", fuzz.join("target"));
    for t in targets {
        cmd.args(["--bin", t]);
    }
    crate::step("build fuzz targets (instrumented, release)", cmd)
}

/// What one run's closing statistics said.
struct Report {
    name: String,
    execs: String,
    per_second: String,
    cov: String,
    features: String,
    corpus: String,
}

fn run_one(fuzz: &Path, name: &str, seconds: u64, extra: &[String]) -> Result<Report, String> {
    let corpus = fuzz.join("corpus").join(name);
    let artifacts = fuzz.join("artifacts").join(name);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts).map_err(|e| format!("{}: {e}", artifacts.display()))?;
    let binary = fuzz.join("target").join(TRIPLE).join("release").join(name);
    let mut cmd = Command::new(&binary);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-max_len=4096")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(extra)
        .arg(&corpus);
    eprintln!("==> fuzz {name} for {seconds}s");
    let started = Instant::now();
    let output = cmd.output().map_err(|e| format!("{}: cannot run: {e}", binary.display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let log_file = artifacts.join("last-run.log");
    std::fs::write(&log_file, log.as_bytes()).map_err(|e| format!("{}: {e}", log_file.display()))?;
    eprintln!(
        "<== fuzz {name}: {} in {:.1?} (log: {})",
        output.status,
        started.elapsed(),
        log_file.display()
    );
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{name} found a failure (artifacts in {}):\n{}",
            artifacts.display(),
            tail.join("\n")
        ));
    }
    let stat = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| "?".into())
    };
    // The last status line (`#N DONE cov: … ft: … corp: …` or the last `pulse`/`NEW`) for
    // coverage, since the final statistics give executions only.
    let last = log.lines().rev().find(|l| l.starts_with('#') && l.contains("cov:")).unwrap_or("");
    let field =
        |key: &str| last.split_whitespace().skip_while(|w| *w != key).nth(1).unwrap_or("?").to_owned();
    Ok(Report {
        name: name.to_owned(),
        execs: stat("stat::number_of_executed_units:"),
        per_second: stat("stat::average_exec_per_sec:"),
        cov: field("cov:"),
        features: field("ft:"),
        corpus: field("corp:"),
    })
}
