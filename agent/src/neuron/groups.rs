//! The node's Neuron core groups: the layout in force, its durable record
//! (`state_dir/neuron-groups.json`, replaced atomically), and changing it, at start from the
//! agent config's `partition:` and at run time through the controller's ApplyPartition.
//!
//! A layout changes no hardware: it is Hearth's allocation of core ranges, which runtimes get
//! as `NEURON_RT_VISIBLE_CORES` and placement reads from the report. So the one thing that
//! can go wrong when it changes is a core being handed out twice: a change is refused (the
//! apply fails, the layout stays) while anything holds a core whose group would change. As
//! for MIG instances in use, nothing is forced; unlike MIG, Hearth's own runtimes are not
//! drained and restarted, because a runtime bound to a range that stops being a group has no
//! group to restart on: the controller stops it first. Holders are what neuron-monitor's
//! latest report, the kubelet's PodResources and the runtimes in the node report show.
//!
//! Owns the record file and the layout; does not read sysfs or publish the report (the
//! neuron subsystem does both, following [`CoreGroups::subscribe`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hearth_proto::neuron::{Group, Topology};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::partition::reconcile::{Kind, PartitionStatus, Phase};

/// The durable record of the applied core groups: what the partition config made on this
/// instance type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupRecord {
    pub config: String,
    pub instance_type: String,
    pub lnc: u32,
    /// (start, cores) node-wide.
    pub groups: Vec<(u32, u32)>,
    /// The agent config's `partition:` (its fingerprint) last applied at start. Kept across
    /// ApplyPartition, so a restart with the same agent config keeps what the controller
    /// asked for since, and a changed agent config is applied.
    #[serde(default)]
    pub agent_config: Option<String>,
}

/// The layout in force: the topology under its LNC and the groups on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub topology: Topology,
    pub groups: Vec<Group>,
}

/// Who holds which cores now, given the cores per device in force: `(who, cores)`, cores
/// None when the holder is known but its cores are not.
pub type Holders = Arc<dyn Fn(u32) -> Vec<(String, Option<BTreeSet<u32>>)> + Send + Sync>;

pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("neuron-groups.json")
}

fn load_record(state_dir: &Path) -> Option<GroupRecord> {
    let path = record_path(state_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "not a core-group record; starting without core groups");
            None
        }
    }
}

fn fingerprint(spec_yaml: &str, config: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(config.as_bytes());
    h.update([0]);
    h.update(spec_yaml.as_bytes());
    format!("{config}@{}", &hex::encode(h.finalize())[..16])
}

/// "0-1, 4, 6-7".
pub fn ranges(cores: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = cores.iter().copied().peekable();
    while let Some(first) = it.next() {
        let mut last = first;
        while it.peek() == Some(&(last + 1)) {
            last += 1;
            it.next();
        }
        out.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
    }
    out.join(", ")
}

/// The cores whose group differs between two layouts (a core in no group on either side has
/// not moved). A new LNC renumbers every core, so then every core moves.
pub fn moved_cores(old: &Layout, new: &Layout) -> BTreeSet<u32> {
    let total = old.topology.total_cores().max(new.topology.total_cores());
    if old.topology.lnc != new.topology.lnc {
        return (0..total).collect();
    }
    let owner = |l: &Layout, c: u32| l.groups.iter().find(|g| (g.start..g.start + g.cores).contains(&c)).copied();
    (0..total).filter(|&c| owner(old, c) != owner(new, c)).collect()
}

/// Why `moved` cannot move now, if anything holds one of them (or holds cores nobody can name).
pub fn busy(moved: &BTreeSet<u32>, holders: &[(String, Option<BTreeSet<u32>>)]) -> Option<String> {
    if moved.is_empty() {
        return None;
    }
    let mut why = Vec::new();
    for (who, cores) in holders {
        match cores {
            None => why.push(format!("{who} holds cores neuron-monitor could not read")),
            Some(c) => {
                let hit: BTreeSet<u32> = c.intersection(moved).copied().collect();
                if !hit.is_empty() {
                    why.push(format!("{who} holds cores {}", ranges(&hit)));
                }
            }
        }
    }
    (!why.is_empty()).then(|| {
        format!(
            "cores {} would change group but are in use: {}; stop what holds them first, or pick a config that keeps their groups",
            ranges(moved),
            why.join("; ")
        )
    })
}

struct Current {
    record: Option<GroupRecord>,
    status: Option<PartitionStatus>,
}

/// The core-group allocator of one node.
pub struct CoreGroups {
    state_dir: PathBuf,
    /// The node's instance type under its default LNC.
    node: Topology,
    /// One change at a time; the record and the latest status.
    current: Mutex<Current>,
    layout: watch::Sender<Layout>,
    holders: Holders,
}

impl std::fmt::Debug for CoreGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreGroups").field("instance_type", &self.node.instance_type).field("layout", &*self.layout.borrow()).finish()
    }
}

impl CoreGroups {
    /// The recorded layout for this instance type (none: no groups), with `holders` to ask
    /// before a change. Blocking (reads the record).
    pub fn open(state_dir: &Path, node: Topology, holders: Holders) -> Self {
        let record = load_record(state_dir).filter(|r| r.instance_type == node.instance_type);
        let layout = layout_of(node, record.as_ref());
        let status = record.as_ref().map(|r| success(&r.config, BTreeMap::new()));
        Self {
            state_dir: state_dir.to_owned(),
            node,
            current: Mutex::new(Current { record, status }),
            layout: watch::channel(layout).0,
            holders,
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layout in force.
    pub fn layout(&self) -> Layout {
        self.layout.borrow().clone()
    }

    /// Changes whenever the layout does.
    pub fn subscribe(&self) -> watch::Receiver<Layout> {
        self.layout.subscribe()
    }

    /// The config name of the layout in force, if any.
    pub fn config(&self) -> Option<String> {
        self.current().record.as_ref().map(|r| r.config.clone())
    }

    /// The groups `config` of `spec_yaml` makes on this node, or why it cannot.
    pub fn plan(&self, spec_yaml: &str, config: &str) -> Result<Layout, String> {
        let spec = crate::partition::spec::Spec::parse(spec_yaml).map_err(|e| e.to_string())?;
        let entries = spec.neuron_config(config).map_err(|e| e.to_string())?;
        if entries.is_empty() {
            return Err(format!(
                "config {config:?} has no neuron-configs entries, and this node has Neuron devices ({}), no GPUs",
                self.node.instance_type
            ));
        }
        let (topology, groups) = crate::partition::neuron::plan_config(self.node.instance_type, entries)
            .map_err(|e| format!("config {config:?} on {}: {e}", self.node.instance_type))?;
        Ok(Layout { topology, groups })
    }

    fn save(&self, rec: &GroupRecord) -> Result<(), String> {
        let path = record_path(&self.state_dir);
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| e.to_string())?;
        hearth_service::fsutil::write_atomic(&path, &bytes, false).map_err(|e| format!("recording core groups in {}: {e}", path.display()))
    }

    fn record(&self, config: &str, l: &Layout, agent_config: Option<String>) -> GroupRecord {
        GroupRecord {
            config: config.to_owned(),
            instance_type: l.topology.instance_type.to_owned(),
            lnc: l.topology.lnc,
            groups: l.groups.iter().map(|g| (g.start, g.cores)).collect(),
            agent_config,
        }
    }

    /// At start: the agent config's partition, unless it is the one already applied at an
    /// earlier start (then the recorded layout, perhaps a later ApplyPartition's, stands). A
    /// config without Neuron entries leaves the record as it is. Ok(true): applied now.
    pub fn apply_at_start(&self, spec_yaml: &str, config: &str) -> Result<bool, String> {
        let fp = fingerprint(spec_yaml, config);
        let mut cur = self.current();
        if cur.record.as_ref().is_some_and(|r| r.agent_config.as_deref() == Some(fp.as_str())) {
            return Ok(false);
        }
        let spec = crate::partition::spec::Spec::parse(spec_yaml).map_err(|e| e.to_string())?;
        if spec.neuron_config(config).map_err(|e| e.to_string())?.is_empty() {
            return Ok(false);
        }
        let layout = self.plan(spec_yaml, config)?;
        let rec = self.record(config, &layout, Some(fp));
        self.save(&rec)?;
        cur.record = Some(rec);
        cur.status = Some(success(config, BTreeMap::new()));
        self.layout.send_replace(layout);
        Ok(true)
    }
}

fn layout_of(node: Topology, record: Option<&GroupRecord>) -> Layout {
    match record {
        Some(r) => Layout {
            topology: Topology::of(&r.instance_type, Some(r.lnc)).unwrap_or(node),
            groups: r.groups.iter().map(|&(start, cores)| Group { start, cores }).collect(),
        },
        None => Layout { topology: node, groups: Vec::new() },
    }
}

fn success(config: &str, devices: BTreeMap<u32, String>) -> PartitionStatus {
    PartitionStatus { kind: Kind::Neuron, config: config.to_owned(), phase: Phase::Success, reason: String::new(), gpus: devices }
}

impl crate::partition::Applier for CoreGroups {
    fn kind(&self) -> Kind {
        Kind::Neuron
    }

    fn check(&self, spec_yaml: &str, config: &str) -> Result<(), String> {
        self.plan(spec_yaml, config).map(|_| ())
    }

    /// Refused (a failed status, nothing changed) while a moving core is held; otherwise
    /// recorded durably, then put in force.
    fn apply(&self, spec_yaml: &str, config: &str) -> Result<PartitionStatus, String> {
        let new = self.plan(spec_yaml, config)?;
        let mut cur = self.current();
        let old = self.layout();
        let moved = moved_cores(&old, &new);
        let cpd = old.topology.cores_per_device;
        let devices: BTreeSet<u32> = moved.iter().map(|c| c / cpd).filter(|d| *d < old.topology.devices).collect();
        let status = match busy(&moved, &(self.holders)(cpd)) {
            Some(reason) => {
                warn!(config, reason = %reason, "Neuron core groups not changed");
                PartitionStatus {
                    kind: Kind::Neuron,
                    config: config.to_owned(),
                    phase: Phase::Failed,
                    reason,
                    gpus: devices.iter().map(|d| (*d, "failed: cores in use".to_owned())).collect(),
                }
            }
            None => {
                let agent_config = cur.record.as_ref().and_then(|r| r.agent_config.clone());
                let rec = self.record(config, &new, agent_config);
                self.save(&rec)?;
                info!(config, groups = new.groups.len(), moved = %ranges(&moved), "Neuron core groups applied");
                cur.record = Some(rec);
                self.layout.send_replace(new);
                success(config, devices.iter().map(|d| (*d, "success".to_owned())).collect())
            }
        };
        cur.status = Some(status.clone());
        Ok(status)
    }

    fn status(&self) -> Option<PartitionStatus> {
        self.current().status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::Applier;

    const SPEC: &str = include_str!("../../../manifests/examples/mig-spec.yaml");
    const MORE: &str = r#"
version: v1
neuron-configs:
  # Keeps inf2-mixed's 8-core group on devices 0-3; pairs become single cores on devices 4-7.
  keep-first-eight:
    - devices: all
      core-groups: [{cores: 8, count: 1}, {cores: 1, count: 8}]
  all-pairs:
    - devices: all
      core-groups: [{cores: 2, count: 12}]
  too-many:
    - devices: all
      core-groups: [{cores: 2, count: 13}]
  trn2-lnc1:
    - devices: all
      lnc: 1
      core-groups: [{cores: 8, count: 2}]
mig-configs:
  gpus-only:
    - devices: all
      mig-enabled: false
"#;

    type Held = Arc<Mutex<Vec<(String, Option<BTreeSet<u32>>)>>>;

    fn groups(dir: &Path, instance: &str) -> (CoreGroups, Held) {
        let held: Held = Arc::default();
        let h = held.clone();
        let g = CoreGroups::open(dir, Topology::of(instance, None).unwrap(), Arc::new(move |_| h.lock().unwrap().clone()));
        (g, held)
    }

    fn names(l: &Layout) -> Vec<String> {
        l.groups.iter().map(Group::partition_name).collect()
    }

    #[test]
    fn moved_cores_are_those_whose_group_changes() {
        let t = Topology::of("inf2.48xlarge", None).unwrap();
        let l = |g: &[(u32, u32)]| Layout { topology: t, groups: g.iter().map(|&(start, cores)| Group { start, cores }).collect() };
        let old = l(&[(0, 8), (8, 2), (10, 2)]);
        assert!(moved_cores(&old, &old).is_empty());
        let new = l(&[(0, 8), (8, 1), (9, 1), (12, 2)]);
        assert_eq!(ranges(&moved_cores(&old, &new)), "8-13", "8-9 split, 10-11 ungrouped, 12-13 newly grouped");
        let t1 = Topology::of("trn2.48xlarge", Some(1)).unwrap();
        let t2 = Topology::of("trn2.48xlarge", None).unwrap();
        let a = Layout { topology: t2, groups: vec![] };
        let b = Layout { topology: t1, groups: vec![] };
        assert_eq!(moved_cores(&a, &b).len(), 128, "a new LNC renumbers every core");
    }

    #[test]
    fn busy_names_who_holds_which_moving_cores() {
        let moved: BTreeSet<u32> = [0, 1, 4].into();
        let holders = vec![
            ("Neuron runtime \"a\" (pid 7)".to_owned(), Some(BTreeSet::from([1, 2]))),
            ("pod ml/x (container c)".to_owned(), Some(BTreeSet::from([5]))),
        ];
        assert_eq!(
            busy(&moved, &holders).unwrap(),
            "cores 0-1, 4 would change group but are in use: Neuron runtime \"a\" (pid 7) holds cores 1; \
             stop what holds them first, or pick a config that keeps their groups"
        );
        assert_eq!(busy(&BTreeSet::from([3]), &holders), None, "nobody holds core 3");
        assert_eq!(busy(&BTreeSet::new(), &[("x".into(), None)]), None, "nothing moves");
        assert!(busy(&moved, &[("Neuron runtime \"9\"".into(), None)]).unwrap().contains("could not read"));
    }

    #[test]
    fn apply_checks_the_topology_refuses_held_cores_and_records_durably() {
        let dir = tempfile::tempdir().unwrap();
        let (g, held) = groups(dir.path(), "inf2.48xlarge");
        assert!(g.layout().groups.is_empty());
        let e = g.check(SPEC, "balanced").unwrap_err();
        assert!(e.contains("no neuron-configs entries") && e.contains("inf2.48xlarge"), "{e}");
        let e = g.check(MORE, "too-many").unwrap_err();
        assert!(e.starts_with("config \"too-many\" on inf2.48xlarge: ") && e.contains("do not fit"), "{e}");
        let e = g.check(SPEC, "nope").unwrap_err();
        assert!(e.contains("no config named \"nope\""), "{e}");
        let e = g.check(SPEC, "trn2-quarters").unwrap_err();
        assert!(e.contains("lnc 2 is not available"), "{e}");

        let mut changes = g.subscribe();
        let s = g.apply(SPEC, "inf2-mixed").unwrap();
        assert_eq!((s.kind, s.phase), (Kind::Neuron, Phase::Success), "{s:?}");
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(names(&g.layout())[0], "neuroncores:0-7");

        // A runtime on cores 0-1 (inside the 8-core group): a config keeping that group applies...
        *held.lock().unwrap() = vec![("Neuron runtime \"sim-0\" (pid 42)".into(), Some(BTreeSet::from([0, 1])))];
        let s = g.apply(MORE, "keep-first-eight").unwrap();
        assert_eq!(s.phase, Phase::Success, "{s:?}");
        assert_eq!(s.gpus.keys().copied().collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9], "the devices whose groups changed");
        assert_eq!(names(&g.layout()).len(), 9);
        changes.mark_unchanged();
        // ...one breaking it up is refused, naming who holds what, and changes nothing.
        let s = g.apply(MORE, "all-pairs").unwrap();
        assert_eq!(s.phase, Phase::Failed);
        assert!(s.reason.contains("Neuron runtime \"sim-0\" (pid 42) holds cores 0-1"), "{}", s.reason);
        assert_eq!(g.status(), Some(s));
        assert!(!changes.has_changed().unwrap(), "a refused change puts no layout in force");
        assert_eq!(names(&g.layout()).len(), 9);
        let rec: GroupRecord = serde_json::from_slice(&std::fs::read(record_path(dir.path())).unwrap()).unwrap();
        assert_eq!((rec.config.as_str(), rec.groups.len()), ("keep-first-eight", 9), "the record is the layout in force");
        // Once the runtime is gone it applies.
        held.lock().unwrap().clear();
        assert_eq!(g.apply(MORE, "all-pairs").unwrap().phase, Phase::Success);

        // A new agent process reads the layout back, and reports it as applied.
        let (again, _) = groups(dir.path(), "inf2.48xlarge");
        assert_eq!(names(&again.layout()).len(), 12);
        assert_eq!(again.status().map(|s| (s.config, s.phase)), Some(("all-pairs".to_owned(), Phase::Success)));
        // Another instance type ignores it.
        let (other, _) = groups(dir.path(), "inf2.24xlarge");
        assert!(other.layout().groups.is_empty() && other.status().is_none());
    }

    #[test]
    fn the_agent_configs_partition_applies_once_and_a_later_command_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = groups(dir.path(), "inf2.48xlarge");
        assert_eq!(g.apply_at_start(SPEC, "inf2-mixed"), Ok(true));
        assert_eq!(names(&g.layout()).len(), 7);
        assert_eq!(g.apply(MORE, "all-pairs").unwrap().phase, Phase::Success);
        // Restart with the same agent config: the controller's later layout stands.
        let (g, _) = groups(dir.path(), "inf2.48xlarge");
        assert_eq!(g.apply_at_start(SPEC, "inf2-mixed"), Ok(false));
        assert_eq!((g.config().as_deref(), g.layout().groups.len()), (Some("all-pairs"), 12));
        // A changed agent config is a new wish: applied.
        let (g, _) = groups(dir.path(), "inf2.48xlarge");
        assert_eq!(g.apply_at_start(MORE, "keep-first-eight"), Ok(true));
        assert_eq!(g.config().as_deref(), Some("keep-first-eight"));
        // A config with MIG entries only leaves the groups alone; a bad one says why.
        assert_eq!(g.apply_at_start(MORE, "gpus-only"), Ok(false));
        assert_eq!(g.config().as_deref(), Some("keep-first-eight"));
        assert!(g.apply_at_start(MORE, "too-many").unwrap_err().contains("do not fit"));
    }

    #[test]
    fn trn2_changes_lnc_only_when_nothing_holds_a_core() {
        let dir = tempfile::tempdir().unwrap();
        let (g, held) = groups(dir.path(), "trn2.48xlarge");
        assert_eq!(g.apply(SPEC, "trn2-quarters").unwrap().phase, Phase::Success);
        assert_eq!(names(&g.layout()), ["neuroncores:0-15", "neuroncores:16-31", "neuroncores:32-47", "neuroncores:48-63"]);
        *held.lock().unwrap() = vec![("pod ml/x (container c)".into(), Some(BTreeSet::from([60])))];
        let s = g.apply(MORE, "trn2-lnc1").unwrap();
        assert_eq!(s.phase, Phase::Failed, "LNC 1 renumbers core 60, in no group, too");
        held.lock().unwrap().clear();
        assert_eq!(g.apply(MORE, "trn2-lnc1").unwrap().phase, Phase::Success);
        let l = g.layout();
        assert_eq!((l.topology.lnc, l.topology.cores_per_device), (1, 8));
        let (again, _) = groups(dir.path(), "trn2.48xlarge");
        assert_eq!(again.layout(), l, "LNC and groups read back");
    }
}
