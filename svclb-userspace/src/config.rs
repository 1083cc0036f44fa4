//! The config file: TOML text turned into the desired state
//! ([`crate::model`]), or an error that names the place in the file.
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
use serde::Deserialize;
use svclb_common::Scheduler;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::model::{
    check_affinity, check_backend, check_backend_count, check_family, check_mark, check_name,
    check_network, check_refresh, check_vip, check_weights, protocol_name, BackendSpec, Config,
    DiscoveredSpec, DnsSettings, ServicePort, ServiceSpec,
};

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

/// The path of the innermost key or value at byte `offset`, e.g.
/// `service[0].backends[1].wieght`; `None` if the text is not valid TOML.
/// Read from toml's spanned document, which keeps every key's and value's
/// place (a table under a `[header]` spans its header only: its entries
/// are searched whatever its span).
fn field_at(text: &str, offset: usize) -> Option<String> {
    let root = DeTable::parse(text).ok()?.into_inner();
    let mut path = String::new();
    in_table(&root, offset, &mut path).then_some(path)
}

/// Whether `offset` is on a key or value of `table`, at any depth; if so
/// `path` ends with that key's path.
fn in_table(table: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
    for (key, value) in table {
        let len = path.len();
        if len > 0 {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if key.span().contains(&offset) || in_value(value, offset, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// Whether `offset` is in `value` (or a key or value inside it); if so
/// `path` ends with the innermost one's path.
fn in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut String) -> bool {
    let inside = value.span().contains(&offset);
    match value.get_ref() {
        DeValue::Table(table) => in_table(table, offset, path) || inside,
        DeValue::Array(items) => {
            let found = items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = in_value(item, offset, path);
                if !found {
                    path.truncate(len);
                }
                found
            });
            found || inside
        }
        _ => inside,
    }
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

/// A service and where it is written: its index and a span.
type Place = (usize, Range<usize>);

/// A valid `[[service]]`: given in full, or declared for discovery.
enum Checked {
    Static(ServiceSpec),
    Discovered(DiscoveredSpec),
}

/// Checks the file against the model's rules, service by service, then
/// across services, then `[dns]`; reports the problem first in the file.
fn validate(raw: RawFile, text: &str) -> Result<Config, Problem> {
    let mut check = Checker::new(text);
    let mut config = Config::default();
    for (i, svc) in raw.service.into_iter().enumerate() {
        match check.service(i, svc) {
            Some(Checked::Static(spec)) => config.services.push(spec),
            Some(Checked::Discovered(spec)) => config.discovered.push(spec),
            None => {}
        }
    }
    check.vips_are_not_backends();
    config.dns = dns_settings(raw.dns, &mut check.problems);
    match check.problems.first() {
        Some(problem) => Err(problem),
        None => Ok(config),
    }
}

/// `service[i].key`, the field path of a service's key.
fn at(i: usize, key: &str) -> String {
    format!("service[{i}].{key}")
}

/// What the checks of one service need to know about the others.
struct Checker<'a> {
    text: &'a str,
    problems: Problems,
    /// `service[i] "name"`, to refer to another service in messages.
    labels: Vec<String>,
    /// Keyed by lowercase name: names become DNS names, which ignore case.
    names: HashMap<String, Place>,
    /// Every VIP, for the "VIP that is also a backend" check.
    vips: HashMap<IpAddr, Place>,
    /// A VIP may carry one all-ports service and per-port ones, once each.
    frontends: HashMap<(IpAddr, Option<ServicePort>), Place>,
    marks: HashMap<u32, Place>,
    /// Every backend address and where it is written, for the VIP check.
    backend_refs: Vec<(IpAddr, BackendField, Range<usize>)>,
}

impl<'a> Checker<'a> {
    fn new(text: &'a str) -> Self {
        Checker {
            text,
            problems: Problems::default(),
            labels: Vec::new(),
            names: HashMap::new(),
            vips: HashMap::new(),
            frontends: HashMap::new(),
            marks: HashMap::new(),
            backend_refs: Vec::new(),
        }
    }

    /// "line N" of an earlier occurrence, for "already used" messages.
    fn line(&self, span: &Range<usize>) -> String {
        format!("line {}", line_column(self.text, span.start).0)
    }

    /// `service[i] "name" (line N)`: the service at `place`.
    fn earlier(&self, place: &Place) -> String {
        format!("{} ({})", self.labels[place.0], self.line(&place.1))
    }

    /// One `[[service]]`: its problems noted, and the service unless one of
    /// them drops it (the problem is then reported by [`validate`]).
    fn service(&mut self, i: usize, svc: Spanned<RawService>) -> Option<Checked> {
        let svc_span = svc.span();
        let svc = svc.into_inner();
        let discover = self.discover(i, svc.discover.as_ref());
        let name = self.name(i, svc.name);
        let vip = self.vip(i, svc.vip.as_ref(), discover, svc_span);
        let port = self.port(i, svc.port.as_ref(), svc.protocol.as_ref(), discover);
        if let Some((vip, vip_span)) = &vip {
            self.frontend(i, *vip, vip_span.clone(), port);
        }
        // Clients fail over at once unless the service asks to drain.
        let terminate_on_removal = svc.terminate_on_removal.unwrap_or(true);
        let affinity = self.affinity(i, svc.affinity.as_ref());
        let networks = self.networks(i, svc.networks.as_ref());
        let vip = vip.map(|(vip, _)| vip);
        let mark = self.mark(i, svc.mark, discover && svc.vip.is_none());
        let scheduler = self.scheduler(i, svc.scheduler.as_ref());
        let backends = self.backends(i, svc.backends, vip, discover.then_some(&name));
        let scheduler = scheduler?;
        if discover {
            return Some(Checked::Discovered(DiscoveredSpec {
                name,
                vip,
                mark,
                scheduler,
                terminate_on_removal,
            }));
        }
        Some(Checked::Static(ServiceSpec {
            name,
            vip: vip?,
            mark,
            scheduler,
            backends,
            port,
            affinity,
            networks,
            terminate_on_removal,
        }))
    }

    /// `discover = "dns"`: the VIP (unless given) and the backends come
    /// from DNS. An unknown value still counts as discovery, so that the
    /// error reported is about `discover`, not about a missing `vip`.
    fn discover(&mut self, i: usize, discover: Option<&Spanned<String>>) -> bool {
        if let Some(d) = discover.filter(|d| d.get_ref() != "dns") {
            self.problems.add(
                d.span(),
                at(i, "discover"),
                format!("unknown discovery {:?}; accepted: \"dns\"", d.get_ref()),
            );
        }
        discover.is_some()
    }

    /// The name: valid, and unique ignoring case.
    fn name(&mut self, i: usize, name: Spanned<String>) -> String {
        let span = name.span();
        let name = name.into_inner();
        self.labels.push(format!("service[{i}] {name:?}"));
        let key = name.to_ascii_lowercase();
        if let Err(message) = check_name(&name) {
            self.problems.add(span, at(i, "name"), message);
        } else if let Some(other) = self.names.get(&key) {
            let message = format!(
                "{name:?} is already the name of {}; names must be unique, ignoring case (they \
                 become DNS names)",
                self.earlier(other)
            );
            self.problems.add(span, at(i, "name"), message);
        } else {
            self.names.insert(key, (i, span));
        }
        name
    }

    /// The VIP and where it is written; only a discovered service may omit it.
    fn vip(
        &mut self,
        i: usize,
        vip: Option<&Spanned<String>>,
        discover: bool,
        svc_span: Range<usize>,
    ) -> Option<(IpAddr, Range<usize>)> {
        let Some(v) = vip else {
            if !discover {
                self.problems.add(
                    svc_span,
                    format!("service[{i}]"),
                    "missing field `vip`: give the service's virtual IP, or `discover = \"dns\"` \
                     to resolve it (and its backends) from DNS"
                        .to_owned(),
                );
            }
            return None;
        };
        match parse_ip(v.get_ref()).and_then(check_vip) {
            Ok(vip) => Some((vip, v.span())),
            Err(message) => {
                self.problems.add(v.span(), at(i, "vip"), message);
                None
            }
        }
    }

    /// `port` and `protocol`: a per-port service, or `None` for every port.
    fn port(
        &mut self,
        i: usize,
        port: Option<&Spanned<u16>>,
        protocol: Option<&Spanned<String>>,
        discover: bool,
    ) -> Option<ServicePort> {
        let Some(port) = port else {
            if let Some(p) = protocol {
                self.problems.add(
                    p.span(),
                    at(i, "protocol"),
                    "`protocol` needs `port`: a service without a port takes every port and \
                     protocol"
                        .to_owned(),
                );
            }
            return None;
        };
        let protocol = self.protocol(i, protocol);
        if *port.get_ref() == 0 {
            let message = "port 0 is invalid; omit `port` for a service of every port";
            self.problems
                .add(port.span(), at(i, "port"), message.to_owned());
            None
        } else if discover {
            let message = "a discovered service takes every port; `port` needs a service with \
                           its `vip` and `backends` written out";
            self.problems
                .add(port.span(), at(i, "port"), message.to_owned());
            None
        } else {
            protocol.map(|protocol| ServicePort {
                port: *port.get_ref(),
                protocol,
            })
        }
    }

    /// "tcp" (the default) or "udp", as an IP protocol number.
    fn protocol(&mut self, i: usize, protocol: Option<&Spanned<String>>) -> Option<u8> {
        let Some(p) = protocol else {
            return Some(svclb_common::IPPROTO_TCP);
        };
        match p.get_ref().as_str() {
            "tcp" => Some(svclb_common::IPPROTO_TCP),
            "udp" => Some(svclb_common::IPPROTO_UDP),
            other => {
                let message = format!("unknown protocol {other:?}; accepted: \"tcp\", \"udp\"");
                self.problems.add(p.span(), at(i, "protocol"), message);
                None
            }
        }
    }

    /// Notes the VIP; one service per VIP and port (or all ports).
    fn frontend(&mut self, i: usize, vip: IpAddr, span: Range<usize>, port: Option<ServicePort>) {
        self.vips.entry(vip).or_insert((i, span.clone()));
        if let Some(other) = self.frontends.get(&(vip, port)) {
            let what = match port {
                Some(p) => format!("{vip} {}/{}", p.port, protocol_name(p.protocol)),
                None => vip.to_string(),
            };
            let message = format!("{what} is already the VIP of {}", self.earlier(other));
            self.problems.add(span, at(i, "vip"), message);
        } else {
            self.frontends.insert((vip, port), (i, span));
        }
    }

    /// Affinity in whole seconds.
    fn affinity(&mut self, i: usize, affinity: Option<&Spanned<RawDuration>>) -> Option<u32> {
        let a = affinity?;
        match parse_duration(a.get_ref()).and_then(check_affinity) {
            Ok(secs) => Some(secs),
            Err(message) => {
                self.problems.add(a.span(), at(i, "affinity"), message);
                None
            }
        }
    }

    /// The valid network names, each once, in file order.
    fn networks(&mut self, i: usize, list: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<String> {
        let mut networks: Vec<String> = Vec::new();
        let list = list.map_or(&[][..], |l| l.get_ref().as_slice());
        for (k, n) in list.iter().enumerate() {
            let name = n.get_ref();
            if let Err(message) = check_network(name) {
                self.problems
                    .add(n.span(), at(i, &format!("networks[{k}]")), message);
            } else if !networks.contains(name) {
                networks.push(name.clone());
            }
        }
        networks
    }

    /// The mark: not 0, not another service's, and only with a fixed VIP.
    fn mark(&mut self, i: usize, mark: Option<Spanned<u32>>, vip_discovered: bool) -> Option<u32> {
        let mark = mark?;
        let (span, mark) = (mark.span(), mark.into_inner());
        if vip_discovered {
            let message = "a discovered VIP keeps the mark it has in the maps or gets a free \
                           one; `mark` needs a fixed `vip`";
            self.problems.add(span, at(i, "mark"), message.to_owned());
        } else if let Err(message) = check_mark(mark) {
            self.problems.add(span, at(i, "mark"), message);
        } else if let Some(other) = self.marks.get(&mark) {
            let message = format!(
                "mark {mark:#x} ({mark}) is already used by {}",
                self.earlier(other)
            );
            self.problems.add(span, at(i, "mark"), message);
        } else {
            self.marks.insert(mark, (i, span));
        }
        Some(mark)
    }

    /// The scheduler by name; Swarm's when absent.
    fn scheduler(&mut self, i: usize, scheduler: Option<&Spanned<String>>) -> Option<Scheduler> {
        let Some(s) = scheduler else {
            return Some(Scheduler::DEFAULT);
        };
        let found = Scheduler::from_name(s.get_ref());
        if found.is_none() {
            let message = format!(
                "unknown scheduler {:?}; accepted: {}",
                s.get_ref(),
                Scheduler::NAMES.join(", ")
            );
            self.problems.add(s.span(), at(i, "scheduler"), message);
        }
        found
    }

    /// The backends that pass their checks, and the schedule they make.
    /// `discovered` names a discovered service, which takes none.
    fn backends(
        &mut self,
        i: usize,
        raw: Option<Spanned<Vec<Spanned<RawBackend>>>>,
        vip: Option<IpAddr>,
        discovered: Option<&String>,
    ) -> Vec<BackendSpec> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let span = raw.span();
        if let Some(name) = discovered {
            let message = format!(
                "a discovered service takes its backends from DNS (tasks.{name}); remove \
                 `backends`, or `discover` to list them here"
            );
            self.problems.add(span.clone(), at(i, "backends"), message);
        }
        let mut seen = HashMap::new();
        let mut backends = Vec::new();
        for (j, b) in raw.into_inner().into_iter().enumerate() {
            backends.extend(self.backend(i, j, b, vip, &mut seen));
        }
        if let Err(message) = check_backend_count(backends.len()).and(check_weights(&backends)) {
            self.problems.add(span, at(i, "backends"), message);
        }
        backends
    }

    /// One backend: a valid address, of the VIP's family, listed once (with
    /// its port) in its service. `seen` holds the earlier ones.
    fn backend(
        &mut self,
        i: usize,
        j: usize,
        b: Spanned<RawBackend>,
        vip: Option<IpAddr>,
        seen: &mut HashMap<(IpAddr, Option<u16>), Place>,
    ) -> Option<BackendSpec> {
        let whole_span = b.span();
        // A string backend is its own address; a table has `address`.
        let (table, span, text, weight, port) = match b.into_inner() {
            RawBackend::Address(text) => (false, whole_span, text, 1, None),
            RawBackend::Table(t) => (
                true,
                t.address.span(),
                t.address.into_inner(),
                t.weight.unwrap_or(1),
                t.port,
            ),
        };
        let field = BackendField {
            service: i,
            backend: j,
            table,
        };
        let addr = match parse_ip(&text).and_then(check_backend) {
            Ok(addr) => addr,
            Err(message) => {
                self.problems.add(span, field.to_string(), message);
                return None;
            }
        };
        if let Some(Err(message)) = vip.map(|vip| check_family(vip, addr)) {
            self.problems.add(span.clone(), field.to_string(), message);
        }
        let port = self.backend_port(i, j, port);
        if let Some((other, other_span)) = seen.get(&(addr, port)) {
            let shown = match port {
                Some(p) => SocketAddr::new(addr, p).to_string(),
                None => addr.to_string(),
            };
            let message = format!(
                "backend {shown} is listed twice in this service (also backends[{other}], {})",
                self.line(other_span)
            );
            self.problems.add(span.clone(), field.to_string(), message);
        } else {
            seen.insert((addr, port), (j, span.clone()));
        }
        self.backend_refs.push((addr, field, span));
        Some(BackendSpec { addr, port, weight })
    }

    /// A backend's `port`: absent keeps the client's, 0 is a problem.
    fn backend_port(&mut self, i: usize, j: usize, port: Option<Spanned<u16>>) -> Option<u16> {
        let p = port?;
        if *p.get_ref() == 0 {
            self.problems.add(
                p.span(),
                at(i, &format!("backends[{j}].port")),
                "port 0 is invalid; omit `port` to keep the client's destination port".to_owned(),
            );
        }
        Some(p.into_inner())
    }

    /// A VIP that is also a backend, of any service, would send the traffic
    /// meant for the backend back into the balancer.
    fn vips_are_not_backends(&mut self) {
        for (addr, field, span) in std::mem::take(&mut self.backend_refs) {
            if let Some(place) = self.vips.get(&addr) {
                let message = format!(
                    "{addr} is the VIP of {}; a VIP cannot also be a backend",
                    self.earlier(place)
                );
                self.problems.add(span, field.to_string(), message);
            }
        }
    }
}

/// Where a backend's address is written (`service[i].backends[j]`, with
/// `.address` in a table): named only when there is a problem, not
/// formatted for each of 200,000 valid backends.
#[derive(Clone, Copy)]
struct BackendField {
    service: usize,
    backend: usize,
    table: bool,
}

impl fmt::Display for BackendField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = if self.table { ".address" } else { "" };
        write!(
            f,
            "service[{}].backends[{}]{address}",
            self.service, self.backend
        )
    }
}

/// The `[dns]` table; an absent key keeps its default.
fn dns_settings(raw: Option<RawDns>, problems: &mut Problems) -> DnsSettings {
    let mut dns = DnsSettings::default();
    let Some(raw) = raw else {
        return dns;
    };
    dns.nameservers = nameservers(raw.nameservers.unwrap_or_default(), problems);
    let min = dns_duration(raw.min_refresh, "min_refresh", dns.min_refresh, problems);
    let max = dns_duration(raw.max_refresh, "max_refresh", dns.max_refresh, problems);
    dns.stale_grace = dns_duration(raw.stale_grace, "stale_grace", dns.stale_grace, problems).0;
    dns.timeout = dns_duration(raw.timeout, "timeout", dns.timeout, problems).0;
    refresh_order(&min, &max, problems);
    dns.min_refresh = min.0;
    dns.max_refresh = max.0;
    dns
}

/// The valid nameserver addresses, in file order.
fn nameservers(raw: Vec<Spanned<String>>, problems: &mut Problems) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for (k, ns) in raw.into_iter().enumerate() {
        match parse_nameserver(ns.get_ref()) {
            Ok(addr) => addrs.push(addr),
            Err(message) => problems.add(ns.span(), format!("dns.nameservers[{k}]"), message),
        }
    }
    addrs
}

/// A `[dns]` duration longer than zero (`default` when absent or not),
/// and where it is written.
fn dns_duration(
    value: Option<Spanned<RawDuration>>,
    key: &str,
    default: Duration,
    problems: &mut Problems,
) -> Setting {
    let Some(value) = value else {
        return (default, None);
    };
    let span = value.span();
    match parse_duration(value.get_ref()) {
        Ok(d) if d.is_zero() => {
            let message = "must be longer than zero".to_owned();
            problems.add(span.clone(), format!("dns.{key}"), message);
            (default, Some(span))
        }
        Ok(d) => (d, Some(span)),
        Err(message) => {
            problems.add(span.clone(), format!("dns.{key}"), message);
            (default, Some(span))
        }
    }
}

/// A `[dns]` duration and where it is written, if it is.
type Setting = (Duration, Option<Range<usize>>);

/// min_refresh no longer than max_refresh, reported on whichever is written.
fn refresh_order(min: &Setting, max: &Setting, problems: &mut Problems) {
    let Err(message) = check_refresh(min.0, max.0) else {
        return;
    };
    let (span, key) = match (&min.1, &max.1) {
        (Some(s), _) => (s.clone(), "min_refresh"),
        (None, Some(s)) => (s.clone(), "max_refresh"),
        (None, None) => (0..0, "min_refresh"),
    };
    problems.add(span, format!("dns.{key}"), message);
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

/// Parses an address, turning `::ffff:a.b.c.d` into `a.b.c.d`.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("{text:?} is not an IP address"))
}

#[cfg(test)]
mod tests;
