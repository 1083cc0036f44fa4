//! IPVS's ActiveConn and InActConn, end to end with the real programs in
//! the real kernel: they follow TCP states and UDP sockets.
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stats::*;
use common::*;
use svclb_tests::Sandbox;

/// Listeners on both tasks at `port` that accept and hold connections,
/// sending nothing.
struct Holder {
    listeners: Vec<TcpListener>,
    held: Vec<TcpStream>,
}

impl Holder {
    fn start(sandbox: &Sandbox, port: u16) -> Holder {
        let listeners = TASKS
            .iter()
            .map(|t| {
                let l = sandbox
                    .in_backends(|| TcpListener::bind(addr(t, port)))
                    .unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Holder {
            listeners,
            held: Vec::new(),
        }
    }

    /// Accepts until `n` connections are held.
    fn accept(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.held.len() < n {
            for l in &self.listeners {
                match l.accept() {
                    Ok((s, _)) => self.held.push(s),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "only {} accepted",
                self.held.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Held connections per task address.
    fn per_task(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in &self.held {
            *m.entry(s.local_addr().unwrap().ip().to_string())
                .or_default() += 1;
        }
        m
    }
}

#[test]
fn active_and_inactive_connections_follow_tcp_states_and_udp_sockets() {
    let fx = ApiFixture::start();
    let hold_port = 9001;
    let mut holder = Holder::start(&fx.sandbox, hold_port);
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    assert_eq!(gauge_sums(&fx.pins), (0, 0));

    // K established connections: all active, on the backends that hold them.
    let k = 6;
    let mut clients: Vec<TcpStream> = fx.sandbox.in_client(|| {
        (0..k)
            .map(|_| TcpStream::connect_timeout(&addr(VIP, hold_port), TIMEOUT).unwrap())
            .collect()
    });
    holder.accept(k);
    wait_gauges(
        &fx.pins,
        (k as u64, 0),
        "K established connections are active",
    );
    let per_task = holder.per_task();
    let g = gauges(&fx.pins);
    for t in TASKS {
        assert_eq!(
            g[t].0,
            per_task.get(t).copied().unwrap_or(0),
            "active of {t}: {g:?} vs held {per_task:?}"
        );
    }

    // A connected UDP socket is inactive while it is open.
    let udp = fx.sandbox.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.connect(addr(VIP, PORT)).unwrap();
        s.send(b"?").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf).expect("UDP reply");
        s
    });
    wait_gauges(
        &fx.pins,
        (k as u64, 1),
        "an open connected UDP socket is inactive",
    );

    // Half-closed by the client (FIN_WAIT2, the task keeps its end open):
    // no longer ESTABLISHED, so inactive, as IPVS counts FIN_WAIT.
    for c in &clients[..2] {
        c.shutdown(Shutdown::Write).unwrap();
    }
    wait_gauges(
        &fx.pins,
        (k as u64 - 2, 3),
        "half-closed connections are inactive",
    );

    // The tasks close those two as well: the clients' sockets go through
    // TIME_WAIT, which svclb does not keep (IPVS would for 120 s).
    let half_closed: Vec<SocketAddr> = clients[..2]
        .iter()
        .map(|c| c.local_addr().unwrap())
        .collect();
    holder
        .held
        .retain(|s| !half_closed.contains(&s.peer_addr().unwrap()));
    assert_eq!(holder.held.len(), k - 2);
    wait_gauges(
        &fx.pins,
        (k as u64 - 2, 1),
        "fully closed connections leave the gauges",
    );
    clients.drain(..2);

    // A connection still being set up (SYN_SENT: the task drops SYNs) is inactive.
    let mut drop_syns = Command::new("nft");
    drop_syns.args([
        "add table inet svclb_syn_drop; add chain inet svclb_syn_drop input { type filter hook input priority 0; policy accept; }; add rule inet svclb_syn_drop input tcp dport 9002 drop",
    ]);
    fx.sandbox.backends_command(&mut drop_syns, false).unwrap();
    svclb_tests::run(&mut drop_syns).unwrap();
    let connecting = {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let handle = fx
            .sandbox
            .spawn_in_client("syn-sent", move || {
                let r = TcpStream::connect_timeout(&addr(VIP, 9002), Duration::from_millis(2500));
                assert!(r.is_err(), "the SYNs are dropped");
                flag.store(true, Ordering::SeqCst);
            })
            .unwrap();
        (handle, done)
    };
    wait_gauges(
        &fx.pins,
        (k as u64 - 2, 2),
        "a connection in SYN_SENT is inactive",
    );
    connecting.0.join().unwrap();
    assert!(connecting.1.load(Ordering::SeqCst));
    wait_gauges(
        &fx.pins,
        (k as u64 - 2, 1),
        "a connect that timed out leaves the gauges",
    );

    // A refused connect (RST: no listener) never stays in the gauges.
    fx.sandbox.in_client(|| {
        let e = TcpStream::connect_timeout(&addr(VIP, 9003), TIMEOUT).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    });
    wait_gauges(
        &fx.pins,
        (k as u64 - 2, 1),
        "a refused connect is not counted",
    );

    // The client closes the rest (the tasks' ends still open), then the
    // UDP socket: everything is back to 0.
    drop(clients);
    wait_gauges(
        &fx.pins,
        (0, 1),
        "closed by the client: gone from the gauges",
    );
    drop(udp);
    wait_gauges(
        &fx.pins,
        (0, 0),
        "a closed UDP socket is no longer inactive",
    );
    drop(holder);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gauge_sums(&fx.pins), (0, 0));

    // Conns counted every one of them: K + UDP + SYN_SENT + refused.
    let conns: u64 = backend_rows(&fx.pins).values().map(|r| r.conns).sum();
    assert_eq!(conns, k as u64 + 3);
}

/// The one known deviation from nft's view: when the client closes first
/// and the task's FIN reaches the client after its socket became a
/// TIME_WAIT socket, that FIN and the client's last ACK (sent by the
/// kernel's control socket) belong to no translated socket, so svclb does
/// not attribute them. At most one packet each way per connection.
#[test]
fn connections_closed_by_the_client_first_miss_at_most_the_time_wait_exchange() {
    let fx = ApiFixture::start();
    let nft = NftCounters::install(&fx.sandbox, &TASKS, PORT);
    let n = 200;
    let spread = fx.tcp_spread(addr(VIP, PORT), n, true);
    let (ours, theirs) = settled(&fx, &nft);
    let rows = backend_rows(&fx.pins);
    let mut missed = (0, 0);
    for t in TASKS {
        let (a, b, conns) = (ours[t], theirs[t], spread[t] as u64);
        assert_eq!(rows[t].conns, conns);
        assert!(
            a.to_pkts <= b.to_pkts
                && a.from_pkts <= b.from_pkts
                && a.to_bytes <= b.to_bytes
                && a.from_bytes <= b.from_bytes,
            "{t}: svclb counts nothing that nft did not see: {a:?} vs {b:?}"
        );
        let (to, from) = (b.to_pkts - a.to_pkts, b.from_pkts - a.from_pkts);
        eprintln!(
            "{t}: {conns} connections; svclb In/Out {}/{} packets, nft {}/{}: {to} and {from} not attributed",
            a.to_pkts, a.from_pkts, b.to_pkts, b.from_pkts
        );
        assert!(
            to <= conns && from <= conns,
            "{t}: at most one packet each way per connection"
        );
        // Each missed packet is a bare ACK or FIN: 52 bytes (20 IP + 32 TCP with timestamps).
        assert_eq!(b.to_bytes - a.to_bytes, 52 * to, "{t}: missed bytes");
        assert_eq!(b.from_bytes - a.from_bytes, 52 * from, "{t}: missed bytes");
        // Every connection's SYN, data and FIN are counted.
        assert!(
            a.to_pkts >= 3 * conns && a.from_pkts >= 2 * conns,
            "{t}: {a:?}"
        );
        missed.0 += to;
        missed.1 += from;
    }
    eprintln!(
        "not attributed over {n} connections: {} In, {} Out",
        missed.0, missed.1
    );
}

/// A removed backend's id is not given to a new backend while a socket
/// still counts on it: when that socket closes it takes itself off its
/// backend id's gauge, which must not be the new backend's (svclb once
/// handed the lowest free id out at once, and the new backend's InActConn
/// then read one short for every such socket).
///
/// Both ways a change is applied: `svclb-ctl apply`, which reads every
/// gauge, and svclbd's reload, which reads only the ids below the highest
/// it has handed out.
#[test]
fn a_new_backend_does_not_inherit_a_removed_ones_sockets() {
    new_backend_does_not_inherit(Applied::ByCtl);
}

#[test]
fn a_new_backend_does_not_inherit_a_removed_ones_sockets_through_svclbd() {
    new_backend_does_not_inherit(Applied::BySvclbd);
}

enum Applied {
    ByCtl,
    /// svclbd reloads its config file.
    BySvclbd,
}

fn new_backend_does_not_inherit(applied: Applied) {
    let fx = ApiFixture::start();
    let newcomer = "172.50.0.42";
    fx.sandbox
        .add_backend_addr(newcomer.parse().unwrap())
        .unwrap();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let apply = |backends: &[&str]| {
        let list = backends
            .iter()
            .map(|b| format!("{b:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nmark = 0x13d\nbackends = [{list}]\n"
        );
        match applied {
            Applied::ByCtl => {
                let file = svclb_tests::daemon::write_temp("backends.toml", &config).unwrap();
                fx.pins.ctl(&["apply", file.to_str().unwrap()]).unwrap();
            }
            Applied::BySvclbd => {
                std::fs::write(&fx.config, &config).unwrap();
                let want: BTreeSet<String> = backends.iter().map(|b| b.to_string()).collect();
                eventually(
                    Duration::from_secs(10),
                    "svclbd applied the new backends",
                    || {
                        let now: BTreeSet<String> =
                            gauges(&fx.pins).keys().map(|b| strip_port(b)).collect();
                        if now == want {
                            Ok(())
                        } else {
                            Err(format!("{now:?}, want {want:?}"))
                        }
                    },
                );
            }
        }
    };
    let send = |s: &UdpSocket| {
        s.send_to(b"x", addr(VIP, PORT)).unwrap();
    };
    // An unconnected UDP socket, counted on one task; svclb does not end
    // it when that task leaves (it is connected to nothing).
    let old = fx
        .sandbox
        .in_client(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    fx.sandbox.in_client(|| send(&old));
    let counted = gauges(&fx.pins);
    let (gone, _) = counted
        .iter()
        .find(|(_, g)| **g == (0, 1))
        .unwrap_or_else(|| panic!("one task counts the socket: {counted:?}"));
    let gone = strip_port(gone);
    let stays = TASKS.into_iter().find(|t| *t != gone).unwrap();
    apply(&[stays]);
    apply(&[stays, newcomer]);
    drop(old);
    let n = 10;
    let live: Vec<UdpSocket> = fx.sandbox.in_client(|| {
        (0..n)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                send(&s);
                s
            })
            .collect()
    });
    let now = gauges(&fx.pins);
    assert_eq!(
        now.values()
            .fold((0, 0), |(a, i), (da, di)| (a + da, i + di)),
        (0, n),
        "InActConn counts exactly the {n} live sockets: {now:?}"
    );
    let on_newcomer = now
        .iter()
        .find(|(b, _)| strip_port(b) == newcomer)
        .map_or(0, |(_, g)| g.1);
    assert!(on_newcomer > 0, "rr gave the new task some: {now:?}");
    drop(live);
    wait_gauges(&fx.pins, (0, 0), "every socket closed");
}
