//! This node's pods, from one watcher on `spec.nodeName`: the initial LIST (served from the
//! API server's watch cache), then a watch resumed from the last resourceVersion. A watch
//! that expires (410 Gone) re-lists; errors back off (kube-runtime's default backoff). At
//! steady state the agent holds one watch and makes no LISTs.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::PodRef;
use crate::netobs::pods::PodTable;
use crate::runtime::discover::{ServingPod, serving_pod};

/// Counts by watch event kind: `init`, `apply`, `delete`, `error`.
pub type WatchEvents = Family<[(&'static str, &'static str); 1], Counter>;

fn pod_ref(p: &Pod) -> Option<(String, PodRef)> {
    let m = &p.metadata;
    Some((m.uid.clone()?, PodRef { namespace: m.namespace.clone().unwrap_or_default(), name: m.name.clone()? }))
}

/// Where the watch publishes model-server pods: the label that marks them, and the channel.
#[derive(Debug, Clone)]
pub struct ServingSink {
    pub label: String,
    pub pods: tokio::sync::watch::Sender<std::collections::BTreeMap<String, ServingPod>>,
}

impl ServingSink {
    fn apply(&self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else { return };
        let next = serving_pod(pod, &self.label);
        self.pods.send_if_modified(|m| match next {
            Some(p) if m.get(&uid) != Some(&p) => {
                m.insert(uid, p);
                true
            }
            Some(_) => false,
            None => m.remove(&uid).is_some(),
        });
    }
    fn remove(&self, uid: &str) {
        self.pods.send_if_modified(|m| m.remove(uid).is_some());
    }
    fn replace(&self, pods: &[Pod]) {
        let next: std::collections::BTreeMap<String, ServingPod> =
            pods.iter().filter_map(|p| serving_pod(p, &self.label).map(|s| (s.uid.clone(), s))).collect();
        self.pods.send_if_modified(|m| {
            let changed = *m != next;
            *m = next;
            changed
        });
    }
}

/// Keeps `names` equal to the pods bound to `node` until `shutdown`, and `serving` equal to
/// the model-server pods among them. Deleted pods stay named for the table's retention time
/// (their last series are still exported).
pub async fn watch_pods(
    client: kube::Client,
    node: String,
    names: PodTable,
    serving: Option<ServingSink>,
    events: WatchEvents,
    shutdown: CancellationToken,
) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let mut cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}")).any_semantic();
    // One node's pods fit one page; without a limit the API server answers resourceVersion=0
    // from its watch cache instead of a quorum read from etcd (a limit would force one).
    cfg.page_size = None;
    let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
    // Pods seen during a (re-)list; the table is replaced when it completes, so pods deleted
    // while the watch was down are noticed.
    let mut listing: Option<(HashMap<String, PodRef>, Vec<Pod>)> = None;
    let mut failing = false;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = stream.next() => n,
        };
        let Some(ev) = next else { return };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                events.get_or_create(&[("event", "error")]).inc();
                if !failing {
                    warn!(error = %describe(&e), "watching this node's pods failed; retrying with backoff, per-pod series keep the names they had");
                }
                failing = true;
                continue;
            }
        };
        match ev {
            watcher::Event::Init => {
                events.get_or_create(&[("event", "init")]).inc();
                listing = Some((HashMap::new(), Vec::new()));
            }
            watcher::Event::InitApply(p) => {
                if let Some((l, all)) = listing.as_mut() {
                    if let Some((uid, r)) = pod_ref(&p) {
                        l.insert(uid, r);
                    }
                    if serving.is_some() {
                        all.push(p);
                    }
                }
            }
            watcher::Event::InitDone => {
                let (pods, all) = listing.take().unwrap_or_default();
                if let Some(s) = &serving {
                    s.replace(&all);
                }
                if failing {
                    info!(pods = pods.len(), "watching this node's pods again");
                }
                failing = false;
                names.replace(pods);
            }
            watcher::Event::Apply(p) => {
                events.get_or_create(&[("event", "apply")]).inc();
                if let Some((uid, r)) = pod_ref(&p) {
                    names.insert(&uid, r);
                }
                if let Some(s) = &serving {
                    s.apply(&p);
                }
            }
            watcher::Event::Delete(p) => {
                events.get_or_create(&[("event", "delete")]).inc();
                if let Some(uid) = &p.metadata.uid {
                    names.remove(uid);
                    if let Some(s) = &serving {
                        s.remove(uid);
                    }
                }
            }
        }
    }
}

/// A watcher error in operator terms (a 403 names the verb the ClusterRole lacks).
fn describe(e: &watcher::Error) -> String {
    let verb = match e {
        watcher::Error::InitialListFailed(_) => "list",
        _ => "watch",
    };
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 403 =>
        {
            format!("forbidden: the {} must allow {verb} on pods ({})", super::ROLE, s.message)
        }
        other => other.to_string(),
    }
}
