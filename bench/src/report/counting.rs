//! The Cost of packet counting section.

use std::fmt::Write as _;

use super::{find, thousands, Report, COUNTING_NOTES_BEGIN, COUNTING_NOTES_END};
use crate::counting::{CountingData, MAX_COST};
use crate::load::Workload;
use crate::modes::{Mode, Pinning};
use crate::sweep::{human, Spread};

/// The "Cost of packet counting" section.
pub(super) fn counting_markdown(
    md: &mut String,
    r: &Report,
    c: &CountingData,
    notes: Option<String>,
) {
    let p = &c.plan;
    let _ = writeln!(md, "## Cost of packet counting\n");
    let _ = writeln!(
        md,
        "Issue 4: the packet counting must not cost a translated TCP stream more than {max:.0}% of its throughput, nor a request/response on an established connection more than {max:.0}% of its rate, against the same workload with counting off. `svclb-nocount` is svclb with `svclbd --no-packet-counters`: the two `cgroup_skb` counting programs (egress and ingress) are not attached, everything else is the same (connect-time translation, `sock_ops`, `sock_release`). Each packet of a translated socket runs one of them: a socket-storage lookup, then a per-CPU counter update; a socket svclb did not translate pays the lookup only. `svclb-hookonly` attaches programs that do nothing in their place (`svclbd --packet-counters-hook-only`): what the kernel's `cgroup_skb` hook costs by itself, the floor under any per-packet counting on these hooks.\n",
        max = MAX_COST * 100.0
    );
    let loads: Vec<String> = c.loadavg.iter().map(|l| format!("{l:.1}")).collect();
    let _ = writeln!(
        md,
        "{} measurement, {} UTC, svclb {}, {:.0} s: `cargo xtask bench -- --only counting` (or `svclb-bench --only counting`). The machine's 1-minute load average at the start of each repetition, then at the end: {} (including the bench's own: its runs keep 2 to {} threads busy).\n",
        p.name,
        c.generated_utc,
        c.svclb_commit,
        c.wall_secs,
        loads.join(", "),
        2 * p.threads.iter().max().copied().unwrap_or(1)
    );
    let _ = writeln!(md, "{COUNTING_NOTES_BEGIN}");
    let _ = writeln!(md, "{}", notes.unwrap_or_else(|| "(none yet)".to_string()));
    let _ = writeln!(md, "{COUNTING_NOTES_END}\n");

    let modes: Vec<Mode> = [
        Mode::Direct,
        Mode::SvclbNocount,
        Mode::SvclbHookOnly,
        Mode::Svclb,
    ]
    .into_iter()
    .filter(|m| p.modes.contains(m))
    .collect();
    let _ = writeln!(
        md,
        "Median (min–max) over {} repetitions at {} service{}; STREAM in Gbit/s, RR in transactions/s. **svclb / svclb-nocount** is the ratio of the medians; *paired* is the same ratio within each repetition (the two runs seconds apart): median (min–max). Cost = 1 − ratio of medians.\n",
        p.repetitions,
        thousands(p.services),
        if p.services == 1 { "" } else { "s" }
    );
    let _ = write!(md, "| workload | client threads |");
    for m in &modes {
        let _ = write!(md, " {} |", m.name());
    }
    let hook_only = modes.contains(&Mode::SvclbHookOnly);
    if hook_only {
        let _ = write!(md, " svclb-hookonly / svclb-nocount (paired) |");
    }
    let _ = writeln!(
        md,
        " **svclb / svclb-nocount** | paired | cost | within {:.0}% |",
        MAX_COST * 100.0
    );
    let _ = write!(md, "| --- | --- |");
    for _ in &modes {
        let _ = write!(md, " --- |");
    }
    if hook_only {
        let _ = write!(md, " --- |");
    }
    let _ = writeln!(md, " --- | --- | --- | --- |");
    for &w in &p.workloads {
        for &t in &p.threads {
            let _ = write!(md, "| {} | {t} |", w.name().to_uppercase());
            for &m in &modes {
                let cell = match c.find(m, w, t) {
                    Some(x) => match x.value {
                        Some(v) => {
                            let f = |v: f64| {
                                if w == Workload::Stream {
                                    format!("{:.2}", v / 1e9)
                                } else {
                                    human(v)
                                }
                            };
                            let mut s = format!("{} ({}–{})", f(v.median), f(v.min), f(v.max));
                            if x.errors > 0 || x.failed_runs > 0 {
                                let _ = write!(s, " ⚠{}err", x.errors + x.failed_runs as u64);
                            }
                            s
                        }
                        None => "failed".into(),
                    },
                    None => "–".into(),
                };
                let _ = write!(md, " {cell} |");
            }
            if hook_only {
                let floor = c.find(Mode::SvclbHookOnly, w, t);
                let cell = match (
                    floor.and_then(|x| x.ratio_to_nocount),
                    floor.and_then(|x| x.paired_to_nocount),
                ) {
                    (Some(r), Some(p)) => format!("{r:.3} ({:.3})", p.median),
                    (Some(r), None) => format!("{r:.3}"),
                    _ => "–".into(),
                };
                let _ = write!(md, " {cell} |");
            }
            let svclb = c.find(Mode::Svclb, w, t);
            match svclb.and_then(|x| x.ratio_to_nocount) {
                Some(ratio) => {
                    let paired = svclb
                        .and_then(|x| x.paired_to_nocount)
                        .map(|p| format!("{:.3} ({:.3}–{:.3})", p.median, p.min, p.max))
                        .unwrap_or_else(|| "–".into());
                    let _ = writeln!(
                        md,
                        " **{ratio:.3}** | {paired} | {:.1}% | {} |",
                        (1.0 - ratio) * 100.0,
                        if ratio >= 1.0 - MAX_COST {
                            "yes"
                        } else {
                            "**no**"
                        }
                    );
                }
                None => {
                    let _ = writeln!(md, " – | – | – | – |");
                }
            }
        }
    }
    md.push('\n');
    if p.workloads.contains(&Workload::Rr) {
        let _ = writeln!(md, "RR latency, p50 / p99 in µs (medians):\n");
        let _ = write!(md, "| client threads |");
        for m in &modes {
            let _ = write!(md, " {} |", m.name());
        }
        let _ = write!(md, "\n| --- |");
        for _ in &modes {
            let _ = write!(md, " --- |");
        }
        md.push('\n');
        for &t in &p.threads {
            let _ = write!(md, "| {t} |");
            for &m in &modes {
                let f =
                    |s: Option<Spread>| s.map_or("-".to_string(), |s| format!("{:.0}", s.median));
                let cell = c
                    .find(m, Workload::Rr, t)
                    .map(|x| format!("{} / {}", f(x.p50_us), f(x.p99_us)))
                    .unwrap_or_else(|| "–".into());
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "**Method.** Each repetition sets up a fresh cell per mode (its own sandbox, echo servers and, for the two svclb modes, its own svclbd attached to that sandbox's cgroup only; the measured service installed as in the sweep), keeps the cells side by side, and runs every workload in each, alternating the modes run by run in an order rotated for every (workload, threads) and every repetition; set-up order rotates too. Each run: {} ms warm-up, then {} ms measured. With 1 client thread the client and the echo servers are pinned to CPU 0 (the CPU cost per operation, as in the sweep); with {} threads, {}. Every TCP packet of the client's translated socket runs one counting program (egress for the request, ingress for the reply or the stream's segments); the echo servers are outside the attached cgroup and pay nothing.\n",
        p.warmup_ms,
        p.duration_ms,
        p.threads
            .iter()
            .filter(|&&t| t > 1)
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" or "),
        match p.pinning {
            Pinning::Pairs => "client thread i runs on CPU i mod CPUs and each echo worker on its client's CPU (`SO_INCOMING_CPU`), so every client and its server share a CPU and both CPUs are busy (unpinned, these runs were bimodal by placement, as the sweep's 4-thread runs are)",
            Pinning::Sweep => "nothing is pinned, so those runs also show the scheduler's placement and the other CPU's load",
        }
    );

    // The sweep's own svclb-nocount cells, when it had any.
    let counts: Vec<usize> = r
        .plan
        .service_counts
        .iter()
        .copied()
        .filter(|&n| {
            r.plan.runs_at(Mode::SvclbNocount, n) && r.plan.modes.contains(&Mode::SvclbNocount)
        })
        .collect();
    let rows: Vec<(Workload, usize, Vec<Option<f64>>)> = r
        .plan
        .workloads
        .iter()
        .flat_map(|&w| r.plan.threads.iter().map(move |&t| (w, t)))
        .map(|(w, t)| {
            let ratios = counts
                .iter()
                .map(|&n| {
                    let a = find(&r.summaries, n, Mode::Svclb, w, t)?.value?.median;
                    let b = find(&r.summaries, n, Mode::SvclbNocount, w, t)?
                        .value?
                        .median;
                    (b > 0.0).then(|| a / b)
                })
                .collect();
            (w, t, ratios)
        })
        .filter(|(_, _, v): &(Workload, usize, Vec<Option<f64>>)| v.iter().any(Option::is_some))
        .collect();
    if !rows.is_empty() {
        let _ = writeln!(
            md,
            "In the sweep above (fresh cells minutes apart, {} repetition(s)), svclb / svclb-nocount, ratio of medians:\n",
            r.plan.repetitions
        );
        let _ = write!(md, "| workload | client threads |");
        for &n in &counts {
            let _ = write!(
                md,
                " {} service{} |",
                thousands(n),
                if n == 1 { "" } else { "s" }
            );
        }
        let _ = write!(md, "\n| --- | --- |");
        for _ in &counts {
            let _ = write!(md, " --- |");
        }
        md.push('\n');
        for (w, t, ratios) in rows {
            let _ = write!(md, "| {} | {t} |", w.name().to_uppercase());
            for v in ratios {
                let _ = write!(
                    md,
                    " {} |",
                    v.map_or("–".to_string(), |v| format!("{v:.3}"))
                );
            }
            md.push('\n');
        }
        md.push('\n');
    }
}
