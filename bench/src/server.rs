//! Lean echo servers for the bench, in the sandbox's backends namespace.
//!
//! TCP: a fixed pool of worker threads per address, each blocking in
//! accept() on the shared listener and serving the connection to its end, so
//! a CRR connection costs one accept and no thread spawn (the tests'
//! identity servers spawn a thread per connection). A connection whose first
//! byte is `S` gets an endless 64 KiB stream (STREAM); any other is echoed.
//! UDP: threads answering each datagram with itself.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use svclb_tests::Sandbox;

use crate::cpu::pin_thread;
use crate::wire::{STREAM_CHUNK, STREAM_REQUEST};

/// How often a blocked worker looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

/// Echo servers on a set of addresses; stopped and joined on drop.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    /// The CPU the workers pin themselves to (at the next accept, or the
    /// next datagram), or -1 for any CPU.
    cpu: Arc<AtomicI32>,
    listeners: Vec<Arc<TcpListener>>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    /// TCP and UDP echo on every address, `tcp_workers` TCP workers and
    /// `udp_workers` UDP workers each.
    pub fn start(
        sandbox: &Sandbox,
        addrs: &[SocketAddrV4],
        tcp_workers: usize,
        udp_workers: usize,
    ) -> Result<EchoServers> {
        let mut servers = EchoServers {
            stop: Arc::new(AtomicBool::new(false)),
            cpu: Arc::new(AtomicI32::new(-1)),
            listeners: Vec::new(),
            threads: Vec::new(),
        };
        for &addr in addrs {
            let sa = SocketAddr::V4(addr);
            let listener = sandbox
                .try_in_backends(|| TcpListener::bind(sa))?
                .with_context(|| format!("echo server: binding TCP {addr}"))?;
            let listener = Arc::new(listener);
            servers.listeners.push(Arc::clone(&listener));
            for i in 0..tcp_workers {
                let (listener, stop) = (Arc::clone(&listener), Arc::clone(&servers.stop));
                let cpu = Arc::clone(&servers.cpu);
                servers.threads.push(sandbox.spawn_in_backends(
                    &format!("echo-{}-{i}", addr.ip().octets()[3]),
                    move || tcp_worker(&listener, &stop, &cpu),
                )?);
            }
            let udp = sandbox
                .try_in_backends(|| UdpSocket::bind(sa))?
                .with_context(|| format!("echo server: binding UDP {addr}"))?;
            udp.set_read_timeout(Some(POLL))?;
            let udp = Arc::new(udp);
            for i in 0..udp_workers {
                let (udp, stop) = (Arc::clone(&udp), Arc::clone(&servers.stop));
                let cpu = Arc::clone(&servers.cpu);
                servers.threads.push(sandbox.spawn_in_backends(
                    &format!("uecho-{}-{i}", addr.ip().octets()[3]),
                    move || udp_worker(&udp, &stop, &cpu),
                )?);
            }
        }
        Ok(servers)
    }

    /// Pins the workers to `cpu` (None: any CPU) from their next
    /// connection or datagram on.
    pub fn pin(&self, cpu: Option<usize>) {
        self.cpu
            .store(cpu.map_or(-1, |c| c as i32), Ordering::SeqCst);
    }

    /// From their next connection on, each TCP worker pins itself to the CPU
    /// its connection's packets arrive on (`SO_INCOMING_CPU` after the first
    /// read): over the veth, its client's CPU. With pinned client threads,
    /// every client and its server share a CPU. UDP workers: any CPU.
    pub fn follow_clients(&self) {
        self.cpu.store(FOLLOW, Ordering::SeqCst);
    }
}

/// [`EchoServers::cpu`] value: pin to the connection's incoming CPU.
const FOLLOW: i32 = -2;

/// The CPU that last received a packet of `s` (`SO_INCOMING_CPU`).
fn incoming_cpu(s: &TcpStream) -> Option<i32> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and an int-sized buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&raw mut cpu).cast(),
            &mut len,
        )
    };
    (rc == 0 && cpu >= 0).then_some(cpu)
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // A blocked accept() returns EINVAL once its listener is shut down.
            // SAFETY: the fd is alive (owned by the Arc held here).
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_worker(listener: &TcpListener, stop: &AtomicBool, cpu: &AtomicI32) {
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut pinned = -1;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let want = cpu.load(Ordering::Relaxed);
                let follow = want == FOLLOW;
                if want != pinned && !follow {
                    pin_thread(want);
                    pinned = want;
                }
                if follow {
                    // Re-pinned after the first read; remembered as unknown.
                    pinned = FOLLOW;
                }
                let _ = serve(stream, &mut buf, stop, follow);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn serve(mut s: TcpStream, buf: &mut [u8], stop: &AtomicBool, follow: bool) -> io::Result<()> {
    s.set_read_timeout(Some(POLL))?;
    s.set_write_timeout(Some(POLL))?;
    s.set_nodelay(true)?;
    let mut first = true;
    loop {
        let n = match s.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if first && follow {
            pin_thread(incoming_cpu(&s).unwrap_or(-1));
        }
        if first && buf[0] == STREAM_REQUEST {
            buf.fill(b's');
            return stream_out(&mut s, buf, stop);
        }
        first = false;
        s.write_all(&buf[..n])?;
    }
}

/// Writes until the client goes away (or the bench stops).
fn stream_out(s: &mut TcpStream, buf: &[u8], stop: &AtomicBool) -> io::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match s.write(buf) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn udp_worker(sock: &UdpSocket, stop: &AtomicBool, cpu: &AtomicI32) {
    let mut buf = [0u8; 2048];
    let mut pinned = -1;
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let want = cpu.load(Ordering::Relaxed).max(-1);
                if want != pinned {
                    pin_thread(want);
                    pinned = want;
                }
                let _ = sock.send_to(&buf[..n], peer);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
