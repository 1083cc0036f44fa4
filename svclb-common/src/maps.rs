//! The pinned maps, stated once: [`svclb_map_table!`] holds one row per map
//! (its constant, its pinned name, its kind, its key and value types, its
//! capacity class), and everything else is made from it:
//!
//! - here: the name constants and [`map_names::ALL`], a marker type per map
//!   in [`map_defs`] carrying its key and value types ([`PinnedMap`]), and
//!   [`MAPS`] (name, key and value sizes, capacity class: the layout
//!   userspace checks pins against, and the capacities the loader sets);
//! - in svclb-ebpf (maps.rs): the `#[map]` statics themselves;
//! - in svclb-userspace: the loader's pin paths and capacities, the layout
//!   check, and the types `Dataplane` opens the maps with.
//!
//! Changing a row's key or value type changes the pinned layout: bump
//! [`crate::LAYOUT_VERSION`].

use crate::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS};

/// How a map's capacity is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapCapacity {
    /// One entry per service: `svclbd --max-services`.
    Services,
    /// One entry per backend (the index of the per-backend maps):
    /// `svclbd --max-backends`.
    Backends,
    /// The schedule slots: `svclbd --max-slots` (entries allocated on use,
    /// `BPF_F_NO_PREALLOC`).
    Slots,
    /// Fixed by the object (0 for socket-local storage, which has none).
    Fixed(u32),
}

impl MapCapacity {
    /// The capacity the eBPF object declares; svclbd may raise the first
    /// three when it creates the maps.
    pub const fn default_entries(self) -> u32 {
        match self {
            MapCapacity::Services => DEFAULT_MAX_SERVICES,
            MapCapacity::Backends => DEFAULT_MAX_BACKENDS,
            MapCapacity::Slots => DEFAULT_MAX_SLOTS,
            MapCapacity::Fixed(n) => n,
        }
    }
}

/// A pinned map, as a type: what its marker in [`map_defs`] says.
pub trait PinnedMap {
    const NAME: &'static str;
    type Key: Copy;
    type Value: Copy;
    const CAPACITY: MapCapacity;
}

/// The key type of a pinned map.
pub type Key<M> = <M as PinnedMap>::Key;
/// The value type of a pinned map.
pub type Value<M> = <M as PinnedMap>::Value;

/// One map of [`MAPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    pub capacity: MapCapacity,
}

/// The table of pinned maps. Give it the name of a macro; it calls it with
/// one row per map:
///
/// ```text
/// $(#[doc])* CONST "svclb_name" Kind [Key => Value] capacity-class;
/// ```
///
/// `Kind` is the aya map type (`HashMap`, `LruHashMap`, `PerCpuHashMap`,
/// `Array`, `PerCpuArray`, `SkStorage`, or `MmapArray`: an `Array` that
/// userspace may also map into memory); for the arrays and socket storage
/// the key is what the kernel reports (u32, and the socket's fd as i32).
/// Kernel object names are limited to 15 characters.
#[macro_export]
macro_rules! svclb_map_table {
    ($callback:ident) => {
        $callback! {
            /// VIP -> its all-ports service and flags (iptables -d VIP -j MARK).
            VIPS "svclb_vips" HashMap [$crate::VipKey => $crate::VipValue] $crate::MapCapacity::Services;
            /// (VIP, port, protocol) -> mark of a per-port service.
            PORTS "svclb_ports" HashMap [$crate::PortKey => u32] $crate::MapCapacity::Services;
            /// Mark -> service (IPVS FWM: slot count, scheduler).
            SERVICES "svclb_services" HashMap [u32 => $crate::ServiceValue] $crate::MapCapacity::Services;
            /// (mark, slot) -> backend: the schedule the programs pick from.
            SLOTS "svclb_slots" HashMap [$crate::SlotKey => $crate::Slot] $crate::MapCapacity::Slots;
            /// Backend id -> backend, every one (weight 0 included). Userspace only.
            BACKENDS "svclb_backends" HashMap [u32 => $crate::BackendInfo] $crate::MapCapacity::Backends;
            /// Backend id -> counters, per CPU (Conns, In/Out packets and bytes).
            STATS "svclb_stats" PerCpuArray [u32 => $crate::BackendStats] $crate::MapCapacity::Backends;
            /// Backend id -> nonzero once its counters moved since svclbd's rate
            /// sampler last looked; the sampler clears it through a shared mapping
            /// (`BPF_F_MMAPABLE`), so an idle node costs it no counter reads.
            STATS_MOVED "svclb_moved" MmapArray [u32 => u64] $crate::MapCapacity::Backends;
            /// Backend id -> live connections (ActiveConn, InActConn).
            CONNS "svclb_conns" Array [u32 => $crate::ConnGauge] $crate::MapCapacity::Backends;
            /// Mark -> name, VIP and port of a service, for listings. Userspace only.
            META "svclb_meta" HashMap [u32 => $crate::ServiceMeta] $crate::MapCapacity::Services;
            /// The layout version and apply serial, one entry. Userspace only.
            LAYOUT "svclb_layout" Array [u32 => $crate::LayoutValue] $crate::MapCapacity::Fixed(1);
            /// Socket -> VIP and backend (socket-local storage).
            SOCKS "svclb_socks" SkStorage [i32 => $crate::SockState] $crate::MapCapacity::Fixed(0);
            /// Round-robin position per service, per CPU (userspace creates the entry).
            RR "svclb_rr" PerCpuHashMap [u32 => u32] $crate::MapCapacity::Services;
            /// (client netns, mark) -> the backend it keeps.
            AFFINITY "svclb_affinity" LruHashMap [$crate::AffinityKey => $crate::AffinityValue] $crate::MapCapacity::Fixed(65_536);
            /// Attached cgroup id -> the networks (scope bits) its processes are on.
            SCOPES "svclb_scopes" HashMap [u64 => u64] $crate::MapCapacity::Fixed(16_384);
            /// Network name -> scope bit. Userspace only.
            NETWORKS "svclb_networks" HashMap [$crate::NetworkName => u32] $crate::MapCapacity::Fixed(64);
            /// Backend id -> rate estimator (svclbd's sampler). Userspace only.
            RATES "svclb_rates" HashMap [u32 => $crate::RateState] $crate::MapCapacity::Backends;
            /// Socket cookie -> backend of a connected UDP socket svclb translated.
            UDP_CONNS "svclb_udp_conns" LruHashMap [u64 => $crate::UdpConn] $crate::MapCapacity::Fixed($crate::MAX_UDP_CONNS);
        }
    };
}

macro_rules! common_map_items {
    ($( $(#[$doc:meta])* $konst:ident $name:literal $kind:ident [$key:ty => $value:ty] $cap:expr; )*) => {
        /// Map names, as the eBPF object declares them and as they are pinned.
        pub mod map_names {
            $( $(#[$doc])* pub const $konst: &str = $name; )*
            /// Every map that svclb pins.
            pub const ALL: [&str; [$($name),*].len()] = [$($konst),*];
        }

        /// One marker type per map, for [`PinnedMap`]: its name, key and
        /// value types, capacity class.
        #[allow(non_camel_case_types)]
        pub mod map_defs {
            $(
                $(#[$doc])*
                pub enum $konst {}
                impl super::PinnedMap for $konst {
                    const NAME: &'static str = $name;
                    type Key = $key;
                    type Value = $value;
                    const CAPACITY: super::MapCapacity = $cap;
                }
            )*
        }

        /// Every pinned map: name, key and value sizes, capacity class.
        pub const MAPS: [MapDef; [$($name),*].len()] = [$(
            MapDef {
                name: $name,
                key_size: core::mem::size_of::<$key>(),
                value_size: core::mem::size_of::<$value>(),
                capacity: $cap,
            },
        )*];
    };
}

svclb_map_table!(common_map_items);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_are_unique() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(m.name.len() <= 15, "{}", m.name);
            assert_eq!(map_names::ALL[i], m.name);
            assert!(MAPS[..i].iter().all(|o| o.name != m.name), "{}", m.name);
        }
    }

    #[test]
    fn the_pinned_layout_is_the_one_version_2_pinned() {
        // (name, key size, value size) of LAYOUT_VERSION 2: pins made by it
        // must be adopted, so these change only with the version. A map
        // added since (svclb_moved) is created next to older pins.
        assert_eq!(crate::LAYOUT_VERSION, 2);
        let want: [(&str, usize, usize); 17] = [
            ("svclb_vips", 16, 8),
            ("svclb_ports", 20, 4),
            ("svclb_services", 4, 32),
            ("svclb_slots", 8, 28),
            ("svclb_backends", 4, 28),
            ("svclb_stats", 4, 40),
            ("svclb_moved", 4, 8),
            ("svclb_conns", 4, 16),
            ("svclb_meta", 4, 88),
            ("svclb_layout", 4, 8),
            ("svclb_socks", 4, 56),
            ("svclb_rr", 4, 4),
            ("svclb_affinity", 16, 40),
            ("svclb_scopes", 8, 8),
            ("svclb_networks", 32, 4),
            ("svclb_rates", 4, 88),
            ("svclb_udp_conns", 8, 8),
        ];
        let have: Vec<(&str, usize, usize)> = MAPS
            .iter()
            .map(|m| (m.name, m.key_size, m.value_size))
            .collect();
        assert_eq!(have, want);
    }
}
