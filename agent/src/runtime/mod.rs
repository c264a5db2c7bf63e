//! Model servers on this node: what they serve, whether they are ready, and their load, read
//! from each engine's own endpoints and reported to the controller, whose scaler and
//! placement run on those numbers.
//!
//! - `engine`: per-engine endpoints, readiness rules and load metric names (vLLM, SGLang,
//!   TGI, Triton, custom), pinned by fixture tests of each engine's `/metrics`;
//! - `promtext`: the exposition-format reader;
//! - `discover`: Kubernetes-managed servers, pods carrying the model label, found through
//!   the kube subsystem's pod watcher;
//! - `managed`: agent-managed servers, started on pinned cached weights, supervised,
//!   drained, adopted again by a restarted agent, through a `driver`: a process of the
//!   agent's, or a Pod bound to the node (`pod`);
//! - `probe`: one read of one server (live, ready, metrics) with a deadline;
//! - `subsystem`: reads every server each interval, publishes `RuntimeStatus` to the report
//!   and `hearth_runtime_*` to `/metrics`.
//!
//! It never starts, stops or signals a Kubernetes-managed server: those belong to whatever
//! created the pod.

pub mod cli;
pub mod commands;
pub mod discover;
pub mod driver;
pub mod engine;
pub mod isolate;
pub mod managed;
pub mod pause;
pub mod pod;
pub mod probe;
pub mod promtext;
pub mod sample_server;
pub mod spot;
mod subsystem;

pub use subsystem::{DriverKind, RuntimeMetrics, RuntimeSettings, start};

use hearth_proto::v1 as pb;

/// Where a runtime is in its life, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuntimeState {
    Starting,
    Ready,
    Draining,
    Failed,
    /// An agent-managed server that keeps exiting; restarts are spaced out.
    CrashLoop,
}

impl RuntimeState {
    pub const ALL: [RuntimeState; 5] = [Self::Starting, Self::Ready, Self::Draining, Self::Failed, Self::CrashLoop];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Failed => "failed",
            Self::CrashLoop => "crash-loop",
        }
    }
}

/// One runtime as the agent last read it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeStatus {
    /// `namespace/pod` for Kubernetes-managed servers.
    pub name: String,
    pub engine: engine::Kind,
    pub model: String,
    pub partition_uuid: String,
    pub state: RuntimeState,
    /// Why it is not ready (empty when it is).
    pub reason: String,
    pub load: engine::Load,
    pub managed_by: &'static str,
    /// Measured start to ready, once it was ready.
    pub timing: Option<Timing>,
}

/// Where the time from start to ready went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timing {
    pub image: f64,
    pub weights: f64,
    pub engine: f64,
}

impl RuntimeStatus {
    pub fn to_wire(&self) -> pb::ServingRuntime {
        let l = &self.load;
        let z = |v: Option<f64>| v.filter(|v| v.is_finite()).unwrap_or(0.0);
        pb::ServingRuntime {
            name: self.name.clone(),
            kind: self.engine.as_str().to_owned(),
            model_id: self.model.clone(),
            partition_uuid: self.partition_uuid.clone(),
            state: self.state.as_str().to_owned(),
            load: Some(pb::RuntimeLoad {
                requests_waiting: z(l.waiting),
                requests_running: z(l.running),
                kv_cache_usage_ratio: z(l.kv_usage),
                ttft_p50_seconds: z(l.ttft_p50),
                ttft_p90_seconds: z(l.ttft_p90),
                itl_p50_seconds: z(l.itl_p50),
                prompt_tokens_per_second: z(l.prompt_tokens_per_s),
                generation_tokens_per_second: z(l.generation_tokens_per_s),
            }),
            managed_by: self.managed_by.to_owned(),
            reason: self.reason.clone(),
            image_seconds: self.timing.map_or(0.0, |t| t.image),
            weights_seconds: self.timing.map_or(0.0, |t| t.weights),
            start_seconds: self.timing.map_or(0.0, |t| t.engine),
        }
    }
}
