//! The node subsystem: static facts into the report at start, then a sample every
//! `node.collect_interval` on the blocking pool, into the report and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use hearth_service::http::Readiness;
use hearth_service::tasks::Tasks;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{NodeMetrics, NodeReader, NodeSample};
use crate::daemon::AgentError;
use crate::report::NodeReport;
use crate::subsystem::{Started, Status, Wiring};

/// Readiness waits for the first sample: until then `/metrics` has no node facts.
const READY: &str = "node";

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let cfg = w.cfg.clone();
    let reader = NodeReader::new(&cfg.procfs_root, &cfg.cache.config.root, cfg.exclude_interfaces.clone());
    let info = {
        let r = reader.clone();
        tokio::task::spawn_blocking(move || r.info()).await??
    };
    w.report.send_modify(|r| {
        r.info = Some(info);
        r.labels = cfg.labels.clone();
    });
    let metrics = NodeMetrics::register(&mut w.registry);
    w.readiness.set(READY, Some("first sample pending".into()));
    let stop = tasks.cancel_token().clone();
    tasks.spawn("sampler", sample_loop(reader, cfg.collect_interval, metrics, w.report.clone(), w.readiness.clone(), stop));
    Ok(Started::new(Status::enabled(format!("procfs at {}", cfg.procfs_root.display()))).with_capabilities(&["node-metrics"]))
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
                readiness.set(READY, None);
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
