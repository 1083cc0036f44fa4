//! Desired state -> map writes.
//!
//! [`plan`] is pure: it compares a [`Snapshot`] of the maps with the desired
//! services and decides every write, checking capacities first, so a state
//! that cannot be applied is refused before anything changes. [`execute`]
//! then writes in an order that keeps every connect() consistent:
//!
//! 1. new backends (their counters zeroed) and new weights;
//! 2. per service: the new schedule into the inactive generation, then the
//!    service value (one map update switches generations), then its VIP;
//! 3. the old generation's slots;
//! 4. VIPs, services and backends that are gone, VIPs first, so no VIP ever
//!    points at a missing service.
//!
//! So a connect() sees a service's old schedule or its new one, never a mix
//! (it copies the service value once), and once [`execute`] has returned no
//! connect chooses a removed or quiescent backend: the service value names
//! the new generation, and an affinity entry is honoured only while its
//! backend is in `svclb_backends` with weight > 0. A connect that copied
//! the old value just before step 2 and looks for its slot after step 3
//! looks again in the new generation (svclb-ebpf's service.rs), so it is
//! not refused. Round-robin positions survive updates.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use svclb_common::words_addr;
use svclb_common::{
    addr_words, family_of, schedule::other_generation, BackendInfo, PortKey, Scheduler,
    ServiceMeta, ServiceValue, Slot, VipValue, MAX_SLOTS_PER_SERVICE, SVC_F_AFFINITY,
    SVC_F_KEEP_SOCKETS, VIP_F_PORTS,
};

use crate::schedule::{plan_slots, PlannedBackend};

use crate::{
    alloc::{assign_marks, new_network_bits, BackendIds},
    dataplane::{meta_port, port_proto, BackendState, Capacity, Dataplane, ServiceState, Snapshot},
    model::{protocol_name, BackendSpec, DesiredState, ServicePort, ServiceSpec},
};

/// One line of a diff, printed the way `ipvsadm -S` writes rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddService {
        mark: u32,
        name: String,
        vip: Frontend,
        scheduler: Scheduler,
        /// Affinity timeout in seconds (`-p`).
        persistent: Option<u32>,
    },
    EditService {
        mark: u32,
        name: String,
        vip: Frontend,
        scheduler: Scheduler,
        persistent: Option<u32>,
    },
    RemoveService {
        mark: u32,
        name: String,
        vip: Frontend,
    },
    AddBackend {
        mark: u32,
        addr: IpAddr,
        port: Option<u16>,
        weight: u32,
    },
    EditBackend {
        mark: u32,
        addr: IpAddr,
        port: Option<u16>,
        old_weight: u32,
        weight: u32,
    },
    RemoveBackend {
        mark: u32,
        addr: IpAddr,
        port: Option<u16>,
    },
}

/// What a service matches: its VIP, and its port for a per-port service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: Option<ServicePort>,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            None => write!(f, "{}", self.vip),
            Some(p) => write!(f, "{} {}/{}", self.vip, p.port, protocol_name(p.protocol)),
        }
    }
}

fn real(addr: IpAddr, port: Option<u16>) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{}", port.unwrap_or(0)),
        IpAddr::V6(a) => format!("[{a}]:{}", port.unwrap_or(0)),
    }
}

/// ipvsadm's `-p SECONDS` for a service with affinity.
fn persistence(secs: Option<u32>) -> String {
    secs.map_or(String::new(), |s| format!(" -p {s}"))
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddService {
                mark,
                name,
                vip,
                scheduler,
                persistent,
            } => {
                write!(
                    f,
                    "+ -A -f {mark} -s {}{}    # {name} {vip}",
                    scheduler.name(),
                    persistence(*persistent)
                )
            }
            Change::EditService {
                mark,
                name,
                vip,
                scheduler,
                persistent,
            } => {
                write!(
                    f,
                    "~ -E -f {mark} -s {}{}    # {name} {vip}",
                    scheduler.name(),
                    persistence(*persistent)
                )
            }
            Change::RemoveService { mark, name, vip } => {
                write!(f, "- -D -f {mark}    # {name} {vip}")
            }
            Change::AddBackend {
                mark,
                addr,
                port,
                weight,
            } => {
                write!(f, "+ -a -f {mark} -r {} -m -w {weight}", real(*addr, *port))
            }
            Change::EditBackend {
                mark,
                addr,
                port,
                old_weight,
                weight,
            } => write!(
                f,
                "~ -e -f {mark} -r {} -m -w {weight}    # weight was {old_weight}",
                real(*addr, *port)
            ),
            Change::RemoveBackend { mark, addr, port } => {
                write!(f, "- -d -f {mark} -r {}", real(*addr, *port))
            }
        }
    }
}

/// Everything [`execute`] will write, decided up front.
#[derive(Debug, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Marks given to services that had none in the config, by name.
    pub marks: BTreeMap<String, u32>,
    /// Backends this plan removes, for ending the sockets connected to them
    /// once they are out of the maps (crate::terminate).
    pub departed: Vec<DepartedBackend>,
    new_backends: Vec<(u32, BackendInfo)>,
    edited_backends: Vec<(u32, BackendInfo)>,
    new_networks: Vec<(String, u32)>,
    services: Vec<ServiceWrite>,
    port_writes: Vec<(PortKey, u32)>,
    vip_writes: Vec<(IpAddr, VipValue)>,
    removed_ports: Vec<PortKey>,
    removed_vips: Vec<IpAddr>,
    removed_services: Vec<(u32, Generation)>,
    removed_backends: Vec<u32>,
    /// The specs of the services planned (not passed over), by mark.
    planned_specs: Vec<(u32, ServiceSpec)>,
}

impl Plan {
    /// Whether applying it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.new_networks.is_empty()
            && self.new_backends.is_empty()
            && self.edited_backends.is_empty()
            && self.services.is_empty()
            && self.port_writes.is_empty()
            && self.vip_writes.is_empty()
            && self.removed_ports.is_empty()
            && self.removed_vips.is_empty()
            && self.removed_services.is_empty()
            && self.removed_backends.is_empty()
    }
}

/// A backend that an apply takes out of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepartedBackend {
    pub service: String,
    pub mark: u32,
    /// Its id while it was in the maps: the sockets' records name it.
    pub id: u32,
    pub addr: IpAddr,
    /// The service's `terminate_on_removal`.
    pub end_sockets: bool,
}

/// A range of slot numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Generation {
    base: u32,
    count: u32,
}

#[derive(Debug)]
struct ServiceWrite {
    mark: u32,
    meta: ServiceMeta,
    value: ServiceValue,
    /// The new schedule, written at `value.slot_base`; None when unchanged.
    new_slots: Option<Vec<Slot>>,
    /// The generation to delete once the new one is active.
    retired: Option<Generation>,
}

fn port_key(vip: IpAddr, port: ServicePort) -> PortKey {
    PortKey {
        addr: addr_words(vip),
        port_be: port.port.to_be(),
        proto: port.protocol,
        _pad: 0,
    }
}

/// Decides how to bring the maps from `current` to `desired`.
pub fn plan(current: &Snapshot, desired: &DesiredState, capacity: Capacity) -> Result<Plan> {
    let mut plan = Plan::default();
    let marks = assign_marks(current, desired)?;
    let scope_bits = assign_networks(current, desired, &mut plan)?;

    if desired.services.len() as u64 > u64::from(capacity.services) {
        bail!(
            "{} services exceed the capacity of {} (raise svclbd --max-services)",
            desired.services.len(),
            capacity.services
        );
    }

    let mut ids = Ids::new(current, capacity.backends);
    // Services passed over keep all their backends.
    let mut passed_over: HashSet<u32> = HashSet::new();
    let mut peak_slots: u64 = current
        .services
        .values()
        .map(|s| u64::from(s.value.count))
        .sum();

    for (spec, &mark) in desired.services.iter().zip(&marks) {
        let old = current.services.get(&mark);
        // The incremental path: a service planned from this very spec last
        // time is as it should be (its scope bits too: a network keeps its
        // bit), so it costs one comparison, not a schedule.
        if old.is_some() && current.specs.get(&mark) == Some(spec) {
            passed_over.insert(mark);
            continue;
        }
        if spec.mark.is_none() {
            plan.marks.insert(spec.name.clone(), mark);
        }
        plan_service(
            &mut plan,
            &mut ids,
            &mut peak_slots,
            spec,
            mark,
            old,
            &scope_bits,
        )?;
    }

    if peak_slots > u64::from(capacity.slots) {
        bail!(
            "the schedules need {peak_slots} slots while switching, more than the capacity of {} (raise svclbd --max-slots, or --max-backends, when the maps are created)",
            capacity.slots
        );
    }

    // The VIP and port tables, whole, compared with what the maps hold.
    let mut vip_table: BTreeMap<IpAddr, VipValue> = BTreeMap::new();
    let mut port_table: BTreeMap<(IpAddr, u16, u8), u32> = BTreeMap::new();
    for (spec, &mark) in desired.services.iter().zip(&marks) {
        let entry = vip_table.entry(spec.vip).or_default();
        match spec.port {
            None => entry.mark = mark,
            Some(p) => {
                entry.flags |= VIP_F_PORTS;
                port_table.insert((spec.vip, p.port, p.protocol), mark);
            }
        }
    }
    for (&(vip, port, protocol), &mark) in &port_table {
        if current.ports.get(&(vip, port, protocol)) != Some(&mark) {
            plan.port_writes
                .push((port_key(vip, ServicePort { port, protocol }), mark));
        }
    }
    for &(vip, port, protocol) in current.ports.keys() {
        if !port_table.contains_key(&(vip, port, protocol)) {
            plan.removed_ports
                .push(port_key(vip, ServicePort { port, protocol }));
        }
    }
    for (&vip, value) in &vip_table {
        let now = VipValue {
            mark: current.vips.get(&vip).copied().unwrap_or(u32::MAX),
            flags: current.vip_flags.get(&vip).copied().unwrap_or(0),
        };
        if now != *value {
            plan.vip_writes.push((vip, *value));
        }
    }
    let desired_marks: HashSet<u32> = marks.iter().copied().collect();
    plan.removed_vips = current
        .vips
        .keys()
        .filter(|v| !vip_table.contains_key(v))
        .copied()
        .collect();
    // Whether a departing backend's sockets are ended: the service's
    // setting as desired now, or as it was for a service that leaves too.
    let mut ends_sockets: Option<HashMap<u32, bool>> = None;
    for svc in current.services.values() {
        if passed_over.contains(&svc.mark) {
            continue;
        }
        if !desired_marks.contains(&svc.mark) {
            plan.removed_services.push((
                svc.mark,
                Generation {
                    base: svc.value.slot_base,
                    count: svc.value.count,
                },
            ));
            plan.changes.push(Change::RemoveService {
                mark: svc.mark,
                name: svc.name.clone(),
                vip: Frontend {
                    vip: svc.vip,
                    port: svc.port,
                },
            });
        }
        for b in svc.backends.iter().filter(|b| !ids.kept.contains(&b.id)) {
            let end_sockets = ends_sockets
                .get_or_insert_with(|| {
                    marks
                        .iter()
                        .zip(&desired.services)
                        .map(|(&mark, spec)| (mark, spec.terminate_on_removal))
                        .collect()
                })
                .get(&svc.mark)
                .copied()
                .unwrap_or(!svc.value.keeps_sockets());
            depart(&mut plan, svc, b, end_sockets);
        }
    }
    Ok(plan)
}

/// The backend ids of one plan: handed out by [`BackendIds`], and those
/// the services planned keep.
struct Ids<'a> {
    alloc: BackendIds<'a>,
    kept: HashSet<u32>,
}

impl<'a> Ids<'a> {
    fn new(current: &'a Snapshot, capacity: u32) -> Self {
        Ids {
            alloc: BackendIds::new(current, capacity),
            kept: HashSet::new(),
        }
    }

    fn free(&mut self) -> Option<u32> {
        self.alloc.next_free()
    }
}

/// Plans one service, new or changed since `old`: its backends' ids and
/// weights, its schedule (a new generation when the slots change), its
/// value and metadata, and the `ipvsadm -S` lines.
fn plan_service(
    plan: &mut Plan,
    ids: &mut Ids,
    peak_slots: &mut u64,
    spec: &ServiceSpec,
    mark: u32,
    old: Option<&ServiceState>,
    scope_bits: &BTreeMap<String, u32>,
) -> Result<()> {
    plan.planned_specs.push((mark, spec.clone()));
    let existing_ids: HashMap<(IpAddr, Option<u16>), (u32, u32)> = old
        .map(|o| {
            o.backends
                .iter()
                .map(|b| ((b.addr, b.port), (b.id, b.weight)))
                .collect()
        })
        .unwrap_or_default();
    // This service's line goes before its backends' lines, as in `ipvsadm -S`.
    let service_line_at = plan.changes.len();
    let mut slot_targets = Vec::with_capacity(spec.backends.len());
    let mut weights = Vec::with_capacity(spec.backends.len());
    for b in &spec.backends {
        let info = BackendInfo {
            addr: addr_words(b.addr),
            port_be: b.port.map_or(0, u16::to_be),
            family: family_of(b.addr),
            mark,
            weight: b.weight,
        };
        let id = match existing_ids.get(&(b.addr, b.port)) {
            Some(&(id, old_weight)) => {
                if old_weight != b.weight {
                    plan.edited_backends.push((id, info));
                    plan.changes.push(Change::EditBackend {
                        mark,
                        addr: b.addr,
                        port: b.port,
                        old_weight,
                        weight: b.weight,
                    });
                }
                id
            }
            None => {
                let id = ids.free().with_context(|| {
                    format!(
                        "no free backend id for {} of service {}: the capacity is {} backends (raise svclbd --max-backends)",
                        b.addr, spec.name, ids.alloc.capacity()
                    )
                })?;
                plan.new_backends.push((id, info));
                plan.changes.push(Change::AddBackend {
                    mark,
                    addr: b.addr,
                    port: b.port,
                    weight: b.weight,
                });
                id
            }
        };
        ids.kept.insert(id);
        weights.push(b.weight);
        slot_targets.push(Slot {
            addr: info.addr,
            port_be: info.port_be,
            family: info.family,
            backend_id: id,
            weight: b.weight,
        });
    }
    let planned: Vec<PlannedBackend> = spec
        .backends
        .iter()
        .map(|b| PlannedBackend {
            addr: b.addr,
            port: b.port,
            weight: b.weight,
        })
        .collect();
    let picks =
        plan_slots(spec.scheduler, &planned).with_context(|| format!("service {}", spec.name))?;
    let slots: Vec<Slot> = picks.iter().map(|&i| slot_targets[i as usize]).collect();
    let mut meta = ServiceMeta::new(&spec.name, spec.vip);
    meta.port_proto = port_proto(spec.port);
    let scope = spec
        .networks
        .iter()
        .fold(0u64, |m, n| m | scope_bits.get(n).map_or(0, |b| 1u64 << b));
    let (mut flags, affinity_secs) = match spec.affinity {
        Some(secs) => (SVC_F_AFFINITY, secs),
        None => (0, 0),
    };
    if !spec.terminate_on_removal {
        flags |= SVC_F_KEEP_SOCKETS;
    }

    let (value, new_slots, retired) = match old {
        Some(old) if old.slots == slots && old.scheduler == spec.scheduler => (
            ServiceValue {
                flags,
                affinity_secs,
                scope,
                ..old.value
            },
            None,
            None,
        ),
        _ => {
            let active = old
                .map(|o| o.value.slot_base)
                .unwrap_or(MAX_SLOTS_PER_SERVICE);
            let value = ServiceValue {
                count: slots.len() as u32,
                slot_base: other_generation(active),
                scheduler: spec.scheduler as u32,
                flags,
                // Choices remembered under the old schedule get checked again.
                generation: old.map_or(1, |o| o.value.generation.wrapping_add(1)),
                affinity_secs,
                scope,
            };
            *peak_slots += slots.len() as u64;
            let retired = old.map(|o| Generation {
                base: o.value.slot_base,
                count: o.value.count,
            });
            (value, Some(slots), retired)
        }
    };
    let meta_changed =
        old.is_none_or(|o| o.name != spec.name || o.vip != spec.vip || o.port != spec.port);
    let frontend = Frontend {
        vip: spec.vip,
        port: spec.port,
    };
    match old {
        None => plan.changes.insert(
            service_line_at,
            Change::AddService {
                mark,
                name: spec.name.clone(),
                vip: frontend,
                scheduler: spec.scheduler,
                persistent: spec.affinity,
            },
        ),
        Some(o)
            if meta_changed
                || o.scheduler != spec.scheduler
                || (o.value.flags, o.value.affinity_secs, o.value.scope)
                    != (value.flags, value.affinity_secs, value.scope) =>
        {
            plan.changes.insert(
                service_line_at,
                Change::EditService {
                    mark,
                    name: spec.name.clone(),
                    vip: frontend,
                    scheduler: spec.scheduler,
                    persistent: spec.affinity,
                },
            )
        }
        Some(_) => {}
    }
    if new_slots.is_some() || meta_changed || old.is_none_or(|o| o.value != value) {
        plan.services.push(ServiceWrite {
            mark,
            meta,
            value,
            new_slots,
            retired,
        });
    }
    Ok(())
}

/// The incremental path's plan, when only backends changed: `specs` are
/// services that the carried snapshot holds, each with the same name, VIP,
/// port, mark and settings as when it was last planned, only other
/// backends. Only they are looked at (no table of every service is
/// built), and the plan is the one [`plan`] makes for the same change.
/// `None` when a spec does not qualify: plan everything then.
pub fn plan_backends(
    current: &Snapshot,
    specs: &[&ServiceSpec],
    capacity: Capacity,
) -> Result<Option<Plan>> {
    let mut plan = Plan::default();
    let mut ids = Ids::new(current, capacity.backends);
    let mut peak_slots: u64 = current
        .services
        .values()
        .map(|s| u64::from(s.value.count))
        .sum();
    let mut olds = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some(mark) = spec.mark else {
            return Ok(None);
        };
        let (Some(old), Some(last)) = (current.services.get(&mark), current.specs.get(&mark))
        else {
            return Ok(None);
        };
        let same_but_backends = ServiceSpec {
            backends: spec.backends.clone(),
            ..last.clone()
        };
        if same_but_backends != **spec {
            return Ok(None);
        }
        if last == *spec {
            continue;
        }
        plan_service(
            &mut plan,
            &mut ids,
            &mut peak_slots,
            spec,
            mark,
            Some(old),
            &current.networks,
        )?;
        olds.push((old, spec.terminate_on_removal));
    }
    if peak_slots > u64::from(capacity.slots) {
        return Ok(None);
    }
    for (old, end_sockets) in olds {
        for b in old.backends.iter().filter(|b| !ids.kept.contains(&b.id)) {
            depart(&mut plan, old, b, end_sockets);
        }
    }
    Ok(Some(plan))
}

/// Takes backend `b` out of `svc`: its removal, its sockets' fate, its line.
fn depart(plan: &mut Plan, svc: &ServiceState, b: &BackendState, end_sockets: bool) {
    plan.removed_backends.push(b.id);
    plan.departed.push(DepartedBackend {
        service: svc.name.clone(),
        mark: svc.mark,
        id: b.id,
        addr: b.addr,
        end_sockets,
    });
    plan.changes.push(Change::RemoveBackend {
        mark: svc.mark,
        addr: b.addr,
        port: b.port,
    });
}

/// Scope bits of the networks the services name: a network keeps its bit
/// once it has one (attachments refer to it); new ones take free bits.
fn assign_networks(
    current: &Snapshot,
    desired: &DesiredState,
    plan: &mut Plan,
) -> Result<BTreeMap<String, u32>> {
    let mut bits = current.networks.clone();
    let new = new_network_bits(&bits, desired.services.iter().flat_map(|s| &s.networks))?;
    bits.extend(new.iter().cloned());
    plan.new_networks = new;
    Ok(bits)
}

/// Writes `plan` into the maps, in the order described in the module docs,
/// through [`Dataplane`]'s write methods (the only writers of the maps).
pub fn execute(dp: &mut Dataplane, plan: &Plan) -> Result<()> {
    dp.register_networks(&plan.new_networks)?;
    // Each step is one map's entries in batch syscalls (a few per 4,096
    // entries, not one per entry: 100,000 new services take a third of a
    // second instead of seconds), in the same order as entry by entry:
    // every service's new schedule, and its round-robin positions, before
    // any service value that switches to it; the values before the VIPs.
    dp.add_backends(&plan.new_backends)?;
    dp.write_backends(&plan.edited_backends)?;
    let schedules: Vec<(u32, u32, &[Slot])> = plan
        .services
        .iter()
        .filter_map(|w| Some((w.mark, w.value.slot_base, w.new_slots.as_deref()?)))
        .collect();
    if !schedules.is_empty() {
        dp.write_slots_of(&schedules)?;
        let marks: Vec<u32> = schedules.iter().map(|(mark, _, _)| *mark).collect();
        dp.init_rrs(&marks)?;
    }
    if !plan.services.is_empty() {
        let values: Vec<(u32, ServiceValue)> =
            plan.services.iter().map(|w| (w.mark, w.value)).collect();
        dp.switch_services(&values)?;
        let metas: Vec<(u32, ServiceMeta)> =
            plan.services.iter().map(|w| (w.mark, w.meta)).collect();
        dp.write_metas(&metas)?;
    }
    // Per-port entries before the VIP flag that sends lookups to them.
    if !plan.port_writes.is_empty() {
        dp.write_ports(&plan.port_writes)?;
    }
    if !plan.vip_writes.is_empty() {
        dp.write_vips(&plan.vip_writes)?;
    }
    for w in &plan.services {
        if let Some(old) = w.retired {
            dp.remove_slots(w.mark, old.base, old.count)?;
        }
    }
    for key in &plan.removed_ports {
        dp.remove_port(key)?;
    }
    for vip in &plan.removed_vips {
        dp.remove_vip(*vip)?;
    }
    for (mark, generation) in &plan.removed_services {
        dp.remove_service(*mark)?;
        dp.remove_slots(*mark, generation.base, generation.count)?;
    }
    for id in &plan.removed_backends {
        dp.remove_backend(*id)?;
    }
    Ok(())
}

/// Plans and applies in one step; returns the plan for reporting.
pub fn apply(dp: &mut Dataplane, desired: &DesiredState) -> Result<Plan> {
    let start = std::time::Instant::now();
    let snapshot = dp.current_snapshot()?;
    let read = start.elapsed();
    let plan = plan(&snapshot, desired, dp.capacity())?;
    let planned = start.elapsed();
    execute_and_carry(dp, snapshot, &plan)?;
    tracing::debug!(
        read_ms = read.as_secs_f64() * 1e3,
        planned_ms = planned.as_secs_f64() * 1e3,
        done_ms = start.elapsed().as_secs_f64() * 1e3,
        changes = plan.changes.len(),
        "applied"
    );
    Ok(plan)
}

/// [`apply`] on the incremental path ([`plan_backends`]): services whose
/// backends alone changed. `Ok(None)`, having written nothing, when they do
/// not qualify: [`apply`] the whole desired state then.
pub fn apply_backends(dp: &mut Dataplane, specs: &[&ServiceSpec]) -> Result<Option<Plan>> {
    let start = std::time::Instant::now();
    let snapshot = dp.current_snapshot()?;
    let read = start.elapsed();
    let Some(plan) = plan_backends(&snapshot, specs, dp.capacity())? else {
        dp.keep_snapshot(snapshot);
        return Ok(None);
    };
    let planned = start.elapsed();
    execute_and_carry(dp, snapshot, &plan)?;
    tracing::debug!(
        read_ms = read.as_secs_f64() * 1e3,
        planned_ms = planned.as_secs_f64() * 1e3,
        done_ms = start.elapsed().as_secs_f64() * 1e3,
        changes = plan.changes.len(),
        "applied (backends only)"
    );
    Ok(Some(plan))
}

/// Executes `plan` over the maps `snapshot` was taken of, and keeps the
/// snapshot carried forward for the next apply.
fn execute_and_carry(dp: &mut Dataplane, snapshot: Snapshot, plan: &Plan) -> Result<()> {
    if plan.is_empty() {
        dp.keep_snapshot(snapshot);
        return Ok(());
    }
    if let Err(e) = execute(dp, plan) {
        // Some writes may have gone in: no process keeps a snapshot of
        // maps that changed under it, and the maps go back to what the
        // snapshot says they held, so no service stays half-changed.
        dp.written_partly();
        return Err(match roll_back(dp, &snapshot) {
            Ok(()) => e.context("the change was rolled back: the maps hold what they held before"),
            Err(r) => e.context(format!(
                "rolling the change back failed too ({r:#}): the maps may hold part of it; apply again"
            )),
        });
    }
    let mut now = snapshot;
    absorb(&mut now, plan);
    dp.applied(Some(now))
}

/// Brings the maps back to what `before` says they held, after a change
/// that failed half-way: read them as they are, plan back, write.
fn roll_back(dp: &mut Dataplane, before: &Snapshot) -> Result<()> {
    let now = dp.snapshot()?;
    let back = plan(&now, &state_of(before), dp.capacity())?;
    if !back.is_empty() {
        execute(dp, &back)?;
    }
    dp.applied(None)
}

/// The desired state that the maps in `snapshot` express: the specs it was
/// planned from where it carries them, else each service as read back.
pub fn state_of(snapshot: &Snapshot) -> DesiredState {
    let services = snapshot
        .services
        .values()
        .map(|svc| match snapshot.specs.get(&svc.mark) {
            Some(spec) => ServiceSpec {
                mark: Some(svc.mark),
                ..spec.clone()
            },
            None => spec_of(snapshot, svc),
        })
        .collect();
    DesiredState { services }
}

/// The spec that service `svc` of `snapshot` was planned from, as far as
/// the maps say (backends in address order).
pub fn spec_of(snapshot: &Snapshot, svc: &ServiceState) -> ServiceSpec {
    ServiceSpec {
        name: svc.name.clone(),
        vip: svc.vip,
        mark: Some(svc.mark),
        scheduler: svc.scheduler,
        backends: svc
            .backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.addr,
                port: b.port,
                weight: b.weight,
            })
            .collect(),
        port: svc.port,
        affinity: svc.value.has_affinity().then_some(svc.value.affinity_secs),
        networks: snapshot
            .networks
            .iter()
            .filter(|(_, bit)| svc.value.scope & (1u64 << **bit) != 0)
            .map(|(name, _)| name.clone())
            .collect(),
        terminate_on_removal: !svc.value.keeps_sockets(),
    }
}

/// Carries `snapshot` forward over an executed `plan`: afterwards it is what
/// reading the maps would give (svclbd checks that in the integration tests,
/// see [`Dataplane::applied`]), plus the specs the plan was made from, so
/// the next apply neither reads every map nor re-plans unchanged services.
pub fn absorb(snapshot: &mut Snapshot, plan: &Plan) {
    for departed in &plan.departed {
        if let Some(svc) = snapshot.services.get_mut(&departed.mark) {
            svc.backends.retain(|b| b.id != departed.id);
        }
    }
    for (mark, _) in &plan.removed_services {
        snapshot.services.remove(mark);
        snapshot.specs.remove(mark);
    }
    for w in &plan.services {
        let port = meta_port(&w.meta);
        let svc = snapshot
            .services
            .entry(w.mark)
            .or_insert_with(|| ServiceState {
                mark: w.mark,
                name: String::new(),
                vip: w.meta.vip(),
                port,
                scheduler: Scheduler::DEFAULT,
                value: w.value,
                slots: Vec::new(),
                backends: Vec::new(),
            });
        svc.name = w.meta.name();
        svc.vip = w.meta.vip();
        svc.port = port;
        svc.scheduler = Scheduler::from_u32(w.value.scheduler).unwrap_or(Scheduler::DEFAULT);
        svc.value = w.value;
        if let Some(slots) = &w.new_slots {
            svc.slots.clone_from(slots);
        }
    }
    for (id, info) in &plan.new_backends {
        if let Some(svc) = snapshot.services.get_mut(&info.mark) {
            svc.backends.push(BackendState::from_info(*id, info));
        }
    }
    for (id, info) in &plan.edited_backends {
        let backends = snapshot
            .services
            .get_mut(&info.mark)
            .map(|s| &mut s.backends);
        if let Some(b) = backends.and_then(|bs| bs.iter_mut().find(|b| b.id == *id)) {
            b.weight = info.weight;
        }
    }
    let touched: BTreeSet<u32> = plan
        .new_backends
        .iter()
        .map(|(_, info)| info.mark)
        .chain(plan.departed.iter().map(|d| d.mark))
        .collect();
    for mark in touched {
        if let Some(svc) = snapshot.services.get_mut(&mark) {
            svc.backends.sort_by_key(|b| (b.addr, b.port));
        }
    }
    for (key, mark) in &plan.port_writes {
        let vip = words_addr(key.addr);
        snapshot
            .ports
            .insert((vip, u16::from_be(key.port_be), key.proto), *mark);
    }
    for key in &plan.removed_ports {
        let vip = words_addr(key.addr);
        snapshot
            .ports
            .remove(&(vip, u16::from_be(key.port_be), key.proto));
    }
    for (vip, value) in &plan.vip_writes {
        snapshot.vips.insert(*vip, value.mark);
        snapshot.vip_flags.insert(*vip, value.flags);
    }
    for vip in &plan.removed_vips {
        snapshot.vips.remove(vip);
        snapshot.vip_flags.remove(vip);
    }
    snapshot.networks.extend(plan.new_networks.iter().cloned());
    for (mark, spec) in &plan.planned_specs {
        snapshot.specs.insert(*mark, spec.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: Capacity = Capacity {
        services: 1024,
        backends: 4096,
        slots: 1 << 20,
    };

    fn desired(services: usize, changed_backend: &str) -> DesiredState {
        let mut text = String::new();
        for i in 0..services {
            text.push_str(&format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"10.1.{}.{}\"\nbackends = [\"10.2.{}.{}\", \"10.3.{}.{}\"]\nnetworks = [\"n{}\"]\n\n",
                i / 200, i % 200 + 1, i / 200, i % 200 + 1, i / 200, i % 200 + 1, i % 3
            ));
        }
        text.push_str(&format!(
            "[[service]]\nname = \"probe\"\nvip = \"10.9.0.1\"\nport = 80\nprotocol = \"tcp\"\nscheduler = \"mh\"\nbackends = [\"{changed_backend}\", \"10.9.0.3\"]\n"
        ));
        crate::config::parse_str(&text, "test")
            .unwrap()
            .static_state()
    }

    /// Applies `plan` to an empty map world, as [`execute`] then a read would.
    fn carried(plan: &Plan) -> Snapshot {
        let mut s = Snapshot::default();
        absorb(&mut s, plan);
        s
    }

    /// A plan's writes, without the specs it was made from.
    fn writes(plan: &Plan) -> String {
        let p = format!("{plan:?}");
        let from = p.find("departed").unwrap();
        let to = p.find("planned_specs").unwrap();
        p[from..to].to_string()
    }

    #[test]
    fn ids_whose_gauges_still_count_sockets_are_not_handed_out() {
        let current = Snapshot {
            still_counted: [0, 2].into_iter().collect(),
            ..Snapshot::default()
        };
        let planned = plan(&current, &desired(1, "10.9.0.2"), CAPACITY).unwrap();
        let ids: BTreeSet<u32> = carried(&planned).backend_ids().collect();
        assert_eq!(ids, [1, 3, 4, 5].into_iter().collect(), "lowest free ids");
    }

    #[test]
    fn a_carried_snapshot_plans_nothing_for_the_state_it_came_from() {
        let want = desired(50, "10.9.0.2");
        let first = plan(&Snapshot::default(), &want, CAPACITY).unwrap();
        assert_eq!(first.planned_specs.len(), 51);
        let now = carried(&first);
        assert_eq!(now.services.len(), 51);
        assert_eq!(now.networks.len(), 3);
        let again = plan(&now, &want, CAPACITY).unwrap();
        assert!(again.is_empty(), "{again:?}");
        assert!(again.planned_specs.is_empty());
    }

    #[test]
    fn one_service_changed_is_the_only_one_planned_and_the_writes_are_the_full_plans() {
        let before =
            carried(&plan(&Snapshot::default(), &desired(50, "10.9.0.2"), CAPACITY).unwrap());
        let after = desired(50, "10.9.0.4");
        let incremental = plan(&before, &after, CAPACITY).unwrap();
        assert_eq!(
            incremental
                .planned_specs
                .iter()
                .map(|(_, s)| s.name.as_str())
                .collect::<Vec<_>>(),
            ["probe"]
        );
        // The same writes as planning every service from a snapshot as read.
        let as_read = Snapshot {
            specs: Default::default(),
            ..before.clone()
        };
        let full = plan(&as_read, &after, CAPACITY).unwrap();
        assert_eq!(full.planned_specs.len(), 51);
        assert_eq!(writes(&incremental), writes(&full));
        assert_eq!(
            incremental
                .changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "+ -a -f 306 -r 10.9.0.4:0 -m -w 1",
                "- -d -f 306 -r 10.9.0.2:0"
            ]
        );
        // Carried forward, it matches a fresh plan of the new state.
        let mut now = before;
        absorb(&mut now, &incremental);
        let from_scratch = carried(&plan(&Snapshot::default(), &after, CAPACITY).unwrap());
        assert_eq!(now.services[&306].backends.len(), 2);
        let addrs = |s: &Snapshot| -> Vec<[u32; 4]> {
            s.services[&306].slots.iter().map(|x| x.addr).collect()
        };
        assert!(
            addrs(&now) == addrs(&from_scratch),
            "the same Maglev table as planned from scratch"
        );
        assert!(plan(&now, &after, CAPACITY).unwrap().is_empty());
    }

    #[test]
    fn removed_services_leave_the_carried_snapshot_whole() {
        let before =
            carried(&plan(&Snapshot::default(), &desired(10, "10.9.0.2"), CAPACITY).unwrap());
        let mut fewer = desired(10, "10.9.0.2");
        fewer
            .services
            .retain(|s| s.name != "s3" && s.name != "probe");
        let p = plan(&before, &fewer, CAPACITY).unwrap();
        assert!(p.planned_specs.is_empty());
        let mut now = before;
        absorb(&mut now, &p);
        assert_eq!(now.services.len(), 9);
        assert_eq!(now.specs.len(), 9);
        assert!(!now
            .vips
            .contains_key(&"10.1.0.4".parse::<IpAddr>().unwrap()));
        assert!(now.ports.is_empty());
        assert!(plan(&now, &fewer, CAPACITY).unwrap().is_empty());
    }

    #[test]
    fn a_backends_only_change_plans_as_the_whole_plan_does_and_nothing_else_qualifies() {
        let before =
            carried(&plan(&Snapshot::default(), &desired(50, "10.9.0.2"), CAPACITY).unwrap());
        let mut after = desired(50, "10.9.0.4");
        for s in &mut after.services {
            s.mark = before
                .specs
                .iter()
                .find(|(_, l)| l.name == s.name)
                .map(|(m, _)| *m);
        }
        let before = Snapshot {
            specs: before
                .specs
                .iter()
                .map(|(m, s)| {
                    (
                        *m,
                        ServiceSpec {
                            mark: Some(*m),
                            ..s.clone()
                        },
                    )
                })
                .collect(),
            ..before
        };
        let probe = after.services.iter().find(|s| s.name == "probe").unwrap();
        let quick = plan_backends(&before, &[probe], CAPACITY)
            .unwrap()
            .expect("qualifies");
        let full = plan(&before, &after, CAPACITY).unwrap();
        assert_eq!(writes(&quick), writes(&full));
        assert_eq!(quick.changes, full.changes);
        assert_eq!(quick.planned_specs.len(), 1);
        // Unchanged: an empty plan; another VIP, or a service the snapshot
        // has no spec of: not for this path.
        let same = before.specs.values().find(|s| s.name == "s7").unwrap();
        assert!(plan_backends(&before, &[same], CAPACITY)
            .unwrap()
            .unwrap()
            .is_empty());
        let moved = ServiceSpec {
            vip: "10.9.9.9".parse().unwrap(),
            ..probe.clone()
        };
        assert!(plan_backends(&before, &[&moved], CAPACITY)
            .unwrap()
            .is_none());
        let unknown = ServiceSpec {
            mark: Some(9999),
            ..probe.clone()
        };
        assert!(plan_backends(&before, &[&unknown], CAPACITY)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_state_a_snapshot_expresses_plans_nothing_against_it() {
        let carried_with_specs =
            carried(&plan(&Snapshot::default(), &desired(30, "10.9.0.2"), CAPACITY).unwrap());
        // As read back from the maps (no specs) and as carried (with them).
        let as_read = Snapshot {
            specs: Default::default(),
            ..carried_with_specs.clone()
        };
        for snapshot in [&as_read, &carried_with_specs] {
            let back = state_of(snapshot);
            assert_eq!(back.services.len(), 31);
            let p = plan(&as_read, &back, CAPACITY).unwrap();
            assert!(p.changes.is_empty(), "{:?}", p.changes);
            assert!(p.new_backends.is_empty() && p.removed_backends.is_empty());
        }
    }
}
