//! Runs a plan through a `MigControl` backend and checks the result. A mode change left
//! pending (the GPU needs a reset or the node a reboot) stops that GPU's steps and is
//! reported as reboot-required, never forced; any failed call stops that GPU with the
//! reason. Verification re-plans from what the backend reports: success means nothing is
//! left to do.

use std::collections::BTreeMap;

use crate::device::migctl::{MigControl, MigError, ModeChange};

use super::plan::{self, GpuState, Plan, Step};
use super::spec::Entry;

/// How one GPU ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuOutcome {
    Success,
    RebootRequired,
    Failed(String),
}

/// What the backend says a GPU looks like now.
pub fn read_state(ctl: &dyn MigControl, index: u32, product: &str, pci_device_id: u32) -> Result<GpuState, MigError> {
    let (current, _) = ctl.mig_mode(index)?;
    Ok(GpuState {
        index,
        product: product.to_owned(),
        pci_device_id,
        mig_enabled: current,
        instances: ctl.list(index)?.into_iter().map(|i| i.placed).collect(),
    })
}

fn run_step(ctl: &dyn MigControl, s: &Step) -> Result<Option<ModeChange>, MigError> {
    match *s {
        Step::EnableMig { gpu } => ctl.set_mig_mode(gpu, true).map(Some),
        Step::DisableMig { gpu } => ctl.set_mig_mode(gpu, false).map(Some),
        Step::Create { gpu, profile, start, cis } => ctl.create(gpu, profile, start, cis).map(|_| None),
        Step::Destroy { gpu, profile, start } => {
            let gi = ctl
                .list(gpu)?
                .into_iter()
                .find(|i| i.placed.profile.id == profile.id && i.placed.start == start)
                .ok_or(MigError::NotFound { gpu, call: "destroy GPU instance", gi: 0 })?;
            ctl.destroy(gpu, gi.gi_id).map(|()| None)
        }
    }
}

fn gpu_of(s: &Step) -> u32 {
    match *s {
        Step::EnableMig { gpu } | Step::DisableMig { gpu } | Step::Create { gpu, .. } | Step::Destroy { gpu, .. } => gpu,
    }
}

/// Applies `p` and verifies every GPU against `entries`.
pub fn execute(ctl: &dyn MigControl, p: &Plan, entries: &[Entry], gpus: &[GpuState]) -> BTreeMap<u32, GpuOutcome> {
    let mut out: BTreeMap<u32, GpuOutcome> = gpus.iter().map(|g| (g.index, GpuOutcome::Success)).collect();
    for s in &p.steps {
        let gpu = gpu_of(s);
        if out.get(&gpu) != Some(&GpuOutcome::Success) {
            continue;
        }
        match run_step(ctl, s) {
            Ok(Some(ModeChange::Pending)) => {
                out.insert(gpu, GpuOutcome::RebootRequired);
            }
            Ok(_) => {}
            Err(e) => {
                out.insert(gpu, GpuOutcome::Failed(format!("{s}: {e}")));
            }
        }
    }
    // Verify: what the backend reports must need no further steps.
    for g in gpus {
        if out.get(&g.index) != Some(&GpuOutcome::Success) {
            continue;
        }
        let verdict =
            read_state(ctl, g.index, &g.product, g.pci_device_id)
                .map_err(|e| e.to_string())
                .and_then(|now| plan::plan(entries, &[now]).map_err(|e| e.to_string()))
                .and_then(|again| {
                    if again.steps.is_empty() { Ok(()) } else { Err(format!("{} step(s) still to do after apply", again.steps.len())) }
                });
        if let Err(reason) = verdict {
            out.insert(g.index, GpuOutcome::Failed(format!("verification: {reason}")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mig::{self, GiProfile};
    use crate::device::migctl::SimMig;
    use crate::partition::spec::{AllLiteral, Devices};

    const H100: u32 = 0x2330_10DE;

    fn entry(profiles: &[&'static GiProfile]) -> Entry {
        let mut mig_devices = std::collections::BTreeMap::new();
        for p in profiles {
            *mig_devices.entry(p.name.to_owned()).or_insert(0) += 1;
        }
        Entry { device_filter: vec![], devices: Devices::All(AllLiteral::All), mig_enabled: true, mig_devices, mig_placements: vec![] }
    }

    fn state(ctl: &SimMig) -> Vec<GpuState> {
        vec![read_state(ctl, 0, "NVIDIA H100 80GB HBM3", H100).unwrap()]
    }

    #[test]
    fn every_plan_applies_cleanly_on_the_simulator_and_converges() {
        let ctl = SimMig::new(&[H100]);
        let mut requests = vec![vec![]];
        for a in mig::H100_80GB {
            for b in mig::H100_80GB {
                for c in mig::H100_80GB {
                    for d in [None, Some(&mig::H100_80GB[0])] {
                        let mut r = vec![a, b, c];
                        r.extend(d);
                        requests.push(r);
                    }
                }
            }
        }
        let mut applied = 0;
        for r in requests {
            if mig::place(&r).is_err() {
                continue;
            }
            // From whatever the previous request left: reconfiguring, not just creating.
            let e = entry(&r);
            let gpus = state(&ctl);
            let p = plan::plan(std::slice::from_ref(&e), &gpus).unwrap();
            let out = execute(&ctl, &p, std::slice::from_ref(&e), &gpus);
            assert_eq!(out[&0], GpuOutcome::Success, "{:?}", r.iter().map(|p| p.name).collect::<Vec<_>>());
            applied += 1;
        }
        assert!(applied > 50, "{applied}");
    }

    #[test]
    fn busy_gpu_is_reboot_required_and_busy_instance_fails_with_the_reason() {
        let ctl = SimMig::new(&[H100]);
        ctl.set_busy(0, true, None);
        let e = entry(&[mig::by_name(mig::H100_80GB, "7g.80gb").unwrap()]);
        let gpus = state(&ctl);
        let out = execute(&ctl, &plan::plan(std::slice::from_ref(&e), &gpus).unwrap(), std::slice::from_ref(&e), &gpus);
        assert_eq!(out[&0], GpuOutcome::RebootRequired);
        assert!(ctl.list(0).unwrap().is_empty(), "nothing created behind a pending mode change");

        ctl.reset(0);
        ctl.set_busy(0, false, None);
        let gpus = state(&ctl);
        assert_eq!(
            execute(&ctl, &plan::plan(std::slice::from_ref(&e), &gpus).unwrap(), std::slice::from_ref(&e), &gpus)[&0],
            GpuOutcome::Success
        );
        let gi = ctl.list(0).unwrap()[0].gi_id;
        ctl.set_busy(0, true, Some(gi));
        let e2 = entry(&[mig::by_name(mig::H100_80GB, "1g.10gb").unwrap()]);
        let gpus = state(&ctl);
        let out = execute(&ctl, &plan::plan(std::slice::from_ref(&e2), &gpus).unwrap(), std::slice::from_ref(&e2), &gpus);
        match &out[&0] {
            GpuOutcome::Failed(reason) => assert!(reason.contains("destroy 7g.80gb") && reason.contains("in use"), "{reason}"),
            other => panic!("expected failure, got {other:?}"),
        }
        assert_eq!(ctl.list(0).unwrap().len(), 1, "the GPU is left as it was, and said so");
    }
}
