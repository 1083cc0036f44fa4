//! The Machine section: what the figures were measured on.

use std::fmt::Write as _;

use crate::machine::Machine;

pub(super) fn markdown(md: &mut String, m: &Machine) {
    let _ = writeln!(md, "## Machine\n\n| | |\n| --- | --- |");
    for (k, v) in [
        ("OS", m.os.clone()),
        ("kernel", m.kernel.clone()),
        ("CPU", format!("{} x {}", m.cpus, m.cpu)),
        ("memory", format!("{} GiB", m.memory_gib)),
        ("virtualization", m.virtualization.clone()),
        ("svclb", m.svclb_commit.clone()),
        ("rustc (host)", m.rustc.clone()),
        (
            "iptables",
            format!("{}; {}", m.iptables_nft, m.iptables_legacy),
        ),
        ("nftables", m.nft.clone()),
        ("haproxy", m.haproxy.clone()),
        ("perf", m.perf.clone()),
    ] {
        let _ = writeln!(md, "| {k} | {v} |");
    }
}
