//! What Hearth knows about each serving engine: where it listens, how to tell live from
//! ready, and which of its metrics carry load, with the names each engine prints today and
//! the older names still running in clusters. Fixture tests pin each engine's `/metrics`
//! text (`fixtures/`, taken from the engines' own metric definitions).

use std::time::Instant;

use super::promtext::{self, Sample};

/// The engines Hearth reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Vllm,
    Sglang,
    Tgi,
    Triton,
    Custom,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Vllm, Kind::Sglang, Kind::Tgi, Kind::Triton, Kind::Custom];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vllm => "vllm",
            Kind::Sglang => "sglang",
            Kind::Tgi => "tgi",
            Kind::Triton => "triton",
            Kind::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// A guess from a container image name, for pods that do not say.
    pub fn from_image(image: &str) -> Option<Self> {
        let i = image.rsplit('/').next().unwrap_or(image).to_ascii_lowercase();
        if i.contains("vllm") {
            Some(Kind::Vllm)
        } else if i.contains("sglang") {
            Some(Kind::Sglang)
        } else if i.contains("text-generation-inference") || i.starts_with("tgi") {
            Some(Kind::Tgi)
        } else if i.contains("tritonserver") || i.contains("triton") {
            Some(Kind::Triton)
        } else {
            None
        }
    }
}

/// How readiness is told apart from liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// 2xx on this path means ready.
    Status(String),
    /// An OpenAI-compatible model list (`{"data": [{"id": ...}]}`) that must name a model:
    /// vLLM and SGLang answer `/health` while the weights are still loading.
    ModelListed(String),
}

/// Names of the load metrics, each a list tried in order (current name first, then names
/// older releases print).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricNames {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    /// A 0..1 ratio (vLLM's `*_perc` names are ratios despite the name).
    pub kv_usage: Vec<String>,
    /// Histograms in seconds (base names, without `_bucket`).
    pub ttft: Vec<String>,
    pub itl: Vec<String>,
    /// Counters.
    pub prompt_tokens: Vec<String>,
    pub generation_tokens: Vec<String>,
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// One engine's endpoints and metric names.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSpec {
    pub kind: Kind,
    pub port: u16,
    /// Where `/metrics` is served when not on `port` (Triton: 8002).
    pub metrics_port: Option<u16>,
    pub metrics_path: String,
    pub live_path: String,
    pub ready: ReadyCheck,
    pub names: MetricNames,
}

impl EngineSpec {
    /// The built-in spec of an engine (`Custom` has no defaults worth the name: configure it).
    pub fn builtin(kind: Kind) -> Self {
        match kind {
            Kind::Vllm => Self {
                kind,
                port: 8000,
                metrics_port: None,
                metrics_path: "/metrics".into(),
                live_path: "/health".into(),
                ready: ReadyCheck::ModelListed("/v1/models".into()),
                names: MetricNames {
                    running: names(&["vllm:num_requests_running"]),
                    waiting: names(&["vllm:num_requests_waiting"]),
                    kv_usage: names(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
                    ttft: names(&["vllm:time_to_first_token_seconds"]),
                    itl: names(&["vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"]),
                    prompt_tokens: names(&["vllm:prompt_tokens_total"]),
                    generation_tokens: names(&["vllm:generation_tokens_total"]),
                },
            },
            Kind::Sglang => Self {
                kind,
                port: 30000,
                metrics_port: None,
                metrics_path: "/metrics".into(),
                live_path: "/health".into(),
                ready: ReadyCheck::ModelListed("/v1/models".into()),
                names: MetricNames {
                    running: names(&["sglang:num_running_reqs"]),
                    waiting: names(&["sglang:num_queue_reqs"]),
                    kv_usage: names(&["sglang:token_usage"]),
                    ttft: names(&["sglang:time_to_first_token_seconds"]),
                    itl: names(&["sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"]),
                    prompt_tokens: names(&["sglang:prompt_tokens_total"]),
                    generation_tokens: names(&["sglang:generation_tokens_total"]),
                },
            },
            Kind::Tgi => Self {
                kind,
                port: 80,
                metrics_port: None,
                metrics_path: "/metrics".into(),
                live_path: "/health".into(),
                // TGI's /health answers 200 only once the model can generate.
                ready: ReadyCheck::Status("/health".into()),
                names: MetricNames {
                    running: names(&["tgi_batch_current_size"]),
                    waiting: names(&["tgi_queue_size"]),
                    kv_usage: Vec::new(),
                    ttft: Vec::new(),
                    itl: names(&["tgi_request_mean_time_per_token_duration"]),
                    prompt_tokens: names(&["tgi_request_input_length_sum"]),
                    generation_tokens: names(&["tgi_request_generated_tokens_sum"]),
                },
            },
            Kind::Triton => Self {
                kind,
                port: 8000,
                metrics_port: Some(8002),
                metrics_path: "/metrics".into(),
                live_path: "/v2/health/live".into(),
                ready: ReadyCheck::Status("/v2/health/ready".into()),
                names: MetricNames {
                    running: Vec::new(),
                    waiting: names(&["nv_inference_pending_request_count"]),
                    kv_usage: Vec::new(),
                    ttft: Vec::new(),
                    itl: Vec::new(),
                    prompt_tokens: Vec::new(),
                    generation_tokens: Vec::new(),
                },
            },
            Kind::Custom => Self {
                kind,
                port: 8000,
                metrics_port: None,
                metrics_path: "/metrics".into(),
                live_path: "/health".into(),
                ready: ReadyCheck::Status("/health".into()),
                names: MetricNames::default(),
            },
        }
    }
}

/// Load as read from one scrape, with rates and quantiles over the time since the last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    pub ttft_p50: Option<f64>,
    pub ttft_p90: Option<f64>,
    pub itl_p50: Option<f64>,
    pub prompt_tokens_per_s: Option<f64>,
    pub generation_tokens_per_s: Option<f64>,
}

/// Samples that count once: tensor- and pipeline-parallel ranks of one engine (SGLang's
/// `tp_rank`/`pp_rank`) each print the same scheduler gauges, so only rank 0 is read;
/// data-parallel engines (vLLM's `engine`, SGLang's `dp_rank`) are distinct and add up.
fn counted(samples: &[Sample]) -> Vec<Sample> {
    samples.iter().filter(|s| s.label("tp_rank").is_none_or(|r| r == "0") && s.label("pp_rank").is_none_or(|r| r == "0")).cloned().collect()
}

/// The first of `names` with samples, summed over the engine's label sets (one pod may run
/// more than one engine process, as with data-parallel ranks).
fn first_sum(samples: &[Sample], names: &[String]) -> Option<f64> {
    names.iter().find_map(|n| promtext::sum(samples, n, &[]))
}

/// The first of `names` with samples, averaged (a ratio per engine process).
fn first_mean(samples: &[Sample], names: &[String]) -> Option<f64> {
    names.iter().find_map(|n| {
        let v: Vec<f64> = promtext::find(samples, n, &[]).map(|s| s.value).filter(|v| v.is_finite()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    })
}

fn first_buckets(samples: &[Sample], names: &[String]) -> Vec<(f64, f64)> {
    names.iter().map(|n| promtext::buckets(samples, n, &[])).find(|b| !b.is_empty()).unwrap_or_default()
}

/// Reads load from successive scrapes of one runtime, keeping what rates and window
/// quantiles need from the previous one.
#[derive(Debug, Clone)]
pub struct LoadReader {
    names: MetricNames,
    prev: Option<Prev>,
}

#[derive(Debug, Clone)]
struct Prev {
    at: Instant,
    ttft: Vec<(f64, f64)>,
    itl: Vec<(f64, f64)>,
    prompt: Option<f64>,
    generation: Option<f64>,
}

impl LoadReader {
    pub fn new(names: MetricNames) -> Self {
        Self { names, prev: None }
    }

    /// Load from this scrape's text. Quantiles and rates cover the observations since the
    /// previous read (the first read has none).
    pub fn read(&mut self, text: &str, now: Instant) -> Load {
        let samples = counted(&promtext::parse(text).0);
        let n = &self.names;
        let ttft = first_buckets(&samples, &n.ttft);
        let itl = first_buckets(&samples, &n.itl);
        let prompt = first_sum(&samples, &n.prompt_tokens);
        let generation = first_sum(&samples, &n.generation_tokens);
        let mut load = Load {
            running: first_sum(&samples, &n.running),
            waiting: first_sum(&samples, &n.waiting),
            kv_usage: first_mean(&samples, &n.kv_usage).map(|v| v.clamp(0.0, 1.0)),
            ..Default::default()
        };
        if let Some(p) = &self.prev {
            let d_ttft = promtext::delta(&ttft, &p.ttft);
            load.ttft_p50 = promtext::quantile(0.5, &d_ttft);
            load.ttft_p90 = promtext::quantile(0.9, &d_ttft);
            load.itl_p50 = promtext::quantile(0.5, &promtext::delta(&itl, &p.itl));
            let secs = now.duration_since(p.at).as_secs_f64();
            let rate = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if secs > 0.0 => Some(if a >= b { (a - b) / secs } else { a / secs }),
                _ => None,
            };
            load.prompt_tokens_per_s = rate(prompt, p.prompt);
            load.generation_tokens_per_s = rate(generation, p.generation);
        }
        self.prev = Some(Prev { at: now, ttft, itl, prompt, generation });
        load
    }
}

/// Whether a model list (`/v1/models`) names at least one model, and which.
pub fn listed_models(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct List {
        #[serde(default)]
        data: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
    }
    serde_json::from_slice::<List>(body).map(|l| l.data.into_iter().map(|e| e.id).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_twice(kind: Kind, text: &str) -> (Load, Load) {
        let mut r = LoadReader::new(EngineSpec::builtin(kind).names);
        let t0 = Instant::now();
        let first = r.read(text, t0);
        (first, r.read(text, t0 + std::time::Duration::from_secs(5)))
    }

    /// Each engine's `/metrics` as the engine prints it (`fixtures/`, names from the
    /// engines' own metric definitions): running 3, waiting 5, KV-cache 0.42 where the
    /// engine has it.
    #[test]
    fn vllm_v1_names() {
        let (l, again) = read_twice(Kind::Vllm, include_str!("fixtures/vllm.metrics"));
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(3.0), Some(5.0), Some(0.42)));
        assert_eq!(l.ttft_p50, None, "no window yet on the first read");
        assert_eq!((again.ttft_p50, again.generation_tokens_per_s), (None, Some(0.0)), "nothing new between two equal reads");
    }

    #[test]
    fn vllm_legacy_names_still_read() {
        let (l, _) = read_twice(Kind::Vllm, include_str!("fixtures/vllm-legacy.metrics"));
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(3.0), Some(5.0), Some(0.42)), "gpu_cache_usage_perc");
        let (samples, bad) = promtext::parse(include_str!("fixtures/vllm-legacy.metrics"));
        assert_eq!(bad, 0);
        assert!(!promtext::buckets(&samples, "vllm:time_per_output_token_seconds", &[]).is_empty(), "the older ITL name");
    }

    #[test]
    fn sglang_names_count_tensor_parallel_ranks_once() {
        let text = include_str!("fixtures/sglang.metrics");
        let (l, _) = read_twice(Kind::Sglang, text);
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(3.0), Some(5.0), Some(0.42)));
        // A second TP rank printing the same gauges does not double the load.
        let rank1 = text.replace("tp_rank=\"0\"", "tp_rank=\"1\"");
        let (l2, _) = read_twice(Kind::Sglang, &format!("{text}{rank1}"));
        assert_eq!((l2.running, l2.waiting), (Some(3.0), Some(5.0)));
    }

    #[test]
    fn tgi_names_without_kv_or_ttft() {
        let (l, _) = read_twice(Kind::Tgi, include_str!("fixtures/tgi.metrics"));
        assert_eq!((l.running, l.waiting, l.kv_usage, l.ttft_p50), (Some(3.0), Some(5.0), None, None));
    }

    #[test]
    fn triton_pending_requests() {
        let (l, _) = read_twice(Kind::Triton, include_str!("fixtures/triton.metrics"));
        assert_eq!((l.running, l.waiting, l.kv_usage), (None, Some(5.0), None));
    }

    #[test]
    fn every_fixture_parses_whole_and_has_the_histograms_an_adapter_names() {
        for (kind, text) in [
            (Kind::Vllm, include_str!("fixtures/vllm.metrics")),
            (Kind::Sglang, include_str!("fixtures/sglang.metrics")),
            (Kind::Tgi, include_str!("fixtures/tgi.metrics")),
            (Kind::Triton, include_str!("fixtures/triton.metrics")),
        ] {
            let (samples, bad) = promtext::parse(text);
            assert_eq!(bad, 0, "{kind:?}");
            let n = EngineSpec::builtin(kind).names;
            for h in n.ttft.iter().chain(&n.itl).take(1) {
                assert!(!promtext::buckets(&samples, h, &[]).is_empty(), "{kind:?} has {h}");
            }
        }
    }

    #[test]
    fn model_lists_name_the_served_model() {
        assert_eq!(listed_models(include_bytes!("fixtures/vllm-models.json")).len(), 1);
        assert_eq!(listed_models(include_bytes!("fixtures/sglang-models.json")).len(), 1);
        assert!(listed_models(b"{\"object\":\"list\",\"data\":[]}").is_empty());
        assert!(listed_models(b"not json").is_empty());
    }

    #[test]
    fn engines_are_told_from_their_images() {
        for (image, kind) in [
            ("vllm/vllm-openai:v0.11.0", Some(Kind::Vllm)),
            ("lmsysorg/sglang:v0.5.2-cu126", Some(Kind::Sglang)),
            ("ghcr.io/huggingface/text-generation-inference:3.3.6", Some(Kind::Tgi)),
            ("nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3", Some(Kind::Triton)),
            ("python:3.12", None),
        ] {
            assert_eq!(Kind::from_image(image), kind, "{image}");
        }
    }
}
