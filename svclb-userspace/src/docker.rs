//! Talking to the Docker Engine API, through bollard on svclbd's tokio
//! runtime: for `--container` (which PID, hence which cgroup, a container
//! has) and for `--docker` (sync/docker.rs).
//!
//! The engine is `unix://PATH` from `--docker-host` / `$DOCKER_HOST`, or
//! `/var/run/docker.sock`. The API version is negotiated (`GET /version`)
//! on every (re)connect, so Debian's engine 20.10 (API 1.41) and current
//! ones are both spoken to in a version they know.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bollard::{errors::Error as BollardError, Docker};

/// Where the engine listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Seconds for each request (the event stream excepted).
const REQUEST_TIMEOUT_SECS: u64 = 10;

/// The engine's socket from a `DOCKER_HOST`-style value (`unix://PATH`);
/// `None` gives the default socket.
pub fn socket_path(host: Option<&str>) -> Result<PathBuf> {
    match host {
        None | Some("") => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(h) => match h.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => bail!(
                "docker host {h:?} is not supported: svclb talks to the local engine, over \
                 its Unix socket (unix:///var/run/docker.sock)"
            ),
        },
    }
}

/// A client for the engine at `host` (no I/O yet: call [`negotiate`]).
/// The socket must exist (bollard checks); once made, the client outlives
/// engine restarts.
pub fn client(host: Option<&str>) -> Result<Docker> {
    let socket = socket_path(host)?;
    if !socket.exists() {
        bail!(
            "no Docker engine at {}: is dockerd running? (--docker-host or DOCKER_HOST sets the socket)",
            socket.display()
        );
    }
    let path = socket.to_string_lossy();
    Docker::connect_with_unix(&path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .with_context(|| format!("a Docker client for {path}"))
}

/// Agrees on an API version with the engine; the clones of `docker` use it
/// too. Fails when the engine does not answer.
pub async fn negotiate(docker: &Docker) -> Result<()> {
    docker
        .clone()
        .negotiate_version()
        .await
        .map_err(|e| explain(e, "asking the Docker engine for its API version"))?;
    Ok(())
}

/// An error with what was being done and, for a missing or forbidden
/// socket, what to do about it.
pub fn explain(e: BollardError, doing: &str) -> anyhow::Error {
    let text = e.to_string();
    let hint = if text.contains("No such file") || text.contains("os error 2") {
        " (no Docker engine there: is dockerd running? --docker-host sets the socket)"
    } else if text.contains("ermission denied") {
        " (run as root)"
    } else {
        ""
    };
    anyhow::anyhow!("{doing}: {text}{hint}")
}

/// Whether the engine answered 404 (no such object).
pub fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The PID of a running container's main process, by ID or name.
pub async fn container_pid(docker: &Docker, container: &str) -> Result<u32> {
    let id = check_container_ref(container)?;
    let inspect = match docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(i) => i,
        Err(e) if is_not_found(&e) => bail!("no such container {id:?} (the engine says: {e})"),
        Err(e) => {
            return Err(explain(
                e,
                &format!("asking the Docker engine about container {id}"),
            ))
        }
    };
    let state = inspect
        .state
        .with_context(|| format!("the engine's answer about {id:?} has no State"))?;
    pid_of(id, state.running, state.pid)
}

/// A container's PID, if it runs.
pub fn pid_of(id: &str, running: Option<bool>, pid: Option<i64>) -> Result<u32> {
    let pid = pid.unwrap_or(0);
    if running != Some(true) || pid <= 0 {
        bail!("container {id:?} is not running (it has no process, so no cgroup, to attach to)");
    }
    u32::try_from(pid).with_context(|| format!("container {id:?} has PID {pid}, out of range"))
}

/// Container IDs and names: `[A-Za-z0-9][A-Za-z0-9_.-]*`, a leading `/`
/// (as `docker inspect` shows names) dropped. Nothing else reaches a URL.
pub fn check_container_ref(container: &str) -> Result<&str> {
    let id = container.strip_prefix('/').unwrap_or(container);
    let valid = !id.is_empty()
        && id.len() <= 255
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !valid {
        bail!("{container:?} is not a container ID or name");
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_refs() {
        assert_eq!(check_container_ref("/api.1.xyz").unwrap(), "api.1.xyz");
        assert!(check_container_ref("a/../b").is_err());
        assert!(check_container_ref("a b").is_err());
        assert!(check_container_ref("").is_err());
        assert!(check_container_ref("-x").is_err());
    }

    #[test]
    fn docker_host() {
        assert_eq!(
            socket_path(None).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_path(Some("unix:///tmp/d.sock")).unwrap(),
            PathBuf::from("/tmp/d.sock")
        );
        let e = socket_path(Some("tcp://1.2.3.4:2375"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn pids() {
        assert_eq!(pid_of("a", Some(true), Some(4242)).unwrap(), 4242);
        let e = pid_of("a", Some(false), Some(0)).unwrap_err().to_string();
        assert!(e.contains("not running"), "{e}");
    }

    #[test]
    fn a_missing_engine_is_named() {
        let e = format!(
            "{:#}",
            client(Some("unix:///nonexistent/docker.sock")).unwrap_err()
        );
        assert!(
            e.contains("no Docker engine at /nonexistent/docker.sock"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_engine_that_does_not_answer_is_named() {
        // A socket nobody accepts on.
        let dir = std::env::temp_dir().join(format!("svclb-docker-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let docker = client(Some(&format!("unix://{}", path.display()))).unwrap();
        let e = format!("{:#}", negotiate(&docker).await.unwrap_err());
        assert!(e.contains("API version"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
