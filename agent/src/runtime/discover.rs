//! Kubernetes-managed model servers: pods on this node that carry the model label
//! (`hearth.dev/model` by default) are runtimes Hearth reads but never starts or stops. The
//! pod says what it serves; annotations say what Hearth cannot guess:
//! `hearth.dev/engine` (vllm, sglang, tgi, triton, custom; default: from the image name),
//! `hearth.dev/port` (default: the container's port named `http`, else the engine's
//! default) and `hearth.dev/metrics-port` (default: the engine's, e.g. Triton's 8002).

use k8s_openapi::api::core::v1::Pod;

use super::engine::{EngineSpec, Kind};

pub const ENGINE_ANNOTATION: &str = "hearth.dev/engine";
pub const PORT_ANNOTATION: &str = "hearth.dev/port";
pub const METRICS_PORT_ANNOTATION: &str = "hearth.dev/metrics-port";

/// A serving pod as the agent needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub model: String,
    pub engine: Kind,
    /// None until the pod has an IP.
    pub ip: Option<String>,
    pub port: u16,
    pub metrics_port: u16,
    /// The kubelet's Ready condition.
    pub pod_ready: bool,
    /// Being deleted: the engine drains.
    pub terminating: bool,
    /// Why the pod is not read (a bad annotation), for the report and the log.
    pub problem: Option<String>,
    /// Seconds from the kubelet taking the pod to its container running (mostly the image
    /// pull), and when the container started: the engine's start is measured from there.
    pub image_seconds: Option<f64>,
    pub container_started: Option<k8s_openapi::jiff::Timestamp>,
}

impl ServingPod {
    pub fn runtime_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The serving pod `pod` is, if it carries `label`.
pub fn serving_pod(pod: &Pod, label: &str) -> Option<ServingPod> {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref()?;
    // The agent's own pods (pod driver) are supervised, not discovered.
    if labels.get(super::pod::MANAGED_BY.0).is_some_and(|v| v == super::pod::MANAGED_BY.1) {
        return None;
    }
    let model = labels.get(label)?.clone();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let mut problem = None;
    let engine = match annotations.get(ENGINE_ANNOTATION) {
        Some(e) => Kind::parse(e).unwrap_or_else(|| {
            problem = Some(format!("{ENGINE_ANNOTATION}: expected vllm, sglang, tgi, triton or custom, got {e:?}"));
            Kind::Custom
        }),
        None => containers.iter().find_map(|c| c.image.as_deref().and_then(Kind::from_image)).unwrap_or(Kind::Custom),
    };
    let builtin = EngineSpec::builtin(engine);
    let named_http = containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| u16::try_from(p.container_port).ok());
    let mut port_of = |key: &str, default: u16| match annotations.get(key) {
        None => default,
        Some(v) => v.parse::<u16>().ok().filter(|p| *p > 0).unwrap_or_else(|| {
            problem = Some(format!("{key}: expected a port number, got {v:?}"));
            default
        }),
    };
    let port = port_of(PORT_ANNOTATION, named_http.unwrap_or(builtin.port));
    let metrics_port = port_of(METRICS_PORT_ANNOTATION, builtin.metrics_port.unwrap_or(port));
    let status = pod.status.as_ref();
    let pod_ready = status.and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let pod_started = status.and_then(|s| s.start_time.as_ref()).map(|t| t.0);
    let container_started = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref().map(|t| t.0)).max());
    let image_seconds = match (pod_started, container_started) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.0).into(),
        _ => None,
    };
    Some(ServingPod {
        image_seconds,
        container_started,
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone()?,
        model,
        engine,
        ip: status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
        port,
        metrics_port,
        pod_ready,
        terminating: meta.deletion_timestamp.is_some(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_labelled_pod_is_a_runtime_with_engine_and_ports_from_its_spec() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "llama-0", "namespace": "serving", "uid": "u1", "labels": {"hearth.dev/model": "llama-3-8b"}},
            "spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.11.0", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]},
        }));
        let s = serving_pod(&p, "hearth.dev/model").unwrap();
        assert_eq!((s.engine, s.port, s.metrics_port, s.pod_ready, s.ip.as_deref()), (Kind::Vllm, 8080, 8080, true, Some("10.1.2.3")));
        assert_eq!((s.runtime_name().as_str(), s.model.as_str(), s.problem), ("serving/llama-0", "llama-3-8b", None));
        assert!(serving_pod(&p, "other.io/model").is_none(), "only labelled pods");
        let mut own = p.clone();
        own.metadata.labels.as_mut().unwrap().insert("app.kubernetes.io/managed-by".into(), "hearth-agent".into());
        assert!(serving_pod(&own, "hearth.dev/model").is_none(), "the pod driver's own pods are supervised, not discovered");
    }

    #[test]
    fn annotations_override_and_bad_ones_are_named() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "t", "namespace": "s", "uid": "u2", "labels": {"hearth.dev/model": "m"},
                         "annotations": {"hearth.dev/engine": "triton", "hearth.dev/metrics-port": "nine"}},
            "spec": {"containers": [{"name": "main", "image": "nvcr.io/nvidia/tritonserver:25.01-py3"}]},
        }));
        let s = serving_pod(&p, "hearth.dev/model").unwrap();
        assert_eq!((s.engine, s.port, s.metrics_port, s.ip), (Kind::Triton, 8000, 8002, None));
        assert_eq!(s.problem.as_deref(), Some("hearth.dev/metrics-port: expected a port number, got \"nine\""));
    }
}
