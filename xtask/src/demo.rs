//! `cargo xtask demo`: build, then run a demo binary from svclb-tests:
//! svclb-swarm-demo (a real private Docker Swarm, `svclbd --docker`), or
//! with `--sandbox` svclb-demo (network namespaces and a config file).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use anyhow::{bail, Result};

use crate::cmd::{self, host_target_dir, is_root, workspace_root};
use crate::{build, ebpf, setup};

/// What the demo builds into an empty target directory (the debug
/// workspace and the eBPF object: 1.4 GB measured), with a margin.
const ROOM_NEEDED: u64 = 3 << 30;

pub fn run(sandbox: bool) -> Result<ExitCode> {
    // Fail before a long build rather than after it.
    if !is_root() {
        bail!(
            "cargo xtask demo must run as root: the demo loads eBPF programs, \
             attaches them to cgroups and creates network namespaces"
        );
    }
    cmd::require_room("cargo xtask demo", ROOM_NEEDED)?;
    setup::run(false)?;
    if !sandbox {
        setup::swarm()?;
    }
    ebpf::build()?;
    build::host(false)?;

    let bin_dir = host_target_dir().join("debug");
    let name = if sandbox {
        "svclb-demo"
    } else {
        "svclb-swarm-demo"
    };
    let mut demo = Command::new(bin_dir.join(name));
    demo.current_dir(workspace_root())
        .env("SVCLB_BIN_DIR", &bin_dir);
    cmd::header(&cmd::display(&demo));
    let status = cmd::status(&mut demo)?;
    // Propagate the demo's status; a signal becomes 128+N like in a shell.
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
