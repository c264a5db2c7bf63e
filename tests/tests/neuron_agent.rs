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

#[tokio::test]
async fn a_simulated_inf2_48xlarge_reports_core_groups_monitor_metrics_and_faults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), |_| {}).await?;
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/mig-spec.yaml");
    let extra = format!("partition: {{spec: '{spec}', config: inf2-mixed}}\nneuron: {{collect_interval: 300ms}}\n");
    let agent = AgentProc::spawn_with(dir.path(), &pki, "inf-1", ctl.grpc_addr, &extra, "", "{simulated: [inf2.48xlarge]}", &[]).await?;
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
