//! Socket-level semantics: an application cannot tell that its connect()
//! was rewritten, and every way a program talks to a VIP is balanced. Real
//! programs, real sockets, real DNS servers and clients, in the sandbox.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;

use common::*;
use svclb_tests::daemon::write_temp;
use svclb_tests::dns::Dnsmasq;
use svclb_tests::{PinDir, Sandbox, Svclbd, TcpIdServer, UdpIdServer};

/// A DNS query for `name` IN A, id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first A record of a reply to `dns_query(id, ..)`.
fn dns_answer(id: u16, reply: &[u8]) -> Option<IpAddr> {
    if reply.len() < 16
        || reply[..2] != id.to_be_bytes()
        || u16::from_be_bytes([reply[6], reply[7]]) == 0
    {
        return None;
    }
    let ip = &reply[reply.len() - 4..];
    Some(IpAddr::from([ip[0], ip[1], ip[2], ip[3]]))
}

fn count<T: Ord>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

const DNS_CONFIG: &str = r#"
[[service]]
name = "dns"
vip = "172.50.0.37"
backends = ["172.50.0.40", "172.50.0.41"]
"#;

#[test]
fn unconnected_udp_dns_is_balanced_and_answers_come_from_the_vip() {
    let sandbox = Sandbox::new().unwrap();
    // Two real DNS servers as the tasks; each answers who.test with its own address.
    let _dns: Vec<Dnsmasq> = TASKS
        .iter()
        .map(|t| {
            Dnsmasq::start(&sandbox, t.parse().unwrap(), 1, &format!("{t} who.test\n")).unwrap()
        })
        .collect();
    let pins = PinDir::new();
    let config = write_temp("dns.toml", DNS_CONFIG).unwrap();
    let cgroup = sandbox.cgroup_path().to_str().unwrap().to_string();
    let _daemon = Svclbd::start(
        &pins,
        &["--config", config.to_str().unwrap(), "--cgroup", &cgroup],
    )
    .unwrap();

    // A real DNS client: dig checks that the reply comes from the server it asked.
    let mut answers = Vec::new();
    for _ in 0..40 {
        let mut dig = Command::new("dig");
        dig.args([
            "@172.50.0.37",
            "who.test",
            "A",
            "+short",
            "+tries=1",
            "+time=2",
        ]);
        sandbox.client_command(&mut dig, true).unwrap();
        let out = dig.output().expect("dig (bind9-dnsutils) runs");
        assert!(
            out.status.success(),
            "dig failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answers.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let seen = count(answers.iter().cloned());
    for t in TASKS {
        assert!(
            seen.get(t).copied().unwrap_or(0) >= 4,
            "both DNS servers answer dig: {seen:?}"
        );
    }
    assert_eq!(
        seen.values().sum::<usize>(),
        40,
        "every answer accepted: {seen:?}"
    );

    // Unconnected sockets (sendto/recvfrom): replies appear to come from VIP:53.
    let _guard = sandbox.enter_cgroup().unwrap();
    let vip53 = addr(VIP, 53);
    let (per_socket, sticky) = sandbox.in_client(|| {
        let mut per_socket = Vec::new();
        for i in 0..100u16 {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.send_to(&dns_query(i, "who.test"), vip53).unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf).expect("a DNS reply");
            assert_eq!(
                from, vip53,
                "the reply's source is the VIP the query went to"
            );
            per_socket.push(dns_answer(i, &buf[..n]).expect("an A record").to_string());
        }
        // One socket, many queries: the socket keeps its backend.
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut sticky = Vec::new();
        for i in 0..20u16 {
            s.send_to(&dns_query(1000 + i, "who.test"), vip53).unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(from, vip53);
            sticky.push(dns_answer(1000 + i, &buf[..n]).unwrap().to_string());
        }
        (per_socket, sticky)
    });
    let seen = count(per_socket);
    for t in TASKS {
        assert!(
            seen.get(t).copied().unwrap_or(0) >= 20,
            "unconnected queries spread: {seen:?}"
        );
    }
    assert_eq!(
        count(sticky).len(),
        1,
        "one socket keeps one backend while the set is unchanged"
    );
}

#[test]
fn getpeername_shows_the_vip() {
    let fx = ApiFixture::start();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        let vip = addr(VIP, PORT);
        let tcp = TcpStream::connect_timeout(&vip, TIMEOUT).unwrap();
        assert_eq!(
            tcp.peer_addr().unwrap(),
            vip,
            "TcpStream::peer_addr shows the VIP"
        );
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect(vip).unwrap();
        assert_eq!(
            udp.peer_addr().unwrap(),
            vip,
            "a connected UDP socket's peer is the VIP"
        );
        // A direct connection is left alone.
        let direct = addr(TASKS[0], PORT);
        let tcp = TcpStream::connect_timeout(&direct, TIMEOUT).unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), direct);
    });
}

#[test]
fn socket_storage_is_freed_with_its_socket() {
    let fx = ApiFixture::start();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let n = 100_000;
    fx.sandbox.in_client(|| {
        for i in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"x", addr(VIP, PORT))
                .unwrap_or_else(|e| panic!("datagram #{i}: {e}"));
        }
    });
    // Every socket was counted as a (UDP, inactive) connection while it lived;
    // closing them released everything, and the maps still work.
    assert_eq!(fx.conns("FWM  317"), n as u64);
    let listed: serde_json::Value =
        serde_json::from_str(&fx.pins.ctl(&["list", "--json"]).unwrap()).unwrap();
    for b in listed[0]["backends"].as_array().unwrap() {
        assert_eq!(b["inactive_conns"], 0, "no connection left behind: {b}");
        assert_eq!(b["active_conns"], 0, "{b}");
    }
    fx.sandbox.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.send_to(b"y", addr(VIP, PORT)).unwrap();
        let mut buf = [0u8; 64];
        let (_, from) = s
            .recv_from(&mut buf)
            .expect("still balanced after 100,000 sockets");
        assert_eq!(from, addr(VIP, PORT));
    });
}

const V6_CONFIG: &str = r#"
[[service]]
name = "api6"
vip = "fd00:50::37"
backends = ["fd00:50::40", "fd00:50::41"]

[[service]]
name = "api"
vip = "172.50.0.37"
backends = ["172.50.0.40", "172.50.0.41"]
"#;

#[test]
fn ipv6_services_and_mapped_ipv4_vips_are_balanced() {
    let mut fx = ApiFixture::start_with(V6_CONFIG);
    let v6_tasks = ["fd00:50::40", "fd00:50::41"];
    for t in v6_tasks {
        fx.sandbox.add_backend_addr(t.parse().unwrap()).unwrap();
        fx.tcp
            .push(TcpIdServer::start(&fx.sandbox, addr(t, PORT)).unwrap());
        fx.udp
            .push(UdpIdServer::start(&fx.sandbox, addr(t, PORT)).unwrap());
    }
    let vip6 = addr("fd00:50::37", PORT);
    let tcp = fx.tcp_spread(vip6, 200, true);
    for t in v6_tasks {
        assert!(tcp.get(t).copied().unwrap_or(0) >= 40, "IPv6 TCP: {tcp:?}");
    }
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        // Connected UDP and unconnected UDP over IPv6, with the VIP as peer.
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen.push(svclb_tests::udp_identity(vip6, TIMEOUT).unwrap());
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.send_to(b"?", vip6).unwrap();
            let mut buf = [0u8; 128];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(from, vip6, "IPv6 reply from the VIP");
            seen.push(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
        let seen = count(seen);
        for t in v6_tasks {
            assert!(
                seen.get(t).copied().unwrap_or(0) >= 40,
                "IPv6 UDP: {seen:?}"
            );
        }
        let tcp = TcpStream::connect_timeout(&vip6, TIMEOUT).unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), vip6);

        // A dual-stack socket dialling ::ffff:172.50.0.37 gets the IPv4 service.
        let mapped: SocketAddr = "[::ffff:172.50.0.37]:8080".parse().unwrap();
        let mut who = Vec::new();
        for _ in 0..100 {
            let mut s = TcpStream::connect_timeout(&mapped, TIMEOUT).expect("mapped VIP connect");
            assert_eq!(
                s.peer_addr().unwrap(),
                mapped,
                "getpeername keeps the mapped VIP"
            );
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            who.push(line);
        }
        let who = count(who);
        for t in TASKS {
            assert!(
                who.get(t).copied().unwrap_or(0) >= 20,
                "mapped IPv4 VIP: {who:?}"
            );
        }
    });
}

#[test]
fn zero_backends_refuse_connect_and_sendto_at_once() {
    let fx = ApiFixture::start_with(
        "[[service]]\nname = \"none\"\nvip = \"172.50.0.37\"\n\n[[service]]\nname = \"none6\"\nvip = \"fd00:50::37\"\n",
    );
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        for vip in [addr(VIP, PORT), addr("fd00:50::37", PORT)] {
            let err = TcpStream::connect_timeout(&vip, TIMEOUT).expect_err("connect must fail");
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "connect {vip}: {err}"
            );
            let local = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(local).unwrap();
            let err = s.send_to(b"x", vip).expect_err("sendto must fail");
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "sendto {vip}: {err}"
            );
            let err = s.connect(vip).expect_err("UDP connect must fail");
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "UDP connect {vip}: {err}"
            );
        }
    });
}

const PORTS_CONFIG: &str = r#"
# FWM-style: every port of the VIP, the client's port kept.
[[service]]
name = "api"
vip = "172.50.0.37"
backends = ["172.50.0.40"]

# Per-port: VIP:80/tcp to 172.50.0.41:8080, like a Kubernetes Service port.
[[service]]
name = "web"
vip = "172.50.0.37"
port = 80
backends = [{ address = "172.50.0.41", port = 8080 }]

[[service]]
name = "web-udp"
vip = "172.50.0.37"
port = 80
protocol = "udp"
backends = [{ address = "172.50.0.41", port = 8080 }]

# A VIP with only a per-port service: other ports are refused.
[[service]]
name = "only80"
vip = "172.50.0.38"
port = 80
backends = [{ address = "172.50.0.40", port = 8080 }]
"#;

#[test]
fn per_port_services_win_over_all_ports_ones() {
    let fx = ApiFixture::start_with(PORTS_CONFIG);
    let web = fx.tcp_spread(addr(VIP, 80), 20, true);
    assert_eq!(
        web.get("172.50.0.41"),
        Some(&20),
        "VIP:80/tcp goes to the per-port backend: {web:?}"
    );
    let api = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert_eq!(
        api.get("172.50.0.40"),
        Some(&20),
        "other ports keep the all-ports service: {api:?}"
    );
    let only = fx.tcp_spread(addr("172.50.0.38", 80), 5, true);
    assert_eq!(only.get("172.50.0.40"), Some(&5), "{only:?}");
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        assert_eq!(
            svclb_tests::udp_identity(addr(VIP, 80), TIMEOUT).unwrap(),
            "172.50.0.41"
        );
        let s = TcpStream::connect_timeout(&addr(VIP, 80), TIMEOUT).unwrap();
        assert_eq!(
            s.peer_addr().unwrap(),
            addr(VIP, 80),
            "getpeername shows VIP:80, not :8080"
        );
        let err = TcpStream::connect_timeout(&addr("172.50.0.38", 81), TIMEOUT)
            .expect_err("no service for port 81");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    });
    let list = fx.pins.ctl(&["list"]).unwrap();
    assert!(list.contains("TCP  172.50.0.37:80 rr"), "{list}");
    assert!(list.contains("UDP  172.50.0.37:80 rr"), "{list}");
    assert!(list.contains("  -> 172.50.0.41:8080"), "{list}");
}

#[test]
fn weight_zero_drains_a_backend_without_breaking_its_connections() {
    let fx = ApiFixture::start();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    // Hold an established connection to each backend.
    let mut held: BTreeMap<String, TcpStream> = BTreeMap::new();
    fx.sandbox.in_client(|| {
        while held.len() < 2 {
            let mut s = TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0] as char);
            }
            held.entry(line).or_insert(s);
        }
    });
    let drained = write_temp(
        "drain.toml",
        "[[service]]\nname = \"api\"\nvip = \"172.50.0.37\"\nmark = 0x13d\nbackends = [\"172.50.0.40\", { address = \"172.50.0.41\", weight = 0 }]\n",
    )
    .unwrap();
    fx.pins.ctl(&["apply", drained.to_str().unwrap()]).unwrap();
    let spread = fx.tcp_spread(addr(VIP, PORT), 200, true);
    assert_eq!(
        spread.get(TASKS[0]),
        Some(&200),
        "no new connection to the quiescent backend: {spread:?}"
    );
    let list = fx.pins.ctl(&["list"]).unwrap();
    assert!(
        list.contains("  -> 172.50.0.41:0                Masq    0"),
        "{list}"
    );
    // The established connection to the drained backend carries on.
    let s = held.get_mut(TASKS[1]).unwrap();
    s.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

const SCOPED_CONFIG: &str = r#"
[[service]]
name = "front"
vip = "172.50.0.37"
networks = ["front"]
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "everyone"
vip = "172.50.0.38"
backends = ["172.50.0.41"]
"#;

/// A sandbox whose tasks and VIP (.37) all run identity servers, so an
/// untranslated connect to the VIP reaches "172.50.0.37"; svclbd follows
/// `config` attached to the sandbox cgroup on `network`. Fields drop in
/// order: daemon, servers, pins, sandbox.
struct Scoped {
    daemon: Svclbd,
    _servers: Vec<TcpIdServer>,
    config: std::path::PathBuf,
    pins: PinDir,
    sandbox: Sandbox,
}

impl Scoped {
    fn start(config: &str, network: &str) -> Scoped {
        let sandbox = Sandbox::new().unwrap();
        let mut servers = Vec::new();
        for t in TASKS.iter().chain([&VIP]) {
            sandbox.add_backend_addr(t.parse().unwrap()).unwrap();
            servers.push(TcpIdServer::start(&sandbox, addr(t, PORT)).unwrap());
        }
        let pins = PinDir::new();
        let config = write_temp("scoped.toml", config).unwrap();
        let cgroup = sandbox.cgroup_path().to_str().unwrap().to_string();
        let daemon = Svclbd::start(
            &pins,
            &[
                "--config",
                config.to_str().unwrap(),
                "--cgroup",
                &cgroup,
                "--network",
                network,
            ],
        )
        .unwrap();
        Scoped {
            daemon,
            _servers: servers,
            config,
            pins,
            sandbox,
        }
    }
}

/// A second cgroup next to the sandbox's, removed on drop.
struct ExtraCgroup(std::path::PathBuf);
impl ExtraCgroup {
    fn new(sandbox: &Sandbox, suffix: &str) -> ExtraCgroup {
        let cg = ExtraCgroup(sandbox.cgroup_path().with_file_name(format!(
            "{}-{suffix}",
            sandbox.cgroup_path().file_name().unwrap().to_str().unwrap()
        )));
        std::fs::create_dir(&cg.0).unwrap();
        cg
    }
}
impl Drop for ExtraCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The identity line a TCP connect to `target`:8080 gets, from a process
/// in the sandbox's client namespace and in `cgroup` from its first
/// instruction.
fn identity_from(sandbox: &Sandbox, cgroup: &std::path::Path, target: &str) -> String {
    let mut cmd = Command::new("/bin/bash");
    cmd.args([
        "-c",
        &format!("exec 3<>/dev/tcp/{target}/8080 && head -n1 <&3"),
    ]);
    sandbox.client_command(&mut cmd, false).unwrap();
    let procs = cgroup.join("cgroup.procs");
    unsafe {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(procs.to_str().unwrap()).unwrap();
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    String::from_utf8_lossy(&cmd.output().unwrap().stdout)
        .trim()
        .to_string()
}

const FRONT_ONLY: &str = r#"
[[service]]
name = "everyone"
vip = "172.50.0.38"
backends = ["172.50.0.41"]
"#;

/// The same, plus a service for network backnet only, on the VIP .37.
const WITH_BACKNET: &str = r#"
[[service]]
name = "everyone"
vip = "172.50.0.38"
backends = ["172.50.0.41"]

[[service]]
name = "back"
vip = "172.50.0.37"
networks = ["backnet"]
backends = ["172.50.0.40", "172.50.0.41"]
"#;

/// A scoping regression (the defects issue, item 2): svclbd attached its
/// cgroup on network frontnet, kept the snapshot of its startup apply
/// (which knew no network), and a reload that added a backnet-only
/// service handed backnet frontnet's bit, so frontnet's processes were
/// balanced to it. Here cgroups are attached on frontnet in every order
/// around the apply that adds backnet: by svclbd at start (then the file
/// changes: svclbd's reload), by svclb-ctl before that reload, by
/// svclb-ctl after it, and around an `svclb-ctl apply` of yet another
/// network. None of them is balanced to backnet's service; a cgroup on
/// backnet is (so the check can tell).
#[test]
fn a_cgroup_is_never_balanced_to_a_network_it_is_not_on_whatever_the_order() {
    let fx = Scoped::start(FRONT_ONLY, "frontnet");
    let (sandbox, pins, config, daemon) = (&fx.sandbox, &fx.pins, &fx.config, &fx.daemon);
    let attach = |cg: &ExtraCgroup, network: &str| {
        pins.ctl(&[
            "attach",
            "--cgroup",
            cg.0.to_str().unwrap(),
            "--network",
            network,
        ])
        .unwrap();
    };
    let before_reload = ExtraCgroup::new(sandbox, "before");
    attach(&before_reload, "frontnet");

    // svclbd's own reload, from the snapshot it kept.
    std::fs::write(config, WITH_BACKNET).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pins.ctl(&["list"]).unwrap().contains("172.50.0.40") {
        assert!(
            std::time::Instant::now() < deadline,
            "svclbd did not apply the changed file:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let after_reload = ExtraCgroup::new(sandbox, "after");
    attach(&after_reload, "frontnet");
    // Another process's apply of a third network, then svclbd's again.
    let third = write_temp(
        "third.toml",
        &format!("{WITH_BACKNET}\n[[service]]\nname = \"third\"\nvip = \"172.50.0.39\"\nnetworks = [\"thirdnet\"]\nbackends = [\"172.50.0.40\"]\n"),
    )
    .unwrap();
    pins.ctl(&["apply", third.to_str().unwrap()]).unwrap();
    let after_apply = ExtraCgroup::new(sandbox, "apply");
    attach(&after_apply, "frontnet");
    let on_backnet = ExtraCgroup::new(sandbox, "backnet");
    attach(&on_backnet, "backnet");

    let attachments = pins.ctl(&["attachments"]).unwrap();
    println!("{attachments}");
    let frontnet_lines: Vec<&str> = attachments
        .lines()
        .filter(|l| l.contains("frontnet"))
        .collect();
    assert_eq!(frontnet_lines.len(), 4, "{attachments}");
    for line in &frontnet_lines {
        assert!(
            !line.contains("backnet") && !line.contains("thirdnet"),
            "a frontnet cgroup is listed on another network: {line}"
        );
    }
    let frontnet: [&std::path::Path; 4] = [
        sandbox.cgroup_path(),
        &before_reload.0,
        &after_reload.0,
        &after_apply.0,
    ];
    for cg in frontnet {
        for _ in 0..10 {
            assert_eq!(
                identity_from(sandbox, cg, VIP),
                VIP,
                "{}: on frontnet, backnet's VIP must be a plain address",
                cg.display()
            );
        }
        assert_eq!(
            identity_from(sandbox, cg, "172.50.0.38"),
            "172.50.0.41",
            "{}: an unscoped service is still balanced",
            cg.display()
        );
    }
    let backnet_seen: Vec<String> = (0..10)
        .map(|_| identity_from(sandbox, &on_backnet.0, VIP))
        .collect();
    assert!(
        backnet_seen.iter().all(|who| TASKS.contains(&who.as_str())),
        "on backnet the VIP is balanced to its tasks: {backnet_seen:?}"
    );
    for cg in [&before_reload, &after_reload, &after_apply, &on_backnet] {
        pins.ctl(&["detach", "--cgroup", cg.0.to_str().unwrap()])
            .unwrap();
    }
}

#[test]
fn services_can_be_limited_to_networks_of_attached_cgroups() {
    let fx = Scoped::start(SCOPED_CONFIG, "front");
    let (sandbox, pins) = (&fx.sandbox, &fx.pins);
    // A second attached cgroup, on no network.
    let other = ExtraCgroup::new(sandbox, "other");
    pins.ctl(&["attach", "--cgroup", other.0.to_str().unwrap()])
        .unwrap();
    let attachments = pins.ctl(&["attachments"]).unwrap();
    assert!(
        attachments.lines().any(|l| l.contains("\tfront\t")),
        "{attachments}"
    );
    assert_eq!(
        attachments.lines().count(),
        2,
        "two cgroups attached at once: {attachments}"
    );

    let run_in = |cgroup: &std::path::Path, target: &str| identity_from(sandbox, cgroup, target);
    let mut front_seen = Vec::new();
    for _ in 0..20 {
        front_seen.push(run_in(sandbox.cgroup_path(), VIP));
        assert_eq!(
            run_in(&other.0, VIP),
            VIP,
            "outside network front the VIP is plain"
        );
    }
    assert!(
        !front_seen.contains(&VIP.to_string()),
        "on network front it is balanced: {front_seen:?}"
    );
    assert_eq!(
        run_in(&other.0, "172.50.0.38"),
        "172.50.0.41",
        "unlimited services are seen by every attached cgroup"
    );
    assert_eq!(run_in(sandbox.cgroup_path(), "172.50.0.38"), "172.50.0.41");
    pins.ctl(&["detach", "--cgroup", other.0.to_str().unwrap()])
        .unwrap();
}

#[test]
fn a_non_vip_connect_takes_the_short_path() {
    // The connect program's average cost per call, from the kernel's BPF
    // statistics: a non-VIP destination (one hash lookup) must cost clearly
    // less than a VIP (lookups, pick, socket storage, counters).
    let fx = ApiFixture::start();
    let stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time stats");
    // Our program: the one linked to this sandbox's cgroup (other svclb
    // instances may be loaded on the machine).
    let link = fx
        .pins
        .path()
        .join("links")
        .join(fx.sandbox.cgroup_path().file_name().unwrap())
        .join("svclb_connect4");
    let prog_id = aya::programs::links::PinnedLink::from_pin(&link)
        .map(aya::programs::links::FdLink::from)
        .and_then(|l| l.info())
        .expect("the pinned connect4 link")
        .program_id();
    let per_call = || -> (u64, u64) {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| p.id() == prog_id)
            .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
            .fold((0, 0), |(t, c), (t2, c2)| (t + t2, c + c2))
    };
    let n = 3000;
    let (t0, c0) = per_call();
    let _ = fx.tcp_spread(addr(TASKS[0], PORT), n, true);
    let (t1, c1) = per_call();
    let _ = fx.tcp_spread(addr(VIP, PORT), n, true);
    let (t2, c2) = per_call();
    drop(stats);
    assert_eq!(c1 - c0, n as u64, "the program ran once per connect");
    assert_eq!(c2 - c1, n as u64);
    let plain = (t1 - t0) as f64 / n as f64;
    let vip = (t2 - t1) as f64 / n as f64;
    println!("connect4: {plain:.0} ns per non-VIP connect, {vip:.0} ns per VIP connect");
    assert!(
        plain < vip,
        "a non-VIP connect ({plain:.0} ns) costs less than a VIP one ({vip:.0} ns)"
    );
}
