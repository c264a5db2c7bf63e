//! A client of the OCI distribution API, for what the runtime's own pull does slowly: fetching
//! a large layer over many connections with ranged GETs. It resolves a reference to the
//! manifest for this node's platform (through an index or manifest list), authenticates as
//! registries ask (anonymous or credentialed bearer tokens, basic), and follows blob
//! redirects to object storage without sending the registry's credentials there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::Reference;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest or index read (registries cap them at 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: registry answered {status}: {body}")]
    Status { url: String, status: StatusCode, body: String },
    #[error("{registry}: authentication failed: {message}")]
    Auth { registry: String, message: String },
    #[error("{reference}: {message}")]
    Manifest { reference: String, message: String },
    #[error("{url}: the registry ignored the Range header (answered the whole blob)")]
    RangeRefused { url: String },
}

impl RegistryError {
    /// A bad answer for this request that a retry may not repeat (a reset, a 5xx, a 429).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Http { .. } => true,
            RegistryError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            _ => false,
        }
    }
}

/// A username and password (or identity token as the password) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    fn basic(&self) -> String {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.username, self.password)))
    }
}

/// A content descriptor, as manifests list them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A manifest or index exactly as the registry sent it (its digest is of these bytes).
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub media_type: String,
    pub digest: String,
    pub bytes: Bytes,
}

impl RawManifest {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor { media_type: self.media_type.clone(), digest: self.digest.clone(), size: self.bytes.len() as u64, platform: None }
    }
}

/// What a reference resolved to for this platform: the documents to store and the blobs.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The index or manifest list the tag points at, when there is one.
    pub index: Option<RawManifest>,
    pub manifest: RawManifest,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Resolved {
    /// The digest the reference points at (what CRI reports as the repo digest).
    pub fn top_digest(&self) -> &str {
        self.index.as_ref().map_or(&self.manifest.digest, |i| &i.digest)
    }

    pub fn total_bytes(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// This machine's platform in OCI terms.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    };
    Platform { architecture: architecture.into(), os: "linux".into(), variant: None }
}

/// The index entry for `want`: same OS and architecture; among arm64 variants, `v8` or none.
pub fn select_platform<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    entries.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_some() && p.variant == want.variant
                    || want.variant.is_none() && matches!(p.variant.as_deref(), None | Some("v8") | Some("")))
        })
    })
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

#[derive(Debug)]
pub struct RegistryClient {
    http: HttpClient,
    creds: HashMap<String, Credentials>,
    /// Registries reached over plain HTTP besides loopback ones.
    insecure: Vec<String>,
    /// Bearer tokens by (registry, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
}

impl RegistryClient {
    /// `creds` by registry as references write it (`docker.io`, `host:port`).
    pub fn new(creds: HashMap<String, Credentials>, insecure: Vec<String>) -> Result<Self, RegistryError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| RegistryError::Http { url: "(TLS roots)".into(), message: format!("loading the system's CA certificates: {e}") })?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(64).build(https);
        Ok(Self { http, creds, insecure, tokens: Mutex::default() })
    }

    fn base(&self, r: &Reference) -> String {
        format!("{}/v2/{}", self.server_url(r), r.repository)
    }

    /// The registry's URL as containerd's host config names it (`server`).
    pub fn server_url(&self, r: &Reference) -> String {
        let plain = r.is_loopback() || self.insecure.iter().any(|h| h == &r.registry);
        format!("{}://{}", if plain { "http" } else { "https" }, r.api_host())
    }

    pub fn credentials(&self, r: &Reference) -> Option<&Credentials> {
        self.creds.get(&r.registry)
    }

    /// GET `path` under the repository with auth and redirects; `range` is inclusive.
    async fn get(
        &self,
        r: &Reference,
        path: &str,
        accept: Option<&str>,
        range: Option<(u64, u64)>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let scope = format!("repository:{}:pull", r.repository);
        let key = (r.registry.clone(), scope.clone());
        let mut url = format!("{}/{path}", self.base(r));
        let mut authorized_tried = false;
        let mut redirects = 0;
        let mut to_registry = true;
        loop {
            let mut req = Request::get(&url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some((a, b)) = range {
                req = req.header(RANGE, format!("bytes={a}-{b}"));
            }
            if to_registry {
                let token = self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
                if let Some(t) = token {
                    req = req.header(AUTHORIZATION, t);
                }
            }
            let req = req.body(Empty::new()).map_err(|e| RegistryError::Http { url: url.clone(), message: e.to_string() })?;
            let resp = tokio::time::timeout(HEAD_TIMEOUT, self.http.request(req))
                .await
                .map_err(|_| RegistryError::Http { url: url.clone(), message: format!("no answer within {HEAD_TIMEOUT:?}") })?
                .map_err(|e| RegistryError::Http { url: url.clone(), message: describe(&e) })?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && to_registry && !authorized_tried {
                authorized_tried = true;
                let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let auth = self.authorize(r, &challenge, &scope).await?;
                self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), auth);
                continue;
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                redirects += 1;
                let loc = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("");
                let next = url::Url::parse(&url)
                    .and_then(|u| u.join(loc))
                    .map_err(|e| RegistryError::Http { url: url.clone(), message: format!("bad redirect {loc:?}: {e}") })?;
                if redirects > MAX_REDIRECTS {
                    return Err(RegistryError::Http { url, message: format!("more than {MAX_REDIRECTS} redirects") });
                }
                // Credentials stay with the registry: a blob store gets a signed URL instead.
                let base_host = url::Url::parse(&self.base(r)).ok().and_then(|u| u.host_str().map(str::to_owned));
                to_registry = next.host_str().map(str::to_owned) == base_host;
                url = next.to_string();
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let body = read_small(resp, 4096).await.unwrap_or_default();
                return Err(RegistryError::Auth {
                    registry: r.registry.clone(),
                    message: format!("{status} for {url}: {}", String::from_utf8_lossy(&body).trim()),
                });
            }
            if !status.is_success() {
                let body = read_small(resp, 4096).await.unwrap_or_default();
                return Err(RegistryError::Status { url, status, body: String::from_utf8_lossy(&body).trim().to_owned() });
            }
            if range.is_some() && status == StatusCode::OK {
                return Err(RegistryError::RangeRefused { url });
            }
            return Ok(resp);
        }
    }

    /// Answers a `WWW-Authenticate` challenge: a bearer token from the realm (with basic
    /// credentials when configured), or basic credentials themselves.
    async fn authorize(&self, r: &Reference, challenge: &str, scope: &str) -> Result<String, RegistryError> {
        let auth_err = |message: String| RegistryError::Auth { registry: r.registry.clone(), message };
        let (scheme, params) = parse_challenge(challenge).ok_or_else(|| auth_err(format!("unreadable challenge {challenge:?}")))?;
        let creds = self.creds.get(&r.registry);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                creds.map(Credentials::basic).ok_or_else(|| auth_err("the registry wants credentials and none are configured".into()))
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| auth_err("bearer challenge without a realm".into()))?;
                let mut u = url::Url::parse(realm).map_err(|e| auth_err(format!("realm {realm:?}: {e}")))?;
                {
                    let mut q = u.query_pairs_mut();
                    if let Some(s) = params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", params.get("scope").map_or(scope, String::as_str));
                }
                let mut req = Request::get(u.as_str());
                if let Some(c) = creds {
                    req = req.header(AUTHORIZATION, c.basic());
                }
                let req = req.body(Empty::new()).map_err(|e| auth_err(e.to_string()))?;
                let resp = tokio::time::timeout(HEAD_TIMEOUT, self.http.request(req))
                    .await
                    .map_err(|_| auth_err(format!("token service {realm} did not answer within {HEAD_TIMEOUT:?}")))?
                    .map_err(|e| auth_err(format!("token service {realm}: {}", describe(&e))))?;
                let status = resp.status();
                let body = read_small(resp, 1 << 20).await.map_err(|e| auth_err(e.to_string()))?;
                if !status.is_success() {
                    return Err(auth_err(format!("token service {realm} answered {status}: {}", String::from_utf8_lossy(&body).trim())));
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body).map_err(|e| auth_err(format!("token service {realm}: {e}")))?;
                let t = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| auth_err(format!("token service {realm} sent no token")))?;
                Ok(format!("Bearer {t}"))
            }
            other => Err(auth_err(format!("unsupported auth scheme {other:?}"))),
        }
    }

    async fn fetch_manifest(&self, r: &Reference, reference: &str) -> Result<RawManifest, RegistryError> {
        let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ");
        let resp = self.get(r, &format!("manifests/{reference}"), Some(&accept), None).await?;
        let media_type =
            resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").split(';').next().unwrap_or("").trim().to_owned();
        let bytes = read_small(resp, MAX_MANIFEST)
            .await
            .map_err(|e| RegistryError::Manifest { reference: r.to_string(), message: e.to_string() })?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RegistryError::Manifest {
                reference: r.to_string(),
                message: format!("manifest {reference} arrived with digest {digest}"),
            });
        }
        Ok(RawManifest { media_type, digest, bytes })
    }

    /// Resolves `r` to the manifest for `platform` and its blobs.
    pub async fn resolve(&self, r: &Reference, platform: &Platform) -> Result<Resolved, RegistryError> {
        let bad = |message: String| RegistryError::Manifest { reference: r.to_string(), message };
        let top = self.fetch_manifest(r, r.manifest_ref()).await?;
        let doc: ManifestDoc =
            serde_json::from_slice(&top.bytes).map_err(|e| bad(format!("manifest is not JSON of the expected shape: {e}")))?;
        let mt = if top.media_type.is_empty() { doc.media_type.clone().unwrap_or_default() } else { top.media_type.clone() };
        let (index, manifest, doc) = if mt == OCI_INDEX || mt == DOCKER_LIST || doc.manifests.is_some() {
            let entries = doc.manifests.unwrap_or_default();
            let pick = select_platform(&entries, platform).ok_or_else(|| {
                let have: Vec<String> = entries
                    .iter()
                    .filter_map(|d| {
                        d.platform.as_ref().map(|p| {
                            format!("{}/{}{}", p.os, p.architecture, p.variant.as_ref().map(|v| format!("/{v}")).unwrap_or_default())
                        })
                    })
                    .collect();
                bad(format!("no manifest for {}/{} (the index has: {})", platform.os, platform.architecture, have.join(", ")))
            })?;
            let m = self.fetch_manifest(r, &pick.digest).await?;
            if m.bytes.len() as u64 != pick.size {
                return Err(bad(format!("manifest {} is {} bytes, the index says {}", pick.digest, m.bytes.len(), pick.size)));
            }
            let d: ManifestDoc = serde_json::from_slice(&m.bytes).map_err(|e| bad(format!("manifest {}: {e}", pick.digest)))?;
            let m = RawManifest { media_type: if m.media_type.is_empty() { pick.media_type.clone() } else { m.media_type }, ..m };
            (Some(RawManifest { media_type: mt, ..top }), m, d)
        } else {
            (None, RawManifest { media_type: mt, ..top }, doc)
        };
        if manifest.media_type != OCI_MANIFEST && manifest.media_type != DOCKER_MANIFEST {
            return Err(bad(format!("unsupported manifest type {:?} (expected an OCI or Docker v2 image manifest)", manifest.media_type)));
        }
        let config = doc.config.ok_or_else(|| bad("image manifest without a config".into()))?;
        let layers = doc.layers.unwrap_or_default();
        for d in std::iter::once(&config).chain(&layers) {
            let hex = d.digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("blob digest {:?} is not sha256", d.digest)));
            }
        }
        Ok(Resolved { index, manifest, config, layers })
    }

    /// A small blob (the image config) whole, checked against its digest.
    pub async fn blob(&self, r: &Reference, d: &Descriptor) -> Result<Bytes, RegistryError> {
        let resp = self.get(r, &format!("blobs/{}", d.digest), None, None).await?;
        let url = format!("{}/blobs/{}", self.base(r), d.digest);
        let bytes = read_small(resp, MAX_MANIFEST.max(d.size as usize))
            .await
            .map_err(|e| RegistryError::Http { url: url.clone(), message: e.to_string() })?;
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if got != d.digest {
            return Err(RegistryError::Manifest {
                reference: r.to_string(),
                message: format!("blob {} arrived with digest {got}", d.digest),
            });
        }
        Ok(bytes)
    }

    /// Bytes `start..=end` of a blob, as a streaming body.
    pub async fn blob_range(&self, r: &Reference, digest: &str, start: u64, end: u64) -> Result<Incoming, RegistryError> {
        Ok(self.get(r, &format!("blobs/{digest}"), None, Some((start, end))).await?.into_body())
    }
}

/// `Bearer realm="…",service="…"` → ("Bearer", {realm, service}).
pub fn parse_challenge(h: &str) -> Option<(String, HashMap<String, String>)> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, t)| (v, t))
        };
        params.insert(k.trim().to_ascii_lowercase(), v.to_owned());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_owned(), params))
}

async fn read_small(resp: Response<Incoming>, limit: usize) -> Result<Bytes, std::io::Error> {
    let body = http_body_util::Limited::new(resp.into_body(), limit);
    let collected = tokio::time::timeout(HEAD_TIMEOUT, body.collect())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "body did not arrive in time"))?
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(collected.to_bytes())
}

fn describe(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_quotes_and_commas() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        )
        .unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["scope"], "repository:library/ubuntu:pull");
        let (s, p) = parse_challenge(r#"Basic realm="ecr""#).unwrap();
        assert_eq!((s.as_str(), p["realm"].as_str()), ("Basic", "ecr"));
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn platform_selection_takes_os_arch_and_the_plain_arm64_variant() {
        let d = |arch: &str, variant: Option<&str>, digest: &str| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: digest.into(),
            size: 1,
            platform: Some(Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(Into::into) }),
        };
        let entries = vec![d("arm", Some("v7"), "a"), d("arm64", Some("v8"), "b"), d("amd64", None, "c")];
        let want = |a: &str| Platform { architecture: a.into(), os: "linux".into(), variant: None };
        assert_eq!(select_platform(&entries, &want("amd64")).unwrap().digest, "c");
        assert_eq!(select_platform(&entries, &want("arm64")).unwrap().digest, "b");
        assert!(select_platform(&entries, &want("s390x")).is_none());
        assert_eq!(host_platform().os, "linux");
    }
}
