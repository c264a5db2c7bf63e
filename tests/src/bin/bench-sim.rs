//! The cluster simulator's benchmark: every placement strategy under the same autoscaler
//! (the controller's real Scaling engine), on the same cluster, catalog and traffic per seed.
//! Prints one row per strategy with cold-start percentiles (pooled over seeds), byte hit
//! ratio, S3 bytes, GPU time, stranded MIG slices, request wait and pre-warm outcomes, and
//! the ratio the target is stated in: Hearth + pre-warm p95 cold start / least-loaded's.
//!
//!   cargo build --release --bins && target/release/bench-sim [--seeds 3] [--small]

use anyhow::{Result, bail};
use clap::Parser;
use hearth_tests::sim::{self, Config, Report, Strategy};

#[derive(Parser)]
struct Args {
    /// Seeds to run (each gives a different cluster, catalog and traffic).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The small test cluster instead of the 1,000-node one.
    #[arg(long)]
    small: bool,
    /// Measured hours (after warm-up).
    #[arg(long)]
    hours: Option<f64>,
    #[arg(long)]
    warmup_hours: Option<f64>,
    /// Mean demand as a share of each device class's capacity.
    #[arg(long)]
    load: Option<f64>,
    /// Per-node weight cache, GB (GPU nodes; Neuron nodes get half).
    #[arg(long)]
    cache_gb: Option<f64>,
    /// Parallel runs (default: the machine's cores).
    #[arg(long)]
    jobs: Option<usize>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut cfg = if a.small { Config::small() } else { Config::default() };
    if let Some(h) = a.hours {
        cfg.measure = h * 3600.0;
    }
    if let Some(h) = a.warmup_hours {
        cfg.warmup = h * 3600.0;
    }
    if let Some(l) = a.load {
        cfg.load = l;
    }
    if let Some(c) = a.cache_gb {
        cfg.gpu_cache = c * 1e9;
        cfg.neuron_cache = c * 0.5e9;
    }
    let jobs = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    println!(
        "cluster: {} nodes ({} H100 with {} MIG GPUs, {} H100, {} A100, {} inf2, {} trn1), {} models, load {:.2}, cache {:.0} GB/GPU node, {:.0} h measured after {:.0} h warm-up, scaling every {:.0} s, seeds {}..{}",
        cfg.nodes(),
        cfg.h100_mig_nodes,
        cfg.mig_gpus_per_node,
        cfg.h100_nodes,
        cfg.a100_nodes,
        cfg.inf2_nodes,
        cfg.trn1_nodes,
        cfg.models,
        cfg.load,
        cfg.gpu_cache / 1e9,
        cfg.measure / 3600.0,
        cfg.warmup / 3600.0,
        cfg.scaling_interval,
        a.seed,
        a.seed + a.seeds - 1
    );
    let runs: Vec<(Strategy, u64)> = Strategy::ALL.iter().flat_map(|s| (a.seed..a.seed + a.seeds).map(move |seed| (*s, seed))).collect();
    let results = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(runs.len()) {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(s, seed)) = runs.get(k) else { return };
                    let r = sim::run(&cfg, s, seed);
                    if let Ok(r) = &r {
                        eprintln!("  {} seed {seed}: {} cold starts, {:.1?}", s.name(), r.cold_starts.len(), r.wall);
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((s, seed, r));
                }
            });
        }
    });
    let mut by: Vec<(Strategy, Report)> = Strategy::ALL.iter().map(|s| (*s, Report::default())).collect();
    for (s, seed, r) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let r = match r {
            Ok(r) => r,
            Err(e) => bail!("{} seed {seed}: {e:#}", s.name()),
        };
        let Some((_, acc)) = by.iter_mut().find(|(x, _)| *x == s) else { continue };
        acc.merge(r);
    }
    println!();
    println!(
        "| strategy | cold starts | p50 (s) | p95 (s) | p99 (s) | byte hit ratio | S3 TB/day | GPU-h serving/day | GPU-h starting/day | stranded MIG slices | mean request wait (s) | abandoned | no fit / cache full | pre-warm issued / in time / late |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let days = by[0].1.measured_seconds / 86_400.0;
    for (s, r) in &by {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.1} | {:.0} | {:.0} | {:.1} of {:.0} | {:.2} | {:.3}% | {} / {} | {} / {} / {} |",
            s.name(),
            r.cold_starts.len(),
            r.cold_start(0.5),
            r.cold_start(0.95),
            r.cold_start(0.99),
            r.byte_hit_ratio(),
            r.s3_bytes / 1e12 / days,
            r.gpu_seconds_serving / 3600.0 / days,
            r.gpu_seconds_starting / 3600.0 / days,
            r.stranded_slices(),
            r.mig_slice_capacity,
            r.mean_wait(),
            100.0 * r.abandoned / r.arrivals.max(1.0),
            r.placement_failures,
            r.cache_full,
            r.prewarm_issued,
            r.prewarm_in_time,
            r.prewarm_late
        );
    }
    let ll = by[0].1.cold_start(0.95);
    let hp = by[3].1.cold_start(0.95);
    println!();
    println!("hearth + pre-warm p95 / least-loaded p95 = {:.3}  (target <= 0.2)", hp / ll);
    println!("hearth predicted-ready p95 / least-loaded p95 = {:.3}", by[2].1.cold_start(0.95) / ll);
    println!(
        "floor (NVMe load + runtime start, the same on any node): p50 {:.0} s, p95 {:.0} s; avoidable part (cold start - floor) p95: least-loaded {:.0} s, hearth + pre-warm {:.0} s, ratio {:.3}",
        sim::dist::quantile(&mut by[3].1.floors.clone(), 0.5),
        sim::dist::quantile(&mut by[3].1.floors.clone(), 0.95),
        by[0].1.avoidable(0.95),
        by[3].1.avoidable(0.95),
        by[3].1.avoidable(0.95) / by[0].1.avoidable(0.95)
    );
    let mut err = by[2].1.prediction_errors.clone();
    println!(
        "hearth predicted time-to-ready vs actual: median |error| {:.0}%, p90 {:.0}%",
        100.0 * sim::dist::quantile(&mut err, 0.5),
        100.0 * sim::dist::quantile(&mut err, 0.9)
    );
    Ok(())
}
