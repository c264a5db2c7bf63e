//! The collection loop: reads the kernel's per-cgroup counters on a timer, attributes them
//! to pods and renders `hearth_pod_network_*`.
//!
//! Counters stay monotonic per series although the kernel's are per cgroup: when a cgroup
//! goes (a container restarts, a pod is deleted), its last values move into the pod's
//! "retired" sums and its map entries are deleted, so the kernel maps hold only live
//! cgroups and the sums never go back. A deleted pod's series stay for `forget_after` (long
//! enough for Prometheus to scrape the final values) and are then dropped.
//!
//! Cardinality is bounded by design: series are per pod x direction x peer class (classes
//! come from config, a handful), TCP per pod x peer class x role, listener bytes per pod x
//! declared port x direction. No per-IP or per-connection series exist.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector as PromCollector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::bpf::{EGRESS, Family, KernelErrors, ListenVal, NetObs, ProgramCost, RTT_BUCKETS, TcpVal, TrafficVal};
use super::pods::{CgroupScan, PodDirectory, PodRef};

/// How many collections a cgroup id seen in the maps but not in the tree waits before it is
/// treated as gone (a cgroup made between the tree walk and the map read is not gone).
const UNKNOWN_GRACE_TICKS: u32 = 2;

type Uid = String;

/// Series keys, by pod UID (None: a cgroup outside any pod).
type TrafficSeries = (Option<Uid>, u8, u8); // direction, peer class
type TcpSeries = (Option<Uid>, u8, u8); // peer class, role
type ListenSeries = (Option<Uid>, u16, u8); // port, direction

#[derive(Default)]
struct Sums {
    traffic: HashMap<TrafficSeries, TrafficVal>,
    tcp: HashMap<TcpSeries, TcpVal>,
    listen: HashMap<ListenSeries, ListenVal>,
}

impl Sums {
    fn add_traffic(&mut self, k: TrafficSeries, v: &TrafficVal) {
        self.traffic.entry(k).or_default().add(v);
    }
    fn add_tcp(&mut self, k: TcpSeries, v: &TcpVal) {
        self.tcp.entry(k).or_default().add(v);
    }
    fn add_listen(&mut self, k: ListenSeries, v: &ListenVal) {
        self.listen.entry(k).or_default().add(v);
    }
    fn merge(&mut self, o: &Sums) {
        for (k, v) in &o.traffic {
            self.add_traffic(k.clone(), v);
        }
        for (k, v) in &o.tcp {
            self.add_tcp(k.clone(), v);
        }
        for (k, v) in &o.listen {
            self.add_listen(k.clone(), v);
        }
    }
    fn forget(&mut self, uid: &str) {
        self.traffic.retain(|k, _| k.0.as_deref() != Some(uid));
        self.tcp.retain(|k, _| k.0.as_deref() != Some(uid));
        self.listen.retain(|k, _| k.0.as_deref() != Some(uid));
    }
}

/// Why the network metrics are off, per family, or that they are on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyStatus {
    pub traffic: Result<(), String>,
    pub tcp: Result<(), String>,
}

impl FamilyStatus {
    pub fn off(reason: &str) -> Self {
        Self { traffic: Err(reason.to_owned()), tcp: Err(reason.to_owned()) }
    }
}

/// What the last collection saw, ready to render.
#[derive(Debug, Clone)]
struct Snapshot {
    status: FamilyStatus,
    classes: Vec<String>,
    traffic: BTreeMap<(PodRef, u8, u8), TrafficVal>,
    tcp: BTreeMap<(PodRef, u8, u8), TcpVal>,
    listen: BTreeMap<(PodRef, u16, u8), ListenVal>,
    costs: Vec<ProgramCost>,
    kernel: KernelErrors,
    not_a_pod_bytes: u64,
    cgroups: usize,
    pods: usize,
    reclaimed_entries: u64,
    collect_errors: u64,
    last_collect: Duration,
}

/// The shared, rendered side: what `/metrics` shows.
#[derive(Debug)]
pub struct NetMetrics(RwLock<Snapshot>);

impl NetMetrics {
    pub fn new(status: FamilyStatus) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Snapshot {
            status,
            classes: Vec::new(),
            traffic: BTreeMap::new(),
            tcp: BTreeMap::new(),
            listen: BTreeMap::new(),
            costs: Vec::new(),
            kernel: KernelErrors::default(),
            not_a_pod_bytes: 0,
            cgroups: 0,
            pods: 0,
            reclaimed_entries: 0,
            collect_errors: 0,
            last_collect: Duration::ZERO,
        })))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes of a pod by direction and peer class name (for tests and `hearth local`).
    pub fn pod_bytes(&self, namespace: &str, pod: &str) -> Vec<(String, String, u64)> {
        let s = self.read();
        s.traffic
            .iter()
            .filter(|((p, _, _), _)| p.namespace == namespace && p.name == pod)
            .map(|((_, d, c), v)| (direction(*d).to_owned(), class(&s.classes, *c).to_owned(), v.bytes))
            .collect()
    }

    /// Adds the `hearth_pod_network_*` families to `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(Shared(self.clone())));
    }

    /// Which families are on.
    pub fn status(&self) -> FamilyStatus {
        self.read().status.clone()
    }

    /// Number of pod series of each kind (traffic, tcp, listen) and tracked cgroups.
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let s = self.read();
        (s.traffic.len(), s.tcp.len(), s.listen.len(), s.cgroups)
    }
}

fn direction(d: u8) -> &'static str {
    if d == EGRESS { "egress" } else { "ingress" }
}

fn role(r: u8) -> &'static str {
    if r == super::bpf::ROLE_SERVER { "server" } else { "client" }
}

fn class(classes: &[String], c: u8) -> &str {
    classes.get(usize::from(c)).map_or("unknown", String::as_str)
}

/// Reads the kernel, attributes, keeps the sums. Owned by the collection task.
pub struct Collector {
    obs: NetObs,
    root: PathBuf,
    names: Arc<dyn PodDirectory>,
    forget_after: Duration,
    metrics: Arc<NetMetrics>,
    /// Last owner seen for each cgroup id (so a cgroup gone from the tree still retires to
    /// its pod).
    owners: HashMap<u64, Option<Uid>>,
    unknown: HashMap<u64, u32>,
    retired: Sums,
    pod_seen: HashMap<Uid, Instant>,
    reclaimed: u64,
    errors: u64,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector").field("root", &self.root).field("cgroups", &self.owners.len()).finish_non_exhaustive()
    }
}

impl Collector {
    pub fn new(obs: NetObs, root: PathBuf, names: Arc<dyn PodDirectory>, forget_after: Duration) -> (Self, Arc<NetMetrics>) {
        let status = FamilyStatus {
            traffic: obs.family(Family::Traffic).map_err(str::to_owned),
            tcp: obs.family(Family::Tcp).map_err(str::to_owned),
        };
        let metrics = NetMetrics::new(status);
        let c = Self {
            obs,
            root,
            names,
            forget_after,
            metrics: metrics.clone(),
            owners: HashMap::new(),
            unknown: HashMap::new(),
            retired: Sums::default(),
            pod_seen: HashMap::new(),
            reclaimed: 0,
            errors: 0,
        };
        (c, metrics)
    }

    pub fn obs(&self) -> &NetObs {
        &self.obs
    }

    /// One collection. Errors are counted and logged; the next tick tries again.
    pub fn tick(&mut self, now: Instant) {
        let started = Instant::now();
        if let Err(e) = self.collect(now) {
            self.errors += 1;
            warn!(error = %e, "network metrics collection failed");
        }
        let mut s = self.metrics.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.collect_errors = self.errors;
        s.last_collect = started.elapsed();
    }

    fn collect(&mut self, now: Instant) -> Result<(), Box<dyn std::error::Error>> {
        let scan = CgroupScan::walk(&self.root).map_err(|e| format!("walking cgroups under {}: {e}", self.root.display()))?;
        for (id, uid) in &scan.pods {
            self.owners.insert(*id, uid.clone());
            if let Some(u) = uid {
                self.pod_seen.insert(u.clone(), now);
            }
        }
        let traffic = self.obs.traffic()?;
        let tcp = self.obs.tcp()?;
        let listen = super::bpf::listeners_of(&traffic);

        // Cgroups in the maps but not in the tree: gone (after a short grace for ones never
        // seen, which may be newer than the walk).
        let mut in_maps: HashSet<u64> = traffic.iter().map(|(k, _)| k.cgroup_id).collect();
        in_maps.extend(tcp.iter().map(|(k, _)| k.cgroup_id));
        let mut dead = HashSet::new();
        for id in &in_maps {
            if scan.pods.contains_key(id) {
                self.unknown.remove(id);
                continue;
            }
            if self.owners.contains_key(id) {
                dead.insert(*id);
            } else {
                let n = self.unknown.entry(*id).or_insert(0);
                *n += 1;
                if *n > UNKNOWN_GRACE_TICKS {
                    dead.insert(*id);
                }
            }
        }
        self.unknown.retain(|id, _| in_maps.contains(id));

        let owner = |id: u64| self.owners.get(&id).cloned().flatten();
        let mut live = Sums::default();
        let mut retiring = Sums::default();
        for (k, v) in &traffic {
            let sums = if dead.contains(&k.cgroup_id) { &mut retiring } else { &mut live };
            sums.add_traffic((owner(k.cgroup_id), k.direction, k.peer_class), v);
        }
        for (k, v) in &tcp {
            let sums = if dead.contains(&k.cgroup_id) { &mut retiring } else { &mut live };
            sums.add_tcp((owner(k.cgroup_id), k.peer_class, k.role), v);
        }
        for (k, v) in &listen {
            let sums = if dead.contains(&k.cgroup_id) { &mut retiring } else { &mut live };
            sums.add_listen((owner(k.cgroup_id), k.port, k.direction), v);
        }
        if !dead.is_empty() {
            let n = self.obs.reclaim(&dead)?;
            self.reclaimed += n as u64;
            self.retired.merge(&retiring);
            for id in &dead {
                self.owners.remove(id);
            }
        }
        // Cgroups gone from the tree that never had map entries.
        self.owners.retain(|id, _| scan.pods.contains_key(id));

        // Deleted pods: forget their series once they have been gone long enough.
        let forget_after = self.forget_after;
        let gone: Vec<Uid> =
            self.pod_seen.iter().filter(|(_, t)| now.duration_since(**t) >= forget_after).map(|(u, _)| u.clone()).collect();
        for uid in &gone {
            self.pod_seen.remove(uid);
            self.retired.forget(uid);
            info!(pod_uid = %uid, "forgot a deleted pod's network series");
        }
        live.merge(&self.retired);

        // Attribute to names; cgroups outside pods only count as "not a pod".
        let mut name_cache: HashMap<Uid, PodRef> = HashMap::new();
        let mut name = |uid: &Uid| {
            name_cache
                .entry(uid.clone())
                .or_insert_with(|| self.names.lookup(uid).unwrap_or_else(|| PodRef { namespace: String::new(), name: uid.clone() }))
                .clone()
        };
        let mut snap_traffic = BTreeMap::new();
        let mut not_a_pod_bytes = 0;
        for ((uid, d, c), v) in &live.traffic {
            match uid {
                Some(u) => snap_traffic.entry((name(u), *d, *c)).or_insert_with(TrafficVal::default).add(v),
                None => not_a_pod_bytes += v.bytes,
            }
        }
        let mut snap_tcp = BTreeMap::new();
        for ((uid, c, r), v) in &live.tcp {
            if let Some(u) = uid {
                snap_tcp.entry((name(u), *c, *r)).or_insert_with(TcpVal::default).add(v);
            }
        }
        let mut snap_listen = BTreeMap::new();
        for ((uid, p, d), v) in &live.listen {
            if let Some(u) = uid {
                snap_listen.entry((name(u), *p, *d)).or_insert_with(ListenVal::default).add(v);
            }
        }
        let kernel = self.obs.errors()?;
        let costs = self.obs.costs();
        let mut s = self.metrics.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.classes = self.obs.class_names().to_vec();
        s.traffic = snap_traffic;
        s.tcp = snap_tcp;
        s.listen = snap_listen;
        s.costs = costs;
        s.kernel = kernel;
        s.not_a_pod_bytes = not_a_pod_bytes;
        s.cgroups = scan.pods.len();
        s.pods = self.pod_seen.len();
        s.reclaimed_entries = self.reclaimed;
        Ok(())
    }
}

/// Collects every `every` until `shutdown`. The kernel reads and the tree walk are short
/// blocking syscalls, so each tick runs on the blocking pool.
pub async fn run(mut collector: Collector, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        collector = match tokio::task::spawn_blocking(move || {
            collector.tick(Instant::now());
            collector
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "network metrics collection panicked; network metrics stop");
                return;
            }
        };
    }
}

type L<'a, const N: usize> = [(&'static str, &'a str); N];

/// Counter and gauge helpers: one family, its samples from an iterator of label sets.
/// One family of constant samples; `N == 0` is a single unlabelled sample (`name 3`, not
/// `name{} 3`).
fn family<'a, const N: usize, V, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
    samples: impl IntoIterator<Item = (L<'a, N>, V)>,
    metric: impl Fn(V) -> M,
) -> Result<(), std::fmt::Error> {
    let mut f = enc.encode_descriptor(name, help, unit, kind)?;
    if N == 0 {
        if let Some((_, v)) = samples.into_iter().next() {
            metric(v).encode(f)?;
        }
        return Ok(());
    }
    for (labels, v) in samples {
        metric(v).encode(f.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<'a, const N: usize, V: EncodeCounterValue + std::fmt::Debug + Send + Sync>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L<'a, N>, V)>,
) -> Result<(), std::fmt::Error> {
    family(enc, (name, help, unit, MetricType::Counter), samples, ConstCounter::new)
}

fn gauge<'a, const N: usize, V: EncodeGaugeValue + std::fmt::Debug + Send + Sync>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L<'a, N>, V)>,
) -> Result<(), std::fmt::Error> {
    family(enc, (name, help, unit, MetricType::Gauge), samples, ConstGauge::new)
}

/// The registry owns its collectors boxed; this one reads the shared metrics.
#[derive(Debug)]
struct Shared(Arc<NetMetrics>);

impl PromCollector for Shared {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(enc)
    }
}

fn peer_labels<'a>(s: &'a Snapshot, p: &'a PodRef, c: u8) -> L<'a, 3> {
    [("namespace", p.namespace.as_str()), ("pod", p.name.as_str()), ("peer", class(&s.classes, c))]
}

fn tcp_labels<'a>(s: &'a Snapshot, p: &'a PodRef, c: u8, r: u8) -> L<'a, 4> {
    let [n, pod, peer] = peer_labels(s, p, c);
    [n, pod, peer, ("role", role(r))]
}

/// The `hearth_pod_network_*` families, through prometheus-client like every other Hearth
/// family: names, escaping and both exposition formats are its business. Cardinality:
/// pods x directions x peer classes (configured, at most a few) for traffic; pods x peer
/// classes x roles for TCP; pods x declared ports x directions for listeners.
impl PromCollector for NetMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.read();
        let s: &Snapshot = &guard;
        let e = &mut enc;
        gauge(
            e,
            "hearth_pod_network_enabled",
            "Whether a network metric family is on (1) or off (0, with the reason)",
            None,
            [("traffic", &s.status.traffic), ("tcp", &s.status.tcp)].map(|(fam, st)| match st {
                Ok(()) => ([("family", fam), ("reason", "")], 1i64),
                Err(r) => ([("family", fam), ("reason", r.as_str())], 0i64),
            }),
        )?;
        if s.status.traffic.is_ok() {
            let traffic = |get: fn(&TrafficVal) -> u64| {
                s.traffic.iter().map(move |((p, d, c), v)| {
                    (
                        [
                            ("namespace", p.namespace.as_str()),
                            ("pod", p.name.as_str()),
                            ("direction", direction(*d)),
                            ("peer", class(&s.classes, *c)),
                        ],
                        get(v),
                    )
                })
            };
            counter(
                e,
                "hearth_pod_network_bytes",
                "IP bytes (headers included) by pod, direction and peer class",
                None,
                traffic(|v| v.bytes),
            )?;
            counter(
                e,
                "hearth_pod_network_packets",
                "IP packets (a GSO/GRO batch counts once) by pod, direction and peer class",
                None,
                traffic(|v| v.packets),
            )?;
            counter(
                e,
                "hearth_pod_network_payload_bytes",
                "TCP and UDP payload bytes by pod, direction and peer class",
                None,
                traffic(|v| v.payload_bytes),
            )?;
            let ports: Vec<String> = s.listen.keys().map(|(_, port, _)| port.to_string()).collect();
            counter(
                e,
                "hearth_pod_network_listener_bytes",
                "IP bytes on declared serving ports by pod, port and direction",
                None,
                s.listen.iter().zip(&ports).map(|(((p, _, d), v), port)| {
                    (
                        [
                            ("namespace", p.namespace.as_str()),
                            ("pod", p.name.as_str()),
                            ("port", port.as_str()),
                            ("direction", direction(*d)),
                        ],
                        v.bytes,
                    )
                }),
            )?;
        }
        if s.status.tcp.is_ok() {
            let tcp = |p, c, r| tcp_labels(s, p, c, r);
            counter(
                e,
                "hearth_pod_network_tcp_connections",
                "TCP connections by pod, peer class, role and result (established or failed)",
                None,
                s.tcp.iter().flat_map(|((p, c, r), v)| {
                    let [a, b, cl, ro] = tcp(p, *c, *r);
                    [([a, b, cl, ro, ("result", "established")], v.established), ([a, b, cl, ro, ("result", "failed")], v.failed)]
                }),
            )?;
            gauge(
                e,
                "hearth_pod_network_tcp_active_connections",
                "Established TCP connections open now, by pod, peer class and role",
                None,
                s.tcp.iter().map(|((p, c, r), v)| (tcp(p, *c, *r), v.established.saturating_sub(v.closed) as i64)),
            )?;
            // Retransmits, RTOs and RTT by pod and peer class (summed over roles).
            let mut by_peer: BTreeMap<(&PodRef, u8), TcpVal> = BTreeMap::new();
            for ((p, c, _), v) in &s.tcp {
                by_peer.entry((p, *c)).or_default().add(v);
            }
            let peer = |p, c| peer_labels(s, p, c);
            counter(
                e,
                "hearth_pod_network_tcp_retransmits",
                "Retransmitted TCP segments by pod and peer class",
                None,
                by_peer.iter().map(|((p, c), v)| (peer(p, *c), v.retrans_segs)),
            )?;
            counter(
                e,
                "hearth_pod_network_tcp_rtos",
                "TCP retransmission timeouts by pod and peer class",
                None,
                by_peer.iter().map(|((p, c), v)| (peer(p, *c), v.rtos)),
            )?;
            let mut rtt = e.encode_descriptor(
                "hearth_pod_network_tcp_rtt",
                "Smoothed TCP RTT by pod and peer class, sampled at most once a second per connection (log2 buckets)",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for ((p, c), v) in &by_peer {
                // Bucket i holds RTTs below 2^(i+1) microseconds; what lies above the last
                // bound counts only in +Inf.
                let mut buckets: Vec<(f64, u64)> =
                    v.rtt.iter().take(RTT_BUCKETS).enumerate().map(|(i, n)| ((1u64 << (i + 1)) as f64 / 1e6, *n)).collect();
                let bounded: u64 = buckets.iter().map(|(_, n)| n).sum();
                buckets.push((f64::MAX, v.rtt_count.saturating_sub(bounded)));
                rtt.encode_family(&peer(p, *c))?.encode_histogram::<NoLabelSet>(v.rtt_sum_us as f64 / 1e6, v.rtt_count, &buckets, None)?;
            }
        }
        if s.status.traffic.is_err() && s.status.tcp.is_err() {
            return Ok(());
        }
        // Self-cost.
        counter(
            e,
            "hearth_pod_network_bpf_run",
            "CPU time spent in each BPF program (needs BPF stats on)",
            Some(&Unit::Seconds),
            s.costs.iter().map(|c| ([("program", c.name)], c.run_time_ns as f64 / 1e9)),
        )?;
        counter(
            e,
            "hearth_pod_network_bpf_runs",
            "Runs of each BPF program (needs BPF stats on)",
            None,
            s.costs.iter().map(|c| ([("program", c.name)], c.run_count)),
        )?;
        counter(
            e,
            "hearth_pod_network_map_update_errors",
            "Kernel map inserts refused (map full or out of memory), by map",
            None,
            [("traffic", s.kernel.traffic_full), ("tcp", s.kernel.tcp_full), ("sock_storage", s.kernel.storage)]
                .map(|(m, v)| ([("map", m)], v)),
        )?;
        counter(
            e,
            "hearth_pod_network_unattributed_bytes",
            "Bytes not attributed to a pod: no cgroup on the packet, or a cgroup outside any pod",
            None,
            [([("reason", "no_cgroup")], s.kernel.no_cgroup_bytes), ([("reason", "not_a_pod")], s.not_a_pod_bytes)],
        )?;
        counter(
            e,
            "hearth_pod_network_untracked_tcp_events",
            "TCP events on connections opened before the programs were attached",
            None,
            [([], s.kernel.no_sock_info)],
        )?;
        gauge(e, "hearth_pod_network_cgroups", "Cgroups under the attach root at the last collection", None, [([], s.cgroups as i64)])?;
        gauge(e, "hearth_pod_network_pods", "Pods with network series (deleted ones until forgotten)", None, [([], s.pods as i64)])?;
        counter(
            e,
            "hearth_pod_network_reclaimed_entries",
            "Kernel map entries of deleted cgroups removed",
            None,
            [([], s.reclaimed_entries)],
        )?;
        counter(e, "hearth_pod_network_collect_errors", "Collections that failed", None, [([], s.collect_errors)])?;
        gauge(
            e,
            "hearth_pod_network_collect",
            "Duration of the last collection",
            Some(&Unit::Seconds),
            [([], s.last_collect.as_secs_f64())],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Arc<NetMetrics>, openmetrics: bool) -> String {
        let mut r = prometheus_client::registry::Registry::default();
        m.register(&mut r);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        if openmetrics { om } else { hearth_service::http::openmetrics_to_prometheus_text(&om) }
    }

    #[test]
    fn off_families_render_their_reason_and_nothing_else() {
        let m = NetMetrics::new(FamilyStatus::off("not root: loading BPF programs needs CAP_BPF"));
        let mut out = String::new();
        out.push_str(&text(&m, false));
        assert!(
            out.contains("hearth_pod_network_enabled{family=\"traffic\",reason=\"not root: loading BPF programs needs CAP_BPF\"} 0"),
            "{out}"
        );
        assert!(out.contains("hearth_pod_network_enabled{family=\"tcp\",reason=\"not root"), "{out}");
        assert!(!out.contains("hearth_pod_network_bytes_total"), "{out}");
        assert!(!out.contains("bpf_runs_total"), "{out}");
    }

    #[test]
    fn histograms_are_cumulative_with_log2_second_bounds() {
        let m = NetMetrics::new(FamilyStatus { traffic: Ok(()), tcp: Ok(()) });
        {
            let mut s = m.0.write().unwrap();
            s.classes = vec!["internet".into(), "pods".into()];
            let mut v = TcpVal { established: 3, closed: 1, failed: 2, rtt_count: 3, rtt_sum_us: 150_000, ..Default::default() };
            v.rtt[15] = 2; // [32.768 ms, 65.536 ms)
            v.rtt[16] = 1;
            s.tcp.insert((PodRef { namespace: "ns".into(), name: "p".into() }, 1, 0), v);
        }
        let mut out = String::new();
        out.push_str(&text(&m, true));
        let l = "namespace=\"ns\",pod=\"p\",peer=\"pods\"";
        assert!(out.contains("# TYPE hearth_pod_network_tcp_connections counter"), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_connections_total{{{l},role=\"client\",result=\"failed\"}} 2")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_active_connections{{{l},role=\"client\"}} 2")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_rtt_seconds_bucket{{le=\"0.032768\",{l}}} 0")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_rtt_seconds_bucket{{le=\"0.065536\",{l}}} 2")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_rtt_seconds_bucket{{le=\"0.131072\",{l}}} 3")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_rtt_seconds_bucket{{le=\"+Inf\",{l}}} 3")), "{out}");
        assert!(out.contains(&format!("hearth_pod_network_tcp_rtt_seconds_sum{{{l}}} 0.15")), "{out}");
    }
}
