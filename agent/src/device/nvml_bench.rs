//! `hearth gpu bench`: Hearth's per-GPU collection sweep against the anchor, a plain loop
//! of the raw NVML C calls the sweep needs (through nvml-wrapper-sys function pointers, no
//! wrapper, no bookkeeping), interleaved in one process so both see the same GPU, driver
//! and load. Read-only: every call is a query.

use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::*;

use super::gpu::{GpuBackend, GpuSample};
use super::nvml::NvmlGpus;

/// Timings of one side, per sweep over all GPUs.
#[derive(Debug, Clone)]
pub struct Side {
    pub samples: Vec<Duration>,
}

impl Side {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.samples.clone();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
    }
    pub fn mean(&self) -> Duration {
        self.samples.iter().sum::<Duration>() / self.samples.len().max(1) as u32
    }
}

#[derive(Debug)]
pub struct BenchReport {
    pub gpus: u32,
    pub rounds: u32,
    pub hearth: Side,
    pub raw: Side,
    pub raw_calls_per_sweep: u64,
    pub gpm_units: Vec<(String, String)>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "collection sweep over {} GPU(s), {} interleaved rounds ({} raw NVML calls per sweep)",
            self.gpus, self.rounds, self.raw_calls_per_sweep
        )?;
        writeln!(f, "{:<22} {:>10} {:>10} {:>10}", "", "mean us", "p50 us", "p99 us")?;
        for (name, s) in [("hearth sweep", &self.hearth), ("raw NVML loop", &self.raw)] {
            writeln!(f, "{:<22} {:>10.1} {:>10.1} {:>10.1}", name, us(s.mean()), us(s.pct(0.5)), us(s.pct(0.99)))?;
        }
        if !self.gpm_units.is_empty() {
            let u: Vec<String> = self.gpm_units.iter().map(|(n, u)| format!("{n} [{u}]")).collect();
            writeln!(f, "GPM metrics as NVML names them: {}", u.join(", "))?;
        }
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
        writeln!(
            f,
            "ratio hearth/raw: mean {:.3}, p50 {:.3} (target <= 1.2)",
            ratio(self.hearth.mean(), self.raw.mean()),
            ratio(self.hearth.pct(0.5), self.raw.pct(0.5))
        )
    }
}

/// Runs `rounds` interleaved rounds (alternating which side goes first).
pub fn run(gpus: &mut NvmlGpus, rounds: u32, pause: Duration) -> Result<BenchReport, String> {
    let statics = gpus.gpus().map_err(|e| e.to_string())?;
    let n = statics.len() as u32;
    let mut anchor = RawLoop::new(gpus.nvml().lib(), n, statics.iter().map(|s| s.gpm_supported).collect())?;
    let (mut hearth, mut raw) = (Vec::new(), Vec::new());
    let hearth_sweep = |g: &mut NvmlGpus| {
        let t = Instant::now();
        let _ = g.poll_xids();
        for i in 0..n {
            let mut s = GpuSample::default();
            g.sample(i, &mut s);
            std::hint::black_box(&s);
        }
        t.elapsed()
    };
    // Warm-up: first GPM samples, lazy driver state.
    hearth_sweep(gpus);
    anchor.sweep();
    for r in 0..rounds {
        if r % 2 == 0 {
            hearth.push(hearth_sweep(gpus));
            raw.push(anchor.sweep());
        } else {
            raw.push(anchor.sweep());
            hearth.push(hearth_sweep(gpus));
        }
        std::thread::sleep(pause);
    }
    Ok(BenchReport {
        gpus: n,
        rounds,
        hearth: Side { samples: hearth },
        raw: Side { samples: raw },
        raw_calls_per_sweep: anchor.calls,
        gpm_units: gpus.gpm_units().to_vec(),
    })
}

/// The anchor: the same queries as `NvmlGpus::sample`, as bare C calls into stack buffers.
struct RawLoop<'a> {
    lib: &'a NvmlLib,
    n: u32,
    gpm: Vec<bool>,
    /// Previous GPM sample per GPU and per (GPU, GPU instance).
    prev: Vec<nvmlGpmSample_t>,
    prev_mig: Vec<[nvmlGpmSample_t; 8]>,
    events: nvmlEventSet_t,
    calls: u64,
}

macro_rules! f {
    ($lib:expr, $name:ident) => {
        $lib.$name.as_ref().map_err(|e| format!(concat!(stringify!($name), ": {}"), e))?
    };
}

impl<'a> RawLoop<'a> {
    #[allow(unsafe_code)]
    fn new(lib: &'a NvmlLib, n: u32, gpm: Vec<bool>) -> Result<Self, String> {
        let create = f!(lib, nvmlEventSetCreate);
        let by_index = f!(lib, nvmlDeviceGetHandleByIndex_v2);
        let register = f!(lib, nvmlDeviceRegisterEvents);
        let mut events: nvmlEventSet_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { create(&mut events) };
        for i in 0..n {
            let mut d: nvmlDevice_t = std::ptr::null_mut();
            // SAFETY: out-pointers to locals; `events` was created above.
            unsafe {
                by_index(i, &mut d);
                register(d, u64::from(nvmlEventTypeXidCriticalError), events);
            }
        }
        let null = std::ptr::null_mut();
        Ok(Self { lib, n, gpm, prev: vec![null; n as usize], prev_mig: vec![[null; 8]; n as usize], events, calls: 0 })
    }

    /// One sweep over all GPUs. Failures are ignored: the anchor only has to make the calls.
    #[allow(unsafe_code)]
    fn sweep(&mut self) -> Duration {
        let lib = self.lib;
        let t = Instant::now();
        let mut calls = 0u64;
        // SAFETY: every function pointer was resolved from the loaded library (checked in
        // `new` or by `if let`), every out-pointer points at a live local or a buffer sized as
        // NVML expects, and GPM samples are allocated before use and freed once replaced.
        unsafe {
            if let Ok(wait) = &lib.nvmlEventSetWait_v2 {
                let mut data: nvmlEventData_t = std::mem::zeroed();
                while wait(self.events, &mut data, 0) == 0 {
                    calls += 1;
                }
                calls += 1;
            }
            for i in 0..self.n {
                let mut d: nvmlDevice_t = std::ptr::null_mut();
                if let Ok(g) = &lib.nvmlDeviceGetHandleByIndex_v2 {
                    g(i, &mut d);
                }
                let mut v = 0u32;
                if let Ok(c) = &lib.nvmlDeviceGetClockInfo {
                    c(d, nvmlClockType_enum_NVML_CLOCK_SM, &mut v);
                    c(d, nvmlClockType_enum_NVML_CLOCK_MEM, &mut v);
                }
                if let Ok(c) = &lib.nvmlDeviceGetTemperature {
                    c(d, nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU, &mut v);
                }
                if let Ok(c) = &lib.nvmlDeviceGetPowerUsage {
                    c(d, &mut v);
                }
                let mut fields: [nvmlFieldValue_t; 10] = std::mem::zeroed();
                for (slot, id) in fields.iter_mut().zip([82u32, 83, 94, 142, 143, 144, 145, 29, 30, 4]) {
                    slot.fieldId = id;
                }
                if let Ok(c) = &lib.nvmlDeviceGetFieldValues {
                    c(d, 10, fields.as_mut_ptr());
                }
                let mut u: nvmlUtilization_t = std::mem::zeroed();
                if let Ok(c) = &lib.nvmlDeviceGetUtilizationRates {
                    c(d, &mut u);
                }
                let mut period = 0u32;
                if let Ok(c) = &lib.nvmlDeviceGetEncoderUtilization {
                    c(d, &mut v, &mut period);
                }
                if let Ok(c) = &lib.nvmlDeviceGetDecoderUtilization {
                    c(d, &mut v, &mut period);
                }
                let mut mem: nvmlMemory_v2_t = std::mem::zeroed();
                mem.version = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as u32;
                if let Ok(c) = &lib.nvmlDeviceGetMemoryInfo_v2 {
                    c(d, &mut mem);
                }
                let (mut cur, mut pend) = (0u32, 0u32);
                if let Ok(c) = &lib.nvmlDeviceGetMigMode {
                    c(d, &mut cur, &mut pend);
                }
                calls += 12;
                if let Ok(c) = &lib.nvmlDeviceGetComputeRunningProcesses_v3 {
                    let mut count = 0u32;
                    c(d, &mut count, std::ptr::null_mut());
                    calls += 1;
                    if count > 0 {
                        let mut procs: Vec<nvmlProcessInfo_t> = vec![std::mem::zeroed(); count as usize + 5];
                        count += 5;
                        c(d, &mut count, procs.as_mut_ptr());
                        calls += 1;
                    }
                }
                let gpm = self.gpm[i as usize];
                if gpm {
                    calls += self.gpm_step(d, None, i);
                }
                if cur == 1 {
                    calls += self.mig_walk(d, i, gpm);
                }
            }
        }
        self.calls = calls;
        t.elapsed()
    }

    /// A GPM sample of the GPU (or one GPU instance), metrics against the previous one.
    #[allow(unsafe_code)]
    unsafe fn gpm_step(&mut self, d: nvmlDevice_t, gi: Option<u32>, i: u32) -> u64 {
        let lib = self.lib;
        let (Ok(alloc), Ok(get), Ok(mig_get), Ok(metrics), Ok(free)) =
            (&lib.nvmlGpmSampleAlloc, &lib.nvmlGpmSampleGet, &lib.nvmlGpmMigSampleGet, &lib.nvmlGpmMetricsGet, &lib.nvmlGpmSampleFree)
        else {
            return 0;
        };
        let mut s: nvmlGpmSample_t = std::ptr::null_mut();
        let mut calls = 2;
        // SAFETY: see `sweep`.
        unsafe {
            alloc(&mut s);
            match gi {
                None => get(d, s),
                Some(g) => mig_get(d, g, s),
            };
            let slot = match gi {
                None => &mut self.prev[i as usize],
                Some(g) => &mut self.prev_mig[i as usize][(g as usize).min(7)],
            };
            if !slot.is_null() {
                let mut req: nvmlGpmMetricsGet_t = std::mem::zeroed();
                req.version = NVML_GPM_METRICS_GET_VERSION;
                req.numMetrics = 5;
                req.sample1 = *slot;
                req.sample2 = s;
                for (m, id) in req.metrics.iter_mut().zip([
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_GRAPHICS_UTIL,
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL,
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL,
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_PCIE_TX_PER_SEC,
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_PCIE_RX_PER_SEC,
                ]) {
                    m.metricId = id;
                }
                metrics(&mut req);
                free(*slot);
                calls += 2;
            }
            *slot = s;
        }
        calls
    }

    /// The MIG walk: each MIG device's handle, UUID, ids, GPU instance info and memory.
    #[allow(unsafe_code)]
    unsafe fn mig_walk(&mut self, d: nvmlDevice_t, i: u32, gpm: bool) -> u64 {
        let lib = self.lib;
        let (Ok(max), Ok(by_index), Ok(uuid), Ok(gi_id), Ok(ci_id), Ok(gi_by_id), Ok(gi_info), Ok(mem_fn)) = (
            &lib.nvmlDeviceGetMaxMigDeviceCount,
            &lib.nvmlDeviceGetMigDeviceHandleByIndex,
            &lib.nvmlDeviceGetUUID,
            &lib.nvmlDeviceGetGpuInstanceId,
            &lib.nvmlDeviceGetComputeInstanceId,
            &lib.nvmlDeviceGetGpuInstanceById,
            &lib.nvmlGpuInstanceGetInfo,
            &lib.nvmlDeviceGetMemoryInfo_v2,
        ) else {
            return 0;
        };
        let mut calls = 1;
        // SAFETY: see `sweep`.
        unsafe {
            let mut n = 0u32;
            max(d, &mut n);
            for k in 0..n {
                let mut m: nvmlDevice_t = std::ptr::null_mut();
                calls += 1;
                if by_index(d, k, &mut m) != 0 {
                    continue;
                }
                let mut buf = [0 as std::os::raw::c_char; 96];
                uuid(m, buf.as_mut_ptr(), 96);
                let (mut g, mut c) = (0u32, 0u32);
                gi_id(m, &mut g);
                ci_id(m, &mut c);
                let mut gih: nvmlGpuInstance_t = std::ptr::null_mut();
                gi_by_id(d, g, &mut gih);
                let mut info: nvmlGpuInstanceInfo_t = std::mem::zeroed();
                gi_info(gih, &mut info);
                let mut mem: nvmlMemory_v2_t = std::mem::zeroed();
                mem.version = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as u32;
                mem_fn(m, &mut mem);
                calls += 6;
                if gpm {
                    calls += self.gpm_step(d, Some(g), i);
                }
            }
        }
        calls
    }
}
