//! `#[repr(C)]` keys and values of the pinned maps (the maps themselves,
//! their names and capacities are in [`crate::maps`]).
//!
//! Changing any of these types changes the pinned layout: bump
//! [`LAYOUT_VERSION`] so that a running node refuses to adopt maps it cannot
//! read.

/// Version of the pinned map layout, written into the `svclb_layout` map.
pub const LAYOUT_VERSION: u32 = 2;

/// Program names in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "svclb_connect4";
    pub const CONNECT6: &str = "svclb_connect6";
    pub const SENDMSG4: &str = "svclb_sendmsg4";
    pub const SENDMSG6: &str = "svclb_sendmsg6";
    pub const RECVMSG4: &str = "svclb_recvmsg4";
    pub const RECVMSG6: &str = "svclb_recvmsg6";
    pub const GETPEERNAME4: &str = "svclb_peer4";
    pub const GETPEERNAME6: &str = "svclb_peer6";
    pub const SKB_EGRESS: &str = "svclb_egress";
    pub const SKB_INGRESS: &str = "svclb_ingress";
    /// No-op stand-ins for the two counters, for measuring the hook alone.
    pub const SKB_EGRESS_NOP: &str = "svclb_egr_nop";
    pub const SKB_INGRESS_NOP: &str = "svclb_ingr_nop";
    pub const SOCK_OPS: &str = "svclb_sockops";
    pub const SOCK_RELEASE: &str = "svclb_release";
}

/// IP protocol numbers, as sockets and config name them.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Default capacities; svclbd can raise them at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Backends across all services (each has a stats slot).
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
/// Schedule slots across all services, at least (svclbd takes the larger of
/// this and 4 x its backend capacity, or `--max-slots`). Each service uses
/// two generations of slots while it switches (see [`crate::schedule`]); an
/// `mh` service uses a whole Maglev table (16,381 slots). The entries are
/// not preallocated, but the kernel allocates the hash buckets up front:
/// 16 bytes per entry of capacity, so 16 MiB here.
pub const DEFAULT_MAX_SLOTS: u32 = 1 << 20;

/// Highest number of slots one generation of one service may use.
pub const MAX_SLOTS_PER_SERVICE: u32 = 1 << 16;

/// A virtual IP, IPv4 stored IPv4-mapped. Words are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u32; 4],
}

impl VipKey {
    /// The key of an IPv4 address given as the kernel holds it (network order).
    #[inline(always)]
    pub const fn from_ipv4_be(addr_be: u32) -> Self {
        VipKey {
            addr: [0, 0, u32::from_be(0x0000_ffff), addr_be],
        }
    }
}

/// What the mangle MARK rule did: which service a VIP belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipValue {
    /// The all-ports (FWM-style) service; 0 when the VIP has only per-port services.
    pub mark: u32,
    pub flags: u32,
}

/// [`VipValue::flags`]: the VIP has per-port services in the ports map.
pub const VIP_F_PORTS: u32 = 1;

impl VipValue {
    /// [`VIP_F_PORTS`]: look the destination port up in the ports map.
    #[inline(always)]
    pub const fn has_ports(&self) -> bool {
        self.flags & VIP_F_PORTS != 0
    }
}

/// A per-port service: VIP, destination port and protocol, the way a
/// Kubernetes Service port is matched. It wins over the VIP's all-ports one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub addr: [u32; 4],
    /// Destination port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Scheduler of a service, as IPVS names them.
///
/// How each one uses the slots is described in `svclb_userspace::schedule`;
/// the eBPF side only picks a slot index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Uniform random choice over weighted slots.
    Random = 0,
    /// Round robin, per CPU, over one slot per backend.
    Rr = 1,
    /// Weighted round robin, per CPU, over a smooth weighted slot order.
    Wrr = 2,
    /// Maglev consistent hashing: the slots are the lookup table.
    Mh = 3,
    /// Source hashing over weighted slots.
    Sh = 4,
    /// Least connection: fewest active*256 + inactive.
    Lc = 5,
    /// Weighted least connection: lc divided by weight.
    Wlc = 6,
}

impl Scheduler {
    /// A service's scheduler when none is given: round robin, what Docker
    /// Swarm programs into IPVS for every service (libnetwork), so an
    /// operator replacing it sees the same `FWM  317 rr`.
    pub const DEFAULT: Scheduler = Scheduler::Rr;

    #[inline(always)]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Scheduler::Random),
            1 => Some(Scheduler::Rr),
            2 => Some(Scheduler::Wrr),
            3 => Some(Scheduler::Mh),
            4 => Some(Scheduler::Sh),
            5 => Some(Scheduler::Lc),
            6 => Some(Scheduler::Wlc),
            _ => None,
        }
    }

    /// The hashing schedulers (mh, sh): the pick depends on the client.
    #[inline(always)]
    pub const fn by_client(self) -> bool {
        matches!(self, Scheduler::Mh | Scheduler::Sh)
    }

    /// Parses the name used in config files and on the command line.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.name() == name)
    }

    pub const ALL: [Scheduler; 7] = [
        Scheduler::Random,
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Mh,
        Scheduler::Sh,
        Scheduler::Lc,
        Scheduler::Wlc,
    ];

    /// Every scheduler name accepted, for error messages.
    pub const NAMES: &'static [&'static str] = &["random", "rr", "wrr", "mh", "sh", "lc", "wlc"];

    /// The name `ipvsadm` would print.
    pub const fn name(self) -> &'static str {
        match self {
            Scheduler::Random => "random",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Mh => "mh",
            Scheduler::Sh => "sh",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
        }
    }
}

/// How many backends a least-connection pick compares. Services with more
/// compare this many consecutive slots from a random start (sampled lc):
/// the verifier needs a small bound on the loop.
pub const MAX_LC_BACKENDS: u32 = 16;

/// An IPVS FWM service: how many slots the program chooses from, and where
/// they start (the generation, see [`crate::schedule`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Number of slots in the active generation; 0 refuses connections.
    pub count: u32,
    /// First slot number of the active generation.
    pub slot_base: u32,
    /// A [`Scheduler`] value.
    pub scheduler: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// Changes whenever the schedule changes, so that per-socket and
    /// affinity choices made under an older schedule are checked again.
    pub generation: u32,
    /// Affinity timeout in seconds, with [`SVC_F_AFFINITY`].
    pub affinity_secs: u32,
    /// Networks (bits of the scopes map) that see this service; 0: all.
    pub scope: u64,
}

/// [`ServiceValue::flags`]: the same client gets the same backend for
/// `affinity_secs` (IPVS persistence, kube-proxy ClientIP affinity).
pub const SVC_F_AFFINITY: u32 = 1;
/// [`ServiceValue::flags`]: when a backend leaves, leave the sockets svclb
/// connected to it alone (the service's `terminate_on_removal = false`);
/// without it, svclbd ends them. Userspace only: the programs ignore it.
pub const SVC_F_KEEP_SOCKETS: u32 = 1 << 1;

impl ServiceValue {
    /// The [`Scheduler`] stored in [`ServiceValue::scheduler`]; `None` for
    /// a value no svclb writes (the programs then pick at random).
    #[inline(always)]
    pub const fn scheduler(&self) -> Option<Scheduler> {
        Scheduler::from_u32(self.scheduler)
    }

    /// [`SVC_F_AFFINITY`]: the same client keeps its backend.
    #[inline(always)]
    pub const fn has_affinity(&self) -> bool {
        self.flags & SVC_F_AFFINITY != 0
    }

    /// [`SVC_F_KEEP_SOCKETS`]: a backend's removal leaves its sockets alone.
    #[inline(always)]
    pub const fn keeps_sockets(&self) -> bool {
        self.flags & SVC_F_KEEP_SOCKETS != 0
    }
}

/// Key of one schedule slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SlotKey {
    pub mark: u32,
    pub slot: u32,
}

/// Address family values stored in [`Slot::family`] and [`BackendInfo::family`].
pub const FAMILY_INET: u16 = 2;
pub const FAMILY_INET6: u16 = 10;

/// A slot of the schedule: a copy of the backend's address, so that the
/// connect path needs no further lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Slot {
    /// Backend address; IPv4 is IPv4-mapped, network byte order.
    pub addr: [u32; 4],
    /// Destination port in network byte order; 0 keeps the client's port,
    /// like an FWM real server `-> 172.50.0.40:0`.
    pub port_be: u16,
    pub family: u16,
    /// Index into the stats and conns maps.
    pub backend_id: u32,
    /// The backend's weight (used by wlc).
    pub weight: u32,
}

/// Every backend that svclb knows, whether it is scheduled or not (weight 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u16,
    /// The service (fwmark) this backend belongs to.
    pub mark: u32,
    /// IPVS weight; 0 is quiescent: listed, but given no new connections.
    pub weight: u32,
}

/// IPVS's per-destination counters. Per CPU in the map; userspace sums them
/// and uses this type for every set of the five (a backend's, a service's,
/// the rate estimator's last sample and averages).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct BackendStats {
    pub conns: u64,
    pub in_pkts: u64,
    pub out_pkts: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Live connections of a backend, shared by all CPUs (updated atomically):
/// ActiveConn and InActConn, and what lc/wlc choose by.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnGauge {
    pub active: i64,
    pub inactive: i64,
}

/// What svclb remembers of a translated socket, in socket-local storage so
/// that it is freed with the socket: where it was really going (the VIP) and
/// where it was sent (the backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    pub vip_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    pub mark: u32,
    /// The service generation the backend was chosen under.
    pub generation: u32,
    /// `CONN_*`: how this socket is counted in [`ConnGauge`].
    pub conn: u32,
    /// `SOCK_F_*` bits.
    pub flags: u32,
}

/// A connected UDP socket that svclb translated, by socket cookie
/// (`svclb_udp_conns`): the kernel's socket diagnostics report a TCP
/// socket's [`SockState`] but not a UDP socket's, so ending the UDP sockets
/// of a backend that left finds them here (svclb-userspace's terminate.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpConn {
    pub backend_id: u32,
    pub mark: u32,
}

/// Capacity of `svclb_udp_conns` (LRU: past it, the oldest connected UDP
/// sockets are forgotten, and only their ending on a backend's removal is lost).
pub const MAX_UDP_CONNS: u32 = 65_536;

/// [`SockState::conn`] values.
pub const CONN_NONE: u32 = 0;
pub const CONN_INACTIVE: u32 = 1;
pub const CONN_ACTIVE: u32 = 2;

/// [`SockState::flags`]: a TCP socket: its one peer is its backend, so the
/// per-packet counter skips the peer-address check that a UDP socket (which
/// may also talk to others) needs. Recorded here so that the counter need
/// not read the socket; a record without it (a UDP socket, or one written
/// by an svclb before this flag) is checked, which is right for both.
/// (Bit 0 marked unconnected UDP sockets in those; nothing reads it now.)
pub const SOCK_F_TCP: u32 = 1 << 1;
/// [`SockState::flags`]: a connected UDP socket with an entry in
/// `svclb_udp_conns` (by cookie), which its release removes; sockets
/// without the bit (TCP, unconnected UDP) cost their release no lookup.
pub const SOCK_F_UDP_CONN: u32 = 1 << 2;
/// [`SockState::flags`] (set and read by the programs only): the TCP state
/// callback is on, so the socket's gauges are settled by its transition to
/// CLOSE rather than by its release.
pub const SOCK_F_STATE_CB: u32 = 1 << 16;

impl SockState {
    /// [`SOCK_F_TCP`]: a TCP socket, whose one peer is its backend.
    #[inline(always)]
    pub const fn is_tcp(&self) -> bool {
        self.flags & SOCK_F_TCP != 0
    }

    /// [`SOCK_F_UDP_CONN`]: a connected UDP socket with an entry in
    /// `svclb_udp_conns`.
    #[inline(always)]
    pub const fn has_udp_conn(&self) -> bool {
        self.flags & SOCK_F_UDP_CONN != 0
    }

    /// [`SOCK_F_STATE_CB`]: the TCP state callback follows this socket.
    #[inline(always)]
    pub const fn follows_tcp_state(&self) -> bool {
        self.flags & SOCK_F_STATE_CB != 0
    }
}

/// Affinity is per client: svclb's clients are local, so a client is a
/// network namespace (its cookie), i.e. a container.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub mark: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub slot: Slot,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last connection that used it.
    pub last_ns: u64,
}

impl BackendStats {
    pub fn add(&mut self, other: &BackendStats) {
        self.conns = self.conns.wrapping_add(other.conns);
        self.in_pkts = self.in_pkts.wrapping_add(other.in_pkts);
        self.out_pkts = self.out_pkts.wrapping_add(other.out_pkts);
        self.in_bytes = self.in_bytes.wrapping_add(other.in_bytes);
        self.out_bytes = self.out_bytes.wrapping_add(other.out_bytes);
    }
}

/// Longest service name kept in the meta map (bytes, NUL padded).
pub const SERVICE_NAME_LEN: usize = 64;

/// Userspace-only facts about a service, kept pinned so that `svclb-ctl`
/// can show them without svclbd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    pub name: [u8; SERVICE_NAME_LEN],
    pub vip: [u32; 4],
    pub vip_family: u16,
    pub _pad: u16,
    /// A per-port service: `port | protocol << 16`; 0 for every port.
    pub port_proto: u32,
}

impl Default for ServiceMeta {
    fn default() -> Self {
        ServiceMeta {
            name: [0; SERVICE_NAME_LEN],
            vip: [0; 4],
            vip_family: 0,
            _pad: 0,
            port_proto: 0,
        }
    }
}

/// The rate estimator of one backend (userspace only), pinned so that
/// `svclb-ctl rate` reads what svclbd estimates and a restart continues it.
/// Same arithmetic as IPVS's ip_vs_est.c; see svclb's `rates` module.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateState {
    /// Counters at the last sample.
    pub last: BackendStats,
    /// Each counter's scaled average rate, as IPVS keeps them (<<10 for
    /// conns and packets, <<5 for bytes).
    pub avg: BackendStats,
    /// CLOCK_MONOTONIC nanoseconds of the last sample.
    pub sampled_ns: u64,
}

/// A network name in the networks registry (NUL padded).
pub const NETWORK_NAME_LEN: usize = 32;

/// Key of the networks registry: network name -> scope bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetworkName {
    pub name: [u8; NETWORK_NAME_LEN],
}

/// Value of the single-entry `svclb_layout` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LayoutValue {
    pub version: u32,
    /// Bumped by every apply, so that svclbd knows whether the snapshot it
    /// kept is still what the maps hold.
    pub apply_serial: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Slot {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for LayoutValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for ConnGauge {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for UdpConn {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for NetworkName {}

    impl NetworkName {
        /// None when the name is longer than [`NETWORK_NAME_LEN`].
        pub fn new(name: &str) -> Option<Self> {
            let bytes = name.as_bytes();
            if bytes.len() > NETWORK_NAME_LEN {
                return None;
            }
            let mut n = NetworkName {
                name: [0; NETWORK_NAME_LEN],
            };
            n.name[..bytes.len()].copy_from_slice(bytes);
            Some(n)
        }
        pub fn as_string(&self) -> String {
            let end = self
                .name
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(NETWORK_NAME_LEN);
            String::from_utf8_lossy(&self.name[..end]).into_owned()
        }
    }

    /// 16 bytes in network order as four words, the way the kernel's
    /// `user_ip6` and these maps hold them.
    pub fn addr_words(ip: IpAddr) -> [u32; 4] {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    /// The inverse of [`addr_words`]: IPv4-mapped addresses come back as IPv4.
    pub fn words_addr(words: [u32; 4]) -> IpAddr {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(o);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    pub fn family_of(ip: IpAddr) -> u16 {
        match ip {
            IpAddr::V4(_) => FAMILY_INET,
            IpAddr::V6(_) => FAMILY_INET6,
        }
    }

    impl VipKey {
        pub fn from_ip(ip: IpAddr) -> Self {
            VipKey {
                addr: addr_words(ip),
            }
        }
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr)
        }
    }

    impl From<Ipv4Addr> for VipKey {
        fn from(ip: Ipv4Addr) -> Self {
            VipKey::from_ip(IpAddr::V4(ip))
        }
    }

    impl ServiceMeta {
        pub fn new(name: &str, vip: IpAddr) -> Self {
            let mut meta = ServiceMeta {
                vip: addr_words(vip),
                vip_family: family_of(vip),
                ..Default::default()
            };
            let bytes = name.as_bytes();
            let n = bytes.len().min(SERVICE_NAME_LEN);
            meta.name[..n].copy_from_slice(&bytes[..n]);
            meta
        }
        pub fn name(&self) -> String {
            let end = self
                .name
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(SERVICE_NAME_LEN);
            String::from_utf8_lossy(&self.name[..end]).into_owned()
        }
        pub fn vip(&self) -> IpAddr {
            words_addr(self.vip)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ipv4_key_matches_the_kernel_view() {
            // The kernel hands connect4 the address in network order; the key
            // built there must equal the one userspace writes.
            let ip = Ipv4Addr::new(172, 50, 0, 37);
            let be = u32::from_ne_bytes(ip.octets());
            assert_eq!(VipKey::from_ipv4_be(be), VipKey::from(ip));
        }

        #[test]
        fn mapped_v6_is_the_same_key_as_v4() {
            let v4 = Ipv4Addr::new(172, 50, 0, 37);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert_eq!(VipKey::from_ip(mapped), VipKey::from(v4));
        }

        #[test]
        fn words_round_trip() {
            for ip in ["172.50.0.40", "fd00::1", "::1", "0.0.0.0"] {
                let ip: IpAddr = ip.parse().unwrap();
                assert_eq!(words_addr(addr_words(ip)), ip);
            }
        }

        #[test]
        fn meta_name_round_trip_and_truncation() {
            let m = ServiceMeta::new("api", "172.50.0.37".parse().unwrap());
            assert_eq!(m.name(), "api");
            let long = "x".repeat(100);
            assert_eq!(
                ServiceMeta::new(&long, m.vip()).name().len(),
                SERVICE_NAME_LEN
            );
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_words, family_of, words_addr};
