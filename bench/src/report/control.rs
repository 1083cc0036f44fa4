//! The Control plane section: installing the services, one backend change,
//! the Docker source's figures and the maps' kernel memory.

use std::fmt::Write as _;

use super::docker::docker_markdown;
use super::thousands;
use crate::control::ControlData;

/// The "Control plane" section.
pub(super) fn markdown(md: &mut String, c: &ControlData) {
    let _ = writeln!(md, "## Control plane\n");
    let _ = writeln!(
        md,
        "### Installing {} services x {} backends (plus the measured service) from nothing\n\nsvclb: {} repetition(s); the DNAT modes: {} (each service with its own KUBE-SVC / KUBE-SEP chains, or service and endpoint chains, exactly as kube-proxy writes them).\n",
        thousands(c.plan.apply_services),
        c.plan.apply_backends,
        c.plan.repetitions,
        c.plan.dnat_repetitions
    );
    let _ = writeln!(md, "| what | seconds: median (min–max) |\n| --- | --- |");
    for a in &c.apply {
        let v = match (&a.secs, &a.error) {
            (Some(s), _) => format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
            (None, Some(e)) => format!("failed: {e}"),
            _ => "–".into(),
        };
        let _ = writeln!(md, "| {} | {v} |", a.what);
    }
    let _ = writeln!(
        md,
        "\n### One backend change, until a new connect reaches the new backend\n\nA probe in the attached cgroup connects to a VIP over and over (a TCP identity server per backend says which one answered); the figure runs from the start of the change to the end of the first connect that reached the new backend.\n"
    );
    let _ = writeln!(
        md,
        "| how | ms until visible: median (min–max) | command wall time (ms) |\n| --- | --- | --- |"
    );
    for f in &c.change {
        let v = match (&f.ms, &f.error) {
            (Some(s), _) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
            (None, Some(e)) => format!("failed: {e}"),
            _ => "–".into(),
        };
        let cmd = f
            .command_ms
            .map(|s| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(md, "| {} | {v} | {cmd} |", f.how);
    }
    if let Some(d) = &c.docker {
        docker_markdown(md, d);
    }
    let _ = writeln!(
        md,
        "\n### Kernel memory of svclb's maps (`memlock` of each pinned map's fdinfo)\n\nCapacities sized to the service count (next power of two; the hash maps are preallocated, so memory follows the capacity, not the number of entries).\n"
    );
    let mut names: Vec<String> = c
        .memory
        .iter()
        .flat_map(|m| m.maps.iter().map(|x| x.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    let _ = write!(md, "| services | capacity (services / backends) | total |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    let _ = write!(md, "\n| --- | --- | --- |");
    for _ in &names {
        let _ = write!(md, " --- |");
    }
    md.push('\n');
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / 1048576.0);
    for m in &c.memory {
        if let Some(e) = &m.error {
            let _ = writeln!(md, "| {} | failed: {e} |", thousands(m.services));
            continue;
        }
        let _ = write!(
            md,
            "| {} | {} / {} | {} |",
            thousands(m.services),
            m.max_services,
            m.max_backends,
            mib(m.total_bytes)
        );
        for n in &names {
            let v = m
                .maps
                .iter()
                .find(|x| &x.name == n)
                .map(|x| mib(x.memlock))
                .unwrap_or_else(|| "–".into());
            let _ = write!(md, " {v} |");
        }
        md.push('\n');
    }
    md.push('\n');
}
