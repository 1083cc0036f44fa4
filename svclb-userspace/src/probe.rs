//! What svclb needs of the kernel, probed before anything is loaded: a
//! kernel without one of them gets its name and the Linux version that
//! brought it, instead of a verifier dump half-way through a load.

use anyhow::{bail, Result};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

/// One thing svclb uses, how to see that the kernel has it, and the Linux
/// version that brought it.
pub struct Feature {
    pub what: &'static str,
    pub since: &'static str,
    probe: Probe,
}

enum Probe {
    Cgroup2,
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
}

const fn feature(what: &'static str, since: &'static str, probe: Probe) -> Feature {
    Feature { what, since, probe }
}

/// Everything the programs and svclbd use. The newest, bpf_set_retval,
/// makes Linux 5.18 the oldest kernel svclb runs on.
pub const FEATURES: &[Feature] = &[
    feature(
        "cgroup v2 (the unified hierarchy) mounted",
        "4.5",
        Probe::Cgroup2,
    ),
    feature(
        "cgroup socket-address programs (connect, sendmsg, recvmsg, getpeername hooks)",
        "4.17",
        Probe::Program(ProgramType::CgroupSockAddr),
    ),
    feature(
        "sock_ops programs (TCP state changes)",
        "4.13",
        Probe::Program(ProgramType::SockOps),
    ),
    feature(
        "cgroup socket programs (sock_release)",
        "4.10",
        Probe::Program(ProgramType::CgroupSock),
    ),
    feature(
        "cgroup_skb programs (packet counters)",
        "4.10",
        Probe::Program(ProgramType::CgroupSkb),
    ),
    feature(
        "socket-local storage maps (BPF_MAP_TYPE_SK_STORAGE)",
        "5.2",
        Probe::Map(MapType::SkStorage),
    ),
    feature("LRU hash maps", "4.10", Probe::Map(MapType::LruHash)),
    feature(
        "per-CPU array maps",
        "4.6",
        Probe::Map(MapType::PerCpuArray),
    ),
    feature(
        "ring buffer maps (the programs' log)",
        "5.8",
        Probe::Map(MapType::RingBuf),
    ),
    feature(
        "bpf_set_retval from cgroup programs (ECONNREFUSED for a VIP without backends)",
        "5.18",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval),
    ),
    feature(
        "bpf_get_netns_cookie from socket-address programs (sh/mh, affinity)",
        "5.7",
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    ),
    feature(
        "bpf_get_current_ancestor_cgroup_id (network scoping)",
        "5.7",
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    ),
    feature(
        "bpf_sk_storage_get from socket-address programs",
        "5.18",
        Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_storage_get,
        ),
    ),
    feature(
        "bpf_sk_storage_get from sock_ops programs",
        "5.3",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
];

impl Feature {
    fn present(&self) -> bool {
        match &self.probe {
            Probe::Cgroup2 => crate::cgroup::cgroup2_mount().is_ok(),
            Probe::Program(t) => is_program_supported(*t).unwrap_or(false),
            Probe::Map(t) => is_map_supported(*t).unwrap_or(false),
            Probe::Helper(t, h) => is_helper_supported(*t, *h).unwrap_or(false),
        }
    }
}

/// Fails naming every feature in `features` the kernel lacks (all of them
/// at once, so one upgrade fixes them).
pub fn require(features: &[Feature]) -> Result<()> {
    let missing: Vec<&Feature> = features
        .iter()
        .filter(|f| pretended_missing(f) || !f.present())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "this kernel ({}) lacks what svclb needs: {}. svclb runs on Linux 5.18 or newer",
        kernel_release(),
        missing
            .iter()
            .map(|f| format!("{} (Linux {})", f.what, f.since))
            .collect::<Vec<_>>()
            .join("; ")
    )
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "release unknown".into())
}

/// `SVCLB_PRETEND_MISSING=<text>`: a test's way to see the refusal on a
/// kernel that has everything (features whose name contains the text).
fn pretended_missing(f: &Feature) -> bool {
    std::env::var("SVCLB_PRETEND_MISSING").is_ok_and(|t| !t.is_empty() && f.what.contains(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_its_kernel_version() {
        let absent = [feature("a thing", "9.9", Probe::Map(MapType::Unspecified))];
        let err = require(&absent).unwrap_err().to_string();
        assert!(err.contains("a thing (Linux 9.9)"), "{err}");
        assert!(err.contains("Linux 5.18 or newer"), "{err}");
    }
}
