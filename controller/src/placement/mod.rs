//! Placement: which nodes can host a replica of a model (Filter), how good each is (Score),
//! and short leases on the devices a caller is about to use (Reserve/Release).
//!
//! Score is a predicted time-to-ready in seconds, built from what agents report: image pull
//! (0 when the node has the image) + weight bytes the node is missing / its measured
//! bandwidth from that source + reading the weights from local disk + runtime start, plus
//! three penalties in seconds: the node's current runtime load, the fragmentation the
//! placement leaves behind, and the other models' weights it would evict from a full cache. Every score carries its parts. Lower is better; priorities 0-10
//! for schedulers are relative to the best candidate.

pub mod facts;
pub mod fit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use fit::{Reject, Slot};

use crate::catalog::{Catalog, ModelSpec};
use crate::state::{ClusterState, Connection, ModelColumns, ScanNode};

/// Scoring constants; from the `placement:` config section.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Bytes/s assumed from a source a node has not measured yet.
    pub default_source_bandwidth: f64,
    /// Bytes/s a runtime reads weights from local NVMe.
    pub local_read_bandwidth: f64,
    /// Bytes/s assumed for pulling an image that is not on the node.
    pub image_pull_bandwidth: f64,
    /// Fixed runtime start cost (process, CUDA context, warm-up).
    pub runtime_start: Duration,
    /// Seconds added for a node whose runtimes are saturated (scaled by load / saturation).
    pub load_penalty: Duration,
    /// Waiting + running requests at which a node counts as saturated.
    pub load_saturation: f64,
    /// Seconds added for the worst fragmentation (scaled 0..1).
    pub fragmentation_penalty: Duration,
    /// Weights that would not fit in the node's free cache space evict others' weights; the
    /// placement pays this share of the time to fetch those bytes again.
    pub eviction_weight: f64,
    pub lease_ttl: Duration,
    pub max_lease_ttl: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            default_source_bandwidth: 200e6,
            local_read_bandwidth: 2e9,
            image_pull_bandwidth: 100e6,
            runtime_start: Duration::from_secs(20),
            load_penalty: Duration::from_secs(30),
            load_saturation: 64.0,
            fragmentation_penalty: Duration::from_secs(10),
            eviction_weight: 0.5,
            lease_ttl: Duration::from_secs(60),
            max_lease_ttl: Duration::from_secs(600),
        }
    }
}

/// A score and why.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parts {
    pub image_pull_s: f64,
    pub download_s: f64,
    pub local_load_s: f64,
    pub runtime_start_s: f64,
    pub load_penalty_s: f64,
    pub fragmentation_penalty_s: f64,
    pub eviction_penalty_s: f64,
    pub missing_bytes: u64,
    /// Bytes of other cached weights the missing bytes would push out of the node's cache.
    pub evict_bytes: u64,
    pub bandwidth: f64,
    /// The bandwidth was measured by the node, not the default.
    pub bandwidth_measured: bool,
    /// `runtime_start_s` was measured on the node for this model.
    pub runtime_start_measured: bool,
    pub image_cached: bool,
}

impl Parts {
    /// Predicted seconds until a replica here serves.
    pub fn time_to_ready(&self) -> f64 {
        self.image_pull_s + self.download_s + self.local_load_s + self.runtime_start_s
    }

    pub fn total(&self) -> f64 {
        self.time_to_ready() + self.load_penalty_s + self.fragmentation_penalty_s + self.eviction_penalty_s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub node: String,
    pub parts: Parts,
    /// 0-10, 10 for the best candidate (scheduler extender priority).
    pub priority: u8,
    pub slot: Slot,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub node: String,
    pub reason: Reject,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct FilterOutcome {
    pub feasible: Vec<Scored>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("model {0:?} is not in the controller's catalog")]
    UnknownModel(String),
    #[error("no node can host {model} ({request}) now: {summary}")]
    NoFit { model: String, request: String, summary: String },
    #[error("request id {id:?} already holds a lease for model {model:?} on node {node:?}; use a new id for a different request")]
    Conflict { id: String, model: String, node: String },
    #[error("{0}")]
    Invalid(String),
}

/// A granted reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub request_id: String,
    pub model: String,
    pub node: String,
    pub slot: Slot,
    pub memory_bytes: u64,
    pub granted: SystemTime,
    pub expires: Instant,
    pub expires_at: SystemTime,
    pub parts: Parts,
}

#[derive(Debug, Default)]
struct Leases {
    by_id: HashMap<String, Lease>,
    by_node: HashMap<String, Vec<String>>,
}

impl Leases {
    fn sweep(&mut self, now: Instant) -> usize {
        let before = self.by_id.len();
        let by_node = &mut self.by_node;
        self.by_id.retain(|id, l| {
            let keep = l.expires > now;
            if !keep && let Some(v) = by_node.get_mut(&l.node) {
                v.retain(|x| x != id);
            }
            keep
        });
        self.by_node.retain(|_, v| !v.is_empty());
        before - self.by_id.len()
    }

    fn on_node(&self, node: &str, now: Instant) -> (Vec<&Slot>, u64) {
        let mut slots = Vec::new();
        if self.by_node.is_empty() {
            return (slots, 0);
        }
        let mut mem = 0;
        for id in self.by_node.get(node).map(Vec::as_slice).unwrap_or_default() {
            if let Some(l) = self.by_id.get(id).filter(|l| l.expires > now) {
                slots.push(&l.slot);
                mem += l.memory_bytes;
            }
        }
        (slots, mem)
    }

    fn remove(&mut self, id: &str) -> Option<Lease> {
        let l = self.by_id.remove(id)?;
        if let Some(v) = self.by_node.get_mut(&l.node) {
            v.retain(|x| x != id);
            if v.is_empty() {
                self.by_node.remove(&l.node);
            }
        }
        Some(l)
    }
}

/// The placement engine over the live cluster view.
#[derive(Debug)]
pub struct Placement {
    state: Arc<ClusterState>,
    catalog: Arc<Catalog>,
    params: Params,
    leases: Mutex<Leases>,
}

/// The score parts of `m` on one node, from the node's row and the model's index entries.
fn parts(n: &ScanNode<'_>, cols: &ModelColumns<'_>, m: &ModelSpec, p: &Params, fragmentation: f64) -> Parts {
    let present = cols.cached(n.row).present.min(m.bytes);
    let missing = m.bytes - present;
    let (bandwidth, measured) = match cols.bandwidth(n.row) {
        Some(b) => (b, true),
        None => (p.default_source_bandwidth, false),
    };
    let image_cached = cols.image_cached(n.row);
    let (runtime_start_s, runtime_start_measured) = match cols.start(n.row) {
        Some(s) => (s, true),
        None => (p.runtime_start.as_secs_f64(), false),
    };
    let load = (n.hot.requests / p.load_saturation).min(1.0).max(n.hot.kv_cache.min(1.0) * 0.5);
    let evict = missing.saturating_sub(n.hot.cache_free);
    Parts {
        // The node's own measured pull rate from that registry where it has pulled from it.
        image_pull_s: if image_cached {
            0.0
        } else {
            m.image_bytes as f64 / cols.image_bandwidth(n.row).filter(|b| *b > 0.0).unwrap_or(p.image_pull_bandwidth)
        },
        download_s: missing as f64 / bandwidth,
        local_load_s: m.bytes as f64 / p.local_read_bandwidth,
        runtime_start_s,
        load_penalty_s: load * p.load_penalty.as_secs_f64(),
        fragmentation_penalty_s: fragmentation * p.fragmentation_penalty.as_secs_f64(),
        eviction_penalty_s: p.eviction_weight * evict as f64 / bandwidth,
        missing_bytes: missing,
        evict_bytes: evict,
        bandwidth,
        bandwidth_measured: measured,
        runtime_start_measured,
        image_cached,
    }
}

/// Feasible candidates best first: by total, then by name so equal scores are stable.
fn best_first(a: &Scored, b: &Scored) -> std::cmp::Ordering {
    a.parts.total().total_cmp(&b.parts.total()).then_with(|| a.node.cmp(&b.node))
}

/// Above this many kept candidates a full sort beats the linear scan of `keep_best`.
const KEEP_BEST_MAX: usize = 64;

/// What one evaluation keeps.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// Every feasible candidate and every rejection with its reason (Filter, error messages).
    All,
    /// The k best feasible candidates; rejections only counted.
    Best(usize),
    /// Every feasible candidate, in scan order; rejections only counted (Score without a
    /// small limit, which ranks them anyway).
    Feasible,
}

#[derive(Debug, Default)]
struct Evaluated {
    feasible: Vec<Scored>,
    rejected: Vec<Rejected>,
    rejected_count: usize,
    /// `keep_best`'s memory of its worst kept candidate.
    worst: Option<usize>,
}

/// Keeps `kept` at the k best candidates seen so far (unordered), in `best_first`'s order
/// whatever order the candidates arrive in. `worst` remembers which kept one is worst, so a
/// candidate that cannot get in (most of them, on a large cluster) costs one comparison.
fn keep_best(kept: &mut Vec<Scored>, worst: &mut Option<usize>, k: usize, node: &str, parts: Parts, slot: Slot) {
    if kept.len() < k {
        kept.push(Scored { node: node.to_owned(), parts, priority: 0, slot });
        *worst = None;
        return;
    }
    // k >= 1 here (Keep::Best is only used for a limit of 1 or more), so `kept` is not empty.
    let w = *worst.get_or_insert_with(|| kept.iter().enumerate().max_by(|a, b| best_first(a.1, b.1)).map_or(0, |(w, _)| w));
    let Some(old) = kept.get(w) else { return };
    if parts.total().total_cmp(&old.parts.total()).then_with(|| node.cmp(&old.node)).is_lt() {
        kept[w] = Scored { node: node.to_owned(), parts, priority: 0, slot };
        *worst = None;
    }
}

/// Score's answer: the best candidates, best first, and how many nodes were rejected.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScoreOutcome {
    pub best: Vec<Scored>,
    pub rejected: usize,
}

/// 0-10 relative to the best total: the best gets 10, one twice as slow 5.
fn assign_priorities(scored: &mut [Scored]) {
    let best = scored.iter().map(|s| s.parts.total()).fold(f64::INFINITY, f64::min);
    for s in scored.iter_mut() {
        let t = s.parts.total();
        s.priority = if t <= 0.0 || !best.is_finite() { 10 } else { (10.0 * best / t).round().clamp(0.0, 10.0) as u8 };
    }
}

impl Placement {
    pub fn new(state: Arc<ClusterState>, catalog: Arc<Catalog>, params: Params) -> Self {
        Self { state, catalog, params, leases: Mutex::default() }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn model(&self, name: &str) -> Result<&Arc<ModelSpec>, PlacementError> {
        self.catalog.get(name).ok_or_else(|| PlacementError::UnknownModel(name.to_owned()))
    }

    fn evaluate(&self, m: &ModelSpec, names: Option<&[String]>, leases: &Leases, now: Instant, keep: Keep) -> Evaluated {
        let key = (m.source_uri.clone(), m.revision.clone());
        let mut out = Evaluated::default();
        self.state.placement_scan(now, names, (&key, &m.image, &m.source_uri, &m.name), |n, cols| {
            let verdict = if !n.known {
                Err(Reject::Unknown)
            } else if n.connection != Connection::Connected {
                Err(Reject::NotConnected(n.connection.as_str()))
            } else if !n.has_report {
                Err(Reject::NoReport)
            } else {
                let (held, mem) = leases.on_node(n.name, now);
                fit::fit_with(n.hot, n.facts, m, &held, mem)
            };
            match (verdict, keep) {
                (Ok(f), Keep::All | Keep::Feasible) => out.feasible.push(Scored {
                    node: n.name.to_owned(),
                    parts: parts(&n, cols, m, &self.params, f.fragmentation),
                    priority: 0,
                    slot: f.slot,
                }),
                (Ok(f), Keep::Best(k)) => {
                    keep_best(&mut out.feasible, &mut out.worst, k, n.name, parts(&n, cols, m, &self.params, f.fragmentation), f.slot)
                }
                (Err(reason), Keep::All) => {
                    out.rejected_count += 1;
                    out.rejected.push(Rejected { node: n.name.to_owned(), reason });
                }
                (Err(_), Keep::Best(_) | Keep::Feasible) => out.rejected_count += 1,
            }
        });
        if names.is_none() && matches!(keep, Keep::All) {
            // The scan walks the index, not names: whole-cluster answers list nodes by name.
            out.feasible.sort_by(|a, b| a.node.cmp(&b.node));
            out.rejected.sort_by(|a, b| a.node.cmp(&b.node));
        }
        assign_priorities(&mut out.feasible);
        out
    }

    /// Every candidate (all nodes, or `names`) with its score or its reason for not fitting.
    pub fn filter(&self, model: &str, names: Option<&[String]>, now: Instant) -> Result<FilterOutcome, PlacementError> {
        let m = self.model(model)?;
        let mut leases = self.leases();
        leases.sweep(now);
        let e = self.evaluate(m, names, &leases, now, Keep::All);
        Ok(FilterOutcome { feasible: e.feasible, rejected: e.rejected })
    }

    /// The `limit` best feasible candidates (all of them for 0), best first, and how many
    /// were rejected. Only the kept candidates are built, so asking a 5,000-node cluster for
    /// its 10 best costs one pass and no sort of the rest. None feasible is
    /// FailedPrecondition-shaped: NoFit with a summary of why, by reason.
    pub fn score(&self, model: &str, names: Option<&[String]>, limit: usize, now: Instant) -> Result<ScoreOutcome, PlacementError> {
        let m = self.model(model)?;
        let leases = self.leases();
        let keep = if limit == 0 || limit > KEEP_BEST_MAX { Keep::Feasible } else { Keep::Best(limit) };
        let mut e = self.evaluate(m, names, &leases, now, keep);
        if e.feasible.is_empty() {
            // The rare path: evaluate again, keeping every reason for the message.
            let all = self.evaluate(m, names, &leases, now, Keep::All);
            return Err(no_fit(m, &all.rejected));
        }
        // Node names are unique, so best_first is a total order and an unstable sort gives
        // the same answer as a stable one, with fewer moves of these wide records.
        e.feasible.sort_unstable_by(best_first);
        if limit > 0 {
            e.feasible.truncate(limit);
        }
        Ok(ScoreOutcome { best: e.feasible, rejected: e.rejected_count })
    }

    /// Reserves devices for `request_id` on `node` (or the best node) for `ttl` (the default
    /// when None). The same id with the same model and node (or no node) gets the same lease
    /// back; the same id for something else is a conflict.
    pub fn reserve(
        &self,
        request_id: &str,
        model: &str,
        node: Option<&str>,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Lease, PlacementError> {
        if request_id.is_empty() || request_id.len() > 253 {
            return Err(PlacementError::Invalid(format!("request_id: expected 1-253 characters, got {} characters", request_id.len())));
        }
        let ttl = ttl.unwrap_or(self.params.lease_ttl);
        if ttl.is_zero() || ttl > self.params.max_lease_ttl {
            return Err(PlacementError::Invalid(format!("ttl: expected above 0 and at most {:?}, got {ttl:?}", self.params.max_lease_ttl)));
        }
        let m = self.model(model)?;
        let mut leases = self.leases();
        leases.sweep(now);
        if let Some(l) = leases.by_id.get(request_id) {
            if l.model == model && node.is_none_or(|n| n == l.node) {
                return Ok(l.clone());
            }
            return Err(PlacementError::Conflict { id: request_id.to_owned(), model: l.model.clone(), node: l.node.clone() });
        }
        let names: Option<Vec<String>> = node.map(|n| vec![n.to_owned()]);
        let Some(best) = self.evaluate(m, names.as_deref(), &leases, now, Keep::Best(1)).feasible.pop() else {
            return Err(no_fit(m, &self.evaluate(m, names.as_deref(), &leases, now, Keep::All).rejected));
        };
        let lease = Lease {
            request_id: request_id.to_owned(),
            model: model.to_owned(),
            node: best.node.clone(),
            slot: best.slot,
            memory_bytes: m.memory_bytes,
            granted: SystemTime::now(),
            expires: now + ttl,
            expires_at: SystemTime::now() + ttl,
            parts: best.parts,
        };
        leases.by_node.entry(lease.node.clone()).or_default().push(request_id.to_owned());
        leases.by_id.insert(request_id.to_owned(), lease.clone());
        Ok(lease)
    }

    /// Ends a lease. Unknown or expired ids are not an error (a retried Release, or one that
    /// came after the TTL): returns whether a live lease was released.
    pub fn release(&self, request_id: &str, now: Instant) -> bool {
        let mut leases = self.leases();
        leases.sweep(now);
        leases.remove(request_id).is_some()
    }

    /// Live leases, for metrics and the simulator.
    pub fn lease_count(&self, now: Instant) -> usize {
        let mut leases = self.leases();
        leases.sweep(now);
        leases.by_id.len()
    }
}

fn no_fit(m: &ModelSpec, rejected: &[Rejected]) -> PlacementError {
    let mut by: Vec<(&'static str, usize, String)> = Vec::new();
    for r in rejected {
        match by.iter_mut().find(|(c, _, _)| *c == r.reason.code()) {
            Some(e) => e.1 += 1,
            None => by.push((r.reason.code(), 1, format!("{} ({})", r.reason, r.node))),
        }
    }
    by.sort_by_key(|b| std::cmp::Reverse(b.1));
    let summary = if by.is_empty() {
        "no node reports to the controller".to_owned()
    } else {
        by.iter().map(|(c, n, example)| format!("{n} node(s) {c}, e.g. {example}")).collect::<Vec<_>>().join("; ")
    };
    PlacementError::NoFit { model: m.name.clone(), request: m.device.to_string(), summary }
}

#[cfg(test)]
mod tests;
