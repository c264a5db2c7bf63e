//! Placement speed at cluster scale:
//!
//! 1. In-process `Placement::score` over every node of a 5,000-node cluster (8 GPUs each,
//!    a few cached models and bandwidths per node): latency p50/p99.
//! 2. The same over real gRPC with mTLS (one client, `limit: 10`): latency p50/p99.
//! 3. Throughput over real gRPC: `--clients` concurrent callers for `--seconds`, Score over
//!    100- and 500-node candidate lists (what kube-scheduler's extender call or a sampling
//!    scheduler sends) and over the whole cluster; side by side with the anchor, gRPC's own health Check (an
//!    empty call on the same connection and TLS), so the ratio shows what placement costs
//!    on top of the transport.
//!
//!   cargo build --release --bins && target/release/bench-placement [--nodes 5000] [--seconds 10]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hearth_proto::convert::AgentHello;
use hearth_proto::v1 as pb;
use hearth_tests::{TestPki, channel, start_controller};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    #[arg(long, default_value_t = 200)]
    models: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent gRPC callers in the throughput runs.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Calls per latency measurement.
    #[arg(long, default_value_t = 500)]
    calls: usize,
}

const GB: u64 = 1_000_000_000;

fn catalog_yaml(models: usize) -> String {
    (0..models)
        .map(|i| {
            let gpus = [1, 1, 2, 4, 8][i % 5];
            format!(
                "- {{name: m{i}, source: s3://models/m{i}, size: {}G, image: img{}, image_size: 10G, resources: {{gpus: {gpus}}}}}\n",
                2 + i * 3,
                i % 3
            )
        })
        .collect()
}

/// A node with 8 GPUs, some busy, a handful of cached models and measured bandwidths.
fn node_state(i: usize, models: usize) -> pb::NodeState {
    let accelerators = (0..8u32).map(|g| pb::Accelerator::h100(g).with_uuid(format!("GPU-{i}-{g}"))).collect();
    let busy = i % 5;
    let runtimes = (0..busy as u32)
        .map(|g| pb::ServingRuntime {
            name: format!("r{g}"),
            model_id: format!("m{}", (i + g as usize) % models),
            partition_uuid: format!("GPU-{i}-{g}"),
            state: "ready".into(),
            load: Some(pb::RuntimeLoad { requests_waiting: (i % 7) as f64, requests_running: 4.0, ..Default::default() }),
            ..Default::default()
        })
        .collect();
    let cached = (0..6)
        .map(|k| {
            let m = (i * 7 + k * 13) % models;
            pb::CachedModel::ready(format!("c{m}"), format!("s3://models/m{m}"), "", (2 + m as u64 * 3) * GB)
        })
        .collect();
    pb::NodeState {
        accelerators,
        runtimes,
        models: cached,
        images: vec![pb::CachedImage { reference: format!("img{}", i % 3), ..Default::default() }],
        source_bandwidth: vec![pb::SourceBandwidth {
            source: "s3://models".into(),
            bytes_per_second: 3e8 + (i % 17) as f64 * 1e8,
            samples: 5,
        }],
        resources: Some(pb::NodeResources { memory_available_bytes: 1 << 40, ..Default::default() }),
        ..Default::default()
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn throughput<F, Fut>(clients: usize, seconds: u64, f: F) -> Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let f = Arc::new(f);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                f(c + n as usize).await?;
                n += 1;
            }
            Ok::<u64, anyhow::Error>(n)
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64().max(seconds as f64))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let models: Vec<hearth_controller::catalog::RawModel> = serde_yaml_ng::from_str(&catalog_yaml(args.models))?;
    let ctl = start_controller(&pki, stop, |raw| {
        raw.models = models;
        raw.stale_after = "1h".into();
        // The scaling loop scores every model every interval; keep it out of the measurement.
        raw.scaling.interval = Some("1h".into());
    })
    .await?;
    // Node state goes straight into the cluster view (the agent stream is not what is measured).
    let t = Instant::now();
    for i in 0..args.nodes {
        let name = format!("node-{i:05}");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::mem::forget(rx);
        let hello = AgentHello {
            node_name: name.clone(),
            boot_id: "b".into(),
            agent_version: "bench".into(),
            api_version: hearth_proto::API_VERSION,
            capabilities: vec![],
            heartbeat_interval_ms: 1000,
        };
        let s = ctl.state.open_session(hello, "bench".into(), tx, Instant::now())?;
        ctl.state.apply_snapshot(&name, s, pb::Snapshot { epoch: 1, seq: 1, state: Some(node_state(i, args.models)) }, Instant::now())?;
    }
    println!("cluster: {} nodes x 8 GPUs, {} models, loaded in {:.2?}", args.nodes, args.models, t.elapsed());

    // 1. In-process Score over the whole cluster.
    let mut lat = Vec::with_capacity(args.calls);
    for c in 0..args.calls {
        let m = format!("m{}", c % args.models);
        let t = Instant::now();
        let out = ctl.placement.score(&m, None, 0, Instant::now()).map_err(|e| anyhow::anyhow!("{e}"))?;
        lat.push(t.elapsed());
        std::hint::black_box(out);
    }
    println!(
        "in-process Score, all {} nodes: p50 {:.3} ms, p99 {:.3} ms  (target p99 < 2 ms)",
        args.nodes,
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3
    );

    // 2. Over gRPC, one caller.
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("hearth-scheduler")?)).await?;
    let mut p = pb::placement_client::PlacementClient::new(ch.clone());
    let mut lat = Vec::with_capacity(args.calls);
    for c in 0..args.calls {
        let req = pb::ScoreRequest { model: format!("m{}", c % args.models), nodes: vec![], limit: 10 };
        let t = Instant::now();
        let r = p.score(req).await?.into_inner();
        lat.push(t.elapsed());
        anyhow::ensure!(!r.scores.is_empty(), "no scores");
    }
    println!(
        "gRPC Score, all {} nodes, limit 10: p50 {:.3} ms, p99 {:.3} ms",
        args.nodes,
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3
    );

    // 3. Throughput with the anchor.
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let anchor = throughput(args.clients, args.seconds, move |_| {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
            Ok(())
        }
    })
    .await?;
    // kube-scheduler sends an extender the nodes that passed its own filters, of the share
    // of the cluster it samples: 100 and 500 (its default share at 5,000 nodes is 10%).
    let mut sampled = Vec::new();
    for size in [100usize, 500] {
        let candidates: Arc<Vec<Vec<String>>> =
            Arc::new((0..64).map(|k| (0..size).map(|j| format!("node-{:05}", (k * 131 + j * 37) % args.nodes)).collect()).collect());
        let models = args.models;
        let pc = p.clone();
        let rate = throughput(args.clients, args.seconds, move |n| {
            let mut p = pc.clone();
            let nodes = candidates[n % candidates.len()].clone();
            async move {
                p.score(pb::ScoreRequest { model: format!("m{}", n % models), nodes, limit: 0 }).await.context("Score")?;
                Ok(())
            }
        })
        .await?;
        sampled.push((size, rate));
    }
    let models = args.models;
    let full = throughput(args.clients, args.seconds, move |n| {
        let mut p = p.clone();
        async move {
            p.score(pb::ScoreRequest { model: format!("m{}", n % models), nodes: vec![], limit: 10 }).await.context("Score")?;
            Ok(())
        }
    })
    .await?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("throughput, {} clients, {} s each, {cores} cores (client and server share them):", args.clients, args.seconds);
    println!("  anchor: gRPC health Check            {anchor:>9.0} calls/s");
    for (size, rate) in &sampled {
        println!(
            "  Score, {size} candidate nodes{:>w$}{rate:>9.0} calls/s  ({:.2} x anchor; target >= 5000/s)",
            "",
            rate / anchor,
            w = 11 - size.to_string().len()
        );
    }
    println!("  Score, all {} nodes, limit 10      {full:>9.0} calls/s  ({:.3} x anchor)", args.nodes, full / anchor);
    Ok(())
}
