//! The capabilities svclbd runs with. It needs a few for as long as it runs
//! (maps are written, cgroups attached and sockets ended at any time, not
//! only while loading), so it checks them at start, naming any that is
//! missing before anything is touched, and gives up every other one.
//!
//! Capabilities belong to threads, and threads inherit them: this runs
//! first in `main`, before any thread exists, so the whole process is
//! covered.

use anyhow::{bail, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// What svclbd needs, and why.
pub const NEEDED: &[(Capability, &str)] = &[
    (
        Capability::CAP_BPF,
        "bpf(): create, pin and update the maps, load the programs",
    ),
    (
        Capability::CAP_PERFMON,
        "load programs that read kernel memory through helpers",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "load and attach cgroup networking programs; end sockets (SOCK_DESTROY)",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "enter containers' network namespaces (setns); mount bpffs",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "open /proc/PID/ns/net of containers' processes",
    ),
];

/// Fails with a clear message when not root: svclb's pins and cgroup files
/// are root's.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("svclb must run as root (it loads eBPF programs, pins them in bpffs and attaches them to cgroups)");
    }
    Ok(())
}

/// Checks that svclbd is root and every capability in [`NEEDED`] is effective, then drops all
/// others from every set (bounding included) and forbids gaining new ones
/// through exec. `keep_also` are kept when present (binding a metrics port
/// below 1024 needs CAP_NET_BIND_SERVICE).
pub fn restrict_to_needed(keep_also: &[Capability]) -> Result<CapsHashSet> {
    require_root()?;
    let effective = caps::read(None, CapSet::Effective).context("reading capabilities")?;
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|(c, _)| !effective.contains(c))
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "svclbd lacks the capabilities it needs: {}. Run it as root with them (the systemd units in deploy/ list them)",
            missing.join("; ")
        );
    }
    let kept: CapsHashSet = NEEDED
        .iter()
        .map(|(c, _)| *c)
        .chain(keep_also.iter().copied().filter(|c| effective.contains(c)))
        .collect();
    // The bounding set shrinks only with CAP_SETPCAP; without it, no new
    // privileges (below) already stops an exec from gaining any back.
    if effective.contains(&Capability::CAP_SETPCAP) {
        for c in caps::all().difference(&kept) {
            caps::drop(None, CapSet::Bounding, *c)
                .with_context(|| format!("dropping {c} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &kept).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting permitted capabilities")?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_NO_NEW_PRIVS");
    }
    Ok(kept)
}
