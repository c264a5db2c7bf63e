//! One read of one model server: liveness, readiness, then `/metrics`, each bounded by a
//! deadline so a hung engine costs one timeout, not a stuck collector. Plain HTTP over the
//! pod network (engines serve their API and metrics without TLS inside the cluster).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::engine::{EngineSpec, Load, LoadReader, ReadyCheck, listed_models};

/// Bodies larger than this are refused: a `/metrics` page of a busy engine is tens of kB.
const MAX_BODY: usize = 8 << 20;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(c)
}

/// Why a read failed, as a bounded metric label and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("{what}: {reason}")]
    Connect { what: String, reason: String },
    #[error("{what}: HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("{what}: {reason}")]
    Body { what: String, reason: String },
}

impl ProbeError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Connect { .. } => "connect",
            Self::Status { .. } => "status",
            Self::Body { .. } => "body",
        }
    }
}

/// GET `url`: the status and body, within `timeout`.
pub async fn get(client: &HttpClient, url: &str, timeout: Duration) -> Result<(u16, Bytes), ProbeError> {
    let what = format!("GET {url}");
    let uri: hyper::Uri = url.parse().map_err(|e| ProbeError::Connect { what: what.clone(), reason: format!("bad URL: {e}") })?;
    let exchange = async {
        let resp = client.get(uri).await.map_err(|e| ProbeError::Connect { what: what.clone(), reason: describe(&e) })?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ProbeError::Body { what: what.clone(), reason: e.to_string() })?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| ProbeError::Timeout { what: what.clone(), timeout })?
}

fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    s
}

/// What one read found.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub live: Result<(), ProbeError>,
    /// Ok(()) when ready; Err with why not.
    pub ready: Result<(), String>,
    pub load: Option<Load>,
    pub metrics_error: Option<ProbeError>,
    pub took: Duration,
}

impl Reading {
    /// A server that cannot be reached yet (a pod without an address).
    pub fn unreachable(why: &str) -> Self {
        let e = ProbeError::Connect { what: "reading the model server".into(), reason: why.into() };
        Reading { ready: Err(why.into()), live: Err(e), load: None, metrics_error: None, took: Duration::ZERO }
    }
}

/// Reads one server at `host`: live, ready, and (when live) its load.
pub async fn read(
    client: &HttpClient,
    spec: &EngineSpec,
    host: &str,
    port: u16,
    metrics_port: u16,
    reader: &mut LoadReader,
    timeout: Duration,
) -> Reading {
    let t0 = Instant::now();
    let base = format!("http://{host}:{port}");
    let live = match get(client, &format!("{base}{}", spec.live_path), timeout).await {
        Ok((s, _)) if (200..300).contains(&s) => Ok(()),
        Ok((status, _)) => Err(ProbeError::Status { what: format!("GET {base}{}", spec.live_path), status }),
        Err(e) => Err(e),
    };
    if let Err(e) = live {
        return Reading { ready: Err(e.to_string()), live: Err(e), load: None, metrics_error: None, took: t0.elapsed() };
    }
    let ready = match &spec.ready {
        ReadyCheck::Status(path) if *path == spec.live_path => Ok(()),
        ReadyCheck::Status(path) => match get(client, &format!("{base}{path}"), timeout).await {
            Ok((s, _)) if (200..300).contains(&s) => Ok(()),
            Ok((s, _)) => Err(format!("GET {path}: HTTP {s}")),
            Err(e) => Err(e.to_string()),
        },
        ReadyCheck::ModelListed(path) => match get(client, &format!("{base}{path}"), timeout).await {
            Ok((s, body)) if (200..300).contains(&s) => {
                if listed_models(&body).is_empty() {
                    Err(format!("GET {path}: no model listed yet"))
                } else {
                    Ok(())
                }
            }
            Ok((s, _)) => Err(format!("GET {path}: HTTP {s}")),
            Err(e) => Err(e.to_string()),
        },
    };
    let murl = format!("http://{host}:{metrics_port}{}", spec.metrics_path);
    let (load, metrics_error) = match get(client, &murl, timeout).await {
        Ok((s, body)) if (200..300).contains(&s) => (Some(reader.read(&String::from_utf8_lossy(&body), Instant::now())), None),
        Ok((status, _)) => (None, Some(ProbeError::Status { what: format!("GET {murl}"), status })),
        Err(e) => (None, Some(e)),
    };
    Reading { live: Ok(()), ready, load, metrics_error, took: t0.elapsed() }
}
