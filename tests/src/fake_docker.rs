//! A fake Docker engine on a Unix socket: it answers
//! `GET /containers/{id}/json` with a canned inspect document whose
//! `State.Pid` the test chooses, so `--container` can be tested end to end
//! on a machine without Docker.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// The engine; it stops serving when dropped.
pub struct FakeDocker {
    dir: PathBuf,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDocker {
    /// Serves `containers` (ID or name -> PID) at a fresh socket.
    pub fn start(containers: BTreeMap<String, u32>) -> Result<FakeDocker> {
        let dir = std::env::temp_dir().join(format!(
            "svclb-fake-docker-{}-{}",
            std::process::id(),
            crate::daemon::unique()
        ));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("docker.sock");
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                if req.starts_with("QUIT") {
                    break;
                }
                let path = req.split(' ').nth(1).unwrap_or("").to_owned();
                seen.lock().unwrap().push(path.clone());
                // Clients that negotiate ask /version, then use /vX.Y/... paths.
                let path = path.split('?').next().unwrap_or("");
                let unversioned = match path.strip_prefix("/v") {
                    Some(rest) => rest.find('/').map_or(path, |i| &rest[i..]),
                    None => path,
                };
                let id = unversioned
                    .strip_prefix("/containers/")
                    .and_then(|p| p.strip_suffix("/json"))
                    .unwrap_or("");
                let (status, body) = match containers.get(id) {
                    _ if unversioned == "/version" => (
                        "200 OK",
                        r#"{"Version":"20.10.24","ApiVersion":"1.41","MinAPIVersion":"1.12"}"#
                            .to_owned(),
                    ),
                    Some(pid) => (
                        "200 OK",
                        format!(
                            r#"{{"Id":"{id}","Name":"/{id}","State":{{"Status":"running","Running":true,"Pid":{pid}}}}}"#
                        ),
                    ),
                    None => (
                        "404 Not Found",
                        format!(r#"{{"message":"No such container: {id}"}}"#),
                    ),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(FakeDocker {
            dir,
            socket,
            requests,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`, for --docker-host.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The request paths served so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) {
            let _ = s.write_all(b"QUIT\r\n\r\n");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
