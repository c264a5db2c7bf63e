//! Controller leader election against the API-shaped test server: one leader among
//! candidates, Lease fields as client-go writes them, take-over after a crash within the
//! Lease duration plus a retry, a new term (and so higher decision ids) per acquisition, a
//! 409 on a concurrent write, the leader label on the pods, and a leader that cannot renew
//! stepping down before anyone may take over.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hearth_controller::leader::{self, Leadership, Settings};
use hearth_service::kube::KubeSource;
use hearth_tests::apiserver::ApiServer;
use hearth_tests::wait_for;
use tokio_util::sync::CancellationToken;

const NS: &str = "hearth";
const LEASE: &str = "coordination.k8s.io/leases";

fn settings(kc: &std::path::Path, id: &str) -> Settings {
    Settings {
        source: KubeSource::Kubeconfig(kc.to_owned()),
        namespace: NS.into(),
        lease_name: "hearth-controller".into(),
        identity: id.into(),
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(250),
        pod: Some(id.into()),
    }
}

struct Candidate {
    view: Leadership,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

async fn candidate(s: &ApiServer, kc: &std::path::Path, id: &str) -> Result<Candidate> {
    s.add_namespaced_pod(NS, id);
    let client = hearth_service::kube::client(&KubeSource::Kubeconfig(kc.to_owned())).await?;
    let (tx, view) = Leadership::channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(leader::run(client, settings(kc, id), tx, leader::Metrics::default(), stop.clone()));
    Ok(Candidate { view, task, stop })
}

fn leader_label(s: &ApiServer, pod: &str) -> Option<String> {
    s.object("/pods", NS, pod)?["metadata"]["labels"]["hearth.dev/leader"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn one_leader_takes_over_after_a_crash_with_a_new_term_and_labels_follow() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = ApiServer::start(&[leader::API_RULES]).await?;
    let kc = s.kubeconfig(dir.path())?;
    let a = candidate(&s, &kc, "ctl-a").await?;
    wait_for("a leads", Duration::from_secs(10), || async { Ok(a.view.is_leader().then_some(())) }).await?;
    let b = candidate(&s, &kc, "ctl-b").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(a.view.is_leader() && !b.view.is_leader(), "exactly one leader while a renews");
    let lease = s.object(LEASE, NS, "hearth-controller").context("lease")?;
    assert_eq!(lease["spec"]["holderIdentity"], "ctl-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2);
    let term_a = a.view.now().term;
    assert_eq!(term_a, 0, "the creator's term");
    assert_eq!((leader_label(&s, "ctl-a").as_deref(), leader_label(&s, "ctl-b").as_deref()), (Some("true"), Some("false")));
    // Every write of the Lease is guarded: a concurrent change (409) only delays a renewal.
    s.inject("update", "leases", 409, 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    ensure!(a.view.is_leader() && !b.view.is_leader(), "a 409 on one renewal changes nothing");

    // a crashes: no release, the Lease just stops being renewed.
    a.task.abort();
    let crashed = Instant::now();
    wait_for("b takes over", Duration::from_secs(10), || async { Ok(b.view.is_leader().then_some(())) }).await?;
    let gap = crashed.elapsed();
    println!("take-over after a crash: {:.2} s (lease 2 s, retry 0.25 s)", gap.as_secs_f64());
    ensure!(gap <= Duration::from_millis(2000 + 250 * 2 + 500), "within the lease duration plus a retry: {gap:?}");
    let term_b = b.view.now().term;
    ensure!(term_b > term_a, "a new term: {term_b} after {term_a}");
    let lease = s.object(LEASE, NS, "hearth-controller").context("lease")?;
    assert_eq!((lease["spec"]["holderIdentity"].as_str(), lease["spec"]["leaseTransitions"].as_i64()), (Some("ctl-b"), Some(1)));
    wait_for("b labelled leader", Duration::from_secs(5), || async {
        Ok((leader_label(&s, "ctl-b").as_deref() == Some("true")).then_some(()))
    })
    .await?;

    // A clean stop releases the Lease: a restarted a (same identity) takes it at once, in a
    // new term.
    b.stop.cancel();
    b.task.await?;
    assert!(!b.view.is_leader());
    assert_eq!(s.object(LEASE, NS, "hearth-controller").context("lease")?["spec"]["holderIdentity"], serde_json::Value::Null);
    assert_eq!(leader_label(&s, "ctl-b").as_deref(), Some("false"));
    let a2 = candidate(&s, &kc, "ctl-a").await?;
    let t0 = Instant::now();
    wait_for("a leads again", Duration::from_secs(5), || async { Ok(a2.view.is_leader().then_some(())) }).await?;
    ensure!(t0.elapsed() < Duration::from_secs(1), "a released Lease is taken at once: {:?}", t0.elapsed());
    ensure!(a2.view.now().term > term_b, "the same identity after a restart starts a new term");
    assert!(s.forbidden().is_empty(), "{:?}", s.forbidden());
    a2.stop.cancel();
    a2.task.await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_acting_before_the_lease_can_be_taken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = ApiServer::start(&[leader::API_RULES]).await?;
    let kc = s.kubeconfig(dir.path())?;
    let a = candidate(&s, &kc, "ctl-a").await?;
    wait_for("a leads", Duration::from_secs(10), || async { Ok(a.view.is_leader().then_some(())) }).await?;
    // The API server goes away (a partition between the leader and the control plane).
    s.stop();
    let cut = Instant::now();
    wait_for("a steps down", Duration::from_secs(10), || async { Ok((!a.view.is_leader()).then_some(())) }).await?;
    let after = cut.elapsed();
    println!("stepped down {:.2} s after losing the API server (renew deadline 1.5 s, lease 2 s)", after.as_secs_f64());
    ensure!(after < Duration::from_secs(2), "before the Lease duration, when a standby could take over: {after:?}");
    s.restart().await?;
    wait_for("a leads again", Duration::from_secs(10), || async { Ok(a.view.is_leader().then_some(())) }).await?;
    a.stop.cancel();
    a.task.await?;
    Ok(())
}

#[tokio::test]
async fn without_the_lease_verbs_the_error_names_the_missing_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Rules without "create" on leases.
    let s = ApiServer::start(&[&[("coordination.k8s.io", "leases", &["get", "update"]), ("", "pods", &["patch"])]]).await?;
    let kc = s.kubeconfig(dir.path())?;
    let a = candidate(&s, &kc, "ctl-a").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!a.view.is_leader());
    let f = s.forbidden();
    assert!(f.iter().any(|x| x.starts_with("create coordination.k8s.io/leases")), "{f:?}");
    a.stop.cancel();
    a.task.await?;
    Ok(())
}
