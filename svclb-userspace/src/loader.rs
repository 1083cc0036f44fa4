//! Loading the eBPF object with its maps pinned, and attaching its programs
//! to cgroups through pinned links.
//!
//! Links are pinned, never held: the pin is the only reference, so the
//! data plane outlives svclbd (restarts and upgrades lose no connection) and
//! removing the pin (`svclb-ctl detach`) detaches at once.

use std::{
    fs,
    os::fd::FromRawFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};
use svclb_common::{map_names, program_names, LayoutValue, MapCapacity, LAYOUT_VERSION};

use crate::{cgroup::CgroupPath, dataplane::check_pinned_layout, pins::PinDir};

/// Map capacities for maps that are created (pinned maps keep theirs).
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub max_services: u32,
    pub max_backends: u32,
    /// Schedule slots; 0: the larger of 4 x `max_backends` and
    /// [`svclb_common::DEFAULT_MAX_SLOTS`].
    pub max_slots: u32,
}

impl Capacities {
    /// The slot map's capacity.
    pub fn slots(&self) -> u32 {
        if self.max_slots != 0 {
            return self.max_slots;
        }
        self.max_backends
            .saturating_mul(4)
            .max(svclb_common::DEFAULT_MAX_SLOTS)
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            max_services: svclb_common::DEFAULT_MAX_SERVICES,
            max_backends: svclb_common::DEFAULT_MAX_BACKENDS,
            max_slots: 0,
        }
    }
}

/// How a program is attached to a cgroup.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SockAddr,
    Skb(CgroupSkbAttachType),
    SockOps,
    Sock,
}

/// The programs svclb attaches to every cgroup, in attach order: the
/// counters and reverse translations before the translations, so that no
/// translated socket misses its first packet or its state callback.
const PROGRAMS: [(&str, Hook); 12] = [
    (
        program_names::SKB_EGRESS,
        Hook::Skb(CgroupSkbAttachType::Egress),
    ),
    (
        program_names::SKB_INGRESS,
        Hook::Skb(CgroupSkbAttachType::Ingress),
    ),
    (program_names::SOCK_OPS, Hook::SockOps),
    (program_names::SOCK_RELEASE, Hook::Sock),
    (program_names::RECVMSG4, Hook::SockAddr),
    (program_names::RECVMSG6, Hook::SockAddr),
    (program_names::GETPEERNAME4, Hook::SockAddr),
    (program_names::GETPEERNAME6, Hook::SockAddr),
    (program_names::CONNECT4, Hook::SockAddr),
    (program_names::CONNECT6, Hook::SockAddr),
    (program_names::SENDMSG4, Hook::SockAddr),
    (program_names::SENDMSG6, Hook::SockAddr),
];

/// What [`Loaded::attach`] puts on the two cgroup_skb hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PacketCounters {
    /// The counters: InPkts, OutPkts, InBytes, OutBytes.
    #[default]
    On,
    /// Nothing (and an earlier attachment's counters are removed): the
    /// In/Out columns stop counting, everything else works.
    Off,
    /// Programs that do nothing: the kernel's hook runs for every packet,
    /// nothing is counted. Measures the hook's own cost.
    HookOnly,
}

/// The no-op stand-in of a counter program.
fn nop_counter(name: &str) -> &'static str {
    if name == program_names::SKB_EGRESS {
        program_names::SKB_EGRESS_NOP
    } else {
        program_names::SKB_INGRESS_NOP
    }
}

/// Names of the programs attached to every cgroup.
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(name, _)| *name)
}

/// A loaded object whose maps are the pinned ones.
pub struct Loaded {
    ebpf: Ebpf,
    pins: PinDir,
    /// What [`Loaded::attach`] attaches to the cgroup_skb hooks.
    packet_counters: PacketCounters,
}

/// Loads the programs, creating and pinning the maps or adopting the
/// pinned ones after checking their layout.
pub fn load(pins: &PinDir, caps: Capacities) -> Result<Loaded> {
    let mut maps = load_maps(pins, caps)?;
    maps.pin_created()?;
    maps.verify()
}

/// The object with its maps created or adopted, its programs not yet
/// loaded: [`Unverified::pin_created`] pins the maps it created, then
/// [`Unverified::verify`] loads the programs.
pub struct Unverified {
    ebpf: Ebpf,
    pins: PinDir,
    /// Maps this load created, not pinned yet.
    created: Vec<&'static str>,
    /// The apply serial when the maps were created or adopted.
    serial: u32,
}

/// The first half of [`load`]: the pinned maps adopted, the missing ones
/// created but not pinned, so that a caller that finds it must not go on
/// (an invalid config read meanwhile) drops them and leaves no trace. The
/// adopted maps are only read here.
pub fn load_maps(pins: &PinDir, caps: Capacities) -> Result<Unverified> {
    crate::privileges::require_root()?;
    let object = crate::ebpf_object();
    if object.is_empty() {
        bail!("this binary was built without its eBPF object: build it with `cargo xtask build`");
    }
    pins.prepare()?;
    check_pinned_layout(pins)?;
    let (adopted, created): (Vec<&'static str>, Vec<&'static str>) = map_names::ALL
        .iter()
        .partition(|name| pins.map(name).exists());
    let map_paths: Vec<(&str, PathBuf)> = adopted.iter().map(|n| (*n, pins.map(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    // The capacity classes of svclb_common's map table; fixed ones keep
    // the object's. Slots are allocated on use; their hash buckets (16
    // bytes per entry of capacity) up front.
    for map in svclb_common::MAPS {
        let entries = match map.capacity {
            MapCapacity::Services => caps.max_services,
            MapCapacity::Backends => caps.max_backends,
            MapCapacity::Slots => caps.slots(),
            MapCapacity::Fixed(_) => continue,
        };
        loader.map_max_entries(map.name, entries);
    }
    let mut ebpf = loader.load(object).context("loading the eBPF object")?;

    // The one map write outside `Dataplane`: the version stamp of maps just
    // created or adopted, before any `Dataplane` may open them.
    let mut layout: Array<&mut MapData, LayoutValue> = ebpf
        .map_mut(map_names::LAYOUT)
        .context("the eBPF object has no layout map")?
        .try_into()?;
    let current = layout.get(&0, 0)?.version;
    if current != 0 && current != LAYOUT_VERSION {
        bail!(
            "the maps pinned at {} have layout version {current}, this svclb writes version {LAYOUT_VERSION}: \
             remove them with `svclb-ctl teardown`",
            pins.root().display()
        );
    }
    // Stamped once, when created: a running svclbd's apply serial in an
    // adopted map is not written back.
    let serial = layout.get(&0, 0)?.apply_serial;
    if current == 0 {
        layout.set(
            0,
            LayoutValue {
                version: LAYOUT_VERSION,
                apply_serial: serial,
            },
            0,
        )?;
    }

    Ok(Unverified {
        ebpf,
        pins: pins.clone(),
        created,
        serial,
    })
}

impl Unverified {
    /// The apply serial at which [`load_maps`] created the gauges map
    /// (empty then), if it did; None if it adopted a pinned one.
    pub fn gauges_created_at(&self) -> Option<u32> {
        self.created
            .contains(&map_names::CONNS)
            .then_some(self.serial)
    }

    /// Pins the maps [`load_maps`] created: from here on they outlive the
    /// process.
    pub fn pin_created(&mut self) -> Result<()> {
        for name in std::mem::take(&mut self.created) {
            let path = self.pins.map(name);
            let map = self
                .ebpf
                .map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))?;
            map.pin(&path).with_context(|| {
                format!(
                    "pinning map {name} at {} (another svclb may have pinned its maps meanwhile: start again)",
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    /// Loads every program (the kernel verifies each: about 150 ms in all,
    /// most of it the connect and sendmsg programs, whatever the maps
    /// hold), on two threads, so a two-core node verifies in half the time.
    pub fn verify(mut self) -> Result<Loaded> {
        let nops = [
            (
                program_names::SKB_EGRESS_NOP,
                Hook::Skb(CgroupSkbAttachType::Egress),
            ),
            (
                program_names::SKB_INGRESS_NOP,
                Hook::Skb(CgroupSkbAttachType::Ingress),
            ),
        ];
        let wanted: Vec<(&str, Hook)> = PROGRAMS.into_iter().chain(nops).collect();
        let progs: Vec<(&str, Hook, &mut aya::programs::Program)> = self
            .ebpf
            .programs_mut()
            .filter_map(|(name, prog)| {
                let (_, hook) = wanted.iter().find(|(n, _)| *n == name)?;
                Some((name, *hook, prog))
            })
            .collect();
        for (name, _) in &wanted {
            if !progs.iter().any(|(n, _, _)| n == name) {
                bail!("the eBPF object has no program {name}");
            }
        }
        // The four translating programs take nearly all of the verifier's
        // time (connect4 and sendmsg4 the most): two on each thread.
        let (first, second): (Vec<_>, Vec<_>) = progs.into_iter().partition(|(name, _, _)| {
            [program_names::CONNECT6, program_names::SENDMSG4].contains(name)
        });
        std::thread::scope(|s| {
            let other = s.spawn(move || load_programs(first));
            let here = load_programs(second);
            other
                .join()
                .map_err(|_| anyhow::anyhow!("loading the programs: a thread panicked"))?
                .and(here)
        })?;
        Ok(Loaded {
            ebpf: self.ebpf,
            pins: self.pins,
            packet_counters: PacketCounters::On,
        })
    }

    /// [`Unverified::verify`] on a thread of its own: the caller writes the
    /// maps meanwhile, and joins before attaching.
    pub fn verify_in_background(self) -> std::thread::JoinHandle<Result<Loaded>> {
        std::thread::spawn(move || self.verify())
    }
}

fn load_programs(progs: Vec<(&str, Hook, &mut aya::programs::Program)>) -> Result<()> {
    for (name, hook, prog) in progs {
        let started = std::time::Instant::now();
        let loaded = match hook {
            Hook::SockAddr => <&mut CgroupSockAddr>::try_from(&mut *prog)?.load(),
            Hook::Skb(_) => <&mut CgroupSkb>::try_from(&mut *prog)?.load(),
            Hook::SockOps => <&mut SockOps>::try_from(&mut *prog)?.load(),
            Hook::Sock => <&mut CgroupSock>::try_from(&mut *prog)?.load(),
        };
        loaded.with_context(|| format!("loading program {name} (the verifier refused it)"))?;
        let verified = prog
            .info()
            .ok()
            .and_then(|info| info.verified_instruction_count());
        tracing::debug!(
            program = name,
            verified_instructions = verified,
            ms = started.elapsed().as_millis() as u64,
            "program loaded"
        );
    }
    Ok(())
}

/// Whether a program is one of the two cgroup_skb packet counters.
fn is_packet_counter(hook: Hook) -> bool {
    matches!(hook, Hook::Skb(_))
}

impl Loaded {
    /// Anything but [`PacketCounters::On`] is for measuring what the
    /// counting costs (`svclbd --no-packet-counters`,
    /// `--packet-counters-hook-only`).
    pub fn set_packet_counters(&mut self, counters: PacketCounters) {
        self.packet_counters = counters;
    }

    /// Forwards what the programs log (aya-log, rare paths only) to the
    /// `log`/tracing output for as long as the tokio runtime runs. The
    /// logger owns the log map and must live: it moves into the task.
    pub fn spawn_log_forwarder(&mut self) -> Result<()> {
        let logger =
            aya_log::EbpfLogger::init(&mut self.ebpf).context("reading the programs' log map")?;
        // SAFETY: the AsyncFd owns the logger, which owns the fd: it stays open
        // for as long as it is registered.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)?
        };
        tokio::spawn(async move {
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Pins again, from this process's own descriptors, each map whose pin
    /// is gone (removed by hand, or bpffs mounted afresh); returns their
    /// names. A map this process no longer holds (the log's) is skipped.
    pub fn repin_missing_maps(&self) -> Result<Vec<&'static str>> {
        let mut repinned = Vec::new();
        for name in map_names::ALL {
            let path = self.pins.map(name);
            if path.exists() {
                continue;
            }
            if let Some(map) = self.ebpf.map(name) {
                map.pin(&path)
                    .with_context(|| format!("pinning {} again", path.display()))?;
                repinned.push(name);
            }
        }
        Ok(repinned)
    }

    /// Whether a link [`Loaded::attach`] pins for `cgroup` is missing from
    /// its directory. A directory gone altogether is `svclb-ctl detach`'s
    /// doing, not a fault: false then.
    pub fn link_pin_missing(&self, cgroup: &CgroupPath) -> bool {
        let dir = self.pins.links().join(cgroup.pin_name());
        dir.exists()
            && PROGRAMS.iter().any(|(name, hook)| {
                let unattached =
                    is_packet_counter(*hook) && self.packet_counters == PacketCounters::Off;
                !unattached && !dir.join(name).exists()
            })
    }

    /// Attaches every program to `cgroup`. An existing attachment is
    /// replaced without a gap: the new link is attached and pinned beside
    /// the old one, then renamed over it, which detaches the old one.
    pub fn attach(&mut self, cgroup: &CgroupPath) -> Result<()> {
        let dir = self.pins.links().join(cgroup.pin_name());
        crate::pins::private_dir(&dir)?;
        for (name, hook) in PROGRAMS {
            let counter = is_packet_counter(hook);
            if counter && self.packet_counters == PacketCounters::Off {
                let path = dir.join(name);
                if path.exists() {
                    detach_pinned_link(&path)
                        .with_context(|| format!("detaching {}", path.display()))?;
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                continue;
            }
            // The stand-in is pinned under the counter's name, so that the
            // next attachment replaces it like any other link.
            let program = if counter && self.packet_counters == PacketCounters::HookOnly {
                nop_counter(name)
            } else {
                name
            };
            let prog = self
                .ebpf
                .program_mut(program)
                .with_context(|| format!("no program {program}"))?;
            let file = fs::File::open(&cgroup.absolute)
                .with_context(|| format!("opening cgroup {}", cgroup.absolute.display()))?;
            let mode = CgroupAttachMode::Single;
            let context = || format!("attaching {program} to {}", cgroup.absolute.display());
            let link: FdLink = match hook {
                Hook::SockAddr => {
                    let p = <&mut CgroupSockAddr>::try_from(&mut *prog)?;
                    let id = p.attach(file, mode).with_context(context)?;
                    p.take_link(id)?.try_into()?
                }
                Hook::Skb(direction) => {
                    let p = <&mut CgroupSkb>::try_from(&mut *prog)?;
                    let id = p.attach(file, direction, mode).with_context(context)?;
                    p.take_link(id)?.try_into()?
                }
                Hook::SockOps => {
                    let p = <&mut SockOps>::try_from(&mut *prog)?;
                    let id = p.attach(file, mode).with_context(context)?;
                    p.take_link(id)?.try_into()?
                }
                Hook::Sock => {
                    let p = <&mut CgroupSock>::try_from(&mut *prog)?;
                    let id = p.attach(file, mode).with_context(context)?;
                    p.take_link(id)?.try_into()?
                }
            };
            // bpffs refuses dots in names.
            let fresh = dir.join(format!("{name}_new"));
            let _ = fs::remove_file(&fresh);
            let pinned = link
                .pin(&fresh)
                .with_context(|| format!("pinning {}", fresh.display()))?;
            let path = dir.join(name);
            fs::rename(&fresh, &path)
                .with_context(|| format!("renaming the new link to {}", path.display()))?;
            // Dropping our fd leaves the pin as the link's only reference.
            drop(pinned);
        }
        Ok(())
    }
}

/// An attachment found in the pin directory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// The cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// The networks its processes are on (see `svclb-ctl attach --network`).
    pub networks: Vec<String>,
    pub programs: Vec<String>,
}

/// Lists the cgroups that have svclb links pinned.
pub fn attachments(pins: &PinDir) -> Result<Vec<Attachment>> {
    let mut out = Vec::new();
    let dir = pins.links();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries {
        let entry = entry?;
        let mut programs: Vec<String> = fs::read_dir(entry.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        programs.sort();
        out.push(Attachment {
            cgroup: crate::cgroup::unescape(&entry.file_name().to_string_lossy()),
            networks: Vec::new(),
            programs,
        });
    }
    out.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    Ok(out)
}

/// Detaches svclb from `cgroup`: each link is detached at once (the
/// kernel would otherwise release an unpinned link later, from a work
/// queue, and a connect made right after `detach` could still be
/// translated), then its pin is removed.
pub fn detach(pins: &PinDir, cgroup: &CgroupPath) -> Result<bool> {
    let dir = pins.links().join(cgroup.pin_name());
    if !dir.exists() {
        return Ok(false);
    }
    detach_links_in(&dir)?;
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}

fn detach_links_in(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        detach_pinned_link(&path).with_context(|| format!("detaching {}", path.display()))?;
    }
    Ok(())
}

/// BPF_OBJ_GET on the pin, then BPF_LINK_DETACH (kernel 5.9), which aya 0.14
/// does not expose.
fn detach_pinned_link(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr, large enough for both commands' structs.
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    let size = std::mem::size_of_val(&attr) as libc::c_long;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET");
    }
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 8];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32);
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_LINK_DETACH");
    }
    Ok(())
}

/// Removes every attachment and pinned map: the data plane is gone.
pub fn teardown(pins: &PinDir) -> Result<()> {
    let links = pins.links();
    if links.exists() {
        for entry in fs::read_dir(&links)? {
            detach_links_in(&entry?.path())?;
        }
        fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in map_names::ALL {
        let path = pins.map(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    remove_dir_if_empty(pins.root());
    Ok(())
}

fn remove_dir_if_empty(path: &Path) {
    let _ = fs::remove_dir(path);
}
