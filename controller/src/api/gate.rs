//! The standby's answer: while this controller is not the leader, every gRPC call but
//! health and reflection gets UNAVAILABLE, which agents and clients treat as "reconnect":
//! through the Service they reach the leader. A standby's own view is empty, so answering
//! placement or scaling questions from it would be wrong, not just stale.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::leader::Leadership;

/// The tower layer for tonic's server.
#[derive(Debug, Clone)]
pub struct LeaderGateLayer(pub Leadership);

impl<S> tower::Layer<S> for LeaderGateLayer {
    type Service = LeaderGate<S>;
    fn layer(&self, inner: S) -> LeaderGate<S> {
        LeaderGate { inner, leadership: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct LeaderGate<S> {
    inner: S,
    leadership: Leadership,
}

/// Paths a standby still serves: probes and service discovery.
fn always_served(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl<S, B> tower::Service<http::Request<B>> for LeaderGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.leadership.is_leader() || always_served(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let status = tonic::Status::unavailable("this controller is a standby; reconnect to reach the leader");
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}
