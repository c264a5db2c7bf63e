//! StartRuntime and StopRuntime from the controller: a runtime started on this node from a
//! command template in the agent's config (`runtimes.engines`), on a model already in the
//! cache (the command names its cache id), bound to the partition it names. The agent
//! refuses what it cannot honour before accepting: an engine without a template, a model
//! not cached here, a partition or name another runtime holds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_proto::v1 as pb;
use hearth_service::tasks::Tasks;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use super::RuntimeState;
use super::engine::Kind;
use super::managed::{Common, ManagedSpec};

/// How to start an engine on a node: its program and arguments (`{port}`, `{model_dir}`
/// replaced; the command's own `args` appended) and the first port to hand out.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineTemplate {
    pub command: Vec<String>,
    pub port: u16,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    /// The engine's image (pod driver).
    pub image: Option<String>,
}

struct Running {
    spec: ManagedSpec,
    stop: CancellationToken,
    done: watch::Receiver<bool>,
}

/// Starts and stops command-driven runtimes; shared by the dispatcher and the subsystem.
#[derive(Clone)]
pub struct RuntimeCommands {
    pub(super) templates: BTreeMap<Kind, EngineTemplate>,
    pub(super) common: Common,
    pub(super) tasks: Tasks,
    pub(super) restarts: prometheus_client::metrics::family::Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>,
    /// Names and partitions the configured runtimes hold.
    pub(super) fixed: Vec<(String, Option<String>, u16)>,
    /// Every runtime's stop hangs off this (a spot notice drains them all).
    pub(super) drain_all: CancellationToken,
    running: Arc<Mutex<BTreeMap<String, Running>>>,
}

impl std::fmt::Debug for RuntimeCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeCommands").field("templates", &self.templates.len()).finish()
    }
}

impl RuntimeCommands {
    pub(super) fn new(
        templates: BTreeMap<Kind, EngineTemplate>,
        common: Common,
        tasks: Tasks,
        restarts: prometheus_client::metrics::family::Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>,
        fixed: Vec<(String, Option<String>, u16)>,
        drain_all: CancellationToken,
    ) -> Self {
        Self { templates, common, tasks, restarts, fixed, drain_all, running: Arc::default() }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks and starts; returns a receiver that turns true when the runtime is ready
    /// (Ok) or gives up (Err), for the command's final status.
    pub fn start(&self, c: &pb::StartRuntimeCommand) -> Result<StartWait, String> {
        self.start_on(c, None)
    }

    /// `start`, on `port` when given (a restored runtime keeps the port its server has).
    fn start_on(&self, c: &pb::StartRuntimeCommand, port: Option<u16>) -> Result<StartWait, String> {
        if !hearth_service::kube::is_dns_label(&c.name) {
            return Err(format!("start_runtime: name {:?}: expected a DNS label", c.name));
        }
        let kind = Kind::parse(&c.kind)
            .ok_or_else(|| format!("start_runtime: kind {:?}: expected vllm, sglang, tgi, triton or custom", c.kind))?;
        let t = self.templates.get(&kind).ok_or_else(|| {
            format!("start_runtime: this agent has no command for {} (runtimes.engines.{} in its config)", kind.as_str(), kind.as_str())
        })?;
        let cache = self.common.cache.as_ref().ok_or("start_runtime: the model cache is off on this node")?;
        // From its source (cached first, as for a configured runtime), or already cached here.
        let spec_model = if c.source_uri.is_empty() {
            let entry =
                cache.entries().into_iter().find(|e| e.id == c.model_id && e.state == crate::cache::index::EntryState::Ready).ok_or_else(
                    || format!("start_runtime: model {:?} is not cached and ready on this node (prefetch it first)", c.model_id),
                )?;
            crate::cache::spec::ModelSpec::new(&entry.uri, &entry.include, &entry.exclude, &entry.revision).map_err(|e| e.to_string())?
        } else {
            if c.model_id.is_empty() {
                return Err("start_runtime: model_id: expected the id to report the runtime under".into());
            }
            crate::cache::spec::ModelSpec::new(&c.source_uri, &[], &[], &c.revision)
                .map_err(|e| format!("start_runtime: source_uri {:?}: {e}", c.source_uri))?
        };
        let partition = (!c.partition_uuid.is_empty()).then(|| c.partition_uuid.clone());
        let mut running = self.running();
        if let Some(r) = running.get(&c.name) {
            if r.spec.model.as_ref().map(|m| m.id()) == Some(spec_model.id()) && r.spec.visible_devices == partition && !*r.done.borrow() {
                // The same start again (a controller retry): the same runtime.
                return Ok(StartWait { name: c.name.clone(), shared: self.common.shared.clone(), done: r.done.clone() });
            }
            return Err(format!("start_runtime: a runtime named {:?} already runs here", c.name));
        }
        let held = self
            .fixed
            .iter()
            .map(|(n, p, port)| (n.clone(), p.clone(), *port))
            .chain(running.values().map(|r| (r.spec.name.clone(), r.spec.visible_devices.clone(), r.spec.port)));
        let held: Vec<_> = held.collect();
        if held.iter().any(|(n, _, _)| n == &c.name) {
            return Err(format!("start_runtime: a runtime named {:?} is in the agent's config", c.name));
        }
        if let Some(p) = &partition
            && let Some((n, _, _)) = held.iter().find(|(_, q, _)| q.as_ref() == Some(p))
        {
            return Err(format!("start_runtime: partition {p} is held by runtime {n:?}"));
        }
        let mut port = port.unwrap_or(t.port);
        while held.iter().any(|(_, _, q)| *q == port) {
            port = port.checked_add(1).ok_or("start_runtime: no free port")?;
        }
        let mut command = t.command.clone();
        command.extend(c.args.iter().cloned());
        let spec = ManagedSpec {
            name: c.name.clone(),
            engine: kind,
            model: Some(spec_model),
            model_name: c.model_id.clone(),
            command,
            port,
            visible_devices: partition,
            env: Vec::new(),
            ready_timeout: t.ready_timeout,
            drain_timeout: t.drain_timeout,
            image: t.image.clone(),
            resources: Default::default(),
        };
        if self.drain_all.is_cancelled() {
            return Err("start_runtime: this node is draining (a spot notice)".into());
        }
        let stop = self.drain_all.child_token();
        let (done_tx, done) = watch::channel(false);
        let restarts = self.restarts.get_or_create(&vec![("runtime".into(), spec.name.clone())]).clone();
        let sup = super::managed::supervise(&self.common, spec.clone(), restarts, stop.clone());
        let pauses = self.common.pauses.clone();
        pauses.register(&spec.name, spec.visible_devices.clone(), spec.drain_timeout);
        let (shared, name) = (self.common.shared.clone(), spec.name.clone());
        self.tasks.spawn(
            "supervise",
            async move {
                sup.await;
                pauses.unregister(&name);
                shared.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                let _ = done_tx.send(true);
            }
            .instrument(info_span!("runtime", name = %spec.name)),
        );
        // Recorded, so a restarted agent supervises (adopts) it again: the controller asked
        // for it, and an agent upgrade must not lose it.
        let record = self.record_path(&spec.name);
        let saved = record.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let r = StartRecord { port: spec.port, command: prost::Message::encode_to_vec(c) };
            hearth_service::fsutil::write_atomic(&record, &serde_json::to_vec(&r).unwrap_or_default(), false).map_err(std::io::Error::other)
        });
        if let Err(e) = saved {
            tracing::warn!(runtime = %spec.name, error = %e, "cannot record the started runtime; a restarted agent will not supervise it");
        }
        running.insert(spec.name.clone(), Running { spec, stop, done: done.clone() });
        Ok(StartWait { name: c.name.clone(), shared: self.common.shared.clone(), done })
    }

    fn record_path(&self, name: &str) -> std::path::PathBuf {
        self.common.state_dir.join("runtimes").join(name).join("start.json")
    }

    /// After an agent restart: supervises again every runtime started by command and not
    /// stopped (its server is adopted where it still runs), and finishes the drain of any
    /// server whose stop was under way (its record gone, its server maybe still there).
    pub async fn restore(&self) {
        let dir = self.common.state_dir.join("runtimes");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        for name in names {
            if self.fixed.iter().any(|(n, _, _)| n == &name) || !hearth_service::kube::is_dns_label(&name) {
                continue;
            }
            let record = self.record_path(&name);
            match std::fs::read(&record) {
                Ok(bytes) => match serde_json::from_slice::<StartRecord>(&bytes).map_err(|e| e.to_string()).and_then(|r| {
                    Ok((r.port, <pb::StartRuntimeCommand as prost::Message>::decode(r.command.as_slice()).map_err(|e| e.to_string())?))
                }) {
                    Ok((port, c)) => match self.start_on(&c, Some(port)) {
                        Ok(_) => {
                            tracing::info!(runtime = %name, "supervising again the runtime started by command before the agent restarted")
                        }
                        Err(e) => tracing::warn!(runtime = %name, error = %e, "cannot supervise again a runtime started by command"),
                    },
                    Err(e) => tracing::warn!(runtime = %name, file = %record.display(), error = %e, "unreadable start record; ignored"),
                },
                Err(_) => {
                    let drain = self.templates.values().map(|t| t.drain_timeout).max().unwrap_or(Duration::from_secs(5));
                    super::managed::reap(&self.common, &name, drain).await;
                }
            }
        }
    }

    /// Stops a runtime started by command; resolves once it is drained.
    pub fn stop(&self, name: &str) -> Result<impl Future<Output = ()> + Send + 'static, String> {
        if self.fixed.iter().any(|(n, _, _)| n == name) {
            return Err(format!("stop_runtime: {name:?} is in the agent's config; change the config to stop it"));
        }
        let r =
            self.running().remove(name).ok_or_else(|| format!("stop_runtime: no runtime named {name:?} was started here by command"))?;
        // The intent first: an agent killed mid-drain must not start it again, and finishes
        // the drain when it comes back (`restore`).
        let _ = std::fs::remove_file(self.record_path(name));
        r.stop.cancel();
        let mut done = r.done;
        Ok(async move {
            while !*done.borrow_and_update() {
                if done.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

/// What the agent keeps of a StartRuntime it accepted: the command and the port it chose.
#[derive(serde::Serialize, serde::Deserialize)]
struct StartRecord {
    port: u16,
    command: Vec<u8>,
}

/// Waits for a started runtime to be ready or give up.
pub struct StartWait {
    name: String,
    shared: super::managed::Shared,
    done: watch::Receiver<bool>,
}

impl StartWait {
    pub async fn wait(mut self, deadline: Duration) -> Result<(), String> {
        let t0 = tokio::time::Instant::now();
        loop {
            let st = self.shared.lock().unwrap_or_else(|p| p.into_inner()).get(&self.name).map(|s| (s.state, s.reason.clone()));
            match st {
                Some((RuntimeState::Ready, _)) => return Ok(()),
                Some((RuntimeState::CrashLoop, why)) => return Err(format!("crash loop: {why}")),
                _ => {}
            }
            if *self.done.borrow() {
                return Err("stopped before it was ready".into());
            }
            if t0.elapsed() > deadline {
                let why = st.map(|(_, w)| w).unwrap_or_default();
                return Err(format!("not ready within {deadline:?}: {why}"));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.done.changed() => {}
            }
        }
    }
}
