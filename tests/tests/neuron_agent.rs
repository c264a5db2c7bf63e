#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! Neuron in a running agent on the simulator: a simulated inf2.48xlarge (a fake driver tree
//! and the fake neuron-monitor as a child process), the partition config's core groups applied
//! and reported, neuron-monitor-prometheus's metric names on /metrics, and faults injected
//! through the tree: an uncorrectable ECC event and a device that disappears mark devices
//! unhealthy in the controller's view.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_proto::v1 as pb;
use hearth_tests::*;
use tokio_util::sync::CancellationToken;

/// An agent on a simulated inf2.48xlarge with the example spec's inf2-mixed core groups.
async fn inf2_agent(dir: &std::path::Path, pki: &TestPki, node: &str, ctl: &hearth_controller::Running) -> Result<AgentProc> {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/mig-spec.yaml");
    let extra = format!("partition: {{spec: '{spec}', config: inf2-mixed}}\nneuron: {{collect_interval: 300ms}}\n");
    AgentProc::spawn_with(dir, pki, node, ctl.grpc_addr, &extra, "", "{simulated: [inf2.48xlarge]}", &[]).await
}

#[tokio::test]
async fn a_simulated_inf2_48xlarge_reports_core_groups_monitor_metrics_and_faults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let agent = inf2_agent(dir.path(), &pki, "inf-1", &ctl).await?;
    let log = || agent.proc.log_text();
    let state = wait_for("12 Neuron devices with core groups in the controller's view", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "inf-1").await?.filter(|s| {
            s.accelerators.len() == 12 && s.accelerators.iter().any(|a| a.partitions.iter().any(|p| p.uuid == "neuroncores:0-7"))
        }))
    })
    .await
    .with_context(log)?;
    let groups: Vec<&str> = state.accelerators.iter().flat_map(|a| a.partitions.iter().map(|p| p.uuid.as_str())).collect();
    ensure!(groups.len() == 7 && groups.contains(&"neuroncores:18-19"), "groups: {groups:?}");
    ensure!(
        state.accelerators.iter().all(|a| a.core_count == 2 && a.health == pb::HealthState::Healthy as i32),
        "{:?}",
        state.accelerators
    );
    let record = std::fs::read_to_string(dir.path().join("state-inf-1/neuron-groups.json"))?;
    ensure!(record.contains("inf2.48xlarge") && record.contains("inf2-mixed"), "{record}");

    // neuron-monitor's families, from the fake monitor running as the agent's child.
    let metrics = wait_for("neuron-monitor metrics", Duration::from_secs(20), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(m.contains("neuroncore_utilization_ratio{").then_some(m))
    })
    .await
    .with_context(log)?;
    for family in [
        "# TYPE neuroncore_utilization_ratio gauge",
        "# TYPE execution_status_total counter",
        "# TYPE hardware_ecc_events_total counter",
        "# TYPE neuron_runtime_memory_used_bytes gauge",
        "# TYPE instance_info gauge",
        "# TYPE neuron_hardware_info gauge",
    ] {
        ensure!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    ensure!(metrics.contains("instance_type=\"inf2.48xlarge\""), "{metrics}");
    ensure!(metric_value(&metrics, "hearth_subsystem_status{subsystem=\"neuron\",state=\"enabled\"}") == Some(1.0), "{metrics}");

    // Faults through the driver tree: an uncorrectable HBM ECC event on device 3, device 7 gone.
    let tree = dir.path().join("state-inf-1/neuron-sim/devices/virtual/neuron_device");
    std::fs::write(tree.join("neuron3/stats/hardware/mem_ecc_uncorrected"), "1\n")?;
    std::fs::remove_dir_all(tree.join("neuron7"))?;
    let state = wait_for("the faults in the controller's view", Duration::from_secs(20), || async {
        Ok(node_state(&ctl, &pki, "inf-1").await?.filter(|s| {
            let unhealthy = |i: u32| s.accelerators.iter().any(|a| a.index == i && a.health == pb::HealthState::Unhealthy as i32);
            unhealthy(3) && unhealthy(7)
        }))
    })
    .await
    .with_context(log)?;
    let reason = |i: u32| state.accelerators.iter().find(|a| a.index == i).map(|a| a.health_reason.clone()).unwrap_or_default();
    ensure!(reason(3).contains("uncorrectable HBM ECC"), "{}", reason(3));
    ensure!(reason(7).contains("disappeared"), "{}", reason(7));
    let metrics = wait_for("the ECC event counted", Duration::from_secs(20), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(m.lines()
            .any(|l| {
                l.starts_with("hardware_ecc_events_total{")
                    && l.contains("event_type=\"mem_ecc_uncorrected\"")
                    && l.contains("neuron_device_index=\"3\"")
                    && l.ends_with(" 1.0")
            })
            .then_some(m))
    })
    .await
    .with_context(log)?;
    let _ = metrics;
    stop.cancel();
    Ok(())
}

/// Core groups the controller asks for at run time (ApplyPartition), beside the ones the
/// agent config gave at start: the fake neuron-monitor's runtime holds cores 0-1.
const RUNTIME_SPEC: &str = r#"
version: v1
neuron-configs:
  keep-first-eight:
    - devices: all
      core-groups: [{cores: 8, count: 1}, {cores: 1, count: 8}]
  all-pairs:
    - devices: all
      core-groups: [{cores: 2, count: 12}]
  too-many:
    - devices: all
      core-groups: [{cores: 2, count: 13}]
"#;

fn apply(config: &str) -> pb::command::Kind {
    pb::command::Kind::ApplyPartition(pb::ApplyPartitionCommand { spec: RUNTIME_SPEC.into(), config_name: config.into() })
}

/// The command's end as the controller learnt it.
async fn finished(ctl: &hearth_controller::Running, id: &str) -> Result<(pb::command_status::Phase, String)> {
    use pb::command_status::Phase;
    wait_for(&format!("command {id} to finish"), Duration::from_secs(20), || async {
        Ok(ctl.state.outcome(id).filter(|o| o.phase != Phase::Accepted).map(|o| (o.phase, o.message)))
    })
    .await
}

fn partitions(s: &pb::NodeState) -> Vec<String> {
    s.accelerators.iter().flat_map(|a| a.partitions.iter().map(|p| p.uuid.clone())).collect()
}

#[tokio::test]
async fn apply_partition_changes_inf2_core_groups_at_run_time_refuses_held_cores_and_survives_a_restart() -> Result<()> {
    use pb::command_status::Phase;
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let agent = inf2_agent(dir.path(), &pki, "inf-2", &ctl).await?;
    let log = || agent.proc.log_text();
    wait_for("inf2-mixed's 7 groups in the controller's view", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "inf-2").await?.filter(|s| partitions(s).len() == 7))
    })
    .await
    .with_context(log)?;
    let nodes = list_nodes(ctl.grpc_addr, &pki.client_material("operator")?).await?;
    let caps = &nodes.iter().find(|n| n.name == "inf-2").context("inf-2 listed")?.capabilities;
    ensure!(caps.iter().any(|c| c == "partition.neuron") && !caps.iter().any(|c| c == "partition.mig"), "{caps:?}");
    // The fake neuron-monitor's runtime on cores 0-1 is known before anything moves.
    wait_for("neuron-monitor's runtime seen", Duration::from_secs(20), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(m.contains("neuroncore_utilization_ratio{").then_some(()))
    })
    .await
    .with_context(log)?;

    // Refused before anything happens: a name the spec lacks, groups the node cannot hold.
    send_command(&ctl, "inf-2", "nope", apply("nope"))?;
    let (phase, message) = finished(&ctl, "nope").await?;
    ensure!(phase == Phase::Rejected, "{phase:?}: {message}");
    ensure!(message.contains("no config named \"nope\" (have: all-pairs, keep-first-eight, too-many)"), "{message}");
    send_command(&ctl, "inf-2", "too-many", apply("too-many"))?;
    let (phase, message) = finished(&ctl, "too-many").await?;
    ensure!(
        phase == Phase::Rejected && message.contains("config \"too-many\" on inf2.48xlarge") && message.contains("do not fit"),
        "{message}"
    );

    // Breaking up the group the runtime runs in fails, naming the holder; nothing changes.
    send_command(&ctl, "inf-2", "pairs", apply("all-pairs"))?;
    let (phase, message) = finished(&ctl, "pairs").await?;
    ensure!(phase == Phase::Failed, "{phase:?}: {message}");
    ensure!(message.contains("would change group but are in use") && message.contains("holds cores 0-1"), "{message}");
    let state = wait_for("the failed apply in the controller's view", Duration::from_secs(10), || async {
        Ok(node_state(&ctl, &pki, "inf-2").await?.filter(|s| s.partition.as_ref().is_some_and(|p| p.spec_name == "all-pairs")))
    })
    .await?;
    let p = state.partition.clone().context("partition status")?;
    ensure!(p.phase == pb::partition_status::Phase::Failed as i32 && p.reason.contains("holds cores 0-1"), "{p:?}");
    ensure!(partitions(&state).len() == 7 && partitions(&state).contains(&"neuroncores:0-7".to_owned()), "{:?}", partitions(&state));

    // A layout keeping that group applies: the new groups in the report, the status and labels.
    send_command(&ctl, "inf-2", "keep", apply("keep-first-eight"))?;
    let (phase, message) = finished(&ctl, "keep").await?;
    ensure!(phase == Phase::Succeeded, "{phase:?}: {message}");
    let state = wait_for("keep-first-eight's groups in the controller's view", Duration::from_secs(10), || async {
        Ok(node_state(&ctl, &pki, "inf-2").await?.filter(|s| partitions(s).len() == 9))
    })
    .await?;
    let mut want: Vec<String> = (8..16).map(|c| format!("neuroncores:{c}-{c}")).collect();
    want.insert(0, "neuroncores:0-7".into());
    ensure!(partitions(&state) == want, "{:?}", partitions(&state));
    let p = state.partition.clone().context("partition status")?;
    ensure!(p.phase == pb::partition_status::Phase::Success as i32 && p.spec_name == "keep-first-eight", "{p:?}");
    let labels = &state.info.as_ref().context("node info")?.labels;
    ensure!(labels.get("hearth.dev/neuron.config").map(String::as_str) == Some("keep-first-eight"), "{labels:?}");
    ensure!(labels.get("hearth.dev/neuron.config.state").map(String::as_str) == Some("success"), "{labels:?}");
    let record = std::fs::read_to_string(dir.path().join("state-inf-2/neuron-groups.json"))?;
    ensure!(record.contains("keep-first-eight"), "{record}");

    // A restart with the same agent config keeps the controller's layout.
    drop(agent);
    let agent = inf2_agent(dir.path(), &pki, "inf-2", &ctl).await?;
    let state = wait_for("the restarted agent's report", Duration::from_secs(30), || async {
        Ok(node_state(&ctl, &pki, "inf-2")
            .await?
            .filter(|s| s.subsystems.iter().any(|x| x.name == "neuron" && x.reason.contains("9 core groups at start"))))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    ensure!(partitions(&state) == want, "{:?}", partitions(&state));
    ensure!(state.partition.as_ref().is_some_and(|p| p.spec_name == "keep-first-eight"), "{:?}", state.partition);
    stop.cancel();
    Ok(())
}
