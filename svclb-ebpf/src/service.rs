//! From a destination to a backend: the VIP and port lookups, the
//! scheduler's pick, and the per-socket state that remembers the choice.

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop,
};
use core::{
    ffi::c_void,
    ptr,
    sync::atomic::{compiler_fence, Ordering},
};
use svclb_common::{
    schedule::client_slot, AffinityKey, AffinityValue, BackendStats, PortKey, Scheduler,
    ServiceValue, Slot, SlotKey, SockState, VipKey, CONN_ACTIVE, CONN_INACTIVE, CONN_NONE,
    MAX_LC_BACKENDS,
};

use crate::maps::{
    AFFINITY, BACKENDS, CONNS, PORTS, RR, SCOPES, SERVICES, SLOTS, STATS, STATS_MOVED, VIPS,
};

/// What a destination is.
pub enum Dest {
    /// Not a VIP (or not one this caller may see): leave it alone.
    Plain,
    /// A VIP without a service that can take the connection: refuse it.
    Refuse,
    /// A VIP of this service.
    Service(u32, ServiceValue),
}

/// Looks a destination up. A non-VIP costs exactly one hash lookup.
#[inline(always)]
pub fn resolve(key: &VipKey, port_be: u16, proto: u8) -> Dest {
    let Some(vip) = (unsafe { VIPS.get(key) }) else {
        return Dest::Plain;
    };
    let mut mark = vip.mark;
    if vip.has_ports() {
        let pk = PortKey {
            addr: key.addr,
            port_be,
            proto,
            _pad: 0,
        };
        if let Some(m) = unsafe { PORTS.get(&pk) } {
            mark = *m;
        }
    }
    if mark == 0 {
        return Dest::Refuse;
    }
    let Some(svc) = (unsafe { SERVICES.get(&mark) }) else {
        return Dest::Refuse;
    };
    if svc.scope != 0 && caller_scope() & svc.scope == 0 {
        // Like a container that is not on the service's network: the VIP
        // means nothing to it.
        return Dest::Plain;
    }
    Dest::Service(mark, *svc)
}

/// Deepest cgroup levels searched for an attached ancestor.
const MAX_CGROUP_DEPTH: i32 = 16;

/// The networks of the calling process: those of the deepest attached
/// cgroup among its cgroup and ancestors.
#[inline(always)]
fn caller_scope() -> u64 {
    let mut scope = 0;
    for level in 0..MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if let Some(s) = unsafe { SCOPES.get(&id) } {
            scope = *s;
        }
    }
    scope
}

/// Picks a backend slot of `svc` for a client (`client()`: its network
/// namespace cookie), honouring affinity: the client's earlier backend while
/// it is fresh and scheduled.
#[inline(always)]
pub fn pick(mark: u32, svc: &ServiceValue, client: impl Fn() -> u64) -> Option<Slot> {
    if svc.count == 0 {
        return None;
    }
    let affinity = svc.has_affinity();
    // Only affinity and the hashing schedulers need to know the client: the
    // others skip the helper call.
    let by_client = affinity || svc.scheduler().is_some_and(Scheduler::by_client);
    let netns_cookie = if by_client { client() } else { 0 };
    let key = AffinityKey {
        netns_cookie,
        mark,
        _pad: 0,
    };
    let now = if affinity {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if affinity {
        if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
            let entry = unsafe { &mut *entry };
            let timeout = u64::from(svc.affinity_secs).wrapping_mul(1_000_000_000);
            if now.wrapping_sub(entry.last_ns) < timeout && still_scheduled(mark, &entry.slot) {
                entry.last_ns = now;
                return Some(entry.slot);
            }
        }
    }
    let chosen = pick_fresh(mark, svc, netns_cookie)?;
    if affinity {
        let value = AffinityValue {
            slot: chosen,
            _pad: 0,
            last_ns: now,
        };
        let _ = AFFINITY.insert(&key, &value, 0);
    }
    Some(chosen)
}

/// Slot `index` of the generation `svc` names. `svc` was copied when the
/// connect began; if an update switched generations since and has already
/// deleted the old one, the slot is gone. Refusing then would be a lost
/// race, not an empty service: look again in the generation the service
/// points at now, which was complete before the switch (reconcile.rs),
/// so the connect gets a backend of the newer set.
#[inline(always)]
fn slot(mark: u32, svc: &ServiceValue, index: u32) -> Option<Slot> {
    let key = SlotKey {
        mark,
        slot: svc.slot_base.wrapping_add(index),
    };
    if let Some(s) = unsafe { SLOTS.get(&key) } {
        return Some(*s);
    }
    let now = unsafe { SERVICES.get(&mark) }?;
    if now.count == 0 {
        return None;
    }
    let key = SlotKey {
        mark,
        slot: now.slot_base.wrapping_add(index % now.count),
    };
    unsafe { SLOTS.get(&key) }.copied()
}

#[inline(always)]
fn pick_fresh(mark: u32, svc: &ServiceValue, netns_cookie: u64) -> Option<Slot> {
    let count = svc.count;
    // An unknown value (None) picks at random, like Random.
    let index = match svc.scheduler() {
        Some(Scheduler::Rr | Scheduler::Wrr) => match RR.get_ptr_mut(&mark) {
            Some(pos) => unsafe {
                let i = *pos;
                *pos = i.wrapping_add(1);
                i % count
            },
            None => (unsafe { bpf_get_prandom_u32() }) % count,
        },
        Some(Scheduler::Mh | Scheduler::Sh) => client_slot(netns_cookie, mark, count),
        Some(Scheduler::Lc | Scheduler::Wlc) => return least_connection(mark, svc),
        Some(Scheduler::Random) | None => (unsafe { bpf_get_prandom_u32() }) % count,
    };
    slot(mark, svc, index)
}

/// IPVS lc/wlc: the backend with the smallest active*256 + inactive
/// (divided by weight for wlc, compared by cross-multiplying), among all
/// slots or, past MAX_LC_BACKENDS, that many from a random start. The
/// comparison runs under `bpf_loop`: the kernel verifies its body once,
/// where an unrolled loop cost the verifier about 270,000 instructions per
/// program (most of svclbd's start-up).
#[inline(never)]
fn least_connection(mark: u32, svc: &ServiceValue) -> Option<Slot> {
    let count = svc.count;
    let start = if count > MAX_LC_BACKENDS {
        (unsafe { bpf_get_prandom_u32() }) % count
    } else {
        0
    };
    let mut search = LcSearch {
        mark,
        slot_base: svc.slot_base,
        count,
        start,
        weighted: u64::from(matches!(svc.scheduler(), Some(Scheduler::Wlc))),
        best_index: 0,
        _pad: 0,
        // Compared by cross-multiplying, so "infinitely loaded" must not wrap.
        best_load: u64::MAX >> 24,
        best_weight: 1,
    };
    unsafe {
        bpf_loop(
            count.min(MAX_LC_BACKENDS),
            lc_visit as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    slot(mark, svc, search.best_index)
}

/// A least-connection search in progress, on the picking program's stack.
#[repr(C)]
struct LcSearch {
    mark: u32,
    slot_base: u32,
    count: u32,
    start: u32,
    /// 1 for wlc (the slot's weight counts), 0 for lc.
    weighted: u64,
    best_index: u32,
    _pad: u32,
    best_load: u64,
    best_weight: u64,
}

/// One slot of a least-connection search (a `bpf_loop` callback: 0 goes on).
/// Branch-light: every branch here multiplies the verifier's work.
extern "C" fn lc_visit(n: u64, search: *mut c_void) -> i64 {
    let search = unsafe { &mut *search.cast::<LcSearch>() };
    if search.count == 0 {
        return 1;
    }
    let i = search.start.wrapping_add(n as u32) % search.count;
    let key = SlotKey {
        mark: search.mark,
        slot: search.slot_base.wrapping_add(i),
    };
    let Some(s) = SLOTS.get_ptr(&key) else {
        return 0;
    };
    let (backend_id, w) = unsafe { ((*s).backend_id, (*s).weight) };
    let Some(g) = CONNS.get_ptr(backend_id) else {
        return 0;
    };
    let load = unsafe {
        ((*g).active as u64)
            .wrapping_mul(256)
            .wrapping_add((*g).inactive as u64)
    };
    // wlc: the slot's weight (never 0: quiescent backends have no slot); lc: 1.
    let weighted = search.weighted;
    let weight = u64::from(w)
        .wrapping_mul(weighted)
        .wrapping_add(1 - weighted);
    if load.wrapping_mul(search.best_weight) < search.best_load.wrapping_mul(weight) {
        search.best_index = i;
        search.best_load = load;
        search.best_weight = weight;
    }
    0
}

/// Whether a backend remembered earlier still belongs to the service and
/// takes new connections (weight > 0).
#[inline(always)]
fn still_scheduled(mark: u32, slot: &Slot) -> bool {
    match unsafe { BACKENDS.get(&slot.backend_id) } {
        Some(b) => b.mark == mark && b.weight > 0 && b.addr == slot.addr,
        None => false,
    }
}

/// Counts a new connection to a backend (IPVS's Conns; a new connection
/// starts inactive, like IPVS's).
#[inline(always)]
pub fn count_new_connection(backend_id: u32) {
    add_to_counters(backend_id, |stats| {
        stats.conns = stats.conns.wrapping_add(1);
    });
}

/// The one writer of a backend's counters (this CPU's): `add`, then the
/// flag that tells svclbd's rate sampler to read them. The flag is written
/// after the counters, so a sampler that clears it and then reads sees
/// this addition, and only when it is clear: a shared line that every CPU
/// kept writing would cost more than the counting.
#[inline(always)]
pub fn add_to_counters(backend_id: u32, add: impl FnOnce(&mut BackendStats)) {
    let Some(stats) = STATS.get_ptr_mut(backend_id) else {
        return;
    };
    add(unsafe { &mut *stats });
    compiler_fence(Ordering::Release);
    if let Some(moved) = STATS_MOVED.get_ptr_mut(backend_id) {
        unsafe {
            if ptr::read_volatile(moved) == 0 {
                ptr::write_volatile(moved, 1);
            }
        }
    }
}

#[inline(always)]
fn gauge_add(backend_id: u32, active: i64, inactive: i64) {
    if let Some(g) = CONNS.get_ptr_mut(backend_id) {
        unsafe {
            if active != 0 {
                atomic_add(&raw mut (*g).active, active);
            }
            if inactive != 0 {
                atomic_add(&raw mut (*g).inactive, inactive);
            }
        }
    }
}

/// `lock *(u64 *)(p) += v`: BPF's atomic add. core's atomics have no
/// fetch_add on this target, and the gauges are shared by all CPUs.
#[inline(always)]
unsafe fn atomic_add(p: *mut i64, v: i64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack)
        )
    };
}

/// Moves a socket between the ActiveConn/InActConn gauges.
#[inline(always)]
pub fn set_conn_state(state: &mut SockState, to: u32) {
    let from = state.conn;
    if from == to {
        return;
    }
    let (mut active, mut inactive) = (0i64, 0i64);
    if from == CONN_ACTIVE {
        active -= 1;
    } else if from == CONN_INACTIVE {
        inactive -= 1;
    }
    if to == CONN_ACTIVE {
        active += 1;
    } else if to == CONN_INACTIVE {
        inactive += 1;
    }
    gauge_add(state.backend_id, active, inactive);
    state.conn = to;
}

/// Forgets a socket's earlier association (a UDP socket connected again).
#[inline(always)]
pub fn release_conn(state: &mut SockState) {
    set_conn_state(state, CONN_NONE);
}
