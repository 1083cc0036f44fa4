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
