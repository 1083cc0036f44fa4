//! `cargo xtask bench`: install the tools (iptables, nftables, haproxy come
//! with setup's test tools), build release binaries, then run the sweep
//! (`svclb-bench`, in the bench/ crate) as root. See docs/BENCHMARKS.md.
//! `cargo xtask bench -- --only counting` measures the cost of packet
//! counting alone (about 13 minutes) and keeps the rest of docs/benchmarks.json.
//! `cargo xtask bench -- --only docker` measures the Docker source's
//! event-to-connects figures alone (`svclbd --docker` against a fake engine
//! with 1,000 and 10,000 services; under a minute, `--quick` about 20 s).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Result};

use crate::cmd::{self, host_target_dir, is_root, workspace_root};
use crate::{build, setup};

pub fn run(quick: bool, out: Option<PathBuf>, extra: &[String]) -> Result<ExitCode> {
    // Fail before a long build rather than after it.
    if !is_root() {
        bail!(
            "cargo xtask bench must run as root: the benchmark creates network namespaces \
             and cgroups, loads svclb's eBPF programs and installs iptables/nftables rules \
             and haproxy inside its own namespaces"
        );
    }
    setup::run(true)?;
    build::run(true)?;

    let bin_dir = host_target_dir().join("release");
    let mut bench = Command::new(bin_dir.join("svclb-bench"));
    bench
        .current_dir(workspace_root())
        .env("SVCLB_BIN_DIR", &bin_dir);
    if quick {
        bench.arg("--quick");
    }
    if let Some(out) = out {
        bench.arg("--out").arg(out);
    }
    bench.args(extra);
    cmd::header(&cmd::display(&bench));
    let status = cmd::status(&mut bench)?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
