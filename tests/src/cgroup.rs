//! cgroup v2 helpers: moving processes, removing directories (the mount is
//! found by svclb's [`cgroup2_mount`]).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::util::warn;

/// The cgroup2 mount point: svclb's own (`svclb::cgroup`), the one place it is found.
pub use svclb::cgroup::cgroup2_mount;

/// The calling process's cgroup v2 path relative to the hierarchy root (the `0::/path` line of /proc/self/cgroup).
pub fn current_cgroup_relative() -> Result<String> {
    let text =
        fs::read_to_string("/proc/self/cgroup").context("could not read /proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
        .context("/proc/self/cgroup has no cgroup v2 (`0::`) line")
}

/// The calling process's cgroup v2 directory (mount point joined with the `0::` path).
pub fn current_cgroup() -> Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let rel = current_cgroup_relative()?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Moves the process `pid` (all its threads) into the cgroup directory `dir`.
pub fn move_pid(dir: &Path, pid: u32) -> Result<()> {
    write_procs(dir, pid)
        .with_context(|| format!("could not move pid {pid} into cgroup {}", dir.display()))
}

fn write_procs(dir: &Path, pid: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    f.write_all(pid.to_string().as_bytes())
}

/// The pids listed in `dir/cgroup.procs`.
pub fn procs(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("cgroup.procs");
    let text =
        fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes the cgroup directory `dir` (and any child cgroups), first moving every process in it to `dest`.
pub fn remove_cgroup(dir: &Path, dest: &Path) -> Result<()> {
    let entries =
        fs::read_dir(dir).with_context(|| format!("could not list cgroup {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup(&entry.path(), dest)?;
        }
    }
    // Processes may fork while we evacuate, so repeat until the directory goes.
    let mut last_err = None;
    for _ in 0..100 {
        for pid in procs(dir).unwrap_or_default() {
            if let Err(e) = write_procs(dest, pid) {
                // ESRCH: it exited meanwhile.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    warn(format_args!(
                        "could not move pid {pid} out of {} to {}: {e}",
                        dir.display(),
                        dest.display()
                    ));
                }
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last_err = Some(e);
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("could not remove cgroup {}", dir.display()))
            }
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)))
        .with_context(|| format!("cgroup {} stayed busy", dir.display()))
}

/// Puts the process back into the cgroup it was in before [`crate::Sandbox::enter_cgroup`] when dropped.
#[must_use = "the process leaves the cgroup again when the guard is dropped"]
#[derive(Debug)]
pub struct CgroupGuard {
    previous: PathBuf,
    entered: PathBuf,
}

impl CgroupGuard {
    /// Moves the whole calling process into `dir`, remembering where it was.
    pub fn enter(dir: &Path) -> Result<CgroupGuard> {
        let previous = current_cgroup()?;
        move_pid(dir, std::process::id())?;
        Ok(CgroupGuard {
            previous,
            entered: dir.to_path_buf(),
        })
    }

    /// The cgroup the process was in before and returns to on drop.
    pub fn previous(&self) -> &Path {
        &self.previous
    }

    /// The cgroup the process was moved into.
    pub fn entered(&self) -> &Path {
        &self.entered
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = write_procs(&self.previous, std::process::id()) {
            warn(format_args!(
                "could not move this process back to cgroup {}: {e}",
                self.previous.display()
            ));
        }
    }
}
