//! `hearth sample-server`: a small OpenAI-compatible model server that `hearth local` runs
//! as an agent-managed runtime, so the whole loop (cache, partition, runtime, load, scaling
//! decision) runs on any machine with nothing but the `hearth` binary.
//!
//! It speaks the part of vLLM's surface the agent reads: `/health`, `/v1/models` (the model
//! is listed once its weights are loaded), `POST /v1/completions` and `/metrics` with vLLM's
//! metric names. It "loads" the model by reading every safetensors file of the model
//! directory (header checked, bytes read) and "generates" tokens at a fixed pace from a
//! seed of the prompt and the weights, with a bounded batch: requests past it wait, which
//! is the queue the scaler sees. On SIGTERM it stops taking requests, finishes the ones in
//! flight (its drain), then exits. It is a stand-in for an engine, not one: no inference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};

/// Histogram buckets, seconds (vLLM's TTFT buckets, trimmed).
const TTFT_BUCKETS: [f64; 10] = [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5];
const ITL_BUCKETS: [f64; 8] = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3];
const WORDS: [&str; 16] = [
    "the", "model", "serves", "tokens", "warm", "cache", "node", "ready", "fast", "weights", "queue", "batch", "gpu", "hearth", "load",
    "scale",
];

#[derive(Debug, Clone)]
pub struct SampleArgs {
    pub port: u16,
    pub model: String,
    pub model_dir: Option<PathBuf>,
    /// Or the weights read from S3 by the server itself, one sequential stream per file, as
    /// an engine's own loader does (credentials and endpoint from the AWS environment).
    pub model_uri: Option<String>,
    /// Time per generated token.
    pub token_time: Duration,
    /// Requests generated at once; more wait.
    pub max_batch: usize,
}

#[derive(Default)]
struct Histogram {
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(n: usize) -> Self {
        Self { counts: (0..n).map(|_| AtomicU64::new(0)).collect(), ..Default::default() }
    }

    fn observe(&self, buckets: &[f64], v: f64) {
        for (i, le) in buckets.iter().enumerate() {
            if v <= *le {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, buckets: &[f64], labels: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, le) in buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {}", self.counts[i].load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {n}");
    }
}

struct Server {
    args: SampleArgs,
    /// Set once the weights are read.
    loaded: watch::Receiver<Option<u64>>,
    batch: Semaphore,
    waiting: AtomicU64,
    running: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    requests: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
}

/// Reads every `*.safetensors` object under an `s3://bucket/prefix`, each in sequential
/// 16 MiB reads on one stream, checking each header; (files, bytes, seed) as `load_weights`.
async fn load_weights_s3(uri: &str) -> anyhow::Result<(usize, u64, u64)> {
    use crate::cache::source::Source;
    let crate::cache::spec::SourceUri::S3 { bucket, prefix } = crate::cache::spec::SourceUri::parse(uri)? else {
        anyhow::bail!("--model-uri {uri:?}: expected s3://bucket/prefix/");
    };
    let src = crate::cache::source::s3::S3Source::new(&bucket, &prefix, &Default::default()).await;
    let mut objects: Vec<_> = src.list().await?.into_iter().filter(|o| o.key.ends_with(".safetensors")).collect();
    anyhow::ensure!(!objects.is_empty(), "no *.safetensors object under {uri}");
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    const CHUNK: usize = 16 << 20;
    let (mut bytes, mut seed) = (0u64, 0xcbf2_9ce4_8422_2325u64);
    for o in &objects {
        let mut off = 0u64;
        while off < o.size {
            let mut buf = crate::cache::buf::AlignedBuf::new(CHUNK);
            buf.set_len((o.size - off).min(CHUNK as u64) as usize);
            let (buf, r) = src.read_into(o, off, buf).await;
            r?;
            let data = buf.as_slice();
            if off == 0 {
                let n = data.get(..8).map(|h| u64::from_le_bytes(h.try_into().unwrap_or_default())).context("shorter than a header")?;
                anyhow::ensure!(n.checked_add(8).is_some_and(|end| end <= o.size), "{}: header of {n} bytes past the end", o.key);
            }
            // The same positions `load_weights` samples, for the same seed.
            let first = (4099 - off % 4099) % 4099;
            for b in data.iter().skip(first as usize).step_by(4099) {
                seed = (seed ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            off += data.len() as u64;
        }
        bytes += o.size;
    }
    Ok((objects.len(), bytes, seed))
}

/// Reads every `*.safetensors` file under `dir`, checking each header; (files, bytes, seed).
fn load_weights(dir: &Path) -> anyhow::Result<(usize, u64, u64)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
    }
    anyhow::ensure!(!files.is_empty(), "no *.safetensors file under {}", dir.display());
    files.sort();
    let (mut bytes, mut seed) = (0u64, 0xcbf2_9ce4_8422_2325u64);
    for f in &files {
        let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let n = data.get(..8).map(|h| u64::from_le_bytes(h.try_into().unwrap_or_default())).context("shorter than a header")?;
        let header = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_add(8))
            .and_then(|end| data.get(8..end))
            .with_context(|| format!("{}: header of {n} bytes past the end", f.display()))?;
        serde_json::from_slice::<serde_json::Value>(header).with_context(|| format!("{}: the header is not JSON", f.display()))?;
        bytes += data.len() as u64;
        // A seed from the weights: the same model generates the same text.
        for b in data.iter().step_by(4099) {
            seed = (seed ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok((files.len(), bytes, seed))
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
}

fn default_max_tokens() -> u32 {
    16
}

async fn health() -> &'static str {
    ""
}

async fn models(State(s): State<Arc<Server>>) -> impl IntoResponse {
    let data = if s.loaded.borrow().is_some() {
        serde_json::json!([{"id": s.args.model, "object": "model", "owned_by": "hearth-sample"}])
    } else {
        serde_json::json!([])
    };
    Json(serde_json::json!({"object": "list", "data": data}))
}

async fn complete(State(s): State<Arc<Server>>, Json(req): Json<CompletionRequest>) -> axum::response::Response {
    let Some(seed) = *s.loaded.borrow() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the model is still loading").into_response();
    };
    let max_tokens = req.max_tokens.clamp(1, 512);
    let arrived = Instant::now();
    s.waiting.fetch_add(1, Ordering::Relaxed);
    let permit = s.batch.acquire().await;
    s.waiting.fetch_sub(1, Ordering::Relaxed);
    let Ok(_permit) = permit else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    s.running.fetch_add(1, Ordering::Relaxed);
    let prompt_tokens = req.prompt.split_whitespace().count().max(1) as u64;
    let mut h = seed ^ req.prompt.bytes().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut words = Vec::with_capacity(max_tokens as usize);
    let mut last = Instant::now();
    for i in 0..max_tokens {
        tokio::time::sleep(s.args.token_time).await;
        h = h.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        words.push(WORDS[(h >> 60) as usize]);
        let now = Instant::now();
        if i == 0 {
            s.ttft.observe(&TTFT_BUCKETS, now.duration_since(arrived).as_secs_f64());
        } else {
            s.itl.observe(&ITL_BUCKETS, now.duration_since(last).as_secs_f64());
        }
        last = now;
    }
    s.running.fetch_sub(1, Ordering::Relaxed);
    s.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
    s.generation_tokens.fetch_add(u64::from(max_tokens), Ordering::Relaxed);
    let n = s.requests.fetch_add(1, Ordering::Relaxed);
    Json(serde_json::json!({
        "id": format!("cmpl-{n}"),
        "object": "text_completion",
        "model": s.args.model,
        "choices": [{"index": 0, "text": words.join(" "), "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + u64::from(max_tokens)},
    }))
    .into_response()
}

async fn metrics(State(s): State<Arc<Server>>) -> String {
    use std::fmt::Write;
    let l = format!("model_name=\"{}\"", s.args.model);
    let mut out = String::new();
    let running = s.running.load(Ordering::Relaxed);
    let gauges = [
        ("vllm:num_requests_running", running as f64),
        ("vllm:num_requests_waiting", s.waiting.load(Ordering::Relaxed) as f64),
        ("vllm:kv_cache_usage_perc", running as f64 / s.args.max_batch as f64),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name}{{{l}}} {v}");
    }
    for (name, c) in [("vllm:prompt_tokens_total", &s.prompt_tokens), ("vllm:generation_tokens_total", &s.generation_tokens)] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name}{{{l}}} {}", c.load(Ordering::Relaxed));
    }
    s.ttft.render(&mut out, "vllm:time_to_first_token_seconds", &TTFT_BUCKETS, &l);
    s.itl.render(&mut out, "vllm:inter_token_latency_seconds", &ITL_BUCKETS, &l);
    out
}

/// Serves until SIGTERM or SIGINT, then drains the requests in flight.
pub async fn run(args: SampleArgs) -> anyhow::Result<()> {
    let (tx, loaded) = watch::channel(None);
    let listener =
        tokio::net::TcpListener::bind(("0.0.0.0", args.port)).await.with_context(|| format!("listening on port {}", args.port))?;
    println!("sample server for {} on port {}", args.model, args.port);
    let server = Arc::new(Server {
        batch: Semaphore::new(args.max_batch.max(1)),
        ttft: Histogram::new(TTFT_BUCKETS.len()),
        itl: Histogram::new(ITL_BUCKETS.len()),
        args: args.clone(),
        loaded,
        waiting: AtomicU64::new(0),
        running: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        generation_tokens: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    // Alive at once, ready (model listed) once the weights are read, as vLLM is.
    let (dir, uri) = (args.model_dir.clone(), args.model_uri.clone());
    tokio::spawn(async move {
        let t0 = Instant::now();
        let seed = match (uri, dir) {
            (Some(u), _) => load_weights_s3(&u).await,
            (None, None) => Ok((0, 0, 1)),
            (None, Some(d)) => tokio::task::spawn_blocking(move || load_weights(&d)).await.unwrap_or_else(|e| Err(anyhow::anyhow!(e))),
        };
        match seed {
            Ok((files, bytes, seed)) => {
                println!("loaded {files} safetensors file(s), {bytes} bytes, in {:.2}s", t0.elapsed().as_secs_f64());
                tx.send_replace(Some(seed));
            }
            Err(e) => {
                eprintln!("cannot load the model: {e:#}");
                std::process::exit(1);
            }
        }
    });
    let app = axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/v1/models", axum::routing::get(models))
        .route("/v1/completions", axum::routing::post(complete))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(server.clone());
    let stop = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        println!("draining {} request(s) in flight", server.running.load(Ordering::Relaxed) + server.waiting.load(Ordering::Relaxed));
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    // In-flight requests finished with their connections; the queue is empty.
    println!("drained, exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        crate::cache::sample::write_sample_model(dir.path(), 2, 1 << 16).unwrap();
        let (files, bytes, seed) = load_weights(dir.path()).unwrap();
        assert_eq!(files, 2);
        assert!(bytes >= 2 << 16);
        assert_eq!(load_weights(dir.path()).unwrap().2, seed, "the same weights, the same seed");
        std::fs::write(dir.path().join("bad.safetensors"), [255u8; 16]).unwrap();
        let e = load_weights(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(load_weights(empty.path()).unwrap_err().to_string().starts_with("no *.safetensors file"));
    }
}
