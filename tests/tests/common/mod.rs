//! Shared set-up of the integration tests: a sandbox with the seed's `api`
//! service (VIP 172.50.0.37, mark 0x13d, tasks .40 and .41) and svclbd.
#![allow(dead_code)]

pub mod stats;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use svclb_tests::{daemon::write_temp, PinDir, Sandbox, Svclbd, TcpIdServer, UdpIdServer};

pub const VIP: &str = "172.50.0.37";
pub const TASKS: [&str; 2] = ["172.50.0.40", "172.50.0.41"];
pub const PORT: u16 = 8080;
pub const TIMEOUT: Duration = Duration::from_secs(2);

pub const API_CONFIG: &str = r#"
[[service]]
name = "api"
vip = "172.50.0.37"
mark = 0x13d
backends = ["172.50.0.40", "172.50.0.41"]
"#;

/// Calls `f` until it returns Ok, or panics with the last error after `within`.
#[track_caller]
pub fn eventually<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if std::time::Instant::now() > deadline {
                    panic!("{what}: not reached within {within:?}; last: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// The sandbox, the api tasks' servers, and svclbd attached to the sandbox cgroup.
/// Fields drop in order: daemon, servers, pins (teardown), sandbox.
pub struct ApiFixture {
    pub daemon: Option<Svclbd>,
    pub tcp: Vec<TcpIdServer>,
    pub udp: Vec<UdpIdServer>,
    pub pins: PinDir,
    /// The config file svclbd follows (rewrite it to reload).
    pub config: std::path::PathBuf,
    pub sandbox: Sandbox,
}

impl ApiFixture {
    pub fn start() -> ApiFixture {
        Self::start_with(API_CONFIG)
    }

    pub fn start_with(config: &str) -> ApiFixture {
        let sandbox = Sandbox::new().expect("sandbox");
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for task in TASKS {
            sandbox.add_backend_addr(task.parse().unwrap()).unwrap();
            tcp.push(TcpIdServer::start(&sandbox, addr(task, PORT)).unwrap());
            udp.push(UdpIdServer::start(&sandbox, addr(task, PORT)).unwrap());
        }
        let pins = PinDir::new();
        let config = write_temp("svclb.toml", config).unwrap();
        let cgroup = sandbox.cgroup_path().to_str().unwrap().to_string();
        let daemon = Svclbd::start(
            &pins,
            &["--config", config.to_str().unwrap(), "--cgroup", &cgroup],
        )
        .expect("svclbd starts");
        ApiFixture {
            daemon: Some(daemon),
            tcp,
            udp,
            pins,
            config,
            sandbox,
        }
    }

    /// Puts the VIP itself on the backends' side with a server of its own, so
    /// that a connect() that was not translated reaches "172.50.0.37" instead
    /// of timing out.
    pub fn add_vip_sink(&mut self) {
        self.sandbox.add_backend_addr(VIP.parse().unwrap()).unwrap();
        self.tcp
            .push(TcpIdServer::start(&self.sandbox, addr(VIP, PORT)).unwrap());
    }

    /// TCP connects to `target` from the client netns (in the cgroup when
    /// `in_cgroup`), returning how many reached each identity.
    pub fn tcp_spread(
        &self,
        target: SocketAddr,
        n: usize,
        in_cgroup: bool,
    ) -> std::collections::BTreeMap<String, usize> {
        let _guard = in_cgroup.then(|| self.sandbox.enter_cgroup().unwrap());
        self.sandbox.in_client(|| {
            let mut seen = std::collections::BTreeMap::new();
            for i in 0..n {
                let who = svclb_tests::tcp_identity(target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect #{i} to {target} failed: {e}"));
                *seen.entry(who).or_insert(0) += 1;
            }
            seen
        })
    }

    pub fn stats(&self) -> Vec<svclb_tests::StatsRow> {
        svclb_tests::parse_stats(&self.pins.ctl(&["stats", "--exact"]).unwrap()).unwrap()
    }

    /// Conns of the row named `name` (`FWM  317` or `172.50.0.40:0`).
    pub fn conns(&self, name: &str) -> u64 {
        self.stats()
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name} in svclb-ctl stats"))
            .conns
    }
}
