//! Declarative partitioning: one spec file (NVIDIA mig-parted's shape, room for Neuron core
//! groups beside it), validated against each product's own profile table, and a planner that
//! turns spec + current state into an ordered, deterministic plan. Planning is read-only and
//! safe on any host; applying a plan (the reconciler) is separate and never happens without
//! a plan first.

pub mod apply;
pub mod plan;
pub mod spec;

/// `hearth partition plan`: reads a spec, builds the GPUs' current state, prints the plan.
/// Read-only. Reading a real host's GPUs needs the NVML backend; until it lands, `simulate`
/// names the products (fresh GPUs: MIG off, no instances).
pub fn plan_command(
    spec_path: &std::path::Path,
    config: &str,
    simulate: &[String],
) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(spec_path)
        .with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = spec::Spec::parse(&text).with_context(|| spec_path.display().to_string())?;
    let entries = spec.config(config)?;
    if simulate.is_empty() {
        anyhow::bail!(
            "reading this host's GPUs needs the NVML backend, which this build does not have yet; \
             pass --simulate PRODUCTS (e.g. --simulate 8xH100-80GB) to plan against simulated GPUs"
        );
    }
    let specs = simulate
        .iter()
        .map(|s| {
            crate::device::sim::SimSpec::parse(s)
                .map_err(|e| anyhow::anyhow!("--simulate: expected {e}, got {s:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let inventory = crate::device::sim::SimInventory::new("plan", &specs);
    let gpus: Vec<plan::GpuState> = crate::device::Inventory::accelerators(&inventory)?
        .into_iter()
        .filter(|a| a.vendor == crate::device::Vendor::Nvidia)
        .map(|a| plan::GpuState {
            index: a.index,
            product: a.product,
            pci_device_id: a.pci_device_id,
            mig_enabled: false,
            instances: Vec::new(),
        })
        .collect();
    let p = plan::plan(entries, &gpus)?;
    let mut out = format!(
        "plan for config {config:?} on {} GPU(s) (read-only; nothing was changed):\n",
        gpus.len()
    );
    if p.steps.is_empty() {
        out.push_str("  nothing to do\n");
    }
    for s in &p.steps {
        out.push_str(&format!("  {s}\n"));
    }
    if !p.unchanged.is_empty() {
        out.push_str(&format!(
            "  unchanged: GPU {}\n",
            p.unchanged
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(out)
}
