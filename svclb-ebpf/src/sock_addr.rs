//! The socket hooks: connect() and sendmsg() to a VIP are rewritten to a
//! backend; recvmsg() and getpeername() show the VIP again, so the
//! application cannot tell.
//!
//! Each hook is one line over two helpers, as in Cilium's bpf_sock.c:
//! [`xlate_fwd`] (connect, sendmsg: [`on_connect`] or [`on_sendmsg`], as
//! [`Fwd`] says, decide a [`Verdict`]) and [`xlate_rev`] (recvmsg,
//! getpeername: [`reverse`]), each for a [`Family`] that reads and writes
//! the context's address.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use svclb_common::{
    ServiceValue, Slot, SockState, UdpConn, VipKey, CONN_INACTIVE, IPPROTO_TCP, IPPROTO_UDP,
    SOCK_F_TCP, SOCK_F_UDP_CONN,
};

use crate::{
    maps::{SOCKS, UDP_CONNS},
    service::{count_new_connection, pick, release_conn, resolve, set_conn_state, Dest},
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The destination a hook sees, as 16 bytes (IPv4 mapped) and a port.
struct Target {
    key: VipKey,
    port_be: u16,
}

/// What a hook does with the address it was given.
enum Verdict {
    /// Not svclb's: leave it as it is.
    Pass,
    /// Replace it (a backend on the way out, the VIP on the way back).
    Rewrite { addr: [u32; 4], port_be: u16 },
    /// A VIP that cannot take the connection: ECONNREFUSED.
    Refuse,
}

/// The context's address family: which fields hold the address.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    #[inline(always)]
    fn read(self, sa: *mut bpf_sock_addr) -> Target {
        match self {
            Family::V4 => read4(sa),
            Family::V6 => read6(sa),
        }
    }

    #[inline(always)]
    fn write(self, sa: *mut bpf_sock_addr, addr: &[u32; 4], port_be: u16) {
        match self {
            Family::V4 => write4(sa, addr, port_be),
            Family::V6 => write6(sa, addr, port_be),
        }
    }
}

/// The calls translated forward.
#[derive(Clone, Copy)]
enum Fwd {
    Connect,
    Sendmsg,
}

/// connect()/sendmsg(): the address the socket goes to. (An enum rather
/// than a function argument: a function item passed in is called through
/// an outlined shim, a BPF-to-BPF call that connect would pay.)
#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext, family: Family, call: Fwd) -> i32 {
    let target = family.read(ctx.sock_addr);
    let verdict = match call {
        Fwd::Connect => on_connect(ctx, &target),
        Fwd::Sendmsg => on_sendmsg(ctx, &target),
    };
    match verdict {
        Verdict::Pass => ALLOW,
        Verdict::Rewrite { addr, port_be } => {
            family.write(ctx.sock_addr, &addr, port_be);
            ALLOW
        }
        Verdict::Refuse => refuse(),
    }
}

/// recvmsg()/getpeername(): the peer the application is shown. These
/// programs must return exactly 1, so a reverse translation never refuses.
#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext, family: Family) -> i32 {
    if let Verdict::Rewrite { addr, port_be } = reverse(ctx, &family.read(ctx.sock_addr)) {
        family.write(ctx.sock_addr, &addr, port_be);
    }
    ALLOW
}

#[inline(always)]
fn read4(sa: *mut bpf_sock_addr) -> Target {
    unsafe {
        Target {
            key: VipKey::from_ipv4_be((*sa).user_ip4),
            // user_port may be read narrowly only on newer kernels; a
            // volatile 4-byte read keeps LLVM from narrowing it.
            port_be: core::ptr::read_volatile(&(*sa).user_port) as u16,
        }
    }
}

#[inline(always)]
fn read6(sa: *mut bpf_sock_addr) -> Target {
    // Element by element: a whole-array copy of user_ip6 is a "modified
    // ctx ptr" dereference to the verifier.
    unsafe {
        Target {
            key: VipKey {
                addr: [
                    (*sa).user_ip6[0],
                    (*sa).user_ip6[1],
                    (*sa).user_ip6[2],
                    (*sa).user_ip6[3],
                ],
            },
            port_be: core::ptr::read_volatile(&(*sa).user_port) as u16,
        }
    }
}

#[inline(always)]
fn write4(sa: *mut bpf_sock_addr, addr: &[u32; 4], port_be: u16) {
    unsafe {
        (*sa).user_ip4 = addr[3];
        (*sa).user_port = u32::from(port_be);
    }
}

#[inline(always)]
fn write6(sa: *mut bpf_sock_addr, addr: &[u32; 4], port_be: u16) {
    unsafe {
        (*sa).user_ip6[0] = addr[0];
        (*sa).user_ip6[1] = addr[1];
        (*sa).user_ip6[2] = addr[2];
        (*sa).user_ip6[3] = addr[3];
        (*sa).user_port = u32::from(port_be);
    }
}

/// What IPVS does when a service has no destination: the client sees
/// ECONNREFUSED at once (for connect() and for sendmsg()), not EPERM and
/// not a timeout.
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[inline(always)]
fn socket_proto(ctx: &SockAddrContext) -> Option<u8> {
    let proto = unsafe { (*ctx.sock_addr).protocol };
    if proto == u32::from(IPPROTO_TCP) || proto == u32::from(IPPROTO_UDP) {
        Some(proto as u8)
    } else {
        None
    }
}

/// connect(): picks a backend for the socket and remembers it.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, target: &Target) -> Verdict {
    let Some(proto) = socket_proto(ctx) else {
        return Verdict::Pass;
    };
    let (mark, svc) = match resolve(&target.key, target.port_be, proto) {
        Dest::Plain => {
            if proto == IPPROTO_UDP {
                forget(ctx);
            }
            return Verdict::Pass;
        }
        Dest::Refuse => return Verdict::Refuse,
        Dest::Service(mark, svc) => (mark, svc),
    };
    if svc.count == 0 {
        return Verdict::Refuse;
    }
    let Some(slot) = pick_or_warn(ctx, mark, &svc) else {
        return Verdict::Refuse;
    };
    let port_be = dest_port(&slot, target);
    let state = unsafe { SOCKS.get_or_insert_ptr_mut(ctx, None) };
    if let Some(state) = unsafe { state.as_mut() } {
        let flags = if proto == IPPROTO_TCP {
            SOCK_F_TCP
        } else {
            // Found again by cookie if its backend leaves (terminate.rs);
            // only a socket with a record, whose release removes it.
            let conn = UdpConn {
                backend_id: slot.backend_id,
                mark,
            };
            let cookie = socket_cookie(ctx);
            match UDP_CONNS.insert(&cookie, &conn, 0) {
                Ok(()) => SOCK_F_UDP_CONN,
                Err(_) => {
                    // No entry naming an earlier backend either.
                    let _ = UDP_CONNS.remove(&cookie);
                    0
                }
            }
        };
        remember(state, target, &slot, port_be, mark, &svc, flags);
    }
    count_new_connection(slot.backend_id);
    Verdict::Rewrite {
        addr: slot.addr,
        port_be,
    }
}

/// A UDP socket connected again, to something that is not a VIP, is no
/// longer the backend's: it leaves the gauges, and its packets are no
/// longer counted nor its replies shown as the VIP. Only UDP sockets pay
/// this lookup (a TCP socket connects once), and one that svclb never
/// translated has no storage to find.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    let state = unsafe { SOCKS.get_ptr_mut(ctx) };
    if let Some(state) = unsafe { state.as_mut() } {
        release_conn(state);
        state.mark = 0;
        if state.has_udp_conn() {
            let _ = UDP_CONNS.remove(&socket_cookie(ctx));
            state.flags &= !SOCK_F_UDP_CONN;
        }
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// sendmsg() on an unconnected UDP socket: each datagram to a VIP goes to
/// the backend this socket was given, chosen again only when the schedule
/// has changed since, so a request and its retries reach the same task.
#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, target: &Target) -> Verdict {
    let (mark, svc) = match resolve(&target.key, target.port_be, IPPROTO_UDP) {
        Dest::Plain => return Verdict::Pass,
        Dest::Refuse => return Verdict::Refuse,
        Dest::Service(mark, svc) => (mark, svc),
    };
    if svc.count == 0 {
        return Verdict::Refuse;
    }
    let state = unsafe { SOCKS.get_or_insert_ptr_mut(ctx, None) };
    let state = unsafe { state.as_mut() };
    if let Some(state) = &state {
        if state.mark == mark
            && state.generation == svc.generation
            && state.vip == target.key.addr
            && state.vip_port_be == target.port_be
        {
            return Verdict::Rewrite {
                addr: state.backend,
                port_be: state.backend_port_be,
            };
        }
    }
    let Some(slot) = pick_or_warn(ctx, mark, &svc) else {
        return Verdict::Refuse;
    };
    let port_be = dest_port(&slot, target);
    count_new_connection(slot.backend_id);
    // Without socket storage (memory pressure) it is balanced, unremembered.
    if let Some(state) = state {
        // UDP: no TCP flag, its packets get the peer check; a cookie
        // entry it has from a connect stays its release's to remove.
        let keep = state.flags & SOCK_F_UDP_CONN;
        remember(state, target, &slot, port_be, mark, &svc, keep);
    }
    Verdict::Rewrite {
        addr: slot.addr,
        port_be,
    }
}

/// The backend's port, or the client's for an all-ports slot (`-> task:0`).
#[inline(always)]
fn dest_port(slot: &Slot, target: &Target) -> u16 {
    if slot.port_be != 0 {
        slot.port_be
    } else {
        target.port_be
    }
}

/// Records a socket's new association (a UDP socket may be connected or
/// re-targeted again: what it counted before is undone first); it starts
/// as an inactive connection, as in IPVS.
#[inline(always)]
fn remember(
    state: &mut SockState,
    target: &Target,
    slot: &Slot,
    port_be: u16,
    mark: u32,
    svc: &ServiceValue,
    flags: u32,
) {
    release_conn(state);
    *state = SockState {
        vip: target.key.addr,
        backend: slot.addr,
        vip_port_be: target.port_be,
        backend_port_be: port_be,
        backend_id: slot.backend_id,
        mark,
        generation: svc.generation,
        conn: 0,
        flags,
    };
    set_conn_state(state, CONN_INACTIVE);
}

/// A service whose active generation misses a slot means the maps were
/// written out of order: refuse the connection, and say so (rare path).
#[inline(always)]
fn pick_or_warn(ctx: &SockAddrContext, mark: u32, svc: &ServiceValue) -> Option<Slot> {
    // The client is the caller's network namespace (a container).
    let client = || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let slot = pick(mark, svc, client);
    if slot.is_none() {
        warn!(
            ctx,
            "svclb: service FWM {} has no backend slot in generation {}", mark, svc.generation
        );
    }
    slot
}

/// recvmsg()/getpeername(): a peer that is this socket's backend is shown
/// as the VIP the application asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, peer: &Target) -> Verdict {
    let state = unsafe { SOCKS.get_ptr_mut(ctx) };
    let Some(state) = (unsafe { state.as_ref() }) else {
        return Verdict::Pass;
    };
    if state.mark != 0 && state.backend == peer.key.addr && state.backend_port_be == peer.port_be {
        Verdict::Rewrite {
            addr: state.vip,
            port_be: state.vip_port_be,
        }
    } else {
        Verdict::Pass
    }
}

#[cgroup_sock_addr(connect4)]
pub fn svclb_connect4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Family::V4, Fwd::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn svclb_connect6(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Family::V6, Fwd::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svclb_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Family::V4, Fwd::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn svclb_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, Family::V6, Fwd::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svclb_recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn svclb_recvmsg6(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn svclb_peer4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn svclb_peer6(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx, Family::V6)
}
