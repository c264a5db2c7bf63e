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

/// A directory filled by someone else (the Kubernetes poller, `hearth local`, tests).
#[derive(Debug, Default, Clone)]
pub struct PodTable(Arc<RwLock<HashMap<String, PodRef>>>);

impl PodTable {
    pub fn replace(&self, pods: HashMap<String, PodRef>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = pods;
    }
    pub fn extend(&self, pods: HashMap<String, PodRef>) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(pods);
    }
    pub fn insert(&self, uid: &str, pod: PodRef) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid.to_owned(), pod);
    }
}

impl PodDirectory for PodTable {
    fn lookup(&self, uid: &str) -> Option<PodRef> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(uid).cloned()
    }
}

/// Parses a `PodList` from the Kubernetes API into UID -> pod.
pub fn parse_pod_list(body: &[u8]) -> Result<HashMap<String, PodRef>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct List {
        #[serde(default)]
        items: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        metadata: Meta,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        uid: String,
        name: String,
        #[serde(default)]
        namespace: String,
    }
    let list: List = serde_json::from_slice(body)?;
    Ok(list.items.into_iter().map(|i| (i.metadata.uid, PodRef { namespace: i.metadata.namespace, name: i.metadata.name })).collect())
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
    fn pod_lists_from_the_api_parse_to_uids() {
        let body = br#"{"kind":"PodList","items":[{"metadata":{"name":"vllm-0","namespace":"serving","uid":"u1"}},{"metadata":{"name":"x","uid":"u2"}}]}"#;
        let m = parse_pod_list(body).unwrap();
        assert_eq!(m["u1"], PodRef { namespace: "serving".into(), name: "vllm-0".into() });
        assert_eq!(m["u2"].namespace, "");
        assert!(parse_pod_list(b"{\"items\": 3}").is_err());
    }
}
