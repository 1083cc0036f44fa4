//! `cargo xtask demo`: the seed document's scenario on a real Docker Swarm.
//!
//! A private Docker engine (its own socket, data-root and exec-root under
//! /tmp; an engine already running on the machine is not touched) with a
//! single-node swarm; an `--internal` overlay network `backend`
//! (172.50.0.0/24); `api` with two tasks and a `web` client. On a kernel
//! without IPVS, Swarm's own VIP does not answer; `svclbd --docker`, with
//! no config file, reads Swarm's view and balances `web`'s connects to the
//! tasks. svclb-ctl then prints the counters the way `ipvsadm -L -n --stats`
//! would inside the task, under Swarm's own FWM number. The demo fails if
//! an api task got no connection. Everything is removed at the end.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Result};
use svclb_tests::swarm::{tally, Attempt, Engine, SUBNET};
use svclb_tests::{PinDir, Svclbd};

const NET: &str = "backend";
const CONNECTS: u32 = 400;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-swarm-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    println!("== a private Docker engine (dockerd with its own socket, data-root and exec-root under /tmp), a single-node swarm");
    let mut engine = Engine::start()?;
    println!(
        "   {}",
        engine.docker(&[
            "version",
            "--format",
            "engine {{.Server.Version}}, API {{.Server.APIVersion}}"
        ])?
    );
    println!("== image svclb-test:local from `docker import` (busybox, the host's /usr bound read-only for Python)");
    engine.image()?;
    println!("== overlay network `{NET}` ({SUBNET}, --internal: no route out), service api x2, service web");
    engine.network(NET, SUBNET)?;
    engine.server_service("api", &[NET], 2)?;
    let web = engine.client_service("web", &[NET])?;
    let Some(api) = engine.service_view(NET, "api")? else {
        bail!("api is not in the network's view");
    };
    println!("\n== docker network inspect -v {NET}: what Swarm would program into IPVS");
    println!(
        "   api: VIP {}, LocalLBIndex {} (FWM {}), tasks {}",
        api.vip,
        api.local_lb_index,
        api.local_lb_index,
        api.task_ips.join(", ")
    );

    println!(
        "\n== without svclb: web connects to api (Docker's DNS gives the VIP {})",
        api.vip
    );
    let before = engine.client(&web.id, "tcp", "api", 1)?;
    match before.first() {
        Some(Attempt::Fail { error, .. }) => println!(
            "   failed ({error}): Swarm's own VIP does not answer on this kernel (no IPVS)"
        ),
        Some(Attempt::Ok { .. }) => {
            println!("   answered: this kernel has IPVS, Swarm balances by itself")
        }
        None => bail!("the client printed nothing"),
    }

    println!(
        "\n== svclbd --docker --docker-host {}   (no config file)",
        engine.host()
    );
    let pins = PinDir::new();
    let daemon = Svclbd::start(&pins, &["--docker", "--docker-host", &engine.host()])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let listed = pins.ctl(&["list"])?;
        if api.task_ips.iter().all(|t| listed.contains(t.as_str())) {
            println!("== svclb-ctl list\n{listed}");
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("svclbd did not learn api's tasks:\n{}", daemon.log_text());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    println!("== web connects to `api` {CONNECTS} times, by name through Docker's DNS");
    let attempts = engine.client(&web.id, "tcp", "api", CONNECTS)?;
    let (per_task, failed) = tally(&attempts);
    let peers: BTreeMap<String, u64> = attempts.iter().fold(BTreeMap::new(), |mut m, a| {
        if let Attempt::Ok { peer, .. } = a {
            *m.entry(peer.clone()).or_insert(0) += 1;
        }
        m
    });
    for (task, n) in &per_task {
        println!("   task {task}: {n} connections");
    }
    println!(
        "   failed: {}; getpeername() in web: {peers:?}",
        failed.len()
    );

    println!("\n== svclb-ctl stats   (the layout of ipvsadm -L -n --stats, for the whole node)");
    print!("{}", pins.ctl(&["stats"])?);
    let rows = svclb_tests::parse_stats(&pins.ctl(&["stats", "--exact"])?)?;
    let mut in_api = false;
    let mut conns = BTreeMap::new();
    for r in &rows {
        if !r.is_backend {
            in_api = r.name == format!("FWM  {}", api.local_lb_index);
        } else if in_api {
            conns.insert(r.name.trim_end_matches(":0").to_owned(), r.conns);
        }
    }
    for task in &api.task_ips {
        match conns.get(task) {
            Some(n) if *n > 0 => {}
            _ => bail!(
                "api task {task} has no connection under FWM {}",
                api.local_lb_index
            ),
        }
    }
    if !failed.is_empty() {
        bail!("{} connects failed: {failed:?}", failed.len());
    }
    daemon.stop()?;
    println!(
        "\n== cleaning up: svclbd stopped, pins removed, services, network, swarm and dockerd gone"
    );
    drop(pins);
    drop(engine);
    println!(
        "done: both api tasks were reached through Swarm's VIP {} under FWM {}, with no IPVS and no config file",
        api.vip, api.local_lb_index
    );
    Ok(())
}
