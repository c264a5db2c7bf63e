//! One image pull, the fast way. Hearth resolves the reference at the registry and fetches
//! every blob the content store lacks with parallel ranged GETs. Two ways to get them into
//! containerd:
//!
//! - **mirror** (preferred): Hearth serves them to containerd's own CRI pull as a registry
//!   mirror (`mirror.rs`, `hosts.rs`), so containerd's fetcher writes them, checks their
//!   digests and unpacks as it goes. Needs containerd's `registry.config_path`.
//! - **content**: Hearth writes them in order through containerd's content writer (which
//!   checks size and digest at commit), then CRI PullImage unpacks with everything local. A
//!   resumed pull continues each unfinished write where the content store says it stands.
//!   Costs containerd about three times the CPU per byte of its own fetcher (measured).
//!
//! Anything off (ranges refused, a manifest we cannot read, a digest that does not match
//! twice) falls back to a plain CRI pull, counted and logged.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hearth_proto::cri;
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::hosts::HostsDir;
use super::mirror::{Mirror, Share};
use super::reference::Reference;
use super::registry::{Descriptor, RegistryClient, RegistryError, Resolved};
use super::runtime::{BlobWriter, Runtime, RuntimeError};
use crate::cache::ratelimit::RateLimiter;

/// Prefix of Hearth's content-store write refs (containerd's own use `layer-sha256:…`).
pub const REF_PREFIX: &str = "hearth-";
/// A lease outlives a crashed agent by this much; then containerd collects what it held.
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
const CHUNK_ATTEMPTS: u32 = 4;
/// Longest wait for the next bytes of a chunk.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PullSettings {
    /// Connections to the registry for one pull, over all its layers.
    pub connections: usize,
    /// Bytes per ranged GET.
    pub chunk: u64,
    /// Try the ranged path at all (off: every pull is a plain CRI pull).
    pub fast: bool,
    /// Fast attempts before falling back (a containerd restart costs one).
    pub attempts: u32,
    /// How long to wait for containerd to come back mid-pull.
    pub runtime_wait: Duration,
    /// A registry that serves one connection faster than this (bytes/s, probed on the first
    /// chunk of the largest layer) is not what limits the pull: containerd pulls it directly,
    /// which costs the node less than any fast path. 0: never.
    pub direct_above: u64,
}

impl Default for PullSettings {
    fn default() -> Self {
        Self { connections: 16, chunk: 8 << 20, fast: true, attempts: 3, runtime_wait: Duration::from_secs(60), direct_above: DIRECT_ABOVE }
    }
}

/// Object-storage registries (ECR) give one connection 85-90 MB/s; a registry that gives
/// more than twice that is local or a pull-through cache, and containerd's three
/// connections already bring more than a node writes and unpacks.
pub const DIRECT_ABOVE: u64 = 200_000_000;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("layer {digest}: the content store refused it at commit ({message}); the partial write was dropped")]
    Verify { digest: String, message: String },
    #[error("containerd's filesystem is full ({0}); what this pull wrote was dropped to give the space back")]
    DiskFull(String),
    #[error("the registry serves one connection at {} MB/s (above images.direct_above): containerd pulls it directly", (*.0 / 1e6).round())]
    FastRegistry(f64),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
}

impl PullError {
    /// Metric label for why the fast path gave up.
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::Registry(RegistryError::RangeRefused { .. }) => "range_refused",
            PullError::Registry(RegistryError::Auth { .. }) => "auth",
            PullError::Registry(RegistryError::Manifest { .. }) => "manifest",
            PullError::Registry(_) => "registry",
            PullError::Runtime(e) if e.is_unavailable() => "runtime_unavailable",
            PullError::Runtime(_) => "runtime",
            PullError::Verify { .. } => "digest_mismatch",
            PullError::DiskFull(_) => "disk_full",
            PullError::FastRegistry(_) => "fast_registry",
            PullError::Cancelled => "cancelled",
            PullError::Internal(_) => "internal",
        }
    }
}

/// Live progress of one pull, read by the CLI's bar and the daemon's metrics.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    /// Bytes in the content store for this image (fetched now or already there).
    pub done: AtomicU64,
    pub layers_total: AtomicU64,
    pub layers_done: AtomicU64,
    /// 0 resolving, 1 downloading, 2 unpacking, 3 done.
    pub phase: AtomicU64,
}

impl Progress {
    pub fn phase_name(&self) -> &'static str {
        match self.phase.load(Ordering::Relaxed) {
            0 => "resolving",
            1 => "downloading",
            2 => "unpacking",
            _ => "done",
        }
    }
}

/// How a pull ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Hearth fetched the blobs and served them to containerd's CRI pull.
    Mirror,
    /// Hearth fetched the blobs into the content store; the runtime unpacked.
    Content,
    /// The runtime fetched some or all of it itself (the fast path is off or gave up).
    Fallback,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Mirror => "mirror",
            Path::Content => "content",
            Path::Fallback => "fallback",
        }
    }

    /// Hearth fetched every blob.
    pub fn is_fast(self) -> bool {
        self != Path::Fallback
    }
}

/// The mirror and the registry host directory it is announced in.
#[derive(Debug)]
pub struct MirrorSetup {
    pub mirror: Mirror,
    pub hosts: HostsDir,
    /// Said once: the runtime does not read `hosts`.
    warned: std::sync::atomic::AtomicBool,
}

impl MirrorSetup {
    pub fn new(mirror: Mirror, hosts: HostsDir) -> Self {
        Self { mirror, hosts, warned: Default::default() }
    }
}

/// What a fast attempt did.
struct FastOk {
    image_id: String,
    path: Path,
    fallback: Option<(&'static str, String)>,
    fetched: u64,
    reused: u64,
    total: u64,
}

#[derive(Debug, Clone)]
pub struct Pulled {
    /// CRI's image id (`sha256:` of the config).
    pub image_id: String,
    pub path: Path,
    /// Why the fast path gave up, when it did.
    pub fallback: Option<(&'static str, String)>,
    /// Bytes Hearth fetched from the registry / found in the content store already.
    pub fetched: u64,
    pub reused: u64,
    pub total: u64,
    pub elapsed: Duration,
}

/// Pulls images into one containerd.
#[derive(Debug, Clone)]
pub struct Puller {
    pub registry: Arc<RegistryClient>,
    pub runtime: Runtime,
    pub settings: PullSettings,
    /// The node's download budget, shared with the weight cache.
    pub limit: Option<Arc<RateLimiter>>,
    /// Serve blobs to containerd's own pull (the mirror path); None: the content path.
    pub mirror: Option<Arc<MirrorSetup>>,
}

impl Puller {
    fn auth(&self, r: &Reference) -> Option<cri::AuthConfig> {
        self.registry.credentials(r).map(|c| cri::AuthConfig {
            username: c.username.clone(),
            password: c.password.clone(),
            // Left empty: containerd parses it as a URL and compares its host with the
            // registry's, and a bare `host:port` does not parse. These credentials are the
            // image's own registry's anyway.
            ..Default::default()
        })
    }

    /// Pulls `r` (fast path first, then a plain CRI pull) and returns CRI's image id.
    pub async fn pull(&self, r: &Reference, progress: &Arc<Progress>, cancel: &CancellationToken) -> Result<Pulled, PullError> {
        let started = Instant::now();
        let mut fallback = None;
        if self.settings.fast {
            let mirror = self.usable_mirror().await;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let fast = tokio::select! {
                    r = async {
                        match mirror {
                            Some(m) => self.mirrored(r, progress, m).await,
                            None => self.fast(r, progress).await,
                        }
                    } => r,
                    () = cancel.cancelled() => Err(PullError::Cancelled),
                };
                match fast {
                    Ok(f) => {
                        return Ok(Pulled {
                            image_id: f.image_id,
                            path: f.path,
                            fallback: f.fallback,
                            fetched: f.fetched,
                            reused: f.reused,
                            total: f.total,
                            elapsed: started.elapsed(),
                        });
                    }
                    Err(PullError::Cancelled) => return Err(PullError::Cancelled),
                    // A plain pull needs the same space: report it rather than fill the disk again.
                    Err(PullError::Runtime(e)) if e.is_disk_full() => return Err(self.give_space_back(r, e).await),
                    Err(e) if matches!(&e, PullError::Runtime(re) if re.is_unavailable()) && attempt < self.settings.attempts => {
                        warn!(image = %r, error = %e, attempt, "containerd unavailable mid-pull; waiting for it, then resuming");
                        self.wait_for_runtime(cancel).await?;
                    }
                    Err(e @ PullError::Verify { .. }) if attempt < self.settings.attempts => {
                        warn!(image = %r, error = %e, attempt, "a layer failed verification; fetching it again");
                    }
                    Err(e @ PullError::FastRegistry(_)) => {
                        info!(image = %r, reason = %e, "plain CRI pull");
                        fallback = Some((e.reason(), e.to_string()));
                        break;
                    }
                    Err(e) => {
                        warn!(image = %r, error = %e, reason = e.reason(), "fast pull gave up; falling back to a plain CRI pull");
                        fallback = Some((e.reason(), e.to_string()));
                        break;
                    }
                }
            }
        }
        progress.phase.store(2, Ordering::Relaxed);
        let name = r.to_string();
        let image_id = tokio::select! {
            r = self.runtime.pull(&name, self.auth(r)) => match r {
                Ok(id) => id,
                Err(e) => return Err(self.refused_at_commit(e).await),
            },
            () = cancel.cancelled() => return Err(PullError::Cancelled),
        };
        progress.phase.store(3, Ordering::Relaxed);
        let total = progress.total.load(Ordering::Relaxed);
        Ok(Pulled { image_id, path: Path::Fallback, fallback, fetched: 0, reused: 0, total, elapsed: started.elapsed() })
    }

    /// After ENOSPC: drops Hearth's unfinished writes (every pull's: on a full disk they all
    /// fail) and this pull's lease, with a synchronous garbage collection, so the blobs only
    /// it held stop taking space. The next attempt starts over; a full disk is no place to
    /// keep partial downloads.
    async fn give_space_back(&self, r: &Reference, e: RuntimeError) -> PullError {
        warn!(image = %r, error = %e, "containerd's disk is full: dropping what this pull wrote");
        if let Ok(ingests) = self.runtime.ingests(REF_PREFIX).await {
            for (reference, _) in ingests {
                if let Err(a) = self.runtime.abort(&reference).await {
                    warn!(reference, error = %a, "could not drop an unfinished write");
                }
            }
        }
        if let Ok(resolved) = self.registry.resolve(r, &super::registry::host_platform()).await {
            // The mirror path's writes are containerd's own (`layer-sha256:…`).
            let digests: Vec<&str> = resolved.layers.iter().chain([&resolved.config]).map(|d| d.digest.as_str()).collect();
            self.abort_ingests_of(&digests).await;
            let lease = lease_id(resolved.top_digest());
            if let Err(d) = self.runtime.drop_lease(&lease, true).await {
                warn!(lease, error = %d, "could not drop the pull's lease");
            }
        }
        PullError::DiskFull(e.to_string())
    }

    /// A CRI pull's error; when containerd refused a blob at commit (its digest did not
    /// match), drops the bytes it kept so that no later pull resumes from them.
    async fn refused_at_commit(&self, e: RuntimeError) -> PullError {
        let message = e.to_string();
        let Some(digest) = commit_refused(&message) else { return e.into() };
        self.abort_ingests_of(&[digest]).await;
        PullError::Verify { digest: digest.to_owned(), message }
    }

    /// Drops unfinished writes of these blobs, whoever started them. containerd holds a write
    /// locked for a moment after a failed pull returns, and refuses to drop it meanwhile: tried
    /// again for up to 3 s.
    async fn abort_ingests_of(&self, digests: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let Ok(ingests) = self.runtime.ingests("").await else { return };
            let mine: Vec<String> = ingests.into_iter().map(|i| i.0).filter(|r| digests.iter().any(|d| r.ends_with(d))).collect();
            if mine.is_empty() {
                return;
            }
            let mut left = false;
            for reference in mine {
                if let Err(a) = self.runtime.abort(&reference).await {
                    left = true;
                    if Instant::now() >= deadline {
                        warn!(reference, error = %a, "could not drop an unfinished write");
                    }
                }
            }
            if !left || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Times one chunk of the largest layer the node lacks; `FastRegistry` when one connection
    /// brings more than `direct_above`. Only the body is timed (not the connection set-up or
    /// the token), so a cold connection errs towards the fast path.
    async fn probe(&self, r: &Reference, resolved: &Resolved) -> Result<(), PullError> {
        let chunk = self.settings.chunk.max(1 << 20);
        if self.settings.direct_above == 0 {
            return Ok(());
        }
        let Some(l) = resolved.layers.iter().filter(|l| l.size >= 2 * chunk).max_by_key(|l| l.size) else { return Ok(()) };
        if self.runtime.has_blob(&l.digest).await? {
            return Ok(());
        }
        if let Some(limit) = &self.limit {
            limit.acquire(chunk).await;
        }
        let mut body = self.registry.blob_range(r, &l.digest, 0, chunk - 1).await?;
        let t = Instant::now();
        let mut n = 0u64;
        while let Some(f) = tokio::time::timeout(IDLE, body.frame()).await.map_err(|_| PullError::Internal("probe: no bytes".into()))? {
            match f {
                Ok(f) => n += f.into_data().map_or(0, |d| d.len() as u64),
                Err(e) => return Err(RegistryError::Http { url: format!("blob {}", l.digest), message: e.to_string() }.into()),
            }
        }
        let rate = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
        debug!(image = %r, rate_mb_s = rate / 1e6, "registry probe");
        if n == chunk && rate > self.settings.direct_above as f64 {
            return Err(PullError::FastRegistry(rate));
        }
        Ok(())
    }

    /// The mirror, when containerd reads the host directory it is announced in.
    async fn usable_mirror(&self) -> Option<&MirrorSetup> {
        let m = self.mirror.as_deref()?;
        let why = match self.runtime.registry_config_path().await {
            // containerd accepts a list of directories; the first one with a registry's dir wins.
            Ok(Some(p)) if p.split(':').any(|d| std::path::Path::new(d) == m.hosts.path()) => return Some(m),
            Ok(Some(p)) => format!("containerd reads registry host configs from {p}, not {}", m.hosts.path().display()),
            Ok(None) => "containerd's CRI plugin has no registry config_path".to_owned(),
            Err(e) => format!("could not read containerd's registry config: {e}"),
        };
        if !m.warned.swap(true, Ordering::Relaxed) {
            warn!(reason = why, "image mirror not usable; pulls write through containerd's content API instead (slower)");
        }
        None
    }

    /// Both fast paths' start: the image resolved for this platform, progress reset to it,
    /// and the probe that leaves a fast registry to containerd.
    async fn resolve(&self, r: &Reference, progress: &Progress) -> Result<Resolved, PullError> {
        progress.phase.store(0, Ordering::Relaxed);
        let resolved = self.registry.resolve(r, &super::registry::host_platform()).await?;
        progress.total.store(resolved.total_bytes(), Ordering::Relaxed);
        progress.layers_total.store(resolved.layers.len() as u64, Ordering::Relaxed);
        progress.layers_done.store(0, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        progress.phase.store(1, Ordering::Relaxed);
        self.probe(r, &resolved).await?;
        Ok(resolved)
    }

    /// The mirror path; see the module's doc.
    async fn mirrored(&self, r: &Reference, progress: &Arc<Progress>, m: &MirrorSetup) -> Result<FastOk, PullError> {
        let resolved = self.resolve(r, progress).await?;
        let total = resolved.total_bytes();
        // The config is small: containerd takes it from the registry with the manifest.
        let mut blobs = Vec::new();
        let mut reused = 0;
        for l in &resolved.layers {
            if self.runtime.has_blob(&l.digest).await? {
                reused += l.size;
                progress.layers_done.fetch_add(1, Ordering::Relaxed);
            } else {
                blobs.push((l.digest.clone(), l.size, true));
            }
        }
        progress.done.fetch_add(reused + resolved.config.size, Ordering::Relaxed);
        let share = Share::new(progress.clone());
        let _offers = m.mirror.offer(r, &blobs, &share);
        // containerd's pull under Hearth's lease keeps its partial layers after a failure, a
        // containerd restart or Hearth's own end (its own lease would go, and they with it).
        let lease = lease_id(resolved.top_digest());
        self.runtime.lease(&lease, LEASE_EXPIRY).await?;
        let (registry, server, root) = (r.registry.clone(), self.registry.server_url(r), m.mirror.root().to_owned());
        let held =
            m.hosts.hold(&registry, &server, &root).map_err(|e| PullError::Internal(format!("{}: {e}", m.hosts.path().display())))?;
        let pulled = self.runtime.pull_leased(&r.to_string(), self.auth(r), Some(&lease)).await;
        drop(held);
        let image_id = match pulled {
            Ok(id) => id,
            Err(e) => return Err(self.refused_at_commit(e).await),
        };
        progress.phase.store(3, Ordering::Relaxed);
        if let Err(e) = self.runtime.drop_lease(&lease, false).await {
            debug!(lease, error = %e, "could not drop the pull's lease");
        }
        let fetched = share.served.load(Ordering::Relaxed);
        reused += share.resumed.load(Ordering::Relaxed);
        let fallback = share.fallback();
        let path = if fallback.is_some() { Path::Fallback } else { Path::Mirror };
        Ok(FastOk { image_id, path, fallback, fetched, reused, total })
    }

    async fn wait_for_runtime(&self, cancel: &CancellationToken) -> Result<(), PullError> {
        let deadline = Instant::now() + self.settings.runtime_wait;
        loop {
            if self.runtime.version().await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PullError::Runtime(RuntimeError::Timeout { call: "Version", timeout: self.settings.runtime_wait }));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = cancel.cancelled() => return Err(PullError::Cancelled),
            }
        }
    }

    /// The content path; see the module's doc.
    async fn fast(&self, r: &Reference, progress: &Arc<Progress>) -> Result<FastOk, PullError> {
        let resolved = self.resolve(r, progress).await?;
        let total = resolved.total_bytes();
        let lease = lease_id(resolved.top_digest());
        self.runtime.lease(&lease, LEASE_EXPIRY).await?;

        // The documents: small, fetched whole (the config) or already in hand.
        let config =
            if self.runtime.has_blob(&resolved.config.digest).await? { None } else { Some(self.registry.blob(r, &resolved.config).await?) };
        let mut docs: Vec<(&Descriptor, Bytes)> = Vec::new();
        let index_desc = resolved.index.as_ref().map(|i| i.descriptor());
        let manifest_desc = resolved.manifest.descriptor();
        if let (Some(d), Some(i)) = (&index_desc, &resolved.index) {
            docs.push((d, i.bytes.clone()));
        }
        docs.push((&manifest_desc, resolved.manifest.bytes.clone()));
        if let Some(c) = config {
            docs.push((&resolved.config, c));
        }
        for (d, bytes) in docs {
            if self.runtime.has_blob(&d.digest).await? {
                continue;
            }
            let mut w = self.runtime.open_write(&write_ref(&d.digest), &lease, &d.digest, d.size).await?;
            if w.offset() != 0 {
                // A document is written whole: start over.
                drop(w);
                self.runtime.abort(&write_ref(&d.digest)).await?;
                w = self.runtime.open_write(&write_ref(&d.digest), &lease, &d.digest, d.size).await?;
            }
            w.write(bytes).await?;
            self.commit(w, &d.digest).await?;
        }
        progress.done.fetch_add(resolved.config.size, Ordering::Relaxed);

        let (fetched, reused) = self.layers(r, &resolved, &lease, progress).await?;
        progress.phase.store(2, Ordering::Relaxed);
        let image_id = self.runtime.pull(&r.to_string(), self.auth(r)).await?;
        progress.phase.store(3, Ordering::Relaxed);
        if let Err(e) = self.runtime.drop_lease(&lease, false).await {
            // It expires on its own; the image now holds its content.
            debug!(lease, error = %e, "could not drop the pull's lease");
        }
        Ok(FastOk { image_id, path: Path::Content, fallback: None, fetched, reused, total })
    }

    async fn commit(&self, w: BlobWriter, digest: &str) -> Result<(), PullError> {
        let reference = w.reference().to_owned();
        match w.commit().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.code(), Some(tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument)) => {
                // Never leave bytes that failed verification behind to be resumed.
                if let Err(a) = self.runtime.abort(&reference).await {
                    warn!(reference, error = %a, "could not drop a write that failed verification");
                }
                Err(PullError::Verify { digest: digest.to_owned(), message: e.to_string() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Fetches every missing layer; returns (bytes fetched now, bytes already there).
    async fn layers(&self, r: &Reference, resolved: &Resolved, lease: &str, progress: &Arc<Progress>) -> Result<(u64, u64), PullError> {
        let mut reused = 0;
        let mut writers = Vec::new();
        for (i, l) in resolved.layers.iter().enumerate() {
            if self.runtime.has_blob(&l.digest).await? {
                reused += l.size;
                progress.done.fetch_add(l.size, Ordering::Relaxed);
                progress.layers_done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let w = self.runtime.open_write(&write_ref(&l.digest), lease, &l.digest, l.size).await?;
            let from = if w.offset() > l.size { 0 } else { w.offset() };
            if from > 0 {
                info!(image = %r, layer = %l.digest, from, size = l.size, "resuming a layer from the content store's copy");
            }
            reused += from;
            progress.done.fetch_add(from, Ordering::Relaxed);
            writers.push((i, w, from));
        }
        if writers.is_empty() {
            return Ok((0, reused));
        }
        // Every chunk of every missing layer, in layer order; a chunk holds a permit from
        // before its GET until its bytes are in the content store, which bounds memory to
        // 2 x connections chunks. Jobs are handed out in order, so the next chunk a writer
        // waits for always holds a permit: no wait can close a cycle.
        let chunk = self.settings.chunk.max(1 << 20);
        // Chunks of all layers interleaved (each layer's own in order): the layers' writes
        // then run side by side, and containerd digests them on as many threads.
        let mut per_layer: Vec<VecDeque<Job>> = Vec::new();
        let mut jobs = VecDeque::new();
        let mut senders = BTreeMap::new();
        let mut set: JoinSet<Result<u64, PullError>> = JoinSet::new();
        for (i, w, from) in writers {
            let l = &resolved.layers[i];
            let mut s = from;
            let mut mine = VecDeque::new();
            while s < l.size {
                let e = (s + chunk).min(l.size);
                mine.push_back(Job { layer: i, digest: l.digest.clone(), start: s, end: e });
                s = e;
            }
            per_layer.push(mine);
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(i, tx);
            let runtime = self.runtime.clone();
            let (progress, digest) = (progress.clone(), l.digest.clone());
            set.spawn(write_layer(runtime, w, rx, digest, progress));
        }
        while per_layer.iter().any(|q| !q.is_empty()) {
            for q in &mut per_layer {
                if let Some(j) = q.pop_front() {
                    jobs.push_back(j);
                }
            }
        }
        let conns = self.settings.connections.max(1).min(jobs.len());
        let permits = Arc::new(Semaphore::new(conns * 2));
        let jobs = Arc::new(Mutex::new(jobs));
        let senders = Arc::new(senders);
        let fetched = Arc::new(AtomicU64::new(0));
        for _ in 0..conns {
            let (jobs, permits, senders, fetched) = (jobs.clone(), permits.clone(), senders.clone(), fetched.clone());
            let (registry, r, limit) = (self.registry.clone(), r.clone(), self.limit.clone());
            set.spawn(async move {
                loop {
                    let permit = permits.clone().acquire_owned().await.map_err(|_| PullError::Internal("permits closed".into()))?;
                    let Some(job) = jobs.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { return Ok(0) };
                    if let Some(l) = &limit {
                        l.acquire(job.end - job.start).await;
                    }
                    let data = fetch_chunk(&registry, &r, &job).await?;
                    fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                    // A writer that already failed has dropped its receiver; its error ends the pull.
                    let _ = senders.get(&job.layer).map(|tx| tx.send((job.start, data, permit)));
                }
            });
        }
        drop(senders);
        let mut first_err = None;
        while let Some(res) = set.join_next().await {
            let res = res.map_err(|e| PullError::Internal(format!("pull task failed: {e}")));
            if let Err(e) | Ok(Err(e)) = res
                && first_err.is_none()
            {
                first_err = Some(e);
                // One failure ends the attempt: the rest would only be resumed later.
                set.abort_all();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((fetched.load(Ordering::Relaxed), reused)),
        }
    }
}

/// The blob containerd refused at commit, from its error ("unexpected commit digest X,
/// expected Y: failed precondition").
fn commit_refused(message: &str) -> Option<&str> {
    let rest = &message[message.find("unexpected commit digest")?..];
    let expected = &rest[rest.find(", expected ")? + ", expected ".len()..];
    let d = expected.get(..71)?;
    (d.starts_with("sha256:") && d[7..].bytes().all(|b| b.is_ascii_hexdigit())).then_some(d)
}

/// One lease per image (by the digest its reference points at), so a resumed pull finds it.
fn lease_id(top_digest: &str) -> String {
    format!("{REF_PREFIX}pull-{}", top_digest.get(7..23).unwrap_or(top_digest))
}

fn write_ref(digest: &str) -> String {
    format!("{REF_PREFIX}{digest}")
}

#[derive(Debug)]
pub(super) struct Job {
    pub(super) layer: usize,
    pub(super) digest: String,
    pub(super) start: u64,
    pub(super) end: u64,
}

/// One chunk, whole, with retries on transient failures.
pub(super) async fn fetch_chunk(registry: &RegistryClient, r: &Reference, job: &Job) -> Result<Bytes, PullError> {
    let want = (job.end - job.start) as usize;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let res: Result<Bytes, RegistryError> = async {
            let mut body = registry.blob_range(r, &job.digest, job.start, job.end - 1).await?;
            let mut buf = BytesMut::with_capacity(want);
            let url = || format!("blob {} bytes {}-{}", job.digest, job.start, job.end - 1);
            loop {
                let frame = tokio::time::timeout(IDLE, body.frame())
                    .await
                    .map_err(|_| RegistryError::Http { url: url(), message: format!("no bytes for {IDLE:?}") })?;
                match frame {
                    None => break,
                    Some(Err(e)) => return Err(RegistryError::Http { url: url(), message: e.to_string() }),
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            if buf.len() + d.len() > want {
                                return Err(RegistryError::Http { url: url(), message: "more bytes than asked for".into() });
                            }
                            buf.extend_from_slice(&d);
                        }
                    }
                }
            }
            if buf.len() != want {
                return Err(RegistryError::Http { url: url(), message: format!("{} of {want} bytes arrived", buf.len()) });
            }
            Ok(buf.freeze())
        }
        .await;
        match res {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && attempt < CHUNK_ATTEMPTS => {
                debug!(error = %e, attempt, "chunk failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt)) + Duration::from_millis(fastrand::u64(0..100))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

type Chunk = (u64, Bytes, tokio::sync::OwnedSemaphorePermit);

/// Writes one layer's chunks in order as they arrive, then commits it.
async fn write_layer(
    runtime: Runtime,
    mut w: BlobWriter,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    digest: String,
    progress: Arc<Progress>,
) -> Result<u64, PullError> {
    let mut waiting: BTreeMap<u64, (Bytes, tokio::sync::OwnedSemaphorePermit)> = BTreeMap::new();
    let mut written = 0;
    while w.offset() < w.size() {
        let Some((start, data, permit)) = rx.recv().await else { break };
        waiting.insert(start, (data, permit));
        while let Some((data, permit)) = waiting.remove(&w.offset()) {
            let n = data.len() as u64;
            w.write(data).await?;
            drop(permit);
            written += n;
            progress.done.fetch_add(n, Ordering::Relaxed);
        }
    }
    if w.offset() < w.size() {
        // The fetchers stopped (one failed, and its error ends the pull).
        return Err(PullError::Internal(format!("layer {digest}: chunks stopped arriving at offset {}", w.offset())));
    }
    let reference = w.reference().to_owned();
    match w.commit().await {
        Ok(()) => {}
        Err(e) if matches!(e.code(), Some(tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument)) => {
            if let Err(a) = runtime.abort(&reference).await {
                warn!(reference, error = %a, "could not drop a write that failed verification");
            }
            return Err(PullError::Verify { digest, message: e.to_string() });
        }
        Err(e) => return Err(e.into()),
    }
    progress.layers_done.fetch_add(1, Ordering::Relaxed);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_blob_is_read_from_containerds_commit_error() {
        let y = format!("sha256:{}", "b".repeat(64));
        let m = format!(
            "PullImage: failed to pull: failed commit on ref \"layer-{y}\": unexpected commit digest sha256:{}, expected {y}: failed precondition\", details: []",
            "a".repeat(64)
        );
        assert_eq!(commit_refused(&m), Some(y.as_str()));
        assert_eq!(commit_refused("no space left on device"), None);
        assert_eq!(commit_refused("unexpected commit digest x, expected sha256:short: failed"), None);
    }
}
