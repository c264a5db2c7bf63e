//! Hearth as a registry mirror for its own pulls. containerd's fetcher writes blobs inside
//! containerd, which costs a third of the CPU that writing them through its content gRPC API
//! does (measured: docs/benchmarks.md), so the fast path lets containerd's CRI pull do the
//! writing and serves it each blob from parallel ranged GETs to the registry, in order, as
//! they arrive.
//!
//! It serves only the blobs of pulls in flight (offered by digest), under a random path that
//! only containerd's host config names: a process that can reach the port learns nothing it
//! could not fetch itself. Anything it will not or cannot serve is a 404 or a 502, and
//! containerd takes the blob from the registry instead. containerd checks every blob's digest
//! at commit, as it does for the registry's own answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use super::pull::{Job, Progress, PullError, fetch_chunk};
use super::reference::Reference;
use super::registry::RegistryClient;
use crate::cache::ratelimit::RateLimiter;

/// Ranged GETs in flight for one blob (containerd fetches 3 blobs at a time by default).
const PER_BLOB: usize = 8;
/// A blob the mirror failed this many times is left to the registry for the rest of the pull.
const GIVE_UP_AFTER: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("image mirror: cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(
        "image mirror: it listens on {0}, an address containerd cannot dial; set images.mirror_address (or POD_IP) to the address containerd reaches this agent at"
    )]
    NoAddress(SocketAddr),
    #[error("image mirror: needs a tokio runtime to serve")]
    NoRuntime,
}

/// What one pull learns from the mirror.
#[derive(Debug, Default)]
pub struct Share {
    pub progress: Arc<Progress>,
    /// Bytes the mirror handed to containerd.
    pub served: AtomicU64,
    /// Bytes containerd already had when it asked (resumed downloads).
    pub resumed: AtomicU64,
    failures: Mutex<HashMap<String, (u32, &'static str, String)>>,
}

impl Share {
    pub fn new(progress: Arc<Progress>) -> Arc<Self> {
        Arc::new(Self { progress, ..Default::default() })
    }

    /// `given_up`: containerd has already gone to the registry for this blob.
    fn fail(&self, digest: &str, e: &PullError, given_up: bool) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let entry = f.entry(digest.to_owned()).or_insert((0, "", String::new()));
        entry.0 = if given_up { entry.0.max(GIVE_UP_AFTER) } else { entry.0 + 1 };
        entry.1 = e.reason();
        entry.2 = e.to_string();
    }

    fn gave_up(&self, digest: &str) -> bool {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).get(digest).is_some_and(|f| f.0 >= GIVE_UP_AFTER)
    }

    /// Why a blob was left to the registry, when one was: the pull then counts as a fallback.
    pub fn fallback(&self) -> Option<(&'static str, String)> {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.iter().find(|(_, v)| v.0 >= GIVE_UP_AFTER).map(|(d, v)| (v.1, format!("blob {d}: {}", v.2)))
    }
}

#[derive(Debug, Clone)]
struct Offered {
    reference: Reference,
    size: u64,
    layer: bool,
    share: Arc<Share>,
    count: usize,
}

#[derive(Debug)]
struct Inner {
    token: String,
    registry: Arc<RegistryClient>,
    chunk: u64,
    /// Ranged GETs in flight over all blobs.
    conns: Arc<Semaphore>,
    per_blob: usize,
    limit: Option<Arc<RateLimiter>>,
    offers: Mutex<HashMap<String, Offered>>,
}

/// The mirror's server; stops when dropped.
#[derive(Debug)]
pub struct Mirror {
    root: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The blobs one pull offers; withdrawn when dropped.
#[derive(Debug)]
pub struct Offers {
    inner: Arc<Inner>,
    digests: Vec<String>,
}

impl Drop for Offers {
    fn drop(&mut self) {
        let mut o = self.inner.offers.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(e) = o.get_mut(d) {
                e.count -= 1;
                if e.count == 0 {
                    o.remove(d);
                }
            }
        }
    }
}

impl Mirror {
    /// Listens on `listen` and serves until dropped. `address` is the IP containerd dials;
    /// default: the listen address when it is a specific one.
    pub fn start(
        listen: SocketAddr,
        address: Option<IpAddr>,
        registry: Arc<RegistryClient>,
        connections: usize,
        chunk: u64,
        limit: Option<Arc<RateLimiter>>,
    ) -> Result<Self, MirrorError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| MirrorError::NoRuntime)?;
        let std_listener = std::net::TcpListener::bind(listen).map_err(|source| MirrorError::Listen { addr: listen, source })?;
        std_listener.set_nonblocking(true).map_err(|source| MirrorError::Listen { addr: listen, source })?;
        let local = std_listener.local_addr().map_err(|source| MirrorError::Listen { addr: listen, source })?;
        let ip = match address {
            Some(ip) => ip,
            None if local.ip().is_unspecified() => return Err(MirrorError::NoAddress(local)),
            None => local.ip(),
        };
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let root = format!("http://{}/{token}/v2", SocketAddr::new(ip, local.port()));
        let connections = connections.max(1);
        let inner = Arc::new(Inner {
            token,
            registry,
            chunk: chunk.max(1 << 20),
            conns: Arc::new(Semaphore::new(connections)),
            per_blob: connections.min(PER_BLOB),
            limit,
            offers: Mutex::default(),
        });
        let app = axum::Router::new().route("/{token}/v2/{*rest}", axum::routing::get(blob)).with_state(inner.clone());
        let task = handle.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "image mirror: listener unusable");
                    return;
                }
            };
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "image mirror stopped");
            }
        });
        debug!(root = %root.replace(&inner.token, "…"), "image mirror listening");
        Ok(Self { root, inner, task })
    }

    /// The API root containerd's host config names (`http://ip:port/<token>/v2`).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Offers `blobs` (digest, size, is a layer) of `reference` to containerd.
    pub fn offer(&self, reference: &Reference, blobs: &[(String, u64, bool)], share: &Arc<Share>) -> Offers {
        let mut o = self.inner.offers.lock().unwrap_or_else(|p| p.into_inner());
        for (digest, size, layer) in blobs {
            o.entry(digest.clone())
                .or_insert_with(|| Offered { reference: reference.clone(), size: *size, layer: *layer, share: share.clone(), count: 0 })
                .count += 1;
        }
        Offers { inner: self.inner.clone(), digests: blobs.iter().map(|b| b.0.clone()).collect() }
    }
}

fn status(code: StatusCode) -> Response {
    code.into_response()
}

/// `bytes=N-` or `bytes=N-M` (containerd resumes with the first); the start.
fn range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::RANGE)?.to_str().ok()?;
    let spec = v.strip_prefix("bytes=")?;
    let (start, _) = spec.split_once('-')?;
    start.trim().parse().ok()
}

async fn blob(
    State(inner): State<Arc<Inner>>,
    UrlPath((token, rest)): UrlPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if token != inner.token {
        return status(StatusCode::NOT_FOUND);
    }
    let Some((_, digest)) = rest.rsplit_once("blobs/") else { return status(StatusCode::NOT_FOUND) };
    let offered = inner.offers.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned();
    let Some(o) = offered else { return status(StatusCode::NOT_FOUND) };
    if o.share.gave_up(digest) {
        return status(StatusCode::NOT_FOUND);
    }
    let from = range_start(&headers).filter(|&s| s < o.size).unwrap_or(0);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, o.size - from)
        .header("Docker-Content-Digest", digest);
    if from > 0 {
        resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {from}-{}/{}", o.size - 1, o.size)).unwrap_or(HeaderValue::from_static("")),
        );
    }
    if method == Method::HEAD {
        return resp.body(Body::empty()).unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR));
    }
    if from > 0 {
        o.share.resumed.fetch_add(from, Ordering::Relaxed);
        o.share.progress.done.fetch_add(from, Ordering::Relaxed);
    }
    let mut rx = stream(inner.clone(), o.clone(), digest.to_owned(), from);
    // The first piece decides: a registry that refuses ranges or credentials fails here, while
    // containerd can still take the blob from the registry itself.
    let first = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            warn!(digest, error = %e, "image mirror: cannot serve a blob; containerd takes it from the registry");
            o.share.fail(digest, &e, true);
            return status(StatusCode::BAD_GATEWAY);
        }
        None => return status(StatusCode::BAD_GATEWAY),
    };
    let share = o.share.clone();
    let d = digest.to_owned();
    let rest = ReceiverStream::new(rx).map(move |r| {
        r.map_err(|e| {
            // Mid-blob: containerd reconnects from where it stands (a Range), up to its limit.
            warn!(digest = %d, error = %e, "image mirror: a blob broke off");
            share.fail(&d, &e, false);
            std::io::Error::other(e.to_string())
        })
    });
    let body = tokio_stream::once(Ok::<_, std::io::Error>(first)).chain(rest);
    resp.body(Body::from_stream(body)).unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
}

type Piece = Result<(u64, Bytes, tokio::sync::OwnedSemaphorePermit), PullError>;

/// The blob from `from` to its end, in order, from parallel ranged GETs. Memory: at most
/// `per_blob + 2` chunks. Dropping the receiver (containerd hung up) stops the GETs.
fn stream(inner: Arc<Inner>, o: Offered, digest: String, from: u64) -> mpsc::Receiver<Result<Bytes, PullError>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut jobs = VecDeque::new();
        let mut s = from;
        while s < o.size {
            let e = (s + inner.chunk).min(o.size);
            jobs.push_back(Job { layer: 0, digest: digest.clone(), start: s, end: e });
            s = e;
        }
        let fetchers = inner.per_blob.min(jobs.len()).max(1);
        // Jobs go out in order and each holds a window permit until sent on, so the piece the
        // stream waits for always holds one: the window cannot fill with later pieces only.
        let window = Arc::new(Semaphore::new(fetchers + 2));
        let jobs = Arc::new(Mutex::new(jobs));
        let (ptx, mut prx) = mpsc::unbounded_channel::<Piece>();
        let mut set = JoinSet::new();
        for _ in 0..fetchers {
            let (inner, jobs, window, ptx, r) = (inner.clone(), jobs.clone(), window.clone(), ptx.clone(), o.reference.clone());
            set.spawn(async move {
                loop {
                    let Ok(permit) = window.clone().acquire_owned().await else { return };
                    let Some(job) = jobs.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { return };
                    let Ok(conn) = inner.conns.acquire().await else { return };
                    if let Some(l) = &inner.limit {
                        l.acquire(job.end - job.start).await;
                    }
                    let res = fetch_chunk(&inner.registry, &r, &job).await;
                    drop(conn);
                    let failed = res.is_err();
                    if ptx.send(res.map(|d| (job.start, d, permit))).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(ptx);
        let mut next = from;
        let mut waiting = BTreeMap::new();
        while next < o.size {
            match prx.recv().await {
                Some(Ok((start, data, permit))) => {
                    waiting.insert(start, (data, permit));
                    while let Some((data, permit)) = waiting.remove(&next) {
                        let n = data.len() as u64;
                        if tx.send(Ok(data)).await.is_err() {
                            return;
                        }
                        drop(permit);
                        next += n;
                        o.share.served.fetch_add(n, Ordering::Relaxed);
                        o.share.progress.done.fetch_add(n, Ordering::Relaxed);
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                None => {
                    let _ = tx.send(Err(PullError::Internal(format!("blob {digest}: pieces stopped arriving at {next}")))).await;
                    return;
                }
            }
        }
        if o.layer {
            o.share.progress.layers_done.fetch_add(1, Ordering::Relaxed);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_starts_are_read_from_both_forms_and_junk_is_ignored() {
        let mut h = HeaderMap::new();
        assert_eq!(range_start(&h), None);
        h.insert(header::RANGE, HeaderValue::from_static("bytes=1024-"));
        assert_eq!(range_start(&h), Some(1024));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=5-9"));
        assert_eq!(range_start(&h), Some(5));
        h.insert(header::RANGE, HeaderValue::from_static("items=5-"));
        assert_eq!(range_start(&h), None);
    }

    #[tokio::test]
    async fn an_unspecified_listen_address_needs_an_address_to_advertise() {
        let reg = Arc::new(RegistryClient::new(HashMap::new(), vec![]).unwrap());
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let e = Mirror::start(any, None, reg.clone(), 4, 8 << 20, None).unwrap_err();
        assert!(e.to_string().contains("mirror_address"), "{e}");
        let m = Mirror::start(any, Some("10.0.0.7".parse().unwrap()), reg.clone(), 4, 8 << 20, None).unwrap();
        assert!(m.root().starts_with("http://10.0.0.7:") && m.root().ends_with("/v2"), "{}", m.root());
        let m = Mirror::start("127.0.0.1:0".parse().unwrap(), None, reg, 4, 8 << 20, None).unwrap();
        assert!(m.root().starts_with("http://127.0.0.1:"), "{}", m.root());
    }
}
