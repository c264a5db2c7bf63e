//! The neuron subsystem: the node's Neuron devices from the driver's sysfs tree (or, with
//! simulated Neuron devices, from a fake tree it writes), their health and core groups in the
//! report, and neuron-monitor's metrics under the exporter's names. `neuron-monitor` runs as a
//! supervised child (restarted with backoff) whose JSON lines are parsed off the scrape path;
//! without it, the hardware counters come from sysfs alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::neuron::{Group, Topology};
use hearth_service::tasks::Tasks;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::groups::CoreGroups;
use super::monitor::NeuronExporter;
use super::sysfs;
use crate::config::DeviceBackendKind;
use crate::daemon::AgentError;
use crate::device::{Accelerator, Health, Vendor};
use crate::subsystem::{Started, Status, Wiring};

/// How neuron-monitor is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorCommand {
    /// `neuron-monitor` when it is on PATH; sysfs counters alone otherwise.
    Auto,
    Off,
    Command(Vec<String>),
}

/// Settings from `neuron:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeuronSettings {
    /// None: on when the driver's tree exists or the simulated devices include Neuron ones.
    pub enabled: Option<bool>,
    pub sysfs_root: PathBuf,
    pub instance_type: Option<String>,
    pub monitor: MonitorCommand,
    pub collect_interval: Duration,
}

impl Default for NeuronSettings {
    fn default() -> Self {
        Self {
            enabled: None,
            sysfs_root: "/sys".into(),
            instance_type: None,
            monitor: MonitorCommand::Auto,
            collect_interval: Duration::from_secs(5),
        }
    }
}

/// Where the node's Neuron devices come from.
enum Source {
    Driver { root: PathBuf },
    Simulated { root: PathBuf, topology: &'static Topology },
}

/// The Neuron accelerators as the report carries them: from the driver's devices, keeping
/// the identities the report already has (the simulator's), health from the hardware
/// counters, a device gone from the driver reported unhealthy, core groups on their first
/// device.
fn accelerators(found: &[sysfs::NeuronDevice], known: &[Accelerator], t: &Topology, groups: &[Group]) -> Vec<Accelerator> {
    let mut out = Vec::new();
    let indexes: std::collections::BTreeSet<u32> = found.iter().map(|d| d.index).chain(known.iter().map(|a| a.index)).collect();
    for index in indexes {
        let dev = found.iter().find(|d| d.index == index);
        let prev = known.iter().find(|a| a.index == index);
        let (health, reason) = match dev {
            None => (Health::Unhealthy, "device disappeared from the Neuron driver".to_owned()),
            Some(d) => match sysfs::unhealthy_reason(d) {
                Some(r) => (Health::Unhealthy, r),
                None => (Health::Healthy, String::new()),
            },
        };
        let cpd = t.cores_per_device;
        out.push(Accelerator {
            index,
            uuid: prev
                .map(|a| a.uuid.clone())
                .unwrap_or_else(|| format!("neuron-{}", dev.and_then(|d| d.serial.clone()).unwrap_or_else(|| format!("{index:04}")))),
            vendor: Vendor::AwsNeuron,
            product: dev.map_or_else(|| prev.map(|a| a.product.clone()).unwrap_or_default(), |d| d.device_name.clone()),
            memory_bytes: dev.and_then(|d| d.memory_bytes).unwrap_or(t.memory_per_device),
            pci_bus_id: dev.and_then(|d| d.bdf.clone()).or_else(|| prev.map(|a| a.pci_bus_id.clone())).unwrap_or_default(),
            pci_device_id: 0,
            core_count: cpd,
            simulated: prev.is_some_and(|a| a.simulated),
            health,
            health_reason: reason,
            gpu: None,
            core_groups: groups.iter().copied().filter(|g| g.start / cpd == index).collect(),
        });
    }
    out
}

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let s = w.cfg.neuron.clone();
    if s.enabled == Some(false) {
        return Ok(Started::new(Status::off("neuron.enabled: false")));
    }
    let simulated = match &w.cfg.devices {
        DeviceBackendKind::Simulated(specs) => specs.iter().find_map(|s| s.instance),
        _ => None,
    };
    let source = match simulated {
        Some(t) => {
            let root = w.cfg.state_dir.join("neuron-sim");
            let (root2, t2) = (root.clone(), *t);
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&root2);
                sysfs::write_fake_tree(&root2, &t2, true)
            })
            .await?
            .map_err(|e| AgentError::Neuron(format!("writing the simulated driver tree: {e}")))?;
            Source::Simulated { root, topology: t }
        }
        None if s.sysfs_root.join(sysfs::DEVICE_DIR).exists() => Source::Driver { root: s.sysfs_root.clone() },
        None => {
            let why = format!("no Neuron driver: {} does not exist", s.sysfs_root.join(sysfs::DEVICE_DIR).display());
            return Ok(Started::new(if s.enabled == Some(true) { Status::degraded(why) } else { Status::off(why) }));
        }
    };
    let root = match &source {
        Source::Driver { root } | Source::Simulated { root, .. } => root.clone(),
    };
    let read_root = root.clone();
    let found = tokio::task::spawn_blocking(move || sysfs::devices(&read_root)).await?;
    let found = match found {
        Ok(f) => f,
        Err(e) => return Ok(Started::new(Status::degraded(e.to_string()))),
    };
    let topology = match &source {
        Source::Simulated { topology, .. } => **topology,
        Source::Driver { .. } => match sysfs::instance_type(&found, s.instance_type.as_deref()) {
            Ok(t) => t,
            Err(e) => return Ok(Started::new(Status::degraded(e.to_string()))),
        },
    };
    let exporter = Arc::new(NeuronExporter::new());
    // Core groups: the recorded layout, or the agent config's partition when it is new.
    // Holders of cores, asked before a change: neuron-monitor's runtimes, pods, and the
    // model servers in the report.
    let holders: super::groups::Holders = {
        let (exporter, report) = (exporter.clone(), w.report.subscribe());
        Arc::new(move |cores_per_device| {
            let mut v = exporter.core_users(cores_per_device);
            v.extend(report.borrow().runtimes.iter().filter_map(|r| {
                let g = Group::parse_partition(&r.partition_uuid)?;
                Some((format!("model server {:?}", r.name), Some((g.start..g.start + g.cores).collect())))
            }));
            v
        })
    };
    let (state_dir, wanted) = (w.cfg.state_dir.clone(), w.cfg.partition.clone());
    let (groups, applied) = tokio::task::spawn_blocking(move || {
        let groups = CoreGroups::open(&state_dir, topology, holders);
        let applied = wanted.map(|(spec, config)| groups.apply_at_start(&spec, &config).map_err(|e| (config, e)));
        (Arc::new(groups), applied)
    })
    .await?;
    match applied {
        Some(Ok(true)) => info!(config = ?groups.config(), groups = groups.layout().groups.len(), "Neuron core groups applied"),
        Some(Ok(false)) | None => {}
        Some(Err((config, e))) => {
            warn!(error = %e, "Neuron core groups not applied");
            w.events.post(crate::kube::events::NodeEvent::warning(
                "PartitionFailed",
                "ApplyPartition",
                format!("Neuron core-group config {config:?}: {e}"),
            ));
        }
    }
    let publish_status = crate::partition::publisher(w, None);
    if let Some(s) = crate::partition::Applier::status(groups.as_ref()) {
        publish_status(s);
    }
    w.commands.set_partition(crate::report::PartitionHandler { applier: groups.clone(), publish: publish_status });
    w.text_metrics.push(exporter.clone() as Arc<dyn hearth_service::http::TextMetrics>);
    let layout = groups.subscribe();
    let publish = {
        let (report, layout) = (w.report.clone(), layout.clone());
        move |found: &[sysfs::NeuronDevice]| {
            let super::groups::Layout { topology, groups } = layout.borrow().clone();
            report.send_if_modified(|r| {
                let known: Vec<Accelerator> = r.accelerators.iter().filter(|a| a.vendor == Vendor::AwsNeuron).cloned().collect();
                let neuron = accelerators(found, &known, &topology, &groups);
                if neuron == known {
                    return false;
                }
                r.accelerators.retain(|a| a.vendor != Vendor::AwsNeuron);
                r.accelerators.extend(neuron);
                r.accelerators.sort_by_key(|a| a.index);
                true
            });
        }
    };
    publish(&found);
    let cancel = tasks.cancel_token().clone();
    {
        let (root, cancel, every, mut layout) = (root.clone(), cancel.clone(), s.collect_interval, layout);
        tasks.spawn(
            "collect",
            async move {
                loop {
                    // A new core-group layout reaches the report at once.
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                        changed = layout.changed() => if changed.is_err() { return },
                    }
                    let r = root.clone();
                    match tokio::task::spawn_blocking(move || sysfs::devices(&r)).await {
                        Ok(Ok(found)) => publish(&found),
                        Ok(Err(e)) => warn!(error = %e, "reading the Neuron driver's devices"),
                        Err(e) => warn!(error = %e, "Neuron collection task failed"),
                    }
                }
            }
            .instrument(info_span!("neuron")),
        );
    }
    let command = match (&source, &s.monitor) {
        (_, MonitorCommand::Off) => None,
        (_, MonitorCommand::Command(c)) => Some(c.clone()),
        (Source::Simulated { topology, .. }, MonitorCommand::Auto) => {
            let exe = std::env::current_exe().map_err(|e| AgentError::Neuron(format!("finding the agent's binary: {e}")))?;
            Some(vec![
                exe.display().to_string(),
                "neuron-monitor-sim".into(),
                "--sysfs".into(),
                root.display().to_string(),
                "--instance-type".into(),
                topology.instance_type.into(),
                "--instance-id".into(),
                format!("i-sim-{}", w.cfg.node_name),
                "--period".into(),
                humantime::format_duration(s.collect_interval).to_string(),
            ])
        }
        (Source::Driver { .. }, MonitorCommand::Auto) => which("neuron-monitor").map(|p| vec![p.display().to_string()]),
    };
    let now = groups.layout();
    let detail = format!(
        "{} {} devices ({}, {} cores, LNC {}), {} core groups at start; metrics from {}",
        found.len(),
        now.topology.device_name,
        now.topology.instance_type,
        now.topology.total_cores(),
        now.topology.lnc,
        now.groups.len(),
        command.as_ref().map_or_else(|| "sysfs counters (no neuron-monitor)".to_owned(), |c| c[0].clone())
    );
    // Pod labels for core and device series, from the kubelet's PodResources, refreshed off
    // the scrape path (a scrape never waits on the kubelet).
    {
        let (settings, exporter, cancel) = (w.cfg.gpu.pod_resources.clone(), exporter.clone(), cancel.clone());
        tasks.spawn("pod_resources", async move {
            loop {
                if settings.dir.join(crate::kube::podres::SOCKET_NAME).exists() {
                    match crate::kube::podres::list(&settings.dir, settings.timeout).await {
                        Ok(resp) => exporter.set_pods(super::monitor::neuron_pods(&resp)),
                        Err(e) => tracing::debug!(error = %e, "PodResources for Neuron pod labels"),
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(settings.every) => {}
                }
            }
        });
    }
    if let Some(cmd) = command {
        let exporter = exporter.clone();
        tasks.spawn("monitor", supervise(cmd, exporter, cancel).instrument(info_span!("neuron_monitor")));
    }
    Ok(Started::new(Status::enabled(detail)).with_capabilities(&["neuron", "partition.neuron"]))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs neuron-monitor and feeds its reports to the exporter; restarts it with backoff when
/// it exits, until cancelled.
async fn supervise(cmd: Vec<String>, exporter: Arc<NeuronExporter>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut child = match tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                warn!(command = %cmd[0], error = %e, "could not start neuron-monitor");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        info!(command = %cmd.join(" "), "neuron-monitor started");
        let Some(stdout) = child.stdout.take() else { return };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = child.kill().await;
                    return;
                }
                line = lines.next_line() => match line {
                    Ok(Some(l)) if l.trim().is_empty() => {}
                    Ok(Some(l)) => match super::monitor::parse_line(&l) {
                        Ok(report) => {
                            exporter.ingest(&report);
                            backoff = Duration::from_millis(500);
                        }
                        Err(e) => warn!(error = %e, "a neuron-monitor line that is not a report"),
                    },
                    Ok(None) | Err(_) => break,
                },
            }
        }
        let status = child.wait().await;
        warn!(?status, "neuron-monitor exited; restarting");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}
