//! svclbd's own cost (issue 16), so that background work can never hide in
//! a throughput figure: the time to READY (into new maps, and a restart),
//! its CPU (user + system time from /proc/PID/stat over a fixed window)
//! and RSS with no traffic at all, and the wall time
//! of the reads a user or a Prometheus server makes (`svclb-ctl stats`,
//! `list`, `rate`, each a whole process, and a scrape of /metrics).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use svclb_tests::{daemon, PinDir, Sandbox};

use crate::cpu::CpuWindow;
use crate::modes::{start_svclbd_with, svclb_config, ServiceSet, TempDir};
use crate::sweep::Spread;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdlePlan {
    /// Service counts of the idle table, each with `idle_backends` backends.
    pub idle_services: Vec<usize>,
    pub idle_backends: usize,
    /// The window svclbd's CPU time is measured over.
    pub window_secs: u64,
    /// (services, backends each) of the reads table.
    pub reads: Vec<(usize, usize)>,
    /// Repetitions of each read.
    pub read_repetitions: usize,
}

impl IdlePlan {
    pub fn full() -> IdlePlan {
        IdlePlan {
            idle_services: vec![1, 10_000, 100_000],
            idle_backends: 2,
            window_secs: 10,
            reads: vec![(10_000, 2), (10_000, 10), (100_000, 2)],
            read_repetitions: 3,
        }
    }

    pub fn quick() -> IdlePlan {
        IdlePlan {
            idle_services: vec![1, 10_000],
            idle_backends: 2,
            window_secs: 4,
            reads: vec![(10_000, 2), (10_000, 10)],
            read_repetitions: 1,
        }
    }
}

/// svclbd with no traffic.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleFigure {
    pub services: usize,
    pub backends: usize,
    /// User + system time over the window, in % of one CPU.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// From svclbd's spawn to READY into new maps, and again over the pins
    /// the first start left (a restart with the same config).
    #[serde(default)]
    pub ready_ms: Option<f64>,
    #[serde(default)]
    pub restart_ready_ms: Option<f64>,
    pub error: Option<String>,
}

/// One read's wall time, process start included.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadFigure {
    pub services: usize,
    pub backends: usize,
    pub what: String,
    pub ms: Option<Spread>,
    /// What the read returned (lines of text), to tell a fast read from an empty one.
    pub lines: usize,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleData {
    pub plan: IdlePlan,
    pub idle: Vec<IdleFigure>,
    pub reads: Vec<ReadFigure>,
}

pub fn run(plan: &IdlePlan) -> IdleData {
    println!(
        "svclbd's own cost: idle at {:?} services x {}, reads at {:?}",
        plan.idle_services, plan.idle_backends, plan.reads
    );
    // One svclbd per service set: the idle figure and the reads of a set
    // share it (the idle window comes first, before anything reads).
    let mut sets: Vec<(usize, usize)> = plan
        .idle_services
        .iter()
        .map(|&n| (n, plan.idle_backends))
        .collect();
    for r in &plan.reads {
        if !sets.contains(r) {
            sets.push(*r);
        }
    }
    let mut idle = Vec::new();
    let mut reads = Vec::new();
    for (services, backends) in sets {
        let wants_idle = backends == plan.idle_backends && plan.idle_services.contains(&services);
        let wants_reads = plan.reads.contains(&(services, backends));
        let outcome = measure_set(plan, services, backends, wants_idle, wants_reads);
        match outcome {
            Ok((i, r)) => {
                idle.extend(i);
                reads.extend(r);
            }
            Err(e) => {
                let error = Some(format!("{e:#}"));
                println!("  {services} x {backends}: FAILED {e:#}");
                if wants_idle {
                    idle.push(IdleFigure {
                        services,
                        backends,
                        cpu_percent: None,
                        rss_bytes: None,
                        ready_ms: None,
                        restart_ready_ms: None,
                        error: error.clone(),
                    });
                }
                if wants_reads {
                    reads.push(ReadFigure {
                        services,
                        backends,
                        what: "all".into(),
                        ms: None,
                        lines: 0,
                        error,
                    });
                }
            }
        }
    }
    IdleData {
        plan: plan.clone(),
        idle,
        reads,
    }
}

/// The reads of the table, named as the table shows them.
pub const READS: [&str; 4] = [
    "svclb-ctl stats",
    "svclb-ctl list",
    "svclb-ctl rate",
    "scrape /metrics",
];

fn measure_set(
    plan: &IdlePlan,
    services: usize,
    backends: usize,
    wants_idle: bool,
    wants_reads: bool,
) -> Result<(Option<IdleFigure>, Vec<ReadFigure>)> {
    // ServiceSet's count includes the measured service (3 backends).
    let set = ServiceSet::new(services, backends);
    let max_services = (services as u32 + 1).next_power_of_two().max(1024);
    let max_backends = ((services * backends) as u32 + 3)
        .next_power_of_two()
        .max(1024);
    let sandbox = Sandbox::new()?;
    let dir = TempDir::new("idle")?;
    let config = dir.write("services.toml", &svclb_config(&set))?;
    let pins = PinDir::new();
    // Metrics on (a port of its own), as deployed; no file watch. Started
    // twice: into new maps, then over the pins the first left (a restart).
    let start = || {
        let t = Instant::now();
        let daemon = start_svclbd_with(
            &pins,
            Some(&config),
            sandbox.cgroup_path(),
            max_services,
            max_backends,
            &["--log", "warn", "--no-watch"],
        )?;
        anyhow::Ok((daemon, t.elapsed().as_secs_f64() * 1e3))
    };
    let (first, ready_ms) = start()?;
    first.stop()?;
    let (daemon, restart_ready_ms) = start()?;
    println!(
        "  ready at {services} x {backends}: {ready_ms:.0} ms into new maps, {restart_ready_ms:.0} ms over the pins (process start included)"
    );
    let pid = daemon.pid();
    // The first samples write every estimator once; then it is idle.
    std::thread::sleep(Duration::from_secs(5));
    let idle = if wants_idle {
        let window = CpuWindow::start(pid)?;
        std::thread::sleep(Duration::from_secs(plan.window_secs));
        let cpu_percent = window.percent()?;
        let rss_bytes = rss_bytes(pid)?;
        println!(
            "  idle at {services} x {backends}: {cpu_percent:.2}% of a CPU, RSS {:.1} MiB",
            rss_bytes as f64 / 1048576.0
        );
        Some(IdleFigure {
            services,
            backends,
            cpu_percent: Some(cpu_percent),
            rss_bytes: Some(rss_bytes),
            ready_ms: Some(ready_ms),
            restart_ready_ms: Some(restart_ready_ms),
            error: None,
        })
    } else {
        None
    };
    let mut reads = Vec::new();
    if wants_reads {
        let metrics = daemon.metrics_addr().context("svclbd serves no metrics")?;
        for what in READS {
            let mut times = Vec::new();
            let mut lines = 0;
            let mut error = None;
            for _ in 0..plan.read_repetitions.max(1) {
                let t = Instant::now();
                let result = match what.strip_prefix("svclb-ctl ") {
                    Some(cmd) => ctl_lines(&pins, cmd),
                    None => svclb_tests::http::get(metrics, "/metrics")
                        .map_err(anyhow::Error::from)
                        .and_then(|(status, text)| match status {
                            200 => Ok(text.lines().count()),
                            _ => bail!("HTTP {status}"),
                        }),
                };
                match result {
                    Ok(n) => {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                        lines = n;
                    }
                    Err(e) => error = Some(format!("{e:#}")),
                }
            }
            let ms = Spread::of(&times);
            if let Some(s) = &ms {
                println!(
                    "  {what} at {services} x {backends}: {:.0} ms (min {:.0}, max {:.0}), {lines} lines",
                    s.median, s.min, s.max
                );
            }
            reads.push(ReadFigure {
                services,
                backends,
                what: what.into(),
                ms,
                lines,
                error,
            });
        }
    }
    daemon.stop()?;
    Ok((idle, reads))
}

/// Runs `svclb-ctl CMD` and counts its output lines; the wall time the
/// caller takes includes the process's start, as a user sees it.
fn ctl_lines(pins: &PinDir, cmd: &str) -> Result<usize> {
    let out = Command::new(daemon::bin("svclb-ctl"))
        .arg("--pin-dir")
        .arg(pins.path())
        .arg(cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running svclb-ctl")?;
    if !out.status.success() {
        bail!("svclb-ctl {cmd} failed ({})", out.status);
    }
    Ok(out.stdout.iter().filter(|&&b| b == b'\n').count())
}

/// A process's resident set (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}
