//! The agent's stream to the controller: Hello and a full snapshot on every (re)connect,
//! then a delta whenever the node report changes, heartbeats on an interval, commands
//! answered with CommandStatus. Reconnects with jittered exponential backoff and logs once
//! per attempt. The agent's node-local work never waits on this module: it reads the
//! report from a watch channel and only ever sends.

mod commands;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use hearth_proto::convert::{AgentHello, diff};
use hearth_proto::transport::TlsMaterial;
use hearth_proto::v1::{self as pb, agent_message::Kind as Out, controller_message::Kind as In};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

pub use commands::{CommandDispatcher, CommandOutcome, PartitionHandler};
pub use hearth_service::retry::Backoff;

use crate::device::Accelerator;
use crate::node::{NodeInfo, NodeSample};

/// Everything the agent reports, in domain types. Producers update their part through
/// `watch::Sender::send_modify`; the report client converts it to the wire form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeReport {
    pub info: Option<NodeInfo>,
    pub labels: BTreeMap<String, String>,
    pub sample: Option<NodeSample>,
    pub accelerators: Vec<Accelerator>,
    /// Every subsystem's status, by name.
    pub subsystems: BTreeMap<&'static str, crate::subsystem::Status>,
    pub models: Vec<crate::cache::index::IndexEntry>,
    pub bandwidth: Vec<crate::cache::manager::SourceBandwidth>,
    /// The partition reconciler's last status, also reported as node labels.
    pub partition: Option<crate::partition::reconcile::PartitionStatus>,
    /// Model servers on this node, as the runtime subsystem last read them.
    pub runtimes: Vec<crate::runtime::RuntimeStatus>,
    /// Container images on the node (every tag the runtime has).
    pub images: Vec<crate::images::CachedImage>,
    /// Measured image pull rates by registry (`oci://<registry>`), reported beside the
    /// weight sources' so placement prices an image pull with this node's own rate.
    pub image_bandwidth: Vec<crate::cache::manager::SourceBandwidth>,
}

fn model_to_wire(e: &crate::cache::index::IndexEntry) -> pb::CachedModel {
    use crate::cache::index::EntryState as S;
    pb::CachedModel {
        id: e.id.clone(),
        source_uri: e.uri.clone(),
        revision: e.revision.clone(),
        state: match e.state {
            S::Downloading => pb::CacheEntryState::Downloading,
            S::Verifying => pb::CacheEntryState::Verifying,
            S::Ready => pb::CacheEntryState::Ready,
            S::Failed => pb::CacheEntryState::Failed,
            S::Evicting => pb::CacheEntryState::Evicting,
        } as i32,
        bytes_present: e.bytes_present,
        bytes_total: e.bytes_total,
        pinned: e.pinned,
        verification: e.verification_label().to_owned(),
        last_used: Some(hearth_proto::prost_types::Timestamp { seconds: e.last_used as i64, nanos: 0 }),
        error: e.error.clone().unwrap_or_default(),
    }
}

impl NodeReport {
    pub fn to_wire(&self) -> pb::NodeState {
        pb::NodeState {
            info: self.info.as_ref().map(|i| pb::NodeInfo {
                hostname: i.hostname.clone(),
                kernel_version: i.kernel_version.clone(),
                os_image: i.os_image.clone(),
                architecture: i.architecture.clone(),
                cpu_count: i.cpu_count,
                memory_total_bytes: i.memory_total_bytes,
                labels: {
                    let mut l = self.labels.clone();
                    l.extend(self.partition.iter().flat_map(|p| p.labels()));
                    l.into_iter().collect()
                },
            }),
            resources: self.sample.as_ref().map(|s| pb::NodeResources {
                cpu_usage_ratio: s.cpu_usage_ratio,
                load1: s.load[0],
                memory_available_bytes: s.memory_available_bytes,
                cache_capacity_bytes: s.cache_capacity_bytes,
                cache_free_bytes: s.cache_free_bytes,
                interfaces: s
                    .interfaces
                    .iter()
                    .map(|i| pb::NetworkInterface { name: i.name.clone(), receive_bytes: i.rx_bytes, transmit_bytes: i.tx_bytes })
                    .collect(),
            }),
            accelerators: self.accelerators.iter().map(pb::Accelerator::from).collect(),
            subsystems: self.subsystems.iter().map(|(name, s)| s.to_wire(name)).collect(),
            models: self.models.iter().map(model_to_wire).collect(),
            source_bandwidth: self
                .bandwidth
                .iter()
                .chain(&self.image_bandwidth)
                .map(|b| pb::SourceBandwidth { source: b.source.clone(), bytes_per_second: b.bytes_per_second, samples: b.samples })
                .collect(),
            partition: self.partition.as_ref().map(Into::into),
            runtimes: self.runtimes.iter().map(crate::runtime::RuntimeStatus::to_wire).collect(),
            images: self
                .images
                .iter()
                .map(|i| pb::CachedImage { reference: i.reference.clone(), digest: i.digest.clone(), size_bytes: i.size })
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("controller URL {url:?}: {source}")]
    Endpoint { url: String, source: tonic::transport::Error },
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
    #[error("controller refused the stream: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("stream to controller broke: {code:?}: {message}")]
    Stream { code: tonic::Code, message: String },
    #[error("controller closed the stream")]
    Closed,
    #[error("controller sent no Ack within {0:?}")]
    AckTimeout(Duration),
}

impl ReportError {
    fn reason(&self) -> &'static str {
        match self {
            ReportError::Endpoint { .. } => "endpoint",
            ReportError::Connect { .. } => "connect",
            ReportError::Refused { code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated, .. } => "auth",
            ReportError::Refused { code: tonic::Code::AlreadyExists, .. } => "duplicate_node",
            ReportError::Refused { .. } => "refused",
            ReportError::Stream { .. } => "stream",
            ReportError::Closed => "closed",
            ReportError::AckTimeout(_) => "ack_timeout",
        }
    }
}

/// Metrics of the report stream. Labels: message kind and failure reason, both fixed sets.
#[derive(Debug, Clone)]
pub struct ReportMetrics {
    pub connected: Gauge,
    pub connect_attempts: Counter,
    pub connect_failures: Family<[(&'static str, &'static str); 1], Counter>,
    pub sent: Family<[(&'static str, &'static str); 1], Counter>,
    pub resyncs: Counter,
    pub ack_latency: Histogram,
}

impl ReportMetrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            connected: Gauge::default(),
            connect_attempts: Counter::default(),
            connect_failures: Family::default(),
            sent: Family::default(),
            resyncs: Counter::default(),
            ack_latency: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        };
        let r = reg.sub_registry_with_prefix("hearth_agent_controller");
        r.register("connected", "1 while the stream to the controller is up", m.connected.clone());
        r.register("connect_attempts", "Attempts to open the stream", m.connect_attempts.clone());
        r.register("connect_failures", "Failed or broken streams, by reason", m.connect_failures.clone());
        r.register("messages_sent", "Messages sent to the controller, by kind", m.sent.clone());
        r.register("resyncs", "Full snapshots re-sent because the controller asked", m.resyncs.clone());
        r.register_with_unit(
            "ack_latency",
            "Time from sending a snapshot or delta to its Ack",
            prometheus_client::registry::Unit::Seconds,
            m.ack_latency.clone(),
        );
        m
    }
}

#[derive(Debug, Clone)]
pub struct ReportSettings {
    pub url: String,
    pub server_name: String,
    pub tls: Option<TlsMaterial>,
    pub heartbeat_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_message_bytes: usize,
}

/// Builds a channel to the controller with our TLS identity and explicit limits.
pub fn endpoint(s: &ReportSettings) -> Result<Endpoint, ReportError> {
    let err = |source| ReportError::Endpoint { url: s.url.clone(), source };
    let mut ep = Endpoint::from_shared(s.url.clone())
        .map_err(err)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = &s.tls {
        ep = ep.tls_config(tls.client_config(&s.server_name)).map_err(err)?;
    }
    Ok(ep)
}

pub struct ReportClient {
    settings: ReportSettings,
    hello: AgentHello,
    /// Identifies this process's run; sequence numbers restart with it.
    epoch: u64,
    report: watch::Receiver<NodeReport>,
    metrics: ReportMetrics,
    commands: CommandDispatcher,
    /// Results of long commands; they wait here while the controller is away.
    statuses: mpsc::Receiver<pb::CommandStatus>,
}

enum SessionEnd {
    Shutdown,
    /// Ended after having been up: how long it was up.
    Broken(ReportError, Duration),
}

impl ReportClient {
    pub fn new(
        settings: ReportSettings,
        hello: AgentHello,
        report: watch::Receiver<NodeReport>,
        metrics: ReportMetrics,
        commands: CommandDispatcher,
        statuses: mpsc::Receiver<pb::CommandStatus>,
    ) -> Self {
        let epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Self { settings, hello, epoch, report, metrics, commands, statuses }
    }

    /// Runs until `shutdown`, reconnecting as needed. Never returns an error: a controller
    /// that is away is a state to report (`hearth_agent_controller_connected`, the log), not
    /// a reason for the agent to stop, nor to fail readiness: a DaemonSet rollout must not
    /// stall on every node because the controller is down.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let mut seq = 0u64;
        loop {
            self.metrics.connect_attempts.inc();
            let (err, up_for) = match self.session(&mut seq, &shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Broken(e, up)) => (e, Some(up)),
                Err(e) => (e, None),
            };
            self.metrics.connected.set(0);
            self.metrics.connect_failures.get_or_create(&[("reason", err.reason())]).inc();
            // A stream that stayed up a while was healthy: start the backoff over.
            if up_for.is_some_and(|d| d >= Duration::from_secs(30)) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(attempt = backoff.attempt(), retry_in = ?delay, error = %err, "controller stream down; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.metrics.connected.set(0);
    }

    fn snapshot(&mut self, seq: &mut u64) -> (pb::AgentMessage, pb::NodeState) {
        *seq += 1;
        let state = self.report.borrow_and_update().to_wire();
        let msg = pb::AgentMessage { kind: Some(Out::Snapshot(pb::Snapshot { epoch: self.epoch, seq: *seq, state: Some(state.clone()) })) };
        (msg, state)
    }

    async fn session(&mut self, seq: &mut u64, shutdown: &CancellationToken) -> Result<SessionEnd, ReportError> {
        let s = &self.settings;
        let ep = endpoint(s)?;
        let channel: Channel = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            c = ep.connect() => c.map_err(|source| ReportError::Connect { url: s.url.clone(), source })?,
        };
        let mut client = pb::node_agent_client::NodeAgentClient::new(channel)
            .max_decoding_message_size(s.max_message_bytes)
            .max_encoding_message_size(s.max_message_bytes);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(32);
        let hello = pb::AgentMessage { kind: Some(Out::Hello((&self.hello).into())) };
        let (snap, mut last_sent) = self.snapshot(seq);
        // Both fit: the queue is new and holds 32.
        let _ = tx.try_send(hello);
        let _ = tx.try_send(snap);
        let mut pending: BTreeMap<u64, Instant> = BTreeMap::from([(*seq, Instant::now())]);
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            r = client.connect(ReceiverStream::new(rx)) => r,
        };
        let mut inbound = opened.map_err(|st| ReportError::Refused { code: st.code(), message: st.message().to_owned() })?.into_inner();
        let up_since = Instant::now();
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        let ack_deadline = self.settings.heartbeat_interval * 3 + Duration::from_secs(5);
        let mut last_ack = Instant::now();
        let mut connected = false;
        let sent_family = self.metrics.sent.clone();
        let sent = move |kind: &'static str| sent_family.get_or_create(&[("kind", kind)]).inc();
        sent("hello");
        sent("snapshot");
        loop {
            let out = tokio::select! {
                _ = shutdown.cancelled() => {
                    info!("closing the controller stream for shutdown");
                    return Ok(SessionEnd::Shutdown);
                }
                changed = self.report.changed() => {
                    if changed.is_err() {
                        // The producer side is gone: the agent is shutting down.
                        return Ok(SessionEnd::Shutdown);
                    }
                    let new = self.report.borrow_and_update().to_wire();
                    match diff(&last_sent, &new, self.epoch, *seq + 1) {
                        None => continue,
                        Some(d) => {
                            *seq += 1;
                            pending.insert(*seq, Instant::now());
                            last_sent = new;
                            sent("delta");
                            Out::Delta(d)
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if last_ack.elapsed() > ack_deadline {
                        return Ok(SessionEnd::Broken(ReportError::AckTimeout(ack_deadline), up_since.elapsed()));
                    }
                    sent("heartbeat");
                    Out::Heartbeat(pb::Heartbeat { epoch: self.epoch, seq: *seq, sent_at: Some(SystemTime::now().into()) })
                }
                Some(st) = self.statuses.recv() => {
                    sent("command_status");
                    Out::CommandStatus(st)
                }
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(SessionEnd::Broken(ReportError::Closed, up_since.elapsed())),
                        Err(st) => {
                            let e = ReportError::Stream { code: st.code(), message: st.message().to_owned() };
                            return Ok(SessionEnd::Broken(e, up_since.elapsed()));
                        }
                    };
                    last_ack = Instant::now();
                    match msg.kind {
                        Some(In::Ack(a)) => {
                            if !connected {
                                connected = true;
                                self.metrics.connected.set(1);
                                info!(url = %self.settings.url, epoch = self.epoch, "connected to controller");
                            }
                            // Acks arrive in order; everything up to this seq is done.
                            if a.seq > 0 {
                                let rest = pending.split_off(&(a.seq + 1));
                                if let Some(sent_at) = pending.remove(&a.seq) {
                                    self.metrics.ack_latency.observe(sent_at.elapsed().as_secs_f64());
                                }
                                pending = rest;
                            }
                            continue;
                        }
                        Some(In::Resync(r)) => {
                            info!(reason = %r.reason, "controller asked for a full snapshot");
                            self.metrics.resyncs.inc();
                            let (snap, state) = self.snapshot(seq);
                            last_sent = state;
                            pending.insert(*seq, Instant::now());
                            sent("snapshot");
                            match snap.kind { Some(k) => k, None => continue }
                        }
                        Some(In::Command(c)) => {
                            let outcome = self.commands.dispatch(c, SystemTime::now());
                            if outcome.phase == pb::command_status::Phase::Rejected {
                                warn!(command = %outcome.command_id, reason = %outcome.message, "command refused");
                            } else {
                                debug!(?outcome, "command handled");
                            }
                            sent("command_status");
                            Out::CommandStatus(outcome.into_status())
                        }
                        None => continue,
                    }
                }
            };
            if tx.send(pb::AgentMessage { kind: Some(out) }).await.is_err() {
                return Ok(SessionEnd::Broken(ReportError::Closed, up_since.elapsed()));
            }
        }
    }
}
