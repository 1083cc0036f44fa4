//! The Targets section: the issues' targets, evaluated on the report.

use super::{find, thousands, Report, Target};
use crate::counting::{CountingData, MAX_COST};
use crate::docker::{DockerData, DockerFigure};
use crate::idle::IdleData;
use crate::load::Workload;
use crate::modes::Mode;
use crate::sweep::Summary;

pub fn targets(r: &Report) -> Vec<Target> {
    let s = &r.summaries;
    let mut out = Vec::new();
    let counts = &r.plan.service_counts;
    let threads = &r.plan.threads;
    let swept = !r.sweep.runs.is_empty();
    for w in [Workload::Crr, Workload::Rr].into_iter().filter(|_| swept) {
        // (services, threads, figure) of svclb's cells for this workload.
        let cells = |figure: fn(&Summary) -> Option<f64>| -> Vec<(usize, usize, f64)> {
            counts
                .iter()
                .flat_map(|&n| threads.iter().map(move |&t| (n, t)))
                .filter_map(|(n, t)| Some((n, t, figure(find(s, n, Mode::Svclb, w, t)?)?)))
                .collect()
        };
        let ratios = cells(|x| x.ratio);
        let worst = ratios.iter().min_by(|a, b| a.2.total_cmp(&b.2));
        out.push(Target {
            target: format!(
                "svclb {} >= 0.95 x direct at every service count",
                w.name().to_uppercase()
            ),
            figure: match worst {
                Some((n, t, v)) => format!(
                    "worst {v:.3}x ({} services, {t} thread{}); all: {}",
                    thousands(*n),
                    if *t == 1 { "" } else { "s" },
                    ratios
                        .iter()
                        .map(|(_, _, v)| format!("{v:.2}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                None => "-".into(),
            },
            met: worst.map(|w| w.2 >= 0.95),
        });
        let p99 = cells(|x| x.p99_ratio);
        let worst = p99.iter().max_by(|a, b| a.2.total_cmp(&b.2));
        out.push(Target {
            target: format!(
                "svclb {} p99 latency within 10% of direct",
                w.name().to_uppercase()
            ),
            figure: match worst {
                Some((n, t, v)) => format!(
                    "worst {v:.3}x ({} services, {t} thread{})",
                    thousands(*n),
                    if *t == 1 { "" } else { "s" }
                ),
                None => "-".into(),
            },
            met: worst.map(|w| w.2 <= 1.10),
        });
    }
    // Versus iptables (nft) and nftables at 10,000 services (or the largest count below).
    let n10k = counts.iter().copied().filter(|&n| n <= 10_000).max();
    for (other, factor) in [(Mode::IptablesNft, 2.0), (Mode::Nftables, 1.0)]
        .into_iter()
        .filter(|_| swept)
    {
        let mut figs = Vec::new();
        let mut met = None;
        if let Some(n) = n10k {
            for &t in threads {
                let a = find(s, n, Mode::Svclb, Workload::Crr, t).and_then(|x| x.value);
                let b = find(s, n, other, Workload::Crr, t).and_then(|x| x.value);
                if let (Some(a), Some(b)) = (a, b) {
                    let v = a.median / b.median;
                    figs.push(format!(
                        "{v:.2}x with {t} thread{}",
                        if t == 1 { "" } else { "s" }
                    ));
                    met = Some(met.unwrap_or(true) && v >= factor);
                }
            }
        }
        out.push(Target {
            target: format!(
                "svclb CRR at 10,000 services >= {factor} x {}",
                other.name()
            ),
            figure: format!(
                "{}{}",
                figs.join(", "),
                match n10k {
                    Some(10_000) | None => String::new(),
                    Some(n) => format!(" (at {} services: this sweep stops there)", thousands(n)),
                }
            ),
            met,
        });
    }
    let mut figs = Vec::new();
    let mut met = None;
    for &n in &r.plan.haproxy_counts {
        for &t in threads {
            let a = find(s, n, Mode::Svclb, Workload::Rr, t).and_then(|x| x.value);
            let b = find(s, n, Mode::Haproxy, Workload::Rr, t).and_then(|x| x.value);
            if let (Some(a), Some(b)) = (a, b) {
                let v = a.median / b.median;
                figs.push(format!(
                    "{v:.2}x with {t} thread{}",
                    if t == 1 { "" } else { "s" }
                ));
                met = Some(met.unwrap_or(true) && v >= 4.0);
            }
        }
    }
    if swept {
        out.push(Target {
            target: "svclb RR >= 4 x haproxy".into(),
            figure: figs.join(", "),
            met,
        });
    }
    if let Some(c) = &r.counting {
        out.extend(counting_targets(c));
    }
    if let Some(c) = &r.control {
        let apply = c
            .apply
            .iter()
            .find(|a| a.what.starts_with("svclb-ctl apply"))
            .and_then(|a| a.secs);
        out.push(Target {
            target: format!(
                "{} services x {} backends applied in under 1 s",
                thousands(c.plan.apply_services),
                c.plan.apply_backends
            ),
            figure: apply
                .map(|s| {
                    format!(
                        "svclb-ctl apply {:.3} s (min {:.3}, max {:.3})",
                        s.median, s.min, s.max
                    )
                })
                .unwrap_or_else(|| "-".into()),
            met: apply.map(|s| s.median < 1.0),
        });
        let best = c
            .change
            .iter()
            .filter_map(|f| f.ms.map(|m| (f.how.clone(), m)))
            .min_by(|a, b| a.1.median.total_cmp(&b.1.median));
        out.push(Target {
            target: "one backend change visible to new connects in under 10 ms".into(),
            figure: c
                .change
                .iter()
                .filter_map(|f| Some(format!("{}: {:.2} ms", f.how, f.ms?.median)))
                .collect::<Vec<_>>()
                .join("; "),
            met: best.map(|(_, m)| m.median < 10.0),
        });
        if let Some(d) = &c.docker {
            out.extend(docker_targets(d));
        }
    }
    if let Some(i) = &r.idle {
        out.extend(idle_targets(i));
    }
    out
}

/// Issue 16's bounds on svclbd's own cost, from the idle measurement.
fn idle_targets(d: &IdleData) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(f) = d.idle.iter().find(|f| f.services == 100_000) {
        out.push(Target {
            target: format!(
                "svclbd idle under 1% of one core at 100,000 services x {}",
                f.backends
            ),
            figure: f
                .cpu_percent
                .map_or_else(|| "-".into(), |c| format!("{c:.2}%")),
            met: f.cpu_percent.map(|c| c < 1.0),
        });
        out.push(Target {
            target: format!(
                "svclbd ready at 100,000 services x {} in under 2 s",
                f.backends
            ),
            figure: match (f.ready_ms, f.restart_ready_ms) {
                (Some(fresh), Some(again)) => format!(
                    "{:.2} s into new maps, {:.2} s over the pins (a restart)",
                    fresh / 1e3,
                    again / 1e3
                ),
                _ => "-".into(),
            },
            met: f.ready_ms.map(|ms| ms < 2000.0),
        });
    }
    // The slowest read of a set, against its bound.
    for (services, backends, bound_ms) in [(10_000, 2, 50.0), (100_000, 2, 300.0)] {
        let reads: Vec<(&str, f64)> = d
            .reads
            .iter()
            .filter(|r| r.services == services && r.backends == backends)
            .filter_map(|r| Some((r.what.as_str(), r.ms.as_ref()?.median)))
            .collect();
        if reads.is_empty() {
            continue;
        }
        let worst = reads.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
        out.push(Target {
            target: format!(
                "svclb-ctl stats/list/rate and a scrape at {} services x {backends} under {bound_ms:.0} ms",
                thousands(services)
            ),
            figure: reads
                .iter()
                .map(|(what, ms)| format!("{what} {ms:.0} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            met: Some(worst < bound_ms),
        });
    }
    out
}

/// Issue 13's bounds on the Docker source, from its figures.
fn docker_targets(d: &DockerData) -> Vec<Target> {
    let mut out = Vec::new();
    // svclbd as deployed: its default poll besides the events.
    let at = |n: usize| {
        d.figures
            .iter()
            .find(|f| f.services == n && f.poll.is_none())
    };
    let fig = |f: &DockerFigure| match (&f.visible_ms, f.visible_p99_ms) {
        (Some(s), Some(p)) => format!(
            "median {:.2} ms, p99 {p:.2} ms over {} changes (svclbd's own event-to-maps: {})",
            s.median,
            s.n,
            match (&f.svclbd_ms, f.svclbd_p99_ms) {
                (Some(m), Some(p)) => format!("median {:.2}, p99 {p:.2}", m.median),
                _ => "-".into(),
            }
        ),
        _ => f
            .error
            .as_deref()
            .map_or_else(|| "-".into(), |e| format!("failed: {e}")),
    };
    if let Some(f) = at(1_000) {
        out.push(Target {
            target: "Docker event to new connects, 1,000 services: p99 under 50 ms".into(),
            figure: fig(f),
            met: f.visible_p99_ms.map(|p| p < 50.0),
        });
    }
    if let Some(f) = at(10_000) {
        out.push(Target {
            target: "one backend change through Docker, 10,000 services: under 10 ms".into(),
            figure: fig(f),
            met: f.visible_ms.map(|s| s.median < 10.0),
        });
    }
    out
}

/// Issue 4's bounds on the counting's cost, from the counting measurement.
fn counting_targets(c: &CountingData) -> Vec<Target> {
    let mut out = Vec::new();
    for (w, what) in [
        (Workload::Stream, "a translated TCP STREAM's throughput"),
        (Workload::Rr, "an established connection's RR rate"),
    ] {
        let mut figs = Vec::new();
        let mut met = None;
        for &t in &c.plan.threads {
            let Some(x) = c.find(Mode::Svclb, w, t) else {
                continue;
            };
            let Some(ratio) = x.ratio_to_nocount else {
                continue;
            };
            figs.push(format!(
                "{} with {t} thread{} ({ratio:.3}x{})",
                cost_text(ratio),
                if t == 1 { "" } else { "s" },
                x.paired_to_nocount
                    .map(|p| format!(", paired {:.3}–{:.3}", p.min, p.max))
                    .unwrap_or_default()
            ));
            met = Some(met.unwrap_or(true) && ratio >= 1.0 - MAX_COST);
            if let Some(floor) = c
                .find(Mode::SvclbHookOnly, w, t)
                .and_then(|x| x.ratio_to_nocount)
            {
                figs.push(format!(
                    "the hook alone (no-op programs) {} with {t} thread{}",
                    cost_text(floor),
                    if t == 1 { "" } else { "s" }
                ));
            }
        }
        out.push(Target {
            target: format!(
                "packet counting costs {what} <= {:.0}% (issue 4: svclb vs svclb-nocount)",
                MAX_COST * 100.0
            ),
            figure: if figs.is_empty() {
                "-".into()
            } else {
                figs.join("; ")
            },
            met,
        });
    }
    out
}

/// "cost 1.8%" for a ratio of 0.982 (counting on / off); a ratio above 1
/// is no cost the measurement can see.
fn cost_text(ratio: f64) -> String {
    let cost = (1.0 - ratio) * 100.0;
    if cost >= 0.05 {
        format!("cost {cost:.1}%")
    } else if cost > -0.05 {
        "no cost measured".into()
    } else {
        format!("no cost measured (+{:.1}%)", -cost)
    }
}
