//! GPU metrics benchmarks on the simulated backend:
//!
//! 1. `/metrics` render of the dcgm-exporter families for 8 GPUs x 7 MIG devices with 56
//!    attributed pods, p50/p99 over many renders; the anchor is prometheus-client encoding
//!    the same series (same names, labels and values) through its registry, same run.
//! 2. Agent RSS with 8 simulated H100s with MIG enabled (7 x 1g.10gb each, applied by the
//!    agent's own reconciler) while being scraped, next to the same agent with no devices.
//!
//!   cargo build --release --bins && target/release/bench-gpu

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hearth_agent::device::Inventory;
use hearth_agent::device::gpu::GpuBackend;
use hearth_agent::device::gpusim::{SimFaults, SimGpus};
use hearth_agent::device::mig;
use hearth_agent::device::migctl::{MigControl, SimMig};
use hearth_agent::device::sim::{SimInventory, SimSpec};
use hearth_agent::gpu_metrics::render::{HostLabel, PodLabelSets, render};
use hearth_agent::gpu_metrics::{self, GpuMetrics, GpuView};
use hearth_agent::kube::podres::Attribution;
use hearth_proto::podresources::{ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources};
use hearth_tests::{Proc, bin, http_get, logged_addr};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    renders: usize,
    /// Seconds the agents run (and are scraped) before RSS is read.
    #[arg(long, default_value_t = 15)]
    rss_seconds: u64,
}

fn view() -> Result<(GpuView, PodLabelSets)> {
    let accs = SimInventory::new("bench", &[SimSpec::parse("8xH100-80GB").map_err(anyhow::Error::msg)?]).accelerators()?;
    let mig = Arc::new(SimMig::new(&[0x2330_10DE; 8]));
    let one_g = mig::by_name(mig::H100_80GB, "1g.10gb").context("profile")?;
    for g in 0..8 {
        mig.set_mig_mode(g, true)?;
        for start in 0..7 {
            mig.create(g, one_g, start, mig::CiSplit::FULL)?;
        }
    }
    let metrics = GpuMetrics::new(HostLabel::new("Hostname", "bench"));
    let backend: Box<dyn GpuBackend> = Box::new(SimGpus::new(&accs, mig, Arc::new(SimFaults::default())));
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = gpu_metrics::spawn_collector(backend, metrics, Duration::from_millis(50), move |v| {
        let _ = tx.send(v.clone());
    })?;
    let v = rx.recv_timeout(Duration::from_secs(10))?;
    handle.stop();
    let mut pods = Vec::new();
    for g in &v.gpus {
        for m in &g.reading.migs {
            pods.push(PodResources {
                name: format!("infer-{}-{}", g.info.index, m.device.gi_id),
                namespace: "serving".into(),
                containers: vec![ContainerResources {
                    name: "vllm".into(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/mig-1g.10gb".into(),
                        device_ids: vec![m.device.uuid.clone()],
                        topology: None,
                    }],
                }],
            });
        }
    }
    anyhow::ensure!(pods.len() == 56, "{} MIG devices", pods.len());
    Ok((v, PodLabelSets::new(&Attribution::from_list(&ListPodResourcesResponse { pod_resources: pods }))))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    gpu: String,
    #[prometheus(flatten)]
    rest: BTreeLabels,
}

/// Arbitrary extra labels for the anchor, in order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, Default)]
struct BTreeLabels(Vec<(String, String)>);

impl EncodeLabelSet for BTreeLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (k, v) in &self.0 {
            prometheus_client::encoding::EncodeLabel::encode(&(k.as_str(), v.as_str()), encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The anchor: the very series our renderer wrote, loaded into prometheus-client families.
fn anchor_registry(text: &str) -> Registry {
    let mut families: BTreeMap<String, Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let mut pairs: Vec<(String, String)> = Vec::new();
        for kv in labels.split("\",") {
            if let Some((k, v)) = kv.split_once("=\"") {
                pairs.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
            }
        }
        let gpu = pairs.first().map(|p| p.1.clone()).unwrap_or_default();
        let l = Labels { gpu, rest: BTreeLabels(pairs.into_iter().skip(1).collect()) };
        families.entry(name.to_owned()).or_default().get_or_create(&l).set(value.parse().unwrap_or(0.0));
    }
    let mut r = Registry::default();
    for (name, f) in families {
        r.register(name, "anchor", f);
    }
    r
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())).context("VmRSS")
}

async fn agent_rss(devices: &str, extra: &str, seconds: u64) -> Result<(u64, usize)> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: bench\nhttp_listen: 127.0.0.1:0\ndevices: {devices}\nstate_dir: {}\ncache: {{root: {}}}\n{extra}",
            dir.path().join("state").display(),
            dir.path().join("cache").display()
        ),
    )?;
    // Warnings, and the one info line that names the bound address.
    let mut agent = Proc::spawn(
        "agent",
        Command::new(bin("hearth")).args(["agent", "--config"]).arg(&cfg).env("RUST_LOG", "warn,hearth_agent::daemon=info"),
        dir.path(),
    )?;
    let http = logged_addr(&agent.wait_for_log_line("agent serving /metrics", Duration::from_secs(20)).await?, "http_addr")?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut body_len = 0;
    while Instant::now() < end {
        if let Ok((200, b)) = http_get(http, "/metrics").await {
            body_len = b.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss = rss_kib(agent.child.id());
    agent.kill9()?;
    Ok((rss?, body_len))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (v, a) = view()?;
    let host = HostLabel::new("Hostname", "bench");
    let mut out = String::new();
    render(&v, &a, &host, false, &mut out);
    let series = out.lines().filter(|l| !l.starts_with('#')).count();
    let registry = anchor_registry(&out);

    let (mut ours, mut theirs) = (Vec::with_capacity(args.renders), Vec::with_capacity(args.renders));
    let mut size = 0;
    for i in 0..args.renders + 200 {
        let t = Instant::now();
        let mut s = String::with_capacity(out.len() + 1024);
        render(&v, &a, &host, false, &mut s);
        let d1 = t.elapsed();
        let t = Instant::now();
        let mut e = String::with_capacity(out.len() + 1024);
        prometheus_client::encoding::text::encode(&mut e, &registry)?;
        let d2 = t.elapsed();
        if i >= 200 {
            ours.push(d1);
            theirs.push(d2);
        }
        size = s.len();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("render: 8 GPUs x 7 MIG devices, 56 attributed pods: {series} series, {size} bytes, {} renders", args.renders);
    println!("{:<32} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "max us");
    let (o50, o99) = (pct(&mut ours, 0.5), pct(&mut ours, 0.99));
    let (t50, t99) = (pct(&mut theirs, 0.5), pct(&mut theirs, 0.99));
    println!("{:<32} {:>10.1} {:>10.1} {:>10.1}", "hearth dcgm render", us(o50), us(o99), us(*ours.last().context("empty")?));
    println!("{:<32} {:>10.1} {:>10.1} {:>10.1}", "prometheus-client, same series", us(t50), us(t99), us(*theirs.last().context("empty")?));
    println!("ratio hearth/prometheus-client p99: {:.2}; target p99 < 2000 us", o99.as_secs_f64() / t99.as_secs_f64());

    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/mig-spec.yaml");
    let (base, _) = agent_rss("{backend: none}", "", args.rss_seconds).await?;
    let (gpu, body) = agent_rss(
        "{simulated: [8xH100-80GB], collect_interval: 1s}",
        &format!("partition: {{spec: {spec}, config: all-1g.10gb}}\n"),
        args.rss_seconds,
    )
    .await?;
    println!(
        "agent RSS after {} s scraped every 100 ms: 8 simulated H100 with MIG (56 MIG devices, {} byte scrape) {:.1} MiB; no devices {:.1} MiB; target < 40 MiB",
        args.rss_seconds,
        body,
        gpu as f64 / 1024.0,
        base as f64 / 1024.0
    );
    Ok(())
}
