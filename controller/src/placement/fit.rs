//! Whether one replica fits on one node now, and where: whole GPUs, a MIG instance that is
//! free or can be created, a run of contiguous Neuron cores, host memory. Leases already
//! granted on the node count as taken. Every "no" is a typed reason.

use hearth_proto::mig::{self, PLACEMENT_UNITS};

use super::facts::{Gpu, NodeFacts};
use crate::catalog::{DeviceRequest, ModelSpec};

/// The concrete devices a replica would get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Gpus(Vec<u32>),
    /// An existing, unused MIG instance.
    MigExisting {
        gpu: u32,
        uuid: String,
        profile: String,
    },
    /// A MIG instance the node's agent would create at `start`.
    MigCreate {
        gpu: u32,
        profile: String,
        start: u32,
        size: u32,
    },
    /// Node-wide Neuron core indices `start..start+count` (device index x cores per device + core).
    NeuronCores {
        start: u32,
        count: u32,
    },
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Gpus(g) => write!(f, "gpus {g:?}"),
            Slot::MigExisting { gpu, uuid, profile } => write!(f, "existing {profile} {uuid} on gpu {gpu}"),
            Slot::MigCreate { gpu, profile, start, .. } => write!(f, "new {profile} at unit {start} on gpu {gpu}"),
            Slot::NeuronCores { start, count } => write!(f, "neuron cores {start}-{}", start + count - 1),
        }
    }
}

/// Why a node cannot take the replica. `code()` is a bounded label for metrics and APIs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    #[error("node is {0}: its report is too old to place on")]
    NotConnected(&'static str),
    #[error("node has connected but sent no state yet")]
    NoReport,
    #[error("not a node any Hearth agent reports")]
    Unknown,
    #[error("needs {want} whole GPU(s); {free} free of {total} (others are unhealthy, in MIG mode, in use or leased)")]
    Gpus { want: u32, free: u32, total: u32 },
    #[error("no MIG {profile} instance free or creatable: {why}")]
    Mig { profile: String, why: std::borrow::Cow<'static, str> },
    #[error("needs {want} contiguous Neuron cores; the longest free run is {longest} of {total}")]
    NeuronCores { want: u32, longest: u32, total: u32 },
    #[error("needs a free core group of {want} cores; the node's groups are {groups}")]
    NeuronGroup { want: u32, groups: String },
    #[error("needs {want} bytes of host memory; {free} available after leases")]
    Memory { want: u64, free: u64 },
}

impl Reject {
    pub fn code(&self) -> &'static str {
        match self {
            Reject::NotConnected(_) => "stale",
            Reject::NoReport => "no_report",
            Reject::Unknown => "unknown_node",
            Reject::Gpus { .. } => "gpus",
            Reject::Mig { .. } => "mig",
            Reject::NeuronCores { .. } | Reject::NeuronGroup { .. } => "neuron_cores",
            Reject::Memory { .. } => "memory",
        }
    }
}

/// A place for the replica and how much it fragments the node (0 = perfect fit, 1 = leaves
/// the most scattered free space).
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub slot: Slot,
    pub fragmentation: f64,
}

/// Finds the best-fitting slot on `n` for `m`, treating `held` slots and `held_memory` as taken.
pub fn fit(n: &NodeFacts, m: &ModelSpec, held: &[&Slot], held_memory: u64) -> Result<Fit, Reject> {
    fit_with(&crate::state::Hot::of(n), n, m, held, held_memory)
}

/// `fit` reading the per-call hot copy of the node's facts where it can (memory, whole GPUs),
/// so scoring a whole cluster for whole-GPU models never touches the facts themselves.
pub fn fit_with(h: &crate::state::Hot, n: &NodeFacts, m: &ModelSpec, held: &[&Slot], held_memory: u64) -> Result<Fit, Reject> {
    let free_mem = h.memory_available.saturating_sub(held_memory);
    if m.memory_bytes > free_mem {
        return Err(Reject::Memory { want: m.memory_bytes, free: free_mem });
    }
    match &m.device {
        DeviceRequest::Gpus(want) => whole_gpus(h, n, *want, held),
        DeviceRequest::Mig(p) => mig_instance(n, p, held),
        DeviceRequest::NeuronCores(want) => neuron_cores(n, *want, held),
    }
}

fn whole_gpus(h: &crate::state::Hot, n: &NodeFacts, want: u32, held: &[&Slot]) -> Result<Fit, Reject> {
    // The node's own facts sit behind a pointer: a cache miss per node on a cluster-wide
    // scan. The common case (no leases on the node, GPU k has index k) is answered from the
    // row alone; the helpers that read `n` are kept out of line so that the compiler cannot
    // hoist their loads into this path (it may: a reference is always dereferenceable).
    let free = if held.is_empty() { h.whole_free } else { without_leased(n, h.whole_free, held) };
    let count = free.count_ones();
    let total = h.gpu_count;
    if count < want {
        return Err(Reject::Gpus { want, free: count, total });
    }
    // Best fit: a node this request fills leaves no stranded GPUs.
    let left = count - want;
    let slot = if h.dense_gpu_indices { lowest_bits(free, want) } else { indices_of(n, free, want) };
    Ok(Fit { slot: Slot::Gpus(slot), fragmentation: f64::from(left) / f64::from(total.max(1)) })
}

/// The positions of the `want` lowest set bits of `mask`.
fn lowest_bits(mask: u64, want: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(want as usize);
    let mut bits = mask;
    while bits != 0 && out.len() < want as usize {
        out.push(bits.trailing_zeros());
        bits &= bits - 1;
    }
    out
}

#[inline(never)]
fn indices_of(n: &NodeFacts, mask: u64, want: u32) -> Vec<u32> {
    lowest_bits(mask, want).into_iter().map(|k| n.gpus[k as usize].index).collect()
}

/// `free` less the GPUs leased out on the node.
#[inline(never)]
fn without_leased(n: &NodeFacts, mut free: u64, held: &[&Slot]) -> u64 {
    for s in held {
        if let Slot::Gpus(leased) = s {
            for (k, g) in n.gpus.iter().take(64).enumerate() {
                if leased.contains(&g.index) {
                    free &= !(1u64 << k);
                }
            }
        }
    }
    free
}

/// Units taken on `g` by instances and by leased creations, as a bit mask.
fn taken_units(g: &Gpu, held: &[&Slot]) -> u32 {
    let mut mask = 0u32;
    let mut take = |start: u32, size: u32| {
        // Instances come from agent reports: their start and size may be anything.
        for u in start..start.saturating_add(size).min(PLACEMENT_UNITS) {
            mask |= 1 << u;
        }
    };
    for i in &g.instances {
        take(i.start, i.size);
    }
    for s in held {
        if let Slot::MigCreate { gpu, start, size, .. } = s
            && *gpu == g.index
        {
            take(*start, *size);
        }
    }
    mask
}

/// Longest run of free units in a mask.
fn longest_free(mask: u32) -> u32 {
    let (mut best, mut run) = (0, 0);
    for u in 0..PLACEMENT_UNITS {
        if mask & (1 << u) == 0 {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

fn mig_instance(n: &NodeFacts, profile: &str, held: &[&Slot]) -> Result<Fit, Reject> {
    let reject = |why: std::borrow::Cow<'static, str>| Reject::Mig { profile: profile.to_owned(), why };
    let leased_uuid = |u: &str| held.iter().any(|s| matches!(s, Slot::MigExisting { uuid, .. } if uuid == u));
    let mut best: Option<Fit> = None;
    let mut knows_profile = false;
    let mut mig_gpus = 0;
    for g in n.gpus.iter().filter(|g| g.healthy && g.mig_enabled && !g.mig_pending) {
        mig_gpus += 1;
        // An idle instance of the profile: nothing to create, no fragmentation added.
        if let Some(i) = g.instances.iter().find(|i| i.profile == profile && !i.busy && !leased_uuid(&i.uuid)) {
            return Ok(Fit {
                slot: Slot::MigExisting { gpu: g.index, uuid: i.uuid.clone(), profile: profile.to_owned() },
                fragmentation: 0.0,
            });
        }
        let Some(p) = g.table.and_then(|t| mig::by_name(t, profile)) else { continue };
        knows_profile = true;
        if n.partition_blocked.is_some() {
            continue;
        }
        let count = g.instances.iter().filter(|i| i.profile == profile).count() as u32
            + held.iter().filter(|s| matches!(s, Slot::MigCreate { gpu, profile: q, .. } if *gpu == g.index && q == profile)).count()
                as u32;
        if count >= p.max_count {
            continue;
        }
        let taken = taken_units(g, held);
        for &start in p.starts {
            let want = ((1u32 << p.size) - 1) << start;
            if taken & want != 0 {
                continue;
            }
            let after = taken | want;
            // Best fit: fewest free units left on this GPU, and of those as few as possible
            // outside the longest free run (scattered units strand small slices).
            let free_after = PLACEMENT_UNITS - after.count_ones();
            let scattered = free_after - longest_free(after);
            let frag = f64::from(free_after + scattered) / f64::from(2 * PLACEMENT_UNITS);
            if best.as_ref().is_none_or(|b| frag < b.fragmentation) {
                best = Some(Fit {
                    slot: Slot::MigCreate { gpu: g.index, profile: profile.to_owned(), start, size: p.size },
                    fragmentation: frag,
                });
            }
        }
    }
    best.ok_or_else(|| {
        reject(if mig_gpus == 0 {
            "no healthy GPU in MIG mode".into()
        } else if !knows_profile && !n.gpus.iter().any(|g| g.instances.iter().any(|i| i.profile == profile)) {
            "no GPU of a product with that profile".into()
        } else if let Some(why) = &n.partition_blocked {
            format!("every instance of it is in use and new ones cannot be made: {why}").into()
        } else {
            "every instance of it is in use and no GPU has room for another at an allowed start".into()
        })
    })
}

fn neuron_cores(n: &NodeFacts, want: u32, held: &[&Slot]) -> Result<Fit, Reject> {
    let mut free: Vec<bool> = Vec::new();
    let mut devices: Vec<_> = n.neuron.iter().collect();
    devices.sort_by_key(|d| d.index);
    for d in devices {
        free.extend(d.busy_cores.iter().map(|b| d.healthy && !b));
    }
    for s in held {
        if let Slot::NeuronCores { start, count } = s {
            for c in *start..start + count {
                if let Some(f) = free.get_mut(c as usize) {
                    *f = false;
                }
            }
        }
    }
    let total = free.len() as u32;
    // Where the node's partition config made core groups, a replica takes one whole group of
    // its size (the lowest free one): the groups are what the Neuron rules allow there.
    if !n.neuron_groups.is_empty() {
        let is_free = |(s, c): (u32, u32)| (s..s + c).all(|i| free.get(i as usize).copied().unwrap_or(false));
        return match n.neuron_groups.iter().copied().find(|&(s, c)| c == want && is_free((s, c))) {
            Some((start, _)) => Ok(Fit { slot: Slot::NeuronCores { start, count: want }, fragmentation: 0.0 }),
            None => Err(Reject::NeuronGroup {
                want,
                groups: n
                    .neuron_groups
                    .iter()
                    .map(|&(s, c)| format!("{s}-{}{}", s + c - 1, if is_free((s, c)) { "" } else { " (in use)" }))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        };
    }
    // Best fit: the smallest free run that holds the request.
    let mut best: Option<(u32, u32)> = None;
    let mut longest = 0;
    let mut i = 0;
    while i < free.len() {
        if !free[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < free.len() && free[i] {
            i += 1;
        }
        let len = (i - start) as u32;
        longest = longest.max(len);
        if len >= want && best.is_none_or(|(_, l)| len < l) {
            best = Some((start as u32, len));
        }
    }
    let (start, run) = best.ok_or(Reject::NeuronCores { want, longest, total })?;
    Ok(Fit { slot: Slot::NeuronCores { start, count: want }, fragmentation: f64::from(run - want) / f64::from(total.max(1)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ScalingSpec;
    use crate::placement::facts::{Instance, NeuronDevice};

    pub(crate) fn model(device: DeviceRequest) -> ModelSpec {
        ModelSpec {
            serve: Default::default(),
            name: "m".into(),
            source_uri: "s3://b/m".into(),
            revision: "r".into(),
            bytes: 10 << 30,
            image: "img".into(),
            image_bytes: 1 << 30,
            runtime: "vllm".into(),
            device,
            memory_bytes: 0,
            scaling: ScalingSpec::defaults(),
        }
    }

    fn gpu(index: u32, mig: bool, instances: Vec<Instance>) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index}"),
            healthy: true,
            mig_enabled: mig,
            mig_pending: false,
            busy: false,
            table: Some(mig::H100_80GB),
            instances,
        }
    }

    fn inst(profile: &str, start: u32, size: u32, busy: bool) -> Instance {
        Instance { uuid: format!("MIG-{start}"), profile: profile.into(), start, size, busy }
    }

    #[test]
    fn whole_gpus_skip_unhealthy_mig_busy_and_leased() {
        let mut n = NodeFacts { gpus: (0..4).map(|i| gpu(i, false, vec![])).collect(), ..Default::default() };
        n.gpus[0].healthy = false;
        n.gpus[1].busy = true;
        n.whole_free = super::super::facts::whole_free(&n.gpus);
        let m = model(DeviceRequest::Gpus(2));
        assert_eq!(fit(&n, &m, &[], 0).unwrap().slot, Slot::Gpus(vec![2, 3]));
        let lease = Slot::Gpus(vec![2]);
        assert_eq!(fit(&n, &m, &[&lease], 0).unwrap_err(), Reject::Gpus { want: 2, free: 1, total: 4 });
        n.gpus[3].mig_enabled = true;
        n.whole_free = super::super::facts::whole_free(&n.gpus);
        assert!(matches!(fit(&n, &model(DeviceRequest::Gpus(1)), &[&lease], 0), Err(Reject::Gpus { free: 0, .. })));
    }

    #[test]
    fn mig_prefers_an_idle_instance_then_best_fit_creation() {
        let busy3g = inst("3g.40gb", 0, 4, true);
        let n = NodeFacts {
            gpus: vec![gpu(0, true, vec![]), gpu(1, true, vec![busy3g.clone(), inst("1g.10gb", 4, 1, false)])],
            ..Default::default()
        };
        let one = model(DeviceRequest::Mig("1g.10gb".into()));
        let f = fit(&n, &one, &[], 0).unwrap();
        assert_eq!(f.slot, Slot::MigExisting { gpu: 1, uuid: "MIG-4".into(), profile: "1g.10gb".into() });
        // With that instance leased, a new one goes on the partly used GPU 1 (best fit), not
        // on the empty GPU 0.
        let f = fit(&n, &one, &[&f.slot], 0).unwrap();
        assert!(matches!(f.slot, Slot::MigCreate { gpu: 1, start: 5, .. }), "{:?}", f.slot);
        // A 4g.40gb only starts at 0: GPU 1 is taken there, GPU 0 is empty.
        let f = fit(&n, &model(DeviceRequest::Mig("4g.40gb".into())), &[], 0).unwrap();
        assert_eq!(f.slot, Slot::MigCreate { gpu: 0, profile: "4g.40gb".into(), start: 0, size: 4 });
        // Leased creations count as taken.
        let f2 = fit(&n, &model(DeviceRequest::Mig("4g.40gb".into())), &[&f.slot], 0).unwrap_err();
        assert!(matches!(f2, Reject::Mig { .. }), "{f2}");
        // A profile the product does not have is named as such.
        let e = fit(&n, &model(DeviceRequest::Mig("3g.71gb".into())), &[], 0).unwrap_err();
        assert_eq!(e.to_string(), "no MIG 3g.71gb instance free or creatable: no GPU of a product with that profile");
    }

    #[test]
    fn mig_respects_max_count_and_blocked_partitions() {
        let g = gpu(0, true, (0..4).map(|i| inst("1g.20gb", i * 2, 2, true)).collect());
        let mut n = NodeFacts { gpus: vec![g], ..Default::default() };
        let e = fit(&n, &model(DeviceRequest::Mig("1g.20gb".into())), &[], 0).unwrap_err();
        assert!(e.to_string().contains("no GPU has room"), "{e}");
        n.gpus[0].instances.truncate(1);
        n.partition_blocked = Some("partition spec \"x\" failed: boom".into());
        let e = fit(&n, &model(DeviceRequest::Mig("1g.20gb".into())), &[], 0).unwrap_err();
        assert!(e.to_string().contains("cannot be made: partition spec"), "{e}");
    }

    #[test]
    fn neuron_cores_must_be_contiguous_and_best_fit() {
        let dev = |index, busy: Vec<bool>| NeuronDevice { index, healthy: true, cores: busy.len() as u32, busy_cores: busy };
        // cores: 0 1 | 2 3 | 4 5 6 7 ; busy 1 and 4 -> free runs [0], [2,3], [5,6,7]
        let n = NodeFacts {
            neuron: vec![dev(0, vec![false, true]), dev(1, vec![false, false]), dev(2, vec![true, false, false, false])],
            ..Default::default()
        };
        assert_eq!(fit(&n, &model(DeviceRequest::NeuronCores(2)), &[], 0).unwrap().slot, Slot::NeuronCores { start: 2, count: 2 });
        assert_eq!(fit(&n, &model(DeviceRequest::NeuronCores(3)), &[], 0).unwrap().slot, Slot::NeuronCores { start: 5, count: 3 });
        let lease = Slot::NeuronCores { start: 6, count: 1 };
        assert_eq!(
            fit(&n, &model(DeviceRequest::NeuronCores(3)), &[&lease], 0).unwrap_err(),
            Reject::NeuronCores { want: 3, longest: 2, total: 8 }
        );
    }

    #[test]
    fn with_core_groups_a_replica_takes_a_whole_free_group_of_its_size() {
        let dev = |index| NeuronDevice { index, healthy: true, cores: 2, busy_cores: vec![false, false] };
        // inf2.24xlarge-like: 12 cores; groups 0-3 (two devices), 4-5, 6-7, 8-9; 10-11 ungrouped.
        let mut n =
            NodeFacts { neuron: (0..6).map(dev).collect(), neuron_groups: vec![(0, 4), (4, 2), (6, 2), (8, 2)], ..Default::default() };
        n.neuron[2].busy_cores = vec![true, true];
        let got = |want, held: &[&Slot]| fit(&n, &model(DeviceRequest::NeuronCores(want)), held, 0);
        assert_eq!(got(2, &[]).unwrap().slot, Slot::NeuronCores { start: 6, count: 2 }, "4-5 is in use");
        assert_eq!(got(4, &[]).unwrap().slot, Slot::NeuronCores { start: 0, count: 4 });
        let lease = Slot::NeuronCores { start: 6, count: 2 };
        assert_eq!(got(2, &[&lease]).unwrap().slot, Slot::NeuronCores { start: 8, count: 2 });
        // No group of 1 core, even though ungrouped cores are free: groups are the layout.
        let e = got(1, &[]).unwrap_err();
        assert_eq!(e.to_string(), "needs a free core group of 1 cores; the node's groups are 0-3, 4-5 (in use), 6-7, 8-9");
        assert_eq!(e.code(), "neuron_cores");
    }

    #[test]
    fn memory_counts_leases() {
        let gpus = vec![gpu(0, false, vec![])];
        let n = NodeFacts { whole_free: super::super::facts::whole_free(&gpus), gpus, memory_available: 100, ..Default::default() };
        let mut m = model(DeviceRequest::Gpus(1));
        m.memory_bytes = 60;
        assert!(fit(&n, &m, &[], 0).is_ok());
        assert_eq!(fit(&n, &m, &[], 50).unwrap_err(), Reject::Memory { want: 60, free: 50 });
    }
}
