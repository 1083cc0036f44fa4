//! Strict scoping: svclb-runc, the OCI runtime Docker is told to run
//! containers with, announces each container once `runc create` has made
//! its init process (in the container's cgroup, its networks joined by
//! Docker's prestart hook, the user's program not yet started), and holds
//! the start until svclbd has written that cgroup's networks. A Docker
//! event cannot do this: events are asynchronous, and a container's first
//! instruction may run before any of them reaches svclbd.
//!
//! The protocol, over a Unix stream socket (mode 0600, root's): one JSON
//! line each way, `{"container":"<id>","pid":<init pid>}` from svclb-runc,
//! then `{"scoped":["<network>",...]}` or `{"error":"<why>"}` from svclbd.
//! svclbd never asks the engine about the container on this path: dockerd
//! holds the container's lock while it starts it, so an inspect would wait
//! for the very start it is holding.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::cgroup::CgroupPath;

/// Where svclbd listens and svclb-runc connects, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/svclb/runtime.sock";
/// How long svclb-runc holds a container's start for svclbd's answer;
/// past it the container starts anyway (and is scoped at the next resync).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The longest announcement line svclbd reads.
const MAX_LINE: u64 = 4096;

/// What svclb-runc tells svclbd: a container and its init process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub container: String,
    pub pid: u32,
}

/// svclbd's answer: the swarm networks written for the container's cgroup
/// (none: it sees no swarm service), or why nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Scoped(Vec<String>),
    Error(String),
}

impl Announce {
    /// A container ID as runc takes it ([A-Za-z0-9_.-], Docker's are 64
    /// hex digits) and a process that can be a container's init.
    pub fn check(&self) -> Result<()> {
        let id = &self.container;
        if id.is_empty()
            || id.len() > 1024
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            bail!("container ID {id:?} is not a runc container ID ([A-Za-z0-9_.-])");
        }
        if self.pid <= 1 {
            bail!("pid {} cannot be a container's init process", self.pid);
        }
        Ok(())
    }
}

/// Tells svclbd at `socket` about a created container and waits for its
/// answer, `within` in all (svclb-runc's side).
pub fn announce(socket: &Path, what: &Announce, within: Duration) -> Result<Answer> {
    let deadline = Instant::now() + within;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .context("svclbd did not answer in time")
    };
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to svclbd at {}", socket.display()))?;
    stream.set_write_timeout(Some(left()?))?;
    let mut line = serde_json::to_vec(what)?;
    line.push(b'\n');
    stream.write_all(&line).context("sending to svclbd")?;
    stream.set_read_timeout(Some(left()?))?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE))
        .read_line(&mut answer)
        .context("reading svclbd's answer")?;
    serde_json::from_str(answer.trim()).with_context(|| {
        format!(
            "svclbd's answer {:?} is not one svclb-runc knows",
            answer.trim()
        )
    })
}

/// What svclbd reads of a container's init, from /proc (no engine call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitFacts {
    /// The container's cgroup (the init's).
    pub cgroup_id: u64,
    /// The addresses of its interfaces; none when `host_network`.
    pub addresses: Vec<IpAddr>,
    /// It shares svclbd's network namespace (`--network host`).
    pub host_network: bool,
}

/// Reads `pid`'s cgroup and, in a thread that enters its network
/// namespace, its interfaces' addresses.
pub fn read_init(pid: u32) -> Result<InitFacts> {
    let cgroup_id = CgroupPath::of_pid(pid)?.id()?;
    let path = format!("/proc/{pid}/ns/net");
    let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
    let own = fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let theirs = netns.metadata()?;
    if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
        return Ok(InitFacts {
            cgroup_id,
            addresses: Vec::new(),
            host_network: true,
        });
    }
    let addresses = crate::netns::in_netns(&netns, crate::netns::interface_addresses)??;
    Ok(InitFacts {
        cgroup_id,
        addresses,
        host_network: false,
    })
}

/// An announced container, handed to svclbd's loop, which writes its scope
/// and answers on `reply`.
#[derive(Debug)]
pub struct Created {
    pub container: String,
    pub init: InitFacts,
    /// When svclb-runc connected.
    pub received: Instant,
    pub reply: oneshot::Sender<Answer>,
}

/// svclbd's listening socket; the file is removed on drop.
#[derive(Debug)]
pub struct RuntimeSocket {
    path: PathBuf,
}

impl RuntimeSocket {
    /// Listens at `path` (its directory made if missing), root's alone. A
    /// socket left by an svclbd that is gone is replaced; one another
    /// svclbd still serves is not.
    pub fn bind(path: &Path) -> Result<(RuntimeSocket, tokio::net::UnixListener)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    bail!(
                        "{} is served by another process (another svclbd?)",
                        path.display()
                    );
                }
                fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Ok(_) => bail!(
                "{} exists and is not a socket: --runtime-socket must name a socket path",
                path.display()
            ),
            Err(_) => {}
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let socket = RuntimeSocket {
            path: path.to_path_buf(),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        Ok((socket, listener))
    }
}

impl Drop for RuntimeSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Accepts svclb-runc's announcements: each connection is read, its
/// container's init looked at, and handed to svclbd's loop on `tx`; the
/// loop's answer goes back.
pub fn serve(listener: tokio::net::UnixListener, tx: mpsc::Sender<Created>) {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(one_announcement(stream, tx.clone()));
                }
                Err(e) => {
                    warn!("runtime socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

async fn one_announcement(stream: tokio::net::UnixStream, tx: mpsc::Sender<Created>) {
    let received = Instant::now();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_LINE));
    let read_line = reader.read_line(&mut line);
    let (container, answer) = match tokio::time::timeout(ANSWER_WITHIN, read_line).await {
        Ok(Ok(_)) => match serde_json::from_str::<Announce>(line.trim()) {
            Ok(a) => {
                let answer = match a.check() {
                    Ok(()) => scope(&a, received, tx).await,
                    Err(e) => Answer::Error(format!("{e:#}")),
                };
                (a.container, answer)
            }
            Err(e) => (
                String::new(),
                Answer::Error(format!("not an announcement ({e}): {:?}", line.trim())),
            ),
        },
        Ok(Err(e)) => (String::new(), Answer::Error(format!("reading: {e}"))),
        Err(_) => (String::new(), Answer::Error("nothing was sent".to_owned())),
    };
    let mut text = serde_json::to_vec(&answer).unwrap_or_default();
    text.push(b'\n');
    let sent = write.write_all(&text).await;
    let held_ms = (received.elapsed().as_secs_f64() * 1e4).round() / 10.0;
    let short = &container[..container.len().min(12)];
    match (&answer, sent) {
        (Answer::Scoped(networks), Ok(())) => {
            info!(
                container = short,
                ?networks,
                held_ms,
                "scoped before its first instruction"
            )
        }
        (Answer::Scoped(_), Err(e)) => {
            warn!(
                container = short,
                "scoped, but svclb-runc is gone ({e}): it gave up waiting"
            )
        }
        (Answer::Error(why), _) => warn!(
            container = short,
            held_ms, "svclb-runc's announcement not taken, the container starts unscoped: {why}"
        ),
    }
}

/// Reads the container's init, then has svclbd's loop write its scope.
async fn scope(a: &Announce, received: Instant, tx: mpsc::Sender<Created>) -> Answer {
    let pid = a.pid;
    let init = match tokio::task::spawn_blocking(move || read_init(pid)).await {
        Ok(Ok(init)) => init,
        Ok(Err(e)) => return Answer::Error(format!("reading process {pid}: {e:#}")),
        Err(e) => return Answer::Error(format!("reading process {pid}: {e}")),
    };
    let read_ms = (received.elapsed().as_secs_f64() * 1e4).round() / 10.0;
    debug!(container = %a.container, ?init, read_ms, "announced by svclb-runc");
    let (reply, answer) = oneshot::channel();
    let created = Created {
        container: a.container.clone(),
        init,
        received,
        reply,
    };
    if tx.send(created).await.is_err() {
        return Answer::Error("svclbd is stopping".to_owned());
    }
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Answer::Error("svclbd dropped the announcement".to_owned()),
        Err(_) => Answer::Error(format!("svclbd was busy for {ANSWER_WITHIN:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_one_json_line_each_way() {
        let a = Announce {
            container: "ab12".to_owned(),
            pid: 42,
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"container":"ab12","pid":42}"#
        );
        assert_eq!(
            serde_json::to_string(&Answer::Scoped(vec!["backend".to_owned()])).unwrap(),
            r#"{"scoped":["backend"]}"#
        );
        assert_eq!(
            serde_json::from_str::<Answer>(r#"{"error":"x"}"#).unwrap(),
            Answer::Error("x".to_owned())
        );
    }

    #[test]
    fn bad_announcements_say_what_is_wrong() {
        let bad = |container: &str, pid| {
            Announce {
                container: container.to_owned(),
                pid,
            }
            .check()
            .unwrap_err()
            .to_string()
        };
        assert!(bad("", 42).contains("container ID"));
        assert!(bad("../x", 42).contains("\"../x\""));
        assert!(bad("ab12", 1).contains("pid 1"));
        assert!(Announce {
            container: "ab12".to_owned(),
            pid: 42
        }
        .check()
        .is_ok());
    }

    #[tokio::test]
    async fn an_announcement_is_answered_from_svclbds_loop() {
        let dir = std::env::temp_dir().join(format!("svclb-runtime-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("runtime.sock");
        let (socket, listener) = RuntimeSocket::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second svclbd does not take the socket over.
        assert!(RuntimeSocket::bind(&path)
            .unwrap_err()
            .to_string()
            .contains("another"));
        let (tx, mut rx) = mpsc::channel(1);
        serve(listener, tx);
        // The loop: this process stands for the container's init.
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                assert!(!c.init.host_network || c.init.addresses.is_empty());
                let _ = c.reply.send(Answer::Scoped(vec![c.container]));
            }
        });
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            announce(
                &p,
                &Announce {
                    container: "c1".to_owned(),
                    pid: std::process::id(),
                },
                ANSWER_WITHIN,
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(answer, Answer::Scoped(vec!["c1".to_owned()]));
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            announce(
                &p,
                &Announce {
                    container: "c/1".to_owned(),
                    pid: 42,
                },
                ANSWER_WITHIN,
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert!(matches!(answer, Answer::Error(e) if e.contains("c/1")));
        drop(socket);
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
