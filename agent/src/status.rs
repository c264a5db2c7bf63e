//! `hearth status`: the cluster as the controller sees it, as a table or JSON. With no
//! flags it talks to a running `hearth local`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use hearth_proto::transport::{TlsFiles, TlsMaterial};
use hearth_proto::v1 as pb;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::local::{LocalInfo, info_path};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone)]
pub struct StatusArgs {
    pub controller: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
    pub insecure: bool,
    pub output: Output,
    pub state_dir: PathBuf,
}

/// The JSON shape of `hearth status --output json`: stable field names for scripts.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub state: &'static str,
    pub agent_version: String,
    pub accelerator_count: u32,
    pub accelerators: Vec<String>,
    pub cached_models: u32,
    pub last_report_age_ms: u64,
    pub epoch: u64,
    pub seq: u64,
    pub peer: String,
}

pub use crate::runtime::cli::RuntimeRow;

/// The controller's latest recommendation for a model that has servers.
#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub model: String,
    pub desired_replicas: u32,
    pub current_replicas: u32,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub controller: String,
    pub nodes: Vec<NodeStatus>,
    pub runtimes: Vec<RuntimeRow>,
    pub models: Vec<ModelRow>,
}

fn state_name(c: i32) -> &'static str {
    match pb::NodeConnection::try_from(c) {
        Ok(pb::NodeConnection::Connected) => "connected",
        Ok(pb::NodeConnection::Stale) => "stale",
        Ok(pb::NodeConnection::Disconnected) => "disconnected",
        _ => "unknown",
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Flags win; without `--controller`, a running local mode's published credentials.
fn target(a: &StatusArgs) -> anyhow::Result<(String, String, Option<TlsFiles>)> {
    if let Some(url) = &a.controller {
        let host = url.split("://").nth(1).unwrap_or(url).split([':', '/']).next().unwrap_or("").to_owned();
        let server_name = a.server_name.clone().unwrap_or(host);
        if a.insecure {
            return Ok((url.clone(), server_name, None));
        }
        match (&a.ca, &a.cert, &a.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Ok((url.clone(), server_name, Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })))
            }
            _ => bail!("--controller needs --ca, --cert and --key (mTLS), or --insecure for a plain-text controller"),
        }
    } else {
        let path = info_path(&a.state_dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("no --controller given and no local mode found at {} (start one with `hearth local`)", path.display())
        })?;
        let info: LocalInfo = serde_json::from_str(&text).with_context(|| format!("{}: not a local-mode info file", path.display()))?;
        if !pid_alive(info.pid) {
            bail!("{} is from local mode pid {}, which has exited; start `hearth local` again", path.display(), info.pid);
        }
        Ok((info.controller_url, info.server_name, Some(TlsFiles { ca: info.ca, cert: info.cert, key: info.key })))
    }
}

/// A channel to the controller the flags (or a running local mode) point at; `timeout`
/// bounds each call (None for streams that run until stopped).
pub async fn connect(a: &StatusArgs, timeout: Option<Duration>) -> anyhow::Result<(String, tonic::transport::Channel)> {
    let (url, server_name, tls) = target(a)?;
    let mut ep = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--controller: expected a URL like https://host:7443, got {url:?}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    if let Some(files) = &tls {
        ep = ep.tls_config(TlsMaterial::load(files)?.client_config(&server_name))?;
    }
    let channel = ep.connect().await.with_context(|| format!("connecting to the controller at {url}"))?;
    Ok((url, channel))
}

pub async fn fetch(a: &StatusArgs) -> anyhow::Result<ClusterStatus> {
    let (url, channel) = connect(a, Some(Duration::from_secs(10))).await?;
    let mut op = pb::operator_client::OperatorClient::new(channel.clone());
    let answered = |s: tonic::Status| anyhow::anyhow!("controller at {url} answered {:?}: {}", s.code(), s.message());
    let resp = op.list_nodes(pb::ListNodesRequest {}).await.map_err(answered)?.into_inner();
    // The servers on each connected node, and what the scaler wants for their models.
    let mut runtimes = Vec::new();
    for n in resp.nodes.iter().filter(|n| n.connection != pb::NodeConnection::Disconnected as i32) {
        let Ok(r) = op.get_node(pb::GetNodeRequest { name: n.name.clone() }).await else { continue };
        runtimes.extend(crate::runtime::cli::rows_of(&n.name, r.into_inner().state.unwrap_or_default()));
    }
    let mut names: Vec<String> = runtimes.iter().map(|r| r.model.clone()).collect();
    names.sort();
    names.dedup();
    let mut models = Vec::new();
    let mut scaling = pb::scaling_client::ScalingClient::new(channel);
    for model in names {
        // A model outside the controller's catalog (a cache id) has no recommendation.
        let Ok(r) = scaling.recommend(pb::RecommendRequest { model: model.clone(), ..Default::default() }).await else { continue };
        if let Some(rec) = r.into_inner().recommendation {
            models.push(ModelRow {
                model,
                desired_replicas: rec.desired_replicas,
                current_replicas: rec.current_replicas,
                reason: rec.reason,
            });
        }
    }
    let nodes = resp
        .nodes
        .into_iter()
        .map(|n| NodeStatus {
            state: state_name(n.connection),
            name: n.name,
            agent_version: n.agent_version,
            accelerator_count: n.accelerator_count,
            accelerators: n.accelerator_summary,
            cached_models: n.cached_models,
            last_report_age_ms: n.last_report_age_ms,
            epoch: n.epoch,
            seq: n.seq,
            peer: n.peer_address,
        })
        .collect();
    Ok(ClusterStatus { controller: url, nodes, runtimes, models })
}

/// Columns padded to their widest cell, two spaces apart.
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn render_table(s: &ClusterStatus) -> String {
    let mut rows =
        vec![["NODE".to_owned(), "STATE".into(), "ACCELERATORS".into(), "MODELS".into(), "LAST REPORT".into(), "VERSION".into()]];
    for n in &s.nodes {
        let accel = if n.accelerators.is_empty() { "-".to_owned() } else { n.accelerators.join(", ") };
        rows.push([
            n.name.clone(),
            n.state.to_owned(),
            accel,
            n.cached_models.to_string(),
            format!("{:.1}s ago", n.last_report_age_ms as f64 / 1000.0),
            n.agent_version.clone(),
        ]);
    }
    let mut out = table(&rows);
    if s.nodes.is_empty() {
        out.push_str("(no nodes have reported to this controller)\n");
    }
    if !s.runtimes.is_empty() {
        let mut rows = vec![[
            "RUNTIME".to_owned(),
            "NODE".into(),
            "MODEL".into(),
            "STATE".into(),
            "BY".into(),
            "RUNNING".into(),
            "WAITING".into(),
            "KV".into(),
            "TTFT P50".into(),
        ]];
        for r in &s.runtimes {
            rows.push([
                r.name.clone(),
                r.node.clone(),
                r.model.clone(),
                r.state.clone(),
                r.managed_by.clone(),
                format!("{:.0}", r.requests_running),
                format!("{:.0}", r.requests_waiting),
                format!("{:.0}%", 100.0 * r.kv_cache_usage_ratio),
                if r.ttft_p50_seconds > 0.0 { format!("{:.0}ms", 1000.0 * r.ttft_p50_seconds) } else { "-".into() },
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    if !s.models.is_empty() {
        let mut rows = vec![["MODEL".to_owned(), "REPLICAS".into(), "DESIRED".into(), "REASON".into()]];
        for m in &s.models {
            rows.push([m.model.clone(), m.current_replicas.to_string(), m.desired_replicas.to_string(), m.reason.clone()]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

pub async fn run(a: StatusArgs) -> anyhow::Result<()> {
    let s = fetch(&a).await?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print!("{}", render_table(&s)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut s = ClusterStatus {
            controller: "https://c".into(),
            nodes: vec![NodeStatus {
                name: "gpu-1".into(),
                state: "connected",
                agent_version: "0.1.0".into(),
                accelerator_count: 2,
                accelerators: vec!["2 x NVIDIA H100 80GB HBM3".into()],
                cached_models: 0,
                last_report_age_ms: 1500,
                epoch: 1,
                seq: 2,
                peer: "127.0.0.1:1".into(),
            }],
            runtimes: vec![],
            models: vec![],
        };
        assert_eq!(
            render_table(&s),
            "NODE   STATE      ACCELERATORS               MODELS  LAST REPORT  VERSION\n\
             gpu-1  connected  2 x NVIDIA H100 80GB HBM3  0       1.5s ago     0.1.0\n"
        );
        s.runtimes.push(RuntimeRow {
            node: "gpu-1".into(),
            name: "chat-1".into(),
            engine: "vllm".into(),
            model: "chat".into(),
            state: "ready".into(),
            managed_by: "agent".into(),
            requests_running: 3.0,
            requests_waiting: 1.0,
            kv_cache_usage_ratio: 0.75,
            ttft_p50_seconds: 0.042,
            start_seconds: 1.5,
            reason: String::new(),
        });
        s.models.push(ModelRow { model: "chat".into(), desired_replicas: 2, current_replicas: 1, reason: "saturation".into() });
        let t = render_table(&s);
        assert!(
            t.ends_with(
                "\nRUNTIME  NODE   MODEL  STATE  BY     RUNNING  WAITING  KV   TTFT P50\n\
                 chat-1   gpu-1  chat   ready  agent  3        1        75%  42ms\n\
                 \nMODEL  REPLICAS  DESIRED  REASON\n\
                 chat   1         2        saturation\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn missing_local_mode_says_how_to_start_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = StatusArgs {
            controller: None,
            ca: None,
            cert: None,
            key: None,
            server_name: None,
            insecure: false,
            output: Output::Json,
            state_dir: dir.path().into(),
        };
        let e = format!("{:#}", target(&a).unwrap_err());
        assert!(e.contains("start one with `hearth local`"), "{e}");
    }
}
