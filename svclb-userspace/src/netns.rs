//! Network namespaces: running code inside another process's namespace,
//! and what addresses its interfaces hold there.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};

/// Runs `f` on a thread of its own inside the namespace `netns` (setns
/// moves only the calling thread, and that thread is thrown away after).
pub fn in_netns<R: Send>(netns: &File, f: impl FnOnce() -> R + Send) -> Result<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns only reads the fd and the flag; it moves the
            // calling thread alone.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("setns");
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread working in a network namespace panicked"))?
    })
}

/// The addresses of the interfaces of the calling thread's namespace
/// (getifaddrs asks over netlink, in that namespace).
pub fn interface_addresses() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_has_loopback() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs.iter().any(IpAddr::is_loopback), "{addrs:?}");
    }
}
