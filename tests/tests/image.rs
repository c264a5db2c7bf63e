//! The container image under real containerd (needs root): `scripts/build-image.sh` packs
//! the binaries of this build onto a Debian bookworm base, containerd imports the OCI
//! archive, and the image must answer `hearth --version` and run the agent with simulated
//! GPUs until SIGTERM stops it cleanly. Without root, containerd, runc, mmdebstrap or umoci
//! these tests fail and say what is missing (scripts/test.sh installs them; CI runs as root).
//!
//! The Debian root filesystem is cached in target/image/cache (the first run builds it in
//! about 30 s); each run writes its image to a temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_tests::containerd::{Containerd, CriOptions, Options};
use hearth_tests::*;

const IMAGE_NAME: &str = "ghcr.io/hearth-dev/hearth";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_owned()
}

/// Runs scripts/build-image.sh with the binaries next to this test; the OCI archive's path.
fn build_image(out: &Path) -> Result<PathBuf> {
    ensure!(rustix::process::geteuid().is_root(), "building the image runs mmdebstrap in root mode; run the suite as root (CI does)");
    require_tool("mmdebstrap", "apt-get install -y mmdebstrap")?;
    require_tool("umoci", "apt-get install -y umoci")?;
    let bin_dir = bin("hearth").parent().expect("target dir").to_owned();
    bin("hearth-controller");
    let root = repo_root();
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(root.join("scripts/build-image.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(root.join("target/image/cache"))
        .args(["--name", IMAGE_NAME])
        .current_dir(&root)
        .output()
        .context("running scripts/build-image.sh")?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "scripts/build-image.sh failed ({}):\n{text}", output.status);
    eprintln!("build-image.sh took {:?}:\n{text}", started.elapsed());
    let archive = out.join("hearth-oci.tar");
    ensure!(archive.is_file(), "build-image.sh did not write {}:\n{text}", archive.display());
    Ok(archive)
}

#[tokio::test]
async fn root_image_runs_hearth_version_and_the_agent_with_simulated_gpus_under_containerd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = build_image(&dir.path().join("image"))?;
    let ctrd = Containerd::start(Options::default()).await?;

    let imported = ctrd.import(&archive, Some(IMAGE_NAME))?;
    let image = format!("{IMAGE_NAME}:{VERSION}");
    let listed = ctrd.ctr(&["images", "list", "--quiet"])?;
    ensure!(listed.lines().any(|l| l.trim() == image), "{image} not among the imported images:\n{listed}\nimport said:\n{imported}");

    // `hearth --version`: the binary runs on the image's glibc, and on the image's PATH.
    let out = ctrd.ctr_output(&["run", "--rm", &image, "hearth-version", "hearth", "--version"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "hearth --version in the image failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim_end(), format!("hearth {VERSION}"));
    // The agent's HTTPS clients (S3, the API server) trust the system roots.
    let out = ctrd.ctr_output(&["run", "--rm", &image, "ca-bundle", "test", "-s", "/etc/ssl/certs/ca-certificates.crt"])?;
    assert!(out.status.success(), "no CA bundle in the image: {}", String::from_utf8_lossy(&out.stderr));

    // The agent as the DaemonSet runs it: config mounted read-only, state on a host path,
    // host network (so its port-0 listener is reachable here).
    let etc = dir.path().join("etc-hearth");
    let state = dir.path().join("var-lib-hearth");
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&state)?;
    std::fs::write(
        etc.join("agent.yaml"),
        "node_name: image-test\nhttp_listen: 127.0.0.1:0\n\
         devices: {backend: simulated, simulated: [2xH100-80GB], collect_interval: 300ms}\n\
         state_dir: /var/lib/hearth\ncache: {root: /var/lib/hearth/cache}\n",
    )?;
    let mut cmd = ctrd.ctr_command();
    cmd.args(["run", "--rm", "--net-host"])
        .arg("--mount")
        .arg(format!("type=bind,src={},dst=/etc/hearth,options=rbind:ro", etc.display()))
        .arg("--mount")
        .arg(format!("type=bind,src={},dst=/var/lib/hearth,options=rbind:rw", state.display()))
        .args([&image, "hearth-agent", "hearth", "agent", "--config", "/etc/hearth/agent.yaml"]);
    let mut agent = Proc::spawn("agent-in-image", &mut cmd, dir.path())?;
    let line = agent.wait_for_log_line("agent serving /metrics", Duration::from_secs(30)).await?;
    let http = logged_addr(&line, "http_addr")?;
    let (status, body) = http_get(http, "/healthz").await?;
    assert_eq!(status, 200, "{body}");
    let metrics = wait_for("simulated GPU metrics from the agent in the image", Duration::from_secs(10), || async move {
        let (_, m) = http_get(http, "/metrics").await?;
        Ok((m.lines().filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{")).count() == 2).then_some(m))
    })
    .await
    .with_context(|| agent.log_text())?;
    assert!(metrics.contains("hearth_subsystem_status"), "{metrics}");
    ensure!(state.join("cache").is_dir(), "the agent did not create its cache under the mounted state dir");

    // SIGTERM through containerd (what the kubelet sends): the agent stops and exits 0.
    ctrd.ctr(&["tasks", "kill", "--signal", "SIGTERM", "hearth-agent"])?;
    let exit = agent.wait_exit(Duration::from_secs(15)).await?;
    let log = agent.log_text();
    assert!(exit.is_some_and(|s| s.success()), "agent in the image did not exit cleanly on SIGTERM ({exit:?}):\n{log}");
    assert!(log.contains("agent stopped"), "{log}");
    ctrd.stop()
}

/// The harness with the CRI plugin on, as later CRI tests use it: it must load (a bad
/// setting leaves the plugin in an error state while containerd runs on).
#[tokio::test]
async fn root_containerd_harness_loads_the_cri_plugin_when_asked() -> Result<()> {
    let ctrd = Containerd::start(Options::default().namespace("k8s.io").with_cri(CriOptions::new("127.0.0.1:5000/pause:3.9"))).await?;
    let plugins = ctrd.ctr(&["plugins", "list"])?;
    let cri = plugins.lines().find(|l| l.split_whitespace().nth(1) == Some("cri"));
    assert!(cri.is_some_and(|l| l.split_whitespace().last() == Some("ok")), "CRI plugin not ok:\n{plugins}\n{}", ctrd.log_text());
    let without = Containerd::start(Options::default()).await?;
    let plugins = without.ctr(&["plugins", "list"])?;
    assert!(!plugins.lines().any(|l| l.split_whitespace().nth(1) == Some("cri")), "CRI plugin loaded though disabled:\n{plugins}");
    without.stop()?;
    ctrd.stop()
}
