//! svclb-ctl: the operator's tool. Reads the pinned maps directly, so it
//! works whether svclbd runs or not.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use svclb::{
    cgroup::CgroupPath,
    config,
    dataplane::Dataplane,
    loader::{self, Capacities},
    pins::PinDir,
    reconcile, stats,
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Inspect and steer svclb's data plane (ipvsadm-compatible listings)"
)]
struct Args {
    /// Where svclbd pinned the maps and links.
    #[arg(long, global = true, default_value = svclb::DEFAULT_PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Services and backends, like `ipvsadm -L -n`.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Counters, like `ipvsadm -L -n --stats`.
    Stats {
        /// Full numbers instead of K/M/G abbreviations.
        #[arg(long)]
        exact: bool,
        #[arg(long)]
        json: bool,
    },
    /// Shows what applying FILE would change, as ipvsadm rules.
    Diff { file: PathBuf },
    /// Applies FILE to the maps now (all or nothing).
    Apply { file: PathBuf },
    /// Attaches svclb to a cgroup (loads the programs against the pinned maps).
    Attach {
        #[arg(long, value_name = "PATH")]
        cgroup: PathBuf,
    },
    /// Detaches svclb from a cgroup.
    Detach {
        #[arg(long, value_name = "PATH")]
        cgroup: PathBuf,
    },
    /// Lists the cgroups svclb is attached to.
    Attachments {
        #[arg(long)]
        json: bool,
    },
    /// Detaches everything and removes every pinned map: balancing stops.
    Teardown,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("svclb-ctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let pins = PinDir::new(&args.pin_dir);
    match args.command {
        Command::List { json } => {
            let report = stats::collect(&Dataplane::open(&pins)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", stats::format_list(&report));
            }
        }
        Command::Stats { exact, json } => {
            let report = stats::collect(&Dataplane::open(&pins)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", stats::format_stats(&report, exact));
            }
        }
        Command::Diff { file } => {
            let desired = config::load_file(&file)?;
            let dp = Dataplane::open(&pins)?;
            let plan = reconcile::plan(&dp.snapshot()?, &desired, dp.capacity)?;
            for change in &plan.changes {
                println!("{change}");
            }
        }
        Command::Apply { file } => {
            let desired = config::load_file(&file)?;
            let mut dp = Dataplane::open(&pins)?;
            let plan = reconcile::apply(&mut dp, &desired)?;
            for change in &plan.changes {
                println!("{change}");
            }
        }
        Command::Attach { cgroup } => {
            let cg = CgroupPath::resolve(&cgroup)?;
            let mut loaded = loader::load(&pins, Capacities::default())?;
            loaded.attach(&cg)?;
            println!("attached to {}", cg.absolute.display());
        }
        Command::Detach { cgroup } => {
            loader::require_root()?;
            let cg = CgroupPath::resolve(&cgroup)?;
            if loader::detach(&pins, &cg)? {
                println!("detached from {}", cg.absolute.display());
            } else {
                anyhow::bail!("svclb is not attached to {}", cg.absolute.display());
            }
        }
        Command::Attachments { json } => {
            let list = loader::attachments(&pins)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for a in list {
                    println!("/{}\t{}", a.cgroup, a.programs.join(","));
                }
            }
        }
        Command::Teardown => {
            loader::require_root()?;
            loader::teardown(&pins)?;
            println!("removed every svclb pin under {}", pins.root().display());
        }
    }
    Ok(())
}
