//! svclb-bench: the sweep behind `cargo xtask bench` (run that instead: it
//! installs the tools and builds the release binaries first).
//!
//! Needs root. Writes BENCHMARKS.md and benchmarks.json into `--out`
//! (default: docs/ for the full sweep, target/bench/ for `--quick`).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Result};
use clap::Parser;
use svclb_bench::{control, machine, report, sweep};

#[derive(Parser)]
#[command(name = "svclb-bench", about = "svclb benchmark sweep (run as root)")]
struct Cli {
    /// The short sweep (well under 2 minutes): 1 repetition, 1 and 1,000 services.
    #[arg(long)]
    quick: bool,
    /// Where to write BENCHMARKS.md and benchmarks.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the repetitions.
    #[arg(long)]
    reps: Option<usize>,
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
    /// Skip the data-plane sweep (control-plane figures only).
    #[arg(long)]
    no_sweep: bool,
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
    if let Some(r) = cli.reps {
        plan.repetitions = r.max(1);
    }
    if let Some(s) = cli.services {
        plan.service_counts = s;
    }
    if let Some(d) = cli.duration_ms {
        plan.duration_ms = d.max(1);
    }
    if let Some(names) = cli.modes {
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
    let machine = machine::describe();
    println!(
        "machine: {} | kernel {} | {} x {} | {}",
        machine.os, machine.kernel, machine.cpus, machine.cpu, machine.perf
    );
    let data = if cli.no_sweep {
        sweep::SweepData::default()
    } else {
        sweep::run(&plan)
    };
    let control = (!cli.no_control).then(|| {
        control::run(&if cli.quick {
            control::ControlPlan::quick()
        } else {
            control::ControlPlan::full()
        })
    });
    let generated_utc = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let r = report::Report {
        generated_utc,
        summaries: sweep::summarize(&data),
        plan,
        machine,
        control,
        sweep: data,
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
    let failed = r.sweep.runs.iter().filter(|x| x.result.is_none()).count();
    if failed > 0 {
        bail!("{failed} runs failed (see above); the report was written anyway");
    }
    Ok(())
}
