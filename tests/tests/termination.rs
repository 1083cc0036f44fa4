//! Ending the sockets connected to a backend that leaves its service: the
//! real programs, real sockets in the sandbox, svclbd and svclb-ctl. Run as
//! root, serially (`cargo xtask test`).
//!
//! Each held connection lives on a thread of its own in the client
//! namespace, blocked in a read, so the moment the kernel ends it is the
//! moment that read returns.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::{addr, ApiFixture, PORT, TASKS, TIMEOUT, VIP};
use svclb_tests::daemon::write_temp;
use svclb_tests::{Sandbox, Svclbd};

/// How soon after the apply a held socket must fail (the bound).
const WITHIN: Duration = Duration::from_millis(200);

fn config(backends: &[(&str, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[[service]]\nname = \"api\"\nvip = \"{VIP}\"\nmark = 0x13d\n{extra}\nbackends = [{}]\n",
        list.join(", ")
    )
}

fn both(extra: &str) -> String {
    config(&[(TASKS[0], 1), (TASKS[1], 1)], extra)
}

/// The seed's `api` fixture, with svclb-ctl apply timed.
struct Fx(ApiFixture);

impl std::ops::Deref for Fx {
    type Target = ApiFixture;
    fn deref(&self) -> &ApiFixture {
        &self.0
    }
}

impl Fx {
    fn start(config: &str) -> Fx {
        Fx(ApiFixture::start_with(config))
    }

    fn daemon(&self) -> &Svclbd {
        self.0.daemon.as_ref().expect("svclbd runs")
    }

    /// `svclb-ctl apply` of `config`; returns when it has returned, with
    /// the moment it was started.
    fn ctl_apply(&self, config: &str) -> (Instant, String) {
        let file = write_temp("apply.toml", config).unwrap();
        let started = Instant::now();
        let out = self
            .pins
            .ctl(&["apply", file.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("apply failed: {e:#}\n{config}"));
        (started, out)
    }
}

/// A TCP connection through the VIP (or to `target`), held by a thread in
/// the client namespace that reads until the connection ends.
struct HeldTcp {
    backend: String,
    stream: TcpStream,
    /// Each read's outcome, with when it returned.
    reads: Receiver<(Instant, io::Result<Vec<u8>>)>,
}

impl HeldTcp {
    fn open(sandbox: &Sandbox, target: SocketAddr) -> HeldTcp {
        let (tx, rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::channel();
        sandbox
            .spawn_in_client("held-tcp", move || {
                let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).expect("connect");
                let backend = read_line(&mut stream).expect("identity line");
                first_tx
                    .send((backend, stream.try_clone().unwrap()))
                    .unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                loop {
                    let mut buf = [0u8; 64];
                    let outcome = stream.read(&mut buf).map(|n| buf[..n].to_vec());
                    let done = !matches!(&outcome, Ok(b) if !b.is_empty());
                    if tx.send((Instant::now(), outcome)).is_err() || done {
                        return;
                    }
                }
            })
            .unwrap();
        let (backend, stream) = first_rx.recv_timeout(TIMEOUT).expect("the held connection");
        HeldTcp {
            backend,
            stream,
            reads: rx,
        }
    }

    /// The connection still works: an echo goes through it.
    fn still_works(&mut self) -> bool {
        if self.stream.write_all(b"still here").is_err() {
            return false;
        }
        matches!(self.reads.recv_timeout(TIMEOUT), Ok((_, Ok(b))) if b == b"still here")
    }
}

fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn other(task: &str) -> &'static str {
    if task == TASKS[0] {
        TASKS[1]
    } else {
        TASKS[0]
    }
}

/// A fresh TCP connect through the VIP: which task answered.
fn new_connect(sandbox: &Sandbox) -> String {
    let _cg = sandbox.enter_cgroup().unwrap();
    sandbox.in_client(|| svclb_tests::tcp_identity(addr(VIP, PORT), TIMEOUT).unwrap())
}

#[test]
fn a_held_tcp_connection_to_a_removed_backend_fails_at_once() {
    let fx = Fx::start(&both(""));
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let held = HeldTcp::open(&fx.sandbox, addr(VIP, PORT));
    let gone = held.backend.clone();
    let stays = other(&gone);
    // A socket that dialled the same task's address itself: not svclb's.
    let mut direct = HeldTcp::open(&fx.sandbox, addr(&gone, PORT));

    let (applied, out) = fx.ctl_apply(&config(&[(stays, 1)], ""));
    assert!(
        out.contains(&format!("ended 1 socket(s) connected to {gone}")),
        "{out}"
    );
    let (at, outcome) = held
        .reads
        .recv_timeout(Duration::from_secs(5))
        .expect("the held connection's read returned");
    let err = outcome.expect_err("the read fails");
    let after = at.duration_since(applied);
    println!("held TCP connection to {gone} ended {after:?} after the apply started: {err}");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ECONNABORTED),
        "the client sees ECONNABORTED: {err}"
    );
    assert!(after < WITHIN, "ended {after:?} after the apply");
    for _ in 0..20 {
        assert_eq!(
            new_connect(&fx.sandbox),
            stays,
            "a new connect goes to {stays}"
        );
    }
    assert!(
        direct.still_works(),
        "a connection that dialled {gone} directly is left alone"
    );
}

#[test]
fn a_connected_udp_socket_to_a_removed_backend_fails_then_reconnects() {
    let fx = Fx::start(&both(""));
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let vip = addr(VIP, PORT);
    let (tx, rx) = mpsc::channel::<(String, Instant, io::Result<usize>, String)>();
    let (first_tx, first_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    fx.sandbox
        .spawn_in_client("held-udp", move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(vip).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 128];
            s.send(b"?").unwrap();
            let n = s.recv(&mut buf).unwrap();
            let first = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap()
                .to_string();
            first_tx.send(first.clone()).unwrap();
            // Blocked here while the backend is removed.
            let outcome = s.recv(&mut buf);
            let at = Instant::now();
            go_rx.recv().unwrap();
            // Reconnecting reaches a remaining backend.
            s.connect(vip).unwrap();
            s.send(b"?").unwrap();
            let n = s.recv(&mut buf).unwrap();
            let again = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap()
                .to_string();
            tx.send((first, at, outcome, again)).unwrap();
        })
        .unwrap();
    let gone = first_rx.recv_timeout(TIMEOUT).expect("the first answer");
    let stays = other(&gone);
    let (applied, out) = fx.ctl_apply(&config(&[(stays, 1)], ""));
    assert!(out.contains("ended 1 socket(s)"), "{out}");
    go_tx.send(()).unwrap();
    let (_, at, outcome, again) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let err = outcome.expect_err("the blocked recv fails");
    let after = at.duration_since(applied);
    println!("connected UDP socket to {gone} failed {after:?} after the apply started: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    assert!(after < WITHIN, "failed {after:?} after the apply");
    assert_eq!(again, stays, "after reconnecting it reaches {stays}");
}

#[test]
fn weight_zero_and_the_option_off_leave_held_connections_alone() {
    let fx = Fx::start(&both(""));
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    // Drain (weight 0): the graceful path.
    let mut held = HeldTcp::open(&fx.sandbox, addr(VIP, PORT));
    let drained = held.backend.clone();
    let (_, out) = fx.ctl_apply(&config(&[(&drained, 0), (other(&drained), 1)], ""));
    assert!(!out.contains("ended"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        held.still_works(),
        "weight 0 keeps the connection to {drained}"
    );

    // terminate_on_removal = false: removed, but its sockets drain alone.
    fx.ctl_apply(&both("terminate_on_removal = false"));
    let mut held = HeldTcp::open(&fx.sandbox, addr(VIP, PORT));
    let gone = held.backend.clone();
    let (_, out) = fx.ctl_apply(&config(
        &[(other(&gone), 1)],
        "terminate_on_removal = false",
    ));
    assert!(!out.contains("ended"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        held.still_works(),
        "with terminate_on_removal = false the connection to {gone} stays"
    );
    assert_eq!(new_connect(&fx.sandbox), other(&gone));
}

/// Through svclbd's own reload: the log line and the per-service counter.
#[test]
fn svclbd_ends_sockets_on_reload_and_counts_them() {
    let fx = Fx::start(&both(""));
    let _cg = fx.sandbox.enter_cgroup().unwrap();
    let held: Vec<HeldTcp> = (0..6)
        .map(|_| HeldTcp::open(&fx.sandbox, addr(VIP, PORT)))
        .collect();
    let gone = held[0].backend.clone();
    let on_gone = held.iter().filter(|h| h.backend == gone).count();
    let written = Instant::now();
    std::fs::write(&fx.config, config(&[(other(&gone), 1)], "")).unwrap();
    for h in held.iter().filter(|h| h.backend == gone) {
        let (at, outcome) = h
            .reads
            .recv_timeout(Duration::from_secs(5))
            .expect("the held connection ended");
        assert!(outcome.is_err(), "{outcome:?}");
        println!(
            "ended {:?} after the file was written",
            at.duration_since(written)
        );
    }
    fx.daemon()
        .wait_for_log("ended the sockets svclb connected to it", TIMEOUT)
        .unwrap();
    let log = fx.daemon().log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ended the sockets"))
        .unwrap();
    assert!(
        line.contains(&format!("backend={gone}")) && line.contains(&format!("sockets={on_gone}")),
        "{line}"
    );
    let (status, body) =
        svclb_tests::http::get(fx.daemon().metrics_addr().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    let samples = svclb_tests::http::parse_exposition(&body);
    let ended = samples
        .iter()
        .find(|s| {
            s.is(
                "svclb_service_sockets_terminated_total",
                &[("service", "api"), ("local_mark", "0000013D")],
            )
        })
        .unwrap_or_else(|| panic!("no termination counter in:\n{body}"));
    assert_eq!(ended.value, on_gone as f64);
    svclb_tests::http::promtool_check(&body).unwrap();
    // The others are untouched.
    for h in held.iter().filter(|h| h.backend != gone) {
        assert!(
            h.reads.try_recv().is_err(),
            "a connection to a remaining task ended"
        );
    }
}
