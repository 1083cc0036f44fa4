//! The Docker engine as a source of desired state (`svclbd --docker`):
//! Swarm's own view of the services on this node, with no config file.
//!
//! What is read, and why:
//! - `GET /networks` and, per swarm-scope network (the ingress network
//!   excepted: routing-mesh traffic is not a connect to a VIP),
//!   `GET /networks/{id}?verbose=true`: its `Services`, each with `VIP`,
//!   `LocalLBIndex` (the firewall mark Swarm's iptables and IPVS rules use,
//!   the `FWM` number `ipvsadm -L -n` shows) and every task's `EndpointIP`.
//!   Each becomes one svclb service `<service>@<network>`: all ports kept
//!   (an FWM service, like Swarm's), round-robin (what Swarm programs),
//!   visible only to containers on that network. The engine fills `Services`
//!   only on nodes with a local endpoint on the network, which is exactly
//!   where a client can be.
//! - `GET /containers/json` (running ones) and, once per container,
//!   `GET /containers/{id}/json` for its PID: each container's cgroup is
//!   scoped to the swarm networks it is on (svclb_scopes), so a task sees
//!   the services of its networks only; a container on no swarm network gets
//!   an explicit empty scope and sees none of them.
//! - the subnets of every network `GET /networks` lists: with
//!   `--runtime-socket` (strict scoping, [`crate::runtime`]), a container
//!   svclb-runc announces is scoped from its interfaces' addresses before
//!   it starts, without asking the engine about it.
//! - `GET /events` (container, network, service events): any event leads to
//!   a resync of the whole view at once, and the events that arrive during
//!   it to one more; so does a (re)connect. And the view is polled (every
//!   second by default, svclbd --docker-poll): when a task is stopped (scale
//!   down, update, drain) the engine takes it out of the VIP first, waits
//!   2 s for the cluster to converge, then stops it, and no event tells of
//!   the first step. Polling within those 2 s takes the task out of svclb's
//!   schedule before its process goes away, so no connect reaches it.
//!
//! A service scaled to 0 vanishes from the network's `Services` while
//! Docker's DNS still answers its VIP: it is kept, with no backend (so
//! connects are refused at once), until `GET /services/{name}` says 404 or
//! its network leaves the node. A worker cannot ask about services (the
//! engine answers 503 there); it keeps the VIP until the network leaves the
//! node, which Swarm does once the node runs no task on it.
//!
//! When the engine cannot be reached, nothing changes: the last good view
//! stays in the maps, discovery is flagged stale (log and metrics), and the
//! event stream is reconnected with backoff.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::query_parameters::{
    EventsOptions, InspectContainerOptions, InspectNetworkOptions, InspectServiceOptions,
    ListContainersOptions, ListNetworksOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use svclb_common::Scheduler;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::cgroup::{cgroup2_mount, CgroupPath};
use crate::dataplane::{Dataplane, Snapshot};
use crate::docker;
use crate::model::{self, BackendSpec, DesiredState, ServiceSpec};

/// The label Swarm puts on a task's container: its service's name.
const SERVICE_LABEL: &str = "com.docker.swarm.service.name";

/// How soon after an event the whole view is read again (the incremental
/// path has already applied what a container start or stop tells alone).
pub const FULL_RESYNC_AFTER: Duration = Duration::from_millis(50);

/// The shortest --docker-poll period.
pub const MIN_POLL: Duration = Duration::from_millis(20);
/// How long a container svclb-runc announced keeps its scope while no
/// resync lists it running yet (between `runc create` and the engine
/// marking it running; a start that failed leaves it this long).
const ANNOUNCED_GRACE: Duration = Duration::from_secs(60);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Discovery health, for logs and metrics.
#[derive(Debug, Default)]
pub struct Status {
    /// The last resync failed: the maps hold the last good view.
    pub stale: AtomicBool,
    pub resyncs: AtomicU64,
    pub failures: AtomicU64,
    pub services: AtomicU64,
    pub events: AtomicU64,
    /// From the event to the maps, for the last apply an event caused.
    pub last_event_to_maps_us: AtomicU64,
    pub max_event_to_maps_us: AtomicU64,
}

impl Status {
    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let g = |name: &str, help: &str, kind: &str, v: u64| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        };
        [
            g(
                "svclb_docker_stale",
                "1 while the Docker engine cannot be read: the maps keep the last good view.",
                "gauge",
                u64::from(self.stale.load(Ordering::Relaxed)),
            ),
            g(
                "svclb_docker_services",
                "Services taken from the Docker engine (one per service and network).",
                "gauge",
                self.services.load(Ordering::Relaxed),
            ),
            g(
                "svclb_docker_resyncs_total",
                "Reads of the engine's view that succeeded.",
                "counter",
                self.resyncs.load(Ordering::Relaxed),
            ),
            g(
                "svclb_docker_resync_failures_total",
                "Reads of the engine's view that failed (nothing was changed).",
                "counter",
                self.failures.load(Ordering::Relaxed),
            ),
            g(
                "svclb_docker_events_total",
                "Events received from the engine.",
                "counter",
                self.events.load(Ordering::Relaxed),
            ),
            format!(
                "# HELP svclb_docker_event_to_maps_seconds From the engine's event to the maps updated, for the last change an event caused.\n\
                 # TYPE svclb_docker_event_to_maps_seconds gauge\n\
                 svclb_docker_event_to_maps_seconds {}\n\
                 # HELP svclb_docker_event_to_maps_max_seconds The longest such time since svclbd started.\n\
                 # TYPE svclb_docker_event_to_maps_max_seconds gauge\n\
                 svclb_docker_event_to_maps_max_seconds {}\n",
                self.last_event_to_maps_us.load(Ordering::Relaxed) as f64 / 1e6,
                self.max_event_to_maps_us.load(Ordering::Relaxed) as f64 / 1e6,
            ),
        ]
        .concat()
    }
}

/// Why the event follower wakes svclbd up.
#[derive(Debug)]
pub enum Wake {
    /// An event of this type and action; `stopping`: the container (ID) a
    /// terminating signal was just sent to, or that died; `draining`: that
    /// signal asks it to stop gracefully (SIGTERM, SIGINT, SIGQUIT: `docker
    /// stop`, a scale-down, an update), so its connections may finish;
    /// `started`: a container (ID) that started (again).
    Event {
        what: String,
        stopping: Option<String>,
        draining: bool,
        started: Option<String>,
        /// When the engine says it happened (Unix nanoseconds).
        at_ns: Option<i64>,
    },
    /// The event stream is (re)connected: resync, something may have been missed.
    Connected,
    /// The event stream broke.
    Lost(String),
}

/// The Docker source's state between resyncs.
pub struct DockerSync {
    docker: Docker,
    negotiated: bool,
    /// The last good view, by service name.
    services: BTreeMap<String, ServiceSpec>,
    /// Services refused (a conflict with the file's, or not valid), and why.
    refused: BTreeMap<String, String>,
    /// Each service's last version that went in, kept while it is refused.
    last_good: BTreeMap<String, ServiceSpec>,
    /// Container ID -> (its cgroup id, the swarm networks written for it).
    scoped: BTreeMap<String, (u64, Vec<String>)>,
    /// The cgroup Docker puts containers under: its id and the networks
    /// written for it.
    parent: Option<(u64, Option<Vec<String>>)>,
    /// What a container sees before its own scope is written.
    start_scope: StartScope,
    /// Containers svclb-runc announced, not yet listed running by a
    /// resync, and when: not taken for gone meanwhile.
    announced: BTreeMap<String, Instant>,
    /// Every network's subnets from the last resync, for scoping a
    /// container by its addresses.
    subnets: Subnets,
    /// When the last successful resync began reading the engine.
    read_at: Option<Instant>,
    /// Read by the last resync, written by [`DockerSync::write_scopes`].
    pending: Option<Pending>,
    /// Docker's services changed and are not applied yet.
    dirty: bool,
    /// Containers being stopped (a terminating signal was sent): their
    /// addresses are no backend any more, though the engine still lists
    /// them until they die.
    stopping: std::collections::BTreeSet<String>,
    /// Those of them stopping gracefully (see [`Wake::Event`]), and their
    /// addresses: a backend that leaves for this keeps its connections.
    draining: std::collections::BTreeSet<String>,
    draining_addrs: std::collections::HashSet<IpAddr>,
    /// The earliest event not yet followed by a resync, and the one the
    /// last resync followed (Unix nanoseconds): for event-to-maps times.
    event_since: Option<i64>,
    resynced_event: Option<i64>,
    /// Containers the incremental path saw start, to scope at once:
    /// ID -> (cgroup id, swarm networks).
    started_scopes: BTreeMap<String, (u64, Vec<String>)>,
    status: Arc<Status>,
}

/// What a container sees before svclbd has written its own scope (it
/// inherits the scope of the cgroup Docker puts containers under).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartScope {
    /// Every swarm network of the node: balanced from its first
    /// instruction, but for the milliseconds until its start event is
    /// handled, a container on network A could reach network B's VIPs,
    /// and one on no swarm network is balanced too.
    Union,
    /// None: svclb-runc has svclbd write the container's scope before it
    /// starts ([`crate::runtime`]); a container svclbd has not scoped is
    /// not touched.
    Strict,
}

/// One subnet of a network the engine lists.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetworkSubnet {
    net: ipnet::IpNet,
    network: String,
    /// A swarm network svclb follows (the others are known, not scoped).
    followed: bool,
}

/// The swarm networks on this node and the running containers.
#[derive(Debug)]
struct Pending {
    networks: Vec<String>,
    /// Container ID -> (cgroup id, its swarm networks).
    containers: BTreeMap<String, (u64, Vec<String>)>,
}

/// What one resync read.
struct View {
    services: BTreeMap<String, ServiceSpec>,
    pending: Pending,
    subnets: Subnets,
}

/// `<service>@<network>`: one svclb service per VIP.
pub fn service_name(service: &str, network: &str) -> String {
    format!("{service}@{network}")
}

fn is_docker_name(name: &str) -> bool {
    matches!(name.split_once('@'), Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('@'))
}

/// One service entry of a verbose network inspect.
#[derive(Debug, serde::Deserialize)]
struct ServiceEntry {
    #[serde(rename = "VIP", default)]
    vip: String,
    #[serde(rename = "LocalLBIndex", default)]
    local_lb_index: u64,
    #[serde(rename = "Tasks", default)]
    tasks: Option<Vec<TaskEntry>>,
}

#[derive(Debug, serde::Deserialize)]
struct TaskEntry {
    #[serde(rename = "EndpointIP", default)]
    endpoint_ip: String,
}

/// The svclb services of one network's verbose `Services`; entries that
/// cannot be one (no VIP: dnsrr mode; no mark) are skipped, and bad ones
/// reported.
pub fn services_of_network(
    network: &str,
    services: HashMap<String, serde_json::Value>,
) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for (svc, value) in services {
        let entry: ServiceEntry = match serde_json::from_value(value) {
            Ok(e) => e,
            Err(e) => {
                warn!(service = %svc, network, "unreadable service entry: {e}");
                continue;
            }
        };
        // Non-service containers on an attachable network appear under ""
        // with no VIP; dnsrr services have no VIP either.
        if svc.is_empty() || entry.vip.is_empty() || entry.local_lb_index == 0 {
            continue;
        }
        // Swarm's own names pass; anything else would reach logs and labels.
        if let Err(e) = model::check_name(&svc) {
            warn!(network, "service skipped: {e}");
            continue;
        }
        let name = service_name(&svc, network);
        let vip_text = entry.vip.split('/').next().unwrap_or_default();
        let vip = match vip_text.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical(),
            Err(_) => {
                warn!(service = %name, "VIP {:?} is not an address; skipped", entry.vip);
                continue;
            }
        };
        let Ok(mark) = u32::try_from(entry.local_lb_index) else {
            warn!(service = %name, "LocalLBIndex {} is out of range; skipped", entry.local_lb_index);
            continue;
        };
        if name.len() > svclb_common::SERVICE_NAME_LEN {
            warn!(service = %name, "the name is longer than {} bytes; skipped", svclb_common::SERVICE_NAME_LEN);
            continue;
        }
        // Each task once, of the VIP's family; what cannot be a task is
        // kept here and refused with the service by [`merge`].
        let mut addrs = std::collections::BTreeSet::new();
        for t in entry.tasks.unwrap_or_default() {
            let ip = t.endpoint_ip.split('/').next().unwrap_or_default();
            match ip.parse::<IpAddr>() {
                Ok(addr) if addr.to_canonical().is_ipv4() == vip.is_ipv4() => {
                    addrs.insert(addr.to_canonical());
                }
                Ok(_) => {}
                Err(_) => warn!(service = %name, "task address {:?} skipped", t.endpoint_ip),
            }
        }
        let backends: Vec<BackendSpec> = addrs
            .into_iter()
            .map(|addr| BackendSpec {
                addr,
                port: None,
                weight: 1,
            })
            .collect();
        out.push(ServiceSpec {
            name,
            vip,
            mark: Some(mark),
            scheduler: Scheduler::Rr,
            backends,
            port: None,
            affinity: None,
            networks: vec![network.to_owned()],
            // A task that is gone takes its connections with it.
            terminate_on_removal: true,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The Docker services in a snapshot of the maps (named `<service>@<network>`).
pub fn services_in_snapshot(snapshot: &Snapshot) -> BTreeMap<String, ServiceSpec> {
    let mut out = BTreeMap::new();
    for s in snapshot.services.values() {
        if !is_docker_name(&s.name) || s.port.is_some() {
            continue;
        }
        out.insert(s.name.clone(), crate::reconcile::spec_of(snapshot, s));
    }
    out
}

/// Merges Docker's services into the file's: one that takes a VIP or a
/// mark of the file's (or of an earlier Docker service), or that is not a
/// valid service ([`model::check_discovered`]: a VIP that is also a task,
/// a loopback, multicast or unspecified address, too many tasks), is
/// refused, named in `refused` with why; its version in `last_good` (the
/// last one that went in) goes in instead, if it still can. The others go
/// in, and become their `last_good`.
pub fn merge(
    statics: &DesiredState,
    docker: &BTreeMap<String, ServiceSpec>,
    refused: &mut BTreeMap<String, String>,
    last_good: &mut BTreeMap<String, ServiceSpec>,
) -> DesiredState {
    // Who has a VIP or a mark, named only when a conflict is reported.
    let mut vips: HashMap<IpAddr, Owner> = HashMap::new();
    let mut marks: HashMap<u32, Owner> = HashMap::new();
    for s in &statics.services {
        vips.insert(s.vip, Owner::File(&s.name));
        if let Some(m) = s.mark {
            marks.insert(m, Owner::File(&s.name));
        }
    }
    let mut out = statics.clone();
    let mut now_refused = BTreeMap::new();
    last_good.retain(|name, _| docker.contains_key(name));
    for (name, spec) in docker {
        let why_not = |spec: &ServiceSpec| {
            if let Some(other) = vips.get(&spec.vip) {
                Err(format!(
                    "its VIP {} is already the VIP of {other}",
                    spec.vip
                ))
            } else if let Some(other) = spec.mark.and_then(|m| marks.get(&m)) {
                Err(format!(
                    "its mark {} (LocalLBIndex) is already the mark of {other}",
                    spec.mark.unwrap_or_default()
                ))
            } else {
                model::check_discovered(spec)
            }
        };
        let chosen = match why_not(spec) {
            Ok(()) => {
                last_good.insert(name.clone(), spec.clone());
                Some(spec)
            }
            Err(why) => {
                let kept = last_good.get(name).filter(|old| why_not(old).is_ok());
                if refused.get(name) != Some(&why) {
                    match kept {
                        Some(_) => {
                            error!(service = %name, "Docker service refused, keeping its last good version: {why}")
                        }
                        None => {
                            error!(service = %name, "Docker service refused, nothing of it is applied: {why}")
                        }
                    }
                }
                now_refused.insert(name.clone(), why);
                kept
            }
        };
        if let Some(spec) = chosen {
            vips.insert(spec.vip, Owner::Docker(name));
            if let Some(m) = spec.mark {
                marks.insert(m, Owner::Docker(name));
            }
            out.services.push(spec.clone());
        }
    }
    for name in refused.keys() {
        if !now_refused.contains_key(name) {
            info!(service = %name, "Docker service no longer conflicts: applied");
        }
    }
    *refused = now_refused;
    out
}

/// A service that holds a VIP or a mark, in [`merge`]'s messages.
enum Owner<'a> {
    File(&'a str),
    Docker(&'a str),
}

impl std::fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::File(name) => write!(f, "{name:?} of the config file"),
            Owner::Docker(name) => write!(f, "Docker service {name:?}"),
        }
    }
}

/// Where Docker puts containers' cgroups, relative to the cgroup2 mount:
/// the parent of a running container's cgroup when there is one, else the
/// driver's default (`/docker` for cgroupfs, `/system.slice` for systemd).
pub fn default_parent(driver: &str) -> &'static str {
    match driver {
        "systemd" => "/system.slice",
        _ => "/docker",
    }
}

/// The subnets of the networks the engine listed at a resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subnets(Vec<NetworkSubnet>);

impl Subnets {
    /// The followed swarm networks `addresses` are on, and the addresses in
    /// no listed network (loopback and link-local ones aside): on a network
    /// new to this node, which a resync would tell.
    pub fn networks_at(&self, addresses: &[IpAddr]) -> (Vec<String>, Vec<IpAddr>) {
        let mut networks = Vec::new();
        let mut unknown = Vec::new();
        for addr in addresses {
            let addr = addr.to_canonical();
            let link_local = match addr {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            if addr.is_loopback() || link_local {
                continue;
            }
            let mut known = false;
            for s in self.0.iter().filter(|s| s.net.contains(&addr)) {
                known = true;
                if s.followed && !networks.contains(&s.network) {
                    networks.push(s.network.clone());
                }
            }
            if !known {
                unknown.push(addr);
            }
        }
        networks.sort();
        (networks, unknown)
    }
}

impl DockerSync {
    /// A source for the engine at `host`, starting from the Docker services
    /// the maps already hold (so a restart while the engine is away, or a
    /// service kept at 0 tasks, changes nothing).
    pub fn new(host: Option<&str>, snapshot: &Snapshot) -> Result<Self> {
        let services = services_in_snapshot(snapshot);
        if !services.is_empty() {
            info!(
                services = services.len(),
                "starting from the Docker services the pinned maps hold"
            );
        }
        Ok(DockerSync {
            docker: docker::client(host)?,
            negotiated: false,
            services,
            refused: BTreeMap::new(),
            last_good: BTreeMap::new(),
            scoped: BTreeMap::new(),
            started_scopes: BTreeMap::new(),
            parent: None,
            start_scope: StartScope::Union,
            announced: BTreeMap::new(),
            subnets: Subnets::default(),
            read_at: None,
            pending: None,
            dirty: true,
            stopping: Default::default(),
            draining: Default::default(),
            draining_addrs: Default::default(),
            event_since: None,
            resynced_event: None,
            status: Arc::new(Status::default()),
        })
    }

    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    pub fn client(&self) -> Docker {
        self.docker.clone()
    }

    /// The Docker services now (the last good view).
    pub fn services(&self) -> &BTreeMap<String, ServiceSpec> {
        &self.services
    }

    /// The file's services plus Docker's (conflicts refused).
    pub fn compose(&mut self, statics: &DesiredState) -> DesiredState {
        merge(
            statics,
            &self.services,
            &mut self.refused,
            &mut self.last_good,
        )
    }

    async fn ensure_negotiated(&mut self) -> Result<()> {
        if !self.negotiated {
            docker::negotiate(&self.docker).await?;
            self.negotiated = true;
        }
        Ok(())
    }

    /// Forget the API version: the engine may have been replaced.
    pub fn reconnected(&mut self) {
        self.negotiated = false;
    }

    /// The cgroup that holds Docker's containers, created when missing (so
    /// svclb can attach before the first container starts): `given`, or
    /// the parent of a running container's cgroup, or the driver's default.
    pub async fn containers_cgroup(&mut self, given: Option<&Path>) -> Result<CgroupPath> {
        let relative: PathBuf = match given {
            Some(p) => p.to_path_buf(),
            None => {
                self.ensure_negotiated().await?;
                let info = self
                    .docker
                    .info()
                    .await
                    .map_err(|e| docker::explain(e, "GET /info"))?;
                let driver = info
                    .cgroup_driver
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                let version = info
                    .cgroup_version
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                match self.a_container_cgroup().await? {
                    Some(cg) => {
                        let parent = cg
                            .relative
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_default();
                        info!(
                            cgroup_driver = %driver, cgroup_version = %version,
                            "containers' cgroups are under {} (from a running container's)",
                            parent.display()
                        );
                        parent
                    }
                    None => {
                        let p = default_parent(&driver);
                        info!(
                            cgroup_driver = %driver, cgroup_version = %version,
                            "no container runs: taking the driver's default {p} (--docker-cgroup-parent to choose)"
                        );
                        PathBuf::from(p)
                    }
                }
            }
        };
        let root = cgroup2_mount()?;
        let absolute = root.join(relative.strip_prefix("/").unwrap_or(&relative));
        if absolute == root {
            bail!(
                "Docker's containers are in the root cgroup: svclb will not attach there \
                 (give --docker-cgroup-parent)"
            );
        }
        if !absolute.exists() {
            std::fs::create_dir_all(&absolute)
                .with_context(|| format!("creating {}", absolute.display()))?;
            info!(cgroup = %absolute.display(), "created, so containers are covered from their start");
        }
        CgroupPath::resolve(&absolute)
    }

    async fn a_container_cgroup(&self) -> Result<Option<CgroupPath>> {
        let list = self
            .docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .map_err(|e| docker::explain(e, "GET /containers/json"))?;
        for c in list {
            let Some(id) = c.id else { continue };
            if let Ok(pid) = docker::container_pid(&self.docker, &id).await {
                if let Ok(cg) = CgroupPath::of_pid(pid) {
                    return Ok(Some(cg));
                }
            }
        }
        Ok(None)
    }

    /// Records the cgroup svclbd attached to for containers and what it
    /// gives them before their own scope is written ([`StartScope`]).
    pub fn set_parent(&mut self, parent: &CgroupPath, start_scope: StartScope) -> Result<()> {
        self.parent = Some((parent.id()?, None));
        self.start_scope = start_scope;
        Ok(())
    }

    /// The subnets the last resync read (a copy: announcements are
    /// answered from it while the next resync reads the engine).
    pub fn subnets(&self) -> Subnets {
        self.subnets.clone()
    }

    /// Whether the last resync began reading the engine after `at`.
    pub fn read_since(&self, at: Instant) -> bool {
        self.read_at.is_some_and(|r| r >= at)
    }

    /// Writes the scope of a container svclb-runc announced (its cgroup,
    /// on `networks`), before it starts; then [`DockerSync::created`]
    /// records it.
    pub fn write_created(dp: &mut Dataplane, cgroup_id: u64, networks: &[String]) -> Result<()> {
        if networks.is_empty() {
            dp.set_cgroup_no_networks(cgroup_id)
        } else {
            dp.set_cgroup_networks(cgroup_id, networks)
        }
    }

    /// Records an announced container's scope, written by
    /// [`DockerSync::write_created`]: the resyncs keep it from then on.
    pub fn created(&mut self, id: &str, cgroup_id: u64, networks: Vec<String>) {
        self.scoped.insert(id.to_owned(), (cgroup_id, networks));
        self.announced.insert(id.to_owned(), Instant::now());
    }

    /// A container the resync scopes for the first time: in strict mode,
    /// once the containers running at startup are scoped, svclb-runc should
    /// have announced it.
    fn note_late(&self, id: &str, warmed_up: bool) {
        if warmed_up && self.start_scope == StartScope::Strict && !self.scoped.contains_key(id) {
            warn!(
                container = %id,
                "scoped only now, after its start: svclb-runc did not announce it (is Docker's \
                 default runtime svclb-runc, and was svclbd reachable?)"
            );
        }
    }

    /// Reads the engine's view. `Ok(true)` when Docker's services differ
    /// from the last applied ones (apply [`DockerSync::compose`], then call
    /// [`DockerSync::applied`]); the containers' scopes are written by
    /// [`DockerSync::write_scopes`] after that apply. On error nothing
    /// changes.
    pub async fn resync(&mut self) -> Result<bool> {
        self.resynced_event = self.event_since.take();
        let started = Instant::now();
        match self.read_view().await {
            Ok(view) => {
                if self.status.stale.swap(false, Ordering::Relaxed) {
                    info!("the Docker engine answers again: discovery is current");
                }
                self.status.resyncs.fetch_add(1, Ordering::Relaxed);
                if view.services != self.services {
                    self.dirty = true;
                }
                if !self.dirty {
                    // A poll may have applied what this event announced:
                    // the next change is not timed from it.
                    self.resynced_event = None;
                }
                self.services = view.services;
                self.pending = Some(view.pending);
                self.subnets = view.subnets;
                self.read_at = Some(started);
                self.status
                    .services
                    .store(self.services.len() as u64, Ordering::Relaxed);
                Ok(self.dirty)
            }
            Err(e) => {
                self.status.failures.fetch_add(1, Ordering::Relaxed);
                if !self.status.stale.swap(true, Ordering::Relaxed) {
                    warn!("Docker discovery is stale, the maps keep the last good view: {e:#}");
                } else {
                    debug!("Docker discovery still stale: {e:#}");
                }
                self.negotiated = false;
                Err(e)
            }
        }
    }

    /// The incremental path, for one container that started or is being
    /// stopped: reads that container alone (its service label and its
    /// addresses) and adds them to, or takes them out of, the services it
    /// is a task of, without reading every network's view (a few hundred
    /// ms at 10,000 services). Returns the services changed: apply them
    /// ([`DockerSync::accepted`] and [`crate::reconcile::apply_backends`],
    /// else [`DockerSync::compose`]), then call [`DockerSync::applied`]. A
    /// container of no known service (a new service's first task) changes
    /// nothing here; the full resync that follows every event decides it,
    /// and corrects anything this path got wrong.
    pub async fn container_event(&mut self, id: &str, started: bool) -> Result<Vec<String>> {
        self.ensure_negotiated().await?;
        let inspect = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| docker::explain(e, &format!("GET /containers/{id}/json")))?;
        let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
        let Some(service) = labels.and_then(|l| l.get(SERVICE_LABEL)).cloned() else {
            return Ok(Vec::new());
        };
        let state = inspect.state.as_ref();
        // A task with a health check joins its VIP once healthy.
        let health = state.and_then(|s| s.health.as_ref()).and_then(|h| h.status);
        if started
            && health.is_some_and(|h| {
                h != bollard::models::HealthStatusEnum::HEALTHY
                    && h != bollard::models::HealthStatusEnum::NONE
                    && h != bollard::models::HealthStatusEnum::EMPTY
            })
        {
            return Ok(Vec::new());
        }
        let networks = inspect
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default();
        let mut changed = Vec::new();
        let mut swarm_nets = Vec::new();
        for (net, endpoint) in &networks {
            let name = service_name(&service, net);
            let Some(spec) = self.services.get_mut(&name) else {
                continue;
            };
            swarm_nets.push(net.clone());
            let addr = endpoint
                .ip_address
                .as_deref()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .map(|a| a.to_canonical());
            let Some(addr) = addr.filter(|a| a.is_ipv4() == spec.vip.is_ipv4()) else {
                continue;
            };
            let at = spec.backends.iter().position(|b| b.addr == addr);
            match (started, at) {
                (true, None) => {
                    spec.backends.push(BackendSpec {
                        addr,
                        port: None,
                        weight: 1,
                    });
                    spec.backends.sort_by_key(|b| b.addr);
                    changed.push(name);
                }
                (false, Some(i)) => {
                    spec.backends.remove(i);
                    changed.push(name);
                    if self.draining.contains(id) {
                        self.draining_addrs.insert(addr);
                    }
                }
                _ => {}
            }
        }
        if started && !swarm_nets.is_empty() {
            let pid = state.and_then(|s| s.pid);
            let running = state.and_then(|s| s.running);
            let cgroup = docker::pid_of(id, running, pid)
                .and_then(CgroupPath::of_pid)
                .and_then(|cg| cg.id());
            if let Ok(cg) = cgroup {
                swarm_nets.sort();
                self.started_scopes.insert(id.to_owned(), (cg, swarm_nets));
            }
        }
        if !changed.is_empty() {
            self.dirty = true;
            self.resynced_event = self.event_since.take();
            debug!(container = %id, service = %service, started, "applied from the container alone");
        }
        Ok(changed)
    }

    /// A backend that leaves because its container is stopping gracefully
    /// keeps its connections (they finish as the task shuts down, as with
    /// IPVS, which keeps a removed destination's connections): its sockets
    /// are not ended. One that dies, is SIGKILLed or vanishes is ended.
    pub fn spare_draining(&self, plan: &mut crate::reconcile::Plan) {
        for d in &mut plan.departed {
            if self.draining_addrs.contains(&d.addr) {
                d.end_sockets = false;
            }
        }
    }

    /// The specs of `names` as the composed state has them, if all are
    /// there as Docker gives them (none refused for a conflict).
    pub fn accepted(&self, names: &[String]) -> Option<Vec<&ServiceSpec>> {
        names
            .iter()
            .map(|n| {
                self.services
                    .get(n)
                    .filter(|_| !self.refused.contains_key(n))
            })
            .collect()
    }

    /// A container is being stopped: take its addresses out of every
    /// service at the next resync. The engine keeps a stopping task in its
    /// view until the process is gone, and sends no event in between; new
    /// connects must not go to a task that is shutting down.
    pub fn container_stopping(&mut self, id: String) {
        self.stopping.insert(id);
    }

    /// Takes note of what an event says about a container's life: stopping
    /// (see [`DockerSync::container_stopping`]) or started again (a
    /// restarted container is no longer stopping).
    pub fn note(&mut self, wake: &Wake) {
        if let Wake::Event {
            stopping,
            draining,
            started,
            at_ns,
            ..
        } = wake
        {
            if let Some(at) = at_ns {
                self.event_since = Some(self.event_since.map_or(*at, |e| e.min(*at)));
            }
            if let Some(id) = stopping {
                self.container_stopping(id.clone());
                if *draining {
                    self.draining.insert(id.clone());
                } else {
                    self.draining.remove(id);
                }
            }
            if let Some(id) = started {
                self.stopping.remove(id);
                self.draining.remove(id);
            }
        }
    }

    /// The services from the last resync are in the maps. Returns how long
    /// after the event that caused it, if an event did.
    pub fn applied(&mut self) -> Option<Duration> {
        self.dirty = false;
        let at = self.resynced_event.take()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as i64;
        let took = Duration::from_nanos(now.saturating_sub(at).max(0) as u64);
        let us = took.as_micros() as u64;
        self.status
            .last_event_to_maps_us
            .store(us, Ordering::Relaxed);
        self.status
            .max_event_to_maps_us
            .fetch_max(us, Ordering::Relaxed);
        Some(took)
    }

    async fn read_view(&mut self) -> Result<View> {
        self.ensure_negotiated().await?;
        let list = self
            .docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .map_err(|e| docker::explain(e, "GET /containers/json"))?;
        // Addresses of the containers being stopped; a container no longer
        // running is forgotten (the engine drops it from its view too).
        let running: Vec<&str> = list.iter().filter_map(|c| c.id.as_deref()).collect();
        self.stopping.retain(|id| running.contains(&id.as_str()));
        self.draining.retain(|id| running.contains(&id.as_str()));
        self.draining_addrs.clear();
        let mut leaving: Vec<IpAddr> = Vec::new();
        for c in &list {
            let Some(id) = c.id.as_ref().filter(|id| self.stopping.contains(*id)) else {
                continue;
            };
            let nets = c
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref());
            for ep in nets.into_iter().flat_map(|m| m.values()) {
                if let Some(ip) = ep.ip_address.as_deref().and_then(|a| a.parse().ok()) {
                    leaving.push(ip);
                    if self.draining.contains(id) {
                        self.draining_addrs.insert(ip);
                    }
                }
            }
        }
        let nets = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|e| docker::explain(e, "GET /networks"))?;
        let mut swarm: Vec<String> = Vec::new();
        let mut found: BTreeMap<String, ServiceSpec> = BTreeMap::new();
        let mut subnets = Vec::new();
        for n in nets {
            for config in n.ipam.iter().flat_map(|i| i.config.iter().flatten()) {
                let (Some(name), Some(text)) = (&n.name, &config.subnet) else {
                    continue;
                };
                match text.parse::<ipnet::IpNet>() {
                    Ok(net) => subnets.push(NetworkSubnet {
                        net,
                        network: name.clone(),
                        followed: false,
                    }),
                    Err(e) => debug!("network {name}: subnet {text:?} not understood: {e}"),
                }
            }
            if n.scope.as_deref() != Some("swarm") || n.ingress == Some(true) {
                continue;
            }
            let (Some(id), Some(name)) = (n.id, n.name) else {
                continue;
            };
            if let Err(e) = model::check_network(&name) {
                debug!("network {name}: not followed: {e}");
                continue;
            }
            let options = InspectNetworkOptions {
                verbose: true,
                scope: None,
            };
            let inspect = match self.docker.inspect_network(&id, Some(options)).await {
                Ok(i) => i,
                // Removed since the list.
                Err(e) if docker::is_not_found(&e) => continue,
                Err(e) => return Err(docker::explain(e, &format!("GET /networks/{id}"))),
            };
            for mut spec in services_of_network(&name, inspect.services.unwrap_or_default()) {
                spec.backends.retain(|b| !leaving.contains(&b.addr));
                found.insert(spec.name.clone(), spec);
            }
            swarm.push(name);
        }
        // Services gone from the view: scaled to 0 (keep the VIP) or removed.
        for (name, old) in &self.services {
            if found.contains_key(name) {
                continue;
            }
            let Some((svc, net)) = name.split_once('@') else {
                continue;
            };
            if !swarm.iter().any(|n| n == net) {
                info!(service = %name, "its network left this node: removed");
                continue;
            }
            match self
                .docker
                .inspect_service(svc, None::<InspectServiceOptions>)
                .await
            {
                Err(e) if docker::is_not_found(&e) => {
                    info!(service = %name, "the service is removed from the swarm: removed");
                    continue;
                }
                Err(bollard::errors::Error::DockerResponseServerError { .. }) | Ok(_) => {}
                Err(e) => {
                    return Err(docker::explain(e, &format!("GET /services/{svc}")));
                }
            }
            if !old.backends.is_empty() {
                info!(
                    service = %name,
                    "no task left: keeping its VIP {} with no backend (connects are refused) until the service is removed",
                    old.vip
                );
            }
            let mut kept = old.clone();
            kept.backends.clear();
            found.insert(name.clone(), kept);
        }
        // Containers and the swarm networks they are on.
        let mut containers = BTreeMap::new();
        for c in list {
            let Some(id) = c.id else { continue };
            let mut nets: Vec<String> = c
                .network_settings
                .and_then(|n| n.networks)
                .map(|m| m.into_keys().filter(|n| swarm.contains(n)).collect())
                .unwrap_or_default();
            nets.sort();
            let cgroup_id = match self.scoped.get(&id) {
                Some((cg, _)) => *cg,
                None => match self.container_cgroup_id(&id).await {
                    Ok(cg) => cg,
                    Err(e) => {
                        // Gone since the list, most likely.
                        debug!(container = %id, "no cgroup: {e:#}");
                        continue;
                    }
                },
            };
            containers.insert(id, (cgroup_id, nets));
        }
        for s in &mut subnets {
            s.followed = swarm.contains(&s.network);
        }
        Ok(View {
            services: found,
            pending: Pending {
                networks: swarm,
                containers,
            },
            subnets: Subnets(subnets),
        })
    }

    async fn container_cgroup_id(&self, id: &str) -> Result<u64> {
        let inspect = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| docker::explain(e, &format!("GET /containers/{id}/json")))?;
        let state = inspect.state.context("no State")?;
        let pid = docker::pid_of(id, state.running, state.pid)?;
        CgroupPath::of_pid(pid)?.id()
    }

    /// Writes the containers' scopes read by the last resync: each on its
    /// swarm networks, one on none explicitly on none; the parent on all
    /// ([`StartScope::Union`]) or none ([`StartScope::Strict`]).
    pub fn write_scopes(&mut self, dp: &mut Dataplane) -> Result<()> {
        // The containers running at startup are being scoped for the first
        // time: none of them is late.
        let warmed_up = self.parent.as_ref().is_some_and(|(_, w)| w.is_some());
        // Containers the incremental path saw start: scoped now, before
        // the next full resync lists them with every other.
        for (cid, (cg, nets)) in std::mem::take(&mut self.started_scopes) {
            if self.scoped.get(&cid) != Some(&(cg, nets.clone())) {
                self.note_late(&cid, warmed_up);
                dp.set_cgroup_networks(cg, &nets)?;
                debug!(container = %cid, networks = ?nets, "scoped");
                self.scoped.insert(cid, (cg, nets));
            }
        }
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let start_networks = match self.start_scope {
            StartScope::Union => pending.networks.clone(),
            StartScope::Strict => Vec::new(),
        };
        if let Some((id, written)) = &mut self.parent {
            if written.as_ref() != Some(&start_networks) {
                if start_networks.is_empty() {
                    dp.set_cgroup_no_networks(*id)?;
                } else {
                    dp.set_cgroup_networks(*id, &start_networks)?;
                }
                match self.start_scope {
                    StartScope::Union => info!(networks = ?start_networks, "containers start on the swarm networks of this node"),
                    StartScope::Strict => info!("containers start on no network: each is scoped when svclb-runc announces it"),
                }
                *written = Some(start_networks);
            }
        }
        for (cid, (cg, nets)) in &pending.containers {
            self.announced.remove(cid);
            if self.scoped.get(cid) == Some(&(*cg, nets.clone())) {
                continue;
            }
            self.note_late(cid, warmed_up);
            if nets.is_empty() {
                dp.set_cgroup_no_networks(*cg)?;
            } else {
                dp.set_cgroup_networks(*cg, nets)?;
            }
            debug!(container = %cid, networks = ?nets, "scoped");
            self.scoped.insert(cid.clone(), (*cg, nets.clone()));
        }
        // An announced container is not running yet while its start goes on.
        self.announced
            .retain(|_, at| at.elapsed() < ANNOUNCED_GRACE);
        let gone: Vec<String> = self
            .scoped
            .keys()
            .filter(|c| !pending.containers.contains_key(*c) && !self.announced.contains_key(*c))
            .cloned()
            .collect();
        for cid in gone {
            if let Some((cg, _)) = self.scoped.remove(&cid) {
                dp.set_cgroup_networks(cg, &[])?;
            }
        }
        Ok(())
    }
}

/// Signals `docker stop` (the usual stop signals) and `docker kill` send
/// to end a container.
fn is_terminating(signal: i32) -> bool {
    is_graceful(signal) || signal == 9
}

/// Stop signals a task may handle by finishing its work (SIGINT, SIGQUIT,
/// SIGTERM).
fn is_graceful(signal: i32) -> bool {
    matches!(signal, 2 | 3 | 15)
}

/// What an event from `GET /events` says; `None` for what changes
/// nothing (docker exec and health probes' execs).
pub fn wake_of(ev: bollard::models::EventMessage) -> Option<Wake> {
    let action = ev.action.unwrap_or_default();
    if action.starts_with("exec_") {
        return None;
    }
    let typ = ev.typ.map(|t| t.to_string()).unwrap_or_default();
    let what = format!("{typ} {action}");
    let actor = ev.actor.unwrap_or_default();
    let signal = actor
        .attributes
        .as_ref()
        .and_then(|a| a.get("signal"))
        .and_then(|s| s.parse::<i32>().ok());
    let container = actor.id.filter(|_| typ == "container");
    let stopping = container
        .clone()
        .filter(|_| action == "die" || (action == "kill" && signal.is_some_and(is_terminating)));
    let draining = stopping.is_some() && action == "kill" && signal.is_some_and(is_graceful);
    // A task with a health check joins its VIP when healthy.
    let started = container.filter(|_| action == "start" || action == "health_status: healthy");
    Some(Wake::Event {
        what,
        stopping,
        draining,
        started,
        at_ns: ev.time_nano,
    })
}

fn wake_matters(wake: &Wake) -> bool {
    matches!(
        wake,
        Wake::Event {
            stopping: Some(_),
            ..
        }
    )
}

/// Follows `GET /events` and wakes svclbd up: on every relevant event, on
/// each (re)connect, and when the stream breaks; reconnects with backoff.
pub fn follow_events(docker: Docker, status: Arc<Status>, tx: mpsc::Sender<Wake>) {
    tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut lost_reported = false;
        loop {
            if let Err(e) = docker::negotiate(&docker).await {
                if !lost_reported {
                    let _ = tx.send(Wake::Lost(format!("{e:#}"))).await;
                    lost_reported = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            // Replays what happened since a second ago: nothing between
            // this subscription and the resync below is missed.
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(1))
                .unwrap_or(0);
            let options = EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(HashMap::from([(
                    "type".to_owned(),
                    vec![
                        "container".to_owned(),
                        "network".to_owned(),
                        "service".to_owned(),
                    ],
                )])),
            };
            let mut stream = docker.events(Some(options));
            if tx.send(Wake::Connected).await.is_err() {
                return;
            }
            backoff = BACKOFF_MIN;
            let why = loop {
                match stream.next().await {
                    Some(Ok(ev)) => {
                        status.events.fetch_add(1, Ordering::Relaxed);
                        let Some(wake) = wake_of(ev) else {
                            continue;
                        };
                        if wake_matters(&wake) {
                            // Must not be lost: it takes a task out now.
                            if tx.send(wake).await.is_err() {
                                return;
                            }
                        } else {
                            // A full channel already holds a wake-up.
                            let _ = tx.try_send(wake);
                        }
                    }
                    Some(Err(e)) => break format!("{e}"),
                    None => break "the engine closed the event stream".to_owned(),
                }
            };
            if tx.send(Wake::Lost(why)).await.is_err() {
                return;
            }
            lost_reported = true;
            tokio::time::sleep(backoff).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect_services(json: &str) -> HashMap<String, serde_json::Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_network_view_becomes_services() {
        // As the 20.10 engine answers `GET /networks/{id}?verbose=true`.
        let services = inspect_services(
            r#"{
            "api": {"VIP": "172.50.0.2", "Ports": [], "LocalLBIndex": 257,
                    "Tasks": [{"Name": "api.2.x", "EndpointID": "e2", "EndpointIP": "172.50.0.4", "Info": {"Host IP": "127.0.0.1"}},
                              {"Name": "api.1.y", "EndpointID": "e1", "EndpointIP": "172.50.0.3", "Info": {"Host IP": "127.0.0.1"}}]},
            "web": {"VIP": "172.50.0.5/32", "Ports": [], "LocalLBIndex": 258, "Tasks": null},
            "": {"VIP": "", "Ports": [], "LocalLBIndex": 0, "Tasks": [{"Name": "plain", "EndpointIP": "172.50.0.9"}]},
            "dnsrr": {"VIP": "", "LocalLBIndex": 0, "Tasks": [{"Name": "d.1", "EndpointIP": "172.50.0.10"}]}
        }"#,
        );
        let specs = services_of_network("backend", services);
        assert_eq!(specs.len(), 2, "{specs:?}");
        let api = &specs[0];
        assert_eq!(api.name, "api@backend");
        assert_eq!(api.vip, "172.50.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(api.mark, Some(257));
        assert_eq!(api.networks, vec!["backend".to_owned()]);
        assert_eq!(api.port, None);
        let addrs: Vec<String> = api.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["172.50.0.3", "172.50.0.4"]);
        assert!(api
            .backends
            .iter()
            .all(|b| b.port.is_none() && b.weight == 1));
        let web = &specs[1];
        assert_eq!(web.vip, "172.50.0.5".parse::<IpAddr>().unwrap());
        assert!(web.backends.is_empty());
    }

    fn spec(name: &str, vip: &str, mark: Option<u32>) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            vip: vip.parse().unwrap(),
            mark,
            scheduler: Scheduler::Rr,
            backends: Vec::new(),
            port: None,
            affinity: None,
            networks: Vec::new(),
            terminate_on_removal: true,
        }
    }

    #[test]
    fn conflicts_with_the_file_are_refused_and_named() {
        let statics = DesiredState {
            services: vec![spec("db", "172.50.0.2", Some(300))],
        };
        let docker = BTreeMap::from([
            ("api@n".to_owned(), spec("api@n", "172.50.0.2", Some(257))),
            ("web@n".to_owned(), spec("web@n", "172.50.0.5", Some(300))),
            ("ok@n".to_owned(), spec("ok@n", "172.50.0.6", Some(259))),
        ]);
        let mut refused = BTreeMap::new();
        let mut last_good = BTreeMap::new();
        let merged = merge(&statics, &docker, &mut refused, &mut last_good);
        let names: Vec<&str> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "ok@n"]);
        assert!(refused["api@n"].contains("VIP 172.50.0.2") && refused["api@n"].contains("\"db\""));
        assert!(refused["web@n"].contains("mark 300"));
        // Without the conflict, they go in.
        let merged = merge(
            &DesiredState::default(),
            &docker,
            &mut refused,
            &mut last_good,
        );
        assert_eq!(merged.services.len(), 3);
        assert!(refused.is_empty());
    }

    #[tokio::test]
    async fn a_restarted_container_is_no_longer_stopping() {
        let dir = std::env::temp_dir().join(format!("svclb-sync-docker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let host = format!("unix://{}", path.display());
        let mut d = DockerSync::new(Some(&host), &Snapshot::default()).unwrap();
        let event = |stopping: Option<&str>, started: Option<&str>| Wake::Event {
            what: "container".to_owned(),
            stopping: stopping.map(str::to_owned),
            draining: false,
            started: started.map(str::to_owned),
            at_ns: None,
        };
        d.note(&event(Some("c1"), None));
        d.note(&event(Some("c2"), None));
        assert!(d.stopping.contains("c1") && d.stopping.contains("c2"));
        d.note(&event(None, Some("c1")));
        assert!(!d.stopping.contains("c1") && d.stopping.contains("c2"));
        d.note(&Wake::Connected);
        assert!(d.stopping.contains("c2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_container_is_on_the_networks_of_its_addresses() {
        let subnet = |net: &str, network: &str, followed| NetworkSubnet {
            net: net.parse().unwrap(),
            network: network.to_owned(),
            followed,
        };
        let subnets = Subnets(vec![
            subnet("172.50.0.0/24", "backend", true),
            subnet("172.51.0.0/24", "other", true),
            subnet("10.0.0.0/24", "ingress", false),
            subnet("fd00:50::/64", "backend", true),
        ]);
        let addrs = |a: &[&str]| -> Vec<IpAddr> { a.iter().map(|a| a.parse().unwrap()).collect() };
        let (nets, unknown) = subnets.networks_at(&addrs(&[
            "127.0.0.1",
            "::1",
            "172.51.0.9",
            "172.50.0.3",
            "fd00:50::3",
            "fe80::1",
            "10.0.0.4",
        ]));
        assert_eq!(nets, ["backend", "other"]);
        assert!(unknown.is_empty(), "{unknown:?}");
        // An address of a network the last resync did not list.
        let (nets, unknown) = subnets.networks_at(&addrs(&["172.52.0.3"]));
        assert!(nets.is_empty());
        assert_eq!(unknown, addrs(&["172.52.0.3"]));
    }

    #[test]
    fn docker_names() {
        assert!(is_docker_name("api@backend"));
        assert!(!is_docker_name("api"));
        assert!(!is_docker_name("@x"));
        assert!(!is_docker_name("a@b@c"));
        assert_eq!(default_parent("cgroupfs"), "/docker");
        assert_eq!(default_parent("systemd"), "/system.slice");
    }

    fn merged(
        json: &str,
        refused: &mut BTreeMap<String, String>,
        last_good: &mut BTreeMap<String, ServiceSpec>,
    ) -> DesiredState {
        let view = services_of_network("n", inspect_services(json))
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        merge(&DesiredState::default(), &view, refused, last_good)
    }

    #[test]
    fn hostile_views_are_refused_keeping_the_last_good_version() {
        let (mut refused, mut last_good) = (BTreeMap::new(), BTreeMap::new());
        let good = merged(
            r#"{"api": {"VIP": "10.0.0.2", "LocalLBIndex": 257, "Tasks": [{"EndpointIP": "10.0.0.3"}]},
                "web": {"VIP": "10.0.0.5", "LocalLBIndex": 258, "Tasks": [{"EndpointIP": "10.0.0.6"}]}}"#,
            &mut refused,
            &mut last_good,
        );
        assert_eq!(good.services.len(), 2);
        for (api, why) in [
            (r#"[{"EndpointIP": "10.0.0.2"}]"#, "both its VIP and a task"),
            (r#"[{"EndpointIP": "127.0.0.1"}]"#, "loopback"),
            (r#"[{"EndpointIP": "0.0.0.0"}]"#, "unspecified"),
            (r#"[{"EndpointIP": "239.1.1.1/24"}]"#, "multicast"),
        ] {
            let json = format!(
                r#"{{"api": {{"VIP": "10.0.0.2", "LocalLBIndex": 257, "Tasks": {api}}},
                    "web": {{"VIP": "10.0.0.5", "LocalLBIndex": 258, "Tasks": [{{"EndpointIP": "10.0.0.7"}}]}}}}"#
            );
            let now = merged(&json, &mut refused, &mut last_good);
            assert_eq!(
                now.services[0], good.services[0],
                "{why}: the last good api"
            );
            assert_eq!(now.services[1].backends[0].addr.to_string(), "10.0.0.7");
            assert!(refused["api@n"].contains(why), "{}", refused["api@n"]);
            assert_eq!(refused.len(), 1);
        }
        // A duplicate mark: the second service (by name) is refused; with
        // no last good version of it, nothing of it goes in.
        let now = merged(
            r#"{"api": {"VIP": "10.0.0.2", "LocalLBIndex": 257, "Tasks": []},
                "zzz": {"VIP": "10.0.0.8", "LocalLBIndex": 257, "Tasks": []}}"#,
            &mut refused,
            &mut last_good,
        );
        assert_eq!(now.services.len(), 1);
        assert!(refused["zzz@n"].contains("mark 257"));
        model::check_state(&now).unwrap();
    }

    #[test]
    fn a_huge_task_list_is_refused_and_names_the_bound() {
        let tasks: Vec<String> = (0..=model::MAX_BACKENDS_PER_SERVICE as u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0b00_0000 + i);
                format!(r#"{{"EndpointIP": "{ip}"}}"#)
            })
            .collect();
        let json = format!(
            r#"{{"api": {{"VIP": "10.0.0.2", "LocalLBIndex": 257, "Tasks": [{}]}}}}"#,
            tasks.join(",")
        );
        let (mut refused, mut last_good) = (BTreeMap::new(), BTreeMap::new());
        let started = std::time::Instant::now();
        assert!(merged(&json, &mut refused, &mut last_good)
            .services
            .is_empty());
        assert!(refused["api@n"].contains("16385 backends"), "{refused:?}");
        // Each task is looked up once, not compared with every other.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn names_that_are_not_swarm_names_are_skipped() {
        let specs = services_of_network(
            "n",
            inspect_services(
                r#"{"a\nb": {"VIP": "10.0.0.2", "LocalLBIndex": 257, "Tasks": []},
                    "a@b": {"VIP": "10.0.0.3", "LocalLBIndex": 258, "Tasks": []},
                    "ok": {"VIP": "10.0.0.4", "LocalLBIndex": 259, "Tasks": []}}"#,
            ),
        );
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ok@n"]);
    }

    fn wake(json: &str) -> Option<Wake> {
        wake_of(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn events_are_classified() {
        let Some(Wake::Event {
            stopping,
            draining,
            started,
            at_ns,
            ..
        }) = wake(
            r#"{"Type": "container", "Action": "kill", "Actor": {"ID": "c1", "Attributes": {"signal": "15"}}, "timeNano": 7}"#,
        )
        else {
            panic!("an event")
        };
        assert_eq!(
            (stopping.as_deref(), draining, started, at_ns),
            (Some("c1"), true, None, Some(7))
        );
        let Some(Wake::Event {
            stopping, draining, ..
        }) = wake(
            r#"{"Type": "container", "Action": "kill", "Actor": {"ID": "c1", "Attributes": {"signal": "9"}}}"#,
        )
        else {
            panic!("an event")
        };
        assert_eq!((stopping.as_deref(), draining), (Some("c1"), false));
        // No container named: nothing stops, so nothing drains.
        let Some(Wake::Event {
            stopping, draining, ..
        }) = wake(
            r#"{"Type": "container", "Action": "kill", "Actor": {"Attributes": {"signal": "15"}}}"#,
        )
        else {
            panic!("an event")
        };
        assert_eq!((stopping, draining), (None, false));
        let Some(Wake::Event {
            started, stopping, ..
        }) = wake(r#"{"Type": "network", "Action": "start", "Actor": {"ID": "n1"}}"#)
        else {
            panic!("an event")
        };
        assert_eq!((started, stopping), (None, None));
        assert!(wake(
            r#"{"Type": "container", "Action": "exec_start: sh", "Actor": {"ID": "c1"}}"#
        )
        .is_none());
    }
}
