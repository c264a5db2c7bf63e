//! Spec + current state -> an ordered, deterministic plan. Per GPU: the first spec entry
//! that applies decides; instances already where the target wants them are kept, the rest
//! destroyed, the missing ones created largest first at explicit placements. GPUs no entry
//! covers are left alone. Nothing here touches hardware.

use crate::device::mig::{self, CiSplit, GiProfile, LayoutError, Placed};

use super::spec::Entry;

/// What a GPU looks like now.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuState {
    pub index: u32,
    pub product: String,
    pub pci_device_id: u32,
    pub mig_enabled: bool,
    pub instances: Vec<Placed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    EnableMig {
        gpu: u32,
    },
    DisableMig {
        gpu: u32,
    },
    /// Destroys the GPU instance and its compute instances.
    Destroy {
        gpu: u32,
        profile: &'static GiProfile,
        start: u32,
    },
    /// Creates the GPU instance and its compute instances.
    Create {
        gpu: u32,
        profile: &'static GiProfile,
        start: u32,
        cis: CiSplit,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::EnableMig { gpu } => write!(f, "GPU {gpu}: enable MIG mode"),
            Step::DisableMig { gpu } => write!(f, "GPU {gpu}: disable MIG mode"),
            Step::Destroy { gpu, profile, start } => write!(f, "GPU {gpu}: destroy {} at placement {start}", profile.name),
            Step::Create { gpu, profile, start, cis } => {
                write!(f, "GPU {gpu}: create {} (profile id {}) at placement {start}", profile.name, profile.id)?;
                if !cis.is_full() {
                    write!(f, " as compute instances {cis}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("GPU {gpu} ({product}, PCI device id {pci:#010X}): no MIG profile table for this product")]
    UnknownProduct { gpu: u32, product: String, pci: u32 },
    #[error("GPU {gpu} ({product}): profile {profile:?} does not exist on this product (it has: {known})")]
    UnknownProfile { gpu: u32, product: String, profile: String, known: String },
    #[error("GPU {gpu} ({product}): {source}")]
    Layout { gpu: u32, product: String, source: LayoutError },
    #[error("GPU {gpu} ({product}): mig-placements list {placed} but mig-devices asks for {wanted}")]
    PlacementsMismatch { gpu: u32, product: String, placed: String, wanted: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// GPUs already as specified, or not covered by any entry.
    pub unchanged: Vec<u32>,
}

fn names(ps: &[&GiProfile]) -> String {
    let mut v: Vec<&str> = ps.iter().map(|p| p.name).collect();
    v.sort_unstable();
    v.join(" + ")
}

/// The layout an entry wants on one GPU.
fn target(entry: &Entry, gpu: &GpuState) -> Result<Vec<Placed>, PlanError> {
    let table = mig::profiles_for(gpu.pci_device_id).ok_or_else(|| PlanError::UnknownProduct {
        gpu: gpu.index,
        product: gpu.product.clone(),
        pci: gpu.pci_device_id,
    })?;
    let lookup = |name: &str| {
        mig::by_name(table, name).ok_or_else(|| PlanError::UnknownProfile {
            gpu: gpu.index,
            product: gpu.product.clone(),
            profile: name.to_owned(),
            known: table.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        })
    };
    let layout_err = |source| PlanError::Layout { gpu: gpu.index, product: gpu.product.clone(), source };
    // Plain profiles want one GPU instance each; "Nc.<profile>" keys want compute
    // instances, packed first-fit (largest first) into as few GPU instances as hold them.
    let mut wanted = Vec::new();
    let mut splits: Vec<(&'static GiProfile, Vec<CiSplit>)> = Vec::new();
    let mut ci_wanted: Vec<(&'static GiProfile, Vec<u32>)> = Vec::new();
    for (key, &count) in &entry.mig_devices {
        let (ci, name) = mig::parse_device_key(key);
        let p = lookup(name)?;
        match ci {
            None => wanted.extend(std::iter::repeat_n(p, count as usize)),
            Some(n) => match ci_wanted.iter_mut().find(|(q, _)| q.id == p.id) {
                Some((_, v)) => v.extend(std::iter::repeat_n(n, count as usize)),
                None => ci_wanted.push((p, vec![n; count as usize])),
            },
        }
    }
    for (p, mut sizes) in ci_wanted {
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut bins: Vec<Vec<u32>> = Vec::new();
        for n in sizes {
            CiSplit::new(p, &[n]).map_err(layout_err)?;
            match bins.iter_mut().find(|b| b.iter().sum::<u32>() + n <= p.compute_slices) {
                Some(b) => b.push(n),
                None => bins.push(vec![n]),
            }
        }
        wanted.extend(std::iter::repeat_n(p, bins.len()));
        splits.push((p, bins.iter().map(|b| CiSplit::new(p, b)).collect::<Result<_, _>>().map_err(layout_err)?));
    }
    let mut placed = if entry.mig_placements.is_empty() {
        mig::place(&wanted).map_err(layout_err)?
    } else {
        let placed =
            entry.mig_placements.iter().map(|pl| Ok(Placed::new(lookup(&pl.profile)?, pl.start))).collect::<Result<Vec<_>, PlanError>>()?;
        let placed_profiles: Vec<&GiProfile> = placed.iter().map(|p| p.profile).collect();
        if !wanted.is_empty() && names(&placed_profiles) != names(&wanted) {
            return Err(PlanError::PlacementsMismatch {
                gpu: gpu.index,
                product: gpu.product.clone(),
                placed: names(&placed_profiles),
                wanted: names(&wanted),
            });
        }
        mig::check_placements(&placed).map_err(layout_err)?;
        placed
    };
    // Split instances go to the lowest placements of their profile, deterministically.
    placed.sort_by_key(|p| p.start);
    for (p, list) in splits {
        let mut slots = placed.iter_mut().filter(|x| x.profile.id == p.id);
        for split in list {
            if let Some(slot) = slots.next() {
                slot.cis = split;
            }
        }
    }
    Ok(placed)
}

pub fn plan(entries: &[Entry], gpus: &[GpuState]) -> Result<Plan, PlanError> {
    let mut steps = Vec::new();
    let mut unchanged = Vec::new();
    let mut gpus: Vec<&GpuState> = gpus.iter().collect();
    gpus.sort_by_key(|g| g.index);
    for gpu in gpus {
        let Some(entry) = entries.iter().find(|e| e.applies_to(gpu.index, gpu.pci_device_id)) else {
            unchanged.push(gpu.index);
            continue;
        };
        let before = steps.len();
        let same = |a: &Placed, b: &Placed| a.profile.id == b.profile.id && a.start == b.start && a.cis == b.cis;
        if !entry.mig_enabled {
            // Highest placement first, so a teardown interrupted halfway leaves a contiguous prefix.
            let mut current = gpu.instances.clone();
            current.sort_by_key(|p| std::cmp::Reverse(p.start));
            steps.extend(current.iter().map(|p| Step::Destroy { gpu: gpu.index, profile: p.profile, start: p.start }));
            if gpu.mig_enabled {
                steps.push(Step::DisableMig { gpu: gpu.index });
            }
        } else {
            let want = target(entry, gpu)?;
            if !gpu.mig_enabled {
                steps.push(Step::EnableMig { gpu: gpu.index });
            }
            let mut destroy: Vec<&Placed> = gpu.instances.iter().filter(|c| !want.iter().any(|w| same(c, w))).collect();
            destroy.sort_by_key(|p| std::cmp::Reverse(p.start));
            steps.extend(destroy.iter().map(|p| Step::Destroy { gpu: gpu.index, profile: p.profile, start: p.start }));
            // Largest first, as `place` ordered them (placement order for explicit placements).
            let mut create: Vec<&Placed> = want.iter().filter(|w| !gpu.instances.iter().any(|c| same(c, w))).collect();
            create.sort_by(|a, b| {
                b.profile
                    .size
                    .cmp(&a.profile.size)
                    .then(b.profile.compute_slices.cmp(&a.profile.compute_slices))
                    .then(a.start.cmp(&b.start))
            });
            steps.extend(create.iter().map(|p| Step::Create { gpu: gpu.index, profile: p.profile, start: p.start, cis: p.cis }));
        }
        if steps.len() == before {
            unchanged.push(gpu.index);
        }
    }
    Ok(Plan { steps, unchanged })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::spec::Spec;

    fn h100(index: u32, mig: bool, instances: &[(&str, u32)]) -> GpuState {
        GpuState {
            index,
            product: "NVIDIA H100 80GB HBM3".into(),
            pci_device_id: 0x2330_10DE,
            mig_enabled: mig,
            instances: instances.iter().map(|(n, s)| Placed::new(mig::by_name(mig::H100_80GB, n).unwrap(), *s)).collect(),
        }
    }

    const SPEC: &str = r#"
version: v1
mig-configs:
  balanced:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 2}
  big:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"4g.40gb": 1, "3g.40gb": 1}
  off:
    - devices: all
      mig-enabled: false
  pinned:
    - devices: all
      mig-enabled: true
      mig-placements: [{profile: "3g.40gb", start: 0}, {profile: "3g.40gb", start: 4}]
  bad:
    - devices: all
      mig-enabled: true
      mig-devices: {"4g.40gb": 1, "3g.40gb": 1, "1g.10gb": 1}
"#;

    /// Runs a plan against a model of the GPUs, checking every create lands on free, allowed
    /// units: what the simulator will enforce.
    fn apply(gpus: &mut [GpuState], p: &Plan) {
        for s in &p.steps {
            let g = match s {
                Step::EnableMig { gpu } | Step::DisableMig { gpu } | Step::Destroy { gpu, .. } | Step::Create { gpu, .. } => {
                    gpus.iter_mut().find(|g| g.index == *gpu).unwrap()
                }
            };
            match *s {
                Step::EnableMig { .. } => g.mig_enabled = true,
                Step::DisableMig { .. } => {
                    assert!(g.instances.is_empty(), "MIG disabled with instances left");
                    g.mig_enabled = false;
                }
                Step::Destroy { profile, start, .. } => {
                    let i = g.instances.iter().position(|p| p.profile.id == profile.id && p.start == start).unwrap();
                    g.instances.remove(i);
                }
                Step::Create { profile, start, cis, .. } => {
                    assert!(g.mig_enabled, "create before MIG is on");
                    g.instances.push(Placed { profile, start, cis });
                    mig::check_placements(&g.instances).unwrap();
                }
            }
        }
    }

    #[test]
    fn plans_apply_cleanly_and_converge() {
        let spec = Spec::parse(SPEC).unwrap();
        let starts = [h100(0, false, &[]), h100(1, true, &[("7g.80gb", 0)]), h100(2, true, &[("3g.40gb", 4), ("1g.10gb", 0)])];
        for config in ["balanced", "big", "off", "pinned"] {
            let entries = spec.config(config).unwrap();
            let mut gpus = starts.to_vec();
            let p = plan(entries, &gpus).unwrap();
            apply(&mut gpus, &p);
            let again = plan(entries, &gpus).unwrap();
            assert!(again.steps.is_empty(), "{config}: not converged: {:?}", again.steps);
            assert_eq!(again.unchanged, vec![0, 1, 2]);
        }
    }

    #[test]
    fn keeps_instances_already_in_place_and_orders_steps() {
        let spec = Spec::parse(SPEC).unwrap();
        let p = plan(spec.config("big").unwrap(), &[h100(0, true, &[("3g.40gb", 4), ("1g.10gb", 0)]), h100(1, false, &[])]).unwrap();
        let text: Vec<String> = p.steps.iter().map(ToString::to_string).collect();
        assert_eq!(text, vec!["GPU 0: destroy 1g.10gb at placement 0", "GPU 0: create 4g.40gb (profile id 5) at placement 0"]);
        assert_eq!(p.unchanged, vec![1], "GPU 1 is not covered by the entry");
    }

    #[test]
    fn impossible_layouts_and_unknown_profiles_are_rejected_with_reasons() {
        let spec = Spec::parse(SPEC).unwrap();
        let e = plan(spec.config("bad").unwrap(), &[h100(0, false, &[])]).unwrap_err().to_string();
        assert_eq!(e, "GPU 0 (NVIDIA H100 80GB HBM3): 8 compute slices requested; the GPU has 7");
        let s =
            Spec::parse("version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.5gb\": 1}")
                .unwrap();
        let e = plan(s.config("a").unwrap(), &[h100(3, false, &[])]).unwrap_err().to_string();
        assert!(e.starts_with("GPU 3 (NVIDIA H100 80GB HBM3): profile \"1g.5gb\" does not exist on this product (it has: 1g.10gb,"), "{e}");
        let mut odd = h100(0, false, &[]);
        odd.pci_device_id = 0x1234_10DE;
        let e = plan(spec.config("balanced").unwrap(), &[odd]).unwrap_err().to_string();
        assert!(e.contains("PCI device id 0x123410DE): no MIG profile table"), "{e}");
    }

    #[test]
    fn compute_instance_profiles_pack_into_gpu_instances() {
        let spec = Spec::parse(
            r#"
version: v1
mig-configs:
  shared:
    - devices: all
      mig-enabled: true
      mig-devices: {"4g.40gb": 1, "1c.3g.40gb": 3}
  mixed7:
    - devices: all
      mig-enabled: true
      mig-devices: {"1c.7g.80gb": 2, "2c.7g.80gb": 1, "3c.7g.80gb": 1}
  two-gis:
    - devices: all
      mig-enabled: true
      mig-devices: {"2c.3g.40gb": 2}
  too-big:
    - devices: all
      mig-enabled: true
      mig-devices: {"4c.3g.40gb": 1}
  no-3c-in-4g:
    - devices: all
      mig-enabled: true
      mig-devices: {"3c.4g.40gb": 1}
"#,
        )
        .unwrap();
        let show = |config: &str, gpus: &[GpuState]| -> Result<Vec<String>, String> {
            plan(spec.config(config).unwrap(), gpus).map(|p| p.steps.iter().map(|s| s.to_string()).collect()).map_err(|e| e.to_string())
        };
        assert_eq!(
            show("shared", &[h100(0, true, &[])]).unwrap(),
            [
                "GPU 0: create 4g.40gb (profile id 5) at placement 0",
                "GPU 0: create 3g.40gb (profile id 9) at placement 4 as compute instances 1c+1c+1c"
            ]
        );
        assert_eq!(
            show("mixed7", &[h100(0, true, &[])]).unwrap(),
            ["GPU 0: create 7g.80gb (profile id 0) at placement 0 as compute instances 3c+2c+1c+1c"]
        );
        // Two 2-slice CIs do not share one 3g instance: two 3g instances.
        assert_eq!(show("two-gis", &[h100(0, true, &[])]).unwrap().len(), 2);
        let e = show("too-big", &[h100(0, true, &[])]).unwrap_err();
        assert!(e.contains("3g.40gb cannot be split into compute instances 4c"), "{e}");
        let e = show("no-3c-in-4g", &[h100(0, true, &[])]).unwrap_err();
        assert!(e.contains("4g.40gb cannot be split into compute instances 3c") && e.contains("[1, 2, 4]"), "{e}");
        // An instance with the wrong split is replaced; the right one is kept.
        let mut gpu = h100(0, true, &[("4g.40gb", 0), ("3g.40gb", 4)]);
        assert_eq!(show("shared", std::slice::from_ref(&gpu)).unwrap().len(), 2, "destroy the full 3g, create the split one");
        gpu.instances[1].cis = mig::CiSplit::new(mig::by_name(mig::H100_80GB, "3g.40gb").unwrap(), &[1, 1, 1]).unwrap();
        assert!(show("shared", &[gpu]).unwrap().is_empty());
    }
}
