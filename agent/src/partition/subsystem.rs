//! The partition subsystem: a reconciler over the devices' MIG control that applies the
//! configured spec at start (idempotent) or finishes an apply an earlier run left pending,
//! takes ApplyPartition commands, and publishes its status to the report, the Node's labels
//! and (through a sweep) the GPU inventory.

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
    let publish = publisher(w, w.sweep_now.clone());
    if let Some(s) = reconciler.status() {
        publish(s);
    }
    w.commands.set_partition(PartitionHandler { applier: reconciler.clone(), publish: publish.clone() });
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

/// How a partition status reaches the world, for MIG and Neuron applies alike: an Event on
/// the Node when it changed, the Node labels of its kind, the report's partition status, and
/// (after MIG changes) a GPU sweep now so new MIG devices reach the snapshot and /metrics.
pub fn publisher(w: &Wiring, sweep_now: Option<Arc<dyn Fn() + Send + Sync>>) -> Arc<dyn Fn(PartitionStatus) + Send + Sync> {
    let (report, labels, events) = (w.report.clone(), w.node_labels.clone(), w.events.clone());
    Arc::new(move |s| {
        if report.borrow().partition.as_ref() != Some(&s) {
            events.post(partition_event(&s));
        }
        labels.send_if_modified(|l| {
            let mut next = l.clone();
            next.extend(s.labels());
            let changed = *l != next;
            *l = next;
            changed
        });
        report.send_if_modified(|rep| {
            let changed = rep.partition.as_ref() != Some(&s);
            rep.partition = Some(s.clone());
            changed
        });
        if let Some(sweep) = &sweep_now {
            sweep();
        }
    })
}

/// The Event a new partition status is worth.
fn partition_event(s: &PartitionStatus) -> NodeEvent {
    use super::reconcile::Phase;
    let (c, what) = (&s.config, s.kind.noun());
    match s.phase {
        Phase::Success => NodeEvent::normal("PartitionApplied", "ApplyPartition", format!("{what} {c:?} applied")),
        Phase::Pending => NodeEvent::normal("PartitionApplying", "ApplyPartition", format!("applying {what} {c:?}")),
        Phase::RebootRequired => {
            NodeEvent::warning("PartitionRebootRequired", "ApplyPartition", format!("{what} {c:?} needs a reboot: {}", s.reason))
        }
        Phase::Failed => NodeEvent::warning("PartitionFailed", "ApplyPartition", format!("{what} {c:?} failed: {}", s.reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::reconcile::{Kind, Phase};

    #[test]
    fn events_name_the_kind_of_partition() {
        let s = |kind, phase, reason: &str| PartitionStatus {
            kind,
            config: "inf2-mixed".into(),
            phase,
            reason: reason.into(),
            gpus: Default::default(),
        };
        let e = partition_event(&s(Kind::Neuron, Phase::Success, ""));
        assert_eq!(e.note, "Neuron core-group config \"inf2-mixed\" applied");
        let e = partition_event(&s(Kind::Neuron, Phase::Failed, "cores 0-1 in use"));
        assert!(e.warning);
        assert_eq!((e.reason, e.note.as_str()), ("PartitionFailed", "Neuron core-group config \"inf2-mixed\" failed: cores 0-1 in use"));
        let e = partition_event(&s(Kind::Mig, Phase::Success, ""));
        assert_eq!(e.note, "MIG config \"inf2-mixed\" applied");
    }
}
