//! Counting off: `svclbd --no-packet-counters` leaves out the skb programs,
//! and `--packet-counters-hook-only` attaches no-ops (for measuring what
//! counting costs).
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces.

mod common;

use common::stats::*;
use common::*;

/// The programs pinned for the sandbox cgroup, from `svclb-ctl attachments`.
fn attached_programs(fx: &ApiFixture) -> Vec<String> {
    let name = fx
        .sandbox
        .cgroup_path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let list = ctl_json(&fx.pins, &["attachments"]);
    let a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["cgroup"].as_str().unwrap().ends_with(&name))
        .unwrap_or_else(|| panic!("{name} is not attached: {list}"));
    a["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn packet_totals(fx: &ApiFixture) -> (u64, u64, u64) {
    let rows = backend_rows(&fx.pins);
    (
        rows.values().map(|r| r.conns).sum(),
        rows.values().map(|r| r.in_pkts).sum(),
        rows.values()
            .map(|r| r.out_pkts + r.in_bytes + r.out_bytes)
            .sum(),
    )
}

#[test]
fn no_packet_counters_leaves_out_the_skb_programs_and_only_them_and_hook_only_attaches_no_ops() {
    let mut fx = ApiFixture::start();
    let config = svclb_tests::daemon::write_temp("svclb.toml", API_CONFIG).unwrap();
    let cgroup = fx.sandbox.cgroup_path().to_str().unwrap().to_string();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a = vec![
            "--config".to_string(),
            config.to_str().unwrap().to_string(),
            "--cgroup".to_string(),
            cgroup.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let with = attached_programs(&fx);
    assert!(
        with.contains(&"svclb_egress".to_string()) && with.contains(&"svclb_ingress".to_string()),
        "{with:?}"
    );

    // Restarted with counting off: the two cgroup_skb links are removed,
    // the others stay (replaced).
    fx.daemon.take().unwrap().stop().unwrap();
    let off = args(&["--no-packet-counters"]);
    let off: Vec<&str> = off.iter().map(String::as_str).collect();
    fx.daemon = Some(svclb_tests::Svclbd::start(&fx.pins, &off).unwrap());
    let without = attached_programs(&fx);
    let expected: Vec<String> = with
        .iter()
        .filter(|p| *p != "svclb_egress" && *p != "svclb_ingress")
        .cloned()
        .collect();
    assert_eq!(without, expected);

    // Balancing, Conns and the gauges work; packets and bytes are not counted.
    let spread = fx.tcp_spread(addr(VIP, PORT), 50, true);
    assert!(!spread.contains_key(VIP));
    assert_eq!(packet_totals(&fx), (50, 0, 0));
    wait_gauges(&fx.pins, (0, 0), "closed connections leave the gauges");

    // The hook alone (`--packet-counters-hook-only`, what the benchmark's
    // svclb-hookonly measures): no-op programs on both hooks, under the
    // counters' pin names; nothing is counted.
    fx.daemon.take().unwrap().stop().unwrap();
    let hook = args(&["--packet-counters-hook-only"]);
    let hook: Vec<&str> = hook.iter().map(String::as_str).collect();
    fx.daemon = Some(svclb_tests::Svclbd::start(&fx.pins, &hook).unwrap());
    assert_eq!(attached_programs(&fx), with);
    let on_hooks = |attach_type| {
        svclb_tests::bpf::cgroup_prog_names(fx.sandbox.cgroup_path(), attach_type).unwrap()
    };
    assert_eq!(
        on_hooks(svclb_tests::bpf::ATTACH_INET_EGRESS),
        ["svclb_egr_nop"]
    );
    assert_eq!(
        on_hooks(svclb_tests::bpf::ATTACH_INET_INGRESS),
        ["svclb_ingr_nop"]
    );
    fx.tcp_spread(addr(VIP, PORT), 50, true);
    assert_eq!(packet_totals(&fx), (100, 0, 0));

    // Counting on again: the links come back and count.
    fx.daemon.take().unwrap().stop().unwrap();
    let on = args(&[]);
    let on: Vec<&str> = on.iter().map(String::as_str).collect();
    fx.daemon = Some(svclb_tests::Svclbd::start(&fx.pins, &on).unwrap());
    assert_eq!(attached_programs(&fx), with);
    assert_eq!(
        on_hooks(svclb_tests::bpf::ATTACH_INET_EGRESS),
        ["svclb_egress"]
    );
    fx.tcp_spread(addr(VIP, PORT), 50, true);
    let (conns, in_pkts, rest) = packet_totals(&fx);
    assert_eq!(conns, 150);
    assert!(
        in_pkts >= 150 && rest > 0,
        "counting again: {in_pkts} {rest}"
    );
}
