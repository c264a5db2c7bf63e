//! The decision APIs: `hearth.v1.Placement`, `hearth.v1.Scaling` and KEDA's external scaler.
//! Each call checks the caller's role first, then turns domain answers and errors into wire
//! messages and statuses: an unknown model is NOT_FOUND, a request no node can satisfy is
//! FAILED_PRECONDITION with the reasons, bad arguments are INVALID_ARGUMENT, and a Reserve
//! whose request id already holds a lease for another model or node is ALREADY_EXISTS.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::externalscaler as keda;
use hearth_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::auth::{self, Auth};
use crate::placement::{Parts, Placement, PlacementError, Scored, Slot};
use crate::scaling::{Decision, Recommendation, Scaling, ScalingError};

pub(crate) fn placement_status(e: PlacementError) -> Status {
    match e {
        PlacementError::UnknownModel(_) => Status::not_found(e.to_string()),
        PlacementError::NoFit { .. } => Status::failed_precondition(e.to_string()),
        PlacementError::Conflict { .. } => Status::already_exists(e.to_string()),
        PlacementError::Invalid(_) => Status::invalid_argument(e.to_string()),
    }
}

fn scaling_status(e: ScalingError) -> Status {
    match e {
        ScalingError::UnknownModel(_) => Status::not_found(e.to_string()),
        ScalingError::BadDemand(_) => Status::invalid_argument(e.to_string()),
    }
}

fn slot(s: &Slot) -> pb::DeviceSlot {
    use pb::device_slot::Kind;
    let kind = match s {
        Slot::Gpus(g) => Kind::Gpus(pb::GpuSlot { indices: g.clone() }),
        Slot::MigExisting { gpu, uuid, profile } => {
            Kind::Mig(pb::MigSlot { gpu: *gpu, profile: profile.clone(), existing_uuid: uuid.clone(), create: false, start: 0 })
        }
        Slot::MigCreate { gpu, profile, start, .. } => {
            Kind::Mig(pb::MigSlot { gpu: *gpu, profile: profile.clone(), existing_uuid: String::new(), create: true, start: *start })
        }
        Slot::NeuronCores { start, count } => Kind::NeuronCores(pb::NeuronSlot { start: *start, count: *count }),
    };
    pb::DeviceSlot { kind: Some(kind) }
}

fn parts(p: &Parts) -> pb::ScoreParts {
    pb::ScoreParts {
        image_pull_seconds: p.image_pull_s,
        download_seconds: p.download_s,
        local_load_seconds: p.local_load_s,
        runtime_start_seconds: p.runtime_start_s,
        load_penalty_seconds: p.load_penalty_s,
        fragmentation_penalty_seconds: p.fragmentation_penalty_s,
        eviction_penalty_seconds: p.eviction_penalty_s,
        evict_bytes: p.evict_bytes,
        missing_bytes: p.missing_bytes,
        bandwidth_bytes_per_second: p.bandwidth,
        bandwidth_measured: p.bandwidth_measured,
        runtime_start_measured: p.runtime_start_measured,
        image_cached: p.image_cached,
    }
}

fn node_score(s: &Scored) -> pb::NodeScore {
    pb::NodeScore {
        node: s.node.clone(),
        total_seconds: s.parts.total(),
        time_to_ready_seconds: s.parts.time_to_ready(),
        priority: u32::from(s.priority),
        parts: Some(parts(&s.parts)),
        slot: Some(slot(&s.slot)),
    }
}

fn names(v: &[String]) -> Option<&[String]> {
    if v.is_empty() { None } else { Some(v) }
}

#[derive(Debug, Clone)]
pub struct PlacementService {
    placement: Arc<Placement>,
    auth: Auth,
}

impl PlacementService {
    pub fn new(placement: Arc<Placement>, auth: Auth) -> Self {
        Self { placement, auth }
    }
}

#[tonic::async_trait]
impl pb::placement_server::Placement for PlacementService {
    async fn filter(&self, req: Request<pb::FilterRequest>) -> Result<Response<pb::FilterResponse>, Status> {
        self.auth.check(&req, auth::PLACEMENT, "Placement.Filter")?;
        let r = req.into_inner();
        let out = self.placement.filter(&r.model, names(&r.nodes), Instant::now()).map_err(placement_status)?;
        Ok(Response::new(pb::FilterResponse {
            feasible: out.feasible.iter().map(node_score).collect(),
            rejected: out
                .rejected
                .iter()
                .map(|x| pb::Rejection { node: x.node.clone(), code: x.reason.code().into(), reason: x.reason.to_string() })
                .collect(),
        }))
    }

    async fn score(&self, req: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
        self.auth.check(&req, auth::PLACEMENT, "Placement.Score")?;
        let r = req.into_inner();
        let out = self.placement.score(&r.model, names(&r.nodes), r.limit as usize, Instant::now()).map_err(placement_status)?;
        Ok(Response::new(pb::ScoreResponse {
            scores: out.best.iter().map(node_score).collect(),
            rejected: u32::try_from(out.rejected).unwrap_or(u32::MAX),
        }))
    }

    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        self.auth.check(&req, auth::PLACEMENT, "Placement.Reserve")?;
        let r = req.into_inner();
        let ttl = r
            .ttl
            .map(|d| {
                Duration::try_from(d)
                    .map_err(|_| Status::invalid_argument(format!("ttl: expected a positive duration, got {}s {}ns", d.seconds, d.nanos)))
            })
            .transpose()?;
        let node = (!r.node.is_empty()).then_some(r.node.as_str());
        let l = self.placement.reserve(&r.request_id, &r.model, node, ttl, Instant::now()).map_err(placement_status)?;
        let score = Scored { node: l.node.clone(), parts: l.parts.clone(), priority: 10, slot: l.slot.clone() };
        Ok(Response::new(pb::ReserveResponse {
            lease: Some(pb::Lease {
                request_id: l.request_id,
                model: l.model,
                node: l.node,
                slot: Some(slot(&l.slot)),
                memory_bytes: l.memory_bytes,
                expires_at: Some(l.expires_at.into()),
                score: Some(node_score(&score)),
            }),
        }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.auth.check(&req, auth::PLACEMENT, "Placement.Release")?;
        let released = self.placement.release(&req.get_ref().request_id, Instant::now());
        Ok(Response::new(pb::ReleaseResponse { released }))
    }
}

pub(crate) fn recommendation(model: &str, r: &Recommendation) -> pb::Recommendation {
    pb::Recommendation {
        model: model.to_owned(),
        desired_replicas: r.desired,
        current_replicas: r.current,
        reason: r.reason.as_str().into(),
        panic: r.panic,
        stable_demand: r.stable_demand,
        panic_demand: r.panic_demand,
        projected_demand: r.projected_demand,
        lead_time_seconds: r.lead_time.as_secs_f64(),
        upcoming_replicas: r.upcoming,
    }
}

fn decision(d: &Decision) -> pb::ScalingDecision {
    pb::ScalingDecision {
        id: d.id,
        model: d.model.clone(),
        recommendation: Some(recommendation(&d.model, &d.recommendation)),
        at: Some(d.at.into()),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ScalingService {
    scaling: Arc<Scaling>,
    auth: Auth,
}

impl ScalingService {
    pub fn new(scaling: Arc<Scaling>, auth: Auth) -> Self {
        Self { scaling, auth }
    }
}

/// The latest decisions (filtered), then every new one; a watcher that falls behind gets the
/// latest state again instead of an error, since decisions are absolute replica counts.
fn decision_stream(scaling: Arc<Scaling>, model: Option<String>, after: u64) -> Result<BoxStream<Decision>, ScalingError> {
    let mut rx = scaling.subscribe();
    let initial = scaling.decisions(model.as_deref())?;
    let s = async_stream(move |tx| async move {
        let mut last = after;
        for d in initial {
            if d.id > last {
                last = d.id;
                if tx.send(Ok(d)).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let d = match rx.recv().await {
                Ok(d) => d,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let Ok(latest) = scaling.decisions(model.as_deref()) else { return };
                    let newer: Vec<Decision> = latest.into_iter().filter(|d| d.id > last).collect();
                    for d in newer {
                        last = d.id;
                        if tx.send(Ok(d)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if model.as_deref().is_some_and(|m| m != d.model) || d.id <= last {
                continue;
            }
            last = d.id;
            if tx.send(Ok(d)).await.is_err() {
                return;
            }
        }
    });
    Ok(s)
}

/// A stream fed by a task; the task ends when the receiver is dropped.
fn async_stream<T: Send + 'static, F>(f: impl FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> F) -> BoxStream<T>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `Scaling::recommend` on the blocking pool: an evaluation scores every node, CPU work that
/// stays off the I/O threads.
async fn recommend_off_runtime(
    scaling: &Arc<Scaling>,
    model: &str,
    pending: Option<f64>,
) -> Result<(Recommendation, Option<Decision>), Status> {
    let (scaling, model) = (scaling.clone(), model.to_owned());
    tokio::task::spawn_blocking(move || scaling.recommend(&model, pending, Instant::now()))
        .await
        .map_err(|e| Status::internal(format!("recommendation task failed: {e}")))?
        .map_err(scaling_status)
}

#[tonic::async_trait]
impl pb::scaling_server::Scaling for ScalingService {
    async fn recommend(&self, req: Request<pb::RecommendRequest>) -> Result<Response<pb::RecommendResponse>, Status> {
        self.auth.check(&req, auth::SCALING, "Scaling.Recommend")?;
        let r = req.into_inner();
        let (rec, last) = recommend_off_runtime(&self.scaling, &r.model, r.pending_requests).await?;
        Ok(Response::new(pb::RecommendResponse {
            recommendation: Some(recommendation(&r.model, &rec)),
            last_decision: last.as_ref().map(decision),
        }))
    }

    type WatchStream = BoxStream<pb::ScalingDecision>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.auth.check(&req, auth::SCALING, "Scaling.Watch")?;
        let r = req.into_inner();
        let model = (!r.model.is_empty()).then_some(r.model);
        let mut inner = decision_stream(self.scaling.clone(), model, r.after_id).map_err(scaling_status)?;
        let out = async_stream(move |tx| async move {
            use tokio_stream::StreamExt;
            while let Some(d) = inner.next().await {
                if tx.send(d.map(|d| decision(&d))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(out))
    }
}

/// KEDA's external scaler over the same recommendations. The ScaledObject names the model in
/// its trigger metadata (`model: <name>`). The metric is the desired replica count with a
/// per-replica target of 1, so the HPA KEDA manages lands on exactly that count.
#[derive(Debug, Clone)]
pub struct KedaService {
    scaling: Arc<Scaling>,
    auth: Auth,
}

impl KedaService {
    pub fn new(scaling: Arc<Scaling>, auth: Auth) -> Self {
        Self { scaling, auth }
    }

    fn model(r: &keda::ScaledObjectRef) -> Result<String, Status> {
        r.scaler_metadata.get("model").filter(|m| !m.is_empty()).cloned().ok_or_else(|| {
            Status::invalid_argument(format!(
                "ScaledObject {}/{}: trigger metadata needs `model: <name of a model in the controller catalog>`",
                r.namespace, r.name
            ))
        })
    }

    /// The current desired count (a model never evaluated yet is evaluated now).
    async fn desired(&self, model: &str) -> Result<u32, Status> {
        Ok(recommend_off_runtime(&self.scaling, model, None).await?.0.desired)
    }
}

fn metric_name(model: &str) -> String {
    format!("hearth-{model}-desired-replicas")
}

#[tonic::async_trait]
impl keda::external_scaler_server::ExternalScaler for KedaService {
    async fn is_active(&self, req: Request<keda::ScaledObjectRef>) -> Result<Response<keda::IsActiveResponse>, Status> {
        self.auth.check(&req, auth::SCALING, "ExternalScaler.IsActive")?;
        let model = Self::model(req.get_ref())?;
        Ok(Response::new(keda::IsActiveResponse { result: self.desired(&model).await? > 0 }))
    }

    type StreamIsActiveStream = BoxStream<keda::IsActiveResponse>;

    async fn stream_is_active(&self, req: Request<keda::ScaledObjectRef>) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        self.auth.check(&req, auth::SCALING, "ExternalScaler.StreamIsActive")?;
        let model = Self::model(req.get_ref())?;
        let first = self.desired(&model).await? > 0;
        let mut inner = decision_stream(self.scaling.clone(), Some(model), 0).map_err(scaling_status)?;
        let out = async_stream(move |tx| async move {
            use tokio_stream::StreamExt;
            // KEDA wants to hear about changes of activity, not every decision.
            let mut active = first;
            if tx.send(Ok(keda::IsActiveResponse { result: active })).await.is_err() {
                return;
            }
            while let Some(d) = inner.next().await {
                let Ok(d) = d else { return };
                let now = d.recommendation.desired > 0;
                if now != active {
                    active = now;
                    if tx.send(Ok(keda::IsActiveResponse { result: active })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn get_metric_spec(&self, req: Request<keda::ScaledObjectRef>) -> Result<Response<keda::GetMetricSpecResponse>, Status> {
        self.auth.check(&req, auth::SCALING, "ExternalScaler.GetMetricSpec")?;
        let model = Self::model(req.get_ref())?;
        // Unknown models fail here, when the ScaledObject is set up, not at the first poll.
        self.desired(&model).await?;
        Ok(Response::new(keda::GetMetricSpecResponse {
            metric_specs: vec![keda::MetricSpec { metric_name: metric_name(&model), target_size: 1, target_size_float: 1.0 }],
        }))
    }

    async fn get_metrics(&self, req: Request<keda::GetMetricsRequest>) -> Result<Response<keda::GetMetricsResponse>, Status> {
        self.auth.check(&req, auth::SCALING, "ExternalScaler.GetMetrics")?;
        let r = req.get_ref();
        let so = r.scaled_object_ref.as_ref().ok_or_else(|| Status::invalid_argument("GetMetricsRequest.scaledObjectRef is required"))?;
        let model = Self::model(so)?;
        let desired = self.desired(&model).await?;
        Ok(Response::new(keda::GetMetricsResponse {
            metric_values: vec![keda::MetricValue {
                metric_name: if r.metric_name.is_empty() { metric_name(&model) } else { r.metric_name.clone() },
                metric_value: i64::from(desired),
                metric_value_float: f64::from(desired),
            }],
        }))
    }
}

#[cfg(test)]
mod props;
