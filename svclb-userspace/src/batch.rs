//! Reading a whole map in a few syscalls (BPF_MAP_LOOKUP_BATCH, kernel
//! 5.6), which aya 0.14 does not expose: at 100,000 services a snapshot or
//! a scrape would otherwise make one or two syscalls per entry (hundreds of
//! thousands), which is what kept svclbd busy while idle.
//!
//! A kernel without batch operations (EINVAL/ENOTSUPP on the first call)
//! gets `None`, and the caller falls back to iterating.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash or array map whose values are `V`; for an
/// array, only its first `limit` entries when given. `None`: this kernel
/// has no batch lookups for the map.
pub fn read_all<K: Pod + Default, V: Pod>(
    fd: BorrowedFd<'_>,
    limit: Option<usize>,
) -> io::Result<Option<Vec<(K, V)>>> {
    read_all_telling(fd, limit, 0, &|_| {})
}

/// [`read_all`] with room for `expected` entries made first (growing a
/// vector of a hundred thousand entries copies and page-faults it again at
/// each doubling), telling `progress` how many entries it has after each
/// batch.
pub fn read_all_telling<K: Pod + Default, V: Pod>(
    fd: BorrowedFd<'_>,
    limit: Option<usize>,
    expected: usize,
    progress: &dyn Fn(usize),
) -> io::Result<Option<Vec<(K, V)>>> {
    let mut out = Vec::with_capacity(expected);
    let limit = limit.unwrap_or(usize::MAX);
    let supported = for_each_until(
        fd,
        size_of::<V>(),
        &|done| {
            progress(done);
            limit
        },
        |k: K, bytes| {
            out.push((k, unsafe {
                std::ptr::read_unaligned(bytes.as_ptr().cast::<V>())
            }));
        },
    )?;
    Ok(supported.then_some(out))
}

/// The first `out.len()` entries of a per-CPU array whose values are `V`,
/// each summed over the CPUs with `add` into `out[key]`: no allocation per
/// entry, so that a caller reading the same array every few seconds can
/// keep `out`. False: this kernel has no batch lookups for the map.
pub fn sum_per_cpu_array_into<V: Pod + Default>(
    fd: BorrowedFd<'_>,
    out: &mut [V],
    add: impl Fn(&mut V, &V),
) -> io::Result<bool> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // The kernel lays each CPU's value out at an 8-byte stride.
    let stride = size_of::<V>().div_ceil(8) * 8;
    let limit = out.len();
    for_each(fd, stride * cpus, Some(limit), |k: u32, bytes| {
        let Some(total) = out.get_mut(k as usize) else {
            return;
        };
        *total = V::default();
        for cpu in 0..cpus {
            let v = unsafe { std::ptr::read_unaligned(bytes[cpu * stride..].as_ptr().cast::<V>()) };
            add(total, &v);
        }
    })
}

/// The first `out.len()` entries of an array whose values are `V`, into
/// `out[key]`; false as for [`sum_per_cpu_array_into`].
pub fn array_into<V: Pod>(fd: BorrowedFd<'_>, out: &mut [V]) -> io::Result<bool> {
    let limit = out.len();
    for_each(fd, size_of::<V>(), Some(limit), |k: u32, bytes| {
        if let Some(slot) = out.get_mut(k as usize) {
            *slot = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<V>()) };
        }
    })
}

/// The entries of an array from key 0 up to `limit(n)` entries, read while
/// another thread works out how many are wanted: `limit` is asked again
/// before each batch with the entries read so far (it may wait until it
/// knows more). Per-CPU arrays
/// (`per_cpu`) are summed over the CPUs with `add`. `None`: this kernel has
/// no batch lookups for the map.
pub fn array_until<V: Pod + Default>(
    fd: BorrowedFd<'_>,
    per_cpu: bool,
    limit: &dyn Fn(usize) -> usize,
    expected: usize,
    add: impl Fn(&mut V, &V),
) -> io::Result<Option<Vec<V>>> {
    let cpus = if per_cpu {
        aya::util::nr_cpus().map_err(|(_, e)| e)?
    } else {
        1
    };
    let stride = if per_cpu {
        size_of::<V>().div_ceil(8) * 8
    } else {
        size_of::<V>()
    };
    let mut out: Vec<V> = Vec::with_capacity(expected);
    let supported = for_each_until(fd, stride * cpus, limit, |k: u32, bytes| {
        // An array's batches come in key order from 0.
        if k as usize != out.len() {
            return;
        }
        let mut total = V::default();
        for cpu in 0..cpus {
            let v = unsafe { std::ptr::read_unaligned(bytes[cpu * stride..].as_ptr().cast::<V>()) };
            add(&mut total, &v);
        }
        out.push(total);
    })?;
    Ok(supported.then_some(out))
}

/// One `bpf(cmd, attr)` batch syscall: its return value (negative on an
/// error, in errno).
fn batch_syscall(cmd: libc::c_long, attr: &mut BatchAttr) -> libc::c_long {
    // SAFETY: `attr` is the batch member of `union bpf_attr`, its pointers
    // set by the caller to buffers that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    }
}

/// Whether a map's batch lookups are unsupported by this kernel.
fn unsupported(e: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own; EINVAL from kernels before 5.6.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524)
    )
}

/// Calls `f` with each key and its value's bytes (`value_len` of them),
/// stopping after `limit` entries; false if batch lookups are unsupported.
fn for_each<K: Pod + Default>(
    fd: BorrowedFd<'_>,
    value_len: usize,
    limit: Option<usize>,
    f: impl FnMut(K, &[u8]),
) -> io::Result<bool> {
    let limit = limit.unwrap_or(usize::MAX);
    for_each_until(fd, value_len, &|_| limit, f)
}

/// [`for_each`], stopping after `limit(n)` entries, asked before each
/// batch with the `n` read so far.
fn for_each_until<K: Pod + Default>(
    fd: BorrowedFd<'_>,
    value_len: usize,
    limit: &dyn Fn(usize) -> usize,
    mut f: impl FnMut(K, &[u8]),
) -> io::Result<bool> {
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![0u8; value_len * CHUNK];
    // The batch position the kernel hands back: a bucket number for hash
    // maps, a key for arrays (8 bytes hold either for svclb's u32 keys).
    let mut token = [0u64; 1];
    let mut first = true;
    let mut done = 0usize;
    loop {
        let left = limit(done).saturating_sub(done);
        if left == 0 {
            break;
        }
        let ask = CHUNK.min(left);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: ask as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let rc = batch_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(ask);
        for (i, key) in keys.iter().enumerate().take(n) {
            f(*key, &values[i * value_len..(i + 1) * value_len]);
        }
        done += n;
        match err {
            None => {}
            // That was the last batch.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(true),
            Some(e) if first && unsupported(&e) => return Ok(false),
            Some(e) => return Err(e),
        }
        first = false;
    }
    Ok(true)
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i]` -> the `i`th `value_len` bytes of `values` in as few
/// syscalls as the chunk size allows (BPF_MAP_UPDATE_BATCH, kernel 5.6),
/// calling `before_call` ahead of each syscall (the fault-injection point
/// of [`crate::dataplane`]: one per write syscall). Entries are written in
/// order; on an error the ones before it are written. Returns the number
/// of syscalls, or `None` when this kernel has no batch updates for the
/// map and nothing was written.
pub fn update<K: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_len: usize,
    mut before_call: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Option<usize>> {
    debug_assert_eq!(values.len(), keys.len() * value_len);
    let mut calls = 0;
    for (i, chunk) in keys.chunks(CHUNK).enumerate() {
        before_call()?;
        let from = i * CHUNK;
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            values: values[from * value_len..].as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let rc = batch_syscall(BPF_MAP_UPDATE_BATCH, &mut attr);
        calls += 1;
        if rc < 0 {
            let e = io::Error::last_os_error();
            if i == 0 && attr.count == 0 && unsupported(&e) {
                return Ok(None);
            }
            return Err(e.into());
        }
    }
    Ok(Some(calls))
}

/// The bytes of `values`, for [`update`].
pub fn bytes_of<V: Pod>(values: &[V]) -> &[u8] {
    // SAFETY: Pod values are plain bytes.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// The keys of a map whose values are `value_len` bytes (per-CPU: per
/// CPU, at an 8-byte stride); `None` as for [`read_all`].
pub fn keys_of(
    fd: BorrowedFd<'_>,
    value_len: usize,
) -> io::Result<Option<std::collections::HashSet<u32>>> {
    let mut out = std::collections::HashSet::new();
    let supported = for_each(fd, value_len, None, |k: u32, _| {
        out.insert(k);
    })?;
    Ok(supported.then_some(out))
}
