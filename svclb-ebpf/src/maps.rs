//! The maps, declared with their default capacities; svclbd may resize them
//! at load time and pins them all by name (see svclb_common::map_names).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use svclb_common::{
    AffinityKey, AffinityValue, BackendInfo, BackendStats, ConnGauge, LayoutValue, NetworkName,
    PortKey, RateState, ServiceMeta, ServiceValue, Slot, SlotKey, SockState, UdpConn, VipKey,
    VipValue, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS, MAX_UDP_CONNS,
};

#[map(name = "svclb_vips")]
pub static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_ports")]
pub static PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_services")]
pub static SERVICES: HashMap<u32, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_slots")]
pub static SLOTS: HashMap<SlotKey, Slot> =
    HashMap::with_max_entries(DEFAULT_MAX_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "svclb_stats")]
pub static STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "svclb_conns")]
pub static CONNS: Array<ConnGauge> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Round-robin position per service, per CPU (userspace creates the entry).
#[map(name = "svclb_rr")]
pub static RR: PerCpuHashMap<u32, u32> = PerCpuHashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(65_536, 0);

/// Attached cgroup id -> the networks (scope bits) its processes are on.
#[map(name = "svclb_scopes")]
pub static SCOPES: HashMap<u64, u64> = HashMap::with_max_entries(16_384, 0);

/// Socket cookie -> backend of a connected UDP socket svclb translated.
#[map(name = "svclb_udp_conns")]
pub static UDP_CONNS: LruHashMap<u64, UdpConn> = LruHashMap::with_max_entries(MAX_UDP_CONNS, 0);

#[btf_map(name = "svclb_socks")]
pub static SOCKS: SkStorage<SockState> = SkStorage::new();

// Read by userspace only; declared here so that one object carries the
// whole pinned layout.
#[map(name = "svclb_backends")]
pub static BACKENDS: HashMap<u32, BackendInfo> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "svclb_meta")]
pub static META: HashMap<u32, ServiceMeta> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "svclb_networks")]
pub static NETWORKS: HashMap<NetworkName, u32> = HashMap::with_max_entries(64, 0);

#[map(name = "svclb_rates")]
pub static RATES: HashMap<u32, RateState> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "svclb_layout")]
pub static LAYOUT: Array<LayoutValue> = Array::with_max_entries(1, 0);
