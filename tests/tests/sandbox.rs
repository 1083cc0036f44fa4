//! Privileged tests of the sandbox harness itself. They need root and FAIL (not skip) without it.
//!
//! Run: `cargo test -p svclb-tests --test sandbox -- --test-threads=1`

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use svclb_tests::sandbox::{BACKENDS_V4, CLIENT_V4};
use svclb_tests::util::{ip_command, require_root};
use svclb_tests::{
    cgroup, netns_path, run, tcp_echo, tcp_identity, udp_identity, Sandbox, TcpIdServer,
    UdpIdServer,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn root() {
    if let Err(e) = require_root() {
        panic!("{e:#}");
    }
}

fn sandbox() -> Sandbox {
    root();
    Sandbox::new().unwrap_or_else(|e| panic!("Sandbox::new failed: {e:#}"))
}

fn cgroup_v2_line() -> String {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("0:: line in /proc/self/cgroup")
        .to_string()
}

#[test]
fn netns_and_cgroup_exist_while_alive_and_go_on_drop() {
    let sb = sandbox();
    let (c, b, cg) = (
        netns_path(sb.client_netns()),
        netns_path(sb.backends_netns()),
        sb.cgroup_path().to_path_buf(),
    );
    assert!(sb.client_netns().starts_with("svclb-") && sb.client_netns().ends_with("-c"));
    assert!(sb.backends_netns().ends_with("-b"));
    assert!(c.exists(), "{} missing", c.display());
    assert!(b.exists(), "{} missing", b.display());
    assert!(cg.join("cgroup.procs").exists(), "{} missing", cg.display());
    let listed = run(ip_command().args(["netns", "list"])).unwrap();
    assert!(listed.contains(sb.client_netns()), "{listed}");
    // The veth pair lives only inside the sandbox namespaces.
    let links = run(ip_command().args(["-n", sb.client_netns(), "-o", "link"])).unwrap();
    assert!(links.contains("veth-c"), "{links}");
    let root_links = run(ip_command().args(["-o", "link"])).unwrap();
    assert!(
        !root_links.contains("veth-c"),
        "veth leaked to the caller's netns: {root_links}"
    );
    drop(sb);
    assert!(!c.exists(), "{} left behind", c.display());
    assert!(!b.exists(), "{} left behind", b.display());
    assert!(!cg.exists(), "{} left behind", cg.display());
}

#[test]
fn cleanup_happens_on_panic() {
    root();
    let mut paths: Option<(PathBuf, PathBuf, PathBuf)> = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let sb = sandbox();
        paths = Some((
            netns_path(sb.client_netns()),
            netns_path(sb.backends_netns()),
            sb.cgroup_path().to_path_buf(),
        ));
        let _server = TcpIdServer::start(&sb, SocketAddr::new(BACKENDS_V4.into(), 8080)).unwrap();
        panic!("deliberate panic with a live sandbox");
    }));
    assert!(result.is_err(), "the closure should have panicked");
    let (c, b, cg) = paths.expect("sandbox was created");
    assert!(!c.exists(), "{} left behind", c.display());
    assert!(!b.exists(), "{} left behind", b.display());
    assert!(!cg.exists(), "{} left behind", cg.display());
}

#[test]
fn tcp_and_udp_identity_servers_answer_from_client_ns() {
    let sb = sandbox();
    let v4: IpAddr = "172.50.0.40".parse().unwrap();
    let v6: IpAddr = "fd00:50::40".parse().unwrap();
    sb.add_backend_addr(v4).unwrap();
    sb.add_backend_addr(v6).unwrap();
    let tcp = TcpIdServer::start(&sb, SocketAddr::new(v4, 8080)).unwrap();
    let tcp6 = TcpIdServer::start(&sb, SocketAddr::new(v6, 8080)).unwrap();
    let udp = UdpIdServer::start(&sb, SocketAddr::new(v4, 8080)).unwrap();
    let udp6 = UdpIdServer::start(&sb, SocketAddr::new(v6, 8080)).unwrap();

    let (t4, t6, u4, u6, echo) = sb.in_client(|| {
        (
            tcp_identity(SocketAddr::new(v4, 8080), TIMEOUT).unwrap(),
            tcp_identity(SocketAddr::new(v6, 8080), TIMEOUT).unwrap(),
            udp_identity(SocketAddr::new(v4, 8080), TIMEOUT).unwrap(),
            udp_identity(SocketAddr::new(v6, 8080), TIMEOUT).unwrap(),
            tcp_echo(SocketAddr::new(v4, 8080), b"hello sandbox", TIMEOUT).unwrap(),
        )
    });
    assert_eq!(t4, "172.50.0.40");
    assert_eq!(t6, "fd00:50::40");
    assert_eq!(u4, "172.50.0.40");
    assert_eq!(u6, "fd00:50::40");
    assert_eq!(echo, ("172.50.0.40".to_string(), b"hello sandbox".to_vec()));
    assert_eq!(tcp.accepted(), 2);
    assert_eq!(tcp.bytes_received(), 13);
    assert_eq!(tcp6.accepted(), 1);
    assert_eq!(udp.datagrams(), 1);
    assert_eq!(udp6.datagrams(), 1);

    // Addresses outside the sandbox subnets are refused.
    assert!(sb.add_backend_addr("10.0.0.1".parse().unwrap()).is_err());

    // A server with an open client connection still stops promptly.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = sb
        .spawn_in_client("holder", move || {
            let s =
                std::net::TcpStream::connect_timeout(&SocketAddr::new(v4, 8080), TIMEOUT).unwrap();
            tx.send(()).unwrap();
            let _ = done_rx.recv_timeout(TIMEOUT);
            drop(s);
        })
        .unwrap();
    rx.recv_timeout(TIMEOUT).unwrap();
    let start = Instant::now();
    drop(tcp);
    drop(udp);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    done_tx.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn namespaces_have_no_default_route() {
    let sb = sandbox();
    for ns in [sb.client_netns(), sb.backends_netns()] {
        for family in ["-4", "-6"] {
            let out =
                run(ip_command().args([family, "-n", ns, "route", "show", "default"])).unwrap();
            assert!(
                out.trim().is_empty(),
                "{ns} has a default route ({family}): {out}"
            );
        }
        let routes = run(ip_command().args(["-4", "-n", ns, "route", "show"])).unwrap();
        for line in routes.lines() {
            assert!(
                line.starts_with("172.50.0.0/24 "),
                "{ns}: unexpected route {line}"
            );
        }
    }
}

#[test]
fn enter_cgroup_moves_process_and_guard_restores_it() {
    let sb = sandbox();
    let before = cgroup_v2_line();
    let rel = sb
        .cgroup_path()
        .strip_prefix(sb.cgroup_root())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    {
        let _guard = sb.enter_cgroup().unwrap();
        assert_eq!(cgroup_v2_line(), format!("0::/{rel}"));
        let procs = cgroup::procs(sb.cgroup_path()).unwrap();
        assert!(procs.contains(&std::process::id()), "{procs:?}");
    }
    assert_eq!(cgroup_v2_line(), before);
    assert!(cgroup::procs(sb.cgroup_path()).unwrap().is_empty());
}

#[test]
fn commands_run_in_the_namespaces_and_cgroup() {
    let sb = sandbox();
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/self/cgroup");
    sb.client_command(&mut cmd, true).unwrap();
    let out = run(&mut cmd).unwrap();
    let rel = sb.cgroup_path().strip_prefix(sb.cgroup_root()).unwrap();
    assert!(out.contains(&format!("0::/{}", rel.display())), "{out}");

    let mut cmd = ip_command();
    cmd.args(["-o", "addr", "show"]);
    sb.client_command(&mut cmd, false).unwrap();
    let out = run(&mut cmd).unwrap();
    assert!(out.contains(&format!("{CLIENT_V4}/24")), "{out}");
    assert!(out.contains("fd00:50::2/64"), "{out}");
    assert!(!out.contains(&BACKENDS_V4.to_string()), "{out}");

    let mut cmd = ip_command();
    cmd.args(["-o", "addr", "show"]);
    sb.backends_command(&mut cmd, false).unwrap();
    let out = run(&mut cmd).unwrap();
    assert!(out.contains(&format!("{BACKENDS_V4}/24")), "{out}");

    // Without join_cgroup the child stays in our cgroup.
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/self/cgroup");
    sb.client_command(&mut cmd, false).unwrap();
    assert!(run(&mut cmd).unwrap().contains(&cgroup_v2_line()));
}

#[test]
fn in_client_runs_in_the_client_ns_and_reraises_panics() {
    let sb = sandbox();
    let client_ino = fs::metadata(netns_path(sb.client_netns())).unwrap();
    let inside = sb.in_client(|| fs::metadata("/proc/thread-self/ns/net").unwrap());
    assert_eq!(inside.ino(), client_ino.ino());
    let here = fs::metadata("/proc/thread-self/ns/net").unwrap();
    assert_ne!(
        here.ino(),
        client_ino.ino(),
        "the calling thread must not change netns"
    );

    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        sb.in_backends(|| panic!("inner panic"))
    }));
    let payload = r.expect_err("panic must propagate");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"inner panic"));
}

#[test]
fn stale_leftovers_of_dead_processes_are_swept() {
    root();
    // pid_max is at most 4194304, so this pid can never be alive.
    let name = "svclb-4194305-0";
    let ns = format!("{name}-c");
    run(ip_command().args(["netns", "add", &ns])).unwrap();
    let cg = cgroup::cgroup2_mount().unwrap().join(name);
    fs::create_dir_all(&cg).unwrap();
    let sb = sandbox();
    assert!(!netns_path(&ns).exists(), "stale netns {ns} not swept");
    assert!(!cg.exists(), "stale cgroup {} not swept", cg.display());
    // Our own live sandbox is untouched by another sweep.
    let sb2 = sandbox();
    assert!(netns_path(sb.client_netns()).exists());
    drop((sb, sb2));
}

#[test]
fn drop_evacuates_processes_left_in_the_cgroup() {
    let sb = sandbox();
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    sb.client_command(&mut cmd, true).unwrap();
    let mut child = cmd.spawn().unwrap();
    let cg = sb.cgroup_path().to_path_buf();
    let deadline = Instant::now() + TIMEOUT;
    while !cgroup::procs(&cg).unwrap().contains(&child.id()) {
        assert!(
            Instant::now() < deadline,
            "child never showed up in {}",
            cg.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(sb);
    assert!(!cg.exists(), "{} left behind", cg.display());
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        still_running,
        "the child should have been moved, not killed"
    );
}
