//! Ending the sockets that svclb connected to a backend that has left its
//! service, so their clients fail over at once instead of talking into a
//! task that is gone (Cilium does the same for its socket-level balancer).
//!
//! svclb rewrites a socket once, at connect; the socket's record in
//! `svclb_socks` (socket storage) names the backend it was given. After an
//! apply has taken a backend out of the maps (so a reconnect lands on a
//! live one), this finds the sockets whose record names that backend, in
//! the network namespace of every thread of every attached cgroup, with
//! the kernel's socket diagnostics (NETLINK_SOCK_DIAG): a TCP dump carries
//! each socket's svclb record (`INET_DIAG_REQ_SK_BPF_STORAGES`); a UDP dump
//! does not (the kernel fills it in for connection sockets only), so a
//! connected UDP socket is found by its cookie in `svclb_udp_conns`, which
//! the connect program fills and the release program empties. Then it ends
//! each with `SOCK_DESTROY` (what `ss -K` sends; CONFIG_INET_DIAG_DESTROY):
//! a TCP socket is aborted (its next call returns ECONNABORTED, the peer
//! gets a reset); a connected UDP socket gets ECONNABORTED on its next
//! call. Unconnected UDP sockets are left alone: their next datagram to
//! the VIP is scheduled afresh anyway.
//!
//! A socket that dialled the backend's address itself has no svclb record
//! (or one naming another backend id) and is never touched. Nothing here
//! runs on the data path: the record already exists for the counters.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData};
use svclb_common::{addr_words, map_names, SockState, UdpConn, IPPROTO_TCP, IPPROTO_UDP};

use crate::{pins::PinDir, reconcile::DepartedBackend};

/// How many sockets were ended for one departed backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub service: String,
    pub mark: u32,
    pub addr: IpAddr,
    pub sockets: u64,
}

/// Ends the sockets connected through a VIP to the backends in `departed`
/// whose service ends them, in every attached cgroup's network namespaces.
/// A namespace that disappears meanwhile is skipped; one that cannot be
/// searched is reported in the error after the others are done.
pub fn end_sockets(pins: &PinDir, departed: &[DepartedBackend]) -> Result<Vec<Ended>> {
    let wanted: Vec<&DepartedBackend> = departed.iter().filter(|d| d.end_sockets).collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let socks = MapData::from_pin(pins.map(map_names::SOCKS))
        .with_context(|| format!("opening the pinned {} map", map_names::SOCKS))?;
    let udp_conns = MapData::from_pin(pins.map(map_names::UDP_CONNS))
        .map_err(anyhow::Error::from)
        .and_then(|data| Ok(UdpConns::try_from(Map::from_map_data(data)?)?))
        .with_context(|| format!("opening the pinned {} map", map_names::UDP_CONNS))?;
    let mut counts = vec![0u64; wanted.len()];
    let mut failures = Vec::new();
    for (path, netns) in attached_netns(pins)? {
        match crate::netns::in_netns(&netns, || end_in_current_netns(&socks, &udp_conns, &wanted)) {
            Ok(Ok(per_backend)) => {
                for (c, n) in counts.iter_mut().zip(per_backend) {
                    *c += n;
                }
            }
            Ok(Err(e)) | Err(e) => failures.push(format!("{}: {e:#}", path.display())),
        }
    }
    let ended = wanted
        .iter()
        .zip(counts)
        .map(|(d, sockets)| Ended {
            service: d.service.clone(),
            mark: d.mark,
            addr: d.addr,
            sockets,
        })
        .collect();
    if failures.is_empty() {
        Ok(ended)
    } else {
        anyhow::bail!(
            "ending sockets failed in {} network namespace(s): {}",
            failures.len(),
            failures.join("; ")
        )
    }
}

/// One open handle per distinct network namespace of the threads in the
/// attached cgroups and their descendants (where Docker's containers are).
/// Holding the handle keeps a namespace alive while it is searched.
fn attached_netns(pins: &PinDir) -> Result<Vec<(PathBuf, File)>> {
    let mount = crate::cgroup::cgroup2_mount()?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for attachment in crate::loader::attachments(pins)? {
        let root = mount.join(attachment.cgroup.trim_start_matches('/'));
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue; // removed meanwhile
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
            for tid in threads_of(&dir) {
                let path = PathBuf::from(format!("/proc/{tid}/ns/net"));
                // The process may have exited: then it has no sockets left.
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else {
                    continue;
                };
                if seen.insert((meta.dev(), meta.ino())) {
                    out.push((path, file));
                }
            }
        }
    }
    Ok(out)
}

/// Threads rather than processes: a thread may have entered a namespace
/// of its own (setns), and its sockets live there.
fn threads_of(cgroup_dir: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup_dir.join("cgroup.threads"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// In the calling thread's namespace: dumps TCP and UDP sockets of both
/// families with their svclb record and destroys those of `wanted`.
/// Returns how many were ended per entry of `wanted`.
fn end_in_current_netns(
    socks: &MapData,
    udp_conns: &UdpConns,
    wanted: &[&DepartedBackend],
) -> Result<Vec<u64>> {
    let diag = SockDiag::open()?;
    let mut counts = vec![0u64; wanted.len()];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
            let tcp = protocol == IPPROTO_TCP;
            let storage = tcp.then(|| socks.fd().as_fd().as_raw_fd());
            for sock in diag.dump(family, protocol, storage)? {
                // TCP in any state but LISTEN; UDP only while connected
                // (its one peer is the backend).
                let translated_to = if tcp {
                    match &sock.record {
                        Some(r) if sock.state != TCP_LISTEN => {
                            Some((r.mark, r.backend_id, Some(r.backend)))
                        }
                        _ => None,
                    }
                } else if sock.state == TCP_ESTABLISHED {
                    udp_conns
                        .get(&sock.cookie(), 0)
                        .ok()
                        .map(|c| (c.mark, c.backend_id, None))
                } else {
                    None
                };
                let Some((mark, backend_id, backend)) = translated_to else {
                    continue;
                };
                let Some(i) = wanted.iter().position(|d| {
                    mark == d.mark
                        && backend_id == d.id
                        && backend.is_none_or(|b| b == addr_words(d.addr))
                }) else {
                    continue;
                };
                match diag.destroy(family, protocol, &sock.id) {
                    Ok(()) => counts[i] += 1,
                    // Closed since the dump: nothing left to end.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).context("SOCK_DESTROY"),
                }
            }
        }
    }
    Ok(counts)
}

// ---- NETLINK_SOCK_DIAG, as in linux/sock_diag.h and linux/inet_diag.h ----

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(3 << 14);
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// struct nlmsghdr, struct inet_diag_sockid, struct inet_diag_req_v2 and
/// struct inet_diag_msg sizes.
const NLMSG_HDR: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A socket from a dump: its diag id (addresses, ports, interface, cookie:
/// what SOCK_DESTROY needs to find it again), state and svclb record.
struct Found {
    id: [u8; SOCKID_LEN],
    state: u8,
    /// Its svclb record, when the dump asked for them (TCP).
    record: Option<SockState>,
}

impl Found {
    /// The socket's cookie: inet_diag_sockid's idiag_cookie, low word first.
    fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes(self.id[40..44].try_into().unwrap());
        let hi = u32::from_ne_bytes(self.id[44..48].try_into().unwrap());
        u64::from(lo) | u64::from(hi) << 32
    }
}

/// `svclb_udp_conns`, typed.
type UdpConns = aya::maps::HashMap<MapData, u64, UdpConn>;

struct SockDiag {
    fd: OwnedFd,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl SockDiag {
    fn open() -> Result<SockDiag> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a NETLINK_SOCK_DIAG socket");
        }
        Ok(SockDiag {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Every socket of (family, protocol), with its record in the socket
    /// storage map `storage_fd` when given.
    fn dump(&self, family: u8, protocol: u8, storage_fd: Option<i32>) -> Result<Vec<Found>> {
        // The request: header, inet_diag_req_v2 for every state, and the
        // storage map to report: a nested attribute holding its fd.
        let mut req = request(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
            family,
            protocol,
            &[0; SOCKID_LEN],
        );
        if let Some(fd) = storage_fd {
            let inner_len = 4 + 4;
            push_u16(&mut req, (4 + inner_len) as u16);
            push_u16(&mut req, INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED);
            push_u16(&mut req, inner_len as u16);
            push_u16(&mut req, SK_DIAG_BPF_STORAGE_REQ_MAP_FD);
            req.extend_from_slice(&(fd as u32).to_ne_bytes());
        }
        set_len(&mut req);
        self.send(&req)
            .context("sending a sock_diag dump request")?;

        let mut found = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        'recv: loop {
            let n = self.recv(&mut buf).context("reading a sock_diag dump")?;
            let mut off = 0;
            while off + NLMSG_HDR <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                if len < NLMSG_HDR || off + len > n {
                    anyhow::bail!("a malformed sock_diag message ({len} bytes)");
                }
                let body = &buf[off + NLMSG_HDR..off + len];
                match kind as i32 {
                    libc::NLMSG_DONE => break 'recv,
                    libc::NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno))
                                .context("the kernel refused the sock_diag dump");
                        }
                    }
                    _ => {
                        if let Some(f) = parse_diag_msg(body) {
                            found.push(f);
                        }
                    }
                }
                off += align4(len);
            }
        }
        Ok(found)
    }

    fn destroy(&self, family: u8, protocol: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        let mut req = request(
            SOCK_DESTROY,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK,
            family,
            protocol,
            id,
        );
        set_len(&mut req);
        self.send(&req)?;
        let mut buf = [0u8; 512];
        let n = self.recv(&mut buf)?;
        if n >= NLMSG_HDR + 4
            && u16::from_ne_bytes(buf[4..6].try_into().unwrap()) as i32 == libc::NLMSG_ERROR
        {
            let errno = i32::from_ne_bytes(buf[NLMSG_HDR..NLMSG_HDR + 4].try_into().unwrap());
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
        }
        Ok(())
    }
}

/// nlmsghdr (length filled in by [`set_len`]) + inet_diag_req_v2.
fn request(kind: u16, flags: i32, family: u8, protocol: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut req = Vec::with_capacity(NLMSG_HDR + REQ_V2_LEN + 16);
    req.extend_from_slice(&0u32.to_ne_bytes());
    push_u16(&mut req, kind);
    push_u16(&mut req, flags as u16);
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(&[family, protocol, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(id);
    req
}

fn push_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn set_len(req: &mut [u8]) {
    let len = req.len() as u32;
    req[..4].copy_from_slice(&len.to_ne_bytes());
}

/// An inet_diag_msg and its attributes (None if too short to be one).
fn parse_diag_msg(body: &[u8]) -> Option<Found> {
    if body.len() < DIAG_MSG_LEN {
        return None;
    }
    let state = body[1];
    let id: [u8; SOCKID_LEN] = body[4..4 + SOCKID_LEN].try_into().ok()?;
    Some(Found {
        id,
        state,
        record: svclb_record(&body[DIAG_MSG_LEN..]),
    })
}

/// The svclb record among a socket's attributes, if it has one.
fn svclb_record(attrs: &[u8]) -> Option<SockState> {
    let (_, storages) = attributes(attrs).find(|(kind, _)| *kind == INET_DIAG_SK_BPF_STORAGES)?;
    // One storage was asked for: its value is the record.
    let (_, storage) = attributes(storages).find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)?;
    let (_, value) =
        attributes(storage).find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    if value.len() < std::mem::size_of::<SockState>() {
        return None;
    }
    let record = unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<SockState>()) };
    (record.mark != 0).then_some(record)
}

/// Netlink attributes (type without flags, payload), until the bytes end.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[align4(len).min(bytes.len())..];
        Some((kind, payload))
    })
}

/// After an apply: ends the sockets of the backends `plan` took out, logs
/// one line per backend (how many, which backend) and counts them in
/// [`ENDED`]. A failure is logged, not returned: the apply itself is done.
pub fn after_apply(pins: &PinDir, plan: &crate::reconcile::Plan) -> Vec<Ended> {
    let started = std::time::Instant::now();
    match end_sockets(pins, &plan.departed) {
        Ok(ended) => {
            for e in &ended {
                tracing::info!(
                    service = %e.service,
                    mark = e.mark,
                    backend = %e.addr,
                    sockets = e.sockets,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "backend left: ended the sockets svclb connected to it"
                );
            }
            ENDED.add(&ended);
            ended
        }
        Err(e) => {
            tracing::error!("backend left, but its sockets could not all be ended: {e:#}");
            Vec::new()
        }
    }
}

/// Sockets ended per service by this process (svclbd's /metrics).
pub static ENDED: EndedCounts = EndedCounts(std::sync::Mutex::new(BTreeMap::new()));

/// Sockets ended, per (service, mark).
pub struct EndedCounts(std::sync::Mutex<BTreeMap<(String, u32), u64>>);

impl EndedCounts {
    pub fn add(&self, ended: &[Ended]) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for e in ended {
            *counts.entry((e.service.clone(), e.mark)).or_default() += e.sockets;
        }
    }

    /// The counter in Prometheus's text format.
    pub fn render(&self) -> String {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from(
            "# HELP svclb_service_sockets_terminated_total Sockets svclbd ended because their backend left the service.\n\
             # TYPE svclb_service_sockets_terminated_total counter\n",
        );
        for ((service, mark), n) in counts.iter() {
            out.push_str(&format!(
                "svclb_service_sockets_terminated_total{{service=\"{}\",local_mark=\"{mark:08X}\"}} {n}\n",
                service.replace('\\', "\\\\").replace('"', "\\\"")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_with_padding_and_flags_masked() {
        // A 5-byte attribute (type 3) padded to 8, then a nested one (type 20).
        let mut b = vec![5, 0, 3, 0, 0xaa, 0, 0, 0];
        b.extend_from_slice(&[8, 0, 20, 0x80, 1, 2, 3, 4]);
        let got: Vec<(u16, Vec<u8>)> = attributes(&b).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(got, vec![(3, vec![0xaa]), (20, vec![1, 2, 3, 4])]);
        // Truncated: stops instead of reading past the end.
        assert_eq!(attributes(&[9, 0, 1, 0, 0]).count(), 0);
    }

    #[test]
    fn a_message_without_an_svclb_record_has_none() {
        assert!(parse_diag_msg(&[0u8; DIAG_MSG_LEN])
            .unwrap()
            .record
            .is_none());
        assert!(parse_diag_msg(&[0u8; 10]).is_none());
    }
}
