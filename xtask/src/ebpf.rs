//! `cargo xtask build-ebpf`: the BPF object, built with Debian's rustc.
//!
//! rustup's toolchains have no BPF `core` (and no rust-src for build-std);
//! Debian's rustc-web ships one prebuilt, so the eBPF crate is built by
//! /usr/bin/cargo + /usr/bin/rustc into its own target dir, apart from the
//! host crates that rustup's cargo builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::cmd::{self, cargo_home, workspace_root};
use crate::setup;

pub const TARGET: &str = "bpfel-unknown-none";
/// The eBPF crate's binary name, hence the object's file name.
const BIN: &str = "svclb";
/// Debian's compiler (package rustc-web) and the cargo of the same release
/// (package cargo-web): rustc-web does not bring a cargo of its own.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Read by the userspace build.rs instead of the default path when set.
const OBJECT_ENV: &str = "SVCLB_EBPF_OBJECT";

/// Separate from the host target dir: another compiler, another target.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target/ebpf")
}

/// The one place that says where the object lands. svclb-userspace's
/// build.rs reads the same path (target/ebpf/bpfel-unknown-none/release/svclb).
pub fn object_path() -> PathBuf {
    target_dir().join(TARGET).join("release").join(BIN)
}

/// `cargo xtask build-ebpf`: the build part of setup, then the build.
pub fn setup_and_build() -> Result<()> {
    setup::run(false)?;
    build()
}

pub fn build() -> Result<()> {
    for (tool, package) in [(DEBIAN_CARGO, "cargo-web"), (DEBIAN_RUSTC, "rustc-web")] {
        if !Path::new(tool).is_file() {
            bail!("{tool} is missing: the eBPF build needs Debian's `{package}`; run `cargo xtask setup` as root");
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cargo = Command::new(DEBIAN_CARGO);
    cargo
        .current_dir(workspace_root())
        .args(["build", "-p", "svclb-ebpf", "--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir())
        // bpf-linker is in $CARGO_HOME/bin.
        .env(
            "PATH",
            format!("{}:{path}", cargo_home().join("bin").display()),
        )
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf needs #![feature(asm_experimental_arch)] on a stable rustc.
        .env("RUSTC_BOOTSTRAP", "1")
        // Same flags as aya-build: the arch cfg selects aya-ebpf's pt_regs
        // layout, and BTF is needed for the BTF-defined maps.
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags().join("\x1f"));
    // The host's wrappers and flags are for rustup's rustc, not this one.
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_RUSTC_WRAPPER",
    ] {
        cargo.env_remove(var);
    }
    cmd::run(&mut cargo)?;
    let object = object_path();
    if !object.is_file() {
        bail!(
            "`{}` succeeded but {} does not exist",
            cmd::display(&cargo),
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    warn_object_override();
    Ok(())
}

fn rustflags() -> Vec<String> {
    vec![
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
}

/// An override in the environment would make the host build embed some
/// other object than the one just built; say so rather than surprise.
pub fn warn_object_override() {
    if let Some(other) = std::env::var_os(OBJECT_ENV) {
        if Path::new(&other) != object_path() {
            println!(
                "note: {OBJECT_ENV}={} is set; the userspace build embeds that object instead",
                other.to_string_lossy()
            );
        }
    }
}
