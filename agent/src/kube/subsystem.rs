//! The kube subsystem: when a Kubernetes API is configured (or the agent runs in a
//! cluster), watches this node's pods, keeps Hearth's labels on the Node, publishes Events,
//! and writes accelerator health to the Node, each as its own task and each behind its own
//! switch in `kubernetes:`.

use hearth_service::tasks::Tasks;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{Instrument, info_span};

use crate::daemon::AgentError;
use crate::subsystem::{Started, Status, Wiring};

type ByResult = Family<[(&'static str, &'static str); 1], Counter>;

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let Some(k) = w.cfg.kubernetes.clone() else {
        return Ok(Started::new(Status::off("kubernetes: not configured and not in a cluster")));
    };
    let client = match hearth_service::kube::client(&k.source).await {
        Ok(c) => c,
        Err(e) => return Ok(Started::new(Status::off(e.to_string()))),
    };
    let node = w.cfg.node_name.clone();
    let stop = tasks.cancel_token().clone();
    let mut parts = Vec::new();
    let mut caps = Vec::new();
    if k.pod_names {
        let events = super::pods::WatchEvents::default();
        w.registry.register("hearth_kube_pod_watch_events", "Events of the watch on this node's pods, by kind", events.clone());
        let serving = w.cfg.runtimes.discovery_label.clone().map(|label| super::ServingSink { label, pods: w.serving_pods.clone() });
        let f = super::watch_pods(client.clone(), node.clone(), w.pods.clone(), serving, events, stop.clone());
        tasks.spawn("pod_watch", f.instrument(info_span!("pod_watch", node)));
        parts.push("pods");
    }
    if k.label_node {
        let results = ByResult::default();
        w.registry.register("hearth_node_label_writes", "Server-side applies of this node's labels, by result", results.clone());
        let f = super::label_loop(client.clone(), node.clone(), w.node_labels.subscribe(), results, stop.clone());
        tasks.spawn("node_labels", f.instrument(info_span!("node_labels", node)));
        parts.push("labels");
        caps.push("kube.node-labels");
    }
    if let Some(queue) = w.events_queue.take().filter(|_| k.events) {
        let results = ByResult::default();
        w.registry.register("hearth_node_events", "Events posted on this node, by result", results.clone());
        w.registry.register("hearth_node_events_dropped", "Events dropped because the queue was full", w.events.dropped());
        let f = super::events::publish(client.clone(), node.clone(), queue, results, stop.clone());
        tasks.spawn("node_events", f.instrument(info_span!("node_events", node)));
        parts.push("events");
    }
    if k.health_condition || k.health_taint {
        let results = ByResult::default();
        w.registry.register("hearth_node_health_writes", "Writes of accelerator health to the Node, by result", results.clone());
        let settings = super::health::HealthSettings { condition: k.health_condition, taint: k.health_taint };
        let f = super::health::health_loop(client, node.clone(), settings, w.report.subscribe(), w.events.clone(), results, stop);
        tasks.spawn("node_health", f.instrument(info_span!("node_health", node)));
        parts.push(if k.health_taint { "health condition and taint" } else { "health condition" });
    }
    let detail = format!("{} through {}", if parts.is_empty() { "nothing".to_owned() } else { parts.join(", ") }, k.source);
    Ok(Started::new(Status::enabled(detail)).with_capabilities(&caps))
}
