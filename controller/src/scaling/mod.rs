//! Scaling: a recommendation per model deployment from its replicas' reported load, made
//! once per `interval` by one loop, published as decisions with increasing ids, and
//! pre-warm plans that send Prefetch commands to the nodes the next replicas will want.
//!
//! The arithmetic is in [`scaler`] (pure, shared with the simulator); this module gathers
//! observations from the cluster view, asks placement for the next replica's predicted
//! time-to-ready (the lead time), and keeps what callers read and watch.

mod actuate;
pub mod scaler;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hearth_proto::v1 as pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::ModelSpec;
use crate::placement::Placement;
pub use scaler::{Observation, Reason, Recommendation, Scaler};

/// Scaling loop settings; from the `scaling:` config section.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    /// Pre-warm looks this far past the lead time.
    pub prewarm_horizon: Duration,
    /// Most Prefetch commands in flight per model.
    pub max_prewarm_per_model: usize,
    /// Lead time used when no node can take a replica now.
    pub fallback_lead_time: Duration,
    /// An external pending-request count (Recommend's `pending_requests`) counts this long.
    pub external_demand_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            prewarm_horizon: Duration::from_secs(300),
            max_prewarm_per_model: 4,
            fallback_lead_time: Duration::from_secs(120),
            external_demand_ttl: Duration::from_secs(30),
        }
    }
}

/// A change of a model's desired replica count.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Increases by one with every decision the controller makes, across models.
    pub id: u64,
    pub model: String,
    pub recommendation: Recommendation,
    pub at: SystemTime,
}

/// A Prefetch sent ahead of a predicted scale-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Prewarm {
    pub model: String,
    pub node: String,
    pub command_id: String,
    pub missing_bytes: u64,
    /// The serving image was sent too: the pre-warm settles when it is on the node as well.
    pub image: bool,
    pub issued: Instant,
    /// The bytes should be there before the scale-up the plan anticipates.
    pub deadline: Instant,
}

#[derive(Debug, Clone)]
struct Metrics {
    decisions: Family<[(&'static str, &'static str); 1], Counter>,
    desired: Family<[(&'static str, String); 1], Gauge>,
    prewarm: Family<[(&'static str, &'static str); 1], Counter>,
    runtimes: Family<[(&'static str, &'static str); 2], Counter>,
}

fn fresh_models(placement: &Placement) -> HashMap<String, ModelState> {
    placement
        .catalog()
        .iter()
        .map(|m| {
            let st = ModelState {
                scaler: Scaler::new(m.scaling.clone(), 0),
                last: None,
                latest: None,
                external: None,
                prewarms: Vec::new(),
                starts: Vec::new(),
                stops: Vec::new(),
                no_fit_logged: None,
            };
            (m.name.clone(), st)
        })
        .collect()
}

#[derive(Debug)]
struct ModelState {
    scaler: Scaler,
    last: Option<Decision>,
    latest: Option<Recommendation>,
    external: Option<(f64, Instant)>,
    prewarms: Vec<Prewarm>,
    /// Agent-managed replicas being started and stopped (`actuate`).
    starts: Vec<actuate::Start>,
    stops: Vec<actuate::Stop>,
    no_fit_logged: Option<Instant>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScalingError {
    #[error("model {0:?} is not in the controller's catalog")]
    UnknownModel(String),
    #[error("pending_requests: expected a finite number >= 0, got {0}")]
    BadDemand(f64),
}

/// The scaling engine; one per controller.
#[derive(Debug)]
pub struct Scaling {
    placement: Arc<Placement>,
    settings: Settings,
    models: Mutex<HashMap<String, ModelState>>,
    /// (term, next decision id, next pre-warm id): ids restart above `term << 32` when the
    /// leadership term changes, so they are never reused across leaders.
    ids: Mutex<(u32, u64, u64)>,
    leadership: std::sync::OnceLock<crate::leader::Leadership>,
    /// Pre-warm command ids, apart from decision ids so those stay consecutive.
    tx: broadcast::Sender<Decision>,
    metrics: Metrics,
}

/// Load of one model's replicas as the cluster view shows it.
pub fn observe(placement: &Placement, m: &ModelSpec) -> Observation {
    let key = (m.source_uri.clone(), m.revision.clone());
    let mut o = Observation::default();
    placement.state().with_runtimes_of(&m.name, &key, |_, facts| {
        for r in facts.runtimes.iter().filter(|r| r.model_id == m.name || r.model_key.as_ref() == Some(&key)) {
            o.demand += pos(r.load.requests_waiting) + pos(r.load.requests_running);
            if r.ready {
                o.ready += 1;
                o.kv_cache = o.kv_cache.max(pos(r.load.kv_cache_usage_ratio));
                let ttft = Duration::try_from_secs_f64(pos(r.load.ttft_p50_seconds)).unwrap_or_default();
                o.ttft_p50 = o.ttft_p50.max(ttft);
            }
        }
    });
    o
}

fn pos(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

impl Scaling {
    pub fn new(placement: Arc<Placement>, settings: Settings, registry: &mut Registry) -> Self {
        let metrics =
            Metrics { decisions: Family::default(), desired: Family::default(), prewarm: Family::default(), runtimes: Family::default() };
        let r = registry.sub_registry_with_prefix("hearth_controller");
        r.register("scaling_decisions", "Scaling decisions made, by reason", metrics.decisions.clone());
        r.register("desired_replicas", "Latest desired replica count per model deployment", metrics.desired.clone());
        r.register(
            "prewarm",
            "Pre-warm Prefetch plans by outcome (issued, arrived_in_time, late, send_failed; image_issued for PrefetchImage)",
            metrics.prewarm.clone(),
        );
        r.register(
            "runtime_commands",
            "StartRuntime and StopRuntime for agent-managed replicas, by action and outcome (sent, reported, failed, timeout, no_fit, needs_partition, send_failed)",
            metrics.runtimes.clone(),
        );
        let models = fresh_models(&placement);
        let (tx, _) = broadcast::channel(1024);
        Self { placement, settings, models: Mutex::new(models), ids: Mutex::new((0, 1, 1)), leadership: Default::default(), tx, metrics }
    }

    /// Takes ids from `leadership`'s term (term 0, ids from 1, without it).
    pub fn follow(&self, leadership: crate::leader::Leadership) {
        let _ = self.leadership.set(leadership);
    }

    /// The next (decision id, pre-warm id) counter pair for the current term: a new term's
    /// ids start at `term << 32`, above every id a leader of an earlier term can have issued.
    fn next_ids(&self, decision: bool) -> u64 {
        let term = self.leadership.get().map_or(0, |l| l.now().term);
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.0 != term {
            let base = u64::from(term) << 32;
            *ids = (term, base + 1, base + 1);
        }
        let slot = if decision { &mut ids.1 } else { &mut ids.2 };
        let id = *slot;
        *slot += 1;
        id
    }

    /// Starts a new leadership term: the per-model state starts over (a leader that had lost
    /// the Lease has a stale window).
    pub fn begin_term(&self) {
        *self.models() = fresh_models(&self.placement);
    }

    fn models(&self) -> std::sync::MutexGuard<'_, HashMap<String, ModelState>> {
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Decision> {
        self.tx.subscribe()
    }

    /// The latest decision per model (all models when `model` is None).
    pub fn decisions(&self, model: Option<&str>) -> Result<Vec<Decision>, ScalingError> {
        let models = self.models();
        if let Some(m) = model
            && !models.contains_key(m)
        {
            return Err(ScalingError::UnknownModel(m.to_owned()));
        }
        let mut v: Vec<Decision> =
            models.iter().filter(|(k, _)| model.is_none_or(|m| m == *k)).filter_map(|(_, s)| s.last.clone()).collect();
        v.sort_by_key(|d| d.id);
        Ok(v)
    }

    /// The latest recommendation and decision for a model; `pending` (requests queued
    /// outside any replica, e.g. at a gateway while scaled to zero) joins the demand until
    /// it is older than `external_demand_ttl`, and triggers an immediate evaluation.
    pub fn recommend(&self, model: &str, pending: Option<f64>, now: Instant) -> Result<(Recommendation, Option<Decision>), ScalingError> {
        if let Some(p) = pending
            && !(p.is_finite() && p >= 0.0)
        {
            return Err(ScalingError::BadDemand(p));
        }
        {
            let mut models = self.models();
            let st = models.get_mut(model).ok_or_else(|| ScalingError::UnknownModel(model.to_owned()))?;
            if let Some(p) = pending {
                st.external = Some((p, now));
            }
            if pending.is_none()
                && let Some(r) = &st.latest
            {
                return Ok((r.clone(), st.last.clone()));
            }
        }
        self.evaluate(model, now);
        let models = self.models();
        let st = models.get(model).ok_or_else(|| ScalingError::UnknownModel(model.to_owned()))?;
        let rec = st.latest.clone().unwrap_or_else(|| unreachable!("evaluate sets latest"));
        Ok((rec, st.last.clone()))
    }

    /// One evaluation of one model: observe, recommend with lead time, decide, pre-warm.
    pub fn evaluate(&self, model: &str, now: Instant) {
        let Some(spec) = self.placement.catalog().get(model).cloned() else { return };
        let obs = observe(&self.placement, &spec);
        // The next replica's predicted time-to-ready on its best node is the lead time.
        // Only the best few matter: the first gives the lead time, and pre-warm targets the
        // nodes the next replicas would go to.
        let scored = self.placement.score(model, None, 2 * self.settings.max_prewarm_per_model + 1, now).ok();
        let lead = scored
            .as_ref()
            .and_then(|o| o.best.first())
            .map(|s| Duration::try_from_secs_f64(s.parts.time_to_ready()).unwrap_or(self.settings.fallback_lead_time))
            .unwrap_or(self.settings.fallback_lead_time);
        let mut models = self.models();
        let Some(st) = models.get_mut(model) else { return };
        let external =
            st.external.filter(|(_, at)| now.saturating_duration_since(*at) <= self.settings.external_demand_ttl).map(|(p, _)| p);
        // Like KPA, compare against replicas that serve now, not ones still starting.
        st.scaler.set_current(obs.ready);
        st.scaler.observe(now, obs.demand + external.unwrap_or(0.0));
        let rec = st.scaler.recommend(now, &obs, lead, self.settings.prewarm_horizon);
        self.metrics.desired.get_or_create(&[("model", model.to_owned())]).set(i64::from(rec.desired));
        let changed = st.last.as_ref().is_none_or(|d| d.recommendation.desired != rec.desired);
        if changed {
            let d = Decision { id: self.next_ids(true), model: model.to_owned(), recommendation: rec.clone(), at: SystemTime::now() };
            self.metrics.decisions.get_or_create(&[("reason", rec.reason.as_str())]).inc();
            info!(
                model,
                id = d.id,
                desired = rec.desired,
                current = rec.current,
                reason = rec.reason.as_str(),
                lead_s = lead.as_secs_f64(),
                "scaling decision"
            );
            let _ = self.tx.send(d.clone());
            st.last = Some(d);
        }
        st.latest = Some(rec.clone());
        self.track_prewarms(st, &spec, now);
        if let Some(out) = scored {
            self.plan_prewarm(st, &spec, &rec, &out.best, now);
        }
        if spec.serve.agent_managed {
            self.actuate(st, &spec, &rec, now);
        }
    }

    /// Settles pre-warms whose bytes arrived (in time or late) or whose deadline passed.
    fn track_prewarms(&self, st: &mut ModelState, m: &ModelSpec, now: Instant) {
        let key = (m.source_uri.clone(), m.revision.clone());
        let placement = &self.placement;
        let metrics = &self.metrics;
        st.prewarms.retain(|p| {
            let names = [p.node.clone()];
            // Weights ready and, where the plan pulled it too, the serving image present.
            let ready = placement.state().placement_view(now, Some(&names), |_, n| {
                n.facts.models.get(&key).is_some_and(|c| c.ready) && (!p.image || n.facts.images.contains(&m.image))
            });
            let arrived = ready.first().copied().unwrap_or(false);
            if arrived {
                let outcome = if now <= p.deadline { "arrived_in_time" } else { "late" };
                metrics.prewarm.get_or_create(&[("outcome", outcome)]).inc();
                debug!(model = %p.model, node = %p.node, outcome, "pre-warm settled");
                return false;
            }
            // Keep waiting for a late arrival up to twice the deadline, then give up.
            if now > p.deadline + p.deadline.saturating_duration_since(p.issued) {
                metrics.prewarm.get_or_create(&[("outcome", "late")]).inc();
                return false;
            }
            true
        });
    }

    /// Before a predicted scale-up, sends Prefetch to the best nodes that lack the bytes.
    fn plan_prewarm(&self, st: &mut ModelState, m: &ModelSpec, rec: &Recommendation, feasible: &[crate::placement::Scored], now: Instant) {
        let extra = rec.upcoming.saturating_sub(rec.desired.max(rec.current)) as usize;
        let room = self.settings.max_prewarm_per_model.saturating_sub(st.prewarms.len());
        let want = extra.saturating_sub(st.prewarms.len()).min(room);
        if want == 0 {
            return;
        }
        let candidates: Vec<_> =
            // A pre-warm is a bet; it never pushes other models' weights out to make room.
            feasible
                .iter()
                .filter(|s| {
                    (s.parts.missing_bytes > 0 || !s.parts.image_cached)
                        && s.parts.evict_bytes == 0
                        && !st.prewarms.iter().any(|p| p.node == s.node)
                })
                .take(want)
                .collect();
        for s in candidates {
            let id = format!("prewarm-{}-{}", m.name, self.next_ids(false));
            let can_pull = self.placement.state().has_capability(&s.node, "prefetch_image");
            let (image, weights) = prewarm_commands(m, s, &id, can_pull);
            // The serving image goes first (it is usually the longer wait); the plan settles
            // when the weights and, if it was sent, the image are on the node.
            let mut image_sent = false;
            if let Some(cmd) = image {
                match self.placement.state().send_command(&s.node, cmd) {
                    Ok(()) => {
                        self.metrics.prewarm.get_or_create(&[("outcome", "image_issued")]).inc();
                        info!(model = %m.name, node = %s.node, image = %m.image, "pre-warm: image prefetch sent");
                        image_sent = true;
                    }
                    Err(e) => warn!(model = %m.name, node = %s.node, error = %e, "pre-warm: image prefetch not sent"),
                }
            }
            let prewarm = |command_id: String| Prewarm {
                model: m.name.clone(),
                node: s.node.clone(),
                command_id,
                missing_bytes: s.parts.missing_bytes,
                image: image_sent,
                issued: now,
                deadline: now + rec.lead_time + self.settings.prewarm_horizon,
            };
            let Some(cmd) = weights else {
                if image_sent {
                    st.prewarms.push(prewarm(format!("{id}-image")));
                }
                continue;
            };
            match self.placement.state().send_command(&s.node, cmd) {
                Ok(()) => {
                    self.metrics.prewarm.get_or_create(&[("outcome", "issued")]).inc();
                    info!(model = %m.name, node = %s.node, missing_bytes = s.parts.missing_bytes, "pre-warm: prefetch sent");
                    st.prewarms.push(prewarm(id));
                }
                Err(e) => {
                    self.metrics.prewarm.get_or_create(&[("outcome", "send_failed")]).inc();
                    warn!(model = %m.name, node = %s.node, error = %e, "pre-warm: prefetch not sent");
                }
            }
        }
    }

    /// Agent-managed replicas of a model being started: (runtime name, node).
    pub fn starting(&self, model: &str) -> Vec<(String, String)> {
        self.models().get(model).map(|s| s.starts.iter().map(|s| (s.name.clone(), s.node.clone())).collect()).unwrap_or_default()
    }

    /// Pre-warms in flight for a model.
    pub fn prewarms(&self, model: &str) -> Vec<Prewarm> {
        self.models().get(model).map(|s| s.prewarms.clone()).unwrap_or_default()
    }

    /// Evaluates every model once per interval until cancelled.
    /// Evaluates every model each interval while this controller leads; a standby decides
    /// nothing. Each new term starts the ids above the last leader's.
    pub async fn run(self: Arc<Self>, leadership: crate::leader::Leadership, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let names: Vec<String> = self.placement.catalog().iter().map(|m| m.name.clone()).collect();
        let mut term = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let now_term = leadership.now();
                    if !now_term.leader {
                        term = None;
                        continue;
                    }
                    if term != Some(now_term.term) {
                        // Term 0 without election: the ids the engine started with.
                        if term.is_some() || now_term.term > 0 {
                            self.begin_term();
                        }
                        term = Some(now_term.term);
                    }
                    let this = self.clone();
                    let names = names.clone();
                    // Scoring every model over every node is CPU work; keep it off the I/O threads.
                    let _ = tokio::task::spawn_blocking(move || {
                        let now = Instant::now();
                        for n in &names {
                            this.evaluate(n, now);
                        }
                    })
                    .await;
                }
            }
        }
    }
}

/// What a pre-warm sends one node: the serving image when the node lacks it and has a
/// container runtime to pull into (`can_pull_images`: its Hello says "prefetch_image"), and
/// the weights when bytes are missing. The image is tied to the weights (their source), so
/// the agent keeps it while they are cached.
pub fn prewarm_commands(
    m: &ModelSpec,
    s: &crate::placement::Scored,
    id: &str,
    can_pull_images: bool,
) -> (Option<pb::Command>, Option<pb::Command>) {
    let image = (!s.parts.image_cached && !m.image.is_empty() && can_pull_images).then(|| pb::Command {
        id: format!("{id}-image"),
        idempotency_key: format!("prewarm-image/{}/{}/{}", m.name, m.image, s.node),
        deadline: None,
        kind: Some(pb::command::Kind::PrefetchImage(pb::PrefetchImageCommand {
            reference: m.image.clone(),
            source_uri: m.source_uri.clone(),
            revision: m.revision.clone(),
        })),
    });
    let weights = (s.parts.missing_bytes > 0).then(|| pb::Command {
        id: id.to_owned(),
        idempotency_key: format!("prewarm/{}/{}/{}", m.name, m.revision, s.node),
        deadline: None,
        kind: Some(pb::command::Kind::Prefetch(pb::PrefetchCommand {
            source_uri: m.source_uri.clone(),
            revision: m.revision.clone(),
            include: vec![],
            exclude: vec![],
        })),
    });
    (image, weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DeviceRequest, ScalingSpec};
    use crate::placement::{Parts, Scored, Slot};

    fn model() -> ModelSpec {
        ModelSpec {
            serve: Default::default(),
            name: "llama".into(),
            source_uri: "s3://models/llama".into(),
            revision: "main".into(),
            bytes: 1 << 30,
            image: "vllm/vllm-openai:v0.6.3".into(),
            image_bytes: 8 << 30,
            runtime: "vllm".into(),
            device: DeviceRequest::Gpus(1),
            memory_bytes: 1 << 30,
            scaling: ScalingSpec::defaults(),
        }
    }

    fn scored(missing_bytes: u64, image_cached: bool) -> Scored {
        Scored {
            node: "n1".into(),
            parts: Parts { missing_bytes, image_cached, ..Default::default() },
            priority: 10,
            slot: Slot::Gpus(vec![0]),
        }
    }

    #[test]
    fn a_prewarm_sends_the_image_with_the_weights_to_nodes_that_can_pull_it() {
        let m = model();
        let (image, weights) = prewarm_commands(&m, &scored(5, false), "p1", true);
        let image = image.expect("the node lacks the image and can pull it");
        let Some(pb::command::Kind::PrefetchImage(i)) = &image.kind else { panic!("{image:?}") };
        assert_eq!(
            (i.reference.as_str(), i.source_uri.as_str(), i.revision.as_str()),
            ("vllm/vllm-openai:v0.6.3", "s3://models/llama", "main")
        );
        assert_eq!(image.idempotency_key, "prewarm-image/llama/vllm/vllm-openai:v0.6.3/n1");
        assert!(matches!(weights.and_then(|w| w.kind), Some(pb::command::Kind::Prefetch(_))));
        // The image alone when the weights are there; nothing when both are.
        let (image, weights) = prewarm_commands(&m, &scored(0, false), "p2", true);
        assert!(image.is_some() && weights.is_none());
        let (image, weights) = prewarm_commands(&m, &scored(0, true), "p3", true);
        assert!(image.is_none() && weights.is_none());
        // An agent without a container runtime gets the weights only.
        let (image, weights) = prewarm_commands(&m, &scored(5, false), "p4", false);
        assert!(image.is_none() && weights.is_some());
    }
}
