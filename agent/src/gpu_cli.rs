//! `hearth gpu`: what the agent sees on this host's NVIDIA GPUs, without running the agent.
//! `inventory` and `metrics` read (NVML, or the simulator with `--simulate`); `bench` times
//! the collection sweep against raw NVML calls. All read-only: nothing here changes a GPU.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::device::Inventory;
use crate::device::gpu::GpuBackend;
use crate::device::gpusim::{SimFaults, SimGpus};
use crate::device::migctl::SimMig;
use crate::device::nvml::NvmlGpus;
use crate::device::sim::{SimInventory, SimSpec};
use crate::gpu_metrics::{self, GpuMetrics, GpuView};

/// NVML, or simulated products when `simulate` names any.
pub fn backend(simulate: &[String]) -> anyhow::Result<Box<dyn GpuBackend>> {
    if simulate.is_empty() {
        return Ok(Box::new(NvmlGpus::open(None)?));
    }
    let specs = simulate
        .iter()
        .map(|s| SimSpec::parse(s).map_err(|e| anyhow::anyhow!("--simulate: expected {e}, got {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let accs = SimInventory::new("sim", &specs).accelerators()?;
    let ids: Vec<u32> = accs.iter().filter(|a| a.vendor == crate::device::Vendor::Nvidia).map(|a| a.pci_device_id).collect();
    Ok(Box::new(SimGpus::new(&accs, Arc::new(SimMig::new(&ids)), Arc::new(SimFaults::default()))))
}

/// Runs `sweeps` collection sweeps `every` apart (GPM needs two) and returns the last view.
pub fn collect(backend: Box<dyn GpuBackend>, sweeps: u32, every: Duration, hostname: &str) -> anyhow::Result<(Arc<GpuMetrics>, GpuView)> {
    let metrics = GpuMetrics::new(crate::gpu_metrics::render::HostLabel::new("Hostname", hostname));
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = gpu_metrics::spawn_collector(backend, metrics.clone(), every, move |v| {
        let _ = tx.send(v.clone());
    })?;
    let mut last = None;
    for _ in 0..sweeps.max(1) {
        last = Some(rx.recv_timeout(every * 4 + Duration::from_secs(10)).context("GPU collection stalled")?);
    }
    handle.stop();
    Ok((metrics, last.context("no sweep")?))
}

pub fn inventory_text(v: &GpuView) -> String {
    let mut out = format!("backend {}  driver {}  CUDA {}\n", v.backend, v.driver.driver_version, v.driver.cuda_version);
    for g in &v.gpus {
        let r = &g.reading;
        out.push_str(&format!(
            "GPU {}  {}  {}\n  pci {} (device id {:#010X})  memory {} MiB  MIG {} (pending {})  health {:?}{}\n",
            g.info.index,
            g.info.name,
            g.info.uuid,
            g.info.pci_bus_id,
            g.info.pci_device_id,
            g.info.memory_bytes >> 20,
            onoff(r.mig_current),
            onoff(r.mig_pending),
            g.health,
            if g.health_reason.is_empty() { String::new() } else { format!(" ({})", g.health_reason) },
        ));
        out.push_str(&format!(
            "  remapped rows: correctable {} uncorrectable {} pending {}  retired pages {}  GPM {}\n",
            opt(r.remapped_correctable),
            opt(r.remapped_uncorrectable),
            onoff(r.remap_pending),
            opt(r.retired_pages),
            if g.info.gpm_supported { "yes" } else { "no" },
        ));
        for m in &r.migs {
            let d = &m.device;
            out.push_str(&format!(
                "  MIG {}  GI {} CI {}  placement {}+{}  {} MiB  {}\n",
                d.profile,
                d.gi_id,
                d.ci_id,
                d.placement_start,
                d.placement_size,
                d.memory_bytes >> 20,
                d.uuid
            ));
        }
        for p in &r.processes {
            out.push_str(&format!(
                "  process {}  {} MiB{}\n",
                p.pid,
                p.used_memory_bytes >> 20,
                p.gi_id.map(|g| format!("  GI {g}")).unwrap_or_default()
            ));
        }
    }
    out
}

fn onoff(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "on",
        Some(false) => "off",
        None => "n/a",
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

/// Inventory as JSON: the snapshot's accelerator messages.
pub fn inventory_json(v: &GpuView) -> anyhow::Result<String> {
    let list: Vec<serde_json::Value> = v
        .details()
        .into_iter()
        .zip(&v.gpus)
        .map(|((uuid, d, health, reason), g)| {
            serde_json::json!({
                "index": g.info.index,
                "uuid": uuid,
                "name": g.info.name,
                "pci_bus_id": g.info.pci_bus_id,
                "pci_device_id": format!("{:#010X}", g.info.pci_device_id),
                "memory_bytes": g.info.memory_bytes,
                "driver_version": d.driver_version,
                "cuda_version": d.cuda_version,
                "mig_current": d.mig_current,
                "mig_pending": d.mig_pending,
                "mig_devices": d.mig_devices.iter().map(|m| serde_json::json!({
                    "gpu_instance_id": m.gi_id, "compute_instance_id": m.ci_id, "profile": m.profile, "uuid": m.uuid,
                    "placement_start": m.placement_start, "placement_size": m.placement_size, "memory_bytes": m.memory_bytes,
                })).collect::<Vec<_>>(),
                "processes": d.processes.iter().map(|p| serde_json::json!({"pid": p.pid, "used_memory_bytes": p.used_memory_bytes, "gpu_instance_id": p.gi_id})).collect::<Vec<_>>(),
                "remapped_rows_correctable": d.remapped_rows_correctable,
                "remapped_rows_uncorrectable": d.remapped_rows_uncorrectable,
                "row_remap_pending": d.row_remap_pending,
                "retired_pages": d.retired_pages,
                "last_xid": d.last_xid,
                "health": format!("{health:?}").to_lowercase(),
                "health_reason": reason,
                "gpm_supported": g.info.gpm_supported,
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&list)?)
}

/// The dcgm-exporter exposition after `sweeps` sweeps, plus Hearth's collection counters.
pub fn metrics_text(metrics: &GpuMetrics) -> String {
    let mut out = String::new();
    hearth_service::http::TextMetrics::render(metrics, &mut out, false);
    for ((gpu, call), n) in metrics.failures() {
        out.push_str(&format!("# collection failure: gpu {gpu} call {} x{n}\n", call.as_str()));
    }
    out
}

/// `hearth gpu profiles`: NVML's possible placements per GPU-instance profile next to the
/// table the planner uses, and what nvml-wrapper's own `possible_placements` returns for the
/// same query. Read-only. Errors when NVML and the table disagree.
pub fn profiles_report() -> anyhow::Result<String> {
    use crate::device::gpu::GpuBackend;
    let mut gpus = NvmlGpus::open(None)?;
    let nvml = gpus.nvml();
    let mut out = String::new();
    let mut mismatches = 0;
    for g in gpus.gpus()? {
        let Some(table) = crate::device::mig::profiles_for(g.pci_device_id) else {
            out.push_str(&format!("GPU {} {}: no MIG profile table for device id {:#010X}\n", g.index, g.name, g.pci_device_id));
            continue;
        };
        let d = nvml.device_by_index(g.index)?;
        out.push_str(&format!("GPU {} {}\n", g.index, g.name));
        for p in table {
            let raw = crate::device::nvml::raw::possible_placements(nvml, &d, p.id)?;
            let wrapper = d.possible_placements(p.id).map(|v| v.len()).map_err(|e| e.to_string());
            let starts: Vec<u32> = raw.iter().map(|(s, _)| *s).collect();
            let sizes_ok = raw.iter().all(|(_, size)| *size == p.size);
            let ok = starts == p.starts && sizes_ok;
            mismatches += usize::from(!ok);
            out.push_str(&format!(
                "  {:<12} id {:>2}  NVML starts {:?} size {}  table starts {:?} size {}  {}  (nvml-wrapper possible_placements: {})\n",
                p.name,
                p.id,
                starts,
                raw.first().map_or(0, |r| r.1),
                p.starts,
                p.size,
                if ok { "ok" } else { "MISMATCH" },
                match wrapper {
                    Ok(n) => format!("{n} entries"),
                    Err(e) => e,
                }
            ));
        }
    }
    anyhow::ensure!(mismatches == 0, "{out}{mismatches} profile(s) disagree with NVML");
    Ok(out)
}
