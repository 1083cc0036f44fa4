//! The maps, declared from svclb-common's table ([`svclb_map_table!`]):
//! names, kinds, key and value types and default capacities are the
//! table's. svclbd may resize them at load time and pins them all by name.
//! The maps only userspace reads (backends, meta, networks, rates, layout)
//! are declared too, so that one object carries the whole pinned layout.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use svclb_common::{svclb_map_table, MapCapacity};

/// Map flags by capacity class: the slots are allocated on use.
const fn flags(capacity: MapCapacity) -> u32 {
    match capacity {
        MapCapacity::Slots => BPF_F_NO_PREALLOC,
        _ => 0,
    }
}

macro_rules! declare_maps {
    ($( $(#[$doc:meta])* $konst:ident $name:tt $kind:ident [$key:ty => $value:ty] $cap:expr; )*) => {
        $( declare_map!($(#[$doc])* $konst $name $kind [$key => $value] $cap); )*
    };
}

macro_rules! declare_map {
    ($(#[$doc:meta])* $konst:ident $name:tt SkStorage [$key:ty => $value:ty] $cap:expr) => {
        $(#[$doc])*
        #[btf_map(name = $name)]
        pub static $konst: SkStorage<$value> = SkStorage::new();
    };
    ($(#[$doc:meta])* $konst:ident $name:tt MmapArray [$key:ty => $value:ty] $cap:expr) => {
        $(#[$doc])*
        #[map(name = $name)]
        pub static $konst: Array<$value> =
            Array::with_max_entries($cap.default_entries(), flags($cap) | BPF_F_MMAPABLE);
    };
    ($(#[$doc:meta])* $konst:ident $name:tt $kind:ident [$key:ty => $value:ty] $cap:expr) => {
        $(#[$doc])*
        #[map(name = $name)]
        pub static $konst: declare_map!(@type $kind $key, $value) =
            $kind::with_max_entries($cap.default_entries(), flags($cap));
    };
    (@type Array $key:ty, $value:ty) => { Array<$value> };
    (@type PerCpuArray $key:ty, $value:ty) => { PerCpuArray<$value> };
    (@type $kind:ident $key:ty, $value:ty) => { $kind<$key, $value> };
}

svclb_map_table!(declare_maps);
