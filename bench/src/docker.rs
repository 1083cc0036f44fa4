//! The Docker source's figures: from a Docker event (a task
//! started or stopped) to the change visible to new connects, through
//! `svclbd --docker`, with 1,000 and 10,000 services on the network.
//!
//! A real Swarm with that many services needs as many containers, so the
//! engine is the test harness's fake ([`FakeSwarm`]): one swarm-scope
//! network holding the services, answered over the Engine API on a Unix
//! socket, with a streamed `/events`. svclbd follows it exactly as it
//! follows dockerd (`--docker --docker-host unix://...`), attached to the
//! sandbox cgroup as Docker's containers' parent (`--docker-cgroup-parent`).
//!
//! One of the services is the probe's (VIP 172.50.0.201, one task: one of
//! the two TCP identity servers). Each change replaces its task with the
//! other server and sends one `container start` event stamped with the
//! time; the figure runs from that stamp to the end of the first connect,
//! from a probe in the sandbox cgroup, that reached the new task. svclbd's
//! own figure (`event_to_maps_ms` in its log, the
//! `svclb_docker_event_to_maps_seconds` metric) runs from the event's
//! `timeNano` to the maps written, and is reported next to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use svclb_tests::fake_swarm::{FakeService, FakeSwarm};
use svclb_tests::{PinDir, Sandbox, Svclbd, TcpIdServer};

use crate::control::{finish_probe, start_probe, PROBE_BACKENDS, PROBE_PORT, PROBE_VIP};
use crate::modes::{background_vip, MAX_BACKENDS, MAX_SERVICES};
use crate::sweep::Spread;

/// The network the fake engine serves.
const NETWORK: &str = "benchnet";
const NETWORK_ID: &str = "bench0net0000000000000001";
/// The probe's service on it (svclb's `probe@benchnet`).
const PROBE_SERVICE: &str = "probe";
/// svclbd's start-up (load, one full read of the engine, apply, attach).
const READY_WITHIN: Duration = Duration::from_secs(180);

/// One measurement: svclbd following the fake engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerCell {
    /// Services on the network, the probe's included.
    pub services: usize,
    pub changes: usize,
    /// svclbd's `--docker-poll`; `None`: its default (1 s). The poll reads
    /// the whole view besides the events; with a long one, only the events
    /// drive svclbd (the event path alone).
    pub poll: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerPlan {
    pub cells: Vec<DockerCell>,
}

impl DockerPlan {
    fn of(cells: &[(usize, usize, Option<&str>)]) -> DockerPlan {
        DockerPlan {
            cells: cells
                .iter()
                .map(|&(services, changes, poll)| DockerCell {
                    services,
                    changes,
                    poll: poll.map(str::to_owned),
                })
                .collect(),
        }
    }

    pub fn full() -> DockerPlan {
        DockerPlan::of(&[
            (1_000, 100, None),
            (10_000, 30, None),
            (1_000, 100, Some(EVENTS_ONLY_POLL)),
            (10_000, 30, Some(EVENTS_ONLY_POLL)),
        ])
    }

    pub fn quick() -> DockerPlan {
        DockerPlan::of(&[
            (1_000, 30, None),
            (10_000, 10, None),
            (10_000, 10, Some(EVENTS_ONLY_POLL)),
        ])
    }
}

/// The `--docker-poll` of the events-only cells: no poll while measuring.
pub const EVENTS_ONLY_POLL: &str = "1h";

/// One service count's figures, in milliseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerFigure {
    pub services: usize,
    pub changes: usize,
    /// svclbd's `--docker-poll` (`None`: its default, 1 s).
    #[serde(default)]
    pub poll: Option<String>,
    /// From the event's time stamp to a new connect reaching the new task.
    pub visible_ms: Option<Spread>,
    /// The 99th percentile of the same (nearest rank: with fewer than 100
    /// changes, the largest).
    pub visible_p99_ms: Option<f64>,
    /// svclbd's own event-to-maps times (its log's `event_to_maps_ms`),
    /// for the changes it logged one for.
    pub svclbd_ms: Option<Spread>,
    pub svclbd_p99_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerData {
    pub plan: DockerPlan,
    pub figures: Vec<DockerFigure>,
}

/// The nearest-rank percentile `p` (0-100) of `values`.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let v = crate::sweep::sorted_finite(values)?;
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn run(plan: &DockerPlan) -> DockerData {
    println!(
        "Docker source (svclbd --docker against a fake engine): event to new connects, {}",
        plan.cells
            .iter()
            .map(|c| format!(
                "{} changes with {} services ({})",
                c.changes,
                c.services,
                poll_text(c.poll.as_deref())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let figures = plan
        .cells
        .iter()
        .map(|cell| match measure(cell) {
            Ok(f) => {
                let fmt = |s: &Option<Spread>, p99: Option<f64>| match (s, p99) {
                    (Some(s), Some(p)) => format!(
                        "median {:.2} ms, p99 {p:.2} ms (min {:.2}, max {:.2}, n {})",
                        s.median, s.min, s.max, s.n
                    ),
                    _ => "-".to_owned(),
                };
                println!(
                    "  {} services, {}: visible to new connects {}; svclbd's event_to_maps {}",
                    cell.services,
                    poll_text(cell.poll.as_deref()),
                    fmt(&f.visible_ms, f.visible_p99_ms),
                    fmt(&f.svclbd_ms, f.svclbd_p99_ms)
                );
                f
            }
            Err(e) => {
                println!(
                    "  {} services, {}: FAILED {e:#}",
                    cell.services,
                    poll_text(cell.poll.as_deref())
                );
                DockerFigure {
                    services: cell.services,
                    changes: cell.changes,
                    poll: cell.poll.clone(),
                    visible_ms: None,
                    visible_p99_ms: None,
                    svclbd_ms: None,
                    svclbd_p99_ms: None,
                    error: Some(format!("{e:#}")),
                }
            }
        })
        .collect();
    DockerData {
        plan: plan.clone(),
        figures,
    }
}

/// The swarm network's services: `count - 1` others (VIPs and tasks as the
/// other bench services) and the probe's, with task `PROBE_BACKENDS[0]`.
fn services(count: usize) -> BTreeMap<String, FakeService> {
    let mut out = BTreeMap::new();
    for i in 0..count.saturating_sub(1) {
        out.insert(
            format!("svc{i}"),
            FakeService {
                vip: IpAddr::V4(background_vip(i)),
                local_lb_index: 256 + i as u32,
                tasks: vec![IpAddr::V4(std::net::Ipv4Addr::new(
                    172,
                    50,
                    0,
                    100 + (i % 100) as u8,
                ))],
            },
        );
    }
    out.insert(
        PROBE_SERVICE.to_owned(),
        FakeService {
            vip: IpAddr::V4(PROBE_VIP),
            local_lb_index: 256 + count as u32,
            tasks: vec![IpAddr::V4(PROBE_BACKENDS[0])],
        },
    );
    out
}

/// svclbd's `event_to_maps_ms=` values, in its log's order.
fn logged_event_to_maps(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("Docker's view applied"))
        .filter_map(|l| {
            let v = l.split("event_to_maps_ms=").nth(1)?;
            v.split(|c: char| c.is_whitespace()).next()?.parse().ok()
        })
        .collect()
}

/// How svclbd polled, for people.
pub fn poll_text(poll: Option<&str>) -> String {
    match poll {
        None => "events + 1 s poll (svclbd's default)".to_owned(),
        Some(p) => format!("events only (--docker-poll {p})"),
    }
}

fn measure(cell: &DockerCell) -> Result<DockerFigure> {
    let (count, changes) = (cell.services, cell.changes);
    let sandbox = Sandbox::new()?;
    let mut servers = Vec::new();
    for b in PROBE_BACKENDS {
        sandbox.add_backend_addr(IpAddr::V4(b))?;
        servers.push(TcpIdServer::start(
            &sandbox,
            SocketAddr::new(IpAddr::V4(b), PROBE_PORT),
        )?);
    }
    let engine = FakeSwarm::start(NETWORK, NETWORK_ID, services(count))?;
    let parent = sandbox
        .cgroup_path()
        .strip_prefix(sandbox.cgroup_root())
        .context("the sandbox cgroup is not under the cgroup2 mount")?;
    let parent = format!("/{}", parent.display());
    let host = engine.host();
    let (ms, mb) = (MAX_SERVICES.to_string(), MAX_BACKENDS.to_string());
    // For a look at where the time goes: SVCLB_BENCH_DOCKER_LOG=FILE runs
    // svclbd at debug level (the event's arrival, the reconcile's phases)
    // and keeps its log in FILE.<services>.log. Not bollard's debug: it
    // logs every answer whole (megabytes per resync at 10,000 services).
    // Logging takes time too: those figures are not the reported ones.
    let keep_log = std::env::var_os("SVCLB_BENCH_DOCKER_LOG").map(std::path::PathBuf::from);
    let level = if keep_log.is_some() {
        "debug,bollard::docker=info,hyper=info,hyper_util=info"
    } else {
        "info"
    };
    let pins = PinDir::new();
    let mut args = vec![
        "--docker",
        "--docker-host",
        &host,
        "--docker-cgroup-parent",
        &parent,
        "--max-services",
        &ms,
        "--max-backends",
        &mb,
        "--log",
        level,
        "--no-metrics",
    ];
    if let Some(p) = &cell.poll {
        args.extend(["--docker-poll", p]);
    }
    let daemon = Svclbd::start_within(&pins, &args, READY_WITHIN, crate::modes::as_deployed)?;
    engine.wait_for_subscriber(Duration::from_secs(10))?;
    // The resync the subscription causes, and one change not measured:
    // every measured change starts from a steady state.
    std::thread::sleep(Duration::from_millis(200));
    let mut current = 0usize;
    let mut visible = Vec::new();
    let mut logged_before = 0;
    for i in 0..=changes {
        if i == 1 {
            // svclbd logs a little after the maps are written.
            std::thread::sleep(Duration::from_millis(500));
            logged_before = logged_event_to_maps(&daemon.log_text()).len();
        }
        let next = 1 - current;
        let (child, out) = start_probe(&sandbox, PROBE_BACKENDS[next])
            .with_context(|| format!("change {i}: starting the probe"))?;
        let at = engine.set_tasks(PROBE_SERVICE, &[IpAddr::V4(PROBE_BACKENDS[next])])?;
        let ms = finish_probe(child, out, at.monotonic_ns).with_context(|| {
            format!(
                "change {i}: no new connect reached {} after the event",
                PROBE_BACKENDS[next]
            )
        })?;
        if i > 0 {
            visible.push(ms);
        }
        current = next;
        // The probe has reached the new task; the next change starts once
        // the replaced one is out of the maps too (its `die` event, or the
        // full resync after it), so each starts from a steady state.
        wait_for_only(&pins, PROBE_BACKENDS[next])
            .with_context(|| format!("change {i}: the replaced task stayed"))?;
        // And the full resync that follows every event is over (about
        // 150 ms at 10,000 services): a change during one waits for it,
        // which the rows with the 1 s poll show.
        std::thread::sleep(FULL_RESYNC_SETTLE);
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = daemon.log_text();
    if let Some(path) = &keep_log {
        let path = path.with_extension(format!("{count}.log"));
        std::fs::write(&path, &log).with_context(|| format!("writing {}", path.display()))?;
    }
    // From the measured changes only (svclbd logs one when an event's
    // resync changed the maps: not when the poll got there first).
    let logged: Vec<f64> = logged_event_to_maps(&log)
        .into_iter()
        .skip(logged_before)
        .collect();
    if logged.is_empty() {
        bail!("svclbd logged no event_to_maps_ms; its log:\n{log}");
    }
    daemon.stop()?;
    drop(engine);
    drop(servers);
    Ok(DockerFigure {
        services: count,
        changes: visible.len(),
        poll: cell.poll.clone(),
        visible_ms: Spread::of(&visible),
        visible_p99_ms: percentile(&visible, 99.0),
        svclbd_ms: Spread::of(&logged),
        svclbd_p99_ms: percentile(&logged, 99.0),
        error: None,
    })
}

/// Time for svclbd's full resync after an event to finish.
const FULL_RESYNC_SETTLE: Duration = Duration::from_millis(300);

/// Waits until the probe service's only backend in the maps is `task`.
fn wait_for_only(pins: &PinDir, task: std::net::Ipv4Addr) -> Result<()> {
    let want = vec![serde_json::Value::String(task.to_string())];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed: serde_json::Value = serde_json::from_str(&pins.ctl(&["list", "--json"])?)?;
        let backends: Option<Vec<serde_json::Value>> = listed.as_array().and_then(|all| {
            all.iter()
                .find(|s| {
                    s["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(&format!("{PROBE_SERVICE}@")))
                })
                .and_then(|s| s["backends"].as_array())
                .map(|b| b.iter().map(|b| b["address"].clone()).collect())
        });
        if backends.as_ref() == Some(&want) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the probe service's backends are {backends:?}, not [{task}]");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v[..30], 99.0), Some(30.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn svclbd_log_lines() {
        let log = "2025-01-01T00:00:00.000001Z  INFO svclbd: container start: Docker's view applied event_to_maps_ms=21.4\n\
                   2025-01-01T00:00:00.000002Z  INFO svclbd: Docker poll: something else\n\
                   2025-01-01T00:00:01.000001Z  INFO svclbd: container start: Docker's view applied event_to_maps_ms=23\n";
        assert_eq!(logged_event_to_maps(log), vec![21.4, 23.0]);
    }
}
