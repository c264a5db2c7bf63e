//! A discrete-event cluster simulator that drives the controller's real placement and
//! scaling code. Simulated agents report their node state into a real `ClusterState`
//! (snapshots, as the stream would carry them); the real `Scaling` engine observes the
//! replicas' load from that view, decides replica counts with its lead time, and sends its
//! pre-warm Prefetch commands down each node's command queue; replicas are placed through
//! the real `Placement` (Filter for the baselines, Reserve for Hearth). What is simulated is
//! what a cluster would do with those decisions: requests arriving and being served,
//! weights downloading over each node's share of source bandwidth, images pulling, runtimes
//! loading from NVMe and starting, caches filling and evicting.
//!
//! The clock is simulated: the controller is handed `Instant`s offset from one base, so a
//! 30-hour run takes as long as the decisions take to compute. Events (a download finishing,
//! an image landing, a runtime becoming ready) fire at their exact times from a queue;
//! request traffic advances in 1 s steps and the scaler runs every `scaling_interval`.

pub mod dist;
pub mod world;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use hearth_controller::catalog::{Catalog, DeviceRequest, ModelSpec, ScalingSpec};
use hearth_controller::placement::{Params, Placement, PlacementError};
use hearth_controller::scaling::{Scaling, Settings};
use hearth_controller::state::{ClusterState, SessionId};
use hearth_proto::convert::AgentHello;
use hearth_proto::v1 as pb;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use dist::Rng;
use world::{GB, Kind, ModelInfo, Node, Runtime};

/// The cluster, the catalog and the workload.
#[derive(Debug, Clone)]
pub struct Config {
    /// 8 x H100 nodes with `mig_gpus_per_node` GPUs in MIG mode.
    pub h100_mig_nodes: usize,
    pub mig_gpus_per_node: u32,
    /// 8 x H100 nodes, MIG off.
    pub h100_nodes: usize,
    pub a100_nodes: usize,
    pub inf2_nodes: usize,
    pub trn1_nodes: usize,
    pub models: usize,
    pub model_bytes: (f64, f64),
    /// Share of models served on Neuron.
    pub neuron_share: f64,
    pub zipf_s: f64,
    /// Mean demand as a share of each device class's capacity (whole GPUs, MIG slices,
    /// Neuron cores), at the daily mean.
    pub load: f64,
    /// Daily cycle: rate x (1 - amplitude x cos(2 pi (t - trough) / 24 h)).
    pub daily_amplitude: f64,
    /// Mean time between bursts of one model, their length range and rate multiplier range.
    pub burst_every: f64,
    pub burst_len: (f64, f64),
    pub burst_mult: (f64, f64),
    /// Mean request service time (seconds) and concurrent requests one replica serves.
    pub service_time: f64,
    /// Mean time a queued request waits before its client gives up (exponential).
    pub patience: f64,
    pub slots_per_replica: f64,
    /// Models ranked above this keep at least one replica; the rest scale to zero.
    pub min_one_top: usize,
    pub s3_median: f64,
    pub s3_sigma: f64,
    pub nvme: (f64, f64),
    pub gpu_cache: f64,
    pub neuron_cache: f64,
    pub warmup: f64,
    pub measure: f64,
    pub scaling_interval: f64,
    /// MIG instances idle this long are destroyed (an operator's partition reconcile).
    pub mig_idle_gc: f64,
}

impl Default for Config {
    /// The cluster: 1,000 nodes (600 x 8 H100, a third of them with half their GPUs
    /// in MIG mode; 300 x 8 A100; 100 inf2/trn1), 200 models of 2-700 GB, 24 hours measured
    /// after 6 hours of warm-up.
    fn default() -> Self {
        Self {
            h100_mig_nodes: 200,
            mig_gpus_per_node: 4,
            h100_nodes: 400,
            a100_nodes: 300,
            inf2_nodes: 50,
            trn1_nodes: 50,
            models: 200,
            model_bytes: (2.0 * GB, 700.0 * GB),
            neuron_share: 0.1,
            zipf_s: 1.0,
            // At the daily peak (1.6 x the mean) and with bursts on top, 0.3 on average keeps
            // the cluster short of saturation most of the day, where placement decides cold
            // starts rather than a queue of requests no strategy can serve.
            load: 0.3,
            daily_amplitude: 0.6,
            burst_every: 12.0 * 3600.0,
            burst_len: (300.0, 1800.0),
            burst_mult: (2.0, 5.0),
            service_time: 4.0,
            patience: 120.0,
            slots_per_replica: 16.0,
            min_one_top: 40,
            s3_median: 1.0 * GB,
            // p10 = median x exp(-1.2816 sigma) = 0.3 GB/s
            s3_sigma: 0.94,
            nvme: (4.0 * GB, 7.0 * GB),
            gpu_cache: 4000.0 * GB,
            neuron_cache: 2000.0 * GB,
            warmup: 6.0 * 3600.0,
            measure: 24.0 * 3600.0,
            scaling_interval: 10.0,
            mig_idle_gc: 600.0,
        }
    }
}

impl Config {
    /// A cluster small enough for a test in a debug build, with the full one's proportions
    /// (more weights in the catalog than one node's cache holds).
    pub fn small() -> Self {
        Self {
            h100_mig_nodes: 8,
            h100_nodes: 16,
            a100_nodes: 12,
            inf2_nodes: 2,
            trn1_nodes: 2,
            models: 60,
            min_one_top: 12,
            // Lighter than the full cluster: with 40 nodes, the baselines' spreading leaves no
            // node free for an 8-GPU model sooner.
            load: 0.25,
            gpu_cache: 2000.0 * GB,
            neuron_cache: 1000.0 * GB,
            warmup: 2.0 * 3600.0,
            measure: 4.0 * 3600.0,
            burst_every: 4.0 * 3600.0,
            ..Self::default()
        }
    }

    pub fn nodes(&self) -> usize {
        self.h100_mig_nodes + self.h100_nodes + self.a100_nodes + self.inf2_nodes + self.trn1_nodes
    }
}

/// How a new replica's node is chosen. The autoscaler is the same for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// kube-scheduler-like: the feasible node with the least allocated accelerators.
    LeastLoaded,
    /// Feasible nodes that have every byte of the model first (least loaded among them),
    /// else least loaded.
    CacheAffinity,
    /// Hearth's Reserve: lowest predicted time-to-ready plus load and fragmentation.
    PredictedReady,
    /// The same, with the scaler's pre-warm Prefetch commands carried out by the agents.
    PredictedReadyPrewarm,
}

impl Strategy {
    pub const ALL: [Strategy; 4] =
        [Strategy::LeastLoaded, Strategy::CacheAffinity, Strategy::PredictedReady, Strategy::PredictedReadyPrewarm];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::LeastLoaded => "least-loaded",
            Strategy::CacheAffinity => "cache affinity (binary)",
            Strategy::PredictedReady => "hearth predicted-ready",
            Strategy::PredictedReadyPrewarm => "hearth + pre-warm",
        }
    }
}

/// What one run measured (after warm-up).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Seconds from the scale-up decision to the replica serving, per replica.
    pub cold_starts: Vec<f64>,
    /// |predicted - actual| / actual for each cold start, from the chosen node's score.
    pub prediction_errors: Vec<f64>,
    /// The part of each cold start no placement can avoid: reading the weights from local
    /// NVMe and starting the runtime (what it would take on a node with everything cached).
    pub floors: Vec<f64>,
    pub bytes_needed: f64,
    pub bytes_hit: f64,
    pub s3_bytes: f64,
    pub prefetch_bytes: f64,
    pub gpu_seconds_serving: f64,
    pub gpu_seconds_starting: f64,
    /// Slice-seconds of stranded MIG capacity (see `Node::stranded_mig_slices`).
    pub stranded_slice_seconds: f64,
    pub mig_slice_capacity: f64,
    pub arrivals: f64,
    /// Request-seconds spent queued with no free replica slot.
    pub wait_request_seconds: f64,
    /// Requests whose client gave up waiting.
    pub abandoned: f64,
    pub placement_failures: u64,
    /// Placements refused because pinned weights left no room in the node's cache.
    pub cache_full: u64,
    pub prewarm_issued: u64,
    pub prewarm_in_time: u64,
    pub prewarm_late: u64,
    pub measured_seconds: f64,
    pub wall: Duration,
}

impl Report {
    /// Pools another run's measurements into this one (seeds of one strategy).
    pub fn merge(&mut self, r: Report) {
        self.cold_starts.extend(r.cold_starts);
        self.prediction_errors.extend(r.prediction_errors);
        self.floors.extend(r.floors);
        self.bytes_needed += r.bytes_needed;
        self.bytes_hit += r.bytes_hit;
        self.s3_bytes += r.s3_bytes;
        self.prefetch_bytes += r.prefetch_bytes;
        self.gpu_seconds_serving += r.gpu_seconds_serving;
        self.gpu_seconds_starting += r.gpu_seconds_starting;
        self.stranded_slice_seconds += r.stranded_slice_seconds;
        self.mig_slice_capacity = r.mig_slice_capacity;
        self.arrivals += r.arrivals;
        self.wait_request_seconds += r.wait_request_seconds;
        self.abandoned += r.abandoned;
        self.placement_failures += r.placement_failures;
        self.cache_full += r.cache_full;
        self.prewarm_issued += r.prewarm_issued;
        self.prewarm_in_time += r.prewarm_in_time;
        self.prewarm_late += r.prewarm_late;
        self.measured_seconds += r.measured_seconds;
        self.wall += r.wall;
    }

    pub fn cold_start(&self, p: f64) -> f64 {
        dist::quantile(&mut self.cold_starts.clone(), p)
    }

    /// Quantile of the avoidable part of cold starts (total minus the NVMe-load-and-start floor).
    pub fn avoidable(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.cold_starts.iter().zip(&self.floors).map(|(c, f)| (c - f).max(0.0)).collect();
        dist::quantile(&mut v, p)
    }

    pub fn byte_hit_ratio(&self) -> f64 {
        if self.bytes_needed > 0.0 { self.bytes_hit / self.bytes_needed } else { f64::NAN }
    }

    pub fn stranded_slices(&self) -> f64 {
        self.stranded_slice_seconds / self.measured_seconds.max(1.0)
    }

    pub fn mean_wait(&self) -> f64 {
        if self.arrivals > 0.0 { self.wait_request_seconds / self.arrivals } else { 0.0 }
    }
}

/// One model of the generated catalog with its traffic.
#[derive(Debug, Clone)]
struct Traffic {
    /// Requests/s at the daily mean.
    base: f64,
    phase: f64,
    /// (start, end, multiplier), sorted.
    bursts: Vec<(f64, f64, f64)>,
    next_burst: usize,
    waiting: f64,
    running: f64,
    replicas: Vec<u64>,
    last_desired: u32,
}

#[derive(Debug)]
struct Replica {
    model: usize,
    node: usize,
    placed_at: f64,
    image_at: f64,
    weights: bool,
    ready: bool,
    predicted: f64,
    floor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ev {
    Downloads { node: usize, generation: u64 },
    Check { replica: u64 },
    Ready { replica: u64 },
}

#[derive(Debug, PartialEq)]
struct Timed(f64, u64, Ev);
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

const DAY: f64 = 86_400.0;

/// The catalog for a seed: identical for every strategy run with that seed.
fn catalog(cfg: &Config, rng: &mut Rng) -> (Vec<ModelSpec>, Vec<ModelInfo>, Vec<Traffic>) {
    let popularity = dist::zipf(cfg.models, cfg.zipf_s);
    let mut ranks: Vec<usize> = (0..cfg.models).collect();
    rng.shuffle(&mut ranks);
    let (lo, hi) = cfg.model_bytes;
    let images =
        [("vllm/vllm-openai:v0.11", 9.0), ("lmsysorg/sglang:v0.5", 8.0), ("huggingface/tgi:3.3", 7.0), ("nvcr.io/triton:25.10", 12.0)];
    let mut specs = Vec::new();
    let mut infos = Vec::new();
    let mut units = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        let bytes = (lo.ln() + rng.f64() * (hi.ln() - lo.ln())).exp().round();
        let gbs = bytes / GB;
        let neuron = rng.f64() < cfg.neuron_share && gbs <= 190.0;
        let (device, class, u) = if neuron {
            let cores = ((gbs / 12.0).ceil() as u32).next_power_of_two().clamp(1, 16);
            (DeviceRequest::NeuronCores(cores), 2, f64::from(cores))
        } else if gbs <= 40.0 && rng.f64() < 0.5 {
            let (p, s) = if gbs <= 10.0 {
                ("1g.10gb", 1.0)
            } else if gbs <= 20.0 {
                ("2g.20gb", 2.0)
            } else {
                ("3g.40gb", 3.0)
            };
            (DeviceRequest::Mig(p.into()), 1, s)
        } else {
            let g = if gbs <= 70.0 {
                1
            } else if gbs <= 140.0 {
                2
            } else if gbs <= 280.0 {
                4
            } else {
                8
            };
            (DeviceRequest::Gpus(g), 0, f64::from(g))
        };
        let (image, image_gb) = if neuron { ("public.ecr.aws/neuron/vllm:0.9", 10.0) } else { images[rng.usize(4).min(3)] };
        let name = format!("m{i:03}");
        let uri = format!("s3://models/{name}");
        specs.push(ModelSpec {
            serve: Default::default(),
            name: name.clone(),
            source_uri: uri.clone(),
            revision: world::REVISION.into(),
            bytes: bytes as u64,
            image: image.into(),
            image_bytes: (image_gb * GB) as u64,
            runtime: "vllm".into(),
            device,
            memory_bytes: 0,
            scaling: ScalingSpec {
                min_replicas: u32::from(rank < cfg.min_one_top),
                // No cap short of the cluster: the most popular model takes about 17% of all
                // requests (Zipf, s = 1, 200 models).
                max_replicas: 2000,
                target_concurrency: 8.0,
                stable_window: Duration::from_secs_f64((6.0 * cfg.scaling_interval).max(60.0)),
                panic_window: Duration::from_secs_f64(cfg.scaling_interval.max(6.0)),
                scale_down_delay: Duration::from_secs(300),
                scale_to_zero_after: Duration::from_secs(900),
                ..ScalingSpec::defaults()
            },
        });
        infos.push(ModelInfo { name, uri, bytes, image: image.into(), image_bytes: image_gb * GB });
        units.push((class, popularity[rank], u));
    }
    // Rates: per class, scaled so that mean demand is `load` of that class's capacity.
    let capacity = [
        (cfg.h100_mig_nodes as f64 * f64::from(8 - cfg.mig_gpus_per_node)) + 8.0 * (cfg.h100_nodes + cfg.a100_nodes) as f64,
        7.0 * f64::from(cfg.mig_gpus_per_node) * cfg.h100_mig_nodes as f64,
        24.0 * cfg.inf2_nodes as f64 + 32.0 * cfg.trn1_nodes as f64,
    ];
    let total = cfg.warmup + cfg.measure;
    let traffic = units
        .iter()
        .map(|&(class, p, _)| {
            let demand: f64 = units.iter().filter(|x| x.0 == class).map(|x| x.1 * x.2).sum();
            // replicas = rate x service / target; units = replicas x u
            let k = cfg.load * capacity[class] * 8.0 / (cfg.service_time * demand.max(f64::MIN_POSITIVE));
            let mut bursts = Vec::new();
            let mut t = rng.exp(cfg.burst_every);
            while t < total {
                let len = rng.range(cfg.burst_len.0, cfg.burst_len.1);
                bursts.push((t, t + len, rng.range(cfg.burst_mult.0, cfg.burst_mult.1)));
                t += len + rng.exp(cfg.burst_every);
            }
            Traffic {
                base: p * k,
                phase: rng.range(-3600.0, 3600.0),
                bursts,
                next_burst: 0,
                waiting: 0.0,
                running: 0.0,
                replicas: vec![],
                last_desired: 0,
            }
        })
        .collect();
    (specs, infos, traffic)
}

struct Sim<'a> {
    cfg: &'a Config,
    strategy: Strategy,
    t0: Instant,
    state: Arc<ClusterState>,
    placement: Arc<Placement>,
    scaling: Scaling,
    registry: Registry,
    nodes: Vec<Node>,
    sessions: Vec<(SessionId, mpsc::Receiver<pb::Command>)>,
    by_uri: HashMap<String, usize>,
    models: Vec<ModelInfo>,
    traffic: Vec<Traffic>,
    replicas: HashMap<u64, Replica>,
    next_replica: u64,
    events: BinaryHeap<Reverse<Timed>>,
    seq: u64,
    dirty: Vec<bool>,
    rng: Rng,
    report: Report,
    now: f64,
}

impl Sim<'_> {
    fn at(&self, t: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(t)
    }

    fn measuring(&self) -> bool {
        self.now >= self.cfg.warmup
    }

    fn push(&mut self, t: f64, e: Ev) {
        self.seq += 1;
        self.events.push(Reverse(Timed(t, self.seq, e)));
    }

    /// Sends node `i`'s state to the controller, as its agent's next report would.
    fn flush(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        n.seq += 1;
        let snap = pb::Snapshot { epoch: 1, seq: n.seq, state: Some(n.report(&self.models)) };
        self.state
            .apply_snapshot(&n.name, self.sessions[i].0, snap, self.t0 + Duration::from_secs_f64(self.now))
            .map_err(|e| anyhow!("{e}"))?;
        self.dirty[i] = false;
        Ok(())
    }

    fn flush_dirty(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.dirty[i] {
                self.flush(i)?;
            }
        }
        Ok(())
    }

    /// Advances node `i`'s downloads to now, settles what finished, and schedules the next
    /// completion.
    fn sync_downloads(&mut self, i: usize) {
        let now = self.now;
        let (moved, done) = self.nodes[i].advance(now);
        if self.measuring() {
            self.report.s3_bytes += moved;
        }
        if moved > 0.0 {
            self.dirty[i] = true;
        }
        if !done.is_empty() {
            // The agent's bandwidth EWMA: within 10% of what the node really gets.
            let sample = self.nodes[i].s3_bps * self.rng.range(0.9, 1.1);
            let n = &mut self.nodes[i];
            n.measured_bps = Some(n.measured_bps.map_or(sample, |b| 0.7 * b + 0.3 * sample));
            let waiting: Vec<u64> = n.runtimes.iter().filter(|r| !r.ready && done.contains(&r.model)).map(|r| r.id).collect();
            for id in waiting {
                if let Some(r) = self.replicas.get_mut(&id) {
                    r.weights = true;
                }
                self.check(id);
            }
        }
        if let Some(t) = self.nodes[i].next_completion() {
            let generation = self.nodes[i].downloads_gen;
            self.push(t.max(now), Ev::Downloads { node: i, generation });
        }
    }

    /// A starting replica with weights and image in place loads from NVMe and starts.
    fn check(&mut self, id: u64) {
        let Some(r) = self.replicas.get(&id) else { return };
        if !r.weights || r.ready {
            return;
        }
        if r.image_at > self.now {
            let t = r.image_at;
            self.push(t, Ev::Check { replica: id });
            return;
        }
        let (node, model) = (r.node, r.model);
        let load = self.models[model].bytes / self.nodes[node].nvme_bps;
        let start = 20.0 * self.rng.range(0.75, 1.5);
        if let Some(r) = self.replicas.get_mut(&id) {
            r.floor = load + start;
        }
        let t = self.now + load + start;
        self.push(t, Ev::Ready { replica: id });
    }

    fn handle(&mut self, e: Ev) {
        match e {
            Ev::Downloads { node, generation } => {
                if self.nodes[node].downloads_gen == generation {
                    self.sync_downloads(node);
                }
            }
            Ev::Check { replica } => self.check(replica),
            Ev::Ready { replica } => {
                let Some(r) = self.replicas.get_mut(&replica) else { return };
                if r.ready {
                    return;
                }
                r.ready = true;
                let (node, placed_at, predicted, floor) = (r.node, r.placed_at, r.predicted, r.floor);
                if let Some(rt) = self.nodes[node].runtimes.iter_mut().find(|x| x.id == replica) {
                    rt.ready = true;
                }
                self.dirty[node] = true;
                if placed_at >= self.cfg.warmup {
                    let actual = self.now - placed_at;
                    self.report.cold_starts.push(actual);
                    self.report.floors.push(floor);
                    self.report.prediction_errors.push((predicted - actual).abs() / actual.max(1.0));
                }
            }
        }
    }

    /// Where the strategy puts the next replica of model `m`, through the real Placement.
    fn choose(&mut self, m: usize, id: &str, now: Instant) -> Result<hearth_controller::placement::Lease, PlacementError> {
        let name = self.models[m].name.clone();
        if matches!(self.strategy, Strategy::PredictedReady | Strategy::PredictedReadyPrewarm) {
            return self.placement.reserve(id, &name, None, None, now);
        }
        let out = self.placement.filter(&name, None, now)?;
        let affinity = self.strategy == Strategy::CacheAffinity && out.feasible.iter().any(|s| s.parts.missing_bytes == 0);
        // Least allocated first, ties broken at random, as kube-scheduler's scoring does.
        let candidates: Vec<(usize, f64)> = out
            .feasible
            .iter()
            .filter(|s| !affinity || s.parts.missing_bytes == 0)
            .map(|s| {
                let i = self.node_index(&s.node);
                (i, self.nodes[i].allocated())
            })
            .collect();
        let least = candidates.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
        let ties: Vec<usize> = candidates.iter().filter(|c| c.1 <= least + 1e-9).map(|c| c.0).collect();
        match ties.get(self.rng.usize(ties.len().max(1))) {
            Some(&i) => {
                let node = self.nodes[i].name.clone();
                self.placement.reserve(id, &name, Some(&node), None, now)
            }
            None => self.placement.reserve(id, &name, None, None, now),
        }
    }

    fn node_index(&self, name: &str) -> usize {
        // Names are node-00000.. in index order.
        name.strip_prefix("node-").and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// Places one replica of `m`; false when no node can take it now.
    fn scale_up(&mut self, m: usize) -> Result<bool> {
        let id = self.next_replica;
        self.next_replica += 1;
        let now = self.at(self.now);
        let request = format!("r{id}");
        let lease = match self.choose(m, &request, now) {
            Ok(l) => l,
            Err(PlacementError::NoFit { .. }) => {
                if self.measuring() {
                    self.report.placement_failures += 1;
                }
                return Ok(false);
            }
            Err(e) => return Err(anyhow!("placement: {e}")),
        };
        let i = self.node_index(&lease.node);
        // Moving downloads to now before the set changes keeps every share exact.
        self.sync_downloads(i);
        let info = self.models[m].clone();
        let Some(present) = self.nodes[i].want(m, &info, self.now, true) else {
            // Replicas' pinned weights fill the node's cache: the runtime cannot start here.
            if self.measuring() {
                self.report.cache_full += 1;
            }
            self.placement.release(&request, now);
            return Ok(false);
        };
        let uuid = self.nodes[i].occupy(id, &lease.slot, self.now).map_err(|e| anyhow!("{}: {e} (slot {})", lease.node, lease.slot))?;
        let node = &mut self.nodes[i];
        let image_at = if node.images.contains(&info.image) {
            self.now
        } else {
            node.images.push(info.image.clone());
            self.now + info.image_bytes / node.registry_bps
        };
        node.runtimes.push(Runtime { id, model: m, partition_uuid: uuid, ready: false, running: 0.0, waiting: 0.0 });
        let weights = present >= info.bytes;
        if self.measuring() {
            self.report.bytes_needed += info.bytes;
            self.report.bytes_hit += present;
        }
        self.replicas.insert(
            id,
            Replica {
                model: m,
                node: i,
                placed_at: self.now,
                image_at,
                weights,
                ready: false,
                predicted: lease.parts.time_to_ready(),
                floor: 0.0,
            },
        );
        self.traffic[m].replicas.push(id);
        self.sync_downloads(i);
        self.check(id);
        // The agent reports the runtime and its devices; the lease has done its job.
        self.flush(i)?;
        self.placement.release(&request, now);
        Ok(true)
    }

    /// Stops the newest replica of `m` (one still starting first).
    fn scale_down(&mut self, m: usize) {
        let reps = &self.traffic[m].replicas;
        let pick = reps.iter().rposition(|id| self.replicas.get(id).is_some_and(|r| !r.ready)).or(reps.len().checked_sub(1));
        let Some(k) = pick else { return };
        let id = self.traffic[m].replicas.remove(k);
        let Some(r) = self.replicas.remove(&id) else { return };
        let n = &mut self.nodes[r.node];
        n.vacate(id, self.now);
        n.runtimes.retain(|x| x.id != id);
        n.unpin(m, self.now);
        self.dirty[r.node] = true;
    }

    /// One second of traffic for every model.
    fn traffic_step(&mut self) {
        let t = self.now;
        let done_p = 1.0 - (-1.0 / self.cfg.service_time).exp();
        let give_up_p = 1.0 - (-1.0 / self.cfg.patience).exp();
        let measuring = self.measuring();
        for m in 0..self.traffic.len() {
            let ready = self.traffic[m].replicas.iter().filter(|id| self.replicas.get(id).is_some_and(|r| r.ready)).count() as f64;
            let cfg = self.cfg;
            let tr = &mut self.traffic[m];
            while tr.next_burst < tr.bursts.len() && tr.bursts[tr.next_burst].1 <= t {
                tr.next_burst += 1;
            }
            let burst = tr.bursts.get(tr.next_burst).filter(|b| b.0 <= t).map_or(1.0, |b| b.2);
            let daily = 1.0 - cfg.daily_amplitude * (std::f64::consts::TAU * (t + tr.phase - 4.0 * 3600.0) / DAY).cos();
            let arrivals = self.rng.poisson(tr.base * daily * burst) as f64;
            let slots = ready * cfg.slots_per_replica;
            let finished = self.rng.round(tr.running * done_p) as f64;
            tr.running = (tr.running - finished).max(0.0);
            tr.waiting += arrivals;
            if tr.running > slots {
                tr.waiting += tr.running - slots;
                tr.running = slots;
            }
            let admit = (slots - tr.running).min(tr.waiting).max(0.0);
            tr.running += admit;
            tr.waiting -= admit;
            let gave_up = self.rng.round(tr.waiting * give_up_p) as f64;
            tr.waiting = (tr.waiting - gave_up).max(0.0);
            if measuring {
                self.report.arrivals += arrivals;
                self.report.wait_request_seconds += tr.waiting;
                self.report.abandoned += gave_up;
            }
        }
    }

    /// The controller's scaling pass and what the cluster does with it.
    fn scaling_tick(&mut self) -> Result<()> {
        let now = self.at(self.now);
        // Agents report load and download progress.
        for m in 0..self.traffic.len() {
            let ready: Vec<u64> =
                self.traffic[m].replicas.iter().copied().filter(|id| self.replicas.get(id).is_some_and(|r| r.ready)).collect();
            if ready.is_empty() {
                continue;
            }
            let (run, wait) = (self.traffic[m].running / ready.len() as f64, self.traffic[m].waiting / ready.len() as f64);
            for id in ready {
                let node = self.replicas[&id].node;
                if let Some(rt) = self.nodes[node].runtimes.iter_mut().find(|x| x.id == id) {
                    rt.running = run;
                    rt.waiting = wait;
                }
                self.dirty[node] = true;
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].downloads.is_empty() {
                self.sync_downloads(i);
            }
        }
        self.flush_dirty()?;
        for m in 0..self.traffic.len() {
            let tr = &self.traffic[m];
            let ready = tr.replicas.iter().filter(|id| self.replicas.get(id).is_some_and(|r| r.ready)).count();
            let idle = tr.replicas.is_empty() && tr.waiting < 0.5 && tr.running < 0.5 && tr.last_desired == 0;
            if idle && self.now > 0.0 {
                continue;
            }
            let name = self.models[m].name.clone();
            let rec = if ready == 0 {
                // Requests held at the gateway while no replica serves reach the scaler as
                // Recommend's pending count, as an activator would send them.
                self.scaling.recommend(&name, Some(tr.waiting), now).map_err(|e| anyhow!("{e}"))?.0
            } else {
                self.scaling.evaluate(&name, now);
                self.scaling.recommend(&name, None, now).map_err(|e| anyhow!("{e}"))?.0
            };
            self.traffic[m].last_desired = rec.desired;
            let want = rec.desired as usize;
            while self.traffic[m].replicas.len() > want {
                self.scale_down(m);
            }
            while self.traffic[m].replicas.len() < want {
                if !self.scale_up(m)? {
                    break;
                }
            }
        }
        // Pre-warm commands: carried out only by the strategy that uses them.
        for i in 0..self.nodes.len() {
            while let Ok(cmd) = self.sessions[i].1.try_recv() {
                let Some(pb::command::Kind::Prefetch(p)) = cmd.kind else { continue };
                if self.strategy != Strategy::PredictedReadyPrewarm {
                    continue;
                }
                let Some(&m) = self.by_uri.get(&p.source_uri) else { continue };
                let info = self.models[m].clone();
                if self.nodes[i].cache.contains_key(&m) {
                    continue;
                }
                self.sync_downloads(i);
                if self.nodes[i].want(m, &info, self.now, false).is_some() {
                    if self.measuring() {
                        self.report.prefetch_bytes += info.bytes;
                    }
                    self.sync_downloads(i);
                    self.dirty[i] = true;
                }
            }
        }
        let gc = self.cfg.mig_idle_gc;
        for i in 0..self.nodes.len() {
            if self.nodes[i].collect_idle_instances(self.now, gc) {
                self.dirty[i] = true;
            }
        }
        self.flush_dirty()?;
        if self.measuring() {
            let dt = self.cfg.scaling_interval;
            for n in &self.nodes {
                let (serving, starting) = n.gpus_held();
                self.report.gpu_seconds_serving += serving * dt;
                self.report.gpu_seconds_starting += starting * dt;
                self.report.stranded_slice_seconds += f64::from(n.stranded_mig_slices()) * dt;
            }
        }
        Ok(())
    }
}

/// Runs the whole simulation for one strategy and seed.
pub fn run(cfg: &Config, strategy: Strategy, seed: u64) -> Result<Report> {
    let wall = Instant::now();
    let mut root = Rng::new(seed);
    let mut world_rng = root.fork(1);
    let traffic_rng = root.fork(2);
    let (specs, models, traffic) = catalog(cfg, &mut world_rng);
    let mut nodes = Vec::with_capacity(cfg.nodes());
    let kinds = [
        (Kind::H100, cfg.h100_mig_nodes, cfg.mig_gpus_per_node),
        (Kind::H100, cfg.h100_nodes, 0),
        (Kind::A100, cfg.a100_nodes, 0),
        (Kind::Inf2, cfg.inf2_nodes, 0),
        (Kind::Trn1, cfg.trn1_nodes, 0),
    ];
    for (kind, count, mig) in kinds {
        for _ in 0..count {
            let (s3, nvme) = world::draw_bandwidths(&mut world_rng, cfg.s3_median, cfg.s3_sigma, cfg.nvme);
            let cache = if kind.gpus() > 0 { cfg.gpu_cache } else { cfg.neuron_cache };
            nodes.push(Node::new(format!("node-{:05}", nodes.len()), kind, mig, s3, nvme, cache));
        }
    }
    let t0 = Instant::now();
    let forever = Duration::from_secs(3650 * 86_400);
    let state = Arc::new(ClusterState::new(forever, forever));
    let placement = Arc::new(Placement::new(state.clone(), Arc::new(Catalog::from_specs(specs)), Params::default()));
    let settings = Settings {
        interval: Duration::from_secs_f64(cfg.scaling_interval),
        external_demand_ttl: Duration::from_secs_f64(2.0 * cfg.scaling_interval),
        ..Settings::default()
    };
    let mut registry = Registry::default();
    let scaling = Scaling::new(placement.clone(), settings, &mut registry);
    let mut sessions = Vec::with_capacity(nodes.len());
    for n in &nodes {
        let (tx, rx) = mpsc::channel(64);
        let hello = AgentHello {
            node_name: n.name.clone(),
            boot_id: "sim".into(),
            agent_version: "sim".into(),
            api_version: hearth_proto::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 5000,
        };
        sessions.push((state.open_session(hello, "sim".into(), tx, t0).map_err(|e| anyhow!("{e}"))?, rx));
    }
    let by_uri = models.iter().enumerate().map(|(i, m)| (m.uri.clone(), i)).collect();
    let mig_slice_capacity = 7.0 * f64::from(cfg.mig_gpus_per_node) * cfg.h100_mig_nodes as f64;
    let n = nodes.len();
    let mut sim = Sim {
        cfg,
        strategy,
        t0,
        state,
        placement,
        scaling,
        registry,
        nodes,
        sessions,
        by_uri,
        models,
        traffic,
        replicas: HashMap::new(),
        next_replica: 1,
        events: BinaryHeap::new(),
        seq: 0,
        dirty: vec![true; n],
        rng: traffic_rng,
        report: Report { mig_slice_capacity, measured_seconds: cfg.measure, ..Report::default() },
        now: 0.0,
    };
    sim.flush_dirty()?;
    let end = cfg.warmup + cfg.measure;
    let tick = cfg.scaling_interval.max(1.0).round() as u64;
    let mut second = 0u64;
    while (second as f64) < end {
        let t = second as f64;
        while let Some(Reverse(Timed(at, _, _))) = sim.events.peek() {
            if *at > t {
                break;
            }
            let Some(Reverse(Timed(at, _, e))) = sim.events.pop() else { break };
            sim.now = at;
            sim.handle(e);
        }
        sim.now = t;
        sim.traffic_step();
        if second.is_multiple_of(tick) {
            sim.scaling_tick()?;
        } else {
            sim.flush_dirty()?;
        }
        second += 1;
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &sim.registry)?;
    let outcome =
        |o: &str| crate::metric_value(&text, &format!("hearth_controller_prewarm_total{{outcome=\"{o}\"}}")).unwrap_or(0.0) as u64;
    sim.report.prewarm_issued = outcome("issued");
    sim.report.prewarm_in_time = outcome("arrived_in_time");
    sim.report.prewarm_late = outcome("late");
    sim.report.wall = wall.elapsed();
    Ok(sim.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cluster_replays_by_seed_and_hearth_reuses_what_nodes_have() -> Result<()> {
        let cfg = Config::small();
        let ll = run(&cfg, Strategy::LeastLoaded, 1)?;
        let again = run(&cfg, Strategy::LeastLoaded, 1)?;
        assert_eq!((&ll.cold_starts, ll.s3_bytes), (&again.cold_starts, again.s3_bytes), "a seed replays exactly");
        assert!(ll.cold_starts.len() > 100 && ll.arrivals > 0.0, "{} cold starts", ll.cold_starts.len());
        let h = run(&cfg, Strategy::PredictedReady, 1)?;
        // Placement by predicted time-to-ready finds the bytes the cluster already holds...
        assert!(h.byte_hit_ratio() > ll.byte_hit_ratio() + 0.1, "hit ratio {} vs {}", h.byte_hit_ratio(), ll.byte_hit_ratio());
        // ...the slow tail goes...
        assert!(h.cold_start(0.99) < ll.cold_start(0.99), "p99 {} vs {}", h.cold_start(0.99), ll.cold_start(0.99));
        // ...and best-fit packing leaves whole nodes for the 8-GPU models, so fewer requests
        // wait for a replica that cannot be placed, or give up.
        assert!(h.placement_failures < ll.placement_failures, "no fit {} vs {}", h.placement_failures, ll.placement_failures);
        assert!(h.mean_wait() < 0.5 * ll.mean_wait(), "mean wait {} vs {}", h.mean_wait(), ll.mean_wait());
        assert!(h.abandoned < ll.abandoned, "abandoned {} vs {}", h.abandoned, ll.abandoned);
        let p = run(&cfg, Strategy::PredictedReadyPrewarm, 1)?;
        assert!(p.prewarm_in_time > 0 && p.prefetch_bytes > 0.0, "pre-warm: {} in time, {} bytes", p.prewarm_in_time, p.prefetch_bytes);
        Ok(())
    }
}
