//! Which pods hold which GPUs: kubelet's PodResources v1 `List`, read over its unix socket
//! on a timer, off the scrape path. The agent mounts the socket's directory, not the
//! socket, and dials the path afresh on each refresh, so a kubelet restart (which recreates
//! the socket) costs at most one refresh.
//!
//! Device ids as the NVIDIA device plugin reports them: `GPU-<uuid>` for whole GPUs,
//! `MIG-<uuid>` for MIG devices, and `<id>::<n>` for time-sliced replicas of one device,
//! which attribute to the device itself. A refresh replaces the whole map, so a device
//! missing from it is known to be unattributed until the next refresh (the negative cache:
//! scrapes never ask the kubelet). When the kubelet cannot be reached the last good map is
//! kept for `stale_after`, then dropped, since pods move; metrics carry no pod labels
//! meanwhile and the failure is counted, never fatal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::podresources::pod_resources_lister_client::PodResourcesListerClient;
use hearth_proto::podresources::{ListPodResourcesRequest, ListPodResourcesResponse};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::PodRef;

/// The socket's file name inside the mounted directory.
pub const SOCKET_NAME: &str = "kubelet.sock";
pub const DEFAULT_DIR: &str = "/var/lib/kubelet/pod-resources";

/// A container of a pod, as PodResources names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub pod: PodRef,
    pub container: String,
}

/// Device id -> the containers holding it. Data only: the metrics that label series with
/// it render their own label text.
#[derive(Debug, Default, PartialEq)]
pub struct Attribution {
    by_device: HashMap<String, Vec<ContainerRef>>,
}

/// The device id without a time-slicing replica suffix (`GPU-x::3` -> `GPU-x`).
pub fn base_device_id(id: &str) -> &str {
    id.split_once("::").map_or(id, |(base, _)| base)
}

impl Attribution {
    pub fn from_list(resp: &ListPodResourcesResponse) -> Self {
        let mut by_device: HashMap<String, Vec<ContainerRef>> = HashMap::new();
        for pod in &resp.pod_resources {
            for c in &pod.containers {
                for d in &c.devices {
                    for id in &d.device_ids {
                        let id = base_device_id(id);
                        if !(id.starts_with("GPU-") || id.starts_with("MIG-")) {
                            continue;
                        }
                        let r = ContainerRef {
                            pod: PodRef { namespace: pod.namespace.clone(), name: pod.name.clone() },
                            container: c.name.clone(),
                        };
                        let list = by_device.entry(id.to_owned()).or_default();
                        // Two time-slice replicas of one GPU in one container are one series.
                        if !list.contains(&r) {
                            list.push(r);
                        }
                    }
                }
            }
        }
        Self { by_device }
    }

    /// The containers holding a device (GPU or MIG UUID).
    pub fn containers_of(&self, uuid: &str) -> &[ContainerRef] {
        self.by_device.get(uuid).map_or(&[], Vec::as_slice)
    }

    /// Every attributed device with its containers.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[ContainerRef])> {
        self.by_device.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn devices(&self) -> usize {
        self.by_device.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodResError {
    #[error("kubelet PodResources socket {0} does not exist (is the pod-resources directory mounted?)")]
    MissingSocket(PathBuf),
    #[error("connecting to {path}: {source}")]
    Connect { path: PathBuf, source: tonic::transport::Error },
    #[error("PodResources List: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("PodResources List did not answer within {0:?}")]
    Timeout(Duration),
}

impl PodResError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            PodResError::MissingSocket(_) => "missing_socket",
            PodResError::Connect { .. } => "connect",
            PodResError::Rpc(_) => "rpc",
            PodResError::Timeout(_) => "timeout",
        }
    }
}

/// Calls `List` once on the socket in `dir`.
pub async fn list(dir: &Path, timeout: Duration) -> Result<ListPodResourcesResponse, PodResError> {
    let path = dir.join(SOCKET_NAME);
    if !path.exists() {
        return Err(PodResError::MissingSocket(path));
    }
    let connect_path = path.clone();
    let call = async move {
        // The URI is required by the API and ignored by the connector.
        let channel = tonic::transport::Endpoint::from_static("http://kubelet.invalid")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = connect_path.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|source| PodResError::Connect { path, source })?;
        // Kubelet's own limit is 16 MiB; a node with many pods can exceed tonic's 4 MiB default.
        let mut client = PodResourcesListerClient::new(channel).max_decoding_message_size(16 << 20);
        Ok(client.list(ListPodResourcesRequest {}).await?.into_inner())
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| PodResError::Timeout(timeout))?
}

#[derive(Debug, Clone)]
pub struct PodResSettings {
    pub dir: PathBuf,
    pub every: Duration,
    pub timeout: Duration,
    /// How long the last good map outlives a failing kubelet.
    pub stale_after: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct PodResMetrics {
    refreshes: Family<[(&'static str, &'static str); 1], Counter>,
    devices: Gauge,
}

impl PodResMetrics {
    pub fn register(reg: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        reg.register(
            "hearth_gpu_attribution_refreshes",
            "kubelet PodResources refreshes by result (ok, missing_socket, connect, rpc, timeout)",
            m.refreshes.clone(),
        );
        reg.register("hearth_gpu_attributed_devices", "GPUs and MIG devices held by pods, as of the last refresh", m.devices.clone());
        m
    }
}

/// Refreshes the attribution map until `shutdown`, publishing through `set`.
pub async fn run(s: PodResSettings, metrics: PodResMetrics, set: impl Fn(Arc<Attribution>), shutdown: CancellationToken) {
    let mut last_ok: Option<Instant> = None;
    let mut failing: Option<&'static str> = None;
    loop {
        match list(&s.dir, s.timeout).await {
            Ok(resp) => {
                let a = Attribution::from_list(&resp);
                metrics.refreshes.get_or_create(&[("result", "ok")]).inc();
                metrics.devices.set(a.devices() as i64);
                if failing.take().is_some() {
                    info!(devices = a.devices(), "kubelet PodResources reachable again");
                }
                set(Arc::new(a));
                last_ok = Some(Instant::now());
            }
            Err(e) => {
                metrics.refreshes.get_or_create(&[("result", e.reason())]).inc();
                if failing != Some(e.reason()) {
                    warn!(error = %e, "GPU metrics go without pod labels until the kubelet answers");
                    failing = Some(e.reason());
                }
                if last_ok.is_none_or(|t| t.elapsed() > s.stale_after) {
                    metrics.devices.set(0);
                    set(Arc::new(Attribution::default()));
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(s.every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::podresources::{ContainerDevices, ContainerResources, PodResources};

    fn pod(ns: &str, name: &str, container: &str, resource: &str, ids: &[&str]) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: vec![ContainerResources {
                name: container.into(),
                devices: vec![ContainerDevices {
                    resource_name: resource.into(),
                    device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                    topology: None,
                }],
            }],
        }
    }

    #[test]
    fn maps_gpus_mig_devices_and_time_slices() {
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                pod("ml", "llama-0", "vllm", "nvidia.com/gpu", &["GPU-aaa"]),
                pod("ml", "small-0", "tgi", "nvidia.com/mig-1g.10gb", &["MIG-bbb"]),
                pod("dev", "nb-1", "jupyter", "nvidia.com/gpu.shared", &["GPU-ccc::0", "GPU-ccc::3"]),
                pod("dev", "nb-2", "jupyter", "nvidia.com/gpu.shared", &["GPU-ccc::1"]),
                pod("kube-system", "net", "cni", "example.com/sriov", &["0000:3b:00.1"]),
            ],
        };
        let a = Attribution::from_list(&resp);
        let p = &a.containers_of("GPU-aaa")[0];
        assert_eq!((p.container.as_str(), p.pod.namespace.as_str(), p.pod.name.as_str()), ("vllm", "ml", "llama-0"));
        assert_eq!(a.containers_of("MIG-bbb")[0].pod.name, "small-0");
        let shared: Vec<_> = a.containers_of("GPU-ccc").iter().map(|r| r.pod.name.as_str()).collect();
        assert_eq!(shared, ["nb-1", "nb-2"], "one entry per pod, replicas folded");
        assert!(a.containers_of("0000:3b:00.1").is_empty(), "non-GPU devices ignored");
        assert_eq!(a.devices(), 3);
    }

    #[tokio::test]
    async fn missing_socket_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = list(dir.path(), Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.reason(), "missing_socket");
        assert!(e.to_string().contains("kubelet.sock"), "{e}");
    }
}
