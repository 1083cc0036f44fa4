//! The load generator behind `svclb-load`: CRR, RR, STREAM and UDP
//! request/response against one or more IPv4 targets, from N threads, for a
//! bounded time and a bounded number of operations.
//!
//! Sockets are made with raw syscalls so that every mode pays exactly the
//! same calls per operation: CRR is socket, 2 x setsockopt (timeouts, which
//! on Linux also bound connect), connect, write 1 byte, read 1 byte, close.
//! It runs inside the client namespace (and, for svclb, its cgroup); it only
//! ever sends to the targets it is given.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hist::Histogram;
use crate::wire::{STREAM_CHUNK, STREAM_REQUEST};

/// Hard cap on operations per thread, whatever the duration.
pub const MAX_OPS_PER_THREAD: u64 = 50_000_000;
/// Pause after a failed operation, so that an error cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// connect, 1-byte request, 1-byte reply, close.
    Crr,
    /// 1-byte ping-pong on an established connection.
    Rr,
    /// Bulk transfer, server to client, one connection per thread.
    Stream,
    /// 1-byte request/response on a connected UDP socket.
    Udp,
}

impl Workload {
    pub const ALL: [Workload; 4] = [Workload::Crr, Workload::Rr, Workload::Stream, Workload::Udp];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Crr => "crr",
            Workload::Rr => "rr",
            Workload::Stream => "stream",
            Workload::Udp => "udp",
        }
    }

    pub fn parse(s: &str) -> Result<Workload> {
        Ok(match s {
            "crr" => Workload::Crr,
            "rr" => Workload::Rr,
            "stream" => Workload::Stream,
            "udp" => Workload::Udp,
            _ => bail!("unknown workload {s:?} (crr, rr, stream, udp)"),
        })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub workload: Workload,
    /// Each connection (or UDP socket) picks one at random.
    pub targets: Vec<SocketAddrV4>,
    pub threads: usize,
    /// Operations before this are not counted.
    pub warmup: Duration,
    /// The measured window after the warm-up.
    pub duration: Duration,
    /// Per-operation timeout (connect, send, receive).
    pub timeout: Duration,
    /// Pin load thread i to `cpus[i % cpus.len()]` (empty: not pinned).
    pub cpus: Vec<usize>,
}

/// What a run measured, printed as JSON by `svclb-load`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub workload: String,
    pub threads: usize,
    /// The measured window, in seconds.
    pub seconds: f64,
    /// Completed operations in the window (STREAM: reads).
    pub ops: u64,
    /// Operations per second (STREAM: 0, see bits_per_sec).
    pub ops_per_sec: f64,
    /// Payload bytes received in the window.
    pub bytes: u64,
    /// Received payload bits per second.
    pub bits_per_sec: f64,
    /// Failed operations in the window, and by kind.
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Operation latency in microseconds (none for STREAM).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub mean_us: Option<f64>,
    pub max_us: Option<f64>,
}

#[derive(Default)]
struct ThreadTally {
    hist: Histogram,
    ops: u64,
    bytes: u64,
    errors: BTreeMap<String, u64>,
}

impl ThreadTally {
    /// A request/response (or connection) that succeeded, started at `t`.
    fn ok(&mut self, t: Instant, now: Instant, counted: bool) {
        if counted {
            self.ops += 1;
            self.bytes += 1;
            self.hist.record((now - t).as_nanos() as u64);
        }
    }

    fn error(&mut self, e: &io::Error, counted: bool) {
        if counted {
            *self.errors.entry(error_kind(e)).or_default() += 1;
        }
        thread::sleep(ERROR_PAUSE);
    }
}

/// A short name for an error, for the `error_kinds` tally.
pub fn error_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) | Some(libc::EINPROGRESS) => "timeout".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    }
}

/// Runs the load and returns the merged result. Stops by itself: after
/// warm-up + duration, or MAX_OPS_PER_THREAD per thread.
pub fn run(spec: &LoadSpec) -> Result<LoadResult> {
    if spec.targets.is_empty() {
        bail!("no target");
    }
    if spec.threads == 0 {
        bail!("threads must be at least 1");
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<ThreadTally> = thread::scope(|s| {
        let handles: Vec<_> = (0..spec.threads)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let cpu = (!spec.cpus.is_empty()).then(|| spec.cpus[i % spec.cpus.len()]);
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn_scoped(s, move || {
                        if let Some(c) = cpu {
                            crate::cpu::pin_thread(c as i32);
                        }
                        let now = Instant::now();
                        if start > now {
                            thread::sleep(start - now);
                        }
                        let window = Window {
                            from: measure_from,
                            end,
                            stop: &stop,
                        };
                        let mut rng = Rng::new(i as u64);
                        match spec.workload {
                            Workload::Crr => crr(spec, &window, &mut rng),
                            Workload::Rr => rr(spec, &window, &mut rng),
                            Workload::Stream => stream(spec, &window, &mut rng),
                            Workload::Udp => udp(spec, &window, &mut rng, i),
                        }
                    })
                    .expect("spawning a load thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread panicked"))
            .collect()
    });
    let mut hist = Histogram::new();
    let mut result = LoadResult {
        workload: spec.workload.name().into(),
        threads: spec.threads,
        seconds: spec.duration.as_secs_f64(),
        ..LoadResult::default()
    };
    for t in &tallies {
        hist.merge(&t.hist);
        result.ops += t.ops;
        result.bytes += t.bytes;
        for (k, v) in &t.errors {
            *result.error_kinds.entry(k.clone()).or_default() += v;
            result.errors += v;
        }
    }
    let secs = spec.duration.as_secs_f64();
    if spec.workload != Workload::Stream {
        result.ops_per_sec = result.ops as f64 / secs;
        let us = |ns: f64| (ns / 100.0).round() / 10.0;
        result.p50_us = hist.quantile(0.50).map(us);
        result.p99_us = hist.quantile(0.99).map(us);
        result.p999_us = hist.quantile(0.999).map(us);
        result.mean_us = hist.mean().map(us);
        result.max_us = (hist.count() > 0).then(|| us(hist.max() as f64));
    }
    result.bits_per_sec = result.bytes as f64 * 8.0 / secs;
    Ok(result)
}

struct Window<'a> {
    from: Instant,
    end: Instant,
    stop: &'a AtomicBool,
}

impl Window<'_> {
    /// Whether the thread must stop (time is up, or another thread gave up).
    fn over(&self, now: Instant, ops: u64) -> bool {
        now >= self.end || ops >= MAX_OPS_PER_THREAD || self.stop.load(Ordering::Relaxed)
    }

    /// Whether an operation that started at `t` and ended at `now` counts.
    fn counts(&self, t: Instant, now: Instant) -> bool {
        t >= self.from && now < self.end
    }
}

/// xorshift64*: picks targets; no need for quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng((t ^ (seed.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

fn pick(spec: &LoadSpec, rng: &mut Rng) -> SocketAddrV4 {
    if spec.targets.len() == 1 {
        spec.targets[0]
    } else {
        spec.targets[rng.below(spec.targets.len())]
    }
}

fn crr(spec: &LoadSpec, w: &Window, rng: &mut Rng) -> ThreadTally {
    let mut tally = ThreadTally::default();
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    loop {
        let t = Instant::now();
        if w.over(t, n) {
            break;
        }
        n += 1;
        let outcome = (|| -> io::Result<()> {
            let fd = socket(libc::SOCK_STREAM, spec.timeout)?;
            connect(&fd, pick(spec, rng))?;
            send_all(&fd, b"c")?;
            recv_exact(&fd, &mut buf)
        })();
        let now = Instant::now();
        match outcome {
            Ok(()) => tally.ok(t, now, w.counts(t, now)),
            Err(e) => tally.error(&e, w.counts(t, now)),
        }
    }
    tally
}

fn tcp_connect(spec: &LoadSpec, rng: &mut Rng) -> io::Result<OwnedFd> {
    let fd = socket(libc::SOCK_STREAM, spec.timeout)?;
    connect(&fd, pick(spec, rng))?;
    set_int(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    Ok(fd)
}

fn rr(spec: &LoadSpec, w: &Window, rng: &mut Rng) -> ThreadTally {
    let mut tally = ThreadTally::default();
    let mut conn: Option<OwnedFd> = None;
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    loop {
        let now = Instant::now();
        if w.over(now, n) {
            break;
        }
        let fd = match &conn {
            Some(fd) => fd,
            None => match tcp_connect(spec, rng) {
                Ok(fd) => conn.insert(fd),
                Err(e) => {
                    tally.error(&e, w.counts(now, Instant::now()));
                    continue;
                }
            },
        };
        n += 1;
        let t = Instant::now();
        let outcome = send_all(fd, b"r").and_then(|()| recv_exact(fd, &mut buf));
        let now = Instant::now();
        match outcome {
            Ok(()) => tally.ok(t, now, w.counts(t, now)),
            Err(e) => {
                conn = None;
                tally.error(&e, w.counts(t, now));
            }
        }
    }
    tally
}

fn stream(spec: &LoadSpec, w: &Window, rng: &mut Rng) -> ThreadTally {
    let mut tally = ThreadTally::default();
    let mut conn: Option<OwnedFd> = None;
    let mut n = 0u64;
    let mut buf = vec![0u8; STREAM_CHUNK];
    loop {
        let now = Instant::now();
        if w.over(now, n) {
            break;
        }
        let fd = match &conn {
            Some(fd) => fd,
            None => match tcp_connect(spec, rng).and_then(|fd| {
                send_all(&fd, &[STREAM_REQUEST])?;
                Ok(fd)
            }) {
                Ok(fd) => conn.insert(fd),
                Err(e) => {
                    tally.error(&e, w.counts(now, Instant::now()));
                    continue;
                }
            },
        };
        n += 1;
        let t = Instant::now();
        let got = recv_some(fd, &mut buf);
        let now = Instant::now();
        match got {
            Ok(0) => {
                conn = None;
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "server closed");
                tally.error(&eof, w.counts(t, now));
            }
            Ok(k) => {
                if w.counts(t, now) {
                    tally.ops += 1;
                    tally.bytes += k as u64;
                }
            }
            Err(e) => {
                conn = None;
                tally.error(&e, w.counts(t, now));
            }
        }
    }
    tally
}

fn udp(spec: &LoadSpec, w: &Window, rng: &mut Rng, thread: usize) -> ThreadTally {
    let mut tally = ThreadTally::default();
    let mut sock: Option<OwnedFd> = None;
    let mut n = 0u64;
    let mut seq = (thread as u8).wrapping_mul(61);
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if w.over(now, n) {
            break;
        }
        let fd = match &sock {
            Some(fd) => fd,
            None => match socket(libc::SOCK_DGRAM, spec.timeout)
                .and_then(|fd| connect(&fd, pick(spec, rng)).map(|()| fd))
            {
                Ok(fd) => sock.insert(fd),
                Err(e) => {
                    tally.error(&e, w.counts(now, Instant::now()));
                    continue;
                }
            },
        };
        n += 1;
        seq = seq.wrapping_add(1);
        let t = Instant::now();
        let outcome = (|| -> io::Result<()> {
            send_all(fd, &[seq])?;
            // A late reply to an earlier, timed-out request is skipped.
            loop {
                let k = recv_some(fd, &mut buf)?;
                if k == 1 && buf[0] == seq {
                    return Ok(());
                }
                if Instant::now() - t > spec.timeout {
                    return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
                }
            }
        })();
        let now = Instant::now();
        match outcome {
            Ok(()) => tally.ok(t, now, w.counts(t, now)),
            Err(e) => {
                // ECONNREFUSED (an ICMP unreachable) sticks to the socket; start afresh.
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    sock = None;
                }
                tally.error(&e, w.counts(t, now));
            }
        }
    }
    tally
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process (and
/// svclbd's), so the bench can compare a child's timestamps with its own.
pub use svclb::rates::monotonic_ns;

/// What `svclb-load probe` prints once it reaches the expected backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeResult {
    /// CLOCK_MONOTONIC ns when the first connect that reached `expect` started.
    pub matched_start_ns: u64,
    /// ... and when it ended.
    pub matched_end_ns: u64,
    /// Connects made before that one.
    pub probes_before: u64,
}

/// Connects to `target` over and over, reading the identity line of the
/// tests' TcpIdServer, until a connect reaches `expect` or `limit` passes.
/// Prints `ready` once the first connect succeeded (whatever it reached).
pub fn probe(target: SocketAddrV4, expect: &str, limit: Duration) -> Result<ProbeResult> {
    use std::io::Write;
    let deadline = Instant::now() + limit;
    let mut probes = 0u64;
    let mut ready = false;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let t0 = monotonic_ns();
        let seen = (|| -> io::Result<String> {
            let fd = socket(libc::SOCK_STREAM, Duration::from_secs(1))?;
            connect(&fd, target)?;
            let mut len = 0;
            while !buf[..len].contains(&b'\n') && len < buf.len() {
                let k = recv_some(&fd, &mut buf[len..])?;
                if k == 0 {
                    break;
                }
                len += k;
            }
            let line = buf[..len].split(|&b| b == b'\n').next().unwrap_or_default();
            Ok(String::from_utf8_lossy(line).into_owned())
        })();
        let t1 = monotonic_ns();
        match seen {
            Ok(who) if who == expect => {
                return Ok(ProbeResult {
                    matched_start_ns: t0,
                    matched_end_ns: t1,
                    probes_before: probes,
                });
            }
            Ok(_) => {
                if !ready {
                    ready = true;
                    let mut out = io::stdout().lock();
                    writeln!(out, "ready")?;
                    out.flush()?;
                }
            }
            Err(e) => {
                eprintln!("svclb-load probe: {target}: {}", error_kind(&e));
                thread::sleep(Duration::from_millis(10));
            }
        }
        probes += 1;
    }
    bail!("no connect to {target} reached {expect} within {limit:?} ({probes} connects)")
}

// ---- raw sockets -------------------------------------------------------

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: valid fd, pointer and length of an int.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_timeout(fd: &OwnedFd, name: i32, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd, pointer and length of a timeval.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A blocking IPv4 socket whose send and receive time out after `timeout`
/// (SO_SNDTIMEO also bounds a TCP connect on Linux).
fn socket(kind: i32, timeout: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let raw = cvt(unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_timeout(&fd, libc::SO_SNDTIMEO, timeout)?;
    set_timeout(&fd, libc::SO_RCVTIMEO, timeout)?;
    Ok(fd)
}

fn connect(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    loop {
        // SAFETY: valid fd, pointer and length of a sockaddr_in.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn send_all(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn recv_some(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn recv_exact(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match recv_some(fd, &mut buf[got..])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the reply",
                ))
            }
            k => got += k,
        }
    }
    Ok(())
}

/// Parses `IP:PORT` (IPv4 only: the sandbox's load is IPv4).
pub fn parse_target(s: &str) -> Result<SocketAddrV4> {
    s.parse()
        .with_context(|| format!("bad target {s:?} (want IPv4:PORT)"))
}
