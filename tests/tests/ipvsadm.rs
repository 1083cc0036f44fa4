//! ipvsadm's layouts, end to end: `svclb-ctl stats`, `list` and `rate`
//! print them with the JSON report's numbers.
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::stats::*;
use common::*;

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)";

/// A number as ipvsadm prints it: digits, or digits and K/M/G/T.
fn parse_large(s: &str) -> (u64, Option<char>) {
    match s.chars().last() {
        Some(c @ ('K' | 'M' | 'G' | 'T')) => (s[..s.len() - 1].parse().unwrap(), Some(c)),
        _ => (s.parse().unwrap(), None),
    }
}

/// Whether `shown` is how ipvsadm abbreviates `exact` (print_largenum).
fn abbreviates(shown: &str, exact: u64) -> bool {
    match parse_large(shown) {
        (v, None) => exact < 100_000_000 && v == exact,
        (v, Some('K')) => (100_000_000..1_000_000_000).contains(&exact) && v == exact / 1_000,
        (v, Some('M')) => {
            (1_000_000_000..100_000_000_000).contains(&exact) && v == exact / 1_000_000
        }
        (v, Some('G')) => v == exact / 1_000_000_000,
        (v, Some(_)) => v == exact / 1_000_000_000_000,
    }
}

/// The rows of a `stats`/`rate` text: (name, the five fields as printed).
fn text_rows(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .skip(3)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with("  -> ") {
                (
                    f[1].to_string(),
                    f[2..].iter().map(|s| s.to_string()).collect(),
                )
            } else {
                (
                    format!("{} {}", f[0], f[1]),
                    f[2..].iter().map(|s| s.to_string()).collect(),
                )
            }
        })
        .collect()
}

#[test]
fn stats_list_and_rate_print_ipvsadms_layouts_with_the_json_numbers() {
    let mut fx = ApiFixture::start_with(
        r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", { address = "172.50.0.41", weight = 3 }]

[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = ["172.50.0.40"]
"#,
    );
    // Past 10^8 bytes each way on one backend (ipvsadm abbreviates those),
    // plus small connections to both services.
    let big = 120_000_000;
    {
        let _guard = fx.sandbox.enter_cgroup().unwrap();
        fx.sandbox.in_client(|| {
            let stream = TcpStream::connect_timeout(&addr(VIP, PORT), TIMEOUT).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let back = stream_echo(stream, big);
            assert!(back.len() > big, "identity line and the echo");
            for i in 0..30 {
                let vip = if i % 3 == 0 { "172.50.0.20" } else { VIP };
                svclb_tests::tcp_echo(addr(vip, PORT), b"hello", TIMEOUT).unwrap();
            }
        });
    }
    // One sample after the load, so that the rates are not all zero; then
    // svclbd stops, so that the figures no longer move between commands.
    std::thread::sleep(Duration::from_millis(2500));
    fx.daemon.take().unwrap().stop().unwrap();

    let exact = fx.pins.ctl(&["stats", "--exact"]).unwrap();
    let short = fx.pins.ctl(&["stats"]).unwrap();
    let json = ctl_json(&fx.pins, &["stats"]);
    eprintln!("{short}{exact}");
    let expected_rows = json_rows(&json);
    assert_eq!(expected_rows.len(), 5, "two services, three backends");

    for text in [&exact, &short] {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER);
        assert_eq!(
            lines[1],
            "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes"
        );
        assert_eq!(lines[2], "  -> RemoteAddress:Port");
    }
    // --exact: what a script parsing ipvsadm --exact reads equals the JSON.
    let parsed = svclb_tests::parse_stats(&exact).unwrap();
    assert_eq!(parsed.len(), expected_rows.len());
    for (row, (name, c, _)) in parsed.iter().zip(&expected_rows) {
        let got = [
            row.conns,
            row.in_pkts,
            row.out_pkts,
            row.in_bytes,
            row.out_bytes,
        ];
        assert_eq!(&got, c, "row {name}");
        assert_eq!(row.name.replace("FWM  ", "FWM "), *name);
    }
    // Abbreviated: each field is ipvsadm's abbreviation of the exact
    // number, in 9 columns, so the rows keep their width (33 + 5 * 9).
    let mut abbreviated = 0;
    for (line, ((name, fields), (_, c, _))) in short
        .lines()
        .skip(3)
        .zip(text_rows(&short).into_iter().zip(&expected_rows))
    {
        assert_eq!(line.len(), 78, "{line:?}");
        assert_eq!(fields.len(), 5, "{line:?}");
        for (shown, n) in fields.iter().zip(c) {
            assert!(abbreviates(shown, *n), "{name}: {shown} for {n}");
            abbreviated += usize::from(parse_large(shown).1.is_some());
        }
    }
    assert!(
        abbreviated >= 4,
        "the big transfer's bytes are abbreviated:\n{short}"
    );
    assert!(
        expected_rows
            .iter()
            .any(|(_, c, _)| c[3] > big as u64 && c[4] > big as u64),
        "{expected_rows:?}"
    );

    // list: Forward, Weight, ActiveConn, InActConn as in the JSON.
    let list = fx.pins.ctl(&["list"]).unwrap();
    let list_json = ctl_json(&fx.pins, &["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines[0], HEADER);
    assert_eq!(lines[1], "Prot LocalAddress:Port Scheduler Flags");
    assert_eq!(
        lines[2],
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
    );
    let mut expected = Vec::new();
    for s in list_json.as_array().unwrap() {
        expected.push(format!(
            "FWM {} {}",
            s["mark"],
            s["scheduler"].as_str().unwrap()
        ));
        for b in s["backends"].as_array().unwrap() {
            expected.push(format!(
                "-> {}:0 Masq {} {} {}",
                b["address"].as_str().unwrap(),
                b["weight"],
                b["active_conns"],
                b["inactive_conns"]
            ));
        }
    }
    let got: Vec<String> = lines[3..]
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(got, expected, "{list}");
    assert!(
        got.contains(&"-> 172.50.0.41:0 Masq 3 0 0".to_string()),
        "{list}"
    );

    // rate: the JSON's rates, abbreviated the same way.
    let (rate_report, _) = rate_json(&fx.pins);
    let rate = fx.pins.ctl(&["rate"]).unwrap();
    let lines: Vec<&str> = rate.lines().collect();
    assert_eq!(lines[0], HEADER);
    assert_eq!(
        lines[1],
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS"
    );
    let rate_rows = json_rows(&rate_report);
    let mut nonzero = 0;
    for ((name, fields), (jname, _, r)) in text_rows(&rate).into_iter().zip(&rate_rows) {
        assert_eq!(&name, jname);
        for (shown, n) in fields.iter().zip(r) {
            assert!(abbreviates(shown, *n), "rate of {name}: {shown} for {n}");
            nonzero += usize::from(*n > 0);
        }
    }
    assert_eq!(text_rows(&rate).len(), rate_rows.len());
    assert!(nonzero > 0, "the load shows in the rates:\n{rate}");
}
