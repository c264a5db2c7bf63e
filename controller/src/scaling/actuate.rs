//! Agent-managed replicas (`managed_by: agent` in the catalog): the controller carries out
//! its own scaling decisions. Below the desired count it reserves a slot through placement
//! (a lease: two decisions cannot take one partition) and sends StartRuntime to that node,
//! naming the partition and the weights' source; the lease holds the devices until the
//! node reports the runtime on them, then goes. Above it, it sends StopRuntime to the
//! replicas it started, least useful first (not ready, then least loaded). Replicas started
//! some other way (an agent's config) count toward the total but are never stopped here.
//!
//! Replica names are `<model>-<id>`, the id from the scaling engine's counter, which moves
//! to a new range with each leadership term: a new leader recognises (and may stop) what an
//! earlier one started, and never reuses a name.

use std::time::{Duration, Instant};

use hearth_proto::v1 as pb;
use tracing::{info, warn};

use super::{ModelState, Recommendation, Scaling};
use crate::catalog::ModelSpec;
use crate::placement::Slot;

/// At most this many starts per model per evaluation: a burst still fills in a few ticks.
const MAX_STARTS_PER_TICK: usize = 4;
/// How long a start's lease holds its devices before the node reports the runtime.
const START_LEASE: Duration = Duration::from_secs(120);
/// A stop not seen through after this long is forgotten (the node may be gone).
const STOP_PATIENCE: Duration = Duration::from_secs(600);

/// A replica being started.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub name: String,
    pub node: String,
    pub command_id: String,
    pub issued: Instant,
}

/// A replica being stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Stop {
    pub name: String,
    pub node: String,
    pub command_id: String,
    pub issued: Instant,
}

/// One reported runtime of the model.
#[derive(Debug, Clone)]
struct Replica {
    node: String,
    name: String,
    ready: bool,
    live: bool,
    ours: bool,
    load: f64,
}

/// The replica-name prefix of a model: its name as a DNS label part.
pub fn prefix(model: &str) -> String {
    let mut p: String = model.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    p.truncate(46);
    format!("{}-", p.trim_end_matches('-'))
}

/// Whether `name` is a replica the controller started for a model with this prefix.
fn started_here(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|id| !id.is_empty() && id.len() <= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Scaling {
    fn replicas(&self, m: &ModelSpec) -> Vec<Replica> {
        let key = (m.source_uri.clone(), m.revision.clone());
        let prefix = prefix(&m.name);
        let mut out = Vec::new();
        self.placement.state().with_runtimes_of(&m.name, &key, |node, facts| {
            for r in facts.runtimes.iter().filter(|r| r.model_id == m.name || r.model_key.as_ref() == Some(&key)) {
                out.push(Replica {
                    node: node.to_owned(),
                    name: r.name.clone(),
                    ready: r.ready,
                    live: r.live,
                    ours: r.agent_managed && started_here(&prefix, &r.name),
                    load: r.load.requests_running.max(0.0) + r.load.requests_waiting.max(0.0),
                });
            }
        });
        out
    }

    /// The partition a slot names on its node: GPU UUIDs, or the MIG instance's.
    fn partition_of(&self, node: &str, slot: &Slot, now: Instant) -> Result<String, &'static str> {
        match slot {
            Slot::MigExisting { uuid, .. } => Ok(uuid.clone()),
            Slot::Gpus(idx) => {
                let names = [node.to_owned()];
                let uuids = self.placement.state().placement_view(now, Some(&names), |_, n| {
                    idx.iter().filter_map(|i| n.facts.gpus.iter().find(|g| g.index == *i).map(|g| g.uuid.clone())).collect::<Vec<_>>()
                });
                match uuids.into_iter().next() {
                    Some(u) if u.len() == idx.len() => Ok(u.join(",")),
                    _ => Err("node_changed"),
                }
            }
            // The agent binds it with NEURON_RT_VISIBLE_CORES (node-wide core indices).
            Slot::NeuronCores { start, count } => Ok(format!("neuroncores:{start}-{}", start + count.saturating_sub(1))),
            // A new MIG instance is the partition reconciler's to create (ApplyPartition).
            Slot::MigCreate { .. } => Err("needs_partition"),
        }
    }

    fn count(&self, action: &'static str, outcome: &'static str) {
        self.metrics.runtimes.get_or_create(&[("action", action), ("outcome", outcome)]).inc();
    }

    /// Settles what is in flight, then starts or stops replicas toward `rec.desired`.
    pub(super) fn actuate(&self, st: &mut ModelState, m: &ModelSpec, rec: &Recommendation, now: Instant) {
        let replicas = self.replicas(m);
        let state = self.placement.state().clone();
        // Starts: done once the node reports the runtime (its partition is then busy in the
        // report, so the lease can go), or refused, or never heard of within the lease.
        st.starts.retain(|s| {
            let seen = replicas.iter().any(|r| r.node == s.node && r.name == s.name);
            let outcome = state.outcome(&s.command_id);
            let failed = outcome.as_ref().filter(|o| o.phase != pb::command_status::Phase::Succeeded);
            let expired = now.saturating_duration_since(s.issued) > START_LEASE;
            if seen || failed.is_some() || expired {
                self.placement.release(&s.name, now);
            }
            if let Some(o) = failed {
                warn!(model = %m.name, node = %s.node, runtime = %s.name, reason = %o.message, "replica start refused or failed");
                self.count("start", "failed");
                return false;
            }
            if seen {
                self.count("start", "reported");
                return false;
            }
            if expired {
                warn!(model = %m.name, node = %s.node, runtime = %s.name, "replica start not reported within {START_LEASE:?}; lease released");
                self.count("start", "timeout");
                return false;
            }
            true
        });
        st.stops.retain(|s| {
            let present = replicas.iter().any(|r| r.node == s.node && r.name == s.name);
            present && state.outcome(&s.command_id).is_none() && now.saturating_duration_since(s.issued) < STOP_PATIENCE
        });
        let stopping = |r: &Replica| st.stops.iter().any(|s| s.node == r.node && s.name == r.name);
        let have = replicas.iter().filter(|r| r.live && !stopping(r)).count() + st.starts.len();
        let want = rec.desired as usize;
        if want > have {
            for _ in 0..(want - have).min(MAX_STARTS_PER_TICK) {
                if !self.start_one(st, m, now) {
                    break;
                }
            }
        } else if have > want {
            // Least useful first: not ready yet, then the least loaded.
            let mut victims: Vec<&Replica> = replicas.iter().filter(|r| r.ours && r.live && !stopping(r)).collect();
            victims.sort_by(|a, b| a.ready.cmp(&b.ready).then(a.load.total_cmp(&b.load)).then(a.name.cmp(&b.name)));
            for r in victims.into_iter().take(have - want) {
                let id = format!("stop-{}", r.name);
                let cmd = pb::Command {
                    id: id.clone(),
                    idempotency_key: format!("stop/{}", r.name),
                    deadline: None,
                    kind: Some(pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: r.name.clone() })),
                };
                match state.send_command(&r.node, cmd) {
                    Ok(()) => {
                        info!(model = %m.name, node = %r.node, runtime = %r.name, desired = want, "stopping a replica");
                        self.count("stop", "sent");
                        st.stops.push(Stop { name: r.name.clone(), node: r.node.clone(), command_id: id, issued: now });
                    }
                    Err(e) => {
                        warn!(model = %m.name, node = %r.node, runtime = %r.name, error = %e, "stop not sent");
                        self.count("stop", "send_failed");
                    }
                }
            }
        }
    }

    /// Reserves a slot and sends StartRuntime there; false when nothing more can start now.
    fn start_one(&self, st: &mut ModelState, m: &ModelSpec, now: Instant) -> bool {
        let name = format!("{}{:x}", prefix(&m.name), self.next_ids(false));
        let lease = match self.placement.reserve(&name, &m.name, None, Some(START_LEASE.min(self.placement.params().max_lease_ttl)), now) {
            Ok(l) => l,
            Err(e) => {
                if st.no_fit_logged.is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(60)) {
                    warn!(model = %m.name, reason = %e, "no node can take another replica now");
                    st.no_fit_logged = Some(now);
                }
                self.count("start", "no_fit");
                return false;
            }
        };
        let partition = match self.partition_of(&lease.node, &lease.slot, now) {
            Ok(p) => p,
            Err(why) => {
                self.placement.release(&name, now);
                self.count("start", why);
                if st.no_fit_logged.is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(60)) {
                    warn!(model = %m.name, node = %lease.node, slot = %lease.slot, reason = why, "the best slot cannot take a started replica");
                    st.no_fit_logged = Some(now);
                }
                return false;
            }
        };
        let id = format!("start-{name}");
        let cmd = pb::Command {
            id: id.clone(),
            idempotency_key: format!("start/{name}"),
            deadline: None,
            kind: Some(pb::command::Kind::StartRuntime(pb::StartRuntimeCommand {
                name: name.clone(),
                kind: m.runtime.clone(),
                model_id: m.name.clone(),
                partition_uuid: partition.clone(),
                args: m.serve.args.clone(),
                source_uri: m.source_uri.clone(),
                revision: m.revision.clone(),
            })),
        };
        match self.placement.state().send_command(&lease.node, cmd) {
            Ok(()) => {
                info!(model = %m.name, node = %lease.node, runtime = %name, partition, predicted_s = lease.parts.time_to_ready(), "starting a replica");
                self.count("start", "sent");
                st.starts.push(Start { name, node: lease.node, command_id: id, issued: now });
                true
            }
            Err(e) => {
                self.placement.release(&name, now);
                warn!(model = %m.name, node = %lease.node, error = %e, "start not sent");
                self.count("start", "send_failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names_are_dns_labels_and_recognised_by_prefix() {
        assert_eq!(prefix("llama-3.1-8b"), "llama-3-1-8b-");
        let p = prefix(&"m".repeat(63));
        let name = format!("{p}{:x}", u64::MAX);
        assert!(name.len() <= 63, "{name}");
        assert!(started_here("llama-", "llama-1a2b"));
        assert!(!started_here("llama-", "llama-prod"), "not an id");
        assert!(!started_here("llama-", "llama-"), "no id");
        assert!(!started_here("llama-", "serving/llama-0"));
    }
}
