//! svclb-ctl: the operator's tool. Reads the pinned maps directly, so it
//! works whether svclbd runs or not.

use anyhow::{Context, Result};
use clap::Parser;
use svclb::{
    config,
    ctl::{Args, AttachArgs, Command},
    dataplane::{Dataplane, Wanted},
    loader::{self, Capacities},
    model,
    pins::PinDir,
    reconcile, stats, sync,
};

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
                print_all(|out| stats::write_list(&report, out))?;
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
                print_all(|out| stats::write_stats(&report, exact, out))?;
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
                print_all(|out| stats::write_rate(&report, out))?;
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

/// A listing, written to stdout as it is formatted; a closed pipe
/// (`| head`) ends it quietly.
fn print_all(write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>) -> Result<()> {
    match write(&mut std::io::stdout().lock()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Leaves a large report to the process's exit: freeing a hundred thousand
/// services' allocations one by one took a tenth of a listing's time.
fn exiting<T>(report: T) {
    std::mem::forget(report);
}
