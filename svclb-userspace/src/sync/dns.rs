//! DNS discovery: services declared by name follow what Docker Swarm's
//! embedded DNS says, the way a task sees the cluster.
//!
//! For a service `api` declared with `discover = "dns"`:
//! - `api` answers its VIP(s) (one per network the resolver shares with
//!   the service; each VIP becomes its own FWM service, as in Swarm);
//! - `tasks.api` answers every task IP: the backends, weight 1, the
//!   client's port kept.
//!
//! Names are queried as absolute names (no search domains), A and AAAA.
//! Each name is re-resolved when its answer's TTL runs out, but never
//! sooner than `min_refresh` nor later than `max_refresh`.
//!
//! Failure behaviour, per name:
//! - the server fails (timeout, SERVFAIL, REFUSED, unreachable): the last
//!   good addresses stay, the name is marked stale, and svclbd retries with
//!   a backoff up to `max_refresh`. They stay for as long as DNS fails: an
//!   unreachable resolver is not news about the tasks, and dropping working
//!   backends would turn a DNS outage into a service outage. Past
//!   `stale_grace` this is logged as an error.
//! - the server answers NXDOMAIN or no address: that is news, but a resolver
//!   that is still starting (dockerd restarting) may answer so for a moment,
//!   so the last good addresses stay for `stale_grace` (stale meanwhile); if
//!   the answer still holds then, it is applied: no tasks means no backends
//!   (connects are refused), no VIP means no service.
//! - an answer that does not make a valid service (a VIP that is also a
//!   task, as a `dnsrr` service answers; a VIP that another service has; a
//!   loopback VIP...) is refused: the service keeps the last set that was
//!   valid, and the reason is logged and kept in [`ServiceStatus::rejected`].
//!
//! When svclbd starts, the names start from what the pinned maps hold for
//! services of that name ([`Discovery::adopt`]), so a restart while DNS is
//! down or answers NXDOMAIN changes nothing.
//!
//! [`Discovery::status_handle`] shares the state of every name (last
//! success, consecutive failures, stale) with `/metrics` (`svclb_discovery_*`,
//! see [`crate::metrics::discovery_text`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::{RData, Record};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::dataplane::Snapshot;
use crate::model::{self, BackendSpec, DiscoveredSpec, DnsSettings, ServiceSpec};

/// What one name's last query said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Addresses, and how long the answer is valid.
    Addrs(BTreeSet<IpAddr>, Duration),
    /// NXDOMAIN (`nxdomain`), or the name exists without addresses.
    Empty {
        nxdomain: bool,
        negative_ttl: Option<Duration>,
    },
    /// No usable answer: timeout, SERVFAIL, REFUSED, no route...
    Failed(String),
}

/// Most VIPs one name may answer: Swarm gives a service one VIP per
/// network, and a node has at most 64 networks (svclb's scope bits).
pub const MAX_VIPS_PER_NAME: usize = 64;

/// What one name stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `<name>`: the VIP(s).
    Vips,
    /// `tasks.<name>`: the backends.
    Tasks,
}

impl Role {
    /// The most addresses an answer for this role may have: a larger one
    /// is refused as a failed query (the last good set stays).
    pub fn max_addresses(self) -> usize {
        match self {
            Role::Vips => MAX_VIPS_PER_NAME,
            Role::Tasks => model::MAX_BACKENDS_PER_SERVICE,
        }
    }
}

/// The state of one queried name, as metrics report it.
#[derive(Clone, Debug, Serialize)]
pub struct NameStatus {
    /// The name queried, e.g. `tasks.api`.
    pub query: String,
    pub role: Role,
    /// The addresses in use: the last good answer (or what the maps held
    /// when svclbd started, until DNS answers).
    pub addresses: Vec<IpAddr>,
    /// When the server last gave an answer that was used.
    pub last_success: Option<SystemTime>,
    /// Failed queries in a row (no answer, or an unusable one).
    pub consecutive_failures: u32,
    /// The addresses in use are older than what DNS says or cannot say:
    /// it fails, or answers NXDOMAIN within the grace period.
    pub stale: bool,
    /// The addresses came from the pinned maps and DNS has not answered yet.
    pub adopted: bool,
    pub last_error: Option<String>,
}

/// The discovery state of one service.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    pub names: Vec<NameStatus>,
    /// Why the current answers were refused (the last valid set is kept).
    pub rejected: Option<String>,
}

/// Every discovered service's state, shared with readers (metrics).
pub type StatusHandle = Arc<RwLock<Vec<ServiceStatus>>>;

/// One name and what is known about it.
#[derive(Debug)]
struct NameState {
    query: String,
    role: Role,
    /// `None`: never known.
    addrs: Option<BTreeSet<IpAddr>>,
    next_due: Instant,
    last_success: Option<SystemTime>,
    consecutive_failures: u32,
    failing_since: Option<Instant>,
    /// Set while an NXDOMAIN/empty answer is distrusted.
    negative_since: Option<Instant>,
    /// The failure streak has been reported as past the grace period.
    reported_past_grace: bool,
    stale: bool,
    adopted: bool,
    last_error: Option<String>,
}

impl NameState {
    fn new(query: String, role: Role, now: Instant) -> Self {
        NameState {
            query,
            role,
            addrs: None,
            next_due: now,
            last_success: None,
            consecutive_failures: 0,
            failing_since: None,
            negative_since: None,
            reported_past_grace: false,
            stale: false,
            adopted: false,
            last_error: None,
        }
    }

    fn current(&self) -> BTreeSet<IpAddr> {
        self.addrs.clone().unwrap_or_default()
    }

    fn has_addrs(&self) -> bool {
        self.addrs.as_ref().is_some_and(|a| !a.is_empty())
    }

    /// Takes in one answer; returns whether the addresses in use changed.
    fn record(&mut self, answer: Answer, now: Instant, settings: &DnsSettings) -> bool {
        let clamp = |d: Duration| d.clamp(settings.min_refresh, settings.max_refresh);
        let before = self.current();
        let answer = match answer {
            Answer::Addrs(addrs, _) if addrs.len() > self.role.max_addresses() => {
                Answer::Failed(format!(
                    "the answer has {} addresses, more than the {} svclb takes for {}",
                    addrs.len(),
                    self.role.max_addresses(),
                    match self.role {
                        Role::Vips => "a service's VIPs",
                        Role::Tasks => "a service's tasks",
                    }
                ))
            }
            answer => answer,
        };
        match answer {
            Answer::Addrs(addrs, ttl) => {
                if self.stale {
                    info!(
                        query = %self.query,
                        "DNS answers again: {} address(es), no longer stale",
                        addrs.len()
                    );
                }
                self.addrs = Some(addrs);
                self.next_due = now + clamp(ttl);
                self.mark_success();
            }
            Answer::Empty {
                nxdomain,
                negative_ttl,
            } => {
                let what = if nxdomain { "NXDOMAIN" } else { "no address" };
                self.next_due = now + clamp(negative_ttl.unwrap_or(settings.min_refresh));
                if !self.has_addrs() {
                    self.addrs = Some(BTreeSet::new());
                    self.mark_success();
                } else {
                    let since = *self.negative_since.get_or_insert(now);
                    if now.duration_since(since) >= settings.stale_grace {
                        warn!(
                            query = %self.query,
                            "DNS has answered {what} for {}: dropping the last good {} \
                             address(es) {}",
                            humantime::format_duration(settings.stale_grace),
                            before.len(),
                            list(&before)
                        );
                        self.addrs = Some(BTreeSet::new());
                        self.mark_success();
                    } else {
                        if !self.stale {
                            warn!(
                                query = %self.query,
                                "DNS answers {what}: keeping the last good {} address(es) {} \
                                 for up to {} (stale_grace)",
                                before.len(),
                                list(&before),
                                humantime::format_duration(settings.stale_grace)
                            );
                        }
                        self.stale = true;
                        self.consecutive_failures += 1;
                        self.last_error = Some(format!("DNS answered {what}"));
                    }
                }
            }
            Answer::Failed(err) => {
                self.consecutive_failures += 1;
                let since = *self.failing_since.get_or_insert(now);
                let backoff = settings
                    .min_refresh
                    .saturating_mul(1 << self.consecutive_failures.min(16).saturating_sub(1));
                self.next_due = now + backoff.min(settings.max_refresh);
                self.stale = self.has_addrs();
                let keeping = if self.has_addrs() {
                    format!(
                        "keeping the last good {} address(es) {}",
                        before.len(),
                        list(&before)
                    )
                } else {
                    "no address known yet".to_owned()
                };
                let failing_for = now.duration_since(since);
                if failing_for >= settings.stale_grace && !self.reported_past_grace {
                    self.reported_past_grace = true;
                    error!(
                        query = %self.query,
                        "DNS has failed for {} (more than stale_grace): {err}; {keeping}, \
                         until it answers",
                        humantime::format_duration(round_secs(failing_for))
                    );
                } else if self.consecutive_failures.is_power_of_two() {
                    warn!(
                        query = %self.query,
                        failures = self.consecutive_failures,
                        "DNS query failed: {err}; {keeping}"
                    );
                } else {
                    debug!(query = %self.query, "DNS query failed: {err}");
                }
                self.last_error = Some(err);
            }
        }
        self.current() != before
    }

    fn mark_success(&mut self) {
        self.last_success = Some(SystemTime::now());
        self.consecutive_failures = 0;
        self.failing_since = None;
        self.negative_since = None;
        self.reported_past_grace = false;
        self.stale = false;
        self.adopted = false;
        self.last_error = None;
    }

    fn status(&self) -> NameStatus {
        NameStatus {
            query: self.query.clone(),
            role: self.role,
            addresses: self.current().into_iter().collect(),
            last_success: self.last_success,
            consecutive_failures: self.consecutive_failures,
            stale: self.stale,
            adopted: self.adopted,
            last_error: self.last_error.clone(),
        }
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn list(addrs: &BTreeSet<IpAddr>) -> String {
    let shown: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
    format!("[{}]", shown.join(", "))
}

/// One discovered service.
#[derive(Debug)]
struct ServiceState {
    spec: DiscoveredSpec,
    /// `None` when the VIP is fixed in the config.
    vips: Option<NameState>,
    tasks: NameState,
    /// The last composition that was valid, used while the answers are not.
    accepted: Option<Vec<ServiceSpec>>,
    rejected: Option<String>,
}

impl ServiceState {
    fn new(spec: DiscoveredSpec, now: Instant) -> Self {
        let vips = spec
            .vip
            .is_none()
            .then(|| NameState::new(spec.name.clone(), Role::Vips, now));
        let tasks = NameState::new(format!("tasks.{}", spec.name), Role::Tasks, now);
        ServiceState {
            spec,
            vips,
            tasks,
            accepted: None,
            rejected: None,
        }
    }

    fn names_mut(&mut self) -> impl Iterator<Item = &mut NameState> {
        self.vips.iter_mut().chain(std::iter::once(&mut self.tasks))
    }

    /// The name queried for `role` (none for the VIPs of a fixed VIP).
    fn name_mut(&mut self, role: Role) -> Option<&mut NameState> {
        match role {
            Role::Vips => self.vips.as_mut(),
            Role::Tasks => Some(&mut self.tasks),
        }
    }

    fn names(&self) -> impl Iterator<Item = &NameState> {
        self.vips.iter().chain(std::iter::once(&self.tasks))
    }

    /// The services the current answers make: one per VIP, every task of
    /// the VIP's address family as a backend.
    fn candidate(&self) -> Vec<ServiceSpec> {
        let vips: BTreeSet<IpAddr> = match (self.spec.vip, &self.vips) {
            (Some(vip), _) => BTreeSet::from([vip]),
            (None, Some(names)) => names.current(),
            (None, None) => BTreeSet::new(),
        };
        let tasks = self.tasks.current();
        vips.into_iter()
            .map(|vip| ServiceSpec {
                name: self.spec.name.clone(),
                vip,
                mark: self.spec.mark,
                scheduler: self.spec.scheduler,
                backends: tasks
                    .iter()
                    .filter(|t| t.is_ipv4() == vip.is_ipv4())
                    .map(|&addr| BackendSpec {
                        addr,
                        port: None,
                        weight: 1,
                    })
                    .collect(),
                port: None,
                affinity: None,
                networks: Vec::new(),
                terminate_on_removal: self.spec.terminate_on_removal,
            })
            .collect()
    }
}

/// VIPs and backend addresses already in the desired state.
#[derive(Default)]
struct Taken {
    vips: BTreeMap<IpAddr, String>,
    backends: BTreeMap<IpAddr, String>,
    /// What each discovered service holds before this composition (its
    /// fixed VIP, its last valid set), by owner: a new answer for one name
    /// cannot take another's VIP or task over, whichever is composed first.
    held_vips: BTreeMap<IpAddr, Vec<String>>,
    held_tasks: BTreeMap<IpAddr, Vec<String>>,
}

impl Taken {
    fn add(&mut self, spec: &ServiceSpec) {
        self.vips.insert(spec.vip, spec.name.clone());
        for b in &spec.backends {
            self.backends.insert(b.addr, spec.name.clone());
        }
    }

    fn hold(&mut self, svc: &ServiceState) {
        let name = &svc.spec.name;
        for vip in svc
            .spec
            .vip
            .iter()
            .chain(svc.accepted.iter().flatten().map(|s| &s.vip))
        {
            self.held_vips.entry(*vip).or_default().push(name.clone());
        }
        for spec in svc.accepted.iter().flatten() {
            for b in &spec.backends {
                self.held_tasks
                    .entry(b.addr)
                    .or_default()
                    .push(name.clone());
            }
        }
    }

    /// The other service that holds `addr` in `held`, if any.
    fn held_by<'a>(
        held: &'a BTreeMap<IpAddr, Vec<String>>,
        addr: &IpAddr,
        own: &str,
    ) -> Option<&'a String> {
        held.get(addr)?.iter().find(|owner| *owner != own)
    }

    /// Checks the services discovered for one name against each other and
    /// against what is taken.
    fn check(&self, specs: &[ServiceSpec]) -> Result<(), String> {
        let own_backends: BTreeSet<IpAddr> = specs
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .collect();
        for spec in specs {
            model::check_vip(spec.vip).map_err(|e| format!("VIP: {e}"))?;
            if own_backends.contains(&spec.vip) {
                return Err(format!(
                    "{} is both a VIP ({}) and a task (tasks.{}): a dnsrr service? svclb \
                     balances only VIP-mode services",
                    spec.vip, spec.name, spec.name
                ));
            }
            if let Some(other) =
                self.vips
                    .get(&spec.vip)
                    .or(Self::held_by(&self.held_vips, &spec.vip, &spec.name))
            {
                return Err(format!(
                    "VIP {} is already the VIP of service {other:?}",
                    spec.vip
                ));
            }
            if let Some(other) = self.backends.get(&spec.vip).or(Self::held_by(
                &self.held_tasks,
                &spec.vip,
                &spec.name,
            )) {
                return Err(format!(
                    "VIP {} is a backend of service {other:?}",
                    spec.vip
                ));
            }
            for b in &spec.backends {
                model::check_task(b.addr).map_err(|e| format!("task: {e}"))?;
                if let Some(other) =
                    self.vips
                        .get(&b.addr)
                        .or(Self::held_by(&self.held_vips, &b.addr, &spec.name))
                {
                    return Err(format!(
                        "task {} is the VIP of service {other:?}; a VIP cannot also be a backend",
                        b.addr
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which names a refresh queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Those whose time has come.
    Due,
    /// Every name, now.
    All,
}

/// The discovered services, their names' states and the resolver.
pub struct Discovery {
    settings: DnsSettings,
    resolver: Option<TokioResolver>,
    services: Vec<ServiceState>,
    status: StatusHandle,
}

impl Discovery {
    /// Nothing to discover.
    pub fn empty() -> Self {
        Discovery {
            settings: DnsSettings::default(),
            resolver: None,
            services: Vec::new(),
            status: StatusHandle::default(),
        }
    }

    /// Discovery for `specs`; the resolver is built only when there is
    /// something to resolve.
    pub fn new(specs: &[DiscoveredSpec], settings: &DnsSettings) -> Result<Self> {
        let mut discovery = Self::empty();
        discovery.reconfigure(specs, settings)?;
        Ok(discovery)
    }

    /// Takes a new config: names still declared keep their state; new ones
    /// are due at once; with new DNS settings every name is due at once.
    /// On error nothing changes.
    pub fn reconfigure(&mut self, specs: &[DiscoveredSpec], settings: &DnsSettings) -> Result<()> {
        let now = Instant::now();
        let settings_changed = *settings != self.settings;
        let resolver = if specs.is_empty() {
            None
        } else if settings_changed || self.resolver.is_none() {
            Some(build_resolver(settings)?)
        } else {
            self.resolver.clone()
        };
        let mut old: Vec<ServiceState> = std::mem::take(&mut self.services);
        for spec in specs {
            let kept = old
                .iter()
                .position(|s| s.spec.name == spec.name && s.spec.vip == spec.vip)
                .map(|i| old.swap_remove(i));
            let mut state = match kept {
                Some(mut s) => {
                    if s.spec != *spec {
                        s.accepted = None;
                    }
                    s.spec = spec.clone();
                    s
                }
                None => ServiceState::new(spec.clone(), now),
            };
            if settings_changed {
                for name in state.names_mut() {
                    name.next_due = now;
                }
            }
            self.services.push(state);
        }
        self.settings = settings.clone();
        self.resolver = resolver;
        self.publish();
        Ok(())
    }

    /// Starts every name that DNS has not answered yet from what the maps
    /// hold for services of the same name (after a restart).
    pub fn adopt(&mut self, snapshot: &Snapshot) {
        for svc in &mut self.services {
            let held: Vec<_> = snapshot
                .services
                .values()
                .filter(|s| s.name == svc.spec.name)
                .collect();
            if held.is_empty() {
                continue;
            }
            let vips: BTreeSet<IpAddr> = held.iter().map(|s| s.vip).collect();
            let tasks: BTreeSet<IpAddr> = held
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.addr))
                .collect();
            if let Some(names) = svc.vips.as_mut().filter(|n| n.addrs.is_none()) {
                names.addrs = Some(vips);
                names.adopted = true;
            }
            if svc.tasks.addrs.is_none() {
                svc.tasks.addrs = Some(tasks);
                svc.tasks.adopted = true;
            }
            info!(
                service = %svc.spec.name,
                "starting from the pinned maps until DNS answers: {}",
                held.iter()
                    .map(|s| format!("{} -> {} task(s)", s.vip, s.backends.len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.publish();
    }

    /// When the next name is due; `None` when there is nothing to resolve.
    pub fn next_due(&self) -> Option<Instant> {
        self.services
            .iter()
            .flat_map(|s| s.names())
            .map(|n| n.next_due)
            .min()
    }

    /// Queries the names (all, or the due ones) concurrently; returns
    /// whether any address set in use changed.
    pub async fn refresh(&mut self, which: Refresh) -> bool {
        let Some(resolver) = self.resolver.clone() else {
            return false;
        };
        let now = Instant::now();
        let mut queries = tokio::task::JoinSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            for name in svc.names() {
                if which == Refresh::All || name.next_due <= now {
                    let resolver = resolver.clone();
                    let (query, role) = (name.query.clone(), name.role);
                    queries.spawn(async move { (i, role, resolve(&resolver, &query).await) });
                }
            }
        }
        let mut changed = false;
        while let Some(joined) = queries.join_next().await {
            let Ok((i, role, answer)) = joined else {
                continue;
            };
            if let Some(name) = self.services[i].name_mut(role) {
                debug!(query = %name.query, ?answer, "DNS answer");
                changed |= name.record(answer, Instant::now(), &self.settings);
            }
        }
        self.publish();
        changed
    }

    /// Takes in an answer for the VIPs or the tasks of `service`, as a
    /// refresh does (for callers that have the answer: tests, the fuzz
    /// target); returns whether the addresses in use changed.
    pub fn record_answer(&mut self, service: &str, role: Role, answer: Answer) -> bool {
        let Some(svc) = self.services.iter_mut().find(|s| s.spec.name == service) else {
            return false;
        };
        let changed = svc
            .name_mut(role)
            .is_some_and(|n| n.record(answer, Instant::now(), &self.settings));
        self.publish();
        changed
    }

    /// Whether no service is discovered through DNS (then [`Discovery::compose`]
    /// adds nothing to the file's and Docker's services).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The desired state: the static services, then every discovered one
    /// whose answers make a valid service (else its last valid set).
    pub fn compose(&mut self, statics: &model::DesiredState) -> model::DesiredState {
        let mut taken = Taken::default();
        for spec in &statics.services {
            taken.add(spec);
        }
        for svc in &self.services {
            taken.hold(svc);
        }
        let mut out = statics.clone();
        for svc in &mut self.services {
            let candidate = svc.candidate();
            let chosen = match taken.check(&candidate) {
                Ok(()) => {
                    if svc.rejected.take().is_some() {
                        info!(service = %svc.spec.name, "DNS answers make a valid service again");
                    }
                    svc.accepted = Some(candidate.clone());
                    candidate
                }
                Err(why) => {
                    if svc.rejected.as_deref() != Some(why.as_str()) {
                        error!(
                            service = %svc.spec.name,
                            "DNS answers refused, keeping the last valid set: {why}"
                        );
                    }
                    svc.rejected = Some(why);
                    match &svc.accepted {
                        Some(last) if taken.check(last).is_ok() => last.clone(),
                        Some(_) => {
                            error!(
                                service = %svc.spec.name,
                                "its last valid set conflicts with other services now: dropped"
                            );
                            Vec::new()
                        }
                        None => Vec::new(),
                    }
                }
            };
            for spec in &chosen {
                taken.add(spec);
            }
            out.services.extend(chosen);
        }
        self.publish();
        out
    }

    /// A handle on every discovered service's state, kept up to date.
    pub fn status_handle(&self) -> StatusHandle {
        Arc::clone(&self.status)
    }

    /// The state now.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.services
            .iter()
            .map(|s| ServiceStatus {
                service: s.spec.name.clone(),
                names: s.names().map(NameState::status).collect(),
                rejected: s.rejected.clone(),
            })
            .collect()
    }

    fn publish(&self) {
        let status = self.status();
        match self.status.write() {
            Ok(mut shared) => *shared = status,
            Err(poisoned) => *poisoned.into_inner() = status,
        }
    }
}

fn build_resolver(settings: &DnsSettings) -> Result<TokioResolver> {
    let (config, mut opts) = if settings.nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf().context(
            "reading the system's resolver configuration (/etc/resolv.conf); \
             or set [dns] nameservers",
        )?
    } else {
        let mut config = ResolverConfig::new();
        for &addr in &settings.nameservers {
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
        }
        (config, ResolverOpts::default())
    };
    opts.timeout = settings.timeout;
    opts.attempts = 1;
    // Every refresh must ask the server: no cache, no hosts file.
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build(),
    )
}

/// One query: `query` as an absolute name, A and AAAA.
async fn resolve(resolver: &TokioResolver, query: &str) -> Answer {
    resolver.clear_cache();
    match resolver.lookup_ip(format!("{query}.")).await {
        Ok(lookup) => answer_of(lookup.as_lookup().records()),
        Err(e) => classify(&e),
    }
}

/// What the records of an answer say: their A and AAAA addresses
/// (IPv4-mapped ones as IPv4), valid for the smallest TTL among them; no
/// address is an empty answer. Other records (CNAME...) count for the TTL
/// only, as the resolver's own lookup does.
pub fn answer_of(records: &[Record]) -> Answer {
    let addrs: BTreeSet<IpAddr> = records
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0).to_canonical()),
            _ => None,
        })
        .collect();
    if addrs.is_empty() {
        return Answer::Empty {
            nxdomain: false,
            negative_ttl: None,
        };
    }
    let ttl = records.iter().map(Record::ttl).min().unwrap_or(0);
    Answer::Addrs(addrs, Duration::from_secs(u64::from(ttl)))
}

fn classify(e: &ResolveError) -> Answer {
    if let Some(proto) = e.proto() {
        if let ProtoErrorKind::NoRecordsFound { negative_ttl, .. } = proto.kind() {
            return Answer::Empty {
                nxdomain: proto.is_nx_domain(),
                negative_ttl: negative_ttl.map(|s| Duration::from_secs(u64::from(s))),
            };
        }
    }
    Answer::Failed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use svclb_common::Scheduler;

    fn settings() -> DnsSettings {
        DnsSettings {
            nameservers: vec!["172.50.0.53:53".parse().unwrap()],
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(10),
            stale_grace: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
        }
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn addrs(list: &[&str], ttl: u64) -> Answer {
        Answer::Addrs(ips(list), Duration::from_secs(ttl))
    }

    const NX: Answer = Answer::Empty {
        nxdomain: true,
        negative_ttl: None,
    };

    fn spec(name: &str) -> DiscoveredSpec {
        DiscoveredSpec {
            name: name.into(),
            vip: None,
            mark: None,
            scheduler: Scheduler::Random,
            terminate_on_removal: true,
        }
    }

    fn name() -> NameState {
        NameState::new("tasks.api".into(), Role::Tasks, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_follows_the_ttl_within_bounds() {
        let s = settings();
        let mut n = name();
        let t0 = Instant::now();
        assert!(n.record(addrs(&["10.0.0.1"], 3), t0, &s));
        assert_eq!(n.next_due, t0 + Duration::from_secs(3));
        assert!(!n.record(addrs(&["10.0.0.1"], 0), t0, &s), "same set");
        assert_eq!(n.next_due, t0 + s.min_refresh);
        n.record(addrs(&["10.0.0.1"], 600), t0, &s);
        assert_eq!(n.next_due, t0 + s.max_refresh, "Docker's TTL 600");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_set() {
        let s = settings();
        let mut n = name();
        let t0 = Instant::now();
        n.record(addrs(&["10.0.0.1", "10.0.0.2"], 5), t0, &s);
        for k in 1..=10u32 {
            let t = t0 + s.stale_grace * k;
            assert!(!n.record(Answer::Failed("timed out".into()), t, &s));
            assert_eq!(n.current(), ips(&["10.0.0.1", "10.0.0.2"]));
            assert!(n.stale);
            assert_eq!(n.consecutive_failures, k);
            assert!(n.next_due <= t + s.max_refresh);
        }
        assert!(n.reported_past_grace);
        assert!(n.record(addrs(&["10.0.0.3"], 5), t0, &s));
        assert!(!n.stale);
        assert_eq!(n.consecutive_failures, 0);
        assert!(n.last_success.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_max_refresh() {
        let s = settings();
        let mut n = name();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..6 {
            n.record(Answer::Failed("x".into()), t0, &s);
            waits.push((n.next_due - t0).as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert!(!n.stale, "nothing known: nothing stale");
    }

    #[tokio::test(start_paused = true)]
    async fn nxdomain_keeps_the_last_good_set_for_the_grace_period() {
        let s = settings();
        let mut n = name();
        let t0 = Instant::now();
        n.record(addrs(&["10.0.0.1"], 5), t0, &s);
        assert!(!n.record(NX, t0 + Duration::from_secs(1), &s));
        assert!(n.stale);
        assert_eq!(n.current(), ips(&["10.0.0.1"]));
        assert!(!n.record(NX, t0 + Duration::from_secs(30), &s));
        assert!(n.record(NX, t0 + Duration::from_secs(31), &s), "past grace");
        assert!(n.current().is_empty());
        assert!(!n.stale);
        // An answer in between restarts the grace period.
        n.record(addrs(&["10.0.0.1"], 5), t0, &s);
        n.record(NX, t0 + Duration::from_secs(40), &s);
        n.record(addrs(&["10.0.0.1"], 5), t0 + Duration::from_secs(41), &s);
        assert!(!n.record(NX, t0 + Duration::from_secs(75), &s));
        assert_eq!(n.current(), ips(&["10.0.0.1"]));
    }

    #[tokio::test(start_paused = true)]
    async fn nxdomain_with_nothing_known_is_applied_at_once() {
        let s = settings();
        let mut n = name();
        assert!(!n.record(NX, Instant::now(), &s));
        assert_eq!(n.addrs, Some(BTreeSet::new()));
        assert!(!n.stale);
    }

    fn discovery(specs: &[DiscoveredSpec]) -> Discovery {
        Discovery::new(specs, &settings()).unwrap()
    }

    fn answer(d: &mut Discovery, svc: usize, vips: &[&str], tasks: &[&str]) {
        let s = settings();
        let now = Instant::now();
        if let Some(v) = d.services[svc].vips.as_mut() {
            v.record(addrs(vips, 5), now, &s);
        }
        d.services[svc].tasks.record(addrs(tasks, 5), now, &s);
    }

    fn shown(state: &model::DesiredState) -> Vec<String> {
        state
            .services
            .iter()
            .map(|s| {
                let b: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
                format!("{} {} [{}]", s.name, s.vip, b.join(" "))
            })
            .collect()
    }

    #[tokio::test]
    async fn compose_one_service_per_vip_with_tasks_of_its_family() {
        let mut d = discovery(&[spec("api")]);
        answer(
            &mut d,
            0,
            &["10.0.0.2", "10.1.0.2", "fd00::2"],
            &["10.0.0.5", "10.1.0.5", "fd00::5"],
        );
        let out = d.compose(&model::DesiredState::default());
        assert_eq!(
            shown(&out),
            [
                "api 10.0.0.2 [10.0.0.5 10.1.0.5]",
                "api 10.1.0.2 [10.0.0.5 10.1.0.5]",
                "api fd00::2 [fd00::5]",
            ]
        );
        assert_eq!(out.services[0].mark, None);
    }

    #[tokio::test]
    async fn invalid_answers_keep_the_last_valid_set() {
        let statics = crate::config::parse_str(
            "[[service]]\nname = \"db\"\nvip = \"10.0.0.9\"\nbackends = [\"10.0.0.7\"]\n",
            "t",
        )
        .unwrap()
        .static_state();
        let mut d = discovery(&[spec("api")]);
        answer(&mut d, 0, &["10.0.0.2"], &["10.0.0.5"]);
        let good = d.compose(&statics);
        assert_eq!(shown(&good)[1], "api 10.0.0.2 [10.0.0.5]");
        for (vips, tasks, why) in [
            (&["10.0.0.2"][..], &["10.0.0.2"][..], "dnsrr"),
            (
                &["10.0.0.9"][..],
                &["10.0.0.5"][..],
                "already the VIP of service \"db\"",
            ),
            (
                &["10.0.0.7"][..],
                &["10.0.0.5"][..],
                "a backend of service \"db\"",
            ),
            (&["127.0.0.1"][..], &["10.0.0.5"][..], "loopback"),
            (
                &["10.0.0.2"][..],
                &["10.0.0.9"][..],
                "task 10.0.0.9 is the VIP",
            ),
        ] {
            answer(&mut d, 0, vips, tasks);
            assert_eq!(d.compose(&statics), good, "{why}");
            let rejected = d.status()[0].rejected.clone().unwrap();
            assert!(rejected.contains(why), "{rejected}");
        }
        answer(&mut d, 0, &["10.0.0.2"], &["10.0.0.6"]);
        assert_eq!(shown(&d.compose(&statics))[1], "api 10.0.0.2 [10.0.0.6]");
        assert!(d.status()[0].rejected.is_none());
    }

    #[tokio::test]
    async fn fixed_vip_and_no_vip() {
        let mut fixed = spec("db");
        fixed.vip = Some("10.0.0.20".parse().unwrap());
        fixed.mark = Some(0x128);
        let mut d = discovery(&[fixed, spec("gone")]);
        assert!(d.services[0].vips.is_none());
        answer(&mut d, 0, &[], &["10.0.0.21"]);
        let out = d.compose(&model::DesiredState::default());
        assert_eq!(shown(&out), ["db 10.0.0.20 [10.0.0.21]"]);
        assert_eq!(out.services[0].mark, Some(0x128));
        assert_eq!(d.status()[0].names.len(), 1);
        assert_eq!(d.status()[1].names.len(), 2);
    }

    #[tokio::test]
    async fn reconfigure_keeps_known_names() {
        let mut d = discovery(&[spec("api")]);
        answer(&mut d, 0, &["10.0.0.2"], &["10.0.0.5"]);
        d.reconfigure(&[spec("web"), spec("api")], &settings())
            .unwrap();
        let out = d.compose(&model::DesiredState::default());
        assert_eq!(shown(&out), ["api 10.0.0.2 [10.0.0.5]"]);
        assert_eq!(d.status()[0].service, "web");
        d.reconfigure(&[], &settings()).unwrap();
        assert!(d.next_due().is_none());
        assert!(d.resolver.is_none());
    }

    #[test]
    fn answer_of_takes_addresses_and_the_smallest_ttl() {
        use hickory_resolver::proto::rr::{rdata, Name};
        let name = Name::from_ascii("tasks.api.").unwrap();
        let records = [
            Record::from_rdata(
                name.clone(),
                30,
                RData::CNAME(rdata::CNAME(Name::from_ascii("x.").unwrap())),
            ),
            Record::from_rdata(name.clone(), 600, RData::A("10.0.0.5".parse().unwrap())),
            Record::from_rdata(
                name.clone(),
                600,
                RData::AAAA("::ffff:10.0.0.6".parse().unwrap()),
            ),
            Record::from_rdata(name.clone(), 600, RData::AAAA("fd00::5".parse().unwrap())),
        ];
        assert_eq!(
            answer_of(&records),
            addrs(&["10.0.0.5", "10.0.0.6", "fd00::5"], 30)
        );
        assert!(matches!(answer_of(&records[..1]), Answer::Empty { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_answer_is_refused_and_the_last_good_set_kept() {
        let s = settings();
        let mut n = name();
        let t0 = Instant::now();
        n.record(addrs(&["10.0.0.1"], 5), t0, &s);
        let huge: BTreeSet<IpAddr> = (0..=model::MAX_BACKENDS_PER_SERVICE as u32)
            .map(|i| IpAddr::V4((0x0b00_0000 + i).into()))
            .collect();
        assert!(!n.record(Answer::Addrs(huge, Duration::from_secs(5)), t0, &s));
        assert_eq!(n.current(), ips(&["10.0.0.1"]));
        assert!(n.stale);
        let e = n.last_error.clone().unwrap();
        assert!(e.contains("16385 addresses, more than the 16384"), "{e}");

        let mut v = NameState::new("api".into(), Role::Vips, t0);
        let vips: Vec<String> = (0..=MAX_VIPS_PER_NAME)
            .map(|i| format!("10.1.0.{i}"))
            .collect();
        let vips: Vec<&str> = vips.iter().map(String::as_str).collect();
        v.record(addrs(&vips, 5), t0, &s);
        assert!(v.current().is_empty(), "refused: nothing known yet");
        assert!(v
            .last_error
            .unwrap()
            .contains("65 addresses, more than the 64"));
    }

    #[tokio::test]
    async fn hostile_tasks_are_refused_keeping_the_last_valid_set() {
        let mut d = discovery(&[spec("api")]);
        d.record_answer("api", Role::Vips, addrs(&["10.0.0.2", "fd00::2"], 5));
        d.record_answer("api", Role::Tasks, addrs(&["10.0.0.5", "fd00::5"], 5));
        let good = d.compose(&model::DesiredState::default());
        model::check_state(&good).unwrap();
        for (tasks, why) in [
            (&["10.0.0.5", "127.0.0.1"][..], "loopback"),
            (&["::1"][..], "loopback"),
            (&["10.0.0.5", "0.0.0.0"][..], "unspecified"),
            (&["224.0.0.9"][..], "multicast"),
        ] {
            d.record_answer("api", Role::Tasks, addrs(tasks, 5));
            assert_eq!(d.compose(&model::DesiredState::default()), good, "{why}");
            let rejected = d.status()[0].rejected.clone().unwrap();
            assert!(rejected.contains(why), "{rejected}");
        }
    }

    /// Found by the dns_answer fuzz target: an answer for `api` naming the
    /// VIP fixed in the file for `web` (or a task of another service) took
    /// it over when `api` came first, and `web` was dropped whole.
    #[tokio::test]
    async fn an_answer_cannot_take_over_what_another_service_holds() {
        let mut web = spec("web");
        web.vip = Some("10.0.0.20".parse().unwrap());
        let mut d = discovery(&[spec("api"), web, spec("db")]);
        d.record_answer("api", Role::Vips, addrs(&["10.0.1.2"], 5));
        d.record_answer("api", Role::Tasks, addrs(&["10.0.1.5"], 5));
        d.record_answer("web", Role::Tasks, addrs(&["10.0.2.5"], 5));
        d.record_answer("db", Role::Vips, addrs(&["10.0.3.2"], 5));
        d.record_answer("db", Role::Tasks, addrs(&["10.0.3.5"], 5));
        let good = d.compose(&model::DesiredState::default());
        assert_eq!(good.services.len(), 3);
        for (vip, why) in [
            ("10.0.0.20", "already the VIP of service \"web\""),
            ("10.0.3.2", "already the VIP of service \"db\""),
            ("10.0.2.5", "a backend of service \"web\""),
        ] {
            d.record_answer("api", Role::Vips, addrs(&[vip], 5));
            assert_eq!(d.compose(&model::DesiredState::default()), good, "{why}");
            let rejected = d.status()[0].rejected.clone().unwrap();
            assert!(rejected.contains(why), "{rejected}");
        }
        // Given up by its holder, an address can move.
        d.record_answer("db", Role::Vips, addrs(&["10.0.3.3"], 5));
        d.compose(&model::DesiredState::default());
        d.record_answer("api", Role::Vips, addrs(&["10.0.3.2"], 5));
        let moved = d.compose(&model::DesiredState::default());
        assert!(moved
            .services
            .iter()
            .any(|s| s.name == "api" && s.vip.to_string() == "10.0.3.2"));
        assert!(d.status()[0].rejected.is_none());
    }
}
