//! MIG geometry as the hardware defines it: per-product GPU-instance profiles (NVML profile
//! ids, slices, memory, how many fit, where they may start) and the rules for whether a set
//! of placements fits one GPU. The agent's simulator and partition planner and the
//! controller's placement share this table, so a layout the planner accepts is one the
//! simulated GPU accepts, and a slice placement counts as creatable is one the agent can make.
//!
//! Each GPU has 8 placement units (memory slices). A profile occupies `size` consecutive
//! units from one of its allowed starts. The H100 and H200 rows are NVML's own answers, read
//! (read-only) on real GPUs with driver 580.159.04 by `scripts/nvml-mig-profiles.py` and kept
//! in `docs/hardware/*.json`; a test pins the tables to those readings. The A100 rows follow
//! NVIDIA's published MIG tables and have not been read from hardware here.

/// One GPU-instance profile of one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiProfile {
    /// NVML GPU-instance profile id.
    pub id: u32,
    /// "1g.10gb", "3g.40gb"...
    pub name: &'static str,
    /// Compute slices (the "Ng" part).
    pub compute_slices: u32,
    /// Placement units occupied.
    pub size: u32,
    pub memory_mib: u64,
    /// Most instances of this profile on one GPU.
    pub max_count: u32,
    /// Allowed first placement units.
    pub starts: &'static [u32],
}

pub const PLACEMENT_UNITS: u32 = 8;

const ONE: &[u32] = &[0, 1, 2, 3, 4, 5, 6];
const TWO: &[u32] = &[0, 2, 4, 6];
const THREE: &[u32] = &[0, 2, 4];
const FOUR: &[u32] = &[0, 4];
const START0: &[u32] = &[0];

macro_rules! profiles {
    ($($id:expr, $name:expr, $g:expr, $size:expr, $mem:expr, $max:expr, $starts:expr;)*) => {
        &[$(GiProfile { id: $id, name: $name, compute_slices: $g, size: $size, memory_mib: $mem, max_count: $max, starts: $starts }),*]
    };
}

pub const H100_80GB: &[GiProfile] = profiles![
    19, "1g.10gb", 1, 1, 9984, 7, ONE;
    20, "1g.10gb+me", 1, 1, 9984, 1, ONE;
    15, "1g.20gb", 1, 2, 20096, 4, TWO;
    14, "2g.20gb", 2, 2, 20096, 3, THREE;
    9, "3g.40gb", 3, 4, 40448, 2, FOUR;
    5, "4g.40gb", 4, 4, 40448, 1, START0;
    0, "7g.80gb", 7, 8, 81152, 1, START0;
];

pub const A100_80GB: &[GiProfile] = profiles![
    19, "1g.10gb", 1, 1, 9728, 7, ONE;
    20, "1g.10gb+me", 1, 1, 9728, 1, ONE;
    15, "1g.20gb", 1, 2, 19968, 4, TWO;
    14, "2g.20gb", 2, 2, 19968, 3, THREE;
    9, "3g.40gb", 3, 4, 40192, 2, FOUR;
    5, "4g.40gb", 4, 4, 40192, 1, START0;
    0, "7g.80gb", 7, 8, 80896, 1, START0;
];

pub const A100_40GB: &[GiProfile] = profiles![
    19, "1g.5gb", 1, 1, 4864, 7, ONE;
    20, "1g.5gb+me", 1, 1, 4864, 1, ONE;
    15, "1g.10gb", 1, 2, 9856, 4, TWO;
    14, "2g.10gb", 2, 2, 9856, 3, THREE;
    9, "3g.20gb", 3, 4, 19968, 2, FOUR;
    5, "4g.20gb", 4, 4, 19968, 1, START0;
    0, "7g.40gb", 7, 8, 40192, 1, START0;
];

pub const H200_141GB: &[GiProfile] = profiles![
    19, "1g.18gb", 1, 1, 16384, 7, ONE;
    20, "1g.18gb+me", 1, 1, 16384, 1, ONE;
    15, "1g.35gb", 1, 2, 33280, 4, TWO;
    14, "2g.35gb", 2, 2, 33280, 3, THREE;
    9, "3g.71gb", 3, 4, 71424, 2, FOUR;
    5, "4g.71gb", 4, 4, 71424, 1, START0;
    0, "7g.141gb", 7, 8, 143360, 1, START0;
];

/// The profile table of a product by its PCI device id (mig-parted's `device-filter`).
pub fn profiles_for(pci_device_id: u32) -> Option<&'static [GiProfile]> {
    match pci_device_id {
        0x2330_10DE => Some(H100_80GB),
        0x2335_10DE => Some(H200_141GB),
        0x20B2_10DE => Some(A100_80GB),
        0x20B0_10DE => Some(A100_40GB),
        _ => None,
    }
}

pub fn by_name(table: &'static [GiProfile], name: &str) -> Option<&'static GiProfile> {
    table.iter().find(|p| p.name == name)
}

/// How a GPU instance is divided into compute instances: compute slices per CI, largest
/// first. Empty means one CI spanning the whole GPU instance (what a plain profile such as
/// "3g.40gb" asks for); a single CI of all the slices is stored the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct CiSplit {
    slices: [u8; 7],
    len: u8,
}

/// Compute-instance sizes NVML offers inside a GPU instance of `g` compute slices.
pub fn ci_sizes(g: u32) -> &'static [u32] {
    match g {
        1 => &[1],
        2 => &[1, 2],
        3 => &[1, 2, 3],
        4 => &[1, 2, 4],
        _ => &[1, 2, 3, 4, 7],
    }
}

impl CiSplit {
    pub const FULL: CiSplit = CiSplit { slices: [0; 7], len: 0 };

    /// A split of `profile` into CIs of the given sizes; checks sizes and total.
    pub fn new(profile: &GiProfile, sizes: &[u32]) -> Result<Self, LayoutError> {
        let mut v: Vec<u32> = sizes.to_vec();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let total: u32 = v.iter().sum();
        let bad = v.iter().find(|n| !ci_sizes(profile.compute_slices).contains(n));
        if v.is_empty() || v.len() > 7 || total > profile.compute_slices || bad.is_some() {
            return Err(LayoutError::ComputeSplit {
                profile: profile.name,
                split: v.iter().map(|n| format!("{n}c")).collect::<Vec<_>>().join("+"),
                allowed: ci_sizes(profile.compute_slices),
            });
        }
        if v == [profile.compute_slices] {
            return Ok(Self::FULL);
        }
        let mut slices = [0u8; 7];
        for (slot, n) in slices.iter_mut().zip(&v) {
            *slot = *n as u8;
        }
        Ok(Self { slices, len: v.len() as u8 })
    }

    pub fn is_full(&self) -> bool {
        self.len == 0
    }

    /// Compute slices per CI, largest first; `[g]` for a full split.
    pub fn sizes(&self, profile: &GiProfile) -> Vec<u32> {
        if self.is_full() { vec![profile.compute_slices] } else { self.slices[..self.len as usize].iter().map(|&n| u32::from(n)).collect() }
    }
}

impl std::fmt::Display for CiSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v: Vec<String> = self.slices[..self.len as usize].iter().map(|n| format!("{n}c")).collect();
        f.write_str(&v.join("+"))
    }
}

/// An instance placed on a GPU, and how it is split into compute instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub profile: &'static GiProfile,
    pub start: u32,
    pub cis: CiSplit,
}

impl Placed {
    /// A GPU instance with one compute instance spanning it.
    pub fn new(profile: &'static GiProfile, start: u32) -> Self {
        Self { profile, start, cis: CiSplit::FULL }
    }
}

/// Reads a mig-devices key: "3g.40gb" (a GPU instance with one full compute instance) or
/// mig-parted's "1c.3g.40gb" (a 1-slice compute instance inside a 3g.40gb GPU instance).
pub fn parse_device_key(key: &str) -> (Option<u32>, &str) {
    if let Some((c, rest)) = key.split_once("c.")
        && let Ok(n) = c.parse::<u32>()
    {
        return (Some(n), rest);
    }
    (None, key)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{profile} cannot start at placement unit {start}; allowed starts: {allowed:?}")]
    BadStart { profile: &'static str, start: u32, allowed: &'static [u32] },
    #[error("{profile} at {start} overlaps {other} at {other_start} (units {overlap:?})")]
    Overlap { profile: &'static str, start: u32, other: &'static str, other_start: u32, overlap: std::ops::Range<u32> },
    #[error("{count} x {profile} requested; the GPU fits at most {max}")]
    TooMany { profile: &'static str, count: u32, max: u32 },
    #[error("{compute} compute slices requested; the GPU has 7")]
    ComputeSlices { compute: u32 },
    #[error("{requested} do not fit one GPU: no allowed placements put them side by side")]
    NoFit { requested: String },
    #[error(
        "{profile} cannot be split into compute instances {split}: sizes must be among {allowed:?} compute slices and add up to at most the instance's"
    )]
    ComputeSplit { profile: &'static str, split: String, allowed: &'static [u32] },
}

/// Checks that explicit placements fit one GPU: allowed starts, no overlap, per-profile
/// maximums, at most 7 compute slices.
pub fn check_placements(placed: &[Placed]) -> Result<(), LayoutError> {
    for (i, p) in placed.iter().enumerate() {
        if !p.profile.starts.contains(&p.start) {
            return Err(LayoutError::BadStart { profile: p.profile.name, start: p.start, allowed: p.profile.starts });
        }
        for q in &placed[..i] {
            let (a, b) = (p.start..p.start + p.profile.size, q.start..q.start + q.profile.size);
            let overlap = a.start.max(b.start)..a.end.min(b.end);
            if !overlap.is_empty() {
                return Err(LayoutError::Overlap {
                    profile: p.profile.name,
                    start: p.start,
                    other: q.profile.name,
                    other_start: q.start,
                    overlap,
                });
            }
        }
    }
    check_counts(&placed.iter().map(|p| p.profile).collect::<Vec<_>>())
}

/// The rules a set of profiles breaks wherever it is placed: per-profile maximums and the
/// GPU's 7 compute slices.
pub fn check_counts(profiles: &[&'static GiProfile]) -> Result<(), LayoutError> {
    let mut counts: Vec<(&'static GiProfile, u32)> = Vec::new();
    for p in profiles {
        match counts.iter_mut().find(|(q, _)| q.id == p.id) {
            Some((_, n)) => *n += 1,
            None => counts.push((p, 1)),
        }
    }
    for (prof, n) in counts {
        if n > prof.max_count {
            return Err(LayoutError::TooMany { profile: prof.name, count: n, max: prof.max_count });
        }
    }
    let compute: u32 = profiles.iter().map(|p| p.compute_slices).sum();
    if compute > 7 {
        return Err(LayoutError::ComputeSlices { compute });
    }
    Ok(())
}

/// Finds placements for a multiset of profiles on an empty GPU, largest first, each at the
/// lowest free allowed start (best fit keeps the high units free for small profiles), with
/// backtracking so any layout that fits is found. Deterministic.
pub fn place(wanted: &[&'static GiProfile]) -> Result<Vec<Placed>, LayoutError> {
    let mut order: Vec<&'static GiProfile> = wanted.to_vec();
    order.sort_by(|a, b| b.size.cmp(&a.size).then(b.compute_slices.cmp(&a.compute_slices)).then(a.id.cmp(&b.id)));
    let mut placed = Vec::with_capacity(order.len());
    if search(&order, &mut placed) {
        return Ok(placed);
    }
    // Explain with the rule the request breaks wherever it is placed, else: no arrangement.
    check_counts(&order)?;
    Err(LayoutError::NoFit { requested: order.iter().map(|p| p.name).collect::<Vec<_>>().join(" + ") })
}

fn search(rest: &[&'static GiProfile], placed: &mut Vec<Placed>) -> bool {
    let Some((p, tail)) = rest.split_first() else {
        return true;
    };
    for &start in p.starts {
        placed.push(Placed::new(p, start));
        if check_placements(placed).is_ok() && search(tail, placed) {
            return true;
        }
        placed.pop();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str) -> &'static GiProfile {
        by_name(H100_80GB, name).unwrap()
    }

    #[test]
    fn tables_are_consistent() {
        for table in [H100_80GB, A100_80GB, A100_40GB, H200_141GB] {
            for p in table {
                for s in p.starts {
                    assert!(s + p.size <= PLACEMENT_UNITS, "{} at {s}", p.name);
                }
                // max_count instances fit side by side at their allowed starts.
                let many: Vec<_> = (0..p.max_count).map(|_| p).collect();
                assert!(place(&many).is_ok(), "{} x {}", p.max_count, p.name);
                let too_many: Vec<_> = (0..=p.max_count).map(|_| p).collect();
                assert!(place(&too_many).is_err(), "{} x {}", p.max_count + 1, p.name);
            }
            let ids: Vec<u32> = table.iter().map(|p| p.id).collect();
            assert_eq!(ids, vec![19, 20, 15, 14, 9, 5, 0]);
        }
        assert_eq!(profiles_for(0x2330_10DE).map(|t| t[0].memory_mib), Some(9984));
    }

    /// The tables match what NVML reported on a real H100 80GB and H200 (ids, slices, counts,
    /// memory, every possible placement).
    #[test]
    fn tables_match_the_recorded_hardware_readings() {
        for (table, json) in [
            (H100_80GB, include_str!("../../docs/hardware/h100-80gb-mig-profiles.json")),
            (H200_141GB, include_str!("../../docs/hardware/h200-141gb-mig-profiles.json")),
        ] {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let gpu = &v["gpus"][0];
            assert_eq!(
                profiles_for(u32::from_str_radix(gpu["pci_device_id"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap()),
                Some(table)
            );
            let read: Vec<&serde_json::Value> = gpu["profiles"].as_array().unwrap().iter().filter(|p| p.get("id").is_some()).collect();
            assert_eq!(read.len(), table.len());
            for r in read {
                let id = r["id"].as_u64().unwrap() as u32;
                let p = table.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("profile id {id} missing"));
                assert_eq!(u64::from(p.compute_slices), r["slices"].as_u64().unwrap(), "{}", p.name);
                assert_eq!(u64::from(p.max_count), r["instances"].as_u64().unwrap(), "{}", p.name);
                assert_eq!(p.memory_mib, r["memory_mib"].as_u64().unwrap(), "{}", p.name);
                let placements: Vec<(u32, u32)> = r["placements"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| (x[0].as_u64().unwrap() as u32, x[1].as_u64().unwrap() as u32))
                    .collect();
                assert_eq!(placements, p.starts.iter().map(|&s| (s, p.size)).collect::<Vec<_>>(), "{}", p.name);
            }
        }
    }

    #[test]
    fn known_layouts() {
        // 4g + 3g: the 4g must take units 0-3 and the 3g 4-7, whatever order they are asked in.
        let p = place(&[h("3g.40gb"), h("4g.40gb")]).unwrap();
        assert_eq!(p.iter().map(|x| (x.profile.name, x.start)).collect::<Vec<_>>(), vec![("4g.40gb", 0), ("3g.40gb", 4)]);
        assert!(place(&[h("3g.40gb"), h("2g.20gb"), h("1g.10gb"), h("1g.10gb")]).is_ok());
        assert!(place(&[h("1g.10gb"); 7]).is_ok());
        assert_eq!(place(&[h("7g.80gb"), h("1g.10gb")]).unwrap_err().to_string(), "8 compute slices requested; the GPU has 7");
        // 5 compute slices, but 1g.20gb x 4 takes all 8 units, leaving none for a 1g.10gb.
        assert_eq!(
            place(&[h("1g.20gb"), h("1g.20gb"), h("1g.20gb"), h("1g.20gb"), h("1g.10gb")]).unwrap_err().to_string(),
            "1g.20gb + 1g.20gb + 1g.20gb + 1g.20gb + 1g.10gb do not fit one GPU: no allowed placements put them side by side"
        );
        assert!(place(&[h("1g.20gb"), h("1g.20gb"), h("1g.20gb"), h("1g.10gb")]).is_ok());
        // Two 4g would need 8 compute slices and the same start.
        assert!(place(&[h("4g.40gb"), h("3g.40gb"), h("1g.10gb")]).is_err());
    }

    fn brute_force_fits(ps: &[&'static GiProfile], placed: &mut Vec<Placed>) -> bool {
        let Some((p, rest)) = ps.split_first() else {
            return check_placements(placed).is_ok();
        };
        p.starts.iter().any(|&start| {
            placed.push(Placed::new(p, start));
            let ok = brute_force_fits(rest, placed);
            placed.pop();
            ok
        })
    }

    fn multisets(table: &'static [GiProfile], max_len: usize) -> Vec<Vec<&'static GiProfile>> {
        let mut out = vec![vec![]];
        let mut frontier: Vec<(usize, Vec<&'static GiProfile>)> = vec![(0, vec![])];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for (from, set) in &frontier {
                for (i, p) in table.iter().enumerate().skip(*from) {
                    let mut s = set.clone();
                    s.push(p);
                    out.push(s.clone());
                    next.push((i, s));
                }
            }
            frontier = next;
        }
        out
    }

    #[test]
    fn placement_is_sound_and_complete_for_every_small_request() {
        for table in [H100_80GB, A100_40GB] {
            for set in multisets(table, 5) {
                let found = place(&set);
                if let Ok(p) = &found {
                    assert_eq!(check_placements(p), Ok(()), "{set:?}");
                    assert_eq!(p.len(), set.len());
                }
                let exists = brute_force_fits(&set, &mut Vec::new());
                assert_eq!(found.is_ok(), exists, "{:?}", set.iter().map(|p| p.name).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn explicit_placements_are_checked_with_reasons() {
        let e = check_placements(&[Placed::new(h("3g.40gb"), 2)]).unwrap_err();
        assert_eq!(e.to_string(), "3g.40gb cannot start at placement unit 2; allowed starts: [0, 4]");
        let e = check_placements(&[Placed::new(h("4g.40gb"), 0), Placed::new(h("2g.20gb"), 2)]).unwrap_err();
        assert!(e.to_string().contains("overlaps 4g.40gb at 0 (units 2..4)"), "{e}");
    }
}
