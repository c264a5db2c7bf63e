//! Agent-managed runtimes, process driver: a model server the agent starts from its config,
//! on cached weights it has pinned, bound to the devices it is given, and supervises:
//! readiness with a deadline, restarts with jittered backoff and a crash-loop state, its
//! output in a log file rotated by size, and a graceful stop (SIGTERM, the engine's own
//! drain, SIGKILL at the deadline).
//!
//! The server runs in its own process group with its output going straight to the log file
//! (not through a pipe), so it survives the agent being killed: a restarted agent finds it
//! through its pid file (pid and kernel start time, so a reused pid is not mistaken for it)
//! and adopts it instead of starting a second server on the same devices. A clean agent
//! stop drains it: a process cannot outlive the agent's container.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::engine::{EngineSpec, Kind, LoadReader};
use super::{RuntimeState, RuntimeStatus, probe};
use crate::cache::manager::Cache;
use crate::cache::spec::ModelSpec;

/// Three exits within this long of the previous start make a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const CRASH_LOOP_AFTER: u32 = 3;
/// The log file is rotated (copied to `.1`, truncated) past this size; three files kept.
const LOG_MAX_BYTES: u64 = 10 << 20;
const LOG_KEEP: usize = 3;

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
}

/// What the supervisor publishes for the read loop and the report.
pub type Shared = Arc<Mutex<std::collections::BTreeMap<String, RuntimeStatus>>>;

/// The pid file: pid and start time (clock ticks since boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PidFile {
    pid: i32,
    start_ticks: u64,
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn alive(p: PidFile) -> bool {
    start_ticks(p.pid) == Some(p.start_ticks)
}

fn signal_group(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(p, sig);
    }
}

/// Copies the log to `.1` (shifting older ones) and truncates it when it grew past the
/// limit. The server keeps writing: it opened the file for appending.
fn rotate(log: &Path) {
    let Ok(meta) = std::fs::metadata(log) else { return };
    if meta.len() < LOG_MAX_BYTES {
        return;
    }
    for i in (1..LOG_KEEP).rev() {
        let _ = std::fs::rename(log.with_extension(format!("log.{i}")), log.with_extension(format!("log.{}", i + 1)));
    }
    if std::fs::copy(log, log.with_extension("log.1")).is_ok()
        && let Ok(f) = std::fs::OpenOptions::new().write(true).open(log)
    {
        let _ = f.set_len(0);
    }
}

/// Runs one managed runtime until `stop`, then drains it.
pub struct Supervisor {
    pub spec: ManagedSpec,
    pub dir: PathBuf,
    pub cache: Option<Arc<Cache>>,
    pub shared: Shared,
    pub interval: Duration,
    pub timeout: Duration,
    pub restarts: prometheus_client::metrics::counter::Counter,
    /// Holds from partition changes.
    pub pauses: Arc<super::pause::Pauses>,
    /// Crash loops become Events on the Node.
    pub events: crate::kube::events::NodeEvents,
}

impl Supervisor {
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
                partition_uuid: self.spec.visible_devices.clone().unwrap_or_default(),
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

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("pid.json")
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

    fn spawn(&self, model_dir: Option<&Path>) -> Result<PidFile, String> {
        let subst = |s: &str| {
            s.replace("{port}", &self.spec.port.to_string())
                .replace("{model_dir}", &model_dir.map(|d| d.display().to_string()).unwrap_or_default())
        };
        let argv: Vec<String> = self.spec.command.iter().map(|a| subst(a)).collect();
        let (prog, args) = argv.split_first().ok_or("runtimes.managed: empty command")?;
        rotate(&self.log_path());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening {}: {e}", self.log_path().display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args).stdin(std::process::Stdio::null()).stdout(log).stderr(err);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        if let Some(d) = &self.spec.visible_devices {
            cmd.env("CUDA_VISIBLE_DEVICES", d).env("NVIDIA_VISIBLE_DEVICES", d);
        }
        if let Some(dir) = model_dir {
            cmd.env("HEARTH_MODEL_DIR", dir);
        }
        // Its own process group: signals reach the engine's workers too, and killing the
        // agent does not take the server with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| format!("starting {prog}: {e}"))?;
        let pid = child.id() as i32;
        // Reaped by a thread: the supervisor watches the pid, as it does for an adopted server.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let p = PidFile { pid, start_ticks: start_ticks(pid).unwrap_or(0) };
        if let Err(e) = hearth_service::fsutil::write_atomic(&self.pid_path(), &serde_json::to_vec(&p).unwrap_or_default(), false) {
            warn!(runtime = %self.spec.name, error = %e, "cannot record the server's pid; a restarted agent will not adopt it");
        }
        info!(runtime = %self.spec.name, pid, command = ?argv, "model server started");
        Ok(p)
    }

    /// A server an earlier agent started and left running.
    fn adoptable(&self) -> Option<PidFile> {
        let p: PidFile = serde_json::from_slice(&std::fs::read(self.pid_path()).ok()?).ok()?;
        alive(p).then_some(p)
    }

    /// One read of the server on this host.
    async fn read(&self, client: &probe::HttpClient, engine: &EngineSpec, reader: &mut LoadReader) -> probe::Reading {
        let metrics_port = engine.metrics_port.unwrap_or(self.spec.port);
        probe::read(client, engine, "127.0.0.1", self.spec.port, metrics_port, reader, self.timeout).await
    }

    /// Waits until the server is ready, exits, the deadline passes or `stop`.
    async fn wait_ready(
        &self,
        p: PidFile,
        reader: &mut LoadReader,
        engine: &EngineSpec,
        stop: &CancellationToken,
    ) -> Result<Duration, String> {
        let client = probe::client();
        let t0 = Instant::now();
        loop {
            if !alive(p) {
                return Err("the server exited before it was ready".into());
            }
            if t0.elapsed() > self.spec.ready_timeout {
                return Err(format!("not ready within {:?}", self.spec.ready_timeout));
            }
            let r = self.read(&client, engine, reader).await;
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
    async fn watch(&self, p: PidFile, reader: &mut LoadReader, engine: &EngineSpec, stop: &CancellationToken) -> WatchEnd {
        let client = probe::client();
        let mut held = self.pauses.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return WatchEnd::Stop,
                _ = tokio::time::sleep(self.interval) => {}
                r = held.changed() => if r.is_ok() && self.pauses.is_held(&self.spec.name) { return WatchEnd::Held },
            }
            rotate(&self.log_path());
            if !alive(p) {
                return WatchEnd::Exited;
            }
            let r = self.read(&client, engine, reader).await;
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

    /// SIGTERM to the group, then SIGKILL at the drain deadline.
    async fn drain(&self, p: PidFile) {
        if !alive(p) {
            return;
        }
        self.publish(RuntimeState::Draining, "stopping", None);
        signal_group(p.pid, rustix::process::Signal::TERM);
        let t0 = Instant::now();
        while alive(p) && t0.elapsed() < self.spec.drain_timeout {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(p) {
            warn!(runtime = %self.spec.name, pid = p.pid, after = ?self.spec.drain_timeout, "model server still running after the drain deadline: SIGKILL");
            signal_group(p.pid, rustix::process::Signal::KILL);
            while alive(p) && t0.elapsed() < self.spec.drain_timeout + Duration::from_secs(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_file(self.pid_path());
        info!(runtime = %self.spec.name, took = ?t0.elapsed(), "model server stopped");
    }

    /// The supervision loop.
    pub async fn run(self, stop: CancellationToken) {
        let engine = EngineSpec::builtin(self.spec.engine);
        let mut backoff = hearth_service::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut recent_exits: Vec<Instant> = Vec::new();
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            self.publish(RuntimeState::Failed, format!("creating {}: {e}", self.dir.display()), None);
            return;
        }
        let mut adopted = self.adoptable();
        if let Some(p) = adopted {
            info!(runtime = %self.spec.name, pid = p.pid, "adopted the model server an earlier agent started");
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
            let p = match adopted.take() {
                Some(p) => p,
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
                    match self.spawn(dir.as_deref()) {
                        Ok(p) => p,
                        Err(e) => {
                            self.publish(RuntimeState::Failed, e, None);
                            if sleep_or_stop(backoff.next_delay(), &stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            match self.wait_ready(p, &mut reader, &engine, &stop).await {
                Ok(took) => {
                    info!(runtime = %self.spec.name, time_to_ready = ?took, weights_s = ?weights_s, "model server ready");
                    self.publish(RuntimeState::Ready, "", None);
                    // An adopted server's start was not seen: keep what was measured before.
                    if let Some(w) = weights_s {
                        self.record_timing(super::Timing { image: 0.0, weights: w, engine: took.as_secs_f64() });
                    }
                    match self.watch(p, &mut reader, &engine, &stop).await {
                        WatchEnd::Stop => {
                            self.drain(p).await;
                            return;
                        }
                        WatchEnd::Held => {
                            self.drain(p).await;
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
                    self.drain(p).await;
                    return;
                }
                Err(why) => {
                    warn!(runtime = %self.spec.name, reason = %why, "model server did not become ready");
                    self.drain(p).await;
                }
            }
            // It exited (or never got ready): restart, and say so when it keeps happening.
            self.restarts.inc();
            let now = Instant::now();
            recent_exits.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
            recent_exits.push(now);
            let ran = now.duration_since(started);
            if ran > CRASH_WINDOW {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            let tail = log_tail(&self.log_path(), 3);
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

/// The last `n` lines of the log, on one line, for a status reason.
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(4096)..]).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_tell_a_process_from_a_reused_pid() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).expect("own stat");
        assert!(alive(PidFile { pid: me, start_ticks: t }));
        assert!(!alive(PidFile { pid: me, start_ticks: t + 1 }), "same pid, another start: not ours");
        assert!(!alive(PidFile { pid: i32::MAX, start_ticks: t }));
    }

    #[test]
    fn the_log_rotates_by_copy_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        std::fs::write(&log, vec![b'x'; LOG_MAX_BYTES as usize]).unwrap();
        rotate(&log);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(std::fs::metadata(dir.path().join("server.log.1")).unwrap().len(), LOG_MAX_BYTES);
        std::fs::write(&log, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(log_tail(&log, 3), "b | c | d");
    }
}
