//! The schedulers with the real programs in the real kernel, real
//! sockets in the sandbox. Run as root, serially (`cargo xtask test`).
//!
//! Every service here is the seed's `api` (VIP 172.50.0.37, FWM 317) unless
//! a test says otherwise; its tasks are 172.50.0.40 to .43, each with a TCP
//! identity server on port 8080, so a connect tells which backend it got.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{addr, PORT, TIMEOUT};
use svclb_common::schedule::client_slot;
use svclb_common::Scheduler;
use svclb_tests::daemon::write_temp;
use svclb_tests::{ExtraClients, PinDir, Sandbox, Svclbd, TcpIdServer};

const VIP: &str = "172.50.0.37";
const MARK: u32 = 317;
const TASKS: [&str; 4] = ["172.50.0.40", "172.50.0.41", "172.50.0.42", "172.50.0.43"];

/// P(chi-square > 13.816) = 0.001 with 2 degrees of freedom (3 backends).
const CHI2_CRIT_DF2: f64 = 13.816;

/// The sandbox, an identity server on every task, svclbd attached to the
/// sandbox cgroup. Fields drop in order: daemon, servers, pins, sandbox.
struct Fx {
    _daemon: Svclbd,
    tcp: Vec<TcpIdServer>,
    pins: PinDir,
    sandbox: Sandbox,
}

impl Fx {
    fn start(config: &str) -> Fx {
        let sandbox = Sandbox::new().expect("sandbox");
        let mut tcp = Vec::new();
        for task in TASKS {
            sandbox.add_backend_addr(task.parse().unwrap()).unwrap();
            tcp.push(TcpIdServer::start(&sandbox, addr(task, PORT)).unwrap());
        }
        let pins = PinDir::new();
        let file = write_temp("svclb.toml", config).unwrap();
        let cgroup = sandbox.cgroup_path().to_str().unwrap().to_string();
        let daemon = Svclbd::start(
            &pins,
            &[
                "--config",
                file.to_str().unwrap(),
                "--no-watch",
                "--cgroup",
                &cgroup,
            ],
        )
        .expect("svclbd starts");
        Fx {
            _daemon: daemon,
            tcp,
            pins,
            sandbox,
        }
    }

    /// `svclb-ctl apply` of `config`; returns what it printed.
    fn apply(&self, config: &str) -> String {
        let file = write_temp("apply.toml", config).unwrap();
        self.pins
            .ctl(&["apply", file.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("apply failed: {e:#}\n{config}"))
    }

    /// `n` connects to the VIP from the sandbox client, in the cgroup, on
    /// one CPU when `cpu` is given; how many reached each task.
    fn spread(&self, n: usize, cpu: Option<usize>) -> BTreeMap<String, u64> {
        self.spread_to(vip(), n, cpu)
    }

    fn spread_to(&self, target: SocketAddr, n: usize, cpu: Option<usize>) -> BTreeMap<String, u64> {
        let _cg = self.sandbox.enter_cgroup().unwrap();
        self.sandbox.in_client(|| {
            if let Some(cpu) = cpu {
                pin_this_thread(cpu);
            }
            let mut seen = BTreeMap::new();
            for i in 0..n {
                let who = identity(target)
                    .unwrap_or_else(|e| panic!("connect #{i} to {target} failed: {e}"));
                *seen.entry(who).or_insert(0) += 1;
            }
            seen
        })
    }
}

fn vip() -> SocketAddr {
    addr(VIP, PORT)
}

/// The `api` service with this scheduler and (task, weight) backends, plus
/// extra lines (e.g. `affinity = 2`).
fn api(scheduler: &str, backends: &[(&str, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nmark = {MARK}\nscheduler = \"{scheduler}\"\n{extra}\nbackends = [{}]\n",
        list.join(", ")
    )
}

fn equal(tasks: &[&'static str]) -> Vec<(&'static str, u32)> {
    tasks.iter().map(|t| (*t, 1)).collect()
}

/// Connect, read the identity line, close with a reset (SO_LINGER 0) so
/// that tens of thousands of connects leave no TIME_WAIT behind.
fn identity(target: SocketAddr) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    let who = read_identity(&stream);
    reset_on_close(&stream);
    who
}

fn read_identity(stream: &TcpStream) -> io::Result<String> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    loop {
        let k = (&*stream).read(&mut buf[n..])?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the identity line",
            ));
        }
        n += k;
        if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if n == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "identity line too long",
            ));
        }
    }
}

fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// A connection held open, with the task it reached.
fn hold(target: SocketAddr) -> (TcpStream, String) {
    let stream = TcpStream::connect_timeout(&target, TIMEOUT).expect("connect");
    let who = read_identity(&stream).expect("identity");
    (stream, who)
}

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The CPU the pinned tests use: the last allowed one (CPU 0 tends to be
/// the busiest with interrupts).
fn one_cpu() -> usize {
    *allowed_cpus().last().expect("some CPU")
}

/// Pins the calling thread (only) to `cpu`.
fn pin_this_thread(cpu: usize) {
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            io::Error::last_os_error()
        );
    }
}

fn count(spread: &BTreeMap<String, u64>, task: &str) -> u64 {
    spread.get(task).copied().unwrap_or(0)
}

/// Pearson's chi-square of the counts of `tasks` against shares
/// proportional to `weights`.
fn chi_square(spread: &BTreeMap<String, u64>, tasks: &[&str], weights: &[u32]) -> f64 {
    let n: u64 = spread.values().sum();
    let total: u32 = weights.iter().sum();
    tasks
        .iter()
        .zip(weights)
        .map(|(t, &w)| {
            let expected = n as f64 * f64::from(w) / f64::from(total);
            let d = count(spread, t) as f64 - expected;
            d * d / expected
        })
        .sum()
}

/// The smallest x with P(X > x) <= alpha for X ~ Binomial(n, p).
fn binomial_upper(n: u64, p: f64, alpha: f64) -> u64 {
    let mut pmf = vec![0.0f64; n as usize + 1];
    pmf[0] = (1.0 - p).powi(n as i32);
    for k in 0..n as usize {
        pmf[k + 1] = pmf[k] * (n as f64 - k as f64) / (k as f64 + 1.0) * p / (1.0 - p);
    }
    let mut tail = 0.0;
    for x in (0..=n as usize).rev() {
        // tail = P(X > x)
        if tail + pmf[x] > alpha {
            return x as u64;
        }
        tail += pmf[x];
    }
    0
}

#[test]
fn binomial_upper_matches_known_tails() {
    // Bin(10, 0.5): P(X > 8) = 11/1024 ~ 0.0107, P(X > 9) = 1/1024.
    assert_eq!(binomial_upper(10, 0.5, 0.011), 8);
    assert_eq!(binomial_upper(10, 0.5, 0.01), 9);
    assert_eq!(binomial_upper(10, 0.5, 0.0009), 10);
}

// ---- 1. spread -----------------------------------------------------------

/// rr is per CPU: each CPU walks the backends in order from its own
/// position. On one CPU the spread is exact (floor or ceil of n/3, far
/// inside the 1%); over c CPUs each backend is within c of n/3.
#[test]
fn rr_is_exact_per_cpu() {
    let tasks = &TASKS[..3];
    let fx = Fx::start(&api("rr", &equal(tasks), ""));
    let cpus = allowed_cpus();
    let n = 10_000u64;
    let t0 = Instant::now();
    let pinned = fx.spread(n as usize, Some(one_cpu()));
    let took = t0.elapsed();
    println!(
        "rr, {n} connects on CPU {}: {pinned:?} in {took:?}",
        one_cpu()
    );
    assert_eq!(pinned.values().sum::<u64>(), n);
    for t in tasks {
        let c = count(&pinned, t);
        assert!(
            c == n / 3 || c == n.div_ceil(3),
            "rr on one CPU: {t} got {c} of {n}, not floor/ceil of n/3: {pinned:?}"
        );
    }
    assert_eq!(count(&pinned, TASKS[3]), 0, "{pinned:?}");

    // Free to move between CPUs: each CPU's walk is balanced within one.
    let m = 3_000u64;
    let free = fx.spread(m as usize, None);
    println!("rr, {m} connects on any of {} CPUs: {free:?}", cpus.len());
    for t in tasks {
        let c = count(&free, t) as i64;
        assert!(
            (c - (m / 3) as i64).abs() <= cpus.len() as i64,
            "rr on {} CPUs: {t} got {c} of {m}: {free:?}",
            cpus.len()
        );
    }
}

/// An update keeps each CPU's place in the rr walk: a service whose backend
/// set changes between every two connects still spreads them, rather than
/// sending each to its first slot.
#[test]
fn rr_keeps_its_place_across_updates() {
    let three = api("rr", &equal(&TASKS[..3]), "");
    let four = api("rr", &equal(&TASKS), "");
    let fx = Fx::start(&three);
    let cpu = one_cpu();
    let mut spread = BTreeMap::new();
    let rounds = 24;
    for i in 0..rounds {
        for (who, n) in fx.spread(1, Some(cpu)) {
            *spread.entry(who).or_insert(0u64) += n;
        }
        fx.apply(if i % 2 == 0 { &four } else { &three });
    }
    println!("rr, one connect between updates, {rounds} times: {spread:?}");
    let most = spread.values().copied().max().unwrap();
    assert!(
        spread.len() >= 3 && most <= rounds / 2,
        "updates restart the walk: {spread:?}"
    );
}

/// wrr 1:2:3: chi-square at p = 0.001, and (one CPU) the smooth order's
/// exactness: each backend within one of n * w / 6.
#[test]
fn wrr_follows_the_weights() {
    let tasks = &TASKS[..3];
    let weights = [1, 2, 3];
    let backends: Vec<_> = tasks.iter().copied().zip(weights).collect();
    let fx = Fx::start(&api("wrr", &backends, ""));
    let n = 10_000u64;
    let t0 = Instant::now();
    let spread = fx.spread(n as usize, Some(one_cpu()));
    let chi2 = chi_square(&spread, tasks, &weights);
    println!(
        "wrr 1:2:3, {n} connects: {spread:?}, chi2 {chi2:.3} in {:?}",
        t0.elapsed()
    );
    assert_eq!(spread.values().sum::<u64>(), n);
    assert!(chi2 < CHI2_CRIT_DF2, "chi2 {chi2} >= {CHI2_CRIT_DF2}");
    for (t, w) in tasks.iter().zip(weights) {
        let expected = n as f64 * f64::from(w) / 6.0;
        let c = count(&spread, t) as f64;
        assert!(
            (c - expected).abs() <= 1.0,
            "wrr on one CPU: {t} got {c}, expected {expected:.1}: {spread:?}"
        );
    }
}

/// random, weighted 1:2:3 and equal: chi-square at p = 0.001.
#[test]
fn random_follows_the_weights() {
    let tasks = &TASKS[..3];
    let n = 10_000u64;
    let weights = [1, 2, 3];
    let backends: Vec<_> = tasks.iter().copied().zip(weights).collect();
    let fx = Fx::start(&api("random", &backends, ""));
    let t0 = Instant::now();
    let spread = fx.spread(n as usize, None);
    let chi2 = chi_square(&spread, tasks, &weights);
    println!(
        "random 1:2:3, {n} connects: {spread:?}, chi2 {chi2:.3} in {:?}",
        t0.elapsed()
    );
    assert_eq!(spread.values().sum::<u64>(), n);
    assert!(chi2 < CHI2_CRIT_DF2, "chi2 {chi2} >= {CHI2_CRIT_DF2}");

    fx.apply(&api("random", &equal(tasks), ""));
    let spread = fx.spread(n as usize, None);
    let chi2 = chi_square(&spread, tasks, &[1, 1, 1]);
    println!("random 1:1:1, {n} connects: {spread:?}, chi2 {chi2:.3}");
    assert_eq!(spread.values().sum::<u64>(), n);
    assert!(chi2 < CHI2_CRIT_DF2, "chi2 {chi2} >= {CHI2_CRIT_DF2}");
}

// ---- 2. weight 0 ---------------------------------------------------------

/// Under every scheduler: a backend listed with weight 0 gets no new
/// connection; a backend set to weight 0 stops getting new connections at
/// once, while its established connection carries on.
#[test]
fn weight_zero_takes_no_new_connection() {
    let fx = Fx::start(&api("rr", &equal(&TASKS), ""));
    let n = 300;
    for scheduler in ["rr", "wrr", "random", "mh", "sh", "lc", "wlc"] {
        let initial = [(TASKS[0], 1), (TASKS[1], 1), (TASKS[2], 1), (TASKS[3], 0)];
        fx.apply(&api(scheduler, &initial, ""));
        let _cg = fx.sandbox.enter_cgroup().unwrap();
        let (held, mut phase1) = fx.sandbox.in_client(|| {
            let (stream, first) = hold(vip());
            let mut seen = BTreeMap::new();
            *seen.entry(first.clone()).or_insert(0u64) += 1;
            for _ in 1..n {
                *seen.entry(identity(vip()).unwrap()).or_insert(0) += 1;
            }
            ((stream, first), seen)
        });
        let (stream, quiesced) = held;
        assert_eq!(
            count(&phase1, TASKS[3]),
            0,
            "{scheduler}: the weight-0 backend got connections: {phase1:?}"
        );
        if matches!(scheduler, "rr" | "wrr" | "random") {
            for t in &TASKS[..3] {
                assert!(count(&phase1, t) > 0, "{scheduler}: {phase1:?}");
            }
        }
        phase1.clear();

        // The first connection's backend goes quiescent too.
        let now: Vec<(&str, u32)> = initial
            .iter()
            .map(|&(t, w)| (t, if t == quiesced { 0 } else { w }))
            .collect();
        fx.apply(&api(scheduler, &now, ""));
        let phase2 = fx.spread(n, None);
        println!("{scheduler}: {quiesced} set to weight 0, then {phase2:?}");
        assert_eq!(phase2.values().sum::<u64>(), n as u64);
        for gone in [quiesced.as_str(), TASKS[3]] {
            assert_eq!(
                count(&phase2, gone),
                0,
                "{scheduler}: weight-0 {gone} got new connections: {phase2:?}"
            );
        }
        // Established connections carry on.
        let echoed = fx.sandbox.in_client(|| {
            use std::io::Write;
            (&stream).write_all(b"still here").unwrap();
            let mut buf = [0u8; 10];
            (&stream).read_exact(&mut buf).map(|()| buf)
        });
        assert_eq!(&echoed.expect("echo on the held connection"), b"still here");
        reset_on_close(&stream);
    }
}

// ---- 3. mh and sh ----------------------------------------------------------

/// Connects from each extra client `per_client` times; each client must
/// get one backend every time. Returns each client's backend.
fn backend_per_client(clients: &ExtraClients, per_client: usize, what: &str) -> Vec<String> {
    (0..clients.len())
        .map(|i| {
            let seen: BTreeSet<String> = clients.in_client(i, || {
                (0..per_client)
                    .map(|k| {
                        identity(vip()).unwrap_or_else(|e| {
                            panic!("{what}: client {i} connect #{k} failed: {e}")
                        })
                    })
                    .collect()
            });
            assert_eq!(
                seen.len(),
                1,
                "{what}: client {} got several backends: {seen:?}",
                clients.addr(i)
            );
            seen.into_iter().next().unwrap()
        })
        .collect()
}

/// The slot table svclb builds for equal-weight `tasks`: slot k's task.
fn slot_table(scheduler: Scheduler, tasks: &[&str]) -> Vec<String> {
    let planned: Vec<svclb::schedule::PlannedBackend> = tasks
        .iter()
        .map(|t| svclb::schedule::PlannedBackend {
            addr: t.parse().unwrap(),
            port: None,
            weight: 1,
        })
        .collect();
    let idx = svclb::schedule::plan_slots(scheduler, &planned).unwrap();
    idx.into_iter()
        .map(|i| tasks[i as usize].to_string())
        .collect()
}

/// The calling thread's network namespace cookie (SO_NETNS_COOKIE), the
/// key mh and sh hash.
fn netns_cookie() -> u64 {
    // An unbound socket: it needs no address in the namespace.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_NETNS_COOKIE: {}", io::Error::last_os_error());
    cookie
}

/// mh and sh hash the client's network namespace: the same client gets the
/// same backend on every connect, and different clients spread over the
/// backends. Each client gets exactly the backend that svclb-common's
/// `client_slot` (the function the program calls) predicts from its
/// cookie, so the unit-tested hash is the one the kernel runs.
#[test]
fn hashing_schedulers_keep_each_client_on_one_backend() {
    let fx = Fx::start(&api("mh", &equal(&TASKS), ""));
    let clients = ExtraClients::new(&fx.sandbox, 40).expect("extra clients");
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    for scheduler in ["mh", "sh"] {
        fx.apply(&api(scheduler, &equal(&TASKS), ""));
        // The sandbox's own client, many times.
        let own: BTreeSet<String> = fx
            .sandbox
            .in_client(|| (0..200).map(|_| identity(vip()).unwrap()).collect());
        assert_eq!(own.len(), 1, "{scheduler}: one client, {own:?}");
        let per_client = backend_per_client(&clients, 5, scheduler);
        let used: BTreeSet<&String> = per_client.iter().collect();
        println!("{scheduler}: 40 clients on {used:?}");
        // P(40 clients hash onto at most 2 of 4 backends) < 6 * 2^-40.
        assert!(
            used.len() >= 3,
            "{scheduler}: 40 clients used only {used:?}: is the key the client?"
        );
        let table = slot_table(Scheduler::from_name(scheduler).unwrap(), &TASKS);
        let predicted = |cookie: u64| -> &String {
            &table[client_slot(cookie, MARK, table.len() as u32) as usize]
        };
        let own_cookie = fx.sandbox.in_client(netns_cookie);
        assert_eq!(
            own.iter().next().unwrap(),
            predicted(own_cookie),
            "{scheduler}: the sandbox client (netns cookie {own_cookie})"
        );
        for (i, got) in per_client.iter().enumerate() {
            let cookie = clients.in_client(i, netns_cookie);
            assert_eq!(
                got,
                predicted(cookie),
                "{scheduler}: client {} (netns cookie {cookie}) is not where client_slot puts it",
                clients.addr(i)
            );
        }
        // Asked again later (other clients in between): the same answers.
        assert_eq!(
            backend_per_client(&clients, 1, scheduler),
            per_client,
            "{scheduler}: a client changed backend with nothing changed"
        );
    }
}

/// Maglev: one of N = 4 backends leaves; the clients that move are those of
/// the leaving backend plus a few, at most 1/N + 2% of the clients up to
/// sampling: K clients sample the table, so the count of movers is
/// Binomial(K, p) with p the table's moved fraction, p <= 1/N + 2% (the
/// table-level bound, unit-tested in svclb-common's maglev.rs). The test
/// allows the binomial's upper quantile at P = 0.001 (the level for
/// the chi-square tests) under the worst p allowed. Sharper: a client of a
/// remaining backend moves only when its table entry changed hands, with
/// probability q <= (2% + 2/M) / (1 - 1/N - 2/M) (each backend holds within
/// two entries of M/N); those are bounded the same way. A plain hash over
/// the slots, like sh's, moves a third of them.
#[test]
fn maglev_moves_few_clients_when_a_backend_leaves() {
    const K: usize = 150;
    const ALPHA: f64 = 1e-3;
    let fx = Fx::start(&api("mh", &equal(&TASKS), ""));
    let clients = ExtraClients::new(&fx.sandbox, K).expect("extra clients");
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let n = TASKS.len();
    let before = backend_per_client(&clients, 2, "mh, 4 backends");
    let gone = TASKS[3];
    fx.apply(&api("mh", &equal(&TASKS[..3]), ""));
    let after = backend_per_client(&clients, 2, "mh, 3 backends");

    let on_gone = before.iter().filter(|b| *b == gone).count();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let survivors_moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != gone && b != a)
        .count();
    assert!(after.iter().all(|a| a != gone), "{gone} is gone: {after:?}");
    assert_eq!(moved, on_gone + survivors_moved);

    // The table itself, as svclb builds it (for the record).
    let table = |tasks: &[&str]| slot_table(Scheduler::Mh, tasks);
    let (t4, t3) = (table(&TASKS), table(&TASKS[..3]));
    let m = t4.len() as f64;
    let table_moved = t4.iter().zip(&t3).filter(|(a, b)| a != b).count() as f64 / m;

    let p_max = 1.0 / n as f64 + 0.02;
    let limit = binomial_upper(K as u64, p_max, ALPHA);
    let q_max = (0.02 + 2.0 / m) / (1.0 - 1.0 / n as f64 - 2.0 / m);
    let survivors = K - on_gone;
    let survivors_limit = binomial_upper(survivors as u64, q_max, ALPHA);
    println!(
        "mh, one of {n} backends leaves: {moved} of {K} clients moved ({:.1}%; {on_gone} were on {gone}, \
         {survivors_moved} of {survivors} others moved). Table: {:.2}% of {m} entries moved. \
         Limits at P = {ALPHA}: {limit} movers ({:.1}% = 1/N + 2% + {:.1}% sampling allowance), \
         {survivors_limit} other movers",
        100.0 * moved as f64 / K as f64,
        100.0 * table_moved,
        100.0 * limit as f64 / K as f64,
        100.0 * (limit as f64 / K as f64 - p_max),
    );
    assert!(
        table_moved <= p_max,
        "the table moved {table_moved} > {p_max}"
    );
    assert!(
        moved as u64 <= limit,
        "{moved} of {K} clients moved, more than {limit}"
    );
    assert!(
        survivors_moved as u64 <= survivors_limit,
        "{survivors_moved} of {survivors} clients of remaining backends moved, more than {survivors_limit}"
    );
}

// ---- 4. affinity ---------------------------------------------------------

/// affinity = 2 (seconds) with random over 4 backends: a client keeps its
/// backend while it connects within the timeout (each connect refreshes
/// it), and is scheduled afresh once the timeout has passed. The client is
/// the network namespace: another namespace gets its own choice.
#[test]
fn affinity_holds_within_the_timeout_and_lets_go_after() {
    let fx = Fx::start(&api("random", &equal(&TASKS), "affinity = 2"));
    let clients = ExtraClients::new(&fx.sandbox, 12).expect("extra clients");
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let burst = |n: usize| -> BTreeSet<String> {
        fx.sandbox
            .in_client(|| (0..n).map(|_| identity(vip()).unwrap()).collect())
    };

    // Within the timeout: one backend for 200 connects.
    let first = burst(200);
    assert_eq!(first.len(), 1, "within the timeout: {first:?}");
    let first = first.into_iter().next().unwrap();

    // Refreshed: a connect every 0.5 s for 5 s, longer than the timeout.
    for i in 0..10 {
        thread::sleep(Duration::from_millis(500));
        let now = burst(1);
        assert!(
            now.contains(&first),
            "refresh #{i}: affinity to {first} lost: {now:?}"
        );
    }

    // Let go: 10 times, no connect for longer than the timeout, then a
    // burst: one backend within the burst, and with 4 backends the 11
    // choices are not all the same (P = 4^-10 if it did let go).
    let mut chosen = vec![first.clone()];
    for i in 0..10 {
        thread::sleep(Duration::from_millis(2300));
        let now = burst(20);
        assert_eq!(now.len(), 1, "expiry #{i}: {now:?}");
        chosen.push(now.into_iter().next().unwrap());
    }
    let distinct: BTreeSet<&String> = chosen.iter().collect();
    println!("affinity: backends after each expiry: {chosen:?}");
    assert!(
        distinct.len() >= 2,
        "affinity never let go after its timeout: {chosen:?}"
    );

    // Per client: other namespaces keep their own backends.
    let per_client = backend_per_client(&clients, 10, "affinity");
    let used: BTreeSet<&String> = per_client.iter().collect();
    assert!(used.len() >= 2, "12 clients all on {used:?}");

    // A remembered backend that leaves, or goes to weight 0, is dropped at
    // once, timeout or not.
    let current = burst(5).into_iter().next().unwrap();
    let without: Vec<(&str, u32)> = TASKS
        .iter()
        .filter(|t| **t != current)
        .map(|t| (*t, 1))
        .collect();
    fx.apply(&api("random", &without, "affinity = 2"));
    let now = burst(20);
    assert!(
        !now.contains(&current) && now.len() == 1,
        "{current} was removed: {now:?}"
    );
    let next = now.into_iter().next().unwrap();
    let quiet: Vec<(&str, u32)> = TASKS
        .iter()
        .map(|t| (*t, if *t == next || *t == current { 0 } else { 1 }))
        .collect();
    fx.apply(&api("random", &quiet, "affinity = 2"));
    let now = burst(20);
    assert!(
        !now.contains(&next) && !now.contains(&current) && now.len() == 1,
        "{next} went to weight 0: {now:?}"
    );
}

// ---- 5. least connection -------------------------------------------------

/// lc and wlc count live connections: held connections spread so that
/// each backend's count (over its weight) stays level.
#[test]
fn least_connection_levels_held_connections() {
    let lc = api("lc", &equal(&TASKS[..3]), "");
    let wlc = format!(
        "{lc}\n[[service]]\nname = \"wapi\"\nvip = \"172.50.0.38\"\nmark = 318\nscheduler = \"wlc\"\n\
         backends = [{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 2 }}]\n",
        TASKS[0], TASKS[1], TASKS[2]
    );
    let fx = Fx::start(&wlc);
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let held = |target: SocketAddr, n: usize| {
        fx.sandbox
            .in_client(|| (0..n).map(|_| hold(target)).collect::<Vec<_>>())
    };
    let tally = |conns: &[(TcpStream, String)]| {
        let mut c = BTreeMap::new();
        for (_, who) in conns {
            *c.entry(who.clone()).or_insert(0u64) += 1;
        }
        c
    };

    let lc_conns = held(vip(), 10);
    let spread = tally(&lc_conns);
    println!("lc, 10 held connections: {spread:?}");
    for t in &TASKS[..3] {
        let c = count(&spread, t);
        assert!((3..=4).contains(&c), "lc: {t} holds {c}: {spread:?}");
    }
    // svclb-ctl list shows the same as ActiveConn.
    let list = fx.pins.ctl(&["list"]).unwrap();
    for t in &TASKS[..3] {
        let line = list
            .lines()
            .find(|l| l.contains(&format!("{t}:0")))
            .unwrap_or_else(|| panic!("{t} not listed:\n{list}"));
        let active: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert_eq!(active, count(&spread, t), "ActiveConn of {t}:\n{list}");
    }

    let wlc_conns = held(addr("172.50.0.38", PORT), 12);
    let spread = tally(&wlc_conns);
    println!("wlc 1:1:2, 12 held connections: {spread:?}");
    for (t, expected) in TASKS[..3].iter().zip([3i64, 3, 6]) {
        let c = count(&spread, t) as i64;
        assert!(
            (c - expected).abs() <= 1,
            "wlc: {t} holds {c}, expected {expected} +- 1: {spread:?}"
        );
    }
    for (stream, _) in lc_conns.iter().chain(&wlc_conns) {
        reset_on_close(stream);
    }
}

// ---- 6. churn ------------------------------------------------------------

/// The sets the churn alternates between (indices into TASKS).
const CHURN_SETS: [&[usize]; 3] = [&[0, 1], &[2, 3], &[1, 2]];
const CHURN_SCHEDULERS: [&str; 7] = ["rr", "wrr", "random", "mh", "sh", "lc", "wlc"];

fn churn_config(k: usize) -> String {
    let set: Vec<&str> = CHURN_SETS[k % 3].iter().map(|&i| TASKS[i]).collect();
    api(CHURN_SCHEDULERS[k % 7], &equal(&set), "")
}

/// Four client threads connect in a loop while another thread replaces the
/// backend set (and the scheduler) 1,000 times with svclbd's own
/// `reconcile` (snapshot, plan, execute), in the test process. No connect
/// fails, and none lands on a backend that had been removed before it
/// started: a connect that started after update k returned reaches a
/// backend of update k or of an update whose writes began before its
/// connect() returned. The sets alternate {.40,.41}, {.42,.43}, {.41,.42}
/// while all four tasks serve, so a stale pick would reach a live server
/// and only the identity shows it.
#[test]
fn churn_never_fails_nor_reaches_a_removed_backend() {
    const UPDATES: usize = 1_000;
    const CLIENTS: usize = 4;
    let fx = Fx::start(&churn_config(0));
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let pins = svclb::pins::PinDir::new(fx.pins.path());
    let mut dp = svclb::dataplane::Dataplane::open(&pins).expect("open the pinned maps");
    let desired = |k: usize| {
        svclb::config::parse_str(&churn_config(k), "churn")
            .unwrap()
            .static_state()
    };
    // Parsed ahead, so the updater's loop is only the apply.
    let states: Vec<_> = (0..=UPDATES).map(desired).collect();

    // (started, returned) of update k; update 0 is the initial state.
    let updates: Mutex<Vec<(Instant, Instant)>> = Mutex::new(Vec::with_capacity(UPDATES + 1));
    let now = Instant::now();
    updates.lock().unwrap().push((now, now));
    let done = AtomicBool::new(false);
    type Record = (Instant, Instant, io::Result<String>);

    let t0 = Instant::now();
    let records: Vec<Vec<Record>> = fx.sandbox.in_client(|| {
        thread::scope(|s| {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    s.spawn(|| {
                        let mut out: Vec<Record> = Vec::new();
                        while !done.load(Ordering::SeqCst) {
                            let start = Instant::now();
                            let stream = TcpStream::connect_timeout(&vip(), TIMEOUT);
                            let connected = Instant::now();
                            let who = stream.and_then(|s| {
                                let who = read_identity(&s);
                                reset_on_close(&s);
                                who
                            });
                            out.push((start, connected, who));
                        }
                        out
                    })
                })
                .collect();
            let updater = s.spawn(|| {
                // Let the clients get going first.
                thread::sleep(Duration::from_millis(50));
                for (k, state) in states.iter().enumerate().skip(1) {
                    // reconcile::apply is snapshot + plan + execute; only
                    // execute writes, so the update starts there.
                    let plan = dp
                        .snapshot()
                        .and_then(|snap| svclb::reconcile::plan(&snap, state, dp.capacity()));
                    let started = Instant::now();
                    let r = plan.and_then(|plan| svclb::reconcile::execute(&mut dp, &plan));
                    let returned = Instant::now();
                    updates.lock().unwrap().push((started, returned));
                    if let Err(e) = r {
                        done.store(true, Ordering::SeqCst);
                        panic!("update {k} failed: {e:#}");
                    }
                    // A quiet moment, so that many connects see one state only.
                    thread::sleep(Duration::from_micros(500));
                }
                thread::sleep(Duration::from_millis(50));
                done.store(true, Ordering::SeqCst);
            });
            let r = updater.join();
            let records = clients.into_iter().map(|c| c.join().unwrap()).collect();
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
            records
        })
    });
    let took = t0.elapsed();
    let updates = updates.into_inner().unwrap();
    assert_eq!(updates.len(), UPDATES + 1);

    let sets: Vec<BTreeSet<&str>> = (0..=UPDATES)
        .map(|k| CHURN_SETS[k % 3].iter().map(|&i| TASKS[i]).collect())
        .collect();
    let mut total = 0;
    let mut failed = Vec::new();
    let mut misplaced = Vec::new();
    let mut overlapping = 0;
    let mut exact = 0;
    for (start, connected, who) in records.iter().flatten() {
        total += 1;
        let who = match who {
            Ok(w) => w,
            Err(e) => {
                failed.push(format!("{e}"));
                continue;
            }
        };
        // The last update that had returned when the connect started, and
        // the last that had started when connect() returned.
        let lo = updates.iter().rposition(|(_, r)| r < start).unwrap_or(0);
        let hi = updates
            .iter()
            .rposition(|(s, _)| s <= connected)
            .unwrap_or(0);
        if hi > lo {
            overlapping += 1;
        } else if sets[lo].len() < TASKS.len() {
            // Only the set of update lo allowed: the check has teeth.
            exact += 1;
        }
        if !(lo..=hi).any(|k| sets[k].contains(who.as_str())) {
            misplaced.push(format!(
                "a connect started after update {lo} returned ({:?}) reached {who}; updates {lo}..={hi} allow {:?}",
                sets[lo],
                (lo..=hi).map(|k| &sets[k]).collect::<Vec<_>>()
            ));
        }
    }
    println!(
        "churn: {UPDATES} updates and {total} connects from {CLIENTS} threads in {took:?}; \
         {overlapping} connects overlapped an update, {exact} saw one state only; {} failed, {} misplaced",
        failed.len(),
        misplaced.len()
    );
    assert!(
        exact >= 2 * UPDATES,
        "too few connects ({exact} of {total}) fell between updates to say anything"
    );
    assert!(
        failed.is_empty(),
        "{} connects failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        misplaced.is_empty(),
        "{} connects reached a removed backend, e.g. {:#?}",
        misplaced.len(),
        &misplaced[..misplaced.len().min(5)]
    );
    // Every task served some of them.
    for (i, t) in TASKS.iter().enumerate() {
        assert!(fx.tcp[i].accepted() > 0, "{t} never reached");
    }
}

// ---- 7. config and svclb-ctl ---------------------------------------------

/// Every scheduler is accepted by the config and shown as ipvsadm shows it.
#[test]
fn every_scheduler_is_listed_as_ipvsadm_does() {
    let mut config = String::new();
    for (i, s) in CHURN_SCHEDULERS.iter().enumerate() {
        config.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"172.50.0.{}\"\nmark = {}\nscheduler = \"{s}\"\nbackends = [\"{}\", \"{}\"]\n",
            30 + i,
            MARK + i as u32,
            TASKS[0],
            TASKS[1]
        ));
    }
    let fx = Fx::start(&config);
    let list = fx.pins.ctl(&["list"]).unwrap();
    for (i, s) in CHURN_SCHEDULERS.iter().enumerate() {
        let line = format!("FWM  {} {s}", MARK + i as u32);
        assert!(
            list.lines().any(|l| l.trim_end() == line),
            "no line {line:?} in:\n{list}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&fx.pins.ctl(&["list", "--json"]).unwrap()).unwrap();
    let listed: Vec<&str> = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["scheduler"].as_str().unwrap())
        .collect();
    assert_eq!(listed, CHURN_SCHEDULERS);

    // Changing the scheduler is an edit of the service, printed as ipvsadm -E.
    let changed = config.replacen("scheduler = \"rr\"", "scheduler = \"mh\"", 1);
    let file = write_temp("changed.toml", &changed).unwrap();
    let diff = fx.pins.ctl(&["diff", file.to_str().unwrap()]).unwrap();
    assert!(
        diff.lines()
            .any(|l| l.starts_with(&format!("~ -E -f {MARK} -s mh"))),
        "{diff}"
    );
    fx.apply(&changed);
    let list = fx.pins.ctl(&["list"]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.trim_end() == format!("FWM  {MARK} mh")),
        "{list}"
    );
    // Affinity is ipvsadm's persistence.
    let sticky = changed.replacen(
        "scheduler = \"wrr\"",
        "scheduler = \"wrr\"\naffinity = \"5m\"",
        1,
    );
    let file = write_temp("sticky.toml", &sticky).unwrap();
    let diff = fx.pins.ctl(&["diff", file.to_str().unwrap()]).unwrap();
    assert!(
        diff.lines()
            .any(|l| l.starts_with(&format!("~ -E -f {} -s wrr -p 300", MARK + 1))),
        "{diff}"
    );
    fx.apply(&sticky);
    let list = fx.pins.ctl(&["list"]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.trim_end() == format!("FWM  {} wrr persistent 300", MARK + 1)),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fx.pins.ctl(&["list", "--json"]).unwrap()).unwrap();
    assert_eq!(json[1]["persistent"], 300, "{json}");
    assert!(json[0].get("persistent").is_none(), "{json}");
    // And connects follow the new scheduler (one client: one backend).
    let spread = fx.spread_to(addr("172.50.0.30", PORT), 50, None);
    assert_eq!(spread.len(), 1, "mh, one client: {spread:?}");
}
