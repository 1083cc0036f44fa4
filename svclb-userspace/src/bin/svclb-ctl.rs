//! svclb-ctl: the operator's tool. Reads the pinned maps directly, so it
//! works whether svclbd runs or not.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use svclb::{
    cgroup::CgroupPath,
    config,
    dataplane::{Dataplane, Wanted},
    loader::{self, Capacities},
    model,
    pins::PinDir,
    reconcile, stats, sync,
    target::{self, Target},
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
    /// Rates, like `ipvsadm -L -n --rate` (svclbd's 2 s estimator).
    Rate {
        #[arg(long)]
        json: bool,
    },
    /// Shows what applying FILE would change, as ipvsadm rules (resolving
    /// its discovered services once).
    Diff { file: PathBuf },
    /// Applies FILE to the maps now, all or nothing (resolving its
    /// discovered services once).
    Apply { file: PathBuf },
    /// Attaches svclb to a cgroup (loads the programs against the pinned maps).
    Attach(AttachArgs),
    /// Detaches svclb from a cgroup.
    Detach(TargetArg),
    /// Lists the cgroups svclb is attached to.
    Attachments {
        #[arg(long)]
        json: bool,
    },
    /// Detaches everything and removes every pinned map: balancing stops.
    Teardown,
}

#[derive(ClapArgs, Debug)]
struct AttachArgs {
    #[command(flatten)]
    target: TargetArg,
    /// A network this cgroup's processes are on (repeatable): they see the
    /// services limited to it. Without any, they see only unlimited services.
    #[arg(long = "network", value_name = "NAME")]
    networks: Vec<String>,
}

/// What to attach to or detach from.
#[derive(ClapArgs, Debug)]
struct TargetArg {
    #[command(flatten)]
    which: Which,
    /// The Docker engine, for --container: unix://PATH.
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    docker_host: Option<String>,
}

/// Exactly one of --cgroup, --pid, --container.
#[derive(ClapArgs, Debug)]
#[group(required = true, multiple = false)]
struct Which {
    /// A cgroup v2 directory (absolute, or relative to the cgroup2 mount).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// The cgroup of this process.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// The cgroup of this Docker container's process (ID or name), asked of the engine.
    #[arg(long, value_name = "ID")]
    container: Option<String>,
}

impl TargetArg {
    fn resolve(&self) -> Result<CgroupPath> {
        let w = &self.which;
        let t = match (&w.cgroup, w.pid, &w.container) {
            (Some(c), _, _) => Target::Cgroup(c.clone()),
            (_, Some(p), _) => Target::Pid(p),
            (_, _, Some(id)) => Target::Container(id.clone()),
            _ => anyhow::bail!("give --cgroup, --pid or --container"),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        Ok(runtime
            .block_on(target::resolve_all(&[t], self.docker_host.as_deref()))?
            .remove(0))
    }
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
            let wanted = Wanted {
                schedulers: true,
                conns: true,
                ..Wanted::default()
            };
            let report = stats::collect(&Dataplane::open(&pins)?, wanted)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&stats::list_view(&report))?
                );
            } else {
                print_all(&stats::format_list(&report))?;
            }
            exiting(report);
        }
        Command::Stats { exact, json } => {
            // The JSON has every figure; the table only the counters.
            let wanted = Wanted {
                stats: true,
                ..if json { Wanted::ALL } else { Wanted::default() }
            };
            let report = stats::collect(&Dataplane::open(&pins)?, wanted)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_all(&stats::format_stats(&report, exact))?;
            }
            exiting(report);
        }
        Command::Rate { json } => {
            let dp = Dataplane::open(&pins)?;
            let wanted = Wanted {
                rates: true,
                ..if json { Wanted::ALL } else { Wanted::default() }
            };
            let report = stats::collect(&dp, wanted)?;
            if let Some(age) = stats::rates_age(&dp)? {
                if age > std::time::Duration::from_secs(6) {
                    eprintln!(
                        "svclb-ctl: the rates are {}s old: svclbd is not sampling them (is it running?)",
                        age.as_secs()
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_all(&stats::format_rate(&report))?;
            }
            exiting(report);
        }
        Command::Diff { file } => {
            let config = config::load_file(&file)?;
            let dp = Dataplane::open(&pins)?;
            let snapshot = dp.snapshot()?;
            let desired = desired_now(&config, &snapshot)?;
            let plan = reconcile::plan(&snapshot, &desired, dp.capacity())?;
            for change in &plan.changes {
                println!("{change}");
            }
        }
        Command::Apply { file } => {
            let config = config::load_file(&file)?;
            let mut dp = Dataplane::open(&pins)?;
            let desired = desired_now(&config, &dp.snapshot()?)?;
            let committed = sync::commit(&mut dp, &desired, |_| {})?;
            for change in &committed.plan.changes {
                println!("{change}");
            }
            // Said only where sockets were ended: an apply prints what it did.
            for e in committed.ended.iter().filter(|e| e.sockets > 0) {
                println!(
                    "ended {} socket(s) connected to {} of {} (FWM {})",
                    e.sockets, e.addr, e.service, e.mark
                );
            }
        }
        Command::Attach(AttachArgs { target, networks }) => {
            let cg = target.resolve()?;
            svclb::probe::require(svclb::probe::FEATURES)?;
            let mut loaded = loader::load(&pins, Capacities::default())?;
            // Networks first: the cgroup sees its services from its first connect.
            Dataplane::open(&pins)?.set_cgroup_networks(cg.id()?, &networks)?;
            loaded.attach(&cg)?;
            if networks.is_empty() {
                println!("attached to {}", cg.absolute.display());
            } else {
                println!(
                    "attached to {} on networks {}",
                    cg.absolute.display(),
                    networks.join(", ")
                );
            }
        }
        Command::Detach(target) => {
            svclb::privileges::require_root()?;
            let cg = target.resolve()?;
            let detached = loader::detach(&pins, &cg)?;
            Dataplane::open(&pins)?.set_cgroup_networks(cg.id()?, &[])?;
            if detached {
                println!("detached from {}", cg.absolute.display());
            } else {
                anyhow::bail!("svclb is not attached to {}", cg.absolute.display());
            }
        }
        Command::Attachments { json } => {
            let mut list = loader::attachments(&pins)?;
            if let Ok(dp) = Dataplane::open(&pins) {
                for a in &mut list {
                    if let Ok(cg) =
                        svclb::cgroup::CgroupPath::resolve(std::path::Path::new(&a.cgroup))
                    {
                        a.networks = dp.cgroup_networks(cg.id()?);
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for a in list {
                    let networks = if a.networks.is_empty() {
                        "-".to_string()
                    } else {
                        a.networks.join(",")
                    };
                    println!("/{}\t{}\t{}", a.cgroup, networks, a.programs.join(","));
                }
            }
        }
        Command::Teardown => {
            svclb::privileges::require_root()?;
            loader::teardown(&pins)?;
            println!("removed every svclb pin under {}", pins.root().display());
        }
    }
    Ok(())
}

/// The file's services plus one round of DNS for its discovered ones
/// (warnings about DNS go to stderr).
fn desired_now(
    config: &model::Config,
    snapshot: &svclb::dataplane::Snapshot,
) -> Result<model::DesiredState> {
    if config.discovered.is_empty() {
        return Ok(config.static_state());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let (desired, _) = runtime.block_on(sync::desired_now(config, snapshot))?;
    Ok(desired)
}

/// A whole listing, written at once; a closed pipe (`| head`) ends it
/// quietly.
fn print_all(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Leaves a large report to the process's exit: freeing a hundred thousand
/// services' allocations one by one took a tenth of a listing's time.
fn exiting<T>(report: T) {
    std::mem::forget(report);
}
