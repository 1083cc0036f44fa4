//! A plain HTTP/1.0 client for svclbd's metrics endpoint and Prometheus's
//! API, loopback only (in the host's or in a sandbox's namespace).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// GET `path` from `addr` (loopback only): (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    assert!(addr.ip().is_loopback(), "loopback only: {addr}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (name and labels exactly as the text
/// exposition prints them) in a `/metrics` body.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `promtool check metrics` (Debian's prometheus package) on a
/// `/metrics` body: Ok when it finds no problem at all, else what it said.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("promtool (Debian package prometheus) is not installed: {e}")
        })?;
    promtool
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    if checked.status.success() {
        Ok(())
    } else {
        anyhow::bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        )
    }
}
