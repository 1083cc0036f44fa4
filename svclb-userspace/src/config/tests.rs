use super::*;
use crate::model::{DesiredState, MAX_NAME_LEN};
use std::net::{Ipv4Addr, Ipv6Addr};

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn backend(addr: IpAddr) -> BackendSpec {
    BackendSpec {
        addr,
        port: None,
        weight: 1,
    }
}

fn parse(text: &str) -> DesiredState {
    parse_config(text).static_state()
}

fn parse_config(text: &str) -> Config {
    parse_str(text, "svclb.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// Parses `text`, expecting an error at `line` on `field` whose text
/// contains `needle`; returns it for further checks.
#[track_caller]
fn rejects(text: &str, line: usize, field: &str, needle: &str) -> ConfigError {
    let e = parse_str(text, "svclb.toml").expect_err("config should be rejected");
    let shown = e.to_string();
    assert_eq!(e.origin, "svclb.toml", "{shown}");
    assert_eq!(e.line, Some(line), "{shown}");
    assert_eq!(e.field.as_deref(), Some(field), "{shown}");
    assert!(shown.contains(needle), "{shown:?} lacks {needle:?}");
    assert!(shown.starts_with(&format!("svclb.toml:{line}:")), "{shown}");
    e
}

/// A valid service, to put before or after the one under test.
const API: &str = r#"
[[service]]
name = "api"
vip = "172.50.0.37"
backends = ["172.50.0.40"]
"#;

#[test]
fn seed_scenario_parses() {
    let state = parse(
        r#"
# The three services of the seed stack, as ipvsadm -Ln shows them.
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
scheduler = "random"
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = ["172.50.0.21"]

[[service]]
name = "cache"
vip = "172.50.0.18"
mark = 0x13b
backends = [{ address = "172.50.0.34" }]
"#,
    );
    let expected = DesiredState {
        services: vec![
            ServiceSpec::new(
                "api",
                v4(172, 50, 0, 37),
                Some(317),
                Scheduler::Random,
                vec![backend(v4(172, 50, 0, 40)), backend(v4(172, 50, 0, 41))],
            ),
            ServiceSpec::new(
                "db",
                v4(172, 50, 0, 20),
                Some(0x128),
                Scheduler::Rr,
                vec![backend(v4(172, 50, 0, 21))],
            ),
            ServiceSpec::new(
                "cache",
                v4(172, 50, 0, 18),
                Some(0x13b),
                Scheduler::Rr,
                vec![backend(v4(172, 50, 0, 34))],
            ),
        ],
    };
    assert_eq!(state, expected);
}

#[test]
fn per_port_affinity_and_networks() {
    let state = parse(
        "[[service]]\nname = \"web\"\nvip = \"172.50.0.37\"\nbackends = [\"172.50.0.40\"]\n\n\
         [[service]]\nname = \"web-http\"\nvip = \"172.50.0.37\"\nport = 80\n\
         backends = [{ address = \"172.50.0.41\", port = 8080 }]\naffinity = \"5m\"\n\
         networks = [\"front\", \"front\", \"back\"]\n\n\
         [[service]]\nname = \"dns\"\nvip = \"172.50.0.37\"\nport = 53\nprotocol = \"udp\"\n",
    );
    assert_eq!(state.services[0].port, None);
    assert_eq!(
        state.services[1].port,
        Some(ServicePort {
            port: 80,
            protocol: svclb_common::IPPROTO_TCP
        })
    );
    assert_eq!(state.services[1].affinity, Some(300));
    assert_eq!(state.services[1].networks, vec!["front", "back"]);
    assert_eq!(
        state.services[2].port,
        Some(ServicePort {
            port: 53,
            protocol: svclb_common::IPPROTO_UDP
        })
    );
}

#[test]
fn bad_ports_protocols_and_networks() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nprotocol = \"udp\"\n",
        4,
        "service[0].protocol",
        "`protocol` needs `port`",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"sctp\"\n",
        5,
        "service[0].protocol",
        "unknown protocol \"sctp\"",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 80\n\
         [[service]]\nname = \"b\"\nvip = \"10.0.0.1\"\nport = 80\n",
        7,
        "service[1].vip",
        "10.0.0.1 80/tcp is already the VIP of service[0]",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nnetworks = [\"a b\"]\n",
        4,
        "service[0].networks[0]",
        "network name \"a b\" has ' '",
    );
}

#[test]
fn defaults() {
    let state = parse(
        r#"
[[service]]
name = "db"
vip = "172.50.0.20"
backends = [{ address = "172.50.0.21" }, "172.50.0.22"]
"#,
    );
    let svc = &state.services[0];
    assert_eq!(svc.mark, None);
    assert_eq!(svc.scheduler, Scheduler::Rr, "Swarm's default");
    assert_eq!(
        svc.backends,
        vec![backend(v4(172, 50, 0, 21)), backend(v4(172, 50, 0, 22))]
    );
}

#[test]
fn weights_and_ports() {
    let state = parse(
        r#"
[[service]]
name = "db"
vip = "172.50.0.20"
backends = [
    { address = "172.50.0.21", weight = 2 },
    { address = "172.50.0.22", weight = 0, port = 5432 },
    "172.50.0.23",
    # Same address, other port: a different real server, as in IPVS.
    { address = "172.50.0.23", port = 5433 },
]
"#,
    );
    let b = &state.services[0].backends;
    assert_eq!((b[0].weight, b[0].port), (2, None));
    assert_eq!((b[1].weight, b[1].port), (0, Some(5432)));
    assert_eq!((b[2].weight, b[2].port), (1, None));
    assert_eq!((b[3].weight, b[3].port), (1, Some(5433)));
}

#[test]
fn service_without_backends() {
    let state = parse("[[service]]\nname = \"idle\"\nvip = \"10.0.0.1\"\n");
    assert!(state.services[0].backends.is_empty());
    let state = parse("[[service]]\nname = \"idle\"\nvip = \"10.0.0.1\"\nbackends = []\n");
    assert!(state.services[0].backends.is_empty());
}

#[test]
fn empty_file() {
    assert_eq!(parse(""), DesiredState::default());
    assert_eq!(parse("# nothing yet\n\n"), DesiredState::default());
    assert_eq!(parse("service = []\n"), DesiredState::default());
}

#[test]
fn ipv4_mapped_is_ipv4() {
    let state = parse(
        r#"
[[service]]
name = "api"
vip = "::ffff:172.50.0.37"
backends = ["::ffff:172.50.0.40", { address = "::FFFF:ac32:0029" }]
"#,
    );
    let svc = &state.services[0];
    assert_eq!(svc.vip, v4(172, 50, 0, 37));
    assert_eq!(
        svc.backends,
        vec![backend(v4(172, 50, 0, 40)), backend(v4(172, 50, 0, 41))]
    );
    // Normalized before comparing: these are the same backend...
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
         backends = [\"10.0.0.2\", \"::ffff:10.0.0.2\"]\n",
        4,
        "service[0].backends[1]",
        "listed twice",
    );
    // ...and the same VIP.
    rejects(
        &format!("{API}[[service]]\nname = \"b\"\nvip = \"::ffff:172.50.0.37\"\n"),
        8,
        "service[1].vip",
        "172.50.0.37 is already the VIP of service[0] \"api\" (line 4)",
    );
}

#[test]
fn ipv6_service() {
    let state =
        parse("[[service]]\nname = \"v6\"\nvip = \"fd00::10\"\nbackends = [\"fd00::11\"]\n");
    let svc = &state.services[0];
    assert_eq!(svc.vip, IpAddr::V6("fd00::10".parse::<Ipv6Addr>().unwrap()));
    assert_eq!(svc.backends[0].addr, "fd00::11".parse::<IpAddr>().unwrap());
}

#[test]
fn error_display() {
    let e = rejects(
        &format!("{API}\n[[service]]\nname = \"b\"\nvip = \"172.50.0.x\"\n"),
        9,
        "service[1].vip",
        "\"172.50.0.x\" is not an IP address",
    );
    assert_eq!(e.column, Some(7));
    assert_eq!(
        e.to_string(),
        "svclb.toml:9:7: service[1].vip: \"172.50.0.x\" is not an IP address"
    );
}

#[test]
fn syntax_error() {
    let e = parse_str(
        "[[service]]\nname = \"api\nvip = \"10.0.0.1\"\n",
        "svclb.toml",
    )
    .unwrap_err();
    assert_eq!(e.line, Some(2));
    assert_eq!(e.field, None);
    assert!(e.to_string().starts_with("svclb.toml:2:"), "{e}");
}

#[test]
fn unknown_fields() {
    rejects("services = []\n", 1, "services", "unknown field `services`");
    rejects(
        &format!("{API}bogus = 1\n"),
        6,
        "service[0].bogus",
        "unknown field `bogus`",
    );
    let e = rejects(
        &format!("{API}[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [{{ address = \"10.0.0.2\", wieght = 2 }}]\n"),
        9,
        "service[1].backends[0].wieght",
        "unknown field `wieght`",
    );
    assert_eq!(e.column, Some(37));
}

#[test]
fn wrong_types_and_missing_fields() {
    rejects(
        &format!("{API}[[service]]\nname = \"db\"\n"),
        6,
        "service[1]",
        "missing field `vip`",
    );
    rejects(
        &format!(
            "{API}[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [{{ weight = 2 }}]\n"
        ),
        9,
        "service[1].backends[0]",
        "missing field `address`",
    );
    rejects(
        "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nbackends = [1]\n",
        4,
        "service[0].backends[0]",
        "expected an IP address string or a table",
    );
    rejects(
        "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\nmark = -1\n",
        4,
        "service[0].mark",
        "expected u32",
    );
    rejects(
        "[[service]]\nname = \"db\"\nvip = \"10.0.0.1\"\n\
         backends = [{ address = \"10.0.0.2\", port = 70000 }]\n",
        4,
        "service[0].backends[0].port",
        "expected u16",
    );
}

#[test]
fn bad_names() {
    rejects(
        "[[service]]\nname = \"\"\nvip = \"10.0.0.1\"\n",
        2,
        "service[0].name",
        "name is empty",
    );
    rejects(
        "[[service]]\nname = \"my api\"\nvip = \"10.0.0.1\"\n",
        2,
        "service[0].name",
        "contains ' '",
    );
    rejects(
        "[[service]]\nname = \"api/v1\"\nvip = \"10.0.0.1\"\n",
        2,
        "service[0].name",
        "may only use A-Z a-z 0-9 _ . -",
    );
    let long = "a".repeat(MAX_NAME_LEN + 1);
    rejects(
        &format!("[[service]]\nname = \"{long}\"\nvip = \"10.0.0.1\"\n"),
        2,
        "service[0].name",
        "65 bytes long, at most 64",
    );
    // The longest name and every allowed character are fine.
    let ok = format!("{}.Az09_-", "a".repeat(MAX_NAME_LEN - 7));
    parse(&format!(
        "[[service]]\nname = \"{ok}\"\nvip = \"10.0.0.1\"\n"
    ));
}

#[test]
fn duplicate_names() {
    rejects(
        &format!("{API}[[service]]\nname = \"api\"\nvip = \"10.0.0.1\"\n"),
        7,
        "service[1].name",
        "\"api\" is already the name of service[0] \"api\" (line 3)",
    );
    rejects(
        &format!("{API}[[service]]\nname = \"API\"\nvip = \"10.0.0.1\"\n"),
        7,
        "service[1].name",
        "ignoring case",
    );
}

#[test]
fn bad_vips() {
    let svc = |vip: &str| format!("[[service]]\nname = \"a\"\nvip = \"{vip}\"\n");
    rejects(
        &svc("172.50.0.x"),
        3,
        "service[0].vip",
        "is not an IP address",
    );
    rejects(
        &svc("172.50.0.37:80"),
        3,
        "service[0].vip",
        "is not an IP address",
    );
    rejects(&svc("0.0.0.0"), 3, "service[0].vip", "unspecified");
    rejects(&svc("::"), 3, "service[0].vip", "unspecified");
    rejects(&svc("224.0.0.5"), 3, "service[0].vip", "multicast");
    rejects(&svc("ff02::1"), 3, "service[0].vip", "multicast");
    rejects(&svc("255.255.255.255"), 3, "service[0].vip", "broadcast");
    rejects(
        &svc("127.0.0.53"),
        3,
        "service[0].vip",
        "loopback VIP would hijack this host's local traffic",
    );
    rejects(&svc("::1"), 3, "service[0].vip", "loopback");
    rejects(
        &svc("::ffff:127.0.0.1"),
        3,
        "service[0].vip",
        "127.0.0.1 is a loopback",
    );
}

#[test]
fn duplicate_vip() {
    rejects(
        &format!("{API}[[service]]\nname = \"b\"\nvip = \"172.50.0.37\"\n"),
        8,
        "service[1].vip",
        "172.50.0.37 is already the VIP of service[0] \"api\" (line 4)",
    );
}

#[test]
fn bad_marks() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nmark = 0\n",
        4,
        "service[0].mark",
        "mark 0 is reserved",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nmark = 0x13d\n\n\
         [[service]]\nname = \"b\"\nvip = \"10.0.0.2\"\nmark = 317\n",
        9,
        "service[1].mark",
        "mark 0x13d (317) is already used by service[0] \"a\" (line 4)",
    );
}

#[test]
fn unknown_scheduler() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nscheduler = \"fifo\"\n",
        4,
        "service[0].scheduler",
        "unknown scheduler \"fifo\"; accepted: random, rr, wrr, mh, sh, lc, wlc",
    );
}

#[test]
fn bad_backend_addresses() {
    let svc = |backends: &str| {
        format!("[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [{backends}]\n")
    };
    rejects(
        &svc("\"10.0.0.2\", \"10.0.0.x\""),
        4,
        "service[0].backends[1]",
        "\"10.0.0.x\" is not an IP address",
    );
    rejects(
        &svc("{ address = \"nope\" }"),
        4,
        "service[0].backends[0].address",
        "\"nope\" is not an IP address",
    );
    rejects(
        &svc("\"0.0.0.0\""),
        4,
        "service[0].backends[0]",
        "unspecified",
    );
    rejects(
        &svc("\"239.1.1.1\""),
        4,
        "service[0].backends[0]",
        "multicast",
    );
}

#[test]
fn vip_is_also_a_backend() {
    // Of the same service.
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\"10.0.0.1\"]\n",
        4,
        "service[0].backends[0]",
        "10.0.0.1 is the VIP of service[0] \"a\" (line 3); a VIP cannot also be a backend",
    );
    // Of a service defined later in the file.
    rejects(
        &format!(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
             backends = [{{ address = \"172.50.0.37\", port = 80 }}]\n{API}"
        ),
        4,
        "service[0].backends[0].address",
        "172.50.0.37 is the VIP of service[1] \"api\" (line 8)",
    );
}

#[test]
fn duplicate_backend() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
         backends = [\"10.0.0.2\",\n  { address = \"10.0.0.2\", weight = 3 }]\n",
        5,
        "service[0].backends[1].address",
        "backend 10.0.0.2 is listed twice in this service (also backends[0], line 4)",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"fd00::1\"\nbackends = [\n\
         { address = \"fd00::2\", port = 80 },\n{ address = \"fd00::2\", port = 80 }]\n",
        6,
        "service[0].backends[1].address",
        "backend [fd00::2]:80 is listed twice",
    );
    // The same backend in two services is fine (a task on two networks).
    parse(&format!(
        "{API}[[service]]\nname = \"b\"\nvip = \"10.0.0.1\"\nbackends = [\"172.50.0.40\"]\n"
    ));
}

#[test]
fn mixed_families() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\"fd00::2\"]\n",
        4,
        "service[0].backends[0]",
        "an IPv4 VIP with IPv6 backends is not supported",
    );
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"fd00::1\"\nbackends = [\"10.0.0.2\"]\n",
        4,
        "service[0].backends[0]",
        "an IPv6 VIP with IPv4 backends is not supported",
    );
}

#[test]
fn port_zero() {
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
         backends = [{ address = \"10.0.0.2\", port = 0 }]\n",
        4,
        "service[0].backends[0].port",
        "port 0 is invalid; omit `port`",
    );
}

#[test]
fn weights_must_fit_the_schedule() {
    // 1:65536 needs 65537 slots; 2:65536 reduces to 1:32768 and fits.
    let svc = |w: u32| {
        format!(
            "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nbackends = [\n\
             {{ address = \"10.0.0.2\", weight = {w} }},\n\
             {{ address = \"10.0.0.3\", weight = 65536 }}]\n"
        )
    };
    rejects(
        &svc(1),
        4,
        "service[0].backends",
        "more than 65536 schedule slots",
    );
    parse(&svc(2));
}

#[test]
fn first_error_in_file_order_wins() {
    // The duplicate mark (line 9) is found before service[0]'s backend
    // check (line 4) runs, yet line 4 comes first in the file.
    rejects(
        "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n\
         backends = [\"10.0.0.9\"]\nmark = 7\n\
         [[service]]\nname = \"b\"\nvip = \"10.0.0.9\"\nmark = 7\n",
        4,
        "service[0].backends[0]",
        "10.0.0.9 is the VIP of service[1] \"b\" (line 8)",
    );
}

#[test]
fn load_file_names_the_path() {
    let dir = std::env::temp_dir().join(format!("svclb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("svclb.toml");
    std::fs::write(&path, format!("{API}mark = 0\n")).unwrap();
    let e = load_file(&path).unwrap_err();
    assert_eq!(e.origin, path.display().to_string());
    assert!(
        e.to_string()
            .starts_with(&format!("{}:6:8: service[0].mark: ", path.display())),
        "{e}"
    );
    std::fs::write(&path, API).unwrap();
    assert_eq!(load_file(&path).unwrap().services.len(), 1);

    let missing = dir.join("missing.toml");
    let e = load_file(&missing).unwrap_err();
    assert_eq!((e.line, e.field.as_deref()), (None, None));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serializes_to_the_file_format() {
    let text = r#"
[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = [{ address = "172.50.0.21", weight = 2, port = 5432 }, "172.50.0.22"]
"#;
    let state = parse(text);
    let written = toml::to_string(&state).unwrap();
    assert_eq!(parse(&written), state, "{written}");
}

#[test]
fn discovered_services() {
    let config = parse_config(
        r#"
[[service]]
name = "web"
discover = "dns"

[[service]]
name = "db"
discover = "dns"
vip = "172.50.0.20"
mark = 0x128
scheduler = "random"
"#,
    );
    assert!(config.services.is_empty());
    assert_eq!(
        config.discovered,
        vec![
            DiscoveredSpec {
                name: "web".into(),
                vip: None,
                mark: None,
                scheduler: Scheduler::Rr,
                terminate_on_removal: true,
            },
            DiscoveredSpec {
                name: "db".into(),
                vip: Some(v4(172, 50, 0, 20)),
                mark: Some(0x128),
                scheduler: Scheduler::Random,
                terminate_on_removal: true,
            },
        ]
    );
    assert_eq!(config.dns, DnsSettings::default());
    // Static and discovered services share names and VIPs.
    let mixed = parse_config(&format!(
        "{API}[[service]]\nname = \"web\"\ndiscover = \"dns\"\n"
    ));
    assert_eq!((mixed.services.len(), mixed.discovered.len()), (1, 1));
    rejects(
        &format!("{API}[[service]]\nname = \"API\"\ndiscover = \"dns\"\n"),
        7,
        "service[1].name",
        "ignoring case",
    );
    rejects(
        &format!("{API}[[service]]\nname = \"b\"\ndiscover = \"dns\"\nvip = \"172.50.0.37\"\n"),
        9,
        "service[1].vip",
        "already the VIP",
    );
}

#[test]
fn discovered_service_errors() {
    rejects(
        "[[service]]\nname = \"web\"\ndiscover = \"consul\"\n",
        3,
        "service[0].discover",
        "unknown discovery \"consul\"; accepted: \"dns\"",
    );
    rejects(
        "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nbackends = [\"10.0.0.2\"]\n",
        4,
        "service[0].backends",
        "takes its backends from DNS (tasks.web)",
    );
    rejects(
        "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nmark = 5\n",
        4,
        "service[0].mark",
        "`mark` needs a fixed `vip`",
    );
    rejects(
        "[[service]]\nname = \"web\"\ndiscover = \"dns\"\nvip = \"127.0.0.1\"\n",
        4,
        "service[0].vip",
        "loopback",
    );
    rejects(
        "[[service]]\nname = \"web\"\n",
        1,
        "service[0]",
        "or `discover = \"dns\"`",
    );
}

#[test]
fn dns_settings() {
    let config = parse_config(
        r#"
[dns]
nameservers = ["127.0.0.11", "172.50.0.53:5353", "[fd00::53]:53"]
min_refresh = "500ms"
max_refresh = 30
stale_grace = "2m"
timeout = "1s 500ms"
"#,
    );
    assert_eq!(
        config.dns,
        DnsSettings {
            nameservers: vec![
                "127.0.0.11:53".parse().unwrap(),
                "172.50.0.53:5353".parse().unwrap(),
                "[fd00::53]:53".parse().unwrap(),
            ],
            min_refresh: Duration::from_millis(500),
            max_refresh: Duration::from_secs(30),
            stale_grace: Duration::from_secs(120),
            timeout: Duration::from_millis(1500),
        }
    );
}

#[test]
fn dns_setting_errors() {
    rejects(
        "[dns]\nnameservers = [\"127.0.0.11\", \"dns.example\"]\n",
        2,
        "dns.nameservers[1]",
        "\"dns.example\" is not a nameserver address",
    );
    rejects(
        "[dns]\nnameservers = [\"127.0.0.11:0\"]\n",
        2,
        "dns.nameservers[0]",
        "port 0",
    );
    rejects(
        "[dns]\nmin_refresh = \"soon\"\n",
        2,
        "dns.min_refresh",
        "\"soon\" is not a duration",
    );
    rejects("[dns]\ntimeout = -1\n", 2, "dns.timeout", "negative");
    rejects("[dns]\ntimeout = 0\n", 2, "dns.timeout", "longer than zero");
    rejects(
        "[dns]\nmin_refresh = 10\nmax_refresh = \"5s\"\n",
        2,
        "dns.min_refresh",
        "min_refresh (10s) is longer than max_refresh (5s)",
    );
    rejects(
        "[dns]\nmax_refresh = \"500ms\"\n",
        2,
        "dns.max_refresh",
        "min_refresh (1s) is longer than max_refresh (500ms)",
    );
    rejects("[dns]\nttl = 5\n", 2, "dns.ttl", "unknown field `ttl`");
    rejects(
        "[dns]\nstale_grace = true\n",
        2,
        "dns.stale_grace",
        "expected a duration",
    );
}

#[test]
fn the_deploy_example_is_valid() {
    let config = parse_str(
        include_str!("../../../deploy/svclb.toml"),
        "deploy/svclb.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.discovered.len(), 3);
    assert_eq!(config.services.len(), 1);
    assert_eq!(
        config.dns.nameservers,
        vec!["127.0.0.11:53".parse().unwrap()]
    );
}

#[test]
fn a_service_has_at_most_max_backends() {
    let list = |n: usize| -> String {
        let addrs: Vec<String> = (0..n)
            .map(|i| format!("\"10.{}.{}.{}\"", i >> 16, (i >> 8) & 0xff, i & 0xff))
            .collect();
        format!(
            "[[service]]\nname = \"big\"\nvip = \"172.50.0.1\"\nbackends = [{}]\n",
            addrs.join(", ")
        )
    };
    let max = crate::model::MAX_BACKENDS_PER_SERVICE;
    assert_eq!(parse(&list(max)).services[0].backends.len(), max);
    rejects(
        &list(max + 1),
        4,
        "service[0].backends",
        "16385 backends, more than the 16384 a service may have",
    );
}

/// What the file accepts keeps the model's rules, and reads back the same
/// once written out: what the fuzz target checks of every input.
#[test]
fn accepted_files_are_valid_states_and_read_back_the_same() {
    for text in [
        API,
        include_str!("../../../deploy/svclb.toml"),
        include_str!("../../../fuzz/seeds/config/per-port.toml"),
    ] {
        let config = parse_config(text);
        let state = config.static_state();
        crate::model::check_state(&state).unwrap();
        let written = toml::to_string(&state).unwrap();
        assert_eq!(
            parse_config(&written).services,
            config.services,
            "{written}"
        );
    }
}
