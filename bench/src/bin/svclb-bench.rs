//! svclb-bench: the sweep behind `cargo xtask bench` (run that instead: it
//! installs the tools and builds the release binaries first).
//!
//! Needs root. Writes BENCHMARKS.md and benchmarks.json into `--out`
//! (default: docs/ for the full sweep, target/bench/ for `--quick`).
//!
//! Three parts: the data-plane sweep, the control-plane figures, and the
//! cost of packet counting (svclb against `svclbd --no-packet-counters`).
//! `--only counting` measures the last alone (about 13 minutes) and keeps
//! everything else of the benchmarks.json already in `--out`; `--only
//! docker` likewise measures the Docker source's event-to-connects figures
//! (part of the control plane) alone.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use svclb_bench::{control, counting, docker, idle, machine, report, sweep};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// The data-plane sweep.
    Sweep,
    /// The control-plane figures (the Docker source's included).
    Control,
    /// The Docker source's figures alone: from a Docker event to new
    /// connects, `svclbd --docker` against a fake engine with 1,000 and
    /// 10,000 services (about a minute; a part of `control`).
    Docker,
    /// The cost of packet counting (svclb vs svclb-nocount vs svclb-hookonly vs direct,
    /// STREAM and RR, 1 service, interleaved); about 13 minutes.
    Counting,
    /// svclbd's own cost: its CPU and RSS with no traffic at 1, 10,000 and
    /// 100,000 services, and the wall time of `svclb-ctl stats`, `list`,
    /// `rate` and a scrape of /metrics at 10,000 x 10 and 100,000 x 2
    /// (a few minutes, mostly svclbd's start-ups).
    Idle,
}

#[derive(Parser)]
#[command(name = "svclb-bench", about = "svclb benchmark sweep (run as root)")]
struct Cli {
    /// The short sweep (under 2 minutes): 1 repetition, 1 and 1,000 services.
    #[arg(long)]
    quick: bool,
    /// Measure this part only. With `counting`, `control`, `docker` or `idle`, the
    /// rest of the report comes from the benchmarks.json already in --out (if any).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Where to write BENCHMARKS.md and benchmarks.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the repetitions (of the sweep and of the counting measurement).
    #[arg(long)]
    reps: Option<usize>,
    /// Override the client thread counts (comma-separated; sweep and counting).
    #[arg(long, value_delimiter = ',')]
    threads: Option<Vec<usize>>,
    /// Override the service counts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Override the measured time of each run.
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Only these modes (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Skip the control-plane figures.
    #[arg(long)]
    no_control: bool,
    /// Skip the data-plane sweep.
    #[arg(long)]
    no_sweep: bool,
    /// Skip the counting-cost measurement (its figures are kept from the
    /// benchmarks.json already in --out).
    #[arg(long)]
    no_counting: bool,
    /// Measure nothing: render BENCHMARKS.md again from this benchmarks.json
    /// (into --out, keeping the notes there).
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(json) = &cli.render {
        let r = report::read_json(json)?;
        return report::write(&cli.out.unwrap_or_else(|| PathBuf::from("docs")), &r);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("svclb-bench must run as root: it creates network namespaces and cgroups, loads eBPF programs and installs netfilter rules inside its namespaces");
    }
    let mut plan = if cli.quick {
        sweep::Plan::quick()
    } else {
        sweep::Plan::full()
    };
    let mut counting_plan = if cli.quick {
        counting::CountingPlan::quick()
    } else {
        counting::CountingPlan::full()
    };
    if let Some(r) = cli.reps {
        plan.repetitions = r.max(1);
        counting_plan.repetitions = r.max(1);
    }
    if let Some(t) = &cli.threads {
        let t: Vec<usize> = t.iter().map(|&t| t.max(1)).collect();
        plan.threads.clone_from(&t);
        counting_plan.threads = t;
    }
    if let Some(s) = cli.services {
        plan.service_counts = s;
    }
    if let Some(d) = cli.duration_ms {
        plan.duration_ms = d.max(1);
        counting_plan.duration_ms = d.max(1);
    }
    if let Some(names) = cli.modes {
        for n in &names {
            if svclb_bench::modes::Mode::parse(n).is_none() {
                bail!("unknown mode {n:?}");
            }
        }
        plan.modes = svclb_bench::modes::Mode::ALL
            .into_iter()
            .filter(|m| names.iter().any(|n| n == m.name()))
            .collect();
        if !plan.modes.contains(&svclb_bench::modes::Mode::Direct) {
            plan.modes.insert(0, svclb_bench::modes::Mode::Direct);
        }
    }
    let out = cli
        .out
        .unwrap_or_else(|| PathBuf::from(if cli.quick { "target/bench" } else { "docs" }));
    let wants = |part: Part, skip: bool| cli.only.map_or(!skip, |only| only == part);
    let (do_sweep, do_control, do_counting, do_docker, do_idle) = (
        wants(Part::Sweep, cli.no_sweep),
        wants(Part::Control, cli.no_control),
        wants(Part::Counting, cli.no_counting),
        cli.only == Some(Part::Docker),
        wants(Part::Idle, false),
    );
    let json_path = out.join("benchmarks.json");
    let previous = json_path
        .exists()
        .then(|| report::read_json(&json_path))
        .transpose()?;
    let machine = machine::describe();
    println!(
        "machine: {} | kernel {} | {} x {} | {}",
        machine.os, machine.kernel, machine.cpus, machine.cpu, machine.perf
    );
    let data = if do_sweep {
        sweep::run(&plan)
    } else {
        sweep::SweepData::default()
    };
    let counting =
        do_counting.then(|| counting::run(&counting_plan, utc_now(), machine.svclb_commit.clone()));
    let (control_plan, docker_plan) = if cli.quick {
        (control::ControlPlan::quick(), docker::DockerPlan::quick())
    } else {
        (control::ControlPlan::full(), docker::DockerPlan::full())
    };
    let control = do_control.then(|| control::run(&control_plan, &docker_plan));
    let docker_data = do_docker.then(|| docker::run(&docker_plan));
    let idle_plan = if cli.quick {
        idle::IdlePlan::quick()
    } else {
        idle::IdlePlan::full()
    };
    let idle = do_idle.then(|| idle::run(&idle_plan));
    // Failed runs of this invocation (not of figures kept from before).
    let failed = data
        .runs
        .iter()
        .chain(counting.iter().flat_map(|c| &c.runs))
        .filter(|x| x.result.is_none())
        .count();
    let r = match previous {
        // Counting alone: everything else stays as it was.
        Some(mut previous) if cli.only == Some(Part::Counting) => {
            println!("keeping the rest of {}", json_path.display());
            previous.counting = counting;
            previous
        }
        // Control alone: likewise, with the new control-plane figures.
        Some(mut previous) if cli.only == Some(Part::Control) => {
            println!("keeping the rest of {}", json_path.display());
            previous.control = control;
            previous
        }
        // svclbd's own cost alone: likewise.
        Some(mut previous) if cli.only == Some(Part::Idle) => {
            println!("keeping the rest of {}", json_path.display());
            previous.idle = idle;
            previous
        }
        // The Docker figures alone: the rest of the control plane kept too.
        Some(mut previous) if cli.only == Some(Part::Docker) => {
            println!("keeping the rest of {}", json_path.display());
            match &mut previous.control {
                Some(c) => c.docker = docker_data,
                None => {
                    previous.control = Some(control::ControlData::docker_only(
                        &control_plan,
                        docker_data,
                    ))
                }
            }
            previous
        }
        previous => report::Report {
            generated_utc: utc_now(),
            summaries: sweep::summarize(&data),
            plan,
            machine,
            control: control.or_else(|| {
                docker_data.map(|d| control::ControlData::docker_only(&control_plan, Some(d)))
            }),
            sweep: data,
            idle: idle.or_else(|| previous.as_ref().and_then(|p| p.idle.clone())),
            counting: counting.or_else(|| previous.and_then(|p| p.counting)),
        },
    };
    println!("\ntargets:");
    for t in report::targets(&r) {
        println!(
            "  {:<60} {}  [{}]",
            t.target,
            t.figure,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            }
        );
    }
    report::write(&out, &r)?;

    if failed > 0 {
        bail!("{failed} runs failed (see above); the report was written anyway");
    }
    Ok(())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
