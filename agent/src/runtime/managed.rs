//! Agent-managed runtimes: a model server the agent starts (from its config or a
//! StartRuntime command) on cached weights it has pinned, bound to the partition it is
//! given, and supervises whatever runs it (a [`Driver`]: a process, or a Pod the kubelet
//! runs): readiness with a deadline, restarts with jittered backoff and a crash-loop state,
//! and a graceful stop (the engine's own drain on SIGTERM, forced at the deadline).
//!
//! A restarted agent adopts the server an earlier one left running instead of starting a
//! second one on the same devices.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::driver::{Driver, Launch, ProcessDriver};
use super::engine::{EngineSpec, Kind, LoadReader};
use super::{RuntimeState, RuntimeStatus, probe};
use crate::cache::manager::Cache;
use crate::cache::spec::ModelSpec;

/// Three exits within this long of the previous start make a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const CRASH_LOOP_AFTER: u32 = 3;

/// One runtime from `runtimes.managed`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedSpec {
    pub name: String,
    pub engine: Kind,
    /// Cached, verified and pinned before the server starts; `{model_dir}` in the command.
    pub model: Option<ModelSpec>,
    /// The model id reported (and matched against the controller's catalog).
    pub model_name: String,
    /// Program and arguments; `{port}` and `{model_dir}` are replaced.
    pub command: Vec<String>,
    pub port: u16,
    /// `CUDA_VISIBLE_DEVICES` for the server (a GPU index or UUID; MIG instances as the
    /// container toolkit exposes one: the instance's UUID in `NVIDIA_VISIBLE_DEVICES`).
    pub visible_devices: Option<String>,
    pub env: Vec<(String, String)>,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    /// The engine's container image (pod driver).
    pub image: Option<String>,
    /// Device-plugin resources of its pod; default: the partition's (pod driver).
    pub resources: std::collections::BTreeMap<String, String>,
}

/// What the supervisor publishes for the read loop and the report.
pub type Shared = Arc<Mutex<std::collections::BTreeMap<String, RuntimeStatus>>>;

/// Runs one managed runtime until `stop`, then drains it.
pub struct Supervisor<D: Driver> {
    pub spec: ManagedSpec,
    pub driver: D,
    pub cache: Option<Arc<Cache>>,
    pub shared: Shared,
    pub interval: Duration,
    pub timeout: Duration,
    pub restarts: prometheus_client::metrics::counter::Counter,
    /// Holds from partition changes.
    pub pauses: Arc<super::pause::Pauses>,
    /// Crash loops become Events on the Node.
    pub events: crate::kube::events::NodeEvents,
    /// The agent's own stop: a server that outlives the agent is left serving on it.
    pub shutdown: CancellationToken,
    /// The devices the driver reports the server got, once ready (see `Driver::bound`).
    pub bound: Mutex<Option<String>>,
}

/// What every supervisor on a node shares; `supervise` adds the spec and the driver.
#[derive(Clone)]
pub struct Common {
    pub cache: Option<Arc<Cache>>,
    pub shared: Shared,
    pub interval: Duration,
    pub timeout: Duration,
    pub pauses: Arc<super::pause::Pauses>,
    pub events: crate::kube::events::NodeEvents,
    pub drivers: Drivers,
    pub state_dir: PathBuf,
    pub shutdown: CancellationToken,
    /// The node's report (its accelerators, for device binding).
    pub report: tokio::sync::watch::Receiver<crate::report::NodeReport>,
}

/// How this node runs agent-managed servers (`runtimes.driver`).
#[derive(Clone)]
pub enum Drivers {
    Process,
    Pod(Arc<super::pod::PodContext>),
}

impl Drivers {
    pub fn kind(&self) -> &'static str {
        match self {
            Drivers::Process => "process",
            Drivers::Pod(_) => "pod",
        }
    }
}

/// The supervision of `spec` with this node's driver, to be spawned.
pub fn supervise(
    c: &Common,
    spec: ManagedSpec,
    restarts: prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt;
    let dir = c.state_dir.join("runtimes").join(&spec.name);
    macro_rules! sup {
        ($driver:expr) => {
            Supervisor {
                driver: $driver,
                spec,
                cache: c.cache.clone(),
                shared: c.shared.clone(),
                interval: c.interval,
                timeout: c.timeout,
                restarts,
                pauses: c.pauses.clone(),
                events: c.events.clone(),
                shutdown: c.shutdown.clone(),
                bound: Mutex::new(None),
            }
            .run(stop)
            .boxed()
        };
    }
    match &c.drivers {
        Drivers::Process => sup!(ProcessDriver::new(&spec.name, dir, Some(c.report.clone()))),
        Drivers::Pod(ctx) => sup!(super::pod::PodDriver::new(ctx.clone(), &spec)),
    }
}

/// Stops the server of `name` left running with no one to supervise it (its stop was under
/// way when the agent died), and removes what is left of it.
pub async fn reap(c: &Common, name: &str, drain: Duration) {
    let dir = c.state_dir.join("runtimes").join(name);
    async fn finish<D: Driver>(d: D, name: &str, drain: Duration) {
        if let Some(h) = d.adopt().await {
            info!(runtime = name, server = ?h, "finishing the stop of a model server an earlier agent was stopping");
            d.stop(&h, drain).await;
        }
    }
    match &c.drivers {
        Drivers::Process => finish(ProcessDriver::new(name, dir.clone(), None), name, drain).await,
        Drivers::Pod(ctx) => {
            let spec = ManagedSpec {
                name: name.to_owned(),
                engine: Kind::Custom,
                model: None,
                model_name: String::new(),
                command: Vec::new(),
                port: 0,
                visible_devices: None,
                env: Vec::new(),
                ready_timeout: drain,
                drain_timeout: drain,
                image: None,
                resources: Default::default(),
            };
            finish(super::pod::PodDriver::new(ctx.clone(), &spec), name, drain).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

impl<D: Driver> Supervisor<D> {
    fn publish(&self, state: RuntimeState, reason: impl Into<String>, load: Option<super::engine::Load>) {
        let mut m = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let prev_load = m.get(&self.spec.name).map(|s| s.load.clone()).unwrap_or_default();
        let timing = m.get(&self.spec.name).and_then(|s| s.timing);
        m.insert(
            self.spec.name.clone(),
            RuntimeStatus {
                name: self.spec.name.clone(),
                engine: self.spec.engine,
                model: self.spec.model_name.clone(),
                partition_uuid: self
                    .bound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .or_else(|| self.spec.visible_devices.clone())
                    .unwrap_or_default(),
                state,
                reason: reason.into(),
                load: load.unwrap_or(prev_load),
                managed_by: "agent",
                timing,
            },
        );
    }

    fn record_timing(&self, t: super::Timing) {
        if let Some(s) = self.shared.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.spec.name) {
            s.timing = Some(t);
        }
    }

    /// Caches and pins the model; its directory.
    async fn weights(&self, stop: &CancellationToken) -> Result<Option<PathBuf>, String> {
        let (Some(spec), Some(cache)) = (&self.spec.model, &self.cache) else {
            return match &self.spec.model {
                Some(_) => Err("the model cache is off; cannot place the weights".into()),
                None => Ok(None),
            };
        };
        self.publish(RuntimeState::Starting, format!("caching {}", spec.uri), None);
        let entry = cache.ensure(spec, stop.child_token()).await.map_err(|e| format!("caching {}: {e}", spec.uri))?;
        let (c, id) = (cache.clone(), entry.id.clone());
        tokio::task::spawn_blocking(move || c.pin(&id, true))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("pinning {}: {e}", entry.id))?;
        Ok(Some(cache.model_dir(&entry.id)))
    }

    /// The command line and environment for weights in `model_dir`.
    fn launch(&self, model_dir: Option<PathBuf>) -> Launch {
        let dir = model_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
        let argv =
            self.spec.command.iter().map(|a| a.replace("{port}", &self.spec.port.to_string()).replace("{model_dir}", &dir)).collect();
        let mut env = self.spec.env.clone();
        if let Some(d) = &model_dir {
            env.push(("HEARTH_MODEL_DIR".into(), d.display().to_string()));
        }
        Launch { argv, env, port: self.spec.port, model_dir, partition: self.spec.visible_devices.clone() }
    }

    /// One read of the server.
    async fn read(&self, h: &D::Handle, client: &probe::HttpClient, engine: &EngineSpec, reader: &mut LoadReader) -> probe::Reading {
        let metrics_port = engine.metrics_port.unwrap_or(self.spec.port);
        let host = match self.driver.host(h) {
            Ok(host) => host,
            Err(why) => return probe::Reading::unreachable(&why),
        };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        probe::read(client, engine, &host, self.spec.port, metrics_port, reader, self.timeout).await
    }

    /// Waits until the server is ready, exits, the deadline passes or `stop`.
    async fn wait_ready(
        &self,
        h: &D::Handle,
        reader: &mut LoadReader,
        engine: &EngineSpec,
        stop: &CancellationToken,
    ) -> Result<Duration, String> {
        let client = probe::client();
        let t0 = Instant::now();
        loop {
            if !self.driver.alive(h) {
                return Err("the server exited before it was ready".into());
            }
            if t0.elapsed() > self.spec.ready_timeout {
                return Err(format!("not ready within {:?}", self.spec.ready_timeout));
            }
            let r = self.read(h, &client, engine, reader).await;
            match r.ready {
                Ok(()) => return Ok(t0.elapsed()),
                Err(why) => self.publish(RuntimeState::Starting, why, r.load),
            }
            tokio::select! {
                _ = stop.cancelled() => return Err("stopping".into()),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Reads the ready server each interval until it exits (`Exited`), `stop` (`Stop`), or a
    /// partition change holds it (`Held`).
    async fn watch(&self, h: &D::Handle, reader: &mut LoadReader, engine: &EngineSpec, stop: &CancellationToken) -> WatchEnd {
        let client = probe::client();
        let mut held = self.pauses.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return WatchEnd::Stop,
                _ = tokio::time::sleep(self.interval) => {}
                r = held.changed() => if r.is_ok() && self.pauses.is_held(&self.spec.name) { return WatchEnd::Held },
            }
            self.driver.tick();
            if !self.driver.alive(h) {
                return WatchEnd::Exited;
            }
            let r = self.read(h, &client, engine, reader).await;
            match (&r.live, &r.ready) {
                (Ok(()), Ok(())) => self.publish(RuntimeState::Ready, "", r.load),
                (Err(e), _) => self.publish(RuntimeState::Failed, e.to_string(), r.load),
                (Ok(()), Err(why)) => self.publish(RuntimeState::Failed, why.clone(), r.load),
            }
        }
    }

    /// Waits out a partition change with the server down; true when stopped meanwhile.
    async fn hold(&self, stop: &CancellationToken) -> bool {
        self.publish(RuntimeState::Draining, "held while its GPUs are repartitioned", None);
        self.pauses.stopped(&self.spec.name);
        info!(runtime = %self.spec.name, "held for a partition change");
        let mut held = self.pauses.subscribe();
        while self.pauses.is_held(&self.spec.name) {
            tokio::select! {
                _ = stop.cancelled() => return true,
                r = held.changed() => if r.is_err() { return true },
            }
        }
        info!(runtime = %self.spec.name, "partition change done: starting again");
        false
    }

    /// The engine's own drain on the graceful signal, forced at the drain deadline; on the
    /// agent's own stop, a server that outlives the agent is left serving for the next one.
    async fn drain(&self, h: &D::Handle) {
        if self.shutdown.is_cancelled() && self.driver.outlives_agent() {
            info!(runtime = %self.spec.name, server = ?h, "agent stopping: the model server keeps serving for the next agent to adopt");
            return;
        }
        if self.driver.alive(h) {
            self.publish(RuntimeState::Draining, "stopping", None);
        }
        self.driver.stop(h, self.spec.drain_timeout).await;
    }

    /// The supervision loop.
    pub async fn run(self, stop: CancellationToken) {
        let engine = EngineSpec::builtin(self.spec.engine);
        let mut backoff = hearth_service::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut recent_exits: Vec<Instant> = Vec::new();
        let mut adopted = self.driver.adopt().await;
        if let Some(h) = &adopted {
            info!(runtime = %self.spec.name, driver = self.driver.kind(), server = ?h, "adopted the model server an earlier agent started");
        }
        loop {
            if stop.is_cancelled() {
                return;
            }
            if self.pauses.is_held(&self.spec.name) && self.hold(&stop).await {
                return;
            }
            let mut reader = LoadReader::new(engine.names.clone());
            let started = Instant::now();
            let mut weights_s = None;
            let h = match adopted.take() {
                Some(h) => h,
                None => {
                    let w0 = Instant::now();
                    let dir = match self.weights(&stop).await {
                        Ok(d) => d,
                        Err(e) if stop.is_cancelled() => {
                            info!(runtime = %self.spec.name, reason = %e, "stopped before the weights were ready");
                            return;
                        }
                        Err(e) => {
                            self.publish(RuntimeState::Failed, e, None);
                            if sleep_or_stop(backoff.next_delay(), &stop).await {
                                return;
                            }
                            continue;
                        }
                    };
                    weights_s = Some(w0.elapsed().as_secs_f64());
                    match self.driver.start(&self.launch(dir)).await {
                        Ok(h) => h,
                        Err(e) => {
                            self.publish(RuntimeState::Failed, format!("starting: {e}"), None);
                            if sleep_or_stop(backoff.next_delay(), &stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            match self.wait_ready(&h, &mut reader, &engine, &stop).await {
                Ok(took) => {
                    info!(runtime = %self.spec.name, time_to_ready = ?took, weights_s = ?weights_s, "model server ready");
                    if let Some(got) = self.driver.bound(&h).await {
                        if self.spec.visible_devices.as_ref() != Some(&got) {
                            info!(runtime = %self.spec.name, asked = ?self.spec.visible_devices, got, "the model server's devices, as allocated");
                        }
                        // A partition change on the devices it really holds drains it.
                        self.pauses.rebind(&self.spec.name, Some(got.clone()));
                        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
                    }
                    self.publish(RuntimeState::Ready, "", None);
                    // An adopted server's start was not seen: keep what was measured before.
                    if let Some(w) = weights_s {
                        // The image pull (a pod's) is part of the wait for readiness: split it out.
                        let image = self.driver.image_seconds(&h).unwrap_or(0.0).min(took.as_secs_f64());
                        self.record_timing(super::Timing { image, weights: w, engine: took.as_secs_f64() - image });
                    }
                    match self.watch(&h, &mut reader, &engine, &stop).await {
                        WatchEnd::Stop => {
                            self.drain(&h).await;
                            return;
                        }
                        WatchEnd::Held => {
                            self.drain(&h).await;
                            if self.hold(&stop).await {
                                return;
                            }
                            backoff.reset();
                            continue;
                        }
                        WatchEnd::Exited => {}
                    }
                }
                Err(_) if stop.is_cancelled() => {
                    self.drain(&h).await;
                    return;
                }
                Err(why) => {
                    warn!(runtime = %self.spec.name, reason = %why, "model server did not become ready");
                    self.drain(&h).await;
                }
            }
            // It exited (or never got ready): restart, and say so when it keeps happening.
            let tail = self.driver.last_words(&h);
            // What is left of it (a failed pod object, a pid file) goes before the next start.
            self.driver.stop(&h, self.spec.drain_timeout).await;
            self.restarts.inc();
            let now = Instant::now();
            recent_exits.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
            recent_exits.push(now);
            let ran = now.duration_since(started);
            if ran > CRASH_WINDOW {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            if recent_exits.len() as u32 >= CRASH_LOOP_AFTER {
                if recent_exits.len() as u32 == CRASH_LOOP_AFTER {
                    self.events.post(crate::kube::events::NodeEvent::warning(
                        "RuntimeCrashLoop",
                        "Supervise",
                        format!("model server {} exited {CRASH_LOOP_AFTER} times within {CRASH_WINDOW:?}; log: {tail}", self.spec.name),
                    ));
                }
                self.publish(
                    RuntimeState::CrashLoop,
                    format!("exited {} times within {CRASH_WINDOW:?}; next start in {delay:?}; log: {tail}", recent_exits.len()),
                    None,
                );
            } else {
                self.publish(RuntimeState::Starting, format!("exited after {ran:?}; restarting in {delay:?}; log: {tail}"), None);
            }
            warn!(runtime = %self.spec.name, after = ?ran, restart_in = ?delay, "model server exited");
            if sleep_or_stop(delay, &stop).await {
                return;
            }
        }
    }
}

enum WatchEnd {
    Exited,
    Stop,
    Held,
}

/// True when stopped.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
