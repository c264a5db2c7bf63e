//! The controller's own metrics. Label values are fixed sets (message kinds, refusal and
//! error reasons, connection states), so cardinality does not grow with the cluster.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::state::ClusterState;

pub type Labels = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Messages received from agents, by kind.
    pub messages: Family<Labels, Counter>,
    /// Streams that ended in an error, by reason.
    pub stream_errors: Family<Labels, Counter>,
    /// Streams refused before a session opened, by reason.
    pub sessions_refused: Family<Labels, Counter>,
    pub tls_handshake_failures: Family<Labels, Counter>,
    pub connected_agents: Gauge,
    pub resyncs: Counter,
}

impl Metrics {
    pub fn register(reg: &mut Registry, state: Arc<ClusterState>) -> Self {
        let m = Self {
            messages: Family::default(),
            stream_errors: Family::default(),
            sessions_refused: Family::default(),
            tls_handshake_failures: Family::default(),
            connected_agents: Gauge::default(),
            resyncs: Counter::default(),
        };
        let r = reg.sub_registry_with_prefix("hearth_controller");
        r.register("messages_received", "Messages received from agents, by kind", m.messages.clone());
        r.register("stream_errors", "Agent streams ended by an error, by reason", m.stream_errors.clone());
        r.register(
            "sessions_refused",
            "Agent streams refused before a session opened (no certificate, identity mismatch, duplicate node, bad Hello)",
            m.sessions_refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (expired, untrusted, timeout...)",
            m.tls_handshake_failures.clone(),
        );
        r.register("connected_agents", "Agent streams open now", m.connected_agents.clone());
        r.register("resyncs", "Resync requests sent to agents after a sequence gap", m.resyncs.clone());
        r.register_collector(Box::new(StateCollector(state)));
        m
    }
}

/// Reads node counts and state size from the cluster view at scrape time.
#[derive(Debug)]
struct StateCollector(Arc<ClusterState>);

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.counts(Instant::now());
        let mut m = encoder.encode_descriptor("nodes", "Nodes in the cluster view, by connection state", None, MetricType::Gauge)?;
        for (c, n) in counts {
            let labels = [("connection", c.as_str())];
            ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
        }
        let m = encoder.encode_descriptor("state", "Encoded size of all node states held", Some(&Unit::Bytes), MetricType::Gauge)?;
        ConstGauge::new(self.0.state_bytes() as i64).encode(m)?;
        Ok(())
    }
}
