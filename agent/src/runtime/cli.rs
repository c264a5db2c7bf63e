//! `hearth runtime ls` (every model server the controller knows of, with state, load and
//! measured start) and `hearth runtime logs NAME` (an agent-managed server's captured
//! output, read on the node).

use std::path::Path;

use anyhow::Context;
use hearth_proto::v1 as pb;
use serde::Serialize;

use crate::status::{Output, StatusArgs, connect};

#[derive(Debug, Serialize)]
pub struct RuntimeRow {
    pub node: String,
    pub name: String,
    pub engine: String,
    pub model: String,
    pub state: String,
    pub managed_by: String,
    pub requests_running: f64,
    pub requests_waiting: f64,
    pub kv_cache_usage_ratio: f64,
    pub ttft_p50_seconds: f64,
    pub start_seconds: f64,
    pub reason: String,
}

/// Every runtime of every node (or of `node`), from the controller's view.
pub async fn list(a: &StatusArgs, node: Option<&str>) -> anyhow::Result<Vec<RuntimeRow>> {
    let (url, channel) = connect(a, Some(std::time::Duration::from_secs(10))).await?;
    let mut op = pb::operator_client::OperatorClient::new(channel);
    let ask = |s: tonic::Status| anyhow::anyhow!("controller at {url} answered {:?}: {}", s.code(), s.message());
    let names: Vec<String> = match node {
        Some(n) => vec![n.to_owned()],
        None => op.list_nodes(pb::ListNodesRequest {}).await.map_err(ask)?.into_inner().nodes.into_iter().map(|n| n.name).collect(),
    };
    let mut rows = Vec::new();
    for n in names {
        let state = op.get_node(pb::GetNodeRequest { name: n.clone() }).await.map_err(ask)?.into_inner().state.unwrap_or_default();
        rows.extend(rows_of(&n, state));
    }
    Ok(rows)
}

/// The rows of one node's reported runtimes.
pub fn rows_of(node: &str, state: pb::NodeState) -> impl Iterator<Item = RuntimeRow> + '_ {
    state.runtimes.into_iter().map(move |r| {
        let l = r.load.unwrap_or_default();
        RuntimeRow {
            node: node.to_owned(),
            name: r.name,
            engine: r.kind,
            model: r.model_id,
            state: r.state,
            managed_by: r.managed_by,
            requests_running: l.requests_running,
            requests_waiting: l.requests_waiting,
            kv_cache_usage_ratio: l.kv_cache_usage_ratio,
            ttft_p50_seconds: l.ttft_p50_seconds,
            start_seconds: r.start_seconds,
            reason: r.reason,
        }
    })
}

pub fn render(rows: &[RuntimeRow]) -> String {
    let mut t = vec![
        ["NODE", "RUNTIME", "ENGINE", "MODEL", "STATE", "BY", "RUNNING", "WAITING", "KV", "TTFT P50", "START", "REASON"].map(str::to_owned),
    ];
    let opt = |v: f64, unit: &str| if v > 0.0 { format!("{v:.2}{unit}") } else { "-".into() };
    for r in rows {
        t.push([
            r.node.clone(),
            r.name.clone(),
            r.engine.clone(),
            r.model.clone(),
            r.state.clone(),
            r.managed_by.clone(),
            format!("{}", r.requests_running),
            format!("{}", r.requests_waiting),
            format!("{:.2}", r.kv_cache_usage_ratio),
            opt(r.ttft_p50_seconds, "s"),
            opt(r.start_seconds, "s"),
            if r.reason.is_empty() { "-".into() } else { r.reason.chars().take(80).collect() },
        ]);
    }
    let mut out = crate::status::table(&t);
    if rows.is_empty() {
        out.push_str("(no model servers reported)\n");
    }
    out
}

pub async fn ls(a: StatusArgs, node: Option<String>) -> anyhow::Result<()> {
    let rows = list(&a, node.as_deref()).await?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => print!("{}", render(&rows)),
    }
    Ok(())
}

/// The last `lines` lines of an agent-managed server's log under the agent's state dir.
pub fn logs(state_dir: &Path, name: &str, lines: usize) -> anyhow::Result<String> {
    if !hearth_service::kube::is_dns_label(name) {
        anyhow::bail!("runtime name {name:?}: expected the name of an agent-managed runtime (a DNS label)");
    }
    let dir = state_dir.join("runtimes").join(name);
    let path = dir.join("server.log");
    let mut text = String::new();
    // Rotated files first, oldest to newest, so the tail crosses a rotation.
    for i in (1..=3).rev() {
        if let Ok(t) = std::fs::read_to_string(path.with_extension(format!("log.{i}"))) {
            text.push_str(&t);
        }
    }
    text.push_str(&std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no log for runtime {name:?} at {} (is it an agent-managed runtime of the agent whose --state-dir this is? \
             With runtimes.driver: pod its log is its pod's: kubectl logs -l hearth.dev/runtime={name} in the pod namespace)",
            path.display()
        )
    })?);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}
