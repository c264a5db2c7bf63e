#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! Real `hearth-controller` and `hearth agent` processes over mTLS on loopback: the
//! snapshot/delta flow, restarts of either side, a controller that is away, signals, bad
//! config. Processes are stopped by PID and killed on drop.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_proto::v1 as pb;
use hearth_tests::relay::Relay;
use hearth_tests::*;

async fn node(ctl: std::net::SocketAddr, pki: &TestPki, name: &str) -> Result<Option<pb::NodeSummary>> {
    let nodes = list_nodes(ctl, &pki.client_material("operator")?).await?;
    Ok(nodes.into_iter().find(|n| n.name == name))
}

fn connected(n: &pb::NodeSummary) -> bool {
    n.connection == pb::NodeConnection::Connected as i32
}

async fn agent_metric(agent: &AgentProc, series: &str) -> Option<f64> {
    http_get(agent.http, "/metrics").await.ok().and_then(|(_, body)| metric_value(&body, series))
}

/// The agent's (connect attempts, failed attempts) counters.
async fn attempt_counts(agent: &AgentProc) -> Option<(u64, u64)> {
    let (_, body) = http_get(agent.http, "/metrics").await.ok()?;
    let attempts = metric_value(&body, "hearth_agent_controller_connect_attempts_total")?;
    // Failures are counted by reason: add them up.
    let failed: f64 = body
        .lines()
        .filter(|l| l.starts_with("hearth_agent_controller_connect_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some((attempts as u64, failed as u64))
}

/// A `Duration` as `{:?}` prints it ("150ms", "73.25ms", "1s", "999.5µs").
fn debug_duration(s: &str) -> Option<Duration> {
    let (n, unit) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)].into_iter().find_map(|(u, f)| Some((s.strip_suffix(u)?, f)))?;
    Some(Duration::from_secs_f64(n.parse::<f64>().ok()? * unit))
}

#[tokio::test]
async fn agent_reports_snapshot_then_deltas_and_survives_restarts_of_both_sides() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let mut ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    // The restarted controller gets a new port: the agent reaches it through a relay that
    // keeps one address.
    let mut relay = Relay::new()?;
    relay.forward_to(ctl.grpc)?;
    let mut agent = AgentProc::start(dir.path(), &pki, "gpu-1", relay.addr, "").await?;

    // Snapshot: the node appears with its simulated accelerators.
    let first = wait_for("gpu-1 connected with 2 GPUs", Duration::from_secs(15), || async {
        Ok(node(ctl.grpc, &pki, "gpu-1").await?.filter(|n| connected(n) && n.accelerator_count == 2))
    })
    .await
    .map_err(|e| e.context(agent.proc.log_text()))?;
    assert_eq!(first.accelerator_summary, vec!["2 x NVIDIA H100 80GB HBM3".to_string()]);
    // Capabilities from what started: simulated GPUs bring metrics and partitioning.
    for cap in ["node-metrics", "devices.simulated", "gpu-metrics", "partition.mig", "cache"] {
        assert!(first.capabilities.iter().any(|c| c == cap), "{cap} missing from {:?}", first.capabilities);
    }
    // Deltas: node samples every 300 ms change the resources, so seq climbs past the snapshot.
    let later = wait_for("deltas applied", Duration::from_secs(10), || async {
        Ok(node(ctl.grpc, &pki, "gpu-1").await?.filter(|n| n.epoch == first.epoch && n.seq >= first.seq + 2))
    })
    .await?;
    assert!(later.seq > first.seq);

    // Controller restart: soft state is gone, the agent reconnects and the view is rebuilt.
    ctl.proc.kill9()?;
    wait_for("agent notices the controller is gone", Duration::from_secs(10), || async {
        Ok(agent_metric(&agent, "hearth_agent_controller_connected").await.filter(|v| *v == 0.0))
    })
    .await?;
    // Readiness is the node-local job: a controller outage must not fail it (a DaemonSet
    // rollout would stall on every node).
    let (status, body) = http_get(agent.http, "/readyz").await?;
    assert_eq!(status, 200, "ready while the controller is away: {body}");
    // The agent keeps its node-local work going: /metrics still serves fresh node samples.
    assert!(agent_metric(&agent, "hearth_node_memory_total_bytes").await.is_some());

    ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    relay.forward_to(ctl.grpc)?;
    let rebuilt = wait_for("view rebuilt after controller restart", Duration::from_secs(15), || async {
        Ok(node(ctl.grpc, &pki, "gpu-1").await?.filter(|n| connected(n) && n.accelerator_count == 2))
    })
    .await?;
    assert_eq!(rebuilt.epoch, first.epoch, "same agent process, same epoch");
    assert!(rebuilt.seq > later.seq, "sequence continues across reconnects");
    let attempts = agent_metric(&agent, "hearth_agent_controller_connect_attempts_total").await.unwrap_or(0.0);
    assert!(attempts >= 2.0, "reconnected: {attempts} attempts");
    assert_eq!(http_get(agent.http, "/readyz").await?.0, 200);

    // Agent restart (kill -9): the node shows disconnected, then comes back with a new epoch.
    agent.proc.kill9()?;
    wait_for("node disconnected after agent kill", Duration::from_secs(10), || async {
        Ok(node(ctl.grpc, &pki, "gpu-1").await?.filter(|n| n.connection == pb::NodeConnection::Disconnected as i32))
    })
    .await?;
    let agent2 = AgentProc::start(dir.path(), &pki, "gpu-1", relay.addr, "").await?;
    let back = wait_for("restarted agent connected", Duration::from_secs(15), || async {
        Ok(node(ctl.grpc, &pki, "gpu-1").await?.filter(|n| connected(n) && n.epoch != first.epoch))
    })
    .await
    .map_err(|e| e.context(agent2.proc.log_text()))?;
    assert_eq!(back.accelerator_count, 2);
    drop(ctl);
    Ok(())
}

#[tokio::test]
async fn agent_waits_for_an_absent_controller_without_flooding_logs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    // The agent's controller address refuses connections until the controller is started.
    let mut relay = Relay::new()?;
    let agent = AgentProc::start(dir.path(), &pki, "gpu-2", relay.addr, "").await?;
    wait_for("agent /metrics", Duration::from_secs(10), || async { Ok(agent_metric(&agent, "hearth_agent_controller_connected").await) })
        .await?;
    // Let it fail for a while: backoff 100 ms doubling to a 1 s cap.
    wait_for("several failed attempts", Duration::from_secs(10), || async {
        Ok(agent_metric(&agent, "hearth_agent_controller_connect_attempts_total").await.filter(|v| *v >= 5.0))
    })
    .await?;
    assert_eq!(agent_metric(&agent, "hearth_agent_controller_connected").await, Some(0.0));
    // The report loop logs one warning per failed attempt, numbered from 1, with the delay it
    // then waits: 100 ms doubling to the 1 s cap, each delay between half its step and the
    // step. Compare the log with the counters at a moment between attempts: counters read
    // before and after the log agree, and every attempt counted has failed.
    let (failed, lines) = wait_for("a reading of the log between attempts", Duration::from_secs(10), || async {
        let before = attempt_counts(&agent).await;
        let log = agent.proc.own_log_text();
        let after = attempt_counts(&agent).await;
        let lines: Vec<String> = log.lines().filter(|l| l.contains("controller stream down")).map(str::to_owned).collect();
        Ok(match (before, after) {
            (Some((attempts, failed)), Some(again)) if again == (attempts, failed) && attempts == failed => {
                // The counter moves a moment before the line is written: read again.
                (lines.len() as u64 + 1 != failed).then_some((failed, lines))
            }
            _ => None,
        })
    })
    .await?;
    let numbers: Vec<u64> = lines.iter().filter_map(|l| log_field(l, "attempt")?.parse().ok()).collect();
    assert_eq!(numbers, (1..=failed).collect::<Vec<_>>(), "one line per failed attempt, in order:\n{}", lines.join("\n"));
    for (i, line) in lines.iter().enumerate() {
        let step = Duration::from_millis(100).saturating_mul(1 << i.min(10)).min(Duration::from_secs(1));
        let delay = log_field(line, "retry_in").and_then(debug_duration);
        assert!(
            delay.is_some_and(|d| d >= step / 2 && d <= step),
            "attempt {}: retry_in not within {:?}..={step:?}: {line}",
            i + 1,
            step / 2
        );
    }
    // Serving metrics meanwhile, and node-local sampling works.
    assert!(agent_metric(&agent, "hearth_node_cpu_usage_ratio").await.is_some());

    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    relay.forward_to(ctl.grpc)?;
    wait_for("connects once the controller is up", Duration::from_secs(10), || async {
        Ok(node(ctl.grpc, &pki, "gpu-2").await?.filter(connected))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_both_processes_within_the_grace_period() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let mut ctl = ControllerProc::start(dir.path(), &pki, "shutdown_grace: 3s\n").await?;
    let grpc = ctl.grpc;
    let mut agent = AgentProc::start(dir.path(), &pki, "gpu-3", grpc, "shutdown_grace: 3s\n").await?;
    wait_for("connected", Duration::from_secs(15), || async { Ok(node(grpc, &pki, "gpu-3").await?.filter(connected)) }).await?;

    agent.proc.signal("TERM")?;
    let st = agent.proc.wait_exit(Duration::from_secs(5)).await?;
    ensure!(st.is_some_and(|s| s.success()), "agent exit after SIGTERM: {st:?}\n{}", agent.proc.log_text());
    ctl.proc.signal("TERM")?;
    let st = ctl.proc.wait_exit(Duration::from_secs(5)).await?;
    ensure!(st.is_some_and(|s| s.success()), "controller exit after SIGTERM: {st:?}\n{}", ctl.proc.log_text());
    Ok(())
}

#[test]
fn invalid_config_exits_non_zero_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(&cfg, "node_name: n1\nnode:\n  collect_interval: sometimes\n")?;
    let out = Command::new(bin("hearth")).args(["agent", "--config"]).arg(&cfg).output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.collect_interval: expected a duration like \"15s\" or \"500ms\", got \"sometimes\""), "{err}");

    std::fs::write(&cfg, "listen: 0.0.0.0:1\nbogus: 1\n")?;
    let out = Command::new(bin("hearth-controller")).args(["run", "--config"]).arg(&cfg).output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `bogus`"), "{err}");
    assert_eq!(err.matches("unknown field").count(), 1, "the cause is said once: {err}");

    // TLS files that do not exist are named, at start.
    std::fs::write(&cfg, "tls: {ca: /nonexistent/ca.pem, cert: /x, key: /y}\n")?;
    let out = Command::new(bin("hearth-controller")).args(["run", "--config"]).arg(&cfg).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CA bundle /nonexistent/ca.pem: cannot read"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "the cause is said once: {err}");
    Ok(())
}

#[tokio::test]
async fn local_mode_lists_its_node_via_status_json_within_10s() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    // Every listener on port 0: local mode publishes what it bound in local.json.
    let mut local = Proc::spawn("local", &mut hearth_tests::local_mode(&state, "0", "12"), dir.path())?;
    let start = std::time::Instant::now();
    let json = wait_for("hearth status --output json lists the node", Duration::from_secs(10), || async {
        let out = Command::new(bin("hearth")).args(["status", "--output", "json", "--state-dir"]).arg(&state).output()?;
        if !out.status.success() {
            anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ok = v["nodes"][0]["state"] == "connected" && v["nodes"][0]["accelerator_count"] == 3;
        Ok(ok.then_some(v))
    })
    .await
    .map_err(|e| e.context(local.log_text()))?;
    assert_eq!(json["nodes"][0]["name"], "local");
    assert_eq!(json["nodes"][0]["accelerators"][0], "3 x NVIDIA H100 80GB HBM3");
    // The banner gives the status command that finds this state directory.
    let banner = local.log_text();
    assert!(banner.contains(&format!("in another terminal: hearth status --state-dir {}", state.display())), "{banner}");
    eprintln!("local mode listed its node after {:?}", start.elapsed());
    // Its simulated GPUs export the dcgm-exporter families, so dashboards can be tried.
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("local/local.json"))?)?;
    let agent_metrics = info["agent_metrics"].as_str().unwrap();
    let ah: std::net::SocketAddr = agent_metrics.strip_prefix("http://").and_then(|a| a.strip_suffix("/metrics")).unwrap().parse()?;
    assert_ne!(ah.port(), 0, "local.json names the bound port: {agent_metrics}");
    let (_, metrics) = http_get(ah, "/metrics").await?;
    for family in ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_DEV_XID_ERRORS"] {
        let n = metrics.lines().filter(|l| l.starts_with(&format!("{family}{{"))).count();
        assert_eq!(n, 3, "{family} for each simulated GPU");
    }
    // Every port it took is printed; as root the sample workload runs on the port it was
    // given (0: a free one) and network metrics are on.
    let banner = local.log_text();
    assert!(banner.contains("  scheduler extender  https://localhost:"), "{banner}");
    let sample_port = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("sample workload     127.0.0.1:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse::<u16>().ok());
    assert!(sample_port.is_some_and(|p| p != 0), "{banner}");
    assert!(metrics.contains("hearth_pod_network_enabled{family=\"traffic\",reason=\"\"} 1"), "{metrics}");

    // `hearth call` reaches the decision APIs with local mode's credentials, JSON in and out.
    let call = |args: &[&str]| {
        let out = Command::new(bin("hearth")).arg("call").args(args).arg("--state-dir").arg(&state).output().expect("run hearth call");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, out, err) = call(&["hearth.v1.Placement/Score", "-d", r#"{"model": "llama-sample"}"#]);
    assert_eq!(code, Some(0), "{err}");
    let score: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(score["scores"][0]["node"], "local", "{out}");
    let (code, out, err) =
        call(&["hearth.v1.Scaling/Watch", "-d", r#"{"model": "llama-sample"}"#, "--max-messages", "1", "--max-time", "30s"]);
    assert_eq!(code, Some(0), "{err}");
    let decision: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(decision["model"], "llama-sample", "{out}");
    let (code, _, err) = call(&["hearth.v1.Placement/Scor"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("hearth.v1.Placement has no method \"Scor\""), "{err}");

    // The loop: the controller started the sample-chat replica on a GPU through the agent,
    // the sample load reaches it, and its load is reported with the scaler's answer.
    let looped = wait_for("sample-chat serving load, with a recommendation", Duration::from_secs(60), || async {
        let out = Command::new(bin("hearth")).args(["status", "--output", "json", "--state-dir"]).arg(&state).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let busy = v["runtimes"].as_array().into_iter().flatten().any(|r| {
            r["model"] == "sample-chat"
                && r["state"] == "ready"
                && r["managed_by"] == "agent"
                && r["requests_running"].as_f64().unwrap_or(0.0) > 0.0
        });
        let rec =
            v["models"].as_array().into_iter().flatten().any(|m| m["model"] == "sample-chat" && m["desired_replicas"].as_u64() >= Some(1));
        Ok((busy && rec).then_some(v))
    })
    .await
    .map_err(|e| e.context(local.log_text()))?;
    let r =
        &looped["runtimes"].as_array().context("runtimes")?.iter().find(|r| r["model"] == "sample-chat").context("sample-chat")?.clone();
    let out = Command::new(bin("hearth")).args(["status", "--state-dir"]).arg(&state).output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(table.contains("RUNTIME") && table.contains(r["name"].as_str().unwrap_or("?")) && table.contains("sample-chat"), "{table}");

    // Table output too, then Ctrl-C stops it cleanly and removes the published info.
    let out = Command::new(bin("hearth")).args(["status", "--state-dir"]).arg(&state).output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NODE") && table.contains("local  connected"), "{table}");
    local.signal("INT")?;
    let st = local.wait_exit(Duration::from_secs(8)).await?;
    ensure!(st.is_some_and(|s| s.success()), "local mode exit on Ctrl-C: {st:?}\n{}", local.log_text());
    assert!(!state.join("local/local.json").exists());
    let out = Command::new(bin("hearth")).args(["status", "--state-dir"]).arg(&state).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hearth local"));
    Ok(())
}

#[tokio::test]
async fn frozen_agent_turns_stale_then_recovers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "stale_after: 1500ms\n").await?;
    let grpc = ctl.grpc;
    let agent = AgentProc::start(dir.path(), &pki, "gpu-4", grpc, "").await?;
    wait_for("connected", Duration::from_secs(15), || async { Ok(node(grpc, &pki, "gpu-4").await?.filter(connected)) }).await?;
    // A stopped process keeps its TCP connection open but sends nothing: missed heartbeats.
    agent.proc.signal("STOP")?;
    let stale = wait_for("stale after missed heartbeats", Duration::from_secs(10), || async {
        Ok(node(grpc, &pki, "gpu-4").await?.filter(|n| n.connection == pb::NodeConnection::Stale as i32))
    })
    .await;
    agent.proc.signal("CONT")?;
    let stale = stale?;
    assert!(stale.last_report_age_ms >= 1500, "{}", stale.last_report_age_ms);
    wait_for("connected again", Duration::from_secs(10), || async { Ok(node(grpc, &pki, "gpu-4").await?.filter(connected)) }).await?;
    Ok(())
}

#[test]
fn local_mode_that_cannot_start_says_why_and_leaves_nothing_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let state = dir.path().join("state");
    let out = Command::new(bin("hearth"))
        .arg("local")
        .arg("--state-dir")
        .arg(&state)
        .args(["--controller-listen", &addr, "--controller-http-listen", "127.0.0.1:0", "--agent-http-listen", "127.0.0.1:0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr} (gRPC): Address already in use")), "{err}");
    assert!(!state.exists(), "a failed start removes the certificates and directories it created");
    Ok(())
}

#[tokio::test]
async fn local_mode_says_why_network_metrics_are_off_when_the_sample_port_is_taken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let mut local = Proc::spawn("local", &mut hearth_tests::local_mode(&state, &port, "0"), dir.path())?;
    let info = wait_for("local.json", Duration::from_secs(15), || async {
        Ok(std::fs::read(state.join("local/local.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()))
    })
    .await
    .map_err(|e| e.context(local.log_text()))?;
    let agent: std::net::SocketAddr =
        info["agent_metrics"].as_str().and_then(|a| a.strip_prefix("http://")).and_then(|a| a.strip_suffix("/metrics")).unwrap().parse()?;
    let (_, metrics) = http_get(agent, "/metrics").await?;
    let off = metrics.lines().find(|l| l.starts_with("hearth_pod_network_enabled{family=\"traffic\"")).unwrap_or_default().to_owned();
    assert!(off.contains("reason=\"the sample workload did not start") && off.ends_with(" 0"), "{off}");
    assert!(!off.contains("network.enabled: false"), "not a config choice: {off}");
    local.signal("INT")?;
    ensure!(local.wait_exit(Duration::from_secs(8)).await?.is_some_and(|s| s.success()), "{}", local.log_text());
    Ok(())
}
