//! The control plane. The config file (watched, SIGHUP, `apply`,
//! `diff`), DNS discovery against a real dnsmasq in the sandbox, restarts
//! and upgrades without a failed connect, foreign pins, teardown, and
//! attaching by cgroup, PID and container. Run as root, serially
//! (`cargo xtask test`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use svclb_tests::bpf::{cgroup_prog_count, create_pinned_map, ATTACH_INET4_CONNECT, MAP_TYPE_HASH};
use svclb_tests::daemon::write_temp;
use svclb_tests::dns::Dnsmasq;
use svclb_tests::fake_docker::FakeDocker;
use svclb_tests::{PinDir, Sandbox, Svclbd, TcpIdServer};

/// One service as `svclb-ctl list --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    name: String,
    vip: String,
    mark: u64,
    /// "addr weight"
    backends: BTreeSet<String>,
}

fn listed(pins: &PinDir) -> Vec<Listed> {
    let text = pins.ctl(&["list", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|s| Listed {
            name: s["name"].as_str().unwrap().to_owned(),
            vip: s["vip"].as_str().unwrap().to_owned(),
            mark: s["mark"].as_u64().unwrap(),
            backends: s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{} {}", b["address"].as_str().unwrap(), b["weight"]))
                .collect(),
        })
        .collect()
}

/// The backends of the service named `name` (with weights), or None.
fn backends_of(pins: &PinDir, name: &str) -> Option<BTreeSet<String>> {
    listed(pins)
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.backends)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// [`common::eventually`] over a read and a check; returns how long it
/// took, or panics with `what` and the last value after `within`.
#[track_caller]
fn settles<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    mut read: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> Duration {
    let start = Instant::now();
    common::eventually(within, what, || {
        let value = read();
        if check(&value) {
            Ok(())
        } else {
            Err(format!("{value:?}"))
        }
    });
    start.elapsed()
}

/// Sandbox with TCP identity servers on `tasks` (port 8080).
fn sandbox_with(tasks: &[&str]) -> (Sandbox, Vec<TcpIdServer>) {
    let sandbox = Sandbox::new().expect("sandbox");
    let servers = tasks
        .iter()
        .map(|t| {
            sandbox.add_backend_addr(t.parse().unwrap()).unwrap();
            TcpIdServer::start(&sandbox, addr(t, PORT)).unwrap()
        })
        .collect();
    (sandbox, servers)
}

fn cgroup_arg(sandbox: &Sandbox) -> String {
    sandbox.cgroup_path().to_str().unwrap().to_owned()
}

/// `n` TCP connects to the VIP from the sandbox cgroup; who answered.
fn spread(sandbox: &Sandbox, n: usize) -> BTreeMap<String, usize> {
    let _guard = sandbox.enter_cgroup().unwrap();
    sandbox.in_client(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let who = svclb_tests::tcp_identity(addr(VIP, PORT), TIMEOUT)
                .unwrap_or_else(|e| panic!("connect #{i} to the VIP failed: {e}"));
            *seen.entry(who).or_insert(0) += 1;
        }
        seen
    })
}

fn conns(pins: &PinDir, row: &str) -> u64 {
    svclb_tests::parse_stats(&pins.ctl(&["stats", "--exact"]).unwrap())
        .unwrap()
        .iter()
        .find(|r| r.name == row)
        .unwrap_or_else(|| panic!("no row {row}"))
        .conns
}

// ---- 1. The declarative file. ----

const API_40: &str = r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40"]
"#;

#[test]
fn svclbd_follows_the_file_when_it_changes_and_refuses_bad_ones() {
    let (sandbox, _servers) = sandbox_with(&TASKS);
    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("svclb-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("svclb.toml");
    std::fs::write(&path, API_CONFIG).unwrap();
    let daemon = Svclbd::start(
        &pins,
        &[
            "--config",
            path.to_str().unwrap(),
            "--cgroup",
            &cgroup_arg(&sandbox),
        ],
    )
    .unwrap();
    let both = set(&["172.50.0.40 1", "172.50.0.41 1"]);
    assert_eq!(backends_of(&pins, "api"), Some(both.clone()));
    let within = Duration::from_secs(3);

    // Written in place.
    std::fs::write(&path, API_40).unwrap();
    settles(
        within,
        "an in-place write is applied",
        || backends_of(&pins, "api"),
        |b| *b == Some(set(&["172.50.0.40 1"])),
    );
    assert_eq!(spread(&sandbox, 20).get(TASKS[0]), Some(&20));

    // Replaced the way editors do: a new file renamed over the old one.
    let tmp = dir.join(".svclb.toml.tmp");
    std::fs::write(
        &tmp,
        API_CONFIG.replace(
            "\"172.50.0.41\"",
            "{ address = \"172.50.0.41\", weight = 3 }",
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    settles(
        within,
        "a rename over the file is applied",
        || backends_of(&pins, "api"),
        |b| *b == Some(set(&["172.50.0.40 1", "172.50.0.41 3"])),
    );

    // A file that does not validate changes nothing, and says why, naming
    // the file, line and field.
    let before = listed(&pins);
    std::fs::write(&path, API_CONFIG.replace("172.50.0.37", "172.50.0.370")).unwrap();
    daemon
        .wait_for_log("reload refused, nothing changed", within)
        .unwrap();
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("{}:4:", path.display())) && log.contains("service[0].vip"),
        "{log}"
    );
    daemon.signal(libc::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        daemon.log_text().matches("reload refused").count(),
        2,
        "SIGHUP re-reads it"
    );
    assert_eq!(listed(&pins), before);

    // Removing the file changes nothing either; writing it back applies it.
    std::fs::remove_file(&path).unwrap();
    daemon.wait_for_log("cannot read the file", within).unwrap();
    assert_eq!(listed(&pins), before);
    std::fs::write(&path, API_40).unwrap();
    settles(
        within,
        "the file written back is applied",
        || backends_of(&pins, "api"),
        |b| *b == Some(set(&["172.50.0.40 1"])),
    );
    drop(daemon);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn svclb_ctl_diff_shows_and_apply_applies() {
    let fx = ApiFixture::start();
    let before = pins_list(&fx.pins);
    let next = write_temp(
        "next.toml",
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = [{ address = "172.50.0.40", weight = 2 }, "172.50.0.42"]

[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = ["172.50.0.21"]
"#,
    )
    .unwrap();
    let next = next.to_str().unwrap();
    let diff = fx.pins.ctl(&["diff", next]).unwrap();
    let lines: BTreeSet<&str> = diff.lines().collect();
    for expected in [
        "+ -A -f 296 -s rr    # db 172.50.0.20",
        "+ -a -f 296 -r 172.50.0.21:0 -m -w 1",
        "~ -e -f 317 -r 172.50.0.40:0 -m -w 2    # weight was 1",
        "+ -a -f 317 -r 172.50.0.42:0 -m -w 1",
        "- -d -f 317 -r 172.50.0.41:0",
    ] {
        assert!(lines.contains(expected), "diff lacks {expected:?}:\n{diff}");
    }
    assert_eq!(lines.len(), 5, "{diff}");
    assert_eq!(pins_list(&fx.pins), before, "diff changes nothing");

    let applied = fx.pins.ctl(&["apply", next]).unwrap();
    assert_eq!(applied, diff, "apply prints what it did, as diff predicted");
    assert_eq!(
        backends_of(&fx.pins, "api"),
        Some(set(&["172.50.0.40 2", "172.50.0.42 1"]))
    );
    assert_eq!(backends_of(&fx.pins, "db"), Some(set(&["172.50.0.21 1"])));
    assert_eq!(
        fx.pins.ctl(&["diff", next]).unwrap(),
        "",
        "nothing left to do"
    );
}

/// A change whose map write fails half-way (the fault injected at each write
/// in turn, as a full map or the kernel's ENOMEM would fail it) is refused
/// whole: the command names the failure, the maps are rolled back to what
/// they held, and connects still reach the old backends only. With no
/// fault, the same change applies.
#[test]
fn a_change_whose_map_write_fails_half_way_is_rolled_back_whole() {
    let fx = ApiFixture::start();
    let before = pins_list(&fx.pins);
    let next = write_temp(
        "next.toml",
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
scheduler = "wrr"
backends = [{ address = "172.50.0.40", weight = 2 }, "172.50.0.42"]

[[service]]
name = "db"
vip = "172.50.0.20"
port = 5432
protocol = "tcp"
mark = 0x128
backends = ["172.50.0.21"]
"#,
    )
    .unwrap();
    let apply_failing_at = |n: u32| {
        Command::new(svclb_tests::daemon::bin("svclb-ctl"))
            .arg("--pin-dir")
            .arg(fx.pins.path())
            .args(["apply", next.to_str().unwrap()])
            .env("SVCLB_FAIL_MAP_WRITE", n.to_string())
            .output()
            .unwrap()
    };
    let mut failed_at = Vec::new();
    for n in 1..=40 {
        let out = apply_failing_at(n);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("map write {n} failed"))
                && err.contains("rolled back: the maps hold what they held before"),
            "write {n}: {err}"
        );
        assert_eq!(pins_list(&fx.pins), before, "after a failure at write {n}");
        let reached = fx.tcp_spread(addr(VIP, PORT), 20, true);
        assert!(
            reached.keys().all(|t| TASKS.contains(&t.as_str())) && reached.len() == 2,
            "after a failure at write {n}, connects reach the old backends only: {reached:?}"
        );
        failed_at.push(n);
    }
    assert!(
        failed_at.len() >= 6,
        "the change makes at least 6 writes, each failed once: {failed_at:?}"
    );
    // The run past the last write applied it (no write failed).
    assert_eq!(
        backends_of(&fx.pins, "api"),
        Some(set(&["172.50.0.40 2", "172.50.0.42 1"]))
    );
    assert_eq!(backends_of(&fx.pins, "db"), Some(set(&["172.50.0.21 1"])));
    println!("rolled back after a failure at each of writes {failed_at:?}");
}

/// What new connects to `target` reach: each identity, or "refused" for a
/// connect that was not balanced (a VIP svclb does not know has no route).
fn reached(fx: &ApiFixture, target: std::net::SocketAddr, n: usize) -> BTreeSet<String> {
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        (0..n)
            .map(|_| {
                svclb_tests::tcp_identity(target, Duration::from_millis(300))
                    .unwrap_or_else(|_| "refused".to_string())
            })
            .collect()
    })
}

#[test]
fn svclbd_killed_at_any_map_write_of_an_apply_leaves_each_service_old_or_new_and_a_restart_repairs()
{
    let mut fx = ApiFixture::start();
    fx.sandbox
        .add_backend_addr("172.50.0.42".parse().unwrap())
        .unwrap();
    fx.tcp
        .push(TcpIdServer::start(&fx.sandbox, addr("172.50.0.42", PORT)).unwrap());
    fx.daemon.take().unwrap().stop().unwrap();
    let old = write_temp(
        "old.toml",
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "web"
vip = "172.50.0.38"
mark = 0x140
backends = ["172.50.0.40"]
"#,
    )
    .unwrap();
    let new = write_temp(
        "new.toml",
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.41", "172.50.0.42"]

[[service]]
name = "api2"
vip = "172.50.0.39"
mark = 0x141
backends = ["172.50.0.42"]
"#,
    )
    .unwrap();
    let api = addr(VIP, PORT);
    let (web, api2) = (addr("172.50.0.38", PORT), addr("172.50.0.39", PORT));
    let mut killed_at = Vec::new();
    for n in 1..=60 {
        fx.pins.ctl(&["apply", old.to_str().unwrap()]).unwrap();
        let old_state = pins_list(&fx.pins);
        let killed = svclb_tests::Svclbd::start_with(
            &fx.pins,
            &["--config", new.to_str().unwrap(), "--no-metrics"],
            |cmd| {
                cmd.env("SVCLB_KILL_AT_MAP_WRITE", n.to_string());
                Ok(())
            },
        );
        let Err(err) = killed else {
            // The whole apply ran: n is past its last write.
            killed.unwrap().stop().unwrap();
            break;
        };
        let err = err.to_string();
        assert!(
            err.contains(&format!("killed before map write {n}")),
            "{err}"
        );
        if pins_list(&fx.pins) == old_state {
            // Killed before the apply wrote anything (the load's own writes).
            continue;
        }
        killed_at.push(n);
        // Each service is wholly old or wholly new for new connects.
        let api_now = reached(&fx, api, 12);
        assert!(
            api_now == set(&["172.50.0.40", "172.50.0.41"])
                || api_now == set(&["172.50.0.41", "172.50.0.42"]),
            "killed at write {n}: api reaches {api_now:?}"
        );
        let web_now = reached(&fx, web, 2);
        assert!(
            web_now == set(&["172.50.0.40"]) || web_now == set(&["refused"]),
            "killed at write {n}: web reaches {web_now:?}"
        );
        let api2_now = reached(&fx, api2, 2);
        assert!(
            api2_now == set(&["172.50.0.42"]) || api2_now == set(&["refused"]),
            "killed at write {n}: api2 reaches {api2_now:?}"
        );
        // The next start repairs to the desired state.
        let repaired = svclb_tests::Svclbd::start(
            &fx.pins,
            &["--config", new.to_str().unwrap(), "--no-metrics"],
        )
        .unwrap();
        assert_eq!(backends_of(&fx.pins, "web"), None, "after write {n}");
        assert_eq!(
            backends_of(&fx.pins, "api"),
            Some(set(&["172.50.0.41 1", "172.50.0.42 1"])),
            "after write {n}"
        );
        assert_eq!(
            reached(&fx, api2, 2),
            set(&["172.50.0.42"]),
            "after write {n}"
        );
        repaired.stop().unwrap();
    }
    assert!(
        killed_at.len() >= 6,
        "the change makes at least 6 writes, svclbd was killed at each: {killed_at:?}"
    );
    println!("killed at writes {killed_at:?}; each service old or new, each repaired");
}

/// Services, VIPs, marks, backends and weights: what the maps say, without
/// the counters and rates (which move with traffic and time).
fn pins_list(pins: &PinDir) -> Vec<Listed> {
    listed(pins)
}

// ---- 2. DNS discovery against dnsmasq. ----

const NAMESERVER: &str = "172.50.0.53";
/// dnsmasq's answers' TTL, seconds.
const TTL: u64 = 1;

fn hosts(vip: Option<&str>, tasks: &[&str]) -> String {
    let mut text = String::new();
    if let Some(vip) = vip {
        text.push_str(&format!("{vip} api\n"));
    }
    for t in tasks {
        text.push_str(&format!("{t} tasks.api\n"));
    }
    text
}

fn dns_config(stale_grace: &str) -> String {
    format!(
        r#"
[[service]]
name = "api"
discover = "dns"

[dns]
nameservers = ["{NAMESERVER}"]
min_refresh = "200ms"
max_refresh = "30s"
stale_grace = "{stale_grace}"
timeout = "500ms"
"#
    )
}

/// svclbd in the client netns (where 172.50.0.53 is reachable), attached
/// to the sandbox cgroup.
fn svclbd_in_client(sandbox: &Sandbox, pins: &PinDir, config: &str) -> Svclbd {
    let config = write_temp("dns.toml", config).unwrap();
    Svclbd::start_with(
        pins,
        &[
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            &cgroup_arg(sandbox),
        ],
        |cmd| sandbox.client_command(cmd, false),
    )
    .expect("svclbd starts")
}

#[test]
fn dns_discovery_follows_the_server_and_survives_its_loss() {
    let tasks = [
        "172.50.0.40",
        "172.50.0.41",
        "172.50.0.42",
        "172.50.0.43",
        "172.50.0.44",
    ];
    let (sandbox, servers) = sandbox_with(&tasks);
    let mut dns = Dnsmasq::start(
        &sandbox,
        NAMESERVER.parse().unwrap(),
        TTL as u32,
        &hosts(Some(VIP), &tasks[..2]),
    )
    .unwrap();
    let pins = PinDir::new();
    let daemon = svclbd_in_client(&sandbox, &pins, &dns_config("60s"));

    // Resolved before READY: `api` -> the VIP, `tasks.api` -> the backends.
    let first = listed(&pins);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (first[0].name.as_str(), first[0].vip.as_str()),
        ("api", VIP)
    );
    assert_eq!(first[0].backends, set(&["172.50.0.40 1", "172.50.0.41 1"]));
    let mark = first[0].mark;
    let seen = spread(&sandbox, 40);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        &tasks[..2]
    );
    // /metrics says how discovery is doing, per name.
    let scrape = discovery_scraper(
        &sandbox,
        daemon.metrics_addr().expect("svclbd serves metrics"),
    );
    let (addresses, stale, failures, last_success) = scrape();
    assert_eq!((addresses, stale, failures), (2.0, 0.0, 0.0));
    let answered = last_success.expect("a last success time");
    assert!(
        (unix_now() - answered).abs() < 60.0,
        "last success {answered} is now"
    );

    let within = Duration::from_secs(TTL + 1);
    let changes: [(&str, &[&str]); 3] = [
        ("adding a task", &tasks[..3]),
        ("removing a task", &tasks[1..3]),
        ("replacing the tasks", &tasks[3..5]),
    ];
    for (what, now) in changes {
        dns.set_hosts(&hosts(Some(VIP), now)).unwrap();
        let expected: BTreeSet<String> = now.iter().map(|t| format!("{t} 1")).collect();
        let took = settles(
            within,
            what,
            || backends_of(&pins, "api"),
            |b| b.as_ref() == Some(&expected),
        );
        eprintln!("{what}: in the maps after {took:?}");
        assert_eq!(listed(&pins)[0].mark, mark, "{what}: the mark stays");
    }
    let seen = spread(&sandbox, 40);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        &tasks[3..5]
    );
    assert_eq!(servers[3].accepted() + servers[4].accepted(), 40);

    // The server goes away: nothing changes, connects keep working.
    let before = pins_list(&pins);
    dns.kill();
    daemon
        .wait_for_log(
            "keeping the last good 2 address(es)",
            Duration::from_secs(5),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(3 * TTL + 1));
    assert_eq!(pins_list(&pins), before, "the maps keep the last good set");
    let seen = spread(&sandbox, 40);
    assert_eq!(seen.values().sum::<usize>(), 40);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        &tasks[3..5]
    );
    // And /metrics shows it: still 2 addresses, stale, failing, the last
    // success from before the server went away.
    let (addresses, stale, failures, last_success) = scrape();
    assert_eq!((addresses, stale), (2.0, 1.0));
    assert!(failures >= 1.0, "{failures} failures in a row");
    let last = last_success.expect("a last success time");
    assert!(
        unix_now() - last >= (3 * TTL) as f64,
        "the last success ({last}) is from before the server went away"
    );
    drop(daemon);
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Scrapes svclbd's /metrics (served in the client netns) for the
/// discovery state of `tasks.api`: (addresses, stale, consecutive
/// failures, last success).
fn discovery_scraper(
    sandbox: &Sandbox,
    addr: std::net::SocketAddr,
) -> impl Fn() -> (f64, f64, f64, Option<f64>) + '_ {
    move || {
        let (status, text) =
            sandbox.in_client(|| svclb_tests::http::get(addr, "/metrics").unwrap());
        assert_eq!(status, 200, "{text}");
        if let Err(e) = svclb_tests::http::promtool_check(&text) {
            panic!("{e:#}\n{text}");
        }
        let samples = svclb_tests::http::parse_exposition(&text);
        let of = |metric: &str| {
            let labels = [
                ("query", "tasks.api"),
                ("role", "tasks"),
                ("service", "api"),
            ];
            samples
                .iter()
                .find(|s| s.is(metric, &labels))
                .map(|s| s.value)
        };
        (
            of("svclb_discovery_addresses")
                .unwrap_or_else(|| panic!("no discovery metrics:\n{text}")),
            of("svclb_discovery_stale").unwrap(),
            of("svclb_discovery_consecutive_failures").unwrap(),
            of("svclb_discovery_last_success_timestamp_seconds"),
        )
    }
}

#[test]
fn dns_nxdomain_keeps_the_last_good_set_for_the_grace_period_then_applies() {
    let tasks = ["172.50.0.40", "172.50.0.41"];
    let (sandbox, _servers) = sandbox_with(&tasks);
    let dns = Dnsmasq::start(
        &sandbox,
        NAMESERVER.parse().unwrap(),
        TTL as u32,
        &hosts(Some(VIP), &tasks),
    )
    .unwrap();
    let pins = PinDir::new();
    let grace = Duration::from_secs(3);
    let daemon = svclbd_in_client(&sandbox, &pins, &dns_config("3s"));
    let both = set(&["172.50.0.40 1", "172.50.0.41 1"]);
    assert_eq!(backends_of(&pins, "api"), Some(both.clone()));

    // The service scales to zero: tasks.api answers NXDOMAIN.
    dns.set_hosts(&hosts(Some(VIP), &[])).unwrap();
    let start = Instant::now();
    daemon
        .wait_for_log(
            "DNS answers NXDOMAIN: keeping the last good 2",
            Duration::from_secs(TTL + 1),
        )
        .unwrap();
    assert_eq!(
        backends_of(&pins, "api"),
        Some(both.clone()),
        "kept during the grace period"
    );
    assert_eq!(spread(&sandbox, 10).values().sum::<usize>(), 10);
    let took = settles(
        grace + Duration::from_secs(TTL + 1),
        "NXDOMAIN applied after the grace period",
        || backends_of(&pins, "api"),
        |b| *b == Some(BTreeSet::new()),
    );
    assert!(
        start.elapsed() >= grace,
        "applied after {took:?}, before the grace period ended"
    );
    let refused = {
        let _guard = sandbox.enter_cgroup().unwrap();
        sandbox.in_client(|| {
            std::net::TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT)
                .unwrap_err()
                .kind()
        })
    };
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);

    // Tasks come back at once (no grace for good news).
    dns.set_hosts(&hosts(Some(VIP), &tasks[..1])).unwrap();
    settles(
        Duration::from_secs(TTL + 1),
        "tasks back",
        || backends_of(&pins, "api"),
        |b| *b == Some(set(&["172.50.0.40 1"])),
    );

    // The service is removed: `api` answers NXDOMAIN too; after the grace
    // period the service is gone from the maps.
    dns.set_hosts("").unwrap();
    std::thread::sleep(Duration::from_secs(TTL + 1));
    assert_eq!(listed(&pins).len(), 1, "kept during the grace period");
    settles(
        grace + Duration::from_secs(TTL + 1),
        "service removed",
        || listed(&pins),
        |l| l.is_empty(),
    );
    drop(daemon);
}

#[test]
fn a_restart_while_dns_is_down_keeps_the_discovered_services() {
    let tasks = ["172.50.0.40", "172.50.0.41"];
    let (sandbox, _servers) = sandbox_with(&tasks);
    let mut dns = Dnsmasq::start(
        &sandbox,
        NAMESERVER.parse().unwrap(),
        TTL as u32,
        &hosts(Some(VIP), &tasks),
    )
    .unwrap();
    let pins = PinDir::new();
    let config = dns_config("60s");
    let daemon = svclbd_in_client(&sandbox, &pins, &config);
    let before = pins_list(&pins);
    assert_eq!(listed(&pins).len(), 1);
    daemon.kill().unwrap();
    dns.kill();
    let daemon = svclbd_in_client(&sandbox, &pins, &config);
    assert!(
        daemon.log_text().contains("starting from the pinned maps"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        pins_list(&pins),
        before,
        "DNS down at startup: the pinned set stays"
    );
    assert_eq!(spread(&sandbox, 20).values().sum::<usize>(), 20);
}

// ---- 3. Restarts, upgrades, foreign pins, teardown. ----

/// Connects to the VIP in a loop from the sandbox cgroup until stopped
/// (at most `max` connects or 60 s); counts successes and failures.
struct ConnectLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
    _guard: svclb_tests::CgroupGuard,
}

impl ConnectLoop {
    fn start(sandbox: &Sandbox, max: u64) -> ConnectLoop {
        let guard = sandbox.enter_cgroup().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let thread = sandbox
            .spawn_in_client("connect-loop", move || {
                let start = Instant::now();
                while !s.load(Ordering::Relaxed)
                    && o.load(Ordering::Relaxed) + f.load(Ordering::Relaxed) < max
                    && start.elapsed() < Duration::from_secs(60)
                {
                    match svclb_tests::tcp_identity(addr(VIP, PORT), TIMEOUT) {
                        Ok(who) if who != VIP => o.fetch_add(1, Ordering::Relaxed),
                        Ok(_) | Err(_) => f.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
            .unwrap();
        // Make sure it runs before the caller disturbs anything.
        while ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        ConnectLoop {
            stop,
            ok,
            failed,
            thread,
            _guard: guard,
        }
    }

    fn made(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }

    /// Lets it run for `d`, checking that it makes progress.
    fn run_for(&self, d: Duration) {
        let before = self.made();
        std::thread::sleep(d);
        assert!(self.made() > before, "the connect loop is stuck");
    }

    /// (ok, failed)
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn sigkill_and_restart_lose_no_connect_and_no_counter() {
    let mut fx = ApiFixture::start();
    let args_config = write_temp("svclb.toml", API_CONFIG).unwrap();
    let cgroup = cgroup_arg(&fx.sandbox);
    let args = [
        "--config",
        args_config.to_str().unwrap(),
        "--cgroup",
        &cgroup,
    ];
    let loop_ = ConnectLoop::start(&fx.sandbox, 200_000);
    loop_.run_for(Duration::from_millis(300));
    fx.daemon.take().unwrap().kill().unwrap();
    let at_kill = loop_.made();
    loop_.run_for(Duration::from_millis(500));
    let restarted = Svclbd::start(&fx.pins, &args).unwrap();
    let at_restart = loop_.made();
    loop_.run_for(Duration::from_millis(500));
    drop(restarted);
    let (ok, failed) = loop_.finish();
    assert_eq!(
        failed, 0,
        "connects failed across the kill/restart ({ok} succeeded)"
    );
    assert!(
        at_restart - at_kill >= 10,
        "connects went on while svclbd was dead: {}",
        at_restart - at_kill
    );
    // Conns continuous: every connect made, before, during and after, counted once.
    assert_eq!(conns(&fx.pins, "FWM  317"), ok);
    let accepted: u64 = fx.tcp.iter().map(|s| s.accepted()).sum();
    assert_eq!(accepted, ok);
}

#[test]
fn an_upgrade_replaces_the_links_without_a_gap_and_leaves_one_per_program() {
    let mut fx = ApiFixture::start();
    let config = write_temp("svclb.toml", API_CONFIG).unwrap();
    let cgroup = cgroup_arg(&fx.sandbox);
    let args = ["--config", config.to_str().unwrap(), "--cgroup", &cgroup];
    let cg = fx.sandbox.cgroup_path().to_path_buf();
    assert_eq!(cgroup_prog_count(&cg, ATTACH_INET4_CONNECT).unwrap(), 1);

    let loop_ = ConnectLoop::start(&fx.sandbox, 200_000);
    // The new svclbd starts while the old one still runs and takes over:
    // the old one stops cleanly when asked (the way a package upgrade or a
    // rolling restart goes)...
    let old = fx.daemon.take().unwrap();
    let new = Svclbd::start(&fx.pins, &[&args[..], &["--replace"]].concat()).unwrap();
    loop_.run_for(Duration::from_millis(300));
    assert!(old.stop().unwrap().success(), "the old svclbd exited 0");
    loop_.run_for(Duration::from_millis(300));
    // ...and attaching again by hand replaces the link again.
    for _ in 0..3 {
        fx.pins.ctl(&["attach", "--cgroup", &cgroup]).unwrap();
        loop_.run_for(Duration::from_millis(100));
    }
    let (ok, failed) = loop_.finish();
    assert_eq!(
        failed, 0,
        "connects failed during the upgrade ({ok} succeeded)"
    );
    // A replaced link is released by the kernel from a work queue once its
    // pin is renamed over, so it may be counted for a moment.
    settles(
        Duration::from_secs(2),
        "exactly one connect4 program stays attached",
        || cgroup_prog_count(&cg, ATTACH_INET4_CONNECT).unwrap(),
        |n| *n == 1,
    );
    let links = fx
        .pins
        .path()
        .join("links")
        .join(svclb_pin_name(&fx.sandbox));
    let names: Vec<String> = std::fs::read_dir(&links)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with("_new")),
        "leftover link pins: {names:?}"
    );
    assert!(names.contains(&"svclb_connect4".to_owned()), "{names:?}");
    assert_eq!(conns(&fx.pins, "FWM  317"), ok);
    drop(new);
}

/// svclbd reads its config while the kernel creates the maps: a bad config
/// must still leave nothing behind, and must not stop a running svclbd
/// that `--replace` would have taken over from.
#[test]
fn a_bad_config_at_start_pins_nothing_and_stops_no_running_svclbd() {
    let bad = write_temp(
        "bad.toml",
        "[[service]]\nname = \"api\"\nvip = \"172.50.0.37\"\nbackends = [\"172.50.0.300\"]\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();

    // Fresh: refused, naming the file and the field, and no pin directory.
    let pins = PinDir::new();
    let err = Svclbd::start(&pins, &["--config", bad])
        .expect_err("a bad config is refused")
        .to_string();
    assert!(err.contains(bad), "names the file: {err}");
    assert!(err.contains("backends[0]"), "names the field: {err}");
    assert!(!pins.path().exists(), "nothing pinned: {err}");

    // Over a running svclbd, with --replace: refused before asking it to stop.
    let fx = ApiFixture::start();
    let first = fx.daemon.as_ref().unwrap().pid();
    let before = fx.pins.ctl(&["list"]).unwrap();
    let err = Svclbd::start(&fx.pins, &["--config", bad, "--replace"])
        .expect_err("a bad config is refused")
        .to_string();
    assert!(err.contains("backends[0]"), "names the field: {err}");
    assert_eq!(
        unsafe { libc::kill(first as i32, 0) },
        0,
        "the running svclbd was not stopped"
    );
    assert_eq!(
        fx.pins.ctl(&["list"]).unwrap(),
        before,
        "the maps are unchanged"
    );
    let _ = fx.tcp_spread(addr(VIP, PORT), 10, true);
}

#[test]
fn a_second_svclbd_on_the_same_pins_is_refused_naming_the_first() {
    let fx = ApiFixture::start();
    let first = fx.daemon.as_ref().unwrap().pid();
    let before = fx.pins.ctl(&["list"]).unwrap();
    let other = write_temp(
        "other.toml",
        "[[service]]\nname = \"other\"\nvip = \"172.50.0.38\"\nbackends = [\"172.50.0.40\"]\n",
    )
    .unwrap();
    let err = Svclbd::start(&fx.pins, &["--config", other.to_str().unwrap()])
        .expect_err("a second svclbd is refused")
        .to_string();
    assert!(
        err.contains(&format!("svclbd pid {first}")),
        "names the first: {err}"
    );
    assert!(err.contains("--replace"), "says what to do: {err}");
    assert_eq!(
        fx.pins.ctl(&["list"]).unwrap(),
        before,
        "the maps are unchanged"
    );
    // The first one still runs, and still balances.
    assert_eq!(
        unsafe { libc::kill(first as i32, 0) },
        0,
        "the first svclbd runs"
    );
    let spread = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert_eq!(spread.values().sum::<usize>(), 20, "{spread:?}");
}

/// The pin directory name of the sandbox cgroup (`svclb-<id>`: no escapes needed).
fn svclb_pin_name(sandbox: &Sandbox) -> String {
    let rel = sandbox
        .cgroup_path()
        .strip_prefix(sandbox.cgroup_root())
        .unwrap();
    rel.to_str()
        .unwrap()
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace('.', "%2E")
}

#[test]
fn pinned_maps_of_another_layout_are_refused_with_a_clear_message() {
    let pins = PinDir::new();
    std::fs::create_dir_all(pins.path()).unwrap();
    // A map named like svclb's VIP map, with other key and value sizes.
    let foreign = pins.path().join("svclb_vips");
    create_pinned_map(&foreign, "svclb_vips", MAP_TYPE_HASH, 4, 4, 16).unwrap();
    let err = Svclbd::start(&pins, &[])
        .expect_err("svclbd must refuse")
        .to_string();
    assert!(
        err.contains(&foreign.display().to_string()),
        "names the map: {err}"
    );
    assert!(err.contains("4/4"), "says what it found: {err}");
    assert!(err.contains("svclb-ctl teardown"), "says what to do: {err}");
    // Nothing was attached or pinned beside it.
    let names: Vec<String> = std::fs::read_dir(pins.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n == "svclb_vips" || n == "links"),
        "{names:?}"
    );
    let err = pins
        .ctl(&["list"])
        .expect_err("svclb-ctl refuses too")
        .to_string();
    assert!(err.contains("svclb-ctl teardown"), "{err}");
    // Teardown removes it, and svclbd starts.
    pins.ctl(&["teardown"]).unwrap();
    let daemon = Svclbd::start(&pins, &[]).unwrap();
    drop(daemon);
}

#[test]
fn teardown_removes_every_pin_and_attachment() {
    let mut fx = ApiFixture::start();
    fx.add_vip_sink();
    let cg = fx.sandbox.cgroup_path().to_path_buf();
    assert!(!spread(&fx.sandbox, 5).contains_key(VIP));
    fx.daemon.take().unwrap().stop().unwrap();
    assert_eq!(cgroup_prog_count(&cg, ATTACH_INET4_CONNECT).unwrap(), 1);
    let out = fx.pins.ctl(&["teardown"]).unwrap();
    assert!(out.contains("removed every svclb pin"), "{out}");
    assert!(!fx.pins.path().exists(), "the pin directory is gone");
    assert_eq!(
        cgroup_prog_count(&cg, ATTACH_INET4_CONNECT).unwrap(),
        0,
        "detached"
    );
    assert_eq!(
        spread(&fx.sandbox, 5).get(VIP),
        Some(&5),
        "connects are plain again"
    );
    let err = fx.pins.ctl(&["list"]).unwrap_err().to_string();
    assert!(err.contains("no svclb data plane is pinned"), "{err}");
}

// ---- 4. Attaching to containers. ----

/// A `sleep` in the sandbox cgroup: the "container" process.
struct Task(std::process::Child);

impl Task {
    fn start(sandbox: &Sandbox) -> Task {
        let mut cmd = Command::new("sleep");
        cmd.arg("120");
        sandbox.client_command(&mut cmd, true).unwrap();
        Task(cmd.spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn attachments(pins: &PinDir) -> String {
    pins.ctl(&["attachments"]).unwrap()
}

fn sandbox_cgroup_name(sandbox: &Sandbox) -> String {
    format!(
        "/{}",
        sandbox
            .cgroup_path()
            .strip_prefix(sandbox.cgroup_root())
            .unwrap()
            .display()
    )
}

#[test]
fn attach_and_detach_by_pid_and_by_container() {
    let mut fx = ApiFixture::start_with(API_CONFIG);
    fx.add_vip_sink();
    let cgroup = cgroup_arg(&fx.sandbox);
    fx.pins.ctl(&["detach", "--cgroup", &cgroup]).unwrap();
    assert_eq!(attachments(&fx.pins).trim(), "");
    let task = Task::start(&fx.sandbox);
    let pid = task.pid().to_string();
    let name = sandbox_cgroup_name(&fx.sandbox);

    // By PID.
    let out = fx.pins.ctl(&["attach", "--pid", &pid]).unwrap();
    assert!(out.contains(&cgroup), "{out}");
    assert!(
        attachments(&fx.pins).starts_with(&format!("{name}\t")),
        "{}",
        attachments(&fx.pins)
    );
    assert!(!spread(&fx.sandbox, 10).contains_key(VIP));
    fx.pins.ctl(&["detach", "--pid", &pid]).unwrap();
    assert_eq!(attachments(&fx.pins).trim(), "");
    assert_eq!(spread(&fx.sandbox, 10).get(VIP), Some(&10));

    // By container, through a fake engine that says the container runs as `task`.
    let engine = FakeDocker::start(BTreeMap::from([("api.1.xyz".to_owned(), task.pid())])).unwrap();
    let host = engine.host();
    let out = fx
        .pins
        .ctl(&["attach", "--container", "api.1.xyz", "--docker-host", &host])
        .unwrap();
    assert!(out.contains(&cgroup), "{out}");
    // The API version is negotiated first, then used.
    let requests = engine.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0], "/version");
    assert!(
        requests[1].contains("/containers/api.1.xyz/json"),
        "{requests:?}"
    );
    assert!(attachments(&fx.pins).starts_with(&format!("{name}\t")));
    assert!(!spread(&fx.sandbox, 10).contains_key(VIP));
    // DOCKER_HOST works as well as --docker-host.
    let out = Command::new(svclb_tests::daemon::bin("svclb-ctl"))
        .args([
            "--pin-dir",
            fx.pins.path().to_str().unwrap(),
            "detach",
            "--container",
            "api.1.xyz",
        ])
        .env("DOCKER_HOST", &host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(attachments(&fx.pins).trim(), "");
    let err = fx
        .pins
        .ctl(&["attach", "--container", "gone", "--docker-host", &host])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such container \"gone\""), "{err}");

    // svclbd takes --pid and --container too.
    let pins = PinDir::new();
    let config = write_temp("svclb.toml", API_CONFIG).unwrap();
    let other = Svclbd::start(
        &pins,
        &[
            "--config",
            config.to_str().unwrap(),
            "--container",
            "api.1.xyz",
            "--docker-host",
            &host,
            "--pid",
            &pid,
        ],
    )
    .unwrap();
    assert!(
        attachments(&pins).starts_with(&format!("{name}\t")),
        "{}",
        attachments(&pins)
    );
    assert_eq!(attachments(&pins).lines().count(), 1);
    assert!(!spread(&fx.sandbox, 10).contains_key(VIP));
    drop(other);
}

// ---- Capacity. ----

/// `count` services `s0..`, VIPs 172.50.1.x, each with `backends` of
/// 172.50.2.x and on `networks` networks `n0..`.
fn services_text(count: usize, backends: usize, scheduler: &str, networks: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        let list: Vec<String> = (0..backends)
            .map(|b| format!("\"172.50.2.{}\"", 1 + i * backends + b))
            .collect();
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"172.50.1.{}\"\nscheduler = \"{scheduler}\"\nbackends = [{}]\n",
            i + 1,
            list.join(", ")
        ));
        if networks > 0 {
            let names: Vec<String> = (0..networks).map(|n| format!("\"n{n}\"")).collect();
            text.push_str(&format!("networks = [{}]\n", names.join(", ")));
        }
        text.push('\n');
    }
    text
}

#[test]
fn more_than_the_maps_hold_is_refused_whole_naming_the_limit_and_its_flag() {
    let pins = PinDir::new();
    let config = write_temp("small.toml", &services_text(1, 2, "rr", 0)).unwrap();
    let _daemon = Svclbd::start(
        &pins,
        &[
            "--config",
            config.to_str().unwrap(),
            "--no-watch",
            "--max-services",
            "4",
            "--max-backends",
            "8",
            "--max-slots",
            "64",
        ],
    )
    .unwrap();
    let before = listed(&pins);
    for (what, text, names) in [
        ("services", services_text(5, 1, "rr", 0), "--max-services"),
        ("backends", services_text(3, 3, "rr", 0), "--max-backends"),
        ("slots", services_text(1, 2, "mh", 0), "--max-slots"),
        ("networks", services_text(1, 1, "rr", 65), "64 networks"),
    ] {
        let file = write_temp("big.toml", &text).unwrap();
        let err = pins
            .ctl(&["apply", file.to_str().unwrap()])
            .expect_err(what)
            .to_string();
        assert!(err.contains(names), "{what}: names {names}: {err}");
        assert_eq!(listed(&pins), before, "{what}: nothing changed");
    }
}

// ---- Start-up and restart. ----

/// Large batches (16,384 entries and more) are written by several threads
/// at once: every service and backend of a 20,000-service start must land,
/// each at its own key.
#[test]
fn a_start_over_twenty_thousand_services_writes_every_one_exactly() {
    let pins = PinDir::new();
    let count = 20_000;
    // VIPs 172.50.64.1 up, backends 172.50.150.1 up: maps only, no traffic.
    let at = |third: usize, i: usize| format!("172.50.{}.{}", third + i / 250, 1 + i % 250);
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"{}\"\nbackends = [\"{}\"]\n\n",
            at(64, i),
            at(150, i)
        ));
    }
    let config = write_temp("large.toml", &text).unwrap();
    let daemon =
        Svclbd::start(&pins, &["--config", config.to_str().unwrap(), "--no-watch"]).unwrap();
    let listed = listed(&pins);
    assert_eq!(listed.len(), count, "every service is listed");
    let mut marks = BTreeSet::new();
    for service in &listed {
        let i: usize = service.name[1..].parse().unwrap();
        assert_eq!(service.vip, at(64, i), "{}'s VIP", service.name);
        assert_eq!(
            service.backends,
            set(&[&format!("{} 1", at(150, i))]),
            "{}'s backend",
            service.name
        );
        marks.insert(service.mark);
    }
    assert_eq!(marks.len(), count, "each service has its own mark");
    drop(daemon);
}

#[test]
fn a_restart_writes_nothing_for_unchanged_services_and_a_start_writes_in_batches() {
    let pins = PinDir::new();
    let services = 100;
    let text = services_text(services, 2, "rr", 0);
    let config = write_temp("many.toml", &text).unwrap();
    let start =
        || Svclbd::start(&pins, &["--config", config.to_str().unwrap(), "--no-watch"]).unwrap();
    let writes = |d: &Svclbd| d.metric("svclb_map_writes_total").expect("the metric");

    // A fresh start: each map's entries in a few batch syscalls, not one
    // (or several) per service.
    let first = start();
    let fresh = writes(&first);
    assert!(
        fresh > 0.0 && fresh <= 12.0,
        "{services} services written in {fresh} map write syscalls"
    );
    first.stop().unwrap();
    let before = listed(&pins);
    assert_eq!(before.len(), services);

    // The same config over the same pins: the maps are read, nothing is written.
    let again = start();
    assert_eq!(writes(&again), 0.0, "{}", again.log_text());
    assert_eq!(again.metric("svclb_changes_applied_total"), Some(0.0));
    again.stop().unwrap();
    assert_eq!(listed(&pins), before);

    // One service changed while svclbd was down: its writes only, as many
    // as for any one change, whatever the number of unchanged services.
    let changed = text.replacen("\"172.50.2.16\"", "\"172.50.3.16\"", 1);
    assert_ne!(changed, text);
    std::fs::write(&config, &changed).unwrap();
    let third = start();
    let one = writes(&third);
    assert!(
        one > 0.0 && one <= 12.0,
        "one backend changed: {one} map write syscalls"
    );
    assert_eq!(third.metric("svclb_changes_applied_total"), Some(1.0));
    third.stop().unwrap();
    assert_eq!(
        backends_of(&pins, "s7"),
        Some(set(&["172.50.2.15 1", "172.50.3.16 1"]))
    );
    let others =
        |l: Vec<Listed>| -> Vec<Listed> { l.into_iter().filter(|s| s.name != "s7").collect() };
    assert_eq!(others(listed(&pins)), others(before));
    println!("map write syscalls: {fresh} for {services} new services, 0 for a restart, {one} for one backend changed");
}
