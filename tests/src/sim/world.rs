//! The simulated nodes: what an agent would report about each (accelerators, MIG instances,
//! Neuron core groups, cached weights, images, runtimes and their load, measured bandwidth),
//! and the physics behind it: downloads that share a node's source bandwidth, an LRU cache
//! with a capacity, runtimes that hold devices. The controller only ever sees `report()`.

use std::collections::BTreeMap;

use hearth_controller::placement::Slot;
use hearth_proto::v1 as pb;

use super::dist::Rng;

pub const GB: f64 = 1e9;

/// The node products the cluster mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 8 x H100 80GB; `mig_gpus` of them in MIG mode.
    H100,
    /// 8 x A100 80GB, MIG off.
    A100,
    /// inf2.48xlarge: 12 Inferentia2 devices x 2 NeuronCores.
    Inf2,
    /// trn1.32xlarge: 16 Trainium devices x 2 NeuronCores.
    Trn1,
}

impl Kind {
    pub fn gpus(self) -> u32 {
        match self {
            Kind::H100 | Kind::A100 => 8,
            Kind::Inf2 | Kind::Trn1 => 0,
        }
    }

    pub fn neuron_devices(self) -> u32 {
        match self {
            Kind::Inf2 => 12,
            Kind::Trn1 => 16,
            _ => 0,
        }
    }

    /// GPU `index` of this kind, idle, as its agent reports it.
    fn gpu(self, index: u32) -> pb::Accelerator {
        match self {
            Kind::H100 => pb::Accelerator::h100(index),
            _ => pb::Accelerator::a100(index),
        }
    }
}

pub const NEURON_CORES_PER_DEVICE: u32 = 2;

#[derive(Debug, Clone)]
pub struct MigInstance {
    pub uuid: String,
    pub profile: String,
    pub start: u32,
    pub size: u32,
    /// Compute slices (the "3" of 3g.40gb).
    pub slices: u32,
    pub gi_id: u32,
    pub busy: Option<u64>,
    /// When it last became idle, for garbage collection.
    pub idle_since: f64,
}

#[derive(Debug, Clone)]
pub struct Gpu {
    pub mig: bool,
    /// Replica holding the whole GPU.
    pub busy: Option<u64>,
    pub instances: Vec<MigInstance>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub total: f64,
    pub present: f64,
    pub last_used: f64,
    /// Replicas on this node using it.
    pub pins: u32,
}

impl Entry {
    pub fn ready(&self) -> bool {
        self.present >= self.total
    }
}

#[derive(Debug, Clone)]
pub struct Download {
    pub model: usize,
    pub remaining: f64,
}

/// A replica the node runs (or is starting).
#[derive(Debug, Clone)]
pub struct Runtime {
    pub id: u64,
    pub model: usize,
    pub partition_uuid: String,
    pub ready: bool,
    pub running: f64,
    pub waiting: f64,
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub s3_bps: f64,
    pub nvme_bps: f64,
    pub registry_bps: f64,
    pub cache_capacity: f64,
    pub gpus: Vec<Gpu>,
    /// Node-wide Neuron core index -> replica.
    pub cores: Vec<Option<u64>>,
    /// Ordered, so eviction ties (equal last use) break the same way in every run.
    pub cache: BTreeMap<usize, Entry>,
    pub images: Vec<String>,
    pub downloads: Vec<Download>,
    /// Simulated time the downloads were last advanced to.
    pub downloads_at: f64,
    /// Bumped whenever the download set changes, so stale completion events are ignored.
    pub downloads_gen: u64,
    /// What the agent would have measured: None until a download finished.
    pub measured_bps: Option<f64>,
    pub runtimes: Vec<Runtime>,
    next_gi: u32,
    pub seq: u64,
}

/// A model as the simulated agents know it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub uri: String,
    pub bytes: f64,
    pub image: String,
    pub image_bytes: f64,
}

pub const REVISION: &str = "r1";

impl Node {
    pub fn new(name: String, kind: Kind, mig_gpus: u32, s3_bps: f64, nvme_bps: f64, cache_capacity: f64) -> Self {
        let gpus = (0..kind.gpus())
            .map(|i| Gpu { mig: kind == Kind::H100 && i >= kind.gpus() - mig_gpus, busy: None, instances: vec![] })
            .collect();
        Self {
            name,
            kind,
            s3_bps,
            nvme_bps,
            // Images come from a registry through the same NIC, capped as a registry would.
            registry_bps: s3_bps.min(0.5 * GB),
            cache_capacity,
            gpus,
            cores: vec![None; (kind.neuron_devices() * NEURON_CORES_PER_DEVICE) as usize],
            cache: BTreeMap::new(),
            images: Vec::new(),
            downloads: Vec::new(),
            downloads_at: 0.0,
            downloads_gen: 0,
            measured_bps: None,
            runtimes: Vec::new(),
            next_gi: 1,
            seq: 0,
        }
    }

    /// Moves every download forward to `now` at an equal share of the node's bandwidth.
    /// Returns the bytes moved and the models whose download finished.
    pub fn advance(&mut self, now: f64) -> (f64, Vec<usize>) {
        let dt = now - self.downloads_at;
        self.downloads_at = now;
        if self.downloads.is_empty() || dt <= 0.0 {
            return (0.0, vec![]);
        }
        let share = self.s3_bps / self.downloads.len() as f64 * dt;
        let mut moved = 0.0;
        let mut done = Vec::new();
        for d in &mut self.downloads {
            let step = share.min(d.remaining);
            d.remaining -= step;
            moved += step;
            if let Some(e) = self.cache.get_mut(&d.model) {
                e.present = (e.present + step).min(e.total);
            }
            // Sub-byte leftovers are float noise, not bytes.
            if d.remaining < 1.0 {
                done.push(d.model);
            }
        }
        if !done.is_empty() {
            self.downloads.retain(|d| d.remaining >= 1.0);
            self.downloads_gen += 1;
            for m in &done {
                if let Some(e) = self.cache.get_mut(m) {
                    e.present = e.total;
                }
            }
        }
        (moved, done)
    }

    /// When the next download would finish at the current share, if any run.
    pub fn next_completion(&self) -> Option<f64> {
        let share = self.s3_bps / self.downloads.len().max(1) as f64;
        self.downloads.iter().map(|d| d.remaining / share).min_by(f64::total_cmp).map(|s| self.downloads_at + s)
    }

    /// Frees cache space for `bytes`: idle entries go first, least recently used first, then
    /// downloads no replica here waits for (a pre-warm, or a replica since stopped), as the
    /// agent's cache makes room. False when pinned entries alone leave too little room.
    fn make_room(&mut self, bytes: f64) -> bool {
        loop {
            let used: f64 = self.cache.values().map(|e| e.total).sum();
            if used + bytes <= self.cache_capacity {
                return true;
            }
            let downloading = |m: &usize, ds: &[Download]| ds.iter().any(|d| d.model == *m);
            let lru = |idle: bool, cache: &BTreeMap<usize, Entry>, ds: &[Download]| {
                cache
                    .iter()
                    .filter(|(m, e)| e.pins == 0 && downloading(m, ds) != idle)
                    .min_by(|a, b| a.1.last_used.total_cmp(&b.1.last_used))
                    .map(|(m, _)| *m)
            };
            let victim = lru(true, &self.cache, &self.downloads).or_else(|| lru(false, &self.cache, &self.downloads));
            let Some(m) = victim else { return false };
            self.cache.remove(&m);
            if downloading(&m, &self.downloads) {
                self.downloads.retain(|d| d.model != m);
                self.downloads_gen += 1;
            }
        }
    }

    /// Makes sure `model`'s bytes are here or on their way; returns the bytes present now,
    /// or None when the cache cannot make room. `pin` holds it for a replica.
    pub fn want(&mut self, model: usize, info: &ModelInfo, now: f64, pin: bool) -> Option<f64> {
        if !self.cache.contains_key(&model) {
            if !self.make_room(info.bytes) {
                return None;
            }
            self.cache.insert(model, Entry { total: info.bytes, present: 0.0, last_used: now, pins: 0 });
            self.downloads.push(Download { model, remaining: info.bytes });
            self.downloads_gen += 1;
        }
        let e = self.cache.get_mut(&model)?;
        e.last_used = now;
        if pin {
            e.pins += 1;
        }
        Some(e.present)
    }

    pub fn unpin(&mut self, model: usize, now: f64) {
        if let Some(e) = self.cache.get_mut(&model) {
            e.pins = e.pins.saturating_sub(1);
            e.last_used = now;
        }
    }

    /// Takes the devices a lease named for replica `id`; returns the partition uuid the
    /// runtime binds to.
    pub fn occupy(&mut self, id: u64, slot: &Slot, now: f64) -> Result<String, String> {
        match slot {
            Slot::Gpus(g) => {
                for &i in g {
                    let gpu = self.gpus.get_mut(i as usize).ok_or_else(|| format!("no gpu {i}"))?;
                    if gpu.busy.is_some() || gpu.mig {
                        return Err(format!("gpu {i} is not free"));
                    }
                    gpu.busy = Some(id);
                }
                Ok(self.gpu_uuid(g.first().copied().unwrap_or(0)))
            }
            Slot::MigExisting { gpu, uuid, .. } => {
                let g = self.gpus.get_mut(*gpu as usize).ok_or("no such gpu")?;
                let inst = g.instances.iter_mut().find(|i| &i.uuid == uuid && i.busy.is_none()).ok_or("instance gone or busy")?;
                inst.busy = Some(id);
                Ok(uuid.clone())
            }
            Slot::MigCreate { gpu, profile, start, size } => {
                let gi_id = self.next_gi;
                self.next_gi += 1;
                let uuid = format!("MIG-{}-{gpu}-{gi_id}", self.name);
                let g = self.gpus.get_mut(*gpu as usize).ok_or("no such gpu")?;
                let overlaps = g.instances.iter().any(|i| i.start < start + size && *start < i.start + i.size);
                if !g.mig || overlaps {
                    return Err(format!("cannot create {profile} at {start} on gpu {gpu}"));
                }
                let slices = profile.split('g').next().and_then(|s| s.parse().ok()).unwrap_or(1);
                g.instances.push(MigInstance {
                    uuid: uuid.clone(),
                    profile: profile.clone(),
                    start: *start,
                    size: *size,
                    slices,
                    gi_id,
                    busy: Some(id),
                    idle_since: now,
                });
                Ok(uuid)
            }
            Slot::NeuronCores { start, count } => {
                for c in *start..start + count {
                    let core = self.cores.get_mut(c as usize).ok_or_else(|| format!("no neuron core {c}"))?;
                    if core.is_some() {
                        return Err(format!("neuron core {c} is busy"));
                    }
                    *core = Some(id);
                }
                Ok(format!("NC-{}-{id}", self.name))
            }
        }
    }

    pub fn vacate(&mut self, id: u64, now: f64) {
        for g in &mut self.gpus {
            if g.busy == Some(id) {
                g.busy = None;
            }
            for i in &mut g.instances {
                if i.busy == Some(id) {
                    i.busy = None;
                    i.idle_since = now;
                }
            }
        }
        for c in &mut self.cores {
            if *c == Some(id) {
                *c = None;
            }
        }
    }

    /// Destroys MIG instances idle for `after` seconds, as an operator's reconcile of the
    /// partition spec would, so free slices can be re-carved for other profiles.
    pub fn collect_idle_instances(&mut self, now: f64, after: f64) -> bool {
        let mut changed = false;
        for g in &mut self.gpus {
            let before = g.instances.len();
            g.instances.retain(|i| i.busy.is_some() || now - i.idle_since < after);
            changed |= g.instances.len() != before;
        }
        changed
    }

    fn gpu_uuid(&self, i: u32) -> String {
        format!("GPU-{}-{i}", self.name)
    }

    /// Compute slices that are free on MIG GPUs where another instance is busy: capacity
    /// that exists but is stranded next to a running replica.
    pub fn stranded_mig_slices(&self) -> u32 {
        self.gpus
            .iter()
            .filter(|g| g.mig && g.instances.iter().any(|i| i.busy.is_some()))
            .map(|g| 7u32.saturating_sub(g.instances.iter().filter(|i| i.busy.is_some()).map(|i| i.slices).sum()))
            .sum()
    }

    /// GPU-equivalents held by replicas (a MIG instance counts its compute slices / 7).
    pub fn gpus_held(&self) -> (f64, f64) {
        let (mut ready, mut starting) = (0.0, 0.0);
        let is_ready = |id: u64| self.runtimes.iter().any(|r| r.id == id && r.ready);
        for g in &self.gpus {
            let mut add = |id: u64, w: f64| if is_ready(id) { ready += w } else { starting += w };
            if let Some(id) = g.busy {
                add(id, 1.0);
            }
            for i in &g.instances {
                if let Some(id) = i.busy {
                    add(id, f64::from(i.slices) / 7.0);
                }
            }
        }
        (ready, starting)
    }

    /// Whole GPUs (or Neuron cores) in use, over the node's total: kube-scheduler's
    /// LeastAllocated view of the node.
    pub fn allocated(&self) -> f64 {
        if self.cores.is_empty() {
            let used: f64 = self
                .gpus
                .iter()
                .map(|g| {
                    if g.busy.is_some() {
                        1.0
                    } else {
                        g.instances.iter().filter(|i| i.busy.is_some()).map(|i| f64::from(i.slices) / 7.0).sum()
                    }
                })
                .sum();
            used / self.gpus.len().max(1) as f64
        } else {
            self.cores.iter().filter(|c| c.is_some()).count() as f64 / self.cores.len() as f64
        }
    }

    /// The node's state as its agent would report it.
    pub fn report(&self, models: &[ModelInfo]) -> pb::NodeState {
        let mut accelerators = Vec::new();
        for (i, g) in self.gpus.iter().enumerate() {
            let i = i as u32;
            let processes = match g.busy {
                Some(id) => vec![pb::GpuProcess { pid: id as u32, used_memory_bytes: 70 << 30, gpu_instance_id: 0 }],
                None => vec![],
            };
            let gpu = self.kind.gpu(i).with_uuid(self.gpu_uuid(i)).with_processes(processes);
            // MIG instances exist only on a GPU with MIG on.
            let devices = g.instances.iter().map(|m| pb::Partition::mig(m.uuid.clone(), &m.profile, m.gi_id, m.start, m.size));
            accelerators.push(if g.mig { gpu.with_mig(devices) } else { gpu });
        }
        for d in 0..self.kind.neuron_devices() {
            // One partition per replica per device it spans, all sharing the replica's
            // group uuid, which is what the runtime binds to.
            let base = d * NEURON_CORES_PER_DEVICE;
            let mut partitions: Vec<pb::Partition> = Vec::new();
            for c in 0..NEURON_CORES_PER_DEVICE {
                if let Some(id) = self.cores[(base + c) as usize] {
                    let uuid = format!("NC-{}-{id}", self.name);
                    match partitions.iter_mut().find(|p| p.uuid == uuid) {
                        Some(p) => p.placement_size += 1,
                        None => partitions.push(pb::Partition::cores(uuid, c, 1)),
                    }
                }
            }
            accelerators.push(
                pb::Accelerator::neuron(d, NEURON_CORES_PER_DEVICE)
                    .with_uuid(format!("NEURON-{}-{d}", self.name))
                    .with_core_groups(partitions),
            );
        }
        let cached = self
            .cache
            .iter()
            .map(|(m, e)| pb::CachedModel {
                id: format!("c{m}"),
                source_uri: models[*m].uri.clone(),
                revision: REVISION.into(),
                state: if e.ready() { pb::CacheEntryState::Ready } else { pb::CacheEntryState::Downloading } as i32,
                bytes_present: e.present as u64,
                bytes_total: e.total as u64,
                ..Default::default()
            })
            .collect();
        let runtimes = self
            .runtimes
            .iter()
            .map(|r| pb::ServingRuntime {
                name: format!("r{}", r.id),
                kind: "vllm".into(),
                model_id: models[r.model].name.clone(),
                partition_uuid: r.partition_uuid.clone(),
                state: if r.ready { "ready" } else { "starting" }.into(),
                load: Some(pb::RuntimeLoad {
                    requests_waiting: r.waiting,
                    requests_running: r.running,
                    // Below the scaler's KV-cache target: waiting requests are the signal here.
                    kv_cache_usage_ratio: 0.0,
                    ttft_p50_seconds: 0.0,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        pb::NodeState {
            accelerators,
            models: cached,
            images: self.images.iter().map(|i| pb::CachedImage { reference: i.clone(), ..Default::default() }).collect(),
            runtimes,
            source_bandwidth: self
                .measured_bps
                .map(|b| vec![pb::SourceBandwidth { source: "s3://models".into(), bytes_per_second: b, samples: 1 }])
                .unwrap_or_default(),
            resources: Some(pb::NodeResources {
                memory_available_bytes: 2 << 40,
                cache_capacity_bytes: self.cache_capacity as u64,
                cache_free_bytes: (self.cache_capacity - self.cache.values().map(|e| e.total).sum::<f64>()).max(0.0) as u64,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Per-node draws: source bandwidth log-normal (median `s3_median`, shape `sigma`), NVMe
/// uniform in the given range.
pub fn draw_bandwidths(rng: &mut Rng, s3_median: f64, sigma: f64, nvme: (f64, f64)) -> (f64, f64) {
    let s3 = rng.lognormal(s3_median, sigma).clamp(0.05 * GB, 12.5 * GB);
    (s3, rng.range(nvme.0, nvme.1))
}
