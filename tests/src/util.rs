//! Small helpers: running commands with useful errors, finding `ip`, logging.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `cmd` to completion and returns its stdout; errors name the command line, status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The program and arguments of `cmd` joined by spaces, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `Command` for iproute2's `ip`: /usr/sbin/ip or /sbin/ip when present, else `ip` from PATH.
pub fn ip_command() -> Command {
    for candidate in ["/usr/sbin/ip", "/sbin/ip"] {
        if Path::new(candidate).exists() {
            return Command::new(candidate);
        }
    }
    Command::new("ip")
}

/// Writes a warning line to stderr; never panics (usable from `Drop`).
pub(crate) fn warn(args: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "svclb-tests: {args}");
}

/// Fails with a clear message unless the effective user is root.
/// A field of `/proc/PID/status` (`VmRSS`, `CapEff`, ...), as written there.
pub fn proc_status(pid: u32, field: &str) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the svclb sandbox needs root (effective uid is {euid}): it creates network \
             namespaces and cgroups; run the privileged tests as root, e.g. \
             `sudo -E cargo test -p svclb-tests -- --test-threads=1`"
        );
    }
    Ok(())
}
