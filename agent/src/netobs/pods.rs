//! Which pod a cgroup belongs to. The kernel keys everything by cgroup id, the inode of the
//! cgroup v2 directory; the directory's path names the pod's UID (both kubelet cgroup
//! drivers put `pod<uid>` in it); the UID names the pod through the Kubernetes API.
//!
//! The cgroup tree under the attach root is walked on every collection (a few hundred
//! directories on a busy node: cheaper than keeping a watch consistent). Names come from a
//! [`PodDirectory`], refreshed on its own timer and cached, so a slow API server delays
//! names, never counters.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

pub use crate::kube::PodRef;

/// One walk of the cgroup tree: cgroup id -> pod UID (None for cgroups outside any pod:
/// system services, the runtime itself).
#[derive(Debug, Default, Clone)]
pub struct CgroupScan {
    pub pods: HashMap<u64, Option<String>>,
}

/// Deeper than any kubelet layout (kubepods/burstable/pod<uid>/<container>: depth 4 under
/// the cgroup root; systemd's slices nest the same way).
const MAX_DEPTH: usize = 8;

impl CgroupScan {
    /// Walks `root` and every cgroup below it. Directories that vanish mid-walk are skipped.
    pub fn walk(root: &Path) -> std::io::Result<Self> {
        let mut pods = HashMap::new();
        let meta = std::fs::metadata(root)?;
        pods.insert(meta.ino(), None);
        let mut stack = vec![(root.to_path_buf(), None::<String>, 0usize)];
        while let Some((dir, uid, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let Ok(m) = e.metadata() else { continue };
                let name = e.file_name();
                let uid = uid.clone().or_else(|| name.to_str().and_then(pod_uid_of));
                pods.insert(m.ino(), uid.clone());
                if depth + 1 < MAX_DEPTH {
                    stack.push((e.path(), uid, depth + 1));
                }
            }
        }
        Ok(Self { pods })
    }
}

/// The pod UID a cgroup directory name carries, for both kubelet cgroup drivers:
/// cgroupfs `pod1b4e...-...` and systemd `kubepods-burstable-pod1b4e..._....slice` (the
/// systemd driver writes the UID's dashes as underscores).
pub fn pod_uid_of(dir_name: &str) -> Option<String> {
    let rest = if let Some(slice) = dir_name.strip_suffix(".slice") {
        let i = slice.rfind("-pod")?;
        &slice[i + 4..]
    } else {
        dir_name.strip_prefix("pod")?
    };
    let uid = rest.replace('_', "-");
    // API-server UIDs are RFC 4122 UUIDs; static pods' are 32 hex digits.
    let ok = match uid.len() {
        36 => uid.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() }),
        32 => uid.chars().all(|c| c.is_ascii_hexdigit()),
        _ => false,
    };
    ok.then(|| uid.to_ascii_lowercase())
}

/// Where pod names come from: UID -> (namespace, name).
pub trait PodDirectory: Send + Sync {
    fn lookup(&self, uid: &str) -> Option<PodRef>;
}

/// A directory filled by someone else (the pod watcher, `hearth local`, tests). A pod that
/// goes away keeps its name for `retain`: its last series are still exported (until
/// `network.forget_after`), and must keep their pod and namespace labels until then.
#[derive(Debug, Clone)]
pub struct PodTable(Arc<RwLock<Pods>>);

#[derive(Debug)]
struct Pods {
    live: HashMap<String, PodRef>,
    gone: HashMap<String, (PodRef, std::time::Instant)>,
    retain: std::time::Duration,
}

impl Default for PodTable {
    fn default() -> Self {
        Self::with_retention(std::time::Duration::from_secs(600))
    }
}

impl PodTable {
    pub fn with_retention(retain: std::time::Duration) -> Self {
        Self(Arc::new(RwLock::new(Pods { live: HashMap::new(), gone: HashMap::new(), retain })))
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Pods> {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    /// Makes `pods` the live set; the ones no longer in it are kept as gone.
    pub fn replace(&self, pods: HashMap<String, PodRef>) {
        let mut t = self.write();
        let now = std::time::Instant::now();
        let old = std::mem::replace(&mut t.live, pods);
        for (uid, pod) in old {
            if !t.live.contains_key(&uid) {
                t.gone.insert(uid, (pod, now));
            }
        }
        let live = std::mem::take(&mut t.live);
        t.gone.retain(|uid, _| !live.contains_key(uid));
        t.live = live;
        t.expire(now);
    }
    pub fn extend(&self, pods: HashMap<String, PodRef>) {
        let mut t = self.write();
        for (uid, pod) in pods {
            t.gone.remove(&uid);
            t.live.insert(uid, pod);
        }
    }
    pub fn insert(&self, uid: &str, pod: PodRef) {
        self.extend(HashMap::from([(uid.to_owned(), pod)]));
    }
    /// The pod was deleted: keep its name for the retention time.
    pub fn remove(&self, uid: &str) {
        let mut t = self.write();
        let now = std::time::Instant::now();
        if let Some(pod) = t.live.remove(uid) {
            t.gone.insert(uid.to_owned(), (pod, now));
        }
        t.expire(now);
    }
    /// Pods on the node now (not the ones kept after deletion).
    pub fn live(&self) -> usize {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).live.len()
    }
}

impl Pods {
    fn expire(&mut self, now: std::time::Instant) {
        let retain = self.retain;
        self.gone.retain(|_, (_, at)| now.duration_since(*at) < retain);
    }
}

impl PodDirectory for PodTable {
    fn lookup(&self, uid: &str) -> Option<PodRef> {
        let t = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        t.live.get(uid).or_else(|| t.gone.get(uid).map(|(p, _)| p)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_come_out_of_both_cgroup_driver_layouts() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert_eq!(pod_uid_of(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(pod_uid_of("kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice").as_deref(), Some(uid));
        assert_eq!(pod_uid_of("kubepods-pod1B4E28BA_2FA1_11D2_883F_0016D3CCA427.slice").as_deref(), Some(uid));
        assert_eq!(pod_uid_of("pod0123456789abcdef0123456789abcdef").as_deref(), Some("0123456789abcdef0123456789abcdef"));
        for not in ["kubepods.slice", "kubepods-burstable.slice", "podman", "pod1234", "cri-containerd-abc.scope", "system.slice"] {
            assert_eq!(pod_uid_of(not), None, "{not}");
        }
    }

    #[test]
    fn the_walk_finds_pods_and_their_containers_and_leaves_the_rest_unowned() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let pod = dir.path().join("kubepods/burstable").join(format!("pod{uid}"));
        std::fs::create_dir_all(pod.join("ctr-a")).unwrap();
        std::fs::create_dir_all(dir.path().join("system.slice/containerd.service")).unwrap();
        let scan = CgroupScan::walk(dir.path()).unwrap();
        let id = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(scan.pods[&id(&pod)].as_deref(), Some(uid));
        assert_eq!(scan.pods[&id(&pod.join("ctr-a"))].as_deref(), Some(uid));
        assert_eq!(scan.pods[&id(&dir.path().join("system.slice/containerd.service"))], None);
        assert_eq!(scan.pods[&id(dir.path())], None);
        assert_eq!(scan.pods.len(), 7);
    }

    #[test]
    fn a_deleted_pod_keeps_its_name_until_retention_ends() {
        let t = PodTable::with_retention(std::time::Duration::from_millis(200));
        let pod = |n: &str| PodRef { namespace: "serving".into(), name: n.into() };
        t.replace(HashMap::from([("u1".into(), pod("a")), ("u2".into(), pod("b"))]));
        t.remove("u1");
        // A re-list without u2 keeps it too.
        t.replace(HashMap::new());
        assert_eq!((t.lookup("u1"), t.lookup("u2"), t.live()), (Some(pod("a")), Some(pod("b")), 0));
        // A pod that comes back (same UID) is live again.
        t.insert("u2", pod("b"));
        std::thread::sleep(std::time::Duration::from_millis(250));
        t.remove("nothing");
        assert_eq!((t.lookup("u1"), t.lookup("u2")), (None, Some(pod("b"))));
    }
}
