//! MIG control behind a trait: mode changes and GPU-instance create/destroy/list. The real
//! backend will be NVML (raw calls where nvml-wrapper stops); the simulated one here models
//! the hardware's rules from `mig` and NVML's failure modes: insufficient resources for an
//! overlapping or over-count create, in use for an instance with processes, not supported
//! without MIG mode, and a mode change left pending (reboot or reset required) while
//! processes hold the GPU.

use std::sync::Mutex;

use super::mig::{self, CiSplit, GiProfile, Placed};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigError {
    #[error("GPU {gpu}: {call}: insufficient resources ({detail})")]
    InsufficientResources { gpu: u32, call: &'static str, detail: String },
    #[error("GPU {gpu}: {call}: in use by running processes")]
    InUse { gpu: u32, call: &'static str },
    #[error("GPU {gpu}: {call}: not supported ({detail})")]
    NotSupported { gpu: u32, call: &'static str, detail: String },
    #[error("GPU {gpu}: {call}: no such GPU instance {gi}")]
    NotFound { gpu: u32, call: &'static str, gi: u32 },
    #[error("GPU {0}: no such GPU")]
    NoGpu(u32),
}

/// A GPU instance as NVML lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuInstance {
    pub gi_id: u32,
    pub placed: Placed,
}

/// Result of a mode change: applied now, or pending until the GPU is reset / the node reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChange {
    Applied,
    Pending,
}

pub trait MigControl: Send + Sync {
    /// (current, pending) MIG mode.
    fn mig_mode(&self, gpu: u32) -> Result<(bool, bool), MigError>;
    fn set_mig_mode(&self, gpu: u32, enabled: bool) -> Result<ModeChange, MigError>;
    fn list(&self, gpu: u32) -> Result<Vec<GpuInstance>, MigError>;
    /// Creates a GPU instance at `start` and its compute instances (`cis`).
    fn create(&self, gpu: u32, profile: &'static GiProfile, start: u32, cis: CiSplit) -> Result<GpuInstance, MigError>;
    fn destroy(&self, gpu: u32, gi_id: u32) -> Result<(), MigError>;
}

#[derive(Debug, Default)]
struct SimGpu {
    table: &'static [GiProfile],
    current: bool,
    pending: bool,
    instances: Vec<GpuInstance>,
    next_gi: u32,
    /// Processes on the whole GPU (block mode changes) and per instance (block destroy).
    gpu_busy: bool,
    busy_instances: Vec<u32>,
}

/// Simulated MIG-capable GPUs.
#[derive(Debug, Default)]
pub struct SimMig {
    gpus: Mutex<Vec<SimGpu>>,
}

impl SimMig {
    /// One GPU per PCI device id, MIG off, nothing running.
    pub fn new(pci_device_ids: &[u32]) -> Self {
        let gpus = pci_device_ids
            .iter()
            .map(|&id| SimGpu { table: mig::profiles_for(id).unwrap_or(&[]), next_gi: 1, ..Default::default() })
            .collect();
        Self { gpus: Mutex::new(gpus) }
    }

    fn with<T>(&self, gpu: u32, f: impl FnOnce(&mut SimGpu) -> Result<T, MigError>) -> Result<T, MigError> {
        let mut g = self.gpus.lock().unwrap_or_else(|p| p.into_inner());
        f(g.get_mut(gpu as usize).ok_or(MigError::NoGpu(gpu))?)
    }

    /// Test hook: processes appear on (or leave) a GPU, or on one instance.
    pub fn set_busy(&self, gpu: u32, busy: bool, instance: Option<u32>) {
        let _ = self.with(gpu, |g| {
            match instance {
                Some(gi) if busy => g.busy_instances.push(gi),
                Some(gi) => g.busy_instances.retain(|&i| i != gi),
                None => g.gpu_busy = busy,
            }
            Ok(())
        });
    }

    /// Test hook: the GPU was reset (or the node rebooted): a pending mode takes effect.
    pub fn reset(&self, gpu: u32) {
        let _ = self.with(gpu, |g| {
            g.current = g.pending;
            g.instances.clear();
            Ok(())
        });
    }
}

impl MigControl for SimMig {
    fn mig_mode(&self, gpu: u32) -> Result<(bool, bool), MigError> {
        self.with(gpu, |g| Ok((g.current, g.pending)))
    }

    fn set_mig_mode(&self, gpu: u32, enabled: bool) -> Result<ModeChange, MigError> {
        self.with(gpu, |g| {
            if g.table.is_empty() {
                return Err(MigError::NotSupported { gpu, call: "set MIG mode", detail: "product has no MIG".into() });
            }
            if !enabled && !g.instances.is_empty() {
                return Err(MigError::InUse { gpu, call: "disable MIG mode" });
            }
            g.pending = enabled;
            if g.gpu_busy {
                Ok(ModeChange::Pending)
            } else {
                g.current = enabled;
                Ok(ModeChange::Applied)
            }
        })
    }

    fn list(&self, gpu: u32) -> Result<Vec<GpuInstance>, MigError> {
        self.with(gpu, |g| Ok(g.instances.clone()))
    }

    fn create(&self, gpu: u32, profile: &'static GiProfile, start: u32, cis: CiSplit) -> Result<GpuInstance, MigError> {
        self.with(gpu, |g| {
            if !g.current {
                return Err(MigError::NotSupported { gpu, call: "create GPU instance", detail: "MIG mode is off".into() });
            }
            if !g.table.iter().any(|p| p.id == profile.id && p.name == profile.name) {
                return Err(MigError::NotSupported { gpu, call: "create GPU instance", detail: format!("profile {}", profile.name) });
            }
            // A split the GPU instance cannot hold is refused as NVML does, before anything exists.
            CiSplit::new(profile, &cis.sizes(profile)).map_err(|e| MigError::InsufficientResources {
                gpu,
                call: "create compute instance",
                detail: e.to_string(),
            })?;
            let mut placed: Vec<Placed> = g.instances.iter().map(|i| i.placed).collect();
            placed.push(Placed { profile, start, cis });
            mig::check_placements(&placed).map_err(|e| MigError::InsufficientResources {
                gpu,
                call: "create GPU instance",
                detail: e.to_string(),
            })?;
            let gi = GpuInstance { gi_id: g.next_gi, placed: Placed { profile, start, cis } };
            g.next_gi += 1;
            g.instances.push(gi);
            Ok(gi)
        })
    }

    fn destroy(&self, gpu: u32, gi_id: u32) -> Result<(), MigError> {
        self.with(gpu, |g| {
            if g.busy_instances.contains(&gi_id) {
                return Err(MigError::InUse { gpu, call: "destroy GPU instance" });
            }
            let i = g.instances.iter().position(|x| x.gi_id == gi_id).ok_or(MigError::NotFound {
                gpu,
                call: "destroy GPU instance",
                gi: gi_id,
            })?;
            g.instances.remove(i);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> &'static GiProfile {
        mig::by_name(mig::H100_80GB, n).unwrap()
    }

    #[test]
    fn models_nvml_failure_modes() {
        let s = SimMig::new(&[0x2330_10DE, 0x1234_10DE]);
        assert!(matches!(s.create(0, h("1g.10gb"), 0, CiSplit::FULL), Err(MigError::NotSupported { .. })), "MIG off");
        assert!(matches!(s.set_mig_mode(1, true), Err(MigError::NotSupported { .. })));
        assert_eq!(s.set_mig_mode(0, true), Ok(ModeChange::Applied));
        let a = s.create(0, h("4g.40gb"), 0, CiSplit::FULL).unwrap();
        let e = s.create(0, h("3g.40gb"), 0, CiSplit::FULL).unwrap_err();
        assert!(matches!(e, MigError::InsufficientResources { .. }), "{e}");
        s.create(0, h("3g.40gb"), 4, CiSplit::FULL).unwrap();
        s.set_busy(0, true, Some(a.gi_id));
        assert_eq!(s.destroy(0, a.gi_id), Err(MigError::InUse { gpu: 0, call: "destroy GPU instance" }));
        assert!(matches!(s.set_mig_mode(0, false), Err(MigError::InUse { .. })));
        s.set_busy(0, false, Some(a.gi_id));
        s.destroy(0, a.gi_id).unwrap();
        assert!(matches!(s.destroy(0, a.gi_id), Err(MigError::NotFound { .. })));
    }

    #[test]
    fn mode_change_is_pending_while_the_gpu_is_busy() {
        let s = SimMig::new(&[0x2330_10DE]);
        s.set_busy(0, true, None);
        assert_eq!(s.set_mig_mode(0, true), Ok(ModeChange::Pending));
        assert_eq!(s.mig_mode(0), Ok((false, true)));
        s.reset(0);
        assert_eq!(s.mig_mode(0), Ok((true, true)));
    }
}
