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
pub mod sample;

pub use bpf::{
    EGRESS, Family, INGRESS, KernelErrors, ListenKey, ListenVal, NetObs, NetObsError, NullPrograms, PeerClass, ProgramCost, ROLE_CLIENT,
    ROLE_SERVER, RTT_BUCKETS, TcpKey, TcpVal, TrafficKey, TrafficVal, cgroup_id, cgroup2_mount,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, info, info_span, warn};

use hearth_service::tasks::Tasks;

use crate::daemon::AgentError;
use crate::subsystem::{Started, Status, Wiring};
use collect::{Collector, FamilyStatus, NetMetrics};
use pods::PodTable;

/// Per-pod network metrics: the `network` config section, validated by `config`.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub enabled: bool,
    pub cgroup_root: Option<PathBuf>,
    pub collect_interval: Duration,
    pub forget_after: Duration,
    pub ports: Vec<u16>,
    pub peers: Vec<PeerClass>,
    pub bpf_stats: bool,
    /// Why the families are off when `enabled` is false, if not because config says so.
    pub off_reason: Option<String>,
    /// Pods known without the API server (UID -> name): `hearth local`'s sample workload.
    pub static_pods: std::collections::HashMap<String, crate::kube::PodRef>,
}

/// The attach root: configured, or the kubelet's pod slice under the cgroup v2 mount.
pub fn pod_cgroup_root(configured: Option<&std::path::Path>) -> Result<PathBuf, String> {
    if let Some(p) = configured {
        return if p.is_dir() { Ok(p.to_owned()) } else { Err(format!("network.cgroup_root {} is not a directory", p.display())) };
    }
    let mount = cgroup2_mount().ok_or("no cgroup v2 mount in /proc/self/mountinfo (network metrics need the unified hierarchy)")?;
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| mount.join(d))
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("no kubepods.slice or kubepods cgroup under {}; set network.cgroup_root", mount.display()))
}

/// The network subsystem: attaches the programs, runs the collector and the pod-name
/// poller as its tasks. Never fails the agent: a family that cannot work is off, with its
/// reason in the status, the log and `hearth_pod_network_enabled`.
pub async fn start(w: &mut Wiring, tasks: Tasks) -> Result<Started, AgentError> {
    // Loading and attaching BPF programs are syscalls that can take a while: not on an
    // async worker.
    let (settings, attach_tasks) = (w.cfg.network.clone(), tasks.clone());
    let names = w.pods.clone();
    let net = tokio::task::spawn_blocking(move || attach(&settings, names, &attach_tasks)).await?;
    let st = net.status();
    let mut caps = Vec::new();
    if st.traffic.is_ok() {
        caps.push("network.traffic");
    }
    if st.tcp.is_ok() {
        caps.push("network.tcp");
    }
    let status = match (st.traffic, st.tcp) {
        (Ok(()), Ok(())) => Status::enabled("per-pod traffic and TCP metrics"),
        (Err(a), Err(b)) if a == b => Status::off(a),
        (Err(a), Err(b)) => Status::off(format!("traffic: {a}; tcp: {b}")),
        (Err(r), Ok(())) => Status::degraded(format!("traffic family off: {r}")),
        (Ok(()), Err(r)) => Status::degraded(format!("tcp family off: {r}")),
    };
    net.register(&mut w.registry);
    Ok(Started::new(status).with_capabilities(&caps))
}

/// Attaches the programs as configured and starts the collector in `tasks`; pod names come
/// from `names` (the kube subsystem's pod watcher keeps it). Whatever cannot work is off,
/// with its reason.
pub fn attach(settings: &NetworkSettings, names: PodTable, tasks: &Tasks) -> Arc<NetMetrics> {
    let shutdown = tasks.cancel_token().clone();
    let off = |reason: String| {
        warn!(%reason, "per-pod network metrics are off");
        NetMetrics::new(FamilyStatus::off(&reason))
    };
    if !settings.enabled {
        return NetMetrics::new(FamilyStatus::off(
            settings.off_reason.as_deref().unwrap_or("turned off in config (network.enabled: false)"),
        ));
    }
    names.extend(settings.static_pods.clone());
    let root = match pod_cgroup_root(settings.cgroup_root.as_deref()) {
        Ok(r) => r,
        Err(reason) => return off(reason),
    };
    let mut obs = match NetObs::attach(&root, &settings.peers, &settings.ports) {
        Ok(o) => o,
        Err(e) => {
            let why = if rustix::process::geteuid().is_root() { String::new() } else { "not root: ".to_owned() };
            return off(format!("{why}{e}"));
        }
    };
    for f in [Family::Traffic, Family::Tcp] {
        match obs.family(f) {
            Ok(()) => {}
            Err(reason) => warn!(family = f.as_str(), %reason, "a network metric family is off"),
        }
    }
    if settings.bpf_stats
        && let Err(e) = obs.enable_cost_stats()
    {
        warn!(error = %e, "cannot turn on BPF run-time stats; program cost metrics stay at 0");
    }
    info!(cgroup_root = %root.display(), peers = settings.peers.len(), ports = ?settings.ports, "per-pod network metrics attached");
    let (collector, metrics) = Collector::new(obs, root, Arc::new(names.clone()), settings.forget_after);
    tasks.spawn("collector", collect::run(collector, settings.collect_interval, shutdown).instrument(info_span!("netobs")));
    metrics
}
