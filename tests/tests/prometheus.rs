//! Prometheus metrics, end to end: they pass promtool, equal the counters
//! and a real Prometheus server scrapes them.
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces, and the metrics endpoint
//! and the Prometheus server listen on 127.0.0.1 only.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::stats::*;
use common::*;
use serde_json::Value;
use svclb_tests::http::get as http_get;

/// A real Prometheus server on loopback, with its own config and data
/// directory; killed and removed on drop (also when the test panics).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let version = Command::new("prometheus").arg("--version").output().expect(
            "the prometheus binary is missing: install Debian's `prometheus` package (`cargo xtask setup` does)",
        );
        assert!(version.status.success(), "prometheus --version failed");
        let dir = std::env::temp_dir().join(format!(
            "svclb-prometheus-{}-{}",
            std::process::id(),
            svclb_tests::daemon::unique()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: svclbd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, dir, addr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query's single value (None: no result yet).
    fn query(&self, promql: &str) -> Result<Option<f64>, String> {
        let mut encoded = String::new();
        for b in promql.bytes() {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"))
            .map_err(|e| format!("GET: {e}"))?;
        if status != 200 {
            return Err(format!("HTTP {status}: {body}"));
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let result = v["data"]["result"].as_array().ok_or(body.clone())?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one["value"][1].as_str().unwrap().parse().unwrap())),
            _ => Err(format!("more than one series: {body}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BACKEND_METRICS: [&str; 8] = [
    "svclb_backend_connections_total",
    "svclb_backend_incoming_packets_total",
    "svclb_backend_outgoing_packets_total",
    "svclb_backend_incoming_bytes_total",
    "svclb_backend_outgoing_bytes_total",
    "svclb_backend_connections_active",
    "svclb_backend_connections_inactive",
    "svclb_backend_weight",
];

#[test]
fn metrics_pass_promtool_equal_the_counters_and_a_real_prometheus_scrapes_them() {
    let fx = ApiFixture::start_with(
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", { address = "172.50.0.41", weight = 2 }]

# Per-port: VIP:80/tcp to 172.50.0.41:8080.
[[service]]
name = "web"
vip = "172.50.0.37"
port = 80
backends = [{ address = "172.50.0.41", port = 8080 }]
"#,
    );
    let metrics = fx.daemon.as_ref().unwrap().metrics_addr().unwrap();
    let n = 120;
    let nft = NftCounters::install(&fx.sandbox, &TASKS, PORT);
    let w = run_workload(
        &fx,
        Mix {
            tcp4: n,
            udp: 10,
            ..Mix::default()
        },
    );
    // And a few to the per-port service.
    let web = 7;
    {
        let _guard = fx.sandbox.enter_cgroup().unwrap();
        fx.sandbox.in_client(|| {
            for _ in 0..web {
                let (who, _) = svclb_tests::tcp_echo(addr(VIP, 80), b"web", TIMEOUT).unwrap();
                assert_eq!(who, "172.50.0.41");
            }
        });
    }
    let _ = settled(&fx, &nft);
    // One connection stays open: an active gauge of 1.
    let open = {
        let _guard = fx.sandbox.enter_cgroup().unwrap();
        fx.sandbox
            .in_client(|| TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT).unwrap())
    };
    wait_gauges(&fx.pins, (1, 0), "the open connection is active");
    let conns = (n + 10 + 1) as u64;

    let (status, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let (status, _) = http_get(metrics, "/").unwrap();
    assert_eq!(status, 404, "only /metrics is served");

    // promtool's lint: exit 0 means no problem at all.
    if let Err(e) = svclb_tests::http::promtool_check(&text) {
        panic!("{e:#}\n{text}");
    }

    // Names, labels and values: the ones svclb-ctl shows (`stats --json`,
    // whose numbers are those of `stats --exact`, row for row).
    let samples = svclb_tests::http::parse_exposition(&text);
    let stats = ctl_json(&fx.pins, &["stats"]);
    let exact = svclb_tests::parse_stats(&fx.pins.ctl(&["stats", "--exact"]).unwrap()).unwrap();
    let rows = json_rows(&stats);
    assert_eq!(exact.len(), rows.len());
    for (e, (name, c, _)) in exact.iter().zip(&rows) {
        assert_eq!(
            [e.conns, e.in_pkts, e.out_pkts, e.in_bytes, e.out_bytes],
            *c,
            "{name}"
        );
    }
    let expected_labels: BTreeSet<&str> = [
        "service",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "proto",
        "local_mark",
    ]
    .into();
    // (service, proto, local_port, local_mark, remote_port) as node_exporter
    // labels them: FWM services by mark, per-port ones by protocol and port.
    for (name, proto, local_port, mark, remote_port) in [
        ("api", "FWM", "0", "0000013D", "0"),
        ("web", "TCP", "80", "", "8080"),
    ] {
        let svc = service(&stats, name);
        for b in svc["backends"].as_array().unwrap() {
            let remote = b["address"].as_str().unwrap();
            let c = counters_of(b);
            let want = [
                c[0],
                c[1],
                c[2],
                c[3],
                c[4],
                b["active_conns"].as_u64().unwrap(),
                b["inactive_conns"].as_u64().unwrap(),
                b["weight"].as_u64().unwrap(),
            ];
            for (metric, want) in BACKEND_METRICS.iter().zip(want) {
                let found: Vec<&svclb_tests::http::Sample> = samples
                    .iter()
                    .filter(|s| {
                        s.name == *metric
                            && s.labels.get("service").map(String::as_str) == Some(name)
                            && s.labels.get("remote_address").map(String::as_str) == Some(remote)
                    })
                    .collect();
                assert_eq!(found.len(), 1, "{metric} for {name} {remote}:\n{text}");
                let s = found[0];
                assert_eq!(
                    s.labels.keys().map(String::as_str).collect::<BTreeSet<_>>(),
                    expected_labels
                );
                assert_eq!(s.labels["local_address"], VIP);
                assert_eq!(s.labels["local_port"], local_port, "{name}");
                assert_eq!(s.labels["remote_port"], remote_port, "{name}");
                assert_eq!(s.labels["proto"], proto, "{name}");
                assert_eq!(
                    s.labels["local_mark"], mark,
                    "{name}: 8 hex digits for FWM, none per port, like node_exporter"
                );
                assert_eq!(
                    s.value, want as f64,
                    "{metric}{{service={name},remote_address={remote}}}"
                );
            }
        }
    }
    assert!(counters_of(service(&stats, "web"))[0] == web as u64);
    // The node totals are the sums.
    let total = |metric: &str| {
        samples
            .iter()
            .find(|s| s.name == metric && s.labels.is_empty())
            .unwrap_or_else(|| panic!("no {metric}"))
            .value as u64
    };
    let sum = |i: usize| {
        exact
            .iter()
            .filter(|r| r.is_backend)
            .map(|r| [r.conns, r.in_pkts, r.out_pkts, r.in_bytes, r.out_bytes][i])
            .sum::<u64>()
    };
    for (i, metric) in [
        "svclb_connections_total",
        "svclb_incoming_packets_total",
        "svclb_outgoing_packets_total",
        "svclb_incoming_bytes_total",
        "svclb_outgoing_bytes_total",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(total(metric), sum(i), "{metric}");
    }
    assert_eq!(total("svclb_connections_total"), conns + web as u64);
    assert_eq!(w.conns.values().sum::<u64>() + 1, conns);

    // A real Prometheus scrapes svclbd and answers PromQL with the count.
    let prom = Prometheus::start(metrics);
    let got = eventually(
        Duration::from_secs(30),
        "Prometheus answers the query",
        || match prom.query(r#"sum(svclb_backend_connections_total{service="api"})"#) {
            Ok(Some(v)) if v == conns as f64 => Ok(v),
            other => Err(format!("{other:?}; prometheus log:\n{}", prom.log())),
        },
    );
    assert_eq!(got, conns as f64);
    let per_backend = prom
        .query(r#"svclb_backend_connections_total{remote_address="172.50.0.41",proto="FWM",local_mark="0000013D"}"#)
        .unwrap();
    let api41 = exact
        .iter()
        .find(|r| r.name == "172.50.0.41:0")
        .unwrap()
        .conns;
    assert_eq!(per_backend, Some(api41 as f64));
    let weight = prom
        .query(r#"svclb_backend_weight{service="api",remote_address="172.50.0.41"}"#)
        .unwrap();
    assert_eq!(weight, Some(2.0));
    let per_port = prom
        .query(r#"svclb_backend_connections_total{proto="TCP",local_port="80",remote_port="8080"}"#)
        .unwrap();
    assert_eq!(per_port, Some(web as f64));
    drop(prom);
    drop(open);
}
