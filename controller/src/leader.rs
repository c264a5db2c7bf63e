//! Leader election with a coordination.k8s.io Lease, so the chart can run two controller
//! replicas: only the leader serves agents, makes scaling decisions and issues commands; a
//! standby refuses every API but health and reflection with UNAVAILABLE, which sends agents
//! back through the Service, whose selector follows the `hearth.dev/leader` label the
//! leader puts on its own pod.
//!
//! The rules are client-go's: the holder renews every `retry_period`; a candidate takes
//! over a Lease whose record it has seen unchanged for the Lease's duration, measured on
//! its own clock (never comparing clocks across machines); every write is guarded by the
//! Lease's resourceVersion, so two candidates cannot both win (the loser gets 409). A
//! leader that cannot renew within `renew_deadline` (shorter than the Lease duration)
//! stops acting at once, before anyone else may take over.
//!
//! Each acquisition, including this process re-acquiring after a restart, increments
//! `leaseTransitions`; that number is the leadership term, and decision ids carry it in
//! their high 32 bits, so ids are never reused across leaders.

use std::time::{Duration, Instant};

use hearth_service::kube::{KubeError, KubeSource, api_error, within};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Every Kubernetes API call the controller makes, as RBAC rules (API group, resource,
/// verbs), all in its own namespace. The chart's Role is tested against this list.
pub const API_RULES: &[(&str, &str, &[&str])] = &[
    // Acquire, renew and take over the Lease (optimistic concurrency on resourceVersion).
    ("coordination.k8s.io", "leases", &["get", "create", "update"]),
    // The leader label on the controller's own pod, which the Services select.
    ("", "pods", &["patch"]),
];

pub const FIELD_MANAGER: &str = "hearth-controller";
/// The label the agent, extender and KEDA Services select on.
pub const LEADER_LABEL: &str = "hearth.dev/leader";
const ROLE: &str = "controller's Role";

/// Leader election settings, validated from `leader_election:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub source: KubeSource,
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// The pod to label `hearth.dev/leader` (this controller's), when set.
    pub pod: Option<String>,
}

/// Where this controller stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub leader: bool,
    /// The Lease's `leaseTransitions` when this process last acquired it (0 without
    /// election).
    pub term: u32,
}

/// A view of leadership that every part of the controller can hold.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<Term>,
    /// Without election the sender lives as long as any view, so `changed()` waits
    /// instead of failing.
    _always: Option<std::sync::Arc<watch::Sender<Term>>>,
}

impl Leadership {
    /// A controller without election: always the leader, term 0.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(Term { leader: true, term: 0 });
        Self { rx, _always: Some(std::sync::Arc::new(tx)) }
    }

    pub fn channel() -> (watch::Sender<Term>, Self) {
        let (tx, rx) = watch::channel(Term { leader: false, term: 0 });
        (tx, Self { rx, _always: None })
    }

    pub fn now(&self) -> Term {
        *self.rx.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.rx.borrow().leader
    }

    /// Resolves when this controller is no longer the leader of the term it is in now (at
    /// once if it is not leading).
    pub async fn lost(&self) {
        let mut rx = self.rx.clone();
        let term = *rx.borrow_and_update();
        if !term.leader {
            return;
        }
        while rx.changed().await.is_ok() {
            if *rx.borrow_and_update() != term {
                return;
            }
        }
        std::future::pending::<()>().await;
    }

    /// Resolves when this controller leads (at once if it does), with the term.
    pub async fn acquired(&self) -> Term {
        let mut rx = self.rx.clone();
        loop {
            let t = *rx.borrow_and_update();
            if t.leader {
                return t;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

enum Outcome {
    Leading {
        term: u32,
    },
    Following {
        holder: String,
    },
    /// A write lost a race (409): look again next round; a leader keeps acting until its
    /// renew deadline.
    Raced,
}

/// One election: the Lease API, and what this candidate has seen of the record.
struct Candidate {
    api: kube::Api<Lease>,
    s: Settings,
    /// The record's resourceVersion and when this candidate first saw it.
    observed: Option<(String, Instant)>,
    /// Set once this process holds the Lease; a restart (same identity) acquires anew.
    holding: bool,
}

impl Candidate {
    fn what(&self, verb: &str) -> String {
        format!("{verb} lease {}/{}", self.s.namespace, self.s.lease_name)
    }

    fn call_timeout(&self) -> Duration {
        (self.s.renew_deadline / 2).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(now_micro)),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Outcome, KubeError> {
        let t = self.call_timeout();
        let name = self.s.lease_name.clone();
        let what = self.what("get");
        let got = within(&what, t, async { self.api.get_opt(&name).await.map_err(|e| api_error(&what, "get", "leases", ROLE, e)) }).await?;
        let Some(mut lease) = got else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            let what = self.what("create");
            return match within(&what, t, async {
                self.api.create(&PostParams::default(), &lease).await.map_err(|e| api_error(&what, "create", "leases", ROLE, e))
            })
            .await
            {
                Ok(_) => {
                    self.holding = true;
                    Ok(Outcome::Leading { term: 0 })
                }
                // Someone created it first: look again next round.
                Err(e) if e.is_conflict() => Ok(Outcome::Raced),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        let take = if holder == self.s.identity && self.holding {
            // Renew: same term.
            lease.spec = Some(self.spec(transitions, spec.acquire_time.clone()));
            false
        } else if holder.is_empty() || holder == self.s.identity {
            // Released, or held by this identity before a restart: a new term.
            true
        } else {
            // Someone else holds it: whatever this process held before is gone.
            self.holding = false;
            match &self.observed {
                Some((seen, since)) if *seen == rv => {
                    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
                    if now.duration_since(*since) < duration {
                        return Ok(Outcome::Following { holder });
                    }
                    true
                }
                _ => {
                    self.observed = Some((rv, now));
                    return Ok(Outcome::Following { holder });
                }
            }
        };
        if take {
            lease.spec = Some(self.spec(transitions.saturating_add(1), None));
        }
        let what = self.what("update");
        let r = within(&what, t, async {
            self.api.replace(&name, &PostParams::default(), &lease).await.map_err(|e| api_error(&what, "update", "leases", ROLE, e))
        })
        .await;
        match r {
            Ok(l) => {
                self.holding = true;
                self.observed = None;
                Ok(Outcome::Leading { term: l.spec.and_then(|s| s.lease_transitions).unwrap_or(0).max(0) as u32 })
            }
            // The record changed under us: someone renewed or won. Look again next round
            // (a holder keeps its term if the record still names it).
            Err(e) if e.is_conflict() => Ok(Outcome::Raced),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up on a clean stop, so the standby takes over within one retry
    /// period instead of a Lease duration.
    async fn release(&mut self) {
        let name = self.s.lease_name.clone();
        let what = self.what("release");
        let t = self.call_timeout();
        let r = within(&what, t, async {
            let Some(mut lease) = self.api.get_opt(&name).await.map_err(|e| api_error(&what, "get", "leases", ROLE, e))? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
            if spec.holder_identity.as_deref() != Some(self.s.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now_micro());
            self.api
                .replace(&name, &PostParams::default(), &lease)
                .await
                .map(drop)
                .map_err(|e| api_error(&what, "update", "leases", ROLE, e))
        })
        .await;
        match r {
            Ok(()) => info!(lease = %name, "leadership released"),
            Err(e) => warn!(error = %e, "could not release the Lease; the standby takes over when it expires"),
        }
    }
}

/// Sets `hearth.dev/leader` on this controller's pod (server-side apply, this manager's
/// field only).
async fn label_pod(client: &kube::Client, s: &Settings, leader: bool) -> Result<(), KubeError> {
    let Some(pod) = &s.pod else { return Ok(()) };
    let what = format!("label pod {}/{pod} {LEADER_LABEL}={leader}", s.namespace);
    let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &s.namespace);
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": pod, "labels": { LEADER_LABEL: leader.to_string() } },
    });
    within(&what, Duration::from_secs(10), async {
        api.patch(pod, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .map(drop)
            .map_err(|e| api_error(&what, "patch", "pods", ROLE, e))
    })
    .await
}

/// Runs the election until `shutdown`, publishing where this controller stands on `tx`.
pub async fn run(client: kube::Client, s: Settings, tx: watch::Sender<Term>, metrics: Metrics, shutdown: CancellationToken) {
    if let Err(e) = label_pod(&client, &s, false).await {
        warn!(error = %e, "cannot label this controller's pod; Services that select the leader will not find it");
    }
    let mut c = Candidate { api: kube::Api::namespaced(client.clone(), &s.namespace), s: s.clone(), observed: None, holding: false };
    let mut last_renew: Option<Instant> = None;
    let mut failing = false;
    let mut following: Option<String> = None;
    loop {
        let started = Instant::now();
        let outcome = c.try_acquire_or_renew().await;
        let leading = tx.borrow().leader;
        let held_term = tx.borrow().term;
        match outcome {
            Ok(Outcome::Leading { term }) => {
                last_renew = Some(started);
                failing = false;
                following = None;
                if !leading || held_term != term {
                    info!(identity = %s.identity, term, lease = %s.lease_name, "became the leader");
                    metrics.transitions.inc();
                    tx.send_replace(Term { leader: true, term });
                    metrics.leader.set(1);
                    if let Err(e) = label_pod(&client, &s, true).await {
                        warn!(error = %e, "cannot label this controller's pod as the leader; agents reach it only through a standby's refusal");
                    }
                }
            }
            Ok(Outcome::Following { holder }) => {
                failing = false;
                if leading {
                    step_down(&client, &s, &tx, &metrics, &format!("the Lease is held by {holder}")).await;
                    c.holding = false;
                }
                if following.as_deref() != Some(holder.as_str()) {
                    info!(leader = %holder, "following");
                    following = Some(holder);
                }
            }
            Ok(Outcome::Raced) => {
                if leading && last_renew.is_none_or(|t| t.elapsed() >= s.renew_deadline) {
                    step_down(&client, &s, &tx, &metrics, "could not renew the Lease within renew_deadline").await;
                    c.holding = false;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "leader election: cannot reach the Lease");
                }
                failing = true;
                if leading && last_renew.is_none_or(|t| t.elapsed() >= s.renew_deadline) {
                    step_down(&client, &s, &tx, &metrics, "could not renew the Lease within renew_deadline").await;
                    c.holding = false;
                }
            }
        }
        // A leader that has not renewed within the deadline stops at once, even while the
        // call that would tell it so is still hanging.
        let wait = if tx.borrow().leader {
            let left = s.renew_deadline.saturating_sub(last_renew.map_or(Duration::ZERO, |t| t.elapsed()));
            s.retry_period.min(left)
        } else {
            s.retry_period
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let last = *tx.borrow();
    if last.leader {
        tx.send_replace(Term { leader: false, term: last.term });
        metrics.leader.set(0);
        c.release().await;
        let _ = label_pod(&client, &s, false).await;
    }
}

async fn step_down(client: &kube::Client, s: &Settings, tx: &watch::Sender<Term>, metrics: &Metrics, why: &str) {
    warn!(reason = why, "no longer the leader: stopped serving agents and deciding");
    let term = tx.borrow().term;
    tx.send_replace(Term { leader: false, term });
    metrics.leader.set(0);
    if let Err(e) = label_pod(client, s, false).await {
        warn!(error = %e, "cannot take the leader label off this controller's pod");
    }
}

/// `hearth_controller_leader` and `hearth_controller_leader_transitions_total`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub leader: prometheus_client::metrics::gauge::Gauge,
    pub transitions: prometheus_client::metrics::counter::Counter,
}

impl Metrics {
    pub fn register(r: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        r.register("hearth_controller_leader", "1 while this controller is the leader", m.leader.clone());
        r.register("hearth_controller_leader_transitions", "Times this controller became the leader", m.transitions.clone());
        m
    }
}

/// Starts the election task, or says "always the leader" when election is off.
pub async fn start(
    settings: Option<Settings>,
    registry: &mut prometheus_client::registry::Registry,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<Leadership, KubeError> {
    let metrics = Metrics::register(registry);
    let Some(s) = settings else {
        metrics.leader.set(1);
        return Ok(Leadership::always());
    };
    let client = hearth_service::kube::client(&s.source).await?;
    let (tx, leadership) = Leadership::channel();
    info!(identity = %s.identity, lease = %format!("{}/{}", s.namespace, s.lease_name), "leader election on");
    tasks.spawn(tracing::Instrument::instrument(run(client, s, tx, metrics, shutdown), tracing::info_span!("leader_election")));
    Ok(leadership)
}
