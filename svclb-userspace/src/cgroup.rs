//! cgroup v2: where it is mounted, and how a cgroup is named in the pin
//! directory.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// The cgroup2 mount point, from /proc/self/mounts. Hybrid hosts mount it
/// at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
        })
        .next()
        .context("no cgroup2 filesystem is mounted (svclb needs cgroup v2: mount -t cgroup2 none /sys/fs/cgroup)")
}

/// /proc/self/mounts escapes spaces and the like as octal.
fn unescape_mount_field(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A cgroup v2 directory, given either as an absolute path under the
/// cgroup2 mount or relative to it (`system.slice/docker-ID.scope`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupPath {
    /// Path relative to the cgroup2 mount; empty for the root cgroup.
    pub relative: PathBuf,
    pub absolute: PathBuf,
}

impl CgroupPath {
    pub fn resolve(given: &Path) -> Result<Self> {
        let mount = cgroup2_mount()?;
        let absolute = if given.is_absolute() {
            given.to_path_buf()
        } else {
            mount.join(given)
        };
        let absolute = absolute
            .canonicalize()
            .with_context(|| format!("cgroup {} does not exist", absolute.display()))?;
        let Ok(relative) = absolute.strip_prefix(&mount) else {
            bail!(
                "{} is not under the cgroup2 mount {} (svclb attaches only to cgroup v2)",
                absolute.display(),
                mount.display()
            );
        };
        if !absolute.join("cgroup.procs").exists() {
            bail!(
                "{} is not a cgroup directory (no cgroup.procs)",
                absolute.display()
            );
        }
        Ok(CgroupPath {
            relative: relative.to_path_buf(),
            absolute,
        })
    }

    /// The cgroup's pin directory name: its relative path, escaped so that
    /// it is one path component.
    pub fn pin_name(&self) -> String {
        escape(&self.relative.to_string_lossy())
    }

    /// The kernel's id of this cgroup (its inode on cgroup2), the one
    /// bpf_get_current_cgroup_id() returns.
    pub fn id(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(&self.absolute)
            .with_context(|| format!("reading {}", self.absolute.display()))?
            .ino())
    }

    /// The cgroup a process is in, from /proc/PID/cgroup's `0::` line.
    pub fn of_pid(pid: u32) -> Result<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .with_context(|| format!("reading /proc/{pid}/cgroup (is process {pid} running?)"))?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .with_context(|| format!("process {pid} has no cgroup v2 membership"))?;
        Self::resolve(Path::new(rel.trim_start_matches('/')))
    }
}

/// Escapes a relative cgroup path into one bpffs file name: `%`, `/` and
/// `.` (which bpffs refuses in names) become `%25`, `%2F` and `%2E`; the
/// root cgroup (empty path) is `%`.
pub fn escape(relative: &str) -> String {
    if relative.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(relative.len());
    for c in relative.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '.' => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`escape`].
pub fn unescape(name: &str) -> String {
    if name == "%" {
        return String::new();
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).unwrap_or("");
        match code {
            "25" => out.push('%'),
            "2F" => out.push('/'),
            "2E" => out.push('.'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        for p in ["", "a", "system.slice/docker-ab%12.scope", "x/y/z"] {
            let e = escape(p);
            assert!(!e.contains('/') && !e.contains('.'), "{e}");
            assert_eq!(unescape(&e), p);
        }
    }

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field(r"/a\040b"), "/a b");
    }
}
