//! The reconciler: takes a spec and a config name to the hardware, safely and resumably.
//!
//! Order: validate and plan (nothing touched if either fails) -> persist the request as
//! `pending` -> drain the runtimes on the GPUs the plan touches -> run the plan (a mode
//! change needing a reset stops that GPU as `reboot-required`) -> verify by re-planning ->
//! persist the outcome. The record is written durably before the first hardware call, so an
//! agent killed mid-apply finds `pending` on restart and re-runs the same request; planning
//! from what the hardware reports makes that re-run finish the job instead of repeating it.
//! A GPU left half-way is never silent: until the record says otherwise the status is
//! `pending` (or `failed` with the GPU and the step that failed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::apply::{self, GpuOutcome};
use super::plan::{self, GpuState};
use super::spec::Spec;
use crate::device::migctl::MigControl;

/// Node labels carrying the state, in the style of mig-parted's.
pub const LABEL_CONFIG: &str = "hearth.dev/mig.config";
pub const LABEL_STATE: &str = "hearth.dev/mig.config.state";
/// The same for Neuron core groups, so a MIG label never names a Neuron config.
pub const LABEL_NEURON_CONFIG: &str = "hearth.dev/neuron.config";
pub const LABEL_NEURON_STATE: &str = "hearth.dev/neuron.config.state";

/// Stops (and later restarts) whatever runs on GPUs about to be repartitioned. The runtime
/// supervisors implement it (`runtime::pause`); `NoRuntimes` is for tests and for agents
/// that run no model servers.
pub trait Drain: Send + Sync {
    fn drain(&self, gpus: &[u32]) -> Result<(), String>;
    fn release(&self, gpus: &[u32]);
}

#[derive(Debug, Default)]
pub struct NoRuntimes;

impl Drain for NoRuntimes {
    fn drain(&self, _: &[u32]) -> Result<(), String> {
        Ok(())
    }
    fn release(&self, _: &[u32]) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Pending,
    Success,
    Failed,
    RebootRequired,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Success => "success",
            Phase::Failed => "failed",
            Phase::RebootRequired => "reboot-required",
        }
    }
}

/// What a partition status is about: MIG instances on GPUs, or Neuron core groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The default, so records written before Neuron applies existed read as what they are.
    #[default]
    Mig,
    Neuron,
}

impl Kind {
    /// How events and messages name an apply of this kind.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Mig => "MIG config",
            Kind::Neuron => "Neuron core-group config",
        }
    }
}

/// What the snapshot and the labels say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    #[serde(default)]
    pub kind: Kind,
    pub config: String,
    pub phase: Phase,
    /// Empty on success; otherwise which GPU and why.
    pub reason: String,
    /// Outcome per GPU (or Neuron device) index ("success", "reboot-required", "failed: ...").
    pub gpus: BTreeMap<u32, String>,
}

impl PartitionStatus {
    pub fn labels(&self) -> [(String, String); 2] {
        let (config, state) = match self.kind {
            Kind::Mig => (LABEL_CONFIG, LABEL_STATE),
            Kind::Neuron => (LABEL_NEURON_CONFIG, LABEL_NEURON_STATE),
        };
        [(config.to_owned(), self.config.clone()), (state.to_owned(), self.phase.as_str().to_owned())]
    }
}

impl From<&PartitionStatus> for hearth_proto::v1::PartitionStatus {
    fn from(s: &PartitionStatus) -> Self {
        use hearth_proto::v1::partition_status::Phase as P;
        let phase = match s.phase {
            Phase::Pending => P::Pending,
            Phase::Success => P::Success,
            Phase::Failed => P::Failed,
            Phase::RebootRequired => P::RebootRequired,
        };
        Self { phase: phase as i32, spec_name: s.config.clone(), reason: s.reason.clone() }
    }
}

/// The persisted request and its outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec_yaml: String,
    status: PartitionStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("partition spec: {0}")]
    Spec(#[from] super::spec::SpecError),
    #[error("partition plan: {0}")]
    Plan(#[from] super::plan::PlanError),
    #[error("reading GPU {gpu}: {source}")]
    Read { gpu: u32, source: crate::device::migctl::MigError },
    #[error("partition record {path}: {reason}")]
    Record { path: PathBuf, reason: String },
}

/// One GPU as the reconciler knows it (from discovery).
#[derive(Debug, Clone)]
pub struct GpuIdentity {
    pub index: u32,
    pub product: String,
    pub pci_device_id: u32,
}

pub struct Reconciler {
    ctl: Arc<dyn MigControl>,
    drain: Arc<dyn Drain>,
    gpus: Vec<GpuIdentity>,
    record_path: PathBuf,
    /// One apply at a time; also the latest status.
    status: Mutex<Option<PartitionStatus>>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").field("gpus", &self.gpus.len()).field("record", &self.record_path).finish_non_exhaustive()
    }
}

impl super::Applier for Reconciler {
    fn kind(&self) -> Kind {
        Kind::Mig
    }
    fn check(&self, spec_yaml: &str, config: &str) -> Result<(), String> {
        Spec::parse(spec_yaml).and_then(|s| s.config(config).map(|_| ())).map_err(|e| format!("partition spec: {e}"))
    }
    fn apply(&self, spec_yaml: &str, config: &str) -> Result<PartitionStatus, String> {
        Reconciler::apply(self, spec_yaml, config).map_err(|e| e.to_string())
    }
    fn status(&self) -> Option<PartitionStatus> {
        Reconciler::status(self)
    }
}

impl Reconciler {
    /// `state_dir` holds `partition.json`; the last status recorded there is loaded.
    pub fn new(ctl: Arc<dyn MigControl>, drain: Arc<dyn Drain>, gpus: Vec<GpuIdentity>, state_dir: &Path) -> Result<Self, ReconcileError> {
        let record_path = state_dir.join("partition.json");
        let r = Self { ctl, drain, gpus, record_path, status: Mutex::new(None) };
        let last = r.load()?.map(|rec| rec.status);
        *r.status.lock().unwrap_or_else(|p| p.into_inner()) = last;
        Ok(r)
    }

    pub fn status(&self) -> Option<PartitionStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn load(&self) -> Result<Option<Record>, ReconcileError> {
        let err = |reason: String| ReconcileError::Record { path: self.record_path.clone(), reason };
        match std::fs::read(&self.record_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| err(format!("not a partition record ({e}); move it aside to start afresh"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn save(&self, rec: &Record) -> Result<(), ReconcileError> {
        let err = |reason: String| ReconcileError::Record { path: self.record_path.clone(), reason };
        if let Some(dir) = self.record_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let body = serde_json::to_vec_pretty(rec).map_err(|e| err(e.to_string()))?;
        hearth_service::fsutil::write_atomic(&self.record_path, &body, true).map_err(|e| err(e.to_string()))
    }

    fn read_states(&self) -> Result<Vec<GpuState>, ReconcileError> {
        self.gpus
            .iter()
            .map(|g| {
                apply::read_state(self.ctl.as_ref(), g.index, &g.product, g.pci_device_id)
                    .map_err(|source| ReconcileError::Read { gpu: g.index, source })
            })
            .collect()
    }

    /// Brings the GPUs to `config` of `spec_yaml`. Invalid input is refused before anything
    /// is recorded or touched; everything after that ends in a recorded status.
    pub fn apply(&self, spec_yaml: &str, config: &str) -> Result<PartitionStatus, ReconcileError> {
        let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let spec = Spec::parse(spec_yaml)?;
        let entries = spec.config(config)?.to_vec();
        let states = self.read_states()?;
        let p = plan::plan(&entries, &states)?;
        let touched: Vec<u32> = {
            let mut v: Vec<u32> = states.iter().map(|g| g.index).filter(|i| !p.unchanged.contains(i)).collect();
            v.dedup();
            v
        };
        let mut status = PartitionStatus {
            kind: Kind::Mig,
            config: config.to_owned(),
            phase: Phase::Pending,
            reason: if touched.is_empty() { String::new() } else { format!("applying to GPU {touched:?}") },
            gpus: BTreeMap::new(),
        };
        let mut rec = Record { spec_yaml: spec_yaml.to_owned(), status: status.clone() };
        self.save(&rec)?;
        *guard = Some(status.clone());
        info!(config, steps = p.steps.len(), gpus = ?touched, "applying partition config");

        let outcomes = match self.drain.drain(&touched) {
            Err(e) => touched.iter().map(|&g| (g, GpuOutcome::Failed(format!("draining runtimes: {e}")))).collect(),
            Ok(()) => {
                let o = apply::execute(self.ctl.as_ref(), &p, &entries, &states);
                self.drain.release(&touched);
                o
            }
        };
        status.gpus = outcomes
            .iter()
            .map(|(g, o)| {
                let s = match o {
                    GpuOutcome::Success => "success".to_owned(),
                    GpuOutcome::RebootRequired => "reboot-required".to_owned(),
                    GpuOutcome::Failed(r) => format!("failed: {r}"),
                };
                (*g, s)
            })
            .collect();
        let failed: Vec<String> =
            outcomes.iter().filter_map(|(g, o)| if let GpuOutcome::Failed(r) = o { Some(format!("GPU {g}: {r}")) } else { None }).collect();
        let reboot: Vec<u32> = outcomes.iter().filter(|(_, o)| **o == GpuOutcome::RebootRequired).map(|(g, _)| *g).collect();
        (status.phase, status.reason) = if !failed.is_empty() {
            (Phase::Failed, failed.join("; "))
        } else if !reboot.is_empty() {
            (Phase::RebootRequired, format!("GPU {reboot:?}: MIG mode change pending until the GPU is reset or the node reboots"))
        } else {
            (Phase::Success, String::new())
        };
        match status.phase {
            Phase::Success => info!(config, "partition config applied and verified"),
            _ => warn!(config, phase = status.phase.as_str(), reason = %status.reason, "partition config not applied"),
        }
        rec.status = status.clone();
        self.save(&rec)?;
        *guard = Some(status.clone());
        Ok(status)
    }

    /// After an agent restart: finishes an apply that was interrupted (`pending`) or waiting
    /// for a reset (`reboot-required`), from the recorded request. Finished outcomes
    /// (`success`, `failed`) are reported as they are; a failed apply is not retried on its
    /// own, so a broken spec does not loop.
    pub fn resume(&self) -> Result<Option<PartitionStatus>, ReconcileError> {
        let Some(rec) = self.load()? else { return Ok(None) };
        match rec.status.phase {
            Phase::Pending | Phase::RebootRequired => {
                info!(config = %rec.status.config, was = rec.status.phase.as_str(), "resuming partition apply");
                self.apply(&rec.spec_yaml, &rec.status.config).map(Some)
            }
            Phase::Success | Phase::Failed => Ok(Some(rec.status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mig::{self, GiProfile};
    use crate::device::migctl::{GpuInstance, MigError, ModeChange, SimMig};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const H100: u32 = 0x2330_10DE;
    const SPEC: &str = include_str!("../../../manifests/examples/mig-spec.yaml");

    fn gpus(n: u32) -> Vec<GpuIdentity> {
        (0..n).map(|index| GpuIdentity { index, product: "NVIDIA H100 80GB HBM3".into(), pci_device_id: H100 }).collect()
    }

    /// The hardware survives an agent crash; this wrapper "kills the agent" (panics) after
    /// `budget` state-changing calls, as a SIGKILL mid-apply would.
    struct Crashy {
        inner: Arc<SimMig>,
        budget: AtomicUsize,
    }
    impl Crashy {
        fn tick(&self) {
            if self.budget.fetch_sub(1, Ordering::SeqCst) == 0 {
                panic!("agent killed mid-apply");
            }
        }
    }
    impl MigControl for Crashy {
        fn mig_mode(&self, gpu: u32) -> Result<(bool, bool), MigError> {
            self.inner.mig_mode(gpu)
        }
        fn set_mig_mode(&self, gpu: u32, enabled: bool) -> Result<ModeChange, MigError> {
            self.tick();
            self.inner.set_mig_mode(gpu, enabled)
        }
        fn list(&self, gpu: u32) -> Result<Vec<GpuInstance>, MigError> {
            self.inner.list(gpu)
        }
        fn create(&self, gpu: u32, profile: &'static GiProfile, start: u32, cis: mig::CiSplit) -> Result<GpuInstance, MigError> {
            self.tick();
            self.inner.create(gpu, profile, start, cis)
        }
        fn destroy(&self, gpu: u32, gi_id: u32) -> Result<(), MigError> {
            self.tick();
            self.inner.destroy(gpu, gi_id)
        }
    }

    fn layout(m: &SimMig, gpu: u32) -> Vec<(&'static str, u32)> {
        let mut v: Vec<_> = m.list(gpu).unwrap().iter().map(|i| (i.placed.profile.name, i.placed.start)).collect();
        v.sort();
        v
    }

    #[test]
    fn applies_records_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[H100, H100]));
        let r = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap();
        let s = r.apply(SPEC, "balanced").unwrap();
        assert_eq!(s.phase, Phase::Success, "{s:?}");
        assert_eq!(layout(&hw, 0), [("1g.10gb", 2), ("1g.10gb", 3), ("2g.20gb", 0), ("3g.40gb", 4)]);
        assert_eq!(s.labels()[1], (LABEL_STATE.to_owned(), "success".to_owned()));
        // A new agent process reads the outcome back.
        let again = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap();
        assert_eq!(again.status(), Some(s.clone()));
        assert_eq!(again.resume().unwrap(), Some(s));
    }

    #[test]
    fn compute_instance_splits_apply_verify_and_show_as_mig_devices() {
        use crate::device::gpu::{GpuBackend, GpuSample};
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[H100]));
        let r = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(1), dir.path()).unwrap();
        assert_eq!(r.apply(SPEC, "shared-3g").unwrap().phase, Phase::Success);
        let split: Vec<_> = hw.list(0).unwrap().iter().map(|i| (i.placed.profile.name, i.placed.cis.to_string())).collect();
        assert_eq!(split, [("4g.40gb", String::new()), ("3g.40gb", "1c+1c+1c".to_owned())]);
        // Applying again changes nothing; another split of the same instance is re-created.
        assert_eq!(r.apply(SPEC, "shared-3g").unwrap().phase, Phase::Success);
        assert_eq!(hw.list(0).unwrap().len(), 2);
        let accs = crate::device::Inventory::accelerators(&crate::device::sim::SimInventory::new(
            "n",
            &[crate::device::sim::SimSpec::parse("1xH100-80GB").unwrap()],
        ))
        .unwrap();
        let mut telemetry = crate::device::gpusim::SimGpus::new(&accs, hw, Arc::new(crate::device::gpusim::SimFaults::default()));
        let mut s = GpuSample::default();
        telemetry.sample(0, &mut s);
        let devs: Vec<(String, u32)> = s.reading.migs.iter().map(|m| (m.device.profile.clone(), m.device.ci_id)).collect();
        assert_eq!(devs, [("4g.40gb".to_owned(), 0), ("3g.40gb".to_owned(), 0), ("3g.40gb".to_owned(), 1), ("3g.40gb".to_owned(), 2)]);
    }

    #[test]
    fn bad_input_touches_nothing_and_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[H100]));
        let r = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(1), dir.path()).unwrap();
        let e = r.apply(SPEC, "no-such-config").unwrap_err().to_string();
        assert!(e.contains("no-such-config"), "{e}");
        let e =
            r.apply("version: v1\nmig-configs: {x: [{devices: all, mig-enabled: true, mig-devices: {\"3g.40gb\": 3}}]}", "x").unwrap_err();
        assert!(e.to_string().contains("3g.40gb"), "{e}");
        assert_eq!(hw.mig_mode(0).unwrap(), (false, false));
        assert!(!dir.path().join("partition.json").exists(), "nothing recorded for refused input");
        std::fs::write(dir.path().join("partition.json"), "{not json").unwrap();
        let e = Reconciler::new(hw, Arc::new(NoRuntimes), gpus(1), dir.path()).unwrap_err().to_string();
        assert!(e.contains("partition.json") && e.contains("move it aside"), "{e}");
    }

    #[test]
    fn a_crash_at_any_step_resumes_to_the_spec() {
        // Count the state-changing calls of a clean apply, then crash after each prefix.
        let clean = Arc::new(SimMig::new(&[H100, H100]));
        let count = Arc::new(Crashy { inner: clean.clone(), budget: AtomicUsize::new(usize::MAX) });
        let dir = tempfile::tempdir().unwrap();
        Reconciler::new(count.clone(), Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap().apply(SPEC, "balanced").unwrap();
        let total = usize::MAX - count.budget.load(Ordering::SeqCst);
        assert!(total >= 10, "{total}");
        let want = [layout(&clean, 0), layout(&clean, 1)];
        for k in 0..total {
            let dir = tempfile::tempdir().unwrap();
            let hw = Arc::new(SimMig::new(&[H100, H100]));
            // Start from another layout, so the crash can land between destroys and creates.
            let pre = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap();
            assert_eq!(pre.apply(SPEC, "all-1g.10gb").unwrap().phase, Phase::Success);
            let crashy = Arc::new(Crashy { inner: hw.clone(), budget: AtomicUsize::new(k) });
            let r = Reconciler::new(crashy, Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap();
            let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.apply(SPEC, "balanced")));
            if crashed.is_ok() {
                continue; // the reconfiguration needed fewer calls than k
            }
            // The restarted agent sees "pending" and finishes the job.
            let restarted = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(2), dir.path()).unwrap();
            assert_eq!(restarted.status().unwrap().phase, Phase::Pending, "crash after {k} calls left it unreported");
            let s = restarted.resume().unwrap().unwrap();
            assert_eq!(s.phase, Phase::Success, "crash after {k}: {s:?}");
            assert_eq!([layout(&hw, 0), layout(&hw, 1)], want, "crash after {k}");
        }
    }

    #[test]
    fn busy_gpus_are_reboot_required_then_resume_after_the_reset() {
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[H100]));
        hw.set_busy(0, true, None);
        let r = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(1), dir.path()).unwrap();
        let s = r.apply(SPEC, "all-1g.10gb").unwrap();
        assert_eq!(s.phase, Phase::RebootRequired);
        assert!(s.reason.contains("GPU [0]"), "{s:?}");
        assert!(hw.list(0).unwrap().is_empty());
        hw.set_busy(0, false, None);
        hw.reset(0); // the node rebooted; the pending mode took effect
        let restarted = Reconciler::new(hw.clone(), Arc::new(NoRuntimes), gpus(1), dir.path()).unwrap();
        assert_eq!(restarted.resume().unwrap().unwrap().phase, Phase::Success);
        assert_eq!(hw.list(0).unwrap().len(), 7);
    }

    #[test]
    fn a_failed_drain_fails_the_touched_gpus_without_touching_them() {
        struct Stuck;
        impl Drain for Stuck {
            fn drain(&self, gpus: &[u32]) -> Result<(), String> {
                Err(format!("runtime on GPU {gpus:?} did not stop within 30s"))
            }
            fn release(&self, _: &[u32]) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[H100]));
        let r = Reconciler::new(hw.clone(), Arc::new(Stuck), gpus(1), dir.path()).unwrap();
        let s = r.apply(SPEC, "balanced").unwrap();
        assert_eq!(s.phase, Phase::Failed);
        assert!(s.reason.contains("GPU 0: draining runtimes: runtime on GPU [0] did not stop"), "{s:?}");
        assert_eq!(hw.mig_mode(0).unwrap(), (false, false));
        let _ = mig::H100_80GB;
    }
}
