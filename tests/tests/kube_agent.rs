//! The agent's Kubernetes side through kube-rs, against the API-shaped test server: the pod
//! watcher (one LIST, then a watch; 410 Gone re-lists; a server that goes away), node
//! labels by server-side apply, the health condition and taint (409 retried), Events as
//! series, RBAC limited to `hearth_agent::kube::API_RULES`, and the agent process wired to
//! all of it through a kubeconfig.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hearth_agent::device::{Accelerator, Health, Vendor};
use hearth_agent::kube::events::{NodeEvent, NodeEvents};
use hearth_agent::kube::health::{CONDITION, HealthSettings, TAINT_KEY};
use hearth_agent::netobs::pods::{PodDirectory, PodTable};
use hearth_agent::report::NodeReport;
use hearth_service::kube::KubeSource;
use hearth_tests::apiserver::ApiServer;
use hearth_tests::{Proc, bin, wait_for};
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const NODE: &str = "gpu-node-1";

async fn server_and_client(dir: &std::path::Path) -> Result<(ApiServer, kube::Client)> {
    let s = ApiServer::start(&[hearth_agent::kube::API_RULES]).await?;
    s.add_node(NODE);
    let client = hearth_service::kube::client(&KubeSource::Kubeconfig(s.kubeconfig(dir)?)).await?;
    Ok((s, client))
}

fn count(s: &ApiServer, verb: &str, resource: &str) -> usize {
    s.requests().iter().filter(|r| r.is(verb, resource)).count()
}

#[tokio::test]
async fn pods_come_from_one_list_and_a_watch_on_this_node_and_deleted_pods_keep_their_names() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, client) = server_and_client(dir.path()).await?;
    let mine = s.add_pod("serving", "vllm-0", NODE);
    let other = s.add_pod("serving", "vllm-1", "gpu-node-2");
    let table = PodTable::with_retention(Duration::from_secs(60));
    let stop = CancellationToken::new();
    let events = Family::default();
    let task = tokio::spawn(hearth_agent::kube::watch_pods(client, NODE.into(), table.clone(), None, events, stop.clone()));
    let t = table.clone();
    wait_for("the first pod", Duration::from_secs(10), || {
        let t = t.clone();
        let mine = mine.clone();
        async move { Ok(t.lookup(&mine)) }
    })
    .await?;
    assert_eq!(table.lookup(&other), None, "a pod of another node");
    // The LIST and the watch both select this node's pods.
    let reqs = s.requests();
    let list = reqs.iter().find(|r| r.is("list", "pods")).context("no LIST")?;
    assert_eq!(list.query.get("fieldSelector").map(String::as_str), Some("spec.nodeName=gpu-node-1"));
    assert_eq!(list.query.get("resourceVersion").map(String::as_str), Some("0"), "served from the watch cache");
    let w = reqs.iter().find(|r| r.is("watch", "pods")).context("no watch")?;
    assert_eq!(w.query.get("fieldSelector").map(String::as_str), Some("spec.nodeName=gpu-node-1"));

    // A new pod arrives through the watch, with no new LIST.
    let late = s.add_pod("serving", "vllm-2", NODE);
    let t = table.clone();
    wait_for("the pod added later", Duration::from_secs(10), || {
        let (t, late) = (t.clone(), late.clone());
        async move { Ok(t.lookup(&late)) }
    })
    .await?;
    assert_eq!(count(&s, "list", "pods"), 1);
    // A deleted pod keeps its name (its series are still exported) but is no longer live.
    s.delete_pod(&mine);
    let t = table.clone();
    wait_for("the delete", Duration::from_secs(10), || {
        let t = t.clone();
        async move { Ok((t.live() == 1).then_some(())) }
    })
    .await?;
    assert_eq!(table.lookup(&mine).map(|p| p.name), Some("vllm-0".into()));

    // History compacted: the watch gets 410 Gone and the watcher re-lists.
    s.compact();
    let s2 = &s;
    wait_for("a re-list after 410 Gone", Duration::from_secs(15), || async move { Ok((count(s2, "list", "pods") == 2).then_some(())) })
        .await?;

    // The server goes away and comes back: the watcher resumes by itself.
    s.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = s.add_pod("serving", "vllm-3", NODE);
    s.restart().await?;
    let t = table.clone();
    wait_for("a pod added while the server was away", Duration::from_secs(30), || {
        let (t, during) = (t.clone(), during.clone());
        async move { Ok(t.lookup(&during)) }
    })
    .await?;
    assert!(s.forbidden().is_empty(), "calls outside API_RULES: {:?}", s.forbidden());
    stop.cancel();
    task.await?;
    Ok(())
}

/// API load: at steady state the agent holds one watch and makes no LISTs. Watches here are
/// ended by the server every second (kube-rs asks for 290 s; real API servers end them on
/// their own schedule too), so re-established watches are the only requests.
#[tokio::test]
async fn steady_state_is_one_watch_and_zero_lists() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, client) = server_and_client(dir.path()).await?;
    for i in 0..20 {
        s.add_pod("serving", &format!("p{i}"), NODE);
    }
    s.cap_watches(Duration::from_secs(1));
    let table = PodTable::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(hearth_agent::kube::watch_pods(client, NODE.into(), table.clone(), None, Family::default(), stop.clone()));
    let t = table.clone();
    wait_for("the initial list", Duration::from_secs(10), || {
        let t = t.clone();
        async move { Ok((t.live() == 20).then_some(())) }
    })
    .await?;
    let start = Instant::now();
    let before = s.requests().len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let window: Vec<_> = s.requests().into_iter().skip(before).collect();
    let secs = start.elapsed().as_secs_f64();
    let lists = window.iter().filter(|r| r.is("list", "pods")).count();
    let watches = window.iter().filter(|r| r.is("watch", "pods")).count();
    let other = window.len() - lists - watches;
    println!(
        "steady state over {secs:.1} s: {lists} LISTs, {watches} watches ({:.1}/min with watches ended every 1 s; with kube-rs's 290 s watch timeout that is {:.2}/min), {other} other requests",
        watches as f64 * 60.0 / secs,
        60.0 / 290.0
    );
    assert_eq!(lists, 0, "no LIST at steady state");
    assert_eq!(other, 0, "nothing but the watch");
    ensure!((3..=8).contains(&watches), "one watch re-established per server timeout, got {watches}");
    stop.cancel();
    task.await?;
    Ok(())
}

#[tokio::test]
async fn node_labels_are_applied_as_hearths_set_and_removed_when_no_longer_meant() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, client) = server_and_client(dir.path()).await?;
    let wanted: BTreeMap<String, String> =
        [("hearth.dev/mig.config".into(), "balanced".into()), ("hearth.dev/mig.config.state".into(), "success".into())].into();
    let (tx, rx) = tokio::sync::watch::channel(wanted);
    // The first two tries fail as a busy server would; the loop retries.
    s.inject("patch", "nodes", 500, 2);
    let results = Family::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(hearth_agent::kube::label_loop(client, NODE.into(), rx, results.clone(), stop.clone()));
    let labels = |s: &ApiServer| s.node(NODE).map(|n| n["metadata"]["labels"].clone()).unwrap_or(Value::Null);
    let s2 = &s;
    wait_for("the labels", Duration::from_secs(15), || async move {
        Ok((labels(s2)["hearth.dev/mig.config.state"] == "success").then_some(()))
    })
    .await?;
    assert_eq!(labels(&s)["kubernetes.io/hostname"], NODE, "another manager's label stays");
    let apply = s.requests().into_iter().rfind(|r| r.is("patch", "nodes") && r.status == 200).context("no apply")?;
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(apply.query.get("fieldManager").map(String::as_str), Some("hearth-agent"));
    assert_eq!(apply.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(results.get_or_create(&[("result", "error")]).get(), 2);

    // The partition config goes away: Hearth's labels go with it, nothing else does.
    tx.send_replace(BTreeMap::new());
    wait_for(
        "labels removed",
        Duration::from_secs(10),
        || async move { Ok(labels(s2).get("hearth.dev/mig.config").is_none().then_some(())) },
    )
    .await?;
    assert!(labels(&s).get("hearth.dev/mig.config.state").is_none());
    assert_eq!(labels(&s)["kubernetes.io/hostname"], NODE);

    // A refusal retrying cannot fix (403) is not retried: the loop waits for the next set.
    s.inject("patch", "nodes", 403, 1);
    tx.send_replace([("hearth.dev/mig.config".into(), "all-1g.10gb".into())].into());
    let r2 = results.clone();
    wait_for("the refusal", Duration::from_secs(10), || {
        let r2 = r2.clone();
        async move { Ok((r2.get_or_create(&[("result", "refused")]).get() == 1).then_some(())) }
    })
    .await?;
    let patches = count(&s, "patch", "nodes");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&s, "patch", "nodes"), patches, "a 403 is not retried");
    tx.send_replace([("hearth.dev/mig.config".into(), "all-1g.10gb".into()), ("x".into(), "y".into())].into());
    wait_for("the next set", Duration::from_secs(10), || async move { Ok((labels(s2)["x"] == "y").then_some(())) }).await?;
    assert!(s.forbidden().is_empty(), "{:?}", s.forbidden());
    stop.cancel();
    task.await?;
    Ok(())
}

fn gpu(index: u32, health: Health, reason: &str) -> Accelerator {
    Accelerator {
        index,
        uuid: format!("GPU-{index:08}"),
        vendor: Vendor::Nvidia,
        product: "NVIDIA H100 80GB HBM3".into(),
        memory_bytes: 80 << 30,
        pci_bus_id: format!("0000:{index:02x}:00.0"),
        pci_device_id: 0x2330_10DE,
        core_count: 0,
        simulated: true,
        health,
        health_reason: reason.into(),
        gpu: None,
        core_groups: Vec::new(),
    }
}

fn condition(s: &ApiServer) -> Option<Value> {
    s.node(NODE)?["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == CONDITION).cloned()
}

fn our_taint(s: &ApiServer) -> Option<Value> {
    s.node(NODE)?["spec"]["taints"].as_array()?.iter().find(|t| t["key"] == TAINT_KEY).cloned()
}

#[tokio::test]
async fn a_fatal_gpu_fault_sets_the_condition_false_taints_and_posts_events_and_recovery_clears_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, client) = server_and_client(dir.path()).await?;
    let healthy = NodeReport { accelerators: vec![gpu(0, Health::Healthy, ""), gpu(1, Health::Healthy, "")], ..Default::default() };
    let (tx, rx) = tokio::sync::watch::channel(healthy.clone());
    let (events, queue) = NodeEvents::channel();
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(hearth_agent::kube::events::publish(client.clone(), NODE.into(), queue, Family::default(), stop.clone()));
    let settings = HealthSettings { condition: true, taint: true };
    let health = tokio::spawn(hearth_agent::kube::health::health_loop(
        client,
        NODE.into(),
        settings,
        rx,
        events.clone(),
        Family::default(),
        stop.clone(),
    ));
    let s2 = &s;
    wait_for("the condition", Duration::from_secs(10), || async move { Ok(condition(s2)) }).await?;
    let c = condition(&s).context("condition")?;
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("True"), Some("AcceleratorsHealthy")));
    assert!(our_taint(&s).is_none());
    let status_apply = s.requests().into_iter().find(|r| r.is("patch", "nodes/status")).context("no status apply")?;
    assert_eq!(status_apply.content_type, "application/apply-patch+yaml");
    assert_eq!(status_apply.query.get("fieldManager").map(String::as_str), Some("hearth-agent"));

    // XID 79 on GPU 1; the taint write meets a concurrent change first (409) and is redone.
    s.inject("patch", "nodes", 409, 1);
    let mut bad = healthy.clone();
    bad.accelerators[1] = gpu(1, Health::Unhealthy, "NvidiaXID79Error: XID 79: GPU has fallen off the bus");
    tx.send_replace(bad);
    wait_for("the taint", Duration::from_secs(15), || async move { Ok(our_taint(s2)) }).await?;
    let c = condition(&s).context("condition")?;
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("NvidiaXID79Error")));
    assert!(c["message"].as_str().unwrap_or("").contains("GPU 1 (GPU-00000001): NvidiaXID79Error"), "{c}");
    let taint = our_taint(&s).context("taint")?;
    assert_eq!((taint["effect"].as_str(), taint["value"].as_str()), (Some("NoSchedule"), Some("NvidiaXID79Error")));
    let taints = s.node(NODE).context("node")?["spec"]["taints"].clone();
    assert!(taints.as_array().is_some_and(|t| t.iter().any(|t| t["key"] == "nvidia.com/gpu")), "other taints kept: {taints}");
    let guarded = s.requests().into_iter().rfind(|r| r.is("patch", "nodes") && r.status == 200).context("taint patch")?;
    assert_eq!(guarded.content_type, "application/merge-patch+json");
    assert!(guarded.body["metadata"]["resourceVersion"].is_string(), "the taint patch is guarded: {}", guarded.body);

    // A warning-class XID on GPU 0 only posts an Event; the condition keeps GPU 1's reason.
    let mut warn = healthy.clone();
    warn.accelerators[0] = gpu(0, Health::Degraded, "NvidiaXID13Error: XID 13: Graphics Engine Exception");
    warn.accelerators[1] = gpu(1, Health::Unhealthy, "NvidiaXID79Error: XID 79: GPU has fallen off the bus");
    tx.send_replace(warn);
    wait_for("the events", Duration::from_secs(10), || async move {
        let reasons: Vec<String> =
            s2.objects("events.k8s.io/events").iter().filter_map(|e| e["reason"].as_str().map(str::to_owned)).collect();
        Ok((reasons.contains(&"AcceleratorUnhealthy".to_owned()) && reasons.contains(&"AcceleratorDegraded".to_owned())).then_some(()))
    })
    .await?;
    let ev = s.objects("events.k8s.io/events").into_iter().find(|e| e["reason"] == "AcceleratorUnhealthy").context("event")?;
    assert_eq!(
        (ev["type"].as_str(), ev["regarding"]["kind"].as_str(), ev["regarding"]["name"].as_str()),
        (Some("Warning"), Some("Node"), Some(NODE))
    );
    assert_eq!(ev["reportingController"], "hearth.dev/agent");

    // After a reset (the agent restarts with a clean XID memory) all is healthy again.
    tx.send_replace(healthy);
    wait_for("the taint removed", Duration::from_secs(10), || async move { Ok(our_taint(s2).is_none().then_some(())) }).await?;
    let c = condition(&s).context("condition")?;
    assert_eq!(c["status"], "True");
    assert!(s.forbidden().is_empty(), "{:?}", s.forbidden());
    stop.cancel();
    health.await?;
    publisher.await?;
    Ok(())
}

#[tokio::test]
async fn a_repeated_event_becomes_a_series_not_a_new_object_and_a_forbidden_one_names_the_verb() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, client) = server_and_client(dir.path()).await?;
    let (events, queue) = NodeEvents::channel();
    let stop = CancellationToken::new();
    let results = Family::default();
    let task = tokio::spawn(hearth_agent::kube::events::publish(client, NODE.into(), queue, results.clone(), stop.clone()));
    for _ in 0..3 {
        events.post(NodeEvent::warning("ModelCacheFailed", "Download", "s3://models/x/: access denied"));
    }
    let s2 = &s;
    wait_for("three publishes", Duration::from_secs(10), || async move {
        Ok((count(s2, "create", "events") + count(s2, "patch", "events") == 3).then_some(()))
    })
    .await?;
    assert_eq!(count(&s, "create", "events"), 1, "one object");
    let all = s.objects("events.k8s.io/events");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["series"]["count"], 3, "{}", all[0]);
    // Without the create verb the error names it (logged; counted as an error).
    s.inject("create", "events", 403, 1);
    events.post(NodeEvent::normal("PartitionApplied", "ApplyPartition", "MIG config \"balanced\" applied"));
    let r = results.clone();
    wait_for("the refusal counted", Duration::from_secs(10), || {
        let r = r.clone();
        async move { Ok((r.get_or_create(&[("result", "error")]).get() == 1).then_some(())) }
    })
    .await?;
    stop.cancel();
    task.await?;
    let forbidden = hearth_service::kube::api_error(
        "post event",
        "create",
        "events.k8s.io events",
        "agent's ClusterRole",
        kube::Error::Api(Box::new(kube::core::Status::failure("events is forbidden", "Forbidden").with_code(403))),
    );
    assert!(forbidden.to_string().contains("must allow create on events.k8s.io events"), "{forbidden}");
    Ok(())
}

/// The agent process, configured by kubeconfig: labels its node with the partition state,
/// keeps the health condition, posts the partition Event, and makes only calls its
/// ClusterRole allows.
#[tokio::test]
async fn the_agent_process_labels_its_node_and_keeps_the_condition_through_a_kubeconfig() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = ApiServer::start(&[hearth_agent::kube::API_RULES]).await?;
    s.add_node(NODE);
    let kubeconfig = s.kubeconfig(dir.path())?;
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/mig-spec.yaml");
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: {NODE}\nhttp_listen: 127.0.0.1:0\nstate_dir: {state}\ndevices: {{backend: simulated, simulated: [2xH100-80GB], collect_interval: 200ms}}\npartition: {{spec: {spec}, config: balanced}}\ncache: {{root: {cache}}}\nnetwork: {{enabled: false}}\nkubernetes: {{kubeconfig: {kc}}}\n",
            state = dir.path().join("state").display(),
            spec = spec.display(),
            cache = dir.path().join("cache").display(),
            kc = kubeconfig.display(),
        ),
    )?;
    let mut agent = Proc::spawn("agent", std::process::Command::new(bin("hearth")).arg("agent").arg("--config").arg(&cfg), dir.path())?;
    agent.wait_for_log_line("subsystem started subsystem=\"kube\"", Duration::from_secs(30)).await.or_else(|_| {
        // Text logs quote differently by version of the formatter; accept either.
        let text = agent.own_log_text();
        if text.contains("subsystem=kube") || text.contains("\"kube\"") { Ok(String::new()) } else { bail!("{text}") }
    })?;
    let s2 = &s;
    wait_for("partition labels on the node", Duration::from_secs(30), || async move {
        let n = s2.node(NODE).context("node")?;
        Ok((n["metadata"]["labels"]["hearth.dev/mig.config.state"] == "success").then_some(()))
    })
    .await
    .with_context(|| agent.own_log_text())?;
    let n = s.node(NODE).context("node")?;
    assert_eq!(n["metadata"]["labels"]["hearth.dev/mig.config"], "balanced");
    wait_for("the health condition", Duration::from_secs(15), || async move { Ok(condition(s2)) }).await?;
    assert_eq!(condition(&s).context("condition")?["status"], "True");
    wait_for("the partition event", Duration::from_secs(15), || async move {
        Ok(s2.objects("events.k8s.io/events").into_iter().find(|e| e["reason"] == "PartitionApplied"))
    })
    .await?;
    // The pod watcher runs too: a LIST with the node's field selector, then a watch.
    wait_for("the pod watch", Duration::from_secs(15), || async move { Ok((count(s2, "watch", "pods") >= 1).then_some(())) }).await?;
    assert!(s.forbidden().is_empty(), "calls outside API_RULES: {:?}", s.forbidden());
    agent.signal("TERM")?;
    ensure!(agent.wait_exit(Duration::from_secs(15)).await?.is_some_and(|st| st.success()), "clean exit:\n{}", agent.own_log_text());
    Ok(())
}

/// A partition config whose name the API server would refuse as a label value is refused
/// at start with the reason, instead of failing every label write forever.
#[tokio::test]
async fn a_partition_config_name_that_is_not_a_label_value_fails_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, "version: v1\nmig-configs:\n  \"all disabled!\":\n    - devices: all\n      mig-enabled: false\n")?;
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node_name: {NODE}\ndevices: {{backend: simulated, simulated: [1xH100-80GB]}}\npartition: {{spec: {}, config: \"all disabled!\"}}\n",
            spec.display()
        ),
    )?;
    let out = std::process::Command::new(bin("hearth")).arg("agent").arg("--config").arg(&cfg).output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success(), "must not start: {err}");
    ensure!(err.contains("partition.config: expected a Kubernetes label value"), "{err}");
    Ok(())
}
