//! The partition subsystem: a reconciler over the devices' MIG control that applies the
//! configured spec at start (idempotent) or finishes an apply an earlier run left pending,
//! takes ApplyPartition commands, and publishes its status to the report, the Node's labels
//! and (through a sweep) the GPU inventory.

use std::collections::BTreeMap;
use std::sync::Arc;

use hearth_service::tasks::Tasks;
use tracing::warn;

use super::reconcile::{PartitionStatus, Reconciler};
use crate::daemon::AgentError;
use crate::kube::events::NodeEvent;
use crate::report::PartitionHandler;
use crate::subsystem::{Started, Status, Wiring};

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let Some(gpus) = &w.gpus else {
        return Ok(Started::new(Status::off("no GPUs to partition")));
    };
    let (mig, ids) = (gpus.mig.clone(), gpus.identities.clone());
    let state_dir = w.cfg.state_dir.clone();
    let drain = w.runtime_drain.clone();
    // Opening reads (and may repair) the durable record of the last apply.
    let reconciler = match tokio::task::spawn_blocking(move || Reconciler::new(mig, Arc::new(drain), ids, &state_dir)).await? {
        Ok(r) => Arc::new(r),
        Err(e) => {
            warn!(error = %e, "MIG partitioning off");
            return Ok(Started::new(Status::off(e.to_string())));
        }
    };
    let (report, labels, sweep_now, events) = (w.report.clone(), w.node_labels.clone(), w.sweep_now.clone(), w.events.clone());
    let publish: Arc<dyn Fn(PartitionStatus) + Send + Sync> = Arc::new(move |s| {
        if report.borrow().partition.as_ref() != Some(&s) {
            events.post(partition_event(&s));
        }
        labels.send_if_modified(|l| {
            let next: BTreeMap<String, String> = s.labels().into_iter().collect();
            let changed = *l != next;
            *l = next;
            changed
        });
        report.send_if_modified(|rep| {
            let changed = rep.partition.as_ref() != Some(&s);
            rep.partition = Some(s.clone());
            changed
        });
        // New MIG devices reach the snapshot and /metrics with the next sweep: now.
        if let Some(sweep) = &sweep_now {
            sweep();
        }
    });
    if let Some(s) = reconciler.status() {
        publish(s);
    }
    w.commands.set_partition(PartitionHandler { reconciler: reconciler.clone(), publish: publish.clone() });
    // At start: apply the configured spec (idempotent), or finish an apply that an earlier
    // run left pending. Shutdown waits for it, so an apply records its outcome.
    let wanted = w.cfg.partition.clone();
    tasks.spawn_blocking("apply_at_start", move || {
        let result = match &wanted {
            Some((spec, config)) => reconciler.apply(spec, config).map(Some),
            None => reconciler.resume(),
        };
        match result {
            Ok(Some(s)) => publish(s),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "partition apply refused");
                if let Some(s) = reconciler.status() {
                    publish(s);
                }
            }
        }
    });
    Ok(Started::new(Status::enabled("mig")).with_capabilities(&["partition.mig"]))
}

/// The Event a new partition status is worth.
fn partition_event(s: &PartitionStatus) -> NodeEvent {
    use super::reconcile::Phase;
    let c = &s.config;
    match s.phase {
        Phase::Success => NodeEvent::normal("PartitionApplied", "ApplyPartition", format!("MIG config {c:?} applied")),
        Phase::Pending => NodeEvent::normal("PartitionApplying", "ApplyPartition", format!("applying MIG config {c:?}")),
        Phase::RebootRequired => {
            NodeEvent::warning("PartitionRebootRequired", "ApplyPartition", format!("MIG config {c:?} needs a reboot: {}", s.reason))
        }
        Phase::Failed => NodeEvent::warning("PartitionFailed", "ApplyPartition", format!("MIG config {c:?} failed: {}", s.reason)),
    }
}
