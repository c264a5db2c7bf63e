#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! A real Prometheus scrapes the agent's and the controller's `/metrics` (it negotiates
//! OpenMetrics), and `promtool check metrics` lints the Prometheus-text output; a second
//! case scrapes an agent on a simulated inf2.48xlarge and queries neuron-monitor-prometheus's
//! families back with PromQL. Needs `prometheus` and `promtool` (apt `prometheus`); fails
//! with install advice without them.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_tests::*;

/// Lints `text`; problems are allowed only on dcgm-exporter's families and only of the two
/// kinds their fixed names and labels cause (camelCase label names such as `UUID` and
/// `modelName`, counters without `_total`, "COUNTER" in `DCGM_FI_DEV_PCIE_REPLAY_COUNTER`),
/// and on neuron-monitor-prometheus's `system_vcpu_count` (a gauge named `_count`):
/// dashboards query those exact names.
fn promtool_check(text: &str) -> Result<String> {
    let report = promtool_run(text)?;
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let dcgm = l.starts_with("DCGM_FI_");
            let allowed = l.contains("label names should be written in 'snake_case' not 'camelCase'")
                || l.contains("counter metrics should have \"_total\" suffix")
                || l.starts_with("DCGM_FI_DEV_PCIE_REPLAY_COUNTER metric name should not include type 'counter'");
            let neuron = *l == "system_vcpu_count non-histogram and non-summary metrics should not have \"_count\" suffix";
            !(neuron || (dcgm && allowed))
        })
        .collect();
    ensure!(unexpected.is_empty(), "promtool check metrics:\n{}\n--- input ---\n{text}", unexpected.join("\n"));
    Ok(report)
}

fn promtool_run(text: &str) -> Result<String> {
    use std::io::Write;
    let tool = require_tool("promtool", "apt-get install prometheus")?;
    let mut child =
        Command::new(tool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 0: clean; 3: lint problems only (listed in the report); anything else: broken input.
    ensure!(matches!(out.status.code(), Some(0 | 3)), "promtool check metrics failed ({:?}):\n{report}\n--- input ---\n{text}", out.status);
    Ok(report)
}

/// Starts a real Prometheus scraping each `(job, target)` every second; returns it and its
/// web address (from its "Listening on" log line).
async fn start_prometheus(dir: &std::path::Path, targets: &[(&str, std::net::SocketAddr)]) -> Result<(Proc, std::net::SocketAddr)> {
    let prometheus = require_tool("prometheus", "apt-get install prometheus")?;
    let cfg = dir.join("prometheus.yml");
    let mut yaml = "global: {scrape_interval: 1s, scrape_timeout: 1s}\nscrape_configs:\n".to_owned();
    for (job, addr) in targets {
        yaml.push_str(&format!("  - job_name: {job}\n    static_configs: [{{targets: ['{addr}']}}]\n"));
    }
    std::fs::write(&cfg, yaml)?;
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg("--web.listen-address=127.0.0.1:0"),
        dir,
    )?;
    // Prometheus logs the address it bound: `msg="Listening on" address=127.0.0.1:PORT`.
    let web = logged_addr(&prom.wait_for_log_line("msg=\"Listening on\"", Duration::from_secs(30)).await?, "address")?;
    Ok((prom, web))
}

/// The series an instant PromQL query returns (empty while Prometheus has none).
async fn query(web: std::net::SocketAddr, promql: &str) -> Result<Vec<serde_json::Value>> {
    let mut q = String::new();
    for b in promql.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => q.push(char::from(b)),
            _ => q.push_str(&format!("%{b:02X}")),
        }
    }
    let (status, body) = http_get(web, &format!("/api/v1/query?query={q}")).await?;
    ensure!(status == 200, "query {promql}: HTTP {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(v["status"] == "success", "query {promql}: {body}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// A sample's value as a number.
fn value(series: &serde_json::Value) -> f64 {
    series["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn prometheus_scrapes_agent_and_controller_and_promtool_is_clean() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    let agent = AgentProc::start(dir.path(), &pki, "gpu-1", ctl.grpc, "").await?;
    wait_for("agent connected", Duration::from_secs(15), || async {
        Ok(http_get(agent.http, "/metrics")
            .await
            .ok()
            .and_then(|(_, b)| metric_value(&b, "hearth_agent_controller_connected"))
            .filter(|v| *v == 1.0))
    })
    .await?;

    // Prometheus-text output (no Accept header) passes promtool's lint on both sides.
    for (who, addr) in [("agent", agent.http), ("controller", ctl.http)] {
        let (status, text) = http_get(addr, "/metrics").await?;
        assert_eq!(status, 200);
        assert!(!text.contains("# EOF"), "{who}: Prometheus text must not carry the OpenMetrics EOF");
        promtool_check(&text).with_context(|| format!("{who} /metrics"))?;
    }
    let (_, text) = http_get(agent.http, "/metrics").await?;
    assert!(text.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"), "dcgm-exporter's name and type");
    // OpenMetrics is served when asked for.
    let (_, om) = http_get_with(agent.http, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]).await?;
    assert!(om.trim_end().ends_with("# EOF"), "OpenMetrics must end with # EOF");

    let (prom, web) = start_prometheus(dir.path(), &[("hearth-agent", agent.http), ("hearth-controller", ctl.http)]).await?;
    let targets = wait_for("both targets up with no scrape error", Duration::from_secs(30), || async {
        let Ok((200, body)) = http_get(web, "/api/v1/targets").await else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let healthy = active.len() == 2 && active.iter().all(|t| t["health"] == "up" && t["lastError"] == "");
        Ok(healthy.then_some(active))
    })
    .await
    .map_err(|e| e.context(prom.log_text()))?;
    let jobs: Vec<_> = targets.iter().map(|t| t["labels"]["job"].as_str().unwrap_or("").to_owned()).collect();
    assert!(jobs.contains(&"hearth-agent".to_owned()) && jobs.contains(&"hearth-controller".to_owned()), "{jobs:?}");

    // And the data is queryable: the controller reports one connected agent.
    wait_for("query answers", Duration::from_secs(15), || async {
        let Ok((200, body)) = http_get(web, "/api/v1/query?query=hearth_controller_connected_agents").await else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok((v["data"]["result"][0]["value"][1] == "1").then_some(()))
    })
    .await?;
    // The dcgm-exporter names arrive in Prometheus as they are (scraped as OpenMetrics), so
    // a dashboard's queries work unchanged: one energy series per simulated GPU.
    wait_for("DCGM series stored under their exact names", Duration::from_secs(15), || async {
        let Ok((200, body)) = http_get(web, "/api/v1/query?query=DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION").await else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let series = v["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok((series.len() == 2 && series.iter().all(|s| s["metric"]["modelName"] == "NVIDIA H100 80GB HBM3")).then_some(()))
    })
    .await?;
    Ok(())
}

/// neuron-monitor-prometheus's families as a Neuron dashboard queries them: an agent on a
/// simulated inf2.48xlarge (fake driver tree, the fake neuron-monitor as its child, a report
/// every 300 ms) scraped by a real Prometheus, an uncorrectable ECC event injected through
/// the tree and counted.
#[tokio::test]
async fn prometheus_scrapes_neuron_monitor_families_from_a_simulated_inf2_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let ctl = ControllerProc::start(dir.path(), &pki, "").await?;
    let extra = "neuron: {collect_interval: 300ms}\n";
    let agent = AgentProc::spawn_with(dir.path(), &pki, "inf-1", ctl.grpc, extra, "", "{simulated: [inf2.48xlarge]}", &[]).await?;
    // Text format, as promtool reads it: the Neuron families lint clean.
    let text = wait_for("neuron-monitor's families on /metrics", Duration::from_secs(20), || async {
        let (_, m) = http_get(agent.http, "/metrics").await?;
        Ok(m.contains("neuroncore_utilization_ratio{").then_some(m))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    promtool_check(&text).context("agent /metrics with Neuron families")?;

    let (prom, web) = start_prometheus(dir.path(), &[("hearth-agent", agent.http)]).await?;
    let cores = wait_for("neuroncore_utilization_ratio in Prometheus", Duration::from_secs(30), || async {
        let s = query(web, "neuroncore_utilization_ratio").await?;
        Ok((s.len() == 2).then_some(s))
    })
    .await
    .map_err(|e| e.context(prom.log_text()))?;
    // The fake runtime runs on device 0's two cores; labels as the AWS exporter writes them.
    let mut core_ids: Vec<&str> = cores.iter().map(|s| s["metric"]["neuroncore"].as_str().unwrap_or("")).collect();
    core_ids.sort();
    ensure!(core_ids == ["0", "1"], "{cores:?}");
    for s in &cores {
        let m = &s["metric"];
        ensure!(m["runtime_tag"] == "sim-0" && m["instance_type"] == "inf2.48xlarge" && m["instance_id"] == "i-sim-inf-1", "{s}");
        ensure!(m["region"] == "us-east-2" && m["availability_zone"] == "us-east-2a" && m["job"] == "hearth-agent", "{s}");
        ensure!((0.05..=0.85).contains(&value(s)), "a ratio, not a percentage: {s}");
    }

    // Runtime memory: two cores x 613 MiB on the device, 600 MiB on the host.
    let mem = query(web, "neuron_runtime_memory_used_bytes").await?;
    let by_place = |place: &str| mem.iter().find(|s| s["metric"]["memory_location"] == place).map(value);
    ensure!(by_place("neuron_device") == Some(2.0 * f64::from(613u32 << 20)), "{mem:?}");
    ensure!(by_place("host") == Some(f64::from(600u32 << 20)), "{mem:?}");
    let per_core = query(web, "sum by (neuroncore) (neuroncore_memory_usage_tensors)").await?;
    ensure!(per_core.len() == 2 && per_core.iter().all(|s| value(s) == f64::from(512u32 << 20)), "{per_core:?}");

    // Hardware ECC counters: one series per device and kind, all zero on a healthy node...
    let ecc = query(web, "hardware_ecc_events_total").await?;
    ensure!(ecc.len() == 12 * 4 && ecc.iter().all(|s| value(s) == 0.0), "{ecc:?}");
    let kinds: std::collections::BTreeSet<&str> = ecc.iter().filter_map(|s| s["metric"]["event_type"].as_str()).collect();
    ensure!(
        kinds.into_iter().collect::<Vec<_>>() == ["mem_ecc_corrected", "mem_ecc_uncorrected", "sram_ecc_corrected", "sram_ecc_uncorrected"],
        "{ecc:?}"
    );
    // ...until the driver counts two uncorrectable HBM errors on device 3.
    let tree = dir.path().join("state-inf-1/neuron-sim/devices/virtual/neuron_device");
    std::fs::write(tree.join("neuron3/stats/hardware/mem_ecc_uncorrected"), "2\n")?;
    wait_for("the ECC events counted in Prometheus", Duration::from_secs(20), || async {
        let s = query(web, r#"hardware_ecc_events_total{neuron_device_index="3",event_type="mem_ecc_uncorrected"}"#).await?;
        Ok((s.len() == 1 && value(&s[0]) == 2.0).then_some(()))
    })
    .await?;
    let rate = query(web, r#"sum(increase(hardware_ecc_events_total{event_type="mem_ecc_uncorrected"}[1m]))"#).await?;
    ensure!(rate.len() == 1 && value(&rate[0]) > 0.0, "increase() sees the counter rise: {rate:?}");

    // The info families: one series each, value 1, the facts in labels.
    let info = query(web, "instance_info").await?;
    ensure!(info.len() == 1 && value(&info[0]) == 1.0, "{info:?}");
    ensure!(info[0]["metric"]["instance_id"] == "i-sim-inf-1" && info[0]["metric"]["subnet_id"] == "subnet-00000000", "{info:?}");
    let hw = query(web, "neuron_hardware_info").await?;
    ensure!(hw.len() == 1 && value(&hw[0]) == 1.0, "{hw:?}");
    ensure!(hw[0]["metric"]["neuron_device_count"] == "12" && hw[0]["metric"]["neuroncore_per_device_count"] == "2", "{hw:?}");
    // The system groups ride along: the node's memory as neuron-monitor reports it.
    let total = query(web, "system_memory_total_bytes").await?;
    ensure!(total.len() == 1 && value(&total[0]) == 768.0 * f64::from(1u32 << 30), "{total:?}");
    Ok(())
}
