//! The cache subsystem: opens the model cache (the start-up scan runs on the blocking
//! pool), warms the configured models, copies the index into the report, and takes
//! Prefetch, Evict and Pin commands.

use std::sync::Arc;
use std::time::Duration;

use hearth_service::tasks::Tasks;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};

use super::manager::Cache;
use super::spec::ModelSpec;
use crate::daemon::AgentError;
use crate::kube::events::{NodeEvent, NodeEvents};
use crate::report::NodeReport;
use crate::subsystem::{Started, Status, Wiring};

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let cfg = w.cfg.cache.config.clone();
    // The registry goes to the blocking thread with the scan and comes back with the cache.
    let mut registry = std::mem::take(&mut w.registry);
    let download_tasks = tasks.clone();
    let (opened, registry) = tokio::task::spawn_blocking(move || {
        let opened = Cache::open_in(cfg, &mut registry, download_tasks).map(|c| (c.entries(), c.source_bandwidth(), c));
        (opened, registry)
    })
    .await?;
    w.registry = registry;
    let (models, bandwidth, cache) = opened?;
    w.report.send_modify(|r| {
        r.models = models;
        r.bandwidth = bandwidth;
    });
    let stop = tasks.cancel_token().clone();
    // Warm-up downloads belong to this subsystem's tasks, so shutdown waits for their
    // journals to be written.
    tasks.spawn(
        "warm",
        tracing::Instrument::instrument(
            warm_models(cache.clone(), w.cfg.cache.models.clone(), w.events.clone(), stop.clone()),
            info_span!("warm"),
        ),
    );
    tasks.spawn("report", report_loop(cache.clone(), w.report.clone(), stop));
    w.commands.set_cache(cache.clone());
    let detail = cache.root().display().to_string();
    w.cache = Some(cache);
    Ok(Started::new(Status::enabled(detail)).with_capabilities(&["cache", "cache.s3", "cache.posix"]))
}

/// Downloads the configured models, one at a time so the first is usable soonest.
async fn warm_models(cache: Arc<Cache>, models: Vec<(ModelSpec, bool)>, events: NodeEvents, shutdown: CancellationToken) {
    for (spec, pin) in models {
        if shutdown.is_cancelled() {
            return;
        }
        let id = spec.id();
        // Pinned first, so the model is never reported ready but unpinned.
        if pin {
            let (c, i) = (cache.clone(), id.clone());
            match tokio::task::spawn_blocking(move || c.pin_configured(&i)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!(model = %id, error = %err, "could not pin"),
                Err(err) => warn!(model = %id, error = %err, "pin task failed"),
            }
        }
        match cache.ensure(&spec, shutdown.child_token()).await {
            Ok(e) => info!(model = %id, uri = %spec.uri, verification = e.verification_label(), "model warm"),
            Err(err) if shutdown.is_cancelled() => {
                info!(model = %id, reason = %err, "warm-up stopped for shutdown");
                return;
            }
            Err(err) => {
                warn!(model = %id, uri = %spec.uri, error = %err, "could not warm model");
                events.post(NodeEvent::warning("ModelCacheFailed", "Download", format!("{}: {err}", spec.uri)));
            }
        }
    }
}

/// Copies the cache index into the node report on every change, and every second while a
/// download runs so the controller sees progress.
async fn report_loop(cache: Arc<Cache>, report: watch::Sender<NodeReport>, shutdown: CancellationToken) {
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
