//! A real DNS server for discovery tests: dnsmasq, started inside the
//! sandbox's backends netns on a sandbox address, answering only from a
//! hosts file that the test rewrites (then SIGHUP reloads it).
//!
//! It never forwards (`--no-resolv`, no `--server`), reads no system config
//! (`--conf-file=/dev/null`, `--no-hosts`), answers NXDOMAIN for every
//! name it does not hold (`--local=/#/`), and keeps its pid file and log
//! in a temp directory of its own. It is never a system service.

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sandbox::Sandbox;

/// Where dnsmasq is installed by `cargo xtask setup`.
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A running dnsmasq; killed on drop.
pub struct Dnsmasq {
    child: Option<Child>,
    dir: PathBuf,
    hosts: PathBuf,
    addr: IpAddr,
    netns: String,
}

impl Dnsmasq {
    /// Adds `addr` to the backends side of `sandbox`, starts dnsmasq there
    /// with `hosts` (hosts-file lines) and answers' TTL `ttl` seconds, and
    /// waits until it answers.
    pub fn start(sandbox: &Sandbox, addr: IpAddr, ttl: u32, hosts: &str) -> Result<Dnsmasq> {
        if !Path::new(DNSMASQ).exists() {
            bail!("{DNSMASQ} is missing: the DNS discovery tests need dnsmasq; run `cargo xtask setup` (Debian package dnsmasq)");
        }
        sandbox.add_backend_addr(addr)?;
        let dir = std::env::temp_dir().join(format!(
            "svclb-dnsmasq-{}-{}",
            std::process::id(),
            crate::daemon::unique()
        ));
        fs::create_dir_all(&dir)?;
        let hosts_path = dir.join("hosts");
        fs::write(&hosts_path, hosts)?;
        let mut cmd = Command::new(DNSMASQ);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--local=/#/",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--group=root",
            "--log-queries",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg(format!("--addn-hosts={}", hosts_path.display()))
        .arg(format!("--local-ttl={ttl}"))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("log"))?)
        .stderr(fs::File::create(dir.join("log"))?);
        sandbox.backends_command(&mut cmd, false)?;
        let child = cmd.spawn().context("starting dnsmasq")?;
        let mut server = Dnsmasq {
            child: Some(child),
            dir,
            hosts: hosts_path,
            addr,
            netns: sandbox.backends_netns().to_owned(),
        };
        server.wait_ready()?;
        Ok(server)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// dnsmasq's own log (it logs every query).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Replaces the hosts file (atomically) and makes dnsmasq reload it.
    pub fn set_hosts(&self, hosts: &str) -> Result<()> {
        let tmp = self.dir.join("hosts.new");
        fs::write(&tmp, hosts)?;
        fs::rename(&tmp, &self.hosts)?;
        let reloaded = format!("read {} ", self.hosts.display());
        let before = self.log_text().matches(&reloaded).count();
        let pid = self.child.as_ref().context("dnsmasq was stopped")?.id();
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGHUP to dnsmasq");
        }
        // dnsmasq logs the reload; wait for it so the caller's clock starts
        // when the new answers are served.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.log_text().matches(&reloaded).count() <= before {
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq did not reload its hosts file:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Kills dnsmasq: the server is gone, queries time out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = SocketAddr::new(self.addr, 53);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("dnsmasq exited with {status}:\n{}", self.log_text());
            }
            let answered = crate::netns::in_netns(&self.netns, || probe(server))?;
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not answer within 10 s:\n{}", self.log_text());
            }
        }
    }
}

/// Sends one A query for `probe.` and waits 200 ms for any answer.
fn probe(server: SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(b"\x05probe\x00\x00\x01\x00\x01");
    if socket.send_to(&query, server).is_err() {
        std::thread::sleep(Duration::from_millis(100));
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(socket.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x12, 0x34])
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
