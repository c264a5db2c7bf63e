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

/// What a GPU signal says about the node. The rules follow the EKS node monitoring agent's
/// `AcceleratedHardwareReady`: a signal after which the GPU needs a reset (or is gone) makes
/// the node not ready for accelerated work (the `HearthAcceleratorsHealthy` condition turns
/// False, the optional taint goes on, placement avoids the GPU); an application-level or
/// recoverable one is a warning: an Event, and Degraded in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Xid(u64),
    /// Row remapping failed: uncorrectable memory the GPU cannot retire.
    RowRemapFailure,
    /// A remap is recorded and waits for a GPU reset.
    RowRemapPending,
    /// NVML cannot reach the GPU at all.
    Unreachable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Fatal,
}

/// One row of the health table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRule {
    pub signal: Signal,
    pub severity: Severity,
    /// The condition's or the Event's reason (PascalCase).
    pub reason: &'static str,
}

const fn rule(signal: Signal, severity: Severity, reason: &'static str) -> HealthRule {
    HealthRule { signal, severity, reason }
}

/// The health rules, one row per signal. XIDs not listed are warnings (reason
/// `NvidiaXIDError`): an unknown XID is worth an Event, not a drained node.
pub const HEALTH_RULES: &[HealthRule] = &[
    rule(Signal::Xid(13), Severity::Warning, "NvidiaXID13Error"),
    rule(Signal::Xid(31), Severity::Warning, "NvidiaXID31Error"),
    rule(Signal::Xid(43), Severity::Warning, "NvidiaXID43Error"),
    rule(Signal::Xid(45), Severity::Warning, "NvidiaXID45Error"),
    rule(Signal::Xid(48), Severity::Fatal, "NvidiaXID48Error"),
    rule(Signal::Xid(63), Severity::Warning, "NvidiaXID63Error"),
    rule(Signal::Xid(64), Severity::Fatal, "NvidiaXID64Error"),
    rule(Signal::Xid(74), Severity::Fatal, "NvidiaXID74Error"),
    rule(Signal::Xid(79), Severity::Fatal, "NvidiaXID79Error"),
    rule(Signal::Xid(92), Severity::Warning, "NvidiaXID92Error"),
    rule(Signal::Xid(94), Severity::Fatal, "NvidiaXID94Error"),
    rule(Signal::Xid(95), Severity::Fatal, "NvidiaXID95Error"),
    rule(Signal::Xid(119), Severity::Fatal, "NvidiaXID119Error"),
    rule(Signal::Xid(120), Severity::Fatal, "NvidiaXID120Error"),
    rule(Signal::RowRemapFailure, Severity::Fatal, "NvidiaRowRemapFailure"),
    rule(Signal::RowRemapPending, Severity::Warning, "NvidiaRowRemapPending"),
    rule(Signal::Unreachable, Severity::Fatal, "NvidiaGPUUnreachable"),
];

/// The row for `signal` (an unlisted XID is a warning).
pub fn rule_for(signal: Signal) -> HealthRule {
    HEALTH_RULES.iter().find(|r| r.signal == signal).copied().unwrap_or(rule(signal, Severity::Warning, "NvidiaXIDError"))
}

/// The reason code a health reason string starts with (`NvidiaXID79Error: ...`).
pub fn reason_code(health_reason: &str) -> &str {
    health_reason.split_once(':').map_or(health_reason, |(c, _)| c)
}

/// Health from the signals a sample and recent XIDs carry: the most severe rule wins (the
/// first such signal names it). The reason reads `<rule reason>: <what happened>`.
pub fn health_of(r: &GpuReading, recent_xids: &[u64]) -> (Health, String) {
    let mut signals: Vec<(Signal, String)> = Vec::new();
    if r.remap_failure == Some(true) {
        signals.push((Signal::RowRemapFailure, "row remapping failed".into()));
    }
    for &x in recent_xids {
        signals.push((Signal::Xid(x), format!("XID {x}: {}", xid_message(x))));
    }
    if r.remap_pending == Some(true) {
        signals.push((Signal::RowRemapPending, "row remapping pending (reset the GPU to apply)".into()));
    }
    worst(signals)
}

/// The health of the GPU the collector cannot reach.
pub fn unreachable() -> (Health, String) {
    worst(vec![(Signal::Unreachable, "NVML cannot reach the GPU".into())])
}

fn worst(signals: Vec<(Signal, String)>) -> (Health, String) {
    let mut best: Option<(HealthRule, String)> = None;
    for (s, what) in signals {
        let r = rule_for(s);
        if best.as_ref().is_none_or(|(b, _)| r.severity > b.severity) {
            best = Some((r, what));
        }
    }
    match best {
        None => (Health::Healthy, String::new()),
        Some((r, what)) => {
            let h = if r.severity == Severity::Fatal { Health::Unhealthy } else { Health::Degraded };
            (h, format!("{}: {what}", r.reason))
        }
    }
}

/// Whether the GPU needs a reset after this XID.
pub fn is_fatal_xid(code: u64) -> bool {
    rule_for(Signal::Xid(code)).severity == Severity::Fatal
}

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

    /// One test per row of the health table: the signal, through `health_of` (or
    /// `unreachable`), gives the row's severity and reason.
    macro_rules! rule_rows {
        ($($name:ident: $signal:expr => $sev:ident, $reason:literal;)*) => {$(
            #[test]
            fn $name() {
                let (h, why) = match $signal {
                    Signal::Xid(x) => health_of(&GpuReading::default(), &[x]),
                    Signal::RowRemapFailure => health_of(&GpuReading { remap_failure: Some(true), ..Default::default() }, &[]),
                    Signal::RowRemapPending => health_of(&GpuReading { remap_pending: Some(true), ..Default::default() }, &[]),
                    Signal::Unreachable => unreachable(),
                };
                let want = if Severity::$sev == Severity::Fatal { Health::Unhealthy } else { Health::Degraded };
                assert_eq!((h, reason_code(&why)), (want, $reason), "{why}");
                assert_eq!(rule_for($signal), HealthRule { signal: $signal, severity: Severity::$sev, reason: $reason });
            }
        )*
        #[test]
        fn every_row_has_its_test() {
            let tested = [$($signal),*];
            for r in HEALTH_RULES {
                assert!(tested.contains(&r.signal), "no test for {:?}", r.signal);
            }
        }
        };
    }

    rule_rows! {
        xid_13_graphics_exception_warns: Signal::Xid(13) => Warning, "NvidiaXID13Error";
        xid_31_page_fault_warns: Signal::Xid(31) => Warning, "NvidiaXID31Error";
        xid_43_stopped_processing_warns: Signal::Xid(43) => Warning, "NvidiaXID43Error";
        xid_45_preemptive_cleanup_warns: Signal::Xid(45) => Warning, "NvidiaXID45Error";
        xid_48_double_bit_ecc_is_fatal: Signal::Xid(48) => Fatal, "NvidiaXID48Error";
        xid_63_remap_recorded_warns: Signal::Xid(63) => Warning, "NvidiaXID63Error";
        xid_64_remap_recording_failure_is_fatal: Signal::Xid(64) => Fatal, "NvidiaXID64Error";
        xid_74_nvlink_is_fatal: Signal::Xid(74) => Fatal, "NvidiaXID74Error";
        xid_79_off_the_bus_is_fatal: Signal::Xid(79) => Fatal, "NvidiaXID79Error";
        xid_92_high_sbe_rate_warns: Signal::Xid(92) => Warning, "NvidiaXID92Error";
        xid_94_contained_ecc_is_fatal: Signal::Xid(94) => Fatal, "NvidiaXID94Error";
        xid_95_uncontained_ecc_is_fatal: Signal::Xid(95) => Fatal, "NvidiaXID95Error";
        xid_119_gsp_timeout_is_fatal: Signal::Xid(119) => Fatal, "NvidiaXID119Error";
        xid_120_gsp_error_is_fatal: Signal::Xid(120) => Fatal, "NvidiaXID120Error";
        row_remap_failure_is_fatal: Signal::RowRemapFailure => Fatal, "NvidiaRowRemapFailure";
        row_remap_pending_warns: Signal::RowRemapPending => Warning, "NvidiaRowRemapPending";
        unreachable_gpu_is_fatal: Signal::Unreachable => Fatal, "NvidiaGPUUnreachable";
        unlisted_xid_warns: Signal::Xid(999) => Warning, "NvidiaXIDError";
    }

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
