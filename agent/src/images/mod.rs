//! Container images: prefetched through the node's containerd so the kubelet finds them
//! present, kept from the kubelet's image GC by the CRI pin label while Hearth wants them,
//! and fetched faster than a plain pull where the registry's per-connection rate is the limit
//! (`pull`). What Hearth wants is durable (`images.json` in the state dir), with why: the
//! config's `images.keep`, or a model's weights (a controller PrefetchImage), let go when the
//! model is evicted. A loop re-checks every `images.check_interval`: wanted images the
//! kubelet removed anyway (containerd 1.6 ignores the pin label) are pulled again.

pub mod cli;
pub mod hosts;
pub mod mirror;
pub mod pull;
pub use hearth_proto::image_ref as reference;
pub mod registry;
pub mod runtime;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_service::tasks::Tasks;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use self::pull::{Progress, PullError, PullSettings, Pulled, Puller};
use self::reference::Reference;
use self::registry::{Credentials, RegistryClient};
use self::runtime::{HEARTH_PIN_LABEL, PIN_LABEL, PIN_VALUE, Runtime};
use crate::cache::manager::Cache;
use crate::daemon::AgentError;
use crate::report::NodeReport;
use crate::subsystem::{Started, Status, StatusHandle, Wiring};

/// How long CRI is given to report a labelled image pinned.
const PIN_CHECK: Duration = Duration::from_secs(10);

/// containerd 1.6 before 1.6.22 (Debian 12 ships 1.6.20) has no pin label in its CRI plugin;
/// later 1.6 releases and 1.7.3+ have it (answered by CRI, not assumed from the version).
fn ignores_pin_label(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    match (parts.next().flatten(), parts.next().flatten(), parts.next().flatten()) {
        (Some(1), Some(minor), _) if minor < 6 => true,
        (Some(1), Some(6), Some(patch)) => patch < 22,
        _ => false,
    }
}

/// Why Hearth wants an image.
pub const REASON_CONFIG: &str = "config";
const MODEL_PREFIX: &str = "model:";

/// Settings from `images:`.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// None: on when the socket exists.
    pub enabled: Option<bool>,
    pub socket: PathBuf,
    pub namespace: String,
    /// Images to keep on the node (pulled at start, pinned).
    pub keep: Vec<Reference>,
    pub credentials: HashMap<String, Credentials>,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    pub pull: PullSettings,
    pub check_interval: Duration,
    /// Serve blobs to containerd's own pull (None: the content path).
    pub mirror: Option<MirrorSettings>,
    /// A model's image is let go this long after its weights left the cache (or never came).
    pub release_after: Duration,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            enabled: None,
            socket: "/run/containerd/containerd.sock".into(),
            namespace: runtime::K8S_NAMESPACE.into(),
            keep: Vec::new(),
            credentials: HashMap::new(),
            insecure: Vec::new(),
            pull: PullSettings::default(),
            check_interval: Duration::from_secs(60),
            release_after: Duration::from_secs(3600),
            mirror: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error("{image}: {source}")]
    Pull { image: String, source: PullError },
    #[error("{image}: {source}")]
    Runtime { image: String, source: runtime::RuntimeError },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// An image on the node, as reported to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    pub reference: String,
    pub digest: String,
    pub size: u64,
}

/// The durable record of what Hearth wants: reference → reason → unix seconds since when the
/// reason has had nothing to hold on to (0: it holds; a model reason whose weights are absent
/// counts from when they were last seen).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Wanted {
    images: BTreeMap<String, BTreeMap<String, u64>>,
}

type Label = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub struct ImageMetrics {
    pulls: Family<[(&'static str, &'static str); 1], Counter>,
    bytes: Family<[(&'static str, &'static str); 1], Counter>,
    duration: Family<Label, Histogram, fn() -> Histogram>,
    fallbacks: Family<[(&'static str, &'static str); 1], Counter>,
    pinned_images: Gauge,
    pinned_bytes: Gauge,
    pinning_available: Gauge,
    wanted: Gauge,
    pulling_bytes: Gauge,
    pulling_done: Gauge,
}

fn duration_buckets() -> Histogram {
    Histogram::new([1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
}

impl ImageMetrics {
    pub fn register(r: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            pulls: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(duration_buckets as fn() -> Histogram),
            fallbacks: Family::default(),
            pinned_images: Gauge::default(),
            pinned_bytes: Gauge::default(),
            pinning_available: Gauge::default(),
            wanted: Gauge::default(),
            pulling_bytes: Gauge::default(),
            pulling_done: Gauge::default(),
        };
        r.register("hearth_image_pulls", "Image pulls by outcome (fast, fallback, present, failed)", m.pulls.clone());
        r.register(
            "hearth_image_bytes",
            "Image bytes by source: registry (Hearth's ranged fetch), content_store (already there or resumed), runtime (a plain CRI pull)",
            m.bytes.clone(),
        );
        r.register_with_unit(
            "hearth_image_pull_duration",
            "Time to pull an image, by path (fast, fallback)",
            prometheus_client::registry::Unit::Seconds,
            m.duration.clone(),
        );
        r.register("hearth_image_fallbacks", "Pulls that fell back to a plain CRI pull, by reason", m.fallbacks.clone());
        r.register("hearth_image_pinned_images", "Images Hearth keeps from the kubelet's image GC", m.pinned_images.clone());
        r.register_with_unit(
            "hearth_image_pinned",
            "Bytes of the images Hearth keeps (they count against the cache budget)",
            prometheus_client::registry::Unit::Bytes,
            m.pinned_bytes.clone(),
        );
        r.register(
            "hearth_image_pinning_available",
            "1 when the runtime honours the pin label (containerd 1.7+), 0 when it ignores it, -1 not known yet",
            m.pinning_available.clone(),
        );
        m.pinning_available.set(-1);
        r.register("hearth_image_wanted_images", "Images Hearth wants on this node", m.wanted.clone());
        r.register_with_unit(
            "hearth_image_pull_total",
            "Bytes of the images being pulled now",
            prometheus_client::registry::Unit::Bytes,
            m.pulling_bytes.clone(),
        );
        r.register_with_unit(
            "hearth_image_pull_done",
            "Bytes of the images being pulled now that are in the content store",
            prometheus_client::registry::Unit::Bytes,
            m.pulling_done.clone(),
        );
        m
    }

    fn record(&self, p: &Pulled) {
        self.pulls.get_or_create(&[("outcome", p.path.as_str())]).inc();
        self.duration.get_or_create(&[("path", p.path.as_str())]).observe(p.elapsed.as_secs_f64());
        self.bytes.get_or_create(&[("source", "registry")]).inc_by(p.fetched);
        self.bytes.get_or_create(&[("source", "content_store")]).inc_by(p.reused);
        if let Some((reason, _)) = &p.fallback {
            self.fallbacks.get_or_create(&[("reason", reason)]).inc();
        }
        // What neither Hearth fetched nor the content store had: the runtime's own download.
        let runtime = p.total.saturating_sub(p.fetched + p.reused);
        if runtime > 0 {
            self.bytes.get_or_create(&[("source", "runtime")]).inc_by(runtime);
        }
    }
}

/// The image manager: pulls, pins, unpins, and keeps the report's image list.
#[derive(Debug)]
pub struct Images {
    puller: Puller,
    settings: ImageSettings,
    state_path: PathBuf,
    wanted: Mutex<Wanted>,
    /// One pull per reference at a time; a second caller waits and finds it present.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls in progress, for the metrics and `hearth status`.
    pulling: Mutex<BTreeMap<String, Arc<Progress>>>,
    metrics: ImageMetrics,
    /// None: not known yet.
    pinning: Mutex<Option<bool>>,
    report: Option<watch::Sender<NodeReport>>,
    status: Option<StatusHandle>,
    cache: Option<Arc<Cache>>,
    wake: Notify,
    version: Mutex<String>,
    /// Events on the Node: pulls done and failed, pinning unavailable.
    events: Option<crate::kube::events::NodeEvents>,
    /// Pull rate (whole image over the whole pull, unpack included) by registry: EWMA, samples.
    rates: Mutex<BTreeMap<String, (f64, u64)>>,
}

/// Weight of the newest pull in the per-registry rate.
const RATE_ALPHA: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// containerd's registry host directory (its CRI `registry.config_path`).
    pub hosts_dir: std::path::PathBuf,
    pub listen: std::net::SocketAddr,
    /// The IP containerd dials (None: the listen address).
    pub address: Option<std::net::IpAddr>,
}

impl MirrorSettings {
    /// Starts the mirror (needs a tokio runtime) after putting back any host config a previous
    /// run left.
    pub fn start(
        &self,
        registry: Arc<RegistryClient>,
        pull: &PullSettings,
        limit: Option<Arc<crate::cache::ratelimit::RateLimiter>>,
    ) -> Result<pull::MirrorSetup, String> {
        let hosts = hosts::HostsDir::new(&self.hosts_dir);
        hosts.recover().map_err(|e| format!("{}: {e}", self.hosts_dir.display()))?;
        let mirror =
            mirror::Mirror::start(self.listen, self.address, registry, pull.connections, pull.chunk, limit).map_err(|e| e.to_string())?;
        Ok(pull::MirrorSetup::new(mirror, hosts))
    }
}

/// What an ensure did.
#[derive(Debug, Clone)]
pub struct Ensured {
    pub image_id: String,
    /// None: it was already present.
    pub pulled: Option<Pulled>,
}

impl Images {
    pub fn new(
        settings: ImageSettings,
        state_dir: &std::path::Path,
        metrics: ImageMetrics,
        limit: Option<Arc<crate::cache::ratelimit::RateLimiter>>,
    ) -> Result<Self, ImageError> {
        let registry = RegistryClient::new(settings.credentials.clone(), settings.insecure.clone())
            .map_err(|e| ImageError::Pull { image: "(registry client)".into(), source: e.into() })?;
        let runtime = Runtime::new(&settings.socket, &settings.namespace, Duration::from_secs(30))
            .map_err(|e| ImageError::Runtime { image: "(runtime client)".into(), source: e })?;
        let state_path = state_dir.join("images.json");
        let wanted = match std::fs::read(&state_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(w) => w,
                // Written atomically, so only damage gets here: keep the file for a look, and
                // start from the config's list (the re-check restores the rest as it is asked).
                Err(e) => {
                    let aside = state_path.with_extension(format!(
                        "json.corrupt-{}",
                        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
                    ));
                    warn!(path = %state_path.display(), error = %e, aside = %aside.display(), "unreadable wanted-images file moved aside; starting empty");
                    std::fs::rename(&state_path, &aside)
                        .map_err(|e| ImageError::State { path: state_path.clone(), message: e.to_string() })?;
                    Wanted::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Wanted::default(),
            Err(e) => return Err(ImageError::State { path: state_path, message: e.to_string() }),
        };
        let registry = Arc::new(registry);
        let mirror = match &settings.mirror {
            Some(m) if settings.pull.fast => Some(Arc::new(
                m.start(registry.clone(), &settings.pull, limit.clone())
                    .map_err(|e| ImageError::Pull { image: "(image mirror)".into(), source: PullError::Internal(e) })?,
            )),
            _ => None,
        };
        let puller = Puller { registry, runtime, settings: settings.pull.clone(), limit, mirror };
        Ok(Self {
            puller,
            settings,
            state_path,
            wanted: Mutex::new(wanted),
            locks: Mutex::default(),
            pulling: Mutex::default(),
            metrics,
            pinning: Mutex::new(None),
            report: None,
            status: None,
            cache: None,
            wake: Notify::new(),
            version: Mutex::new(String::new()),
            events: None,
            rates: Mutex::default(),
        })
    }

    fn event(&self, e: crate::kube::events::NodeEvent) {
        if let Some(ev) = &self.events {
            ev.post(e);
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.puller.runtime
    }

    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    /// None: not known yet.
    pub fn pinning_available(&self) -> Option<bool> {
        *self.pinning.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) -> Result<(), ImageError> {
        let bytes = {
            let w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec_pretty(&*w).map_err(|e| ImageError::State { path: self.state_path.clone(), message: e.to_string() })?
        };
        hearth_service::fsutil::write_atomic(&self.state_path, &bytes, false)
            .map_err(|e| ImageError::State { path: self.state_path.clone(), message: e.to_string() })
    }

    /// Adds `reason` to why Hearth wants `r` (durably).
    pub fn want(&self, r: &Reference, reason: &str) -> Result<(), ImageError> {
        let changed = {
            let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            let reasons = w.images.entry(r.to_string()).or_default();
            reasons.insert(reason.to_owned(), 0).is_none()
        };
        if changed {
            self.persist()?;
        }
        Ok(())
    }

    pub fn wanted(&self) -> BTreeMap<String, BTreeSet<String>> {
        let w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        w.images.iter().map(|(k, v)| (k.clone(), v.keys().cloned().collect())).collect()
    }

    /// Makes `r` present (pulling it if the runtime lacks it) and, when Hearth wants it,
    /// pinned. Concurrent calls for one reference pull once.
    pub async fn ensure(&self, r: &Reference, cancel: &CancellationToken) -> Result<Ensured, ImageError> {
        let name = r.to_string();
        let lock = self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(name.clone()).or_default().clone();
        let _held = lock.lock().await;
        let rt_err = |source| ImageError::Runtime { image: name.clone(), source };
        let result = match self.puller.runtime.image_status(&name).await.map_err(rt_err)? {
            Some(img) => {
                self.metrics.pulls.get_or_create(&[("outcome", "present")]).inc();
                Ensured { image_id: img.id, pulled: None }
            }
            None => {
                let progress = Arc::new(Progress::default());
                self.pulling.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), progress.clone());
                let res = self.puller.pull(r, &progress, cancel).instrument(info_span!("image_pull", image = %name)).await;
                self.pulling.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                match res {
                    Ok(p) => {
                        self.metrics.record(&p);
                        info!(
                            image = %name, path = p.path.as_str(), seconds = p.elapsed.as_secs_f64(), fetched = p.fetched, reused = p.reused,
                            total = p.total, "image pulled"
                        );
                        if p.total > 0 && !p.elapsed.is_zero() {
                            let rate = p.total as f64 / p.elapsed.as_secs_f64();
                            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
                            let e = rates.entry(format!("oci://{}", r.registry)).or_insert((rate, 0));
                            e.0 = if e.1 == 0 { rate } else { RATE_ALPHA * rate + (1.0 - RATE_ALPHA) * e.0 };
                            e.1 += 1;
                        }
                        self.event(crate::kube::events::NodeEvent::normal(
                            "ImagePulled",
                            "PullImage",
                            format!("{name}: {} bytes in {:.1}s ({})", p.total, p.elapsed.as_secs_f64(), p.path.as_str()),
                        ));
                        Ensured { image_id: p.image_id.clone(), pulled: Some(p) }
                    }
                    Err(e) => {
                        if !matches!(e, PullError::Cancelled) {
                            self.metrics.pulls.get_or_create(&[("outcome", "failed")]).inc();
                            self.event(crate::kube::events::NodeEvent::warning("ImagePullFailed", "PullImage", format!("{name}: {e}")));
                        }
                        return Err(ImageError::Pull { image: name, source: e });
                    }
                }
            }
        };
        if self.wanted.lock().unwrap_or_else(|p| p.into_inner()).images.contains_key(&name) {
            self.pin(&name).await.map_err(rt_err)?;
        }
        self.wake.notify_one();
        Ok(result)
    }

    /// Labels every record of the image `name` (its tags, digest reference and id share one
    /// target) as pinned, except records someone else pinned already, which stay theirs.
    async fn pin(&self, name: &str) -> Result<(), runtime::RuntimeError> {
        let records = self.puller.runtime.image_records().await?;
        let Some(target) = records.iter().find(|i| i.name == name).and_then(|i| i.target.as_ref()).map(|t| t.digest.clone()) else {
            return Ok(());
        };
        let mut labelled = false;
        for rec in records.iter().filter(|i| i.target.as_ref().is_some_and(|t| t.digest == target)) {
            if !rec.labels.contains_key(PIN_LABEL) {
                self.puller.runtime.set_labels(rec, &[(PIN_LABEL, Some(PIN_VALUE)), (HEARTH_PIN_LABEL, Some("true"))]).await?;
                labelled = true;
            }
        }
        if labelled || self.pinning_available().is_none() {
            self.check_pinning(name).await;
        }
        Ok(())
    }

    /// Whether CRI now reports `name` pinned: containerd 1.6 ignores the label.
    async fn check_pinning(&self, name: &str) {
        // A containerd known to ignore the label is not waited on; any other is asked through
        // CRI, which learns of the label from containerd's events a moment after the update
        // (longer on a loaded node).
        let mut version = self.version.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if version.is_empty()
            && let Ok(v) = self.puller.runtime.version().await
        {
            version.clone_from(&v);
            *self.version.lock().unwrap_or_else(|p| p.into_inner()) = v;
        }
        let mut pinned = false;
        if !ignores_pin_label(&version) {
            let deadline = tokio::time::Instant::now() + PIN_CHECK;
            loop {
                if let Ok(Some(img)) = self.puller.runtime.image_status(name).await
                    && img.pinned
                {
                    pinned = true;
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let before = self.pinning.lock().unwrap_or_else(|p| p.into_inner()).replace(pinned);
        self.metrics.pinning_available.set(i64::from(pinned));
        if before != Some(pinned) {
            if pinned {
                info!(containerd = %version, "the runtime honours the pin label: images Hearth keeps are safe from the kubelet's image GC");
                if let Some(s) = &self.status {
                    s.set(Status::enabled(format!("containerd {version} at {}; pinning works", self.settings.socket.display())));
                }
            } else {
                self.event(crate::kube::events::NodeEvent::warning(
                    "ImagePinningUnavailable",
                    "PinImage",
                    format!("containerd {version} ignores {PIN_LABEL}: the kubelet may remove images Hearth keeps; they are pulled again"),
                ));
                warn!(
                    containerd = %version,
                    "pinning unavailable: this containerd does not report {PIN_LABEL} images as pinned (containerd 1.7 does); \
                     the kubelet may remove wanted images, and Hearth pulls them again"
                );
                if let Some(s) = &self.status {
                    s.set(Status::degraded(format!(
                        "containerd {version} at {}: pinning unavailable (it ignores {PIN_LABEL}; 1.7 honours it); removed images are pulled again",
                        self.settings.socket.display()
                    )));
                }
            }
        }
    }

    /// Removes Hearth's pin from `name`'s records, unless another wanted reference shares
    /// the image. Never touches a pin Hearth did not set.
    async fn unpin(&self, name: &str) -> Result<(), runtime::RuntimeError> {
        let records = self.puller.runtime.image_records().await?;
        let Some(target) = records.iter().find(|i| i.name == name).and_then(|i| i.target.as_ref()).map(|t| t.digest.clone()) else {
            return Ok(());
        };
        let wanted = self.wanted();
        let shared =
            records.iter().any(|i| i.name != name && wanted.contains_key(&i.name) && i.target.as_ref().is_some_and(|t| t.digest == target));
        if shared {
            return Ok(());
        }
        for rec in records.iter().filter(|i| i.target.as_ref().is_some_and(|t| t.digest == target)) {
            if rec.labels.contains_key(HEARTH_PIN_LABEL) {
                self.puller.runtime.set_labels(rec, &[(PIN_LABEL, None), (HEARTH_PIN_LABEL, None)]).await?;
            }
        }
        info!(image = name, "unpinned: Hearth no longer wants it (the kubelet's image GC may remove it)");
        Ok(())
    }

    /// Drops `reason` from every image; images left without one are unpinned.
    pub async fn release(&self, reason: &str) -> Result<(), ImageError> {
        let dropped: Vec<String> = {
            let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            let mut dropped = Vec::new();
            w.images.retain(|name, reasons| {
                reasons.remove(reason);
                if reasons.is_empty() {
                    dropped.push(name.clone());
                }
                !reasons.is_empty()
            });
            dropped
        };
        self.persist()?;
        for name in dropped {
            self.unpin(&name).await.map_err(|source| ImageError::Runtime { image: name.clone(), source })?;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Model reasons whose weights have been gone for `release_after` are dropped.
    async fn age_model_reasons(&self, now: u64) -> Result<(), ImageError> {
        let Some(cache) = &self.cache else { return Ok(()) };
        let present: BTreeSet<String> = cache.entries().into_iter().map(|e| e.id).collect();
        let mut expired = BTreeSet::new();
        {
            let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            for reasons in w.images.values_mut() {
                for (reason, since) in reasons.iter_mut() {
                    let Some(id) = reason.strip_prefix(MODEL_PREFIX) else { continue };
                    if present.contains(id) {
                        *since = 0;
                    } else if *since == 0 {
                        *since = now;
                    } else if now.saturating_sub(*since) >= self.settings.release_after.as_secs() {
                        expired.insert(reason.clone());
                    }
                }
            }
        }
        for reason in expired {
            info!(reason, "the model's weights left the cache: letting its image go");
            self.release(&reason).await?;
        }
        Ok(())
    }

    /// One pass: pull wanted images the runtime lacks, keep pins, refresh the report.
    pub async fn reconcile(&self, cancel: &CancellationToken) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Err(e) = self.age_model_reasons(now).await {
            warn!(error = %e, "could not release images of evicted models");
        }
        if let Err(e) = self.persist() {
            warn!(error = %e, "could not save the wanted images");
        }
        let wanted = self.wanted();
        for name in wanted.keys() {
            let Ok(r) = Reference::parse(name) else { continue };
            match self.puller.runtime.image_status(name).await {
                Ok(Some(_)) => {
                    if let Err(e) = self.pin(name).await {
                        warn!(image = %name, error = %e, "could not pin");
                    }
                }
                Ok(None) => {
                    info!(image = %name, "a wanted image is not on the node (removed by the kubelet's image GC?): pulling it");
                    if let Err(e) = self.ensure(&r, cancel).await {
                        warn!(image = %name, error = %e, "pull failed; retrying next check");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the runtime did not answer");
                    break;
                }
            }
        }
        self.refresh().await;
    }

    /// Reports the node's images and what the kept ones weigh.
    pub async fn refresh(&self) {
        let Ok(images) = self.puller.runtime.list_images().await else { return };
        let wanted = self.wanted();
        let (mut pinned_n, mut pinned_bytes) = (0, 0u64);
        let mut report = Vec::new();
        for img in &images {
            let digest =
                img.repo_digests.first().and_then(|d| d.split_once('@')).map(|(_, d)| d.to_owned()).unwrap_or_else(|| img.id.clone());
            if img.repo_tags.iter().chain(&img.repo_digests).any(|t| wanted.contains_key(t)) {
                pinned_n += 1;
                pinned_bytes += img.size;
            }
            for t in &img.repo_tags {
                report.push(CachedImage { reference: t.clone(), digest: digest.clone(), size: img.size });
            }
        }
        report.sort_by(|a, b| a.reference.cmp(&b.reference));
        self.metrics.pinned_images.set(pinned_n);
        self.metrics.pinned_bytes.set(pinned_bytes as i64);
        self.metrics.wanted.set(wanted.len() as i64);
        if let Some(c) = &self.cache {
            c.set_image_bytes(pinned_bytes);
        }
        let rates: Vec<crate::cache::manager::SourceBandwidth> = self
            .rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(source, (rate, samples))| crate::cache::manager::SourceBandwidth {
                source: source.clone(),
                bytes_per_second: *rate,
                samples: *samples,
            })
            .collect();
        if let Some(tx) = &self.report {
            tx.send_if_modified(|r| {
                if r.images == report && r.image_bandwidth == rates {
                    return false;
                }
                r.images = report;
                r.image_bandwidth = rates;
                true
            });
        }
    }

    fn publish_progress(&self) {
        let pulling = self.pulling.lock().unwrap_or_else(|p| p.into_inner());
        let total: u64 = pulling.values().map(|p| p.total.load(Ordering::Relaxed)).sum();
        let done: u64 = pulling.values().map(|p| p.done.load(Ordering::Relaxed)).sum();
        self.metrics.pulling_bytes.set(total as i64);
        self.metrics.pulling_done.set(done as i64);
    }

    /// A PrefetchImage from the controller: wanted for the model (when named) or until
    /// released, then pulled and pinned.
    pub async fn prefetch(&self, r: &Reference, model_id: Option<&str>, cancel: &CancellationToken) -> Result<Ensured, ImageError> {
        let reason = model_id.map_or_else(|| "controller".to_owned(), |m| format!("{MODEL_PREFIX}{m}"));
        self.want(r, &reason)?;
        let ensured = self.ensure(r, cancel).await?;
        // A model is served by one image: the catalog moved it to this one, so the image it
        // named before is no longer wanted for it (and unpinned if nothing else wants it).
        if model_id.is_some() {
            let name = r.to_string();
            let before: Vec<String> =
                self.wanted().into_iter().filter(|(n, why)| *n != name && why.contains(&reason)).map(|(n, _)| n).collect();
            for old in before {
                info!(image = %old, now = %name, "the model's image changed: letting the old one go");
                self.release_one(&old, &reason).await?;
            }
        }
        Ok(ensured)
    }
}

/// The subsystem: off without a containerd socket (saying why), else pulls what the config
/// keeps and runs the check loop.
pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    let settings = w.cfg.images.clone();
    let socket_exists = settings.socket.exists();
    match settings.enabled {
        Some(false) => return Ok(Started::new(Status::off("images.enabled: false"))),
        None if !socket_exists => {
            return Ok(Started::new(Status::off(format!(
                "no containerd socket at {} (images.containerd_socket)",
                settings.socket.display()
            ))));
        }
        _ => {}
    }
    let metrics = ImageMetrics::register(&mut w.registry);
    let limit = w.cache.as_ref().and_then(|c| c.rate_limiter());
    let mut images = Images::new(settings.clone(), &w.cfg.state_dir, metrics, limit).map_err(|e| AgentError::Images(e.to_string()))?;
    images.report = Some(w.report.clone());
    images.status = Some(w.status_handle("images"));
    images.cache = w.cache.clone();
    images.events = Some(w.events.clone());
    // The config's list is the whole set of config reasons: drop those it no longer names.
    let keep: BTreeSet<String> = settings.keep.iter().map(ToString::to_string).collect();
    let stale: Vec<String> =
        images.wanted().into_iter().filter(|(n, r)| r.contains(REASON_CONFIG) && !keep.contains(n)).map(|(n, _)| n).collect();
    for r in &settings.keep {
        images.want(r, REASON_CONFIG).map_err(|e| AgentError::Images(e.to_string()))?;
    }
    let images = Arc::new(images);
    let version = match images.runtime().version().await {
        Ok(v) => v,
        Err(e) if settings.enabled == Some(true) => {
            warn!(error = %e, "containerd does not answer yet; images are pulled once it does");
            String::from("(not answering)")
        }
        Err(e) => return Ok(Started::new(Status::off(format!("containerd at {} does not answer: {e}", settings.socket.display())))),
    };
    *images.version.lock().unwrap_or_else(|p| p.into_inner()) = version.clone();
    w.commands.set_images(images.clone());
    let cancel = tasks.cancel_token().clone();
    {
        let images = images.clone();
        let cancel = cancel.clone();
        tasks.spawn(
            "check",
            async move {
                for name in stale {
                    if let Err(e) = images.release_one(&name, REASON_CONFIG).await {
                        warn!(image = %name, error = %e, "could not let go of an image the config no longer keeps");
                    }
                }
                loop {
                    images.reconcile(&cancel).await;
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(images.settings.check_interval) => {}
                        () = images.wake.notified() => {}
                    }
                }
            }
            .instrument(info_span!("images")),
        );
    }
    {
        let images = images.clone();
        tasks.spawn("progress", async move {
            loop {
                images.publish_progress();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    Ok(Started::new(Status::enabled(format!("containerd {version} at {}", settings.socket.display())))
        .with_capabilities(&["prefetch_image"]))
}

impl Images {
    /// Drops one reason from one image; unpins it when none is left.
    pub async fn release_one(&self, name: &str, reason: &str) -> Result<(), ImageError> {
        let empty = {
            let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            let empty = w.images.get_mut(name).is_some_and(|r| {
                r.remove(reason);
                r.is_empty()
            });
            if empty {
                w.images.remove(name);
            }
            empty
        };
        self.persist()?;
        if empty {
            self.unpin(name).await.map_err(|source| ImageError::Runtime { image: name.to_owned(), source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A runtime: the containerd client's lazy channel needs one.
    #[tokio::test]
    async fn a_damaged_wanted_file_is_moved_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("images.json"), "{not json").unwrap();
        let metrics = ImageMetrics::register(&mut prometheus_client::registry::Registry::default());
        let images = Images::new(ImageSettings::default(), dir.path(), metrics, None).unwrap();
        assert!(images.wanted().is_empty());
        let kept: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        assert!(kept.iter().any(|n| n.starts_with("images.json.corrupt-")), "{kept:?}");
        let r = Reference::parse("vllm:v1").unwrap();
        images.want(&r, REASON_CONFIG).unwrap();
        assert!(std::fs::read_to_string(dir.path().join("images.json")).unwrap().contains("docker.io/library/vllm:v1"));
    }

    #[test]
    fn containerd_versions_without_the_pin_label() {
        assert!(ignores_pin_label("1.6.20~ds1"), "Debian 12");
        assert!(ignores_pin_label("v1.5.11"));
        assert!(!ignores_pin_label("1.6.25"));
        assert!(!ignores_pin_label("1.7.24~ds1"));
        assert!(!ignores_pin_label("v2.0.4"));
        assert!(!ignores_pin_label("(not answering)"), "unknown: ask CRI");
    }
}
