//! Control-plane figures: how long installing a large service set takes
//! (svclb and the DNAT modes), how long one backend change takes to reach
//! new connects, and how much kernel memory svclb's maps take.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use svclb_tests::{daemon, PinDir, Sandbox, TcpIdServer};

use crate::docker::{DockerData, DockerPlan};
use crate::load::{monotonic_ns, ProbeResult};
use crate::machine::{pinned_map_memory, MapMemory};
use crate::modes::{
    iptables_rules, nft_script, run_bounded, start_svclbd, start_svclbd_with, svclb_config,
    KillOnDrop, ServiceSet, TempDir, MAX_BACKENDS, MAX_SERVICES,
};
use crate::sweep::Spread;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlPlan {
    pub repetitions: usize,
    /// Repetitions of the DNAT modes' full kube-proxy rule installs, which
    /// take tens of seconds each at 10,000 x 10.
    pub dnat_repetitions: usize,
    /// Services (besides the measured one) and backends each, for the apply figure.
    pub apply_services: usize,
    pub apply_backends: usize,
    /// Other services installed while a backend changes.
    pub change_services: usize,
    pub memory_services: Vec<usize>,
}

impl ControlPlan {
    pub fn full() -> ControlPlan {
        ControlPlan {
            repetitions: 3,
            dnat_repetitions: 1,
            apply_services: 10_000,
            apply_backends: 10,
            change_services: 10_000,
            memory_services: vec![1_000, 10_000, 100_000],
        }
    }

    pub fn quick() -> ControlPlan {
        ControlPlan {
            repetitions: 1,
            dnat_repetitions: 1,
            apply_services: 1_000,
            apply_backends: 10,
            change_services: 1_000,
            memory_services: vec![1_000, 10_000],
        }
    }
}

/// Time to install the service set with one tool, over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyFigure {
    pub what: String,
    pub secs: Option<Spread>,
    pub error: Option<String>,
}

/// Time from starting a backend change until a new connect reaches the new backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeFigure {
    pub how: String,
    pub ms: Option<Spread>,
    /// For `svclb-ctl apply`: the command's own wall time.
    pub command_ms: Option<Spread>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryFigure {
    pub services: usize,
    pub max_services: u32,
    pub max_backends: u32,
    pub maps: Vec<MapMemory>,
    pub total_bytes: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlData {
    pub plan: ControlPlan,
    pub apply: Vec<ApplyFigure>,
    pub change: Vec<ChangeFigure>,
    pub memory: Vec<MemoryFigure>,
    /// The Docker source's event-to-connects figures (absent from reports
    /// made before they were measured).
    #[serde(default)]
    pub docker: Option<DockerData>,
}

impl ControlData {
    /// Only the Docker source's figures (`svclb-bench --only docker` with
    /// no earlier report to keep the rest from).
    pub fn docker_only(plan: &ControlPlan, docker: Option<DockerData>) -> ControlData {
        ControlData {
            plan: plan.clone(),
            apply: Vec::new(),
            change: Vec::new(),
            memory: Vec::new(),
            docker,
        }
    }
}

pub fn run(plan: &ControlPlan, docker: &DockerPlan) -> ControlData {
    println!(
        "control plane: apply {} services x {} backends, backend change with {} services, map memory at {:?}",
        plan.apply_services, plan.apply_backends, plan.change_services, plan.memory_services
    );
    let apply = apply_figures(plan);
    let change = change_figures(plan);
    let memory = plan
        .memory_services
        .iter()
        .map(|&n| memory_figure(n))
        .collect();
    let docker = crate::docker::run(docker);
    ControlData {
        plan: plan.clone(),
        apply,
        change,
        memory,
        docker: Some(docker),
    }
}

fn report(what: &str, times: &[f64], errors: Vec<String>) -> ApplyFigure {
    let secs = Spread::of(times);
    match &secs {
        Some(s) => println!(
            "  {what}: {:.3} s (min {:.3}, max {:.3})",
            s.median, s.min, s.max
        ),
        None => println!("  {what}: FAILED {errors:?}"),
    }
    ApplyFigure {
        what: what.into(),
        secs,
        error: errors.into_iter().next(),
    }
}

fn apply_figures(plan: &ControlPlan) -> Vec<ApplyFigure> {
    // The background services with `apply_backends` each, plus the measured one.
    let set = ServiceSet::new(plan.apply_services + 1, plan.apply_backends).with_full_rules();
    let mut figures = Vec::new();
    let mut measure = |what: &str, reps: usize, f: &dyn Fn() -> Result<f64>| {
        let mut times = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..reps {
            match f() {
                Ok(t) => times.push(t),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        figures.push(report(what, &times, errors));
    };
    let svclb_text = svclb_config(&set);
    measure(
        "svclb-ctl apply (cold maps, svclbd running)",
        plan.repetitions,
        &|| {
            let sandbox = Sandbox::new()?;
            let dir = TempDir::new("apply")?;
            let config = dir.write("services.toml", &svclb_text)?;
            let pins = PinDir::new();
            let daemon = start_svclbd(&pins, None, sandbox.cgroup_path())?;
            let mut cmd = Command::new(daemon::bin("svclb-ctl"));
            cmd.arg("--pin-dir")
                .arg(pins.path())
                .arg("apply")
                .arg(&config);
            let t = Instant::now();
            run_bounded(&mut cmd, Duration::from_secs(120))?;
            let secs = t.elapsed().as_secs_f64();
            daemon.stop()?;
            Ok(secs)
        },
    );
    measure(
        "svclbd cold start to READY (load, apply, attach)",
        plan.repetitions,
        &|| {
            let sandbox = Sandbox::new()?;
            let dir = TempDir::new("start")?;
            let config = dir.write("services.toml", &svclb_text)?;
            let pins = PinDir::new();
            let t = Instant::now();
            let daemon = start_svclbd_with(
                &pins,
                Some(&config),
                sandbox.cgroup_path(),
                MAX_SERVICES,
                MAX_BACKENDS,
                &["--log", "info", "--no-watch", "--no-metrics"],
            )?;
            let secs = t.elapsed().as_secs_f64();
            daemon.stop()?;
            Ok(secs)
        },
    );
    let rules = iptables_rules(&set);
    for tool in ["iptables-nft-restore", "iptables-legacy-restore"] {
        measure(
            &format!("{tool} (kube-proxy rules)"),
            plan.dnat_repetitions,
            &|| {
                let sandbox = Sandbox::new()?;
                let dir = TempDir::new("restore")?;
                let path = dir.write("rules", &rules)?;
                let mut cmd = Command::new(tool);
                cmd.arg("-w");
                sandbox.client_command(&mut cmd, false)?;
                cmd.stdin(std::fs::File::open(&path)?);
                let t = Instant::now();
                svclb_tests::run(&mut cmd)?;
                Ok(t.elapsed().as_secs_f64())
            },
        );
    }
    let script = nft_script(&set);
    measure(
        "nft -f (kube-proxy nftables rules)",
        plan.dnat_repetitions,
        &|| {
            let sandbox = Sandbox::new()?;
            let dir = TempDir::new("nft")?;
            let path = dir.write("rules.nft", &script)?;
            let mut cmd = Command::new("nft");
            cmd.arg("-f").arg(&path);
            sandbox.client_command(&mut cmd, false)?;
            let t = Instant::now();
            svclb_tests::run(&mut cmd)?;
            Ok(t.elapsed().as_secs_f64())
        },
    );
    figures
}

pub(crate) const PROBE_VIP: Ipv4Addr = Ipv4Addr::new(172, 50, 0, 201);
pub(crate) const PROBE_PORT: u16 = 81;
pub(crate) const PROBE_BACKENDS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(172, 50, 0, 30), Ipv4Addr::new(172, 50, 0, 31)];

fn probe_config(set: &ServiceSet, backend: Ipv4Addr) -> String {
    format!(
        "{}\n[[service]]\nname = \"probe\"\nvip = \"{PROBE_VIP}\"\nbackends = [\"{backend}\"]\n",
        svclb_config(set)
    )
}

/// Starts a probe in the cgroup that connects to the probe VIP until it
/// reaches `expect`; returns once it has made its first connect.
pub(crate) fn start_probe(
    sandbox: &Sandbox,
    expect: Ipv4Addr,
) -> Result<(KillOnDrop, BufReader<std::process::ChildStdout>)> {
    let mut cmd = Command::new(daemon::bin("svclb-load"));
    cmd.args(["probe", "--target", &format!("{PROBE_VIP}:{PROBE_PORT}")])
        .args(["--expect", &expect.to_string(), "--limit-ms", "10000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    sandbox.client_command(&mut cmd, true)?;
    let mut child = KillOnDrop(cmd.spawn().context("starting the probe")?);
    let mut out = BufReader::new(child.0.stdout.take().context("probe stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the probe said {line:?} instead of ready");
    }
    Ok((child, out))
}

pub(crate) fn finish_probe(
    mut child: KillOnDrop,
    mut out: BufReader<std::process::ChildStdout>,
    t0: u64,
) -> Result<f64> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    let status = child.0.wait()?;
    if !status.success() || line.trim().is_empty() {
        bail!("the probe failed ({status})");
    }
    let r: ProbeResult = serde_json::from_str(line.trim())?;
    Ok(r.matched_end_ns.saturating_sub(t0) as f64 / 1e6)
}

fn change_figures(plan: &ControlPlan) -> Vec<ChangeFigure> {
    match change_figures_inner(plan) {
        Ok(f) => f,
        Err(e) => {
            println!("  backend change: FAILED {e:#}");
            vec![ChangeFigure {
                how: "backend change".into(),
                ms: None,
                command_ms: None,
                error: Some(format!("{e:#}")),
            }]
        }
    }
}

fn change_figures_inner(plan: &ControlPlan) -> Result<Vec<ChangeFigure>> {
    let set = ServiceSet::new(plan.change_services, 1);
    let sandbox = Sandbox::new()?;
    let mut servers = Vec::new();
    for b in PROBE_BACKENDS {
        sandbox.add_backend_addr(IpAddr::V4(b))?;
        servers.push(TcpIdServer::start(
            &sandbox,
            SocketAddr::new(IpAddr::V4(b), PROBE_PORT),
        )?);
    }
    let dir = TempDir::new("change")?;
    let main_config = dir.write("services.toml", &probe_config(&set, PROBE_BACKENDS[0]))?;
    let pins = PinDir::new();
    let daemon = start_svclbd(&pins, Some(&main_config), sandbox.cgroup_path())?;
    let mut current = 0usize;
    let mut figures = Vec::new();

    // 1. svclb-ctl apply of a file with the other backend.
    let (mut ms, mut cmd_ms) = (Vec::new(), Vec::new());
    for i in 0..plan.repetitions.max(3) {
        let next = 1 - current;
        let file = dir.write(
            &format!("next-{i}.toml"),
            &probe_config(&set, PROBE_BACKENDS[next]),
        )?;
        let (child, out) = start_probe(&sandbox, PROBE_BACKENDS[next])?;
        let mut cmd = Command::new(daemon::bin("svclb-ctl"));
        cmd.arg("--pin-dir")
            .arg(pins.path())
            .arg("apply")
            .arg(&file);
        let t0 = monotonic_ns();
        run_bounded(&mut cmd, Duration::from_secs(60))?;
        cmd_ms.push((monotonic_ns() - t0) as f64 / 1e6);
        ms.push(finish_probe(child, out, t0)?);
        current = next;
    }
    figures.push(ChangeFigure {
        how: format!(
            "svclb-ctl apply (whole file, {} services)",
            plan.change_services + 1
        ),
        ms: Spread::of(&ms),
        command_ms: Spread::of(&cmd_ms),
        error: None,
    });

    // 2. svclbd reloading its config on SIGHUP.
    let mut ms = Vec::new();
    for _ in 0..plan.repetitions.max(3) {
        let next = 1 - current;
        std::fs::write(&main_config, probe_config(&set, PROBE_BACKENDS[next]))?;
        let (child, out) = start_probe(&sandbox, PROBE_BACKENDS[next])?;
        let t0 = monotonic_ns();
        daemon.signal(libc::SIGHUP)?;
        ms.push(finish_probe(child, out, t0)?);
        current = next;
    }
    figures.push(ChangeFigure {
        how: format!(
            "svclbd SIGHUP reload (whole file, {} services)",
            plan.change_services + 1
        ),
        ms: Spread::of(&ms),
        command_ms: None,
        error: None,
    });
    daemon.stop()?;
    drop(pins);

    // 3. svclbd noticing the file change itself (its watch; the file is
    // replaced by a rename, as editors and config managers do).
    let pins = PinDir::new();
    let watched = dir.write("watched.toml", &probe_config(&set, PROBE_BACKENDS[current]))?;
    let daemon = start_svclbd_with(
        &pins,
        Some(&watched),
        sandbox.cgroup_path(),
        MAX_SERVICES,
        MAX_BACKENDS,
        &["--log", "warn", "--no-metrics"],
    )?;
    let mut ms = Vec::new();
    for i in 0..plan.repetitions.max(3) {
        let next = 1 - current;
        let staged = dir.write(
            &format!("staged-{i}.toml"),
            &probe_config(&set, PROBE_BACKENDS[next]),
        )?;
        let (child, out) = start_probe(&sandbox, PROBE_BACKENDS[next])?;
        let t0 = monotonic_ns();
        std::fs::rename(&staged, &watched)?;
        ms.push(finish_probe(child, out, t0)?);
        current = next;
    }
    figures.push(ChangeFigure {
        how: format!(
            "svclbd file watch (rename over the config, {} services)",
            plan.change_services + 1
        ),
        ms: Spread::of(&ms),
        command_ms: None,
        error: None,
    });
    for f in &figures {
        if let Some(s) = f.ms {
            println!(
                "  {}: visible after {:.2} ms (min {:.2}, max {:.2})",
                f.how, s.median, s.min, s.max
            );
        }
    }
    daemon.stop()?;
    drop(servers);
    Ok(figures)
}

fn memory_figure(services: usize) -> MemoryFigure {
    // Capacities sized to the service set: the next power of two.
    let max_services = (services as u32 + 1).next_power_of_two().max(1024);
    let max_backends = (services as u32 + 3).next_power_of_two().max(1024);
    let outcome = (|| -> Result<Vec<MapMemory>> {
        let sandbox = Sandbox::new()?;
        let dir = TempDir::new("memory")?;
        let config = dir.write(
            "services.toml",
            &svclb_config(&ServiceSet::new(services, 1)),
        )?;
        let pins = PinDir::new();
        let daemon = start_svclbd_with(
            &pins,
            Some(&config),
            sandbox.cgroup_path(),
            max_services,
            max_backends,
            &["--log", "warn", "--no-watch", "--no-metrics"],
        )?;
        let maps = pinned_map_memory(pins.path())?;
        daemon.stop()?;
        Ok(maps)
    })();
    match outcome {
        Ok(maps) => {
            let total_bytes = maps.iter().map(|m| m.memlock).sum();
            println!(
                "  maps at {services} services (capacity {max_services} services, {max_backends} backends): {:.1} MiB",
                total_bytes as f64 / 1048576.0
            );
            MemoryFigure {
                services,
                max_services,
                max_backends,
                maps,
                total_bytes,
                error: None,
            }
        }
        Err(e) => {
            println!("  maps at {services} services: FAILED {e:#}");
            MemoryFigure {
                services,
                max_services,
                max_backends,
                maps: Vec::new(),
                total_bytes: 0,
                error: Some(format!("{e:#}")),
            }
        }
    }
}
