//! What `svclb-ctl` prints: the layouts of `ipvsadm -L -n` and
//! `ipvsadm -L -n --stats`, so that scripts written for ipvsadm parse it
//! unchanged, and the same figures as JSON.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::Result;
use serde::Serialize;
use svclb_common::BackendStats;

use crate::{
    dataplane::{Dataplane, Snapshot},
    model::{protocol_name, ServicePort},
    rates::{self, Rates},
};

#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub address: IpAddr,
    /// Absent: the client's destination port is kept (ipvsadm shows `:0`).
    pub port: Option<u16>,
    pub weight: u32,
    /// TCP connections in ESTABLISHED (IPVS's ActiveConn).
    pub active_conns: u64,
    /// Other live connections: TCP being set up or torn down, UDP sockets (InActConn).
    pub inactive_conns: u64,
    /// Summed over CPUs (a service's: over its backends too).
    pub stats: BackendStats,
    /// svclbd's estimate; zero when it has not sampled yet.
    pub rates: Rates,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub vip: IpAddr,
    /// A per-port service's port and protocol; absent for FWM-style ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<ServicePort>,
    pub mark: u32,
    pub scheduler: &'static str,
    /// The affinity timeout in seconds (ipvsadm's `persistent`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<u32>,
    /// Summed over CPUs (a service's: over its backends too).
    pub stats: BackendStats,
    pub rates: Rates,
    pub backends: Vec<BackendReport>,
}

/// What `svclb-ctl list --json` shows: the configuration and live
/// connections, without the counters and rates that `stats`/`rate` show.
#[derive(Clone, Debug, Serialize)]
pub struct ListedService {
    pub name: String,
    pub vip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<ServicePort>,
    pub mark: u32,
    pub scheduler: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<u32>,
    pub backends: Vec<ListedBackend>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListedBackend {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub weight: u32,
    pub active_conns: u64,
    pub inactive_conns: u64,
}

pub fn list_view(services: &[ServiceReport]) -> Vec<ListedService> {
    services
        .iter()
        .map(|s| ListedService {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            mark: s.mark,
            scheduler: s.scheduler,
            persistent: s.persistent,
            backends: s
                .backends
                .iter()
                .map(|b| ListedBackend {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    active_conns: b.active_conns,
                    inactive_conns: b.inactive_conns,
                })
                .collect(),
        })
        .collect()
}

/// Reads every service with its counters; services sorted by mark.
pub fn collect(dp: &Dataplane) -> Result<Vec<ServiceReport>> {
    collect_from(dp, &dp.snapshot_without_slots()?)
}

pub fn collect_from(dp: &Dataplane, snapshot: &Snapshot) -> Result<Vec<ServiceReport>> {
    let ids: Vec<u32> = snapshot
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    let figures = dp.backend_figures(&ids)?;
    let mut out = Vec::new();
    for svc in snapshot.services.values() {
        let mut total = BackendStats::default();
        let mut estimators = Vec::new();
        let mut backends = Vec::new();
        for b in &svc.backends {
            let f = figures.get(&b.id).copied().unwrap_or_default();
            let stats = f.stats;
            total.add(&stats);
            let gauge = f.conns;
            let estimator = f.rate;
            estimators.push(estimator);
            backends.push(BackendReport {
                address: b.addr,
                port: b.port,
                weight: b.weight,
                active_conns: gauge.active.max(0) as u64,
                inactive_conns: gauge.inactive.max(0) as u64,
                stats,
                rates: rates::rates(&estimator),
            });
        }
        out.push(ServiceReport {
            name: svc.name.clone(),
            vip: svc.vip,
            port: svc.port,
            mark: svc.mark,
            scheduler: svc.scheduler.name(),
            persistent: svc.value.has_affinity().then_some(svc.value.affinity_secs),
            stats: total,
            rates: rates::rates(&rates::sum(&estimators)),
            backends,
        });
    }
    Ok(out)
}

/// How long ago svclbd last sampled the rates (None: never).
pub fn rates_age(dp: &Dataplane) -> Result<Option<std::time::Duration>> {
    let newest = dp.rate_estimators().map(|(_, st)| st.sampled_ns).max();
    let now = rates::monotonic_ns();
    Ok(newest.map(|n| std::time::Duration::from_nanos(now.saturating_sub(n))))
}

/// ipvsadm's `print_largenum`: 9 columns, K/M/G/T past 10^8 unless exact.
pub fn large_num(n: u64, exact: bool) -> String {
    if exact {
        let len = n.to_string().len();
        let width = if len <= 8 { 9 } else { len + 1 };
        return format!("{n:>width$}");
    }
    match n {
        0..100_000_000 => format!("{n:>9}"),
        100_000_000..1_000_000_000 => format!("{:>8}K", n / 1_000),
        1_000_000_000..100_000_000_000 => format!("{:>8}M", n / 1_000_000),
        100_000_000_000..100_000_000_000_000 => format!("{:>8}G", n / 1_000_000_000),
        _ => format!("{:>8}T", n / 1_000_000_000_000),
    }
}

fn real_server(addr: IpAddr, port: Option<u16>) -> String {
    let port = port.unwrap_or(0);
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The first column of a service row: `FWM  317`, or for a per-port
/// service `TCP  172.50.0.37:80`, as ipvsadm names them.
pub fn service_name(svc: &ServiceReport) -> String {
    match svc.port {
        None => format!("FWM  {}", svc.mark),
        Some(p) => format!(
            "{}  {}",
            protocol_name(p.protocol).to_uppercase(),
            real_server(svc.vip, Some(p.port))
        ),
    }
}

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)";

/// `ipvsadm -L -n --stats`.
pub fn format_stats(services: &[ServiceReport], exact: bool) -> String {
    format_columns(
        services,
        "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes",
        |c: &BackendStats, _: &Rates| [c.conns, c.in_pkts, c.out_pkts, c.in_bytes, c.out_bytes],
        exact,
    )
}

/// `ipvsadm -L -n --rate`: CPS, InPPS, OutPPS, InBPS, OutBPS (bytes/s).
pub fn format_rate(services: &[ServiceReport]) -> String {
    format_columns(
        services,
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS",
        |_: &BackendStats, r: &Rates| [r.conns, r.in_pkts, r.out_pkts, r.in_bytes, r.out_bytes],
        false,
    )
}

/// The five-number layouts (`--stats`, `--rate`): a 33-column name, then
/// ipvsadm's 9-column numbers, for each service and its backends.
fn format_columns(
    services: &[ServiceReport],
    title: &str,
    columns: impl Fn(&BackendStats, &Rates) -> [u64; 5],
    exact: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(s, "{title}");
    let _ = writeln!(s, "  -> RemoteAddress:Port");
    let row = |s: &mut String, name: String, values: [u64; 5]| {
        let _ = write!(s, "{name}");
        for v in values {
            s.push_str(&large_num(v, exact));
        }
        s.push('\n');
    };
    for svc in services {
        row(
            &mut s,
            format!("{:<33}", service_name(svc)),
            columns(&svc.stats, &svc.rates),
        );
        for b in &svc.backends {
            let name = format!("  -> {:<28}", real_server(b.address, b.port));
            row(&mut s, name, columns(&b.stats, &b.rates));
        }
    }
    s
}

/// `ipvsadm -L -n`: Forward is always Masq (the connection is made to the
/// backend itself, as if NATed); ActiveConn and InActConn are live.
pub fn format_list(services: &[ServiceReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(s, "Prot LocalAddress:Port Scheduler Flags");
    let _ = writeln!(
        s,
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
    );
    for svc in services {
        let _ = write!(s, "{} {}", service_name(svc), svc.scheduler);
        if let Some(secs) = svc.persistent {
            let _ = write!(s, " persistent {secs}");
        }
        s.push('\n');
        for b in &svc.backends {
            let _ = writeln!(
                s,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                real_server(b.address, b.port),
                "Masq",
                b.weight,
                b.active_conns,
                b.inactive_conns
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Vec<ServiceReport> {
        let c = |conns, in_pkts, out_pkts, in_bytes, out_bytes| BackendStats {
            conns,
            in_pkts,
            out_pkts,
            in_bytes,
            out_bytes,
        };
        vec![ServiceReport {
            name: "api".into(),
            vip: "172.50.0.37".parse().unwrap(),
            port: None,
            mark: 317,
            scheduler: "random",
            persistent: None,
            stats: c(44981, 231280, 218415, 19264401, 22763535),
            rates: Rates {
                conns: 12,
                in_pkts: 34,
                out_pkts: 56,
                in_bytes: 7800,
                out_bytes: 123_456_789,
            },
            backends: vec![
                BackendReport {
                    address: "172.50.0.40".parse().unwrap(),
                    port: None,
                    weight: 1,
                    active_conns: 2,
                    inactive_conns: 5,
                    stats: c(21936, 109838, 109631, 9246909, 11278325),
                    rates: Rates::default(),
                },
                BackendReport {
                    address: "172.50.0.41".parse().unwrap(),
                    port: None,
                    weight: 1,
                    active_conns: 0,
                    inactive_conns: 0,
                    stats: c(21937, 115545, 103936, 9544368, 10970396),
                    rates: Rates::default(),
                },
            ],
        }]
    }

    #[test]
    fn stats_match_the_seed_byte_for_byte() {
        // These rows are copied from `ipvsadm -L -n --stats` in the seed document.
        let expected = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
FWM  317                             44981   231280   218415 19264401 22763535
  -> 172.50.0.40:0                   21936   109838   109631  9246909 11278325
  -> 172.50.0.41:0                   21937   115545   103936  9544368 10970396
";
        assert_eq!(format_stats(&seed(), false), expected);
    }

    #[test]
    fn list_and_rate_layouts() {
        let list = format_list(&seed());
        assert!(list.contains("FWM  317 random\n"), "{list}");
        let mut sticky = seed();
        sticky[0].scheduler = "wrr";
        sticky[0].persistent = Some(300);
        let list = format_list(&sticky);
        assert!(list.contains("FWM  317 wrr persistent 300\n"), "{list}");
        assert!(
            list.contains(
                "  -> 172.50.0.40:0                Masq    1      2          5         \n"
            ),
            "{list}"
        );
        let rate = format_rate(&seed());
        assert!(rate.contains(
            "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS\n"
        ));
        assert!(
            rate.contains(
                "FWM  317                                12       34       56     7800  123456K\n"
            ),
            "{rate}"
        );
    }

    #[test]
    fn large_numbers_abbreviate_like_ipvsadm() {
        assert_eq!(large_num(99_999_999, false), " 99999999");
        assert_eq!(large_num(100_000_000, false), "  100000K");
        assert_eq!(large_num(1_500_000_000, false), "    1500M");
        assert_eq!(large_num(200_000_000_000, false), "     200G");
        assert_eq!(large_num(u64::MAX, false), "18446744T");
        assert_eq!(large_num(1_500_000_000, true), " 1500000000");
        assert_eq!(large_num(12, true), "       12");
    }
}
