//! The [`Sandbox`]: two network namespaces joined by a veth pair, plus a cgroup v2 directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::cgroup::{self, CgroupGuard};
use crate::netns::{self, NETNS_DIR};
use crate::util::{ip_command, require_root, run, warn};

/// Prefix of every namespace and cgroup name the harness creates.
pub const NAME_PREFIX: &str = "svclb-";
/// The client's veth address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(172, 50, 0, 2);
/// The backends' veth (first) address.
pub const BACKENDS_V4: Ipv4Addr = Ipv4Addr::new(172, 50, 0, 1);
/// Prefix length of the sandbox IPv4 subnet 172.50.0.0/24.
pub const V4_PREFIX_LEN: u8 = 24;
/// The client's veth IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
/// The backends' veth (first) IPv6 address.
pub const BACKENDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
/// Prefix length of the sandbox IPv6 subnet fd00:50::/64.
pub const V6_PREFIX_LEN: u8 = 64;
/// Name of the veth end in the client namespace.
pub const CLIENT_VETH: &str = "veth-c";
/// Name of the veth end in the backends namespace.
pub const BACKENDS_VETH: &str = "veth-b";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Whether `ip` is inside the sandbox subnets 172.50.0.0/24 or fd00:50::/64.
pub fn in_sandbox_subnet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [172, 50, 0],
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd00, 0x50, 0, 0],
    }
}

/// A client netns and a backends netns joined by a veth pair, and a cgroup v2 directory; all removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    client_ns: String,
    backends_ns: String,
    cgroup_root: PathBuf,
    cgroup: PathBuf,
}

impl Sandbox {
    /// Creates the namespaces, veth pair, addresses and cgroup (after sweeping leftovers of dead processes).
    pub fn new() -> Result<Sandbox> {
        require_root()?;
        let cgroup_root = cgroup::cgroup2_mount()?;
        sweep_stale(&cgroup_root);

        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("{NAME_PREFIX}{id}");
        // Built first so that Drop cleans up whatever part of the setup succeeded.
        let sandbox = Sandbox {
            client_ns: format!("{name}-c"),
            backends_ns: format!("{name}-b"),
            cgroup: cgroup_root.join(&name),
            cgroup_root,
            id,
        };
        sandbox
            .setup()
            .with_context(|| format!("could not set up sandbox {name}"))?;
        Ok(sandbox)
    }

    fn setup(&self) -> Result<()> {
        let (c, b) = (self.client_ns.as_str(), self.backends_ns.as_str());
        run(ip_command().args(["netns", "add", c]))?;
        run(ip_command().args(["netns", "add", b]))?;
        // Created directly inside the namespaces: the veth never exists in the caller's namespace.
        run(ip_command().args([
            "link",
            "add",
            CLIENT_VETH,
            "netns",
            c,
            "type",
            "veth",
            "peer",
            "name",
            BACKENDS_VETH,
            "netns",
            b,
        ]))?;
        for (ns, dev, v4, v6) in [
            (c, CLIENT_VETH, CLIENT_V4, CLIENT_V6),
            (b, BACKENDS_VETH, BACKENDS_V4, BACKENDS_V6),
        ] {
            run(ip_command().args(["-n", ns, "link", "set", "lo", "up"]))?;
            ns_addr_add(ns, dev, IpAddr::V4(v4))?;
            ns_addr_add(ns, dev, IpAddr::V6(v6))?;
            run(ip_command().args(["-n", ns, "link", "set", dev, "up"]))?;
        }
        fs::create_dir(&self.cgroup)
            .with_context(|| format!("could not create cgroup {}", self.cgroup.display()))?;
        Ok(())
    }

    /// The unique id `<pid>-<counter>` in this sandbox's names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the client network namespace (`svclb-<id>-c`).
    pub fn client_netns(&self) -> &str {
        &self.client_ns
    }

    /// Name of the backends network namespace (`svclb-<id>-b`).
    pub fn backends_netns(&self) -> &str {
        &self.backends_ns
    }

    /// Path of the client namespace's bind mount (/run/netns/<name>).
    pub fn client_netns_path(&self) -> PathBuf {
        netns::netns_path(&self.client_ns)
    }

    /// Path of the backends namespace's bind mount (/run/netns/<name>).
    pub fn backends_netns_path(&self) -> PathBuf {
        netns::netns_path(&self.backends_ns)
    }

    /// The sandbox cgroup directory (`<cgroup2 mount>/svclb-<id>`), where the connect4 program attaches.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup2 mount point the sandbox cgroup lives under.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Adds a task address (inside 172.50.0.0/24 or fd00:50::/64) to the backends veth, reachable on-link from the client.
    pub fn add_backend_addr(&self, ip: IpAddr) -> Result<()> {
        if !in_sandbox_subnet(ip) {
            bail!("{ip} is outside the sandbox subnets 172.50.0.0/24 and fd00:50::/64");
        }
        ns_addr_add(&self.backends_ns, BACKENDS_VETH, ip)
            .with_context(|| format!("could not add backend address {ip}"))
    }

    /// Moves this whole process into the sandbox cgroup; the guard moves it back on drop.
    pub fn enter_cgroup(&self) -> Result<CgroupGuard> {
        CgroupGuard::enter(&self.cgroup)
    }

    /// Runs `f` on a fresh thread inside the client netns and returns its value (re-raising its panic).
    ///
    /// Panics if the thread cannot enter the namespace; see [`Sandbox::try_in_client`].
    pub fn in_client<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        self.try_in_client(f)
            .unwrap_or_else(|e| panic!("in_client: {e:#}"))
    }

    /// Runs `f` on a fresh thread inside the backends netns and returns its value (re-raising its panic).
    ///
    /// Panics if the thread cannot enter the namespace; see [`Sandbox::try_in_backends`].
    pub fn in_backends<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        self.try_in_backends(f)
            .unwrap_or_else(|e| panic!("in_backends: {e:#}"))
    }

    /// Like [`Sandbox::in_client`], but reports a failure to enter the namespace as an error.
    pub fn try_in_client<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        netns::in_netns(&self.client_ns, f)
    }

    /// Like [`Sandbox::in_backends`], but reports a failure to enter the namespace as an error.
    pub fn try_in_backends<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        netns::in_netns(&self.backends_ns, f)
    }

    /// Spawns a long-running thread inside the client netns (threads it spawns stay there too).
    pub fn spawn_in_client<F: FnOnce() + Send + 'static>(
        &self,
        thread_name: &str,
        f: F,
    ) -> Result<JoinHandle<()>> {
        netns::spawn_in_netns(&self.client_ns, thread_name, f)
    }

    /// Spawns a long-running thread inside the backends netns (threads it spawns stay there too).
    pub fn spawn_in_backends<F: FnOnce() + Send + 'static>(
        &self,
        thread_name: &str,
        f: F,
    ) -> Result<JoinHandle<()>> {
        netns::spawn_in_netns(&self.backends_ns, thread_name, f)
    }

    /// Makes `cmd`'s child run in the client netns and, if `join_cgroup`, in the sandbox cgroup.
    pub fn client_command(&self, cmd: &mut Command, join_cgroup: bool) -> Result<()> {
        self.configure_command(&self.client_ns, cmd, join_cgroup)
    }

    /// Makes `cmd`'s child run in the backends netns and, if `join_cgroup`, in the sandbox cgroup.
    pub fn backends_command(&self, cmd: &mut Command, join_cgroup: bool) -> Result<()> {
        self.configure_command(&self.backends_ns, cmd, join_cgroup)
    }

    fn configure_command(&self, ns_name: &str, cmd: &mut Command, join_cgroup: bool) -> Result<()> {
        // Both files are opened here, before fork; they are O_CLOEXEC so the program never sees them.
        let ns: File = netns::open_netns(ns_name)?;
        let procs: Option<File> = if join_cgroup {
            let path = self.cgroup.join("cgroup.procs");
            Some(
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("could not open {}", path.display()))?,
            )
        } else {
            None
        };
        let pre_exec = move || -> io::Result<()> {
            // Only raw syscalls here: this runs in the forked child before exec.
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                // SAFETY: valid fd and a 1-byte static buffer.
                let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
                if n != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: valid fd; the child is single-threaded.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only performs async-signal-safe syscalls (write, setns).
        unsafe {
            cmd.pre_exec(pre_exec);
        }
        Ok(())
    }

    fn teardown(&self) {
        if self.cgroup.exists() {
            if let Err(e) = cgroup::remove_cgroup(&self.cgroup, &self.cgroup_root) {
                warn(format_args!("sandbox {}: {e:#}", self.id));
            }
        }
        for ns in [&self.client_ns, &self.backends_ns] {
            if netns::netns_exists(ns) {
                if let Err(e) = run(ip_command().args(["netns", "del", ns])) {
                    warn(format_args!("sandbox {}: {e:#}", self.id));
                }
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `ip -n NS addr add IP/PREFIX dev DEV [nodad]`.
fn ns_addr_add(ns: &str, dev: &str, ip: IpAddr) -> Result<()> {
    let mut cmd = ip_command();
    cmd.args(["-n", ns, "addr", "add"]);
    match ip {
        IpAddr::V4(_) => cmd.arg(format!("{ip}/{V4_PREFIX_LEN}")).args(["dev", dev]),
        IpAddr::V6(_) => cmd
            .arg(format!("{ip}/{V6_PREFIX_LEN}"))
            .args(["dev", dev, "nodad"]),
    };
    run(&mut cmd).map(drop)
}

/// The pid in a harness name `svclb-<pid>-...`, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether `name` belongs to a process that no longer exists.
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes namespaces and cgroups left behind by harness processes that died without cleaning up.
fn sweep_stale(cgroup_root: &Path) {
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                if let Err(e) = run(ip_command().args(["netns", "del", &name])) {
                    warn(format_args!(
                        "could not remove stale namespace {name}: {e:#}"
                    ));
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(cgroup_root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) && entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if let Err(e) = cgroup::remove_cgroup(&entry.path(), cgroup_root) {
                    warn(format_args!("could not remove stale cgroup {name}: {e:#}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_harness_names() {
        assert_eq!(owner_pid("svclb-123-4-c"), Some(123));
        assert_eq!(owner_pid("svclb-123-4"), Some(123));
        assert_eq!(owner_pid("svclb-123"), None);
        assert_eq!(owner_pid("svclb-abc-1"), None);
        assert_eq!(owner_pid("other-123-1"), None);
    }

    #[test]
    fn sandbox_subnets() {
        assert!(in_sandbox_subnet("172.50.0.40".parse().unwrap()));
        assert!(in_sandbox_subnet("fd00:50::40".parse().unwrap()));
        assert!(!in_sandbox_subnet("172.50.1.1".parse().unwrap()));
        assert!(!in_sandbox_subnet("8.8.8.8".parse().unwrap()));
        assert!(!in_sandbox_subnet("fd00:51::1".parse().unwrap()));
    }
}
