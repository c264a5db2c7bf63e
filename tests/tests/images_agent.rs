#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! Image prefetch inside a running agent, against a real containerd 1.7 (CRI on) and a real
//! registry: images the config keeps are pulled and pinned at start and reported to the
//! controller; a PrefetchImage command for a model's image pins it until the model's weights
//! are evicted; and an agent killed with SIGKILL mid-pull resumes from what the content store
//! already holds. Needs root (CI runs as root).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_agent::images::runtime::Runtime;
use hearth_proto::v1 as pb;
use hearth_tests::containerd::{Containerd, CriOptions, Options, containerd_17_dir};
use hearth_tests::registry::{Registry, TestImage};
use hearth_tests::regproxy::{RegProxy, RegProxyOptions};
use hearth_tests::*;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

async fn containerd17(registry: &Registry) -> Result<Containerd> {
    let opts = Options::default()
        .namespace("k8s.io")
        .with_cri(CriOptions::new(&format!("{}/pause:3.9", registry.host())))
        .binaries(&containerd_17_dir()?);
    Containerd::start(opts).await
}

/// The agent's `images:` against the test's containerd, its mirror announced in the
/// containerd's registry host directory.
fn images_yaml(ctrd: &Containerd, keep: &[&str], extra: &str) -> String {
    let keep: Vec<String> = keep.iter().map(|k| format!("'{k}'")).collect();
    format!(
        "images: {{containerd_socket: '{}', hosts_dir: '{}', direct_above: '0', keep: [{}], check_interval: 1s, release_after: 1s{extra}}}\n",
        ctrd.socket().display(),
        ctrd.dir().join("certs.d").display(),
        keep.join(", ")
    )
}

async fn pinned(rt: &Runtime, image: &str) -> Result<bool> {
    Ok(rt.image_status(image).await?.context("image not on the node")?.pinned)
}

#[tokio::test]
async fn kept_images_are_pulled_pinned_and_reported_and_a_models_image_is_let_go_after_its_eviction() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let registry = Registry::start().await?;
    let ctrd = containerd17(&registry).await?;
    let kept = registry.push("team/kept", "v1", &TestImage::small()?).await?;
    let served = registry.push("team/engine", "v2", &TestImage::random(&[2 * MIB, MIB])?).await?;
    let model_src = dir.path().join("fsx/model");
    hearth_agent::cache::sample::write_sample_model(&model_src, 1, MIB)?;

    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let agent = AgentProc::start(dir.path(), &pki, "gpu-1", ctl.grpc_addr, &images_yaml(&ctrd, &[&kept.reference], "")).await?;
    let log = || agent.proc.log_text();
    let state = wait_for("the kept image in the controller's view", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "gpu-1").await?.filter(|s| s.images.iter().any(|i| i.reference == kept.reference && i.size_bytes > 0)))
    })
    .await
    .with_context(log)?;
    // The pull's rate, for placement to price this node's next pull from that registry.
    let source = format!("oci://{}", registry.host());
    ensure!(
        state.source_bandwidth.iter().any(|b| b.source == source && b.bytes_per_second > 0.0 && b.samples == 1),
        "no {source} rate in {:?}",
        state.source_bandwidth
    );
    let rt = Runtime::new(ctrd.socket(), "k8s.io", Duration::from_secs(10))?;
    ensure!(pinned(&rt, &kept.reference).await?, "the kept image is not pinned");
    let (_, metrics) = http_get(agent.http, "/metrics").await?;
    ensure!(metric_value(&metrics, "hearth_image_pulls_total{outcome=\"mirror\"}") == Some(1.0), "{metrics}");
    ensure!(metric_value(&metrics, "hearth_image_pinning_available") == Some(1.0), "{metrics}");
    ensure!(metric_value(&metrics, "hearth_subsystem_status{subsystem=\"images\",state=\"enabled\"}") == Some(1.0), "{metrics}");
    ensure!(metric_value(&metrics, "hearth_image_bytes_total{source=\"registry\"}").unwrap_or(0.0) >= (6 * MIB) as f64, "{metrics}");

    // The model's weights, then its image, tied to them.
    let uri = format!("file://{}", model_src.display());
    let send = |id: &str, kind| send_command(&ctl, "gpu-1", id, kind);
    send("w", pb::command::Kind::Prefetch(pb::PrefetchCommand { source_uri: uri.clone(), ..Default::default() }))?;
    let model_id = wait_for("weights cached", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "gpu-1")
            .await?
            .and_then(|s| s.models.into_iter().find(|m| m.state == pb::CacheEntryState::Ready as i32).map(|m| m.id)))
    })
    .await
    .with_context(log)?;
    send(
        "i",
        pb::command::Kind::PrefetchImage(pb::PrefetchImageCommand {
            reference: served.reference.clone(),
            source_uri: uri.clone(),
            revision: String::new(),
        }),
    )?;
    wait_for("the model's image in the controller's view", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "gpu-1").await?.filter(|s| s.images.iter().any(|i| i.reference == served.reference)))
    })
    .await
    .with_context(log)?;
    ensure!(pinned(&rt, &served.reference).await?, "the model's image is not pinned");
    let wanted = std::fs::read_to_string(dir.path().join("state-gpu-1/images.json"))?;
    ensure!(wanted.contains(&format!("model:{model_id}")), "{wanted}");

    send("e", pb::command::Kind::Evict(pb::EvictCommand { model_id: model_id.clone() }))?;
    wait_for("the model's image unpinned after its eviction", Duration::from_secs(20), || async {
        Ok((!pinned(&rt, &served.reference).await?).then_some(()))
    })
    .await
    .with_context(log)?;
    ensure!(pinned(&rt, &kept.reference).await?, "the kept image lost its pin");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn an_agent_killed_mid_pull_resumes_from_the_content_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let registry = Registry::start().await?;
    let ctrd = containerd17(&registry).await?;
    // 8 MiB/s per connection, two connections: the 48 MiB image takes about 3 s.
    let proxy =
        RegProxy::start(registry.addr(), RegProxyOptions { per_connection_bytes_per_sec: Some(8 * MIB), ..Default::default() }).await?;
    let img = registry.push("big/app", "v1", &TestImage::random(&[16 * MIB, 16 * MIB, 16 * MIB])?).await?;
    let reference = img.reference_via(&proxy.host());
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let yaml = images_yaml(&ctrd, &[&reference], ", connections: 2, chunk_size: 2Mi");
    let mut agent = AgentProc::start(dir.path(), &pki, "gpu-1", ctl.grpc_addr, &yaml).await?;
    wait_for("a third of the image in the content store", Duration::from_secs(30), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(metric_value(&m, "hearth_image_pull_done_bytes").filter(|d| *d >= (16 * MIB) as f64).map(|_| ()))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    agent.proc.kill9()?;
    let rt = Runtime::new(ctrd.socket(), "k8s.io", Duration::from_secs(10))?;
    ensure!(rt.image_status(&reference).await?.is_none(), "the image landed before the kill: make it larger");
    proxy.set_per_connection_bytes_per_sec(None);
    let agent = AgentProc::start(dir.path(), &pki, "gpu-1", ctl.grpc_addr, &yaml).await?;
    // The pull is counted once it returns (the image shows in CRI a moment before).
    let m = wait_for("the pull after the restart", Duration::from_secs(30), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(metric_value(&m, "hearth_image_pulls_total{outcome=\"mirror\"}").is_some().then_some(m))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    ensure!(rt.image_status(&reference).await?.is_some(), "the pull counted but no image in CRI");
    let reused = metric_value(&m, "hearth_image_bytes_total{source=\"content_store\"}").unwrap_or(0.0);
    let fetched = metric_value(&m, "hearth_image_bytes_total{source=\"registry\"}").unwrap_or(0.0);
    ensure!(reused >= (16 * MIB) as f64, "resumed {reused} bytes, fetched {fetched}:\n{m}");
    ensure!(reused + fetched <= (48 * MIB + MIB) as f64, "fetched more than the image: {reused} + {fetched}");
    ensure!(metric_value(&m, "hearth_image_pulls_total{outcome=\"mirror\"}") == Some(1.0), "{m}");
    stop.cancel();
    Ok(())
}
