//! The one shape of every agent capability. A subsystem is started from its config section
//! with a [`Wiring`] (the registry, the node report, readiness, the command router and the
//! handles earlier subsystems published) and its own [`Tasks`]; it registers its metrics,
//! contributes its part of the node report, runs its work as tracked tasks under the
//! agent's cancellation token, and says what it is through a typed [`Status`] and the
//! capabilities it adds to Hello. `daemon` lists subsystems in start order; adding one is a
//! module with a `start` function and one line there.
//!
//! Statuses live in the node report (so the controller sees them) and in
//! `hearth_subsystem_status{subsystem,state}`: one series per subsystem and state, bounded
//! by the subsystems this binary has.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hearth_proto::v1 as pb;
use hearth_service::http::{Readiness, TextMetrics};
use hearth_service::tasks::Tasks;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::cache::manager::Cache;
use crate::config::Config;
use crate::daemon::AgentError;
use crate::device::gpu::GpuBackend;
use crate::device::migctl::MigControl;
use crate::partition::reconcile::GpuIdentity;
use crate::report::{CommandDispatcher, NodeReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Enabled,
    /// Running, but part of its job does not work.
    Degraded,
    Off,
}

impl State {
    pub const ALL: [State; 3] = [State::Enabled, State::Degraded, State::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Enabled => "enabled",
            State::Degraded => "degraded",
            State::Off => "off",
        }
    }
}

/// What a subsystem is doing: its state and, in words, what runs or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub detail: String,
}

impl Status {
    pub fn enabled(detail: impl Into<String>) -> Self {
        Self { state: State::Enabled, detail: detail.into() }
    }
    pub fn degraded(reason: impl Into<String>) -> Self {
        Self { state: State::Degraded, detail: reason.into() }
    }
    pub fn off(reason: impl Into<String>) -> Self {
        Self { state: State::Off, detail: reason.into() }
    }

    pub fn to_wire(&self, name: &str) -> pb::SubsystemStatus {
        pb::SubsystemStatus {
            name: name.to_owned(),
            enabled: self.state != State::Off,
            reason: self.detail.clone(),
            state: match self.state {
                State::Enabled => pb::SubsystemState::Enabled,
                State::Degraded => pb::SubsystemState::Degraded,
                State::Off => pb::SubsystemState::Off,
            } as i32,
        }
    }
}

/// A subsystem's own slot in the report; it may change its status while it runs.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    name: &'static str,
    report: watch::Sender<NodeReport>,
}

impl StatusHandle {
    pub fn set(&self, status: Status) {
        self.report.send_if_modified(|r| r.subsystems.insert(self.name, status.clone()).as_ref() != Some(&status));
    }
}

/// What a started subsystem hands back to the daemon.
pub struct Started {
    pub status: Status,
    /// Added to Hello: what the controller may ask of this node.
    pub capabilities: Vec<&'static str>,
    /// Blocking clean-up after the subsystem's tasks ended (a collector thread to join).
    pub on_stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Started {
    pub fn new(status: Status) -> Self {
        Self { status, capabilities: Vec::new(), on_stop: None }
    }
    pub fn with_capabilities(mut self, caps: &[&'static str]) -> Self {
        self.capabilities.extend_from_slice(caps);
        self
    }
    pub fn on_stop(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_stop = Some(Box::new(f));
        self
    }
}

/// The GPU handles the devices subsystem opens for the ones after it.
pub struct Gpus {
    /// Taken by GPU metrics (the collector thread owns it).
    pub backend: Option<Box<dyn GpuBackend>>,
    /// MIG control over the same GPUs, for partitioning.
    pub mig: Arc<dyn MigControl>,
    pub identities: Vec<GpuIdentity>,
}

/// Everything subsystems share while they start, passed down rather than global.
pub struct Wiring {
    pub cfg: Arc<Config>,
    pub registry: Registry,
    pub report: watch::Sender<NodeReport>,
    pub readiness: Arc<Readiness>,
    /// Families rendered by their owner (dcgm-exporter's names), appended to `/metrics`.
    pub text_metrics: Vec<Arc<dyn TextMetrics>>,
    /// Where controller commands go; subsystems add their handlers.
    pub commands: CommandDispatcher,
    /// Every label Hearth wants on its Node object now (the kube subsystem applies the whole
    /// set, so a label left out is removed).
    pub node_labels: watch::Sender<BTreeMap<String, String>>,
    /// This node's pods by UID (the kube subsystem's watcher keeps it; netobs names series).
    pub pods: crate::netobs::pods::PodTable,
    /// This node's model-server pods by UID (the kube subsystem's watcher keeps it; the
    /// runtime subsystem reads them).
    pub serving_pods: watch::Sender<BTreeMap<String, crate::runtime::discover::ServingPod>>,
    /// Events on the Node; dropped when Kubernetes is off.
    pub events: crate::kube::events::NodeEvents,
    /// What the partition reconciler drains runtimes through (filled by the runtime
    /// subsystem, which starts after partitioning).
    pub runtime_drain: crate::runtime::pause::LateDrain,
    /// The queue behind `events`, taken by the kube subsystem's publisher.
    pub events_queue: Option<tokio::sync::mpsc::Receiver<crate::kube::events::NodeEvent>>,
    pub gpus: Option<Gpus>,
    /// Asks the GPU collector for a sweep now (after a partition change).
    pub sweep_now: Option<Arc<dyn Fn() + Send + Sync>>,
    pub cache: Option<Arc<Cache>>,
}

impl Wiring {
    pub fn status_handle(&self, name: &'static str) -> StatusHandle {
        StatusHandle { name, report: self.report.clone() }
    }
}

pub type StartFuture<'a> = Pin<Box<dyn Future<Output = Result<Started, AgentError>> + Send + 'a>>;
/// A subsystem's entry point: its name and how to start it.
pub type StartFn = for<'a> fn(&'a mut Wiring, Tasks) -> StartFuture<'a>;

/// `hearth_subsystem_status`, read from the report at scrape time.
#[derive(Debug)]
pub struct StatusMetrics(pub watch::Receiver<NodeReport>);

impl Collector for StatusMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let subsystems = self.0.borrow().subsystems.clone();
        let mut m = enc.encode_descriptor(
            "hearth_subsystem_status",
            "1 for the state each subsystem is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for (name, s) in &subsystems {
            for state in State::ALL {
                ConstGauge::new(i64::from(s.state == state))
                    .encode(m.encode_family(&[("subsystem", *name), ("state", state.as_str())])?)?;
            }
        }
        let mut info =
            enc.encode_descriptor("hearth_subsystem_info", "What each subsystem runs, or why it is off", None, MetricType::Gauge)?;
        for (name, s) in &subsystems {
            ConstGauge::new(1).encode(info.encode_family(&[("subsystem", *name), ("detail", s.detail.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reaches_the_wire_with_state_and_enabled() {
        let w = Status::degraded("tcp family off: EPERM").to_wire("network");
        assert_eq!((w.enabled, w.state), (true, pb::SubsystemState::Degraded as i32));
        let w = Status::off("devices.backend: none").to_wire("devices");
        assert_eq!((w.enabled, w.reason.as_str()), (false, "devices.backend: none"));
    }

    #[test]
    fn a_handle_changes_only_its_own_slot_and_only_on_change() {
        let (tx, mut rx) = watch::channel(NodeReport::default());
        let a = StatusHandle { name: "a", report: tx.clone() };
        let b = StatusHandle { name: "b", report: tx };
        a.set(Status::enabled("x"));
        b.set(Status::off("y"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        a.set(Status::enabled("x"));
        assert!(!rx.has_changed().unwrap(), "same status is not a change");
        a.set(Status::degraded("z"));
        let r = rx.borrow_and_update();
        assert_eq!(r.subsystems["a"], Status::degraded("z"));
        assert_eq!(r.subsystems["b"], Status::off("y"));
    }

    #[test]
    fn status_metrics_have_one_series_per_state() {
        let (tx, rx) = watch::channel(NodeReport::default());
        StatusHandle { name: "cache", report: tx }.set(Status::enabled("/var/lib/hearth/cache"));
        let mut reg = Registry::default();
        reg.register_collector(Box::new(StatusMetrics(rx)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("hearth_subsystem_status{subsystem=\"cache\",state=\"enabled\"} 1"), "{out}");
        assert!(out.contains("hearth_subsystem_status{subsystem=\"cache\",state=\"off\"} 0"), "{out}");
    }
}
