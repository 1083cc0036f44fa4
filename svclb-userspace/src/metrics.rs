//! Prometheus metrics at `/metrics`, read from the pinned maps at each
//! scrape. Names follow node_exporter's IPVS collector with an `svclb_`
//! prefix, and the labels are the ones its dashboards use (local_address,
//! local_port, remote_address, remote_port, proto, local_mark) plus
//! `service`; unlike node_exporter, packets and bytes are per backend too.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::{
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, GaugeVec, Opts, Registry, TextEncoder};
use svclb_common::BackendStats;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::{
    dataplane::{Dataplane, Wanted},
    pins::PinDir,
    stats,
    sync::dns::{Role, ServiceStatus, StatusHandle},
};

/// Extra gauges other parts of svclbd publish (e.g. DNS discovery state),
/// rendered after the data-plane metrics.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Renders the metrics text for the maps pinned at `pins`, whole. Every
/// family is written straight into the text rather than through a
/// `prometheus` registry, whose per-series bookkeeping made a scrape of
/// 100,000 services take seconds and gigabytes.
pub fn render(pins: &PinDir) -> Result<String> {
    let services = read(pins)?;
    let mut text = String::new();
    render_into(&mut text, &services, &mut |_| true);
    Ok(text)
}

/// Every service with every figure, from the maps pinned at `pins`.
fn read(pins: &PinDir) -> Result<Vec<stats::ServiceReport>> {
    stats::collect(&Dataplane::open(pins)?, Wanted::ALL)
}

/// A scrape is handed to its reader in pieces of about this size: at
/// 100,000 services the text is over 300 MB, and a piece goes out while
/// the next is written rather than after the whole is.
const PIECE: usize = 256 * 1024;

/// Takes what has been written so far (a scrape's: sends it on and empties
/// `text`; a whole render's: keeps it); false when the reader has gone.
type Flush<'a> = &'a mut dyn FnMut(&mut String) -> bool;

/// Writes the text of `services` into `text`, flushed every [`PIECE`]
/// and at the end; false if the reader went away.
fn render_into(text: &mut String, services: &[stats::ServiceReport], flush: Flush) -> bool {
    write_totals(text, services);
    write_service_families(text, services, flush) && write_backend_families(text, services, flush)
}

/// Flushes `text` once it holds a piece.
fn piece(text: &mut String, flush: Flush) -> bool {
    text.len() < PIECE || flush(text)
}

/// A family's `# HELP` and `# TYPE` lines.
fn family_header(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A mark as `{:08X}` writes it.
fn push_mark(text: &mut String, mark: u32) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for shift in (0..8).rev() {
        text.push(HEX[(mark >> (shift * 4)) as usize & 0xf] as char);
    }
}

/// ` VALUE` and the end of a line.
fn push_value(text: &mut String, v: u64) {
    text.push(' ');
    stats::push_num(text, v, 0);
    text.push('\n');
}

/// Node totals, like node_exporter's node_ipvs_*_total.
fn write_totals(text: &mut String, services: &[stats::ServiceReport]) {
    let mut sum = BackendStats::default();
    for svc in services {
        sum.add(&svc.stats);
    }
    for (name, help, v) in [
        (
            "svclb_connections_total",
            "Connections scheduled, all services.",
            sum.conns,
        ),
        (
            "svclb_incoming_packets_total",
            "Packets from clients, all services.",
            sum.in_pkts,
        ),
        (
            "svclb_outgoing_packets_total",
            "Packets to clients, all services.",
            sum.out_pkts,
        ),
        (
            "svclb_incoming_bytes_total",
            "Bytes from clients, all services.",
            sum.in_bytes,
        ),
        (
            "svclb_outgoing_bytes_total",
            "Bytes to clients, all services.",
            sum.out_bytes,
        ),
    ] {
        family_header(text, name, "counter", help);
        let _ = writeln!(text, "{name} {v}");
    }
}

/// Per service: its backend count and its rates.
fn write_service_families(
    text: &mut String,
    services: &[stats::ServiceReport],
    flush: Flush,
) -> bool {
    let name = "svclb_service_backends";
    family_header(
        text,
        name,
        "gauge",
        "Backends of the service (weight 0 included).",
    );
    for svc in services {
        text.push_str(name);
        text.push_str("{service=\"");
        text.push_str(&escape_label(&svc.name));
        text.push_str("\",local_address=\"");
        stats::push_ip(text, svc.vip);
        text.push_str("\",local_mark=\"");
        push_mark(text, svc.mark);
        text.push_str("\",scheduler=\"");
        text.push_str(svc.scheduler);
        text.push_str("\"}");
        push_value(text, svc.backends.len() as u64);
        if !piece(text, flush) {
            return false;
        }
    }
    let name = "svclb_service_rate";
    family_header(
        text,
        name,
        "gauge",
        "IPVS rate estimate (2 s samples, EWMA 1/4); kind is cps, in_pps, out_pps, in_bps or out_bps.",
    );
    for svc in services {
        let r = &svc.rates;
        let label = escape_label(&svc.name);
        for (kind, v) in [
            ("cps", r.conns),
            ("in_pps", r.in_pkts),
            ("out_pps", r.out_pkts),
            ("in_bps", r.in_bytes),
            ("out_bps", r.out_bytes),
        ] {
            text.push_str(name);
            text.push_str("{service=\"");
            text.push_str(&label);
            text.push_str("\",local_mark=\"");
            push_mark(text, svc.mark);
            text.push_str("\",kind=\"");
            text.push_str(kind);
            text.push_str("\"}");
            push_value(text, v);
        }
        if !piece(text, flush) {
            return false;
        }
    }
    true
}

/// The per-backend families, one line per backend each; each backend's
/// label set is written once, into one buffer, and copied into each family.
fn write_backend_families(
    text: &mut String,
    services: &[stats::ServiceReport],
    flush: Flush,
) -> bool {
    let mut labels = String::new();
    let mut backends: Vec<(std::ops::Range<usize>, &stats::BackendReport)> = Vec::new();
    for svc in services {
        // node_exporter's labels: an FWM service is proto "FWM", port 0 and
        // its mark; a per-port one is its protocol and port, with no mark.
        let (proto, local_port) = match svc.port {
            None => ("FWM".to_string(), 0),
            Some(p) => (
                crate::model::protocol_name(p.protocol).to_uppercase(),
                p.port,
            ),
        };
        let name = escape_label(&svc.name);
        for b in &svc.backends {
            let start = labels.len();
            labels.push_str("service=\"");
            labels.push_str(&name);
            labels.push_str("\",local_address=\"");
            stats::push_ip(&mut labels, svc.vip);
            labels.push_str("\",local_port=\"");
            stats::push_num(&mut labels, u64::from(local_port), 0);
            labels.push_str("\",remote_address=\"");
            stats::push_ip(&mut labels, b.address);
            labels.push_str("\",remote_port=\"");
            stats::push_num(&mut labels, u64::from(b.port.unwrap_or(0)), 0);
            labels.push_str("\",proto=\"");
            labels.push_str(&proto);
            labels.push_str("\",local_mark=\"");
            if svc.port.is_none() {
                push_mark(&mut labels, svc.mark);
            }
            labels.push('"');
            backends.push((start..labels.len(), b));
        }
    }
    type Value = fn(&stats::BackendReport) -> u64;
    let families: [(&str, &str, &str, Value); 8] = [
        (
            "svclb_backend_connections_total",
            "counter",
            "Connections scheduled to the backend (IPVS Conns).",
            |b| b.stats.conns,
        ),
        (
            "svclb_backend_incoming_packets_total",
            "counter",
            "Packets from clients to the backend (IPVS InPkts).",
            |b| b.stats.in_pkts,
        ),
        (
            "svclb_backend_outgoing_packets_total",
            "counter",
            "Packets from the backend to clients (IPVS OutPkts).",
            |b| b.stats.out_pkts,
        ),
        (
            "svclb_backend_incoming_bytes_total",
            "counter",
            "L3 bytes from clients to the backend (IPVS InBytes).",
            |b| b.stats.in_bytes,
        ),
        (
            "svclb_backend_outgoing_bytes_total",
            "counter",
            "L3 bytes from the backend to clients (IPVS OutBytes).",
            |b| b.stats.out_bytes,
        ),
        (
            "svclb_backend_connections_active",
            "gauge",
            "TCP connections in ESTABLISHED (IPVS ActiveConn).",
            |b| b.active_conns,
        ),
        (
            "svclb_backend_connections_inactive",
            "gauge",
            "Other live connections (IPVS InActConn).",
            |b| b.inactive_conns,
        ),
        (
            "svclb_backend_weight",
            "gauge",
            "Backend weight; 0 is quiescent.",
            |b| u64::from(b.weight),
        ),
    ];
    for (name, kind, help, value) in families {
        family_header(text, name, kind, help);
        for (range, b) in &backends {
            text.push_str(name);
            text.push('{');
            text.push_str(&labels[range.clone()]);
            text.push('}');
            push_value(text, value(b));
            if !piece(text, flush) {
                return false;
            }
        }
    }
    flush(text)
}

/// A label value as the text format quotes it.
fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

/// DNS discovery's state, for alerting on a name that stopped answering:
/// per queried name the addresses in use, whether they are stale, the
/// failed queries in a row and when an answer was last used; per service
/// whether its current answers were refused (the last valid set is kept).
pub fn discovery_text(services: &[ServiceStatus]) -> Result<String> {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec> {
        let g = GaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let labels = ["service", "query", "role"];
    let addresses = gauge(
        "svclb_discovery_addresses",
        "Addresses in use from the name's last good answer.",
        &labels,
    )?;
    let stale = gauge(
        "svclb_discovery_stale",
        "1 while the name's addresses are older than DNS says or cannot say (it fails, or answers NXDOMAIN within stale_grace).",
        &labels,
    )?;
    let failures = gauge(
        "svclb_discovery_consecutive_failures",
        "Failed queries of the name in a row.",
        &labels,
    )?;
    let last_success = gauge(
        "svclb_discovery_last_success_timestamp_seconds",
        "When an answer for the name was last used (Unix time); absent until one is.",
        &labels,
    )?;
    let rejected = gauge(
        "svclb_discovery_rejected",
        "1 while the service's current answers are refused (its last valid set is kept).",
        &["service"],
    )?;
    for svc in services {
        rejected
            .with_label_values(&[&svc.service])
            .set(if svc.rejected.is_some() { 1.0 } else { 0.0 });
        for name in &svc.names {
            let role = match name.role {
                Role::Vips => "vips",
                Role::Tasks => "tasks",
            };
            let l = [svc.service.as_str(), name.query.as_str(), role];
            addresses
                .with_label_values(&l)
                .set(name.addresses.len() as f64);
            stale
                .with_label_values(&l)
                .set(if name.stale { 1.0 } else { 0.0 });
            failures
                .with_label_values(&l)
                .set(f64::from(name.consecutive_failures));
            if let Some(at) = name.last_success {
                let secs = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                last_success.with_label_values(&l).set(secs);
            }
        }
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// [`discovery_text`] of a live discovery, for [`serve`]'s extra metrics.
pub fn discovery_metrics(status: StatusHandle) -> ExtraMetrics {
    Arc::new(move || {
        let services = match status.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        discovery_text(&services).unwrap_or_else(|e| {
            warn!("rendering the discovery metrics: {e:#}");
            String::new()
        })
    })
}

/// Binds the metrics endpoint (before svclbd says it is ready, so a scrape
/// right after READY finds it).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr} (--metrics-addr)"))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(listener)
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, pins: PinDir, extra: Option<ExtraMetrics>) {
    let pins = Arc::new(pins);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("metrics accept: {e}");
                continue;
            }
        };
        let pins = pins.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let pins = pins.clone();
                let extra = extra.clone();
                async move { Ok::<_, Infallible>(respond(&req, pins, extra).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, "metrics connection: {e}");
            }
        });
    }
}

/// A response body sent piece by piece as it is written.
pub struct Streamed(mpsc::Receiver<Bytes>);

impl Streamed {
    fn whole(text: String) -> Streamed {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Bytes::from(text));
        Streamed(rx)
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// A piece of a scrape, its buffer handed back to the writer once sent.
struct Recycled {
    text: String,
    back: std::sync::mpsc::SyncSender<String>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let _ = self.back.try_send(text);
    }
}

/// Reads the maps and writes the text on a blocking thread, off the
/// runtime svclbd's other tasks share: the answer's status once the maps
/// are read (a failure is a 500), then its body as it is written.
async fn respond(
    req: &Request<Incoming>,
    pins: Arc<PinDir>,
    extra: Option<ExtraMetrics>,
) -> Response<Streamed> {
    let reply = |status: StatusCode, body: Streamed| {
        Response::builder()
            .status(status)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(body)
            .expect("static response parts")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            Streamed::whole("svclbd serves /metrics\n".into()),
        );
    }
    let (read_tx, read_rx) = oneshot::channel::<Result<()>>();
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let services = match read(&pins) {
            Ok(s) => s,
            Err(e) => {
                let _ = read_tx.send(Err(e));
                return;
            }
        };
        if read_tx.send(Ok(())).is_err() {
            return;
        }
        // The pieces' buffers come back once sent: fresh ones would each
        // be page-faulted in, a fault per 4 KiB of a 300 MB text.
        let (back, returned) = std::sync::mpsc::sync_channel::<String>(8);
        let mut text = String::with_capacity(2 * PIECE);
        let mut send = |text: &mut String| {
            let next = returned
                .try_recv()
                .unwrap_or_else(|_| String::with_capacity(2 * PIECE));
            let full = std::mem::replace(text, next);
            full.is_empty()
                || tx
                    .blocking_send(Bytes::from_owner(Recycled {
                        text: full,
                        back: back.clone(),
                    }))
                    .is_ok()
        };
        if render_into(&mut text, &services, &mut send) {
            if let Some(extra) = extra {
                let _ = tx.blocking_send(Bytes::from(extra()));
            }
        }
        // Leaving a large report to drop here, off the runtime.
        drop(services);
    });
    match read_rx.await {
        Ok(Ok(())) => reply(StatusCode::OK, Streamed(rx)),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            Streamed::whole(format!("reading the maps: {e:#}\n")),
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            Streamed::whole("reading the maps: the reader stopped\n".into()),
        ),
    }
}

/// Default metrics address: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::sync::dns::NameStatus;

    fn name(query: &str, role: Role, addrs: &[&str], stale: bool, failures: u32) -> NameStatus {
        NameStatus {
            query: query.into(),
            role,
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            last_success: (failures == 0).then(|| UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            consecutive_failures: failures,
            stale,
            adopted: false,
            last_error: None,
        }
    }

    #[test]
    fn discovery_metrics_say_which_name_is_stale() {
        let text = discovery_text(&[ServiceStatus {
            service: "api".into(),
            names: vec![
                name("api", Role::Vips, &["10.0.1.2"], false, 0),
                name("tasks.api", Role::Tasks, &["10.0.1.3", "10.0.1.4"], true, 3),
            ],
            rejected: None,
        }])
        .unwrap();
        for line in [
            r#"svclb_discovery_addresses{query="tasks.api",role="tasks",service="api"} 2"#,
            r#"svclb_discovery_stale{query="tasks.api",role="tasks",service="api"} 1"#,
            r#"svclb_discovery_stale{query="api",role="vips",service="api"} 0"#,
            r#"svclb_discovery_consecutive_failures{query="tasks.api",role="tasks",service="api"} 3"#,
            r#"svclb_discovery_last_success_timestamp_seconds{query="api",role="vips",service="api"} 1700000000"#,
            r#"svclb_discovery_rejected{service="api"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Never answered: no timestamp rather than 0.
        assert!(
            !text.contains(r#"svclb_discovery_last_success_timestamp_seconds{query="tasks.api""#)
        );
    }

    #[test]
    fn no_discovered_service_no_discovery_metrics() {
        assert_eq!(discovery_text(&[]).unwrap(), "");
    }
}
