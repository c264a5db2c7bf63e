//! The node itself: static facts (kernel, CPUs, memory) and periodic samples (CPU use, load,
//! memory, the cache volume, network interfaces) read from procfs and statvfs. The procfs
//! root is configurable so tests read fixtures. Sampling runs on a blocking thread off the
//! scrape path; a scrape only reads the latest sample.

mod procfs;
mod subsystem;

pub use subsystem::start;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

pub use procfs::{CpuTimes, NetDev};

/// Interfaces that belong to pods or overlays; per-pod traffic comes from the eBPF layer,
/// and counting every veth here would make the label set grow with the pod count.
pub const DEFAULT_EXCLUDED_INTERFACES: &[&str] =
    &["lo", "veth*", "cali*", "cilium*", "lxc*", "docker*", "cni*", "flannel*", "kube-*", "tunl*", "vxlan*", "genev*"];

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: expected {expected}")]
    Parse { path: PathBuf, expected: &'static str },
    #[error("statvfs on cache volume {path}: {source}")]
    Statvfs { path: PathBuf, source: std::io::Error },
}

/// Facts that do not change while the agent runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub hostname: String,
    pub kernel_version: String,
    pub os_image: String,
    pub architecture: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub boot_id: String,
}

/// One reading of everything that changes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSample {
    pub cpu: CpuTimes,
    /// Over the interval since the previous sample; 0 for the first.
    pub cpu_usage_ratio: f64,
    pub load: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub cache_free_bytes: u64,
    pub interfaces: Vec<NetDev>,
}

/// Reads node facts and samples from a procfs root and the cache volume.
#[derive(Debug, Clone)]
pub struct NodeReader {
    procfs: PathBuf,
    cache_root: PathBuf,
    exclude: Vec<String>,
}

fn excluded(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

impl NodeReader {
    pub fn new(procfs: impl Into<PathBuf>, cache_root: impl Into<PathBuf>, exclude: Vec<String>) -> Self {
        Self { procfs: procfs.into(), cache_root: cache_root.into(), exclude }
    }

    fn read(&self, rel: &str) -> Result<String, NodeError> {
        let path = self.procfs.join(rel);
        std::fs::read_to_string(&path).map_err(|source| NodeError::Read { path, source })
    }

    fn parse_err(&self, rel: &str, expected: &'static str) -> NodeError {
        NodeError::Parse { path: self.procfs.join(rel), expected }
    }

    pub fn info(&self) -> Result<NodeInfo, NodeError> {
        let stat = self.read("stat")?;
        let (_, cpus) = procfs::parse_stat(&stat).ok_or_else(|| self.parse_err("stat", "a 'cpu' line"))?;
        let mem = procfs::parse_meminfo(&self.read("meminfo")?).ok_or_else(|| self.parse_err("meminfo", "MemTotal and MemAvailable"))?;
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| procfs::os_release_pretty_name(&s))
            .unwrap_or_else(|| "unknown".into());
        Ok(NodeInfo {
            hostname: self.read("sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default(),
            kernel_version: self.read("sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default(),
            os_image,
            architecture: std::env::consts::ARCH.to_owned(),
            cpu_count: cpus,
            memory_total_bytes: mem.0,
            boot_id: self.read("sys/kernel/random/boot_id").map(|s| s.trim().to_owned())?,
        })
    }

    /// Samples everything; `prev` gives the CPU times the usage ratio is measured against.
    pub fn sample(&self, prev: Option<&NodeSample>) -> Result<NodeSample, NodeError> {
        let (cpu, _) = procfs::parse_stat(&self.read("stat")?).ok_or_else(|| self.parse_err("stat", "a 'cpu' line"))?;
        let load = procfs::parse_loadavg(&self.read("loadavg")?).ok_or_else(|| self.parse_err("loadavg", "three load averages"))?;
        let (total, avail) =
            procfs::parse_meminfo(&self.read("meminfo")?).ok_or_else(|| self.parse_err("meminfo", "MemTotal and MemAvailable"))?;
        let mut interfaces = procfs::parse_net_dev(&self.read("net/dev")?).ok_or_else(|| self.parse_err("net/dev", "interface lines"))?;
        interfaces.retain(|i| !excluded(&i.name, &self.exclude));
        let (cap, free) = volume_space(&self.cache_root)?;
        Ok(NodeSample {
            cpu_usage_ratio: prev.map_or(0.0, |p| cpu.usage_since(&p.cpu)),
            cpu,
            load,
            memory_total_bytes: total,
            memory_available_bytes: avail,
            cache_capacity_bytes: cap,
            cache_free_bytes: free,
            interfaces,
        })
    }
}

/// Capacity and space available to unprivileged writers of the volume holding `path` (or
/// its nearest existing parent, so a cache directory not created yet still reports).
fn volume_space(path: &Path) -> Result<(u64, u64), NodeError> {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    let st = rustix::fs::statvfs(p).map_err(|e| NodeError::Statvfs { path: path.to_owned(), source: e.into() })?;
    Ok((st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize))
}

/// Latest sample plus collection errors, shared between the sampler and the scrape path.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    latest: Mutex<Option<NodeSample>>,
    errors: std::sync::atomic::AtomicU64,
}

impl NodeMetrics {
    pub fn register(reg: &mut prometheus_client::registry::Registry) -> Arc<Self> {
        let m = Arc::new(Self::default());
        reg.register_collector(Box::new(m.clone()));
        m
    }

    pub fn update(&self, s: NodeSample) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: V,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

impl Collector for NodeMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let errors = self.errors.load(std::sync::atomic::Ordering::Relaxed);
        ConstCounter::new(errors).encode(enc.encode_descriptor(
            "hearth_node_collect_errors",
            "Failed node samples (procfs or statvfs)",
            None,
            MetricType::Counter,
        )?)?;
        let Some(s) = self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        gauge(&mut enc, "hearth_node_cpu_usage_ratio", "CPU busy fraction over the last interval, all CPUs", None, s.cpu_usage_ratio)?;
        gauge(&mut enc, "hearth_node_load1", "1-minute load average", None, s.load[0])?;
        gauge(&mut enc, "hearth_node_load5", "5-minute load average", None, s.load[1])?;
        gauge(&mut enc, "hearth_node_load15", "15-minute load average", None, s.load[2])?;
        gauge(&mut enc, "hearth_node_memory_total", "Physical memory", Some(&Unit::Bytes), s.memory_total_bytes as i64)?;
        gauge(
            &mut enc,
            "hearth_node_memory_available",
            "Memory available for new work (MemAvailable)",
            Some(&Unit::Bytes),
            s.memory_available_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "hearth_node_cache_volume_capacity",
            "Size of the volume holding the model cache",
            Some(&Unit::Bytes),
            s.cache_capacity_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "hearth_node_cache_volume_free",
            "Space available on the model cache volume",
            Some(&Unit::Bytes),
            s.cache_free_bytes as i64,
        )?;
        // Bounded by the node's non-pod interfaces (pod veths are excluded by config).
        let mut rx =
            enc.encode_descriptor("hearth_node_network_receive", "Bytes received per interface", Some(&Unit::Bytes), MetricType::Counter)?;
        for i in &s.interfaces {
            ConstCounter::new(i.rx_bytes).encode(rx.encode_family(&[("interface", i.name.as_str())])?)?;
        }
        let mut tx =
            enc.encode_descriptor("hearth_node_network_transmit", "Bytes sent per interface", Some(&Unit::Bytes), MetricType::Counter)?;
        for i in &s.interfaces {
            ConstCounter::new(i.tx_bytes).encode(tx.encode_family(&[("interface", i.name.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        let w = |rel: &str, s: &str| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, s).expect("write");
        };
        w("stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\nintr 1\n");
        w("meminfo", "MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n");
        w("loadavg", "0.50 0.25 0.10 1/100 12345\n");
        w(
            "net/dev",
            "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  \
             eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n\
             vethabc: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n",
        );
        w("sys/kernel/hostname", "gpu-1\n");
        w("sys/kernel/osrelease", "6.1.0\n");
        w("sys/kernel/random/boot_id", "1234-abcd\n");
        d
    }

    #[test]
    fn reads_info_and_samples_from_a_fixture_root() {
        let d = fixture();
        let r = NodeReader::new(d.path(), d.path(), DEFAULT_EXCLUDED_INTERFACES.iter().map(|s| (*s).into()).collect());
        let info = r.info().expect("info");
        assert_eq!((info.cpu_count, info.memory_total_bytes), (2, 16_000_000 * 1024));
        assert_eq!((info.hostname.as_str(), info.boot_id.as_str()), ("gpu-1", "1234-abcd"));
        let s1 = r.sample(None).expect("sample");
        assert_eq!(s1.load, [0.5, 0.25, 0.1]);
        assert_eq!(s1.memory_available_bytes, 8_000_000 * 1024);
        assert_eq!(s1.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), vec!["eth0"]);
        assert_eq!((s1.interfaces[0].rx_bytes, s1.interfaces[0].tx_bytes), (1000, 2000));
        assert!(s1.cache_capacity_bytes > 0);
        // 100 more busy jiffies and 100 more idle: 50% busy over the interval.
        std::fs::write(d.path().join("stat"), "cpu  150 0 150 800 100 0 0 0 0 0\n").expect("write");
        let s2 = r.sample(Some(&s1)).expect("sample");
        assert!((s2.cpu_usage_ratio - 0.5).abs() < 1e-9, "{}", s2.cpu_usage_ratio);
    }

    #[test]
    fn missing_file_names_the_path() {
        let d = fixture();
        std::fs::remove_file(d.path().join("loadavg")).expect("rm");
        let r = NodeReader::new(d.path(), d.path(), vec![]);
        let e = r.sample(None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("reading {}/loadavg", d.path().display())), "{e}");
    }

    #[test]
    fn reads_the_real_procfs() {
        let r = NodeReader::new("/proc", "/", vec![]);
        let info = r.info().expect("this machine's /proc");
        assert!(info.cpu_count >= 1 && info.memory_total_bytes > 0);
        r.sample(None).expect("sample of this machine");
    }
}
