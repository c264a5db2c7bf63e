//! Neuron core groups from the spec's `neuron-configs`: planned on the node's instance type
//! with the rules in `hearth_proto::neuron` (contiguous ranges; inside one device, or whole
//! devices connected as the product allows). A layout changes no hardware: it is Hearth's
//! allocation of core ranges, which runtimes get as `NEURON_RT_VISIBLE_CORES`.

use hearth_proto::neuron::{Group, GroupError, Topology, plan};

use super::spec::NeuronEntry;

/// The groups of one config on one instance type, every entry planned on its own devices.
pub fn plan_config(instance_type: &str, entries: &[NeuronEntry]) -> Result<(Topology, Vec<Group>), GroupError> {
    // Every entry of a config shares the node's LNC; the first that sets it decides.
    let lnc = entries.iter().find_map(|e| e.lnc);
    let t = Topology::of(instance_type, lnc)?;
    if let Some(other) = entries.iter().find_map(|e| e.lnc.filter(|l| Some(*l) != lnc)) {
        return Err(GroupError::Lnc { instance_type: t.instance_type, lnc: other });
    }
    let mut groups = Vec::new();
    for e in entries {
        groups.extend(plan(&t, &e.device_list(t.devices), &e.groups)?);
    }
    groups.sort();
    Ok((t, groups))
}

/// `hearth partition plan` for Neuron: the groups, their devices and what runtimes get.
pub fn plan_text(config: &str, instance_type: &str, source: &str, entries: &[NeuronEntry]) -> anyhow::Result<String> {
    let (t, groups) = plan_config(instance_type, entries).map_err(|e| anyhow::anyhow!("config {config:?} on {instance_type}: {e}"))?;
    let mut out = format!(
        "plan for config {config:?} on {source} {} ({} {} devices, {} NeuronCores, LNC {}) (read-only; nothing was changed):\n",
        t.instance_type,
        t.devices,
        t.device_name,
        t.total_cores(),
        t.lnc
    );
    let cpd = t.cores_per_device;
    for (i, g) in groups.iter().enumerate() {
        let (first, last) = (g.start / cpd, (g.start + g.cores - 1) / cpd);
        let devices = if first == last { format!("device {first}") } else { format!("devices {first}-{last}") };
        out.push_str(&format!(
            "  group {i}: {} cores {:<7} {devices:<12} NEURON_RT_VISIBLE_CORES={}\n",
            g.cores,
            g.visible_cores(),
            g.visible_cores()
        ));
    }
    let used: u32 = groups.iter().map(|g| g.cores).sum();
    out.push_str(&format!("  {} of {} cores in groups, {} free\n", used, t.total_cores(), t.total_cores() - used));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::spec::Spec;

    const SPEC: &str = r#"
version: v1
neuron-configs:
  six-pairs:
    - devices: all
      core-groups: [{cores: 2, count: 6}]
  split:
    - devices: [0, 1, 2, 3]
      core-groups: [{cores: 8, count: 1}]
    - devices: [4, 5]
      core-groups: [{cores: 1, count: 4}]
  trn2-wide:
    - devices: all
      lnc: 1
      core-groups: [{cores: 32, count: 2}, {cores: 8, count: 4}]
"#;

    #[test]
    fn configs_plan_on_their_devices_and_print_what_runtimes_get() {
        let s = Spec::parse(SPEC).unwrap();
        let text = plan_text("six-pairs", "inf2.48xlarge", "simulated", s.neuron_config("six-pairs").unwrap()).unwrap();
        assert!(text.contains("12 Inferentia2 devices, 24 NeuronCores"), "{text}");
        assert!(text.contains("group 5: 2 cores 10-11"), "{text}");
        assert!(text.contains("12 of 24 cores in groups, 12 free"), "{text}");
        let (_, g) = plan_config("inf2.48xlarge", s.neuron_config("split").unwrap()).unwrap();
        assert_eq!(g[0], Group { start: 0, cores: 8 });
        assert_eq!(g[1..].iter().map(|g| g.start).collect::<Vec<_>>(), [8, 9, 10, 11]);
        let (t, g) = plan_config("trn2.48xlarge", s.neuron_config("trn2-wide").unwrap()).unwrap();
        assert_eq!((t.cores_per_device, t.total_cores()), (8, 128));
        assert_eq!(g.iter().filter(|g| g.cores == 32).map(|g| g.start).collect::<Vec<_>>(), [0, 32], "4 whole devices each");
        // The split config's 8-core group is 4 devices: fine on inf2, not on trn1.
        let e = plan_config("trn1.32xlarge", s.neuron_config("split").unwrap());
        assert!(e.is_ok(), "4 aligned devices are a trn1 group: {e:?}");
        let e = plan_text("six-pairs", "inf2.xlarge", "simulated", s.neuron_config("six-pairs").unwrap()).unwrap_err().to_string();
        assert!(e.contains("config \"six-pairs\" on inf2.xlarge") && e.contains("do not fit"), "{e}");
    }

    #[test]
    fn bad_neuron_entries_name_the_field() {
        let bad = |y: &str| Spec::parse(&format!("version: v1\nneuron-configs:\n  c:\n{y}")).unwrap_err().to_string();
        assert!(bad("    - {devices: all, core-groups: []}").contains("neuron-configs.c[0].core-groups: expected at least one"));
        assert!(bad("    - {devices: all, lnc: 3, core-groups: [{cores: 1, count: 1}]}").contains(".lnc: expected 1 or 2"));
        let e =
            bad("    - {devices: [0, 1], core-groups: [{cores: 1, count: 1}]}\n    - {devices: [1], core-groups: [{cores: 1, count: 1}]}");
        assert!(e.contains("neuron-configs.c[1].devices"), "{e}");
        let s = Spec::parse("version: v1\nneuron-configs:\n  n: [{devices: all, core-groups: [{cores: 1, count: 1}]}]").unwrap();
        assert!(s.config("n").unwrap().is_empty(), "a Neuron-only name has no MIG entries");
        assert!(s.neuron_config("x").unwrap_err().to_string().contains("no config named \"x\" (have: n)"));
    }
}
