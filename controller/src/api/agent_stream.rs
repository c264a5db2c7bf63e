use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::convert::AgentHello;
use hearth_proto::v1::{self as pb, agent_message::Kind as In, controller_message::Kind as Out};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;
use crate::state::{ClusterState, SessionId, StateError};

/// Outbound queue per stream. Small: acks are tiny and an agent that stops reading should
/// slow its own session down, not grow the controller's memory.
const OUTBOUND_QUEUE: usize = 32;
/// Commands waiting for one node's stream.
const COMMAND_QUEUE: usize = 64;

#[derive(Debug, Clone)]
pub struct NodeAgentService {
    state: Arc<ClusterState>,
    metrics: Metrics,
    insecure: bool,
    auth: super::auth::Auth,
    hello_timeout: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    leadership: crate::leader::Leadership,
}

impl NodeAgentService {
    // One call site (`start`) wires these; a builder would add code without adding clarity.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<ClusterState>,
        metrics: Metrics,
        insecure: bool,
        auth: super::auth::Auth,
        hello_timeout: Duration,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        leadership: crate::leader::Leadership,
    ) -> Self {
        Self { state, metrics, insecure, auth, hello_timeout, shutdown, tasks, leadership }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.sessions_refused.get_or_create(&[("reason", reason)]).inc();
        warn!(reason, status = %status.message(), "agent stream refused");
        status
    }

    fn count(&self, kind: &'static str) {
        self.metrics.messages.get_or_create(&[("kind", kind)]).inc();
    }

    /// Waits for the stream's first message, which must be a valid Hello from the node the
    /// client certificate names.
    async fn accept_hello(
        &self,
        inbound: &mut Streaming<pb::AgentMessage>,
        cert: Option<&rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<AgentHello, Status> {
        let first = match tokio::time::timeout(self.hello_timeout, inbound.message()).await {
            Err(_) => {
                let msg = format!("no Hello within {:?} of opening the stream", self.hello_timeout);
                return Err(self.refuse("hello_timeout", Status::deadline_exceeded(msg)));
            }
            Ok(Err(s)) => return Err(self.refuse(super::status_reason(&s), s)),
            Ok(Ok(None)) => {
                return Err(self.refuse("protocol", Status::invalid_argument("stream closed before Hello")));
            }
            Ok(Ok(Some(m))) => m,
        };
        let hello = match first.kind {
            Some(In::Hello(h)) => h,
            other => {
                let msg = format!("expected Hello as the first message, got {}", kind_name(other.as_ref()));
                return Err(self.refuse("protocol", Status::invalid_argument(msg)));
            }
        };
        self.count("hello");
        let hello = AgentHello::try_from(hello).map_err(|e| self.refuse("invalid_hello", Status::invalid_argument(e.to_string())))?;
        if let Some(cert) = cert {
            // A scheduler's or operator's certificate must not report as a node, even one
            // whose name matches its identity.
            let role = self.auth.role_of_cert(cert);
            if role != super::auth::Role::Agent {
                let msg = format!("a {} identity cannot report as node {:?}", role.as_str(), hello.node_name);
                return Err(self.refuse("identity_mismatch", Status::permission_denied(msg)));
            }
            if !self.auth.is_fleet_agent(cert) {
                hearth_proto::transport::check_node_identity(cert, &hello.node_name)
                    .map_err(|e| self.refuse("identity_mismatch", Status::permission_denied(e.to_string())))?;
            }
        }
        Ok(hello)
    }
}

fn kind_name(k: Option<&In>) -> &'static str {
    match k {
        None => "an empty message",
        Some(In::Hello(_)) => "Hello",
        Some(In::Snapshot(_)) => "Snapshot",
        Some(In::Delta(_)) => "Delta",
        Some(In::Heartbeat(_)) => "Heartbeat",
        Some(In::CommandStatus(_)) => "CommandStatus",
    }
}

fn ack(seq: u64, kind: pb::AckedKind) -> pb::ControllerMessage {
    pb::ControllerMessage { kind: Some(Out::Ack(pb::Ack { seq, kind: kind as i32 })) }
}

fn resync(reason: String) -> pb::ControllerMessage {
    pb::ControllerMessage { kind: Some(Out::Resync(pb::Resync { reason })) }
}

type OutStream = ReceiverStream<Result<pb::ControllerMessage, Status>>;

#[tonic::async_trait]
impl pb::node_agent_server::NodeAgent for NodeAgentService {
    type ConnectStream = OutStream;

    async fn connect(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<OutStream>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        let cert = super::client_cert(&req, self.insecure).map_err(|s| self.refuse("no_certificate", s))?;
        let mut inbound = req.into_inner();
        let hello = self.accept_hello(&mut inbound, cert.as_ref()).await?;
        let node = hello.node_name.clone();
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let session = self
            .state
            .open_session(hello.clone(), peer.clone(), cmd_tx, Instant::now())
            .map_err(|e| self.refuse("duplicate_node", Status::already_exists(e.to_string())))?;
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        // Cannot fail: the queue is new and empty.
        let _ = out_tx.try_send(Ok(ack(0, pb::AckedKind::Hello)));
        info!(%node, %peer, boot_id = %hello.boot_id, version = %hello.agent_version, "agent connected");
        let span = info_span!("agent_session", %node, session);
        let this = self.clone();
        self.tasks.spawn(
            async move {
                this.metrics.connected_agents.inc();
                let end = this.run_session(&node, session, inbound, &out_tx, cmd_rx).await;
                this.state.close_session(&node, session);
                this.metrics.connected_agents.dec();
                match end {
                    Ok(()) => info!("agent stream closed"),
                    Err(status) => {
                        this.metrics.stream_errors.get_or_create(&[("reason", super::status_reason(&status))]).inc();
                        info!(code = ?status.code(), status = %status.message(), "agent stream ended");
                        let _ = out_tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

impl NodeAgentService {
    async fn run_session(
        &self,
        node: &str,
        session: SessionId,
        mut inbound: Streaming<pb::AgentMessage>,
        out: &mpsc::Sender<Result<pb::ControllerMessage, Status>>,
        mut commands: mpsc::Receiver<pb::Command>,
    ) -> Result<(), Status> {
        // A leader that loses its Lease drops every stream at once: the agents reconnect,
        // and the Service sends them to the new leader.
        let lost = self.leadership.lost();
        tokio::pin!(lost);
        loop {
            let reply = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(Status::unavailable("controller shutting down")),
                _ = &mut lost => return Err(Status::unavailable("this controller is no longer the leader; reconnect")),
                Some(cmd) = commands.recv() => pb::ControllerMessage { kind: Some(Out::Command(cmd)) },
                msg = inbound.message() => match msg? {
                    None => return Ok(()),
                    Some(m) => match self.handle(node, session, m)? {
                        Some(r) => r,
                        None => continue,
                    },
                },
            };
            if out.send(Ok(reply)).await.is_err() {
                // The agent went away; its inbound side will tell us how.
                return Ok(());
            }
        }
    }

    /// Applies one message to the cluster view and returns the answer to send.
    fn handle(&self, node: &str, session: SessionId, m: pb::AgentMessage) -> Result<Option<pb::ControllerMessage>, Status> {
        let now = Instant::now();
        let (kind, result, reply) = match m.kind {
            Some(In::Snapshot(s)) => {
                let seq = s.seq;
                ("snapshot", self.state.apply_snapshot(node, session, s, now), ack(seq, pb::AckedKind::Snapshot))
            }
            Some(In::Delta(d)) => {
                let seq = d.seq;
                ("delta", self.state.apply_delta(node, session, d, now), ack(seq, pb::AckedKind::Delta))
            }
            Some(In::Heartbeat(h)) => ("heartbeat", self.state.heartbeat(node, session, &h, now), ack(h.seq, pb::AckedKind::Heartbeat)),
            Some(In::CommandStatus(c)) => {
                debug!(command = %c.command_id, phase = c.phase, message = %c.message, "command status");
                self.state.record_outcome(node, &c);
                ("command_status", self.state.touch(node, session, now), ack(0, pb::AckedKind::CommandStatus))
            }
            Some(In::Hello(_)) => {
                return Err(Status::invalid_argument("Hello sent twice on one stream"));
            }
            None => return Err(Status::invalid_argument("empty AgentMessage (no kind set)")),
        };
        self.count(kind);
        match result {
            Ok(()) => Ok(Some(reply)),
            Err(e @ (StateError::NeedResync(_) | StateError::NoSnapshot(_))) => {
                self.metrics.resyncs.inc();
                debug!(reason = %e, "asking for resync");
                Ok(Some(resync(e.to_string())))
            }
            Err(e @ StateError::Superseded { .. }) => Err(Status::aborted(e.to_string())),
            Err(e @ StateError::DuplicateNode { .. }) => Err(Status::already_exists(e.to_string())),
        }
    }
}

#[cfg(test)]
mod props;
