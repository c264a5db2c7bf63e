//! EC2 spot interruption and rebalance notices, read from the instance metadata service
//! (IMDSv2: a session token first, then the notices). A notice drains every agent-managed
//! runtime at once, so in-flight requests finish inside the two minutes EC2 gives; the
//! Event on the Node and the report say why. Kubernetes-managed servers are left to the
//! node's own shutdown (the kubelet terminates their pods).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::kube::events::{NodeEvent, NodeEvents};

/// Settings from `runtimes.spot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotSettings {
    /// Base URL of the metadata service (tests point it at a fake one).
    pub endpoint: String,
    pub interval: Duration,
}

/// What the metadata service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `spot/instance-action`: the instance stops or terminates at `time`.
    Interruption { action: String, time: String },
    /// `events/recommendations/rebalance`: EC2 recommends moving work off this instance.
    Rebalance { time: String },
}

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn call(client: &Client, req: hyper::Request<Empty<Bytes>>) -> Result<(u16, Bytes), String> {
    let what = format!("{} {}", req.method(), req.uri());
    let f = async {
        let resp = client.request(req).await.map_err(|e| format!("{what}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("{what}: {e}"))?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), f).await.map_err(|_| format!("{what}: no answer within 2s"))?
}

/// One look at the notices.
pub async fn check(client: &Client, endpoint: &str) -> Result<Option<Notice>, String> {
    let base = endpoint.trim_end_matches('/');
    let token_req = hyper::Request::put(format!("{base}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let (st, token) = call(client, token_req).await?;
    if st != 200 {
        return Err(format!("PUT {base}/latest/api/token: HTTP {st}"));
    }
    let token = String::from_utf8_lossy(&token).trim().to_owned();
    let get = |path: &str| {
        hyper::Request::get(format!("{base}{path}"))
            .header("X-aws-ec2-metadata-token", token.as_str())
            .body(Empty::new())
            .map_err(|e| e.to_string())
    };
    let (st, body) = call(client, get("/latest/meta-data/spot/instance-action")?).await?;
    if st == 200 {
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("spot/instance-action: not JSON: {e}"))?;
        return Ok(Some(Notice::Interruption {
            action: v["action"].as_str().unwrap_or("terminate").to_owned(),
            time: v["time"].as_str().unwrap_or("").to_owned(),
        }));
    }
    let (st, body) = call(client, get("/latest/meta-data/events/recommendations/rebalance")?).await?;
    if st == 200 {
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("rebalance: not JSON: {e}"))?;
        return Ok(Some(Notice::Rebalance { time: v["noticeTime"].as_str().unwrap_or("").to_owned() }));
    }
    Ok(None)
}

/// Polls until `stop`; on the first notice cancels `drain` (every agent-managed runtime
/// drains), posts an Event and returns.
pub async fn watch(s: SpotSettings, drain: CancellationToken, events: NodeEvents, stop: CancellationToken) {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    let client: Client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(c);
    let mut failing = false;
    loop {
        match check(&client, &s.endpoint).await {
            Ok(Some(n)) => {
                let (reason, note) = match &n {
                    Notice::Interruption { action, time } => {
                        ("SpotInterruption", format!("EC2 spot {action} at {time}: draining every agent-managed model server"))
                    }
                    Notice::Rebalance { time } => (
                        "SpotRebalanceRecommendation",
                        format!("EC2 rebalance recommendation at {time}: draining every agent-managed model server"),
                    ),
                };
                warn!(notice = ?n, "{note}");
                events.post(NodeEvent::warning(reason, "Drain", note));
                drain.cancel();
                return;
            }
            Ok(None) => {
                if failing {
                    info!("instance metadata answers again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read spot notices from the instance metadata service; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(s.interval) => {}
        }
    }
}
