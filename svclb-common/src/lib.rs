//! Map layout shared by the eBPF programs and userspace.
//!
//! The maps mirror the chain that Docker Swarm builds with iptables and IPVS:
//!
//! ```text
//! VIPS      VipKey  -> VipValue      (iptables: -d VIP -j MARK --set-mark M)
//! SERVICES  mark    -> ServiceValue  (IPVS: FWM M rr, how many backends, scheduler)
//! SLOTS     (mark, slot) -> Slot     (IPVS: -> task:0, the schedule the program picks from)
//! BACKENDS  backend id   -> BackendInfo (every backend, weight 0 included, for listing)
//! STATS     backend id   -> BackendStats (per CPU: Conns, In/Out packets and bytes)
//! ```
//!
//! Those are five of the sixteen; every pinned map, with its name, kind,
//! key and value types and capacity class, is a row of one table,
//! [`svclb_map_table!`] in [`maps`], from which the eBPF declarations, the
//! loader, the layout check and userspace's typed maps are all made.
//!
//! Every address is kept as 16 bytes; an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one key type serves both families and a dual-stack
//! socket dialling `::ffff:VIP` finds the IPv4 service.
//!
//! This crate is `no_std` for the BPF target; the `user` feature adds what
//! userspace needs (aya's `Pod`, conversions from `std::net`).
#![cfg_attr(not(feature = "user"), no_std)]

pub mod hash;
pub mod layout;
pub mod maglev;
pub mod maps;
pub mod schedule;

pub use layout::*;
pub use maps::*;
