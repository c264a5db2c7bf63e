//! A loopback HTTP/1.1 proxy in front of a [`Registry`](crate::registry::Registry) that
//! makes it behave like the registries an image puller meets in production: a bandwidth
//! cap per client connection (object-storage-backed registries such as ECR serve each
//! connection at ~90 MB/s, so speed comes from parallel ranged requests), latency before
//! every response, no support for ranges, the Docker token flow (401 with a
//! `WWW-Authenticate: Bearer` challenge, a token endpoint checking Basic credentials), and a
//! flipped byte in chosen blobs. Counters say what clients did.
//!
//! Every setting can change while the proxy runs; a change applies from the next request
//! (the rate cap: from the next piece of a response body). Bodies stream through in both
//! directions, never buffered whole; client connections are kept alive and upstream
//! connections pooled.
//!
//! Requests reach the registry with the client's Host header, so the absolute `Location`
//! URLs the registry builds for uploads point back through the proxy; a `Location` naming
//! the registry's own address is rewritten to the proxy's, any other (a redirect to blob
//! storage) passes unchanged.
//!
//! [`crate::faultproxy`] is the S3-side counterpart, breaking single responses at the byte
//! level; this one shapes whole sessions.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, Sleep};

/// The `service` the token challenge names and the token endpoint accepts.
pub const SERVICE: &str = "hearth-test-registry";
/// What the token endpoint says a token lasts (it never checks: tests do not run that long).
pub const TOKEN_EXPIRES_IN_SECS: u64 = 300;
/// How far ahead of the cap a connection may get after idling: small, so even a short
/// transfer feels the cap.
const BURST: Duration = Duration::from_millis(10);
/// A token-request body larger than this is refused.
const MAX_FORM: usize = 16 * 1024;

/// How the proxy behaves; each field can also be changed at run time (`RegProxy::set_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegProxyOptions {
    /// Caps each client connection's response-body bytes per second (a token bucket per
    /// connection, shared by the requests made on it). `None`: uncapped.
    pub per_connection_bytes_per_sec: Option<u64>,
    /// Waited before each request is answered.
    pub latency: Duration,
    /// Drops `Range` (and `If-Range`) from requests, so every GET answers 200 with the whole
    /// body, as a registry without range support does.
    pub refuse_ranges: bool,
    /// `Some((user, password))`: `/v2/` requests need a bearer token from `/token`, which
    /// hands them out for these Basic credentials only (anonymous requests are denied).
    pub token_auth: Option<(String, String)>,
}

/// What clients did; see [`RegProxy::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegProxyStats {
    /// Every request received, token requests and refused ones included.
    pub requests: u64,
    /// Requests that carried a `Range` header (counted whether or not it was honoured).
    pub range_requests: u64,
    /// Response-body bytes relayed from the registry to clients.
    pub bytes_served: u64,
    /// Requests to the token endpoint, granted or not.
    pub token_requests: u64,
    /// `/v2/` requests answered 401 for a missing or unknown token.
    pub unauthorized: u64,
    /// Client connections accepted.
    pub connections: u64,
}

pub struct RegProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for RegProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegProxy").field("addr", &self.addr).field("upstream", &self.shared.upstream).finish()
    }
}

struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    opts: Mutex<RegProxyOptions>,
    corrupt: Mutex<HashSet<String>>,
    tokens: Mutex<HashSet<String>>,
    client: Client<HttpConnector, Incoming>,
    requests: AtomicU64,
    range_requests: AtomicU64,
    bytes_served: AtomicU64,
    token_requests: AtomicU64,
    unauthorized: AtomicU64,
    connections: AtomicU64,
}

impl Shared {
    fn opts(&self) -> RegProxyOptions {
        self.opts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn rate(&self) -> Option<u64> {
        self.opts.lock().unwrap_or_else(PoisonError::into_inner).per_connection_bytes_per_sec.filter(|r| *r > 0)
    }
}

impl RegProxy {
    /// Listens on a loopback port the kernel picks and proxies to the registry at
    /// `upstream` until dropped.
    pub async fn start(upstream: SocketAddr, opts: RegProxyOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            addr,
            opts: Mutex::new(opts),
            corrupt: Mutex::default(),
            tokens: Mutex::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            requests: AtomicU64::new(0),
            range_requests: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Owned by this task, so aborting it on drop aborts every connection too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            s.connections.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.set_nodelay(true);
                            let s = s.clone();
                            // One pacer per connection: the cap is per connection, not per request.
                            let pacer = Arc::new(Mutex::new(Pacer::default()));
                            let svc = hyper::service::service_fn(move |req| handle(s.clone(), pacer.clone(), req));
                            conns.spawn(async move {
                                // A client that goes away mid-response is its own business.
                                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                            });
                        }
                        // Out of file descriptors, say: back off rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`: the registry part of an image reference pulled through the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint the challenge names: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn set_per_connection_bytes_per_sec(&self, rate: Option<u64>) {
        self.update(|o| o.per_connection_bytes_per_sec = rate);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.update(|o| o.latency = latency);
    }

    pub fn set_refuse_ranges(&self, refuse: bool) {
        self.update(|o| o.refuse_ranges = refuse);
    }

    /// Turns token auth on with these credentials, or off. Tokens already handed out stay
    /// valid.
    pub fn set_token_auth(&self, credentials: Option<(&str, &str)>) {
        self.update(|o| o.token_auth = credentials.map(|(u, p)| (u.to_owned(), p.to_owned())));
    }

    /// Forgets every token handed out, so clients must fetch new ones (a token expiring).
    pub fn revoke_tokens(&self) {
        self.shared.tokens.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn update(&self, f: impl FnOnce(&mut RegProxyOptions)) {
        f(&mut self.shared.opts.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn options(&self) -> RegProxyOptions {
        self.shared.opts()
    }

    /// From now on, GET responses for blob `digest` (`sha256:...`) carry one byte inverted:
    /// the blob's middle byte (offset `size / 2`), in whole and ranged responses alike, so
    /// ranges put together give the blob with exactly that byte wrong. (A 200 must carry a
    /// Content-Length for the proxy to know the middle; docker-registry's always do.)
    pub fn corrupt_blob(&self, digest: &str) {
        self.shared.corrupt.lock().unwrap_or_else(PoisonError::into_inner).insert(digest.to_owned());
    }

    /// Serves blob `digest` intact again.
    pub fn heal_blob(&self, digest: &str) {
        self.shared.corrupt.lock().unwrap_or_else(PoisonError::into_inner).remove(digest);
    }

    pub fn stats(&self) -> RegProxyStats {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RegProxyStats {
            requests: get(&s.requests),
            range_requests: get(&s.range_requests),
            bytes_served: get(&s.bytes_served),
            token_requests: get(&s.token_requests),
            unauthorized: get(&s.unauthorized),
            connections: get(&s.connections),
        }
    }
}

impl Drop for RegProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ProxyResponse = Response<BoxBody<Bytes, hyper::Error>>;

async fn handle(shared: Arc<Shared>, pacer: Arc<Mutex<Pacer>>, mut req: Request<Incoming>) -> Result<ProxyResponse, Infallible> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if req.headers().contains_key(header::RANGE) {
        shared.range_requests.fetch_add(1, Ordering::Relaxed);
    }
    let opts = shared.opts();
    if !opts.latency.is_zero() {
        tokio::time::sleep(opts.latency).await;
    }
    let path = req.uri().path().to_owned();
    if let Some((user, password)) = &opts.token_auth {
        if path == "/token" {
            shared.token_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(token_endpoint(&shared, req, user, password).await);
        }
        if (path == "/v2" || path.starts_with("/v2/")) && !has_valid_token(&shared, req.headers()) {
            shared.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Ok(challenge(&shared, req.method(), &path));
        }
    }
    if opts.refuse_ranges {
        req.headers_mut().remove(header::RANGE);
        req.headers_mut().remove(header::IF_RANGE);
    }
    let corrupt = req.method() == Method::GET
        && blob_digest(&path).is_some_and(|d| shared.corrupt.lock().unwrap_or_else(PoisonError::into_inner).contains(d));
    Ok(forward(&shared, pacer, req, corrupt).await)
}

/// Sends `req` to the registry and streams its answer back through a [`ProxyBody`].
async fn forward(shared: &Arc<Shared>, pacer: Arc<Mutex<Pacer>>, req: Request<Incoming>, corrupt: bool) -> ProxyResponse {
    let (mut parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = match format!("http://{}{target}", shared.upstream).parse() {
        Ok(u) => u,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad request target {target:?}: {e}")),
    };
    strip_hop_by_hop(&mut parts.headers);
    let resp = match shared.client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("registry at {} failed: {e}", shared.upstream)),
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    rewrite_location(&mut parts.headers, shared.upstream, shared.addr);
    let flip_at = if corrupt { flip_offset(parts.status, &parts.headers) } else { None };
    let body = ProxyBody { inner: body, pending: None, ready: None, sleep: None, pacer, shared: shared.clone(), offset: 0, flip_at };
    Response::from_parts(parts, body.boxed())
}

/// Headers that belong to one connection, not to the message (RFC 9110, 7.6.1), minus
/// `Transfer-Encoding`, which hyper sets from the body it is given.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for n in named.iter().map(String::as_str).chain(["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"]) {
        h.remove(n);
    }
}

/// A `Location` naming the registry itself is made to name the proxy.
fn rewrite_location(h: &mut HeaderMap, upstream: SocketAddr, proxy: SocketAddr) {
    let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) else { return };
    let from = format!("http://{upstream}/");
    if let Some(rest) = loc.strip_prefix(&from)
        && let Ok(v) = HeaderValue::from_str(&format!("http://{proxy}/{rest}"))
    {
        h.insert(header::LOCATION, v);
    }
}

/// The digest in `/v2/<repo>/blobs/<digest>`, not in `/v2/<repo>/blobs/uploads/...`.
fn blob_digest(path: &str) -> Option<&str> {
    let (_, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    (digest.starts_with("sha256:") && !digest.contains('/')).then_some(digest)
}

/// The repository in a `/v2/<repo>/{manifests,blobs,tags}/...` path.
fn repository(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"].iter().filter_map(|k| rest.rfind(k)).min().map(|i| &rest[..i]).filter(|r| !r.is_empty())
}

/// Where in this response's body the corrupted blob's middle byte falls, if it does.
fn flip_offset(status: StatusCode, h: &HeaderMap) -> Option<u64> {
    let header = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    match status {
        StatusCode::OK => {
            let len: u64 = header(header::CONTENT_LENGTH)?.trim().parse().ok()?;
            (len > 0).then_some(len / 2)
        }
        StatusCode::PARTIAL_CONTENT => {
            // `bytes FIRST-LAST/TOTAL`
            let spec = header(header::CONTENT_RANGE)?.trim().strip_prefix("bytes ")?;
            let (range, total) = spec.split_once('/')?;
            let (first, last) = range.split_once('-')?;
            let (first, last, total): (u64, u64, u64) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
            let middle = total / 2;
            (total > 0 && (first..=last).contains(&middle)).then(|| middle - first)
        }
        _ => None,
    }
}

fn has_valid_token(shared: &Shared, h: &HeaderMap) -> bool {
    let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, token)) = v.split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && shared.tokens.lock().unwrap_or_else(PoisonError::into_inner).contains(token.trim())
}

/// 401 with the challenge a token-authenticating registry sends.
fn challenge(shared: &Shared, method: &Method, path: &str) -> ProxyResponse {
    let mut value = format!("Bearer realm=\"http://{}/token\",service=\"{SERVICE}\"", shared.addr);
    if let Some(repo) = repository(path) {
        let actions = if matches!(*method, Method::GET | Method::HEAD) { "pull" } else { "pull,push" };
        value.push_str(&format!(",scope=\"repository:{repo}:{actions}\""));
    }
    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
    let mut resp = json(StatusCode::UNAUTHORIZED, body.to_owned());
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// The token endpoint: GET with Basic credentials (the Docker token flow), or POST with a
/// `grant_type=password` form (the OAuth2 flow containerd tries first when it has
/// credentials). Anonymous requests and wrong credentials get 401.
async fn token_endpoint(shared: &Shared, req: Request<Incoming>, user: &str, password: &str) -> ProxyResponse {
    let query = req.uri().query().map(parse_form).unwrap_or_default();
    let basic = basic_credentials(req.headers());
    let credentials = match *req.method() {
        Method::GET => basic,
        Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("token request body: {e}")),
            };
            let form = parse_form(&String::from_utf8_lossy(&body));
            let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if field("grant_type").as_deref() != Some("password") {
                return json(StatusCode::BAD_REQUEST, r#"{"error":"unsupported_grant_type"}"#.to_owned());
            }
            field("username").zip(field("password")).or(basic)
        }
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST".to_owned()),
    };
    if credentials.as_ref().is_none_or(|(u, p)| u != user || p != password) {
        let mut resp = json(StatusCode::UNAUTHORIZED, r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}"#.to_owned());
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"hearth-test-registry\""));
        return resp;
    }
    let token = format!("hearth-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    shared.tokens.lock().unwrap_or_else(PoisonError::into_inner).insert(token.clone());
    let scope = query.iter().find(|(k, _)| k == "scope").map(|(_, v)| v.as_str()).unwrap_or_default();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_EXPIRES_IN_SECS,
        "scope": scope,
    });
    json(StatusCode::OK, body.to_string())
}

/// `user:password` from `Authorization: Basic ...`.
fn basic_credentials(h: &HeaderMap) -> Option<(String, String)> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// `a=1&b=x%20y` (query strings and `application/x-www-form-urlencoded` bodies).
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// Decodes `%XX` and `+`; a malformed escape is kept as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn full(body: String) -> BoxBody<Bytes, hyper::Error> {
    Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed()
}

fn json(status: StatusCode, body: String) -> ProxyResponse {
    respond(status, "application/json", body)
}

fn text(status: StatusCode, body: String) -> ProxyResponse {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> ProxyResponse {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    resp
}

/// When a connection may send its next bytes under the rate cap.
#[derive(Debug, Default)]
struct Pacer {
    next: Option<Instant>,
}

impl Pacer {
    /// Books `n` bytes at `rate` bytes/s; returns when they may go. An idle connection
    /// banks at most `BURST` of credit.
    fn reserve(&mut self, n: usize, rate: u64) -> Instant {
        let now = Instant::now();
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = self.next.map_or(floor, |t| t.max(floor));
        self.next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        start
    }
}

/// How much one paced piece holds: about 10 ms at the rate, between 1 KiB and 256 KiB, so a
/// slow cap is smooth and a fast one does not wake up for every few bytes.
fn piece_len(rate: u64) -> usize {
    usize::try_from(rate / 100).unwrap_or(usize::MAX).clamp(1024, 256 * 1024)
}

/// The registry's response body on its way to the client: paced by the connection's
/// [`Pacer`], counted, and with one byte inverted at `flip_at` if set.
struct ProxyBody {
    inner: Incoming,
    /// Data from upstream not yet paced.
    pending: Option<Bytes>,
    /// A piece already paced, sent once `sleep` ends.
    ready: Option<Bytes>,
    sleep: Option<Pin<Box<Sleep>>>,
    pacer: Arc<Mutex<Pacer>>,
    shared: Arc<Shared>,
    /// Body bytes handed on so far (where `pending` starts).
    offset: u64,
    flip_at: Option<u64>,
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if let Some(piece) = this.ready.take() {
                this.shared.bytes_served.fetch_add(piece.len() as u64, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if let Some(mut data) = this.pending.take() {
                let rate = this.shared.rate();
                let n = rate.map_or(data.len(), |r| data.len().min(piece_len(r)));
                let mut piece = data.split_to(n);
                if !data.is_empty() {
                    this.pending = Some(data);
                }
                let start = this.offset;
                this.offset += n as u64;
                if let Some(at) = this.flip_at.filter(|at| (start..this.offset).contains(at)) {
                    let mut bytes = BytesMut::from(piece);
                    let i = (at - start) as usize;
                    bytes[i] ^= 0xff;
                    piece = bytes.freeze();
                }
                if let Some(rate) = rate {
                    let at = this.pacer.lock().unwrap_or_else(PoisonError::into_inner).reserve(n, rate);
                    if at > Instant::now() {
                        this.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                    }
                }
                this.ready = Some(piece);
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => this.pending = Some(data),
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.ready.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.pending.as_ref().map_or(0, Bytes::len) + self.ready.as_ref().map_or(0, Bytes::len);
        let inner = self.inner.size_hint();
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + held as u64),
            None => {
                let mut h = SizeHint::new();
                h.set_lower(inner.lower() + held as u64);
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_repository_and_blob() {
        assert_eq!(repository("/v2/hearth/small/manifests/v1"), Some("hearth/small"));
        assert_eq!(repository("/v2/a/blobs/uploads/x"), Some("a"));
        assert_eq!(repository("/v2/"), None);
        assert_eq!(blob_digest("/v2/a/b/blobs/sha256:abc"), Some("sha256:abc"));
        assert_eq!(blob_digest("/v2/a/blobs/uploads/"), None);
        assert_eq!(blob_digest("/v2/a/manifests/sha256:abc"), None);
    }

    #[test]
    fn the_flipped_byte_is_the_blobs_middle_in_any_range() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        assert_eq!(flip_offset(StatusCode::OK, &h), Some(500));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("bytes 400-599/1000"));
        assert_eq!(flip_offset(StatusCode::PARTIAL_CONTENT, &h), Some(100));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("bytes 0-499/1000"));
        assert_eq!(flip_offset(StatusCode::PARTIAL_CONTENT, &h), None);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("bytes */1000"));
        assert_eq!(flip_offset(StatusCode::PARTIAL_CONTENT, &h), None);
    }

    #[test]
    fn forms_decode_escapes_and_keep_malformed_ones() {
        let f = parse_form("grant_type=password&username=a%40b&password=p+q%2&scope=repository%3Ax%3Apull");
        assert_eq!(f[1], ("username".into(), "a@b".into()));
        assert_eq!(f[2], ("password".into(), "p q%2".into()));
        assert_eq!(f[3].1, "repository:x:pull");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_a_connection_to_its_rate_with_a_small_burst() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let first = p.reserve(1000, 100_000);
        assert!(first <= t0, "an idle connection starts at once");
        // 1000 bytes at 100 kB/s take 10 ms: the next piece waits for them, less the burst.
        let second = p.reserve(1000, 100_000);
        assert_eq!(second, first + Duration::from_millis(10));
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = p.reserve(1000, 100_000);
        assert_eq!(later, Instant::now() - BURST, "idle time banks at most the burst");
    }
}
