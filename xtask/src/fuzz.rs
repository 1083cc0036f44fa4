//! `cargo xtask fuzz`: the fuzz targets in fuzz/ (cargo-fuzz's layout),
//! built and run without cargo-fuzz or a nightly toolchain.
//!
//! They are built by rustup's stable cargo with `RUSTC_BOOTSTRAP=1` and the
//! flags cargo-fuzz passes (SanitizerCoverage for libFuzzer, AddressSanitizer,
//! `--cfg fuzzing`, debug assertions and overflow checks), for the host
//! triple given explicitly so that build scripts and proc macros are built
//! without them. libfuzzer-sys compiles libFuzzer with the C++ compiler
//! (`g++`, installed by setup).
//!
//! Each target runs for the time asked on its working corpus
//! (target/fuzz/corpus/<target>, kept between runs) plus the committed seeds
//! (fuzz/seeds/<target>). A crash, a leak, a timeout or running out of
//! memory stops the run, naming the target and the input libFuzzer saved
//! (target/fuzz/artifacts/<target>/); make it a regression test in svclb.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, host_cargo, host_target_dir, workspace_root};

/// Every target, in fuzz/fuzz_targets/.
pub const TARGETS: &[&str] = &[
    "config",
    "dns_answer",
    "docker_network",
    "docker_event",
    "ctl_args",
];

/// What `cargo xtask test` gives each target.
pub const SHORT_RUN_SECS: u64 = 5;

/// What one target's run did.
pub struct Run {
    pub target: &'static str,
    pub execs: u64,
    pub execs_per_sec: u64,
    pub corpus: usize,
}

/// `cargo xtask fuzz`: build, then run each target (or those in `only`)
/// for `secs` seconds; stops at the first that fails.
pub fn run(secs: u64, only: &[String]) -> Result<()> {
    for name in only {
        if !TARGETS.contains(&name.as_str()) {
            bail!("no fuzz target {name:?}; there are: {}", TARGETS.join(", "));
        }
    }
    build()?;
    let mut runs = Vec::new();
    for target in TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        runs.push(run_target(target, secs)?);
    }
    cmd::header("fuzz: every target ran without a failure");
    for r in &runs {
        println!("{}", r.summary());
    }
    Ok(())
}

impl Run {
    pub fn summary(&self) -> String {
        format!(
            "{:<16} {:>10} execs  {:>7}/s  corpus {}",
            self.target, self.execs, self.execs_per_sec, self.corpus
        )
    }
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// Apart from the host crates': other flags, other artifacts.
fn target_dir() -> PathBuf {
    host_target_dir().join("fuzz")
}

fn triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// The flags cargo-fuzz passes to rustc.
fn rustflags() -> Vec<&'static str> {
    vec![
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg=fuzzing",
        "-Zsanitizer=address",
        "-Cdebug-assertions",
        "-Coverflow-checks",
    ]
}

/// Builds every target (release, with the sanitizers).
pub fn build() -> Result<()> {
    if cmd::output_if_ok("g++", &["--version"]).is_none() {
        bail!("no g++ (libfuzzer-sys compiles libFuzzer with it): run `cargo xtask setup`");
    }
    // The targets never load the programs: an empty object, written once,
    // spares svclb's build script (a missing object re-runs it every time).
    let object = target_dir().join("no-ebpf.o");
    if !object.exists() {
        fs::create_dir_all(target_dir())?;
        fs::write(&object, b"").with_context(|| format!("writing {}", object.display()))?;
    }
    let mut cargo = host_cargo();
    cargo
        .env("SVCLB_EBPF_OBJECT", &object)
        .current_dir(fuzz_dir())
        .args(["build", "--release", "--locked", "--bins", "--target"])
        .arg(triple())
        .arg("--target-dir")
        .arg(target_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags().join("\x1f"))
        .env_remove("RUSTFLAGS");
    cmd::run(&mut cargo)
}

/// Runs one built target for `secs` seconds.
pub fn run_target(target: &'static str, secs: u64) -> Result<Run> {
    let bin = target_dir().join(triple()).join("release").join(target);
    let corpus = target_dir().join("corpus").join(target);
    let artifacts = target_dir().join("artifacts").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    let log = target_dir().join("logs").join(format!("{target}.log"));
    for dir in [&corpus, &artifacts, &log.parent().unwrap().to_path_buf()] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut fuzz = Command::new(&bin);
    fuzz.arg(format!("-max_total_time={secs}"))
        // An input that takes a second is a hang in a config or DNS parser.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(&seeds);
    // One file for both streams, in order.
    let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    fuzz.stdout(file.try_clone()?).stderr(file);
    cmd::header(&format!(
        "fuzz {target} for {secs} s (log: {})",
        log.display()
    ));
    let status = fuzz.status().with_context(|| {
        format!(
            "could not run {} (built by `cargo xtask fuzz`?)",
            bin.display()
        )
    })?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let input = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
            .unwrap_or("(none written; see the log)");
        bail!(
            "fuzz target {target} failed ({status}); the input is {input}\n\
             reproduce: {} {input}\n\
             last lines of {}:\n{}",
            bin.display(),
            log.display(),
            tail.join("\n")
        );
    }
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let run = Run {
        target,
        execs: stat("number_of_executed_units"),
        execs_per_sec: stat("average_exec_per_sec"),
        corpus: fs::read_dir(&corpus).map_or(0, |d| d.count()),
    };
    if run.execs == 0 {
        bail!("fuzz target {target} ran no input (log: {})", log.display());
    }
    println!("{}", run.summary());
    Ok(run)
}
