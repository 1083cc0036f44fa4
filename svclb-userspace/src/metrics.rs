//! Prometheus metrics at `/metrics`, read from the pinned maps at each
//! scrape. Names follow node_exporter's IPVS collector with an `svclb_`
//! prefix, and the labels are the ones its dashboards use (local_address,
//! local_port, remote_address, remote_port, proto, local_mark) plus
//! `service`; unlike node_exporter, packets and bytes are per backend too.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, GaugeVec, Opts, Registry, TextEncoder};
use svclb_common::BackendStats;
use tokio::net::TcpListener;
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

/// Renders the metrics text for the maps pinned at `pins`. Every family is
/// written straight into one buffer rather than through a `prometheus`
/// registry, whose per-series bookkeeping made a scrape of 100,000 services
/// take seconds and gigabytes.
pub fn render(pins: &PinDir) -> Result<String> {
    let dp = Dataplane::open(pins)?;
    let services = stats::collect(&dp, Wanted::ALL)?;
    let backends: usize = services.iter().map(|s| s.backends.len()).sum();
    // About 200 bytes a line: 6 per service, 8 per backend.
    let mut text = String::with_capacity(1024 + 200 * (6 * services.len() + 8 * backends));
    write_totals(&mut text, &services);
    write_service_families(&mut text, &services);
    write_backend_families(&mut text, &services);
    Ok(text)
}

/// A family's `# HELP` and `# TYPE` lines.
fn family_header(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
fn write_service_families(text: &mut String, services: &[stats::ServiceReport]) {
    let name = "svclb_service_backends";
    family_header(
        text,
        name,
        "gauge",
        "Backends of the service (weight 0 included).",
    );
    for svc in services {
        let _ = writeln!(
            text,
            "{name}{{service=\"{}\",local_address=\"{}\",local_mark=\"{:08X}\",scheduler=\"{}\"}} {}",
            escape_label(&svc.name),
            svc.vip,
            svc.mark,
            svc.scheduler,
            svc.backends.len()
        );
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
        for (kind, v) in [
            ("cps", r.conns),
            ("in_pps", r.in_pkts),
            ("out_pps", r.out_pkts),
            ("in_bps", r.in_bytes),
            ("out_bps", r.out_bytes),
        ] {
            let _ = writeln!(
                text,
                "{name}{{service=\"{}\",local_mark=\"{:08X}\",kind=\"{kind}\"}} {v}",
                escape_label(&svc.name),
                svc.mark,
            );
        }
    }
}

/// The per-backend families, one line per backend each; each backend's
/// label set is written once, into one buffer, and copied into each family.
fn write_backend_families(text: &mut String, services: &[stats::ServiceReport]) {
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
        for b in &svc.backends {
            let start = labels.len();
            let _ = write!(
                labels,
                "service=\"{}\",local_address=\"{}\",local_port=\"{local_port}\",remote_address=\"{}\",remote_port=\"{}\",proto=\"{proto}\",local_mark=\"",
                escape_label(&svc.name),
                svc.vip,
                b.address,
                b.port.unwrap_or(0),
            );
            if svc.port.is_none() {
                let _ = write!(labels, "{:08X}", svc.mark);
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
            let _ = writeln!(text, "}} {}", value(b));
        }
    }
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
                async move { Ok::<_, Infallible>(respond(&req, &pins, extra.as_ref())) }
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

fn respond(
    req: &Request<Incoming>,
    pins: &PinDir,
    extra: Option<&ExtraMetrics>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "svclbd serves /metrics\n".into());
    }
    match render(pins) {
        Ok(mut text) => {
            if let Some(extra) = extra {
                text.push_str(&extra());
            }
            reply(StatusCode::OK, text)
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the maps: {e:#}\n"),
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
