//! Network observability: the BPF programs of `ebpf/` (compiled by build.rs with clang,
//! embedded here), loaded with aya and attached once at the pod cgroup root as BPF links
//! (multi-attach), so they coexist with the CNI's and systemd's programs. The kernel
//! aggregates per (cgroup id, direction, peer class) in per-CPU maps; this module reads and
//! sums them. The peer-class trie comes from config.
//!
//! This first part carries the traffic counters (cgroup_skb). TCP health (sock_ops),
//! listener ports, pod attribution and the metrics come next.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{PerCpuArray, PerCpuHashMap};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netobs.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum NetObsError {
    #[error("loading the BPF programs: {0} (the agent needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with BPF)")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("BPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("BPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("BPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("opening cgroup {path}: {source} (expected a cgroup v2 directory)")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("peer class {name:?}: expected a CIDR like 10.0.0.0/8 or fd00::/8, got {got:?}")]
    Cidr { name: String, got: String },
}

/// `ebpf/netobs.bpf.c`'s `struct traffic_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    pub cgroup_id: u64,
    pub direction: u8,
    pub peer_class: u8,
    pub pad: [u8; 6],
}

/// `struct traffic_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficVal {
    pub bytes: u64,
    pub packets: u64,
    pub payload_bytes: u64,
}

#[allow(unsafe_code)]
// SAFETY: both are repr(C) structs of plain integers with explicit padding fields, valid
// for any bit pattern, matching the C layout byte for byte.
unsafe impl aya::Pod for TrafficKey {}
#[allow(unsafe_code)]
// SAFETY: as above.
unsafe impl aya::Pod for TrafficVal {}

pub const INGRESS: u8 = 0;
pub const EGRESS: u8 = 1;

/// A peer class: a name and the CIDRs that belong to it. Class 0 is "internet" (no match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerClass {
    pub name: String,
    pub cidrs: Vec<(IpAddr, u8)>,
}

impl PeerClass {
    pub fn parse(name: &str, cidrs: &[&str]) -> Result<Self, NetObsError> {
        let bad = |got: &str| NetObsError::Cidr { name: name.to_owned(), got: got.to_owned() };
        let cidrs = cidrs
            .iter()
            .map(|c| {
                let (a, p) = c.split_once('/').unwrap_or((c, if c.contains(':') { "128" } else { "32" }));
                let addr: IpAddr = a.parse().map_err(|_| bad(c))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = p.parse().ok().filter(|p| *p <= max).ok_or_else(|| bad(c))?;
                Ok((addr, prefix))
            })
            .collect::<Result<_, NetObsError>>()?;
        Ok(Self { name: name.to_owned(), cidrs })
    }
}

/// The trie key for a CIDR: IPv4 as ::ffff:a.b.c.d/(96 + prefix).
fn trie_key(addr: IpAddr, prefix: u8) -> LpmKey<[u8; 16]> {
    match addr {
        IpAddr::V4(v4) => LpmKey::new(96 + u32::from(prefix), v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => LpmKey::new(u32::from(prefix), v6.octets()),
    }
}

/// Loaded and attached programs. Dropping it detaches them.
pub struct NetObs {
    bpf: aya::Ebpf,
    classes: Vec<String>,
}

impl std::fmt::Debug for NetObs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetObs").field("classes", &self.classes).finish_non_exhaustive()
    }
}

impl NetObs {
    /// Loads the programs, fills the peer trie (class ids 1.. in order; 0 is "internet"),
    /// and attaches ingress and egress to the cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: &Path, classes: &[PeerClass]) -> Result<Self, NetObsError> {
        let mut bpf = aya::Ebpf::load(OBJECT)?;
        {
            let map = bpf.map_mut("PEERS").ok_or(NetObsError::MissingMap("PEERS"))?;
            let mut peers: LpmTrie<_, [u8; 16], u8> =
                LpmTrie::try_from(map).map_err(|source| NetObsError::Map { name: "PEERS", source })?;
            for (i, c) in classes.iter().enumerate() {
                for (addr, prefix) in &c.cidrs {
                    peers
                        .insert(&trie_key(*addr, *prefix), (i + 1) as u8, 0)
                        .map_err(|source| NetObsError::Map { name: "PEERS", source })?;
                }
            }
        }
        let dir = std::fs::File::open(cgroup).map_err(|source| NetObsError::Cgroup { path: cgroup.into(), source })?;
        // aya attaches through a BPF link on kernels >= 5.7. Cgroup links always coexist with
        // other programs (the kernel attaches them multi) and refuse any attach flag, so the
        // link path takes `Single` (no flags); the legacy attach path needs `AllowMultiple`.
        let links = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 7, 0));
        let mode = if links { CgroupAttachMode::Single } else { CgroupAttachMode::AllowMultiple };
        for (name, kind) in [("netobs_ingress", CgroupSkbAttachType::Ingress), ("netobs_egress", CgroupSkbAttachType::Egress)] {
            let prog: &mut CgroupSkb = bpf
                .program_mut(name)
                .ok_or(NetObsError::MissingProgram(name))?
                .try_into()
                .map_err(|source| NetObsError::Program { name, source })?;
            prog.load().map_err(|source| NetObsError::Program { name, source })?;
            prog.attach(dir.as_fd(), kind, mode).map_err(|source| NetObsError::Program { name, source })?;
        }
        let mut names = vec!["internet".to_owned()];
        names.extend(classes.iter().map(|c| c.name.clone()));
        Ok(Self { bpf, classes: names })
    }

    /// Class name for a class id.
    pub fn class_name(&self, id: u8) -> &str {
        self.classes.get(usize::from(id)).map_or("unknown", String::as_str)
    }

    /// Every counter, summed over CPUs.
    pub fn traffic(&self) -> Result<Vec<(TrafficKey, TrafficVal)>, NetObsError> {
        let map = self.bpf.map("TRAFFIC").ok_or(NetObsError::MissingMap("TRAFFIC"))?;
        let m: PerCpuHashMap<_, TrafficKey, TrafficVal> =
            PerCpuHashMap::try_from(map).map_err(|source| NetObsError::Map { name: "TRAFFIC", source })?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, per_cpu) = item.map_err(|source| NetObsError::Map { name: "TRAFFIC", source })?;
            let sum = per_cpu.iter().fold(TrafficVal::default(), |a, v| TrafficVal {
                bytes: a.bytes + v.bytes,
                packets: a.packets + v.packets,
                payload_bytes: a.payload_bytes + v.payload_bytes,
            });
            out.push((k, sum));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// (packets without a cgroup id, inserts refused because the map was full).
    pub fn errors(&self) -> Result<(u64, u64), NetObsError> {
        let map = self.bpf.map("ERRORS").ok_or(NetObsError::MissingMap("ERRORS"))?;
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(|source| NetObsError::Map { name: "ERRORS", source })?;
        let sum = |i: u32| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).map_err(|source| NetObsError::Map { name: "ERRORS", source });
        Ok((sum(0)?, sum(1)?))
    }
}

/// The cgroup id of a cgroup v2 directory: its inode number.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo (the unified hierarchy may sit at
/// /sys/fs/cgroup or, on hybrid hosts, /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_classes_parse_and_map_ipv4_into_the_v6_trie() {
        let c = PeerClass::parse("pods", &["10.244.0.0/16", "fd00::/8", "192.168.1.7"]).unwrap();
        assert_eq!(c.cidrs[2], ("192.168.1.7".parse().unwrap(), 32));
        let e = PeerClass::parse("svc", &["10.0.0.0/33"]).unwrap_err().to_string();
        assert_eq!(e, "peer class \"svc\": expected a CIDR like 10.0.0.0/8 or fd00::/8, got \"10.0.0.0/33\"");
        let k = trie_key("10.244.0.0".parse().unwrap(), 16);
        assert_eq!(k.prefix_len(), 112);
        assert_eq!(&k.data()[10..], &[0xff, 0xff, 10, 244, 0, 0]);
    }
}
