#![allow(clippy::unwrap_used)] // Tests unwrap what they assert on.
//! Placement, scaling, the KEDA external scaler and the kube-scheduler extender, over the
//! network with mTLS and bearer tokens, against a controller fed by real agent streams.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hearth_proto::externalscaler as keda;
use hearth_proto::v1 as pb;
use hearth_tests::{RawAgent, TestPki, channel, https_post, start_controller};
use tonic::Code;

const GB: u64 = 1 << 30;

const MODELS: &str = "
- {name: llama, source: s3://models/llama, revision: main, size: 140Gi, image: vllm:v1, image_size: 10Gi,
   resources: {gpus: 4, memory: 64Gi}, scaling: {min_replicas: 0, max_replicas: 8, target_concurrency: 8}}
- {name: small, source: s3://models/small, size: 4Gi, image: vllm:v1, resources: {gpus: 1},
   scaling: {min_replicas: 0, max_replicas: 3}}
- {name: huge, source: s3://models/huge, size: 700Gi, image: vllm:v1, resources: {gpus: 16}}
";

fn node(n: u32, cached: bool, runtimes: Vec<pb::ServingRuntime>) -> pb::NodeState {
    let mut s = pb::NodeState { runtimes, ..pb::NodeState::h100s(n).with_memory_available(1024 * GB) };
    if cached {
        s = s.with_model(pb::CachedModel::ready("c-llama", "s3://models/llama", "main", 140 * GB)).with_image("docker.io/library/vllm:v1"); // as CRI reports the catalog's vllm:v1
    }
    s
}

/// Reports `state` for `name` over a real agent stream with the node's own certificate.
async fn report(ctl: std::net::SocketAddr, pki: &TestPki, name: &str, state: pb::NodeState) -> Result<RawAgent> {
    let mut a = RawAgent::connect(channel(ctl, Some(&pki.client_material(name)?)).await?, name).await?;
    a.send(pb::agent_message::Kind::Snapshot(pb::Snapshot { epoch: 1, seq: 1, state: Some(state) })).await?;
    match a.next().await?.kind {
        Some(pb::controller_message::Kind::Ack(_)) => Ok(a),
        other => anyhow::bail!("expected the snapshot's Ack, got {other:?}"),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    pki: TestPki,
    ctl: hearth_controller::Running,
    _agents: Vec<RawAgent>,
    _stop: tokio_util::sync::DropGuard,
    token: String,
}

async fn env(nodes: Vec<(&str, pb::NodeState)>) -> Result<Env> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let token = "extender-token-0123456789".to_owned();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let models: Vec<hearth_controller::catalog::RawModel> = serde_yaml_ng::from_str(MODELS)?;
    let ctl = start_controller(&pki, stop.clone(), |raw| {
        raw.models = models;
        raw.scaling.interval = Some("200ms".into());
        raw.auth.tokens.push(hearth_controller::api::auth::RawToken { role: "scheduler".into(), file: token_file });
    })
    .await?;
    let mut agents = Vec::new();
    for (name, state) in nodes {
        agents.push(report(ctl.grpc_addr, &pki, name, state).await?);
    }
    Ok(Env { _dir: dir, pki, ctl, _agents: agents, _stop: stop.drop_guard(), token })
}

fn three_nodes() -> Vec<(&'static str, pb::NodeState)> {
    vec![("gpu-a", node(8, true, vec![])), ("gpu-b", node(8, false, vec![])), ("gpu-c", node(2, false, vec![]))]
}

async fn placement(e: &Env, identity: &str) -> Result<pb::placement_client::PlacementClient<tonic::transport::Channel>> {
    Ok(pb::placement_client::PlacementClient::new(channel(e.ctl.grpc_addr, Some(&e.pki.client_material(identity)?)).await?))
}

#[tokio::test]
async fn placement_scores_filters_and_leases_over_mtls() -> Result<()> {
    let e = env(three_nodes()).await?;
    let mut p = placement(&e, "hearth-scheduler").await?;
    let score = p.score(pb::ScoreRequest { model: "llama".into(), nodes: vec![], limit: 0 }).await?.into_inner();
    let order: Vec<&str> = score.scores.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(order, ["gpu-a", "gpu-b"]);
    assert_eq!(score.rejected, 1);
    let a = &score.scores[0];
    let parts = a.parts.as_ref().context("parts")?;
    assert_eq!((parts.missing_bytes, parts.image_cached, a.priority), (0, true, 10));
    let b = score.scores[1].parts.as_ref().context("parts")?;
    assert_eq!(b.missing_bytes, 140 * GB);
    assert!(score.scores[1].time_to_ready_seconds > a.time_to_ready_seconds + 600.0, "{score:?}");

    let f = p
        .filter(pb::FilterRequest { model: "llama".into(), nodes: vec!["gpu-a".into(), "gpu-c".into(), "ghost".into()] })
        .await?
        .into_inner();
    assert_eq!(f.feasible.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(), ["gpu-a"]);
    let rej: Vec<(&str, &str)> = f.rejected.iter().map(|r| (r.node.as_str(), r.code.as_str())).collect();
    assert_eq!(rej, [("gpu-c", "gpus"), ("ghost", "unknown_node")]);
    assert!(f.rejected[0].reason.contains("needs 4 whole GPU(s); 2 free of 2"), "{:?}", f.rejected[0]);

    // Leases: idempotent per request id, they hold devices, release is idempotent.
    let reserve = |id: &str| pb::ReserveRequest { request_id: id.into(), model: "llama".into(), node: String::new(), ttl: None };
    let l1 = p.reserve(reserve("pod-1")).await?.into_inner().lease.context("lease")?;
    assert_eq!(l1.node, "gpu-a");
    assert_eq!(p.reserve(reserve("pod-1")).await?.into_inner().lease, Some(l1.clone()), "a retry gets the same lease");
    assert_eq!(p.reserve(reserve("pod-2")).await?.into_inner().lease.context("lease")?.node, "gpu-a");
    let l3 = p.reserve(reserve("pod-3")).await?.into_inner().lease.context("lease")?;
    assert_eq!(l3.node, "gpu-b", "gpu-a's 8 GPUs are leased");
    match l3.slot.and_then(|s| s.kind) {
        Some(pb::device_slot::Kind::Gpus(g)) => assert_eq!(g.indices, [0, 1, 2, 3]),
        other => anyhow::bail!("expected whole GPUs, got {other:?}"),
    }
    assert!(p.release(pb::ReleaseRequest { request_id: "pod-1".into() }).await?.into_inner().released);
    assert!(!p.release(pb::ReleaseRequest { request_id: "pod-1".into() }).await?.into_inner().released);

    // Errors say what is wrong.
    let err = p.score(pb::ScoreRequest { model: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = p.score(pb::ScoreRequest { model: "huge".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("needs 16 whole GPU(s)"), "{}", err.message());
    let mut conflict = reserve("pod-3");
    conflict.model = "small".into();
    assert_eq!(p.reserve(conflict).await.unwrap_err().code(), Code::AlreadyExists);
    let mut bad = reserve("pod-9");
    bad.ttl = Some(hearth_proto::prost_types::Duration { seconds: 86400, nanos: 0 });
    assert_eq!(p.reserve(bad).await.unwrap_err().code(), Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn roles_keep_agents_out_of_decisions_and_role_certs_out_of_node_reports() -> Result<()> {
    let e = env(three_nodes()).await?;
    // A node's certificate cannot place, scale or read other nodes.
    let mut as_agent = placement(&e, "gpu-a").await?;
    let err = as_agent.score(pb::ScoreRequest { model: "llama".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("this caller is agent"), "{}", err.message());
    let ch = channel(e.ctl.grpc_addr, Some(&e.pki.client_material("gpu-a")?)).await?;
    let err = pb::scaling_client::ScalingClient::new(ch.clone())
        .recommend(pb::RecommendRequest { model: "llama".into(), pending_requests: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        pb::operator_client::OperatorClient::new(ch).list_nodes(pb::ListNodesRequest {}).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // An autoscaler may not reserve devices; a scheduler may not move replica counts.
    let err = placement(&e, "hearth-autoscaler")
        .await?
        .reserve(pb::ReserveRequest { request_id: "x".into(), model: "llama".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let sch = channel(e.ctl.grpc_addr, Some(&e.pki.client_material("hearth-scheduler")?)).await?;
    let err = keda::external_scaler_client::ExternalScalerClient::new(sch)
        .is_active(keda::ScaledObjectRef { scaler_metadata: [("model".to_owned(), "llama".to_owned())].into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A scheduler identity cannot report as a node, not even one named like itself.
    let err = RawAgent::connect(channel(e.ctl.grpc_addr, Some(&e.pki.client_material("hearth-scheduler")?)).await?, "hearth-scheduler")
        .await
        .err()
        .context("a role certificate opened an agent stream")?;
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A bearer token works without a client certificate; a wrong one does not.
    let bare =
        tonic::transport::Endpoint::from_shared(format!("https://{}", e.ctl.grpc_addr))?.tls_config(e.pki.ca_only())?.connect().await?;
    let mut p = pb::placement_client::PlacementClient::new(bare);
    let mut req = tonic::Request::new(pb::ScoreRequest { model: "llama".into(), ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {}", e.token).parse()?);
    assert_eq!(p.score(req).await?.into_inner().scores.len(), 2);
    let mut req = tonic::Request::new(pb::ScoreRequest { model: "llama".into(), ..Default::default() });
    req.metadata_mut().insert("authorization", "Bearer not-the-token-at-all".parse()?);
    assert_eq!(p.score(req).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(p.score(pb::ScoreRequest { model: "llama".into(), ..Default::default() }).await.unwrap_err().code(), Code::Unauthenticated);
    Ok(())
}

fn runtime(model: &str, waiting: f64, running: f64) -> pb::ServingRuntime {
    pb::ServingRuntime {
        name: format!("{model}-0"),
        kind: "vllm".into(),
        model_id: model.into(),
        partition_uuid: "GPU-0".into(),
        state: "ready".into(),
        load: Some(pb::RuntimeLoad {
            requests_waiting: waiting,
            requests_running: running,
            kv_cache_usage_ratio: 0.3,
            ttft_p50_seconds: 0.2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn scaling_decisions_stream_and_drive_the_keda_scaler() -> Result<()> {
    // One llama replica carrying 38 requests (target 8 each): the recommendation is 5.
    let e = env(vec![("gpu-a", node(8, true, vec![runtime("llama", 30.0, 8.0)])), ("gpu-b", node(8, false, vec![]))]).await?;
    let ch = channel(e.ctl.grpc_addr, Some(&e.pki.client_material("hearth-autoscaler")?)).await?;
    let mut s = pb::scaling_client::ScalingClient::new(ch.clone());
    let mut watch = s.watch(pb::WatchRequest { model: String::new(), after_id: 0 }).await?.into_inner();
    let mut seen: Vec<pb::ScalingDecision> = Vec::new();
    while !seen.iter().any(|d| d.model == "llama" && d.recommendation.as_ref().is_some_and(|r| r.desired_replicas == 5)) {
        seen.push(next(&mut watch).await.with_context(|| format!("decisions so far: {seen:?}"))?.context("watch ended")?);
    }
    let llama = seen.iter().rfind(|d| d.model == "llama").context("llama decision")?.recommendation.clone().context("rec")?;
    // 38 requests on one replica is 4.75x its capacity: panic mode, straight to 5.
    assert_eq!((llama.current_replicas, llama.reason.as_str(), llama.panic), (1, "panic", true), "{llama:?}");
    assert!(llama.lead_time_seconds > 0.0, "lead time comes from the best node's predicted time-to-ready: {llama:?}");
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "ids increase: {seen:?}");

    // KEDA: "small" has no replicas and no demand, so it is inactive at 0...
    let mut k = keda::external_scaler_client::ExternalScalerClient::new(ch);
    let so = |model: &str| keda::ScaledObjectRef {
        name: "small".into(),
        namespace: "serving".into(),
        scaler_metadata: [("model".to_owned(), model.to_owned())].into(),
    };
    assert!(!k.is_active(so("small")).await?.into_inner().result);
    let mut active = k.stream_is_active(so("small")).await?.into_inner();
    assert_eq!(active.message().await?.map(|r| r.result), Some(false));
    let spec = k.get_metric_spec(so("small")).await?.into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!((spec.metric_specs[0].metric_name.as_str(), spec.metric_specs[0].target_size_float), ("hearth-small-desired-replicas", 1.0));
    // ...until a gateway reports requests queued for it: activation, seen by Watch and KEDA.
    let rec = s.recommend(pb::RecommendRequest { model: "small".into(), pending_requests: Some(3.0) }).await?.into_inner();
    assert_eq!(rec.recommendation.as_ref().map(|r| (r.desired_replicas, r.reason.as_str())), Some((1, "activation")));
    let last = rec.last_decision.context("activation is a decision")?;
    assert!(last.id > seen.last().map(|d| d.id).unwrap_or(0));
    // The scaler's first look at "small" (desired 0) may reach the stream before or after
    // the llama decisions, as models are evaluated in no fixed order; the activation comes after it.
    let d = loop {
        let d = next(&mut watch).await?.context("watch ended")?;
        if d.model != "small" {
            continue;
        }
        if d.id < last.id {
            assert_eq!(d.recommendation.as_ref().map(|r| r.desired_replicas), Some(0), "before activation: {d:?}");
            continue;
        }
        break d;
    };
    assert_eq!(d.id, last.id);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), active.message()).await??.map(|r| r.result), Some(true));
    assert!(k.is_active(so("small")).await?.into_inner().result);
    let m = k
        .get_metrics(keda::GetMetricsRequest { scaled_object_ref: Some(so("small")), metric_name: "hearth-small-desired-replicas".into() })
        .await?
        .into_inner();
    assert_eq!(m.metric_values[0].metric_value_float, 1.0);
    // Protocol errors.
    assert_eq!(k.is_active(so("nope")).await.unwrap_err().code(), Code::NotFound);
    let mut no_model = so("x");
    no_model.scaler_metadata.clear();
    let err = k.get_metric_spec(no_model).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("trigger metadata needs `model:"), "{}", err.message());
    let err = s.recommend(pb::RecommendRequest { model: "small".into(), pending_requests: Some(f64::NAN) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    Ok(())
}

async fn next(w: &mut tonic::Streaming<pb::ScalingDecision>) -> Result<Option<pb::ScalingDecision>> {
    Ok(tokio::time::timeout(Duration::from_secs(10), w.message()).await.context("no decision within 10 s")??)
}

fn fixture(name: &str) -> Result<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/extender").join(name);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| p.display().to_string())?
        .replace("@A@", "gpu-a")
        .replace("@B@", "gpu-b")
        .replace("@C@", "gpu-c"))
}

#[tokio::test]
async fn scheduler_extender_answers_kube_scheduler_json_over_https() -> Result<()> {
    let e = env(three_nodes()).await?;
    let addr = e.ctl.extender_addr.context("extender on")?;
    let ca = e.pki.ca.cert_pem().to_owned();
    let sched = e.pki.client_material("hearth-scheduler")?;
    let post =
        |path: &'static str, body: String, client: Option<hearth_proto::transport::TlsMaterial>, headers: Vec<(&'static str, String)>| {
            let ca = ca.clone();
            async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                https_post(addr, path, &body, client.as_ref(), &h, &ca).await
            }
        };

    // nodeCacheCapable: names in, names out, each failure with its reason.
    let (status, body) = post("/extender/filter", fixture("filter-nodenames.json")?, Some(sched.clone()), vec![]).await?;
    ensure!(status == 200, "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["NodeNames"], serde_json::json!(["gpu-a", "gpu-b"]), "{body}");
    assert!(v["FailedNodes"]["gpu-c"].as_str().is_some_and(|r| r.contains("needs 4 whole GPU(s)")), "{body}");
    assert_eq!(v["Error"], "");

    // Full NodeLists: the passing Node objects come back whole.
    let (status, body) = post("/extender/filter", fixture("filter-nodelist.json")?, Some(sched.clone()), vec![]).await?;
    ensure!(status == 200, "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let items = v["Nodes"]["items"].as_array().context("Nodes.items")?;
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["metadata"]["name"], "gpu-a");
    assert_eq!(items[0]["status"]["capacity"]["nvidia.com/gpu"], "8", "the Node object is passed through unchanged");

    // Prioritize with a bearer token instead of a certificate: 0-10, cached node best.
    let bearer = vec![("Authorization", format!("Bearer {}", e.token))];
    let (status, body) = post("/extender/prioritize", fixture("filter-nodenames.json")?, None, bearer.clone()).await?;
    ensure!(status == 200, "{status} {body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    let scores: Vec<(&str, i64)> = list.iter().map(|h| (h["Host"].as_str().unwrap_or(""), h["Score"].as_i64().unwrap_or(-1))).collect();
    assert_eq!(scores[0], ("gpu-a", 10), "{body}");
    assert!(scores[1].0 == "gpu-b" && (0..10).contains(&scores[1].1), "{body}");
    assert_eq!(scores[2], ("gpu-c", 0), "infeasible nodes score 0");
    // A pod that names no model is not Hearth's business: every node passes, all score 0.
    let (_, body) = post("/extender/prioritize", fixture("prioritize-unmanaged.json")?, None, bearer.clone()).await?;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?,
        serde_json::json!([{"Host":"gpu-a","Score":0},{"Host":"gpu-b","Score":0}])
    );
    let (_, body) = post("/extender/filter", fixture("prioritize-unmanaged.json")?, None, bearer.clone()).await?;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body)?["NodeNames"], serde_json::json!(["gpu-a", "gpu-b"]));
    // An unknown model is an Error in the result (the protocol's way), bad JSON is a 400.
    let unknown = fixture("filter-nodenames.json")?.replace("\"hearth.dev/model\":\"llama\"", "\"hearth.dev/model\":\"nope\"");
    let (status, body) = post("/extender/filter", unknown, None, bearer.clone()).await?;
    assert_eq!(status, 200);
    assert!(body.contains("\"Error\":\"model \\\"nope\\\" is not in the controller's catalog\""), "{body}");
    let (status, body) = post("/extender/filter", "{not json".into(), None, bearer).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a kube-scheduler ExtenderArgs"), "{body}");

    // No credentials, a wrong token, an agent's certificate: refused.
    assert_eq!(post("/extender/filter", fixture("filter-nodenames.json")?, None, vec![]).await?.0, 401);
    assert_eq!(
        post("/extender/filter", fixture("filter-nodenames.json")?, None, vec![("Authorization", "Bearer wrong-token-wrong-token".into())])
            .await?
            .0,
        401
    );
    let (status, body) = post("/extender/filter", fixture("filter-nodenames.json")?, Some(e.pki.client_material("gpu-a")?), vec![]).await?;
    assert_eq!(status, 403, "{body}");
    Ok(())
}
