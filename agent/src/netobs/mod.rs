//! Network observability per pod, from the kernel, without kprobes.
//!
//! - `bpf`: the programs of `ebpf/` loaded with aya and attached once at the pod cgroup
//!   root; the kernel aggregates per (cgroup id, direction, peer class) in per-CPU maps.
//! - `pods`: cgroup id (the inode of the cgroup v2 directory) -> pod UID (from the path) ->
//!   namespace and name (from the Kubernetes API, cached).
//! - `collect`: reads the maps on a timer, attributes them to pods, keeps counters monotonic
//!   across container restarts, reclaims the map entries of deleted cgroups and forgets
//!   deleted pods' series after a delay, and renders `hearth_pod_network_*`.

pub mod bpf;
pub mod collect;
pub mod pods;

pub use bpf::{
    EGRESS, Family, INGRESS, KernelErrors, ListenKey, ListenVal, NetObs, NetObsError, PeerClass, ProgramCost, ROLE_CLIENT, ROLE_SERVER,
    RTT_BUCKETS, TcpKey, TcpVal, TrafficKey, TrafficVal, cgroup_id, cgroup2_mount,
};
