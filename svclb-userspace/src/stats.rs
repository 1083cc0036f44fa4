//! What `svclb-ctl` prints: the layouts of `ipvsadm -L -n` and
//! `ipvsadm -L -n --stats`, so that scripts written for ipvsadm parse it
//! unchanged, and the same figures as JSON.

use std::{fmt::Write as _, io, net::IpAddr};

use anyhow::Result;
use serde::Serialize;
use svclb_common::{words_addr, BackendInfo, BackendStats, RateState, Scheduler, ServiceValue};

use crate::{
    dataplane::{meta_port, Dataplane, ListingMaps, Wanted},
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

/// Reads every service with the backend figures `wanted` (the others are
/// left zero); services sorted by mark, each one's backends by address.
/// The maps are read concurrently, services and backends each sorted once
/// on their reading thread ([`Dataplane::listing_maps`]), and joined here.
pub fn collect(dp: &Dataplane, wanted: Wanted) -> Result<Vec<ServiceReport>> {
    let ListingMaps {
        metas,
        values,
        backends: order,
        figures,
    } = dp.listing_maps(wanted, backend_order)?;
    let mut values = values.into_iter().peekable();
    let mut next = order.iter().peekable();
    let mut out = Vec::with_capacity(metas.len());
    for (mark, meta) in metas {
        while values.next_if(|(m, _)| *m < mark).is_some() {}
        let value = values
            .next_if(|(m, _)| *m == mark)
            .map_or_else(ServiceValue::default, |(_, v)| v);
        // Backends of a service with no metadata are not listed.
        while next.next_if(|o| o.0 < mark).is_some() {}
        let mut total = BackendStats::default();
        let mut estimators = RateState::default();
        let mut list = Vec::new();
        while let Some(&&(_, v6, bits, port, id, weight)) = next.peek().filter(|o| o.0 == mark) {
            next.next();
            let address = if v6 {
                IpAddr::V6(bits.into())
            } else {
                IpAddr::V4((bits as u32).into())
            };
            let (stats, conns, rate) = (figures.stats(id), figures.conns(id), figures.rate(id));
            total.add(&stats);
            rates::add_to_service(&mut estimators, &rate);
            list.push(BackendReport {
                address,
                port: port.checked_sub(1).map(|p| p as u16),
                weight,
                active_conns: conns.active.max(0) as u64,
                inactive_conns: conns.inactive.max(0) as u64,
                stats,
                rates: rates::rates(&rate),
            });
        }
        out.push(ServiceReport {
            name: meta.name(),
            vip: meta.vip(),
            port: meta_port(&meta),
            mark,
            scheduler: Scheduler::from_u32(value.scheduler)
                .unwrap_or(Scheduler::DEFAULT)
                .name(),
            persistent: value.has_affinity().then_some(value.affinity_secs),
            stats: total,
            rates: rates::rates(&estimators),
            backends: list,
        });
    }
    Ok(out)
}

/// The backends by service, then address and port as `IpAddr` and
/// `Option<u16>` order them (IPv4 first; no port first), then id: what
/// sorting by (mark, id) and then each service's backends by (address,
/// port) gave. The weight rides along, so the join reads this alone, in
/// order: (mark, IPv6, address bits, port + 1 or 0, id, weight).
#[allow(clippy::type_complexity)]
fn backend_order(backends: Vec<(u32, BackendInfo)>) -> Vec<(u32, bool, u128, u32, u32, u32)> {
    let mut order: Vec<(u32, bool, u128, u32, u32, u32)> = backends
        .iter()
        .map(|(id, b)| {
            let (v6, bits) = match words_addr(b.addr) {
                IpAddr::V4(a) => (false, u128::from(u32::from(a))),
                IpAddr::V6(a) => (true, u128::from(a)),
            };
            let port = if b.port_be == 0 {
                0
            } else {
                u32::from(u16::from_be(b.port_be)) + 1
            };
            (b.mark, v6, bits, port, *id, b.weight)
        })
        .collect();
    order.sort_unstable();
    order
}

/// How long ago svclbd last sampled the rates (None: never).
pub fn rates_age(dp: &Dataplane) -> Result<Option<std::time::Duration>> {
    // An svclbd from before the sampling mark: its newest estimator.
    let newest = dp
        .last_sampled()
        .or_else(|| dp.rate_estimators().map(|(_, st)| st.sampled_ns).max());
    let now = rates::monotonic_ns();
    Ok(newest.map(|n| std::time::Duration::from_nanos(now.saturating_sub(n))))
}

/// ipvsadm's `print_largenum`: 9 columns, K/M/G/T past 10^8 unless exact.
pub fn large_num(n: u64, exact: bool) -> String {
    let mut s = String::new();
    write_large_num(&mut s, n, exact);
    s
}

/// [`large_num`], written into `s` (a listing writes hundreds of
/// thousands of them into one buffer).
fn write_large_num(s: &mut String, n: u64, exact: bool) {
    match (exact, n) {
        // Exact past 8 digits: the number with one blank before it.
        (true, 100_000_000..) => {
            s.push(' ');
            push_num(s, n, 0);
        }
        (true, _) | (false, 0..100_000_000) => push_num(s, n, 9),
        (false, 100_000_000..1_000_000_000) => push_scaled(s, n / 1_000, 'K'),
        (false, 1_000_000_000..100_000_000_000) => push_scaled(s, n / 1_000_000, 'M'),
        (false, 100_000_000_000..100_000_000_000_000) => push_scaled(s, n / 1_000_000_000, 'G'),
        (false, _) => push_scaled(s, n / 1_000_000_000_000, 'T'),
    }
}

fn push_scaled(s: &mut String, n: u64, unit: char) {
    push_num(s, n, 8);
    s.push(unit);
}

/// `n` right-aligned in `width` columns, as `{n:>width$}` writes it but
/// without the formatter's machinery (a listing writes a million numbers).
pub(crate) fn push_num(s: &mut String, n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let digits = &digits[at..];
    push_blanks(s, width.saturating_sub(digits.len()));
    s.push_str(std::str::from_utf8(digits).expect("ASCII digits"));
}

fn push_blanks(s: &mut String, n: usize) {
    const BLANKS: &str = "                                ";
    let mut left = n;
    while left > 0 {
        let k = left.min(BLANKS.len());
        s.push_str(&BLANKS[..k]);
        left -= k;
    }
}

/// An address as `Display` writes it, without the formatter for IPv4.
pub(crate) fn push_ip(s: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_num(s, u64::from(octet), 0);
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(s, "{a}");
        }
    }
}

/// `addr:port` (`[addr]:port` for IPv6) written into `s`, padded with
/// blanks to `width`.
fn write_real_server(s: &mut String, addr: IpAddr, port: Option<u16>, width: usize) {
    let start = s.len();
    match addr {
        IpAddr::V4(_) => push_ip(s, addr),
        IpAddr::V6(a) => {
            let _ = write!(s, "[{a}]");
        }
    }
    s.push(':');
    push_num(s, u64::from(port.unwrap_or(0)), 0);
    pad(s, start, width);
}

/// Blanks after what was written since `start`, up to `width` columns.
fn pad(s: &mut String, start: usize, width: usize) {
    push_blanks(s, width.saturating_sub(s.len() - start));
}

/// The first column of a service row: `FWM  317`, or for a per-port
/// service `TCP  172.50.0.37:80`, as ipvsadm names them.
fn write_service_name(s: &mut String, svc: &ServiceReport) {
    match svc.port {
        None => {
            s.push_str("FWM  ");
            push_num(s, u64::from(svc.mark), 0);
        }
        Some(p) => {
            // Protocol names are ASCII: no allocation for the upper case.
            for c in protocol_name(p.protocol).chars() {
                s.push(c.to_ascii_uppercase());
            }
            s.push_str("  ");
            write_real_server(s, svc.vip, Some(p.port), 0);
        }
    }
}

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)";

/// Takes what a listing has written so far: writes it out and clears it.
type Flush<'a> = &'a mut dyn FnMut(&mut String) -> io::Result<()>;

/// A listing is handed to its writer in pieces of about this size, so that
/// it is never whole in memory (24 MB at 100,000 services, and a page
/// fault every 4 KiB of it).
const PIECE: usize = 1 << 16;

/// A listing written to `out` piece by piece.
fn written(
    out: &mut dyn io::Write,
    write: impl FnOnce(&mut String, Flush) -> io::Result<()>,
) -> io::Result<()> {
    let mut s = String::with_capacity(2 * PIECE);
    write(&mut s, &mut |s: &mut String| {
        out.write_all(s.as_bytes())?;
        s.clear();
        Ok(())
    })
}

/// `ipvsadm -L -n --stats`, written to `out`.
pub fn write_stats(
    services: &[ServiceReport],
    exact: bool,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    written(out, |s, flush| stats_into(s, services, exact, flush))
}

fn stats_into(
    s: &mut String,
    services: &[ServiceReport],
    exact: bool,
    flush: Flush,
) -> io::Result<()> {
    columns_into(
        s,
        services,
        "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes",
        |c: &BackendStats, _: &Rates| [c.conns, c.in_pkts, c.out_pkts, c.in_bytes, c.out_bytes],
        exact,
        flush,
    )
}

/// `ipvsadm -L -n --rate` (CPS, InPPS, OutPPS, InBPS, OutBPS in bytes/s),
/// written to `out`.
pub fn write_rate(services: &[ServiceReport], out: &mut dyn io::Write) -> io::Result<()> {
    written(out, |s, flush| rate_into(s, services, flush))
}

fn rate_into(s: &mut String, services: &[ServiceReport], flush: Flush) -> io::Result<()> {
    columns_into(
        s,
        services,
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS",
        |_: &BackendStats, r: &Rates| [r.conns, r.in_pkts, r.out_pkts, r.in_bytes, r.out_bytes],
        false,
        flush,
    )
}

/// The five-number layouts (`--stats`, `--rate`): a 33-column name, then
/// ipvsadm's 9-column numbers, for each service and its backends.
fn columns_into(
    s: &mut String,
    services: &[ServiceReport],
    title: &str,
    columns: impl Fn(&BackendStats, &Rates) -> [u64; 5],
    exact: bool,
    flush: Flush,
) -> io::Result<()> {
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(s, "{title}");
    let _ = writeln!(s, "  -> RemoteAddress:Port");
    let numbers = |s: &mut String, values: [u64; 5]| {
        for v in values {
            write_large_num(s, v, exact);
        }
        s.push('\n');
    };
    for svc in services {
        let start = s.len();
        write_service_name(s, svc);
        pad(s, start, 33);
        numbers(s, columns(&svc.stats, &svc.rates));
        for b in &svc.backends {
            s.push_str("  -> ");
            write_real_server(s, b.address, b.port, 28);
            numbers(s, columns(&b.stats, &b.rates));
        }
        if s.len() >= PIECE {
            flush(s)?;
        }
    }
    flush(s)
}

/// `ipvsadm -L -n`, written to `out`: Forward is always Masq (the
/// connection is made to the backend itself, as if NATed); ActiveConn and
/// InActConn are live.
pub fn write_list(services: &[ServiceReport], out: &mut dyn io::Write) -> io::Result<()> {
    written(out, |s, flush| list_into(s, services, flush))
}

fn list_into(s: &mut String, services: &[ServiceReport], flush: Flush) -> io::Result<()> {
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(s, "Prot LocalAddress:Port Scheduler Flags");
    let _ = writeln!(
        s,
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
    );
    for svc in services {
        write_service_name(s, svc);
        s.push(' ');
        s.push_str(svc.scheduler);
        if let Some(secs) = svc.persistent {
            s.push_str(" persistent ");
            push_num(s, u64::from(secs), 0);
        }
        s.push('\n');
        for b in &svc.backends {
            s.push_str("  -> ");
            write_real_server(s, b.address, b.port, 28);
            s.push_str(" Masq    ");
            for (v, width) in [
                (u64::from(b.weight), 6),
                (b.active_conns, 10),
                (b.inactive_conns, 10),
            ] {
                let start = s.len();
                push_num(s, v, 0);
                pad(s, start, width);
                s.push(' ');
            }
            s.pop();
            s.push('\n');
        }
        if s.len() >= PIECE {
            flush(s)?;
        }
    }
    flush(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `write_*` listing writes, as text.
    fn text(write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        write(&mut out).expect("writing into memory");
        String::from_utf8(out).expect("a listing is UTF-8")
    }

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
        assert_eq!(text(|out| write_stats(&seed(), false, out)), expected);
    }

    #[test]
    fn list_and_rate_layouts() {
        let list = text(|out| write_list(&seed(), out));
        assert!(list.contains("FWM  317 random\n"), "{list}");
        let mut sticky = seed();
        sticky[0].scheduler = "wrr";
        sticky[0].persistent = Some(300);
        let list = text(|out| write_list(&sticky, out));
        assert!(list.contains("FWM  317 wrr persistent 300\n"), "{list}");
        assert!(
            list.contains(
                "  -> 172.50.0.40:0                Masq    1      2          5         \n"
            ),
            "{list}"
        );
        let rate = text(|out| write_rate(&seed(), out));
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
