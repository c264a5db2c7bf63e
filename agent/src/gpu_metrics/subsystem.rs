//! The GPU metrics subsystem: takes the devices' telemetry backend, runs the collector
//! thread, serves the dcgm-exporter-compatible families, copies what each sweep learns
//! (MIG devices, health, processes) into the report, and labels series with pods from the
//! kubelet's PodResources API.

use std::sync::Arc;

use hearth_service::http::TextMetrics;
use hearth_service::tasks::Tasks;
use tokio::sync::watch;
use tracing::{info_span, warn};

use super::{CollectionMetrics, GpuMetrics, GpuView};
use crate::daemon::AgentError;
use crate::device::{Accelerator, Vendor};
use crate::kube::podres::{self, PodResMetrics};
use crate::report::NodeReport;
use crate::subsystem::{Started, Status, Wiring};

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let metrics = GpuMetrics::new(w.cfg.gpu.host_label.clone());
    w.registry.register_collector(Box::new(CollectionMetrics(metrics.clone())));
    let Some(backend) = w.gpus.as_mut().and_then(|g| g.backend.take()) else {
        return Ok(Started::new(Status::off("no NVIDIA GPUs on this node")));
    };
    let backend_name = backend.name();
    let report = w.report.clone();
    let every = w.cfg.gpu.collect_interval;
    let m = metrics.clone();
    let handle =
        match tokio::task::spawn_blocking(move || super::spawn_collector(backend, m, every, move |v| publish_gpus(&report, v))).await? {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "GPU collection unavailable");
                return Ok(Started::new(Status::off(e.to_string())));
            }
        };
    w.text_metrics.push(metrics.clone() as Arc<dyn TextMetrics>);
    w.sweep_now = Some(Arc::new(handle.nudger()));
    let podres_metrics = PodResMetrics::register(&mut w.registry);
    let m = metrics.clone();
    let stop = tasks.cancel_token().clone();
    tasks.spawn(
        "pod_resources",
        tracing::Instrument::instrument(
            podres::run(w.cfg.gpu.pod_resources.clone(), podres_metrics, move |a| m.set_attribution(a), stop),
            info_span!("pod_resources"),
        ),
    );
    Ok(Started::new(Status::enabled(format!("{backend_name}: sweep every {:?}", every)))
        .with_capabilities(&["gpu-metrics"])
        .on_stop(move || handle.stop()))
}

/// Copies what the GPU collector learned (MIG devices, mode, health, processes) into the
/// accelerators of the report; only a change produces a delta.
fn publish_gpus(report: &watch::Sender<NodeReport>, view: &GpuView) {
    let details = view.details();
    report.send_if_modified(|r| {
        let mut changed = false;
        for (uuid, detail, health, reason) in &details {
            if let Some(a) = r.accelerators.iter_mut().find(|a| &a.uuid == uuid) {
                let next = (Some(detail), *health, reason);
                if (a.gpu.as_ref(), a.health, &a.health_reason) != next {
                    a.gpu = Some(detail.clone());
                    a.health = *health;
                    a.health_reason = reason.clone();
                    changed = true;
                }
            } else if let Some(g) = view.gpus.iter().find(|g| &g.info.uuid == uuid) {
                // NVML-discovered GPUs enter the report on the first sweep.
                r.accelerators.push(Accelerator {
                    index: g.info.index,
                    uuid: uuid.clone(),
                    vendor: Vendor::Nvidia,
                    product: g.info.name.clone(),
                    memory_bytes: g.info.memory_bytes,
                    pci_bus_id: g.info.pci_bus_id.clone(),
                    pci_device_id: g.info.pci_device_id,
                    core_count: 0,
                    simulated: false,
                    health: *health,
                    health_reason: reason.clone(),
                    gpu: Some(detail.clone()),
                    core_groups: Vec::new(),
                });
                changed = true;
            }
        }
        changed
    });
}
