//! The cache as the agent runs it: one download per model however many ask (single flight),
//! capacity and disk watermarks with LRU eviction of unpinned, unused entries, pins, a
//! start-up scan that cleans up after crashes, per-source bandwidth (EWMA) for the
//! controller's time-to-ready predictions, and the `hearth_cache_*` metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hearth_service::tasks::{TaskMetrics, Tasks};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::fetch::{FetchConfig, FetchError, Layout, Progress, fetch};
use super::index::{EntryState, Index, IndexEntry, IndexError, VerificationKind};
use super::source::s3::S3Options;
use super::spec::ModelSpec;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{id}: needs {needed} bytes but the cache can free at most {available} (capacity {capacity}, pinned or in use: {held})")]
    NoRoom { id: String, needed: u64, available: u64, capacity: u64, held: u64 },
    #[error("model {0:?} is not in the cache")]
    Unknown(String),
    #[error("model {0:?} is pinned; unpin it before evicting")]
    Pinned(String),
    #[error("model {0:?} is being downloaded; it cannot be evicted now")]
    Busy(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Shared(String),
    #[error("stopped waiting for {0}: cancelled")]
    Cancelled(String),
    #[error("cache task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub root: PathBuf,
    /// Most bytes the cache may hold; None: bounded by the disk watermarks only.
    pub capacity: Option<u64>,
    /// Disk use fraction above which unpinned entries are evicted...
    pub high_watermark: f64,
    /// ...down to this fraction.
    pub low_watermark: f64,
    pub fetch: FetchConfig,
    pub s3: S3Options,
}

/// Per-source throughput, smoothed: what the controller divides missing bytes by.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    bytes_per_sec: f64,
    samples: u64,
}

const EWMA_ALPHA: f64 = 0.3;

type Shared = watch::Receiver<Option<Result<IndexEntry, String>>>;

/// One download in progress and who still wants it. The download runs under its own token,
/// cancelled only when the last caller stops waiting (or the agent shuts down): one caller
/// giving up never takes the download away from the others.
struct Flight {
    rx: Shared,
    wanters: Arc<AtomicUsize>,
}

/// A caller's claim on a flight; dropping it (the caller returned, was cancelled or its
/// future was dropped) releases the claim, and the last release cancels the download.
struct Want {
    wanters: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl Want {
    /// Joins a flight unless its last caller already left (the count never rises from 0).
    fn join(wanters: &Arc<AtomicUsize>, cancel: &CancellationToken) -> Option<Self> {
        wanters.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n > 0).then_some(n + 1)).ok()?;
        Some(Self { wanters: wanters.clone(), cancel: cancel.clone() })
    }
}

impl Drop for Want {
    fn drop(&mut self) {
        if self.wanters.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.cancel.cancel();
        }
    }
}

#[derive(Debug, Clone)]
struct Metrics {
    hits: Counter,
    misses: Counter,
    evictions: Counter,
    retries: Counter,
    errors: Family<[(&'static str, &'static str); 1], Counter>,
    verifications: Family<[(&'static str, &'static str); 1], Counter>,
    duration: Histogram,
}

pub struct Cache {
    cfg: CacheConfig,
    layout: Layout,
    index: Index,
    inflight: Mutex<HashMap<String, (Flight, CancellationToken)>>,
    /// Downloads run here: tracked, counted if they panic, cancelled at shutdown.
    tasks: Tasks,
    progress: Mutex<BTreeMap<String, Arc<Progress>>>,
    bandwidth: Mutex<BTreeMap<String, Ewma>>,
    downloaded: Mutex<BTreeMap<String, u64>>,
    pins: Mutex<BTreeSet<String>>,
    /// Bytes of the container images Hearth keeps on the node: they share the budget.
    image_bytes: AtomicU64,
    metrics: Metrics,
    /// Bumped on every change of the index, for the report stream.
    changes: watch::Sender<u64>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("root", &self.cfg.root).finish_non_exhaustive()
    }
}

/// What the report needs of one source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceBandwidth {
    pub source: String,
    pub bytes_per_second: f64,
    pub samples: u64,
}

impl Cache {
    /// Opens the cache with downloads under their own task set (the CLI and tests).
    /// Blocking: the start-up scan reads the whole index.
    pub fn open(cfg: CacheConfig, registry: &mut Registry) -> Result<Arc<Self>, CacheError> {
        Self::open_in(cfg, registry, Tasks::new("cache", CancellationToken::new(), TaskMetrics::default()))
    }

    /// Opens the cache: scans for what a crash left and cleans it up, then registers
    /// metrics. Downloads run as `tasks`. Blocking: call it on the blocking pool.
    pub fn open_in(cfg: CacheConfig, registry: &mut Registry, tasks: Tasks) -> Result<Arc<Self>, CacheError> {
        let layout = Layout { root: cfg.root.clone() };
        std::fs::create_dir_all(cfg.root.join("models")).map_err(|source| CacheError::Io { path: cfg.root.clone(), source })?;
        let index = Index::new(&cfg.root);
        let pins: BTreeSet<String> =
            std::fs::read(cfg.root.join("pins.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let metrics = Metrics {
            hits: Counter::default(),
            misses: Counter::default(),
            evictions: Counter::default(),
            retries: Counter::default(),
            errors: Family::default(),
            verifications: Family::default(),
            duration: Histogram::new([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]),
        };
        let (changes, _) = watch::channel(0);
        let cache = Arc::new(Self {
            cfg,
            layout,
            index,
            inflight: Mutex::default(),
            tasks,
            progress: Mutex::default(),
            bandwidth: Mutex::default(),
            downloaded: Mutex::default(),
            pins: Mutex::new(pins),
            image_bytes: AtomicU64::new(0),
            metrics: metrics.clone(),
            changes,
            generation: AtomicU64::new(0),
        });
        cache.startup_scan()?;
        let r = registry.sub_registry_with_prefix("hearth_cache");
        r.register("hits", "Requests for a model already cached", metrics.hits);
        r.register("misses", "Requests that started a download", metrics.misses);
        r.register("evictions", "Models evicted", metrics.evictions);
        r.register("retries", "Part reads retried (throttling, resets, stalls, short bodies)", metrics.retries);
        r.register("errors", "Failed downloads and cache operations, by kind", metrics.errors);
        r.register("verifications", "Files verified, by outcome (checksum, manifest, unverified, failed)", metrics.verifications);
        r.register_with_unit("prefetch_duration", "Time to download a model", Unit::Seconds, metrics.duration);
        r.register_collector(Box::new(CacheCollector(cache.clone())));
        Ok(cache)
    }

    fn startup_scan(&self) -> Result<(), CacheError> {
        let (entries, bad) = self.index.list()?;
        for b in bad {
            warn!(error = %b, "unreadable index entry ignored");
        }
        let ids: BTreeSet<String> = entries.iter().map(|e| e.id.clone()).collect();
        // Temp files of interrupted atomic writes.
        for dir in [self.cfg.root.join("index"), self.cfg.root.clone()] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') && name.contains(".tmp-") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        // Staging without an index entry cannot be resumed by anyone: remove it.
        if let Ok(rd) = std::fs::read_dir(self.cfg.root.join("staging")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !ids.contains(&id) {
                    info!(%id, "removing staging left without an index entry");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for mut e in entries {
            match e.state {
                // An eviction that was cut short is finished now.
                EntryState::Evicting => {
                    let _ = std::fs::remove_dir_all(self.layout.model_dir(&e.id));
                    self.index.remove(&e.id)?;
                }
                // A download that was cut short resumes when the model is asked for again;
                // until then it is reported as what it is.
                EntryState::Downloading | EntryState::Verifying => {
                    e.error = Some("interrupted; resumes on the next request".into());
                    e.refresh();
                    self.index.put(&e)?;
                }
                EntryState::Ready | EntryState::Failed => {}
            }
        }
        Ok(())
    }

    /// The download budget the cache's fetches share, for other downloads of the node's.
    pub fn rate_limiter(&self) -> Option<Arc<crate::cache::ratelimit::RateLimiter>> {
        self.cfg.fetch.limit.clone()
    }

    /// Counts the container images Hearth keeps against the capacity: weights make room
    /// for them as for each other.
    pub fn set_image_bytes(&self, bytes: u64) {
        self.image_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn root(&self) -> &std::path::Path {
        &self.cfg.root
    }

    pub fn model_dir(&self, id: &str) -> PathBuf {
        self.layout.model_dir(id)
    }

    fn changed(&self) {
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.changes.send_replace(g);
    }

    /// Notified on every change of what is cached.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every entry, with pins applied and, for downloads in progress, the bytes already
    /// durable (journaled parts count as present: they survive a crash).
    pub fn entries(&self) -> Vec<IndexEntry> {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let live = self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut list = self.index.list().map(|(ok, _)| ok).unwrap_or_default();
        for e in &mut list {
            e.pinned = pins.contains(&e.id);
            if let Some(p) = live.get(&e.id) {
                e.bytes_present = e.bytes_present.max(Progress::get(&p.bytes_done));
            }
        }
        list
    }

    /// Whether any download is running (its progress is worth reporting between changes).
    pub fn downloading(&self) -> bool {
        !self.progress.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    pub fn source_bandwidth(&self) -> Vec<SourceBandwidth> {
        self.bandwidth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(s, e)| SourceBandwidth { source: s.clone(), bytes_per_second: e.bytes_per_sec, samples: e.samples })
            .collect()
    }

    /// A cached, complete entry, with its use recorded; None when it must be downloaded.
    /// Blocking (index read and write).
    fn hit(&self, id: &str) -> Result<Option<IndexEntry>, CacheError> {
        let Some(mut e) = self.index.get(id)?.filter(|e| e.state == EntryState::Ready) else {
            return Ok(None);
        };
        if !e.files.iter().all(|f| self.layout.model_dir(id).join(&f.key).is_file()) {
            return Ok(None);
        }
        self.metrics.hits.inc();
        e.last_used = super::index::now_secs();
        self.index.put(&e)?;
        e.pinned = self.pins.lock().unwrap_or_else(|p| p.into_inner()).contains(id);
        Ok(Some(e))
    }

    /// Makes sure `spec` is cached and returns its entry. Concurrent callers for the same
    /// model share one download, which goes on while any of them still waits; `cancel`
    /// ends this caller's wait (and the download, if no one else wants it).
    pub async fn ensure(self: &Arc<Self>, spec: &ModelSpec, cancel: CancellationToken) -> Result<IndexEntry, CacheError> {
        let id = spec.id();
        let me = self.clone();
        let hit_id = id.clone();
        if let Some(e) = tokio::task::spawn_blocking(move || me.hit(&hit_id)).await?? {
            return Ok(e);
        }
        loop {
            let (mut rx, want) = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                match inflight.get(&id) {
                    Some((f, token)) => (f.rx.clone(), Want::join(&f.wanters, token)),
                    None => {
                        self.metrics.misses.inc();
                        let (tx, rx) = watch::channel(None);
                        let wanters = Arc::new(AtomicUsize::new(1));
                        let token = self.tasks.cancel_token().child_token();
                        let want = Want { wanters: wanters.clone(), cancel: token.clone() };
                        inflight.insert(id.clone(), (Flight { rx: rx.clone(), wanters }, token.clone()));
                        let (me, spec) = (self.clone(), spec.clone());
                        self.tasks.spawn("download", async move {
                            let r = me.download(&spec, token).await;
                            // Out of the map before the result is sent: a caller that saw
                            // this flight abandoned retries and must find it gone.
                            me.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&spec.id());
                            let _ = tx.send(Some(r.map_err(|e| e.to_string())));
                        });
                        (rx, Some(want))
                    }
                }
            };
            let wait = async {
                loop {
                    if let Some(r) = rx.borrow_and_update().clone() {
                        return Some(r);
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            };
            let ended = tokio::select! {
                r = wait => r,
                _ = cancel.cancelled() => return Err(CacheError::Cancelled(id)),
            };
            match (ended, want) {
                (Some(r), Some(_want)) => return r.map_err(CacheError::Shared),
                // Everyone else had left that flight and it was being cancelled: start anew.
                (Some(_), None) => continue,
                (None, _) => return Err(CacheError::Shared(format!("download of {id} was abandoned"))),
            }
        }
    }

    async fn download(self: &Arc<Self>, spec: &ModelSpec, cancel: CancellationToken) -> Result<IndexEntry, CacheError> {
        let id = spec.id();
        // Room first: listing is cheap, and a download that cannot fit must not start. An
        // unreachable source can hold the listing for a while (credential lookups, the SDK's
        // retries): shutdown must not wait for it.
        let listing = async {
            let source = super::open_source(&spec.uri, &self.cfg.s3).await;
            let objects = source.list().await.map_err(FetchError::from)?;
            Ok::<_, CacheError>((source, objects))
        };
        let (source, objects) = tokio::select! {
            _ = cancel.cancelled() => return Err(CacheError::Cancelled(id)),
            r = listing => r?,
        };
        let source_key = source.name();
        let needed: u64 = objects.iter().filter(|o| spec.wants(&o.key)).map(|o| o.size).sum();
        // Making room may delete whole models: not on an async worker.
        let (me, for_id) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || me.make_room(&for_id, needed)).await??;
        let progress = Arc::new(Progress::default());
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), progress.clone());
        self.changed();
        let started = Instant::now();
        let result = fetch(source, spec, &self.layout, &self.index, &self.cfg.fetch, progress.clone(), cancel).await;
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.metrics.retries.inc_by(Progress::get(&progress.retries));
        let fetched = Progress::get(&progress.bytes_fetched);
        *self.downloaded.lock().unwrap_or_else(|p| p.into_inner()).entry(source_key.clone()).or_default() += fetched;
        let secs = started.elapsed().as_secs_f64();
        // Small downloads say more about latency than bandwidth; learn from real transfers.
        if fetched >= 8 << 20 && secs > 0.0 {
            let mut bw = self.bandwidth.lock().unwrap_or_else(|p| p.into_inner());
            let e = bw.entry(source_key).or_default();
            let sample = fetched as f64 / secs;
            e.bytes_per_sec = if e.samples == 0 { sample } else { EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * e.bytes_per_sec };
            e.samples += 1;
        }
        self.changed();
        // The download's buffers are free now; give them back rather than sit on them.
        let _ = tokio::task::spawn_blocking(super::trim::release_free_memory).await;
        match result {
            Ok(e) => {
                self.metrics.duration.observe(secs);
                for f in &e.files {
                    let outcome = f.verification.unwrap_or(VerificationKind::Unverified).as_str();
                    self.metrics.verifications.get_or_create(&[("outcome", outcome)]).inc();
                }
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.enforce_watermarks()).await?;
                Ok(e)
            }
            Err(err) => {
                if matches!(err, FetchError::Corrupt { .. }) {
                    self.metrics.verifications.get_or_create(&[("outcome", "failed")]).inc();
                }
                self.metrics.errors.get_or_create(&[("kind", err.label())]).inc();
                Err(err.into())
            }
        }
    }

    /// Evicts least-recently-used, unpinned, idle entries until `needed` more bytes fit
    /// under the capacity and the disk's high watermark.
    fn make_room(&self, for_id: &str, needed: u64) -> Result<(), CacheError> {
        let entries = self.entries();
        let already = entries.iter().find(|e| e.id == for_id).map_or(0, |e| e.bytes_present);
        let needed = needed.saturating_sub(already);
        let (disk_total, disk_free) = disk(&self.cfg.root)?;
        let disk_allowed = (disk_total as f64 * self.cfg.high_watermark) as u64;
        let disk_used = disk_total - disk_free;
        let used: u64 = entries.iter().map(|e| e.bytes_present).sum::<u64>() + self.image_bytes.load(Ordering::Relaxed);
        let capacity = self.cfg.capacity.unwrap_or(u64::MAX);
        let over_capacity = (used + needed).saturating_sub(capacity);
        let over_disk = (disk_used + needed).saturating_sub(disk_allowed);
        let mut to_free = over_capacity.max(over_disk);
        if to_free == 0 {
            return Ok(());
        }
        let busy: BTreeSet<String> = self.inflight.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let mut candidates: Vec<&IndexEntry> = entries.iter().filter(|e| e.id != for_id && !e.pinned && !busy.contains(&e.id)).collect();
        candidates.sort_by_key(|e| e.last_used);
        let freeable: u64 = candidates.iter().map(|e| e.bytes_present).sum();
        if freeable < to_free {
            let held = used - freeable;
            return Err(CacheError::NoRoom {
                id: for_id.to_owned(),
                needed,
                available: freeable + capacity.saturating_sub(used).min(disk_allowed.saturating_sub(disk_used)),
                capacity: self.cfg.capacity.unwrap_or(disk_allowed),
                held,
            });
        }
        for e in candidates {
            if to_free == 0 {
                break;
            }
            info!(id = %e.id, bytes = e.bytes_present, "evicting to make room");
            self.remove(&e.id)?;
            to_free = to_free.saturating_sub(e.bytes_present);
        }
        Ok(())
    }

    /// Evicts unpinned entries while disk use is above the high watermark, down to the low.
    /// Blocking.
    pub fn enforce_watermarks(&self) {
        let Ok((total, free)) = disk(&self.cfg.root) else {
            return;
        };
        if total == 0 || ((total - free) as f64) < total as f64 * self.cfg.high_watermark {
            return;
        }
        let target = (total as f64 * self.cfg.low_watermark) as u64;
        let mut used = total - free;
        let busy: BTreeSet<String> = self.inflight.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let mut entries: Vec<IndexEntry> = self.entries().into_iter().filter(|e| !e.pinned && !busy.contains(&e.id)).collect();
        entries.sort_by_key(|e| e.last_used);
        for e in entries {
            if used <= target {
                break;
            }
            info!(id = %e.id, "evicting: disk above the high watermark");
            if self.remove(&e.id).is_ok() {
                used = used.saturating_sub(e.bytes_present);
            }
        }
    }

    fn remove(&self, id: &str) -> Result<(), CacheError> {
        if let Some(mut e) = self.index.get(id)? {
            // Mark first: a crash mid-delete is finished by the next start-up scan.
            e.state = EntryState::Evicting;
            self.index.put(&e)?;
        }
        for dir in [self.layout.model_dir(id), self.layout.staging_dir(id)] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CacheError::Io { path: dir, source }),
            }
        }
        self.index.remove(id)?;
        self.metrics.evictions.inc();
        self.changed();
        Ok(())
    }

    /// Evicts a model now (refused while pinned or downloading). Blocking: deleting a
    /// model directory can take seconds; async callers use the blocking pool.
    pub fn evict(&self, id: &str) -> Result<(), CacheError> {
        if self.pins.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
            return Err(CacheError::Pinned(id.to_owned()));
        }
        if self.inflight.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id) {
            return Err(CacheError::Busy(id.to_owned()));
        }
        if self.index.get(id)?.is_none() {
            return Err(CacheError::Unknown(id.to_owned()));
        }
        self.remove(id)
    }

    /// Pins (a runtime uses it: never evicted) or unpins a model. Blocking (fsync).
    pub fn pin(&self, id: &str, pinned: bool) -> Result<(), CacheError> {
        if pinned && self.index.get(id)?.is_none() && !self.inflight.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id) {
            return Err(CacheError::Unknown(id.to_owned()));
        }
        self.set_pin(id, pinned)
    }

    /// Pins a model the configuration wants kept, before it is cached: it is then never
    /// seen ready and unpinned, and never evicted between its download and the pin.
    /// Blocking (fsync).
    pub fn pin_configured(&self, id: &str) -> Result<(), CacheError> {
        self.set_pin(id, true)
    }

    fn set_pin(&self, id: &str, pinned: bool) -> Result<(), CacheError> {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if pinned { pins.insert(id.to_owned()) } else { pins.remove(id) };
        if changed {
            let json = serde_json::to_vec(&*pins).unwrap_or_default();
            let path = self.cfg.root.join("pins.json");
            hearth_service::fsutil::write_atomic(&path, &json, false).map_err(|source| CacheError::Io { path, source })?;
            drop(pins);
            self.changed();
        }
        Ok(())
    }
}

/// The disk under `root` as (usable size, available bytes). The usable size is what is used
/// plus what we may still write, as `df` reckons its Use%: blocks reserved for root, or a
/// thin-provisioned volume whose size exceeds its backing store, are not room we will ever get,
/// and counting them as used would put the watermark below what is already on the disk.
fn disk(root: &std::path::Path) -> Result<(u64, u64), CacheError> {
    let st = rustix::fs::statvfs(root).map_err(|e| CacheError::Io { path: root.to_owned(), source: e.into() })?;
    Ok(usable(st.f_blocks, st.f_bfree, st.f_bavail, st.f_frsize))
}

fn usable(blocks: u64, free: u64, avail: u64, block_size: u64) -> (u64, u64) {
    let used = blocks.saturating_sub(free);
    ((used + avail) * block_size, avail * block_size)
}

/// Scrape-time view of the index and live downloads (registered under `hearth_cache_`). Label cardinality: `state` is a fixed
/// set; `source` is bounded by the buckets and mounts models come from; `model` appears only
/// for downloads in progress.
#[derive(Debug)]
struct CacheCollector(Arc<Cache>);

impl Collector for CacheCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let entries = c.entries();
        let used: u64 = entries.iter().map(|e| e.bytes_present).sum();
        ConstGauge::new(used as i64).encode(enc.encode_descriptor(
            "used",
            "Bytes of models in the cache",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?)?;
        let capacity = c.cfg.capacity.unwrap_or_else(|| disk(&c.cfg.root).map_or(0, |(t, _)| (t as f64 * c.cfg.high_watermark) as u64));
        ConstGauge::new(capacity as i64).encode(enc.encode_descriptor(
            "capacity",
            "Bytes the cache may use (configured capacity, else the disk's high watermark)",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?)?;
        let mut by_state: BTreeMap<&str, i64> =
            ["downloading", "verifying", "ready", "failed", "evicting"].iter().map(|s| (*s, 0)).collect();
        for e in &entries {
            *by_state.entry(e.state.as_str()).or_default() += 1;
        }
        let mut m = enc.encode_descriptor("entries", "Models in the index, by state", None, MetricType::Gauge)?;
        for (s, n) in &by_state {
            ConstGauge::new(*n).encode(m.encode_family(&[("state", *s)])?)?;
        }
        let unverified =
            entries.iter().filter(|e| e.state == EntryState::Ready && e.verification == Some(VerificationKind::Unverified)).count();
        ConstGauge::new(unverified as i64).encode(enc.encode_descriptor(
            "unverified_entries",
            "Ready models whose source vouched only for sizes (no checksum, no manifest)",
            None,
            MetricType::Gauge,
        )?)?;
        let downloaded = c.downloaded.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut m = enc.encode_descriptor("downloaded", "Bytes read from each source", Some(&Unit::Bytes), MetricType::Counter)?;
        for (s, b) in &downloaded {
            ConstCounter::new(*b).encode(m.encode_family(&[("source", s.as_str())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "source_throughput",
            "Measured download throughput per source (EWMA), bytes per second",
            None,
            MetricType::Gauge,
        )?;
        for b in c.source_bandwidth() {
            ConstGauge::new(b.bytes_per_second).encode(m.encode_family(&[("source", b.source.as_str())])?)?;
        }
        let live = c.progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut m = enc.encode_descriptor(
            "download_done",
            "Bytes durable so far, per download in progress",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for (id, p) in &live {
            ConstGauge::new(Progress::get(&p.bytes_done) as i64).encode(m.encode_family(&[("model", id.as_str())])?)?;
        }
        let mut m =
            enc.encode_descriptor("download_total", "Bytes to download, per download in progress", Some(&Unit::Bytes), MetricType::Gauge)?;
        for (id, p) in &live {
            ConstGauge::new(Progress::get(&p.bytes_total) as i64).encode(m.encode_family(&[("model", id.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::sample::write_sample_model;

    fn open(root: &std::path::Path, capacity: Option<u64>) -> Arc<Cache> {
        open_with(root, capacity, None)
    }

    /// A cache whose downloads share `limit` bytes per second, if given.
    fn open_with(root: &std::path::Path, capacity: Option<u64>, limit: Option<u64>) -> Arc<Cache> {
        let mut cfg = CacheConfig {
            root: root.into(),
            capacity,
            high_watermark: 0.999,
            low_watermark: 0.99,
            fetch: FetchConfig { part_size: 64 << 10, concurrency: 4, ..Default::default() },
            s3: S3Options::default(),
        };
        cfg.fetch.limit = limit.map(|l| Arc::new(crate::cache::ratelimit::RateLimiter::new(l)));
        Cache::open(cfg, &mut Registry::default()).unwrap()
    }

    fn model(dir: &std::path::Path, name: &str, bytes: u64) -> ModelSpec {
        let p = dir.join(name);
        write_sample_model(&p, 1, bytes).unwrap();
        ModelSpec::new(&format!("file://{}", p.display()), &["*.safetensors".into()], &[], "").unwrap()
    }

    #[test]
    fn the_disk_size_is_what_is_used_plus_what_we_may_write() {
        // 100 blocks of which 60 are free, but only 20 of those may be written (root-reserved
        // blocks, or a thin volume larger than its backing store): 40 used + 20 = 60 usable.
        assert_eq!(usable(100, 60, 20, 4096), (60 * 4096, 20 * 4096));
        assert_eq!(usable(100, 60, 60, 1), (100, 60), "nothing reserved: the whole disk");
        assert_eq!(usable(100, 120, 0, 1), (0, 0), "a racing statvfs never underflows");
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_download_and_then_hit() {
        let d = tempfile::tempdir().unwrap();
        let c = open(&d.path().join("cache"), None);
        let m = model(d.path(), "m", 2 << 20);
        let (a, b) = tokio::join!(c.ensure(&m, CancellationToken::new()), c.ensure(&m, CancellationToken::new()));
        assert_eq!(a.unwrap().id, b.unwrap().id);
        assert_eq!(c.metrics.misses.get(), 1, "one download for two callers");
        c.ensure(&m, CancellationToken::new()).await.unwrap();
        assert_eq!(c.metrics.hits.get(), 1);
    }

    #[tokio::test]
    async fn lru_eviction_keeps_pinned_entries_and_refuses_what_cannot_fit() {
        let d = tempfile::tempdir().unwrap();
        let mib = 1 << 20;
        let c = open(&d.path().join("cache"), Some(5 * mib / 2));
        let (m1, m2, m3) = (model(d.path(), "m1", mib), model(d.path(), "m2", mib), model(d.path(), "m3", mib));
        let e1 = c.ensure(&m1, CancellationToken::new()).await.unwrap();
        let e2 = c.ensure(&m2, CancellationToken::new()).await.unwrap();
        c.pin(&e1.id, true).unwrap();
        // m3 needs room: m2 (unpinned, least recently used) goes, pinned m1 stays.
        let e3 = c.ensure(&m3, CancellationToken::new()).await.unwrap();
        let ids: Vec<String> = c.entries().into_iter().map(|e| e.id).collect();
        assert!(ids.contains(&e1.id) && ids.contains(&e3.id) && !ids.contains(&e2.id), "{ids:?}");
        assert!(!c.model_dir(&e2.id).exists());
        assert_eq!(c.metrics.evictions.get(), 1);
        // Pin m3 too: now a fourth model cannot fit, and the error says why.
        c.pin(&e3.id, true).unwrap();
        let m4 = model(d.path(), "m4", mib);
        let err = c.ensure(&m4, CancellationToken::new()).await.unwrap_err().to_string();
        assert!(err.contains("needs") && err.contains("pinned or in use"), "{err}");
        assert!(matches!(c.evict(&e1.id), Err(CacheError::Pinned(_))));
        c.pin(&e1.id, false).unwrap();
        c.evict(&e1.id).unwrap();
        assert!(matches!(c.evict(&e1.id), Err(CacheError::Unknown(_))));
    }

    #[tokio::test]
    async fn concurrent_downloads_share_the_bandwidth_limit_fairly() {
        let d = tempfile::tempdir().unwrap();
        let c = open_with(&d.path().join("cache"), None, Some(8 << 20));
        let (a, b) = (model(d.path(), "a", 4 << 20), model(d.path(), "b", 4 << 20));
        let started = Instant::now();
        let (ra, rb) = tokio::join!(
            async {
                c.ensure(&a, CancellationToken::new()).await.unwrap();
                started.elapsed().as_secs_f64()
            },
            async {
                c.ensure(&b, CancellationToken::new()).await.unwrap();
                started.elapsed().as_secs_f64()
            }
        );
        // 8 MiB in total at 8 MiB/s: about a second overall, and neither download finishes
        // long before the other (a FIFO of slots, not first-come-takes-all).
        let total = ra.max(rb);
        assert!((0.8..2.5).contains(&total), "{ra} {rb}");
        assert!(ra.min(rb) > 0.7 * total, "one download starved the other: {ra} vs {rb}");
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_download_goes_on_while_any_caller_waits_and_stops_when_none_does() {
        let d = tempfile::tempdir().unwrap();
        // 4 MiB at 4 MiB/s: long enough to cancel a caller in the middle.
        let c = open_with(&d.path().join("cache"), None, Some(4 << 20));
        let m = model(d.path(), "m", 4 << 20);
        let (first, second) = (CancellationToken::new(), CancellationToken::new());
        let a = tokio::spawn({
            let (c, m, t) = (c.clone(), m.clone(), first.clone());
            async move { c.ensure(&m, t).await }
        });
        let b = tokio::spawn({
            let (c, m, t) = (c.clone(), m.clone(), second.clone());
            async move { c.ensure(&m, t).await }
        });
        until("the download to start", || c.downloading()).await;
        // Both callers wait on the one flight before the first gives up (under load the
        // second may still be in its hit check).
        until("both callers on the flight", || {
            c.inflight.lock().unwrap().get(&m.id()).is_some_and(|(f, _)| f.wanters.load(Ordering::Acquire) == 2)
        })
        .await;
        first.cancel();
        assert!(matches!(a.await.unwrap(), Err(CacheError::Cancelled(_))), "the first caller stops waiting");
        let e = b.await.unwrap().expect("the second caller still gets the model");
        assert_eq!((e.state, e.bytes_present), (EntryState::Ready, 4 << 20));
        assert_eq!(c.metrics.misses.get(), 1, "one download for both callers");

        // Alone, a caller that gives up takes the download with it.
        let n = model(d.path(), "n", 4 << 20);
        let only = CancellationToken::new();
        let w = tokio::spawn({
            let (c, n, t) = (c.clone(), n.clone(), only.clone());
            async move { c.ensure(&n, t).await }
        });
        until("the second download to start", || c.downloading()).await;
        only.cancel();
        assert!(matches!(w.await.unwrap(), Err(CacheError::Cancelled(_))));
        until("the abandoned download to stop", || !c.downloading() && c.inflight.lock().unwrap().is_empty()).await;
        let entry = c.entries().into_iter().find(|e| e.id == n.id()).expect("the partial download is indexed");
        assert_ne!(entry.state, EntryState::Ready);
        // And a new request starts it again and finishes from what was journaled.
        let again = c.ensure(&n, CancellationToken::new()).await.unwrap();
        assert_eq!(again.state, EntryState::Ready);
    }

    #[tokio::test]
    async fn startup_scan_finishes_evictions_and_drops_orphans() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("cache");
        let c = open(&root, None);
        let e = c.ensure(&model(d.path(), "m", 1 << 20), CancellationToken::new()).await.unwrap();
        let mut evicting = e.clone();
        evicting.state = EntryState::Evicting;
        c.index.put(&evicting).unwrap();
        std::fs::create_dir_all(root.join("staging/orphan/data")).unwrap();
        std::fs::write(root.join("index/.x.json.tmp-1-0"), b"partial").unwrap();
        drop(c);
        let c = open(&root, None);
        assert!(c.entries().is_empty());
        assert!(!root.join("staging/orphan").exists());
        assert!(!root.join("index/.x.json.tmp-1-0").exists());
        assert!(!c.model_dir(&e.id).exists());
    }
}
