//! The devices subsystem: discovers the node's accelerators through the configured backend
//! (none, simulated, NVML), puts them in the report and `hearth_accelerator_*`, and opens
//! the GPU handles that GPU metrics and partitioning use. A backend that cannot start
//! leaves the agent running without accelerators, with the reason in the status.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use tokio::sync::watch;
use tracing::{info, warn};

use super::gpu::GpuBackend;
use super::gpusim::{SimFaults, SimGpus};
use super::migctl::{MigControl, SimMig};
use super::sim::SimInventory;
use super::{Accelerator, Inventory, Vendor};
use crate::config::DeviceBackendKind;
use crate::daemon::AgentError;
use crate::partition::reconcile::GpuIdentity;
use crate::report::NodeReport;
use crate::subsystem::{Gpus, Started, Status, Wiring};
use hearth_service::tasks::Tasks;

/// Accelerator facts as metrics, one series per device (bounded by the devices present),
/// read from the report so GPUs NVML reveals after start appear too.
#[derive(Debug)]
struct DeviceInfoMetrics(watch::Receiver<NodeReport>);

impl Collector for DeviceInfoMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devs = self.0.borrow().accelerators.clone();
        let mut info = enc.encode_descriptor("hearth_accelerator_info", "Accelerators on this node", None, MetricType::Gauge)?;
        for a in &devs {
            let idx = a.index.to_string();
            let labels = [
                ("index", idx.as_str()),
                ("uuid", a.uuid.as_str()),
                ("product", a.product.as_str()),
                ("simulated", if a.simulated { "true" } else { "false" }),
            ];
            ConstGauge::new(1).encode(info.encode_family(&labels)?)?;
        }
        let mut mem = enc.encode_descriptor("hearth_accelerator_memory", "Accelerator memory", Some(&Unit::Bytes), MetricType::Gauge)?;
        for a in &devs {
            let idx = a.index.to_string();
            ConstGauge::new(a.memory_bytes as i64).encode(mem.encode_family(&[("index", idx.as_str()), ("uuid", a.uuid.as_str())])?)?;
        }
        Ok(())
    }
}

pub async fn start(w: &mut Wiring, _tasks: Tasks) -> Result<Started, AgentError> {
    w.registry.register_collector(Box::new(DeviceInfoMetrics(w.report.subscribe())));
    let started = match &w.cfg.devices {
        DeviceBackendKind::None => Started::new(Status::off("devices.backend: none")),
        DeviceBackendKind::Simulated(specs) => {
            let inventory = SimInventory::new(&w.cfg.node_name, specs);
            let accelerators = tokio::task::spawn_blocking(move || inventory.accelerators()).await?;
            match accelerators {
                Err(e) => {
                    warn!(error = %e, "accelerator discovery failed");
                    Started::new(Status::off(e.to_string()))
                }
                Ok(accelerators) => {
                    info!(backend = "simulated", count = accelerators.len(), "accelerators discovered");
                    w.gpus = simulated_gpus(&accelerators);
                    let n = accelerators.len();
                    w.report.send_modify(|r| r.accelerators = accelerators);
                    Started::new(Status::enabled(format!("simulated: {n} accelerators"))).with_capabilities(&["devices.simulated"])
                }
            }
        }
        DeviceBackendKind::Nvml => {
            let lib = w.cfg.gpu.nvml_library.clone();
            match tokio::task::spawn_blocking(move || super::nvml::NvmlGpus::open(lib.as_deref())).await? {
                Ok(mut b) => {
                    // NvmlGpus::gpus returns the facts read at open; it cannot fail. The
                    // GPUs enter the report with the collector's first sweep.
                    let identities: Vec<GpuIdentity> = b
                        .gpus()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|g| GpuIdentity { index: g.index, product: g.name, pci_device_id: g.pci_device_id })
                        .collect();
                    let n = identities.len();
                    let mig = Arc::new(super::nvml::NvmlMig::new(&b)) as Arc<dyn MigControl>;
                    w.gpus = Some(Gpus { backend: Some(Box::new(b)), mig, identities });
                    Started::new(Status::enabled(format!("nvml: {n} GPUs"))).with_capabilities(&["devices.nvml"])
                }
                Err(e) => {
                    // No NVML: the agent runs on and says why.
                    warn!(error = %e, "NVIDIA GPUs unavailable");
                    Started::new(Status::off(e.to_string()))
                }
            }
        }
    };
    Ok(started)
}

/// The simulated NVIDIA GPUs' telemetry backend and MIG control, sharing one MIG state.
fn simulated_gpus(accelerators: &[Accelerator]) -> Option<Gpus> {
    let nvidia: Vec<&Accelerator> = accelerators.iter().filter(|a| a.vendor == Vendor::Nvidia).collect();
    if nvidia.is_empty() {
        return None;
    }
    let ids: Vec<u32> = nvidia.iter().map(|a| a.pci_device_id).collect();
    let mig = Arc::new(SimMig::new(&ids));
    let identities = nvidia
        .iter()
        .enumerate()
        .map(|(i, a)| GpuIdentity { index: i as u32, product: a.product.clone(), pci_device_id: a.pci_device_id })
        .collect();
    let backend = Box::new(SimGpus::new(accelerators, mig.clone(), Arc::new(SimFaults::default()))) as Box<dyn GpuBackend>;
    Some(Gpus { backend: Some(backend), mig, identities })
}
