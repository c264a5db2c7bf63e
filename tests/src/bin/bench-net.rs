//! Overhead of the per-pod network programs (run as root):
//!
//! 1. iperf3 between two network namespaces over a veth pair, client and server each in a
//!    test cgroup, with and without Hearth's programs attached at their parent, interleaved
//!    (without, with, without, with, ...) so drift hits both alike; single stream and
//!    8 streams. Prints throughput per run, the medians and the ratio with/without.
//! 2. Average run time per program over the "with" runs (BPF_ENABLE_STATS), beside the
//!    anchor: do-nothing programs of the same kinds (`ebpf/null.bpf.c`) attached the same
//!    way in a third interleaved mode, which shows what one run costs on this machine before
//!    any work (program entry and exit, the stats' own clock reads).
//! 3. The collector with 200 pod cgroups that all have traffic: CPU per collection and the
//!    process's RSS.
//!
//!   cargo build --release --bins && sudo target/release/bench-net [--runs 3] [--seconds 5]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use hearth_agent::netobs::collect::Collector;
use hearth_agent::netobs::pods::{PodRef, PodTable};
use hearth_agent::netobs::{self, NetObs, NullPrograms, PeerClass, ProgramCost};
use hearth_tests::sh;

#[derive(Parser)]
struct Args {
    /// Runs per mode and stream count (at least 3).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Pod cgroups for the collector measurement.
    #[arg(long, default_value_t = 200)]
    cgroups: usize,
}

struct Setup {
    root: PathBuf,
    client: PathBuf,
    server: PathBuf,
    iperf: Option<Child>,
}

impl Setup {
    fn new() -> Result<Self> {
        let mount = netobs::cgroup2_mount().context("no cgroup v2 mount")?;
        let root = mount.join(format!("hearth-bench-{}", std::process::id()));
        let (client, server) = (root.join("client"), root.join("server"));
        for d in [&root, &client, &server] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut s = Self { root, client, server, iperf: None };
        sh(&["ip", "netns", "add", "hbench-a"])?;
        sh(&["ip", "netns", "add", "hbench-b"])?;
        sh(&["ip", "link", "add", "hbva", "netns", "hbench-a", "type", "veth", "peer", "name", "hbvb", "netns", "hbench-b"])?;
        for (ns, dev, addr) in [("hbench-a", "hbva", "10.97.0.1/24"), ("hbench-b", "hbvb", "10.97.0.2/24")] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let child =
            Command::new("nsenter").args(["--net=/run/netns/hbench-b", "iperf3", "-s", "-B", "10.97.0.2"]).stdout(Stdio::null()).spawn()?;
        std::fs::write(s.server.join("cgroup.procs"), child.id().to_string())?;
        s.iperf = Some(child);
        // Ready once the server's socket listens in its namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("nsenter").args(["--net=/run/netns/hbench-b", "ss", "-ltnH", "sport", "=", ":5201"]).output()?;
            if !out.stdout.is_empty() {
                break;
            }
            ensure!(Instant::now() < deadline, "iperf3 -s did not listen within 10 s");
            std::thread::yield_now();
        }
        Ok(s)
    }

    /// One iperf3 run from the client cgroup; received bits per second.
    fn run(&self, streams: u32, seconds: u32) -> Result<f64> {
        // Into the client cgroup before exec, so every socket iperf3 opens is the "pod's".
        let script = format!(
            "echo $$ > {} && exec nsenter --net=/run/netns/hbench-a iperf3 -c 10.97.0.2 -J -t {seconds} -P {streams}",
            self.client.join("cgroup.procs").display()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]).stdout(Stdio::piped());
        let out = cmd.output().context("iperf3 client")?;
        ensure!(out.status.success(), "iperf3: {}", String::from_utf8_lossy(&out.stdout));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON without end.sum_received")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", "hbench-a"]).status();
        let _ = Command::new("ip").args(["netns", "del", "hbench-b"]).status();
        for d in [&self.client, &self.server] {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        remove_tree(&self.root);
    }
}

/// Removes a cgroup tree, retrying for up to 5 s while killed processes finish exiting.
fn remove_tree(root: &Path) {
    if let Ok(dirs) = std::fs::read_dir(root) {
        for d in dirs.flatten().filter(|d| d.path().is_dir()) {
            remove_tree(&d.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(root).is_err() && root.exists() && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// User + system CPU of this process, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())))
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("bench-net attaches BPF programs and creates namespaces and cgroups: run it as root");
    }
    ensure!(args.runs >= 3, "--runs: at least 3");
    let setup = Setup::new()?;
    let classes = [PeerClass::parse("pods", &["10.97.0.0/24"])?];
    println!("iperf3 over veth between two namespaces, {} s per run, {} runs per mode, interleaved", args.seconds, args.runs);
    let mut summary = Vec::new();
    let mut costs: HashMap<&'static str, (u64, u64)> = HashMap::new();
    let mut add = |before: &[ProgramCost], after: Vec<ProgramCost>| {
        for (b, a) in before.iter().zip(after) {
            let e = costs.entry(a.name).or_default();
            e.0 += a.run_time_ns - b.run_time_ns;
            e.1 += a.run_count - b.run_count;
        }
    };
    println!("{:>8} {:>4} {:>14} {:>14} {:>14}", "streams", "run", "without Gb/s", "null Gb/s", "with Gb/s");
    for streams in [1u32, 8] {
        let (mut without, mut null, mut with) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..args.runs {
            without.push(setup.run(streams, args.seconds)? / 1e9);
            let anchor = NullPrograms::attach(&setup.root)?;
            let before = anchor.costs();
            null.push(setup.run(streams, args.seconds)? / 1e9);
            add(&before, anchor.costs());
            drop(anchor);
            let mut obs = NetObs::attach(&setup.root, &classes, &[5201])?;
            obs.enable_cost_stats()?;
            let before = obs.costs();
            with.push(setup.run(streams, args.seconds)? / 1e9);
            add(&before, obs.costs());
            drop(obs);
            println!("{streams:>8} {run:>4} {:>14.2} {:>14.2} {:>14.2}", without[run], null[run], with[run]);
        }
        let (mw, mn, mh) = (median(&mut without), median(&mut null), median(&mut with));
        summary.push((streams, mw, mn, mh));
    }
    println!();
    println!("{:>8} {:>16} {:>16} {:>16} {:>8} {:>8}", "streams", "median without", "median null", "median with", "ratio", "target");
    for (streams, mw, mn, mh) in &summary {
        let ratio = mh / mw;
        println!(
            "{streams:>8} {mw:>13.2} Gb/s {mn:>11.2} Gb/s {mh:>11.2} Gb/s {ratio:>8.3} {:>8}",
            if ratio >= 0.97 { ">=0.97 ok" } else { "MISS" }
        );
    }
    println!();
    println!("{:>16} {:>14} {:>12} {:>8}", "program", "runs", "avg ns/run", "target");
    let mut names: Vec<_> = costs.keys().copied().collect();
    names.sort_unstable();
    for n in names {
        let (ns, runs) = costs[n];
        let avg = ns as f64 / runs.max(1) as f64;
        let target = if n.starts_with("null_") {
            "anchor"
        } else if avg < 100.0 {
            "<100 ok"
        } else {
            "MISS"
        };
        println!("{n:>16} {runs:>14} {avg:>12.1} {target:>8}");
    }
    let avg = |n: &str| costs.get(n).map_or(f64::NAN, |(ns, runs)| *ns as f64 / (*runs).max(1) as f64);
    println!(
        "above the do-nothing anchor: egress {:.0} ns, ingress {:.0} ns, sock_ops {:.0} ns",
        avg("netobs_egress") - avg("null_egress"),
        avg("netobs_ingress") - avg("null_ingress"),
        avg("netobs_sockops") - avg("null_sockops")
    );
    drop(setup);
    collector_cost(args.cgroups)
}

/// The collector over `n` pod cgroups that each sent one datagram.
fn collector_cost(n: usize) -> Result<()> {
    let mount = netobs::cgroup2_mount().context("no cgroup v2 mount")?;
    let root = mount.join(format!("hearth-bench-pods-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = (|| {
        let obs = NetObs::attach(&root, &[PeerClass::parse("loopback", &["127.0.0.0/8"])?], &[])?;
        let names = PodTable::default();
        let mut dirs = Vec::new();
        for i in 0..n {
            let uid = format!("{i:08x}-0000-4000-8000-00000000bead");
            let d = root.join(format!("pod{uid}"));
            std::fs::create_dir_all(&d)?;
            names.insert(&uid, PodRef { namespace: "bench".into(), name: format!("p{i}") });
            dirs.push(d.display().to_string());
        }
        // One process hops through the cgroups, sending a datagram from each.
        let script = "import os,socket,sys\nfor d in sys.argv[1:]:\n    open(d+'/cgroup.procs','w').write(str(os.getpid()))\n    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'x'*100,('127.0.0.1',9)); s.close()\nopen(os.path.dirname(sys.argv[1])+'/cgroup.procs','w').write(str(os.getpid()))\n";
        let st = Command::new("python3").args(["-c", script]).args(&dirs).status()?;
        ensure!(st.success(), "traffic generator failed");
        let rss_before = rss_kib();
        let (mut c, metrics) = Collector::new(obs, root.clone(), Arc::new(names), Duration::from_secs(300));
        let ticks = 200;
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        for i in 0..ticks {
            c.tick(Instant::now() + Duration::from_millis(i));
        }
        let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed());
        let mut out = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        out.push_str(&hearth_service::http::prometheus_text(&registry)?);
        let (traffic, _, _, cgroups) = metrics.sizes();
        println!();
        println!(
            "collector: {n} pod cgroups ({cgroups} under the root, {traffic} traffic series), {ticks} collections: {:.2} ms CPU and {:.2} ms wall per collection; /metrics {} KiB",
            cpu * 1e3 / f64::from(ticks as u32),
            wall.as_secs_f64() * 1e3 / f64::from(ticks as u32),
            out.len() / 1024
        );
        println!("process RSS: {} KiB before the collector, {} KiB after {ticks} collections", rss_before, rss_kib());
        Ok(())
    })();
    remove_tree(&root);
    result
}
