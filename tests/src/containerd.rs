//! A real containerd for tests, started by hand (there is no systemd on test machines) with
//! its own config, root, state and sockets in a temp dir, so it never touches a system
//! containerd or another test's. `ctr` talks to it through [`Containerd::ctr`]. On drop,
//! every task it still runs is killed, containerd stops (SIGTERM, then SIGKILL), leftover
//! shims of this instance are killed by PID, and whatever it mounted under its temp dir is
//! unmounted before the dir is removed.
//!
//! Needs root and the Debian packages `containerd` and `runc`; without them
//! [`Containerd::start`] fails and says what is missing. That is containerd 1.6 on Debian 12;
//! [`Options::binaries`] with [`containerd_17_dir`] runs Debian 13's containerd 1.7 instead
//! (scripts/test.sh unpacks it into the workspace), with the same config and the system runc. The CRI plugin is off unless
//! [`Options::cri`] asks for it (it is slower to start and `ctr` does not need it); its
//! settings are the ones this kind of machine needs (see TESTING.md): in particular
//! `restrict_oom_score_adj`, because the VM drops CAP_SYS_RESOURCE.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::{Proc, require_tool, wait_for};

/// How to start containerd.
#[derive(Debug, Clone)]
pub struct Options {
    /// The namespace [`Containerd::ctr`] works in (CRI's is `k8s.io`). Default: one of this
    /// instance's own, so that runc state (kept per namespace under /run/containerd/runc
    /// whatever the config says) never meets another test's containers of the same id.
    pub namespace: Option<String>,
    /// Load the CRI plugin (for a CRI client) with these settings; `None` disables it.
    pub cri: Option<CriOptions>,
    /// TOML appended to the generated config: new tables only (a table the generated
    /// config already has cannot be opened twice).
    pub extra_toml: String,
    /// How long to wait for containerd's socket to answer.
    pub start_timeout: Duration,
    /// A directory holding `containerd`, `ctr` and `containerd-shim-runc-v2` to run instead
    /// of those on PATH; `None`: the system's.
    pub binaries: Option<PathBuf>,
    /// Puts containerd's root (content store, snapshots, metadata) on a tmpfs of this many
    /// bytes, for tests of a full disk.
    pub root_bytes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: None,
            cri: None,
            extra_toml: String::new(),
            start_timeout: Duration::from_secs(20),
            binaries: None,
            root_bytes: None,
        }
    }
}

impl Options {
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    pub fn with_cri(mut self, cri: CriOptions) -> Self {
        self.cri = Some(cri);
        self
    }

    /// containerd's root on a tmpfs of `bytes` (see [`Options::root_bytes`]).
    pub fn root_bytes(mut self, bytes: u64) -> Self {
        self.root_bytes = Some(bytes);
        self
    }

    /// Runs `containerd`, `ctr` and the runc shim from `dir` (e.g. [`containerd_17_dir`]).
    pub fn binaries(mut self, dir: &Path) -> Self {
        self.binaries = Some(dir.to_owned());
        self
    }
}

/// Where scripts/test.sh unpacks Debian 13's containerd 1.7: `target/test-deps/containerd-1.7/
/// usr/bin` in the workspace. Fails, naming the script, when it is not there.
pub fn containerd_17_dir() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("tests/ sits in the workspace")?;
    let dir = workspace.join("target/test-deps/containerd-1.7/usr/bin");
    ensure!(
        dir.join("containerd").is_file(),
        "containerd 1.7 is not unpacked at {}: scripts/test.sh downloads Debian 13's containerd package and unpacks it there \
         (run the script, or its containerd 1.7 step)",
        dir.display()
    );
    Ok(dir)
}

/// The CRI plugin's settings that differ between tests. Everything else is fixed to what
/// works on a test machine: host-network pods only (no CNI), overlayfs, runc without
/// systemd cgroups, no AppArmor, and OOM score adjustments clamped.
#[derive(Debug, Clone)]
pub struct CriOptions {
    /// The pause image, e.g. `127.0.0.1:5000/pause:3.9` in a local registry.
    pub sandbox_image: String,
    /// Registry host configs (`hosts.toml` per registry); default: an empty dir under the
    /// temp dir, so containerd reaches `127.0.0.1` registries over plain HTTP.
    pub registry_config_dir: Option<PathBuf>,
}

impl CriOptions {
    pub fn new(sandbox_image: &str) -> Self {
        Self { sandbox_image: sandbox_image.into(), registry_config_dir: None }
    }
}

/// A containerd process of a test's own. See the module doc.
pub struct Containerd {
    proc: Option<Proc>,
    socket: PathBuf,
    namespace: String,
    ctr: PathBuf,
    containerd: PathBuf,
    config: PathBuf,
    /// PATH for the containerd process (its own shim first), when not the system's.
    path_env: Option<std::ffi::OsString>,
    start_timeout: Duration,
    // Dropped last: removed only after everything in it is stopped and unmounted.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd").field("socket", &self.socket).field("namespace", &self.namespace).finish()
    }
}

impl Containerd {
    /// Writes the config and starts containerd; returns once its socket answers.
    pub async fn start(opts: Options) -> Result<Self> {
        let (containerd, ctr, path) = match &opts.binaries {
            None => {
                let containerd = require_tool("containerd", "apt-get install -y containerd runc")?;
                let ctr = require_tool("ctr", "apt-get install -y containerd")?;
                require_tool("containerd-shim-runc-v2", "apt-get install -y containerd")?;
                (containerd, ctr, None)
            }
            Some(dir) => {
                for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
                    ensure!(dir.join(tool).is_file(), "no {tool} in {}", dir.display());
                }
                // containerd finds the shim on its PATH: ours first, then the system's (runc).
                let mut path = vec![dir.clone()];
                path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
                (dir.join("containerd"), dir.join("ctr"), Some(std::env::join_paths(path)?))
            }
        };
        require_tool("runc", "apt-get install -y runc")?;
        ensure!(
            rustix::process::geteuid().is_root(),
            "containerd needs root (it mounts snapshots and runs runc); run the suite as root (CI does)"
        );
        // Short: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new().prefix("hearth-ctrd-").tempdir_in("/tmp")?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &opts)?)?;
        if let Some(bytes) = opts.root_bytes {
            let root = dir.path().join("root");
            std::fs::create_dir_all(&root)?;
            // Unmounted with the rest of what is under the temp dir when this is dropped.
            let size = std::ffi::CString::new(format!("size={bytes}"))?;
            rustix::mount::mount("tmpfs", &root, "tmpfs", rustix::mount::MountFlags::empty(), Some(size.as_c_str()))
                .with_context(|| format!("mounting a {bytes}-byte tmpfs at {}", root.display()))?;
        }
        let mut cmd = Command::new(&containerd);
        cmd.arg("--config").arg(&config);
        if let Some(path) = &path {
            cmd.env("PATH", path);
        }
        let proc = Proc::spawn("containerd", &mut cmd, dir.path())?;
        let namespace = match opts.namespace {
            Some(ns) => ns,
            // The temp dir's random suffix is alphanumeric: a valid namespace name.
            None => {
                format!("hearth-test-{}", dir.path().file_name().and_then(|n| n.to_str()).unwrap_or("x").trim_start_matches("hearth-ctrd-"))
            }
        };
        let mut c =
            Self { proc: Some(proc), socket, namespace, ctr, containerd, config, path_env: path, start_timeout: opts.start_timeout, dir };
        let socket = c.socket.clone();
        let ready = wait_for("containerd's socket", opts.start_timeout, || {
            let socket = socket.clone();
            async move { Ok(std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ())) }
        })
        .await;
        if let Err(e) = ready {
            let log = c.log_text();
            let exited = c.proc.as_mut().and_then(|p| p.child.try_wait().ok().flatten());
            return Err(e.context(format!("containerd did not start (exit: {exited:?}); its log:\n{log}")));
        }
        // The socket accepts before every service is registered; `ctr version` needs the API.
        wait_for("containerd to answer `ctr version`", opts.start_timeout, || {
            let out = c.ctr_command().arg("version").output();
            async move { Ok(out.ok().filter(|o| o.status.success()).map(|_| ())) }
        })
        .await
        .with_context(|| c.log_text())?;
        Ok(c)
    }

    /// Restarts containerd as an upgrade or `systemctl restart` does: SIGTERM, `down` with no
    /// containerd, then the same binary and config again (same root: the content store,
    /// unfinished writes and leases survive). Returns once the new one answers.
    pub async fn restart(&mut self, down: Duration) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.signal("TERM")?;
            let gone = proc.wait_exit(Duration::from_secs(10)).await?;
            if gone.is_none() {
                proc.kill9()?;
            }
        }
        tokio::time::sleep(down).await;
        let mut cmd = Command::new(&self.containerd);
        cmd.arg("--config").arg(&self.config);
        if let Some(path) = &self.path_env {
            cmd.env("PATH", path);
        }
        self.proc = Some(Proc::spawn("containerd-restarted", &mut cmd, self.dir.path())?);
        wait_for("the restarted containerd to answer `ctr version`", self.start_timeout, || {
            let out = self.ctr_command().arg("version").output();
            async move { Ok(out.ok().filter(|o| o.status.success()).map(|_| ())) }
        })
        .await
        .with_context(|| self.log_text())
    }

    /// containerd's gRPC socket (what `ctr --address` and CRI clients dial).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The temp dir holding config, root, state, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's own log so far.
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// The server's version as `ctr version` reports it, e.g. `1.7.24~ds1`.
    pub fn server_version(&self) -> Result<String> {
        let out = self.ctr(&["version"])?;
        let server = out.split("Server:").nth(1).with_context(|| format!("no Server section in `ctr version`:\n{out}"))?;
        let version = server.lines().find_map(|l| l.trim().strip_prefix("Version:")).map(|v| v.trim().to_owned());
        version.with_context(|| format!("no server version in `ctr version`:\n{out}"))
    }

    /// Log lines saying something in the config did not work: errors other than the
    /// expected missing CNI config (there is no CNI here) and deprecation warnings.
    pub fn config_complaints(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| {
                let error = l.contains("level=error") || l.contains("level=fatal");
                let cni = l.contains("failed to load cni");
                (error && !cni) || (l.contains("level=warning") && l.contains("deprecat"))
            })
            .map(str::to_owned)
            .collect()
    }

    /// The settings of the generated config (`key = value` lines, extra TOML included) that
    /// are missing from the config containerd actually runs with (`containerd config
    /// dump`). containerd drops keys it does not know without a word in its log, so this
    /// is how a test learns that a version reads a setting under another name.
    pub fn settings_not_applied(&self) -> Result<Vec<String>> {
        let out = Command::new(&self.containerd).arg("--config").arg(&self.config).args(["config", "dump"]).output()?;
        ensure!(out.status.success(), "containerd config dump failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        let dump = String::from_utf8_lossy(&out.stdout);
        let effective: std::collections::HashSet<&str> = dump.lines().map(str::trim).collect();
        let written = std::fs::read_to_string(&self.config)?;
        let setting = |l: &&str| l.contains(" = ") && !l.starts_with('[') && !l.starts_with('#');
        Ok(written.lines().map(str::trim).filter(setting).filter(|l| !effective.contains(l)).map(str::to_owned).collect())
    }

    /// A `ctr` command pointed at this containerd and namespace; add the subcommand.
    pub fn ctr_command(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address").arg(&self.socket).arg("--namespace").arg(&self.namespace);
        c
    }

    /// Runs `ctr ARGS` to completion; its stdout, or an error with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr_output(args)?;
        if !out.status.success() {
            bail!("ctr {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ctr ARGS` to completion, whatever its exit status.
    pub fn ctr_output(&self, args: &[&str]) -> Result<Output> {
        self.ctr_command().args(args).output().with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// Imports an OCI or Docker archive; `base_name` names images whose archive refs are
    /// bare tags (`ctr images import --base-name`). Returns `ctr`'s report.
    pub fn import(&self, archive: &Path, base_name: Option<&str>) -> Result<String> {
        let archive = archive.to_str().context("archive path is not UTF-8")?;
        let mut args = vec!["images", "import"];
        if let Some(b) = base_name {
            args.extend(["--base-name", b]);
        }
        args.push(archive);
        self.ctr(&args)
    }

    /// Stops everything now (what drop does), reporting what failed on the way.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(mut proc) = self.proc.take() else { return Ok(()) };
        let mut problems = Vec::new();
        if let Err(e) = self.remove_tasks() {
            problems.push(format!("removing tasks: {e:#}"));
        }
        // SIGTERM lets containerd close its database cleanly; SIGKILL if it does not go.
        let _ = proc.signal("TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proc.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = proc.kill9();
        for pid in own_shims(&self.socket) {
            // A shim outlives containerd; these are ours (they name our socket).
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        if let Err(e) = unmount_under(self.dir.path()) {
            problems.push(format!("unmounting: {e:#}"));
        }
        if problems.is_empty() { Ok(()) } else { bail!("stopping containerd: {}", problems.join("; ")) }
    }

    /// Kills and deletes every task and container in every namespace.
    fn remove_tasks(&self) -> Result<()> {
        let namespaces = self.ctr(&["namespaces", "list", "--quiet"])?;
        for ns in namespaces.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let run = |args: &[&str]| {
                let mut c = Command::new(&self.ctr);
                c.arg("--address").arg(&self.socket).arg("--namespace").arg(ns).args(args);
                c.output()
            };
            let tasks = run(&["tasks", "list", "--quiet"])?;
            for id in String::from_utf8_lossy(&tasks.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = run(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
                // `delete --force` waits for the kill to land.
                let _ = run(&["tasks", "delete", "--force", id]);
            }
            let containers = run(&["containers", "list", "--quiet"])?;
            for id in String::from_utf8_lossy(&containers.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = run(&["containers", "delete", id]);
            }
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("{e:#}");
        }
    }
}

/// containerd's config (version 2) with everything under `dir`.
fn config_toml(dir: &Path, opts: &Options) -> Result<String> {
    let d = |p: &str| toml_str(&dir.join(p));
    let mut t = String::new();
    writeln!(t, "version = 2")?;
    writeln!(t, "root = {}", d("root"))?;
    writeln!(t, "state = {}", d("state"))?;
    if opts.cri.is_none() {
        writeln!(t, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]")?;
    }
    writeln!(t, "\n[grpc]\n  address = {}", d("containerd.sock"))?;
    writeln!(t, "\n[ttrpc]\n  address = {}", d("containerd-ttrpc.sock"))?;
    // No debug or metrics listeners: nothing a test needs, nothing to collide on.
    writeln!(t, "\n[debug]\n  address = \"\"\n\n[metrics]\n  address = \"\"")?;
    writeln!(t, "\n[plugins]")?;
    writeln!(t, "  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {}", d("opt"))?;
    if let Some(cri) = &opts.cri {
        let registry = match &cri.registry_config_dir {
            Some(p) => toml_str(p),
            None => {
                std::fs::create_dir_all(dir.join("certs.d"))?;
                d("certs.d")
            }
        };
        for sub in ["cni/bin", "cni/conf"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let cri_table = "plugins.\"io.containerd.grpc.v1.cri\"";
        writeln!(t, "  [{cri_table}]")?;
        writeln!(t, "    sandbox_image = {}", toml_str(Path::new(&cri.sandbox_image)))?;
        // Required here: without CAP_SYS_RESOURCE every sandbox fails with "can't get final
        // child's PID from pipe".
        writeln!(t, "    restrict_oom_score_adj = true")?;
        writeln!(t, "    disable_apparmor = true")?;
        writeln!(t, "    netns_mounts_under_state_dir = true")?;
        writeln!(t, "    stream_server_address = \"127.0.0.1\"\n    stream_server_port = \"0\"")?;
        writeln!(t, "    [{cri_table}.containerd]")?;
        writeln!(t, "      snapshotter = \"overlayfs\"\n      default_runtime_name = \"runc\"")?;
        writeln!(t, "      [{cri_table}.containerd.runtimes.runc]\n        runtime_type = \"io.containerd.runc.v2\"")?;
        writeln!(t, "        [{cri_table}.containerd.runtimes.runc.options]")?;
        writeln!(t, "          SystemdCgroup = false\n          Root = {}", d("runc"))?;
        writeln!(t, "    [{cri_table}.cni]\n      bin_dir = {}\n      conf_dir = {}", d("cni/bin"), d("cni/conf"))?;
        writeln!(t, "    [{cri_table}.registry]\n      config_path = {registry}")?;
    }
    if !opts.extra_toml.is_empty() {
        writeln!(t, "\n{}", opts.extra_toml)?;
    }
    Ok(t)
}

/// A TOML basic string.
fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// PIDs of `containerd-shim-runc-v2` processes started for the containerd at `socket`
/// (their command line names it after `-address`).
fn own_shims(socket: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let want = socket.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args.windows(2).any(|w| w[0] == b"-address" && w[1] == want)
        })
        .collect()
}

/// Unmounts (lazily, deepest first) every mount point under `dir`: snapshots, rootfs
/// mounts and network namespaces a killed containerd left behind.
fn unmount_under(dir: &Path) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<String> =
        mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_mount_path).filter(|p| Path::new(p).starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    let mut failed = Vec::new();
    for p in points {
        let ok = Command::new("umount").arg("--lazy").arg(&p).status().is_ok_and(|s| s.success());
        if !ok {
            failed.push(p);
        }
    }
    ensure!(failed.is_empty(), "could not unmount {failed:?}");
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_without_cri_disables_it_and_keeps_everything_in_the_dir() -> Result<()> {
        let t = config_toml(Path::new("/tmp/x"), &Options::default())?;
        assert!(t.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"), "{t}");
        assert!(t.contains("address = \"/tmp/x/containerd.sock\""), "{t}");
        assert!(t.contains("root = \"/tmp/x/root\""), "{t}");
        assert!(!t.contains("sandbox_image"), "{t}");
        Ok(())
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/tmp/plain"), "/tmp/plain");
    }
}
