//! The counters-moved flags (`svclb_moved`, one u64 per backend id), mapped
//! into svclbd's memory. The data plane sets a backend's flag after adding
//! to its counters; the rate sampler takes the set ones every 2 s and reads
//! only those backends' counters. Reading every per-CPU counter instead
//! cost a few percent of a core at 200,000 backends with no traffic at all.
//!
//! The map is created with `BPF_F_MMAPABLE`, whose values start at the
//! mapping's first byte at an 8-byte stride.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// The flags of one pinned map, mapped shared and writable.
pub struct MovedFlags {
    base: NonNull<AtomicU64>,
    entries: usize,
    mapped_len: usize,
}

// SAFETY: the mapping is plain shared memory, touched only through atomics.
unsafe impl Send for MovedFlags {}

impl MovedFlags {
    /// Maps the first `entries` flags of the array behind `fd`.
    pub fn map(fd: BorrowedFd<'_>, entries: usize) -> io::Result<MovedFlags> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped_len = (entries * size_of::<u64>()).div_ceil(page).max(1) * page;
        // SAFETY: a new mapping of a map fd; the kernel checks the length
        // against the array and refuses a map without BPF_F_MMAPABLE.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MovedFlags {
            base: NonNull::new(addr.cast()).expect("mmap returned null"),
            entries,
            mapped_len,
        })
    }

    fn flags(&self) -> &[AtomicU64] {
        // SAFETY: `entries` u64s are mapped from `base` for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.entries) }
    }

    /// Clears every set flag of ids below `limit`, calling `f` with each of
    /// those ids. A flag set again after its clear is seen next time.
    pub fn take(&self, limit: usize, mut f: impl FnMut(u32)) {
        let flags = self.flags();
        for (id, flag) in flags[..limit.min(flags.len())].iter().enumerate() {
            // Read before writing: a cleared line stays shared with the
            // CPUs that only check it.
            if flag.load(Ordering::Relaxed) != 0 {
                // Acquire: the counters the data plane wrote before the
                // flag are visible to the read that follows.
                flag.swap(0, Ordering::AcqRel);
                f(id as u32);
            }
        }
    }
}

impl Drop for MovedFlags {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}
