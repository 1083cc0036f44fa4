//! The maps, declared with their default capacities; svclbd may resize them
//! at load time and pins them all by name (see svclb_common::map_names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use svclb_common::{
    BackendInfo, BackendStats, LayoutValue, ServiceMeta, ServiceValue, Slot, SlotKey, VipKey,
    VipValue, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS,
};

#[map(name = "svclb_vips")]
pub static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_services")]
pub static SERVICES: HashMap<u32, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_slots")]
pub static SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(DEFAULT_MAX_SLOTS, 0);

#[map(name = "svclb_stats")]
pub static STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

// Read by userspace only; declared here so that one object carries the
// whole pinned layout.
#[map(name = "svclb_backends")]
pub static BACKENDS: HashMap<u32, BackendInfo> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "svclb_meta")]
pub static META: HashMap<u32, ServiceMeta> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_layout")]
pub static LAYOUT: Array<LayoutValue> = Array::with_max_entries(1, 0);
