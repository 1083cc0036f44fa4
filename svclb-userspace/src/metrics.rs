//! Prometheus metrics at `/metrics`, read from the pinned maps at each
//! scrape. Names follow node_exporter's IPVS collector with an `svclb_`
//! prefix, and the labels are the ones its dashboards use (local_address,
//! local_port, remote_address, remote_port, proto, local_mark) plus
//! `service`; unlike node_exporter, packets and bytes are per backend too.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use svclb_common::BackendStats;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    dataplane::Dataplane,
    pins::PinDir,
    stats,
    sync::dns::{Role, ServiceStatus, StatusHandle},
};

/// Extra gauges other parts of svclbd publish (e.g. DNS discovery state),
/// rendered after the data-plane metrics.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Renders the metrics text for the maps pinned at `pins`.
pub fn render(pins: &PinDir) -> Result<String> {
    let dp = Dataplane::open(pins)?;
    let services = stats::collect(&dp)?;
    let registry = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let svc_labels = ["service", "local_address", "local_mark", "scheduler"];
    let services_up = gauge(
        "svclb_service_backends",
        "Backends of the service (weight 0 included).",
        &svc_labels,
    )?;
    let rate = GaugeVec::new(
        Opts::new("svclb_service_rate", "IPVS rate estimate (2 s samples, EWMA 1/4); kind is cps, in_pps, out_pps, in_bps or out_bps."),
        &["service", "local_mark", "kind"],
    )?;
    registry.register(Box::new(rate.clone()))?;

    // Per backend, the label set once; written below family by family.
    let mut backend_labels: Vec<(String, &stats::BackendReport)> = Vec::new();
    for svc in &services {
        let mark = format!("{:08X}", svc.mark);
        let vip = svc.vip.to_string();
        services_up
            .with_label_values(&[&svc.name, &vip, &mark, svc.scheduler])
            .set(svc.backends.len() as i64);
        for (kind, v) in [
            ("cps", svc.rates.conns),
            ("in_pps", svc.rates.in_pkts),
            ("out_pps", svc.rates.out_pkts),
            ("in_bps", svc.rates.in_bytes),
            ("out_bps", svc.rates.out_bytes),
        ] {
            rate.with_label_values(&[&svc.name, &mark, kind])
                .set(v as f64);
        }
        // node_exporter's labels: an FWM service is proto "FWM", port 0 and
        // its mark; a per-port one is its protocol and port, with no mark.
        let (proto, local_port, local_mark) = match svc.port {
            None => ("FWM".to_string(), "0".to_string(), mark.clone()),
            Some(p) => (
                crate::model::protocol_name(p.protocol).to_uppercase(),
                p.port.to_string(),
                String::new(),
            ),
        };
        for b in &svc.backends {
            backend_labels.push((
                format!(
                    "service=\"{}\",local_address=\"{vip}\",local_port=\"{local_port}\",remote_address=\"{}\",remote_port=\"{}\",proto=\"{proto}\",local_mark=\"{local_mark}\"",
                    escape_label(&svc.name),
                    b.address,
                    b.port.unwrap_or(0),
                ),
                b,
            ));
        }
    }
    // Node totals, like node_exporter's node_ipvs_*_total.
    let totals = [
        (
            "svclb_connections_total",
            "Connections scheduled, all services.",
        ),
        (
            "svclb_incoming_packets_total",
            "Packets from clients, all services.",
        ),
        (
            "svclb_outgoing_packets_total",
            "Packets to clients, all services.",
        ),
        (
            "svclb_incoming_bytes_total",
            "Bytes from clients, all services.",
        ),
        (
            "svclb_outgoing_bytes_total",
            "Bytes to clients, all services.",
        ),
    ];
    let mut sum = BackendStats::default();
    for svc in &services {
        sum.add(&svc.stats);
    }
    let sums = [
        sum.conns,
        sum.in_pkts,
        sum.out_pkts,
        sum.in_bytes,
        sum.out_bytes,
    ];
    for ((name, help), v) in totals.iter().zip(sums) {
        counter(name, help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(v);
    }

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    let mut text = String::from_utf8(out)?;
    write_backend_families(&mut text, &backend_labels);
    Ok(text)
}

/// The per-backend families, one line per backend each: written directly
/// rather than through a registry, whose per-series bookkeeping made a
/// scrape of 100,000 backends take tens of seconds and gigabytes.
fn write_backend_families(text: &mut String, backends: &[(String, &stats::BackendReport)]) {
    use std::fmt::Write as _;
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
    if backends.is_empty() {
        return;
    }
    text.reserve(backends.len() * families.len() * (backends[0].0.len() + 48));
    for (name, kind, help, value) in families {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, b) in backends {
            let _ = writeln!(text, "{name}{{{labels}}} {}", value(b));
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
