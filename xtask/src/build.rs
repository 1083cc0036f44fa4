//! `cargo xtask build`: the eBPF object first (the userspace crate embeds
//! it at compile time), then the host crates with rustup's cargo.

use anyhow::Result;

use crate::cmd::{self, host_cargo, workspace_root};
use crate::ebpf;

pub fn run(release: bool) -> Result<()> {
    ebpf::setup_and_build()?;
    host(release)
}

/// The host crates only; svclb-ebpf builds for the BPF target alone.
pub fn host(release: bool) -> Result<()> {
    let mut cargo = host_cargo();
    cargo
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--exclude", "svclb-ebpf"]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)
}
