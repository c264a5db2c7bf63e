//! The runtime subsystem: every `runtimes.interval` it reads each model server on the node
//! (today: the Kubernetes-managed ones the pod watcher finds), at most `CONCURRENCY` at a
//! time, each read bounded by `runtimes.timeout`, and publishes what it found to the report
//! and to `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hearth_service::tasks::Tasks;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::discover::ServingPod;
use super::engine::{EngineSpec, LoadReader};
use super::{RuntimeState, RuntimeStatus, probe};
use crate::daemon::AgentError;
use crate::report::NodeReport;
use crate::subsystem::{Started, Status, Wiring};

/// Servers read at once.
const CONCURRENCY: usize = 16;

/// Settings from `runtimes:`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    /// The pod label that marks a model server (its value is the model); None: no discovery.
    pub discovery_label: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Servers the agent runs itself.
    pub managed: Vec<super::managed::ManagedSpec>,
    /// Command templates for StartRuntime.
    pub engines: BTreeMap<super::engine::Kind, super::commands::EngineTemplate>,
    /// Drain on EC2 spot notices.
    pub spot: Option<super::spot::SpotSettings>,
    pub driver: DriverKind,
}

/// `runtimes.driver`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum DriverKind {
    #[default]
    Process,
    Pod(super::pod::PodSettings),
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            discovery_label: Some("hearth.dev/model".into()),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            managed: Vec::new(),
            engines: BTreeMap::new(),
            spot: None,
            driver: DriverKind::Process,
        }
    }
}

/// The `hearth_runtime_*` families, from the last read of every runtime.
#[derive(Debug, Default, Clone)]
pub struct RuntimeMetrics {
    current: Arc<Mutex<Vec<RuntimeStatus>>>,
    errors: Family<Vec<(String, String)>, Counter>,
}

impl RuntimeMetrics {
    pub fn register(r: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        r.register("hearth_runtime_read_errors", "Failed reads of a model server, by runtime and kind of failure", m.errors.clone());
        r.register_collector(Box::new(m.clone()));
        m
    }

    fn set(&self, v: Vec<RuntimeStatus>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

impl Collector for RuntimeMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut st = enc.encode_descriptor(
            "hearth_runtime_state",
            "1 for the state each model server is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for r in &cur {
            for s in RuntimeState::ALL {
                let labels =
                    [("runtime", r.name.as_str()), ("model", r.model.as_str()), ("engine", r.engine.as_str()), ("state", s.as_str())];
                ConstGauge::new(i64::from(r.state == s)).encode(st.encode_family(&labels)?)?;
            }
        }
        type Pick = fn(&super::engine::Load) -> Option<f64>;
        let gauges: [(&str, &str, Pick); 8] = [
            ("hearth_runtime_requests_running", "Requests the engine is working on", |l| l.running),
            ("hearth_runtime_requests_waiting", "Requests queued in the engine", |l| l.waiting),
            ("hearth_runtime_kv_cache_usage_ratio", "KV-cache in use, 0 to 1", |l| l.kv_usage),
            ("hearth_runtime_ttft_p50_seconds", "Median time to first token over the last read interval", |l| l.ttft_p50),
            ("hearth_runtime_ttft_p90_seconds", "90th percentile time to first token over the last read interval", |l| l.ttft_p90),
            ("hearth_runtime_itl_p50_seconds", "Median time between output tokens over the last read interval", |l| l.itl_p50),
            ("hearth_runtime_prompt_tokens_per_second", "Prompt tokens processed per second over the last read interval", |l| {
                l.prompt_tokens_per_s
            }),
            ("hearth_runtime_generation_tokens_per_second", "Tokens generated per second over the last read interval", |l| {
                l.generation_tokens_per_s
            }),
        ];
        for (name, help, pick) in gauges {
            let mut g = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &cur {
                if let Some(v) = pick(&r.load).filter(|v| v.is_finite()) {
                    let labels = [("runtime", r.name.as_str()), ("model", r.model.as_str()), ("engine", r.engine.as_str())];
                    ConstGauge::new(v).encode(g.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// What the subsystem keeps per runtime between reads.
struct Tracked {
    reader: LoadReader,
    spec: EngineSpec,
    ever_ready: bool,
    last_reason: String,
    timing: Option<super::Timing>,
    /// Read before it was ready: its start can be measured (a server first seen ready, as
    /// after an agent restart, was not watched starting).
    seen_starting: bool,
}

pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let settings = w.cfg.runtimes.clone();
    let metrics = RuntimeMetrics::register(&mut w.registry);
    let restarts = Family::<Vec<(String, String)>, Counter>::default();
    w.registry.register("hearth_runtime_restarts", "Restarts of agent-managed model servers", restarts.clone());
    let mut parts = Vec::new();
    let mut caps = Vec::new();
    let watching = w.cfg.kubernetes.as_ref().is_some_and(|k| k.pod_names);
    if let (Some(label), true) = (&settings.discovery_label, watching) {
        parts.push(format!("pods labelled {label}"));
        caps.push("runtime.read");
    }
    let shared = super::managed::Shared::default();
    // Cancelled to drain every agent-managed runtime at once (a spot notice); shutdown
    // cancels it too.
    let drain_all = tasks.cancel_token().child_token();
    let pauses = Arc::new(super::pause::Pauses::default());
    w.runtime_drain.set(pauses.clone());
    let drivers = match &settings.driver {
        DriverKind::Process => super::managed::Drivers::Process,
        DriverKind::Pod(pod) => {
            // The config check made sure the API is configured.
            let Some(k) = w.cfg.kubernetes.clone() else {
                return Err(AgentError::Runtimes("runtimes.driver: pod needs the Kubernetes API".into()));
            };
            let client = hearth_service::kube::client(&k.source).await.map_err(|e| AgentError::Runtimes(format!("pod driver: {e}")))?;
            let ctx = super::pod::PodContext::new(
                client,
                w.cfg.node_name.clone(),
                pod.clone(),
                w.cache.as_ref().map(|c| c.root().to_path_buf()),
                w.report.subscribe(),
                w.cfg.gpu.pod_resources.dir.clone(),
            );
            parts.push(format!("pods in namespace {}", pod.namespace));
            super::managed::Drivers::Pod(Arc::new(ctx))
        }
    };
    let common = super::managed::Common {
        cache: w.cache.clone(),
        shared: shared.clone(),
        interval: settings.interval,
        timeout: settings.timeout,
        pauses: pauses.clone(),
        events: w.events.clone(),
        drivers,
        state_dir: w.cfg.state_dir.clone(),
        shutdown: tasks.cancel_token().clone(),
        report: w.report.subscribe(),
    };
    for spec in &settings.managed {
        let restarts = restarts.get_or_create(&vec![("runtime".into(), spec.name.clone())]).clone();
        pauses.register(&spec.name, spec.visible_devices.clone(), spec.drain_timeout);
        let sup = super::managed::supervise(&common, spec.clone(), restarts, drain_all.child_token());
        tasks.spawn("supervise", sup.instrument(info_span!("runtime", name = %spec.name)));
    }
    if !settings.managed.is_empty() {
        parts.push(format!("{} agent-managed", settings.managed.len()));
        caps.push(if matches!(settings.driver, DriverKind::Pod(_)) { "runtime.pod" } else { "runtime.process" });
    }
    if !settings.engines.is_empty() {
        let fixed = settings.managed.iter().map(|m| (m.name.clone(), m.visible_devices.clone(), m.port)).collect();
        let rc = super::commands::RuntimeCommands::new(
            settings.engines.clone(),
            common.clone(),
            tasks.clone(),
            restarts.clone(),
            fixed,
            drain_all.clone(),
        );
        // What the controller started before this agent restarted runs on (or is stopped).
        let again = rc.clone();
        tasks.spawn("restore", async move { again.restore().await }.instrument(info_span!("runtimes")));
        w.commands.set_runtimes(rc);
        let kinds: Vec<&str> = settings.engines.keys().map(|k| k.as_str()).collect();
        parts.push(format!("StartRuntime for {}", kinds.join(", ")));
        caps.push("runtime.commands");
    }
    if let Some(spot) = settings.spot.clone().filter(|_| !settings.managed.is_empty() || !settings.engines.is_empty()) {
        parts.push(format!("spot notices from {}", spot.endpoint));
        let (events, stop) = (w.events.clone(), tasks.cancel_token().clone());
        tasks.spawn("spot", super::spot::watch(spot, drain_all.clone(), events, stop).instrument(info_span!("spot")));
    }
    if parts.is_empty() {
        let why = if settings.discovery_label.is_none() {
            "runtimes.discovery_label is empty and runtimes.managed is empty"
        } else {
            "finding model servers needs the Kubernetes pod watch (kubernetes.pod_names), and runtimes.managed is empty"
        };
        return Ok(Started::new(Status::off(why)));
    }
    let pods = w.serving_pods.subscribe();
    let (report, stop) = (w.report.clone(), tasks.cancel_token().clone());
    tasks.spawn("read", run(settings.clone(), pods, shared, report, metrics, stop).instrument(info_span!("runtimes")));
    Ok(Started::new(Status::enabled(format!("{}, read every {:?}", parts.join(" and "), settings.interval))).with_capabilities(&caps))
}

async fn run(
    settings: RuntimeSettings,
    mut pods: watch::Receiver<BTreeMap<String, ServingPod>>,
    managed: super::managed::Shared,
    report: watch::Sender<NodeReport>,
    metrics: RuntimeMetrics,
    stop: CancellationToken,
) {
    let client = probe::client();
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Closed when nothing watches pods (discovery off): the ticks still publish managed ones.
    let mut pods_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            // A new or changed pod is read at once rather than at the next tick.
            r = pods.changed(), if pods_open => if r.is_err() { pods_open = false },
        }
        let current: Vec<ServingPod> = pods.borrow_and_update().values().cloned().collect();
        tracked.retain(|uid, _| current.iter().any(|p| &p.uid == uid));
        let mut jobs = Vec::new();
        for p in current {
            let t = tracked.remove(&p.uid).unwrap_or_else(|| {
                let spec = EngineSpec::builtin(p.engine);
                Tracked {
                    reader: LoadReader::new(spec.names.clone()),
                    spec,
                    ever_ready: false,
                    last_reason: String::new(),
                    timing: None,
                    seen_starting: false,
                }
            });
            jobs.push(read_one(&client, p, t, settings.timeout));
        }
        // Read together, a bounded number at a time: one hung server costs one timeout for
        // the round, not one per server.
        let results: Vec<_> = futures::stream::iter(jobs).buffer_unordered(CONCURRENCY).collect().await;
        let mut statuses = Vec::new();
        {
            for (uid, status, t, err) in results {
                if let Some(kind) = err {
                    metrics.errors.get_or_create(&vec![("runtime".into(), status.name.clone()), ("kind".into(), kind.into())]).inc();
                }
                if status.reason != t.last_reason {
                    match status.state {
                        RuntimeState::Ready => info!(runtime = %status.name, model = %status.model, "model server ready"),
                        _ => {
                            warn!(runtime = %status.name, state = status.state.as_str(), reason = %status.reason, "model server not ready")
                        }
                    }
                }
                let mut t = t;
                t.last_reason = status.reason.clone();
                tracked.insert(uid, t);
                statuses.push(status);
            }
        }
        statuses.extend(managed.lock().unwrap_or_else(|p| p.into_inner()).values().cloned());
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        metrics.set(statuses.clone());
        report.send_if_modified(|r| {
            let changed = r.runtimes != statuses;
            r.runtimes = statuses;
            changed
        });
    }
}

async fn read_one(
    client: &probe::HttpClient,
    p: ServingPod,
    mut t: Tracked,
    timeout: Duration,
) -> (String, RuntimeStatus, Tracked, Option<&'static str>) {
    let mut status = RuntimeStatus {
        name: p.runtime_name(),
        engine: p.engine,
        model: p.model.clone(),
        partition_uuid: String::new(),
        state: RuntimeState::Starting,
        reason: String::new(),
        load: Default::default(),
        managed_by: "kubernetes",
        timing: t.timing,
    };
    let Some(ip) = p.ip.clone() else {
        status.reason = "the pod has no IP yet".into();
        return (p.uid, status, t, None);
    };
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
    let reading = probe::read(client, &t.spec, &host, p.port, p.metrics_port, &mut t.reader, timeout).await;
    let mut err = reading.metrics_error.as_ref().map(probe::ProbeError::kind);
    if let Some(l) = reading.load {
        status.load = l;
    }
    if reading.ready.is_err() && !t.ever_ready {
        t.seen_starting = true;
    }
    (status.state, status.reason) = match (&reading.live, &reading.ready) {
        _ if p.terminating => (RuntimeState::Draining, "the pod is being deleted".into()),
        (Err(e), _) => {
            err = Some(e.kind());
            (if t.ever_ready { RuntimeState::Failed } else { RuntimeState::Starting }, e.to_string())
        }
        (Ok(()), Err(why)) => (if t.ever_ready { RuntimeState::Failed } else { RuntimeState::Starting }, why.clone()),
        (Ok(()), Ok(())) => {
            if !t.ever_ready
                && t.seen_starting
                && let Some(started) = p.container_started
            {
                // The first ready read after the container started: the engine's start time
                // (to within one read interval).
                let engine = k8s_openapi::jiff::Timestamp::now().duration_since(started).as_secs_f64().max(0.0);
                t.timing = Some(super::Timing { image: p.image_seconds.unwrap_or(0.0), weights: 0.0, engine });
                status.timing = t.timing;
            }
            t.ever_ready = true;
            (RuntimeState::Ready, String::new())
        }
    };
    if let Some(problem) = &p.problem {
        status.reason = if status.reason.is_empty() { problem.clone() } else { format!("{}; {problem}", status.reason) };
    }
    (p.uid, status, t, err)
}
