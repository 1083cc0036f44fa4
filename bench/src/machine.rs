//! What the figures were measured on, and reading a pinned map's kernel
//! memory (`memlock` in its fdinfo).

use std::ffi::CString;
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub os: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub virtualization: String,
    pub svclb_commit: String,
    pub rustc: String,
    pub iptables_nft: String,
    pub iptables_legacy: String,
    pub nft: String,
    pub haproxy: String,
    pub perf: String,
}

fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => "not found".into(),
    }
}

fn file_field(path: &str, key: &str) -> Option<String> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once([':', '='])?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Whether hardware counters work (`perf stat -e instructions true`).
fn perf_status() -> String {
    match Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions", "true"])
        .output()
    {
        Err(_) => "perf not installed".into(),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("not supported") || !out.status.success() {
                "perf installed; hardware counters not supported here (cycles/instructions unavailable)"
                    .into()
            } else {
                "perf installed; hardware counters available".into()
            }
        }
    }
}

pub fn describe() -> Machine {
    let mem_kib: f64 = file_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Machine {
        os: file_field("/etc/os-release", "PRETTY_NAME").unwrap_or_default(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpu: file_field("/proc/cpuinfo", "model name").unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        virtualization: first_line("systemd-detect-virt", &[]),
        svclb_commit: if dirty {
            format!("{commit} (+ uncommitted changes)")
        } else {
            commit
        },
        rustc: first_line("rustc", &["--version"]),
        iptables_nft: first_line("iptables-nft", &["--version"]),
        iptables_legacy: first_line("iptables-legacy", &["--version"]),
        nft: first_line("nft", &["--version"]),
        haproxy: first_line("haproxy", &["-v"]),
        perf: perf_status(),
    }
}

/// One BPF map's kernel memory, from its fdinfo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapMemory {
    pub name: String,
    pub map_type: u32,
    pub max_entries: u64,
    pub memlock: u64,
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Opens a pinned BPF object (BPF_OBJ_GET).
fn bpf_obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_OBJ_GET {}", path.display()));
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The memory of every map pinned directly in `pin_dir` (links and
/// programs are skipped).
pub fn pinned_map_memory(pin_dir: &Path) -> Result<Vec<MapMemory>> {
    use std::os::fd::AsRawFd;
    let mut maps = Vec::new();
    let entries =
        fs::read_dir(pin_dir).with_context(|| format!("listing {}", pin_dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(true) {
            continue;
        }
        let Ok(fd) = bpf_obj_get(&entry.path()) else {
            continue;
        };
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
        let field = |k: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
        };
        let (Some(map_type), Some(memlock)) = (field("map_type:"), field("memlock:")) else {
            continue;
        };
        maps.push(MapMemory {
            name: entry.file_name().to_string_lossy().into_owned(),
            map_type: map_type as u32,
            max_entries: field("max_entries:").unwrap_or(0),
            memlock,
        });
    }
    if maps.is_empty() {
        bail!("no pinned map found in {}", pin_dir.display());
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}
