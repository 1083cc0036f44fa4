//! svclb-load: the benchmark's load generator. Runs one workload against
//! IPv4 targets and prints one JSON object (ops/s, p50/p99/p999, errors).
//!
//! ```text
//! svclb-load run --workload crr --target 172.50.0.200:80 --threads 4 --duration-ms 2000
//! svclb-load probe --target 172.50.0.201:81 --expect 172.50.0.31 --limit-ms 5000
//! ```
//!
//! The bench starts it inside the sandbox's client namespace (and, for svclb,
//! inside the attached cgroup). It sends only to the targets it is given,
//! and stops by itself: after warm-up + duration, or a fixed operation cap.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use svclb_bench::load::{self, LoadSpec, Workload};

#[derive(Parser)]
#[command(name = "svclb-load", about = "svclb benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a workload and prints its result as JSON.
    Run {
        /// crr, rr, stream or udp.
        #[arg(long)]
        workload: String,
        /// IPv4:PORT; repeat it to spread connections over several targets at random.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 200)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        /// Per-operation timeout.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Pin the load threads to this CPU; with a comma-separated list,
        /// thread i to the (i mod length)th.
        #[arg(long, value_delimiter = ',')]
        cpu: Vec<usize>,
    },
    /// Connects until a connect reaches the server that answers EXPECT (an
    /// identity server's first line); prints `ready` after the first connect,
    /// then the match's timestamps as JSON.
    Probe {
        #[arg(long)]
        target: String,
        #[arg(long)]
        expect: String,
        #[arg(long, default_value_t = 10_000)]
        limit_ms: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run {
            workload,
            targets,
            threads,
            warmup_ms,
            duration_ms,
            timeout_ms,
            cpu,
        } => {
            let spec = LoadSpec {
                workload: Workload::parse(&workload)?,
                targets: targets
                    .iter()
                    .map(|t| load::parse_target(t))
                    .collect::<Result<_>>()?,
                threads,
                warmup: Duration::from_millis(warmup_ms),
                duration: Duration::from_millis(duration_ms.clamp(1, 600_000)),
                timeout: Duration::from_millis(timeout_ms.clamp(1, 60_000)),
                cpus: cpu,
            };
            let result = load::run(&spec)?;
            println!("{}", serde_json::to_string(&result)?);
        }
        Cmd::Probe {
            target,
            expect,
            limit_ms,
        } => {
            let result = load::probe(
                load::parse_target(&target)?,
                &expect,
                Duration::from_millis(limit_ms.clamp(1, 60_000)),
            )?;
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}
