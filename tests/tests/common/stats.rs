//! What the statistics tests share: `svclb-ctl` JSON and stats readers,
//! the nftables counters that check svclb's, the IPv4+IPv6 fixture and
//! the known workload run on it, and the JSON report's rows.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use serde_json::Value;
use svclb_tests::{PinDir, Sandbox, StatsRow, TcpIdServer, UdpIdServer};

// ---------------------------------------------------------------------------
// Helpers

/// `svclb-ctl ARGS --json`, parsed.
pub fn ctl_json(pins: &PinDir, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = pins.ctl(&all).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("svclb-ctl {args:?} --json: {e}\n{text}"))
}

/// ActiveConn and InActConn of each backend, from `svclb-ctl list --json`.
pub fn gauges(pins: &PinDir) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for svc in ctl_json(pins, &["list"]).as_array().unwrap() {
        for b in svc["backends"].as_array().unwrap() {
            out.insert(
                b["address"].as_str().unwrap().to_string(),
                (
                    b["active_conns"].as_u64().unwrap(),
                    b["inactive_conns"].as_u64().unwrap(),
                ),
            );
        }
    }
    out
}

pub fn gauge_sums(pins: &PinDir) -> (u64, u64) {
    gauges(pins)
        .values()
        .fold((0, 0), |(a, i), (da, di)| (a + da, i + di))
}

/// Waits until the gauges summed over all backends are (active, inactive).
pub fn wait_gauges(pins: &PinDir, want: (u64, u64), what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let g = gauges(pins);
        let sums = g.values().fold((0, 0), |(a, i), (da, di)| (a + da, i + di));
        if sums == want {
            Ok(())
        } else {
            Err(format!(
                "(active, inactive) = {sums:?}, want {want:?}: {g:?}"
            ))
        }
    });
}

/// The counters of each backend row of `svclb-ctl stats --exact`, by address.
pub fn backend_rows(pins: &PinDir) -> BTreeMap<String, StatsRow> {
    svclb_tests::parse_stats(&pins.ctl(&["stats", "--exact"]).unwrap())
        .unwrap()
        .into_iter()
        .filter(|r| r.is_backend)
        .map(|r| (strip_port(&r.name), r))
        .collect()
}

/// `172.50.0.40:0` -> `172.50.0.40`, `[fd00:50::40]:0` -> `fd00:50::40`.
pub fn strip_port(name: &str) -> String {
    let host = name.rsplit_once(':').map_or(name, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Writes and reads on a stream at the same time (a large echo would
/// deadlock otherwise): sends `total` bytes, half-closes, returns what came back.
pub fn stream_echo(stream: TcpStream, total: usize) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(total + 64);
    (&stream).read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

// ---------------------------------------------------------------------------
// nftables counters: the independent view of the same flows

pub const NFT_TABLE: &str = "svclb_stats_test";

/// Per-backend rule counters in the client netns: `to` counts packets
/// (and L3 bytes) sent to a backend's service port, `from` those received
/// from it; ICMP/NDP and other ports are not counted.
pub struct NftCounters<'a> {
    sandbox: &'a Sandbox,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub to_pkts: u64,
    pub to_bytes: u64,
    pub from_pkts: u64,
    pub from_bytes: u64,
}

impl<'a> NftCounters<'a> {
    pub fn install(sandbox: &'a Sandbox, backends: &[&str], port: u16) -> NftCounters<'a> {
        let mut script = format!(
            "table inet {NFT_TABLE} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n"
        );
        let family = |b: &str| {
            if b.contains(':') {
                "ip6"
            } else {
                "ip"
            }
        };
        for b in backends {
            script += &format!(
                "    {} daddr {b} meta l4proto {{ tcp, udp }} th dport {port} counter comment \"to {b}\"\n",
                family(b)
            );
        }
        script += "  }\n  chain in {\n    type filter hook input priority 0; policy accept;\n";
        for b in backends {
            script += &format!(
                "    {} saddr {b} meta l4proto {{ tcp, udp }} th sport {port} counter comment \"from {b}\"\n",
                family(b)
            );
        }
        script += "  }\n}\n";
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sandbox.client_command(&mut cmd, false).unwrap();
        let mut child = cmd.spawn().expect("nft (apt package nftables) runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
        NftCounters { sandbox }
    }

    /// The counters of every backend, from `nft -j list table`.
    pub fn read(&self) -> BTreeMap<String, Flow> {
        let mut cmd = Command::new("nft");
        cmd.args(["-j", "list", "table", "inet", NFT_TABLE]);
        self.sandbox.client_command(&mut cmd, false).unwrap();
        let text = svclb_tests::run(&mut cmd).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        let mut out: BTreeMap<String, Flow> = BTreeMap::new();
        for item in json["nftables"].as_array().unwrap() {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let comment = rule["comment"].as_str().unwrap();
            let counter = rule["expr"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|e| e.get("counter"))
                .unwrap_or_else(|| panic!("no counter in {rule}"));
            let (pkts, bytes) = (
                counter["packets"].as_u64().unwrap(),
                counter["bytes"].as_u64().unwrap(),
            );
            let (dir, backend) = comment.split_once(' ').unwrap();
            let flow = out.entry(backend.to_string()).or_default();
            match dir {
                "to" => (flow.to_pkts, flow.to_bytes) = (pkts, bytes),
                "from" => (flow.from_pkts, flow.from_bytes) = (pkts, bytes),
                _ => panic!("unexpected rule comment {comment:?}"),
            }
        }
        out
    }
}

/// svclb's counters in the same shape: In is client-to-backend ("to"),
/// Out backend-to-client ("from").
pub fn svclb_flows(pins: &PinDir) -> BTreeMap<String, Flow> {
    backend_rows(pins)
        .into_iter()
        .map(|(b, r)| {
            (
                b,
                Flow {
                    to_pkts: r.in_pkts,
                    to_bytes: r.in_bytes,
                    from_pkts: r.out_pkts,
                    from_bytes: r.out_bytes,
                },
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The IPv4+IPv6 fixture and the known workload

pub const V4_V6_CONFIG: &str = r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "api6"
vip = "fd00:50::37"
mark = 0x13e
backends = ["fd00:50::40", "fd00:50::41"]
"#;

pub const V6_VIP: &str = "fd00:50::37";
pub const V6_TASKS: [&str; 2] = ["fd00:50::40", "fd00:50::41"];
/// A port where the tasks also listen, reached directly (untranslated).
pub const DIRECT_PORT: u16 = 9090;

/// The fixture with the IPv6 service's tasks and direct-port servers too.
pub fn v4_v6_fixture() -> ApiFixture {
    let mut fx = ApiFixture::start_with(V4_V6_CONFIG);
    for t in V6_TASKS {
        fx.sandbox.add_backend_addr(t.parse().unwrap()).unwrap();
        fx.tcp
            .push(TcpIdServer::start(&fx.sandbox, addr(t, PORT)).unwrap());
        fx.udp
            .push(UdpIdServer::start(&fx.sandbox, addr(t, PORT)).unwrap());
    }
    for t in TASKS {
        fx.tcp
            .push(TcpIdServer::start(&fx.sandbox, addr(t, DIRECT_PORT)).unwrap());
    }
    fx
}

/// How many of each: TCP to the IPv4 VIP, TCP to the IPv6 VIP, connected
/// UDP sockets, unconnected UDP sockets, untranslated TCP to DIRECT_PORT
/// (needs [`v4_v6_fixture`]'s servers there).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mix {
    pub tcp4: usize,
    pub tcp6: usize,
    pub udp: usize,
    pub unconnected: usize,
    pub direct: usize,
    /// One more TCP connection to the IPv4 VIP that streams this many
    /// bytes each way (segmentation offload: packets as the IP layer sees them).
    pub stream: usize,
}

/// What the workload did, per backend (the identity each reply named).
#[derive(Debug, Default)]
pub struct Workload {
    pub conns: BTreeMap<String, u64>,
    pub payload_bytes: u64,
}

/// The known workload, from the web task (client netns, sandbox cgroup):
/// TCP echo connections to both VIPs with payloads of 100..=499 bytes;
/// connected UDP sockets with three request/responses each; unconnected
/// UDP sockets (sendto the VIP) with three each; and untranslated TCP to
/// the tasks' other port, which neither svclb nor the nft rules count.
/// With `tcp6` > 0 (the IPv6 service is there), every other connected UDP
/// socket is IPv6 too.
pub fn run_workload(fx: &ApiFixture, mix: Mix) -> Workload {
    let Mix {
        tcp4,
        tcp6,
        udp,
        unconnected,
        direct,
        stream,
    } = mix;
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        let mut w = Workload::default();
        let tcp = |vip: SocketAddr, i: usize, w: &mut Workload| {
            let payload = vec![b'a' + (i % 26) as u8; 100 + (i * 37) % 400];
            let (who, echoed) = svclb_tests::tcp_echo(vip, &payload, TIMEOUT)
                .unwrap_or_else(|e| panic!("TCP echo #{i} to {vip}: {e}"));
            assert_eq!(echoed, payload, "echo from {who}");
            w.payload_bytes += payload.len() as u64;
            *w.conns.entry(who).or_default() += 1;
        };
        for i in 0..tcp4 {
            tcp(addr(VIP, PORT), i, &mut w);
        }
        for i in 0..tcp6 {
            tcp(addr(V6_VIP, PORT), i, &mut w);
        }
        for i in 0..udp {
            // Every other one over IPv6 when the IPv6 service is there.
            let v6 = tcp6 > 0 && i % 2 == 1;
            let vip = if v6 {
                addr(V6_VIP, PORT)
            } else {
                addr(VIP, PORT)
            };
            let socket = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            socket.connect(vip).unwrap();
            let mut who = String::new();
            for round in 0..3 {
                let payload = vec![b'u'; 50 + 10 * round + i % 7];
                socket.send(&payload).unwrap();
                let mut buf = [0u8; 2048];
                let n = socket.recv(&mut buf).expect("UDP reply");
                let text = String::from_utf8_lossy(&buf[..n]);
                let (ident, echoed) = text.split_once('\n').unwrap();
                assert_eq!(echoed.as_bytes(), &payload[..]);
                who = ident.to_string();
                w.payload_bytes += payload.len() as u64;
            }
            *w.conns.entry(who).or_default() += 1;
        }
        for i in 0..unconnected {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut who = String::new();
            for round in 0..3 {
                let payload = vec![b's'; 40 + round + i % 5];
                socket.send_to(&payload, addr(VIP, PORT)).unwrap();
                let mut buf = [0u8; 2048];
                let (n, from) = socket.recv_from(&mut buf).expect("UDP reply");
                assert_eq!(from, addr(VIP, PORT), "the reply shows the VIP");
                let text = String::from_utf8_lossy(&buf[..n]);
                who = text.split_once('\n').unwrap().0.to_string();
                w.payload_bytes += payload.len() as u64;
            }
            *w.conns.entry(who).or_default() += 1;
        }
        if stream > 0 {
            let s = TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let back = stream_echo(s, stream);
            let (who, echoed) = back.split_at(back.iter().position(|b| *b == b'\n').unwrap() + 1);
            assert_eq!(echoed.len(), stream);
            w.payload_bytes += stream as u64;
            *w.conns
                .entry(String::from_utf8_lossy(&who[..who.len() - 1]).into_owned())
                .or_default() += 1;
        }
        // Untranslated: the same tasks, another port, from the same cgroup.
        for (i, t) in TASKS.iter().cycle().take(direct).enumerate() {
            let (who, _) = svclb_tests::tcp_echo(addr(t, DIRECT_PORT), &[b'd'; 200], TIMEOUT)
                .unwrap_or_else(|e| panic!("direct #{i}: {e}"));
            assert_eq!(who, *t);
        }
        w
    })
}

/// Reads both views until neither has changed for 500 ms (every TCP
/// connection fully closed, no packet in flight).
pub fn settled(
    fx: &ApiFixture,
    nft: &NftCounters,
) -> (BTreeMap<String, Flow>, BTreeMap<String, Flow>) {
    let mut last = (svclb_flows(&fx.pins), nft.read());
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = (svclb_flows(&fx.pins), nft.read());
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(500) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "the counters kept changing for 15 s: {last:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The JSON report (`svclb-ctl rate --json`, `stats --json`)

/// One rate row of `svclb-ctl rate --json`/`stats --json`: [cps, in_pps, out_pps, in_bps, out_bps].
pub fn rates_of(v: &Value) -> [u64; 5] {
    let r = &v["rates"];
    ["cps", "in_pps", "out_pps", "in_bps", "out_bps"].map(|k| r[k].as_u64().unwrap())
}

pub fn counters_of(v: &Value) -> [u64; 5] {
    let s = &v["stats"];
    ["conns", "in_pkts", "out_pkts", "in_bytes", "out_bytes"].map(|k| s[k].as_u64().unwrap())
}

pub fn service<'a>(report: &'a Value, name: &str) -> &'a Value {
    report
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {report}"))
}

/// `svclb-ctl rate --json`: (report, stderr).
pub fn rate_json(pins: &PinDir) -> (Value, String) {
    let out = Command::new(svclb_tests::daemon::bin("svclb-ctl"))
        .arg("--pin-dir")
        .arg(pins.path())
        .args(["rate", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// JSON rows in the text's order: (name as ipvsadm prints it, counters, rates).
pub fn json_rows(report: &Value) -> Vec<(String, [u64; 5], [u64; 5])> {
    let mut rows = Vec::new();
    for s in report.as_array().unwrap() {
        rows.push((format!("FWM {}", s["mark"]), counters_of(s), rates_of(s)));
        for b in s["backends"].as_array().unwrap() {
            let port = b["port"].as_u64().unwrap_or(0);
            rows.push((
                format!("{}:{port}", b["address"].as_str().unwrap()),
                counters_of(b),
                rates_of(b),
            ));
        }
    }
    rows
}
