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
//! # neuron-configs: reserved for Neuron core groups
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
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSpec {
    version: String,
    mig_configs: BTreeMap<String, Vec<RawEntry>>,
    /// Reserved: Neuron core groups will be configured here.
    #[serde(default)]
    #[allow(dead_code)]
    neuron_configs: Option<serde_yaml_ng::Value>,
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
        Ok(Self { configs })
    }

    pub fn config(&self, name: &str) -> Result<&[Entry], SpecError> {
        self.configs
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| SpecError::NoConfig(name.to_owned(), self.configs.keys().cloned().collect::<Vec<_>>().join(", ")))
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
