//! svclb's data plane: cgroup socket hooks that turn a connect() to a
//! service VIP into a connect() to one of its backends, so no packet is ever
//! NATed and conntrack never sees the VIP.
//!
//! Everything that can be computed ahead of time is computed in userspace;
//! these programs only look up and copy. They must never panic (no indexing,
//! no unchecked arithmetic): a panic path makes the verifier reject them.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use svclb_common::{SlotKey, VipKey};

use crate::maps::{SERVICES, SLOTS, STATS, VIPS};

/// Return values of sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;

/// connect() on IPv4 sockets: TCP, and UDP sockets being connected.
#[cgroup_sock_addr(connect4)]
pub fn svclb_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // The only lookup a non-VIP destination pays.
    let key = VipKey::from_ipv4_be(unsafe { (*sa).user_ip4 });
    let Some(vip) = (unsafe { VIPS.get(&key) }) else {
        return ALLOW;
    };
    let protocol = unsafe { (*sa).protocol };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let mark = vip.mark;
    let Some(svc) = (unsafe { SERVICES.get(&mark) }) else {
        return refuse();
    };
    // Read the service once: count and slot_base belong to one generation.
    let (count, slot_base) = (svc.count, svc.slot_base);
    if count == 0 {
        return refuse();
    }
    let pick = unsafe { bpf_get_prandom_u32() } % count;
    let Some(slot) = (unsafe {
        SLOTS.get(&SlotKey {
            mark,
            slot: slot_base.wrapping_add(pick),
        })
    }) else {
        return refuse();
    };
    unsafe {
        (*sa).user_ip4 = slot.addr[3];
        if slot.port_be != 0 {
            // user_port may only be written as 4 bytes.
            (*sa).user_port = u32::from(slot.port_be);
        }
    }
    if let Some(stats) = STATS.get_ptr_mut(slot.backend_id) {
        unsafe { (*stats).conns = (*stats).conns.wrapping_add(1) };
    }
    ALLOW
}

/// What IPVS does when a service has no destination: the client sees
/// ECONNREFUSED at once, not EPERM and not a timeout.
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
