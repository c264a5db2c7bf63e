//! NVIDIA GPU telemetry behind one trait: static facts read once, a per-GPU sample read on
//! every collection sweep, and XID events drained between sweeps. The NVML backend
//! (`nvml`) and the simulator (`gpusim`) both fill these types, so the exporter, the
//! snapshot and the tests never know which one they talk to.
//!
//! A sample records each failing NVML call by name instead of failing as a whole: one
//! broken sensor on one GPU must not blank the other fields or the other GPUs.

use super::{DeviceError, Health};

/// Driver facts, the same for every GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverInfo {
    pub driver_version: String,
    /// "12.8" (from the driver's CUDA version integer).
    pub cuda_version: String,
}

/// What does not change while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuStatic {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// NVML's form, "00000000:18:00.0".
    pub pci_bus_id: String,
    /// mig-parted's form, device << 16 | vendor (0x233010DE).
    pub pci_device_id: u32,
    pub memory_bytes: u64,
    /// Whether the product supports GPM (Hopper and newer).
    pub gpm_supported: bool,
}

/// A MIG device (GPU instance + compute instance) as NVML lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigDevice {
    pub gi_id: u32,
    pub ci_id: u32,
    /// GPU-instance profile name, "1g.10gb".
    pub profile: String,
    pub uuid: String,
    pub placement_start: u32,
    pub placement_size: u32,
    pub memory_bytes: u64,
}

/// The DCGM profiling family, from two GPM samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProfReading {
    /// Ratios 0..1, as DCGM reports them.
    pub gr_engine_active: f64,
    pub tensor_active: f64,
    pub dram_active: f64,
    /// Bytes per second.
    pub pcie_tx_bytes: f64,
    pub pcie_rx_bytes: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigReading {
    pub device: MigDevice,
    pub fb_used_mib: Option<u64>,
    pub fb_free_mib: Option<u64>,
    pub prof: Option<ProfReading>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: u64,
    /// The MIG GPU instance it runs in, if any.
    pub gi_id: Option<u32>,
}

/// One sweep's readings of one GPU; `None` where the call failed or is not supported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub gpu_temp_c: Option<u32>,
    pub mem_temp_c: Option<u32>,
    pub power_w: Option<f64>,
    pub energy_mj: Option<u64>,
    pub pcie_replay: Option<u64>,
    pub gpu_util: Option<u32>,
    pub mem_copy_util: Option<u32>,
    pub enc_util: Option<u32>,
    pub dec_util: Option<u32>,
    pub fb_free_mib: Option<u64>,
    pub fb_used_mib: Option<u64>,
    pub fb_reserved_mib: Option<u64>,
    pub remapped_correctable: Option<u64>,
    pub remapped_uncorrectable: Option<u64>,
    pub remap_pending: Option<bool>,
    pub remap_failure: Option<bool>,
    /// Retired pages (double-bit + single-bit), on products without row remapping.
    pub retired_pages: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub mig_current: Option<bool>,
    pub mig_pending: Option<bool>,
    pub prof: Option<ProfReading>,
    pub migs: Vec<MigReading>,
    pub processes: Vec<GpuProcess>,
}

/// The NVML calls a sweep makes, named for the failure counter's `call` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    Handle,
    Clocks,
    Temperature,
    MemoryTemperature,
    Power,
    Energy,
    PcieReplay,
    Utilization,
    EncoderUtil,
    DecoderUtil,
    Memory,
    RemappedRows,
    RetiredPages,
    Ecc,
    MigMode,
    MigDevices,
    Gpm,
    Processes,
    Events,
}

impl Call {
    pub const ALL: [Call; 19] = [
        Call::Handle,
        Call::Clocks,
        Call::Temperature,
        Call::MemoryTemperature,
        Call::Power,
        Call::Energy,
        Call::PcieReplay,
        Call::Utilization,
        Call::EncoderUtil,
        Call::DecoderUtil,
        Call::Memory,
        Call::RemappedRows,
        Call::RetiredPages,
        Call::Ecc,
        Call::MigMode,
        Call::MigDevices,
        Call::Gpm,
        Call::Processes,
        Call::Events,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Call::Handle => "handle",
            Call::Clocks => "clocks",
            Call::Temperature => "temperature",
            Call::MemoryTemperature => "memory_temperature",
            Call::Power => "power",
            Call::Energy => "energy",
            Call::PcieReplay => "pcie_replay",
            Call::Utilization => "utilization",
            Call::EncoderUtil => "encoder_utilization",
            Call::DecoderUtil => "decoder_utilization",
            Call::Memory => "memory",
            Call::RemappedRows => "remapped_rows",
            Call::RetiredPages => "retired_pages",
            Call::Ecc => "ecc",
            Call::MigMode => "mig_mode",
            Call::MigDevices => "mig_devices",
            Call::Gpm => "gpm",
            Call::Processes => "processes",
            Call::Events => "events",
        }
    }
}

/// A sample plus the calls that failed while taking it. "Not supported" is not a failure:
/// the field stays `None` and nothing is counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    pub reading: GpuReading,
    pub failed: Vec<(Call, String)>,
}

/// Records the outcome of one call: the value, nothing (unsupported), or a failure.
pub fn record<T>(failed: &mut Vec<(Call, String)>, call: Call, r: Result<Option<T>, String>) -> Option<T> {
    match r {
        Ok(v) => v,
        Err(e) => {
            failed.push((call, e));
            None
        }
    }
}

/// An XID error, as NVML's event set delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidEvent {
    pub gpu: u32,
    /// The MIG GPU instance it hit, when the driver says.
    pub gi_id: Option<u32>,
    pub code: u64,
}

/// A GPU telemetry backend. Owned by the collector thread; calls block.
pub trait GpuBackend: Send {
    /// "nvml" or "simulated".
    fn name(&self) -> &'static str;
    fn driver(&self) -> Result<DriverInfo, DeviceError>;
    fn gpus(&mut self) -> Result<Vec<GpuStatic>, DeviceError>;
    /// Reads every field of GPU `index` it can; failures go into `out.failed`.
    fn sample(&mut self, index: u32, out: &mut GpuSample);
    /// XID events since the last call; never blocks.
    fn poll_xids(&mut self) -> Result<Vec<XidEvent>, String>;
}

/// Health from what a sample and recent XIDs say: uncorrectable remapped rows pending or a
/// failed remap, and XIDs the driver documents as fatal, make a GPU unhealthy.
pub fn health_of(r: &GpuReading, recent_xids: &[u64]) -> (Health, String) {
    if r.remap_failure == Some(true) {
        return (Health::Unhealthy, "row remapping failed".into());
    }
    if let Some(&x) = recent_xids.iter().find(|x| FATAL_XIDS.contains(x)) {
        return (Health::Unhealthy, format!("XID {x}: {}", xid_message(x)));
    }
    if r.remap_pending == Some(true) {
        return (Health::Degraded, "row remapping pending (reset the GPU to apply)".into());
    }
    if let Some(&x) = recent_xids.first() {
        return (Health::Degraded, format!("XID {x}: {}", xid_message(x)));
    }
    (Health::Healthy, String::new())
}

/// Whether the GPU needs a reset after this XID.
pub fn is_fatal_xid(code: u64) -> bool {
    FATAL_XIDS.contains(&code)
}

/// XIDs after which the GPU needs a reset (NVIDIA's XID catalogue).
const FATAL_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95, 119, 120];

/// Short description of an XID code, after NVIDIA's XID catalogue.
pub fn xid_message(code: u64) -> &'static str {
    match code {
        13 => "Graphics Engine Exception",
        31 => "GPU memory page fault",
        32 => "Invalid or corrupted push buffer stream",
        43 => "GPU stopped processing",
        45 => "Preemptive cleanup, due to previous errors",
        48 => "Double Bit ECC Error",
        61 => "Internal micro-controller breakpoint/warning",
        62 => "Internal micro-controller halt",
        63 => "ECC page retirement or row remapping recording event",
        64 => "ECC page retirement or row remapper recording failure",
        68 => "NVDEC0 Exception",
        69 => "Graphics Engine class error",
        74 => "NVLINK Error",
        79 => "GPU has fallen off the bus",
        92 => "High single-bit ECC error rate",
        94 => "Contained ECC error",
        95 => "Uncontained ECC error",
        109 => "Context Switch Timeout Error",
        119 => "GSP RPC Timeout",
        120 => "GSP Error",
        _ => "Unknown Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_remapping_and_xids() {
        let mut r = GpuReading::default();
        assert_eq!(health_of(&r, &[]).0, Health::Healthy);
        assert_eq!(health_of(&r, &[13]).0, Health::Degraded);
        let (h, why) = health_of(&r, &[13, 79]);
        assert_eq!(h, Health::Unhealthy);
        assert!(why.contains("fallen off the bus"), "{why}");
        r.remap_pending = Some(true);
        assert_eq!(health_of(&r, &[]).0, Health::Degraded);
        r.remap_failure = Some(true);
        assert_eq!(health_of(&r, &[]).0, Health::Unhealthy);
    }

    #[test]
    fn call_names_are_unique() {
        let mut names: Vec<_> = Call::ALL.iter().map(|c| c.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Call::ALL.len());
    }
}
