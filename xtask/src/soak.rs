//! `cargo xtask soak`: the long soak (tests/tests/soak.rs with a million
//! connects by default), as root; its figures go to docs/SOAK.md.

use std::fs;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, host_cargo, host_target_dir, is_root, workspace_root};
use crate::{build, ebpf, setup};

pub fn run(connects: u64) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask soak must run as root: it loads eBPF programs and creates network namespaces");
    }
    setup::run(true)?;
    ebpf::build()?;
    build::host(false)?;
    let root = workspace_root();
    let report = host_target_dir().join("xtask").join("soak.txt");
    fs::create_dir_all(report.parent().unwrap())?;
    let _ = fs::remove_file(&report);
    cmd::header(&format!("soak: {connects} connects"));
    let mut soak = host_cargo();
    soak.current_dir(&root)
        .args([
            "test",
            "-p",
            "svclb-tests",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .env("SVCLB_BIN_DIR", host_target_dir().join("debug"))
        .env("SVCLB_SOAK_CONNECTS", connects.to_string())
        .env("SVCLB_SOAK_REPORT", &report);
    cmd::run(&mut soak)?;
    let figures = fs::read_to_string(&report).context("the soak wrote no report")?;
    let commit = cmd::output_if_ok(
        "git",
        &["-C", root.to_str().unwrap(), "rev-parse", "--short", "HEAD"],
    )
    .unwrap_or_default();
    let date = cmd::output_if_ok("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let doc = format!(
        "# Soak\n\n`cargo xtask soak` (tests/tests/soak.rs; `cargo xtask test` runs it with 20,000 connects): \
         TCP connects through a VIP from several client threads, plus a connected UDP socket every 20th, \
         while svclbd (debug build, file source, SIGHUP) changes the backend set every 100 ms. \
         It fails on any failed connect, any connect that reached a backend outside the set in the maps \
         while it connected, any difference between Conns and the connects each weighted backend answered, \
         and svclbd's RSS or file descriptors growing past the stated bound after warm-up.\n\n\
         Last run: {date}, svclb {commit}, this project's machine kind (2 vCPUs):\n\n{figures}"
    );
    let out = root.join("docs").join("SOAK.md");
    fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
    println!("{figures}wrote {}", out.display());
    Ok(())
}
