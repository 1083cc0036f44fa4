//! The soak: many connects through a VIP from several client threads, plus
//! UDP, while svclbd changes the backend set every 100 ms. It checks that
//! no connect fails, none reaches a backend that had left the set, the
//! counters equal the work done, and svclbd's memory and file descriptors
//! stay flat.
//!
//! `cargo xtask test` runs a short one; `cargo xtask soak` runs it with
//! SVCLB_SOAK_CONNECTS=1000000 and writes its figures to docs/SOAK.md
//! (SVCLB_SOAK_REPORT).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use svclb_tests::{daemon::write_temp, PinDir, Sandbox, Svclbd, TcpIdServer, UdpIdServer};

/// Backends whose weight goes between 1 and 0 (drained): they stay listed,
/// so their counters are checked exactly.
const WEIGHTED: [&str; 4] = ["172.50.0.40", "172.50.0.41", "172.50.0.42", "172.50.0.43"];
/// Backends removed and added again: their counters start again with each
/// stay, so they are checked for where connects went, not counted.
const CHURNED: [&str; 2] = ["172.50.0.44", "172.50.0.45"];
const CHANGE_EVERY: Duration = Duration::from_millis(100);
const TCP_THREADS: usize = 4;
/// One UDP socket per this many TCP connects.
const UDP_EVERY: u64 = 20;
/// Default connect count: the short soak `cargo xtask test` runs.
const SHORT: u64 = 20_000;
/// svclbd's growth allowed after warm-up (the first fifth of the run).
const RSS_GROWTH_BOUND_KIB: u64 = 4 * 1024;
const FD_GROWTH_BOUND: u64 = 2;

/// The backends scheduled (weight 1) after change `k`, and the config text.
fn change(k: usize) -> (BTreeSet<&'static str>, String) {
    // Two or three weighted backends at a time, rotating; a churned one
    // present every other change.
    let mut scheduled: BTreeSet<&str> = (0..2 + k % 2)
        .map(|i| WEIGHTED[(k + i) % WEIGHTED.len()])
        .collect();
    let mut entries: Vec<String> = WEIGHTED
        .iter()
        .map(|b| {
            let w = u32::from(scheduled.contains(b));
            format!("{{ address = \"{b}\", weight = {w} }}")
        })
        .collect();
    if k % 2 == 1 {
        let churned = CHURNED[(k / 2) % CHURNED.len()];
        scheduled.insert(churned);
        entries.push(format!("\"{churned}\""));
    }
    let text = format!(
        "[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nmark = 0x13d\nscheduler = \"rr\"\nterminate_on_removal = false\nbackends = [{}]\n",
        entries.join(", ")
    );
    (scheduled, text)
}

/// One change as svclbd made it: when asked (SIGHUP), when svclbd had
/// written all of it, and what it scheduled.
struct Applied {
    asked: Instant,
    shown: Instant,
    scheduled: BTreeSet<&'static str>,
}

/// A connect: when it started, when its pick was surely made (connect()
/// returned), and the backend that answered.
type Reach = (Instant, Instant, String);

/// svclbd's count of changes written to the maps (each counted once all
/// its writes, the schedule switch included, are done).
fn changes_applied(daemon: &Svclbd) -> u64 {
    daemon
        .metric("svclb_changes_applied_total")
        .expect("svclb_changes_applied_total in /metrics") as u64
}

fn rss_kib(pid: u32) -> u64 {
    let rss = svclb_tests::util::proc_status(pid, "VmRSS").unwrap();
    rss.split_whitespace().next().unwrap().parse().unwrap()
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[test]
fn soak_connects_while_backends_change_every_100_ms() {
    let total: u64 = std::env::var("SVCLB_SOAK_CONNECTS")
        .ok()
        .map(|v| v.parse().expect("SVCLB_SOAK_CONNECTS is a number"))
        .unwrap_or(SHORT);
    let sandbox = Sandbox::new().expect("sandbox");
    let mut servers = Vec::new();
    for task in WEIGHTED.iter().chain(&CHURNED) {
        sandbox.add_backend_addr(task.parse().unwrap()).unwrap();
        servers.push((
            TcpIdServer::start(&sandbox, addr(task, PORT)).unwrap(),
            UdpIdServer::start(&sandbox, addr(task, PORT)).unwrap(),
        ));
    }
    let pins = PinDir::new();
    let (first, text) = change(0);
    let config = write_temp("soak.toml", &text).unwrap();
    let cgroup = sandbox.cgroup_path().to_str().unwrap().to_string();
    let daemon = Svclbd::start(
        &pins,
        &[
            "--config",
            config.to_str().unwrap(),
            "--no-watch",
            "--cgroup",
            &cgroup,
        ],
    )
    .expect("svclbd starts");
    let pid = daemon.pid();
    let _guard = sandbox.enter_cgroup().unwrap();

    let started = Instant::now();
    let mut applied = vec![Applied {
        asked: started,
        shown: started,
        scheduled: first,
    }];
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reaches = Arc::new(Mutex::new(Vec::<Reach>::new()));
    let mut clients = Vec::new();
    for t in 0..TCP_THREADS {
        let (done, failed, reaches) = (done.clone(), failed.clone(), reaches.clone());
        clients.push(
            sandbox
                .spawn_in_client(&format!("soak-tcp-{t}"), move || {
                    let mut mine = Vec::new();
                    let mut n = 0u64;
                    while done.fetch_add(1, Ordering::Relaxed) < total {
                        n += 1;
                        let at = Instant::now();
                        match svclb_tests::tcp_identity(addr(VIP, PORT), TIMEOUT) {
                            Ok(who) => mine.push((at, Instant::now(), who)),
                            Err(e) => failed.lock().unwrap().push(format!("TCP: {e}")),
                        }
                        if n.is_multiple_of(UDP_EVERY) {
                            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                            s.set_read_timeout(Some(Duration::from_millis(500)))
                                .unwrap();
                            let at = Instant::now();
                            s.connect(addr(VIP, PORT)).unwrap();
                            let picked = Instant::now();
                            let mut buf = [0u8; 64];
                            // Retries go to the same backend (a connected socket).
                            let got = (0..4).find_map(|_| {
                                s.send(b"x").ok()?;
                                let len = s.recv(&mut buf).ok()?;
                                // The identity line, then the datagram echoed.
                                let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
                                Some(reply.lines().next().unwrap_or("").to_string())
                            });
                            match got {
                                Some(who) => mine.push((at, picked, who)),
                                None => failed.lock().unwrap().push("UDP: no answer".into()),
                            }
                        }
                    }
                    reaches.lock().unwrap().extend(mine);
                })
                .unwrap(),
        );
    }
    let samples = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                samples.lock().unwrap().push((rss_kib(pid), fd_count(pid)));
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    // The changes, every 100 ms, for as long as the clients run.
    let mut k = 0;
    let mut applied_before = changes_applied(&daemon);
    let mut next = started + CHANGE_EVERY;
    while clients.iter().any(|c| !c.is_finished()) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += CHANGE_EVERY;
        k += 1;
        let (scheduled, text) = change(k);
        std::fs::write(&config, text).unwrap();
        let asked = Instant::now();
        daemon.signal(libc::SIGHUP).unwrap();
        // Shown: the change's last write is done (a listing would show
        // the new weights before the schedule switches).
        let shown = loop {
            if changes_applied(&daemon) > applied_before {
                break Instant::now();
            }
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "change {k} not applied within 5 s\n{}",
                daemon.log_text()
            );
        };
        applied_before += 1;
        applied.push(Applied {
            asked,
            shown,
            scheduled,
        });
    }
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    // 1. No connect failed.
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} connects failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // 2. None reached a backend that was not scheduled while it connected:
    // set k may be in the maps from when it was asked for until the next
    // one was shown, and the pick happens somewhere between the connect's
    // start and its return.
    let reaches = reaches.lock().unwrap();
    let mut wrong = Vec::new();
    for (start, picked, who) in reaches.iter() {
        // Both times only grow with k.
        let hi = applied.partition_point(|a| a.asked <= *picked) - 1;
        let lo = applied[1..].partition_point(|next| next.shown < *start);
        let allowed: BTreeSet<&str> = applied[lo..=hi.max(lo)]
            .iter()
            .flat_map(|a| a.scheduled.iter().copied())
            .collect();
        if !allowed.contains(who.as_str()) {
            wrong.push((who.clone(), allowed));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} connects reached a backend out of the set, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // 3. The counters equal the work done, for every backend that stayed
    // listed (the weighted ones; each UDP socket is one connection).
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, who) in reaches.iter() {
        *seen.entry(who.clone()).or_default() += 1;
    }
    let rows = stats::backend_rows(&pins);
    for b in WEIGHTED {
        let counted = rows.get(b).map_or(0, |r| r.conns);
        assert_eq!(
            counted,
            seen.get(b).copied().unwrap_or(0),
            "{b}: Conns equals the connects it answered"
        );
    }
    let udp = reaches.len() as u64 - total;
    // 4. svclbd's memory and descriptors stay flat after warm-up.
    let samples = samples.lock().unwrap();
    let warm = &samples[samples.len() / 5..];
    let (rss_min, rss_max) = (
        warm.iter().map(|s| s.0).min().unwrap(),
        warm.iter().map(|s| s.0).max().unwrap(),
    );
    let (fd_min, fd_max) = (
        warm.iter().map(|s| s.1).min().unwrap(),
        warm.iter().map(|s| s.1).max().unwrap(),
    );
    let rss_growth = warm.last().unwrap().0.saturating_sub(warm[0].0);
    let fd_growth = warm.last().unwrap().1.saturating_sub(warm[0].1);
    let report = format!(
        "{total} TCP connects and {udp} UDP sockets from {TCP_THREADS} threads in {:.1} s ({:.0} per second), \
         {} backend changes (one every {} ms; weights 0/1 among {}, {} removed and added again): \
         0 failed, 0 out of the set; Conns exact for the weighted backends ({}). \
         svclbd after warm-up ({} samples): RSS {rss_min}–{rss_max} KiB (growth {rss_growth} KiB, bound {RSS_GROWTH_BOUND_KIB}), \
         file descriptors {fd_min}–{fd_max} (growth {fd_growth}, bound {FD_GROWTH_BOUND}).",
        elapsed.as_secs_f64(),
        (total + udp) as f64 / elapsed.as_secs_f64(),
        applied.len() - 1,
        CHANGE_EVERY.as_millis(),
        WEIGHTED.len(),
        CHURNED.len(),
        WEIGHTED
            .iter()
            .map(|b| format!("{b}: {}", seen.get(*b).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        warm.len(),
    );
    println!("{report}");
    assert!(
        rss_growth <= RSS_GROWTH_BOUND_KIB,
        "svclbd's RSS grew: {report}"
    );
    assert!(fd_growth <= FD_GROWTH_BOUND, "svclbd's fds grew: {report}");
    if let Some(path) = std::env::var_os("SVCLB_SOAK_REPORT") {
        std::fs::write(path, format!("{report}\n")).unwrap();
    }
    drop(daemon);
    drop(servers);
}
