//! The NVML backend: libnvidia-ml loaded at run time through nvml-wrapper, so a node without
//! the driver runs the agent and reports why. Where nvml-wrapper stops (the GPU instance id
//! of a MIG device handle, a GPU instance's profile and placement, the list of possible
//! placements) this module makes the raw nvml-wrapper-sys call itself, behind safe
//! functions. nvml-wrapper's own `possible_placements` returns an empty list: it reserves
//! the vector but never sets its length after NVML fills it, so `raw::possible_placements`
//! replaces it.
//!
//! NVML is opened once per process and never closed (`Box::leak`): the event set and GPM
//! samples borrow it for as long as the agent runs, and a driver going away is reported by
//! the calls themselves.

use std::collections::HashMap;
use std::path::Path;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::gpm::{GpmSample, gpm_metrics_get};
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id as fi;
use nvml_wrapper::{Device, Nvml};

use super::DeviceError;
use super::gpu::{Call, DriverInfo, GpuBackend, GpuProcess, GpuSample, GpuStatic, MigReading, ProfReading, XidEvent, record};

const BACKEND: &str = "nvml";

/// "Not supported" (and "not found" for optional objects) leaves a field empty; anything
/// else is a failure to count.
fn opt<T>(r: Result<T, NvmlError>) -> Result<Option<T>, String> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported | NvmlError::NotFound | NvmlError::FunctionNotFound) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Fields read in one `nvmlDeviceGetFieldValues` call per GPU (what DCGM reads the same way).
const FIELDS: [u32; 10] = [
    fi::NVML_FI_DEV_MEMORY_TEMP,
    fi::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
    fi::NVML_FI_DEV_PCIE_REPLAY_COUNTER,
    fi::NVML_FI_DEV_REMAPPED_COR,
    fi::NVML_FI_DEV_REMAPPED_UNC,
    fi::NVML_FI_DEV_REMAPPED_PENDING,
    fi::NVML_FI_DEV_REMAPPED_FAILURE,
    fi::NVML_FI_DEV_RETIRED_SBE,
    fi::NVML_FI_DEV_RETIRED_DBE,
    fi::NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
];

/// GPM metrics behind the DCGM profiling family, in `ProfReading` order.
const GPM_METRICS: [GpmMetricId; 5] =
    [GpmMetricId::GraphicsUtil, GpmMetricId::AnyTensorUtil, GpmMetricId::DramBwUtil, GpmMetricId::PcieTxPerSec, GpmMetricId::PcieRxPerSec];

pub struct NvmlGpus {
    nvml: &'static Nvml,
    statics: Vec<GpuStatic>,
    events: Option<EventSet<'static>>,
    events_error: Option<String>,
    /// Previous GPM sample per (GPU, GPU instance): metrics come from two samples.
    gpm_prev: HashMap<(u32, Option<u32>), GpmSample<'static>>,
    /// Units NVML gave for the GPM metrics, as last seen (for the record and the bench).
    gpm_units: Vec<(String, String)>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").field("gpus", &self.statics.len()).finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> DeviceError {
    DeviceError::Unavailable { backend: BACKEND, reason: reason.to_string() }
}

fn call_err(call: &'static str, index: u32, e: NvmlError) -> DeviceError {
    DeviceError::Call { backend: BACKEND, call, index, reason: e.to_string() }
}

impl NvmlGpus {
    /// Loads NVML (from `library` when given) and reads every GPU's static facts.
    pub fn open(library: Option<&Path>) -> Result<Self, DeviceError> {
        let nvml = match library {
            Some(p) => Nvml::builder().lib_path(p.as_os_str()).init(),
            None => Nvml::init(),
        };
        let nvml = nvml.map_err(|e| match e {
            NvmlError::LibloadingError(l) => {
                unavailable(format!("cannot load libnvidia-ml.so.1 ({l}); is the NVIDIA driver installed and mounted?"))
            }
            NvmlError::DriverNotLoaded => unavailable("the NVIDIA kernel driver is not loaded"),
            NvmlError::NoPermission => unavailable("no permission to talk to the NVIDIA driver (run privileged)"),
            other => unavailable(format!("NVML init failed: {other}")),
        })?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let n = nvml.device_count().map_err(|e| unavailable(format!("device count: {e}")))?;
        let mut statics = Vec::with_capacity(n as usize);
        for i in 0..n {
            let d = nvml.device_by_index(i).map_err(|e| call_err("handle", i, e))?;
            let pci = d.pci_info().map_err(|e| call_err("pci info", i, e))?;
            let gpm_supported = d.gpm_support().unwrap_or(false);
            statics.push(GpuStatic {
                index: i,
                uuid: d.uuid().map_err(|e| call_err("uuid", i, e))?,
                name: d.name().map_err(|e| call_err("name", i, e))?,
                pci_bus_id: pci.bus_id,
                pci_device_id: pci.pci_device_id,
                memory_bytes: d.memory_info().map_err(|e| call_err("memory", i, e))?.total,
                gpm_supported,
            });
        }
        let (events, events_error) = match Self::event_set(nvml, n) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        Ok(Self { nvml, statics, events, events_error, gpm_prev: HashMap::new(), gpm_units: Vec::new() })
    }

    /// An event set with critical XIDs registered on every GPU that supports them.
    fn event_set(nvml: &'static Nvml, n: u32) -> Result<EventSet<'static>, String> {
        let mut set = nvml.create_event_set().map_err(|e| format!("create event set: {e}"))?;
        for i in 0..n {
            let d = nvml.device_by_index(i).map_err(|e| e.to_string())?;
            set = match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => s,
                // Registration consumes the set; a GPU that refuses XID events leaves us without one.
                Err(e) => return Err(format!("GPU {i}: register XID events: {}", e.error)),
            };
        }
        Ok(set)
    }

    pub fn nvml(&self) -> &'static Nvml {
        self.nvml
    }

    /// (short name, unit) of each GPM metric, as NVML reported them in the last sample.
    pub fn gpm_units(&self) -> &[(String, String)] {
        &self.gpm_units
    }

    fn gpm(&mut self, key: (u32, Option<u32>), d: &Device<'static>) -> Result<Option<ProfReading>, String> {
        let sample = match key.1 {
            None => d.gpm_sample(),
            Some(gi) => d.gpm_mig_sample(gi),
        };
        let sample = match opt(sample)? {
            Some(s) => s,
            None => return Ok(None),
        };
        let Some(prev) = self.gpm_prev.insert(key, sample) else {
            return Ok(None);
        };
        let Some(cur) = self.gpm_prev.get(&key) else {
            return Ok(None);
        };
        let results = gpm_metrics_get(self.nvml, &prev, cur, &GPM_METRICS).map_err(|e| e.to_string())?;
        let mut v = [0.0f64; 5];
        let mut units = Vec::with_capacity(5);
        for (slot, r) in v.iter_mut().zip(results) {
            let r = r.map_err(|e| e.to_string())?;
            units.push((r.metric_info.short_name.clone(), r.metric_info.unit.clone()));
            // Utilisations come as percentages; DCGM reports ratios. PCIe rates come in the
            // unit NVML names (MiB/s on current drivers); DCGM reports bytes/s.
            *slot = match r.metric_id {
                GpmMetricId::PcieTxPerSec | GpmMetricId::PcieRxPerSec => r.value * unit_scale(&r.metric_info.unit),
                _ => r.value / 100.0,
            };
        }
        self.gpm_units = units;
        Ok(Some(ProfReading { gr_engine_active: v[0], tensor_active: v[1], dram_active: v[2], pcie_tx_bytes: v[3], pcie_rx_bytes: v[4] }))
    }
}

/// Bytes per unit of a GPM rate.
fn unit_scale(unit: &str) -> f64 {
    let u = unit.to_ascii_lowercase();
    if u.starts_with("mib") {
        1024.0 * 1024.0
    } else if u.starts_with("mb") {
        1e6
    } else if u.starts_with("kib") {
        1024.0
    } else if u.starts_with("kb") {
        1e3
    } else {
        1.0
    }
}

fn field_u64(s: &Result<FieldValueSample, NvmlError>) -> Result<Option<u64>, String> {
    match s {
        Ok(f) => match &f.value {
            Ok(SampleValue::U64(v)) => Ok(Some(*v)),
            Ok(SampleValue::U32(v)) => Ok(Some(u64::from(*v))),
            Ok(SampleValue::I64(v)) => Ok(Some((*v).max(0) as u64)),
            Ok(SampleValue::F64(v)) => Ok(Some(v.max(0.0) as u64)),
            Err(NvmlError::NotSupported) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

impl GpuBackend for NvmlGpus {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn driver(&self) -> Result<DriverInfo, DeviceError> {
        let driver_version = self.nvml.sys_driver_version().map_err(|e| unavailable(format!("driver version: {e}")))?;
        let cuda = self.nvml.sys_cuda_driver_version().unwrap_or(0);
        Ok(DriverInfo { driver_version, cuda_version: format!("{}.{}", cuda / 1000, (cuda % 1000) / 10) })
    }

    fn gpus(&mut self) -> Result<Vec<GpuStatic>, DeviceError> {
        Ok(self.statics.clone())
    }

    fn sample(&mut self, index: u32, out: &mut GpuSample) {
        let d = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                out.failed.push((Call::Handle, e.to_string()));
                return;
            }
        };
        let f = &mut out.failed;
        let r = &mut out.reading;
        r.sm_clock_mhz = record(f, Call::Clocks, opt(d.clock_info(Clock::SM)));
        r.mem_clock_mhz = record(f, Call::Clocks, opt(d.clock_info(Clock::Memory)));
        r.gpu_temp_c = record(f, Call::Temperature, opt(d.temperature(TemperatureSensor::Gpu)));
        r.power_w = record(f, Call::Power, opt(d.power_usage())).map(|mw| f64::from(mw) / 1000.0);
        let ids: Vec<FieldId> = FIELDS.iter().map(|&i| FieldId(i)).collect();
        match d.field_values_for(&ids) {
            Ok(vals) => {
                let get = |k: usize| vals.get(k).map_or(Ok(None), field_u64);
                r.mem_temp_c = record(f, Call::MemoryTemperature, get(0)).map(|v| v as u32);
                r.energy_mj = record(f, Call::Energy, get(1));
                r.pcie_replay = record(f, Call::PcieReplay, get(2));
                r.remapped_correctable = record(f, Call::RemappedRows, get(3));
                r.remapped_uncorrectable = record(f, Call::RemappedRows, get(4));
                r.remap_pending = record(f, Call::RemappedRows, get(5)).map(|v| v != 0);
                r.remap_failure = record(f, Call::RemappedRows, get(6)).map(|v| v != 0);
                let sbe = record(f, Call::RetiredPages, get(7));
                let dbe = record(f, Call::RetiredPages, get(8));
                r.retired_pages = match (sbe, dbe) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                };
                r.ecc_uncorrected_volatile = record(f, Call::Ecc, get(9));
            }
            Err(e) => f.push((Call::Energy, format!("field values: {e}"))),
        }
        if let Some(u) = record(f, Call::Utilization, opt(d.utilization_rates())) {
            r.gpu_util = Some(u.gpu);
            r.mem_copy_util = Some(u.memory);
        }
        r.enc_util = record(f, Call::EncoderUtil, opt(d.encoder_utilization())).map(|u| u.utilization);
        r.dec_util = record(f, Call::DecoderUtil, opt(d.decoder_utilization())).map(|u| u.utilization);
        if let Some(m) = record(f, Call::Memory, opt(d.memory_info())) {
            r.fb_free_mib = Some(m.free >> 20);
            r.fb_used_mib = Some(m.used >> 20);
            r.fb_reserved_mib = Some(m.reserved >> 20);
        }
        let mode = record(f, Call::MigMode, opt(d.mig_mode()));
        r.mig_current = mode.as_ref().map(|m| m.current != 0);
        r.mig_pending = mode.as_ref().map(|m| m.pending != 0);
        if let Some(p) = record(f, Call::Processes, opt(d.running_compute_processes())) {
            r.processes = p
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => b,
                        UsedGpuMemory::Unavailable => 0,
                    },
                    gi_id: p.gpu_instance_id,
                })
                .collect();
        }
        let gpm = self.statics.get(index as usize).is_some_and(|s| s.gpm_supported);
        if gpm {
            let p = self.gpm((index, None), &d);
            out.reading.prof = record(&mut out.failed, Call::Gpm, p);
        }
        if out.reading.mig_current == Some(true) {
            let pci_device_id = self.statics.get(index as usize).map_or(0, |s| s.pci_device_id);
            match raw::mig_devices(self.nvml, &d, pci_device_id) {
                Ok(devs) => {
                    for (dev, mem) in devs {
                        let prof = if gpm {
                            let p = self.gpm((index, Some(dev.gi_id)), &d);
                            record(&mut out.failed, Call::Gpm, p)
                        } else {
                            None
                        };
                        let (fb_used_mib, fb_free_mib) = mem.map_or((None, None), |(u, f)| (Some(u >> 20), Some(f >> 20)));
                        out.reading.migs.push(MigReading { device: dev, fb_used_mib, fb_free_mib, prof });
                    }
                }
                Err(e) => out.failed.push((Call::MigDevices, e)),
            }
        }
    }

    fn poll_xids(&mut self) -> Result<Vec<XidEvent>, String> {
        let Some(set) = &self.events else {
            return match &self.events_error {
                Some(e) => Err(e.clone()),
                None => Ok(Vec::new()),
            };
        };
        let mut out = Vec::new();
        // Drain without blocking: a zero timeout returns Timeout when nothing is queued.
        loop {
            match set.wait(0) {
                Ok(ev) => {
                    let uuid = ev.device.uuid().unwrap_or_default();
                    let gpu = self.statics.iter().find(|s| s.uuid == uuid).map_or(u32::MAX, |s| s.index);
                    let code = match ev.event_data {
                        Some(XidError::Value(v)) => v,
                        _ => 0,
                    };
                    out.push(XidEvent { gpu, gi_id: None, code });
                }
                Err(NvmlError::Timeout) => return Ok(out),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// The raw NVML calls nvml-wrapper does not wrap (or wraps wrongly), each behind a safe
/// function. Every `unsafe` block calls a function pointer nvml-wrapper-sys resolved from
/// the loaded library, with pointers to locals that outlive the call.
#[allow(unsafe_code)]
pub mod raw {
    use nvml_wrapper::Device;
    use nvml_wrapper::Nvml;
    use nvml_wrapper::error::{NvmlError, nvml_try};
    use nvml_wrapper_sys::bindings::{
        NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
        NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE, NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE,
        nvmlComputeInstance_t, nvmlComputeInstanceProfileInfo_t, nvmlDevice_t, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t,
        nvmlGpuInstancePlacement_t, nvmlReturn_t,
    };

    use super::super::gpu::MigDevice;
    use super::super::mig::{self, CiSplit, GiProfile, Placed};
    use super::super::migctl::{GpuInstance, MigError, ModeChange};

    // NVML return codes the MIG calls distinguish (nvml.h).
    const SUCCESS: nvmlReturn_t = 0;
    const NOT_SUPPORTED: nvmlReturn_t = 3;
    const NOT_FOUND: nvmlReturn_t = 6;
    const RESET_REQUIRED: nvmlReturn_t = 18;
    const IN_USE: nvmlReturn_t = 19;
    const INSUFFICIENT_RESOURCES: nvmlReturn_t = 23;

    /// The return code behind a wrapper error, where it has one.
    pub fn code_of(e: &NvmlError) -> nvmlReturn_t {
        match e {
            NvmlError::NotSupported => NOT_SUPPORTED,
            NvmlError::NotFound => NOT_FOUND,
            NvmlError::InUse => IN_USE,
            NvmlError::ResetRequired => RESET_REQUIRED,
            _ => 999,
        }
    }

    pub fn mig_err(gpu: u32, call: &'static str, code: nvmlReturn_t, detail: String) -> MigError {
        match code {
            INSUFFICIENT_RESOURCES => MigError::InsufficientResources { gpu, call, detail },
            IN_USE => MigError::InUse { gpu, call },
            NOT_FOUND => MigError::NotFound { gpu, call, gi: 0 },
            _ => MigError::NotSupported { gpu, call, detail: format!("NVML error {code}: {detail}") },
        }
    }

    fn check(gpu: u32, call: &'static str, code: nvmlReturn_t) -> Result<(), MigError> {
        if code == SUCCESS { Ok(()) } else { Err(mig_err(gpu, call, code, format!("return code {code}"))) }
    }

    fn missing(gpu: u32, call: &'static str) -> MigError {
        MigError::NotSupported { gpu, call, detail: "this libnvidia-ml lacks the function".into() }
    }

    /// Enables or disables MIG mode; a change the driver can only apply after a GPU reset
    /// (processes hold it, or the platform needs a reboot) comes back as `Pending`.
    pub fn set_mig_mode(nvml: &Nvml, d: &Device<'_>, gpu: u32, enabled: bool) -> Result<ModeChange, MigError> {
        let call = "set MIG mode";
        let f = nvml.lib().nvmlDeviceSetMigMode.as_ref().map_err(|_| missing(gpu, call))?;
        let mut activation: nvmlReturn_t = SUCCESS;
        // SAFETY: `f` comes from the loaded library; `activation` outlives the call.
        let code = unsafe { f(handle(d), u32::from(enabled), &mut activation) };
        check(gpu, call, code)?;
        Ok(if activation == SUCCESS { ModeChange::Applied } else { ModeChange::Pending })
    }

    fn gi_handle(nvml: &Nvml, d: &Device<'_>, gpu: u32, gi_id: u32) -> Result<nvmlGpuInstance_t, MigError> {
        let f = nvml.lib().nvmlDeviceGetGpuInstanceById.as_ref().map_err(|_| missing(gpu, "get GPU instance"))?;
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        let code = unsafe { f(handle(d), gi_id, &mut gi) };
        if code == NOT_FOUND {
            return Err(MigError::NotFound { gpu, call: "get GPU instance", gi: gi_id });
        }
        check(gpu, "get GPU instance", code)?;
        Ok(gi)
    }

    /// Every GPU instance on the GPU, with its profile and placement.
    pub fn list_instances(nvml: &Nvml, d: &Device<'_>, gpu: u32, table: &'static [GiProfile]) -> Result<Vec<GpuInstance>, MigError> {
        let call = "list GPU instances";
        let get = nvml.lib().nvmlDeviceGetGpuInstances.as_ref().map_err(|_| missing(gpu, call))?;
        let info_fn = nvml.lib().nvmlGpuInstanceGetInfo.as_ref().map_err(|_| missing(gpu, call))?;
        let mut out = Vec::new();
        for p in table {
            // At most 7 instances of one profile fit a GPU; 8 leaves room.
            let mut handles: [nvmlGpuInstance_t; 8] = [std::ptr::null_mut(); 8];
            let mut count = 0u32;
            // SAFETY: `handles` has room for 8; NVML writes `count` <= 8 handles.
            let code = unsafe { get(handle(d), p.id, handles.as_mut_ptr(), &mut count) };
            if code == NOT_SUPPORTED || code == NOT_FOUND {
                continue;
            }
            check(gpu, call, code)?;
            for &gi in handles.iter().take(count.min(8) as usize) {
                // SAFETY: all-zero is a valid value of this plain C struct.
                let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `gi` was just returned by NVML; `info` outlives the call.
                check(gpu, call, unsafe { info_fn(gi, &mut info) })?;
                let sizes = ci_sizes_of(nvml, gi, gpu)?;
                // A split NVML reports but our rules do not describe is kept as "full" only if
                // it is one CI spanning the instance; anything else is compared as found.
                let cis = CiSplit::new(p, &sizes).unwrap_or(CiSplit::FULL);
                out.push(GpuInstance { gi_id: info.id, placed: Placed { profile: p, start: info.placement.start, cis } });
            }
        }
        out.sort_by_key(|i| i.gi_id);
        Ok(out)
    }

    /// Compute slices of each compute instance in a GPU instance.
    fn ci_sizes_of(nvml: &Nvml, gi: nvmlGpuInstance_t, gpu: u32) -> Result<Vec<u32>, MigError> {
        let call = "list compute instances";
        let list = nvml.lib().nvmlGpuInstanceGetComputeInstances.as_ref().map_err(|_| missing(gpu, call))?;
        let mut sizes = Vec::new();
        for (slices, profile) in [
            (1, NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE),
            (2, NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE),
            (3, NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE),
            (4, NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE),
            (7, NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE),
        ] {
            let mut cis: [nvmlComputeInstance_t; 8] = [std::ptr::null_mut(); 8];
            let mut count = 0u32;
            // SAFETY: `cis` has room for 8; NVML writes `count` <= 8 handles.
            let code = unsafe { list(gi, profile, cis.as_mut_ptr(), &mut count) };
            if code == NOT_SUPPORTED || code == NOT_FOUND {
                continue;
            }
            check(gpu, call, code)?;
            sizes.extend(std::iter::repeat_n(slices, count.min(8) as usize));
        }
        Ok(sizes)
    }

    /// NVML's compute-instance profile for a compute instance of `slices` compute slices.
    fn ci_profile(slices: u32) -> u32 {
        match slices {
            1 => NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
            2 => NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
            3 => NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE,
            4 => NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
            _ => NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE,
        }
    }

    /// Creates a GPU instance at an explicit placement and its compute instances (one
    /// spanning it unless `cis` splits it), so the MIG devices are usable at once.
    pub fn create_instance(
        nvml: &Nvml,
        d: &Device<'_>,
        gpu: u32,
        p: &'static GiProfile,
        start: u32,
        cis: CiSplit,
    ) -> Result<GpuInstance, MigError> {
        let call = "create GPU instance";
        let create = nvml.lib().nvmlDeviceCreateGpuInstanceWithPlacement.as_ref().map_err(|_| missing(gpu, call))?;
        let info_fn = nvml.lib().nvmlGpuInstanceGetInfo.as_ref().map_err(|_| missing(gpu, call))?;
        let ci_info = nvml.lib().nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref().map_err(|_| missing(gpu, call))?;
        let ci_create = nvml.lib().nvmlGpuInstanceCreateComputeInstance.as_ref().map_err(|_| missing(gpu, call))?;
        let placement = nvmlGpuInstancePlacement_t { start, size: p.size };
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: `placement` and `gi` are locals that outlive the call.
        let code = unsafe { create(handle(d), p.id, &placement, &mut gi) };
        if code != SUCCESS {
            return Err(mig_err(gpu, call, code, format!("{} at {start}: NVML return code {code}", p.name)));
        }
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` was just created; `info` outlives the call.
        check(gpu, call, unsafe { info_fn(gi, &mut info) })?;
        for slices in cis.sizes(p) {
            // SAFETY: as above.
            let mut cip: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `gi` is live; `cip` outlives the call.
            check(gpu, "compute instance profile", unsafe {
                ci_info(gi, ci_profile(slices), NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, &mut cip)
            })?;
            let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
            // SAFETY: `gi` is live; `ci` outlives the call.
            let code = unsafe { ci_create(gi, cip.id, &mut ci) };
            if code != SUCCESS {
                return Err(mig_err(gpu, "create compute instance", code, format!("{slices}c in {} at {start}", p.name)));
            }
        }
        Ok(GpuInstance { gi_id: info.id, placed: Placed { profile: p, start, cis } })
    }

    /// Destroys a GPU instance and its compute instances (NVML refuses a GPU instance that
    /// still has compute instances).
    pub fn destroy_instance(nvml: &Nvml, d: &Device<'_>, gpu: u32, gi_id: u32) -> Result<(), MigError> {
        let call = "destroy GPU instance";
        let gi = gi_handle(nvml, d, gpu, gi_id)?;
        let list = nvml.lib().nvmlGpuInstanceGetComputeInstances.as_ref().map_err(|_| missing(gpu, call))?;
        let ci_destroy = nvml.lib().nvmlComputeInstanceDestroy.as_ref().map_err(|_| missing(gpu, call))?;
        let gi_destroy = nvml.lib().nvmlGpuInstanceDestroy.as_ref().map_err(|_| missing(gpu, call))?;
        for profile in 0..=NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE {
            let mut cis: [nvmlComputeInstance_t; 8] = [std::ptr::null_mut(); 8];
            let mut count = 0u32;
            // SAFETY: `cis` has room for 8; NVML writes `count` <= 8 handles.
            let code = unsafe { list(gi, profile, cis.as_mut_ptr(), &mut count) };
            if code == NOT_SUPPORTED || code == NOT_FOUND {
                continue;
            }
            check(gpu, "list compute instances", code)?;
            for &ci in cis.iter().take(count.min(8) as usize) {
                // SAFETY: `ci` was just returned by NVML.
                let code = unsafe { ci_destroy(ci) };
                if code != SUCCESS {
                    return Err(mig_err(gpu, "destroy compute instance", code, format!("GPU instance {gi_id}")));
                }
            }
        }
        // SAFETY: `gi` is live until this call destroys it.
        let code = unsafe { gi_destroy(gi) };
        if code != SUCCESS {
            return Err(mig_err(gpu, call, code, format!("GPU instance {gi_id}")));
        }
        Ok(())
    }

    fn handle(d: &Device<'_>) -> nvmlDevice_t {
        // SAFETY: the handle is only passed back to NVML while `d` (and its Nvml) is alive.
        unsafe { d.handle() }
    }

    /// The GPU instance id of a MIG device handle.
    pub fn gpu_instance_id(nvml: &Nvml, mig: &Device<'_>) -> Result<u32, NvmlError> {
        let f = nvml.lib().nvmlDeviceGetGpuInstanceId.as_ref().map_err(|_| NvmlError::FunctionNotFound)?;
        let mut id = 0u32;
        // SAFETY: `f` comes from the loaded library; `id` outlives the call.
        nvml_try(unsafe { f(handle(mig), &mut id) })?;
        Ok(id)
    }

    /// The compute instance id of a MIG device handle.
    pub fn compute_instance_id(nvml: &Nvml, mig: &Device<'_>) -> Result<u32, NvmlError> {
        let f = nvml.lib().nvmlDeviceGetComputeInstanceId.as_ref().map_err(|_| NvmlError::FunctionNotFound)?;
        let mut id = 0u32;
        // SAFETY: as above.
        nvml_try(unsafe { f(handle(mig), &mut id) })?;
        Ok(id)
    }

    /// A GPU instance's profile id and placement.
    pub fn gpu_instance_info(nvml: &Nvml, parent: &Device<'_>, gi_id: u32) -> Result<(u32, u32, u32), NvmlError> {
        let by_id = nvml.lib().nvmlDeviceGetGpuInstanceById.as_ref().map_err(|_| NvmlError::FunctionNotFound)?;
        let info_fn = nvml.lib().nvmlGpuInstanceGetInfo.as_ref().map_err(|_| NvmlError::FunctionNotFound)?;
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: `gi` is an out-pointer to a local; NVML writes an opaque handle.
        nvml_try(unsafe { by_id(handle(parent), gi_id, &mut gi) })?;
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` was just returned by NVML; `info` outlives the call.
        nvml_try(unsafe { info_fn(gi, &mut info) })?;
        Ok((info.profileId, info.placement.start, info.placement.size))
    }

    /// Every placement NVML allows for a GPU-instance profile (the list nvml-wrapper's
    /// `possible_placements` loses).
    pub fn possible_placements(nvml: &Nvml, d: &Device<'_>, profile_id: u32) -> Result<Vec<(u32, u32)>, NvmlError> {
        let f = nvml.lib().nvmlDeviceGetGpuInstancePossiblePlacements_v2.as_ref().map_err(|_| NvmlError::FunctionNotFound)?;
        let mut count = 0u32;
        // SAFETY: a null array with a count pointer asks NVML for the count only.
        nvml_try(unsafe { f(handle(d), profile_id, std::ptr::null_mut(), &mut count) })?;
        let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
        // SAFETY: `buf` holds `count` initialised elements; NVML writes at most `count` and
        // updates `count` to the number written, which bounds the truncate below.
        nvml_try(unsafe { f(handle(d), profile_id, buf.as_mut_ptr(), &mut count) })?;
        buf.truncate(count as usize);
        Ok(buf.into_iter().map(|p| (p.start, p.size)).collect())
    }

    /// A MIG device and its (used, free) memory in bytes, when NVML reports it.
    pub type MigWithMemory = (MigDevice, Option<(u64, u64)>);

    /// MIG devices of a MIG-enabled GPU, with ids, profile and placement, and each one's
    /// (used, free) memory in bytes when NVML reports it.
    pub fn mig_devices(nvml: &Nvml, parent: &Device<'_>, pci_device_id: u32) -> Result<Vec<MigWithMemory>, String> {
        let table = mig::profiles_for(pci_device_id);
        let max = parent.mig_device_count().map_err(|e| format!("max MIG devices: {e}"))?;
        let mut out = Vec::new();
        for i in 0..max {
            let m = match parent.mig_device_by_index(i) {
                Ok(m) => m,
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(format!("MIG device {i}: {e}")),
            };
            let uuid = m.uuid().map_err(|e| format!("MIG device {i} uuid: {e}"))?;
            let gi_id = gpu_instance_id(nvml, &m).map_err(|e| format!("MIG device {i} GPU instance id: {e}"))?;
            let ci_id = compute_instance_id(nvml, &m).map_err(|e| format!("MIG device {i} compute instance id: {e}"))?;
            let (profile_id, start, size) =
                gpu_instance_info(nvml, parent, gi_id).map_err(|e| format!("GPU instance {gi_id} info: {e}"))?;
            let mem = m.memory_info().ok();
            let memory_bytes = mem.as_ref().map_or(0, |x| x.total);
            let profile = table
                .and_then(|t| t.iter().find(|p| p.id == profile_id))
                .map_or_else(|| format!("profile-{profile_id}"), |p| p.name.to_owned());
            let dev = MigDevice { gi_id, ci_id, profile, uuid, placement_start: start, placement_size: size, memory_bytes };
            out.push((dev, mem.map(|x| (x.used, x.free))));
        }
        out.sort_by_key(|(d, _)| (d.gi_id, d.ci_id));
        Ok(out)
    }
}

/// MIG control through NVML. Mode changes and instance create/destroy go straight to the
/// raw calls so NVML's own return codes (insufficient resources, in use, reset required)
/// reach the planner's error type unchanged. `hearth partition plan` only ever calls the
/// read-only half (`mig_mode`, `list`).
#[derive(Debug)]
pub struct NvmlMig {
    nvml: &'static Nvml,
    /// PCI device id per GPU index, for the profile table.
    pci_device_ids: Vec<u32>,
}

impl NvmlMig {
    pub fn new(gpus: &NvmlGpus) -> Self {
        Self { nvml: gpus.nvml, pci_device_ids: gpus.statics.iter().map(|s| s.pci_device_id).collect() }
    }

    fn device(&self, gpu: u32) -> Result<Device<'static>, super::migctl::MigError> {
        self.nvml.device_by_index(gpu).map_err(|_| super::migctl::MigError::NoGpu(gpu))
    }

    fn table(&self, gpu: u32) -> &'static [super::mig::GiProfile] {
        self.pci_device_ids.get(gpu as usize).and_then(|&id| super::mig::profiles_for(id)).unwrap_or(&[])
    }
}

impl super::migctl::MigControl for NvmlMig {
    fn mig_mode(&self, gpu: u32) -> Result<(bool, bool), super::migctl::MigError> {
        let m = self.device(gpu)?.mig_mode().map_err(|e| raw::mig_err(gpu, "get MIG mode", raw::code_of(&e), e.to_string()))?;
        Ok((m.current != 0, m.pending != 0))
    }

    fn set_mig_mode(&self, gpu: u32, enabled: bool) -> Result<super::migctl::ModeChange, super::migctl::MigError> {
        raw::set_mig_mode(self.nvml, &self.device(gpu)?, gpu, enabled)
    }

    fn list(&self, gpu: u32) -> Result<Vec<super::migctl::GpuInstance>, super::migctl::MigError> {
        raw::list_instances(self.nvml, &self.device(gpu)?, gpu, self.table(gpu))
    }

    fn create(
        &self,
        gpu: u32,
        profile: &'static super::mig::GiProfile,
        start: u32,
        cis: super::mig::CiSplit,
    ) -> Result<super::migctl::GpuInstance, super::migctl::MigError> {
        raw::create_instance(self.nvml, &self.device(gpu)?, gpu, profile, start, cis)
    }

    fn destroy(&self, gpu: u32, gi_id: u32) -> Result<(), super::migctl::MigError> {
        raw::destroy_instance(self.nvml, &self.device(gpu)?, gpu, gi_id)
    }
}
