//! IPVS's per-backend counters for translated sockets: packets and bytes
//! (cgroup_skb, In = client to backend, Out = backend to client, bytes are
//! L3 lengths) and ActiveConn/InActConn (sock_ops TCP state changes,
//! sock_release). A socket that svclb did not translate has no socket
//! storage and costs one lookup per packet.

use core::ptr;

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED,
    },
    helpers::{bpf_get_socket_cookie, bpf_sk_storage_get},
    macros::{cgroup_skb, cgroup_sock, sock_ops},
    programs::{SkBuffContext, SockContext, SockOpsContext},
};
use svclb_common::{
    SockState, CONN_ACTIVE, CONN_INACTIVE, CONN_NONE, IPPROTO_TCP, SOCK_F_STATE_CB,
};

use crate::{
    maps::{SOCKS, UDP_CONNS},
    service::{add_to_counters, set_conn_state},
};

#[inline(always)]
fn sock_state(sk: *mut bpf_sock) -> Option<&'static mut SockState> {
    if sk.is_null() {
        return None;
    }
    let map = ptr::from_ref(&SOCKS).cast_mut().cast();
    let state = unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) } as *mut SockState;
    unsafe { state.as_mut() }
}

const ETH_P_IP_BE: u32 = 0x0008;

// Where the addresses are in a cgroup_skb packet, whose data starts at the
// network header: the IPv4 header's saddr and daddr (RFC 791), the IPv6
// header's 16-byte saddr and daddr (RFC 8200).
const IPV4_SADDR_OFF: usize = 12;
const IPV4_DADDR_OFF: usize = 16;
const IPV6_SADDR_OFF: usize = 8;
const IPV6_DADDR_OFF: usize = 24;

/// For UDP: whether the packet's peer address (destination on
/// egress, source on ingress) is the socket's backend.
#[inline(always)]
fn peer_is_backend(ctx: &SkBuffContext, state: &SockState, egress: bool) -> bool {
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    if protocol == ETH_P_IP_BE {
        let off = if egress {
            IPV4_DADDR_OFF
        } else {
            IPV4_SADDR_OFF
        };
        matches!(ctx.load::<u32>(off), Ok(a) if a == state.backend[3])
    } else {
        let off = if egress {
            IPV6_DADDR_OFF
        } else {
            IPV6_SADDR_OFF
        };
        let mut addr = [0u32; 4];
        for (i, w) in addr.iter_mut().enumerate() {
            match ctx.load::<u32>(off + 4 * i) {
                Ok(v) => *w = v,
                Err(_) => return false,
            }
        }
        addr == state.backend
    }
}

/// Runs for every packet of every socket in the attached cgroups, so it
/// stays minimal: the socket pointer goes to the storage lookup as it is
/// (the helper itself takes only full sockets), and what the packet needs
/// (TCP or not) is read from the storage, not from the socket.
#[inline(always)]
fn count(ctx: &SkBuffContext, egress: bool) {
    let skb = ctx.skb.skb;
    let Some(state) = sock_state(unsafe { (*skb).__bindgen_anon_2.sk }) else {
        return;
    };
    if state.mark == 0 {
        return;
    }
    // A UDP socket may also send to (and, unconnected, receive from) other
    // peers: only what it exchanges with its backend is the backend's. A
    // TCP socket has one peer and skips the check.
    if !state.is_tcp() && !peer_is_backend(ctx, state, egress) {
        return;
    }
    let len = u64::from(unsafe { (*skb).len });
    add_to_counters(state.backend_id, |stats| {
        if egress {
            stats.in_pkts = stats.in_pkts.wrapping_add(1);
            stats.in_bytes = stats.in_bytes.wrapping_add(len);
        } else {
            stats.out_pkts = stats.out_pkts.wrapping_add(1);
            stats.out_bytes = stats.out_bytes.wrapping_add(len);
        }
    });
}

#[cgroup_skb(egress)]
pub fn svclb_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, true);
    1
}

#[cgroup_skb(ingress)]
pub fn svclb_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, false);
    1
}

/// Stand-ins for the two counters that do nothing (`svclbd
/// --packet-counters-hook-only`): what the kernel's cgroup_skb hook costs
/// by itself, the floor under any per-packet counting.
#[cgroup_skb(egress)]
pub fn svclb_egr_nop(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(ingress)]
pub fn svclb_ingr_nop(_ctx: SkBuffContext) -> i32 {
    1
}

/// TCP state changes of translated sockets: ESTABLISHED is active, the
/// other states inactive, CLOSE leaves the gauges.
#[sock_ops]
pub fn svclb_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(state) = sock_state(sk) else {
        return 1;
    };
    if state.mark == 0 {
        return 1;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if ctx
            .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .is_ok()
        {
            state.flags |= SOCK_F_STATE_CB;
        }
        return 1;
    }
    let new_state = ctx.arg(1);
    let to = if new_state == BPF_TCP_ESTABLISHED {
        CONN_ACTIVE
    } else if new_state == BPF_TCP_CLOSE {
        CONN_NONE
    } else if state.conn == CONN_NONE {
        CONN_NONE
    } else {
        CONN_INACTIVE
    };
    set_conn_state(state, to);
    1
}

/// A socket closed by its process: UDP sockets (and TCP sockets whose
/// state is not followed) leave the gauges here.
#[cgroup_sock(sock_release)]
pub fn svclb_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let Some(state) = sock_state(sk) else {
        return 1;
    };
    let tcp = unsafe { (*sk).protocol } == u32::from(IPPROTO_TCP);
    if !(tcp && state.follows_tcp_state()) {
        set_conn_state(state, CONN_NONE);
    }
    if state.has_udp_conn() {
        let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
        let _ = UDP_CONNS.remove(&cookie);
    }
    1
}
