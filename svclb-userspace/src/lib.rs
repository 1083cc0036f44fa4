//! svclb's userspace: loading and pinning the eBPF data plane, attaching it
//! to cgroups, keeping its maps equal to the desired state, and reading its
//! counters back the way `ipvsadm` shows IPVS's.
//!
//! Module map:
//! - [`model`]: the desired state (services, backends, discovered
//!   services, DNS settings) and the rules that make it valid.
//! - [`config`]: the config file: TOML turned into the model.
//! - [`ctl`]: svclb-ctl's command line.
//! - [`sync`]: the sources of the desired state (the file, watched; DNS
//!   discovery) merged into one state to apply.
//! - [`batch`]: reading a whole map in a few syscalls.
//! - [`pins`]: the bpffs directory where maps and links are pinned.
//! - [`cgroup`]: finding cgroup v2 and naming cgroups.
//! - [`dataplane`]: the pinned maps, typed, their one writer, and a
//!   snapshot of what they hold.
//! - [`alloc`]: the allocators of marks, backend ids and network bits.
//! - [`reconcile`]: turning a desired state into map writes, all or nothing.
//! - [`loader`]: loading the programs and attaching them to cgroups.
//! - [`rates`]: IPVS's rate estimator (CPS, PPS, BPS).
//! - [`schedule`]: the slot table each scheduler picks from.
//! - [`stats`]: ipvsadm-style listings and JSON.
//! - [`metrics`]: the Prometheus endpoint and the rate sampler.
//! - [`notify`]: telling systemd (or a test) that svclbd is ready.
//! - [`target`]: what to attach to: a cgroup, a process's, a container's.
//! - [`docker`]: asking the Docker Engine API for a container's PID.
//! - [`netns`]: working inside a container's network namespace.
//! - [`runtime`]: svclb-runc's announcement of a container being created.
//! - [`terminate`]: ending the sockets connected to a backend that left.

pub mod alloc;
pub mod batch;
pub mod cgroup;
pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod docker;
pub mod health;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod moved;
pub mod netns;
pub mod notify;
pub mod pins;
pub mod privileges;
pub mod probe;
pub mod rates;
pub mod reconcile;
pub mod runtime;
pub mod schedule;
pub mod stats;
pub mod sync;
pub mod target;
pub mod terminate;

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at build time.
pub fn ebpf_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svclb.bpf.o"))
}

/// Default directory under bpffs where svclb pins its maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/svclb";
