//! `cargo xtask setup`: Debian packages, bpf-linker and the rustup tools.
//! Idempotent: everything is checked first and only what is missing is
//! installed, so CI can run it on every job.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, cargo_home, header, host_cargo, is_root, output_if_ok};

/// Debian's rustc 1.96 with a prebuilt `core` for the BPF targets, the cargo
/// of the same release that drives it (`rustc-web` ships /usr/bin/rustc only;
/// /usr/bin/cargo is `cargo-web`), and the LLVM 22 that bpf-linker is built
/// against (docs/TOOLCHAIN.md).
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
];

/// The tools the integration tests drive.
const TEST_PACKAGES: &[&str] = &[
    "dnsmasq",
    "bind9-dnsutils",
    "prometheus",
    "iptables",
    "nftables",
    "haproxy",
    // The fuzz targets (cargo xtask fuzz, and briefly in cargo xtask test):
    // libfuzzer-sys compiles libFuzzer with the C++ compiler.
    "g++",
    // The real-Swarm tests and the demo start a private engine (tests/src/swarm.rs)
    // and build their image from busybox with `docker import`: no registry needed.
    "busybox-static",
];

/// Debian's Docker engine (20.10, with containerd and runc), unless an engine
/// is installed already: docker.io conflicts with Docker's own packages, and
/// the tests only need `dockerd` and a client.
const DOCKER_PACKAGE: &str = "docker.io";

/// Packages whose install starts (and enables) a system daemon. The tests
/// run their own instances on their own addresses and sockets, so the system
/// ones must not run: (package, its systemd units, daemon executable names).
/// Daemons that ran before the install are left alone.
const SERVICES: &[(&str, &[&str], &[&str])] = &[
    ("dnsmasq", &["dnsmasq"], &["dnsmasq"]),
    ("prometheus", &["prometheus"], &["prometheus"]),
    ("haproxy", &["haproxy"], &["haproxy"]),
    (
        "docker.io",
        &["docker.socket", "docker", "containerd"],
        &["dockerd", "containerd"],
    ),
    ("containerd", &["containerd"], &["containerd"]),
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_MARKER: &str = "# written by cargo xtask setup";

/// Everything needed to build; with `test_tools`, also to run the tests.
pub fn run(test_tools: bool) -> Result<()> {
    header(if test_tools {
        "setup"
    } else {
        "setup (build only)"
    });
    let mut packages = BUILD_PACKAGES.to_vec();
    if test_tools {
        packages.extend_from_slice(TEST_PACKAGES);
        if docker_installed() {
            println!("docker: an engine is installed already (dockerd and containerd on PATH); not installing {DOCKER_PACKAGE}");
        } else {
            packages.push(DOCKER_PACKAGE);
        }
    }
    apt(&packages)?;
    bpf_linker()?;
    if test_tools {
        rust_tools()?;
    }
    Ok(())
}

/// What the Swarm demo needs: an engine and busybox for its image.
pub fn swarm() -> Result<()> {
    let mut packages = vec!["busybox-static"];
    if docker_installed() {
        println!("docker: an engine is installed already (dockerd and containerd on PATH)");
    } else {
        packages.push(DOCKER_PACKAGE);
    }
    apt(&packages)
}

fn apt(packages: &[&str]) -> Result<()> {
    let (present, missing): (Vec<&str>, Vec<&str>) =
        packages.iter().partition(|p| dpkg_installed(p));
    if !present.is_empty() {
        println!("apt: present: {}", present.join(", "));
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root to install them",
            missing.join(", ")
        );
    }
    println!("apt: installing {}", missing.join(", "));

    let before = daemon_pids();
    {
        // Keeps package scripts from starting services until dropped.
        let _policy = PolicyRcD::install()?;
        let mut update = Command::new("apt-get");
        update
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(&mut update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(&mut install)?;
    }
    let still_missing: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still_missing.is_empty() {
        bail!("apt-get install finished but these are still not installed: {still_missing:?}");
    }
    let new_services: Vec<&str> = SERVICES
        .iter()
        .filter(|(package, _, _)| missing.contains(package))
        .flat_map(|(_, units, _)| units.iter().copied())
        .collect();
    stop_services(&new_services, &before)
}

/// Whether a Docker engine (whoever installed it) is on this machine.
fn docker_installed() -> bool {
    ["dockerd", "containerd", "runc"]
        .iter()
        .all(|bin| output_if_ok("sh", &["-c", &format!("command -v {bin}")]).is_some())
}

/// `dpkg-query` prints one status per installed architecture, hence the lines.
fn dpkg_installed(package: &str) -> bool {
    output_if_ok("dpkg-query", &["-W", "-f=${Status}\n", package])
        .is_some_and(|s| s.lines().any(|l| l.trim() == "install ok installed"))
}

/// A temporary /usr/sbin/policy-rc.d that answers 101 ("action forbidden"),
/// which invoke-rc.d and deb-systemd-invoke honour, so package installs do not
/// start their daemons. An existing one that is not ours is left alone.
struct PolicyRcD {
    created: bool,
}

impl PolicyRcD {
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if let Ok(existing) = fs::read_to_string(path) {
            // A marker from an interrupted earlier run means it is ours to remove.
            let ours = existing.contains(POLICY_MARKER);
            if !ours {
                println!("apt: keeping the existing {POLICY_RC_D}");
            }
            return Ok(Self { created: ours });
        }
        fs::write(
            path,
            format!(
                "#!/bin/sh\n{POLICY_MARKER}: no service starts during apt-get install\nexit 101\n"
            ),
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {POLICY_RC_D}"))?;
        println!("apt: temporary {POLICY_RC_D} (exit 101) so the installs start no services");
        Ok(Self { created: true })
    }
}

impl Drop for PolicyRcD {
    fn drop(&mut self) {
        if self.created {
            match fs::remove_file(POLICY_RC_D) {
                Ok(()) => println!("apt: removed the temporary {POLICY_RC_D}"),
                Err(e) => eprintln!("apt: warning: could not remove {POLICY_RC_D}: {e}"),
            }
        }
    }
}

/// PIDs of running daemons that [`SERVICES`] names, by executable name.
fn daemon_pids() -> BTreeSet<(u32, String)> {
    let mut pids = BTreeSet::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(exe) = fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let name = exe
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
            .unwrap_or_default();
        if SERVICES
            .iter()
            .any(|(_, _, daemons)| daemons.contains(&name.as_str()))
        {
            pids.insert((pid, name));
        }
    }
    pids
}

/// Makes sure freshly installed services neither run now nor start at boot.
fn stop_services(units: &[&str], before: &BTreeSet<(u32, String)>) -> Result<()> {
    if units.is_empty() {
        return Ok(());
    }
    let systemd_running = Path::new("/run/systemd/system").is_dir();
    let mut disable = Command::new("systemctl");
    disable.arg("disable");
    if systemd_running {
        disable.arg("--now");
    }
    disable.args(units);
    if systemd_running {
        println!(
            "services: the tests start their own {}; disabling the system services",
            units.join(", ")
        );
        cmd::run(&mut disable)?;
    } else {
        // Without systemd this only removes the boot-time symlinks; failure is harmless.
        let ok = disable.output().is_ok_and(|o| o.status.success());
        println!(
            "services: systemd is not running; `{}` {}",
            cmd::display(&disable),
            if ok { "done" } else { "failed (ignored)" }
        );
    }
    // Whatever the install started anyway (e.g. no policy-rc.d took effect).
    let started: Vec<(u32, String)> = daemon_pids().difference(before).cloned().collect();
    if started.is_empty() {
        println!("services: {} not running", units.join(", "));
    }
    for (pid, name) in started {
        let mut kill = Command::new("kill");
        kill.arg(pid.to_string());
        match cmd::status(&mut kill) {
            Ok(s) if s.success() => {
                println!("services: stopped {name} (pid {pid}) started by its package install")
            }
            _ => eprintln!("services: warning: could not stop {name} (pid {pid})"),
        }
    }
    Ok(())
}

/// bpf-linker links the BPF object; it must match Debian's LLVM 22.
fn bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    let found = output_if_ok(&bin, &["--version"]).map(|s| s.trim().to_string());
    match &found {
        Some(v) if *v == want => {
            println!("{want}: present");
            return Ok(());
        }
        Some(v) => println!("bpf-linker: found `{v}`, installing {BPF_LINKER_VERSION}"),
        None => println!(
            "bpf-linker: not at {}, installing {BPF_LINKER_VERSION} (takes a few minutes)",
            bin.display()
        ),
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let mut install = host_cargo();
    install
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args(["--locked", "--no-default-features", "--features", "llvm-22"])
        // --force: only reached when the binary is absent or wrong, even if
        // cargo's install records claim otherwise. --root pins $CARGO_HOME/bin.
        .arg("--force")
        .arg("--root")
        .arg(cargo_home())
        .env("PATH", format!("{LLVM_PREFIX}/bin:{path}"))
        .env("LLVM_PREFIX", LLVM_PREFIX);
    cmd::run(&mut install)?;
    match output_if_ok(&bin, &["--version"]) {
        Some(v) if v.trim() == want => {
            println!("{want}: installed");
            Ok(())
        }
        other => bail!(
            "after installing, `{} --version` says {other:?}, expected {want:?}",
            bin.display()
        ),
    }
}

/// fmt and clippy come from rustup components; CI runs both.
fn rust_tools() -> Result<()> {
    for (sub, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let mut check = host_cargo();
        check.args([sub, "--version"]);
        match check.output() {
            Ok(out) if out.status.success() => println!(
                "cargo {sub}: present ({})",
                String::from_utf8_lossy(&out.stdout).trim()
            ),
            _ => bail!(
                "`{}` failed: install it with `rustup component add {component}`",
                cmd::display(&check)
            ),
        }
    }
    Ok(())
}
