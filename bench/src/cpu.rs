//! Pinning threads to CPUs, for the load generator's and the echo servers' threads.

/// Pins the calling thread to `cpu` (negative: every CPU).
pub fn pin_thread(cpu: i32) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET/sched_setaffinity take valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 0 {
            libc::CPU_SET(cpu as usize, &mut set);
        } else {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            for c in 0..n.min(libc::CPU_SETSIZE as usize) {
                libc::CPU_SET(c, &mut set);
            }
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
