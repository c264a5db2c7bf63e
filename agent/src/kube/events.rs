//! Events on the Node (events.k8s.io/v1), so `kubectl describe node` and event exporters
//! show what Hearth did to the node and what it saw: partition applies, cache failures,
//! accelerator health changes. Subsystems post through [`NodeEvents`] without waiting; one
//! task publishes through kube-runtime's recorder, which folds repeats of one event into a
//! series (one object, a count) instead of an object per occurrence.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Events waiting for the publisher; beyond this they are dropped (and counted) rather than
/// slowing the subsystem that posts them.
const QUEUE: usize = 256;

/// One thing to tell the cluster about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub warning: bool,
    /// PascalCase, what happened: `PartitionApplied`, `AcceleratorUnhealthy`.
    pub reason: &'static str,
    /// PascalCase, what Hearth was doing: `ApplyPartition`, `Download`, `HealthCheck`.
    pub action: &'static str,
    /// For people; at most 1 kB is kept.
    pub note: String,
}

impl NodeEvent {
    pub fn normal(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        Self { warning: false, reason, action, note: note.into() }
    }
    pub fn warning(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        Self { warning: true, reason, action, note: note.into() }
    }
}

/// Where subsystems post events. Cheap to clone; posting never waits.
#[derive(Debug, Clone)]
pub struct NodeEvents {
    tx: mpsc::Sender<NodeEvent>,
    dropped: Counter,
}

impl NodeEvents {
    pub fn channel() -> (Self, mpsc::Receiver<NodeEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx, dropped: Counter::default() }, rx)
    }

    /// Queues `e`; when nobody publishes (Kubernetes off) or the queue is full it is dropped.
    pub fn post(&self, e: NodeEvent) {
        match self.tx.try_send(e) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e)) => {
                self.dropped.inc();
                debug!(reason = e.reason, "event queue full; event dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }
}

/// The Node as an event's `regarding`. The kubelet uses the node name as the UID in its own
/// Node events; so do we, so `kubectl describe node` lists both.
pub fn node_reference(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        uid: Some(node.into()),
        ..Default::default()
    }
}

/// Publishes queued events until `shutdown`. A failed publish is logged (once per run of
/// failures) and counted; the event is not retried: events are best effort by design.
pub async fn publish(
    client: kube::Client,
    node: String,
    mut queue: mpsc::Receiver<NodeEvent>,
    results: Family<[(&'static str, &'static str); 1], Counter>,
    shutdown: CancellationToken,
) {
    let reporter = Reporter { controller: "hearth.dev/agent".into(), instance: Some(format!("hearth-agent-{node}")) };
    let recorder = Recorder::new(client, reporter);
    let regarding = node_reference(&node);
    let mut failing = false;
    loop {
        let e = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = queue.recv() => match e { Some(e) => e, None => return },
        };
        let mut note = e.note;
        if note.len() > 1024 {
            let mut cut = 1021;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let ev = Event {
            type_: if e.warning { EventType::Warning } else { EventType::Normal },
            reason: e.reason.into(),
            note: Some(note),
            action: e.action.into(),
            secondary: None,
        };
        let what = format!("post event {} on node {node}", e.reason);
        let r = hearth_service::kube::within(&what, super::CALL_TIMEOUT, async {
            recorder
                .publish(&ev, &regarding)
                .await
                .map_err(|err| hearth_service::kube::api_error(&what, "create", "events.k8s.io events", super::ROLE, err))
        })
        .await;
        match r {
            Ok(()) => {
                results.get_or_create(&[("result", "ok")]).inc();
                failing = false;
            }
            Err(err) => {
                results.get_or_create(&[("result", "error")]).inc();
                if !failing {
                    warn!(error = %err, "cannot post an event on the Node; events are dropped until it works");
                }
                failing = true;
            }
        }
    }
}
