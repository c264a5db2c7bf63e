//! The pod driver: an agent-managed model server as a Pod bound to this node through the API
//! server (`spec.nodeName`), so the kubelet runs it with the device plugin's accounting,
//! `kubectl` sees it, and the kubelet does not kill it as an orphan (which is what happens to
//! containers started behind its back through CRI).
//!
//! The pod gets the engine's image, the cached weights mounted read-only from the host at
//! the same path, the partition as the device plugin's resource (`nvidia.com/gpu`,
//! `nvidia.com/mig-<profile>`, `aws.amazon.com/neuroncore`), an owner reference to the Node
//! (deleting the Node deletes it) and Hearth's labels. `restartPolicy: Never`: restarts,
//! backoff and crash loops are the supervisor's, the same as for the process driver.
//!
//! Each supervised pod has a watch of its own (`fieldSelector=metadata.name=...`) that keeps
//! the latest object; readiness is the engine's own (read over the pod network), not the
//! kubelet's probe, which is there for `kubectl` and Services.
//!
//! A pod outlives the agent: on an agent stop (an upgrade, usually) it keeps serving and the
//! next agent adopts it; StopRuntime, a spot notice or a partition change deletes it with
//! the drain deadline as its grace period, and the kubelet does the SIGTERM and SIGKILL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use super::driver::{Driver, Launch};
use super::engine::{EngineSpec, ReadyCheck};
use super::managed::ManagedSpec;
use crate::device::{Accelerator, Vendor};
use hearth_service::kube::{KubeError, api_error, within};

/// One API call with the agent's deadline, its error naming what and the RBAC rule.
async fn call<T>(what: String, verb: &str, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, KubeError> {
    within(&what, crate::kube::CALL_TIMEOUT, async { f.await.map_err(|e| api_error(&what, verb, "pods", "agent's Role", e)) }).await
}

/// Every pod the driver creates carries this (and `hearth.dev/runtime`): discovery skips
/// them, and `kubectl get pods -l app.kubernetes.io/managed-by=hearth-agent` lists them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "hearth-agent");
pub const RUNTIME_LABEL: &str = "hearth.dev/runtime";
/// A pod the kubelet has not finished deleting after its grace period plus this is left to
/// the kubelet (and to node deletion, through the owner reference).
const DELETE_SLACK: Duration = Duration::from_secs(30);

/// `runtimes.pod`.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    pub namespace: String,
    pub priority_class: Option<String>,
    /// The cache directory as the host sees it, where it differs from the agent's path.
    pub host_cache_dir: Option<std::path::PathBuf>,
}

/// What every pod driver on the node shares.
pub struct PodContext {
    pub client: kube::Client,
    pub node: String,
    pub settings: PodSettings,
    /// The agent's cache directory (translated to `host_cache_dir` for the hostPath).
    pub cache_dir: Option<std::path::PathBuf>,
    /// The node's accelerators, to turn a partition into a device-plugin resource.
    pub report: watch::Receiver<crate::report::NodeReport>,
    /// The kubelet's PodResources socket directory: which devices the device plugin gave.
    pub podres_dir: std::path::PathBuf,
    node_uid: tokio::sync::OnceCell<String>,
}

impl PodContext {
    pub fn new(
        client: kube::Client,
        node: String,
        settings: PodSettings,
        cache_dir: Option<std::path::PathBuf>,
        report: watch::Receiver<crate::report::NodeReport>,
        podres_dir: std::path::PathBuf,
    ) -> Self {
        Self { client, node, settings, cache_dir, report, podres_dir, node_uid: Default::default() }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    async fn node_uid(&self) -> Result<String, String> {
        self.node_uid
            .get_or_try_init(|| async {
                let api: Api<Node> = Api::all(self.client.clone());
                let what = format!("reading node {}", self.node);
                let n = within(&what, crate::kube::CALL_TIMEOUT, async {
                    api.get(&self.node).await.map_err(|e| api_error(&what, "get", "nodes", "agent's ClusterRole", e))
                })
                .await
                .map_err(|e| e.to_string())?;
                n.metadata.uid.ok_or_else(|| format!("node {} has no uid", self.node))
            })
            .await
            .cloned()
    }
}

/// The device plugin's resource for a partition (a GPU or MIG instance UUID, a GPU index,
/// or a comma-separated list of GPUs).
pub fn device_resource(partition: &str, accelerators: &[Accelerator]) -> Result<(String, u32), String> {
    // A Neuron core range: the device plugin hands out that many cores (contiguous ones).
    if let Some(range) = partition.strip_prefix("neuroncores:") {
        let n = range
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .filter(|(a, b)| a <= b)
            .map(|(a, b)| b - a + 1)
            .ok_or_else(|| format!("partition {partition:?}: expected neuroncores:FIRST-LAST"))?;
        return Ok(("aws.amazon.com/neuroncore".into(), n));
    }
    let parts: Vec<&str> = partition.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    let mut whole = 0;
    for p in &parts {
        if let Some(a) = accelerators.iter().find(|a| a.uuid == *p || a.index.to_string() == *p) {
            match a.vendor {
                Vendor::Nvidia => whole += 1,
                Vendor::AwsNeuron => return Ok(("aws.amazon.com/neuron".into(), parts.len() as u32)),
            }
            continue;
        }
        let mig = accelerators.iter().flat_map(|a| a.gpu.iter().flat_map(|g| g.mig_devices.iter())).find(|m| m.uuid == *p);
        match mig {
            Some(m) if parts.len() == 1 => return Ok((format!("nvidia.com/mig-{}", m.profile), 1)),
            Some(_) => return Err(format!("partition {partition:?}: a MIG instance cannot be combined with other devices")),
            None => return Err(format!("partition {p:?}: not a GPU, MIG instance or Neuron device on this node")),
        }
    }
    if whole == 0 {
        return Err("no partition given".into());
    }
    Ok(("nvidia.com/gpu".into(), whole))
}

/// The partition a container's allocated devices make, as runtimes report partitions: GPU
/// and MIG UUIDs (comma-separated), or a Neuron core range.
pub fn allocated_partition(devices: &[(String, Vec<String>)]) -> Option<String> {
    let mut gpus = Vec::new();
    let mut cores: Vec<u32> = Vec::new();
    for (resource, ids) in devices {
        if resource.starts_with("nvidia.com/") {
            gpus.extend(ids.iter().map(|i| crate::kube::podres::base_device_id(i).to_owned()));
        } else if resource == "aws.amazon.com/neuroncore" {
            cores.extend(ids.iter().filter_map(|i| i.parse::<u32>().ok()));
        }
    }
    if !gpus.is_empty() {
        gpus.sort();
        gpus.dedup();
        return Some(gpus.join(","));
    }
    let (lo, hi) = (cores.iter().min()?, cores.iter().max()?);
    Some(format!("neuroncores:{lo}-{hi}"))
}

/// The Pod for one runtime: pure, so its exact shape is pinned by a test.
#[allow(clippy::too_many_arguments)]
pub fn manifest(
    spec: &ManagedSpec,
    launch: &Launch,
    pod_name: &str,
    node: &str,
    node_uid: &str,
    image: &str,
    resources: &BTreeMap<String, String>,
    settings: &PodSettings,
    host_model_dir: Option<&std::path::Path>,
) -> serde_json::Value {
    let engine = EngineSpec::builtin(spec.engine);
    let probe_path = match &engine.ready {
        ReadyCheck::Status(p) => p.clone(),
        ReadyCheck::ModelListed(_) => engine.live_path.clone(),
    };
    let mut labels = serde_json::Map::new();
    labels.insert(MANAGED_BY.0.into(), json!(MANAGED_BY.1));
    labels.insert(RUNTIME_LABEL.into(), json!(spec.name));
    labels.insert("app.kubernetes.io/name".into(), json!(spec.engine.as_str()));
    if crate::kube::is_label_value(node) {
        labels.insert("hearth.dev/node".into(), json!(node));
    }
    let env: Vec<_> = launch.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    let mut container = json!({
        "name": "engine",
        "image": image,
        "command": launch.argv,
        "env": env,
        "ports": [{"name": "http", "containerPort": launch.port, "protocol": "TCP"}],
        "resources": {"limits": resources, "requests": resources},
        "readinessProbe": {"httpGet": {"path": probe_path, "port": launch.port}, "periodSeconds": 5, "failureThreshold": 3},
    });
    let mut volumes = Vec::new();
    if let Some(dir) = &launch.model_dir {
        container["volumeMounts"] = json!([{"name": "weights", "mountPath": dir, "readOnly": true}]);
        let host = host_model_dir.unwrap_or(dir);
        volumes.push(json!({"name": "weights", "hostPath": {"path": host, "type": "Directory"}}));
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {"hearth.dev/model": spec.model_name},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": spec.drain_timeout.as_secs_f64().ceil() as u64,
            "enableServiceLinks": false,
            "containers": [container],
            "volumes": volumes,
        },
    });
    if let Some(pc) = &settings.priority_class {
        pod["spec"]["priorityClassName"] = json!(pc);
    }
    pod
}

/// The pod's name: the runtime's, prefixed, and the node's, so two nodes' runtimes of the
/// same name do not collide in the namespace.
pub fn pod_name(runtime: &str, node: &str) -> String {
    let mut n = format!("hearth-{runtime}-{node}");
    n.truncate(253);
    n.trim_end_matches(['-', '.']).to_owned()
}

/// One supervised pod: its name and UID and the latest object its watch saw (None once it
/// is gone). The watch stops when the last clone is dropped.
#[derive(Clone)]
pub struct PodHandle {
    pub name: String,
    pub uid: String,
    created: Instant,
    latest: watch::Receiver<Option<Pod>>,
    _watch: Arc<DropGuard>,
}

impl std::fmt::Debug for PodHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod {} ({})", self.name, self.uid)
    }
}

pub struct PodDriver {
    ctx: Arc<PodContext>,
    spec: ManagedSpec,
    name: String,
}

impl PodDriver {
    pub fn new(ctx: Arc<PodContext>, spec: &ManagedSpec) -> Self {
        let name = pod_name(&spec.name, &ctx.node);
        Self { ctx, spec: spec.clone(), name }
    }

    /// Starts the watch of the pod; the handle once the watch has listed it.
    async fn watch(&self, uid: String) -> PodHandle {
        let (tx, mut latest) = watch::channel(None::<Pod>);
        let stop = CancellationToken::new();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let (stream, s2, name) = (watcher::watcher(self.ctx.pods(), cfg), stop.clone(), self.name.clone());
        let listed = Arc::new(tokio::sync::Notify::new());
        let l2 = listed.clone();
        let uid2 = uid.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut seen = false;
            loop {
                let ev = tokio::select! {
                    _ = s2.cancelled() => return,
                    ev = stream.next() => ev,
                };
                match ev {
                    None => return,
                    Some(Err(e)) => {
                        warn!(pod = %name, error = %e, "watch of the model server's pod failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some(Ok(watcher::Event::Init)) => seen = false,
                    Some(Ok(watcher::Event::InitApply(p) | watcher::Event::Apply(p))) => {
                        // Only this pod: one of the same name made later is not ours.
                        if p.metadata.uid.as_deref() == Some(uid2.as_str()) {
                            seen = true;
                            tx.send_replace(Some(p));
                        } else {
                            tx.send_replace(None);
                        }
                        l2.notify_one();
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        if !seen {
                            tx.send_replace(None);
                        }
                        l2.notify_one();
                    }
                    Some(Ok(watcher::Event::Delete(p))) => {
                        if p.metadata.uid.as_deref() == Some(uid2.as_str()) {
                            tx.send_replace(None);
                        }
                    }
                }
            }
        });
        // The first list: until then the pod is taken as there (it was just created or read).
        let _ = tokio::time::timeout(crate::kube::CALL_TIMEOUT, listed.notified()).await;
        latest.mark_changed();
        PodHandle { name: self.name.clone(), uid, created: Instant::now(), latest, _watch: Arc::new(stop.drop_guard()) }
    }

    /// The device-plugin resources: the configured ones, or the partition's.
    fn resources(&self, launch: &Launch) -> Result<BTreeMap<String, String>, String> {
        if !self.spec.resources.is_empty() {
            return Ok(self.spec.resources.clone());
        }
        let Some(p) = &launch.partition else { return Ok(BTreeMap::new()) };
        let accelerators = self.ctx.report.borrow().accelerators.clone();
        let (name, n) = device_resource(p, &accelerators)?;
        Ok(BTreeMap::from([(name, n.to_string())]))
    }

    fn host_model_dir(&self, dir: &std::path::Path) -> Option<std::path::PathBuf> {
        let (host, cache) = (self.ctx.settings.host_cache_dir.as_ref()?, self.ctx.cache_dir.as_ref()?);
        Some(host.join(dir.strip_prefix(cache).ok()?))
    }

    async fn delete(&self, uid: &str, grace: Duration) -> Result<(), String> {
        let dp = DeleteParams {
            grace_period_seconds: Some(grace.as_secs_f64().ceil() as u32),
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        let what = format!("deleting pod {}/{}", self.ctx.settings.namespace, self.name);
        match call(what, "delete", self.ctx.pods().delete(&self.name, &dp)).await {
            Ok(_) => Ok(()),
            // Gone already, or a newer pod of that name (the precondition failed): not ours.
            Err(e) if matches!(e.code(), Some(404 | 409)) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn pod_alive(p: &Pod) -> bool {
    if p.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(st) = &p.status else { return true };
    if matches!(st.phase.as_deref(), Some("Failed" | "Succeeded")) {
        return false;
    }
    !st.container_statuses.iter().flatten().any(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
}

/// Why a pod is not serving, as `kubectl describe` would put it.
fn pod_problem(p: &Pod) -> Option<String> {
    let st = p.status.as_ref()?;
    for c in st.container_statuses.iter().flatten() {
        let s = c.state.as_ref()?;
        if let Some(t) = &s.terminated {
            let why = t.reason.clone().unwrap_or_else(|| "terminated".into());
            let msg = t.message.as_deref().map(|m| format!(": {}", m.trim())).unwrap_or_default();
            return Some(format!("container {} {why} (exit code {}){msg}", c.name, t.exit_code));
        }
        if let Some(w) = &s.waiting {
            let why = w.reason.clone().unwrap_or_else(|| "waiting".into());
            let msg = w.message.as_deref().map(|m| format!(": {}", m.trim())).unwrap_or_default();
            return Some(format!("container {} {why}{msg}", c.name));
        }
    }
    match (st.phase.as_deref(), &st.reason, &st.message) {
        (Some("Failed"), r, m) => {
            Some(format!("pod failed: {} {}", r.as_deref().unwrap_or(""), m.as_deref().unwrap_or("")).trim().to_owned())
        }
        _ => None,
    }
}

impl Driver for PodDriver {
    type Handle = PodHandle;

    fn kind(&self) -> &'static str {
        "pod"
    }

    fn outlives_agent(&self) -> bool {
        true
    }

    async fn adopt(&self) -> Option<PodHandle> {
        let what = format!("reading pod {}/{}", self.ctx.settings.namespace, self.name);
        let pod = match call(what, "get", self.ctx.pods().get_opt(&self.name)).await {
            Ok(p) => p?,
            Err(e) => {
                warn!(pod = %self.name, error = %e, "cannot look for the pod an earlier agent started");
                return None;
            }
        };
        let ours = pod.metadata.labels.as_ref().and_then(|l| l.get(RUNTIME_LABEL)) == Some(&self.spec.name)
            && pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.ctx.node.as_str());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if ours && pod_alive(&pod) {
            return Some(self.watch(uid).await);
        }
        // A failed pod left behind (or someone else's of that name): out of the way, so the
        // start can create ours.
        info!(pod = %self.name, problem = ?pod_problem(&pod), "removing the pod an earlier agent left that no longer serves");
        let h = self.watch(uid.clone()).await;
        self.stop(&h, Duration::ZERO).await;
        None
    }

    async fn start(&self, launch: &Launch) -> Result<PodHandle, String> {
        let image =
            self.spec.image.clone().ok_or("the pod driver needs an image (runtimes.managed[].image or runtimes.engines.*.image)")?;
        let node_uid = self.ctx.node_uid().await?;
        let resources = self.resources(launch)?;
        let host_dir = launch.model_dir.as_deref().and_then(|d| self.host_model_dir(d));
        let m = manifest(
            &self.spec,
            launch,
            &self.name,
            &self.ctx.node,
            &node_uid,
            &image,
            &resources,
            &self.ctx.settings,
            host_dir.as_deref(),
        );
        let pod: Pod = serde_json::from_value(m).map_err(|e| format!("building the pod: {e}"))?;
        let api = self.ctx.pods();
        let what = format!("creating pod {}/{}", self.ctx.settings.namespace, self.name);
        let created = match call(what.clone(), "create", api.create(&PostParams::default(), &pod)).await {
            Ok(p) => p,
            Err(e) if e.code() == Some(409) => {
                // One left from an agent killed between create and watch: replace it.
                if let Ok(Some(old)) = call(what.clone(), "get", api.get_opt(&self.name)).await {
                    let h = self.watch(old.metadata.uid.unwrap_or_default()).await;
                    self.stop(&h, self.spec.drain_timeout).await;
                }
                call(what, "create", api.create(&PostParams::default(), &pod)).await.map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let uid = created.metadata.uid.clone().unwrap_or_default();
        info!(pod = %self.name, uid, image, resources = ?resources, "model server pod created");
        Ok(self.watch(uid).await)
    }

    fn alive(&self, h: &PodHandle) -> bool {
        h.latest.borrow().as_ref().is_some_and(pod_alive)
    }

    fn host(&self, h: &PodHandle) -> Result<String, String> {
        let latest = h.latest.borrow();
        let Some(p) = latest.as_ref() else { return Err("the pod is gone".into()) };
        if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()) {
            return Ok(ip);
        }
        Err(pod_problem(p).unwrap_or_else(|| {
            format!(
                "pod {} has no IP yet ({})",
                h.name,
                p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into())
            )
        }))
    }

    /// What the device plugin gave the pod's engine container, from the kubelet's
    /// PodResources; None where the kubelet does not answer (the asked-for partition stands).
    async fn bound(&self, h: &PodHandle) -> Option<String> {
        let resp = match crate::kube::podres::list(&self.ctx.podres_dir, Duration::from_secs(2)).await {
            Ok(r) => r,
            Err(e) => {
                warn!(pod = %h.name, error = %e, "cannot learn the pod's devices from the kubelet; reporting the partition it asked for");
                return None;
            }
        };
        let pod = resp.pod_resources.iter().find(|p| p.namespace == self.ctx.settings.namespace && p.name == h.name)?;
        let c = pod.containers.iter().find(|c| c.name == "engine")?;
        let devices: Vec<(String, Vec<String>)> = c.devices.iter().map(|d| (d.resource_name.clone(), d.device_ids.clone())).collect();
        allocated_partition(&devices)
    }

    fn image_seconds(&self, h: &PodHandle) -> Option<f64> {
        let latest = h.latest.borrow();
        let p = latest.as_ref()?;
        let created = p.metadata.creation_timestamp.as_ref()?.0;
        let running = p.status.as_ref()?.container_statuses.as_ref()?.first()?.state.as_ref()?.running.as_ref()?.started_at.as_ref()?.0;
        let s = running.duration_since(created).as_secs_f64();
        // Server clocks can disagree with ours; a nonsense answer is no answer.
        (s >= 0.0 && s <= h.created.elapsed().as_secs_f64() + 1.0).then_some(s)
    }

    /// Deletes the pod with `grace` as its grace period (the kubelet sends SIGTERM, then
    /// SIGKILL) and waits until it is gone.
    async fn stop(&self, h: &PodHandle, grace: Duration) {
        let t0 = Instant::now();
        if h.latest.borrow().is_none() {
            return;
        }
        if let Err(e) = self.delete(&h.uid, grace).await {
            warn!(pod = %h.name, error = %e, "cannot delete the model server's pod");
            return;
        }
        let mut latest = h.latest.clone();
        let gone = tokio::time::timeout(grace + DELETE_SLACK, latest.wait_for(Option::is_none)).await;
        match gone {
            Ok(_) => info!(pod = %h.name, took = ?t0.elapsed(), "model server pod deleted"),
            Err(_) => warn!(pod = %h.name, after = ?t0.elapsed(), "the model server's pod is still terminating; the kubelet finishes it"),
        }
    }

    fn last_words(&self, h: &PodHandle) -> String {
        h.latest.borrow().as_ref().and_then(pod_problem).unwrap_or_else(|| format!("pod {} is gone", h.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, uuid: &str, migs: &[(&str, &str)]) -> Accelerator {
        let mut a = Accelerator {
            index,
            uuid: uuid.into(),
            vendor: Vendor::Nvidia,
            product: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            pci_bus_id: String::new(),
            pci_device_id: 0,
            core_count: 0,
            simulated: true,
            health: crate::device::Health::Healthy,
            health_reason: String::new(),
            gpu: None,
            core_groups: Vec::new(),
        };
        if !migs.is_empty() {
            a.gpu = Some(crate::device::GpuDetail {
                mig_current: true,
                mig_devices: migs
                    .iter()
                    .map(|(u, p)| crate::device::gpu::MigDevice { uuid: (*u).into(), profile: (*p).into(), ..Default::default() })
                    .collect(),
                ..Default::default()
            });
        }
        a
    }

    #[test]
    fn partitions_become_device_plugin_resources() {
        let accs = [gpu(0, "GPU-a", &[]), gpu(1, "GPU-b", &[("MIG-x", "3g.40gb")])];
        assert_eq!(device_resource("GPU-a", &accs).unwrap(), ("nvidia.com/gpu".into(), 1));
        assert_eq!(device_resource("0,1", &accs).unwrap(), ("nvidia.com/gpu".into(), 2));
        assert_eq!(device_resource("MIG-x", &accs).unwrap(), ("nvidia.com/mig-3g.40gb".into(), 1));
        assert!(device_resource("MIG-x,GPU-a", &accs).unwrap_err().contains("cannot be combined"));
        assert!(device_resource("GPU-zzz", &accs).unwrap_err().contains("\"GPU-zzz\": not a GPU"));
        assert_eq!(device_resource("neuroncores:4-7", &accs).unwrap(), ("aws.amazon.com/neuroncore".into(), 4));
        assert!(device_resource("neuroncores:7-4", &accs).is_err());
    }

    #[test]
    fn allocated_devices_become_the_reported_partition() {
        let d = |r: &str, ids: &[&str]| (r.to_owned(), ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(allocated_partition(&[d("nvidia.com/gpu", &["GPU-b", "GPU-a::2"])]).as_deref(), Some("GPU-a,GPU-b"));
        assert_eq!(allocated_partition(&[d("nvidia.com/mig-3g.40gb", &["MIG-x"])]).as_deref(), Some("MIG-x"));
        assert_eq!(allocated_partition(&[d("aws.amazon.com/neuroncore", &["5", "4", "6"])]).as_deref(), Some("neuroncores:4-6"));
        assert_eq!(allocated_partition(&[d("example.com/fpga", &["f0"])]), None);
    }

    #[test]
    fn pod_names_stay_valid() {
        assert_eq!(pod_name("llama", "node-1"), "hearth-llama-node-1");
        let long = pod_name("r", &"n".repeat(300));
        assert_eq!(long.len(), 253);
    }

    #[test]
    fn a_terminated_container_or_a_deleted_pod_is_not_alive_and_says_why() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Running", "containerStatuses": [{"name": "engine", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}
        }))
        .unwrap();
        assert!(!pod_alive(&p));
        assert_eq!(pod_problem(&p).unwrap(), "container engine OOMKilled (exit code 137)");
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "engine", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"vllm\""}}}]}
        }))
        .unwrap();
        assert!(pod_alive(&p), "an image still being pulled may come");
        assert_eq!(pod_problem(&p).unwrap(), "container engine ImagePullBackOff: Back-off pulling image \"vllm\"");
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}})).unwrap();
        assert!(!pod_alive(&p));
    }
}
