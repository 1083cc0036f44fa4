//! What svclb attaches to: a cgroup v2 directory, named directly, through
//! a process in it, or through a Docker container's main process.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cgroup::CgroupPath;
use crate::docker;

/// An attachment target as the command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Absolute, or relative to the cgroup2 mount.
    Cgroup(PathBuf),
    /// The cgroup of a process (its `0::` line in /proc/PID/cgroup).
    Pid(u32),
    /// The cgroup of a container's main process, asked of the Docker engine.
    Container(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cgroup(p) => write!(f, "cgroup {}", p.display()),
            Target::Pid(pid) => write!(f, "process {pid}"),
            Target::Container(id) => write!(f, "container {id}"),
        }
    }
}

impl Target {
    /// The cgroup to attach to. `docker` is used for containers only.
    pub async fn resolve(&self, docker: Option<&bollard::Docker>) -> Result<CgroupPath> {
        match self {
            Target::Cgroup(path) => CgroupPath::resolve(path),
            Target::Pid(pid) => CgroupPath::of_pid(*pid),
            Target::Container(id) => {
                let docker = docker.context("no Docker engine to ask")?;
                let pid = docker::container_pid(docker, id).await?;
                CgroupPath::of_pid(pid)
                    .with_context(|| format!("container {id} runs as process {pid}"))
            }
        }
    }
}

/// Targets from the repeatable `--cgroup`, `--pid` and `--container`.
pub fn targets(cgroups: &[PathBuf], pids: &[u32], containers: &[String]) -> Vec<Target> {
    cgroups
        .iter()
        .cloned()
        .map(Target::Cgroup)
        .chain(pids.iter().copied().map(Target::Pid))
        .chain(containers.iter().cloned().map(Target::Container))
        .collect()
}

/// Resolves every target; the first failure names its target.
pub async fn resolve_all(targets: &[Target], docker_host: Option<&str>) -> Result<Vec<CgroupPath>> {
    let needs_docker = targets.iter().any(|t| matches!(t, Target::Container(_)));
    let docker = if needs_docker {
        let d = docker::client(docker_host)?;
        docker::negotiate(&d).await?;
        Some(d)
    } else {
        None
    };
    let mut out = Vec::new();
    for t in targets {
        out.push(
            t.resolve(docker.as_ref())
                .await
                .with_context(|| format!("finding the cgroup of {t}"))?,
        );
    }
    Ok(out)
}
