//! svclb-runc: the OCI runtime Docker runs containers with in svclb's
//! strict scoping (see svclb::runtime). It is runc, and one thing more:
//! once `runc create` has made a container's init (in its cgroup, its
//! networks joined, the user's program not started), it tells svclbd and
//! waits for svclbd to have written the container's networks, so the
//! container is scoped from its first instruction.
//!
//! Called exactly like runc by containerd's shim, with its own options
//! first (Docker's `runtimeArgs`):
//!   svclb-runc [--svclb-socket=PATH] [--svclb-runc=PATH] <runc's arguments>
//! Every command but `create` becomes the real runc (exec). `create` runs
//! runc as a child; then the announcement, for at most 5 s; then it exits
//! with runc's status. When svclbd cannot be reached or does not answer,
//! the container starts anyway (it is scoped at svclbd's next resync): a
//! balancer that is down must not stop containers from starting. That is
//! logged to syslog, not to stderr, which during `create` is the
//! container's own (it would show in `docker logs`).

use std::ffi::CString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{exit, Command, ExitStatus};

use anyhow::{bail, Context, Result};
use svclb::runtime::{self, Announce, Answer};

/// svclb-runc's own options, taken off before runc sees the arguments.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    socket: PathBuf,
    runc: Option<PathBuf>,
}

/// runc's global options that take a value (`--root X` or `--root=X`).
const RUNC_VALUED: [&str; 5] = ["root", "log", "log-format", "criu", "rootless"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(code) => exit(code),
        Err(e) => {
            // Before runc ran: the shim shows this in the start's error.
            eprintln!("svclb-runc: {e:#}");
            exit(2);
        }
    }
}

fn run(args: Vec<String>) -> Result<i32> {
    let (options, runc_args) = split_options(args)?;
    let runc = real_runc(options.runc.as_deref())?;
    if subcommand(&runc_args) != Some("create") {
        let e = Command::new(&runc).args(&runc_args).exec();
        bail!("executing {}: {e}", runc.display());
    }
    let status = run_child(&runc, &runc_args)?;
    if status.success() {
        if let Err(e) = announce(&options.socket, &runc_args) {
            syslog(&format!(
                "container starts unscoped (svclbd scopes it at its next resync): {e:#}"
            ));
        }
    }
    Ok(exit_code(status))
}

/// Takes the leading `--svclb-*` options off the arguments.
fn split_options(args: Vec<String>) -> Result<(Options, Vec<String>)> {
    let mut options = Options {
        socket: PathBuf::from(runtime::DEFAULT_SOCKET),
        runc: None,
    };
    let mut rest = args.into_iter().peekable();
    while let Some(arg) = rest.next_if(|a| a.starts_with("--svclb-")) {
        let (name, value) = arg.split_once('=').with_context(|| {
            format!("{arg}: svclb-runc's options are written --svclb-NAME=VALUE")
        })?;
        if value.is_empty() {
            bail!("{name} needs a value");
        }
        match name {
            "--svclb-socket" => options.socket = PathBuf::from(value),
            "--svclb-runc" => options.runc = Some(PathBuf::from(value)),
            _ => bail!("unknown option {name} (svclb-runc knows --svclb-socket and --svclb-runc)"),
        }
    }
    Ok((options, rest.collect()))
}

/// runc's command: the first argument that is neither a global option nor
/// the value of one.
fn subcommand(args: &[String]) -> Option<&str> {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            return Some(a);
        };
        if RUNC_VALUED.contains(&flag) {
            i += 1;
        }
        i += 1;
    }
    None
}

/// The value of option `name` (`--name X`, `-name X`, `--name=X`).
fn option_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            continue;
        };
        if flag == name {
            return it.next().map(String::as_str);
        }
        if let Some(v) = flag.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// The real runc: `--svclb-runc`, else `runc` on PATH, /usr/sbin/runc or
/// /usr/bin/runc, never svclb-runc itself (installed as `runc`, say).
fn real_runc(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--svclb-runc={}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().and_then(|p| p.canonicalize()).ok();
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("runc"))
        .chain(["/usr/sbin/runc", "/usr/bin/runc"].map(PathBuf::from))
        .find(|p| p.is_file() && p.canonicalize().ok() != me)
        .context("no runc found (on PATH, /usr/sbin/runc, /usr/bin/runc): install runc or give --svclb-runc=PATH")
}

/// runc as a child, with our stdio and descriptors (the container's); it
/// dies with us if the shim kills us.
fn run_child(runc: &Path, args: &[String]) -> Result<ExitStatus> {
    let mut cmd = Command::new(runc);
    cmd.args(args);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.status()
        .with_context(|| format!("running {}", runc.display()))
}

/// Tells svclbd about the container `runc create` just made.
fn announce(socket: &Path, args: &[String]) -> Result<()> {
    let container = args
        .last()
        .filter(|a| !a.starts_with('-'))
        .context("runc create was given no container ID")?;
    let pid_file = option_value(args, "pid-file")
        .context("runc create was given no --pid-file: the container's init is unknown")?;
    let text = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading the pid file {pid_file}"))?;
    let pid = text
        .trim()
        .parse()
        .with_context(|| format!("the pid file {pid_file} holds {:?}", text.trim()))?;
    let what = Announce {
        container: container.clone(),
        pid,
    };
    match runtime::announce(socket, &what, runtime::ANSWER_WITHIN)? {
        Answer::Scoped(_) => Ok(()),
        Answer::Error(why) => bail!("svclbd: {why}"),
    }
}

/// The status a shell would give: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn syslog(msg: &str) {
    let ident = c"svclb-runc";
    let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: NUL-terminated strings that outlive the calls; "%s" takes one.
    unsafe {
        libc::openlog(ident.as_ptr(), libc::LOG_PID, libc::LOG_DAEMON);
        libc::syslog(libc::LOG_WARNING, c"%s".as_ptr(), text.as_ptr());
        libc::closelog();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_shims_create_is_understood() {
        let (options, rest) = split_options(strings(&[
            "--svclb-socket=/run/x.sock",
            "--root",
            "/run/docker/runtime-runc/moby",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "abc",
        ]))
        .unwrap();
        assert_eq!(options.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(rest[0], "--root");
        assert_eq!(subcommand(&rest), Some("create"));
        assert_eq!(option_value(&rest, "pid-file"), Some("/b/init.pid"));
        let eq = strings(&["--systemd-cgroup", "--root=/r", "start", "abc"]);
        assert_eq!(subcommand(&eq), Some("start"));
        assert_eq!(option_value(&eq, "root"), Some("/r"));
        assert_eq!(subcommand(&strings(&["--version"])), None);
    }

    #[test]
    fn bad_options_are_named() {
        let err = |a: &[&str]| split_options(strings(a)).unwrap_err().to_string();
        assert!(err(&["--svclb-sock=/x", "state", "a"]).contains("--svclb-sock"));
        assert!(err(&["--svclb-socket", "/x"]).contains("--svclb-NAME=VALUE"));
        assert!(err(&["--svclb-socket="]).contains("needs a value"));
    }
}
