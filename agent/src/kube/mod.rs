//! The node's side of Kubernetes, kept thin: pod attribution through the kubelet's
//! PodResources API (`podres`), and the one thing the agent writes to the Kubernetes API,
//! labels on its own Node, so `kubectl get nodes -L hearth.dev/mig.config.state` and node
//! selectors see what the partition reconciler did (as mig-parted's
//! `nvidia.com/mig.config.state` does).
//!
//! Node labels are deliberately thin: a JSON merge patch of `metadata.labels` over HTTPS with the pod's
//! service-account token, re-read on every call because projected tokens rotate. No
//! client library, no watch, no cache. The Helm chart grants `patch` on `nodes`.

pub mod podres;
mod subsystem;

pub use subsystem::start;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("API server CA {0}: no usable certificate")]
    Ca(PathBuf),
    #[error("API server URL {0:?}: expected https://host[:port]")]
    Url(String),
    #[error("connecting to the API server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{what}: HTTP {status}: {hint}")]
    Status { what: String, status: u16, hint: String },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
}

/// A pod's identity, as Kubernetes names it and metrics label it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// `https://host:port`.
    pub api_server: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl KubeSettings {
    /// In-cluster settings from the service host environment and the mounted service
    /// account; None outside a cluster.
    pub fn in_cluster() -> Option<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        Some(Self {
            api_server: format!("https://{host}:{port}"),
            token_file: format!("{SA_DIR}/token").into(),
            ca_file: format!("{SA_DIR}/ca.crt").into(),
        })
    }
}

/// Builds the merge patch: `Some` sets a label, `None` removes it.
pub fn label_patch(labels: &BTreeMap<String, Option<String>>) -> String {
    serde_json::json!({ "metadata": { "labels": labels } }).to_string()
}

/// PATCHes the node's labels once.
pub async fn patch_node_labels(s: &KubeSettings, node: &str, labels: &BTreeMap<String, Option<String>>) -> Result<(), KubeError> {
    let what = format!("PATCH node {node}");
    let (status, body) =
        call(s, &what, "PATCH", &format!("/api/v1/nodes/{node}"), Some(("application/merge-patch+json", &label_patch(labels)))).await?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let hint = match status {
        401 => "unauthorized: the service account token was refused".to_owned(),
        403 => "forbidden: the agent's ClusterRole must allow patch on nodes".to_owned(),
        404 => format!("no Node named {node:?}: node_name must match the Kubernetes node name"),
        _ => String::from_utf8_lossy(&body).chars().take(300).collect(),
    };
    Err(KubeError::Status { what, status, hint })
}

/// The pods bound to `node` (one LIST with a field selector), as UID -> namespace/name.
pub async fn list_node_pods(
    s: &KubeSettings,
    node: &str,
) -> Result<std::collections::HashMap<String, crate::netobs::pods::PodRef>, KubeError> {
    let what = format!("LIST pods on node {node}");
    let path = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}");
    let (status, body) = call(s, &what, "GET", &path, None).await?;
    if !(200..300).contains(&status) {
        let hint = match status {
            401 => "unauthorized: the service account token was refused".to_owned(),
            403 => "forbidden: the agent's ClusterRole must allow list on pods".to_owned(),
            _ => String::from_utf8_lossy(&body).chars().take(300).collect(),
        };
        return Err(KubeError::Status { what, status, hint });
    }
    crate::netobs::pods::parse_pod_list(&body).map_err(|e| KubeError::Status { what, status, hint: format!("unreadable PodList: {e}") })
}

/// One request over HTTPS with the service-account token: (status, body). HTTP/1.0 so the
/// body arrives whole (no chunked encoding) and the connection closes after it.
async fn call(s: &KubeSettings, what: &str, method: &str, path: &str, body: Option<(&str, &str)>) -> Result<(u16, Vec<u8>), KubeError> {
    let rest = s.api_server.strip_prefix("https://").ok_or_else(|| KubeError::Url(s.api_server.clone()))?;
    let authority = rest.trim_end_matches('/');
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    let addr = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let token = std::fs::read_to_string(&s.token_file).map_err(|source| KubeError::Read {
        what: "service account token",
        path: s.token_file.clone(),
        source,
    })?;
    let ca = std::fs::read(&s.ca_file).map_err(|source| KubeError::Read { what: "API server CA", path: s.ca_file.clone(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.as_slice()).flatten() {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(KubeError::Ca(s.ca_file.clone()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeError::Connect { addr: addr.clone(), source: std::io::Error::other(e) })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
        .map_err(|_| KubeError::Url(s.api_server.clone()))?;
    let (version, content) = match body {
        Some((ct, b)) => ("HTTP/1.1", format!("Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{b}", b.len())),
        None => ("HTTP/1.0", "\r\n".to_owned()),
    };
    let request = format!(
        "{method} {path} {version}\r\nHost: {authority}\r\nAuthorization: Bearer {}\r\n\
         Accept: application/json\r\nUser-Agent: hearth-agent\r\nConnection: close\r\n{content}",
        token.trim(),
    );
    let timeout = Duration::from_secs(10);
    let exchange = async {
        let conn = |source| KubeError::Connect { addr: addr.clone(), source };
        let tcp = tokio::net::TcpStream::connect(&addr).await.map_err(conn)?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(conn)?;
        tls.write_all(request.as_bytes()).await.map_err(conn)?;
        let mut resp = Vec::new();
        // The API server may close without close_notify; what arrived is enough.
        let _ = tls.read_to_end(&mut resp).await;
        Ok(resp)
    };
    let resp = tokio::time::timeout(timeout, exchange).await.map_err(|_| KubeError::Timeout { what: what.to_owned(), timeout })??;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&resp[..split.unwrap_or(resp.len())]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, split.map(|i| resp[i + 4..].to_vec()).unwrap_or_default()))
}

/// Keeps the node's labels equal to the latest wanted set: patches on every change, retries
/// with jittered backoff (1 s doubling to 60 s) while the API server refuses, logs once per run of
/// failures. Runs until `shutdown`.
pub async fn label_loop(
    s: KubeSettings,
    node: String,
    mut wanted: watch::Receiver<BTreeMap<String, Option<String>>>,
    results: prometheus_client::metrics::family::Family<[(&'static str, &'static str); 1], prometheus_client::metrics::counter::Counter>,
    shutdown: CancellationToken,
) {
    let mut backoff = hearth_service::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failing = false;
    loop {
        let labels = wanted.borrow_and_update().clone();
        if !labels.is_empty() {
            match patch_node_labels(&s, &node, &labels).await {
                Ok(()) => {
                    results.get_or_create(&[("result", "ok")]).inc();
                    if failing {
                        info!(node, "node labels written again");
                    }
                    failing = false;
                    backoff.reset();
                }
                Err(e) => {
                    results.get_or_create(&[("result", "error")]).inc();
                    if !failing {
                        warn!(node, error = %e, "cannot label the Kubernetes node; the snapshot still carries the state");
                    }
                    failing = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = wanted.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_service::pki::{CertAuthority, LeafSpec, Usage};

    /// A Node as the API server returns it after a merge patch (trimmed recording).
    const NODE_JSON: &str = r#"{"kind":"Node","apiVersion":"v1","metadata":{"name":"gpu-node-1","uid":"5f1c9a2e-0b7d-4a53-9a61-3e1f0c2d4b77","resourceVersion":"918273","labels":{"kubernetes.io/hostname":"gpu-node-1","nvidia.com/gpu.present":"true","hearth.dev/mig.config":"balanced","hearth.dev/mig.config.state":"success"}},"spec":{"providerID":"aws:///us-east-1a/i-0abc"},"status":{"capacity":{"nvidia.com/gpu":"8"}}}"#;

    /// An HTTPS server that answers every request with `status` and hands the requests back.
    async fn api_server(dir: &std::path::Path, status: u16) -> (KubeSettings, tokio::sync::mpsc::Receiver<String>) {
        let ca = CertAuthority::new("kube-ca").unwrap();
        let leaf = ca.issue(&LeafSpec::new("kube-apiserver", &["localhost"], Usage::Server, Duration::from_secs(3600))).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("token"), "sa-token-123\n").unwrap();
        let certs = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes()).unwrap().unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                // Read headers and the declared body.
                loop {
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize =
                            head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                let body = if status == 200 {
                    NODE_JSON.to_owned()
                } else {
                    r#"{"kind":"Status","status":"Failure","reason":"Forbidden"}"#.to_owned()
                };
                let resp = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned()).await;
            }
        });
        let s =
            KubeSettings { api_server: format!("https://localhost:{port}"), token_file: dir.join("token"), ca_file: dir.join("ca.crt") };
        (s, rx)
    }

    fn wanted() -> BTreeMap<String, Option<String>> {
        [
            ("hearth.dev/mig.config".to_owned(), Some("balanced".to_owned())),
            ("hearth.dev/mig.config.state".to_owned(), Some("success".to_owned())),
        ]
        .into()
    }

    #[tokio::test]
    async fn patches_the_node_labels_with_the_service_account_token() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut requests) = api_server(dir.path(), 200).await;
        patch_node_labels(&s, "gpu-node-1", &wanted()).await.unwrap();
        let req = requests.recv().await.unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("PATCH /api/v1/nodes/gpu-node-1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nAuthorization: Bearer sa-token-123\r\n"), "token trimmed and sent: {head}");
        assert!(head.contains("\r\nContent-Type: application/merge-patch+json\r\n"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"metadata": {"labels": {"hearth.dev/mig.config": "balanced", "hearth.dev/mig.config.state": "success"}}})
        );
        // A removed label is sent as null, which a merge patch deletes.
        let mut off = wanted();
        off.insert("hearth.dev/mig.config".into(), None);
        assert!(label_patch(&off).contains("\"hearth.dev/mig.config\":null"));
    }

    #[tokio::test]
    async fn a_refusal_names_the_missing_permission_and_the_loop_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut requests) = api_server(dir.path(), 403).await;
        let e = patch_node_labels(&s, "gpu-node-1", &wanted()).await.unwrap_err().to_string();
        assert!(e.contains("HTTP 403") && e.contains("patch on nodes"), "{e}");
        let _ = requests.recv().await;
        // The loop keeps trying (1 s backoff) and counts each failure.
        let (tx, rx) = watch::channel(wanted());
        let results = prometheus_client::metrics::family::Family::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(label_loop(s, "gpu-node-1".into(), rx, results.clone(), stop.clone()));
        tokio::time::timeout(Duration::from_secs(5), async {
            while results.get_or_create(&[("result", "error")]).get() < 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
        stop.cancel();
        task.await.unwrap();
        drop(tx);
        // Missing files and bad URLs are named.
        let bad = KubeSettings { api_server: "http://x".into(), token_file: "/nonexistent".into(), ca_file: "/nonexistent".into() };
        assert!(patch_node_labels(&bad, "n", &wanted()).await.unwrap_err().to_string().contains("expected https://"));
        let bad = KubeSettings { api_server: "https://localhost:1".into(), ..bad };
        assert!(patch_node_labels(&bad, "n", &wanted()).await.unwrap_err().to_string().contains("service account token /nonexistent"));
    }
}
