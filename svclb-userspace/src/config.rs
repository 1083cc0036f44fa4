//! The desired state: the services that svclbd applies, read from a TOML file.
//!
//! Each `[[service]]` describes one service as Docker Swarm programs it with
//! iptables and IPVS: a virtual IP, the firewall mark that the VIP maps to
//! (the `FWM` number that `ipvsadm -Ln` and `svclb-ctl` show), a scheduler,
//! and the backends (tasks) that connections to the VIP are spread over.
//!
//! ```toml
//! [[service]]
//! name = "api"
//! vip = "172.50.0.37"
//! mark = 0x13d            # optional: svclbd picks one when absent
//! scheduler = "rr"        # optional, default "rr" (Swarm's)
//! backends = ["172.50.0.40", "172.50.0.41"]
//!
//! [[service]]
//! name = "db"
//! vip = "172.50.0.20"
//! backends = [ { address = "172.50.0.21", weight = 2 }, "172.50.0.22" ]
//! ```
//!
//! A backend is either an IP address string or a table with the keys
//! `address` (required), `weight` (default 1; 0 keeps the backend listed but
//! gives it no new connections, like a quiescent IPVS real server) and `port`
//! (absent keeps the client's destination port, like `-> 172.50.0.40:0`).
//! `backends` may be omitted or empty: the service then refuses connections,
//! as a Swarm service scaled to zero does.
//!
//! A service may instead be declared by name and discovered through DNS,
//! the way a Swarm task sees it through Docker's embedded resolver:
//!
//! ```toml
//! [[service]]
//! name = "web"
//! discover = "dns"        # VIP(s) from `web`, backends from `tasks.web`
//!
//! [[service]]
//! name = "db"
//! discover = "dns"
//! vip = "172.50.0.20"     # a fixed VIP: only `tasks.db` is resolved
//!
//! [dns]                   # optional; every key has a default
//! nameservers = ["127.0.0.11"]   # "IP" or "IP:PORT"; default: /etc/resolv.conf's
//! min_refresh = "1s"      # re-resolve no sooner than this after an answer...
//! max_refresh = "5s"      # ...and no later than this, whatever the TTL says
//! stale_grace = "60s"     # how long NXDOMAIN/no records keeps the last good set
//! timeout = "2s"          # per query
//! ```
//!
//! A discovered service takes no `backends` (they come from DNS), and a
//! `mark` only with a fixed `vip`. Durations are whole seconds (`5`) or
//! strings with units (`"500ms"`, `"2m"`). What svclbd does with the
//! answers is in [`crate::sync::dns`].
//!
//! No other keys are accepted, at any level. An empty file is valid and
//! means zero services.
//!
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is taken as the IPv4
//! address everywhere, because the maps store IPv4 that way and a
//! dual-stack socket dials it that way.
//!
//! Errors name the file, the 1-based line and column, and the field, e.g.
//! `svclb.toml:7:7: service[1].vip: "172.50.0.x" is not an IP address`.
//! Indices in field paths count from 0. When a file has several errors, the
//! one that comes first in the file is reported.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use svclb_common::schedule::weighted_slots;
use svclb_common::{Scheduler, MAX_SLOTS_PER_SERVICE};
use toml::Spanned;

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

/// Why a config file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name (or whatever the caller passed as origin).
    pub origin: String,
    /// 1-based; `None` when the error is not about a place in the file.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// Path of the offending field, e.g. `service[1].backends[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    parse_bytes(&read_file(path, &origin)?, &origin)
}

/// A config file's bytes, or the error that names it.
pub fn read_file(path: &Path, origin: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::of_whole_file(origin, format!("cannot read the file: {e}")))
}

/// Parses and validates a config file's bytes, which must be UTF-8.
pub fn parse_bytes(bytes: &[u8], origin: &str) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ConfigError::of_whole_file(origin, format!("the file is not UTF-8: {e}")))?;
    parse_str(text, origin)
}

impl ConfigError {
    /// An error about the file as a whole, not a place in it.
    fn of_whole_file(origin: &str, message: String) -> ConfigError {
        ConfigError {
            origin: origin.to_string(),
            line: None,
            column: None,
            field: None,
            message,
        }
    }
}

/// Parses and validates config text; `origin` names it in error messages.
pub fn parse_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let locate = |problem: Problem| {
        let (line, column) = match problem.span {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError {
            origin: origin.to_owned(),
            line,
            column,
            field: problem.field,
            message: problem.message,
        }
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let span = e.span();
        locate(Problem {
            field: span.as_ref().and_then(|s| field_at(text, s.start)),
            span,
            message: e.message().to_owned(),
        })
    })?;
    validate(raw, text).map_err(locate)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, column)
}

// ---- Field paths for errors that toml reports. ----

/// Any TOML document, keeping the span of every key and value, so that an
/// error position from toml can be named as a field path.
enum Node {
    Table(Vec<(Spanned<String>, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Node::Table(entries))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// The path of the innermost key or value at byte `offset`, e.g.
/// `service[0].backends[1].wieght`; `None` if the text is not valid TOML.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let root: Node = toml::from_str(text).ok()?;
    let mut path = String::new();
    let mut node = &root;
    loop {
        let next = match node {
            Node::Table(entries) => entries.iter().find_map(|(key, value)| {
                let hit = key.span().contains(&offset) || value.span().contains(&offset);
                hit.then(|| {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key.get_ref());
                    value.get_ref()
                })
            }),
            Node::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                item.span().contains(&offset).then(|| {
                    path.push_str(&format!("[{i}]"));
                    item.get_ref()
                })
            }),
            Node::Leaf => None,
        };
        match next {
            Some(inner) => node = inner,
            None => break,
        }
    }
    (!path.is_empty()).then_some(path)
}

// ---- The file as written, with spans for the values that get checked. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    dns: Option<RawDns>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Option<Spanned<String>>,
    mark: Option<Spanned<u32>>,
    scheduler: Option<Spanned<String>>,
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    discover: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    protocol: Option<Spanned<String>>,
    affinity: Option<Spanned<RawDuration>>,
    networks: Option<Spanned<Vec<Spanned<String>>>>,
    terminate_on_removal: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    nameservers: Option<Vec<Spanned<String>>>,
    min_refresh: Option<Spanned<RawDuration>>,
    max_refresh: Option<Spanned<RawDuration>>,
    stale_grace: Option<Spanned<RawDuration>>,
    timeout: Option<Spanned<RawDuration>>,
}

/// Whole seconds, or a string with units ("500ms", "2m").
enum RawDuration {
    Secs(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl<'de> Visitor<'de> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration: whole seconds (5) or a string with units (\"500ms\", \"2m\")",
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Secs(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Secs(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

enum RawBackend {
    Address(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: Spanned<String>,
    weight: Option<u32>,
    port: Option<Spanned<u16>>,
}

// A string or a table. Hand-written rather than `#[serde(untagged)]`, which
// would replace toml's precise errors (unknown key, wrong type) with "data
// did not match any variant".
impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an IP address string or a table { address = \"IP\", weight = N, port = N }",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Address(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                let table =
                    RawBackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBackend::Table(table))
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}

// ---- Validation. ----

/// An error before it is given a line and column.
struct Problem {
    span: Option<Range<usize>>,
    field: Option<String>,
    message: String,
}

/// Collects problems; the earliest in the file wins.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, span: Range<usize>, field: String, message: String) {
        self.0.push(Problem {
            span: Some(span),
            field: Some(field),
            message,
        });
    }

    fn first(self) -> Option<Problem> {
        // Checks run service by service, then across services, so sort by
        // position to report what comes first in the file. The sort is stable:
        // two problems at one place keep the order of the checks.
        let mut all = self.0;
        all.sort_by_key(|p| p.span.as_ref().map_or(0, |s| s.start));
        all.into_iter().next()
    }
}

fn validate(raw: RawFile, text: &str) -> Result<Config, Problem> {
    // "line N" of an earlier occurrence, for "already used" messages.
    let line = |span: &Range<usize>| format!("line {}", line_column(text, span.start).0);
    let mut problems = Problems::default();
    let mut services = Vec::with_capacity(raw.service.len());
    let mut discovered = Vec::new();
    // `service[i] "name"`, to refer to another service in messages.
    let mut labels: Vec<String> = Vec::with_capacity(raw.service.len());
    // Keyed by lowercase name: names become DNS names, which ignore case.
    let mut names: HashMap<String, (usize, Range<usize>)> = HashMap::new();
    // Every VIP, for the "VIP that is also a backend" check.
    let mut vips: HashMap<IpAddr, (usize, Range<usize>)> = HashMap::new();
    // A VIP may carry one all-ports service and per-port ones, once each.
    let mut frontends: HashMap<(IpAddr, Option<ServicePort>), (usize, Range<usize>)> =
        HashMap::new();
    let mut marks: HashMap<u32, (usize, Range<usize>)> = HashMap::new();
    // Every backend address and where it is written, for the VIP check.
    let mut backend_refs: Vec<(IpAddr, String, Range<usize>)> = Vec::new();

    for (i, svc) in raw.service.into_iter().enumerate() {
        let at = |key: &str| format!("service[{i}].{key}");
        let svc_span = svc.span();
        let svc = svc.into_inner();

        // `discover = "dns"`: the VIP (unless given) and the backends come
        // from DNS. An unknown value still counts as discovery, so that the
        // error reported is about `discover`, not about a missing `vip`.
        let discover = svc.discover.is_some();
        if let Some(d) = &svc.discover {
            if d.get_ref() != "dns" {
                problems.add(
                    d.span(),
                    at("discover"),
                    format!("unknown discovery {:?}; accepted: \"dns\"", d.get_ref()),
                );
            }
        }

        let name_span = svc.name.span();
        let name = svc.name.into_inner();
        labels.push(format!("service[{i}] {name:?}"));
        if let Err(message) = check_name(&name) {
            problems.add(name_span, at("name"), message);
        } else if let Some((other, other_span)) = names.get(&name.to_ascii_lowercase()) {
            problems.add(
                name_span,
                at("name"),
                format!(
                    "{name:?} is already the name of {} ({}); names must be unique, ignoring \
                     case (they become DNS names)",
                    labels[*other],
                    line(other_span)
                ),
            );
        } else {
            names.insert(name.to_ascii_lowercase(), (i, name_span));
        }

        let vip = match &svc.vip {
            None => {
                if !discover {
                    problems.add(
                        svc_span.clone(),
                        format!("service[{i}]"),
                        "missing field `vip`: give the service's virtual IP, or \
                         `discover = \"dns\"` to resolve it (and its backends) from DNS"
                            .to_owned(),
                    );
                }
                None
            }
            Some(v) => match parse_ip(v.get_ref()).and_then(check_vip) {
                Ok(vip) => Some((vip, v.span())),
                Err(message) => {
                    problems.add(v.span(), at("vip"), message);
                    None
                }
            },
        };
        let port = match (&svc.port, &svc.protocol) {
            (None, None) => None,
            (None, Some(p)) => {
                problems.add(
                    p.span(),
                    at("protocol"),
                    "`protocol` needs `port`: a service without a port takes every port and \
                     protocol"
                        .to_owned(),
                );
                None
            }
            (Some(port), protocol) => {
                let proto = match protocol.as_ref().map(|p| p.get_ref().as_str()) {
                    None | Some("tcp") => Some(svclb_common::IPPROTO_TCP),
                    Some("udp") => Some(svclb_common::IPPROTO_UDP),
                    Some(other) => {
                        let span = protocol.as_ref().map(|p| p.span()).unwrap_or_default();
                        problems.add(
                            span,
                            at("protocol"),
                            format!("unknown protocol {other:?}; accepted: \"tcp\", \"udp\""),
                        );
                        None
                    }
                };
                if *port.get_ref() == 0 {
                    problems.add(
                        port.span(),
                        at("port"),
                        "port 0 is invalid; omit `port` for a service of every port".to_owned(),
                    );
                    None
                } else if discover {
                    problems.add(port.span(), at("port"), "a discovered service takes every port; `port` needs a service with its `vip` and `backends` written out".to_owned());
                    None
                } else {
                    proto.map(|protocol| ServicePort {
                        port: *port.get_ref(),
                        protocol,
                    })
                }
            }
        };
        if let Some((vip, vip_span)) = vip.clone() {
            vips.entry(vip).or_insert((i, vip_span.clone()));
            if let Some((other, other_span)) = frontends.get(&(vip, port)) {
                let what = match port {
                    Some(p) => format!("{vip} {}/{}", p.port, protocol_name(p.protocol)),
                    None => vip.to_string(),
                };
                problems.add(
                    vip_span,
                    at("vip"),
                    format!(
                        "{what} is already the VIP of {} ({})",
                        labels[*other],
                        line(other_span)
                    ),
                );
            } else {
                frontends.insert((vip, port), (i, vip_span));
            }
        }
        // Clients fail over at once unless the service asks to drain.
        let terminate_on_removal = svc.terminate_on_removal.unwrap_or(true);
        let affinity = match &svc.affinity {
            None => None,
            Some(a) => match parse_duration(a.get_ref()) {
                Ok(d) if d.as_secs() >= 1 && d.as_secs() <= u64::from(u32::MAX) => {
                    Some(d.as_secs() as u32)
                }
                Ok(_) => {
                    problems.add(
                        a.span(),
                        at("affinity"),
                        "affinity must be at least 1 second".to_owned(),
                    );
                    None
                }
                Err(message) => {
                    problems.add(a.span(), at("affinity"), message);
                    None
                }
            },
        };
        let mut networks: Vec<String> = Vec::new();
        if let Some(list) = &svc.networks {
            for (k, n) in list.get_ref().iter().enumerate() {
                let name = n.get_ref();
                if let Err(message) = check_network(name) {
                    problems.add(n.span(), at(&format!("networks[{k}]")), message);
                } else if !networks.contains(name) {
                    networks.push(name.clone());
                }
            }
        }
        let vip = vip.map(|(vip, _)| vip);

        let mark = svc.mark.map(|m| (m.span(), m.into_inner()));
        if let Some((span, mark)) = &mark {
            if discover && svc.vip.is_none() {
                problems.add(
                    span.clone(),
                    at("mark"),
                    "a discovered VIP keeps the mark it has in the maps or gets a free one; \
                     `mark` needs a fixed `vip`"
                        .to_owned(),
                );
            } else if *mark == 0 {
                problems.add(
                    span.clone(),
                    at("mark"),
                    "mark 0 is reserved (it means \"no mark\"); use a positive number, or \
                     omit `mark` to let svclbd choose"
                        .to_owned(),
                );
            } else if let Some((other, other_span)) = marks.get(mark) {
                problems.add(
                    span.clone(),
                    at("mark"),
                    format!(
                        "mark {mark:#x} ({mark}) is already used by {} ({})",
                        labels[*other],
                        line(other_span)
                    ),
                );
            } else {
                marks.insert(*mark, (i, span.clone()));
            }
        }

        let scheduler = match svc.scheduler {
            None => Some(Scheduler::DEFAULT),
            Some(s) => {
                let found = Scheduler::from_name(s.get_ref());
                if found.is_none() {
                    problems.add(
                        s.span(),
                        at("scheduler"),
                        format!(
                            "unknown scheduler {:?}; accepted: {}",
                            s.get_ref(),
                            Scheduler::NAMES.join(", ")
                        ),
                    );
                }
                found
            }
        };

        let (backends_span, raw_backends) = match svc.backends {
            Some(b) => (Some(b.span()), b.into_inner()),
            None => (None, Vec::new()),
        };
        if let (true, Some(span)) = (discover, &backends_span) {
            problems.add(
                span.clone(),
                at("backends"),
                format!(
                    "a discovered service takes its backends from DNS (tasks.{name}); remove \
                     `backends`, or `discover` to list them here"
                ),
            );
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(raw_backends.len());
        let mut seen: HashMap<(IpAddr, Option<u16>), (usize, Range<usize>)> = HashMap::new();
        for (j, b) in raw_backends.into_iter().enumerate() {
            let whole_span = b.span();
            // A string backend is its own address; a table has `address`.
            let (addr_field, addr_span, addr_text, weight, port) = match b.into_inner() {
                RawBackend::Address(text) => (format!("backends[{j}]"), whole_span, text, 1, None),
                RawBackend::Table(t) => (
                    format!("backends[{j}].address"),
                    t.address.span(),
                    t.address.into_inner(),
                    t.weight.unwrap_or(1),
                    t.port,
                ),
            };
            let addr = match parse_ip(&addr_text).and_then(check_backend) {
                Ok(addr) => addr,
                Err(message) => {
                    problems.add(addr_span, at(&addr_field), message);
                    continue;
                }
            };
            if let Some(vip) = vip {
                if vip.is_ipv4() != addr.is_ipv4() {
                    let (vip_family, addr_family) = match vip {
                        IpAddr::V4(_) => ("IPv4", "IPv6"),
                        IpAddr::V6(_) => ("IPv6", "IPv4"),
                    };
                    problems.add(
                        addr_span.clone(),
                        at(&addr_field),
                        format!(
                            "{addr} is {addr_family} but the VIP {vip} is {vip_family}: an \
                             {vip_family} VIP with {addr_family} backends is not supported"
                        ),
                    );
                }
            }
            if let Some(p) = &port {
                if *p.get_ref() == 0 {
                    problems.add(
                        p.span(),
                        at(&format!("backends[{j}].port")),
                        "port 0 is invalid; omit `port` to keep the client's destination port"
                            .to_owned(),
                    );
                }
            }
            let port = port.map(Spanned::into_inner);
            if let Some((other, other_span)) = seen.get(&(addr, port)) {
                let shown = match port {
                    Some(p) => SocketAddr::new(addr, p).to_string(),
                    None => addr.to_string(),
                };
                problems.add(
                    addr_span.clone(),
                    at(&addr_field),
                    format!(
                        "backend {shown} is listed twice in this service (also backends[{other}], \
                         {})",
                        line(other_span)
                    ),
                );
            } else {
                seen.insert((addr, port), (j, addr_span.clone()));
            }
            backend_refs.push((addr, at(&addr_field), addr_span));
            backends.push(BackendSpec { addr, port, weight });
        }

        // The schedule must fit in one generation of slots. Weights are
        // divided by their GCD first, so 2:4 takes 3 slots, not 6.
        if let Some(span) = backends_span {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            if weighted_slots(&weights, MAX_SLOTS_PER_SERVICE).is_none() {
                problems.add(
                    span,
                    at("backends"),
                    format!(
                        "the weights need more than {MAX_SLOTS_PER_SERVICE} schedule slots once \
                         divided by their greatest common divisor; use smaller weights"
                    ),
                );
            }
        }

        // A service with a problem is dropped; the problem is reported below.
        if discover {
            if let Some(scheduler) = scheduler {
                discovered.push(DiscoveredSpec {
                    name,
                    vip,
                    mark: mark.map(|(_, m)| m),
                    scheduler,
                    terminate_on_removal,
                });
            }
        } else if let (Some(vip), Some(scheduler)) = (vip, scheduler) {
            services.push(ServiceSpec {
                name,
                vip,
                mark: mark.map(|(_, m)| m),
                scheduler,
                backends,
                port,
                affinity,
                networks,
                terminate_on_removal,
            });
        }
    }

    // A VIP that is also a backend, of any service, would send the traffic
    // meant for the backend back into the balancer.
    for (addr, field, span) in backend_refs {
        if let Some((svc, vip_span)) = vips.get(&addr) {
            problems.add(
                span,
                field,
                format!(
                    "{addr} is the VIP of {} ({}); a VIP cannot also be a backend",
                    labels[*svc],
                    line(vip_span)
                ),
            );
        }
    }

    let dns = validate_dns(raw.dns, &mut problems);

    match problems.first() {
        Some(problem) => Err(problem),
        None => Ok(Config {
            services,
            discovered,
            dns,
        }),
    }
}

fn validate_dns(raw: Option<RawDns>, problems: &mut Problems) -> DnsSettings {
    let mut dns = DnsSettings::default();
    let Some(raw) = raw else {
        return dns;
    };
    for (k, ns) in raw.nameservers.unwrap_or_default().into_iter().enumerate() {
        match parse_nameserver(ns.get_ref()) {
            Ok(addr) => dns.nameservers.push(addr),
            Err(message) => problems.add(ns.span(), format!("dns.nameservers[{k}]"), message),
        }
    }
    let mut duration = |value: Option<Spanned<RawDuration>>, key: &str, default: Duration| {
        let Some(value) = value else {
            return (default, None);
        };
        let span = value.span();
        match parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                problems.add(
                    span.clone(),
                    format!("dns.{key}"),
                    "must be longer than zero".to_owned(),
                );
                (default, Some(span))
            }
            Ok(d) => (d, Some(span)),
            Err(message) => {
                problems.add(span.clone(), format!("dns.{key}"), message);
                (default, Some(span))
            }
        }
    };
    let (min_refresh, min_span) = duration(raw.min_refresh, "min_refresh", dns.min_refresh);
    let (max_refresh, max_span) = duration(raw.max_refresh, "max_refresh", dns.max_refresh);
    dns.stale_grace = duration(raw.stale_grace, "stale_grace", dns.stale_grace).0;
    dns.timeout = duration(raw.timeout, "timeout", dns.timeout).0;
    if min_refresh > max_refresh {
        let (span, key) = match (min_span, max_span) {
            (Some(s), _) => (s, "min_refresh"),
            (None, Some(s)) => (s, "max_refresh"),
            (None, None) => (0..0, "min_refresh"),
        };
        problems.add(
            span,
            format!("dns.{key}"),
            format!(
                "min_refresh ({}) is longer than max_refresh ({})",
                humantime::format_duration(min_refresh),
                humantime::format_duration(max_refresh)
            ),
        );
    }
    dns.min_refresh = min_refresh;
    dns.max_refresh = max_refresh;
    dns
}

/// "IP" (port 53) or "IP:PORT" ("[IPv6]:PORT").
fn parse_nameserver(text: &str) -> Result<SocketAddr, String> {
    let addr = match text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => {
                return Err(format!(
                    "{text:?} is not a nameserver address (\"IP\" or \"IP:PORT\")"
                ))
            }
        },
    };
    if addr.port() == 0 {
        return Err(format!("{text:?}: port 0 is invalid"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(format!("{text:?} cannot be a nameserver"));
    }
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    match raw {
        RawDuration::Secs(s) => u64::try_from(*s)
            .map(Duration::from_secs)
            .map_err(|_| format!("{s} is negative; a duration is whole seconds or \"500ms\"")),
        RawDuration::Text(t) => humantime::parse_duration(t)
            .map_err(|e| format!("{t:?} is not a duration ({e}); write e.g. 5, \"500ms\", \"2m\"")),
    }
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

/// Parses an address, turning `::ffff:a.b.c.d` into `a.b.c.d`.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("{text:?} is not an IP address"))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn backend(addr: IpAddr) -> BackendSpec {
        BackendSpec {
            addr,
            port: None,
            weight: 1,
        }
    }

    fn parse(text: &str) -> DesiredState {
        parse_config(text).static_state()
    }

    fn parse_config(text: &str) -> Config {
        parse_str(text, "svclb.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Parses `text`, expecting an error at `line` on `field` whose text
    /// contains `needle`; returns it for further checks.
    #[track_caller]
    fn rejects(text: &str, line: usize, field: &str, needle: &str) -> ConfigError {
        let e = parse_str(text, "svclb.toml").expect_err("config should be rejected");
        let shown = e.to_string();
        assert_eq!(e.origin, "svclb.toml", "{shown}");
        assert_eq!(e.line, Some(line), "{shown}");
        assert_eq!(e.field.as_deref(), Some(field), "{shown}");
        assert!(shown.contains(needle), "{shown:?} lacks {needle:?}");
        assert!(shown.starts_with(&format!("svclb.toml:{line}:")), "{shown}");
        e
    }

    /// A valid service, to put before or after the one under test.
    const API: &str = r#"
[[service]]
name = "api"
vip = "172.50.0.37"
backends = ["172.50.0.40"]
"#;

    #[test]
    fn seed_scenario_parses() {
        let state = parse(
            r#"
# The three services of the seed stack, as ipvsadm -Ln shows them.
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
scheduler = "random"
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = ["172.50.0.21"]

[[service]]
name = "cache"
vip = "172.50.0.18"
mark = 0x13b
backends = [{ address = "172.50.0.34" }]
"#,
        );
        let expected = DesiredState {
            services: vec![
                ServiceSpec::new(
                    "api",
                    v4(172, 50, 0, 37),
                    Some(317),
                    Scheduler::Random,
                    vec![backend(v4(172, 50, 0, 40)), backend(v4(172, 50, 0, 41))],
                ),
                ServiceSpec::new(
                    "db",
                    v4(172, 50, 0, 20),
                    Some(0x128),
                    Scheduler::Rr,
                    vec![backend(v4(172, 50, 0, 21))],
                ),
                ServiceSpec::new(
                    "cache",
                    v4(172, 50, 0, 18),
                    Some(0x13b),
                    Scheduler::Rr,
                    vec![backend(v4(172, 50, 0, 34))],
                ),
            ],
        };
        assert_eq!(state, expected);
    }

    #[test]
    fn per_port_affinity_and_networks() {
        let state = parse(
            "[[service]]\nname = \"web\"\nvip = \"172.50.0.37\"\nbackends = [\"172.50.0.40\"]\n\n\
             [[service]]\nname = \"web-http\"\nvip = \"172.50.0.37\"\nport = 80\n\
             backends = [{ address = \"172.50.0.41\", port = 8080 }]\naffinity = \"5m\"\n\
             networks = [\"front\", \"front\", \"back\"]\n\n\
             [[service]]\nname = \"dns\"\nvip = \"172.50.0.37\"\nport = 53\nprotocol = \"udp\"\n",
        );
        assert_eq!(state.services[0].port, None);
        assert_eq!(
            state.services[1].port,
            Some(ServicePort {
                port: 80,
                protocol: svclb_common::IPPROTO_TCP
            })
        );
        assert_eq!(state.services[1].affinity, Some(300));
        assert_eq!(state.services[1].networks, vec!["front", "back"]);
        assert_eq!(
            state.services[2].port,
            Some(ServicePort {
                port: 53,
                protocol: svclb_common::IPPROTO_UDP
            })
        );
    }

    #[test]
    fn bad_ports_protocols_and_networks() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nprotocol = \"udp\"\n",
            4,
            "service[0].protocol",
            "`protocol` needs `port`",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"sctp\"\n",
            5,
            "service[0].protocol",
            "unknown protocol \"sctp\"",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 80\n\
             [[service]]\nname = \"b\"\nvip = \"10.0.0.1\"\nport = 80\n",
            7,
            "service[1].vip",
            "10.0.0.1 80/tcp is already the VIP of service[0]",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nnetworks = [\"a b\"]\n",
            4,
            "service[0].networks[0]",
            "network name \"a b\" has ' '",
        );
    }

    #[test]
    fn defaults() {
        let state = parse(
            r#"
[[service]]
name = "db"
vip = "172.50.0.20"
backends = [{ address = "172.50.0.21" }, "172.50.0.22"]
"#,
        );
        let svc = &state.services[0];
        assert_eq!(svc.mark, None);
        assert_eq!(svc.scheduler, Scheduler::Rr, "Swarm's default");
        assert_eq!(
            svc.backends,
            vec![backend(v4(172, 50, 0, 21)), backend(v4(172, 50, 0, 22))]
        );
    }

    #[test]
    fn weights_and_ports() {
        let state = parse(
            r#"
[[service]]
name = "db"
vip = "172.50.0.20"
backends = [
    { address = "172.50.0.21", weight = 2 },
    { address = "172.50.0.22", weight = 0, port = 5432 },
    "172.50.0.23",
    # Same address, other port: a different real server, as in IPVS.
    { address = "172.50.0.23", port = 5433 },
]
"#,
        );
        let b = &state.services[0].backends;
        assert_eq!((b[0].weight, b[0].port), (2, None));
        assert_eq!((b[1].weight, b[1].port), (0, Some(5432)));
        assert_eq!((b[2].weight, b[2].port), (1, None));
        assert_eq!((b[3].weight, b[3].port), (1, Some(5433)));
    }

    #[test]
    fn service_without_backends() {
        let state = parse("[[service]]\nname = \"idle\"\nvip = \"10.0.0.1\"\n");
        assert!(state.services[0].backends.is_empty());
        let state = parse("[[service]]\nname = \"idle\"\nvip = \"10.0.0.1\"\nbackends = []\n");
        assert!(state.services[0].backends.is_empty());
    }

    #[test]
    fn empty_file() {
        assert_eq!(parse(""), DesiredState::default());
        assert_eq!(parse("# nothing yet\n\n"), DesiredState::default());
        assert_eq!(parse("service = []\n"), DesiredState::default());
    }

    #[test]
    fn ipv4_mapped_is_ipv4() {
        let state = parse(
            r#"
[[service]]
name = "api"
vip = "::ffff:172.50.0.37"
backends = ["::ffff:172.50.0.40", { address = "::FFFF:ac32:0029" }]
"#,
        );
        let svc = &state.services[0];
        assert_eq!(svc.vip, v4(172, 50, 0, 37));
        assert_eq!(
            svc.backends,
            vec![backend(v4(172, 50, 0, 40)), backend(v4(172, 50, 0, 41))]
        );
        // Normalized before comparing: these are the same backend...
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
             backends = [\"10.0.0.2\", \"::ffff:10.0.0.2\"]\n",
            4,
            "service[0].backends[1]",
            "listed twice",
        );
        // ...and the same VIP.
        rejects(
            &format!("{API}[[service]]\nname = \"b\"\nvip = \"::ffff:172.50.0.37\"\n"),
            8,
            "service[1].vip",
            "172.50.0.37 is already the VIP of service[0] \"api\" (line 4)",
        );
    }

    #[test]
    fn ipv6_service() {
        let state =
            parse("[[service]]\nname = \"v6\"\nvip = \"fd00::10\"\nbackends = [\"fd00::11\"]\n");
        let svc = &state.services[0];
        assert_eq!(svc.vip, IpAddr::V6("fd00::10".parse::<Ipv6Addr>().unwrap()));
        assert_eq!(svc.backends[0].addr, "fd00::11".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn error_display() {
        let e = rejects(
            &format!("{API}\n[[service]]\nname = \"b\"\nvip = \"172.50.0.x\"\n"),
            9,
            "service[1].vip",
            "\"172.50.0.x\" is not an IP address",
        );
        assert_eq!(e.column, Some(7));
        assert_eq!(
            e.to_string(),
            "svclb.toml:9:7: service[1].vip: \"172.50.0.x\" is not an IP address"
        );
    }

    #[test]
    fn syntax_error() {
        let e = parse_str(
            "[[service]]\nname = \"api\nvip = \"10.0.0.1\"\n",
            "svclb.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field, None);
        assert!(e.to_string().starts_with("svclb.toml:2:"), "{e}");
    }

    #[test]
    fn unknown_fields() {
        rejects("services = []\n", 1, "services", "unknown field `services`");
        rejects(
            &format!("{API}bogus = 1\n"),
            6,
            "service[0].bogus",
            "unknown field `bogus`",
        );
        let e = rejects(
            &format!("{API}[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [{{ address = \"10.0.0.2\", wieght = 2 }}]\n"),
            9,
            "service[1].backends[0].wieght",
            "unknown field `wieght`",
        );
        assert_eq!(e.column, Some(37));
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        rejects(
            &format!("{API}[[service]]\nname = \"db\"\n"),
            6,
            "service[1]",
            "missing field `vip`",
        );
        rejects(
            &format!("{API}[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [{{ weight = 2 }}]\n"),
            9,
            "service[1].backends[0]",
            "missing field `address`",
        );
        rejects(
            "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [1]\n",
            4,
            "service[0].backends[0]",
            "expected an IP address string or a table",
        );
        rejects(
            "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nmark = -1\n",
            4,
            "service[0].mark",
            "expected u32",
        );
        rejects(
            "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\n\
             backends = [{ address = \"10.0.0.2\", port = 70000 }]\n",
            4,
            "service[0].backends[0].port",
            "expected u16",
        );
    }

    #[test]
    fn bad_names() {
        rejects(
            "[[service]]\nname = \"\"\nvip = \"10.0.0.1\"\n",
            2,
            "service[0].name",
            "name is empty",
        );
        rejects(
            "[[service]]\nname = \"my api\"\nvip = \"10.0.0.1\"\n",
            2,
            "service[0].name",
            "contains ' '",
        );
        rejects(
            "[[service]]\nname = \"api/v1\"\nvip = \"10.0.0.1\"\n",
            2,
            "service[0].name",
            "may only use A-Z a-z 0-9 _ . -",
        );
        let long = "a".repeat(MAX_NAME_LEN + 1);
        rejects(
            &format!("[[service]]\nname = \"{long}\"\nvip = \"10.0.0.1\"\n"),
            2,
            "service[0].name",
            "65 bytes long, at most 64",
        );
        // The longest name and every allowed character are fine.
        let ok = format!("{}.Az09_-", "a".repeat(MAX_NAME_LEN - 7));
        parse(&format!(
            "[[service]]\nname = \"{ok}\"\nvip = \"10.0.0.1\"\n"
        ));
    }

    #[test]
    fn duplicate_names() {
        rejects(
            &format!("{API}[[service]]\nname = \"api\"\nvip = \"10.0.0.1\"\n"),
            7,
            "service[1].name",
            "\"api\" is already the name of service[0] \"api\" (line 3)",
        );
        rejects(
            &format!("{API}[[service]]\nname = \"API\"\nvip = \"10.0.0.1\"\n"),
            7,
            "service[1].name",
            "ignoring case",
        );
    }

    #[test]
    fn bad_vips() {
        let svc = |vip: &str| format!("[[service]]\nname = \"a\"\nvip = \"{vip}\"\n");
        rejects(
            &svc("172.50.0.x"),
            3,
            "service[0].vip",
            "is not an IP address",
        );
        rejects(
            &svc("172.50.0.37:80"),
            3,
            "service[0].vip",
            "is not an IP address",
        );
        rejects(&svc("0.0.0.0"), 3, "service[0].vip", "unspecified");
        rejects(&svc("::"), 3, "service[0].vip", "unspecified");
        rejects(&svc("224.0.0.5"), 3, "service[0].vip", "multicast");
        rejects(&svc("ff02::1"), 3, "service[0].vip", "multicast");
        rejects(&svc("255.255.255.255"), 3, "service[0].vip", "broadcast");
        rejects(
            &svc("127.0.0.53"),
            3,
            "service[0].vip",
            "loopback VIP would hijack this host's local traffic",
        );
        rejects(&svc("::1"), 3, "service[0].vip", "loopback");
        rejects(
            &svc("::ffff:127.0.0.1"),
            3,
            "service[0].vip",
            "127.0.0.1 is a loopback",
        );
    }

    #[test]
    fn duplicate_vip() {
        rejects(
            &format!("{API}[[service]]\nname = \"b\"\nvip = \"172.50.0.37\"\n"),
            8,
            "service[1].vip",
            "172.50.0.37 is already the VIP of service[0] \"api\" (line 4)",
        );
    }

    #[test]
    fn bad_marks() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nmark = 0\n",
            4,
            "service[0].mark",
            "mark 0 is reserved",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nmark = 0x13d\n\n\
             [[service]]\nname = \"b\"\nvip = \"10.0.0.2\"\nmark = 317\n",
            9,
            "service[1].mark",
            "mark 0x13d (317) is already used by service[0] \"a\" (line 4)",
        );
    }

    #[test]
    fn unknown_scheduler() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nscheduler = \"fifo\"\n",
            4,
            "service[0].scheduler",
            "unknown scheduler \"fifo\"; accepted: random, rr, wrr, mh, sh, lc, wlc",
        );
    }

    #[test]
    fn bad_backend_addresses() {
        let svc = |backends: &str| {
            format!("[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [{backends}]\n")
        };
        rejects(
            &svc("\"10.0.0.2\", \"10.0.0.x\""),
            4,
            "service[0].backends[1]",
            "\"10.0.0.x\" is not an IP address",
        );
        rejects(
            &svc("{ address = \"nope\" }"),
            4,
            "service[0].backends[0].address",
            "\"nope\" is not an IP address",
        );
        rejects(
            &svc("\"0.0.0.0\""),
            4,
            "service[0].backends[0]",
            "unspecified",
        );
        rejects(
            &svc("\"239.1.1.1\""),
            4,
            "service[0].backends[0]",
            "multicast",
        );
    }

    #[test]
    fn vip_is_also_a_backend() {
        // Of the same service.
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\"10.0.0.1\"]\n",
            4,
            "service[0].backends[0]",
            "10.0.0.1 is the VIP of service[0] \"a\" (line 3); a VIP cannot also be a backend",
        );
        // Of a service defined later in the file.
        rejects(
            &format!(
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
                 backends = [{{ address = \"172.50.0.37\", port = 80 }}]\n{API}"
            ),
            4,
            "service[0].backends[0].address",
            "172.50.0.37 is the VIP of service[1] \"api\" (line 8)",
        );
    }

    #[test]
    fn duplicate_backend() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
             backends = [\"10.0.0.2\",\n  { address = \"10.0.0.2\", weight = 3 }]\n",
            5,
            "service[0].backends[1].address",
            "backend 10.0.0.2 is listed twice in this service (also backends[0], line 4)",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"fd00::1\"\nbackends = [\n\
             { address = \"fd00::2\", port = 80 },\n{ address = \"fd00::2\", port = 80 }]\n",
            6,
            "service[0].backends[1].address",
            "backend [fd00::2]:80 is listed twice",
        );
        // The same backend in two services is fine (a task on two networks).
        parse(&format!(
            "{API}[[service]]\nname = \"b\"\nvip = \"10.0.0.1\"\nbackends = [\"172.50.0.40\"]\n"
        ));
    }

    #[test]
    fn mixed_families() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\"fd00::2\"]\n",
            4,
            "service[0].backends[0]",
            "an IPv4 VIP with IPv6 backends is not supported",
        );
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"fd00::1\"\nbackends = [\"10.0.0.2\"]\n",
            4,
            "service[0].backends[0]",
            "an IPv6 VIP with IPv4 backends is not supported",
        );
    }

    #[test]
    fn port_zero() {
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
             backends = [{ address = \"10.0.0.2\", port = 0 }]\n",
            4,
            "service[0].backends[0].port",
            "port 0 is invalid; omit `port`",
        );
    }

    #[test]
    fn weights_must_fit_the_schedule() {
        // 1:65536 needs 65537 slots; 2:65536 reduces to 1:32768 and fits.
        let svc = |w: u32| {
            format!(
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\n\
                 {{ address = \"10.0.0.2\", weight = {w} }},\n\
                 {{ address = \"10.0.0.3\", weight = 65536 }}]\n"
            )
        };
        rejects(
            &svc(1),
            4,
            "service[0].backends",
            "more than 65536 schedule slots",
        );
        parse(&svc(2));
    }

    #[test]
    fn first_error_in_file_order_wins() {
        // The duplicate mark (line 9) is found before service[0]'s backend
        // check (line 4) runs, yet line 4 comes first in the file.
        rejects(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
             backends = [\"10.0.0.9\"]\nmark = 7\n\
             [[service]]\nname = \"b\"\nvip = \"10.0.0.9\"\nmark = 7\n",
            4,
            "service[0].backends[0]",
            "10.0.0.9 is the VIP of service[1] \"b\" (line 8)",
        );
    }

    #[test]
    fn load_file_names_the_path() {
        let dir = std::env::temp_dir().join(format!("svclb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svclb.toml");
        std::fs::write(&path, format!("{API}mark = 0\n")).unwrap();
        let e = load_file(&path).unwrap_err();
        assert_eq!(e.origin, path.display().to_string());
        assert!(
            e.to_string()
                .starts_with(&format!("{}:6:8: service[0].mark: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, API).unwrap();
        assert_eq!(load_file(&path).unwrap().services.len(), 1);

        let missing = dir.join("missing.toml");
        let e = load_file(&missing).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (None, None));
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serializes_to_the_file_format() {
        let text = r#"
[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = [{ address = "172.50.0.21", weight = 2, port = 5432 }, "172.50.0.22"]
"#;
        let state = parse(text);
        let written = toml::to_string(&state).unwrap();
        assert_eq!(parse(&written), state, "{written}");
    }

    #[test]
    fn discovered_services() {
        let config = parse_config(
            r#"
[[service]]
name = "web"
discover = "dns"

[[service]]
name = "db"
discover = "dns"
vip = "172.50.0.20"
mark = 0x128
scheduler = "random"
"#,
        );
        assert!(config.services.is_empty());
        assert_eq!(
            config.discovered,
            vec![
                DiscoveredSpec {
                    name: "web".into(),
                    vip: None,
                    mark: None,
                    scheduler: Scheduler::Rr,
                    terminate_on_removal: true,
                },
                DiscoveredSpec {
                    name: "db".into(),
                    vip: Some(v4(172, 50, 0, 20)),
                    mark: Some(0x128),
                    scheduler: Scheduler::Random,
                    terminate_on_removal: true,
                },
            ]
        );
        assert_eq!(config.dns, DnsSettings::default());
        // Static and discovered services share names and VIPs.
        let mixed = parse_config(&format!(
            "{API}[[service]]\nname = \"web\"\ndiscover = \"dns\"\n"
        ));
        assert_eq!((mixed.services.len(), mixed.discovered.len()), (1, 1));
        rejects(
            &format!("{API}[[service]]\nname = \"API\"\ndiscover = \"dns\"\n"),
            7,
            "service[1].name",
            "ignoring case",
        );
        rejects(
            &format!("{API}[[service]]\nname = \"b\"\ndiscover = \"dns\"\nvip = \"172.50.0.37\"\n"),
            9,
            "service[1].vip",
            "already the VIP",
        );
    }

    #[test]
    fn discovered_service_errors() {
        rejects(
            "[[service]]\nname = \"web\"\ndiscover = \"consul\"\n",
            3,
            "service[0].discover",
            "unknown discovery \"consul\"; accepted: \"dns\"",
        );
        rejects(
            "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nbackends = [\"10.0.0.2\"]\n",
            4,
            "service[0].backends",
            "takes its backends from DNS (tasks.web)",
        );
        rejects(
            "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nmark = 5\n",
            4,
            "service[0].mark",
            "`mark` needs a fixed `vip`",
        );
        rejects(
            "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nvip = \"127.0.0.1\"\n",
            4,
            "service[0].vip",
            "loopback",
        );
        rejects(
            "[[service]]\nname = \"web\"\n",
            1,
            "service[0]",
            "or `discover = \"dns\"`",
        );
    }

    #[test]
    fn dns_settings() {
        let config = parse_config(
            r#"
[dns]
nameservers = ["127.0.0.11", "172.50.0.53:5353", "[fd00::53]:53"]
min_refresh = "500ms"
max_refresh = 30
stale_grace = "2m"
timeout = "1s 500ms"
"#,
        );
        assert_eq!(
            config.dns,
            DnsSettings {
                nameservers: vec![
                    "127.0.0.11:53".parse().unwrap(),
                    "172.50.0.53:5353".parse().unwrap(),
                    "[fd00::53]:53".parse().unwrap(),
                ],
                min_refresh: Duration::from_millis(500),
                max_refresh: Duration::from_secs(30),
                stale_grace: Duration::from_secs(120),
                timeout: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn dns_setting_errors() {
        rejects(
            "[dns]\nnameservers = [\"127.0.0.11\", \"dns.example\"]\n",
            2,
            "dns.nameservers[1]",
            "\"dns.example\" is not a nameserver address",
        );
        rejects(
            "[dns]\nnameservers = [\"127.0.0.11:0\"]\n",
            2,
            "dns.nameservers[0]",
            "port 0",
        );
        rejects(
            "[dns]\nmin_refresh = \"soon\"\n",
            2,
            "dns.min_refresh",
            "\"soon\" is not a duration",
        );
        rejects("[dns]\ntimeout = -1\n", 2, "dns.timeout", "negative");
        rejects("[dns]\ntimeout = 0\n", 2, "dns.timeout", "longer than zero");
        rejects(
            "[dns]\nmin_refresh = 10\nmax_refresh = \"5s\"\n",
            2,
            "dns.min_refresh",
            "min_refresh (10s) is longer than max_refresh (5s)",
        );
        rejects(
            "[dns]\nmax_refresh = \"500ms\"\n",
            2,
            "dns.max_refresh",
            "min_refresh (1s) is longer than max_refresh (500ms)",
        );
        rejects("[dns]\nttl = 5\n", 2, "dns.ttl", "unknown field `ttl`");
        rejects(
            "[dns]\nstale_grace = true\n",
            2,
            "dns.stale_grace",
            "expected a duration",
        );
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let config = parse_str(include_str!("../../deploy/svclb.toml"), "deploy/svclb.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.discovered.len(), 3);
        assert_eq!(config.services.len(), 1);
        assert_eq!(
            config.dns.nameservers,
            vec!["127.0.0.11:53".parse().unwrap()]
        );
    }
}
