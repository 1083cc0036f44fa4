//! The modes compared, and a [`Cell`]: one mode set up fresh in a new
//! sandbox with N services installed, ready to run workloads.
//!
//! Addresses (all inside the sandbox; the client namespace has no default
//! route, so nothing can leave it):
//! - the measured service: VIP 172.50.0.200, port 80 (TCP and UDP), three
//!   backends 172.50.0.10-12 with echo servers in the backends namespace;
//! - the other N-1 services: VIPs 10.128.x.y, never connected to (svclb
//!   rewrites a connect before any packet exists; DNAT modes only see packets
//!   to the measured VIP), backends 172.50.0.100-199 without servers;
//! - haproxy: in the client namespace on 127.0.0.1:8080 (a node-local
//!   proxy, as kube-proxy's userspace mode was), connecting out to the three
//!   backends over the veth.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use svclb_tests::{daemon, PinDir, Sandbox, Svclbd};

use crate::load::{LoadResult, Workload};
use crate::server::EchoServers;

pub const PORT: u16 = 80;
pub const VIP: Ipv4Addr = Ipv4Addr::new(172, 50, 0, 200);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(172, 50, 0, 10),
    Ipv4Addr::new(172, 50, 0, 11),
    Ipv4Addr::new(172, 50, 0, 12),
];
/// The sandbox subnet, used as kube-proxy's cluster CIDR (no masquerade from inside).
pub const CLUSTER_CIDR: &str = "172.50.0.0/24";
pub const HAPROXY_PORT: u16 = 8080;
/// svclbd capacities for the sweep (100,000 services of one backend each
/// need > 65,536; the default).
pub const MAX_SERVICES: u32 = 131_072;
pub const MAX_BACKENDS: u32 = 131_072;
/// Echo workers per backend address (the most concurrent connections one
/// backend can get: every client thread's, plus haproxy's).
const TCP_WORKERS: usize = 8;
const UDP_WORKERS: usize = 2;

static NEXT_TEMP: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "svclb")]
    Svclb,
    /// svclb with `svclbd --no-packet-counters`: the two cgroup_skb
    /// counting programs left unattached, everything else the same (to
    /// measure what the counting costs).
    #[serde(rename = "svclb-nocount")]
    SvclbNocount,
    /// svclb with `svclbd --packet-counters-hook-only`: programs that do
    /// nothing on the two counting hooks (the hook's own cost, the floor
    /// under any per-packet counting). The counting measurement only.
    #[serde(rename = "svclb-hookonly")]
    SvclbHookOnly,
    #[serde(rename = "iptables-nft")]
    IptablesNft,
    #[serde(rename = "iptables-legacy")]
    IptablesLegacy,
    #[serde(rename = "nftables")]
    Nftables,
    #[serde(rename = "haproxy")]
    Haproxy,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Direct,
        Mode::Svclb,
        Mode::SvclbNocount,
        Mode::IptablesNft,
        Mode::IptablesLegacy,
        Mode::Nftables,
        Mode::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Svclb => "svclb",
            Mode::SvclbNocount => "svclb-nocount",
            Mode::SvclbHookOnly => "svclb-hookonly",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::Nftables => "nftables",
            Mode::Haproxy => "haproxy",
        }
    }

    pub fn parse(name: &str) -> Option<Mode> {
        Mode::ALL
            .into_iter()
            .chain([Mode::SvclbHookOnly])
            .find(|m| m.name() == name)
    }

    /// Whether svclbd runs in this mode (with or without its packet counters).
    pub fn is_svclb(self) -> bool {
        matches!(self, Mode::Svclb | Mode::SvclbNocount | Mode::SvclbHookOnly)
    }

    /// haproxy does not proxy UDP.
    pub fn supports(self, w: Workload) -> bool {
        !(self == Mode::Haproxy && w == Workload::Udp)
    }
}

/// The service set installed in a cell: `count` services, the measured one
/// last, every other one with `background_backends` backends.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSet {
    pub count: usize,
    pub background_backends: usize,
    /// Whether the DNAT rule sets give every other service its own chains,
    /// as kube-proxy does. When false (the sweep), each other service is only
    /// its `KUBE-SERVICES` rule (iptables) or its `service-ips` element
    /// (nftables), all jumping to one shared chain: the measured traffic
    /// walks exactly the same rules and lookups, since the other services'
    /// own chains are only entered by their own VIPs, and installing 200,000
    /// more chains takes minutes per cell (see BENCHMARKS.md).
    pub full_rules: bool,
}

impl ServiceSet {
    pub fn new(count: usize, background_backends: usize) -> ServiceSet {
        ServiceSet {
            count: count.max(1),
            background_backends: background_backends.clamp(1, 100),
            full_rules: false,
        }
    }

    pub fn with_full_rules(mut self) -> ServiceSet {
        self.full_rules = true;
        self
    }

    fn background(&self) -> impl Iterator<Item = (usize, Ipv4Addr, Vec<Ipv4Addr>)> + '_ {
        (0..self.count - 1).map(|i| (i, background_vip(i), self.background_backends_of(i)))
    }

    fn background_backends_of(&self, i: usize) -> Vec<Ipv4Addr> {
        (0..self.background_backends)
            .map(|j| Ipv4Addr::new(172, 50, 0, 100 + ((i + j) % 100) as u8))
            .collect()
    }
}

/// VIP of background service `i`: 10.128.0.1 on, skipping .0 and .251-.255.
pub fn background_vip(i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let i = i as u32;
    Ipv4Addr::from(base + (i / 250) * 256 + (i % 250) + 1)
}

/// svclbd's config: the background services, then `bench` (the measured one).
pub fn svclb_config(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count * 100);
    for (i, vip, backends) in set.background() {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(
            out,
            "[[service]]\nname = \"bg{i}\"\nvip = \"{vip}\"\nbackends = [{}]\n",
            list.join(", ")
        );
    }
    let list: Vec<String> = BACKENDS.iter().map(|b| format!("\"{b}\"")).collect();
    let _ = writeln!(
        out,
        "[[service]]\nname = \"bench\"\nvip = \"{VIP}\"\nbackends = [{}]",
        list.join(", ")
    );
    out
}

fn chain_id(kind: &str, parts: &str) -> String {
    // FNV-1a, printed like kube-proxy's hashed chain suffixes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.bytes().chain(parts.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016X}")
}

/// One service port of the generated rule sets.
struct Port<'a> {
    name: String,
    vip: Ipv4Addr,
    proto: &'a str,
    backends: Vec<Ipv4Addr>,
    /// Its own chains (else: jump to the shared one).
    own_chains: bool,
}

fn ports(set: &ServiceSet) -> impl Iterator<Item = Port<'static>> + '_ {
    let background = set.background().map(|(i, vip, backends)| Port {
        name: format!("bg{i}"),
        vip,
        proto: "tcp",
        backends,
        own_chains: set.full_rules,
    });
    // The measured service last, as in a kube-proxy chain that grew over time.
    let measured = ["tcp", "udp"].into_iter().map(|proto| Port {
        name: "bench".into(),
        vip: VIP,
        proto,
        backends: BACKENDS.to_vec(),
        own_chains: true,
    });
    background.chain(measured)
}

/// The chain every other service jumps to when they have no chains of their own.
const SHARED_IPT: &str = "KUBE-SVC-OTHERS";
const SHARED_NFT: &str = "service-others";

/// kube-proxy's iptables mode, as iptables-restore input: KUBE-SERVICES
/// holds one rule per service port (the measured one last), each jumping to
/// a KUBE-SVC chain that picks a KUBE-SEP chain with `-m statistic --mode
/// random`, which DNATs.
pub fn iptables_rules(set: &ServiceSet) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for p in ports(set) {
        let (name, vip, proto) = (&p.name, p.vip, p.proto);
        let port_name = format!("bench/{name}:p{PORT}");
        let svc = if p.own_chains {
            format!("KUBE-SVC-{}", chain_id("svc", &format!("{name}{proto}")))
        } else {
            SHARED_IPT.to_string()
        };
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m comment --comment \"{port_name} cluster IP\" -m {proto} --dport {PORT} -j {svc}"
        );
        if !p.own_chains {
            continue;
        }
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {proto} -m comment --comment \"{port_name} cluster IP\" -m {proto} --dport {PORT} -j KUBE-MARK-MASQ"
        );
        let k = p.backends.len();
        for (j, b) in p.backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_id("sep", &format!("{name}{proto}{b}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = k - j;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{port_name} -> {b}:{PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{port_name} -> {b}:{PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {b}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"{port_name}\" -m {proto} -j DNAT --to-destination {b}:{PORT}"
            );
        }
    }
    let mut out = String::with_capacity(chains.len() + rules.len() + 1024);
    out.push_str("*filter\n:KUBE-SERVICES - [0:0]\n");
    out.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    if !set.full_rules {
        let _ = writeln!(out, ":{SHARED_IPT} - [0:0]");
    }
    out.push_str(&chains);
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

pub const NFT_TABLE: &str = "svclb-bench";

/// kube-proxy's nftables mode, as an `nft -f` script: a verdict map on
/// `ip daddr . meta l4proto . th dport` jumps to a per-service chain that
/// picks an endpoint chain with `numgen random mod N vmap`, which DNATs.
pub fn nft_script(set: &ServiceSet) -> String {
    let mut out = String::with_capacity(set.count * 400);
    let _ = write!(
        out,
        r#"table ip {NFT_TABLE} {{
	map service-ips {{
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
	}}
	map no-endpoint-services {{
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
	}}
	chain filter-output {{
		type filter hook output priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain service-endpoints-check {{
		ip daddr . meta l4proto . th dport vmap @no-endpoint-services
	}}
	chain nat-output {{
		type nat hook output priority -100; policy accept;
		jump services
	}}
	chain nat-postrouting {{
		type nat hook postrouting priority 100; policy accept;
		jump masquerading
	}}
	chain mark-for-masquerade {{
		meta mark set meta mark | 0x4000
	}}
	chain masquerading {{
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}}
	chain services {{
		ip daddr . meta l4proto . th dport vmap @service-ips
	}}
}}
"#
    );
    let mut elements = Vec::with_capacity(set.count + 1);
    if !set.full_rules {
        let _ = writeln!(
            out,
            "add chain ip {NFT_TABLE} {SHARED_NFT}\nadd rule ip {NFT_TABLE} {SHARED_NFT} jump mark-for-masquerade"
        );
    }
    for p in ports(set) {
        let (name, vip, proto) = (&p.name, p.vip, p.proto);
        if !p.own_chains {
            elements.push(format!("{vip} . {proto} . {PORT} : goto {SHARED_NFT}"));
            continue;
        }
        let id = chain_id("svc", &format!("{name}{proto}"));
        let svc = format!("service-{id}-{name}-{proto}-p{PORT}");
        let mut picks = Vec::new();
        for (j, b) in p.backends.iter().enumerate() {
            let ep = format!("endpoint-{id}-{j}");
            picks.push(format!("{j} : goto {ep}"));
            let _ = writeln!(
                out,
                "add chain ip {NFT_TABLE} {ep}\nadd rule ip {NFT_TABLE} {ep} ip saddr {b} jump mark-for-masquerade\nadd rule ip {NFT_TABLE} {ep} meta l4proto {proto} dnat to {b}:{PORT}"
            );
        }
        let _ = writeln!(
            out,
            "add chain ip {NFT_TABLE} {svc}\nadd rule ip {NFT_TABLE} {svc} ip daddr {vip} {proto} dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\nadd rule ip {NFT_TABLE} {svc} numgen random mod {} vmap {{ {} }}",
            p.backends.len(),
            picks.join(", ")
        );
        elements.push(format!("{vip} . {proto} . {PORT} : goto {svc}"));
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip {NFT_TABLE} service-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    out
}

/// haproxy in tcp mode, one frontend on loopback, the three backends.
pub fn haproxy_config() -> String {
    let mut out = format!(
        "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend bench\n    bind 127.0.0.1:{HAPROXY_PORT}\n    default_backend bench\n\nbackend bench\n    balance random\n"
    );
    for (i, b) in BACKENDS.iter().enumerate() {
        let _ = writeln!(out, "    server b{i} {b}:{PORT}");
    }
    out
}

/// A scratch directory under the temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("svclb-bench-{}-{n}-{tag}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a mode keeps alive while a cell runs.
enum Extra {
    None,
    Svclb {
        daemon: Svclbd,
        _pins: PinDir,
        _dir: TempDir,
    },
    Haproxy {
        _proc: KillOnDrop,
        _dir: TempDir,
    },
}

/// One mode, set up fresh in its own sandbox with a service set installed.
/// Dropping it removes everything (fields drop in order: the mode's
/// processes, the servers, then the namespaces and cgroup).
pub struct Cell {
    pub mode: Mode,
    pub services: usize,
    /// Wall time to install the service set (svclbd start to READY,
    /// iptables-restore, nft -f, haproxy start).
    pub setup_secs: f64,
    targets: Vec<SocketAddrV4>,
    extra: Extra,
    servers: EchoServers,
    sandbox: Sandbox,
}

/// Runs a command in the client namespace, with stdin from `input`.
fn run_in_client(sandbox: &Sandbox, cmd: &mut Command, input: Option<&Path>) -> Result<()> {
    sandbox.client_command(cmd, false)?;
    if let Some(input) = input {
        cmd.stdin(fs::File::open(input)?);
    }
    svclb_tests::run(cmd).map(drop)
}

/// Gives the client namespace room for CRR: TIME_WAIT ports may be reused
/// and the ephemeral range is wide (both per namespace).
fn tune_client(sandbox: &Sandbox) -> Result<()> {
    run_in_client(
        sandbox,
        Command::new("sysctl").args([
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=10000 65000",
        ]),
        None,
    )
}

impl Cell {
    pub fn new(mode: Mode, set: ServiceSet) -> Result<Cell> {
        let sandbox = Sandbox::new()?;
        tune_client(&sandbox)?;
        let mut addrs = Vec::new();
        for b in BACKENDS {
            sandbox.add_backend_addr(b.into())?;
            addrs.push(SocketAddrV4::new(b, PORT));
        }
        let servers = EchoServers::start(&sandbox, &addrs, TCP_WORKERS, UDP_WORKERS)?;
        let vip = vec![SocketAddrV4::new(VIP, PORT)];
        let t0 = Instant::now();
        let (targets, extra) = match mode {
            Mode::Direct => (addrs.clone(), Extra::None),
            Mode::Svclb | Mode::SvclbNocount | Mode::SvclbHookOnly => {
                let dir = TempDir::new("svclb")?;
                let config = dir.write("services.toml", &svclb_config(&set))?;
                let pins = PinDir::new();
                let mut extra = SVCLBD_ARGS.to_vec();
                match mode {
                    Mode::SvclbNocount => extra.push("--no-packet-counters"),
                    Mode::SvclbHookOnly => extra.push("--packet-counters-hook-only"),
                    _ => {}
                }
                let daemon = start_svclbd_with(
                    &pins,
                    Some(&config),
                    sandbox.cgroup_path(),
                    MAX_SERVICES,
                    MAX_BACKENDS,
                    &extra,
                )?;
                (
                    vip,
                    Extra::Svclb {
                        daemon,
                        _pins: pins,
                        _dir: dir,
                    },
                )
            }
            Mode::IptablesNft | Mode::IptablesLegacy => {
                let dir = TempDir::new("iptables")?;
                let rules = dir.write("rules", &iptables_rules(&set))?;
                let tool = if mode == Mode::IptablesNft {
                    "iptables-nft-restore"
                } else {
                    "iptables-legacy-restore"
                };
                run_in_client(&sandbox, Command::new(tool).arg("-w"), Some(&rules))?;
                (vip, Extra::None)
            }
            Mode::Nftables => {
                let dir = TempDir::new("nft")?;
                let script = dir.write("rules.nft", &nft_script(&set))?;
                run_in_client(&sandbox, Command::new("nft").arg("-f").arg(&script), None)?;
                (vip, Extra::None)
            }
            Mode::Haproxy => {
                let dir = TempDir::new("haproxy")?;
                let (proc, addr) = start_haproxy(&sandbox, &dir)?;
                (
                    vec![addr],
                    Extra::Haproxy {
                        _proc: proc,
                        _dir: dir,
                    },
                )
            }
        };
        let setup_secs = t0.elapsed().as_secs_f64();
        Ok(Cell {
            mode,
            services: set.count,
            setup_secs,
            targets,
            extra,
            servers,
            sandbox,
        })
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// svclbd's pid, in the svclb modes.
    pub fn svclbd_pid(&self) -> Option<u32> {
        match &self.extra {
            Extra::Svclb { daemon, .. } => Some(daemon.pid()),
            _ => None,
        }
    }

    /// Runs `svclb-load` in the client namespace and the sandbox cgroup,
    /// pinned as the sweep pins ([`Pinning::Sweep`]).
    pub fn run(
        &self,
        workload: Workload,
        threads: usize,
        warmup: Duration,
        duration: Duration,
    ) -> Result<LoadResult> {
        self.run_pinned(workload, threads, warmup, duration, Pinning::Sweep)
    }

    /// [`Cell::run`] with a choice of pinning.
    /// svclbd's pid, in the svclb modes.
    pub fn daemon_pid(&self) -> Option<u32> {
        match &self.extra {
            Extra::Svclb { daemon, .. } => Some(daemon.pid()),
            _ => None,
        }
    }

    pub fn run_pinned(
        &self,
        workload: Workload,
        threads: usize,
        warmup: Duration,
        duration: Duration,
        pinning: Pinning,
    ) -> Result<LoadResult> {
        let mut cmd = Command::new(daemon::bin("svclb-load"));
        cmd.args(["run", "--workload", workload.name()])
            .args(["--threads", &threads.to_string()])
            .args(["--warmup-ms", &warmup.as_millis().to_string()])
            .args(["--duration-ms", &duration.as_millis().to_string()])
            .args(["--timeout-ms", "1000"]);
        for t in &self.targets {
            cmd.arg("--target").arg(t.to_string());
        }
        // One client thread: client and servers share CPU 0, so that a
        // request/response is not a cross-CPU wake-up, whose cost in a VM
        // (an idle vCPU halted in the hypervisor) made these runs bimodal.
        if threads == 1 {
            cmd.args(["--cpu", "0"]);
            self.servers.pin(Some(0));
        } else if pinning == Pinning::Pairs {
            let cpus: Vec<String> = (0..online_cpus()).map(|c| c.to_string()).collect();
            cmd.args(["--cpu", &cpus.join(",")]);
            self.servers.follow_clients();
        } else {
            self.servers.pin(None);
        }
        // Every mode's load runs in the sandbox cgroup, the same for all:
        // only in the svclb modes are programs attached to it.
        self.sandbox.client_command(&mut cmd, true)?;
        let limit = warmup + duration + Duration::from_secs(15);
        let out = run_bounded(&mut cmd, limit)?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("svclb-load printed {:?}", out.trim()))
    }
}

/// Where a run's threads go. With 1 client thread, both pin the client and
/// the echo servers to CPU 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pinning {
    /// More than 1 client thread: nothing pinned (the sweep).
    #[default]
    Sweep,
    /// More than 1 client thread: client thread i on CPU i mod CPUs, and
    /// each echo worker on its client's CPU (co-located pairs on every CPU),
    /// so that no run depends on where the scheduler places the two ends.
    Pairs,
}

/// The CPUs this process may run on (0..n).
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts svclbd with the sweep's capacities, attached to `cgroup`, without
/// its file watch (config changes come by SIGHUP or svclb-ctl) and without
/// its metrics endpoint (nothing scrapes it here).
pub fn start_svclbd(pins: &PinDir, config: Option<&Path>, cgroup: &Path) -> Result<Svclbd> {
    start_svclbd_with(
        pins,
        config,
        cgroup,
        MAX_SERVICES,
        MAX_BACKENDS,
        SVCLBD_ARGS,
    )
}

/// How long svclbd may take to say READY=1: with 100,000 services the
/// start-up (load, apply, attach) takes tens of seconds on this machine kind.
const READY_WITHIN: Duration = Duration::from_secs(180);

/// svclbd's flags in the bench: no file watch, no metrics endpoint.
const SVCLBD_ARGS: &[&str] = &["--log", "warn", "--no-watch", "--no-metrics"];

pub fn start_svclbd_with(
    pins: &PinDir,
    config: Option<&Path>,
    cgroup: &Path,
    max_services: u32,
    max_backends: u32,
    extra: &[&str],
) -> Result<Svclbd> {
    let cgroup = cgroup.to_str().context("cgroup path")?.to_string();
    let (ms, mb) = (max_services.to_string(), max_backends.to_string());
    let mut args: Vec<&str> = vec![
        "--cgroup",
        &cgroup,
        "--max-services",
        &ms,
        "--max-backends",
        &mb,
    ];
    args.extend(extra);
    let config_arg;
    if let Some(config) = config {
        config_arg = config.to_str().context("config path")?.to_string();
        args.extend(["--config", &config_arg]);
    }
    Svclbd::start_within(pins, &args, READY_WITHIN, as_deployed)
}

/// svclbd as it runs in production: the test harness's read-back of every
/// apply (SVCLB_VERIFY_SNAPSHOTS) is off, it is not part of the cost.
pub fn as_deployed(cmd: &mut std::process::Command) -> Result<()> {
    cmd.env("SVCLB_VERIFY_SNAPSHOTS", "0");
    Ok(())
}

fn start_haproxy(sandbox: &Sandbox, dir: &TempDir) -> Result<(KillOnDrop, SocketAddrV4)> {
    let config = dir.write("haproxy.cfg", &haproxy_config())?;
    let log = dir.path().join("haproxy.log");
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&config);
    sandbox.client_command(&mut cmd, false)?;
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(&log)?);
    let mut proc = KillOnDrop(cmd.spawn().context("starting haproxy")?);
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, HAPROXY_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = sandbox.try_in_client(|| {
            TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok((proc, addr));
        }
        if let Some(status) = proc.0.try_wait()? {
            bail!(
                "haproxy exited ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "haproxy did not listen on {addr} within 10 s: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdout and stderr captured) and kills it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = svclb_tests::util::command_line(cmd);
    let mut child = KillOnDrop(cmd.spawn().with_context(|| format!("starting {line}"))?);
    // Drained while it runs: a full pipe would stall it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(child.0.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.0.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("`{line}` did not finish within {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(anyhow!("`{line}` failed ({status}): {}", err.trim()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_vips_are_distinct_and_never_sandbox_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let v = background_vip(i);
            assert!(seen.insert(v), "{v} twice");
            let o = v.octets();
            assert_eq!(o[0], 10);
            assert!(o[3] != 0 && o[3] <= 250, "{v}");
        }
    }

    #[test]
    fn measured_service_comes_last() {
        let set = ServiceSet::new(5, 1);
        let ipt = iptables_rules(&set);
        let services: Vec<&str> = ipt
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(
            services.len(),
            4 + 2,
            "4 others (tcp) + the measured tcp and udp"
        );
        assert!(services[4].contains("-d 172.50.0.200/32 -p tcp"));
        assert!(services[5].contains("-d 172.50.0.200/32 -p udp"));
        assert!(services[0].contains("-j KUBE-SVC-OTHERS"));
        assert_eq!(
            ipt.matches("-j DNAT").count(),
            6,
            "only the measured ports DNAT"
        );
        let full = iptables_rules(&set.with_full_rules());
        assert_eq!(full.matches("-j DNAT").count(), 4 + 6);
        assert!(full.contains("--probability 0.33333333333"));

        let toml = svclb_config(&set);
        assert_eq!(toml.matches("[[service]]").count(), 5);
        assert!(toml
            .trim_end()
            .ends_with("backends = [\"172.50.0.10\", \"172.50.0.11\", \"172.50.0.12\"]"));

        let nft = nft_script(&set);
        assert_eq!(nft.matches(" : goto service-others").count(), 4);
        assert!(nft.contains("172.50.0.200 . udp . 80 : goto service-"));
        assert!(nft.contains("numgen random mod 3 vmap"));
    }
}
