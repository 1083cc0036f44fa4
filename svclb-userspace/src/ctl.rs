//! svclb-ctl's command line: its arguments, parsed by clap. Here rather
//! than in the binary so that the fuzz target parses with the very same
//! definitions (`Args::try_parse_from`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::cgroup::CgroupPath;
use crate::target::{self, Target};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Inspect and steer svclb's data plane (ipvsadm-compatible listings)"
)]
/// svclb-ctl's arguments.
pub struct Args {
    /// Where svclbd pinned the maps and links.
    #[arg(long, global = true, default_value = crate::DEFAULT_PIN_DIR, value_name = "DIR")]
    pub pin_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
/// What svclb-ctl does.
pub enum Command {
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
/// `attach`: where, and on which networks.
pub struct AttachArgs {
    #[command(flatten)]
    pub target: TargetArg,
    /// A network this cgroup's processes are on (repeatable): they see the
    /// services limited to it. Without any, they see only unlimited services.
    #[arg(long = "network", value_name = "NAME")]
    pub networks: Vec<String>,
}

/// What to attach to or detach from.
#[derive(ClapArgs, Debug)]
pub struct TargetArg {
    #[command(flatten)]
    pub which: Which,
    /// The Docker engine, for --container: unix://PATH.
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,
}

/// Exactly one of --cgroup, --pid, --container.
#[derive(ClapArgs, Debug)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// A cgroup v2 directory (absolute, or relative to the cgroup2 mount).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The cgroup of this process.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// The cgroup of this Docker container's process (ID or name), asked of the engine.
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
}

impl TargetArg {
    /// The cgroup this names (a container's is asked of the engine).
    pub fn resolve(&self) -> Result<CgroupPath> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definitions_are_consistent() {
        Args::command().debug_assert();
    }
}
