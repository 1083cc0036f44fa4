//! docs/BENCHMARKS.md and docs/benchmarks.json from a sweep.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::control::ControlData;
use crate::counting::{CountingData, MAX_COST};
use crate::docker::{DockerData, DockerFigure};
use crate::load::Workload;
use crate::machine::Machine;
use crate::modes::{Mode, Pinning};
use crate::sweep::{human, Plan, Spread, Summary, SweepData};

pub const NOTES_BEGIN: &str = "<!-- notes:begin -->";
pub const NOTES_END: &str = "<!-- notes:end -->";
/// Hand-written reading of the counting figures, kept like the notes.
pub const COUNTING_NOTES_BEGIN: &str = "<!-- counting-notes:begin -->";
pub const COUNTING_NOTES_END: &str = "<!-- counting-notes:end -->";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub generated_utc: String,
    pub plan: Plan,
    pub machine: Machine,
    pub summaries: Vec<Summary>,
    pub control: Option<ControlData>,
    pub sweep: SweepData,
    /// What the packet counters cost (`svclb-bench --only counting`); kept
    /// from the previous benchmarks.json by a run that does not measure it.
    #[serde(default)]
    pub counting: Option<CountingData>,
}

/// A target from the issue, evaluated on this sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub target: String,
    pub figure: String,
    pub met: Option<bool>,
}

fn find(s: &[Summary], n: usize, mode: Mode, w: Workload, threads: usize) -> Option<&Summary> {
    s.iter()
        .find(|x| x.services == n && x.mode == mode && x.workload == w && x.threads == threads)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

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

fn cell_value(w: Workload, x: &Summary) -> String {
    let Some(v) = x.value else {
        return "failed".into();
    };
    let fmt = |v: f64| {
        if w == Workload::Stream {
            format!("{:.2}", v / 1e9)
        } else {
            human(v)
        }
    };
    let mut s = format!("{} ({}–{})", fmt(v.median), fmt(v.min), fmt(v.max));
    if x.mode != Mode::Direct {
        if let Some(r) = x.ratio {
            let _ = write!(s, " **{r:.2}×**");
        }
    }
    if x.errors > 0 || x.failed_runs > 0 {
        let _ = write!(s, " ⚠{}err", x.errors + x.failed_runs as u64);
    }
    s
}

fn cell_latency(x: &Summary) -> String {
    let f = |s: Option<Spread>| s.map_or("-".to_string(), |s| format!("{:.0}", s.median));
    let mut s = format!("{} / {} / {}", f(x.p50_us), f(x.p99_us), f(x.p999_us));
    if x.mode != Mode::Direct {
        if let Some(r) = x.p99_ratio {
            let _ = write!(s, " ({r:.2}×)");
        }
    }
    s
}

fn workload_title(w: Workload) -> &'static str {
    match w {
        Workload::Crr => "CRR: connections/s (connect, 1-byte request, 1-byte reply, close)",
        Workload::Rr => "RR: transactions/s (1-byte ping-pong on an established connection)",
        Workload::Stream => {
            "STREAM: Gbit/s (server to client, 64 KiB writes, one connection per thread)"
        }
        Workload::Udp => "UDP: transactions/s (1-byte request/response on a connected UDP socket)",
    }
}

fn method_text(r: &Report) -> String {
    let p = &r.plan;
    let nocount = if p.modes.contains(&Mode::SvclbNocount) {
        format!(
            "\n  `svclb-nocount`: the same with `svclbd --no-packet-counters` (the two\n  `cgroup_skb` counting programs not attached, everything else the same), at\n  {} service(s) only: the counting does no per-service work, and svclbd's\n  start-up makes the other cells expensive (see Cost of packet counting).",
            p.nocount_counts
                .iter()
                .map(|&n| thousands(n))
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        String::new()
    };
    format!(
        r#"`cargo xtask bench` ({} sweep) builds the release binaries and runs `svclb-bench`
as root. Everything happens in throwaway network namespaces that the test
harness creates (a client namespace and a backends namespace joined by a veth
pair, 172.50.0.0/24, no default route) and on loopback; nothing is sent
anywhere else.

- **Modes.** `direct`: the client connects to the three backends
  (172.50.0.10-12:80) itself, picking one at random per connection.
  `svclb`: the real `svclbd` (release build), attached to the sandbox's
  cgroup, with the measured service (VIP 172.50.0.200, the three backends)
  installed last; the load generator connects to the VIP.{} In every mode the
  load generator runs in the sandbox's cgroup (only in {} are
  programs attached to it). `iptables-nft` / `iptables-legacy`: kube-proxy's iptables mode
  rebuilt in the client namespace with `iptables-nft-restore` /
  `iptables-legacy-restore`: `OUTPUT -> KUBE-SERVICES`, one rule per service
  port (the measured one last, as in a chain that grew), each jumping to a
  `KUBE-SVC-*` chain (masquerade check, then `-m statistic --mode random`
  over `KUBE-SEP-*` chains that DNAT), `KUBE-POSTROUTING` masquerade marks,
  and the filter table's `--ctstate NEW -j KUBE-SERVICES`. `nftables`:
  kube-proxy's nftables mode: one `ip daddr . meta l4proto . th dport vmap
  @service-ips` lookup, a per-service chain with `numgen random mod N vmap`
  over endpoint chains that DNAT, the `ct state new` endpoints check and the
  masquerade chain. `haproxy`: haproxy {} in `mode tcp`, started by the
  bench with its own config in a temp dir (never a system service), in the
  client namespace on 127.0.0.1:8080 (a node-local proxy, the way
  kube-proxy's old userspace mode sat on each node), connecting out to the
  three backends over the veth; `balance random`. It has no UDP, and runs at
  {} service(s) only: each service is its own listening socket, so the
  number of others does not enter a connection's path.
- **Services.** N = {} installed services: N-1 others (VIPs 10.128.x.y, one
  backend each in 172.50.0.100-199; never connected to: svclb rewrites the
  connect before any packet exists, and the DNAT modes only ever see packets
  for the measured VIP), then the measured one (TCP and UDP port 80). svclbd
  runs with `--max-services {} --max-backends {}`.
- **Fresh cells.** Each (repetition, service count, mode) is a new sandbox:
  new namespaces (so no conntrack or NAT state carries over), new cgroup, new
  echo servers, the mode installed from nothing (the set-up time is
  reported below), then every workload runs in it, CRR last (it leaves
  TIME_WAIT sockets and conntrack entries behind). The client namespace sets
  `net.ipv4.tcp_tw_reuse=1` and a 10000-65000 port range for CRR.
- **Interleaving and repetition.** {} repetition(s); inside each, for each
  service count, every mode once, in an order rotated every time. Each run:
  {} ms warm-up, then {} ms measured. Figures are medians over the
  repetitions with (min–max); **×** is the ratio of medians to `direct` at
  the same service count and thread count in the same sweep (the per-
  repetition paired ratios are in the JSON).
- **Load generator.** `svclb-load` (bench/src/load.rs, Rust, raw
  syscalls, blocking sockets, 1 s timeouts): CRR = socket, 2 x setsockopt,
  connect, send 1 byte, receive 1 byte, close (client closes first); RR and
  UDP = send 1 byte, receive 1 byte; STREAM = one connection per thread,
  the server writes 64 KiB chunks. 1 and {} client threads; with 1 thread
  the client and the echo servers are pinned to CPU 0 (in this VM a
  request/response across CPUs pays an idle vCPU's wake-up, which made
  1-thread runs bimodal, 20k or 200k/s by placement), so 1-thread figures
  are the CPU cost per operation; with more threads nothing is pinned. Latency is per
  operation, in a log-linear histogram (1.6% buckets). Operations and time
  are both bounded; errors are counted by kind (⚠ in a cell).
- **Servers.** Echo servers in the backends namespace, inside the bench
  process: per backend a pool of 8 threads blocked in accept() (no thread
  spawn per connection), and 2 UDP threads.
- **Noise.** The machine has {} CPUs shared by the client, the servers, the
  proxy and the kernel; a difference smaller than the min–max spread is not a
  difference.
"#,
        p.name,
        nocount,
        if p.modes.contains(&Mode::SvclbNocount) {
            "the svclb modes"
        } else {
            "svclb mode"
        },
        r.machine.haproxy.split_whitespace().nth(2).unwrap_or(""),
        p.haproxy_counts
            .iter()
            .map(|&n| thousands(n))
            .collect::<Vec<_>>()
            .join(", "),
        p.service_counts
            .iter()
            .map(|&n| thousands(n))
            .collect::<Vec<_>>()
            .join(", "),
        crate::modes::MAX_SERVICES,
        crate::modes::MAX_BACKENDS,
        p.repetitions,
        p.warmup_ms,
        p.duration_ms,
        p.threads.iter().max().copied().unwrap_or(1),
        r.machine.cpus,
    )
}

/// The notes kept from an existing BENCHMARKS.md (between the markers).
fn kept_notes(text: &str, begin: &str, end: &str) -> Option<String> {
    let start = text.find(begin)? + begin.len();
    let end = text[start..].find(end)? + start;
    Some(text[start..end].trim_matches('\n').to_string())
}

/// The hand-written parts of an existing BENCHMARKS.md, kept on a new run.
#[derive(Clone, Debug, Default)]
pub struct Notes {
    pub sweep: Option<String>,
    pub counting: Option<String>,
}

impl Notes {
    pub fn read(path: &Path) -> Notes {
        let text = fs::read_to_string(path).unwrap_or_default();
        Notes {
            sweep: kept_notes(&text, NOTES_BEGIN, NOTES_END),
            counting: kept_notes(&text, COUNTING_NOTES_BEGIN, COUNTING_NOTES_END),
        }
    }
}

pub fn markdown(r: &Report, notes: Notes) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "<!-- Generated by `cargo xtask bench` (bench/src/report.rs); only the notes between the notes markers are kept when it runs again. -->\n"
    );
    let swept = !r.sweep.runs.is_empty();
    if swept {
        let _ = writeln!(
            md,
            "svclb side by side with a direct connection, kube-proxy-style iptables (nft and legacy back ends) and nftables DNAT, and haproxy ({} sweep, {} UTC, {:.0} s). Raw data: [benchmarks.json](benchmarks.json).\n",
            r.plan.name, r.generated_utc, r.sweep.wall_secs
        );
    } else {
        let _ = writeln!(
            md,
            "svclb's benchmark figures ({} UTC; no data-plane sweep in this report). Raw data: [benchmarks.json](benchmarks.json).\n",
            r.generated_utc
        );
    }
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
    let _ = writeln!(
        md,
        "\n## Targets (from issue 6{}; reported, not asserted)\n",
        if r.counting.is_some() {
            ", and issue 4's bound on the cost of counting"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "| target | this sweep | |\n| --- | --- | --- |");
    for t in targets(r) {
        let _ = writeln!(md, "| {} | {} | {} |", t.target, t.figure, verdict(t.met));
    }
    let _ = writeln!(md, "\n## Notes\n\n{NOTES_BEGIN}");
    let _ = writeln!(
        md,
        "{}",
        notes.sweep.unwrap_or_else(|| "(none yet)".to_string())
    );
    let _ = writeln!(md, "{NOTES_END}\n");
    if swept {
        let _ = writeln!(md, "## Method\n\n{}", method_text(r));
        data_plane_markdown(&mut md, r);
    }
    if let Some(c) = &r.counting {
        counting_markdown(&mut md, r, c, notes.counting);
    }

    if let Some(c) = &r.control {
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
            docker_markdown(&mut md, d);
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
    md
}

/// The Docker source's figures: a paragraph and a table.
fn docker_markdown(md: &mut String, d: &DockerData) {
    let _ = writeln!(
        md,
        "\n### The Docker source: from a Docker event to new connects\n\n\
         `svclbd --docker` follows an engine serving one swarm network with N services (the \
         test harness's fake engine, tests/src/fake_swarm.rs: a real swarm with that many \
         services needs as many containers). It answers the Engine API svclbd reads \
         (`/version`, `/networks`, `/networks/ID?verbose=true` with each service's VIP, \
         LocalLBIndex and tasks, `/containers/json`, a streamed `/events`) on a Unix socket. \
         Each change replaces the probe service's task with the other identity server and \
         sends one `container start` event stamped with the time; the figure runs from that \
         stamp to the end of the first connect, from the probe in the containers' cgroup, \
         that reached the new task. svclbd's own `event_to_maps_ms` (its log; the \
         `svclb_docker_event_to_maps_seconds` metric) runs from the event's `timeNano` to \
         the maps written; it logs one only when the event's own resync changed the maps, and \
         counts from the earliest event not yet followed by a resync. svclbd polls the engine \
         every second besides the events (its default): a poll may take the change before \
         the event's resync, or delay it; the events-only rows (`--docker-poll 1h`) show the \
         event path alone. The targets are judged on the default rows. p99 is the nearest \
         rank (with fewer than 100 changes, the largest).\n"
    );
    let _ = writeln!(
        md,
        "| services on the network | svclbd follows | changes | ms until visible: median | p99 | min–max | svclbd event-to-maps ms: median | p99 |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for f in &d.figures {
        let Some(v) = &f.visible_ms else {
            let _ = writeln!(
                md,
                "| {} | {} | {} | failed: {} | | | | |",
                thousands(f.services),
                crate::docker::poll_text(f.poll.as_deref()),
                f.changes,
                f.error.as_deref().unwrap_or("-")
            );
            continue;
        };
        let opt = |x: Option<f64>| x.map_or_else(|| "–".into(), |x| format!("{x:.2}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {} | {:.2}–{:.2} | {} | {} |",
            thousands(f.services),
            crate::docker::poll_text(f.poll.as_deref()),
            f.changes,
            v.median,
            opt(f.visible_p99_ms),
            v.min,
            v.max,
            opt(f.svclbd_ms.map(|s| s.median)),
            opt(f.svclbd_p99_ms)
        );
    }
}

/// The sweep's tables: each workload by mode and service count, and the set-up times.
fn data_plane_markdown(md: &mut String, r: &Report) {
    let counts = &r.plan.service_counts;
    let header = |md: &mut String| {
        let _ = write!(md, "| mode |");
        for &n in counts {
            let _ = write!(
                md,
                " {} service{} |",
                thousands(n),
                if n == 1 { "" } else { "s" }
            );
        }
        let _ = write!(md, "\n| --- |");
        for _ in counts {
            let _ = write!(md, " --- |");
        }
        md.push('\n');
    };
    let _ = writeln!(md, "## Data plane\n");
    let _ = writeln!(
        md,
        "Each cell: median (min–max) over the repetitions, **ratio to direct**; latency cells: p50 / p99 / p999 in µs (medians), (p99 ratio to direct).\n"
    );
    for &w in &r.plan.workloads {
        let _ = writeln!(md, "### {}\n", workload_title(w));
        for &t in &r.plan.threads {
            let _ = writeln!(
                md,
                "{} client thread{}:\n",
                t,
                if t == 1 { "" } else { "s" }
            );
            header(md);
            for &mode in &r.plan.modes {
                if !mode.supports(w) {
                    continue;
                }
                let _ = write!(md, "| {} |", mode.name());
                for &n in counts {
                    let cell = find(&r.summaries, n, mode, w, t)
                        .map(|x| cell_value(w, x))
                        .unwrap_or_else(|| "–".into());
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
            md.push('\n');
            if w != Workload::Stream {
                let _ = writeln!(
                    md,
                    "Latency (µs), {t} client thread{}:\n",
                    if t == 1 { "" } else { "s" }
                );
                header(md);
                for &mode in &r.plan.modes {
                    if !mode.supports(w) {
                        continue;
                    }
                    let _ = write!(md, "| {} |", mode.name());
                    for &n in counts {
                        let cell = find(&r.summaries, n, mode, w, t)
                            .map(cell_latency)
                            .unwrap_or_else(|| "–".into());
                        let _ = write!(md, " {cell} |");
                    }
                    md.push('\n');
                }
                md.push('\n');
            }
        }
    }

    let _ = writeln!(
        md,
        "### Set-up time per cell (s): installing N services from nothing\n"
    );
    header(md);
    for &mode in &r.plan.modes {
        let _ = write!(md, "| {} |", mode.name());
        for &n in counts {
            let v: Vec<f64> = r
                .sweep
                .setups
                .iter()
                .filter(|s| s.mode == mode && s.services == n)
                .filter_map(|s| s.secs)
                .collect();
            let failed = r
                .sweep
                .setups
                .iter()
                .filter(|s| s.mode == mode && s.services == n && s.error.is_some())
                .count();
            let cell = match Spread::of(&v) {
                Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
                None if failed > 0 => "failed".into(),
                None => "–".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\n(svclb: svclbd start to READY, including program load and attach; direct: nothing to install; haproxy: start until it accepts.)\n"
    );
}

/// The "Cost of packet counting" section.
fn counting_markdown(md: &mut String, r: &Report, c: &CountingData, notes: Option<String>) {
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

/// Writes `BENCHMARKS.md` and `benchmarks.json` into `dir`, keeping the
/// notes of an existing BENCHMARKS.md there.
pub fn write(dir: &Path, r: &Report) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md_path = dir.join("BENCHMARKS.md");
    let notes = Notes::read(&md_path);
    fs::write(&md_path, markdown(r, notes))
        .with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = dir.join("benchmarks.json");
    let mut json = serde_json::to_string_pretty(r)?;
    json.push('\n');
    fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

/// Reads a report back from its JSON (to render the Markdown again).
pub fn read_json(path: &Path) -> Result<Report> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
