//! Helpers shared by the subcommands: paths, privilege checks and running
//! child processes with errors that name the command.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};

/// The workspace root: xtask lives one directory below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Where the host crates' artifacts go (honours CARGO_TARGET_DIR like cargo does).
pub fn host_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Fails at once when the filesystem holding the target directory has less
/// room than a build needs (`need` bytes into an empty target directory,
/// 1 GiB once something is built there): a full disk otherwise shows up
/// minutes later as a linker's "IO failure" in the middle of a build.
pub fn require_room(what: &str, need: u64) -> Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    let target = host_target_dir();
    let built_before = target.join("debug/deps").exists();
    let need = if built_before { 1 << 30 } else { need };
    let Some(free) = free_bytes(&target) else {
        return Ok(()); // no df: the build will say
    };
    if free < need {
        bail!(
            "{what} needs about {:.1} GiB free for {}, and its filesystem has {:.1} GiB: free some space first",
            need as f64 / GIB,
            target.display(),
            free as f64 / GIB
        );
    }
    Ok(())
}

/// The bytes `df` reports available (reserved blocks left out) on the
/// filesystem of `path`, or of its nearest existing ancestor.
fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(existing)
        .output()
        .ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// `$CARGO_HOME`, defaulting to `~/.cargo` as rustup does.
pub fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// The rustup cargo proxy. It is used explicitly (not whatever `cargo` is on
/// PATH) because Debian's /usr/bin/cargo is installed too and must only build
/// the eBPF crate; the proxy also dispatches `cargo fmt` and `cargo clippy`.
pub fn host_cargo() -> Command {
    let proxy = cargo_home().join("bin/cargo");
    if proxy.exists() {
        Command::new(proxy)
    } else {
        Command::new("cargo")
    }
}

/// Effective uid from /proc (avoids a libc dependency for one call).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A shell-like rendering of a command, including the env it sets, for
/// headers and error messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            // CARGO_ENCODED_RUSTFLAGS separates args with 0x1f; show them as spaces.
            let value = value.to_string_lossy().replace('\x1f', " ");
            let key = key.to_string_lossy();
            // A prepended PATH is shown as `dir:$PATH` rather than in full.
            let inherited = std::env::var("PATH").unwrap_or_default();
            match value.strip_suffix(&format!(":{inherited}")) {
                Some(prefix) if key == "PATH" && !inherited.is_empty() => {
                    parts.push(format!("PATH={}:$PATH", quote(prefix)))
                }
                _ => parts.push(format!("{key}={}", quote(&value))),
            }
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Prints a step header.
pub fn header(text: &str) {
    println!("==> {text}");
}

/// Runs a command with inherited stdio, printing a header first; fails if it
/// cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    header(&display(cmd));
    let status = status(cmd)?;
    check(cmd, status)
}

/// Runs a command without a header and returns its status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not run `{}`", display(cmd)))
}

/// Turns a non-zero exit into an error naming the command.
pub fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it cannot start or fails.
pub fn output_if_ok<S: AsRef<OsStr>>(program: S, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
