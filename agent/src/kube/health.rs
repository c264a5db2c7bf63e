//! Accelerator health on the Node. The GPU collector classifies what it reads (XIDs, row
//! remapping, reachability) by the rules table in `device::gpu` into each accelerator's
//! health in the report; this task turns that into:
//! - the `HearthAcceleratorsHealthy` condition (server-side apply on `nodes/status`): False
//!   with the first unhealthy accelerator's reason while any is unhealthy, True otherwise;
//! - with `kubernetes.health.taint`, the `hearth.dev/accelerators-unhealthy:NoSchedule`
//!   taint while the condition is False (a merge patch guarded by resourceVersion, since the
//!   taint list is one atomic field shared with the kubelet and other controllers);
//! - Events on every accelerator's health change (warnings for degraded and unhealthy).
//!
//! Recovery is a restart of the agent after the GPU was reset or the node rebooted: the
//! collector's memory of fatal XIDs starts empty, the condition turns True again and the
//! taint is removed. The report's accelerator health is what placement reads to avoid the
//! device.

use std::collections::BTreeMap;
use std::time::Duration;

use hearth_service::kube::{KubeError, api_error, within};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::events::{NodeEvent, NodeEvents};
use super::labels::WriteResults;
use super::{CALL_TIMEOUT, FIELD_MANAGER, ROLE};
use crate::device::Health;
use crate::device::gpu::reason_code;
use crate::report::NodeReport;

pub const CONDITION: &str = "HearthAcceleratorsHealthy";
pub const TAINT_KEY: &str = "hearth.dev/accelerators-unhealthy";

/// What the node says about its accelerators as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub reason: String,
    pub message: String,
}

/// Each accelerator's health, by UUID, with a name for people.
fn accelerators(r: &NodeReport) -> BTreeMap<String, (String, Health, String)> {
    r.accelerators
        .iter()
        .map(|a| (a.uuid.clone(), (format!("{} {} ({})", a.vendor.device_word(), a.index, a.uuid), a.health, a.health_reason.clone())))
        .collect()
}

/// The condition for this set of accelerators.
pub fn verdict(r: &NodeReport) -> Verdict {
    let bad: Vec<_> = accelerators(r).into_values().filter(|(_, h, _)| *h == Health::Unhealthy).collect();
    match bad.first() {
        None => Verdict {
            healthy: true,
            reason: "AcceleratorsHealthy".into(),
            message: format!("{} accelerator(s), none unhealthy", r.accelerators.len()),
        },
        Some((_, _, why)) => {
            let code = reason_code(why);
            let reason = if code.is_empty() || code.contains(' ') { "AcceleratorUnhealthy" } else { code };
            let mut message = bad.iter().map(|(name, _, why)| format!("{name}: {why}")).collect::<Vec<_>>().join("; ");
            if message.len() > 1000 {
                let mut cut = 997;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push_str("...");
            }
            Verdict { healthy: false, reason: reason.to_owned(), message }
        }
    }
}

/// Events for what changed between two reports' accelerator health.
pub fn transitions(before: &NodeReport, after: &NodeReport) -> Vec<NodeEvent> {
    let (old, new) = (accelerators(before), accelerators(after));
    let mut out = Vec::new();
    for (uuid, (name, h, why)) in &new {
        let prev = old.get(uuid).map(|(_, h, w)| (*h, w.as_str()));
        if prev == Some((*h, why.as_str())) || (prev.is_none() && *h == Health::Healthy) {
            continue;
        }
        out.push(match h {
            Health::Unhealthy => NodeEvent::warning("AcceleratorUnhealthy", "HealthCheck", format!("{name}: {why}")),
            Health::Degraded => NodeEvent::warning("AcceleratorDegraded", "HealthCheck", format!("{name}: {why}")),
            Health::Healthy => NodeEvent::normal("AcceleratorHealthy", "HealthCheck", format!("{name} is healthy again")),
        });
    }
    out
}

/// Applies the condition (this field manager owns only its own entry of the list).
async fn apply_condition(client: &kube::Client, node: &str, v: &Verdict, since: &str) -> Result<(), KubeError> {
    let what = format!("apply condition {CONDITION} to node {node}");
    let now = jiff_now();
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node },
        "status": { "conditions": [{
            "type": CONDITION,
            "status": if v.healthy { "True" } else { "False" },
            "reason": v.reason,
            "message": v.message,
            "lastTransitionTime": since,
            "lastHeartbeatTime": now,
        }]},
    });
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    within(&what, CALL_TIMEOUT, async {
        api.patch_status(node, &pp, &Patch::Apply(&body)).await.map(drop).map_err(|e| api_error(&what, "patch", "nodes/status", ROLE, e))
    })
    .await
}

/// Puts the taint on (`Some(reason)`) or takes it off (`None`), keeping every other taint.
/// The patch carries the resourceVersion read, so a concurrent change (the kubelet's own
/// taints) makes it fail with 409 and it is re-read and tried again.
async fn set_taint(client: &kube::Client, node: &str, reason: Option<&str>) -> Result<(), KubeError> {
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    for _ in 0..5 {
        let what = format!("get node {node}");
        let n = within(&what, CALL_TIMEOUT, async { api.get(node).await.map_err(|e| api_error(&what, "get", "nodes", ROLE, e)) }).await?;
        let mut taints: Vec<Taint> = n.spec.and_then(|s| s.taints).unwrap_or_default();
        let had = taints.iter().position(|t| t.key == TAINT_KEY);
        match (had, reason) {
            (None, None) => return Ok(()),
            (Some(i), Some(r)) if taints[i].value.as_deref() == Some(r) && taints[i].effect == "NoSchedule" => return Ok(()),
            _ => {}
        }
        taints.retain(|t| t.key != TAINT_KEY);
        if let Some(r) = reason {
            taints.push(Taint { key: TAINT_KEY.into(), value: Some(r.into()), effect: "NoSchedule".into(), time_added: None });
        }
        let body = serde_json::json!({
            "metadata": { "resourceVersion": n.metadata.resource_version },
            "spec": { "taints": taints },
        });
        let what = format!("{} taint {TAINT_KEY} on node {node}", if reason.is_some() { "set" } else { "remove" });
        let r = within(&what, CALL_TIMEOUT, async {
            api.patch(node, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .map(drop)
                .map_err(|e| api_error(&what, "patch", "nodes", ROLE, e))
        })
        .await;
        match r {
            Err(e) if e.is_conflict() => continue,
            other => return other,
        }
    }
    Err(KubeError::Api {
        what: format!("taint node {node}"),
        reason: "the Node kept changing (5 conflicts in a row)".into(),
        code: Some(409),
    })
}

fn jiff_now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Settings of the health task.
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    pub condition: bool,
    pub taint: bool,
}

/// Follows the report until `shutdown`: posts an Event per accelerator health change and
/// keeps the condition and taint equal to the verdict, retrying with backoff while the API
/// server refuses or is away.
pub async fn health_loop(
    client: kube::Client,
    node: String,
    settings: HealthSettings,
    mut report: watch::Receiver<NodeReport>,
    events: NodeEvents,
    results: WriteResults,
    shutdown: CancellationToken,
) {
    let mut before = NodeReport::default();
    let mut written: Option<Verdict> = None;
    let mut since = jiff_now();
    let mut backoff = hearth_service::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failing = false;
    loop {
        let now = report.borrow_and_update().clone();
        for e in transitions(&before, &now) {
            events.post(e);
        }
        let v = verdict(&now);
        before = now;
        if written.as_ref() != Some(&v) {
            if written.as_ref().is_some_and(|w| w.healthy != v.healthy) {
                since = jiff_now();
            }
            let mut result = Ok(());
            if settings.condition {
                result = apply_condition(&client, &node, &v, &since).await;
            }
            if result.is_ok() && settings.taint {
                result = set_taint(&client, &node, (!v.healthy).then_some(v.reason.as_str())).await;
            }
            match result {
                Ok(()) => {
                    results.get_or_create(&[("result", "ok")]).inc();
                    if failing || written.as_ref().is_some_and(|w| w.healthy != v.healthy) || !v.healthy {
                        info!(node, healthy = v.healthy, reason = %v.reason, "accelerator health written to the Node");
                    }
                    failing = false;
                    backoff.reset();
                    written = Some(v);
                }
                Err(e) => {
                    results.get_or_create(&[("result", "error")]).inc();
                    if !failing {
                        warn!(node, error = %e, "cannot write accelerator health to the Node; retrying");
                    }
                    failing = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = report.changed() => if r.is_err() { return },
        }
    }
}
