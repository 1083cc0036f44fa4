//! Pinning threads to CPUs, for the load generator's and the echo servers'
//! threads; and a process's own CPU time, for svclbd's cost.

use anyhow::{bail, Context, Result};

/// A process's user + system CPU time so far, in clock ticks
/// (`/proc/PID/stat`'s utime + stime).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold blanks: count fields after its ')'.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime) = (fields.get(11), fields.get(12));
    match (utime, stime) {
        (Some(u), Some(s)) => Ok(u.parse::<u64>()? + s.parse::<u64>()?),
        _ => bail!("short /proc/{pid}/stat"),
    }
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Measures a process's CPU while `f` runs, as percent of one CPU.
pub struct CpuWindow {
    pid: u32,
    ticks: u64,
    started: std::time::Instant,
}

impl CpuWindow {
    pub fn start(pid: u32) -> Result<CpuWindow> {
        Ok(CpuWindow {
            pid,
            ticks: cpu_ticks(pid)?,
            started: std::time::Instant::now(),
        })
    }

    /// Percent of one CPU since `start`.
    pub fn percent(&self) -> Result<f64> {
        let ticks = cpu_ticks(self.pid)? - self.ticks;
        let secs = self.started.elapsed().as_secs_f64();
        Ok(ticks as f64 / ticks_per_sec() / secs * 100.0)
    }
}

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
