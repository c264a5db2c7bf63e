//! The kernel side: the programs of `ebpf/netobs.bpf.c` (compiled by build.rs with clang,
//! embedded here), loaded with aya, attached once at the pod cgroup root as BPF links, and
//! the typed reads of their per-CPU maps (summed over CPUs here).
//!
//! Two program families load and attach independently: `traffic` (cgroup_skb ingress and
//! egress: bytes, packets, listener bytes) and `tcp` (sock_ops: connections, retransmits,
//! RTOs, RTT). One the kernel refuses is off with its reason; the other still works.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps};

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netobs.bpf.o"));
/// Programs that only return "pass" (`ebpf/null.bpf.c`): the overhead benchmark's anchor.
static NULL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/null.bpf.o"));

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
    #[error("turning on BPF run-time stats: {0}")]
    Stats(String),
    #[error("BPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("opening cgroup {path}: {source} (expected a cgroup v2 directory)")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("peer class {name:?}: expected a CIDR like 10.0.0.0/8 or fd00::/8, got {got:?}")]
    Cidr { name: String, got: String },
    #[error("{count} peer classes: at most 255 fit the programs' one-byte class id")]
    TooManyClasses { count: usize },
    #[error("no network metric family could be attached: traffic: {traffic}; tcp: {tcp}")]
    NothingAttached { traffic: String, tcp: String },
}

/// `ebpf/netobs.bpf.c`'s `struct traffic_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    pub cgroup_id: u64,
    pub direction: u8,
    pub peer_class: u8,
    /// The socket's local port when it is a declared serving port, else 0.
    pub port: u16,
    pub pad: [u8; 4],
}

/// `struct traffic_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficVal {
    pub bytes: u64,
    pub packets: u64,
    pub payload_bytes: u64,
}

impl TrafficVal {
    pub fn add(&mut self, o: &TrafficVal) {
        self.bytes += o.bytes;
        self.packets += o.packets;
        self.payload_bytes += o.payload_bytes;
    }
}

#[allow(unsafe_code)]
// SAFETY: both are repr(C) structs of plain integers with explicit padding fields, valid
// for any bit pattern, matching the C layout byte for byte.
unsafe impl aya::Pod for TrafficKey {}
#[allow(unsafe_code)]
// SAFETY: as above.
unsafe impl aya::Pod for TrafficVal {}

/// `struct tcp_key`: role 0 is the connecting side, 1 the accepting side.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpKey {
    pub cgroup_id: u64,
    pub peer_class: u8,
    pub role: u8,
    pub pad: [u8; 6],
}

pub const RTT_BUCKETS: usize = 24;

/// `struct tcp_val`. `rtt[i]` counts smoothed-RTT samples in [2^i, 2^(i+1)) microseconds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpVal {
    pub established: u64,
    pub failed: u64,
    pub closed: u64,
    pub retrans_segs: u64,
    pub rtos: u64,
    pub rtt_count: u64,
    pub rtt_sum_us: u64,
    pub rtt: [u64; RTT_BUCKETS],
}

impl TcpVal {
    pub fn add(&mut self, o: &TcpVal) {
        self.established += o.established;
        self.failed += o.failed;
        self.closed += o.closed;
        self.retrans_segs += o.retrans_segs;
        self.rtos += o.rtos;
        self.rtt_count += o.rtt_count;
        self.rtt_sum_us += o.rtt_sum_us;
        for (a, b) in self.rtt.iter_mut().zip(o.rtt.iter()) {
            *a += b;
        }
    }
}

/// Bytes of sockets whose local port is a declared serving port, per cgroup, port and
/// direction: the TRAFFIC entries with a port, summed over peer classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    pub cgroup_id: u64,
    pub port: u16,
    pub direction: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenVal {
    pub bytes: u64,
    pub packets: u64,
}

impl ListenVal {
    pub fn add(&mut self, o: &ListenVal) {
        self.bytes += o.bytes;
        self.packets += o.packets;
    }
}

/// The listener series in traffic entries: those with a port, summed over peer classes.
pub fn listeners_of(traffic: &[(TrafficKey, TrafficVal)]) -> Vec<(ListenKey, ListenVal)> {
    let mut out: std::collections::BTreeMap<ListenKey, ListenVal> = std::collections::BTreeMap::new();
    for (k, v) in traffic.iter().filter(|(k, _)| k.port != 0) {
        out.entry(ListenKey { cgroup_id: k.cgroup_id, port: k.port, direction: k.direction })
            .or_default()
            .add(&ListenVal { bytes: v.bytes, packets: v.packets });
    }
    out.into_iter().collect()
}

#[allow(unsafe_code)]
// SAFETY: repr(C) plain integers with explicit padding, as the C side lays them out.
unsafe impl aya::Pod for TcpKey {}
#[allow(unsafe_code)]
// SAFETY: as above.
unsafe impl aya::Pod for TcpVal {}

pub const INGRESS: u8 = 0;
pub const EGRESS: u8 = 1;
pub const ROLE_CLIENT: u8 = 0;
pub const ROLE_SERVER: u8 = 1;

/// What the programs could not attribute or count (the ERRORS array, summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelErrors {
    /// Packets with no cgroup id, and their bytes.
    pub no_cgroup_packets: u64,
    pub no_cgroup_bytes: u64,
    /// Inserts refused because a map was full.
    pub traffic_full: u64,
    pub tcp_full: u64,
    /// TCP events on sockets opened before the programs were attached.
    pub no_sock_info: u64,
    /// Socket storage that could not be created (memory).
    pub storage: u64,
}

/// aya attaches through a BPF link on kernels >= 5.7. Cgroup links always coexist with other
/// programs (the kernel attaches them multi) and refuse any attach flag, so the link path
/// takes `Single` (no flags); the legacy attach path needs `AllowMultiple`.
fn attach_mode() -> CgroupAttachMode {
    let links = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 7, 0));
    if links { CgroupAttachMode::Single } else { CgroupAttachMode::AllowMultiple }
}

fn attach_skb(
    bpf: &mut aya::Ebpf,
    name: &'static str,
    dir: &std::fs::File,
    kind: CgroupSkbAttachType,
    mode: CgroupAttachMode,
) -> Result<(), NetObsError> {
    let err = |source| NetObsError::Program { name, source };
    let prog: &mut CgroupSkb = bpf.program_mut(name).ok_or(NetObsError::MissingProgram(name))?.try_into().map_err(err)?;
    prog.load().map_err(err)?;
    prog.attach(dir.as_fd(), kind, mode).map_err(err)?;
    Ok(())
}

fn attach_sockops(bpf: &mut aya::Ebpf, name: &'static str, dir: &std::fs::File, mode: CgroupAttachMode) -> Result<(), NetObsError> {
    let err = |source| NetObsError::Program { name, source };
    let prog: &mut SockOps = bpf.program_mut(name).ok_or(NetObsError::MissingProgram(name))?.try_into().map_err(err)?;
    prog.load().map_err(err)?;
    prog.attach(dir.as_fd(), mode).map_err(err)?;
    Ok(())
}

/// Do-nothing programs of the same kinds, attached the same way as [`NetObs`]'s: what a run
/// costs on this machine before any work is done. Only the overhead benchmark uses them.
#[derive(Debug)]
pub struct NullPrograms {
    bpf: aya::Ebpf,
    _stats: OwnedFd,
}

const NULL_PROGRAMS: [&str; 3] = ["null_egress", "null_ingress", "null_sockops"];

impl NullPrograms {
    /// Loads and attaches them at `cgroup`, with BPF run-time stats on while they live.
    pub fn attach(cgroup: &Path) -> Result<Self, NetObsError> {
        let mut bpf = aya::Ebpf::load(NULL_OBJECT)?;
        let dir = std::fs::File::open(cgroup).map_err(|source| NetObsError::Cgroup { path: cgroup.into(), source })?;
        attach_skb(&mut bpf, "null_egress", &dir, CgroupSkbAttachType::Egress, attach_mode())?;
        attach_skb(&mut bpf, "null_ingress", &dir, CgroupSkbAttachType::Ingress, attach_mode())?;
        attach_sockops(&mut bpf, "null_sockops", &dir, attach_mode())?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| NetObsError::Stats(e.to_string()))?;
        Ok(Self { bpf, _stats: stats })
    }

    pub fn costs(&self) -> Vec<ProgramCost> {
        NULL_PROGRAMS
            .iter()
            .filter_map(|name| {
                let info = self.bpf.program(name)?.info().ok()?;
                Some(ProgramCost { name, run_time_ns: info.run_time().as_nanos() as u64, run_count: info.run_count() })
            })
            .collect()
    }
}

/// A program's cumulative cost, from the kernel's program info (needs BPF stats enabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramCost {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// A metric family and whether it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Traffic,
    Tcp,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Traffic => "traffic",
            Family::Tcp => "tcp",
        }
    }
}

const TRAFFIC_PROGRAMS: [(&str, CgroupSkbAttachType); 2] =
    [("netobs_ingress", CgroupSkbAttachType::Ingress), ("netobs_egress", CgroupSkbAttachType::Egress)];
const SOCKOPS_PROGRAM: &str = "netobs_sockops";

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
    traffic: Result<(), String>,
    tcp: Result<(), String>,
    stats: Option<OwnedFd>,
}

impl std::fmt::Debug for NetObs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetObs")
            .field("classes", &self.classes)
            .field("traffic", &self.traffic)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> NetObsError {
    move |source| NetObsError::Map { name, source }
}

impl NetObs {
    /// Loads the programs, fills the peer trie (class ids 1.. in order; 0 is "internet") and
    /// the declared serving ports, and attaches both families to the cgroup v2 directory
    /// `cgroup`. A family the kernel refuses is off with its reason (see [`NetObs::family`]);
    /// an error only when neither attaches.
    pub fn attach(cgroup: &Path, classes: &[PeerClass], ports: &[u16]) -> Result<Self, NetObsError> {
        if classes.len() > 255 {
            return Err(NetObsError::TooManyClasses { count: classes.len() });
        }
        let mut bpf = aya::Ebpf::load(OBJECT)?;
        {
            let map = bpf.map_mut("PEERS").ok_or(NetObsError::MissingMap("PEERS"))?;
            let mut peers: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(map).map_err(map_err("PEERS"))?;
            for (i, c) in classes.iter().enumerate() {
                for (addr, prefix) in &c.cidrs {
                    peers.insert(&trie_key(*addr, *prefix), (i + 1) as u8, 0).map_err(map_err("PEERS"))?;
                }
            }
        }
        {
            let map = bpf.map_mut("PORTS").ok_or(NetObsError::MissingMap("PORTS"))?;
            let mut m: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(map).map_err(map_err("PORTS"))?;
            for p in ports {
                m.insert(p, 1, 0).map_err(map_err("PORTS"))?;
            }
        }
        let dir = std::fs::File::open(cgroup).map_err(|source| NetObsError::Cgroup { path: cgroup.into(), source })?;
        let mode = attach_mode();

        let traffic =
            TRAFFIC_PROGRAMS.iter().try_for_each(|(name, kind)| attach_skb(&mut bpf, name, &dir, *kind, mode)).map_err(|e| error_chain(&e));
        let tcp = attach_sockops(&mut bpf, SOCKOPS_PROGRAM, &dir, mode).map_err(|e| error_chain(&e));
        if let (Err(t), Err(c)) = (&traffic, &tcp) {
            return Err(NetObsError::NothingAttached { traffic: t.clone(), tcp: c.clone() });
        }
        let mut names = vec!["internet".to_owned()];
        names.extend(classes.iter().map(|c| c.name.clone()));
        Ok(Self { bpf, classes: names, traffic, tcp, stats: None })
    }

    /// Whether a family is on, or why not.
    pub fn family(&self, f: Family) -> Result<(), &str> {
        match f {
            Family::Traffic => self.traffic.as_ref().map(|_| ()).map_err(String::as_str),
            Family::Tcp => self.tcp.as_ref().map(|_| ()).map_err(String::as_str),
        }
    }

    /// Turns on the kernel's per-program run time and run count (BPF_ENABLE_STATS) for as
    /// long as this value lives. Costs two clock reads per program run.
    pub fn enable_cost_stats(&mut self) -> Result<(), aya::sys::SyscallError> {
        if self.stats.is_none() {
            self.stats = Some(aya::sys::enable_stats(aya::sys::Stats::RunTime)?);
        }
        Ok(())
    }

    /// Class names by id ("internet" first).
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    /// Class name for a class id.
    pub fn class_name(&self, id: u8) -> &str {
        self.classes.get(usize::from(id)).map_or("unknown", String::as_str)
    }

    /// Traffic counters, summed over CPUs; a serving pod's entries are split by declared
    /// port (0 for other sockets).
    pub fn traffic(&self) -> Result<Vec<(TrafficKey, TrafficVal)>, NetObsError> {
        self.read("TRAFFIC", TrafficVal::add)
    }

    /// TCP counters and RTT histograms, summed over CPUs.
    pub fn tcp(&self) -> Result<Vec<(TcpKey, TcpVal)>, NetObsError> {
        self.read("TCP", TcpVal::add)
    }

    /// Declared-port bytes, summed over CPUs and peer classes.
    pub fn listeners(&self) -> Result<Vec<(ListenKey, ListenVal)>, NetObsError> {
        Ok(listeners_of(&self.traffic()?))
    }

    fn read<K, V>(&self, name: &'static str, add: impl Fn(&mut V, &V)) -> Result<Vec<(K, V)>, NetObsError>
    where
        K: aya::Pod + Ord + Copy,
        V: aya::Pod + Default,
    {
        let map = self.bpf.map(name).ok_or(NetObsError::MissingMap(name))?;
        let m: PerCpuHashMap<_, K, V> = PerCpuHashMap::try_from(map).map_err(map_err(name))?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, per_cpu) = match item {
                Ok(kv) => kv,
                // An entry deleted between listing its key and reading it: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => return Err(NetObsError::Map { name, source }),
            };
            let mut sum = V::default();
            for v in per_cpu.iter() {
                add(&mut sum, v);
            }
            out.push((k, sum));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Deletes every map entry of the given cgroups (cgroups that no longer exist).
    /// Returns how many entries went.
    pub fn reclaim(&mut self, dead: &HashSet<u64>) -> Result<usize, NetObsError> {
        if dead.is_empty() {
            return Ok(0);
        }
        let mut n = remove_where::<TrafficKey, TrafficVal>(&mut self.bpf, "TRAFFIC", |k| dead.contains(&k.cgroup_id))?;
        n += remove_where::<TcpKey, TcpVal>(&mut self.bpf, "TCP", |k| dead.contains(&k.cgroup_id))?;
        Ok(n)
    }

    /// What the programs could not attribute or count.
    pub fn errors(&self) -> Result<KernelErrors, NetObsError> {
        let map = self.bpf.map("ERRORS").ok_or(NetObsError::MissingMap("ERRORS"))?;
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err("ERRORS"))?;
        let sum = |i: u32| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).map_err(map_err("ERRORS"));
        Ok(KernelErrors {
            no_cgroup_packets: sum(0)?,
            traffic_full: sum(1)?,
            no_cgroup_bytes: sum(2)?,
            tcp_full: sum(3)?,
            no_sock_info: sum(5)?,
            storage: sum(6)?,
        })
    }

    /// Run time and run count of each attached program (zero unless BPF stats are on,
    /// through [`NetObs::enable_cost_stats`] or `kernel.bpf_stats_enabled`).
    pub fn costs(&self) -> Vec<ProgramCost> {
        let mut out = Vec::new();
        let names: Vec<&'static str> = TRAFFIC_PROGRAMS.iter().map(|(n, _)| *n).chain([SOCKOPS_PROGRAM]).collect();
        for name in names {
            let Some(p) = self.bpf.program(name) else { continue };
            if let Ok(info) = p.info() {
                out.push(ProgramCost { name, run_time_ns: info.run_time().as_nanos() as u64, run_count: info.run_count() });
            }
        }
        out
    }
}

fn remove_where<K: aya::Pod, V: aya::Pod>(
    bpf: &mut aya::Ebpf,
    name: &'static str,
    dead: impl Fn(&K) -> bool,
) -> Result<usize, NetObsError> {
    let map = bpf.map_mut(name).ok_or(NetObsError::MissingMap(name))?;
    let mut m: PerCpuHashMap<&mut MapData, K, V> = PerCpuHashMap::try_from(map).map_err(map_err(name))?;
    let doomed: Vec<K> = m.keys().filter_map(Result::ok).filter(|k| dead(k)).collect();
    let mut n = 0;
    for k in &doomed {
        match m.remove(k) {
            Ok(()) => n += 1,
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(NetObsError::Map { name, source }),
        }
    }
    Ok(n)
}

/// An error and its sources on one line, for "off because ..." messages.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
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

    use std::collections::BTreeMap;

    use aya_obj::btf::BtfKind;

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

    /// A struct as the BPF object's BTF describes it: size, and each field's byte offset and
    /// byte size by C name.
    #[derive(Debug)]
    struct CStruct {
        size: usize,
        fields: BTreeMap<String, (usize, usize)>,
    }

    /// Reads struct layouts out of BTF bytes. aya-obj 0.3 parses BTF and finds types by name,
    /// but keeps members and strings crate-private, so members are decoded here from the
    /// bytes it re-encodes (`Btf::to_bytes`); the format is in the kernel's
    /// Documentation/bpf/btf.rst.
    struct BtfLayouts {
        /// Per type id (0 is void): kind, kind_flag, size or type, and the vlen records after it.
        types: Vec<(u32, bool, u32, Vec<[u32; 3]>)>,
        strings: Vec<u8>,
    }

    impl BtfLayouts {
        fn parse(b: &[u8]) -> Self {
            let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
            assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0xeb9f, "BTF magic");
            let hdr_len = u32_at(4) as usize;
            let (type_off, type_len) = (hdr_len + u32_at(8) as usize, u32_at(12) as usize);
            let (str_off, str_len) = (hdr_len + u32_at(16) as usize, u32_at(20) as usize);
            let strings = b[str_off..str_off + str_len].to_vec();
            let mut types = vec![(0, false, 0, Vec::new())];
            let mut at = type_off;
            while at < type_off + type_len {
                // The name (at + 0) is not needed: aya-obj finds structs by name.
                let (info, size_or_type) = (u32_at(at + 4), u32_at(at + 8));
                let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
                at += 12;
                // Bytes after the common header, by kind: INT, VAR, DECL_TAG carry one u32;
                // ARRAY three; the rest a record per vlen item.
                let (records, words) = match kind {
                    1 | 14 | 17 => (1, 1),
                    3 => (1, 3),
                    4 | 5 | 15 | 19 => (vlen, 3),
                    6 | 13 => (vlen, 2),
                    _ => (0, 0),
                };
                let mut items = Vec::with_capacity(records);
                for _ in 0..records {
                    let mut r = [0u32; 3];
                    for w in r.iter_mut().take(words) {
                        *w = u32_at(at);
                        at += 4;
                    }
                    items.push(r);
                }
                types.push((kind, kind_flag, size_or_type, items));
            }
            Self { types, strings }
        }

        fn string(&self, offset: u32) -> String {
            let s = &self.strings[offset as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]).into_owned()
        }

        /// Bytes a type takes: through typedefs and qualifiers, arrays by element count.
        fn type_size(&self, id: u32) -> usize {
            let (kind, _, size_or_type, items) = &self.types[id as usize];
            match kind {
                // INT, STRUCT, UNION, ENUM, FLOAT, ENUM64: the size is in the header.
                1 | 4 | 5 | 6 | 16 | 19 => *size_or_type as usize,
                3 => self.type_size(items[0][0]) * items[0][2] as usize,
                // TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG.
                8..=11 | 18 => self.type_size(*size_or_type),
                other => panic!("BTF type {id} of kind {other} has no size here"),
            }
        }

        fn structure(&self, id: u32) -> CStruct {
            let (kind, kind_flag, size, members) = &self.types[id as usize];
            assert_eq!(*kind, BtfKind::Struct as u32, "type {id} is a struct");
            let mut fields = BTreeMap::new();
            for [name, ty, offset] in members {
                // With kind_flag the top byte is a bitfield size; bitfields have no Rust twin.
                let bits = if *kind_flag { offset & 0xff_ffff } else { *offset };
                assert!(!*kind_flag || offset >> 24 == 0, "bitfield {} in a map struct", self.string(*name));
                assert_eq!(bits % 8, 0, "field {} at bit {bits}", self.string(*name));
                fields.insert(self.string(*name), ((bits / 8) as usize, self.type_size(*ty)));
            }
            CStruct { size: *size as usize, fields }
        }
    }

    fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    /// A Rust struct's layout keyed by the C field name each Rust field stands for:
    /// `(size, [(c_name, rust_name, offset, size)])`.
    macro_rules! rust_layout {
        ($t:ty { $($field:ident => $c:literal),* $(,)? }) => {
            (
                size_of::<$t>(),
                vec![$(($c, stringify!($field), std::mem::offset_of!($t, $field), size_of_field::<$t, _>(|s| &s.$field))),*],
            )
        };
    }

    #[test]
    fn bpf_map_structs_match_their_c_layout_in_btf() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded netobs.bpf.o parses");
        let btf = obj.btf.as_ref().expect("netobs.bpf.o carries BTF (build.rs compiles it with -g)");
        let layouts = BtfLayouts::parse(&btf.to_bytes());
        let c_struct = |name: &str| {
            let id = btf.id_by_type_name_kind(name, BtfKind::Struct).unwrap_or_else(|e| panic!("struct {name} in BTF: {e}"));
            layouts.structure(id)
        };

        // Each Rust field with the C field it mirrors; a C field left out here fails too.
        let shared = [
            (
                "traffic_key",
                "TrafficKey",
                rust_layout!(TrafficKey {
                    cgroup_id => "cgroup_id",
                    direction => "direction",
                    peer_class => "peer_class",
                    port => "port",
                    pad => "pad",
                }),
            ),
            (
                "traffic_val",
                "TrafficVal",
                rust_layout!(TrafficVal { bytes => "bytes", packets => "packets", payload_bytes => "payload_bytes" }),
            ),
            (
                "tcp_key",
                "TcpKey",
                rust_layout!(TcpKey { cgroup_id => "cgroup_id", peer_class => "peer_class", role => "role", pad => "pad" }),
            ),
            (
                "tcp_val",
                "TcpVal",
                rust_layout!(TcpVal {
                    established => "established",
                    failed => "failed",
                    closed => "closed",
                    retrans_segs => "retrans_segs",
                    rtos => "rtos",
                    rtt_count => "rtt_count",
                    rtt_sum_us => "rtt_sum_us",
                    rtt => "rtt",
                }),
            ),
        ];
        let mut wrong = Vec::new();
        for (c_name, rust_name, (rust_size, fields)) in shared {
            let c = c_struct(c_name);
            if c.size != rust_size {
                wrong.push(format!("struct {c_name} is {} bytes, {rust_name} {rust_size}", c.size));
            }
            let mut unmapped: Vec<&String> = c.fields.keys().collect();
            for (c_field, rust_field, offset, size) in fields {
                unmapped.retain(|f| *f != c_field);
                match c.fields.get(c_field) {
                    None => wrong.push(format!("{c_name}.{c_field}: not in BTF; {rust_name}.{rust_field} expects it")),
                    Some(&(c_offset, c_size)) if (c_offset, c_size) != (offset, size) => wrong.push(format!(
                        "{c_name}.{c_field} at byte {c_offset}, {c_size} bytes; {rust_name}.{rust_field} at byte {offset}, {size} bytes"
                    )),
                    Some(_) => {}
                }
            }
            wrong.extend(unmapped.iter().map(|f| format!("{c_name}.{f}: no field of {rust_name} maps to it")));
        }

        // The trie key userspace writes is aya's lpm_trie::Key<[u8; 16]>, repr(C, packed)
        // { prefix_len: u32, data }; its fields are private, so their offsets are that layout's.
        let peer = c_struct("peer_key");
        let want: BTreeMap<String, (usize, usize)> = [("prefixlen".to_owned(), (0, 4)), ("addr".to_owned(), (4, 16))].into();
        if (peer.size, &peer.fields) != (size_of::<LpmKey<[u8; 16]>>(), &want) {
            wrong.push(format!("struct peer_key is {peer:?}; aya's Key<[u8; 16]> is 20 bytes, prefix_len at 0, data at 4"));
        }

        // Each map's key and value, as the map definitions declare them (aya-obj reads their
        // sizes from BTF), against the types this module reads and writes them as.
        let maps = [
            ("TRAFFIC", size_of::<TrafficKey>(), size_of::<TrafficVal>()),
            ("TCP", size_of::<TcpKey>(), size_of::<TcpVal>()),
            ("TCP_ZERO", size_of::<u32>(), size_of::<TcpVal>()),
            ("PEERS", size_of::<LpmKey<[u8; 16]>>(), size_of::<u8>()),
            ("PORTS", size_of::<u16>(), size_of::<u8>()),
            ("ERRORS", size_of::<u32>(), size_of::<u64>()),
        ];
        for (name, key, value) in maps {
            let Some(m) = obj.maps.get(name) else {
                wrong.push(format!("map {name} missing from the object"));
                continue;
            };
            let (k, v) = (m.key_size() as usize, m.value_size() as usize);
            if (k, v) != (key, value) {
                wrong.push(format!("map {name}: key {k} and value {v} bytes in C, {key} and {value} in Rust"));
            }
        }
        assert!(wrong.is_empty(), "BPF map layouts differ between ebpf/netobs.bpf.c and bpf.rs:\n{}", wrong.join("\n"));
    }
}
