#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! GPU metrics attributed to pods through a kubelet-shaped PodResources server on a unix
//! socket: whole GPUs, time-sliced replicas, a kubelet restart (new socket at the same path)
//! and a kubelet that goes away (labels dropped, failure counted, agent fine). Also: the
//! inventory details reach the controller's view of the node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hearth_proto::podresources::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use hearth_proto::podresources::{ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse, PodResources};
use hearth_proto::v1 as pb;
use hearth_tests::*;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Kubelet(Arc<Mutex<ListPodResourcesResponse>>);

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(&self, _: tonic::Request<ListPodResourcesRequest>) -> Result<tonic::Response<ListPodResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.lock().unwrap().clone()))
    }
}

/// Serves `k` on `dir/kubelet.sock` until the returned token is cancelled, replacing any old
/// socket file the way the kubelet does on restart.
fn serve(dir: &std::path::Path, k: Kubelet) -> Result<CancellationToken> {
    let path = dir.join("kubelet.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(k))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), s.cancelled())
            .await;
    });
    Ok(stop)
}

fn pod(ns: &str, name: &str, container: &str, resource: &str, ids: &[String]) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: ns.into(),
        containers: vec![ContainerResources {
            name: container.into(),
            devices: vec![ContainerDevices { resource_name: resource.into(), device_ids: ids.to_vec(), topology: None }],
        }],
    }
}

/// Sample lines of `family` for GPU `gpu`.
fn series<'a>(body: &'a str, family: &str, gpu: u32) -> Vec<&'a str> {
    let prefix = format!("{family}{{gpu=\"{gpu}\"");
    body.lines().filter(|l| l.starts_with(&prefix)).collect()
}

fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(",{key}=\""))? + key.len() + 3;
    line[start..].split('"').next()
}

/// The controller's view of `node`, or None while it has none (or is unreachable).
async fn node_state(grpc: std::net::SocketAddr, pki: &TestPki, node: &str) -> Result<Option<pb::NodeState>> {
    let tls = pki.client_material("operator")?;
    let Ok(ch) = channel(grpc, Some(&tls)).await else { return Ok(None) };
    let Ok(r) = pb::operator_client::OperatorClient::new(ch).get_node(pb::GetNodeRequest { name: node.into() }).await else {
        return Ok(None);
    };
    Ok(r.into_inner().state)
}

async fn metrics(agent: &AgentProc) -> String {
    http_get(agent.http, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
}

#[tokio::test]
async fn gpu_series_carry_pod_labels_from_the_kubelet_and_survive_its_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    let grpc = ctl.grpc;
    let pr = dir.path().join("pod-resources");
    std::fs::create_dir_all(&pr)?;
    let kubelet = Kubelet::default();
    let mut stop = serve(&pr, kubelet.clone())?;
    let agent = AgentProc::start_with_devices(
        dir.path(),
        &pki,
        "gpu-1",
        grpc,
        &format!(
            "{{simulated: [2xH100-80GB], collect_interval: 200ms, pod_resources_dir: {}, pod_resources_interval: 200ms}}",
            pr.display()
        ),
    )
    .await?;

    // The GPUs' UUIDs, as the exporter labels them.
    let body = wait_for("GPU metrics", Duration::from_secs(15), || async {
        let b = metrics(&agent).await;
        Ok((series(&b, "DCGM_FI_DEV_GPU_TEMP", 1).len() == 1).then_some(b))
    })
    .await?;
    let uuid = |gpu| label(series(&body, "DCGM_FI_DEV_GPU_TEMP", gpu)[0], "UUID").unwrap().to_owned();
    let (gpu0, gpu1) = (uuid(0), uuid(1));
    assert!(series(&body, "DCGM_FI_DEV_GPU_TEMP", 0)[0].find("pod=").is_none(), "nothing held yet");

    // GPU 0 whole to one pod; GPU 1 time-sliced between two.
    *kubelet.0.lock().unwrap() = ListPodResourcesResponse {
        pod_resources: vec![
            pod("ml", "llama-0", "vllm", "nvidia.com/gpu", std::slice::from_ref(&gpu0)),
            pod("dev", "nb-1", "jupyter", "nvidia.com/gpu.shared", &[format!("{gpu1}::0"), format!("{gpu1}::3")]),
            pod("dev", "nb-2", "jupyter", "nvidia.com/gpu.shared", &[format!("{gpu1}::1")]),
        ],
    };
    wait_for("pod labels", Duration::from_secs(15), || async {
        let b = metrics(&agent).await;
        let g0 = series(&b, "DCGM_FI_DEV_POWER_USAGE", 0);
        let mut g1: Vec<&str> = series(&b, "DCGM_FI_DEV_POWER_USAGE", 1).iter().filter_map(|l| label(l, "pod")).collect();
        g1.sort();
        let ok = g0.len() == 1
            && label(g0[0], "pod") == Some("llama-0")
            && label(g0[0], "namespace") == Some("ml")
            && label(g0[0], "container") == Some("vllm")
            && g1 == ["nb-1", "nb-2"];
        Ok(ok.then_some(()))
    })
    .await?;

    // The kubelet restarts: the socket is replaced at the same path; the agent redials. It
    // comes back only once the agent has found it gone (its socket file still there,
    // refusing connections).
    stop.cancel();
    *kubelet.0.lock().unwrap() =
        ListPodResourcesResponse { pod_resources: vec![pod("ml", "llama-1", "vllm", "nvidia.com/gpu", std::slice::from_ref(&gpu0))] };
    wait_for("the agent to find the kubelet down", Duration::from_secs(15), || async {
        let b = metrics(&agent).await;
        Ok(metric_value(&b, "hearth_gpu_attribution_refreshes_total{result=\"connect\"}").filter(|n| *n >= 1.0))
    })
    .await?;
    stop = serve(&pr, kubelet.clone())?;
    wait_for("labels after a kubelet restart", Duration::from_secs(15), || async {
        let b = metrics(&agent).await;
        let g0 = series(&b, "DCGM_FI_DEV_POWER_USAGE", 0);
        let g1 = series(&b, "DCGM_FI_DEV_POWER_USAGE", 1);
        Ok((g0.len() == 1 && label(g0[0], "pod") == Some("llama-1") && g1.len() == 1 && label(g1[0], "pod").is_none()).then_some(()))
    })
    .await?;

    // The kubelet goes away: after the stale window the labels go, the failure is counted,
    // and the GPU metrics themselves carry on.
    stop.cancel();
    std::fs::remove_file(pr.join("kubelet.sock"))?;
    wait_for("labels dropped, failure counted", Duration::from_secs(15), || async {
        let b = metrics(&agent).await;
        let missing = metric_value(&b, "hearth_gpu_attribution_refreshes_total{result=\"missing_socket\"}").unwrap_or(0.0);
        let g0 = series(&b, "DCGM_FI_DEV_POWER_USAGE", 0);
        Ok((missing >= 1.0 && g0.len() == 1 && label(g0[0], "pod").is_none()).then_some(()))
    })
    .await?;

    // The controller's view carries the NVML-level details of each GPU.
    let accs = node_state(grpc, &pki, "gpu-1").await?.unwrap().accelerators;
    assert_eq!(accs.len(), 2);
    assert!(accs.iter().all(|a| a.driver_version == "580.159.04" && a.cuda_version == "13.0" && !a.mig_enabled), "{accs:?}");
    assert_eq!(accs[0].uuid, gpu0);
    drop(ctl);
    Ok(())
}

#[tokio::test]
async fn an_agent_told_to_use_nvml_without_a_driver_runs_on_and_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    let grpc = ctl.grpc;
    // A library path that does not exist stands for a host without the NVIDIA driver.
    let missing = dir.path().join("no-such-libnvidia-ml.so.1");
    let agent =
        AgentProc::start_with_devices(dir.path(), &pki, "cpu-1", grpc, &format!("{{backend: nvml, nvml_library: {}}}", missing.display()))
            .await?;
    // The node can be known (Hello) a moment before its first snapshot: wait for the subsystems.
    let state = wait_for("node reported with the reason", Duration::from_secs(15), || async {
        Ok(node_state(grpc, &pki, "cpu-1").await?.filter(|s| s.subsystems.iter().any(|s| s.name == "devices")))
    })
    .await?;
    let devices = state.subsystems.iter().find(|s| s.name == "devices").expect("devices subsystem reported");
    assert!(!devices.enabled, "{devices:?}");
    assert!(devices.reason.contains("libnvidia-ml"), "{devices:?}");
    assert!(state.accelerators.is_empty());
    // Everything else works: node metrics and the cache are there.
    let (status, body) = http_get(agent.http, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(body.contains("hearth_node_cpu_usage_ratio") && !body.contains("DCGM_FI_"));
    Ok(())
}

#[tokio::test]
async fn a_partition_spec_in_the_config_is_applied_reported_and_exported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    let grpc = ctl.grpc;
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/mig-spec.yaml");
    let (api, kube_yaml) = hearth_tests::agent_api_server(dir.path(), "mig-1").await?;
    let agent = AgentProc::start(
        dir.path(),
        &pki,
        "mig-1",
        grpc,
        &format!("partition: {{spec: {}, config: balanced}}\n{kube_yaml}", spec.display()),
    )
    .await?;
    let state = wait_for("partition applied and reported", Duration::from_secs(20), || async {
        let s = node_state(grpc, &pki, "mig-1").await?.unwrap_or_default();
        let done = s.partition.as_ref().is_some_and(|p| p.phase == pb::partition_status::Phase::Success as i32)
            && s.accelerators.iter().all(|a| a.partitions.len() == 4);
        Ok(done.then_some(s))
    })
    .await?;
    let p = state.partition.unwrap();
    assert_eq!(p.spec_name, "balanced");
    let labels = state.info.unwrap().labels;
    assert_eq!(labels.get("hearth.dev/mig.config.state").map(String::as_str), Some("success"));
    assert_eq!(labels.get("hearth.dev/mig.config").map(String::as_str), Some("balanced"));
    let a = &state.accelerators[0];
    assert!(a.mig_enabled);
    let mut profiles: Vec<(&str, u32)> = a.partitions.iter().map(|p| (p.profile.as_str(), p.placement_start)).collect();
    profiles.sort();
    assert_eq!(profiles, [("1g.10gb", 2), ("1g.10gb", 3), ("2g.20gb", 0), ("3g.40gb", 4)]);
    assert!(a.partitions.iter().all(|p| p.uuid.starts_with("MIG-") && p.gpu_instance_id > 0));
    // Per-MIG-instance utilisation, the series dcgm-exporter lacks on MIG.
    let body = metrics(&agent).await;
    let mig_util: Vec<&str> =
        body.lines().filter(|l| l.starts_with("DCGM_FI_PROF_GR_ENGINE_ACTIVE{") && l.contains("GPU_I_PROFILE=\"3g.40gb\"")).collect();
    assert_eq!(mig_util.len(), 2, "one per GPU:\n{body}");
    assert!(series(&body, "DCGM_FI_DEV_GPU_UTIL", 0).is_empty(), "no whole-GPU utilisation under MIG");
    // And on the Kubernetes Node object, by server-side apply with Hearth's field manager.
    let labels = wait_for("the node labels", Duration::from_secs(10), || async {
        let l = api.node("mig-1").map(|n| n["metadata"]["labels"].clone()).unwrap_or_default();
        Ok((l["hearth.dev/mig.config.state"] == "success").then_some(l))
    })
    .await?;
    assert_eq!(labels["hearth.dev/mig.config"], "balanced");
    let apply = api.requests().into_iter().rfind(|r| r.is("patch", "nodes")).context("no apply")?;
    assert_eq!(
        (apply.content_type.as_str(), apply.query.get("fieldManager").map(String::as_str)),
        ("application/apply-patch+yaml", Some("hearth-agent"))
    );
    assert!(api.forbidden().is_empty(), "{:?}", api.forbidden());
    // The record is on disk for the next start.
    let rec = std::fs::read_to_string(dir.path().join("state-mig-1/partition.json"))?;
    assert!(rec.contains("\"phase\": \"success\""), "{rec}");
    Ok(())
}
