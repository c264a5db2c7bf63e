//! Agent configuration: YAML, overridable by flags, validated into [`Config`] before
//! anything starts. Errors name the field and the form that was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::transport::{DEFAULT_MAX_MESSAGE_BYTES, TlsFiles};
use hearth_service::config::{ConfigError, RawTls, parse_duration, parse_size};
use serde::Deserialize;

use crate::device::sim::SimSpec;

#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{field}: expected {expected}, got {got:?}")]
    Invalid { field: &'static str, expected: String, got: String },
}

fn invalid(field: &'static str, expected: impl Into<String>, got: impl Into<String>) -> AgentConfigError {
    AgentConfigError::Invalid { field, expected: expected.into(), got: got.into() }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawController {
    /// `https://host:port` (or `http://` with insecure). Absent: run node-local only.
    pub url: Option<String>,
    /// Name to verify in the controller's certificate; defaults to the URL's host.
    pub server_name: Option<String>,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub insecure: bool,
    pub heartbeat_interval: Option<String>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDevices {
    /// `none` or `simulated`.
    pub backend: Option<String>,
    /// For the simulated backend: ["2xH100-80GB", "1xinf2"].
    #[serde(default)]
    pub simulated: Vec<String>,
    /// GPU metrics collection interval ("10s").
    pub collect_interval: Option<String>,
    /// Value of the host label on GPU metrics; defaults to the node name.
    pub hostname_label: Option<String>,
    /// Name of that label: `Hostname` (dcgm-exporter up to 4.8, the default), `hostname`
    /// (later releases), or "" to leave it out.
    pub hostname_label_name: Option<String>,
    /// Path of libnvidia-ml.so.1 when it is not on the loader path.
    pub nvml_library: Option<PathBuf>,
    /// Directory holding kubelet's PodResources socket (mount the directory, not the socket).
    pub pod_resources_dir: Option<PathBuf>,
    pub pod_resources_interval: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub procfs_root: Option<PathBuf>,
    pub collect_interval: Option<String>,
    pub exclude_interfaces: Option<Vec<String>>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub uri: String,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub revision: String,
    /// Never evict it.
    #[serde(default)]
    pub pin: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub root: Option<PathBuf>,
    /// "500Gi"; absent: bounded by the disk watermarks.
    pub capacity: Option<String>,
    pub high_watermark: Option<f64>,
    pub low_watermark: Option<f64>,
    pub part_size: Option<String>,
    pub concurrency: Option<usize>,
    /// Bytes per second for all downloads together, e.g. "1Gi".
    pub limit_rate: Option<String>,
    /// auto | direct | buffered
    pub write_mode: Option<String>,
    #[serde(default)]
    pub s3: RawS3,
    /// Models to keep warm on this node.
    #[serde(default)]
    pub models: Vec<RawModel>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    /// Talk to the Kubernetes API at all; default: on inside a cluster or with a kubeconfig.
    pub enabled: Option<bool>,
    /// A kubeconfig file (for `hearth agent` run by hand); default: the in-cluster service
    /// account.
    pub kubeconfig: Option<PathBuf>,
    /// Write the partition state as labels on this node (default true).
    pub label_node: Option<bool>,
    /// Watch this node's pods, to name pods in per-pod metrics (default true).
    pub pod_names: Option<bool>,
    /// Post Events on the Node (default true).
    pub events: Option<bool>,
    #[serde(default)]
    pub health: RawHealth,
    /// An API server URL with a token and CA file, instead of a kubeconfig.
    pub api_server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Keep the HearthAcceleratorsHealthy condition on the Node (default true).
    pub condition: Option<bool>,
    /// Taint the Node NoSchedule while an accelerator is unhealthy (default false).
    pub taint: Option<bool>,
}

/// Model servers on this node.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRuntimes {
    /// The pod label that marks a Kubernetes-managed model server, its value the model
    /// (default `hearth.dev/model`; "" turns discovery off).
    pub discovery_label: Option<String>,
    /// How often each server is read (default 5s).
    pub interval: Option<String>,
    /// Deadline of each request to a server (default 2s).
    pub timeout: Option<String>,
    /// Model servers the agent runs itself (process driver).
    #[serde(default)]
    pub managed: Vec<RawManaged>,
    /// How to start each engine when the controller sends StartRuntime.
    #[serde(default)]
    pub engines: std::collections::BTreeMap<String, RawEngineTemplate>,
    #[serde(default)]
    pub spot: RawSpot,
    /// How agent-managed servers run: "process" (default; a child of the agent) or "pod" (a
    /// Pod bound to this node through the API server; needs `kubernetes`).
    pub driver: Option<String>,
    #[serde(default)]
    pub pod: RawPodDriver,
}

/// The pod driver's settings.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPodDriver {
    /// Where the pods go (default: the agent's own namespace from $POD_NAMESPACE, else "hearth").
    pub namespace: Option<String>,
    pub priority_class: Option<String>,
    /// The cache directory as the host sees it, where the agent's container mounts it
    /// elsewhere (default: the same path).
    pub host_cache_dir: Option<PathBuf>,
}

/// EC2 spot interruption and rebalance notices.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSpot {
    /// Watch the instance metadata for notices and drain agent-managed runtimes on one
    /// (default false: only EC2 instances have the service).
    #[serde(default)]
    pub enabled: bool,
    /// Default http://169.254.169.254.
    pub imds_endpoint: Option<String>,
    /// Default 5s (EC2 gives two minutes).
    pub interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngineTemplate {
    /// Program and arguments; `{port}` and `{model_dir}` are replaced, the command's own
    /// arguments appended.
    pub command: Vec<String>,
    /// The first port handed out (default: the engine's).
    pub port: Option<u16>,
    pub ready_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    /// The engine's image (pod driver).
    pub image: Option<String>,
}

/// One agent-managed model server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManaged {
    /// A DNS label; the runtime's name in reports.
    pub name: String,
    /// vllm, sglang, tgi, triton or custom: how it is probed and read.
    pub engine: String,
    /// Weights to cache, verify and pin before the server starts (`{model_dir}`).
    pub model: Option<RawModel>,
    /// The model id reported to the controller (its catalog name); default: `name`.
    pub model_name: Option<String>,
    /// Program and arguments; `{port}` and `{model_dir}` are replaced.
    pub command: Vec<String>,
    /// Default: the engine's.
    pub port: Option<u16>,
    /// CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES for the server.
    pub visible_devices: Option<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Default 10m.
    pub ready_timeout: Option<String>,
    /// SIGTERM to SIGKILL; shorter than shutdown_grace (default: shutdown_grace minus 1s).
    pub drain_timeout: Option<String>,
    /// The engine's image (pod driver).
    pub image: Option<String>,
    /// Device-plugin resources of its pod, e.g. {"nvidia.com/gpu": "1"} (pod driver;
    /// default: the resource of `visible_devices`).
    #[serde(default)]
    pub resources: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPartition {
    /// Partition spec file (mig-parted format).
    pub spec: Option<PathBuf>,
    /// Named config of the spec to apply at start.
    pub config: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: String,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    /// Per-pod network metrics from BPF (default true; off with a reason when not root).
    pub enabled: Option<bool>,
    /// Cgroup v2 directory to attach at; default: kubepods.slice or kubepods under the
    /// cgroup v2 mount.
    pub cgroup_root: Option<PathBuf>,
    pub collect_interval: Option<String>,
    /// How long a deleted pod's series stay (so the final values get scraped).
    pub forget_after: Option<String>,
    /// Declared serving ports whose bytes are counted per port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Peer classes, in order (first match by longest prefix); the rest is "internet".
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    /// Turn on the kernel's per-program run-time accounting (costs two clock reads a run).
    pub bpf_stats: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNeuron {
    /// Default: on when the driver's tree exists (or the simulated devices are Neuron ones).
    pub enabled: Option<bool>,
    /// Default /sys.
    pub sysfs_root: Option<PathBuf>,
    /// Default: from the devices' family and count ("inf2.48xlarge").
    pub instance_type: Option<String>,
    /// "auto" (neuron-monitor when on PATH), "off", or a command list.
    pub monitor: Option<serde_yaml_ng::Value>,
    /// Default 5s (neuron-monitor's own default period).
    pub collect_interval: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawImages {
    /// Default: on when the containerd socket exists.
    pub enabled: Option<bool>,
    /// Default /run/containerd/containerd.sock.
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace (default k8s.io, where the kubelet's images live).
    pub namespace: Option<String>,
    /// Image references to keep warm on the node (pulled at start, pinned).
    #[serde(default)]
    pub keep: Vec<String>,
    /// Registry credentials in Docker's config.json format (a mounted image pull secret of
    /// type kubernetes.io/dockerconfigjson).
    pub auth_file: Option<PathBuf>,
    /// Registries reached over plain HTTP (loopback registries always are).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Connections per pull for the ranged fetch (default 16); 0 turns the fast path off.
    pub connections: Option<usize>,
    /// Bytes per ranged GET (default 8Mi).
    pub chunk_size: Option<String>,
    /// How often wanted images are checked (default 1m).
    pub check_interval: Option<String>,
    /// How long a model's image stays pinned after its weights left the cache (default 1h).
    pub release_after: Option<String>,
    /// Serve pulled blobs to containerd's own pull as a registry mirror (default on; off:
    /// Hearth writes them through containerd's content API, which costs containerd more CPU).
    pub mirror: Option<bool>,
    /// containerd's registry host directory, its CRI `registry.config_path` (default
    /// /etc/containerd/certs.d); the mirror is announced there for the length of each pull.
    pub hosts_dir: Option<PathBuf>,
    /// A registry serving one connection faster than this many bytes/s is pulled directly by
    /// containerd, not through the fast path (default 200M; 0: never).
    pub direct_above: Option<String>,
    /// Where the mirror listens (default 127.0.0.1:0, any free port).
    pub mirror_listen: Option<String>,
    /// The IP containerd dials the mirror at (default: the listen address, or $POD_IP when
    /// it listens on all addresses, as in a pod off the host network).
    pub mirror_address: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_name: Option<String>,
    #[serde(default)]
    pub controller: RawController,
    pub http_listen: Option<String>,
    #[serde(default)]
    pub devices: RawDevices,
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub cache: RawCache,
    pub shutdown_grace: Option<String>,
    pub max_message_size: Option<String>,
    #[serde(default)]
    pub partition: RawPartition,
    #[serde(default)]
    pub kubernetes: RawKubernetes,
    /// Durable agent state (the partition record); default /var/lib/hearth.
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub runtimes: RawRuntimes,
    #[serde(default)]
    pub images: RawImages,
    #[serde(default)]
    pub neuron: RawNeuron,
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<Self, AgentConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_yaml(path, &text)
    }

    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, AgentConfigError> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        Ok(serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?)
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub url: String,
    pub server_name: String,
    /// None only in insecure mode.
    pub tls: Option<TlsFiles>,
    pub heartbeat_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceBackendKind {
    None,
    Simulated(Vec<SimSpec>),
    /// The node's NVIDIA GPUs through NVML.
    Nvml,
}

/// GPU metrics and attribution settings.
#[derive(Debug, Clone)]
pub struct GpuSettings {
    pub collect_interval: Duration,
    pub host_label: crate::gpu_metrics::render::HostLabel,
    pub nvml_library: Option<PathBuf>,
    pub pod_resources: crate::kube::podres::PodResSettings,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    /// None: node-local only, nothing reported.
    pub controller: Option<ControllerConfig>,
    pub http_listen: SocketAddr,
    pub devices: DeviceBackendKind,
    pub gpu: GpuSettings,
    pub procfs_root: PathBuf,
    pub collect_interval: Duration,
    pub exclude_interfaces: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub cache: CacheSettings,
    pub shutdown_grace: Duration,
    pub max_message_bytes: usize,
    /// Spec text and config name to apply at start.
    pub partition: Option<(String, String)>,
    pub state_dir: PathBuf,
    /// How to reach the Kubernetes API and what to do there; None: not in a cluster, or
    /// turned off.
    pub kubernetes: Option<crate::kube::KubeSettings>,
    pub network: NetworkSettings,
    pub runtimes: crate::runtime::RuntimeSettings,
    pub images: crate::images::ImageSettings,
    pub neuron: crate::neuron::subsystem::NeuronSettings,
}

pub use crate::netobs::NetworkSettings;

fn managed_spec(i: usize, m: RawManaged, grace: Duration, pods: bool) -> Result<crate::runtime::managed::ManagedSpec, AgentConfigError> {
    use crate::runtime::engine::{EngineSpec, Kind};
    let field = |f: &str| format!("runtimes.managed[{i}].{f}");
    let entry = |f: &str, expected: &str, got: String| ConfigError::Entry { field: field(f), expected: expected.into(), got };
    if !hearth_service::kube::is_dns_label(&m.name) {
        return Err(entry("name", "a DNS label (lowercase letters, digits, '-')", m.name).into());
    }
    let engine = Kind::parse(&m.engine).ok_or_else(|| entry("engine", "vllm, sglang, tgi, triton or custom", m.engine.clone()))?;
    if m.command.is_empty() {
        return Err(entry("command", "a program and its arguments", "[]".into()).into());
    }
    let model = match m.model {
        None => None,
        Some(r) => Some(
            crate::cache::spec::ModelSpec::new(&r.uri, &r.include, &r.exclude, &r.revision)
                .map_err(|e| entry("model", &e.to_string(), r.uri.clone()))?,
        ),
    };
    let d = |f: &str, v: Option<String>, default: &str| {
        parse_duration("runtimes.managed[].duration", v.as_deref().unwrap_or(default))
            .map_err(|_| entry(f, "a duration like \"30s\"", v.unwrap_or_default()))
    };
    let ready_timeout = d("ready_timeout", m.ready_timeout, "10m")?;
    let default_drain =
        humantime::format_duration(grace.saturating_sub(Duration::from_secs(1)).max(Duration::from_millis(500))).to_string();
    let drain_timeout = d("drain_timeout", m.drain_timeout, &default_drain)?;
    // A process cannot outlive the agent's container: its drain must fit the agent's own.
    // (A pod outlives the agent; the kubelet runs its drain.)
    if drain_timeout >= grace && !pods {
        return Err(entry(
            "drain_timeout",
            "shorter than shutdown_grace (the server is drained within the agent's own stop)",
            format!("{drain_timeout:?}"),
        )
        .into());
    }
    Ok(crate::runtime::managed::ManagedSpec {
        model_name: m.model_name.unwrap_or_else(|| m.name.clone()),
        name: m.name,
        engine,
        model,
        command: m.command,
        port: m.port.unwrap_or(EngineSpec::builtin(engine).port),
        visible_devices: m.visible_devices,
        env: m.env.into_iter().collect(),
        ready_timeout,
        drain_timeout,
        image: m.image,
        resources: m.resources,
    })
}

fn runtime_settings(r: RawRuntimes, grace: Duration) -> Result<crate::runtime::RuntimeSettings, AgentConfigError> {
    let pods = match r.driver.as_deref().unwrap_or("process") {
        "process" => false,
        "pod" => true,
        other => return Err(invalid("runtimes.driver", "process or pod", other)),
    };
    let label = r.discovery_label.unwrap_or_else(|| "hearth.dev/model".into());
    // A label key: an optional DNS prefix and a name of at most 63 characters.
    let name = label.rsplit_once('/').map_or(label.as_str(), |(_, n)| n);
    let valid = !name.is_empty() && crate::kube::is_label_value(name);
    if !label.is_empty() && !valid {
        return Err(invalid("runtimes.discovery_label", "a Kubernetes label key like \"hearth.dev/model\", or \"\"", label));
    }
    let interval = dur("runtimes.interval", r.interval, "5s")?;
    if interval < Duration::from_millis(100) {
        return Err(invalid("runtimes.interval", "at least 100ms", format!("{interval:?}")));
    }
    let timeout = dur("runtimes.timeout", r.timeout, "2s")?;
    // Saturating: an interval near Duration::MAX is "never", not a panic.
    if timeout.is_zero() || timeout > interval.max(Duration::from_secs(1)).saturating_mul(4) {
        return Err(invalid("runtimes.timeout", "more than 0 and at most 4 read intervals", format!("{timeout:?}")));
    }
    let mut managed = Vec::new();
    for (i, m) in r.managed.into_iter().enumerate() {
        let spec = managed_spec(i, m, grace, pods)?;
        if managed.iter().any(|o: &crate::runtime::managed::ManagedSpec| o.name == spec.name || o.port == spec.port) {
            return Err(ConfigError::Entry {
                field: format!("runtimes.managed[{i}]"),
                expected: "a name and port no other managed runtime has".into(),
                got: format!("{} on port {}", spec.name, spec.port),
            }
            .into());
        }
        managed.push(spec);
    }
    let mut engines = std::collections::BTreeMap::new();
    for (name, t) in r.engines {
        use crate::runtime::engine::{EngineSpec, Kind};
        let field = |f: &str| format!("runtimes.engines.{name}.{f}");
        let kind =
            Kind::parse(&name).ok_or_else(|| invalid("runtimes.engines", "keys vllm, sglang, tgi, triton or custom", name.clone()))?;
        if t.command.is_empty() {
            return Err(
                ConfigError::Entry { field: field("command"), expected: "a program and its arguments".into(), got: "[]".into() }.into()
            );
        }
        let d = |f: &str, v: Option<String>, default: &str| {
            parse_duration("runtimes.engines", v.as_deref().unwrap_or(default)).map_err(|_| ConfigError::Entry {
                field: field(f),
                expected: "a duration like \"30s\"".into(),
                got: v.clone().unwrap_or_default(),
            })
        };
        let drain_timeout = d(
            "drain_timeout",
            t.drain_timeout,
            &humantime::format_duration(grace.saturating_sub(Duration::from_secs(1)).max(Duration::from_millis(500))).to_string(),
        )?;
        if drain_timeout >= grace && !pods {
            return Err(ConfigError::Entry {
                field: field("drain_timeout"),
                expected: "shorter than shutdown_grace".into(),
                got: format!("{drain_timeout:?}"),
            }
            .into());
        }
        engines.insert(
            kind,
            crate::runtime::commands::EngineTemplate {
                command: t.command,
                port: t.port.unwrap_or(EngineSpec::builtin(kind).port),
                ready_timeout: d("ready_timeout", t.ready_timeout, "10m")?,
                drain_timeout,
                image: t.image,
            },
        );
    }
    let spot = if r.spot.enabled {
        let endpoint = r.spot.imds_endpoint.unwrap_or_else(|| "http://169.254.169.254".into());
        if !endpoint.starts_with("http://") {
            return Err(invalid("runtimes.spot.imds_endpoint", "an http:// URL (the metadata service speaks plain HTTP)", endpoint));
        }
        let every = dur("runtimes.spot.interval", r.spot.interval, "5s")?;
        if every < Duration::from_millis(100) || every > Duration::from_secs(60) {
            return Err(invalid("runtimes.spot.interval", "between 100ms and 60s (a notice gives two minutes)", format!("{every:?}")));
        }
        Some(crate::runtime::spot::SpotSettings { endpoint, interval: every })
    } else {
        None
    };
    let driver = match r.driver.as_deref().unwrap_or("process") {
        "process" => crate::runtime::DriverKind::Process,
        "pod" => {
            let namespace = r.pod.namespace.or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "hearth".into());
            if !hearth_service::kube::is_dns_label(&namespace) {
                return Err(invalid("runtimes.pod.namespace", "a namespace name (a DNS label)", namespace));
            }
            if let Some(m) = managed.iter().find(|m| m.image.is_none()) {
                return Err(invalid("runtimes.managed[].image", "an image for every managed runtime with driver: pod", m.name.clone()));
            }
            if let Some((k, _)) = engines.iter().find(|(_, t)| t.image.is_none()) {
                return Err(ConfigError::Entry {
                    field: format!("runtimes.engines.{}.image", k.as_str()),
                    expected: "an image (driver: pod)".into(),
                    got: String::new(),
                }
                .into());
            }
            crate::runtime::DriverKind::Pod(crate::runtime::pod::PodSettings {
                namespace,
                priority_class: r.pod.priority_class,
                host_cache_dir: r.pod.host_cache_dir,
            })
        }
        _ => unreachable!("checked above"),
    };
    Ok(crate::runtime::RuntimeSettings {
        discovery_label: (!label.is_empty()).then_some(label),
        interval,
        timeout,
        managed,
        engines,
        spot,
        driver,
    })
}

fn neuron_settings(r: RawNeuron) -> Result<crate::neuron::subsystem::NeuronSettings, AgentConfigError> {
    use crate::neuron::subsystem::{MonitorCommand, NeuronSettings};
    let mut s = NeuronSettings { enabled: r.enabled, instance_type: r.instance_type, ..Default::default() };
    if let Some(p) = r.sysfs_root {
        s.sysfs_root = p;
    }
    if let Some(t) = &s.instance_type
        && hearth_proto::neuron::Topology::of(t, None).is_err()
    {
        let known: Vec<&str> = hearth_proto::neuron::INSTANCE_TYPES.iter().map(|t| t.instance_type).collect();
        return Err(invalid("neuron.instance_type", format!("a Neuron instance type: {}", known.join(", ")), t.clone()));
    }
    let expected = "\"auto\", \"off\" or a command list like [neuron-monitor, -c, /etc/neuron-monitor.json]";
    s.monitor = match r.monitor {
        None => MonitorCommand::Auto,
        Some(serde_yaml_ng::Value::String(v)) if v == "auto" => MonitorCommand::Auto,
        Some(serde_yaml_ng::Value::String(v)) if v == "off" => MonitorCommand::Off,
        Some(serde_yaml_ng::Value::Sequence(items)) => {
            let cmd: Option<Vec<String>> = items.iter().map(|i| i.as_str().map(str::to_owned)).collect();
            match cmd {
                Some(c) if !c.is_empty() && !c[0].is_empty() => MonitorCommand::Command(c),
                _ => return Err(invalid("neuron.monitor", expected, format!("{items:?}"))),
            }
        }
        Some(other) => return Err(invalid("neuron.monitor", expected, format!("{other:?}"))),
    };
    s.collect_interval = dur("neuron.collect_interval", r.collect_interval, "5s")?;
    if s.collect_interval < Duration::from_millis(100) {
        return Err(invalid("neuron.collect_interval", "at least 100ms", format!("{:?}", s.collect_interval)));
    }
    Ok(s)
}

fn image_settings(r: RawImages) -> Result<crate::images::ImageSettings, AgentConfigError> {
    use crate::images::reference::Reference;
    let mut s = crate::images::ImageSettings { enabled: r.enabled, ..Default::default() };
    if let Some(p) = r.containerd_socket {
        s.socket = p;
    }
    if let Some(ns) = r.namespace {
        if !hearth_service::kube::is_dns_label(&ns) && !ns.split('.').all(hearth_service::kube::is_dns_label) {
            return Err(invalid("images.namespace", "a containerd namespace (letters, digits, '.', '-')", ns));
        }
        s.namespace = ns;
    }
    for (i, k) in r.keep.iter().enumerate() {
        let parsed = Reference::parse(k).map_err(|e| ConfigError::Entry {
            field: format!("images.keep[{i}]"),
            expected: e.expected.into(),
            got: k.clone(),
        })?;
        s.keep.push(parsed);
    }
    if let Some(path) = r.auth_file {
        let text = std::fs::read(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        s.credentials = crate::images::cli::docker_auths(&text)
            .map_err(|e| invalid("images.auth_file", format!("Docker config.json with \"auths\" ({e})"), path.display().to_string()))?;
    }
    s.insecure = r.insecure_registries;
    match r.connections {
        Some(0) => s.pull.fast = false,
        Some(n) if n > 256 => return Err(invalid("images.connections", "0 (plain CRI pulls) to 256", n.to_string())),
        Some(n) => s.pull.connections = n,
        None => {}
    }
    if let Some(c) = r.chunk_size {
        let n = parse_size("images.chunk_size", &c)?;
        if !(1 << 20..=64 << 20).contains(&n) {
            return Err(invalid("images.chunk_size", "1Mi to 64Mi", c));
        }
        s.pull.chunk = n;
    }
    s.check_interval = dur("images.check_interval", r.check_interval, "1m")?;
    if s.check_interval < Duration::from_secs(1) {
        return Err(invalid("images.check_interval", "at least 1s", format!("{:?}", s.check_interval)));
    }
    s.release_after = dur("images.release_after", r.release_after, "1h")?;
    if let Some(d) = r.direct_above {
        s.pull.direct_above = parse_size("images.direct_above", &d)?;
    }
    if r.mirror.unwrap_or(true) {
        let listen = r.mirror_listen.unwrap_or_else(|| "127.0.0.1:0".into());
        let listen: std::net::SocketAddr = listen
            .parse()
            .map_err(|_| invalid("images.mirror_listen", "an IP:port such as 0.0.0.0:0 or 127.0.0.1:5080", listen.clone()))?;
        let address = match r.mirror_address.or_else(|| listen.ip().is_unspecified().then(|| std::env::var("POD_IP").ok()).flatten()) {
            Some(a) => Some(
                a.parse::<std::net::IpAddr>().map_err(|_| invalid("images.mirror_address", "an IP address (or set POD_IP)", a.clone()))?,
            ),
            None if listen.ip().is_unspecified() => {
                return Err(invalid(
                    "images.mirror_address",
                    "the IP containerd dials this agent at, when mirror_listen is on all addresses (or set POD_IP)",
                    "nothing".to_owned(),
                ));
            }
            None => None,
        };
        s.mirror = Some(crate::images::MirrorSettings {
            hosts_dir: r.hosts_dir.unwrap_or_else(|| "/etc/containerd/certs.d".into()),
            listen,
            address,
        });
    }
    Ok(s)
}

fn network_settings(r: RawNetwork) -> Result<NetworkSettings, AgentConfigError> {
    let collect_interval = dur("network.collect_interval", r.collect_interval, "10s")?;
    if collect_interval < Duration::from_millis(100) {
        return Err(invalid("network.collect_interval", "at least 100ms", format!("{collect_interval:?}")));
    }
    let forget_after = dur("network.forget_after", r.forget_after, "5m")?;
    if let Some(p) = r.ports.iter().find(|p| **p == 0) {
        return Err(invalid("network.ports", "ports 1-65535", p.to_string()));
    }
    if r.ports.len() > 64 {
        return Err(invalid("network.ports", "at most 64 ports", r.ports.len().to_string()));
    }
    let mut peers = Vec::new();
    for p in r.peers {
        if p.name.is_empty() || p.name == "internet" || peers.iter().any(|q: &crate::netobs::PeerClass| q.name == p.name) {
            return Err(invalid("network.peers", "unique names other than \"internet\" (the class of everything else)", p.name));
        }
        let cidrs: Vec<&str> = p.cidrs.iter().map(String::as_str).collect();
        peers.push(crate::netobs::PeerClass::parse(&p.name, &cidrs).map_err(|e| invalid("network.peers", e.to_string(), p.name.clone()))?);
    }
    if peers.len() > 255 {
        return Err(invalid("network.peers", "at most 255 classes", peers.len().to_string()));
    }
    Ok(NetworkSettings {
        enabled: r.enabled.unwrap_or(true),
        cgroup_root: r.cgroup_root,
        collect_interval,
        forget_after,
        ports: r.ports,
        peers,
        bpf_stats: r.bpf_stats.unwrap_or(false),
        static_pods: Default::default(),
        off_reason: None,
    })
}

/// The cache as configured: engine settings and the models to keep warm (and whether pinned).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub config: crate::cache::manager::CacheConfig,
    pub models: Vec<(crate::cache::spec::ModelSpec, bool)>,
}

fn kube_settings(r: RawKubernetes) -> Result<Option<crate::kube::KubeSettings>, AgentConfigError> {
    use crate::kube::{KubeSettings, KubeSource, SA_DIR};
    let source = match (r.api_server, r.kubeconfig) {
        (Some(_), Some(k)) => {
            return Err(invalid("kubernetes.kubeconfig", "either kubeconfig or api_server, not both", k.display().to_string()));
        }
        (Some(url), None) => {
            if !url.starts_with("https://") {
                return Err(invalid("kubernetes.api_server", "an https:// URL", url));
            }
            Some(KubeSource::Explicit {
                api_server: url,
                token_file: r.token_file.unwrap_or_else(|| format!("{SA_DIR}/token").into()),
                ca_file: r.ca_file.unwrap_or_else(|| format!("{SA_DIR}/ca.crt").into()),
            })
        }
        (None, Some(path)) => {
            if !path.is_file() {
                return Err(invalid("kubernetes.kubeconfig", "a readable kubeconfig file", path.display().to_string()));
            }
            Some(KubeSource::Kubeconfig(path))
        }
        (None, None) => std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| KubeSource::InCluster),
    };
    let source = match (r.enabled, source) {
        (Some(false), _) => return Ok(None),
        (Some(true), None) => {
            return Err(invalid(
                "kubernetes.enabled",
                "kubernetes.kubeconfig, kubernetes.api_server, or running in a cluster (KUBERNETES_SERVICE_HOST)",
                "true",
            ));
        }
        (None, None) => return Ok(None),
        (_, Some(s)) => s,
    };
    Ok(Some(KubeSettings {
        source,
        label_node: r.label_node.unwrap_or(true),
        pod_names: r.pod_names.unwrap_or(true),
        events: r.events.unwrap_or(true),
        health_condition: r.health.condition.unwrap_or(true),
        health_taint: r.health.taint.unwrap_or(false),
    }))
}

fn cache_settings(r: RawCache) -> Result<CacheSettings, AgentConfigError> {
    use crate::cache::fetch::{FetchConfig, WriteMode};
    let root = r.root.unwrap_or_else(crate::cache::default_root);
    let capacity = r.capacity.as_deref().map(|c| parse_size("cache.capacity", c)).transpose()?;
    let high = r.high_watermark.unwrap_or(0.90);
    let low = r.low_watermark.unwrap_or(0.80);
    if !(0.0 < low && low < high && high <= 1.0) {
        return Err(invalid("cache.low_watermark/high_watermark", "0 < low < high <= 1", format!("low {low}, high {high}")));
    }
    let part_size = parse_size("cache.part_size", r.part_size.as_deref().unwrap_or("8Mi"))?;
    if !((64 << 10)..=(1 << 30)).contains(&part_size) {
        return Err(invalid("cache.part_size", "between 64Ki and 1Gi", format!("{part_size}")));
    }
    let concurrency = r.concurrency.unwrap_or(16);
    if !(1..=1024).contains(&concurrency) {
        return Err(invalid("cache.concurrency", "1 to 1024", concurrency.to_string()));
    }
    let limit = r.limit_rate.as_deref().map(|l| parse_size("cache.limit_rate", l)).transpose()?;
    let write_mode = match r.write_mode.as_deref().unwrap_or("auto") {
        "auto" => WriteMode::Auto,
        "direct" => WriteMode::Direct,
        "buffered" => WriteMode::Buffered,
        other => {
            return Err(invalid("cache.write_mode", "auto, direct or buffered", other));
        }
    };
    let mut models = Vec::new();
    for (i, m) in r.models.into_iter().enumerate() {
        let spec = crate::cache::spec::ModelSpec::new(&m.uri, &m.include, &m.exclude, &m.revision)
            .map_err(|e| AgentConfigError::Invalid { field: "cache.models", expected: format!("entry {i}: {e}"), got: m.uri.clone() })?;
        models.push((spec, m.pin));
    }
    Ok(CacheSettings {
        config: crate::cache::manager::CacheConfig {
            root,
            capacity,
            high_watermark: high,
            low_watermark: low,
            fetch: FetchConfig {
                part_size: part_size as usize,
                concurrency,
                write_mode,
                limit: limit.map(|l| std::sync::Arc::new(crate::cache::ratelimit::RateLimiter::new(l))),
                ..Default::default()
            },
            s3: crate::cache::source::s3::S3Options {
                endpoint: r.s3.endpoint,
                region: r.s3.region,
                force_path_style: r.s3.force_path_style,
            },
        },
        models,
    })
}

pub use crate::node::DEFAULT_EXCLUDED_INTERFACES;

fn default_node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "localhost".into())
}

fn dur(field: &'static str, v: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(field, v.as_deref().unwrap_or(default))
}

impl TryFrom<RawConfig> for Config {
    type Error = AgentConfigError;

    fn try_from(r: RawConfig) -> Result<Self, Self::Error> {
        let node_name = r.node_name.unwrap_or_else(default_node_name);
        hearth_proto::convert::validate_node_name(&node_name)
            .map_err(|_| invalid("node_name", "a Kubernetes node name (lowercase RFC 1123 subdomain)", &node_name))?;

        let controller = match r.controller.url.clone() {
            None => None,
            Some(url) => {
                let c = r.controller;
                let (scheme, rest) =
                    url.split_once("://").ok_or_else(|| invalid("controller.url", "a URL like \"https://controller:7443\"", &url))?;
                let host = rest.split('/').next().unwrap_or("");
                let host_only = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_matches(['[', ']']);
                if host_only.is_empty() {
                    return Err(invalid("controller.url", "a URL with a host", &url));
                }
                match (scheme, c.insecure) {
                    ("https", _) | ("http", true) => {}
                    ("http", false) => {
                        return Err(invalid(
                            "controller.url",
                            "https:// (plain http:// only with controller.insecure or --insecure)",
                            &url,
                        ));
                    }
                    _ => return Err(invalid("controller.url", "an https:// URL", &url)),
                }
                let tls = if scheme == "https" { c.tls.resolve(false)? } else { None };
                let heartbeat_interval = dur("controller.heartbeat_interval", c.heartbeat_interval, "5s")?;
                if heartbeat_interval < Duration::from_millis(100) {
                    return Err(invalid("controller.heartbeat_interval", "at least 100ms", format!("{heartbeat_interval:?}")));
                }
                let backoff_initial = dur("controller.backoff_initial", c.backoff_initial, "500ms")?;
                let backoff_max = dur("controller.backoff_max", c.backoff_max, "30s")?;
                if backoff_max < backoff_initial {
                    return Err(invalid("controller.backoff_max", "at least controller.backoff_initial", format!("{backoff_max:?}")));
                }
                Some(ControllerConfig {
                    server_name: c.server_name.unwrap_or_else(|| host_only.to_owned()),
                    url,
                    tls,
                    heartbeat_interval,
                    backoff_initial,
                    backoff_max,
                })
            }
        };

        let devices = match r.devices.backend.as_deref() {
            None if r.devices.simulated.is_empty() => DeviceBackendKind::None,
            Some("none") => DeviceBackendKind::None,
            None | Some("simulated") => {
                if r.devices.simulated.is_empty() {
                    return Err(invalid("devices.simulated", "at least one entry like \"2xH100-80GB\"", "[]"));
                }
                let specs = r
                    .devices
                    .simulated
                    .iter()
                    .map(|s| SimSpec::parse(s).map_err(|e| invalid("devices.simulated", e, s)))
                    .collect::<Result<_, _>>()?;
                DeviceBackendKind::Simulated(specs)
            }
            Some("nvml") => DeviceBackendKind::Nvml,
            Some(other) => {
                return Err(invalid("devices.backend", "\"none\", \"simulated\" or \"nvml\"", other));
            }
        };
        let gpu_every = dur("devices.collect_interval", r.devices.collect_interval, "10s")?;
        if gpu_every < Duration::from_millis(100) {
            return Err(invalid("devices.collect_interval", "at least 100ms", format!("{gpu_every:?}")));
        }
        let podres_every = dur("devices.pod_resources_interval", r.devices.pod_resources_interval, "10s")?;
        if podres_every < Duration::from_millis(100) {
            return Err(invalid("devices.pod_resources_interval", "at least 100ms", format!("{podres_every:?}")));
        }
        let gpu = GpuSettings {
            collect_interval: gpu_every,
            host_label: {
                let name = r.devices.hostname_label_name.unwrap_or_else(|| "Hostname".into());
                if !(name.is_empty()
                    || (name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')))
                {
                    return Err(invalid("devices.hostname_label_name", "a Prometheus label name like \"Hostname\", or \"\"", name));
                }
                crate::gpu_metrics::render::HostLabel { name, value: r.devices.hostname_label.unwrap_or_else(|| node_name.clone()) }
            },
            nvml_library: r.devices.nvml_library,
            pod_resources: crate::kube::podres::PodResSettings {
                dir: r.devices.pod_resources_dir.unwrap_or_else(|| crate::kube::podres::DEFAULT_DIR.into()),
                every: podres_every,
                timeout: Duration::from_secs(5),
                // Saturating: an interval past Duration::MAX / 3 is "never", and so is its staleness.
                stale_after: podres_every.saturating_mul(3),
            },
        };

        let http_listen_s = r.http_listen.unwrap_or_else(|| "0.0.0.0:9400".into());
        let http_listen = http_listen_s.parse().map_err(|_| invalid("http_listen", "an address like \"0.0.0.0:9400\"", &http_listen_s))?;
        let collect_interval = dur("node.collect_interval", r.node.collect_interval, "10s")?;
        if collect_interval < Duration::from_millis(100) {
            return Err(invalid("node.collect_interval", "at least 100ms", format!("{collect_interval:?}")));
        }
        let cache = cache_settings(r.cache)?;
        let partition = match (r.partition.spec, r.partition.config) {
            (None, None) => None,
            (Some(path), Some(config)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid("partition.spec", "a readable spec file", format!("{} ({e})", path.display())))?;
                let spec = crate::partition::spec::Spec::parse(&text)
                    .map_err(|e| invalid("partition.spec", format!("a valid spec ({e})"), path.display().to_string()))?;
                spec.config(&config).map_err(|e| invalid("partition.config", e.to_string(), &config))?;
                // The name becomes the value of a Node label: an invalid one would be refused by
                // the API server on every write.
                if !crate::kube::is_label_value(&config) {
                    return Err(invalid("partition.config", crate::kube::LABEL_VALUE_RULE, &config));
                }
                Some((text, config))
            }
            (Some(_), None) => return Err(invalid("partition.config", "a config name from the spec", "nothing")),
            (None, Some(c)) => return Err(invalid("partition.spec", "a spec file to take the config from", c)),
        };
        let max = parse_size("max_message_size", r.max_message_size.as_deref().unwrap_or(&DEFAULT_MAX_MESSAGE_BYTES.to_string()))?;
        let kubernetes = kube_settings(r.kubernetes)?;
        let runtimes = runtime_settings(r.runtimes, dur("shutdown_grace", r.shutdown_grace.clone(), "5s")?)?;
        if matches!(runtimes.driver, crate::runtime::DriverKind::Pod(_)) && kubernetes.is_none() {
            return Err(invalid(
                "runtimes.driver",
                "process, or pod with the Kubernetes API configured (kubernetes:, or running in a cluster)",
                "pod",
            ));
        }
        Ok(Self {
            node_name,
            controller,
            http_listen,
            devices,
            gpu,
            procfs_root: r.node.procfs_root.unwrap_or_else(|| "/proc".into()),
            collect_interval,
            exclude_interfaces: r
                .node
                .exclude_interfaces
                .unwrap_or_else(|| DEFAULT_EXCLUDED_INTERFACES.iter().map(|s| (*s).to_owned()).collect()),
            labels: r.node.labels,
            cache,
            shutdown_grace: dur("shutdown_grace", r.shutdown_grace.clone(), "5s")?,
            max_message_bytes: max as usize,
            partition,
            kubernetes,
            state_dir: r.state_dir.unwrap_or_else(|| "/var/lib/hearth".into()),
            network: network_settings(r.network)?,
            runtimes,
            images: image_settings(r.images)?,
            neuron: neuron_settings(r.neuron)?,
        })
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, AgentConfigError> {
        Config::try_from(RawConfig::from_yaml(Path::new("agent.yaml"), yaml)?)
    }

    #[test]
    fn neuron_section_is_validated_naming_the_field() {
        use crate::neuron::subsystem::MonitorCommand;
        let c = parse("node_name: n1").unwrap();
        assert_eq!((c.neuron.enabled, &c.neuron.monitor), (None, &MonitorCommand::Auto));
        let c = parse("node_name: n1\nneuron: {monitor: [neuron-monitor, -c, /etc/nm.json], instance_type: trn1.32xlarge}").unwrap();
        assert_eq!(c.neuron.monitor, MonitorCommand::Command(vec!["neuron-monitor".into(), "-c".into(), "/etc/nm.json".into()]));
        assert_eq!(parse("node_name: n1\nneuron: {monitor: off}").unwrap().neuron.monitor, MonitorCommand::Off);
        let e = parse("node_name: n1\nneuron: {monitor: sometimes}").unwrap_err().to_string();
        assert!(e.starts_with("neuron.monitor: expected \"auto\", \"off\" or a command list"), "{e}");
        let e = parse("node_name: n1\nneuron: {instance_type: p5.48xlarge}").unwrap_err().to_string();
        assert!(e.starts_with("neuron.instance_type: expected a Neuron instance type: inf2.xlarge,"), "{e}");
        let e = parse("node_name: n1\ndevices: {simulated: [inf2.48xlarge]}").unwrap();
        assert!(matches!(&e.devices, DeviceBackendKind::Simulated(s) if s[0].count == 12 && s[0].instance.is_some()));
    }

    #[test]
    fn images_section_is_validated_naming_the_field() {
        let c = parse("node_name: n1\nimages: {keep: [vllm/vllm-openai:v0.6.3], connections: 0}").unwrap();
        assert_eq!(c.images.keep[0].to_string(), "docker.io/vllm/vllm-openai:v0.6.3");
        assert!(!c.images.pull.fast, "connections: 0 means plain CRI pulls");
        // The mirror: on by default on loopback, announced in containerd's usual directory.
        let m = parse("node_name: n1").unwrap().images.mirror.expect("mirror on by default");
        assert_eq!(m.hosts_dir, std::path::Path::new("/etc/containerd/certs.d"));
        assert_eq!((m.listen.to_string().as_str(), m.address), ("127.0.0.1:0", None));
        let m = parse("node_name: n1\nimages: {mirror_listen: '0.0.0.0:5080', mirror_address: 10.1.2.3, hosts_dir: /etc/k3s/certs.d}")
            .unwrap()
            .images
            .mirror
            .unwrap();
        assert_eq!((m.listen.port(), m.address), (5080, Some("10.1.2.3".parse().unwrap())));
        assert!(parse("node_name: n1\nimages: {mirror: false}").unwrap().images.mirror.is_none());
        assert_eq!(parse("node_name: n1").unwrap().images.pull.direct_above, 200_000_000);
        assert_eq!(parse("node_name: n1\nimages: {direct_above: '0'}").unwrap().images.pull.direct_above, 0);
        let e = parse("node_name: n1\nimages: {direct_above: fast}").unwrap_err().to_string();
        assert!(e.starts_with("images.direct_above:"), "{e}");
        let e = parse("node_name: n1\nimages: {mirror_listen: 'localhost'}").unwrap_err().to_string();
        assert!(e.starts_with("images.mirror_listen: expected an IP:port"), "{e}");
        let e = parse("node_name: n1\nimages: {mirror_address: pod}").unwrap_err().to_string();
        assert!(e.starts_with("images.mirror_address: expected an IP address"), "{e}");
        if std::env::var_os("POD_IP").is_none() {
            let e = parse("node_name: n1\nimages: {mirror_listen: '0.0.0.0:0'}").unwrap_err().to_string();
            assert!(e.starts_with("images.mirror_address: expected the IP containerd dials"), "{e}");
        }
        assert_eq!(c.images.enabled, None, "on when the socket is there");
        let e = parse("node_name: n1\nimages: {keep: [ok, 'Bad Ref']}").unwrap_err().to_string();
        assert!(e.starts_with("images.keep[1]: expected"), "{e}");
        let e = parse("node_name: n1\nimages: {connections: 1000}").unwrap_err().to_string();
        assert_eq!(e, "images.connections: expected 0 (plain CRI pulls) to 256, got \"1000\"");
        let e = parse("node_name: n1\nimages: {chunk_size: 100Mi}").unwrap_err().to_string();
        assert_eq!(e, "images.chunk_size: expected 1Mi to 64Mi, got \"100Mi\"");
        let e = parse("node_name: n1\nimages: {auth_file: /nonexistent/auth.json}").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/auth.json"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth.json");
        std::fs::write(&auth, "{\"auths\": {\"r.io\": {\"auth\": \"dTpw\"}}}").unwrap();
        let c = parse(&format!("node_name: n1\nimages: {{auth_file: {}}}", auth.display())).unwrap();
        assert_eq!(c.images.credentials["r.io"].username, "u");
        std::fs::write(&auth, "not json").unwrap();
        let e = parse(&format!("node_name: n1\nimages: {{auth_file: {}}}", auth.display())).unwrap_err().to_string();
        assert!(e.starts_with("images.auth_file: expected Docker config.json"), "{e}");
    }

    #[test]
    fn minimal_config_runs_node_local() {
        let c = parse("node_name: n1").expect("valid");
        assert!(c.controller.is_none());
        assert_eq!(c.devices, DeviceBackendKind::None);
        assert_eq!(c.collect_interval, Duration::from_secs(10));
    }

    #[test]
    fn kubernetes_and_partition_sections_are_validated() {
        let e = parse("node_name: n1\nkubernetes: {api_server: \"http://10.0.0.1\"}").unwrap_err().to_string();
        assert_eq!(e, "kubernetes.api_server: expected an https:// URL, got \"http://10.0.0.1\"");
        let c = parse("node_name: n1\nkubernetes: {api_server: \"https://10.0.0.1:6443\", token_file: /t}").unwrap();
        let k = c.kubernetes.unwrap();
        let crate::kube::KubeSource::Explicit { api_server, token_file, .. } = &k.source else { panic!("{k:?}") };
        assert_eq!((api_server.as_str(), token_file.to_str().unwrap()), ("https://10.0.0.1:6443", "/t"));
        // Turning labels off leaves pod names, events and health on (they used to go together).
        let k = parse("node_name: n1\nkubernetes: {api_server: \"https://x\", label_node: false}").unwrap().kubernetes.unwrap();
        assert!(!k.label_node && k.pod_names && k.events && k.health_condition && !k.health_taint, "{k:?}");
        assert!(parse("node_name: n1\nkubernetes: {api_server: \"https://x\", enabled: false}").unwrap().kubernetes.is_none());
        let e = parse("node_name: n1\nkubernetes: {kubeconfig: /nonexistent/kubeconfig}").unwrap_err().to_string();
        assert_eq!(e, "kubernetes.kubeconfig: expected a readable kubeconfig file, got \"/nonexistent/kubeconfig\"");
        let e = parse("node_name: n1\nkubernetes: {enabled: true}").unwrap_err().to_string();
        assert!(e.starts_with("kubernetes.enabled: expected kubernetes.kubeconfig"), "{e}");
        let e = parse("node_name: n1\npartition: {config: balanced}").unwrap_err().to_string();
        assert!(e.starts_with("partition.spec: expected a spec file"), "{e}");
        let e = parse("node_name: n1\ndevices: {hostname_label_name: \"host name\"}").unwrap_err().to_string();
        assert!(e.starts_with("devices.hostname_label_name: expected a Prometheus label name"), "{e}");
    }

    #[test]
    fn network_section_is_validated() {
        let c = parse("node_name: n1").unwrap();
        assert!(c.network.enabled && c.network.peers.is_empty() && c.network.cgroup_root.is_none());
        let c = parse(
            "node_name: n1\nnetwork: {ports: [8000], peers: [{name: pods, cidrs: [10.244.0.0/16]}, {name: s3, cidrs: [52.216.0.0/15]}]}",
        )
        .unwrap();
        assert_eq!((c.network.ports.as_slice(), c.network.peers.len()), (&[8000u16][..], 2));
        let e = |y: &str| parse(&format!("node_name: n1\nnetwork: {y}")).unwrap_err().to_string();
        assert_eq!(e("{ports: [0]}"), "network.ports: expected ports 1-65535, got \"0\"");
        assert!(e("{peers: [{name: internet, cidrs: [1.0.0.0/8]}]}").starts_with("network.peers: expected unique names"));
        assert!(e("{peers: [{name: a, cidrs: [1.0.0.0/8]}, {name: a, cidrs: [2.0.0.0/8]}]}").starts_with("network.peers: expected unique"));
        assert_eq!(
            e("{peers: [{name: pods, cidrs: [10.0.0.0/40]}]}"),
            "network.peers: expected peer class \"pods\": expected a CIDR like 10.0.0.0/8 or fd00::/8, got \"10.0.0.0/40\", got \"pods\""
        );
        assert_eq!(e("{collect_interval: 1ms}"), "network.collect_interval: expected at least 100ms, got \"1ms\"");
    }

    #[test]
    fn simulated_devices_parse() {
        let c = parse("node_name: n1\ndevices: {simulated: [2xH100-80GB, 1xinf2]}").expect("valid");
        let DeviceBackendKind::Simulated(s) = c.devices else { panic!("simulated expected") };
        assert_eq!(s.iter().map(|s| s.count).sum::<u32>(), 3);
    }

    #[test]
    fn errors_name_field_and_expectation() {
        let e = parse("node_name: n1\ndevices: {simulated: [2xB300]}").unwrap_err().to_string();
        assert!(e.starts_with("devices.simulated: expected a product"), "{e}");
        let e = parse("node_name: Bad_Name").unwrap_err().to_string();
        assert!(e.starts_with("node_name: expected a Kubernetes node name"), "{e}");
        let e = parse("node_name: n1\ncontroller: {url: 'http://c:1'}").unwrap_err().to_string();
        assert!(e.contains("plain http:// only with controller.insecure"), "{e}");
        let e = parse("node_name: n1\ncontroller: {url: 'https://c:1'}").unwrap_err().to_string();
        assert!(e.contains("ca, cert and key are required"), "{e}");
        let e = parse("node_name: n1\nnode: {collect_interval: often}").unwrap_err().to_string();
        assert_eq!(e, "node.collect_interval: expected a duration like \"15s\" or \"500ms\", got \"often\"");
        let e = parse("node_name: n1\ncache: {rooot: /x}").unwrap_err().to_string();
        assert!(e.contains("unknown field `rooot`"), "{e}");
        let e = parse("node_name: n1\ncache: {models: [{uri: 's3://bkt/a/'}, {uri: 'http://x/y'}]}").unwrap_err().to_string();
        assert!(e.starts_with("cache.models: expected entry 1: model URI \"http://x/y\""), "{e}");
        let e = parse("node_name: n1\ncache: {high_watermark: 0.5, low_watermark: 0.7}").unwrap_err().to_string();
        assert!(e.contains("0 < low < high <= 1"), "{e}");
        let e = parse("node_name: n1\ncache: {capacity: lots}").unwrap_err().to_string();
        assert_eq!(e, "cache.capacity: expected a size like \"4Mi\", \"500Gi\" or a number of bytes, got \"lots\"");
    }

    #[test]
    fn the_pod_driver_needs_the_api_images_and_a_namespace() {
        let m = "managed: [{name: a, engine: vllm, command: [x], drain_timeout: 30s, image: vllm/vllm-openai}]";
        let kube = "kubernetes: {api_server: \"https://x\", token_file: /t, ca_file: /c}";
        let e = |y: &str| parse(&format!("node_name: n1\n{y}")).unwrap_err().to_string();
        assert_eq!(e("runtimes: {driver: vm}"), "runtimes.driver: expected process or pod, got \"vm\"");
        assert!(
            e(&format!("runtimes: {{driver: pod, {m}}}")).starts_with("runtimes.driver: expected process, or pod with the Kubernetes API")
        );
        assert_eq!(
            e(&format!("{kube}\nruntimes: {{driver: pod, managed: [{{name: a, engine: vllm, command: [x]}}]}}")),
            "runtimes.managed[].image: expected an image for every managed runtime with driver: pod, got \"a\""
        );
        assert!(
            e(&format!("{kube}\nruntimes: {{driver: pod, engines: {{vllm: {{command: [x]}}}}}}"))
                .starts_with("runtimes.engines.vllm.image")
        );
        assert!(e(&format!("{kube}\nruntimes: {{driver: pod, pod: {{namespace: Serving}}, {m}}}")).starts_with("runtimes.pod.namespace"));
        // A pod outlives the agent: its drain may be longer than the agent's grace; a process's may not.
        let c = parse(&format!("node_name: n1\n{kube}\nruntimes: {{driver: pod, pod: {{namespace: serving}}, {m}}}")).unwrap();
        let crate::runtime::DriverKind::Pod(p) = &c.runtimes.driver else { panic!("{:?}", c.runtimes.driver) };
        assert_eq!((p.namespace.as_str(), c.runtimes.managed[0].drain_timeout), ("serving", Duration::from_secs(30)));
        assert!(e(&format!("runtimes: {{{m}}}")).starts_with("runtimes.managed[0].drain_timeout: expected shorter than shutdown_grace"));
    }

    #[test]
    fn controller_server_name_defaults_to_url_host() {
        let c = parse("node_name: n1\ncontroller: {url: 'https://ctl.example:7443', tls: {ca: a, cert: b, key: c}}").expect("valid");
        assert_eq!(c.controller.expect("controller").server_name, "ctl.example");
    }
}
