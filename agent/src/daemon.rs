//! `hearth agent`: the list of subsystems, started in order with one [`Wiring`], then the
//! report client to the controller and the HTTP server; on shutdown every subsystem's tasks
//! are awaited within the grace period.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::convert::AgentHello;
use hearth_proto::transport::TlsMaterial;
use hearth_service::http::{self, Readiness};
use hearth_service::tasks::{TaskMetrics, Tasks};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::report::{CommandDispatcher, NodeReport, ReportClient, ReportMetrics, ReportSettings};
use crate::subsystem::{StartFn, Started, StatusMetrics, Wiring};

/// Every capability of the agent, in start order: each may use what the ones before it
/// published in the [`Wiring`] (GPU metrics and partitioning use the devices' handles;
/// partitioning asks GPU metrics for a sweep; the kube subsystem writes the labels
/// partitioning wants).
pub const SUBSYSTEMS: &[(&str, StartFn)] = &[
    ("node", |w, t| Box::pin(crate::node::start(w, t))),
    ("devices", |w, t| Box::pin(crate::device::start(w, t))),
    ("gpu-metrics", |w, t| Box::pin(crate::gpu_metrics::start(w, t))),
    ("neuron", |w, t| Box::pin(crate::neuron::subsystem::start(w, t))),
    ("partition", |w, t| Box::pin(crate::partition::start(w, t))),
    ("cache", |w, t| Box::pin(crate::cache::start(w, t))),
    ("network", |w, t| Box::pin(crate::netobs::start(w, t))),
    ("kube", |w, t| Box::pin(crate::kube::start(w, t))),
    ("runtimes", |w, t| Box::pin(crate::runtime::start(w, t))),
    ("images", |w, t| Box::pin(crate::images::start(w, t))),
];

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
    #[error("tasks of {0} did not stop within the {1:?} grace period")]
    ShutdownTimeout(String, Duration),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("model cache: {0}")]
    Cache(#[from] crate::cache::manager::CacheError),
    #[error("model servers: {0}")]
    Runtimes(String),
    #[error("images: {0}")]
    Images(String),
    #[error("neuron: {0}")]
    Neuron(String),
}

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

/// Reads the boot id; an agent restart keeps it, a reboot changes it.
fn boot_id(cfg: &Config) -> String {
    std::fs::read_to_string(cfg.procfs_root.join("sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

struct Running {
    name: &'static str,
    tasks: Tasks,
    on_stop: Option<Box<dyn FnOnce() + Send>>,
}

pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<RunningAgent, AgentError> {
    let tls = cfg.controller.as_ref().and_then(|c| c.tls.as_ref()).map(TlsMaterial::load).transpose()?;
    if cfg.controller.as_ref().is_some_and(|c| c.tls.is_none()) {
        warn!("reporting to the controller WITHOUT TLS (insecure mode)");
    }
    let cfg = Arc::new(cfg);
    // Every task hangs off `stop`: if a subsystem fails to start, the guard stops the ones
    // already running before the error is returned.
    let stop = shutdown.child_token();
    let abort = stop.clone().drop_guard();
    let mut registry = Registry::default();
    let task_metrics = TaskMetrics::register(&mut registry);
    let (report, report_rx) = watch::channel(NodeReport::default());
    registry.register_collector(Box::new(StatusMetrics(report.subscribe())));
    // Results of long commands wait here while the controller is away.
    let (status_tx, status_rx) = tokio::sync::mpsc::channel(256);
    let command_tasks = Tasks::new("commands", stop.child_token(), task_metrics.clone());
    let (events, events_queue) = crate::kube::events::NodeEvents::channel();
    let mut w = Wiring {
        cfg: cfg.clone(),
        registry,
        report,
        readiness: Arc::new(Readiness::default()),
        text_metrics: Vec::new(),
        commands: CommandDispatcher::new(status_tx, command_tasks.clone()),
        node_labels: watch::channel(Default::default()).0,
        pods: crate::netobs::pods::PodTable::with_retention(cfg.network.forget_after),
        serving_pods: watch::channel(Default::default()).0,
        runtime_drain: Default::default(),
        events,
        events_queue: Some(events_queue),
        gpus: None,
        sweep_now: None,
        cache: None,
    };

    let mut running = Vec::with_capacity(SUBSYSTEMS.len());
    let mut capabilities = BTreeSet::new();
    for &(name, start) in SUBSYSTEMS {
        let tasks = Tasks::new(name, stop.child_token(), task_metrics.clone());
        let span = info_span!("subsystem", name);
        let Started { status, capabilities: caps, on_stop } = start(&mut w, tasks.clone()).instrument(span).await?;
        info!(subsystem = name, state = status.state.as_str(), detail = %status.detail, "subsystem started");
        w.status_handle(name).set(status);
        capabilities.extend(caps);
        running.push(Running { name, tasks, on_stop });
    }

    running.push(Running { name: "commands", tasks: command_tasks, on_stop: None });
    let report_tasks = Tasks::new("report", stop.child_token(), task_metrics.clone());
    if let Some(c) = &cfg.controller {
        let hello = AgentHello {
            node_name: cfg.node_name.clone(),
            boot_id: boot_id(&cfg),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: hearth_proto::API_VERSION,
            // What actually started, not what this build could do.
            capabilities: capabilities.iter().map(|s| (*s).to_owned()).collect(),
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
        let metrics = ReportMetrics::register(&mut w.registry);
        let client = ReportClient::new(settings, hello, report_rx, metrics, w.commands.clone(), status_rx);
        let stop = report_tasks.cancel_token().clone();
        report_tasks.spawn("stream", client.run(stop).instrument(info_span!("report", node = %cfg.node_name)));
    }
    running.push(Running { name: "report", tasks: report_tasks, on_stop: None });

    let Wiring { registry, readiness, text_metrics, .. } = w;
    let (http_addr, http) = http::bind_http(cfg.http_listen, Arc::new(registry), readiness, text_metrics, shutdown.clone())
        .await
        .map_err(|source| AgentError::Bind { addr: cfg.http_listen, source })?;
    info!(%http_addr, node = %cfg.node_name, capabilities = ?capabilities, "agent serving /metrics, /healthz, /readyz");
    abort.disarm();

    let grace = cfg.shutdown_grace;
    let http = tokio::spawn(http);
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + grace;
        // Later subsystems use earlier ones: stop them in reverse order.
        for r in running.into_iter().rev() {
            r.tasks.close();
            if tokio::time::timeout_at(deadline, r.tasks.wait()).await.is_err() {
                return Err(AgentError::ShutdownTimeout(r.name.to_owned(), grace));
            }
            if let Some(stop) = r.on_stop {
                tokio::task::spawn_blocking(stop).await?;
            }
        }
        match tokio::time::timeout_at(deadline, http).await {
            Err(_) => Err(AgentError::ShutdownTimeout("http".to_owned(), grace)),
            Ok(joined) => {
                joined?.map_err(AgentError::Http)?;
                info!("agent stopped");
                Ok(())
            }
        }
    });
    Ok(RunningAgent { http_addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsystem_names_are_unique() {
        let names: BTreeSet<&str> = SUBSYSTEMS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), SUBSYSTEMS.len());
    }
}
