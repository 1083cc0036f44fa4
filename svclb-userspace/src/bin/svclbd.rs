//! svclbd: loads svclb's programs, pins them, attaches them to cgroups and
//! keeps the maps equal to the desired state: the config file (reloaded on
//! SIGHUP and when it changes) merged with DNS discovery.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use svclb::{
    cgroup::CgroupPath,
    dataplane::Dataplane,
    health,
    loader::{self, Capacities, PacketCounters},
    model::{Config, DesiredState},
    notify,
    pins::PinDir,
    reconcile,
    runtime::{self, Answer, Created, RuntimeSocket},
    sync::{
        self,
        dns::{Discovery, Refresh},
        docker::{DockerSync, StartScope, Wake},
        file::{ConfigFile, FileWatch},
    },
    target,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "svclb daemon: socket-level load balancing for Docker Swarm services, in eBPF"
)]
struct Args {
    /// Services to apply (TOML); re-read on SIGHUP and when it changes.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Do not watch the config file (reload on SIGHUP only).
    #[arg(long)]
    no_watch: bool,
    /// cgroup v2 directory to attach to (absolute, or relative to the cgroup2 mount); repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<PathBuf>,
    /// Attach to the cgroup of this process; repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Attach to the cgroup of this Docker container (ID or name); repeatable.
    #[arg(long = "container", value_name = "ID")]
    containers: Vec<String>,
    /// The Docker engine, for --container and --docker: unix://PATH.
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    docker_host: Option<String>,
    /// Follow the Docker engine: every swarm service with a VIP on a
    /// network this node is on becomes an svclb service (`<service>@<network>`,
    /// mark = Swarm's LocalLBIndex), and every container is covered and
    /// scoped to its swarm networks. Composes with --config (optional then).
    #[arg(long)]
    docker: bool,
    /// With --docker: the cgroup Docker puts containers under (relative to
    /// the cgroup2 mount, e.g. /docker); found from the engine by default.
    #[arg(long, value_name = "PATH", requires = "docker")]
    docker_cgroup_parent: Option<PathBuf>,
    /// With --docker: read the engine's view this often, events or not. The
    /// engine takes a task out of its VIP 2 s before it stops it and
    /// announces nothing then, so this stays well under 2 s.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    docker_poll: std::time::Duration,
    /// With --docker: strict scoping. Listen here for svclb-runc (Docker's
    /// default runtime, see the README), which announces every container
    /// before it starts; svclbd writes its networks then, and a container
    /// svclbd has not scoped sees no swarm service (instead of all of the
    /// node's until its start event is handled).
    #[arg(long, value_name = "PATH", requires = "docker", num_args = 0..=1, default_missing_value = runtime::DEFAULT_SOCKET)]
    runtime_socket: Option<PathBuf>,
    /// A network the attached cgroups' processes are on (repeatable): they
    /// see the services limited to it.
    #[arg(long = "network", value_name = "NAME")]
    networks: Vec<String>,
    /// Where maps and links are pinned (on bpffs).
    #[arg(long, default_value = svclb::DEFAULT_PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    /// Capacity of the service maps, when they are created.
    #[arg(long, default_value_t = svclb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backend and stats maps, when they are created.
    #[arg(long, default_value_t = svclb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the schedule slot map, when it is created; 0: the larger
    /// of 4 x --max-backends and 1,048,576 (each mh service needs 2 x 16,381
    /// while it changes). Costs 16 bytes per slot up front.
    #[arg(long, default_value_t = 0)]
    max_slots: u32,
    /// Prometheus endpoint (`/metrics`); loopback by default.
    #[arg(long, default_value = svclb::metrics::DEFAULT_METRICS_ADDR, value_name = "ADDR:PORT")]
    metrics_addr: std::net::SocketAddr,
    /// Serve no metrics.
    #[arg(long)]
    no_metrics: bool,
    /// Do not attach the cgroup_skb packet counters (InPkts/OutPkts/InBytes/
    /// OutBytes stay as they are); for measuring what counting costs.
    #[arg(long)]
    no_packet_counters: bool,
    /// Attach programs that do nothing in the counters' place: measures
    /// what the kernel's cgroup_skb hook costs by itself (nothing is counted).
    #[arg(long, hide = true, conflicts_with = "no_packet_counters")]
    packet_counters_hook_only: bool,
    /// Take over from the svclbd running on this pin directory: ask it to
    /// stop (SIGTERM) and start once it has (an upgrade). Without it, a
    /// second svclbd on the same pins is refused, naming the first.
    #[arg(long)]
    replace: bool,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "SVCLB_LOG", default_value = "info")]
    log: String,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any thread exists: capabilities are per thread.
    let low_port = (!args.no_metrics && args.metrics_addr.port() < 1024)
        .then_some(caps::Capability::CAP_NET_BIND_SERVICE);
    match svclb::privileges::restrict_to_needed(low_port.as_slice()) {
        Ok(kept) => {
            let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
            names.sort();
            tracing::debug!(capabilities = %names.join(","), "running with no other capability");
        }
        Err(e) => {
            error!("{e:#}");
            eprintln!("svclbd: {e:#}");
            std::process::exit(1);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        error!("{e:#}");
        eprintln!("svclbd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // Handled from the start: a SIGTERM during startup ends svclbd cleanly
    // once it is ready, instead of killing it half-way.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    // Where start-up time goes, for `--log warn,svclbd::startup=debug`.
    let started = std::time::Instant::now();
    let phase = |what: &str| {
        tracing::debug!(
            target: "svclbd::startup",
            at_ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            "start-up: {what}"
        )
    };
    // The config is read and validated on a thread while the kernel
    // creates the maps (each takes hundreds of ms at 100,000 services).
    // Nothing changes before it is known valid: the maps created meanwhile
    // are not pinned, and no running svclbd is asked to stop (--replace).
    let reading = args.config.as_ref().map(|path| {
        let mut file = ConfigFile::new(path);
        std::thread::spawn(move || {
            let config = file.load();
            (file, config)
        })
    });
    let pins = PinDir::new(&args.pin_dir);
    let pin_dir_existed = pins.root().exists();
    let kernel = (|| {
        svclb::probe::require(svclb::probe::FEATURES)?;
        loader::load_maps(
            &pins,
            Capacities {
                max_services: args.max_services,
                max_backends: args.max_backends,
                max_slots: args.max_slots,
            },
        )
    })();
    phase("maps created or adopted");
    let read = match reading {
        Some(thread) => {
            let (file, config) = thread
                .join()
                .map_err(|_| anyhow::anyhow!("reading the config: the thread panicked"))?;
            // Copied into this thread's heap: the reading thread's heap,
            // the parse's garbage with the services kept in between, is then
            // all free and returned to the kernel after start-up (kept, it
            // pinned about 1 KiB per service).
            config.map(|config| (Some(file), config.clone()))
        }
        None => Ok((None, Config::default())),
    };
    let validated = match read {
        Ok((file, config)) => {
            let targets = target::targets(&args.cgroups, &args.pids, &args.containers);
            target::resolve_all(&targets, args.docker_host.as_deref())
                .await
                .map(|cgroups| (file, config, cgroups))
        }
        Err(e) => Err(e.into()),
    };
    let (mut file, mut config, cgroups, mut maps) = match (validated, kernel) {
        (Ok((file, config, cgroups)), Ok(maps)) => (file, config, cgroups, maps),
        (validated, kernel) => {
            // The config's error first, as if it had been read first.
            let error = validated.err().or(kernel.err()).expect("one failed");
            if !pin_dir_existed {
                pins.remove_if_empty();
            }
            return Err(error);
        }
    };
    // Watching from now on, so no change made during startup is missed.
    let mut watch = match (&file, args.no_watch) {
        (Some(f), false) => Some(FileWatch::new(f.path())?),
        _ => None,
    };
    phase("config read and validated");
    let _lock = pins.lock_for_daemon(args.replace)?;
    let gauges_created_at = maps.gauges_created_at();
    maps.pin_created()?;
    // The kernel verifies the programs (about 150 ms, whatever the service
    // count) while the services are planned and written: the maps are the
    // programs' and exist already; nothing is attached before both are done.
    let verifying = maps.verify_in_background();
    let mut dp = Dataplane::open(&pins)?;
    dp.keep_snapshots();
    if let Some(serial) = gauges_created_at {
        dp.gauges_created_at(serial);
    }
    // Discovered services start from what the maps hold, so a restart
    // while DNS is away changes nothing. The apply below plans from this
    // same read (kept), not from a second one.
    let serial = dp.apply_serial()?;
    let snapshot = dp.snapshot()?;
    phase("maps read");
    let (_, mut discovery) = sync::desired_now(&config, &snapshot).await?;
    // The engine's view, starting from the Docker services the maps hold:
    // an engine that is away at startup removes nothing.
    let mut docker = match args.docker {
        true => {
            let mut d = DockerSync::new(args.docker_host.as_deref(), &snapshot)?;
            if let Err(e) = d.resync().await {
                warn!("the Docker engine cannot be read now, starting from the maps: {e:#}");
            }
            Some(d)
        }
        false => None,
    };
    let desired = sync::compose(&config, docker.as_mut(), &mut discovery);
    dp.keep_snapshot_read_at(serial, snapshot);
    let committed = sync::commit(&mut dp, &desired, |_| {})?;
    report(&committed, "startup");
    phase("services applied");
    let mut loaded = verifying
        .join()
        .map_err(|_| anyhow::anyhow!("loading the programs: the thread panicked"))??;
    phase("programs verified");
    loaded.spawn_log_forwarder()?;
    if args.no_packet_counters {
        loaded.set_packet_counters(PacketCounters::Off);
        warn!("--no-packet-counters: packets and bytes are not counted");
    } else if args.packet_counters_hook_only {
        loaded.set_packet_counters(PacketCounters::HookOnly);
        warn!("--packet-counters-hook-only: no-op programs on the counting hooks, packets and bytes are not counted");
    }
    // What the health check watches: every cgroup attached, by path.
    let mut attached: Vec<health::Attached> = Vec::new();
    let mut docker_parent: Option<CgroupPath> = None;
    // What a container sees before svclbd has written its own networks.
    let start_scope = match args.runtime_socket {
        Some(_) => StartScope::Strict,
        None => StartScope::Union,
    };
    if let Some(d) = &mut docker {
        d.applied();
        // Where Docker puts containers: attached there, every container is
        // covered from its first instruction, without racing its start.
        let parent = d
            .containers_cgroup(args.docker_cgroup_parent.as_deref())
            .await
            .context(
                "finding where Docker puts containers' cgroups (--docker-cgroup-parent sets it)",
            )?;
        d.set_parent(&parent, start_scope)?;
        d.write_scopes(&mut dp)?;
        loaded.attach(&parent)?;
        info!(cgroup = %parent.absolute.display(), "attached for Docker's containers");
        attached.push(health::Attached::new(parent.clone())?);
        docker_parent = Some(parent);
    }
    for cg in &cgroups {
        dp.set_cgroup_networks(cg.id()?, &args.networks)?;
        loaded.attach(cg)?;
        info!(cgroup = %cg.absolute.display(), "attached");
        attached.push(health::Attached::new(cg.clone())?);
    }
    if !args.no_metrics {
        let listener = svclb::metrics::bind(args.metrics_addr).await?;
        let dns_metrics = svclb::metrics::discovery_metrics(discovery.status_handle());
        let docker_status = docker.as_ref().map(DockerSync::status);
        let extra: svclb::metrics::ExtraMetrics = std::sync::Arc::new(move || {
            let mut text = dns_metrics();
            if let Some(s) = &docker_status {
                text.push_str(&s.metrics_text());
            }
            text.push_str(&svclb::terminate::ENDED.render());
            text.push_str(&health::render());
            text.push_str(&sync::render_applied());
            text
        });
        tokio::spawn(svclb::metrics::serve(listener, pins.clone(), Some(extra)));
    }
    // IPVS's estimator samples every 2 s, on a thread of its own.
    svclb::rates::RateSampler::new(pins.clone()).spawn();
    phase("attached");
    info!(
        pin_dir = %pins.root().display(),
        services = desired.services.len(),
        discovered = config.discovered.len(),
        "ready"
    );
    notify::notify("READY=1").context("notifying readiness")?;
    // The start-up plan's heap (hundreds of MB at 100,000 new services) is
    // freed and trimmed once ready: it takes a large part of a second.
    released(committed);

    // Strict scoping: svclb-runc's announcements, answered in the loop below.
    let (runtime_tx, runtime_rx) = tokio::sync::mpsc::channel::<Created>(64);
    let mut announced = Announcements {
        rx: runtime_rx,
        deferred: Default::default(),
        scoped: Vec::new(),
    };
    let _runtime_socket = match &args.runtime_socket {
        Some(path) => {
            let (socket, listener) = RuntimeSocket::bind(path)?;
            runtime::serve(listener, runtime_tx);
            info!(socket = %path.display(), "strict scoping: svclb-runc's announcements are taken here");
            Some(socket)
        }
        None => None,
    };
    let (docker_tx, mut docker_rx) = tokio::sync::mpsc::channel::<Wake>(1);
    if let Some(d) = &docker {
        sync::docker::follow_events(d.client(), d.status(), docker_tx);
    } else {
        drop(docker_tx);
    }
    let mut health_check = tokio::time::interval(health::CHECK_EVERY);
    health_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut periodic = tokio::time::interval(args.docker_poll.max(sync::docker::MIN_POLL));
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    periodic.tick().await;
    // The full resync an event asked for, and the event's name.
    let mut full_due: Option<tokio::time::Instant> = None;
    let mut full_why = String::new();

    loop {
        let due = discovery.next_due();
        tokio::select! {
            Some(wake) = docker_rx.recv(), if docker.is_some() => {
                // With what is already queued: a task start is a burst
                // (create, network connect, start).
                let mut wakes = vec![wake];
                while let Ok(more) = docker_rx.try_recv() {
                    wakes.push(more);
                }
                let mut containers = Vec::new();
                for wake in wakes {
                    if let Some(d) = &mut docker {
                        d.note(&wake);
                    }
                    match wake {
                        Wake::Event { what, stopping, started, .. } => {
                            containers.extend(started.map(|id| (id, true)));
                            containers.extend(stopping.map(|id| (id, false)));
                            if full_due.is_none() {
                                full_due = Some(tokio::time::Instant::now() + sync::docker::FULL_RESYNC_AFTER);
                                full_why = what;
                            }
                        }
                        Wake::Connected => {
                            if let Some(d) = &mut docker {
                                d.reconnected();
                            }
                            full_due = Some(tokio::time::Instant::now());
                            full_why = "Docker engine connected".to_owned();
                        }
                        Wake::Lost(why) => {
                            warn!("lost the Docker engine's events ({why}): the maps keep the last good view; reconnecting");
                        }
                    }
                }
                // The incremental path: what a container's start or stop
                // says alone goes to the maps now; the full resync follows.
                if !containers.is_empty() {
                    docker_containers(&mut dp, &config, &mut docker, &mut discovery, &mut announced, &containers, &full_why).await;
                }
            },
            Some(created) = announced.next() => {
                runtime_created(&mut dp, &config, &mut docker, &mut discovery, &mut announced, created).await;
            },
            _ = sleep_until(full_due), if docker.is_some() => {
                full_due = None;
                docker_resync(&mut dp, &config, &mut docker, &mut discovery, &mut announced, &full_why).await;
            },
            _ = periodic.tick(), if docker.is_some() => {
                docker_resync(&mut dp, &config, &mut docker, &mut discovery, &mut announced, "Docker poll").await;
            },
            _ = health_check.tick() => {
                for (cg, id) in health::check(&pins, &mut loaded, &mut attached) {
                    let scoped = match (&mut docker, &docker_parent) {
                        (Some(d), Some(parent)) if *parent == cg => {
                            d.set_parent(&cg, start_scope).and_then(|()| d.write_scopes(&mut dp))
                        }
                        _ => dp.set_cgroup_networks(id, &args.networks),
                    };
                    if let Err(e) = scoped {
                        error!(cgroup = %cg.absolute.display(), "writing its networks again: {e:#}");
                    }
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => match &mut file {
                Some(f) => {
                    let loaded = f.load();
                    reload(&mut dp, &mut config, &mut docker, &mut discovery, loaded, "SIGHUP").await;
                }
                None => warn!("SIGHUP: no --config to reload"),
            },
            _ = changed(&mut watch) => {
                if let Some(loaded) = file.as_mut().and_then(ConfigFile::load_if_changed) {
                    reload(&mut dp, &mut config, &mut docker, &mut discovery, loaded, "file changed").await;
                }
            },
            _ = sleep_until(due) => {
                if discovery.refresh(Refresh::Due).await {
                    let desired = sync::compose(&config, docker.as_mut(), &mut discovery);
                    if let Err(e) = apply(&mut dp, &desired, "dns") {
                        error!("applying DNS answers failed, the maps keep the previous state: {e:#}");
                    }
                }
            },
        }
    }
    // The pinned links and maps stay: balancing goes on while svclbd is down.
    info!(
        "exiting; the data plane stays pinned at {}",
        pins.root().display()
    );
    Ok(())
}

/// Takes a newly read config: all of it, or (when it does not validate,
/// or cannot be applied) none of it.
async fn reload(
    dp: &mut Dataplane,
    config: &mut Config,
    docker: &mut Option<DockerSync>,
    discovery: &mut Discovery,
    loaded: Result<Config, svclb::config::ConfigError>,
    why: &str,
) {
    let new = match loaded {
        Ok(new) => new,
        Err(e) => {
            error!("{why}: reload refused, nothing changed: {e}");
            sync::failed();
            return;
        }
    };
    if let Err(e) = discovery.reconfigure(&new.discovered, &new.dns) {
        error!("{why}: reload refused, nothing changed: {e:#}");
        sync::failed();
        return;
    }
    // New names are due now; resolve them before applying.
    discovery.refresh(Refresh::Due).await;
    let desired = sync::compose(&new, docker.as_mut(), discovery);
    match apply(dp, &desired, why) {
        Ok(()) => *config = new,
        Err(e) => {
            error!("{why}: reload failed, the maps keep the previous state: {e:#}");
            // Keep following DNS for the config that is still applied.
            if let Err(e) = discovery.reconfigure(&config.discovered, &config.dns) {
                error!("restoring the previous DNS settings: {e:#}");
            }
        }
    }
}

/// Reads the engine's view and applies it; on failure the maps keep the
/// last good state.
async fn docker_resync(
    dp: &mut Dataplane,
    config: &Config,
    docker: &mut Option<DockerSync>,
    discovery: &mut Discovery,
    announced: &mut Announcements,
    why: &str,
) {
    let Some(d) = docker.as_mut() else { return };
    let subnets = d.subnets();
    let read = answering(dp, announced, &subnets, d.resync()).await;
    announced.record(d);
    match read {
        Ok(true) => apply_docker(dp, config, docker, discovery, why),
        Ok(false) => tracing::debug!("{why}: Docker's services unchanged"),
        // Logged (once) as stale by resync.
        Err(_) => return,
    }
    write_docker_scopes(dp, docker, why);
}

/// The incremental path for containers that started (`true`) or are being
/// stopped: each is read alone and its services changed at once.
async fn docker_containers(
    dp: &mut Dataplane,
    config: &Config,
    docker: &mut Option<DockerSync>,
    discovery: &mut Discovery,
    announced: &mut Announcements,
    containers: &[(String, bool)],
    why: &str,
) {
    let Some(d) = docker.as_mut() else { return };
    let mut changed = Vec::new();
    for (id, started) in containers {
        let subnets = d.subnets();
        let read = answering(dp, announced, &subnets, d.container_event(id, *started)).await;
        announced.record(d);
        match read {
            Ok(names) => changed.extend(names),
            Err(e) => tracing::debug!(container = %id, "{why}: left to the full resync: {e:#}"),
        }
    }
    if !changed.is_empty() {
        // Backends alone changed: only these services are planned and
        // written, with no copy of the whole desired state.
        let quick = d
            .accepted(&changed)
            .map(|specs| sync::commit_backends(dp, &specs, |plan| d.spare_draining(plan)));
        match quick {
            Some(Ok(Some(committed))) => {
                report(&committed, why);
                docker_applied(docker, why);
            }
            Some(Err(e)) => {
                error!(
                    "{why}: applying Docker's view failed, the maps keep the previous state: {e:#}"
                )
            }
            _ => apply_docker(dp, config, docker, discovery, why),
        }
    }
    write_docker_scopes(dp, docker, why);
}

/// svclb-runc's announcements, waiting for svclbd's loop.
struct Announcements {
    rx: tokio::sync::mpsc::Receiver<Created>,
    /// Announcements on a network new to this node, left for after the
    /// read of the engine that was going on.
    deferred: std::collections::VecDeque<Created>,
    /// Containers scoped while the Docker source was reading the engine,
    /// for it to record once done.
    scoped: Vec<(String, u64, Vec<String>)>,
}

impl Announcements {
    async fn next(&mut self) -> Option<Created> {
        match self.deferred.pop_front() {
            Some(c) => Some(c),
            None => self.rx.recv().await,
        }
    }

    /// Hands the containers scoped meanwhile to the Docker source.
    fn record(&mut self, d: &mut DockerSync) {
        for (id, cgroup_id, networks) in self.scoped.drain(..) {
            d.created(&id, cgroup_id, networks);
        }
    }
}

/// Awaits `read` (a read of the engine, which takes a while under load or
/// with many services) while answering svclb-runc from `subnets`, so a
/// container's start waits for its scope to be written, not for the read.
async fn answering<T>(
    dp: &mut Dataplane,
    announced: &mut Announcements,
    subnets: &sync::docker::Subnets,
    read: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(read);
    loop {
        tokio::select! {
            out = &mut read => return out,
            Some(created) = announced.rx.recv() => {
                let (networks, unknown) = subnets.networks_at(&created.init.addresses);
                if !unknown.is_empty() {
                    announced.deferred.push_back(created);
                    continue;
                }
                let answer = scope_created(dp, &created, networks.clone());
                if matches!(answer, Answer::Scoped(_)) {
                    announced.scoped.push((created.container.clone(), created.init.cgroup_id, networks));
                }
                let _ = created.reply.send(answer);
            },
        }
    }
}

/// Writes an announced container's networks; the answer for svclb-runc.
fn scope_created(dp: &mut Dataplane, created: &Created, networks: Vec<String>) -> Answer {
    match DockerSync::write_created(dp, created.init.cgroup_id, &networks) {
        Ok(()) => Answer::Scoped(networks),
        Err(e) => Answer::Error(format!("writing its networks: {e:#}")),
    }
}

/// A container svclb-runc announced: its networks, from its addresses, are
/// written before it starts.
async fn runtime_created(
    dp: &mut Dataplane,
    config: &Config,
    docker: &mut Option<DockerSync>,
    discovery: &mut Discovery,
    announced: &mut Announcements,
    created: Created,
) {
    let Some(d) = docker.as_mut() else { return };
    let (mut networks, unknown) = d.subnets().networks_at(&created.init.addresses);
    if !unknown.is_empty() && !d.read_since(created.received) {
        // A network new to this node (its first task here): the resync
        // brings its subnet and its services.
        tracing::debug!(container = %created.container, ?unknown, "addresses on no known network: resyncing first");
        docker_resync(
            dp,
            config,
            docker,
            discovery,
            announced,
            "a container on a network new to this node",
        )
        .await;
        if let Some(d) = docker.as_ref() {
            networks = d.subnets().networks_at(&created.init.addresses).0;
        }
    }
    let Some(d) = docker.as_mut() else { return };
    let answer = scope_created(dp, &created, networks.clone());
    if matches!(answer, Answer::Scoped(_)) {
        d.created(&created.container, created.init.cgroup_id, networks);
    }
    let _ = created.reply.send(answer);
}

/// Applies Docker's services as the last read left them.
fn apply_docker(
    dp: &mut Dataplane,
    config: &Config,
    docker: &mut Option<DockerSync>,
    discovery: &mut Discovery,
    why: &str,
) {
    let desired = sync::compose(config, docker.as_mut(), discovery);
    let spare = |plan: &mut reconcile::Plan| {
        if let Some(d) = docker.as_ref() {
            d.spare_draining(plan);
        }
    };
    match sync::commit(dp, &desired, spare) {
        Ok(committed) => {
            report(&committed, why);
            released(committed);
            docker_applied(docker, why);
        }
        Err(e) => {
            error!("{why}: applying Docker's view failed, the maps keep the previous state: {e:#}")
        }
    }
}

/// Docker's services are in the maps: logs how long after the event.
fn docker_applied(docker: &mut Option<DockerSync>, why: &str) {
    if let Some(took) = docker.as_mut().and_then(DockerSync::applied) {
        info!(
            event_to_maps_ms = (took.as_secs_f64() * 1e4).round() / 10.0,
            "{why}: Docker's view applied"
        );
    }
}

fn write_docker_scopes(dp: &mut Dataplane, docker: &mut Option<DockerSync>, why: &str) {
    if let Some(d) = docker.as_mut() {
        if let Err(e) = d.write_scopes(dp) {
            error!("{why}: writing containers' networks failed: {e:#}");
        }
    }
}

async fn changed(watch: &mut Option<FileWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn apply(dp: &mut Dataplane, desired: &DesiredState, why: &str) -> Result<()> {
    let committed = sync::commit(dp, desired, |_| {})?;
    report(&committed, why);
    released(committed);
    Ok(())
}

/// Drops an apply's plan and, if it changed anything, hands the heap it
/// freed back to the system: a plan of 100,000 services allocates hundreds
/// of MB for a moment, which glibc would otherwise keep, and svclbd's RSS
/// would say so for as long as it runs.
fn released(committed: sync::Committed) {
    let changed = !committed.plan.changes.is_empty();
    drop(committed);
    #[cfg(target_env = "gnu")]
    if changed {
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Logs a committed change (the sockets it ended are logged by terminate).
/// Up to this many changes in one apply are logged one per line at info;
/// past it (a start-up over 100,000 services: 300,000 lines, most of a
/// second of formatting) one line counts them and each is logged at debug.
const CHANGES_LOGGED_EACH: usize = 100;

fn report(committed: &sync::Committed, why: &str) {
    let changes = &committed.plan.changes;
    if changes.len() <= CHANGES_LOGGED_EACH {
        for change in changes {
            info!(%change, "{why}");
        }
    } else {
        let mut counts = [0usize; 6];
        for change in changes {
            counts[match change {
                reconcile::Change::AddService { .. } => 0,
                reconcile::Change::EditService { .. } => 1,
                reconcile::Change::RemoveService { .. } => 2,
                reconcile::Change::AddBackend { .. } => 3,
                reconcile::Change::EditBackend { .. } => 4,
                reconcile::Change::RemoveBackend { .. } => 5,
            }] += 1;
        }
        let [services_added, services_edited, services_removed, backends_added, backends_edited, backends_removed] =
            counts;
        info!(
            services_added,
            services_edited,
            services_removed,
            backends_added,
            backends_edited,
            backends_removed,
            "{why}: {} changes (each at debug)",
            changes.len()
        );
        for change in changes {
            tracing::debug!(%change, "{why}");
        }
    }
    for (name, mark) in &committed.plan.marks {
        tracing::debug!(service = %name, mark, "mark assigned");
    }
}
