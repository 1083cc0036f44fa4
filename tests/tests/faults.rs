//! Faults around a running svclbd: pins removed by hand, an attached cgroup
//! removed (and made again), a change that cannot be applied. Each is
//! found, logged, counted in `svclb_faults_total{kind}` and mended or
//! refused. (The DNS server and the Docker engine going away are in
//! control_plane.rs and swarm.rs; a second svclbd on the same pins in
//! control_plane.rs.)

mod common;

use std::time::Duration;

use common::*;
use svclb_tests::{bpf::cgroup_prog_count, bpf::ATTACH_INET4_CONNECT, Svclbd};

/// How long svclbd may take to notice (it looks every second).
const NOTICED_WITHIN: Duration = Duration::from_secs(5);

fn faults(daemon: &Svclbd, kind: &str) -> u64 {
    daemon
        .metric(&format!("svclb_faults_total{{kind=\"{kind}\"}}"))
        .unwrap_or_else(|| panic!("no svclb_faults_total for {kind} in /metrics")) as u64
}

#[test]
fn a_map_pin_removed_by_hand_is_pinned_again_and_counted() {
    let fx = ApiFixture::start();
    let daemon = fx.daemon.as_ref().unwrap();
    let before = fx.pins.ctl(&["list"]).unwrap();
    assert_eq!(faults(daemon, "map_pin_missing"), 0);
    let pin = fx.pins.path().join("svclb_vips");
    std::fs::remove_file(&pin).unwrap();
    // The programs still hold the map: balancing never stopped.
    let spread = fx.tcp_spread(addr(VIP, PORT), 10, true);
    assert_eq!(spread.values().sum::<usize>(), 10, "{spread:?}");
    eventually(NOTICED_WITHIN, "the pin is back", || {
        pin.exists().then_some(()).ok_or("not yet".to_string())
    });
    assert_eq!(fx.pins.ctl(&["list"]).unwrap(), before, "the same map");
    assert_eq!(faults(daemon, "map_pin_missing"), 1);
    assert!(
        daemon
            .log_text()
            .contains("a map's pin was removed: pinned again"),
        "logged"
    );
}

#[test]
fn a_link_pin_removed_by_hand_is_attached_again_and_counted() {
    let mut fx = ApiFixture::start();
    fx.add_vip_sink();
    let cg = fx.sandbox.cgroup_path().to_path_buf();
    let links = std::fs::read_dir(fx.pins.path().join("links"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(links.join("svclb_connect4")).unwrap();
    eventually(NOTICED_WITHIN, "connect4 is attached again", || {
        let daemon = fx.daemon.as_ref().unwrap();
        match faults(daemon, "link_pin_missing") {
            1 if links.join("svclb_connect4").exists() => Ok(()),
            n => Err(format!("{n} counted")),
        }
    });
    eventually(
        NOTICED_WITHIN,
        "exactly one connect4 program",
        || match cgroup_prog_count(&cg, ATTACH_INET4_CONNECT).unwrap() {
            1 => Ok(()),
            n => Err(format!("{n} attached")),
        },
    );
    let spread = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert!(
        !spread.contains_key(VIP) && spread.values().sum::<usize>() == 20,
        "balanced again: {spread:?}"
    );
    assert!(fx
        .daemon
        .as_ref()
        .unwrap()
        .log_text()
        .contains("a link's pin was removed"));
}

#[test]
fn an_attached_cgroup_removed_is_released_and_attached_again_when_made_again() {
    let fx = ApiFixture::start();
    let extra = fx
        .sandbox
        .cgroup_root()
        .join(format!("svclb-faults-{}", std::process::id()));
    std::fs::create_dir(&extra).unwrap();
    let pins = svclb_tests::PinDir::new();
    let daemon = Svclbd::start(
        &pins,
        &[
            "--config",
            fx.config.to_str().unwrap(),
            "--cgroup",
            extra.to_str().unwrap(),
        ],
    )
    .unwrap();
    let listed = |pins: &svclb_tests::PinDir| pins.ctl(&["attachments"]).unwrap();
    let name = extra.file_name().unwrap().to_str().unwrap().to_string();
    assert!(listed(&pins).contains(&name));
    std::fs::remove_dir(&extra).unwrap();
    eventually(NOTICED_WITHIN, "its links are released", || {
        match (faults(&daemon, "cgroup_removed"), listed(&pins)) {
            (1, l) if !l.contains(&name) => Ok(()),
            (n, l) => Err(format!("{n} counted; attachments: {l}")),
        }
    });
    assert!(daemon.log_text().contains("an attached cgroup was removed"));
    std::fs::create_dir(&extra).unwrap();
    eventually(NOTICED_WITHIN, "attached again", || {
        let l = listed(&pins);
        l.contains(&name).then_some(()).ok_or(l)
    });
    assert_eq!(
        cgroup_prog_count(&extra, ATTACH_INET4_CONNECT).unwrap(),
        1,
        "the new cgroup has the programs"
    );
    drop(daemon);
    drop(pins);
    let _ = std::fs::remove_dir(&extra);
}

#[test]
fn a_change_that_does_not_validate_is_refused_and_counted() {
    let fx = ApiFixture::start();
    let daemon = fx.daemon.as_ref().unwrap();
    let before = fx.pins.ctl(&["list"]).unwrap();
    std::fs::write(
        &fx.config,
        "[[service]]\nname = \"api\"\nvip = \"not an address\"\nbackends = []\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP).unwrap();
    eventually(NOTICED_WITHIN, "the refusal is counted", || {
        match faults(daemon, "apply_failed") {
            0 => Err("not yet".to_string()),
            _ => Ok(()),
        }
    });
    assert_eq!(fx.pins.ctl(&["list"]).unwrap(), before, "nothing changed");
    assert!(daemon
        .log_text()
        .contains("reload refused, nothing changed"));
}

/// A map write the kernel refuses (ENOMEM, E2BIG, a full map) in the middle
/// of svclbd's reload: the change is rolled back whole, counted, and the
/// balancing stays as it was.
#[test]
fn a_map_write_refused_during_a_reload_is_rolled_back_and_counted() {
    let mut fx = ApiFixture::start();
    fx.daemon.take().unwrap().stop().unwrap();
    let before = fx.pins.ctl(&["list"]).unwrap();
    // The first write past startup fails: found by starting with the
    // failure at write 1, 2, ... until startup makes fewer writes.
    let args = ["--config", fx.config.to_str().unwrap(), "--no-watch"];
    let daemon = (1..=100)
        .find_map(|n| {
            Svclbd::start_with(&fx.pins, &args, |cmd| {
                cmd.env("SVCLB_FAIL_MAP_WRITE", n.to_string());
                Ok(())
            })
            .ok()
        })
        .expect("svclbd starts once the failure is past its startup");
    assert_eq!(fx.pins.ctl(&["list"]).unwrap(), before);
    std::fs::write(
        &fx.config,
        format!("[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nmark = 0x13d\nbackends = [\"172.50.0.41\"]\n"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP).unwrap();
    eventually(NOTICED_WITHIN, "the failure is counted", || {
        match faults(&daemon, "apply_failed") {
            1 => Ok(()),
            n => Err(format!("{n}")),
        }
    });
    let log = daemon.log_text();
    assert!(
        log.contains("failed (injected by SVCLB_FAIL_MAP_WRITE)"),
        "{log}"
    );
    assert!(log.contains("rolled back"), "{log}");
    assert_eq!(fx.pins.ctl(&["list"]).unwrap(), before, "rolled back whole");
    let spread = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert_eq!(spread.len(), 2, "both tasks still balanced: {spread:?}");
    drop(daemon);
}
