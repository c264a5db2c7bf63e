use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hearth_proto::v1::{self as pb, command::Kind, command_status::Phase};
use hearth_service::tasks::Tasks;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

use crate::cache::manager::Cache;
use crate::cache::spec::ModelSpec;
use crate::partition::Applier;
use crate::partition::reconcile::{PartitionStatus, Phase as PartitionPhase};

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
        Some(Kind::PrefetchImage(_)) => "prefetch_image",
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
/// Where partition applies go (the MIG reconciler or the Neuron core-group allocator), and
/// how their status reaches the report.
#[derive(Clone)]
pub struct PartitionHandler {
    pub applier: Arc<dyn Applier>,
    pub publish: Arc<dyn Fn(PartitionStatus) + Send + Sync>,
}

impl std::fmt::Debug for PartitionHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionHandler").field("applier", &self.applier).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct CommandDispatcher {
    cache: Option<Arc<Cache>>,
    partition: Option<PartitionHandler>,
    runtimes: Option<crate::runtime::commands::RuntimeCommands>,
    images: Option<Arc<crate::images::Images>>,
    seen: Arc<Mutex<Seen>>,
    statuses: mpsc::Sender<pb::CommandStatus>,
    /// Every command runs here, never in the stream loop: a 100 GB eviction or a MIG apply
    /// must not hold up heartbeats.
    tasks: Tasks,
}

impl CommandDispatcher {
    pub fn new(statuses: mpsc::Sender<pb::CommandStatus>, tasks: Tasks) -> Self {
        Self { cache: None, partition: None, runtimes: None, images: None, seen: Arc::default(), statuses, tasks }
    }

    /// Lets this agent run Prefetch, Evict and Pin.
    pub fn set_cache(&mut self, cache: Arc<Cache>) {
        self.cache = Some(cache);
    }

    /// Lets this agent run ApplyPartition.
    pub fn set_partition(&mut self, h: PartitionHandler) {
        self.partition = Some(h);
    }

    /// Lets this agent run StartRuntime and StopRuntime.
    pub fn set_runtimes(&mut self, r: crate::runtime::commands::RuntimeCommands) {
        self.runtimes = Some(r);
    }

    /// Lets this agent run PrefetchImage.
    pub fn set_images(&mut self, images: Arc<crate::images::Images>) {
        self.images = Some(images);
    }

    fn supported(&self) -> Vec<&'static str> {
        let mut v = if self.cache.is_some() { vec!["prefetch", "evict", "pin"] } else { Vec::new() };
        if self.partition.is_some() {
            v.push("apply_partition");
        }
        if self.runtimes.is_some() {
            v.extend(["start_runtime", "stop_runtime"]);
        }
        if self.images.is_some() {
            v.push("prefetch_image");
        }
        v
    }

    fn remember(&self, o: &CommandOutcome) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).record(o);
    }

    /// Answers at once (Rejected, or Accepted with the work started as a task); the end
    /// of accepted work reaches the controller as a later CommandStatus. Never blocks.
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
                (Some(Kind::StartRuntime(c)), _) => match self.runtimes.as_ref().map(|r| r.start(&c)) {
                    None => outcome(Phase::Rejected, "start_runtime: no handler".into()),
                    Some(Err(e)) => outcome(Phase::Rejected, e),
                    Some(Ok(wait)) => {
                        let accepted = outcome(Phase::Accepted, format!("starting runtime {:?}", c.name));
                        let span = info_span!("start_runtime_command", command = %accepted.command_id, runtime = %c.name);
                        let name = c.name.clone();
                        // The runtime's own ready_timeout bounds the wait; this only ends a wait
                        // nobody would notice.
                        self.spawn_command("start_runtime", span, accepted.clone(), async move {
                            match wait.wait(std::time::Duration::from_secs(3600)).await {
                                Ok(()) => (Phase::Succeeded, format!("runtime {name:?} ready")),
                                Err(e) => (Phase::Failed, format!("runtime {name:?}: {e}")),
                            }
                        });
                        accepted
                    }
                },
                (Some(Kind::StopRuntime(c)), _) => match self.runtimes.as_ref().map(|r| r.stop(&c.name)) {
                    None => outcome(Phase::Rejected, "stop_runtime: no handler".into()),
                    Some(Err(e)) => outcome(Phase::Rejected, e),
                    Some(Ok(drained)) => {
                        let accepted = outcome(Phase::Accepted, format!("stopping runtime {:?}", c.name));
                        let span = info_span!("stop_runtime_command", command = %accepted.command_id, runtime = %c.name);
                        let name = c.name.clone();
                        self.spawn_command("stop_runtime", span, accepted.clone(), async move {
                            drained.await;
                            (Phase::Succeeded, format!("runtime {name:?} drained and stopped"))
                        });
                        accepted
                    }
                },
                (Some(Kind::ApplyPartition(a)), _) => match &self.partition {
                    None => outcome(Phase::Rejected, "apply_partition: no handler".into()),
                    // Refuse what cannot apply here (a spec that does not parse, a config it
                    // lacks, groups this node's topology does not allow) before accepting.
                    Some(h) => match h.applier.check(&a.spec, &a.config_name) {
                        Err(e) => outcome(Phase::Rejected, e),
                        // The name becomes a Node label value.
                        Ok(()) if !crate::kube::is_label_value(&a.config_name) => outcome(
                            Phase::Rejected,
                            format!("partition config name {:?}: expected {}", a.config_name, crate::kube::LABEL_VALUE_RULE),
                        ),
                        Ok(()) => {
                            let accepted = outcome(Phase::Accepted, format!("applying partition config {:?}", a.config_name));
                            self.spawn_partition(h.clone(), a.spec, a.config_name, accepted.clone());
                            accepted
                        }
                    },
                },
                (Some(Kind::PrefetchImage(p)), _) => match (&self.images, crate::images::reference::Reference::parse(&p.reference)) {
                    (None, _) => outcome(Phase::Rejected, "prefetch_image: no handler".into()),
                    (_, Err(e)) => outcome(Phase::Rejected, e.to_string()),
                    (Some(images), Ok(r)) => {
                        // The weights' cache id on this agent, as a Prefetch of them computes it.
                        let model = if p.source_uri.is_empty() {
                            Ok(None)
                        } else {
                            ModelSpec::new(&p.source_uri, &[], &[], &p.revision).map(|m| Some(m.id()))
                        };
                        match model {
                            Err(e) => outcome(Phase::Rejected, format!("prefetch_image source_uri: {e}")),
                            Ok(model) => {
                                let accepted = outcome(Phase::Accepted, format!("pulling image {r}"));
                                let (images, cancel) = (images.clone(), self.tasks.cancel_token().child_token());
                                let span = info_span!("prefetch_image_command", command = %accepted.command_id, image = %r);
                                self.spawn_command("prefetch_image", span, accepted.clone(), async move {
                                    match images.prefetch(&r, model.as_deref(), &cancel).await {
                                        Ok(e) => match e.pulled {
                                            None => (Phase::Succeeded, format!("image {r} present ({})", e.image_id)),
                                            Some(p) => (
                                                Phase::Succeeded,
                                                format!(
                                                    "image {r} pulled ({}, {} bytes in {:.1}s)",
                                                    p.path.as_str(),
                                                    p.total,
                                                    p.elapsed.as_secs_f64()
                                                ),
                                            ),
                                        },
                                        Err(err) => (Phase::Failed, err.to_string()),
                                    }
                                });
                                accepted
                            }
                        }
                    }
                },
                (Some(Kind::Evict(e)), Some(c)) => {
                    let accepted = outcome(Phase::Accepted, format!("evicting {}", e.model_id));
                    let (c, id) = (c.clone(), e.model_id);
                    let span = info_span!("evict_command", command = %accepted.command_id, model = %id);
                    self.spawn_command("evict", span, accepted.clone(), async move {
                        let r = tokio::task::spawn_blocking({
                            let id = id.clone();
                            move || c.evict(&id)
                        })
                        .await;
                        match r {
                            Ok(Ok(())) => (Phase::Succeeded, format!("evicted {id}")),
                            Ok(Err(err)) => (Phase::Failed, err.to_string()),
                            Err(err) => (Phase::Failed, format!("evict task failed: {err}")),
                        }
                    });
                    accepted
                }
                (Some(Kind::Pin(p)), Some(c)) => {
                    let verb = if p.pinned { "pinned" } else { "unpinned" };
                    let accepted = outcome(Phase::Accepted, format!("{} {}", if p.pinned { "pinning" } else { "unpinning" }, p.model_id));
                    let (c, id, pinned) = (c.clone(), p.model_id, p.pinned);
                    let span = info_span!("pin_command", command = %accepted.command_id, model = %id);
                    self.spawn_command("pin", span, accepted.clone(), async move {
                        let r = tokio::task::spawn_blocking({
                            let id = id.clone();
                            move || c.pin(&id, pinned)
                        })
                        .await;
                        match r {
                            Ok(Ok(())) => (Phase::Succeeded, format!("{verb} {id}")),
                            Ok(Err(err)) => (Phase::Failed, err.to_string()),
                            Err(err) => (Phase::Failed, format!("pin task failed: {err}")),
                        }
                    });
                    accepted
                }
                (Some(Kind::Prefetch(p)), Some(c)) => match ModelSpec::new(&p.source_uri, &p.include, &p.exclude, &p.revision) {
                    Err(e) => outcome(Phase::Rejected, e.to_string()),
                    Ok(spec) => {
                        let accepted = outcome(Phase::Accepted, format!("prefetching {} as {}", spec.uri, spec.id()));
                        let (c, cancel) = (c.clone(), self.tasks.cancel_token().child_token());
                        let span = info_span!("prefetch_command", command = %accepted.command_id, model = %spec.id());
                        self.spawn_command("prefetch", span, accepted.clone(), async move {
                            match c.ensure(&spec, cancel).await {
                                Ok(e) => (
                                    Phase::Succeeded,
                                    format!("{} ready: {} bytes, verification {}", e.id, e.bytes_total, e.verification_label()),
                                ),
                                Err(err) => (Phase::Failed, err.to_string()),
                            }
                        });
                        accepted
                    }
                },
                _ => outcome(Phase::Rejected, format!("{kind}: no handler")),
            }
        };
        self.remember(&result);
        result
    }

    /// Runs accepted work as a tracked task; its end is remembered under the command's key
    /// and queued for the controller.
    fn spawn_command(
        &self,
        task: &'static str,
        span: tracing::Span,
        accepted: CommandOutcome,
        work: impl std::future::Future<Output = (Phase, String)> + Send + 'static,
    ) {
        let me = self.clone();
        self.tasks.spawn(
            task,
            async move {
                let (phase, message) = work.await;
                let end = CommandOutcome { phase, message, ..accepted };
                info!(phase = ?end.phase, message = %end.message, "{task} command finished");
                me.remember(&end);
                if me.statuses.try_send(end.into_status()).is_err() {
                    warn!("command status queue full; the controller will learn the result from the snapshot");
                }
            }
            .instrument(span),
        );
    }

    fn spawn_partition(&self, h: PartitionHandler, spec: String, config: String, accepted: CommandOutcome) {
        let span = info_span!("partition_command", command = %accepted.command_id, config = %config);
        (h.publish)(PartitionStatus {
            kind: h.applier.kind(),
            config: config.clone(),
            phase: PartitionPhase::Pending,
            reason: "accepted".into(),
            gpus: Default::default(),
        });
        self.spawn_command("apply_partition", span, accepted, async move {
            let r = h.applier.clone();
            let config2 = config.clone();
            match tokio::task::spawn_blocking(move || r.apply(&spec, &config2)).await {
                Ok(Ok(status)) => {
                    (h.publish)(status.clone());
                    match status.phase {
                        PartitionPhase::Success => (Phase::Succeeded, format!("partition config {config:?} applied")),
                        p => (Phase::Failed, format!("{}: {}", p.as_str(), status.reason)),
                    }
                }
                Ok(Err(e)) => {
                    if let Some(s) = h.applier.status() {
                        (h.publish)(s);
                    }
                    (Phase::Failed, e)
                }
                Err(e) => (Phase::Failed, format!("apply task failed: {e}")),
            }
        });
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
        let tasks = Tasks::new("commands", tokio_util::sync::CancellationToken::new(), Default::default());
        let mut d = CommandDispatcher::new(tx, tasks);
        if let Some(c) = cache {
            d.set_cache(c);
        }
        (d, rx)
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
    async fn prefetch_image_is_refused_without_a_runtime_and_for_a_bad_reference() {
        let image = |r: &str, uri: &str| {
            Kind::PrefetchImage(pb::PrefetchImageCommand { reference: r.into(), source_uri: uri.into(), revision: String::new() })
        };
        let (mut d, mut rx) = dispatcher(None);
        let o = d.dispatch(cmd("1", "k1", None, image("vllm/vllm-openai:v1", "")), SystemTime::now());
        assert_eq!((o.phase, o.message.as_str()), (Phase::Rejected, "this agent cannot run prefetch_image commands (it runs: none)"));
        // With a runtime to pull into (none answers on this socket: checked only when pulling).
        let state = tempfile::tempdir().unwrap();
        let settings = crate::images::ImageSettings { socket: state.path().join("no.sock"), ..Default::default() };
        let metrics = crate::images::ImageMetrics::register(&mut prometheus_client::registry::Registry::default());
        d.set_images(Arc::new(crate::images::Images::new(settings, state.path(), metrics, None).unwrap()));
        let o = d.dispatch(cmd("2", "k2", None, image("Not A Reference", "")), SystemTime::now());
        assert_eq!(o.phase, Phase::Rejected);
        assert!(o.message.starts_with("image reference \"Not A Reference\": expected"), "{}", o.message);
        let o = d.dispatch(cmd("3", "k3", None, image("vllm:v1", "ftp://nope")), SystemTime::now());
        assert_eq!(o.phase, Phase::Rejected);
        assert!(o.message.starts_with("prefetch_image source_uri:"), "{}", o.message);
        // Accepted, then failed: the socket is not there, and the failure names it.
        let o = d.dispatch(cmd("4", "k4", None, image("vllm:v1", "")), SystemTime::now());
        assert_eq!(o.phase, Phase::Accepted);
        let end = rx.recv().await.unwrap();
        assert_eq!(end.phase, Phase::Failed as i32);
        assert!(end.message.contains("no.sock"), "{}", end.message);
    }

    #[tokio::test]
    async fn expired_deadline_is_rejected_and_same_key_gets_the_same_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (d, mut rx) = dispatcher(Some(cache(dir.path())));
        let now = SystemTime::now();
        let o = d.dispatch(cmd("1", "k1", Some(now - Duration::from_secs(1)), evict("m")), now);
        assert_eq!((o.phase, o.message.as_str()), (Phase::Rejected, "evict command arrived after its deadline"));
        let first = d.dispatch(cmd("2", "k2", Some(now + Duration::from_secs(60)), evict("nope")), now);
        assert_eq!(first.phase, Phase::Accepted);
        let end = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert_eq!((end.command_id.as_str(), end.phase), ("2", Phase::Failed as i32));
        assert!(end.message.contains("not in the cache"), "{}", end.message);
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
        use crate::partition::reconcile::{GpuIdentity, NoRuntimes, Reconciler};
        let dir = tempfile::tempdir().unwrap();
        let hw = Arc::new(SimMig::new(&[0x2330_10DE]));
        let ids = vec![GpuIdentity { index: 0, product: "NVIDIA H100 80GB HBM3".into(), pci_device_id: 0x2330_10DE }];
        let rec = Arc::new(Reconciler::new(hw.clone(), Arc::new(NoRuntimes), ids, dir.path()).unwrap());
        let published = Arc::new(Mutex::new(Vec::new()));
        let p = published.clone();
        let (mut d, mut rx) = dispatcher(None);
        d.set_partition(PartitionHandler { applier: rec, publish: Arc::new(move |s| p.lock().unwrap().push(s)) });
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
