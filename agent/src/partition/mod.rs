//! Declarative partitioning: one spec file (NVIDIA mig-parted's shape, room for Neuron core
//! groups beside it), validated against each product's own profile table, and a planner that
//! turns spec + current state into an ordered, deterministic plan. Planning is read-only and
//! safe on any host; applying a plan (the reconciler) is separate and never happens without
//! a plan first.

pub mod apply;
pub mod neuron;
pub mod plan;
pub mod reconcile;
pub mod spec;
mod subsystem;

pub use subsystem::{publisher, start};

/// What ApplyPartition runs on this node: the MIG reconciler on GPU nodes, the core-group
/// allocator on Neuron nodes. The command router checks before it accepts and applies on the
/// blocking pool, so `apply` may block.
pub trait Applier: Send + Sync + std::fmt::Debug {
    /// What this applier partitions (its statuses carry it).
    fn kind(&self) -> reconcile::Kind;
    /// Refuses, with a reason, a spec or config that cannot apply on this node; touches nothing.
    fn check(&self, spec_yaml: &str, config: &str) -> Result<(), String>;
    /// Applies `config`; the status to publish. Err: refused or not recorded.
    fn apply(&self, spec_yaml: &str, config: &str) -> Result<reconcile::PartitionStatus, String>;
    /// The latest status, if any.
    fn status(&self) -> Option<reconcile::PartitionStatus>;
}

/// `hearth partition plan`: reads a spec, reads the GPUs' current state (NVML, read-only:
/// MIG mode and the GPU instances present; or simulated products with `simulate`, fresh:
/// MIG off, no instances) and prints the plan. Nothing is changed.
pub fn plan_command(spec_path: &std::path::Path, config: &str, simulate: &[String]) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = spec::Spec::parse(&text).with_context(|| spec_path.display().to_string())?;
    // A Neuron instance type to simulate: plan the config's core groups on it.
    if let Some(instance) = simulate.iter().find(|s| hearth_proto::neuron::INSTANCE_TYPES.iter().any(|t| t.instance_type == s.as_str())) {
        let entries = spec.neuron_config(config)?;
        anyhow::ensure!(!entries.is_empty(), "config {config:?} has no neuron-configs entries to plan on {instance}");
        return neuron::plan_text(config, instance, "simulated", entries);
    }
    let entries = spec.config(config)?;
    let (source, gpus) = if simulate.is_empty() {
        ("NVML", nvml_state().context("reading this host's GPUs through NVML (or pass --simulate PRODUCTS, e.g. --simulate 8xH100-80GB, to plan against simulated GPUs)")?)
    } else {
        ("simulated", simulated_state(simulate)?)
    };
    let p = plan::plan(entries, &gpus)?;
    let mut out = format!("plan for config {config:?} on {} {source} GPU(s) (read-only; nothing was changed):\n", gpus.len());
    for g in &gpus {
        let layout: Vec<String> = g.instances.iter().map(|i| format!("{}@{}", i.profile.name, i.start)).collect();
        out.push_str(&format!(
            "  now: GPU {} {} MIG {}{}\n",
            g.index,
            g.product,
            if g.mig_enabled { "on" } else { "off" },
            if layout.is_empty() { String::new() } else { format!(" [{}]", layout.join(", ")) }
        ));
    }
    let covered = gpus.iter().filter(|g| entries.iter().any(|e| e.applies_to(g.index, g.pci_device_id))).count();
    if covered == 0 && !gpus.is_empty() {
        // Not "nothing to do": the spec says nothing about these GPUs at all.
        let filters: Vec<String> = entries
            .iter()
            .flat_map(|e| e.device_filter.iter().map(|f| format!("{f:#010x}")))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push_str(&format!(
            "  config {config:?} applies to none of these GPUs (its device filter selects {}; these GPUs are {}): nothing would change\n",
            if filters.is_empty() { "other device indexes".to_owned() } else { filters.join(", ") },
            gpus.iter()
                .map(|g| format!("{:#010x}", g.pci_device_id))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    } else if p.steps.is_empty() {
        out.push_str("  nothing to do\n");
    }
    for s in &p.steps {
        out.push_str(&format!("  {s}\n"));
    }
    if !p.unchanged.is_empty() {
        out.push_str(&format!("  unchanged: GPU {}\n", p.unchanged.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")));
    }
    Ok(out)
}

fn simulated_state(simulate: &[String]) -> anyhow::Result<Vec<plan::GpuState>> {
    let specs = simulate
        .iter()
        .map(|s| crate::device::sim::SimSpec::parse(s).map_err(|e| anyhow::anyhow!("--simulate: expected {e}, got {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let inventory = crate::device::sim::SimInventory::new("plan", &specs);
    Ok(crate::device::Inventory::accelerators(&inventory)?
        .into_iter()
        .filter(|a| a.vendor == crate::device::Vendor::Nvidia)
        .map(|a| plan::GpuState {
            index: a.index,
            product: a.product,
            pci_device_id: a.pci_device_id,
            mig_enabled: false,
            instances: Vec::new(),
        })
        .collect())
}

/// This host's GPUs as NVML reports them. Only queries: MIG mode and the instance list.
fn nvml_state() -> anyhow::Result<Vec<plan::GpuState>> {
    use crate::device::gpu::GpuBackend;
    let mut gpus = crate::device::nvml::NvmlGpus::open(None)?;
    let ctl = crate::device::nvml::NvmlMig::new(&gpus);
    let mut out = Vec::new();
    for g in gpus.gpus()? {
        let state = match apply::read_state(&ctl, g.index, &g.name, g.pci_device_id) {
            Ok(s) => s,
            // A GPU without MIG support plans as "MIG off, nothing to list".
            Err(crate::device::migctl::MigError::NotSupported { .. }) => plan::GpuState {
                index: g.index,
                product: g.name.clone(),
                pci_device_id: g.pci_device_id,
                mig_enabled: false,
                instances: Vec::new(),
            },
            Err(e) => return Err(e.into()),
        };
        out.push(state);
    }
    Ok(out)
}
