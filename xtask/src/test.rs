//! `cargo xtask test`: everything CI runs, as root.
//!
//! Setup and the eBPF build abort at once (nothing else can work without
//! them); after that every step runs even if an earlier one failed, so one
//! CI run reports all problems. Test output is tee'd to target/xtask/*.log
//! and cargo's `test result:` lines are parsed: an ignored test or an
//! integration run that executed nothing is a failure, because the
//! privileged tests must really run in CI. Each fuzz target runs for a
//! few seconds and counts as one test (passed, or failed naming the input).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, host_cargo, host_target_dir, is_root, workspace_root};
use crate::{build, ebpf, fuzz, setup};

/// What a whole run builds into an empty target directory (the debug
/// workspace and tests, the fuzz targets, the eBPF object: 4.1 GB
/// measured), with a margin.
const ROOM_NEEDED: u64 = 6 << 30;

pub fn run(extra_args: &[String]) -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "cargo xtask test must run as root: the integration tests load eBPF programs, \
             attach them to cgroups and create network namespaces"
        );
    }
    cmd::require_room("cargo xtask test", ROOM_NEEDED)?;
    setup::run(true)?;
    ebpf::build()?;

    let root = workspace_root();
    let mut failures: Vec<String> = Vec::new();
    let mut record = |result: Result<()>| match result {
        Ok(()) => true,
        Err(e) => {
            eprintln!("error: {e:#}");
            failures.push(format!("{e:#}"));
            false
        }
    };

    let mut fmt = host_cargo();
    fmt.current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]);
    record(cmd::run(&mut fmt));

    let mut clippy = host_cargo();
    clippy.current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "svclb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    record(cmd::run(&mut clippy));

    // The fuzz targets are a workspace of their own: fmt and clippy them too.
    let fuzz_manifest = root.join("fuzz/Cargo.toml");
    let mut fuzz_fmt = host_cargo();
    fuzz_fmt
        .current_dir(&root)
        .arg("fmt")
        .arg("--manifest-path")
        .arg(&fuzz_manifest)
        .args(["--", "--check"]);
    record(cmd::run(&mut fuzz_fmt));
    let mut fuzz_clippy = host_cargo();
    fuzz_clippy
        .current_dir(&root)
        .arg("clippy")
        .arg("--manifest-path")
        .arg(&fuzz_manifest)
        .args(["--locked", "--bins", "--", "-D", "warnings"]);
    record(cmd::run(&mut fuzz_clippy));

    // The integration tests run these binaries (SVCLB_BIN_DIR).
    let built = record(build::host(false));

    let log_dir = host_target_dir().join("xtask");
    let mut totals = Counts::default();

    let mut unit = host_cargo();
    unit.current_dir(&root).args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "svclb-ebpf",
        "--exclude",
        "svclb-tests",
    ]);
    match run_tests(&mut unit, &log_dir.join("unit-tests.log")) {
        Ok(outcome) => {
            totals.add(outcome.counts);
            record(outcome.verdict("unit tests", false));
        }
        Err(e) => {
            record(Err(e));
        }
    }

    // Each fuzz target runs briefly and counts as one test.
    match fuzz::build() {
        Ok(()) => {
            for target in fuzz::TARGETS {
                let run = fuzz::run_target(target, fuzz::SHORT_RUN_SECS);
                if record(run.map(|_| ())) {
                    totals.passed += 1;
                } else {
                    totals.failed += 1;
                }
            }
        }
        Err(e) => {
            totals.failed += fuzz::TARGETS.len() as u64;
            record(Err(e.context("building the fuzz targets: none ran")));
        }
    }

    if built {
        let bin_dir = host_target_dir().join("debug");
        let mut integration = host_cargo();
        integration
            .current_dir(&root)
            .args(["test", "--no-fail-fast", "-p", "svclb-tests", "--"])
            .arg("--test-threads=1")
            .args(extra_args)
            .env("SVCLB_BIN_DIR", &bin_dir);
        match run_tests(&mut integration, &log_dir.join("integration-tests.log")) {
            Ok(outcome) => {
                totals.add(outcome.counts);
                record(outcome.verdict("integration tests", true));
            }
            Err(e) => {
                record(Err(e));
            }
        }
    } else {
        record(Err(anyhow::anyhow!(
            "integration tests: not run because the build failed"
        )));
    }

    cmd::header("summary");
    for failure in &failures {
        println!("FAILED: {failure}");
    }
    println!("{} passed, {} failed", totals.passed, totals.failed);
    Ok(if failures.is_empty() && totals.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Default, Debug, Clone, Copy, PartialEq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

struct Outcome {
    command: String,
    status: ExitStatus,
    log: PathBuf,
    counts: Counts,
    failed: Vec<String>,
    ignored: Vec<String>,
}

impl Outcome {
    /// Ok only if cargo succeeded, nothing failed or was ignored, and (for
    /// the integration run) at least one test executed.
    fn verdict(&self, what: &str, must_run_some: bool) -> Result<()> {
        let c = self.counts;
        println!(
            "{what}: {} passed, {} failed, {} ignored (log: {})",
            c.passed,
            c.failed,
            c.ignored,
            self.log.display()
        );
        let mut problems = Vec::new();
        if !self.status.success() {
            problems.push(format!("`{}` exited with {}", self.command, self.status));
        }
        if c.failed > 0 {
            problems.push(format!("failed: {}", self.failed.join(", ")));
        }
        if c.ignored > 0 {
            problems.push(format!(
                "{} ignored (CI must run every test): {}",
                c.ignored,
                self.ignored.join(", ")
            ));
        }
        if must_run_some && c.passed + c.failed == 0 {
            problems.push("0 tests executed".into());
        }
        if !problems.is_empty() {
            bail!("{what}: {}", problems.join("; "));
        }
        Ok(())
    }
}

/// Runs a `cargo test` command, copying its stdout and stderr to the
/// terminal and to `log`, then parses what it printed.
fn run_tests(cargo: &mut Command, log: &Path) -> Result<Outcome> {
    cmd::header(&cmd::display(cargo));
    run_tests_echo(cargo, log, true)
}

/// `echo: false` keeps the output off the terminal: this crate's own unit
/// test must not print `test result:` lines into the run that parses them.
fn run_tests_echo(cargo: &mut Command, log: &Path, echo: bool) -> Result<Outcome> {
    let command = cmd::display(cargo);
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_file =
        Mutex::new(File::create(log).with_context(|| format!("creating {}", log.display()))?);
    let mut child = cargo
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not run `{command}`"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (out_lines, err_lines) = std::thread::scope(|s| {
        let (out, err) = if echo {
            (
                s.spawn(|| tee(stdout, io::stdout(), &log_file)),
                s.spawn(|| tee(stderr, io::stderr(), &log_file)),
            )
        } else {
            (
                s.spawn(|| tee(stdout, io::sink(), &log_file)),
                s.spawn(|| tee(stderr, io::sink(), &log_file)),
            )
        };
        (
            out.join().expect("stdout tee thread"),
            err.join().expect("stderr tee thread"),
        )
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{command}`"))?;
    let mut lines = out_lines;
    lines.extend(err_lines);
    let (counts, failed, ignored) = parse(&lines);
    Ok(Outcome {
        command,
        status,
        log: log.to_path_buf(),
        counts,
        failed,
        ignored,
    })
}

/// Copies `from` line by line to `to` and the log; returns the lines.
fn tee(from: impl Read, mut to: impl Write, log: &Mutex<File>) -> Vec<String> {
    let mut reader = BufReader::new(from);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // Terminal or log write errors must not stop the child's output being drained.
                let _ = to.write_all(&buf).and_then(|()| to.flush());
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(&buf);
                }
                lines.push(String::from_utf8_lossy(&buf).trim_end().to_string());
            }
        }
    }
    lines
}

/// Sums libtest's `test result:` lines and collects the names of failed and
/// ignored tests from its `test NAME ... OUTCOME` lines.
fn parse(lines: &[String]) -> (Counts, Vec<String>, Vec<String>) {
    let mut counts = Counts::default();
    let (mut failed, mut ignored) = (Vec::new(), Vec::new());
    for line in lines {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
            for field in rest.split(';') {
                let mut words = field.split_whitespace();
                let (Some(n), Some(kind)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match kind {
                    "passed" => counts.passed += n,
                    "failed" => counts.failed += n,
                    "ignored" => counts.ignored += n,
                    _ => {}
                }
            }
        } else if let Some((name, outcome)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.rsplit_once(" ... "))
        {
            if outcome == "FAILED" {
                failed.push(name.to_string());
            } else if outcome.starts_with("ignored") {
                ignored.push(name.to_string());
            }
        }
    }
    (counts, failed, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn parses_results_and_names() {
        let out = lines(
            "running 3 tests\n\
             test a::one ... ok\n\
             test a::two ... FAILED\n\
             test a::three ... ignored, needs root\n\
             test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
             \n\
             running 2 tests\n\
             test src/lib.rs - f (line 3) ... ok\n\
             test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; finished in 0.00s\n",
        );
        let (counts, failed, ignored) = parse(&out);
        assert_eq!(
            counts,
            Counts {
                passed: 3,
                failed: 1,
                ignored: 1
            }
        );
        assert_eq!(failed, ["a::two"]);
        assert_eq!(ignored, ["a::three"]);
    }

    #[test]
    fn tee_logs_both_streams_and_parses() {
        let log = std::env::temp_dir().join(format!("xtask-tee-{}.log", std::process::id()));
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "echo 'test x ... ignored'; echo 'to stderr' >&2; \
             echo 'test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out'; exit 3",
        ]);
        let outcome = run_tests_echo(&mut sh, &log, false).unwrap();
        let logged = fs::read_to_string(&log).unwrap();
        fs::remove_file(&log).unwrap();
        assert!(logged.contains("to stderr") && logged.contains("test result: ok."));
        assert_eq!(outcome.status.code(), Some(3));
        assert_eq!(outcome.ignored, ["x"]);
        let err = outcome.verdict("t", true).unwrap_err().to_string();
        assert!(
            err.contains("exited with") && err.contains("1 ignored"),
            "{err}"
        );
    }

    #[test]
    fn no_result_lines_means_nothing_ran() {
        let (counts, _, _) = parse(&lines("error[E0425]: cannot find value `x`"));
        assert_eq!(counts, Counts::default());
    }
}
