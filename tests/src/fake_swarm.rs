//! A fake Docker engine with a swarm network on it, for the benchmark's
//! event-to-maps figures (`cargo xtask bench`): a real Swarm with 1,000 or
//! 10,000 services needs as many containers, which a small machine cannot
//! run. It speaks the part of the Engine API that `svclbd --docker` reads,
//! over a Unix socket, with HTTP/1.1 written by hand (a stand-in for the
//! engine, not product code):
//!
//! - `GET /_ping`, `GET /version` (API 1.41, as Debian's 20.10 engine);
//! - `GET /info` (cgroupfs, cgroup v2);
//! - `GET /containers/json`: no container (svclbd is given the cgroup to
//!   attach to with `--docker-cgroup-parent`); `GET /containers/{id}/json`
//!   of a task container an event announced: its service label and address;
//! - `GET /networks`: one swarm-scope overlay network;
//! - `GET /networks/{id or name}?verbose=true`: its `Services`, each with
//!   `VIP`, `LocalLBIndex` and `Tasks` (`EndpointIP`), as the engine answers;
//! - `GET /services/{name}`: 200 for a service of the network, else 404;
//! - `GET /events`: a stream kept open (chunked), one JSON object and a
//!   newline per event, with `time` and `timeNano`; `since` and filters are
//!   ignored (only container events are ever sent).
//!
//! Connections are kept alive (bollard pools them), each served on a thread
//! of its own. [`FakeSwarm::set_tasks`] replaces a service's tasks and
//! sends one `container start` event.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// One service of the network, as a verbose network inspect shows it.
#[derive(Clone, Debug)]
pub struct FakeService {
    pub vip: IpAddr,
    /// Swarm's firewall mark for the service (svclb's mark, the `FWM` number).
    pub local_lb_index: u32,
    pub tasks: Vec<IpAddr>,
}

/// When an event was sent, on both clocks.
#[derive(Clone, Copy, Debug)]
pub struct EventTime {
    /// The event's `timeNano`: Unix nanoseconds (what svclbd measures from).
    pub unix_ns: i64,
    /// CLOCK_MONOTONIC nanoseconds, read just before the `unix_ns` stamp
    /// (the clock the bench's probe reports in).
    pub monotonic_ns: u64,
}

/// The network and its services, with the verbose inspect's body cached.
struct State {
    network_name: String,
    network_id: String,
    services: BTreeMap<String, FakeService>,
    /// Each service's entry in `Services` (JSON), by name.
    entries: BTreeMap<String, String>,
    /// The whole verbose inspect body, rebuilt after a change.
    inspect: Option<Arc<Vec<u8>>>,
    /// Clients following `/events`.
    subscribers: Vec<UnixStream>,
    /// Counts task containers, for fresh IDs.
    next_task: u64,
    /// The task containers [`FakeSwarm::set_tasks`] announced: ID ->
    /// (service, address), for `GET /containers/{id}/json`.
    containers: BTreeMap<String, (String, IpAddr)>,
}

impl State {
    fn entry(&mut self, name: &str) {
        let Some(s) = self.services.get(name) else {
            self.entries.remove(name);
            return;
        };
        let mut tasks = String::new();
        for (i, ip) in s.tasks.iter().enumerate() {
            self.next_task += 1;
            if i > 0 {
                tasks.push(',');
            }
            let _ = write!(
                tasks,
                r#"{{"Name":"{name}.{}.t{:020}","EndpointID":"e{:063}","EndpointIP":"{ip}","Info":{{"Host IP":"127.0.0.1"}}}}"#,
                i + 1,
                self.next_task,
                self.next_task
            );
        }
        self.entries.insert(
            name.to_owned(),
            format!(
                r#"{{"VIP":"{}","Ports":[],"LocalLBIndex":{},"Tasks":[{tasks}]}}"#,
                s.vip, s.local_lb_index
            ),
        );
        self.inspect = None;
    }

    fn inspect_body(&mut self) -> Arc<Vec<u8>> {
        if let Some(b) = &self.inspect {
            return Arc::clone(b);
        }
        let mut body = String::with_capacity(self.entries.len() * 256 + 512);
        let _ = write!(
            body,
            r#"{{"Name":"{}","Id":"{}","Created":"2024-01-01T00:00:00Z","Scope":"swarm","Driver":"overlay","EnableIPv6":false,"IPAM":{{"Driver":"default","Options":null,"Config":[]}},"Internal":true,"Attachable":false,"Ingress":false,"ConfigFrom":{{"Network":""}},"ConfigOnly":false,"Containers":{{}},"Options":{{}},"Labels":{{}},"Peers":[],"Services":{{"#,
            self.network_name, self.network_id
        );
        for (i, (name, entry)) in self.entries.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let _ = write!(body, "\"{name}\":{entry}");
        }
        body.push_str("}}");
        let b = Arc::new(body.into_bytes());
        self.inspect = Some(Arc::clone(&b));
        b
    }
}

/// The engine; it stops serving when dropped.
pub struct FakeSwarm {
    dir: PathBuf,
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// Every connection accepted, to shut them down on drop.
    conns: Arc<Mutex<Vec<UnixStream>>>,
    requests: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FakeSwarm {
    /// Serves one swarm network (`network` named, with ID `network_id`)
    /// holding `services` (name -> VIP, LocalLBIndex, tasks) at a fresh socket.
    pub fn start(
        network: &str,
        network_id: &str,
        services: BTreeMap<String, FakeService>,
    ) -> Result<FakeSwarm> {
        let dir = std::env::temp_dir().join(format!(
            "svclb-fake-swarm-{}-{}",
            std::process::id(),
            crate::daemon::unique()
        ));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("docker.sock");
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let names: Vec<String> = services.keys().cloned().collect();
        let mut state = State {
            network_name: network.to_owned(),
            network_id: network_id.to_owned(),
            services,
            entries: BTreeMap::new(),
            inspect: None,
            subscribers: Vec::new(),
            next_task: 0,
            containers: BTreeMap::new(),
        };
        for n in &names {
            state.entry(n);
        }
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let thread = {
            let (state, stop, conns, requests) = (
                Arc::clone(&state),
                Arc::clone(&stop),
                Arc::clone(&conns),
                Arc::clone(&requests),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Ok(c) = conn.try_clone() {
                        conns.lock().unwrap().push(c);
                    }
                    let (state, requests) = (Arc::clone(&state), Arc::clone(&requests));
                    std::thread::spawn(move || {
                        let kept = conn.try_clone().ok();
                        // Closed when done, unless it became an event stream.
                        if !matches!(serve(conn, &state, &requests), Ok(true)) {
                            if let Some(c) = kept {
                                let _ = c.shutdown(std::net::Shutdown::Both);
                            }
                        }
                    });
                }
            })
        };
        Ok(FakeSwarm {
            dir,
            socket,
            state,
            stop,
            conns,
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

    /// Requests served so far (the event streams included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How many clients follow `/events` now.
    pub fn subscribers(&self) -> usize {
        self.state.lock().unwrap().subscribers.len()
    }

    /// Waits until a client follows `/events` (events sent before are lost).
    pub fn wait_for_subscriber(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while self.subscribers() == 0 {
            if Instant::now() > deadline {
                bail!("nobody followed the fake engine's /events within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Replaces `service`'s tasks and sends a `container start` event (a new
    /// task container of that service, with the first new address) and a
    /// `die` event per replaced task, stamped with the current time,
    /// which is returned. The view changes before the event goes out, as in
    /// the engine: whoever reads after the event sees the new tasks.
    pub fn set_tasks(&self, service: &str, tasks: &[IpAddr]) -> Result<EventTime> {
        let mut st = self.state.lock().unwrap();
        let Some(s) = st.services.get_mut(service) else {
            bail!("the fake swarm has no service {service:?}");
        };
        let old = std::mem::replace(&mut s.tasks, tasks.to_vec());
        st.entry(service);
        let id = st.task_container(service, tasks.first().copied());
        let monotonic_ns = svclb::rates::monotonic_ns();
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        st.send_event(&id, "start", service, unix_ns);
        // The replaced tasks' containers die (their inspect still answers,
        // as the engine's does until a container is removed).
        for addr in old.into_iter().filter(|a| !tasks.contains(a)) {
            let known = st
                .containers
                .iter()
                .find(|(_, (svc, a))| svc == service && *a == addr)
                .map(|(id, _)| id.clone());
            let id = match known {
                Some(id) => id,
                None => st.task_container(service, Some(addr)),
            };
            st.send_event(&id, "die", service, unix_ns);
        }
        Ok(EventTime {
            unix_ns,
            monotonic_ns,
        })
    }
}

impl State {
    /// A new task container of `service` with `addr`; its ID.
    fn task_container(&mut self, service: &str, addr: Option<IpAddr>) -> String {
        self.next_task += 1;
        let id = format!("{:064x}", self.next_task);
        if let Some(addr) = addr {
            self.containers
                .insert(id.clone(), (service.to_owned(), addr));
        }
        id
    }

    /// Sends one container event to every `/events` client.
    fn send_event(&mut self, id: &str, action: &str, service: &str, unix_ns: i64) {
        let event = format!(
            r#"{{"status":"{action}","id":"{id}","from":"bench:latest","Type":"container","Action":"{action}","Actor":{{"ID":"{id}","Attributes":{{"com.docker.swarm.service.name":"{service}","image":"bench:latest","name":"{service}.1.{id}"}}}},"scope":"local","time":{},"timeNano":{unix_ns}}}"#,
            unix_ns / 1_000_000_000,
        );
        let chunk = format!("{:x}\r\n{event}\n\r\n", event.len() + 1);
        self.subscribers
            .retain_mut(|s| s.write_all(chunk.as_bytes()).is_ok());
    }
}

impl Drop for FakeSwarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop up.
        drop(UnixStream::connect(&self.socket));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serves the requests of one connection until it closes (`false`) or
/// becomes an event stream, which the subscriber list then owns (`true`).
fn serve(conn: UnixStream, state: &Mutex<State>, requests: &AtomicU64) -> Result<bool> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        let request_line = line.trim_end().to_owned();
        if request_line.is_empty() {
            continue;
        }
        // The headers; requests here have no body.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                break;
            }
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("");
        let target = parts.next().unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        // Negotiated clients use /vX.Y/... paths.
        let path = match path.strip_prefix("/v") {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
                rest.find('/').map_or(path, |i| &rest[i..])
            }
            _ => path,
        };
        if method != "GET" && method != "HEAD" {
            respond(
                &mut conn,
                "405 Method Not Allowed",
                "application/json",
                br#"{"message":"the fake engine only reads"}"#,
            )?;
            continue;
        }
        if path == "/events" {
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\nServer: Docker/20.10.24 (linux)\r\nTransfer-Encoding: chunked\r\n\r\n",
            )?;
            conn.flush()?;
            state.lock().unwrap().subscribers.push(conn);
            return Ok(true);
        }
        let text = |s: &str| s.as_bytes().to_vec();
        let (status, ctype, body): (&str, &str, Vec<u8>) = match path {
            "/_ping" => ("200 OK", "text/plain; charset=utf-8", text("OK")),
            "/version" => (
                "200 OK",
                "application/json",
                text(
                    r#"{"Platform":{"Name":""},"Version":"20.10.24","ApiVersion":"1.41","MinAPIVersion":"1.12","Os":"linux","Arch":"amd64","KernelVersion":"fake"}"#,
                ),
            ),
            "/info" => (
                "200 OK",
                "application/json",
                text(
                    r#"{"ID":"fake","Containers":0,"ContainersRunning":0,"Name":"fake-swarm","ServerVersion":"20.10.24","Driver":"overlay2","CgroupDriver":"cgroupfs","CgroupVersion":"2","Swarm":{"NodeID":"fakenode","LocalNodeState":"active","ControlAvailable":true}}"#,
                ),
            ),
            "/containers/json" => ("200 OK", "application/json", text("[]")),
            "/networks" => {
                let st = state.lock().unwrap();
                (
                    "200 OK",
                    "application/json",
                    text(&format!(
                        r#"[{{"Name":"{}","Id":"{}","Created":"2024-01-01T00:00:00Z","Scope":"swarm","Driver":"overlay","EnableIPv6":false,"Internal":true,"Attachable":false,"Ingress":false,"ConfigOnly":false,"Containers":null,"Options":{{}},"Labels":{{}}}}]"#,
                        st.network_name, st.network_id
                    )),
                )
            }
            p if p.starts_with("/networks/") => {
                let id = &p["/networks/".len()..];
                let mut st = state.lock().unwrap();
                if id == st.network_id || id == st.network_name {
                    let body = st.inspect_body();
                    drop(st);
                    let body = if query.split('&').any(|kv| kv == "verbose=true") {
                        body.to_vec()
                    } else {
                        // Without verbose, the engine leaves Services out.
                        let text = String::from_utf8_lossy(&body);
                        let cut = text.find(r#","Services":"#).unwrap_or(text.len() - 1);
                        format!("{}}}", &text[..cut]).into_bytes()
                    };
                    ("200 OK", "application/json", body)
                } else {
                    (
                        "404 Not Found",
                        "application/json",
                        text(&format!(r#"{{"message":"network {id} not found"}}"#)),
                    )
                }
            }
            p if p.starts_with("/services/") => {
                let name = &p["/services/".len()..];
                if state.lock().unwrap().services.contains_key(name) {
                    (
                        "200 OK",
                        "application/json",
                        text(&format!(r#"{{"ID":"s{name}","Spec":{{"Name":"{name}"}}}}"#)),
                    )
                } else {
                    (
                        "404 Not Found",
                        "application/json",
                        text(&format!(r#"{{"message":"service {name} not found"}}"#)),
                    )
                }
            }
            p if p.starts_with("/containers/") && p.ends_with("/json") => {
                let id = &p["/containers/".len()..p.len() - "/json".len()];
                let st = state.lock().unwrap();
                match st.containers.get(id) {
                    // A task container as the engine shows it, in part; no
                    // process (PID 0), so svclbd scopes no cgroup for it.
                    Some((service, addr)) => (
                        "200 OK",
                        "application/json",
                        text(&format!(
                            r#"{{"Id":"{id}","State":{{"Status":"running","Running":true,"Pid":0}},"Config":{{"Labels":{{"com.docker.swarm.service.name":"{service}"}}}},"NetworkSettings":{{"Networks":{{"{}":{{"NetworkID":"{}","IPAddress":"{addr}"}}}}}}}}"#,
                            st.network_name, st.network_id
                        )),
                    ),
                    None => (
                        "404 Not Found",
                        "application/json",
                        text(r#"{"message":"No such container"}"#),
                    ),
                }
            }
            _ => (
                "404 Not Found",
                "application/json",
                text(r#"{"message":"page not found"}"#),
            ),
        };
        respond(&mut conn, status, ctype, &body)?;
    }
}

fn respond(conn: &mut UnixStream, status: &str, ctype: &str, body: &[u8]) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nApi-Version: 1.41\r\nServer: Docker/20.10.24 (linux)\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(socket: &Path, path: &str) -> String {
        let mut s = UnixStream::connect(socket).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: docker\r\n\r\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_the_network_and_streams_events() {
        let services = BTreeMap::from([(
            "api".to_owned(),
            FakeService {
                vip: "10.128.0.1".parse().unwrap(),
                local_lb_index: 256,
                tasks: vec!["172.50.0.100".parse().unwrap()],
            },
        )]);
        let swarm = FakeSwarm::start("benchnet", "n1", services).unwrap();
        let out = get(swarm.socket(), "/v1.41/networks/n1?verbose=true");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.contains(r#""api":{"VIP":"10.128.0.1","Ports":[],"LocalLBIndex":256"#),
            "{out}"
        );
        assert!(out.contains(r#""EndpointIP":"172.50.0.100""#), "{out}");
        let plain = get(swarm.socket(), "/networks/n1");
        assert!(
            !plain.contains("Services") && plain.ends_with('}'),
            "{plain}"
        );

        let mut events = UnixStream::connect(swarm.socket()).unwrap();
        write!(events, "GET /events HTTP/1.1\r\nHost: docker\r\n\r\n").unwrap();
        swarm.wait_for_subscriber(Duration::from_secs(5)).unwrap();
        let at = swarm
            .set_tasks("api", &["172.50.0.101".parse().unwrap()])
            .unwrap();
        events
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\n\r\n") {
            let n = events.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let got = String::from_utf8(got).unwrap();
        assert!(got.contains("Transfer-Encoding: chunked"), "{got}");
        assert!(got.contains(r#""Action":"start""#), "{got}");
        assert!(
            got.contains(&format!(r#""timeNano":{}"#, at.unix_ns)),
            "{got}"
        );
        let out = get(swarm.socket(), "/networks/benchnet?verbose=true");
        assert!(out.contains(r#""EndpointIP":"172.50.0.101""#), "{out}");
        assert!(!out.contains("172.50.0.100"), "{out}");
        assert!(get(swarm.socket(), "/services/nope").starts_with("HTTP/1.1 404"));
    }
}
