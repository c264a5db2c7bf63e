//! The node's side of Kubernetes: pod attribution through the kubelet's PodResources API
//! (`podres`), and what the agent reads and writes in the Kubernetes API through kube-rs:
//! - `pods`: this node's pods through a watcher on `spec.nodeName` (one LIST, then a watch;
//!   names for per-pod network series, and the pod store later subsystems read);
//! - `labels`: the partition state as labels on the Node, by server-side apply with Hearth's
//!   field manager, so a label Hearth stops meaning is removed;
//! - `events`: Events on the Node (events.k8s.io/v1), de-duplicated into series;
//! - `health`: the `HearthAcceleratorsHealthy` condition and an optional `NoSchedule` taint.
//!
//! It may not decide anything: other subsystems say what they want (labels, events, the
//! report's accelerator health) and this module writes it.

pub mod events;
pub mod health;
mod labels;
pub mod podres;
mod pods;
mod subsystem;

pub use hearth_service::kube::{KubeError, KubeSource, LABEL_VALUE_RULE, is_label_value};
pub use labels::label_loop;
pub use pods::{ServingSink, watch_pods};
pub use subsystem::start;

use std::time::Duration;

/// The field manager of everything the agent applies (labels, the condition).
pub const FIELD_MANAGER: &str = "hearth-agent";

/// How long one API call (not a watch) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Whom a 403 should send the operator to.
const ROLE: &str = "agent's ClusterRole";

/// A pod's identity, as Kubernetes names it and metrics label it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Where the API server is, and what the agent does there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    pub source: KubeSource,
    pub label_node: bool,
    pub pod_names: bool,
    pub events: bool,
    pub health_condition: bool,
    pub health_taint: bool,
}

/// Every Kubernetes API call the agent makes, as RBAC rules (API group, resource, verbs).
/// The chart's ClusterRole is tested against this list, and the API test server refuses
/// any call outside it.
pub const API_RULES: &[(&str, &str, &[&str])] = &[
    // The pod reflector on this node: one LIST, then a watch.
    ("", "pods", &["list", "watch"]),
    // Node labels (server-side apply) and the health taint (read, then a guarded patch).
    ("", "nodes", &["get", "patch"]),
    // The accelerator health condition (server-side apply on the status subresource).
    ("", "nodes/status", &["patch"]),
    // Events on the Node (kube-runtime's recorder creates, then patches a series).
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// The pod driver's calls (`runtimes.driver: pod`), in the one namespace its pods go to: a
/// Role there (the chart's `<release>-agent-runtimes`), not cluster-wide. Its own pods are
/// watched one by one (`fieldSelector=metadata.name=...`), deleted with a UID precondition.
pub const POD_DRIVER_RULES: &[(&str, &str, &[&str])] = &[("", "pods", &["get", "list", "watch", "create", "delete"])];

pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
