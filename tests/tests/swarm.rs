//! svclb against a real Docker Swarm: a private engine (tests/src/swarm.rs)
//! with a single-node swarm, `api` identity servers and a `web` client on
//! an `--internal` overlay, and `svclbd --docker` with no config file.
//!
//! These tests never skip: a machine where the engine cannot start fails
//! them, naming why (`cargo xtask setup` installs Debian's docker.io).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use svclb_tests::swarm::{tally, Attempt, Engine, ServiceView};
use svclb_tests::{parse_stats, PinDir, Svclbd};

const NET: &str = "backend";

/// An engine with `api` (2 tasks) and `web` on [`NET`].
struct Swarm {
    engine: Engine,
    web: String,
}

fn swarm(api_replicas: u32) -> Swarm {
    swarm_on(
        Engine::start().expect("a private Docker engine with a swarm"),
        api_replicas,
    )
}

fn swarm_on(mut engine: Engine, api_replicas: u32) -> Swarm {
    engine.network(NET, svclb_tests::swarm::SUBNET).unwrap();
    engine.server_service("api", &[NET], api_replicas).unwrap();
    let web = engine.client_service("web", &[NET]).unwrap();
    Swarm {
        engine,
        web: web.id,
    }
}

fn svclbd(pins: &PinDir, engine: &Engine) -> Svclbd {
    Svclbd::start(pins, &["--docker", "--docker-host", &engine.host()])
        .expect("svclbd --docker starts")
}

fn view(engine: &Engine) -> ServiceView {
    engine
        .service_view(NET, "api")
        .unwrap()
        .expect("api in the network's view")
}

/// api's backends as svclb lists them, sorted.
fn listed_backends(pins: &PinDir) -> Vec<String> {
    let text = pins.ctl(&["list", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out: Vec<String> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "api@backend")
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["address"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// Waits until svclb's backends for api are `want`.
fn wait_backends(pins: &PinDir, want: &[String], daemon: &Svclbd) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while listed_backends(pins) != want {
        if Instant::now() > deadline {
            panic!(
                "svclb's api backends are {:?}, the engine says {want:?}\n{}",
                listed_backends(pins),
                daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Conns of service `FWM <mark>` (svclb-ctl stats).
fn fwm_conns(pins: &PinDir, mark: u32) -> u64 {
    parse_stats(&pins.ctl(&["stats", "--exact"]).unwrap())
        .unwrap()
        .iter()
        .filter(|r| !r.is_backend && r.name == format!("FWM  {mark}"))
        .map(|r| r.conns)
        .sum()
}

/// Every connect that succeeded reached one of `tasks`.
#[track_caller]
fn reached_only(attempts: &[Attempt], tasks: &BTreeSet<String>, what: &str) {
    for a in attempts {
        if let Attempt::Ok { task_addr, .. } = a {
            assert!(
                tasks.contains(task_addr),
                "{what}: reached {task_addr}, not a task"
            );
        }
    }
}

fn fails(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| matches!(a, Attempt::Fail { .. }))
        .collect()
}

#[test]
fn seed_end_to_end_with_svclbd_docker() {
    let s = swarm(2);
    let e = &s.engine;
    let api = view(e);
    assert_eq!(api.task_ips.len(), 2, "{api:?}");

    // Without svclb, Swarm's own VIP is dead on this kernel (no IPVS).
    let before = e.client(&s.web, "tcp", "api", 1).unwrap();
    assert!(
        matches!(&before[..], [Attempt::Fail { .. }]),
        "Swarm's VIP answered without svclb: {before:?}"
    );

    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    wait_backends(&pins, &api.task_ips, &daemon);

    // TCP by name: resolved by Docker's DNS to the VIP, balanced over both
    // tasks, and the socket's peer is the VIP.
    let attempts = e.client(&s.web, "tcp", "api", 100).unwrap();
    let (per_task, failed) = tally(&attempts);
    assert!(failed.is_empty(), "failed connects: {failed:?}");
    for a in &attempts {
        if let Attempt::Ok { resolved, peer, .. } = a {
            assert_eq!(resolved, &api.vip, "api resolves to the VIP");
            assert_eq!(peer, &api.vip, "getpeername is the VIP");
        }
    }
    let reached: Vec<String> = per_task.keys().cloned().collect();
    assert_eq!(reached, api.task_ips, "both tasks reached: {per_task:?}");
    for (task, n) in &per_task {
        assert!(*n >= 40, "round robin: {task} got {n} of 100");
    }

    // UDP: the replies come from the VIP.
    let attempts = e.client(&s.web, "udp", "api", 20).unwrap();
    let (udp_per_task, failed) = tally(&attempts);
    assert!(failed.is_empty(), "failed datagrams: {failed:?}");
    assert_eq!(
        udp_per_task.keys().cloned().collect::<Vec<_>>(),
        api.task_ips,
        "{udp_per_task:?}"
    );
    for a in &attempts {
        if let Attempt::Ok { peer, .. } = a {
            assert_eq!(peer, &api.vip, "the UDP reply's source is the VIP");
        }
    }

    // Stats: FWM <LocalLBIndex>, the tasks of `docker network inspect -v`,
    // Conns equal to what each task accepted, plus its UDP "connections"
    // (each datagram came from a new socket, which IPVS counts as one too).
    let rows = parse_stats(&pins.ctl(&["stats", "--exact"]).unwrap()).unwrap();
    let mut in_service = false;
    let mut conns: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rows {
        if !r.is_backend {
            in_service = r.name == format!("FWM  {}", api.local_lb_index);
        } else if in_service {
            conns.insert(r.name.trim_end_matches(":0").to_owned(), r.conns);
        }
    }
    assert_eq!(
        conns.keys().cloned().collect::<Vec<_>>(),
        api.task_ips,
        "stats rows under FWM {}: {rows:?}",
        api.local_lb_index
    );
    for task in e.tasks("api").unwrap() {
        let ip = &task.addrs[NET];
        let accepted = e.accepted(&task.id).unwrap();
        let udp = udp_per_task.get(ip).copied().unwrap_or(0);
        assert_eq!(
            conns[ip],
            accepted + udp,
            "Conns of {ip} vs the {accepted} connections it accepted and {udp} UDP sockets it answered"
        );
        assert!(accepted > 0);
    }
    let listed = pins.ctl(&["list", "--json"]).unwrap();
    assert!(listed.contains("\"api@backend\""), "{listed}");
    assert!(
        listed.contains(&format!("\"mark\": {}", api.local_lb_index)),
        "{listed}"
    );
}

#[test]
fn scale_and_kill_under_a_connect_loop() {
    let s = swarm(2);
    let e = &s.engine;
    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    wait_backends(&pins, &view(e).task_ips, &daemon);
    let mut seen_tasks: BTreeSet<String> = view(e).task_ips.into_iter().collect();

    let mut report = Vec::new();
    for (step, replicas) in [("scale to 5", 5), ("scale to 1", 1), ("scale to 2", 2)] {
        let looping = e.connect_loop(&s.web, "api", 12).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let tasks = e.scale("api", replicas).unwrap();
        let ips: Vec<String> = {
            let mut v: Vec<String> = tasks.iter().map(|t| t.addrs[NET].clone()).collect();
            v.sort();
            v
        };
        seen_tasks.extend(ips.iter().cloned());
        wait_backends(&pins, &ips, &daemon);
        let attempts = looping.finish().unwrap();
        let failed = fails(&attempts).len();
        report.push(format!(
            "{step}: {} connects, {failed} failed",
            attempts.len()
        ));
        assert!(
            attempts.len() > 100,
            "{step}: the loop ran: {}",
            attempts.len()
        );
        // Every connect reached a task that existed.
        reached_only(&attempts, &seen_tasks, step);
        if failed != 0 {
            let events = e
                .docker(&[
                    "events",
                    "--since",
                    "60s",
                    "--until",
                    "0s",
                    "--format",
                    "{{.TimeNano}} {{.Type}} {{.Action}} {{.Actor.ID}}",
                ])
                .unwrap_or_else(|e| e.to_string());
            eprintln!("EVENTS\n{events}\nSVCLBD\n{}", daemon.log_text());
        }
        assert_eq!(
            failed,
            0,
            "{step}: failed connects: {:?}\n{report:?}",
            fails(&attempts)
        );
        // Once svclb has seen it: only the current tasks, all of them.
        let after = e.client(&s.web, "tcp", "api", 10 * replicas).unwrap();
        let (per_task, failed) = tally(&after);
        assert!(failed.is_empty(), "{step}: {failed:?}");
        assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), ips, "{step}");
    }

    // A rolling update (stop-first, one task at a time): every task replaced.
    let old: Vec<String> = e.tasks("api").unwrap().into_iter().map(|t| t.id).collect();
    let looping = e.connect_loop(&s.web, "api", 20).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    e.docker(&["service", "update", "-d", "--force", "api"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ips = loop {
        let tasks = e.tasks("api").unwrap();
        if tasks.len() == 2 && tasks.iter().all(|t| !old.contains(&t.id)) {
            let mut v: Vec<String> = tasks.iter().map(|t| t.addrs[NET].clone()).collect();
            v.sort();
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the rolling update did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    seen_tasks.extend(ips.iter().cloned());
    wait_backends(&pins, &ips, &daemon);
    let attempts = looping.finish().unwrap();
    let failed = fails(&attempts).len();
    report.push(format!(
        "update --force: {} connects, {failed} failed",
        attempts.len()
    ));
    reached_only(&attempts, &seen_tasks, "update");
    assert_eq!(
        failed,
        0,
        "update --force: {:?}\n{report:?}",
        fails(&attempts)
    );

    // docker kill of a task: Swarm replaces it, with a new address.
    let looping = e.connect_loop(&s.web, "api", 12).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let victim = e.tasks("api").unwrap().remove(0);
    e.docker(&["kill", &victim.id]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ips = loop {
        let tasks = e.tasks("api").unwrap();
        if tasks.len() == 2 && tasks.iter().all(|t| t.id != victim.id) {
            let mut v: Vec<String> = tasks.iter().map(|t| t.addrs[NET].clone()).collect();
            v.sort();
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Swarm did not replace the killed task"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    wait_backends(&pins, &ips, &daemon);
    let attempts = looping.finish().unwrap();
    // The killed task's in-flight connects may fail: SIGKILL is abrupt,
    // and no balancer can know before the engine does.
    let failed = fails(&attempts).len();
    report.push(format!(
        "docker kill: {} connects, {failed} failed",
        attempts.len()
    ));
    eprintln!("connect loops: {report:?}");
    // From each engine event to the maps updated, as svclbd measured it.
    let mut took: Vec<f64> = daemon
        .log_text()
        .lines()
        .filter_map(|l| l.split("event_to_maps_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    took.sort_by(f64::total_cmp);
    assert!(took.len() >= 10, "event-to-maps times logged: {took:?}");
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "event to maps: {} changes, median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        took.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    assert!(at(0.5) < 200.0, "median event-to-maps {:.1} ms", at(0.5));
    assert!(failed <= 3, "docker kill: {:?}", fails(&attempts));
    let after = e.client(&s.web, "tcp", "api", 20).unwrap();
    let (per_task, failed) = tally(&after);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), ips);
}

#[test]
fn a_new_task_connects_from_its_first_instruction() {
    let mut s = swarm(2);
    let pins = PinDir::new();
    let daemon = svclbd(&pins, &s.engine);
    wait_backends(&pins, &view(&s.engine).task_ips, &daemon);
    // 20 tasks whose first action is a connect to api's VIP.
    let vip = view(&s.engine).vip;
    s.engine
        .service(
            "probe",
            &[NET],
            &["--replicas", "20", "--restart-condition", "none"],
            &[
                "/bin/sh",
                "-c",
                &format!(
                    "/usr/bin/python3 /srv/client.py tcp {vip} 8080 1 > /tmp/first; exec /bin/sleep 100000"
                ),
            ],
        )
        .unwrap();
    let tasks = s.engine.wait_running("probe", 20).unwrap();
    let mut results = Vec::new();
    for t in &tasks {
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let out = s
                .engine
                .exec(&t.id, &["cat", "/tmp/first"])
                .unwrap_or_default();
            if !out.is_empty() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        results.push(out);
    }
    let ok = results.iter().filter(|r| r.starts_with("ok ")).count();
    assert_eq!(ok, 20, "first connects: {results:?}");
}

#[test]
fn containers_see_only_their_networks_services() {
    let mut s = swarm(2);
    s.engine.network("other", "172.51.0.0/24").unwrap();
    // A service of the other network only.
    s.engine.server_service("db", &["other"], 1).unwrap();
    let pins = PinDir::new();
    let daemon = svclbd(&pins, &s.engine);
    let api = view(&s.engine);
    wait_backends(&pins, &api.task_ips, &daemon);

    let conns = fwm_conns;
    let total = |pins: &PinDir| conns(pins, api.local_lb_index);
    // On another network only: api's VIP means nothing to it.
    let outsider = s.engine.run_container("outsider", Some("other")).unwrap();
    // On no network at all.
    let loner = s.engine.run_container("loner", None).unwrap();
    // On both networks: sees api.
    let both = s.engine.run_container("both", Some(NET)).unwrap();
    s.engine
        .docker(&["network", "connect", "other", &both.id])
        .unwrap();
    // svclb learns of them from the events.
    std::thread::sleep(Duration::from_secs(1));

    let before = total(&pins);
    for c in [&outsider, &loner] {
        let attempts = s.engine.client(&c.id, "tcp", &api.vip, 5).unwrap();
        assert!(
            attempts.iter().all(|a| matches!(a, Attempt::Fail { .. })),
            "{}: reached api: {attempts:?}",
            c.name
        );
    }
    assert_eq!(
        total(&pins),
        before,
        "connects from outside the network were balanced"
    );

    let attempts = s.engine.client(&both.id, "tcp", &api.vip, 10).unwrap();
    let (per_task, failed) = tally(&attempts);
    assert!(failed.is_empty(), "{failed:?}\n{}", daemon.log_text());
    assert_eq!(per_task.len(), 2);
    assert_eq!(total(&pins), before + 10);

    // A container on two networks sees both networks' services: db too.
    let db = s
        .engine
        .service_view("other", "db")
        .unwrap()
        .expect("db in other's view");
    let db_before = conns(&pins, db.local_lb_index);
    let attempts = s.engine.client(&both.id, "tcp", "db", 5).unwrap();
    let (per_task, failed) = tally(&attempts);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), db.task_ips);
    assert_eq!(conns(&pins, db.local_lb_index), db_before + 5);
    // web, on backend only, is not balanced to db's VIP.
    let attempts = s.engine.client(&s.web, "tcp", &db.vip, 3).unwrap();
    assert!(
        attempts.iter().all(|a| matches!(a, Attempt::Fail { .. })),
        "web reached db: {attempts:?}"
    );
    assert_eq!(conns(&pins, db.local_lb_index), db_before + 5);
}

#[test]
fn a_file_service_on_a_swarm_vip_is_refused_by_name() {
    let s = swarm(2);
    let api = view(&s.engine);
    // The file claims api's VIP, and a second service with a free one.
    let config = svclb_tests::daemon::write_temp(
        "svclb.toml",
        &format!(
            "[[service]]\nname = \"mine\"\nvip = \"{}\"\nmark = 4000\nbackends = [\"10.99.0.1\"]\n\n\
             [[service]]\nname = \"other\"\nvip = \"10.98.0.1\"\nmark = 4001\nbackends = [\"10.99.0.2\"]\n",
            api.vip
        ),
    )
    .unwrap();
    let pins = PinDir::new();
    let daemon = Svclbd::start(
        &pins,
        &[
            "--docker",
            "--docker-host",
            &s.engine.host(),
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .unwrap();
    daemon
        .wait_for_log("Docker service refused", Duration::from_secs(10))
        .unwrap();
    let log = daemon.log_text();
    assert!(
        log.contains("api@backend")
            && log.contains(&format!("VIP {} is already the VIP of \"mine\"", api.vip)),
        "{log}"
    );
    let listed = pins.ctl(&["list", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: BTreeSet<String> = json
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    // The file's services and web's are in; api is not.
    assert!(
        names.contains("mine") && names.contains("other") && names.contains("web@backend"),
        "{names:?}"
    );
    assert!(!names.contains("api@backend"), "{names:?}");
    let _ = std::fs::remove_file(config);
}

#[test]
fn svclbd_sigkill_and_restart_lose_no_connect() {
    let s = swarm(2);
    let e = &s.engine;
    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    let api = view(e);
    wait_backends(&pins, &api.task_ips, &daemon);
    let before = pins.ctl(&["list"]).unwrap();

    let looping = e.connect_loop(&s.web, "api", 8).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    daemon.kill().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let daemon = svclbd(&pins, e);
    let attempts = looping.finish().unwrap();
    let (per_task, failed) = tally(&attempts);
    eprintln!(
        "SIGKILL + restart: {} connects, {} failed",
        attempts.len(),
        failed.len()
    );
    assert!(attempts.len() > 100);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per_task.len(), 2);
    wait_backends(&pins, &api.task_ips, &daemon);
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("FWM") || l.contains("->"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        strip(&pins.ctl(&["list"]).unwrap()),
        strip(&before),
        "the same state re-learned"
    );
}

#[test]
fn engine_away_keeps_the_maps_and_a_restart_resyncs() {
    let mut s = swarm(2);
    let pins = PinDir::new();
    let daemon = svclbd(&pins, &s.engine);
    let api = view(&s.engine);
    wait_backends(&pins, &api.task_ips, &daemon);

    s.engine.stop_dockerd().unwrap();
    daemon
        .wait_for_log("lost the Docker engine", Duration::from_secs(20))
        .unwrap();
    // Stopping dockerd stops the tasks too (Swarm has no live-restore); the
    // maps still hold what the engine said last (less tasks it said were
    // stopping), and discovery says it is stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.metric("svclb_docker_stale") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "not flagged stale:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = pins.ctl(&["list", "--json"]).unwrap();
    assert!(
        listed.contains("\"api@backend\""),
        "api forgotten while the engine is away: {listed}"
    );
    assert!(listed.contains(&format!("\"{}\"", api.vip)), "{listed}");

    s.engine.restart_dockerd().unwrap();
    // Swarm restarts the tasks, with new addresses or the same; svclb follows.
    let tasks = s.engine.wait_running("api", 2).unwrap();
    let web = s.engine.wait_running("web", 1).unwrap().remove(0);
    let mut ips: Vec<String> = tasks.iter().map(|t| t.addrs[NET].clone()).collect();
    ips.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s
        .engine
        .service_view(NET, "api")
        .ok()
        .flatten()
        .map(|v| v.task_ips)
        != Some(ips.clone())
    {
        assert!(
            Instant::now() < deadline,
            "the engine's view did not settle"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_backends(&pins, &ips, &daemon);
    assert_eq!(daemon.metric("svclb_docker_stale"), Some(0.0));
    let attempts = s.engine.client(&web.id, "tcp", "api", 20).unwrap();
    let (per_task, failed) = tally(&attempts);
    assert!(failed.is_empty(), "{failed:?}\n{}", daemon.log_text());
    assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), ips);
}

#[test]
fn attach_by_container_against_a_real_docker_engine() {
    // The real engine's answer resolves to the cgroup the task runs in.
    let s = swarm(1);
    let task = s.engine.tasks("api").unwrap().remove(0);
    let runtime = tokio_runtime();
    let docker = svclb::docker::client(Some(&s.engine.host())).unwrap();
    runtime.block_on(svclb::docker::negotiate(&docker)).unwrap();
    let pid = runtime
        .block_on(svclb::docker::container_pid(&docker, &task.id))
        .unwrap();
    let by_container = runtime
        .block_on(svclb::target::Target::Container(task.name.clone()).resolve(Some(&docker)))
        .unwrap();
    let by_pid = svclb::cgroup::CgroupPath::of_pid(pid).unwrap();
    assert_eq!(by_container, by_pid);
    assert!(
        by_container.relative.to_string_lossy().contains(&task.id),
        "{by_container:?}"
    );
}

/// One unlabelled sample of svclbd's /metrics.
fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn two_nodes_web_on_node1_reaches_api_tasks_on_both() {
    use svclb_tests::swarm::TwoNodes;
    let mut t = TwoNodes::start().expect("two swarm nodes on this machine");
    let node1_id = t.node1.node_id().unwrap();
    t.node1.network(NET, svclb_tests::swarm::SUBNET).unwrap();
    // Four api tasks, at most two per node: two on each.
    t.node1
        .server_service_with("api", &[NET], 4, &["--replicas-max-per-node", "2"])
        .unwrap();
    let web = t
        .node1
        .client_service_with(
            "web",
            &[NET],
            &["--constraint", &format!("node.id=={node1_id}")],
        )
        .unwrap();
    // Node 1's view lists every task of the service, on both nodes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let api = loop {
        if let Some(v) = t.node1.service_view(NET, "api").unwrap() {
            if v.task_ips.len() == 4 {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "api never had 4 tasks in node 1's view:\n{}",
            t.node1
                .docker(&["service", "ps", "--no-trunc", "api"])
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        t.node1.tasks("api").unwrap().len(),
        2,
        "two api tasks on node 1"
    );
    assert_eq!(
        t.node2.tasks("api").unwrap().len(),
        2,
        "two api tasks on node 2"
    );

    let pins = PinDir::new();
    let daemon = svclbd(&pins, &t.node1);
    wait_backends(&pins, &api.task_ips, &daemon);
    let attempts = t.node1.client(&web.id, "tcp", "api", 200).unwrap();
    let (per_task, failed) = tally(&attempts);
    eprintln!("two nodes: {per_task:?}, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        per_task.keys().cloned().collect::<Vec<_>>(),
        api.task_ips,
        "web on node 1 reached every api task, on both nodes"
    );
    for (task, n) in &per_task {
        assert!(*n >= 40, "round robin: {task} got {n} of 200");
    }
    let node2_ips: BTreeSet<String> = t
        .node2
        .tasks("api")
        .unwrap()
        .iter()
        .map(|c| c.addrs[NET].clone())
        .collect();
    let on_node2: u64 = per_task
        .iter()
        .filter(|(ip, _)| node2_ips.contains(*ip))
        .map(|(_, n)| n)
        .sum();
    assert!(
        on_node2 >= 80,
        "connects balanced to node 2's tasks: {on_node2}"
    );

    // A worker runs its own svclbd, reading its own engine: a client on
    // node 2 is balanced over the same four tasks.
    let node2_id = t.node2.node_id().unwrap();
    let web2 = t
        .node1
        .service(
            "web2",
            &[NET],
            &[
                "--replicas",
                "1",
                "--constraint",
                &format!("node.id=={node2_id}"),
            ],
            &["/bin/sleep", "100000"],
        )
        .and_then(|()| t.node2.wait_running("web2", 1))
        .unwrap()
        .remove(0);
    let pins2 = PinDir::new();
    let daemon2 = svclbd(&pins2, &t.node2);
    wait_backends(&pins2, &api.task_ips, &daemon2);
    let attempts = t.node2.client(&web2.id, "tcp", "api", 100).unwrap();
    let (per_task, failed) = tally(&attempts);
    eprintln!("worker node: {per_task:?}, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), api.task_ips);
}

#[test]
fn a_service_scaled_to_zero_keeps_its_vip_until_removed() {
    let s = swarm(2);
    let e = &s.engine;
    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    let api = view(e);
    wait_backends(&pins, &api.task_ips, &daemon);

    e.scale("api", 0).unwrap();
    // The engine forgets api on this network...
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.service_view(NET, "api").unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "api stayed in the network's view"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...svclb keeps its VIP with no backend...
    wait_backends(&pins, &[], &daemon);
    let listed = pins.ctl(&["list", "--json"]).unwrap();
    assert!(listed.contains("\"api@backend\""), "{listed}");
    // ...so a connect is refused at once, not left to time out.
    let started = Instant::now();
    let attempts = e.client(&s.web, "tcp", &api.vip, 3).unwrap();
    assert!(
        attempts
            .iter()
            .all(|a| matches!(a, Attempt::Fail { error, .. } if error == "ConnectionRefusedError")),
        "{attempts:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once: {:?}",
        started.elapsed()
    );

    // Back to 2: the new tasks are balanced under the same VIP (the engine
    // may give the service a new LocalLBIndex: svclb follows it).
    let tasks = e.scale("api", 2).unwrap();
    let mut ips: Vec<String> = tasks.iter().map(|t| t.addrs[NET].clone()).collect();
    ips.sort();
    wait_backends(&pins, &ips, &daemon);
    let again = view(e);
    assert_eq!(again.vip, api.vip);
    let listed: serde_json::Value =
        serde_json::from_str(&pins.ctl(&["list", "--json"]).unwrap()).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api@backend")
        .cloned()
        .unwrap();
    assert_eq!(entry["mark"], again.local_lb_index, "{entry}");
    assert_eq!(entry["vip"], api.vip.as_str(), "{entry}");
    let (per_task, failed) = tally(&e.client(&s.web, "tcp", "api", 10).unwrap());
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per_task.keys().cloned().collect::<Vec<_>>(), ips);

    // Removed from the swarm: gone from svclb too.
    e.docker(&["service", "rm", "api"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pins
        .ctl(&["list", "--json"])
        .unwrap()
        .contains("\"api@backend\"")
    {
        assert!(
            Instant::now() < deadline,
            "api@backend outlived the service:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A held connection from `web` through api's VIP: `docker kill` of its
/// task ends it (svclb's SOCK_DESTROY after the kill event), so the
/// client's next write fails instead of vanishing into a task that is
/// gone. Without svclb the socket would sit in CLOSE_WAIT (or
/// ESTABLISHED) and writes would succeed into nothing.
#[test]
fn docker_kill_of_a_task_ends_the_sockets_to_it() {
    use std::io::{BufRead, BufReader, Write};
    let s = swarm(2);
    let e = &s.engine;
    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    wait_backends(&pins, &view(e).task_ips, &daemon);
    const HOLD: &str = r#"
import socket, sys
s = socket.create_connection(("api", 8080), timeout=5)
f = s.makefile("rb")
print(f.readline().decode().split()[1], flush=True)
sys.stdin.readline()
try:
    s.settimeout(2)
    s.sendall(b"x")
    s.sendall(b"y")
    print("OPEN", flush=True)
except OSError as err:
    print("ERR", err.errno, flush=True)
"#;
    let mut held = e
        .command(&["exec", "-i", &s.web, "/usr/bin/python3", "-c", HOLD])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let task_ip = line.trim().to_string();
    let task = e
        .tasks("api")
        .unwrap()
        .into_iter()
        .find(|t| t.addrs.get(NET) == Some(&task_ip))
        .unwrap_or_else(|| panic!("no api task has the address {task_ip:?}"));
    e.docker(&["kill", &task.id]).unwrap();
    daemon
        .wait_for_log(
            &format!("backend={task_ip} sockets=1"),
            Duration::from_secs(20),
        )
        .expect("svclbd ends the held socket after the kill");
    held.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = held.wait();
    println!(
        "held connection to the killed task {task_ip}: {}",
        line.trim()
    );
    assert!(
        line.starts_with("ERR 103") || line.starts_with("ERR 32"),
        "the held connection to the killed task was ended (ECONNABORTED, then EPIPE): {line:?}"
    );
}

/// What root inside a real task container (Docker's default capabilities
/// and seccomp profile: no CAP_BPF, no CAP_SYS_ADMIN) gets when it goes
/// for svclb's maps: bpf() refused, no bpffs to find pins in nor to mount,
/// and svclb's maps and balancing unchanged.
const HOSTILE_PY: &str = r#"
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_bpf = 321
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    r = libc.syscall(SYS_bpf, cmd, buf, 128)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
path = sys.argv[1].encode() + b"\0"
pbuf = ctypes.create_string_buffer(path)
obj_get = ctypes.addressof(pbuf).to_bytes(8, "little") + bytes(120)
print("map_get_next_id", bpf(12, bytes(128)))
print("obj_get", bpf(7, obj_get))
print("map_create", bpf(0, (2).to_bytes(4, "little") + (4).to_bytes(4, "little") * 2 + (1).to_bytes(4, "little") + bytes(112)))
os.makedirs("/tmp/b", exist_ok=True)
r = libc.mount(b"bpf", b"/tmp/b", b"bpf", 0, None)
print("mount", "ok" if r == 0 else errno.errorcode[ctypes.get_errno()])
print("pins_visible", os.path.exists(sys.argv[1]))
"#;

#[test]
fn root_in_a_task_container_can_neither_read_nor_change_the_maps() {
    let s = swarm(2);
    let e = &s.engine;
    let api = view(e);
    let pins = PinDir::new();
    let daemon = svclbd(&pins, e);
    wait_backends(&pins, &api.task_ips, &daemon);
    let before = pins.ctl(&["list"]).unwrap();
    let pin = pins.path().join("svclb_vips");
    let out = e
        .exec(
            &s.web,
            &["/usr/bin/python3", "-c", HOSTILE_PY, pin.to_str().unwrap()],
        )
        .unwrap();
    let got: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(got.get("map_get_next_id"), Some(&"EPERM"), "{out}");
    assert_eq!(got.get("map_create"), Some(&"EPERM"), "{out}");
    assert_ne!(got.get("obj_get"), Some(&"ok"), "{out}");
    assert_eq!(got.get("mount"), Some(&"EPERM"), "{out}");
    assert_eq!(got.get("pins_visible"), Some(&"False"), "{out}");
    assert_eq!(
        pins.ctl(&["list"]).unwrap(),
        before,
        "the maps are unchanged"
    );
    let attempts = e.client(&s.web, "tcp", "api", 10).unwrap();
    let (_, failed) = tally(&attempts);
    assert!(failed.is_empty(), "still balanced: {failed:?}");
}

// Strict scoping (svclbd --runtime-socket, svclb-runc as the engine's
// default runtime): each container's networks are written before its first
// instruction. The probes' first action is busybox's nc, a millisecond
// after their program starts: a Python client would leave svclbd's event
// path the 20 ms it takes to start, and these tests could then not tell
// strict scoping from the union the parent cgroup gets without it.

/// The probes' program: connect to `addr`:8080 first, keep what came of it
/// (nc's output and exit status) in /tmp/first, then sleep.
fn first_connect(addr: &str) -> Vec<String> {
    vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!(
            "/bin/nc -w 2 {addr} 8080 </dev/null >/tmp/first 2>&1; echo \"exit $?\" >>/tmp/first; exec /bin/sleep 100000"
        ),
    ]
}

/// Every container's first connect to api's VIP failed (a VIP that means
/// nothing to it): `who` names the containers in the message.
fn assert_every_first_connect_failed(engine: &Engine, ids: &[String], who: &str) {
    let results = first_results(engine, ids);
    for r in &results {
        assert!(
            r.contains("exit ") && !r.contains("exit 0"),
            "{who} connected to api's VIP: {results:?}"
        );
    }
}

/// Each container's /tmp/first, once written.
fn first_results(engine: &Engine, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = engine.exec(id, &["cat", "/tmp/first"]).unwrap_or_default();
                if out.contains("exit ") || Instant::now() > deadline {
                    break out;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .collect()
}

/// An engine running containers with svclb-runc, `api` (2 tasks) and
/// `web` on [`NET`], and svclbd --docker --runtime-socket. api and web
/// started before svclbd listened: svclb-runc let them start (fail open)
/// and svclbd scoped them at its first resync.
fn strict_swarm(pins: &PinDir) -> (Swarm, Svclbd) {
    let s = swarm_on(
        Engine::start_strict().expect("a private Docker engine running svclb-runc"),
        2,
    );
    let socket = s.engine.runtime_socket();
    let daemon = Svclbd::start(
        pins,
        &[
            "--docker",
            "--docker-host",
            &s.engine.host(),
            "--runtime-socket",
            &socket.to_string_lossy(),
        ],
    )
    .expect("svclbd --docker --runtime-socket starts");
    wait_backends(pins, &view(&s.engine).task_ips, &daemon);
    // web started unannounced (fail open): svclbd's resync scoped it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempts = s.engine.client(&s.web, "tcp", "api", 2).unwrap();
        if fails(&attempts).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web, started before svclbd, is not balanced: {attempts:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (s, daemon)
}

/// How long svclbd held each announced container's start (its log's held_ms).
fn held_ms(daemon: &Svclbd) -> Vec<f64> {
    let mut out: Vec<f64> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("scoped before its first instruction"))
        .filter_map(|l| {
            l.split("held_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// Checks that svclbd answered at least `n` announcements and prints how
/// long it held those starts.
fn report_held(daemon: &Svclbd, n: usize) {
    let held = held_ms(daemon);
    assert!(held.len() >= n, "announcements answered: {held:?}");
    eprintln!(
        "svclbd held {} container starts: median {} ms, max {} ms",
        held.len(),
        held[held.len() / 2],
        held[held.len() - 1]
    );
}

/// api's Conns and the connections its tasks accepted.
fn api_reached(s: &Swarm, pins: &PinDir, api: &ServiceView) -> (u64, u64) {
    let accepted = s
        .engine
        .tasks("api")
        .unwrap()
        .iter()
        .map(|t| s.engine.accepted(&t.id).unwrap())
        .sum();
    (fwm_conns(pins, api.local_lb_index), accepted)
}

#[test]
fn strict_a_new_task_connects_from_its_first_instruction() {
    let pins = PinDir::new();
    let (mut s, daemon) = strict_swarm(&pins);
    let api = view(&s.engine);
    let cmd = first_connect(&api.vip);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    s.engine
        .service(
            "probe",
            &[NET],
            &["--replicas", "20", "--restart-condition", "none"],
            &cmd,
        )
        .unwrap();
    let tasks = s.engine.wait_running("probe", 20).unwrap();
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let results = first_results(&s.engine, &ids);
    let reached_api = |r: &String| {
        r.contains("exit 0")
            && r.lines().any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| api.task_ips.iter().any(|t| t == a))
            })
    };
    let ok = results.iter().filter(|r| reached_api(r)).count();
    assert_eq!(ok, 20, "first connects: {results:?}\n{}", daemon.log_text());
    report_held(&daemon, 20);
}

#[test]
fn strict_a_new_container_on_another_network_is_not_balanced_to_its_services() {
    let pins = PinDir::new();
    let (mut s, daemon) = strict_swarm(&pins);
    s.engine.network("other", "172.51.0.0/24").unwrap();
    let api = view(&s.engine);
    let before = api_reached(&s, &pins, &api);
    // 20 tasks on the other network whose first action is a connect to
    // api's VIP by address (Docker's DNS would not give it to them).
    let cmd = first_connect(&api.vip);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    s.engine
        .service(
            "outsider",
            &["other"],
            &["--replicas", "20", "--restart-condition", "none"],
            &cmd,
        )
        .unwrap();
    let tasks = s.engine.wait_running("outsider", 20).unwrap();
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    assert_every_first_connect_failed(&s.engine, &ids, "a container on another network");
    // Not balanced: no connect was scheduled to an api task (Conns counts
    // at the connect, even one that then fails), and none was accepted.
    assert_eq!(
        api_reached(&s, &pins, &api),
        before,
        "api's (Conns, accepted) moved: containers on another network were balanced to it\n{}",
        daemon.log_text()
    );
    // They were announced, and scoped to their own network.
    let log = daemon.log_text();
    for t in &tasks {
        assert!(
            log.lines().any(|l| l.contains(&t.id[..12])
                && l.contains("scoped before its first instruction")
                && l.contains("[\"other\"]")),
            "{} not scoped at create:\n{log}",
            t.id
        );
    }
    report_held(&daemon, 20);
}

#[test]
fn strict_a_container_on_no_swarm_network_is_not_translated() {
    let pins = PinDir::new();
    let (mut s, daemon) = strict_swarm(&pins);
    let api = view(&s.engine);
    let before = api_reached(&s, &pins, &api);
    let cmd = first_connect(&api.vip);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut ids = Vec::new();
    for i in 0..20 {
        let c = s
            .engine
            .run_container_with(&format!("loner{i}"), None, &cmd)
            .unwrap();
        ids.push(c.id);
    }
    assert_every_first_connect_failed(&s.engine, &ids, "a container on no network");
    assert_eq!(
        api_reached(&s, &pins, &api),
        before,
        "api's (Conns, accepted) moved: a container on no swarm network was translated\n{}",
        daemon.log_text()
    );
    report_held(&daemon, 20);
}
