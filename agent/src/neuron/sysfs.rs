//! Neuron devices from the driver's sysfs tree (`/sys/devices/virtual/neuron_device/neuron<N>/`)
//! and, where installed, `neuron-ls --json-output` (the only source of PCI address, NUMA node
//! and the processes using a device: the driver's device nodes have no PCI parent).
//!
//! Layouts handled: every driver writes `core_count` (physical cores, no newline),
//! `connected_devices` ("1, 3, 4, 12"), `info/architecture/{arch_type,instance_type,device_name}`
//! and the uncorrected ECC counters under `stats/hardware/`; drivers from 2.28 add
//! `stats/hardware/health_status/unhealthy_components` and 2.30.2 the corrected ECC counters.
//! Per-core status counters were `infer_*` before driver 2.8 and `execute_*` since; both are
//! read. Counter files are write-to-clear: this module only ever reads.
//!
//! The sysfs `instance_type` is the family ("Inf2"); the instance type proper (for the core
//! group rules) comes from config, or from the family and the device count, which tell the
//! products apart as far as Neuron geometry goes (inf2.xlarge and inf2.8xlarge share one).

use std::path::{Path, PathBuf};

use hearth_proto::neuron::Topology;

/// Where the driver's devices live, under a sysfs root.
pub const DEVICE_DIR: &str = "devices/virtual/neuron_device";

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("no Neuron driver: {0} does not exist (is the aws-neuronx-dkms driver loaded?)")]
    NoDriver(PathBuf),
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{0}")]
    Topology(#[from] hearth_proto::neuron::GroupError),
    #[error("{devices} {family} devices match no instance type Hearth knows (set devices.neuron_instance_type)")]
    UnknownShape { family: String, devices: usize },
}

/// Hardware error counts of one device, from `stats/hardware/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EccCounts {
    pub mem_uncorrected: u64,
    pub mem_repairable_uncorrected: u64,
    pub sram_uncorrected: u64,
    /// Driver 2.30.2 and later; None before.
    pub mem_corrected: Option<u64>,
    pub sram_corrected: Option<u64>,
}

/// One Neuron device as the driver describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronDevice {
    pub index: u32,
    /// "Inferentia2", "Trainium1", "Trainium2" (driver strings).
    pub device_name: String,
    /// "Inf2", "Trn1", "Trn2": the instance family.
    pub family: String,
    pub arch: String,
    pub serial: Option<String>,
    pub physical_cores: u32,
    pub connected: Vec<u32>,
    pub ecc: EccCounts,
    /// Driver 2.28+: components the driver reports unhealthy ("hbm", "sram", "link_host"...).
    pub unhealthy_components: Vec<String>,
    /// Per physical core: hardware and DMA error counts (`hw_error`, `hw_dma_abort_error`,
    /// `hw_hbm_ue_error`, `hw_nc_ue_error` totals).
    pub core_hw_errors: Vec<u64>,
    /// From neuron-ls, when present.
    pub bdf: Option<String>,
    pub numa_node: Option<i32>,
    pub processes: Vec<NeuronProcess>,
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeuronProcess {
    pub pid: u32,
    pub command: String,
}

fn read(path: &Path) -> Result<String, SysfsError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).map_err(|e| SysfsError::Read { path: path.into(), message: e.to_string() })
}

fn read_opt(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_opt(path).and_then(|s| s.parse().ok())
}

/// Reads every device under `sysfs_root` (normally `/sys`), sorted by index.
pub fn devices(sysfs_root: &Path) -> Result<Vec<NeuronDevice>, SysfsError> {
    let dir = sysfs_root.join(DEVICE_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SysfsError::NoDriver(dir)),
        Err(e) => return Err(SysfsError::Read { path: dir, message: e.to_string() }),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(index) = name.to_str().and_then(|n| n.strip_prefix("neuron")).and_then(|n| n.parse::<u32>().ok()) else { continue };
        match device(&e.path(), index) {
            Ok(d) => out.push(d),
            // A device that vanished between listing and reading is not there.
            Err(SysfsError::Read { .. }) if !e.path().exists() => {}
            Err(err) => return Err(err),
        }
    }
    out.sort_by_key(|d| d.index);
    Ok(out)
}

fn device(dir: &Path, index: u32) -> Result<NeuronDevice, SysfsError> {
    let arch_dir = dir.join("info/architecture");
    let physical_cores: u32 = read(&dir.join("core_count"))?
        .parse()
        .map_err(|e| SysfsError::Read { path: dir.join("core_count"), message: format!("expected a core count: {e}") })?;
    let connected = read_opt(&dir.join("connected_devices")).unwrap_or_default().split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let hw = dir.join("stats/hardware");
    let ecc = EccCounts {
        mem_uncorrected: read_u64(&hw.join("mem_ecc_uncorrected")).unwrap_or(0),
        mem_repairable_uncorrected: read_u64(&hw.join("mem_ecc_repairable_uncorrected")).unwrap_or(0),
        sram_uncorrected: read_u64(&hw.join("sram_ecc_uncorrected")).unwrap_or(0),
        mem_corrected: read_u64(&hw.join("mem_ecc_corrected")),
        sram_corrected: read_u64(&hw.join("sram_ecc_corrected")),
    };
    let unhealthy_components = read_opt(&hw.join("health_status/unhealthy_components"))
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let core_hw_errors = (0..physical_cores)
        .map(|c| {
            let status = dir.join(format!("neuron_core{c}/stats/status"));
            ["hw_error", "hw_dma_abort_error", "hw_hbm_ue_error", "hw_nc_ue_error"]
                .iter()
                .filter_map(|n| read_u64(&status.join(n).join("total")))
                .sum()
        })
        .collect();
    Ok(NeuronDevice {
        index,
        device_name: read(&arch_dir.join("device_name"))?,
        family: read(&arch_dir.join("instance_type"))?,
        arch: read_opt(&arch_dir.join("arch_type")).unwrap_or_default(),
        serial: read_opt(&dir.join("info/serial_number")).filter(|s| !s.is_empty()),
        physical_cores,
        connected,
        ecc,
        unhealthy_components,
        core_hw_errors,
        bdf: None,
        numa_node: None,
        processes: Vec::new(),
        memory_bytes: None,
    })
}

/// The instance type of a node from its devices' family and count (`configured` wins).
pub fn instance_type(devices: &[NeuronDevice], configured: Option<&str>) -> Result<Topology, SysfsError> {
    if let Some(t) = configured {
        return Ok(Topology::of(t, None)?);
    }
    let family = devices.first().map(|d| d.family.to_ascii_lowercase()).unwrap_or_default();
    let t = match (family.as_str(), devices.len()) {
        ("inf2", 1) => "inf2.xlarge",
        ("inf2", 6) => "inf2.24xlarge",
        ("inf2", 12) => "inf2.48xlarge",
        ("trn1", 1) => "trn1.2xlarge",
        ("trn1", 16) => "trn1.32xlarge",
        ("trn2", 16) => "trn2.48xlarge",
        _ => return Err(SysfsError::UnknownShape { family, devices: devices.len() }),
    };
    Ok(Topology::of(t, None)?)
}

/// Why a device is unhealthy, if it is: uncorrectable HBM or SRAM ECC errors, hardware or DMA
/// errors on a core, or a component the driver itself calls unhealthy.
pub fn unhealthy_reason(d: &NeuronDevice) -> Option<String> {
    let mut why = Vec::new();
    if d.ecc.mem_uncorrected > 0 {
        why.push(format!("{} uncorrectable HBM ECC errors", d.ecc.mem_uncorrected));
    }
    if d.ecc.sram_uncorrected > 0 {
        why.push(format!("{} uncorrectable SRAM ECC errors", d.ecc.sram_uncorrected));
    }
    let hw: u64 = d.core_hw_errors.iter().sum();
    if hw > 0 {
        why.push(format!("{hw} hardware/DMA errors on its cores"));
    }
    if !d.unhealthy_components.is_empty() {
        why.push(format!("driver reports unhealthy: {}", d.unhealthy_components.join(", ")));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Adds what `neuron-ls --json-output` knows (PCI address, NUMA node, memory, processes).
/// Both the older and the newer (2.25+) shapes: an array of devices.
pub fn merge_neuron_ls(devices: &mut [NeuronDevice], json: &str) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Proc {
        pid: u32,
        #[serde(default)]
        command: String,
    }
    #[derive(serde::Deserialize)]
    struct Dev {
        neuron_device: u32,
        #[serde(default)]
        bdf: Option<String>,
        #[serde(default)]
        numa_node: Option<serde_json::Value>,
        #[serde(default)]
        memory_size: Option<u64>,
        #[serde(default)]
        neuron_processes: Option<Vec<Proc>>,
    }
    let list: Vec<Dev> = serde_json::from_str(json).map_err(|e| format!("neuron-ls JSON: expected an array of devices: {e}"))?;
    for l in list {
        let Some(d) = devices.iter_mut().find(|d| d.index == l.neuron_device) else { continue };
        d.bdf = l.bdf.filter(|b| !b.is_empty()).map(|b| if b.matches(':').count() == 1 { format!("0000:{b}") } else { b });
        d.numa_node = match l.numa_node {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_i64().map(|n| n as i32),
            _ => None,
        }
        .filter(|n| *n >= 0);
        d.memory_bytes = l.memory_size;
        d.processes =
            l.neuron_processes.unwrap_or_default().into_iter().map(|p| NeuronProcess { pid: p.pid, command: p.command }).collect();
    }
    Ok(())
}

/// A fake driver tree for one instance type, as the simulator and tests use: the layout of a
/// driver older than 2.28 (`modern: false`) or of 2.30.2 (health_status, corrected ECC).
pub fn write_fake_tree(root: &Path, t: &Topology, modern: bool) -> std::io::Result<()> {
    let (family, arch, core_arch) = match t.device_name {
        "Inferentia2" => ("Inf2", "NDv3", "NCv2"),
        "Trainium" => ("Trn1", "NDv2", "NCv2"),
        _ => ("Trn2", "NDv3", "NCv3"),
    };
    let device_name = if t.device_name == "Trainium" { "Trainium1" } else { t.device_name };
    for d in 0..t.devices {
        let dir = root.join(DEVICE_DIR).join(format!("neuron{d}"));
        let w = |rel: &str, text: &str| -> std::io::Result<()> {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap_or(&dir))?;
            std::fs::write(p, text)
        };
        // The driver writes core_count without a newline.
        w("core_count", &t.physical_cores.to_string())?;
        let links: Vec<String> = fake_links(t, d).iter().map(u32::to_string).collect();
        w("connected_devices", &format!("{}\n", links.join(", ")))?;
        w("info/architecture/arch_type", &format!("{arch}\n"))?;
        w("info/architecture/instance_type", &format!("{family}\n"))?;
        w("info/architecture/device_name", &format!("{device_name}\n"))?;
        w("info/serial_number", &format!("{:016x}\n", 0x5eed_0000_u64 + u64::from(d)))?;
        for f in ["mem_ecc_uncorrected", "mem_ecc_repairable_uncorrected", "sram_ecc_uncorrected"] {
            w(&format!("stats/hardware/{f}"), "0\n")?;
        }
        if modern {
            w("stats/hardware/mem_ecc_corrected", "0\n")?;
            w("stats/hardware/sram_ecc_corrected", "0\n")?;
            w("stats/hardware/health_status/unhealthy_components", "\n")?;
        }
        for c in 0..t.physical_cores {
            w(&format!("neuron_core{c}/info/architecture/arch_type"), &format!("{core_arch}\n"))?;
            for s in ["success", "failure", "hw_error", "hw_dma_abort_error", "execute_completed_with_error"] {
                w(&format!("neuron_core{c}/stats/status/{s}/total"), "0\n")?;
                w(&format!("neuron_core{c}/stats/status/{s}/present"), "0\n")?;
            }
            w(&format!("neuron_core{c}/stats/memory_usage/device_mem/total"), "0\n")?;
        }
    }
    Ok(())
}

/// Plausible `connected_devices` for the fake tree: ring neighbours (inf2), 4x4 torus
/// neighbours (trn1, trn2).
fn fake_links(t: &Topology, d: u32) -> Vec<u32> {
    let n = t.devices;
    if n == 1 {
        return Vec::new();
    }
    match t.span {
        hearth_proto::neuron::Span::Ring => {
            let mut v = vec![(d + n - 1) % n, (d + 1) % n];
            v.dedup();
            v
        }
        hearth_proto::neuron::Span::Counts(_) => {
            let (row, col) = (d / 4, d % 4);
            vec![((row + 3) % 4) * 4 + col, row * 4 + (col + 3) % 4, ((row + 1) % 4) * 4 + col, row * 4 + (col + 1) % 4]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(instance: &str, modern: bool) -> (tempfile::TempDir, Topology) {
        let dir = tempfile::tempdir().unwrap();
        let t = Topology::of(instance, None).unwrap();
        write_fake_tree(dir.path(), &t, modern).unwrap();
        (dir, t)
    }

    #[test]
    fn every_product_reads_back_as_itself_in_both_layouts() {
        for t in hearth_proto::neuron::INSTANCE_TYPES {
            for modern in [false, true] {
                let (dir, _) = tree(t.instance_type, modern);
                let devs = devices(dir.path()).unwrap();
                assert_eq!(devs.len() as u32, t.devices, "{}", t.instance_type);
                assert!(devs.iter().all(|d| d.physical_cores == t.physical_cores));
                assert_eq!(devs[0].ecc.mem_corrected.is_some(), modern);
                assert!(devs.iter().all(|d| unhealthy_reason(d).is_none()));
                let got = instance_type(&devs, None).unwrap();
                // inf2.8xlarge reads as inf2.xlarge: the same Neuron geometry.
                assert_eq!((got.devices, got.cores_per_device, got.span), (t.devices, t.cores_per_device, t.span), "{}", t.instance_type);
            }
        }
    }

    #[test]
    fn the_48xlarge_ring_and_the_trn_torus_links() {
        let (dir, _) = tree("inf2.48xlarge", false);
        let d = devices(dir.path()).unwrap();
        assert_eq!(d[0].connected, vec![11, 1]);
        let (dir, _) = tree("trn2.48xlarge", true);
        let d = devices(dir.path()).unwrap();
        assert_eq!(d[0].connected, vec![12, 3, 4, 1], "up, left, down, right as neuron-ls shows trn2's device 0");
        assert_eq!(d[5].connected, vec![1, 4, 9, 6]);
        assert_eq!(d[0].family, "Trn2");
    }

    #[test]
    fn ecc_hardware_errors_and_driver_health_make_a_device_unhealthy() {
        let (dir, _) = tree("inf2.24xlarge", true);
        let base = dir.path().join(DEVICE_DIR);
        std::fs::write(base.join("neuron2/stats/hardware/mem_ecc_uncorrected"), "3\n").unwrap();
        std::fs::write(base.join("neuron3/neuron_core1/stats/status/hw_dma_abort_error/total"), "1\n").unwrap();
        std::fs::write(base.join("neuron4/stats/hardware/health_status/unhealthy_components"), "hbm, link_host\n").unwrap();
        std::fs::write(base.join("neuron5/stats/hardware/mem_ecc_corrected"), "7\n").unwrap();
        let d = devices(dir.path()).unwrap();
        assert_eq!(unhealthy_reason(&d[2]).unwrap(), "3 uncorrectable HBM ECC errors");
        assert_eq!(unhealthy_reason(&d[3]).unwrap(), "1 hardware/DMA errors on its cores");
        assert_eq!(unhealthy_reason(&d[4]).unwrap(), "driver reports unhealthy: hbm, link_host");
        assert_eq!(unhealthy_reason(&d[5]), None, "corrected errors are not a fault");
        assert_eq!(d[5].ecc.mem_corrected, Some(7));
    }

    #[test]
    fn no_driver_and_a_vanished_device_and_bad_files_say_what() {
        let dir = tempfile::tempdir().unwrap();
        let e = devices(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no Neuron driver") && e.contains("neuron_device"), "{e}");
        let (dir, _) = tree("inf2.24xlarge", false);
        std::fs::remove_dir_all(dir.path().join(DEVICE_DIR).join("neuron5")).unwrap();
        let d = devices(dir.path()).unwrap();
        assert_eq!(d.len(), 5);
        assert!(matches!(instance_type(&d, None), Err(SysfsError::UnknownShape { devices: 5, .. })));
        assert_eq!(instance_type(&d, Some("inf2.24xlarge")).unwrap().devices, 6, "config names it");
        std::fs::write(dir.path().join(DEVICE_DIR).join("neuron0/core_count"), "two").unwrap();
        let e = devices(dir.path()).unwrap_err().to_string();
        assert!(e.contains("core_count") && e.contains("expected a core count"), "{e}");
    }

    #[test]
    fn neuron_ls_json_old_and_new_shapes() {
        let (dir, _) = tree("inf2.24xlarge", false);
        let mut d = devices(dir.path()).unwrap();
        let old =
            r#"[{"neuron_device":0,"bdf":"00:1e.0","connected_to":null,"nc_count":2,"memory_size":34359738368,"neuron_processes":[]}]"#;
        merge_neuron_ls(&mut d, old).unwrap();
        assert_eq!((d[0].bdf.as_deref(), d[0].memory_bytes, d[0].numa_node), (Some("0000:00:1e.0"), Some(34359738368), None));
        let new = r#"[{"neuron_device":1,"bdf":"0000:a0:1e.0","cpu_affinity":"48-95","numa_node":"1","connected_to":[0,2],"nc_count":2,
            "memory_size":34359738368,"neuroncore_ids":[2,3],"neuron_processes":[{"pid":4242,"command":"python3 serve.py","neuron_runtime_version":"2.30"}]}]"#;
        merge_neuron_ls(&mut d, new).unwrap();
        assert_eq!((d[1].bdf.as_deref(), d[1].numa_node), (Some("0000:a0:1e.0"), Some(1)));
        assert_eq!(d[1].processes, vec![NeuronProcess { pid: 4242, command: "python3 serve.py".into() }]);
        assert!(merge_neuron_ls(&mut d, "{}").unwrap_err().contains("expected an array"));
    }
}
