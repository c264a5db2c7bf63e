#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! The cache inside a running agent: configured models are warmed and reported to the
//! controller, and a Prefetch command sent down the stream lands in the agent's cache and in
//! the controller's view.

use std::time::Duration;

use anyhow::Result;
use hearth_proto::v1 as pb;
use hearth_tests::*;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn warm_models_and_prefetch_commands_reach_the_controller_view() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let warm_src = dir.path().join("fsx/warm-model");
    let cmd_src = dir.path().join("fsx/cmd-model");
    hearth_agent::cache::sample::write_sample_model(&warm_src, 2, 6 << 20)?;
    hearth_agent::cache::sample::write_sample_model(&cmd_src, 1, 2 << 20)?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let extra = format!("  models: [{{uri: 'file://{}', pin: true}}]\n", warm_src.display());
    let agent = AgentProc::start_with_cache_models(dir.path(), &pki, "gpu-1", ctl.grpc_addr, &extra).await?;

    let state = wait_for("warm model ready in the controller view", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "gpu-1")
            .await?
            .filter(|s| s.models.iter().any(|m| m.state == pb::CacheEntryState::Ready as i32 && m.bytes_present == m.bytes_total)))
    })
    .await
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let m = &state.models[0];
    assert!(m.pinned, "configured pin is reported");
    assert_eq!(m.verification, "unverified");
    assert!(m.bytes_total > 12 << 20);
    let bw = state.source_bandwidth.first();
    assert!(
        bw.is_some_and(|b| b.source.starts_with("file:///") && b.bytes_per_second > 0.0 && b.samples >= 1),
        "{:?}",
        state.source_bandwidth
    );

    // A command down the stream.
    let cmd = pb::Command {
        id: "c1".into(),
        idempotency_key: "prefetch-cmd-model".into(),
        deadline: Some((std::time::SystemTime::now() + Duration::from_secs(60)).into()),
        kind: Some(pb::command::Kind::Prefetch(pb::PrefetchCommand {
            source_uri: format!("file://{}", cmd_src.display()),
            ..Default::default()
        })),
    };
    ctl.state.send_command("gpu-1", cmd)?;
    wait_for("commanded model ready", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "gpu-1")
            .await?
            .filter(|s| s.models.iter().any(|m| m.source_uri.contains("cmd-model") && m.state == pb::CacheEntryState::Ready as i32)))
    })
    .await
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let (_, metrics) = http_get(agent.http, "/metrics").await?;
    assert_eq!(metric_value(&metrics, "hearth_cache_entries{state=\"ready\"}"), Some(2.0));
    assert_eq!(metric_value(&metrics, "hearth_cache_misses_total"), Some(2.0));
    stop.cancel();
    Ok(())
}

/// A warm-up stuck on a source that accepts connections and never answers (an S3 endpoint
/// behind a black-holing firewall) does not hold up shutdown: SIGTERM ends the agent
/// cleanly within its grace period.
#[tokio::test]
async fn a_warm_up_stuck_on_a_silent_source_does_not_hold_up_shutdown() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = silent.local_addr()?;
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let extra = format!(
        "  s3: {{endpoint: 'http://{endpoint}', region: us-east-1, force_path_style: true}}\n  models: [{{uri: 's3://models/llama/'}}]\n"
    );
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, "gpu-1", ctl.grpc_addr, &extra).await?;
    // Let the warm-up reach the source.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.proc.signal("TERM")?;
    let t0 = std::time::Instant::now();
    let st = agent.proc.wait_exit(Duration::from_secs(8)).await?;
    let log = agent.proc.log_text();
    anyhow::ensure!(st.is_some_and(|s| s.success()), "clean exit ({st:?}) after {:?}:\n{log}", t0.elapsed());
    anyhow::ensure!(t0.elapsed() < Duration::from_secs(5), "within the 5 s grace: {:?}", t0.elapsed());
    held.abort();
    Ok(())
}
