//! The kube subsystem: keeps this node's labels in the Kubernetes API equal to what the
//! other subsystems want (partition state), when a Kubernetes API is configured.

use hearth_service::tasks::Tasks;
use tracing::info_span;

use crate::daemon::AgentError;
use crate::subsystem::{Started, Status, Wiring};

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let Some(k) = w.cfg.kubernetes.clone() else {
        return Ok(Started::new(Status::off("kubernetes: not configured and not in a cluster")));
    };
    let results = prometheus_client::metrics::family::Family::default();
    w.registry.register("hearth_node_label_patches", "PATCHes of this node's labels in the Kubernetes API, by result", results.clone());
    let detail = format!("node labels through {}", k.api_server);
    let (node, wanted, stop) = (w.cfg.node_name.clone(), w.node_labels.subscribe(), tasks.cancel_token().clone());
    tasks.spawn(
        "node_labels",
        tracing::Instrument::instrument(super::label_loop(k, node, wanted, results, stop), info_span!("node_labels")),
    );
    Ok(Started::new(Status::enabled(detail)).with_capabilities(&["kube.node-labels"]))
}
