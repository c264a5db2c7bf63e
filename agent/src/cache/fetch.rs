//! The download engine: turns a model spec and a source into verified files under the cache
//! root. Parallel ranged reads across and within files, each worker owning one aligned part
//! buffer (memory = concurrency x part size, whatever the model size); O_DIRECT writes where
//! the filesystem takes them; group-commit durability (fdatasync the touched files, then
//! journal the parts); per-file verification, a manifest's SHA-256 taken as the parts arrive
//! (`ordered`), never by reading the file back; publish by rename, in batches, so a
//! loader can start on the first shards while the rest arrive.
//!
//! On disk, under the cache root:
//! ```text
//! models/<id>/<key>          published, verified files
//! staging/<id>/plan.json     what this download is (files, sizes, versions, part size)
//! staging/<id>/journal       parts that are durable (see `journal`)
//! staging/<id>/data/<n>      file n being assembled
//! ```

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::buf::AlignedBuf;
use super::crc::PartCrc;
use super::index::{EntryState, FileEntry, Index, IndexEntry, IndexError, now_secs};
use super::journal::{Journal, JournalError, PartRecord};
use super::ordered::{Claim, OrderedDigest, Window};
use super::source::{Checked, ErrorKind, RemoteObject, Source, SourceError};
use super::spec::ModelSpec;
use super::verify::{self, Expected, MANIFEST_NAME, Manifest, VerificationKind, VerifyError, Vouched};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{uri}: no objects match (include {include:?}, exclude {exclude:?})")]
    NoObjects { uri: String, include: Vec<String>, exclude: Vec<String> },
    #[error("not enough space in {path}: this download needs {needed} more bytes, {available} are available")]
    NoSpace { path: PathBuf, needed: u64, available: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{key}: verification failed: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{MANIFEST_NAME}: {0}")]
    Manifest(VerifyError),
    #[error("{MANIFEST_NAME} is {0} bytes; expected at most 64 MiB")]
    ManifestTooLarge(u64),
    #[error("{key}: the manifest says {manifest} bytes, the source has {source_size}")]
    ManifestMismatch { key: String, manifest: u64, source_size: u64 },
    #[error("download cancelled; {done} of {total} bytes are kept and will resume")]
    Cancelled { done: u64, total: u64 },
}

impl FetchError {
    /// Bounded label for `hearth_cache_errors_total{kind}`.
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Source(e) => e.label(),
            FetchError::NoObjects { .. } => "no_objects",
            FetchError::NoSpace { .. } => "no_space",
            FetchError::Io { source, .. } if source.raw_os_error() == Some(28) => "no_space",
            FetchError::Io { .. } | FetchError::Journal(_) | FetchError::Index(_) => "io",
            FetchError::Corrupt { .. } => "corrupt",
            FetchError::Manifest(_) | FetchError::ManifestMismatch { .. } | FetchError::ManifestTooLarge(_) => "manifest",
            FetchError::Cancelled { .. } => "cancelled",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_owned(), source }
}

/// How part data reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// O_DIRECT where the filesystem supports it (fio on the test machine, per TESTING.md:
    /// 2.0 GB/s direct vs 0.67 GB/s buffered with a final fsync), buffered elsewhere (tmpfs).
    Auto,
    Direct,
    Buffered,
}

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Bytes per ranged read. 8-16 MiB is what S3 guidance and our measurements favour.
    pub part_size: usize,
    /// Reads in flight. Roughly one per 85-90 MB/s of target bandwidth.
    pub concurrency: usize,
    /// Further reads in flight for files of at most `SMALL_PART` bytes, each with a buffer
    /// that size: a repository of a thousand small files waits on round trips, not bandwidth.
    pub small_concurrency: usize,
    /// Attempts per part before the download fails.
    pub max_attempts: u32,
    /// A part read that takes longer is abandoned and issued again, so one stalled
    /// connection does not set the finish time.
    pub stall_timeout: Duration,
    pub write_mode: WriteMode,
    /// How often a file that fails verification is fetched again before giving up.
    pub refetch_corrupt: u32,
    /// Shared by every download that should split one bandwidth budget.
    pub limit: Option<Arc<super::ratelimit::RateLimiter>>,
    /// Bytes of part buffers that may wait, with parts that arrived ahead of their file's
    /// SHA-256, until the digest reaches them; beyond it parts are read back (see `ordered`).
    /// Allocated once, as needed, beside the readers' own buffers.
    pub hash_window: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            part_size: 8 << 20,
            concurrency: 16,
            small_concurrency: 48,
            max_attempts: 8,
            stall_timeout: Duration::from_secs(30),
            write_mode: WriteMode::Auto,
            refetch_corrupt: 1,
            limit: None,
            hash_window: 16 << 20,
        }
    }
}

/// Live counters of one download, read by the CLI's progress bar and the daemon's metrics.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    /// Durable bytes (journaled or published), including those found from an earlier run.
    pub bytes_done: AtomicU64,
    /// Bytes read from the source in this run (retries and refetches included).
    pub bytes_fetched: AtomicU64,
    pub bytes_resumed: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
    /// When the first part of this run arrived from the source: what a small model's fixed
    /// start-up costs (credentials, client, listing, the first connection) end at.
    pub first_part: std::sync::OnceLock<std::time::Instant>,
    /// When the source's listing (and whatever per-object lookups it makes) was done.
    pub listed: std::sync::OnceLock<std::time::Instant>,
    /// Bytes hashed by reading them back from the data file rather than as they arrived
    /// (set when the download ends): parts beyond the reorder window and resumed ones.
    pub bytes_reread: AtomicU64,
}

impl Progress {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PlanFile {
    key: String,
    size: u64,
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Plan {
    id: String,
    part_size: u64,
    files: Vec<PlanFile>,
}

#[derive(Debug)]
struct FileWork {
    obj: RemoteObject,
    vouched: Vouched,
    crc: PartCrc,
    parts: u32,
    part_crcs: Vec<Option<u64>>,
    done_parts: u32,
    corrupt_refetches: u32,
    data_path: PathBuf,
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    /// Published: verified and renamed into place (in this run or an earlier one).
    published: bool,
    /// The data file was there before this run (so its journaled parts can be trusted).
    data_existed: bool,
    /// SHA-256 taken as parts arrive, for files a manifest vouches for.
    digest: Option<Arc<OrderedDigest>>,
}

impl FileWork {
    fn part_len(&self, part_size: u64, part: u32) -> u64 {
        part_len(self.obj.size, part_size, part)
    }
}

/// Bytes in part `part` of a file of `size` bytes cut in `part_size` pieces (the last is short).
pub(super) fn part_len(size: u64, part_size: u64, part: u32) -> u64 {
    (size - (u64::from(part) * part_size).min(size)).min(part_size)
}

#[derive(Debug, Clone, Copy)]
struct Job {
    file: u32,
    part: u32,
}

enum Done {
    /// A part is written; with what the source checked, if it read the whole file and checked it.
    Part(PartRecord, Checked),
    Failed(FetchError),
}

/// Shared between the workers and the committer.
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    /// Parts not yet committed, queued or in flight.
    outstanding: AtomicU64,
    notify: Notify,
    stop: AtomicBool,
}

impl Queue {
    /// The next job that `fits`; jobs are taken in order, so a worker that cannot take the
    /// one at the front is done (the others take everything).
    async fn next(&self, fits: impl Fn(Job) -> bool) -> Option<Job> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            {
                let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                match q.front() {
                    Some(&j) if fits(j) => return q.pop_front(),
                    // A small-file reader past the small files: its buffer goes back now, so
                    // it does not add to the big parts' memory.
                    Some(_) => return None,
                    None => {}
                }
            }
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return None;
            }
            // Parts may come back (a file failed verification): wait for them or the end.
            notified.await;
        }
    }

    fn push(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        for j in jobs {
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            q.push_back(j);
        }
        drop(q);
        self.notify.notify_waiters();
    }

    fn finish_one(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

struct Ctx {
    /// Smoothed time of a successful part read, in microseconds (0 until the first).
    part_micros: AtomicU64,
    source: Arc<dyn Source>,
    files: Vec<Arc<FileShared>>,
    cfg: FetchConfig,
    queue: Queue,
    progress: Arc<Progress>,
    cancel: CancellationToken,
}

/// What workers need of a file.
struct FileShared {
    obj: RemoteObject,
    crc: PartCrc,
    buffered: Arc<File>,
    direct: Option<Arc<File>>,
    digest: Option<Arc<OrderedDigest>>,
}

impl Ctx {
    /// How long one part read may take before it is abandoned and issued again: eight times
    /// the usual part time, at least 2 s and at most the configured stall timeout. A stalled
    /// or crawling connection then costs seconds, not the whole download.
    fn stall_limit(&self) -> Duration {
        let typical = self.part_micros.load(Ordering::Relaxed);
        if typical == 0 {
            return self.cfg.stall_timeout;
        }
        Duration::from_micros(typical.saturating_mul(8)).clamp(Duration::from_secs(2).min(self.cfg.stall_timeout), self.cfg.stall_timeout)
    }

    fn record_part_time(&self, took: Duration, len: usize, part_size: usize) {
        // Short tail parts say little about a full part's time.
        if len < part_size / 2 {
            return;
        }
        let sample = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.part_micros.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { (old * 7 + sample) / 8 };
        self.part_micros.store(new, Ordering::Relaxed);
    }
}

/// Lays out the cache root for one model id.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn model_dir(&self, id: &str) -> PathBuf {
        self.root.join("models").join(id)
    }
    pub fn staging_dir(&self, id: &str) -> PathBuf {
        self.root.join("staging").join(id)
    }
}

/// Fetches `spec` into the cache at `layout`, resuming whatever an earlier run left.
pub async fn fetch(
    source: Arc<dyn Source>,
    spec: &ModelSpec,
    layout: &Layout,
    index: &Index,
    cfg: &FetchConfig,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<IndexEntry, FetchError> {
    let id = spec.id();
    let started = Instant::now();
    let listing: Vec<RemoteObject> = source.list().await?.into_iter().filter(|o| !o.key.ends_with('/')).collect();
    let mut objects: Vec<RemoteObject> = listing.iter().filter(|o| spec.wants(&o.key)).cloned().collect();
    if objects.is_empty() {
        return Err(FetchError::NoObjects {
            uri: spec.uri.to_string(),
            include: spec.include.iter().map(|g| g.as_str().to_owned()).collect(),
            exclude: spec.exclude.iter().map(|g| g.as_str().to_owned()).collect(),
        });
    }
    // Checksums of the files read in several parts (a request each on S3: the few big ones);
    // a file read in one request is checked by that read.
    // The listing's order stays: file numbers in the journal derive from it.
    let multi: Vec<usize> =
        (0..objects.len()).filter(|&i| objects[i].vouched.is_none() && objects[i].size > cfg.part_size as u64).collect();
    let described = source.checksums(multi.iter().map(|&i| objects[i].clone()).collect()).await?;
    for (i, o) in multi.into_iter().zip(described) {
        objects[i] = o;
    }
    progress.listed.get_or_init(Instant::now);
    // The manifest vouches for the files whatever the user's filters select: `--include
    // '*.safetensors'` must not cost the model its verification.
    let manifest = read_manifest(source.as_ref(), &listing).await?;
    let part_size = cfg.part_size as u64;
    let plan = Plan {
        id: id.clone(),
        part_size,
        files: objects.iter().map(|o| PlanFile { key: o.key.clone(), size: o.size, version: o.version.clone() }).collect(),
    };

    // Directory scans, the journal replay, fallocate and fsyncs run on the blocking pool,
    // never on an async worker.
    let prepared = {
        let (layout, index, cfg, progress, spec, id) =
            (layout.clone(), index.clone(), cfg.clone(), progress.clone(), spec.clone(), id.clone());
        blocking(&layout.root.clone(), move || {
            let (layout, index, cfg, spec) = (&layout, &index, &cfg, &spec);
            // What an earlier run left: published files (index) and durable parts (journal).
            let previous = index.get(&id)?;
            let staging = layout.staging_dir(&id);
            let model_dir = layout.model_dir(&id);
            let plan_path = staging.join("plan.json");
            let old_plan: Option<Plan> = std::fs::read(&plan_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if old_plan.as_ref() != Some(&plan) {
                if staging.exists() {
                    info!(%id, "source changed or new download: discarding staged parts");
                }
                remove_dir_if_exists(&staging)?;
                std::fs::create_dir_all(staging.join("data")).map_err(io_err(&staging))?;
                let json = serde_json::to_vec_pretty(&plan).map_err(|e| FetchError::Io { path: plan_path.clone(), source: e.into() })?;
                hearth_service::fsutil::write_atomic(&plan_path, &json, false).map_err(io_err(&plan_path))?;
            }
            let (journal, records) = Journal::open(&staging.join("journal"))?;

            let mut entry = IndexEntry {
                id: id.clone(),
                uri: spec.uri.to_string(),
                revision: spec.revision.clone(),
                include: spec.include.iter().map(|g| g.as_str().to_owned()).collect(),
                exclude: spec.exclude.iter().map(|g| g.as_str().to_owned()).collect(),
                state: EntryState::Downloading,
                files: Vec::with_capacity(objects.len()),
                bytes_present: 0,
                bytes_total: 0,
                verification: None,
                pinned: previous.as_ref().is_some_and(|p| p.pinned),
                created: previous.as_ref().map_or_else(now_secs, |p| p.created),
                last_used: now_secs(),
                error: None,
            };

            // Order: small files first, then big ones as listed; safetensors headers lead their file.
            objects.sort_by_key(|o| (o.size > part_size, if o.size > part_size { 0 } else { o.size }));
            let mut works = Vec::with_capacity(objects.len());
            let mut needed_space = 0u64;
            let window = Window::new(cfg.hash_window);
            for (i, obj) in objects.into_iter().enumerate() {
                let vouched = vouch(&obj, manifest.as_ref())?;
                let crc = match vouched.expected {
                    Expected::Crc64Nvme(_) => PartCrc::Crc64Nvme,
                    Expected::Crc32c(_) => PartCrc::Crc32c,
                    _ => PartCrc::None,
                };
                let final_path = model_dir.join(&obj.key);
                let mut was_ready = previous
                    .as_ref()
                    .and_then(|p| p.files.iter().find(|f| f.key == obj.key))
                    .is_some_and(|f| f.ready && f.version == obj.version && f.size == obj.size)
                    && std::fs::metadata(&final_path).is_ok_and(|m| m.len() == obj.size);
                let mut prev_verification =
                    previous.as_ref().and_then(|p| p.files.iter().find(|f| f.key == obj.key)).and_then(|f| f.verification);
                if was_ready && prev_verification.is_none_or(|v| v < vouched.kind) {
                    // Something vouches for this file now that did not when it was cached (a
                    // manifest published since): check the copy on disk rather than fetch it.
                    match verify::check_file(&final_path, &vouched.expected, obj.size) {
                        Ok(()) => {
                            info!(key = %obj.key, verification = vouched.kind.as_str(), "cached file verified against what now vouches for it");
                            prev_verification = Some(vouched.kind);
                        }
                        Err(e) => {
                            warn!(key = %obj.key, error = %e, "cached file does not match what now vouches for it; fetching it again");
                            was_ready = false;
                        }
                    }
                }
                entry.files.push(FileEntry {
                    key: obj.key.clone(),
                    size: obj.size,
                    version: obj.version.clone(),
                    verification: if was_ready { prev_verification } else { None },
                    ready: was_ready,
                });
                let data_path = staging.join("data").join(i.to_string());
                let data_existed = data_path.exists();
                let parts = obj.size.div_ceil(part_size).max(1) as u32;
                let (buffered, direct) = if was_ready {
                    // Never written: a placeholder handle keeps the types simple.
                    (Arc::new(File::open("/dev/null").map_err(io_err(Path::new("/dev/null")))?), None)
                } else {
                    // A small file gains nothing from O_DIRECT or reserved blocks, and on a
                    // repository of a thousand of them the extra open and fallocate are most of
                    // the set-up before the first byte.
                    let mode = if obj.size <= SMALL_PART { WriteMode::Buffered } else { cfg.write_mode };
                    let (b, d, allocated) = open_data_file(&data_path, obj.size, mode)?;
                    needed_space += obj.size.saturating_sub(allocated);
                    (Arc::new(b), d.map(Arc::new))
                };
                works.push(FileWork {
                    vouched,
                    crc,
                    parts,
                    part_crcs: vec![None; parts as usize],
                    done_parts: 0,
                    corrupt_refetches: 0,
                    data_path,
                    buffered,
                    direct,
                    published: was_ready,
                    data_existed,
                    digest: match vouched.expected {
                        Expected::Sha256(_) if !was_ready => {
                            Some(Arc::new(OrderedDigest::new(vouched.expected, obj.size, part_size, window.clone())))
                        }
                        _ => None,
                    },
                    obj,
                });
            }
            // A download that cannot fit fails now, before it fills the disk.
            let available = available_space(&layout.root)?;
            if needed_space > available {
                return Err(FetchError::NoSpace { path: layout.root.clone(), needed: needed_space, available });
            }
            for w in works.iter().filter(|w| !w.published && w.obj.size > SMALL_PART) {
                allocate(&w.buffered, &w.data_path, w.obj.size)?;
            }

            // Replay the journal. File numbers are positions in the sorted order above, which is a
            // pure function of the listing, so they mean the same thing as long as the plan does.
            let mut resumed = 0u64;
            let mut journaled = vec![0u32; works.len()];
            for r in &records {
                if let Some(n) = journaled.get_mut(r.file as usize) {
                    *n += 1;
                }
            }
            for (i, w) in works.iter_mut().enumerate() {
                // A crash between publishing a file (rename, only ever after verification) and
                // recording it in the index: the data file is gone, the published copy is whole.
                if !w.published && !w.data_existed && journaled[i] >= w.parts {
                    let final_path = model_dir.join(&w.obj.key);
                    if std::fs::metadata(&final_path).is_ok_and(|m| m.len() == w.obj.size) {
                        w.published = true;
                        if let Some(f) = entry.files.iter_mut().find(|f| f.key == w.obj.key) {
                            f.ready = true;
                            f.verification = Some(w.vouched.kind);
                        }
                    }
                }
            }
            for r in &records {
                let Some(w) = works.get_mut(r.file as usize) else {
                    continue;
                };
                // Parts of a data file that did not survive describe bytes that are not there.
                if w.published || !w.data_existed || r.part >= w.parts || w.part_crcs[r.part as usize].is_some() {
                    continue;
                }
                w.part_crcs[r.part as usize] = Some(r.crc);
                w.done_parts += 1;
                resumed += w.part_len(part_size, r.part);
                if let Some(d) = &w.digest {
                    d.mark_on_disk(r.part);
                }
            }

            let total: u64 = works.iter().map(|w| w.obj.size).sum();
            let published_bytes: u64 = works.iter().filter(|w| w.published).map(|w| w.obj.size).sum();
            progress.bytes_total.store(total, Ordering::Relaxed);
            progress.files_total.store(works.len() as u64, Ordering::Relaxed);
            progress.files_done.store(works.iter().filter(|w| w.published).count() as u64, Ordering::Relaxed);
            progress.bytes_done.store(published_bytes + resumed, Ordering::Relaxed);
            progress.bytes_resumed.store(resumed, Ordering::Relaxed);
            entry.refresh();
            index.put(&entry)?;
            Ok((staging, model_dir, journal, entry, works, resumed, total))
        })
        .await?
    };
    let (staging, model_dir, journal, mut entry, mut works, resumed, total) = prepared;
    let journal = Arc::new(Mutex::new(journal));
    if resumed > 0 {
        info!(%id, resumed_bytes = resumed, "resuming an interrupted download");
    }

    // Jobs: the first part of every big file (safetensors headers), then the rest in order.
    let mut jobs = Vec::new();
    let mut rest = Vec::new();
    for (i, w) in works.iter().enumerate() {
        if w.published {
            continue;
        }
        for p in 0..w.parts {
            if w.part_crcs[p as usize].is_none() {
                let job = Job { file: i as u32, part: p };
                if p == 0 { jobs.push(job) } else { rest.push(job) }
            }
        }
    }
    jobs.extend(rest);

    let ctx = Arc::new(Ctx {
        part_micros: AtomicU64::new(0),
        source,
        files: works
            .iter()
            .map(|w| {
                Arc::new(FileShared {
                    obj: w.obj.clone(),
                    crc: w.crc,
                    buffered: w.buffered.clone(),
                    direct: w.direct.clone(),
                    digest: w.digest.clone(),
                })
            })
            .collect(),
        cfg: cfg.clone(),
        queue: Queue { jobs: Mutex::default(), outstanding: AtomicU64::new(0), notify: Notify::new(), stop: AtomicBool::new(false) },
        progress: progress.clone(),
        cancel: cancel.clone(),
    });
    ctx.queue.push(jobs);
    let (done_tx, mut done_rx) = mpsc::channel::<Done>((cfg.concurrency + cfg.small_concurrency) * 2);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.concurrency.max(1) {
        workers.spawn(worker(ctx.clone(), done_tx.clone(), cfg.part_size));
    }
    // Small files come first in the queue: the extra small-buffer workers take them beside
    // the others.
    let small = (SMALL_PART as usize).min(cfg.part_size);
    if works.iter().any(|w| !w.published && w.obj.size <= small as u64) {
        for _ in 0..cfg.small_concurrency {
            workers.spawn(worker(ctx.clone(), done_tx.clone(), small));
        }
    }
    drop(done_tx);

    // Files that finished entirely from the journal still need verifying and publishing.
    let mut result: Result<(), FetchError> = Ok(());
    let ready_now: Vec<usize> = (0..works.len()).filter(|&i| !works[i].published && works[i].done_parts == works[i].parts).collect();
    if let Err(e) = finish_files(&mut works, ready_now, &ctx, &journal, &model_dir, &mut entry, index).await {
        result = Err(e);
    }

    // Commit loop: group the parts that arrived, make them durable, journal them.
    while result.is_ok() && works.iter().any(|w| !w.published) {
        let first = tokio::select! {
            d = done_rx.recv() => d,
            _ = cancel.cancelled() => {
                result = Err(FetchError::Cancelled { done: 0, total });
                break;
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while let Ok(d) = done_rx.try_recv() {
            batch.push(d);
        }
        let mut records = Vec::with_capacity(batch.len());
        for d in batch {
            match d {
                Done::Part(r, checked) => {
                    // The source checked the whole file against its own checksum on the way in:
                    // that is what vouches for a file nothing else does.
                    let w = &mut works[r.file as usize];
                    if let Some(v) = checked
                        && w.parts == 1
                        && w.vouched.kind == VerificationKind::Unverified
                    {
                        w.vouched = Vouched { expected: Expected::SizeOnly, kind: v.kind };
                    }
                    records.push(r);
                }
                Done::Failed(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        if let Err(e) = commit(&works, &journal, &records).await {
            result = Err(e);
        }
        if result.is_err() {
            break;
        }
        let mut completed = Vec::new();
        for r in &records {
            let w = &mut works[r.file as usize];
            if w.part_crcs[r.part as usize].is_none() {
                w.part_crcs[r.part as usize] = Some(r.crc);
                w.done_parts += 1;
                progress.bytes_done.fetch_add(w.part_len(part_size, r.part), Ordering::Relaxed);
                if w.done_parts == w.parts {
                    completed.push(r.file as usize);
                }
            }
        }
        if let Err(e) = finish_files(&mut works, completed, &ctx, &journal, &model_dir, &mut entry, index).await {
            result = Err(e);
        }
        // Only now: a file that failed verification has re-queued its parts above, so the
        // workers never see zero outstanding work while a refetch is pending.
        for _ in &records {
            ctx.queue.finish_one();
        }
    }
    ctx.queue.halt();
    // Workers blocked on a full channel must see it close, or joining them would wait forever.
    drop(done_rx);
    while workers.join_next().await.is_some() {}
    let reread = works.iter().find_map(|w| w.digest.as_ref()).map_or(0, |d| d.reread());
    progress.bytes_reread.store(reread, Ordering::Relaxed);

    match result {
        Ok(()) if works.iter().all(|w| w.published) => {
            entry.state = EntryState::Ready;
            entry.error = None;
            entry.refresh();
            put_entry(index, &entry).await?;
            blocking(&staging.clone(), move || remove_dir_if_exists(&staging)).await?;
            info!(
                %id,
                bytes = total,
                fetched = Progress::get(&progress.bytes_fetched),
                resumed,
                reread,
                secs = started.elapsed().as_secs_f64(),
                verification = entry.verification_label(),
                "model cached"
            );
            Ok(entry)
        }
        Ok(()) => Err(FetchError::Cancelled { done: Progress::get(&progress.bytes_done), total }),
        Err(FetchError::Cancelled { .. }) => {
            let done = Progress::get(&progress.bytes_done);
            entry.refresh();
            put_entry(index, &entry).await?;
            Err(FetchError::Cancelled { done, total })
        }
        Err(e) => {
            entry.state = EntryState::Failed;
            entry.error = Some(e.to_string());
            entry.refresh();
            // The failure is what matters; an index write error beside it is logged.
            if let Err(ie) = put_entry(index, &entry).await {
                warn!(error = %ie, "could not record the failure in the index");
            }
            Err(e)
        }
    }
}

/// Runs blocking file work (fsync, rename, directory removal, scans) on the blocking pool;
/// `what` names the path in the error if the task itself fails.
async fn blocking<T: Send + 'static>(what: &Path, f: impl FnOnce() -> Result<T, FetchError> + Send + 'static) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| FetchError::Io { path: what.to_owned(), source: std::io::Error::other(e) })?
}

/// Writes an index entry (temp file, fsync, rename) off the async workers.
async fn put_entry(index: &Index, entry: &IndexEntry) -> Result<(), FetchError> {
    let (index, entry) = (index.clone(), entry.clone());
    blocking(Path::new("index"), move || Ok(index.put(&entry)?)).await
}

/// Reads and parses `hearth-manifest.json` if the model ships one.
async fn read_manifest(source: &dyn Source, objects: &[RemoteObject]) -> Result<Option<Manifest>, FetchError> {
    let Some(obj) = objects.iter().find(|o| o.key == MANIFEST_NAME) else {
        return Ok(None);
    };
    if obj.size > 64 << 20 {
        return Err(FetchError::ManifestTooLarge(obj.size));
    }
    let (buf, r) = source.read_into(obj, 0, AlignedBuf::new(obj.size as usize)).await;
    r?;
    Manifest::parse(buf.as_slice()).map(Some).map_err(FetchError::Manifest)
}

/// What one file can be verified against: the source's own checksum, else the manifest,
/// else its size.
fn vouch(obj: &RemoteObject, manifest: Option<&Manifest>) -> Result<Vouched, FetchError> {
    if let Some(v) = obj.vouched {
        return Ok(v);
    }
    if obj.key == MANIFEST_NAME && manifest.is_some() {
        // The manifest is the anchor of trust for the rest: it cannot vouch for itself.
        return Ok(Vouched { expected: Expected::SizeOnly, kind: VerificationKind::Manifest });
    }
    if let Some(m) = manifest.and_then(|m| m.files.get(&obj.key)) {
        if m.size != obj.size {
            return Err(FetchError::ManifestMismatch { key: obj.key.clone(), manifest: m.size, source_size: obj.size });
        }
        return Ok(Vouched { expected: Expected::Sha256(m.sha256), kind: VerificationKind::Manifest });
    }
    Ok(Vouched { expected: Expected::SizeOnly, kind: VerificationKind::Unverified })
}

fn remove_dir_if_exists(p: &Path) -> Result<(), FetchError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FetchError::Io { path: p.to_owned(), source: e }),
    }
}

/// Opens a data file for writing; returns the buffered handle, the O_DIRECT one when the
/// mode and filesystem allow, and how many bytes are already allocated to it.
fn open_data_file(path: &Path, size: u64, mode: WriteMode) -> Result<(File, Option<File>, u64), FetchError> {
    let buffered = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_err(path))?;
    let allocated = buffered.metadata().map(|m| m.blocks() * 512).unwrap_or(0).min(size);
    let direct = match mode {
        WriteMode::Buffered => None,
        WriteMode::Auto | WriteMode::Direct => {
            let flags = rustix::fs::OFlags::DIRECT.bits() as i32;
            match OpenOptions::new().write(true).custom_flags(flags).open(path) {
                Ok(f) => Some(f),
                Err(e) if mode == WriteMode::Auto && e.raw_os_error() == Some(22) => None,
                Err(e) => {
                    return Err(FetchError::Io { path: path.to_owned(), source: e });
                }
            }
        }
    };
    Ok((buffered, direct, allocated))
}

/// Reserves the file's blocks now so a full disk fails here, not mid-write.
fn allocate(f: &File, path: &Path, size: u64) -> Result<(), FetchError> {
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: size the file and find out at write time.
        Err(rustix::io::Errno::OPNOTSUPP) => f.set_len(size).map_err(io_err(path)),
        Err(e) => Err(FetchError::Io { path: path.to_owned(), source: e.into() }),
    }
}

fn available_space(root: &Path) -> Result<u64, FetchError> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let st = rustix::fs::statvfs(root).map_err(|e| FetchError::Io { path: root.to_owned(), source: e.into() })?;
    Ok(st.f_bavail * st.f_frsize)
}

/// The largest file a small-file worker takes.
const SMALL_PART: u64 = 256 << 10;

/// Data syncs in flight at once: enough to keep an NVMe queue busy with many small files.
const SYNC_THREADS: usize = 8;

/// fdatasync every file the batch touched (in parallel: each waits on the device, not the
/// CPU), then journal the batch.
async fn commit(works: &[FileWork], journal: &Arc<Mutex<Journal>>, records: &[PartRecord]) -> Result<(), FetchError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut touched: Vec<u32> = records.iter().map(|r| r.file).collect();
    touched.sort_unstable();
    touched.dedup();
    let handles: Vec<(Arc<File>, PathBuf)> =
        touched.iter().map(|&f| (works[f as usize].buffered.clone(), works[f as usize].data_path.clone())).collect();
    let (journal, records) = (journal.clone(), records.to_vec());
    blocking(Path::new("journal"), move || {
        sync_all_data(&handles)?;
        journal.lock().unwrap_or_else(|p| p.into_inner()).append(&records)?;
        Ok(())
    })
    .await
}

/// fdatasync of every file, up to `SYNC_THREADS` at a time; the first error wins.
fn sync_all_data(files: &[(Arc<File>, PathBuf)]) -> Result<(), FetchError> {
    if files.len() <= 1 {
        for (f, p) in files {
            f.sync_data().map_err(io_err(p))?;
        }
        return Ok(());
    }
    let per = files.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    for (f, p) in chunk {
                        f.sync_data().map_err(io_err(p))?;
                    }
                    Ok::<(), FetchError>(())
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(FetchError::Io { path: PathBuf::from("sync"), source: std::io::Error::other("sync thread panicked") })
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// Verifies the complete files `idxs` (in parallel, off the async workers) and publishes
/// those that pass as one batch: renamed into place, each directory synced once, one index
/// update. A file that fails is sent back to be fetched again. The cost per file does not
/// grow with the number of files in the model.
async fn finish_files(
    works: &mut [FileWork],
    idxs: Vec<usize>,
    ctx: &Ctx,
    journal: &Arc<Mutex<Journal>>,
    model_dir: &Path,
    entry: &mut IndexEntry,
    index: &Index,
) -> Result<(), FetchError> {
    if idxs.is_empty() {
        return Ok(());
    }
    let part_size = ctx.cfg.part_size as u64;
    if ctx.cancel.is_cancelled() {
        // The parts are journaled: the next run verifies and publishes without refetching.
        return Err(FetchError::Cancelled { done: 0, total: 0 });
    }
    let mut checks = tokio::task::JoinSet::new();
    for &i in &idxs {
        let w = &works[i];
        let (key, data_path, size, expected) = (w.obj.key.clone(), w.data_path.clone(), w.obj.size, w.vouched.expected);
        let (digest, file) = (w.digest.clone(), w.buffered.clone());
        let combined = w.crc.combine(w.part_crcs.iter().enumerate().map(|(p, c)| (c.unwrap_or(0), w.part_len(part_size, p as u32))));
        checks.spawn_blocking(move || {
            let streamed = digest.as_deref().map(|d| (d, file.as_ref()));
            (i, verify_file(&data_path, &key, size, &expected, combined, streamed))
        });
    }
    let mut passed = Vec::new();
    let mut first_err = None;
    while let Some(r) = checks.join_next().await {
        let (i, check) = r.map_err(|e| FetchError::Io { path: model_dir.to_owned(), source: std::io::Error::other(e) })?;
        match check {
            Ok(()) => passed.push(i),
            Err(FetchError::Corrupt { key, reason }) if works[i].corrupt_refetches < ctx.cfg.refetch_corrupt => {
                warn!(%key, %reason, "verification failed; fetching the file again");
                let w = &mut works[i];
                w.corrupt_refetches += 1;
                let j = journal.clone();
                blocking(&w.data_path.clone(), move || Ok(j.lock().unwrap_or_else(|p| p.into_inner()).reset_file(i as u32)?)).await?;
                let lost: u64 = (0..w.parts).filter(|&p| w.part_crcs[p as usize].is_some()).map(|p| w.part_len(part_size, p)).sum();
                ctx.progress.bytes_done.fetch_sub(lost, Ordering::Relaxed);
                w.part_crcs.iter_mut().for_each(|c| *c = None);
                w.done_parts = 0;
                ctx.queue.push((0..w.parts).map(|p| Job { file: i as u32, part: p }));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if !passed.is_empty() {
        passed.sort_unstable();
        let moves: Vec<(PathBuf, PathBuf)> =
            passed.iter().map(|&i| (works[i].data_path.clone(), model_dir.join(&works[i].obj.key))).collect();
        blocking(model_dir, move || publish(&moves)).await?;
        for &i in &passed {
            let w = &mut works[i];
            w.published = true;
            ctx.progress.files_done.fetch_add(1, Ordering::Relaxed);
            if let Some(f) = entry.files.iter_mut().find(|f| f.key == w.obj.key) {
                f.ready = true;
                f.verification = Some(w.vouched.kind);
            }
            debug!(key = %w.obj.key, verification = w.vouched.kind.as_str(), "file ready");
        }
        entry.refresh();
        put_entry(index, entry).await?;
    }
    first_err.map_or(Ok(()), Err)
}

/// Renames verified files into place, then syncs each directory they landed in once.
fn publish(moves: &[(PathBuf, PathBuf)]) -> Result<(), FetchError> {
    let mut dirs = std::collections::BTreeSet::new();
    for (data, final_path) in moves {
        let parent = final_path.parent().unwrap_or(final_path);
        if dirs.insert(parent.to_owned()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(data, final_path).map_err(io_err(final_path))?;
    }
    for d in &dirs {
        hearth_service::fsutil::sync_dir(d).map_err(io_err(d))?;
    }
    Ok(())
}

/// Checks a complete data file against what vouches for it (and a safetensors file's
/// header); publishes nothing.
fn verify_file(
    data: &Path,
    key: &str,
    size: u64,
    expected: &Expected,
    combined_crc: u64,
    streamed: Option<(&OrderedDigest, &File)>,
) -> Result<(), FetchError> {
    let corrupt = |reason: String| FetchError::Corrupt { key: key.to_owned(), reason };
    match expected {
        Expected::Crc64Nvme(want) if combined_crc != *want => {
            return Err(corrupt(format!("crc64nvme mismatch: expected {want:#018x}, computed {combined_crc:#018x}")));
        }
        Expected::Crc32c(want) if combined_crc != u64::from(*want) => {
            return Err(corrupt(format!("crc32c mismatch: expected {want:#010x}, computed {combined_crc:#010x}")));
        }
        // Every file a SHA-256 vouches for is given a digest when the download is planned.
        Expected::Sha256(_) => match streamed.map(|(digest, file)| digest.finish(file)) {
            Some(Ok(())) => {}
            Some(Err(VerifyError::Io { source, .. })) => return Err(FetchError::Io { path: data.to_owned(), source }),
            Some(Err(e)) => return Err(corrupt(e.to_string())),
            None => return Err(FetchError::Io { path: data.to_owned(), source: std::io::Error::other("no SHA-256 digest was kept") }),
        },
        _ => {}
    }
    if key.ends_with(".safetensors") {
        let header = check_safetensors(data, size).map_err(|e| corrupt(e.to_string()))?;
        if !header.unknown_dtypes.is_empty() {
            // A dtype newer than this agent is no sign of corruption: failing would refetch a
            // good file and then fail the model. Its tensors still had their offsets checked.
            warn!(%key, dtypes = ?header.unknown_dtypes, "safetensors dtypes unknown to this agent; their tensor sizes were not checked, only offsets");
        }
    }
    Ok(())
}

/// Parses the safetensors header and checks every tensor lies inside the file.
fn check_safetensors(path: &Path, size: u64) -> Result<verify::SafetensorsHeader, VerifyError> {
    let f = File::open(path).map_err(|e| VerifyError::Io { path: path.to_owned(), source: e })?;
    let mut want = 8u64.min(size) as usize;
    loop {
        let mut prefix = vec![0u8; want];
        f.read_exact_at(&mut prefix, 0).map_err(|e| VerifyError::Io { path: path.to_owned(), source: e })?;
        match verify::check_safetensors_header(&prefix, size) {
            Ok(header) => return Ok(header),
            Err(VerifyError::NeedMore { needed }) if (needed as usize) > want && needed <= size => want = needed as usize,
            Err(e) => return Err(e),
        }
    }
}

/// Reads parts of at most `cap` bytes (the part size, or `SMALL_PART` for a small-file worker).
async fn worker(ctx: Arc<Ctx>, done: mpsc::Sender<Done>, cap: usize) {
    let part_size = ctx.cfg.part_size;
    let mut buf = AlignedBuf::new(cap);
    let fits = |j: Job| part_len(ctx.files[j.file as usize].obj.size, part_size as u64, j.part) <= cap as u64;
    while let Some(job) = ctx.queue.next(fits).await {
        let f = ctx.files[job.file as usize].clone();
        let offset = u64::from(job.part) * part_size as u64;
        let len = part_len(f.obj.size, part_size as u64, job.part) as usize;
        buf.set_len(len);
        let mut attempt = 0u32;
        let outcome = loop {
            attempt += 1;
            if ctx.cancel.is_cancelled() || ctx.queue.stop.load(Ordering::Acquire) {
                return;
            }
            if let Some(limit) = &ctx.cfg.limit {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return,
                    _ = limit.acquire(len as u64) => {}
                }
            }
            let started = Instant::now();
            // The limit is looked at again while the read waits: a read that began before any
            // part time was known (the first wave of a download) is not held to the ceiling.
            let mut limit = ctx.stall_limit();
            let read = {
                let fut = ctx.source.read_into(&f.obj, offset, buf);
                tokio::pin!(fut);
                loop {
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        break Err(());
                    }
                    match tokio::time::timeout(left.min(Duration::from_millis(250)), &mut fut).await {
                        Ok(v) => break Ok(v),
                        Err(_) => limit = ctx.stall_limit(),
                    }
                }
            };
            let err = match read {
                Ok((b, Ok(checked))) => {
                    buf = b;
                    ctx.record_part_time(started.elapsed(), len, part_size);
                    break Ok(checked);
                }
                Ok((b, Err(e))) => {
                    buf = b;
                    e
                }
                Err(_) => {
                    // The abandoned read took the buffer with it.
                    buf = AlignedBuf::new(cap);
                    buf.set_len(len);
                    SourceError::Read {
                        source_name: ctx.source.name(),
                        key: f.obj.key.clone(),
                        offset,
                        len,
                        reason: format!("part not done within {limit:?} (8x the usual part time); reissuing"),
                        kind: ErrorKind::Transient,
                    }
                }
            };
            if err.kind() == ErrorKind::Permanent || attempt >= ctx.cfg.max_attempts {
                break Err(FetchError::Source(err));
            }
            ctx.progress.retries.fetch_add(1, Ordering::Relaxed);
            let base = if err.kind() == ErrorKind::Throttled {
                ctx.progress.throttled.fetch_add(1, Ordering::Relaxed);
                Duration::from_millis(500)
            } else {
                Duration::from_millis(100)
            };
            let delay = hearth_service::retry::jittered(base, Duration::from_secs(10), attempt);
            debug!(key = %f.obj.key, offset, attempt, ?delay, error = %err, "part read failed; retrying");
            tokio::select! {
                _ = ctx.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        };
        let checked = match outcome {
            Ok(c) => c,
            Err(e) => {
                let _ = done.send(Done::Failed(e)).await;
                return;
            }
        };
        ctx.progress.bytes_fetched.fetch_add(len as u64, Ordering::Relaxed);
        ctx.progress.first_part.get_or_init(std::time::Instant::now);
        let crc = f.crc.of(buf.as_slice());
        // How long a part ahead of its file's digest may wait for its turn or for room: as long
        // as a part may take before it is reissued, so only a part that stalled (and is being
        // read again) makes the parts behind it wait that long, and then they are read back.
        let patience = ctx.stall_limit();
        let (b, written) = tokio::task::spawn_blocking({
            let (f, ctx) = (f.clone(), ctx.clone());
            move || {
                let give_up = || ctx.cancel.is_cancelled() || ctx.queue.stop.load(Ordering::Acquire);
                let claim = f.digest.as_ref().map(|d| d.claim(job.part, buf.capacity(), patience, give_up));
                // A part that will be read back for its digest goes through the page cache,
                // where the read-back finds it.
                let r = write_part(&f, offset, &buf, claim != Some(Claim::Spill));
                match (&f.digest, claim, &r) {
                    // A held buffer comes back as a spare one.
                    (Some(d), Some(c), Ok(())) => (d.written(job.part, c, buf, &f.buffered), r),
                    (Some(d), Some(c), Err(_)) => {
                        d.abandon(c);
                        (buf, r)
                    }
                    _ => (buf, r),
                }
            }
        })
        .await
        .unwrap_or_else(|e| (AlignedBuf::new(cap), Err(std::io::Error::other(e))));
        buf = b;
        if let Err(e) = written {
            let _ = done.send(Done::Failed(FetchError::Io { path: PathBuf::from(&f.obj.key), source: e })).await;
            return;
        }
        if done.send(Done::Part(PartRecord { file: job.file, part: job.part, crc }, checked)).await.is_err() {
            return;
        }
    }
}

/// Writes a part: the 4 KiB-aligned prefix through O_DIRECT when available and `direct`, the
/// tail (the file's last part) through the page cache.
fn write_part(f: &FileShared, offset: u64, buf: &AlignedBuf, direct: bool) -> std::io::Result<()> {
    let data = buf.as_slice();
    let aligned = buf.aligned_prefix_len();
    if let Some(d) = f.direct.as_ref().filter(|_| direct)
        && aligned > 0
    {
        match d.write_all_at(&data[..aligned], offset) {
            Ok(()) => {
                return f.buffered.write_all_at(&data[aligned..], offset + aligned as u64);
            }
            // Some filesystems refuse direct I/O per write; the page cache always works.
            Err(e) if e.raw_os_error() == Some(22) => {}
            Err(e) => return Err(e),
        }
    }
    f.buffered.write_all_at(data, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::sample::{write_safetensors, write_sample_model};
    use crate::cache::source::fault::{Fault, FaultSource};
    use crate::cache::source::posix::PosixSource;

    struct Fx {
        _d: tempfile::TempDir,
        src: PathBuf,
        layout: Layout,
        index: Index,
    }

    fn fixture(shards: u32, shard_bytes: u64) -> Fx {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src/llama");
        write_sample_model(&src, shards, shard_bytes).unwrap();
        std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
        std::fs::write(src.join("nested/deeper/extra.txt"), b"nested file").unwrap();
        let root = d.path().join("cache");
        Fx { index: Index::new(&root), layout: Layout { root }, src, _d: d }
    }

    fn cfg() -> FetchConfig {
        FetchConfig { part_size: 64 << 10, concurrency: 4, stall_timeout: Duration::from_secs(5), ..Default::default() }
    }

    fn spec(fx: &Fx) -> ModelSpec {
        ModelSpec::new(&format!("file://{}", fx.src.display()), &[], &[], "").unwrap()
    }

    fn assert_identical(fx: &Fx, id: &str) {
        let out = fx.layout.model_dir(id);
        for e in walk(&fx.src) {
            let rel = e.strip_prefix(&fx.src).unwrap();
            assert_eq!(std::fs::read(&e).unwrap(), std::fs::read(out.join(rel)).unwrap(), "{}", rel.display());
        }
        assert_eq!(walk(&fx.src).len(), walk(&out).len());
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() { out.extend(walk(&e)) } else { out.push(e) }
        }
        out
    }

    async fn run(fx: &Fx, source: Arc<dyn Source>, cfg: &FetchConfig) -> (Result<IndexEntry, FetchError>, Arc<Progress>) {
        let p = Arc::new(Progress::default());
        let r = fetch(source, &spec(fx), &fx.layout, &fx.index, cfg, p.clone(), CancellationToken::new()).await;
        (r, p)
    }

    #[tokio::test]
    async fn fetches_a_model_identically_and_records_it() {
        let fx = fixture(3, 300_001);
        let (r, p) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        let e = r.unwrap();
        assert_eq!(e.state, EntryState::Ready);
        assert_eq!(e.verification, Some(VerificationKind::Unverified), "a bare directory vouches only for sizes");
        assert_eq!(e.bytes_present, e.bytes_total);
        assert_eq!(Progress::get(&p.bytes_fetched), e.bytes_total);
        assert_identical(&fx, &e.id);
        assert!(!fx.layout.staging_dir(&e.id).exists(), "staging removed after success");
        assert_eq!(fx.index.get(&e.id).unwrap().unwrap(), e);
        // A second fetch finds everything in place and reads nothing.
        let (r, p) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        assert_eq!(r.unwrap().state, EntryState::Ready);
        assert_eq!(Progress::get(&p.bytes_fetched), 0);
    }

    #[tokio::test]
    async fn manifest_verifies_and_corruption_is_never_published() {
        let fx = fixture(2, 200_000);
        let m = Manifest::build(&fx.src).unwrap();
        std::fs::write(fx.src.join(MANIFEST_NAME), m.to_json()).unwrap();
        let (r, p) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        assert_eq!(r.unwrap().verification, Some(VerificationKind::Manifest));
        assert_eq!(Progress::get(&p.bytes_reread), 0, "hashed as the parts arrived, nothing read back");
        assert_identical(&fx, &spec(&fx).id());

        // No room to hold parts that arrive early: they are read back, the verdict the same.
        let fx0 = fixture(2, 200_000);
        std::fs::write(fx0.src.join(MANIFEST_NAME), Manifest::build(&fx0.src).unwrap().to_json()).unwrap();
        let (r, p) = run(&fx0, Arc::new(PosixSource::new(&fx0.src)), &FetchConfig { hash_window: 0, concurrency: 8, ..cfg() }).await;
        assert_eq!(r.unwrap().verification, Some(VerificationKind::Manifest));
        assert!(Progress::get(&p.bytes_reread) < 400_000, "read back {}", Progress::get(&p.bytes_reread));

        // The source changes under a published manifest: same size, different bytes.
        let fx2 = fixture(2, 200_000);
        std::fs::write(fx2.src.join(MANIFEST_NAME), Manifest::build(&fx2.src).unwrap().to_json()).unwrap();
        let shard = fx2.src.join("model-00002-of-00002.safetensors");
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[150_000] ^= 0xff;
        std::fs::write(&shard, bytes).unwrap();
        let (r, _) = run(&fx2, Arc::new(PosixSource::new(&fx2.src)), &cfg()).await;
        let err = r.unwrap_err();
        assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        let id = spec(&fx2).id();
        assert!(!fx2.layout.model_dir(&id).join("model-00002-of-00002.safetensors").exists());
        let e = fx2.index.get(&id).unwrap().unwrap();
        assert_eq!(e.state, EntryState::Failed);
        assert!(e.error.unwrap().contains("model-00002-of-00002.safetensors"));
        assert!(e.files.iter().any(|f| f.key == "config.json" && f.ready), "good files stay ready");
    }

    #[tokio::test]
    async fn the_manifest_vouches_whatever_the_filters_and_a_late_one_checks_what_is_cached() {
        let fx = fixture(2, 200_000);
        let only_weights = ModelSpec::new(&format!("file://{}", fx.src.display()), &["*.safetensors".into()], &[], "").unwrap();
        let prefetch = || async {
            let (p, c) = (Arc::new(Progress::default()), cfg());
            let r =
                fetch(Arc::new(PosixSource::new(&fx.src)), &only_weights, &fx.layout, &fx.index, &c, p.clone(), CancellationToken::new());
            (r.await.unwrap(), Progress::get(&p.bytes_fetched))
        };
        // Cached while the source had no manifest: sizes only.
        let (e, _) = prefetch().await;
        assert_eq!(e.verification, Some(VerificationKind::Unverified));
        assert!(e.files.iter().all(|f| f.key.ends_with(".safetensors")), "the filter holds");

        // A manifest appears at the source (the filter does not select it), and one cached
        // copy has gone bad on disk meanwhile (same size).
        std::fs::write(fx.src.join(MANIFEST_NAME), Manifest::build(&fx.src).unwrap().to_json()).unwrap();
        let bad = "model-00001-of-00002.safetensors";
        let cached = fx.layout.model_dir(&e.id).join(bad);
        let mut bytes = std::fs::read(&cached).unwrap();
        bytes[100_000] ^= 0xff;
        std::fs::write(&cached, bytes).unwrap();

        // The next prefetch checks the cached copies against it: the good one is kept, the
        // bad one fetched again, and the model is now manifest-verified.
        let (e, fetched) = prefetch().await;
        assert_eq!((e.state, e.verification), (EntryState::Ready, Some(VerificationKind::Manifest)));
        assert_eq!(fetched, std::fs::metadata(fx.src.join(bad)).unwrap().len(), "only the bad copy is read again");
        assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(fx.src.join(bad)).unwrap());
        assert!(!fx.layout.model_dir(&e.id).join(MANIFEST_NAME).exists(), "the filter still holds");
    }

    #[tokio::test]
    async fn transient_faults_throttles_stalls_and_flips_end_in_a_correct_cache() {
        let fx = fixture(2, 300_000);
        std::fs::write(fx.src.join(MANIFEST_NAME), Manifest::build(&fx.src).unwrap().to_json()).unwrap();
        let shard = "model-00001-of-00002.safetensors";
        let src = Arc::new(FaultSource::new(
            PosixSource::new(&fx.src),
            vec![(shard, Fault::Transient), (shard, Fault::Throttle), (shard, Fault::Flip), ("config.json", Fault::Stall)],
        ));
        let cfg = FetchConfig { stall_timeout: Duration::from_millis(300), ..cfg() };
        let (r, p) = run(&fx, src.clone(), &cfg).await;
        let e = r.unwrap();
        assert_eq!((e.state, e.verification), (EntryState::Ready, Some(VerificationKind::Manifest)));
        assert_eq!(src.remaining(), 0, "every fault was hit");
        assert!(Progress::get(&p.retries) >= 3 && Progress::get(&p.throttled) == 1);
        assert!(Progress::get(&p.bytes_fetched) > e.bytes_total, "the flipped file was fetched again");
        assert_identical(&fx, &e.id);
    }

    #[tokio::test]
    async fn a_stalled_part_is_reissued_after_a_few_typical_part_times() {
        let fx = fixture(1, 4 << 20);
        let shard = "model-00001-of-00001.safetensors";
        // Stall a late part: by then the usual part time is known and small.
        let src = Arc::new(FaultSource::new_after(PosixSource::new(&fx.src), vec![(shard, Fault::Stall)], 20));
        let cfg = FetchConfig { stall_timeout: Duration::from_secs(60), concurrency: 2, ..cfg() };
        let started = Instant::now();
        let (r, p) = run(&fx, src.clone(), &cfg).await;
        r.unwrap();
        assert_eq!(src.remaining(), 0);
        assert!(Progress::get(&p.retries) >= 1);
        assert!(started.elapsed() < Duration::from_secs(10), "reissued long before the 60 s ceiling: {:?}", started.elapsed());
        assert_identical(&fx, &spec(&fx).id());
    }

    /// Counts reads in flight, each held a little, so overlap shows.
    struct Overlap {
        inner: PosixSource,
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
    }

    impl Source for Overlap {
        fn name(&self) -> String {
            self.inner.name()
        }
        fn list(&self) -> super::super::source::BoxFut<'_, Result<Vec<RemoteObject>, SourceError>> {
            self.inner.list()
        }
        fn read_into<'a>(
            &'a self,
            obj: &'a RemoteObject,
            offset: u64,
            buf: AlignedBuf,
        ) -> super::super::source::BoxFut<'a, (AlignedBuf, Result<Checked, SourceError>)> {
            Box::pin(async move {
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                self.inner.read_into(obj, offset, buf).await
            })
        }
    }

    #[tokio::test]
    async fn small_files_get_their_own_readers_beside_the_big_ones() {
        let fx = fixture(1, 3 << 20);
        for i in 0..60 {
            std::fs::write(fx.src.join(format!("nested/small-{i}.bin")), vec![i as u8; 1000 + i * 100]).unwrap();
        }
        let src = Arc::new(Overlap { inner: PosixSource::new(&fx.src), now: Default::default(), max: Default::default() });
        let cfg = FetchConfig { part_size: 1 << 20, concurrency: 1, small_concurrency: 6, ..cfg() };
        let (r, _) = run(&fx, src.clone(), &cfg).await;
        assert_identical(&fx, &r.unwrap().id);
        let max = src.max.load(Ordering::SeqCst);
        assert!(max > 1 && max <= 7, "reads in flight at most: {max} (1 big + 6 small workers)");
    }

    #[tokio::test]
    async fn cancelled_download_resumes_from_the_journal() {
        let fx = fixture(4, 1_000_000);
        // With a manifest, so the resumed parts (never in this process) feed the SHA-256 too.
        std::fs::write(fx.src.join(MANIFEST_NAME), Manifest::build(&fx.src).unwrap().to_json()).unwrap();
        let cfg = FetchConfig { part_size: 64 << 10, concurrency: 2, small_concurrency: 0, ..cfg() };
        let progress = Arc::new(Progress::default());
        let cancel = CancellationToken::new();
        let watcher = {
            let (p, c) = (progress.clone(), cancel.clone());
            tokio::spawn(async move {
                while Progress::get(&p.bytes_done) < 1_500_000 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                c.cancel();
            })
        };
        let spec = spec(&fx);
        let r = fetch(Arc::new(PosixSource::new(&fx.src)), &spec, &fx.layout, &fx.index, &cfg, progress.clone(), cancel).await;
        // The watcher polls with no deadline of its own: a fetch that ended early must fail
        // the test, not hang it.
        tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .unwrap_or_else(|_| panic!("fetch ended before 1.5 MB: {r:?}"))
            .unwrap();
        assert!(matches!(r, Err(FetchError::Cancelled { .. })), "{r:?}");
        let kept = Progress::get(&progress.bytes_done);
        assert!(kept >= 1_500_000);

        let (r, p) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg).await;
        let e = r.unwrap();
        let resumed = Progress::get(&p.bytes_resumed);
        assert!(resumed > 0, "journaled parts are reused");
        // Refetched at most: everything not kept, plus the parts in flight at the cancel.
        let bound = e.bytes_total - kept + (cfg.concurrency as u64 * 2) * cfg.part_size as u64;
        assert!(Progress::get(&p.bytes_fetched) <= bound, "fetched {} > bound {bound}", Progress::get(&p.bytes_fetched));
        assert_eq!(e.verification, Some(VerificationKind::Manifest));
        let reread = Progress::get(&p.bytes_reread);
        assert!(reread > 0 && reread <= resumed, "only the resumed parts are read back: {reread} of {resumed}");
        assert_identical(&fx, &e.id);
    }

    #[tokio::test]
    async fn crash_after_publishing_a_file_but_before_the_index_keeps_the_good_file() {
        let fx = fixture(2, 300_000);
        let (r, _) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        let e = r.unwrap();
        // Rewind to the moment after the last rename: staging with a full journal but no
        // data files, and an index that still says downloading.
        let staging = fx.layout.staging_dir(&e.id);
        std::fs::create_dir_all(staging.join("data")).unwrap();
        let (plan_files, part) = (e.files.len(), cfg().part_size as u64);
        let mut objs: Vec<_> = PosixSource::new(&fx.src).walk().unwrap();
        objs.sort_by_key(|o| (o.size > part, if o.size > part { 0 } else { o.size }));
        assert_eq!(objs.len(), plan_files);
        let plan = Plan {
            id: e.id.clone(),
            part_size: part,
            files: PosixSource::new(&fx.src)
                .walk()
                .unwrap()
                .iter()
                .map(|o| PlanFile { key: o.key.clone(), size: o.size, version: o.version.clone() })
                .collect(),
        };
        std::fs::write(staging.join("plan.json"), serde_json::to_vec(&plan).unwrap()).unwrap();
        let (mut j, _) = Journal::open(&staging.join("journal")).unwrap();
        for (i, o) in objs.iter().enumerate() {
            let parts = o.size.div_ceil(part).max(1) as u32;
            let recs: Vec<_> = (0..parts).map(|p| PartRecord { file: i as u32, part: p, crc: 0 }).collect();
            j.append(&recs).unwrap();
        }
        let mut stale = e.clone();
        stale.state = EntryState::Downloading;
        stale.files.iter_mut().for_each(|f| f.ready = false);
        fx.index.put(&stale).unwrap();

        let (r, p) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        assert_eq!(r.unwrap().state, EntryState::Ready);
        assert_eq!(Progress::get(&p.bytes_fetched), 0, "nothing to fetch again");
        assert_identical(&fx, &e.id);
    }

    #[tokio::test]
    async fn safetensors_with_offsets_outside_the_file_is_corrupt() {
        let fx = fixture(1, 100_000);
        // A header claiming more data than the file holds, under the expected name.
        let path = fx.src.join("model-00001-of-00001.safetensors");
        write_safetensors(&path, 100_000, 1).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(90_000).unwrap();
        let (r, _) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        let err = r.unwrap_err().to_string();
        assert!(err.contains("model-00001-of-00001.safetensors") && err.contains("verification failed"), "{err}");
    }

    #[tokio::test]
    async fn too_big_for_the_disk_fails_before_writing() {
        let fx = fixture(1, 10_000);
        let big = fx.src.join("huge.bin");
        let f = File::create(&big).unwrap();
        f.set_len(1 << 42).unwrap(); // sparse: 4 TiB the disk cannot hold
        let (r, _) = run(&fx, Arc::new(PosixSource::new(&fx.src)), &cfg()).await;
        match r.unwrap_err() {
            FetchError::NoSpace { needed, available, .. } => assert!(needed > available),
            e => panic!("expected NoSpace, got {e}"),
        }
    }
}
