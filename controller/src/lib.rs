//! hearth-controller: keeps the cluster view from agent streams and serves it. `start`
//! wires the pieces (state, gRPC services, TLS listener, HTTP telemetry, sweeper) and
//! returns the bound addresses; the binary and `hearth local` both use it.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod catalog;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod scaling;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::transport::TlsMaterial;
use hearth_proto::v1 as pb;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] hearth_proto::transport::TlsError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("leader election: {0}")]
    Kube(#[from] hearth_service::kube::KubeError),
    #[error("tasks did not stop within the {0:?} grace period")]
    ShutdownTimeout(Duration),
}

/// A started controller.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The kube-scheduler extender's address, when it is on.
    pub extender_addr: Option<SocketAddr>,
    pub state: Arc<state::ClusterState>,
    pub placement: Arc<placement::Placement>,
    pub scaling: Arc<scaling::Scaling>,
    task: JoinHandle<Result<(), ControllerError>>,
}

impl Running {
    /// Waits until the controller has stopped (after `shutdown` was cancelled, or a failure).
    pub async fn wait(self) -> Result<(), ControllerError> {
        self.task.await.unwrap_or_else(|e| Err(ControllerError::Http(std::io::Error::other(format!("controller task panicked: {e}")))))
    }
}

/// Binds both listeners (failing now if a port is taken or TLS files are bad) and serves
/// until `shutdown` is cancelled; then stops every session within `config.shutdown_grace`.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, ControllerError> {
    let tls = config.tls.as_ref().map(TlsMaterial::load).transpose()?;
    let insecure = tls.is_none();
    if insecure {
        warn!("controller running WITHOUT TLS (insecure mode): any peer can claim any node name");
    }
    let state = Arc::new(state::ClusterState::new(config.stale_after, config.forget_after));
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry, state.clone());
    let placement = Arc::new(placement::Placement::new(state.clone(), Arc::new(config.catalog.clone()), config.placement.clone()));
    let scaling = Arc::new(scaling::Scaling::new(placement.clone(), config.scaling.clone(), &mut registry));
    let auth = config.auth.clone();
    let readiness = Arc::new(hearth_service::http::Readiness::default());
    // The election runs beside the servers and stops with them (releasing the Lease).
    let election = TaskTracker::new();
    let leadership = leader::start(config.leader_election.clone(), &mut registry, &election, shutdown.clone()).await?;
    scaling.follow(leadership.clone());

    let grpc =
        TcpListener::bind(config.listen).await.map_err(|source| ControllerError::Bind { what: "gRPC", addr: config.listen, source })?;
    let grpc_addr = grpc.local_addr().map_err(|source| ControllerError::Bind { what: "gRPC", addr: config.listen, source })?;
    let (http_addr, http) =
        hearth_service::http::bind_http(config.http_listen, Arc::new(registry), readiness, Vec::new(), shutdown.clone())
            .await
            .map_err(|source| ControllerError::Bind { what: "HTTP", addr: config.http_listen, source })?;

    let extender = match config.extender_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|source| ControllerError::Bind { what: "extender", addr, source })?;
            let bound = l.local_addr().map_err(|source| ControllerError::Bind { what: "extender", addr, source })?;
            Some((l, bound))
        }
        None => None,
    };
    let extender_addr = extender.as_ref().map(|(_, a)| *a);

    let sessions = TaskTracker::new();
    let agent_svc = api::NodeAgentService::new(
        state.clone(),
        metrics.clone(),
        insecure,
        auth.clone(),
        config.hello_timeout,
        shutdown.clone(),
        sessions.clone(),
        leadership.clone(),
    );
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<pb::node_agent_server::NodeAgentServer<api::NodeAgentService>>().await;
    health.set_serving::<pb::operator_server::OperatorServer<api::OperatorService>>().await;
    health.set_serving::<pb::placement_server::PlacementServer<api::PlacementService>>().await;
    health.set_serving::<pb::scaling_server::ScalingServer<api::ScalingService>>().await;
    health.set_serving::<hearth_proto::externalscaler::external_scaler_server::ExternalScalerServer<api::KedaService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hearth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ControllerError::Http(std::io::Error::other(format!("reflection: {e}"))))?;
    let max = config.max_message_bytes;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Finds agents whose node vanished without closing the connection.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(api::LeaderGateLayer(leadership.clone()))
        .add_service(pb::node_agent_server::NodeAgentServer::new(agent_svc).max_decoding_message_size(max).max_encoding_message_size(max))
        .add_service(
            pb::operator_server::OperatorServer::new(api::OperatorService::new(state.clone(), auth.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(pb::placement_server::PlacementServer::new(api::PlacementService::new(placement.clone(), auth.clone())))
        .add_service(pb::scaling_server::ScalingServer::new(api::ScalingService::new(scaling.clone(), auth.clone())))
        .add_service(hearth_proto::externalscaler::external_scaler_server::ExternalScalerServer::new(api::KedaService::new(
            scaling.clone(),
            auth.clone(),
        )))
        .add_service(health_svc)
        .add_service(reflection);

    let grace = config.shutdown_grace;
    let scaling_loop = scaling.clone().run(leadership.clone(), shutdown.clone());
    let extender_task = {
        let tls_cfg = match &tls {
            Some(m) => {
                // HTTP/1.1 for kube-scheduler; client certificates optional so bearer tokens work.
                let mut c = m.server_config()?;
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(c))
            }
            None => None,
        };
        let (placement, auth, stop, prefix) = (placement.clone(), auth.clone(), shutdown.clone(), config.extender_prefix.clone());
        let leadership = leadership.clone();
        async move {
            match extender {
                Some((l, _)) => api::extender::serve(l, tls_cfg, prefix, placement, auth, leadership, stop).await,
                None => Ok(()),
            }
        }
    };
    let sweeper_state = state.clone();
    let sweeper_stop = shutdown.clone();
    let task = tokio::spawn(
        async move {
            let sweeper = async {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = sweeper_stop.cancelled() => return,
                        _ = tick.tick() => {
                            let n = sweeper_state.sweep(Instant::now());
                            if n > 0 {
                                info!(forgotten = n, "dropped nodes disconnected for longer than forget_after");
                            }
                        }
                    }
                }
            };
            let stop = shutdown.clone();
            let serve = async move {
                match tls {
                    Some(m) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(m.server_config()?));
                        let incoming = api::tls_incoming(grpc, acceptor, metrics, stop.clone());
                        router.serve_with_incoming_shutdown(incoming, stop.cancelled()).await?;
                    }
                    None => {
                        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
                        router.serve_with_incoming_shutdown(incoming, stop.cancelled()).await?;
                    }
                }
                Ok::<(), ControllerError>(())
            };
            let (served, http, (), (), ext) = tokio::join!(serve, http, sweeper, scaling_loop, extender_task);
            sessions.close();
            election.close();
            if tokio::time::timeout(grace, async { tokio::join!(sessions.wait(), election.wait()) }).await.is_err() {
                return Err(ControllerError::ShutdownTimeout(grace));
            }
            served?;
            http.map_err(ControllerError::Http)?;
            ext.map_err(ControllerError::Http)?;
            info!("controller stopped");
            Ok(())
        }
        .instrument(info_span!("controller")),
    );
    info!(%grpc_addr, %http_addr, extender = ?extender_addr, tls = !insecure, models = config.catalog.len(), "controller listening");
    Ok(Running { grpc_addr, http_addr, extender_addr, state, placement, scaling, task })
}
