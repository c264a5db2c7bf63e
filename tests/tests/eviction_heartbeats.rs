//! An Evict command that deletes a large model directory must not stall the agent's stream:
//! heartbeats keep flowing and the controller keeps the node `connected` the whole time.
//! The controller and the agent run in this process over real mTLS gRPC; the model is a
//! real directory of 100,000 files, whose removal takes seconds on any disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_agent::cache::index::{EntryState, FileEntry, Index, IndexEntry, VerificationKind, now_secs};
use hearth_proto::v1 as pb;
use hearth_tests::{TestPki, start_controller, wait_for};
use tokio_util::sync::CancellationToken;

const NODE: &str = "evict-1";
const HEARTBEAT: Duration = Duration::from_millis(100);
const MODEL: &str = "big-model";
const STALE_AFTER: Duration = Duration::from_secs(1);

/// A cached, ready model of `files` empty files in 100 directories, as the cache indexes it.
fn seed_model(cache_root: &Path, files: usize) -> Result<()> {
    let dir = cache_root.join("models").join(MODEL);
    for d in 0..100 {
        std::fs::create_dir_all(dir.join(d.to_string()))?;
    }
    for i in 0..files {
        std::fs::File::create(dir.join((i % 100).to_string()).join(format!("shard-{i}.bin")))?;
    }
    let mut e = IndexEntry {
        id: MODEL.into(),
        uri: "file:///models/big".into(),
        revision: String::new(),
        include: Vec::new(),
        exclude: Vec::new(),
        state: EntryState::Ready,
        files: vec![FileEntry {
            key: "0/shard-0.bin".into(),
            size: 0,
            version: String::new(),
            verification: Some(VerificationKind::Unverified),
            ready: true,
        }],
        bytes_present: 0,
        bytes_total: 0,
        verification: None,
        pinned: false,
        created: now_secs(),
        last_used: now_secs(),
        error: None,
    };
    e.refresh();
    Index::new(cache_root).put(&e)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_flowing_while_a_large_eviction_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let stop = CancellationToken::new();
    // Ten heartbeats missed while the model is deleted would make the node stale.
    let controller = start_controller(&pki, stop.clone(), |c| c.stale_after = format!("{}ms", STALE_AFTER.as_millis())).await?;

    let cache_root = dir.path().join("cache");
    let seeding = Instant::now();
    seed_model(&cache_root, 100_000)?;
    let seeded_in = seeding.elapsed();

    let files = pki.client(NODE)?;
    let yaml = format!(
        "node_name: {NODE}\nhttp_listen: 127.0.0.1:0\n\
         controller:\n  url: https://{}\n  server_name: localhost\n  heartbeat_interval: {}ms\n  \
         tls: {{ca: {}, cert: {}, key: {}}}\n\
         devices: {{backend: none}}\nnetwork: {{enabled: false}}\nstate_dir: {}\ncache: {{root: {}}}\n",
        controller.grpc_addr,
        HEARTBEAT.as_millis(),
        files.ca.display(),
        files.cert.display(),
        files.key.display(),
        dir.path().join("state").display(),
        cache_root.display(),
    );
    let raw = hearth_agent::config::RawConfig::from_yaml(Path::new("agent.yaml"), &yaml)?;
    let agent = hearth_agent::daemon::start(hearth_agent::config::Config::try_from(raw)?, stop.clone()).await?;

    let state = controller.state.clone();
    let has_model = move || state.get(NODE, Instant::now()).is_some_and(|(_, s)| s.models.iter().any(|m| m.id == MODEL));
    wait_for("the agent to report the seeded model", Duration::from_secs(20), || {
        let has = has_model.clone();
        async move { Ok(has().then_some(())) }
    })
    .await?;

    // Hello carries what started on this node, not what the build could do: no devices,
    // so no GPU metrics or partitioning; network metrics were turned off.
    let (view, _) = controller.state.get(NODE, Instant::now()).context("node known")?;
    let caps = &view.hello.capabilities;
    ensure!(caps.iter().any(|c| c == "cache") && caps.iter().any(|c| c == "node-metrics"), "capabilities {caps:?}");
    ensure!(
        !caps.iter().any(|c| c.starts_with("devices.") || c == "gpu-metrics" || c.starts_with("partition") || c.starts_with("network")),
        "capabilities of subsystems that are off: {caps:?}"
    );

    let cmd = pb::Command {
        id: "evict-1".into(),
        idempotency_key: "evict-big-model".into(),
        deadline: None,
        kind: Some(pb::command::Kind::Evict(pb::EvictCommand { model_id: MODEL.into() })),
    };
    controller.state.send_command(NODE, cmd).context("sending Evict")?;
    let started = Instant::now();
    let model_dir = cache_root.join("models").join(MODEL);
    // Watch the node from the controller's side every 20 ms until the model is gone.
    let mut worst_age = Duration::ZERO;
    let mut samples = 0u32;
    let mut fresh = 0u32;
    loop {
        let (view, s) = controller.state.get(NODE, Instant::now()).context("node vanished from the controller")?;
        ensure!(
            view.connection.as_str() == "connected",
            "node {} during the eviction (after {:?})",
            view.connection.as_str(),
            started.elapsed()
        );
        worst_age = worst_age.max(view.last_report_age);
        if view.last_report_age < HEARTBEAT * 2 {
            fresh += 1;
        }
        samples += 1;
        if !model_dir.exists() && !s.models.iter().any(|m| m.id == MODEL) {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(120), "eviction did not finish within 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    println!(
        "evicted 100,000 files in {took:?} (seeded in {seeded_in:?}); worst report age {worst_age:?}, {fresh} of {samples} samples fresh"
    );
    // The test means something only if the deletion outlasted many heartbeat intervals.
    ensure!(
        took >= HEARTBEAT * 5,
        "the eviction took only {took:?} (seeding took {seeded_in:?}); the test needs one that outlasts five heartbeats"
    );
    // While it ran, the controller never went a stale_after without hearing from the node,
    // and mostly heard from it within two intervals.
    ensure!(worst_age < STALE_AFTER, "the controller heard nothing from the node for {worst_age:?} during a {took:?} eviction");
    ensure!(fresh * 2 >= samples, "only {fresh} of {samples} samples saw a report within two heartbeats over {took:?}");

    // The command's end reached the controller too: the eviction is counted on the agent.
    let metrics = wait_for("the eviction in the agent's metrics", Duration::from_secs(10), || async {
        let (_, body) = hearth_tests::http_get(agent.http_addr, "/metrics").await?;
        Ok(hearth_tests::metric_value(&body, "hearth_cache_evictions_total").filter(|v| *v >= 1.0).map(|_| body))
    })
    .await?;
    ensure!(metrics.contains("hearth_subsystem_status{subsystem=\"cache\",state=\"enabled\"} 1"), "cache subsystem not enabled");

    stop.cancel();
    agent.wait().await?;
    controller.wait().await?;
    Ok(())
}
