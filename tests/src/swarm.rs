//! A real, private Docker engine running a single-node Swarm, for the
//! tests and the demo that check svclb against what Swarm really does.
//!
//! [`Engine::start`] runs `dockerd` with its own socket, data-root,
//! exec-root, pidfile and cgroup parent under a fresh temporary directory,
//! so it never touches an engine that already runs on the machine; it
//! initialises a one-node swarm (`--advertise-addr 127.0.0.1`). Images are
//! made locally with `docker import` of a tiny rootfs (Debian's
//! busybox-static plus `lib -> usr/lib` symlinks): services bind the host's
//! /usr read-only, which gives them Python for the identity servers and
//! clients below. No registry is needed.
//!
//! Network rule: only `--internal` overlay networks are created, so no
//! container has a route out; the seed's subnet is 172.50.0.0/24.
//!
//! [`Engine::start_strict`] runs the engine with svclb-runc as its default
//! runtime (a daemon.json in the temporary directory, `--config-file`), for
//! svclb's strict scoping: svclbd is then started with `--runtime-socket`
//! [`Engine::runtime_socket`].
//!
//! One private engine at a time runs on the machine (an exclusive lock on
//! [`LOCK_PATH`]): engines share the host's `docker0` and
//! `docker_gwbridge` names. Dropping an [`Engine`] (also on panic) removes
//! its services and networks, leaves the swarm, stops dockerd and deletes
//! its directories, the bridges and the host iptables rules and chains that
//! appeared while it ran, and puts ip_forward back as it was.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::warn;

/// Serialises private engines across processes.
pub const LOCK_PATH: &str = "/run/svclb-swarm.lock";
/// The seed's overlay subnet.
pub const SUBNET: &str = "172.50.0.0/24";
/// The port the identity servers listen on (TCP and UDP).
pub const PORT: u16 = 8080;
/// How long dockerd may take to answer after it starts.
const ENGINE_READY_WITHIN: Duration = Duration::from_secs(60);

/// The identity server each `api` task runs: answers every TCP connection
/// and UDP datagram with `<hostname> <the address it was reached at>`
/// (for UDP, its address from /etc/hosts),
/// and keeps the number of connections it accepted from other containers in
/// /tmp/accepted.
pub const SERVER_PY: &str = r#"
import socket, threading
host = socket.gethostname()
# Docker's /etc/hosts maps the task's hostname to its address.
me = socket.gethostbyname(host)
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 8080))
    while True:
        data, peer = u.recvfrom(512)
        u.sendto(("%s %s" % (host, me)).encode(), peer)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(512)
accepted = 0
while True:
    c, peer = s.accept()
    # The health check's connections (from 127.0.0.1) are not traffic.
    if peer[0] != "127.0.0.1":
        accepted += 1
    try:
        c.sendall(("%s %s\n" % (host, c.getsockname()[0])).encode())
    except OSError:
        pass
    c.close()
    with open("/tmp/accepted.new", "w") as f:
        f.write(str(accepted))
    import os
    os.replace("/tmp/accepted.new", "/tmp/accepted")
"#;

/// The client: `client.py tcp|udp HOST PORT COUNT` makes COUNT connects
/// (or datagrams); `client.py loop HOST PORT SECONDS` connects every 10 ms
/// for SECONDS. One line per attempt: `ok <resolved> <peer> <task host>
/// <task addr>` (for UDP, peer is where the reply came from) or
/// `fail <resolved> <error>`; names are resolved per attempt, through
/// Docker's DNS.
pub const CLIENT_PY: &str = r#"
import socket, sys, time
mode, host, port, amount = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def resolve():
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        return None
def tcp_once():
    addr = resolve()
    if addr is None:
        return "fail - resolve"
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((addr, port))
        peer = s.getpeername()[0]
        data = b""
        while True:
            d = s.recv(512)
            if not d:
                break
            data += d
        parts = data.decode().split()
        if len(parts) != 2:
            return "fail %s short-reply" % addr
        return "ok %s %s %s %s" % (addr, peer, parts[0], parts[1])
    except OSError as e:
        return "fail %s %s" % (addr, type(e).__name__)
    finally:
        s.close()
def udp_once():
    addr = resolve()
    if addr is None:
        return "fail - resolve"
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    try:
        u.sendto(b"hi", (addr, port))
        data, peer = u.recvfrom(512)
        parts = data.decode().split()
        return "ok %s %s %s %s" % (addr, peer[0], parts[0], parts[1])
    except OSError as e:
        return "fail %s %s" % (addr, type(e).__name__)
    finally:
        u.close()
if mode == "loop":
    end = time.time() + amount
    while time.time() < end:
        print(tcp_once(), flush=True)
        time.sleep(0.01)
else:
    once = tcp_once if mode == "tcp" else udp_once
    for _ in range(int(amount)):
        print(once(), flush=True)
"#;

/// One attempt of the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Ok {
        resolved: String,
        peer: String,
        task_host: String,
        task_addr: String,
    },
    Fail {
        resolved: String,
        error: String,
    },
}

/// Parses the client's output.
pub fn parse_attempts(text: &str) -> Vec<Attempt> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["ok", resolved, peer, host, addr] => Some(Attempt::Ok {
                    resolved: resolved.to_string(),
                    peer: peer.to_string(),
                    task_host: host.to_string(),
                    task_addr: addr.to_string(),
                }),
                ["fail", resolved, error @ ..] => Some(Attempt::Fail {
                    resolved: resolved.to_string(),
                    error: error.join(" "),
                }),
                _ => None,
            }
        })
        .collect()
}

/// Successful attempts per task address, and the failures.
pub fn tally(attempts: &[Attempt]) -> (BTreeMap<String, u64>, Vec<Attempt>) {
    let mut per_task = BTreeMap::new();
    let mut failed = Vec::new();
    for a in attempts {
        match a {
            Attempt::Ok { task_addr, .. } => *per_task.entry(task_addr.clone()).or_insert(0) += 1,
            Attempt::Fail { .. } => failed.push(a.clone()),
        }
    }
    (per_task, failed)
}

/// A task (or container) as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// Its address on each network, by network name.
    pub addrs: BTreeMap<String, String>,
}

/// `docker network inspect -v` of one service on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub vip: String,
    pub local_lb_index: u32,
    pub task_ips: Vec<String>,
}

/// A private dockerd with a single-node swarm.
pub struct Engine {
    dir: PathBuf,
    socket: PathBuf,
    cgroup_parent: String,
    /// The daemon.json dockerd reads (`--config-file`), if any.
    config_file: Option<PathBuf>,
    /// The network namespace dockerd runs in (a second node), or the host's.
    netns: Option<String>,
    child: Option<Child>,
    image: Option<String>,
    services: Vec<String>,
    networks: Vec<String>,
    containers: Vec<String>,
    /// Host links that did not exist before this engine started.
    created_links: Vec<String>,
    links_before: Vec<String>,
    /// `iptables -t T -S` of the host before dockerd started, per table.
    iptables_before: Vec<(&'static str, Vec<String>)>,
    ip_forward_before: Option<String>,
    _lock: Option<fs::File>,
}

/// Removes the cgroup `parent` (and what is left under it) from every
/// cgroup hierarchy: with the cgroupfs driver on cgroup v1, dockerd makes it
/// in each controller's hierarchy as well as in the unified one. runc
/// removes a container's cgroups just after the container is gone, hence
/// the retries.
fn remove_cgroups(parent: &str) {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let roots: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect();
    for _ in 0..20 {
        let left: Vec<PathBuf> = roots
            .iter()
            .map(|r| r.join(parent.trim_start_matches('/')))
            .filter(|d| d.exists())
            .collect();
        if left.is_empty() {
            return;
        }
        for d in &left {
            remove_tree(d);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One private engine (or pair) at a time on the machine.
fn lock() -> Result<fs::File> {
    crate::util::require_root()?;
    for (bin, package) in [("dockerd", "docker.io"), ("busybox", "busybox-static")] {
        if !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(bin).exists())
        {
            bail!(
                "{bin} is not installed: run `cargo xtask setup` (it installs Debian's {package})"
            );
        }
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("opening {LOCK_PATH}"))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the private engine");
    }
    Ok(lock)
}

/// The host tables dockerd writes to.
const IPTABLES_TABLES: [&str; 3] = ["filter", "nat", "mangle"];
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn iptables_rules(table: &str) -> Vec<String> {
    Command::new("iptables")
        .args(["-w", "-t", table, "-S"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the host rules and chains that appeared since `before` was read
/// (dockerd's DOCKER* chains, its docker0 and docker_gwbridge rules): rules
/// first, newest first, then the chains they jumped to.
fn remove_added_iptables(before: &[(&'static str, Vec<String>)]) {
    for (table, old) in before {
        let added: Vec<String> = iptables_rules(table)
            .into_iter()
            .filter(|r| !old.contains(r))
            .collect();
        for rule in added.iter().rev().filter(|r| r.starts_with("-A ")) {
            let args: Vec<&str> = rule[3..].split_whitespace().collect();
            let _ = Command::new("iptables")
                .args(["-w", "-t", table, "-D"])
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
        for chain in added.iter().filter_map(|r| r.strip_prefix("-N ")) {
            for op in ["-F", "-X"] {
                let _ = Command::new("iptables")
                    .args(["-w", "-t", table, op, chain.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn host_links() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The docker client: Debian's when installed, else the one on PATH.
fn docker_client() -> Command {
    if Path::new("/usr/bin/docker").exists() {
        Command::new("/usr/bin/docker")
    } else {
        Command::new("docker")
    }
}

impl Engine {
    /// Starts dockerd, waits for it and initialises the swarm. Fails (never
    /// skips) when the engine cannot run here, naming why.
    pub fn start() -> Result<Engine> {
        let lock = lock()?;
        Self::launch(None, Some("127.0.0.1"), Some(lock), false)
    }

    /// Like [`Engine::start`], with svclb-runc (from the built binaries)
    /// as the engine's default runtime, announcing containers on
    /// [`Engine::runtime_socket`].
    pub fn start_strict() -> Result<Engine> {
        let lock = lock()?;
        Self::launch(None, Some("127.0.0.1"), Some(lock), true)
    }

    /// Where svclb-runc announces containers (for `svclbd --runtime-socket`).
    pub fn runtime_socket(&self) -> PathBuf {
        self.dir.join("runtime.sock")
    }

    /// The daemon.json of strict scoping, as an operator writes it.
    fn write_strict_config(&mut self) -> Result<()> {
        let runc = crate::daemon::bin("svclb-runc");
        let config = serde_json::json!({
            "runtimes": {
                "svclb": {
                    "path": runc,
                    "runtimeArgs": [format!("--svclb-socket={}", self.runtime_socket().display())],
                },
            },
            "default-runtime": "svclb",
        });
        let path = self.dir.join("daemon.json");
        fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        self.config_file = Some(path);
        Ok(())
    }

    /// dockerd in the host's network namespace or in `netns`; with `init`,
    /// a swarm is initialised advertising (and listening on) that address.
    fn launch(
        netns: Option<String>,
        init: Option<&str>,
        lock: Option<fs::File>,
        strict: bool,
    ) -> Result<Engine> {
        let tag = format!("{}-{}", std::process::id(), crate::daemon::unique());
        let dir = PathBuf::from(format!("/tmp/svclb-swarm-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut engine = Engine {
            socket: dir.join("docker.sock"),
            cgroup_parent: format!("/svclb-swarm-{tag}"),
            config_file: None,
            dir,
            netns,
            child: None,
            image: None,
            services: Vec::new(),
            networks: Vec::new(),
            containers: Vec::new(),
            created_links: Vec::new(),
            links_before: host_links(),
            iptables_before: IPTABLES_TABLES
                .iter()
                .map(|t| (*t, iptables_rules(t)))
                .collect(),
            ip_forward_before: fs::read_to_string(IP_FORWARD).ok(),
            _lock: lock,
        };
        if strict {
            engine.write_strict_config()?;
        }
        engine.start_dockerd()?;
        if let Some(addr) = init {
            engine
                .docker(&[
                    "swarm",
                    "init",
                    "--advertise-addr",
                    addr,
                    "--listen-addr",
                    &format!("{addr}:2377"),
                ])
                .context("initialising the swarm")?;
        }
        Ok(engine)
    }

    /// This node's swarm node ID.
    pub fn node_id(&self) -> Result<String> {
        self.docker(&["info", "--format", "{{.Swarm.NodeID}}"])
    }

    fn start_dockerd(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let mut cmd = match &self.netns {
            // nsenter, not `ip netns exec`: that remounts /sys and hides
            // the cgroup mounts dockerd needs.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", crate::netns::netns_path(ns).display()))
                    .arg("dockerd");
                c
            }
            None => Command::new("dockerd"),
        };
        cmd.arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("-H")
            .arg(self.host())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(
                self.config_file
                    .iter()
                    .flat_map(|f| [Path::new("--config-file"), f]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting dockerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + ENGINE_READY_WITHIN;
        loop {
            if self.docker(&["info", "--format", "{{.ID}}"]).is_ok() {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "dockerd exited with {status} before answering:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer within {ENGINE_READY_WITHIN:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.note_links();
        Ok(())
    }

    /// Remembers the host links made since the engine started (docker0,
    /// docker_gwbridge, ...), to delete them at the end.
    fn note_links(&mut self) {
        if self.netns.is_some() {
            return;
        }
        for link in host_links() {
            if !self.links_before.contains(&link) && !self.created_links.contains(&link) {
                self.created_links.push(link);
            }
        }
    }

    /// `unix://<socket>`, for `DOCKER_HOST` and `--docker-host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The cgroup (v2 path, relative to the cgroup2 mount) that dockerd
    /// puts its containers under.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The last lines of dockerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A docker client command for this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = docker_client();
        cmd.arg("-H").arg(self.host()).args(args);
        cmd
    }

    /// Runs the docker client; errors carry its stderr.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        Ok(crate::util::run(&mut cmd)?.trim().to_owned())
    }

    /// The test image (built once per engine): busybox, /srv/server.py,
    /// /srv/client.py, and `lib`/`lib64` pointing into /usr, which the
    /// containers bind from the host.
    pub fn image(&mut self) -> Result<String> {
        if let Some(image) = &self.image {
            return Ok(image.clone());
        }
        let root = self.dir.join("rootfs");
        for d in [
            "bin", "etc", "proc", "sys", "dev", "tmp", "usr", "srv", "root",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox")?;
        for applet in [
            "sh", "sleep", "cat", "ls", "ip", "hostname", "nc", "ps", "kill",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
        std::os::unix::fs::symlink("usr/lib64", root.join("lib64"))?;
        fs::write(root.join("srv/server.py"), SERVER_PY)?;
        fs::write(root.join("srv/client.py"), CLIENT_PY)?;
        let tar = self.dir.join("rootfs.tar");
        crate::util::run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        let image = "svclb-test:local".to_owned();
        self.docker(&["import", &tar.to_string_lossy(), &image])
            .context("docker import of the test rootfs")?;
        self.image = Some(image.clone());
        Ok(image)
    }

    /// An `--internal --attachable` overlay network.
    pub fn network(&mut self, name: &str, subnet: &str) -> Result<()> {
        self.docker(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--internal",
            "--attachable",
            "--subnet",
            subnet,
            name,
        ])?;
        self.networks.push(name.to_owned());
        Ok(())
    }

    /// Creates a service on `networks` from the test image, with the
    /// host's /usr bound read-only; `extra` goes before the image (e.g.
    /// `--replicas 2`), `cmd` after it.
    pub fn service(
        &mut self,
        name: &str,
        networks: &[&str],
        extra: &[&str],
        cmd: &[&str],
    ) -> Result<()> {
        let image = self.image()?;
        let mut args: Vec<&str> = vec![
            "service",
            "create",
            "-d",
            "--name",
            name,
            "--mount",
            "type=bind,src=/usr,dst=/usr,readonly",
            "--restart-condition",
            "any",
            "--stop-grace-period",
            "1s",
        ];
        for n in networks {
            args.extend(["--network", n]);
        }
        args.extend_from_slice(extra);
        args.push(&image);
        args.extend_from_slice(cmd);
        self.docker(&args)?;
        self.services.push(name.to_owned());
        Ok(())
    }

    /// `api`-style: `replicas` identity servers. Each has a health check,
    /// as a Swarm service should: the engine puts a task behind the VIP once
    /// it is healthy (listening), not as soon as its process starts.
    pub fn server_service(&mut self, name: &str, networks: &[&str], replicas: u32) -> Result<()> {
        self.server_service_with(name, networks, replicas, &[])?;
        self.wait_running(name, replicas as usize)?;
        Ok(())
    }

    /// Like [`Engine::server_service`] with more `docker service create`
    /// options, not waiting for the tasks.
    pub fn server_service_with(
        &mut self,
        name: &str,
        networks: &[&str],
        replicas: u32,
        extra: &[&str],
    ) -> Result<()> {
        let r = replicas.to_string();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&[
            "--replicas",
            &r,
            "--health-cmd",
            "/usr/bin/python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8080), 1)'",
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
        ]);
        self.service(
            name,
            networks,
            &args,
            &["/usr/bin/python3", "/srv/server.py"],
        )
    }

    /// `web`-style: one task that sleeps, for `docker exec`; `extra` as for
    /// [`Engine::service`] (e.g. a placement constraint).
    pub fn client_service_with(
        &mut self,
        name: &str,
        networks: &[&str],
        extra: &[&str],
    ) -> Result<Container> {
        let mut args = vec!["--replicas", "1"];
        args.extend_from_slice(extra);
        self.service(name, networks, &args, &["/bin/sleep", "100000"])?;
        let tasks = self.wait_running(name, 1)?;
        Ok(tasks.into_iter().next().expect("one task"))
    }

    /// `web`-style: one task that sleeps, for `docker exec`.
    pub fn client_service(&mut self, name: &str, networks: &[&str]) -> Result<Container> {
        self.client_service_with(name, networks, &[])
    }

    /// A plain (non-swarm) container on `network` (an attachable overlay),
    /// or on none (`None`: `--network none`).
    pub fn run_container(&mut self, name: &str, network: Option<&str>) -> Result<Container> {
        self.run_container_with(name, network, &["/bin/sleep", "100000"])
    }

    /// Like [`Engine::run_container`], running `cmd`.
    pub fn run_container_with(
        &mut self,
        name: &str,
        network: Option<&str>,
        cmd: &[&str],
    ) -> Result<Container> {
        let image = self.image()?;
        let net = network.unwrap_or("none");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "-v",
            "/usr:/usr:ro",
            &image,
        ];
        args.extend_from_slice(cmd);
        let id = self.docker(&args)?;
        self.containers.push(name.to_owned());
        self.container(&id)
    }

    /// Scales a service and waits until exactly `replicas` tasks run.
    pub fn scale(&self, service: &str, replicas: u32) -> Result<Vec<Container>> {
        self.docker(&["service", "scale", "-d", &format!("{service}={replicas}")])?;
        self.wait_running(service, replicas as usize)
    }

    /// The running task containers of a service, once there are exactly
    /// `n` of them (within 90 s).
    pub fn wait_running(&self, service: &str, n: usize) -> Result<Vec<Container>> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let tasks = self.tasks(service)?;
            if tasks.len() == n {
                return Ok(tasks);
            }
            if Instant::now() > deadline {
                bail!(
                    "service {service}: {} running tasks, expected {n}\n{}\n{}",
                    tasks.len(),
                    self.docker(&["service", "ps", "--no-trunc", service])
                        .unwrap_or_default(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The running containers of a service's tasks.
    pub fn tasks(&self, service: &str) -> Result<Vec<Container>> {
        let ids = self.docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.swarm.service.name={service}"),
            "--filter",
            "status=running",
        ])?;
        ids.lines()
            .filter(|l| !l.is_empty())
            .map(|id| self.container(id))
            .collect()
    }

    /// One container's ID, name and addresses.
    pub fn container(&self, id: &str) -> Result<Container> {
        let text = self.docker(&["inspect", id])?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let c = &json[0];
        let mut addrs = BTreeMap::new();
        if let Some(nets) = c["NetworkSettings"]["Networks"].as_object() {
            for (name, n) in nets {
                if let Some(ip) = n["IPAddress"].as_str().filter(|s| !s.is_empty()) {
                    addrs.insert(name.clone(), ip.to_owned());
                }
            }
        }
        Ok(Container {
            id: c["Id"].as_str().unwrap_or_default().to_owned(),
            name: c["Name"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            addrs,
        })
    }

    /// `docker exec CONTAINER ARGS`; stdout.
    pub fn exec(&self, container: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", container];
        all.extend_from_slice(args);
        self.docker(&all)
    }

    /// Runs the client in `container` to completion: `client.py MODE HOST PORT AMOUNT`.
    pub fn client(
        &self,
        container: &str,
        mode: &str,
        host: &str,
        amount: u32,
    ) -> Result<Vec<Attempt>> {
        let out = self.exec(
            container,
            &[
                "/usr/bin/python3",
                "/srv/client.py",
                mode,
                host,
                &PORT.to_string(),
                &amount.to_string(),
            ],
        )?;
        Ok(parse_attempts(&out))
    }

    /// Starts a connect loop of `seconds` in `container`; read it with
    /// [`ConnectLoop::finish`].
    pub fn connect_loop(&self, container: &str, host: &str, seconds: u32) -> Result<ConnectLoop> {
        let out = self
            .dir
            .join(format!("loop-{}.out", crate::daemon::unique()));
        let child = self
            .command(&[
                "exec",
                container,
                "/usr/bin/python3",
                "/srv/client.py",
                "loop",
                host,
                &PORT.to_string(),
                &seconds.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting the connect loop")?;
        Ok(ConnectLoop { child, out })
    }

    /// How many connections a server task accepted.
    pub fn accepted(&self, container: &str) -> Result<u64> {
        let text = self
            .exec(container, &["cat", "/tmp/accepted"])
            .unwrap_or_default();
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// The engine's own view of `service` on `network`
    /// (`docker network inspect -v`).
    pub fn service_view(&self, network: &str, service: &str) -> Result<Option<ServiceView>> {
        let text = self.docker(&["network", "inspect", "-v", network])?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let svc = &json[0]["Services"][service];
        if svc.is_null() {
            return Ok(None);
        }
        let mut task_ips: Vec<String> = svc["Tasks"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| t["EndpointIP"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        task_ips.sort();
        Ok(Some(ServiceView {
            vip: svc["VIP"]
                .as_str()
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            local_lb_index: svc["LocalLBIndex"].as_u64().unwrap_or(0) as u32,
            task_ips,
        }))
    }

    /// Stops dockerd (SIGTERM, then SIGKILL after 20 s); the swarm state
    /// stays in the data-root, so [`Engine::restart_dockerd`] brings it back.
    pub fn stop_dockerd(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts dockerd again on the same directories.
    pub fn restart_dockerd(&mut self) -> Result<()> {
        self.stop_dockerd()?;
        self.start_dockerd()
    }

    fn cleanup(&mut self) {
        self.note_links();
        if self.child.is_some() {
            for s in self.services.clone() {
                let _ = self.docker(&["service", "rm", &s]);
            }
            for c in self.containers.clone() {
                let _ = self.docker(&["rm", "-f", &c]);
            }
            // Tasks must be gone before their network can be removed.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                match self.docker(&["ps", "-aq"]) {
                    Ok(s) if s.is_empty() => break,
                    Err(_) => break,
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
            for n in self.networks.clone() {
                let _ = self.docker(&["network", "rm", &n]);
            }
            let _ = self.docker(&["swarm", "leave", "--force"]);
        }
        if let Err(e) = self.stop_dockerd() {
            warn(format_args!("stopping dockerd: {e:#}"));
        }
        // Mounts dockerd may have left behind (it unmounts them when it
        // stops cleanly), deepest first.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.to_string_lossy().into_owned();
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        for link in &self.created_links {
            let _ = crate::util::ip_command()
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status();
        }
        if self.netns.is_some() {
            // Its bridges and rules are in its namespace, deleted with it.
            let _ = fs::remove_dir_all(&self.dir);
            remove_cgroups(&self.cgroup_parent);
            return;
        }
        remove_added_iptables(&self.iptables_before);
        if let Some(before) = &self.ip_forward_before {
            if fs::read_to_string(IP_FORWARD).ok().as_ref() != Some(before) {
                let _ = fs::write(IP_FORWARD, before);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        remove_cgroups(&self.cgroup_parent);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A client's connect loop running in a container.
pub struct ConnectLoop {
    child: Child,
    out: PathBuf,
}

impl ConnectLoop {
    /// Waits for the loop to end; its attempts.
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        self.child.wait()?;
        let text = fs::read_to_string(&self.out)?;
        let _ = fs::remove_file(&self.out);
        Ok(parse_attempts(&text))
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two swarm nodes on this one machine: node 1 (a manager) in the host's
/// network namespace, node 2 (a worker) in a namespace of its own, joined
/// over a veth pair (10.99.0.1 and 10.99.0.2, addresses that exist only on
/// that pair). Overlay traffic between them is VXLAN over the veth.
/// Dropped in order: node 2, node 1, then the namespace and the veth.
pub struct TwoNodes {
    pub node2: Engine,
    pub node1: Engine,
    _link: NodeLink,
    _lock: fs::File,
}

/// The second node's namespace and the veth to it; deleted on drop.
struct NodeLink {
    netns: String,
    host_if: String,
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        let _ = crate::util::ip_command()
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = crate::util::ip_command()
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Node 1's address on the veth.
pub const NODE1_ADDR: &str = "10.99.0.1";
/// Node 2's.
pub const NODE2_ADDR: &str = "10.99.0.2";

impl TwoNodes {
    /// Both engines, node 2 joined to node 1's swarm as a worker, the test
    /// image loaded on both.
    pub fn start() -> Result<TwoNodes> {
        let lock = lock()?;
        let pid = std::process::id();
        let link = NodeLink {
            netns: format!("svclb-n2-{pid}"),
            host_if: format!("svn1-{pid}"),
        };
        let ip = |args: &[&str]| crate::util::run(crate::util::ip_command().args(args));
        ip(&["netns", "add", &link.netns])?;
        ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth-n2",
            "netns",
            &link.netns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{NODE1_ADDR}/24"),
            "dev",
            &link.host_if,
        ])?;
        ip(&["link", "set", &link.host_if, "up"])?;
        ip(&[
            "-n",
            &link.netns,
            "addr",
            "add",
            &format!("{NODE2_ADDR}/24"),
            "dev",
            "eth-n2",
        ])?;
        ip(&["-n", &link.netns, "link", "set", "eth-n2", "up"])?;
        ip(&["-n", &link.netns, "link", "set", "lo", "up"])?;

        let mut node1 = Engine::launch(None, Some(NODE1_ADDR), None, false)?;
        let node2 = Engine::launch(Some(link.netns.clone()), None, None, false)?;
        let token = node1.docker(&["swarm", "join-token", "-q", "worker"])?;
        node2
            .docker(&[
                "swarm",
                "join",
                "--advertise-addr",
                NODE2_ADDR,
                "--listen-addr",
                &format!("{NODE2_ADDR}:2377"),
                "--token",
                &token,
                &format!("{NODE1_ADDR}:2377"),
            ])
            .context("joining node 2 to node 1's swarm")?;
        let image = node1.image()?;
        let tar = node1.dir.join("image.tar");
        node1.docker(&["save", "-o", &tar.to_string_lossy(), &image])?;
        node2.docker(&["load", "-i", &tar.to_string_lossy()])?;
        Ok(TwoNodes {
            node2,
            node1,
            _link: link,
            _lock: lock,
        })
    }
}
