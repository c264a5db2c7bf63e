//! The partition spec: mig-parted's format, so users can bring their file as it is.
//!
//! ```yaml
//! version: v1
//! mig-configs:
//!   balanced:
//!     - device-filter: ["0x233010DE"]   # optional: PCI device ids this entry applies to
//!       devices: all                    # or [0, 1]
//!       mig-enabled: true
//!       mig-devices: {"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 2}
//!       # Hearth extension, optional: exact placements instead of best fit.
//!       mig-placements: [{profile: "3g.40gb", start: 4}]
//! # Hearth extension: Neuron core groups, by config name (a name may have both kinds).
//! neuron-configs:
//!   six-pairs:
//!     - devices: all                    # or [0, 1]
//!       lnc: 2                          # trn2 only: logical NeuronCore config (1 or 2)
//!       core-groups: [{cores: 2, count: 6}]
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("partition spec: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("partition spec: version: expected \"v1\", got {0:?}")]
    Version(String),
    #[error("partition spec: mig-configs.{config}[{entry}].device-filter: expected PCI device ids like \"0x233010DE\", got {got:?}")]
    Filter { config: String, entry: usize, got: String },
    #[error("partition spec: mig-configs.{config}[{entry}].mig-devices: {profile}: expected a count of 1 to 7, got {count}")]
    Count { config: String, entry: usize, profile: String, count: u32 },
    #[error("partition spec: mig-configs.{config}[{entry}]: mig-devices given with mig-enabled: false")]
    DevicesWithoutMig { config: String, entry: usize },
    #[error("partition spec: no config named {0:?} (have: {1})")]
    NoConfig(String, String),
    #[error("partition spec: neuron-configs.{config}[{entry}].{field}: expected {expected}")]
    Neuron { config: String, entry: usize, field: &'static str, expected: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Devices {
    All(AllLiteral),
    List(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub enum AllLiteral {
    #[serde(rename = "all")]
    All,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub profile: String,
    pub start: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawEntry {
    device_filter: Option<OneOrMany>,
    devices: Devices,
    mig_enabled: bool,
    #[serde(default)]
    mig_devices: BTreeMap<String, u32>,
    #[serde(default)]
    mig_placements: Vec<Placement>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroups {
    cores: u32,
    count: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNeuronEntry {
    devices: Devices,
    lnc: Option<u32>,
    core_groups: Vec<RawGroups>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSpec {
    version: String,
    #[serde(default)]
    mig_configs: BTreeMap<String, Vec<RawEntry>>,
    #[serde(default)]
    neuron_configs: BTreeMap<String, Vec<RawNeuronEntry>>,
}

/// One entry of a named Neuron config: on which devices, which core groups.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronEntry {
    pub devices: Devices,
    /// trn2's logical NeuronCore config; None: the instance type's default.
    pub lnc: Option<u32>,
    pub groups: Vec<hearth_proto::neuron::Request>,
}

impl NeuronEntry {
    /// The device indices this entry covers on a node with `n` devices.
    pub fn device_list(&self, n: u32) -> Vec<u32> {
        match &self.devices {
            Devices::All(_) => (0..n).collect(),
            Devices::List(l) => l.clone(),
        }
    }
}

/// One entry of a named config: which GPUs, and what they should look like.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// PCI device ids (device << 16 | vendor); empty: any.
    pub device_filter: Vec<u32>,
    pub devices: Devices,
    pub mig_enabled: bool,
    /// Profile name -> count, in name order.
    pub mig_devices: BTreeMap<String, u32>,
    pub mig_placements: Vec<Placement>,
}

impl Entry {
    pub fn applies_to(&self, index: u32, pci_device_id: u32) -> bool {
        let dev = match &self.devices {
            Devices::All(_) => true,
            Devices::List(l) => l.contains(&index),
        };
        dev && (self.device_filter.is_empty() || self.device_filter.contains(&pci_device_id))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub configs: BTreeMap<String, Vec<Entry>>,
    pub neuron: BTreeMap<String, Vec<NeuronEntry>>,
}

impl Spec {
    pub fn parse(yaml: &str) -> Result<Self, SpecError> {
        let raw: RawSpec = serde_yaml_ng::from_str(yaml)?;
        if raw.version != "v1" {
            return Err(SpecError::Version(raw.version));
        }
        let mut configs = BTreeMap::new();
        for (name, entries) in raw.mig_configs {
            let mut out = Vec::new();
            for (i, e) in entries.into_iter().enumerate() {
                let filters = match e.device_filter {
                    None => vec![],
                    Some(OneOrMany::One(s)) => vec![s],
                    Some(OneOrMany::Many(v)) => v,
                };
                let device_filter = filters
                    .iter()
                    .map(|f| {
                        u32::from_str_radix(f.trim_start_matches("0x").trim_start_matches("0X"), 16).map_err(|_| SpecError::Filter {
                            config: name.clone(),
                            entry: i,
                            got: f.clone(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                for (p, &n) in &e.mig_devices {
                    if !(1..=7).contains(&n) {
                        return Err(SpecError::Count { config: name.clone(), entry: i, profile: p.clone(), count: n });
                    }
                }
                if !e.mig_enabled && (!e.mig_devices.is_empty() || !e.mig_placements.is_empty()) {
                    return Err(SpecError::DevicesWithoutMig { config: name.clone(), entry: i });
                }
                out.push(Entry {
                    device_filter,
                    devices: e.devices,
                    mig_enabled: e.mig_enabled,
                    mig_devices: e.mig_devices,
                    mig_placements: e.mig_placements,
                });
            }
            configs.insert(name, out);
        }
        let mut neuron = BTreeMap::new();
        for (name, entries) in raw.neuron_configs {
            let mut out = Vec::new();
            for (i, e) in entries.into_iter().enumerate() {
                let bad =
                    |field, expected: &str| SpecError::Neuron { config: name.clone(), entry: i, field, expected: expected.to_owned() };
                if e.core_groups.is_empty() {
                    return Err(bad("core-groups", "at least one {cores: N, count: M}"));
                }
                if e.core_groups.iter().any(|g| g.cores == 0 || g.cores > 128 || g.count == 0 || g.count > 128) {
                    return Err(bad("core-groups", "cores 1-128 and count 1-128 in each"));
                }
                if e.lnc.is_some_and(|l| l != 1 && l != 2) {
                    return Err(bad("lnc", "1 or 2 (trn2's logical NeuronCore config)"));
                }
                if let Some(prev) = out.iter().position(|p: &NeuronEntry| overlaps(&p.devices, &e.devices)) {
                    return Err(bad("devices", &format!("devices no earlier entry covers (entry {prev} has some of them)")));
                }
                let groups = e.core_groups.iter().map(|g| hearth_proto::neuron::Request { cores: g.cores, count: g.count }).collect();
                out.push(NeuronEntry { devices: e.devices, lnc: e.lnc, groups });
            }
            neuron.insert(name, out);
        }
        Ok(Self { configs, neuron })
    }

    fn names(&self) -> String {
        self.configs
            .keys()
            .chain(self.neuron.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The MIG entries of a config: empty when the name has only Neuron groups.
    pub fn config(&self, name: &str) -> Result<&[Entry], SpecError> {
        match (self.configs.get(name), self.neuron.contains_key(name)) {
            (Some(c), _) => Ok(c),
            (None, true) => Ok(&[]),
            (None, false) => Err(SpecError::NoConfig(name.to_owned(), self.names())),
        }
    }

    /// The Neuron entries of a config: empty when the name has only MIG entries.
    pub fn neuron_config(&self, name: &str) -> Result<&[NeuronEntry], SpecError> {
        match (self.neuron.get(name), self.configs.contains_key(name)) {
            (Some(c), _) => Ok(c),
            (None, true) => Ok(&[]),
            (None, false) => Err(SpecError::NoConfig(name.to_owned(), self.names())),
        }
    }
}

fn overlaps(a: &Devices, b: &Devices) -> bool {
    match (a, b) {
        (Devices::All(_), _) | (_, Devices::All(_)) => true,
        (Devices::List(x), Devices::List(y)) => x.iter().any(|d| y.contains(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIG_PARTED: &str = r#"
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.10gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.10gb": 7
  custom:
    - device-filter: ["0x233010DE"]
      devices: [0, 1]
      mig-enabled: true
      mig-devices: {"4g.40gb": 1, "3g.40gb": 1}
    - devices: [2, 3]
      mig-enabled: false
"#;

    #[test]
    fn reads_a_mig_parted_file() {
        let s = Spec::parse(MIG_PARTED).unwrap();
        assert_eq!(s.configs.len(), 3);
        let c = s.config("custom").unwrap();
        assert_eq!(c[0].device_filter, vec![0x2330_10DE]);
        assert!(c[0].applies_to(1, 0x2330_10DE) && !c[0].applies_to(2, 0x2330_10DE) && !c[0].applies_to(0, 0x20B0_10DE));
        assert!(c[1].applies_to(3, 0x1234));
        assert_eq!(s.config("all-1g.10gb").unwrap()[0].mig_devices["1g.10gb"], 7);
    }

    #[test]
    fn errors_name_the_place_and_expectation() {
        let e = Spec::parse("version: v2\nmig-configs: {}").unwrap_err().to_string();
        assert_eq!(e, "partition spec: version: expected \"v1\", got \"v2\"");
        let e = Spec::parse(
            "version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.10gb\": 9}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mig-configs.a[0].mig-devices: 1g.10gb: expected a count of 1 to 7, got 9"), "{e}");
        let e = Spec::parse(
            "version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: false\n      mig-devices: {\"1g.10gb\": 1}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mig-devices given with mig-enabled: false"), "{e}");
        let e = Spec::parse("version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      colour: red")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = Spec::parse(MIG_PARTED).unwrap().config("nope").unwrap_err().to_string();
        assert!(e.contains("no config named \"nope\" (have: all-1g.10gb, all-disabled, custom)"), "{e}");
    }
}
