use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hearth_proto::v1::{self as pb, command::Kind, command_status::Phase};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::cache::manager::Cache;
use crate::cache::spec::ModelSpec;
use crate::partition::reconcile::{PartitionStatus, Phase as PartitionPhase, Reconciler};
use crate::partition::spec::Spec;

/// The result of one command, as sent back in CommandStatus.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    pub command_id: String,
    pub idempotency_key: String,
    pub phase: Phase,
    pub message: String,
}

impl CommandOutcome {
    pub fn into_status(self) -> pb::CommandStatus {
        pb::CommandStatus {
            command_id: self.command_id,
            idempotency_key: self.idempotency_key,
            phase: self.phase as i32,
            message: self.message,
            progress: 0.0,
        }
    }
}

fn kind_name(k: Option<&Kind>) -> &'static str {
    match k {
        None => "empty",
        Some(Kind::Prefetch(_)) => "prefetch",
        Some(Kind::Evict(_)) => "evict",
        Some(Kind::Pin(_)) => "pin",
        Some(Kind::ApplyPartition(_)) => "apply_partition",
        Some(Kind::StartRuntime(_)) => "start_runtime",
        Some(Kind::StopRuntime(_)) => "stop_runtime",
        Some(Kind::Drain(_)) => "drain",
    }
}

/// Remembers this many idempotency keys; a controller retry older than that is run again,
/// which every handler must tolerate anyway.
const REMEMBERED_KEYS: usize = 4096;

#[derive(Debug, Default)]
struct Seen {
    outcomes: HashMap<String, CommandOutcome>,
    order: VecDeque<String>,
}

impl Seen {
    fn record(&mut self, o: &CommandOutcome) {
        if o.idempotency_key.is_empty() {
            return;
        }
        if !self.outcomes.contains_key(&o.idempotency_key) {
            if self.order.len() == REMEMBERED_KEYS
                && let Some(old) = self.order.pop_front()
            {
                self.outcomes.remove(&old);
            }
            self.order.push_back(o.idempotency_key.clone());
        }
        self.outcomes.insert(o.idempotency_key.clone(), o.clone());
    }
}

/// Routes controller commands to the subsystem that owns them, enforcing deadlines and
/// idempotency in one place. A kind with no subsystem on this agent is rejected with a
/// reason the controller can act on (pick another node), never silently dropped. Long
/// commands answer Accepted at once and report the end through `statuses`, which outlives
/// any one stream to the controller.
/// Where partition applies go, and how their status reaches the report.
#[derive(Clone)]
pub struct PartitionHandler {
    pub reconciler: Arc<Reconciler>,
    pub publish: Arc<dyn Fn(PartitionStatus) + Send + Sync>,
}

impl std::fmt::Debug for PartitionHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionHandler").field("reconciler", &self.reconciler).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct CommandDispatcher {
    cache: Option<Arc<Cache>>,
    partition: Option<PartitionHandler>,
    seen: Arc<Mutex<Seen>>,
    statuses: mpsc::Sender<pb::CommandStatus>,
    cancel: CancellationToken,
}

impl CommandDispatcher {
    pub fn new(cache: Option<Arc<Cache>>, statuses: mpsc::Sender<pb::CommandStatus>, cancel: CancellationToken) -> Self {
        Self { cache, partition: None, seen: Arc::default(), statuses, cancel }
    }

    /// Lets this agent run ApplyPartition.
    pub fn with_partition(mut self, h: PartitionHandler) -> Self {
        self.partition = Some(h);
        self
    }

    fn supported(&self) -> Vec<&'static str> {
        let mut v = if self.cache.is_some() { vec!["prefetch", "evict", "pin"] } else { Vec::new() };
        if self.partition.is_some() {
            v.push("apply_partition");
        }
        v
    }

    fn remember(&self, o: &CommandOutcome) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).record(o);
    }

    pub fn dispatch(&self, cmd: pb::Command, now: SystemTime) -> CommandOutcome {
        if !cmd.idempotency_key.is_empty()
            && let Some(prev) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).outcomes.get(&cmd.idempotency_key)
        {
            // Same key, same answer (the latest known phase); the id is the retry's own.
            return CommandOutcome { command_id: cmd.id, ..prev.clone() };
        }
        let kind = kind_name(cmd.kind.as_ref());
        let expired = cmd.deadline.and_then(|d| SystemTime::try_from(d).ok()).is_some_and(|d| d <= now);
        let outcome = |phase, message: String| CommandOutcome {
            command_id: cmd.id.clone(),
            idempotency_key: cmd.idempotency_key.clone(),
            phase,
            message,
        };
        let supported = self.supported();
        let result = if cmd.kind.is_none() {
            outcome(Phase::Rejected, "command has no kind set".into())
        } else if expired {
            outcome(Phase::Rejected, format!("{kind} command arrived after its deadline"))
        } else if !supported.contains(&kind) {
            let have = if supported.is_empty() { "none".to_owned() } else { supported.join(", ") };
            outcome(Phase::Rejected, format!("this agent cannot run {kind} commands (it runs: {have})"))
        } else {
            match (cmd.kind.clone(), &self.cache) {
                (Some(Kind::ApplyPartition(a)), _) => match &self.partition {
                    None => outcome(Phase::Rejected, "apply_partition: no handler".into()),
                    // Refuse a spec that does not parse or lacks the config before accepting.
                    Some(h) => match Spec::parse(&a.spec).and_then(|s| s.config(&a.config_name).map(|_| ())) {
                        Err(e) => outcome(Phase::Rejected, format!("partition spec: {e}")),
                        Ok(()) => {
                            let accepted = outcome(Phase::Accepted, format!("applying partition config {:?}", a.config_name));
                            self.spawn_partition(h.clone(), a.spec, a.config_name, accepted.clone());
                            accepted
                        }
                    },
                },
                (Some(Kind::Evict(e)), Some(c)) => match c.evict(&e.model_id) {
                    Ok(()) => outcome(Phase::Succeeded, format!("evicted {}", e.model_id)),
                    Err(err) => outcome(Phase::Failed, err.to_string()),
                },
                (Some(Kind::Pin(p)), Some(c)) => match c.pin(&p.model_id, p.pinned) {
                    Ok(()) => outcome(Phase::Succeeded, format!("{} {}", if p.pinned { "pinned" } else { "unpinned" }, p.model_id)),
                    Err(err) => outcome(Phase::Failed, err.to_string()),
                },
                (Some(Kind::Prefetch(p)), Some(c)) => match ModelSpec::new(&p.source_uri, &p.include, &p.exclude, &p.revision) {
                    Err(e) => outcome(Phase::Rejected, e.to_string()),
                    Ok(spec) => {
                        let accepted = outcome(Phase::Accepted, format!("prefetching {} as {}", spec.uri, spec.id()));
                        self.spawn_prefetch(c.clone(), spec, accepted.clone());
                        accepted
                    }
                },
                _ => outcome(Phase::Rejected, format!("{kind}: no handler")),
            }
        };
        self.remember(&result);
        result
    }

    fn spawn_partition(&self, h: PartitionHandler, spec: String, config: String, accepted: CommandOutcome) {
        let me = self.clone();
        let span = info_span!("partition_command", command = %accepted.command_id, config = %config);
        (h.publish)(PartitionStatus {
            config: config.clone(),
            phase: PartitionPhase::Pending,
            reason: "accepted".into(),
            gpus: Default::default(),
        });
        tokio::spawn(
            async move {
                let r = h.reconciler.clone();
                let (spec2, config2) = (spec.clone(), config.clone());
                let end = match tokio::task::spawn_blocking(move || r.apply(&spec2, &config2)).await {
                    Ok(Ok(status)) => {
                        (h.publish)(status.clone());
                        match status.phase {
                            PartitionPhase::Success => CommandOutcome {
                                phase: Phase::Succeeded,
                                message: format!("partition config {config:?} applied"),
                                ..accepted
                            },
                            p => CommandOutcome { phase: Phase::Failed, message: format!("{}: {}", p.as_str(), status.reason), ..accepted },
                        }
                    }
                    Ok(Err(e)) => {
                        if let Some(s) = h.reconciler.status() {
                            (h.publish)(s);
                        }
                        CommandOutcome { phase: Phase::Failed, message: e.to_string(), ..accepted }
                    }
                    Err(e) => CommandOutcome { phase: Phase::Failed, message: format!("apply task failed: {e}"), ..accepted },
                };
                info!(phase = ?end.phase, message = %end.message, "partition command finished");
                me.remember(&end);
                if me.statuses.try_send(end.into_status()).is_err() {
                    warn!("command status queue full; the controller will learn the result from the snapshot");
                }
            }
            .instrument(span),
        );
    }

    fn spawn_prefetch(&self, cache: Arc<Cache>, spec: ModelSpec, accepted: CommandOutcome) {
        let me = self.clone();
        let span = info_span!("prefetch_command", command = %accepted.command_id, model = %spec.id());
        tokio::spawn(
            async move {
                let end = match cache.ensure(&spec, me.cancel.child_token()).await {
                    Ok(e) => CommandOutcome {
                        phase: Phase::Succeeded,
                        message: format!("{} ready: {} bytes, verification {}", e.id, e.bytes_total, e.verification),
                        ..accepted
                    },
                    Err(err) => CommandOutcome { phase: Phase::Failed, message: err.to_string(), ..accepted },
                };
                info!(phase = ?end.phase, message = %end.message, "prefetch command finished");
                me.remember(&end);
                if me.statuses.try_send(end.into_status()).is_err() {
                    warn!("command status queue full; the controller will learn the result from the snapshot");
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cmd(id: &str, key: &str, deadline: Option<SystemTime>, kind: Kind) -> pb::Command {
        pb::Command { id: id.into(), idempotency_key: key.into(), deadline: deadline.map(Into::into), kind: Some(kind) }
    }

    fn evict(m: &str) -> Kind {
        Kind::Evict(pb::EvictCommand { model_id: m.into() })
    }

    fn dispatcher(cache: Option<Arc<Cache>>) -> (CommandDispatcher, mpsc::Receiver<pb::CommandStatus>) {
        let (tx, rx) = mpsc::channel(8);
        (CommandDispatcher::new(cache, tx, CancellationToken::new()), rx)
    }

    fn cache(root: &std::path::Path) -> Arc<Cache> {
        let cfg = crate::cache::manager::CacheConfig {
            root: root.into(),
            capacity: None,
            high_watermark: 0.999,
            low_watermark: 0.99,
            fetch: Default::default(),
            s3: Default::default(),
        };
        Cache::open(cfg, &mut prometheus_client::registry::Registry::default()).unwrap()
    }

    #[test]
    fn unsupported_kinds_are_rejected_with_the_reason() {
        let (d, _rx) = dispatcher(None);
        let o = d.dispatch(cmd("1", "k1", None, evict("m")), SystemTime::now());
        assert_eq!(o.phase, Phase::Rejected);
        assert_eq!(o.message, "this agent cannot run evict commands (it runs: none)");
        let o = d.dispatch(cmd("2", "k2", None, Kind::Drain(pb::DrainCommand::default())), SystemTime::now());
        assert_eq!(o.phase, Phase::Rejected);
    }

    #[tokio::test]
    async fn expired_deadline_is_rejected_and_same_key_gets_the_same_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _rx) = dispatcher(Some(cache(dir.path())));
        let now = SystemTime::now();
        let o = d.dispatch(cmd("1", "k1", Some(now - Duration::from_secs(1)), evict("m")), now);
        assert_eq!((o.phase, o.message.as_str()), (Phase::Rejected, "evict command arrived after its deadline"));
        let first = d.dispatch(cmd("2", "k2", Some(now + Duration::from_secs(60)), evict("nope")), now);
        assert_eq!(first.phase, Phase::Failed);
        assert!(first.message.contains("not in the cache"), "{}", first.message);
        let retry = d.dispatch(cmd("3", "k2", None, evict("nope")), now + Duration::from_secs(120));
        assert_eq!((retry.phase, retry.command_id.as_str()), (Phase::Failed, "3"));
    }

    #[tokio::test]
    async fn prefetch_is_accepted_then_reports_success_with_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("model");
        crate::cache::sample::write_sample_model(&src, 1, 1 << 20).unwrap();
        let (d, mut rx) = dispatcher(Some(cache(&dir.path().join("cache"))));
        let uri = format!("file://{}", src.display());
        let k = Kind::Prefetch(pb::PrefetchCommand { source_uri: uri.clone(), ..Default::default() });
        let o = d.dispatch(cmd("1", "p1", None, k.clone()), SystemTime::now());
        assert_eq!(o.phase, Phase::Accepted);
        let done = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
        assert_eq!(done.phase, Phase::Succeeded as i32, "{}", done.message);
        assert_eq!(done.command_id, "1");
        // A retry of the same command learns the final phase.
        let again = d.dispatch(cmd("2", "p1", None, k), SystemTime::now());
        assert_eq!(again.phase, Phase::Succeeded);
        let bad = Kind::Prefetch(pb::PrefetchCommand { source_uri: "ftp://x".into(), ..Default::default() });
        assert_eq!(d.dispatch(cmd("3", "p3", None, bad), SystemTime::now()).phase, Phase::Rejected);
    }

    #[test]
    fn remembered_keys_are_bounded() {
        let (d, _rx) = dispatcher(None);
        for i in 0..(REMEMBERED_KEYS + 10) {
            d.dispatch(cmd(&i.to_string(), &format!("k{i}"), None, evict("m")), SystemTime::now());
        }
        let seen = d.seen.lock().unwrap();
        assert_eq!(seen.outcomes.len(), REMEMBERED_KEYS);
        assert!(!seen.outcomes.contains_key("k0"));
    }

    #[tokio::test]
    async fn apply_partition_is_validated_accepted_applied_and_published() {
        use crate::device::migctl::{MigControl, SimMig};
        use crate::partition::reconcile::{GpuIdentity, NoRuntimes};
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[0x2330_10DE]));
        let ids = vec![GpuIdentity { index: 0, product: "NVIDIA H100 80GB HBM3".into(), pci_device_id: 0x2330_10DE }];
        let rec = Arc::new(Reconciler::new(hw.clone(), Arc::new(NoRuntimes), ids, dir.path()).unwrap());
        let published = Arc::new(Mutex::new(Vec::new()));
        let p = published.clone();
        let (d, mut rx) = dispatcher(None);
        let d = d.with_partition(PartitionHandler { reconciler: rec, publish: Arc::new(move |s| p.lock().unwrap().push(s)) });
        let spec = include_str!("../../../manifests/examples/mig-spec.yaml");
        let apply = |config: &str| Kind::ApplyPartition(pb::ApplyPartitionCommand { spec: spec.into(), config_name: config.into() });

        let bad = d.dispatch(cmd("c0", "k0", None, apply("nope")), SystemTime::now());
        assert_eq!(bad.phase, Phase::Rejected);
        assert!(bad.message.contains("nope"), "{}", bad.message);
        let ok = d.dispatch(cmd("c1", "k1", None, apply("all-1g.10gb")), SystemTime::now());
        assert_eq!(ok.phase, Phase::Accepted);
        let end = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert_eq!((end.command_id.as_str(), end.phase), ("c1", Phase::Succeeded as i32), "{}", end.message);
        assert_eq!(hw.list(0).unwrap().len(), 7);
        let phases: Vec<_> = published.lock().unwrap().iter().map(|s| s.phase).collect();
        assert_eq!(phases, [PartitionPhase::Pending, PartitionPhase::Success]);
        // A retry with the same key gets the recorded answer and applies nothing again.
        assert_eq!(d.dispatch(cmd("c2", "k1", None, apply("all-1g.10gb")), SystemTime::now()).phase, Phase::Succeeded);
    }
}
