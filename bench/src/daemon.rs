//! Running the real svclbd for the bench. Like the harness's `Svclbd`, but
//! waiting longer for READY: with 100,000 services the start-up (load,
//! apply, attach) takes tens of seconds on this machine kind.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use svclb_tests::{daemon, PinDir};

/// How long svclbd may take to report READY=1.
pub const READY_WITHIN: Duration = Duration::from_secs(180);

/// A running svclbd; killed on drop (its pins stay until the [`PinDir`] drops).
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// `svclbd --pin-dir PINS ARGS`, once it has said READY=1 over sd_notify.
    pub fn start(pins: &PinDir, args: &[&str]) -> Result<Daemon> {
        let tag = format!("{}-{}", std::process::id(), daemon::unique());
        let log = std::env::temp_dir().join(format!("svclb-bench-svclbd-{tag}.log"));
        let notify_path = std::env::temp_dir().join(format!("svclb-bench-svclbd-{tag}.notify"));
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).context("binding the notify socket")?;
        notify.set_read_timeout(Some(Duration::from_millis(50)))?;
        let child = Command::new(daemon::bin("svclbd"))
            .arg("--pin-dir")
            .arg(pins.path())
            .args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting svclbd")?;
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + READY_WITHIN;
        let mut buf = [0u8; 256];
        let result = loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if buf[..n].windows(7).any(|w| w == b"READY=1") {
                    break Ok(());
                }
            }
            if let Some(status) = d.child.try_wait()? {
                break Err(anyhow!(
                    "svclbd exited with {status} before it was ready:\n{}",
                    d.log_text()
                ));
            }
            if Instant::now() > deadline {
                break Err(anyhow!(
                    "svclbd was not ready within {READY_WITHIN:?}:\n{}",
                    d.log_text()
                ));
            }
        };
        let _ = fs::remove_file(&notify_path);
        result.map(|()| d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill(svclbd)");
        }
        Ok(())
    }

    /// SIGTERM, then waits (10 s at most) for it to exit.
    pub fn stop(mut self) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("svclbd did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}
