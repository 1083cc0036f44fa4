//! The data path, end to end, with the real programs in the real kernel:
//! balancing, its scope (the attached cgroup, VIPs only), detaching, svclbd's
//! exit, refusals and missing privileges. Run as root, serially
//! (`cargo xtask test`).

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::*;
use svclb_tests::daemon::write_temp;

#[test]
fn connects_to_the_vip_reach_both_backends_and_conns_are_exact() {
    let fx = ApiFixture::start();
    let n = 1000;
    let spread = fx.tcp_spread(addr(VIP, PORT), n, true);
    let total: usize = spread.values().sum();
    assert_eq!(total, n);
    for task in TASKS {
        let got = spread.get(task).copied().unwrap_or(0);
        assert!(got >= n / 5, "{task} got {got} of {n} connects: {spread:?}");
    }
    assert!(
        !spread.contains_key(VIP),
        "a connect was not translated: {spread:?}"
    );

    // The Conns that svclb-ctl prints equal the connects made, per backend,
    // and the servers saw the same numbers.
    for (i, task) in TASKS.iter().enumerate() {
        let made = spread[*task] as u64;
        assert_eq!(fx.conns(&format!("{task}:0")), made, "Conns of {task}");
        assert_eq!(
            fx.tcp[i].accepted(),
            made,
            "accepts seen by {task}'s server"
        );
    }
    assert_eq!(fx.conns("FWM  317"), n as u64);
}

#[test]
fn connected_udp_is_balanced_and_counted() {
    let fx = ApiFixture::start();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let n = 300;
    let spread = fx.sandbox.in_client(|| {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            let who = svclb_tests::udp_identity(addr(VIP, PORT), TIMEOUT).expect("UDP reply");
            *seen.entry(who).or_insert(0usize) += 1;
        }
        seen
    });
    for task in TASKS {
        assert!(
            spread.get(task).copied().unwrap_or(0) >= n / 5,
            "{spread:?}"
        );
    }
    let datagrams: u64 = fx.udp.iter().map(|s| s.datagrams()).sum();
    assert_eq!(datagrams, n as u64);
    assert_eq!(
        fx.conns("FWM  317"),
        n as u64,
        "each connected UDP socket is one connection"
    );
}

#[test]
fn a_non_vip_destination_is_untouched() {
    let fx = ApiFixture::start();
    let spread = fx.tcp_spread(addr(TASKS[0], PORT), 100, true);
    assert_eq!(spread.get(TASKS[0]), Some(&100), "{spread:?}");
    assert_eq!(fx.conns("FWM  317"), 0, "direct connects are not counted");
}

#[test]
fn a_process_outside_the_attached_cgroup_is_not_balanced() {
    let mut fx = ApiFixture::start();
    fx.add_vip_sink();
    let outside = fx.tcp_spread(addr(VIP, PORT), 50, false);
    assert_eq!(
        outside.get(VIP),
        Some(&50),
        "outside the cgroup the VIP is plain: {outside:?}"
    );
    let inside = fx.tcp_spread(addr(VIP, PORT), 50, true);
    assert!(
        !inside.contains_key(VIP),
        "inside the cgroup it is balanced: {inside:?}"
    );

    // A child process started outside the cgroup is not balanced either.
    let mut cmd = std::process::Command::new("/bin/bash");
    cmd.args(["-c", "exec 3<>/dev/tcp/172.50.0.37/8080 && head -n1 <&3"]);
    fx.sandbox.client_command(&mut cmd, false).unwrap();
    let out = cmd.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), VIP);
    let mut cmd = std::process::Command::new("/bin/bash");
    cmd.args(["-c", "exec 3<>/dev/tcp/172.50.0.37/8080 && head -n1 <&3"]);
    fx.sandbox.client_command(&mut cmd, true).unwrap();
    let out = cmd.output().unwrap();
    let who = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        TASKS.contains(&who.as_str()),
        "a child inside the cgroup is balanced, got {who:?}"
    );
}

#[test]
fn after_detach_behaviour_is_plain_again() {
    let mut fx = ApiFixture::start();
    fx.add_vip_sink();
    let cgroup = fx.sandbox.cgroup_path().to_str().unwrap().to_string();
    let before = fx.pins.ctl(&["attachments"]).unwrap();
    assert!(
        before.contains(
            fx.sandbox
                .cgroup_path()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        ),
        "{before}"
    );
    let balanced = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert!(!balanced.contains_key(VIP));

    fx.pins.ctl(&["detach", "--cgroup", &cgroup]).unwrap();
    assert_eq!(fx.pins.ctl(&["attachments"]).unwrap().trim(), "");
    let plain = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert_eq!(plain.get(VIP), Some(&20), "{plain:?}");

    // Attaching again (with svclb-ctl, while svclbd runs) restores balancing.
    fx.pins.ctl(&["attach", "--cgroup", &cgroup]).unwrap();
    let again = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert!(!again.contains_key(VIP), "{again:?}");
}

#[test]
fn balancing_and_stats_survive_svclbd_exit() {
    let mut fx = ApiFixture::start();
    let status = fx.daemon.take().unwrap().stop().unwrap();
    assert!(
        status.success(),
        "svclbd exits cleanly on SIGTERM: {status}"
    );
    let spread = fx.tcp_spread(addr(VIP, PORT), 100, true);
    assert_eq!(spread.values().sum::<usize>(), 100);
    assert!(!spread.contains_key(VIP));
    assert_eq!(
        fx.conns("FWM  317"),
        100,
        "svclb-ctl reads the pinned maps without svclbd"
    );
}

#[test]
fn a_service_without_backends_refuses_at_once() {
    let fx = ApiFixture::start_with(
        r#"
[[service]]
name = "empty"
vip = "172.50.0.37"
"#,
    );
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let (kind, took) = fx.sandbox.in_client(|| {
        let start = Instant::now();
        let err = std::net::TcpStream::connect_timeout(&addr(VIP, PORT), Duration::from_secs(3))
            .expect_err("no backend: connect must fail");
        (err.kind(), start.elapsed())
    });
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(
        took < Duration::from_millis(500),
        "refused at once, took {took:?}"
    );
}

#[test]
fn an_invalid_config_is_refused_and_changes_nothing() {
    let fx = ApiFixture::start();
    let _ = fx.tcp_spread(addr(VIP, PORT), 10, true);
    let before = fx.pins.ctl(&["stats", "--exact"]).unwrap();

    let bad = [
        ("unknown field", "[[service]]\nname = \"api\"\nvip = \"172.50.0.37\"\nbakends = []\n", ":4:", "bakends"),
        ("bad address", "[[service]]\nname = \"api\"\nvip = \"172.50.0.300\"\n", ":3:", "vip"),
        (
            "duplicate VIP",
            "[[service]]\nname = \"a\"\nvip = \"172.50.0.37\"\n[[service]]\nname = \"b\"\nvip = \"172.50.0.37\"\n",
            ":6:",
            "vip",
        ),
        (
            "duplicate mark",
            "[[service]]\nname = \"a\"\nvip = \"172.50.0.37\"\nmark = 5\n[[service]]\nname = \"b\"\nvip = \"172.50.0.38\"\nmark = 5\n",
            ":8:",
            "mark",
        ),
        (
            "VIP that is also a backend",
            "[[service]]\nname = \"a\"\nvip = \"172.50.0.37\"\nbackends = [\"172.50.0.38\"]\n[[service]]\nname = \"b\"\nvip = \"172.50.0.38\"\n",
            "",
            "172.50.0.38",
        ),
        ("empty name", "[[service]]\nname = \"\"\nvip = \"172.50.0.37\"\n", ":2:", "name"),
    ];
    for (what, text, line, field) in bad {
        let file = write_temp("bad.toml", text).unwrap();
        let file = file.to_str().unwrap();
        let err = fx.pins.ctl(&["apply", file]).expect_err(what).to_string();
        assert!(
            err.contains(file),
            "{what}: the error names the file: {err}"
        );
        assert!(
            err.contains(line),
            "{what}: the error names line {line}: {err}"
        );
        assert!(
            err.contains(field),
            "{what}: the error names {field}: {err}"
        );
        assert_eq!(
            fx.pins.ctl(&["stats", "--exact"]).unwrap(),
            before,
            "{what} changed the maps"
        );
    }

    // svclbd itself refuses to start on a bad file, before pinning anything.
    let pins = svclb_tests::PinDir::new();
    let file = write_temp("bad.toml", bad[1].1).unwrap();
    let err = svclb_tests::Svclbd::start(&pins, &["--config", file.to_str().unwrap()])
        .expect_err("bad config");
    assert!(err.to_string().contains("is not an IP address"), "{err}");
    assert!(!pins.path().exists(), "nothing was pinned");
}

#[test]
fn missing_privileges_are_named() {
    let pins = svclb_tests::PinDir::new();
    // A copy the unprivileged user can reach: the checkout may sit in a
    // directory only root may enter (a mktemp -d clone is 0700).
    let copy = std::env::temp_dir().join(format!("svclbd-unprivileged-{}", std::process::id()));
    std::fs::copy(svclb_tests::daemon::bin("svclbd"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&copy)
        .args(["--pin-dir", pins.path().to_str().unwrap()])
        .uid(65534)
        .output();
    let _ = std::fs::remove_file(&copy);
    let out = out.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn a_kernel_without_a_feature_is_refused_naming_it_and_its_version() {
    let pins = svclb_tests::PinDir::new();
    let err = svclb_tests::Svclbd::start_with(&pins, &["--no-metrics"], |cmd| {
        // The probe for this feature answers "absent" (this kernel has all).
        cmd.env("SVCLB_PRETEND_MISSING", "socket-local storage");
        Ok(())
    })
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("lacks what svclb needs: socket-local storage maps (BPF_MAP_TYPE_SK_STORAGE) (Linux 5.2)"),
        "{err}"
    );
    assert!(err.contains("Linux 5.18 or newer"), "{err}");
    assert!(!pins.path().exists(), "nothing was pinned");
}

use std::os::unix::process::CommandExt;
