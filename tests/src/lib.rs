//! Test sandbox for svclb: real network namespaces, a veth pair, a cgroup v2
//! directory and real identity servers, used by the privileged integration
//! tests, the demo and the benchmark.
//!
//! Network rule: every address used here (172.50.0.0/24, fd00:50::/64) exists
//! only inside the namespaces a [`Sandbox`] creates; they have no default route
//! and no route out.

pub mod bpf;
pub mod cgroup;
pub mod client;
pub mod clients;
pub mod daemon;
pub mod dns;
pub mod fake_docker;
pub mod fake_swarm;
pub mod http;
pub mod netns;
pub mod sandbox;
pub mod servers;
pub mod swarm;
pub mod util;

pub use cgroup::CgroupGuard;
pub use client::{tcp_echo, tcp_identity, udp_identity};
pub use clients::ExtraClients;
pub use daemon::{ctl, parse_stats, PinDir, StatsRow, Svclbd};
pub use netns::netns_path;
pub use sandbox::Sandbox;
pub use servers::{TcpIdServer, UdpIdServer};
pub use util::run;
