//! Neuron geometry: the Inferentia2 and Trainium instance types (devices, NeuronCores per
//! device, memory, how devices connect), and the rules a core group must follow to be one
//! the Neuron runtime can use (`NEURON_RT_VISIBLE_CORES=A-B`): a contiguous range of
//! node-wide core indices (device index x cores per device + core), inside one device, or
//! spanning whole devices that are connected as the product allows. The agent's planner and
//! simulator and the controller's placement share this table.
//!
//! Cores are logical: on trn2 the LNC setting (logical NeuronCore config) groups physical
//! cores, 2 per logical core by default (4 logical cores per device), 1 for all 8.

use std::fmt;

/// How the devices of an instance type may be combined into one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Devices form a ring (inf2): any run of consecutive devices.
    Ring,
    /// A torus (trn1, trn2): these device counts only, starting at a multiple of the count.
    Counts(&'static [u32]),
}

/// One instance type's Neuron geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub instance_type: &'static str,
    /// "Inferentia2", "Trainium", "Trainium2": what the driver calls the device.
    pub device_name: &'static str,
    pub devices: u32,
    /// Physical NeuronCores per device.
    pub physical_cores: u32,
    /// Logical cores per device under the LNC setting in use.
    pub cores_per_device: u32,
    /// Physical cores per logical core (1, or 2 on trn2 by default).
    pub lnc: u32,
    pub memory_per_device: u64,
    pub span: Span,
}

const GIB: u64 = 1 << 30;
const TRN_COUNTS: &[u32] = &[1, 4, 8, 16];

/// The instance types Hearth knows, with their default LNC.
pub const INSTANCE_TYPES: &[Topology] = &[
    inf2("inf2.xlarge", 1),
    inf2("inf2.8xlarge", 1),
    inf2("inf2.24xlarge", 6),
    inf2("inf2.48xlarge", 12),
    Topology {
        instance_type: "trn1.2xlarge",
        device_name: "Trainium",
        devices: 1,
        physical_cores: 2,
        cores_per_device: 2,
        lnc: 1,
        memory_per_device: 32 * GIB,
        span: Span::Counts(&[1]),
    },
    Topology {
        instance_type: "trn1.32xlarge",
        device_name: "Trainium",
        devices: 16,
        physical_cores: 2,
        cores_per_device: 2,
        lnc: 1,
        memory_per_device: 32 * GIB,
        span: Span::Counts(TRN_COUNTS),
    },
    Topology {
        instance_type: "trn2.48xlarge",
        device_name: "Trainium2",
        devices: 16,
        physical_cores: 8,
        cores_per_device: 4,
        lnc: 2,
        memory_per_device: 96 * GIB,
        span: Span::Counts(TRN_COUNTS),
    },
];

const fn inf2(instance_type: &'static str, devices: u32) -> Topology {
    Topology {
        instance_type,
        device_name: "Inferentia2",
        devices,
        physical_cores: 2,
        cores_per_device: 2,
        lnc: 1,
        memory_per_device: 32 * GIB,
        span: Span::Ring,
    }
}

impl Topology {
    /// The geometry of `instance_type` with `lnc` logical-core grouping (None: its default).
    /// Only trn2 has a choice (1 or 2).
    pub fn of(instance_type: &str, lnc: Option<u32>) -> Result<Self, GroupError> {
        let t = *INSTANCE_TYPES.iter().find(|t| t.instance_type == instance_type).ok_or_else(|| GroupError::UnknownInstance {
            given: instance_type.to_owned(),
            known: INSTANCE_TYPES.iter().map(|t| t.instance_type).collect(),
        })?;
        match lnc {
            None => Ok(t),
            Some(l) if l == t.lnc => Ok(t),
            Some(l @ (1 | 2)) if t.physical_cores == 8 => Ok(Topology { lnc: l, cores_per_device: t.physical_cores / l, ..t }),
            Some(l) => Err(GroupError::Lnc { instance_type: t.instance_type, lnc: l }),
        }
    }

    pub fn total_cores(&self) -> u32 {
        self.devices * self.cores_per_device
    }

    /// Device counts one group may span (1 included).
    pub fn span_counts(&self) -> Vec<u32> {
        match self.span {
            Span::Ring => (1..=self.devices).collect(),
            Span::Counts(c) => c.iter().copied().filter(|n| *n <= self.devices).collect(),
        }
    }

    /// Whether devices `first..first+count` may form one group.
    pub fn may_span(&self, first: u32, count: u32) -> bool {
        count >= 1
            && first + count <= self.devices
            && match self.span {
                Span::Ring => true,
                Span::Counts(c) => c.contains(&count) && first.is_multiple_of(count),
            }
    }

    /// Checks one group: a contiguous core range inside one device, or whole devices that
    /// may form a group.
    pub fn check(&self, g: Group) -> Result<(), GroupError> {
        let cpd = self.cores_per_device;
        if g.cores == 0 || g.start + g.cores > self.total_cores() {
            return Err(GroupError::OutOfRange { group: g, total: self.total_cores() });
        }
        if g.cores <= cpd {
            if g.start / cpd != (g.start + g.cores - 1) / cpd {
                return Err(GroupError::StraddlesDevices { group: g, cores_per_device: cpd });
            }
            return Ok(());
        }
        if !g.cores.is_multiple_of(cpd) || !g.start.is_multiple_of(cpd) {
            return Err(GroupError::PartialDevices { group: g, cores_per_device: cpd });
        }
        let (first, count) = (g.start / cpd, g.cores / cpd);
        if !self.may_span(first, count) {
            return Err(GroupError::Span { group: g, instance_type: self.instance_type, allowed: self.span_rule() });
        }
        Ok(())
    }

    fn span_rule(&self) -> String {
        match self.span {
            Span::Ring => "consecutive devices (they form a ring)".into(),
            Span::Counts(_) => {
                let c: Vec<String> = self.span_counts().iter().map(u32::to_string).collect();
                format!("{} devices starting at a multiple of that count", c.join(", "))
            }
        }
    }
}

/// A core group: node-wide logical cores `start..start+cores`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub start: u32,
    pub cores: u32,
}

impl Group {
    /// The value of `NEURON_RT_VISIBLE_CORES` (and Hearth's partition name without the
    /// `neuroncores:` prefix): "4-7", or "4" for one core.
    pub fn visible_cores(&self) -> String {
        if self.cores == 1 { self.start.to_string() } else { format!("{}-{}", self.start, self.start + self.cores - 1) }
    }

    /// Hearth's partition name for the group: "neuroncores:4-7".
    pub fn partition_name(&self) -> String {
        format!("neuroncores:{}-{}", self.start, self.start + self.cores - 1)
    }

    /// Parses "neuroncores:4-7" (or "neuroncores:4").
    pub fn parse_partition(s: &str) -> Option<Self> {
        let range = s.strip_prefix("neuroncores:")?;
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (b >= a).then(|| Group { start: a, cores: b - a + 1 })
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cores {}", self.visible_cores())
    }
}

/// "`count` groups of `cores` cores".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cores: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("unknown Neuron instance type {given:?} (known: {})", known.join(", "))]
    UnknownInstance { given: String, known: Vec<&'static str> },
    #[error("{instance_type}: lnc {lnc} is not available (only trn2 chooses, 1 or 2)")]
    Lnc { instance_type: &'static str, lnc: u32 },
    #[error("{group}: outside the node's {total} cores")]
    OutOfRange { group: Group, total: u32 },
    #[error("{group}: crosses a device boundary ({cores_per_device} cores per device); a group that fits one device must stay in it")]
    StraddlesDevices { group: Group, cores_per_device: u32 },
    #[error("{group}: a group larger than a device must take whole devices ({cores_per_device} cores each)")]
    PartialDevices { group: Group, cores_per_device: u32 },
    #[error("{group}: {instance_type} groups devices as {allowed}")]
    Span { group: Group, instance_type: &'static str, allowed: String },
    #[error("{0}: overlaps {1}")]
    Overlap(Group, Group),
    #[error("a group of {cores} cores: expected {expected}")]
    Size { cores: u32, expected: String },
    #[error("devices {devices:?}: {needed} cores of groups do not fit their {have} cores as the rules allow ({detail})")]
    NoFit { devices: Vec<u32>, needed: u32, have: u32, detail: String },
    #[error("device {device}: not on this {instance_type} (devices 0-{last})")]
    NoDevice { device: u32, instance_type: &'static str, last: u32 },
}

/// Checks that a request size can be a group at all on this topology.
pub fn check_size(t: &Topology, cores: u32) -> Result<(), GroupError> {
    let cpd = t.cores_per_device;
    let ok = cores >= 1 && (cores <= cpd || (cores.is_multiple_of(cpd) && t.span_counts().contains(&(cores / cpd))));
    if ok {
        return Ok(());
    }
    let multi: Vec<String> = t.span_counts().iter().filter(|n| **n > 1).map(|n| (n * cpd).to_string()).collect();
    Err(GroupError::Size {
        cores,
        expected: format!(
            "1 to {cpd} cores (within one {} device){}",
            t.device_name,
            if multi.is_empty() { String::new() } else { format!(", or {} (whole devices)", multi.join(", ")) }
        ),
    })
}

/// Checks a whole layout: every group valid and none overlapping.
pub fn check_layout(t: &Topology, groups: &[Group]) -> Result<(), GroupError> {
    let mut sorted = groups.to_vec();
    sorted.sort();
    for g in &sorted {
        t.check(*g)?;
    }
    for w in sorted.windows(2) {
        if w[0].start + w[0].cores > w[1].start {
            return Err(GroupError::Overlap(w[1], w[0]));
        }
    }
    Ok(())
}

/// Most placements the planner tries before it gives up (it never comes close on real
/// products: the search is exact with symmetry pruning).
const SEARCH_LIMIT: u64 = 2_000_000;

/// Places the requested groups on `devices` (all of them when empty), deterministically:
/// groups larger than a device first (whole devices, lowest allowed first device), then the
/// rest largest first, each at the lowest free position. The search backtracks, so it finds
/// a layout whenever one exists. Groups come back ordered by start.
pub fn plan(t: &Topology, devices: &[u32], requests: &[Request]) -> Result<Vec<Group>, GroupError> {
    let devices: Vec<u32> = if devices.is_empty() { (0..t.devices).collect() } else { devices.to_vec() };
    for d in &devices {
        if *d >= t.devices {
            return Err(GroupError::NoDevice { device: *d, instance_type: t.instance_type, last: t.devices - 1 });
        }
    }
    let mut sizes = Vec::new();
    for r in requests {
        check_size(t, r.cores)?;
        sizes.extend(std::iter::repeat_n(r.cores, r.count as usize));
    }
    sizes.sort_by(|a, b| b.cmp(a));
    let cpd = t.cores_per_device;
    let needed: u32 = sizes.iter().sum();
    let have = devices.len() as u32 * cpd;
    let no_fit = |detail: &str| GroupError::NoFit { devices: devices.clone(), needed, have, detail: detail.to_owned() };
    if needed > have {
        return Err(no_fit("more cores asked than the devices have"));
    }
    // Free cores per device as a bit mask (cpd <= 8 on every product).
    let mut free: Vec<u32> = (0..t.devices).map(|d| if devices.contains(&d) { (1u32 << cpd) - 1 } else { 0 }).collect();
    let mut out = Vec::with_capacity(sizes.len());
    let mut budget = SEARCH_LIMIT;
    if place(t, &sizes, 0, &mut free, &mut out, &mut budget) {
        out.sort();
        Ok(out)
    } else if budget == 0 {
        Err(no_fit("the search gave up; split the request"))
    } else {
        Err(no_fit("no layout satisfies the grouping rules"))
    }
}

fn place(t: &Topology, sizes: &[u32], i: usize, free: &mut [u32], out: &mut Vec<Group>, budget: &mut u64) -> bool {
    let Some(&size) = sizes.get(i) else { return true };
    let cpd = t.cores_per_device;
    let full = (1u32 << cpd) - 1;
    // Equal sizes are placed in increasing order: no permutation of them is tried twice.
    let floor = if i > 0 && sizes[i - 1] == size { out.last().map_or(0, |g| g.start + 1) } else { 0 };
    if size > cpd {
        let n = size / cpd;
        for first in 0..t.devices {
            if first * cpd < floor || !t.may_span(first, n) || (first..first + n).any(|d| free[d as usize] != full) {
                continue;
            }
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            (first..first + n).for_each(|d| free[d as usize] = 0);
            out.push(Group { start: first * cpd, cores: size });
            if place(t, sizes, i + 1, free, out, budget) {
                return true;
            }
            out.pop();
            (first..first + n).for_each(|d| free[d as usize] = full);
        }
        return false;
    }
    let mask = (1u32 << size) - 1;
    // Devices in the same state are interchangeable from here on (larger groups are placed).
    let mut tried: Vec<u32> = Vec::new();
    for d in 0..t.devices {
        let f = free[d as usize];
        if f == 0 || tried.contains(&f) && floor == 0 {
            continue;
        }
        tried.push(f);
        for off in 0..=(cpd - size) {
            let start = d * cpd + off;
            if start < floor || f & (mask << off) != mask << off {
                continue;
            }
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            free[d as usize] &= !(mask << off);
            out.push(Group { start, cores: size });
            if place(t, sizes, i + 1, free, out, budget) {
                return true;
            }
            out.pop();
            free[d as usize] |= mask << off;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(name: &str) -> Topology {
        Topology::of(name, None).unwrap()
    }

    #[test]
    fn the_products_and_the_lnc_choice() {
        assert_eq!(t("inf2.48xlarge").total_cores(), 24);
        assert_eq!(t("inf2.xlarge").total_cores(), 2);
        assert_eq!(t("trn1.32xlarge").total_cores(), 32);
        assert_eq!(t("trn2.48xlarge").total_cores(), 64, "LNC=2 by default: 4 logical cores per device");
        assert_eq!(Topology::of("trn2.48xlarge", Some(1)).unwrap().total_cores(), 128);
        assert!(matches!(Topology::of("inf2.xlarge", Some(2)), Err(GroupError::Lnc { .. })));
        let e = Topology::of("p5.48xlarge", None).unwrap_err().to_string();
        assert!(e.contains("inf2.48xlarge") && e.contains("p5.48xlarge"), "{e}");
    }

    #[test]
    fn group_rules_say_which_rule_a_group_breaks() {
        let inf = t("inf2.48xlarge");
        assert!(inf.check(Group { start: 2, cores: 2 }).is_ok());
        assert!(inf.check(Group { start: 2, cores: 6 }).is_ok(), "three devices of a ring");
        assert!(matches!(inf.check(Group { start: 1, cores: 2 }), Err(GroupError::StraddlesDevices { .. })));
        assert!(matches!(inf.check(Group { start: 2, cores: 3 }), Err(GroupError::PartialDevices { .. })));
        assert!(matches!(inf.check(Group { start: 22, cores: 4 }), Err(GroupError::OutOfRange { .. })));
        let trn = t("trn1.32xlarge");
        assert!(trn.check(Group { start: 8, cores: 8 }).is_ok(), "4 devices from device 4");
        let e = trn.check(Group { start: 4, cores: 8 }).unwrap_err();
        assert!(e.to_string().contains("1, 4, 8, 16 devices starting at a multiple"), "{e}");
        assert!(matches!(trn.check(Group { start: 0, cores: 4 }), Err(GroupError::Span { .. })), "2 devices is not a trn1 group");
        assert_eq!(Group { start: 4, cores: 4 }.visible_cores(), "4-7");
        assert_eq!(Group { start: 3, cores: 1 }.visible_cores(), "3");
        assert_eq!(Group::parse_partition("neuroncores:4-7"), Some(Group { start: 4, cores: 4 }));
        assert_eq!(Group::parse_partition("neuroncores:7-4"), None);
    }

    #[test]
    fn the_issue_example_six_pairs_on_inf2_48xlarge() {
        let g = plan(&t("inf2.48xlarge"), &[], &[Request { cores: 2, count: 6 }]).unwrap();
        assert_eq!(g.len(), 6);
        assert_eq!(g[0], Group { start: 0, cores: 2 });
        assert_eq!(g[5], Group { start: 10, cores: 2 });
        let e = check_size(&t("trn1.32xlarge"), 6).unwrap_err().to_string();
        assert!(e.contains("1 to 2 cores") && e.contains("8, 16, 32"), "{e}");
    }

    #[test]
    fn a_mix_needing_backtracking_is_found() {
        // trn2 LNC=1: 8 cores per device. 5+3 and 5+3 fit two devices; largest-first
        // first-fit would put both 5s... and still fit; this mix needs the 3s beside the 5s.
        let t2 = Topology::of("trn2.48xlarge", Some(1)).unwrap();
        let g = plan(&t2, &[0, 1], &[Request { cores: 5, count: 2 }, Request { cores: 3, count: 2 }]).unwrap();
        check_layout(&t2, &g).unwrap();
        assert_eq!(g.iter().map(|g| g.cores).sum::<u32>(), 16);
        let e = plan(&t2, &[0, 1], &[Request { cores: 6, count: 2 }, Request { cores: 3, count: 2 }]).unwrap_err();
        assert!(matches!(e, GroupError::NoFit { .. }), "{e}");
    }

    /// Every way to place the groups, by brute force: does any layout exist?
    fn exists(t: &Topology, devices: &[u32], sizes: &[u32]) -> bool {
        fn go(t: &Topology, devices: &[u32], sizes: &[u32], used: &mut Vec<Group>) -> bool {
            let Some((&s, rest)) = sizes.split_first() else { return true };
            for start in 0..t.total_cores() {
                let g = Group { start, cores: s };
                let on = (start / t.cores_per_device..(start + s - 1) / t.cores_per_device + 1).all(|d| devices.contains(&d));
                if !on || t.check(g).is_err() || used.iter().any(|u| u.start < start + s && start < u.start + u.cores) {
                    continue;
                }
                used.push(g);
                if go(t, devices, rest, used) {
                    return true;
                }
                used.pop();
            }
            false
        }
        go(t, devices, sizes, &mut Vec::new())
    }

    fn small() -> impl Strategy<Value = (Topology, Vec<u32>, Vec<Request>)> {
        let topo = prop_oneof![
            Just(t("inf2.24xlarge")),
            Just(t("inf2.xlarge")),
            Just(Topology { devices: 3, ..Topology::of("trn2.48xlarge", Some(1)).unwrap() }),
            Just(Topology { devices: 4, ..t("trn1.32xlarge") }),
        ];
        topo.prop_flat_map(|t| {
            let devices = proptest::sample::subsequence((0..t.devices).collect::<Vec<_>>(), 0..=t.devices as usize);
            let sizes = prop_oneof![1..=t.cores_per_device, Just(t.cores_per_device * 2), Just(t.cores_per_device * 4)];
            let reqs = proptest::collection::vec((sizes, 1..=3u32).prop_map(|(cores, count)| Request { cores, count }), 1..4);
            (Just(t), devices, reqs)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn plans_obey_the_rules_and_are_found_whenever_one_exists((t, devices, reqs) in small()) {
            let mut sizes: Vec<u32> = reqs.iter().flat_map(|r| std::iter::repeat_n(r.cores, r.count as usize)).collect();
            sizes.sort_by(|a, b| b.cmp(a));
            let valid = reqs.iter().all(|r| check_size(&t, r.cores).is_ok());
            let on: Vec<u32> = if devices.is_empty() { (0..t.devices).collect() } else { devices.clone() };
            match plan(&t, &devices, &reqs) {
                Ok(groups) => {
                    prop_assert!(valid);
                    prop_assert!(check_layout(&t, &groups).is_ok(), "{groups:?}");
                    prop_assert_eq!(groups.len(), sizes.len());
                    for g in &groups {
                        let first = g.start / t.cores_per_device;
                        let last = (g.start + g.cores - 1) / t.cores_per_device;
                        prop_assert!((first..=last).all(|d| on.contains(&d)), "{g} outside {on:?}");
                    }
                    // Deterministic: the same answer every time.
                    prop_assert_eq!(plan(&t, &devices, &reqs).unwrap(), groups);
                }
                Err(_) => prop_assert!(!valid || !exists(&t, &on, &sizes), "a layout exists for {sizes:?} on {on:?}"),
            }
        }
    }
}
