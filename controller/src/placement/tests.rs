use std::time::{Duration, Instant};

use hearth_proto::convert::AgentHello;
use hearth_proto::v1 as pb;
use tokio::sync::mpsc;

use super::*;
use crate::catalog::{Catalog, DeviceRequest, ModelSpec, ScalingSpec};

const GB: u64 = 1_000_000_000;

pub(crate) fn gpu_node(gpus: u32) -> pb::NodeState {
    pb::NodeState::h100s(gpus).with_memory_available(512 * GB)
}

fn model(name: &str, gpus: u32, bytes: u64) -> ModelSpec {
    ModelSpec {
        serve: Default::default(),
        name: name.into(),
        source_uri: format!("s3://models/{name}"),
        revision: "main".into(),
        bytes,
        image: "vllm:v1".into(),
        image_bytes: 10 * GB,
        runtime: "vllm".into(),
        device: DeviceRequest::Gpus(gpus),
        memory_bytes: 64 * GB,
        scaling: ScalingSpec::defaults(),
    }
}

fn cached(name: &str, present: u64, total: u64) -> pb::CachedModel {
    pb::CachedModel::cached(format!("id-{name}"), format!("s3://models/{name}"), "main", present, total)
}

struct Cluster {
    state: Arc<ClusterState>,
    t0: Instant,
}

impl Cluster {
    fn new() -> Self {
        Self::stale_after(Duration::from_secs(15))
    }

    fn stale_after(d: Duration) -> Self {
        Self { state: Arc::new(ClusterState::new(d, Duration::from_secs(600))), t0: Instant::now() }
    }

    fn add(&self, name: &str, s: pb::NodeState) {
        let (tx, rx) = mpsc::channel(1);
        std::mem::forget(rx);
        let hello = AgentHello {
            node_name: name.into(),
            boot_id: "b".into(),
            agent_version: "t".into(),
            api_version: hearth_proto::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 1000,
        };
        let id = self.state.open_session(hello, "p".into(), tx, self.t0).unwrap();
        self.state.apply_snapshot(name, id, pb::Snapshot { epoch: 1, seq: 1, state: Some(s) }, self.t0).unwrap();
    }

    fn placement(&self, models: Vec<ModelSpec>) -> Placement {
        Placement::new(self.state.clone(), Arc::new(Catalog::from_specs(models)), Params::default())
    }
}

#[test]
fn cached_bytes_and_bandwidth_decide_the_score_and_every_part_is_shown() {
    let c = Cluster::new();
    let mut warm = gpu_node(8);
    warm.models.push(cached("llama", 140 * GB, 140 * GB));
    warm.images.push(pb::CachedImage { reference: "vllm:v1".into(), ..Default::default() });
    c.add("warm", warm);
    let mut half = gpu_node(8);
    half.models.push(cached("llama", 70 * GB, 140 * GB));
    half.source_bandwidth.push(pb::SourceBandwidth { source: "s3://models".into(), bytes_per_second: 2e9, samples: 10 });
    c.add("half", half);
    c.add("cold", gpu_node(8));
    let p = c.placement(vec![model("llama", 4, 140 * GB)]);
    let out = p.score("llama", None, 0, c.t0).unwrap();
    let order: Vec<&str> = out.best.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(order, ["warm", "half", "cold"]);
    let warm = &out.best[0];
    assert_eq!((warm.parts.missing_bytes, warm.parts.image_pull_s, warm.parts.download_s), (0, 0.0, 0.0));
    assert_eq!(warm.parts.local_load_s, 70.0, "140 GB at 2 GB/s");
    assert_eq!(warm.parts.time_to_ready(), 90.0, "plus the 20 s runtime start");
    assert_eq!(warm.priority, 10);
    let half = &out.best[1];
    assert_eq!((half.parts.missing_bytes, half.parts.bandwidth_measured), (70 * GB, true));
    assert_eq!(half.parts.download_s, 35.0, "70 GB at the measured 2 GB/s");
    assert_eq!(half.parts.image_pull_s, 100.0, "10 GB image at the 100 MB/s default");
    let cold = &out.best[2];
    assert_eq!(cold.parts.download_s, 700.0, "140 GB at the 200 MB/s default");
    assert!(!cold.parts.bandwidth_measured);
    assert_eq!(cold.priority, (10.0f64 * 90.0 / cold.parts.total()).round() as u8);
}

#[test]
fn a_nodes_measured_pull_rate_from_the_images_registry_prices_the_image_pull() {
    let c = Cluster::new();
    let mut fast = gpu_node(8);
    fast.source_bandwidth.push(pb::SourceBandwidth { source: "oci://r.example.com".into(), bytes_per_second: 1e9, samples: 3 });
    c.add("fast", fast);
    let mut other = gpu_node(8);
    other.source_bandwidth.push(pb::SourceBandwidth { source: "oci://elsewhere.io".into(), bytes_per_second: 1e9, samples: 3 });
    c.add("other", other);
    let mut m = model("llama", 1, GB);
    m.image = "r.example.com/team/vllm:v1".into();
    let out = c.placement(vec![m]).score("llama", None, 0, c.t0).unwrap();
    let by = |n: &str| out.best.iter().find(|s| s.node == n).unwrap().parts.image_pull_s;
    assert_eq!(by("fast"), 10.0, "10 GB at the node's measured 1 GB/s from that registry");
    assert_eq!(by("other"), 100.0, "another registry's rate says nothing: the 100 MB/s default");
}

/// A node that started the model before predicts its start from what it measured; the others
/// use the configured default, and say which.
#[test]
fn a_measured_start_replaces_the_default_on_its_node_only() {
    let c = Cluster::new();
    let mut ran = gpu_node(8);
    ran.runtimes.push(pb::ServingRuntime {
        name: "llama-0".into(),
        model_id: "llama".into(),
        state: "ready".into(),
        start_seconds: 7.5,
        ..Default::default()
    });
    // A runtime of another model, and a nonsense measurement, change nothing.
    ran.runtimes.push(pb::ServingRuntime { name: "x".into(), model_id: "other".into(), start_seconds: 1.0, ..Default::default() });
    c.add("ran", ran);
    let mut odd = gpu_node(8);
    odd.runtimes.push(pb::ServingRuntime { name: "y".into(), model_id: "llama".into(), start_seconds: f64::NAN, ..Default::default() });
    c.add("odd", odd);
    c.add("never", gpu_node(8));
    let p = c.placement(vec![model("llama", 1, 10 * GB)]);
    let out = p.score("llama", None, 0, c.t0).unwrap();
    let by = |n: &str| out.best.iter().find(|s| s.node == n).unwrap().parts.clone();
    assert_eq!((by("ran").runtime_start_s, by("ran").runtime_start_measured), (7.5, true));
    for n in ["odd", "never"] {
        assert_eq!((by(n).runtime_start_s, by(n).runtime_start_measured), (20.0, false), "{n}");
    }
}

#[test]
fn stale_unknown_and_unfit_nodes_are_rejected_with_reasons() {
    let c = Cluster::new();
    c.add("small", gpu_node(2));
    c.add("big", gpu_node(8));
    let p = c.placement(vec![model("m", 4, GB)]);
    let names = vec!["small".to_owned(), "big".to_owned(), "ghost".to_owned()];
    let out = p.filter("m", Some(&names), c.t0).unwrap();
    assert_eq!(out.feasible.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(), ["big"]);
    let reasons: Vec<(&str, &str)> = out.rejected.iter().map(|r| (r.node.as_str(), r.reason.code())).collect();
    assert_eq!(reasons, [("small", "gpus"), ("ghost", "unknown_node")]);
    assert_eq!(
        out.rejected[0].reason.to_string(),
        "needs 4 whole GPU(s); 2 free of 2 (others are unhealthy, in MIG mode, in use or leased)"
    );
    // 20 s later without a message both nodes are stale: nothing fits, and the error says why.
    let later = c.t0 + Duration::from_secs(20);
    let err = p.score("m", None, 0, later).unwrap_err();
    let PlacementError::NoFit { summary, .. } = &err else { panic!("{err:?}") };
    assert!(summary.starts_with("2 node(s) stale, e.g. node is stale"), "{summary}");
    assert_eq!(p.score("nope", None, 0, c.t0).unwrap_err(), PlacementError::UnknownModel("nope".into()));
}

#[test]
fn leases_are_idempotent_hold_devices_and_expire() {
    let c = Cluster::stale_after(Duration::from_secs(3600));
    c.add("a", gpu_node(8));
    let p = c.placement(vec![model("m", 4, GB), model("other", 4, GB)]);
    let t = c.t0;
    let l1 = p.reserve("req-1", "m", None, None, t).unwrap();
    assert_eq!(l1.slot, Slot::Gpus(vec![0, 1, 2, 3]));
    // A retry gets the same answer.
    assert_eq!(p.reserve("req-1", "m", None, None, t + Duration::from_secs(1)).unwrap(), l1);
    assert_eq!(p.reserve("req-1", "m", Some("a"), None, t).unwrap(), l1);
    // The same id for something else is a conflict, not a second lease.
    assert!(matches!(p.reserve("req-1", "other", None, None, t), Err(PlacementError::Conflict { .. })));
    let l2 = p.reserve("req-2", "m", None, None, t).unwrap();
    assert_eq!(l2.slot, Slot::Gpus(vec![4, 5, 6, 7]));
    let err = p.reserve("req-3", "m", None, None, t).unwrap_err();
    assert!(err.to_string().contains("4 whole GPU(s); 0 free of 8"), "{err}");
    assert!(p.release("req-2", t));
    assert!(!p.release("req-2", t), "a second release is a no-op");
    assert_eq!(p.reserve("req-3", "m", None, None, t).unwrap().slot, Slot::Gpus(vec![4, 5, 6, 7]));
    // A crashed caller never releases: its devices come back after the TTL.
    let after = t + Duration::from_secs(61);
    assert_eq!(p.lease_count(after), 0);
    assert_eq!(p.reserve("req-4", "m", None, Some(Duration::from_secs(5)), after).unwrap().slot, Slot::Gpus(vec![0, 1, 2, 3]));
    assert!(matches!(p.reserve("req-5", "m", None, Some(Duration::from_secs(3600)), after), Err(PlacementError::Invalid(_))));
}

#[test]
fn memory_leases_limit_a_node() {
    let c = Cluster::new();
    c.add("a", pb::NodeState::h100s(8).with_memory_available(100 * GB));
    let p = c.placement(vec![model("m", 1, GB)]);
    p.reserve("r1", "m", None, None, c.t0).unwrap();
    let err = p.reserve("r2", "m", None, None, c.t0).unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
}

#[test]
fn mig_instances_from_reports_are_placed_best_fit() {
    let c = Cluster::new();
    let mut s = pb::NodeState::from_accelerators([
        pb::Accelerator::h100(0).with_mig([]),
        pb::Accelerator::h100(1).with_mig([pb::Partition::mig("MIG-a", "3g.40gb", 1, 4, 4)]),
    ])
    .with_memory_available(512 * GB);
    s.runtimes.push(pb::ServingRuntime { name: "r".into(), partition_uuid: "MIG-a".into(), ..Default::default() });
    c.add("a", s);
    let mut m = model("m", 1, GB);
    m.device = DeviceRequest::Mig("3g.40gb".into());
    let p = c.placement(vec![m]);
    // GPU 1's 3g.40gb is in use; the second fits beside it at unit 0, leaving GPU 0 whole.
    assert_eq!(
        p.reserve("r1", "m", None, None, c.t0).unwrap().slot,
        Slot::MigCreate { gpu: 1, profile: "3g.40gb".into(), start: 0, size: 4 }
    );
    assert!(matches!(p.reserve("r2", "m", None, None, c.t0).unwrap().slot, Slot::MigCreate { gpu: 0, .. }));
}

#[test]
fn the_best_k_are_the_first_k_of_the_full_ranking() {
    let c = Cluster::new();
    // Nodes that differ in cached bytes, bandwidth and free GPUs, with ties on purpose
    // (every fifth node is identical to the one five before it).
    for i in 0..40u64 {
        let mut n = gpu_node(2 + (i % 3) as u32 * 3);
        n.models.push(cached("m", (i % 5) * 20 * GB, 100 * GB));
        n.source_bandwidth.push(pb::SourceBandwidth {
            source: "s3://models".into(),
            bytes_per_second: 1e8 * (1 + i % 4) as f64,
            samples: 1,
        });
        c.add(&format!("n{i:02}"), n);
    }
    c.add("full", gpu_node(1));
    let p = c.placement(vec![model("m", 2, 100 * GB)]);
    let all = p.score("m", None, 0, c.t0).unwrap();
    assert_eq!((all.best.len(), all.rejected), (40, 1));
    for k in [1, 3, 7, 40, 100] {
        let top = p.score("m", None, k, c.t0).unwrap();
        let names = |v: &[Scored]| v.iter().map(|s| (s.node.clone(), s.priority)).collect::<Vec<_>>();
        assert_eq!(names(&top.best), names(&all.best[..k.min(40)]), "k = {k}");
        assert_eq!(top.rejected, 1);
    }
    // A caller's candidate list in any order ranks the same way.
    let mut names: Vec<String> = (0..40).rev().map(|i| format!("n{i:02}")).collect();
    names.swap(3, 17);
    let top = p.score("m", Some(&names), 5, c.t0).unwrap();
    assert_eq!(top.best.iter().map(|s| &s.node).collect::<Vec<_>>(), all.best[..5].iter().map(|s| &s.node).collect::<Vec<_>>());
}

#[test]
fn a_node_whose_cache_is_full_pays_for_what_it_would_evict() {
    let c = Cluster::new();
    let with_room = |free: u64| {
        let mut n = gpu_node(8);
        n.resources = Some(pb::NodeResources {
            memory_available_bytes: 512 * GB,
            cache_capacity_bytes: 1000 * GB,
            cache_free_bytes: free,
            ..Default::default()
        });
        n
    };
    c.add("full", with_room(40 * GB));
    c.add("roomy", with_room(900 * GB));
    c.add("unknown", gpu_node(8));
    let p = c.placement(vec![model("llama", 4, 140 * GB)]);
    let out = p.score("llama", None, 0, c.t0).unwrap();
    let by = |n: &str| out.best.iter().find(|s| s.node == n).unwrap().parts.clone();
    assert_eq!((by("full").evict_bytes, by("roomy").evict_bytes, by("unknown").evict_bytes), (100 * GB, 0, 0));
    // 100 GB to fetch again at the 200 MB/s default, half of it charged.
    assert_eq!(by("full").eviction_penalty_s, 250.0);
    assert_eq!(out.best.last().unwrap().node, "full");
}
