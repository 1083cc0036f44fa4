//! svclbd: loads svclb's programs, pins them, attaches them to cgroups and
//! keeps the maps equal to the desired state.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use svclb::{
    cgroup::CgroupPath,
    config,
    dataplane::Dataplane,
    loader::{self, Capacities},
    notify,
    pins::PinDir,
    reconcile,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "svclb daemon: socket-level load balancing for Docker Swarm services, in eBPF"
)]
struct Args {
    /// Services to apply (TOML); re-read on SIGHUP.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// cgroup v2 directory to attach to (absolute, or relative to the cgroup2 mount); repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<PathBuf>,
    /// Where maps and links are pinned (on bpffs).
    #[arg(long, default_value = svclb::DEFAULT_PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    /// Capacity of the service maps, when they are created.
    #[arg(long, default_value_t = svclb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backend and stats maps, when they are created.
    #[arg(long, default_value_t = svclb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "SVCLB_LOG", default_value = "info")]
    log: String,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        error!("{e:#}");
        eprintln!("svclbd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // Validate everything before touching the kernel.
    let desired = match &args.config {
        Some(path) => config::load_file(path)?,
        None => config::DesiredState::default(),
    };
    let cgroups = args
        .cgroups
        .iter()
        .map(|c| CgroupPath::resolve(c))
        .collect::<Result<Vec<_>>>()?;

    let pins = PinDir::new(&args.pin_dir);
    let mut loaded = loader::load(
        &pins,
        Capacities {
            max_services: args.max_services,
            max_backends: args.max_backends,
        },
    )?;
    let mut dp = Dataplane::open(&pins)?;
    apply(&mut dp, &desired, "startup")?;
    for cg in &cgroups {
        loaded.attach(cg)?;
        info!(cgroup = %cg.absolute.display(), "attached");
    }
    info!(pin_dir = %pins.root().display(), services = desired.services.len(), "ready");
    notify::notify("READY=1").context("notifying readiness")?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let Some(path) = &args.config else {
                    warn!("SIGHUP: no --config to reload");
                    continue;
                };
                match config::load_file(path) {
                    Ok(desired) => {
                        if let Err(e) = apply(&mut dp, &desired, "reload") {
                            error!("reload failed, the maps keep the previous state: {e:#}");
                        }
                    }
                    Err(e) => error!("reload refused, nothing changed: {e}"),
                }
            }
        }
    }
    // The pinned links and maps stay: balancing goes on while svclbd is down.
    info!(
        "exiting; the data plane stays pinned at {}",
        pins.root().display()
    );
    Ok(())
}

fn apply(dp: &mut Dataplane, desired: &config::DesiredState, why: &str) -> Result<()> {
    let plan = reconcile::apply(dp, desired)?;
    for change in &plan.changes {
        info!(%change, "{why}");
    }
    for (name, mark) in &plan.marks {
        tracing::debug!(service = %name, mark, "mark assigned");
    }
    Ok(())
}
