#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! A real Prometheus scrapes the agent's and the controller's `/metrics` (it negotiates
//! OpenMetrics), and `promtool check metrics` lints the Prometheus-text output. Needs
//! `prometheus` and `promtool` (apt `prometheus`); fails with install advice without them.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_tests::*;

/// Lints `text`; problems are allowed only on dcgm-exporter's families and only of the two
/// kinds their fixed names and labels cause (camelCase label names such as `UUID` and
/// `modelName`, counters without `_total`, "COUNTER" in `DCGM_FI_DEV_PCIE_REPLAY_COUNTER`):
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
            !(dcgm && allowed)
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

#[tokio::test]
async fn prometheus_scrapes_agent_and_controller_and_promtool_is_clean() -> Result<()> {
    let prometheus = require_tool("prometheus", "apt-get install prometheus")?;
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

    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  \
             - job_name: hearth-agent\n    static_configs: [{{targets: ['{}']}}]\n  \
             - job_name: hearth-controller\n    static_configs: [{{targets: ['{}']}}]\n",
            agent.http, ctl.http
        ),
    )?;
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg("--web.listen-address=127.0.0.1:0"),
        dir.path(),
    )?;
    // Prometheus logs the address it bound: `msg="Listening on" address=127.0.0.1:PORT`.
    let web = logged_addr(&prom.wait_for_log_line("msg=\"Listening on\"", Duration::from_secs(30)).await?, "address")?;
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
