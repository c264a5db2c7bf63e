//! Image pull benchmark: Hearth's prefetch (by default a probe, then parallel ranged GETs
//! served to containerd's own CRI pull as a registry mirror; `hearth-content` writes them
//! through containerd's content API instead) against `ctr images pull` and a plain CRI
//! PullImage (what the kubelet does), side by side on one containerd, in one run, printed as
//! ratios.
//!
//!   cargo build --release -p hearth-tests --bin bench-images
//!   sudo target/release/bench-images                        # 6 layers, 2.62 GB, 3 rounds
//!   sudo target/release/bench-images --layers 20M,10M,5M,5M --rounds 1   # smoke run
//!   sudo target/release/bench-images --write-path           # where a pull's download goes
//!
//! One image of uneven random layers is pushed once to a local `docker-registry`. Two
//! scenarios: `capped`, through a proxy that paces every client connection to
//! `--per-connection` bytes/s and waits `--latency` before each answer (object-storage
//! registries serve one connection at about 90 MB/s), and `uncapped`, the registry directly.
//! In each round every method runs once, the order rotated per round; before each run the
//! image, its content and its snapshots are removed and the removal checked (`ctr content
//! ls`, `ctr snapshots ls` and the directories on disk), dirty pages are synced, the page
//! cache dropped and the registry's files read back in, so every method starts cold on the
//! node and warm on the registry (the registry serves from memory for all three alike).
//! Each run ends with the image present for CRI and unpacked into overlayfs (checked: CRI's
//! image id, the top layer's chain id committed in the snapshotter).
//!
//! Alongside, per round and untimed against the targets: the same ranged GETs as Hearth's
//! (same connections and chunk) with the bytes discarded, which is what the network path
//! alone allows; Hearth's own run is split into its download phase and CRI's unpack of
//! local content, and ctr's into its fetch and its unpack (ctr prints the latter). Every
//! run also prints the CPU seconds spent by containerd, the registry, this process (proxy,
//! Hearth's puller, and `ctr` once reaped) and the rest of the machine: on a 2-core machine
//! the pull is CPU-bound, and "rest" shows when something else was running. A pull during
//! which the rest used more than `--max-rest` CPU-seconds per second is run again (up to
//! `--noisy-retries` times, then kept and marked NOISY).
//!
//! `--write-path` replaces the pulls with a diagnostic of Hearth's content-store write path
//! alone: the layers' bytes read from the registry's files (page cache, no network) and
//! written through `Runtime::open_write` as a pull does, over one connection, over a
//! connection per layer and one layer at a time; against plain file writes with fsync of
//! the same bytes on the same filesystem.
//!
//! Needs root, `docker-registry`, containerd (1.6 from Debian 12; 1.7 as scripts/test.sh
//! unpacks it, the default) and runc. Disk: about 3 x the image (registry, content store,
//! snapshots) under /tmp, plus the image's files once while it is built and pushed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use hearth_agent::images::MirrorSettings;
use hearth_agent::images::pull::{Path as PullPath, Progress, PullSettings, Puller};
use hearth_agent::images::reference::Reference;
use hearth_agent::images::registry::RegistryClient;
use hearth_agent::images::runtime::Runtime;
use hearth_tests::containerd::{Containerd, CriOptions, Options, containerd_17_dir};
use hearth_tests::registry::{PushedImage, Registry, TestImage, sha256_digest};
use hearth_tests::regproxy::{RegProxy, RegProxyOptions, RegProxyStats};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Layer sizes, comma-separated ("1G" is 10^9 bytes, "1Gi" 2^30).
    #[arg(long, default_value = "1G,700M,500M,300M,100M,20M")]
    layers: String,
    /// Rounds per scenario; every method runs once per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "capped,uncapped")]
    scenarios: Vec<Scenario>,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hearth,ctr,cri")]
    methods: Vec<Method>,
    /// containerd to run: "1.7" (Debian 13's, unpacked by scripts/test.sh) or "1.6" (the system's).
    #[arg(long, default_value = "1.7")]
    containerd: String,
    /// Bytes/s each connection gets in the capped scenario.
    #[arg(long, default_value = "90M")]
    per_connection: String,
    /// Waited before each answer in the capped scenario.
    #[arg(long, default_value = "1ms")]
    latency: humantime::Duration,
    /// Hearth's connections (`hearth images pull` default: 16).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Hearth's bytes per ranged GET (`hearth images pull` default: 8Mi).
    #[arg(long, default_value = "8Mi")]
    chunk: String,
    /// Where the image's layer files are built before the push (the registry and containerd
    /// live under /tmp).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Skip the per-round ranged-GET measurement (bytes discarded).
    #[arg(long)]
    no_gets: bool,
    /// A pull during which the rest of the machine (kernel threads, other processes) used
    /// more than this many CPU-seconds per second is run again: on a shared machine, another
    /// job's compile would otherwise decide the ratios. The kernel's own writeback of a pull
    /// stays below about 0.2; a compile beside it takes about 1.
    #[arg(long, default_value_t = 0.35)]
    max_rest: f64,
    /// How often a noisy pull is run again before it is kept (marked NOISY).
    #[arg(long, default_value_t = 3)]
    noisy_retries: u32,
    /// Instead of the pulls: time Hearth's content-store write path alone (the layers' bytes
    /// from the registry's files in memory, no network) over one gRPC connection and over a
    /// connection per layer, and plain file writes with fsync of the same bytes.
    #[arg(long)]
    write_path: bool,
}

/// How the write-path diagnostic drives containerd's content store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    /// Every layer at once over one gRPC connection: what a Hearth pull does.
    Shared,
    /// Every layer at once, a connection each.
    PerLayer,
    /// One layer after another over one connection: what one stream gets.
    Sequential,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Capped,
    Uncapped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Method {
    /// Hearth's default: blobs served to containerd's CRI pull as a mirror.
    Hearth,
    /// Hearth writing blobs through containerd's content API, then CRI unpacking.
    HearthContent,
    Ctr,
    Cri,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Hearth => "hearth",
            Method::HearthContent => "hearth-content",
            Method::Ctr => "ctr",
            Method::Cri => "cri",
        }
    }
}

/// CPU seconds (user + system) over a run: containerd, the registry, this process with the
/// children it has waited for (`ctr`), and everything on the machine.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    containerd: f64,
    registry: f64,
    bench: f64,
    machine: f64,
}

impl Cpu {
    fn minus(self, b: Cpu) -> Cpu {
        Cpu {
            containerd: self.containerd - b.containerd,
            registry: self.registry - b.registry,
            bench: self.bench - b.bench,
            machine: self.machine - b.machine,
        }
    }

    /// What ran besides the pull (another build on the machine, say).
    fn other(&self) -> f64 {
        (self.machine - self.containerd - self.registry - self.bench).max(0.0)
    }

    fn line(&self, secs: f64) -> String {
        format!(
            "cpu s: containerd {:.1}, registry {:.1}, bench+ctr {:.1}, rest (kernel threads, other processes) {:.1}; machine {:.0}% busy",
            self.containerd,
            self.registry,
            self.bench,
            self.other(),
            100.0 * self.machine / (secs * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64))
        )
    }
}

/// utime + stime (+ cutime + cstime with `children`) of a process, in seconds.
fn proc_cpu(pid: u32, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    let n = if children { 4 } else { 2 };
    f.get(11..11 + n).map_or(0.0, |v| v.iter().sum::<f64>()) / rustix::param::clock_ticks_per_second() as f64
}

/// Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait).
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    let busy: f64 = f.iter().take(8).sum::<f64>() - f.get(3).copied().unwrap_or(0.0) - f.get(4).copied().unwrap_or(0.0);
    busy / rustix::param::clock_ticks_per_second() as f64
}

/// The process whose command line contains `needle` (a config path of ours).
fn pid_with_arg(needle: &Path) -> Option<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle)))
}

/// One timed pull.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    secs: f64,
    /// Hearth: until every layer was committed; ctr: until its fetch ended.
    download: Option<f64>,
    /// Hearth: CRI PullImage with the content local; ctr: its own unpack.
    unpack: Option<f64>,
    proxy: Option<RegProxyStats>,
    cpu: Cpu,
    /// Hearth's probe found the registry fast and left the pull to containerd.
    direct: bool,
}

struct Bench {
    ctrd: Containerd,
    runtime: Runtime,
    registry: Registry,
    settings: PullSettings,
    no_gets: bool,
    containerd_pid: u32,
    registry_pid: u32,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache needs root")
}

/// Reads every file under `dir` once (the registry's storage), so it serves from memory.
fn read_tree(dir: &Path) -> Result<u64> {
    use std::io::Read as _;
    let mut n = 0;
    let mut buf = vec![0u8; 1 << 20];
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            n += read_tree(&p)?;
        } else if p.is_file() {
            let mut f = std::fs::File::open(&p)?;
            loop {
                let k = f.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
        }
    }
    Ok(n)
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.count())
}

fn avail_bytes(path: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(s.f_bavail * s.f_frsize)
}

/// The snapshot key of the whole image: OCI's chain id over the diff ids, which for these
/// uncompressed layers are the layer digests.
fn chain_id(layers: &[hearth_tests::registry::Descriptor]) -> String {
    let mut chain = String::new();
    for l in layers {
        chain = if chain.is_empty() { l.digest.clone() } else { sha256_digest(format!("{chain} {}", l.digest).as_bytes()) };
    }
    chain
}

/// A Go duration as ctr prints it (`1.234s`, `1m2.5s`, `850.1ms`), in seconds.
fn go_duration(s: &str) -> Option<f64> {
    let (mut total, mut rest) = (0.0, s.trim());
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        total += value
            * match &rest[..u] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return None,
            };
        rest = &rest[u..];
    }
    Some(total)
}

fn stats_delta(after: RegProxyStats, before: RegProxyStats) -> RegProxyStats {
    RegProxyStats {
        requests: after.requests - before.requests,
        range_requests: after.range_requests - before.range_requests,
        bytes_served: after.bytes_served - before.bytes_served,
        token_requests: after.token_requests - before.token_requests,
        unauthorized: after.unauthorized - before.unauthorized,
        connections: after.connections - before.connections,
    }
}

impl Bench {
    fn cpu(&self) -> Cpu {
        Cpu {
            containerd: proc_cpu(self.containerd_pid, false),
            registry: proc_cpu(self.registry_pid, false),
            bench: proc_cpu(std::process::id(), true),
            machine: machine_cpu(),
        }
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        self.ctrd.ctr(args)
    }

    fn content_digests(&self) -> Result<Vec<String>> {
        Ok(self.ctr(&["content", "ls", "-q"])?.lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect())
    }

    /// Snapshot keys in the default snapshotter (overlayfs).
    fn snapshots(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["snapshots", "ls"])?;
        Ok(out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
    }

    fn overlay_dir(&self) -> PathBuf {
        self.ctrd.dir().join("root/io.containerd.snapshotter.v1.overlayfs/snapshots")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.ctrd.dir().join("root/io.containerd.content.v1.content/blobs/sha256")
    }

    /// Removes every image, lease, unfinished write, blob and snapshot, and waits until the
    /// content store and the snapshotter's directory are empty on disk.
    async fn clean(&self) -> Result<()> {
        let names: Vec<String> = self.ctr(&["images", "ls", "-q"])?.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
        if !names.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(names.iter().map(String::as_str));
            self.ctr(&args)?;
        }
        let leases: Vec<String> = self.ctr(&["leases", "ls", "-q"])?.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
        if !leases.is_empty() {
            let mut args = vec!["leases", "rm", "--sync"];
            args.extend(leases.iter().map(String::as_str));
            self.ctr(&args)?;
        }
        for (reference, _) in self.runtime.ingests("").await? {
            self.runtime.abort(&reference).await?;
        }
        let started = Instant::now();
        let mut by_hand = false;
        loop {
            let (blobs, snaps) = (self.content_digests()?, self.snapshots()?);
            let on_disk = (entries(&self.blobs_dir()), entries(&self.overlay_dir()));
            if blobs.is_empty() && snaps.is_empty() && on_disk == (0, 0) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("after removing the image: blobs {blobs:?}, snapshots {snaps:?}, on disk (blobs, snapshot dirs) {on_disk:?}");
            }
            // Garbage collection should have taken everything; what it left is removed by
            // hand once (snapshots newest first: a parent goes after its children).
            if !by_hand && started.elapsed() > Duration::from_secs(5) {
                by_hand = true;
                for s in snaps.iter().rev() {
                    let _ = self.ctr(&["snapshots", "rm", s]);
                }
                if !blobs.is_empty() {
                    let mut args = vec!["content", "rm"];
                    args.extend(blobs.iter().map(String::as_str));
                    let _ = self.ctr(&args);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Cleans, flushes writeback, drops the page cache and reads the registry's files back.
    async fn cold_start(&self) -> Result<()> {
        self.clean().await?;
        let storage = self.registry.storage_dir();
        tokio::task::spawn_blocking(move || -> Result<()> {
            drop_caches()?;
            read_tree(&storage)?;
            Ok(())
        })
        .await??;
        Ok(())
    }

    /// The image is there for CRI (its id the config digest) and unpacked for overlayfs.
    async fn check_landed(&self, reference: &str, img: &PushedImage) -> Result<()> {
        let rt = self.runtime.clone();
        let status = hearth_tests::wait_for("CRI to see the image", Duration::from_secs(20), || {
            let rt = rt.clone();
            async move { Ok(rt.image_status(reference).await?) }
        })
        .await?;
        ensure!(status.id == img.config.digest, "CRI's image id {} is not the config digest {}", status.id, img.config.digest);
        let chain = chain_id(&img.layers);
        let info = self.ctr(&["snapshots", "info", &chain]).with_context(|| format!("the image's top snapshot {chain} is missing"))?;
        ensure!(info.contains("Committed"), "snapshot {chain} is not committed:\n{info}");
        let blobs = self.content_digests()?;
        for l in &img.layers {
            ensure!(blobs.contains(&l.digest), "layer {} is not in the content store", l.digest);
        }
        Ok(())
    }

    async fn run(&self, m: Method, reference: &str, proxy: Option<&RegProxy>) -> Result<Run> {
        let before = proxy.map(RegProxy::stats);
        let cpu = self.cpu();
        let mut run = match m {
            Method::Hearth => self.hearth(reference, true).await?,
            Method::HearthContent => self.hearth(reference, false).await?,
            Method::Ctr => self.ctr_pull(reference).await?,
            Method::Cri => {
                let t = Instant::now();
                self.runtime.pull(reference, None).await?;
                Run { secs: t.elapsed().as_secs_f64(), ..Run::default() }
            }
        };
        run.proxy = proxy.zip(before).map(|(p, b)| stats_delta(p.stats(), b));
        run.cpu = self.cpu().minus(cpu);
        Ok(run)
    }

    async fn hearth(&self, reference: &str, mirror: bool) -> Result<Run> {
        let registry = Arc::new(RegistryClient::new(HashMap::new(), vec![])?);
        let mirror = if mirror {
            let m = MirrorSettings { hosts_dir: self.ctrd.dir().join("certs.d"), listen: ([127, 0, 0, 1], 0).into(), address: None };
            Some(Arc::new(m.start(registry.clone(), &self.settings, None).map_err(anyhow::Error::msg)?))
        } else {
            None
        };
        let puller = Puller { registry, runtime: self.runtime.clone(), settings: self.settings.clone(), limit: None, mirror };
        let r = Reference::parse(reference)?;
        let progress = Arc::new(Progress::default());
        let t = Instant::now();
        // The moment the pull hands over to CRI (phase 2, unpacking), sampled every 2 ms.
        let watch = {
            let progress = progress.clone();
            tokio::spawn(async move {
                while progress.phase.load(Ordering::Relaxed) < 2 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                t.elapsed().as_secs_f64()
            })
        };
        let pulled = match puller.pull(&r, &progress, &CancellationToken::new()).await {
            Ok(p) => p,
            Err(e) => {
                watch.abort();
                return Err(e.into());
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let direct = pulled.fallback.as_ref().is_some_and(|f| f.0 == "fast_registry");
        ensure!(pulled.path.is_fast() || direct, "Hearth fell back to a plain CRI pull: {:?}", pulled.fallback);
        if direct {
            // The probe found the registry fast: containerd pulled it itself.
            watch.abort();
            return Ok(Run { secs, direct: true, ..Run::default() });
        }
        ensure!(pulled.reused == 0, "Hearth found {} bytes already in the content store: not a cold pull", pulled.reused);
        if pulled.path == PullPath::Mirror {
            // containerd unpacks as the blobs arrive: no phase to split off.
            watch.abort();
            return Ok(Run { secs, ..Run::default() });
        }
        let download = watch.await?;
        Ok(Run { secs, download: Some(download), unpack: Some(secs - download), ..Run::default() })
    }

    async fn ctr_pull(&self, reference: &str) -> Result<Run> {
        let mut cmd = tokio::process::Command::from(self.ctrd.ctr_command());
        cmd.args(["images", "pull", "--plain-http", reference]);
        let t = Instant::now();
        let out = cmd.output().await.context("running ctr images pull")?;
        let secs = t.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "ctr images pull failed ({}): {}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
        // The local client path prints `done: <unpack time>` after its fetch.
        let unpack = stdout.lines().rev().find_map(|l| l.trim().strip_prefix("done:")).and_then(go_duration);
        Ok(Run { secs, download: unpack.map(|u| secs - u), unpack, ..Run::default() })
    }

    /// What the network path gives: Hearth's ranged GETs (same connections and chunk) over
    /// every layer, bytes counted and discarded.
    async fn gets_only(&self, reference: &str, img: &PushedImage) -> Result<f64> {
        let client = Arc::new(RegistryClient::new(HashMap::new(), vec![])?);
        let r = Arc::new(Reference::parse(reference)?);
        let chunk = self.settings.chunk;
        let mut jobs = std::collections::VecDeque::new();
        for l in &img.layers {
            let mut s = 0;
            while s < l.size {
                jobs.push_back((l.digest.clone(), s, (s + chunk).min(l.size)));
                s += chunk;
            }
        }
        let want: u64 = img.layers.iter().map(|l| l.size).sum();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..self.settings.connections.max(1) {
            let (client, r, jobs) = (client.clone(), r.clone(), jobs.clone());
            set.spawn(async move {
                let mut n = 0u64;
                loop {
                    let Some((digest, start, end)) = jobs.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                        return anyhow::Ok(n);
                    };
                    let mut body = client.blob_range(&r, &digest, start, end - 1).await?;
                    while let Some(f) = body.frame().await {
                        if let Ok(d) = f?.into_data() {
                            n += d.len() as u64;
                        }
                    }
                }
            });
        }
        let mut got = 0;
        while let Some(res) = set.join_next().await {
            got += res??;
        }
        let secs = t.elapsed().as_secs_f64();
        ensure!(got == want, "ranged GETs brought {got} of {want} bytes");
        Ok(secs)
    }
}

impl Bench {
    /// A layer's file in the registry's storage.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.registry.storage_dir().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// Writes every layer through [`Runtime::open_write`] and `BlobWriter` as a pull does
    /// (chunks read ahead by a task of their own, so reading never waits on writing), then
    /// commits it; returns the seconds from the first open to the last commit.
    async fn content_writes(&self, img: &PushedImage, mode: WriteMode) -> Result<f64> {
        use tokio::io::AsyncReadExt as _;
        let lease = "bench-write-path";
        self.runtime.lease(lease, Duration::from_secs(3600)).await?;
        let chunk = self.settings.chunk;
        let write_one = |runtime: Runtime, path: PathBuf, digest: String, size: u64| async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
            let reader = tokio::spawn(async move {
                let mut f = tokio::fs::File::open(&path).await?;
                let mut left = size;
                while left > 0 {
                    let mut buf = vec![0u8; left.min(chunk) as usize];
                    f.read_exact(&mut buf).await?;
                    left -= buf.len() as u64;
                    if tx.send(bytes::Bytes::from(buf)).await.is_err() {
                        break;
                    }
                }
                anyhow::Ok(())
            });
            let mut w = runtime.open_write(&format!("bench-{digest}"), lease, &digest, size).await?;
            while let Some(b) = rx.recv().await {
                w.write(b).await?;
            }
            reader.await??;
            w.commit().await?;
            anyhow::Ok(())
        };
        let t = Instant::now();
        if mode == WriteMode::Sequential {
            for l in &img.layers {
                write_one(self.runtime.clone(), self.blob_file(&l.digest), l.digest.clone(), l.size).await?;
            }
        } else {
            let mut set = tokio::task::JoinSet::new();
            for l in &img.layers {
                let runtime = match mode {
                    WriteMode::PerLayer => Runtime::new(self.ctrd.socket(), "k8s.io", Duration::from_secs(60))?,
                    _ => self.runtime.clone(),
                };
                set.spawn(write_one(runtime, self.blob_file(&l.digest), l.digest.clone(), l.size));
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        self.runtime.drop_lease(lease, true).await?;
        Ok(secs)
    }

    /// The same bytes copied into plain files beside the content store, all layers at once,
    /// each fsynced at the end (as containerd does at commit): what the disk takes.
    async fn file_writes(&self, img: &PushedImage) -> Result<f64> {
        let dir = self.ctrd.dir().join("bench-file-writes");
        std::fs::create_dir_all(&dir)?;
        let files: Vec<(PathBuf, PathBuf)> =
            img.layers.iter().enumerate().map(|(i, l)| (self.blob_file(&l.digest), dir.join(format!("layer-{i}")))).collect();
        let chunk = self.settings.chunk as usize;
        let secs = tokio::task::spawn_blocking(move || -> Result<f64> {
            use std::io::{Read as _, Write as _};
            let t = Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = files
                    .iter()
                    .map(|(from, to)| {
                        s.spawn(move || -> Result<()> {
                            let (mut src, mut dst) = (std::fs::File::open(from)?, std::fs::File::create(to)?);
                            let mut buf = vec![0u8; chunk];
                            loop {
                                let n = src.read(&mut buf)?;
                                if n == 0 {
                                    break;
                                }
                                dst.write_all(&buf[..n])?;
                            }
                            dst.sync_all()?;
                            Ok(())
                        })
                    })
                    .collect();
                handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a writer thread panicked"))?)
            })?;
            Ok(t.elapsed().as_secs_f64())
        })
        .await??;
        std::fs::remove_dir_all(&dir)?;
        Ok(secs)
    }

    async fn write_path(&self, img: &PushedImage, rounds: usize) -> Result<()> {
        let gb = img.layers.iter().map(|l| l.size).sum::<u64>() as f64 / 1e9;
        println!("\n== write path alone: {gb:.2} GB of layers from the registry's files (page cache), {} B calls", self.settings.chunk);
        let names = [
            "content store, all layers, one connection",
            "content store, all layers, a connection each",
            "content store, one layer at a time",
            "plain files + fsync, all layers",
        ];
        let mut all = vec![Vec::new(); names.len()];
        for round in 0..rounds {
            for (i, name) in names.iter().enumerate().cycle().skip(round % names.len()).take(names.len()) {
                self.cold_start().await?;
                let cpu = self.cpu();
                let secs = match i {
                    0 => self.content_writes(img, WriteMode::Shared).await?,
                    1 => self.content_writes(img, WriteMode::PerLayer).await?,
                    2 => self.content_writes(img, WriteMode::Sequential).await?,
                    _ => self.file_writes(img).await?,
                };
                let cpu = self.cpu().minus(cpu);
                println!("round {round}  {name:<46} {secs:>7.2} s  {:>5.0} MB/s  {}", gb * 1e3 / secs, cpu.line(secs));
                all[i].push(secs);
            }
        }
        for (name, v) in names.iter().zip(&all) {
            let m = median(v);
            println!("median  {name:<46} {m:>7.2} s  {:>5.0} MB/s", gb * 1e3 / m);
        }
        self.clean().await
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(rustix::process::geteuid().is_root(), "needs root (containerd, drop_caches)");
    ensure!(args.rounds > 0 && !args.methods.is_empty() && !args.scenarios.is_empty(), "nothing to run");
    let sizes = args.layers.split(',').map(|s| hearth_service::config::parse_size("--layers", s)).collect::<Result<Vec<u64>, _>>()?;
    let rate = hearth_service::config::parse_size("--per-connection", &args.per_connection)?;
    let chunk = hearth_service::config::parse_size("--chunk", &args.chunk)?;
    let total: u64 = sizes.iter().sum();
    let workdir = args.workdir.clone().unwrap_or_else(std::env::temp_dir);
    // Registry + content store + snapshots under /tmp, the layer files while pushing.
    let need = 3 * total + (1 << 30);
    let avail = avail_bytes(Path::new("/tmp"))?;
    ensure!(avail >= need, "/tmp has {avail} bytes free; this image needs about {need} (3 copies and 1 GiB spare)");
    ensure!(avail_bytes(&workdir)? >= total, "{} has no room for the layer files ({total} bytes)", workdir.display());

    let registry = Registry::start().await?;
    let t = Instant::now();
    let image = {
        let (sizes, workdir) = (sizes.clone(), workdir.clone());
        tokio::task::spawn_blocking(move || TestImage::builder(&sizes).in_dir(&workdir).build()).await??
    };
    let built = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let img = registry.push("bench/big", "v1", &image).await?;
    let warm = registry.push("bench/warm", "v1", &TestImage::random(&[1 << 20, 1 << 20])?).await?;
    println!(
        "image: {} layers, {} bytes ({:.2} GB); built in {built:.1} s, pushed in {:.1} s",
        sizes.len(),
        img.total_bytes,
        img.total_bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    // The layer files are in the registry now: give their space back.
    drop(image);

    let mut opts = Options::default().namespace("k8s.io").with_cri(CriOptions::new(&format!("{}/pause:3.9", registry.host())));
    match args.containerd.as_str() {
        "1.7" => opts = opts.binaries(&containerd_17_dir()?),
        "1.6" => {}
        v => bail!("--containerd: expected \"1.7\" or \"1.6\", got {v:?}"),
    }
    let ctrd = Containerd::start(opts).await?;
    let version = ctrd.server_version()?;
    let runtime = Runtime::new(ctrd.socket(), "k8s.io", Duration::from_secs(60))?;
    let settings = PullSettings { connections: args.connections, chunk, ..PullSettings::default() };
    let containerd_pid = pid_with_arg(&ctrd.dir().join("config.toml")).context("containerd's process not found")?;
    let registry_pid = pid_with_arg(&registry.storage_dir().with_file_name("config.yml")).context("the registry's process not found")?;
    let bench = Bench { ctrd, runtime, registry, settings, no_gets: args.no_gets, containerd_pid, registry_pid };
    let proxy = RegProxy::start(
        bench.registry.addr(),
        RegProxyOptions { per_connection_bytes_per_sec: Some(rate), latency: args.latency.into(), ..Default::default() },
    )
    .await?;
    println!(
        "containerd {version}; hearth: {} connections, {} B chunks; {} round(s), methods in rotating order; CRI max_concurrent_downloads at its default (3)",
        args.connections, chunk, args.rounds
    );

    if args.write_path {
        bench.write_path(&img, args.rounds).await?;
        return Ok(());
    }
    let mut summary = Vec::new();
    for &scenario in &args.scenarios {
        let (host, via) = match scenario {
            Scenario::Capped => (proxy.host(), Some(&proxy)),
            Scenario::Uncapped => (bench.registry.host(), None),
        };
        let reference = img.reference_via(&host);
        println!();
        match scenario {
            Scenario::Capped => println!("== capped: proxy at {rate} B/s per connection, {} latency; {reference}", args.latency),
            Scenario::Uncapped => println!("== uncapped: the registry directly; {reference}"),
        }
        // One untimed pull of a small image per method: clients, resolver, binaries warm.
        let warm_ref = warm.reference_via(&host);
        for &m in &args.methods {
            bench.cold_start().await?;
            bench.run(m, &warm_ref, via).await.with_context(|| format!("warm-up pull with {}", m.name()))?;
        }
        // And one untimed CRI pull of the big image: the first pull of it in a scenario ran
        // 20-50% slower than the rest whichever method it was (measured), which the rotation
        // would charge to whichever method comes first.
        bench.cold_start().await?;
        bench.run(Method::Cri, &reference, via).await.context("warm-up pull of the image")?;
        let mut runs: HashMap<Method, Vec<Run>> = HashMap::new();
        let mut gets = Vec::new();
        for round in 0..args.rounds {
            let mut order = args.methods.clone();
            let n = order.len();
            order.rotate_left(round % n);
            for m in order {
                let mut attempt = 0;
                let run = loop {
                    attempt += 1;
                    bench.cold_start().await?;
                    let run = bench.run(m, &reference, via).await.with_context(|| format!("{} pull, round {round}", m.name()))?;
                    bench.check_landed(&reference, &img).await.with_context(|| format!("after the {} pull, round {round}", m.name()))?;
                    if run.cpu.other() <= args.max_rest * run.secs || attempt > args.noisy_retries {
                        break run;
                    }
                    println!(
                        "round {round}  {:<6} {:>7.2} s  noisy: {:.1} CPU-s by the rest of the machine; running it again",
                        m.name(),
                        run.secs,
                        run.cpu.other()
                    );
                };
                let noisy = if run.cpu.other() > args.max_rest * run.secs { "  NOISY (kept: retries used up)" } else { "" };
                let mut line = format!("round {round}  {:<6} {:>7.2} s{noisy}", m.name(), run.secs);
                if run.direct {
                    line += "  (probe: registry fast, containerd pulled directly)";
                }
                if let (Some(d), Some(u)) = (run.download, run.unpack) {
                    line += &format!("  (download {d:.2} s = {:.0} MB/s, unpack {u:.2} s)", img.total_bytes as f64 / d / 1e6);
                }
                if let Some(s) = run.proxy {
                    line += &format!("  [{} connections, {} requests, {} ranged]", s.connections, s.requests, s.range_requests);
                }
                line += &format!("\n         {}", run.cpu.line(run.secs));
                println!("{line}");
                runs.entry(m).or_default().push(run);
            }
            if !bench.no_gets {
                bench.cold_start().await?;
                let cpu = bench.cpu();
                let secs = bench.gets_only(&reference, &img).await?;
                println!(
                    "round {round}  gets   {secs:>7.2} s  ({} connections x {} B ranged GETs, discarded: {:.0} MB/s)\n         {}",
                    args.connections,
                    chunk,
                    img.total_bytes as f64 / secs / 1e6,
                    bench.cpu().minus(cpu).line(secs)
                );
                gets.push(secs);
            }
        }
        let med = |m: Method| runs.get(&m).map(|r| median(&r.iter().map(|r| r.secs).collect::<Vec<_>>()));
        let med_of = |m: Method, f: fn(&Run) -> Option<f64>| {
            runs.get(&m).and_then(|r| r.iter().map(f).collect::<Option<Vec<f64>>>()).map(|v| median(&v))
        };
        let (h, c, k) = (med(Method::Hearth), med(Method::Ctr), med(Method::Cri));
        println!(
            "median: hearth {} s (download {} s, unpack {} s), ctr {} s (unpack {} s), cri {} s, ranged GETs alone {} s",
            fmt_opt(h),
            fmt_opt(med_of(Method::Hearth, |r| r.download)),
            fmt_opt(med_of(Method::Hearth, |r| r.unpack)),
            fmt_opt(c),
            fmt_opt(med_of(Method::Ctr, |r| r.unpack)),
            fmt_opt(k),
            fmt_opt((!gets.is_empty()).then(|| median(&gets))),
        );
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let (hc, hk) = (ratio(h, c), ratio(h, k));
        println!("hearth / ctr = {}, hearth / cri = {}", fmt_opt(hc), fmt_opt(hk));
        if let Some(hcont) = med(Method::HearthContent) {
            println!(
                "hearth-content {hcont:.2} s (download {} s): / ctr = {}, / cri = {}",
                fmt_opt(med_of(Method::HearthContent, |r| r.download)),
                fmt_opt(ratio(Some(hcont), c)),
                fmt_opt(ratio(Some(hcont), k))
            );
        }
        let (target, what) = match scenario {
            Scenario::Capped => (0.5, "at most 0.5 x with at least 4 layers"),
            Scenario::Uncapped => (1.05, "never above 1.05 x"),
        };
        let worst = [hc, hk].into_iter().flatten().fold(None, |w: Option<f64>, r| Some(w.map_or(r, |w| w.max(r))));
        let verdict = match worst {
            None => "not measured (run hearth with ctr or cri)".to_owned(),
            Some(_) if scenario == Scenario::Capped && sizes.len() < 4 => format!("not applicable: {} layers (< 4)", sizes.len()),
            Some(w) if w <= target => format!("MET (worst ratio {w:.2})"),
            Some(w) => format!("MISSED (worst ratio {w:.2}, {:.0}% over)", (w / target - 1.0) * 100.0),
        };
        println!("verdict ({scenario:?}: {what}): {verdict}");
        summary.push((scenario, h, c, k, hc, hk));
    }
    println!();
    println!("| scenario | hearth (s) | ctr (s) | cri (s) | hearth/ctr | hearth/cri |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (s, h, c, k, hc, hk) in summary {
        println!("| {s:?} | {} | {} | {} | {} | {} |", fmt_opt(h), fmt_opt(c), fmt_opt(k), fmt_opt(hc), fmt_opt(hk));
    }
    bench.clean().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(go_duration("1.5s"), Some(1.5));
        assert_eq!(go_duration("1m2.5s"), Some(62.5));
        assert!((go_duration("850ms").unwrap_or_default() - 0.85).abs() < 1e-9);
        assert_eq!(go_duration("soon"), None);
    }
}
