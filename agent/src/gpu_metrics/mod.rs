//! GPU metrics: a collector thread that sweeps every GPU through a `GpuBackend` on its own
//! interval, and an exporter that renders the latest sweep in dcgm-exporter's exact names
//! and labels (`render`) plus Hearth's own collection health (a prometheus-client
//! collector). A scrape only clones an `Arc` of the last sweep; it never waits on NVML.
//!
//! One GPU's failing call never stops the sweep: failures are counted by GPU and call, the
//! first of a run is logged, and the other fields and GPUs are exported as usual.

pub mod render;
mod subsystem;

pub use subsystem::start;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use tracing::{info, warn};

use crate::device::gpu::{Call, DriverInfo, GpuBackend, GpuReading, GpuSample, GpuStatic, health_of};
use crate::device::{GpuDetail, Health};
use crate::kube::podres::Attribution;

/// Non-fatal XIDs count against health for this long; fatal ones until the agent restarts
/// (a GPU that needs a reset comes back with a driver reload, which restarts us).
const XID_MEMORY: Duration = Duration::from_secs(600);

/// One GPU as of the last sweep.
#[derive(Debug, Clone)]
pub struct GpuState {
    pub info: GpuStatic,
    pub reading: GpuReading,
    /// Last XID seen on this GPU (code, MIG GPU instance).
    pub last_xid: Option<(u64, Option<u32>)>,
    pub health: Health,
    pub health_reason: String,
    /// Whether the last sweep reached the GPU at all.
    pub reachable: bool,
}

/// Everything a scrape or a report needs, replaced whole after each sweep.
#[derive(Debug, Clone, Default)]
pub struct GpuView {
    pub backend: &'static str,
    pub driver: DriverInfo,
    pub gpus: Vec<GpuState>,
    pub sweeps: u64,
    pub last_sweep: Duration,
    /// When the sweep finished: a hung driver call shows as a growing age, not stale values
    /// passed off as fresh.
    pub finished: Option<Instant>,
}

impl GpuView {
    /// Inventory details for the snapshot, per GPU UUID.
    pub fn details(&self) -> Vec<(String, GpuDetail, Health, String)> {
        self.gpus
            .iter()
            .map(|g| {
                let r = &g.reading;
                let d = GpuDetail {
                    driver_version: self.driver.driver_version.clone(),
                    cuda_version: self.driver.cuda_version.clone(),
                    mig_current: r.mig_current.unwrap_or(false),
                    mig_pending: r.mig_pending.unwrap_or(false),
                    mig_devices: r.migs.iter().map(|m| m.device.clone()).collect(),
                    processes: r.processes.clone(),
                    remapped_rows_correctable: r.remapped_correctable.unwrap_or(0),
                    remapped_rows_uncorrectable: r.remapped_uncorrectable.unwrap_or(0),
                    row_remap_pending: r.remap_pending.unwrap_or(false),
                    retired_pages: r.retired_pages.unwrap_or(0),
                    last_xid: g.last_xid.map(|x| x.0).unwrap_or(0),
                };
                (g.info.uuid.clone(), d, g.health, g.health_reason.clone())
            })
            .collect()
    }
}

/// State shared by the collector thread, the scrape path and the attribution refresher.
#[derive(Debug)]
pub struct GpuMetrics {
    view: Mutex<Arc<GpuView>>,
    /// Pod labels per device, rendered when the attribution changes.
    attribution: Mutex<Arc<render::PodLabelSets>>,
    host: render::HostLabel,
    failures: Mutex<BTreeMap<(u32, Call), u64>>,
    xids: Mutex<BTreeMap<(u32, u64), u64>>,
    panics: AtomicU64,
}

impl GpuMetrics {
    pub fn new(host: render::HostLabel) -> Arc<Self> {
        Arc::new(Self {
            view: Mutex::default(),
            attribution: Mutex::default(),
            host,
            failures: Mutex::default(),
            xids: Mutex::default(),
            panics: AtomicU64::new(0),
        })
    }

    pub fn view(&self) -> Arc<GpuView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_view(&self, v: GpuView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    pub fn attribution(&self) -> Arc<render::PodLabelSets> {
        self.attribution.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_attribution(&self, a: Arc<Attribution>) {
        let labels = Arc::new(render::PodLabelSets::new(&a));
        *self.attribution.lock().unwrap_or_else(|p| p.into_inner()) = labels;
    }

    /// Failure counts so far, by (GPU, call).
    pub fn failures(&self) -> BTreeMap<(u32, Call), u64> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Renders the dcgm-exporter families; registered with the HTTP server.
impl hearth_service::http::TextMetrics for GpuMetrics {
    fn render(&self, out: &mut String, openmetrics: bool) {
        render::render(&self.view(), &self.attribution(), &self.host, openmetrics, out);
    }
}

/// Hearth's own collection health, in the registry beside the other `hearth_` metrics.
#[derive(Debug)]
pub struct CollectionMetrics(pub Arc<GpuMetrics>);

impl Collector for CollectionMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let v = m.view();
        ConstCounter::new(v.sweeps).encode(enc.encode_descriptor(
            "hearth_gpu_collection_sweeps",
            "GPU collection sweeps completed",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(v.last_sweep.as_secs_f64()).encode(enc.encode_descriptor(
            "hearth_gpu_collection_last_sweep",
            "Duration of the last sweep over all GPUs",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        if let Some(at) = v.finished {
            ConstGauge::new(at.elapsed().as_secs_f64()).encode(enc.encode_descriptor(
                "hearth_gpu_collection_age",
                "Time since the last completed sweep (grows if an NVML call hangs)",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)?;
        }
        let failures = m.failures();
        let mut f =
            enc.encode_descriptor("hearth_gpu_collection_failures", "Failed NVML calls by GPU and call", None, MetricType::Counter)?;
        for ((gpu, call), n) in &failures {
            // Event-set failures belong to no one GPU.
            let g = if *gpu == u32::MAX { "all".to_owned() } else { gpu.to_string() };
            ConstCounter::new(*n).encode(f.encode_family(&[("gpu", g.as_str()), ("call", call.as_str())])?)?;
        }
        let panics = m.panics.load(Ordering::Relaxed);
        ConstCounter::new(panics).encode(enc.encode_descriptor(
            "hearth_gpu_collection_panics",
            "GPU samples abandoned after a panic in the backend",
            None,
            MetricType::Counter,
        )?)?;
        let xids = m.xids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut x = enc.encode_descriptor("hearth_gpu_xid_events", "XID events by GPU and code", None, MetricType::Counter)?;
        for ((gpu, code), n) in &xids {
            let (g, c) = (gpu.to_string(), code.to_string());
            ConstCounter::new(*n).encode(x.encode_family(&[("gpu", g.as_str()), ("xid", c.as_str())])?)?;
        }
        let mut h = enc.encode_descriptor(
            "hearth_gpu_healthy",
            "1 when the GPU is healthy, 0 when degraded or unhealthy",
            None,
            MetricType::Gauge,
        )?;
        for g in &v.gpus {
            let i = g.info.index.to_string();
            ConstGauge::new(i64::from(g.health == Health::Healthy))
                .encode(h.encode_family(&[("gpu", i.as_str()), ("UUID", g.info.uuid.as_str())])?)?;
        }
        Ok(())
    }
}

/// The collector thread. Dropping the returned sender (or sending on it) stops it after the
/// sweep in progress.
pub struct Sweeper {
    backend: Box<dyn GpuBackend>,
    metrics: Arc<GpuMetrics>,
    statics: Vec<GpuStatic>,
    driver: DriverInfo,
    recent_xids: HashMap<u32, Vec<(Instant, u64)>>,
    last_xid: HashMap<u32, (u64, Option<u32>)>,
    /// (GPU, call) pairs failing in the previous sweep, so a run of failures logs once.
    failing: Vec<(u32, Call)>,
    sweeps: u64,
}

/// The running collector thread.
#[derive(Debug)]
pub struct CollectorHandle {
    wake: mpsc::Sender<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl CollectorHandle {
    /// A function that makes the collector sweep now instead of at its next tick (after a
    /// partition change, so the snapshot shows the new MIG devices at once).
    pub fn nudger(&self) -> impl Fn() + Send + Sync + 'static {
        let wake = Mutex::new(self.wake.clone());
        move || {
            let _ = wake.lock().unwrap_or_else(|p| p.into_inner()).send(());
        }
    }

    /// Stops the thread after the sweep in progress and waits for it. Blocks.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        let _ = self.thread.join();
    }
}

/// Reads the static facts and starts the collector thread; `on_sweep` runs after every
/// sweep (the daemon copies inventory changes into the report from it).
pub fn spawn_collector(
    mut backend: Box<dyn GpuBackend>,
    metrics: Arc<GpuMetrics>,
    every: Duration,
    on_sweep: impl Fn(&GpuView) + Send + 'static,
) -> Result<CollectorHandle, crate::device::DeviceError> {
    let driver = backend.driver()?;
    let statics = backend.gpus()?;
    info!(backend = backend.name(), gpus = statics.len(), driver = %driver.driver_version, "GPU collection starting");
    let mut c = Sweeper {
        backend,
        metrics,
        statics,
        driver,
        recent_xids: HashMap::new(),
        last_xid: HashMap::new(),
        failing: Vec::new(),
        sweeps: 0,
    };
    // Publish the first sweep before returning, so the first scrape and snapshot have it.
    on_sweep(&c.sweep());
    let (wake, woken) = mpsc::channel::<()>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("gpu-collector".into())
        .spawn(move || {
            loop {
                let r = woken.recv_timeout(every);
                if stopping.load(Ordering::SeqCst) || r == Err(mpsc::RecvTimeoutError::Disconnected) {
                    return;
                }
                on_sweep(&c.sweep());
            }
        })
        .map_err(|e| crate::device::DeviceError::Unavailable { backend: "gpu-collector", reason: format!("cannot start thread: {e}") })?;
    Ok(CollectorHandle { wake, stop, thread })
}

impl Sweeper {
    /// One pass over every GPU; returns the view it published.
    pub fn sweep(&mut self) -> GpuView {
        let t0 = Instant::now();
        let now = t0;
        match self.backend.poll_xids() {
            Ok(events) => {
                let mut counts = self.metrics.xids.lock().unwrap_or_else(|p| p.into_inner());
                for e in events {
                    warn!(gpu = e.gpu, xid = e.code, gi = ?e.gi_id, msg = crate::device::gpu::xid_message(e.code), "XID error");
                    *counts.entry((e.gpu, e.code)).or_default() += 1;
                    self.recent_xids.entry(e.gpu).or_default().push((now, e.code));
                    self.last_xid.insert(e.gpu, (e.code, e.gi_id));
                }
            }
            Err(e) => self.note_failures(u32::MAX, vec![(Call::Events, e)]),
        }
        let mut gpus = Vec::with_capacity(self.statics.len());
        for s in self.statics.clone() {
            let mut sample = GpuSample::default();
            let backend = &mut self.backend;
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.sample(s.index, &mut sample))).is_ok();
            if !ok {
                self.metrics.panics.fetch_add(1, Ordering::Relaxed);
                sample = GpuSample { failed: vec![(Call::Handle, "backend panicked".into())], ..Default::default() };
            }
            let reachable = !sample.failed.iter().any(|(c, _)| *c == Call::Handle);
            self.note_failures(s.index, std::mem::take(&mut sample.failed));
            let recent = self.recent_xids.entry(s.index).or_default();
            recent.retain(|(t, code)| now.duration_since(*t) < XID_MEMORY || crate::device::gpu::is_fatal_xid(*code));
            let codes: Vec<u64> = recent.iter().map(|(_, c)| *c).collect();
            let (mut health, mut reason) = health_of(&sample.reading, &codes);
            if !reachable {
                (health, reason) = crate::device::gpu::unreachable();
            }
            let last_xid = self.last_xid.get(&s.index).copied();
            gpus.push(GpuState { info: s, reading: sample.reading, last_xid, health, health_reason: reason, reachable });
        }
        self.sweeps += 1;
        let view = GpuView {
            backend: self.backend.name(),
            driver: self.driver.clone(),
            gpus,
            sweeps: self.sweeps,
            last_sweep: t0.elapsed(),
            finished: Some(Instant::now()),
        };
        self.metrics.set_view(view.clone());
        view
    }

    fn note_failures(&mut self, gpu: u32, failed: Vec<(Call, String)>) {
        let mut counts = self.metrics.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut now_failing = Vec::new();
        for (call, e) in failed {
            *counts.entry((gpu, call)).or_default() += 1;
            if !self.failing.contains(&(gpu, call)) {
                warn!(gpu, call = call.as_str(), error = %e, "GPU metric call failing");
            }
            now_failing.push((gpu, call));
        }
        for k in self.failing.iter().filter(|k| k.0 == gpu && !now_failing.contains(k)) {
            info!(gpu, call = k.1.as_str(), "GPU metric call recovered");
        }
        self.failing.retain(|k| k.0 != gpu);
        self.failing.extend(now_failing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Inventory;
    use crate::device::gpusim::{SimFaults, SimGpus};
    use crate::device::migctl::SimMig;
    use crate::device::sim::{SimInventory, SimSpec};

    fn sim(spec: &str) -> (Sweeper, Arc<GpuMetrics>, Arc<SimFaults>, Arc<SimMig>) {
        let accs = SimInventory::new("n", &[SimSpec::parse(spec).unwrap()]).accelerators().unwrap();
        let ids: Vec<u32> = accs.iter().map(|a| a.pci_device_id).collect();
        let mig = Arc::new(SimMig::new(&ids));
        let faults = Arc::new(SimFaults::default());
        let mut backend = SimGpus::new(&accs, mig.clone(), faults.clone());
        let metrics = GpuMetrics::new(render::HostLabel::new("Hostname", "node-1"));
        let s = Sweeper {
            statics: backend.gpus().unwrap(),
            driver: backend.driver().unwrap(),
            backend: Box::new(backend),
            metrics: metrics.clone(),
            recent_xids: HashMap::new(),
            last_xid: HashMap::new(),
            failing: Vec::new(),
            sweeps: 0,
        };
        (s, metrics, faults, mig)
    }

    fn scrape(m: &GpuMetrics) -> String {
        let mut out = String::new();
        hearth_service::http::TextMetrics::render(m, &mut out, false);
        out
    }

    #[test]
    fn one_gpus_failures_are_counted_and_spare_the_others() {
        let (mut s, m, faults, _) = sim("3xH100-80GB");
        faults.fail(0, Call::Temperature);
        faults.lose(1);
        s.sweep();
        s.sweep();
        let f = m.failures();
        assert_eq!(f.get(&(0, Call::Temperature)), Some(&2));
        assert_eq!(f.get(&(1, Call::Handle)), Some(&2));
        assert_eq!(f.len(), 2, "{f:?}");
        let v = m.view();
        assert_eq!(v.sweeps, 2);
        assert!(v.gpus[0].reading.power_w.is_some() && v.gpus[0].reading.gpu_temp_c.is_none());
        assert!(!v.gpus[1].reachable);
        assert_eq!(v.gpus[1].health, Health::Unhealthy);
        assert_eq!(v.gpus[2].health, Health::Healthy);
        let text = scrape(&m);
        assert!(!text.contains("DCGM_FI_DEV_GPU_TEMP{gpu=\"0\""), "failed field exported");
        assert!(text.contains("DCGM_FI_DEV_GPU_TEMP{gpu=\"2\""));
        assert!(text.contains("DCGM_FI_DEV_POWER_USAGE{gpu=\"0\""));
        assert!(!text.contains("DCGM_FI_DEV_POWER_USAGE{gpu=\"1\""), "lost GPU exports nothing");
        faults.clear();
        s.sweep();
        assert!(m.view().gpus[1].reachable, "recovers when the GPU answers again");
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(CollectionMetrics(m.clone())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("hearth_gpu_collection_age_seconds "), "{text}");
        assert!(text.contains("hearth_gpu_collection_failures_total{gpu=\"0\",call=\"temperature\"} 2"), "{text}");
    }

    #[test]
    fn xids_set_the_gauge_count_and_health() {
        let (mut s, m, faults, _) = sim("2xH100-80GB");
        s.sweep();
        assert!(scrape(&m).contains("DCGM_FI_DEV_XID_ERRORS{gpu=\"1\""), "0 before any XID");
        faults.xid(1, None, 13);
        faults.xid(1, None, 79);
        s.sweep();
        let v = m.view();
        assert_eq!(v.gpus[1].last_xid, Some((79, None)));
        assert_eq!(v.gpus[1].health, Health::Unhealthy);
        assert_eq!(v.gpus[0].health, Health::Healthy);
        let text = scrape(&m);
        let line = text.lines().find(|l| l.starts_with("DCGM_FI_DEV_XID_ERRORS{gpu=\"1\"")).unwrap();
        assert!(line.contains("err_code=\"79\",err_msg=\"GPU has fallen off the bus\"") && line.ends_with(" 79"), "{line}");
        assert_eq!(m.xids.lock().unwrap().get(&(1, 13)), Some(&1));
        let d = v.details();
        assert_eq!(d[1].1.last_xid, 79);
    }

    /// A backend that panics on GPU 0: the sweep goes on with GPU 1.
    struct Panicky;
    impl GpuBackend for Panicky {
        fn name(&self) -> &'static str {
            "panicky"
        }
        fn driver(&self) -> Result<DriverInfo, crate::device::DeviceError> {
            Ok(DriverInfo::default())
        }
        fn gpus(&mut self) -> Result<Vec<GpuStatic>, crate::device::DeviceError> {
            Ok((0..2)
                .map(|i| GpuStatic {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    name: "x".into(),
                    pci_bus_id: String::new(),
                    pci_device_id: 0,
                    memory_bytes: 0,
                    gpm_supported: false,
                })
                .collect())
        }
        fn sample(&mut self, index: u32, out: &mut GpuSample) {
            assert!(index != 0, "driver returned garbage");
            out.reading.gpu_util = Some(42);
        }
        fn poll_xids(&mut self) -> Result<Vec<crate::device::gpu::XidEvent>, String> {
            Err("event set unavailable".into())
        }
    }

    #[test]
    fn a_panicking_backend_call_is_contained() {
        let metrics = GpuMetrics::new(render::HostLabel::new("Hostname", "n"));
        // Each published sweep is reported here, so the test waits for the collector thread's
        // own sweep rather than for a guess at how long it takes.
        let (swept, sweeps) = mpsc::channel();
        let handle = spawn_collector(Box::new(Panicky), metrics.clone(), Duration::from_millis(10), move |v| {
            let _ = swept.send(v.sweeps);
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sweeps.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a second sweep within 10 s") < 2 {}
        handle.stop();
        let v = metrics.view();
        assert!(v.sweeps >= 2);
        assert_eq!(v.gpus[1].reading.gpu_util, Some(42));
        assert!(metrics.panics.load(Ordering::Relaxed) >= 2);
        assert!(metrics.failures().contains_key(&(u32::MAX, Call::Events)));
    }
}
