//! Running the real `svclbd` and `svclb-ctl` binaries from tests, the demo
//! and the benchmark, each against its own pin directory.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static NEXT_PIN: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process, for temp names.
pub fn unique() -> u32 {
    NEXT_PIN.fetch_add(1, Ordering::Relaxed)
}

/// Where the built binaries are: `$SVCLB_BIN_DIR`, else the directory above
/// the running test executable (`target/debug/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SVCLB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of one of svclb's binaries; fails loudly when it is not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo xtask build` (or `cargo xtask test`), or set SVCLB_BIN_DIR",
        path.display()
    );
    path
}

/// A unique pin directory under /sys/fs/bpf; everything in it is torn down on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        let n = NEXT_PIN.fetch_add(1, Ordering::Relaxed);
        let pins = PinDir {
            path: PathBuf::from(format!("/sys/fs/bpf/svclb-test-{}-{n}", std::process::id())),
        };
        // A directory left by an earlier run whose pid this process now has
        // would be adopted with its counters and gauges: start clean.
        if pins.path.exists() {
            if let Err(e) = ctl(&pins.path, &["teardown"]) {
                eprintln!(
                    "svclb-tests: teardown of leftover {} failed: {e:#}",
                    pins.path.display()
                );
            }
        }
        pins
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `svclb-ctl --pin-dir <this> ARGS`, returning stdout or an error with stderr.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        ctl(&self.path, args)
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists() {
            if let Err(e) = ctl(&self.path, &["teardown"]) {
                eprintln!(
                    "svclb-tests: teardown of {} failed: {e:#}",
                    self.path.display()
                );
                let _ = fs::remove_dir_all(&self.path);
            }
        }
    }
}

/// Runs `svclb-ctl --pin-dir PIN ARGS`.
pub fn ctl(pin_dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin("svclb-ctl"))
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .context("running svclb-ctl")?;
    if !out.status.success() {
        bail!(
            "svclb-ctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How long [`Svclbd::start`] waits for svclbd to say READY=1.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running svclbd; killed on drop (the pins stay until the [`PinDir`] drops).
#[derive(Debug)]
pub struct Svclbd {
    child: Child,
    log: PathBuf,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Svclbd {
    /// Starts svclbd with `args` plus `--pin-dir`, and waits until it says
    /// READY=1 over the sd_notify socket (or fails with its log).
    pub fn start(pin_dir: &PinDir, args: &[&str]) -> Result<Svclbd> {
        Self::start_with(pin_dir, args, |_| Ok(()))
    }

    /// Like [`Svclbd::start`], letting `configure` adjust the command first,
    /// e.g. `|cmd| sandbox.client_command(cmd, false)` to run svclbd in the
    /// client netns (where it can reach a DNS server in the sandbox).
    pub fn start_with(
        pin_dir: &PinDir,
        args: &[&str],
        configure: impl FnOnce(&mut Command) -> Result<()>,
    ) -> Result<Svclbd> {
        Self::start_within(pin_dir, args, READY_WITHIN, configure)
    }

    /// Like [`Svclbd::start_with`], waiting up to `ready_within` for READY=1:
    /// a large data plane (the bench's 100,000 services) takes tens of
    /// seconds to load, apply and attach.
    pub fn start_within(
        pin_dir: &PinDir,
        args: &[&str],
        ready_within: Duration,
        configure: impl FnOnce(&mut Command) -> Result<()>,
    ) -> Result<Svclbd> {
        let id = NEXT_PIN.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{id}", std::process::id());
        let log = std::env::temp_dir().join(format!("svclbd-{tag}.log"));
        let notify_path = std::env::temp_dir().join(format!("svclbd-{tag}.notify"));
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).context("binding the notify socket")?;
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        // Each svclbd gets a metrics port of its own, so that daemons of
        // concurrent runs (tests, bench) never collide on the default one.
        let metrics_addr = if args
            .iter()
            .any(|a| *a == "--metrics-addr" || *a == "--no-metrics")
        {
            None
        } else {
            let probe =
                std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
            Some(probe.local_addr()?)
        };
        let mut cmd = Command::new(bin("svclbd"));
        cmd.arg("--pin-dir").arg(pin_dir.path());
        if let Some(addr) = metrics_addr {
            cmd.arg("--metrics-addr").arg(addr.to_string());
        }
        cmd.args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("SVCLB_LOG", "debug")
            // Every apply checks the snapshot it carries forward against
            // the maps, and aborts svclbd if they differ.
            .env("SVCLB_VERIFY_SNAPSHOTS", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?);
        configure(&mut cmd)?;
        let child = cmd.spawn().context("starting svclbd")?;
        let mut daemon = Svclbd {
            child,
            log,
            metrics_addr,
        };
        let deadline = Instant::now() + ready_within;
        let mut buf = [0u8; 256];
        let result = loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if buf[..n].windows(7).any(|w| w == b"READY=1") {
                    break Ok(());
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "svclbd exited with {status} before it was ready:\n{}",
                    daemon.log_text()
                ));
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "svclbd was not ready within {ready_within:?}:\n{}",
                    daemon.log_text()
                ));
            }
        };
        let _ = fs::remove_file(&notify_path);
        result.map(|()| daemon)
    }

    /// The value of one series of its /metrics, named with its labels as
    /// exposed (`svclb_faults_total{kind="apply_failed"}`); None when not
    /// served or absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = crate::http::get(self.metrics_addr?, "/metrics").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Where this svclbd serves /metrics (chosen by [`Svclbd::start`]).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (e.g. libc::SIGHUP) to svclbd.
    pub fn signal(&self, signal: i32) -> Result<()> {
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill(svclbd)");
        }
        Ok(())
    }

    /// SIGKILL, then waits: svclbd gets no chance to clean anything up.
    pub fn kill(mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGKILL)?;
        Ok(self.child.wait()?)
    }

    /// Waits until svclbd's log contains `needle`, up to `within`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !self.log_text().contains(needle) {
            if Instant::now() > deadline {
                bail!(
                    "svclbd did not log {needle:?} within {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "svclbd did not exit within 10 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Svclbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

/// One row of `svclb-ctl stats --exact`, parsed the way a script parses ipvsadm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsRow {
    /// `FWM  317` for a service, `172.50.0.40:0` for a backend.
    pub name: String,
    pub is_backend: bool,
    pub conns: u64,
    pub in_pkts: u64,
    pub out_pkts: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Parses ipvsadm's `-L -n --stats --exact` layout.
pub fn parse_stats(text: &str) -> Result<Vec<StatsRow>> {
    let mut rows = Vec::new();
    for line in text.lines().skip(3) {
        let is_backend = line.starts_with("  -> ");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (name, numbers) = if is_backend {
            (
                fields.get(1).copied().unwrap_or_default().to_string(),
                &fields[2.min(fields.len())..],
            )
        } else {
            (
                format!("FWM  {}", fields.get(1).copied().unwrap_or_default()),
                &fields[2.min(fields.len())..],
            )
        };
        let n: Vec<u64> = numbers
            .iter()
            .map(|s| {
                s.parse::<u64>()
                    .with_context(|| format!("bad number {s:?} in {line:?}"))
            })
            .collect::<Result<_>>()?;
        if n.len() != 5 {
            bail!("expected 5 counters in {line:?}");
        }
        rows.push(StatsRow {
            name,
            is_backend,
            conns: n[0],
            in_pkts: n[1],
            out_pkts: n[2],
            in_bytes: n[3],
            out_bytes: n[4],
        });
    }
    Ok(rows)
}

/// Writes `text` to a fresh file in the temp dir and returns its path.
pub fn write_temp(name: &str, text: &str) -> Result<PathBuf> {
    let n = NEXT_PIN.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("svclb-{}-{n}-{name}", std::process::id()));
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
