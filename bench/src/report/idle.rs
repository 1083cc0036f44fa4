//! The "svclbd's own cost" section: idle CPU and RSS, and the reads.

use std::fmt::Write as _;

use super::thousands;
use crate::idle::{IdleData, READS};

/// The "svclbd's own cost" section.
pub(super) fn markdown(md: &mut String, d: &IdleData) {
    let _ = writeln!(md, "## svclbd's own cost\n");
    let _ = writeln!(
        md,
        "### Idle: no traffic, no changes\n\nsvclbd started with the services (each with {} backends; metrics served, no file watch) into new maps, stopped and started again over its pins: each time from the spawn to READY. Then left 5 s for its first rate samples, then measured over {} s: user + system time from /proc/PID/stat, in % of one CPU, and VmRSS at the end.\n",
        d.plan.idle_backends, d.plan.window_secs
    );
    let _ = writeln!(
        md,
        "| services | ready, new maps (s) | ready, restart (s) | CPU (% of one core) | RSS (MiB) | RSS per service above the smallest set (KiB) |\n| ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    // What a service adds: the RSS above the smallest set's, per service more.
    let base = d
        .idle
        .iter()
        .filter_map(|f| Some((f.services, f.rss_bytes?)))
        .min();
    for f in &d.idle {
        match (f.cpu_percent, f.rss_bytes, &f.error) {
            (Some(cpu), Some(rss), _) => {
                let per_service = match base {
                    Some((n, base)) if f.services > n => format!(
                        "{:.2}",
                        rss.saturating_sub(base) as f64 / 1024.0 / (f.services - n) as f64
                    ),
                    _ => "–".into(),
                };
                let secs =
                    |ms: Option<f64>| ms.map_or("–".into(), |ms| format!("{:.2}", ms / 1e3));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {cpu:.2} | {:.1} | {per_service} |",
                    thousands(f.services),
                    secs(f.ready_ms),
                    secs(f.restart_ready_ms),
                    rss as f64 / 1048576.0,
                );
            }
            (_, _, e) => {
                let _ = writeln!(
                    md,
                    "| {} | failed: {} | | | | |",
                    thousands(f.services),
                    e.as_deref().unwrap_or("?")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\n### Reads\n\nWall time of each read against a running, idle svclbd: `svclb-ctl` as a whole process (start included, output to a pipe), and an HTTP GET of svclbd's /metrics; median (min–max) of {} repetition(s).\n",
        d.plan.read_repetitions
    );
    let sets: Vec<(usize, usize)> = d.plan.reads.clone();
    let _ = write!(md, "| read |");
    for (n, b) in &sets {
        let _ = write!(md, " {} x {b} (ms) |", thousands(*n));
    }
    let _ = write!(md, "\n| --- |");
    for _ in &sets {
        let _ = write!(md, " ---: |");
    }
    md.push('\n');
    for what in READS {
        let _ = write!(md, "| {what} |");
        for (n, b) in &sets {
            let cell = d.reads.iter().find(|r| {
                r.services == *n && r.backends == *b && (r.what == what || r.what == "all")
            });
            let text = match cell {
                Some(r) => match (&r.ms, &r.error) {
                    (Some(s), _) => format!(
                        "{:.0} ({:.0}–{:.0}), {} lines",
                        s.median,
                        s.min,
                        s.max,
                        thousands(r.lines)
                    ),
                    (None, Some(e)) => format!("failed: {e}"),
                    _ => "–".into(),
                },
                None => "–".into(),
            };
            let _ = write!(md, " {text} |");
        }
        md.push('\n');
    }
    md.push('\n');
}
