#![allow(clippy::unwrap_used)] // Tests unwrap their own locks and what they assert on.
//! Kubernetes-managed model servers, end to end: pods labelled `hearth.dev/model` on the
//! agent's node (from the API test server) point at HTTP servers that speak an engine's
//! API and metrics text; the agent reads them, reports them with their load, and the
//! controller's scaler decides on that load. Servers that load slowly, hang or die are
//! reported as such.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::response::IntoResponse;
use hearth_proto::v1 as pb;
use hearth_tests::{AgentProc, TestPki, channel, http_get, send_command, start_controller, wait_for};
use tokio_util::sync::CancellationToken;

const NODE: &str = "gpu-rt-1";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Alive, no model listed yet (vLLM while it loads the weights).
    Loading,
    Serving,
    /// Accepts, never answers.
    Hung,
}

struct Engine {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    metrics: Arc<Mutex<String>>,
    stop: CancellationToken,
}

/// An HTTP server with vLLM's endpoints: `/health`, `/v1/models`, `/metrics`.
async fn vllm_like(metrics: &str) -> Result<Engine> {
    let mode = Arc::new(Mutex::new(Mode::Loading));
    let text = Arc::new(Mutex::new(metrics.to_owned()));
    let (m1, m2, m3, t) = (mode.clone(), mode.clone(), mode.clone(), text.clone());
    let wait = |m: Arc<Mutex<Mode>>| async move {
        if *m.lock().unwrap() == Mode::Hung {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    };
    let app = axum::Router::new()
        .route(
            "/health",
            axum::routing::get(move || async move {
                wait(m1).await;
                ""
            }),
        )
        .route(
            "/v1/models",
            axum::routing::get(move || async move {
                let m = *m2.lock().unwrap();
                wait(m2.clone()).await;
                let data = if m == Mode::Serving { r#"[{"id":"llama","object":"model","owned_by":"vllm"}]"# } else { "[]" };
                ([("content-type", "application/json")], format!(r#"{{"object":"list","data":{data}}}"#)).into_response()
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                wait(m3).await;
                t.lock().unwrap().clone()
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(async move { s.cancelled().await }).await });
    Ok(Engine { addr, mode, metrics: text, stop })
}

fn metrics(running: u32, waiting: u32, kv: f64, ttft_count: u32) -> String {
    // A vLLM V1 page, trimmed to the families Hearth reads (buckets as vLLM declares them).
    let b = |le: &str, n: u32| format!("vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"{le}\",model_name=\"llama\"}} {n}\n");
    format!(
        "# HELP vllm:num_requests_running Requests in model execution batches.\n# TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"llama\"}} {running}.0\n\
         # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{engine=\"0\",model_name=\"llama\"}} {waiting}.0\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"llama\"}} {kv}\n\
         # TYPE vllm:time_to_first_token_seconds histogram\n{}{}{}{}\
         vllm:time_to_first_token_seconds_count{{engine=\"0\",model_name=\"llama\"}} {ttft_count}.0\n\
         # TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{{engine=\"0\",model_name=\"llama\"}} {}.0\n",
        b("0.1", ttft_count / 4),
        b("0.25", ttft_count / 2),
        b("0.5", ttft_count),
        b("+Inf", ttft_count),
        ttft_count * 100,
    )
}

/// An RFC 3339 time `secs` seconds ago.
fn ago(secs: i64) -> String {
    let t = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(secs);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn pod(name: &str, port: u16) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": "serving", "labels": {"hearth.dev/model": "llama", "app": "llama"},
                     "annotations": {"hearth.dev/port": port.to_string()}},
        "spec": {"nodeName": NODE, "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                   "startTime": ago(50),
                   "containerStatuses": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "imageID": "", "ready": true, "restartCount": 0,
                                          "state": {"running": {"startedAt": ago(8)}}}]},
    })
}

async fn runtimes(ctl: &hearth_controller::Running, pki: &TestPki) -> Result<Vec<pb::ServingRuntime>> {
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("operator")?)).await?;
    let r = pb::operator_client::OperatorClient::new(ch).get_node(pb::GetNodeRequest { name: NODE.into() }).await;
    Ok(r.ok().and_then(|r| r.into_inner().state).map(|s| s.runtimes).unwrap_or_default())
}

async fn runtime_where(
    ctl: &hearth_controller::Running,
    pki: &TestPki,
    what: &str,
    f: impl Fn(&pb::ServingRuntime) -> bool,
) -> Result<pb::ServingRuntime> {
    let found = wait_for(what, Duration::from_secs(20), || async { Ok(runtimes(ctl, pki).await?.into_iter().find(|r| f(r))) }).await;
    match found {
        Ok(r) => Ok(r),
        Err(e) => Err(e.context(format!("runtimes reported: {:#?}", runtimes(ctl, pki).await.unwrap_or_default()))),
    }
}

#[tokio::test]
async fn labelled_pods_are_read_reported_with_their_load_and_drive_the_scaler() -> Result<()> {
    let models: Vec<hearth_controller::catalog::RawModel> = serde_yaml_ng::from_str(
        "- {name: llama, source: s3://models/llama, revision: main, size: 16Gi, image: vllm:v1, resources: {gpus: 1},\n   scaling: {min_replicas: 0, max_replicas: 16, target_concurrency: 2}}\n",
    )?;
    let (dir, pki, ctl, _guard) = setup(|raw| {
        raw.models = models;
        raw.scaling.interval = Some("200ms".into());
    })
    .await?;
    let (api, kube_yaml) = hearth_tests::agent_api_server(dir.path(), NODE).await?;
    let engine = vllm_like(&metrics(3, 5, 0.42, 40)).await?;
    let uid = api.add_pod_json(pod("llama-0", engine.addr.port()));
    // Not a model server: never read.
    api.add_pod_json(
        serde_json::json!({"metadata": {"name": "sidecar", "namespace": "serving"}, "spec": {"nodeName": NODE, "containers": []}}),
    );
    let agent =
        AgentProc::start(dir.path(), &pki, NODE, ctl.grpc_addr, &format!("{kube_yaml}runtimes: {{interval: 300ms, timeout: 500ms}}\n"))
            .await?;

    // Alive but the model is not listed yet: starting, with the reason.
    let r =
        runtime_where(&ctl, &pki, "the runtime, starting", |r| r.name == "serving/llama-0").await.with_context(|| agent.proc.log_text())?;
    assert_eq!(
        (r.state.as_str(), r.kind.as_str(), r.model_id.as_str(), r.managed_by.as_str()),
        ("starting", "vllm", "llama", "kubernetes")
    );
    assert!(r.reason.contains("no model listed yet"), "{}", r.reason);

    // Serving: ready, with the engine's load.
    *engine.mode.lock().unwrap() = Mode::Serving;
    let r = runtime_where(&ctl, &pki, "the runtime ready", |r| r.state == "ready").await?;
    let load = r.load.context("load")?;
    assert_eq!((load.requests_running, load.requests_waiting, load.kv_cache_usage_ratio), (3.0, 5.0, 0.42));
    // The image took 42 s (pod start to container start, from the pod's status); the engine
    // start runs from the container start to the first ready read.
    assert_eq!(r.image_seconds.round(), 42.0);
    assert!((8.0..60.0).contains(&r.start_seconds), "{r:?}");
    // New observations between two reads give a window quantile and a token rate.
    *engine.metrics.lock().unwrap() = metrics(3, 5, 0.42, 80);
    let r = runtime_where(&ctl, &pki, "a TTFT quantile", |r| r.load.as_ref().is_some_and(|l| l.ttft_p50_seconds > 0.0)).await?;
    let load = r.load.context("load")?;
    assert!((0.1..=0.25).contains(&load.ttft_p50_seconds), "p50 of 40 new observations, 20 of them <= 0.25 s: {load:?}");
    let (_, body) = http_get(agent.http, "/metrics").await?;
    for series in [
        "hearth_runtime_requests_waiting{runtime=\"serving/llama-0\",model=\"llama\",engine=\"vllm\"} 5",
        "hearth_runtime_kv_cache_usage_ratio{runtime=\"serving/llama-0\",model=\"llama\",engine=\"vllm\"} 0.42",
        "hearth_runtime_state{runtime=\"serving/llama-0\",model=\"llama\",engine=\"vllm\",state=\"ready\"} 1",
    ] {
        ensure!(
            body.contains(series),
            "missing {series}:\n{}",
            body.lines().filter(|l| l.contains("hearth_runtime")).collect::<Vec<_>>().join("\n")
        );
    }

    // The scaler sees 8 requests on one ready replica with a target of 2 each: 4 replicas.
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("hearth-autoscaler")?)).await?;
    let scaling = pb::scaling_client::ScalingClient::new(ch);
    let desired = wait_for("a decision from the reported load", Duration::from_secs(20), || {
        let mut s = scaling.clone();
        async move {
            let r = s.recommend(pb::RecommendRequest { model: "llama".into(), pending_requests: None }).await?.into_inner();
            Ok(r.recommendation.filter(|r| r.current_replicas == 1 && r.desired_replicas >= 4).map(|r| r.desired_replicas))
        }
    })
    .await?;
    ensure!(desired == 4, "ceil(8 / 2) replicas: {desired}");

    // A server that stops answering: failed (it was ready once), with the timeout.
    *engine.mode.lock().unwrap() = Mode::Hung;
    let r = runtime_where(&ctl, &pki, "the hung runtime failed", |r| r.state == "failed").await?;
    assert!(r.reason.contains("no answer within"), "{}", r.reason);
    // And one that is gone.
    *engine.mode.lock().unwrap() = Mode::Serving;
    engine.stop.cancel();
    let r = runtime_where(&ctl, &pki, "the dead runtime failed", |r| r.state == "failed" && !r.reason.contains("no answer within")).await?;
    assert!(r.reason.contains("GET http://127.0.0.1"), "{}", r.reason);
    // The pod is deleted: the runtime leaves the report.
    api.delete_pod(&uid);
    wait_for("the runtime gone", Duration::from_secs(20), || async { Ok(runtimes(&ctl, &pki).await?.is_empty().then_some(())) }).await?;
    assert!(api.forbidden().is_empty(), "{:?}", api.forbidden());
    Ok(())
}

/// A temp dir, a PKI and an in-process controller (tweaked by `tweak`), stopped on drop.
async fn setup(
    tweak: impl FnOnce(&mut hearth_controller::config::RawConfig),
) -> Result<(tempfile::TempDir, TestPki, hearth_controller::Running, tokio_util::sync::DropGuard)> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let stop = CancellationToken::new();
    let ctl = start_controller(&pki, stop.clone(), tweak).await?;
    Ok((dir, pki, ctl, stop.drop_guard()))
}

/// The test engine: a Python stand-in with vLLM's endpoints and metrics.
fn fake_engine() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/fake_engine.py")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pid_of(state: &std::path::Path, runtime: &str) -> Result<i32> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("runtimes").join(runtime).join("pid.json"))?)?;
    v["pid"].as_i64().map(|p| p as i32).context("pid")
}

fn running(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// Agent-managed servers (process driver): the weights cached and pinned first, the server
/// started on them, ready, read; adopted again after the agent is killed; one that keeps
/// exiting is a crash loop; one that ignores SIGTERM is killed at its drain deadline; a
/// clean agent stop drains them all within its grace.
#[tokio::test]
async fn agent_managed_servers_are_supervised_adopted_after_a_crash_and_drained() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    let src = dir.path().join("fsx/llama");
    hearth_agent::cache::sample::write_sample_model(&src, 1, 1 << 20)?;
    let engine = fake_engine();
    let (p1, p2, p3) = (free_port()?, free_port()?, free_port()?);
    let runtime = |name: &str, port: u16, extra: &str, drain: &str| {
        format!(
            "    - {{name: {name}, engine: vllm, model_name: llama, port: {port}, drain_timeout: {drain}, visible_devices: \"0\",\n       \
             command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --model-dir, \"{{model_dir}}\"{extra}],\n       \
             model: {{uri: \"file://{}\"}}}}\n",
            engine.display(),
            src.display()
        )
    };
    // A Kubernetes API for the Events (the crash loop's).
    let (api, kube_yaml) = hearth_tests::agent_api_server(dir.path(), NODE).await?;
    let yaml = format!(
        "{kube_yaml}shutdown_grace: 5s\nruntimes:\n  interval: 300ms\n  timeout: 1s\n  managed:\n{}{}{}",
        runtime("llama-a", p1, ", --load-seconds, \"1\", --drain-seconds, \"0.3\"", "3s"),
        runtime("flaky", p2, ", --exit-after, \"0.3\"", "1s"),
        runtime("stubborn", p3, ", --ignore-sigterm", "1s"),
    );
    let mut agent = AgentProc::start(dir.path(), &pki, NODE, ctl.grpc_addr, &yaml).await?;
    let state = dir.path().join(format!("state-{NODE}"));

    let r = runtime_where(&ctl, &pki, "llama-a ready", |r| r.name == "llama-a" && r.state == "ready")
        .await
        .with_context(|| agent.proc.log_text())?;
    assert_eq!((r.managed_by.as_str(), r.model_id.as_str(), r.partition_uuid.as_str()), ("agent", "llama", "0"));
    // Its start was measured: the weights placed, then the engine up (it loads for 1 s).
    let r = runtime_where(&ctl, &pki, "llama-a's start measured", |r| r.name == "llama-a" && r.start_seconds > 0.0).await?;
    ensure!(r.start_seconds >= 1.0 && r.start_seconds < 20.0 && r.weights_seconds > 0.0, "{r:?}");
    // Started on the cached weights, pinned while it runs, with its devices.
    let log = std::fs::read_to_string(state.join("runtimes/llama-a/server.log"))?;
    ensure!(log.contains("serving llama from ") && log.contains("/models/") && log.contains("CUDA_VISIBLE_DEVICES=0"), "{log}");
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("operator")?)).await?;
    let node = pb::operator_client::OperatorClient::new(ch).get_node(pb::GetNodeRequest { name: NODE.into() }).await?.into_inner();
    ensure!(node.state.context("state")?.models.iter().any(|m| m.pinned && m.source_uri.contains("fsx/llama")), "the weights are pinned");
    // In a cgroup of its own under the agent's (as root, which can create one); without
    // that right the agent says so and the server runs in the agent's.
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", pid_of(&state, "llama-a")?))?;
    let own = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned();
    if rustix::process::geteuid().is_root() {
        ensure!(own.contains("/hearth-runtime-llama-a-"), "the server's cgroup: {own}");
    } else {
        ensure!(agent.proc.log_text().contains("no cgroup of its own"), "{}", agent.proc.log_text());
    }

    // The CLI: the controller's view, and the server's log on the node. (Not a blocking
    // spawn: the controller answering it runs on this test's runtime.)
    let op = pki.client("operator")?;
    let out = tokio::process::Command::new(hearth_tests::bin("hearth"))
        .args(["runtime", "ls", "--controller", &format!("https://{}", ctl.grpc_addr), "--server-name", "localhost"])
        .arg("--ca")
        .arg(&op.ca)
        .arg("--cert")
        .arg(&op.cert)
        .arg("--key")
        .arg(&op.key)
        .output()
        .await?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && table.lines().any(|l| l.contains("llama-a") && l.contains("ready") && l.contains("agent")),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(hearth_tests::bin("hearth"))
        .args(["runtime", "logs", "llama-a", "--agent-state-dir"])
        .arg(&state)
        .output()?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("serving llama from"), "{}", String::from_utf8_lossy(&out.stderr));

    // The one that keeps exiting: a crash loop, with its log's last words.
    let r = runtime_where(&ctl, &pki, "flaky in a crash loop", |r| r.name == "flaky" && r.state == "crash-loop").await?;
    assert!(r.reason.contains("exiting with 1"), "{}", r.reason);
    let ev = wait_for("the crash-loop Event on the Node", Duration::from_secs(10), || async {
        Ok(api.objects("events.k8s.io/events").into_iter().find(|e| e["reason"] == "RuntimeCrashLoop"))
    })
    .await?;
    assert!(ev["note"].as_str().is_some_and(|n| n.contains("model server flaky exited 3 times")), "{ev}");
    let (_, body) = http_get(agent.http, "/metrics").await?;
    let restarts: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("hearth_runtime_restarts_total{runtime=\"flaky\"} "))
        .context("restarts series")?
        .parse()?;
    ensure!(restarts >= 3.0, "{restarts}");

    // The agent is killed: its servers keep serving, and the next agent adopts them.
    let pid = pid_of(&state, "llama-a")?;
    agent.proc.kill9()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(running(pid), "the server outlives a killed agent");
    let (st, _) = http_get(SocketAddr::from(([127, 0, 0, 1], p1)), "/health").await?;
    assert_eq!(st, 200);
    let mut agent = AgentProc::start(dir.path(), &pki, NODE, ctl.grpc_addr, &yaml).await?;
    agent.proc.wait_for_log_line("adopted the model server", Duration::from_secs(10)).await?;
    runtime_where(&ctl, &pki, "llama-a ready again", |r| r.name == "llama-a" && r.state == "ready").await?;
    assert_eq!(pid_of(&state, "llama-a")?, pid, "adopted, not started twice");
    runtime_where(&ctl, &pki, "stubborn ready", |r| r.name == "stubborn" && r.state == "ready").await?;
    let stubborn = pid_of(&state, "stubborn")?;

    // A clean stop drains every server within the agent's grace; the stubborn one is killed
    // at its 1 s deadline.
    agent.proc.signal("TERM")?;
    let t0 = std::time::Instant::now();
    let st = agent.proc.wait_exit(Duration::from_secs(8)).await?;
    ensure!(st.is_some_and(|s| s.success()), "clean exit: {st:?}\n{}", agent.proc.log_text());
    ensure!(t0.elapsed() < Duration::from_secs(5), "within shutdown_grace: {:?}", t0.elapsed());
    ensure!(!running(pid) && !running(stubborn), "no server left behind");
    let log = std::fs::read_to_string(state.join("runtimes/llama-a/server.log"))?;
    ensure!(log.contains("drained, exiting"), "llama-a drained itself: {log}");
    let log = std::fs::read_to_string(state.join("runtimes/stubborn/server.log"))?;
    ensure!(log.contains("SIGTERM ignored"), "{log}");
    Ok(())
}

/// StartRuntime and StopRuntime from the controller: a runtime from the agent's template on
/// a cached model and a partition; refused (before accepting) for a model not cached, a
/// partition already held, an engine without a template; stopped and drained on command.
#[tokio::test]
async fn start_and_stop_runtime_commands_run_a_server_on_a_cached_model_and_refuse_what_they_cannot() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    let src = dir.path().join("fsx/llama");
    hearth_agent::cache::sample::write_sample_model(&src, 1, 1 << 20)?;
    let engine = fake_engine();
    let port = free_port()?;
    // Top-level keys after the cache's models (the helper writes `cache:` itself).
    let extra = format!(
        "  models: [{{uri: 'file://{}'}}]\nruntimes:\n  interval: 300ms\n  engines:\n    vllm: {{port: {port}, drain_timeout: 2s, command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --model-dir, \"{{model_dir}}\", --drain-seconds, \"0.2\"]}}\n",
        src.display(),
        engine.display()
    );
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, NODE, ctl.grpc_addr, &extra).await?;
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("operator")?)).await?;
    let op = pb::operator_client::OperatorClient::new(ch);
    let model_id = wait_for("the model cached", Duration::from_secs(20), || {
        let mut op = op.clone();
        async move {
            let s = op.get_node(pb::GetNodeRequest { name: NODE.into() }).await.ok().and_then(|r| r.into_inner().state);
            Ok(s.and_then(|s| s.models.into_iter().find(|m| m.state == pb::CacheEntryState::Ready as i32)).map(|m| m.id))
        }
    })
    .await?;
    let send = |id: &str, kind: pb::command::Kind| send_command(&ctl, NODE, id, kind);
    let start = |name: &str, kind: &str, model: &str, partition: &str| {
        pb::command::Kind::StartRuntime(pb::StartRuntimeCommand {
            name: name.into(),
            kind: kind.into(),
            model_id: model.into(),
            partition_uuid: partition.into(),
            args: vec!["--load-seconds".into(), "0.5".into()],
            ..Default::default()
        })
    };
    send("c1", start("llama-cmd", "vllm", &model_id, "MIG-aaaa"))?;
    let line = agent.proc.wait_for_log_line("start_runtime command finished", Duration::from_secs(20)).await?;
    ensure!(line.contains("Succeeded") && line.contains("llama-cmd"), "{line}");
    let r = runtime_where(&ctl, &pki, "llama-cmd ready", |r| r.name == "llama-cmd" && r.state == "ready").await?;
    assert_eq!((r.managed_by.as_str(), r.partition_uuid.as_str(), r.model_id.as_str()), ("agent", "MIG-aaaa", model_id.as_str()));

    // Refused at once, each with its reason.
    send("c2", start("other", "vllm", &model_id, "MIG-aaaa"))?;
    agent.proc.wait_for_log_line("partition MIG-aaaa is held by runtime", Duration::from_secs(10)).await?;
    send("c3", start("other", "vllm", "not-cached", ""))?;
    agent.proc.wait_for_log_line("is not cached and ready on this node", Duration::from_secs(10)).await?;
    send("c4", start("other", "tgi", &model_id, ""))?;
    agent.proc.wait_for_log_line("no command for tgi", Duration::from_secs(10)).await?;

    // Stopped on command: drained, and gone from the report.
    let pid = pid_of(&dir.path().join(format!("state-{NODE}")), "llama-cmd")?;
    send("c5", pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: "llama-cmd".into() }))?;
    agent.proc.wait_for_log_line("drained and stopped", Duration::from_secs(10)).await?;
    ensure!(!running(pid), "the server is gone");
    wait_for("llama-cmd gone from the report", Duration::from_secs(10), || async {
        Ok((!runtimes(&ctl, &pki).await?.iter().any(|r| r.name == "llama-cmd")).then_some(()))
    })
    .await?;
    send("c6", pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: "llama-cmd".into() }))?;
    agent.proc.wait_for_log_line("was started here by command", Duration::from_secs(10)).await?;
    Ok(())
}

/// An EC2 spot interruption notice (IMDSv2: token, then `spot/instance-action`) drains every
/// agent-managed server at once and refuses new ones.
#[tokio::test]
async fn a_spot_interruption_notice_drains_agent_managed_servers() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    // The metadata service: a token only for a PUT with a TTL, notices only with the token.
    let notice = Arc::new(Mutex::new(false));
    let n = notice.clone();
    let imds = axum::Router::new()
        .route(
            "/latest/api/token",
            axum::routing::put(|h: axum::http::HeaderMap| async move {
                if h.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                    (axum::http::StatusCode::OK, "tok")
                } else {
                    (axum::http::StatusCode::BAD_REQUEST, "")
                }
            }),
        )
        .route(
            "/latest/meta-data/spot/instance-action",
            axum::routing::get(move |h: axum::http::HeaderMap| async move {
                if h.get("x-aws-ec2-metadata-token").is_none_or(|t| t != "tok") {
                    return (axum::http::StatusCode::UNAUTHORIZED, String::new());
                }
                if *n.lock().unwrap() {
                    (axum::http::StatusCode::OK, r#"{"action": "terminate", "time": "2026-12-02T18:30:00Z"}"#.to_owned())
                } else {
                    (axum::http::StatusCode::NOT_FOUND, String::new())
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let imds_addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, imds).await });
    let engine = fake_engine();
    let port = free_port()?;
    let yaml = format!(
        "runtimes:\n  interval: 300ms\n  spot: {{enabled: true, imds_endpoint: \"http://{imds_addr}\", interval: 200ms}}\n  managed:\n    - {{name: llama, engine: vllm, port: {port}, drain_timeout: 3s, command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --drain-seconds, \"0.5\"]}}\n",
        engine.display()
    );
    let mut agent = AgentProc::start(dir.path(), &pki, NODE, ctl.grpc_addr, &yaml).await?;
    runtime_where(&ctl, &pki, "llama ready", |r| r.name == "llama" && r.state == "ready").await.with_context(|| agent.proc.log_text())?;
    let state = dir.path().join(format!("state-{NODE}"));
    let pid = pid_of(&state, "llama")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(running(pid), "no notice, no drain");
    *notice.lock().unwrap() = true;
    agent.proc.wait_for_log_line("EC2 spot terminate at 2026-12-02T18:30:00Z", Duration::from_secs(10)).await?;
    wait_for("the server drained", Duration::from_secs(10), || async { Ok((!running(pid)).then_some(())) }).await?;
    let log = std::fs::read_to_string(state.join("runtimes/llama/server.log"))?;
    ensure!(log.contains("SIGTERM: draining") && log.contains("drained, exiting"), "{log}");
    // Not restarted afterwards.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(!state.join("runtimes/llama/pid.json").exists(), "no new server after the drain");
    Ok(())
}

/// A partition change on a GPU an agent-managed server runs on: the server is drained and
/// held while the reconciler applies, then started again.
#[tokio::test]
async fn a_partition_change_drains_the_servers_on_its_gpus_and_starts_them_again() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    let engine = fake_engine();
    let port = free_port()?;
    let yaml = format!(
        "runtimes:\n  interval: 300ms\n  managed:\n    - {{name: llama, engine: vllm, port: {port}, visible_devices: \"0\", drain_timeout: 3s, command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --drain-seconds, \"0.2\"]}}\n",
        engine.display()
    );
    let mut agent = AgentProc::start(dir.path(), &pki, NODE, ctl.grpc_addr, &yaml).await?;
    runtime_where(&ctl, &pki, "llama ready", |r| r.name == "llama" && r.state == "ready").await.with_context(|| agent.proc.log_text())?;
    let state = dir.path().join(format!("state-{NODE}"));
    let before = pid_of(&state, "llama")?;
    let spec = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/mig-spec.yaml"))?;
    ctl.state.send_command(
        NODE,
        pb::Command {
            id: "p1".into(),
            idempotency_key: "p1".into(),
            deadline: None,
            kind: Some(pb::command::Kind::ApplyPartition(pb::ApplyPartitionCommand { spec, config_name: "balanced".into() })),
        },
    )?;
    agent.proc.wait_for_log_line("held for a partition change", Duration::from_secs(20)).await?;
    let line = agent.proc.wait_for_log_line("apply_partition command finished", Duration::from_secs(30)).await?;
    ensure!(line.contains("Succeeded"), "{line}");
    agent.proc.wait_for_log_line("partition change done: starting again", Duration::from_secs(10)).await?;
    ensure!(!running(before), "the old server was drained");
    // A new server, started after the apply, serving again (the controller's view may still
    // hold the old "ready" for a moment: look at the new server itself).
    let log_path = state.join("runtimes/llama/server.log");
    wait_for("a new server serving", Duration::from_secs(20), || async {
        let after = pid_of(&state, "llama")?;
        let log = std::fs::read_to_string(&log_path)?;
        Ok((after != before && running(after) && log.matches("serving llama").count() == 2).then_some(()))
    })
    .await?;
    ensure!(std::fs::read_to_string(&log_path)?.contains("SIGTERM: draining"));
    wait_for("ready again", Duration::from_secs(20), || async {
        let (st, _) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/health").await?;
        Ok((st == 200).then_some(()))
    })
    .await?;
    runtime_where(&ctl, &pki, "llama ready again", |r| r.name == "llama" && r.state == "ready").await?;
    Ok(())
}

/// The pod driver: the agent creates a Pod bound to its node through the API server (the
/// exact spec: image, command on the weights, the weights mounted read-only, the partition
/// as the device plugin's resource, an owner reference to the Node, Hearth's labels), a
/// kubelet runs it, the agent watches it to ready and reads it over the pod network. An
/// agent stop leaves it serving and the next agent adopts it; a crashed container is
/// replaced; StopRuntime deletes its pod with the drain deadline as grace period.
#[tokio::test]
async fn pod_driver_binds_a_pod_to_the_node_watches_it_to_ready_adopts_it_and_deletes_it_on_stop() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    let src = dir.path().join("fsx/llama");
    hearth_agent::cache::sample::write_sample_model(&src, 1, 1 << 20)?;
    let engine = fake_engine();
    let (api, kube_yaml) = hearth_tests::agent_api_server(dir.path(), NODE).await?;
    // Half a second "pulling" the image, then the container's command runs here; its device
    // plugin hands out GPUs, and its PodResources socket says which pod got which.
    let podres = dir.path().join("pod-resources");
    std::fs::create_dir_all(&podres)?;
    let kubelet = api.kubelet_with_devices(NODE, Duration::from_millis(500), Some(&podres))?;
    let devices = format!("{{simulated: [2xH100-80GB], collect_interval: 300ms, pod_resources_dir: \"{}\"}}", podres.display());
    let (port, cmd_port) = (free_port()?, free_port()?);
    let fake = |extra: &str| {
        format!(
            "[python3, \"{}\", --port, \"{{port}}\", --model, llama, --model-dir, \"{{model_dir}}\", --drain-seconds, \"0.3\"{extra}]",
            engine.display()
        )
    };
    let extra = format!(
        "  models: [{{uri: 'file://{src}'}}]\n{kube_yaml}shutdown_grace: 3s\nruntimes:\n  interval: 300ms\n  timeout: 1s\n  driver: pod\n  pod: {{namespace: serving}}\n  managed:\n    \
         - {{name: llama-p, engine: vllm, model_name: llama, port: {port}, drain_timeout: 4s, visible_devices: \"0\", image: \"vllm/vllm-openai:v0.11.0\",\n       \
         command: {}, model: {{uri: 'file://{src}'}}}}\n  engines:\n    vllm: {{port: {cmd_port}, drain_timeout: 2s, image: \"vllm/vllm-openai:v0.11.0\", command: {}}}\n",
        fake(", --load-seconds, \"0.5\""),
        fake(""),
        src = src.display(),
    );
    let mut agent = AgentProc::spawn_with(dir.path(), &pki, NODE, ctl.grpc_addr, "", &extra, &devices, &[]).await?;
    // The device plugin registers the node's GPUs (until then the pod waits for one).
    let ch = channel(ctl.grpc_addr, Some(&pki.client_material("operator")?)).await?;
    let op = pb::operator_client::OperatorClient::new(ch);
    let gpus = wait_for("the node's GPUs", Duration::from_secs(20), || {
        let mut op = op.clone();
        async move {
            let s = op.get_node(pb::GetNodeRequest { name: NODE.into() }).await.ok().and_then(|r| r.into_inner().state);
            Ok(s.map(|s| s.accelerators.into_iter().map(|a| a.uuid).collect::<Vec<_>>()).filter(|g| g.len() == 2))
        }
    })
    .await?;
    kubelet.set_gpus(gpus.clone());
    let r = runtime_where(&ctl, &pki, "llama-p ready", |r| r.name == "llama-p" && r.state == "ready")
        .await
        .with_context(|| agent.proc.log_text())?;
    // Asked for GPU 0's kind; reported with the GPU the device plugin gave (the last one).
    assert_eq!((r.managed_by.as_str(), r.model_id.as_str()), ("agent", "llama"));
    assert_eq!(r.partition_uuid, gpus[1], "the allocated GPU, from PodResources");
    // Time to ready, split: the image (the kubelet's half-second pull) apart from the engine.
    let r = runtime_where(&ctl, &pki, "llama-p's start measured", |r| r.name == "llama-p" && r.start_seconds > 0.0).await?;
    ensure!(r.image_seconds >= 0.0 && r.image_seconds < 5.0 && r.weights_seconds > 0.0, "{r:?}");

    // The Pod as the API server got it.
    let creates: Vec<_> = api.requests().into_iter().filter(|q| q.is("create", "pods")).collect();
    assert_eq!(creates.len(), 1, "one pod created");
    assert_eq!(creates[0].path, "/api/v1/namespaces/serving/pods");
    let pod = &creates[0].body;
    let pod_name = format!("hearth-llama-p-{NODE}");
    assert_eq!(pod["metadata"]["name"], pod_name.as_str());
    assert_eq!(pod["metadata"]["labels"]["app.kubernetes.io/managed-by"], "hearth-agent");
    assert_eq!(pod["metadata"]["labels"]["hearth.dev/runtime"], "llama-p");
    assert_eq!(pod["metadata"]["annotations"]["hearth.dev/model"], "llama");
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        serde_json::json!([{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": format!("uid-{NODE}")}])
    );
    let spec = &pod["spec"];
    assert_eq!((spec["nodeName"].as_str(), spec["restartPolicy"].as_str()), (Some(NODE), Some("Never")));
    assert_eq!(spec["terminationGracePeriodSeconds"], 4);
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "vllm/vllm-openai:v0.11.0");
    assert_eq!(c["resources"]["limits"], serde_json::json!({"nvidia.com/gpu": "1"}));
    assert_eq!(c["resources"]["requests"], c["resources"]["limits"]);
    assert_eq!(c["ports"][0]["containerPort"], port);
    let model_dir = c["volumeMounts"][0]["mountPath"].as_str().context("mount")?.to_owned();
    assert_eq!(c["volumeMounts"][0]["readOnly"], true);
    ensure!(model_dir.contains("/models/"), "{model_dir}");
    assert_eq!(spec["volumes"][0]["hostPath"], serde_json::json!({"path": model_dir, "type": "Directory"}));
    ensure!(c["command"].as_array().is_some_and(|a| a.iter().any(|x| x == model_dir.as_str())), "command on the weights: {c}");
    ensure!(
        c["env"].as_array().is_some_and(|e| !e.iter().any(|v| v["name"] == "CUDA_VISIBLE_DEVICES")),
        "devices come from the device plugin: {c}"
    );
    // Watched one by one, by name, in its namespace.
    ensure!(
        api.requests().iter().any(|q| q.is("watch", "pods")
            && q.path == "/api/v1/namespaces/serving/pods"
            && q.query.get("fieldSelector").is_some_and(|f| f == &format!("metadata.name={pod_name}"))),
        "a watch of the pod by name"
    );
    // Not found a second time by discovery: one runtime.
    ensure!(runtimes(&ctl, &pki).await?.iter().filter(|r| r.model_id == "llama").count() == 1);

    // An agent stop (an upgrade) leaves the pod serving; the next agent adopts it.
    agent.proc.signal("TERM")?;
    let st = agent.proc.wait_exit(Duration::from_secs(8)).await?;
    ensure!(st.is_some_and(|s| s.success()), "clean exit: {st:?}\n{}", agent.proc.log_text());
    ensure!(!api.requests().iter().any(|q| q.is("delete", "pods")), "no pod deleted on an agent stop");
    let (code, _) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/health").await?;
    assert_eq!(code, 200, "still serving");
    let mut agent = AgentProc::spawn_with(dir.path(), &pki, NODE, ctl.grpc_addr, "", &extra, &devices, &[]).await?;
    agent.proc.wait_for_log_line("adopted the model server", Duration::from_secs(15)).await?;
    runtime_where(&ctl, &pki, "llama-p ready again", |r| r.name == "llama-p" && r.state == "ready").await?;
    assert_eq!(api.requests().iter().filter(|q| q.is("create", "pods")).count(), 1, "adopted, not created again");

    // The container dies: the failed pod is deleted and a new one started.
    let first_uid = kubelet.started()[0].0.clone();
    kubelet.kill(&first_uid);
    wait_for("a second pod", Duration::from_secs(20), || async {
        Ok((api.requests().iter().filter(|q| q.is("create", "pods") && q.status == 200).count() == 2).then_some(()))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    runtime_where(&ctl, &pki, "llama-p ready on its new pod", |r| r.name == "llama-p" && r.state == "ready").await?;
    ensure!(
        api.requests().iter().any(|q| q.is("delete", "pods") && q.body["preconditions"]["uid"] == first_uid.as_str()),
        "the failed pod deleted by UID"
    );

    // StartRuntime and StopRuntime with the pod driver: a pod per command; the stop deletes
    // it with the drain deadline as grace, and the engine drains on the kubelet's SIGTERM.
    let mut op = op.clone();
    let state = op.get_node(pb::GetNodeRequest { name: NODE.into() }).await?.into_inner().state.context("state")?;
    let model_id = state.models.iter().find(|m| m.source_uri.contains("fsx/llama")).context("cached")?.id.clone();
    let send = |id: &str, kind: pb::command::Kind| send_command(&ctl, NODE, id, kind);
    send(
        "p1",
        pb::command::Kind::StartRuntime(pb::StartRuntimeCommand {
            name: "llama-cmd".into(),
            kind: "vllm".into(),
            model_id,
            partition_uuid: "1".into(),
            ..Default::default()
        }),
    )?;
    let line = agent.proc.wait_for_log_line("start_runtime command finished", Duration::from_secs(20)).await?;
    ensure!(line.contains("Succeeded"), "{line}");
    let r = runtime_where(&ctl, &pki, "llama-cmd ready", |r| r.name == "llama-cmd" && r.state == "ready").await?;
    assert_eq!(r.partition_uuid, gpus[0], "the GPU left");
    let cmd_pod = api.object_pod("serving", &format!("hearth-llama-cmd-{NODE}")).context("the command's pod")?;
    assert_eq!(cmd_pod["spec"]["containers"][0]["resources"]["limits"], serde_json::json!({"nvidia.com/gpu": "1"}));
    send("p2", pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: "llama-cmd".into() }))?;
    agent.proc.wait_for_log_line("drained and stopped", Duration::from_secs(15)).await?;
    let del = api
        .requests()
        .into_iter()
        .find(|q| q.is("delete", "pods") && q.path.ends_with(&format!("hearth-llama-cmd-{NODE}")))
        .context("the command's pod deleted")?;
    assert_eq!(del.body["gracePeriodSeconds"], 2);
    ensure!(api.object_pod("serving", &format!("hearth-llama-cmd-{NODE}")).is_none(), "the kubelet finished it");
    ensure!(api.forbidden().is_empty(), "{:?}", api.forbidden());
    drop(kubelet);
    Ok(())
}

/// The loop closed: a model the controller serves through agents (`managed_by: agent`).
/// Its scaler wants a replica (min_replicas 1): placement reserves a GPU (a lease), the
/// controller sends StartRuntime there, the agent caches the weights and starts the server on
/// that GPU, and the lease goes once the node reports it. Demand from outside (pending
/// requests at a gateway) asks for a second replica on the other GPU; when it goes, the
/// scale-down stops one of them again.
#[tokio::test]
async fn the_controller_starts_and_stops_agent_managed_replicas_from_its_scaling_decisions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("fsx/llama");
    hearth_agent::cache::sample::write_sample_model(&src, 1, 1 << 20)?;
    let models: Vec<hearth_controller::catalog::RawModel> = serde_yaml_ng::from_str(&format!(
        "- {{name: llama, source: 'file://{}', size: 1Mi, image: vllm:v1, resources: {{gpus: 1}}, managed_by: agent, args: [--load-seconds, '0.3'],\n   \
         scaling: {{min_replicas: 1, max_replicas: 4, target_concurrency: 4, stable_window: 2s, panic_window: 1s, scale_down_delay: 1s}}}}\n",
        src.display()
    ))?;
    let (_d2, pki, ctl, _guard) = setup(|raw| {
        raw.models = models;
        raw.scaling.interval = Some("300ms".into());
        raw.scaling.pending_ttl = Some("3s".into());
    })
    .await?;
    let engine = fake_engine();
    let port = free_port()?;
    let extra = format!(
        "runtimes:\n  interval: 300ms\n  engines:\n    vllm: {{port: {port}, drain_timeout: 2s, command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --model-dir, \"{{model_dir}}\", --drain-seconds, \"0.2\"]}}\n",
        engine.display()
    );
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, NODE, ctl.grpc_addr, &extra).await?;
    let ours = |r: &pb::ServingRuntime| r.model_id == "llama" && r.name.starts_with("llama-") && r.managed_by == "agent";

    // One replica, on one whole GPU, from the weights the agent cached for it.
    let first =
        runtime_where(&ctl, &pki, "a replica ready", |r| ours(r) && r.state == "ready").await.with_context(|| agent.proc.log_text())?;
    ensure!(first.partition_uuid.starts_with("GPU-"), "bound to a GPU by UUID: {first:?}");
    wait_for("the start's lease released", Duration::from_secs(10), || async {
        Ok((ctl.placement.lease_count(std::time::Instant::now()) == 0 && ctl.scaling.starting("llama").is_empty()).then_some(()))
    })
    .await?;
    let (_, metrics) = http_get(ctl.http_addr, "/metrics").await?;
    ensure!(
        metrics.contains("hearth_controller_runtime_commands_total{action=\"start\",outcome=\"reported\"} 1"),
        "{}",
        metrics.lines().filter(|l| l.contains("runtime_commands")).collect::<Vec<_>>().join("\n")
    );

    // Demand from outside asks for two: the second goes on the other GPU. The gateway keeps
    // reporting it until both serve (a one-off count ages out after pending_ttl, and under
    // load the second replica could be stopped again before it is ready).
    let both = wait_for("two replicas ready", Duration::from_secs(30), || async {
        ctl.scaling.recommend("llama", Some(6.0), std::time::Instant::now())?;
        let rs: Vec<_> = runtimes(&ctl, &pki).await?.into_iter().filter(|r| ours(r) && r.state == "ready").collect();
        Ok((rs.len() == 2).then_some(rs))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    ensure!(both[0].partition_uuid != both[1].partition_uuid, "one partition each: {both:?}");

    // The demand goes (its TTL passes): back to one, the newer (idle) one stopped.
    wait_for("one replica again", Duration::from_secs(30), || async {
        let rs: Vec<_> = runtimes(&ctl, &pki).await?.into_iter().filter(ours).collect();
        Ok((rs.len() == 1).then_some(()))
    })
    .await
    .with_context(|| agent.proc.log_text())?;
    agent.proc.wait_for_log_line("drained and stopped", Duration::from_secs(5)).await?;
    Ok(())
}

/// kill -9 of the agent mid-start and mid-drain (process driver, a runtime the controller
/// started): the next agent supervises the starting server again without starting a second
/// one, and finishes a stop that was under way (here SIGKILL at the deadline for a server
/// that ignores SIGTERM) instead of starting it again.
#[tokio::test]
async fn a_killed_agent_picks_up_mid_start_and_mid_drain() -> Result<()> {
    let (dir, pki, ctl, _guard) = setup(|_| {}).await?;
    let src = dir.path().join("fsx/llama");
    hearth_agent::cache::sample::write_sample_model(&src, 1, 1 << 20)?;
    let engine = fake_engine();
    let port = free_port()?;
    let extra = format!(
        "runtimes:\n  interval: 300ms\n  engines:\n    vllm: {{port: {port}, drain_timeout: 2s, command: [python3, \"{}\", --port, \"{{port}}\", --model, llama, --model-dir, \"{{model_dir}}\"]}}\n",
        engine.display()
    );
    let state = dir.path().join(format!("state-{NODE}"));
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, NODE, ctl.grpc_addr, &extra).await?;
    let send = |id: &str, kind: pb::command::Kind| send_command(&ctl, NODE, id, kind);
    // Started from the weights' source, loading for 3 s; the agent dies meanwhile.
    let start = pb::command::Kind::StartRuntime(pb::StartRuntimeCommand {
        name: "r1".into(),
        kind: "vllm".into(),
        model_id: "llama".into(),
        source_uri: format!("file://{}", src.display()),
        args: vec!["--load-seconds".into(), "3".into(), "--ignore-sigterm".into()],
        ..Default::default()
    });
    // Once the agent's stream is up.
    wait_for("the start sent", Duration::from_secs(15), || async { Ok(send("k1", start.clone()).ok()) }).await?;
    agent.proc.wait_for_log_line("model server started", Duration::from_secs(20)).await?;
    let pid = pid_of(&state, "r1")?;
    agent.proc.kill9()?;
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, NODE, ctl.grpc_addr, &extra).await?;
    agent.proc.wait_for_log_line("supervising again the runtime started by command", Duration::from_secs(10)).await?;
    agent.proc.wait_for_log_line("adopted the model server", Duration::from_secs(10)).await?;
    let r = runtime_where(&ctl, &pki, "r1 ready after the restart", |r| r.name == "r1" && r.state == "ready").await?;
    assert_eq!((r.model_id.as_str(), pid_of(&state, "r1")?), ("llama", pid), "the same server, not a second one");

    // Stopped; the agent dies during the drain (the server ignores SIGTERM).
    send("k2", pb::command::Kind::StopRuntime(pb::StopRuntimeCommand { name: "r1".into() }))?;
    runtime_where(&ctl, &pki, "r1 draining", |r| r.name == "r1" && r.state == "draining").await?;
    agent.proc.kill9()?;
    ensure!(running(pid), "a server that ignores SIGTERM outlives the agent that was draining it");
    let mut agent = AgentProc::start_with_cache_models(dir.path(), &pki, NODE, ctl.grpc_addr, &extra).await?;
    agent.proc.wait_for_log_line("finishing the stop of a model server", Duration::from_secs(10)).await?;
    wait_for("the stubborn server killed at its deadline", Duration::from_secs(10), || async { Ok((!running(pid)).then_some(())) }).await?;
    wait_for("r1 gone from the report", Duration::from_secs(10), || async {
        Ok((!runtimes(&ctl, &pki).await?.iter().any(|r| r.name == "r1")).then_some(()))
    })
    .await?;
    // (The log holds every agent's lines: one start in all.)
    ensure!(agent.proc.log_text().matches("model server started runtime=r1").count() == 1, "started once: {}", agent.proc.log_text());
    wait_for("nothing left of it", Duration::from_secs(5), || async { Ok((!state.join("runtimes/r1").exists()).then_some(())) }).await?;
    Ok(())
}
