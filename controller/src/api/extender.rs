//! kube-scheduler extender: `POST <prefix>/filter` and `POST <prefix>/prioritize` with the
//! JSON of `k8s.io/kube-scheduler/extender/v1` (Go field names, no json tags, so "Pod",
//! "NodeNames", "FailedNodes", "Host", "Score"; lower-case spellings are accepted too, as Go's
//! decoder does). Works in `nodeCacheCapable: true` mode (node names) and with full NodeLists.
//!
//! A pod names its model deployment with the annotation (or label) `hearth.dev/model`. Pods
//! without one are not Hearth's business: every node passes and scores 0. Answers follow the
//! protocol's convention: HTTP 200 with `Error` set for a request that cannot be decided
//! (unknown model), 400 only for a body that is not an ExtenderArgs at all.
//!
//! Callers authenticate with a client certificate (kube-scheduler's `tlsConfig`) whose
//! identity has the scheduler or operator role, or with `Authorization: Bearer <token>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::auth::{self, Auth, Role};
use crate::placement::{Placement, PlacementError};

pub const MODEL_KEY: &str = "hearth.dev/model";

#[derive(Debug, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Option<Value>,
    #[serde(rename = "Nodes", alias = "nodes")]
    pub nodes: Option<Value>,
    #[serde(rename = "NodeNames", alias = "nodenames", alias = "nodeNames")]
    pub node_names: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Default, PartialEq)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Value>,
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// The role a connection's client certificate carries (None when it presented none).
#[derive(Debug, Clone, Copy)]
struct ConnRole(Option<Role>);

#[derive(Clone)]
struct AppState {
    placement: Arc<Placement>,
    auth: Auth,
    leadership: crate::leader::Leadership,
}

fn model_of(pod: &Value) -> Option<String> {
    let meta = pod.get("metadata")?;
    ["annotations", "labels"].iter().find_map(|k| meta.get(k)?.get(MODEL_KEY)?.as_str().map(str::to_owned))
}

/// Candidate node names from either mode, and the NodeList items by name (non-cache mode).
fn candidates(args: &ExtenderArgs) -> Result<(Vec<String>, Option<Vec<Value>>), String> {
    if let Some(n) = &args.node_names {
        return Ok((n.clone(), None));
    }
    let Some(list) = args.nodes.as_ref().filter(|v| !v.is_null()) else {
        return Err("ExtenderArgs has neither NodeNames nor Nodes".into());
    };
    let items = list.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    let names = items
        .iter()
        .map(|i| i.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or("a node in Nodes.items has no metadata.name")?;
    Ok((names, Some(items)))
}

fn authorize(s: &AppState, headers: &HeaderMap, conn: ConnRole) -> Result<(), Box<Response>> {
    // A standby has no agents' view: it must not answer as if no node fits.
    if !s.leadership.is_leader() {
        return Err(Box::new(
            (StatusCode::SERVICE_UNAVAILABLE, "this controller is a standby; the leader answers the extender\n").into_response(),
        ));
    }
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let role = match bearer {
        Some(b) => {
            Some(s.auth.role_of_token(b).ok_or_else(|| (StatusCode::UNAUTHORIZED, "bearer token not recognised\n").into_response())?)
        }
        None if s.auth.is_open() => None,
        None => Some(conn.0.ok_or_else(|| {
            Box::new((StatusCode::UNAUTHORIZED, "present a client certificate or an Authorization: Bearer token\n").into_response())
        })?),
    };
    s.auth
        .admit(role, auth::PLACEMENT, "the scheduler extender")
        .map_err(|e| Box::new((StatusCode::FORBIDDEN, format!("{}\n", e.message())).into_response()))
}

fn parse(body: &[u8]) -> Result<ExtenderArgs, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new((StatusCode::BAD_REQUEST, format!("request body is not a kube-scheduler ExtenderArgs JSON object: {e}\n")).into_response())
    })
}

async fn filter(State(s): State<AppState>, Extension(conn): Extension<ConnRole>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = authorize(&s, &headers, conn) {
        return *r;
    }
    let args = match parse(&body) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let (names, items) = match candidates(&args) {
        Ok(c) => c,
        Err(e) => return Json(ExtenderFilterResult { error: e, ..Default::default() }).into_response(),
    };
    let mut out = ExtenderFilterResult::default();
    let Some(model) = args.pod.as_ref().and_then(model_of) else {
        // Not a Hearth-placed pod: no opinion.
        out.nodes = items.map(|i| serde_json::json!({ "items": i }));
        out.node_names = out.nodes.is_none().then_some(names);
        return Json(out).into_response();
    };
    let p = s.placement.clone();
    let names2 = names.clone();
    let result = tokio::task::spawn_blocking(move || p.filter(&model, Some(&names2), Instant::now())).await;
    let outcome = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e @ PlacementError::UnknownModel(_))) | Ok(Err(e)) => {
            return Json(ExtenderFilterResult { error: e.to_string(), ..Default::default() }).into_response();
        }
        Err(e) => return Json(ExtenderFilterResult { error: format!("filter task failed: {e}"), ..Default::default() }).into_response(),
    };
    for r in &outcome.rejected {
        // Nodes no agent reports will not start fitting because pods are preempted there.
        let map = if r.reason.code() == "unknown_node" { &mut out.failed_and_unresolvable_nodes } else { &mut out.failed_nodes };
        map.insert(r.node.clone(), r.reason.to_string());
    }
    let feasible: Vec<String> = outcome.feasible.iter().map(|f| f.node.clone()).collect();
    match items {
        Some(items) => {
            let keep: Vec<Value> = items
                .into_iter()
                .filter(|i| {
                    i.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).is_some_and(|n| feasible.iter().any(|f| f == n))
                })
                .collect();
            out.nodes = Some(serde_json::json!({ "items": keep }));
        }
        None => out.node_names = Some(feasible),
    }
    debug!(failed = out.failed_nodes.len(), "extender filter");
    Json(out).into_response()
}

async fn prioritize(
    State(s): State<AppState>,
    Extension(conn): Extension<ConnRole>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers, conn) {
        return *r;
    }
    let args = match parse(&body) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let names = match candidates(&args) {
        Ok((n, _)) => n,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let zero = |names: Vec<String>| names.into_iter().map(|host| HostPriority { host, score: 0 }).collect::<Vec<_>>();
    let Some(model) = args.pod.as_ref().and_then(model_of) else {
        return Json(zero(names)).into_response();
    };
    let p = s.placement.clone();
    let names2 = names.clone();
    let outcome = match tokio::task::spawn_blocking(move || p.filter(&model, Some(&names2), Instant::now())).await {
        Ok(Ok(o)) => o,
        // Prioritize has no error field: an unknown model is the caller's mistake.
        Ok(Err(e)) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("prioritize task failed: {e}\n")).into_response(),
    };
    let list: Vec<HostPriority> = names
        .into_iter()
        .map(|host| {
            let score = outcome.feasible.iter().find(|f| f.node == host).map(|f| i64::from(f.priority)).unwrap_or(0);
            HostPriority { host, score }
        })
        .collect();
    Json(list).into_response()
}

/// The extender's routes under `prefix` (e.g. "/extender").
fn router(prefix: &str, placement: Arc<Placement>, auth: Auth, leadership: crate::leader::Leadership) -> Router {
    let prefix = prefix.trim_end_matches('/');
    Router::new()
        .route(&format!("{prefix}/filter"), post(filter))
        .route(&format!("{prefix}/prioritize"), post(prioritize))
        // Non-cache mode sends whole NodeLists: thousands of Node objects.
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(AppState { placement, auth, leadership })
}

/// Serves the extender on `listener`, over TLS when `tls` is set (client certificates
/// optional, so bearer tokens work), until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    prefix: String,
    placement: Arc<Placement>,
    auth: Auth,
    leadership: crate::leader::Leadership,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(&prefix, placement, auth.clone(), leadership);
    let Some(tls) = tls else {
        let app = app.layer(Extension(ConnRole(None)));
        return axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "extender accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let auth = auth.clone();
        let stop = shutdown.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return debug!(%peer, error = %e, "extender TLS handshake refused"),
                Err(_) => return debug!(%peer, "extender TLS handshake timed out"),
            };
            let role = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| auth.role_of_cert(c));
            let svc = hyper_util::service::TowerToHyperService::new(app.layer(Extension(ConnRole(role))));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "extender connection ended") },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_field_names_and_lowercase_both_parse() {
        let a: ExtenderArgs =
            serde_json::from_str(r#"{"Pod":{"metadata":{"annotations":{"hearth.dev/model":"m"}}},"Nodes":null,"NodeNames":["a"]}"#)
                .unwrap();
        assert_eq!(a.node_names.as_deref(), Some(&["a".to_owned()][..]));
        assert_eq!(model_of(a.pod.as_ref().unwrap()).as_deref(), Some("m"));
        let a: ExtenderArgs =
            serde_json::from_str(r#"{"pod":{"metadata":{"labels":{"hearth.dev/model":"x"}}},"nodenames":["b"]}"#).unwrap();
        assert_eq!(candidates(&a).unwrap().0, ["b"]);
        assert_eq!(model_of(a.pod.as_ref().unwrap()).as_deref(), Some("x"));
        let a: ExtenderArgs = serde_json::from_str(r#"{"Pod":{},"Nodes":{"items":[{"metadata":{"name":"n1"}}]}}"#).unwrap();
        assert_eq!(candidates(&a).unwrap().0, ["n1"]);
        let a: ExtenderArgs = serde_json::from_str(r#"{"Pod":{},"Nodes":{"items":[{"metadata":{}}]}}"#).unwrap();
        assert!(candidates(&a).is_err());
    }

    #[test]
    fn results_use_the_go_field_names() {
        let r = ExtenderFilterResult { node_names: Some(vec!["a".into()]), ..Default::default() };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"NodeNames":["a"],"FailedNodes":{},"FailedAndUnresolvableNodes":{},"Error":""}"#
        );
        assert_eq!(serde_json::to_string(&HostPriority { host: "a".into(), score: 7 }).unwrap(), r#"{"Host":"a","Score":7}"#);
    }
}
