//! The model deployments the controller places and scales, from the `models:` section of its
//! config: where the weights live, how big they are, which image serves them, what one
//! replica needs and how it scales. Placement and scaling requests name a model; an unknown
//! name is NotFound at the API. Validated at start so a typo fails before anything listens.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use hearth_service::config::{ConfigError, parse_duration, parse_size};

/// What one replica needs from a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Whole NVIDIA GPUs (MIG off), all on one node.
    Gpus(u32),
    /// One MIG GPU instance of this profile name ("3g.40gb").
    Mig(String),
    /// Contiguous Neuron cores on one node.
    NeuronCores(u32),
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRequest::Gpus(n) => write!(f, "{n} whole GPU(s)"),
            DeviceRequest::Mig(p) => write!(f, "one MIG {p} instance"),
            DeviceRequest::NeuronCores(n) => write!(f, "{n} contiguous Neuron core(s)"),
        }
    }
}

/// How a model deployment scales (Knative KPA-like; see `scaling`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingSpec {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests (waiting + running) one replica should carry on average.
    pub target_concurrency: f64,
    /// KV-cache use one replica should stay under (0..1); a second signal next to concurrency.
    pub target_kv_cache: f64,
    /// TTFT p50 above this asks for more replicas regardless of concurrency; 0 = unused.
    pub target_ttft: Duration,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic mode starts when the panic-window demand reaches this many times the current capacity.
    pub panic_threshold: f64,
    /// Desired replicas within this fraction of the current count are not acted on.
    pub tolerance: f64,
    /// A scale-down waits until the lower recommendation has held this long.
    pub scale_down_delay: Duration,
    /// With `min_replicas: 0`, no traffic for this long scales to zero.
    pub scale_to_zero_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// "s3://bucket/prefix" or "file:///fsx/path": what agents prefetch.
    pub source_uri: String,
    pub revision: String,
    /// Total weight bytes.
    pub bytes: u64,
    pub image: String,
    pub image_bytes: u64,
    /// "vllm", "sglang", "tgi", "triton", "custom".
    pub runtime: String,
    pub device: DeviceRequest,
    /// Host memory one replica needs.
    pub memory_bytes: u64,
    pub scaling: ScalingSpec,
    pub serve: Serve,
}

/// Who creates a model's replicas.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Serve {
    /// The controller starts and stops replicas itself, as agent-managed runtimes
    /// (StartRuntime on nodes placement picks); otherwise something else creates them (a
    /// Deployment, KServe, an operator) and the controller only decides and publishes.
    pub agent_managed: bool,
    /// Extra engine arguments of each replica.
    pub args: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub gpus: Option<u32>,
    pub mig: Option<String>,
    pub neuron_cores: Option<u32>,
    #[serde(default = "zero")]
    pub memory: String,
}

fn zero() -> String {
    "0".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawScaling {
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_concurrency: Option<f64>,
    pub target_kv_cache: Option<f64>,
    pub target_ttft: Option<String>,
    pub stable_window: Option<String>,
    pub panic_window: Option<String>,
    pub panic_threshold: Option<f64>,
    pub tolerance: Option<f64>,
    pub scale_down_delay: Option<String>,
    pub scale_to_zero_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub source: String,
    #[serde(default)]
    pub revision: String,
    pub size: String,
    pub image: String,
    #[serde(default = "zero")]
    pub image_size: String,
    #[serde(default = "default_runtime")]
    pub runtime: String,
    pub resources: RawResources,
    #[serde(default)]
    pub scaling: RawScaling,
    /// "kubernetes" (default: replicas are created elsewhere) or "agent" (the controller
    /// starts them on the nodes it places them on).
    #[serde(default)]
    pub managed_by: Option<String>,
    /// Extra engine arguments of each agent-managed replica.
    #[serde(default)]
    pub args: Vec<String>,
}

fn default_runtime() -> String {
    "vllm".into()
}

const RUNTIMES: [&str; 5] = ["vllm", "sglang", "tgi", "triton", "custom"];

fn invalid(field: String, expected: &'static str, got: impl Into<String>) -> ConfigError {
    ConfigError::Entry { field, expected: expected.into(), got: got.into() }
}

fn dur(field: String, s: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match s {
        None => Ok(default),
        Some(s) => parse_duration("models", s).map_err(|_| invalid(field, "a duration like \"60s\"", s.clone())),
    }
}

fn size(field: String, s: &str) -> Result<u64, ConfigError> {
    parse_size("models", s).map_err(|_| invalid(field, "a size like \"140Gi\"", s))
}

impl RawScaling {
    fn resolve(&self, at: &str) -> Result<ScalingSpec, ConfigError> {
        let f = |name: &str| format!("{at}.scaling.{name}");
        let min_replicas = self.min_replicas.unwrap_or(1);
        let max_replicas = self.max_replicas.unwrap_or(10);
        if max_replicas == 0 || max_replicas < min_replicas {
            return Err(invalid(f("max_replicas"), "at least 1 and at least min_replicas", max_replicas.to_string()));
        }
        let positive = |name: &str, v: Option<f64>, default: f64| -> Result<f64, ConfigError> {
            let v = v.unwrap_or(default);
            if v.is_finite() && v > 0.0 { Ok(v) } else { Err(invalid(f(name), "a number above 0", v.to_string())) }
        };
        let target_concurrency = positive("target_concurrency", self.target_concurrency, 8.0)?;
        let target_kv_cache = positive("target_kv_cache", self.target_kv_cache, 0.8)?;
        if target_kv_cache > 1.0 {
            return Err(invalid(f("target_kv_cache"), "a ratio in (0, 1]", target_kv_cache.to_string()));
        }
        let panic_threshold = positive("panic_threshold", self.panic_threshold, 2.0)?;
        if panic_threshold <= 1.0 {
            return Err(invalid(f("panic_threshold"), "a factor above 1", panic_threshold.to_string()));
        }
        let tolerance = self.tolerance.unwrap_or(0.1);
        if !(0.0..1.0).contains(&tolerance) {
            return Err(invalid(f("tolerance"), "a fraction in [0, 1)", tolerance.to_string()));
        }
        let stable_window = dur(f("stable_window"), &self.stable_window, Duration::from_secs(60))?;
        let panic_window = dur(f("panic_window"), &self.panic_window, Duration::from_secs(6))?;
        if panic_window.is_zero() || panic_window > stable_window {
            return Err(invalid(f("panic_window"), "above 0 and at most stable_window", format!("{panic_window:?}")));
        }
        Ok(ScalingSpec {
            min_replicas,
            max_replicas,
            target_concurrency,
            target_kv_cache,
            target_ttft: dur(f("target_ttft"), &self.target_ttft, Duration::ZERO)?,
            stable_window,
            panic_window,
            panic_threshold,
            tolerance,
            scale_down_delay: dur(f("scale_down_delay"), &self.scale_down_delay, Duration::from_secs(300))?,
            scale_to_zero_after: dur(f("scale_to_zero_after"), &self.scale_to_zero_after, Duration::from_secs(600))?,
        })
    }
}

impl RawModel {
    fn resolve(&self, i: usize) -> Result<ModelSpec, ConfigError> {
        let at = format!("models[{i}]");
        let f = |name: &str| format!("{at}.{name}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok {
            return Err(invalid(f("name"), "1-63 characters of a-z, 0-9, '-' and '.'", self.name.clone()));
        }
        let at = format!("models[{i}] ({})", self.name);
        let f = |name: &str| format!("{at}.{name}");
        if !(self.source.starts_with("s3://") || self.source.starts_with("file:///")) || self.source.len() < 7 {
            return Err(invalid(f("source"), "an s3://bucket/prefix or file:///path URI", self.source.clone()));
        }
        let bytes = size(f("size"), &self.size)?;
        if bytes == 0 {
            return Err(invalid(f("size"), "the weights' total size, above 0", self.size.clone()));
        }
        // Normalized as the runtime reports it (`vllm/vllm-openai:v1` is
        // `docker.io/vllm/vllm-openai:v1` on the node), so placement finds it where it is.
        let image = hearth_proto::image_ref::Reference::parse(&self.image)
            .map_err(|e| ConfigError::Entry {
                field: f("image"),
                expected: format!("a container image reference: {}", e.expected),
                got: self.image.clone(),
            })?
            .to_string();
        if !RUNTIMES.contains(&self.runtime.as_str()) {
            return Err(invalid(f("runtime"), "one of vllm, sglang, tgi, triton, custom", self.runtime.clone()));
        }
        let r = &self.resources;
        let device = match (r.gpus, &r.mig, r.neuron_cores) {
            (Some(n @ 1..=64), None, None) => DeviceRequest::Gpus(n),
            (None, Some(p), None) if is_mig_profile(p) => DeviceRequest::Mig(p.clone()),
            (None, None, Some(n @ 1..=256)) => DeviceRequest::NeuronCores(n),
            (None, Some(p), None) => return Err(invalid(f("resources.mig"), "a MIG profile name like \"3g.40gb\"", p.clone())),
            _ => {
                return Err(invalid(f("resources"), "exactly one of gpus (1-64), mig (a profile name) or neuron_cores (1-256)", {
                    let set: Vec<String> = [
                        r.gpus.map(|n| format!("gpus: {n}")),
                        r.mig.as_ref().map(|p| format!("mig: {p}")),
                        r.neuron_cores.map(|n| format!("neuron_cores: {n}")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    if set.is_empty() { "none of them".to_owned() } else { set.join(", ") }
                }));
            }
        };
        Ok(ModelSpec {
            name: self.name.clone(),
            source_uri: self.source.trim_end_matches('/').to_owned(),
            revision: self.revision.clone(),
            bytes,
            image,
            image_bytes: size(f("image_size"), &self.image_size)?,
            runtime: self.runtime.clone(),
            device,
            memory_bytes: size(f("resources.memory"), &r.memory)?,
            scaling: self.scaling.resolve(&at)?,
            serve: Serve {
                agent_managed: match self.managed_by.as_deref().unwrap_or("kubernetes") {
                    "kubernetes" => false,
                    "agent" => true,
                    other => return Err(invalid(f("managed_by"), "kubernetes or agent", other)),
                },
                args: self.args.clone(),
            },
        })
    }
}

/// "3g.40gb", "1g.10gb+me": compute slices, then memory.
fn is_mig_profile(p: &str) -> bool {
    let base = p.strip_suffix("+me").unwrap_or(p);
    let Some((g, mem)) = base.split_once("g.") else { return false };
    g.parse::<u32>().is_ok_and(|g| (1..=7).contains(&g))
        && mem.strip_suffix("gb").is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
}

/// Every model deployment, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, std::sync::Arc<ModelSpec>>,
}

impl Catalog {
    pub fn from_raw(raw: &[RawModel]) -> Result<Self, ConfigError> {
        let mut models = BTreeMap::new();
        for (i, m) in raw.iter().enumerate() {
            let spec = m.resolve(i)?;
            if models.insert(spec.name.clone(), std::sync::Arc::new(spec)).is_some() {
                return Err(invalid(format!("models[{i}].name"), "a name no other model uses", m.name.clone()));
            }
        }
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<ModelSpec>> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<ModelSpec>> {
        self.models.values()
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// A catalog from specs built in code (the simulator, tests).
    pub fn from_specs(specs: impl IntoIterator<Item = ModelSpec>) -> Self {
        Self { models: specs.into_iter().map(|s| (s.name.clone(), std::sync::Arc::new(s))).collect() }
    }
}

impl ScalingSpec {
    /// Defaults as the config applies them, for code-built specs.
    pub fn defaults() -> Self {
        RawScaling::default().resolve("defaults").unwrap_or_else(|_| unreachable!("defaults are valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Catalog, ConfigError> {
        let raw: Vec<RawModel> = serde_yaml_ng::from_str(yaml).unwrap();
        Catalog::from_raw(&raw)
    }

    #[test]
    fn a_full_model_parses() {
        let c = parse(
            "- {name: llama-70b, source: s3://models/llama-70b/, revision: main, size: 140Gi, image: vllm:v1, image_size: 8Gi,
                resources: {gpus: 4, memory: 64Gi}, scaling: {min_replicas: 0, max_replicas: 4, stable_window: 30s, panic_window: 3s}}",
        )
        .unwrap();
        let m = c.get("llama-70b").unwrap();
        assert_eq!(m.source_uri, "s3://models/llama-70b");
        assert_eq!(m.bytes, 140 << 30);
        assert_eq!(m.device, DeviceRequest::Gpus(4));
        assert_eq!(m.scaling.min_replicas, 0);
        assert_eq!(m.scaling.stable_window, Duration::from_secs(30));
        assert_eq!(m.scaling.target_concurrency, 8.0);
        assert_eq!(m.serve, Serve::default(), "replicas are created elsewhere unless said otherwise");
        assert_eq!(m.image, "docker.io/library/vllm:v1", "normalized as nodes report images");
        let c = parse(
            "- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}, managed_by: agent, args: [--max-model-len, '8192']}",
        )
        .unwrap();
        assert_eq!(c.get("a").unwrap().serve, Serve { agent_managed: true, args: vec!["--max-model-len".into(), "8192".into()] });
        let e = parse("- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}, managed_by: operator}")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "models[0] (a).managed_by: expected kubernetes or agent, got \"operator\"");
    }

    #[test]
    fn bad_models_name_the_field() {
        let err = |y: &str| parse(y).unwrap_err().to_string();
        let e = err("- {name: a, source: s3://b/c, size: 1Gi, image: 'Vllm Latest', resources: {gpus: 1}}");
        assert!(e.starts_with("models[0] (a).image: expected a container image reference"), "{e}");
        let e = err("- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1, mig: 1g.10gb}}");
        assert!(e.starts_with("models[0] (a).resources: expected exactly one of"), "{e}");
        assert!(e.ends_with("got \"gpus: 1, mig: 1g.10gb\""), "what was given, in words: {e}");
        let e = err("- {name: a, source: http://x, size: 1Gi, image: i, resources: {gpus: 1}}");
        assert!(e.starts_with("models[0] (a).source: expected an s3://"), "{e}");
        let e = err("- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {mig: big}}");
        assert!(e.starts_with("models[0] (a).resources.mig: expected a MIG profile"), "{e}");
        let e =
            err("- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}, scaling: {min_replicas: 3, max_replicas: 2}}");
        assert!(e.starts_with("models[0] (a).scaling.max_replicas"), "{e}");
        let e = err("- {name: A_b, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}}");
        assert!(e.starts_with("models[0].name"), "{e}");
        let e = err(
            "- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}}\n- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}}",
        );
        assert!(e.starts_with("models[1].name: expected a name no other model uses"), "{e}");
        let e = err("- {name: a, source: s3://b/c, size: 1Gi, image: i, resources: {gpus: 1}, scaling: {panic_window: 2m}}");
        assert!(e.contains("panic_window"), "{e}");
    }

    #[test]
    fn mig_profile_names() {
        for ok in ["1g.10gb", "3g.40gb", "7g.141gb", "1g.10gb+me"] {
            assert!(is_mig_profile(ok), "{ok}");
        }
        for bad in ["", "8g.10gb", "g.10gb", "1g.gb", "1g.10", "3g.40GB"] {
            assert!(!is_mig_profile(bad), "{bad}");
        }
    }
}
