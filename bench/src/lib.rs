//! svclb's benchmark (`cargo xtask bench`): svclb side by side with
//! a direct connection, kube-proxy-style iptables (nft and legacy back ends)
//! and nftables DNAT, and haproxy, at 1 to 100,000 installed services.
//!
//! - [`load`]: the load generator (`svclb-load`): CRR, RR, STREAM, UDP.
//! - [`server`]: echo servers in the sandbox's backends namespace.
//! - [`wire`]: what the two agree on (the STREAM request and chunk size);
//!   [`cpu`]: pinning their threads.
//! - [`modes`]: each mode set up fresh in its own sandbox.
//! - [`sweep`]: the interleaved, repeated sweep and its statistics.
//! - [`control`]: control-plane figures (apply time, change latency, map memory).
//! - [`docker`]: the Docker source's event-to-connects figures (`svclbd
//!   --docker` against a fake engine with 1,000 and 10,000 services).
//! - [`counting`]: what the packet counters cost (svclb against
//!   `svclbd --no-packet-counters`, interleaved run by run).
//! - [`idle`]: svclbd's own cost: its CPU and RSS with no traffic, and
//!   the wall time of the reads (`svclb-ctl stats`, `list`, `rate`, a scrape).
//! - [`report`]: docs/BENCHMARKS.md and docs/benchmarks.json.
//!
//! All traffic stays in the namespaces the sandbox creates, or loopback.

pub mod control;
pub mod counting;
pub mod cpu;
pub mod docker;
pub mod hist;
pub mod idle;
pub mod load;
pub mod machine;
pub mod modes;
pub mod report;
pub mod server;
pub mod sweep;
pub mod wire;
