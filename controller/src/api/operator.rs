use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use hearth_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::{self, Auth};
use crate::state::{ClusterState, Connection, NodeView};

/// Read-only cluster view for operators, schedulers and autoscalers; agents may not read
/// other nodes' state.
#[derive(Debug, Clone)]
pub struct OperatorService {
    state: Arc<ClusterState>,
    auth: Auth,
}

impl OperatorService {
    pub fn new(state: Arc<ClusterState>, auth: Auth) -> Self {
        Self { state, auth }
    }
}

fn connection(c: Connection) -> pb::NodeConnection {
    match c {
        Connection::Connected => pb::NodeConnection::Connected,
        Connection::Stale => pb::NodeConnection::Stale,
        Connection::Disconnected => pb::NodeConnection::Disconnected,
    }
}

/// "2 x NVIDIA H100 80GB HBM3", one line per product.
fn accelerator_summary(state: &pb::NodeState) -> Vec<String> {
    let mut by_product: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &state.accelerators {
        *by_product.entry(a.product.as_str()).or_default() += 1;
    }
    by_product.into_iter().map(|(p, n)| format!("{n} x {p}")).collect()
}

pub(crate) fn summary(v: NodeView, state: &pb::NodeState) -> pb::NodeSummary {
    pb::NodeSummary {
        name: v.name,
        connection: connection(v.connection) as i32,
        agent_version: v.hello.agent_version,
        boot_id: v.hello.boot_id,
        epoch: v.epoch,
        seq: v.seq,
        last_report: Some(v.last_report.into()),
        last_report_age_ms: v.last_report_age.as_millis() as u64,
        accelerator_count: state.accelerators.len() as u32,
        accelerator_summary: accelerator_summary(state),
        cached_models: state.models.len() as u32,
        peer_address: v.peer,
        capabilities: v.hello.capabilities,
    }
}

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorService {
    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.auth.check(&req, auth::READ, "Operator.ListNodes")?;
        let nodes = self.state.list(Instant::now(), summary);
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, req: Request<pb::GetNodeRequest>) -> Result<Response<pb::GetNodeResponse>, Status> {
        self.auth.check(&req, auth::READ, "Operator.GetNode")?;
        let name = &req.get_ref().name;
        let (view, state) =
            self.state.get(name, Instant::now()).ok_or_else(|| Status::not_found(format!("node {name:?} is not in the cluster view")))?;
        Ok(Response::new(pb::GetNodeResponse { summary: Some(summary(view, &state)), state: Some(state) }))
    }
}
