//! dcgm-exporter's exposition, byte for byte where dashboards look: the default counter
//! set's names, HELP text, types and units, and its labels in its order. Written by hand
//! rather than through prometheus-client because two things must not change: counter names
//! carry no `_total` suffix (dcgm-exporter's don't, and every dashboard queries them so),
//! and the label set per series is dcgm-exporter's, not ours.
//!
//! Prometheus text (0.0.4) declares the counters `counter`, as dcgm-exporter does. In
//! OpenMetrics a counter's samples must end in `_total`, so there they are declared
//! `unknown` instead: same name, same value, still valid for the parser.
//!
//! Series per GPU, and per MIG device for the memory and profiling families (labels of the
//! parent GPU plus `GPU_I_PROFILE` and `GPU_I_ID`). A device attributed to pods gets one
//! series per pod with `container`, `namespace` and `pod`; time-sliced GPUs shared by
//! several pods therefore repeat the device's value once per pod, as dcgm-exporter does.

use std::fmt::Write;

use super::{GpuState, GpuView};
use crate::device::gpu::{MigReading, ProfReading, xid_message};
use std::collections::HashMap;

use crate::kube::podres::Attribution;

/// The host label: dcgm-exporter releases up to 4.8 call it `Hostname`, later ones
/// `hostname`; an empty name leaves it out (dcgm-exporter's `--no-hostname`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLabel {
    pub name: String,
    pub value: String,
}

impl HostLabel {
    pub fn new(name: &str, value: &str) -> Self {
        Self { name: name.to_owned(), value: value.to_owned() }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

#[derive(Clone, Copy)]
enum Val {
    U(u64),
    F(f64),
}

type GpuGet = fn(&GpuState) -> Option<Val>;
type MigGet = fn(&MigReading) -> Option<Val>;

/// One family of the default counter set.
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    gpu: GpuGet,
    mig: Option<MigGet>,
}

fn u<T: Into<u64>>(v: Option<T>) -> Option<Val> {
    v.map(|v| Val::U(v.into()))
}

fn prof(p: Option<ProfReading>, f: fn(&ProfReading) -> f64) -> Option<Val> {
    p.as_ref().map(|p| Val::F(f(p)))
}

/// dcgm-exporter's default-counters.csv, in its order (the XID family is rendered apart:
/// it carries two extra labels).
const FAMILIES: &[Family] = &[
    Family {
        name: "DCGM_FI_DEV_SM_CLOCK",
        kind: Kind::Gauge,
        help: "SM clock frequency (in MHz).",
        gpu: |g| u(g.reading.sm_clock_mhz),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_MEM_CLOCK",
        kind: Kind::Gauge,
        help: "Memory clock frequency (in MHz).",
        gpu: |g| u(g.reading.mem_clock_mhz),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_MEMORY_TEMP",
        kind: Kind::Gauge,
        help: "Memory temperature (in C).",
        gpu: |g| u(g.reading.mem_temp_c),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_GPU_TEMP",
        kind: Kind::Gauge,
        help: "GPU temperature (in C).",
        gpu: |g| u(g.reading.gpu_temp_c),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_POWER_USAGE",
        kind: Kind::Gauge,
        help: "Power draw (in W).",
        gpu: |g| g.reading.power_w.map(Val::F),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        kind: Kind::Counter,
        help: "Total energy consumption since boot (in mJ).",
        gpu: |g| u(g.reading.energy_mj),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        kind: Kind::Counter,
        help: "Total number of PCIe retries.",
        gpu: |g| u(g.reading.pcie_replay),
        mig: None,
    },
    Family { name: "DCGM_FI_DEV_GPU_UTIL", kind: Kind::Gauge, help: "GPU utilization (in %).", gpu: |g| u(g.reading.gpu_util), mig: None },
    Family {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        kind: Kind::Gauge,
        help: "Memory utilization (in %).",
        gpu: |g| u(g.reading.mem_copy_util),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_ENC_UTIL",
        kind: Kind::Gauge,
        help: "Encoder utilization (in %).",
        gpu: |g| u(g.reading.enc_util),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_DEC_UTIL",
        kind: Kind::Gauge,
        help: "Decoder utilization (in %).",
        gpu: |g| u(g.reading.dec_util),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_FB_FREE",
        kind: Kind::Gauge,
        help: "Framebuffer memory free (in MiB).",
        gpu: |g| u(g.reading.fb_free_mib),
        mig: Some(|m| u(m.fb_free_mib)),
    },
    Family {
        name: "DCGM_FI_DEV_FB_USED",
        kind: Kind::Gauge,
        help: "Framebuffer memory used (in MiB).",
        gpu: |g| u(g.reading.fb_used_mib),
        mig: Some(|m| u(m.fb_used_mib)),
    },
    Family {
        name: "DCGM_FI_DEV_FB_RESERVED",
        kind: Kind::Gauge,
        help: "Framebuffer memory reserved (in MiB).",
        gpu: |g| u(g.reading.fb_reserved_mib),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        kind: Kind::Counter,
        help: "Number of remapped rows for uncorrectable errors",
        gpu: |g| u(g.reading.remapped_uncorrectable),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        kind: Kind::Counter,
        help: "Number of remapped rows for correctable errors",
        gpu: |g| u(g.reading.remapped_correctable),
        mig: None,
    },
    Family {
        name: "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        kind: Kind::Gauge,
        help: "Whether remapping of rows has failed",
        gpu: |g| g.reading.remap_failure.map(|f| Val::U(u64::from(f))),
        mig: None,
    },
    Family {
        name: "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of time the graphics engine is active.",
        gpu: |g| prof(g.reading.prof, |p| p.gr_engine_active),
        mig: Some(|m| prof(m.prof, |p| p.gr_engine_active)),
    },
    Family {
        name: "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of cycles the tensor (HMMA) pipe is active.",
        gpu: |g| prof(g.reading.prof, |p| p.tensor_active),
        mig: Some(|m| prof(m.prof, |p| p.tensor_active)),
    },
    Family {
        name: "DCGM_FI_PROF_DRAM_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of cycles the device memory interface is active sending or receiving data.",
        gpu: |g| prof(g.reading.prof, |p| p.dram_active),
        mig: Some(|m| prof(m.prof, |p| p.dram_active)),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_TX_BYTES",
        kind: Kind::Gauge,
        help: "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        gpu: |g| prof(g.reading.prof, |p| p.pcie_tx_bytes),
        mig: Some(|m| prof(m.prof, |p| p.pcie_tx_bytes)),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_RX_BYTES",
        kind: Kind::Gauge,
        help: "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        gpu: |g| prof(g.reading.prof, |p| p.pcie_rx_bytes),
        mig: Some(|m| prof(m.prof, |p| p.pcie_rx_bytes)),
    },
];

const XID_NAME: &str = "DCGM_FI_DEV_XID_ERRORS";
const XID_HELP: &str = "Value of the last XID error encountered.";

/// Every family name this module can emit, for the pin test and documentation.
pub fn family_names() -> Vec<&'static str> {
    let mut v: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
    v.push(XID_NAME);
    v
}

/// Escapes a label value for both text formats.
pub fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The labels dcgm-exporter puts on a GPU's series, in its order, up to (not including)
/// `Hostname`; MIG series insert the instance labels there.
fn gpu_labels(g: &GpuState) -> String {
    let mut s = String::with_capacity(160);
    let _ = write!(s, "gpu=\"{}\",UUID=\"", g.info.index);
    escape(&g.info.uuid, &mut s);
    s.push_str("\",pci_bus_id=\"");
    escape(&g.info.pci_bus_id, &mut s);
    let _ = write!(s, "\",device=\"nvidia{}\",modelName=\"", g.info.index);
    escape(&g.info.name, &mut s);
    s.push('"');
    s
}

/// A container's labels rendered once: `container="c"` and `namespace="n",pod="p"`, kept
/// apart because dcgm-exporter sorts extra labels by name and the XID family's `err_code`
/// and `err_msg` fall between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLabels {
    pub container: String,
    pub namespace_pod: String,
}

/// Pod label text per device UUID, rendered once per attribution refresh, not per scrape.
#[derive(Debug, Default)]
pub struct PodLabelSets(HashMap<String, Vec<PodLabels>>);

impl PodLabelSets {
    pub fn new(a: &Attribution) -> Self {
        let render = |c: &crate::kube::podres::ContainerRef| {
            let mut container = String::from("container=\"");
            escape(&c.container, &mut container);
            container.push('"');
            let mut namespace_pod = String::from("namespace=\"");
            escape(&c.pod.namespace, &mut namespace_pod);
            namespace_pod.push_str("\",pod=\"");
            escape(&c.pod.name, &mut namespace_pod);
            namespace_pod.push('"');
            PodLabels { container, namespace_pod }
        };
        Self(a.iter().map(|(id, cs)| (id.to_owned(), cs.iter().map(render).collect())).collect())
    }

    pub fn pods_of(&self, uuid: &str) -> &[PodLabels] {
        self.0.get(uuid).map_or(&[], Vec::as_slice)
    }
}

struct Series<'a> {
    /// `{...` up to the pod labels, without the closing brace.
    labels: String,
    pods: &'a [PodLabels],
}

fn header(out: &mut String, name: &str, help: &str, kind: Kind, openmetrics: bool) {
    let kind = match (kind, openmetrics) {
        (Kind::Gauge, _) => "gauge",
        (Kind::Counter, false) => "counter",
        (Kind::Counter, true) => "unknown",
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn value(out: &mut String, v: Val) {
    let _ = match v {
        Val::U(n) => write!(out, "{n}"),
        // dcgm-exporter prints doubles with six decimals.
        Val::F(f) => write!(out, "{f:.6}"),
    };
}

/// One sample per attributed pod (or one without pod labels). `extra` labels sort between
/// `container` and `namespace`, as dcgm-exporter's sorted attribute map puts them.
fn sample(out: &mut String, name: &str, s: &Series<'_>, extra: &str, v: Val) {
    let mut one = |pod: Option<&PodLabels>| {
        out.push_str(name);
        out.push('{');
        out.push_str(&s.labels);
        match pod {
            Some(p) => {
                out.push(',');
                out.push_str(&p.container);
                out.push_str(extra);
                out.push(',');
                out.push_str(&p.namespace_pod);
            }
            None => out.push_str(extra),
        }
        out.push_str("} ");
        value(out, v);
        out.push('\n');
    };
    if s.pods.is_empty() {
        one(None);
    } else {
        for p in s.pods {
            one(Some(p));
        }
    }
}

/// Appends the dcgm-exporter families for `view` to `out`.
pub fn render(view: &GpuView, attribution: &PodLabelSets, host: &HostLabel, openmetrics: bool, out: &mut String) {
    if view.gpus.is_empty() {
        return;
    }
    let mut tail = String::with_capacity(96);
    if !host.name.is_empty() {
        let _ = write!(tail, ",{}=\"", host.name);
        escape(&host.value, &mut tail);
        tail.push('"');
    }
    tail.push_str(",DCGM_FI_DRIVER_VERSION=\"");
    escape(&view.driver.driver_version, &mut tail);
    tail.push('"');

    // Series built once per render: per GPU, and per MIG device.
    let mut gpus = Vec::with_capacity(view.gpus.len());
    let mut migs: Vec<Vec<Series<'_>>> = Vec::with_capacity(view.gpus.len());
    for g in &view.gpus {
        let base = gpu_labels(g);
        // On a MIG-enabled GPU pods hold MIG devices; the parent's series stay unattributed.
        let on_mig = g.reading.mig_current == Some(true);
        let pods = if on_mig { &[][..] } else { attribution.pods_of(&g.info.uuid) };
        gpus.push(Series { labels: format!("{base}{tail}"), pods });
        migs.push(
            g.reading
                .migs
                .iter()
                .map(|m| {
                    let mut l = base.clone();
                    l.push_str(",GPU_I_PROFILE=\"");
                    escape(&m.device.profile, &mut l);
                    let _ = write!(l, "\",GPU_I_ID=\"{}\"", m.device.gi_id);
                    l.push_str(&tail);
                    Series { labels: l, pods: attribution.pods_of(&m.device.uuid) }
                })
                .collect(),
        );
    }

    for f in FAMILIES {
        // The XID family sits after the utilisation block, as in dcgm-exporter's list.
        if f.name == "DCGM_FI_DEV_FB_FREE" {
            render_xids(view, &gpus, openmetrics, out);
        }
        let any = view.gpus.iter().any(|g| (f.gpu)(g).is_some())
            || f.mig.is_some_and(|m| view.gpus.iter().any(|g| g.reading.migs.iter().any(|r| m(r).is_some())));
        if !any {
            continue;
        }
        header(out, f.name, f.help, f.kind, openmetrics);
        for (gi, g) in view.gpus.iter().enumerate() {
            if let Some(v) = (f.gpu)(g) {
                sample(out, f.name, &gpus[gi], "", v);
            }
            if let Some(get) = f.mig {
                for (mi, m) in g.reading.migs.iter().enumerate() {
                    if let Some(v) = get(m) {
                        sample(out, f.name, &migs[gi][mi], "", v);
                    }
                }
            }
        }
    }
}

/// `DCGM_FI_DEV_XID_ERRORS`: the last XID per GPU (0 before any), with `err_code` and
/// `err_msg` describing it.
fn render_xids(view: &GpuView, gpus: &[Series<'_>], openmetrics: bool, out: &mut String) {
    header(out, XID_NAME, XID_HELP, Kind::Gauge, openmetrics);
    for (g, s) in view.gpus.iter().zip(gpus) {
        let code = g.last_xid.map(|x| x.0).unwrap_or(0);
        let mut extra = format!(",err_code=\"{code}\",err_msg=\"");
        escape(if code == 0 { "No Error" } else { xid_message(code) }, &mut extra);
        extra.push('"');
        sample(out, XID_NAME, s, &extra, Val::U(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Inventory;
    use crate::device::gpu::{GpuBackend, GpuSample};
    use crate::device::gpusim::{SimFaults, SimGpus};
    use crate::device::mig;
    use crate::device::migctl::{MigControl, SimMig};
    use crate::device::sim::{SimInventory, SimSpec};
    use crate::device::{Health, gpu::DriverInfo};
    use hearth_proto::podresources::{ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources};
    use std::collections::BTreeMap;

    /// The names the issue (and dcgm-exporter's default counters) fix, with their types.
    const PINNED: &[(&str, &str)] = &[
        ("DCGM_FI_DEV_SM_CLOCK", "gauge"),
        ("DCGM_FI_DEV_MEM_CLOCK", "gauge"),
        ("DCGM_FI_DEV_MEMORY_TEMP", "gauge"),
        ("DCGM_FI_DEV_GPU_TEMP", "gauge"),
        ("DCGM_FI_DEV_POWER_USAGE", "gauge"),
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter"),
        ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter"),
        ("DCGM_FI_DEV_GPU_UTIL", "gauge"),
        ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge"),
        ("DCGM_FI_DEV_ENC_UTIL", "gauge"),
        ("DCGM_FI_DEV_DEC_UTIL", "gauge"),
        ("DCGM_FI_DEV_XID_ERRORS", "gauge"),
        ("DCGM_FI_DEV_FB_FREE", "gauge"),
        ("DCGM_FI_DEV_FB_USED", "gauge"),
        ("DCGM_FI_DEV_FB_RESERVED", "gauge"),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter"),
        ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter"),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge"),
        ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge"),
        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge"),
        ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge"),
        ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge"),
        ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge"),
    ];
    const GPU_LABELS: &[&str] = &["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"];
    const MIG_LABELS: &[&str] =
        &["gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID", "Hostname", "DCGM_FI_DRIVER_VERSION"];
    const MIG_FAMILIES: &[&str] = &[
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "DCGM_FI_PROF_PCIE_RX_BYTES",
    ];

    /// GPU 0 on MIG (3g.40gb + 1g.10gb, the 1g held by a pod), GPU 1 whole and held by a pod.
    pub(crate) fn fixture() -> (GpuView, PodLabelSets) {
        let accs = SimInventory::new("n", &[SimSpec::parse("2xH100-80GB").unwrap()]).accelerators().unwrap();
        let m = Arc::new(SimMig::new(&[0x2330_10DE, 0x2330_10DE]));
        m.set_mig_mode(0, true).unwrap();
        m.create(0, mig::by_name(mig::H100_80GB, "3g.40gb").unwrap(), 4, mig::CiSplit::FULL).unwrap();
        m.create(0, mig::by_name(mig::H100_80GB, "1g.10gb").unwrap(), 0, mig::CiSplit::FULL).unwrap();
        let mut b = SimGpus::new(&accs, m, Arc::new(SimFaults::default()));
        let statics = b.gpus().unwrap();
        let gpus: Vec<GpuState> = statics
            .into_iter()
            .map(|info| {
                let mut s = GpuSample::default();
                b.sample(info.index, &mut s);
                GpuState {
                    info,
                    reading: s.reading,
                    last_xid: None,
                    health: Health::Healthy,
                    health_reason: String::new(),
                    reachable: true,
                }
            })
            .collect();
        let one_g = gpus[0].reading.migs.iter().find(|m| m.device.profile == "1g.10gb").unwrap().device.uuid.clone();
        let pod = |name: &str, ids: Vec<String>| PodResources {
            name: name.into(),
            namespace: "ml".into(),
            containers: vec![ContainerResources {
                name: "server".into(),
                devices: vec![ContainerDevices { resource_name: "nvidia.com/gpu".into(), device_ids: ids, topology: None }],
            }],
        };
        let a = PodLabelSets::new(&Attribution::from_list(&ListPodResourcesResponse {
            pod_resources: vec![pod("small", vec![one_g]), pod("big", vec![gpus[1].info.uuid.clone()])],
        }));
        let view = GpuView {
            backend: "simulated",
            driver: DriverInfo { driver_version: "580.159.04".into(), cuda_version: "13.0".into() },
            gpus,
            sweeps: 1,
            last_sweep: Duration::ZERO,
            finished: None,
        };
        (view, a)
    }
    use super::super::GpuState;
    use std::sync::Arc;
    use std::time::Duration;

    /// Splits `NAME{k="v",...} value` into the name and the label keys in order.
    fn parse(line: &str) -> (&str, Vec<(&str, String)>) {
        let (name, rest) = line.split_once('{').unwrap();
        let body = &rest[..rest.rfind('}').unwrap()];
        let mut labels = Vec::new();
        let mut s = body;
        while !s.is_empty() {
            let (k, r) = s.split_once("=\"").unwrap();
            let mut v = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next().unwrap() {
                    (_, '\\') => match chars.next().unwrap().1 {
                        'n' => v.push('\n'),
                        c => v.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => v.push(c),
                }
            };
            labels.push((k, v));
            s = r[end + 1..].trim_start_matches(',');
        }
        (name, labels)
    }

    #[test]
    fn names_types_and_labels_are_pinned_to_dcgm_exporter() {
        let (view, a) = fixture();
        let mut out = String::new();
        render(&view, &a, &HostLabel::new("Hostname", "node-1"), false, &mut out);
        let types: BTreeMap<&str, &str> =
            out.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split_once(' ').unwrap()).collect();
        for (name, kind) in PINNED {
            assert_eq!(types.get(name), Some(kind), "{name}");
        }
        assert_eq!(types.len(), PINNED.len(), "unexpected families: {types:?}");
        assert_eq!(family_names().len(), PINNED.len());
        let mut mig_series = 0;
        let mut pod_series = 0;
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels) = parse(line);
            let keys: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
            let mut want: Vec<&str> = if keys.contains(&"GPU_I_ID") { MIG_LABELS.to_vec() } else { GPU_LABELS.to_vec() };
            if keys.contains(&"GPU_I_ID") {
                mig_series += 1;
                assert!(MIG_FAMILIES.contains(&name), "{name} has MIG series");
            }
            // Extra labels in dcgm-exporter's (sorted) order.
            let xid = name == "DCGM_FI_DEV_XID_ERRORS";
            if keys.contains(&"pod") {
                pod_series += 1;
                want.push("container");
                if xid {
                    want.extend(["err_code", "err_msg"]);
                }
                want.extend(["namespace", "pod"]);
            } else if xid {
                want.extend(["err_code", "err_msg"]);
            }
            assert_eq!(keys, want, "{line}");
            let get = |k: &str| labels.iter().find(|(l, _)| *l == k).map(|(_, v)| v.as_str()).unwrap();
            assert_eq!(get("Hostname"), "node-1");
            assert_eq!(get("DCGM_FI_DRIVER_VERSION"), "580.159.04");
            assert_eq!(get("modelName"), "NVIDIA H100 80GB HBM3");
            assert_eq!(get("device"), format!("nvidia{}", get("gpu")));
            if keys.contains(&"pod") {
                // The 1g.10gb instance on GPU 0, or all of GPU 1: nothing else is held.
                let held = (get("gpu") == "0" && get("GPU_I_PROFILE") == "1g.10gb") || (get("gpu") == "1");
                assert!(held, "{line}");
                assert_eq!(get("pod"), if get("gpu") == "0" { "small" } else { "big" });
            }
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v.is_finite());
        }
        // 7 MIG families x 2 instances; the 1g instance's series carry pod labels.
        assert_eq!(mig_series, 14);
        assert!(pod_series >= 7 + 10, "{pod_series}");
        assert!(!out.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"0\""), "no whole-GPU utilisation under MIG");
    }

    #[test]
    fn openmetrics_declares_counters_unknown_under_the_same_name() {
        let (view, a) = fixture();
        let mut out = String::new();
        render(&view, &a, &HostLabel::new("Hostname", "n"), true, &mut out);
        assert!(out.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION unknown\n"));
        assert!(out.contains("\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{"));
        assert!(!out.contains("_total"));
    }

    #[test]
    fn label_values_are_escaped() {
        let (mut view, a) = fixture();
        view.gpus[0].info.name = "odd \"name\"\\x\n".into();
        let mut renamed = String::new();
        render(&view, &a, &HostLabel::new("hostname", "h"), false, &mut renamed);
        assert!(renamed.contains(",hostname=\"h\",") && !renamed.contains("Hostname"), "label name is configurable");
        let mut none = String::new();
        render(&view, &a, &HostLabel::new("", "h"), false, &mut none);
        assert!(!none.contains("ostname="), "an empty name leaves the label out");
        let mut out = String::new();
        render(&view, &a, &HostLabel::new("Hostname", "n"), false, &mut out);
        let line = out.lines().find(|l| l.starts_with("DCGM_FI_DEV_SM_CLOCK{gpu=\"0\"")).unwrap();
        let (_, labels) = parse(line);
        assert_eq!(labels[4], ("modelName", "odd \"name\"\\x\n".to_owned()));
    }
}
