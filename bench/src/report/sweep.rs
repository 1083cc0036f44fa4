//! The Method section and the sweep's tables.

use std::fmt::Write as _;

use super::{find, thousands, Report};
use crate::load::Workload;
use crate::modes::Mode;
use crate::sweep::{human, Spread, Summary};

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

pub(super) fn method_text(r: &Report) -> String {
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

/// The sweep's tables: each workload by mode and service count, and the set-up times.
pub(super) fn data_plane_markdown(md: &mut String, r: &Report) {
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

    let _ = writeln!(
        md,
        "### svclbd's own CPU during the runs (% of one CPU, user + system, median (max) over the repetitions)\n"
    );
    header(md);
    for &mode in &r.plan.modes {
        for &w in &r.plan.workloads {
            for &t in &r.plan.threads {
                let cells: Vec<String> = counts
                    .iter()
                    .map(|&n| {
                        find(&r.summaries, n, mode, w, t)
                            .and_then(|x| x.svclbd_cpu_percent)
                            .map_or("–".into(), |s| format!("{:.1} ({:.1})", s.median, s.max))
                    })
                    .collect();
                if cells.iter().all(|c| c == "–") {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} {} x{t} | {} |",
                    mode.name(),
                    w.name(),
                    cells.join(" | ")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\n(The whole run, warm-up included; svclbd's rate sampler and health checks are all it does while no configuration changes.)\n"
    );
}
