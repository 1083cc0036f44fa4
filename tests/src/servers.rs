//! Real identity servers for the backends: they answer with their own IP, then echo.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns;
use crate::sandbox::Sandbox;
use crate::util::warn;

/// How long a server's drop waits for its connection threads before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Fallback wake-up period of the UDP receive loop.
const UDP_POLL: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, TcpStream>,
}

#[derive(Default)]
struct TcpShared {
    stop: AtomicBool,
    accepted: AtomicU64,
    bytes_received: AtomicU64,
    conns: Mutex<Connections>,
    all_closed: Condvar,
}

/// TCP server that sends `"<its ip>\n"` on each connection, then echoes until EOF.
pub struct TcpIdServer {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    shared: Arc<TcpShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TcpIdServer {
    /// Binds `addr` in the sandbox's backends netns and starts serving.
    pub fn start(sandbox: &Sandbox, addr: SocketAddr) -> Result<TcpIdServer> {
        Self::start_in_netns(sandbox.backends_netns(), addr)
    }

    /// Binds `addr` in the named network namespace and starts serving.
    pub fn start_in_netns(netns_name: &str, addr: SocketAddr) -> Result<TcpIdServer> {
        let listener =
            netns::in_netns(netns_name, || TcpListener::bind(addr))?.with_context(|| {
                format!("TCP identity server could not bind {addr} in {netns_name}")
            })?;
        let addr = listener.local_addr().context("listener local_addr")?;
        let listener = Arc::new(listener);
        let shared = Arc::new(TcpShared::default());
        let accept_thread = {
            let (listener, shared) = (Arc::clone(&listener), Arc::clone(&shared));
            netns::spawn_in_netns(netns_name, &format!("tcpid-{}", addr.port()), move || {
                accept_loop(&listener, &shared)
            })?
        };
        Ok(TcpIdServer {
            addr,
            listener,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The bound address (with the actual port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Number of payload bytes received (and echoed) so far.
    pub fn bytes_received(&self) -> u64 {
        self.shared.bytes_received.load(Ordering::SeqCst)
    }

    /// Number of connections currently being served.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).open.len()
    }
}

impl Drop for TcpIdServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // On Linux, shutdown(2) of a listening socket makes a blocked accept() return EINVAL.
        // SAFETY: the fd is owned by self.listener, alive here.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            if t.join().is_err() {
                warn(format_args!(
                    "TCP identity server {}: accept thread panicked",
                    self.addr
                ));
            }
        }
        let conns = lock(&self.shared.conns);
        for stream in conns.open.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let (conns, timeout) = self
            .shared
            .all_closed
            .wait_timeout_while(conns, STOP_GRACE, |c| !c.open.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            warn(format_args!(
                "TCP identity server {}: {} connection threads did not stop",
                self.addr,
                conns.open.len()
            ));
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<TcpShared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED) => {}
                    Some(libc::EINVAL) => return, // listener shut down
                    _ => {
                        warn(format_args!("TCP identity server accept: {e}"));
                        thread::sleep(Duration::from_millis(10));
                    }
                }
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn(format_args!("TCP identity server: try_clone: {e}"));
                continue;
            }
        };
        let id = {
            let mut conns = lock(&shared.conns);
            let id = conns.next_id;
            conns.next_id += 1;
            conns.open.insert(id, clone);
            id
        };
        let conn_shared = Arc::clone(shared);
        // Spawned from a thread inside the namespace, so it is in the namespace too.
        let spawned = thread::Builder::new()
            .name("tcpid-conn".into())
            .spawn(move || {
                let _done = ConnDone(&conn_shared, id);
                if let Err(e) = serve_connection(stream, &conn_shared) {
                    if !conn_shared.stop.load(Ordering::SeqCst) && !is_disconnect(&e) {
                        warn(format_args!("TCP identity server connection: {e}"));
                    }
                }
            });
        if let Err(e) = spawned {
            warn(format_args!(
                "TCP identity server: could not spawn a thread: {e}"
            ));
            ConnDone(shared, id);
        }
    }
}

/// Deregisters a connection when its thread ends (also on panic).
struct ConnDone<'a>(&'a TcpShared, u64);

impl Drop for ConnDone<'_> {
    fn drop(&mut self) {
        let mut conns = lock(&self.0.conns);
        conns.open.remove(&self.1);
        if conns.open.is_empty() {
            self.0.all_closed.notify_all();
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected
    )
}

fn serve_connection(mut stream: TcpStream, shared: &TcpShared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let ip = stream.local_addr()?.ip();
    stream.write_all(format!("{ip}\n").as_bytes())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        shared.bytes_received.fetch_add(n as u64, Ordering::SeqCst);
        stream.write_all(&buf[..n])?;
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

#[derive(Default)]
struct UdpShared {
    stop: AtomicBool,
    datagrams: AtomicU64,
    bytes_received: AtomicU64,
}

/// UDP server that answers each datagram with `"<its ip>\n"` followed by the payload.
pub struct UdpIdServer {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpIdServer {
    /// Binds `addr` in the sandbox's backends netns and starts serving.
    pub fn start(sandbox: &Sandbox, addr: SocketAddr) -> Result<UdpIdServer> {
        Self::start_in_netns(sandbox.backends_netns(), addr)
    }

    /// Binds `addr` in the named network namespace and starts serving.
    ///
    /// The identity is the bound IP; bind a specific address (not 0.0.0.0) to get a useful one.
    pub fn start_in_netns(netns_name: &str, addr: SocketAddr) -> Result<UdpIdServer> {
        let socket = netns::in_netns(netns_name, || UdpSocket::bind(addr))?.with_context(|| {
            format!("UDP identity server could not bind {addr} in {netns_name}")
        })?;
        socket
            .set_read_timeout(Some(UDP_POLL))
            .context("UDP set_read_timeout")?;
        let addr = socket.local_addr().context("UDP local_addr")?;
        let socket = Arc::new(socket);
        let shared = Arc::new(UdpShared::default());
        let thread = {
            let (socket, shared) = (Arc::clone(&socket), Arc::clone(&shared));
            netns::spawn_in_netns(netns_name, &format!("udpid-{}", addr.port()), move || {
                udp_loop(&socket, &shared)
            })?
        };
        Ok(UdpIdServer {
            addr,
            socket,
            shared,
            thread: Some(thread),
        })
    }

    /// The bound address (with the actual port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of datagrams received so far.
    pub fn datagrams(&self) -> u64 {
        self.shared.datagrams.load(Ordering::SeqCst)
    }

    /// Number of payload bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.shared.bytes_received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpIdServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes a blocked recv on Linux (it then returns 0); the read timeout is the fallback.
        // SAFETY: the fd is owned by self.socket, alive here.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn(format_args!(
                    "UDP identity server {}: thread panicked",
                    self.addr
                ));
            }
        }
    }
}

fn udp_loop(socket: &UdpSocket, shared: &UdpShared) {
    let ident = format!(
        "{}\n",
        socket
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default()
    );
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + ident.len());
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                if !shared.stop.load(Ordering::SeqCst) {
                    warn(format_args!("UDP identity server recv: {e}"));
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        shared.datagrams.fetch_add(1, Ordering::SeqCst);
        shared.bytes_received.fetch_add(n as u64, Ordering::SeqCst);
        reply.clear();
        reply.extend_from_slice(ident.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = socket.send_to(&reply, peer) {
            warn(format_args!("UDP identity server send to {peer}: {e}"));
        }
    }
}
