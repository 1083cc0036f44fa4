//! svclb's data plane: cgroup socket hooks that turn a connect() or
//! sendmsg() to a service VIP into one to a backend, so no packet is ever
//! NATed and conntrack never sees the VIP; and the counters IPVS keeps.
//!
//! Everything that can be computed ahead of time is computed in userspace;
//! these programs look up and copy. They must never panic (no indexing, no
//! unchecked arithmetic): a panic path makes the verifier reject them.
#![no_std]
#![no_main]
// For the BPF atomic add in service.rs (RUSTC_BOOTSTRAP, see docs/TOOLCHAIN.md).
#![feature(asm_experimental_arch)]

mod counting;
mod maps;
mod service;
mod sock_addr;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
