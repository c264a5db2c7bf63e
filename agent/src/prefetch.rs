//! `hearth prefetch`, `hearth cache ls`, `hearth cache manifest`: the cache from the command
//! line, standalone (no controller), with a progress bar on a terminal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cache::fetch::{FetchConfig, Layout, Progress, WriteMode, fetch};
use crate::cache::index::Index;
use crate::cache::source::s3::S3Options;
use crate::cache::spec::ModelSpec;
use crate::cache::verify::{MANIFEST_NAME, Manifest};

#[derive(Debug, Clone)]
pub struct PrefetchArgs {
    pub uri: String,
    pub dest: PathBuf,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub revision: String,
    pub part_size: usize,
    pub concurrency: usize,
    pub write_mode: WriteMode,
    pub s3: S3Options,
    pub progress: bool,
    /// Bytes per second, all parts together.
    pub limit_rate: Option<u64>,
    pub stall_timeout: std::time::Duration,
}

/// The CLI's download bar: bytes, rate, ETA and a message; hidden when `show` is false.
pub fn bytes_bar(show: bool) -> ProgressBar {
    let bar = if show { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} [{elapsed_precise}] [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub async fn prefetch(a: PrefetchArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let spec = ModelSpec::new(&a.uri, &a.include, &a.exclude, &a.revision)?;
    let layout = Layout { root: a.dest.clone() };
    let index = Index::new(&a.dest);
    let cfg = FetchConfig {
        part_size: a.part_size,
        concurrency: a.concurrency,
        write_mode: a.write_mode,
        limit: a.limit_rate.map(|r| Arc::new(crate::cache::ratelimit::RateLimiter::new(r))),
        stall_timeout: a.stall_timeout,
        ..Default::default()
    };
    // From before the source is opened: its credential chain and client build are part of
    // what a small model waits for.
    let started = Instant::now();
    let source = crate::cache::open_source(&spec.uri, &a.s3).await;
    let progress = Arc::new(Progress::default());
    let bar = bytes_bar(a.progress);
    let ticker = {
        let (bar, p) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_length(Progress::get(&p.bytes_total));
                bar.set_position(Progress::get(&p.bytes_done));
                bar.set_message(format!("files {}/{}", Progress::get(&p.files_done), Progress::get(&p.files_total)));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = fetch(source, &spec, &layout, &index, &cfg, progress.clone(), cancel).await;
    ticker.abort();
    bar.finish_and_clear();
    let entry = result?;
    let secs = started.elapsed().as_secs_f64();
    let fetched = Progress::get(&progress.bytes_fetched);
    let peak_rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(|| "?".to_owned(), |kib| human((kib * 1024) as f64));
    let since = |t: Option<&Instant>, none: &str| {
        t.map_or_else(|| none.to_owned(), |t| format!("{:.0} ms", t.duration_since(started).as_secs_f64() * 1e3))
    };
    let listed = since(progress.listed.get(), "?");
    let first_part = since(progress.first_part.get(), "none fetched");
    println!(
        "{}: {} files, {} in {:.2}s ({}/s fetched), listed in {listed}, first part in {first_part}, verification: {}, resumed {}, read back {}, peak RSS {peak_rss}, retries {}",
        entry.id,
        entry.files.len(),
        human(entry.bytes_total as f64),
        secs,
        human(fetched as f64 / secs.max(1e-9)),
        entry.verification_label(),
        human(Progress::get(&progress.bytes_resumed) as f64),
        human(Progress::get(&progress.bytes_reread) as f64),
        Progress::get(&progress.retries),
    );
    println!("ready at {}", layout.model_dir(&entry.id).display());
    Ok(())
}

#[derive(Serialize)]
struct LsRow {
    id: String,
    uri: String,
    state: &'static str,
    bytes_present: u64,
    bytes_total: u64,
    files: usize,
    verification: String,
    pinned: bool,
    last_used: u64,
    error: Option<String>,
}

pub fn ls(dest: &std::path::Path, json: bool) -> anyhow::Result<()> {
    // A mistyped --dest is not an empty cache.
    if !dest.is_dir() {
        anyhow::bail!(
            "cache directory {} does not exist (--dest, $HEARTH_CACHE_DIR or the default picks the cache; `hearth prefetch` creates it)",
            dest.display()
        );
    }
    let (entries, bad) = Index::new(dest).list()?;
    for b in &bad {
        eprintln!("warning: {b}");
    }
    let rows: Vec<LsRow> = entries
        .into_iter()
        .map(|e| LsRow {
            verification: e.verification_label().to_owned(),
            state: e.state.as_str(),
            files: e.files.len(),
            id: e.id,
            uri: e.uri,
            bytes_present: e.bytes_present,
            bytes_total: e.bytes_total,
            pinned: e.pinned,
            last_used: e.last_used,
            error: e.error,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<40} {:<12} {:>22} {:>6} {:<12} {:<6} URI", "ID", "STATE", "BYTES", "FILES", "VERIFIED", "PINNED");
    for r in &rows {
        let bytes = format!("{}/{}", human(r.bytes_present as f64), human(r.bytes_total as f64));
        println!(
            "{:<40} {:<12} {:>22} {:>6} {:<12} {:<6} {}",
            r.id,
            r.state,
            bytes,
            r.files,
            if r.verification.is_empty() { "-" } else { &r.verification },
            if r.pinned { "yes" } else { "no" },
            r.uri
        );
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
    }
    if rows.is_empty() {
        println!("(the cache at {} is empty)", dest.display());
    }
    Ok(())
}

/// Writes `hearth-manifest.json` (per-file SHA-256 and size) into a model directory.
pub fn write_manifest(dir: &std::path::Path) -> anyhow::Result<()> {
    let m = Manifest::build(dir).with_context(|| format!("building a manifest of {}", dir.display()))?;
    let path = dir.join(MANIFEST_NAME);
    hearth_service::fsutil::write_atomic(&path, m.to_json().as_bytes(), false).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {} ({} files)", path.display(), m.files.len());
    Ok(())
}
