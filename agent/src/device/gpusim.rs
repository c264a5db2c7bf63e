//! Simulated NVIDIA telemetry: the products of `sim`, the MIG layout of a shared `SimMig`
//! (so a partition applied on the simulator shows up in the metrics), readings that move
//! like a GPU under a daily-ish load (utilisation drives power, temperature and clocks;
//! energy integrates power), and the failures NVML produces: a call failing on one GPU,
//! a GPU lost altogether, XID events. Tests and `hearth local` inject them through
//! `SimFaults`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::gpu::{Call, DriverInfo, GpuBackend, GpuProcess, GpuSample, GpuStatic, MigDevice, MigReading, ProfReading, XidEvent, record};
use super::migctl::{MigControl, SimMig};
use super::{Accelerator, DeviceError, Vendor};

/// Driver the simulator claims to be (the one the real H100 readings came from).
pub const SIM_DRIVER: &str = "580.159.04";

/// Faults to inject, shared between the backend and whoever drives it.
#[derive(Debug, Default)]
pub struct SimFaults {
    inner: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    failing: Vec<(u32, Call)>,
    lost: Vec<u32>,
    xids: Vec<XidEvent>,
    processes: Vec<(u32, GpuProcess)>,
}

impl SimFaults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// `call` fails on `gpu` until cleared.
    pub fn fail(&self, gpu: u32, call: Call) {
        self.lock().failing.push((gpu, call));
    }
    /// The GPU stops answering (every call fails), as after XID 79.
    pub fn lose(&self, gpu: u32) {
        self.lock().lost.push(gpu);
    }
    pub fn clear(&self) {
        let mut s = self.lock();
        s.failing.clear();
        s.lost.clear();
    }
    pub fn xid(&self, gpu: u32, gi_id: Option<u32>, code: u64) {
        self.lock().xids.push(XidEvent { gpu, gi_id, code });
    }
    pub fn add_process(&self, gpu: u32, p: GpuProcess) {
        self.lock().processes.push((gpu, p));
    }
}

/// A clock for the simulator that moves only when told, so a test steps time instead of
/// sleeping; clones share the time.
#[derive(Debug, Clone, Default)]
pub struct SimClock(Arc<Mutex<Duration>>);

impl SimClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    fn elapsed(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the readings' time comes from: the wall clock since start, or a `SimClock`.
#[derive(Debug)]
enum Clock {
    Wall(Instant),
    Sim(SimClock),
}

#[derive(Debug)]
pub struct SimGpus {
    gpus: Vec<Accelerator>,
    mig: Arc<SimMig>,
    faults: Arc<SimFaults>,
    clock: Clock,
    /// Energy so far and when it was last integrated, per GPU.
    energy: Vec<(f64, f64)>,
}

impl SimGpus {
    /// The NVIDIA devices of `accelerators`, indexed as NVML would (0..n in order).
    pub fn new(accelerators: &[Accelerator], mig: Arc<SimMig>, faults: Arc<SimFaults>) -> Self {
        let gpus: Vec<_> = accelerators.iter().filter(|a| a.vendor == Vendor::Nvidia).cloned().collect();
        let energy = vec![(0.0, 0.0); gpus.len()];
        Self { gpus, mig, faults, clock: Clock::Wall(Instant::now()), energy }
    }

    /// Takes time from `clock` instead of the wall clock (it starts at zero).
    pub fn with_clock(mut self, clock: SimClock) -> Self {
        self.clock = Clock::Sim(clock);
        self
    }

    fn fails(&self, gpu: u32, call: Call) -> bool {
        let f = self.faults.lock();
        f.lost.contains(&gpu) || f.failing.contains(&(gpu, call))
    }
}

/// "MIG-" and a UUID derived from the parent and the instance, stable per placement.
fn mig_uuid(parent: &str, gi: u32, start: u32) -> String {
    let h = |seed: u64| {
        parent
            .bytes()
            .chain(gi.to_le_bytes())
            .chain(start.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    };
    let hex = format!("{:016x}{:016x}", h(1), h(2));
    format!("MIG-{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// A load curve per GPU: 0..1, slow swell plus a faster ripple, phase-shifted by index.
fn load(t: f64, index: u32) -> f64 {
    let i = f64::from(index);
    (0.55 + 0.35 * (t / 47.0 + i * 0.9).sin() + 0.1 * (t / 5.0 + i).sin()).clamp(0.0, 1.0)
}

fn err(call: Call) -> Result<Option<u32>, String> {
    Err(format!("{}: Unknown Error", call.as_str()))
}

impl GpuBackend for SimGpus {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn driver(&self) -> Result<DriverInfo, DeviceError> {
        Ok(DriverInfo { driver_version: SIM_DRIVER.into(), cuda_version: "13.0".into() })
    }

    fn gpus(&mut self) -> Result<Vec<GpuStatic>, DeviceError> {
        Ok(self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, a)| GpuStatic {
                index: i as u32,
                uuid: a.uuid.clone(),
                name: a.product.clone(),
                pci_bus_id: a.pci_bus_id.clone(),
                pci_device_id: a.pci_device_id,
                memory_bytes: a.memory_bytes,
                // Hopper has GPM; Ampere does not.
                gpm_supported: !a.product.contains("A100"),
            })
            .collect())
    }

    fn sample(&mut self, index: u32, out: &mut GpuSample) {
        let Some(a) = self.gpus.get(index as usize).cloned() else {
            out.failed.push((Call::Handle, format!("no GPU {index}")));
            return;
        };
        if self.faults.lock().lost.contains(&index) {
            out.failed.push((Call::Handle, "GPU is lost".into()));
            return;
        }
        let t = match &self.clock {
            Clock::Wall(start) => start.elapsed(),
            Clock::Sim(c) => c.elapsed(),
        }
        .as_secs_f64();
        let u = load(t, index);
        let hopper = !a.product.contains("A100");
        let (max_power, idle_power, sm_max, mem_clock) = if hopper { (700.0, 72.0, 1980, 2619) } else { (400.0, 55.0, 1410, 1593) };
        let power = idle_power + u * (max_power - idle_power);
        let (e, last) = &mut self.energy[index as usize];
        *e += power * (t - *last) * 1000.0;
        *last = t;
        let energy = *e as u64;
        let ok = |v| Ok(Some(v));
        let pick = |s: &Self, c: Call, v: u32| if s.fails(index, c) { err(c) } else { ok(v) };

        let r = &mut out.reading;
        let sm = pick(self, Call::Clocks, (sm_max as f64 * (0.5 + 0.5 * u)) as u32);
        r.sm_clock_mhz = record(&mut out.failed, Call::Clocks, sm);
        r.mem_clock_mhz = record(&mut out.failed, Call::Clocks, pick(self, Call::Clocks, mem_clock));
        r.gpu_temp_c = record(&mut out.failed, Call::Temperature, pick(self, Call::Temperature, 32 + (u * 40.0) as u32));
        r.mem_temp_c = record(&mut out.failed, Call::MemoryTemperature, pick(self, Call::MemoryTemperature, 38 + (u * 42.0) as u32));
        r.power_w = record(&mut out.failed, Call::Power, pick(self, Call::Power, 0)).map(|_| power);
        r.energy_mj = record(&mut out.failed, Call::Energy, pick(self, Call::Energy, 0)).map(|_| energy);
        r.pcie_replay = record(&mut out.failed, Call::PcieReplay, pick(self, Call::PcieReplay, 0)).map(u64::from);
        let (mig_on, mig_pending) = self.mig.mig_mode(index).unwrap_or((false, false));
        let gpu_util = (u * 100.0) as u32;
        if record(&mut out.failed, Call::Utilization, pick(self, Call::Utilization, 0)).is_some() {
            // NVML reports no utilisation for a MIG-enabled GPU; the GPM family covers it.
            if !mig_on {
                r.gpu_util = Some(gpu_util);
                r.mem_copy_util = Some(gpu_util * 3 / 5);
            }
        }
        r.enc_util = record(&mut out.failed, Call::EncoderUtil, pick(self, Call::EncoderUtil, 0));
        r.dec_util = record(&mut out.failed, Call::DecoderUtil, pick(self, Call::DecoderUtil, 0));
        let total_mib = a.memory_bytes >> 20;
        let reserved = if hopper { 531 } else { 458 };
        if record(&mut out.failed, Call::Memory, pick(self, Call::Memory, 0)).is_some() {
            let used = ((total_mib - reserved) as f64 * (0.2 + 0.6 * u)) as u64;
            r.fb_used_mib = Some(used);
            r.fb_reserved_mib = Some(reserved);
            r.fb_free_mib = Some(total_mib - reserved - used);
        }
        if record(&mut out.failed, Call::RemappedRows, pick(self, Call::RemappedRows, 0)).is_some() {
            r.remapped_correctable = Some(0);
            r.remapped_uncorrectable = Some(0);
            r.remap_pending = Some(false);
            r.remap_failure = Some(false);
        }
        r.ecc_uncorrected_volatile = record(&mut out.failed, Call::Ecc, pick(self, Call::Ecc, 0)).map(u64::from);
        if record(&mut out.failed, Call::MigMode, pick(self, Call::MigMode, 0)).is_some() {
            r.mig_current = Some(mig_on);
            r.mig_pending = Some(mig_pending);
        }
        let prof = |u: f64| ProfReading {
            gr_engine_active: u,
            tensor_active: u * 0.62,
            dram_active: u * 0.45,
            pcie_tx_bytes: 2.0e9 * u,
            pcie_rx_bytes: 6.0e9 * u,
        };
        let gpm = hopper && record(&mut out.failed, Call::Gpm, pick(self, Call::Gpm, 0)).is_some();
        if gpm {
            r.prof = Some(prof(u));
        }
        if mig_on && record(&mut out.failed, Call::MigDevices, pick(self, Call::MigDevices, 0)).is_some() {
            let mut instances = self.mig.list(index).unwrap_or_default();
            instances.sort_by_key(|i| i.gi_id);
            for (k, gi) in instances.iter().enumerate() {
                let p = gi.placed.profile;
                let mu = load(t * 1.3, index * 8 + k as u32);
                let mem = p.memory_mib;
                let used = (mem as f64 * 0.8 * mu) as u64;
                // One MIG device per compute instance; they share the GPU instance's memory.
                for (ci, slices) in gi.placed.cis.sizes(p).into_iter().enumerate() {
                    let share = f64::from(slices) / f64::from(p.compute_slices);
                    r.migs.push(MigReading {
                        device: MigDevice {
                            gi_id: gi.gi_id,
                            ci_id: ci as u32,
                            profile: p.name.to_owned(),
                            uuid: mig_uuid(&a.uuid, gi.gi_id, gi.placed.start * 8 + ci as u32),
                            placement_start: gi.placed.start,
                            placement_size: p.size,
                            memory_bytes: mem << 20,
                        },
                        fb_used_mib: Some(used),
                        fb_free_mib: Some(mem - used),
                        prof: gpm.then(|| prof(mu * share)),
                    });
                }
            }
        }
        if record(&mut out.failed, Call::Processes, pick(self, Call::Processes, 0)).is_some() {
            r.processes = self.faults.lock().processes.iter().filter(|(g, _)| *g == index).map(|(_, p)| *p).collect();
        }
    }

    fn poll_xids(&mut self) -> Result<Vec<XidEvent>, String> {
        Ok(std::mem::take(&mut self.faults.lock().xids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Inventory;
    use crate::device::mig;
    use crate::device::sim::{SimInventory, SimSpec};

    fn sim(spec: &str) -> (SimGpus, Arc<SimMig>, Arc<SimFaults>) {
        let accs = SimInventory::new("n", &[SimSpec::parse(spec).unwrap()]).accelerators().unwrap();
        let ids: Vec<u32> = accs.iter().map(|a| a.pci_device_id).collect();
        let m = Arc::new(SimMig::new(&ids));
        let f = Arc::new(SimFaults::default());
        (SimGpus::new(&accs, m.clone(), f.clone()), m, f)
    }

    #[test]
    fn readings_are_plausible_and_energy_only_grows() {
        let (g, _, _) = sim("2xH100-80GB");
        let clock = SimClock::default();
        let mut g = g.with_clock(clock.clone());
        let mut a = GpuSample::default();
        g.sample(0, &mut a);
        assert!(a.failed.is_empty(), "{:?}", a.failed);
        let r = &a.reading;
        assert!((72.0..=700.0).contains(&r.power_w.unwrap()));
        assert!(r.gpu_util.unwrap() <= 100);
        assert_eq!(r.fb_used_mib.unwrap() + r.fb_free_mib.unwrap() + r.fb_reserved_mib.unwrap(), 81559);
        assert!(r.prof.is_some(), "H100 has GPM");
        clock.advance(Duration::from_millis(20));
        let mut b = GpuSample::default();
        g.sample(0, &mut b);
        assert!(b.reading.energy_mj.unwrap() > r.energy_mj.unwrap());
        // Energy integrates power: 20 ms at the new reading's power, in millijoules.
        let gained = (b.reading.energy_mj.unwrap() - r.energy_mj.unwrap()) as f64;
        assert!((gained - b.reading.power_w.unwrap() * 20.0).abs() <= 1.0, "{gained} mJ at {} W", b.reading.power_w.unwrap());
        let (mut a100, _, _) = sim("1xA100-40GB");
        let mut c = GpuSample::default();
        a100.sample(0, &mut c);
        assert!(c.reading.prof.is_none(), "Ampere has no GPM");
    }

    #[test]
    fn mig_layout_comes_from_the_shared_simulator() {
        let (mut g, m, _) = sim("1xH100-80GB");
        m.set_mig_mode(0, true).unwrap();
        m.create(0, mig::by_name(mig::H100_80GB, "3g.40gb").unwrap(), 4, mig::CiSplit::FULL).unwrap();
        m.create(0, mig::by_name(mig::H100_80GB, "1g.10gb").unwrap(), 0, mig::CiSplit::FULL).unwrap();
        let mut s = GpuSample::default();
        g.sample(0, &mut s);
        let r = &s.reading;
        assert_eq!(r.mig_current, Some(true));
        assert_eq!(r.gpu_util, None, "no whole-GPU utilisation under MIG");
        let names: Vec<_> = r.migs.iter().map(|m| (m.device.profile.as_str(), m.device.placement_start)).collect();
        assert_eq!(names, [("3g.40gb", 4), ("1g.10gb", 0)]);
        assert!(r.migs.iter().all(|m| m.device.uuid.starts_with("MIG-") && m.prof.is_some()));
        assert_ne!(r.migs[0].device.uuid, r.migs[1].device.uuid);
    }

    #[test]
    fn failures_are_per_gpu_and_per_call() {
        let (mut g, _, f) = sim("2xH100-80GB");
        f.fail(0, Call::Temperature);
        f.lose(1);
        let mut s0 = GpuSample::default();
        g.sample(0, &mut s0);
        assert_eq!(s0.failed.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [Call::Temperature]);
        assert!(s0.reading.gpu_temp_c.is_none() && s0.reading.power_w.is_some());
        let mut s1 = GpuSample::default();
        g.sample(1, &mut s1);
        assert_eq!(s1.failed.len(), 1);
        assert_eq!(s1.reading, Default::default());
        f.xid(1, None, 79);
        assert_eq!(g.poll_xids().unwrap(), [XidEvent { gpu: 1, gi_id: None, code: 79 }]);
        assert!(g.poll_xids().unwrap().is_empty());
    }
}
