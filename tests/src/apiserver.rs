//! An API-shaped Kubernetes test server. No kube-apiserver can run on our machines, so
//! Hearth's kube-rs code is tested against this: a plain-HTTP server (reached through a
//! kubeconfig with a bearer token) that keeps real object JSON, checks each request the
//! way the API server would where Hearth depends on it, and can misbehave on purpose.
//!
//! What it checks and models:
//! - RBAC: every request maps to (API group, resource, verb); one outside the rules it was
//!   started with gets 403 with a Status object and is recorded in [`ApiServer::forbidden`].
//! - Server-side apply (`application/apply-patch+yaml`, `fieldManager` required): labels
//!   and status conditions are owned per field manager; an apply that leaves out a label or
//!   condition its manager owned removes it; other managers' fields are untouched.
//! - Merge patches carrying `metadata.resourceVersion` and PUTs are optimistic: a stale
//!   version gets 409 Conflict; POST of an existing name gets 409 AlreadyExists.
//! - LIST and WATCH of pods, cluster-wide or in a namespace, with `fieldSelector`
//!   `spec.nodeName=...` and `metadata.name=...`; watch events are newline-delimited JSON,
//!   resumed from `resourceVersion`; after [`ApiServer::compact`] a watch from an older
//!   version gets a 410 Gone ERROR event, as after etcd compaction.
//! - Pods created, read and deleted in a namespace: a create checks the name is free in the
//!   namespace, a delete honours a UID precondition (409 on a mismatch) and only marks the
//!   pod (`deletionTimestamp`, grace period): it is gone when the kubelet says so.
//!   [`ApiServer::kubelet`] runs such a kubelet for one node: it runs each bound pod's
//!   container command as a local process (the pod's IP is 127.0.0.1), reports its status
//!   (Pending while "pulling", Running, then Failed/Succeeded with the exit code), and on
//!   deletion sends SIGTERM, SIGKILL after the grace period, then removes the pod.
//! - Faults: the next N requests for a (verb, resource) answer with a given status (403,
//!   409, 422, 429 with Retry-After, 500); [`ApiServer::stop`] takes the server away
//!   (connections closed, port refused) and [`ApiServer::restart`] brings it back on the
//!   same port with the same objects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "hearth-test-token";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub content_type: String,
    pub body: Value,
    pub status: u16,
}

impl Request {
    pub fn is(&self, verb: &str, resource: &str) -> bool {
        self.verb == verb && self.resource == resource
    }
}

/// Answer the next `times` requests for (verb, resource) with `status`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub verb: String,
    pub resource: String,
    pub status: u16,
    pub times: usize,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    nodes: BTreeMap<String, Value>,
    /// By UID.
    pods: BTreeMap<String, Value>,
    pod_events: Vec<(u64, &'static str, Value)>,
    /// (group/resource, namespace, name) -> object, for leases and events.
    objects: BTreeMap<(String, String, String), Value>,
    /// (object key, field manager) -> label keys, and -> condition types.
    owned_labels: BTreeMap<(String, String), BTreeSet<String>>,
    owned_conditions: BTreeMap<(String, String), BTreeSet<String>>,
    log: Vec<Request>,
    faults: Vec<Fault>,
    rules: BTreeSet<(String, String, String)>,
    forbidden: Vec<String>,
    /// The longest a watch is held open, whatever the client asks (a real API server
    /// also ends watches on its own schedule).
    watch_cap: Option<Duration>,
}

struct Shared {
    st: Mutex<State>,
    /// Bumped on every pod change; watches wait on it.
    changed: watch::Sender<u64>,
    /// Cancelled to end every open watch (compaction, stop).
    watches: Mutex<CancellationToken>,
}

impl Shared {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running server.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Mutex<Option<CancellationToken>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.addr).finish()
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
    r
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        _ => "InternalError",
    }
}

/// RFC 7386 merge.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// (group, resource incl. subresource, namespace, name) from an API path.
fn route(path: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", g, _v, rest @ ..] => ((*g).to_owned(), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        r => (None, r),
    };
    match rest {
        [res] => Some((group, (*res).to_owned(), ns, None)),
        [res, name] => Some((group, (*res).to_owned(), ns, Some((*name).to_owned()))),
        [res, name, sub] => Some((group, format!("{res}/{sub}"), ns, Some((*name).to_owned()))),
        _ => None,
    }
}

impl ApiServer {
    /// Starts on a free port, allowing exactly `rules` (API group, resource, verbs).
    pub async fn start(rules: &[&[(&str, &str, &[&str])]]) -> Result<Self> {
        let mut allowed = BTreeSet::new();
        for set in rules {
            for (g, r, verbs) in *set {
                for v in *verbs {
                    allowed.insert(((*g).to_owned(), (*r).to_owned(), (*v).to_owned()));
                }
            }
        }
        let shared = Arc::new(Shared {
            st: Mutex::new(State { rv: 100, rules: allowed, ..Default::default() }),
            changed: watch::channel(0).0,
            watches: Mutex::new(CancellationToken::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let s = Self { addr, shared, stop: Mutex::new(None) };
        s.serve(listener);
        Ok(s)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.clone());
        let shared = self.shared.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let shared = shared.clone();
            async move { handle(&shared, method, uri, headers, body) }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (bearer token [`TOKEN`]) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: hearth\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: hearth, namespace: hearth}}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Closes every connection and stops listening; objects are kept.
    pub fn stop(&self) {
        if let Some(s) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            s.cancel();
        }
        self.end_watches();
    }

    /// Listens again on the same port.
    pub async fn restart(&self) -> Result<()> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        let mut tries = 0;
        loop {
            match sock.bind(self.addr) {
                Ok(()) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("rebinding the API server's port"),
            }
        }
        self.serve(sock.listen(128)?);
        Ok(())
    }

    fn end_watches(&self) {
        let mut w = self.shared.watches.lock().unwrap_or_else(|p| p.into_inner());
        w.cancel();
        *w = CancellationToken::new();
    }

    /// Forgets history: open watches end, and resuming from any version seen so far gets
    /// 410 Gone (the client must re-list).
    pub fn compact(&self) {
        {
            let mut st = self.shared.st();
            st.rv += 1;
            st.compacted = st.rv;
            st.pod_events.clear();
        }
        self.end_watches();
    }

    /// Ends watches after at most `cap`, whatever timeout the client asks for.
    pub fn cap_watches(&self, cap: Duration) {
        self.shared.st().watch_cap = Some(cap);
    }

    pub fn inject(&self, verb: &str, resource: &str, status: u16, times: usize) {
        self.shared.st().faults.push(Fault { verb: verb.into(), resource: resource.into(), status, times });
    }

    pub fn add_node(&self, name: &str) {
        let mut st = self.shared.st();
        st.rv += 1;
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": st.rv.to_string(),
                         "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}]},
        });
        st.nodes.insert(name.to_owned(), node);
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.st().nodes.get(name).cloned()
    }

    /// Adds a pod bound to `node`; returns its UID.
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str) -> String {
        let n = self.shared.st().rv + 1;
        self.add_pod_with_uid(namespace, name, node, &format!("{n:08x}-0000-4000-8000-{n:012x}"))
    }

    /// Adds a pod with a given UID (a test's cgroup names it).
    pub fn add_pod_with_uid(&self, namespace: &str, name: &str, node: &str, uid: &str) -> String {
        self.insert_pod(
            json!({
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
                "status": {"phase": "Running"},
            }),
            Some(uid),
        )
    }

    /// Adds a pod given as JSON (labels, annotations, spec, status as the test needs); the
    /// server sets its UID and resourceVersion. Returns the UID.
    pub fn add_pod_json(&self, pod: Value) -> String {
        self.insert_pod(pod, None)
    }

    /// The one way a pod enters the store: UID (given or made), resourceVersion, an ADDED
    /// event for watches.
    fn insert_pod(&self, mut pod: Value, uid: Option<&str>) -> String {
        let mut st = self.shared.st();
        st.rv += 1;
        let uid = uid.map_or_else(|| format!("{:08x}-0000-4000-8000-{:012x}", st.rv, st.rv), str::to_owned);
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["metadata"]["uid"] = json!(uid);
        pod["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.pods.insert(uid.clone(), pod.clone());
        let rv = st.rv;
        st.pod_events.push((rv, "ADDED", pod));
        drop(st);
        self.shared.changed.send_replace(rv);
        uid
    }

    pub fn delete_pod(&self, uid: &str) {
        remove_pod(&self.shared, uid);
    }

    /// An object by group/resource, namespace and name (leases: "coordination.k8s.io/leases").
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared.st().objects.get(&(kind.to_owned(), namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every object of a group/resource.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        self.shared.st().objects.iter().filter(|((k, _, _), _)| k == kind).map(|(_, v)| v.clone()).collect()
    }

    /// Adds a pod object in a namespace that the controller may patch (its own pod).
    pub fn add_namespaced_pod(&self, namespace: &str, name: &str) {
        let mut st = self.shared.st();
        st.rv += 1;
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "resourceVersion": st.rv.to_string(), "labels": {"app": "hearth"}}});
        st.objects.insert(("/pods".into(), namespace.into(), name.into()), pod);
    }

    /// A pod by namespace and name.
    pub fn object_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.st();
        pod_by_name(&st, namespace, name).and_then(|u| st.pods.get(&u).cloned())
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.st().log.clone()
    }

    /// Requests refused for lack of an RBAC rule: "verb group/resource path".
    pub fn forbidden(&self) -> Vec<String> {
        self.shared.st().forbidden.clone()
    }
}

fn handle(shared: &Arc<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let path = uri.path().to_owned();
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let Some((group, resource, ns, name)) = route(&path) else {
        return respond(404, &status_body(404, "NotFound", &format!("no route {path}")));
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, name.is_some()) {
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    let parsed: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return respond(400, &status_body(400, "BadRequest", &format!("body is not JSON: {e}"))),
        }
    };
    let mut st = shared.st();
    let mut record = Request {
        at: Instant::now(),
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        verb: verb.to_owned(),
        group: group.clone(),
        resource: resource.clone(),
        content_type: content_type.clone(),
        body: parsed.clone(),
        status: 0,
    };
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let result = if auth != format!("Bearer {TOKEN}") {
        Err((401, "Unauthorized: no valid bearer token".to_owned()))
    } else if !st.rules.contains(&(group.clone(), resource.clone(), verb.to_owned())) {
        let what = format!("{verb} {group}/{resource} {path}");
        st.forbidden.push(what.clone());
        Err((403, format!("{resource} is forbidden: the test server's rules do not allow {verb} on {group}/{resource}")))
    } else if let Some(i) = st.faults.iter().position(|f| f.verb == verb && f.resource == resource && f.times > 0) {
        st.faults[i].times -= 1;
        let code = st.faults[i].status;
        Err((code, format!("injected {code} for {verb} {resource}")))
    } else {
        Ok(())
    };
    if let Err((code, msg)) = result {
        record.status = code;
        st.log.push(record);
        let mut r = respond(code, &status_body(code, reason_of(code), &msg));
        if code == 429 {
            r.headers_mut().insert("retry-after", "1".parse().expect("static header"));
        }
        return r;
    }
    let filter = PodFilter::new(ns.as_deref(), &query);
    let answer = match (resource.as_str(), verb) {
        ("pods", "list") => filter.map(|f| list_pods(&st, &f)),
        ("pods", "watch") => match filter {
            Ok(f) => {
                record.status = 200;
                st.log.push(record);
                drop(st);
                return watch_pods(shared, f, &query);
            }
            Err(e) => Err(e),
        },
        ("pods", "create") if ns.is_some() => create_pod(&mut st, ns.as_deref().unwrap_or(""), parsed),
        ("pods", "delete") if ns.is_some() => {
            delete_pod_request(&mut st, ns.as_deref().unwrap_or(""), name.as_deref().unwrap_or(""), &parsed)
        }
        ("pods", "get") if ns.as_deref().zip(name.as_deref()).is_some_and(|(n, m)| pod_by_name(&st, n, m).is_some()) => {
            let uid = pod_by_name(&st, ns.as_deref().unwrap_or(""), name.as_deref().unwrap_or("")).unwrap_or_default();
            Ok(st.pods[&uid].clone())
        }
        ("nodes", "get") => node_get(&st, name.as_deref().unwrap_or("")),
        ("nodes" | "nodes/status", "patch") => {
            node_patch(&mut st, name.as_deref().unwrap_or(""), resource.ends_with("/status"), &content_type, &query, parsed)
        }
        ("pods", "patch") => {
            let key = ("/pods".to_owned(), ns.clone().unwrap_or_default(), name.clone().unwrap_or_default());
            apply_labels_to_object(&mut st, key, &content_type, &query, &parsed)
        }
        (_, "get" | "create" | "update" | "patch") if ns.is_some() => {
            generic(&mut st, &format!("{group}/{resource}"), ns.as_deref().unwrap_or(""), name.as_deref(), verb, &content_type, parsed)
        }
        _ => Err((405, format!("the test server does not model {verb} on {group}/{resource}"))),
    };
    let (code, body) = match answer {
        Ok(v) => (200, v),
        Err((code, msg)) => (code, status_body(code, reason_of(code), &msg)),
    };
    record.status = code;
    st.log.push(record);
    let rv = st.rv;
    drop(st);
    shared.changed.send_replace(rv);
    respond(code, &body)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len() + 1
            && let Some(h) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which pods a LIST or WATCH asks for: the path's namespace and the field selectors
/// `spec.nodeName` and `metadata.name` (the ones Hearth uses).
#[derive(Debug, Clone, Default)]
struct PodFilter {
    namespace: Option<String>,
    node: Option<String>,
    name: Option<String>,
}

impl PodFilter {
    fn new(ns: Option<&str>, query: &BTreeMap<String, String>) -> Result<Self, (u16, String)> {
        let mut f = PodFilter { namespace: ns.map(str::to_owned), ..Default::default() };
        for term in query.get("fieldSelector").map(String::as_str).unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            match term.split_once('=') {
                Some(("spec.nodeName", v)) => f.node = Some(v.to_owned()),
                Some(("metadata.name", v)) => f.name = Some(v.to_owned()),
                _ => return Err((400, format!("the test server does not model field selector {term:?}"))),
            }
        }
        Ok(f)
    }

    fn matches(&self, p: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|n| p["metadata"]["namespace"] == n)
            && self.node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n)
            && self.name.as_deref().is_none_or(|n| p["metadata"]["name"] == n)
    }
}

fn list_pods(st: &State, f: &PodFilter) -> Value {
    let items: Vec<Value> = st.pods.values().filter(|p| f.matches(p)).cloned().collect();
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
}

fn pod_by_name(st: &State, ns: &str, name: &str) -> Option<String> {
    st.pods.iter().find(|(_, p)| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name).map(|(uid, _)| uid.clone())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A pod created through the API: the name must be free in the namespace.
fn create_pod(st: &mut State, ns: &str, mut pod: Value) -> Result<Value, (u16, String)> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if name.is_empty() {
        return Err((422, "metadata.name: Required value".into()));
    }
    if pod_by_name(st, ns, &name).is_some() {
        return Err((409, format!("pods \"{name}\" already exists")));
    }
    if pod["spec"]["containers"].as_array().is_none_or(|c| c.is_empty() || c.iter().any(|c| c["image"].as_str().is_none_or(str::is_empty)))
    {
        return Err((422, "spec.containers: Required value: each container needs an image".into()));
    }
    st.rv += 1;
    let uid = format!("{:08x}-0000-4000-8000-{:012x}", st.rv, st.rv);
    pod["metadata"]["namespace"] = json!(ns);
    pod["metadata"]["uid"] = json!(uid);
    pod["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    pod["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    pod["status"] = json!({"phase": "Pending"});
    st.pods.insert(uid, pod.clone());
    let rv = st.rv;
    st.pod_events.push((rv, "ADDED", pod.clone()));
    Ok(pod)
}

/// Marks a pod for deletion (the kubelet finishes it), honouring a UID precondition.
fn delete_pod_request(st: &mut State, ns: &str, name: &str, opts: &Value) -> Result<Value, (u16, String)> {
    let uid = pod_by_name(st, ns, name).ok_or((404, format!("pods \"{name}\" not found")))?;
    if let Some(want) = opts["preconditions"]["uid"].as_str()
        && want != uid
    {
        return Err((409, format!("Precondition failed: UID in precondition: {want}, UID in object meta: {uid}")));
    }
    st.rv += 1;
    let rv = st.rv;
    let pod = st.pods.get_mut(&uid).ok_or((404, "gone".to_owned()))?;
    if pod["metadata"]["deletionTimestamp"].is_null() {
        pod["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        pod["metadata"]["deletionGracePeriodSeconds"] = opts["gracePeriodSeconds"].as_u64().map_or(json!(30), |g| json!(g));
    }
    pod["metadata"]["resourceVersion"] = json!(rv.to_string());
    let pod = pod.clone();
    st.pod_events.push((rv, "MODIFIED", pod.clone()));
    Ok(pod)
}

fn watch_pods(shared: &Arc<Shared>, filter: PodFilter, query: &BTreeMap<String, String>) -> Response {
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let asked = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(Duration::from_secs).unwrap_or(Duration::from_secs(1800));
    let (expired, cap) = {
        let st = shared.st();
        (from < st.compacted, st.watch_cap)
    };
    let timeout = cap.map_or(asked, |c| c.min(asked));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(64);
    if expired {
        let ev = json!({"type": "ERROR", "object": status_body(410, "Expired", &format!("too old resource version: {from}"))});
        let _ = tx.try_send(Ok(bytes::Bytes::from(format!("{ev}\n"))));
    } else {
        let mut changed = shared.changed.subscribe();
        let ended = shared.watches.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let pending: Vec<_> = shared.st().pod_events.iter().filter(|(rv, _, _)| *rv > from).cloned().collect();
        let source = shared.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut last = from;
            let send = |tx: &tokio::sync::mpsc::Sender<_>, events: Vec<(u64, &'static str, Value)>, last: &mut u64| {
                for (rv, kind, obj) in events {
                    *last = (*last).max(rv);
                    if !filter.matches(&obj) {
                        continue;
                    }
                    let line = format!("{}\n", json!({"type": kind, "object": obj}));
                    if tx.try_send(Ok(bytes::Bytes::from(line))).is_err() {
                        return false;
                    }
                }
                true
            };
            if !send(&tx, pending, &mut last) {
                return;
            }
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = ended.cancelled() => return,
                    r = changed.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let events: Vec<_> = source.st().pod_events.iter().filter(|(rv, _, _)| *rv > last).cloned().collect();
                        if !send(&tx, events, &mut last) {
                            return;
                        }
                    }
                }
            }
        });
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
    r
}

fn node_get(st: &State, name: &str) -> Result<Value, (u16, String)> {
    st.nodes.get(name).cloned().ok_or((404, format!("nodes \"{name}\" not found")))
}

/// Checks what the API server requires of a server-side apply.
fn check_apply(
    content_type: &str,
    query: &BTreeMap<String, String>,
    body: &Value,
    kind: &str,
    name: &str,
) -> Result<String, (u16, String)> {
    if content_type != "application/apply-patch+yaml" {
        return Err((415, format!("apply needs content type application/apply-patch+yaml, got {content_type:?}")));
    }
    let manager = query.get("fieldManager").cloned().filter(|m| !m.is_empty()).ok_or((400, "apply without fieldManager".to_owned()))?;
    if body["apiVersion"] != "v1" || body["kind"] != kind || body["metadata"]["name"] != name {
        return Err((400, format!("apply body must name apiVersion v1, kind {kind} and metadata.name {name}: {body}")));
    }
    Ok(manager)
}

fn label_values_valid(labels: &serde_json::Map<String, Value>) -> Result<(), (u16, String)> {
    for (k, v) in labels {
        let v = v.as_str().unwrap_or("");
        let ok = v.is_empty()
            || (v.len() <= 63
                && v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
        if !ok {
            return Err((
                422,
                format!(
                    "metadata.labels: Invalid value: {v:?} for {k}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"
                ),
            ));
        }
    }
    Ok(())
}

/// Applies `labels` as manager's whole set on `obj`.
fn apply_labels(
    owned: &mut BTreeMap<(String, String), BTreeSet<String>>,
    key: String,
    manager: String,
    obj: &mut Value,
    labels: &serde_json::Map<String, Value>,
) {
    let prev = owned.remove(&(key.clone(), manager.clone())).unwrap_or_default();
    let map = obj["metadata"].as_object_mut().map(|m| m.entry("labels").or_insert(json!({})));
    if let Some(Value::Object(l)) = map {
        for k in prev.iter().filter(|k| !labels.contains_key(*k)) {
            l.remove(k);
        }
        for (k, v) in labels {
            l.insert(k.clone(), v.clone());
        }
    }
    owned.insert((key, manager), labels.keys().cloned().collect());
}

fn bump(st: &mut State, obj: &mut Value) {
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
}

fn node_patch(
    st: &mut State,
    name: &str,
    status: bool,
    ct: &str,
    query: &BTreeMap<String, String>,
    body: Value,
) -> Result<Value, (u16, String)> {
    let mut node = st.nodes.get(name).cloned().ok_or((404, format!("nodes \"{name}\" not found")))?;
    let key = format!("node/{name}");
    if ct == "application/apply-patch+yaml" {
        let manager = check_apply(ct, query, &body, "Node", name)?;
        if status {
            let conds = body["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let types: BTreeSet<String> = conds.iter().filter_map(|c| c["type"].as_str().map(str::to_owned)).collect();
            let prev = st.owned_conditions.remove(&(key.clone(), manager.clone())).unwrap_or_default();
            let list = node["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut list: Vec<Value> = list
                .into_iter()
                .filter(|c| {
                    let t = c["type"].as_str().unwrap_or("");
                    // Dropped: this manager's earlier conditions (re-added below if still applied).
                    !prev.contains(t) && !types.contains(t)
                })
                .collect();
            for c in conds {
                if c["status"] != "True" && c["status"] != "False" && c["status"] != "Unknown" {
                    return Err((422, format!("status.conditions: Invalid status {}", c["status"])));
                }
                list.push(c);
            }
            node["status"]["conditions"] = Value::Array(list);
            st.owned_conditions.insert((key, manager), types);
        } else {
            let labels = body["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            label_values_valid(&labels)?;
            apply_labels(&mut st.owned_labels, key, manager, &mut node, &labels);
        }
    } else if ct == "application/merge-patch+json" && !status {
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
            && Some(rv) != node["metadata"]["resourceVersion"].as_str()
        {
            return Err((409, format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified")));
        }
        let mut patch = body.clone();
        if let Some(m) = patch["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        merge(&mut node, &patch);
    } else {
        return Err((415, format!("the test server models apply and merge patches of nodes, not {ct:?}")));
    }
    bump(st, &mut node);
    st.nodes.insert(name.to_owned(), node.clone());
    Ok(node)
}

fn apply_labels_to_object(
    st: &mut State,
    key: (String, String, String),
    ct: &str,
    query: &BTreeMap<String, String>,
    body: &Value,
) -> Result<Value, (u16, String)> {
    let mut obj = st.objects.get(&key).cloned().ok_or((404, format!("pods \"{}\" not found", key.2)))?;
    let manager = check_apply(ct, query, body, "Pod", &key.2)?;
    let labels = body["metadata"]["labels"].as_object().cloned().unwrap_or_default();
    label_values_valid(&labels)?;
    apply_labels(&mut st.owned_labels, format!("pod/{}/{}", key.1, key.2), manager, &mut obj, &labels);
    bump(st, &mut obj);
    st.objects.insert(key, obj.clone());
    Ok(obj)
}

/// Leases and events: get, create (409 if it exists), update (409 on a stale
/// resourceVersion), merge patch.
fn generic(st: &mut State, kind: &str, ns: &str, name: Option<&str>, verb: &str, ct: &str, body: Value) -> Result<Value, (u16, String)> {
    match verb {
        "get" => {
            let n = name.unwrap_or("");
            st.objects.get(&(kind.to_owned(), ns.to_owned(), n.to_owned())).cloned().ok_or((404, format!("{kind} \"{n}\" not found")))
        }
        "create" => {
            let n = body["metadata"]["name"].as_str().unwrap_or("").to_owned();
            if n.is_empty() {
                return Err((422, "metadata.name: Required value".into()));
            }
            let key = (kind.to_owned(), ns.to_owned(), n.clone());
            if st.objects.contains_key(&key) {
                return Err((409, format!("{kind} \"{n}\" already exists")));
            }
            let mut obj = body;
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["uid"] = json!(format!("uid-{n}"));
            bump(st, &mut obj);
            st.objects.insert(key, obj.clone());
            Ok(obj)
        }
        "update" => {
            let n = name.unwrap_or("").to_owned();
            let key = (kind.to_owned(), ns.to_owned(), n.clone());
            let cur = st.objects.get(&key).ok_or((404, format!("{kind} \"{n}\" not found")))?;
            if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                return Err((
                    409,
                    format!(
                        "Operation cannot be fulfilled on {kind} \"{n}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                ));
            }
            let mut obj = body;
            bump(st, &mut obj);
            st.objects.insert(key, obj.clone());
            Ok(obj)
        }
        "patch" => {
            if ct != "application/merge-patch+json" {
                return Err((415, format!("the test server models merge patches of {kind}, not {ct:?}")));
            }
            let n = name.unwrap_or("").to_owned();
            let key = (kind.to_owned(), ns.to_owned(), n.clone());
            let mut obj = st.objects.get(&key).cloned().ok_or((404, format!("{kind} \"{n}\" not found")))?;
            merge(&mut obj, &body);
            bump(st, &mut obj);
            st.objects.insert(key, obj.clone());
            Ok(obj)
        }
        _ => Err((405, format!("{verb} on {kind}"))),
    }
}

/// (pod UID, command line) of each container started.
type Started = Vec<(String, Vec<String>)>;

/// A kubelet for one node, running until dropped; see the module doc.
pub struct Kubelet {
    stop: CancellationToken,
    /// The device plugin's GPUs (empty: not registered yet, pods asking for GPUs wait).
    gpus: Arc<Mutex<Vec<String>>>,
    /// Pods started, by UID, with the command line they ran.
    started: Arc<Mutex<Started>>,
    /// Running containers' process ids, by pod UID.
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Kubelet {
    /// (pod UID, command) of every container this kubelet started, in order.
    pub fn started(&self) -> Vec<(String, Vec<String>)> {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Registers the device plugin's GPUs (UUIDs); pods asking for `nvidia.com/gpu` get them
    /// from the end of the list, so a pod's GPU is not the one its creator may have had in mind.
    pub fn set_gpus(&self, uuids: Vec<String>) {
        *self.gpus.lock().unwrap_or_else(|p| p.into_inner()) = uuids;
    }

    /// SIGKILL to a pod's container, as the OOM killer would.
    pub fn kill(&self, uid: &str) {
        if let Some(pid) =
            self.pids.lock().unwrap_or_else(|p| p.into_inner()).get(uid).and_then(|p| rustix::process::Pid::from_raw(*p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

struct Container {
    child: tokio::process::Child,
    started_at: String,
    terminating_since: Option<(Instant, Duration)>,
    killed: bool,
}

impl ApiServer {
    /// Runs a kubelet for `node`: each pod bound to it is "pulled" for `pull`, then its
    /// container's command runs as a local process; see the module doc.
    pub fn kubelet(&self, node: &str, pull: Duration) -> Kubelet {
        self.kubelet_with_devices(node, pull, None).expect("no socket to bind")
    }

    /// Like `kubelet`, with a device plugin for `nvidia.com/gpu` (see [`Kubelet::set_gpus`])
    /// and, in `podres_dir`, the kubelet's PodResources socket saying which pod got which.
    pub fn kubelet_with_devices(&self, node: &str, pull: Duration, podres_dir: Option<&Path>) -> Result<Kubelet> {
        let stop = CancellationToken::new();
        let gpus: Arc<Mutex<Vec<String>>> = Arc::default();
        let allocs: Arc<Mutex<BTreeMap<String, Alloc>>> = Arc::default();
        if let Some(dir) = podres_dir {
            let path = dir.join("kubelet.sock");
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)?;
            let (svc, s) = (PodRes(allocs.clone()), stop.clone());
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(hearth_proto::podresources::pod_resources_lister_server::PodResourcesListerServer::new(svc))
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), s.cancelled())
                    .await;
            });
        }
        let (pool, allocs2) = (gpus.clone(), allocs.clone());
        let started = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(BTreeMap::new()));
        let (shared, node, s2, log, pids2) = (self.shared.clone(), node.to_owned(), stop.clone(), started.clone(), pids.clone());
        tokio::spawn(async move {
            let mut running: BTreeMap<String, Container> = BTreeMap::new();
            let mut pulling: BTreeMap<String, Instant> = BTreeMap::new();
            let mut done: BTreeSet<String> = BTreeSet::new();
            loop {
                tokio::select! {
                    _ = s2.cancelled() => {
                        for c in running.values_mut() {
                            kill_group(&c.child, rustix::process::Signal::KILL);
                        }
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                let pods: Vec<(String, Value)> = shared
                    .st()
                    .pods
                    .iter()
                    .filter(|(_, p)| p["spec"]["nodeName"] == node.as_str())
                    .map(|(u, p)| (u.clone(), p.clone()))
                    .collect();
                for (uid, pod) in pods {
                    let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
                    if let Some(c) = running.get_mut(&uid) {
                        if let Ok(Some(status)) = c.child.try_wait() {
                            let code = status.code().unwrap_or(128 + status.signal_number());
                            let c = running.remove(&uid).expect("present");
                            done.insert(uid.clone());
                            let phase = if code == 0 { "Succeeded" } else { "Failed" };
                            let reason = if code == 0 { "Completed" } else { "Error" };
                            let term = json!({"exitCode": code, "reason": reason, "startedAt": c.started_at, "finishedAt": now_rfc3339()});
                            set_status(
                                &shared,
                                &uid,
                                json!({"phase": phase, "containerStatuses": [container_status(&pod, false, json!({"terminated": term}))]}),
                            );
                            continue;
                        }
                        if deleting {
                            let grace = Duration::from_secs(pod["metadata"]["deletionGracePeriodSeconds"].as_u64().unwrap_or(30));
                            match c.terminating_since {
                                None => {
                                    c.terminating_since = Some((Instant::now(), grace));
                                    kill_group(&c.child, rustix::process::Signal::TERM);
                                }
                                Some((t0, g)) if t0.elapsed() >= g && !c.killed => {
                                    c.killed = true;
                                    kill_group(&c.child, rustix::process::Signal::KILL);
                                }
                                _ => {}
                            }
                        }
                        continue;
                    }
                    if deleting {
                        // Not running (never started, or exited): the kubelet lets it go.
                        pulling.remove(&uid);
                        remove_pod(&shared, &uid);
                        continue;
                    }
                    if done.contains(&uid) {
                        continue;
                    }
                    let since = *pulling.entry(uid.clone()).or_insert_with(|| {
                        set_status(&shared, &uid, json!({"phase": "Pending", "containerStatuses": [container_status(&pod, false, json!({"waiting": {"reason": "ContainerCreating"}}))]}));
                        Instant::now()
                    });
                    if since.elapsed() < pull {
                        continue;
                    }
                    // The device plugin: GPUs from the end of its list, none twice.
                    let container = &pod["spec"]["containers"][0];
                    let want: usize = container["resources"]["limits"]["nvidia.com/gpu"].as_str().and_then(|n| n.parse().ok()).unwrap_or(0);
                    if want > 0 {
                        let pool = pool.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        let mut allocs = allocs2.lock().unwrap_or_else(|p| p.into_inner());
                        let taken: BTreeSet<String> = allocs.values().flat_map(|a| a.ids.clone()).collect();
                        let free: Vec<String> = pool.iter().rev().filter(|g| !taken.contains(*g)).take(want).cloned().collect();
                        if free.len() < want {
                            continue;
                        }
                        let alloc = Alloc {
                            namespace: pod["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                            name: pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                            container: container["name"].as_str().unwrap_or("").to_owned(),
                            ids: free,
                        };
                        allocs.insert(uid.clone(), alloc);
                    }
                    pulling.remove(&uid);
                    let argv: Vec<String> =
                        container["command"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect();
                    let Some((prog, args)) = argv.split_first() else { continue };
                    let mut cmd = tokio::process::Command::new(prog);
                    cmd.args(args)
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null());
                    for e in container["env"].as_array().into_iter().flatten() {
                        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
                            cmd.env(k, v);
                        }
                    }
                    cmd.process_group(0).kill_on_drop(true);
                    log.lock().unwrap_or_else(|p| p.into_inner()).push((uid.clone(), argv.clone()));
                    match cmd.spawn() {
                        Ok(child) => {
                            let started_at = now_rfc3339();
                            let st = json!({"running": {"startedAt": started_at}});
                            set_status(
                                &shared,
                                &uid,
                                json!({"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
                                       "startTime": started_at, "containerStatuses": [container_status(&pod, true, st)]}),
                            );
                            if let Some(pid) = child.id() {
                                pids2.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.clone(), pid);
                            }
                            running.insert(uid, Container { child, started_at, terminating_since: None, killed: false });
                        }
                        Err(e) => {
                            done.insert(uid.clone());
                            let w = json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": e.to_string()}});
                            set_status(&shared, &uid, json!({"phase": "Failed", "containerStatuses": [container_status(&pod, false, w)]}));
                        }
                    }
                }
                // Devices of pods that are gone go back to the plugin.
                allocs2.lock().unwrap_or_else(|p| p.into_inner()).retain(|u, _| shared.st().pods.contains_key(u));
                // Pods whose process is gone and whose deletion is due.
                let gone: Vec<String> = running.keys().filter(|u| !shared.st().pods.contains_key(*u)).cloned().collect();
                for u in gone {
                    if let Some(c) = running.remove(&u) {
                        kill_group(&c.child, rustix::process::Signal::KILL);
                    }
                }
                let finished: Vec<String> = shared
                    .st()
                    .pods
                    .iter()
                    .filter(|(u, p)| done.contains(*u) && !p["metadata"]["deletionTimestamp"].is_null())
                    .map(|(u, _)| u.clone())
                    .collect();
                for u in finished {
                    remove_pod(&shared, &u);
                }
            }
        });
        Ok(Kubelet { stop, gpus, started, pids })
    }
}

/// Devices the kubelet's device plugin gave one pod's container.
#[derive(Debug, Clone)]
struct Alloc {
    namespace: String,
    name: String,
    container: String,
    ids: Vec<String>,
}

/// The kubelet's PodResources service over its allocations.
#[derive(Clone)]
struct PodRes(Arc<Mutex<BTreeMap<String, Alloc>>>);

#[tonic::async_trait]
impl hearth_proto::podresources::pod_resources_lister_server::PodResourcesLister for PodRes {
    async fn list(
        &self,
        _: tonic::Request<hearth_proto::podresources::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<hearth_proto::podresources::ListPodResourcesResponse>, tonic::Status> {
        use hearth_proto::podresources::{ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources};
        let pods = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|a| PodResources {
                name: a.name.clone(),
                namespace: a.namespace.clone(),
                containers: vec![ContainerResources {
                    name: a.container.clone(),
                    devices: vec![ContainerDevices { resource_name: "nvidia.com/gpu".into(), device_ids: a.ids.clone(), topology: None }],
                }],
            })
            .collect();
        Ok(tonic::Response::new(ListPodResourcesResponse { pod_resources: pods }))
    }
}

trait SignalNumber {
    fn signal_number(&self) -> i32;
}

impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> i32 {
        std::os::unix::process::ExitStatusExt::signal(self).unwrap_or(0)
    }
}

fn kill_group(child: &tokio::process::Child, sig: rustix::process::Signal) {
    if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

fn container_status(pod: &Value, started: bool, state: Value) -> Value {
    let c = &pod["spec"]["containers"][0];
    json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0, "started": started, "state": state})
}

/// The kubelet's status update: a MODIFIED event.
fn set_status(shared: &Arc<Shared>, uid: &str, status: Value) {
    let mut st = shared.st();
    st.rv += 1;
    let rv = st.rv;
    let Some(pod) = st.pods.get_mut(uid) else { return };
    merge(&mut pod["status"], &status);
    // Lists replace, as the kubelet's status does.
    if let Some(cs) = status.get("containerStatuses") {
        pod["status"]["containerStatuses"] = cs.clone();
    }
    pod["metadata"]["resourceVersion"] = json!(rv.to_string());
    let pod = pod.clone();
    st.pod_events.push((rv, "MODIFIED", pod));
    drop(st);
    shared.changed.send_replace(rv);
}

fn remove_pod(shared: &Arc<Shared>, uid: &str) {
    let mut st = shared.st();
    st.rv += 1;
    let rv = st.rv;
    if let Some(mut pod) = st.pods.remove(uid) {
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.pod_events.push((rv, "DELETED", pod));
    }
    drop(st);
    shared.changed.send_replace(rv);
}
