//! The partition state as labels on the Node, by server-side apply with Hearth's field
//! manager. Each apply carries every label Hearth means now; the API server removes the
//! ones this manager set before and left out (a partition config taken out of the agent's
//! config takes its labels with it), and never touches labels other managers own.

use std::collections::BTreeMap;
use std::time::Duration;

use hearth_service::kube::{KubeError, api_error, within};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{CALL_TIMEOUT, FIELD_MANAGER, ROLE};

/// Writes by result: `ok`, `error`, `refused` (a permanent refusal, not retried).
pub type WriteResults = Family<[(&'static str, &'static str); 1], Counter>;

/// Applies `labels` as the whole set Hearth owns on the Node.
pub async fn apply_node_labels(client: &kube::Client, node: &str, labels: &BTreeMap<String, String>) -> Result<(), KubeError> {
    for (k, v) in labels {
        if !super::is_label_value(v) {
            return Err(KubeError::Api {
                what: format!("label {k}={v:?}"),
                reason: format!("expected {}", super::LABEL_VALUE_RULE),
                code: Some(422),
            });
        }
    }
    let what = format!("apply labels to node {node}");
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node, "labels": labels },
    });
    // force: Hearth is the only writer of its own labels; a label another manager set under
    // the same key (a hand-run kubectl label) is taken over rather than failing forever.
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    within(&what, CALL_TIMEOUT, async {
        api.patch(node, &pp, &Patch::Apply(&body)).await.map(drop).map_err(|e| api_error(&what, "patch", "nodes", ROLE, e))
    })
    .await
}

/// Keeps the Node's Hearth labels equal to the latest wanted set: applies once at start
/// (which removes labels an earlier run set and this one no longer means) and on every
/// change; retries with jittered backoff (1 s doubling to 60 s) while the API server is
/// away or busy, and waits for the next change after a refusal that retrying cannot fix
/// (403, 422). Logs once per run of failures. Runs until `shutdown`.
pub async fn label_loop(
    client: kube::Client,
    node: String,
    mut wanted: watch::Receiver<BTreeMap<String, String>>,
    results: WriteResults,
    shutdown: CancellationToken,
) {
    let mut backoff = hearth_service::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failing = false;
    loop {
        let labels = wanted.borrow_and_update().clone();
        match apply_node_labels(&client, &node, &labels).await {
            Ok(()) => {
                results.get_or_create(&[("result", "ok")]).inc();
                if failing {
                    info!(node, "node labels written again");
                }
                failing = false;
                backoff.reset();
            }
            Err(e) if e.is_permanent() => {
                results.get_or_create(&[("result", "refused")]).inc();
                warn!(node, error = %e, "the API server refused the node labels; waiting for the next change");
                failing = true;
            }
            Err(e) => {
                results.get_or_create(&[("result", "error")]).inc();
                if !failing {
                    warn!(node, error = %e, "cannot label the Kubernetes node; retrying (the snapshot still carries the state)");
                }
                failing = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    // A newer set is worth trying at once.
                    r = wanted.changed() => if r.is_err() { return },
                }
                continue;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = wanted.changed() => if r.is_err() { return },
        }
    }
}
