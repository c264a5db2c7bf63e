//! How an agent-managed model server runs: the one trait the supervisor drives, and the
//! process driver. The pod driver is in `pod`.
//!
//! A driver starts the server from a [`Launch`] (argv and environment already decided by
//! the supervisor), tells whether it still runs and where to read it, finds one an earlier
//! agent left running (adoption), and stops it gracefully within a deadline. Readiness,
//! restarts, crash loops and drains are the supervisor's, the same for every driver.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// The log file is rotated (copied to `.1`, truncated) past this size; three files kept.
const LOG_MAX_BYTES: u64 = 10 << 20;
const LOG_KEEP: usize = 3;

/// What to run: decided by the supervisor, carried out by a driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// Program and arguments, `{port}` and `{model_dir}` already replaced.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub port: u16,
    /// The cached weights (pinned while the server runs).
    pub model_dir: Option<PathBuf>,
    /// The GPU or MIG instance (UUID or index) it is bound to.
    pub partition: Option<String>,
}

/// One way of running a model server.
pub trait Driver: Send + Sync + 'static {
    /// What identifies one running server (a pid and its start time; a pod's name and UID).
    type Handle: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// "process" or "pod", for logs and status.
    fn kind(&self) -> &'static str;

    /// A server an earlier agent started and left running, to be supervised again.
    fn adopt(&self) -> impl Future<Output = Option<Self::Handle>> + Send;

    fn start(&self, launch: &Launch) -> impl Future<Output = Result<Self::Handle, String>> + Send;

    /// Whether the server still runs (false once it exited, failed or was deleted).
    fn alive(&self, h: &Self::Handle) -> bool;

    /// The address to read it at, or why it has none yet.
    fn host(&self, h: &Self::Handle) -> Result<String, String>;

    /// Whether it keeps serving when the agent stops (and is adopted by the next agent)
    /// rather than being drained with it.
    fn outlives_agent(&self) -> bool {
        false
    }

    /// The devices the server actually got, where something other than the agent chose
    /// them (the device plugin, for a pod); None: the partition it was started with.
    fn bound(&self, _h: &Self::Handle) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }

    /// Seconds spent getting the server's image onto the node, once known.
    fn image_seconds(&self, _h: &Self::Handle) -> Option<f64> {
        None
    }

    /// Stops it: the graceful signal, then a forced stop at `grace`. Returns once it is gone.
    fn stop(&self, h: &Self::Handle, grace: Duration) -> impl Future<Output = ()> + Send;

    /// Why it stopped, or the last lines of its output, on one line.
    fn last_words(&self, h: &Self::Handle) -> String;

    /// Housekeeping once per read interval (log rotation).
    fn tick(&self) {}
}

/// The environment that binds a process to its partition: a Neuron core range
/// ("neuroncores:4-7") through `NEURON_RT_VISIBLE_CORES`; GPUs and MIG instances (UUIDs or
/// indices) through `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES`.
pub fn device_env(partition: &str) -> Vec<(&'static str, String)> {
    match partition.strip_prefix("neuroncores:") {
        Some(range) => vec![("NEURON_RT_VISIBLE_CORES", range.to_owned())],
        None => vec![("CUDA_VISIBLE_DEVICES", partition.to_owned()), ("NVIDIA_VISIBLE_DEVICES", partition.to_owned())],
    }
}

/// The pid file: pid and start time (clock ticks since boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PidFile {
    pub pid: i32,
    pub start_ticks: u64,
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn pid_alive(p: PidFile) -> bool {
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

/// The last `n` lines of the log, on one line, for a status reason.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(4096)..]).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// FNV-1a, 32 bits: a short stable tag, not a security boundary.
fn fnv(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5, |h, &x| (h ^ u32::from(x)).wrapping_mul(0x0100_0193))
}

/// A cgroup v2 directory of one server: every process the engine forks stays in it (a
/// worker that calls setsid leaves the process group, not the cgroup), so the forced stop
/// kills them all through `cgroup.kill` and a stop is over only when the cgroup is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    /// `<the agent's cgroup>/hearth-runtime-<name>-<hash of its state directory>` (two
    /// agents in one cgroup, as in tests, never share one), created; an error where cgroup
    /// v2 is missing or not writable, as in an unprivileged container.
    fn create(name: &str, state: &Path) -> Result<Self, String> {
        let mount = crate::netobs::cgroup2_mount().ok_or("no cgroup v2 mount in /proc/self/mountinfo")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("the agent is in no cgroup v2 group")?;
        let dir = mount
            .join(rel.trim_start_matches('/'))
            .join(format!("hearth-runtime-{name}-{:08x}", fnv(state.as_os_str().as_encoded_bytes())));
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(Self(dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Self(dir)),
            Err(e) => Err(format!("creating {}: {e}", dir.display())),
        }
    }

    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.0.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    fn kill(&self) -> bool {
        std::fs::write(self.0.join("cgroup.kill"), "1").is_ok()
    }

    /// Removes the directory once it is empty (a cgroup with processes cannot be removed).
    fn remove(&self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A child process of the agent, in its own process group and cgroup, writing straight to a
/// log file (not through a pipe) so it survives the agent being killed; a restarted agent
/// finds it through its pid file (pid and kernel start time, so a reused pid is not taken
/// for it) and adopts it. A clean agent stop drains it: a process cannot outlive the
/// agent's container.
#[derive(Debug)]
pub struct ProcessDriver {
    pub name: String,
    /// pid file and logs.
    pub dir: PathBuf,
    cgroup: Option<Cgroup>,
    /// The node's accelerators (a MIG partition is exposed alone, as in a container).
    report: Option<tokio::sync::watch::Receiver<crate::report::NodeReport>>,
}

impl ProcessDriver {
    pub fn new(name: &str, dir: PathBuf, report: Option<tokio::sync::watch::Receiver<crate::report::NodeReport>>) -> Self {
        let cgroup = match Cgroup::create(name, &dir) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(runtime = name, error = %e, "no cgroup of its own for the model server: a forced stop reaches its process group only");
                None
            }
        };
        Self { name: name.to_owned(), dir, cgroup, report }
    }

    /// A real MIG instance's device view, when the partition names one.
    fn mig_view(&self, partition: &str) -> Option<Result<super::isolate::DeviceView, String>> {
        let report = self.report.as_ref()?.borrow();
        let (gpu, mig) = report
            .accelerators
            .iter()
            .filter(|a| !a.simulated)
            .find_map(|a| a.gpu.as_ref()?.mig_devices.iter().find(|m| m.uuid == partition).map(|m| (a, m)))?;
        Some(super::isolate::plan(Path::new("/dev"), Path::new("/proc"), &gpu.pci_bus_id, mig.gi_id, mig.ci_id))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("pid.json")
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Alive by pid, or by anything left in its cgroup (workers outliving their parent).
    fn running(&self, p: PidFile) -> bool {
        pid_alive(p) || self.cgroup.as_ref().is_some_and(|c| !c.procs().is_empty())
    }

    fn spawn(&self, l: &Launch) -> Result<PidFile, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let (prog, args) = l.argv.split_first().ok_or("empty command")?;
        rotate(&self.log_path());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening {}: {e}", self.log_path().display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args).stdin(std::process::Stdio::null()).stdout(log).stderr(err);
        for (k, v) in &l.env {
            cmd.env(k, v);
        }
        match l.partition.as_deref().and_then(|p| self.mig_view(p).map(|v| (p, v))) {
            // One MIG instance, alone in the child's view: CUDA's device 0.
            Some((p, Ok(view))) => {
                cmd.env("CUDA_VISIBLE_DEVICES", "0").env("NVIDIA_VISIBLE_DEVICES", p);
                super::isolate::apply(&mut cmd, view);
            }
            Some((p, Err(e))) => return Err(format!("exposing MIG instance {p} alone: {e}")),
            None => {
                for (k, v) in l.partition.as_deref().map(device_env).unwrap_or_default() {
                    cmd.env(k, v);
                }
            }
        }
        // Its own process group: signals reach the engine's workers too, and killing the
        // agent does not take the server with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // Into its cgroup before exec, so nothing it runs ever sits in the agent's. The file
        // is opened here (close-on-exec): the child only writes to it.
        let procs = self.cgroup.as_ref().and_then(|c| std::fs::OpenOptions::new().write(true).open(c.0.join("cgroup.procs")).ok());
        if let Some(f) = procs {
            // SAFETY: only a write(2) on an open descriptor runs between fork and exec: no
            // allocation, no lock. Moving the child from the parent after spawn would leave
            // anything it forks before the move in the agent's cgroup.
            #[allow(unsafe_code)]
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    rustix::io::write(&f, b"0").map(|_| ()).map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().map_err(|e| format!("starting {prog}: {e}"))?;
        let pid = child.id() as i32;
        // Reaped by a thread: the supervisor watches the pid, as it does for an adopted server.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let p = PidFile { pid, start_ticks: start_ticks(pid).unwrap_or(0) };
        if let Err(e) = hearth_service::fsutil::write_atomic(&self.pid_path(), &serde_json::to_vec(&p).unwrap_or_default(), false) {
            warn!(runtime = %self.name, error = %e, "cannot record the server's pid; a restarted agent will not adopt it");
        }
        info!(runtime = %self.name, pid, command = ?l.argv, cgroup = ?self.cgroup.as_ref().map(|c| &c.0), "model server started");
        Ok(p)
    }
}

impl Driver for ProcessDriver {
    type Handle = PidFile;

    fn kind(&self) -> &'static str {
        "process"
    }

    async fn adopt(&self) -> Option<PidFile> {
        let p: PidFile = serde_json::from_slice(&std::fs::read(self.pid_path()).ok()?).ok()?;
        pid_alive(p).then_some(p)
    }

    async fn start(&self, l: &Launch) -> Result<PidFile, String> {
        self.spawn(l)
    }

    fn alive(&self, p: &PidFile) -> bool {
        pid_alive(*p)
    }

    fn host(&self, _: &PidFile) -> Result<String, String> {
        Ok("127.0.0.1".into())
    }

    /// SIGTERM to the group, then SIGKILL to the group and the cgroup at the deadline.
    async fn stop(&self, p: &PidFile, grace: Duration) {
        let p = *p;
        if self.running(p) {
            signal_group(p.pid, rustix::process::Signal::TERM);
            let t0 = Instant::now();
            while self.running(p) && t0.elapsed() < grace {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.running(p) {
                warn!(runtime = %self.name, pid = p.pid, after = ?grace, "model server still running after the drain deadline: SIGKILL");
                signal_group(p.pid, rustix::process::Signal::KILL);
                if let Some(c) = &self.cgroup {
                    c.kill();
                }
                while self.running(p) && t0.elapsed() < grace + Duration::from_secs(2) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            info!(runtime = %self.name, took = ?t0.elapsed(), "model server stopped");
        }
        let _ = std::fs::remove_file(self.pid_path());
    }

    fn last_words(&self, _: &PidFile) -> String {
        log_tail(&self.log_path(), 3)
    }

    fn tick(&self) {
        rotate(&self.log_path());
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        // Only an empty cgroup goes: a server left running for the next agent keeps its own.
        if let Some(c) = &self.cgroup {
            c.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_bind_through_the_runtimes_variables() {
        assert_eq!(device_env("neuroncores:4-7"), vec![("NEURON_RT_VISIBLE_CORES", "4-7".to_owned())]);
        assert_eq!(device_env("GPU-a,GPU-b")[0], ("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b".to_owned()));
    }

    #[test]
    fn start_ticks_tell_a_process_from_a_reused_pid() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).expect("own stat");
        assert!(pid_alive(PidFile { pid: me, start_ticks: t }));
        assert!(!pid_alive(PidFile { pid: me, start_ticks: t + 1 }), "same pid, another start: not ours");
        assert!(!pid_alive(PidFile { pid: i32::MAX, start_ticks: t }));
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
