//! Faults around svclbd, found and mended while it runs: a pin removed by
//! hand (a map's: pinned again from svclbd's own descriptor; a link's: the
//! cgroup attached again; a cgroup's whole link directory removed is
//! `svclb-ctl detach`, which svclbd leaves alone), bpffs gone from under the pin directory
//! (mounted again, everything pinned again), an attached cgroup removed
//! (its links released; attached again if the path comes back), and
//! changes that could not be applied. Each is logged and counted in
//! `svclb_faults_total{kind}`.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tracing::{info, warn};

use crate::{cgroup::CgroupPath, loader::Loaded, pins::PinDir};

/// How often svclbd looks (a few stat calls each time).
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The kinds of fault counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A change (config, DNS answers, Docker's view) that did not validate
    /// or could not be written: refused whole, the maps keep the last state.
    ApplyFailed,
    /// A map's pin was gone.
    MapPinMissing,
    /// A link's pin was gone (its program detached by the kernel).
    LinkPinMissing,
    /// An attached cgroup was removed.
    CgroupRemoved,
}

const KINDS: [(Fault, &str); 4] = [
    (Fault::ApplyFailed, "apply_failed"),
    (Fault::MapPinMissing, "map_pin_missing"),
    (Fault::LinkPinMissing, "link_pin_missing"),
    (Fault::CgroupRemoved, "cgroup_removed"),
];

static COUNTS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

pub fn count(fault: Fault) {
    if let Some(i) = KINDS.iter().position(|(f, _)| *f == fault) {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// `svclb_faults_total` in Prometheus's text format.
pub fn render() -> String {
    let mut out = String::from(
        "# HELP svclb_faults_total Faults svclbd found and mended or refused, by kind.\n\
         # TYPE svclb_faults_total counter\n",
    );
    for (i, (_, name)) in KINDS.iter().enumerate() {
        out.push_str(&format!(
            "svclb_faults_total{{kind=\"{name}\"}} {}\n",
            COUNTS[i].load(Ordering::Relaxed)
        ));
    }
    out
}

/// A cgroup svclbd attached to, by path, and the cgroup id it had then
/// (None while the path is gone).
pub struct Attached {
    pub cgroup: CgroupPath,
    id: Option<u64>,
}

impl Attached {
    pub fn new(cgroup: CgroupPath) -> Result<Self> {
        let id = Some(cgroup.id()?);
        Ok(Attached { cgroup, id })
    }
}

/// Checks the pins and the attached cgroups once, mending what it can.
/// Returns the cgroups attached again under a new id: their scope must be
/// written again.
pub fn check(
    pins: &PinDir,
    loaded: &mut Loaded,
    attached: &mut [Attached],
) -> Vec<(CgroupPath, u64)> {
    let mut reattached = Vec::new();
    if !pins.is_on_bpffs() {
        warn!(pin_dir = %pins.root().display(), "the pin directory is no longer on bpffs: mounting and pinning again");
        if let Err(e) = pins.prepare() {
            warn!("mending the pin directory failed: {e:#}");
            return reattached;
        }
    }
    match loaded.repin_missing_maps() {
        Ok(names) => {
            for name in names {
                count(Fault::MapPinMissing);
                warn!(map = name, "a map's pin was removed: pinned again");
            }
        }
        Err(e) => warn!("pinning a map again failed: {e:#}"),
    }
    for a in attached.iter_mut() {
        let now = a.cgroup.id().ok();
        match (a.id, now) {
            (Some(_), None) => {
                count(Fault::CgroupRemoved);
                warn!(cgroup = %a.cgroup.absolute.display(), "an attached cgroup was removed: its links are released; attached again if it comes back");
                if let Err(e) = crate::loader::detach(pins, &a.cgroup) {
                    warn!("releasing its links: {e:#}");
                }
                a.id = None;
            }
            (old, Some(id)) if old != Some(id) => {
                // Back (or removed and made again between two checks).
                match loaded.attach(&a.cgroup) {
                    Ok(()) => {
                        info!(cgroup = %a.cgroup.absolute.display(), "the cgroup exists again: attached");
                        a.id = Some(id);
                        reattached.push((a.cgroup.clone(), id));
                    }
                    Err(e) => warn!("attaching again: {e:#}"),
                }
            }
            (Some(_), Some(_)) if loaded.link_pin_missing(&a.cgroup) => {
                count(Fault::LinkPinMissing);
                warn!(cgroup = %a.cgroup.absolute.display(), "a link's pin was removed (its program detached): attaching again");
                if let Err(e) = loaded.attach(&a.cgroup) {
                    warn!("attaching again: {e:#}");
                }
            }
            _ => {}
        }
    }
    reattached
}
