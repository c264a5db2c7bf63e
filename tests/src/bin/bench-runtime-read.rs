//! The agent's cost on the serving path: request latency of a model server while the
//! agent's runtime reader (`hearth_agent::runtime::probe::read`: health, model list,
//! `/metrics` parsed into load) reads it at an interval, against the same server with no
//! reader, in alternating blocks of one run. The server stands in for an engine: each
//! completion holds a worker for `--work` (as a decode step would) and `/metrics` returns
//! vLLM's own exposition text (the fixture, 30 kB), so the reads cost what they would.
//!
//!   cargo run --release -p hearth-tests --bin bench-runtime-read -- --interval 100ms
//!
//! The default interval is 20 times the agent's (`runtimes.interval: 5s`): an upper bound.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use hearth_agent::runtime::engine::{EngineSpec, Kind, LoadReader};
use hearth_agent::runtime::probe;

#[derive(Parser)]
struct Args {
    /// How often the reader reads the server.
    #[arg(long, default_value = "250ms")]
    interval: String,
    /// Requests per block; blocks alternate with and without the reader.
    #[arg(long, default_value_t = 2000)]
    block: usize,
    #[arg(long, default_value_t = 6)]
    blocks: usize,
    /// Time a completion holds the server.
    #[arg(long, default_value = "2ms")]
    work: String,
}

const METRICS: &str = include_str!("../../../agent/src/runtime/fixtures/vllm.metrics");

async fn server(work: Duration) -> Result<std::net::SocketAddr> {
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "" }))
        .route("/v1/models", axum::routing::get(|| async { r#"{"object":"list","data":[{"id":"m"}]}"# }))
        .route("/metrics", axum::routing::get(|| async { METRICS }))
        .route(
            "/v1/completions",
            axum::routing::post(move || async move {
                tokio::time::sleep(work).await;
                "{}"
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(addr)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let interval = humantime::parse_duration(&a.interval)?;
    let work = humantime::parse_duration(&a.work)?;
    let addr = server(work).await?;
    let url: hyper::Uri = format!("http://{addr}/v1/completions").parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::client::legacy::connect::HttpConnector::new());
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut reads = 0u64;
    for b in 0..a.blocks {
        let reading = b % 2 == 1;
        let stop = tokio_util::sync::CancellationToken::new();
        let reader = reading.then(|| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let spec = EngineSpec::builtin(Kind::Vllm);
                let mut r = LoadReader::new(spec.names.clone());
                let c = probe::client();
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    let _ = probe::read(&c, &spec, "127.0.0.1", addr.port(), addr.port(), &mut r, Duration::from_secs(2)).await;
                    n += 1;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
                n
            })
        });
        for _ in 0..a.block {
            let req = hyper::Request::post(url.clone()).body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))?;
            let t = Instant::now();
            let resp = client.request(req).await?;
            http_body_util::BodyExt::collect(resp.into_body()).await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if reading { with.push(ms) } else { without.push(ms) }
        }
        stop.cancel();
        if let Some(h) = reader {
            reads += h.await?;
        }
    }
    let (p50a, p99a) = (pct(&mut without, 0.5), pct(&mut without, 0.99));
    let (p50b, p99b) = (pct(&mut with, 0.5), pct(&mut with, 0.99));
    println!(
        "server work {work:?}, {} requests per side in {} alternating blocks, reader every {interval:?} ({reads} reads)",
        without.len(),
        a.blocks
    );
    println!("{:<22} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!("{:<22} {p50a:>10.3} {p99a:>10.3}", "no reader (anchor)");
    println!("{:<22} {p50b:>10.3} {p99b:>10.3}", "with the reader");
    println!("{:<22} {:>10.4} {:>10.4}", "ratio", p50b / p50a, p99b / p99a);
    Ok(())
}
