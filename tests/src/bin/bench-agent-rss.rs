//! The agent's memory around a download: `hearth agent` (the DaemonSet's process) warms a
//! model from a POSIX source (4 x 1 GiB by default) into an empty cache; the program samples
//! its resident memory throughout, and `--settle` after the model is ready. The anchor, in
//! the same run: the same agent started again on the warm cache (nothing to download), after
//! the same settle. The ratio says how much of the download the agent still holds.
//!
//!   cargo build --release --bins && target/release/bench-agent-rss --settle 30s
//!
//! Memory is the process's VmRSS and VmHWM from /proc (a debug build carries more code).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 4)]
    shards: u32,
    #[arg(long, default_value_t = 1 << 30)]
    shard_bytes: u64,
    /// How long after the model is ready the memory is read.
    #[arg(long, default_value = "30s")]
    settle: String,
    #[arg(long)]
    workdir: Option<PathBuf>,
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        .with_context(|| format!("{field} of pid {pid}"))
}

fn ready(cache: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(cache.join("index")) else { return false };
    rd.flatten().any(|e| {
        std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["state"] == "ready")
    })
}

fn start_agent(work: &Path, model: &Path) -> Result<Child> {
    let cfg = work.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: bench\nhttp_listen: 127.0.0.1:0\ndevices: {{backend: none}}\nnetwork: {{enabled: false}}\nstate_dir: {}\n\
             cache:\n  root: {}\n  models:\n    - uri: file://{}\n",
            work.join("state").display(),
            work.join("cache").display(),
            model.display()
        ),
    )?;
    Ok(Command::new(hearth_tests::bin("hearth"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?)
}

/// Runs the agent until the model is ready plus `settle`; returns (peak KiB, KiB after
/// settling, seconds to ready).
fn measure(work: &Path, model: &Path, settle: Duration) -> Result<(u64, u64, f64)> {
    let mut agent = start_agent(work, model)?;
    let pid = agent.id();
    let t = Instant::now();
    let cache = work.join("cache");
    while !ready(&cache) {
        ensure!(t.elapsed() < Duration::from_secs(600), "the model was not ready within 10 minutes");
        ensure!(agent.try_wait()?.is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let to_ready = t.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let (peak, after) = (status_kib(pid, "VmHWM:")?, status_kib(pid, "VmRSS:")?);
    rustix::process::kill_process(rustix::process::Pid::from_child(&agent), rustix::process::Signal::TERM)?;
    agent.wait()?;
    Ok((peak, after, to_ready))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let settle = humantime::parse_duration(&a.settle).context("--settle: expected a duration like \"30s\"")?;
    let work = a.workdir.clone().unwrap_or_else(|| std::env::temp_dir().join("hearth-bench-agent-rss"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let model = work.join("model");
    eprintln!("writing the model: {} x {} bytes", a.shards, a.shard_bytes);
    hearth_agent::cache::sample::write_sample_model(&model, a.shards, a.shard_bytes)?;

    let (peak, after, secs) = measure(&work, &model, settle)?;
    // The anchor: the same agent on the warm cache.
    let (warm_peak, warm_after, _) = measure(&work, &model, settle)?;
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "agent memory around a {:.1} GiB download (ready in {secs:.1} s), {settle:?} after ready:",
        (a.shards as u64 * a.shard_bytes) as f64 / (1u64 << 30) as f64
    );
    println!("  download:   peak {:>7.1} MiB, after {:>7.1} MiB", mib(peak), mib(after));
    println!("  warm start: peak {:>7.1} MiB, after {:>7.1} MiB (anchor)", mib(warm_peak), mib(warm_after));
    println!("  after download / warm start: {:.2}", after as f64 / warm_after as f64);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
