//! Property tests of what the controller does with whatever agents report: any sequence of
//! snapshots, deltas and heartbeats leaves the stored state exactly where the sequence rules
//! say (a model of those rules runs beside it), deltas computed by `diff` rebuild the agent's
//! state, and placement and scaling read any reported state without a panic.
//!
//! The strategies are `pub(crate)` so the agent-stream tests feed the same states.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::convert::{self, AgentHello};
use hearth_proto::v1 as pb;
use proptest::prelude::*;
use tokio::sync::mpsc;

use super::*;
use crate::catalog::{Catalog, DeviceRequest, ModelSpec, ScalingSpec};
use crate::placement::{Params, Placement};
use crate::scaling::{Scaling, Settings};

/// Whether generated doubles may be NaN, infinite or negative (agents are not trusted to
/// send sane loads), or only finite ones (where a test compares states, since NaN != NaN).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Floats {
    Finite,
    Any,
}

fn float(f: Floats) -> BoxedStrategy<f64> {
    match f {
        Floats::Finite => prop_oneof![Just(0.0), 0.0..100.0, 1e6..1e12].boxed(),
        Floats::Any => {
            prop_oneof![Just(0.0), 0.0..100.0, -1e3..0.0, Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(f64::MAX),]
                .boxed()
        }
    }
}

/// Small values, the edges, and anything.
fn n32() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![4 => 0u32..10, 1 => Just(u32::MAX), 1 => any::<u32>()]
}

fn n64() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![4 => 0u64..1000, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn enum_value(max: i32) -> impl Strategy<Value = i32> + Clone {
    prop_oneof![4 => 0..=max, 1 => any::<i32>()]
}

/// A string from a small pool (so keys collide across states and with the catalog), or an
/// arbitrary one.
fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![6 => prop::sample::select(pool).prop_map(str::to_owned), 1 => "\\PC{0,6}"]
}

const UUIDS: &[&str] = &["GPU-0", "GPU-1", "MIG-0", "MIG-1", "nd-0", ""];
const MODEL_IDS: &[&str] = &["id-a", "id-b", "id-c", "gm", "mm", "nm"];
const SOURCES: &[&str] = &["s3://m/a", "s3://m/a/", "s3://m/b", "s3://m", "file:///x", ""];
const IMAGES: &[&str] = &["img:1", "img:2", "sha256:aa", ""];
const PROFILES: &[&str] = &["1g.10gb", "3g.40gb", "7g.80gb", "cores:2", ""];

fn partition() -> impl Strategy<Value = pb::Partition> {
    (pick(UUIDS), pick(PROFILES), n32(), n32(), n32()).prop_map(|(uuid, profile, gpu_instance_id, placement_start, placement_size)| {
        pb::Partition { uuid, profile, gpu_instance_id, placement_start, placement_size, ..Default::default() }
    })
}

fn accelerator() -> BoxedStrategy<pb::Accelerator> {
    // Mostly an H100, whose MIG table has the test catalog's profile.
    let pci = prop_oneof![4 => Just(0x2330_10DE_u32), 1 => Just(0x20B0_10DE), 1 => Just(0), 1 => any::<u32>()];
    let processes = prop::collection::vec(
        (n32(), n64(), n32()).prop_map(|(pid, used_memory_bytes, gpu_instance_id)| pb::GpuProcess {
            pid,
            used_memory_bytes,
            gpu_instance_id,
        }),
        0..3,
    );
    (
        n32(),
        pick(UUIDS),
        enum_value(2),
        pci,
        n32(),
        enum_value(3),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.3),
        prop::collection::vec(partition(), 0..4),
        processes,
    )
        .prop_map(|(index, uuid, vendor, pci_device_id, core_count, health, mig_enabled, mig_pending, partitions, processes)| {
            pb::Accelerator {
                index,
                uuid,
                vendor,
                pci_device_id,
                core_count,
                health,
                mig_enabled,
                mig_pending,
                partitions,
                processes,
                ..Default::default()
            }
        })
        .boxed()
}

fn model() -> impl Strategy<Value = pb::CachedModel> {
    (pick(MODEL_IDS), pick(SOURCES), prop_oneof![Just("main".to_owned()), Just(String::new())], enum_value(5), n64(), n64(), any::<bool>())
        .prop_map(|(id, source_uri, revision, state, bytes_present, bytes_total, pinned)| pb::CachedModel {
            id,
            source_uri,
            revision,
            state,
            bytes_present,
            bytes_total,
            pinned,
            ..Default::default()
        })
}

fn image() -> impl Strategy<Value = pb::CachedImage> {
    (pick(IMAGES), pick(IMAGES), n64()).prop_map(|(reference, digest, size_bytes)| pb::CachedImage { reference, digest, size_bytes })
}

fn runtime(f: Floats) -> impl Strategy<Value = pb::ServingRuntime> {
    let load = prop::option::of((float(f), float(f), float(f), float(f)).prop_map(|(a, b, c, d)| pb::RuntimeLoad {
        requests_waiting: a,
        requests_running: b,
        kv_cache_usage_ratio: c,
        ttft_p50_seconds: d,
        ..Default::default()
    }));
    (pick(&["r1", "r2", "r3"]), pick(MODEL_IDS), pick(UUIDS), pick(&["ready", "Running", "starting", ""]), load).prop_map(
        |(name, model_id, partition_uuid, state, load)| pb::ServingRuntime {
            name,
            model_id,
            partition_uuid,
            state,
            load,
            ..Default::default()
        },
    )
}

fn bandwidth(f: Floats) -> impl Strategy<Value = pb::SourceBandwidth> {
    (pick(SOURCES), float(f), n64()).prop_map(|(source, bytes_per_second, samples)| pb::SourceBandwidth {
        source,
        bytes_per_second,
        samples,
    })
}

fn resources(f: Floats) -> impl Strategy<Value = pb::NodeResources> {
    let iface = ("[a-z0-9]{1,5}", n64(), n64()).prop_map(|(name, receive_bytes, transmit_bytes)| pb::NetworkInterface {
        name,
        receive_bytes,
        transmit_bytes,
    });
    (float(f), float(f), n64(), n64(), n64(), prop::collection::vec(iface, 0..2)).prop_map(
        |(cpu_usage_ratio, load1, memory_available_bytes, cache_capacity_bytes, cache_free_bytes, interfaces)| pb::NodeResources {
            cpu_usage_ratio,
            load1,
            memory_available_bytes,
            cache_capacity_bytes,
            cache_free_bytes,
            interfaces,
        },
    )
}

fn info() -> impl Strategy<Value = pb::NodeInfo> {
    ("[a-z0-9-]{0,8}", n32(), n64(), prop::collection::hash_map("[a-z]{1,3}", "[a-z]{0,3}", 0..3)).prop_map(
        |(hostname, cpu_count, memory_total_bytes, labels)| pb::NodeInfo {
            hostname,
            cpu_count,
            memory_total_bytes,
            labels,
            ..Default::default()
        },
    )
}

fn partition_status() -> impl Strategy<Value = pb::PartitionStatus> {
    (enum_value(4), "[a-z]{0,4}", "\\PC{0,8}").prop_map(|(phase, spec_name, reason)| pb::PartitionStatus { phase, spec_name, reason })
}

fn subsystem() -> impl Strategy<Value = pb::SubsystemStatus> {
    (pick(&["devices", "cache", "network"]), any::<bool>(), "\\PC{0,8}", 0..5i32)
        .prop_map(|(name, enabled, reason, state)| pb::SubsystemStatus { name, enabled, reason, state })
}

/// A structurally valid report: every field any value the wire allows, keys drawn from
/// small pools so that they repeat (within a list too) and match the test catalog.
pub(crate) fn node_state(f: Floats) -> BoxedStrategy<pb::NodeState> {
    (
        prop::option::of(info()),
        prop::option::of(resources(f)),
        prop::collection::vec(accelerator(), 0..4),
        prop::collection::vec(model(), 0..5),
        prop::collection::vec(image(), 0..3),
        prop::collection::vec(runtime(f), 0..4),
        prop::collection::vec(bandwidth(f), 0..3),
        prop::option::of(partition_status()),
        prop::collection::vec(subsystem(), 0..2),
    )
        .prop_map(|(info, resources, accelerators, models, images, runtimes, source_bandwidth, partition, subsystems)| pb::NodeState {
            info,
            resources,
            accelerators,
            models,
            images,
            runtimes,
            source_bandwidth,
            partition,
            subsystems,
        })
        .boxed()
}

/// A delta with any subset of its parts set, removals naming keys that may or may not exist.
pub(crate) fn delta(f: Floats) -> BoxedStrategy<pb::Delta> {
    let lists = (
        prop::option::of(prop::collection::vec(accelerator(), 0..3).prop_map(|items| pb::AcceleratorList { items })),
        prop::option::of(prop::collection::vec(bandwidth(f), 0..2).prop_map(|items| pb::SourceBandwidthList { items })),
        prop::option::of(prop::collection::vec(subsystem(), 0..2).prop_map(|items| pb::SubsystemList { items })),
        prop::option::of(info()),
        prop::option::of(resources(f)),
        prop::option::of(partition_status()),
    );
    let keyed = (
        prop::collection::vec(model(), 0..3),
        prop::collection::vec(pick(MODEL_IDS), 0..3),
        prop::collection::vec(image(), 0..2),
        prop::collection::vec(pick(IMAGES), 0..2),
        prop::collection::vec(runtime(f), 0..3),
        prop::collection::vec(pick(&["r1", "r2", "r3"]), 0..2),
    );
    (lists, keyed)
        .prop_map(
            |(
                (accelerators, source_bandwidth, subsystems, info, resources, partition),
                (model_upserts, model_removals, image_upserts, image_removals, runtime_upserts, runtime_removals),
            )| pb::Delta {
                epoch: 0,
                seq: 0,
                resources,
                accelerators,
                model_upserts,
                model_removals,
                image_upserts,
                image_removals,
                runtime_upserts,
                runtime_removals,
                source_bandwidth,
                partition,
                subsystems,
                info,
            },
        )
        .boxed()
}

/// Epochs and sequence numbers that mostly follow on from each other, with the edges.
fn counter() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![6 => 0u64..4, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 1)]
}

#[derive(Debug, Clone)]
pub(crate) enum Report {
    Snapshot(pb::Snapshot),
    Delta(pb::Delta),
    Heartbeat(pb::Heartbeat),
}

pub(crate) fn report(f: Floats) -> BoxedStrategy<Report> {
    prop_oneof![
        2 => (counter(), counter(), node_state(f)).prop_map(|(epoch, seq, s)| Report::Snapshot(pb::Snapshot { epoch, seq, state: Some(s) })),
        1 => (counter(), counter()).prop_map(|(epoch, seq)| Report::Snapshot(pb::Snapshot { epoch, seq, state: None })),
        4 => (counter(), counter(), delta(f)).prop_map(|(epoch, seq, d)| Report::Delta(pb::Delta { epoch, seq, ..d })),
        2 => (counter(), counter()).prop_map(|(epoch, seq)| Report::Heartbeat(pb::Heartbeat { epoch, seq, sent_at: None })),
    ]
    .boxed()
}

/// Each keyed list without repeated keys (first one wins), as an agent builds them.
fn unique_keys(mut s: pb::NodeState) -> pb::NodeState {
    fn dedup<T>(v: &mut Vec<T>, key: impl Fn(&T) -> &String) {
        let mut seen = std::collections::HashSet::new();
        v.retain(|x| seen.insert(key(x).clone()));
    }
    dedup(&mut s.models, |m| &m.id);
    dedup(&mut s.images, |i| &i.reference);
    dedup(&mut s.runtimes, |r| &r.name);
    s
}

/// The states an agent reports over time: info, resources and partition status, once
/// known, stay known (a Delta has no way to clear them; `diff` says so).
fn carry_forward(mut states: Vec<pb::NodeState>) -> Vec<pb::NodeState> {
    for i in 1..states.len() {
        let (before, after) = states.split_at_mut(i);
        let (prev, s) = (&before[i - 1], &mut after[0]);
        s.info = s.info.take().or_else(|| prev.info.clone());
        s.resources = s.resources.take().or_else(|| prev.resources.clone());
        s.partition = s.partition.take().or_else(|| prev.partition.clone());
    }
    states
}

/// Keyed lists in key order: `apply_delta` keeps keys, not positions.
fn by_key(mut s: pb::NodeState) -> pb::NodeState {
    s.models.sort_by(|a, b| a.id.cmp(&b.id));
    s.images.sort_by(|a, b| a.reference.cmp(&b.reference));
    s.runtimes.sort_by(|a, b| a.name.cmp(&b.name));
    s
}

fn hello(node: &str) -> AgentHello {
    AgentHello {
        node_name: node.into(),
        boot_id: "b".into(),
        agent_version: "t".into(),
        api_version: hearth_proto::API_VERSION,
        capabilities: vec![],
        heartbeat_interval_ms: 1000,
    }
}

/// A cluster state with one open session for node "n1".
pub(crate) fn one_node() -> (Arc<ClusterState>, SessionId, Instant) {
    let s = Arc::new(ClusterState::new(Duration::from_secs(15), Duration::from_secs(600)));
    let t = Instant::now();
    let (tx, rx) = mpsc::channel(1);
    // Commands are not under test; the receiver must stay open for the session's life.
    std::mem::forget(rx);
    let id = s.open_session(hello("n1"), "peer".into(), tx, t).expect("first session");
    (s, id, t)
}

pub(crate) fn spec(name: &str, source_uri: &str, device: DeviceRequest) -> ModelSpec {
    ModelSpec {
        serve: Default::default(),
        name: name.into(),
        source_uri: source_uri.into(),
        revision: "main".into(),
        bytes: 10 << 30,
        image: "img:1".into(),
        image_bytes: 1 << 30,
        runtime: "vllm".into(),
        device,
        memory_bytes: 1 << 30,
        scaling: ScalingSpec::defaults(),
    }
}

/// One model per kind of device request: whole GPUs ("gm"), MIG ("mm"), Neuron cores ("nm").
pub(crate) fn catalog() -> Catalog {
    Catalog::from_specs([
        spec("gm", "s3://m/a", DeviceRequest::Gpus(1)),
        spec("mm", "s3://m/b", DeviceRequest::Mig("3g.40gb".into())),
        spec("nm", "file:///x", DeviceRequest::NeuronCores(2)),
    ])
}

/// A report of one idle, healthy H100 and plenty of memory: room for one "gm" replica.
pub(crate) fn one_free_gpu() -> pb::Snapshot {
    let state = pb::NodeState {
        accelerators: vec![pb::Accelerator {
            uuid: "GPU-0".into(),
            vendor: pb::AcceleratorVendor::Nvidia as i32,
            pci_device_id: 0x2330_10DE,
            health: pb::HealthState::Healthy as i32,
            ..Default::default()
        }],
        resources: Some(pb::NodeResources { memory_available_bytes: 1 << 40, ..Default::default() }),
        ..Default::default()
    };
    pb::Snapshot { epoch: 1, seq: 1, state: Some(state) }
}

/// The stored state of "n1" as the model of the sequence rules predicts it.
#[derive(Debug, Default)]
struct Expected {
    /// (epoch, seq, state) once a snapshot arrived.
    stored: Option<(u64, u64, pb::NodeState)>,
}

impl Expected {
    fn apply(&mut self, r: &Report) -> Result<(), &'static str> {
        match r {
            Report::Snapshot(s) => {
                self.stored = Some((s.epoch, s.seq, s.state.clone().unwrap_or_default()));
                Ok(())
            }
            Report::Delta(d) => {
                let Some((epoch, seq, state)) = &mut self.stored else { return Err("no snapshot") };
                if d.epoch != *epoch || seq.checked_add(1) != Some(d.seq) {
                    return Err("resync");
                }
                *seq = d.seq;
                convert::apply_delta(state, d.clone());
                Ok(())
            }
            Report::Heartbeat(h) => match &self.stored {
                None => Err("no snapshot"),
                Some((epoch, seq, _)) if h.epoch != *epoch || h.seq > *seq => Err("resync"),
                Some(_) => Ok(()),
            },
        }
    }
}

fn send(s: &ClusterState, id: SessionId, t: Instant, r: &Report) -> Result<(), StateError> {
    match r.clone() {
        Report::Snapshot(x) => s.apply_snapshot("n1", id, x, t),
        Report::Delta(d) => s.apply_delta("n1", id, d, t),
        Report::Heartbeat(h) => s.heartbeat("n1", id, &h, t),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Snapshots replace, in-sequence deltas apply, everything else asks for a resync and
    /// changes nothing; the byte count always matches what is stored.
    #[test]
    fn stored_state_follows_the_sequence_rules(reports in prop::collection::vec(report(Floats::Finite), 1..10)) {
        let (s, id, t) = one_node();
        let mut expected = Expected::default();
        for r in &reports {
            let got = send(&s, id, t, r);
            match (expected.apply(r), &got) {
                (Ok(()), Ok(())) => {}
                (Err("no snapshot"), Err(StateError::NoSnapshot(_))) => {}
                (Err("resync"), Err(StateError::NeedResync(_))) => {}
                (want, got) => prop_assert!(false, "{:?}: expected {:?}, got {:?}", r, want, got),
            }
            let (view, state) = s.get("n1", t).expect("node stays known");
            match &expected.stored {
                None => prop_assert_eq!((view.epoch, view.seq), (0, 0)),
                Some((epoch, seq, want)) => {
                    prop_assert_eq!((view.epoch, view.seq), (*epoch, *seq));
                    prop_assert_eq!(&state, want);
                    prop_assert_eq!(s.state_bytes(), state.encoded_len() as u64);
                }
            }
        }
    }

    /// What the agent sends (a snapshot, then `diff` of each state against the last) rebuilds
    /// its latest state on the controller, keyed lists up to order.
    #[test]
    fn deltas_from_diff_rebuild_the_agents_state(
        states in prop::collection::vec(node_state(Floats::Finite).prop_map(unique_keys), 2..6).prop_map(carry_forward),
    ) {
        let (s, id, t) = one_node();
        s.apply_snapshot("n1", id, pb::Snapshot { epoch: 7, seq: 1, state: Some(states[0].clone()) }, t).expect("snapshot");
        let mut seq = 1;
        for pair in states.windows(2) {
            prop_assert_eq!(convert::diff(&pair[0], &pair[0], 7, seq + 1), None);
            if let Some(d) = convert::diff(&pair[0], &pair[1], 7, seq + 1) {
                seq += 1;
                s.apply_delta("n1", id, d, t).expect("in-sequence delta");
            }
            let (_, stored) = s.get("n1", t).expect("node");
            prop_assert_eq!(by_key(stored), by_key(pair[1].clone()));
        }
    }

    /// Placement (every kind of device request) and scaling read any reported state, NaN
    /// loads, absurd sizes and indices included, without a panic.
    #[test]
    fn placement_and_scaling_read_any_report(reports in prop::collection::vec(report(Floats::Any), 1..6), pending in prop::option::of(0.0..1e3f64)) {
        let (s, id, t) = one_node();
        let placement = Arc::new(Placement::new(s.clone(), Arc::new(catalog()), Params::default()));
        let scaling = Scaling::new(placement.clone(), Settings::default(), &mut prometheus_client::registry::Registry::default());
        let names = ["n1".to_owned(), "ghost".to_owned()];
        for r in &reports {
            let _ = send(&s, id, t, r);
            for m in ["gm", "mm", "nm"] {
                let out = placement.filter(m, Some(&names), t).expect("catalog model");
                prop_assert_eq!(out.feasible.len() + out.rejected.len(), 2);
                match placement.score(m, None, 3, t) {
                    Ok(_) | Err(crate::placement::PlacementError::NoFit { .. }) => {}
                    Err(e) => prop_assert!(false, "score {}: {}", m, e),
                }
                let _ = scaling.recommend(m, pending, t).expect("catalog model");
            }
        }
    }
}

/// Regression: a delta after a snapshot at the last sequence number computed `seq + 1` and
/// overflowed (a panic in debug builds, a wrap to 0 in release).
#[test]
fn delta_after_the_last_sequence_number_asks_for_resync() {
    let (s, id, t) = one_node();
    s.apply_snapshot("n1", id, pb::Snapshot { epoch: 1, seq: u64::MAX, state: None }, t).expect("snapshot");
    let d = pb::Delta { epoch: 1, seq: 0, ..Default::default() };
    assert!(matches!(s.apply_delta("n1", id, d, t), Err(StateError::NeedResync(_))));
}

/// Regression: a Neuron device's per-core table was sized by the reported `core_count`, so
/// one report of u32::MAX cores allocated 4 GiB (and placement copied it on every call); and
/// a bound partition's core range was walked to its reported end, 2^32 steps for a size of
/// u32::MAX (seconds of CPU per report, under the cluster-state write lock).
#[test]
fn absurd_neuron_core_counts_and_ranges_are_bounded() {
    let s = pb::NodeState {
        accelerators: vec![pb::Accelerator {
            vendor: pb::AcceleratorVendor::AwsNeuron as i32,
            core_count: u32::MAX,
            partitions: vec![pb::Partition { uuid: "nd-0".into(), placement_start: 0, placement_size: u32::MAX, ..Default::default() }],
            ..Default::default()
        }],
        runtimes: vec![pb::ServingRuntime { name: "r1".into(), partition_uuid: "nd-0".into(), ..Default::default() }],
        ..Default::default()
    };
    let started = Instant::now();
    let f = crate::placement::facts::NodeFacts::from_state(&s);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let max = crate::placement::facts::MAX_NEURON_CORES;
    assert_eq!((f.neuron[0].cores, f.neuron[0].busy_cores.len()), (max, max as usize));
    assert!(f.neuron[0].busy_cores.iter().all(|b| *b), "the bound partition covers every core");
}

/// A runtime bound to a node-wide Neuron core range (what StartRuntime names for a Neuron
/// slot) holds those cores across devices in index order; a nonsense range holds nothing.
#[test]
fn a_neuron_core_range_marks_cores_busy_across_devices() {
    let dev = |index: u32| pb::Accelerator { index, vendor: pb::AcceleratorVendor::AwsNeuron as i32, core_count: 2, ..Default::default() };
    let rt = |p: &str| pb::ServingRuntime { name: p.into(), partition_uuid: p.into(), ..Default::default() };
    let s = pb::NodeState {
        accelerators: vec![dev(1), dev(0)],
        runtimes: vec![rt("neuroncores:1-2"), rt("neuroncores:9-3"), rt("neuroncores:0-4294967295x")],
        ..Default::default()
    };
    let f = crate::placement::facts::NodeFacts::from_state(&s);
    let by_index = |i: u32| f.neuron.iter().find(|d| d.index == i).unwrap().busy_cores.clone();
    assert_eq!((by_index(0), by_index(1)), (vec![false, true], vec![true, false]));
}

/// Regression: a reported MIG instance at start u32::MAX made placement compute
/// `start + size` and overflow (a panic in debug builds) when looking for room on its GPU.
#[test]
fn mig_instance_reported_at_the_last_unit_does_not_break_placement() {
    let (s, id, t) = one_node();
    let state = pb::NodeState {
        accelerators: vec![pb::Accelerator {
            uuid: "GPU-0".into(),
            pci_device_id: 0x2330_10DE,
            mig_enabled: true,
            partitions: vec![pb::Partition {
                uuid: "GPU-0".into(),
                profile: "1g.10gb".into(),
                placement_start: u32::MAX,
                placement_size: 1,
                ..Default::default()
            }],
            ..Default::default()
        }],
        resources: Some(pb::NodeResources { memory_available_bytes: u64::MAX, ..Default::default() }),
        ..Default::default()
    };
    s.apply_snapshot("n1", id, pb::Snapshot { epoch: 0, seq: 0, state: Some(state) }, t).expect("snapshot");
    let catalog = Catalog::from_specs([spec("mm", "s3://m/b", DeviceRequest::Mig("3g.40gb".into()))]);
    let out = Placement::new(s, Arc::new(catalog), Params::default()).filter("mm", None, t).expect("catalog model");
    assert_eq!(out.feasible.len(), 1, "the GPU's units are all free: {out:?}");
}
