//! The desired state: the services svclbd programs into the maps, and the
//! rules that make one valid.
//!
//! Nothing here reads text: [`crate::config`] turns a TOML file into these
//! types, [`crate::sync`] adds the services it discovers (DNS, Docker), and
//! [`crate::reconcile`] writes them into the maps. The `check_*` functions
//! state what a valid value is; every source checks with them, so the file,
//! DNS and Docker agree on it, and their messages name no place in a file
//! (the caller adds that).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use svclb_common::schedule::weighted_slots;
use svclb_common::{Scheduler, MAX_SLOTS_PER_SERVICE};

/// Longest service name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Most backends one service may have, from any source. A Swarm service
/// has one task per replica; far more than a DNS answer over TCP can carry
/// (about 4,000 addresses), and it keeps a hostile engine's answer from
/// costing unbounded memory and schedule time before it is refused.
pub const MAX_BACKENDS_PER_SERVICE: usize = 16_384;

/// Every service to program. Serializes back to the file format.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DesiredState {
    #[serde(rename = "service")]
    pub services: Vec<ServiceSpec>,
}

/// A config file: the services given in full, the services to discover
/// through DNS, and how to ask DNS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Services with their VIP and backends written out, in file order.
    pub services: Vec<ServiceSpec>,
    /// Services declared by name (`discover = "dns"`), in file order.
    pub discovered: Vec<DiscoveredSpec>,
    pub dns: DnsSettings,
}

impl Config {
    /// The services given in full, as a desired state of their own.
    pub fn static_state(&self) -> DesiredState {
        DesiredState {
            services: self.services.clone(),
        }
    }
}

/// A service whose VIP(s) and backends come from DNS: `<name>` answers the
/// VIP(s), `tasks.<name>` the backends (Docker Swarm's embedded DNS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredSpec {
    pub name: String,
    /// A fixed VIP; then only `tasks.<name>` is resolved.
    pub vip: Option<IpAddr>,
    /// Only with a fixed VIP. Discovered VIPs keep the mark they have in
    /// the maps, else get the lowest free one.
    pub mark: Option<u32>,
    pub scheduler: Scheduler,
    /// [`ServiceSpec::terminate_on_removal`] of the discovered services.
    pub terminate_on_removal: bool,
}

/// How svclbd asks DNS (the `[dns]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Empty: the system's resolvers (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Shortest time between two queries for a name, whatever the TTL.
    pub min_refresh: Duration,
    /// Longest time between two queries for a name, whatever the TTL.
    /// Docker answers with TTL 600 but changes its answers at once, so the
    /// default is short.
    pub max_refresh: Duration,
    /// How long a name that answers NXDOMAIN (or no address) keeps its last
    /// good addresses before the empty answer is applied.
    pub stale_grace: Duration,
    /// Per query, before the next nameserver or attempt.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            nameservers: Vec::new(),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(5),
            stale_grace: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    }
}

/// One service: VIP -> mark -> backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    /// Never IPv4-mapped: such addresses are normalized to IPv4.
    pub vip: IpAddr,
    /// The firewall mark; `None` lets svclbd choose. Never 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
    #[serde(serialize_with = "serialize_scheduler")]
    pub scheduler: Scheduler,
    pub backends: Vec<BackendSpec>,
    /// A per-port service (`port`, `protocol`): only this destination port
    /// and protocol of the VIP, the way a Kubernetes Service port matches.
    /// None: every port and protocol, like a Swarm FWM service.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub port: Option<ServicePort>,
    /// Seconds a client keeps its backend (IPVS persistence, kube-proxy
    /// ClientIP affinity); a client is a network namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<u32>,
    /// Only cgroups attached with one of these networks see the service
    /// (as a task sees only the services of the networks it joined).
    /// Empty: every attached cgroup.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// When a backend leaves, end the sockets svclb connected to it, so
    /// their clients fail over at once (TCP gets ECONNABORTED, a connected
    /// UDP socket an error on its next call). Off: they drain by themselves.
    pub terminate_on_removal: bool,
}

/// The port part of a per-port service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePort {
    pub port: u16,
    #[serde(serialize_with = "serialize_protocol")]
    pub protocol: u8,
}

fn serialize_protocol<S: serde::Serializer>(p: &u8, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(protocol_name(*p))
}

/// "tcp" or "udp".
pub fn protocol_name(p: u8) -> &'static str {
    if p == svclb_common::IPPROTO_UDP {
        "udp"
    } else {
        "tcp"
    }
}

/// Longest network name, in bytes.
pub const MAX_NETWORK_NAME_LEN: usize = svclb_common::NETWORK_NAME_LEN;

impl ServiceSpec {
    /// A plain FWM-style service: every port, no affinity, every network.
    pub fn new(
        name: impl Into<String>,
        vip: IpAddr,
        mark: Option<u32>,
        scheduler: Scheduler,
        backends: Vec<BackendSpec>,
    ) -> Self {
        ServiceSpec {
            name: name.into(),
            vip,
            mark,
            scheduler,
            backends,
            port: None,
            affinity: None,
            networks: Vec::new(),
            terminate_on_removal: true,
        }
    }
}

/// One backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BackendSpec {
    /// Same family as the service's VIP; never IPv4-mapped.
    #[serde(rename = "address")]
    pub addr: IpAddr,
    /// Destination port; `None` keeps the client's. Never `Some(0)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative share of new connections; 0 = quiescent.
    pub weight: u32,
}

fn serialize_scheduler<S: serde::Serializer>(s: &Scheduler, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.name())
}

/// Network names: like service names, at most 32 bytes.
pub fn check_network(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a network name cannot be empty".to_owned());
    }
    if name.len() > MAX_NETWORK_NAME_LEN {
        return Err(format!(
            "network name {name:?} is longer than {MAX_NETWORK_NAME_LEN} bytes"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "network name {name:?} has {c:?}; use letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// Service names: they become DNS names and metric labels.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the service name is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} bytes long, at most {MAX_NAME_LEN} are allowed (it becomes a DNS \
             name and a metric label)",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; a name may only use A-Z a-z 0-9 _ . - (it becomes a DNS \
             name and a metric label)"
        ));
    }
    Ok(())
}

/// A VIP must be an address a client can dial and svclb can take over.
pub(crate) fn check_vip(ip: IpAddr) -> Result<IpAddr, String> {
    if ip.is_unspecified() {
        Err(format!(
            "{ip} is the unspecified address and cannot be a VIP"
        ))
    } else if ip.is_multicast() {
        Err(format!("{ip} is a multicast address and cannot be a VIP"))
    } else if ip.is_loopback() {
        Err(format!(
            "{ip} is a loopback address: a loopback VIP would hijack this host's local traffic"
        ))
    } else if is_broadcast(ip) {
        Err(format!("{ip} is the broadcast address and cannot be a VIP"))
    } else {
        Ok(ip)
    }
}

// Connections can never be made to these, so a backend there is a typo.
pub(crate) fn check_backend(ip: IpAddr) -> Result<IpAddr, String> {
    if ip.is_unspecified() {
        Err(format!(
            "{ip} is the unspecified address and cannot be a backend"
        ))
    } else if ip.is_multicast() {
        Err(format!(
            "{ip} is a multicast address and cannot be a backend"
        ))
    } else if is_broadcast(ip) {
        Err(format!(
            "{ip} is the broadcast address and cannot be a backend"
        ))
    } else {
        Ok(ip)
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Mark 0 means "no mark" in the maps.
pub(crate) fn check_mark(mark: u32) -> Result<(), String> {
    if mark == 0 {
        return Err(
            "mark 0 is reserved (it means \"no mark\"); use a positive number, or \
                    omit `mark` to let svclbd choose"
                .to_owned(),
        );
    }
    Ok(())
}

/// Affinity in whole seconds: at least 1, at most `u32::MAX`.
pub(crate) fn check_affinity(d: Duration) -> Result<u32, String> {
    if d.as_secs() >= 1 && d.as_secs() <= u64::from(u32::MAX) {
        Ok(d.as_secs() as u32)
    } else {
        Err("affinity must be at least 1 second".to_owned())
    }
}

/// A task that DNS or the Docker engine names: a backend, and never a
/// loopback address (no Swarm task has one; it would turn a client's
/// connects back into its own container).
pub(crate) fn check_task(ip: IpAddr) -> Result<IpAddr, String> {
    let ip = check_backend(ip)?;
    if ip.is_loopback() {
        return Err(format!(
            "{ip} is a loopback address and cannot be a task: it would send the client's \
             connects to its own container"
        ));
    }
    Ok(ip)
}

/// A service as the Docker engine (or DNS) makes it: a VIP, and tasks
/// that are neither the VIP nor anything [`check_task`] refuses, at most
/// [`MAX_BACKENDS_PER_SERVICE`] of them.
pub(crate) fn check_discovered(spec: &ServiceSpec) -> Result<(), String> {
    check_vip(spec.vip).map_err(|e| format!("VIP: {e}"))?;
    check_backend_count(spec.backends.len())?;
    for b in &spec.backends {
        check_task(b.addr).map_err(|e| format!("task: {e}"))?;
        check_family(spec.vip, b.addr).map_err(|e| format!("task: {e}"))?;
        if b.addr == spec.vip {
            return Err(format!(
                "{} is both its VIP and a task: a VIP cannot also be a backend",
                b.addr
            ));
        }
    }
    Ok(())
}

/// At most [`MAX_BACKENDS_PER_SERVICE`] backends.
pub(crate) fn check_backend_count(count: usize) -> Result<(), String> {
    if count > MAX_BACKENDS_PER_SERVICE {
        return Err(format!(
            "{count} backends, more than the {MAX_BACKENDS_PER_SERVICE} a service may have"
        ));
    }
    Ok(())
}

/// A backend has the family of its service's VIP.
pub(crate) fn check_family(vip: IpAddr, addr: IpAddr) -> Result<(), String> {
    if vip.is_ipv4() == addr.is_ipv4() {
        return Ok(());
    }
    let (vip_family, addr_family) = match vip {
        IpAddr::V4(_) => ("IPv4", "IPv6"),
        IpAddr::V6(_) => ("IPv6", "IPv4"),
    };
    Err(format!(
        "{addr} is {addr_family} but the VIP {vip} is {vip_family}: an \
         {vip_family} VIP with {addr_family} backends is not supported"
    ))
}

/// The schedule must fit in one generation of slots. Weights are divided
/// by their GCD first, so 2:4 takes 3 slots, not 6.
pub(crate) fn check_weights(backends: &[BackendSpec]) -> Result<(), String> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    if weighted_slots(&weights, MAX_SLOTS_PER_SERVICE).is_none() {
        return Err(format!(
            "the weights need more than {MAX_SLOTS_PER_SERVICE} schedule slots once \
             divided by their greatest common divisor; use smaller weights"
        ));
    }
    Ok(())
}

/// DNS is asked no sooner than `min_refresh` and no later than `max_refresh`.
pub(crate) fn check_refresh(min_refresh: Duration, max_refresh: Duration) -> Result<(), String> {
    if min_refresh > max_refresh {
        return Err(format!(
            "min_refresh ({}) is longer than max_refresh ({})",
            humantime::format_duration(min_refresh),
            humantime::format_duration(max_refresh)
        ));
    }
    Ok(())
}

/// The rules every service of a desired state keeps, whatever its source:
/// what the file's validation checks with place names, DNS and Docker
/// check on their answers, and the planner relies on. Returns the first
/// rule broken, naming the service.
pub fn check_state(state: &DesiredState) -> Result<(), String> {
    let mut frontends = std::collections::HashSet::new();
    let mut marks = std::collections::HashSet::new();
    let mut vips: std::collections::HashMap<IpAddr, Vec<&ServiceSpec>> = Default::default();
    for s in &state.services {
        vips.entry(s.vip).or_default().push(s);
    }
    // Two services meet where a client can see both: on a shared network,
    // or when either has none (seen everywhere).
    let meet = |a: &ServiceSpec, b: &ServiceSpec| {
        a.networks.is_empty()
            || b.networks.is_empty()
            || a.networks.iter().any(|n| b.networks.contains(n))
    };
    for s in &state.services {
        let fail = |e: String| format!("service {:?} (VIP {}): {e}", s.name, s.vip);
        check_state_name(&s.name).map_err(fail)?;
        check_vip(s.vip).map_err(fail)?;
        if !frontends.insert((s.vip, s.port)) {
            return Err(fail(
                "another service has the same VIP (and port)".to_owned(),
            ));
        }
        if s.port.is_some_and(|p| p.port == 0) {
            return Err(fail("port 0".to_owned()));
        }
        if let Some(mark) = s.mark {
            check_mark(mark).map_err(fail)?;
            if !marks.insert(mark) {
                return Err(fail(format!("mark {mark} is another service's too")));
            }
        }
        for n in &s.networks {
            check_network(n).map_err(fail)?;
        }
        check_backend_count(s.backends.len()).map_err(fail)?;
        let mut seen = std::collections::HashSet::new();
        for b in &s.backends {
            check_backend(b.addr).map_err(fail)?;
            check_family(s.vip, b.addr).map_err(fail)?;
            if b.port == Some(0) {
                return Err(fail(format!("backend {} has port 0", b.addr)));
            }
            if !seen.insert((b.addr, b.port)) {
                return Err(fail(format!("backend {} is listed twice", b.addr)));
            }
            if let Some(t) = vips.get(&b.addr).into_iter().flatten().find(|t| meet(s, t)) {
                return Err(fail(format!(
                    "backend {} is the VIP of service {:?}",
                    b.addr, t.name
                )));
            }
        }
        check_weights(&s.backends).map_err(fail)?;
    }
    Ok(())
}

/// A name in the maps: a file's or DNS's service name, or Docker's
/// `<service>@<network>`.
fn check_state_name(name: &str) -> Result<(), String> {
    name.split('@').try_for_each(check_name)?;
    if name.matches('@').count() > 1 || name.len() > MAX_NAME_LEN {
        return Err(format!("{name:?} is not a service name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vip: &str, mark: Option<u32>, backends: &[&str]) -> ServiceSpec {
        let backends = backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.parse().unwrap(),
                port: None,
                weight: 1,
            })
            .collect();
        ServiceSpec::new(name, vip.parse().unwrap(), mark, Scheduler::Rr, backends)
    }

    fn refused(services: Vec<ServiceSpec>) -> String {
        check_state(&DesiredState { services }).unwrap_err()
    }

    #[test]
    fn check_state_names_what_is_wrong() {
        let ok = spec("api", "10.0.0.2", Some(300), &["10.0.0.3", "10.0.0.4"]);
        check_state(&DesiredState {
            services: vec![ok.clone(), spec("web@front", "10.0.0.5", None, &[])],
        })
        .unwrap();
        let e = refused(vec![ok.clone(), spec("db", "10.0.0.2", None, &[])]);
        assert!(e.contains("same VIP"), "{e}");
        let e = refused(vec![ok.clone(), spec("db", "10.0.0.9", Some(300), &[])]);
        assert!(e.contains("mark 300"), "{e}");
        let e = refused(vec![
            ok.clone(),
            spec("db", "10.0.0.9", None, &["10.0.0.2"]),
        ]);
        assert!(
            e.contains("backend 10.0.0.2 is the VIP of service \"api\""),
            "{e}"
        );
        let e = refused(vec![spec("db", "10.0.0.9", None, &["fd00::1"])]);
        assert!(e.contains("IPv6"), "{e}");
        let e = refused(vec![spec(
            "db",
            "10.0.0.9",
            None,
            &["10.0.0.1", "10.0.0.1"],
        )]);
        assert!(e.contains("listed twice"), "{e}");
        for vip in ["127.0.0.1", "224.0.0.1", "0.0.0.0", "::"] {
            let e = refused(vec![spec("db", vip, None, &[])]);
            assert!(e.contains(vip), "{e}");
        }
        for name in ["", "a b", "x@y@z", "@y", "a\n"] {
            assert!(check_state_name(name).is_err(), "{name:?}");
        }
        // Scoped services on different networks may reuse an address as
        // one's VIP and the other's task (Swarm's networks are separate).
        let mut a = spec("a@n1", "10.0.0.2", None, &[]);
        let mut b = spec("b@n2", "10.0.0.9", None, &["10.0.0.2"]);
        a.networks = vec!["n1".into()];
        b.networks = vec!["n2".into()];
        check_state(&DesiredState {
            services: vec![a.clone(), b.clone()],
        })
        .unwrap();
        b.networks.push("n1".into());
        assert!(refused(vec![a, b]).contains("is the VIP of"));
    }

    #[test]
    fn discovered_services_refuse_hostile_tasks() {
        let ok = spec("api", "10.0.0.2", None, &["10.0.0.3"]);
        check_discovered(&ok).unwrap();
        for (task, why) in [
            ("10.0.0.2", "both its VIP and a task"),
            ("127.0.0.1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("fd00::3", "IPv6"),
        ] {
            let e = check_discovered(&spec("api", "10.0.0.2", None, &[task])).unwrap_err();
            assert!(e.contains(why), "{task}: {e}");
        }
        let mut big = ok.clone();
        big.backends = (0..=MAX_BACKENDS_PER_SERVICE as u32)
            .map(|i| BackendSpec {
                addr: IpAddr::V4((0x0b00_0000 + i).into()),
                port: None,
                weight: 1,
            })
            .collect();
        let e = check_discovered(&big).unwrap_err();
        assert!(e.contains("16385 backends"), "{e}");
    }
}
