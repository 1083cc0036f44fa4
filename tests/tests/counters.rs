//! IPVS's packet and byte counters, end to end with the real programs in
//! the real kernel: exact, checked against nftables rule counters in the
//! client namespace, over TCP, connected and unconnected UDP and IPv6.
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};

use common::stats::*;
use common::*;
use svclb_common::SockState;
use svclb_tests::{PinDir, StatsRow, UdpIdServer};

#[test]
fn packet_and_byte_counters_equal_the_kernels_nft_counters() {
    let fx = v4_v6_fixture();
    let all_tasks: Vec<&str> = TASKS.iter().chain(V6_TASKS.iter()).copied().collect();
    let nft = NftCounters::install(&fx.sandbox, &all_tasks, PORT);

    let mix = Mix {
        tcp4: 200,
        tcp6: 100,
        udp: 60,
        unconnected: 20,
        direct: 20,
        stream: 20_000_000,
    };
    let w = run_workload(&fx, mix);
    let (ours, theirs) = settled(&fx, &nft);

    // Conns: every TCP connection and every UDP socket, on the backend
    // that answered it.
    let rows = backend_rows(&fx.pins);
    let total: u64 = rows.values().map(|r| r.conns).sum();
    assert_eq!(
        total,
        (mix.tcp4 + mix.tcp6 + mix.udp + mix.unconnected + 1) as u64,
        "{rows:?}"
    );
    for t in &all_tasks {
        assert_eq!(
            rows[*t].conns,
            w.conns.get(*t).copied().unwrap_or(0),
            "Conns of {t}: {rows:?} vs the workload's {:?}",
            w.conns
        );
        assert!(rows[*t].conns > 0, "{t} got no connection: {:?}", w.conns);
    }

    eprintln!(
        "backend          svclb In/Out pkts, In/Out bytes    nft to/from pkts, to/from bytes"
    );
    for t in &all_tasks {
        let (a, b) = (ours[*t], theirs[*t]);
        eprintln!(
            "{t:<14} {:>6} {:>6} {:>8} {:>8}    {:>6} {:>6} {:>8} {:>8}",
            a.to_pkts,
            a.from_pkts,
            a.to_bytes,
            a.from_bytes,
            b.to_pkts,
            b.from_pkts,
            b.to_bytes,
            b.from_bytes
        );
    }
    for t in &all_tasks {
        assert_eq!(
            ours[*t], theirs[*t],
            "{t}: svclb's In/Out (left) must equal nft's to/from counters (right)"
        );
        assert!(
            ours[*t].to_pkts > 0 && ours[*t].from_pkts > 0,
            "{t}: {:?}",
            ours[*t]
        );
    }
    // L3 bytes: at least the payloads (both ways, plus the identity lines)
    // and at least 20 bytes of IP header per packet.
    let sum = |f: fn(&Flow) -> u64| ours.values().map(f).sum::<u64>();
    assert!(sum(|f| f.to_bytes) >= w.payload_bytes + 20 * sum(|f| f.to_pkts));
    assert!(sum(|f| f.from_bytes) >= w.payload_bytes + 20 * sum(|f| f.from_pkts));

    // The service rows are the sums of their backends.
    let all = svclb_tests::parse_stats(&fx.pins.ctl(&["stats", "--exact"]).unwrap()).unwrap();
    let mut current: Option<StatsRow> = None;
    let mut sums: Vec<(StatsRow, [u64; 5])> = Vec::new();
    for r in all {
        if r.is_backend {
            let s = &mut sums.last_mut().unwrap().1;
            for (acc, v) in
                s.iter_mut()
                    .zip([r.conns, r.in_pkts, r.out_pkts, r.in_bytes, r.out_bytes])
            {
                *acc += v;
            }
        } else {
            current = Some(r.clone());
            sums.push((r, [0; 5]));
        }
    }
    assert!(current.is_some());
    for (svc, s) in sums {
        assert_eq!(
            [
                svc.conns,
                svc.in_pkts,
                svc.out_pkts,
                svc.in_bytes,
                svc.out_bytes
            ],
            s,
            "service row {}",
            svc.name
        );
    }
}

/// One UDP request and its reply on `socket` (connected: `to` is None).
fn udp_round(socket: &UdpSocket, to: Option<SocketAddr>, payload: &[u8]) -> String {
    match to {
        Some(to) => socket.send_to(payload, to).unwrap(),
        None => socket.send(payload).unwrap(),
    };
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).expect("UDP reply");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split_once('\n').unwrap().0.to_string()
}

/// A UDP socket is one of svclb's connections only while it is connected
/// to the VIP: connected again elsewhere, or sending elsewhere, it is not
/// counted (nft's per-backend counters and svclb's agree), and it leaves
/// the InActConn gauge.
#[test]
fn a_udp_socket_counts_only_what_it_exchanges_with_its_backend() {
    let mut fx = ApiFixture::start();
    // Something that is not a VIP nor a task: the backends' own address.
    let other = SocketAddr::new(svclb_tests::sandbox::BACKENDS_V4.into(), PORT);
    fx.udp.push(UdpIdServer::start(&fx.sandbox, other).unwrap());
    let nft = NftCounters::install(&fx.sandbox, &TASKS, PORT);
    let _guard = fx.sandbox.enter_cgroup().unwrap();

    // Connected to the VIP, then to another address: only the first part counts.
    let reconnected = fx.sandbox.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.connect(addr(VIP, PORT)).unwrap();
        for _ in 0..3 {
            let who = udp_round(&s, None, b"to the vip");
            assert!(TASKS.contains(&who.as_str()), "{who}");
        }
        // A datagram sent elsewhere while connected is not the task's either.
        s.send_to(b"aside", other).unwrap();
        s.connect(other).unwrap();
        for _ in 0..4 {
            assert_eq!(udp_round(&s, None, b"elsewhere"), other.ip().to_string());
        }
        s
    });
    let (ours, theirs) = settled(&fx, &nft);
    assert_eq!(
        ours, theirs,
        "svclb (left) and nft (right) after a reconnect"
    );
    wait_gauges(
        &fx.pins,
        (0, 0),
        "a UDP socket connected elsewhere is not a connection to the task",
    );
    drop(reconnected);

    // Unconnected: datagrams to the VIP count, those to another address do not.
    let unconnected = fx.sandbox.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        for _ in 0..3 {
            udp_round(&s, Some(addr(VIP, PORT)), b"to the vip");
            assert_eq!(
                udp_round(&s, Some(other), b"elsewhere"),
                other.ip().to_string()
            );
        }
        s
    });
    let (ours, theirs) = settled(&fx, &nft);
    assert_eq!(
        ours, theirs,
        "svclb (left) and nft (right) for an unconnected socket"
    );
    wait_gauges(
        &fx.pins,
        (0, 1),
        "the unconnected socket that sent to the VIP is inactive",
    );
    drop(unconnected);
    wait_gauges(&fx.pins, (0, 0), "closed");

    let conns: u64 = backend_rows(&fx.pins).values().map(|r| r.conns).sum();
    assert_eq!(conns, 2, "one connection per socket that reached the VIP");
}

/// The record svclb keeps for `socket` in its socket storage map, and a way
/// to overwrite it (as an earlier svclb would have written it).
fn with_sock_record(
    pins: &PinDir,
    socket: &impl std::os::fd::AsRawFd,
    edit: impl FnOnce(&mut SockState),
) {
    let path = pins.path().join(svclb_common::map_names::SOCKS);
    let data = aya::maps::MapData::from_pin(&path).expect("the pinned socket storage map");
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let mut socks: aya::maps::SkStorage<_, SockState> = map.try_into().unwrap();
    let mut record = socks.get(socket, 0).expect("the socket has svclb's record");
    edit(&mut record);
    socks.insert(socket, record, 0).unwrap();
}

/// Sockets recorded by an earlier svclb (before records said "TCP", an
/// upgrade keeps the sockets and their records) are still counted exactly:
/// their packets get the peer check, which a TCP socket always passes and
/// a UDP socket's datagrams to others fail.
#[test]
fn records_written_by_an_earlier_svclb_are_counted_exactly() {
    let mut fx = ApiFixture::start();
    let other = SocketAddr::new(svclb_tests::sandbox::BACKENDS_V4.into(), PORT);
    fx.udp.push(UdpIdServer::start(&fx.sandbox, other).unwrap());
    let nft = NftCounters::install(&fx.sandbox, &TASKS, PORT);
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let pins = &fx.pins;
    fx.sandbox.in_client(|| {
        // UDP, connected to the VIP; its record loses its flags.
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.set_read_timeout(Some(TIMEOUT)).unwrap();
        udp.connect(addr(VIP, PORT)).unwrap();
        udp_round(&udp, None, b"before");
        with_sock_record(pins, &udp, |r| {
            assert_eq!(r.flags & svclb_common::SOCK_F_TCP, 0, "a UDP record");
            r.flags = 0;
        });
        udp.send_to(b"aside", other).unwrap();
        for _ in 0..3 {
            udp_round(&udp, None, b"after");
        }
        // TCP; its record loses the TCP flag.
        let mut tcp = TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT).unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        with_sock_record(pins, &tcp, |r| {
            assert_ne!(r.flags & svclb_common::SOCK_F_TCP, 0, "a TCP record");
            r.flags = 0;
        });
        for _ in 0..5 {
            tcp.write_all(b"ping\n").unwrap();
            let mut buf = [0u8; 256];
            assert!(tcp.read(&mut buf).unwrap() > 0);
        }
        // The task closes first (after our FIN): its FIN reaches the full
        // socket, not a TIME_WAIT one (the documented deviation).
        tcp.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).unwrap();
    });
    let (ours, theirs) = settled(&fx, &nft);
    assert_eq!(ours, theirs, "svclb (left) and nft (right)");
    let sent: u64 = ours.values().map(|f| f.to_pkts).sum();
    assert!(
        sent >= 4 + 5,
        "the rewritten sockets were counted: {ours:?}"
    );
}
