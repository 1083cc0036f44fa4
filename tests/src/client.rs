//! Client helpers; call them from inside [`crate::Sandbox::in_client`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

/// Longest identity line accepted.
const MAX_LINE: u64 = 256;

/// Connects to `addr`, reads the server's identity line and returns the IP string.
pub fn tcp_identity(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let stream = connect(addr, timeout)?;
    let mut reader = BufReader::new(&stream);
    read_identity(&mut reader)
}

/// Connects to `addr`, reads the identity line, sends `payload`, half-closes and returns (identity, echoed bytes).
pub fn tcp_echo(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<(String, Vec<u8>)> {
    let stream = connect(addr, timeout)?;
    let mut reader = BufReader::new(&stream);
    let ident = read_identity(&mut reader)?;
    (&stream).write_all(payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(payload.len());
    reader.read_to_end(&mut echoed)?;
    Ok((ident, echoed))
}

/// Sends one byte from a connected UDP socket to `addr` and returns the first line of the reply.
pub fn udp_identity(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
    socket.send(b"?")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    let reply = &buf[..n];
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8(line.to_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn read_identity<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut line = String::new();
    reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    match line.strip_suffix('\n') {
        Some(ip) => Ok(ip.to_string()),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("no complete identity line (got {line:?})"),
        )),
    }
}
