//! The pinned maps, opened with their types, and a snapshot of the services
//! they hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{
    Array, HashMap, IterableMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap,
    PerCpuValues,
};
use svclb_common::{
    map_defs as m, words_addr, BackendInfo, BackendStats, ConnGauge, Key, MapDef, NetworkName,
    PinnedMap, PortKey, RateState, Scheduler, ServiceMeta, ServiceValue, Slot, SlotKey, Value,
    VipKey, VipValue, LAYOUT_VERSION,
};

use crate::{
    alloc::new_network_bits,
    model::{ServicePort, ServiceSpec},
    moved::MovedFlags,
    pins::PinDir,
};

/// Refuses pinned maps whose layout (key and value sizes, from svclb_common's
/// map table) differs from this binary's: pins left by another svclb version.
pub fn check_pinned_layout(pins: &PinDir) -> Result<()> {
    for MapDef {
        name,
        key_size: key,
        value_size: value,
        ..
    } in svclb_common::MAPS
    {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            bail!(
                "pinned map {} has key/value sizes {}/{} but this svclb expects {}/{}: \
                 it was pinned by an incompatible svclb version; remove it with `svclb-ctl teardown` \
                 (balancing stops until svclbd starts again)",
                path.display(),
                info.key_size(),
                info.value_size(),
                key,
                value
            );
        }
    }
    Ok(())
}

/// Capacities of the maps, as they were created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
}

/// The pinned maps, typed: their one owner in userspace. The maps are
/// private, and every write to them goes through a method below
/// ([`crate::reconcile::execute`] calls them in the order that keeps each
/// connect() consistent), except two that are not this type's: the loader
/// stamps the layout version into a map it has just created or adopted,
/// before any `Dataplane` opens it, and the programs themselves write the
/// per-socket and per-packet maps.
///
/// The numbers the maps are keyed by are chosen in [`crate::alloc`], one
/// allocator per kind (marks, backend ids, network bits).
///
/// A write to a map that a [`Snapshot`] holds (services, meta, slots,
/// backends, VIPs, ports, networks) drops the snapshot kept from the last
/// apply, unless it is part of an apply, which carries it forward
/// ([`Dataplane::applied`]) or a registration of networks, which carries
/// its names forward ([`Dataplane::network_scope`]). Writes to the others
/// (scopes, round-robin positions, counters, gauges, rate estimators) leave
/// it valid: a snapshot does not hold them.
pub struct Dataplane {
    pins: PinDir,
    vips: Hash<m::VIPS>,
    layout: Arr<m::LAYOUT>,
    /// svclbd keeps the snapshot of its last apply (see [`Dataplane::keep_snapshots`]).
    kept: Option<(u32, Snapshot)>,
    keep: bool,
    /// `(apply serial, n)`: as of that serial no backend id from `n` up is
    /// held by a service or counted by a gauge, so an apply at the same
    /// serial reads only the gauges below `n` (ids are handed out lowest
    /// first; at 262,144 backends' capacity the whole array takes 70 ms).
    /// Like `kept`, only this process's own applies move it on.
    counted_below: Option<(u32, u32)>,
    ports: Hash<m::PORTS>,
    conns: Arr<m::CONNS>,
    rr: PerCpuHashMap<MapData, Key<m::RR>, Value<m::RR>>,
    scopes: Hash<m::SCOPES>,
    networks: Hash<m::NETWORKS>,
    rates: Hash<m::RATES>,
    services: Hash<m::SERVICES>,
    slots: Hash<m::SLOTS>,
    backends: Hash<m::BACKENDS>,
    stats: PerCpuArray<MapData, Value<m::STATS>>,
    meta: Hash<m::META>,
    /// The counters-moved flags, mapped on first use (the rate sampler's).
    moved: Option<MovedFlags>,
    capacity: Capacity,
}

/// A pinned hash map with the key and value types of its row in the table.
type Hash<M> = HashMap<MapData, Key<M>, Value<M>>;
/// A pinned array with the value type of its row in the table.
type Arr<M> = Array<MapData, Value<M>>;

/// Maps the pinned counters-moved flags into memory.
fn map_moved_flags(pins: &PinDir) -> Result<MovedFlags> {
    let path = pins.map(m::STATS_MOVED::NAME);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let entries = data.info()?.max_entries() as usize;
    MovedFlags::map(data.fd().as_fd(), entries)
        .with_context(|| format!("mapping {} into memory", path.display()))
}

/// Opens the map `M` of the table from its pin, typed as the table says,
/// with its capacity.
fn open_map<M: PinnedMap, T: TryFrom<Map, Error = MapError>>(pins: &PinDir) -> Result<(T, u32)> {
    let path = pins.map(M::NAME);
    if !path.exists() {
        bail!(
            "no svclb data plane is pinned at {} (missing {}): start svclbd first, or pass --pin-dir",
            pins.root().display(),
            path.display()
        );
    }
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let max = data.info()?.max_entries();
    let map = Map::from_map_data(data)?;
    Ok((map.try_into()?, max))
}

impl Dataplane {
    /// Opens the maps pinned under `pins`, checking their layout.
    pub fn open(pins: &PinDir) -> Result<Self> {
        check_pinned_layout(pins)?;
        let (layout, _) = open_map::<m::LAYOUT, Arr<m::LAYOUT>>(pins)?;
        let version = layout.get(&0, 0)?.version;
        if version != LAYOUT_VERSION {
            bail!(
                "the maps pinned at {} have layout version {version}, this svclb reads version {LAYOUT_VERSION}",
                pins.root().display()
            );
        }
        let (vips, services_max) = open_map::<m::VIPS, _>(pins)?;
        let (services, _) = open_map::<m::SERVICES, _>(pins)?;
        let (slots, slots_max) = open_map::<m::SLOTS, _>(pins)?;
        let (backends, backends_max) = open_map::<m::BACKENDS, _>(pins)?;
        Ok(Dataplane {
            pins: pins.clone(),
            layout,
            kept: None,
            keep: false,
            counted_below: None,
            vips,
            services,
            slots,
            backends,
            stats: open_map::<m::STATS, _>(pins)?.0,
            meta: open_map::<m::META, _>(pins)?.0,
            ports: open_map::<m::PORTS, _>(pins)?.0,
            conns: open_map::<m::CONNS, _>(pins)?.0,
            rr: open_map::<m::RR, _>(pins)?.0,
            scopes: open_map::<m::SCOPES, _>(pins)?.0,
            networks: open_map::<m::NETWORKS, _>(pins)?.0,
            rates: open_map::<m::RATES, _>(pins)?.0,
            moved: None,
            capacity: Capacity {
                services: services_max,
                backends: backends_max,
                slots: slots_max,
            },
        })
    }

    /// Where these maps are pinned.
    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Capacities of the maps, as they were created.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Sums one backend's per-CPU counters.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let per_cpu = self.stats.get(&id, 0)?;
        let mut total = BackendStats::default();
        for s in per_cpu.iter() {
            total.add(s);
        }
        Ok(total)
    }

    /// The serial every apply moves: what a cached view of the maps checks.
    pub fn apply_serial(&self) -> Result<u32> {
        Ok(self.layout.get(&0, 0)?.apply_serial)
    }

    /// Keeps the snapshot of each apply for the next one, valid while no
    /// other process (`svclb-ctl apply`) writes the maps: a change then goes
    /// live without first reading every map (a tenth of a second at 10,000
    /// services); the snapshot is read again after it is live. For svclbd.
    pub fn keep_snapshots(&mut self) {
        self.keep = true;
    }

    /// What the maps hold: the kept snapshot if still valid, else read.
    pub fn current_snapshot(&mut self) -> Result<Snapshot> {
        let serial = self.layout.get(&0, 0)?.apply_serial;
        let mut snapshot = match self.kept.take() {
            Some((s, snapshot)) if self.keep && s == serial => snapshot,
            _ => self.snapshot()?,
        };
        // Read afresh for every apply: sockets close at any time.
        snapshot.still_counted = self.still_counted(&snapshot, serial)?;
        Ok(snapshot)
    }

    /// Tells that the gauges map was created empty by this process when the
    /// apply serial was `serial`: no socket can count before an apply has
    /// given out a backend id, so the first apply need not read it.
    pub fn gauges_created_at(&mut self, serial: u32) {
        self.counted_below = Some((serial, 0));
    }

    /// Backend ids that no service in `snapshot` holds but whose gauges
    /// still count live sockets (a removed backend's UDP sockets, or TCP
    /// sockets not ended): such a socket takes itself off its backend id's
    /// gauge when it closes, so the id is not given to a new backend until
    /// then, or the new backend's ActiveConn/InActConn would drift (IPVS
    /// keeps such a destination in its trash for the same reason).
    fn still_counted(&mut self, snapshot: &Snapshot, serial: u32) -> Result<BTreeSet<u32>> {
        let below = match self.counted_below {
            Some((at, n)) if at == serial => Some(n),
            _ => None,
        };
        let end = below.unwrap_or(self.conns.len());
        // The ids below `end` a service holds: their gauges count their
        // own sockets, and only the others' are wanted.
        let mut held = vec![false; end as usize];
        let mut highest_held = None;
        for id in snapshot.backend_ids() {
            if let Some(h) = held.get_mut(id as usize) {
                *h = true;
            }
            highest_held = highest_held.max(Some(id));
        }
        let free: Vec<u32> = (0..end).filter(|id| !held[*id as usize]).collect();
        let look_up = |ids: Vec<u32>| -> Result<Vec<(u32, ConnGauge)>> {
            ids.into_iter()
                .map(|id| Ok((id, self.backend_conns(id)?)))
                .collect()
        };
        // A few free ids among many held (a container started or stopped)
        // are looked up one by one (about 1 µs each); otherwise one batched
        // read of every id below `end` (about 250 ns an entry) is cheaper.
        let gauges = if free.len() * 4 < end as usize {
            look_up(free)?
        } else {
            let fd = self.conns.map().fd().as_fd();
            match crate::batch::read_all::<u32, ConnGauge>(fd, Some(end as usize))? {
                Some(all) => all,
                None => look_up(free)?,
            }
        };
        let counted: BTreeSet<u32> = gauges
            .into_iter()
            .filter(|(id, g)| {
                (g.active != 0 || g.inactive != 0)
                    && !held.get(*id as usize).copied().unwrap_or(false)
            })
            .map(|(id, _)| id)
            .collect();
        // A high-water mark: it never comes down between full reads, so a
        // socket counted just after a read is still below it at the next.
        let highest = highest_held
            .into_iter()
            .chain(counted.last().copied())
            .max()
            .map_or(0, |id| id + 1);
        self.counted_below = Some((serial, highest.max(below.unwrap_or(0))));
        Ok(counted)
    }

    /// Keeps `snapshot`, read when the apply serial was `serial`, for the
    /// next apply (svclbd's start-up reads the maps once, not twice): it is
    /// used only if no apply has moved the serial since.
    pub fn keep_snapshot_read_at(&mut self, serial: u32, snapshot: Snapshot) {
        if self.keep {
            self.kept = Some((serial, snapshot));
        }
    }

    /// Puts back a snapshot that an apply found nothing to change in.
    pub fn keep_snapshot(&mut self, snapshot: Snapshot) {
        if self.keep {
            if let Ok(v) = self.layout.get(&0, 0) {
                self.kept = Some((v.apply_serial, snapshot));
            }
        }
    }

    /// Records that an apply wrote the maps: bumps the serial every svclb
    /// process checks. `now` is what the maps hold after it, carried forward
    /// from the plan (no map is read again); kept for the next apply when
    /// keeping snapshots. With `SVCLB_VERIFY_SNAPSHOTS=1` (the integration
    /// tests set it) the maps are read back and a difference aborts svclbd:
    /// a carried snapshot that drifted from the maps would plan wrong writes.
    pub fn applied(&mut self, now: Option<Snapshot>) -> Result<()> {
        let mut v = self.layout.get(&0, 0)?;
        let before = v.apply_serial;
        v.apply_serial = before.wrapping_add(1);
        self.layout.set(0, v, 0)?;
        self.kept = None;
        let counted_below = self.counted_below.take();
        if !self.keep {
            return Ok(());
        }
        let now = match now {
            Some(now) => {
                if verify_snapshots() {
                    let read = self.snapshot()?;
                    let carried = Snapshot {
                        specs: Default::default(),
                        still_counted: Default::default(),
                        ..now.clone()
                    };
                    if read != carried {
                        tracing::error!(
                            "the snapshot carried forward differs from the maps:\n carried {carried:?}\n read    {read:?}"
                        );
                        std::process::abort();
                    }
                    tracing::debug!("the carried snapshot equals the maps");
                }
                now
            }
            None => self.snapshot()?,
        };
        // Carried to the new serial as it is: the ids this apply gave out
        // are held in `now`, which the next apply's read starts from and
        // raises the mark over; the ones it took back were held before it.
        self.counted_below = counted_below
            .filter(|(at, _)| *at == before)
            .map(|(_, n)| (v.apply_serial, n));
        self.kept = Some((v.apply_serial, now));
        Ok(())
    }

    /// A backend's live connections (ActiveConn, InActConn).
    pub fn backend_conns(&self, id: u32) -> Result<ConnGauge> {
        Ok(self.conns.get(&id, 0)?)
    }

    /// Zeroes a backend's counters and gauges, before its id is given to a
    /// new backend. (Not in a snapshot: a kept one stays valid.)
    fn reset_backend_stats(&mut self, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![BackendStats::default(); nr_cpus()?])?;
        injected_write_failure()?;
        self.stats.set(id, zeros, 0)?;
        injected_write_failure()?;
        self.conns.set(id, ConnGauge::default(), 0)?;
        Ok(())
    }

    /// A write to a map that snapshots hold, outside of what an apply or a
    /// network registration carries forward: the kept snapshot no longer
    /// says what the maps hold. During an apply it has already been taken
    /// ([`Dataplane::current_snapshot`]), and [`Dataplane::applied`] keeps
    /// the one carried over the plan.
    ///
    /// Every map write method starts here, which is also where a test makes
    /// one fail (`SVCLB_FAIL_MAP_WRITE=N`: the Nth write of this process
    /// fails, as a full map or the kernel's ENOMEM would).
    fn snapshot_maps_written(&mut self) -> Result<()> {
        self.kept = None;
        injected_write_failure()
    }

    /// Records that an apply wrote some of its writes and then failed: moves
    /// the apply serial, so that no process (svclbd included) plans from a
    /// snapshot kept from before, and drops this one's and its gauge mark
    /// (the ids it gave out before failing are not in any snapshot).
    pub fn written_partly(&mut self) {
        self.kept = None;
        self.counted_below = None;
        if let Ok(mut v) = self.layout.get(&0, 0) {
            v.apply_serial = v.apply_serial.wrapping_add(1);
            let _ = self.layout.set(0, v, 0);
        }
    }

    /// A new backend under `id`: its counters zeroed first (the id may have
    /// been another backend's), then its entry.
    pub fn add_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        self.reset_backend_stats(id)?;
        self.write_backend(id, info)
    }

    /// A backend's entry (address, service, weight).
    pub fn write_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        self.snapshot_maps_written()?;
        self.backends
            .insert(id, info, 0)
            .context("writing a backend")
    }

    /// The slots of one generation of a service's schedule, from `base`.
    pub fn write_slots(&mut self, mark: u32, base: u32, slots: &[Slot]) -> Result<()> {
        self.kept = None;
        for (k, slot) in slots.iter().enumerate() {
            injected_write_failure()?;
            let key = SlotKey {
                mark,
                slot: base.wrapping_add(k as u32),
            };
            self.slots
                .insert(key, slot, 0)
                .context("writing a schedule slot")?;
        }
        Ok(())
    }

    /// A service's value: the one update that switches a connect() from the
    /// old generation of slots to the new one.
    pub fn switch_service(&mut self, mark: u32, value: ServiceValue) -> Result<()> {
        self.snapshot_maps_written()?;
        self.services
            .insert(mark, value, 0)
            .context("writing a service")
    }

    /// A service's name, VIP and port, for listings.
    pub fn write_meta(&mut self, mark: u32, meta: ServiceMeta) -> Result<()> {
        self.snapshot_maps_written()?;
        self.meta
            .insert(mark, meta, 0)
            .context("writing service metadata")
    }

    /// A per-port service's entry.
    pub fn write_port(&mut self, key: PortKey, mark: u32) -> Result<()> {
        self.snapshot_maps_written()?;
        self.ports
            .insert(key, mark, 0)
            .context("writing a per-port service")
    }

    /// A VIP's entry: its all-ports service and flags.
    pub fn write_vip(&mut self, vip: IpAddr, value: VipValue) -> Result<()> {
        self.snapshot_maps_written()?;
        self.vips
            .insert(VipKey::from_ip(vip), value, 0)
            .context("writing a VIP")
    }

    /// [`Dataplane::add_backend`] for many, in batch syscalls: every
    /// backend's counters and gauges zeroed, then every entry.
    pub fn add_backends(&mut self, list: &[(u32, BackendInfo)]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        self.kept = None;
        let ids: Vec<u32> = list.iter().map(|(id, _)| *id).collect();
        let cpus = nr_cpus()?;
        // The kernel takes each CPU's value at an 8-byte stride.
        let per_cpu = std::mem::size_of::<BackendStats>().div_ceil(8) * 8 * cpus;
        let zeros = vec![0u8; per_cpu * ids.len()];
        let fd = self.stats.map().fd().as_fd();
        let batched = write_batch_bytes(fd, &ids, &zeros, per_cpu)?
            && write_batch(
                self.conns.map().fd().as_fd(),
                &ids,
                &vec![ConnGauge::default(); ids.len()],
            )?;
        if !batched {
            for id in &ids {
                self.reset_backend_stats(*id)?;
            }
        }
        self.write_backends(list)
    }

    /// Writes `entries` into the map `fd_of` names in batch syscalls, or
    /// one by one through `one` where the kernel has no batch updates.
    fn write_entries<K: aya::Pod + Sync, V: aya::Pod>(
        &mut self,
        entries: &[(K, V)],
        fd_of: fn(&Self) -> BorrowedFd<'_>,
        one: impl Fn(&mut Self, K, V) -> Result<()>,
    ) -> Result<()> {
        self.kept = None;
        let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
        if !write_batch(fd_of(self), &keys, &values)? {
            for &(key, value) in entries {
                one(self, key, value)?;
            }
        }
        Ok(())
    }

    /// [`Dataplane::write_backend`] for many, in batch syscalls.
    pub fn write_backends(&mut self, list: &[(u32, BackendInfo)]) -> Result<()> {
        if list.is_empty() {
            return Ok(());
        }
        self.write_entries(
            list,
            |dp| dp.backends.map().fd().as_fd(),
            |dp, id, info| dp.write_backend(id, &info),
        )
    }

    /// [`Dataplane::write_slots`] for many services' new generations
    /// (mark, base, slots), in batch syscalls.
    pub fn write_slots_of(&mut self, schedules: &[(u32, u32, &[Slot])]) -> Result<()> {
        self.kept = None;
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for &(mark, base, slots) in schedules {
            for (k, slot) in slots.iter().enumerate() {
                keys.push(SlotKey {
                    mark,
                    slot: base.wrapping_add(k as u32),
                });
                values.push(*slot);
            }
        }
        if !write_batch(self.slots.map().fd().as_fd(), &keys, &values)? {
            for &(mark, base, slots) in schedules {
                self.write_slots(mark, base, slots)?;
            }
        }
        Ok(())
    }

    /// [`Dataplane::init_rr`] for many: the positions that do not exist
    /// yet are created in batch syscalls (the map is read once, batched).
    pub fn init_rrs(&mut self, marks: &[u32]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        // A few (a container's start or stop): a lookup each, not a read
        // of every service's positions.
        if marks.len() <= BATCH_FROM {
            for mark in marks {
                self.init_rr(*mark)?;
            }
            return Ok(());
        }
        let cpus = nr_cpus()?;
        let per_cpu = 8 * cpus;
        let fd = self.rr.map().fd().as_fd();
        let existing = crate::batch::keys_of(fd, per_cpu)?;
        let Some(existing) = existing else {
            for mark in marks {
                self.init_rr(*mark)?;
            }
            return Ok(());
        };
        let missing: Vec<u32> = marks
            .iter()
            .copied()
            .filter(|m| !existing.contains(m))
            .collect();
        let zeros = vec![0u8; per_cpu * missing.len()];
        if !write_batch_bytes(fd, &missing, &zeros, per_cpu)? {
            for mark in &missing {
                self.init_rr(*mark)?;
            }
        }
        Ok(())
    }

    /// [`Dataplane::switch_service`] for many, in batch syscalls.
    pub fn switch_services(&mut self, values: &[(u32, ServiceValue)]) -> Result<()> {
        self.write_entries(
            values,
            |dp| dp.services.map().fd().as_fd(),
            Self::switch_service,
        )
    }

    /// [`Dataplane::write_meta`] for many, in batch syscalls.
    pub fn write_metas(&mut self, metas: &[(u32, ServiceMeta)]) -> Result<()> {
        self.write_entries(metas, |dp| dp.meta.map().fd().as_fd(), Self::write_meta)
    }

    /// [`Dataplane::write_port`] for many, in batch syscalls.
    pub fn write_ports(&mut self, ports: &[(PortKey, u32)]) -> Result<()> {
        self.write_entries(ports, |dp| dp.ports.map().fd().as_fd(), Self::write_port)
    }

    /// [`Dataplane::write_vip`] for many, in batch syscalls.
    pub fn write_vips(&mut self, vips: &[(IpAddr, VipValue)]) -> Result<()> {
        let entries: Vec<(VipKey, VipValue)> = vips
            .iter()
            .map(|(ip, value)| (VipKey::from_ip(*ip), *value))
            .collect();
        self.write_entries(
            &entries,
            |dp| dp.vips.map().fd().as_fd(),
            |dp, key, value| dp.write_vip(key.ip(), value),
        )
    }

    /// Deletes `count` slots of a service from `base` (a generation).
    pub fn remove_slots(&mut self, mark: u32, base: u32, count: u32) -> Result<()> {
        self.kept = None;
        for k in 0..count {
            injected_write_failure()?;
            let key = SlotKey {
                mark,
                slot: base.wrapping_add(k),
            };
            ignore_missing(self.slots.remove(&key))?;
        }
        Ok(())
    }

    /// Deletes a per-port service's entry.
    pub fn remove_port(&mut self, key: &PortKey) -> Result<()> {
        self.snapshot_maps_written()?;
        ignore_missing(self.ports.remove(key))
    }

    /// Deletes a VIP's entry.
    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<()> {
        self.snapshot_maps_written()?;
        ignore_missing(self.vips.remove(&VipKey::from_ip(vip)))
    }

    /// Deletes a service's value, metadata and round-robin positions, in
    /// that order (its slots are the caller's next step).
    pub fn remove_service(&mut self, mark: u32) -> Result<()> {
        self.snapshot_maps_written()?;
        ignore_missing(self.services.remove(&mark))?;
        injected_write_failure()?;
        ignore_missing(self.meta.remove(&mark))?;
        injected_write_failure()?;
        ignore_missing(self.rr.remove(&mark))
    }

    /// Deletes a backend's entry (its counters stay until the id is reused).
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.snapshot_maps_written()?;
        ignore_missing(self.backends.remove(&id))
    }

    /// Takes the ids below `limit` whose counters moved since the last take,
    /// clearing their flags: the rate sampler reads only those. `None` when
    /// the flags cannot be mapped (pins made before they existed): then
    /// every counter has to be read.
    pub fn take_moved_counters(&mut self, limit: usize) -> Option<Vec<u32>> {
        if self.moved.is_none() {
            match map_moved_flags(&self.pins) {
                Ok(flags) => self.moved = Some(flags),
                Err(e) => {
                    tracing::debug!("reading every counter: {e:#}");
                    return None;
                }
            }
        }
        let mut ids = Vec::new();
        self.moved.as_ref()?.take(limit, |id| ids.push(id));
        Some(ids)
    }

    /// A backend's pinned rate estimator (default when it has none).
    pub fn rate_estimator(&self, id: u32) -> RateState {
        self.rates.get(&id, 0).unwrap_or_default()
    }

    /// Every pinned rate estimator, by backend id (read in a few batch
    /// calls where the kernel has them).
    pub fn rate_estimators(&self) -> impl Iterator<Item = (u32, RateState)> + '_ {
        entries(&self.rates)
            .unwrap_or_else(|_| self.rates.iter().filter_map(|e| e.ok()).collect())
            .into_iter()
            .filter(|(id, _)| *id != SAMPLED_KEY)
    }

    /// Records when the rate sampler last sampled (the sampler's; not in a
    /// snapshot). It rewrites only the estimators that moved, so an idle
    /// node's newest estimator says nothing about whether it still samples.
    pub fn mark_sampled(&mut self, now_ns: u64) -> Result<()> {
        let mark = RateState {
            sampled_ns: now_ns,
            ..Default::default()
        };
        Ok(self.rates.insert(SAMPLED_KEY, mark, 0)?)
    }

    /// When the rate sampler last sampled (CLOCK_MONOTONIC ns), if it ever did.
    pub fn last_sampled(&self) -> Option<u64> {
        self.rates.get(&SAMPLED_KEY, 0).ok().map(|s| s.sampled_ns)
    }

    /// Stores a backend's rate estimator (the rate sampler's; not in a
    /// snapshot, so a kept one stays valid).
    pub fn write_rate_estimator(&mut self, id: u32, state: RateState) -> Result<()> {
        Ok(self.rates.insert(id, state, 0)?)
    }

    /// Deletes a backend's rate estimator.
    pub fn remove_rate_estimator(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.rates.remove(&id))
    }

    /// The scope bits of `networks`, registering names that have none yet
    /// (a bit, once given, stays: services and attachments refer to it).
    /// Bits come from the one allocator, [`new_network_bits`], over what the
    /// map holds now; a registration moves the apply serial, so no kept
    /// snapshot (this process's or svclbd's) hands the same bit out again,
    /// and this process's kept snapshot is carried forward with the names.
    pub fn network_scope(&mut self, networks: &[String]) -> Result<u64> {
        for name in networks {
            crate::model::check_network(name).map_err(anyhow::Error::msg)?;
        }
        let mut bits = self.read_networks()?;
        let new = new_network_bits(&bits, networks)?;
        if !new.is_empty() {
            let serial = self.apply_serial()?;
            let kept = self.kept.take();
            self.register_networks(&new)?;
            let carried = match kept {
                Some((s, mut snapshot)) if s == serial => {
                    snapshot.networks.extend(new.iter().cloned());
                    Some(snapshot)
                }
                _ => None,
            };
            self.applied(carried)?;
            bits.extend(new);
        }
        Ok(networks
            .iter()
            .fold(0u64, |scope, name| scope | 1u64 << bits[name]))
    }

    /// Network name -> scope bit, as the map holds them now.
    fn read_networks(&self) -> Result<BTreeMap<String, u32>> {
        let mut bits = BTreeMap::new();
        for entry in self.networks.iter() {
            let (name, bit) = entry?;
            bits.insert(name.as_string(), bit);
        }
        Ok(bits)
    }

    /// Writes bits for new network names: the only writer of the networks
    /// map. Each is checked against the map as it is now, since another
    /// process may have registered names after the caller's snapshot was
    /// read: a bit already given to another name (or a name already given
    /// another bit) is refused before anything is written.
    pub(crate) fn register_networks(&mut self, new: &[(String, u32)]) -> Result<()> {
        let now = self.read_networks()?;
        for (name, bit) in new {
            if let Some(have) = now.get(name).filter(|have| *have != bit) {
                bail!("network {name:?} was registered with bit {have} by another svclb process during this change; try again");
            }
            if let Some((other, _)) = now.iter().find(|(n, b)| *b == bit && *n != name) {
                bail!("network bit {bit} was given to {other:?} by another svclb process during this change; try again");
            }
        }
        if !new.is_empty() {
            self.snapshot_maps_written()?;
        }
        for (name, bit) in new {
            let key = NetworkName::new(name).context("network name too long")?;
            self.networks
                .insert(key, bit, 0)
                .context("registering a network")?;
        }
        Ok(())
    }

    /// Puts the processes of a cgroup (by cgroup id) on `networks`; none
    /// removes it from all. The scopes map is in no snapshot; a network
    /// registered on the way is carried into the kept one
    /// ([`Dataplane::network_scope`]).
    pub fn set_cgroup_networks(&mut self, cgroup_id: u64, networks: &[String]) -> Result<()> {
        if networks.is_empty() {
            return ignore_missing(self.scopes.remove(&cgroup_id));
        }
        let scope = self.network_scope(networks)?;
        self.scopes.insert(cgroup_id, scope, 0)?;
        Ok(())
    }

    /// Puts the processes of a cgroup on no network at all, explicitly: an
    /// attached ancestor's networks do not apply to it (the deepest entry
    /// wins), so it sees no network-scoped service. (Scopes are in no
    /// snapshot: a kept one stays valid.)
    pub fn set_cgroup_no_networks(&mut self, cgroup_id: u64) -> Result<()> {
        self.scopes.insert(cgroup_id, 0u64, 0)?;
        Ok(())
    }

    /// Network names of a cgroup, for listings.
    pub fn cgroup_networks(&self, cgroup_id: u64) -> Vec<String> {
        let Ok(scope) = self.scopes.get(&cgroup_id, 0) else {
            return Vec::new();
        };
        let mut names: Vec<(u32, String)> = self
            .networks
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, bit)| scope & (1u64 << bit) != 0)
            .map(|(n, bit)| (bit, n.as_string()))
            .collect();
        names.sort();
        names.into_iter().map(|(_, n)| n).collect()
    }

    /// Creates a service's round-robin positions (per CPU, all 0) unless
    /// they exist, so the program only ever updates them in place. An
    /// update keeps each CPU's place in the walk: resetting it would send
    /// the next connect of every CPU to the first slot, and a service
    /// updated more often than it is used would get nothing but that one.
    /// (Round-robin positions are in no snapshot: a kept one stays valid.)
    pub fn init_rr(&mut self, mark: u32) -> Result<()> {
        if self.rr.get(&mark, 0).is_ok() {
            return Ok(());
        }
        let zeros = PerCpuValues::try_from(vec![0u32; nr_cpus()?])?;
        injected_write_failure()?;
        self.rr.insert(mark, zeros, 0)?;
        Ok(())
    }

    /// Reads every service, its backends and its active schedule.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.read_snapshot(true)
    }

    /// Like [`Dataplane::snapshot`], without the schedule slots (16,381 per
    /// `mh` service): what listings, statistics and scrapes need.
    pub fn snapshot_without_slots(&self) -> Result<Snapshot> {
        self.read_snapshot(false)
    }

    /// Every service with its backends (no schedule slots), without the
    /// VIP, port and network maps a [`Snapshot`] also holds: what listings,
    /// statistics, scrapes and the rate sampler need. Without `schedulers`
    /// the services map is not read, and each service has the default
    /// scheduler and no affinity.
    pub fn services_view(&self, schedulers: bool) -> Result<BTreeMap<u32, ServiceState>> {
        self.read_services(false, schedulers)
    }

    fn read_snapshot(&self, with_slots: bool) -> Result<Snapshot> {
        let services = self.read_services(with_slots, true)?;
        let mut vips = BTreeMap::new();
        let mut vip_flags = BTreeMap::new();
        for (key, value) in entries(&self.vips)? {
            vips.insert(key.ip(), value.mark);
            vip_flags.insert(key.ip(), value.flags);
        }
        let mut ports = BTreeMap::new();
        for (key, mark) in entries(&self.ports)? {
            ports.insert(
                (words_addr(key.addr), u16::from_be(key.port_be), key.proto),
                mark,
            );
        }
        let networks = self.read_networks()?;
        Ok(Snapshot {
            services,
            vips,
            vip_flags,
            ports,
            networks,
            specs: Default::default(),
            still_counted: Default::default(),
        })
    }

    fn read_services(&self, with_slots: bool, values: bool) -> Result<BTreeMap<u32, ServiceState>> {
        // Services, their values and their backends are joined by mark
        // as sorted lists, merged: at a hundred thousand services, lookups
        // in a map (or a binary search) per backend cost a cache miss each.
        let mut metas = entries(&self.meta)?;
        metas.sort_unstable_by_key(|(mark, _)| *mark);
        let mut values: Vec<(u32, ServiceValue)> = if values {
            entries(&self.services)?
        } else {
            Vec::new()
        };
        values.sort_unstable_by_key(|(mark, _)| *mark);
        let mut values = values.into_iter().peekable();
        let mut list: Vec<ServiceState> = metas
            .into_iter()
            .map(|(mark, meta)| {
                while values.next_if(|(m, _)| *m < mark).is_some() {}
                let value = values
                    .next_if(|(m, _)| *m == mark)
                    .map_or_else(ServiceValue::default, |(_, v)| v);
                ServiceState {
                    mark,
                    name: meta.name(),
                    vip: meta.vip(),
                    port: meta_port(&meta),
                    scheduler: Scheduler::from_u32(value.scheduler).unwrap_or(Scheduler::DEFAULT),
                    value,
                    slots: Vec::new(),
                    backends: Vec::new(),
                }
            })
            .collect();
        let mut backends = entries(&self.backends)?;
        backends.sort_unstable_by_key(|(id, info)| (info.mark, *id));
        let mut at = 0;
        for (id, info) in backends {
            while at < list.len() && list[at].mark < info.mark {
                at += 1;
            }
            if let Some(svc) = list.get_mut(at).filter(|s| s.mark == info.mark) {
                svc.backends.push(BackendState::from_info(id, &info));
            }
        }
        for svc in &mut list {
            svc.backends.sort_by_key(|b| (b.addr, b.port));
        }
        let mut services: BTreeMap<u32, ServiceState> =
            list.into_iter().map(|s| (s.mark, s)).collect();
        if with_slots {
            let slots: std::collections::HashMap<SlotKey, Slot> =
                entries(&self.slots)?.into_iter().collect();
            for (&mark, svc) in services.iter_mut() {
                let value = svc.value;
                svc.slots.reserve(value.count as usize);
                for k in 0..value.count {
                    let key = SlotKey {
                        mark,
                        slot: value.slot_base.wrapping_add(k),
                    };
                    svc.slots.push(*slots.get(&key).with_context(|| {
                        format!("service FWM {mark}: slot {} is missing", key.slot)
                    })?);
                }
            }
        }
        Ok(services)
    }

    /// Each backend's counters, summed over CPUs, into `out[id]` for every
    /// id below `out.len()` (ids are handed out lowest first, so the range
    /// is dense): the per-CPU array is read whole up to there in a few batch
    /// syscalls when there are many, else entry by entry. `out` is the
    /// caller's so that the rate sampler reuses it every 2 s.
    pub fn counters_into(&self, out: &mut [BackendStats]) -> Result<()> {
        if out.len() > BATCH_FROM
            && crate::batch::sum_per_cpu_array_into(
                self.stats.map().fd().as_fd(),
                out,
                |t: &mut BackendStats, v| t.add(v),
            )?
        {
            return Ok(());
        }
        for (id, slot) in out.iter_mut().enumerate() {
            *slot = self.backend_stats(id as u32)?;
        }
        Ok(())
    }

    /// The figures `wanted` of every backend id up to the largest of `ids`:
    /// each wanted map read whole (a few batch syscalls) when there are
    /// many, else entry by entry for `ids`. Maps not wanted are not read
    /// (`svclb-ctl list` needs no counters, `stats` no rates).
    pub fn backend_figures(&self, ids: &[u32], wanted: Wanted) -> Result<BackendFigures> {
        let len = ids.iter().max().map_or(0, |m| *m as usize + 1);
        let batch = ids.len() > BATCH_FROM;
        let mut out = BackendFigures::default();
        if wanted.stats {
            out.stats = vec![BackendStats::default(); len];
            if batch {
                self.counters_into(&mut out.stats)?;
            } else {
                for &id in ids {
                    out.stats[id as usize] = self.backend_stats(id)?;
                }
            }
        }
        if wanted.conns {
            out.conns = vec![ConnGauge::default(); len];
            let fd = self.conns.map().fd().as_fd();
            if !(batch && crate::batch::array_into(fd, &mut out.conns)?) {
                for &id in ids {
                    out.conns[id as usize] = self.backend_conns(id)?;
                }
            }
        }
        if wanted.rates {
            out.rates = vec![RateState::default(); len];
            let fd = self.rates.map().fd().as_fd();
            match batch
                .then(|| crate::batch::read_all::<u32, RateState>(fd, None))
                .transpose()?
                .flatten()
            {
                Some(rates) => {
                    for (id, r) in rates {
                        if let Some(slot) = out.rates.get_mut(id as usize) {
                            *slot = r;
                        }
                    }
                }
                None => {
                    for &id in ids {
                        out.rates[id as usize] = self.rate_estimator(id);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Dataplane {
    /// The maps a listing or a scrape joins, each read whole in batches and
    /// concurrently (their syscalls are most of a listing's time): the
    /// service metadata (and, with `schedulers`, values) on one thread, the
    /// backends on this one, and the figures `wanted` on a third. The
    /// counter and gauge arrays are read from id 0 until the backends say
    /// how far ids go (ids are handed out lowest first); no schedule slot
    /// is read. The metadata and values come sorted by mark (sorted while
    /// the backends are still being read), and the backends as `prepare`
    /// makes them, on this thread while the figures are still being read.
    pub fn listing_maps<B>(
        &self,
        wanted: Wanted,
        prepare: impl FnOnce(Vec<(u32, BackendInfo)>) -> B,
    ) -> Result<ListingMaps<B>> {
        let ids = IdsRead::default();
        // The threads borrow the maps alone: a `Dataplane` need not be Sync.
        let (meta, services, backends, maps) = (
            &self.meta,
            &self.services,
            &self.backends,
            FigureMaps {
                stats: &self.stats,
                conns: &self.conns,
                rates: &self.rates,
                backends: self.capacity.backends as usize,
            },
        );
        let expected_services = self.capacity.services as usize;
        let (services, backends, figures) = std::thread::scope(|s| {
            let services = s.spawn(|| -> Result<_> {
                let mut metas = entries_expecting(meta, expected_services)?;
                metas.sort_unstable_by_key(|(mark, _)| *mark);
                let mut values = if wanted.schedulers {
                    entries_expecting(services, expected_services)?
                } else {
                    Vec::new()
                };
                values.sort_unstable_by_key(|(mark, _)| *mark);
                Ok((metas, values))
            });
            let figures = s.spawn(|| maps.read_until(&|done| ids.wait_past(done), wanted));
            // Ends the figures thread's wait even if this one unwinds.
            let _end = EndOnDrop(&ids);
            let backends = (|| -> Result<_> {
                let fd = backends.map().fd().as_fd();
                let expected = maps.backends;
                match crate::batch::read_all_telling(fd, None, expected, &|n| ids.tell(n, None))? {
                    Some(all) => Ok(all),
                    None => Ok(backends.iter().collect::<Result<Vec<_>, _>>()?),
                }
            })();
            let end = backends.as_ref().map_or(0, |b| {
                b.iter().map(|(id, _)| *id as usize + 1).max().unwrap_or(0)
            });
            ids.tell(end, Some(end));
            let backends = backends.map(prepare);
            (
                services
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                backends,
                figures
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
            )
        });
        let (metas, values) = services?;
        let backends = backends?;
        let end = ids.end();
        let mut figures = figures?;
        figures.stats.truncate(end);
        figures.conns.truncate(end);
        if let Some(rates) = figures.rates_read.take() {
            figures.rates = vec![RateState::default(); end];
            for (id, r) in rates {
                if let Some(slot) = figures.rates.get_mut(id as usize) {
                    *slot = r;
                }
            }
        }
        // A kernel without batch lookups: entry by entry, now that the ids are known.
        let figures = if figures.entry_by_entry {
            let ids: Vec<u32> = (0..end as u32).collect();
            self.backend_figures(&ids, wanted)?
        } else {
            BackendFigures {
                stats: figures.stats,
                conns: figures.conns,
                rates: figures.rates,
            }
        };
        Ok(ListingMaps {
            metas,
            values,
            backends,
            figures,
        })
    }
}

/// The maps of the backends' figures, for the thread that reads them.
#[derive(Clone, Copy)]
struct FigureMaps<'a> {
    stats: &'a PerCpuArray<MapData, Value<m::STATS>>,
    conns: &'a Arr<m::CONNS>,
    rates: &'a Hash<m::RATES>,
    /// The backends' capacity.
    backends: usize,
}

impl FigureMaps<'_> {
    /// The figures `wanted`, the arrays read from id 0 up to `end(n)`.
    fn read_until(&self, end: &dyn Fn(usize) -> usize, wanted: Wanted) -> Result<RawFigures> {
        let mut out = RawFigures::default();
        if wanted.stats {
            match crate::batch::array_until(
                self.stats.map().fd().as_fd(),
                true,
                end,
                self.backends,
                |t: &mut BackendStats, v| t.add(v),
            )? {
                Some(v) => out.stats = v,
                None => out.entry_by_entry = true,
            }
        }
        if wanted.conns && !out.entry_by_entry {
            match crate::batch::array_until(
                self.conns.map().fd().as_fd(),
                false,
                end,
                self.backends,
                |t: &mut ConnGauge, v| *t = *v,
            )? {
                Some(v) => out.conns = v,
                None => out.entry_by_entry = true,
            }
        }
        if wanted.rates && !out.entry_by_entry {
            let fd = self.rates.map().fd().as_fd();
            let expected = self.backends;
            match crate::batch::read_all_telling::<u32, RateState>(fd, None, expected, &|_| {})? {
                Some(v) => out.rates_read = Some(v),
                None => out.entry_by_entry = true,
            }
        }
        Ok(out)
    }
}

/// What [`Dataplane::listing_maps`] reads: services by mark, the
/// backends as its caller prepared them, and the figures by id.
pub struct ListingMaps<B> {
    pub metas: Vec<(u32, ServiceMeta)>,
    /// Empty unless schedulers were wanted.
    pub values: Vec<(u32, ServiceValue)>,
    pub backends: B,
    pub figures: BackendFigures,
}

/// How far the backends' read has got, for the thread that reads their
/// figures behind it: backend ids are handed out lowest first, so n
/// backends read mean ids reach at least n, and an array read up to there
/// reads no id that does not exist.
#[derive(Default)]
struct IdsRead {
    /// (ids known to exist up to, the end once all are read)
    state: std::sync::Mutex<(usize, Option<usize>)>,
    more: std::sync::Condvar,
}

impl IdsRead {
    fn tell(&self, at_least: usize, end: Option<usize>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.max(at_least);
        if end.is_some() {
            s.1 = end;
        }
        self.more.notify_all();
    }

    /// How far to read, once past `done` or at the end.
    fn wait_past(&self, done: usize) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(end) = s.1 {
                return end;
            }
            if s.0 > done {
                return s.0;
            }
            s = self.more.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn end(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1.unwrap_or(s.0)
    }
}

/// Tells an [`IdsRead`] that no more ids come, if nothing has said so.
struct EndOnDrop<'a>(&'a IdsRead);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        let end = self.0.end();
        self.0.tell(end, Some(end));
    }
}

/// [`FigureMaps::read_until`]'s reads, before the ids are known.
#[derive(Default)]
struct RawFigures {
    stats: Vec<BackendStats>,
    conns: Vec<ConnGauge>,
    rates: Vec<RateState>,
    rates_read: Option<Vec<(u32, RateState)>>,
    /// This kernel has no batch lookups.
    entry_by_entry: bool,
}

/// Which figures a read needs: each is a map of its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wanted {
    /// Each service's scheduler and affinity (the services map).
    pub schedulers: bool,
    pub stats: bool,
    pub conns: bool,
    pub rates: bool,
}

impl Wanted {
    pub const ALL: Wanted = Wanted {
        schedulers: true,
        stats: true,
        conns: true,
        rates: true,
    };
}

/// Backend figures indexed by backend id; a kind not wanted is empty.
#[derive(Clone, Debug, Default)]
pub struct BackendFigures {
    pub stats: Vec<BackendStats>,
    pub conns: Vec<ConnGauge>,
    pub rates: Vec<RateState>,
}

impl BackendFigures {
    pub fn stats(&self, id: u32) -> BackendStats {
        self.stats.get(id as usize).copied().unwrap_or_default()
    }

    pub fn conns(&self, id: u32) -> ConnGauge {
        self.conns.get(id as usize).copied().unwrap_or_default()
    }

    pub fn rate(&self, id: u32) -> RateState {
        self.rates.get(id as usize).copied().unwrap_or_default()
    }
}

/// Past this many backends, [`Dataplane::backend_figures`] reads the maps
/// whole rather than entry by entry.
const BATCH_FROM: usize = 64;

/// The rates map's key that is no backend's (ids stay below the backend
/// capacity): the time of the last sample, see [`Dataplane::mark_sampled`].
const SAMPLED_KEY: u32 = u32::MAX;

/// Every entry of a hash map: a few batch syscalls where the kernel has
/// them (5.6), else one lookup per entry.
fn entries<K: aya::Pod + Default, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>> {
    entries_expecting(map, 0)
}

/// [`entries`] with room made for `expected` of them first.
fn entries_expecting<K: aya::Pod + Default, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    expected: usize,
) -> Result<Vec<(K, V)>> {
    let fd = map.map().fd().as_fd();
    if let Some(all) = crate::batch::read_all_telling::<K, V>(fd, None, expected, &|_| {})? {
        return Ok(all);
    }
    Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
}

/// A map delete that finds nothing is fine: the entry is gone either way.
pub fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))
}

/// A per-port service's port and protocol as its metadata encodes them
/// (`port | protocol << 16`; 0 for an all-ports service), both ways.
pub fn meta_port(meta: &ServiceMeta) -> Option<ServicePort> {
    (meta.port_proto != 0).then_some(ServicePort {
        port: meta.port_proto as u16,
        protocol: (meta.port_proto >> 16) as u8,
    })
}

/// See [`meta_port`].
pub fn port_proto(port: Option<ServicePort>) -> u32 {
    port.map_or(0, |p| u32::from(p.port) | u32::from(p.protocol) << 16)
}

/// What the maps hold, read at one moment (or, for svclbd, carried
/// forward from the last apply by [`crate::reconcile::absorb`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<u32, ServiceState>,
    /// VIP -> mark of its all-ports service (0: none), as the VIP map holds it.
    pub vips: BTreeMap<IpAddr, u32>,
    /// VIP -> `VIP_F_*` flags.
    pub vip_flags: BTreeMap<IpAddr, u32>,
    /// (VIP, port, protocol) -> mark of a per-port service.
    pub ports: BTreeMap<(IpAddr, u16, u8), u32>,
    /// Network name -> scope bit.
    pub networks: BTreeMap<String, u32>,
    /// Mark -> the spec this process last planned the service from, if the
    /// snapshot was carried forward from its apply (empty when read from
    /// the maps): the planner passes over a service whose spec is the same,
    /// so one service's change does not re-plan the others.
    pub specs: std::collections::HashMap<u32, ServiceSpec>,
    /// Backend ids no service holds whose gauges still count sockets
    /// (read afresh by [`Dataplane::current_snapshot`] for each apply,
    /// empty otherwise): not handed out to new backends.
    pub still_counted: BTreeSet<u32>,
}

impl Snapshot {
    /// The backend ids its services hold.
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceState {
    pub mark: u32,
    pub name: String,
    pub vip: IpAddr,
    /// A per-port service's port and protocol.
    pub port: Option<ServicePort>,
    pub scheduler: Scheduler,
    pub value: ServiceValue,
    /// The active generation's slots, in slot order.
    pub slots: Vec<Slot>,
    /// Every backend, weight 0 included, sorted by address.
    pub backends: Vec<BackendState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub addr: IpAddr,
    /// None keeps the client's destination port.
    pub port: Option<u16>,
    pub weight: u32,
}

impl BackendState {
    pub fn from_info(id: u32, info: &BackendInfo) -> Self {
        BackendState {
            id,
            addr: words_addr(info.addr),
            port: (info.port_be != 0).then(|| u16::from_be(info.port_be)),
            weight: info.weight,
        }
    }
}

/// Whether svclbd checks every carried-forward snapshot against the maps.
fn verify_snapshots() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SVCLB_VERIFY_SNAPSHOTS").is_some_and(|v| v == "1"))
}

/// Faults a test injects at the map write it chooses (the Nth of this
/// process): `SVCLB_FAIL_MAP_WRITE=N` makes it fail, as a full map or the
/// kernel's ENOMEM would; `SVCLB_KILL_AT_MAP_WRITE=N` kills the process
/// there, as a SIGKILL or a crash half-way through an apply would.
fn injected_write_failure() -> Result<()> {
    use std::sync::atomic::Ordering;
    static AT: std::sync::OnceLock<(Option<u64>, Option<u64>)> = std::sync::OnceLock::new();
    let (fail_at, kill_at) = *AT.get_or_init(|| {
        let at = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
        (at("SVCLB_FAIL_MAP_WRITE"), at("SVCLB_KILL_AT_MAP_WRITE"))
    });
    let n = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
    if kill_at == Some(n) {
        eprintln!("killed before map write {n} (SVCLB_KILL_AT_MAP_WRITE)");
        // SAFETY: raising a signal at this process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    if fail_at == Some(n) {
        bail!("map write {n} failed (injected by SVCLB_FAIL_MAP_WRITE)");
    }
    Ok(())
}

/// Map write syscalls made through [`Dataplane`]'s write methods by this
/// process (a batch update counts once): each passes
/// [`injected_write_failure`] first.
static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many map write syscalls this process's applies have made (see
/// [`WRITES`]): `svclb_map_writes_total`, which shows that a restart with
/// an unchanged config writes nothing.
pub fn map_writes() -> u64 {
    WRITES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes `keys[i]` -> `values[i]` into a hash or array map in batch
/// syscalls, each one a write of [`injected_write_failure`]. False, having
/// written nothing, when the kernel has no batch updates: the caller writes
/// entry by entry then.
fn write_batch<K: aya::Pod + Sync, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<bool> {
    write_batch_bytes(
        fd,
        keys,
        crate::batch::bytes_of(values),
        std::mem::size_of::<V>(),
    )
}

/// [`write_batch`] with each value given as `value_len` bytes (per-CPU
/// maps: one value per CPU, each at an 8-byte stride).
fn write_batch_bytes<K: aya::Pod + Sync>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_len: usize,
) -> Result<bool> {
    if keys.is_empty() {
        return Ok(true);
    }
    let threads = if keys.len() >= PARALLEL_WRITES_FROM {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        1
    };
    if threads == 1 {
        return Ok(
            crate::batch::update(fd, keys, values, value_len, injected_write_failure)?.is_some(),
        );
    }
    // A large batch (a start-up over tens of thousands of services) is
    // written by several threads at once: its entries have distinct keys
    // and no order among them (the order that matters is between maps),
    // and the kernel's maps take concurrent updates.
    let per_thread = keys.len().div_ceil(threads);
    let written: Vec<Result<Option<usize>>> = std::thread::scope(|s| {
        let parts: Vec<_> = keys
            .chunks(per_thread)
            .zip(values.chunks(per_thread * value_len))
            .map(|(keys, values)| {
                s.spawn(move || {
                    crate::batch::update(fd, keys, values, value_len, injected_write_failure)
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|part| {
                part.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a map-writing thread panicked")))
            })
            .collect()
    });
    let mut batched = true;
    for part in written {
        batched &= part?.is_some();
    }
    Ok(batched)
}

/// Batches of at least this many entries are written by several threads.
const PARALLEL_WRITES_FROM: usize = 16_384;
