//! `hearth agent`: builds the registry, starts every node-local task and the report client,
//! and stops them all within the grace period on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_service::http::{self, Readiness, TextMetrics};
use hearth_proto::convert::AgentHello;
use hearth_proto::transport::TlsMaterial;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::cache::manager::Cache;
use crate::cache::spec::ModelSpec;
use crate::config::{Config, DeviceBackendKind};
use crate::device::gpu::GpuBackend;
use crate::device::gpusim::{SimFaults, SimGpus};
use crate::device::migctl::{MigControl, SimMig};
use crate::device::{Accelerator, Inventory, NoDevices, Vendor, sim::SimInventory};
use crate::gpu_metrics::{self, CollectionMetrics, GpuMetrics, GpuView};
use crate::kube::podres::{self, PodResMetrics};
use crate::node::{NodeMetrics, NodeReader, NodeSample};
use crate::partition::reconcile::{GpuIdentity, NoRuntimes, PartitionStatus, Reconciler};
use crate::report::{CommandDispatcher, NodeReport, PartitionHandler, ReportClient, ReportMetrics, ReportSettings};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] hearth_proto::transport::TlsError),
    #[error("node inventory: {0}")]
    Node(#[from] crate::node::NodeError),
    #[error("cannot listen on {addr} (HTTP): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("tasks did not stop within the {0:?} grace period")]
    ShutdownTimeout(Duration),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("model cache: {0}")]
    Cache(#[from] crate::cache::manager::CacheError),
}

/// Capabilities this build reports in Hello; grows as subsystems land.
pub const CAPABILITIES: &[&str] = &["node-metrics", "devices.simulated", "cache", "cache.s3", "cache.posix"];

#[derive(Debug)]
pub struct RunningAgent {
    pub http_addr: SocketAddr,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    pub async fn wait(self) -> Result<(), AgentError> {
        self.task.await?
    }
}

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

/// Reads the boot id; an agent restart keeps it, a reboot changes it.
fn boot_id(cfg: &Config) -> String {
    std::fs::read_to_string(cfg.procfs_root.join("sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<RunningAgent, AgentError> {
    let tls = cfg.controller.as_ref().and_then(|c| c.tls.as_ref()).map(TlsMaterial::load).transpose()?;
    if cfg.controller.as_ref().is_some_and(|c| c.tls.is_none()) {
        warn!("reporting to the controller WITHOUT TLS (insecure mode)");
    }
    let mut registry = Registry::default();
    let mut telemetry_extra: Vec<Arc<dyn TextMetrics>> = Vec::new();
    let readiness = Arc::new(Readiness::default());
    readiness.set("node", Some("first sample pending".into()));

    let reader = NodeReader::new(&cfg.procfs_root, &cfg.cache.config.root, cfg.exclude_interfaces.clone());
    let info = {
        let r = reader.clone();
        tokio::task::spawn_blocking(move || r.info()).await??
    };
    let node_metrics = NodeMetrics::register(&mut registry);

    let inventory: Arc<dyn Inventory> = match &cfg.devices {
        DeviceBackendKind::None | DeviceBackendKind::Nvml => Arc::new(NoDevices),
        DeviceBackendKind::Simulated(specs) => Arc::new(SimInventory::new(&cfg.node_name, specs)),
    };
    let mut subsystems = Vec::new();
    let inv = inventory.clone();
    let accelerators = match tokio::task::spawn_blocking(move || inv.accelerators()).await? {
        Ok(a) => {
            subsystems.push(("devices".to_owned(), true, inventory.name().to_owned()));
            a
        }
        Err(e) => {
            // The agent runs on without accelerators and says why.
            warn!(error = %e, "accelerator discovery failed");
            subsystems.push(("devices".to_owned(), false, e.to_string()));
            Vec::new()
        }
    };
    info!(backend = inventory.name(), count = accelerators.len(), "accelerators discovered");

    let net = crate::netobs::start(
        &cfg.network,
        crate::netobs::pods::PodTable::default(),
        cfg.kubernetes.clone().map(|k| (k, cfg.node_name.clone())),
        shutdown.clone(),
    );
    let st = net.status();
    subsystems.push(match st.traffic.clone().and(st.tcp.clone()) {
        Ok(()) => ("network".to_owned(), true, "per-pod traffic and TCP metrics".to_owned()),
        Err(reason) => ("network".to_owned(), st.traffic.is_ok() || st.tcp.is_ok(), reason),
    });
    telemetry_extra.push(net as Arc<dyn TextMetrics>);

    let cache = Cache::open(cfg.cache.config.clone(), &mut registry)?;
    subsystems.push(("cache".to_owned(), true, cache.root().display().to_string()));
    let gpu_metrics = GpuMetrics::new(cfg.gpu.host_label.clone());
    registry.register_collector(Box::new(CollectionMetrics(gpu_metrics.clone())));
    // The telemetry backend, and the MIG control over the same GPUs for the reconciler.
    let mut mig_control: Option<(Arc<dyn MigControl>, Vec<GpuIdentity>)> = None;
    let gpu_backend: Option<Box<dyn GpuBackend>> = match &cfg.devices {
        DeviceBackendKind::None => None,
        DeviceBackendKind::Simulated(_) => {
            let nvidia: Vec<&Accelerator> = accelerators.iter().filter(|a| a.vendor == Vendor::Nvidia).collect();
            let ids: Vec<u32> = nvidia.iter().map(|a| a.pci_device_id).collect();
            (!ids.is_empty()).then(|| {
                let mig = Arc::new(SimMig::new(&ids));
                let identities = nvidia
                    .iter()
                    .enumerate()
                    .map(|(i, a)| GpuIdentity { index: i as u32, product: a.product.clone(), pci_device_id: a.pci_device_id })
                    .collect();
                mig_control = Some((mig.clone() as Arc<dyn MigControl>, identities));
                Box::new(SimGpus::new(&accelerators, mig, Arc::new(SimFaults::default()))) as Box<dyn GpuBackend>
            })
        }
        DeviceBackendKind::Nvml => {
            let lib = cfg.gpu.nvml_library.clone();
            match tokio::task::spawn_blocking(move || crate::device::nvml::NvmlGpus::open(lib.as_deref())).await? {
                Ok(mut b) => {
                    subsystems.retain(|s| s.0 != "devices");
                    subsystems.push(("devices".to_owned(), true, "nvml".to_owned()));
                    // NvmlGpus::gpus returns the facts read at open; it cannot fail.
                    let identities = b
                        .gpus()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|g| GpuIdentity { index: g.index, product: g.name, pci_device_id: g.pci_device_id })
                        .collect();
                    mig_control = Some((Arc::new(crate::device::nvml::NvmlMig::new(&b)) as Arc<dyn MigControl>, identities));
                    Some(Box::new(b) as Box<dyn GpuBackend>)
                }
                Err(e) => {
                    // No NVML: the agent runs on and says why.
                    warn!(error = %e, "NVIDIA GPUs unavailable");
                    subsystems.retain(|s| s.0 != "devices");
                    subsystems.push(("devices".to_owned(), false, e.to_string()));
                    None
                }
            }
        }
    };
    let reconciler = match mig_control {
        None => None,
        Some((ctl, ids)) => match Reconciler::new(ctl, Arc::new(NoRuntimes), ids, &cfg.state_dir) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                warn!(error = %e, "MIG partitioning off");
                subsystems.push(("partition".to_owned(), false, e.to_string()));
                None
            }
        },
    };
    let (report_tx, report_rx) = watch::channel(NodeReport {
        info: Some(info),
        labels: cfg.labels.clone(),
        sample: None,
        accelerators,
        subsystems,
        models: cache.entries(),
        bandwidth: cache.source_bandwidth(),
        partition: reconciler.as_ref().and_then(|r| r.status()),
    });
    registry.register_collector(Box::new(DeviceInfoMetrics(report_tx.subscribe())));
    let warm = tokio::spawn(warm_models(cache.clone(), cfg.cache.models.clone(), shutdown.clone()).instrument(info_span!("warm")));
    let cache_report = tokio::spawn(cache_report_loop(cache.clone(), report_tx.clone(), shutdown.clone()));
    let (status_tx, status_rx) = tokio::sync::mpsc::channel(256);
    // Labels for the Kubernetes Node object (the partition state), written by `kube::label_loop`.
    let (node_labels, node_labels_rx) = watch::channel(std::collections::BTreeMap::<String, Option<String>>::new());
    let labeler = cfg.kubernetes.clone().map(|k| {
        let results = prometheus_client::metrics::family::Family::default();
        registry.register("hearth_node_label_patches", "PATCHes of this node's labels in the Kubernetes API, by result", results.clone());
        tokio::spawn(
            crate::kube::label_loop(k, cfg.node_name.clone(), node_labels_rx, results, shutdown.clone())
                .instrument(info_span!("node_labels")),
        )
    });
    // Set once the GPU collector runs; the partition path uses it to ask for a sweep.
    let sweep_now: Arc<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>> = Arc::default();
    let mut dispatcher = CommandDispatcher::new(Some(cache.clone()), status_tx, shutdown.clone());
    let mut partition_task = None;
    if let Some(r) = &reconciler {
        let tx = report_tx.clone();
        let nudge = sweep_now.clone();
        let labels = node_labels.clone();
        let publish: Arc<dyn Fn(PartitionStatus) + Send + Sync> = Arc::new(move |s| {
            labels.send_if_modified(|l| {
                let next: std::collections::BTreeMap<String, Option<String>> = s.labels().into_iter().map(|(k, v)| (k, Some(v))).collect();
                let changed = *l != next;
                *l = next;
                changed
            });
            tx.send_if_modified(|rep| {
                let changed = rep.partition.as_ref() != Some(&s);
                rep.partition = Some(s.clone());
                changed
            });
            // New MIG devices reach the snapshot and /metrics with the next sweep: now.
            if let Some(n) = nudge.get() {
                n();
            }
        });
        dispatcher = dispatcher.with_partition(PartitionHandler { reconciler: r.clone(), publish: publish.clone() });
        // At start: apply the configured spec (idempotent), or finish an apply that an
        // earlier run left pending.
        let (r, wanted) = (r.clone(), cfg.partition.clone());
        partition_task = Some(tokio::task::spawn_blocking(move || {
            let result = match &wanted {
                Some((spec, config)) => r.apply(spec, config).map(Some),
                None => r.resume(),
            };
            match result {
                Ok(Some(s)) => publish(s),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "partition apply refused");
                    if let Some(s) = r.status() {
                        publish(s);
                    }
                }
            }
        }));
    }

    let mut gpu_stop = None;
    let mut attribution = None;
    if let Some(backend) = gpu_backend {
        let tx = report_tx.clone();
        let gm = gpu_metrics.clone();
        let every = cfg.gpu.collect_interval;
        match tokio::task::spawn_blocking(move || gpu_metrics::start(backend, gm, every, move |v| publish_gpus(&tx, v))).await? {
            Ok(stop) => {
                telemetry_extra.push(gpu_metrics.clone() as Arc<dyn TextMetrics>);
                let _ = sweep_now.set(Box::new(stop.nudger()));
                gpu_stop = Some(stop);
                let podres_metrics = PodResMetrics::register(&mut registry);
                let gm = gpu_metrics.clone();
                attribution = Some(tokio::spawn(
                    podres::run(cfg.gpu.pod_resources.clone(), podres_metrics, move |a| gm.set_attribution(a), shutdown.clone())
                        .instrument(info_span!("pod_resources")),
                ));
            }
            Err(e) => {
                warn!(error = %e, "GPU collection unavailable");
                report_tx.send_modify(|r| r.subsystems.push(("gpu-metrics".to_owned(), false, e.to_string())));
            }
        }
    }

    let sampler = tokio::spawn(
        sample_loop(reader, cfg.collect_interval, node_metrics, report_tx, readiness.clone(), shutdown.clone())
            .instrument(info_span!("node_sampler")),
    );

    let reporter = cfg.controller.as_ref().map(|c| {
        let hello = AgentHello {
            node_name: cfg.node_name.clone(),
            boot_id: boot_id(&cfg),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: hearth_proto::API_VERSION,
            capabilities: CAPABILITIES.iter().map(|s| (*s).to_owned()).collect(),
            heartbeat_interval_ms: c.heartbeat_interval.as_millis() as u32,
        };
        let settings = ReportSettings {
            url: c.url.clone(),
            server_name: c.server_name.clone(),
            tls,
            heartbeat_interval: c.heartbeat_interval,
            backoff_initial: c.backoff_initial,
            backoff_max: c.backoff_max,
            max_message_bytes: cfg.max_message_bytes,
        };
        let metrics = ReportMetrics::register(&mut registry);
        let client = ReportClient::new(settings, hello, report_rx, metrics, readiness.clone(), dispatcher, status_rx);
        tokio::spawn(client.run(shutdown.clone()).instrument(info_span!("report", node = %cfg.node_name)))
    });

    let (http_addr, http) = http::bind_http(cfg.http_listen, Arc::new(registry), readiness, telemetry_extra, shutdown.clone())
        .await
        .map_err(|source| AgentError::Bind { addr: cfg.http_listen, source })?;
    info!(%http_addr, node = %cfg.node_name, "agent serving /metrics, /healthz, /readyz");

    let grace = cfg.shutdown_grace;
    let http = tokio::spawn(http);
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        let all = async {
            let _ = sampler.await;
            let _ = warm.await;
            let _ = cache_report.await;
            if let Some(a) = attribution {
                let _ = a.await;
            }
            if let Some(l) = labeler {
                let _ = l.await;
            }
            // An apply in progress finishes (and records its outcome) before we exit.
            if let Some(p) = partition_task {
                let _ = p.await;
            }
            if let Some(collector) = gpu_stop {
                let _ = tokio::task::spawn_blocking(move || collector.stop()).await;
            }
            if let Some(r) = reporter {
                let _ = r.await;
            }
            http.await
        };
        match tokio::time::timeout(grace, all).await {
            Err(_) => Err(AgentError::ShutdownTimeout(grace)),
            Ok(joined) => {
                joined?.map_err(AgentError::Http)?;
                info!("agent stopped");
                Ok(())
            }
        }
    });
    Ok(RunningAgent { http_addr, task })
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
                });
                changed = true;
            }
        }
        changed
    });
}

async fn sample_loop(
    reader: NodeReader,
    every: Duration,
    metrics: Arc<NodeMetrics>,
    report: watch::Sender<NodeReport>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut prev: Option<NodeSample> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = reader.clone();
        let p = prev.clone();
        match tokio::task::spawn_blocking(move || r.sample(p.as_ref())).await {
            Ok(Ok(s)) => {
                if failing {
                    info!("node sampling recovered");
                    failing = false;
                }
                metrics.update(s.clone());
                readiness.set("node", None);
                report.send_modify(|rep| rep.sample = Some(s.clone()));
                prev = Some(s);
            }
            Ok(Err(e)) => {
                metrics.error();
                // Log the first failure of a run of failures, not every interval.
                if !failing {
                    warn!(error = %e, "node sample failed");
                    failing = true;
                }
            }
            Err(e) => {
                metrics.error();
                warn!(error = %e, "node sample task failed");
            }
        }
    }
}

/// Downloads the configured models, one at a time so the first is usable soonest.
async fn warm_models(cache: Arc<Cache>, models: Vec<(ModelSpec, bool)>, shutdown: CancellationToken) {
    for (spec, pin) in models {
        if shutdown.is_cancelled() {
            return;
        }
        let id = spec.id();
        match cache.ensure(&spec, shutdown.child_token()).await {
            Ok(e) => {
                info!(model = %id, uri = %spec.uri, verification = %e.verification, "model warm");
                if pin && let Err(err) = cache.pin(&id, true) {
                    warn!(model = %id, error = %err, "could not pin");
                }
            }
            Err(err) if shutdown.is_cancelled() => {
                info!(model = %id, reason = %err, "warm-up stopped for shutdown");
                return;
            }
            Err(err) => warn!(model = %id, uri = %spec.uri, error = %err, "could not warm model"),
        }
    }
}

/// Copies the cache index into the node report on every change, and every second while a
/// download runs so the controller sees progress.
async fn cache_report_loop(cache: Arc<Cache>, report: watch::Sender<NodeReport>, shutdown: CancellationToken) {
    let mut changes = cache.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => if !cache.downloading() { continue },
        }
        let c = cache.clone();
        let Ok((models, bandwidth)) = tokio::task::spawn_blocking(move || (c.entries(), c.source_bandwidth())).await else {
            continue;
        };
        report.send_if_modified(|r| {
            let changed = r.models != models || r.bandwidth != bandwidth;
            r.models = models;
            r.bandwidth = bandwidth;
            changed
        });
    }
}
