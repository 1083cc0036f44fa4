//! What svclbd runs with and what others can do to it: its capabilities,
//! the pin directory's permissions, the metrics endpoint, and a root
//! process without BPF capabilities in an attached cgroup.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use svclb_tests::{daemon::bin, http, PinDir};

/// The capabilities svclbd keeps (README, "Security"), as bit numbers.
const KEPT: [(u32, &str); 5] = [
    (19, "cap_sys_ptrace"),
    (21, "cap_sys_admin"),
    (12, "cap_net_admin"),
    (38, "cap_perfmon"),
    (39, "cap_bpf"),
];

fn status_field(pid: u32, field: &str) -> String {
    svclb_tests::util::proc_status(pid, field).unwrap()
}

fn capability_bits(hex: &str) -> u64 {
    u64::from_str_radix(hex, 16).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `setpriv` runs `cmd` as root without the capabilities in `drop` (taken
/// out of the bounding set, so root's exec does not get them).
fn without_caps(drop: &str, cmd: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--bounding-set={drop}"))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(cmd);
    c
}

#[test]
fn svclbd_without_its_capabilities_refuses_to_start_naming_them() {
    let pins = PinDir::new();
    let out = without_caps("-bpf,-sys_admin", &bin("svclbd"))
        .arg("--pin-dir")
        .arg(pins.path())
        .arg("--no-metrics")
        .output()
        .expect("setpriv runs svclbd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for cap in ["CAP_BPF", "CAP_SYS_ADMIN"] {
        assert!(stderr.contains(cap), "names {cap}: {stderr}");
    }
    assert!(
        !stderr.contains("CAP_NET_ADMIN"),
        "names only what is missing: {stderr}"
    );
    assert!(!pins.path().exists(), "touched nothing: {stderr}");
}

#[test]
fn svclbd_keeps_only_the_capabilities_it_needs_and_its_pins_are_private() {
    let fx = ApiFixture::start();
    let pid = fx.daemon.as_ref().unwrap().pid();
    let want: u64 = KEPT.iter().fold(0, |m, (bit, _)| m | 1 << bit);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let got = capability_bits(&status_field(pid, set));
        assert_eq!(got, want, "{set} {got:#x}: only {:?}", KEPT.map(|(_, n)| n));
    }
    assert_eq!(capability_bits(&status_field(pid, "CapInh")), 0);
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    let root = fx.pins.path();
    assert_eq!(mode(root), 0o700, "pin directory");
    assert_eq!(mode(&root.join("links")), 0o700, "links directory");
    let mut pinned = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(mode(&path) & 0o077, 0, "{} is root's only", path.display());
            pinned += 1;
        }
    }
    assert!(pinned >= 10, "the maps are pinned there: {pinned}");
    // Another user cannot even look inside.
    let listed = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(root)
        .output()
        .unwrap();
    assert!(!listed.status.success(), "nobody lists the pins");
}

#[test]
fn the_metrics_endpoint_serves_only_metrics() {
    let fx = ApiFixture::start();
    let daemon = fx.daemon.as_ref().unwrap();
    let at = daemon.metrics_addr().expect("metrics served");
    assert!(at.ip().is_loopback(), "loopback by default: {at}");
    let (code, body) = http::get(at, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("svclb_"), "{body}");
    for path in ["/", "/debug", "/metrics/../etc/passwd", "/pins"] {
        let (code, body) = http::get(at, path).unwrap();
        assert_eq!(code, 404, "{path}: {body}");
        assert!(!body.contains("svclb_"), "{path}: {body}");
    }
}

/// Runs `cmd` the way a container's root runs: uid 0 without CAP_BPF,
/// CAP_SYS_ADMIN, CAP_PERFMON or CAP_NET_ADMIN (Docker gives none of them),
/// in a mount namespace of its own that has no bpffs (Docker mounts none).
fn as_container_root(cmd: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "umount -l /sys/fs/bpf && exec setpriv --bounding-set=-bpf,-sys_admin,-perfmon,-net_admin --inh-caps=-all -- \"$@\"",
        )
        .arg("sh")
        .arg(cmd);
    c
}

/// A process in an attached cgroup that is root in the way a container's
/// root is cannot read the counters nor change the maps, even knowing
/// where they are pinned, nor mount a bpffs to find them. (With the host's
/// bpffs and uid 0, the pins' owner, it could: the kernel checks no
/// capability to open a pin; the mount namespace is what keeps it out.)
#[test]
fn a_container_root_can_neither_read_nor_change_the_maps() {
    let fx = ApiFixture::start();
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    let before = fx.pins.ctl(&["list"]).unwrap();
    let replacement = svclb_tests::daemon::write_temp(
        "hostile.toml",
        "[[service]]\nname = \"api\"\nvip = \"172.50.0.37\"\nmark = 0x13d\nbackends = [\"172.50.0.99\"]\n",
    )
    .unwrap();
    for args in [
        vec!["stats"],
        vec!["list", "--json"],
        vec!["apply", replacement.to_str().unwrap()],
    ] {
        let out = as_container_root(&bin("svclb-ctl"))
            .arg("--pin-dir")
            .arg(fx.pins.path())
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "svclb-ctl {args:?} was refused: {stderr}"
        );
        assert!(
            stderr.contains(&fx.pins.path().display().to_string()),
            "svclb-ctl {args:?}: names the pins it cannot reach: {stderr}"
        );
    }
    // Its teardown finds nothing to tear down.
    let _ = as_container_root(&bin("svclb-ctl"))
        .arg("--pin-dir")
        .arg(fx.pins.path())
        .arg("teardown")
        .output()
        .unwrap();
    let mountpoint = tempdir_path("bpffs");
    let mount = as_container_root(Path::new("mount"))
        .args(["-t", "bpf", "bpf"])
        .arg(&mountpoint)
        .output()
        .unwrap();
    assert!(
        !mount.status.success(),
        "no bpffs of its own: {}",
        String::from_utf8_lossy(&mount.stderr)
    );
    let _ = std::fs::remove_dir(&mountpoint);
    assert_eq!(
        fx.pins.ctl(&["list"]).unwrap(),
        before,
        "the maps are unchanged"
    );
    // And the balancing still works.
    let spread = fx.tcp_spread(addr(VIP, PORT), 20, true);
    assert_eq!(spread.values().sum::<usize>(), 20, "{spread:?}");
}

fn tempdir_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("svclb-security-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
