//! The pin directory: maps at `<dir>/<map name>`, links at
//! `<dir>/links/<escaped cgroup path>/<program name>`.
//!
//! Everything that must outlive svclbd lives here, so a restart or an
//! upgrade finds the data plane as it was and nothing stops balancing.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use svclb_common::map_names;

/// bpffs's magic number, as statfs(2) reports it.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Whether any svclb map is pinned here.
    pub fn has_maps(&self) -> bool {
        map_names::ALL.iter().any(|name| self.map(name).exists())
    }

    /// Whether the pin directory's parent is (still) a bpffs.
    pub fn is_on_bpffs(&self) -> bool {
        self.root
            .parent()
            .is_some_and(|p| is_bpffs(p).unwrap_or(false))
    }

    /// Makes sure the directory exists on a bpffs, mounting bpffs at
    /// /sys/fs/bpf when the directory is meant to be there and it is missing.
    pub fn prepare(&self) -> Result<()> {
        let parent = self
            .root
            .parent()
            .with_context(|| format!("pin directory {} has no parent", self.root.display()))?;
        if !is_bpffs(parent)? {
            if parent == Path::new("/sys/fs/bpf") {
                mount_bpffs(parent)?;
            } else {
                bail!(
                    "{} is not on a bpf filesystem; mount one (mount -t bpf bpf {}) or choose a pin directory under /sys/fs/bpf",
                    parent.display(),
                    parent.display()
                );
            }
        }
        private_dir(&self.root)?;
        private_dir(&self.links())
    }

    /// Removes the pin directory if nothing is pinned in it: what
    /// [`PinDir::prepare`] made for a start that then failed.
    pub fn remove_if_empty(&self) {
        let _ = fs::remove_dir(self.links());
        let _ = fs::remove_dir(&self.root);
    }
}

/// Creates `dir` (and its missing parents) readable by root only, and makes
/// an existing one so: the pins are the data plane, and only root may touch
/// or read them (the pins themselves are created 0600 by the kernel).
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))
}

/// The one svclbd of a pin directory: an exclusive flock on the directory
/// itself, held for the process's life and released by the kernel however
/// it ends (SIGKILL included). Two daemons writing the same maps from two
/// desired states would undo each other's writes.
#[derive(Debug)]
pub struct DaemonLock {
    _dir: fs::File,
}

/// How long `--replace` waits for the svclbd it asked to stop.
const REPLACE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

impl PinDir {
    /// Takes the pin directory's daemon lock. Held by another svclbd: an
    /// error naming its pid, or with `replace`, that svclbd is asked to stop
    /// (SIGTERM; the pinned data plane keeps balancing meanwhile) and the
    /// lock is taken once it has.
    pub fn lock_for_daemon(&self, replace: bool) -> Result<DaemonLock> {
        let dir = fs::File::open(&self.root)
            .with_context(|| format!("opening pin directory {}", self.root.display()))?;
        if try_flock(&dir)? {
            return Ok(DaemonLock { _dir: dir });
        }
        let holder = lock_holder(&dir);
        let who = holder.map_or("another svclbd".to_string(), |pid| {
            format!("svclbd pid {pid}")
        });
        if !replace {
            bail!(
                "{who} already runs on pin directory {}: stop it first, or start this one with --replace to take over from it (an upgrade)",
                self.root.display()
            );
        }
        if let Some(pid) = holder {
            tracing::info!(pid, "asking the running svclbd to stop (--replace)");
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + REPLACE_WITHIN;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            if try_flock(&dir)? {
                return Ok(DaemonLock { _dir: dir });
            }
        }
        bail!(
            "{who} on pin directory {} did not stop within {REPLACE_WITHIN:?} of SIGTERM (--replace)",
            self.root.display()
        )
    }
}

fn try_flock(file: &fs::File) -> Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd this function borrows.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err).context("locking the pin directory")
}

/// The pid holding a flock on `file`, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF`).
fn lock_holder(file: &fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::NotFound {
            return Ok(false);
        }
        return Err(err).with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes())?;
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {} (needs root)", at.display()));
    }
    tracing::info!(path = %at.display(), "mounted bpffs");
    Ok(())
}
