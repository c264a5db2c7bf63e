//! What placement needs to know about one node, distilled from its reported state once per
//! snapshot or delta, so that scoring 5,000 nodes reads a few small structs per node instead
//! of walking every report.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use hearth_proto::mig::{self, GiProfile};
use hearth_proto::v1 as pb;

/// The hash rustc uses for its own tables (FxHash): a multiply and a rotate per word, several
/// times faster than SipHash on the short strings placement looks up per node per call
/// (model URIs, image references). The keys come from authenticated agents and a node's
/// tables are small, so flooding resistance buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// One MIG GPU instance as the agent reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub uuid: String,
    pub profile: String,
    pub start: u32,
    pub size: u32,
    /// A runtime or a process uses it.
    pub busy: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub healthy: bool,
    pub mig_enabled: bool,
    /// A MIG mode change waits for a reset: nothing new goes here until it is done.
    pub mig_pending: bool,
    /// Whole-GPU use: a runtime bound to the GPU or a process on it (MIG off).
    pub busy: bool,
    /// The product's MIG table; None for products without MIG support we know of.
    pub table: Option<&'static [GiProfile]>,
    pub instances: Vec<Instance>,
}

impl Gpu {
    /// Placement units taken by existing instances.
    pub fn used_units(&self) -> u32 {
        self.instances.iter().map(|i| i.size).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeuronDevice {
    pub index: u32,
    pub healthy: bool,
    pub cores: u32,
    /// Per-core: taken by a reported partition that a runtime uses.
    pub busy_cores: Vec<bool>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub gpus: Vec<Gpu>,
    pub neuron: Vec<NeuronDevice>,
    /// Core groups the node's partition config made (node-wide `start, cores`), by start:
    /// a replica takes one whole group of its size.
    pub neuron_groups: Vec<(u32, u32)>,
    pub memory_available: u64,
    /// Bytes present per model, keyed by (source URI, revision).
    pub models: FastMap<(String, String), CachedBytes>,
    /// Image references and digests present.
    pub images: FastSet<String>,
    /// Measured source bandwidth (EWMA bytes/s) by source prefix, longest first.
    pub bandwidth: Vec<(String, f64)>,
    /// Waiting + running requests over every runtime on the node.
    pub requests: f64,
    /// Highest KV-cache use of any runtime on the node.
    pub kv_cache: f64,
    /// Runtimes per model key, with their load, for scaling.
    pub runtimes: Vec<RuntimeFacts>,
    /// The last partition apply failed or waits for a reboot: no new MIG instances here.
    pub partition_blocked: Option<String>,
    /// Bit k set: `gpus[k]` can be handed out whole now (healthy, MIG off and not pending,
    /// unused). Scoring reads this instead of walking every GPU of every node.
    pub whole_free: u64,
    /// Free bytes on the cache volume, when the agent reports the volume.
    pub cache_free: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CachedBytes {
    pub present: u64,
    pub total: u64,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeFacts {
    pub name: String,
    /// The runtime's model id (the agent's cache id or the catalog name).
    pub model_id: String,
    /// (source URI, revision) of the cached model that id names on this node, when known.
    pub model_key: Option<(String, String)>,
    pub ready: bool,
    /// Starting or ready: counts toward a model's replicas (not draining, failed or in a
    /// crash loop).
    pub live: bool,
    /// Started and supervised by the node's agent (the controller may stop the ones it started).
    pub agent_managed: bool,
    pub load: pb::RuntimeLoad,
    /// Measured seconds from the engine's start to ready on this node, when reported.
    pub start_seconds: Option<f64>,
}

/// Most NeuronCores one device is taken to have: real ones have 2 (Inferentia2, Trainium)
/// or 8 (Trainium2), and a model asks for at most 256 on a node. The per-core table is sized
/// from the report, so without a bound one corrupt `core_count` costs gigabytes per placement.
pub const MAX_NEURON_CORES: u32 = 256;

/// The node-wide core range of a Neuron partition name, "neuroncores:A-B" (inclusive).
pub fn neuron_range(p: &str) -> Option<(u32, u32)> {
    let (a, b) = p.strip_prefix("neuroncores:")?.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((a, b))
}

fn healthy(h: i32) -> bool {
    // Unspecified counts as healthy: older agents and simulated devices may not say.
    h != pb::HealthState::Unhealthy as i32
}

impl NodeFacts {
    pub fn from_state(s: &pb::NodeState) -> Self {
        // Anything a runtime is bound to (GPU, MIG device, Neuron group uuid) is in use.
        let bound: HashSet<&str> = s.runtimes.iter().map(|r| r.partition_uuid.as_str()).filter(|u| !u.is_empty()).collect();
        let mut gpus = Vec::new();
        let mut neuron = Vec::new();
        let mut neuron_groups = Vec::new();
        for a in &s.accelerators {
            if a.vendor == pb::AcceleratorVendor::AwsNeuron as i32 {
                let cores = a.core_count.min(MAX_NEURON_CORES);
                let mut busy_cores = vec![false; cores as usize];
                for p in &a.partitions {
                    if bound.contains(p.uuid.as_str()) {
                        // Up to the cores the device has: the reported range may run to u32::MAX.
                        for c in p.placement_start..p.placement_start.saturating_add(p.placement_size).min(cores) {
                            if let Some(b) = busy_cores.get_mut(c as usize) {
                                *b = true;
                            }
                        }
                    }
                }
                if bound.contains(a.uuid.as_str()) {
                    busy_cores.iter_mut().for_each(|b| *b = true);
                }
                for p in &a.partitions {
                    if let Some((lo, hi)) = neuron_range(&p.uuid) {
                        neuron_groups.push((lo, hi - lo + 1));
                    }
                }
                neuron.push(NeuronDevice { index: a.index, healthy: healthy(a.health), cores, busy_cores });
                continue;
            }
            let gi_busy: HashSet<u32> = a.processes.iter().map(|p| p.gpu_instance_id).filter(|g| *g != 0).collect();
            let instances = a
                .partitions
                .iter()
                .map(|p| Instance {
                    uuid: p.uuid.clone(),
                    profile: p.profile.clone(),
                    start: p.placement_start,
                    size: p.placement_size,
                    busy: bound.contains(p.uuid.as_str()) || gi_busy.contains(&p.gpu_instance_id),
                })
                .collect();
            gpus.push(Gpu {
                index: a.index,
                uuid: a.uuid.clone(),
                healthy: healthy(a.health),
                mig_enabled: a.mig_enabled,
                mig_pending: a.mig_pending,
                busy: bound.contains(a.uuid.as_str()) || (!a.mig_enabled && !a.processes.is_empty()),
                table: mig::profiles_for(a.pci_device_id),
                instances,
            });
        }
        // Runtimes bound to a node-wide core range ("neuroncores:4-7", what StartRuntime names
        // for a Neuron slot) hold those cores, counted across devices in index order.
        let mut order: Vec<usize> = (0..neuron.len()).collect();
        order.sort_by_key(|&i| neuron[i].index);
        for (a, b) in bound.iter().filter_map(|u| neuron_range(u)) {
            let mut base = 0u32;
            for &i in &order {
                let d: &mut NeuronDevice = &mut neuron[i];
                for (c, busy) in d.busy_cores.iter_mut().enumerate() {
                    let g = base + c as u32;
                    if g >= a && g <= b {
                        *busy = true;
                    }
                }
                base += d.cores;
            }
        }
        let mut models = FastMap::with_capacity_and_hasher(s.models.len(), Default::default());
        let mut by_id: HashMap<&str, (String, String)> = HashMap::with_capacity(s.models.len());
        for m in &s.models {
            let key = (m.source_uri.trim_end_matches('/').to_owned(), m.revision.clone());
            let ready = m.state == pb::CacheEntryState::Ready as i32;
            let present = if ready { m.bytes_total.max(m.bytes_present) } else { m.bytes_present };
            // Bytes being evicted are about to be gone.
            let present = if m.state == pb::CacheEntryState::Evicting as i32 { 0 } else { present };
            by_id.insert(m.id.as_str(), key.clone());
            let e: &mut CachedBytes = models.entry(key).or_default();
            if present >= e.present {
                *e = CachedBytes { present, total: m.bytes_total, ready };
            }
        }
        let mut images = FastSet::with_capacity_and_hasher(s.images.len() * 2, Default::default());
        for i in &s.images {
            images.insert(i.reference.clone());
            if !i.digest.is_empty() {
                images.insert(i.digest.clone());
            }
        }
        let mut bandwidth: Vec<(String, f64)> = s
            .source_bandwidth
            .iter()
            .filter(|b| b.bytes_per_second.is_finite() && b.bytes_per_second > 0.0)
            .map(|b| (b.source.trim_end_matches('/').to_owned(), b.bytes_per_second))
            .collect();
        bandwidth.sort_by_key(|b| std::cmp::Reverse(b.0.len()));
        let mut requests = 0.0;
        let mut kv_cache: f64 = 0.0;
        let runtimes = s
            .runtimes
            .iter()
            .map(|r| {
                let load = r.load.unwrap_or_default();
                requests += finite(load.requests_waiting) + finite(load.requests_running);
                kv_cache = kv_cache.max(finite(load.kv_cache_usage_ratio));
                RuntimeFacts {
                    name: r.name.clone(),
                    model_id: r.model_id.clone(),
                    model_key: by_id.get(r.model_id.as_str()).cloned(),
                    ready: r.state.eq_ignore_ascii_case("ready") || r.state.eq_ignore_ascii_case("running"),
                    live: !matches!(r.state.as_str(), "draining" | "failed" | "crash-loop"),
                    agent_managed: r.managed_by == "agent",
                    load,
                    // An hour is more than any engine start: beyond that the number is wrong.
                    start_seconds: Some(r.start_seconds).filter(|s| s.is_finite() && *s > 0.0 && *s < 3600.0),
                }
            })
            .collect();
        let partition_blocked = s.partition.as_ref().and_then(|p| {
            use pb::partition_status::Phase;
            match Phase::try_from(p.phase) {
                Ok(Phase::Failed) => Some(format!("partition spec {:?} failed: {}", p.spec_name, p.reason)),
                Ok(Phase::RebootRequired) => Some(format!("partition spec {:?} waits for a reboot", p.spec_name)),
                _ => None,
            }
        });
        let memory_available = s.resources.as_ref().map(|r| r.memory_available_bytes).unwrap_or(0);
        let whole_free = whole_free(&gpus);
        let cache_free = s.resources.as_ref().filter(|r| r.cache_capacity_bytes > 0).map(|r| r.cache_free_bytes);
        Self {
            gpus,
            neuron,
            neuron_groups: {
                neuron_groups.sort_unstable();
                neuron_groups.dedup();
                neuron_groups
            },
            memory_available,
            models,
            images,
            bandwidth,
            requests,
            kv_cache,
            runtimes,
            partition_blocked,
            whole_free,
            cache_free,
        }
    }

    /// Measured bandwidth for the longest source prefix of `uri`, if any.
    pub fn bandwidth_for(&self, uri: &str) -> Option<f64> {
        self.bandwidth
            .iter()
            .find(|(src, _)| uri.starts_with(src.as_str()) && (uri.len() == src.len() || uri.as_bytes()[src.len()] == b'/'))
            .map(|(_, b)| *b)
    }
}

/// The `whole_free` mask of a GPU list (GPUs past the 64th are never handed out whole; no
/// node has that many).
pub fn whole_free(gpus: &[Gpu]) -> u64 {
    gpus.iter()
        .take(64)
        .enumerate()
        .filter(|(_, g)| g.healthy && !g.mig_enabled && !g.mig_pending && !g.busy)
        .fold(0, |m, (k, _)| m | 1 << k)
}

/// Agents report f64 loads; a NaN or negative one must not poison sums.
fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}
