//! Controller failover with real processes: two `hearth-controller run` replicas elect a
//! leader through a Lease on the API test server; a stand-in for the Service forwards each
//! new connection to the pod labelled `hearth.dev/leader=true` (as the chart's Service
//! selects it); an agent reports through it and an autoscaler asks for recommendations in
//! a burst. The leader is killed with SIGKILL mid-burst: the standby takes over, the agent
//! reconnects, decision ids are never reused, and the gaps are printed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_proto::v1 as pb;
use hearth_tests::apiserver::ApiServer;
use hearth_tests::{AgentProc, ControllerProc, TestPki, channel, http_get, wait_for};

const NS: &str = "hearth";
const MODELS: &str = "models:
- {name: llama, source: s3://models/llama, revision: main, size: 16Gi, image: vllm:v1, resources: {gpus: 1},
   scaling: {min_replicas: 0, max_replicas: 64, target_concurrency: 1}}
scaling: {interval: 200ms}
";

/// The Service: each connection goes to a pod labelled leader that accepts it. A killed
/// pod still carries the label until its container restarts (and labels itself a standby),
/// but it is not ready, so it is no endpoint: here, it refuses the connection.
async fn leader_service(api: Arc<ApiServer>, backends: Arc<Mutex<Vec<(String, SocketAddr)>>>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            let targets: Vec<SocketAddr> = {
                let b = backends.lock().unwrap_or_else(|p| p.into_inner());
                b.iter()
                    .filter(|(pod, _)| api.object("/pods", NS, pod).is_some_and(|p| p["metadata"]["labels"]["hearth.dev/leader"] == "true"))
                    .map(|(_, a)| *a)
                    .collect()
            };
            // No endpoint: the connection is dropped, as with a Service without endpoints.
            tokio::spawn(async move {
                for t in targets {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(t).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One `Recommend` through the Service: when it ended, and the last decision id or the code.
type Call = (Instant, Result<u64, tonic::Code>);

fn decision_ids(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("scaling decision"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("id=")).and_then(|v| v.parse().ok()))
        .collect()
}

async fn connected(ctl: &ControllerProc) -> bool {
    http_get(ctl.http, "/metrics").await.is_ok_and(|(_, body)| body.lines().any(|l| l == "hearth_controller_connected_agents 1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_burst_hands_over_to_the_standby_without_reusing_decision_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let api = Arc::new(ApiServer::start(&[hearth_controller::leader::API_RULES]).await?);
    let kc = api.kubeconfig(dir.path())?;
    let mut ctls = Vec::new();
    for id in ["ctl-a", "ctl-b"] {
        api.add_namespaced_pod(NS, id);
        let d = dir.path().join(id);
        std::fs::create_dir_all(&d)?;
        let yaml = format!(
            "{MODELS}kubernetes: {{kubeconfig: {}}}\nleader_election: {{enabled: true, lease_duration: 3s, renew_deadline: 2s, retry_period: 500ms}}\n",
            kc.display()
        );
        ctls.push(ControllerProc::start_with_env(&d, &pki, &yaml, &[("POD_NAME", id), ("POD_NAMESPACE", NS)]).await?);
    }
    let backends = Arc::new(Mutex::new(vec![("ctl-a".to_owned(), ctls[0].grpc), ("ctl-b".to_owned(), ctls[1].grpc)]));
    let svc = leader_service(api.clone(), backends).await?;
    // The leader as the Lease names it, once its pod carries the label too.
    let leader_pod = || -> Option<usize> {
        let lease = api.object("coordination.k8s.io/leases", NS, "hearth-controller")?;
        let holder = lease["spec"]["holderIdentity"].as_str()?.to_owned();
        let labelled = api.object("/pods", NS, &holder)?["metadata"]["labels"]["hearth.dev/leader"] == "true";
        ["ctl-a", "ctl-b"].iter().position(|p| *p == holder).filter(|_| labelled)
    };
    let first = wait_for("a leader", Duration::from_secs(15), || async { Ok(leader_pod()) }).await?;
    let agent = AgentProc::start(dir.path(), &pki, "fo-1", svc, "").await?;
    wait_for("the agent on the leader", Duration::from_secs(20), || async { Ok(connected(&ctls[first]).await.then_some(())) }).await?;
    ensure!(!connected(&ctls[1 - first]).await, "the standby serves no agent");

    // The burst: recommendations with rising demand through the Service, every 50 ms.
    let tls = pki.client_material("hearth-autoscaler")?;
    let results: Arc<Mutex<Vec<Call>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let burst = {
        let (results, stop) = (results.clone(), stop.clone());
        tokio::spawn(async move {
            let mut pending = 0.0;
            while !stop.is_cancelled() {
                pending += 1.0;
                let r = async {
                    let ch = channel(svc, Some(&tls)).await.map_err(|_| tonic::Code::Unavailable)?;
                    let rec = pb::scaling_client::ScalingClient::new(ch)
                        .recommend(pb::RecommendRequest { model: "llama".into(), pending_requests: Some(pending) })
                        .await
                        .map_err(|s| s.code())?
                        .into_inner();
                    Ok(rec.last_decision.map(|d| d.id).unwrap_or(0))
                }
                .await;
                results.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), r));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = decision_ids(&ctls[first].proc.own_log_text());
    ensure!(before.len() >= 3, "the leader decided during the burst: {before:?}");

    ctls[first].proc.kill9()?;
    let killed = Instant::now();
    let standby = 1 - first;
    wait_for("the standby leads", Duration::from_secs(15), || async { Ok((leader_pod() == Some(standby)).then_some(())) }).await?;
    let leader_after = killed.elapsed();
    wait_for("the agent on the new leader", Duration::from_secs(20), || async { Ok(connected(&ctls[standby]).await.then_some(())) })
        .await?;
    let agent_after = killed.elapsed();
    let api_after = wait_for("a recommendation from the new leader", Duration::from_secs(20), || async {
        let r = results.lock().unwrap_or_else(|p| p.into_inner());
        Ok(r.iter().find(|(t, res)| *t > killed && res.is_ok()).map(|(t, _)| t.duration_since(killed)))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    burst.await?;

    let after = decision_ids(&ctls[standby].proc.own_log_text());
    ensure!(!after.is_empty(), "the new leader decided");
    let mut all: Vec<u64> = before.iter().chain(&after).copied().collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    ensure!(all.len() == n, "no decision id is used twice: before {before:?}, after {after:?}");
    ensure!(after.iter().min() > before.iter().max(), "the new leader's ids are above the old one's: {before:?} then {after:?}");
    // Every decision the clients saw carries an id from one of the two leaders' logs.
    let seen: Vec<u64> =
        results.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(|(_, r)| r.as_ref().ok().copied()).filter(|i| *i > 0).collect();
    ensure!(seen.iter().all(|i| before.contains(i) || after.contains(i)), "ids seen by clients came from the logs");
    let refused = results.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|(t, r)| *t > killed && r.is_err()).count();
    println!(
        "failover (lease 3 s, renew deadline 2 s, retry 0.5 s): new leader {:.2} s after SIGKILL, first answer through the Service {:.2} s, agent reconnected {:.2} s; {refused} calls refused meanwhile; decision ids {}..={} then {}..={}",
        leader_after.as_secs_f64(),
        api_after.as_secs_f64(),
        agent_after.as_secs_f64(),
        before.iter().min().context("ids")?,
        before.iter().max().context("ids")?,
        after.iter().min().context("ids")?,
        after.iter().max().context("ids")?,
    );
    ensure!(
        leader_after < Duration::from_secs(3) + Duration::from_millis(1500),
        "within the lease duration plus a retry or two: {leader_after:?}"
    );
    assert!(api.forbidden().is_empty(), "{:?}", api.forbidden());
    drop(agent);
    Ok(())
}
