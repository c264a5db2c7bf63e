//! Controller ingest benchmark: starts a real `hearth-controller` process and N simulated
//! agents in this process (each with its own client certificate and TLS connection, real
//! gRPC over loopback), each sending Hello and a snapshot, then one delta per second. Prints
//! messages/s acknowledged, send-to-Ack latency percentiles, the controller's CPU use and
//! its peak RSS, for each N.
//!
//!   cargo build --release --bins && target/release/bench-ingest --agents 1000 --agents 5000

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_proto::transport::TlsMaterial;
use hearth_proto::v1::{self as pb, agent_message::Kind as Out, controller_message::Kind as In};
use hearth_service::pki::{LeafSpec, Usage};
use hearth_tests::*;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// Agent counts to run, one controller per count.
    #[arg(long = "agents", default_values_t = vec![1000, 5000])]
    agents: Vec<usize>,
    /// Measurement window after every agent has connected and a warm-up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Connections opened at once while ramping up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Deltas each agent sends per second (1 is the target load; more shows headroom).
    #[arg(long, default_value_t = 1.0)]
    deltas_per_second: f64,
}

fn proc_cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / rustix::param::clock_ticks_per_second() as f64)
}

fn proc_status_kib(pid: i32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

fn node_state(i: usize) -> pb::NodeState {
    pb::NodeState {
        info: Some(pb::NodeInfo {
            hostname: format!("bench-{i}"),
            kernel_version: "6.1.0".into(),
            os_image: "Bottlerocket".into(),
            architecture: "x86_64".into(),
            cpu_count: 192,
            memory_total_bytes: 2 << 40,
            labels: Default::default(),
        }),
        resources: Some(pb::NodeResources { cpu_usage_ratio: 0.2, load1: 12.0, ..Default::default() }),
        accelerators: (0..8)
            .map(|g| {
                pb::Accelerator::h100(g)
                    .with_uuid(format!("GPU-{i:08x}-{g:04x}-0000-0000-000000000000"))
                    .simulated_at(format!("00000000:{:02X}:00.0", 0x18 + g * 16))
            })
            .collect(),
        models: (0..5).map(|m| pb::CachedModel::ready(format!("model-{m}"), format!("s3://models/llama-{m}/"), "", 140 << 30)).collect(),
        ..Default::default()
    }
}

struct AgentResult {
    latencies_us: Vec<u32>,
    acked_in_window: u64,
}

async fn run_agent(
    i: usize,
    channel: tonic::transport::Channel,
    measuring: Arc<AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
    connected: Arc<AtomicU64>,
    every: Duration,
) -> Result<AgentResult> {
    let node = format!("bench-{i}");
    let (tx, rx) = mpsc::channel(16);
    let epoch = 1_000 + i as u64;
    let mut seq = 1u64;
    tx.send(hello(&node)).await?;
    tx.send(pb::AgentMessage { kind: Some(Out::Snapshot(pb::Snapshot { epoch, seq, state: Some(node_state(i)) })) }).await?;
    let mut client = pb::node_agent_client::NodeAgentClient::new(channel);
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    // Ack of Hello, then of the snapshot.
    for _ in 0..2 {
        match inbound.message().await? {
            Some(pb::ControllerMessage { kind: Some(In::Ack(_)) }) => {}
            other => bail!("{node}: expected Ack, got {other:?}"),
        }
    }
    connected.fetch_add(1, Ordering::Relaxed);
    // Spread the agents over the second so load is steady, as in a real fleet.
    let phase = every.mul_f64(((i as u64 * 7919) % 1_000_000) as f64 / 1e6);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: VecDeque<(u64, Instant, bool)> = VecDeque::new();
    let mut res = AgentResult { latencies_us: Vec::new(), acked_in_window: 0 };
    let mut load = 1.0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(res),
            _ = tick.tick() => {
                seq += 1;
                load += 0.01;
                let d = pb::Delta {
                    epoch,
                    seq,
                    resources: Some(pb::NodeResources { cpu_usage_ratio: 0.2, load1: load, ..Default::default() }),
                    ..Default::default()
                };
                pending.push_back((seq, Instant::now(), measuring.load(Ordering::Relaxed)));
                tx.send(pb::AgentMessage { kind: Some(Out::Delta(d)) }).await?;
            }
            m = inbound.message() => match m? {
                Some(pb::ControllerMessage { kind: Some(In::Ack(a)) }) => {
                    while let Some((s, at, counted)) = pending.front().copied() {
                        if s > a.seq { break; }
                        pending.pop_front();
                        if s == a.seq && counted && measuring.load(Ordering::Relaxed) {
                            res.latencies_us.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                            res.acked_in_window += 1;
                        }
                    }
                }
                Some(other) => bail!("{node}: unexpected {other:?}"),
                None => bail!("{node}: stream closed by the controller"),
            },
        }
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

struct Row {
    agents: usize,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_cores: f64,
    peak_rss_mib: f64,
    connect_s: f64,
}

async fn run_one(n: usize, args: &Args, dir: &std::path::Path, pki: &TestPki, clients: &[TlsMaterial]) -> Result<Row> {
    let ctl = ControllerProc::start(dir, pki, "stale_after: 60s\n").await?;
    let grpc = ctl.grpc;
    let pid = ctl.proc.pid();
    let stop = tokio_util::sync::CancellationToken::new();
    let measuring = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, tls) in clients.iter().take(n).enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))?
            .tls_config(tls.client_config("localhost"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("agent {i} connect"))?;
        let (m, s, c) = (measuring.clone(), stop.clone(), connected.clone());
        let every = Duration::from_secs_f64(1.0 / args.deltas_per_second);
        tasks.push(tokio::spawn(async move {
            let r = run_agent(i, ch, m, s, c, every);
            drop(permit);
            r.await
        }));
    }
    wait_for("all agents connected", Duration::from_secs(120), || async {
        Ok((connected.load(Ordering::Relaxed) as usize == n).then_some(()))
    })
    .await?;
    let connect_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.warmup_seconds)).await;
    let cpu0 = proc_cpu_seconds(pid)?;
    let w0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let window = w0.elapsed().as_secs_f64();
    let cpu = proc_cpu_seconds(pid)? - cpu0;
    let peak_rss_kib = proc_status_kib(pid, "VmHWM:")?;
    // Let in-flight acks of the window land, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut lat = Vec::new();
    let mut acked = 0;
    for t in tasks {
        let r = t.await??;
        acked += r.acked_in_window;
        lat.extend(r.latencies_us);
    }
    lat.sort_unstable();
    drop(ctl);
    Ok(Row {
        agents: n,
        msgs_per_s: acked as f64 / window,
        p50_ms: pct(&lat, 0.50),
        p99_ms: pct(&lat, 0.99),
        cpu_cores: cpu / window,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        connect_s,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let max = args.agents.iter().copied().max().unwrap_or(0);
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    eprintln!("issuing {max} client certificates...");
    let clients = (0..max)
        .map(|i| {
            let name = format!("bench-{i}");
            let c = pki.ca.issue(&LeafSpec::new(&name, &[&name], Usage::Client, Duration::from_secs(86400)))?;
            Ok(TlsMaterial::from_pem(pki.ca.cert_pem().into(), c.cert_pem.into_bytes(), c.key_pem.into_bytes())?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for &n in &args.agents {
        eprintln!("running {n} agents...");
        rows.push(run_one(n, &args, dir.path(), &pki, &clients).await?);
    }
    println!(
        "controller ingest: mTLS gRPC over loopback, 1 snapshot + {} delta/s per agent, {}s window",
        args.deltas_per_second, args.seconds
    );
    println!(
        "| agents | connect all (s) | acked msgs/s | msgs/s per agent | p50 send->Ack (ms) | p99 send->Ack (ms) | controller CPU (cores) | controller peak RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.0} | {:.3} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.agents,
            r.connect_s,
            r.msgs_per_s,
            r.msgs_per_s / r.agents as f64,
            r.p50_ms,
            r.p99_ms,
            r.cpu_cores,
            r.peak_rss_mib
        );
    }
    Ok(())
}
