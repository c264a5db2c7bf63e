//! The HTTP server every Hearth process runs: `/metrics` from the one registry built in
//! `run` (plus families whose owner renders them), `/healthz` (the process works) and
//! `/readyz` (its local job works, from named readiness conditions). It owns no metrics.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness conditions; `/readyz` is 200 only when all are met.
#[derive(Debug, Default)]
pub struct Readiness {
    conditions: Mutex<Vec<(&'static str, Option<String>)>>,
}

impl Readiness {
    /// Sets a condition: `None` means ready, `Some(reason)` means not ready because of it.
    pub fn set(&self, name: &'static str, not_ready: Option<String>) {
        let mut c = self.conditions.lock().unwrap_or_else(|p| p.into_inner());
        match c.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = not_ready,
            None => c.push((name, not_ready)),
        }
    }

    /// Reasons it is not ready; empty when ready.
    pub fn blockers(&self) -> Vec<String> {
        let c = self.conditions.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().filter_map(|(n, r)| r.as_ref().map(|r| format!("{n}: {r}"))).collect()
    }
}

/// Metric families rendered by their owner instead of prometheus-client, for expositions it
/// cannot produce (dcgm-exporter's counter names without `_total`). Appended after the
/// registry's families in whichever format the scraper asked for.
pub trait TextMetrics: Send + Sync {
    fn render(&self, out: &mut String, openmetrics: bool);
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    extra: Arc<[Arc<dyn TextMetrics>]>,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROM_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}")).into_response();
    }
    let wants_openmetrics =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_openmetrics {
        // Owner-rendered families go before the terminating `# EOF`.
        let eof = body.rfind("# EOF").unwrap_or(body.len());
        body.truncate(eof);
        for e in s.extra.iter() {
            e.render(&mut body, true);
        }
        body.push_str("# EOF\n");
        ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        let mut text = openmetrics_to_prometheus_text(&body);
        for e in s.extra.iter() {
            e.render(&mut text, false);
        }
        ([(header::CONTENT_TYPE, PROM_TEXT)], text).into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let blockers = s.readiness.blockers();
    if blockers.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", blockers.join("\n"))).into_response()
    }
}

/// Binds the HTTP listener now (so a taken port fails at start) and returns the bound
/// address and a future that serves until `shutdown`.
pub async fn bind_http(
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    extra: Vec<Arc<dyn TextMetrics>>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { registry, readiness, extra: extra.into() });
    let fut = async move { axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await };
    Ok((bound, fut))
}

/// A registry in Prometheus text format 0.0.4, as `/metrics` serves it to scrapers that do
/// not ask for OpenMetrics.
pub fn prometheus_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut om = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut om, registry)?;
    Ok(openmetrics_to_prometheus_text(&om))
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text format 0.0.4, for
/// scrapers and linters that do not negotiate OpenMetrics (promtool, older agents).
/// prometheus-client writes only OpenMetrics, and the two formats differ in exactly these
/// ways for what it writes: a counter family is declared under its `_total` sample name,
/// `# UNIT`, `_created` samples and `# EOF` do not exist, and `unknown` is `untyped`.
/// One pass; each family's HELP line waits for its TYPE line, which follows it.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len() + om.len() / 16);
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (declared, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                k => (name.to_owned(), k),
            };
            counter = (kind == "counter").then_some(name);
            if let Some(text) = help.take().filter(|(h, _)| *h == name).map(|(_, t)| t) {
                out.push_str(&format!("# HELP {declared} {text}\n"));
            }
            out.push_str(&format!("# TYPE {declared} {kind}\n"));
            continue;
        }
        // Counter `_created` samples have no Prometheus-text equivalent.
        if let Some(f) = counter
            && line.strip_prefix(f).is_some_and(|rest| rest.starts_with("_created"))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn converts_counters_units_and_eof() {
        let mut r = Registry::default();
        let c: Family<[(&str, &str); 1], Counter> = Family::default();
        r.register("hearth_things", "Things seen", c.clone());
        c.get_or_create(&[("kind", "a")]).inc_by(3);
        let g = Gauge::<i64>::default();
        r.register_with_unit("hearth_disk", "Disk", prometheus_client::registry::Unit::Bytes, g.clone());
        g.set(42);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).expect("encode");
        let text = openmetrics_to_prometheus_text(&om);
        assert_eq!(
            text,
            "# HELP hearth_things_total Things seen.\n# TYPE hearth_things_total counter\n\
             hearth_things_total{kind=\"a\"} 3\n# HELP hearth_disk_bytes Disk.\n\
             # TYPE hearth_disk_bytes gauge\nhearth_disk_bytes 42\n"
        );
    }

    #[test]
    fn created_samples_units_and_unknown_types_have_text_equivalents() {
        let om = "# HELP req Requests.\n# TYPE req counter\nreq_total{a=\"1\"} 2\nreq_created{a=\"1\"} 1.7e9\n\
                  # HELP lat Latency.\n# TYPE lat_seconds histogram\n# UNIT lat_seconds seconds\nlat_seconds_sum 1\n\
                  # TYPE odd unknown\nodd 3\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{a=\"1\"} 2\n\
             # TYPE lat_seconds histogram\nlat_seconds_sum 1\n# TYPE odd untyped\nodd 3\n"
        );
    }

    #[test]
    fn readiness_lists_blockers() {
        let r = Readiness::default();
        r.set("controller", Some("not connected".into()));
        r.set("devices", None);
        assert_eq!(r.blockers(), vec!["controller: not connected".to_string()]);
        r.set("controller", None);
        assert!(r.blockers().is_empty());
    }
}
