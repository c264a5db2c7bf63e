//! Neuron collection cost: a real `hearth agent` on a simulated trn2.48xlarge (a fake driver
//! tree, LNC 1: 16 devices x 8 = 128 NeuronCores) is fed neuron-monitor's JSON, one report
//! per period from the simulator's `FakeMonitor` with a runtime on every device (every core
//! reporting), and its `/metrics` is scraped once per period. Measured over the reports after
//! a warm-up: the agent's CPU time per collection (utime + stime from `/proc/<pid>/stat`,
//! divided by the reports fed; the whole agent, its sysfs reads and other subsystems included)
//! and its peak RSS (`VmHWM`).
//!
//! The anchor is AWS's `neuron-monitor-prometheus.py`, which ships only in the
//! aws-neuronx-tools package: pass its path with `--anchor` and it runs side by side
//! (`python3 SCRIPT --port PORT`, the same lines on its stdin, scraped the same way), and the
//! ratio of CPU times is printed. Without it only Hearth's numbers are printed.
//! `--python-floor` adds, fed the same lines, a `python3` that only parses each one: not the
//! anchor, but a floor under its CPU (any exporter in Python decodes every line first).
//!
//!   cargo build --release -p hearth-tests --bin bench-neuron -p hearth-agent --bin hearth
//!   target/release/bench-neuron --period 0.5 --reports 120 --python-floor
//!   target/release/bench-neuron --anchor /opt/aws/neuron/bin/neuron-monitor-prometheus.py

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use hearth_agent::neuron::{sim::FakeMonitor, sysfs};
use hearth_proto::neuron::Topology;
use hearth_tests::{Proc, bin, http_get, logged_addr};

#[derive(Parser)]
struct Args {
    /// Seconds between reports (neuron-monitor's default period is 5).
    #[arg(long, default_value_t = 5.0)]
    period: f64,
    /// Reports measured, after the warm-up.
    #[arg(long, default_value_t = 24)]
    reports: u32,
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Path to AWS's neuron-monitor-prometheus.py (from aws-neuronx-tools), run as the anchor.
    #[arg(long)]
    anchor: Option<PathBuf>,
    /// The port the anchor serves on (the script takes a port, not port 0).
    #[arg(long, default_value_t = 8000)]
    anchor_port: u16,
    /// Also feed the lines to `python3` doing nothing but `json.loads` on each: a floor under
    /// any Python exporter's CPU, the anchor's included. It is not the anchor.
    #[arg(long)]
    python_floor: bool,
}

/// (utime + stime) in seconds, and VmHWM in KiB, of `pid`.
fn usage(pid: u32, ticks: f64) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let cpu = (rest[11].parse::<u64>()? + rest[12].parse::<u64>()?) as f64 / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        .context("VmHWM")?;
    Ok((cpu, hwm))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// One fed process: where its lines go and where it is scraped.
struct Fed {
    name: String,
    pid: u32,
    feed: Box<dyn Write + Send>,
    /// None: fed, not scraped.
    http: Option<std::net::SocketAddr>,
    scrape_bytes: usize,
    scrape_time: Duration,
}

impl Fed {
    fn send(&mut self, line: &str) -> Result<()> {
        self.feed
            .write_all(line.as_bytes())
            .and_then(|()| self.feed.write_all(b"\n"))
            .and_then(|()| self.feed.flush())
            .with_context(|| format!("feeding {}", self.name))
    }

    async fn scrape(&mut self) -> Result<String> {
        let Some(http) = self.http else { return Ok(String::new()) };
        let t = Instant::now();
        let (status, body) = http_get(http, "/metrics").await.with_context(|| format!("scraping {}", self.name))?;
        self.scrape_time += t.elapsed();
        ensure!(status == 200, "{}: /metrics answered {status}", self.name);
        self.scrape_bytes = body.len();
        Ok(body)
    }
}

fn series(text: &str, family: &str) -> usize {
    text.lines().filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{')).count()
}

async fn start_agent(dir: &Path, sysfs_root: &Path, period: Duration) -> Result<(Proc, Fed)> {
    let fifo = dir.join("neuron-monitor.fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().context("mkfifo")?;
    ensure!(st.success(), "mkfifo {} failed", fifo.display());
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: bench\nhttp_listen: 127.0.0.1:0\ndevices: {{backend: none}}\nnetwork: {{enabled: false}}\nstate_dir: {}\n\
             cache: {{root: {}}}\nneuron: {{enabled: true, sysfs_root: {}, instance_type: trn2.48xlarge, monitor: [cat, {}], collect_interval: {}}}\n",
            dir.join("state").display(),
            dir.join("cache").display(),
            sysfs_root.display(),
            fifo.display(),
            humantime::format_duration(period)
        ),
    )?;
    let mut agent = Proc::spawn(
        "agent",
        Command::new(bin("hearth")).args(["agent", "--config"]).arg(&cfg).env("RUST_LOG", "warn,hearth_agent::daemon=info"),
        dir,
    )?;
    let http = logged_addr(&agent.wait_for_log_line("agent serving /metrics", Duration::from_secs(20)).await?, "http_addr")?;
    // Opening the FIFO's write end waits for the agent's `cat` to open the read end.
    let open = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo));
    let feed = tokio::time::timeout(Duration::from_secs(20), open).await.context("the agent never started its monitor command")???;
    let pid = agent.child.id();
    let name = "hearth agent".to_owned();
    Ok((agent, Fed { name, pid, feed: Box::new(feed), http: Some(http), scrape_bytes: 0, scrape_time: Duration::ZERO }))
}

async fn start_anchor(dir: &Path, script: &Path, port: u16) -> Result<(Child, Fed)> {
    let log = std::fs::File::create(dir.join("anchor.log"))?;
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting python3 {}", script.display()))?;
    let feed = child.stdin.take().context("anchor stdin")?;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let pid = child.id();
    let name = format!("anchor: {}", script.file_name().map_or_else(|| script.display().to_string(), |n| n.to_string_lossy().into_owned()));
    let fed = Fed { name, pid, feed: Box::new(feed), http: Some(http), scrape_bytes: 0, scrape_time: Duration::ZERO };
    let log = dir.join("anchor.log");
    hearth_tests::wait_for(&format!("the anchor to serve on port {port}"), Duration::from_secs(20), || {
        let exited = child.try_wait();
        let log = log.clone();
        async move {
            if let Some(st) = exited? {
                bail!("the anchor exited ({st}); see {}", log.display());
            }
            Ok(matches!(http_get(http, "/metrics").await, Ok((200, _))).then_some(()))
        }
    })
    .await?;
    Ok((child, fed))
}

fn start_floor() -> Result<(Child, Fed)> {
    let mut child = Command::new("python3")
        .args(["-c", "import json, sys\nfor line in sys.stdin:\n    json.loads(line)\n"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting python3")?;
    let feed = child.stdin.take().context("python3 stdin")?;
    let name = "python3 json.loads only (floor)".to_owned();
    let pid = child.id();
    Ok((child, Fed { name, pid, feed: Box::new(feed), http: None, scrape_bytes: 0, scrape_time: Duration::ZERO }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.period >= 0.1, "--period: expected at least 0.1 (seconds), got {}", args.period);
    let period = Duration::from_secs_f64(args.period);
    let ticks = clock_ticks();
    let dir = tempfile::tempdir()?;
    let topology = Topology::of("trn2.48xlarge", Some(1))?;
    let sysfs_root = dir.path().join("sys");
    sysfs::write_fake_tree(&sysfs_root, &topology, true)?;
    let mut monitor = FakeMonitor::new(&sysfs_root, topology, "i-0bench", period).every_device();

    let (mut agent_proc, agent) = start_agent(dir.path(), &sysfs_root, period).await?;
    let mut fed = vec![agent];
    let mut children = Vec::new();
    let mut anchor = None;
    if let Some(script) = &args.anchor {
        let (child, a) = start_anchor(dir.path(), script, args.anchor_port).await?;
        children.push(child);
        anchor = Some(fed.len());
        fed.push(a);
    }
    let mut floor = None;
    if args.python_floor {
        let (child, f) = start_floor()?;
        children.push(child);
        floor = Some(fed.len());
        fed.push(f);
    }

    let mut line_bytes = 0;
    let mut start = Vec::new();
    let mut last = Vec::new();
    let t_start = Instant::now();
    for i in 0..args.warmup + args.reports {
        if i == args.warmup {
            start = fed.iter().map(|f| usage(f.pid, ticks)).collect::<Result<_>>()?;
            for f in &mut fed {
                f.scrape_time = Duration::ZERO;
            }
        }
        let tick = t_start + period * i;
        let line = serde_json::to_string(&monitor.report())?;
        line_bytes = line.len();
        for f in &mut fed {
            f.send(&line)?;
        }
        // Scraped mid-period, as a Prometheus with the same interval would.
        tokio::time::sleep_until((tick + period / 2).into()).await;
        last.clear();
        for f in &mut fed {
            last.push(f.scrape().await?);
        }
        tokio::time::sleep_until((tick + period).into()).await;
    }
    let end: Vec<(f64, u64)> = fed.iter().map(|f| usage(f.pid, ticks)).collect::<Result<_>>()?;

    let n = f64::from(args.reports);
    println!(
        "bench-neuron: simulated trn2.48xlarge, LNC 1: 16 devices x 8 = 128 NeuronCores, a runtime on every device; \
         {} reports of {} bytes every {:.1} s after {} warm-up, /metrics scraped once per period",
        args.reports, line_bytes, args.period, args.warmup
    );
    println!(
        "{:<30} {:>12} {:>14} {:>10} {:>12} {:>12} {:>14}",
        "", "CPU ms/coll", "CPU % of core", "peak MiB", "scrape B", "core series", "scrape ms avg"
    );
    for (k, f) in fed.iter().enumerate() {
        let cpu = end[k].0 - start[k].0;
        println!(
            "{:<36} {:>12.2} {:>14.2} {:>10.1} {:>12} {:>12} {:>14.2}",
            f.name,
            cpu * 1000.0 / n,
            cpu * 100.0 / (n * args.period),
            end[k].1 as f64 / 1024.0,
            f.scrape_bytes,
            series(&last[k], "neuroncore_utilization_ratio"),
            f.scrape_time.as_secs_f64() * 1000.0 / n
        );
    }
    let hearth_cpu = end[0].0 - start[0].0;
    println!("CPU clock: {ticks} ticks/s, so {:.0} ms resolution over the whole window", 1000.0 / ticks);
    if let Some(k) = floor {
        println!(
            "ratio hearth/json.loads floor CPU time: {:.3} (the anchor costs at least the floor)",
            hearth_cpu / (end[k].0 - start[k].0)
        );
    }
    if let Some(k) = anchor {
        println!("ratio hearth/anchor CPU time: {:.3}; target <= 0.25", hearth_cpu / (end[k].0 - start[k].0));
    } else {
        println!(
            "anchor not run: neuron-monitor-prometheus.py ships only in aws-neuronx-tools; pass --anchor PATH to run it on the same reports"
        );
    }
    println!("hearth agent peak RSS {:.1} MiB; target < 40 MiB", end[0].1 as f64 / 1024.0);
    ensure!(series(&last[0], "neuroncore_utilization_ratio") == 128, "the agent did not export all 128 cores:\n{}", last[0]);

    drop(fed);
    agent_proc.kill9()?;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}
