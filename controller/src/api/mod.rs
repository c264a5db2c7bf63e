//! The controller's network face: the `NodeAgent` stream that agents report over, the
//! read-only `Operator` service, gRPC health and reflection, and the TLS listener that
//! counts refused handshakes. It turns wire messages into [`ClusterState`] calls and state
//! errors into gRPC statuses; decisions live elsewhere.

mod agent_stream;
pub mod auth;
mod decide;
pub mod extender;
mod gate;
mod operator;
mod tls;

pub use agent_stream::NodeAgentService;
pub use decide::{KedaService, PlacementService, ScalingService};
pub use gate::LeaderGateLayer;
pub use operator::OperatorService;
pub use tls::tls_incoming;

use tonic::{Request, Status};

/// Returns the verified client certificate of a request, or Unauthenticated. `None` in
/// insecure mode, where there is nothing to check.
pub(crate) fn client_cert<T>(req: &Request<T>, insecure: bool) -> Result<Option<rustls::pki_types::CertificateDer<'static>>, Status> {
    if insecure {
        return Ok(None);
    }
    req.peer_certs()
        .and_then(|c| c.first().cloned())
        .map(Some)
        .ok_or_else(|| Status::unauthenticated(hearth_proto::transport::IdentityError::NoCertificate.to_string()))
}

/// A bounded label for a status that ended a stream.
pub(crate) fn status_reason(s: &Status) -> &'static str {
    use tonic::Code;
    match s.code() {
        Code::ResourceExhausted | Code::OutOfRange => "too_large",
        Code::Internal if s.message().contains("decode") => "malformed",
        Code::InvalidArgument => "protocol",
        Code::Cancelled | Code::Unknown | Code::Unavailable => "transport",
        Code::Aborted => "superseded",
        _ => "other",
    }
}
