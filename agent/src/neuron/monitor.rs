//! neuron-monitor's JSON reports, and the exporter that serves their metrics the way AWS's
//! `neuron-monitor-prometheus.py` does, so Neuron dashboards, the CloudWatch agent and
//! OTel's container-insights receiver read Hearth unchanged.
//!
//! Owns: parsing one report (one JSON document per line), the exporter state fed from
//! successive reports, and its text rendering. It does not run neuron-monitor, read sysfs or
//! call the kubelet: the caller feeds it lines and a pod map built from PodResources.
//!
//! Parsing is tolerant of what real neuron-monitor versions emit: any group may be missing,
//! unknown keys are ignored, latencies may be `null`, per-core FLOPS come as `flops` (the
//! user guide) or `effective_flops` (2025+ output), `neuron_runtime_data` may be `[]`, `null`
//! or absent. A group whose own `error` is non-empty, or a runtime entry with an `error`, is
//! kept only as that error and its data is never read. Anything else of the wrong shape fails
//! the whole line with the path of the group that was wrong.
//!
//! Rendering follows the 2.17-era script (the newest public copy) and prometheus_client:
//! - the families, types, HELP texts and label names of the script, every series carrying
//!   the six instance labels fixed from the first report, runtime groups adding
//!   `runtime_tag`; labels sorted by name in each series; values printed as the Python client
//!   prints floats (`0.0`, `2977.0`, `1.00752896e+08`, and its `e+010` for eleven-digit
//!   integers);
//! - counters add each report's value (neuron-monitor reports counts per period); each counter
//!   family is followed by its `<base>_created` gauge, as prometheus_client writes it;
//! - a report without runtime data clears every series, system ones included, and the system
//!   groups of that same report set them again (so `hardware_ecc_events_total` restarts from
//!   that report's values, as the script's does);
//! - not in the 2.17 script but in tools 2.25 ("removed metrics for defunct processes"): the
//!   series of a runtime missing from a report are dropped. Without it a node that restarts
//!   untagged runtimes (tag = PID) and is never idle would grow series without bound.
//!
//! Series that differ from the script: families with no series are left out (the script
//! prints bare HELP/TYPE lines for families it registered earlier), and series within a
//! family come in label order, not creation order. No query can tell.
//!
//! Cardinality: per runtime alive on the node × its NeuronCores (at most 128 logical cores on
//! trn2.48xlarge) × the fixed label values of each family, plus per device × 4 ECC kinds.
//!
//! Pod labels: `neuroncore_*` series of a core held by a container (through
//! `aws.amazon.com/neuroncore`, or its whole device through `aws.amazon.com/neuron` or the
//! legacy `aws.amazon.com/neurondevice`) also carry `container`, `namespace` and `pod`, the
//! names our dcgm-exporter families use (`gpu_metrics::render`), so one dashboard variable
//! filters GPU and Neuron series alike. AWS's exporter added `pod_name`/`container_name`
//! in Neuron 2.23 on series we could not confirm; we do not guess at them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use hearth_proto::podresources::ListPodResourcesResponse;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, IgnoredAny};
use serde_json::{Map, Value};

use crate::gpu_metrics::render::escape;
use crate::kube::PodRef;
use crate::kube::podres::ContainerRef;

// ---------------------------------------------------------------------------------------------
// The report

/// One neuron-monitor report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// `neuron_runtime_data`: empty when no Neuron application runs (`[]`, `null` or absent).
    pub runtimes: Vec<Runtime>,
    pub system: SystemData,
    pub instance_info: Option<InstanceInfo>,
    pub hardware_info: Option<HardwareInfo>,
}

/// One Neuron application (runtime) as neuron-monitor saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Runtime {
    pub pid: Option<i64>,
    /// `neuron_runtime_tag`: `NEURON_PROCESS_TAG`, or the PID as a string when unset (and the
    /// PID here too when a report leaves the tag out).
    pub tag: String,
    /// Non-empty when neuron-monitor could not read this application: its groups are then
    /// not parsed and stay `None`.
    pub error: String,
    pub neuroncore_counters: Option<Group<NeuroncoreCounters>>,
    pub execution_stats: Option<Group<ExecutionStats>>,
    pub memory_used: Option<Group<MemoryUsed>>,
    pub vcpu_usage: Option<Group<RuntimeVcpuUsage>>,
}

/// A metric group: its data, or the `error` neuron-monitor put in it instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Group<T> {
    Data(T),
    Failed(String),
}

impl<T> Group<T> {
    pub fn data(&self) -> Option<&T> {
        match self {
            Group::Data(t) => Some(t),
            Group::Failed(_) => None,
        }
    }
}

/// `system_data`: the groups enabled in neuron-monitor's config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemData {
    pub neuron_hw_counters: Option<Group<NeuronHwCounters>>,
    pub vcpu_usage: Option<Group<SystemVcpuUsage>>,
    pub memory_info: Option<Group<MemoryInfo>>,
}

/// `neuroncore_counters`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NeuroncoreCounters {
    /// Per global (logical) NeuronCore index; the JSON keys are decimal strings.
    #[serde(default, deserialize_with = "null_as_default")]
    pub neuroncores_in_use: BTreeMap<u32, CoreCounters>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CoreCounters {
    /// Percent, 0..100.
    pub neuroncore_utilization: Option<f64>,
    pub flops: Option<f64>,
    pub effective_flops: Option<f64>,
}

impl CoreCounters {
    /// FLOP/s under whichever key this neuron-monitor version writes.
    pub fn flops(&self) -> Option<f64> {
        self.effective_flops.or(self.flops)
    }
}

/// `execution_stats`: counts for the report's period, and latency percentiles.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ExecutionStats {
    pub error_summary: Option<ErrorSummary>,
    pub execution_summary: Option<ExecutionSummary>,
    pub latency_stats: Option<LatencyStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ErrorSummary {
    pub generic: Option<f64>,
    pub numerical: Option<f64>,
    pub transient: Option<f64>,
    pub model: Option<f64>,
    pub runtime: Option<f64>,
    pub hardware: Option<f64>,
}

impl ErrorSummary {
    /// (`error_type` label value, count) in the JSON's order.
    pub fn entries(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("generic", self.generic),
            ("numerical", self.numerical),
            ("transient", self.transient),
            ("model", self.model),
            ("runtime", self.runtime),
            ("hardware", self.hardware),
        ]
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ExecutionSummary {
    pub completed: Option<f64>,
    pub completed_with_err: Option<f64>,
    pub completed_with_num_err: Option<f64>,
    pub timed_out: Option<f64>,
    pub incorrect_input: Option<f64>,
    pub failed_to_queue: Option<f64>,
}

impl ExecutionSummary {
    /// (`status_type` label value, count).
    pub fn entries(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("completed", self.completed),
            ("completed_with_err", self.completed_with_err),
            ("completed_with_num_err", self.completed_with_num_err),
            ("timed_out", self.timed_out),
            ("incorrect_input", self.incorrect_input),
            ("failed_to_queue", self.failed_to_queue),
        ]
    }
}

/// Each side is `null` when nothing ran in the period.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LatencyStats {
    pub total_latency: Option<Percentiles>,
    pub device_latency: Option<Percentiles>,
}

/// Seconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Percentiles {
    pub p0: Option<f64>,
    pub p1: Option<f64>,
    pub p25: Option<f64>,
    pub p50: Option<f64>,
    pub p75: Option<f64>,
    pub p99: Option<f64>,
    pub p100: Option<f64>,
}

impl Percentiles {
    /// (`percentile` label value, seconds).
    pub fn entries(&self) -> [(&'static str, Option<f64>); 7] {
        [("p0", self.p0), ("p1", self.p1), ("p25", self.p25), ("p50", self.p50), ("p75", self.p75), ("p99", self.p99), ("p100", self.p100)]
    }
}

/// `memory_used` (its `loaded_models` list is not exported and not read).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MemoryUsed {
    pub neuron_runtime_used_bytes: Option<RuntimeUsedBytes>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuntimeUsedBytes {
    pub host: Option<f64>,
    pub neuron_device: Option<f64>,
    pub usage_breakdown: Option<UsageBreakdown>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct UsageBreakdown {
    #[serde(default, deserialize_with = "null_as_default")]
    pub neuroncore_memory_usage: BTreeMap<u32, CoreMemory>,
}

/// Bytes of one NeuronCore's device memory by use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CoreMemory {
    pub constants: Option<f64>,
    pub model_code: Option<f64>,
    pub model_shared_scratchpad: Option<f64>,
    pub runtime_memory: Option<f64>,
    pub tensors: Option<f64>,
}

/// `neuron_runtime_vcpu_usage`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuntimeVcpuUsage {
    pub vcpu_usage: Option<UserSystem>,
}

/// Percent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct UserSystem {
    pub user: Option<f64>,
    pub system: Option<f64>,
}

/// `neuron_hw_counters`: an array with the device index in each entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NeuronHwCounters {
    #[serde(default, deserialize_with = "null_as_default")]
    pub neuron_devices: Vec<DeviceCounters>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DeviceCounters {
    pub neuron_device_index: u32,
    pub mem_ecc_corrected: Option<f64>,
    pub mem_ecc_uncorrected: Option<f64>,
    pub sram_ecc_corrected: Option<f64>,
    pub sram_ecc_uncorrected: Option<f64>,
}

impl DeviceCounters {
    /// (`event_type` label value, count).
    pub fn entries(&self) -> [(&'static str, Option<f64>); 4] {
        [
            ("mem_ecc_corrected", self.mem_ecc_corrected),
            ("mem_ecc_uncorrected", self.mem_ecc_uncorrected),
            ("sram_ecc_corrected", self.sram_ecc_corrected),
            ("sram_ecc_uncorrected", self.sram_ecc_uncorrected),
        ]
    }
}

/// `system_data.vcpu_usage`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SystemVcpuUsage {
    pub average_usage: Option<CpuUsage>,
    /// Per vCPU; only the count is exported.
    pub usage_data: Option<HashMap<String, IgnoredAny>>,
    pub context_switch_count: Option<f64>,
}

/// Percent of time per state.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CpuUsage {
    pub user: Option<f64>,
    pub nice: Option<f64>,
    pub system: Option<f64>,
    pub idle: Option<f64>,
    pub io_wait: Option<f64>,
    pub irq: Option<f64>,
    pub soft_irq: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MemoryInfo {
    pub memory_total_bytes: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub swap_total_bytes: Option<f64>,
    pub swap_used_bytes: Option<f64>,
}

/// EC2 facts neuron-monitor read from IMDS; fields it could not read are empty.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct InstanceInfo {
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_availability_zone: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_availability_zone_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_region: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ami_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub subnet_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub error: String,
}

/// Older tools write only the two counts and `error`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HardwareInfo {
    pub neuron_device_type: Option<String>,
    pub neuron_device_version: Option<String>,
    pub neuroncore_version: Option<String>,
    pub neuron_device_count: Option<u32>,
    pub neuron_device_memory_size: Option<u64>,
    /// Logical cores per device under the current LNC setting.
    pub neuroncore_per_device_count: Option<u32>,
    pub logical_neuroncore_config: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub error: String,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("neuron-monitor report: empty line")]
    Empty,
    #[error("neuron-monitor report is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("neuron-monitor report: expected a JSON object, got {found}")]
    NotAnObject { found: &'static str },
    #[error("neuron-monitor report: {path}: {reason}")]
    Shape { path: String, reason: String },
}

impl MonitorError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            MonitorError::Empty => "empty",
            MonitorError::NotJson(_) => "json",
            MonitorError::NotAnObject { .. } => "not_object",
            MonitorError::Shape { .. } => "shape",
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shape(path: impl Into<String>, reason: impl Into<String>) -> MonitorError {
    MonitorError::Shape { path: path.into(), reason: reason.into() }
}

/// A string field that may be `null` or absent (both read as empty).
fn string_field<'a>(o: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, MonitorError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(shape(format!("{at}.{key}"), format!("expected a string, got {}", kind(other)))),
    }
}

/// Group `key` of `parent`: absent or `null` is `None`; an `error` keeps the data unread.
fn group<T: DeserializeOwned>(parent: &Map<String, Value>, key: &str, at: &str) -> Result<Option<Group<T>>, MonitorError> {
    let path = || format!("{at}.{key}");
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(o)) => {
            let error = string_field(o, "error", &path())?;
            if !error.is_empty() {
                return Ok(Some(Group::Failed(error.to_owned())));
            }
            T::deserialize(v).map(|t| Some(Group::Data(t))).map_err(|e| shape(path(), e.to_string()))
        }
        Some(other) => Err(shape(path(), format!("expected an object, got {}", kind(other)))),
    }
}

fn section<'a>(top: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Map<String, Value>>, MonitorError> {
    match top.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(shape(key, format!("expected an object, got {}", kind(other)))),
    }
}

fn runtime(v: &Value, i: usize) -> Result<Runtime, MonitorError> {
    let at = format!("neuron_runtime_data[{i}]");
    let Value::Object(o) = v else {
        return Err(shape(at, format!("expected an object, got {}", kind(v))));
    };
    let pid = o.get("pid").and_then(Value::as_i64);
    let tag = match o.get("neuron_runtime_tag") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => pid.map(|p| p.to_string()).unwrap_or_default(),
        Some(other) => return Err(shape(format!("{at}.neuron_runtime_tag"), format!("expected a string, got {}", kind(other)))),
    };
    let error = string_field(o, "error", &at)?.to_owned();
    let mut rt = Runtime { pid, tag, error, ..Runtime::default() };
    if !rt.error.is_empty() {
        return Ok(rt);
    }
    let at = format!("{at}.report");
    let report = match o.get("report") {
        None | Some(Value::Null) => return Ok(rt),
        Some(Value::Object(r)) => r,
        Some(other) => return Err(shape(at, format!("expected an object, got {}", kind(other)))),
    };
    rt.neuroncore_counters = group(report, "neuroncore_counters", &at)?;
    rt.execution_stats = group(report, "execution_stats", &at)?;
    rt.memory_used = group(report, "memory_used", &at)?;
    rt.vcpu_usage = group(report, "neuron_runtime_vcpu_usage", &at)?;
    Ok(rt)
}

/// Parses one line of neuron-monitor's output. Never panics.
pub fn parse_line(line: &str) -> Result<Report, MonitorError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(MonitorError::Empty);
    }
    let doc: Value = serde_json::from_str(line).map_err(MonitorError::NotJson)?;
    let Value::Object(top) = &doc else {
        return Err(MonitorError::NotAnObject { found: kind(&doc) });
    };
    let runtimes = match top.get("neuron_runtime_data") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().enumerate().map(|(i, v)| runtime(v, i)).collect::<Result<_, _>>()?,
        Some(other) => return Err(shape("neuron_runtime_data", format!("expected an array, got {}", kind(other)))),
    };
    let mut system = SystemData::default();
    if let Some(s) = section(top, "system_data")? {
        system.neuron_hw_counters = group(s, "neuron_hw_counters", "system_data")?;
        system.vcpu_usage = group(s, "vcpu_usage", "system_data")?;
        system.memory_info = group(s, "memory_info", "system_data")?;
    }
    let instance_info = match section(top, "instance_info")? {
        Some(_) => Some(InstanceInfo::deserialize(&top["instance_info"]).map_err(|e| shape("instance_info", e.to_string()))?),
        None => None,
    };
    let hardware_info = match section(top, "neuron_hardware_info")? {
        Some(_) => Some(HardwareInfo::deserialize(&top["neuron_hardware_info"]).map_err(|e| shape("neuron_hardware_info", e.to_string()))?),
        None => None,
    };
    Ok(Report { runtimes, system, instance_info, hardware_info })
}

// ---------------------------------------------------------------------------------------------
// Pods

/// PodResources resource names of the Neuron device plugin.
pub const RESOURCE_NEURONCORE: &str = "aws.amazon.com/neuroncore";
pub const RESOURCE_NEURON: &str = "aws.amazon.com/neuron";
/// What older device plugins call whole devices.
pub const RESOURCE_NEURONDEVICE: &str = "aws.amazon.com/neurondevice";

/// (resource name, device id) -> the container holding it. Device ids are decimal indices:
/// global core index for `aws.amazon.com/neuroncore`, device index for the other two.
pub type NeuronPods = HashMap<(String, String), ContainerRef>;

/// The Neuron part of a PodResources `List`. A core or device is held by one container
/// (the runtime owns cores exclusively); should two claim one, the first listed wins.
pub fn neuron_pods(resp: &ListPodResourcesResponse) -> NeuronPods {
    let mut m = NeuronPods::new();
    for pod in &resp.pod_resources {
        for c in &pod.containers {
            for d in &c.devices {
                if ![RESOURCE_NEURONCORE, RESOURCE_NEURON, RESOURCE_NEURONDEVICE].contains(&d.resource_name.as_str()) {
                    continue;
                }
                for id in &d.device_ids {
                    m.entry((d.resource_name.clone(), id.clone())).or_insert_with(|| ContainerRef {
                        pod: PodRef { namespace: pod.namespace.clone(), name: pod.name.clone() },
                        container: c.name.clone(),
                    });
                }
            }
        }
    }
    m
}

/// The pod map indexed for the scrape path.
#[derive(Debug, Default)]
struct PodIndex {
    cores: HashMap<u32, ContainerRef>,
    devices: HashMap<u32, ContainerRef>,
}

impl PodIndex {
    fn new(pods: NeuronPods) -> Self {
        let mut ix = Self::default();
        for ((resource, id), c) in pods {
            // Ids that are not indices can match no series.
            let Ok(n) = id.parse::<u32>() else { continue };
            match resource.as_str() {
                RESOURCE_NEURONCORE => ix.cores.insert(n, c),
                RESOURCE_NEURON | RESOURCE_NEURONDEVICE => ix.devices.insert(n, c),
                _ => None,
            };
        }
        ix
    }

    fn holder(&self, core: u32, cores_per_device: Option<u32>) -> Option<&ContainerRef> {
        self.cores.get(&core).or_else(|| cores_per_device.filter(|k| *k > 0).and_then(|k| self.devices.get(&(core / k))))
    }
}

// ---------------------------------------------------------------------------------------------
// The exporter

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fam {
    CoreUtilization,
    RuntimeVcpu,
    RuntimeMemory,
    CoreConstants,
    CoreModelCode,
    CoreScratchpad,
    CoreRuntimeMemory,
    CoreTensors,
    ExecErrors,
    ExecStatus,
    ExecLatency,
    HwEcc,
    SysVcpuCount,
    SysVcpuUsage,
    SysMemTotal,
    SysMemUsed,
    SysSwapTotal,
    SysSwapUsed,
}

impl Fam {
    /// Families whose series name a NeuronCore, and so may carry pod labels.
    fn per_core(self) -> bool {
        matches!(
            self,
            Fam::CoreUtilization
                | Fam::CoreConstants
                | Fam::CoreModelCode
                | Fam::CoreScratchpad
                | Fam::CoreRuntimeMemory
                | Fam::CoreTensors
        )
    }
}

/// The script's families in its table order: (family, name, type, HELP).
const FAMILIES: &[(Fam, &str, Kind, &str)] = &[
    (Fam::CoreUtilization, "neuroncore_utilization_ratio", Kind::Gauge, "NeuronCore utilization ratio"),
    (Fam::RuntimeVcpu, "neuron_runtime_vcpu_usage_ratio", Kind::Gauge, "Runtime vCPU utilization ratio"),
    (Fam::RuntimeMemory, "neuron_runtime_memory_used_bytes", Kind::Gauge, "Runtime memory used bytes"),
    (Fam::CoreConstants, "neuroncore_memory_usage_constants", Kind::Gauge, "NeuronCore memory utilization for constants"),
    (Fam::CoreModelCode, "neuroncore_memory_usage_model_code", Kind::Gauge, "NeuronCore memory utilization for model_code"),
    (
        Fam::CoreScratchpad,
        "neuroncore_memory_usage_model_shared_scratchpad",
        Kind::Gauge,
        "NeuronCore memory utilization for model_shared_scratchpad",
    ),
    (Fam::CoreRuntimeMemory, "neuroncore_memory_usage_runtime_memory", Kind::Gauge, "NeuronCore memory utilization for runtime_memory"),
    (Fam::CoreTensors, "neuroncore_memory_usage_tensors", Kind::Gauge, "NeuronCore memory utilization for tensors"),
    (Fam::ExecErrors, "execution_errors_total", Kind::Counter, "Execution errors total"),
    (Fam::ExecStatus, "execution_status_total", Kind::Counter, "Execution status total"),
    (Fam::ExecLatency, "execution_latency_seconds", Kind::Gauge, "Execution latency in seconds"),
    (Fam::HwEcc, "hardware_ecc_events_total", Kind::Counter, "Hardware ecc events total"),
    (Fam::SysVcpuCount, "system_vcpu_count", Kind::Gauge, "System vCPU count"),
    (Fam::SysVcpuUsage, "system_vcpu_usage_ratio", Kind::Gauge, "System CPU utilization ratio"),
    (Fam::SysMemTotal, "system_memory_total_bytes", Kind::Gauge, "System memory total_bytes bytes"),
    (Fam::SysMemUsed, "system_memory_used_bytes", Kind::Gauge, "System memory used_bytes bytes"),
    (Fam::SysSwapTotal, "system_swap_total_bytes", Kind::Gauge, "System swap total_bytes bytes"),
    (Fam::SysSwapUsed, "system_swap_used_bytes", Kind::Gauge, "System swap used_bytes bytes"),
];

/// The script's two Info metrics: (base name, HELP); exposed as `<base>_info`.
const INSTANCE_INFO: (&str, &str) = ("instance", "EC2 instance information");
const HARDWARE_INFO: (&str, &str) = ("neuron_hardware", "Neuron Hardware Information");

/// Label names of the instance labels, in sorted order; values in `State::instance`.
const INSTANCE_LABELS: [&str; 6] = ["availability_zone", "instance_id", "instance_name", "instance_type", "region", "subnet_id"];

/// Every family name this module can emit (text format), for pin tests and documentation.
pub fn family_names() -> Vec<String> {
    let mut v = Vec::new();
    for (_, name, kind, _) in FAMILIES {
        v.push((*name).to_owned());
        if *kind == Kind::Counter {
            v.push(format!("{}_created", name.trim_end_matches("_total")));
        }
    }
    v.extend([INSTANCE_INFO.0, HARDWARE_INFO.0].map(|b| format!("{b}_info")));
    v
}

/// A series' own labels (instance labels are added when rendering).
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    value: f64,
    /// Unix seconds when the series appeared (rendered for counters only).
    created: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hardware {
    devices: u32,
    cores_per_device: u32,
}

#[derive(Debug, Default)]
struct State {
    /// Fixed by the first report carrying `instance_info`, as the script does.
    instance: Option<[String; 6]>,
    /// Fixed by the first report with a usable `neuron_hardware_info`.
    hardware: Option<Hardware>,
    series: BTreeMap<Fam, BTreeMap<Labels, Sample>>,
    /// Per device: (mem_ecc_uncorrected, sram_ecc_uncorrected) summed over all reports.
    health: BTreeMap<u32, (u64, u64)>,
    hardware_errors: u64,
    skipped: BTreeMap<&'static str, u64>,
    /// The runtimes of the latest report and the NeuronCores each holds: (tag, pid, cores),
    /// cores None for a runtime neuron-monitor could not read.
    in_use: Vec<(String, Option<i64>, Option<BTreeSet<u32>>)>,
}

impl State {
    fn note(&mut self, what: &'static str) {
        *self.skipped.entry(what).or_default() += 1;
    }

    fn take<'a, T>(&mut self, name: &'static str, g: &'a Option<Group<T>>) -> Option<&'a T> {
        match g {
            Some(Group::Data(t)) => Some(t),
            Some(Group::Failed(_)) => {
                self.note(name);
                None
            }
            None => None,
        }
    }

    fn set(&mut self, fam: Fam, labels: Labels, value: Option<f64>, now: f64) {
        if let Some(value) = value {
            self.series.entry(fam).or_default().insert(labels, Sample { value, created: now });
        }
    }

    fn inc(&mut self, fam: Fam, labels: Labels, by: Option<f64>, now: f64) {
        let Some(by) = by else { return };
        // prometheus_client refuses these (and the script would die on them).
        if !(by.is_finite() && by >= 0.0) {
            self.note("invalid_counter_value");
            return;
        }
        self.series.entry(fam).or_default().entry(labels).or_insert(Sample { value: 0.0, created: now }).value += by;
    }

    fn runtime(&mut self, rt: &Runtime, now: f64) {
        let tag = || ("runtime_tag", rt.tag.clone());
        if let Some(c) = self.take("neuroncore_counters", &rt.neuroncore_counters) {
            for (core, cc) in &c.neuroncores_in_use {
                let v = cc.neuroncore_utilization.map(|u| u / 100.0);
                self.set(Fam::CoreUtilization, vec![("neuroncore", core.to_string()), tag()], v, now);
            }
        }
        if let Some(v) = self.take("neuron_runtime_vcpu_usage", &rt.vcpu_usage).and_then(|v| v.vcpu_usage.as_ref()) {
            for (kind, pct) in [("user", v.user), ("system", v.system)] {
                self.set(Fam::RuntimeVcpu, vec![tag(), ("usage_type", kind.to_owned())], pct.map(|p| p / 100.0), now);
            }
        }
        if let Some(m) = self.take("memory_used", &rt.memory_used).and_then(|m| m.neuron_runtime_used_bytes.as_ref()) {
            for (loc, bytes) in [("host", m.host), ("neuron_device", m.neuron_device)] {
                self.set(Fam::RuntimeMemory, vec![("memory_location", loc.to_owned()), tag()], bytes, now);
            }
            for (core, cm) in m.usage_breakdown.iter().flat_map(|b| &b.neuroncore_memory_usage) {
                for (fam, bytes) in [
                    (Fam::CoreConstants, cm.constants),
                    (Fam::CoreModelCode, cm.model_code),
                    (Fam::CoreScratchpad, cm.model_shared_scratchpad),
                    (Fam::CoreRuntimeMemory, cm.runtime_memory),
                    (Fam::CoreTensors, cm.tensors),
                ] {
                    // The script passes Python's None as the location; the client prints "None".
                    let labels = vec![("memory_location", "None".to_owned()), ("neuroncore", core.to_string()), tag()];
                    self.set(fam, labels, bytes, now);
                }
            }
        }
        if let Some(x) = self.take("execution_stats", &rt.execution_stats) {
            if let Some(e) = &x.error_summary {
                for (kind, n) in e.entries() {
                    self.inc(Fam::ExecErrors, vec![("error_type", kind.to_owned()), tag()], n, now);
                }
                if let Some(n) = e.hardware.filter(|n| n.is_finite() && *n >= 0.0) {
                    self.hardware_errors = self.hardware_errors.saturating_add(n as u64);
                }
            }
            for (kind, n) in x.execution_summary.iter().flat_map(ExecutionSummary::entries) {
                self.inc(Fam::ExecStatus, vec![tag(), ("status_type", kind.to_owned())], n, now);
            }
            // Device latency is not exported by the script.
            let total = x.latency_stats.as_ref().and_then(|l| l.total_latency.as_ref());
            for (p, secs) in total.iter().flat_map(|t| t.entries()) {
                self.set(Fam::ExecLatency, vec![("percentile", p.to_owned()), tag()], secs, now);
            }
        }
    }

    fn system(&mut self, s: &SystemData, now: f64) {
        if let Some(hw) = self.take("neuron_hw_counters", &s.neuron_hw_counters) {
            for d in &hw.neuron_devices {
                for (event, n) in d.entries() {
                    let labels = vec![("event_type", event.to_owned()), ("neuron_device_index", d.neuron_device_index.to_string())];
                    self.inc(Fam::HwEcc, labels, n, now);
                }
                let count = |v: Option<f64>| v.filter(|n| n.is_finite() && *n >= 0.0).map_or(0, |n| n as u64);
                let h = self.health.entry(d.neuron_device_index).or_default();
                h.0 = h.0.saturating_add(count(d.mem_ecc_uncorrected));
                h.1 = h.1.saturating_add(count(d.sram_ecc_uncorrected));
            }
        }
        if let Some(v) = self.take("vcpu_usage", &s.vcpu_usage) {
            self.set(Fam::SysVcpuCount, Vec::new(), v.usage_data.as_ref().map(|d| d.len() as f64), now);
            if let Some(a) = &v.average_usage {
                let f = |x: Option<f64>| x.unwrap_or(0.0);
                // The script's sums, in its order; min() caps rounding past 100 %.
                let user = (f(a.user) + f(a.nice)).min(100.0) / 100.0;
                let system = (f(a.system) + f(a.io_wait) + f(a.irq) + f(a.soft_irq)).min(100.0) / 100.0;
                self.set(Fam::SysVcpuUsage, vec![("usage_type", "user".to_owned())], Some(user), now);
                self.set(Fam::SysVcpuUsage, vec![("usage_type", "system".to_owned())], Some(system), now);
            }
        }
        if let Some(m) = self.take("memory_info", &s.memory_info) {
            self.set(Fam::SysMemTotal, Vec::new(), m.memory_total_bytes, now);
            self.set(Fam::SysMemUsed, Vec::new(), m.memory_used_bytes, now);
            self.set(Fam::SysSwapTotal, Vec::new(), m.swap_total_bytes, now);
            self.set(Fam::SysSwapUsed, Vec::new(), m.swap_used_bytes, now);
        }
    }

    fn render(&self, pods: &PodIndex, openmetrics: bool, out: &mut String) {
        let blank: [String; 6] = Default::default();
        let values = self.instance.as_ref().unwrap_or(&blank);
        let mut inst: Vec<(&str, &str)> = INSTANCE_LABELS.iter().copied().zip(values.iter().map(String::as_str)).collect();
        let cores_per_device = self.hardware.map(|h| h.cores_per_device);
        for (fam, name, kind, help) in FAMILIES {
            let Some(series) = self.series.get(fam).filter(|s| !s.is_empty()) else { continue };
            let holder = |labels: &Labels| {
                if !fam.per_core() {
                    return None;
                }
                let core = labels.iter().find(|(k, _)| *k == "neuroncore")?.1.parse::<u32>().ok()?;
                pods.holder(core, cores_per_device)
            };
            match kind {
                Kind::Gauge => {
                    header(out, name, help, "gauge");
                    for (labels, s) in series {
                        sample(out, name, &inst, labels, holder(labels), s.value);
                    }
                }
                Kind::Counter => {
                    let base = name.trim_end_matches("_total");
                    let created = format!("{base}_created");
                    if openmetrics {
                        // One family, `_created` beside each `_total`.
                        header(out, base, help, "counter");
                        for (labels, s) in series {
                            sample(out, name, &inst, labels, None, s.value);
                            sample(out, &created, &inst, labels, None, s.created);
                        }
                    } else {
                        // prometheus_client's text format: the counter, then a gauge family.
                        header(out, name, help, "counter");
                        for (labels, s) in series {
                            sample(out, name, &inst, labels, None, s.value);
                        }
                        header(out, &created, help, "gauge");
                        for (labels, s) in series {
                            sample(out, &created, &inst, labels, None, s.created);
                        }
                    }
                }
            }
        }
        if self.instance.is_some() {
            info(out, INSTANCE_INFO, &inst, openmetrics);
        }
        if let Some(h) = self.hardware {
            let (d, c) = (h.devices.to_string(), h.cores_per_device.to_string());
            inst.extend([("neuron_device_count", d.as_str()), ("neuroncore_per_device_count", c.as_str())]);
            info(out, HARDWARE_INFO, &inst, openmetrics);
        }
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn info(out: &mut String, (base, help): (&str, &str), labels: &[(&str, &str)], openmetrics: bool) {
    let name = format!("{base}_info");
    if openmetrics {
        header(out, base, help, "info");
    } else {
        header(out, &name, help, "gauge");
    }
    sample(out, &name, labels, &[], None, 1.0);
}

/// One sample line, labels sorted by name as prometheus_client writes them.
fn sample(out: &mut String, name: &str, instance: &[(&str, &str)], own: &[(&'static str, String)], pod: Option<&ContainerRef>, v: f64) {
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(instance.len() + own.len() + 3);
    all.extend_from_slice(instance);
    all.extend(own.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some(p) = pod {
        all.extend([("container", p.container.as_str()), ("namespace", p.pod.namespace.as_str()), ("pod", p.pod.name.as_str())]);
    }
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push_str(name);
    out.push('{');
    for (i, (k, v)) in all.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape(v, out);
        out.push('"');
    }
    out.push_str("} ");
    format_value(v, out);
    out.push('\n');
}

/// Python's `repr(float)`: the shortest digits that read back to `v`, positional from 1e-4 up
/// to 1e16, scientific with a two-digit exponent outside that.
fn py_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.to_owned();
    }
    // `{:e}` finds how many digits the shortest round-trip form needs; printing that many
    // again with a precision rounds the exact value half-to-even, which picks Python's digits
    // where two candidates of that length are equally near (`{:e}` may pick the other one).
    let shortest = format!("{:e}", v.abs());
    let len = shortest.split_once('e').map_or(1, |(m, _)| m.chars().filter(char::is_ascii_digit).count());
    let sci = format!("{:.*e}", len.saturating_sub(1), v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = digits.len() as i32;
    let point = exp + 1;
    let mut s = String::with_capacity(26);
    if v < 0.0 {
        s.push('-');
    }
    if point > -4 && point <= 16 {
        if point <= 0 {
            s.push_str("0.");
            s.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
            s.push_str(&digits);
        } else if point >= n {
            s.push_str(&digits);
            s.extend(std::iter::repeat_n('0', (point - n) as usize));
            s.push_str(".0");
        } else {
            let (a, b) = digits.split_at(point as usize);
            let _ = write!(s, "{a}.{b}");
        }
    } else {
        let (a, b) = digits.split_at(1);
        s.push_str(a);
        if !b.is_empty() {
            s.push('.');
            s.push_str(b);
        }
        let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs());
    }
    s
}

/// A value as prometheus_client prints it: `repr`, except that positive numbers with seven
/// or more integer digits move to an exponent written `e+0<n>` (so `e+06`, but `e+010` from
/// ten on: the client pads with a literal zero).
fn format_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        return;
    }
    let s = py_repr(v);
    match s.find('.') {
        Some(dot) if v > 0.0 && dot > 6 => {
            let mantissa = format!("{}.{}{}", &s[..1], &s[1..dot], &s[dot + 1..]);
            let _ = write!(out, "{}e+0{}", mantissa.trim_end_matches(['0', '.']), dot - 1);
        }
        _ => out.push_str(&s),
    }
}

/// The NeuronCores a runtime entry shows it holds.
fn cores_held(rt: &Runtime) -> BTreeSet<u32> {
    let mut cores = BTreeSet::new();
    if let Some(Group::Data(c)) = &rt.neuroncore_counters {
        cores.extend(c.neuroncores_in_use.keys());
    }
    if let Some(b) =
        rt.memory_used.as_ref().and_then(Group::data).and_then(|m| m.neuron_runtime_used_bytes.as_ref()?.usage_breakdown.as_ref())
    {
        cores.extend(b.neuroncore_memory_usage.keys());
    }
    cores
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The exporter: fed reports by the neuron-monitor reader, rendered by `/metrics`, given pod
/// attribution by the PodResources refresher. A scrape holds the state lock only while it
/// formats (a few hundred series).
pub struct NeuronExporter {
    state: Mutex<State>,
    pods: Mutex<Arc<PodIndex>>,
    clock: fn() -> f64,
}

impl std::fmt::Debug for NeuronExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuronExporter").finish_non_exhaustive()
    }
}

impl Default for NeuronExporter {
    fn default() -> Self {
        Self::new()
    }
}

impl NeuronExporter {
    pub fn new() -> Self {
        Self::with_clock(now_unix)
    }

    /// With `clock` (unix seconds) stamping new counters' `_created`, for tests.
    pub fn with_clock(clock: fn() -> f64) -> Self {
        Self { state: Mutex::default(), pods: Mutex::default(), clock }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one report.
    pub fn ingest(&self, r: &Report) {
        let now = (self.clock)();
        let mut s = self.state();
        if s.instance.is_none()
            && let Some(i) = &r.instance_info
        {
            s.instance = Some(
                [&i.instance_availability_zone, &i.instance_id, &i.instance_name, &i.instance_type, &i.instance_region, &i.subnet_id]
                    .map(String::clone),
            );
        }
        if s.hardware.is_none()
            && let Some(h) = r.hardware_info.as_ref().filter(|h| h.error.is_empty())
            && let (Some(devices), Some(cores_per_device)) = (h.neuron_device_count, h.neuroncore_per_device_count)
        {
            s.hardware = Some(Hardware { devices, cores_per_device });
        }
        if r.runtimes.is_empty() {
            s.series.clear();
        } else {
            // Runtimes that left the report (an errored entry is still alive).
            let alive: BTreeSet<&str> = r.runtimes.iter().map(|rt| rt.tag.as_str()).collect();
            for series in s.series.values_mut() {
                series.retain(|labels, _| labels.iter().all(|(k, v)| *k != "runtime_tag" || alive.contains(v.as_str())));
            }
        }
        for rt in &r.runtimes {
            if rt.error.is_empty() {
                s.runtime(rt, now);
            } else {
                s.note("runtime");
            }
        }
        s.system(&r.system, now);
        s.in_use = r.runtimes.iter().map(|rt| (rt.tag.clone(), rt.pid, rt.error.is_empty().then(|| cores_held(rt)))).collect();
    }

    /// Who holds NeuronCores now, as `(who, cores)`: the runtimes of the latest report
    /// (cores with counters or device memory; None for a runtime neuron-monitor could not
    /// read, whose cores nobody can name) and the containers PodResources says were given
    /// cores or whole devices, a device being its `cores_per_device` cores.
    pub fn core_users(&self, cores_per_device: u32) -> Vec<(String, Option<BTreeSet<u32>>)> {
        let mut out: Vec<(String, Option<BTreeSet<u32>>)> = self
            .state()
            .in_use
            .iter()
            .map(|(tag, pid, cores)| {
                let pid = pid.map_or_else(String::new, |p| format!(" (pid {p})"));
                (format!("Neuron runtime {tag:?}{pid}"), cores.clone())
            })
            .collect();
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut held: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        let name = |c: &ContainerRef| format!("pod {}/{} (container {})", c.pod.namespace, c.pod.name, c.container);
        for (core, c) in &pods.cores {
            held.entry(name(c)).or_default().insert(*core);
        }
        for (device, c) in &pods.devices {
            held.entry(name(c)).or_default().extend(device * cores_per_device..(device + 1) * cores_per_device);
        }
        out.extend(held.into_iter().map(|(who, cores)| (who, Some(cores))));
        out
    }

    /// Replaces the pod attribution (built off the scrape path from PodResources).
    pub fn set_pods(&self, pods: NeuronPods) {
        let ix = Arc::new(PodIndex::new(pods));
        *self.pods.lock().unwrap_or_else(|p| p.into_inner()) = ix;
    }

    /// Per device, sorted: (device, mem_ecc_uncorrected, sram_ecc_uncorrected) summed over
    /// every report ingested, never reset.
    pub fn device_health(&self) -> Vec<(u32, u64, u64)> {
        self.state().health.iter().map(|(d, (m, s))| (*d, *m, *s)).collect()
    }

    /// `error_summary.hardware` summed over every runtime and report, never reset.
    pub fn runtime_errors(&self) -> u64 {
        self.state().hardware_errors
    }

    /// What was skipped so far, by group name (`runtime` for whole runtime entries,
    /// `invalid_counter_value` for negative counts).
    pub fn skipped(&self) -> BTreeMap<&'static str, u64> {
        self.state().skipped.clone()
    }

    /// (devices, logical cores per device) from `neuron_hardware_info`, once seen.
    pub fn hardware(&self) -> Option<(u32, u32)> {
        self.state().hardware.map(|h| (h.devices, h.cores_per_device))
    }
}

impl hearth_service::http::TextMetrics for NeuronExporter {
    fn render(&self, out: &mut String, openmetrics: bool) {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.state().render(&pods, openmetrics, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_service::http::TextMetrics;
    use proptest::prelude::*;

    /// inf2.xlarge: two runtimes (one tagged, one by PID) on one core each, and a third
    /// neuron-monitor could not read.
    const FIXTURE: &str = r#"{
      "neuron_runtime_data": [
        {"pid": 1234, "address": "", "neuron_runtime_tag": "1234", "error": "",
         "report": {
           "neuroncore_counters": {"period": 5.000113, "error": "",
             "neuroncores_in_use": {"0": {"neuroncore_utilization": 42.5, "effective_flops": 875590474948}}},
           "execution_stats": {"period": 5.000094, "error": "",
             "error_summary": {"generic": 0, "numerical": 0, "transient": 1, "model": 0, "runtime": 0, "hardware": 1},
             "execution_summary": {"completed": 2977, "completed_with_err": 1, "completed_with_num_err": 0,
                                   "timed_out": 0, "incorrect_input": 0, "failed_to_queue": 0},
             "latency_stats": {
               "total_latency": {"p0": 0.0102, "p1": 0.0104, "p25": 0.011, "p50": 0.0113, "p75": 0.0118, "p99": 0.0142, "p100": 0.0197},
               "device_latency": {"p0": 0.009, "p1": 0.0091, "p25": 0.0095, "p50": 0.0099, "p75": 0.0103, "p99": 0.0121, "p100": 0.0176}}},
           "memory_used": {"period": 5.000101, "error": "",
             "neuron_runtime_used_bytes": {"host": 9043968, "neuron_device": 110665748,
               "usage_breakdown": {
                 "host": {"application_memory": 655360, "constants": 0, "dma_buffers": 8388608, "tensors": 0},
                 "neuroncore_memory_usage": {"0": {"constants": 196608, "model_code": 100752896,
                   "model_shared_scratchpad": 0, "runtime_memory": 0, "tensors": 9912852}}}},
             "loaded_models": [{"name": "resnet50", "uuid": "a1b2c3d4", "model_id": 10001, "is_running": true,
               "subgraphs": {"sg_00": {"memory_used_bytes": {"host": 20480, "neuron_device": 110665748},
                 "neuroncore_index": 0, "neuron_device_index": 0}}}]},
           "neuron_runtime_vcpu_usage": {"period": 5.000098, "error": "", "vcpu_usage": {"user": 4.25, "system": 1.5}}}},
        {"pid": 5678, "neuron_runtime_tag": "bert-base", "error": "",
         "report": {
           "neuroncore_counters": {"period": 5.0, "error": "",
             "neuroncores_in_use": {"1": {"neuroncore_utilization": 7.5, "flops": 1200000000}}},
           "execution_stats": {"period": 5.0, "error": "",
             "error_summary": {"generic": 0, "numerical": 0, "transient": 0, "model": 0, "runtime": 0, "hardware": 0},
             "execution_summary": {"completed": 0, "completed_with_err": 0, "completed_with_num_err": 0,
                                   "timed_out": 0, "incorrect_input": 0, "failed_to_queue": 0},
             "latency_stats": {"total_latency": null, "device_latency": null}},
           "memory_used": {"period": 5.0, "error": "",
             "neuron_runtime_used_bytes": {"host": 6291456, "neuron_device": 52428800,
               "usage_breakdown": {"neuroncore_memory_usage": {"1": {"constants": 0, "model_code": 41943040,
                 "model_shared_scratchpad": 0, "runtime_memory": 2097152, "tensors": 8388608}}}},
             "loaded_models": []},
           "neuron_runtime_vcpu_usage": {"period": 5.0, "error": "", "vcpu_usage": {"user": 0.5, "system": 0.25}}}},
        {"pid": 9012, "neuron_runtime_tag": "9012", "error": "failed to connect to the runtime", "report": "unreadable"}
      ],
      "system_data": {
        "neuron_hw_counters": {"period": 5.000120, "error": "", "neuron_devices": [
          {"neuron_device_index": 0, "mem_ecc_corrected": 2, "mem_ecc_uncorrected": 0,
           "sram_ecc_uncorrected": 1, "sram_ecc_corrected": 3}]},
        "vcpu_usage": {"period": 5.000117, "error": "",
          "average_usage": {"user": 10.3, "nice": 0.5, "system": 3.4, "idle": 85.2, "io_wait": 0.4, "irq": 0, "soft_irq": 0.2},
          "usage_data": {
            "0": {"user": 12.1, "nice": 0, "system": 3.9, "idle": 83.6, "io_wait": 0.4, "irq": 0, "soft_irq": 0},
            "1": {"user": 9.8, "nice": 1, "system": 3.1, "idle": 85.7, "io_wait": 0.2, "irq": 0, "soft_irq": 0.2},
            "2": {"user": 10.0, "nice": 0.5, "system": 3.4, "idle": 85.5, "io_wait": 0.4, "irq": 0, "soft_irq": 0.2},
            "3": {"user": 9.3, "nice": 0.5, "system": 3.2, "idle": 86.0, "io_wait": 0.6, "irq": 0, "soft_irq": 0.4}},
          "context_switch_count": 29907},
        "memory_info": {"period": 5.000121, "error": "", "memory_total_bytes": 16106127360, "memory_used_bytes": 7020883968,
          "swap_total_bytes": 0, "swap_used_bytes": 0}},
      "instance_info": {"instance_name": "", "instance_id": "i-0f3a9c2b7d1e45a68", "instance_type": "inf2.xlarge",
        "instance_availability_zone": "us-west-2b", "instance_availability_zone_id": "usw2-az2",
        "instance_region": "us-west-2", "ami_id": "ami-0d4e5f6a7b8c9d0e1", "subnet_id": "subnet-0a1b2c3d4e5f60718", "error": ""},
      "neuron_hardware_info": {"neuron_device_type": "inferentia2", "neuron_device_version": "v3", "neuroncore_version": "v2",
        "neuron_device_count": 1, "neuron_device_memory_size": 34359738368, "neuroncore_per_device_count": 2,
        "logical_neuroncore_config": 1, "error": ""}
    }"#;

    const INSTANCE: &str =
        r#"availability_zone="us-west-2b",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge""#;
    const AZ: &str = r#"availability_zone="us-west-2b""#;
    const IDS: &str = r#"instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge""#;
    const PLACE: &str = r#"region="us-west-2""#;
    const SUBNET: &str = r#"subnet_id="subnet-0a1b2c3d4e5f60718""#;
    const CREATED: f64 = 1_767_225_600.25;

    /// The fixture as neuron-monitor writes it: one line.
    fn line(json: &str) -> String {
        serde_json::to_string(&serde_json::from_str::<Value>(json).unwrap()).unwrap()
    }

    fn fixture() -> Report {
        parse_line(&line(FIXTURE)).unwrap()
    }

    /// The fixture with `edit` applied to its JSON.
    fn edited(edit: impl FnOnce(&mut Value)) -> Report {
        let mut v: Value = serde_json::from_str(FIXTURE).unwrap();
        edit(&mut v);
        parse_line(&v.to_string()).unwrap()
    }

    fn exporter() -> NeuronExporter {
        NeuronExporter::with_clock(|| CREATED)
    }

    fn scrape(e: &NeuronExporter, openmetrics: bool) -> String {
        let mut out = String::new();
        e.render(&mut out, openmetrics);
        out
    }

    fn twice() -> (NeuronExporter, String) {
        let e = exporter();
        let r = fixture();
        e.ingest(&r);
        e.ingest(&r);
        let text = scrape(&e, false);
        (e, text)
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "missing line\n{line}\nin\n{text}");
    }

    #[test]
    fn parses_the_fixture_tolerantly() {
        let r = fixture();
        assert_eq!(r.runtimes.len(), 3);
        let a = &r.runtimes[0];
        assert_eq!((a.pid, a.tag.as_str()), (Some(1234), "1234"));
        let cores = &a.neuroncore_counters.as_ref().unwrap().data().unwrap().neuroncores_in_use;
        assert_eq!(cores[&0].flops(), Some(875_590_474_948.0));
        let b = &r.runtimes[1];
        let cores = &b.neuroncore_counters.as_ref().unwrap().data().unwrap().neuroncores_in_use;
        assert_eq!(cores[&1].flops(), Some(1.2e9), "the user guide's `flops` key");
        let lat = b.execution_stats.as_ref().unwrap().data().unwrap().latency_stats.as_ref().unwrap();
        assert_eq!((lat.total_latency.as_ref(), lat.device_latency.as_ref()), (None, None));
        let c = &r.runtimes[2];
        assert_eq!(c.error, "failed to connect to the runtime");
        assert!(c.neuroncore_counters.is_none(), "an errored runtime's report is not read");
        let hw = r.system.neuron_hw_counters.as_ref().unwrap().data().unwrap();
        assert_eq!(hw.neuron_devices[0].sram_ecc_corrected, Some(3.0));
        assert_eq!(r.hardware_info.as_ref().unwrap().neuroncore_per_device_count, Some(2));
        assert_eq!(r.instance_info.as_ref().unwrap().instance_availability_zone_id, "usw2-az2");

        for empty in [r#"{"neuron_runtime_data": []}"#, r#"{"neuron_runtime_data": null}"#, "{}"] {
            assert_eq!(parse_line(empty).unwrap(), Report::default(), "{empty}");
        }
        // An old tools version: no system groups but memory_info, no flops, fewer hardware keys.
        let old = parse_line(
            r#"{"neuron_runtime_data":[],"system_data":{"memory_info":{"period":5.0,"memory_total_bytes":1,"error":""}},
               "neuron_hardware_info":{"neuron_device_count":1,"neuroncore_per_device_count":2,"error":""},"future_key":{"x":[1]}}"#,
        )
        .unwrap();
        assert!(old.system.vcpu_usage.is_none() && old.system.memory_info.is_some());
        // A group's error keeps its (possibly missing or malformed) data unread.
        let failed = parse_line(r#"{"system_data":{"neuron_hw_counters":{"error":"driver busy","neuron_devices":"?"}}}"#).unwrap();
        assert_eq!(failed.system.neuron_hw_counters, Some(Group::Failed("driver busy".into())));
    }

    #[test]
    fn parse_errors_name_what_was_wrong() {
        let cases: &[(&str, &str, &str)] = &[
            ("  \n", "empty", "neuron-monitor report: empty line"),
            (
                "{\"neuron_runtime_data\": [",
                "json",
                "neuron-monitor report is not valid JSON: EOF while parsing a list at line 1 column 25",
            ),
            ("[1, 2]", "not_object", "neuron-monitor report: expected a JSON object, got an array"),
            (r#"{"neuron_runtime_data": {}}"#, "shape", "neuron-monitor report: neuron_runtime_data: expected an array, got an object"),
            (
                r#"{"system_data": {"neuron_hw_counters": {"error": "", "neuron_devices": {"0": {}}}}}"#,
                "shape",
                "neuron-monitor report: system_data.neuron_hw_counters: invalid type: map, expected a sequence",
            ),
            (
                r#"{"neuron_runtime_data": [{"error": "", "report": {"neuroncore_counters": {"neuroncores_in_use": {"x": {}}}}}]}"#,
                "shape",
                "neuron-monitor report: neuron_runtime_data[0].report.neuroncore_counters: invalid value: expected key to be a number in quotes",
            ),
            (
                r#"{"neuron_runtime_data": [{"error": 3}]}"#,
                "shape",
                "neuron-monitor report: neuron_runtime_data[0].error: expected a string, got a number",
            ),
            (
                r#"{"instance_info": {"instance_id": 7}}"#,
                "shape",
                "neuron-monitor report: instance_info: invalid type: integer `7`, expected a string",
            ),
        ];
        for (input, reason, message) in cases {
            let e = parse_line(input).unwrap_err();
            assert_eq!((e.reason(), e.to_string().as_str()), (*reason, *message), "{input}");
        }
    }

    #[test]
    fn renders_exact_lines_after_two_reports() {
        let (_, text) = twice();
        let rt = |tag: &str| format!(r#"runtime_tag="{tag}""#);
        for want in [
            format!(r#"neuroncore_utilization_ratio{{{INSTANCE},neuroncore="0",{PLACE},{},{SUBNET}}} 0.425"#, rt("1234")),
            format!(r#"neuroncore_utilization_ratio{{{INSTANCE},neuroncore="1",{PLACE},{},{SUBNET}}} 0.075"#, rt("bert-base")),
            format!(r#"neuron_runtime_vcpu_usage_ratio{{{INSTANCE},{PLACE},{},{SUBNET},usage_type="user"}} 0.0425"#, rt("1234")),
            format!(r#"neuron_runtime_vcpu_usage_ratio{{{INSTANCE},{PLACE},{},{SUBNET},usage_type="system"}} 0.015"#, rt("1234")),
            format!(
                r#"neuron_runtime_memory_used_bytes{{{INSTANCE},memory_location="neuron_device",{PLACE},{},{SUBNET}}} 1.10665748e+08"#,
                rt("1234")
            ),
            format!(
                r#"neuron_runtime_memory_used_bytes{{{INSTANCE},memory_location="host",{PLACE},{},{SUBNET}}} 9.043968e+06"#,
                rt("1234")
            ),
            format!(
                r#"neuroncore_memory_usage_constants{{{INSTANCE},memory_location="None",neuroncore="0",{PLACE},{},{SUBNET}}} 196608.0"#,
                rt("1234")
            ),
            format!(
                r#"neuroncore_memory_usage_model_code{{{INSTANCE},memory_location="None",neuroncore="0",{PLACE},{},{SUBNET}}} 1.00752896e+08"#,
                rt("1234")
            ),
            format!(
                r#"neuroncore_memory_usage_runtime_memory{{{INSTANCE},memory_location="None",neuroncore="1",{PLACE},{},{SUBNET}}} 2.097152e+06"#,
                rt("bert-base")
            ),
            format!(r#"execution_errors_total{{{AZ},error_type="hardware",{IDS},{PLACE},{},{SUBNET}}} 2.0"#, rt("1234")),
            format!(r#"execution_errors_total{{{AZ},error_type="generic",{IDS},{PLACE},{},{SUBNET}}} 0.0"#, rt("bert-base")),
            format!(r#"execution_errors_created{{{AZ},error_type="hardware",{IDS},{PLACE},{},{SUBNET}}} 1.76722560025e+09"#, rt("1234")),
            format!(r#"execution_status_total{{{INSTANCE},{PLACE},{},status_type="completed",{SUBNET}}} 5954.0"#, rt("1234")),
            format!(r#"execution_status_total{{{INSTANCE},{PLACE},{},status_type="completed_with_err",{SUBNET}}} 2.0"#, rt("1234")),
            format!(r#"execution_latency_seconds{{{INSTANCE},percentile="p99",{PLACE},{},{SUBNET}}} 0.0142"#, rt("1234")),
            format!(r#"execution_latency_seconds{{{INSTANCE},percentile="p0",{PLACE},{},{SUBNET}}} 0.0102"#, rt("1234")),
            format!(
                r#"hardware_ecc_events_total{{availability_zone="us-west-2b",event_type="sram_ecc_uncorrected",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge",neuron_device_index="0",{PLACE},{SUBNET}}} 2.0"#
            ),
            format!(
                r#"hardware_ecc_events_created{{availability_zone="us-west-2b",event_type="mem_ecc_corrected",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge",neuron_device_index="0",{PLACE},{SUBNET}}} 1.76722560025e+09"#
            ),
            format!(r#"system_vcpu_count{{{INSTANCE},{PLACE},{SUBNET}}} 4.0"#),
            format!(r#"system_vcpu_usage_ratio{{{INSTANCE},{PLACE},{SUBNET},usage_type="user"}} 0.10800000000000001"#),
            format!(r#"system_vcpu_usage_ratio{{{INSTANCE},{PLACE},{SUBNET},usage_type="system"}} 0.04"#),
            format!(r#"system_memory_total_bytes{{{INSTANCE},{PLACE},{SUBNET}}} 1.610612736e+010"#),
            format!(r#"system_memory_used_bytes{{{INSTANCE},{PLACE},{SUBNET}}} 7.020883968e+09"#),
            format!(r#"system_swap_used_bytes{{{INSTANCE},{PLACE},{SUBNET}}} 0.0"#),
            format!(r#"instance_info{{{INSTANCE},{PLACE},{SUBNET}}} 1.0"#),
            format!(r#"neuron_hardware_info{{{INSTANCE},neuron_device_count="1",neuroncore_per_device_count="2",{PLACE},{SUBNET}}} 1.0"#),
        ] {
            has(&text, &want);
        }
        assert!(!text.contains("9012"), "the errored runtime exports nothing");
    }

    /// The issue's table, word for word: every family, its type and its HELP.
    const PINNED: &[(&str, &str, &str)] = &[
        ("neuroncore_utilization_ratio", "gauge", "NeuronCore utilization ratio"),
        ("neuron_runtime_vcpu_usage_ratio", "gauge", "Runtime vCPU utilization ratio"),
        ("neuron_runtime_memory_used_bytes", "gauge", "Runtime memory used bytes"),
        ("neuroncore_memory_usage_constants", "gauge", "NeuronCore memory utilization for constants"),
        ("neuroncore_memory_usage_model_code", "gauge", "NeuronCore memory utilization for model_code"),
        ("neuroncore_memory_usage_model_shared_scratchpad", "gauge", "NeuronCore memory utilization for model_shared_scratchpad"),
        ("neuroncore_memory_usage_runtime_memory", "gauge", "NeuronCore memory utilization for runtime_memory"),
        ("neuroncore_memory_usage_tensors", "gauge", "NeuronCore memory utilization for tensors"),
        ("execution_errors_total", "counter", "Execution errors total"),
        ("execution_errors_created", "gauge", "Execution errors total"),
        ("execution_status_total", "counter", "Execution status total"),
        ("execution_status_created", "gauge", "Execution status total"),
        ("execution_latency_seconds", "gauge", "Execution latency in seconds"),
        ("hardware_ecc_events_total", "counter", "Hardware ecc events total"),
        ("hardware_ecc_events_created", "gauge", "Hardware ecc events total"),
        ("system_vcpu_count", "gauge", "System vCPU count"),
        ("system_vcpu_usage_ratio", "gauge", "System CPU utilization ratio"),
        ("system_memory_total_bytes", "gauge", "System memory total_bytes bytes"),
        ("system_memory_used_bytes", "gauge", "System memory used_bytes bytes"),
        ("system_swap_total_bytes", "gauge", "System swap total_bytes bytes"),
        ("system_swap_used_bytes", "gauge", "System swap used_bytes bytes"),
        ("instance_info", "gauge", "EC2 instance information"),
        ("neuron_hardware_info", "gauge", "Neuron Hardware Information"),
    ];

    /// (family, label names) for each family's series, instance labels left out.
    const LABELS: &[(&str, &[&str])] = &[
        ("neuroncore_utilization_ratio", &["neuroncore", "runtime_tag"]),
        ("neuron_runtime_vcpu_usage_ratio", &["runtime_tag", "usage_type"]),
        ("neuron_runtime_memory_used_bytes", &["memory_location", "runtime_tag"]),
        ("neuroncore_memory_usage_tensors", &["memory_location", "neuroncore", "runtime_tag"]),
        ("execution_errors_total", &["error_type", "runtime_tag"]),
        ("execution_status_total", &["runtime_tag", "status_type"]),
        ("execution_latency_seconds", &["percentile", "runtime_tag"]),
        ("hardware_ecc_events_total", &["event_type", "neuron_device_index"]),
        ("system_vcpu_count", &[]),
        ("system_vcpu_usage_ratio", &["usage_type"]),
        ("system_memory_total_bytes", &[]),
        ("instance_info", &[]),
        ("neuron_hardware_info", &["neuron_device_count", "neuroncore_per_device_count"]),
    ];

    /// The pinned labels of a family (the memory families share theirs).
    fn own_labels(family: &str) -> Option<&'static [&'static str]> {
        let family = match family {
            f if f.starts_with("neuroncore_memory_usage_") => "neuroncore_memory_usage_tensors",
            f if f.starts_with("system_memory_") || f.starts_with("system_swap_") => "system_memory_total_bytes",
            f => f,
        };
        LABELS.iter().find(|(f, _)| *f == family).map(|(_, l)| *l)
    }

    /// Splits `name{k="v",...} value` (escapes kept as written).
    fn split(line: &str) -> (&str, Vec<(&str, &str)>, &str) {
        let (name, rest) = line.split_once('{').unwrap();
        let (body, value) = rest.rsplit_once("} ").unwrap();
        let mut labels = Vec::new();
        let mut s = body;
        while !s.is_empty() {
            let (k, r) = s.split_once("=\"").unwrap();
            let mut end = 0;
            let mut esc = false;
            for (i, c) in r.char_indices() {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, '\\') => esc = true,
                    (false, '"') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            labels.push((k, &r[..end]));
            s = r[end + 1..].trim_start_matches(',');
        }
        (name, labels, value)
    }

    #[test]
    fn every_family_has_the_scripts_name_type_help_and_labels() {
        let (_, text) = twice();
        let mut help = BTreeMap::new();
        let mut types = BTreeMap::new();
        for l in text.lines() {
            if let Some(r) = l.strip_prefix("# HELP ") {
                let (n, h) = r.split_once(' ').unwrap();
                assert!(help.insert(n, h).is_none(), "HELP twice for {n}");
            } else if let Some(r) = l.strip_prefix("# TYPE ") {
                let (n, t) = r.split_once(' ').unwrap();
                assert!(types.insert(n, t).is_none(), "TYPE twice for {n}");
            }
        }
        for (name, kind, h) in PINNED {
            assert_eq!((types.get(name), help.get(name)), (Some(kind), Some(h)), "{name}");
        }
        assert_eq!(types.len(), PINNED.len(), "unexpected families: {types:?}");
        let names: Vec<String> = PINNED.iter().map(|p| p.0.to_owned()).collect();
        let mut declared = family_names();
        declared.sort();
        let mut pinned = names.clone();
        pinned.sort();
        assert_eq!(declared, pinned);

        let instance = ["availability_zone", "instance_id", "instance_name", "instance_type", "region", "subnet_id"];
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, value) = split(l);
            let keys: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            assert_eq!(keys, sorted, "labels sorted: {l}");
            let own = own_labels(&name.replace("_created", "_total")).unwrap_or_else(|| panic!("no label pin for {name}"));
            let mut want: Vec<&str> = instance.iter().chain(own.iter()).copied().collect();
            want.sort_unstable();
            assert_eq!(keys, want, "{l}");
            assert!(value.parse::<f64>().is_ok_and(f64::is_finite), "{l}");
        }
    }

    #[test]
    fn counters_add_each_reports_counts() {
        let e = exporter();
        let r = fixture();
        let value = |text: &str, prefix: &str| -> String {
            let l = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
            l.rsplit_once(' ').unwrap().1.to_owned()
        };
        let completed = r#"execution_status_total{availability_zone="us-west-2b",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge",region="us-west-2",runtime_tag="1234",status_type="completed""#;
        let corrected = r#"hardware_ecc_events_total{availability_zone="us-west-2b",event_type="mem_ecc_corrected""#;
        e.ingest(&r);
        let one = scrape(&e, false);
        assert_eq!((value(&one, completed), value(&one, corrected)), ("2977.0".into(), "2.0".into()));
        e.ingest(&r);
        let two = scrape(&e, false);
        assert_eq!((value(&two, completed), value(&two, corrected)), ("5954.0".into(), "4.0".into()));
        // Gauges are not summed.
        assert_eq!(value(&one, "neuroncore_utilization_ratio{"), value(&two, "neuroncore_utilization_ratio{"));
        assert_eq!(e.device_health(), vec![(0, 0, 2)]);
        assert_eq!(e.runtime_errors(), 2);
        assert_eq!(e.skipped().get("runtime"), Some(&2));
        assert_eq!(e.hardware(), Some((1, 2)));
    }

    #[test]
    fn latency_is_absent_while_nothing_ran() {
        let (_, text) = twice();
        assert!(text.contains(r#"percentile="p50",region="us-west-2",runtime_tag="1234""#));
        assert!(!text.lines().any(|l| l.starts_with("execution_latency_seconds") && l.contains("bert-base")), "{text}");
        let e = exporter();
        e.ingest(&edited(|v| v["neuron_runtime_data"][0]["report"]["execution_stats"]["latency_stats"]["total_latency"] = Value::Null));
        assert!(!scrape(&e, false).contains("execution_latency_seconds"), "no series, no family");
    }

    #[test]
    fn a_report_without_runtimes_clears_runtime_series_and_restarts_counters() {
        let (e, _) = twice();
        let idle = edited(|v| v["neuron_runtime_data"] = Value::Array(Vec::new()));
        e.ingest(&idle);
        let text = scrape(&e, false);
        assert!(!text.contains("runtime_tag"), "{text}");
        for gone in ["neuroncore_", "execution_", "neuron_runtime_"] {
            assert!(!text.lines().any(|l| l.starts_with(gone)), "{gone} left in\n{text}");
        }
        // System series come back from the same report; counters restart from its counts.
        has(&text, &format!(r#"system_vcpu_count{{{INSTANCE},{PLACE},{SUBNET}}} 4.0"#));
        assert!(text.contains(r#"event_type="mem_ecc_corrected",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge",neuron_device_index="0",region="us-west-2",subnet_id="subnet-0a1b2c3d4e5f60718"} 2.0"#), "{text}");
        assert!(text.contains("instance_info{") && text.contains("neuron_hardware_info{"), "info metrics stay");
        // The agent's own totals are not reset.
        assert_eq!(e.device_health(), vec![(0, 0, 3)]);
        for absent in [r#"{"neuron_runtime_data": null}"#, "{}"] {
            let e = exporter();
            e.ingest(&fixture());
            e.ingest(&parse_line(absent).unwrap());
            assert!(!scrape(&e, false).contains("runtime_tag"), "{absent}");
        }
    }

    #[test]
    fn a_runtime_that_left_loses_its_series() {
        let (e, _) = twice();
        e.ingest(&edited(|v| {
            let rts = v["neuron_runtime_data"].as_array_mut().unwrap();
            rts.remove(1);
        }));
        let text = scrape(&e, false);
        assert!(!text.contains("bert-base"), "{text}");
        assert!(text.contains(r#"runtime_tag="1234""#));
        assert!(text.contains("status_type=\"completed\",subnet_id=\"subnet-0a1b2c3d4e5f60718\"} 8931.0"), "{text}");
    }

    #[test]
    fn a_group_with_an_error_is_skipped() {
        let e = exporter();
        e.ingest(&edited(|v| {
            v["neuron_runtime_data"][0]["report"]["execution_stats"]["error"] = "nrt_get_stats failed".into();
            v["system_data"]["memory_info"]["error"] = "cannot read /proc/meminfo".into();
            // Its data may then be anything.
            v["system_data"]["memory_info"]["memory_total_bytes"] = "garbage".into();
        }));
        let text = scrape(&e, false);
        assert!(!text.lines().any(|l| l.starts_with("execution_") && l.contains(r#"runtime_tag="1234""#)), "{text}");
        assert!(text.lines().any(|l| l.starts_with("execution_status_total") && l.contains("bert-base")));
        assert!(!text.contains("system_memory_") && !text.contains("system_swap_"), "{text}");
        assert!(text.contains("system_vcpu_count{"), "other groups still export");
        assert_eq!(e.runtime_errors(), 0);
        let skipped = e.skipped();
        assert_eq!((skipped.get("execution_stats"), skipped.get("memory_info")), (Some(&1), Some(&1)));
    }

    #[test]
    fn pod_labels_go_on_the_cores_a_container_holds() {
        let (e, plain) = twice();
        let held =
            |ns: &str, pod: &str, c: &str| ContainerRef { pod: PodRef { namespace: ns.into(), name: pod.into() }, container: c.into() };
        let mut pods = NeuronPods::new();
        pods.insert((RESOURCE_NEURONCORE.into(), "1".into()), held("ml", "bert-0", "server"));
        pods.insert(("nvidia.com/gpu".into(), "0".into()), held("x", "y", "z"));
        e.set_pods(pods);
        let text = scrape(&e, false);
        has(
            &text,
            &format!(
                r#"neuroncore_utilization_ratio{{availability_zone="us-west-2b",container="server",instance_id="i-0f3a9c2b7d1e45a68",instance_name="",instance_type="inf2.xlarge",namespace="ml",neuroncore="1",pod="bert-0",{PLACE},runtime_tag="bert-base",{SUBNET}}} 0.075"#
            ),
        );
        has(&text, &format!(r#"neuroncore_utilization_ratio{{{INSTANCE},neuroncore="0",{PLACE},runtime_tag="1234",{SUBNET}}} 0.425"#));
        let with_pod =
            |t: &str| t.lines().filter(|l| l.contains("pod=")).map(|l| l.split('{').next().unwrap().to_owned()).collect::<Vec<_>>();
        let mut fams = with_pod(&text);
        fams.sort();
        assert_eq!(
            fams,
            [
                "neuroncore_memory_usage_constants",
                "neuroncore_memory_usage_model_code",
                "neuroncore_memory_usage_model_shared_scratchpad",
                "neuroncore_memory_usage_runtime_memory",
                "neuroncore_memory_usage_tensors",
                "neuroncore_utilization_ratio",
            ],
            "only per-core families, only core 1"
        );

        // A whole device (either resource name) covers its cores: 2 per device here.
        for resource in [RESOURCE_NEURON, RESOURCE_NEURONDEVICE] {
            e.set_pods(NeuronPods::from([((resource.into(), "0".into()), held("ml", "resnet-0", "infer"))]));
            let text = scrape(&e, false);
            let tagged = text.lines().filter(|l| l.contains(r#"pod="resnet-0""#)).count();
            assert_eq!(tagged, 12, "6 per-core families x cores 0 and 1 ({resource})");
        }
        e.set_pods(NeuronPods::new());
        assert_eq!(scrape(&e, false), plain, "an empty map removes them");
    }

    #[test]
    fn core_users_are_the_latest_reports_runtimes_and_the_pods_holding_cores() {
        let (e, _) = twice();
        let held = |pod: &str| ContainerRef { pod: PodRef { namespace: "ml".into(), name: pod.into() }, container: "c".into() };
        e.set_pods(NeuronPods::from([
            ((RESOURCE_NEURONCORE.into(), "5".into()), held("one-core")),
            ((RESOURCE_NEURON.into(), "3".into()), held("whole-device")),
        ]));
        let users = e.core_users(2);
        let find = |who: &str| users.iter().find(|(w, _)| w == who).map(|(_, c)| c.as_ref().map(|c| c.iter().copied().collect::<Vec<_>>()));
        assert_eq!(find("Neuron runtime \"1234\" (pid 1234)"), Some(Some(vec![0])));
        assert_eq!(find("Neuron runtime \"bert-base\" (pid 5678)"), Some(Some(vec![1])));
        assert_eq!(find("Neuron runtime \"9012\" (pid 9012)"), Some(None), "unreadable: listed, cores unknown");
        assert_eq!(find("pod ml/one-core (container c)"), Some(Some(vec![5])));
        assert_eq!(find("pod ml/whole-device (container c)"), Some(Some(vec![6, 7])), "device 3 is cores 6-7 at 2 per device");
        // A report with no runtimes: nobody holds cores through neuron-monitor any more.
        let idle = edited(|v| v["neuron_runtime_data"] = Value::Array(vec![]));
        e.ingest(&idle);
        e.set_pods(NeuronPods::new());
        assert!(e.core_users(2).is_empty());
    }

    #[test]
    fn pods_come_from_podresources() {
        use hearth_proto::podresources::{ContainerDevices, ContainerResources, PodResources};
        let dev = |r: &str, ids: &[&str]| ContainerDevices {
            resource_name: r.into(),
            device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            topology: None,
        };
        let resp = ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "llama-0".into(),
                namespace: "ml".into(),
                containers: vec![ContainerResources {
                    name: "vllm".into(),
                    devices: vec![dev(RESOURCE_NEURONCORE, &["4", "5"]), dev("nvidia.com/gpu", &["GPU-a"]), dev(RESOURCE_NEURON, &["3"])],
                }],
            }],
        };
        let m = neuron_pods(&resp);
        assert_eq!(m.len(), 3);
        assert_eq!(m[&(RESOURCE_NEURONCORE.to_owned(), "5".to_owned())].pod.name, "llama-0");
        assert_eq!(m[&(RESOURCE_NEURON.to_owned(), "3".to_owned())].container, "vllm");
    }

    #[test]
    fn label_values_are_escaped() {
        let e = exporter();
        e.ingest(&edited(|v| v["neuron_runtime_data"][1]["neuron_runtime_tag"] = "a\"b\\c\nd".into()));
        let text = scrape(&e, false);
        assert!(text.contains(r#"runtime_tag="a\"b\\c\nd""#), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("runtime_tag=\"a")).count(), 34, "every series of that runtime");
    }

    #[test]
    fn values_print_as_prometheus_client_prints_them() {
        for (v, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (2977.0, "2977.0"),
            (0.425, "0.425"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123_456.0, "123456.0"),
            (1e6, "1e+06"),
            (1_234_567.0, "1.234567e+06"),
            (1.5e10, "1.5e+010"),
            (16_106_127_360.0, "1.610612736e+010"),
            (1e16, "1e+16"),
            (1.2345678901234568e16, "1.2345678901234568e+16"),
            (1e22, "1e+22"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (2.5e-5, "2.5e-05"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-5.0, "-5.0"),
            (-1234567.0, "-1234567.0"),
            // Exactly halfway between two 16-digit candidates: Python keeps the even one.
            (762_009_522_505_872.0 + 0.25, "7.620095225058722e+014"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ] {
            let mut s = String::new();
            format_value(v, &mut s);
            assert_eq!(s, want, "{v:e}");
        }
    }

    /// A strict reading of OpenMetrics 1.0 for what this module writes: metadata before
    /// samples, one declaration per family, sample names the family's (`_total` and
    /// `_created` for counters, `_info` for info), `_created` right after its `_total`.
    fn check_openmetrics(text: &str) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let mut family: Option<(String, String)> = None;
        let mut last_total: Option<String> = None;
        let mut help_for: Option<String> = None;
        for l in text.lines() {
            if let Some(r) = l.strip_prefix("# HELP ") {
                let name = r.split(' ').next().unwrap_or_default().to_owned();
                if !seen.insert(name.clone()) {
                    return Err(format!("family {name} declared twice"));
                }
                help_for = Some(name);
                continue;
            }
            if let Some(r) = l.strip_prefix("# TYPE ") {
                let (name, kind) = r.split_once(' ').ok_or(format!("bad TYPE: {l}"))?;
                if help_for.as_deref() != Some(name) {
                    return Err(format!("TYPE without its HELP: {l}"));
                }
                if !["gauge", "counter", "info"].contains(&kind) {
                    return Err(format!("unexpected type: {l}"));
                }
                if kind == "counter" && name.ends_with("_total") {
                    return Err(format!("counter family named with _total: {l}"));
                }
                family = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            if l.starts_with('#') {
                return Err(format!("unexpected comment: {l}"));
            }
            let (fname, kind) = family.as_ref().ok_or(format!("sample before any TYPE: {l}"))?;
            let (name, labels, value) = split(l);
            let ok = match kind.as_str() {
                "gauge" => name == fname,
                "info" => name == format!("{fname}_info") && value == "1.0",
                _ => name == format!("{fname}_total") || name == format!("{fname}_created"),
            };
            if !ok {
                return Err(format!("sample {name} outside its family {fname}: {l}"));
            }
            let series = format!("{labels:?}");
            if name.ends_with("_total") {
                last_total = Some(series);
            } else if name.ends_with("_created") && kind == "counter" && last_total.take().as_deref() != Some(series.as_str()) {
                return Err(format!("_created not after its _total: {l}"));
            }
            if value.parse::<f64>().is_err() {
                return Err(format!("bad value: {l}"));
            }
        }
        Ok(())
    }

    #[test]
    fn openmetrics_declares_counters_without_total_and_info_as_info() {
        let (e, _) = twice();
        e.set_pods(NeuronPods::from([(
            (RESOURCE_NEURONCORE.into(), "0".into()),
            ContainerRef { pod: PodRef { namespace: "ml".into(), name: "p".into() }, container: "c".into() },
        )]));
        let om = scrape(&e, true);
        check_openmetrics(&om).unwrap_or_else(|err| panic!("{err}\n{om}"));
        for want in [
            "# TYPE execution_errors counter",
            "# HELP execution_errors Execution errors total",
            "# TYPE execution_status counter",
            "# TYPE hardware_ecc_events counter",
            "# TYPE instance info",
            "# TYPE neuron_hardware info",
            "# TYPE neuroncore_utilization_ratio gauge",
        ] {
            has(&om, want);
        }
        assert!(!om.contains("_created gauge") && !om.contains("# EOF"), "{om}");
        // The same series and values as the text format, but grouped per family.
        let samples = |t: &str| {
            let mut v: Vec<String> = t.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect();
            v.sort();
            v
        };
        assert_eq!(samples(&om), samples(&scrape(&e, false)));
    }

    #[test]
    fn promtool_accepts_the_text_format() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let (e, _) = twice();
        e.set_pods(NeuronPods::from([(
            (RESOURCE_NEURON.into(), "0".into()),
            ContainerRef { pod: PodRef { namespace: "ml".into(), name: "p".into() }, container: "c".into() },
        )]));
        let text = scrape(&e, false);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let promtool = std::env::split_paths(&path).map(|d| d.join("promtool")).find(|p| p.is_file()).unwrap_or_else(|| {
            panic!("`promtool` is not on PATH; this test lints the Neuron exposition with it (apt-get install prometheus; scripts/test.sh installs it)")
        });
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Exit 3 is lint problems only. The one allowed is the script's fixed name.
        let allowed = "system_vcpu_count non-histogram and non-summary metrics should not have \"_count\" suffix";
        let problems: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty() && *l != allowed).collect();
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && problems.is_empty(),
            "promtool check metrics ({:?}):\n{report}\n--- input ---\n{text}",
            out.status
        );
    }

    /// Every place a value sits in the fixture, as JSON pointers.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, c) in o {
                    pointers(c, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    pointers(c, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("JSON has no NaN or Inf", |f| f.is_finite()).prop_map(Value::from),
            "[a-z0-9\"\\\\\n ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z0-9_]{1,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Whatever parses also ingests and renders into valid text (and doesn't panic).
    fn ingest_and_render(r: &Report) -> Result<(), TestCaseError> {
        let e = exporter();
        e.ingest(r);
        e.ingest(r);
        let _ = scrape(&e, false);
        check_openmetrics(&scrape(&e, true)).map_err(TestCaseError::fail)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}", j in "[{}\\[\\]\":,0-9a-z_.eE+\\- ]{0,200}") {
            for input in [s, j] {
                if let Ok(r) = parse_line(&input) {
                    ingest_and_render(&r)?;
                }
            }
        }

        #[test]
        fn a_cut_or_spliced_report_never_panics(cut in 0usize..4000, len in 0usize..40, insert in "[{}\\[\\]\":,0-9a-z .-]{0,6}") {
            let text = line(FIXTURE);
            let mut chars: Vec<char> = text.chars().collect();
            let at = cut % chars.len();
            let end = (at + len).min(chars.len());
            chars.splice(at..end, insert.chars());
            let mutated: String = chars.into_iter().collect();
            if let Ok(r) = parse_line(&mutated) {
                ingest_and_render(&r)?;
            }
        }

        #[test]
        fn any_value_anywhere_never_panics(pick in any::<proptest::sample::Index>(), value in any_json()) {
            let mut doc: Value = serde_json::from_str(FIXTURE).unwrap();
            let mut all = Vec::new();
            pointers(&doc, String::new(), &mut all);
            let at = pick.get(&all).clone();
            if at.is_empty() {
                doc = value;
            } else if let Some(slot) = doc.pointer_mut(&at) {
                *slot = value;
            }
            match parse_line(&doc.to_string()) {
                Ok(r) => ingest_and_render(&r)?,
                Err(e) => prop_assert!(matches!(e, MonitorError::Shape { .. } | MonitorError::NotAnObject { .. }), "{e}"),
            }
        }
    }
}
