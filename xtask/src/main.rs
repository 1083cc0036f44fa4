//! `cargo xtask`: the project's build, setup and CI entry point.
//!
//! The eBPF crate needs a different compiler (Debian's rustc with a prebuilt
//! BPF `core`) from the host crates (rustup), so plain `cargo build` cannot
//! build everything; these commands encode the recipe in docs/TOOLCHAIN.md.

mod bench;
mod build;
mod cmd;
mod demo;
mod ebpf;
mod fuzz;
mod setup;
mod soak;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "svclb build, setup and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh Debian 12 machine needs to build and test (idempotent).
    Setup {
        /// Only what building needs; skip the integration test tools.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the eBPF object with Debian's toolchain and bpf-linker.
    BuildEbpf,
    /// Build the eBPF object, then the host crates.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI runs: setup, fmt, clippy, build, unit and integration tests (as root).
    Test {
        /// Passed to the integration test run (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run the demo (as root): the seed's scenario on a real,
    /// private single-node Docker Swarm followed by `svclbd --docker`.
    Demo {
        /// The namespace-only demo instead (no Docker: a config file, netns and a veth).
        #[arg(long)]
        sandbox: bool,
    },
    /// The long soak (as root): a million connects while the backends change
    /// every 100 ms; writes docs/SOAK.md.
    Soak {
        /// TCP connects (a UDP socket is added every 20th).
        #[arg(long, default_value_t = 1_000_000)]
        connects: u64,
    },
    /// Runs every fuzz target (fuzz/) for --time seconds each, with the
    /// committed seeds; stops at a crash, naming the target and the input.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (config, dns_answer, docker_network, docker_event, ctl_args).
        targets: Vec<String>,
    },
    /// Benchmark sweep (as root): installs the tools, builds release, writes docs/BENCHMARKS.md.
    Bench {
        /// The short sweep (under 2 minutes); writes to target/bench/ unless --out says otherwise.
        #[arg(long)]
        quick: bool,
        /// Where BENCHMARKS.md and benchmarks.json go (default: docs/, or target/bench/ with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Passed to svclb-bench (e.g. `-- --services 1,1000 --modes svclb`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup { build_only } => setup::run(!build_only).map(|()| ExitCode::SUCCESS),
        Command::BuildEbpf => ebpf::setup_and_build().map(|()| ExitCode::SUCCESS),
        Command::Build { release } => build::run(release).map(|()| ExitCode::SUCCESS),
        Command::Test { args } => test::run(&args),
        Command::Demo { sandbox } => demo::run(sandbox),
        Command::Soak { connects } => soak::run(connects).map(|()| ExitCode::SUCCESS),
        Command::Fuzz { time, targets } => fuzz::run(time, &targets).map(|()| ExitCode::SUCCESS),
        Command::Bench { quick, out, args } => bench::run(quick, out, &args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
