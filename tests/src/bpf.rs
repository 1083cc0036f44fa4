//! Raw bpf(2) calls the tests use to check svclb from outside: pinning a
//! map of a chosen layout (to test that svclb refuses foreign pins) and
//! counting the programs attached to a cgroup (to test that an upgrade
//! leaves exactly one link per program) and naming them.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_CGROUP_INET_INGRESS`, `BPF_CGROUP_INET_EGRESS`: the packet counters.
pub const ATTACH_INET_INGRESS: u32 = 0;
pub const ATTACH_INET_EGRESS: u32 = 1;
/// `BPF_CGROUP_INET4_CONNECT`: where svclb's connect4 program attaches.
pub const ATTACH_INET4_CONNECT: u32 = 10;

/// Big enough for every command used here; the kernel wants the unused
/// tail zeroed.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: attr points to 128 valid bytes, laid out as the command expects.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, 128usize) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Creates a map (`map_type`, key/value sizes, capacity, object name) and
/// pins it at `path`.
pub fn create_pinned_map(
    path: &Path,
    name: &str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map_type);
    attr.put_u32(4, key_size);
    attr.put_u32(8, value_size);
    attr.put_u32(12, max_entries);
    // map_name[16] at offset 28 (after map_flags, inner_map_fd, numa_node).
    let name = name.as_bytes();
    let n = name.len().min(15);
    attr.0[28..28 + n].copy_from_slice(&name[..n]);
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?;
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Attr::new();
    attr.put_u64(0, c_path.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// How many programs are attached to the cgroup at `dir` for `attach_type`
/// (attached there directly, not inherited).
pub fn cgroup_prog_count(dir: &Path, attach_type: u32) -> Result<u32> {
    let cgroup = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, attach_type);
    // query_flags 0, attach_flags out, prog_ids NULL, prog_cnt in/out at 24.
    bpf(BPF_PROG_QUERY, &mut attr)
        .with_context(|| format!("BPF_PROG_QUERY on {}", dir.display()))?;
    Ok(attr.u32_at(24))
}

/// The names of the programs attached to the cgroup at `dir` for
/// `attach_type` (attached there directly).
pub fn cgroup_prog_names(dir: &Path, attach_type: u32) -> Result<Vec<String>> {
    let cgroup = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut ids = [0u32; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, cgroup.as_raw_fd() as u32);
    attr.put_u32(4, attach_type);
    attr.put_u64(16, ids.as_mut_ptr() as u64);
    attr.put_u32(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr)
        .with_context(|| format!("BPF_PROG_QUERY on {}", dir.display()))?;
    let count = attr.u32_at(24) as usize;
    let mut names = Vec::new();
    for &id in &ids[..count.min(ids.len())] {
        let mut attr = Attr::new();
        attr.put_u32(0, id);
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).context("BPF_PROG_GET_FD_BY_ID")?;
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_prog_info up to name[16] at offset 64.
        let mut info = [0u8; 80];
        let mut attr = Attr::new();
        attr.put_u32(0, fd.as_raw_fd() as u32);
        attr.put_u32(4, info.len() as u32);
        attr.put_u64(8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        let name = &info[64..80];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        names.push(String::from_utf8_lossy(&name[..end]).into_owned());
    }
    Ok(names)
}
