//! Asking the Docker Engine API which PID a container's process has, so
//! that svclb can attach to the container's cgroup.
//!
//! One request, `GET /containers/{id}/json` (the unversioned path: the
//! engine answers with its own API version; only `State.Pid` and
//! `State.Running` are read, which every API version has), over the
//! engine's Unix socket: `/var/run/docker.sock`, or `unix://PATH` from
//! `--docker-host` / `$DOCKER_HOST`.
//!
//! The HTTP/1.1 exchange is written here rather than pulled in with an
//! HTTP stack: one GET with `Connection: close`, and a response parser for
//! the two body framings an engine uses (`Content-Length`, and `chunked`,
//! which Go's server picks for bodies past its buffer), bounded in size
//! and time. It is unit-tested against canned responses and a fake engine.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where the engine listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Longest response accepted.
const MAX_RESPONSE: usize = 16 << 20;
/// For connecting, writing and each read.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The PID of a running container's main process, by ID or name.
pub fn container_pid(socket: &Path, container: &str) -> Result<u32> {
    let id = check_container_ref(container)?;
    let (status, body) = get(socket, &format!("/containers/{id}/json")).with_context(|| {
        format!(
            "asking the Docker engine at {} about container {id}",
            socket.display()
        )
    })?;
    pid_from_inspect(id, status, &body)
}

/// Container IDs and names: `[A-Za-z0-9][A-Za-z0-9_.-]*`, a leading `/`
/// (as `docker inspect` shows names) dropped. Nothing else can reach the
/// request line.
fn check_container_ref(container: &str) -> Result<&str> {
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

/// Reads `State.Pid` from an inspect response.
pub fn pid_from_inspect(id: &str, status: u16, body: &[u8]) -> Result<u32> {
    let json: serde_json::Value = serde_json::from_slice(body).ok().unwrap_or_default();
    let message = json
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_owned();
    match status {
        200 => {}
        404 => bail!("no such container {id:?} (the engine says: {message})"),
        _ => bail!("the Docker engine answered HTTP {status} about container {id:?}: {message}"),
    }
    let state = json
        .get("State")
        .with_context(|| format!("the engine's answer about {id:?} has no State"))?;
    let running = state.get("Running").and_then(|r| r.as_bool()) == Some(true);
    let pid = state.get("Pid").and_then(|p| p.as_u64()).unwrap_or(0);
    if !running || pid == 0 {
        bail!("container {id:?} is not running (it has no process, so no cgroup, to attach to)");
    }
    u32::try_from(pid).with_context(|| format!("container {id:?} has PID {pid}, out of range"))
}

/// One `GET` with `Connection: close`; returns the status and the body.
fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                " (no Docker engine there: is dockerd running? --docker-host sets the socket)"
            }
            std::io::ErrorKind::PermissionDenied => " (run as root)",
            _ => "",
        };
        anyhow::anyhow!("connecting to {}: {e}{hint}", socket.display())
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: svclb/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).context("reading the response")?;
        if n == 0 {
            return parse_response(&buf, true)?
                .context("the engine closed the connection mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            bail!("the response is larger than {MAX_RESPONSE} bytes");
        }
        if let Some(done) = parse_response(&buf, false)? {
            return Ok(done);
        }
    }
}

/// Parses an HTTP/1.1 response. `Ok(None)`: incomplete so far (and the
/// connection is still open, `eof` false).
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if eof {
            bail!("the response ended inside its headers");
        }
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).context("the response headers are not text")?;
    let body = &buf[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    if chunked {
        return match dechunk(body)? {
            Some(body) => Ok(Some((status, body))),
            None if eof => bail!("the chunked body ended early"),
            None => Ok(None),
        };
    }
    match length {
        Some(n) if body.len() >= n => Ok(Some((status, body[..n].to_vec()))),
        Some(n) if eof => bail!("the body ended after {} of {n} bytes", body.len()),
        Some(_) => Ok(None),
        // No framing: the body runs to the end of the connection.
        None if eof => Ok(Some((status, body.to_vec()))),
        None => Ok(None),
    }
}

/// Decodes a chunked body; `Ok(None)` until the last chunk is in.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[..line_end]).context("bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, if any, end with an empty line; they are not needed.
            return Ok(Some(out));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        if &data[size..size + 2] != b"\r\n" {
            bail!("a chunk does not end with CRLF");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const INSPECT: &str = r#"{"Id":"4f66ad9a0b2e","Name":"/api.1.xyz","State":{"Status":"running","Running":true,"Paused":false,"Pid":4242,"ExitCode":0},"Config":{"Hostname":"4f66ad9a0b2e"}}"#;

    fn with_length(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nApi-Version: 1.45\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn chunked(body: &str) -> String {
        let (a, b) = body.split_at(body.len() / 3);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
    }

    #[test]
    fn content_length_response() {
        let raw = with_length("200 OK", INSPECT);
        let (status, body) = parse_response(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(pid_from_inspect("api", status, &body).unwrap(), 4242);
        // Any prefix is incomplete, not an error.
        for cut in [10, raw.len() / 2, raw.len() - 1] {
            assert!(parse_response(&raw.as_bytes()[..cut], false)
                .unwrap()
                .is_none());
        }
        assert!(parse_response(&raw.as_bytes()[..raw.len() - 1], true).is_err());
    }

    #[test]
    fn chunked_response() {
        let raw = chunked(INSPECT);
        let (status, body) = parse_response(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!((status, body.as_slice()), (200, INSPECT.as_bytes()));
        assert!(parse_response(&raw.as_bytes()[..raw.len() - 7], false)
            .unwrap()
            .is_none());
        assert!(parse_response(&raw.as_bytes()[..raw.len() - 7], true).is_err());
    }

    #[test]
    fn unframed_response_runs_to_eof() {
        let raw = format!("HTTP/1.0 200 OK\r\n\r\n{INSPECT}");
        assert!(parse_response(raw.as_bytes(), false).unwrap().is_none());
        let (_, body) = parse_response(raw.as_bytes(), true).unwrap().unwrap();
        assert_eq!(body, INSPECT.as_bytes());
    }

    #[test]
    fn errors_are_named() {
        let e = pid_from_inspect("nope", 404, br#"{"message":"No such container: nope"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no such container \"nope\"") && e.contains("No such container: nope"),
            "{e}"
        );
        let e = pid_from_inspect("api", 500, br#"{"message":"boom"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 500") && e.contains("boom"), "{e}");
        let stopped = INSPECT
            .replace(r#""Running":true"#, r#""Running":false"#)
            .replace("4242", "0");
        let e = pid_from_inspect("api", 200, stopped.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not running"), "{e}");
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", true).is_err());
    }

    #[test]
    fn container_refs() {
        assert_eq!(check_container_ref("/api.1.xyz").unwrap(), "api.1.xyz");
        assert_eq!(check_container_ref("4f66ad9a0b2e").unwrap(), "4f66ad9a0b2e");
        for bad in ["", "/", "../x", "a/b", "a b", "a?x=1", "-a", "a\r\nHost: x"] {
            assert!(check_container_ref(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn docker_host() {
        assert_eq!(socket_path(None).unwrap(), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            socket_path(Some("unix:///run/user/1000/docker.sock")).unwrap(),
            PathBuf::from("/run/user/1000/docker.sock")
        );
        let e = socket_path(Some("tcp://10.0.0.1:2375"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
    }

    /// A fake engine on a Unix socket: checks the request line and answers.
    #[test]
    fn talks_to_a_fake_engine() {
        let dir = std::env::temp_dir().join(format!("svclb-docker-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for answer in [
                chunked(INSPECT),
                with_length("404 Not Found", r#"{"message":"No such container: gone"}"#),
            ] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while find(&req, b"\r\n\r\n").is_none() {
                    let n = conn.read(&mut b).unwrap();
                    req.extend_from_slice(&b[..n]);
                }
                requests.push(String::from_utf8(req).unwrap());
                // Written in pieces, as a real server may.
                for piece in answer.as_bytes().chunks(7) {
                    conn.write_all(piece).unwrap();
                }
            }
            requests
        });
        assert_eq!(container_pid(&socket, "/api.1.xyz").unwrap(), 4242);
        let e = container_pid(&socket, "gone").unwrap_err();
        assert!(
            format!("{e:#}").contains("no such container \"gone\""),
            "{e:#}"
        );
        let requests = server.join().unwrap();
        assert!(
            requests[0].starts_with("GET /containers/api.1.xyz/json HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
        assert!(requests[0].contains("\r\nHost: docker\r\n"));
        assert!(requests[0].contains("\r\nConnection: close\r\n"));
        let e = container_pid(&dir.join("none.sock"), "api").unwrap_err();
        assert!(format!("{e:#}").contains("no Docker engine there"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
