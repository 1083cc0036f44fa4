//! `cargo xtask demo`: the seed document's scenario in a throwaway sandbox.
//!
//! A `web` client and three Swarm services, balanced by svclb instead of
//! iptables marks and IPVS:
//!   api    VIP 172.50.0.37  mark 0x13d (FWM 317)  tasks 172.50.0.40, 172.50.0.41
//!   db     VIP 172.50.0.20  mark 0x128 (FWM 296)  task  172.50.0.21
//!   queue  VIP 172.50.0.18  mark 0x13b (FWM 315)  task  172.50.0.34
//! The web client connects to the VIPs; svclb-ctl then prints the counters
//! the way `ipvsadm -L -n --stats` does (the demo fails if an api task has
//! no connection or a zero In/Out column). Everything is removed at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use svclb_tests::{daemon::write_temp, tcp_echo, PinDir, Sandbox, Svclbd, TcpIdServer};

const CONFIG: &str = r#"# The seed's services, as svclb's desired state.
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", "172.50.0.41"]

[[service]]
name = "db"
vip = "172.50.0.20"
mark = 0x128
backends = ["172.50.0.21"]

[[service]]
name = "queue"
vip = "172.50.0.18"
mark = 0x13b
backends = ["172.50.0.34"]
"#;

const TASKS: [&str; 4] = ["172.50.0.40", "172.50.0.41", "172.50.0.21", "172.50.0.34"];
const PORT: u16 = 80;
/// (service, VIP, connections the web client makes)
const TRAFFIC: [(&str, &str, usize); 3] = [
    ("api", "172.50.0.37", 400),
    ("db", "172.50.0.20", 200),
    ("queue", "172.50.0.18", 2),
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    println!("== sandbox: netns 'web' client and a backends netns joined by veth, a cgroup for the web task");
    let sandbox = Sandbox::new()?;
    let mut servers = Vec::new();
    for task in TASKS {
        sandbox.add_backend_addr(task.parse()?)?;
        servers.push(TcpIdServer::start(
            &sandbox,
            SocketAddr::new(task.parse()?, PORT),
        )?);
    }
    println!(
        "   client netns {}, backends netns {}, cgroup {}",
        sandbox.client_netns(),
        sandbox.backends_netns(),
        sandbox.cgroup_path().display()
    );

    let pins = PinDir::new();
    let config = write_temp("demo.toml", CONFIG)?;
    println!(
        "\n== svclbd --config {} --cgroup {}",
        config.display(),
        sandbox.cgroup_path().display()
    );
    println!("{CONFIG}");
    let cgroup = sandbox
        .cgroup_path()
        .to_str()
        .context("cgroup path")?
        .to_string();
    let daemon = Svclbd::start(
        &pins,
        &[
            "--config",
            config.to_str().context("path")?,
            "--cgroup",
            &cgroup,
        ],
    )?;

    println!("== svclb-ctl list");
    print!("{}", pins.ctl(&["list"])?);

    println!("\n== the web task connects to each VIP on port {PORT}, sends a request and reads the reply");
    let spread = {
        let _in_web_task = sandbox.enter_cgroup()?;
        sandbox.try_in_client(|| -> Result<BTreeMap<String, usize>> {
            let mut spread = BTreeMap::new();
            for (name, vip, n) in TRAFFIC {
                let target = SocketAddr::new(vip.parse()?, PORT);
                for i in 0..n {
                    let (who, echoed) =
                        tcp_echo(target, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(2))
                            .with_context(|| format!("request #{i} to {name} ({target})"))?;
                    if echoed.len() != 18 {
                        bail!("{name}: short reply from {who}");
                    }
                    *spread.entry(format!("{name} -> {who}")).or_insert(0) += 1;
                }
            }
            Ok(spread)
        })??
    };
    for (route, n) in &spread {
        println!("   {route}: {n} connections");
    }

    println!("\n== svclb-ctl stats   (the layout of ipvsadm -L -n --stats)");
    let stats = pins.ctl(&["stats"])?;
    print!("{stats}");

    let rows = svclb_tests::parse_stats(&pins.ctl(&["stats", "--exact"])?)?;
    for task in ["172.50.0.40:0", "172.50.0.41:0"] {
        let Some(row) = rows.iter().find(|r| r.name == task) else {
            bail!("svclb-ctl stats has no row for api backend {task}");
        };
        if row.conns == 0 {
            bail!("api backend {task} got no connection");
        }
        // Every connection sent and received packets: the In/Out columns
        // (cgroup_skb counters) must show them.
        for (column, n) in [
            ("InPkts", row.in_pkts),
            ("OutPkts", row.out_pkts),
            ("InBytes", row.in_bytes),
            ("OutBytes", row.out_bytes),
        ] {
            if n == 0 {
                bail!("api backend {task}: {column} is 0 after {} connections: the packet counters are not counting", row.conns);
            }
        }
    }

    println!("\n== cleaning up: svclbd stopped, pins removed, namespaces and cgroup deleted");
    daemon.stop()?;
    drop(servers);
    drop(pins);
    drop(sandbox);
    println!("done: both api tasks were reached through VIP 172.50.0.37; every connect() was rewritten in the kernel, no packet was NATed");
    Ok(())
}
